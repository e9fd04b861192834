//! Shadow filters through the real binary: a hook, a milter or the filter command marked
//! shadow sees the traffic, its verdict is counted beside the live chain's in
//! `proxsmtpd_shadow_verdicts_total` and written on the message's log line, and it never
//! decides, delays or changes a message. The proxies run with `Container: on`, whose JSON
//! log lines carry the message line's fields (the text line keeps the original's format).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::hook_server::{Behaviour, HookServer};
use crate::common::metrics::{http_get, metric, parse, spool_memory};
use crate::common::milter::{Act, Script, TestMilter};
use crate::common::proxy::free_port;
use crate::common::{message, secs, timed, wait_until, Client, Proxy, ProxyBuilder, Upstream};

/// A proxy in front of `up` with its admin listener (metrics) on a free port.
fn with_admin(up: &Upstream) -> (ProxyBuilder, SocketAddr) {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let b = ProxyBuilder::new()
        .upstream(up)
        .set("AdminListen", &admin.to_string())
        .set("Container", "on");
    (b, admin)
}

fn started(b: ProxyBuilder, admin: &SocketAddr) -> Proxy {
    let p = b.start();
    assert!(
        wait_until(secs(5), || http_get(admin, "/livez")
            .is_ok_and(|r| r.0 == 200)),
        "the admin listener never answered"
    );
    p
}

/// The shadow verdict counter for `filter` with these live and shadow words.
fn verdicts(admin: &SocketAddr, filter: &str, live: &str, shadow: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").unwrap_or_default();
    metric("proxsmtpd_shadow_verdicts_total")
        .label("filter", filter)
        .label("live", live)
        .label("shadow", shadow)
        .find_value(&text)
        .unwrap_or(0.0)
}

/// Every `proxsmtpd_shadow_verdicts_total` series of `filter`, as `live/shadow = value`.
fn all_verdicts(admin: &SocketAddr, filter: &str) -> Vec<(String, String, f64)> {
    let (_, text) = http_get(admin, "/metrics").unwrap_or_default();
    parse(&text)
        .into_iter()
        .filter(|s| s.name == "proxsmtpd_shadow_verdicts_total")
        .filter(|s| s.labels.iter().any(|(k, v)| k == "filter" && v == filter))
        .map(|s| {
            let get = |name: &str| {
                s.labels
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            (get("live"), get("shadow"), s.value)
        })
        .collect()
}

/// The `shadow` field of each message log line (JSON, target `proxsmtpd::message`).
fn logged_shadows(p: &Proxy) -> Vec<String> {
    p.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "proxsmtpd::message")
        .map(|v| v["shadow"].as_str().unwrap_or("(none)").to_string())
        .collect()
}

/// Waits until at least `n` message log lines carry `shadow` (`filter:verdict`).
/// `n` messages of `filter` counted with these (live, shadow) verdicts, and logged with
/// `shadow=filter:verdict`.
fn assert_verdicts(admin: &SocketAddr, p: &Proxy, filter: &str, verdicts: (&str, &str), n: u32) {
    let (live, shadow) = verdicts;
    metric("proxsmtpd_shadow_verdicts_total")
        .label("filter", filter)
        .label("live", live)
        .label("shadow", shadow)
        .value(f64::from(n))
        .timeout(secs(10))
        .assert_in(admin);
    assert_logged(p, n as usize, &format!("{filter}:{shadow}"));
}

fn assert_logged(p: &Proxy, n: usize, shadow: &str) {
    assert!(
        wait_until(secs(10), || logged_shadows(p)
            .iter()
            .filter(|s| s.as_str() == shadow)
            .count()
            >= n),
        "fewer than {n} message lines with shadow={shadow}: {:?}",
        logged_shadows(p)
    );
}

fn send(p: &Proxy, subject: &str) -> u16 {
    let mut c = Client::open(p.addr());
    c.send_mail(&message(subject, b"shadow test\r\n")).code
}

/// A live `cat` filter and a shadow hook that rejects everything: every message is
/// delivered, and each counts as live accept, shadow reject, on the counter and the log
/// line.
#[test]
fn a_rejecting_shadow_hook_rejects_nothing() {
    timed(60, || {
        let hook = HookServer::start(|_| Behaviour::reject(550, "5.7.1", "shadow says no"));
        let up = Upstream::start();
        let (b, admin) = with_admin(&up);
        let b = b.set("FilterCommand", "cat").set(
            "Hooks",
            &format!("{}{{name=strict, shadow=yes}}", hook.url("/check")),
        );
        let p = started(b, &admin);
        for i in 0..3 {
            assert_eq!(send(&p, &format!("m{i}")), 250, "message {i}");
        }
        let delivered = up.wait_delivered(3, secs(5));
        assert_eq!(delivered.len(), 3);
        assert!(delivered.iter().all(|m| m.accepted()));
        assert_verdicts(&admin, &p, "hook:strict", ("accept", "reject"), 3);
        // The hook was asked at the data stage, once per message.
        assert_eq!(hook.stage_requests("data").len(), 3);
    });
}

/// A shadow milter that rejects at the end of the message, beside a live hook and beside
/// no live filter at all: delivered, recorded as the milter's reject.
#[test]
fn a_rejecting_shadow_milter_rejects_nothing() {
    timed(60, || {
        for live_hook in [true, false] {
            let m = TestMilter::start(Script::new().on(b'E', vec![Act::reply(b'r')]));
            let hook = HookServer::start(|_| Behaviour::accept());
            let up = Upstream::start();
            let (mut b, admin) = with_admin(&up);
            b = b.set(
                "Milters",
                &format!("{}{{name=scanner, shadow=yes}}", m.address),
            );
            if live_hook {
                b = b.set("Hooks", &format!("{}{{name=policy}}", hook.url("/check")));
            }
            let p = started(b, &admin);
            assert_eq!(send(&p, "milter"), 250, "live hook: {live_hook}");
            let d = up.wait_delivered(1, secs(5));
            assert!(d[0].accepted(), "live hook: {live_hook}");
            assert_verdicts(&admin, &p, "milter:scanner", ("accept", "reject"), 1);
            // The shadow milter saw the whole transaction, end of message included.
            assert!(
                m.commands().iter().any(|c| c.contains('E')),
                "{:?}",
                m.commands()
            );
            assert_eq!(
                hook.stage_requests("data").len(),
                usize::from(live_hook),
                "live hook: {live_hook}"
            );
        }
    });
}

/// FilterShadow: a filter command that rejects is only recorded.
#[test]
fn a_rejecting_shadow_command_rejects_nothing() {
    timed(60, || {
        let up = Upstream::start();
        let (b, admin) = with_admin(&up);
        let f = b.script(
            "reject.sh",
            "cat > /dev/null\necho '554 5.7.1 Go away spammer' >&2\nexit 1\n",
        );
        let b = b.set("FilterCommand", &f).set("FilterShadow", "yes");
        let p = started(b, &admin);
        assert_eq!(send(&p, "one"), 250);
        assert_eq!(send(&p, "two"), 250);
        let d = up.wait_delivered(2, secs(5));
        assert!(d.iter().all(|m| m.accepted()));
        assert_verdicts(&admin, &p, "command", ("accept", "reject"), 2);
    });
}

/// A shadow that agrees: live accept, shadow accept.
#[test]
fn an_agreeing_shadow_counts_as_agreement() {
    timed(60, || {
        let hook = HookServer::start(|_| Behaviour::accept());
        let up = Upstream::start();
        let (b, admin) = with_admin(&up);
        let b = b.set(
            "Hooks",
            &format!("{}{{name=same, shadow=yes}}", hook.url("/check")),
        );
        let p = started(b, &admin);
        assert_eq!(send(&p, "agree"), 250);
        up.wait_delivered(1, secs(5));
        assert_verdicts(&admin, &p, "hook:same", ("accept", "accept"), 1);
        let all = all_verdicts(&admin, "hook:same");
        assert_eq!(all, [("accept".into(), "accept".into(), 1.0)], "{all:?}");
    });
}

/// A shadow hook that takes 3 s to accept, called `name` with this timeout, in front of
/// `up`; the started proxy and its admin address.
fn slow_shadow_hook(
    up: &Upstream,
    hook: &HookServer,
    name: &str,
    timeout: &str,
) -> (Proxy, SocketAddr) {
    let (b, admin) = with_admin(up);
    let b = b.set(
        "Hooks",
        &format!(
            "{}{{name={name}, shadow=yes, timeout={timeout}}}",
            hook.url("/check")
        ),
    );
    (started(b, &admin), admin)
}

/// A shadow slower than its timeout: the client has its 250 at once, the session's next
/// command is answered at once too, and the verdict is `error`.
#[test]
fn a_slow_shadow_delays_no_answer() {
    timed(60, || {
        let hook = HookServer::start(|_| Behaviour::delay(secs(3), Behaviour::accept()));
        let up = Upstream::start();
        let (p, admin) = slow_shadow_hook(&up, &hook, "slow", "1s");
        let mut c = Client::open(p.addr());
        // Time the final reply alone: from the end of the content to the 250.
        assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<bob@example.net>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        let start = Instant::now();
        let r = c.body(&message("slow", b"y\r\n"));
        let took = start.elapsed();
        assert_eq!(r.code, 250, "{r:?}");
        assert!(
            took < Duration::from_millis(900),
            "the 250 took {took:?}: the shadow delayed it"
        );
        let start = Instant::now();
        let r = c.cmd("MAIL FROM:<alice@example.org>");
        let took = start.elapsed();
        assert_eq!(r.code, 250, "{r:?}");
        assert!(
            took < Duration::from_millis(900),
            "the MAIL after a message took {took:?}: the session waited for the shadow"
        );
        up.wait_delivered(1, secs(5));
        assert_verdicts(&admin, &p, "hook:slow", ("accept", "error"), 1);
    });
}

/// A message in memory that a shadow still reads when the session is over stays counted
/// in SpoolMemory until the shadow is done with it, and then all of it comes back.
#[test]
fn a_shadow_holds_the_memory_of_its_copy_until_it_is_done() {
    timed(60, || {
        let hook = HookServer::start(|_| Behaviour::delay(secs(3), Behaviour::accept()));
        let up = Upstream::start();
        let (p, admin) = slow_shadow_hook(&up, &hook, "late", "20s");
        let mut c = Client::open(p.addr());
        assert_eq!(c.send_mail(&message("late", b"z\r\n")).code, 250);
        assert_eq!(c.cmd("QUIT").code, 221);
        drop(c);
        up.wait_delivered(1, secs(5));
        // The session is gone; the shadow's call takes 3 s more.
        assert!(
            wait_until(secs(2), || hook.in_flight() == 1),
            "the shadow never called"
        );
        let held = spool_memory(&admin);
        assert!(held >= 4096.0, "{held} bytes held while the shadow reads");
        assert!(
            wait_until(secs(10), || verdicts(
                &admin,
                "hook:late",
                "accept",
                "accept"
            ) == 1.0),
            "the shadow's verdict never came: {:?}",
            all_verdicts(&admin, "hook:late")
        );
        assert!(
            wait_until(secs(3), || spool_memory(&admin) == 0.0),
            "memory not given back: {}",
            spool_memory(&admin)
        );
        p.assert_tmp_clean();
    });
}

/// ShadowConcurrency=1 and a slow shadow under concurrent clients: the shadow runs that
/// find no free slot are dropped at once, every message is delivered.
#[test]
fn shadows_beyond_the_limit_are_dropped() {
    timed(60, || {
        const CLIENTS: usize = 5;
        let hook = HookServer::start(|_| Behaviour::delay(secs(2), Behaviour::accept()));
        let up = Upstream::start();
        let (b, admin) = with_admin(&up);
        let b = b.set("ShadowConcurrency", "1").set(
            "Hooks",
            &format!(
                "{}{{name=busy, shadow=yes, timeout=10s}}",
                hook.url("/check")
            ),
        );
        let p = started(b, &admin);
        let addr = p.addr();
        // Every client is at DATA before any sends its content, so the messages arrive
        // together.
        let mut clients: Vec<Client> = (0..CLIENTS)
            .map(|_| {
                let mut c = Client::open(addr);
                c.begin_data();
                c
            })
            .collect();
        let threads: Vec<_> = clients
            .drain(..)
            .enumerate()
            .map(|(i, mut c)| {
                std::thread::spawn(move || c.body(&message(&format!("c{i}"), b"z\r\n")).code)
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 250);
        }
        let d = up.wait_delivered(CLIENTS, secs(10));
        assert_eq!(d.len(), CLIENTS);
        assert!(d.iter().all(|m| m.accepted()));
        let total = || {
            all_verdicts(&admin, "hook:busy")
                .iter()
                .map(|v| v.2)
                .sum::<f64>()
        };
        assert!(
            wait_until(secs(10), || total() >= CLIENTS as f64),
            "{:?}",
            all_verdicts(&admin, "hook:busy")
        );
        let dropped = verdicts(&admin, "hook:busy", "accept", "dropped");
        let accepted = verdicts(&admin, "hook:busy", "accept", "accept");
        assert!(
            dropped >= 1.0 && accepted >= 1.0,
            "{:?}",
            all_verdicts(&admin, "hook:busy")
        );
        assert_eq!(dropped + accepted, CLIENTS as f64);
        // A dropped run never reached the hook.
        assert_eq!(hook.stage_requests("data").len() as f64, accepted);
        assert_logged(&p, 1, "hook:busy:dropped");
    });
}

/// A shadow hook's modifications are never applied.
#[test]
fn a_shadow_never_changes_the_message() {
    timed(60, || {
        let hook = HookServer::start(|_| {
            Behaviour::modify(json!([
                {"type": "addHeader", "name": "X-Shadow", "value": "was here"},
                {"type": "changeHeader", "index": 1, "name": "Subject", "value": " changed"},
                {"type": "addRecipient", "value": "extra@example.net", "parameters": {}},
                {"type": "replaceContents", "value": "other body\r\n"},
            ]))
        });
        let up = Upstream::start();
        let (b, admin) = with_admin(&up);
        let b = b.set(
            "Hooks",
            &format!("{}{{name=editor, shadow=yes}}", hook.url("/check")),
        );
        let p = started(b, &admin);
        let sent = message("untouched", b"original body\r\n");
        let mut c = Client::open(p.addr());
        assert_eq!(c.send_mail(&sent).code, 250);
        let d = up.wait_delivered(1, secs(5));
        let content = String::from_utf8_lossy(&d[0].content).into_owned();
        assert!(!content.contains("X-Shadow"), "{content}");
        assert!(content.contains("untouched"), "{content}");
        assert!(content.contains("original body"), "{content}");
        assert_eq!(d[0].content, sent, "the message changed");
        assert_eq!(d[0].rcpts.len(), 1, "{:?}", d[0].rcpts);
        metric("proxsmtpd_shadow_verdicts_total")
            .label("filter", "hook:editor")
            .label("live", "accept")
            .label("shadow", "accept")
            .value(1.0)
            .timeout(secs(10))
            .assert_in(&admin);
        assert_eq!(hook.stage_requests("data").len(), 1);
    });
}
