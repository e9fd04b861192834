//! Local failures while a body is being received: the rest of the body must be consumed and
//! answered after the terminating dot, never read as commands; client disconnects mid-DATA
//! must deliver nothing and leave no temp files.

use crate::common;

use crate::common::{message, ms, secs, stuff, timed, Proxy, ProxyBuilder, Upstream};

/// Body lines that would be a second transaction if they were read as commands.
const INJECTED: &str =
    "RSET\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<injected@example.net>\r\nDATA\r\n";

fn assert_no_injection(up: &Upstream) {
    let lines: Vec<String> = up.sessions().iter().flat_map(|s| s.lines()).collect();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("injected") || l.contains("evil@")),
        "body lines reached the upstream as commands: {lines:?}"
    );
    assert!(up.delivered().is_empty(), "a message was delivered");
}

/// Sends half of a body, checks that nothing is answered before the dot, sends the rest and
/// returns the final reply's raw text.
fn body_in_two_halves(c: &mut common::Client, pause: std::time::Duration) -> String {
    c.cmd("MAIL FROM:<alice@example.org>");
    c.cmd("RCPT TO:<bob@example.net>");
    let d = c.cmd("DATA");
    assert_eq!(d.code, 354, "DATA must be accepted before the body: {d:?}");
    let first = format!("Subject: local failure\r\n\r\n{}", INJECTED.repeat(3000));
    c.send(first.as_bytes());
    c.assert_silent(pause);
    let rest = stuff(format!("{INJECTED}the end\r\n").as_bytes());
    c.send(rest);
    c.reply().raw_str()
}

fn missing_temp_directory(filter: Option<(&str, &str)>) {
    let up = Upstream::start();
    let mut b = ProxyBuilder::new()
        .upstream(&up)
        .set("TempDirectory", "/nonexistent/proxsmtpd-temp");
    if let Some((kind, cmd)) = filter {
        b = b.set("FilterType", kind).set("FilterCommand", cmd);
    }
    let p = b.start();
    let mut c = p.open();
    assert_eq!(
        body_in_two_halves(&mut c, ms(700)),
        "451 Local Error\r\n",
        "filter {filter:?}"
    );
    assert_eq!(
        c.cmd("NOOP").raw_str(),
        "250 2.0.0 Ok\r\n",
        "out of sync (filter {filter:?})"
    );
    assert_no_injection(&up);
}

#[test]
fn missing_temp_directory_pipe_filter() {
    // deviation from 1.10: the original answers 451 at once and runs the rest of the body as commands.
    timed(30, || missing_temp_directory(Some(("pipe", "cat"))));
}

#[test]
fn missing_temp_directory_file_filter() {
    // deviation from 1.10: the original answers 451 at once and runs the rest of the body as commands.
    timed(30, || missing_temp_directory(Some(("file", "true"))));
}

#[test]
fn missing_temp_directory_no_filter() {
    // Without a filter the body is streamed upstream and never spooled: a missing
    // TempDirectory cannot fail the message. (The original spools it and answers 451.)
    timed(30, || {
        let up = Upstream::start();
        let p = Proxy::with_setting(&up, "TempDirectory", "/nonexistent/proxsmtpd-temp");
        let mut c = p.open();
        let reply = body_in_two_halves(&mut c, ms(700));
        assert!(reply.starts_with("250 "), "final reply {reply:?}");
        c.assert_in_sync();
        let delivered = up.delivered();
        assert_eq!(delivered.len(), 1, "{:#?}", up.summary());
        let expected = format!(
            "Subject: local failure\r\n\r\n{}{INJECTED}the end\r\n",
            INJECTED.repeat(3000)
        );
        assert!(
            delivered[0].content == expected.as_bytes(),
            "the body lines must arrive as content, unchanged"
        );
        let verbs: Vec<String> = up.sessions().iter().flat_map(|s| s.verbs()).collect();
        assert_eq!(
            verbs.iter().filter(|v| *v == "MAIL").count(),
            1,
            "body lines reached the upstream as commands: {verbs:?}"
        );
    });
}

#[test]
fn filter_timeout_while_body_still_arrives() {
    // deviation from 1.10: the original answers 451 at once and runs the rest of the body as commands.
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let f = format!(
            "echo $$ > {}/filter.pid; exec sleep 30",
            b.out_dir().display()
        );
        let p = b.set("FilterCommand", &f).set("FilterTimeout", "1").start();
        let mut c = p.open();
        assert_eq!(body_in_two_halves(&mut c, ms(2500)), "451 Local Error\r\n");
        if let Some(pid) = p.read_pid("filter.pid") {
            assert!(
                common::wait_until(secs(5), || !common::proxy::pid_alive(pid)),
                "filter not killed"
            );
        }
        c.assert_in_sync();
        assert_no_injection(&up);
        p.assert_tmp_clean();
    });
}

fn disconnect_mid_data(filter: Option<&str>) {
    let up = Upstream::start();
    let p = Proxy::with_optional_filter(&up, filter);
    let mut c = p.open();
    c.begin_data();
    c.send(message("cut", &b"a line of the body\r\n".repeat(5000)));
    std::thread::sleep(ms(300));
    c.close();
    // The upstream transaction is reset or the connection closed; never a message.
    let ended = up.wait(secs(8), |s| {
        s.sessions
            .first()
            .is_some_and(|x| x.closed() || x.verbs().last().is_some_and(|v| v == "RSET"))
    });
    assert!(
        ended,
        "upstream neither got RSET nor was closed: {:#?}",
        up.summary()
    );
    let s = up.session(0);
    if filter.is_some() {
        // The filter needs the whole message: the upstream sees DATA only after it.
        s.assert_no_verb("DATA");
    } else {
        // Streamed: the upstream had DATA and part of the body, and is closed before the
        // end of data, so nothing is delivered.
        assert!(
            up.wait(secs(8), |s| s.sessions[0].closed()),
            "upstream not closed"
        );
    }
    assert!(
        up.session(0).messages.iter().all(|m| !m.complete),
        "a message was delivered"
    );
    p.assert_tmp_clean();
}

#[test]
fn client_disconnect_mid_data_without_filter() {
    timed(30, || disconnect_mid_data(None));
}

#[test]
fn client_disconnect_mid_data_with_filter() {
    timed(30, || disconnect_mid_data(Some("cat")));
}

#[test]
fn client_disconnect_mid_data_with_file_filter() {
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("FilterType", "file")
            .set("FilterCommand", "true")
            .start();
        let mut c = p.open();
        c.begin_data();
        c.send(b"Subject: cut\r\n\r\npartial");
        std::thread::sleep(ms(300));
        c.close();
        assert!(up.wait(secs(8), |s| s.sessions.first().is_some_and(
            |x| x.closed() || x.verbs().last().is_some_and(|v| v == "RSET")
        )));
        assert!(up.messages().is_empty());
        p.assert_tmp_clean();
    });
}
