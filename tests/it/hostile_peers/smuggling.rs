//! SMTP smuggling and desynchronisation from the client side: bare CR, bare LF and NUL in
//! commands and in the data, the published end-of-data smuggling sequences, parameters of
//! extensions the proxy hides, and pipelined bursts. The upstream here ends DATA at every
//! sequence some MTA accepts (`lenient_data_end`), so a sequence that got through would
//! show as a cut message and smuggled commands.

use crate::common;

use crate::common::{
    default_message, message, secs, stuff, timed, Client, Proxy, ProxyBuilder, Upstream,
};

/// How a message reaches the upstream: streamed, spooled through a filter, or passed
/// through for an authenticated client (`Skip: authenticated`).
#[derive(Debug, Clone, Copy)]
enum Mode {
    Streamed,
    Filtered,
    Authenticated,
}

const MODES: [Mode; 3] = [Mode::Streamed, Mode::Filtered, Mode::Authenticated];

fn lenient_upstream() -> Upstream {
    Upstream::builder().lenient_data_end().start()
}

fn proxy(up: &Upstream, mode: Mode) -> Proxy {
    let b = ProxyBuilder::new().upstream(up).set("TimeOut", "5");
    match mode {
        Mode::Streamed => b,
        Mode::Filtered => b.set("FilterCommand", "cat"),
        Mode::Authenticated => b.set("FilterCommand", "cat").set("Skip", "authenticated"),
    }
    .start()
}

fn open(p: &Proxy, mode: Mode) -> Client {
    let mut c = p.open();
    if let Mode::Authenticated = mode {
        assert_eq!(c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").code, 235);
    }
    c
}

/// Every line the upstream received is a clean CRLF line (no bare CR, LF or NUL).
fn assert_clean_commands(up: &Upstream, what: &str) {
    for s in up.sessions() {
        for line in &s.commands {
            let body = line
                .strip_suffix(b"\r\n")
                .unwrap_or_else(|| panic!("{what}: upstream got a line without CRLF: {line:?}"));
            assert!(
                !body.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0),
                "{what}: upstream got {line:?}"
            );
        }
    }
}

#[test]
fn command_lines_with_bare_cr_bare_lf_or_nul_get_500_and_are_never_relayed() {
    timed(60, || {
        let up = Upstream::start();
        let p = Proxy::with_filter(&up, "cat");
        // (bytes sent, replies expected in order)
        let cases: &[(&[u8], &[u16])] = &[
            (b"RCPT TO:<a@x.test>\rRCPT TO:<b@y.test>\r\n", &[500]),
            // The bare LF ends the proxy's line: two lines, the first refused.
            (b"RCPT TO:<a@x.test>\nRCPT TO:<b@y.test>\r\n", &[500, 250]),
            (b"MAIL FROM:<a\0b@x.test>\r\n", &[500]),
            (b"NOOP\r\r\n", &[500]),
            (b"NOOP \0\r\n", &[500]),
            (b"RSET\n", &[500]),
        ];
        for &(bytes, codes) in cases {
            let what = common::show(bytes);
            let mut c = p.open();
            assert_eq!(c.cmd("MAIL FROM:<s@example.org>").code, 250, "{what}");
            c.send(bytes);
            for &code in codes {
                let r = c.reply();
                assert_eq!(r.code, code, "{what}: {r:?}");
                if code == 500 {
                    assert_eq!(
                        r.raw_str(),
                        "500 5.5.2 Syntax error: bare CR, bare LF or NUL in command\r\n"
                    );
                }
            }
            // In step: the next command gets its own reply.
            assert_eq!(c.cmd("NOOP").code, 250, "{what}: out of step");
            assert_eq!(c.cmd("QUIT").code, 221, "{what}");
        }
        assert_clean_commands(&up, "commands");
        // The NUL address reached neither the upstream nor a filter.
        assert!(up.with(|s| s.all_verbs().iter().filter(|v| *v == "MAIL").count()) == cases.len());
    });
}

#[test]
fn a_message_with_nul_octets_is_refused_after_its_dot() {
    timed(60, || {
        for mode in MODES {
            let up = lenient_upstream();
            let p = proxy(&up, mode);
            let mut c = open(&p, mode);
            // `CRLF NUL . CRLF`: a receiver that drops NULs sees the end of the data here.
            let body = b"first\r\n\0.\r\nMAIL FROM:<smuggled@evil.test>\r\nlast\r\n";
            let t = c.transaction(
                "<a@example.org>",
                &["<b@example.net>"],
                &message("nul", body),
            );
            assert_eq!(
                t.final_reply.raw_str(),
                "554 5.6.0 Message contains NUL characters\r\n",
                "{mode:?}"
            );
            assert!(up.delivered().is_empty(), "{mode:?}: {:#?}", up.summary());
            assert!(
                up.messages().iter().all(|m| !m.complete),
                "{mode:?}: {:#?}",
                up.summary()
            );
            let lines: Vec<String> = up.sessions().iter().flat_map(|s| s.lines()).collect();
            assert!(
                !lines.iter().any(|l| l.contains("smuggled")),
                "{mode:?}: smuggled command reached the upstream: {lines:?}"
            );
            match mode {
                // Spooled: the upstream never saw DATA, the session goes on.
                Mode::Filtered => {
                    assert_eq!(c.cmd("NOOP").code, 250);
                    assert_eq!(c.send_mail(&default_message()).code, 250);
                    assert_eq!(up.delivered().len(), 1);
                }
                // In the middle of a streamed DATA only closing the upstream stops it.
                Mode::Streamed | Mode::Authenticated => {
                    assert_eq!(c.reply().code, 421, "{mode:?}");
                    assert!(c.wait_eof(secs(5)), "{mode:?}");
                    assert!(up.wait_closed(0, secs(5)), "{mode:?}");
                }
            }
        }
    });
}

#[test]
fn the_published_smuggling_sequences_never_end_the_data() {
    timed(120, || {
        // Each sequence follows a first line and precedes a smuggled transaction.
        let sequences: &[&[u8]] = &[
            b"\n.\n",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r.\r",
            b"\n.\r",
            b"\r\n.\r\r\n",
        ];
        for mode in MODES {
            for seq in sequences {
                let what = format!("{mode:?} {}", common::show(seq));
                let up = lenient_upstream();
                let p = proxy(&up, mode);
                let mut c = open(&p, mode);
                let mut body = b"first line".to_vec();
                body.extend_from_slice(seq);
                body.extend_from_slice(
                    b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<victim@example.net>\r\n\
                      DATA\r\nSubject: smuggled\r\n\r\nevil\r\n",
                );
                let t = c.transaction(
                    "<a@example.org>",
                    &["<b@example.net>"],
                    &message("seq", &body),
                );
                assert_eq!(t.final_reply.code, 250, "{what}");
                assert_eq!(c.cmd("NOOP").code, 250, "{what}: out of step");
                let delivered = up.delivered();
                assert_eq!(delivered.len(), 1, "{what}: {:#?}", up.summary());
                let lines: Vec<String> = up.sessions().iter().flat_map(|s| s.lines()).collect();
                assert!(
                    !lines.iter().any(|l| l.contains("smuggled")),
                    "{what}: smuggled command: {lines:?}"
                );
                // The smuggled text is content of the one message.
                let content = String::from_utf8_lossy(&delivered[0].content).to_string();
                assert!(content.contains("MAIL FROM:<smuggled@evil.test>"), "{what}");
                assert_clean_commands(&up, &what);
            }
        }
    });
}

#[test]
fn parameters_of_hidden_extensions_are_refused_with_555() {
    timed(60, || {
        let up = Upstream::builder()
            .extensions(&[
                "8BITMIME",
                "BINARYMIME",
                "CHUNKING",
                "CHECKPOINT",
                "SIZE 100000",
            ])
            .start();
        let p = ProxyBuilder::new().upstream(&up).start();
        let mut c = p.open();
        for line in [
            "MAIL FROM:<a@example.org> BODY=BINARYMIME",
            "MAIL FROM:<a@example.org> SIZE=100 body=binarymime",
            "MAIL FROM:<a@example.org> TRANSID=<1@example.org>",
        ] {
            let r = c.cmd(line);
            assert_eq!(r.code, 555, "{line}: {r:?}");
            assert!(r.raw_str().starts_with("555 5.5.4 "), "{r:?}");
        }
        // Parameters of extensions the client was offered go through.
        assert_eq!(
            c.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=100")
                .code,
            250
        );
        let r = c.cmd("RCPT TO:<b@example.net> BODY=BINARYMIME");
        assert_eq!(r.code, 555, "{r:?}");
        assert_eq!(c.cmd("RCPT TO:<b@example.net>").code, 250);
        let lines = up.session(0).lines();
        assert!(
            !lines
                .iter()
                .any(|l| l.to_ascii_uppercase().contains("BINARYMIME") || l.contains("TRANSID")),
            "{lines:?}"
        );
    });
}

#[test]
fn a_pipelined_burst_of_transactions_stays_in_step() {
    timed(60, || {
        for mode in [Mode::Streamed, Mode::Filtered] {
            let up = Upstream::start();
            let p = proxy(&up, mode);
            let mut c = p.open();
            // Three whole transactions in one write, although PIPELINING is not offered.
            let mut burst = Vec::new();
            for i in 0..3 {
                burst.extend_from_slice(
                    format!(
                        "MAIL FROM:<a{i}@example.org>\r\nRCPT TO:<b{i}@example.net>\r\n\
                         RCPT TO:<nobody@example.net>\r\nDATA\r\n"
                    )
                    .as_bytes(),
                );
                burst.extend_from_slice(&stuff(&message(&format!("burst{i}"), b"body\r\n")));
            }
            c.send(&burst);
            let codes: Vec<u16> = (0..15).map(|_| c.reply().code).collect();
            assert_eq!(codes, [250, 250, 250, 354, 250].repeat(3), "{mode:?}");
            assert_eq!(c.cmd("NOOP").code, 250, "{mode:?}");
            let delivered = up.delivered();
            assert_eq!(delivered.len(), 3, "{mode:?}");
            for (i, m) in delivered.iter().enumerate() {
                let content = String::from_utf8_lossy(&m.content).to_string();
                assert!(
                    content.contains(&format!("Subject: burst{i}")),
                    "{mode:?}: {content}"
                );
            }
            let s = up.session(0);
            assert!(
                s.sent_before_reply.is_empty(),
                "{mode:?}: {:?}",
                s.sent_before_reply
            );
        }
    });
}
