//! A spooled message through the HTTP hooks asked at the data stage, in order, each seeing
//! the message (and envelope) as the filters before it left them; then the hook's verdict
//! and modifications, applied by the same code as a milter's.
//!
//! The request's JSON is written around the message contents: a message that fits in
//! [`ONE_BUFFER`] goes in one buffer with its length; a larger one is streamed from its
//! spool file chunk by chunk (chunked transfer encoding), so it is never held in memory.

use std::path::Path;

use bytes::Bytes;

use super::content::{Reader, Source, MEMORY_MESSAGE_LIMIT};
use super::milters::{self, Changes, Decided};
use crate::config::hook::HookStage;
use crate::config::milter::MilterAction;
use crate::ops::metrics::MessageVerdict;
use crate::protocol::hook::answer::{Action, Answer};
use crate::protocol::hook::json_text::JsonText;
use crate::protocol::hook::request::{self, Address, Context, Envelope, MessageInfo};
use crate::protocol::milter::message::{parse_header_section, Field, HEADER_SECTION_LIMIT};
use crate::proxy::hook::{Hook, HookError};
use crate::proxy::milter::REPLY_TEMPFAIL;

/// Messages up to this size are sent in one buffer, with a Content-Length: every message
/// kept in memory is.
const ONE_BUFFER: u64 = MEMORY_MESSAGE_LIMIT as u64;

/// The default replies when a hook's failure (or oversize action) decides.
const REPLY_REJECT: &[u8] = b"550 5.7.1 Message rejected\r\n";

/// What a data-stage request needs besides the message.
pub(crate) struct Request<'a> {
    pub(crate) context: Context,
    pub(crate) from: Address,
    pub(crate) to: Vec<Address>,
    pub(crate) source: Source<'a>,
    pub(crate) size: u64,
}

/// The message in `request.source` read for a request: its header fields, where its body
/// starts, and the request body (in memory or streamed).
pub(crate) struct Prepared {
    pub(crate) fields: Vec<Field>,
    pub(crate) section_length: usize,
    pub(crate) body: reqwest::Body,
}

/// Reads the header section (and, for a small message, everything) and builds the body.
pub(crate) async fn prepare(request: &Request<'_>) -> std::io::Result<Prepared> {
    let mut reader = Reader::open(request.source).await?;
    let mut read = Vec::new();
    // A message in memory is read where it is; the request body is its JSON text, a buffer
    // of its own.
    let memory = match request.source {
        Source::Memory(held) => Some(held.as_ref()),
        Source::File(_) => None,
    };
    let mut complete = memory.is_some();
    // A small file is read whole (it goes in one buffer); a large one up to the end of its
    // header section, the rest streamed.
    let whole = request.size <= ONE_BUFFER;
    while !complete {
        let section_read = read.starts_with(b"\r\n")
            || memchr::memmem::find(&read, b"\r\n\r\n").is_some()
            || read.len() >= HEADER_SECTION_LIMIT;
        if section_read && !whole {
            break;
        }
        let chunk = reader.next().await?;
        if chunk.is_empty() {
            complete = true;
            break;
        }
        read.extend_from_slice(chunk);
    }
    let head: &[u8] = memory.unwrap_or(&read);
    let section = parse_header_section(head, complete);
    let envelope = Envelope {
        from: request.from.clone(),
        to: request.to.clone(),
    };
    let rendered = request::render(
        &request.context,
        &envelope,
        Some(MessageInfo {
            fields: &section.fields,
            size: request.size,
        }),
    );
    let mut text = JsonText::new();
    let mut first = rendered.before;
    let contents = &head[section.length.min(head.len())..];
    // Room for the contents as JSON (most bytes stay one byte) and the rest, at once.
    first.reserve(contents.len() + contents.len() / 8 + rendered.after.len());
    text.push(contents, &mut first);
    let body = if complete {
        text.finish(&mut first);
        first.extend_from_slice(&rendered.after);
        reqwest::Body::from(first)
    } else {
        let after = rendered.after;
        let state = Some((reader, text, after));
        let rest = futures_util::stream::unfold(state, |state| async move {
            let (mut reader, mut text, after) = state?;
            let mut out = Vec::new();
            match reader.next().await {
                Ok([]) => {
                    text.finish(&mut out);
                    out.extend_from_slice(&after);
                    Some((Ok(Bytes::from(out)), None))
                }
                Ok(chunk) => {
                    text.push(chunk, &mut out);
                    Some((Ok(Bytes::from(out)), Some((reader, text, after))))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        let start = futures_util::stream::once(async move { Ok(Bytes::from(first)) });
        reqwest::Body::wrap_stream(futures_util::StreamExt::chain(start, rest))
    };
    Ok(Prepared {
        fields: section.fields,
        section_length: section.length,
        body,
    })
}

/// What a failed (or oversize) hook's action makes of the message: `None` goes on as if
/// the hook were not there.
fn failure_decision(
    hook: &str,
    action: MilterAction,
    why: &str,
    changes: &mut Changes,
) -> Option<Decided> {
    let decided = |reply: &[u8], verdict| Decided {
        reply: reply.to_vec(),
        verdict,
        by: format!("hook {hook}"),
        status: format!("HOOK {hook}: {why}"),
        disconnect: false,
    };
    match action {
        MilterAction::Accept => None,
        MilterAction::Reject => Some(decided(REPLY_REJECT, MessageVerdict::Rejected)),
        MilterAction::Tempfail => Some(decided(REPLY_TEMPFAIL, MessageVerdict::TempFailed)),
        MilterAction::Quarantine => {
            changes
                .quarantine
                .get_or_insert((format!("hook {hook}"), format!("hook failed: {why}")));
            None
        }
    }
}

/// The decision a hook's answer makes (modifications applied to `changes` when it goes on).
async fn follow(
    hook: &Hook,
    answer: Answer,
    prepared: &mut Prepared,
    source: Source<'_>,
    dir: &Path,
    queue_id: &str,
    changes: &mut Changes,
) -> std::io::Result<Option<Decided>> {
    let name = hook.name();
    let by = format!("hook {name}");
    match answer.action {
        Action::Reject => {
            let reply = answer.reply.unwrap_or_else(|| REPLY_REJECT.to_vec());
            let verdict = if reply.first() == Some(&b'4') {
                MessageVerdict::TempFailed
            } else {
                MessageVerdict::Rejected
            };
            let status = format!(
                "HOOK {name}: {}",
                String::from_utf8_lossy(&reply).trim_end()
            );
            Ok(Some(Decided {
                reply,
                verdict,
                by,
                status,
                disconnect: answer.disconnect,
            }))
        }
        Action::Discard => Ok(Some(Decided {
            disconnect: answer.disconnect,
            ..Decided::discarded("hook", name, queue_id)
        })),
        Action::Accept | Action::Quarantine => {
            if answer.action == Action::Quarantine {
                changes
                    .quarantine
                    .get_or_insert((by.clone(), answer.reason.clone()));
            }
            milters::apply(
                changes,
                &by,
                answer.modifications,
                &mut prepared.fields,
                false,
                (source, prepared.section_length),
                dir,
            )
            .await?;
            Ok(None)
        }
    }
}

/// Asks one hook about the message at the data stage and follows its answer.
pub(crate) async fn ask_data(
    hook: &Hook,
    request: Request<'_>,
    dir: &Path,
    queue_id: &str,
    changes: &mut Changes,
) -> std::io::Result<Option<Decided>> {
    let name = hook.name().to_string();
    if request.size > hook.config.max_size {
        // Policy, not a failure of the hook: counted as skipped, never as an error.
        crate::ops::metrics::global().hook_skipped(&name, HookStage::Data.label());
        tracing::info!(
            "hook {name}: message of {} bytes over its max_size ({}): {}",
            request.size,
            hook.config.max_size,
            action_word(hook.config.oversize_action)
        );
        return Ok(failure_decision(
            &name,
            hook.config.oversize_action,
            "message over max_size",
            changes,
        ));
    }
    let source = request.source;
    let mut prepared = prepare(&request).await?;
    let body = std::mem::replace(&mut prepared.body, reqwest::Body::from(Vec::new()));
    match hook.ask(HookStage::Data, body).await {
        Ok(answer) => follow(hook, answer, &mut prepared, source, dir, queue_id, changes).await,
        Err(e) => Ok(failure_decision(
            &name,
            hook.config.default_action,
            &failure_text(&e),
            changes,
        )),
    }
}

fn failure_text(e: &HookError) -> String {
    format!("hook failed ({e})")
}

fn action_word(action: MilterAction) -> &'static str {
    match action {
        MilterAction::Accept => "not asked",
        MilterAction::Reject => "rejected",
        MilterAction::Tempfail => "temporarily refused",
        MilterAction::Quarantine => "quarantined",
    }
}
