//! Option negotiation: what the MTA offers in `SMFIC_OPTNEG`, what the filter answers, and
//! the lists of macros to send at each stage.

use bytes::Bytes;

use super::codec::{Command, Packet};
use super::reply::Fields;
use super::{action, proto, rsp, ProtocolError, PROTOCOL_VERSION};

/// The lowest filter protocol version accepted (libmilter's own minimum).
pub const MIN_VERSION: u32 = 2;

/// What the MTA offers the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub version: u32,
    /// `SMFIF_*` actions the filter may take.
    pub actions: u32,
    /// `SMFIP_*` flags the filter may set.
    pub protocol: u32,
}

impl Default for Offer {
    /// Version 6, every action, every protocol flag of version 6.
    fn default() -> Self {
        Offer {
            version: PROTOCOL_VERSION,
            actions: action::ALL,
            protocol: proto::ALL,
        }
    }
}

impl Offer {
    /// The `SMFIC_OPTNEG` packet.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17);
        let command = Command::OptNeg {
            version: self.version,
            actions: self.actions,
            protocol: self.protocol,
        };
        command
            .encode(&mut out)
            .expect("three integers always encode");
        out
    }
}

/// The number of `SMFIM_*` macro stages (connect, helo, envfrom, envrcpt, data, eom, eoh).
pub const MACRO_STAGES: usize = 7;

/// What the filter and the MTA agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The filter's version (at most the offered one).
    pub version: u32,
    /// The actions the filter may take: what it asked for (a subset of the offer).
    pub actions: u32,
    /// The protocol flags in effect: what it asked for (a subset of the offer).
    pub protocol: u32,
    /// Macro names the filter asked for, per `SMFIM_*` stage; `None` where it did not say.
    pub symlists: [Option<Vec<String>>; MACRO_STAGES],
}

impl Negotiated {
    pub fn has_action(&self, action: u32) -> bool {
        self.actions & action == action
    }

    pub fn has_flag(&self, flag: u32) -> bool {
        flag != 0 && self.protocol & flag == flag
    }

    /// Parses the filter's `SMFIC_OPTNEG` answer against what was offered: three 32-bit
    /// words (version, actions, protocol flags), then optionally pairs of a 32-bit `SMFIM_*`
    /// stage and a NUL-terminated list of macro names (`SMFIR_SETSYMLIST`). Unknown stages
    /// are ignored, as Postfix does. Asking for an action or flag that was not offered is an
    /// error.
    pub fn from_reply(offer: &Offer, packet: &Packet) -> Result<Negotiated, ProtocolError> {
        if packet.command != rsp::OPTNEG {
            return Err(ProtocolError::Unexpected {
                command: packet.command,
                stage: None,
            });
        }
        let mut fields = Fields {
            data: packet.data.clone(),
            command: packet.command,
        };
        let version = fields.u32()?;
        let actions = fields.u32()?;
        let protocol = fields.u32()?;
        if !(MIN_VERSION..=offer.version).contains(&version) {
            return Err(ProtocolError::UnsupportedVersion(version));
        }
        if actions & !offer.actions != 0 {
            return Err(ProtocolError::ActionsNotOffered {
                requested: actions,
                offered: offer.actions,
            });
        }
        if protocol & !offer.protocol != 0 {
            return Err(ProtocolError::FlagsNotOffered {
                requested: protocol,
                offered: offer.protocol,
            });
        }
        let mut symlists: [Option<Vec<String>>; MACRO_STAGES] = Default::default();
        while !fields.data.is_empty() {
            let stage = fields.u32()?;
            let list = fields.string()?;
            let Some(slot) = usize::try_from(stage)
                .ok()
                .and_then(|s| symlists.get_mut(s))
            else {
                continue;
            };
            *slot = Some(split_names(&list));
        }
        Ok(Negotiated {
            version,
            actions,
            protocol,
            symlists,
        })
    }
}

/// Macro names from a list separated by spaces, commas or tabs.
fn split_names(list: &Bytes) -> Vec<String> {
    String::from_utf8_lossy(list)
        .split([' ', ',', '\t', '\r', '\n'])
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A macro name without braces: `{daemon_name}` and `daemon_name` are the same macro, as
/// are `j` and `{j}`.
pub fn bare_macro_name(name: &str) -> &str {
    name.strip_prefix('{')
        .and_then(|n| n.strip_suffix('}'))
        .unwrap_or(name)
}

/// Which macros the MTA sends at each stage (`SMFIM_*` order), before the filter's own
/// lists replace them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacroNames {
    pub stages: [Vec<String>; MACRO_STAGES],
}

fn names(list: &str) -> Vec<String> {
    list.split(' ').map(str::to_owned).collect()
}

impl Default for MacroNames {
    /// Postfix's defaults, plus the client's address, port and name at connect and the
    /// authentication strength at mail (sendmail macros that filters commonly read).
    fn default() -> Self {
        let mut n = MacroNames::postfix_defaults();
        n.stages[super::macro_stage::CONNECT as usize]
            .extend(names("{client_addr} {client_port} {client_name}"));
        n.stages[super::macro_stage::ENVFROM as usize].push("{auth_ssf}".to_owned());
        n
    }
}

impl MacroNames {
    /// Postfix's defaults (`milter_*_macros` as `postconf -d` shows them).
    pub fn postfix_defaults() -> Self {
        MacroNames {
            stages: [
                // SMFIM_CONNECT
                names("j {daemon_name} {daemon_addr} v _"),
                // SMFIM_HELO
                names("{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"),
                // SMFIM_ENVFROM
                names("i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}"),
                // SMFIM_ENVRCPT
                names("i {rcpt_addr} {rcpt_host} {rcpt_mailer}"),
                // SMFIM_DATA
                names("i"),
                // SMFIM_EOM
                names("i"),
                // SMFIM_EOH
                names("i"),
            ],
        }
    }

    /// The names for an `SMFIM_*` stage, the filter's list taking precedence.
    pub fn for_stage<'a>(&'a self, negotiated: &'a Negotiated, stage: u32) -> &'a [String] {
        let Ok(i) = usize::try_from(stage) else {
            return &[];
        };
        match negotiated.symlists.get(i) {
            Some(Some(list)) => list,
            _ => self.stages.get(i).map(Vec::as_slice).unwrap_or(&[]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::milter::macro_stage;

    fn answer(words: [u32; 3], rest: &[u8]) -> Packet {
        let mut data = Vec::new();
        for w in words {
            data.extend_from_slice(&w.to_be_bytes());
        }
        data.extend_from_slice(rest);
        Packet {
            command: b'O',
            data: Bytes::from(data),
        }
    }

    #[test]
    fn offer_is_version_6_with_everything() {
        assert_eq!(
            Offer::default().to_bytes(),
            b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff"
        );
    }

    #[test]
    fn negotiation_cases() {
        let offer = Offer::default();
        let ok = |version, actions, protocol| {
            Ok(Negotiated {
                version,
                actions,
                protocol,
                symlists: Default::default(),
            })
        };
        let small = Offer {
            version: 6,
            actions: action::ADDHDRS | action::CHGBODY,
            protocol: proto::NOCONNECT | proto::NR_HDR,
        };
        let cases: Vec<(Offer, Packet, Result<Negotiated, ProtocolError>)> = vec![
            // A typical libmilter filter: add headers, skip connect and helo.
            (
                offer,
                answer([6, 0x01, 0x03], b""),
                ok(6, action::ADDHDRS, proto::NOCONNECT | proto::NOHELO),
            ),
            (offer, answer([2, 0, 0], b""), ok(2, 0, 0)),
            (
                offer,
                answer([6, action::ALL, proto::ALL], b""),
                ok(6, action::ALL, proto::ALL),
            ),
            (
                offer,
                answer([7, 0, 0], b""),
                Err(ProtocolError::UnsupportedVersion(7)),
            ),
            (
                offer,
                answer([1, 0, 0], b""),
                Err(ProtocolError::UnsupportedVersion(1)),
            ),
            (
                offer,
                answer([6, 0x200, 0], b""),
                Err(ProtocolError::ActionsNotOffered {
                    requested: 0x200,
                    offered: action::ALL,
                }),
            ),
            (
                small,
                answer([6, action::ADDRCPT, 0], b""),
                Err(ProtocolError::ActionsNotOffered {
                    requested: action::ADDRCPT,
                    offered: small.actions,
                }),
            ),
            // SMFIP_MDS_256K is not offered.
            (
                offer,
                answer([6, 0, 0x1000_0000], b""),
                Err(ProtocolError::FlagsNotOffered {
                    requested: 0x1000_0000,
                    offered: proto::ALL,
                }),
            ),
            (
                small,
                answer([6, 0, proto::SKIP], b""),
                Err(ProtocolError::FlagsNotOffered {
                    requested: proto::SKIP,
                    offered: small.protocol,
                }),
            ),
            (
                offer,
                Packet {
                    command: b'O',
                    data: Bytes::from_static(b"\0\0\0\x06\0\0\0\x01\0\0"),
                },
                Err(ProtocolError::Malformed {
                    command: b'O',
                    reason: "short integer field",
                }),
            ),
            (
                offer,
                answer([6, 0, 0], b"\0\0\0\x01{tls_version}"),
                Err(ProtocolError::Malformed {
                    command: b'O',
                    reason: "missing NUL terminator",
                }),
            ),
            (
                offer,
                answer([6, 0, 0], b"\0\0"),
                Err(ProtocolError::Malformed {
                    command: b'O',
                    reason: "short integer field",
                }),
            ),
            (
                offer,
                Packet {
                    command: b'c',
                    data: Bytes::new(),
                },
                Err(ProtocolError::Unexpected {
                    command: b'c',
                    stage: None,
                }),
            ),
        ];
        for (offer, packet, want) in cases {
            assert_eq!(Negotiated::from_reply(&offer, &packet), want, "{packet:?}");
        }
    }

    #[test]
    fn symlists_override_per_stage() {
        let packet = answer(
            [6, action::SETSYMLIST, 0],
            b"\0\0\0\x00j {client_addr}\0\0\0\0\x02{mail_addr},i\0\0\0\0\x63ignored\0\0\0\0\x05\0",
        );
        let n = Negotiated::from_reply(&Offer::default(), &packet).unwrap();
        assert_eq!(
            n.symlists[macro_stage::CONNECT as usize],
            Some(vec!["j".to_owned(), "{client_addr}".to_owned()])
        );
        assert_eq!(
            n.symlists[macro_stage::ENVFROM as usize],
            Some(vec!["{mail_addr}".to_owned(), "i".to_owned()])
        );
        assert_eq!(n.symlists[macro_stage::EOM as usize], Some(vec![]));
        assert_eq!(n.symlists[macro_stage::HELO as usize], None);

        let names = MacroNames::postfix_defaults();
        assert_eq!(
            names.for_stage(&n, macro_stage::CONNECT),
            ["j", "{client_addr}"]
        );
        assert_eq!(names.for_stage(&n, macro_stage::EOM), [] as [String; 0]);
        assert_eq!(
            names.for_stage(&n, macro_stage::HELO),
            names.stages[macro_stage::HELO as usize].as_slice()
        );
        assert_eq!(names.for_stage(&n, 99), [] as [String; 0]);
    }

    #[test]
    fn postfix_default_macro_lists() {
        let names = MacroNames::postfix_defaults();
        assert_eq!(
            names.stages[macro_stage::CONNECT as usize][..5],
            ["j", "{daemon_name}", "{daemon_addr}", "v", "_"]
        );
        assert!(names.stages[macro_stage::ENVFROM as usize].contains(&"{auth_authen}".to_owned()));
        assert_eq!(names.stages[macro_stage::DATA as usize], ["i"]);
        assert_eq!(bare_macro_name("{j}"), "j");
        assert_eq!(bare_macro_name("{daemon_name}"), "daemon_name");
        assert_eq!(bare_macro_name("_"), "_");
        assert_eq!(bare_macro_name("{"), "{");
    }
}
