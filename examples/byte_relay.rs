//! The benchmark's `relay` setup: the least any TCP proxy can do. Accepts on LISTEN, connects
//! to UPSTREAM for each connection and copies bytes both ways, understanding nothing of SMTP.
//!
//! It puts a number on what two extra socket hops per exchange cost on the machine, so that
//! the proxy's added latency can be read against the floor of any relay, not only against
//! the direct path.
//!
//! `--hold-dot-ms N` (with `--hold-jitter-ms J`, as the null hook's `--jitter-ms`) holds
//! each message's end (a read from the client that ends in CR LF . CR LF) for that long
//! before passing it on: the floor of any proxy whose filter takes N ms, for the slow-hook
//! scenarios. It does less than a filtering proxy can: the upstream has had the DATA
//! command and the body while the relay waits, so after the wait only the dot and its
//! reply are left, where a filtering proxy still has DATA, 354 and the body to send.
//!
//!     cargo build --release --example byte_relay
//!     target/release/examples/byte_relay 127.0.0.1:10025 127.0.0.1:10026 [--hold-dot-ms 50]

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "support/wait.rs"]
mod wait;
use wait::Wait;

const USAGE: &str =
    "usage: byte_relay LISTEN_ADDR UPSTREAM_ADDR [--hold-dot-ms N] [--hold-jitter-ms J]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, options @ ..] = args.as_slice() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("byte_relay: UPSTREAM_ADDR must be IP:PORT");
        return ExitCode::from(2);
    };
    let mut hold = Wait::default();
    for pair in options.chunks(2) {
        let parsed = match pair {
            [flag, v] if flag == "--hold-dot-ms" => wait::millis(flag, v).map(|d| hold.delay = d),
            [flag, v] if flag == "--hold-jitter-ms" => {
                wait::millis(flag, v).map(|d| hold.jitter = d)
            }
            _ => Err(USAGE.to_string()),
        };
        if let Err(e) = parsed {
            eprintln!("byte_relay: {e}");
            return ExitCode::from(2);
        }
    }
    if hold.jitter > hold.delay {
        eprintln!("byte_relay: --hold-jitter-ms must not exceed --hold-dot-ms");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("byte_relay: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(serve(listen, upstream, hold)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("byte_relay: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(listen: &str, upstream: SocketAddr, hold: Wait) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (mut client, _) = listener.accept().await?;
        tokio::spawn(async move {
            // Same socket options as the proxy: small writes go out at once.
            let _ = client.set_nodelay(true);
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = server.set_nodelay(true);
            if hold.delay.is_zero() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                return;
            }
            let (mut client_in, mut client_out) = client.split();
            let (mut server_in, mut server_out) = server.split();
            let _ = tokio::join!(
                copy_holding_dot(&mut client_in, &mut server_out, hold),
                tokio::io::copy(&mut server_in, &mut client_out),
            );
        });
    }
}

/// Copies `from` to `to`, waiting before each read that ends a message (CR LF . CR LF, the
/// last bytes a client sends before it waits for the reply).
async fn copy_holding_dot(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    hold: Wait,
) -> std::io::Result<()> {
    let mut buf = vec![0; 16 * 1024];
    // The last five bytes seen: the end of data can be split across reads.
    let mut tail = Vec::with_capacity(10);
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        tail.extend_from_slice(&buf[n.saturating_sub(5)..n]);
        tail.drain(..tail.len().saturating_sub(5));
        if tail == b"\r\n.\r\n" {
            tokio::time::sleep(hold.next()).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}
