//! PROXY protocol v1 and v2 on the SMTP listener of the real binary: honoured from trusted
//! networks only, where the header's source becomes the client for CLIENT, XCLIENT, the
//! Header's `%i` and the logs; a bad header from a trusted peer closes that connection only.

use crate::common;

use std::net::{IpAddr, SocketAddr};
use std::thread;

use crate::common::proxy::EnvRecorder;
use crate::common::{ms, secs, timed, wait_until, Client, Proxy, ProxyBuilder, Upstream};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 PROXY header for TCP from `src` to `dst`, with optional TLV bytes.
fn v2(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut addrs = Vec::new();
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x11
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x21
        }
        _ => panic!("mixed families"),
    };
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    addrs.extend_from_slice(tlvs);
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(family);
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}

/// A v2 LOCAL header (a balancer's own health check): no address.
fn v2_local() -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn upstream() -> Upstream {
    Upstream::builder()
        .extensions(&["SIZE 52428800", "8BITMIME", "XCLIENT ADDR NAME HELO"])
        .start()
}

/// A proxy that records what its filter sees, adds `X-Client-IP: %i` and speaks XCLIENT.
fn proxy(up: &Upstream, trusted: &str, extra: &[(&str, &str)]) -> (Proxy, EnvRecorder) {
    let mut b = ProxyBuilder::new()
        .upstream(up)
        .set("ProxyProtocol", "on")
        .set("ProxyProtocolTrusted", trusted)
        .set("XClient", "on")
        .set("Header", "X-Client-IP: %i");
    for (k, v) in extra {
        b = b.set(k, v);
    }
    let (filter, rec) = b.env_recorder();
    (b.set("FilterCommand", &filter).start(), rec)
}

/// Sends `header` (in two writes, split at `split`), then a whole SMTP transaction.
fn session_after(p: &Proxy, header: &[u8], split: usize) {
    let mut c = p.connect();
    if !header.is_empty() {
        let split = split.min(header.len());
        c.send(&header[..split]);
        if split < header.len() {
            thread::sleep(ms(50));
            c.send(&header[split..]);
        }
    }
    let g = c.greeting();
    assert_eq!(g.code, 220, "{g:?}");
    let e = c.cmd("EHLO client.example");
    assert_eq!(e.code, 250, "{e:?}");
    let r = c.send_mail(&common::default_message());
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(c.cmd("QUIT").code, 221);
}

/// What the filter saw as CLIENT, and the Header line, of the latest message.
fn last_seen(up: &Upstream, rec: &EnvRecorder, n: usize) -> (String, String) {
    let runs = rec.wait_runs(n, secs(10));
    let client = runs[n - 1].var("CLIENT").unwrap_or("<unset>").to_string();
    let delivered = up.wait_delivered(n, secs(10));
    let content = String::from_utf8_lossy(&delivered[n - 1].content).into_owned();
    let header = content
        .lines()
        .find(|l| l.starts_with("X-Client-IP:"))
        .unwrap_or("<no X-Client-IP header>")
        .to_string();
    (client, header)
}

#[test]
fn trusted_v1_and_v2_headers_set_the_client() {
    timed(60, || {
        let up = upstream();
        let (p, rec) = proxy(&up, "127.0.0.1/32, 10.0.0.0/8", &[]);
        // An AWS-style TLV (PP2_TYPE_AWS, subtype VPCE id) after the addresses.
        let mut aws_tlv = vec![0xEA, 0x00, 0x0E, 0x01];
        aws_tlv.extend_from_slice(b"vpce-0123abcd");
        // (header, split point, client the proxy must see)
        let cases: Vec<(Vec<u8>, usize, &str)> = vec![
            (
                b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\n".to_vec(),
                99,
                "203.0.113.7",
            ),
            (
                b"PROXY TCP6 2001:db8::17 2001:db8::1 51234 25\r\n".to_vec(),
                11,
                "2001:db8::17",
            ),
            (
                v2(sa("198.51.100.9:40000"), sa("192.0.2.1:25"), &[]),
                7,
                "198.51.100.9",
            ),
            (
                v2(sa("198.51.100.10:40000"), sa("192.0.2.1:25"), &aws_tlv),
                20,
                "198.51.100.10",
            ),
            (
                v2(sa("[2001:db8::99]:40000"), sa("[2001:db8::1]:25"), &[]),
                100,
                "2001:db8::99",
            ),
            // No address to tell: the balancer's own connection is the client.
            (b"PROXY UNKNOWN\r\n".to_vec(), 99, "127.0.0.1"),
            (v2_local(), 99, "127.0.0.1"),
        ];
        for (i, (header, split, client)) in cases.iter().enumerate() {
            session_after(&p, header, *split);
            let (seen, line) = last_seen(&up, &rec, i + 1);
            assert_eq!(
                seen,
                *client,
                "CLIENT for header #{i} {}",
                common::show(header)
            );
            assert_eq!(
                line,
                format!("X-Client-IP: {client}"),
                "Header %i for header #{i}"
            );
            let session = up.session(i);
            let xclient: Vec<String> = session
                .lines()
                .into_iter()
                .filter(|l| l.starts_with("XCLIENT"))
                .collect();
            assert!(
                xclient.len() == 1 && xclient[0].contains(client),
                "XCLIENT for header #{i} should carry {client}: {xclient:?}"
            );
        }
        let log = p.log();
        for ip in ["203.0.113.7", "2001:db8::17", "198.51.100.9"] {
            assert!(
                log.contains(&format!("accepted connection from: {ip}")),
                "log does not name the real client {ip}"
            );
        }
    });
}

#[test]
fn untrusted_peers_are_served_as_themselves() {
    timed(40, || {
        let up = upstream();
        // 127.0.0.1 is not in the trusted network.
        let (p, rec) = proxy(&up, "10.0.0.0/8", &[]);
        // A plain client is served normally.
        session_after(&p, b"", 0);
        assert_eq!(
            last_seen(&up, &rec, 1),
            ("127.0.0.1".into(), "X-Client-IP: 127.0.0.1".into())
        );
        // A client claiming another address is not believed: its header line is just an
        // unknown command.
        let mut c = p.connect();
        c.send("PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\n");
        assert_eq!(c.greeting().code, 220);
        let r = c.reply();
        assert_eq!(r.code / 100, 5, "reply to the PROXY line: {r:?}");
        assert_eq!(c.cmd("EHLO client.example").code, 250);
        assert_eq!(c.send_mail(&common::default_message()).code, 250);
        assert_eq!(
            last_seen(&up, &rec, 2),
            ("127.0.0.1".into(), "X-Client-IP: 127.0.0.1".into())
        );
        // Nor with the PROXY protocol off.
        let up2 = upstream();
        let b = ProxyBuilder::new()
            .upstream(&up2)
            .set("Header", "X-Client-IP: %i");
        let (filter, rec2) = b.env_recorder();
        let p2 = b.set("FilterCommand", &filter).start();
        let mut c = p2.connect();
        c.send("PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\n");
        assert_eq!(c.greeting().code, 220);
        c.reply();
        assert_eq!(c.cmd("EHLO client.example").code, 250);
        assert_eq!(c.send_mail(&common::default_message()).code, 250);
        assert_eq!(
            last_seen(&up2, &rec2, 1),
            ("127.0.0.1".into(), "X-Client-IP: 127.0.0.1".into())
        );
        for log in [p.log(), p2.log()] {
            assert!(
                !log.contains("accepted connection from: 203.0.113.7"),
                "an untrusted header was believed"
            );
        }
    });
}

/// A trusted peer that sends no header, a broken one or nothing at all is disconnected
/// without a greeting and without an upstream connection; everyone else is still served.
#[test]
fn malformed_header_from_trusted_peer_is_refused() {
    timed(60, || {
        let up = upstream();
        let (mut p, rec) = proxy(&up, "127.0.0.0/8", &[("TimeOut", "2")]);
        let mut bad_version = v2(sa("198.51.100.9:40000"), sa("192.0.2.1:25"), &[]);
        bad_version[12] = 0x31;
        let mut bad_family = v2(sa("198.51.100.9:40000"), sa("192.0.2.1:25"), &[]);
        bad_family[13] = 0x11;
        bad_family[15] = 3; // shorter than an IPv4 address block
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        huge.extend_from_slice(&[0u8; 8000]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "plain SMTP instead of a header",
                b"EHLO client.example\r\n".to_vec(),
            ),
            (
                "bad IPv4 address",
                b"PROXY TCP4 999.0.113.7 192.0.2.1 51234 25\r\n".to_vec(),
            ),
            (
                "bare LF",
                b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\n".to_vec(),
            ),
            (
                "unknown protocol",
                b"PROXY UDP4 203.0.113.7 192.0.2.1 51234 25\r\n".to_vec(),
            ),
            ("v1 line too long", {
                let mut l = b"PROXY TCP4 ".to_vec();
                l.extend_from_slice(&[b'1'; 200]);
                l
            }),
            ("v2 bad version", bad_version),
            ("v2 address block too short", bad_family),
            ("v2 announces 64 KiB", huge),
            ("nothing at all", Vec::new()),
        ];
        for (what, bytes) in &cases {
            let mut c = Client::connect(p.addr());
            if !bytes.is_empty() {
                let _ = c.try_send(bytes);
            }
            assert!(c.wait_eof(secs(6)), "{what}: connection still open");
            assert!(
                c.received().is_empty(),
                "{what}: the refused peer got {}",
                common::show(c.received())
            );
            assert!(p.alive(), "{what}: proxsmtpd died");
        }
        assert_eq!(
            up.session_count(),
            0,
            "no refused peer may reach the upstream"
        );
        assert!(
            wait_until(secs(3), || p
                .log()
                .matches("refused connection: PROXY protocol")
                .count()
                >= cases.len()),
            "each refusal is logged"
        );
        // The proxy goes on serving.
        session_after(&p, b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 25\r\n", 99);
        assert_eq!(last_seen(&up, &rec, 1).0, "203.0.113.7");
    });
}
