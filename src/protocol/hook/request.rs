//! The JSON a hook is sent: Stalwart's MTA Hooks request, protocol version 1.
//!
//! `{"context": {...}, "envelope": {...}, "message": {...}}`; the message only at the data
//! stage, where its `contents` (the body, after the header section) is streamed: [`render`]
//! gives the JSON before and after that string, and the caller writes the string between
//! them with [`super::json_text::JsonText`].

use serde::Serialize;

use crate::protocol::milter::message::Field;

/// The session a request describes.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    /// `mail`, `rcpt` or `data`.
    pub stage: &'static str,
    pub client: Client,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    pub server: Server,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<Queue>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize)]
pub struct Client {
    pub ip: String,
    pub port: u16,
    pub ptr: Option<String>,
    pub helo: Option<String>,
    #[serde(rename = "activeConnections")]
    pub active_connections: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tls {
    pub version: String,
    pub cipher: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Server {
    pub name: Option<String>,
    pub port: u16,
    pub ip: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Queue {
    pub id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Protocol {
    pub version: u32,
}

/// An envelope address with its ESMTP parameters (`null` for a keyword without a value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Address {
    pub address: String,
    pub parameters: Option<std::collections::BTreeMap<String, Option<String>>>,
}

impl Address {
    /// The address and parameters of a `MAIL FROM` or `RCPT TO` line.
    pub fn from_line(address: &str, line: &[u8]) -> Address {
        let params = envelope_parameters(line);
        Address {
            address: bare(address),
            parameters: (!params.is_empty()).then(|| params.into_iter().collect()),
        }
    }

    /// An address known without its line (a recipient a filter added).
    pub fn bare(address: &str) -> Address {
        Address {
            address: bare(address),
            parameters: None,
        }
    }
}

/// The null sender is the empty address, as Stalwart sends it.
fn bare(address: &str) -> String {
    if address == "<>" {
        String::new()
    } else {
        address.to_string()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    pub from: Address,
    pub to: Vec<Address>,
}

/// The ESMTP parameters after the address of a `MAIL FROM` / `RCPT TO` line: words after
/// the closing `>`, each `KEYWORD` or `KEYWORD=value`.
pub fn envelope_parameters(line: &[u8]) -> Vec<(String, Option<String>)> {
    let line = crate::protocol::line::trim_line_end(line);
    let Some(close) = memchr::memchr(b'>', line) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&line[close + 1..])
        .split_ascii_whitespace()
        .map(|word| match word.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (word.to_string(), None),
        })
        .collect()
}

#[derive(Serialize)]
struct Head<'a> {
    context: &'a Context,
    envelope: &'a Envelope,
}

#[derive(Serialize)]
struct MessageHead {
    headers: Vec<(String, String)>,
    #[serde(rename = "serverHeaders")]
    server_headers: Vec<(String, String)>,
    size: u64,
}

/// A request's JSON around the message contents: for the data stage `before` ends inside
/// the `contents` string and `after` closes it; otherwise `before` is the whole request
/// and `after` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub before: Vec<u8>,
    pub after: Vec<u8>,
}

/// The message part of a data-stage request: the header fields as parsed (the value is what
/// follows the colon, folding kept, the last CRLF removed) and the message's size.
pub struct MessageInfo<'a> {
    pub fields: &'a [Field],
    pub size: u64,
}

/// Renders a request (see [`Rendered`]).
pub fn render(context: &Context, envelope: &Envelope, message: Option<MessageInfo>) -> Rendered {
    let head = Head { context, envelope };
    let mut before = serde_json::to_vec(&head).unwrap_or_else(|_| unreachable!("plain data"));
    let Some(message) = message else {
        return Rendered {
            before,
            after: Vec::new(),
        };
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let message = MessageHead {
        headers: message
            .fields
            .iter()
            .map(|f| (text(&f.name), text(&f.raw_value)))
            .collect(),
        server_headers: Vec::new(),
        size: message.size,
    };
    let message = serde_json::to_vec(&message).unwrap_or_else(|_| unreachable!("plain data"));
    // `{"context":..,"envelope":..}` + `,"message":{"headers":..,"size":N` + `,"contents":"`
    before.pop();
    before.extend_from_slice(b",\"message\":");
    before.extend_from_slice(&message[..message.len() - 1]);
    before.extend_from_slice(b",\"contents\":\"");
    Rendered {
        before,
        after: b"\"}}".to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::hook::json_text::JsonText;
    use crate::protocol::milter::message::parse_header_section;

    fn context(stage: &'static str) -> Context {
        Context {
            stage,
            client: Client {
                ip: "192.0.2.7".into(),
                port: 40123,
                ptr: None,
                helo: Some("client.example".into()),
                active_connections: 1,
            },
            tls: Some(Tls {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
            }),
            server: Server {
                name: Some("proxy.example".into()),
                port: 25,
                ip: Some("127.0.0.1".into()),
            },
            queue: Some(Queue { id: "ABC".into() }),
            protocol: Protocol { version: 1 },
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            from: Address::from_line(
                "a@example.org",
                b"MAIL FROM:<a@example.org> SIZE=120 BODY=8BITMIME SMTPUTF8\r\n",
            ),
            to: vec![
                Address::from_line("b@example.net", b"RCPT TO:<b@example.net>\r\n"),
                Address::from_line("c@example.net", b"RCPT TO:<c@example.net> NOTIFY=NEVER\r\n"),
            ],
        }
    }

    #[test]
    fn an_envelope_stage_request_is_stalwarts_json() {
        let r = render(&context("rcpt"), &envelope(), None);
        assert!(r.after.is_empty());
        let v: serde_json::Value = serde_json::from_slice(&r.before).unwrap();
        let expected = serde_json::json!({
            "context": {
                "stage": "rcpt",
                "client": {"ip": "192.0.2.7", "port": 40123, "ptr": null,
                           "helo": "client.example", "activeConnections": 1},
                "tls": {"version": "TLSv1.3", "cipher": "TLS13_AES_128_GCM_SHA256"},
                "server": {"name": "proxy.example", "port": 25, "ip": "127.0.0.1"},
                "queue": {"id": "ABC"},
                "protocol": {"version": 1}
            },
            "envelope": {
                "from": {"address": "a@example.org",
                         "parameters": {"SIZE": "120", "BODY": "8BITMIME", "SMTPUTF8": null}},
                "to": [
                    {"address": "b@example.net", "parameters": null},
                    {"address": "c@example.net", "parameters": {"NOTIFY": "NEVER"}}
                ]
            }
        });
        assert_eq!(v, expected);
    }

    #[test]
    fn a_data_request_carries_headers_size_and_the_streamed_body() {
        let message = b"Subject: a\r\n folded\r\nX-Empty:\r\n\r\nbody \"quoted\"\r\n";
        let section = parse_header_section(message, true);
        let r = render(
            &context("data"),
            &envelope(),
            Some(MessageInfo {
                fields: &section.fields,
                size: message.len() as u64,
            }),
        );
        let mut json = r.before.clone();
        let mut text = JsonText::new();
        text.push(&message[section.length..], &mut json);
        text.finish(&mut json);
        json.extend_from_slice(&r.after);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["context"]["stage"], "data");
        assert_eq!(
            v["message"]["headers"],
            serde_json::json!([["Subject", " a\r\n folded"], ["X-Empty", ""]])
        );
        assert_eq!(v["message"]["serverHeaders"], serde_json::json!([]));
        assert_eq!(v["message"]["size"], message.len());
        assert_eq!(v["message"]["contents"], "body \"quoted\"\r\n");
        // Headers and contents give back the message byte for byte.
        let mut rebuilt = String::new();
        for h in v["message"]["headers"].as_array().unwrap() {
            rebuilt += &format!("{}:{}\r\n", h[0].as_str().unwrap(), h[1].as_str().unwrap());
        }
        rebuilt += "\r\n";
        rebuilt += v["message"]["contents"].as_str().unwrap();
        assert_eq!(rebuilt.as_bytes(), message);
    }

    #[test]
    fn the_null_sender_is_the_empty_address() {
        let a = Address::from_line("<>", b"MAIL FROM:<>\r\n");
        assert_eq!(a.address, "");
        assert_eq!(a.parameters, None);
    }

    #[test]
    fn parameters_are_the_words_after_the_address() {
        type Case<'a> = (&'a [u8], &'a [(&'a str, Option<&'a str>)]);
        let cases: &[Case] = &[
            (b"MAIL FROM:<a@b>\r\n", &[]),
            (b"MAIL FROM:<a@b>  SIZE=1\r\n", &[("SIZE", Some("1"))]),
            (
                b"RCPT TO:<a@b> ORCPT=rfc822;a@b NOTIFY\r\n",
                &[("ORCPT", Some("rfc822;a@b")), ("NOTIFY", None)],
            ),
            (b"MAIL FROM:a@b SIZE=1\r\n", &[]),
        ];
        for (line, expected) in cases {
            let got = envelope_parameters(line);
            let expected: Vec<(String, Option<String>)> = expected
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect();
            assert_eq!(got, expected, "{}", String::from_utf8_lossy(line));
        }
    }
}
