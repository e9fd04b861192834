//! Choosing and connecting to the upstream server for a session.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::io::Stream;
use crate::config::{OutAddress, Settings, Transparent};
use crate::sockopt;

/// What the proxy knows about an accepted client connection.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    /// The client's address; `None` for unix-socket clients.
    pub peer: Option<SocketAddr>,
    /// The local address the connection was accepted on.
    pub local: Option<SocketAddr>,
    /// The intercepted connection's original destination (transparent mode).
    pub original_destination: Option<SocketAddr>,
}

pub struct Upstream {
    pub stream: Stream,
    /// The upstream as the filter sees it in `SERVER`: an IP address or a socket path.
    pub server: String,
}

fn tcp(stream: TcpStream) -> io::Result<Upstream> {
    // Commands and replies are small and latency-bound; Nagle only delays them.
    stream.set_nodelay(true)?;
    let server = stream.peer_addr()?.ip().to_string();
    Ok(Upstream {
        stream: Stream::Tcp(stream),
        server,
    })
}

async fn connect_tcp(addrs: &[SocketAddr]) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connects upstream within `timeout`.
pub async fn connect(
    settings: &Settings,
    client: &ClientInfo,
    timeout: Duration,
) -> io::Result<Upstream> {
    match tokio::time::timeout(timeout, connect_inner(settings, client)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection timed out",
        )),
    }
}

async fn connect_inner(settings: &Settings, client: &ClientInfo) -> io::Result<Upstream> {
    if settings.transparent != Transparent::Off {
        return connect_transparent(settings.transparent, client).await;
    }
    match settings.out_address.as_ref() {
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no OutAddress specified",
        )),
        Some(OutAddress::Ip(addr)) => tcp(TcpStream::connect(addr).await?),
        Some(OutAddress::Host { name, port }) => {
            // Resolved for every connection, as the original does, but every address is
            // tried rather than only the first.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), *port))
                .await?
                .collect();
            tcp(connect_tcp(&addrs).await?)
        }
        Some(OutAddress::ClientLoopback(port)) => {
            let peer = client.peer.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a port-only OutAddress needs a TCP client",
                )
            })?;
            tcp(TcpStream::connect(SocketAddr::new(peer.ip(), *port)).await?)
        }
        Some(OutAddress::Unix(path)) => {
            let stream = UnixStream::connect(path).await?;
            Ok(Upstream {
                stream: Stream::Unix(stream),
                server: path.display().to_string(),
            })
        }
    }
}

async fn connect_transparent(mode: Transparent, client: &ClientInfo) -> io::Result<Upstream> {
    let dest = client
        .original_destination
        .ok_or_else(|| io::Error::other("couldn't get source address for transparent proxying"))?;
    let peer = client
        .peer
        .ok_or_else(|| io::Error::other("transparent mode needs a TCP client"))?;
    if dest.ip() == peer.ip() {
        return Err(io::Error::other("loop detected in transparent proxying"));
    }
    if mode == Transparent::Full {
        match sockopt::transparent_connect_socket(peer.ip(), dest) {
            Ok(socket) => return tcp(socket.connect(dest).await?),
            Err(e) => tracing::warn!(
                "couldn't set source of transparent connection to: {}: {e}",
                peer.ip()
            ),
        }
    }
    tcp(TcpStream::connect(dest).await?)
}
