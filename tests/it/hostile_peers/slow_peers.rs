//! Peers that send a byte at a time. `TimeOut` bounds a whole command line and a whole
//! reply, not each read, and a body must arrive at `MinDataRate`: a client dripping a byte
//! every `TimeOut - 1` seconds is cut off with `421 4.4.2` (and its upstream connection
//! closed), while a slow but honest link still delivers.

use std::thread;
use std::time::{Duration, Instant};

use crate::common::{message, ms, secs, stuff, timed, Client, Proxy, ProxyBuilder, Upstream};

fn proxy(up: &Upstream, settings: &[(&str, &str)]) -> Proxy {
    let mut b = ProxyBuilder::new().upstream(up).set("TimeOut", "3");
    for (k, v) in settings {
        b = b.set(k, v);
    }
    b.start()
}

/// A proxy (with `filter` as FilterCommand, if any) and a client that has had its 354.
fn into_data(up: &Upstream, filter: Option<&str>, settings: &[(&str, &str)]) -> (Proxy, Client) {
    let mut all = settings.to_vec();
    if let Some(f) = filter {
        all.push(("FilterCommand", f));
    }
    let p = proxy(up, &all);
    let mut c = p.open();
    assert_eq!(c.cmd("MAIL FROM:<a@example.org>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<b@example.net>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    (p, c)
}

/// Sends `bytes` one at a time, `gap` apart, until the proxy answers or closes (or the
/// bytes run out); returns when the answer came, measured from the first byte.
fn drip(c: &mut Client, bytes: &[u8], gap: Duration) -> Option<(Duration, u16)> {
    let start = Instant::now();
    c.set_timeout(gap);
    for b in bytes {
        if c.try_send(&[*b]).is_err() {
            break;
        }
        if let Ok(r) = c.try_reply() {
            return Some((start.elapsed(), r.code));
        }
    }
    c.set_timeout(secs(5));
    c.try_reply().ok().map(|r| (start.elapsed(), r.code))
}

#[test]
fn a_command_dripped_a_byte_at_a_time_is_cut_off_at_timeout() {
    timed(60, || {
        let up = Upstream::start();
        let p = proxy(&up, &[]);
        let mut c = p.open();
        // A byte every second: each read is well inside TimeOut (3 s), the line is not.
        let (after, code) = drip(&mut c, b"MAIL FROM:<slow@example.org>\r\n", secs(1))
            .expect("no answer to a dripped command");
        assert_eq!(code, 421, "answered {code} after {after:?}");
        assert!(after < secs(6), "cut off only after {after:?}");
        assert!(c.wait_eof(secs(5)), "client connection left open");
        // Its upstream connection is closed with it, and never saw the command.
        assert!(up.wait_closed(0, secs(5)), "upstream connection left open");
        assert!(up.session(0).lines().iter().all(|l| !l.contains("slow@")));
    });
}

#[test]
fn a_body_dripped_below_the_minimum_rate_is_cut_off() {
    timed(60, || {
        for filter in [None, Some("cat")] {
            let up = Upstream::start();
            let (_p, mut c) = into_data(&up, filter, &[]);
            let body = stuff(&message("drip", &b"x".repeat(200)));
            let (after, code) = drip(&mut c, &body, ms(700)).expect("no answer to a dripped body");
            assert_eq!(code, 421, "{filter:?}: answered {code} after {after:?}");
            assert!(after < secs(6), "{filter:?}: cut off only after {after:?}");
            assert!(c.wait_eof(secs(5)), "{filter:?}");
            assert!(up.delivered().is_empty(), "{filter:?}");
        }
    });
}

#[test]
fn a_slow_but_honest_link_delivers() {
    timed(60, || {
        for filter in [None, Some("cat")] {
            let up = Upstream::start();
            let (_p, mut c) = into_data(&up, filter, &[("MinDataRate", "500")]);
            // About 800 bytes a second for 6 s: twice TimeOut, above the minimum rate.
            let content = message("honest", &b"0123456789abcdef\r\n".repeat(260));
            let wire = stuff(&content);
            let start = Instant::now();
            for chunk in wire.chunks(80) {
                c.send(chunk);
                thread::sleep(ms(100));
            }
            c.set_timeout(secs(10));
            let r = c.reply();
            assert_eq!(r.code, 250, "{filter:?}: {r:?} after {:?}", start.elapsed());
            assert!(
                start.elapsed() > secs(5),
                "the link was not slow enough to show it"
            );
            assert_eq!(up.delivered().len(), 1, "{filter:?}");
        }
    });
}

#[test]
fn drippers_cannot_hold_every_connection() {
    timed(60, || {
        let up = Upstream::start();
        let p = proxy(&up, &[("MaxConnections", "2")]);
        let addr = p.addr();
        let drippers: Vec<_> = (0..2)
            .map(|_| {
                thread::spawn(move || {
                    let mut c = Client::connect(addr);
                    c.greeting();
                    drip(&mut c, b"EHLO a-very-slow-client.example.org\r\n", secs(1))
                })
            })
            .collect();
        thread::sleep(ms(500));
        // Both slots are held now; once TimeOut has passed they are free again.
        for d in drippers {
            let answer = d.join().expect("dripper");
            assert_eq!(answer.map(|a| a.1), Some(421), "{answer:?}");
        }
        let mut c = Client::connect(addr);
        assert_eq!(c.greeting().code, 220);
        assert_eq!(c.cmd("EHLO client.example").code, 250);
    });
}
