//! The address syntax of `Listen` and `OutAddress`, tried in the original's order: a bare
//! port, an IPv4 literal with optional port, a unix socket path, a host name with optional
//! port. IPv6 literals in brackets (`[::1]`, `[::1]:10025`) are accepted as well.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

pub const DEFAULT_LISTEN_PORT: u16 = 10025;
pub const DEFAULT_OUT_PORT: u16 = 25;

/// Where the SMTP listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Where each session connects upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutAddress {
    /// An IP literal with a port.
    Ip(SocketAddr),
    /// A host name, resolved again for every connection (as the original does).
    Host { name: String, port: u16 },
    /// A bare port: connect back to the client's own address on that port.
    ClientLoopback(u16),
    /// A unix socket path.
    Unix(PathBuf),
}

/// `sun_path` is 108 bytes including the terminating NUL.
const UNIX_PATH_MAX: usize = 108;
/// Longest host name the original accepts (it must be shorter than this).
const HOST_NAME_MAX: usize = 255;

/// One of the syntactic forms; host names are not resolved here.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Parsed {
    Port(u16),
    Ip(SocketAddr),
    Unix(PathBuf),
    Host(String, u16),
}

/// Parses a `Listen` value. A bare port listens on all IPv4 addresses; a host name is
/// resolved now, to its first IPv4 address if it has one, else its first address.
pub fn parse_listen(v: &str) -> Result<ListenAddress, String> {
    let invalid = || format!("invalid Listen socket name or ip: {v}");
    match parse(v, DEFAULT_LISTEN_PORT).ok_or_else(invalid)? {
        Parsed::Port(port) => Ok(ListenAddress::Tcp(SocketAddr::from((
            Ipv4Addr::UNSPECIFIED,
            port,
        )))),
        Parsed::Ip(addr) => Ok(ListenAddress::Tcp(addr)),
        Parsed::Unix(path) => Ok(ListenAddress::Unix(path)),
        Parsed::Host(name, port) => resolve(&name, port)
            .map(ListenAddress::Tcp)
            .ok_or_else(invalid),
    }
}

/// Parses an `OutAddress` value. Host names are kept as names (they are resolved for every
/// connection); [`resolve`] checks them at startup.
pub fn parse_out_address(v: &str) -> Result<OutAddress, String> {
    let invalid = || format!("invalid OutAddress socket name or ip: {v}");
    Ok(match parse(v, DEFAULT_OUT_PORT).ok_or_else(invalid)? {
        Parsed::Port(port) => OutAddress::ClientLoopback(port),
        Parsed::Ip(addr) => OutAddress::Ip(addr),
        Parsed::Unix(path) => OutAddress::Unix(path),
        Parsed::Host(name, port) => OutAddress::Host { name, port },
    })
}

/// Resolves a host name, preferring its first IPv4 address (the original only handled IPv4
/// results correctly, so configurations written for it expect IPv4).
pub fn resolve(name: &str, port: u16) -> Option<SocketAddr> {
    let addrs: Vec<SocketAddr> = (name, port).to_socket_addrs().ok()?.collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}

fn parse(v: &str, default_port: u16) -> Option<Parsed> {
    if let Some(port) = port_only(v) {
        return Some(Parsed::Port(port));
    }
    if let Some(addr) = ipv4(v, default_port) {
        return Some(Parsed::Ip(addr));
    }
    if v.starts_with('[') {
        return ipv6(v, default_port).map(Parsed::Ip);
    }
    if v.contains('/') && !v.contains(':') && v.len() < UNIX_PATH_MAX {
        return Some(Parsed::Unix(PathBuf::from(v)));
    }
    host(v, default_port)
}

/// 1 to 5 digits with a value of 1..65535.
fn port_only(v: &str) -> Option<u16> {
    if v.is_empty() || v.len() > 5 {
        return None;
    }
    port(v)
}

/// A decimal port 1..65535 (leading zeros allowed, as strtol allows them).
fn port(v: &str) -> Option<u16> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match v.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => u16::try_from(p).ok(),
        // Too many digits for u32 is out of range too.
        _ => None,
    }
}

/// `a.b.c.d` or `a.b.c.d:port`, between 3 and 21 characters long as in the original.
fn ipv4(v: &str, default_port: u16) -> Option<SocketAddr> {
    if !(3..=21).contains(&v.len()) {
        return None;
    }
    let (ip, port_text) = match v.split_once(':') {
        Some((ip, p)) => (ip, Some(p)),
        None => (v, None),
    };
    // Ipv4Addr's parser is as strict as inet_pton: four decimal parts, no leading zeros.
    let ip: Ipv4Addr = ip.parse().ok()?;
    let port = match port_text {
        Some(p) => port(p)?,
        None => default_port,
    };
    Some(SocketAddr::from((ip, port)))
}

/// `[v6]` or `[v6]:port`.
fn ipv6(v: &str, default_port: u16) -> Option<SocketAddr> {
    let rest = v.strip_prefix('[')?;
    let (ip, after) = rest.split_once(']')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let port = match after {
        "" => default_port,
        _ => port(after.strip_prefix(':')?)?,
    };
    Some(SocketAddr::from((IpAddr::V6(ip), port)))
}

/// `name` or `name:port`: starts with a letter, no blank, `/` or `\`, shorter than 255.
fn host(v: &str, default_port: u16) -> Option<Parsed> {
    let (name, port_text) = match v.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (v, None),
    };
    let valid_name = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.len() < HOST_NAME_MAX
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '\\');
    if !valid_name {
        return None;
    }
    let port = match port_text {
        Some(p) => port(p)?,
        None => default_port,
    };
    Some(Parsed::Host(name.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn out_address_accepted() {
        let host = |name: &str, port| OutAddress::Host {
            name: name.to_string(),
            port,
        };
        let cases = [
            ("1", OutAddress::ClientLoopback(1)),
            ("10026", OutAddress::ClientLoopback(10026)),
            ("00025", OutAddress::ClientLoopback(25)),
            ("65535", OutAddress::ClientLoopback(65535)),
            ("127.0.0.1", OutAddress::Ip(sa("127.0.0.1:25"))),
            ("127.0.0.1:2525", OutAddress::Ip(sa("127.0.0.1:2525"))),
            ("1.2.3.4:00025", OutAddress::Ip(sa("1.2.3.4:25"))),
            (
                "255.255.255.255:65535",
                OutAddress::Ip(sa("255.255.255.255:65535")),
            ),
            ("[::1]", OutAddress::Ip(sa("[::1]:25"))),
            ("[::1]:10025", OutAddress::Ip(sa("[::1]:10025"))),
            (
                "[2001:db8::5]:2525",
                OutAddress::Ip(sa("[2001:db8::5]:2525")),
            ),
            (
                "[::ffff:127.0.0.1]:26",
                OutAddress::Ip(sa("[::ffff:127.0.0.1]:26")),
            ),
            ("/run/mta.sock", OutAddress::Unix("/run/mta.sock".into())),
            ("a/b", OutAddress::Unix("a/b".into())),
            ("mail.example.org", host("mail.example.org", 25)),
            ("localhost:2525", host("localhost", 2525)),
            ("x", host("x", 25)),
            ("mx-1.example", host("mx-1.example", 25)),
        ];
        for (input, want) in cases {
            assert_eq!(parse_out_address(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn out_address_rejected() {
        let long_path = format!("/{}", "p".repeat(UNIX_PATH_MAX - 1));
        let long_host = "h".repeat(HOST_NAME_MAX);
        let cases = [
            "",
            "0",
            "65536",
            "99999",
            "123456",
            "000025",
            "1a",
            "-25",
            "+25",
            "1.2.3",
            "01.2.3.4",
            "1.2.3.4:",
            "1.2.3.4:0",
            "1.2.3.4:65536",
            "1.2.3.4:25x",
            "1.2.3.4:+25",
            "255.255.255.255:000025",
            "12345:25",
            "/x:y",
            long_path.as_str(),
            long_host.as_str(),
            "a b",
            "a\\b",
            "localhost:",
            "localhost:0",
            "localhost:x",
            "a:b:c",
            "_name",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[::1]:0",
            "[1.2.3.4]",
            "[nope]",
            "::1",
            "::1:25",
        ];
        for input in cases {
            assert_eq!(
                parse_out_address(input),
                Err(format!("invalid OutAddress socket name or ip: {input}")),
                "{input:?}"
            );
        }
    }

    #[test]
    fn unix_path_length_limit() {
        let max = format!("/{}", "p".repeat(UNIX_PATH_MAX - 2));
        assert_eq!(max.len(), UNIX_PATH_MAX - 1);
        assert_eq!(parse_out_address(&max), Ok(OutAddress::Unix(max.into())));
    }

    #[test]
    fn listen_accepted() {
        let tcp = |s: &str| ListenAddress::Tcp(sa(s));
        let cases = [
            ("10025", tcp("0.0.0.0:10025")),
            ("25", tcp("0.0.0.0:25")),
            ("127.0.0.1", tcp("127.0.0.1:10025")),
            ("127.0.0.1:2525", tcp("127.0.0.1:2525")),
            ("0.0.0.0:1", tcp("0.0.0.0:1")),
            ("[::]", tcp("[::]:10025")),
            ("[::1]:10025", tcp("[::1]:10025")),
            (
                "/run/proxsmtpd.sock",
                ListenAddress::Unix("/run/proxsmtpd.sock".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_listen(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn listen_resolves_host_names() {
        // `localhost` resolves from /etc/hosts without DNS; IPv4 is preferred.
        assert_eq!(
            parse_listen("localhost:12999"),
            Ok(ListenAddress::Tcp(sa("127.0.0.1:12999")))
        );
        assert_eq!(
            parse_listen("localhost"),
            Ok(ListenAddress::Tcp(sa("127.0.0.1:10025")))
        );
        assert_eq!(
            parse_listen("no-such-host.invalid"),
            Err("invalid Listen socket name or ip: no-such-host.invalid".to_string())
        );
    }

    #[test]
    fn listen_rejected() {
        for input in [
            "",
            "0",
            "x y",
            "127.0.0.1:0",
            "1.2.3.4:",
            "[::1]:99999",
            "/a:b",
        ] {
            assert_eq!(
                parse_listen(input),
                Err(format!("invalid Listen socket name or ip: {input}")),
                "{input:?}"
            );
        }
    }

    #[test]
    fn resolve_prefers_ipv4() {
        assert_eq!(resolve("localhost", 25), Some(sa("127.0.0.1:25")));
        assert_eq!(resolve("no-such-host.invalid", 25), None);
    }
}
