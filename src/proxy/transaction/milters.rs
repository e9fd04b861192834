//! A spooled message through the session's milters, in order, each seeing the message as
//! the previous one left it: `DATA`, each header field, end of headers, the body in chunks
//! of at most 65535 bytes (until a milter says skip), end of message; then the milter's
//! modifications are applied before the next one is asked.
//!
//! A spooled message is read from its file chunk by chunk, so a slow milter holds the
//! message, not memory: only the header section (at most [`HEADER_SECTION_LIMIT`] bytes)
//! and a milter's replacement body (bounded by the client's modification limit) are held.
//! When a milter changed headers or body, the result is kept as a new message (in memory
//! when small, see [`super::content`]), which the next milter, the filter command and the
//! delivery read.

use std::path::Path;

use super::content::{Content, Reader, Receiving, Source};
use crate::config::milter::MilterAction;
use crate::ops::metrics::MessageVerdict;
use crate::protocol::milter::codec::Command;
use crate::protocol::milter::message::{
    apply_header, parse_header_section, render_header_section, EnvelopeEdit, Field,
    HEADER_SECTION_LIMIT,
};
use crate::protocol::milter::reply::Modification;
use crate::protocol::milter::session::Verdict;
use crate::protocol::milter::MAX_BODY_CHUNK;
use crate::protocol::session::Envelope;
use crate::proxy::milter::{MilterChain, MilterClient, Outcome, REPLY_REJECT, REPLY_TEMPFAIL};

/// A filter decided the message: the client gets `reply` and nothing is delivered
/// (reject, tempfail, a filter's own reply, or discard with its 250).
pub(crate) struct Decided {
    pub(crate) reply: Vec<u8>,
    pub(crate) verdict: MessageVerdict,
    /// The filter that decided: `milter NAME` or `hook NAME`.
    pub(crate) by: String,
    /// The `status=` item of the message's log line.
    pub(crate) status: String,
    /// Close the session after the reply (a hook's `disconnect`).
    pub(crate) disconnect: bool,
}

impl Decided {
    /// A message the filter `kind` (`milter`, `hook`) called `name` discarded: the client
    /// gets the 250 of a delivered message ([`discarded_reply`]), nothing is delivered.
    pub(crate) fn discarded(kind: &str, name: &str, queue_id: &str) -> Decided {
        Decided {
            reply: discarded_reply(queue_id),
            verdict: MessageVerdict::Dropped,
            by: format!("{kind} {name}"),
            status: format!("{} {name}: DISCARDED", kind.to_ascii_uppercase()),
            disconnect: false,
        }
    }
}

/// The changes the network filters (milters, hooks) asked for so far.
pub(crate) struct Changes {
    /// The message as the filters left it, when any changed headers or body.
    pub(crate) content: Option<Content>,
    /// How much of SpoolMemory a changed message may take.
    memory_limit: u64,
    /// The envelope as they left it (`changed` tells whether any did).
    pub(crate) envelope: EnvelopeEdit,
    /// The filter (`milter NAME`, `hook NAME`) that quarantined the message, and why.
    pub(crate) quarantine: Option<(String, String)>,
    /// The filters that changed the message or its envelope, in order.
    pub(crate) changed_by: Vec<String>,
}

impl Changes {
    /// `memory_limit`: SpoolMemory, or 0 to keep changed messages in files.
    pub(crate) fn new(envelope: &Envelope, memory_limit: u64) -> Changes {
        Changes {
            content: None,
            memory_limit,
            envelope: EnvelopeEdit::new(&envelope.recipients),
            quarantine: None,
            changed_by: Vec::new(),
        }
    }

    /// The message as it stands: the filters' version, else `original`.
    pub(crate) fn current<'a>(&'a self, original: Source<'a>) -> Source<'a> {
        self.content.as_ref().map_or(original, Content::source)
    }
}

/// How one stage's outcome moves the message along.
enum Flow {
    /// Next stage.
    Next,
    /// The milter accepted the message: no more stages for it (its modifications apply);
    /// the next milter is still asked, as Postfix and sendmail do.
    Accepted,
    /// The milter failed and its default action is accept: go on as if it were not there.
    Ignore,
    /// The milter failed and its default action is quarantine.
    Quarantine(String),
    /// The message is decided.
    Decided(Decided),
}

fn flow(outcome: &Outcome, milter: &str, queue_id: &str) -> Flow {
    let answer = |reply: Vec<u8>, verdict: MessageVerdict| {
        let status = format!(
            "MILTER {milter}: {}",
            String::from_utf8_lossy(&reply)
                .trim_end()
                .replace("\r\n", " ")
        );
        Flow::Decided(Decided {
            reply,
            verdict,
            by: format!("milter {milter}"),
            status,
            disconnect: false,
        })
    };
    match outcome {
        Outcome::Continue | Outcome::Skip => Flow::Next,
        Outcome::Verdict(Verdict::Accept) => Flow::Accepted,
        Outcome::Verdict(Verdict::Reject) => {
            answer(REPLY_REJECT.to_vec(), MessageVerdict::Rejected)
        }
        Outcome::Verdict(Verdict::Tempfail | Verdict::ConnFail | Verdict::Shutdown) => {
            answer(REPLY_TEMPFAIL.to_vec(), MessageVerdict::TempFailed)
        }
        Outcome::Verdict(Verdict::Reply(r)) => {
            let mut reply = r.text.to_vec();
            reply.extend_from_slice(b"\r\n");
            let verdict = if r.is_temporary() {
                MessageVerdict::TempFailed
            } else {
                MessageVerdict::Rejected
            };
            answer(reply, verdict)
        }
        Outcome::Verdict(Verdict::Discard) => {
            Flow::Decided(Decided::discarded("milter", milter, queue_id))
        }
        Outcome::Failed(f) => match f.action {
            MilterAction::Accept => Flow::Ignore,
            MilterAction::Reject => answer(REPLY_REJECT.to_vec(), MessageVerdict::Rejected),
            MilterAction::Tempfail => answer(REPLY_TEMPFAIL.to_vec(), MessageVerdict::TempFailed),
            MilterAction::Quarantine => Flow::Quarantine(format!("milter failed: {}", f.kind)),
        },
    }
}

/// The 250 a discarded (or held) message gets: the same as a delivered one's.
pub(crate) fn discarded_reply(queue_id: &str) -> Vec<u8> {
    format!("250 2.0.0 Ok: queued as {queue_id}\r\n").into_bytes()
}

/// Runs the message (`original`, or the version `changes` holds) through the chain's
/// milters, adding their changes to `changes`. A changed message too large for memory is
/// spooled in `dir`. An I/O error on the spool ends it (the caller answers with a local
/// error).
pub(crate) async fn run(
    chain: &mut MilterChain,
    original: Source<'_>,
    dir: &Path,
    queue_id: &str,
    changes: &mut Changes,
) -> std::io::Result<Option<Decided>> {
    if let Some(milter) = chain.discarded_by() {
        return Ok(Some(Decided::discarded("milter", milter, queue_id)));
    }
    for i in chain.message_milters() {
        let Some(milter) = chain.milter(i) else {
            continue;
        };
        let name = milter.name().to_string();
        let current = changes.current(original).to_owned();
        let current = current.source();
        let asked = ask(milter, current, queue_id).await?;
        let (section_length, mut fields) = (asked.section_length, asked.fields);
        let modifications = match flow(&asked.outcome, &name, queue_id) {
            Flow::Next | Flow::Accepted => asked.modifications,
            Flow::Ignore => continue,
            Flow::Quarantine(reason) => {
                changes
                    .quarantine
                    .get_or_insert((format!("milter {name}"), reason));
                continue;
            }
            Flow::Decided(decided) => return Ok(Some(decided)),
        };
        let leading = milter.leading_space();
        apply(
            changes,
            &format!("milter {name}"),
            modifications,
            &mut fields,
            leading,
            (current, section_length),
            dir,
        )
        .await?;
    }
    Ok(None)
}

/// What one milter said about the message.
struct Asked {
    outcome: Outcome,
    modifications: Vec<Modification>,
    section_length: usize,
    fields: Vec<Field>,
}

/// Sends the message to one milter, stage by stage, up to its verdict.
async fn ask(
    milter: &mut MilterClient,
    source: Source<'_>,
    queue_id: &str,
) -> std::io::Result<Asked> {
    let mut reader = Reader::open(source).await?;
    let mut head = Vec::new();
    let mut complete = false;
    while !has_section_end(&head) && head.len() < HEADER_SECTION_LIMIT {
        let chunk = reader.next().await?;
        if chunk.is_empty() {
            complete = true;
            break;
        }
        head.extend_from_slice(chunk);
    }
    let section = parse_header_section(&head, complete);
    let mut asked = Asked {
        outcome: Outcome::Continue,
        modifications: Vec::new(),
        section_length: section.length,
        fields: section.fields,
    };
    let id: [(&str, &[u8]); 1] = [("i", queue_id.as_bytes())];
    let leading = milter.leading_space();
    let done = |o: &Outcome| !matches!(o, Outcome::Continue);

    asked.outcome = milter.stage(Command::Data, &id).await.outcome;
    if !done(&asked.outcome) {
        for field in &asked.fields {
            let value = field.milter_value();
            let name = field.name.strip_suffix(b" ").unwrap_or(&field.name);
            let value = crate::protocol::milter::codec::header_value(&value, leading);
            asked.outcome = milter
                .stage(Command::Header { name, value }, &[])
                .await
                .outcome;
            if done(&asked.outcome) {
                break;
            }
        }
    }
    if !done(&asked.outcome) {
        asked.outcome = milter.stage(Command::Eoh, &id).await.outcome;
    }
    if !done(&asked.outcome) {
        let mut skip = false;
        let mut pending = head[section.length..].to_vec();
        let mut at_end = complete;
        loop {
            while pending.len() >= MAX_BODY_CHUNK || (at_end && !pending.is_empty()) {
                let n = pending.len().min(MAX_BODY_CHUNK);
                let outcome = milter
                    .stage(Command::Body(&pending[..n]), &[])
                    .await
                    .outcome;
                pending.drain(..n);
                match outcome {
                    Outcome::Continue => {}
                    Outcome::Skip => {
                        skip = true;
                        break;
                    }
                    other => {
                        asked.outcome = other;
                        break;
                    }
                }
            }
            if skip || done(&asked.outcome) || (at_end && pending.is_empty()) {
                break;
            }
            let chunk = reader.next().await?;
            if chunk.is_empty() {
                at_end = true;
            } else {
                pending.extend_from_slice(chunk);
            }
        }
    }
    if !done(&asked.outcome) {
        let result = milter.stage(Command::BodyEob, &id).await;
        asked.outcome = result.outcome;
        asked.modifications = result.modifications;
    }
    Ok(asked)
}

fn has_section_end(head: &[u8]) -> bool {
    head.starts_with(b"\r\n") || head.windows(4).any(|w| w == b"\r\n\r\n")
}

/// Applies one filter's (`milter NAME`, `hook NAME`) modifications: the envelope's to
/// `changes.envelope`, the headers' and the body's to a new message (`source` is the
/// message they change, and where its body starts).
pub(crate) async fn apply(
    changes: &mut Changes,
    milter: &str,
    modifications: Vec<Modification>,
    fields: &mut Vec<Field>,
    leading_space: bool,
    source: (Source<'_>, usize),
    dir: &Path,
) -> std::io::Result<()> {
    if modifications.is_empty() {
        return Ok(());
    }
    let mut headers_changed = false;
    let mut new_body: Option<Vec<u8>> = None;
    let mut envelope_changed = false;
    for m in &modifications {
        match m {
            Modification::AddHeader { .. }
            | Modification::InsHeader { .. }
            | Modification::ChgHeader { .. } => match apply_header(fields, m, leading_space) {
                Ok(()) => headers_changed = true,
                Err(e) => tracing::warn!("{milter}: header change ignored: {e}"),
            },
            Modification::ReplBody(piece) => {
                new_body
                    .get_or_insert_with(Vec::new)
                    .extend_from_slice(piece);
            }
            Modification::Quarantine(reason) => {
                let reason = String::from_utf8_lossy(reason).into_owned();
                changes
                    .quarantine
                    .get_or_insert((milter.to_string(), reason));
            }
            _ => {
                // Only the sender is replaced and recipients added or removed: comparing
                // those is comparing the envelope, without a copy of every recipient per
                // modification (up to a thousand of each in one answer).
                let sender = changes.envelope.sender.clone();
                let count = changes.envelope.recipients.len();
                changes.envelope.apply(m);
                envelope_changed |=
                    changes.envelope.sender != sender || changes.envelope.recipients.len() != count;
            }
        }
    }
    if headers_changed || new_body.is_some() || envelope_changed {
        changes.changed_by.push(milter.to_string());
    }
    if !headers_changed && new_body.is_none() {
        return Ok(());
    }
    let (source, section_length) = source;
    let mut new = Receiving::new(changes.memory_limit, dir);
    let mut section = Vec::new();
    render_header_section(fields, &mut section);
    new.write(&section).await;
    match new_body {
        Some(body) => new.write(&body).await,
        None => {
            // The old body: what follows its header section in the old message.
            let mut skip = section_length;
            let mut reader = Reader::open(source).await?;
            loop {
                let chunk = reader.next().await?;
                if chunk.is_empty() {
                    break;
                }
                let from = skip.min(chunk.len());
                skip -= from;
                new.write(&chunk[from..]).await;
            }
        }
    }
    changes.content = Some(new.finish().await?);
    Ok(())
}
