//! Reading the PROXY protocol header from a new connection, and whom to take it from.
//!
//! The parsing is [`crate::protocol::proxy_header`]'s; this drives it over a socket with a
//! timeout and a bounded buffer. The header is trusted only from networks the operator lists
//! ([`is_trusted`]): from anyone else it would let a client claim any address.

use std::net::IpAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::Cidr;
pub(crate) use crate::protocol::proxy_header::ProxyError;
use crate::protocol::proxy_header::{parse, Parsed, ProxyHeader, MAX_HEADER_LEN};

/// Reads a PROXY header from the start of `stream`, within `timeout` for the whole header.
///
/// Reads in blocks, so it may receive bytes beyond the header (a client that speaks first);
/// those are appended to `leftover`, to be handled as the client's first bytes. Never
/// buffers more than [`MAX_HEADER_LEN`] bytes.
pub(crate) async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
    leftover: &mut BytesMut,
) -> Result<ProxyHeader, ProxyError> {
    tokio::time::timeout(timeout, read_until_complete(stream, leftover))
        .await
        .unwrap_or(Err(ProxyError::Timeout(timeout)))
}

async fn read_until_complete<S: AsyncRead + Unpin>(
    stream: &mut S,
    leftover: &mut BytesMut,
) -> Result<ProxyHeader, ProxyError> {
    let mut buf = vec![0u8; MAX_HEADER_LEN];
    let mut filled = 0;
    loop {
        let n = stream
            .read(&mut buf[filled..])
            .await
            .map_err(ProxyError::Io)?;
        if n == 0 {
            return Err(ProxyError::Closed { received: filled });
        }
        filled += n;
        match parse(&buf[..filled])? {
            Parsed::Complete { header_len, header } => {
                leftover.extend_from_slice(&buf[header_len..filled]);
                return Ok(header);
            }
            // The parser refuses oversized headers itself; this only keeps a full buffer
            // from turning into a zero-length read taken for end of file.
            Parsed::Incomplete if filled == buf.len() => return Err(ProxyError::TooLarge),
            Parsed::Incomplete => {}
        }
    }
}

/// Whether `peer` may send a PROXY header: whether it lies in one of the `trusted`
/// networks. An IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`, as a dual-stack listener reports
/// IPv4 clients) matches IPv4 networks.
pub(crate) fn is_trusted(peer: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|net| net.contains(peer))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::proxy_header::tests::*;
    use crate::protocol::proxy_header::V2_SIGNATURE;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    const PATIENCE: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn reads_header_and_keeps_what_follows() {
        let cases = [
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.7 54321 25\r\n".to_vec(),
                header("192.0.2.1:54321", "198.51.100.7:25"),
            ),
            (
                v2(0x21, 0x21, &with_tlvs(inet6_block())),
                header("[2001:db8::1]:65535", "[2001:db8::25]:587"),
            ),
            (v2(0x20, 0x00, &[]), ProxyHeader::UNKNOWN),
        ];
        for (head, want) in cases {
            let (mut client, mut server) = pair().await;
            let after = b"EHLO client.example.org\r\nMAIL FROM:<a@b>\r\n";
            client
                .write_all(&[&head[..], after].concat())
                .await
                .unwrap();
            let mut leftover = BytesMut::from(&b"kept:"[..]);
            let got = read_header(&mut server, PATIENCE, &mut leftover)
                .await
                .unwrap();
            assert_eq!(got, want);
            // Bytes may still be in flight; what was read went to leftover, the rest is
            // still on the socket.
            let mut rest = leftover.to_vec();
            drop(client);
            server.read_to_end(&mut rest).await.unwrap();
            assert_eq!(rest, [&b"kept:"[..], after].concat());
        }
    }

    #[tokio::test]
    async fn reads_header_arriving_in_pieces() {
        let (mut client, mut server) = pair().await;
        client.set_nodelay(true).unwrap();
        let head = v2(0x21, 0x11, &with_tlvs(inet4_block()));
        let writer = tokio::spawn(async move {
            for chunk in head.chunks(5) {
                client.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client
        });
        let mut leftover = BytesMut::new();
        let got = read_header(&mut server, PATIENCE, &mut leftover)
            .await
            .unwrap();
        assert_eq!(got, header("192.0.2.1:54321", "198.51.100.7:25"));
        assert!(leftover.is_empty());
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn times_out_on_a_partial_header() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
        let mut leftover = BytesMut::new();
        let timeout = Duration::from_millis(100);
        let err = read_header(&mut server, timeout, &mut leftover)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProxyError::Timeout(t) if t == timeout),
            "{err:?}"
        );
        assert!(leftover.is_empty());
    }

    #[tokio::test]
    async fn times_out_on_a_silent_client() {
        let (_client, mut server) = pair().await;
        let err = read_header(&mut server, Duration::from_millis(50), &mut BytesMut::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Timeout(_)), "{err:?}");
    }

    #[tokio::test]
    async fn fails_on_end_of_file() {
        for (sent, received) in [
            (&b""[..], 0),
            (b"PROXY TCP6 ::1", 14),
            (&V2_SIGNATURE[..], 12),
        ] {
            let (mut client, mut server) = pair().await;
            client.write_all(sent).await.unwrap();
            client.shutdown().await.unwrap();
            let err = read_header(&mut server, PATIENCE, &mut BytesMut::new())
                .await
                .unwrap_err();
            assert!(
                matches!(err, ProxyError::Closed { received: r } if r == received),
                "{err:?}"
            );
        }
    }

    #[tokio::test]
    async fn fails_on_oversize_and_garbage() {
        let cases = [
            (
                format!("PROXY UNKNOWN {}", "x".repeat(300)).into_bytes(),
                "TooLarge",
            ),
            (v2_with_len(0x21, 0x11, 60000, &[0; 100]), "TooLarge"),
            (b"EHLO client.example.org\r\n".to_vec(), "Malformed"),
        ];
        for (sent, want) in cases {
            let (mut client, mut server) = pair().await;
            // The peer keeps the connection open: refusal must not wait for more bytes.
            client.write_all(&sent).await.unwrap();
            let err = read_header(&mut server, PATIENCE, &mut BytesMut::new())
                .await
                .unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{err:?}");
        }
    }

    #[tokio::test]
    async fn never_buffers_more_than_the_limit() {
        // A header at the limit followed by a flood: the header is found, and leftover
        // holds only what fitted in the one bounded buffer.
        let (mut client, mut server) = pair().await;
        let head = v2(
            0x21,
            0x11,
            &[inet4_block(), vec![0; MAX_HEADER_LEN - 16 - 12]].concat(),
        );
        let writer = tokio::spawn(async move {
            client.write_all(&head).await.unwrap();
            let _ = client.write_all(&vec![b'x'; 1 << 20]).await;
        });
        let mut leftover = BytesMut::new();
        let got = read_header(&mut server, PATIENCE, &mut leftover)
            .await
            .unwrap();
        assert_eq!(got.source, sa("192.0.2.1:54321"));
        assert!(
            leftover.is_empty(),
            "{} bytes past a full buffer",
            leftover.len()
        );
        drop(server);
        writer.await.unwrap();
    }

    #[test]
    fn trust() {
        let nets: Vec<Cidr> = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let cases = [
            ("10.1.2.3", true),
            ("::ffff:10.1.2.3", true),
            ("11.0.0.1", false),
            ("::ffff:11.0.0.1", false),
            ("192.0.2.7", true),
            ("::ffff:192.0.2.7", true),
            ("192.0.2.8", false),
            ("2001:db8:1::5", true),
            ("2001:db9::5", false),
            ("::1", false),
            ("127.0.0.1", false),
        ];
        for (peer, want) in cases {
            assert_eq!(is_trusted(peer.parse().unwrap(), &nets), want, "{peer}");
        }
        assert!(!is_trusted("10.0.0.1".parse().unwrap(), &[]));
    }
}
