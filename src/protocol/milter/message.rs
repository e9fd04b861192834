//! A message as milters see and change it, without I/O: its header section split into
//! fields (what the `SMFIC_HEADER` stages send), the header modifications of the end of
//! message applied to those fields, and the envelope changes (`CHGFROM`, `ADDRCPT`,
//! `DELRCPT`) applied to a sender and recipient list.
//!
//! The message is the spooled content: unstuffed, CRLF line ends. The header section ends
//! at the first empty line, or at the first line that is neither a field nor a
//! continuation (that line is the body's first, as Postfix reads it), or after
//! [`HEADER_SECTION_LIMIT`] bytes (the rest is body, as Postfix's `header_size_limit`).

use bytes::Bytes;

use super::reply::Modification;

/// The most header bytes read as fields; the rest of a longer header section is body.
pub const HEADER_SECTION_LIMIT: usize = 1024 * 1024;

/// One header field: its name and everything after the colon up to (not including) the
/// CRLF that ends it, folding CRLFs included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub raw_value: Vec<u8>,
}

impl Field {
    /// The value as milters get it: folding line ends as LF only (as Postfix sends them).
    pub fn milter_value(&self) -> Vec<u8> {
        crlf_to_lf(&self.raw_value)
    }
}

/// The header section of a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderSection {
    pub fields: Vec<Field>,
    /// Bytes of the message the section takes, its empty line included when there is one:
    /// the body starts there.
    pub length: usize,
}

/// Whether `name` is a header field name (RFC 5322: printable ASCII but colon, not empty).
fn is_field_name(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b) && b != b':')
}

/// Splits the start of a message into header fields. `start` holds the first bytes of the
/// message (all of it, or at least [`HEADER_SECTION_LIMIT`] bytes when it is longer);
/// `complete` says whether `start` is the whole message.
pub fn parse_header_section(start: &[u8], complete: bool) -> HeaderSection {
    let mut section = HeaderSection::default();
    let mut pos = 0;
    while pos < start.len() {
        let rest = &start[pos..];
        let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
            // A last line without CRLF: only a field if the message ends there.
            if complete {
                if let Some(field) = field_line(rest) {
                    section.fields.push(field);
                    pos = start.len();
                }
            }
            break;
        };
        let line = &rest[..end];
        let next = pos + end + 2;
        if next > HEADER_SECTION_LIMIT {
            break;
        }
        if line.is_empty() {
            pos = next;
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            match section.fields.last_mut() {
                Some(field) => {
                    field.raw_value.extend_from_slice(b"\r\n");
                    field.raw_value.extend_from_slice(line);
                }
                None => break,
            }
        } else {
            match field_line(line) {
                Some(field) => section.fields.push(field),
                None => break,
            }
        }
        pos = next;
    }
    section.length = pos;
    section
}

fn field_line(line: &[u8]) -> Option<Field> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = &line[..colon];
    // "Name :" (space before the colon) is obsolete syntax still seen in the wild.
    let trimmed = name.strip_suffix(b" ").unwrap_or(name);
    is_field_name(trimmed).then(|| Field {
        name: name.to_vec(),
        raw_value: line[colon + 1..].to_vec(),
    })
}

/// The header section written back: each field as `name:value` CRLF, then the empty line.
pub fn render_header_section(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        out.extend_from_slice(&f.name);
        out.push(b':');
        out.extend_from_slice(&f.raw_value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn crlf_to_lf(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'\r' && v.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

/// A value from a milter as it goes into the message: every line end CRLF, no bare CR or
/// LF, no NUL, and (unless the milter negotiated `SMFIP_HDR_LEADSPC` and so sends its own)
/// one space after the colon. A continuation line must start with white space: a tab is
/// added where a milter forgot it, so that its value cannot start a new field. A line of
/// nothing but white space is left out: many readers take it for the blank line that ends
/// the header section.
pub fn value_for_message(value: &[u8], leading_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 4);
    if !leading_space {
        out.push(b' ');
    }
    let lines: Vec<&[u8]> = value
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect();
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            if line.iter().all(|&b| matches!(b, b' ' | b'\t' | b'\r' | 0)) {
                continue;
            }
            out.extend_from_slice(b"\r\n");
            if line[0] != b' ' && line[0] != b'\t' {
                out.push(b'\t');
            }
        }
        out.extend(line.iter().map(|&b| match b {
            b'\r' | 0 => b' ',
            b => b,
        }));
    }
    out
}

/// Why a header modification was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditError {
    /// A header name that is not one (empty, a colon, white space or control characters).
    BadName(Vec<u8>),
}

impl std::fmt::Display for EditError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EditError::BadName(n) => write!(
                f,
                "not a header field name: {:?}",
                String::from_utf8_lossy(n)
            ),
        }
    }
}

/// Applies one header modification (`ADDHEADER`, `INSHEADER`, `CHGHEADER`) to `fields`;
/// other modifications leave them as they are. As Postfix and sendmail do: `INSHEADER`'s
/// index counts fields from the top (past the end appends), `CHGHEADER`'s counts the
/// fields of that name from 1 (case-insensitively; index 0 is taken as 1), an empty value
/// deletes that field, and changing a field that is not there adds it.
pub fn apply_header(
    fields: &mut Vec<Field>,
    modification: &Modification,
    leading_space: bool,
) -> Result<(), EditError> {
    let field = |name: &Bytes, value: &Bytes| -> Result<Field, EditError> {
        if !is_field_name(name) {
            return Err(EditError::BadName(name.to_vec()));
        }
        Ok(Field {
            name: name.to_vec(),
            raw_value: value_for_message(value, leading_space),
        })
    };
    match modification {
        Modification::AddHeader { name, value } => fields.push(field(name, value)?),
        Modification::InsHeader { index, name, value } => {
            let at = (*index as usize).min(fields.len());
            fields.insert(at, field(name, value)?);
        }
        Modification::ChgHeader { index, name, value } => {
            let new = field(name, value)?;
            let wanted = (*index).max(1) as usize;
            let found = fields
                .iter()
                .enumerate()
                .filter(|(_, f)| trim_name(&f.name).eq_ignore_ascii_case(name))
                .nth(wanted - 1)
                .map(|(i, _)| i);
            match (found, value.is_empty()) {
                (Some(i), true) => {
                    fields.remove(i);
                }
                (Some(i), false) => fields[i].raw_value = new.raw_value,
                (None, true) => {}
                (None, false) => fields.push(new),
            }
        }
        _ => {}
    }
    Ok(())
}

fn trim_name(name: &[u8]) -> &[u8] {
    name.strip_suffix(b" ").unwrap_or(name)
}

/// The bare address of an envelope argument: `<a@b>` and `a@b` are the same address.
pub fn bare_address(addr: &[u8]) -> &[u8] {
    let addr = addr.strip_prefix(b"<").unwrap_or(addr);
    addr.strip_suffix(b">").unwrap_or(addr)
}

/// An envelope recipient: its address (bare) and the RCPT line's ESMTP parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub address: String,
    pub params: Option<String>,
}

/// The envelope a message is delivered with, as the milters left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeEdit {
    /// A new sender (bare address) and its MAIL parameters, from `CHGFROM`.
    pub sender: Option<(String, Option<String>)>,
    pub recipients: Vec<Recipient>,
    /// Whether any modification changed the envelope.
    pub changed: bool,
}

impl EnvelopeEdit {
    /// The envelope before any change: the recipients the upstream accepted.
    pub fn new(recipients: &[String]) -> EnvelopeEdit {
        EnvelopeEdit {
            sender: None,
            recipients: recipients
                .iter()
                .map(|r| Recipient {
                    address: r.clone(),
                    params: None,
                })
                .collect(),
            changed: false,
        }
    }

    /// Applies `CHGFROM`, `ADDRCPT`, `ADDRCPT_PAR` or `DELRCPT`; other modifications leave
    /// the envelope as it is. Adding a recipient already there changes nothing; deleting
    /// one compares addresses case-insensitively, with or without angle brackets.
    pub fn apply(&mut self, modification: &Modification) {
        let text = |b: &[u8]| String::from_utf8_lossy(bare_address(b)).into_owned();
        let params = |p: &Option<Bytes>| {
            p.as_ref()
                .map(|p| String::from_utf8_lossy(p).trim().to_string())
                .filter(|p| !p.is_empty())
        };
        match modification {
            Modification::ChgFrom { sender, args } => {
                self.sender = Some((text(sender), params(args)));
                self.changed = true;
            }
            Modification::AddRcpt(rcpt) => self.add(text(rcpt), None),
            Modification::AddRcptPar { rcpt, args } => self.add(text(rcpt), params(args)),
            Modification::DelRcpt(rcpt) => {
                let gone = text(rcpt);
                let before = self.recipients.len();
                self.recipients
                    .retain(|r| !r.address.eq_ignore_ascii_case(&gone));
                self.changed |= self.recipients.len() != before;
            }
            _ => {}
        }
    }

    fn add(&mut self, address: String, params: Option<String>) {
        if !self
            .recipients
            .iter()
            .any(|r| r.address.eq_ignore_ascii_case(&address))
        {
            self.recipients.push(Recipient { address, params });
            self.changed = true;
        }
    }
}

/// Whether an address from a milter may go into an SMTP command line: no CR, LF, NUL or
/// other control characters, no spaces, no angle brackets inside, and at most 256 octets.
pub fn is_safe_address(addr: &str) -> bool {
    addr.len() <= 256
        && addr
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>' || b >= 0x80)
}

/// Whether ESMTP parameters from a milter may go into an SMTP command line.
pub fn is_safe_params(params: &str) -> bool {
    params.len() <= 1000 && params.bytes().all(|b| (b' '..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &HeaderSection) -> Vec<String> {
        s.fields
            .iter()
            .map(|f| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(&f.name),
                    String::from_utf8_lossy(&f.raw_value)
                )
            })
            .collect()
    }

    #[test]
    fn header_sections_are_split_where_postfix_splits_them() {
        // (message, complete, fields, body offset)
        let cases: &[(&str, bool, &[&str], usize)] = &[
            ("A: 1\r\nB: 2\r\n\r\nbody\r\n", true, &["A= 1", "B= 2"], 14),
            ("A: 1\r\n  folded\r\n\r\nx", true, &["A= 1\r\n  folded"], 18),
            ("\r\nbody\r\n", true, &[], 2),
            // A line that is no field starts the body, unconsumed.
            ("A: 1\r\nnot a field\r\n", true, &["A= 1"], 6),
            // A continuation before any field: all body.
            (" x\r\nA: 1\r\n", true, &[], 0),
            // Headers only, last line without CRLF.
            ("A: 1\r\nB: 2", true, &["A= 1", "B= 2"], 10),
            ("A: 1\r\nB: 2", false, &["A= 1"], 6),
            ("Name : v\r\n\r\n", true, &["Name = v"], 12),
            ("A\x01B: v\r\n\r\n", true, &[], 0),
        ];
        for (text, complete, fields, length) in cases {
            let s = parse_header_section(text.as_bytes(), *complete);
            assert_eq!(names(&s), *fields, "{text:?}");
            assert_eq!(s.length, *length, "{text:?}");
        }
    }

    #[test]
    fn a_header_section_past_the_limit_leaves_the_rest_as_body() {
        let mut msg = Vec::new();
        while msg.len() < HEADER_SECTION_LIMIT + 100 {
            msg.extend_from_slice(b"X-Long: 0123456789012345678901234567890123456789\r\n");
        }
        let s = parse_header_section(&msg, false);
        assert!(s.length <= HEADER_SECTION_LIMIT);
        assert_eq!(s.length % 50, 0);
    }

    #[test]
    fn values_sent_to_milters_have_lf_folding() {
        let s = parse_header_section(b"Subject: a\r\n\tb\r\n\r\n", true);
        assert_eq!(s.fields[0].milter_value(), b" a\n\tb");
    }

    fn field(name: &str, value: &str) -> Field {
        Field {
            name: name.as_bytes().to_vec(),
            raw_value: value.as_bytes().to_vec(),
        }
    }

    fn add(name: &'static str, value: &'static str) -> Modification {
        Modification::AddHeader {
            name: Bytes::from(name),
            value: Bytes::from(value),
        }
    }

    fn chg(index: u32, name: &'static str, value: &'static str) -> Modification {
        Modification::ChgHeader {
            index,
            name: Bytes::from(name),
            value: Bytes::from(value),
        }
    }

    fn ins(index: u32, name: &'static str, value: &'static str) -> Modification {
        Modification::InsHeader {
            index,
            name: Bytes::from(name),
            value: Bytes::from(value),
        }
    }

    #[test]
    fn header_modifications_apply_as_postfix_applies_them() {
        let start = || {
            vec![
                field("Received", " one"),
                field("Subject", " hi"),
                field("X-Tag", " a"),
                field("x-tag", " b"),
            ]
        };
        // (modification, resulting fields)
        let cases: Vec<(Modification, Vec<&str>)> = vec![
            (
                add("X-New", "v"),
                vec![
                    "Received: one",
                    "Subject: hi",
                    "X-Tag: a",
                    "x-tag: b",
                    "X-New: v",
                ],
            ),
            (
                ins(0, "DKIM-Signature", "v=1"),
                vec![
                    "DKIM-Signature: v=1",
                    "Received: one",
                    "Subject: hi",
                    "X-Tag: a",
                    "x-tag: b",
                ],
            ),
            (
                ins(99, "X-End", "e"),
                vec![
                    "Received: one",
                    "Subject: hi",
                    "X-Tag: a",
                    "x-tag: b",
                    "X-End: e",
                ],
            ),
            (
                chg(2, "X-TAG", "c"),
                vec!["Received: one", "Subject: hi", "X-Tag: a", "x-tag: c"],
            ),
            (
                chg(1, "x-tag", ""),
                vec!["Received: one", "Subject: hi", "x-tag: b"],
            ),
            (
                chg(0, "Subject", "[SPAM] hi"),
                vec![
                    "Received: one",
                    "Subject: [SPAM] hi",
                    "X-Tag: a",
                    "x-tag: b",
                ],
            ),
            (
                chg(3, "X-Tag", "z"),
                vec![
                    "Received: one",
                    "Subject: hi",
                    "X-Tag: a",
                    "x-tag: b",
                    "X-Tag: z",
                ],
            ),
            (
                chg(3, "X-Tag", ""),
                vec!["Received: one", "Subject: hi", "X-Tag: a", "x-tag: b"],
            ),
            (
                add("X-Fold", "a\nb\r\n\tc"),
                vec![
                    "Received: one",
                    "Subject: hi",
                    "X-Tag: a",
                    "x-tag: b",
                    "X-Fold: a\r\n\tb\r\n\tc",
                ],
            ),
        ];
        for (m, want) in cases {
            let mut fields = start();
            apply_header(&mut fields, &m, false).unwrap();
            let got: Vec<String> = fields
                .iter()
                .map(|f| {
                    format!(
                        "{}:{}",
                        String::from_utf8_lossy(&f.name),
                        String::from_utf8_lossy(&f.raw_value)
                    )
                })
                .collect();
            assert_eq!(got, want, "{m:?}");
        }
    }

    #[test]
    fn milter_values_cannot_inject_lines_or_fields() {
        let mut fields = Vec::new();
        apply_header(&mut fields, &add("X-A", "v\r\nBcc: x@y\r\n\r\nbody"), false).unwrap();
        let mut out = Vec::new();
        render_header_section(&fields, &mut out);
        assert_eq!(out, b"X-A: v\r\n\tBcc: x@y\r\n\tbody\r\n\r\n");
        // Lines of white space only (or what becomes spaces) would read as the end of the
        // header section: left out.
        let mut fields = Vec::new();
        apply_header(&mut fields, &add("X-W", "a\n \n\t\r\n\0\nb"), false).unwrap();
        let mut out = Vec::new();
        render_header_section(&fields, &mut out);
        assert_eq!(out, b"X-W: a\r\n\tb\r\n\r\n");
        assert!(apply_header(&mut fields, &add("Bad Name", "v"), false).is_err());
        assert!(apply_header(&mut fields, &add("", "v"), false).is_err());
        let mut fields = Vec::new();
        apply_header(&mut fields, &add("X-B", " lead\0nul\rcr"), true).unwrap();
        assert_eq!(fields[0].raw_value, b" lead nul cr");
    }

    #[test]
    fn envelope_changes() {
        let mut e = EnvelopeEdit::new(&["a@x".to_string(), "b@x".to_string()]);
        e.apply(&Modification::DelRcpt(Bytes::from("<A@X>")));
        e.apply(&Modification::AddRcpt(Bytes::from("<c@x>")));
        e.apply(&Modification::AddRcpt(Bytes::from("b@x")));
        e.apply(&Modification::AddRcptPar {
            rcpt: Bytes::from("<d@x>"),
            args: Some(Bytes::from("NOTIFY=NEVER")),
        });
        e.apply(&Modification::ChgFrom {
            sender: Bytes::from("<new@x>"),
            args: None,
        });
        assert!(e.changed);
        assert_eq!(e.sender, Some(("new@x".to_string(), None)));
        let got: Vec<(&str, Option<&str>)> = e
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.params.as_deref()))
            .collect();
        assert_eq!(
            got,
            [("b@x", None), ("c@x", None), ("d@x", Some("NOTIFY=NEVER"))]
        );
        let mut same = EnvelopeEdit::new(&["a@x".to_string()]);
        same.apply(&Modification::DelRcpt(Bytes::from("<z@x>")));
        same.apply(&Modification::AddRcpt(Bytes::from("<A@x>")));
        assert!(!same.changed);
    }

    #[test]
    fn only_safe_addresses_and_parameters_reach_a_command_line() {
        assert!(is_safe_address("a@b.example"));
        assert!(is_safe_address(""));
        assert!(!is_safe_address("a@b\r\nRCPT TO:<c@d>"));
        assert!(!is_safe_address("a b@c"));
        assert!(!is_safe_address("a>@c"));
        assert!(is_safe_params("NOTIFY=NEVER ORCPT=rfc822;a@b"));
        assert!(!is_safe_params("X=1\r\nQUIT"));
    }
}
