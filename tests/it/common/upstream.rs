//! A scriptable upstream SMTP server (the proxy's OutAddress) on a real loopback socket.
//!
//! It is strict like a real MTA (503 for a nested MAIL, 554 for DATA without recipients) and
//! records exactly what it receives: every raw command line, the raw DATA bytes (still
//! dot-stuffed) and the un-stuffed content of each message, per session. Replies can be
//! scripted per verb (`Reply::text`, delays, closing), plus the special keys `BANNER` and
//! `DATA_END` (the reply after the end-of-data marker).
//!
//! In `lenient_data_end` mode the server also ends DATA at the sequences some MTAs accept
//! (`\n.\n`, `\n.\r\n`, `\r\n.\n`, `\r.\r`), which makes any smuggling sequence the proxy lets
//! through visible as a cut message plus extra commands.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A scripted reply.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    /// Bytes to send (already with line ends); `None` sends nothing.
    wire: Option<Vec<u8>>,
    delay: Duration,
    close: bool,
    /// Bytes sent on their own after a pause, whatever the peer does meanwhile.
    later: Option<(Duration, Vec<u8>)>,
}

impl Reply {
    /// A reply; lines separated by `\n` (or `\r\n`), each sent with CRLF.
    pub fn text(text: &str) -> Reply {
        let wire = text
            .replace("\r\n", "\n")
            .split('\n')
            .map(|l| format!("{l}\r\n"))
            .collect::<String>();
        Reply {
            wire: Some(wire.into_bytes()),
            ..Reply::default()
        }
    }

    /// Bytes sent exactly as given (for malformed or bare-LF replies).
    pub fn raw(bytes: &[u8]) -> Reply {
        Reply {
            wire: Some(bytes.to_vec()),
            ..Reply::default()
        }
    }

    /// Close the connection without replying.
    pub fn close() -> Reply {
        Reply {
            wire: None,
            close: true,
            ..Reply::default()
        }
    }

    /// Send nothing and keep the connection (the peer waits for a reply that never comes).
    pub fn silent() -> Reply {
        Reply::default()
    }

    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }

    /// After the reply, sends `bytes` on their own once `after` has passed (an early or
    /// unsolicited reply while the peer is still sending).
    pub fn and_later(mut self, after: Duration, bytes: &[u8]) -> Reply {
        self.later = Some((after, bytes.to_vec()));
        self
    }

    /// Close the connection after sending the reply.
    pub fn then_close(mut self) -> Reply {
        self.close = true;
        self
    }

    fn first_digit(&self) -> Option<u8> {
        self.wire.as_ref().and_then(|w| w.first().copied())
    }
}

/// What a reply handler gets to decide on.
pub struct Call<'a> {
    /// The raw command line (for `DATA_END`: the un-stuffed message content).
    pub line: &'a [u8],
    /// How many times this key was seen in this session, counting this one (1-based).
    pub nth: usize,
    /// Index of the session (0-based, in accept order).
    pub session: usize,
}

type Handler = Arc<dyn Fn(&Call) -> Option<Reply> + Send + Sync>;

/// One received message.
#[derive(Clone, Debug, Default)]
pub struct Message {
    /// The MAIL line that opened the transaction (raw, with CRLF).
    pub mail_from: Vec<u8>,
    /// The accepted RCPT lines (raw).
    pub rcpts: Vec<Vec<u8>>,
    /// DATA bytes as on the wire (dot-stuffed), without the end-of-data marker.
    pub raw: Vec<u8>,
    /// Un-stuffed content.
    pub content: Vec<u8>,
    /// The end-of-data marker was seen.
    pub complete: bool,
    /// The reply sent after the marker.
    pub final_reply: Option<String>,
}

impl Message {
    pub fn accepted(&self) -> bool {
        self.complete
            && self
                .final_reply
                .as_deref()
                .is_some_and(|r| r.starts_with('2'))
    }
}

/// One transcript entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A command line received.
    Command(Vec<u8>),
    /// Bytes we sent.
    Sent(Vec<u8>),
    /// A complete or cut DATA section (raw), by message index.
    Data(usize),
}

/// Everything about one connection from the proxy.
#[derive(Clone, Debug)]
pub struct Session {
    /// The proxy's address on this connection (TCP only).
    pub peer: Option<SocketAddr>,
    pub commands: Vec<Vec<u8>>,
    pub command_times: Vec<Instant>,
    pub messages: Vec<Message>,
    pub transcript: Vec<Event>,
    pub opened_at: Instant,
    pub closed_at: Option<Instant>,
    /// The proxy closed the connection (we read EOF) rather than we.
    pub peer_closed: bool,
    /// The command lines after which the proxy sent more before getting our reply (it
    /// pipelined, or talked before the greeting: `BANNER`).
    pub sent_before_reply: Vec<String>,
    txn_from: Option<Vec<u8>>,
    txn_rcpts: Vec<Vec<u8>>,
    counts: HashMap<String, usize>,
}

impl Session {
    fn new() -> Session {
        Session {
            peer: None,
            commands: Vec::new(),
            command_times: Vec::new(),
            messages: Vec::new(),
            transcript: Vec::new(),
            opened_at: Instant::now(),
            closed_at: None,
            peer_closed: false,
            sent_before_reply: Vec::new(),
            txn_from: None,
            txn_rcpts: Vec::new(),
            counts: HashMap::new(),
        }
    }

    pub fn closed(&self) -> bool {
        self.closed_at.is_some()
    }

    /// Command lines without their line ends (lossy UTF-8).
    pub fn lines(&self) -> Vec<String> {
        self.commands
            .iter()
            .map(|c| {
                let s = String::from_utf8_lossy(c);
                s.trim_end_matches(['\r', '\n']).to_string()
            })
            .collect()
    }

    /// The verb of each command, upper case.
    pub fn verbs(&self) -> Vec<String> {
        self.commands.iter().map(|c| verb_of(c)).collect()
    }

    /// How many commands of this verb the session received.
    /// Asserts that this session carried no `verb` command.
    pub fn assert_no_verb(&self, verb: &str) {
        assert!(
            !self.verbs().iter().any(|v| v == verb),
            "the upstream got {verb}: {:?}",
            self.lines()
        );
    }

    pub fn verb_count(&self, verb: &str) -> usize {
        self.verbs().iter().filter(|v| *v == verb).count()
    }

    pub fn delivered(&self) -> Vec<Message> {
        self.messages
            .iter()
            .filter(|m| m.accepted())
            .cloned()
            .collect()
    }
}

/// All sessions seen so far.
#[derive(Default, Debug)]
pub struct State {
    pub sessions: Vec<Session>,
    queue_id: usize,
}

impl State {
    pub fn delivered(&self) -> Vec<Message> {
        self.sessions.iter().flat_map(|s| s.delivered()).collect()
    }

    pub fn messages(&self) -> Vec<Message> {
        self.sessions
            .iter()
            .flat_map(|s| s.messages.clone())
            .collect()
    }

    pub fn all_verbs(&self) -> Vec<String> {
        self.sessions.iter().flat_map(|s| s.verbs()).collect()
    }
}

/// The verb of a command line as a server sees it.
pub fn verb_of(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    let word = s
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    if word.starts_with("MAIL") {
        "MAIL".into()
    } else if word.starts_with("RCPT") {
        "RCPT".into()
    } else {
        word.split(':').next().unwrap_or("").to_string()
    }
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    stop: AtomicBool,
    conns: Mutex<Vec<Conn>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.cond.notify_all();
    }
}

#[derive(Clone)]
struct Script {
    banner: Reply,
    ehlo_host: String,
    extensions: Vec<String>,
    handlers: HashMap<String, Handler>,
    close_on_connect: bool,
    lenient_data_end: bool,
}

/// Configures an [`Upstream`].
pub struct UpstreamBuilder {
    script: Script,
    unix_path: Option<PathBuf>,
    ipv6: bool,
    listen: Option<SocketAddr>,
}

impl Default for UpstreamBuilder {
    fn default() -> Self {
        UpstreamBuilder {
            script: Script {
                banner: Reply::text("220 upstream.test ESMTP test-upstream"),
                ehlo_host: "upstream.test".into(),
                extensions: [
                    "SIZE 52428800",
                    "8BITMIME",
                    "ENHANCEDSTATUSCODES",
                    "XFORWARD NAME ADDR PROTO HELO",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
                handlers: HashMap::new(),
                close_on_connect: false,
                lenient_data_end: false,
            },
            unix_path: None,
            ipv6: false,
            listen: None,
        }
    }
}

impl UpstreamBuilder {
    /// The greeting (lines separated by `\n`).
    pub fn banner(mut self, text: &str) -> Self {
        self.script.banner = Reply::text(text);
        self
    }

    pub fn banner_reply(mut self, r: Reply) -> Self {
        self.script.banner = r;
        self
    }

    pub fn ehlo_host(mut self, host: &str) -> Self {
        self.script.ehlo_host = host.into();
        self
    }

    /// The EHLO extension lines after the host line.
    pub fn extensions(mut self, ext: &[&str]) -> Self {
        self.script.extensions = ext.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Always answer `key` (a verb, `DATA_END` or `BANNER`) with `r`.
    pub fn reply(self, key: &str, r: Reply) -> Self {
        self.reply_with(key, move |_| Some(r.clone()))
    }

    /// Answer `key` with what `f` returns (`None` = the default reply).
    pub fn reply_with(
        mut self,
        key: &str,
        f: impl Fn(&Call) -> Option<Reply> + Send + Sync + 'static,
    ) -> Self {
        self.script
            .handlers
            .insert(key.to_ascii_uppercase(), Arc::new(f));
        self
    }

    /// Answers `key` with `text` when its line (for DATA_END: the content) contains
    /// `needle`, as configured otherwise when not.
    pub fn reply_when(self, key: &str, needle: &str, text: &str) -> Self {
        let (needle, text) = (needle.to_string(), text.to_string());
        self.reply_with(key, move |call| {
            String::from_utf8_lossy(call.line)
                .contains(needle.as_str())
                .then(|| Reply::text(&text))
        })
    }

    /// Accept the connection and close it at once.
    pub fn close_on_connect(mut self) -> Self {
        self.script.close_on_connect = true;
        self
    }

    /// Also end DATA at bare-LF/bare-CR dot sequences (see the module doc).
    pub fn lenient_data_end(mut self) -> Self {
        self.script.lenient_data_end = true;
        self
    }

    /// Listen on [::1] instead of 127.0.0.1.
    pub fn ipv6(mut self) -> Self {
        self.ipv6 = true;
        self
    }

    /// Listen on this address instead of a free port of 127.0.0.1.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Listen on a unix socket instead of TCP.
    pub fn unix(mut self, path: &Path) -> Self {
        self.unix_path = Some(path.to_path_buf());
        self
    }

    pub fn start(self) -> Upstream {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let (listener, addr) = match &self.unix_path {
            Some(p) => {
                let _ = std::fs::remove_file(p);
                let l =
                    UnixListener::bind(p).unwrap_or_else(|e| panic!("bind {}: {e}", p.display()));
                (Listener::Unix(l), UpstreamAddr::Unix(p.clone()))
            }
            None => {
                let any = if self.ipv6 { "[::1]:0" } else { "127.0.0.1:0" };
                let l = match self.listen {
                    Some(a) => TcpListener::bind(a),
                    None => TcpListener::bind(any),
                }
                .expect("bind upstream");
                let a = l.local_addr().expect("local_addr");
                (Listener::Tcp(l), UpstreamAddr::Tcp(a))
            }
        };
        listener.set_nonblocking(true);
        let script = Arc::new(self.script);
        let sh = shared.clone();
        let accept = thread::Builder::new()
            .name("upstream-accept".into())
            .spawn(move || accept_loop(listener, sh, script))
            .expect("spawn");
        Upstream {
            shared,
            addr,
            accept: Some(accept),
        }
    }
}

#[derive(Clone, Debug)]
pub enum UpstreamAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A running upstream server; stops on drop.
pub struct Upstream {
    shared: Arc<Shared>,
    addr: UpstreamAddr,
    accept: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn builder() -> UpstreamBuilder {
        UpstreamBuilder::default()
    }

    /// A default upstream.
    pub fn start() -> Upstream {
        UpstreamBuilder::default().start()
    }

    /// The value for the proxy's `OutAddress`.
    pub fn out_address(&self) -> String {
        match &self.addr {
            UpstreamAddr::Tcp(a) => a.to_string(),
            UpstreamAddr::Unix(p) => p.display().to_string(),
        }
    }

    pub fn port(&self) -> u16 {
        match &self.addr {
            UpstreamAddr::Tcp(a) => a.port(),
            UpstreamAddr::Unix(_) => 0,
        }
    }

    /// Runs `f` on the current state.
    pub fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.shared.lock())
    }

    /// Snapshot of all sessions.
    pub fn sessions(&self) -> Vec<Session> {
        self.with(|s| s.sessions.clone())
    }

    /// Waits (up to 5 s) for session `i` to exist and returns a snapshot of it.
    pub fn session(&self, i: usize) -> Session {
        assert!(
            self.wait(Duration::from_secs(5), |s| s.sessions.len() > i),
            "upstream session #{i} never opened (sessions: {})",
            self.with(|s| s.sessions.len())
        );
        self.with(|s| s.sessions[i].clone())
    }

    pub fn session_count(&self) -> usize {
        self.with(|s| s.sessions.len())
    }

    /// Waits until `cond` holds on the state; returns whether it did within `timeout`.
    pub fn wait(&self, timeout: Duration, mut cond: impl FnMut(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.shared.lock();
        loop {
            if cond(&guard) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .shared
                .cond
                .wait_timeout(guard, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn delivered(&self) -> Vec<Message> {
        self.with(|s| s.delivered())
    }

    pub fn messages(&self) -> Vec<Message> {
        self.with(|s| s.messages())
    }

    /// Waits for at least `n` accepted messages and returns all accepted messages.
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> Vec<Message> {
        let ok = self.wait(timeout, |s| s.delivered().len() >= n);
        let d = self.delivered();
        assert!(
            ok,
            "upstream got {} accepted message(s), expected {n}; sessions: {:#?}",
            d.len(),
            self.summary()
        );
        d
    }

    /// Waits for the one accepted message and returns it.
    pub fn expect_one(&self) -> Message {
        let d = self.wait_delivered(1, Duration::from_secs(10));
        assert_eq!(
            d.len(),
            1,
            "expected one accepted message: {:#?}",
            self.summary()
        );
        d.into_iter().next().unwrap_or_default()
    }

    /// Waits for session `i` to be closed.
    pub fn wait_closed(&self, i: usize, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.sessions.get(i).is_some_and(|x| x.closed()))
    }

    /// Waits until session `i` has received a command for which `pred` holds.
    pub fn wait_command(&self, i: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        self.wait(timeout, |s| {
            s.sessions
                .get(i)
                .is_some_and(|x| x.lines().iter().any(|l| pred(l)))
        })
    }

    /// After a grace period, asserts that no message and no DATA command arrived.
    pub fn assert_nothing_delivered(&self) {
        thread::sleep(Duration::from_millis(300));
        self.with(|s| {
            assert!(
                s.messages().is_empty(),
                "upstream unexpectedly received messages: {:#?}",
                s.messages()
            );
            assert!(
                !s.all_verbs().iter().any(|v| v == "DATA"),
                "upstream unexpectedly received DATA: {:?}",
                s.all_verbs()
            );
        });
    }

    /// A readable summary of every session (commands and messages), for failure output.
    pub fn summary(&self) -> Vec<String> {
        self.with(|s| {
            s.sessions
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    let msgs: Vec<String> = x
                        .messages
                        .iter()
                        .map(|m| {
                            format!(
                                "msg(complete={}, final={:?}, raw={})",
                                m.complete,
                                m.final_reply,
                                super::show(&m.raw)
                            )
                        })
                        .collect();
                    format!(
                        "session {i}: commands={:?} messages={msgs:?} closed={}",
                        x.lines(),
                        x.closed()
                    )
                })
                .collect()
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for c in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            c.shutdown();
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        if let UpstreamAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------------------------------

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self, on: bool) {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on).expect("nonblocking"),
            Listener::Unix(l) => l.set_nonblocking(on).expect("nonblocking"),
        }
    }

    fn accept(&self) -> io::Result<(Conn, Option<SocketAddr>)> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| (Conn::Tcp(s), Some(a))),
            Listener::Unix(l) => l.accept().map(|(s, _)| (Conn::Unix(s), None)),
        }
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn prepare(&self) -> io::Result<()> {
        let t = Some(Duration::from_secs(60));
        match self {
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn accept_loop(listener: Listener, shared: Arc<Shared>, script: Arc<Script>) {
    let mut workers = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((conn, peer)) => {
                if conn.prepare().is_err() {
                    continue;
                }
                if let Ok(c) = conn.try_clone() {
                    shared
                        .conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(c);
                }
                let mut index = 0;
                shared.update(|s| {
                    s.sessions.push(Session {
                        peer,
                        ..Session::new()
                    });
                    index = s.sessions.len() - 1;
                });
                let (sh, sc) = (shared.clone(), script.clone());
                workers.push(thread::spawn(move || serve(conn, index, sh, sc)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

/// Reads LF-terminated lines and allows pushing bytes back.
struct LineReader {
    conn: Conn,
    buf: Vec<u8>,
    /// Start of the unread part of `buf` (avoids shifting the buffer for every line).
    pos: usize,
}

impl LineReader {
    /// The next line (with its LF); a final partial line at EOF; `None` at EOF.
    fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let line = self.buf[self.pos..self.pos + i + 1].to_vec();
                self.pos += i + 1;
                return Some(line);
            }
            self.buf.drain(..self.pos);
            self.pos = 0;
            let mut chunk = [0u8; 65536];
            match self.conn.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    return if self.buf.is_empty() {
                        None
                    } else {
                        Some(std::mem::take(&mut self.buf))
                    };
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the peer has sent bytes not read as a line yet (looked at without waiting).
    fn has_unread(&self) -> bool {
        use std::os::fd::AsRawFd;
        if self.pos < self.buf.len() {
            return true;
        }
        let fd = match &self.conn {
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Unix(s) => s.as_raw_fd(),
        };
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        matches!(nix::sys::socket::recv(fd, &mut [0u8; 1], flags), Ok(n) if n > 0)
    }

    fn unread(&mut self, bytes: &[u8]) {
        let mut v = bytes.to_vec();
        v.extend_from_slice(&self.buf[self.pos..]);
        self.buf = v;
        self.pos = 0;
    }
}

struct Worker {
    index: usize,
    shared: Arc<Shared>,
    script: Arc<Script>,
    reader: LineReader,
    out: Conn,
}

fn serve(conn: Conn, index: usize, shared: Arc<Shared>, script: Arc<Script>) {
    let out = match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut w = Worker {
        index,
        shared,
        script,
        reader: LineReader {
            conn,
            buf: Vec::new(),
            pos: 0,
        },
        out,
    };
    let peer_closed = w.run();
    w.out.shutdown();
    w.shared.update(|s| {
        let sess = &mut s.sessions[index];
        sess.closed_at = Some(Instant::now());
        sess.peer_closed = peer_closed;
    });
}

impl Worker {
    /// Serves the session; returns true if the peer closed first.
    fn run(&mut self) -> bool {
        if self.script.close_on_connect {
            return false;
        }
        let banner = self
            .scripted("BANNER", b"")
            .unwrap_or_else(|| self.script.banner.clone());
        if !self.perform_for(b"BANNER", &banner) {
            return false;
        }
        loop {
            let Some(line) = self.reader.line() else {
                return true;
            };
            self.shared.update(|s| {
                let sess = &mut s.sessions[self.index];
                sess.commands.push(line.clone());
                sess.command_times.push(Instant::now());
                sess.transcript.push(Event::Command(line.clone()));
            });
            match self.handle(&line) {
                Flow::Continue => {}
                Flow::Stop => return false,
                Flow::PeerClosed => return true,
            }
        }
    }

    /// The scripted reply for `key`, if any (counting occurrences of `key`).
    fn scripted(&self, key: &str, line: &[u8]) -> Option<Reply> {
        let mut nth = 0;
        self.shared.update(|s| {
            let c = s.sessions[self.index]
                .counts
                .entry(key.to_string())
                .or_insert(0);
            *c += 1;
            nth = *c;
        });
        let h = self.script.handlers.get(key)?;
        h(&Call {
            line,
            nth,
            session: self.index,
        })
    }

    /// Sends a reply to `what` (a command line, or `BANNER`); false if the connection must
    /// end.
    fn perform_for(&mut self, what: &[u8], r: &Reply) -> bool {
        if !r.delay.is_zero() {
            thread::sleep(r.delay);
        }
        if r.wire.is_some() && self.reader.has_unread() {
            let what = String::from_utf8_lossy(what).trim_end().to_string();
            self.with_session(|s| s.sent_before_reply.push(what));
        }
        if let Some((after, bytes)) = &r.later {
            if let Ok(mut out) = self.out.try_clone() {
                let (after, bytes) = (*after, bytes.clone());
                thread::spawn(move || {
                    thread::sleep(after);
                    let _ = out.write_all(&bytes);
                });
            }
        }
        if let Some(w) = &r.wire {
            self.shared.update(|s| {
                s.sessions[self.index]
                    .transcript
                    .push(Event::Sent(w.clone()))
            });
            if self.out.write_all(w).is_err() {
                return false;
            }
        }
        !r.close
    }

    fn handle(&mut self, line: &[u8]) -> Flow {
        let verb = verb_of(line);
        let scripted = self.scripted(&verb, line);
        let (txn_from, has_rcpts) =
            self.with_session(|s| (s.txn_from.is_some(), !s.txn_rcpts.is_empty()));
        let host = self.script.ehlo_host.clone();
        let default = match verb.as_str() {
            "HELO" => format!("250 {host}"),
            "EHLO" => {
                let mut lines = vec![host];
                lines.extend(self.script.extensions.iter().cloned());
                let n = lines.len();
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}", if i + 1 < n { "-" } else { " " }))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            "MAIL" if txn_from => "503 5.5.1 Error: nested MAIL command".into(),
            "MAIL" => "250 2.1.0 Ok".into(),
            "RCPT" if !txn_from => "503 5.5.1 Error: need MAIL command".into(),
            "RCPT" => "250 2.1.5 Ok".into(),
            "DATA" if !txn_from => "503 5.5.1 Error: need RCPT command".into(),
            "DATA" if !has_rcpts => "554 5.5.1 Error: no valid recipients".into(),
            "DATA" => "354 End data with <CR><LF>.<CR><LF>".into(),
            "RSET" | "NOOP" | "XFORWARD" => "250 2.0.0 Ok".into(),
            "QUIT" => "221 2.0.0 Bye".into(),
            "XCLIENT" => format!("220 {host} ESMTP"),
            "AUTH" => "235 2.7.0 Authentication successful".into(),
            "VRFY" => "252 2.0.0 Cannot VRFY user".into(),
            "HELP" => "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY".into(),
            _ => "502 5.5.2 Error: command not recognized".into(),
        };
        let reply = scripted.unwrap_or_else(|| Reply::text(&default));
        if !self.perform_for(line, &reply) {
            return Flow::Stop;
        }
        let positive = reply.first_digit() == Some(b'2');
        match verb.as_str() {
            "HELO" | "EHLO" | "RSET" | "XCLIENT" if positive => self.with_session(|s| {
                s.txn_from = None;
                s.txn_rcpts.clear();
            }),
            "MAIL" if positive => self.with_session(|s| {
                s.txn_from = Some(line.to_vec());
                s.txn_rcpts.clear();
            }),
            "RCPT" if positive => self.with_session(|s| s.txn_rcpts.push(line.to_vec())),
            "DATA" if reply.first_digit() == Some(b'3') => return self.read_data(),
            "QUIT" => return Flow::Stop,
            _ => {}
        }
        Flow::Continue
    }

    fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> T) -> T {
        let mut out = None;
        self.shared
            .update(|s| out = Some(f(&mut s.sessions[self.index])));
        out.expect("session update")
    }

    fn read_data(&mut self) -> Flow {
        let patterns: &[&[u8]] = if self.script.lenient_data_end {
            &[b"\r\n.\r\n", b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r"]
        } else {
            &[b"\r\n.\r\n"]
        };
        let msg_index = self.with_session(|s| {
            s.messages.push(Message {
                mail_from: s.txn_from.clone().unwrap_or_default(),
                rcpts: s.txn_rcpts.clone(),
                ..Message::default()
            });
            s.transcript.push(Event::Data(s.messages.len() - 1));
            s.messages.len() - 1
        });
        // A virtual CRLF in front lets the marker match at the very start of the data.
        let mut data: Vec<u8> = b"\r\n".to_vec();
        loop {
            let Some(line) = self.reader.line() else {
                self.with_session(|s| {
                    let m = &mut s.messages[msg_index];
                    m.raw = data[2..].to_vec();
                    m.content = super::unstuff(&m.raw);
                });
                return Flow::PeerClosed;
            };
            let scan_from = data.len().saturating_sub(4);
            data.extend_from_slice(&line);
            let found = patterns
                .iter()
                .filter_map(|p| find(&data[scan_from..], p).map(|i| (scan_from + i, *p)))
                .min_by_key(|&(i, p)| (i, std::cmp::Reverse(p.len())));
            if let Some((at, pat)) = found {
                let dot = pat.iter().position(|&b| b == b'.').unwrap_or(0);
                let end = (at + dot).max(2);
                let rest = data[at + pat.len()..].to_vec();
                self.reader.unread(&rest);
                let raw = data[2..end].to_vec();
                self.with_session(|s| {
                    let m = &mut s.messages[msg_index];
                    m.content = super::unstuff(&raw);
                    m.raw = raw;
                    m.complete = true;
                });
                break;
            }
        }
        let content = self.with_session(|s| s.messages[msg_index].content.clone());
        let reply = self.scripted("DATA_END", &content).unwrap_or_else(|| {
            let mut id = 0;
            self.shared.update(|s| {
                s.queue_id += 1;
                id = s.queue_id;
            });
            Reply::text(&format!("250 2.0.0 Ok: queued as UP{id:04}"))
        });
        let text = reply
            .wire
            .as_ref()
            .map(|w| String::from_utf8_lossy(w).trim_end().to_string());
        if !reply.delay.is_zero() {
            thread::sleep(reply.delay);
        }
        self.with_session(|s| {
            s.messages[msg_index].final_reply = text;
            s.txn_from = None;
            s.txn_rcpts.clear();
        });
        if self.perform_for(
            b"DATA_END",
            &Reply {
                delay: Duration::ZERO,
                ..reply
            },
        ) {
            Flow::Continue
        } else {
            Flow::Stop
        }
    }
}

enum Flow {
    Continue,
    Stop,
    PeerClosed,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
