//! Real third-party peers end to end: swaks and Postfix smtp-source as clients, Postfix
//! smtp-sink as the upstream.

use crate::common::peers::{smtp_source, swaks, SmtpSink};
use crate::common::{secs, timed, ProxyBuilder};

fn swaks_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "swaks failed ({:?}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn swaks_through_proxy_to_smtp_sink() {
    timed(60, || {
        let Some(sink) = SmtpSink::start(&[]) else {
            return;
        };
        let b = ProxyBuilder::new().set("OutAddress", &sink.out_address());
        let body = b.dir().join("body.txt");
        std::fs::write(
            &body,
            "Subject: real peers\r\n\r\nfirst line\r\n.dot line\r\n..two dots\r\nlast line\r\n",
        )
        .expect("body");
        let p = b
            .set("FilterCommand", "cat")
            .set("Header", "X-Scanned: by proxsmtpd for %i")
            .start();
        for i in 0..3 {
            let to = format!("rcpt{i}@example.net");
            let Some(out) = swaks(
                &p.addr(),
                &[
                    "--from",
                    "alice@example.org",
                    "--to",
                    &to,
                    "--data",
                    &format!("@{}", body.display()),
                ],
            ) else {
                return;
            };
            swaks_ok(&out);
        }
        let mut msgs = sink.wait_messages(3, secs(10));
        msgs.sort_by(|a, b| a.rcpt_args.cmp(&b.rcpt_args));
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.mail_args, "<alice@example.org>");
            assert_eq!(m.rcpt_args, vec![format!("<rcpt{i}@example.net>")]);
            assert!(
                m.content.starts_with("Subject: real peers\nX-Scanned: by proxsmtpd for 127.0.0.1\n\nfirst line\n.dot line\n..two dots\nlast line\n"),
                "message {i}: {:?}",
                m.content
            );
        }
        p.assert_tmp_clean();
    });
}

#[test]
fn smtp_source_parallel_sessions_to_smtp_sink() {
    timed(60, || {
        let Some(sink) = SmtpSink::start(&[]) else {
            return;
        };
        let p = ProxyBuilder::new()
            .set("OutAddress", &sink.out_address())
            .set("FilterCommand", "cat")
            .start();
        // 4 parallel sessions, 5 messages each over the same connection, 3 recipients each.
        let Some(out) = smtp_source(
            &p.addr(),
            &[
                "-s",
                "4",
                "-m",
                "20",
                "-d",
                "-r",
                "3",
                "-l",
                "5000",
                "-f",
                "src@example.org",
                "-t",
                "dst@example.net",
                "-M",
                "source.example",
            ],
        ) else {
            return;
        };
        assert!(
            out.status.success(),
            "smtp-source failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let msgs = sink.wait_messages(20, secs(15));
        for m in &msgs {
            assert_eq!(m.mail_args, "<src@example.org>");
            assert_eq!(m.rcpt_args.len(), 3);
            assert!(
                m.content.len() >= 5000,
                "short message: {} bytes",
                m.content.len()
            );
        }
    });
}

#[test]
fn swaks_sees_filter_rejection() {
    timed(60, || {
        let Some(sink) = SmtpSink::start(&[]) else {
            return;
        };
        let p = ProxyBuilder::new()
            .set("OutAddress", &sink.out_address())
            .set(
                "FilterCommand",
                "cat >/dev/null; echo '554 5.7.1 Rejected by content filter' >&2; exit 1",
            )
            .start();
        let Some(out) = swaks(
            &p.addr(),
            &["--from", "alice@example.org", "--to", "bob@example.net"],
        ) else {
            return;
        };
        assert!(
            !out.status.success(),
            "swaks reported success for a rejected message"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("<** 554 5.7.1 Rejected by content filter"),
            "{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            sink.messages().is_empty(),
            "smtp-sink got the rejected message"
        );
    });
}

#[test]
fn swaks_sees_upstream_rejection_at_end_of_data() {
    timed(60, || {
        // smtp-sink rejects the end of data (".") with a hard error.
        let Some(sink) = SmtpSink::start(&["-f", "."]) else {
            return;
        };
        let p = ProxyBuilder::new()
            .set("OutAddress", &sink.out_address())
            .set("FilterCommand", "cat")
            .start();
        let Some(out) = swaks(
            &p.addr(),
            &["--from", "alice@example.org", "--to", "bob@example.net"],
        ) else {
            return;
        };
        assert!(
            !out.status.success(),
            "swaks reported success for a message the upstream refused"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("<** 5"), "no 5xx after the data: {text}");
        p.assert_tmp_clean();
    });
}
