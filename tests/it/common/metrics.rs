//! Polls the admin `/metrics` endpoint until a series has an expected value:
//! `metric("proxsmtpd_messages_total").label("verdict", "accepted").value(1.0).assert_in(&admin)`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parses the text exposition format (comments skipped, label values unescaped).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &r[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut val = String::new();
                    loop {
                        let (_, c) = chars.next()?;
                        match c {
                            '\\' => match chars.next()?.1 {
                                'n' => val.push('\n'),
                                other => val.push(other),
                            },
                            '"' => break,
                            other => val.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), val));
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Starts a matcher for the series `name`.
pub fn metric(name: &str) -> Matcher {
    Matcher {
        name: name.into(),
        labels: Vec::new(),
        value: None,
        timeout: Duration::from_secs(5),
    }
}

#[derive(Debug, Clone)]
pub struct Matcher {
    name: String,
    labels: Vec<(String, String)>,
    value: Option<f64>,
    timeout: Duration,
}

impl Matcher {
    /// The series must carry this label (other labels are allowed).
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }

    pub fn value(mut self, v: f64) -> Self {
        self.value = Some(v);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    fn selects(&self, s: &Sample) -> bool {
        s.name == self.name && self.labels.iter().all(|l| s.labels.contains(l))
    }

    /// The value of the first series this matcher selects in `text`.
    pub fn find_value(&self, text: &str) -> Option<f64> {
        parse(text)
            .into_iter()
            .find(|s| self.selects(s))
            .map(|s| s.value)
    }

    /// True if a selected series has the expected value (or exists, without a value).
    pub fn matches(&self, text: &str) -> bool {
        parse(text)
            .iter()
            .any(|s| self.selects(s) && self.value.is_none_or(|v| (s.value - v).abs() < 1e-9))
    }

    /// Polls `http://admin/metrics` until the series matches; panics with the last body.
    pub fn assert_in(&self, admin: &SocketAddr) {
        let deadline = Instant::now() + self.timeout;
        let mut last = String::new();
        loop {
            if let Ok((200, body)) = http_get(admin, "/metrics") {
                if self.matches(&body) {
                    return;
                }
                last = body;
            }
            if Instant::now() >= deadline {
                let related: Vec<&str> =
                    last.lines().filter(|l| l.starts_with(&self.name)).collect();
                panic!(
                    "metric {}{:?} never had value {:?}; current: {:?}",
                    self.name, self.labels, self.value, related
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A minimal HTTP/1.0 GET; returns the status code and body.
pub fn http_get(addr: &SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The bytes of messages held in memory now (SpoolMemory), from the proxy's gauge.
pub fn spool_memory(admin: &SocketAddr) -> f64 {
    let (_, body) = http_get(admin, "/metrics").expect("metrics");
    metric("proxsmtpd_spool_memory_bytes")
        .find_value(&body)
        .expect("proxsmtpd_spool_memory_bytes")
}
