//! A raw SMTP client: sends bytes as given and reads complete (multi-line) replies.
//! Every read has a deadline, so a silent or stuck proxy fails the test instead of hanging it.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Default limit for one reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One complete SMTP reply.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text after `NNN-` / `NNN ` of each line, without the line end.
    pub lines: Vec<String>,
    /// The reply exactly as received.
    pub raw: Vec<u8>,
}

impl Reply {
    /// The lines' texts joined with LF.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    pub fn is_multiline(&self) -> bool {
        self.lines.len() > 1
    }

    /// The first word of each line after the first (EHLO keywords), upper case.
    pub fn keywords(&self) -> Vec<String> {
        self.lines
            .iter()
            .skip(1)
            .map(|l| {
                l.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_uppercase()
            })
            .collect()
    }

    pub fn raw_str(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reply({})", super::show(&self.raw))
    }
}

/// Why no reply could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection; `partial` holds what had arrived of the reply.
    Closed {
        partial: Vec<u8>,
    },
    /// Nothing complete arrived in time.
    Timeout {
        partial: Vec<u8>,
    },
    /// A line that is not `NNN`, `NNN text` or `NNN-text`.
    Malformed {
        line: Vec<u8>,
    },
    Io(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Closed { partial } => {
                write!(
                    f,
                    "connection closed by peer (partial reply {})",
                    super::show(partial)
                )
            }
            ReadError::Timeout { partial } => {
                write!(
                    f,
                    "timed out waiting for a reply (partial {})",
                    super::show(partial)
                )
            }
            ReadError::Malformed { line } => {
                write!(f, "malformed reply line {}", super::show(line))
            }
            ReadError::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

/// Replies of one MAIL/RCPT/DATA/body transaction.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub mail: Reply,
    pub rcpts: Vec<Reply>,
    pub data: Reply,
    pub final_reply: Reply,
}

pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
    timeout: Duration,
    /// Everything received so far, in order (for debugging assertion messages).
    received: Vec<u8>,
}

impl Client {
    /// Connects; panics if the connection is refused.
    pub fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            stream,
            buf: Vec::new(),
            eof: false,
            timeout: REPLY_TIMEOUT,
            received: Vec::new(),
        })
    }

    /// Connects, expects a 220 greeting and a 250 EHLO reply.
    pub fn open(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        let g = c.greeting();
        assert_eq!(g.code, 220, "greeting: {g:?}");
        let e = c.cmd("EHLO client.example");
        assert_eq!(e.code, 250, "EHLO: {e:?}");
        c
    }

    /// Sets the limit for each following reply.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local_addr")
    }

    pub fn send(&mut self, data: impl AsRef<[u8]>) {
        let data = data.as_ref();
        self.try_send(data)
            .unwrap_or_else(|e| panic!("send {}: {e}", super::show(data)));
    }

    pub fn try_send(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)?;
        self.stream.flush()
    }

    /// Sends a command line (CRLF appended) and reads its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n"));
        self.reply_to(line)
    }

    pub fn greeting(&mut self) -> Reply {
        self.reply_to("(greeting)")
    }

    /// Reads one complete reply; panics on EOF, timeout or a malformed line.
    pub fn reply(&mut self) -> Reply {
        self.reply_to("(previous input)")
    }

    fn reply_to(&mut self, what: &str) -> Reply {
        match self.try_reply() {
            Ok(r) => r,
            Err(e) => panic!(
                "reply to {what}: {e}; everything received: {}",
                super::show(&self.received)
            ),
        }
    }

    /// Reads one complete reply within the client's timeout.
    pub fn try_reply(&mut self) -> Result<Reply, ReadError> {
        let deadline = Instant::now() + self.timeout;
        let mut raw = Vec::new();
        let mut lines = Vec::new();
        loop {
            let line = match self.read_line(deadline) {
                Ok(l) => l,
                Err(ReadError::Closed { partial }) => {
                    raw.extend_from_slice(&partial);
                    return Err(ReadError::Closed { partial: raw });
                }
                Err(ReadError::Timeout { partial }) => {
                    raw.extend_from_slice(&partial);
                    return Err(ReadError::Timeout { partial: raw });
                }
                Err(e) => return Err(e),
            };
            raw.extend_from_slice(&line);
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            let ok_code = text.len() >= 3 && text[..3].iter().all(u8::is_ascii_digit);
            let sep = text.get(3).copied();
            if !ok_code || !matches!(sep, None | Some(b' ') | Some(b'-')) {
                return Err(ReadError::Malformed { line });
            }
            lines.push(String::from_utf8_lossy(text.get(4..).unwrap_or(b"")).into_owned());
            if sep != Some(b'-') {
                let code = std::str::from_utf8(&text[..3])
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0);
                return Ok(Reply { code, lines, raw });
            }
        }
    }

    /// Reads one line (up to and including LF) before `deadline`.
    pub fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.drain(..=i).collect());
            }
            if self.eof {
                return Err(ReadError::Closed {
                    partial: std::mem::take(&mut self.buf),
                });
            }
            match self.fill(deadline) {
                Ok(()) => {}
                Err(FillError::Timeout) => {
                    return Err(ReadError::Timeout {
                        partial: std::mem::take(&mut self.buf),
                    })
                }
                Err(FillError::Io(e)) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Reads more bytes into the buffer; sets `eof` on end of stream or reset.
    fn fill(&mut self, deadline: Instant) -> Result<(), FillError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FillError::Timeout);
        }
        self.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| FillError::Io(e.to_string()))?;
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.eof = true;
                Ok(())
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.received.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(FillError::Timeout)
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                self.eof = true;
                Ok(())
            }
            Err(e) => Err(FillError::Io(e.to_string())),
        }
    }

    /// Waits until the peer closes the connection. Data arriving meanwhile is kept and can
    /// be read with [`Client::pending`]. Returns false if the connection is still open.
    pub fn wait_eof(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.eof {
            match self.fill(deadline) {
                Ok(()) => {}
                Err(FillError::Timeout) => return false,
                Err(FillError::Io(_)) => return true,
            }
        }
        true
    }

    /// Bytes received but not consumed as replies yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Everything received on this connection so far.
    pub fn received(&self) -> &[u8] {
        &self.received
    }

    /// Panics if any byte arrives within `dur` (e.g. a leaked or premature reply).
    pub fn assert_silent(&mut self, dur: Duration) {
        let deadline = Instant::now() + dur;
        while self.buf.is_empty() && !self.eof {
            match self.fill(deadline) {
                Ok(()) => {}
                Err(_) => break,
            }
        }
        assert!(
            self.buf.is_empty(),
            "expected silence but received {}",
            super::show(&self.buf)
        );
        assert!(!self.eof, "expected silence but the connection was closed");
    }

    /// MAIL, RCPT..., DATA (each must succeed), then the stuffed content; returns all replies.
    pub fn transaction(&mut self, from: &str, rcpts: &[&str], content: &[u8]) -> Transaction {
        let mail = self.cmd(&format!("MAIL FROM:{from}"));
        assert_eq!(mail.code, 250, "MAIL FROM:{from}: {mail:?}");
        let mut rr = Vec::new();
        for r in rcpts {
            let reply = self.cmd(&format!("RCPT TO:{r}"));
            assert_eq!(reply.code, 250, "RCPT TO:{r}: {reply:?}");
            rr.push(reply);
        }
        let data = self.cmd("DATA");
        assert_eq!(data.code, 354, "DATA: {data:?}");
        self.send(super::stuff(content));
        let final_reply = self.reply_to("(end of data)");
        Transaction {
            mail,
            rcpts: rr,
            data,
            final_reply,
        }
    }

    /// The default envelope (alice -> bob) with `content`; returns the final reply.
    pub fn send_mail(&mut self, content: &[u8]) -> Reply {
        self.transaction("<alice@example.org>", &["<bob@example.net>"], content)
            .final_reply
    }

    /// MAIL FROM alice and RCPT TO bob (replies not checked), then DATA, which must get 354.
    pub fn begin_data(&mut self) {
        self.cmd("MAIL FROM:<alice@example.org>");
        self.cmd("RCPT TO:<bob@example.net>");
        let d = self.cmd("DATA");
        assert_eq!(d.code, 354, "DATA: {d:?}");
    }

    /// Sends `content` dot-stuffed with the end-of-data marker (after DATA's 354) and
    /// reads the final reply.
    pub fn body(&mut self, content: &[u8]) -> Reply {
        self.send(super::stuff(content));
        self.reply()
    }

    /// Asserts that the connection is still in step: a NOOP gets the proxy's own 250.
    pub fn assert_in_sync(&mut self) {
        assert_eq!(
            self.cmd("NOOP").raw_str(),
            "250 2.0.0 Ok\r\n",
            "out of sync"
        );
    }

    /// Closes our sending side (the peer sees EOF) but keeps reading possible.
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Drops the connection at once.
    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

enum FillError {
    Timeout,
    Io(String),
}
