//! Fault matrix, client side: the client disconnects mid-command or mid-DATA, trickles
//! slower than TimeOut, pipelines a burst of transactions, and sends overlong lines, NUL
//! bytes, bare CR/LF, invalid UTF-8 and thousands of recipients. Every case ends with
//! [`fault_support::Watch::check`]: no 2xx for a message the upstream did not accept, no
//! temp file, process or descriptor left, and a new session still delivers.

use crate::common;

use std::thread;

use crate::common::{
    ms, normalize_crlf, secs, stuff, timed, Client, Proxy, ProxyBuilder, Upstream,
};
use crate::fault_support::{contains, tagged_message, upstream_accepted, Attempt, Watch};

struct Setup {
    up: Upstream,
    p: Proxy,
    watch: Watch,
}

fn setup(settings: &[(&str, &str)]) -> Setup {
    let up = Upstream::start();
    let mut b = ProxyBuilder::new()
        .upstream(&up)
        .set("FilterCommand", "cat");
    for (k, v) in settings {
        b = b.set(k, v);
    }
    let tmp = b.tmp_dir();
    let p = b.start();
    let watch = Watch::start(&p, &up, &tmp);
    Setup { up, p, watch }
}

impl Setup {
    fn check(&self, attempts: &[Attempt]) {
        self.watch.check(&self.p, &self.up, attempts, &[]);
    }

    /// Nothing but the warm-up reached the upstream as a message.
    fn assert_only_warmup_delivered(&self) {
        thread::sleep(ms(200));
        let n = self.up.messages().len();
        assert_eq!(n, 1, "messages at the upstream: {:#?}", self.up.summary());
    }
}

/// Sends each byte string in its own session right after the greeting, then closes.
fn send_and_vanish(s: &Setup, sends: &[&[u8]]) {
    for bytes in sends {
        let mut c = s.p.connect();
        c.greeting();
        c.send(bytes);
        c.close();
    }
}

#[test]
fn client_disconnects_mid_command() {
    timed(60, || {
        let s = setup(&[]);
        send_and_vanish(
            &s,
            &[
                b"EHLO c\r\nMAIL FROM:<fault-1@faults.test>\r\n",
                b"EHLO c\r\nMAIL FROM:<fault-2@faults.test>\r\nRCPT TO:<bob@faults.test>\r\nDATA\r\n",
                b"EHLO c\r\nMAIL FROM:<fault-3@faults.test>\r\nRCPT TO:<bob@faults.test>\r\nDATA\r\nSubject: x\r\n",
            ],
        );
        s.assert_only_warmup_delivered();
        s.check(&[]);
    });
}

#[test]
fn client_disconnects_in_the_middle_of_a_command_line() {
    timed(60, || {
        let s = setup(&[]);
        send_and_vanish(
            &s,
            &[
                b"MAIL FROM:<fault-partial@faults.test>",
                b"EHLO c\r\nMAIL FROM:<fault-partial@faults.test>\r\nRCPT TO:<bob@fau",
            ],
        );
        s.assert_only_warmup_delivered();
        // Within 8 s, far below TimeOut (20 s): the upstream connection must be gone too.
        s.check(&[]);
        let partial =
            s.up.sessions()
                .iter()
                .flat_map(|x| x.commands.clone())
                .any(|l| !l.ends_with(b"\n"));
        assert!(
            !partial,
            "a partial line reached the upstream: {:#?}",
            s.up.summary()
        );
    });
}

/// MAIL, RCPT, DATA, then part of a body.
fn into_data(c: &mut Client, id: &str) {
    assert_eq!(c.cmd(&format!("MAIL FROM:<{id}@faults.test>")).code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@faults.test>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
}

#[test]
fn client_disconnects_mid_data() {
    timed(60, || {
        for filter in [("pipe", "cat"), ("file", "true")] {
            let mut s = setup(&[("FilterType", filter.0), ("FilterCommand", filter.1)]);
            // Right after 354, after part of the body, and after a body line that is
            // only missing its dot.
            let partials: [&[u8]; 3] = [
                b"",
                b"Subject: cut\r\n\r\nhalf a line",
                b"Subject: cut\r\n\r\nall but the dot\r\n",
            ];
            for partial in partials {
                let id = s.watch.id("fault-cut");
                let mut c = s.p.open();
                into_data(&mut c, &id);
                let mut body = tagged_message(&id, b"");
                body.extend_from_slice(&b"RCPT TO:<injected@faults.test>\r\n".repeat(3000));
                body.extend_from_slice(partial);
                c.send(&body);
                thread::sleep(ms(100));
                c.close();
            }
            s.assert_only_warmup_delivered();
            s.check(&[]);
        }
    });
}

#[test]
fn client_trickles_slower_than_timeout() {
    timed(90, || {
        let mut s = setup(&[("TimeOut", "2")]);
        // Mid-command, mid-body, and idle between commands: each pause is longer than
        // TimeOut, so the proxy gives up with 421 and closes; nothing is delivered.
        let mut attempts = Vec::new();
        for stage in ["command", "body", "idle"] {
            let id = s.watch.id("fault-trickle");
            let mut a = Attempt::new(&id);
            let mut c = s.p.open();
            c.set_timeout(secs(8));
            match stage {
                "command" => c.send(b"MAIL FROM:<fault-"),
                "body" => {
                    into_data(&mut c, &id);
                    c.send(tagged_message(&id, b"slow"));
                }
                _ => {}
            }
            // Well past TimeOut, so that a late timer cannot let the rest in.
            thread::sleep(ms(4500));
            let _ = c.try_send(b"more\r\n.\r\n");
            a.final_reply = a.read(&mut c);
            assert!(
                a.final_code()
                    .is_some_and(|code| (400..500).contains(&code))
                    || a.ended.is_some(),
                "{stage}: {a:?}"
            );
            assert!(c.wait_eof(secs(5)), "{stage}: still connected");
            attempts.push(a);
        }
        s.assert_only_warmup_delivered();
        s.check(&attempts);
    });
}

#[test]
fn client_pipelines_a_burst_of_50_transactions() {
    timed(90, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        // Every fifth message is rejected by the filter: the replies must still match.
        let script = b.script(
            "filter.sh",
            "case \"$SENDER\" in\n*reject*) echo '550 5.7.1 rejected' >&2; exit 1;;\nesac\nexec cat\n",
        );
        let tmp = b.tmp_dir();
        let p = b.set("FilterCommand", &script).start();
        let mut watch = Watch::start(&p, &up, &tmp);
        let ids: Vec<String> = (0..50)
            .map(|i| {
                let kind = if i % 5 == 4 { "reject" } else { "burst" };
                watch.id(&format!("fault-{kind}"))
            })
            .collect();
        let mut burst = Vec::new();
        for id in &ids {
            burst.extend_from_slice(
                format!("MAIL FROM:<{id}@faults.test>\r\nRCPT TO:<bob@faults.test>\r\nDATA\r\n")
                    .as_bytes(),
            );
            burst.extend_from_slice(&stuff(&tagged_message(id, b"pipelined\r\n")));
        }
        burst.extend_from_slice(b"QUIT\r\n");
        let mut c = p.open();
        c.set_timeout(secs(20));
        c.send(&burst);
        let mut attempts = Vec::new();
        for id in &ids {
            let mut a = Attempt::new(id);
            for want in [250, 250, 354] {
                let r = a.read(&mut c).unwrap_or_else(|| panic!("{id}: {a:?}"));
                assert_eq!(r.code, want, "{id}: {a:?}");
            }
            a.final_reply = a.read(&mut c);
            let want = if id.contains("reject") { 550 } else { 250 };
            assert_eq!(a.final_code(), Some(want), "{id}: {a:?}");
            attempts.push(a);
        }
        assert_eq!(c.reply().code, 221);
        for id in &ids {
            assert_eq!(
                upstream_accepted(&up, id),
                !id.contains("reject"),
                "{id}: {:#?}",
                up.summary()
            );
        }
        watch.check(&p, &up, &attempts, &[]);
    });
}

/// Sends one message with `content` (already CRLF-terminated lines, not stuffed) and
/// returns the final reply and what the upstream got.
fn send_content(s: &mut Setup, id: &str, content: &[u8]) -> (Attempt, Vec<u8>) {
    let mut c = s.p.open();
    let mut a = Attempt::new(id);
    into_data(&mut c, id);
    c.send(stuff(content));
    a.final_reply = a.read(&mut c);
    let got =
        s.up.delivered()
            .into_iter()
            .find(|m| contains(&m.content, format!("id={id}\r\n").as_bytes()))
            .map(|m| m.content)
            .unwrap_or_default();
    (a, got)
}

#[test]
fn client_sends_10000_byte_lines() {
    timed(60, || {
        let mut s = setup(&[]);
        let mut c = s.p.open();
        for line in [
            format!("NOOP {}", "x".repeat(10_000)),
            format!("MAIL FROM:<{}@faults.test>", "y".repeat(10_000)),
            format!("RCPT TO:<{}@faults.test>", "z".repeat(10_000)),
        ] {
            assert_eq!(c.cmd(&line).code, 500, "{}", &line[..20]);
            assert_eq!(c.cmd("NOOP").code, 250, "out of step");
        }
        drop(c);
        // In a body, long lines are content: delivered as sent.
        let id = s.watch.id("fault-longline");
        let body = format!("{}\r\n{}\r\n", "a".repeat(10_000), "b".repeat(50_000));
        let content = tagged_message(&id, body.as_bytes());
        let (a, got) = send_content(&mut s, &id, &content);
        assert_eq!(a.final_code(), Some(250), "{a:?}");
        assert_bytes_eq!(got, content, "long body lines changed");
        s.check(&[a]);
    });
}

#[test]
fn client_sends_nul_bytes_bare_cr_lf_and_invalid_utf8() {
    timed(60, || {
        let mut s = setup(&[]);
        // Commands: the session stays in step whatever the bytes.
        let mut c = s.p.open();
        for line in [
            &b"NOOP a\0b\r\n"[..],
            b"NOOP \xff\xfe\xc3\x28\r\n",
            b"NOOP bare\rcr\r\n",
            b"NOOP bare lf\n",
            b"\0\0\0\r\n",
        ] {
            c.send(line);
            c.reply();
            assert_eq!(c.cmd("NOOP").code, 250, "out of step after {line:?}");
        }
        drop(c);
        let mut attempts = Vec::new();
        // A body with NUL octets is refused after its dot (a receiver that drops NULs
        // would see `CRLF NUL . CRLF` as the end of the data); the session goes on.
        let id = s.watch.id("fault-nul");
        let content = tagged_message(&id, b"a NUL \0 here\r\n\0\0\0\r\n");
        let (a, _) = send_content(&mut s, &id, &content);
        assert_eq!(a.final_code(), Some(554), "nul: {a:?}");
        attempts.push(a);
        let bodies: [(&str, &[u8]); 2] = [
            ("utf8", b"bad \xff\xfe \xc3\x28 bytes\r\n"),
            ("bare", b"bare\rCR and bare\nLF\r\nand \r\r\n\n end\r\n"),
        ];
        for (what, body) in bodies {
            let id = s.watch.id(&format!("fault-{what}"));
            let content = tagged_message(&id, body);
            let (a, got) = send_content(&mut s, &id, &content);
            assert_eq!(a.final_code(), Some(250), "{what}: {a:?}");
            // Bare CR and LF become CRLF; every other byte arrives unchanged.
            assert_bytes_eq!(got, normalize_crlf(&content), "{what}");
            attempts.push(a);
        }
        s.check(&attempts);
    });
}

#[test]
fn client_sends_2000_recipients() {
    timed(60, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let script = b.script(
            "count.sh",
            "printf '%s\\n' \"$RECIPIENTS\" | wc -l > {OUT}/recipients\nexec cat\n",
        );
        let tmp = b.tmp_dir();
        let p = b.set("FilterCommand", &script).start();
        let mut watch = Watch::start(&p, &up, &tmp);
        let id = watch.id("fault-many");
        let mut c = p.open();
        c.set_timeout(secs(20));
        let mut cmds = format!("MAIL FROM:<{id}@faults.test>\r\n");
        for i in 0..2000 {
            cmds.push_str(&format!("RCPT TO:<rcpt{i:04}@faults.test>\r\n"));
        }
        c.send(cmds.as_bytes());
        let mut a = Attempt::new(&id);
        for _ in 0..2001 {
            let r = a.read(&mut c).unwrap_or_else(|| panic!("{:?}", a.ended));
            assert_eq!(r.code, 250);
        }
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(stuff(&tagged_message(&id, b"to many\r\n")));
        a.final_reply = a.read(&mut c);
        assert_eq!(a.final_code(), Some(250), "{a:?}");
        let m = up.expect_one_with(&id);
        assert_eq!(m.rcpts.len(), 2000);
        let counted = std::fs::read_to_string(p.out("recipients")).unwrap_or_default();
        assert_eq!(counted.trim(), "2000", "RECIPIENTS seen by the filter");
        assert_eq!(c.cmd("QUIT").code, 221);
        drop(c);
        watch.check(&p, &up, &[a], &[]);
    });
}

trait ExpectWith {
    fn expect_one_with(&self, id: &str) -> common::upstream::Message;
}

impl ExpectWith for Upstream {
    fn expect_one_with(&self, id: &str) -> common::upstream::Message {
        let needle = format!("id={id}\r\n");
        self.delivered()
            .into_iter()
            .find(|m| contains(&m.content, needle.as_bytes()))
            .unwrap_or_else(|| panic!("{id} not delivered: {:#?}", self.summary()))
    }
}

#[test]
fn client_recipients_beyond_the_environment_limit_tempfail() {
    timed(60, || {
        // Linux limits one environment string to 128 KiB (MAX_ARG_STRLEN): RECIPIENTS
        // longer than that cannot be given to a filter, which then cannot start. The
        // message is tempfailed, never accepted, and the session goes on.
        let mut s = setup(&[]);
        let id = s.watch.id("fault-e2big");
        let mut c = s.p.open();
        c.set_timeout(secs(20));
        let mut cmds = format!("MAIL FROM:<{id}@faults.test>\r\n");
        let local = "r".repeat(50);
        for i in 0..2800 {
            cmds.push_str(&format!("RCPT TO:<{local}{i:04}@faults.test>\r\n"));
        }
        c.send(cmds.as_bytes());
        let mut a = Attempt::new(&id);
        for _ in 0..2801 {
            let r = a.read(&mut c).unwrap_or_else(|| panic!("{:?}", a.ended));
            assert_eq!(r.code, 250);
        }
        assert_eq!(c.cmd("DATA").code, 354);
        c.send(stuff(&tagged_message(&id, b"to too many\r\n")));
        a.final_reply = a.read(&mut c);
        assert_eq!(a.final_code(), Some(451), "{a:?}");
        assert_eq!(c.cmd("NOOP").code, 250);
        drop(c);
        s.assert_only_warmup_delivered();
        s.check(&[a]);
    });
}
