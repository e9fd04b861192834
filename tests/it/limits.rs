//! MaxConnections, TimeOut, command line length, KeepAlives.

use crate::common;

use std::time::Instant;

use crate::common::upstream::Reply;
use crate::common::{
    default_message, ms, secs, timed, wait_for, Client, Proxy, ProxyBuilder, Upstream,
};

#[test]
fn max_connections_refuses_with_421_and_frees_slots() {
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::with_setting(&up, "MaxConnections", "2");
        let mut c1 = p.connect();
        assert_eq!(c1.greeting().code, 220);
        let mut c2 = p.connect();
        assert_eq!(c2.greeting().code, 220);
        let mut c3 = p.connect();
        c3.set_timeout(secs(5));
        assert_eq!(
            c3.try_reply()
                .map(|r| r.raw_str())
                .unwrap_or_else(|e| e.to_string()),
            "421 Server busy, too many connections\r\n"
        );
        assert!(c3.wait_eof(secs(5)), "refused connection not closed");
        assert_eq!(
            up.session_count(),
            2,
            "an upstream connection was opened for the refused client"
        );
        assert_eq!(c1.cmd("QUIT").code, 221);
        c1.close();
        assert!(up.wait_closed(0, secs(5)));
        // The slot is free again (give the proxy a moment to notice).
        let served = wait_for(secs(5), || {
            let mut c = p.connect();
            c.set_timeout(secs(3));
            match c.try_reply() {
                Ok(r) if r.code == 220 => Some(c),
                _ => None,
            }
        });
        let mut c4 = served.expect("no connection served after a slot was freed");
        assert_eq!(c4.cmd("EHLO client.example").code, 250);
        assert_eq!(c2.cmd("NOOP").code, 250);
    });
}

#[test]
fn idle_client_is_disconnected_after_timeout() {
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::with_setting(&up, "TimeOut", "2");
        let mut c = p.open();
        let t0 = Instant::now();
        assert!(
            c.wait_eof(secs(10)),
            "idle client still connected after 10 s"
        );
        let dt = t0.elapsed();
        assert!(
            dt >= ms(1500) && dt <= secs(8),
            "closed after {dt:?} with TimeOut 2"
        );
        assert!(up.wait_closed(0, secs(5)), "upstream connection still open");
    });
}

#[test]
fn idle_timeout_sends_421_before_closing() {
    // deviation from 1.10: the original closes without a reply.
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::with_setting(&up, "TimeOut", "2");
        let mut c = p.open();
        c.set_timeout(secs(8));
        let r = c
            .try_reply()
            .unwrap_or_else(|e| panic!("no reply before the close: {e}"));
        assert_eq!(r.code, 421, "{r:?}");
        assert!(c.wait_eof(secs(5)), "not closed after the 421");
        assert!(up.wait_closed(0, secs(5)), "upstream connection still open");
    });
}

#[test]
fn stalled_body_times_out_without_delivery() {
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("TimeOut", "2")
            .set("FilterCommand", "cat")
            .start();
        let mut c = p.open();
        c.begin_data();
        c.send(b"Subject: stalled\r\n\r\nhalf a message\r\n");
        assert!(c.wait_eof(secs(10)), "stalled client still connected");
        assert!(
            String::from_utf8_lossy(c.pending())
                .lines()
                .all(|l| !l.starts_with('2')),
            "got a success reply"
        );
        assert!(up.wait_closed(0, secs(5)), "upstream still open");
        assert!(up.delivered().is_empty());
        p.assert_tmp_clean();
    });
}

#[test]
fn long_command_line_gets_500_and_session_stays_in_sync() {
    timed(30, || {
        let up = Upstream::builder()
            .reply_with("NOOP", |c| {
                Some(Reply::text(&format!(
                    "250 2.0.0 noop-marker {}",
                    c.line.len()
                )))
            })
            .start();
        let p = ProxyBuilder::new().upstream(&up).start();
        let mut c = p.open();
        for total in [4222usize, 5000, 100_000] {
            let line = format!("NOOP {}", "x".repeat(total - 7));
            assert_eq!(
                c.cmd(&line).raw_str(),
                "500 Line too long\r\n",
                "{total}-octet line"
            );
            assert_eq!(
                c.cmd("NOOP").raw_str(),
                "250 2.0.0 noop-marker 6\r\n",
                "out of sync after {total}"
            );
        }
        // Just below the limit the line is relayed.
        let line = format!("NOOP {}", "x".repeat(4221 - 7));
        assert_eq!(c.cmd(&line).raw_str(), "250 2.0.0 noop-marker 4221\r\n");
        let lens: Vec<usize> = up.session(0).commands.iter().map(|l| l.len()).collect();
        assert!(
            lens.iter().all(|&l| l < 4222),
            "a long line reached the upstream: {lens:?}"
        );
    });
}

fn noop_counter(multiline: bool) -> Upstream {
    Upstream::builder()
        .reply_with("NOOP", move |c| {
            Some(Reply::text(&if multiline {
                format!("250-2.0.0 keepalive\n250 2.0.0 noop #{}", c.nth)
            } else {
                format!("250 2.0.0 noop #{}", c.nth)
            }))
        })
        .start()
}

/// Sends a message line by line over about `secs_total` seconds; returns the final reply.
fn trickle(c: &mut Client, millis_total: u64) -> common::ClientReply {
    c.begin_data();
    let msg = default_message();
    let lines: Vec<&[u8]> = msg.split_inclusive(|&b| b == b'\n').collect();
    for l in &lines {
        c.send(l);
        std::thread::sleep(ms(millis_total / lines.len() as u64));
    }
    c.send(b".\r\n");
    c.reply()
}

fn noops_between_rcpt_and_data(up: &Upstream) -> usize {
    let v = up.session(0).verbs();
    let r = v.iter().position(|x| x == "RCPT").unwrap_or(0);
    let d = v.iter().position(|x| x == "DATA").unwrap_or(v.len());
    v[r..d].iter().filter(|x| *x == "NOOP").count()
}

/// Asserts that at least one keepalive NOOP went upstream between RCPT and DATA (`when`
/// names the phase for the message) and that no reply to one reached the client: the
/// client's own NOOP gets the next number of the upstream's counter.
fn assert_keepalives_not_leaked(up: &Upstream, c: &mut Client, when: &str) {
    let n = noops_between_rcpt_and_data(up);
    assert!(
        n >= 1,
        "no keepalive NOOP {when}: {:?}",
        up.session(0).lines()
    );
    let total = up.session(0).verb_count("NOOP");
    assert_eq!(
        c.cmd("NOOP").raw_str(),
        format!("250 2.0.0 noop #{}\r\n", total + 1),
        "a keepalive reply leaked"
    );
}

/// A proxy in front of `up` that sends keepalives every second, with an optional filter.
fn keepalive_proxy(up: &Upstream, filter: Option<&str>) -> Proxy {
    let mut b = ProxyBuilder::new().upstream(up).set("KeepAlives", "1");
    if let Some(f) = filter {
        b = b.set("FilterCommand", f);
    }
    b.start()
}

#[test]
fn keepalives_during_slow_body_are_not_leaked() {
    timed(30, || {
        let up = noop_counter(false);
        let p = keepalive_proxy(&up, None);
        let mut c = p.open();
        let fin = trickle(&mut c, 3500);
        assert_eq!(fin.raw_str(), "250 2.0.0 Ok: queued as UP0001\r\n");
        assert_keepalives_not_leaked(&up, &mut c, "upstream");
        assert_bytes_eq!(up.expect_one().content, default_message());
    });
}

#[test]
fn keepalive_multiline_noop_replies_are_not_leaked() {
    // deviation from 1.10: the original reads one line of the NOOP reply.
    timed(30, || {
        let up = noop_counter(true);
        let p = keepalive_proxy(&up, None);
        let mut c = p.open();
        let fin = trickle(&mut c, 3000);
        assert_eq!(fin.raw_str(), "250 2.0.0 Ok: queued as UP0001\r\n");
        assert!(noops_between_rcpt_and_data(&up) >= 1);
        let total = up.session(0).verb_count("NOOP");
        let r = c.cmd("NOOP");
        assert_eq!(
            r.lines.last().cloned().unwrap_or_default(),
            format!("2.0.0 noop #{}", total + 1),
            "leak: {r:?}"
        );
    });
}

#[test]
fn keepalives_while_the_filter_runs() {
    // deviation from 1.10: the original sends no NOOPs while the filter runs.
    timed(30, || {
        let up = noop_counter(false);
        let p = keepalive_proxy(&up, Some("cat; sleep 3"));
        let mut c = p.open();
        let fin = c.send_mail(&default_message());
        assert_eq!(fin.raw_str(), "250 2.0.0 Ok: queued as UP0001\r\n");
        assert_keepalives_not_leaked(&up, &mut c, "while the filter ran");
    });
}
