//! Milters through the real binary: a scriptable milter (tests/it/common/milter.rs) in
//! `Milters`, a real SMTP client and the harness upstream. Verdicts at MAIL and RCPT (per
//! recipient), at the end of message (reject, tempfail, reply code, discard), header, body
//! and envelope modifications as the upstream receives them, the chain with the filter
//! command, quarantine, the failure policy (unreachable, closing, slow milters) and the
//! metrics.

use std::net::SocketAddr;
use std::time::Instant;

use crate::common::metrics::{http_get, metric};
use crate::common::milter::{Act, Script, TestMilter};
use crate::common::proxy::free_port;
use crate::common::{
    file_names, message, secs, timed, wait_until, Client, Proxy, ProxyBuilder, Upstream,
};

/// Every SMFIF_* action: the milter may ask for any modification.
const ALL_ACTIONS: u32 = 0x1FF;

fn packet_data(parts: &[&[u8]]) -> Vec<u8> {
    let mut data = Vec::new();
    for p in parts {
        data.extend_from_slice(p);
        data.push(0);
    }
    data
}

fn indexed(index: u32, name: &str, value: &str) -> Vec<u8> {
    let mut data = index.to_be_bytes().to_vec();
    data.extend(packet_data(&[name.as_bytes(), value.as_bytes()]));
    data
}

fn proxy_with(up: &Upstream, milters: &str) -> ProxyBuilder {
    ProxyBuilder::new().upstream(up).set("Milters", milters)
}

fn client(p: &Proxy) -> Client {
    Client::open(p.addr())
}

fn content_of(up: &Upstream, n: usize) -> String {
    let d = up.wait_delivered(n, secs(5));
    String::from_utf8_lossy(&d[n - 1].content).into_owned()
}

/// A RCPT the milter rejects is refused and never reaches the upstream; the others go on
/// and the message is delivered to them: verdicts per recipient.
#[test]
fn a_rejected_recipient_is_refused_alone() {
    timed(30, || {
        let m = TestMilter::start(Script::new().on(b'R', vec![Act::reply(b'c')]).on(
            b'R',
            vec![Act::reply_code("550 5.1.1 <bad@example.net>: no such user")],
        ));
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address).start();
        let mut c = client(&p);
        assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<good@example.net>").code, 250);
        let r = c.cmd("RCPT TO:<bad@example.net>");
        assert_eq!(r.raw_str(), "550 5.1.1 <bad@example.net>: no such user\r\n");
        assert_eq!(c.cmd("DATA").code, 354);
        let r = c.body(&message("per-rcpt", b"hello\r\n"));
        assert_eq!(r.code, 250, "{r:?}");
        let d = up.wait_delivered(1, secs(5));
        let rcpts: Vec<String> = d[0]
            .rcpts
            .iter()
            .map(|r| String::from_utf8_lossy(r).trim_end().to_string())
            .collect();
        assert_eq!(rcpts, ["RCPT TO:<good@example.net>"]);
        let lines = up.sessions()[0].lines().join("\n");
        assert!(!lines.contains("bad@example.net"), "{lines}");
    });
}

/// A MAIL the milter refuses gets its reply and is not relayed; the session goes on.
#[test]
fn a_rejected_sender_is_not_relayed() {
    timed(30, || {
        let m = TestMilter::start(
            Script::new()
                .on(b'M', vec![Act::reply(b't')])
                .on(b'M', vec![Act::reply(b'c')]),
        );
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address).start();
        let mut c = client(&p);
        let r = c.cmd("MAIL FROM:<spammer@example.org>");
        assert_eq!(
            r.raw_str(),
            "451 4.7.1 Service unavailable - try again later\r\n"
        );
        assert_eq!(c.send_mail(&message("after", b"x\r\n")).code, 250);
        assert_eq!(up.sessions()[0].verb_count("MAIL"), 1);
        // The milter got ABORT between the refused MAIL and the next one.
        let cmds = &m.commands()[0];
        let mails: Vec<usize> = cmds.match_indices('M').map(|(i, _)| i).collect();
        let aborts: Vec<usize> = cmds.match_indices('A').map(|(i, _)| i).collect();
        assert_eq!((mails.len(), aborts.len()), (2, 1), "{cmds}");
        assert!(mails[0] < aborts[0] && aborts[0] < mails[1], "{cmds}");
    });
}

/// The end-of-message verdicts: the client gets the milter's answer, the upstream RSET and
/// no DATA.
#[test]
fn end_of_message_verdicts_answer_the_client() {
    timed(60, || {
        let cases: Vec<(Act, &str)> = vec![
            (Act::reply(b'r'), "550 5.7.1 Command rejected"),
            (
                Act::reply(b't'),
                "451 4.7.1 Service unavailable - try again later",
            ),
            (
                Act::reply_code("554-5.7.1 first line\r\n554 5.7.1 spam detected"),
                "554-5.7.1 first line\r\n554 5.7.1 spam detected",
            ),
        ];
        for (act, want) in cases {
            let m = TestMilter::start(Script::new().on(b'E', vec![act.clone()]));
            let up = Upstream::start();
            let p = proxy_with(&up, &m.address).start();
            let mut c = client(&p);
            let r = c.send_mail(&message("eom", b"x\r\n")).raw_str();
            assert_eq!(r.trim_end(), want, "{act:?}");
            c.assert_in_sync();
            let s = &up.sessions()[0];
            assert_eq!(s.verb_count("DATA"), 0, "{act:?}");
            assert_eq!(s.verb_count("RSET"), 1, "{act:?}");
            assert!(up.delivered().is_empty());
        }
    });
}

/// DISCARD: the client is told 250, nothing is delivered.
#[test]
fn a_discarded_message_gets_250_and_goes_nowhere() {
    timed(30, || {
        let m = TestMilter::start(Script::new().on(b'E', vec![Act::reply(b'd')]));
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address).start();
        let mut c = client(&p);
        let r = c.send_mail(&message("discard", b"x\r\n"));
        assert_eq!(r.code, 250, "{r:?}");
        c.assert_in_sync();
        assert_eq!(up.sessions()[0].verb_count("DATA"), 0);
        assert!(up.delivered().is_empty());
    });
}

/// DISCARD at RCPT discards the whole message: the commands go on, the data gets 250,
/// nothing is delivered.
#[test]
fn a_discard_at_rcpt_discards_the_message() {
    timed(30, || {
        let m = TestMilter::start(Script::new().on(b'R', vec![Act::reply(b'd')]));
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address).start();
        let mut c = client(&p);
        let r = c.send_mail(&message("discard-at-rcpt", b"x\r\n"));
        assert_eq!(r.code, 250, "{r:?}");
        c.assert_in_sync();
        assert!(up.delivered().is_empty());
        assert!(!m.commands()[0].contains('E'), "{:?}", m.commands());
    });
}

/// The milter sees the message as sent: each header field (value without the space after
/// the colon), end of headers, the body in chunks of at most 65535 bytes.
#[test]
fn the_milter_sees_headers_and_the_body_in_chunks() {
    timed(30, || {
        let m = TestMilter::start(Script::new());
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address).start();
        let mut c = client(&p);
        let mut body = Vec::new();
        while body.len() < 200_000 {
            body.extend_from_slice(
                b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n",
            );
        }
        let msg = message("chunks", &body);
        assert_eq!(c.send_mail(&msg).code, 250);
        up.wait_delivered(1, secs(5));
        let got = &m.received()[0];
        let headers: Vec<String> = got
            .iter()
            .filter(|p| p.command == b'L')
            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
            .collect();
        assert_eq!(headers[2], "Subject\0chunks\0");
        let chunks: Vec<usize> = got
            .iter()
            .filter(|p| p.command == b'B')
            .map(|p| p.data.len())
            .collect();
        assert!(chunks.iter().all(|&n| n <= 65535), "{chunks:?}");
        assert_eq!(chunks.iter().sum::<usize>(), body.len());
        let order: String = got
            .iter()
            .map(|p| char::from(p.command))
            .filter(|c| "TLNBE".contains(*c))
            .collect();
        assert!(order.starts_with("TLLLLN"), "{order}");
        assert!(order.ends_with("BE"), "{order}");
    });
}

/// Header and body modifications are applied before delivery, in order.
#[test]
fn header_and_body_changes_reach_the_upstream() {
    timed(30, || {
        let m = TestMilter::start(Script::new().negotiate(ALL_ACTIONS, 0).on(
            b'E',
            vec![
                Act::Packet(b'h', packet_data(&[b"X-Spam-Flag", b"YES"])),
                Act::Packet(b'i', indexed(0, "X-First", "top")),
                Act::Packet(b'm', indexed(1, "Subject", "[SPAM] changed")),
                Act::Packet(b'm', indexed(1, "Message-ID", "")),
                Act::Packet(b'b', b"new body\r\n".to_vec()),
                Act::reply(b'c'),
            ],
        ));
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address).start();
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("orig", b"old body\r\n")).code, 250);
        let got = content_of(&up, 1);
        assert_eq!(
            got,
            "X-First: top\r\nFrom: <alice@example.org>\r\nTo: <bob@example.net>\r\n\
             Subject: [SPAM] changed\r\nX-Spam-Flag: YES\r\n\r\nnew body\r\n"
        );
    });
}

/// CHGFROM, ADDRCPT and DELRCPT redo the upstream transaction with the new envelope.
#[test]
fn envelope_changes_redo_the_upstream_transaction() {
    timed(30, || {
        let m = TestMilter::start(Script::new().negotiate(ALL_ACTIONS, 0).on(
            b'E',
            vec![
                Act::Packet(b'e', packet_data(&[b"<bounces@example.org>"])),
                Act::Packet(b'+', packet_data(&[b"<archive@example.net>"])),
                Act::Packet(b'+', packet_data(&[b"<refused@example.net>"])),
                Act::Packet(b'-', packet_data(&[b"<bob@example.net>"])),
                Act::reply(b'c'),
            ],
        ));
        let up = Upstream::builder()
            .reply_when("RCPT", "refused@", "550 5.1.1 no such user")
            .start();
        let p = proxy_with(&up, &m.address).start();
        let mut c = client(&p);
        let t = c.transaction(
            "<alice@example.org>",
            &["<bob@example.net>", "<carol@example.net>"],
            &message("env", b"x\r\n"),
        );
        assert_eq!(t.final_reply.code, 250, "{:?}", t.final_reply);
        let d = up.wait_delivered(1, secs(5));
        assert_eq!(
            String::from_utf8_lossy(&d[0].mail_from).trim_end(),
            "MAIL FROM:<bounces@example.org>"
        );
        let rcpts: Vec<String> = d[0]
            .rcpts
            .iter()
            .map(|r| String::from_utf8_lossy(r).trim_end().to_string())
            .collect();
        assert_eq!(
            rcpts,
            [
                "RCPT TO:<carol@example.net>",
                "RCPT TO:<archive@example.net>"
            ]
        );
        let verbs = up.sessions()[0].verbs();
        let redo = verbs.iter().position(|v| v == "RSET").expect("RSET");
        // The recipient the upstream refused is left out; the message goes to the others.
        assert_eq!(
            verbs[redo..],
            ["RSET", "MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
        );
    });
}

/// Milters run in order, each seeing the message as the one before left it, then the
/// filter command gets the result.
#[test]
fn milters_chain_with_the_filter_command() {
    timed(30, || {
        let first = TestMilter::start(Script::new().negotiate(ALL_ACTIONS, 0).on(
            b'E',
            vec![
                Act::Packet(b'h', packet_data(&[b"X-First", b"one"])),
                Act::reply(b'c'),
            ],
        ));
        let second = TestMilter::start(Script::new());
        let up = Upstream::start();
        let b = proxy_with(&up, &format!("{}, {}", first.address, second.address));
        let filter = b.script(
            "needs-first.sh",
            "#!/bin/sh\ngrep -q '^X-First: one' \"$EMAIL\" || { echo 'no X-First' >&2; exit 1; }\n",
        );
        let p = b
            .set("FilterCommand", &filter)
            .set("FilterType", "file")
            .start();
        let mut c = client(&p);
        let r = c.send_mail(&message("chain", b"x\r\n"));
        assert_eq!(r.code, 250, "{r:?}");
        assert!(content_of(&up, 1).contains("X-First: one\r\n"));
        let headers: Vec<String> = second.received()[0]
            .iter()
            .filter(|p| p.command == b'L')
            .map(|p| String::from_utf8_lossy(&p.data).into_owned())
            .collect();
        assert!(
            headers.contains(&"X-First\0one\0".to_string()),
            "{headers:?}"
        );
    });
}

/// ACCEPT ends that milter's part in the message only: the next milter is still asked (as
/// Postfix does), so one milter's accept cannot let another's reject through.
#[test]
fn an_accept_ends_only_that_milters_part() {
    timed(30, || {
        let first = TestMilter::start(Script::new().on(b'M', vec![Act::reply(b'a')]));
        let second = TestMilter::start(Script::new().on(b'E', vec![Act::reply(b'r')]));
        let up = Upstream::start();
        let p = proxy_with(&up, &format!("{} {}", first.address, second.address)).start();
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("accepted", b"x\r\n")).code, 550);
        assert!(up.delivered().is_empty());
        let asked: String = first.commands().concat();
        assert!(!asked.contains('R') && !asked.contains('E'), "{asked}");
        // Accepting at end of message does not skip the next milter either.
        let first = TestMilter::start(Script::new().on(b'E', vec![Act::reply(b'a')]));
        let up = Upstream::start();
        let p = proxy_with(&up, &format!("{} {}", first.address, second.address)).start();
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("accepted", b"x\r\n")).code, 550);
    });
}

/// The failure policy: an unreachable milter gets its default action at MAIL (tempfail
/// by default, accept lets mail through without it).
#[test]
fn an_unreachable_milter_gets_its_default_action() {
    timed(30, || {
        let closed = format!("inet:127.0.0.1:{}", free_port());
        let up = Upstream::start();
        let p = proxy_with(&up, &closed).start();
        let mut c = client(&p);
        let r = c.cmd("MAIL FROM:<alice@example.org>");
        assert_eq!(r.code, 451, "{r:?}");
        assert_eq!(up.sessions()[0].verb_count("MAIL"), 0);

        let up = Upstream::start();
        let p = proxy_with(&up, &format!("{closed}{{default_action=accept}}")).start();
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("through", b"x\r\n")).code, 250);
        up.wait_delivered(1, secs(5));
    });
}

/// A milter that closes mid-message, or answers too slowly, or sends a broken packet: the
/// message gets 451 (default tempfail) and nothing is delivered, within the timeouts.
#[test]
fn a_milter_failing_mid_message_never_yields_a_false_250() {
    timed(60, || {
        let cases: Vec<(&str, Script)> = vec![
            ("closes", Script::new().on(b'B', vec![Act::Close])),
            (
                "slow",
                Script::new().on(b'E', vec![Act::Sleep(secs(4)), Act::reply(b'c')]),
            ),
            (
                "broken",
                Script::new().on(b'E', vec![Act::Raw(vec![0, 0, 0, 1, b'Z'])]),
            ),
            (
                "huge",
                Script::new().on(b'E', vec![Act::Raw(vec![0x7f, 0xff, 0xff, 0xff, b'h'])]),
            ),
        ];
        for (what, script) in cases {
            let m = TestMilter::start(script);
            let up = Upstream::start();
            let entry = format!("{}{{content_timeout=1s}}", m.address);
            let p = proxy_with(&up, &entry).start();
            let mut c = client(&p);
            let started = Instant::now();
            let r = c.send_mail(&message(what, b"x\r\n"));
            assert_eq!(r.code, 451, "{what}: {r:?}");
            assert!(
                started.elapsed() < secs(3),
                "{what}: {:?}",
                started.elapsed()
            );
            c.assert_in_sync();
            assert!(up.delivered().is_empty(), "{what}");
        }
    });
}

/// QUARANTINE with MilterQuarantine hold: 250, the message and its envelope in the
/// quarantine directory, nothing delivered; with reject: 554.
#[test]
fn quarantined_messages_are_held_or_refused() {
    timed(30, || {
        let script = Script::new().negotiate(ALL_ACTIONS, 0).on(
            b'E',
            vec![
                Act::Packet(b'q', packet_data(&[b"suspicious attachment"])),
                Act::reply(b'c'),
            ],
        );
        let m = TestMilter::start(script.clone());
        let up = Upstream::start();
        let b = proxy_with(&up, &format!("{}{{name=scanner}}", m.address));
        let dir = b.dir().join("quarantine");
        let p = b
            .set("MilterQuarantineDirectory", dir.to_str().unwrap())
            .start();
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("held", b"payload\r\n")).code, 250);
        c.assert_in_sync();
        assert!(up.delivered().is_empty());
        let names = file_names(&dir);
        assert_eq!(names.len(), 2, "{names:?}");
        let eml = std::fs::read_to_string(dir.join(&names[0])).unwrap();
        assert!(eml.contains("Subject: held") && eml.ends_with("payload\r\n"));
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(&names[1])).unwrap()).unwrap();
        assert_eq!(record["milter"], "scanner");
        assert_eq!(record["reason"], "suspicious attachment");
        assert_eq!(record["sender"], "alice@example.org");
        assert_eq!(record["recipients"][0], "bob@example.net");

        let m = TestMilter::start(script.clone());
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address)
            .set("MilterQuarantine", "reject")
            .start();
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("refused", b"x\r\n")).code, 554);
        assert!(up.delivered().is_empty());

        let m = TestMilter::start(script);
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address)
            .set("MilterQuarantine", "tempfail")
            .start();
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("deferred", b"x\r\n")).code, 451);
        assert!(up.delivered().is_empty());

        // default_action=quarantine: a milter failing mid-message has the message held.
        let m = TestMilter::start(Script::new().on(b'B', vec![Act::Close]));
        let up = Upstream::start();
        let b = proxy_with(&up, &format!("{}{{default_action=quarantine}}", m.address));
        let dir = b.dir().join("held");
        let p = b
            .set("MilterQuarantineDirectory", dir.to_str().unwrap())
            .start();
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("failed", b"x\r\n")).code, 250);
        assert!(up.delivered().is_empty());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    });
}

/// One milter connection per SMTP session, reused for its messages.
#[test]
fn one_milter_connection_serves_the_session() {
    timed(30, || {
        let m = TestMilter::start(Script::new());
        let up = Upstream::start();
        let p = proxy_with(&up, &m.address).start();
        let mut c = client(&p);
        for n in 0..3 {
            let subject = format!("m{n}");
            assert_eq!(c.send_mail(&message(&subject, b"x\r\n")).code, 250);
        }
        c.cmd("QUIT");
        up.wait_delivered(3, secs(5));
        assert!(wait_until(secs(5), || m
            .commands()
            .first()
            .is_some_and(|c| c.ends_with('Q'))));
        assert_eq!(m.commands().len(), 1);
        assert_eq!(m.commands()[0].matches('E').count(), 3);
    });
}

/// The milter metrics, labelled with the configured name.
#[test]
fn milter_metrics_count_replies_durations_and_errors() {
    timed(30, || {
        let m = TestMilter::start(Script::new().on(b'E', vec![Act::reply(b'r')]));
        let up = Upstream::start();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let closed = format!("inet:127.0.0.1:{}", free_port());
        let p = proxy_with(
            &up,
            &format!(
                "{}{{name=spam}}, {closed}{{name=down, default_action=accept}}",
                m.address
            ),
        )
        .set("AdminListen", &admin.to_string())
        .start();
        assert!(wait_until(secs(5), || http_get(&admin, "/livez")
            .is_ok_and(|r| r.0 == 200)));
        let mut c = client(&p);
        assert_eq!(c.send_mail(&message("m", b"x\r\n")).code, 550);
        metric("proxsmtpd_milter_replies_total")
            .label("milter", "spam")
            .label("stage", "eom")
            .label("action", "reject")
            .value(1.0)
            .assert_in(&admin);
        metric("proxsmtpd_milter_duration_seconds_count")
            .label("milter", "spam")
            .label("stage", "mail")
            .value(1.0)
            .assert_in(&admin);
        metric("proxsmtpd_milter_errors_total")
            .label("milter", "down")
            .label("kind", "connect")
            .value(1.0)
            .assert_in(&admin);
        metric("proxsmtpd_messages_total")
            .label("verdict", "rejected")
            .label("source", "filter")
            .value(1.0)
            .assert_in(&admin);
        let (_, text) = http_get(&admin, "/metrics").unwrap();
        assert!(!text.contains("127.0.0.1"), "an address in a label");
    });
}

/// ReadinessCheckMilters: /readyz fails while a milter does not accept connections, and
/// is not tied to milters without it.
#[test]
fn readiness_follows_the_milters_only_when_asked() {
    timed(30, || {
        let up = Upstream::start();
        let closed = format!("inet:127.0.0.1:{}", free_port());
        let live = TestMilter::start(Script::new());
        let cases = [
            (format!("{}, {closed}", live.address), "on", 503),
            (live.address.clone(), "on", 200),
            (closed.clone(), "off", 200),
        ];
        for (milters, check, want) in cases {
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let _p = proxy_with(&up, &milters)
                .set("ReadinessCheckMilters", check)
                .set("AdminListen", &admin.to_string())
                .start();
            assert!(wait_until(secs(5), || http_get(&admin, "/livez")
                .is_ok_and(|r| r.0 == 200)));
            let (status, body) = http_get(&admin, "/readyz?verbose").unwrap();
            assert_eq!(status, want, "{milters} {check}: {body}");
            if want == 503 {
                assert!(body.contains("[-]milters failed"), "{body}");
            }
        }
    });
}
