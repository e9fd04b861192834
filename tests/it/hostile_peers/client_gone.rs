//! A client that sent its whole message and left before the answer never learns whether it
//! was delivered, so it will send it again: delivering it anyway makes a duplicate. The
//! proxy sends `RSET` (or, in the middle of the data, closes the upstream connection
//! without the terminating dot) instead, logs the message as `CLIENT-GONE` and counts it in
//! `proxsmtpd_messages_abandoned_total`.

use std::net::SocketAddr;

use crate::common::metrics::metric;
use crate::common::proxy::free_port;
use crate::common::upstream::Reply;
use crate::common::{default_message, ms, secs, stuff, timed, Client, ProxyBuilder, Upstream};

fn admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// MAIL, RCPT, DATA and the whole body with its dot, then the client is gone.
fn send_and_leave(c: &mut Client) {
    assert_eq!(c.cmd("MAIL FROM:<alice@example.org>").code, 250);
    assert_eq!(c.cmd("RCPT TO:<bob@example.net>").code, 250);
    assert_eq!(c.cmd("DATA").code, 354);
    c.send(stuff(&default_message()));
}

/// The whole message, then the client closes; the proxy counts one abandoned message.
fn leave_and_see_it_counted(mut c: Client, admin: &SocketAddr) {
    send_and_leave(&mut c);
    c.close();
    metric("proxsmtpd_messages_abandoned_total")
        .value(1.0)
        .timeout(secs(10))
        .assert_in(admin);
}

#[test]
fn client_gone_while_the_filter_runs_gets_nothing_delivered() {
    timed(60, || {
        for file_mode in [false, true] {
            let up = Upstream::start();
            let admin = admin_addr();
            let b = ProxyBuilder::new().upstream(&up);
            let filter = if file_mode {
                b.script("slow.sh", "sleep 1\n")
            } else {
                b.script("slow.sh", "sleep 1\nexec cat\n")
            };
            let mut b = b
                .set("FilterCommand", &filter)
                .set("AdminListen", &admin.to_string());
            if file_mode {
                b = b.set("FilterType", "file");
            }
            let p = b.start();
            let c = p.open();
            leave_and_see_it_counted(c, &admin);
            up.assert_nothing_delivered();
            assert!(
                p.wait_log("status=CLIENT-GONE", secs(5)),
                "file mode {file_mode}: {}",
                p.log()
            );
            // The upstream got RSET, not DATA.
            assert!(
                up.wait_command(0, secs(5), |l| l == "RSET"),
                "{:#?}",
                up.summary()
            );
            assert!(p.wait_tmp_clean(secs(5)), "temp files left");
        }
    });
}

#[test]
fn client_gone_before_the_end_of_a_streamed_message_is_committed() {
    timed(60, || {
        // A slow 354 from the upstream: the client has sent its dot and left by the time the
        // proxy could send the terminating dot upstream.
        let up = Upstream::builder()
            .reply("DATA", Reply::text("354 go ahead").delay(ms(600)))
            .start();
        let admin = admin_addr();
        let p = ProxyBuilder::new()
            .upstream(&up)
            .set("AdminListen", &admin.to_string())
            .start();
        let c = p.open();
        leave_and_see_it_counted(c, &admin);
        assert!(up.wait_closed(0, secs(5)), "upstream left open");
        assert!(up.delivered().is_empty(), "{:#?}", up.summary());
        assert!(
            up.messages().iter().all(|m| !m.complete),
            "{:#?}",
            up.summary()
        );
    });
}

#[test]
fn a_client_that_stays_gets_its_message_delivered() {
    timed(60, || {
        // The watch must not mistake a client that waits quietly for one that left.
        let up = Upstream::start();
        let b = ProxyBuilder::new().upstream(&up);
        let filter = b.script("slow.sh", "sleep 1\nexec cat\n");
        let p = b.set("FilterCommand", &filter).start();
        let mut c = p.open();
        c.set_timeout(secs(10));
        assert_eq!(c.send_mail(&default_message()).code, 250);
        assert_eq!(up.delivered().len(), 1);
        assert_eq!(c.cmd("QUIT").code, 221);
    });
}
