//! One message: receive the body, run the filter, deliver or answer.
//!
//! The client gets 354 at once. With a filter, its body is kept (unstuffed, CRLF-normalised)
//! in memory when small and only milters and hooks read it ([`content`]), else spooled to
//! TempDirectory, and the upstream sees DATA only after the filter
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
//!
//! Spool files are created, written, read and removed on the blocking pool ([`spool`]): a
//! slow TempDirectory holds up the message that uses it, not the other sessions.

mod content;
mod hooks;
mod milters;
mod shadow;
mod spool;

pub(crate) use shadow::configured as shadows_configured;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Buf;
use tokio::io::AsyncReadExt;

use super::conn::{Conn, Fatal, READ_BUFFER};
use super::observe::{self, MessageOutcome};
use crate::config::hook::{FilterKind, HookStage};
use crate::config::FilterType;
use crate::filter::header::{self, HeaderContext};
use crate::filter::run::{self as filter_run, FilterJob, Mode};
use crate::filter::verdict::{self, ReplyKind, Verdict};
use crate::ops::metrics::{MessageVerdict, UpstreamStage};
use crate::protocol::data::DataReceiver;
use crate::protocol::deadline::DataDeadline;
use crate::protocol::encode::{HeaderPlacement, WireEncoder};
use crate::protocol::session::{DataMode, Envelope};
use content::{Content, Reader, Receiving, Source};
use spool::Spool;

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
            if conn.settings.filter_command.is_none()
                && conn.settings.keep_alives.is_none()
                && conn.milters.is_none()
                && conn.hooks.is_none()
                && !shadow::configured(&conn.settings) =>
        {
            unfiltered(conn, envelope).instrument(span).await
        }
        DataMode::Filter => {
            let mut shadows = None;
            // Boxed: the filters' futures make this one many kilobytes, which the
            // unfiltered path would otherwise be as large as, and copy, for every message.
            let result = Box::pin(filtered(conn, envelope, &mut shadows))
                .instrument(span.clone())
                .await;
            conn.defer_message_log = false;
            // The client has its answer and the session goes on: the shadows' verdicts join
            // the message's log line and span from a task of their own, which waits for each
            // shadow at most until its own limit.
            if let Some(shadows) = shadows {
                if let Some((envelope, mut outcome)) = conn.deferred.take() {
                    let who = observe::Snapshot::of(conn);
                    tokio::spawn(
                        async move {
                            let live =
                                shadow::live_word(outcome.verdict, outcome.status.as_deref());
                            outcome.shadow = shadows.finish(live).await;
                            observe::message(&who, &envelope, outcome);
                        }
                        .instrument(span),
                    );
                }
            }
            result
        }
    }
}

/// What [`receive_body`] read.
struct Received {
    size: u64,
    nul_bytes: u64,
}

/// The body ended before its terminating dot: the client left or was too slow, or the
/// upstream the body streams to failed.
struct Interrupted {
    fatal: Fatal,
    /// The content bytes read until then.
    size: u64,
}

/// Where a body goes as it arrives: the spool file ([`ToContent`]) or the upstream
/// ([`Streamed`]).
trait BodySink {
    /// Whether KeepAlive NOOPs may go upstream while the body arrives: only while the
    /// upstream is not in DATA, where a NOOP would become part of the message.
    fn keepalives(&self) -> bool;

    /// Takes the next unstuffed content.
    async fn take(&mut self, conn: &mut Conn, content: &[u8], step: Step) -> Result<(), Fatal>;
}

/// Where the body stands after the content handed to [`BodySink::take`].
#[derive(Debug, Clone, Copy)]
struct Step {
    /// The terminating dot has been read.
    done: bool,
    /// Every client byte read so far is used: the next content needs another read.
    drained: bool,
    /// The message holds a NUL octet (it will be refused after its dot).
    nul: bool,
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
async fn receive_body(conn: &mut Conn, sink: &mut impl BodySink) -> Result<Received, Interrupted> {
    let mut receiver = DataReceiver::new();
    let mut deadline = data_deadline(conn);
    // Sized by what arrives: a small message allocates (and the allocator returns) little.
    let mut content = Vec::new();
    loop {
        let (done, drained) = feed_body(conn, &mut receiver, &mut content);
        let step = Step {
            done,
            drained,
            nul: receiver.nul_bytes() > 0,
        };
        let taken = sink.take(conn, &content, step).await;
        content.clear();
        let read = match taken {
            Ok(()) if done => {
                log_irregular(conn, &receiver);
                return Ok(Received {
                    size: receiver.content_bytes(),
                    nul_bytes: receiver.nul_bytes(),
                });
            }
            Ok(()) => read_body(conn, &mut deadline, sink.keepalives()).await,
            Err(fatal) => Err(fatal),
        };
        if let Err(fatal) = read {
            return Err(Interrupted {
                fatal,
                size: receiver.content_bytes(),
            });
        }
    }
}

/// Unstuffs what the client sent so far into `content`; whether the body is complete, and
/// whether every byte read was used.
fn feed_body(conn: &mut Conn, receiver: &mut DataReceiver, content: &mut Vec<u8>) -> (bool, bool) {
    let feed = receiver.feed(&conn.relay.client_buf, content);
    conn.relay.client_buf.advance(feed.consumed);
    (feed.done, conn.relay.client_buf.is_empty())
}

/// Reads more of the body before its deadline; with `keepalives`, NOOPs go upstream while
/// the client is quiet.
async fn read_body(
    conn: &mut Conn,
    deadline: &mut DataDeadline,
    keepalives: bool,
) -> Result<(), Fatal> {
    if client_closed(conn) {
        return Err(client_left(conn));
    }
    let due = tokio::time::Instant::from_std(deadline.due());
    let n = if keepalives {
        conn.read_client(due).await?
    } else {
        match tokio::time::timeout_at(due, read_more(conn)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0,
            Err(_) => return Err(Fatal::ClientTimeout),
        }
    };
    if n == 0 {
        return Err(client_left(conn));
    }
    deadline.received(Instant::now(), n);
    Ok(())
}

async fn read_more(conn: &mut Conn) -> std::io::Result<usize> {
    conn.relay.client_buf.reserve(READ_BUFFER);
    conn.client.read_buf(&mut conn.relay.client_buf).await
}

/// The client has closed its side (seen by an earlier read).
fn client_closed(conn: &Conn) -> bool {
    conn.relay.client_eof
}

fn set_client_closed(conn: &mut Conn) {
    conn.relay.client_closed();
}

/// Whether the client is read while the filter runs: while it is there and has not sent
/// more than [`WATCH_LIMIT`] bytes meanwhile.
fn watch_client(conn: &Conn) -> bool {
    !conn.relay.client_eof && conn.relay.client_buf.len() < WATCH_LIMIT
}

fn client_left(conn: &mut Conn) -> Fatal {
    set_client_closed(conn);
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
    finished(conn, envelope, outcome.clone());
    Ok(outcome)
}

/// A filtered message's body on its way to memory or a spool file; without a place (the
/// file could not be created) the body is only read.
struct ToContent(Receiving);

impl BodySink for ToContent {
    fn keepalives(&self) -> bool {
        // The upstream sees DATA only after the filter: it may get NOOPs meanwhile.
        true
    }

    async fn take(&mut self, _: &mut Conn, content: &[u8], _: Step) -> Result<(), Fatal> {
        self.0.write(content).await;
        Ok(())
    }
}

/// `shadows` gets the shadow filters started on the message, whose verdicts its log line
/// waits for (see [`run`]).
async fn filtered(
    conn: &mut Conn,
    envelope: &Envelope,
    shadows: &mut Option<shadow::Shadows>,
) -> Result<(), Fatal> {
    conn.send_client(REPLY_START_INPUT).await?;
    let settings = conn.settings.clone();
    let started = Instant::now();

    // Without a place for it the body is still read to its end before the client's answer.
    // A live filter command reads files: the message and a pipe filter's output are created
    // in one blocking call. Milters, hooks and shadows read the message wherever it is: in
    // memory when small (see [`content`]).
    let live_command = settings.filter_command.is_some() && !settings.filter_shadow;
    let pipe = live_command && settings.filter_type != FilterType::File;
    let (receiving, output) = if live_command {
        let created = Spool::create(&settings.temp_directory, if pipe { 2 } else { 1 })
            .await
            .and_then(|mut spools| {
                let output = if pipe { spools.pop() } else { None };
                let spool = spools
                    .pop()
                    .ok_or_else(|| std::io::Error::other("no spool file"))?;
                Ok((spool.writer()?, spool, output))
            });
        match created {
            Ok((writer, spool, output)) => (Receiving::into_file(spool, writer), output),
            Err(e) => (Receiving::failed(e), None),
        }
    } else {
        let limit = settings.spool_memory;
        (Receiving::new(limit, &settings.temp_directory), None)
    };
    let mut sink = ToContent(receiving);
    let received = receive_body(conn, &mut sink).await;
    let content = sink.0.finish().await;
    let Received { size, nul_bytes } = match received {
        Ok(r) => r,
        Err(Interrupted { fatal, .. }) => {
            // The client left mid-body: the upstream never saw DATA, so RSET is enough.
            let _ = conn.command(b"RSET\r\n", UpstreamStage::Command).await;
            finished(conn, envelope, MessageOutcome::local_error(0, started));
            return Err(fatal);
        }
    };
    if nul_bytes > 0 {
        refuse_nul(conn, envelope, size, started).await?;
        conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
        if let Ok(content) = content {
            let refused = Current {
                content,
                output,
                envelope: None,
                filter_time: None,
            };
            spool_removed(conn, refused.remove()).await;
        }
        return Ok(());
    }
    let content = match content {
        Ok(content) => content,
        Err(e) => {
            tracing::error!("{}: couldn't write cache file: {e}", conn.id);
            return local_error(conn, envelope, size, started, None).await;
        }
    };
    if shadow::configured(&settings) {
        let input = shadow_input(conn, envelope, size, &settings.temp_directory);
        let hooks = conn.hooks.clone();
        *shadows = Some(shadow::start(&settings, hooks.as_ref(), input, &content).await);
        conn.defer_message_log = true;
    }

    // The live chain, in FilterOrder: each filter gets the message (and envelope) as the
    // ones before it left it.
    let mut current = Current {
        content,
        output,
        envelope: None,
        filter_time: None,
    };
    let mut filtered_by_any = false;
    for kind in settings.filter_order.clone() {
        let step = match kind {
            FilterKind::Milters if conn.milters.is_some() => {
                network_stage(conn, kind, envelope, &mut current, size, started).await?
            }
            FilterKind::Hooks if conn.hooks.as_ref().is_some_and(|h| h.has_live()) => {
                network_stage(conn, kind, envelope, &mut current, size, started).await?
            }
            FilterKind::Command if settings.filter_command.is_some() && !settings.filter_shadow => {
                command_stage(conn, envelope, &mut current, size, started).await?
            }
            _ => continue,
        };
        filtered_by_any = true;
        if let Stage::Answered = step {
            spool_removed(conn, current.remove()).await;
            return Ok(());
        }
    }
    let envelope = current.envelope.as_ref().unwrap_or(envelope);
    if !filtered_by_any && !conn.defer_message_log {
        tracing::warn!(
            "{}: no filter command specified. passing message through",
            conn.id
        );
    }
    let source = current.content.source();
    let outcome = deliver_recorded(conn, envelope, source, size, started).await?;
    let outcome = match current.filter_time {
        Some(time) => outcome.with_filter(time),
        None if filtered_by_any => outcome,
        None => outcome.unfiltered(),
    };
    finished(conn, envelope, outcome);
    spool_removed(conn, current.remove()).await;
    Ok(())
}

/// Waits for a message's spool files to be removed, as the original removed them before it
/// read the next command, but at most TimeOut: a stalled TempDirectory then holds up this
/// session for that long, not for good, and the removal goes on on the blocking pool.
async fn spool_removed(conn: &Conn, removal: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(conn.settings.timeout, removal)
        .await
        .is_err()
    {
        tracing::warn!(
            "{}: removing the message's spool files is taking longer than TimeOut",
            conn.id
        );
    }
}

/// The message as the live filters leave it, stage by stage.
struct Current {
    /// The message as it stands.
    content: Content,
    /// A pipe filter's output file, created with the spool file.
    output: Option<Spool>,
    /// The envelope when a filter changed it.
    envelope: Option<Envelope>,
    /// How long the filter command took.
    filter_time: Option<Duration>,
}

impl Current {
    /// Ends the message: its spool files are gone when this returns.
    async fn remove(self) {
        self.content.remove().await;
        if let Some(output) = self.output {
            output.remove().await;
        }
    }
}

/// Where the message stands after a stage of the live chain.
enum Stage {
    /// The client has its answer; the upstream was reset.
    Answered,
    /// On to the next stage.
    Go,
}

/// The filter command's stage: runs it on the message as it stands, then delivers nothing
/// and answers the client (reject, defer, drop, failure) or goes on with its result.
async fn command_stage(
    conn: &mut Conn,
    original: &Envelope,
    current: &mut Current,
    size: u64,
    started: Instant,
) -> Result<Stage, Fatal> {
    let settings = conn.settings.clone();
    let Some(command) = settings.filter_command.clone() else {
        return Ok(Stage::Go);
    };
    let envelope = current.envelope.clone();
    let envelope = envelope.as_ref().unwrap_or(original);
    let mode = match current.output {
        Some(_) => Mode::Pipe,
        None => Mode::File,
    };
    // Every message is spooled when a command is configured; one that a milter or hook
    // before it changed may be in memory.
    let spool = match current.content.spooled(&settings.temp_directory).await {
        Ok(spool) => spool,
        Err(e) => {
            tracing::error!("{}: couldn't write cache file: {e}", conn.id);
            local_error(conn, envelope, size, started, None).await?;
            return Ok(Stage::Answered);
        }
    };
    let mut env = filter_environment(conn, envelope, &settings.temp_directory);
    if mode == Mode::File {
        env.push(("EMAIL".into(), spool.path().display().to_string()));
    }
    let stdout = current.output.as_ref().map(Spool::output).transpose();
    let stdout = match stdout {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("{}: couldn't open cache file: {e}", conn.id);
            local_error(conn, envelope, size, started, None).await?;
            return Ok(Stage::Answered);
        }
    };
    let stdin = match mode {
        Mode::Pipe => spool.take_reader(),
        Mode::File => None,
    };
    let job = FilterJob {
        command: &command,
        mode,
        timeout: settings.filter_timeout,
        input: spool.path(),
        stdin,
        output: stdout,
        env,
    };
    // Dropping the run (the client left) ends the filter's process group.
    let result = while_client_waits(conn, filter_run::execute(job)).await?;
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
            current.filter_time = Some(filter_time);
            // A pipe filter's output is the message from now on; the next stage that
            // pipes gets a new output file.
            if let Some(out) = current.output.take() {
                let input = std::mem::replace(&mut current.content, Content::File(out));
                spool_removed(conn, input.remove()).await;
            }
            Ok(Stage::Go)
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
            finished(
                conn,
                envelope,
                MessageOutcome::new(verdict, status, size, started).with_filter(filter_time),
            );
            conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
            Ok(Stage::Answered)
        }
        Verdict::LocalError { reason } => {
            tracing::error!("{}: {reason}", conn.id);
            local_error(conn, envelope, size, started, Some(filter_time)).await?;
            Ok(Stage::Answered)
        }
    }
}

/// What the shadow filters are told of the message.
fn shadow_input(conn: &Conn, envelope: &Envelope, size: u64, tmpdir: &Path) -> shadow::Input {
    let (from, to) = conn.hook_envelope(envelope);
    shadow::Input {
        client: conn.milter_client(),
        context: conn.hook_context(HookStage::Data),
        from,
        to,
        mail_line: conn.lines.mail.clone().unwrap_or_default(),
        rcpt_lines: envelope
            .recipients
            .iter()
            .map(|r| {
                conn.lines
                    .rcpt(r)
                    .map_or_else(|| format!("RCPT TO:<{r}>\r\n").into_bytes(), <[u8]>::to_vec)
            })
            .collect(),
        envelope: envelope.clone(),
        queue_id: conn.queue_id(),
        size,
        command_env: filter_environment(conn, envelope, tmpdir),
    }
}

/// Records a message's outcome: logged at once, or, while shadow filters run on it, when
/// they are done (see [`run`]).
fn finished(conn: &mut Conn, envelope: &Envelope, outcome: MessageOutcome) {
    if conn.defer_message_log {
        conn.deferred = Some((envelope.clone(), outcome));
    } else {
        observe::message(conn, envelope, outcome);
    }
}

/// Runs `work` (the filter, the milters) while the client waits for its answer. KeepAlives
/// continue meanwhile: the upstream has not seen DATA yet, so a NOOP is safe and keeps a
/// slow filter from costing the upstream connection. The client is watched: if it leaves,
/// it gets no answer and will send the message again, so delivering it would make a
/// duplicate; then `work` is dropped and `None` returned.
async fn while_client_waits<F: std::future::Future>(
    conn: &mut Conn,
    work: F,
) -> Result<Option<F::Output>, Fatal> {
    tokio::pin!(work);
    loop {
        let wake = conn.next_keepalive();
        let watch = watch_client(conn);
        tokio::select! {
            outcome = &mut work => return Ok(Some(outcome)),
            _ = sleep_until_opt(wake) => conn.keepalive_if_due().await?,
            read = read_more(conn), if watch => {
                if matches!(read, Ok(0) | Err(_)) {
                    set_client_closed(conn);
                    return Ok(None);
                }
            }
        }
    }
}

/// The message through the session's milters or its live hooks (`kind`), then what they
/// decided: an answer to the client, a quarantine, or a changed envelope sent upstream
/// again.
async fn network_stage(
    conn: &mut Conn,
    kind: FilterKind,
    original: &Envelope,
    current: &mut Current,
    size: u64,
    started: Instant,
) -> Result<Stage, Fatal> {
    let queue_id = conn.queue_id();
    let dir = conn.settings.temp_directory.clone();
    let envelope = current.envelope.clone();
    let envelope = envelope.as_ref().unwrap_or(original);
    let mut changes = milters::Changes::new(envelope, conn.settings.spool_memory);
    let source = current.content.source();
    let what = match kind {
        FilterKind::Milters => "milters",
        _ => "hooks",
    };
    let result = match kind {
        FilterKind::Milters => {
            let Some(mut chain) = conn.milters.take() else {
                return Ok(Stage::Go);
            };
            let work = milters::run(&mut chain, source, &dir, &queue_id, &mut changes);
            let result = while_client_waits(conn, work).await;
            conn.milters = Some(chain);
            result
        }
        _ => {
            let Some(hooks) = conn.hooks.clone() else {
                return Ok(Stage::Go);
            };
            if let Some(name) = conn.lines.discarded_by.clone() {
                let decided = milters::Decided::discarded("hook", &name, &queue_id);
                return answer(conn, envelope, decided, size, started).await;
            }
            if let Some(quarantined) = conn.lines.quarantined_by.clone() {
                changes.quarantine = Some(quarantined);
            }
            let (from, to) = conn.hook_envelope(envelope);
            let context = conn.hook_context(HookStage::Data);
            let work = async {
                for hook in hooks.live_at(HookStage::Data) {
                    let now = changes.current(source).to_owned();
                    let request = hooks::Request {
                        context: context.clone(),
                        from: changed_sender(&from, &changes.envelope),
                        to: changed_recipients(&to, &changes.envelope),
                        source: now.source(),
                        size: now.source().size(size).await,
                    };
                    if let Some(decided) =
                        hooks::ask_data(hook, request, &dir, &queue_id, &mut changes).await?
                    {
                        return Ok(Some(decided));
                    }
                }
                Ok(None)
            };
            while_client_waits(conn, work).await
        }
    };
    let Some(result) = result? else {
        tracing::warn!(
            "{}: client disconnected while the {what} ran; message not delivered",
            conn.id
        );
        return Err(abandon(conn, envelope, size, false).await);
    };
    match result {
        Ok(None) => {}
        Ok(Some(decided)) => return answer(conn, envelope, decided, size, started).await,
        Err(e) => {
            tracing::error!("{}: couldn't pass the message to the {what}: {e}", conn.id);
            local_error(conn, envelope, size, started, None).await?;
            return Ok(Stage::Answered);
        }
    }
    if !changes.changed_by.is_empty() {
        tracing::info!(
            "{}: message changed by {}",
            conn.id,
            changes.changed_by.join(", ")
        );
    }
    if let Some((by, reason)) = &changes.quarantine {
        let content = changes.content.as_ref().unwrap_or(&current.content);
        quarantine(
            conn, envelope, content, by, reason, &queue_id, size, started,
        )
        .await?;
        return Ok(Stage::Answered);
    }
    if changes.envelope.changed {
        match redo_envelope(conn, envelope, &changes.envelope).await? {
            Ok(new) => current.envelope = Some(new),
            Err(reply) => {
                send_final_reply(conn, &reply).await;
                let by = changes.changed_by.last().cloned().unwrap_or_default();
                let outcome = MessageOutcome::from_reply(&reply, size, started).by(by);
                finished(conn, envelope, outcome);
                conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
                return Ok(Stage::Answered);
            }
        }
    }
    if let Some(content) = changes.content {
        // A pipe filter later reads the new content through a descriptor of its own.
        let replaced = std::mem::replace(&mut current.content, content);
        spool_removed(conn, replaced.remove()).await;
    }
    Ok(Stage::Go)
}

/// A filter decided the message: the client gets its reply, the upstream RSET (or the
/// session ends when the filter asked for that).
async fn answer(
    conn: &mut Conn,
    envelope: &Envelope,
    decided: milters::Decided,
    size: u64,
    started: Instant,
) -> Result<Stage, Fatal> {
    conn.send_client(&decided.reply).await?;
    let outcome =
        MessageOutcome::new(decided.verdict, decided.status, size, started).by(decided.by);
    finished(conn, envelope, outcome);
    if decided.disconnect {
        tracing::info!("{}: closing the session as a hook asked", conn.id);
        return Err(Fatal::Done);
    }
    conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
    Ok(Stage::Answered)
}

/// The sender a hook is told of: the one a filter before it set, else the client's.
fn changed_sender(
    from: &crate::protocol::hook::request::Address,
    edit: &crate::protocol::milter::message::EnvelopeEdit,
) -> crate::protocol::hook::request::Address {
    use crate::protocol::hook::request::Address;
    match &edit.sender {
        None => from.clone(),
        Some((sender, params)) => {
            let line = format!("MAIL FROM:<{sender}> {}", params.as_deref().unwrap_or(""));
            Address::from_line(sender, line.as_bytes())
        }
    }
}

/// The recipients a hook is told of, as the filters before it left them, each with the
/// parameters its client line (or the filter that added it) gave.
fn changed_recipients(
    to: &[crate::protocol::hook::request::Address],
    edit: &crate::protocol::milter::message::EnvelopeEdit,
) -> Vec<crate::protocol::hook::request::Address> {
    use crate::protocol::hook::request::Address;
    edit.recipients
        .iter()
        .map(|r| {
            to.iter()
                .find(|a| a.address.eq_ignore_ascii_case(&r.address))
                .cloned()
                .unwrap_or_else(|| {
                    let line = format!(
                        "RCPT TO:<{}> {}",
                        r.address,
                        r.params.as_deref().unwrap_or("")
                    );
                    Address::from_line(&r.address, line.as_bytes())
                })
        })
        .collect()
}

/// A milter changed the envelope: the upstream transaction is begun again (`RSET`,
/// `MAIL`, one `RCPT` per recipient) with the client's own lines where they still apply.
/// The new envelope, or the upstream's refusal when it took no sender or no recipient
/// (then the client gets that refusal). A recipient refused is logged and counted. One of
/// the client's own recipients refused now (it was accepted at its RCPT, so the client
/// counts it as delivered with the 250) defers the whole message: a 250 would lose that
/// recipient's copy without a word.
async fn redo_envelope(
    conn: &mut Conn,
    envelope: &Envelope,
    edit: &crate::protocol::milter::message::EnvelopeEdit,
) -> Result<Result<Envelope, crate::protocol::reply::Reply>, Fatal> {
    use crate::protocol::milter::message::{is_safe_address, is_safe_params};
    let reply = conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
    if reply.code / 100 != 2 {
        return Ok(Err(reply));
    }
    let mut new = envelope.clone();
    let mail_line = conn.lines.mail.clone();
    let mail = match (&edit.sender, mail_line.as_deref()) {
        (Some((sender, params)), _) => {
            let params = params.as_deref().filter(|p| is_safe_params(p));
            if !is_safe_address(sender) {
                tracing::warn!(
                    "{}: milter sender change refused: unsafe address {}",
                    conn.id,
                    observe::printable(sender)
                );
            }
            let sender = if is_safe_address(sender) {
                sender.clone()
            } else {
                envelope.sender.clone().unwrap_or_default()
            };
            new.sender = Some(if sender.is_empty() {
                "<>".to_string()
            } else {
                sender.clone()
            });
            let mut line = format!("MAIL FROM:<{sender}>");
            if let Some(p) = params {
                line.push(' ');
                line.push_str(p);
            }
            line.push_str("\r\n");
            line.into_bytes()
        }
        (None, Some(line)) => line.to_vec(),
        (None, None) => format!(
            "MAIL FROM:<{}>\r\n",
            envelope
                .sender
                .as_deref()
                .unwrap_or("")
                .trim_matches(['<', '>'])
        )
        .into_bytes(),
    };
    let reply = conn.command(&mail, UpstreamStage::Command).await?;
    if reply.code / 100 != 2 {
        tracing::warn!(
            "{}: upstream refused the sender a milter set: {}",
            conn.id,
            observe::printable(&String::from_utf8_lossy(&reply.raw()).replace("\r\n", " "))
        );
        crate::ops::metrics::global().milter_envelope_refusal("mail");
        return Ok(Err(reply));
    }
    new.recipients.clear();
    let mut last_refusal = None;
    let mut client_recipient_refused = false;
    for r in &edit.recipients {
        if r.address.is_empty() || !is_safe_address(&r.address) {
            tracing::warn!(
                "{}: milter recipient refused: unsafe address {}",
                conn.id,
                observe::printable(&r.address)
            );
            continue;
        }
        let client_line = conn.lines.rcpt(&r.address).map(<[u8]>::to_vec);
        let line = match (client_line, &r.params) {
            (Some(line), None) => line,
            (_, params) => {
                let mut line = format!("RCPT TO:<{}>", r.address);
                if let Some(p) = params.as_deref().filter(|p| is_safe_params(p)) {
                    line.push(' ');
                    line.push_str(p);
                }
                line.push_str("\r\n");
                line.into_bytes()
            }
        };
        let reply = conn.command(&line, UpstreamStage::Command).await?;
        if reply.code / 100 == 2 {
            new.recipients.push(r.address.clone());
        } else {
            let client_had_it = envelope
                .recipients
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&r.address));
            client_recipient_refused |= client_had_it;
            tracing::warn!(
                "{}: upstream refused recipient {} {}: {}",
                conn.id,
                observe::printable(&r.address),
                if client_had_it {
                    "on the new transaction after a filter's changes (the message is deferred)"
                } else {
                    "added by a filter"
                },
                observe::printable(&String::from_utf8_lossy(&reply.raw()).replace("\r\n", " "))
            );
            crate::ops::metrics::global().milter_envelope_refusal("rcpt");
            last_refusal = Some(reply);
        }
    }
    if client_recipient_refused {
        return Ok(Err(crate::protocol::reply::Reply::local(
            451,
            "4.3.0 A recipient was refused after the message was changed; try again later",
        )));
    }
    match (new.recipients.is_empty(), last_refusal) {
        (true, Some(reply)) => Ok(Err(reply)),
        (true, None) => Ok(Err(crate::protocol::reply::Reply::local(
            554,
            "5.5.1 No valid recipients left",
        ))),
        _ => Ok(Ok(new)),
    }
}

/// A milter or hook quarantined the message: hold it (MilterQuarantineDirectory, 250), or reject
/// or defer it, as MilterQuarantine says.
#[allow(clippy::too_many_arguments)]
async fn quarantine(
    conn: &mut Conn,
    envelope: &Envelope,
    content: &Content,
    by: &str,
    reason: &str,
    queue_id: &str,
    size: u64,
    started: Instant,
) -> Result<(), Fatal> {
    use crate::config::milter::MilterQuarantine;
    let disposition = conn.settings.milter_quarantine;
    tracing::warn!(
        "{}: {by} quarantined the message ({}): {}",
        conn.id,
        disposition.label(),
        observe::printable(reason)
    );
    let status = format!("QUARANTINED by {by}: {reason}");
    let (reply, verdict): (Vec<u8>, MessageVerdict) = match disposition {
        MilterQuarantine::Hold => {
            let record = serde_json::json!({
                "queue_id": queue_id,
                "sender": envelope.sender,
                "recipients": envelope.recipients,
                "client": conn.info.peer.map(|p| p.ip().to_string()),
                "milter": by.strip_prefix("milter "),
                "hook": by.strip_prefix("hook "),
                "reason": reason,
                "received": jiff::Timestamp::now().to_string(),
            });
            let dir = conn.settings.milter_quarantine_directory.clone();
            let name = format!("{}-{queue_id}", jiff::Timestamp::now().as_second());
            match content.source().hold(&dir, &name, record.to_string()).await {
                Ok(()) => (milters::discarded_reply(queue_id), MessageVerdict::Dropped),
                Err(e) => {
                    tracing::error!(
                        "{}: couldn't hold the message in {}: {e}",
                        conn.id,
                        dir.display()
                    );
                    (REPLY_LOCAL_ERROR.to_vec(), MessageVerdict::LocalError)
                }
            }
        }
        MilterQuarantine::Reject => (
            b"554 5.7.1 Message quarantined\r\n".to_vec(),
            MessageVerdict::Rejected,
        ),
        MilterQuarantine::Tempfail => (
            b"451 4.7.1 Message quarantined, try again later\r\n".to_vec(),
            MessageVerdict::TempFailed,
        ),
    };
    if let Some(milter) = by.strip_prefix("milter ") {
        crate::ops::metrics::global().milter_quarantined(milter, disposition.label());
    }
    conn.send_client(&reply).await?;
    let outcome = MessageOutcome::new(verdict, status, size, started).by(by.into());
    finished(conn, envelope, outcome);
    conn.command(b"RSET\r\n", UpstreamStage::Command).await?;
    Ok(())
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
    finished(conn, envelope, outcome);
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
    if conn.send_client(&reply.bytes()).await.is_err() {
        set_client_closed(conn);
    }
}

/// [`deliver`], and when the upstream fails on the way (the client then gets a 4xx),
/// the message is still counted as temporarily failed before the connection ends.
async fn deliver_recorded(
    conn: &mut Conn,
    envelope: &Envelope,
    source: Source<'_>,
    size: u64,
    started: Instant,
) -> Result<MessageOutcome, Fatal> {
    match deliver(conn, envelope, source, size, started).await {
        Ok(outcome) => Ok(outcome),
        // Counted as abandoned already.
        Err(Fatal::ClientGone) => Err(Fatal::ClientGone),
        Err(fatal) => {
            let outcome =
                MessageOutcome::new(MessageVerdict::TempFailed, "FILTERED".into(), size, started);
            finished(conn, envelope, outcome);
            Err(fatal)
        }
    }
}

/// Sends the message upstream: DATA, the encoded content, the final reply relayed to the
/// client.
async fn deliver(
    conn: &mut Conn,
    envelope: &Envelope,
    source: Source<'_>,
    size: u64,
    started: Instant,
) -> Result<MessageOutcome, Fatal> {
    // Opened before DATA: once the upstream said 354 there is no clean way back.
    let mut file = match Reader::open(source).await {
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
    let mut out = Vec::new();
    loop {
        let chunk = match file.next().await {
            Ok(chunk) => chunk,
            Err(e) => {
                // Part of the message is upstream without its terminator: only closing
                // the connection keeps it from being delivered half.
                tracing::error!("{}: couldn't read cache file: {e}", conn.id);
                let _ = conn.send_client(REPLY_LOCAL_ERROR).await;
                return Err(Fatal::Upstream("delivery aborted".into()));
            }
        };
        if chunk.is_empty() {
            break;
        }
        encoder.encode(chunk, &mut out);
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

/// An unfiltered body, re-encoded and streamed upstream as it arrives.
struct Streamed {
    encoder: WireEncoder,
    /// Encoded bytes not sent yet.
    out: Vec<u8>,
    upstream: UpstreamData,
    /// The upstream took DATA before the body (`Skip: authenticated`) and a failed write
    /// ends the session at once; otherwise a failure is kept in `upstream` and answered
    /// after the client's dot.
    fail_fast: bool,
}

impl Streamed {
    fn new(encoder: WireEncoder, upstream: UpstreamData, fail_fast: bool) -> Streamed {
        Streamed {
            encoder,
            // Sized by what arrives: a small message allocates little.
            out: Vec::new(),
            upstream,
            fail_fast,
        }
    }
}

impl BodySink for Streamed {
    fn keepalives(&self) -> bool {
        // Once the upstream is in DATA a NOOP would become part of the message.
        false
    }

    async fn take(&mut self, conn: &mut Conn, content: &[u8], step: Step) -> Result<(), Fatal> {
        self.encoder.encode(content, &mut self.out);
        // The last part goes with the terminating dot (see `finish_data`).
        if step.done || (self.out.len() < WRITE_CHUNK && !step.drained) {
            return Ok(());
        }
        // After a NUL the message will be refused: nothing more goes upstream.
        if !step.nul {
            if self.fail_fast {
                conn.send_upstream(&self.out, UpstreamStage::Data).await?;
            } else {
                forward(conn, &mut self.upstream, &self.out).await;
            }
        }
        self.out.clear();
        Ok(())
    }
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
    let upstream = match conn.send_command(b"DATA\r\n", UpstreamStage::Data).await {
        Ok(()) => UpstreamData::Pending,
        Err(e) => UpstreamData::Failed(e),
    };
    // Logged once both sides are under way, not between them.
    tracing::warn!(
        "{}: no filter command specified. passing message through",
        conn.id
    );
    let mut sink = Streamed::new(WireEncoder::new(header_placement(conn)), upstream, false);
    let received = receive_body(conn, &mut sink).await;
    let Streamed {
        encoder,
        mut out,
        mut upstream,
        ..
    } = sink;
    let Received { size, nul_bytes } = match received {
        Ok(r) => r,
        Err(Interrupted { fatal, size }) => {
            let outcome = MessageOutcome::local_error(size, started);
            finished(conn, envelope, outcome.unfiltered());
            return Err(fatal);
        }
    };
    if nul_bytes > 0 {
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
            finished(conn, envelope, outcome.unfiltered());
            Ok(())
        }
        // Counted as abandoned already.
        Err(Fatal::ClientGone) => Err(Fatal::ClientGone),
        Err(fatal) => {
            let outcome =
                MessageOutcome::new(MessageVerdict::TempFailed, "FILTERED".into(), size, started);
            finished(conn, envelope, outcome.unfiltered());
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

/// `Skip: authenticated`: the body goes straight upstream, re-encoded so that nothing but
/// the client's own terminator can end it.
async fn passthrough(conn: &mut Conn, envelope: &Envelope) -> Result<(), Fatal> {
    let started = Instant::now();
    let reply = conn.command(b"DATA\r\n", UpstreamStage::Data).await?;
    conn.send_client(&reply.bytes()).await?;
    if reply.code != 354 {
        tracing::debug!("{}: server refused data transfer", conn.id);
        return Ok(());
    }
    let encoder = WireEncoder::new(HeaderPlacement::None);
    let mut sink = Streamed::new(encoder, UpstreamData::Open, true);
    let received = receive_body(conn, &mut sink).await;
    let Received { size, nul_bytes } = received.map_err(|i| i.fatal)?;
    if nul_bytes > 0 {
        refuse_nul(conn, envelope, size, started).await?;
        return Err(Fatal::Upstream(
            "message with NUL octets: upstream connection closed in DATA".into(),
        ));
    }
    let Streamed {
        encoder, mut out, ..
    } = sink;
    encoder.finish(&mut out);
    let outcome = finish_data(conn, envelope, &out, size, started).await?;
    finished(conn, envelope, outcome.skipped());
    Ok(())
}
