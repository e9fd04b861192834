//! `/metrics` of the real binary after scripted traffic: message verdicts, histograms,
//! connections, upstream errors by stage, filter timeouts and spawn failures, replies by
//! class, build info, reloads; `promtool check metrics`; no address in any label.

use crate::common;

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use nix::sys::signal::Signal;

use crate::common::metrics::{http_get, metric, parse};
use crate::common::proxy::free_port;
use crate::common::{message, secs, timed, wait_until, Proxy, ProxyBuilder, Reply, Upstream};

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A proxy with an admin server; returns it and the admin address.
fn with_admin(b: ProxyBuilder) -> (Proxy, SocketAddr) {
    let admin = admin_addr();
    let p = b.set("AdminListen", &admin.to_string()).start();
    assert!(
        wait_until(secs(5), || http_get(&admin, "/livez")
            .is_ok_and(|r| r.0 == 200)),
        "admin server not answering"
    );
    (p, admin)
}

/// A proxy in front of `up` that runs `filter`, with its admin server answering.
fn filtering_with_admin(up: &Upstream, filter: &str) -> (Proxy, SocketAddr) {
    with_admin(
        ProxyBuilder::new()
            .upstream(up)
            .set("FilterCommand", filter),
    )
}

fn scrape(admin: &SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    body
}

/// The value of the series `name` with all of `labels`, or None.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut m = metric(name);
    for (k, v) in labels {
        m = m.label(k, v);
    }
    m.find_value(text)
}

/// A filter that decides by the message content.
const VERDICT_FILTER: &str = r#"f={OUT}/msg.$$
cat > "$f"
if grep -q FILTER-REJECT "$f"; then rm -f "$f"; echo '554 5.7.1 Rejected by the filter' >&2; exit 1; fi
if grep -q FILTER-DROP "$f"; then rm -f "$f"; echo '250 Dropped silently' >&2; exit 1; fi
if grep -q FILTER-TEMP "$f"; then rm -f "$f"; echo '451 4.7.1 Try again later' >&2; exit 1; fi
if grep -q FILTER-CRASH "$f"; then rm -f "$f"; kill -9 $$; fi
if grep -q FILTER-SLOW "$f"; then sleep 0.3; fi
cat "$f"; rm -f "$f"
"#;

fn verdict_upstream() -> Upstream {
    Upstream::builder()
        .reply_with("DATA_END", |call| {
            let content = String::from_utf8_lossy(call.line);
            if content.contains("UPSTREAM-REJECT") {
                Some(Reply::text("554 5.6.0 Upstream refuses"))
            } else if content.contains("UPSTREAM-TEMP") {
                Some(Reply::text("452 4.3.1 Upstream full"))
            } else {
                None
            }
        })
        .start()
}

#[test]
fn message_verdicts_sizes_and_filter_durations() {
    timed(40, || {
        let up = verdict_upstream();
        let b = ProxyBuilder::new().upstream(&up);
        let filter = b.script("verdict.sh", VERDICT_FILTER);
        let (p, admin) = with_admin(b.set("FilterCommand", &filter));

        // (content marker, final reply class the client must see)
        let cases: &[(&str, u16)] = &[
            ("plain", 2),
            ("FILTER-SLOW", 2),
            ("FILTER-REJECT", 5),
            ("UPSTREAM-REJECT", 5),
            ("FILTER-DROP", 2),
            ("FILTER-TEMP", 4),
            ("UPSTREAM-TEMP", 4),
            ("FILTER-CRASH", 4),
        ];
        let mut c = p.open();
        let mut total_size = 0usize;
        for (i, (marker, class)) in cases.iter().enumerate() {
            let body = format!("{marker}\r\n{}\r\n", "x".repeat(100 * i));
            let content = message(&format!("m{i}"), body.as_bytes());
            total_size += content.len();
            let r = c.send_mail(&content);
            assert_eq!(r.code / 100, *class, "{marker}: {r:?}");
        }
        // The verdict keeps its meaning; the source says who decided it.
        for (verdict, source, n) in [
            ("accepted", "upstream", 2.0),
            ("rejected", "filter", 1.0),
            ("rejected", "upstream", 1.0),
            ("dropped", "filter", 1.0),
            ("tempfailed", "filter", 1.0),
            ("tempfailed", "upstream", 1.0),
            ("local_error", "local", 1.0),
        ] {
            metric("proxsmtpd_messages_total")
                .label("verdict", verdict)
                .label("source", source)
                .value(n)
                .assert_in(&admin);
        }
        let n = cases.len() as f64;
        metric("proxsmtpd_message_size_bytes_count")
            .value(n)
            .assert_in(&admin);
        metric("proxsmtpd_message_size_bytes_sum")
            .value(total_size as f64)
            .assert_in(&admin);
        metric("proxsmtpd_message_size_bytes_bucket")
            .label("le", "+Inf")
            .value(n)
            .assert_in(&admin);
        metric("proxsmtpd_filter_duration_seconds_count")
            .value(n)
            .assert_in(&admin);
        let text = scrape(&admin);
        let sum = value(&text, "proxsmtpd_filter_duration_seconds_sum", &[]).unwrap_or(0.0);
        assert!(
            sum >= 0.3,
            "filter duration sum {sum} < the slow filter's 0.3 s"
        );
        let fast = value(
            &text,
            "proxsmtpd_filter_duration_seconds_bucket",
            &[("le", "0.25")],
        )
        .unwrap_or(-1.0);
        assert!(
            fast <= n - 1.0,
            "the 0.3 s filter run landed in the le=0.25 bucket ({fast} of {n})"
        );
        // Only the two accepted messages went through.
        assert_eq!(up.wait_delivered(2, secs(5)).len(), 2);
    });
}

/// Upstream failures are counted by the SMTP stage at which they happened.
#[test]
fn upstream_errors_by_stage() {
    timed(40, || {
        // Upstream session i fails at one stage each.
        let up = Upstream::builder()
            .reply_with("MAIL", |call| (call.session == 0).then(Reply::close))
            .reply_with("DATA", |call| (call.session == 1).then(Reply::close))
            .reply_with("DATA_END", |call| (call.session == 2).then(Reply::close))
            .reply_with("BANNER", |call| (call.session == 3).then(Reply::close))
            .start();
        let (p, admin) = filtering_with_admin(&up, "cat");

        // Session 0: the upstream goes away at MAIL.
        let mut c = p.open();
        let r = c.cmd("MAIL FROM:<alice@example.org>");
        assert_eq!(r.code, 421, "{r:?}");
        // Session 1: at DATA (the client has sent its whole body by then).
        let mut c = p.open();
        assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<bob@example.net>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        let r = c.body(&common::default_message());
        assert_eq!(r.code / 100, 4, "{r:?}");
        // Session 2: after the end of data, before the final reply.
        let mut c = p.open();
        let r = c
            .transaction(
                "<alice@example.org>",
                &["<bob@example.net>"],
                &common::default_message(),
            )
            .final_reply;
        assert_eq!(r.code / 100, 4, "{r:?}");
        // Session 3: before the greeting.
        let mut c = p.connect();
        let r = c.greeting();
        assert_eq!(r.code, 421, "{r:?}");
        assert!(
            up.wait(secs(5), |s| s.sessions.len() == 4),
            "{:?}",
            up.summary()
        );

        // Connect: nothing listens at OutAddress.
        let (p2, admin2) = with_admin(
            ProxyBuilder::new().set("OutAddress", &format!("127.0.0.1:{}", free_port())),
        );
        let r = p2.connect().greeting();
        assert_eq!(r.code, 421, "{r:?}");
        metric("proxsmtpd_upstream_errors_total")
            .label("stage", "connect")
            .value(1.0)
            .assert_in(&admin2);

        let text = scrape(&admin);
        let got: Vec<(&str, Option<f64>)> = ["connect", "greeting", "command", "data", "final"]
            .iter()
            .map(|s| {
                (
                    *s,
                    value(&text, "proxsmtpd_upstream_errors_total", &[("stage", s)]),
                )
            })
            .collect();
        let want = [
            ("connect", Some(0.0)),
            ("greeting", Some(1.0)),
            ("command", Some(1.0)),
            ("data", Some(1.0)),
            ("final", Some(1.0)),
        ];
        assert_eq!(got, want, "proxsmtpd_upstream_errors_total by stage");
    });
}

/// A message whose body the client finished sending is counted once, whatever happened
/// upstream afterwards: here the upstream vanished at DATA and before its final reply,
/// and the client was told 4xx both times.
#[test]
fn messages_lost_upstream_are_counted() {
    timed(30, || {
        let up = Upstream::builder()
            .reply_with("DATA", |call| (call.session == 0).then(Reply::close))
            .reply_with("DATA_END", |call| (call.session == 1).then(Reply::close))
            .start();
        let (p, admin) = filtering_with_admin(&up, "cat");
        for _ in 0..2 {
            let mut c = p.open();
            assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
            assert_eq!(c.cmd("RCPT TO:<bob@example.net>").code, 250);
            assert_eq!(c.cmd("DATA").code, 354);
            let r = c.body(&common::default_message());
            assert_eq!(r.code / 100, 4, "{r:?}");
        }
        assert!(wait_until(secs(3), || {
            let t = scrape(&admin);
            value(&t, "proxsmtpd_upstream_errors_total", &[("stage", "final")]) == Some(1.0)
        }));
        let text = scrape(&admin);
        // Summed over `source`; a message lost with the upstream is the upstream's.
        let count = |v: &str| -> f64 {
            parse(&text)
                .iter()
                .filter(|s| {
                    s.name == "proxsmtpd_messages_total"
                        && s.labels.contains(&("verdict".to_string(), v.to_string()))
                })
                .map(|s| s.value)
                .sum()
        };
        assert_eq!(
            value(
                &text,
                "proxsmtpd_messages_total",
                &[("verdict", "tempfailed"), ("source", "upstream")]
            ),
            Some(2.0)
        );
        let lost = count("tempfailed") + count("local_error");
        assert_eq!(
            (count("accepted"), lost),
            (0.0, 2.0),
            "messages the client was told 4xx for must be counted as tempfailed or \
             local_error; messages_total: {:?}",
            text.lines()
                .filter(|l| l.starts_with("proxsmtpd_messages_total"))
                .collect::<Vec<_>>()
        );
    });
}

#[test]
fn connections_total_active_and_refused() {
    timed(30, || {
        let up = Upstream::start();
        let (p, admin) = with_admin(ProxyBuilder::new().upstream(&up).set("MaxConnections", "2"));
        metric("proxsmtpd_connections_total")
            .value(0.0)
            .assert_in(&admin);
        metric("proxsmtpd_connections_active")
            .value(0.0)
            .assert_in(&admin);
        metric("proxsmtpd_connections_refused_total")
            .value(0.0)
            .assert_in(&admin);

        let c1 = p.open();
        let mut c2 = p.connect();
        assert_eq!(c2.greeting().code, 220);
        metric("proxsmtpd_connections_active")
            .value(2.0)
            .assert_in(&admin);
        metric("proxsmtpd_connections_total")
            .value(2.0)
            .assert_in(&admin);

        let mut c3 = p.connect();
        let r = c3.greeting();
        assert_eq!(r.code, 421, "{r:?}");
        metric("proxsmtpd_connections_refused_total")
            .value(1.0)
            .assert_in(&admin);
        metric("proxsmtpd_connections_total")
            .value(2.0)
            .assert_in(&admin);
        metric("proxsmtpd_connections_active")
            .value(2.0)
            .assert_in(&admin);

        c1.close();
        metric("proxsmtpd_connections_active")
            .value(1.0)
            .assert_in(&admin);
        assert_eq!(c2.cmd("QUIT").code, 221);
        metric("proxsmtpd_connections_active")
            .value(0.0)
            .assert_in(&admin);
        // A new client gets a slot again.
        let c4 = p.open();
        metric("proxsmtpd_connections_total")
            .value(3.0)
            .assert_in(&admin);
        metric("proxsmtpd_connections_active")
            .value(1.0)
            .assert_in(&admin);
        drop(c4);
    });
}

#[test]
fn filter_timeouts_are_counted() {
    timed(30, || {
        let up = Upstream::start();
        let (p, admin) = with_admin(
            ProxyBuilder::new()
                .upstream(&up)
                .set("FilterTimeout", "1")
                .set("FilterCommand", "sleep 20"),
        );
        let r = p.open().send_mail(&common::default_message());
        assert_eq!(r.code, 451, "{r:?}");
        metric("proxsmtpd_filter_timeouts_total")
            .value(1.0)
            .assert_in(&admin);
        metric("proxsmtpd_messages_total")
            .label("verdict", "local_error")
            .value(1.0)
            .assert_in(&admin);
        metric("proxsmtpd_filter_spawn_failures_total")
            .value(0.0)
            .assert_in(&admin);
        up.assert_nothing_delivered();
    });
}

/// The filter command cannot be started: a missing script, a script without the execute
/// bit, a path that loops. Each tempfails its message and counts as a spawn failure
/// (the shipped alert `ProxsmtpdFilterSpawnFailures` is about exactly these cases).
#[test]
fn filter_spawn_failures_are_counted() {
    timed(40, || {
        let up = Upstream::start();
        let dir = tempfile::tempdir().unwrap();
        let not_exec = dir.path().join("not-executable.sh");
        fs::write(&not_exec, "#!/bin/sh\ncat\n").unwrap();
        fs::set_permissions(&not_exec, fs::Permissions::from_mode(0o644)).unwrap();
        let looping = dir.path().join("loop");
        std::os::unix::fs::symlink(&looping, &looping).unwrap();
        let cases = [
            ("missing script", dir.path().join("no-such-filter.sh")),
            ("not executable", not_exec),
            ("symlink loop", looping),
        ];
        let mut failures = Vec::new();
        for (what, path) in cases {
            let (p, admin) = filtering_with_admin(&up, path.to_str().unwrap());
            let r = p.open().send_mail(&common::default_message());
            assert_eq!(
                r.code / 100,
                4,
                "{what}: the message must be tempfailed: {r:?}"
            );
            // Give the counter time to show up before judging.
            wait_until(secs(2), || {
                value(
                    &scrape(&admin),
                    "proxsmtpd_filter_spawn_failures_total",
                    &[],
                ) == Some(1.0)
            });
            let got = value(
                &scrape(&admin),
                "proxsmtpd_filter_spawn_failures_total",
                &[],
            );
            if got != Some(1.0) {
                failures.push(format!(
                    "{what} ({}): proxsmtpd_filter_spawn_failures_total = {got:?}, want 1",
                    path.display()
                ));
            }
        }
        up.assert_nothing_delivered();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// Counts final reply lines by class in what a client received.
fn classes(received: &[u8], counts: &mut [u64; 4]) {
    for line in received.split(|&b| b == b'\n') {
        if line.len() >= 3 && line.get(3) != Some(&b'-') {
            if let Some(i) = (line[0] as char)
                .to_digit(10)
                .and_then(|d| (d as usize).checked_sub(2))
                .filter(|i| *i < 4)
            {
                counts[i] += 1;
            }
        }
    }
}

/// `proxsmtpd_replies_total` equals, class by class, what the clients received: relayed
/// replies, the proxy's own (354, 421 busy) and the filter's.
#[test]
fn replies_by_class_match_what_clients_received() {
    timed(40, || {
        let up = Upstream::builder()
            .reply_with("RCPT", |call| {
                let l = String::from_utf8_lossy(call.line);
                if l.contains("busy@") {
                    Some(Reply::text("450 4.2.1 Mailbox busy"))
                } else if l.contains("nobody@") {
                    Some(Reply::text("550 5.1.1 No such user"))
                } else {
                    None
                }
            })
            .start();
        let b = ProxyBuilder::new().upstream(&up).set("MaxConnections", "2");
        let filter = b.script("verdict.sh", VERDICT_FILTER);
        let (p, admin) = with_admin(b.set("FilterCommand", &filter));

        let mut counts = [0u64; 4];
        let mut a = p.open();
        a.cmd("NOOP");
        a.cmd("MAIL FROM:<alice@example.org>");
        a.cmd("RCPT TO:<busy@example.net>");
        a.cmd("RCPT TO:<nobody@example.net>");
        a.cmd("RCPT TO:<bob@example.net>");
        a.cmd("DATA");
        a.body(&message("one", b"hello\r\n"));
        a.transaction(
            "<alice@example.org>",
            &["<bob@example.net>"],
            &message("two", b"FILTER-REJECT\r\n"),
        );
        a.transaction(
            "<alice@example.org>",
            &["<bob@example.net>"],
            &message("three", b"FILTER-TEMP\r\n"),
        );
        a.cmd("RSET");
        // A third client while two are connected gets the busy reply.
        let mut b2 = p.connect();
        b2.greeting();
        let mut c = p.connect();
        let busy = c.greeting();
        assert_eq!(busy.code, 421, "{busy:?}");
        assert!(c.wait_eof(secs(5)));
        assert_eq!(a.cmd("QUIT").code, 221);
        assert_eq!(b2.cmd("QUIT").code, 221);
        for cl in [&a, &b2, &c] {
            classes(cl.received(), &mut counts);
        }
        assert!(
            counts.iter().all(|n| *n > 0),
            "every class should occur: {counts:?}"
        );
        metric("proxsmtpd_connections_active")
            .value(0.0)
            .assert_in(&admin);
        let text = scrape(&admin);
        let got: Vec<(String, Option<f64>)> = ["2xx", "3xx", "4xx", "5xx"]
            .iter()
            .map(|c| {
                (
                    c.to_string(),
                    value(&text, "proxsmtpd_replies_total", &[("class", c)]),
                )
            })
            .collect();
        let want: Vec<(String, Option<f64>)> = ["2xx", "3xx", "4xx", "5xx"]
            .iter()
            .zip(counts)
            .map(|(c, n)| (c.to_string(), Some(n as f64)))
            .collect();
        assert_eq!(
            got, want,
            "proxsmtpd_replies_total vs. replies the clients received"
        );
    });
}

#[test]
fn build_info_draining_and_config_reloads() {
    timed(30, || {
        let up = Upstream::start();
        let (p, admin) = with_admin(ProxyBuilder::new().upstream(&up).set("ReloadWatch", "off"));
        metric("proxsmtpd_build_info")
            .label("version", env!("CARGO_PKG_VERSION"))
            .label("revision", env!("BUILD_REVISION"))
            .value(1.0)
            .assert_in(&admin);
        // The revision is the commit the binary was built from (when built from git).
        if let Ok(out) = common::command("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
        {
            if out.status.success() {
                let head = String::from_utf8_lossy(&out.stdout).trim().to_string();
                metric("proxsmtpd_build_info")
                    .label("revision", &head)
                    .value(1.0)
                    .assert_in(&admin);
            }
        }
        metric("proxsmtpd_draining").value(0.0).assert_in(&admin);
        metric("proxsmtpd_config_reloads_total")
            .label("result", "success")
            .value(0.0)
            .assert_in(&admin);
        metric("proxsmtpd_config_reloads_total")
            .label("result", "failure")
            .value(0.0)
            .assert_in(&admin);
        p.signal(Signal::SIGHUP);
        metric("proxsmtpd_config_reloads_total")
            .label("result", "success")
            .value(1.0)
            .assert_in(&admin);
        // Every proxsmtpd_ family has HELP and TYPE lines.
        let text = scrape(&admin);
        let names: std::collections::BTreeSet<String> = parse(&text)
            .into_iter()
            .filter(|s| s.name.starts_with("proxsmtpd_"))
            .map(|s| {
                let n = s.name;
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suf| n.strip_suffix(suf).map(str::to_string))
                    .filter(|base| text.contains(&format!("# TYPE {base} histogram")))
                    .unwrap_or(n)
            })
            .collect();
        for n in &names {
            assert!(text.contains(&format!("# HELP {n} ")), "no HELP for {n}");
            assert!(text.contains(&format!("# TYPE {n} ")), "no TYPE for {n}");
        }
        for want in [
            "proxsmtpd_messages_total",
            "proxsmtpd_filter_duration_seconds",
            "proxsmtpd_message_size_bytes",
            "proxsmtpd_connections_total",
            "proxsmtpd_connections_active",
            "proxsmtpd_connections_refused_total",
            "proxsmtpd_upstream_errors_total",
            "proxsmtpd_filter_timeouts_total",
            "proxsmtpd_filter_spawn_failures_total",
            "proxsmtpd_replies_total",
            "proxsmtpd_build_info",
            "proxsmtpd_config_reloads_total",
            "proxsmtpd_max_connections",
            "proxsmtpd_config_last_reload_successful",
            "proxsmtpd_config_last_reload_success_timestamp_seconds",
            "proxsmtpd_upstream_reply_duration_seconds",
        ] {
            assert!(
                names.contains(want),
                "{want} missing from /metrics: {names:?}"
            );
        }
    });
}

/// Traffic that touches every labelled series, with distinctive addresses: the client IP
/// comes from a PROXY header so that it cannot be confused with anything else.
fn traffic_with_distinctive_addresses() -> (Proxy, SocketAddr, Upstream) {
    let up = verdict_upstream();
    let b = ProxyBuilder::new()
        .upstream(&up)
        .set("ProxyProtocol", "on")
        .set("ProxyProtocolTrusted", "127.0.0.1/32");
    // The reject text carries the sender and the client address.
    let filter = b.script(
        "verdict.sh",
        &VERDICT_FILTER.replace(
            "echo '554 5.7.1 Rejected by the filter'",
            "echo \"554 5.7.1 Rejected $SENDER from $CLIENT\"",
        ),
    );
    let (p, admin) = with_admin(b.set("FilterCommand", &filter));
    for marker in ["plain", "FILTER-REJECT", "UPSTREAM-TEMP", "FILTER-DROP"] {
        let mut c = p.connect();
        c.send("PROXY TCP4 198.51.100.23 192.0.2.10 40123 25\r\n");
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd("EHLO pii-helo.example").code, 250);
        let content = format!(
            "From: <pii.sender.x7@example.org>\r\nTo: <pii.rcpt.q9@example.net>\r\n\
             Message-ID: <pii-msgid-5k@example.org>\r\nSubject: {marker}\r\n\r\n{marker}\r\n"
        );
        c.transaction(
            "<pii.sender.x7@example.org>",
            &["<pii.rcpt.q9@example.net>", "<pii.rcpt2.z3@example.net>"],
            content.as_bytes(),
        );
        c.cmd("QUIT");
    }
    metric("proxsmtpd_messages_total")
        .label("verdict", "dropped")
        .value(1.0)
        .assert_in(&admin);
    (p, admin, up)
}

#[test]
fn no_label_carries_an_address_or_message_id() {
    timed(30, || {
        let (_p, admin, _up) = traffic_with_distinctive_addresses();
        let text = scrape(&admin);
        let forbidden = [
            "198.51.100.23",
            "192.0.2.10",
            "127.0.0.1",
            "pii",
            "@",
            "example.org",
            "example.net",
        ];
        for s in parse(&text) {
            for (k, v) in &s.labels {
                for f in forbidden {
                    assert!(
                        !v.contains(f),
                        "label {k}={v:?} of {} contains {f:?}",
                        s.name
                    );
                }
            }
        }
        for f in ["198.51.100.23", "pii", "example.org", "example.net"] {
            assert!(!text.contains(f), "/metrics mentions {f:?}");
        }
        // The labels of these families take values from fixed sets (other families are
        // only held to the address check above).
        let allowed: &[(&str, &str, &[&str])] = &[
            (
                "proxsmtpd_upstream_reply_duration_seconds_count",
                "stage",
                &["greeting", "command", "data", "final"],
            ),
            (
                "proxsmtpd_upstream_errors_total",
                "stage",
                &["connect", "greeting", "command", "data", "final"],
            ),
            (
                "proxsmtpd_replies_total",
                "class",
                &["2xx", "3xx", "4xx", "5xx"],
            ),
            (
                "proxsmtpd_config_reloads_total",
                "result",
                &["success", "failure"],
            ),
        ];
        for sample in parse(&text) {
            let keys: Vec<&str> = sample.labels.iter().map(|(k, _)| k.as_str()).collect();
            let get = |k: &str| {
                sample
                    .labels
                    .iter()
                    .find(|(name, _)| name == k)
                    .map(|(_, v)| v.as_str())
            };
            match sample.name.as_str() {
                "proxsmtpd_messages_total" => {
                    assert_eq!(keys, ["source", "verdict"], "labels of {}", sample.name);
                    let pair = (get("verdict").unwrap(), get("source").unwrap());
                    assert!(
                        [
                            ("accepted", "upstream"),
                            ("rejected", "filter"),
                            ("rejected", "upstream"),
                            ("dropped", "filter"),
                            ("tempfailed", "filter"),
                            ("tempfailed", "upstream"),
                            ("local_error", "local"),
                        ]
                        .contains(&pair),
                        "proxsmtpd_messages_total {pair:?}"
                    );
                }
                "proxsmtpd_build_info" => {
                    assert_eq!(keys, ["revision", "version"]);
                    assert_eq!(get("version"), Some(env!("CARGO_PKG_VERSION")));
                }
                _ => {}
            }
        }
        for s in parse(&text) {
            if let Some((_, label, values)) = allowed.iter().find(|(n, _, _)| *n == s.name) {
                let keys: Vec<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(keys, [*label], "labels of {}", s.name);
                let v = s.labels[0].1.as_str();
                assert!(values.contains(&v), "{}: {label}={v:?}", s.name);
            }
        }
    });
}

#[test]
fn promtool_accepts_the_exposition() {
    timed(30, || {
        if !std::path::Path::new("/usr/bin/promtool").exists()
            && common::command("promtool")
                .arg("--version")
                .output()
                .is_err()
        {
            skip!("promtool is not installed (Debian package prometheus); skipping");
            return;
        }
        let (_p, admin, _up) = traffic_with_distinctive_addresses();
        let text = scrape(&admin);
        let mut child = common::command("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to promtool");
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics: {:?}\nstdout: {}\nstderr: {}\nexposition:\n{text}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `proxsmtpd_max_connections` follows the configuration; the last-reload gauges say
/// whether the configuration in force came from the last attempt, and when it was loaded.
#[test]
fn max_connections_and_last_reload_gauges() {
    timed(40, || {
        let up = Upstream::start();
        let (p, admin) = with_admin(
            ProxyBuilder::new()
                .upstream(&up)
                .set("ReloadWatch", "off")
                .set("MaxConnections", "7"),
        );
        metric("proxsmtpd_max_connections")
            .value(7.0)
            .assert_in(&admin);
        metric("proxsmtpd_config_last_reload_successful")
            .value(1.0)
            .assert_in(&admin);
        let text = scrape(&admin);
        let loaded = value(
            &text,
            "proxsmtpd_config_last_reload_success_timestamp_seconds",
            &[],
        )
        .expect("timestamp at start");
        assert!((now_secs() - loaded).abs() < 30.0, "{loaded}");

        // A good reload with another limit.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let conf = fs::read_to_string(&p.conf_path).unwrap();
        fs::write(
            &p.conf_path,
            conf.replace("MaxConnections: 7", "MaxConnections: 9"),
        )
        .unwrap();
        p.signal(Signal::SIGHUP);
        metric("proxsmtpd_max_connections")
            .value(9.0)
            .assert_in(&admin);
        let text = scrape(&admin);
        let reloaded = value(
            &text,
            "proxsmtpd_config_last_reload_success_timestamp_seconds",
            &[],
        )
        .unwrap();
        assert!(reloaded > loaded, "{reloaded} after {loaded}");
        assert_eq!(
            value(&text, "proxsmtpd_config_last_reload_successful", &[]),
            Some(1.0)
        );

        // A broken one is refused: 0, and the rest stays as it was.
        fs::write(&p.conf_path, format!("{conf}MaxConnections: many\n")).unwrap();
        p.signal(Signal::SIGHUP);
        metric("proxsmtpd_config_last_reload_successful")
            .value(0.0)
            .assert_in(&admin);
        let text = scrape(&admin);
        assert_eq!(value(&text, "proxsmtpd_max_connections", &[]), Some(9.0));
        assert_eq!(
            value(
                &text,
                "proxsmtpd_config_last_reload_success_timestamp_seconds",
                &[]
            ),
            Some(reloaded)
        );
        assert_eq!(
            value(
                &text,
                "proxsmtpd_config_reloads_total",
                &[("result", "failure")]
            ),
            Some(1.0)
        );
    });
}

/// Upstream reply latency by stage: every stage of a filtered message is timed, and an
/// upstream that takes 300 ms over its final reply shows it in the `final` histogram.
#[test]
fn upstream_reply_latency_by_stage() {
    timed(40, || {
        let up = Upstream::builder()
            .reply(
                "DATA_END",
                Reply::text("250 2.0.0 Ok: queued").delay(std::time::Duration::from_millis(300)),
            )
            .start();
        let b = ProxyBuilder::new().upstream(&up);
        let (p, admin) = with_admin(b.set("FilterCommand", "cat"));
        let mut c = p.open();
        assert_eq!(c.send_mail(&message("slow", b"body\r\n")).code, 250);
        c.cmd("QUIT");
        metric("proxsmtpd_upstream_reply_duration_seconds_count")
            .label("stage", "final")
            .value(1.0)
            .assert_in(&admin);
        let text = scrape(&admin);
        for stage in ["greeting", "command", "data"] {
            let n = value(
                &text,
                "proxsmtpd_upstream_reply_duration_seconds_count",
                &[("stage", stage)],
            )
            .unwrap_or(0.0);
            assert!(n >= 1.0, "stage {stage}: {n} replies timed");
        }
        let sum = value(
            &text,
            "proxsmtpd_upstream_reply_duration_seconds_sum",
            &[("stage", "final")],
        )
        .unwrap();
        assert!((0.3..5.0).contains(&sum), "final reply took {sum} s");
        assert_eq!(
            value(
                &text,
                "proxsmtpd_upstream_reply_duration_seconds_bucket",
                &[("stage", "final"), ("le", "0.25")]
            ),
            Some(0.0)
        );
        let command_sum = value(
            &text,
            "proxsmtpd_upstream_reply_duration_seconds_sum",
            &[("stage", "command")],
        )
        .unwrap();
        assert!(command_sum < 0.3, "command replies took {command_sum} s");
    });
}

/// The expiry of the loaded certificate, from its notAfter; no series without one.
#[test]
fn tls_certificate_expiry() {
    timed(30, || {
        let up = Upstream::start();
        let (_plain, plain_admin) = with_admin(ProxyBuilder::new().upstream(&up));
        assert!(!scrape(&plain_admin).contains("proxsmtpd_tls_certificate_expiry"));

        let b = ProxyBuilder::new().upstream(&up);
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (b.dir().join("tls.crt"), b.dir().join("tls.key"));
        fs::write(&cert_path, cert.pem()).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        let (_p, admin) = with_admin(
            b.set("TlsCertificate", &cert_path.display().to_string())
                .set("TlsKey", &key_path.display().to_string()),
        );
        let expected = jiff::civil::date(2031, 5, 17)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second();
        metric("proxsmtpd_tls_certificate_expiry_timestamp_seconds")
            .value(expected as f64)
            .assert_in(&admin);
    });
}

/// GET /metrics with an Accept header; returns (content type, body).
fn get_with_accept(admin: &SocketAddr, accept: &str) -> (String, String) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(secs(5))).unwrap();
    s.write_all(
        format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// A scraper asking for OpenMetrics gets it (`# EOF`, counter families without `_total`);
/// others get the Prometheus text format. Then a real Prometheus (which negotiates
/// OpenMetrics) scrapes the proxy and stores the series under their usual names.
#[test]
fn openmetrics_is_served_when_asked_for() {
    timed(60, || {
        let (_p, admin, _up) = traffic_with_distinctive_addresses();
        let prometheus_accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let (content_type, body) = get_with_accept(&admin, prometheus_accept);
        assert_eq!(
            content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(
            body.contains("# TYPE proxsmtpd_messages counter\n"),
            "{body}"
        );
        assert!(
            body.contains("proxsmtpd_messages_total{source=\"filter\",verdict=\"rejected\"} 1.0\n"),
            "{body}"
        );
        let (content_type, body) = get_with_accept(&admin, "text/plain;version=0.0.4");
        assert_eq!(content_type, "text/plain; version=0.0.4");
        assert!(!body.contains("# EOF"));
        assert!(body.contains("# TYPE proxsmtpd_messages_total counter\n"));

        if common::command("prometheus")
            .arg("--version")
            .output()
            .is_err()
        {
            skip!("prometheus is not installed; skipping the real scrape");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: proxsmtpd\n    \
                 static_configs:\n      - targets: ['{admin}']\n"
            ),
        )
        .unwrap();
        let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
        struct Killed(std::process::Child);
        impl Drop for Killed {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let _prometheus = Killed(
            common::command("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={web}"))
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.path().join("prometheus.log")).unwrap())
                .spawn()
                .expect("start prometheus"),
        );
        let query = |q: &str| {
            http_get(&web, &format!("/api/v1/query?query={q}"))
                .map(|(_, body)| body)
                .unwrap_or_default()
        };
        let stored = wait_until(secs(30), || {
            query("proxsmtpd_messages_total%7Bverdict%3D%22rejected%22%2Csource%3D%22filter%22%7D")
                .contains("\"1\"]")
        });
        let targets = http_get(&web, "/api/v1/targets")
            .map(|r| r.1)
            .unwrap_or_default();
        assert!(
            stored,
            "Prometheus never stored the counter; targets: {targets}"
        );
        assert!(targets.contains("\"health\":\"up\""), "{targets}");
        assert!(targets.contains("\"lastError\":\"\""), "{targets}");
        for q in [
            "proxsmtpd_upstream_reply_duration_seconds_bucket",
            "proxsmtpd_build_info",
            "proxsmtpd_config_last_reload_successful",
        ] {
            assert!(query(q).contains(q), "{q} not stored by Prometheus");
        }
    });
}
