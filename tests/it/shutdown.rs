//! Graceful shutdown of the real binary: on SIGTERM (or SIGINT) the listener closes, idle
//! sessions are told `421 4.3.2` at once, a message in flight is still delivered, and
//! whatever still runs at DrainTimeout is told 421 with the upstream transaction aborted.
//! The exit status is 0.

use crate::common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::common::proxy::{is_listening, pid_alive};
use crate::common::{ms, secs, timed, wait_until, Client, Proxy, ProxyBuilder, Reply, Upstream};

/// Waits for the proxy process to be gone, then collects its exit status.
fn wait_exit(p: &mut Proxy, timeout: Duration) -> ExitStatus {
    let pid = p.pid();
    assert!(
        wait_until(timeout, || !pid_alive(pid)),
        "proxsmtpd still running {timeout:?} after the signal"
    );
    p.terminate(secs(2)).expect("exit status")
}

fn assert_shutting_down(r: &common::ClientReply, what: &str) {
    assert_eq!(r.code, 421, "{what}: {r:?}");
    assert!(
        r.text().starts_with("4.3.2"),
        "{what}: expected `421 4.3.2 ...`, got {r:?}"
    );
}

/// A message whose filter is running when SIGTERM arrives is delivered and the client gets
/// 250; an idle session is told 421 at once; new connections are refused; exit 0 as soon
/// as the last session is done (well before DrainTimeout).
#[test]
fn message_in_flight_is_delivered_and_idle_sessions_are_told_to_go() {
    timed(40, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up).set("DrainTimeout", "15");
        let filter = b.script(
            "slow.sh",
            ": > {OUT}/started\nsleep 2\ncat\n: > {OUT}/finished\n",
        );
        let mut p = b.set("FilterCommand", &filter).start();

        let mut idle = p.open();
        let mut busy = p.open();
        busy.set_timeout(secs(15));
        assert_eq!(busy.cmd("MAIL FROM:<alice@example.org>").code, 250);
        assert_eq!(busy.cmd("RCPT TO:<bob@example.net>").code, 250);
        assert_eq!(busy.cmd("DATA").code, 354);
        busy.send(common::stuff(&common::default_message()));
        assert!(
            wait_until(secs(5), || p.out("started").exists()),
            "filter never started"
        );

        p.signal(Signal::SIGTERM);
        let term = Instant::now();
        let r = idle.reply();
        assert_shutting_down(&r, "idle session");
        assert!(
            term.elapsed() < secs(1),
            "the idle session waited {:?} for its 421",
            term.elapsed()
        );
        assert!(idle.wait_eof(secs(2)), "idle session not closed after 421");

        // The listener is closed: no new client is accepted while draining.
        assert!(
            wait_until(secs(1), || !is_listening(p.port)),
            "still listening after SIGTERM"
        );
        assert!(
            Client::try_connect(p.addr()).is_err(),
            "a new connection was accepted while draining"
        );
        assert!(!p.out("finished").exists(), "the filter was not in flight");

        let r = busy.reply();
        assert_eq!(r.code, 250, "the message in flight: {r:?}");
        let msg = up.expect_one();
        assert_eq!(msg.content, common::default_message());
        // Then the session is idle, and told to go.
        let r = busy.reply();
        assert_shutting_down(&r, "session after its message");
        assert!(busy.wait_eof(secs(2)));

        let status = wait_exit(&mut p, secs(5));
        assert_eq!(status.code(), Some(0), "{status:?}");
        assert!(
            term.elapsed() < secs(10),
            "exit took {:?}: the drain must end when the last session does",
            term.elapsed()
        );
    });
}

/// SIGINT does the same as SIGTERM; a session that has not even said EHLO is idle too.
#[test]
fn sigint_drains_too() {
    timed(30, || {
        let up = Upstream::start();
        let mut p = ProxyBuilder::new().upstream(&up).start();
        let mut fresh = p.connect();
        assert_eq!(fresh.greeting().code, 220);
        let mut idle = p.open();
        p.signal(Signal::SIGINT);
        assert_shutting_down(&idle.reply(), "idle session");
        assert_shutting_down(&fresh.reply(), "session before EHLO");
        let status = wait_exit(&mut p, secs(5));
        assert_eq!(status.code(), Some(0), "{status:?}");
    });
}

/// Sessions still in a transaction at DrainTimeout are told 421; the upstream never gets a
/// terminated DATA from them, whether the filter was still running, the client was still
/// sending the body, or the upstream had not yet answered DATA.
#[test]
fn sessions_at_the_deadline_get_421_and_nothing_half_delivered() {
    timed(40, || {
        // Upstream session 2 (the third client) answers DATA only after 4 s.
        let up = Upstream::builder()
            .reply_with("DATA", |call| {
                (call.session == 2)
                    .then(|| Reply::text("354 End data with <CR><LF>.<CR><LF>").delay(secs(4)))
            })
            .start();
        let b = ProxyBuilder::new().upstream(&up).set("DrainTimeout", "1");
        let filter = b.script(
            "filter.sh",
            "echo $$ >> {OUT}/pids\nf={OUT}/m.$$; cat > $f\n\
             if grep -q SLOW-FILTER $f; then : > {OUT}/slow; sleep 30; fi\ncat $f\n",
        );
        let mut p = b.set("FilterCommand", &filter).start();

        // A: the filter will still be running at the deadline.
        let mut a = p.open();
        // B: still sending its body at the deadline.
        let mut b = p.open();
        // C: the upstream has not answered DATA at the deadline.
        let mut c = p.open();
        assert!(up.wait(secs(5), |s| s.sessions.len() == 3));
        for cl in [&mut a, &mut b, &mut c] {
            cl.set_timeout(secs(20));
            assert_eq!(cl.cmd("MAIL FROM:<alice@example.org>").code, 250);
            assert_eq!(cl.cmd("RCPT TO:<bob@example.net>").code, 250);
            assert_eq!(cl.cmd("DATA").code, 354);
        }
        a.send(common::stuff(&common::message("a", b"SLOW-FILTER\r\n")));
        b.send("Subject: b\r\n\r\nfirst half of the body\r\n");
        c.send(common::stuff(&common::message("c", b"waits for 354\r\n")));
        assert!(wait_until(secs(5), || p.out("slow").exists()), "A's filter");
        assert!(
            up.wait_command(2, secs(10), |l| l == "DATA"),
            "C never reached DATA upstream"
        );

        p.signal(Signal::SIGTERM);
        let term = Instant::now();
        for (name, cl) in [("A", &mut a), ("B", &mut b), ("C", &mut c)] {
            let r = cl.reply();
            assert_shutting_down(&r, name);
            let at = term.elapsed();
            assert!(
                at >= ms(900) && at < secs(4),
                "{name} was told 421 after {at:?}; DrainTimeout is 1 s"
            );
            assert!(cl.wait_eof(secs(3)), "{name} not closed after 421");
        }
        let status = wait_exit(&mut p, secs(8));
        assert_eq!(status.code(), Some(0), "{status:?}");

        // Nothing was delivered, and no DATA section upstream was ever terminated.
        std::thread::sleep(ms(300));
        let messages = up.messages();
        assert!(
            messages.iter().all(|m| !m.complete),
            "the upstream received a terminated DATA: {:#?}",
            up.summary()
        );
        assert!(up.delivered().is_empty(), "{:#?}", up.summary());
        // The slow filter did not outlive the proxy.
        let pids: Vec<i32> = std::fs::read_to_string(p.out("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for pid in &pids {
            p.adopt_pid(*pid);
        }
        assert!(
            wait_until(secs(3), || pids.iter().all(|pid| !pid_alive(*pid))),
            "filter processes still running after the proxy exited: {pids:?}"
        );
    });
}
