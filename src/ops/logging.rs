//! Where log events go: stderr with `-d`, syslog (facility mail) when daemonised, JSON lines
//! on stdout in container mode.
//!
//! Messages are plain text. In the text outputs (stderr, syslog) an event's structured fields
//! follow its message as `name=value`, except for events with target [`SUMMARY_TARGET`]: their
//! message already is the original's per-message line (`<ID>: client=..., status=...`), which
//! log parsers read up to the end of the line, so their fields only appear in the JSON output.

use std::fmt::{self, Write as _};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::{Context, Layered, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The target of the per-message summary event (see the module documentation).
pub(crate) const SUMMARY_TARGET: &str = "proxsmtpd::message";

/// The syslog socket of the local system.
const DEV_LOG: &str = "/dev/log";

/// syslog facility LOG_MAIL.
const FACILITY_MAIL: u8 = 2;

/// How long a log call may wait for a congested syslog daemon before the line is dropped:
/// a stalled syslog must not stall mail.
const SYSLOG_SEND_TIMEOUT: Duration = Duration::from_millis(250);

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogTarget {
    /// `-d level`: `proxsmtpd: <message>` lines on stderr. `level` <= 0 shows errors,
    /// 1 adds warnings, 2 and 3 info, 4 debug (every SMTP line relayed).
    Stderr { level: i32 },
    /// Daemonised: `/dev/log`, facility mail, everything except debug.
    Syslog,
    /// Container mode: one JSON object per line on stdout, info and above.
    Json,
}

/// A layer added below the output, for example the OpenTelemetry layer. It sees every
/// event and span; give it its own filter if it should not.
pub(crate) type ExtraLayer = Box<dyn Layer<Registry> + Send + Sync>;

type Base = Layered<Option<ExtraLayer>, Registry>;

/// Installs the global subscriber. Call once, after daemonising (the syslog lines carry the
/// pid). A second call leaves the first subscriber in place.
pub(crate) fn init(target: LogTarget, extra: Option<ExtraLayer>) {
    let output: Box<dyn Layer<Base> + Send + Sync> = match target {
        LogTarget::Stderr { level } => stderr_layer(level, std::io::stderr).boxed(),
        LogTarget::Syslog => SyslogLayer::new(DEV_LOG)
            .with_filter(LevelFilter::INFO)
            .boxed(),
        LogTarget::Json => json_layer(std::io::stdout).boxed(),
    };
    // Failure only means a subscriber is already installed, which is fine to keep.
    let _ = Registry::default().with(extra).with(output).try_init();
}

/// The most verbose level shown for `-d level`.
fn stderr_level(level: i32) -> LevelFilter {
    match level {
        i32::MIN..=0 => LevelFilter::ERROR,
        1 => LevelFilter::WARN,
        2 | 3 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    }
}

fn stderr_layer<S, W>(level: i32, writer: W) -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer)
        .event_format(WarnxFormat)
        .with_filter(stderr_level(level))
}

fn json_layer<S, W>(writer: W) -> impl Layer<S> + Send + Sync
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(writer)
        .with_filter(LevelFilter::INFO)
}

/// The text of an event: the message, then ` name=value` for each other field.
fn event_text(event: &Event<'_>) -> String {
    let mut visitor = TextVisitor {
        // Room for most lines at once, rather than growing through several sizes.
        message: String::with_capacity(160),
        fields: String::new(),
        with_fields: event.metadata().target() != SUMMARY_TARGET,
    };
    event.record(&mut visitor);
    let mut text = visitor.message;
    text.push_str(&visitor.fields);
    text
}

struct TextVisitor {
    message: String,
    fields: String,
    with_fields: bool,
}

impl Visit for TextVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if self.with_fields {
            if !self.message.is_empty() || !self.fields.is_empty() {
                self.fields.push(' ');
            }
            let _ = write!(self.fields, "{}={value:?}", field.name());
        }
    }
}

/// warnx(3) style: `proxsmtpd: <text>`, no time stamp, no level.
struct WarnxFormat;

impl<S, N> FormatEvent<S, N> for WarnxFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let text = event_text(event);
        writer.write_str("proxsmtpd: ")?;
        writer.write_str(&text)?;
        writer.write_char('\n')
    }
}

/// syslog severity for a level.
fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Sends each event as one RFC 3164 datagram `<PRI>proxsmtpd[PID]: text` to the syslog
/// socket. Lines are dropped, never queued, while the socket is missing or congested; the
/// socket is reopened when the syslog daemon restarts.
struct SyslogLayer {
    path: PathBuf,
    socket: Mutex<Option<UnixDatagram>>,
}

impl SyslogLayer {
    fn new(path: impl Into<PathBuf>) -> SyslogLayer {
        SyslogLayer {
            path: path.into(),
            socket: Mutex::new(None),
        }
    }

    fn connect(&self) -> Option<UnixDatagram> {
        let socket = UnixDatagram::unbound().ok()?;
        socket.connect(&self.path).ok()?;
        socket.set_write_timeout(Some(SYSLOG_SEND_TIMEOUT)).ok()?;
        Some(socket)
    }

    fn send(&self, datagram: &[u8]) {
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        // A second attempt on a fresh socket covers a syslog daemon that restarted.
        for _ in 0..2 {
            if socket.is_none() {
                *socket = self.connect();
            }
            let Some(connected) = socket.as_ref() else {
                return;
            };
            match connected.send(datagram) {
                Ok(_) => return,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock) => return,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return,
                Err(_) => *socket = None,
            }
        }
    }
}

impl<S: Subscriber> Layer<S> for SyslogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let metadata = event.metadata();
        let datagram = format!(
            "<{}>proxsmtpd[{}]: {}",
            FACILITY_MAIL * 8 + severity(metadata.level()),
            std::process::id(),
            event_text(event)
        );
        self.send(datagram.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// One event of each level plus a summary event and one inside a span.
    fn emit_all() {
        tracing::error!("1A2B3C: couldn't connect to: 127.0.0.1:25");
        tracing::warn!(pid = 42, "killing filter process");
        tracing::info!("accepted connection from: 127.0.0.1");
        tracing::debug!("CLIENT < MAIL FROM:<a@b>");
        tracing::trace!("never shown");
        tracing::info!(
            target: SUMMARY_TARGET,
            client = "127.0.0.1",
            status = "FILTERED",
            "100000: client=127.0.0.1, status=FILTERED"
        );
        let span = tracing::info_span!("connection", id = "100001");
        let _entered = span.enter();
        tracing::info!(size = 12u64, "in a span");
    }

    fn stderr_output(level: i32) -> String {
        let buffer = Buffer::default();
        let subscriber = Registry::default().with(stderr_layer(level, buffer.clone()));
        tracing::subscriber::with_default(subscriber, emit_all);
        buffer.text()
    }

    #[test]
    fn stderr_levels_and_format() {
        let error = "proxsmtpd: 1A2B3C: couldn't connect to: 127.0.0.1:25\n";
        let warn = "proxsmtpd: killing filter process pid=42\n";
        let info = "proxsmtpd: accepted connection from: 127.0.0.1\n\
                    proxsmtpd: 100000: client=127.0.0.1, status=FILTERED\n\
                    proxsmtpd: in a span size=12\n";
        let debug = "proxsmtpd: CLIENT < MAIL FROM:<a@b>\n";
        let cases = [
            (-4, error.to_string()),
            (0, error.to_string()),
            (1, format!("{error}{warn}")),
            (2, format!("{error}{warn}{info}")),
            (3, format!("{error}{warn}{info}")),
            (
                4,
                format!(
                    "{error}{warn}proxsmtpd: accepted connection from: 127.0.0.1\n{debug}\
                     proxsmtpd: 100000: client=127.0.0.1, status=FILTERED\n\
                     proxsmtpd: in a span size=12\n"
                ),
            ),
        ];
        for (level, want) in cases {
            assert_eq!(stderr_output(level), want, "level {level}");
        }
    }

    #[test]
    fn text_of_fields_without_message() {
        let buffer = Buffer::default();
        let subscriber = Registry::default().with(stderr_layer(4, buffer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(a = "x y", b = true);
        });
        assert_eq!(buffer.text(), "proxsmtpd: a=\"x y\" b=true\n");
    }

    #[test]
    fn json_lines_flatten_fields() {
        let buffer = Buffer::default();
        let subscriber = Registry::default().with(json_layer(buffer.clone()));
        tracing::subscriber::with_default(subscriber, emit_all);
        let text = buffer.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let summary = lines[3];
        for want in [
            "\"timestamp\":\"",
            "\"level\":\"INFO\"",
            "\"message\":\"100000: client=127.0.0.1, status=FILTERED\"",
            "\"client\":\"127.0.0.1\"",
            "\"status\":\"FILTERED\"",
            "\"target\":\"proxsmtpd::message\"",
        ] {
            assert!(summary.contains(want), "{want} missing in {summary}");
        }
        assert!(lines[1].contains("\"pid\":42"), "{}", lines[1]);
        assert!(lines[4].contains("\"id\":\"100001\""), "{}", lines[4]);
        assert!(!text.contains("CLIENT <"), "debug line in {text}");
    }

    fn receiver() -> (tempfile::TempDir, PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (dir, path, socket)
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn syslog_datagrams() {
        let (_dir, path, socket) = receiver();
        let subscriber =
            Registry::default().with(SyslogLayer::new(&path).with_filter(LevelFilter::INFO));
        tracing::subscriber::with_default(subscriber, emit_all);
        let pid = std::process::id();
        let want = [
            format!("<19>proxsmtpd[{pid}]: 1A2B3C: couldn't connect to: 127.0.0.1:25"),
            format!("<20>proxsmtpd[{pid}]: killing filter process pid=42"),
            format!("<22>proxsmtpd[{pid}]: accepted connection from: 127.0.0.1"),
            format!("<22>proxsmtpd[{pid}]: 100000: client=127.0.0.1, status=FILTERED"),
            format!("<22>proxsmtpd[{pid}]: in a span size=12"),
        ];
        for line in want {
            assert_eq!(recv(&socket), line);
        }
        socket.set_nonblocking(true).unwrap();
        assert!(socket.recv(&mut [0u8; 64]).is_err(), "debug was sent");
    }

    #[test]
    fn syslog_reconnects_and_survives_absence() {
        let (_dir, path, socket) = receiver();
        let layer = SyslogLayer::new(&path);
        layer.send(b"one");
        assert_eq!(recv(&socket), "one");
        // The syslog daemon goes away: lines are dropped without error.
        drop(socket);
        std::fs::remove_file(&path).unwrap();
        layer.send(b"lost");
        // It comes back at the same path: the next line reaches it.
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        layer.send(b"two");
        assert_eq!(recv(&socket), "two");

        let absent = SyslogLayer::new("/nonexistent/dev/log");
        absent.send(b"nowhere");
    }

    #[test]
    fn severities() {
        let cases = [
            (Level::ERROR, 3),
            (Level::WARN, 4),
            (Level::INFO, 6),
            (Level::DEBUG, 7),
            (Level::TRACE, 7),
        ];
        for (level, want) in cases {
            assert_eq!(severity(&level), want, "{level}");
        }
    }
}
