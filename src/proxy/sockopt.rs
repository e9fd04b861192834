//! Socket options: transparent proxying and ACK behaviour (Linux).
//!
//! `TransparentProxy: client` finds where an iptables-redirected connection was going with
//! SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6), both answered by conntrack.
//! `TransparentProxy: full` also connects upstream from the client's own address, which needs
//! IP_TRANSPARENT (and CAP_NET_ADMIN) on the upstream socket. Behind TPROXY, where the
//! listener itself has IP_TRANSPARENT, the accepted socket's local address already is the
//! original destination.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{getsockname, getsockopt, setsockopt, sockopt, SockaddrIn, SockaddrIn6};
use nix::sys::socket::{SockaddrLike, SockaddrStorage};
use tokio::net::TcpSocket;

/// The address an intercepted (NATed) TCP connection was originally sent to.
///
/// The conntrack table is asked in the family of the connection: IPv4 for IPv4 sockets and
/// for IPv4 clients on a dual-stack IPv6 listener, IPv6 otherwise. A connection that was
/// not redirected gives an error (ENOENT from the kernel).
pub(crate) fn original_destination(sock: &impl AsFd) -> io::Result<SocketAddr> {
    let local: SockaddrStorage = getsockname(sock.as_fd().as_raw_fd())?;
    let ipv6_native = local
        .as_sockaddr_in6()
        .is_some_and(|v6| v6.ip().to_ipv4_mapped().is_none());
    if ipv6_native {
        let dst = getsockopt(sock, sockopt::Ip6tOriginalDst)?;
        Ok(SocketAddr::from(SockaddrIn6::from(dst)))
    } else if local.family().is_some() {
        let dst = getsockopt(sock, sockopt::OriginalDst)?;
        Ok(SocketAddr::from(SockaddrIn::from(dst)))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an IP socket",
        ))
    }
}

/// Sets IP_TRANSPARENT: a listener then accepts connections for any address (TPROXY), an
/// outgoing socket may bind to a foreign address. Needs CAP_NET_ADMIN. Linux honours the
/// option on IPv6 sockets too.
pub(crate) fn set_ip_transparent(sock: &impl AsFd) -> io::Result<()> {
    setsockopt(sock, sockopt::IpTransparent, &true)?;
    Ok(())
}

/// A socket for connecting to `dest` from `source_ip` (the client's address) in
/// `TransparentProxy: full` mode: SO_REUSEADDR and IP_TRANSPARENT set, bound to
/// `(source_ip, 0)`.
///
/// On error the caller connects from its own address instead, as the original does; the
/// error says which step failed.
pub(crate) fn transparent_connect_socket(
    source_ip: IpAddr,
    dest: SocketAddr,
) -> io::Result<TcpSocket> {
    // A client on a dual-stack listener shows as ::ffff:a.b.c.d; the upstream socket needs
    // the plain IPv4 form.
    let source_ip = source_ip.to_canonical();
    let dest = SocketAddr::new(dest.ip().to_canonical(), dest.port());
    let socket = match (source_ip, dest) {
        (IpAddr::V4(_), SocketAddr::V4(_)) => TcpSocket::new_v4()?,
        (IpAddr::V6(_), SocketAddr::V6(_)) => TcpSocket::new_v6()?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source {source_ip} and destination {dest} are of different families"),
            ))
        }
    };
    socket.set_reuseaddr(true)?;
    set_ip_transparent(&socket).map_err(|e| context("IP_TRANSPARENT", e))?;
    socket
        .bind(SocketAddr::new(source_ip, 0))
        .map_err(|e| context(&format!("bind to {source_ip}"), e))?;
    Ok(socket)
}

fn context(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Starts a connection in delayed-ACK ("ping-pong") mode instead of quick-ACK mode.
///
/// A new connection ACKs its first received segments at once, each in a packet of its own.
/// In SMTP every command or reply the proxy receives is followed within microseconds by data
/// the ACK can ride on, so those separate ACKs are pure overhead, paid inside the read
/// that is on the way to relaying the line. The kernel goes on choosing the ACK mode
/// afterwards; a bulk body still gets an ACK every second segment.
pub(crate) fn prefer_delayed_acks(stream: &tokio::net::TcpStream) {
    // Best effort: on failure the connection only keeps the kernel's default.
    let _ = socket2::SockRef::from(stream).set_tcp_quickack(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// An accepted connection that no NAT rule touched.
    async fn accepted(bind: &str) -> Option<(tokio::net::TcpStream, tokio::net::TcpStream)> {
        let listener = tokio::net::TcpListener::bind(bind).await.ok()?;
        let addr = listener.local_addr().ok()?;
        let client = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (server, _) = listener.accept().await.ok()?;
        Some((client, server))
    }

    /// Without connection tracking the kernel has no original destination to give; with it
    /// (netfilter NAT loaded, as container networking does) the original destination of a
    /// connection no rule redirected is its own destination. Either way no other address.
    #[tokio::test]
    async fn original_destination_of_plain_connection_is_its_own_or_none() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            // IPv6 may be disabled on the test machine.
            let Some((client, server)) = accepted(bind).await else {
                assert!(bind.starts_with('['), "no {bind} socket");
                continue;
            };
            let server_dst = server.local_addr().unwrap();
            let client_dst = client.peer_addr().unwrap();
            if let Ok(got) = original_destination(&server) {
                assert_eq!(got, server_dst, "{bind}");
            }
            if let Ok(got) = original_destination(&client) {
                // The client's side of a tracked connection: the reply direction.
                assert!(
                    got == client_dst || got == client.local_addr().unwrap(),
                    "{bind}: {got}"
                );
            }
        }
    }

    #[test]
    fn original_destination_of_non_ip_socket_is_an_error() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(original_destination(&a).is_err());
    }

    #[tokio::test]
    async fn transparent_socket_binds_to_the_source() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dest = listener.local_addr().unwrap();
        let cases = [
            (IpAddr::V4(Ipv4Addr::LOCALHOST), Some(Ipv4Addr::LOCALHOST)),
            (
                IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
                Some(Ipv4Addr::LOCALHOST),
            ),
            (IpAddr::V6(Ipv6Addr::LOCALHOST), None),
        ];
        for (source, want) in cases {
            match (transparent_connect_socket(source, dest), want) {
                (Ok(socket), Some(ip)) => {
                    assert_eq!(socket.local_addr().unwrap().ip(), IpAddr::V4(ip));
                    let stream = socket.connect(dest).await.unwrap();
                    let (_, peer) = listener.accept().await.unwrap();
                    assert_eq!(peer, stream.local_addr().unwrap());
                }
                // Without CAP_NET_ADMIN the option is refused; the error names it.
                (Err(e), Some(_)) => {
                    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                    assert!(e.to_string().starts_with("IP_TRANSPARENT"), "{e}");
                }
                (Err(e), None) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput),
                (Ok(_), None) => panic!("mixed families accepted for {source}"),
            }
        }
    }

    #[test]
    fn transparent_socket_binds_to_a_foreign_address() {
        // 192.0.2.1 (TEST-NET-1) is on no interface: only IP_TRANSPARENT allows the bind.
        let foreign = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let dest = SocketAddr::from((Ipv4Addr::LOCALHOST, 25));
        match transparent_connect_socket(foreign, dest) {
            Ok(socket) => assert_eq!(socket.local_addr().unwrap().ip(), foreign),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        }
    }

    #[test]
    fn ip_transparent_needs_privilege_or_succeeds() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        if let Err(e) = set_ip_transparent(&socket) {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        }
    }
}
