//! Choosing and connecting to the upstream server for a session, and what to do about TLS
//! with it (`UpstreamTls`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::io::Stream;
use crate::config::{OutAddress, Settings, Transparent, UpstreamTls};
use crate::protocol::ehlo;
use crate::protocol::reply::Reply;
use crate::proxy::sockopt;

/// What the proxy knows about an accepted client connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientInfo {
    /// The client's address; `None` for unix-socket clients.
    pub(crate) peer: Option<SocketAddr>,
    /// The local address the connection was accepted on.
    pub(crate) local: Option<SocketAddr>,
    /// The intercepted connection's original destination (transparent mode).
    pub(crate) original_destination: Option<SocketAddr>,
    /// Accepted on the implicit-TLS listener (`TlsListen`): TLS from the first byte.
    pub(crate) implicit_tls: bool,
}

pub(crate) struct Upstream {
    pub(crate) stream: Stream,
    /// The upstream as the filter sees it in `SERVER`: an IP address or a socket path.
    pub(crate) server: String,
    /// The name its TLS certificate must carry: the `OutAddress` host name, else the IP
    /// address connected to (`localhost` for a unix socket).
    pub(crate) tls_name: String,
    /// Bytes already read from the stream while connecting: the relay's first upstream
    /// bytes.
    pub(crate) received: bytes::BytesMut,
}

/// The upstream connection to `addr` (the address connected to, so no getpeername).
fn tcp(stream: TcpStream, addr: SocketAddr) -> io::Result<Upstream> {
    // Commands and replies are small and latency-bound; Nagle only delays them.
    stream.set_nodelay(true)?;
    Ok(upstream_tcp(stream, addr))
}

fn upstream_tcp(stream: TcpStream, addr: SocketAddr) -> Upstream {
    sockopt::prefer_delayed_acks(&stream);
    let server = address_text(addr.ip());
    Upstream {
        stream: Stream::Tcp(stream),
        tls_name: server.clone(),
        server,
        received: bytes::BytesMut::new(),
    }
}

/// The upstream's address as text, formatted once per address rather than per session:
/// it is nearly always the same one.
fn address_text(ip: std::net::IpAddr) -> String {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::IpAddr, String)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((cached, text)) if *cached == ip => text.clone(),
        _ => {
            let text = ip.to_string();
            *last = Some((ip, text.clone()));
            text
        }
    })
}

/// Connects to `addr` with TCP_NODELAY set before the connect, in as few system calls as
/// the kernel allows: `socket`, `setsockopt`, `connect` and the runtime's registration.
///
/// Where `TcpStream::connect` asks `getsockopt(SO_ERROR)` once the socket is writable, this
/// lets the socket say it: a failed connect leaves the socket closed with its error pending
/// (the runtime sees it as readable), and the read that finds it fails with that error. A
/// connected socket has nothing to read until the greeting comes, and the runtime then
/// makes no read at all. Whatever such a read does take (the start of the greeting) is
/// handed on in [`Upstream::received`].
async fn connect_fast(addr: SocketAddr) -> io::Result<Upstream> {
    use socket2::{Domain, Socket, Type};
    let domain = Domain::for_address(addr);
    let socket = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable().await?;
    // The session's upstream buffer from here on, so sized as the command phase reads.
    let mut received = bytes::BytesMut::with_capacity(super::io::COMMAND_READ);
    match stream.try_read_buf(&mut received) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    let mut upstream = upstream_tcp(stream, addr);
    upstream.received = received;
    Ok(upstream)
}

/// Tries each address in turn.
async fn connect_tcp(addrs: &[SocketAddr]) -> io::Result<Upstream> {
    let mut last = None;
    for &addr in addrs {
        match connect_fast(addr).await {
            Ok(u) => return Ok(u),
            Err(e) => last = Some(e),
        }
    }
    // Made only when needed: an io::Error with a text is three allocations.
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address to connect to")))
}

/// Connects upstream within `timeout`.
pub(crate) async fn connect(
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
        Some(OutAddress::Ip(addr)) => connect_tcp(&[*addr]).await,
        Some(OutAddress::Host { name, port }) => {
            // Resolved for every connection, as the original does, but every address is
            // tried rather than only the first.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), *port))
                .await?
                .collect();
            let mut upstream = connect_tcp(&addrs).await?;
            upstream.tls_name = name.clone();
            Ok(upstream)
        }
        Some(OutAddress::ClientLoopback(port)) => {
            let peer = client.peer.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a port-only OutAddress needs a TCP client",
                )
            })?;
            connect_tcp(&[SocketAddr::new(peer.ip(), *port)]).await
        }
        Some(OutAddress::Unix(path)) => {
            let stream = UnixStream::connect(path).await?;
            Ok(Upstream {
                stream: Stream::Unix(stream),
                server: path.display().to_string(),
                tls_name: "localhost".into(),
                received: bytes::BytesMut::new(),
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
            Ok(socket) => return tcp(socket.connect(dest).await?, dest),
            Err(e) => tracing::warn!(
                "couldn't set source of transparent connection to: {}: {e}",
                peer.ip()
            ),
        }
    }
    connect_tcp(&[dest]).await
}

/// The next step of the proxy's own STARTTLS with the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TlsStep {
    /// Send STARTTLS (after EHLO) or start the handshake (after its 220).
    Go,
    /// Go on in clear text (opportunistic mode, TLS not available).
    Plain,
    /// Give up the session (required mode, TLS not available).
    Fail(String),
}

/// After the proxy's EHLO: does the upstream offer STARTTLS, and does it matter?
pub(crate) fn after_ehlo(mode: UpstreamTls, reply: &Reply) -> TlsStep {
    if ehlo::offers(reply, b"STARTTLS") {
        TlsStep::Go
    } else if mode == UpstreamTls::Required {
        TlsStep::Fail(format!(
            "the upstream does not offer STARTTLS (EHLO reply {})",
            reply.code
        ))
    } else {
        TlsStep::Plain
    }
}

/// After the proxy's STARTTLS: may the handshake begin?
pub(crate) fn after_starttls(mode: UpstreamTls, reply: &Reply) -> TlsStep {
    if reply.code == 220 {
        TlsStep::Go
    } else if mode == UpstreamTls::Required {
        TlsStep::Fail(format!(
            "the upstream refused STARTTLS: {}",
            String::from_utf8_lossy(&reply.raw()).trim_end()
        ))
    } else {
        TlsStep::Plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_text_follows_the_address() {
        for ip in ["127.0.0.1", "127.0.0.1", "::1", "10.0.0.2", "127.0.0.1"] {
            assert_eq!(address_text(ip.parse().expect("an address")), ip);
        }
    }

    fn reply(text: &str) -> Reply {
        Reply::scripted(text)
    }

    #[test]
    fn tls_steps() {
        use UpstreamTls::{Opportunistic as O, Required as R};
        let offered = reply("250-up|250-SIZE 1|250 STARTTLS");
        let not_offered = reply("250-up|250 SIZE 1");
        let refused = reply("502 no EHLO");
        assert_eq!(after_ehlo(O, &offered), TlsStep::Go);
        assert_eq!(after_ehlo(R, &offered), TlsStep::Go);
        assert_eq!(after_ehlo(O, &not_offered), TlsStep::Plain);
        assert_eq!(after_ehlo(O, &refused), TlsStep::Plain);
        assert!(
            matches!(after_ehlo(R, &not_offered), TlsStep::Fail(e) if e.contains("does not offer"))
        );
        assert!(matches!(after_ehlo(R, &refused), TlsStep::Fail(_)));
        assert_eq!(after_starttls(R, &reply("220 go ahead")), TlsStep::Go);
        assert_eq!(
            after_starttls(O, &reply("454 TLS not available")),
            TlsStep::Plain
        );
        assert!(matches!(
            after_starttls(R, &reply("454 TLS not available")),
            TlsStep::Fail(e) if e.ends_with("454 TLS not available")
        ));
    }
}
