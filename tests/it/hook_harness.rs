//! The hook test peers themselves, checked with a plain HTTP/1.1 client over a raw socket
//! (chunked bodies, TLS and mutual TLS by rustls): the in-process [`HookServer`] and the
//! aiohttp [`HookService`] answer as scripted, refuse a wrong token, serve TLS and refuse a
//! client without a certificate when mutual TLS is on.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;

use rustls::pki_types::ServerName;
use serde_json::{json, Value};

use crate::common::hook_server::{
    client_tls_config, stage_of, write_token, Behaviour, CertFiles, HookServer, HookService,
    HookServiceOptions, Pki, CLIENT_CN,
};
use crate::common::{ms, secs, timed};

/// An answer: status and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is no JSON ({e}): {}", self.body))
    }
}

/// How the client reaches the server.
#[derive(Clone, Default)]
struct Client {
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
}

impl Client {
    fn plain() -> Client {
        Client::default()
    }

    fn tls(pki: &Pki, cert: Option<&CertFiles>) -> Client {
        Client {
            tls: Some(client_tls_config(&pki.ca.cert_file, cert)),
            token: None,
        }
    }

    fn token(mut self, token: &str) -> Client {
        self.token = Some(token.to_string());
        self
    }

    /// POSTs `body` to `path` on 127.0.0.1:`port` in two chunks (`Transfer-Encoding:
    /// chunked`), then reads the answer until the server closes (`Connection: close`).
    fn post(&self, port: u16, path: &str, body: &Value) -> io::Result<Answer> {
        let body = body.to_string().into_bytes();
        let (a, b) = body.split_at(body.len() / 2);
        let mut wire = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n"
        )
        .into_bytes();
        if let Some(t) = &self.token {
            wire.extend_from_slice(format!("Authorization: Bearer {t}\r\n").as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        for chunk in [a, b] {
            wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(secs(5)))?;
        let mut raw = Vec::new();
        match &self.tls {
            None => {
                let mut s = tcp;
                s.write_all(&wire)?;
                s.read_to_end(&mut raw)?;
            }
            Some(config) => {
                let name = ServerName::try_from("127.0.0.1").unwrap();
                let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                s.write_all(&wire)?;
                s.flush()?;
                s.read_to_end(&mut raw)?;
            }
        }
        parse_answer(&raw)
    }
}

/// Status and body of an HTTP/1.1 answer (Content-Length or chunked body).
fn parse_answer(raw: &[u8]) -> io::Result<Answer> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no answer"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad("chunk size"))?;
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    Ok(Answer { status, body })
}

fn data_request(subject: &str) -> Value {
    json!({
        "context": {"stage": "data", "protocol": {"version": 1}},
        "envelope": {"from": {"address": "alice@example.org", "parameters": null},
                     "to": [{"address": "bob@example.net", "parameters": null}]},
        "message": {"headers": [["Subject", format!(" {subject}")]], "serverHeaders": [],
                    "contents": "Hello.\r\n", "size": 8},
    })
}

fn rcpt_request(rcpt: &str) -> Value {
    json!({
        "context": {"stage": "rcpt", "protocol": {"version": 1}},
        "envelope": {"from": {"address": "alice@example.org", "parameters": null},
                     "to": [{"address": rcpt, "parameters": null}]},
    })
}

#[test]
fn server_answers_chunked_requests_as_scripted() {
    timed(10, || {
        let server = HookServer::start(|req| match stage_of(req) {
            "data" if req["message"]["contents"] == "Hello.\r\n" => {
                Behaviour::reject(550, "5.7.1", "no thanks")
            }
            "rcpt" => Behaviour::raw(503, "down"),
            "mail" => Behaviour::raw(200, "{not json"),
            _ => Behaviour::Close,
        });
        let c = Client::plain();
        let a = c
            .post(server.port(), "/check", &data_request("hi"))
            .unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["response"]["status"], 550);
        let a = c
            .post(server.port(), "/check", &rcpt_request("x@y"))
            .unwrap();
        assert_eq!((a.status, a.body.as_str()), (503, "down"));
        let mail = json!({"context": {"stage": "mail"}});
        let a = c.post(server.port(), "/check", &mail).unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "{not json"));
        let closed = c.post(server.port(), "/x", &json!({"context": {}}));
        assert!(closed.is_err(), "a scripted close answered: {closed:?}");

        let r = server.requests();
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[0].method.as_str(), r[0].path.as_str()),
            ("POST", "/check")
        );
        assert!(r[0].chunked(), "{:?}", r[0].headers);
        assert_eq!(r[0].json, data_request("hi"));
        assert_eq!(r[0].header("Content-Type"), Some("application/json"));
        assert_eq!(r[1].stage(), "rcpt");
        assert!(r.iter().all(|r| r.authorized && r.client_cn.is_none()));
        assert_eq!(
            server.url("/p"),
            format!("http://127.0.0.1:{}/p", server.port())
        );
    });
}

#[test]
fn server_delays_and_counts_requests_in_flight() {
    timed(10, || {
        let server = HookServer::start(|_| Behaviour::delay(ms(300), Behaviour::accept()));
        let port = server.port();
        let clients: Vec<_> = (0..3)
            .map(|_| thread::spawn(move || Client::plain().post(port, "/", &data_request("x"))))
            .collect();
        assert!(server.wait_requests(3, secs(3)).is_some());
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap().json()["action"], "accept");
        }
        assert_eq!(server.max_in_flight(), 3);
        assert_eq!(server.in_flight(), 0);
        assert_eq!(server.connections(), 3);
    });
}

#[test]
fn server_refuses_a_wrong_token_read_at_each_request() {
    timed(10, || {
        let dir = tempfile::tempdir().unwrap();
        let token = write_token(dir.path(), "token", "first");
        let server = HookServer::builder().token_file(&token).start();
        let req = data_request("x");
        let ok = Client::plain()
            .token("first")
            .post(server.port(), "/", &req);
        assert_eq!(ok.unwrap().status, 200);
        assert_eq!(
            Client::plain()
                .post(server.port(), "/", &req)
                .unwrap()
                .status,
            401
        );
        write_token(dir.path(), "token", "second");
        let old = Client::plain()
            .token("first")
            .post(server.port(), "/", &req);
        assert_eq!(old.unwrap().status, 401);
        let new = Client::plain()
            .token("second")
            .post(server.port(), "/", &req);
        assert_eq!(new.unwrap().status, 200);
        let seen: Vec<bool> = server.requests().iter().map(|r| r.authorized).collect();
        assert_eq!(seen, [true, false, false, true]);
        assert_eq!(
            server.requests()[0].header("authorization"),
            Some("Bearer first")
        );
    });
}

#[test]
fn server_serves_tls_and_requires_a_client_certificate_for_mtls() {
    timed(10, || {
        let pki = Pki::new();
        let tls = HookServer::builder().tls(&pki.server).start();
        assert!(tls.url("/h").starts_with("https://127.0.0.1:"));
        let a = Client::tls(&pki, None).post(tls.port(), "/h", &data_request("x"));
        assert_eq!(a.unwrap().status, 200);

        let mtls = HookServer::builder()
            .tls(&pki.server)
            .client_ca(&pki.ca.cert_file)
            .start();
        let refused = Client::tls(&pki, None).post(mtls.port(), "/h", &data_request("x"));
        assert!(
            refused.is_err(),
            "answered without a client certificate: {refused:?}"
        );
        assert!(crate::common::wait_until(secs(2), || mtls
            .handshake_failures()
            == 1));
        let a = Client::tls(&pki, Some(&pki.client)).post(mtls.port(), "/h", &data_request("x"));
        assert_eq!(a.unwrap().status, 200);
        let r = mtls.requests();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].client_cn.as_deref(), Some(CLIENT_CN));
    });
}

fn rules() -> Value {
    json!([
        {"stage": "data", "subject": "spam", "answer": {"action": "reject",
            "response": {"status": 550, "enhancedStatus": "5.7.1", "message": "spam"}}},
        {"stage": "rcpt", "rcpt": "broken", "status": 503, "body": "down"},
        {"stage": "rcpt", "rcpt": "slow", "sleep": 0.2, "answer": {"action": "discard"}},
        {"stage": "rcpt", "rcpt": "gone", "close": true},
    ])
}

#[test]
fn service_answers_by_its_rules() {
    timed(15, || {
        let dir = tempfile::tempdir().unwrap();
        let token = write_token(dir.path(), "token", "s3cret");
        let options = HookServiceOptions {
            token_file: Some(token),
            ..Default::default()
        };
        let Some(service) = HookService::start(&rules(), &options) else {
            return;
        };
        let c = Client::plain().token("s3cret");
        let post = |req: &Value| c.post(service.port, "/hook", req);
        let a = post(&data_request("buy spam now")).unwrap();
        assert_eq!(
            (a.status, &a.json()["response"]["message"]),
            (200, &json!("spam"))
        );
        assert_eq!(
            post(&data_request("hello")).unwrap().json(),
            json!({"action": "accept"})
        );
        let a = post(&rcpt_request("broken@example.net")).unwrap();
        assert_eq!((a.status, a.body.as_str()), (503, "down"));
        let a = post(&rcpt_request("slow@example.net")).unwrap();
        assert_eq!(a.json()["action"], "discard");
        let closed = post(&rcpt_request("gone@example.net"));
        assert!(closed.is_err(), "a close rule answered: {closed:?}");
        let a = Client::plain()
            .token("wrong")
            .post(service.port, "/hook", &data_request("x"));
        assert_eq!(a.unwrap().status, 401);

        service.set_rules(&json!([{"answer": {"action": "quarantine"}}]));
        assert_eq!(
            post(&data_request("x")).unwrap().json()["action"],
            "quarantine"
        );

        let r = service
            .wait_requests(7, secs(2))
            .expect("7 requests logged");
        assert_eq!(r[0].json, data_request("buy spam now"));
        assert!(r[0].chunked(), "{:?}", r[0].headers);
        assert_eq!(r[0].path, "/hook");
        assert_eq!(r[2].stage(), "rcpt");
        let authorized: Vec<bool> = r.iter().map(|r| r.authorized).collect();
        assert_eq!(authorized, [true, true, true, true, true, false, true]);
    });
}

#[test]
fn service_serves_tls_and_mtls() {
    timed(15, || {
        let pki = Pki::new();
        let options = HookServiceOptions {
            tls: Some(pki.server.clone()),
            client_ca: Some(pki.ca.cert_file.clone()),
            ..Default::default()
        };
        let Some(service) = HookService::start(&json!([]), &options) else {
            return;
        };
        assert!(service.url("/").starts_with("https://127.0.0.1:"));
        let refused = Client::tls(&pki, None).post(service.port, "/", &data_request("x"));
        assert!(
            refused.is_err(),
            "answered without a client certificate: {refused:?}"
        );
        let a = Client::tls(&pki, Some(&pki.client)).post(service.port, "/", &data_request("x"));
        assert_eq!(a.unwrap().json()["action"], "accept");
        let r = service.wait_requests(1, secs(2)).expect("a request logged");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].client_cn.as_deref(), Some(CLIENT_CN));
    });
}
