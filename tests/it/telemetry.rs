//! Traces of the real binary in a real OTLP/HTTP receiver: a small HTTP server in the test
//! decodes every `POST /v1/traces` body as an `ExportTraceServiceRequest`.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use crate::common::{message, ms, secs, timed, wait_until, ProxyBuilder, Upstream};

#[derive(Default)]
struct Store {
    requests: Vec<ExportTraceServiceRequest>,
    /// Requests that were not a valid OTLP/HTTP protobuf export.
    bad: Vec<String>,
}

/// An OTLP/HTTP receiver on a loopback port (HTTP/1.1, keep-alive, content-length or
/// chunked bodies).
struct OtlpReceiver {
    addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl OtlpReceiver {
    fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let addr = listener.local_addr().expect("local_addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let store = Arc::new(Mutex::new(Store::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (store.clone(), stop.clone());
        let accept = thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let st = st.clone();
                        thread::spawn(move || serve(conn, st));
                    }
                    Err(_) => thread::sleep(ms(10)),
                }
            }
        });
        OtlpReceiver {
            addr,
            store,
            stop,
            accept: Some(accept),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> usize {
        self.store.lock().unwrap().requests.len()
    }

    fn bad(&self) -> Vec<String> {
        self.store.lock().unwrap().bad.clone()
    }

    /// Every span received so far with its resource's attributes.
    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        let store = self.store.lock().unwrap();
        let mut out = Vec::new();
        for r in &store.requests {
            for rs in &r.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push((resource.clone(), s.clone()));
                    }
                }
            }
        }
        out
    }

    fn wait_spans(&self, name: &str, n: usize) -> Vec<Span> {
        let count = || self.spans().iter().filter(|(_, s)| s.name == name).count();
        wait_until(secs(10), || count() >= n);
        let spans: Vec<Span> = self
            .spans()
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == name)
            .collect();
        assert_eq!(spans.len(), n, "{name} spans received: {:#?}", self.spans());
        spans
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve(conn: TcpStream, store: Arc<Mutex<Store>>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(secs(30)));
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut length = None;
        let mut chunked = false;
        let mut content_type = String::new();
        let mut close = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let Some((name, value)) = h.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "content-type" => content_type = value.to_string(),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                if reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    return;
                }
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            if reader.read_exact(&mut body).is_err() {
                return;
            }
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        let ok = if !request_line.starts_with("POST ") || path != "/v1/traces" {
            Err(format!("unexpected request {:?}", request_line.trim_end()))
        } else if content_type != "application/x-protobuf" {
            Err(format!("content type {content_type:?}"))
        } else {
            ExportTraceServiceRequest::decode(body.as_slice())
                .map_err(|e| format!("undecodable body: {e}"))
        };
        let status = match ok {
            Ok(req) => {
                store.lock().unwrap().requests.push(req);
                "200 OK"
            }
            Err(e) => {
                store.lock().unwrap().bad.push(e);
                "400 Bad Request"
            }
        };
        // An empty ExportTraceServiceResponse encodes to zero bytes.
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
        );
        if out.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn value_of(kvs: &[KeyValue], key: &str) -> Option<any_value::Value> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|AnyValue { value }| value)
}

fn int(v: i64) -> Option<any_value::Value> {
    Some(any_value::Value::IntValue(v))
}

fn string(v: &str) -> Option<any_value::Value> {
    Some(any_value::Value::StringValue(v.to_string()))
}

/// Every string that appears in a span: its name, attribute keys and values, events.
fn strings_of(span: &Span) -> Vec<String> {
    fn values(kvs: &[KeyValue], out: &mut Vec<String>) {
        for kv in kvs {
            out.push(kv.key.clone());
            if let Some(v) = kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                out.push(match v {
                    any_value::Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                });
            }
        }
    }
    let mut out = vec![span.name.clone()];
    values(&span.attributes, &mut out);
    for e in &span.events {
        out.push(e.name.clone());
        values(&e.attributes, &mut out);
    }
    for l in &span.links {
        values(&l.attributes, &mut out);
    }
    out
}

fn otel_env(b: ProxyBuilder, receiver: &OtlpReceiver) -> ProxyBuilder {
    b.env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
}

fn upstream() -> Upstream {
    Upstream::builder()
        .reply_when("DATA_END", "UPSTREAM-REJECT", "554 5.7.1 Upstream refuses")
        .start()
}

/// One connection with two messages gives a `smtp.connection` span (kind server) and two
/// `smtp.message` children carrying verdict, size, recipient count, filter duration and
/// the upstream's reply code, and no address of any kind.
#[test]
fn connection_and_message_spans() {
    timed(40, || {
        let receiver = OtlpReceiver::start();
        let up = upstream();
        let p = otel_env(ProxyBuilder::new(), &receiver)
            .upstream(&up)
            .set("FilterCommand", "sleep 0.05; cat")
            .start();
        let first = message("first", b"Hello.\r\n");
        let second = message("second", b"UPSTREAM-REJECT\r\nmore text\r\n");
        let mut c = p.open();
        let t1 = c.transaction("<alice@example.org>", &["<bob@example.net>"], &first);
        assert_eq!(t1.final_reply.code, 250);
        let t2 = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>", "<carol@example.net>"],
            &second,
        );
        assert_eq!(t2.final_reply.code, 554);
        assert_eq!(c.cmd("QUIT").code, 221);
        assert!(c.wait_eof(secs(5)));

        let connections = receiver.wait_spans("smtp.connection", 1);
        let messages = receiver.wait_spans("smtp.message", 2);
        assert!(receiver.bad().is_empty(), "{:?}", receiver.bad());
        let conn = &connections[0];
        assert_eq!(conn.kind, SpanKind::Server as i32, "connection span kind");
        assert!(
            conn.parent_span_id.is_empty(),
            "the connection span is a root"
        );
        assert!(
            matches!(
                value_of(&conn.attributes, "connection.id"),
                Some(any_value::Value::IntValue(_))
            ),
            "connection.id: {:?}",
            conn.attributes
        );
        for m in &messages {
            assert_eq!(m.trace_id, conn.trace_id, "same trace");
            assert_eq!(
                m.parent_span_id, conn.span_id,
                "child of the connection span"
            );
            assert!(m.start_time_unix_nano >= conn.start_time_unix_nano);
            assert!(m.end_time_unix_nano <= conn.end_time_unix_nano);
            assert!(
                m.end_time_unix_nano - m.start_time_unix_nano >= 50_000_000,
                "the message span must cover the 50 ms filter run"
            );
        }
        let mut messages = messages;
        messages.sort_by_key(|m| m.start_time_unix_nano);
        let want: [&[(&str, Option<any_value::Value>)]; 2] = [
            &[
                ("message.verdict", string("accepted")),
                ("message.size_bytes", int(first.len() as i64)),
                ("message.recipients", int(1)),
                ("upstream.reply_code", int(250)),
            ],
            &[
                ("message.verdict", string("rejected")),
                ("message.size_bytes", int(second.len() as i64)),
                ("message.recipients", int(2)),
                ("upstream.reply_code", int(554)),
            ],
        ];
        for (m, fields) in messages.iter().zip(want) {
            for (key, v) in fields {
                assert_eq!(
                    &value_of(&m.attributes, key),
                    v,
                    "{key} of {:?}",
                    m.attributes
                );
            }
            match value_of(&m.attributes, "filter.duration_ms") {
                Some(any_value::Value::IntValue(d)) => {
                    assert!((50..10_000).contains(&d), "filter.duration_ms {d}")
                }
                other => panic!("filter.duration_ms: {other:?}"),
            }
        }

        // The resource names the service; no span says anything about an address.
        let all = receiver.spans();
        for (resource, _) in &all {
            assert_eq!(value_of(resource, "service.name"), string("proxsmtpd"));
        }
        for (_, s) in &all {
            assert!(
                s.name.starts_with("smtp."),
                "only the proxy's own spans are exported, got {:?}",
                s.name
            );
            for text in strings_of(s) {
                for f in [
                    "127.0.0.1",
                    "@",
                    "example.org",
                    "example.net",
                    "client.address",
                ] {
                    assert!(!text.contains(f), "span {} carries {text:?}", s.name);
                }
            }
        }
    });
}

/// `PROXSMTPD_TRACE_ADDRESSES=on` puts the client address on the connection span.
#[test]
fn client_address_only_when_opted_in() {
    timed(30, || {
        let receiver = OtlpReceiver::start();
        let up = upstream();
        let p = otel_env(ProxyBuilder::new(), &receiver)
            .upstream(&up)
            .env("PROXSMTPD_TRACE_ADDRESSES", "on")
            .try_start()
            .unwrap_or_else(|e| {
                panic!("the proxy must start with PROXSMTPD_TRACE_ADDRESSES=on: {e}")
            });
        let mut c = p.open();
        c.send_mail(&common::default_message());
        c.cmd("QUIT");
        assert!(c.wait_eof(secs(5)));
        let conn = receiver.wait_spans("smtp.connection", 1);
        assert_eq!(
            value_of(&conn[0].attributes, "client.address"),
            string("127.0.0.1"),
            "{:?}",
            conn[0].attributes
        );
    });
}

/// The standard switches turn export off even with an endpoint set.
#[test]
fn no_export_when_switched_off() {
    timed(30, || {
        let receiver = OtlpReceiver::start();
        let up = upstream();
        for (var, value) in [
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_SDK_DISABLED", "true"),
        ] {
            let mut p = otel_env(ProxyBuilder::new(), &receiver)
                .upstream(&up)
                .env(var, value)
                .start();
            let mut c = p.open();
            assert_eq!(c.send_mail(&common::default_message()).code, 250);
            c.cmd("QUIT");
            assert!(c.wait_eof(secs(5)));
            let status = p.terminate(secs(10)).expect("proxsmtpd did not stop");
            assert!(status.success(), "{status:?}");
        }
        thread::sleep(Duration::from_millis(300));
        assert_eq!(
            receiver.requests(),
            0,
            "spans were exported while switched off"
        );
        assert!(receiver.bad().is_empty(), "{:?}", receiver.bad());
    });
}

/// Each milter call is a `milter` span naming the milter (its configured name) and the
/// stage; the message's stages are children of the `smtp.message` span.
#[test]
fn milter_calls_are_spans_under_the_message() {
    use crate::common::milter::{Script, TestMilter};
    timed(40, || {
        let receiver = OtlpReceiver::start();
        let up = upstream();
        let milter = TestMilter::start(Script::new());
        let p = otel_env(ProxyBuilder::new(), &receiver)
            .upstream(&up)
            .set("Milters", &format!("{}{{name=scan}}", milter.address))
            .start();
        let mut c = p.open();
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>"],
            &message("m", b"x\r\n"),
        );
        assert_eq!(t.final_reply.code, 250);
        assert_eq!(c.cmd("QUIT").code, 221);
        assert!(c.wait_eof(secs(5)));
        let message = &receiver.wait_spans("smtp.message", 1)[0];
        // connect, helo, mail, rcpt, data, 4 headers, eoh, body, eom
        let milters = receiver.wait_spans("milter", 12);
        for s in &milters {
            assert_eq!(value_of(&s.attributes, "milter"), string("scan"));
        }
        let stage = |s: &Span| match value_of(&s.attributes, "stage") {
            Some(any_value::Value::StringValue(v)) => v,
            other => panic!("stage: {other:?}"),
        };
        let eom = milters
            .iter()
            .find(|s| stage(s) == "eom")
            .expect("eom span");
        assert_eq!(eom.parent_span_id, message.span_id, "eom under the message");
        assert_eq!(eom.trace_id, message.trace_id);
        let mail = milters
            .iter()
            .find(|s| stage(s) == "mail")
            .expect("mail span");
        assert_eq!(mail.trace_id, message.trace_id, "same trace as the message");
    });
}
