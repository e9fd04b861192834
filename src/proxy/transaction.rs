//! One message: receive the body, run the filter, deliver or answer.
//!
//! The client gets 354 at once. With a filter, its body is spooled (unstuffed,
//! CRLF-normalised) to TempDirectory and the upstream sees DATA only after the filter
//! accepted the message, so a reject or a failure is answered without anything reaching the
//! upstream but an RSET. Without a filter (and without KeepAlives) nothing needs the whole
//! message first: the body is streamed upstream as it arrives (see [`unfiltered`]).
//! Whatever goes wrong locally, the rest of the body is read to its end before the client
//! gets its answer: body lines are never taken as commands.
//!
//! Three rules keep the client's answer true:
//! * Only a reply read after the terminating dot went upstream is the message's verdict:
//!   anything the upstream sent before (a `250` in the same write as its `354`) is a
//!   protocol error, the client gets a 4xx and the upstream connection is closed.
//! * A message with NUL octets is refused (`554 5.6.0`) after its dot: a receiver that
//!   drops NULs would read `CRLF NUL . CRLF` as the end of the data.
//! * A client that is gone before its answer gets nothing delivered: the upstream gets
//!   `RSET`, or, in the middle of the data, is closed without the terminating dot.
//!
//! The body must arrive at `MinDataRate` ([`DataDeadline`]), not merely a byte per TimeOut.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::AsyncReadExt;

use super::conn::{Conn, Fatal, READ_BUFFER};
use super::observe::{self, MessageOutcome};
use crate::config::FilterType;
use crate::filter::header::{self, HeaderContext};
use crate::filter::run::{self as filter_run, FilterJob, Mode};
use crate::filter::verdict::{self, ReplyKind, Verdict};
use crate::ops::metrics::{MessageVerdict, UpstreamStage};
use crate::protocol::data::DataReceiver;
use crate::protocol::deadline::DataDeadline;
use crate::protocol::encode::{HeaderPlacement, WireEncoder};
use crate::protocol::session::{DataMode, Envelope};

pub(crate) const REPLY_START_INPUT: &[u8] = b"354 Start mail input; end with <CRLF>.<CRLF>\r\n";
pub(crate) const REPLY_LOCAL_ERROR: &[u8] = b"451 Local Error\r\n";
pub(crate) const REPLY_NUL_IN_DATA: &[u8] = b"554 5.6.0 Message contains NUL characters\r\n";

/// Client bytes buffered while the filter runs before the proxy stops reading (the client
/// should be waiting for its answer, not talking).
const WATCH_LIMIT: usize = 64 * 1024;

/// How much encoded data is gathered before a write upstream.
const WRITE_CHUNK: usize = 64 * 1024;

/// Runs one message transaction inside its own `smtp.message` span.
pub(crate) async fn run(conn: &mut Conn, envelope: &Envelope, mode: DataMode) -> Result<(), Fatal> {
    use tracing::Instrument;
    let span = crate::ops::telemetry::message_span();
    match mode {
        DataMode::Passthrough => passthrough(conn, envelope).instrument(span).await,
        // KeepAlives promise NOOPs upstream while the proxy holds a message, which needs
        // the upstream out of DATA: with them set, an unfiltered message is spooled too.
        DataMode::Filter
            if conn.settings.filter_command.is_none() && conn.settings.keep_alives.is_none() =>
        {
            unfiltered(conn, envelope).instrument(span).await
        }
        DataMode::Filter => filtered(conn, envelope).instrument(span).await,
    }
}

/// What [`receive_body`] read.
struct Received {
    size: u64,
    nul_bytes: u64,
    /// The first error of the sink, if any (the reading went on).
    sink_error: Option<std::io::Error>,
}

/// The deadline of a body that starts now.
fn data_deadline(conn: &Conn) -> DataDeadline {
    DataDeadline::new(
        Instant::now(),
        conn.settings.timeout,
        conn.settings.min_data_rate,
    )
}

/// Receives the body into `sink`, reading the client until its terminating dot.
/// A failing sink does not stop the reading.
async fn receive_body(
    conn: &mut Conn,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Received, Fatal> {
    let mut receiver = DataReceiver::new();
    let mut deadline = data_deadline(conn);
    let mut content = Vec::new();
    let mut sink_error = None;
    loop {
        let feed = receiver.feed(&conn.relay.client_buf, &mut content);
        conn.relay.client_buf.advance(feed.consumed);
        if !content.is_empty() && sink_error.is_none() {
            if let Err(e) = sink(&content) {
                sink_error = Some(e);
            }
        }
        content.clear();
        if feed.done {
            log_irregular(conn, &receiver);
            return Ok(Received {
                size: receiver.content_bytes(),
                nul_bytes: receiver.nul_bytes(),
                sink_error,
            });
        }
        if conn.relay.client_eof {
            return Err(client_left(conn));
        }
        let due = tokio::time::Instant::from_std(deadline.due());
        match conn.read_client(due).await? {
            0 => return Err(client_left(conn)),
            n => deadline.received(Instant::now(), n),
        }
    }
}

fn client_left(conn: &mut Conn) -> Fatal {
    conn.relay.client_closed();
    tracing::error!("{}: unexpected end of data from client", conn.id);
    Fatal::ClientGone
}

fn log_irregular(conn: &Conn, receiver: &DataReceiver) {
    if receiver.irregular_line_endings() > 0 {
        tracing::info!(
            "{}: normalised {} bare CR/LF line ends in the message",
            conn.id,
            receiver.irregular_line_endings()
        );
    }
}

/// The client left before its answer: nothing is delivered. `RSET` when the upstream is not
/// in DATA; in the middle of the data only closing the connection (the caller's `Err`)
/// keeps the message from being delivered.
async fn abandon(conn: &mut Conn, envelope: &Envelope, size: u64, upstream_in_data: bool) -> Fatal {
    observe::abandoned(conn, envelope, size);
    if !upstream_in_data {
        let _ = conn.command(b"RSET\r\n", UpstreamStage::Command).await;
    }
    Fatal::ClientGone
}

/// A message with NUL octets: refused after its dot.
async fn refuse_nul(
    conn: &mut Conn,
    envelope: &Envelope,
    size: u64,
    started: Instant,
) -> Result<MessageOutcome, Fatal> {
    tracing::warn!("{}: refused a message containing NUL octets", conn.id);
    conn.send_client(REPLY_NUL_IN_DATA).await?;
    let outcome = MessageOutcome::new(
        MessageVerdict::Rejected,
        "NUL-IN-DATA".into(),
        size,
        started,
    );
    observe::message(conn, envelope, outcome.clone());
    Ok(outcome)
}

async fn filtered(conn: &mut Conn, envelope: &Envelope) -> Result<(), Fatal> {
    conn.send_client(REPLY_START_INPUT).await?;
    let settings = conn.settings.clone();
    let started = Instant::now();

    let mut spool = tempfile::Builder::new()
        .prefix("proxsmtpd.")
        .tempfile_in(&settings.temp_directory);
    let received = match spool.as_mut() {
        Ok(file) => receive_body(conn, |chunk| file.write_all(chunk)).await,
        Err(_) => receive_body(conn, |_| Ok(())).await,
    };
    let Received {
        size,
        nul_bytes,
        sink_error: write_error,
    } = match received {
        Ok(r) => r,
        Err(fatal) => {
            // The client left mid-body: the upstream never saw DATA, so RSET is enough.
            let _ = conn.command(b"RSET\r\n", UpstreamStage::Command).await;
            observe::message(conn, envelope, MessageOutcome::local_error(0, started));
            return Err(fatal);
        }
    };
    if nul_bytes > 0 {
        refuse_nul(conn, envelope, size, started).await?;
        conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
        return Ok(());
    }
    let spool = match (spool, write_error) {
        (Ok(file), None) => file,
        (Err(e), _) | (_, Some(e)) => {
            tracing::error!("{}: couldn't write cache file: {e}", conn.id);
            return local_error(conn, envelope, size, started, None).await;
        }
    };

    let Some(command) = settings.filter_command.clone() else {
        tracing::warn!(
            "{}: no filter command specified. passing message through",
            conn.id
        );
        let outcome = deliver_recorded(conn, envelope, spool.path(), size, started).await?;
        observe::message(conn, envelope, outcome.unfiltered());
        return Ok(());
    };

    let (mode, output) = match settings.filter_type {
        FilterType::File => (Mode::File, None),
        _ => match tempfile::Builder::new()
            .prefix("proxsmtpd.")
            .tempfile_in(&settings.temp_directory)
        {
            Ok(out) => (Mode::Pipe, Some(out)),
            Err(e) => {
                tracing::error!("{}: couldn't open cache file: {e}", conn.id);
                return local_error(conn, envelope, size, started, None).await;
            }
        },
    };
    let mut env = filter_environment(conn, envelope, &settings.temp_directory);
    if mode == Mode::File {
        env.push(("EMAIL".into(), spool.path().display().to_string()));
    }
    let stdout = match output.as_ref().map(|o| o.reopen()).transpose() {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("{}: couldn't open cache file: {e}", conn.id);
            return local_error(conn, envelope, size, started, None).await;
        }
    };
    let job = FilterJob {
        command: &command,
        mode,
        timeout: settings.filter_timeout,
        input: spool.path(),
        output: stdout,
        env,
    };
    let result = {
        let filter = filter_run::execute(job);
        tokio::pin!(filter);
        // KeepAlives continue while the filter runs: the upstream has not seen DATA yet,
        // so a NOOP is safe and keeps a slow filter from costing the upstream connection.
        // The client is watched meanwhile: if it leaves, it gets no answer and will send
        // the message again, so delivering it would make a duplicate.
        loop {
            let wake = conn.next_keepalive();
            let watch = !conn.relay.client_eof && conn.relay.client_buf.len() < WATCH_LIMIT;
            conn.relay.client_buf.reserve(READ_BUFFER);
            tokio::select! {
                outcome = &mut filter => break Some(outcome),
                _ = sleep_until_opt(wake) => conn.keepalive_if_due().await?,
                read = conn.client.read_buf(&mut conn.relay.client_buf), if watch => {
                    if matches!(read, Ok(0) | Err(_)) {
                        conn.relay.client_closed();
                        // Dropping the run ends the filter's process group.
                        break None;
                    }
                }
            }
        }
    };
    let Some(result) = result else {
        tracing::warn!(
            "{}: client disconnected while the filter ran; message not delivered",
            conn.id
        );
        return Err(abandon(conn, envelope, size, false).await);
    };
    let filter_time = result.duration;
    if let Some(pid) = result.pid {
        tracing::debug!(
            "{}: filter process group {pid} ended: {:?} after {} ms",
            conn.id,
            result.exit,
            filter_time.as_millis()
        );
    }
    crate::ops::metrics::global().filter_finished(filter_time);
    match &result.exit {
        verdict::Exit::TimedOut => crate::ops::metrics::global().filter_timeout(),
        verdict::Exit::SpawnFailed(e) => {
            tracing::error!("{}: couldn't run filter command: {e}", conn.id);
            crate::ops::metrics::global().filter_spawn_failure();
        }
        verdict::Exit::Signal(sig) => {
            tracing::error!(
                "{}: filter command terminated abnormally (signal {sig})",
                conn.id
            )
        }
        // The shell's "not found" / "not executable": the filter could not be started.
        verdict::Exit::Code(126 | 127) => crate::ops::metrics::global().filter_spawn_failure(),
        verdict::Exit::Code(_) => {}
    }

    match verdict::decide(&result.exit, result.stderr_last.as_deref()) {
        Verdict::Deliver => {
            let path = match &output {
                Some(out) => out.path(),
                None => spool.path(),
            };
            let outcome = deliver_recorded(conn, envelope, path, size, started).await?;
            observe::message(conn, envelope, outcome.with_filter(filter_time));
            Ok(())
        }
        Verdict::Reply { reply, kind } => {
            conn.send_client(reply.as_bytes()).await?;
            let verdict = match kind {
                ReplyKind::Drop => MessageVerdict::Dropped,
                ReplyKind::TempFail => MessageVerdict::TempFailed,
                ReplyKind::Reject => MessageVerdict::Rejected,
            };
            let status = reply.trim_end().to_string();
            let status = result.stderr_last.clone().unwrap_or(status);
            observe::message(
                conn,
                envelope,
                MessageOutcome::new(verdict, status, size, started).with_filter(filter_time),
            );
            conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
            Ok(())
        }
        Verdict::LocalError { reason } => {
            tracing::error!("{}: {reason}", conn.id);
            local_error(conn, envelope, size, started, Some(filter_time)).await
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `451 Local Error` to the client and RSET upstream.
async fn local_error(
    conn: &mut Conn,
    envelope: &Envelope,
    size: u64,
    started: Instant,
    filter_time: Option<Duration>,
) -> Result<(), Fatal> {
    conn.send_client(REPLY_LOCAL_ERROR).await?;
    let mut outcome = MessageOutcome::local_error(size, started);
    if let Some(t) = filter_time {
        outcome = outcome.with_filter(t);
    }
    observe::message(conn, envelope, outcome);
    conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
    Ok(())
}

/// The filter's environment, as the original sets it, plus `TLS`, `TLS_VERSION` and
/// `TLS_CIPHER` when the client used TLS.
fn filter_environment(conn: &Conn, envelope: &Envelope, tmpdir: &Path) -> Vec<(String, String)> {
    let mut env = Vec::with_capacity(8);
    if let Some(sender) = &envelope.sender {
        env.push(("SENDER".into(), sender.clone()));
    }
    if !envelope.recipients.is_empty() {
        env.push(("RECIPIENTS".into(), envelope.recipients.join("\n")));
    }
    let client = conn
        .info
        .peer
        .map(|p| p.ip().to_string())
        .unwrap_or_default();
    env.push(("CLIENT".into(), client));
    env.push(("SERVER".into(), conn.server.clone()));
    if let Some(remote) = &envelope.remote {
        env.push(("REMOTE".into(), remote.clone()));
    }
    if let Some(helo) = &envelope.remote_helo {
        env.push(("REMOTE_HELO".into(), helo.clone()));
    }
    env.push(("TMPDIR".into(), tmpdir.display().to_string()));
    // Only when the client used TLS, so that filters written for the original see the
    // same environment as before.
    if let Some(tls) = &conn.tls {
        env.push(("TLS".into(), "yes".into()));
        env.push(("TLS_VERSION".into(), tls.version.into()));
        env.push(("TLS_CIPHER".into(), tls.cipher.clone()));
    }
    env
}

/// The Header setting expanded now (so `%d` is the delivery time) and placed.
fn header_placement(conn: &Conn) -> HeaderPlacement {
    let Some(template) = conn.settings.header.as_deref() else {
        return HeaderPlacement::None;
    };
    let client_ip = conn
        .info
        .peer
        .map(|p| p.ip().to_string())
        .unwrap_or_default();
    let local_ip = conn
        .info
        .local
        .map(|p| p.ip().to_string())
        .unwrap_or_default();
    let now = jiff::Zoned::now();
    let ctx = HeaderContext {
        client_ip: &client_ip,
        local_ip: &local_ip,
        now: &now,
    };
    let (expanded, warnings) = header::expand(template, &ctx);
    for w in warnings {
        tracing::warn!("{}: {w}", conn.id);
    }
    if expanded.is_empty() {
        HeaderPlacement::None
    } else if header::is_received(&expanded) {
        HeaderPlacement::Prepend(expanded.into_bytes())
    } else {
        HeaderPlacement::EndOfHeaders(expanded.into_bytes())
    }
}

/// The upstream's answer to the message goes to the client. The outcome is the upstream's
/// even when the client is gone by then; the relay loop notices the closed client next.
async fn send_final_reply(conn: &mut Conn, reply: &crate::protocol::reply::Reply) {
    if conn.send_client(&reply.raw()).await.is_err() {
        conn.relay.client_closed();
    }
}

/// [`deliver`], and when the upstream fails on the way (the client then gets a 4xx),
/// the message is still counted as temporarily failed before the connection ends.
async fn deliver_recorded(
    conn: &mut Conn,
    envelope: &Envelope,
    path: &Path,
    size: u64,
    started: Instant,
) -> Result<MessageOutcome, Fatal> {
    match deliver(conn, envelope, path, size, started).await {
        Ok(outcome) => Ok(outcome),
        // Counted as abandoned already.
        Err(Fatal::ClientGone) => Err(Fatal::ClientGone),
        Err(fatal) => {
            let outcome =
                MessageOutcome::new(MessageVerdict::TempFailed, "FILTERED".into(), size, started);
            observe::message(conn, envelope, outcome);
            Err(fatal)
        }
    }
}

/// Sends the message in `path` upstream: DATA, the encoded content, the final reply
/// relayed to the client.
async fn deliver(
    conn: &mut Conn,
    envelope: &Envelope,
    path: &Path,
    size: u64,
    started: Instant,
) -> Result<MessageOutcome, Fatal> {
    // Opened before DATA: once the upstream said 354 there is no clean way back.
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("{}: couldn't open cache file: {e}", conn.id);
            conn.send_client(REPLY_LOCAL_ERROR).await?;
            conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
            return Ok(MessageOutcome::local_error(size, started));
        }
    };
    if conn.client_gone() {
        return Err(abandon(conn, envelope, size, false).await);
    }
    let reply = conn.command(b"DATA\r\n", UpstreamStage::Data).await?;
    if reply.code != 354 {
        tracing::debug!("{}: server refused data transfer", conn.id);
        send_final_reply(conn, &reply).await;
        return Ok(MessageOutcome::from_reply(&reply, size, started));
    }
    let mut encoder = WireEncoder::new(header_placement(conn));
    // Small buffers that grow with the message: a large zeroed buffer per message costs
    // more than the extra reads of a big one.
    let mut buf = vec![0u8; READ_BUFFER];
    let mut out = Vec::new();
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                // Part of the message is upstream without its terminator: only closing
                // the connection keeps it from being delivered half.
                tracing::error!("{}: couldn't read cache file: {e}", conn.id);
                let _ = conn.send_client(REPLY_LOCAL_ERROR).await;
                return Err(Fatal::Upstream("delivery aborted".into()));
            }
        };
        if n == 0 {
            break;
        }
        encoder.encode(&buf[..n], &mut out);
        if out.len() >= WRITE_CHUNK {
            if let Err(e) = conn.send_upstream(&out, UpstreamStage::Data).await {
                let _ = conn.send_client(REPLY_LOCAL_ERROR).await;
                return Err(e);
            }
            out.clear();
        }
    }
    encoder.finish(&mut out);
    finish_data(conn, envelope, &out, size, started).await
}

/// Writes the last part of a message with its terminating dot and reads the verdict, after
/// the two checks that must come first: the client is still there, and the upstream has
/// not answered before the end of the data.
async fn finish_data(
    conn: &mut Conn,
    envelope: &Envelope,
    last: &[u8],
    size: u64,
    started: Instant,
) -> Result<MessageOutcome, Fatal> {
    if conn.client_gone() {
        tracing::warn!(
            "{}: client disconnected before its answer; message not delivered",
            conn.id
        );
        return Err(abandon(conn, envelope, size, true).await);
    }
    if let Err(e) = conn.send_command(last, UpstreamStage::Final).await {
        let _ = conn.send_client(REPLY_LOCAL_ERROR).await;
        return Err(e);
    }
    match conn.read_reply(UpstreamStage::Final).await {
        Ok(reply) => {
            send_final_reply(conn, &reply).await;
            Ok(MessageOutcome::from_reply(&reply, size, started))
        }
        Err(e) => {
            // The upstream's answer is unknown: a temporary failure lets the client retry.
            let _ = conn.send_client(REPLY_LOCAL_ERROR).await;
            Err(e)
        }
    }
}

/// Where the upstream stands while an unfiltered body streams to it.
enum UpstreamData {
    /// DATA sent, its reply not read yet.
    Pending,
    /// The upstream said 354 and takes the body.
    Open,
    /// The upstream answered DATA with something else: its reply is the client's answer.
    Refused(crate::protocol::reply::Reply),
    /// The upstream connection failed; the client gets 451 after its dot.
    Failed(Fatal),
}

/// No FilterCommand (and no KeepAlives): nothing needs the whole message before the
/// upstream sees it, so no spool file is written and the body is streamed upstream as it
/// arrives. DATA goes upstream right after the client got its 354 (the original's order),
/// so the upstream's 354 comes back while the client is still sending, and the answer to
/// the client's dot costs one upstream round trip instead of two.
///
/// The client's 2xx is still the upstream's answer to the complete message. If the client
/// leaves or times out mid-body, or the message holds a NUL, nothing more is sent upstream
/// and the connection is closed: a message without its terminator is never delivered.
async fn unfiltered(conn: &mut Conn, envelope: &Envelope) -> Result<(), Fatal> {
    conn.send_client(REPLY_START_INPUT).await?;
    let started = Instant::now();
    let mut upstream = match conn.send_command(b"DATA\r\n", UpstreamStage::Data).await {
        Ok(()) => UpstreamData::Pending,
        Err(e) => UpstreamData::Failed(e),
    };
    // Logged once both sides are under way, not between them.
    tracing::warn!(
        "{}: no filter command specified. passing message through",
        conn.id
    );
    let mut receiver = DataReceiver::new();
    let mut deadline = data_deadline(conn);
    let mut encoder = WireEncoder::new(header_placement(conn));
    // Sized by what arrives: a small message allocates (and the allocator returns) little.
    let mut content = Vec::new();
    let mut out = Vec::new();
    loop {
        let feed = receiver.feed(&conn.relay.client_buf, &mut content);
        conn.relay.client_buf.advance(feed.consumed);
        encoder.encode(&content, &mut out);
        content.clear();
        if feed.done {
            break;
        }
        if out.len() >= WRITE_CHUNK || conn.relay.client_buf.is_empty() {
            // After a NUL the message will be refused: nothing more goes upstream.
            if receiver.nul_bytes() == 0 {
                forward(conn, &mut upstream, &out).await;
            }
            out.clear();
        }
        // No keepalives: once the upstream is in DATA a NOOP would become part of the message.
        let fatal = match read_body(conn, &mut deadline).await {
            Ok(()) => continue,
            Err(fatal) => fatal,
        };
        let outcome = MessageOutcome::local_error(receiver.content_bytes(), started);
        observe::message(conn, envelope, outcome.unfiltered());
        return Err(fatal);
    }
    log_irregular(conn, &receiver);
    let size = receiver.content_bytes();
    if receiver.nul_bytes() > 0 {
        refuse_nul(conn, envelope, size, started).await?;
        return match upstream {
            // The upstream is not in DATA: the session can go on.
            UpstreamData::Refused(_) => Ok(()),
            UpstreamData::Failed(fatal) => Err(fatal),
            UpstreamData::Pending | UpstreamData::Open => Err(Fatal::Upstream(
                "message with NUL octets: upstream connection closed in DATA".into(),
            )),
        };
    }
    encoder.finish(&mut out);
    resolve_data_reply(conn, &mut upstream).await;
    let result = match upstream {
        UpstreamData::Open => finish_data(conn, envelope, &out, size, started).await,
        UpstreamData::Refused(reply) => {
            tracing::debug!("{}: server refused data transfer", conn.id);
            send_final_reply(conn, &reply).await;
            Ok(MessageOutcome::from_reply(&reply, size, started))
        }
        UpstreamData::Failed(fatal) => {
            // The upstream's answer is unknown: a temporary failure lets the client retry.
            let _ = conn.send_client(REPLY_LOCAL_ERROR).await;
            Err(fatal)
        }
        UpstreamData::Pending => unreachable!("resolved above"),
    };
    match result {
        Ok(outcome) => {
            observe::message(conn, envelope, outcome.unfiltered());
            Ok(())
        }
        // Counted as abandoned already.
        Err(Fatal::ClientGone) => Err(Fatal::ClientGone),
        Err(fatal) => {
            let outcome =
                MessageOutcome::new(MessageVerdict::TempFailed, "FILTERED".into(), size, started);
            observe::message(conn, envelope, outcome.unfiltered());
            Err(fatal)
        }
    }
}

/// Reads the upstream's reply to DATA if it is still due.
async fn resolve_data_reply(conn: &mut Conn, upstream: &mut UpstreamData) {
    if matches!(upstream, UpstreamData::Pending) {
        *upstream = match conn.read_reply(UpstreamStage::Data).await {
            Ok(reply) if reply.code == 354 => UpstreamData::Open,
            Ok(reply) => UpstreamData::Refused(reply),
            Err(e) => UpstreamData::Failed(e),
        };
    }
}

/// Sends what is encoded so far upstream, first reading the upstream's reply to DATA if it
/// is still due. Without an open upstream the bytes are dropped: the rest of the body is
/// still read, so that the client gets its answer after its dot.
async fn forward(conn: &mut Conn, upstream: &mut UpstreamData, out: &[u8]) {
    resolve_data_reply(conn, upstream).await;
    if matches!(upstream, UpstreamData::Open) && !out.is_empty() {
        if let Err(e) = conn.send_upstream(out, UpstreamStage::Data).await {
            *upstream = UpstreamData::Failed(e);
        }
    }
}

/// Reads more of the body before its deadline.
async fn read_body(conn: &mut Conn, deadline: &mut DataDeadline) -> Result<(), Fatal> {
    let due = tokio::time::Instant::from_std(deadline.due());
    match tokio::time::timeout_at(due, read_more(conn)).await {
        Ok(Ok(n)) if n > 0 => {
            deadline.received(Instant::now(), n);
            Ok(())
        }
        Ok(_) => Err(client_left(conn)),
        Err(_) => Err(Fatal::ClientTimeout),
    }
}

/// `Skip: authenticated`: the body goes straight upstream, re-encoded so that nothing but
/// the client's own terminator can end it.
async fn passthrough(conn: &mut Conn, envelope: &Envelope) -> Result<(), Fatal> {
    let started = Instant::now();
    let reply = conn.command(b"DATA\r\n", UpstreamStage::Data).await?;
    conn.send_client(&reply.raw()).await?;
    if reply.code != 354 {
        tracing::debug!("{}: server refused data transfer", conn.id);
        return Ok(());
    }
    let mut receiver = DataReceiver::new();
    let mut deadline = data_deadline(conn);
    let mut encoder = WireEncoder::new(HeaderPlacement::None);
    let mut content = Vec::with_capacity(WRITE_CHUNK);
    let mut out = Vec::with_capacity(WRITE_CHUNK * 2);
    loop {
        let feed = receiver.feed(&conn.relay.client_buf, &mut content);
        conn.relay.client_buf.advance(feed.consumed);
        encoder.encode(&content, &mut out);
        content.clear();
        if feed.done {
            break;
        }
        if out.len() >= WRITE_CHUNK || conn.relay.client_buf.is_empty() {
            if receiver.nul_bytes() == 0 {
                conn.send_upstream(&out, UpstreamStage::Data).await?;
            }
            out.clear();
        }
        // No keepalives here: a NOOP would become part of the message.
        read_body(conn, &mut deadline).await?;
    }
    let size = receiver.content_bytes();
    if receiver.nul_bytes() > 0 {
        refuse_nul(conn, envelope, size, started).await?;
        return Err(Fatal::Upstream(
            "message with NUL octets: upstream connection closed in DATA".into(),
        ));
    }
    encoder.finish(&mut out);
    let outcome = finish_data(conn, envelope, &out, size, started).await?;
    observe::message(conn, envelope, outcome.skipped());
    Ok(())
}

async fn read_more(conn: &mut Conn) -> std::io::Result<usize> {
    conn.relay.client_buf.reserve(READ_BUFFER);
    conn.client.read_buf(&mut conn.relay.client_buf).await
}
