//! DATA handling: dot-stuffing in both directions, end-of-data detection, SMTP smuggling
//! vectors, line-end normalisation, large and 8-bit messages.

use crate::common::{
    default_message, message, normalize_crlf, secs, stuff, timed, Proxy, ProxyBuilder, Upstream,
};

/// The wire form of `content` without the end-of-data marker.
fn stuffed(content: &[u8]) -> Vec<u8> {
    let w = stuff(content);
    w[..w.len() - 3].to_vec()
}

const DOTS: &[u8] = b".leading dot\r\n..two dots\r\n.\r\nend\r\n";

/// Dot lines reach the upstream unchanged in content and stuffed once on the wire.
fn dots_roundtrip(filter: Option<&str>) {
    let up = Upstream::start();
    let p = Proxy::with_optional_filter(&up, filter);
    let msg = message("dots", DOTS);
    assert_eq!(p.open().send_mail(&msg).code, 250);
    let m = up.expect_one();
    assert_bytes_eq!(m.content, msg);
    assert_bytes_eq!(m.raw, stuffed(&msg), "wire form");
}

#[test]
fn no_filter_dot_lines_roundtrip() {
    timed(30, || dots_roundtrip(None));
}

#[test]
fn cat_filter_dot_lines_roundtrip() {
    timed(30, || dots_roundtrip(Some("cat")));
}

#[test]
fn pipe_filter_receives_unstuffed_content() {
    // deviation from 1.10: the original hands the filter the dot-stuffed wire form.
    timed(30, || {
        let up = Upstream::start();
        let (p, rec) = Proxy::recording_env(&up);
        let msg = message("dots", DOTS);
        assert_eq!(p.open().send_mail(&msg).code, 250);
        assert_bytes_eq!(
            rec.wait_runs(1, secs(5))[0]
                .stdin
                .clone()
                .unwrap_or_default(),
            msg,
            "filter stdin"
        );
        assert_bytes_eq!(up.expect_one().content, msg);
    });
}

#[test]
fn file_filter_receives_unstuffed_content() {
    // deviation from 1.10: the original writes the dot-stuffed wire form into $EMAIL.
    timed(30, || {
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let (f, rec) = b.env_recorder();
        let p = b.set("FilterCommand", &f).set("FilterType", "file").start();
        let msg = message("dots", DOTS);
        assert_eq!(p.open().send_mail(&msg).code, 250);
        assert_bytes_eq!(
            rec.wait_runs(1, secs(5))[0]
                .email
                .clone()
                .unwrap_or_default(),
            msg,
            "$EMAIL"
        );
        assert_bytes_eq!(up.expect_one().content, msg);
    });
}

#[test]
fn filter_output_lines_starting_with_dot_arrive_intact() {
    // deviation from 1.10: the original does not dot-stuff filter output.
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set(
                "FilterCommand",
                "cat; printf -- '-- \\r\\n.signature line\\r\\n.\\r\\nafter-dot\\r\\n'",
            )
            .start();
        let msg = default_message();
        assert_eq!(p.open().send_mail(&msg).code, 250);
        let want = [&msg[..], b"-- \r\n.signature line\r\n.\r\nafter-dot\r\n"].concat();
        let m = up.expect_one();
        assert_bytes_eq!(m.content, want);
        assert_bytes_eq!(m.raw, stuffed(&want), "wire form");
    });
}

#[test]
fn filter_output_without_final_newline_is_terminated() {
    // deviation from 1.10: the original glues the terminator to the last line and hangs.
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("TimeOut", "5")
            .set(
                "FilterCommand",
                "cat >/dev/null; printf 'Subject: x\\r\\n\\r\\nno newline at the end'",
            )
            .start();
        let mut c = p.open();
        c.set_timeout(secs(4));
        assert_eq!(c.send_mail(&default_message()).code, 250);
        assert_bytes_eq!(
            up.expect_one().content,
            b"Subject: x\r\n\r\nno newline at the end\r\n"
        );
    });
}

#[test]
fn filter_output_with_lf_line_ends_is_sent_with_crlf() {
    // deviation from 1.10: the original sends the filter's bare LFs upstream.
    timed(30, || {
        let up = Upstream::start();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set(
                "FilterCommand",
                "cat >/dev/null; printf 'Subject: lf\\n\\nline one\\n.dot line\\nline two\\n'",
            )
            .start();
        assert_eq!(p.open().send_mail(&default_message()).code, 250);
        let m = up.expect_one();
        assert_bytes_eq!(
            m.content,
            b"Subject: lf\r\n\r\nline one\r\n.dot line\r\nline two\r\n"
        );
        assert_bytes_eq!(
            m.raw,
            b"Subject: lf\r\n\r\nline one\r\n..dot line\r\nline two\r\n"
        );
    });
}

#[test]
fn last_line_directly_before_terminator_is_kept() {
    timed(30, || {
        for filter in [None, Some("cat")] {
            let up = Upstream::start();
            let p = Proxy::with_optional_filter(&up, filter);
            let mut c = p.open();
            c.begin_data();
            c.send(b"Subject: t\r\n\r\nfirst\r\nthe last line\r\n.\r\n");
            assert_eq!(c.reply().code, 250, "filter {filter:?}");
            assert_bytes_eq!(
                up.expect_one().content,
                b"Subject: t\r\n\r\nfirst\r\nthe last line\r\n",
                "filter {filter:?}"
            );
        }
    });
}

#[test]
fn empty_first_body_is_recognised() {
    // deviation from 1.10: the original takes a `.` right after DATA on the first transaction as data.
    timed(30, || {
        for filter in [None, Some("cat")] {
            let up = Upstream::start();
            let p = Proxy::with_optional_filter(&up, filter);
            let mut c = p.open();
            c.set_timeout(secs(5));
            c.begin_data();
            c.send(b".\r\n");
            assert_eq!(c.reply().code, 250, "filter {filter:?}");
            assert_bytes_eq!(up.expect_one().content, b"", "filter {filter:?}");
            assert_eq!(c.cmd("NOOP").code, 250);
        }
    });
}

/// A body that hides a second transaction behind a non-CRLF end-of-data lookalike `vector`.
fn smuggling_body(vector: &[u8]) -> Vec<u8> {
    [
        &b"From: <alice@example.org>\r\nSubject: smuggling\r\n\r\nbefore"[..],
        vector,
        b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled body\r\n",
    ]
    .concat()
}

/// Sends the vector raw (no stuffing, which would hide it) and checks that the upstream saw
/// one message holding the whole text, normalised to CRLF, and no extra command.
fn smuggling_case(vector: &[u8], filter: Option<&str>) {
    // The upstream also ends DATA at the lookalike, as some MTAs do: a proxy that lets the
    // vector through shows up as a cut message plus the smuggled commands.
    let up = Upstream::builder().lenient_data_end().start();
    let p = Proxy::with_optional_filter(&up, filter);
    let mut c = p.open();
    c.begin_data();
    let body = smuggling_body(vector);
    c.send([&body[..], b".\r\n"].concat());
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.cmd("QUIT").code, 221);
    assert!(up.wait_closed(0, secs(5)), "upstream still open after QUIT");
    let s = up.session(0);
    assert_eq!(
        s.lines(),
        [
            "EHLO client.example",
            "MAIL FROM:<alice@example.org>",
            "RCPT TO:<bob@example.net>",
            "DATA",
            "QUIT"
        ],
        "the upstream saw extra commands: {:#?}",
        up.summary()
    );
    assert_eq!(s.messages.len(), 1);
    let want = normalize_crlf(&body);
    assert_bytes_eq!(s.messages[0].content, want, "content");
    assert_bytes_eq!(s.messages[0].raw, stuffed(&want), "wire form");
}

/// The published end-of-data lookalikes, each a bare LF or CR sequence.
const SMUGGLING_VECTORS: [&[u8]; 4] = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r"];

#[test]
fn smuggling_vectors_without_a_filter() {
    // deviation from 1.10: the original passes bare LF/CR sequences through.
    timed(60, || {
        for v in SMUGGLING_VECTORS {
            smuggling_case(v, None);
        }
    });
}

#[test]
fn smuggling_vectors_through_a_filter() {
    // deviation from 1.10: the original passes bare LF/CR sequences through.
    timed(30, || {
        for v in SMUGGLING_VECTORS {
            smuggling_case(v, Some("cat"));
        }
    });
}

/// About 10 MB of 76-octet lines, some starting with a dot.
fn ten_mb_message() -> Vec<u8> {
    let mut body = Vec::with_capacity(10_600_000);
    let mut i = 0u64;
    while body.len() < 10 * 1024 * 1024 {
        if i % 97 == 0 {
            body.extend_from_slice(b".");
        }
        body.extend_from_slice(format!("{i:010} ").as_bytes());
        body.extend_from_slice(
            &b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-_"[..63],
        );
        body.extend_from_slice(b"\r\n");
        i += 1;
    }
    message("ten megabytes", &body)
}

fn big_case(filter: Option<&str>) {
    let up = Upstream::start();
    let p = Proxy::with_optional_filter(&up, filter);
    let mut c = p.open();
    c.set_timeout(secs(20));
    let msg = ten_mb_message();
    assert_eq!(c.send_mail(&msg).code, 250);
    let m = up.expect_one();
    assert_eq!(m.content.len(), msg.len());
    assert_bytes_eq!(m.content, msg);
    p.assert_tmp_clean();
}

#[test]
fn ten_megabyte_message_without_filter() {
    timed(60, || big_case(None));
}

#[test]
fn ten_megabyte_message_through_cat_filter() {
    timed(60, || big_case(Some("cat")));
}

#[test]
fn eight_bit_and_long_lines_through_filter() {
    timed(30, || {
        let mut body = Vec::new();
        body.extend(
            (0x80u8..=0xff)
                .chain(0x01..0x0a)
                .chain(0x0b..0x0d)
                .chain(0x0e..0x20),
        );
        body.extend_from_slice(b"\r\n");
        for len in [998usize, 999, 4000, 4221, 4222, 4223, 100_000] {
            body.extend(std::iter::repeat_n(b'x', len));
            body.extend_from_slice(b"\r\n");
        }
        // Dot lines right behind long lines, so they fall at odd read boundaries.
        for len in [1998usize, 2046, 4094, 4221, 8190] {
            body.extend(std::iter::repeat_n(b'y', len));
            body.extend_from_slice(b"\r\n.dot after a long line\r\n");
        }
        let msg = message("eight bit", &body);
        for filter in [None, Some("cat")] {
            let up = Upstream::start();
            let p = Proxy::with_optional_filter(&up, filter);
            assert_eq!(p.open().send_mail(&msg).code, 250);
            assert_bytes_eq!(up.expect_one().content, msg, "filter {filter:?}");
        }
    });
}
