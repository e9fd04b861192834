//! A network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`, or a single address), used to
//! decide which peers may send a PROXY protocol header.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 network. IPv4 networks are kept in the IPv4-mapped IPv6 space
/// (`::ffff:a.b.c.d`), so that an IPv4 peer matches whether a listener reports it as
/// `a.b.c.d` or, on a dual-stack socket, as `::ffff:a.b.c.d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: u128,
    /// Prefix length in the 128-bit space.
    prefix: u8,
}

impl Cidr {
    /// Builds a network from an address and prefix length (counted in the address's own
    /// family). Fails when the prefix is longer than the address or the address has host
    /// bits set (`10.0.0.1/8` is more likely a typo than a wish to trust all of 10/8).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        let (network, prefix) = match addr {
            IpAddr::V4(_) if prefix > 32 => {
                return Err(format!("prefix /{prefix} is longer than 32 bits"))
            }
            IpAddr::V4(_) => (to_bits(addr), prefix + 96),
            IpAddr::V6(_) if prefix > 128 => {
                return Err(format!("prefix /{prefix} is longer than 128 bits"))
            }
            IpAddr::V6(a) => (u128::from(a), prefix),
        };
        if network & !mask(prefix) != 0 {
            return Err(format!(
                "{addr}/{} has host bits set",
                prefix_in_family(addr, prefix)
            ));
        }
        Ok(Cidr { network, prefix })
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        to_bits(ip) & mask(self.prefix) == self.network
    }
}

/// The prefix as the user wrote it, for messages.
fn prefix_in_family(addr: IpAddr, prefix128: u8) -> u8 {
    if addr.is_ipv4() {
        prefix128 - 96
    } else {
        prefix128
    }
}

/// The address in the IPv6 space, IPv4 addresses mapped to `::ffff:a.b.c.d`.
fn to_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The 128-bit netmask with `prefix` leading ones.
fn mask(prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p => u128::MAX << (128 - u32::from(p)),
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network"))?;
        let prefix = match prefix {
            None if addr.is_ipv4() => 32,
            None => 128,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .map_err(|_| format!("{s:?} has an invalid prefix length"))?,
            Some(_) => return Err(format!("{s:?} has an invalid prefix length")),
        };
        Cidr::new(addr, prefix).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = Ipv6Addr::from(self.network);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.prefix >= 96 => write!(f, "{v4}/{}", self.prefix - 96),
            _ => write!(f, "{v6}/{}", self.prefix),
        }
    }
}

/// Parses a comma-separated list of networks; blanks around items are ignored and an empty
/// string is an empty list.
pub fn parse_cidr_list(v: &str) -> Result<Vec<Cidr>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(Cidr::from_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_displays() {
        let cases = [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.168.1.7", "192.168.1.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::/0", "::/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1/128"),
            ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("::ffff:10.1.2.3", "10.1.2.3/32"),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Cidr>().unwrap().to_string(), want, "{input}");
        }
    }

    #[test]
    fn rejects_bad_networks() {
        for input in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.1/8",
            "10.0.0.0/+8",
            "10.0.0.0/0008",
            "::/129",
            "2001:db8::1/32",
            "example.org/8",
            "10.0.0.0/8/8",
            "10.0.0/8",
        ] {
            assert!(input.parse::<Cidr>().is_err(), "{input:?} accepted");
        }
    }

    #[test]
    fn contains() {
        let cases = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("10.0.0.0/8", "::ffff:10.1.1.1", true),
            ("10.0.0.0/8", "::1", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("::/0", "10.0.0.1", true),
            ("::ffff:10.0.0.0/104", "10.9.9.9", true),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "fe80::1", true),
            ("::1", "::1", true),
            ("172.16.0.0/12", "172.31.255.255", true),
            ("172.16.0.0/12", "172.32.0.0", false),
        ];
        for (net, addr, want) in cases {
            let net: Cidr = net.parse().unwrap();
            assert_eq!(net.contains(ip(addr)), want, "{net} contains {addr}");
        }
    }

    #[test]
    fn lists() {
        let list = parse_cidr_list(" 10.0.0.0/8 , ::1,,").unwrap();
        assert_eq!(list.len(), 2);
        assert!(parse_cidr_list("").unwrap().is_empty());
        assert!(parse_cidr_list("10.0.0.0/8, nope").is_err());
    }
}
