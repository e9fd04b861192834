//! The SMTP listeners (`Listen`, and `TlsListen` for implicit TLS): accepting clients
//! within MaxConnections, and draining on shutdown.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::connection::{self, Shared};
use super::io::Stream;
use super::observe::ConnectionId;
use super::upstream::ClientInfo;
use super::{proxy_header, sockopt};
use crate::config::{ListenAddress, Settings, Transparent};
use crate::proxy::tls::Tls;

pub(crate) const REPLY_BUSY: &[u8] = b"421 Server busy, too many connections\r\n";

/// The original listened with a backlog of 5, which refused bursts of clients.
const LISTEN_BACKLOG: i32 = 1024;

/// How long sessions get after the drain deadline to say 421 and close.
const HARD_STOP_GRACE: Duration = Duration::from_secs(5);

pub(crate) enum Listener {
    /// With the address it is bound to when that is one address (not a wildcard): then it
    /// is every accepted connection's local address, with no `getsockname` per connection.
    Tcp(TcpListener, Option<SocketAddr>),
    Unix(UnixListener),
}

/// A listening socket bound before the runtime starts (and before the privilege drop, so a
/// port below 1024 needs no capability, and before daemonising, so a failure is reported
/// on the terminal).
pub(crate) enum BoundListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl BoundListener {
    pub(crate) fn bind(
        address: &ListenAddress,
        transparent: Transparent,
    ) -> io::Result<BoundListener> {
        use nix::sys::socket::{self as sock, sockopt, AddressFamily, SockFlag, SockType};
        use std::os::fd::AsRawFd;
        match address {
            ListenAddress::Tcp(addr) => {
                let family = if addr.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let fd = sock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
                // Accepted connections inherit TCP_NODELAY from the listener (Linux), which
                // saves a setsockopt per connection. Commands and replies are small and
                // latency-bound; Nagle only delays them.
                sock::setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
                if transparent == Transparent::Full {
                    crate::proxy::sockopt::set_ip_transparent(&fd)?;
                }
                sock::bind(fd.as_raw_fd(), &sock::SockaddrStorage::from(*addr))?;
                sock::listen(&fd, sock::Backlog::new(LISTEN_BACKLOG)?)?;
                let listener = std::net::TcpListener::from(fd);
                listener.set_nonblocking(true)?;
                Ok(BoundListener::Tcp(listener))
            }
            ListenAddress::Unix(path) => {
                // A socket file left by an earlier run would make bind fail.
                let _ = std::fs::remove_file(path);
                let listener = std::os::unix::net::UnixListener::bind(path)?;
                listener.set_nonblocking(true)?;
                Ok(BoundListener::Unix(listener))
            }
        }
    }

    /// Hands the socket to tokio. Must run inside the runtime.
    pub(crate) fn into_listener(self) -> io::Result<Listener> {
        match self {
            BoundListener::Tcp(l) => {
                let listener = TcpListener::from_std(l)?;
                let fixed = listener
                    .local_addr()
                    .ok()
                    .filter(|a| !a.ip().is_unspecified());
                Ok(Listener::Tcp(listener, fixed))
            }
            BoundListener::Unix(l) => Ok(Listener::Unix(UnixListener::from_std(l)?)),
        }
    }
}

impl Listener {
    pub(crate) fn local_description(&self) -> String {
        match self {
            Listener::Tcp(l, _) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_) => "unix socket".into(),
        }
    }

    async fn accept(&self, transparent: Transparent) -> io::Result<(Stream, ClientInfo)> {
        match self {
            Listener::Tcp(l, fixed) => {
                let (stream, peer) = l.accept().await?;
                crate::proxy::sockopt::prefer_delayed_acks(&stream);
                // Behind TPROXY a connection's local address is whatever the client asked
                // for, not the listener's.
                let local = match (fixed, transparent) {
                    (Some(addr), Transparent::Off) => Some(*addr),
                    _ => stream.local_addr().ok(),
                };
                let original_destination = match transparent {
                    Transparent::Off => None,
                    // With TPROXY there is no NAT entry: the local address is the
                    // destination the client asked for.
                    Transparent::Client => sockopt::original_destination(&stream).ok(),
                    Transparent::Full => sockopt::original_destination(&stream).ok().or(local),
                };
                let info = ClientInfo {
                    peer: Some(peer),
                    local,
                    original_destination,
                    implicit_tls: false,
                };
                Ok((Stream::Tcp(stream), info))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                Ok((Stream::Unix(stream), ClientInfo::default()))
            }
        }
    }
}

/// Accepts on the implicit-TLS listener, if there is one (else never).
async fn accept_implicit_tls(
    listener: Option<&Listener>,
    transparent: Transparent,
) -> io::Result<(Stream, ClientInfo)> {
    match listener {
        Some(l) => {
            let (stream, info) = l.accept(transparent).await?;
            Ok((
                stream,
                ClientInfo {
                    implicit_tls: true,
                    ..info
                },
            ))
        }
        None => std::future::pending().await,
    }
}

/// The longest wait for a PROXY protocol header from a trusted load balancer.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// With `ProxyProtocol` on, a trusted peer (a load balancer) must open with a PROXY header
/// naming the real client, which then stands for the client everywhere: CLIENT, XCLIENT,
/// `%i`, logs and traces. Untrusted peers are served as themselves: their word about
/// addresses is never taken.
async fn proxy_header(
    settings: &Settings,
    stream: &mut Stream,
    mut info: ClientInfo,
    received: &mut BytesMut,
) -> Result<ClientInfo, proxy_header::ProxyError> {
    let Some(peer) = info.peer else {
        return Ok(info);
    };
    if !settings.proxy_protocol
        || !proxy_header::is_trusted(peer.ip(), &settings.proxy_protocol_trusted)
    {
        return Ok(info);
    }
    let timeout = settings.timeout.min(PROXY_HEADER_TIMEOUT);
    let header = proxy_header::read_header(stream, timeout, received).await?;
    if let Some(source) = header.source {
        info.peer = Some(SocketAddr::new(source.ip().to_canonical(), source.port()));
    }
    if let Some(destination) = header.destination {
        info.local = Some(SocketAddr::new(
            destination.ip().to_canonical(),
            destination.port(),
        ));
    }
    Ok(info)
}

/// Accepts and serves clients on `listener` (and on `tls_listener`, whose clients speak TLS
/// from the first byte) until `shutdown` completes, then drains: idle sessions are closed
/// at once with 421, sessions in a transaction may finish within DrainTimeout.
pub(crate) async fn run(
    listener: Listener,
    tls_listener: Option<Listener>,
    tls: Arc<Tls>,
    settings: watch::Receiver<Arc<Settings>>,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let initial = settings.borrow().clone();
    let slots = Arc::new(Semaphore::new(initial.max_connections));
    let (drain_tx, drain_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        // Finished sessions are collected as we go so the set stays small.
        while sessions.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept(initial.transparent) => accepted,
            accepted = accept_implicit_tls(tls_listener.as_ref(), initial.transparent) => accepted,
            _ = &mut shutdown => break,
        };
        let (mut stream, info) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Typically out of file descriptors: wait rather than spin.
                tracing::error!("couldn't accept connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::error!(
                "too many connections open (max {}). sent busy response",
                initial.max_connections
            );
            crate::ops::metrics::global().connection_refused();
            let timeout = initial.timeout;
            sessions.spawn(async move {
                // A TLS client could not read a clear-text reply: it only sees the close.
                if !info.implicit_tls {
                    super::observe::replies_sent(REPLY_BUSY);
                    let _ = tokio::time::timeout(timeout, stream.write_all(REPLY_BUSY)).await;
                }
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let shared = Shared {
            settings: settings.clone(),
            shutdown: drain_rx.clone(),
            hard_stop: stop_rx.clone(),
            tls: tls.clone(),
        };
        let id = ConnectionId::next();
        let settings = initial.clone();
        sessions.spawn(async move {
            // Filled only by a PROXY header's trailing bytes; the relay sizes its own reads.
            let mut received = BytesMut::new();
            let info = match proxy_header(&settings, &mut stream, info, &mut received).await {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!("{id}: refused connection: PROXY protocol: {e}");
                    return;
                }
            };
            let client_ip = info
                .peer
                .map(|p| p.ip())
                .unwrap_or(IpAddr::from([0, 0, 0, 0]));
            let span = crate::ops::telemetry::connection_span(id.value(), client_ip);
            async move {
                let metrics = crate::ops::metrics::global();
                metrics.connection_opened();
                // Boxed: the task's future is moved several times on its way into the
                // runtime, and the session's state is kilobytes.
                Box::pin(connection::serve(stream, info, received, id, shared)).await;
                metrics.connection_closed();
                drop(permit);
            }
            .instrument(span)
            .await
        });
    }

    drop(listener);
    drop(tls_listener);
    let _ = drain_tx.send(true);
    let drained = tokio::time::timeout(drain_timeout, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "drain timeout: closing {} remaining sessions",
            sessions.len()
        );
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(HARD_STOP_GRACE, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        sessions.shutdown().await;
    }
}
