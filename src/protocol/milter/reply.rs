//! The filter's replies, parsed from packets into typed values.

use bytes::Bytes;

use super::codec::Packet;
use super::{action, rsp, ProtocolError};

/// An SMTP reply chosen by the filter (`SMFIR_REPLYCODE`): a 4xx or 5xx code, possibly on
/// several lines (`550-5.7.1 first\r\n550 5.7.1 last`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpReply {
    pub code: u16,
    /// The reply as the filter sent it, without the terminating NUL; lines separated by
    /// CRLF, no line end after the last.
    pub text: Bytes,
}

impl SmtpReply {
    /// Checks the reply the way an MTA must before sending it to a client: every line has
    /// the same 4xx/5xx code, every line but the last continues with `-`, the last has a
    /// space, and an enhanced status code, if there is one, has the same class as the code.
    pub fn parse(text: Bytes) -> Result<SmtpReply, ProtocolError> {
        let mut code = None;
        let mut lines = text.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let last = lines.peek().is_none();
            let this = match line {
                [a @ (b'4' | b'5'), b, c, sep, rest @ ..]
                    if b.is_ascii_digit() && c.is_ascii_digit() =>
                {
                    let want_sep = if last { b' ' } else { b'-' };
                    if *sep != want_sep {
                        return Err(ProtocolError::BadReplyCode);
                    }
                    if let Some(d) = rest.first() {
                        if d.is_ascii_digit() && d != a {
                            return Err(ProtocolError::BadReplyCode);
                        }
                    }
                    if line.iter().any(|&b| b == b'\r' || b == 0) {
                        return Err(ProtocolError::BadReplyCode);
                    }
                    u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
                }
                _ => return Err(ProtocolError::BadReplyCode),
            };
            if code.is_some_and(|c| c != this) {
                return Err(ProtocolError::BadReplyCode);
            }
            code = Some(this);
        }
        match code {
            Some(code) => Ok(SmtpReply { code, text }),
            None => Err(ProtocolError::BadReplyCode),
        }
    }

    /// The lines of the reply, without line ends.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.text
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
    }

    pub fn is_temporary(&self) -> bool {
        self.code / 100 == 4
    }
}

/// A change to the message the filter asks for at end of message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modification {
    /// `SMFIR_ADDHEADER`: append a header field.
    AddHeader { name: Bytes, value: Bytes },
    /// `SMFIR_INSHEADER`: insert a header field at `index` (0 = first).
    InsHeader {
        index: u32,
        name: Bytes,
        value: Bytes,
    },
    /// `SMFIR_CHGHEADER`: change the `index`th (1-based) occurrence of the header `name`;
    /// an empty value deletes it.
    ChgHeader {
        index: u32,
        name: Bytes,
        value: Bytes,
    },
    /// `SMFIR_REPLBODY`: one piece of the new body; the pieces concatenate.
    ReplBody(Bytes),
    /// `SMFIR_CHGFROM`: a new envelope sender, with optional ESMTP parameters.
    ChgFrom { sender: Bytes, args: Option<Bytes> },
    /// `SMFIR_ADDRCPT`: add a recipient.
    AddRcpt(Bytes),
    /// `SMFIR_ADDRCPT_PAR`: add a recipient with optional ESMTP parameters.
    AddRcptPar { rcpt: Bytes, args: Option<Bytes> },
    /// `SMFIR_DELRCPT`: remove a recipient.
    DelRcpt(Bytes),
    /// `SMFIR_QUARANTINE`: hold the message, with a reason.
    Quarantine(Bytes),
}

impl Modification {
    /// The `SMFIF_*` action the filter must have negotiated to send this.
    pub fn required_action(&self) -> u32 {
        match self {
            Modification::AddHeader { .. } | Modification::InsHeader { .. } => action::ADDHDRS,
            Modification::ChgHeader { .. } => action::CHGHDRS,
            Modification::ReplBody(_) => action::CHGBODY,
            Modification::ChgFrom { .. } => action::CHGFROM,
            Modification::AddRcpt(_) => action::ADDRCPT,
            Modification::AddRcptPar { .. } => action::ADDRCPT_PAR,
            Modification::DelRcpt(_) => action::DELRCPT,
            Modification::Quarantine(_) => action::QUARANTINE,
        }
    }

    /// Whether a `ChgHeader` deletes the header.
    pub fn is_header_delete(&self) -> bool {
        matches!(self, Modification::ChgHeader { value, .. } if value.is_empty())
    }
}

/// One reply packet from the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Accept,
    Continue,
    Reject,
    Tempfail,
    Discard,
    /// `SMFIR_REPLYCODE`: reject or tempfail with this SMTP reply.
    ReplyCode(SmtpReply),
    /// `SMFIR_SKIP`: no more body chunks, please.
    Skip,
    /// `SMFIR_PROGRESS`: still working; the MTA restarts its timeout.
    Progress,
    /// `SMFIR_CONN_FAIL`: fail the SMTP connection.
    ConnFail,
    /// `SMFIR_SHUTDOWN`: close the SMTP connection with 421.
    Shutdown,
    Modification(Modification),
}

impl Reply {
    /// Parses a reply packet. Option negotiation (`SMFIC_OPTNEG`, `SMFIR_SETSYMLIST`) is not
    /// a reply here: `negotiate` handles it.
    pub fn parse(packet: &Packet) -> Result<Reply, ProtocolError> {
        let command = packet.command;
        let data = &packet.data;
        let malformed = |reason| ProtocolError::Malformed { command, reason };
        let empty = |r: Reply| {
            if data.is_empty() {
                Ok(r)
            } else {
                Err(malformed("unexpected data"))
            }
        };
        let mut fields = Fields {
            data: data.clone(),
            command,
        };
        let reply = match command {
            rsp::ACCEPT => return empty(Reply::Accept),
            rsp::CONTINUE => return empty(Reply::Continue),
            rsp::REJECT => return empty(Reply::Reject),
            rsp::TEMPFAIL => return empty(Reply::Tempfail),
            rsp::DISCARD => return empty(Reply::Discard),
            rsp::SKIP => return empty(Reply::Skip),
            rsp::PROGRESS => return empty(Reply::Progress),
            rsp::CONN_FAIL => return empty(Reply::ConnFail),
            rsp::SHUTDOWN => return empty(Reply::Shutdown),
            rsp::REPLYCODE => Reply::ReplyCode(SmtpReply::parse(fields.string()?)?),
            rsp::REPLBODY => {
                return Ok(Reply::Modification(Modification::ReplBody(data.clone())));
            }
            rsp::ADDHEADER => Reply::Modification(Modification::AddHeader {
                name: fields.string()?,
                value: fields.string()?,
            }),
            rsp::INSHEADER => Reply::Modification(Modification::InsHeader {
                index: fields.u32()?,
                name: fields.string()?,
                value: fields.string()?,
            }),
            rsp::CHGHEADER => Reply::Modification(Modification::ChgHeader {
                index: fields.u32()?,
                name: fields.string()?,
                value: fields.string()?,
            }),
            rsp::CHGFROM => Reply::Modification(Modification::ChgFrom {
                sender: fields.string()?,
                args: fields.optional_string()?,
            }),
            rsp::ADDRCPT => Reply::Modification(Modification::AddRcpt(fields.string()?)),
            rsp::ADDRCPT_PAR => Reply::Modification(Modification::AddRcptPar {
                rcpt: fields.string()?,
                args: fields.optional_string()?,
            }),
            rsp::DELRCPT => Reply::Modification(Modification::DelRcpt(fields.string()?)),
            rsp::QUARANTINE => Reply::Modification(Modification::Quarantine(fields.string()?)),
            rsp::OPTNEG | rsp::SETSYMLIST => {
                return Err(ProtocolError::Unexpected {
                    command,
                    stage: None,
                })
            }
            other => return Err(ProtocolError::UnknownCommand(other)),
        };
        if !fields.data.is_empty() {
            return Err(malformed("trailing data"));
        }
        if let Reply::Modification(
            Modification::AddHeader { name, .. }
            | Modification::InsHeader { name, .. }
            | Modification::ChgHeader { name, .. },
        ) = &reply
        {
            if name.is_empty() {
                return Err(malformed("empty header name"));
            }
        }
        Ok(reply)
    }
}

/// Reads NUL-terminated strings and 32-bit integers off a packet's data.
pub(crate) struct Fields {
    pub(crate) data: Bytes,
    pub(crate) command: u8,
}

impl Fields {
    pub(crate) fn string(&mut self) -> Result<Bytes, ProtocolError> {
        match memchr::memchr(0, &self.data) {
            Some(pos) => {
                let s = self.data.split_to(pos);
                self.data = self.data.slice(1..);
                Ok(s)
            }
            None => Err(ProtocolError::Malformed {
                command: self.command,
                reason: "missing NUL terminator",
            }),
        }
    }

    fn optional_string(&mut self) -> Result<Option<Bytes>, ProtocolError> {
        if self.data.is_empty() {
            Ok(None)
        } else {
            self.string().map(Some)
        }
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        match self.data.get(..4) {
            Some(b) => {
                let v = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                self.data = self.data.slice(4..);
                Ok(v)
            }
            None => Err(ProtocolError::Malformed {
                command: self.command,
                reason: "short integer field",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(command: u8, data: &'static [u8]) -> Result<Reply, ProtocolError> {
        Reply::parse(&Packet {
            command,
            data: Bytes::from_static(data),
        })
    }

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    #[test]
    fn parses_every_reply() {
        let reply_code = |code, text: &'static [u8]| {
            Reply::ReplyCode(SmtpReply {
                code,
                text: b(text),
            })
        };
        let m = Reply::Modification;
        let cases: Vec<(u8, &'static [u8], Reply)> = vec![
            (b'a', b"", Reply::Accept),
            (b'c', b"", Reply::Continue),
            (b'r', b"", Reply::Reject),
            (b't', b"", Reply::Tempfail),
            (b'd', b"", Reply::Discard),
            (b's', b"", Reply::Skip),
            (b'p', b"", Reply::Progress),
            (b'f', b"", Reply::ConnFail),
            (b'4', b"", Reply::Shutdown),
            (
                b'y',
                b"550 5.7.1 spam\0",
                reply_code(550, b"550 5.7.1 spam"),
            ),
            (b'y', b"451 try later\0", reply_code(451, b"451 try later")),
            (
                b'y',
                b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 last\0",
                reply_code(
                    550,
                    b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 last",
                ),
            ),
            (b'y', b"421 \0", reply_code(421, b"421 ")),
            (
                b'h',
                b"X-Spam\0yes\0",
                m(Modification::AddHeader {
                    name: b(b"X-Spam"),
                    value: b(b"yes"),
                }),
            ),
            (
                b'i',
                b"\x00\x00\x00\x00DKIM-Signature\0v=1; a=rsa\0",
                m(Modification::InsHeader {
                    index: 0,
                    name: b(b"DKIM-Signature"),
                    value: b(b"v=1; a=rsa"),
                }),
            ),
            (
                b'm',
                b"\x00\x00\x00\x02Subject\0[SPAM] hi\0",
                m(Modification::ChgHeader {
                    index: 2,
                    name: b(b"Subject"),
                    value: b(b"[SPAM] hi"),
                }),
            ),
            (
                b'm',
                b"\x00\x00\x01\x00X-Old\0\0",
                m(Modification::ChgHeader {
                    index: 256,
                    name: b(b"X-Old"),
                    value: b(b""),
                }),
            ),
            (
                b'b',
                b"new body\r\n\0binary",
                m(Modification::ReplBody(b(b"new body\r\n\0binary"))),
            ),
            (
                b'e',
                b"<new@example.org>\0",
                m(Modification::ChgFrom {
                    sender: b(b"<new@example.org>"),
                    args: None,
                }),
            ),
            (
                b'e',
                b"<new@example.org>\0SIZE=10\0",
                m(Modification::ChgFrom {
                    sender: b(b"<new@example.org>"),
                    args: Some(b(b"SIZE=10")),
                }),
            ),
            (
                b'+',
                b"<c@example.net>\0",
                m(Modification::AddRcpt(b(b"<c@example.net>"))),
            ),
            (
                b'2',
                b"<c@example.net>\0NOTIFY=NEVER\0",
                m(Modification::AddRcptPar {
                    rcpt: b(b"<c@example.net>"),
                    args: Some(b(b"NOTIFY=NEVER")),
                }),
            ),
            (
                b'2',
                b"<c@example.net>\0",
                m(Modification::AddRcptPar {
                    rcpt: b(b"<c@example.net>"),
                    args: None,
                }),
            ),
            (
                b'-',
                b"<b@example.net>\0",
                m(Modification::DelRcpt(b(b"<b@example.net>"))),
            ),
            (
                b'q',
                b"looks bad\0",
                m(Modification::Quarantine(b(b"looks bad"))),
            ),
        ];
        for (command, data, want) in cases {
            assert_eq!(parse(command, data), Ok(want), "{}", char::from(command));
        }
    }

    #[test]
    fn refuses_malformed_replies() {
        let malformed = |command, reason| Err(ProtocolError::Malformed { command, reason });
        let cases: Vec<(u8, &'static [u8], Result<Reply, ProtocolError>)> = vec![
            (b'c', b"x", malformed(b'c', "unexpected data")),
            (b'a', b"\0", malformed(b'a', "unexpected data")),
            (
                b'h',
                b"X-Spam\0yes",
                malformed(b'h', "missing NUL terminator"),
            ),
            (b'h', b"X-Spam", malformed(b'h', "missing NUL terminator")),
            (b'h', b"\0yes\0", malformed(b'h', "empty header name")),
            (b'h', b"A\0b\0c", malformed(b'h', "trailing data")),
            (
                b'i',
                b"\x00\x00\x00",
                malformed(b'i', "short integer field"),
            ),
            (
                b'm',
                b"\x00\x00\x00\x01Subject\0",
                malformed(b'm', "missing NUL terminator"),
            ),
            (b'+', b"", malformed(b'+', "missing NUL terminator")),
            (b'+', b"<a>\0<b>\0", malformed(b'+', "trailing data")),
            (b'-', b"<a>", malformed(b'-', "missing NUL terminator")),
            (b'e', b"", malformed(b'e', "missing NUL terminator")),
            (
                b'e',
                b"<a>\0SIZE=1",
                malformed(b'e', "missing NUL terminator"),
            ),
            (b'q', b"", malformed(b'q', "missing NUL terminator")),
            (
                b'y',
                b"550 5.7.1 no NUL",
                malformed(b'y', "missing NUL terminator"),
            ),
            (b'y', b"550 a\0b\0", malformed(b'y', "trailing data")),
            (b'y', b"250 ok\0", Err(ProtocolError::BadReplyCode)),
            (
                b'y',
                b"550 4.7.1 class differs\0",
                Err(ProtocolError::BadReplyCode),
            ),
            (b'y', b"55 short\0", Err(ProtocolError::BadReplyCode)),
            (b'y', b"550\0", Err(ProtocolError::BadReplyCode)),
            (b'y', b"\0", Err(ProtocolError::BadReplyCode)),
            (
                b'y',
                b"550-no continuation after\0",
                Err(ProtocolError::BadReplyCode),
            ),
            (b'y', b"550-a\r\n551 b\0", Err(ProtocolError::BadReplyCode)),
            (b'y', b"550 a\r\n550 b\0", Err(ProtocolError::BadReplyCode)),
            (b'y', b"550-a\r\n\0", Err(ProtocolError::BadReplyCode)),
            (b'y', b"550 a\rb\0", Err(ProtocolError::BadReplyCode)),
            (b'y', b"650 x\0", Err(ProtocolError::BadReplyCode)),
            (
                b'O',
                b"",
                Err(ProtocolError::Unexpected {
                    command: b'O',
                    stage: None,
                }),
            ),
            (b'Z', b"", Err(ProtocolError::UnknownCommand(b'Z'))),
        ];
        for (command, data, want) in cases {
            assert_eq!(
                parse(command, data),
                want,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn reply_lines_and_class() {
        let r = SmtpReply::parse(b(b"451-4.7.1 a\r\n451 4.7.1 b")).unwrap();
        assert!(r.is_temporary());
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec![&b"451-4.7.1 a"[..], b"451 4.7.1 b"]
        );
        // Bare LF between lines is accepted as well.
        assert_eq!(SmtpReply::parse(b(b"550-a\n550 b")).unwrap().code, 550);
    }

    #[test]
    fn modifications_name_their_action() {
        let cases = [
            (rsp::ADDHEADER, &b"A\0b\0"[..], action::ADDHDRS),
            (rsp::INSHEADER, b"\0\0\0\x01A\0b\0", action::ADDHDRS),
            (rsp::CHGHEADER, b"\0\0\0\x01A\0\0", action::CHGHDRS),
            (rsp::REPLBODY, b"x", action::CHGBODY),
            (rsp::CHGFROM, b"<a>\0", action::CHGFROM),
            (rsp::ADDRCPT, b"<a>\0", action::ADDRCPT),
            (rsp::ADDRCPT_PAR, b"<a>\0", action::ADDRCPT_PAR),
            (rsp::DELRCPT, b"<a>\0", action::DELRCPT),
            (rsp::QUARANTINE, b"r\0", action::QUARANTINE),
        ];
        for (command, data, want) in cases {
            let Ok(Reply::Modification(m)) = Reply::parse(&Packet {
                command,
                data: Bytes::copy_from_slice(data),
            }) else {
                panic!("not a modification: {}", char::from(command));
            };
            assert_eq!(m.required_action(), want);
            assert_eq!(m.is_header_delete(), command == rsp::CHGHEADER);
        }
    }
}
