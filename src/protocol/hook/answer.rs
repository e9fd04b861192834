//! A hook's answer: `{"action": ..., "response": {...}, "modifications": [...]}` read into
//! a verdict, the SMTP reply the client gets for it, and the same modifications a milter
//! can ask for (applied by the same code).
//!
//! Nothing in an answer is trusted: a status that does not fit the action, an enhanced
//! code of another class, CR, LF or control characters in the text are all replaced by
//! safe values; the modifications' values are made safe where they are applied.

use bytes::Bytes;
use serde::Deserialize;

use crate::protocol::milter::reply::Modification;

/// At most this many modifications are read from one answer.
pub const MAX_MODIFICATIONS: usize = 1000;

/// What the hook decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Accept,
    Discard,
    Reject,
    Quarantine,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Discard => "discard",
            Action::Reject => "reject",
            Action::Quarantine => "quarantine",
        }
    }
}

/// A hook's answer, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub action: Action,
    /// For `reject`: the reply line the client gets, CRLF included; its first digit says
    /// whether it is a temporary failure. For `quarantine`: the reason, when given.
    pub reply: Option<Vec<u8>>,
    /// Close the session after the reply.
    pub disconnect: bool,
    /// The reason a quarantine gives (the response's text, or a default).
    pub reason: String,
    pub modifications: Vec<Modification>,
}

impl Answer {
    /// Whether a `reject` is a temporary failure (a 4xx status).
    pub fn is_temporary(&self) -> bool {
        self.reply
            .as_ref()
            .is_some_and(|r| r.first() == Some(&b'4'))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAction {
    Accept,
    Discard,
    Reject,
    Quarantine,
}

#[derive(Deserialize, Default)]
struct RawResponse {
    #[serde(default)]
    status: Option<u16>,
    #[serde(default, rename = "enhancedStatus", alias = "enhanced_status")]
    enhanced_status: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    disconnect: bool,
}

type Parameters = std::collections::BTreeMap<String, Option<String>>;

#[derive(Deserialize)]
#[serde(tag = "type")]
enum RawModification {
    #[serde(rename = "changeFrom")]
    ChangeFrom {
        value: String,
        #[serde(default)]
        parameters: Parameters,
    },
    #[serde(rename = "addRecipient")]
    AddRecipient {
        value: String,
        #[serde(default)]
        parameters: Parameters,
    },
    #[serde(rename = "deleteRecipient")]
    DeleteRecipient { value: String },
    #[serde(rename = "replaceContents")]
    ReplaceContents { value: String },
    #[serde(rename = "addHeader")]
    AddHeader { name: String, value: String },
    #[serde(rename = "insertHeader")]
    InsertHeader {
        index: u32,
        name: String,
        value: String,
    },
    #[serde(rename = "changeHeader")]
    ChangeHeader {
        index: u32,
        name: String,
        value: String,
    },
    #[serde(rename = "deleteHeader")]
    DeleteHeader { index: u32, name: String },
}

#[derive(Deserialize)]
struct RawAnswer {
    action: RawAction,
    #[serde(default)]
    response: Option<RawResponse>,
    #[serde(default)]
    modifications: Vec<RawModification>,
}

/// Reads a hook's answer; the error says what is wrong with it.
pub fn parse(body: &[u8]) -> Result<Answer, String> {
    let raw: RawAnswer = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if raw.modifications.len() > MAX_MODIFICATIONS {
        return Err(format!(
            "{} modifications (at most {MAX_MODIFICATIONS})",
            raw.modifications.len()
        ));
    }
    let response = raw.response.unwrap_or_default();
    let action = match raw.action {
        RawAction::Accept => Action::Accept,
        RawAction::Discard => Action::Discard,
        RawAction::Reject => Action::Reject,
        RawAction::Quarantine => Action::Quarantine,
    };
    let text = response.message.as_deref().map(safe_text);
    let reply = match action {
        Action::Reject => Some(reject_reply(&response, text.as_deref())),
        _ => None,
    };
    let reason = text.unwrap_or_else(|| "quarantined by the hook".to_string());
    Ok(Answer {
        action,
        reply,
        disconnect: response.disconnect,
        reason,
        modifications: raw.modifications.into_iter().map(modification).collect(),
    })
}

/// The reply a `reject` gets: the hook's status when it is a 4xx or 5xx, else 550; its
/// enhanced code when it is well formed and of the same class; its text, else a default.
fn reject_reply(response: &RawResponse, text: Option<&str>) -> Vec<u8> {
    let status = response
        .status
        .filter(|s| (400..=599).contains(s))
        .unwrap_or(550);
    let class = (status / 100) as u8;
    let enhanced = response
        .enhanced_status
        .as_deref()
        .filter(|e| is_enhanced_code(e, class))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{class}.7.1"));
    let text = text.unwrap_or(if class == 4 {
        "Message temporarily refused"
    } else {
        "Message rejected"
    });
    format!("{status} {enhanced} {text}\r\n").into_bytes()
}

/// `class.subject.detail` (RFC 3463), with the class the reply's first digit gives.
fn is_enhanced_code(code: &str, class: u8) -> bool {
    let parts: Vec<&str> = code.split('.').collect();
    parts.len() == 3
        && parts[0] == class.to_string()
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The most bytes of a hook's reply text: with the code and enhanced code in front, the
/// line stays within SMTP's 512 (RFC 5321, 4.5.3.1.5), whatever characters it has.
const TEXT_LIMIT: usize = 400;

/// A reply text on one line of printable characters, at most [`TEXT_LIMIT`] bytes of them.
fn safe_text(text: &str) -> String {
    let mut clean = String::with_capacity(text.len().min(TEXT_LIMIT));
    for c in text.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if clean.len() + c.len_utf8() > TEXT_LIMIT {
            break;
        }
        clean.push(c);
    }
    let clean = clean.trim();
    if clean.is_empty() {
        "Message rejected".to_string()
    } else {
        clean.to_string()
    }
}

/// `KEY=value KEY2` from a parameters object.
fn args(parameters: Parameters) -> Option<Bytes> {
    let words: Vec<String> = parameters
        .into_iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k,
        })
        .collect();
    (!words.is_empty()).then(|| Bytes::from(words.join(" ")))
}

fn modification(raw: RawModification) -> Modification {
    let b = |s: String| Bytes::from(s.into_bytes());
    match raw {
        RawModification::ChangeFrom { value, parameters } => Modification::ChgFrom {
            sender: b(value),
            args: args(parameters),
        },
        RawModification::AddRecipient { value, parameters } => Modification::AddRcptPar {
            rcpt: b(value),
            args: args(parameters),
        },
        RawModification::DeleteRecipient { value } => Modification::DelRcpt(b(value)),
        RawModification::ReplaceContents { value } => {
            Modification::ReplBody(Bytes::from(crlf_lines(value.as_bytes())))
        }
        RawModification::AddHeader { name, value } => Modification::AddHeader {
            name: b(name),
            value: b(value),
        },
        RawModification::InsertHeader { index, name, value } => Modification::InsHeader {
            index,
            name: b(name),
            value: b(value),
        },
        RawModification::ChangeHeader { index, name, value } => Modification::ChgHeader {
            index,
            name: b(name),
            value: b(value),
        },
        // A change to the empty value deletes, as for milters.
        RawModification::DeleteHeader { index, name } => Modification::ChgHeader {
            index,
            name: b(name),
            value: Bytes::new(),
        },
    }
}

/// A replacement body with every line ending CRLF: services written in any language tend
/// to send bare LF, which must not reach an SMTP server.
pub fn crlf_lines(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 32);
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\r' if body.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_of(json: &str) -> String {
        String::from_utf8(parse(json.as_bytes()).unwrap().reply.unwrap()).unwrap()
    }

    #[test]
    fn actions_read_as_they_are_named() {
        for (word, action) in [
            ("accept", Action::Accept),
            ("discard", Action::Discard),
            ("reject", Action::Reject),
            ("quarantine", Action::Quarantine),
        ] {
            let a = parse(format!(r#"{{"action":"{word}"}}"#).as_bytes()).unwrap();
            assert_eq!(a.action, action);
            assert_eq!(a.action.label(), word);
            assert!(a.modifications.is_empty());
            assert!(!a.disconnect);
        }
    }

    #[test]
    fn reject_replies_are_made_safe() {
        let cases = [
            (r#"{"action":"reject"}"#, "550 5.7.1 Message rejected\r\n"),
            (
                r#"{"action":"reject","response":{"status":554,"enhancedStatus":"5.7.9","message":"Policy says no"}}"#,
                "554 5.7.9 Policy says no\r\n",
            ),
            (
                r#"{"action":"reject","response":{"status":451,"enhanced_status":"4.7.0","message":"later"}}"#,
                "451 4.7.0 later\r\n",
            ),
            // A 2xx status cannot make a rejection look accepted.
            (
                r#"{"action":"reject","response":{"status":250,"message":"ok"}}"#,
                "550 5.7.1 ok\r\n",
            ),
            // An enhanced code of another class is replaced.
            (
                r#"{"action":"reject","response":{"status":450,"enhancedStatus":"5.1.1"}}"#,
                "450 4.7.1 Message temporarily refused\r\n",
            ),
            (
                r#"{"action":"reject","response":{"status":550,"enhancedStatus":"5.1.1x"}}"#,
                "550 5.7.1 Message rejected\r\n",
            ),
            // No second line, no injected command.
            (
                r#"{"action":"reject","response":{"status":550,"message":"no\r\n250 ok\u0000"}}"#,
                "550 5.7.1 no  250 ok\r\n",
            ),
        ];
        for (json, reply) in cases {
            assert_eq!(reply_of(json), reply, "{json}");
        }
        let temp = parse(br#"{"action":"reject","response":{"status":421}}"#).unwrap();
        assert!(temp.is_temporary());
        assert!(!parse(br#"{"action":"reject"}"#).unwrap().is_temporary());
    }

    #[test]
    fn disconnect_and_quarantine_reason_are_read() {
        let a = parse(
            br#"{"action":"quarantine","response":{"message":"suspicious","disconnect":true}}"#,
        )
        .unwrap();
        assert_eq!(a.action, Action::Quarantine);
        assert_eq!(a.reason, "suspicious");
        assert!(a.disconnect);
        assert_eq!(a.reply, None);
    }

    #[test]
    fn modifications_become_milter_modifications() {
        let a = parse(
            br#"{"action":"accept","modifications":[
            {"type":"changeFrom","value":"new@x.example","parameters":{"SIZE":"10","SMTPUTF8":null}},
            {"type":"addRecipient","value":"r@x.example"},
            {"type":"deleteRecipient","value":"old@x.example"},
            {"type":"replaceContents","value":"line1\nline2\r\n"},
            {"type":"addHeader","name":"X-A","value":"a"},
            {"type":"insertHeader","index":1,"name":"X-B","value":"b"},
            {"type":"changeHeader","index":2,"name":"Subject","value":"new"},
            {"type":"deleteHeader","index":1,"name":"X-C"}]}"#,
        )
        .unwrap();
        let b = |s: &str| Bytes::from(s.to_string());
        assert_eq!(
            a.modifications,
            vec![
                Modification::ChgFrom {
                    sender: b("new@x.example"),
                    args: Some(b("SIZE=10 SMTPUTF8")),
                },
                Modification::AddRcptPar {
                    rcpt: b("r@x.example"),
                    args: None,
                },
                Modification::DelRcpt(b("old@x.example")),
                Modification::ReplBody(b("line1\r\nline2\r\n")),
                Modification::AddHeader {
                    name: b("X-A"),
                    value: b("a"),
                },
                Modification::InsHeader {
                    index: 1,
                    name: b("X-B"),
                    value: b("b"),
                },
                Modification::ChgHeader {
                    index: 2,
                    name: b("Subject"),
                    value: b("new"),
                },
                Modification::ChgHeader {
                    index: 1,
                    name: b("X-C"),
                    value: Bytes::new(),
                },
            ]
        );
    }

    #[test]
    fn broken_answers_are_errors() {
        for body in [
            &b""[..],
            b"not json",
            b"{}",
            br#"{"action":"maybe"}"#,
            br#"{"action":"accept","modifications":[{"type":"explode"}]}"#,
            br#"{"action":"accept","modifications":[{"type":"addHeader","name":"X"}]}"#,
            br#"{"action":"accept","response":{"status":"five"}}"#,
            br#"[1,2]"#,
        ] {
            assert!(parse(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
        let many = format!(
            r#"{{"action":"accept","modifications":[{}]}}"#,
            vec![r#"{"type":"deleteRecipient","value":"a"}"#; MAX_MODIFICATIONS + 1].join(",")
        );
        assert!(parse(many.as_bytes())
            .unwrap_err()
            .contains("modifications"));
    }

    #[test]
    fn replacement_bodies_get_crlf_line_ends() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\nb\n", b"a\r\nb\r\n"),
            (b"a\r\nb", b"a\r\nb"),
            (b"a\rb\r\n\n", b"a\r\nb\r\n\r\n"),
            (b"", b""),
        ];
        for (input, expected) in cases {
            assert_eq!(crlf_lines(input), *expected);
        }
    }

    #[test]
    fn reply_texts_fit_an_smtp_reply_line() {
        let cases: [(String, usize); 4] = [
            ("x".repeat(1000), 400),
            ("é".repeat(300), 400),
            ("😀".repeat(150), 400),
            ("a\r\nb\0c".to_string(), 6),
        ];
        for (text, len) in cases {
            let safe = safe_text(&text);
            assert_eq!(safe.len(), len, "{text:?}");
            assert!(safe.chars().all(|c| !c.is_control()), "{safe:?}");
        }
    }
}
