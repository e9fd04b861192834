//! Shadow filters: milters, hooks or the filter command marked `shadow` run on a copy of
//! each message, in parallel with the live chain; their verdict is recorded
//! (`proxsmtpd_shadow_verdicts_total{filter,live,shadow}`, the message's log line and
//! span) and never enforced.
//!
//! A shadow starts when the message has been received, so it runs while the live filters
//! do; the message's log line waits for it at most until the shadow's own time limit from
//! its start, after the client has its answer: a shadow never delays a live verdict. Under
//! load shadows go first: at most `ShadowConcurrency` run at once across the proxy, and one
//! that would exceed it is not started (verdict `dropped`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::content::{Content, InMemory, Source};
use super::milters::{self, Changes};
use super::{hooks, spool};
use crate::config::hook::HookStage;
use crate::config::milter::MilterConfig;
use crate::config::{FilterType, Settings};
use crate::filter::run::{self as filter_run, FilterJob, Mode};
use crate::filter::verdict::{self, ReplyKind, Verdict};
use crate::ops::metrics::MessageVerdict;
use crate::protocol::hook::answer::Action;
use crate::protocol::hook::request::{self, Address, Context, Envelope as HookEnvelope};
use crate::protocol::session::{Envelope, EnvelopeCommand};
use crate::proxy::hook::{Hook, Hooks};
use crate::proxy::milter::{ClientInfo, MilterChain};

/// What a shadow needs to know of the message besides its content.
#[derive(Clone)]
pub(crate) struct Input {
    pub(crate) client: ClientInfo,
    /// The hook request context (its stage is set per call).
    pub(crate) context: Context,
    pub(crate) from: Address,
    pub(crate) to: Vec<Address>,
    pub(crate) mail_line: Vec<u8>,
    pub(crate) rcpt_lines: Vec<Vec<u8>>,
    pub(crate) envelope: Envelope,
    pub(crate) queue_id: String,
    pub(crate) size: u64,
    /// The filter command's environment (SENDER, RECIPIENTS, ...), EMAIL excluded.
    pub(crate) command_env: Vec<(String, String)>,
}

/// A shadow task, aborted when dropped (the session ended before its result was read).
struct Task(JoinHandle<&'static str>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Run {
    filter: String,
    /// The task, or the verdict it got without one (`dropped`, `error`).
    task: Result<Task, &'static str>,
    /// When its result is no longer waited for.
    until: Instant,
}

/// The shadows of one message.
#[derive(Default)]
pub(crate) struct Shadows {
    runs: Vec<Run>,
}

/// The proxy-wide limit on shadow runs in flight, sized by the first settings that use it.
fn slots(settings: &Settings) -> Arc<Semaphore> {
    static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    SLOTS
        .get_or_init(|| Arc::new(Semaphore::new(settings.shadow_concurrency)))
        .clone()
}

/// Whether `settings` configure any shadow filter.
pub(crate) fn configured(settings: &Settings) -> bool {
    settings.milters.iter().any(|m| m.shadow)
        || settings.hooks.iter().any(|h| h.shadow)
        || (settings.filter_shadow && settings.filter_command.is_some())
}

/// The verdict word of a decided message.
fn verdict_word(verdict: MessageVerdict) -> &'static str {
    match verdict {
        MessageVerdict::Accepted => "accept",
        MessageVerdict::Rejected => "reject",
        MessageVerdict::TempFailed => "tempfail",
        MessageVerdict::Dropped => "discard",
        MessageVerdict::LocalError => "error",
    }
}

/// The live chain's verdict word for a message outcome.
pub(crate) fn live_word(verdict: MessageVerdict, status: Option<&str>) -> &'static str {
    if status.is_some_and(|s| s.starts_with("QUARANTINED")) {
        "quarantine"
    } else {
        verdict_word(verdict)
    }
}

fn reply_word(reply: &[u8]) -> &'static str {
    if reply.first() == Some(&b'4') {
        "tempfail"
    } else {
        "reject"
    }
}

/// The shadows' copy of the message: the live chain may change or drop its own.
enum Copy {
    /// A message in memory is shared (nobody changes bytes in place), and so is its share
    /// of SpoolMemory: it is given back when the shadows are done too.
    Memory(InMemory),
    File(spool::TempCopy),
}

impl Copy {
    fn source(&self) -> Source<'_> {
        match self {
            Copy::Memory(held) => Source::Memory(held),
            Copy::File(path) => Source::File(path),
        }
    }
}

/// Starts the shadows `settings` configure on the message.
pub(crate) async fn start(
    settings: &Arc<Settings>,
    hooks: Option<&Arc<Hooks>>,
    input: Input,
    message: &Content,
) -> Shadows {
    let mut shadows = Shadows::default();
    if !configured(settings) {
        return shadows;
    }
    let slots = slots(settings);
    let dir = settings.temp_directory.clone();
    // One copy for the milters and hooks (they only read it); the command gets its own.
    // Under load, when no slot is free, every shadow is dropped: a spooled message is not
    // copied on the disk for none of them, in front of the live verdict.
    let all_dropped = slots.available_permits() == 0;
    let copy = match message {
        Content::Memory(held) => Ok(Some(Copy::Memory(held.clone()))),
        Content::File(_) if all_dropped => Ok(None),
        Content::File(_) => {
            let copy = message.source().copy_to_file(&dir, SHADOW_PREFIX).await;
            copy.map(|c| Some(Copy::File(c)))
        }
    };
    let (copy, without_copy) = match copy {
        Ok(copy) => (copy.map(Arc::new), "dropped"),
        Err(e) => {
            tracing::warn!("shadow filters: cannot copy the message: {e}");
            (None, "error")
        }
    };
    let input = Arc::new(input);
    let mut add = |filter: String, limit: Duration, work: Option<ShadowWork>| {
        let until = Instant::now() + limit;
        let task = match (work, slots.clone().try_acquire_owned()) {
            (None, _) => Err(without_copy),
            (Some(_), Err(_)) => Err("dropped"),
            (Some(work), Ok(slot)) => Ok(Task(tokio::spawn(async move {
                let verdict = tokio::time::timeout(limit, work.run())
                    .await
                    .unwrap_or("error");
                drop(slot);
                verdict
            }))),
        };
        shadows.runs.push(Run {
            filter,
            task,
            until,
        });
    };
    let defaults = crate::config::milter::MilterDefaults {
        connect_timeout: settings.milter_connect_timeout,
        command_timeout: settings.milter_command_timeout,
        content_timeout: settings.milter_content_timeout,
        default_action: settings.milter_default_action,
    };
    for spec in settings.milters.iter().filter(|m| m.shadow) {
        let config = spec.resolve(&defaults);
        let limit =
            config.connect_timeout + config.command_timeout * 3 + config.content_timeout * 2;
        let work = copy.clone().map(|copy| ShadowWork::Milter {
            config,
            version: settings.milter_protocol,
            input: input.clone(),
            copy,
            dir: dir.clone(),
        });
        add(format!("milter:{}", spec.name), limit, work);
    }
    for hook in hooks
        .iter()
        .flat_map(|h| h.list.iter())
        .filter(|h| h.config.shadow)
    {
        let calls = hook.config.stages.len() as u32 + input.to.len() as u32;
        let limit = hook.config.timeout * calls.max(1);
        let work = copy.clone().map(|copy| ShadowWork::Hook {
            hook: hook.clone(),
            input: input.clone(),
            copy,
            dir: dir.clone(),
        });
        add(format!("hook:{}", hook.name()), limit, work);
    }
    if settings.filter_shadow {
        if let Some(command) = settings.filter_command.clone() {
            let work = copy.clone().map(|copy| ShadowWork::Command {
                command,
                mode: if settings.filter_type == FilterType::File {
                    Mode::File
                } else {
                    Mode::Pipe
                },
                timeout: settings.filter_timeout,
                input: input.clone(),
                copy,
                dir: dir.clone(),
            });
            add("command".to_string(), settings.filter_timeout * 2, work);
        }
    }
    shadows
}

/// The name of the shadows' copies in TempDirectory.
const SHADOW_PREFIX: &str = "proxsmtpd.shadow.";

impl Shadows {
    /// Waits for each shadow (at most until its own limit), records its verdict beside the
    /// live one, and gives the log line's `shadow=` value.
    pub(crate) async fn finish(self, live: &str) -> Option<String> {
        if self.runs.is_empty() {
            return None;
        }
        let mut words = Vec::with_capacity(self.runs.len());
        for run in self.runs {
            let verdict = match run.task {
                Err(word) => word,
                Ok(mut task) => match tokio::time::timeout_at(run.until, &mut task.0).await {
                    Ok(Ok(word)) => word,
                    Ok(Err(_)) | Err(_) => "error",
                },
            };
            crate::ops::metrics::global().shadow_verdict(&run.filter, live, verdict);
            words.push(format!("{}:{verdict}", run.filter));
        }
        Some(words.join(","))
    }
}

enum ShadowWork {
    Milter {
        config: MilterConfig,
        version: u32,
        input: Arc<Input>,
        copy: Arc<Copy>,
        dir: PathBuf,
    },
    Hook {
        hook: Arc<Hook>,
        input: Arc<Input>,
        copy: Arc<Copy>,
        dir: PathBuf,
    },
    Command {
        command: String,
        mode: Mode,
        timeout: Duration,
        input: Arc<Input>,
        copy: Arc<Copy>,
        dir: PathBuf,
    },
}

impl ShadowWork {
    async fn run(self) -> &'static str {
        match self {
            ShadowWork::Milter {
                config,
                version,
                input,
                copy,
                dir,
            } => milter(config, version, &input, copy.source(), &dir).await,
            ShadowWork::Hook {
                hook,
                input,
                copy,
                dir,
            } => hook_verdict(&hook, &input, copy.source(), &dir).await,
            ShadowWork::Command {
                command,
                mode,
                timeout,
                input,
                copy,
                dir,
            } => command_verdict(&command, mode, timeout, &input, copy.source(), &dir).await,
        }
    }
}

/// The whole transaction through one milter of its own.
async fn milter(
    config: MilterConfig,
    version: u32,
    input: &Input,
    message: Source<'_>,
    dir: &Path,
) -> &'static str {
    let mut chain = MilterChain::new(vec![config], version);
    let verdict = async {
        if let Some(reply) = chain
            .envelope(EnvelopeCommand::Mail, &input.mail_line, &input.client)
            .await
        {
            return reply_word(&reply);
        }
        let mut refusal = None;
        let mut accepted = 0;
        for line in &input.rcpt_lines {
            match chain
                .envelope(EnvelopeCommand::Rcpt, line, &input.client)
                .await
            {
                None => accepted += 1,
                Some(reply) => refusal = Some(reply),
            }
        }
        if accepted == 0 {
            if let Some(reply) = refusal {
                return reply_word(&reply);
            }
        }
        // What a shadow changes is thrown away: kept in a file, off the memory budget.
        let mut changes = Changes::new(&input.envelope, 0);
        match milters::run(&mut chain, message, dir, &input.queue_id, &mut changes).await {
            Ok(Some(decided)) => verdict_word(decided.verdict),
            Ok(None) if changes.quarantine.is_some() => "quarantine",
            Ok(None) => "accept",
            Err(_) => "error",
        }
    }
    .await;
    chain.quit().await;
    verdict
}

fn action_word(action: Action, reply: Option<&[u8]>) -> &'static str {
    match action {
        Action::Accept => "accept",
        Action::Discard => "discard",
        Action::Quarantine => "quarantine",
        Action::Reject => reply.map_or("reject", reply_word),
    }
}

/// Every stage the hook is configured for, as the live chain would ask it.
async fn hook_verdict(hook: &Hook, input: &Input, message: Source<'_>, dir: &Path) -> &'static str {
    let mut quarantined = false;
    let context = |stage: HookStage| {
        let mut c = input.context.clone();
        c.stage = stage.label();
        c
    };
    if hook.config.runs_at(HookStage::Mail) {
        let envelope = HookEnvelope {
            from: input.from.clone(),
            to: Vec::new(),
        };
        let body = request::render(&context(HookStage::Mail), &envelope, None).before;
        match hook.ask(HookStage::Mail, body.into()).await {
            Err(_) => return "error",
            Ok(a) => match a.action {
                Action::Accept => {}
                Action::Quarantine => quarantined = true,
                other => return action_word(other, a.reply.as_deref()),
            },
        }
    }
    if hook.config.runs_at(HookStage::Rcpt) {
        let mut refused = 0;
        let mut last = "reject";
        for i in 0..input.to.len() {
            let envelope = HookEnvelope {
                from: input.from.clone(),
                to: input.to[..=i].to_vec(),
            };
            let body = request::render(&context(HookStage::Rcpt), &envelope, None).before;
            match hook.ask(HookStage::Rcpt, body.into()).await {
                Err(_) => return "error",
                Ok(a) => match a.action {
                    Action::Accept => {}
                    Action::Quarantine => quarantined = true,
                    Action::Discard => return "discard",
                    Action::Reject => {
                        refused += 1;
                        last = action_word(Action::Reject, a.reply.as_deref());
                    }
                },
            }
        }
        if refused > 0 && refused == input.to.len() {
            return last;
        }
    }
    if hook.config.runs_at(HookStage::Data) {
        if input.size > hook.config.max_size {
            return match hook.config.oversize_action {
                crate::config::milter::MilterAction::Accept => "accept",
                crate::config::milter::MilterAction::Reject => "reject",
                crate::config::milter::MilterAction::Tempfail => "tempfail",
                crate::config::milter::MilterAction::Quarantine => "quarantine",
            };
        }
        let request = hooks::Request {
            context: context(HookStage::Data),
            from: input.from.clone(),
            to: input.to.clone(),
            source: message,
            size: input.size,
        };
        let Ok(prepared) = hooks::prepare(&request).await else {
            return "error";
        };
        let _ = dir;
        match hook.ask(HookStage::Data, prepared.body).await {
            Err(_) => return "error",
            Ok(a) => match a.action {
                Action::Accept => {}
                Action::Quarantine => quarantined = true,
                other => return action_word(other, a.reply.as_deref()),
            },
        }
    }
    if quarantined {
        "quarantine"
    } else {
        "accept"
    }
}

/// The filter command on a copy of its own (it may change the file).
async fn command_verdict(
    command: &str,
    mode: Mode,
    timeout: Duration,
    input: &Input,
    message: Source<'_>,
    dir: &Path,
) -> &'static str {
    let Ok(own) = message.copy_to_file(dir, SHADOW_PREFIX).await else {
        return "error";
    };
    let output = match mode {
        Mode::Pipe => match spool::Spool::one(dir).await {
            Ok(out) => Some(out),
            Err(_) => return "error",
        },
        Mode::File => None,
    };
    let stdout = match output.as_ref().map(spool::Spool::output).transpose() {
        Ok(f) => f,
        Err(_) => return "error",
    };
    let mut env = input.command_env.clone();
    if mode == Mode::File {
        env.push(("EMAIL".into(), own.display().to_string()));
    }
    let job = FilterJob {
        command,
        mode,
        timeout,
        input: &own,
        stdin: None,
        output: stdout,
        env,
    };
    let run = filter_run::execute(job).await;
    match verdict::decide(&run.exit, run.stderr_last.as_deref()) {
        Verdict::Deliver => "accept",
        Verdict::Reply { kind, .. } => match kind {
            ReplyKind::Drop => "discard",
            ReplyKind::TempFail => "tempfail",
            ReplyKind::Reject => "reject",
        },
        Verdict::LocalError { .. } => "error",
    }
}
