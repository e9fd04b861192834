//! The benchmark's `relay` setup: the least any TCP proxy can do. Accepts on LISTEN, connects
//! to UPSTREAM for each connection and copies bytes both ways, understanding nothing of SMTP.
//!
//! It puts a number on what two extra socket hops per exchange cost on the machine, so that
//! the proxy's added latency can be read against the floor of any relay, not only against
//! the direct path.
//!
//!     cargo build --release --example byte_relay
//!     target/release/examples/byte_relay 127.0.0.1:10025 127.0.0.1:10026

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::{TcpListener, TcpStream};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = args.as_slice() else {
        eprintln!("usage: byte_relay LISTEN_ADDR UPSTREAM_ADDR");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("byte_relay: {e}");
            return ExitCode::from(1);
        }
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("byte_relay: UPSTREAM_ADDR must be IP:PORT");
        return ExitCode::from(2);
    };
    match runtime.block_on(serve(listen, upstream)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("byte_relay: {e}");
            ExitCode::from(1)
        }
    }
}

async fn serve(listen: &str, upstream: SocketAddr) -> std::io::Result<()> {
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
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}
