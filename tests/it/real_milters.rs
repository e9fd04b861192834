//! The milter client and the proxy against real milters from the Debian packages (rspamd,
//! clamav-milter with clamd, opendkim, spamass-milter with spamd), each started by its test
//! on loopback (see `common::milter_daemons`).
//!
//! Two kinds of tests per milter:
//! - `direct_*`: `MilterClient` holds a whole conversation with the daemon (connect, HELO,
//!   MAIL, RCPT, headers, body, end of message) and checks its verdict and modifications:
//!   our client against the real implementation of the protocol;
//! - `proxy_*`: the proxy with a `Milters` line in front of the scriptable upstream; the
//!   SMTP client's replies and what the upstream received are checked (spam and viruses
//!   refused with nothing delivered, clean mail delivered with the milter's headers, mail
//!   signed by opendkim carrying a signature that verifies with dkimpy).

use std::io::Write;
use std::process::Stdio;

use bytes::Bytes;
use proxsmtpd::config::milter::{parse_milters, MilterAction, MilterConfig, MilterDefaults};
use proxsmtpd::protocol::milter::codec::{header_value, Command, ConnectAddress};
use proxsmtpd::protocol::milter::negotiate::MacroNames;
use proxsmtpd::protocol::milter::proto;
use proxsmtpd::protocol::milter::reply::Modification;
use proxsmtpd::protocol::milter::session::Verdict;
use proxsmtpd::proxy::milter::{MilterClient, Outcome, StageResult};

use crate::common::milter_daemons::{
    self, dkim_txt_record, MilterDaemon, DKIM_DOMAIN, DKIM_SELECTOR,
};
use crate::common::samples::{
    eicar, eicar_attachment_message, gtube_message, ham_message, EICAR_SIGNATURE,
};
use crate::common::{message, secs, show, timed, Proxy, ProxyBuilder, Upstream};

// ---------------------------------------------------------------------------------------
// Messages.

/// A clean message whose sender already claims `X-Virus-Status: Clean` (clamav-milter's
/// `AddHeader Replace` must replace it, not add a second one).
fn forged_clean_message() -> Vec<u8> {
    b"From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: forged\r\n\
      X-Virus-Status: Clean\r\nMessage-ID: <forged@test.example>\r\n\r\nNothing to see.\r\n"
        .to_vec()
}

/// The header fields of `content` as (name, raw value): everything after the colon, the
/// leading space included, continuation lines joined with CRLF.
fn header_fields(content: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(head(content)).into_owned();
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.1.push_str("\r\n");
                last.1.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.to_string(), value.to_string()));
        }
    }
    fields
}

fn head(content: &[u8]) -> &[u8] {
    let end = content
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(content.len());
    &content[..end]
}

fn body(content: &[u8]) -> &[u8] {
    content
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[][..], |p| &content[p + 4..])
}

/// The values of header `name` (case-insensitive) in `content`, unfolded.
fn header_values(content: &[u8], name: &str) -> Vec<String> {
    header_fields(content)
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.replace("\r\n", "").trim_start().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// A whole conversation with `MilterClient`.

fn config(entry: &str) -> MilterConfig {
    let defaults = MilterDefaults {
        connect_timeout: secs(10),
        command_timeout: secs(30),
        content_timeout: secs(60),
        default_action: MilterAction::Tempfail,
    };
    parse_milters(entry).expect("milter entry")[0].resolve(&defaults)
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A macro's name and value.
type Macro<'a> = (&'a str, &'a [u8]);

/// How a conversation ended: a stage before the end of message decided (its name and
/// outcome), or the end of message's result.
#[derive(Debug)]
enum Ended {
    Early(&'static str, Outcome),
    Eom(StageResult),
}

/// What an MTA would send for `content` from alice@example.org to bob@example.net, a
/// client at 127.0.0.1 named localhost (loopback: the host opendkim signs for).
async fn converse(milter: &MilterDaemon, content: &[u8]) -> Ended {
    let mut client =
        MilterClient::connect(config(&milter.address()), 6, MacroNames::default()).await;
    assert_eq!(
        client.failure(),
        None,
        "negotiation with {}:\n{}",
        milter.address(),
        milter.logs()
    );
    let connect_macros: [(&str, &[u8]); 5] = [
        ("j", b"mx.example"),
        ("{daemon_name}", b"mx.example"),
        ("_", b"localhost [127.0.0.1]"),
        ("{client_addr}", b"127.0.0.1"),
        ("{client_name}", b"localhost"),
    ];
    let connect = Command::Connect {
        hostname: b"localhost",
        address: ConnectAddress::Inet {
            ip: "127.0.0.1".parse().unwrap(),
            port: 40000,
        },
    };
    let mail_args: [&[u8]; 1] = [b"<alice@example.org>"];
    let rcpt_args: [&[u8]; 1] = [b"<bob@example.net>"];
    let queue_id: [(&str, &[u8]); 1] = [("i", b"4AB3C2D1E0")];
    let envelope: Vec<(&'static str, Command<'_>, Vec<Macro>)> = vec![
        ("connect", connect, connect_macros.to_vec()),
        ("helo", Command::Helo(b"client.example"), vec![]),
        (
            "mail",
            Command::Mail(&mail_args),
            vec![("{mail_addr}", b"alice@example.org"), queue_id[0]],
        ),
        (
            "rcpt",
            Command::Rcpt(&rcpt_args),
            vec![("{rcpt_addr}", b"bob@example.net")],
        ),
        ("data", Command::Data, queue_id.to_vec()),
    ];
    for (stage, command, macros) in envelope {
        let r = client.stage(command, &macros).await;
        if r.outcome != Outcome::Continue {
            return Ended::Early(stage, r.outcome);
        }
    }
    // opendkim asks for SMFIP_HDR_LEADSPC (it signs the fields exactly as they are, which
    // matters under simple canonicalization); the others get the value without the space.
    let leading_space = client.negotiated().expect("negotiated").protocol & proto::HDR_LEADSPC != 0;
    for (name, value) in header_fields(content) {
        // Sendmail and Postfix hand a folded field's lines joined by a bare LF.
        let value = value.replace("\r\n", "\n");
        let r = client
            .stage(
                Command::Header {
                    name: name.as_bytes(),
                    value: header_value(value.as_bytes(), leading_space),
                },
                &[],
            )
            .await;
        if r.outcome != Outcome::Continue {
            return Ended::Early("header", r.outcome);
        }
    }
    let r = client.stage(Command::Eoh, &[]).await;
    if r.outcome != Outcome::Continue {
        return Ended::Early("eoh", r.outcome);
    }
    for chunk in body(content).chunks(65535) {
        let r = client.stage(Command::Body(chunk), &[]).await;
        match r.outcome {
            Outcome::Continue => {}
            Outcome::Skip => break,
            other => return Ended::Early("body", other),
        }
    }
    let eom = client.stage(Command::BodyEob, &queue_id).await;
    client.quit().await;
    Ended::Eom(eom)
}

/// The end of message's result; panics if an earlier stage decided.
fn eom(ended: Ended, milter: &MilterDaemon) -> StageResult {
    match ended {
        Ended::Eom(r) => r,
        Ended::Early(stage, outcome) => panic!(
            "the milter decided at {stage}: {outcome:?}; its logs:\n{}",
            milter.logs()
        ),
    }
}

/// True for a permanent refusal (reject, or a 5xx reply of the milter's own).
fn is_rejection(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Verdict(Verdict::Reject) => true,
        Outcome::Verdict(Verdict::Reply(r)) => (500..600).contains(&r.code),
        _ => false,
    }
}

/// True when the message goes on (accepted, or nobody objected).
fn is_passed(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Continue | Outcome::Verdict(Verdict::Accept)
    )
}

/// The header fields a milter added or changed to a non-empty value, as (name, value).
fn added_headers(mods: &[Modification]) -> Vec<(String, String)> {
    let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    mods.iter()
        .filter_map(|m| match m {
            Modification::AddHeader { name, value }
            | Modification::InsHeader { name, value, .. }
            | Modification::ChgHeader { name, value, .. }
                if !value.is_empty() =>
            {
                Some((text(name), text(value)))
            }
            _ => None,
        })
        .collect()
}

fn find_header<'a>(added: &'a [(String, String)], name: &str) -> Option<&'a str> {
    added
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

// ---------------------------------------------------------------------------------------
// The proxy with a milter.

fn milter_proxy(up: &Upstream, milter: &MilterDaemon) -> Proxy {
    ProxyBuilder::new()
        .upstream(up)
        .set("Milters", &milter.address())
        .start()
}

/// Sends `content` through the proxy; returns the final reply's code and text.
fn send(p: &Proxy, content: &[u8]) -> (u16, String) {
    let mut c = p.open();
    c.set_timeout(secs(40));
    let r = c.send_mail(content);
    (r.code, r.text())
}

/// The system's Python, where python3-dkim installs dkimpy.
const PYTHON: &str = "/usr/bin/python3";

/// True when dkimpy can be imported; otherwise the missing prerequisite is recorded (a
/// failure under `PROXSMTPD_TEST_STRICT=1`).
fn have_dkimpy() -> bool {
    let ok = crate::common::command(PYTHON)
        .args(["-c", "import dkim"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        crate::common::skipped(
            "the DKIM check needs dkimpy: the Debian package python3-dkim \
             (scripts/install-test-deps.sh installs it)",
        );
    }
    ok
}

/// Verifies the first DKIM-Signature of `content` with dkimpy (python3-dkim), the key's
/// TXT record served by the verifier's DNS function instead of DNS. Returns dkimpy's
/// verdict and its diagnostics.
fn dkim_verify(content: &[u8], txt: &str) -> (bool, String) {
    const VERIFY: &str = r#"
import sys, dkim, logging
txt, name = sys.argv[1].encode(), sys.argv[2].encode()
def dns(qname, timeout=5):
    return txt if qname.rstrip(b".") == name else None
msg = sys.stdin.buffer.read()
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
d = dkim.DKIM(msg, logger=logging.getLogger("dkim"))
ok = d.verify(dnsfunc=dns)
print("pass" if ok else "fail")
sys.exit(0 if ok else 1)
"#;
    let mut child = crate::common::command(PYTHON)
        .args([
            "-c",
            VERIFY,
            txt,
            &format!("{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(content)
        .expect("write the message");
    let out = child.wait_with_output().expect("python3");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The daemon, or `None` when its programs are missing (the test was recorded as skipped,
/// or failed under strict mode).
macro_rules! daemon {
    ($start:expr) => {
        match $start {
            Some(d) => d,
            None => return,
        }
    };
}

// ---------------------------------------------------------------------------------------
// rspamd

#[test]
fn direct_rspamd_rejects_gtube_at_end_of_message() {
    timed(120, || {
        let rspamd = daemon!(milter_daemons::rspamd());
        let r = eom(run(converse(&rspamd, &gtube_message())), &rspamd);
        assert!(
            is_rejection(&r.outcome),
            "GTUBE: {:?}; logs:\n{}",
            r.outcome,
            rspamd.logs()
        );
    });
}

#[test]
fn direct_rspamd_adds_its_headers_to_ham() {
    timed(120, || {
        let rspamd = daemon!(milter_daemons::rspamd());
        let r = eom(run(converse(&rspamd, &ham_message())), &rspamd);
        assert!(is_passed(&r.outcome), "ham: {:?}", r.outcome);
        let added = added_headers(&r.modifications);
        let result = find_header(&added, "X-Spamd-Result").unwrap_or_else(|| {
            panic!(
                "no X-Spamd-Result among {:?}; logs:\n{}",
                r.modifications,
                rspamd.logs()
            )
        });
        assert!(result.contains("default:"), "{result:?}");
        let status = find_header(&added, "X-Spam-Status").expect("X-Spam-Status");
        assert!(status.starts_with("No"), "{status:?}");
    });
}

#[test]
fn proxy_rspamd_rejects_gtube_and_delivers_nothing() {
    timed(120, || {
        let rspamd = daemon!(milter_daemons::rspamd());
        let up = Upstream::start();
        let p = milter_proxy(&up, &rspamd);
        let (code, text) = send(&p, &gtube_message());
        assert!(
            (500..600).contains(&code),
            "GTUBE through rspamd: {code} {text}; logs:\n{}",
            rspamd.logs()
        );
        up.assert_nothing_delivered();
    });
}

#[test]
fn proxy_rspamd_delivers_ham_with_its_headers() {
    timed(120, || {
        let rspamd = daemon!(milter_daemons::rspamd());
        let up = Upstream::start();
        let p = milter_proxy(&up, &rspamd);
        let sent = ham_message();
        let (code, text) = send(&p, &sent);
        assert_eq!(
            code,
            250,
            "ham through rspamd: {text}; logs:\n{}",
            rspamd.logs()
        );
        let got = up.expect_one().content;
        let result = header_values(&got, "X-Spamd-Result");
        assert_eq!(result.len(), 1, "X-Spamd-Result in {}", show(&got));
        assert!(result[0].contains("default:"), "{:?}", result[0]);
        let status = header_values(&got, "X-Spam-Status");
        assert!(
            status.len() == 1 && status[0].starts_with("No"),
            "X-Spam-Status {status:?} in {}",
            show(&got)
        );
        // The original message is all there, byte for byte, with the fields added.
        assert_eq!(body(&got), body(&sent), "the body changed");
        let got_head = format!("{}\r\n", String::from_utf8_lossy(head(&got)));
        for (name, value) in header_fields(&sent) {
            let field = format!("{name}:{value}\r\n");
            assert!(got_head.contains(&field), "{field:?} lost: {}", show(&got));
        }
    });
}

// ---------------------------------------------------------------------------------------
// clamav-milter

#[test]
fn direct_clamav_rejects_an_eicar_attachment() {
    timed(120, || {
        let clamav = daemon!(milter_daemons::clamav());
        let r = eom(run(converse(&clamav, &eicar_attachment_message())), &clamav);
        assert!(
            is_rejection(&r.outcome),
            "EICAR: {:?}; logs:\n{}",
            r.outcome,
            clamav.logs()
        );
        assert!(
            clamav.logs().contains(EICAR_SIGNATURE),
            "clamd did not name our signature:\n{}",
            clamav.logs()
        );
    });
}

#[test]
fn direct_clamav_marks_clean_mail() {
    timed(120, || {
        let clamav = daemon!(milter_daemons::clamav());
        let r = eom(run(converse(&clamav, &ham_message())), &clamav);
        assert!(is_passed(&r.outcome), "clean: {:?}", r.outcome);
        let added = added_headers(&r.modifications);
        assert!(
            find_header(&added, "X-Virus-Scanned").is_some(),
            "no X-Virus-Scanned among {:?}; logs:\n{}",
            r.modifications,
            clamav.logs()
        );
        assert_eq!(find_header(&added, "X-Virus-Status"), Some("Clean"));
        // With the sender's own X-Virus-Status, clamav-milter deletes that field (CHGHEADER
        // with an empty value) before adding its own (AddHeader Replace).
        let r = eom(run(converse(&clamav, &forged_clean_message())), &clamav);
        assert!(is_passed(&r.outcome), "clean: {:?}", r.outcome);
        let chg = |m: &Modification| {
            matches!(m, Modification::ChgHeader { index: 1, name, value }
                if name.eq_ignore_ascii_case(b"X-Virus-Status") && value.is_empty())
        };
        let add = |m: &Modification| {
            matches!(m, Modification::AddHeader { name, value }
                if name.eq_ignore_ascii_case(b"X-Virus-Status") && value == "Clean")
        };
        let mods = &r.modifications;
        let deleted = mods.iter().position(chg);
        let added = mods.iter().position(add);
        assert!(
            deleted.is_some() && added.is_some() && deleted < added,
            "X-Virus-Status not deleted then added: {mods:?}"
        );
    });
}

#[test]
fn proxy_clamav_rejects_eicar_and_delivers_nothing() {
    timed(120, || {
        let clamav = daemon!(milter_daemons::clamav());
        let up = Upstream::start();
        let p = milter_proxy(&up, &clamav);
        let (code, text) = send(&p, &eicar_attachment_message());
        assert!(
            (500..600).contains(&code),
            "EICAR through clamav-milter: {code} {text}; logs:\n{}",
            clamav.logs()
        );
        up.assert_nothing_delivered();
        // The same connection's next, clean message goes through: the refusal covered
        // one message only.
        let mut c = p.open();
        let inline = message("inline", format!("{}\r\n", eicar()).as_bytes());
        let r = c.send_mail(&inline);
        assert!((500..600).contains(&r.code), "EICAR inline: {r:?}");
        let r = c.send_mail(&ham_message());
        assert_eq!(r.code, 250, "clean after a virus: {r:?}");
        assert_eq!(up.wait_delivered(1, secs(10)).len(), 1);
    });
}

#[test]
fn proxy_clamav_delivers_clean_mail_marked_scanned() {
    timed(120, || {
        let clamav = daemon!(milter_daemons::clamav());
        let up = Upstream::start();
        let p = milter_proxy(&up, &clamav);
        // A forged status from the sender is replaced (AddHeader Replace).
        let sent = forged_clean_message();
        assert_eq!(header_values(&sent, "X-Virus-Status"), ["Clean"]);
        let (code, text) = send(&p, &sent);
        assert_eq!(code, 250, "clean mail: {text}; logs:\n{}", clamav.logs());
        let got = up.expect_one().content;
        assert_eq!(
            header_values(&got, "X-Virus-Scanned").len(),
            1,
            "X-Virus-Scanned in {}",
            show(&got)
        );
        assert_eq!(
            header_values(&got, "X-Virus-Status"),
            ["Clean"],
            "one X-Virus-Status in {}",
            show(&got)
        );
        assert_eq!(body(&got), body(&sent));
    });
}

// ---------------------------------------------------------------------------------------
// opendkim

/// `content` with the header fields a milter added at the top, as Sendmail and Postfix
/// insert INSHEADER index 0: CRLF line ends (a milter folds with LF), and no space after
/// the colon when the value brings its own leading blank (opendkim's does).
fn with_added_on_top(content: &[u8], added: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in added {
        let value = value.replace("\r\n", "\n").replace('\n', "\r\n");
        let space = if value.starts_with([' ', '\t']) {
            ""
        } else {
            " "
        };
        out.extend_from_slice(format!("{name}:{space}{value}\r\n").as_bytes());
    }
    out.extend_from_slice(content);
    out
}

#[test]
fn direct_opendkim_signs_and_the_signature_verifies() {
    timed(120, || {
        if !have_dkimpy() {
            return;
        }
        for canonicalization in ["relaxed/relaxed", "simple/simple"] {
            let dkim = daemon!(milter_daemons::opendkim(canonicalization));
            let sent = folded_message();
            let r = eom(run(converse(&dkim, &sent)), &dkim);
            assert!(is_passed(&r.outcome), "signing: {:?}", r.outcome);
            let signature = r
                .modifications
                .iter()
                .find_map(|m| match m {
                    Modification::InsHeader { name, value, .. }
                    | Modification::AddHeader { name, value }
                        if name.eq_ignore_ascii_case(b"DKIM-Signature") =>
                    {
                        Some(String::from_utf8_lossy(value).into_owned())
                    }
                    _ => None,
                })
                .unwrap_or_else(|| {
                    panic!(
                        "no DKIM-Signature among {:?}; logs:\n{}",
                        r.modifications,
                        dkim.logs()
                    )
                });
            assert!(
                signature.contains(&format!("d={DKIM_DOMAIN}"))
                    && signature.contains(&format!("s={DKIM_SELECTOR}"))
                    && signature.contains(&format!("c={canonicalization}")),
                "{signature:?}"
            );
            let signed = with_added_on_top(&sent, &[("DKIM-Signature".into(), signature)]);
            let txt = dkim_txt_record(&dkim);
            let (ok, why) = dkim_verify(&signed, &txt);
            assert!(
                ok,
                "{canonicalization}: the signature does not verify: {why}\n{}",
                show(&signed)
            );
            // The check can fail: a changed body does not verify.
            let mut tampered = signed.clone();
            let at = tampered.len() - 4;
            tampered[at] ^= 0x20;
            assert!(
                !dkim_verify(&tampered, &txt).0,
                "{canonicalization}: tampered"
            );
        }
    });
}

#[test]
fn proxy_opendkim_signed_mail_verifies_upstream() {
    timed(120, || {
        proxy_opendkim("relaxed/relaxed");
    });
}

/// Under simple canonicalization the signature holds only if the proxy passes the signed
/// header fields to opendkim and the message to the upstream unchanged, and inserts the
/// signature field exactly as opendkim formatted it.
#[test]
fn proxy_opendkim_simple_canonicalization_verifies_upstream() {
    timed(120, || {
        proxy_opendkim("simple/simple");
    });
}

fn proxy_opendkim(canonicalization: &str) {
    if !have_dkimpy() {
        return;
    }
    let dkim = daemon!(milter_daemons::opendkim(canonicalization));
    let up = Upstream::start();
    let p = milter_proxy(&up, &dkim);
    // A folded header field and a dot-stuffed line: the signature covers what the upstream
    // gets, after the proxy's own handling of both.
    let sent = folded_message();
    let (code, text) = send(&p, &sent);
    assert_eq!(code, 250, "signing: {text}; logs:\n{}", dkim.logs());
    let got = up.expect_one().content;
    let signatures = header_values(&got, "DKIM-Signature");
    assert_eq!(signatures.len(), 1, "DKIM-Signature in {}", show(&got));
    assert!(signatures[0].contains(&format!("c={canonicalization}")));
    let (ok, why) = dkim_verify(&got, &dkim_txt_record(&dkim));
    assert!(
        ok,
        "{canonicalization}: the upstream's copy does not verify: {why}\n{}",
        show(&got)
    );
    assert_eq!(body(&got), body(&sent));
}

/// A message with a folded Subject (signed by opendkim) and a line starting with a dot.
fn folded_message() -> Vec<u8> {
    b"From: <alice@example.org>\r\nTo: <bob@example.net>\r\nSubject: signed\r\n and folded\r\n\
      Message-ID: <folded@test.example>\r\n\r\nDear Bob,\r\n.leading dot\r\n\r\nregards,\r\n\
      \x20 Alice\r\n"
        .to_vec()
}

// ---------------------------------------------------------------------------------------
// spamass-milter

/// The score at or above which spamass-milter rejects (GTUBE scores 1000).
const SPAMASS_REJECT: u32 = 15;

#[test]
fn direct_spamass_rejects_gtube_and_marks_ham() {
    timed(150, || {
        let spamass = daemon!(milter_daemons::spamass(SPAMASS_REJECT));
        let r = eom(run(converse(&spamass, &gtube_message())), &spamass);
        assert!(
            is_rejection(&r.outcome),
            "GTUBE: {:?}; logs:\n{}",
            r.outcome,
            spamass.logs()
        );
        let r = eom(run(converse(&spamass, &ham_message())), &spamass);
        assert!(is_passed(&r.outcome), "ham: {:?}", r.outcome);
        let added = added_headers(&r.modifications);
        let status = find_header(&added, "X-Spam-Status").unwrap_or_else(|| {
            panic!(
                "no X-Spam-Status among {:?}; logs:\n{}",
                r.modifications,
                spamass.logs()
            )
        });
        assert!(status.starts_with("No"), "{status:?}");
    });
}

#[test]
fn proxy_spamass_rejects_gtube_and_marks_ham() {
    timed(150, || {
        let spamass = daemon!(milter_daemons::spamass(SPAMASS_REJECT));
        let up = Upstream::start();
        let p = milter_proxy(&up, &spamass);
        let (code, text) = send(&p, &gtube_message());
        assert!(
            (500..600).contains(&code),
            "GTUBE through spamass-milter: {code} {text}; logs:\n{}",
            spamass.logs()
        );
        up.assert_nothing_delivered();
        let sent = ham_message();
        let (code, text) = send(&p, &sent);
        assert_eq!(code, 250, "ham: {text}; logs:\n{}", spamass.logs());
        let got = up.expect_one().content;
        let status = header_values(&got, "X-Spam-Status");
        assert!(
            status.len() == 1 && status[0].starts_with("No"),
            "X-Spam-Status {status:?} in {}",
            show(&got)
        );
        assert!(
            !header_values(&got, "X-Spam-Checker-Version").is_empty(),
            "X-Spam-Checker-Version in {}",
            show(&got)
        );
    });
}

// ---------------------------------------------------------------------------------------
// A chain of real milters.

/// clamav-milter, rspamd and opendkim in one `Milters` line, in that order: clean mail
/// gets every milter's fields and a signature that verifies; GTUBE is refused by rspamd
/// after clamav-milter passed it; EICAR by clamav-milter before rspamd sees it.
///
/// clamav-milter answers ACCEPT (not CONTINUE) at the end of every clean message. As in
/// Postfix (milter8.c: ACCEPT ends that milter's part in the message, the next milter is
/// still asked) and Sendmail (the filter's state becomes done, the command goes on to the
/// next filter), that must not keep rspamd and opendkim from seeing the message.
#[test]
fn proxy_chain_of_real_milters() {
    timed(150, || {
        if !have_dkimpy() {
            return;
        }
        let clamav = daemon!(milter_daemons::clamav());
        let dkim = daemon!(milter_daemons::opendkim("relaxed/relaxed"));
        let rspamd = daemon!(milter_daemons::rspamd());
        let up = Upstream::start();
        let line = format!(
            "{}{{name=clamav}}, {}{{name=rspamd}}, {}{{name=opendkim}}",
            clamav.address(),
            rspamd.address(),
            dkim.address()
        );
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("Milters", &line)
            .start();
        let logs = || format!("{}{}{}", clamav.logs(), rspamd.logs(), dkim.logs());
        let mut c = p.open();
        c.set_timeout(secs(40));
        let r = c.send_mail(&gtube_message());
        assert!(
            (500..600).contains(&r.code),
            "GTUBE: {r:?}; logs:\n{}",
            logs()
        );
        let r = c.send_mail(&eicar_attachment_message());
        assert!(
            (500..600).contains(&r.code),
            "EICAR: {r:?}; logs:\n{}",
            logs()
        );
        up.assert_nothing_delivered();
        let sent = folded_message();
        let r = c.send_mail(&sent);
        assert_eq!(r.code, 250, "clean: {r:?}; logs:\n{}", logs());
        let got = up.expect_one().content;
        for name in ["X-Virus-Scanned", "X-Spamd-Result", "DKIM-Signature"] {
            assert_eq!(
                header_values(&got, name).len(),
                1,
                "{name} in {}",
                show(&got)
            );
        }
        assert_eq!(header_values(&got, "X-Virus-Status"), ["Clean"]);
        let (ok, why) = dkim_verify(&got, &dkim_txt_record(&dkim));
        assert!(
            ok,
            "the chain's output does not verify: {why}\n{}",
            show(&got)
        );
        assert_eq!(body(&got), body(&sent));
    });
}
