//! TLS end to end, with real TLS on both sides: STARTTLS from swaks and from a rustls
//! client, the RFC 3207 restart, the STARTTLS command-injection case, TlsRequired,
//! certificate reload (a good, then a broken pair), the implicit-TLS listener, and the
//! proxy's own STARTTLS towards a rustls upstream with a trusted and an untrusted
//! certificate. Every certificate is generated here; no key is kept anywhere.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConnection, RootCertStore, ServerConnection, StreamOwned};

use crate::common::metrics::metric;
use crate::common::peers::swaks;
use crate::common::proxy::{free_port, is_listening};
use crate::common::{
    default_message, secs, stuff, timed, wait_until, Proxy, ProxyBuilder, Upstream,
};

// ---------------------------------------------------------------------------------------
// Certificates.

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, PEM and DER.
#[derive(Clone)]
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn leaf(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A client configuration trusting only this CA.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.der()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Leaf {
    /// Writes `<name>.crt` and `<name>.key` into `dir`.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let chain = vec![CertificateDer::from(self.der.clone())];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap(),
        )
    }
}

/// A proxy builder with a certificate for `localhost` and the CA that signed it.
fn with_certificate(b: ProxyBuilder) -> (ProxyBuilder, Ca, Leaf) {
    let ca = Ca::new("proxsmtpd test CA");
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let (cert, key) = leaf.write(b.dir(), "tls");
    let b = b
        .set("TlsCertificate", &cert.display().to_string())
        .set("TlsKey", &key.display().to_string());
    (b, ca, leaf)
}

// ---------------------------------------------------------------------------------------
// A stream that starts in clear text and may turn into TLS, on either side.

enum Io {
    Plain(TcpStream),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    Gone,
}

impl Io {
    fn is_tls(&self) -> bool {
        matches!(self, Io::Client(_) | Io::Server(_))
    }

    fn tcp(self) -> TcpStream {
        match self {
            Io::Plain(s) => s,
            _ => panic!("not a clear-text stream"),
        }
    }

    /// Turns a clear-text stream into a TLS client and completes the handshake.
    fn start_client(&mut self, config: Arc<rustls::ClientConfig>, name: &str) -> io::Result<()> {
        let mut tcp = std::mem::replace(self, Io::Gone).tcp();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        *self = Io::Client(Box::new(StreamOwned::new(conn, tcp)));
        Ok(())
    }

    fn start_server(&mut self, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let mut tcp = std::mem::replace(self, Io::Gone).tcp();
        let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        *self = Io::Server(Box::new(StreamOwned::new(conn, tcp)));
        Ok(())
    }

    fn peer_certificate(&self) -> Option<Vec<u8>> {
        match self {
            Io::Client(s) => s.conn.peer_certificates()?.first().map(|c| c.to_vec()),
            _ => None,
        }
    }
}

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Client(s) => s.read(buf),
            Io::Server(s) => s.read(buf),
            Io::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.write(buf),
            Io::Client(s) => s.write(buf),
            Io::Server(s) => s.write(buf),
            Io::Gone => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Io::Plain(s) => s.flush(),
            Io::Client(s) => s.flush(),
            Io::Server(s) => s.flush(),
            Io::Gone => Ok(()),
        }
    }
}

/// Reads one line, a byte at a time so that nothing after it is taken from the socket
/// (the bytes after a 220 to STARTTLS belong to the handshake).
fn read_line(io: &mut Io) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match io.read(&mut byte)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                line.push(byte[0]);
                if byte[0] == b'\n' {
                    return Ok(String::from_utf8_lossy(&line).into_owned());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// An SMTP client that can start TLS.

struct TlsClient {
    io: Io,
}

/// A complete reply: its code and its lines (without code and separator).
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn has(&self, keyword: &str) -> bool {
        self.lines.iter().any(|l| l.eq_ignore_ascii_case(keyword))
    }
}

impl TlsClient {
    fn connect(addr: SocketAddr) -> TlsClient {
        let tcp = TcpStream::connect_timeout(&addr, secs(5)).expect("connect");
        tcp.set_read_timeout(Some(secs(20))).unwrap();
        tcp.set_write_timeout(Some(secs(20))).unwrap();
        TlsClient { io: Io::Plain(tcp) }
    }

    /// Connects to an implicit-TLS port and completes the handshake.
    fn connect_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> io::Result<TlsClient> {
        let mut c = TlsClient::connect(addr);
        c.io.start_client(config, "localhost")?;
        Ok(c)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).expect("send");
        self.io.flush().expect("flush");
    }

    fn try_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let line = read_line(&mut self.io)?;
            let text = line.trim_end_matches(['\r', '\n']);
            let code: u16 = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            lines.push(text.get(4..).unwrap_or("").to_string());
            if text.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply { code, lines });
            }
        }
    }

    fn reply(&mut self) -> Reply {
        self.try_reply().expect("reply")
    }

    fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// STARTTLS, its 220, and the handshake.
    fn starttls(&mut self, config: Arc<rustls::ClientConfig>) {
        let r = self.cmd("STARTTLS");
        assert_eq!(
            (r.code, r.lines[0].as_str()),
            (220, "2.0.0 Ready to start TLS")
        );
        self.io
            .start_client(config, "localhost")
            .expect("TLS handshake with the proxy");
    }

    /// A whole transaction; returns the final reply.
    fn mail(&mut self, from: &str, to: &str) -> Reply {
        assert_eq!(self.cmd(&format!("MAIL FROM:<{from}>")).code, 250);
        assert_eq!(self.cmd(&format!("RCPT TO:<{to}>")).code, 250);
        assert_eq!(self.cmd("DATA").code, 354);
        self.send(&stuff(&default_message()));
        self.reply()
    }
}

// ---------------------------------------------------------------------------------------
// A small upstream SMTP server that offers STARTTLS with its own certificate.

#[derive(Debug, Clone, Default)]
struct UpSession {
    /// Each command line, and whether it came under TLS.
    commands: Vec<(bool, String)>,
    messages: Vec<Vec<u8>>,
    handshake_failed: bool,
}

#[derive(Clone)]
struct TlsUpstream {
    port: u16,
    sessions: Arc<Mutex<Vec<UpSession>>>,
}

impl TlsUpstream {
    fn start(leaf: &Leaf, offer_starttls: bool) -> TlsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sessions = Arc::new(Mutex::new(Vec::new()));
        let config = leaf.server_config();
        let up = TlsUpstream { port, sessions };
        let shared = up.sessions.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let index = {
                    let mut s = shared.lock().unwrap();
                    s.push(UpSession::default());
                    s.len() - 1
                };
                let (shared, config) = (shared.clone(), config.clone());
                thread::spawn(move || {
                    serve_upstream(stream, index, &shared, config, offer_starttls);
                });
            }
        });
        up
    }

    fn out_address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn sessions(&self) -> Vec<UpSession> {
        self.sessions.lock().unwrap().clone()
    }

    fn wait_messages(&self, n: usize) -> Vec<Vec<u8>> {
        wait_until(secs(10), || {
            self.sessions()
                .iter()
                .map(|s| s.messages.len())
                .sum::<usize>()
                >= n
        });
        self.sessions()
            .into_iter()
            .flat_map(|s| s.messages)
            .collect()
    }
}

fn serve_upstream(
    stream: TcpStream,
    index: usize,
    sessions: &Mutex<Vec<UpSession>>,
    config: Arc<rustls::ServerConfig>,
    offer_starttls: bool,
) {
    stream.set_read_timeout(Some(secs(30))).unwrap();
    let mut io = Io::Plain(stream);
    let record = |f: &dyn Fn(&mut UpSession)| f(&mut sessions.lock().unwrap()[index]);
    let send = |io: &mut Io, text: &str| {
        let _ = io.write_all(text.as_bytes());
        let _ = io.flush();
    };
    send(&mut io, "220 tls-upstream.test ESMTP\r\n");
    let mut in_mail = false;
    while let Ok(line) = read_line(&mut io) {
        let tls = io.is_tls();
        let command = line.trim_end().to_string();
        record(&|s| s.commands.push((tls, command.clone())));
        let verb = command
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                let starttls = if offer_starttls && !tls {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                let reply = format!(
                    "250-tls-upstream.test\r\n250-SIZE 1000000\r\n{starttls}250 8BITMIME\r\n"
                );
                send(&mut io, &reply);
            }
            "STARTTLS" if offer_starttls && !tls => {
                send(&mut io, "220 2.0.0 Ready to start TLS\r\n");
                if io.start_server(config.clone()).is_err() {
                    record(&|s| s.handshake_failed = true);
                    return;
                }
                in_mail = false;
            }
            "MAIL" => {
                in_mail = true;
                send(&mut io, "250 2.1.0 Ok\r\n");
            }
            "RCPT" if in_mail => send(&mut io, "250 2.1.5 Ok\r\n"),
            "RCPT" => send(&mut io, "503 5.5.1 Error: need MAIL command\r\n"),
            "DATA" => {
                send(&mut io, "354 End data with <CR><LF>.<CR><LF>\r\n");
                let mut message = Vec::new();
                loop {
                    let Ok(line) = read_line(&mut io) else { return };
                    if line == ".\r\n" {
                        break;
                    }
                    message.extend_from_slice(line.as_bytes());
                }
                record(&|s| s.messages.push(message.clone()));
                in_mail = false;
                send(&mut io, "250 2.0.0 Ok: queued\r\n");
            }
            "RSET" => {
                in_mail = false;
                send(&mut io, "250 2.0.0 Ok\r\n");
            }
            "QUIT" => {
                send(&mut io, "221 2.0.0 Bye\r\n");
                return;
            }
            "NOOP" => send(&mut io, "250 2.0.0 Ok\r\n"),
            _ => send(&mut io, "502 5.5.2 Error: command not recognized\r\n"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client side: STARTTLS.

#[test]
fn swaks_starttls_delivers_and_the_filter_sees_tls() {
    timed(60, || {
        let up = Upstream::start();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let (b, _ca, _leaf) = with_certificate(Proxy::builder().upstream(&up));
        let (script, recorder) = b.env_recorder();
        let p = b
            .set("FilterCommand", &script)
            .set("AdminListen", &admin.to_string())
            .start();
        let Some(out) = swaks(
            &p.addr(),
            &[
                "--tls",
                "--from",
                "alice@example.org",
                "--to",
                "bob@example.net",
            ],
        ) else {
            eprintln!("swaks is not installed: skipped");
            return;
        };
        let transcript = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "swaks failed:\n{transcript}");
        assert!(
            transcript.contains("TLS started"),
            "no TLS in:\n{transcript}"
        );
        assert_eq!(up.wait_delivered(1, secs(10)).len(), 1);

        let run = &recorder.wait_runs(1, secs(10))[0];
        assert_eq!(run.var("TLS"), Some("yes"));
        assert_eq!(run.var("TLS_VERSION"), Some("TLSv1.3"));
        assert!(
            run.var("TLS_CIPHER")
                .is_some_and(|c| c.starts_with("TLS13_")),
            "{:?}",
            run.var("TLS_CIPHER")
        );
        // The upstream never hears of the client's STARTTLS.
        up.session(0).assert_no_verb("STARTTLS");
        assert!(p.wait_log("client TLS established: TLSv1.3", secs(5)));
        metric("proxsmtpd_tls_sessions_total")
            .label("side", "client")
            .label("version", "TLSv1.3")
            .value(1.0)
            .assert_in(&admin);
    });
}

#[test]
fn rustls_client_starttls_and_delivery() {
    timed(60, || {
        let up = Upstream::start();
        let (b, ca, leaf) = with_certificate(Proxy::builder().upstream(&up));
        let (script, recorder) = b.env_recorder();
        let p = b.set("FilterCommand", &script).start();

        let mut c = TlsClient::connect(p.addr());
        assert_eq!(c.reply().code, 220);
        let ehlo = c.cmd("EHLO client.example");
        assert!(ehlo.has("STARTTLS"), "STARTTLS not offered: {ehlo:?}");
        c.starttls(ca.client_config());
        assert_eq!(c.io.peer_certificate(), Some(leaf.der.clone()));
        let ehlo = c.cmd("EHLO client.example");
        assert_eq!(ehlo.code, 250);
        assert!(!ehlo.has("STARTTLS"), "STARTTLS offered again: {ehlo:?}");
        assert_eq!(c.cmd("STARTTLS").code, 503);
        assert_eq!(c.mail("alice@example.org", "bob@example.net").code, 250);
        assert_eq!(c.cmd("QUIT").code, 221);

        assert_eq!(up.wait_delivered(1, secs(10)).len(), 1);
        let run = &recorder.wait_runs(1, secs(10))[0];
        assert_eq!(run.var("TLS"), Some("yes"));
        // Both EHLOs reach the upstream; the RSET of the restart comes between them.
        let verbs = up.session(0).verbs();
        assert_eq!(verbs[..3], ["EHLO", "RSET", "EHLO"], "{verbs:?}");
    });
}

#[test]
fn no_certificate_no_starttls() {
    timed(30, || {
        let up = Upstream::builder()
            .extensions(&["SIZE 1000", "STARTTLS"])
            .start();
        let p = Proxy::start(&up);
        let mut c = TlsClient::connect(p.addr());
        c.reply();
        let ehlo = c.cmd("EHLO client.example");
        assert!(!ehlo.has("STARTTLS"), "{ehlo:?}");
        let r = c.cmd("STARTTLS");
        assert_eq!(r.code, 502, "{r:?}");
        up.session(0).assert_no_verb("STARTTLS");
    });
}

#[test]
fn rfc3207_state_before_starttls_is_forgotten() {
    timed(60, || {
        let up = Upstream::start();
        let (b, ca, _leaf) = with_certificate(Proxy::builder().upstream(&up));
        let p = b.start();
        let mut c = TlsClient::connect(p.addr());
        c.reply();
        c.cmd("EHLO client.example");
        assert_eq!(c.cmd("MAIL FROM:<before@example.org>").code, 250);
        c.starttls(ca.client_config());
        assert_eq!(c.cmd("EHLO client.example").code, 250);
        // The MAIL given in clear text is gone: the upstream was told RSET at the restart
        // and answers the RCPT with 503.
        let r = c.cmd("RCPT TO:<bob@example.net>");
        assert_eq!(r.code, 503, "{r:?}");
        assert_eq!(c.cmd("QUIT").code, 221);
        assert!(up.wait_closed(0, secs(10)));
        up.assert_nothing_delivered();
        let lines = up.session(0).lines();
        let mail = lines.iter().position(|l| l.starts_with("MAIL")).unwrap();
        let rset = lines.iter().position(|l| l == "RSET").unwrap();
        let rcpt = lines.iter().position(|l| l.starts_with("RCPT")).unwrap();
        assert!(mail < rset && rset < rcpt, "{lines:?}");
    });
}

#[test]
fn commands_pipelined_behind_starttls_are_discarded() {
    timed(60, || {
        let up = Upstream::start();
        let (b, ca, _leaf) = with_certificate(Proxy::builder().upstream(&up));
        let p = b.start();
        let mut c = TlsClient::connect(p.addr());
        c.reply();
        c.cmd("EHLO client.example");
        // One packet: the MAIL is in clear text but would be read after the handshake.
        c.send(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n");
        let r = c.reply();
        assert_eq!(r.code, 220, "{r:?}");
        c.io.start_client(ca.client_config(), "localhost")
            .expect("handshake");
        assert_eq!(c.cmd("EHLO client.example").code, 250);
        let r = c.cmd("RCPT TO:<bob@example.net>");
        assert_eq!(r.code, 503, "the injected MAIL opened a transaction: {r:?}");
        assert_eq!(c.cmd("MAIL FROM:<good@example.org>").code, 250);
        assert_eq!(c.cmd("QUIT").code, 221);
        assert!(up.wait_closed(0, secs(10)));
        let lines = up.session(0).lines();
        assert!(
            !lines.iter().any(|l| l.contains("evil")),
            "the injected command reached the upstream: {lines:?}"
        );
        assert!(lines.iter().any(|l| l.contains("good@example.org")));
        assert!(p.wait_log("discarded", secs(5)));
    });
}

#[test]
fn tls_required_refuses_mail_before_starttls() {
    timed(60, || {
        let up = Upstream::start();
        let (b, ca, _leaf) = with_certificate(Proxy::builder().upstream(&up));
        let p = b.set("TlsRequired", "on").start();
        let mut c = TlsClient::connect(p.addr());
        c.reply();
        c.cmd("EHLO client.example");
        for command in [
            "MAIL FROM:<a@example.org>",
            "RCPT TO:<b@example.net>",
            "DATA",
        ] {
            let r = c.cmd(command);
            assert_eq!(
                (r.code, r.lines[0].as_str()),
                (530, "5.7.0 Must issue a STARTTLS command first"),
                "{command}"
            );
        }
        c.starttls(ca.client_config());
        c.cmd("EHLO client.example");
        assert_eq!(c.mail("alice@example.org", "bob@example.net").code, 250);
        assert_eq!(up.wait_delivered(1, secs(10)).len(), 1);
        let verbs = up.session(0).verbs();
        assert_eq!(
            verbs.iter().filter(|v| *v == "MAIL").count(),
            1,
            "a MAIL before TLS reached the upstream: {verbs:?}"
        );
    });
}

#[test]
fn implicit_tls_listener() {
    timed(60, || {
        let up = Upstream::start();
        let tls_port = free_port();
        let (b, ca, leaf) = with_certificate(Proxy::builder().upstream(&up));
        let (script, recorder) = b.env_recorder();
        let p = b
            .set("FilterCommand", &script)
            .set("TlsListen", &format!("127.0.0.1:{tls_port}"))
            .start();
        assert!(wait_until(secs(10), || is_listening(tls_port)));
        let addr = SocketAddr::from(([127, 0, 0, 1], tls_port));

        let mut c = TlsClient::connect_tls(addr, ca.client_config()).expect("handshake");
        assert_eq!(c.io.peer_certificate(), Some(leaf.der.clone()));
        let greeting = c.reply();
        assert_eq!(
            (greeting.code, greeting.lines[0].as_str()),
            (220, "smtp.passthru")
        );
        let ehlo = c.cmd("EHLO client.example");
        assert!(!ehlo.has("STARTTLS"), "{ehlo:?}");
        assert_eq!(c.cmd("STARTTLS").code, 503);
        assert_eq!(c.mail("alice@example.org", "bob@example.net").code, 250);
        assert_eq!(up.wait_delivered(1, secs(10)).len(), 1);
        assert_eq!(recorder.wait_runs(1, secs(10))[0].var("TLS"), Some("yes"));

        // The plain listener still offers STARTTLS.
        let mut plain = TlsClient::connect(p.addr());
        plain.reply();
        assert!(plain.cmd("EHLO client.example").has("STARTTLS"));

        // A clear-text client on the TLS port gets nothing it could take for SMTP.
        let mut wrong = TlsClient::connect(addr);
        wrong.send(b"EHLO client.example\r\n");
        let answer = wrong.try_reply();
        assert!(answer.as_ref().map_or(true, |r| r.code == 0), "{answer:?}");
        assert!(p.wait_log("client TLS handshake failed", secs(5)));

        if let Some(out) = swaks(
            &addr,
            &[
                "--tlsc",
                "--from",
                "alice@example.org",
                "--to",
                "bob@example.net",
            ],
        ) {
            let transcript = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "swaks failed:\n{transcript}");
            assert_eq!(up.wait_delivered(2, secs(10)).len(), 2);
        }
    });
}

/// Points `tls.crt` and `tls.key` through a `..data` symlink, as a Secret volume does,
/// and swaps it to `version`.
fn swap_secret(dir: &Path, version: &str, cert: &str, key: &str) {
    let v = dir.join(format!("..{version}"));
    std::fs::create_dir(&v).unwrap();
    std::fs::write(v.join("tls.crt"), cert).unwrap();
    std::fs::write(v.join("tls.key"), key).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

#[test]
fn certificate_reload_good_then_broken() {
    timed(90, || {
        let up = Upstream::start();
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let ca = Ca::new("proxsmtpd test CA");
        let first = ca.leaf(&["localhost"]);
        let second = ca.leaf(&["localhost"]);
        let b = Proxy::builder().upstream(&up);
        let secret = b.dir().join("secret");
        std::fs::create_dir(&secret).unwrap();
        swap_secret(&secret, "v1", &first.cert_pem, &first.key_pem);
        let p = b
            .set(
                "TlsCertificate",
                &secret.join("tls.crt").display().to_string(),
            )
            .set("TlsKey", &secret.join("tls.key").display().to_string())
            .set("AdminListen", &admin.to_string())
            .start();

        let served = || {
            let mut c = TlsClient::connect(p.addr());
            c.reply();
            c.cmd("EHLO client.example");
            c.starttls(ca.client_config());
            c.io.peer_certificate()
        };
        assert_eq!(served(), Some(first.der.clone()));

        swap_secret(&secret, "v2", &second.cert_pem, &second.key_pem);
        assert!(
            wait_until(secs(15), || served() == Some(second.der.clone())),
            "the new certificate was not picked up; log:\n{}",
            p.log()
        );

        // A broken certificate is refused and the running one stays.
        swap_secret(
            &secret,
            "v3",
            "-----BEGIN CERTIFICATE-----\nbroken\n",
            &second.key_pem,
        );
        assert!(
            p.wait_log("keeping the running certificate", secs(15)),
            "{}",
            p.log()
        );
        assert_eq!(served(), Some(second.der.clone()));
        // So is a key that does not belong to the certificate.
        swap_secret(&secret, "v4", &first.cert_pem, &second.key_pem);
        metric("proxsmtpd_tls_certificate_reloads_total")
            .label("result", "failure")
            .value(2.0)
            .timeout(secs(15))
            .assert_in(&admin);
        assert_eq!(served(), Some(second.der.clone()));
        metric("proxsmtpd_tls_certificate_reloads_total")
            .label("result", "success")
            .value(1.0)
            .assert_in(&admin);
    });
}

#[test]
fn broken_certificate_stops_the_start() {
    timed(30, || {
        let up = Upstream::start();
        let b = Proxy::builder().upstream(&up);
        let cert = b.dir().join("tls.crt");
        std::fs::write(&cert, "not a certificate\n").unwrap();
        let leaf = Ca::new("x").leaf(&["localhost"]);
        let key = b.dir().join("tls.key");
        std::fs::write(&key, &leaf.key_pem).unwrap();
        let started = b
            .set("TlsCertificate", &cert.display().to_string())
            .set("TlsKey", &key.display().to_string())
            .try_start();
        let Err(log) = started else {
            panic!("started with a broken certificate");
        };
        assert!(log.contains("no PEM certificate found"), "{log}");
    });
}

// ---------------------------------------------------------------------------------------
// Upstream side: the proxy's own STARTTLS.

/// A proxy in clear text towards the client, TLS towards `up`.
fn upstream_tls_proxy(up: &TlsUpstream, mode: &str, extra: &[(&str, &str)]) -> Proxy {
    let mut b = Proxy::builder()
        .set("OutAddress", &up.out_address())
        .set("UpstreamTls", mode);
    for (k, v) in extra {
        b = b.set(k, v);
    }
    b.start()
}

fn deliver_plain(p: &Proxy) -> Reply {
    let mut c = TlsClient::connect(p.addr());
    let greeting = c.reply();
    if greeting.code != 220 {
        return greeting;
    }
    assert_eq!(greeting.lines, ["smtp.passthru"]);
    let ehlo = c.cmd("EHLO client.example");
    assert!(!ehlo.has("STARTTLS"), "{ehlo:?}");
    let r = c.mail("alice@example.org", "bob@example.net");
    c.cmd("QUIT");
    r
}

#[test]
fn upstream_starttls_with_a_verified_certificate() {
    timed(60, || {
        let ca = Ca::new("upstream CA");
        let up = TlsUpstream::start(&ca.leaf(&["localhost", "127.0.0.1"]), true);
        let dir = tempfile::tempdir().unwrap();
        let ca_file = ca.write(dir.path(), "ca.pem");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let p = upstream_tls_proxy(
            &up,
            "required",
            &[
                ("UpstreamTlsCa", &ca_file.display().to_string()),
                ("AdminListen", &admin.to_string()),
            ],
        );
        assert_eq!(deliver_plain(&p).code, 250);
        assert_eq!(up.wait_messages(1).len(), 1);
        let session = &up.sessions()[0];
        let verbs: Vec<(bool, String)> = session
            .commands
            .iter()
            .map(|(tls, c)| (*tls, c.split_whitespace().next().unwrap_or("").to_string()))
            .collect();
        let expect = [
            (false, "EHLO"),
            (false, "STARTTLS"),
            (true, "EHLO"),
            (true, "MAIL"),
            (true, "RCPT"),
            (true, "DATA"),
        ];
        let got: Vec<(bool, &str)> = verbs.iter().map(|(t, v)| (*t, v.as_str())).collect();
        assert_eq!(got[..expect.len()], expect, "{:?}", session.commands);
        assert_eq!(
            session.commands[2].1, "EHLO client.example",
            "the client's own EHLO"
        );
        assert!(p.wait_log("upstream TLS established", secs(5)));
        metric("proxsmtpd_tls_sessions_total")
            .label("side", "upstream")
            .value(1.0)
            .assert_in(&admin);
    });
}

#[test]
fn upstream_starttls_with_an_untrusted_certificate_fails() {
    timed(90, || {
        let trusted = Ca::new("trusted CA");
        let dir = tempfile::tempdir().unwrap();
        let ca_file = trusted.write(dir.path(), "ca.pem");
        let ca_setting = ca_file.display().to_string();
        // Signed by another CA, and a certificate of the trusted CA for another name.
        let cases = [
            Ca::new("impostor CA").leaf(&["localhost", "127.0.0.1"]),
            trusted.leaf(&["mail.example.org"]),
        ];
        for leaf in &cases {
            for mode in ["required", "opportunistic"] {
                let up = TlsUpstream::start(leaf, true);
                let p = upstream_tls_proxy(&up, mode, &[("UpstreamTlsCa", &ca_setting)]);
                let r = deliver_plain(&p);
                assert_eq!(
                    (r.code, r.lines[0].as_str()),
                    (421, "4.4.1 Upstream server unavailable, try again later"),
                    "{mode}"
                );
                assert!(
                    p.wait_log("invalid peer certificate", secs(5)),
                    "{}",
                    p.log()
                );
                let sessions = up.sessions();
                assert!(
                    sessions.iter().all(|s| s.messages.is_empty()
                        && !s.commands.iter().any(|(_, c)| c.starts_with("MAIL"))),
                    "{sessions:?}"
                );
            }
        }
        // Verification turned off (a local upstream): the same impostor is accepted.
        let up = TlsUpstream::start(&cases[0], true);
        let p = upstream_tls_proxy(&up, "required", &[("UpstreamTlsVerify", "off")]);
        assert_eq!(deliver_plain(&p).code, 250);
        assert_eq!(up.wait_messages(1).len(), 1);
        assert!(up.sessions()[0]
            .commands
            .iter()
            .any(|(tls, c)| *tls && c.starts_with("MAIL")));
    });
}

#[test]
fn upstream_without_starttls() {
    timed(60, || {
        let ca = Ca::new("upstream CA");
        let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
        let dir = tempfile::tempdir().unwrap();
        let ca_file = ca.write(dir.path(), "ca.pem").display().to_string();

        // Required: no delivery in clear text.
        let up = TlsUpstream::start(&leaf, false);
        let p = upstream_tls_proxy(&up, "required", &[("UpstreamTlsCa", &ca_file)]);
        assert_eq!(deliver_plain(&p).code, 421);
        assert!(p.wait_log("does not offer STARTTLS", secs(5)));
        assert!(wait_until(secs(5), || up
            .sessions()
            .first()
            .is_some_and(|s| s.commands.iter().any(|(_, c)| c == "QUIT"))));

        // Opportunistic: clear text it is.
        let up = TlsUpstream::start(&leaf, false);
        let p = upstream_tls_proxy(&up, "opportunistic", &[("UpstreamTlsCa", &ca_file)]);
        assert_eq!(deliver_plain(&p).code, 250);
        assert_eq!(up.wait_messages(1).len(), 1);
        assert!(up.sessions()[0].commands.iter().all(|(tls, _)| !tls));
    });
}

#[test]
fn upstream_refusing_greeting_is_relayed() {
    timed(30, || {
        let up = Upstream::builder().banner("554 5.3.2 not now").start();
        let p = Proxy::builder()
            .upstream(&up)
            .set("UpstreamTls", "required")
            .set("UpstreamTlsVerify", "off")
            .start();
        let mut c = TlsClient::connect(p.addr());
        let r = c.reply();
        assert_eq!((r.code, r.lines[0].as_str()), (554, "5.3.2 not now"));
    });
}

#[test]
fn both_sides_tls() {
    timed(60, || {
        let upstream_ca = Ca::new("upstream CA");
        let up = TlsUpstream::start(&upstream_ca.leaf(&["localhost", "127.0.0.1"]), true);
        let b = Proxy::builder()
            .set("OutAddress", &up.out_address())
            .set("UpstreamTls", "required");
        let ca_file = upstream_ca.write(b.dir(), "upstream-ca.pem");
        let (b, ca, _leaf) =
            with_certificate(b.set("UpstreamTlsCa", &ca_file.display().to_string()));
        let p = b.start();
        let mut c = TlsClient::connect(p.addr());
        assert_eq!(c.reply().lines, ["smtp.passthru"]);
        assert!(c.cmd("EHLO client.example").has("STARTTLS"));
        c.starttls(ca.client_config());
        c.cmd("EHLO client.example");
        assert_eq!(c.mail("alice@example.org", "bob@example.net").code, 250);
        assert_eq!(up.wait_messages(1).len(), 1);
        let commands = &up.sessions()[0].commands;
        assert!(commands.iter().skip(2).all(|(tls, _)| *tls), "{commands:?}");
    });
}
