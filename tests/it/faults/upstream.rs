//! Fault matrix, upstream side: the upstream refuses, closes, answers 4xx/5xx, stalls or
//! talks nonsense at every stage of a transaction. Every case ends with the same check
//! ([`fault_support::Watch::check`]): no 2xx for a message the upstream did not accept, no
//! temp file, process or descriptor left, and a new session still delivers.
//!
//! Each test runs one proxy and one scriptable upstream; session 0 is the warm-up, the
//! faults are planned for sessions 1, 2, ... (one client connection each), and the last
//! session is the check that the proxy still works.

use std::sync::Arc;
use std::time::Duration;

use crate::common::proxy::free_port;
use crate::common::upstream::Reply;
use crate::common::{secs, timed, ProxyBuilder, Upstream};
use crate::fault_support::{reconfigure, stubborn_transaction, Attempt, Watch};

/// One planned fault: the upstream answers `key` (a verb, `BANNER` or `DATA_END`) with
/// `reply` in its session; the client must see a reply starting with `expect` at some point
/// (or, for [`LOST`], a 421 or a close without reply; `""` expects nothing in particular).
struct Fault {
    key: &'static str,
    reply: Reply,
    expect: &'static str,
}

fn fault(key: &'static str, reply: Reply, expect: &'static str) -> Fault {
    Fault { key, reply, expect }
}

/// The upstream went away between two commands: the proxy may close the idle client with
/// or without a 421 (a client that is not waiting for a reply is owed none).
const LOST: &str = "421 or close";

fn saw(a: &Attempt, expect: &str) -> bool {
    expect.is_empty()
        || a.replies.iter().any(|r| r.starts_with(expect))
        || (expect == LOST
            && (a.replies.iter().any(|r| r.starts_with("421"))
                || a.ended.as_deref().is_some_and(|e| e.starts_with("closed"))))
}

/// Runs every fault in its own upstream session (1, 2, ...) behind one proxy, then checks
/// the invariant. Returns what the client saw for each.
fn run_plan(plan: Vec<Fault>, settings: &[(&str, &str)], reply_timeout: Duration) -> Vec<Attempt> {
    let plan = Arc::new(plan);
    let mut keys: Vec<&'static str> = plan.iter().map(|f| f.key).collect();
    keys.sort();
    keys.dedup();
    let mut ub = Upstream::builder();
    for key in keys {
        let plan = plan.clone();
        ub = ub.reply_with(key, move |call| {
            let f = plan.get(call.session.checked_sub(1)?)?;
            (f.key == key).then(|| f.reply.clone())
        });
    }
    let up = ub.start();
    let mut b = ProxyBuilder::new()
        .upstream(&up)
        .set("FilterCommand", "cat");
    for (k, v) in settings {
        b = b.set(k, v);
    }
    let tmp = b.tmp_dir();
    let p = b.start();
    let mut watch = Watch::start(&p, &up, &tmp);
    let mut attempts = Vec::new();
    for (i, f) in plan.iter().enumerate() {
        let id = watch.id(&format!("{}-{}", f.key.to_ascii_lowercase(), i + 1));
        let a = stubborn_transaction(p.addr(), &id, reply_timeout);
        assert!(
            saw(&a, f.expect),
            "fault {} at {}: the client never saw {:?}; it saw {:?} (ended: {:?})",
            i + 1,
            f.key,
            f.expect,
            a.replies,
            a.ended
        );
        attempts.push(a);
        // Upstream sessions are numbered in accept order: the next fault must not start
        // before this one's connection was accepted. (A stalled upstream may still be
        // asleep; the proxy has left it.)
        assert!(
            up.wait(secs(10), |s| s.sessions.len() > i + 1),
            "upstream session {} never opened: {:#?}",
            i + 1,
            up.summary()
        );
    }
    watch.check(&p, &up, &attempts, &[]);
    attempts
}

const QUICK: Duration = Duration::from_secs(10);

#[test]
fn upstream_refuses_the_connection() {
    timed(60, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new()
            .upstream(&up)
            .set("FilterCommand", "cat");
        let tmp = b.tmp_dir();
        let p = b.start();
        let mut watch = Watch::start(&p, &up, &tmp);
        // Nothing listens on a fresh port: connect() is refused.
        reconfigure(&p, "OutAddress", &format!("127.0.0.1:{}", free_port()));
        let mut attempts = Vec::new();
        for _ in 0..3 {
            let a = stubborn_transaction(p.addr(), &watch.id("refused"), QUICK);
            assert!(
                a.replies.first().is_some_and(|r| r.starts_with("421")),
                "expected a 421 greeting: {a:?}"
            );
            assert!(a.ended.is_some(), "connection not closed after 421: {a:?}");
            attempts.push(a);
        }
        reconfigure(&p, "OutAddress", &up.out_address());
        watch.check(&p, &up, &attempts, &[]);
    });
}

#[test]
fn upstream_closes_at_each_stage() {
    timed(90, || {
        run_plan(
            vec![
                fault("BANNER", Reply::close(), "421"),
                fault("EHLO", Reply::close(), "421"),
                fault("MAIL", Reply::close(), "421"),
                fault("MAIL", Reply::text("250 2.1.0 Ok").then_close(), LOST),
                fault("RCPT", Reply::close(), "421"),
                fault("RCPT", Reply::text("250 2.1.5 Ok").then_close(), LOST),
                fault("DATA", Reply::close(), "4"),
                // Closes while the body is on its way.
                fault("DATA", Reply::text("354 go ahead").then_close(), "4"),
                // Takes the whole body, then closes instead of the final reply.
                fault("DATA_END", Reply::close(), "451"),
            ],
            &[],
            QUICK,
        );
    });
}

/// The reply the upstream gives with the given class at every stage.
fn refusals(class: char) -> Vec<Fault> {
    let text = |stage: &str| {
        let code = if class == '4' {
            "451 4.3.0"
        } else {
            "554 5.7.1"
        };
        Reply::text(&format!("{code} refused at {stage}"))
    };
    let expect = if class == '4' { "451" } else { "554" };
    let mut plan = vec![fault("BANNER", text("greeting"), expect)];
    for key in ["EHLO", "MAIL", "RCPT", "DATA", "DATA_END"] {
        plan.push(fault(key, text(key), expect));
    }
    plan
}

#[test]
fn upstream_answers_4xx_at_each_stage() {
    timed(90, || {
        let attempts = run_plan(refusals('4'), &[], QUICK);
        // A refused greeting or EHLO does not end the session here: the upstream stays and
        // accepts the rest, which the client may use. From MAIL on nothing can be accepted
        // after the refusal.
        for a in &attempts[2..] {
            assert!(!a.acknowledged(), "accepted after a 4xx: {a:?}");
        }
    });
}

#[test]
fn upstream_answers_5xx_at_each_stage() {
    timed(90, || {
        let attempts = run_plan(refusals('5'), &[], QUICK);
        for a in &attempts[2..] {
            assert!(!a.acknowledged(), "accepted after a 5xx: {a:?}");
        }
    });
}

#[test]
fn upstream_421_greeting_then_close() {
    timed(60, || {
        run_plan(
            vec![fault(
                "BANNER",
                Reply::text("421 4.3.2 shutting down").then_close(),
                "421 4.3.2 shutting down",
            )],
            &[],
            QUICK,
        );
    });
}

#[test]
fn upstream_stalls_past_timeout() {
    timed(120, || {
        let stall = |r: Reply| r.delay(Duration::from_millis(5000));
        let attempts = run_plan(
            vec![
                fault("BANNER", stall(Reply::text("220 late.test ESMTP")), "421"),
                fault("EHLO", stall(Reply::text("250 late.test")), "421"),
                fault("MAIL", stall(Reply::text("250 2.1.0 Ok")), "421"),
                fault("RCPT", stall(Reply::text("250 2.1.5 Ok")), "421"),
                fault("DATA", stall(Reply::text("354 go ahead")), "4"),
                fault("DATA_END", stall(Reply::text("250 2.0.0 late")), "451"),
                // A multi-line reply that never ends.
                fault("MAIL", Reply::raw(b"250-first line\r\n"), "421"),
                // Silence: the reply never comes.
                fault("RCPT", Reply::silent(), "421"),
            ],
            &[("TimeOut", "2")],
            QUICK,
        );
        for a in &attempts {
            assert!(!a.acknowledged(), "accepted despite a stall: {a:?}");
        }
    });
}

#[test]
fn upstream_sends_overlong_replies() {
    timed(90, || {
        let long = |code: &str| {
            let mut r = format!("{code} ").into_bytes();
            r.extend(std::iter::repeat_n(b'x', 20 * 1024));
            r.extend_from_slice(b"\r\n");
            Reply::raw(&r)
        };
        let attempts = run_plan(
            vec![
                fault("BANNER", long("220"), "421"),
                fault("MAIL", long("250"), "421"),
                fault("DATA", long("354"), "4"),
                fault("DATA_END", long("250"), "451"),
                // 2,000 continuation lines of a harmless size.
                fault("RCPT", Reply::raw(&b"250-more\r\n".repeat(2000)), "421"),
            ],
            &[],
            QUICK,
        );
        for a in &attempts {
            assert!(!a.acknowledged(), "accepted after an overlong reply: {a:?}");
        }
    });
}

/// Replies without a valid code, at every stage.
fn codeless_replies() -> Vec<Fault> {
    vec![
        fault("BANNER", Reply::raw(b"welcome\r\n"), "4"),
        fault("MAIL", Reply::raw(b"hello there\r\n"), "4"),
        fault("RCPT", Reply::raw(b"25\r\n"), "4"),
        fault("DATA", Reply::raw(b"3\r\n"), "4"),
        fault("DATA_END", Reply::raw(b"queued\r\n"), "4"),
        // A continuation line followed by a line without a code.
        fault("RCPT", Reply::raw(b"250-ok\r\ngarbage\r\n"), "4"),
    ]
}

#[test]
fn upstream_sends_replies_without_code() {
    timed(90, || {
        // Only the invariant: whatever reaches the client, it is not an acceptance.
        let plan = codeless_replies()
            .into_iter()
            .map(|f| Fault { expect: "", ..f })
            .collect();
        run_plan(plan, &[], QUICK);
    });
}

#[test]
fn upstream_replies_without_code_never_reach_the_client() {
    timed(90, || {
        let attempts = run_plan(codeless_replies(), &[], QUICK);
        for a in &attempts {
            assert!(
                a.ended.as_deref().is_none_or(|e| !e.contains("malformed")),
                "the client was sent a malformed reply: {a:?}"
            );
        }
    });
}

#[test]
fn upstream_continuation_with_changing_codes_in_the_envelope() {
    timed(60, || {
        // A reply whose lines disagree has no meaning: it is never relayed, the client is
        // told the upstream failed (421) and the session ends.
        run_plan(
            vec![fault(
                "MAIL",
                Reply::raw(b"250-ok\r\n550 5.1.0 but no\r\n"),
                "421",
            )],
            &[],
            QUICK,
        );
    });
}

#[test]
fn upstream_final_reply_with_changing_codes_is_not_an_acceptance() {
    timed(60, || {
        let attempts = run_plan(
            vec![fault(
                "DATA_END",
                Reply::raw(b"550-5.7.1 rejected\r\n250 2.0.0 ok\r\n"),
                "",
            )],
            &[],
            QUICK,
        );
        assert!(!attempts[0].acknowledged(), "{:?}", attempts[0]);
    });
}
