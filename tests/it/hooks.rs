//! HTTP hooks through the real binary: a real SMTP client, the harness upstream, and the
//! hook peers of tests/it/common/hook_server.rs (the in-process [`HookServer`] and the
//! aiohttp [`HookService`]). The request JSON, every action and modification, verdicts at
//! MAIL and RCPT, the failure policy, max_size, streaming, concurrency and keep-alive, the
//! place of hooks in FilterOrder, TLS, mTLS and the bearer token, the metrics, and the
//! refusal to start with a hook that cannot be built.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

use crate::common::hook_server::{
    stage_of, write_token, Behaviour, HookServer, HookService, HookServiceOptions, Pki, CLIENT_CN,
};
use crate::common::metrics::{http_get, metric, spool_memory};
use crate::common::proxy::{free_port, run_binary};
use crate::common::upstream::{Message, Reply};
use crate::common::{
    file_names, message, ms, secs, timed, wait_until, Client, Proxy, ProxyBuilder, Upstream,
};

fn hook_proxy(up: &Upstream, hooks: &str) -> ProxyBuilder {
    ProxyBuilder::new().upstream(up).set("Hooks", hooks)
}

/// A proxy with an admin endpoint, for the metrics; returns it and the endpoint.
fn with_admin(b: ProxyBuilder) -> (Proxy, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let p = b.set("AdminListen", &admin.to_string()).start();
    assert!(wait_until(secs(5), || http_get(&admin, "/livez")
        .is_ok_and(|r| r.0 == 200)));
    (p, admin)
}

/// The value of the first header field called `name` in a request's `message.headers`.
fn header_of(request: &Value, name: &str) -> Option<String> {
    request["message"]["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .and_then(|h| h[1].as_str())
        .map(|v| v.trim().to_string())
}

fn subject_of(request: &Value) -> String {
    header_of(request, "Subject").unwrap_or_default()
}

/// The address of the last `envelope.to` entry (at rcpt: the one being asked about).
fn last_rcpt(request: &Value) -> String {
    request["envelope"]["to"]
        .as_array()
        .and_then(|to| to.last())
        .and_then(|r| r["address"].as_str())
        .unwrap_or("")
        .to_string()
}

fn rcpts_of(m: &Message) -> Vec<String> {
    m.rcpts
        .iter()
        .map(|r| String::from_utf8_lossy(r).trim_end().to_string())
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Sends one message (alice -> bob) with this subject on a new session; the final reply.
fn send(p: &Proxy, subject: &str) -> crate::common::ClientReply {
    let mut c = Client::open(p.addr());
    let r = c.send_mail(&message(subject, b"x\r\n"));
    c.cmd("QUIT");
    r
}

// ---------------------------------------------------------------------------------------
// The request.

/// What the hook is sent at each stage: the context (stage, client, server, queue id,
/// protocol 1), the envelope with the MAIL and RCPT parameters (at rcpt the new recipient
/// last), and at data the message: its header fields and contents rebuild the message
/// byte for byte, and its size is the message's.
#[test]
fn the_request_describes_session_envelope_and_message() {
    timed(30, || {
        let hook = HookServer::start(|_| Behaviour::accept());
        let up = Upstream::start();
        let p = hook_proxy(
            &up,
            &format!(
                "{}{{name=policy, stages=mail+rcpt+data}}",
                hook.url("/check")
            ),
        )
        .start();
        let msg: &[u8] = b"From: <alice@example.org>\r\nTo: <bob@example.net>\r\n\
            Subject: first line\r\n second \"line\"\r\nX-Tight:value\r\n\r\n\
            caf\xc3\xa9 \\ back \"quoted\"\ttab\r\n.leading dot\r\n\r\nlast line\r\n";
        let mut c = Client::open(p.addr());
        let r = c.cmd("MAIL FROM:<alice@example.org> SIZE=123 BODY=8BITMIME");
        assert_eq!(r.code, 250, "{r:?}");
        assert_eq!(c.cmd("RCPT TO:<bob@example.net>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<carol@example.net>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        let r = c.body(msg);
        assert_eq!(r.code, 250, "{r:?}");
        let delivered = up.wait_delivered(1, secs(5));
        assert_eq!(delivered[0].content, msg);

        let requests = hook.wait_requests(4, secs(5)).expect("4 requests");
        for r in &requests {
            assert_eq!(r.method, "POST");
            assert_eq!(r.path, "/check");
            assert_eq!(r.header("content-type"), Some("application/json"));
            assert!(r.header("authorization").is_none());
        }
        let stages: Vec<&str> = requests.iter().map(|r| r.stage()).collect();
        assert_eq!(stages, ["mail", "rcpt", "rcpt", "data"]);

        let mail = &requests[0].json;
        assert_eq!(mail["envelope"]["from"]["address"], "alice@example.org");
        assert_eq!(
            mail["envelope"]["from"]["parameters"],
            json!({"SIZE": "123", "BODY": "8BITMIME"})
        );
        assert_eq!(mail["envelope"]["to"], json!([]));
        assert!(mail.get("message").is_none(), "{mail}");

        let rcpt = &requests[2].json;
        assert_eq!(
            rcpt["envelope"]["to"],
            json!([
                {"address": "bob@example.net", "parameters": null},
                {"address": "carol@example.net", "parameters": null}
            ])
        );
        assert!(rcpt.get("message").is_none(), "{rcpt}");

        let data = &requests[3].json;
        let ctx = &data["context"];
        assert_eq!(ctx["stage"], "data");
        assert_eq!(ctx["client"]["ip"], "127.0.0.1");
        assert_eq!(ctx["client"]["port"], c.local_addr().port());
        assert_eq!(ctx["client"]["helo"], "client.example");
        assert!(ctx["client"]["ptr"].is_null(), "{ctx}");
        assert_eq!(ctx["server"]["port"], p.addr().port());
        assert_eq!(ctx["server"]["ip"], "127.0.0.1");
        assert!(ctx["server"]["name"]
            .as_str()
            .is_some_and(|n| !n.is_empty()));
        assert_eq!(ctx["protocol"]["version"], 1);
        assert!(ctx.get("tls").is_none(), "no client TLS: {ctx}");
        assert!(ctx.get("sasl").is_none(), "{ctx}");
        let queue_id = ctx["queue"]["id"].as_str().expect("queue id");
        assert!(!queue_id.is_empty());
        // The queue id of the message is the one in every stage's request.
        for r in &requests {
            assert_eq!(r.json["context"]["queue"]["id"], queue_id, "{}", r.json);
        }
        assert_eq!(data["envelope"]["to"].as_array().unwrap().len(), 2);
        assert_eq!(
            data["envelope"]["from"]["parameters"]["SIZE"], "123",
            "{data}"
        );

        let m = &data["message"];
        assert_eq!(
            m["headers"][2],
            json!(["Subject", " first line\r\n second \"line\""])
        );
        assert_eq!(m["headers"][3], json!(["X-Tight", "value"]));
        assert_eq!(m["serverHeaders"], json!([]));
        let mut rebuilt = Vec::new();
        for h in m["headers"].as_array().unwrap() {
            rebuilt.extend_from_slice(h[0].as_str().unwrap().as_bytes());
            rebuilt.push(b':');
            rebuilt.extend_from_slice(h[1].as_str().unwrap().as_bytes());
            rebuilt.extend_from_slice(b"\r\n");
        }
        rebuilt.extend_from_slice(b"\r\n");
        rebuilt.extend_from_slice(m["contents"].as_str().unwrap().as_bytes());
        assert_eq!(text(&rebuilt), text(msg));
        assert_eq!(m["size"], msg.len());
    });
}

// ---------------------------------------------------------------------------------------
// Actions at the data stage.

/// A reject at data answers with the hook's status, enhanced code and text (a 4xx status
/// is a tempfail), or 550 5.7.1 without a response; nothing is delivered and the upstream
/// never gets DATA.
#[test]
fn a_reject_at_data_answers_with_the_hooks_response() {
    timed(30, || {
        let hook = HookServer::start(|req| match subject_of(req).as_str() {
            "spam" => Behaviour::reject(554, "5.7.1", "Spam detected"),
            "later" => Behaviour::reject(451, "4.7.1", "Greylisted, try later"),
            "plain" => Behaviour::action("reject"),
            _ => Behaviour::accept(),
        });
        let up = Upstream::start();
        let p = hook_proxy(&up, &format!("{}{{name=policy}}", hook.url("/"))).start();
        let mut c = Client::open(p.addr());
        for (subject, want) in [
            ("spam", "554 5.7.1 Spam detected\r\n"),
            ("later", "451 4.7.1 Greylisted, try later\r\n"),
            ("plain", "550 5.7.1 Message rejected\r\n"),
        ] {
            let r = c.send_mail(&message(subject, b"x\r\n"));
            assert_eq!(r.raw_str(), want, "{subject}");
            c.assert_in_sync();
        }
        assert_eq!(c.send_mail(&message("fine", b"x\r\n")).code, 250);
        let d = up.wait_delivered(1, secs(5));
        assert_eq!(d.len(), 1);
        assert!(text(&d[0].content).contains("Subject: fine\r\n"));
        let s = &up.sessions()[0];
        assert_eq!(s.verb_count("DATA"), 1, "{:?}", s.lines());
        assert_eq!(hook.stage_requests("data").len(), 4);
    });
}

/// A discard at data: the client gets 250 (with the message's queue id), nothing is
/// delivered.
#[test]
fn a_discard_at_data_gets_250_and_delivers_nothing() {
    timed(30, || {
        let hook = HookServer::start(|_| Behaviour::action("discard"));
        let up = Upstream::start();
        let p = hook_proxy(&up, &hook.url("/")).start();
        let mut c = Client::open(p.addr());
        let r = c.send_mail(&message("discard", b"x\r\n"));
        assert_eq!(r.code, 250, "{r:?}");
        c.assert_in_sync();
        let request = &hook.stage_requests("data")[0];
        let queue_id = request["context"]["queue"]["id"].as_str().unwrap();
        assert!(r.raw_str().contains(queue_id), "{r:?} / {queue_id}");
        assert_eq!(up.sessions()[0].verb_count("DATA"), 0);
        assert!(up.delivered().is_empty());
    });
}

/// A quarantine at data with MilterQuarantine hold: 250, the message kept as NAME.eml
/// with its record NAME.json in MilterQuarantineDirectory, nothing delivered; with
/// MilterQuarantine reject: 554.
#[test]
fn a_quarantine_at_data_holds_or_refuses_the_message() {
    timed(30, || {
        let answer = || {
            Behaviour::Json(json!({
                "action": "quarantine",
                "response": {"message": "looks like phishing"}
            }))
        };
        let hook = HookServer::start(move |_| answer());
        let up = Upstream::start();
        let b = hook_proxy(&up, &format!("{}{{name=policy}}", hook.url("/")));
        let dir = b.dir().join("quarantine");
        let p = b
            .set("MilterQuarantine", "hold")
            .set("MilterQuarantineDirectory", dir.to_str().unwrap())
            .start();
        let mut c = Client::open(p.addr());
        let msg = message("held", b"payload\r\n");
        assert_eq!(c.send_mail(&msg).code, 250);
        c.assert_in_sync();
        assert!(up.delivered().is_empty());
        let names = file_names(&dir);
        assert_eq!(names.len(), 2, "{names:?}");
        let stem = names[0].strip_suffix(".eml").expect(".eml");
        assert_eq!(names[1], format!("{stem}.json"));
        assert_eq!(std::fs::read(dir.join(&names[0])).unwrap(), msg);
        let record: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(&names[1])).unwrap()).unwrap();
        assert_eq!(record["hook"], "policy", "{record}");
        assert_eq!(record["reason"], "looks like phishing", "{record}");
        assert_eq!(record["sender"], "alice@example.org");
        assert_eq!(record["recipients"], json!(["bob@example.net"]));

        let hook = HookServer::start(move |_| answer());
        let up = Upstream::start();
        let p = hook_proxy(&up, &hook.url("/"))
            .set("MilterQuarantine", "reject")
            .start();
        let mut c = Client::open(p.addr());
        let r = c.send_mail(&message("refused", b"x\r\n"));
        assert_eq!(r.code, 554, "{r:?}");
        c.assert_in_sync();
        assert!(up.delivered().is_empty());
    });
}

// ---------------------------------------------------------------------------------------
// Modifications.

/// The header and contents modifications, as the upstream receives them: addHeader
/// appends; insertHeader puts the field after the first `index` fields (0: at the top, as
/// a milter's INSHEADER, to which Stalwart maps it too); changeHeader and deleteHeader act
/// on the index-th field of that name (1: the first); replaceContents replaces the body
/// with its bare LFs made CRLF.
#[test]
fn header_and_contents_modifications_reach_the_upstream() {
    timed(30, || {
        let hook = HookServer::start(|_| {
            Behaviour::modify(json!([
                {"type": "addHeader", "name": "X-Policy", "value": "checked"},
                {"type": "insertHeader", "index": 1, "name": "X-Second", "value": "second"},
                {"type": "insertHeader", "index": 0, "name": "X-First", "value": "top"},
                {"type": "changeHeader", "index": 1, "name": "Subject", "value": "[EXT] orig"},
                {"type": "deleteHeader", "index": 1, "name": "Message-ID"},
                {"type": "replaceContents", "value": "line one\nline two\r\nline three\n"},
            ]))
        });
        let up = Upstream::start();
        let p = hook_proxy(&up, &hook.url("/")).start();
        let mut c = Client::open(p.addr());
        assert_eq!(c.send_mail(&message("orig", b"old body\r\n")).code, 250);
        let d = up.wait_delivered(1, secs(5));
        assert_eq!(
            text(&d[0].content),
            "X-First: top\r\nFrom: <alice@example.org>\r\nX-Second: second\r\n\
             To: <bob@example.net>\r\n\
             Subject: [EXT] orig\r\nX-Policy: checked\r\n\r\n\
             line one\r\nline two\r\nline three\r\n"
        );
    });
}

/// changeFrom, addRecipient and deleteRecipient: the upstream transaction is begun again
/// with the new sender and recipients.
#[test]
fn envelope_modifications_reach_the_upstream() {
    timed(30, || {
        let hook = HookServer::start(|_| {
            Behaviour::modify(json!([
                {"type": "changeFrom", "value": "bounces@example.org", "parameters": {}},
                {"type": "addRecipient", "value": "archive@example.net", "parameters": {}},
                {"type": "deleteRecipient", "value": "bob@example.net"},
            ]))
        });
        let up = Upstream::start();
        let p = hook_proxy(&up, &hook.url("/")).start();
        let mut c = Client::open(p.addr());
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>", "<carol@example.net>"],
            &message("env", b"x\r\n"),
        );
        assert_eq!(t.final_reply.code, 250, "{:?}", t.final_reply);
        let d = up.wait_delivered(1, secs(5));
        assert_eq!(
            text(&d[0].mail_from).trim_end(),
            "MAIL FROM:<bounces@example.org>"
        );
        assert_eq!(
            rcpts_of(&d[0]),
            [
                "RCPT TO:<carol@example.net>",
                "RCPT TO:<archive@example.net>"
            ]
        );
    });
}

/// When the transaction is begun again after a changeFrom, a recipient the client had
/// accepted at its RCPT and the upstream now refuses (a policy that counts per sender, say)
/// defers the whole message: a 250 would lose that recipient's copy. A refused recipient
/// that the hook added only loses its own copy, and the message goes to the others.
#[test]
fn a_client_recipient_refused_after_changes_defers_the_message() {
    timed(30, || {
        let hook = HookServer::start(|_| {
            Behaviour::modify(json!([
                {"type": "changeFrom", "value": "bounces@example.org", "parameters": {}},
                {"type": "addRecipient", "value": "archive@example.net", "parameters": {}},
            ]))
        });
        // carol@ is accepted the first time, refused on the replay; archive@ always.
        let carol_seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = carol_seen.clone();
        let up = Upstream::builder()
            .reply_with("RCPT", move |call| {
                let line = String::from_utf8_lossy(call.line);
                if line.contains("archive@") {
                    return Some(Reply::text("550 5.1.1 no archive here"));
                }
                let carol = line.contains("carol@")
                    && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0;
                carol.then(|| Reply::text("450 4.7.1 too many recipients for this sender"))
            })
            .start();
        let p = hook_proxy(&up, &hook.url("/")).start();
        let mut c = Client::open(p.addr());
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>", "<carol@example.net>"],
            &message("replay", b"x\r\n"),
        );
        assert_eq!(t.final_reply.code, 451, "{:?}", t.final_reply);
        assert!(up.delivered().is_empty(), "delivered without carol");
        assert_eq!(c.cmd("RSET").code, 250, "the session goes on");

        // Only the hook's own recipient refused: delivered to bob and carol.
        carol_seen.store(0, std::sync::atomic::Ordering::SeqCst);
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>"],
            &message("archive refused", b"x\r\n"),
        );
        assert_eq!(t.final_reply.code, 250, "{:?}", t.final_reply);
        let d = up.wait_delivered(1, secs(5));
        assert_eq!(rcpts_of(&d[0]), ["RCPT TO:<bob@example.net>"]);
    });
}

// ---------------------------------------------------------------------------------------
// Verdicts at MAIL and RCPT.

/// A reject at rcpt refuses that recipient only: it never reaches the upstream, the
/// message goes to the others.
#[test]
fn a_reject_at_rcpt_refuses_that_recipient_only() {
    timed(30, || {
        let hook = HookServer::start(|req| {
            if stage_of(req) == "rcpt" && last_rcpt(req).starts_with("bad@") {
                Behaviour::reject(550, "5.1.1", "no such user here")
            } else {
                Behaviour::accept()
            }
        });
        let up = Upstream::start();
        let p = hook_proxy(&up, &format!("{}{{stages=rcpt}}", hook.url("/"))).start();
        let mut c = Client::open(p.addr());
        assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<good@example.net>").code, 250);
        let r = c.cmd("RCPT TO:<bad@example.net>");
        assert_eq!(r.raw_str(), "550 5.1.1 no such user here\r\n");
        assert_eq!(c.cmd("RCPT TO:<other@example.net>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        assert_eq!(c.body(&message("per-rcpt", b"x\r\n")).code, 250);
        let d = up.wait_delivered(1, secs(5));
        assert_eq!(
            rcpts_of(&d[0]),
            ["RCPT TO:<good@example.net>", "RCPT TO:<other@example.net>"]
        );
        let lines = up.sessions()[0].lines().join("\n");
        assert!(!lines.contains("bad@example.net"), "{lines}");
        // Asked about each recipient, and not at data (not in its stages).
        assert_eq!(hook.stage_requests("rcpt").len(), 3);
        assert!(hook.stage_requests("data").is_empty());
    });
}

/// A reject at mail refuses the sender; the upstream never sees that MAIL and the session
/// goes on.
#[test]
fn a_reject_at_mail_refuses_the_sender() {
    timed(30, || {
        let hook = HookServer::start(|req| {
            let from = req["envelope"]["from"]["address"].as_str().unwrap_or("");
            if from.starts_with("spammer@") {
                Behaviour::reject(550, "5.7.1", "sender blocked")
            } else {
                Behaviour::accept()
            }
        });
        let up = Upstream::start();
        let p = hook_proxy(&up, &format!("{}{{stages=mail}}", hook.url("/"))).start();
        let mut c = Client::open(p.addr());
        let r = c.cmd("MAIL FROM:<spammer@example.org>");
        assert_eq!(r.raw_str(), "550 5.7.1 sender blocked\r\n");
        assert_eq!(c.send_mail(&message("after", b"x\r\n")).code, 250);
        up.wait_delivered(1, secs(5));
        let lines = up.sessions()[0].lines().join("\n");
        assert!(!lines.contains("spammer@"), "{lines}");
        assert_eq!(up.sessions()[0].verb_count("MAIL"), 1);
    });
}

/// A discard at rcpt discards the whole message: the commands go on, the data gets 250,
/// the hook is not asked at data, nothing is delivered.
#[test]
fn a_discard_at_rcpt_discards_the_message() {
    timed(30, || {
        let hook = HookServer::start(|req| match stage_of(req) {
            "rcpt" => Behaviour::action("discard"),
            _ => Behaviour::accept(),
        });
        let up = Upstream::start();
        let p = hook_proxy(&up, &format!("{}{{stages=rcpt+data}}", hook.url("/"))).start();
        let mut c = Client::open(p.addr());
        let r = c.send_mail(&message("discard-at-rcpt", b"x\r\n"));
        assert_eq!(r.code, 250, "{r:?}");
        c.assert_in_sync();
        assert!(up.delivered().is_empty());
        assert!(hook.stage_requests("data").is_empty());
    });
}

/// `disconnect: true` closes the session after the reply, at mail, at rcpt and at data; a
/// client that pipelines gets the replies owed to its earlier commands first, then that
/// reply, then the end of the session.
#[test]
fn disconnect_closes_the_session_after_the_reply() {
    timed(30, || {
        let hook = HookServer::start(|req| {
            let wanted = match subject_of(req).as_str() {
                "bye" => "data",
                _ => "mail",
            };
            let from = req["envelope"]["from"]["address"].as_str().unwrap_or("");
            let evil_rcpt = stage_of(req) == "rcpt" && last_rcpt(req).starts_with("evil@");
            if evil_rcpt
                || stage_of(req) == wanted && (wanted == "data" || from.starts_with("evil@"))
            {
                Behaviour::Json(json!({
                    "action": "reject",
                    "response": {"status": 554, "enhancedStatus": "5.7.1",
                                 "message": "go away", "disconnect": true}
                }))
            } else {
                Behaviour::accept()
            }
        });
        let up = Upstream::start();
        let p = hook_proxy(&up, &format!("{}{{stages=mail+rcpt+data}}", hook.url("/"))).start();
        let mut c = Client::open(p.addr());
        let r = c.cmd("MAIL FROM:<evil@example.org>");
        assert_eq!(r.raw_str(), "554 5.7.1 go away\r\n");
        assert!(c.wait_eof(secs(5)), "still open after a disconnect at mail");

        let mut c = Client::open(p.addr());
        let r = c.send_mail(&message("bye", b"x\r\n"));
        assert_eq!(r.raw_str(), "554 5.7.1 go away\r\n");
        assert!(c.wait_eof(secs(5)), "still open after a disconnect at data");

        let mut c = Client::open(p.addr());
        c.send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<evil@example.net>\r\n");
        assert_eq!(c.reply().code, 250, "the MAIL's own reply");
        assert_eq!(c.reply().raw_str(), "554 5.7.1 go away\r\n");
        assert!(c.wait_eof(secs(5)), "still open after a disconnect at rcpt");
        assert!(up.delivered().is_empty());
    });
}

// ---------------------------------------------------------------------------------------
// The failure policy.

/// A hook failing in each way (too slow, 5xx, JSON that does not parse, closing the
/// connection; and a URL nobody listens on) gives every message `default_action`.
fn failures_get(default_action: &str, want: u16) -> (Proxy, SocketAddr) {
    let hook = HookServer::start(|req| match subject_of(req).as_str() {
        "slow" => Behaviour::delay(secs(3), Behaviour::accept()),
        "error" => Behaviour::raw(500, "{\"action\":\"accept\"}"),
        "broken" => Behaviour::raw(200, "{\"action\": \"accept\""),
        "close" => Behaviour::Close,
        _ => Behaviour::accept(),
    });
    let unreachable = format!("http://127.0.0.1:{}/", free_port());
    let up = Upstream::start();
    let b = hook_proxy(
        &up,
        &format!(
            "{}{{name=flaky, timeout=1s, default_action={default_action}}}, \
             {unreachable}{{name=down, timeout=2s, default_action={default_action}}}",
            hook.url("/")
        ),
    );
    let (p, admin) = with_admin(b);
    // The unreachable hook comes second: the message gets there only when the first one
    // lets it through.
    let mut sent = 0;
    for subject in ["slow", "error", "broken", "close"] {
        let started = Instant::now();
        let r = send(&p, subject);
        sent += 1;
        assert_eq!(r.code, want, "{default_action} / {subject}: {r:?}");
        assert!(
            started.elapsed() < secs(4),
            "{subject}: {:?}",
            started.elapsed()
        );
    }
    if want == 250 {
        let d = up.wait_delivered(sent, secs(5));
        assert_eq!(d.len(), sent);
    } else {
        std::thread::sleep(ms(200));
        assert!(up.delivered().is_empty(), "{default_action}");
    }
    assert_eq!(hook.stage_requests("data").len(), 4);
    (p, admin)
}

#[test]
fn failures_with_tempfail_get_451_and_nothing_is_delivered() {
    timed(30, || {
        let (_p, admin) = failures_get("tempfail", 451);
        for kind in ["timeout", "status", "parse"] {
            metric("proxsmtpd_hook_errors_total")
                .label("hook", "flaky")
                .label("kind", kind)
                .value(1.0)
                .assert_in(&admin);
        }
        // The connection closed without an answer.
        metric("proxsmtpd_hook_errors_total")
            .label("hook", "flaky")
            .label("kind", "connect")
            .value(1.0)
            .assert_in(&admin);
        metric("proxsmtpd_hook_replies_total")
            .label("hook", "flaky")
            .label("stage", "data")
            .label("action", "failed")
            .value(4.0)
            .assert_in(&admin);
        // Never reached: each message was refused by the first hook.
        metric("proxsmtpd_hook_errors_total")
            .label("hook", "down")
            .label("kind", "connect")
            .value(0.0)
            .assert_in(&admin);
    });
}

#[test]
fn failures_with_accept_deliver_the_message() {
    timed(30, || {
        let (_p, admin) = failures_get("accept", 250);
        // Each message also went through the unreachable hook.
        metric("proxsmtpd_hook_errors_total")
            .label("hook", "down")
            .label("kind", "connect")
            .value(4.0)
            .assert_in(&admin);
    });
}

#[test]
fn failures_with_reject_get_a_5xx() {
    timed(30, || {
        failures_get("reject", 550);
    });
}

/// An unreachable hook at mail with the default tempfail: 451, the MAIL never reaches
/// the upstream.
#[test]
fn an_unreachable_hook_at_mail_tempfails_the_command() {
    timed(30, || {
        let up = Upstream::start();
        let url = format!("http://127.0.0.1:{}/", free_port());
        let p = hook_proxy(&up, &format!("{url}{{stages=mail}}")).start();
        let mut c = Client::open(p.addr());
        let r = c.cmd("MAIL FROM:<alice@example.org>");
        assert_eq!(r.code, 451, "{r:?}");
        assert_eq!(up.sessions()[0].verb_count("MAIL"), 0);
        c.assert_in_sync();
    });
}

// ---------------------------------------------------------------------------------------
// max_size.

/// Over max_size the hook is not asked: oversize_action accept delivers the message,
/// reject refuses it; a message within max_size is asked.
#[test]
fn oversize_messages_get_the_oversize_action_without_the_hook() {
    timed(30, || {
        let big = vec![b'a'; 100];
        let mut body = Vec::new();
        for _ in 0..30 {
            body.extend_from_slice(&big);
            body.extend_from_slice(b"\r\n");
        }
        for (action, want) in [("accept", 250), ("reject", 550)] {
            let hook = HookServer::start(|_| Behaviour::accept());
            let up = Upstream::start();
            let b = hook_proxy(
                &up,
                &format!(
                    "{}{{name=sized, max_size=2K, oversize_action={action}}}",
                    hook.url("/")
                ),
            );
            let (p, admin) = with_admin(b);
            let mut c = Client::open(p.addr());
            let r = c.send_mail(&message("big", &body));
            assert_eq!(r.code, want, "{action}: {r:?}");
            assert!(
                hook.requests().is_empty(),
                "{action}: asked about a big one"
            );
            assert_eq!(c.send_mail(&message("small", b"x\r\n")).code, 250);
            assert_eq!(hook.stage_requests("data").len(), 1, "{action}");
            let delivered = up.wait_delivered(if want == 250 { 2 } else { 1 }, secs(5));
            let subjects: Vec<bool> = delivered
                .iter()
                .map(|m| text(&m.content).contains("Subject: big"))
                .collect();
            assert_eq!(subjects.contains(&true), want == 250, "{action}");
            metric("proxsmtpd_hook_replies_total")
                .label("hook", "sized")
                .label("stage", "data")
                .label("action", "skipped")
                .value(1.0)
                .assert_in(&admin);
            // A message over max_size is policy, not a failure of the hook.
            metric("proxsmtpd_hook_errors_total")
                .label("hook", "sized")
                .label("kind", "oversize")
                .value(0.0)
                .assert_in(&admin);
        }
    });
}

// ---------------------------------------------------------------------------------------
// Streaming, concurrency, keep-alive.

/// A message over 256 KiB is streamed (chunked) and its contents arrive byte for byte; a
/// small one is sent with a Content-Length.
#[test]
fn large_messages_are_streamed_small_ones_have_a_length() {
    timed(30, || {
        let hook = HookServer::start(|_| Behaviour::accept());
        let up = Upstream::start();
        let p = hook_proxy(&up, &hook.url("/")).start();
        let mut body = Vec::new();
        let mut n = 0;
        while body.len() < 300 * 1024 {
            body.extend_from_slice(
                format!("line {n}: \"quoted\" back\\slash tab\there caf\u{e9} \u{2603}\r\n")
                    .as_bytes(),
            );
            n += 1;
        }
        let mut c = Client::open(p.addr());
        let big = message("big", &body);
        assert_eq!(c.send_mail(&big).code, 250);
        let small = message("small", b"tiny\r\n");
        assert_eq!(c.send_mail(&small).code, 250);
        up.wait_delivered(2, secs(5));
        let requests = hook.wait_requests(2, secs(5)).unwrap();
        let (large, little) = (&requests[0], &requests[1]);
        assert!(large.chunked(), "{:?}", large.headers);
        assert!(large.header("content-length").is_none());
        let contents = large.json["message"]["contents"]
            .as_str()
            .expect("contents");
        assert!(contents.as_bytes() == body.as_slice(), "contents differ");
        assert_eq!(large.json["message"]["size"], big.len());
        assert!(!little.chunked(), "{:?}", little.headers);
        assert_eq!(
            little.header("content-length"),
            Some(little.body.len().to_string().as_str())
        );
        assert_eq!(little.json["message"]["contents"], "tiny\r\n");
    });
}

/// Where a message waits for its hook: in memory when it is small and SpoolMemory has room
/// (no file in TempDirectory, the gauge shows its buffer), else in a spool file (the gauge
/// does not count it). Four cases, each with the hook holding its messages for a while:
/// a small message; one over the 256 KiB a message may take in memory; SpoolMemory 0; and
/// SpoolMemory 16K with a second message arriving while a first of 10 KB holds most of it.
/// Every message is delivered whole, and memory and files are given back.
#[test]
fn messages_wait_in_memory_within_spool_memory_else_in_a_file() {
    timed(60, || {
        let hook = HookServer::start(|_| Behaviour::delay(ms(1500), Behaviour::accept()));
        let up = Upstream::start();
        let sized = |subject: &str, size: usize| {
            let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstu\r\n";
            let body = line.repeat(size / line.len() + 1);
            message(subject, &body)
        };
        let spawn_send = |addr: SocketAddr, m: Vec<u8>| {
            std::thread::spawn(move || {
                let mut c = Client::open(addr);
                c.set_timeout(secs(15));
                c.send_mail(&m).code
            })
        };
        // (SpoolMemory, message sizes sent one after the other, in memory each)
        let cases: [(&str, &[usize], &[bool]); 4] = [
            ("64M", &[10_000], &[true]),
            ("64M", &[300 * 1024], &[false]),
            ("0", &[10_000], &[false]),
            ("16K", &[10_000, 10_000], &[true, false]),
        ];
        let mut delivered = 0;
        let mut sent = Vec::new();
        for (limit, sizes, in_memory) in cases {
            let (p, admin) = with_admin(hook_proxy(&up, &hook.url("/")).set("SpoolMemory", limit));
            let mut senders = Vec::new();
            let mut memory = 0.0;
            for (i, (&size, &held)) in sizes.iter().zip(in_memory).enumerate() {
                let m = sized(&format!("{limit}-{i}"), size);
                let len = m.len() as f64;
                sent.push(m.clone());
                senders.push(spawn_send(p.addr(), m));
                // Received and waiting for the hook: counted in memory, or in a file.
                let files = senders.len() - in_memory[..=i].iter().filter(|h| **h).count();
                if held {
                    memory += len;
                }
                assert!(
                    wait_until(secs(5), || hook.in_flight() == i + 1),
                    "{limit}: message {i} never reached the hook"
                );
                // Counted by the buffer's capacity, which doubles as the message comes in.
                let gauge = spool_memory(&admin);
                assert!(
                    gauge >= memory && gauge <= 2.0 * memory + 4096.0 * f64::from(held),
                    "{limit}: message {i}: {gauge} bytes for {memory}"
                );
                let spooled = p
                    .tmp_files()
                    .iter()
                    .filter(|f| f.starts_with("proxsmtpd."))
                    .count();
                assert_eq!(spooled, files, "{limit}: {:?}", p.tmp_files());
            }
            for s in senders {
                assert_eq!(s.join().unwrap(), 250, "{limit}");
            }
            delivered += sizes.len();
            up.wait_delivered(delivered, secs(5));
            assert!(
                wait_until(secs(3), || spool_memory(&admin) == 0.0),
                "{limit}: memory not given back"
            );
            p.assert_tmp_clean();
        }
        let mut got: Vec<Vec<u8>> = up.delivered().into_iter().map(|d| d.content).collect();
        got.sort();
        sent.sort();
        assert!(got == sent, "the messages delivered differ from those sent");
    });
}

/// Sends one message from each of `n` clients at once; their final reply codes.
fn send_at_once(p: &Proxy, n: usize) -> Vec<u16> {
    let addr = p.addr();
    let threads: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Client::open(addr);
                c.set_timeout(secs(15));
                c.send_mail(&message(&format!("m{i}"), b"x\r\n")).code
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// With concurrency=2 and a slow hook, six clients sending at once never have more than
/// two calls in flight, and every message goes through.
#[test]
fn concurrency_bounds_the_calls_in_flight() {
    timed(30, || {
        let hook = HookServer::start(|_| Behaviour::delay(ms(700), Behaviour::accept()));
        let up = Upstream::start();
        let p = hook_proxy(
            &up,
            &format!("{}{{concurrency=2, timeout=10s}}", hook.url("/")),
        )
        .start();
        let codes = send_at_once(&p, 6);
        assert_eq!(codes, [250; 6]);
        up.wait_delivered(6, secs(5));
        assert_eq!(hook.max_in_flight(), 2);
        assert_eq!(hook.requests().len(), 6);
    });
}

/// The wait for a free slot counts against the timeout: with two slots, a hook taking
/// 1.5 s and a timeout of 2 s, six messages at once cannot all be answered in time; those
/// that are not get the default action (451), and within the timeout.
#[test]
fn the_wait_for_a_slot_counts_against_the_timeout() {
    timed(30, || {
        let hook = HookServer::start(|_| Behaviour::delay(ms(1500), Behaviour::accept()));
        let up = Upstream::start();
        let p = hook_proxy(
            &up,
            &format!("{}{{concurrency=2, timeout=2s}}", hook.url("/")),
        )
        .start();
        let started = Instant::now();
        let codes = send_at_once(&p, 6);
        let ok = codes.iter().filter(|&&c| c == 250).count();
        let failed = codes.iter().filter(|&&c| c == 451).count();
        assert_eq!(ok + failed, 6, "{codes:?}");
        assert!(ok >= 1 && failed >= 2, "{codes:?}");
        assert!(started.elapsed() < secs(5), "{:?}", started.elapsed());
        // The proxy keeps at most two calls going; a call it gave up on (sent, then timed
        // out) may still be waiting in the hook when the freed slot's next call arrives.
        let abandoned = hook.requests().len() - ok;
        assert!(
            hook.max_in_flight() <= 2 + abandoned,
            "{} in flight, {abandoned} abandoned",
            hook.max_in_flight()
        );
        std::thread::sleep(ms(300));
        assert_eq!(up.delivered().len(), ok);
    });
}

/// Messages in sequence reuse the pooled connections: fewer TCP connections than
/// messages.
#[test]
fn keep_alive_reuses_connections() {
    timed(30, || {
        let hook = HookServer::start(|_| Behaviour::accept());
        let up = Upstream::start();
        let p = hook_proxy(&up, &hook.url("/")).start();
        for i in 0..4 {
            assert_eq!(send(&p, &format!("seq{i}")).code, 250);
        }
        up.wait_delivered(4, secs(5));
        assert_eq!(hook.requests().len(), 4);
        assert!(hook.connections() < 4, "{} connections", hook.connections());
    });
}

// ---------------------------------------------------------------------------------------
// FilterOrder.

/// By default the hook comes before the FilterCommand (which sees the hook's header);
/// with `command hooks milters` the hook sees what the command changed; a pipe filter after
/// the hook reads the changed message on its stdin.
#[test]
fn filter_order_places_the_hook_before_or_after_the_command() {
    timed(30, || {
        let hook = HookServer::start(|req| {
            if header_of(req, "X-Cmd").is_some() {
                Behaviour::modify(
                    json!([{"type": "addHeader", "name": "X-Hook", "value": "after-cmd"}]),
                )
            } else {
                Behaviour::modify(json!([{"type": "addHeader", "name": "X-Hook", "value": "yes"}]))
            }
        });
        let file_filter = "#!/bin/sh\n\
            grep -q '^X-Hook: yes' \"$EMAIL\" && h=seen || h=unseen\n\
            { printf 'X-Cmd: %s\\r\\n' \"$h\"; cat \"$EMAIL\"; } > \"$EMAIL.new\" && \
            cat \"$EMAIL.new\" > \"$EMAIL\" && rm -f \"$EMAIL.new\"\n";
        // A pipe filter after the hook reads the message as the hook changed it (kept in
        // memory, then written to a file for the command's stdin).
        let pipe_filter = "#!/bin/sh\n\
             t=$(mktemp) && cat > \"$t\" || exit 1\n\
             grep -q '^X-Hook: yes' \"$t\" && h=seen || h=unseen\n\
             printf 'X-Pipe: %s\\r\\n' \"$h\"; cat \"$t\"; rm -f \"$t\"\n";
        // One message through a new proxy with this filter (type, script, FilterOrder);
        // what the upstream got.
        let run = |kind: &str, script: &str, order: Option<&str>, subject: &str| {
            let up = Upstream::start();
            let b = hook_proxy(&up, &hook.url("/"));
            let filter = b.script("filter.sh", script);
            let mut b = b.set("FilterCommand", &filter).set("FilterType", kind);
            if let Some(order) = order {
                b = b.set("FilterOrder", order);
            }
            let p = b.start();
            assert_eq!(send(&p, subject).code, 250);
            let got = text(&up.wait_delivered(1, secs(5))[0].content);
            p.assert_tmp_clean();
            got
        };

        let got = run("file", file_filter, None, "default-order");
        assert!(got.starts_with("X-Cmd: seen\r\n"), "{got}");
        assert!(got.contains("X-Hook: yes\r\n"), "{got}");

        let got = run(
            "file",
            file_filter,
            Some("command hooks milters"),
            "command-first",
        );
        assert!(got.starts_with("X-Cmd: unseen\r\n"), "{got}");
        assert!(got.contains("X-Hook: after-cmd\r\n"), "{got}");
        let last = hook.stage_requests("data").pop().unwrap();
        assert_eq!(header_of(&last, "X-Cmd").as_deref(), Some("unseen"));

        let got = run("pipe", pipe_filter, None, "pipe-after-hook");
        assert!(got.starts_with("X-Pipe: seen\r\n"), "{got}");
        assert!(got.contains("X-Hook: yes\r\n"), "{got}");
        assert!(got.ends_with("\r\nx\r\n"), "{got}");
    });
}

// ---------------------------------------------------------------------------------------
// TLS, mTLS, the token.

/// An https hook whose certificate chains to `ca_file` is asked.
#[test]
fn an_https_hook_with_the_test_ca_is_asked() {
    timed(30, || {
        let pki = Pki::new();
        let hook = HookServer::builder()
            .tls(&pki.server)
            .respond(|_| Behaviour::reject(550, "5.7.1", "seen over tls"))
            .start();
        let up = Upstream::start();
        let url = hook.url("/check");
        assert!(url.starts_with("https://"));
        let p = hook_proxy(
            &up,
            &format!("{url}{{ca_file={}}}", pki.ca.cert_file.display()),
        )
        .start();
        let r = send(&p, "tls");
        assert_eq!(r.raw_str(), "550 5.7.1 seen over tls\r\n");
        assert_eq!(hook.requests().len(), 1);
        assert!(hook.requests()[0].client_cn.is_none());
    });
}

/// Without the CA the hook's certificate is refused (the default action, a tls error);
/// `tls_verify=no` accepts it.
#[test]
fn an_untrusted_certificate_is_refused_unless_tls_verify_is_off() {
    timed(30, || {
        let pki = Pki::new();
        let hook = HookServer::builder()
            .tls(&pki.server)
            .respond(|_| Behaviour::accept())
            .start();
        let up = Upstream::start();
        let (p, admin) = with_admin(hook_proxy(
            &up,
            &format!("{}{{name=strict}}", hook.url("/")),
        ));
        assert_eq!(send(&p, "untrusted").code, 451);
        assert!(hook.requests().is_empty());
        assert!(up.delivered().is_empty());
        // The server records the refused handshake when the client's alert reaches it,
        // which can be just after the client's 451.
        assert!(
            wait_until(secs(5), || hook.handshake_failures() >= 1),
            "the hook server saw no refused handshake"
        );
        metric("proxsmtpd_hook_errors_total")
            .label("hook", "strict")
            .label("kind", "tls")
            .value(1.0)
            .assert_in(&admin);

        // The scheme in capitals is https all the same, certificate checked.
        let up = Upstream::start();
        let url = hook.url("/").replacen("https://", "HTTPS://", 1);
        let p = hook_proxy(&up, &format!("{url}{{name=capitals}}")).start();
        assert_eq!(send(&p, "untrusted, in capitals").code, 451);
        assert!(hook.requests().is_empty());
        assert!(up.delivered().is_empty());

        let up = Upstream::start();
        let p = hook_proxy(&up, &format!("{}{{tls_verify=no}}", hook.url("/"))).start();
        assert_eq!(send(&p, "unverified").code, 250);
        up.wait_delivered(1, secs(5));
        assert_eq!(hook.requests().len(), 1);
    });
}

/// A TLS hook server that requires a client certificate from `pki`'s CA and accepts.
fn mtls_hook(pki: &Pki) -> HookServer {
    HookServer::builder()
        .tls(&pki.server)
        .client_ca(&pki.ca.cert_file)
        .respond(|_| Behaviour::accept())
        .start()
}

/// A proxy in front of `up` asking `hook`, trusting `pki`'s CA, presenting `cert`/`key`.
fn mtls_proxy(up: &Upstream, hook: &HookServer, pki: &Pki, cert: &Path, key: &Path) -> Proxy {
    hook_proxy(
        up,
        &format!(
            "{}{{ca_file={}, client_certificate={}, client_key={}}}",
            hook.url("/"),
            pki.ca.cert_file.display(),
            cert.display(),
            key.display()
        ),
    )
    .start()
}

/// mTLS: the proxy presents client_certificate/client_key (the server records its CN);
/// without them, a server requiring a client certificate refuses the handshake and the
/// message gets the default action.
#[test]
fn mtls_presents_the_client_certificate() {
    timed(30, || {
        let pki = Pki::new();
        let hook = mtls_hook(&pki);
        let up = Upstream::start();
        let p = mtls_proxy(&up, &hook, &pki, &pki.client.cert, &pki.client.key);
        assert_eq!(send(&p, "mtls").code, 250);
        up.wait_delivered(1, secs(5));
        let requests = hook.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].client_cn.as_deref(), Some(CLIENT_CN));

        let up = Upstream::start();
        let p = hook_proxy(
            &up,
            &format!(
                "{}{{ca_file={}}}",
                hook.url("/"),
                pki.ca.cert_file.display()
            ),
        )
        .start();
        let failures = hook.handshake_failures();
        assert_eq!(send(&p, "no-client-cert").code, 451);
        assert!(up.delivered().is_empty());
        assert_eq!(hook.requests().len(), 1, "a request without a client cert");
        assert!(
            wait_until(secs(5), || hook.handshake_failures() > failures),
            "the hook server saw no refused handshake"
        );
    });
}

/// A renewed client certificate and key (a cert-manager renewal, a new key each time) are
/// presented from the next check of the files on, without a restart or a reload.
#[test]
fn a_renewed_client_certificate_is_presented_without_a_restart() {
    timed(60, || {
        let pki = Pki::new();
        let hook = mtls_hook(&pki);
        let mounted = tempfile::tempdir().unwrap();
        let (cert, key) = (
            mounted.path().join("tls.crt"),
            mounted.path().join("tls.key"),
        );
        std::fs::copy(&pki.client.cert, &cert).unwrap();
        std::fs::copy(&pki.client.key, &key).unwrap();
        let up = Upstream::start();
        let p = mtls_proxy(&up, &hook, &pki, &cert, &key);
        assert_eq!(send(&p, "first").code, 250);
        assert_eq!(hook.requests()[0].client_cn.as_deref(), Some(CLIENT_CN));
        // Renewed: the certificate written before its key, as a non-atomic writer may.
        let renewed = pki.ca.client_cert("proxsmtpd-client-renewed");
        std::fs::copy(&renewed.cert, &cert).unwrap();
        std::fs::copy(&renewed.key, &key).unwrap();
        let mut sent = 1;
        let presented = wait_until(secs(15), || {
            std::thread::sleep(ms(250));
            sent += 1;
            assert_eq!(send(&p, &format!("after renewal {sent}")).code, 250);
            let requests = hook.requests();
            requests.last().and_then(|r| r.client_cn.as_deref()) == Some("proxsmtpd-client-renewed")
        });
        assert!(presented, "the renewed certificate was never presented");
        up.wait_delivered(sent, secs(5));
        assert!(p.log().contains("TLS files changed"), "{}", p.log());
    });
}

/// token_file is sent as a bearer token; when the file changes, the new token is used
/// within about two seconds, and the server (which checks the same file) refuses the old
/// one meanwhile.
#[test]
fn the_token_is_sent_and_follows_its_file() {
    timed(30, || {
        let dir = tempfile::tempdir().unwrap();
        let token = write_token(dir.path(), "token", "first-secret");
        let hook = HookServer::builder()
            .token_file(&token)
            .respond(|_| Behaviour::accept())
            .start();
        let up = Upstream::start();
        let p = hook_proxy(
            &up,
            &format!("{}{{token_file={}}}", hook.url("/"), token.display()),
        )
        .start();
        assert_eq!(send(&p, "first").code, 250);
        let r = &hook.requests()[0];
        assert_eq!(r.header("authorization"), Some("Bearer first-secret"));
        assert!(r.authorized);

        write_token(dir.path(), "token", "second-secret");
        let rotated = Instant::now();
        let mut codes = Vec::new();
        loop {
            let code = send(&p, "after").code;
            codes.push(code);
            if code == 250 {
                break;
            }
            assert_eq!(code, 451, "{codes:?}");
            assert!(rotated.elapsed() < secs(3), "{codes:?}");
            std::thread::sleep(ms(200));
        }
        assert!(rotated.elapsed() < ms(2500), "{:?}", rotated.elapsed());
        let requests = hook.requests();
        let last = requests.last().unwrap();
        assert_eq!(last.header("authorization"), Some("Bearer second-secret"));
        assert!(last.authorized);
        // Every refused request carried the old token.
        for r in &requests[1..requests.len() - 1] {
            assert!(!r.authorized);
            assert_eq!(r.header("authorization"), Some("Bearer first-secret"));
        }
        assert_eq!(up.delivered().len(), 2);
    });
}

// ---------------------------------------------------------------------------------------
// The aiohttp service.

fn service_rules() -> Value {
    json!([
        {"stage": "rcpt", "rcpt": "blocked@",
         "answer": {"action": "reject",
                    "response": {"status": 550, "enhancedStatus": "5.1.1",
                                 "message": "mailbox blocked"}}},
        {"stage": "data", "subject": "VIAGRA",
         "answer": {"action": "reject",
                    "response": {"status": 554, "enhancedStatus": "5.7.1",
                                 "message": "spam subject"}}},
        {"stage": "data",
         "answer": {"action": "accept",
                    "modifications": [{"type": "addHeader", "name": "X-Checked-By",
                                       "value": "aiohttp"}]}}
    ])
}

/// Reject by subject, accept with a header added, a recipient refused at rcpt, against the
/// Python service.
fn service_behaves(service: &HookService, extra: &str) {
    let up = Upstream::start();
    let p = hook_proxy(
        &up,
        &format!(
            "{}{{name=py, stages=rcpt+data{extra}}}",
            service.url("/hook")
        ),
    )
    .start();
    let mut c = Client::open(p.addr());
    let r = c.send_mail(&message("cheap VIAGRA now", b"x\r\n"));
    assert_eq!(
        r.raw_str(),
        "554 5.7.1 spam subject\r\n",
        "{}",
        service.log()
    );
    assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@example.net>").code, 250);
    let r = c.cmd("RCPT TO:<blocked@example.net>");
    assert_eq!(r.raw_str(), "550 5.1.1 mailbox blocked\r\n");
    assert_eq!(c.cmd("DATA").code, 354);
    assert_eq!(c.body(&message("hello", b"fine\r\n")).code, 250);
    let d = up.wait_delivered(1, secs(5));
    assert_eq!(d.len(), 1);
    assert_eq!(rcpts_of(&d[0]), ["RCPT TO:<bob@example.net>"]);
    let got = text(&d[0].content);
    assert!(got.contains("X-Checked-By: aiohttp\r\n"), "{got}");
    assert!(got.contains("Subject: hello\r\n"), "{got}");
    let requests = service.wait_requests(5, secs(5)).unwrap();
    assert!(requests.iter().all(|r| r.authorized), "{}", service.log());
}

#[test]
fn the_aiohttp_service_rejects_accepts_and_refuses_recipients() {
    timed(30, || {
        let Some(service) = HookService::start(&service_rules(), &HookServiceOptions::default())
        else {
            return;
        };
        service_behaves(&service, "");
    });
}

#[test]
fn the_aiohttp_service_over_mtls_with_a_token() {
    timed(30, || {
        let pki = Pki::new();
        let token = write_token(pki.dir.path(), "token", "py-secret");
        let options = HookServiceOptions {
            tls: Some(pki.server.clone()),
            client_ca: Some(pki.ca.cert_file.clone()),
            token_file: Some(token.clone()),
        };
        let Some(service) = HookService::start(&service_rules(), &options) else {
            return;
        };
        assert!(service.url("/").starts_with("https://"));
        service_behaves(
            &service,
            &format!(
                ", ca_file={}, client_certificate={}, client_key={}, token_file={}",
                pki.ca.cert_file.display(),
                pki.client.cert.display(),
                pki.client.key.display(),
                token.display()
            ),
        );
        let requests = service.requests();
        assert!(requests
            .iter()
            .all(|r| r.client_cn.as_deref() == Some(CLIENT_CN)
                && r.header("authorization") == Some("Bearer py-secret")));
    });
}

// ---------------------------------------------------------------------------------------
// Metrics.

/// Replies by hook, stage and action, the duration histogram, and errors by kind.
#[test]
fn hook_metrics_count_replies_durations_and_errors() {
    timed(30, || {
        let hook = HookServer::start(|req| match (stage_of(req), subject_of(req).as_str()) {
            ("data", "spam") => Behaviour::reject(550, "5.7.1", "spam"),
            ("data", "gone") => Behaviour::action("discard"),
            ("data", "broken") => Behaviour::raw(200, "not json"),
            _ => Behaviour::accept(),
        });
        let up = Upstream::start();
        let (p, admin) = with_admin(hook_proxy(
            &up,
            &format!("{}{{name=policy, stages=mail+data}}", hook.url("/")),
        ));
        let mut c = Client::open(p.addr());
        for (subject, want) in [
            ("ham", 250),
            ("spam", 550),
            ("gone", 250),
            ("broken", 451),
            ("ham2", 250),
        ] {
            let r = c.send_mail(&message(subject, b"x\r\n"));
            assert_eq!(r.code, want, "{subject}: {r:?}");
        }
        let replies = |stage: &str, action: &str, n: f64| {
            metric("proxsmtpd_hook_replies_total")
                .label("hook", "policy")
                .label("stage", stage)
                .label("action", action)
                .value(n)
                .assert_in(&admin);
        };
        replies("mail", "accept", 5.0);
        replies("data", "accept", 2.0);
        replies("data", "reject", 1.0);
        replies("data", "discard", 1.0);
        replies("data", "failed", 1.0);
        metric("proxsmtpd_hook_duration_seconds_count")
            .label("hook", "policy")
            .label("stage", "data")
            .value(5.0)
            .assert_in(&admin);
        metric("proxsmtpd_hook_duration_seconds_count")
            .label("hook", "policy")
            .label("stage", "mail")
            .value(5.0)
            .assert_in(&admin);
        metric("proxsmtpd_hook_errors_total")
            .label("hook", "policy")
            .label("kind", "parse")
            .value(1.0)
            .assert_in(&admin);
        metric("proxsmtpd_hook_errors_total")
            .label("hook", "policy")
            .label("kind", "timeout")
            .value(0.0)
            .assert_in(&admin);
        let (_, body) = http_get(&admin, "/metrics").unwrap();
        assert!(!body.contains("127.0.0.1"), "an address in a label");
    });
}

// ---------------------------------------------------------------------------------------
// Start-up.

/// Runs the binary on `b`'s configuration; its exit status and stderr (it must exit).
fn run_config(b: &ProxyBuilder) -> (std::process::ExitStatus, String) {
    let conf = b.dir().join("refused.conf");
    std::fs::write(&conf, b.config_text()).unwrap();
    let out = run_binary(
        &crate::common::binary(),
        &["-d", "1", "-f", conf.to_str().unwrap()],
        secs(10),
    )
    .expect("the proxy kept running with a broken hook");
    let mut log = text(&out.stderr);
    log.push_str(&text(&out.stdout));
    (out.status, log)
}

/// A hook whose ca_file or token_file cannot be read refuses start: the binary exits
/// non-zero and says Hooks.
#[test]
fn a_hook_that_cannot_be_built_refuses_start() {
    timed(30, || {
        let up = Upstream::start();
        let missing = Path::new("/nonexistent/proxsmtpd-hook");
        for option in [
            format!("ca_file={}/ca.pem", missing.display()),
            format!("token_file={}/token", missing.display()),
        ] {
            let b = hook_proxy(
                &up,
                &format!("https://127.0.0.1:{}/{{{option}}}", free_port()),
            );
            let (status, log) = run_config(&b);
            assert!(!status.success(), "{option}: {log}");
            assert!(log.contains("Hooks"), "{option}: {log}");
            assert!(
                log.contains("/nonexistent/proxsmtpd-hook"),
                "{option}: {log}"
            );
        }
    });
}
