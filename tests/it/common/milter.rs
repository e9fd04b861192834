//! A scriptable milter on a loopback TCP socket (or a unix socket): it answers option
//! negotiation, then each command with scripted actions (continue when nothing is
//! scripted), and records every packet it receives, per connection.
//!
//! Scripts are per command byte (`b'M'` for MAIL, `b'R'` for RCPT, ...; libmilter's
//! `SMFIC_*`); each time that command arrives the next scripted answer is used, the last
//! one repeating. Macro packets (`D`), abort (`A`) and quit (`Q`) get no answer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// One step of an answer.
#[derive(Clone, Debug)]
pub enum Act {
    /// A packet: command byte and data.
    Packet(u8, Vec<u8>),
    /// Bytes as given (a malformed packet).
    Raw(Vec<u8>),
    Sleep(Duration),
    /// Close the connection.
    Close,
}

impl Act {
    /// A reply without data: `b'c'` continue, `b'a'` accept, `b'r'` reject, `b't'`
    /// tempfail, `b'd'` discard, `b'p'` progress.
    pub fn reply(command: u8) -> Act {
        Act::Packet(command, Vec::new())
    }

    /// `SMFIR_REPLYCODE` with this reply text (NUL added).
    pub fn reply_code(text: &str) -> Act {
        let mut data = text.as_bytes().to_vec();
        data.push(0);
        Act::Packet(b'y', data)
    }
}

/// The answers a test milter gives.
#[derive(Clone, Debug, Default)]
pub struct Script {
    answers: HashMap<u8, Vec<Vec<Act>>>,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    /// Answers the next arrival of `command` with `acts` (the last answer scripted for a
    /// command repeats).
    pub fn on(mut self, command: u8, acts: Vec<Act>) -> Script {
        self.answers.entry(command).or_default().push(acts);
        self
    }

    /// The negotiation answer: version 6 with these actions and protocol flags.
    pub fn negotiate(self, actions: u32, protocol: u32) -> Script {
        let mut data = Vec::new();
        for word in [6u32, actions, protocol] {
            data.extend_from_slice(&word.to_be_bytes());
        }
        self.on(b'O', vec![Act::Packet(b'O', data)])
    }
}

/// A received packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub command: u8,
    pub data: Vec<u8>,
}

pub struct TestMilter {
    /// `inet:127.0.0.1:port` or `unix:/path`, as the `Milters` setting takes it.
    pub address: String,
    /// Packets per connection, in arrival order.
    log: Arc<Mutex<Vec<Vec<Received>>>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestMilter {
    /// Listens on 127.0.0.1, an ephemeral port.
    pub fn start(script: Script) -> TestMilter {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test milter");
        let addr: SocketAddr = listener.local_addr().unwrap();
        TestMilter {
            address: format!("inet:{addr}"),
            log: accept_all(move || listener.accept().map(|(s, _)| s), script),
            _dir: None,
        }
    }

    /// Listens on a unix socket in a temporary directory.
    pub fn start_unix(script: Script) -> TestMilter {
        let dir = tempfile::tempdir().expect("temp dir");
        let path: PathBuf = dir.path().join("milter.sock");
        let listener = UnixListener::bind(&path).expect("bind test milter socket");
        TestMilter {
            address: format!("unix:{}", path.display()),
            log: accept_all(move || listener.accept().map(|(s, _)| s), script),
            _dir: Some(dir),
        }
    }

    /// What each connection received so far.
    pub fn received(&self) -> Vec<Vec<Received>> {
        self.log.lock().unwrap().clone()
    }

    /// The command bytes each connection received, as a string per connection
    /// (`"OCDHDM"`).
    pub fn commands(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|c| c.iter().map(|p| char::from(p.command)).collect())
            .collect()
    }
}

/// Serves every connection `accept` returns, each on its own thread with `script`; the log
/// they all record to.
fn accept_all<S: Read + Write + Send + 'static>(
    mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
    script: Script,
) -> Log {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let shared = log.clone();
    thread::spawn(move || {
        while let Ok(stream) = accept() {
            let (script, log) = (script.clone(), shared.clone());
            thread::spawn(move || serve(stream, script, log));
        }
    });
    log
}

/// Packets per connection, in arrival order.
type Log = Arc<Mutex<Vec<Vec<Received>>>>;

fn serve<S: Read + Write>(mut stream: S, script: Script, log: Arc<Mutex<Vec<Vec<Received>>>>) {
    let index = {
        let mut log = log.lock().unwrap();
        log.push(Vec::new());
        log.len() - 1
    };
    let mut seen: HashMap<u8, usize> = HashMap::new();
    loop {
        let mut header = [0u8; 4];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let len = u32::from_be_bytes(header) as usize;
        if len == 0 || len > 1 << 20 {
            return;
        }
        let mut packet = vec![0u8; len];
        if stream.read_exact(&mut packet).is_err() {
            return;
        }
        let command = packet[0];
        log.lock().unwrap()[index].push(Received {
            command,
            data: packet[1..].to_vec(),
        });
        let acts = match script.answers.get(&command) {
            Some(answers) => {
                let n = seen.entry(command).or_default();
                let acts = answers[(*n).min(answers.len() - 1)].clone();
                *n += 1;
                acts
            }
            None => match command {
                b'D' | b'A' => continue,
                b'Q' => return,
                b'O' => {
                    let mut data = Vec::new();
                    for word in [6u32, 0, 0] {
                        data.extend_from_slice(&word.to_be_bytes());
                    }
                    vec![Act::Packet(b'O', data)]
                }
                _ => vec![Act::reply(b'c')],
            },
        };
        for act in acts {
            let ok = match act {
                Act::Packet(c, data) => {
                    let mut out = ((data.len() + 1) as u32).to_be_bytes().to_vec();
                    out.push(c);
                    out.extend_from_slice(&data);
                    stream.write_all(&out).is_ok()
                }
                Act::Raw(bytes) => stream.write_all(&bytes).is_ok(),
                Act::Sleep(d) => {
                    thread::sleep(d);
                    true
                }
                Act::Close => return,
            };
            if !ok {
                return;
            }
        }
    }
}
