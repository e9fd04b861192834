//! `proxsmtpd --demo [DIR]`: the proxy on an embedded default that needs no mail server.
//!
//! It starts a small capture server on 127.0.0.1:10026 that stores every message it
//! receives as a file in `DIR/mail/`, writes a sample filter script and a configuration
//! into `DIR` (default `./proxsmtpd-demo`), and runs the proxy on 127.0.0.1:10025 with its
//! admin server on 127.0.0.1:9925. Send mail with any SMTP client and watch the verdicts:
//! a message containing REJECT is rejected, DROP is dropped silently, TEMPFAIL is deferred,
//! anything else is tagged and delivered into `DIR/mail/`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cli::RunArgs;
use crate::smtp::data::DataReceiver;
use crate::smtp::line::{trim_line_end, Framed, LineReader, COMMAND_LINE_LIMIT};

const DEMO_FILTER: &str = r#"#!/bin/sh
# Demo filter for proxsmtpd: the message arrives on stdin, the filtered message goes to
# stdout. Exit 0 delivers; any other exit rejects with the last line written to stderr.
tmp=$(mktemp) || exit 75
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
if grep -q 'REJECT' "$tmp"; then
    echo "550 5.7.1 Rejected by the demo filter: the message says REJECT" >&2; exit 1
fi
if grep -q 'DROP' "$tmp"; then
    echo "250 2.0.0 Dropped silently by the demo filter" >&2; exit 1
fi
if grep -q 'TEMPFAIL' "$tmp"; then
    echo "451 4.7.1 The demo filter says: try again later" >&2; exit 1
fi
printf 'X-Demo-Filter: passed, sender %s\r\n' "$SENDER"
cat "$tmp"
"#;

const CAPTURE_ADDRESS: &str = "127.0.0.1:10026";

pub fn main(args: &[String]) -> ExitCode {
    let dir = PathBuf::from(args.first().map(String::as_str).unwrap_or("proxsmtpd-demo"));
    let config = match prepare(&dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxsmtpd: demo: couldn't prepare {}: {e}", dir.display());
            return ExitCode::from(1);
        }
    };
    let mail_dir = dir.join("mail");
    let capture = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the capture server");
        if let Err(e) = runtime.block_on(capture_server(mail_dir)) {
            eprintln!("proxsmtpd: demo: capture server on {CAPTURE_ADDRESS}: {e}");
            std::process::exit(1);
        }
    });
    eprintln!(
        "proxsmtpd demo: SMTP on 127.0.0.1:10025, admin on http://127.0.0.1:9925/metrics,\n\
         \x20 messages delivered to {}/mail/. Try:\n\
         \x20 swaks --server 127.0.0.1:10025 --to you@example.org --body 'hello'\n\
         \x20 swaks --server 127.0.0.1:10025 --to you@example.org --body 'REJECT me'\n\
         \x20 swaks --server 127.0.0.1:10025 --to you@example.org --body 'DROP me'",
        dir.display()
    );
    let code = crate::app::run(RunArgs {
        debug_level: Some(3),
        config_path: config,
        pid_file: None,
        overrides: Vec::new(),
    });
    drop(capture);
    code
}

fn prepare(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("mail"))?;
    std::fs::create_dir_all(dir.join("spool"))?;
    let dir = dir.canonicalize()?;
    let filter = dir.join("demo-filter.sh");
    std::fs::write(&filter, DEMO_FILTER)?;
    std::fs::set_permissions(&filter, std::fs::Permissions::from_mode(0o755))?;
    let config = dir.join("proxsmtpd.conf");
    std::fs::write(
        &config,
        format!(
            "# proxsmtpd demo configuration\n\
             Listen: 127.0.0.1:10025\n\
             OutAddress: {CAPTURE_ADDRESS}\n\
             FilterCommand: {}\n\
             FilterTimeout: 10\n\
             Header: X-Filtered-By: proxsmtpd demo for %i\n\
             TempDirectory: {}\n\
             AdminListen: 127.0.0.1:9925\n",
            filter.display(),
            dir.join("spool").display()
        ),
    )?;
    Ok(config)
}

/// A minimal SMTP server that stores each message in `mail_dir`.
async fn capture_server(mail_dir: PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::bind(CAPTURE_ADDRESS).await?;
    let mut counter = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        let mail_dir = mail_dir.clone();
        let first = counter;
        counter += 1000;
        tokio::spawn(async move {
            let _ = capture_session(stream, mail_dir, first).await;
        });
    }
}

async fn capture_session(
    mut stream: TcpStream,
    mail_dir: PathBuf,
    mut n: u64,
) -> std::io::Result<()> {
    stream.write_all(b"220 capture.demo ESMTP\r\n").await?;
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut lines = LineReader::new(COMMAND_LINE_LIMIT);
    loop {
        let line = loop {
            if let Some(f) = lines.next(&mut buf) {
                break f;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let Framed::Line(line) = line else {
            stream.write_all(b"500 5.5.0 line too long\r\n").await?;
            continue;
        };
        let verb = String::from_utf8_lossy(trim_line_end(&line)).to_ascii_uppercase();
        let reply: &[u8] = match verb.split(' ').next().unwrap_or("") {
            "EHLO" => b"250-capture.demo\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n",
            "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.0.0 Ok\r\n",
            "QUIT" => {
                stream.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            "DATA" => {
                stream
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                let mut receiver = DataReceiver::new();
                let mut message = Vec::new();
                loop {
                    let feed = receiver.feed(&buf, &mut message);
                    buf.advance(feed.consumed);
                    if feed.done {
                        break;
                    }
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Ok(());
                    }
                }
                n += 1;
                let name = format!("{}-{n}.eml", jiff::Timestamp::now().as_second());
                tokio::fs::write(mail_dir.join(&name), &message).await?;
                let reply = format!("250 2.0.0 Ok: stored as {name}\r\n");
                stream.write_all(reply.as_bytes()).await?;
                continue;
            }
            _ => b"502 5.5.2 Command not recognized\r\n",
        };
        stream.write_all(reply).await?;
    }
}
