//! The filter contract: pipe and file modes, the environment, verdicts (reject texts, silent
//! drop, temporary failures), timeouts, abnormal ends, and Header insertion.

use crate::common;

use std::time::Instant;

use crate::common::proxy::pid_alive;
use crate::common::{default_message, message, ms, secs, timed, Proxy, ProxyBuilder, Upstream};

/// A pipe filter that passes the message unless it contains one of the `CASE-...` markers,
/// in which case it prints the row's stderr text and exits with its status.
const VERDICT_FILTER: &str = r#"f={OUT}/in.$$
cat > "$f"
verdict() { rm -f "$f"; printf "$1" >&2; exit "$2"; }
grep -q CASE-550 "$f" && verdict '550 Bad Email\n' 1
grep -q CASE-PLAIN "$f" && verdict 'Go away spammer\n' 1
grep -q CASE-450 "$f" && verdict '450 4.7.1 try later\n' 75
grep -q CASE-SILENT "$f" && verdict '' 3
grep -q CASE-LASTLINE "$f" && verdict 'first line\n  554 5.7.1 Go away spammer  \n\n   \n' 1
grep -q CASE-DROP "$f" && verdict '250 Dropped silently\n' 1
grep -q CASE-ODDCODE "$f" && verdict '199 odd code\n' 1
grep -q CASE-CONTINUATION "$f" && verdict '550-5.7.1 dangling\n' 1
cat "$f"
rm -f "$f"
"#;

fn verdict_proxy(up: &Upstream) -> Proxy {
    let b = ProxyBuilder::new().upstream(up);
    let f = b.script("verdict.sh", VERDICT_FILTER);
    b.set("FilterCommand", &f).start()
}

/// Sends a message carrying `marker`; returns the final reply's raw text after checking that
/// the upstream got RSET and no DATA for it, and that a following message is delivered.
fn rejected_then_usable(marker: &str) -> String {
    let up = Upstream::start();
    let p = verdict_proxy(&up);
    let mut c = p.open();
    let fin = c.send_mail(&message(
        "reject",
        format!("{marker} please\r\n").as_bytes(),
    ));
    up.wait_command(0, secs(3), |l| l == "RSET");
    let s = up.session(0);
    s.assert_no_verb("DATA");
    assert!(s.messages.is_empty(), "upstream got the rejected message");
    assert_eq!(
        s.lines().last().map(|l| l.as_str()),
        Some("RSET"),
        "no RSET after the rejection: {:?}",
        s.lines()
    );
    p.assert_tmp_clean();
    // The connection and the upstream transaction are usable afterwards.
    let next = default_message();
    let t = c.transaction("<carol@example.org>", &["<dave@example.net>"], &next);
    assert_eq!(t.final_reply.code, 250, "message after the rejection");
    let m = up.expect_one();
    assert_bytes_eq!(m.content, next);
    assert_eq!(m.mail_from, b"MAIL FROM:<carol@example.org>\r\n");
    fin.raw_str()
}

#[test]
fn reject_with_code_from_stderr() {
    timed(30, || {
        assert_eq!(rejected_then_usable("CASE-550"), "550 Bad Email\r\n")
    });
}

#[test]
fn reject_plain_text_gets_prefix() {
    timed(30, || {
        assert_eq!(
            rejected_then_usable("CASE-PLAIN"),
            "550 Content Rejected; Go away spammer\r\n"
        )
    });
}

#[test]
fn reject_temporary_450() {
    timed(30, || {
        assert_eq!(rejected_then_usable("CASE-450"), "450 4.7.1 try later\r\n")
    });
}

#[test]
fn reject_without_stderr() {
    timed(30, || {
        assert_eq!(
            rejected_then_usable("CASE-SILENT"),
            "550 Content Rejected; Content Rejected\r\n"
        )
    });
}

#[test]
fn reject_uses_last_non_blank_stderr_line_trimmed() {
    timed(30, || {
        assert_eq!(
            rejected_then_usable("CASE-LASTLINE"),
            "554 5.7.1 Go away spammer\r\n"
        )
    });
}

#[test]
fn silent_drop_with_250() {
    timed(30, || {
        assert_eq!(
            rejected_then_usable("CASE-DROP"),
            "250 Dropped silently\r\n"
        )
    });
}

#[test]
fn reject_code_outside_2xx_4xx_5xx_gets_prefix() {
    // deviation from 1.10: the original sends any leading 3-digit code as is.
    timed(30, || {
        assert_eq!(
            rejected_then_usable("CASE-ODDCODE"),
            "550 Content Rejected; 199 odd code\r\n"
        )
    });
}

#[test]
fn reject_continuation_line_sent_as_final_line() {
    // deviation from 1.10: the original sends `550-...` as a dangling continuation line.
    timed(30, || {
        assert_eq!(
            rejected_then_usable("CASE-CONTINUATION"),
            "550 5.7.1 dangling\r\n"
        )
    });
}

#[test]
fn stderr_ignored_when_filter_succeeds() {
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::with_filter(&up, "echo '550 not really' >&2; cat");
        let mut c = p.open();
        assert_eq!(
            c.send_mail(&default_message()).raw_str(),
            "250 2.0.0 Ok: queued as UP0001\r\n"
        );
        assert_bytes_eq!(up.expect_one().content, default_message());
    });
}

#[test]
fn pipe_filter_output_is_delivered() {
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let f =
            b.counted("printf 'X-Filter-Was-Here: yes\\r\\n'; sed 's/Hello world/HELLO PLANET/'");
        let p = b.set("FilterCommand", &f).start();
        let mut c = p.open();
        assert_eq!(c.send_mail(&default_message()).code, 250);
        let mut want = b"X-Filter-Was-Here: yes\r\n".to_vec();
        want.extend(
            String::from_utf8_lossy(&default_message())
                .replace("Hello world", "HELLO PLANET")
                .bytes(),
        );
        assert_bytes_eq!(up.expect_one().content, want);
        assert_eq!(p.filter_runs(), 1);
        p.assert_tmp_clean();
    });
}

#[test]
fn pipe_filter_gets_exact_message_and_environment() {
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let (f, rec) = b.env_recorder();
        let tmp = b.tmp_dir().display().to_string();
        let p = b.set("FilterCommand", &f).start();
        let mut c = p.open();
        let msg = default_message();
        let t = c.transaction(
            "<alice@example.org> SIZE=1234 BODY=8BITMIME",
            &[
                "<r1@example.net>",
                "<r2@example.net> NOTIFY=NEVER",
                "<r3@example.com>",
            ],
            &msg,
        );
        assert_eq!(t.final_reply.code, 250);
        assert_bytes_eq!(up.expect_one().content, msg);
        let run = &rec.wait_runs(1, secs(5))[0];
        assert_bytes_eq!(run.stdin.clone().unwrap_or_default(), msg, "filter stdin");
        assert_eq!(run.var("SENDER"), Some("alice@example.org"));
        assert_eq!(
            run.var("RECIPIENTS"),
            Some("r1@example.net\nr2@example.net\nr3@example.com")
        );
        assert_eq!(run.var("CLIENT"), Some("127.0.0.1"));
        assert_eq!(run.var("SERVER"), Some("127.0.0.1"));
        assert_eq!(run.var("TMPDIR"), Some(tmp.as_str()));
        for absent in ["EMAIL", "REMOTE", "REMOTE_HELO"] {
            assert_eq!(
                run.var(absent),
                None,
                "{absent} set in pipe mode without XFORWARD"
            );
        }
    });
}

#[test]
fn null_sender_and_only_accepted_recipients() {
    timed(30, || {
        let up = Upstream::builder()
            .reply_when(
                "RCPT",
                "nobody@",
                "550 5.1.1 <nobody@example.net>: User unknown",
            )
            .start();
        let (p, rec) = Proxy::recording_env(&up);
        let mut c = p.open();
        assert_eq!(c.cmd("MAIL FROM:<>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<one@example.net>").code, 250);
        assert_eq!(
            c.cmd("RCPT TO:<nobody@example.net>").raw_str(),
            "550 5.1.1 <nobody@example.net>: User unknown\r\n"
        );
        assert_eq!(c.cmd("RCPT TO:<two@example.net>").code, 250);
        assert_eq!(c.cmd("DATA").code, 354);
        assert_eq!(c.body(&default_message()).code, 250);
        rec.assert_one_envelope("<>", "one@example.net\ntwo@example.net");
    });
}

#[test]
fn rset_clears_the_envelope() {
    timed(30, || {
        let up = Upstream::start();
        let (p, rec) = Proxy::recording_env(&up);
        let mut c = p.open();
        assert_eq!(c.cmd("MAIL FROM:<first@example.org>").code, 250);
        assert_eq!(c.cmd("RCPT TO:<x1@example.net>").code, 250);
        assert_eq!(c.cmd("RSET").code, 250);
        let t = c.transaction(
            "<second@example.org>",
            &["<x2@example.net>"],
            &default_message(),
        );
        assert_eq!(t.final_reply.code, 250);
        rec.assert_one_envelope("second@example.org", "x2@example.net");
        assert_eq!(
            up.expect_one().mail_from,
            b"MAIL FROM:<second@example.org>\r\n"
        );
    });
}

#[test]
fn two_messages_each_with_its_own_envelope() {
    timed(30, || {
        let up = Upstream::start();
        let (p, rec) = Proxy::recording_env(&up);
        let mut c = p.open();
        let (m1, m2) = (message("one", b"first\r\n"), message("two", b"second\r\n"));
        c.transaction(
            "<a1@example.org>",
            &["<b1@example.net>", "<c1@example.net>"],
            &m1,
        );
        c.transaction("<a2@example.org>", &["<b2@example.net>"], &m2);
        let d = up.wait_delivered(2, secs(5));
        assert_bytes_eq!(d[0].content, m1);
        assert_bytes_eq!(d[1].content, m2);
        let runs = rec.wait_runs(2, secs(5));
        assert_eq!(
            (runs[0].var("SENDER"), runs[0].var("RECIPIENTS")),
            (
                Some("a1@example.org"),
                Some("b1@example.net\nc1@example.net")
            )
        );
        assert_eq!(
            (runs[1].var("SENDER"), runs[1].var("RECIPIENTS")),
            (Some("a2@example.org"), Some("b2@example.net"))
        );
        assert_eq!(up.session_count(), 1);
        p.assert_tmp_clean();
    });
}

#[test]
fn server_variable_is_the_unix_socket_path() {
    timed(30, || {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("up.sock");
        let up = Upstream::builder().unix(&sock).start();
        let (p, rec) = Proxy::recording_env(&up);
        assert_eq!(p.open().send_mail(&default_message()).code, 250);
        assert_eq!(
            rec.wait_runs(1, secs(5))[0].var("SERVER"),
            Some(sock.to_str().unwrap_or(""))
        );
    });
}

#[test]
fn file_mode_filter_edits_in_place() {
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let f = b.script(
            "edit.sh",
            r#"echo "$EMAIL" > {OUT}/email_path
stat -c %a "$EMAIL" > {OUT}/email_mode
{ printf 'X-File-Filter: edited\r\n'; sed 's/Hello world/Goodbye world/' "$EMAIL"; } > "$EMAIL.new"
mv "$EMAIL.new" "$EMAIL"
"#,
        );
        let tmp = b.tmp_dir();
        let p = b.set("FilterCommand", &f).set("FilterType", "file").start();
        let mut c = p.open();
        assert_eq!(c.send_mail(&default_message()).code, 250);
        let mut want = b"X-File-Filter: edited\r\n".to_vec();
        want.extend(
            String::from_utf8_lossy(&default_message())
                .replace("Hello world", "Goodbye world")
                .bytes(),
        );
        assert_bytes_eq!(up.expect_one().content, want);
        let email = std::fs::read_to_string(p.out("email_path"))
            .expect("email path")
            .trim()
            .to_string();
        assert_eq!(
            std::path::Path::new(&email).parent(),
            Some(tmp.as_path()),
            "EMAIL not inside TempDirectory"
        );
        assert_eq!(
            std::fs::read_to_string(p.out("email_mode"))
                .expect("mode")
                .trim(),
            "600"
        );
        assert!(
            common::wait_until(secs(3), || !std::path::Path::new(&email).exists()),
            "EMAIL file left behind"
        );
        p.assert_tmp_clean();
    });
}

/// A transaction's spool files are removed before the session answers its next command, as
/// the original's were: a file filter's $EMAIL, a pipe filter's input and output, whether
/// the message was delivered, refused by the filter or refused for NUL octets. No waiting
/// here: NOOP's reply is the moment.
#[test]
fn spool_files_are_gone_before_the_next_command_is_answered() {
    timed(60, || {
        let up = Upstream::start();
        for filter_type in ["file", "pipe"] {
            for (filter, code) in [("cat", 250), ("echo '554 no' >&2; exit 1", 554)] {
                let filter = match filter_type {
                    "file" if code == 250 => "true",
                    _ => filter,
                };
                let p = ProxyBuilder::new()
                    .upstream(&up)
                    .set("FilterCommand", filter)
                    .set("FilterType", filter_type)
                    .start();
                let mut c = p.open();
                let clean = |c: &mut common::Client, what: &str| {
                    assert_eq!(c.cmd("NOOP").code, 250);
                    assert!(
                        p.tmp_files().is_empty(),
                        "{filter_type} filter, {what}: files left when NOOP was answered: {:?}",
                        p.tmp_files()
                    );
                };
                for _ in 0..5 {
                    assert_eq!(c.send_mail(&default_message()).code, code, "{filter_type}");
                    clean(&mut c, &code.to_string());
                }
                // Refused for its NUL octets before any filter runs.
                let nul = message("nul", b"a NUL \0 here\r\n");
                assert_eq!(c.send_mail(&nul).code, 554, "{filter_type}");
                clean(&mut c, "NUL");
            }
        }
    });
}

#[test]
fn file_mode_environment() {
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let (f, rec) = b.env_recorder();
        let tmp = b.tmp_dir().display().to_string();
        let p = b.set("FilterCommand", &f).set("FilterType", "file").start();
        let mut c = p.open();
        let msg = default_message();
        c.transaction(
            "<alice@example.org>",
            &["<x@example.net>", "<y@example.net>"],
            &msg,
        );
        let run = &rec.wait_runs(1, secs(5))[0];
        let email = run
            .var("EMAIL")
            .unwrap_or_else(|| panic!("EMAIL not set in file mode"))
            .to_string();
        assert!(
            email.starts_with(&format!("{tmp}/")),
            "EMAIL={email} not in TempDirectory {tmp}"
        );
        assert_bytes_eq!(run.email.clone().unwrap_or_default(), msg, "$EMAIL content");
        assert_eq!(run.email_mode.as_deref(), Some("600"));
        assert_eq!(run.var("TMPDIR"), Some(tmp.as_str()));
        assert_eq!(run.var("SENDER"), Some("alice@example.org"));
        assert_eq!(run.var("RECIPIENTS"), Some("x@example.net\ny@example.net"));
        assert_eq!(run.var("CLIENT"), Some("127.0.0.1"));
        assert_bytes_eq!(up.expect_one().content, msg);
        p.assert_tmp_clean();
    });
}

#[test]
fn file_mode_reject() {
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("FilterCommand", "echo '554 file says no' >&2; exit 1")
            .set("FilterType", "file")
            .start();
        let mut c = p.open();
        assert_eq!(
            c.send_mail(&default_message()).raw_str(),
            "554 file says no\r\n"
        );
        up.assert_nothing_delivered();
        p.assert_tmp_clean();
    });
}

#[test]
fn file_mode_filter_deleting_the_file_is_a_local_error() {
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("FilterCommand", "rm -f \"$EMAIL\"")
            .set("FilterType", "file")
            .start();
        let mut c = p.open();
        assert_eq!(
            c.send_mail(&default_message()).raw_str(),
            "451 Local Error\r\n"
        );
        assert!(up.delivered().is_empty());
        assert_eq!(
            c.cmd("NOOP").code,
            250,
            "connection unusable after the local error"
        );
    });
}

#[test]
fn filter_timeout_gives_451_rset_and_kills_filter() {
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let f = format!(
            "echo $$ > {}/filter.pid; exec sleep 60",
            b.out_dir().display()
        );
        let p = b.set("FilterCommand", &f).set("FilterTimeout", "2").start();
        let mut c = p.open();
        let t0 = Instant::now();
        let fin = c.send_mail(&default_message());
        let dt = t0.elapsed();
        let pid = p.read_pid("filter.pid").expect("the filter never started");
        assert_eq!(fin.raw_str(), "451 Local Error\r\n");
        assert!(
            dt >= ms(1500) && dt <= secs(12),
            "reply after {dt:?} with FilterTimeout 2"
        );
        assert!(
            common::wait_until(secs(5), || !pid_alive(pid)),
            "filter {pid} still running"
        );
        up.wait_command(0, secs(3), |l| l == "RSET");
        assert_eq!(
            up.session(0).lines().last().map(|s| s.as_str()),
            Some("RSET")
        );
        up.assert_nothing_delivered();
        p.assert_tmp_clean();
        assert_eq!(c.cmd("NOOP").code, 250);
    });
}

#[test]
fn filter_timeout_kills_the_whole_process_group() {
    // deviation from 1.10: the original signals only the shell, grandchildren live on.
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let f = format!(
            "sleep 60 & echo $! > {}/grandchild.pid; cat > /dev/null; sleep 60",
            b.out_dir().display()
        );
        let p = b.set("FilterCommand", &f).set("FilterTimeout", "1").start();
        let mut c = p.open();
        assert_eq!(
            c.send_mail(&default_message()).raw_str(),
            "451 Local Error\r\n"
        );
        let gc = p.read_pid("grandchild.pid").expect("no grandchild pid");
        assert!(
            common::wait_until(secs(5), || !pid_alive(gc)),
            "grandchild {gc} of the filter still running"
        );
    });
}

#[test]
fn filter_killed_by_signal_gives_451() {
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::with_filter(&up, "cat >/dev/null; kill -9 $$");
        let mut c = p.open();
        assert_eq!(
            c.send_mail(&default_message()).raw_str(),
            "451 Local Error\r\n"
        );
        up.wait_command(0, secs(3), |l| l == "RSET");
        up.assert_nothing_delivered();
        p.assert_tmp_clean();
        assert_eq!(
            c.send_mail(&default_message()).raw_str(),
            "451 Local Error\r\n",
            "second message"
        );
    });
}

#[test]
fn filter_not_found_or_not_executable_gives_451() {
    // deviation from 1.10: the original answers exit status 126/127 with 550 Content Rejected.
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let not_exec = b.dir().join("not-executable.sh");
        std::fs::write(&not_exec, "#!/bin/sh\ncat\n").expect("write");
        for cmd in [
            "/nonexistent/filter-command",
            not_exec.to_str().unwrap_or(""),
        ] {
            let p = Proxy::with_filter(&up, cmd);
            let mut c = p.open();
            assert_eq!(
                c.send_mail(&default_message()).raw_str(),
                "451 Local Error\r\n",
                "{cmd}"
            );
        }
        up.assert_nothing_delivered();
    });
}

#[test]
fn filter_closing_input_early_is_answered_after_the_body() {
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::with_filter(&up, "echo '550 5.7.1 nope' >&2; exit 1");
        let mut c = p.open();
        let body = "RCPT TO:<injected@example.net>\r\n".repeat(40_000);
        let fin = c.send_mail(&message("big", body.as_bytes()));
        assert_eq!(fin.raw_str(), "550 5.7.1 nope\r\n");
        assert_eq!(
            c.cmd("NOOP").raw_str(),
            "250 2.0.0 Ok\r\n",
            "out of sync after the rejection"
        );
        let lines = up.session(0).lines();
        assert!(
            !lines.iter().any(|l| l.contains("injected")),
            "body lines reached the upstream as commands"
        );
    });
}

// ---- Header ----------------------------------------------------------------------------

fn deliver_with_header(header: &str, msg: &[u8], env: &[(&str, &str)]) -> Vec<u8> {
    let up = Upstream::start();
    let mut b = ProxyBuilder::new()
        .upstream(&up)
        .set("FilterCommand", "cat")
        .set("Header", header);
    for (k, v) in env {
        b = b.env(k, v);
    }
    let p = b.start();
    let mut c = p.open();
    assert_eq!(c.send_mail(msg).code, 250);
    up.expect_one().content
}

fn insert_before_blank_line(msg: &[u8], header: &[u8]) -> Vec<u8> {
    let i = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("blank line")
        + 2;
    [&msg[..i], header, &msg[i..]].concat()
}

#[test]
fn header_inserted_at_end_of_header_block_with_escapes() {
    timed(30, || {
        let got = deliver_with_header(
            "X-Scanned: client=%i local=%l pct=%% tab\\tend",
            &default_message(),
            &[],
        );
        let want = insert_before_blank_line(
            &default_message(),
            b"X-Scanned: client=127.0.0.1 local=127.0.0.1 pct=% tab\tend\r\n",
        );
        assert_bytes_eq!(got, want);
    });
}

#[test]
fn header_folded_with_crlf_tab_escape() {
    timed(30, || {
        let got = deliver_with_header("X-Fold: first\\r\\n\\tsecond", &default_message(), &[]);
        assert_bytes_eq!(
            got,
            insert_before_blank_line(&default_message(), b"X-Fold: first\r\n\tsecond\r\n")
        );
    });
}

#[test]
fn received_header_is_prepended() {
    timed(30, || {
        let got = deliver_with_header(
            "Received: from client [%i] by test-proxy",
            &default_message(),
            &[],
        );
        assert_bytes_eq!(
            got,
            [
                &b"Received: from client [127.0.0.1] by test-proxy\r\n"[..],
                &default_message()
            ]
            .concat()
        );
    });
}

fn date_header(tz: &str) -> String {
    let got = deliver_with_header("X-Date: %d", &default_message(), &[("TZ", tz)]);
    let text = String::from_utf8_lossy(&got).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("X-Date: "))
        .unwrap_or_else(|| panic!("no X-Date header: {text}"));
    line.trim_start_matches("X-Date: ").trim_end().to_string()
}

/// Checks the asctime part `Www Mmm dd hh:mm:ss yyyy` of a `%d` expansion.
fn check_asctime(d: &str) {
    let b = d.as_bytes();
    assert!(b.len() >= 24, "date too short: {d:?}");
    let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    assert!(days.contains(&&d[..3]), "weekday in {d:?}");
    assert_eq!(
        (b[3], b[7], b[10], b[13], b[16], b[19]),
        (b' ', b' ', b' ', b':', b':', b' '),
        "layout of {d:?}"
    );
    assert!(
        d[20..24].parse::<u32>().is_ok_and(|y| y >= 2024),
        "year in {d:?}"
    );
}

#[test]
fn header_date_whole_hour_zone() {
    timed(30, || {
        let d = date_header("UTC");
        check_asctime(&d);
        assert!(d.ends_with(" +0000 (UTC)"), "offset of {d:?}");
    });
}

#[test]
fn header_date_offset_is_hhmm() {
    // deviation from 1.10: the original prints the remainder in seconds (`+051800`).
    timed(30, || {
        let d = date_header("Asia/Kolkata");
        check_asctime(&d);
        assert!(d.ends_with(" +0530 (IST)"), "offset of {d:?}");
    });
}

#[test]
fn header_added_to_headers_only_message() {
    // deviation from 1.10: the original adds no Header when the message has no blank line.
    timed(30, || {
        let msg = b"Subject: headers only\r\nX-Foo: bar\r\n";
        let got = deliver_with_header("X-Scanned: yes", msg, &[]);
        assert_bytes_eq!(got, [&msg[..], b"X-Scanned: yes\r\n"].concat());
    });
}

#[test]
fn empty_header_value_adds_nothing() {
    timed(30, || {
        assert_bytes_eq!(
            deliver_with_header("", &default_message(), &[]),
            default_message()
        )
    });
}

#[test]
fn header_added_without_filter_and_in_file_mode() {
    timed(30, || {
        let want = insert_before_blank_line(&default_message(), b"X-Scanned: yes\r\n");
        let up = Upstream::start();
        let p = Proxy::with_setting(&up, "Header", "X-Scanned: yes");
        assert_eq!(p.open().send_mail(&default_message()).code, 250);
        assert_bytes_eq!(up.expect_one().content, want, "no filter");
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("Header", "X-Scanned: yes")
            .set("FilterType", "file")
            .set("FilterCommand", "true")
            .start();
        assert_eq!(p.open().send_mail(&default_message()).code, 250);
        assert_bytes_eq!(up.expect_one().content, want, "file mode");
    });
}
