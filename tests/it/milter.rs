//! The milter client (`proxsmtpd::proxy::milter`) against the scriptable test milter:
//! negotiation, verdicts at MAIL and RCPT, end-of-message modifications, timeouts,
//! PROGRESS, and a milter that is unreachable, closes, or sends a broken packet (each gives
//! the configured default action, and the conversation stays failed).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proxsmtpd::config::milter::{parse_milters, MilterAction, MilterConfig, MilterDefaults};
use proxsmtpd::protocol::milter::codec::{Command, ConnectAddress};
use proxsmtpd::protocol::milter::negotiate::MacroNames;
use proxsmtpd::protocol::milter::reply::Modification;
use proxsmtpd::protocol::milter::session::Verdict;
use proxsmtpd::protocol::milter::{ProtocolError, Stage};
use proxsmtpd::proxy::milter::{
    ClientInfo, EnvelopeCommand, FailureKind, MilterChain, MilterClient, Outcome,
};

use crate::common::milter::{Act, Received, Script, TestMilter};
use crate::common::timed;

/// `Milters` entry (address plus options) with the global defaults (30 s, tempfail).
fn config(entry: &str) -> MilterConfig {
    let defaults = MilterDefaults {
        connect_timeout: Duration::from_secs(30),
        command_timeout: Duration::from_secs(30),
        content_timeout: Duration::from_secs(300),
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

async fn connect(entry: &str) -> MilterClient {
    MilterClient::connect(config(entry), 6, MacroNames::default()).await
}

async fn connect_stage(client: &mut MilterClient) -> Outcome {
    let command = Command::Connect {
        hostname: b"client.example",
        address: ConnectAddress::Inet {
            ip: "192.0.2.1".parse().unwrap(),
            port: 4321,
        },
    };
    client.stage(command, &[]).await.outcome
}

async fn mail(client: &mut MilterClient, sender: &[u8]) -> Outcome {
    let args: [&[u8]; 1] = [sender];
    let macros: [(&str, &[u8]); 1] = [("{mail_addr}", b"a@example.com")];
    client.stage(Command::Mail(&args), &macros).await.outcome
}

async fn rcpt(client: &mut MilterClient, recipient: &[u8]) -> Outcome {
    let args: [&[u8]; 1] = [recipient];
    client.stage(Command::Rcpt(&args), &[]).await.outcome
}

fn failure(outcome: Outcome) -> (FailureKind, MilterAction) {
    match outcome {
        Outcome::Failed(f) => (f.kind, f.action),
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn packet(command: u8, data: &[u8]) -> Received {
    Received {
        command,
        data: data.to_vec(),
    }
}

#[test]
fn negotiation_offers_everything_and_honours_opt_outs() {
    timed(30, || {
        // The milter wants to add headers and skips HELO (SMFIP_NOHELO).
        let milter = TestMilter::start(Script::new().negotiate(0x01, 0x02));
        run(async {
            let mut client = connect(&milter.address).await;
            assert_eq!(client.failure(), None);
            let n = client.negotiated().expect("negotiated");
            assert_eq!((n.version, n.actions, n.protocol), (6, 0x01, 0x02));
            assert_eq!(connect_stage(&mut client).await, Outcome::Continue);
            let helo = client.stage(Command::Helo(b"client.example"), &[]).await;
            assert_eq!(helo.outcome, Outcome::Continue);
            client.quit().await;
        });
        let got = milter.received();
        let mut offer = Vec::new();
        for word in [6u32, 0x1ff, 0x1f_ffff] {
            offer.extend_from_slice(&word.to_be_bytes());
        }
        assert_eq!(got[0][0], packet(b'O', &offer), "the offer");
        // HELO was not sent (opted out); QUIT ends the conversation.
        let deadline = Instant::now() + Duration::from_secs(5);
        while milter.commands()[0] != "OCQ" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(milter.commands(), ["OCQ"]);
        assert_eq!(
            got[0][1].data,
            b"client.example\x004\x10\xe1192.0.2.1\x00".to_vec(),
            "connect packet"
        );
    });
}

#[test]
fn accept_at_mail_with_macros_over_a_unix_socket() {
    timed(30, || {
        let milter = TestMilter::start_unix(Script::new().on(b'M', vec![Act::reply(b'a')]));
        run(async {
            let mut client = connect(&milter.address).await;
            assert_eq!(connect_stage(&mut client).await, Outcome::Continue);
            assert_eq!(
                mail(&mut client, b"<a@example.com>").await,
                Outcome::Verdict(Verdict::Accept)
            );
            // Accept covers the message: RCPT is not sent.
            assert_eq!(
                rcpt(&mut client, b"<b@example.com>").await,
                Outcome::Continue
            );
        });
        let got = &milter.received()[0];
        assert_eq!(milter.commands(), ["OCDM"]);
        assert_eq!(got[2], packet(b'D', b"M{mail_addr}\0a@example.com\0"));
        assert_eq!(got[3], packet(b'M', b"<a@example.com>\0"));
    });
}

#[test]
fn reject_at_mail() {
    timed(30, || {
        let milter = TestMilter::start(
            Script::new()
                .on(b'M', vec![Act::reply(b'r')])
                .on(b'M', vec![Act::reply_code("550 5.7.1 Go away")]),
        );
        run(async {
            let mut client = connect(&milter.address).await;
            connect_stage(&mut client).await;
            assert_eq!(
                mail(&mut client, b"<a@example.com>").await,
                Outcome::Verdict(Verdict::Reject)
            );
            assert_eq!(
                client.stage(Command::Abort, &[]).await.outcome,
                Outcome::Continue
            );
            match mail(&mut client, b"<a@example.com>").await {
                Outcome::Verdict(Verdict::Reply(r)) => {
                    assert_eq!(r.code, 550);
                    assert_eq!(r.lines().collect::<Vec<_>>(), [&b"550 5.7.1 Go away"[..]]);
                }
                other => panic!("expected a reply code, got {other:?}"),
            }
        });
    });
}

#[test]
fn tempfail_at_rcpt_covers_that_recipient() {
    timed(30, || {
        let milter = TestMilter::start(
            Script::new()
                .on(b'R', vec![Act::reply(b't')])
                .on(b'R', vec![Act::reply(b'c')]),
        );
        run(async {
            let mut client = connect(&milter.address).await;
            connect_stage(&mut client).await;
            assert_eq!(
                mail(&mut client, b"<a@example.com>").await,
                Outcome::Continue
            );
            assert_eq!(
                rcpt(&mut client, b"<b@example.com>").await,
                Outcome::Verdict(Verdict::Tempfail)
            );
            assert_eq!(
                rcpt(&mut client, b"<c@example.com>").await,
                Outcome::Continue
            );
        });
        let got = &milter.received()[0];
        let rcpts: Vec<&[u8]> = got
            .iter()
            .filter(|p| p.command == b'R')
            .map(|p| p.data.as_slice())
            .collect();
        assert_eq!(rcpts, [&b"<b@example.com>\0"[..], b"<c@example.com>\0"]);
    });
}

#[test]
fn end_of_message_collects_modifications() {
    timed(30, || {
        let milter = TestMilter::start(Script::new().negotiate(0x01, 0).on(
            b'E',
            vec![
                Act::Packet(b'h', b"X-Spam\0yes\0".to_vec()),
                Act::reply(b'p'),
                Act::reply(b'a'),
            ],
        ));
        run(async {
            let mut client = connect(&milter.address).await;
            connect_stage(&mut client).await;
            mail(&mut client, b"<a@example.com>").await;
            rcpt(&mut client, b"<b@example.com>").await;
            for command in [
                Command::Data,
                Command::Header {
                    name: b"Subject",
                    value: b"hi",
                },
                Command::Eoh,
                Command::Body(b"text\r\n"),
            ] {
                assert_eq!(client.stage(command, &[]).await.outcome, Outcome::Continue);
            }
            let eom = client.stage(Command::BodyEob, &[]).await;
            assert_eq!(eom.outcome, Outcome::Verdict(Verdict::Accept));
            assert_eq!(
                eom.modifications,
                [Modification::AddHeader {
                    name: Bytes::from_static(b"X-Spam"),
                    value: Bytes::from_static(b"yes"),
                }]
            );
        });
        assert_eq!(milter.commands(), ["OCDMRTLNBE"]);
    });
}

#[test]
fn command_timeout_gives_the_default_action_and_stays_failed() {
    timed(30, || {
        let milter = TestMilter::start(Script::new().on(
            b'M',
            vec![Act::Sleep(Duration::from_secs(3)), Act::reply(b'c')],
        ));
        run(async {
            let entry = format!("{}{{command_timeout=1s}}", milter.address);
            let mut client = connect(&entry).await;
            connect_stage(&mut client).await;
            let started = Instant::now();
            let (kind, action) = failure(mail(&mut client, b"<a@example.com>").await);
            let took = started.elapsed();
            assert_eq!(kind, FailureKind::Timeout(Stage::Mail));
            assert_eq!(action, MilterAction::Tempfail);
            assert!(
                took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
                "{took:?}"
            );
            assert_eq!(client.failure(), Some(&FailureKind::Timeout(Stage::Mail)));
            let (kind, _) = failure(rcpt(&mut client, b"<b@example.com>").await);
            assert_eq!(kind, FailureKind::Timeout(Stage::Mail), "stays failed");
        });
    });
}

#[test]
fn progress_restarts_the_wait() {
    timed(30, || {
        let pause = Duration::from_millis(600);
        let milter = TestMilter::start(Script::new().on(
            b'M',
            vec![
                Act::Sleep(pause),
                Act::reply(b'p'),
                Act::Sleep(pause),
                Act::reply(b'p'),
                Act::Sleep(pause),
                Act::reply(b'r'),
            ],
        ));
        run(async {
            let entry = format!("{}{{command_timeout=1}}", milter.address);
            let mut client = connect(&entry).await;
            connect_stage(&mut client).await;
            let started = Instant::now();
            assert_eq!(
                mail(&mut client, b"<a@example.com>").await,
                Outcome::Verdict(Verdict::Reject)
            );
            assert!(started.elapsed() >= Duration::from_millis(1700));
        });
    });
}

#[test]
fn connect_timeout_and_refused_connection() {
    timed(30, || {
        // A listener that never accepts: the TCP handshake completes, negotiation never.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        run(async {
            let entry = format!("inet:{addr}{{connect_timeout=1s, default_action=accept}}");
            let started = Instant::now();
            let mut client = connect(&entry).await;
            assert_eq!(client.failure(), Some(&FailureKind::ConnectTimeout));
            assert!(started.elapsed() < Duration::from_millis(2500));
            let (kind, action) = failure(connect_stage(&mut client).await);
            assert_eq!(
                (kind, action),
                (FailureKind::ConnectTimeout, MilterAction::Accept)
            );
        });
        drop(silent);
        // Nothing listens there any more.
        run(async {
            let mut client = connect(&format!("inet:{addr}")).await;
            let (kind, action) = failure(connect_stage(&mut client).await);
            assert!(matches!(kind, FailureKind::Connect(_)), "{kind:?}");
            assert_eq!(action, MilterAction::Tempfail);
        });
    });
}

#[test]
fn a_closing_milter_gives_the_default_action() {
    timed(30, || {
        let milter = TestMilter::start(Script::new().on(b'R', vec![Act::Close]));
        run(async {
            let entry = format!("{}{{default_action=reject}}", milter.address);
            let mut client = connect(&entry).await;
            connect_stage(&mut client).await;
            assert_eq!(
                mail(&mut client, b"<a@example.com>").await,
                Outcome::Continue
            );
            let (kind, action) = failure(rcpt(&mut client, b"<b@example.com>").await);
            assert_eq!((kind, action), (FailureKind::Closed, MilterAction::Reject));
        });
    });
}

#[test]
fn malformed_packets_break_the_conversation() {
    timed(30, || {
        // An unknown reply command, an oversized length, a reply code that is no SMTP reply,
        // and a packet nobody asked for after the answer.
        let cases: [(Act, &str); 4] = [
            (Act::Raw(b"\0\0\0\x01Z".to_vec()), "unknown"),
            (Act::Raw(b"\x7f\0\0\0c".to_vec()), "oversize"),
            (Act::reply_code("250 fine"), "reply code"),
            (Act::Raw(b"\0\0\0\x01c\0\0\0\x01c".to_vec()), "unsolicited"),
        ];
        for (act, what) in cases {
            let milter = TestMilter::start(Script::new().on(b'M', vec![act]));
            run(async {
                let mut client = connect(&milter.address).await;
                connect_stage(&mut client).await;
                let (kind, action) = failure(mail(&mut client, b"<a@example.com>").await);
                assert_eq!(action, MilterAction::Tempfail, "{what}");
                let expected = match what {
                    "unknown" => matches!(
                        kind,
                        FailureKind::Protocol(ProtocolError::UnknownCommand(b'Z'))
                    ),
                    "oversize" => {
                        matches!(kind, FailureKind::Protocol(ProtocolError::Oversize { .. }))
                    }
                    "reply code" => {
                        matches!(kind, FailureKind::Protocol(ProtocolError::BadReplyCode))
                    }
                    _ => kind == FailureKind::Unsolicited,
                };
                assert!(expected, "{what}: {kind:?}");
            });
        }
    });
}

fn client_info() -> ClientInfo {
    ClientInfo {
        hostname: "client.example".into(),
        addr: Some("192.0.2.1:4321".parse().unwrap()),
        helo: Some("client.example".into()),
        daemon_name: "mx.example".into(),
        tls: None,
        connection_id: "100000".into(),
    }
}

fn chain(entries: &[&str]) -> MilterChain {
    MilterChain::new(entries.iter().map(|e| config(e)).collect(), 6)
}

async fn check(chain: &mut MilterChain, command: EnvelopeCommand, line: &str) -> Option<String> {
    chain
        .envelope(command, line.as_bytes(), &client_info())
        .await
        .map(|r| String::from_utf8(r).unwrap())
}

#[test]
fn chain_answers_mail_and_rcpt_in_order() {
    timed(30, || {
        let a = TestMilter::start(
            Script::new()
                .on(b'R', vec![Act::reply(b't')])
                .on(b'R', vec![Act::reply(b'c')]),
        );
        let b = TestMilter::start(
            Script::new()
                .on(b'M', vec![Act::reply(b'c')])
                .on(b'M', vec![Act::reply_code("550 5.7.1 spam")]),
        );
        run(async {
            let mut chain = chain(&[&a.address, &b.address]);
            use EnvelopeCommand::{Mail, Rcpt};
            assert_eq!(
                check(&mut chain, Mail, "MAIL FROM:<a@x> SIZE=10\r\n").await,
                None
            );
            assert_eq!(
                check(&mut chain, Rcpt, "RCPT TO:<b@y>\r\n")
                    .await
                    .as_deref(),
                Some("451 4.7.1 Service unavailable - try again later\r\n"),
                "the first milter's tempfail"
            );
            assert_eq!(check(&mut chain, Rcpt, "RCPT TO:<c@y>\r\n").await, None);
            assert_eq!(
                check(&mut chain, Mail, "MAIL FROM:<d@x>\r\n")
                    .await
                    .as_deref(),
                Some("550 5.7.1 spam\r\n"),
                "the second milter's reply"
            );
            chain.quit().await;
        });
        // The second milter never saw the recipient the first refused; each saw ABORT
        // before the second MAIL.
        assert_eq!(a.commands()[0].trim_end_matches('Q'), "ODCHDMDRDRADM");
        assert_eq!(b.commands()[0].trim_end_matches('Q'), "ODCHDMDRADM");
        let got = &a.received()[0];
        // `i` (the queue id: connection id and message number) first, as Postfix lists it.
        assert_eq!(got[4], packet(b'D', b"Mi\x00100000.1\0{mail_addr}\0a@x\0"));
        assert_eq!(got[5], packet(b'M', b"<a@x>\0SIZE=10\0"));
        assert_eq!(got[3], packet(b'H', b"client.example\0"));
        let connect_macros = String::from_utf8_lossy(&got[1].data).into_owned();
        for want in [
            "{daemon_name}\0mx.example\0",
            "{client_addr}\x00192.0.2.1\0",
            "{client_port}\x004321\0",
            "_\0client.example [192.0.2.1]\0",
        ] {
            assert!(
                connect_macros.contains(want),
                "{connect_macros:?} lacks {want:?}"
            );
        }
    });
}

#[test]
fn chain_accept_skips_the_later_milters_and_failures_follow_default_action() {
    timed(30, || {
        let accepting = TestMilter::start(Script::new().on(b'M', vec![Act::reply(b'a')]));
        let later = TestMilter::start(Script::new().on(b'R', vec![Act::reply(b'r')]));
        let dead = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        run(async {
            use EnvelopeCommand::{Mail, Rcpt};
            let ignored = format!("inet:{dead_addr}{{default_action=accept}}");
            let mut c = chain(&[&ignored, &accepting.address, &later.address]);
            assert_eq!(check(&mut c, Mail, "MAIL FROM:<a@x>").await, None);
            assert_eq!(check(&mut c, Rcpt, "RCPT TO:<b@y>").await, None);
            c.quit().await;
            // Unreachable with the default action (tempfail): every command is refused.
            let mut c = chain(&[&format!("inet:{dead_addr}")]);
            assert_eq!(
                check(&mut c, Mail, "MAIL FROM:<a@x>").await.as_deref(),
                Some("451 4.7.1 Service unavailable - try again later\r\n")
            );
            let mut c = chain(&[&format!("inet:{dead_addr}{{default_action=reject}}")]);
            assert_eq!(
                check(&mut c, Rcpt, "RCPT TO:<b@y>").await.as_deref(),
                Some("550 5.7.1 Command rejected\r\n")
            );
        });
        // The later milter was not asked about the accepted message (nor connected: milters
        // are connected at their first use).
        assert_eq!(later.commands(), Vec::<String>::new());
    });
}

#[test]
fn chain_refuses_every_command_after_a_reject_at_connect() {
    timed(30, || {
        let milter = TestMilter::start(Script::new().on(b'C', vec![Act::reply(b'r')]));
        run(async {
            use EnvelopeCommand::{Mail, Rcpt};
            let mut c = chain(&[&milter.address]);
            for (command, line) in [(Mail, "MAIL FROM:<a@x>"), (Rcpt, "RCPT TO:<b@y>")] {
                assert_eq!(
                    check(&mut c, command, line).await.as_deref(),
                    Some("550 5.7.1 Command rejected\r\n")
                );
            }
        });
        assert_eq!(milter.commands()[0], "ODC");
    });
}
