//! Differential tests: where our behaviour is meant to be the original's, the same scenario
//! runs against `/usr/sbin/proxsmtpd` (skipped with a note when absent) and against the
//! binary under test, and everything the client and the upstream saw must be identical.

use crate::common;

use std::path::Path;

use crate::common::upstream::UpstreamBuilder;
use crate::common::{binary, message, secs, timed, Client, ProxyBuilder, Upstream, REFERENCE_BIN};

/// What one run looked like from both ends.
#[derive(Debug, PartialEq, Eq)]
struct Observation {
    /// Every reply the client read, raw.
    client: Vec<String>,
    /// Per upstream session: command lines, and each message's raw DATA and final reply.
    upstream: Vec<Vec<String>>,
}

struct Case {
    settings: &'static [(&'static str, &'static str)],
    upstream: fn() -> UpstreamBuilder,
    client: fn(&mut Client, &mut Vec<String>),
}

fn run(bin: &Path, case: &Case) -> Observation {
    let up = (case.upstream)().start();
    let mut b = ProxyBuilder::new().binary(bin).upstream(&up);
    for (k, v) in case.settings {
        b = b.set(k, v);
    }
    let p = b.start();
    let mut c = p.connect();
    let mut seen = vec![c.greeting().raw_str()];
    (case.client)(&mut c, &mut seen);
    assert!(
        c.wait_eof(secs(5)),
        "{}: client connection not closed after QUIT",
        bin.display()
    );
    let n = up.session_count();
    assert!(
        up.wait(secs(5), |s| s.sessions.iter().all(|x| x.closed())),
        "{}: upstream not closed",
        bin.display()
    );
    let upstream = (0..n)
        .map(|i| {
            let s = up.session(i);
            let mut v = s.lines();
            for m in &s.messages {
                v.push(format!(
                    "message raw={} final={:?}",
                    common::show(&m.raw),
                    m.final_reply
                ));
            }
            v
        })
        .collect();
    p.assert_tmp_clean();
    Observation {
        client: seen,
        upstream,
    }
}

fn compare(case: Case) {
    if !Path::new(REFERENCE_BIN).exists() {
        eprintln!("note: {REFERENCE_BIN} is not installed (apt-get install proxsmtp); differential test skipped");
        return;
    }
    let reference = run(Path::new(REFERENCE_BIN), &case);
    if std::env::var_os("PROXSMTPD_TEST_VERBOSE").is_some() {
        eprintln!("reference observation: {reference:#?}");
    }
    let ours = run(&binary(), &case);
    assert_eq!(
        ours, reference,
        "the binary under test (left) differs from proxsmtpd 1.10 (right)"
    );
}

fn cmd(c: &mut Client, seen: &mut Vec<String>, line: &str) {
    seen.push(c.cmd(line).raw_str());
}

fn mail(c: &mut Client, seen: &mut Vec<String>, from: &str, to: &[&str], content: &[u8]) {
    cmd(c, seen, &format!("MAIL FROM:{from}"));
    for r in to {
        cmd(c, seen, &format!("RCPT TO:{r}"));
    }
    let d = c.cmd("DATA");
    let go = d.code == 354;
    seen.push(d.raw_str());
    if go {
        seen.push(c.body(content).raw_str());
    }
}

/// A filter that rejects or drops by a marker in the message, and passes everything else.
const MARKER_FILTER: &str = "f=$TMPDIR/in.$$; cat > $f; \
    v() { rm -f $f; printf \"$1\" >&2; exit $2; }; \
    grep -q CASE-550 $f && v '550 Bad Email\\n' 1; \
    grep -q CASE-PLAIN $f && v 'Go away spammer\\n' 1; \
    grep -q CASE-450 $f && v '450 4.7.1 try later\\n' 75; \
    grep -q CASE-NONE $f && v '' 3; \
    grep -q CASE-LAST $f && v 'first\\n  554 5.7.1 last one  \\n\\n' 1; \
    grep -q CASE-DROP $f && v '250 Dropped silently\\n' 1; \
    cat $f; rm -f $f";

#[test]
fn plain_transaction() {
    timed(60, || {
        compare(Case {
            settings: &[],
            upstream: Upstream::builder,
            client: |c, seen| {
                cmd(c, seen, "EHLO client.example");
                mail(
                    c,
                    seen,
                    "<alice@example.org> SIZE=100",
                    &["<bob@example.net>", "<carol@example.net>"],
                    &common::default_message(),
                );
                cmd(c, seen, "NOOP");
                cmd(c, seen, "QUIT");
            },
        })
    });
}

#[test]
fn ehlo_and_helo_filtering() {
    timed(60, || {
        compare(Case {
            settings: &[],
            upstream: || {
                Upstream::builder().extensions(&[
                    "SIZE 10240000",
                    "PIPELINING",
                    "8BITMIME",
                    "STARTTLS",
                    "CHUNKING",
                    "BINARYMIME",
                    "DSN",
                    "XFORWARD NAME ADDR PROTO HELO",
                    "XCLIENT NAME ADDR PROTO HELO",
                    "AUTH PLAIN LOGIN",
                    "CHECKPOINT",
                    "XEXCH50",
                ])
            },
            client: |c, seen| {
                cmd(c, seen, "EHLO client.example");
                cmd(c, seen, "HELO client.example");
                cmd(c, seen, "ehlo again.example");
                cmd(c, seen, "QUIT");
            },
        })
    });
}

#[test]
fn filter_reject_texts_and_silent_drop() {
    timed(60, || {
        compare(Case {
            settings: &[("FilterCommand", MARKER_FILTER)],
            upstream: Upstream::builder,
            client: |c, seen| {
                cmd(c, seen, "EHLO client.example");
                for marker in [
                    "CASE-550",
                    "CASE-PLAIN",
                    "CASE-450",
                    "CASE-NONE",
                    "CASE-LAST",
                    "CASE-DROP",
                    "pass",
                ] {
                    mail(
                        c,
                        seen,
                        "<alice@example.org>",
                        &["<bob@example.net>"],
                        &message(marker, b"body\r\n"),
                    );
                }
                cmd(c, seen, "QUIT");
            },
        })
    });
}

#[test]
fn header_insertion() {
    timed(60, || {
        compare(Case {
            settings: &[
                ("FilterCommand", "cat"),
                ("Header", "X-Scanned: client=%i local=%l pct=%% tab\\tend"),
            ],
            upstream: Upstream::builder,
            client: |c, seen| {
                cmd(c, seen, "EHLO client.example");
                mail(
                    c,
                    seen,
                    "<alice@example.org>",
                    &["<bob@example.net>"],
                    &common::default_message(),
                );
                cmd(c, seen, "QUIT");
            },
        });
        compare(Case {
            settings: &[
                ("FilterCommand", "cat"),
                ("Header", "Received: from [%i] by proxy\\r\\n\\tfor test"),
            ],
            upstream: Upstream::builder,
            client: |c, seen| {
                cmd(c, seen, "HELO client.example");
                mail(
                    c,
                    seen,
                    "<>",
                    &["<bob@example.net>"],
                    &common::default_message(),
                );
                cmd(c, seen, "QUIT");
            },
        });
    });
}

#[test]
fn reject_mode() {
    timed(60, || {
        let variants: [&'static [(&'static str, &'static str)]; 2] = [
            &[("FilterType", "reject"), ("FilterReject", "Go away")],
            &[
                ("FilterType", "reject"),
                ("FilterReject", "554 5.7.1 No mail here"),
            ],
        ];
        for settings in variants {
            compare(Case {
                settings,
                upstream: Upstream::builder,
                client: |c, seen| {
                    cmd(c, seen, "EHLO client.example");
                    cmd(c, seen, "MAIL FROM:<alice@example.org>");
                    cmd(c, seen, "RCPT TO:<bob@example.net>");
                    cmd(c, seen, "DATA");
                    cmd(c, seen, "RSET");
                    cmd(c, seen, "NOOP");
                    cmd(c, seen, "QUIT");
                },
            });
        }
        compare(Case {
            settings: &[("FilterType", "reject")],
            upstream: Upstream::builder,
            client: |c, seen| {
                cmd(c, seen, "EHLO client.example");
                cmd(c, seen, "MAIL FROM:<alice@example.org>");
                cmd(c, seen, "QUIT");
            },
        });
    });
}

#[test]
fn starttls_bdat_xclient_refusal() {
    timed(60, || {
        compare(Case {
            settings: &[],
            upstream: || {
                Upstream::builder().extensions(&[
                    "STARTTLS",
                    "CHUNKING",
                    "XCLIENT ADDR",
                    "8BITMIME",
                ])
            },
            client: |c, seen| {
                cmd(c, seen, "EHLO client.example");
                cmd(c, seen, "STARTTLS");
                cmd(c, seen, "BDAT 10 LAST");
                cmd(c, seen, "XCLIENT ADDR=10.1.2.3");
                cmd(c, seen, "VRFY postmaster");
                cmd(c, seen, "NOOP");
                cmd(c, seen, "QUIT");
            },
        })
    });
}

#[test]
fn rset_between_transactions() {
    timed(60, || {
        compare(Case {
            settings: &[("FilterCommand", "cat")],
            upstream: Upstream::builder,
            client: |c, seen| {
                cmd(c, seen, "EHLO client.example");
                cmd(c, seen, "MAIL FROM:<first@example.org>");
                cmd(c, seen, "RCPT TO:<x1@example.net>");
                cmd(c, seen, "RSET");
                mail(
                    c,
                    seen,
                    "<second@example.org>",
                    &["<x2@example.net>"],
                    &message("second", b"two\r\n"),
                );
                mail(
                    c,
                    seen,
                    "<third@example.org>",
                    &["<x3@example.net>"],
                    &message("third", b"three\r\n"),
                );
                cmd(c, seen, "QUIT");
            },
        })
    });
}

#[test]
fn xforward_and_upstream_rejections() {
    timed(60, || {
        compare(Case {
            settings: &[("FilterCommand", "cat")],
            upstream: || {
                Upstream::builder()
                    .reply("RCPT", common::Reply::text("550 5.1.1 no such user"))
                    .reply("XFORWARD", common::Reply::text("250 2.0.0 forwarded"))
            },
            client: |c, seen| {
                cmd(c, seen, "EHLO client.example");
                cmd(
                    c,
                    seen,
                    "XFORWARD NAME=spike.porcupine.org ADDR=168.100.189.2",
                );
                mail(
                    c,
                    seen,
                    "<alice@example.org>",
                    &["<nobody@example.net>"],
                    &common::default_message(),
                );
                cmd(c, seen, "QUIT");
            },
        })
    });
}
