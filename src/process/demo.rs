//! `proxsmtpd --demo [DIR] [-d N] [--set Name=Value]...`: the proxy on an embedded default
//! that needs no mail server. The options of a normal run apply on top of its configuration;
//! it refuses to start, without writing anything, when one of its ports is taken.
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

use crate::process::cli::{DemoArgs, RunArgs};
use crate::protocol::data::DataReceiver;
use crate::protocol::line::{trim_line_end, Framed, LineReader, COMMAND_LINE_LIMIT};

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

const DEFAULT_LISTEN: &str = "127.0.0.1:10025";
const DEFAULT_ADMIN: &str = "127.0.0.1:9925";

/// The value the command line gives `name` (the last `--set`), if any.
fn overridden<'a>(run: &'a RunArgs, name: &str) -> Option<&'a str> {
    run.overrides
        .iter()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether `address` can be bound now (an address that is not host:port is left to the
/// proxy's own start).
fn check_free(address: &str) -> Result<(), String> {
    match address.parse::<std::net::SocketAddr>() {
        Ok(addr) => std::net::TcpListener::bind(addr)
            .map(drop)
            .map_err(|e| format!("{address}: {e}")),
        Err(_) => Ok(()),
    }
}

pub fn main(args: DemoArgs) -> ExitCode {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("proxsmtpd-demo"));
    let listen = overridden(&args.run, "Listen")
        .unwrap_or(DEFAULT_LISTEN)
        .to_string();
    let admin = overridden(&args.run, "AdminListen")
        .unwrap_or(DEFAULT_ADMIN)
        .to_string();
    // Every port is checked before anything is written: a second demo must not rewrite
    // (and so reload) the files of one that is running.
    let capture = std::net::TcpListener::bind(CAPTURE_ADDRESS)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("{CAPTURE_ADDRESS}: {e}"));
    let ports = capture.and_then(|capture| {
        check_free(&listen)?;
        check_free(&admin)?;
        Ok(capture)
    });
    let capture = match ports {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "proxsmtpd: demo: {e}: is another demo running? Stop it (Ctrl-C) or free the port; \
                 nothing was written to {}",
                dir.display()
            );
            return ExitCode::from(1);
        }
    };
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
        if let Err(e) = runtime.block_on(capture_server(capture, mail_dir)) {
            eprintln!("proxsmtpd: demo: capture server on {CAPTURE_ADDRESS}: {e}");
            std::process::exit(1);
        }
    });
    eprintln!("{}", banner(&listen, &admin, &dir));
    let run = RunArgs {
        debug_level: args.run.debug_level.or(Some(3)),
        config_path: config,
        ..args.run
    };
    let code = crate::process::app::run(run);
    drop(capture);
    code
}

/// What the demo prints at start: where it listens, what to try, how to stop.
fn banner(listen: &str, admin: &str, dir: &Path) -> String {
    let swaks = format!("swaks --server {listen} --to you@example.org --body");
    format!(
        "proxsmtpd demo: SMTP on {listen}, admin on http://{admin}/metrics,\n\
         \x20 messages delivered to {dir}/mail/. Try:\n\
         \x20 {swaks} 'hello'            delivered, tagged X-Demo-Filter\n\
         \x20 {swaks} 'REJECT me'        REJECT: refused with 550\n\
         \x20 {swaks} 'DROP me'          DROP: accepted with 250, silently dropped\n\
         \x20 {swaks} 'TEMPFAIL me'      TEMPFAIL: deferred with 451\n\
         Stop it with Ctrl-C.",
        dir = dir.display()
    )
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
async fn capture_server(listener: std::net::TcpListener, mail_dir: PathBuf) -> std::io::Result<()> {
    let listener = TcpListener::from_std(listener)?;
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
