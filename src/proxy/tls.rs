//! TLS: the proxy's certificate for clients (STARTTLS and the implicit-TLS listener) and
//! the client side towards the upstream.
//!
//! rustls with the ring provider. The certificate and key are PEM files, as a Kubernetes
//! TLS Secret mounts them (`tls.crt`, `tls.key`). They are loaded at startup (a broken pair
//! stops the start) and then polled like the configuration file: a changed pair replaces
//! the running one for new handshakes, a broken one is refused and the running one stays.
//! The session ([`crate::protocol::session`]) decides when TLS starts; this module only provides the
//! configurations and the facts about an established connection.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, CommonState, DigitallySignedStruct, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::file_watch;
use crate::config::{Settings, UpstreamTls};

/// What is known of an established TLS connection, for the filter, logs, metrics and traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub(crate) version: &'static str,
    /// The IANA-style name rustls gives the suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub(crate) cipher: String,
}

impl TlsInfo {
    /// The negotiated parameters of a connection whose handshake is complete.
    pub(crate) fn of(state: &CommonState) -> TlsInfo {
        let version = match state.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        let cipher = state
            .negotiated_cipher_suite()
            .map(|s| {
                let suite = s.suite();
                suite
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| format!("{suite:?}"))
            })
            .unwrap_or_else(|| "unknown".into());
        TlsInfo { version, cipher }
    }
}

/// Why a certificate, key or CA bundle could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsError(String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_error(path: &Path, what: &str, e: rustls_pki_types::pem::Error) -> TlsError {
    TlsError(format!("{}: couldn't read {what}: {e}", path.display()))
}

/// Reads a PEM certificate chain (leaf first) and its private key, and checks that they
/// belong together.
pub(crate) fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_error(cert, "certificate", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert, "certificate", e))?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{}: no PEM certificate found",
            cert.display()
        )));
    }
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, "private key", e))?;
    CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
        TlsError(format!(
            "{} and {}: unusable certificate or key: {e}",
            cert.display(),
            key.display()
        ))
    })
}

/// The running certificate, swapped in place so that a reload needs no new configuration.
#[derive(Debug, Default)]
struct Current {
    loaded: RwLock<Option<Loaded>>,
}

#[derive(Debug, Clone)]
struct Loaded {
    /// Which files it came from (the tests check which pair is running).
    #[cfg(test)]
    paths: (PathBuf, PathBuf),
    key: Arc<CertifiedKey>,
}

impl Current {
    fn get(&self) -> Option<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, value: Option<Loaded>) {
        *self.loaded.write().unwrap_or_else(PoisonError::into_inner) = value;
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get().map(|l| l.key)
    }
}

/// The proxy's side of client TLS.
#[derive(Debug)]
pub(crate) struct ServerTls {
    current: Arc<Current>,
    config: Arc<ServerConfig>,
}

impl Default for ServerTls {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerTls {
    /// No certificate yet: STARTTLS is not offered until one is loaded.
    pub(crate) fn new() -> ServerTls {
        let current = Arc::new(Current::default());
        // The ring provider supports the safe default versions, so this cannot fail.
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        ServerTls {
            current,
            config: Arc::new(config),
        }
    }

    /// The acceptor for a handshake, when a certificate is loaded.
    pub(crate) fn acceptor(&self) -> Option<TlsAcceptor> {
        self.has_certificate()
            .then(|| TlsAcceptor::from(self.config.clone()))
    }

    pub(crate) fn has_certificate(&self) -> bool {
        self.current.get().is_some()
    }

    /// The certificate and key files in use.
    #[cfg(test)]
    fn paths(&self) -> Option<(PathBuf, PathBuf)> {
        self.current.get().map(|l| l.paths)
    }

    /// Loads a certificate and key; on error the running pair (if any) stays.
    pub(crate) fn load(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let key_pair = load_certified_key(cert, key)?;
        crate::ops::metrics::global()
            .set_tls_certificate_expiry(key_pair.cert.first().and_then(|leaf| not_after(leaf)));
        self.current.set(Some(Loaded {
            #[cfg(test)]
            paths: (cert.to_path_buf(), key.to_path_buf()),
            key: Arc::new(key_pair),
        }));
        Ok(())
    }

    /// Stops offering TLS (the configuration no longer names a certificate).
    pub(crate) fn clear(&self) {
        self.current.set(None);
        crate::ops::metrics::global().set_tls_certificate_expiry(None);
    }
}

/// The end of a certificate's validity (notAfter) as a Unix time.
pub(crate) fn not_after(certificate: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// The configured certificate and key paths.
fn configured_paths(settings: &Settings) -> Option<(PathBuf, PathBuf)> {
    match (&settings.tls_certificate, &settings.tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        _ => None,
    }
}

/// Keeps the server certificate in step with the configuration and the files on disk,
/// polling like the configuration watcher (a Secret volume updates by a symlink swap). The
/// files are looked at and read on the blocking pool: a slow volume stalls no session.
pub(crate) async fn watch_certificates(
    tls: Arc<Tls>,
    mut settings: watch::Receiver<Arc<Settings>>,
) {
    let mut wanted = configured_paths(&settings.borrow_and_update());
    let files = |paths: &Option<(PathBuf, PathBuf)>| -> Vec<PathBuf> {
        paths
            .iter()
            .flat_map(|(c, k)| [c.clone(), k.clone()])
            .collect()
    };
    let mut watcher = file_watch::Watcher::watch(files(&wanted)).await;
    loop {
        tokio::time::sleep(file_watch::POLL_INTERVAL).await;
        let configured = configured_paths(&settings.borrow_and_update());
        let moved = configured != wanted;
        let changed = watcher.poll().await;
        if !moved && !changed {
            continue;
        }
        if moved {
            wanted = configured;
            watcher = file_watch::Watcher::watch(files(&wanted)).await;
        }
        let (tls, paths) = (tls.clone(), wanted.clone());
        file_watch::off_runtime(move || reload_certificate(&tls.server, paths.as_ref())).await;
    }
}

/// Applies a new certificate pair, or none; a broken pair leaves the running one in place.
pub(crate) fn reload_certificate(server: &ServerTls, paths: Option<&(PathBuf, PathBuf)>) {
    let Some((cert, key)) = paths else {
        if server.has_certificate() {
            tracing::warn!("TLS certificate no longer configured: STARTTLS is not offered");
            server.clear();
        }
        return;
    };
    match server.load(cert, key) {
        Ok(()) => {
            tracing::info!("TLS certificate loaded: {}", cert.display());
            crate::ops::metrics::global().tls_certificate_reload(true);
        }
        Err(e) => {
            let keeping = if server.has_certificate() {
                "keeping the running certificate"
            } else {
                "TLS stays unavailable"
            };
            tracing::error!("TLS certificate reload refused, {keeping}: {e}");
            crate::ops::metrics::global().tls_certificate_reload(false);
        }
    }
}

/// Accepts any upstream certificate: `UpstreamTlsVerify: off`, for an upstream on the same
/// host or pod whose certificate cannot be checked. Signatures are still verified, so the
/// handshake itself stays sound.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The trust anchors: the configured bundle, or the system's (`/etc/ssl/certs`).
fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let certs = match ca {
        Some(path) => CertificateDer::pem_file_iter(path)
            .map_err(|e| pem_error(path, "CA bundle", e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(path, "CA bundle", e))?,
        None => rustls_native_certs::load_native_certs().certs,
    };
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        let source = ca.map_or_else(
            || "the system certificate store".to_string(),
            |p| p.display().to_string(),
        );
        return Err(TlsError(format!(
            "no usable CA certificate in {source} (set UpstreamTlsCa, or UpstreamTlsVerify: off for a local upstream)"
        )));
    }
    Ok(store)
}

/// What a client configuration depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientKey {
    ca: Option<PathBuf>,
    verify: bool,
}

impl ClientKey {
    fn of(settings: &Settings) -> ClientKey {
        ClientKey {
            ca: settings.upstream_tls_ca.clone(),
            verify: settings.upstream_tls_verify,
        }
    }
}

fn client_config(key: &ClientKey) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3");
    let config = if key.verify {
        builder
            .with_root_certificates(roots(key.ca.as_deref())?)
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    };
    Ok(config)
}

/// The TLS configuration of an HTTP hook: its CA bundle (else the system's), or no
/// verification; a client certificate and key for mutual TLS; HTTP/1.1 by ALPN.
pub(crate) fn hook_client_config(
    ca: Option<&Path>,
    verify: bool,
    client: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = if verify {
        builder.with_root_certificates(roots(ca)?)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    };
    let mut config = match client {
        Some((cert, key)) => {
            let certified = load_certified_key(cert, key)?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                certified,
            )))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The proxy's side of upstream TLS. The configuration is built on first use and again
/// when a reload changes `UpstreamTlsCa` or `UpstreamTlsVerify` (reading the system store
/// for every connection would cost milliseconds).
#[derive(Debug, Default)]
pub(crate) struct ClientTls {
    cached: Mutex<Option<(ClientKey, Arc<ClientConfig>)>>,
}

impl ClientTls {
    pub(crate) fn connector(&self, settings: &Settings) -> Result<TlsConnector, TlsError> {
        let key = ClientKey::of(settings);
        let mut cached = self.cached.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((k, config)) = cached.as_ref() {
            if *k == key {
                return Ok(TlsConnector::from(config.clone()));
            }
        }
        let config = Arc::new(client_config(&key)?);
        *cached = Some((key, config.clone()));
        Ok(TlsConnector::from(config))
    }
}

/// The name an upstream certificate is checked against: a host name or an IP address.
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string())
        .map_err(|_| TlsError(format!("not a valid TLS server name: {name}")))
}

/// Both sides, shared by every connection.
#[derive(Debug, Default)]
pub(crate) struct Tls {
    pub(crate) server: ServerTls,
    pub(crate) client: ClientTls,
}

impl Tls {
    /// Loads what `settings` configure; an error here stops the start.
    pub(crate) fn from_settings(settings: &Settings) -> Result<Tls, TlsError> {
        let tls = Tls::default();
        if let Some((cert, key)) = configured_paths(settings) {
            tls.server.load(&cert, &key)?;
        }
        if settings.upstream_tls != UpstreamTls::Off {
            tls.client.connector(settings)?;
        }
        Ok(tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, signing_key.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn loads_and_refuses_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = write_pair(dir.path(), "one");
        let (c2, k2) = write_pair(dir.path(), "two");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let missing = dir.path().join("missing.pem");

        let server = ServerTls::new();
        assert!(server.acceptor().is_none());
        server.load(&c1, &k1).unwrap();
        assert!(server.acceptor().is_some());

        // Each broken pair is refused with a reason, and the running pair stays.
        for (cert, key, reason) in [
            (&c1, &k2, "unusable"),
            (&garbage, &k1, "no PEM certificate"),
            (&c1, &garbage, "private key"),
            (&missing, &k1, "missing.pem"),
        ] {
            let e = server.load(cert, key).unwrap_err();
            assert!(e.to_string().contains(reason), "{e}");
            assert_eq!(server.paths(), Some((c1.clone(), k1.clone())));
        }
        server.load(&c2, &k2).unwrap();
        assert_eq!(server.paths(), Some((c2.clone(), k2.clone())));
        reload_certificate(&server, None);
        assert!(!server.has_certificate());
    }

    #[test]
    fn client_configurations() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = write_pair(dir.path(), "ca");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let client = ClientTls::default();
        let mut s = Settings {
            upstream_tls: UpstreamTls::Required,
            upstream_tls_ca: Some(c),
            ..Settings::default()
        };
        assert!(client.connector(&s).is_ok());
        s.upstream_tls_ca = Some(empty.clone());
        let Err(e) = client.connector(&s) else {
            panic!("an empty CA bundle was accepted");
        };
        assert!(e.to_string().contains("no usable CA certificate"), "{e}");
        s.upstream_tls_verify = false;
        assert!(client.connector(&s).is_ok());
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("mail.example.org"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("bad name").is_err());
    }
}
