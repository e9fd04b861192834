//! One stream type for TCP and unix sockets, plain or TLS, on either side of the proxy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Read room for a message's body.
pub(crate) const READ_BUFFER: usize = 16 * 1024;

/// Read room in the command phase, where a read brings a command line or a reply of a few
/// hundred bytes: 16 KiB per side would be most of an idle session's memory (a message's
/// body is read with [`READ_BUFFER`]), and a reply read into a buffer that large costs an
/// allocation of its own each time.
pub(crate) const COMMAND_READ: usize = 2048;

pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A client speaking TLS (after STARTTLS, or on the implicit-TLS listener).
    TlsServer(Box<tokio_rustls::server::TlsStream<Rewound>>),
    /// The upstream after the proxy's STARTTLS.
    TlsClient(Box<tokio_rustls::client::TlsStream<Stream>>),
    /// Taken out for a TLS handshake (see [`Stream::detach`]); every operation fails.
    Detached,
}

impl Stream {
    /// Takes the stream out for a TLS handshake, leaving [`Stream::Detached`] in its place
    /// until the TLS stream is put back (a failed handshake leaves it detached).
    pub(crate) fn detach(&mut self) -> Stream {
        std::mem::replace(self, Stream::Detached)
    }

    /// The negotiated TLS parameters, when this is a TLS stream.
    pub(crate) fn tls_info(&self) -> Option<crate::proxy::tls::TlsInfo> {
        match self {
            Stream::TlsServer(s) => Some(crate::proxy::tls::TlsInfo::of(s.get_ref().1)),
            Stream::TlsClient(s) => Some(crate::proxy::tls::TlsInfo::of(s.get_ref().1)),
            _ => None,
        }
    }
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream detached for TLS")
}

/// Calls the same method on whichever stream this is.
macro_rules! each {
    ($self:expr, $s:ident => $call:expr, $detached:expr) => {
        match $self {
            Stream::Tcp($s) => $call,
            Stream::Unix($s) => $call,
            Stream::TlsServer($s) => $call,
            Stream::TlsClient($s) => $call,
            Stream::Detached => $detached,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf), Poll::Ready(Err(detached())))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf), Poll::Ready(Err(detached())))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_flush(cx), Poll::Ready(Err(detached())))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx), Poll::Ready(Err(detached())))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(
            self.get_mut(),
            s => Pin::new(s).poll_write_vectored(cx, bufs),
            Poll::Ready(Err(detached()))
        )
    }

    fn is_write_vectored(&self) -> bool {
        each!(self, s => s.is_write_vectored(), false)
    }
}

/// What [`read_ready`] found on a stream without waiting.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ready {
    /// Nothing has arrived.
    Nothing,
    /// Bytes have arrived (on a TLS stream: appended to the buffer, decrypted).
    Data,
    /// The peer closed its side (or the connection failed).
    Closed,
}

/// Looks at what has already arrived on `stream`, without waiting. The proxy uses it at
/// moments when a peer must be silent (an upstream before the reply to our next command is
/// due) or must still be there (a client before its message is committed upstream).
///
/// A plain socket is first looked at through the runtime: its readiness says whether
/// anything (bytes, a close, an error) has arrived since the last read that emptied the
/// socket, and costs no system call. Only then is the socket itself asked (`recv` with
/// `MSG_PEEK | MSG_DONTWAIT`), so that bytes stay there for the next ordinary read and a
/// readiness left over from a read that filled its buffer is not taken for new data. Asking
/// the socket every time would cost seven `recv` calls per message, nearly all answering
/// `EAGAIN`. What this gives up is what arrived in the few microseconds since the runtime
/// last polled its sockets; a byte arriving just after the check could not be caught
/// either way. A TLS stream is polled once instead (records such as session tickets are
/// not data); plaintext it yields goes into `buf`.
pub(crate) fn read_ready(stream: &mut Stream, buf: &mut bytes::BytesMut) -> Ready {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    // try_io calls the peek only when the runtime counts the socket as readable, and
    // clears that when the peek answers EAGAIN, so a stale readiness costs one call.
    let peeked = match stream {
        Stream::Tcp(s) => {
            let fd = s.as_raw_fd();
            s.try_io(Interest::READABLE, || peek(fd))
        }
        Stream::Unix(s) => {
            let fd = s.as_raw_fd();
            s.try_io(Interest::READABLE, || peek(fd))
        }
        Stream::TlsServer(_) | Stream::TlsClient(_) => return poll_once(stream, buf),
        Stream::Detached => return Ready::Closed,
    };
    match peeked {
        Ok(0) => Ready::Closed,
        Ok(_) => Ready::Data,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ready::Nothing
        }
        Err(_) => Ready::Closed,
    }
}

/// One byte looked at without taking it (`recv` with `MSG_PEEK | MSG_DONTWAIT`).
fn peek(fd: std::os::fd::RawFd) -> io::Result<usize> {
    use nix::sys::socket::{recv, MsgFlags};
    let mut probe = [0u8; 1];
    recv(fd, &mut probe, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
}

fn poll_once(stream: &mut Stream, buf: &mut bytes::BytesMut) -> Ready {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut chunk = [0u8; 4096];
    let mut read = ReadBuf::new(&mut chunk);
    match Pin::new(stream).poll_read(&mut cx, &mut read) {
        Poll::Pending => Ready::Nothing,
        Poll::Ready(Ok(())) if read.filled().is_empty() => Ready::Closed,
        Poll::Ready(Ok(())) => {
            buf.extend_from_slice(read.filled());
            Ready::Data
        }
        Poll::Ready(Err(_)) => Ready::Closed,
    }
}

/// A stream with bytes already read from it put back in front: reading a PROXY protocol
/// header may have taken the start of an implicit-TLS client's handshake with it.
pub(crate) struct Rewound {
    buffered: Bytes,
    inner: Stream,
}

impl Rewound {
    pub(crate) fn new(buffered: Bytes, inner: Stream) -> Rewound {
        Rewound { buffered, inner }
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.buffered.len().min(buf.remaining());
        buf.put_slice(&this.buffered[..n]);
        this.buffered.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn rewound_reads_the_buffered_bytes_first() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut r = Rewound::new(Bytes::from_static(b"hello "), Stream::Unix(a));
        b.write_all(b"world").await.unwrap();
        drop(b);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
    }

    /// What the runtime has noticed on `s` within a second (it notices on its next poll of
    /// the sockets, not when the bytes arrive).
    async fn noticed(s: &mut Stream, buf: &mut bytes::BytesMut) -> Ready {
        for _ in 0..1000 {
            match read_ready(s, buf) {
                Ready::Nothing => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                other => return other,
            }
        }
        Ready::Nothing
    }

    #[tokio::test]
    async fn read_ready_never_waits() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = Stream::Unix(a);
        let mut buf = bytes::BytesMut::new();
        assert_eq!(read_ready(&mut s, &mut buf), Ready::Nothing);
        assert_eq!(noticed(&mut s, &mut buf).await, Ready::Nothing);
        b.write_all(b"250 early").await.unwrap();
        assert_eq!(noticed(&mut s, &mut buf).await, Ready::Data);
        // Only looked at: the bytes are still there for the next read.
        assert!(buf.is_empty());
        assert_eq!(read_ready(&mut s, &mut buf), Ready::Data);
        let mut got = [0u8; 9];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"250 early");
        // The read filled its buffer, so the runtime still counted the socket as readable:
        // the socket itself says that nothing is left.
        assert_eq!(read_ready(&mut s, &mut buf), Ready::Nothing);
        assert_eq!(read_ready(&mut s, &mut buf), Ready::Nothing);
        drop(b);
        assert_eq!(noticed(&mut s, &mut buf).await, Ready::Closed);
    }

    #[tokio::test]
    async fn detached_streams_fail() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut s = Stream::Unix(a);
        let taken = s.detach();
        assert!(matches!(taken, Stream::Unix(_)));
        assert!(s.write_all(b"x").await.is_err());
        assert!(s.read(&mut [0u8; 4]).await.is_err());
        assert!(s.tls_info().is_none());
    }
}
