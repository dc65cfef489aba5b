//! TLS to an `https://` collector: the CA file and the client certificate
//! pair of `[export.otlp]`, read and checked at start, and read again when
//! they change on disk, so that a certificate an issuer renews (cert-manager,
//! step, Vault, a cron job) reaches the next connection without a restart.
//!
//! Owns: [`CollectorTls`], the rustls client configuration both transports
//! use (OTLP/HTTP's reqwest client takes it preconfigured; gRPC connects
//! through [`GrpcTlsConnector`]), built once for the metrics and the traces
//! exporters; the trust used when no CA file is set (the host's store,
//! `SSL_CERT_FILE` and `SSL_CERT_DIR` included); and the check of the files
//! for `tollgate check` and start-up.
//!
//! Must never: stop exports because a renewed file is half-written or bad
//! (the last good certificate, key or CA goes on being used and a warning
//! names the file); touch the files inside a handshake or on the agent's
//! runtime threads ([`CollectorTls::refresh`] runs before a connection, off
//! them: a blocking pool thread for gRPC, the exporter's own thread for
//! OTLP/HTTP); read a file that has not changed (one `stat` each, unless a
//! file was changed so recently that a write could still be under way);
//! or put key material into a log or an error.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tracing::{info, warn};

use super::ExportError;
use super::config::{OtlpProtocol, ResolvedOtlp, TlsFile};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn file_error(f: &TlsFile, message: String) -> ExportError {
    ExportError::TlsFile {
        key: f.source.clone(),
        message: format!("`{}`: {message}", f.path.display()),
    }
}

fn certs(f: &TlsFile, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ExportError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(f, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(f, "no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// The verifier trusting the CAs of `files[0]` (read as `pem[0]`) only.
fn parse_ca(files: &[TlsFile], pem: &[Vec<u8>]) -> Result<Arc<WebPkiServerVerifier>, ExportError> {
    let f = &files[0];
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(f, &pem[0])? {
        roots
            .add(c)
            .map_err(|e| file_error(f, format!("not a usable CA certificate: {e}")))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| file_error(f, format!("not a usable CA certificate: {e}")))
}

/// The client certificate chain of `files[0]` with the key of `files[1]`,
/// checked to be the certificate's.
fn parse_identity(files: &[TlsFile], pem: &[Vec<u8>]) -> Result<Arc<CertifiedKey>, ExportError> {
    let (cf, kf) = (&files[0], &files[1]);
    let chain = certs(cf, &pem[0])?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &pem[1][..])
        .map_err(|e| file_error(kf, format!("bad PEM: {e}")))?
        .ok_or_else(|| file_error(kf, "no PRIVATE KEY block found".into()))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|e| {
            file_error(
                kf,
                format!("not a usable key for {}: {e}", cf.path.display()),
            )
        })
}

/// What `stat` says of a file: a renewal that writes in place or renames
/// a new file over the old (or swaps a symlink, as Kubernetes does) changes
/// it. A file that cannot be stat'ed has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(f: &TlsFile) -> Option<Stamp> {
    let m = std::fs::metadata(&f.path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// How recent a change must be for a file to be read again though its
/// stamp is the same: file times move in steps of a few milliseconds, so
/// a write still under way when the file was read can end with the same
/// stamp.
const RACY: Duration = Duration::from_secs(2);

/// Whether a stamp is too recent to vouch for the file's content.
fn racy(stamps: &[Option<Stamp>]) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    stamps
        .iter()
        .flatten()
        .any(|s| s.mtime.0.max(s.ctime.0) + RACY.as_secs() as i64 >= now)
}

type Parser<T> = fn(&[TlsFile], &[Vec<u8>]) -> Result<T, ExportError>;

/// The files' bytes, or the first that cannot be read.
fn read_all(files: &[TlsFile]) -> Result<Vec<Vec<u8>>, ExportError> {
    files
        .iter()
        .map(|f| std::fs::read(&f.path).map_err(|e| file_error(f, e.to_string())))
        .collect()
}

/// A digest of what a read found, to tell a change of content from a
/// change of stamp alone (not a secret: it never leaves the process).
fn digest(read: &Result<Vec<Vec<u8>>, ExportError>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match read {
        Ok(files) => files.hash(&mut h),
        Err(e) => e.to_string().hash(&mut h),
    }
    h.finish()
}

/// A value parsed from files, parsed again when their content changes. A
/// parse that fails keeps the value before it (and is not tried again
/// until the content changes once more).
struct Watched<T> {
    files: Vec<TlsFile>,
    /// What is parsed, for the log: "client certificate".
    what: &'static str,
    parse: Parser<T>,
    state: Mutex<WatchState<T>>,
    /// Held by a refresh from its `stat` to its parse, so that two
    /// exporters refreshing at once cannot store an older read over a
    /// newer one (never taken by a handshake).
    refreshing: Mutex<()>,
}

struct WatchState<T> {
    current: T,
    /// The files' stamps when last read.
    stamps: Vec<Option<Stamp>>,
    /// The stamps were too recent to vouch for what was read: read again.
    racy: bool,
    /// [`digest`] of the last read.
    seen: u64,
}

impl<T: Clone> Watched<T> {
    /// Reads and parses `files` now: at start a file that cannot be used
    /// is an error.
    fn new(files: Vec<TlsFile>, what: &'static str, parse: Parser<T>) -> Result<Self, ExportError> {
        let stamps: Vec<_> = files.iter().map(stamp).collect();
        let read = read_all(&files);
        let seen = digest(&read);
        let current = parse(&files, &read?)?;
        Ok(Watched {
            files,
            what,
            parse,
            state: Mutex::new(WatchState {
                current,
                racy: racy(&stamps),
                stamps,
                seen,
            }),
            refreshing: Mutex::new(()),
        })
    }

    fn paths(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value as last parsed: no I/O.
    fn current(&self) -> T {
        self.lock().current.clone()
    }

    /// Reads the files again when their stamps changed (or were too
    /// recent), and parses them when their content changed. Blocking I/O,
    /// done without the state's lock held (handshakes read it).
    fn refresh(&self) {
        let _one_at_a_time = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let stamps: Vec<_> = self.files.iter().map(stamp).collect();
        {
            let s = self.lock();
            if s.stamps == stamps && !s.racy {
                return;
            }
        }
        let read = read_all(&self.files);
        let seen = digest(&read);
        let parsed = read.and_then(|bytes| (self.parse)(&self.files, &bytes));
        let mut s = self.lock();
        s.racy = racy(&stamps);
        s.stamps = stamps;
        if s.seen == seen {
            return;
        }
        s.seen = seen;
        match parsed {
            Ok(v) => {
                info!(
                    "export: the collector {} changed on disk and was loaded again from {}",
                    self.what,
                    self.paths()
                );
                s.current = v;
            }
            Err(e) => warn!(
                "export: the collector {} changed on disk but cannot be used ({e}); \
                 exports go on with the one loaded before, and it is read again when it changes",
                self.what
            ),
        }
    }
}

/// The client certificate shown to a collector that asks for one.
struct ClientIdentity(Arc<Watched<Arc<CertifiedKey>>>);

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("files", &self.0.paths())
            .finish()
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Trust for the collector's certificate: the CA file's, reloaded when it
/// changes, or the host's store loaded once.
enum Trust {
    File(Arc<Watched<Arc<WebPkiServerVerifier>>>),
    Host(Arc<WebPkiServerVerifier>),
}

impl Trust {
    fn verifier(&self) -> Arc<WebPkiServerVerifier> {
        match self {
            Trust::File(w) => w.current(),
            Trust::Host(v) => v.clone(),
        }
    }
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::File(w) => write!(f, "Trust::File({})", w.paths()),
            Trust::Host(_) => f.write_str("Trust::Host"),
        }
    }
}

/// Checks the collector's certificate against the trust of the moment:
/// every check is the current [`WebPkiServerVerifier`]'s.
#[derive(Debug)]
struct CollectorVerifier(Trust);

impl ServerCertVerifier for CollectorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verifier()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.verifier().supported_verify_schemes()
    }
}

/// Where the host's CA store is looked for.
#[derive(Debug, Clone, Default)]
pub(crate) enum HostStore {
    /// As OpenSSL finds it from this process's environment
    /// (`SSL_CERT_FILE` and `SSL_CERT_DIR` first): the agent's.
    #[default]
    Process,
    /// The service's `SSL_CERT_FILE` and `SSL_CERT_DIR`, for `tollgate
    /// check`, which runs in another environment (a set one is used
    /// instead of the system's locations, as OpenSSL does).
    Given {
        file: Option<std::path::PathBuf>,
        dir: Option<std::path::PathBuf>,
    },
}

/// The certificates of the PEM file `file` and of the files in `dir`.
fn certs_at(
    file: Option<&std::path::Path>,
    dir: Option<&std::path::Path>,
) -> rustls_native_certs::CertificateResult {
    let mut out = rustls_native_certs::CertificateResult::default();
    let mut paths: Vec<std::path::PathBuf> = file.map(|f| f.to_path_buf()).into_iter().collect();
    if let Some(d) = dir
        && let Ok(entries) = std::fs::read_dir(d)
    {
        paths.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    for p in paths {
        if let Ok(pem) = std::fs::read(&p) {
            out.certs
                .extend(rustls_pemfile::certs(&mut &pem[..]).flatten());
        }
    }
    out
}

/// The host's CA store, found as `store` says.
fn host_trust(store: &HostStore) -> Result<Arc<WebPkiServerVerifier>, ExportError> {
    let found = match store {
        HostStore::Given { file, dir } if file.is_some() || dir.is_some() => {
            certs_at(file.as_deref(), dir.as_deref())
        }
        _ => rustls_native_certs::load_native_certs(),
    };
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(ExportError::Build(format!(
            "no CA certificate found in the host's store{why}: set export.otlp.ca_file \
             (or OTEL_EXPORTER_OTLP_CERTIFICATE) to the collector's CA"
        )));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| ExportError::Build(format!("the host's CA store: {e}")))
}

/// Reads and checks the TLS files `r` names, as at start: the error names
/// the setting or variable a file came from.
pub(super) fn check_files(r: &ResolvedOtlp) -> Result<(), ExportError> {
    if let Some(f) = &r.tls.ca_file {
        let files = std::slice::from_ref(f);
        parse_ca(files, &read_all(files)?)?;
    }
    if let Some((c, k)) = &r.tls.identity {
        let files = [c.clone(), k.clone()];
        parse_identity(&files, &read_all(&files)?)?;
    }
    Ok(())
}

/// The TLS of an `https://` collector, built once for the metrics and
/// the traces exporters: the CA file's trust (else the host's) and the
/// client pair when set, each read again by [`CollectorTls::refresh`]
/// when it changes. Sessions are never resumed, so that every connection
/// checks the collector against the CAs of the moment and proves the
/// client certificate of the moment (exports are far apart: a full
/// handshake costs nothing that matters).
#[derive(Clone)]
pub(crate) struct CollectorTls {
    config: Arc<ClientConfig>,
    ca: Option<Arc<Watched<Arc<WebPkiServerVerifier>>>>,
    identity: Option<Arc<Watched<Arc<CertifiedKey>>>>,
}

impl std::fmt::Debug for CollectorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorTls")
            .field("ca", &self.ca.as_ref().map(|w| w.paths()))
            .field("identity", &self.identity.as_ref().map(|w| w.paths()))
            .finish()
    }
}

impl CollectorTls {
    /// Reads the files `r` names (an error names the setting), offering
    /// by ALPN what `r.protocol` speaks: h2 for gRPC, h2 and HTTP/1.1 for
    /// OTLP/HTTP (as reqwest's own TLS does).
    pub(crate) fn new(r: &ResolvedOtlp) -> Result<CollectorTls, ExportError> {
        CollectorTls::with_store(r, &HostStore::Process)
    }

    /// [`CollectorTls::new`], with the host's store found as `store` says.
    pub(crate) fn with_store(
        r: &ResolvedOtlp,
        store: &HostStore,
    ) -> Result<CollectorTls, ExportError> {
        let ca = match &r.tls.ca_file {
            Some(f) => Some(Arc::new(Watched::new(
                vec![f.clone()],
                "CA file",
                parse_ca,
            )?)),
            None => None,
        };
        let identity = match &r.tls.identity {
            Some((c, k)) => Some(Arc::new(Watched::new(
                vec![c.clone(), k.clone()],
                "client certificate",
                parse_identity,
            )?)),
            None => None,
        };
        let trust = match &ca {
            Some(w) => Trust::File(w.clone()),
            None => Trust::Host(host_trust(store)?),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ExportError::Build(format!("TLS: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CollectorVerifier(trust)));
        let mut cfg = match &identity {
            Some(w) => builder.with_client_cert_resolver(Arc::new(ClientIdentity(w.clone()))),
            None => builder.with_no_client_auth(),
        };
        cfg.resumption = rustls::client::Resumption::disabled();
        cfg.alpn_protocols = match r.protocol {
            OtlpProtocol::Grpc => vec![b"h2".to_vec()],
            OtlpProtocol::HttpProtobuf => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        Ok(CollectorTls {
            config: Arc::new(cfg),
            ca,
            identity,
        })
    }

    pub(crate) fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Reads the files again if they changed on disk (blocking: call it
    /// off the agent's runtime threads), so that the next handshake uses
    /// what they hold now.
    pub(crate) fn refresh(&self) {
        for w in self.ca.iter() {
            w.refresh();
        }
        for w in self.identity.iter() {
            w.refresh();
        }
    }
}

/// Shakes hands with `r`'s `https://` collector at `addr` as the
/// exporters would (its files, its ALPN), then waits up to `wait` for
/// the collector to refuse the client certificate (TLS 1.3 says so after
/// the client's side is done). Blocking. The error says what to fix.
pub(crate) fn probe(
    r: &ResolvedOtlp,
    store: &HostStore,
    addr: std::net::SocketAddr,
    timeout: Duration,
    wait: Duration,
) -> Result<(), String> {
    use rustls::{AlertDescription as A, CertificateError as C};
    use std::io::Read;
    let tls = CollectorTls::with_store(r, store).map_err(|e| e.to_string())?;
    let uri: http::Uri = r
        .endpoint
        .parse()
        .map_err(|e| format!("`{}` is not a URL: {e}", r.endpoint))?;
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let name = ServerName::try_from(host)
        .map_err(|_| "the endpoint's host is not a valid TLS name".to_string())?;
    let trust = match &r.tls.ca_file {
        Some(f) => format!("{} ({})", f.source, f.path.display()),
        None => "the host's CA store".to_string(),
    };
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let conn =
        rustls::ClientConnection::new(tls.config(), name).map_err(|e| format!("TLS: {e}"))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let explain = |e: std::io::Error| -> String {
        let text = e.to_string();
        let inner = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .cloned();
        match inner {
            Some(rustls::Error::InvalidCertificate(
                why @ (C::UnknownIssuer | C::BadSignature | C::BadEncoding),
            )) => format!(
                "its certificate is not trusted by {trust} ({why:?}): set export.otlp.ca_file \
                 (or OTEL_EXPORTER_OTLP_CERTIFICATE) to the CA that issued it"
            ),
            Some(rustls::Error::InvalidCertificate(why)) => format!(
                "its certificate was refused ({why:?}): check the endpoint's host name and the \
                 collector's certificate (its names, its dates)"
            ),
            Some(rustls::Error::AlertReceived(
                alert @ (A::BadCertificate
                | A::UnknownCA
                | A::CertificateRequired
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::AccessDenied
                | A::DecryptError
                | A::HandshakeFailure),
            )) => {
                let shown = if r.tls.identity.is_some() {
                    "the client certificate shown was refused"
                } else {
                    "it may want a client certificate: set export.otlp.client_cert and client_key"
                };
                format!("the collector ended the handshake ({alert:?}): {shown}")
            }
            _ => format!("TLS handshake failed: {text}"),
        }
    };
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(explain)?;
    }
    let _ = s.sock.set_read_timeout(Some(wait));
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        // (A collector that closes without a word took the handshake.)
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(explain(e)),
    }
    Ok(())
}

/// Connects tonic's channel to an `https://` collector: TCP by hyper's
/// connector, as tonic's own (the connect timeout shared among the
/// addresses a name resolves to, the other family tried after 300 ms),
/// then TLS with [`CollectorTls`], its files refreshed
/// first on the blocking pool. (tonic's own TLS reads its files once.)
#[derive(Clone)]
pub(super) struct GrpcTlsConnector {
    tls: CollectorTls,
    tcp: hyper_util::client::legacy::connect::HttpConnector,
}

impl GrpcTlsConnector {
    pub(super) fn new(tls: CollectorTls, timeout: Duration) -> Self {
        let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        // Shared among the addresses a name resolves to, so that one that
        // drops packets leaves time for the next (as tonic sets it).
        tcp.set_connect_timeout(Some(timeout));
        GrpcTlsConnector { tls, tcp }
    }
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
type Connecting = Pin<Box<dyn Future<Output = std::io::Result<TlsIo>> + Send>>;

impl tower_service::Service<http::Uri> for GrpcTlsConnector {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        let mut tcp = self.tcp.clone();
        Box::pin(async move {
            let bad =
                |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
            let host = uri
                .host()
                .ok_or_else(|| bad("the collector endpoint has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let name = ServerName::try_from(host)
                .map_err(|_| bad("the collector endpoint's host is not a valid TLS name"))?;
            let files = tls.clone();
            let _ = tokio::task::spawn_blocking(move || files.refresh()).await;
            let stream = tower_service::Service::call(&mut tcp, uri)
                .await
                .map_err(std::io::Error::other)?
                .into_inner();
            let stream = tokio_rustls::TlsConnector::from(tls.config())
                .connect(name, stream)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A gRPC channel to the `https://` collector `endpoint` through
/// [`GrpcTlsConnector`]: tonic is given the same host and port as
/// `http://` (so that it adds no TLS of its own; the port made explicit,
/// 443 when the endpoint has none) and `https://` as the requests' origin.
pub(super) fn grpc_channel(
    endpoint: &str,
    tls: &CollectorTls,
    timeout: Duration,
) -> Result<tonic::transport::Channel, ExportError> {
    let bad = |m: String| ExportError::Config {
        key: "export.otlp.endpoint".into(),
        message: m,
    };
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| bad(format!("`{endpoint}` is not a URL: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| bad(format!("`{endpoint}` has no host")))?;
    let origin: http::Uri = format!("https://{authority}")
        .parse()
        .map_err(|e| bad(format!("`{endpoint}`: {e}")))?;
    let port = authority.port_u16().unwrap_or(443);
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://{}:{port}", authority.host()))
            .map_err(|e| bad(format!("`{endpoint}`: {e}")))?;
    Ok(plain
        .origin(origin)
        .timeout(timeout)
        .connect_timeout(timeout)
        .connect_with_connector_lazy(GrpcTlsConnector::new(tls.clone(), timeout)))
}

#[cfg(test)]
mod tests {
    //! Real handshakes on loopback between [`CollectorTls`] and a rustls
    //! server that asks for a client certificate, with the files renewed
    //! between them as an issuer would.

    use std::path::{Path, PathBuf};

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    use super::*;
    use crate::export::config::{OtlpTls, ResolvedOtlp};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca() -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let pem = p.self_signed(&key).expect("ca").pem();
        Ca {
            issuer: Issuer::new(p, key),
            pem,
        }
    }

    /// A certificate for `name` signed by `ca`, and its key, as PEM.
    fn leaf(ca: &Ca, name: &str) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &ca.issuer)
            .expect("leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// The DNS name a leaf from [`leaf`] is for.
    fn name_in(der: &[u8]) -> String {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("a certificate");
        let san = cert
            .subject_alternative_name()
            .expect("extensions")
            .expect("a SAN");
        match &san.value.general_names[0] {
            x509_parser::extensions::GeneralName::DNSName(n) => n.to_string(),
            other => panic!("{other:?}"),
        }
    }

    fn der(pem: &str) -> Vec<u8> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .expect("a certificate")
            .expect("pem")
            .to_vec()
    }

    /// Writes `body` to `path` as issuers do: a new file renamed over it.
    fn renew(path: &Path, body: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    }

    fn file(path: &Path, source: &str) -> TlsFile {
        TlsFile {
            path: path.to_path_buf(),
            source: source.into(),
        }
    }

    /// A server for 127.0.0.1 with a certificate from `server_ca`, asking
    /// for a client certificate from `client_ca`.
    fn acceptor(server_ca: &Ca, client_ca: &Ca) -> tokio_rustls::TlsAcceptor {
        let (cert, key) = leaf(server_ca, "127.0.0.1");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(der(&client_ca.pem)))
            .expect("client CA");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .expect("client verifier");
        let key = rustls_pemfile::private_key(&mut key.as_bytes())
            .expect("pem")
            .expect("key");
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![CertificateDer::from(der(&cert))], key)
            .expect("server certificate");
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    }

    /// One handshake, the files refreshed first as a connection does: the
    /// client certificate the server saw, or why either side failed.
    async fn handshake(
        tls: &CollectorTls,
        acceptor: &tokio_rustls::TlsAcceptor,
    ) -> Result<String, String> {
        tls.refresh();
        let cfg = tls.config();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = acceptor.clone();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            // TLS 1.3: the server checks the client's certificate after the
            // client's side is done; a byte back says it was accepted.
            tokio::io::AsyncWriteExt::write_all(&mut tls, b"k")
                .await
                .map_err(|e| e.to_string())?;
            let seen = tls.get_ref().1.peer_certificates().map(|c| name_in(&c[0]));
            seen.ok_or_else(|| "no client certificate".to_string())
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let client = async {
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("client: {e}"))?;
            let mut b = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut tls, &mut b)
                .await
                .map_err(|e| format!("client read: {e}"))?;
            Ok::<_, String>(())
        };
        let client = client.await;
        let server = server.await.expect("server task");
        client?;
        server
    }

    fn otlp(ca: Option<TlsFile>, identity: Option<(TlsFile, TlsFile)>) -> ResolvedOtlp {
        let cfg: crate::export::config::ExportConfig =
            toml::from_str("[otlp]\nendpoint = \"https://127.0.0.1:4318/v1/metrics\"")
                .expect("parses");
        let mut r = cfg.resolve(&|_: &str| None).expect("resolves").expect("on");
        r.tls = OtlpTls {
            ca_file: ca,
            identity,
        };
        r
    }

    fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        (dir.join("ca.pem"), dir.join("c.pem"), dir.join("k.pem"))
    }

    #[tokio::test]
    async fn a_renewed_client_certificate_is_shown_at_the_next_handshake() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_p, cert_p, key_p) = paths(dir.path());
        let (server_ca, client_ca) = (ca(), ca());
        let acceptor = acceptor(&server_ca, &client_ca);
        std::fs::write(&ca_p, &server_ca.pem).expect("write");
        let (a_cert, a_key) = leaf(&client_ca, "runner-a");
        renew(&cert_p, &a_cert);
        renew(&key_p, &a_key);
        let r = otlp(
            Some(file(&ca_p, "export.otlp.ca_file")),
            Some((
                file(&cert_p, "export.otlp.client_cert"),
                file(&key_p, "export.otlp.client_key"),
            )),
        );
        let tls = CollectorTls::new(&r).expect("config");
        assert_eq!(handshake(&tls, &acceptor).await, Ok("runner-a".into()));
        assert_eq!(handshake(&tls, &acceptor).await, Ok("runner-a".into()));

        // Renewed with a new key, the certificate first: between the two
        // writes the pair does not match, and the last good one is shown.
        let (b_cert, b_key) = leaf(&client_ca, "runner-b");
        renew(&cert_p, &b_cert);
        assert_eq!(handshake(&tls, &acceptor).await, Ok("runner-a".into()));
        renew(&key_p, &b_key);
        assert_eq!(handshake(&tls, &acceptor).await, Ok("runner-b".into()));

        // A half-written file, then a missing one: the last good pair.
        std::fs::write(&cert_p, &b_cert[..b_cert.len() / 2]).expect("write");
        assert_eq!(handshake(&tls, &acceptor).await, Ok("runner-b".into()));
        std::fs::remove_file(&cert_p).expect("remove");
        assert_eq!(handshake(&tls, &acceptor).await, Ok("runner-b".into()));

        // Written whole again (a certificate for the same key).
        let key = KeyPair::from_pem(&b_key).expect("key");
        let c_cert = CertificateParams::new(vec!["runner-c".to_string()])
            .expect("params")
            .signed_by(&key, &client_ca.issuer)
            .expect("leaf")
            .pem();
        renew(&cert_p, &c_cert);
        assert_eq!(handshake(&tls, &acceptor).await, Ok("runner-c".into()));

        // Rewritten in place with a certificate of the same length, within
        // the same tick of the file clock: the content tells the change.
        // (Signatures vary in length: made until one has the length.)
        let d_cert = (0..200)
            .map(|_| {
                CertificateParams::new(vec!["runner-d".to_string()])
                    .expect("params")
                    .signed_by(&key, &client_ca.issuer)
                    .expect("leaf")
                    .pem()
            })
            .find(|d| d.len() == c_cert.len())
            .expect("a certificate of the same length");
        std::fs::write(&cert_p, &d_cert).expect("write in place");
        assert_eq!(handshake(&tls, &acceptor).await, Ok("runner-d".into()));
    }

    #[tokio::test]
    async fn a_renewed_ca_file_is_trusted_at_the_next_handshake() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_p, cert_p, key_p) = paths(dir.path());
        let (old_ca, new_ca, client_ca) = (ca(), ca(), ca());
        let (cert, key) = leaf(&client_ca, "runner");
        std::fs::write(&cert_p, &cert).expect("write");
        std::fs::write(&key_p, &key).expect("write");
        renew(&ca_p, &old_ca.pem);
        let r = otlp(
            Some(file(&ca_p, "OTEL_EXPORTER_OTLP_CERTIFICATE")),
            Some((file(&cert_p, "c"), file(&key_p, "k"))),
        );
        let tls = CollectorTls::new(&r).expect("config");
        // The collector moved to a certificate from a new CA.
        let moved = acceptor(&new_ca, &client_ca);
        let err = handshake(&tls, &moved).await.expect_err("not trusted yet");
        assert!(err.starts_with("client:"), "{err}");
        // The CA file is renewed to hold both.
        renew(&ca_p, &format!("{}{}", old_ca.pem, new_ca.pem));
        assert_eq!(handshake(&tls, &moved).await, Ok("runner".into()));
        assert_eq!(
            handshake(&tls, &acceptor(&old_ca, &client_ca)).await,
            Ok("runner".into())
        );
        // A CA file that is not one keeps the CAs before it.
        renew(&ca_p, &key);
        assert_eq!(handshake(&tls, &moved).await, Ok("runner".into()));
    }

    /// A server that takes every connection with `acceptor`, answering a
    /// byte after a handshake that succeeded; its address.
    async fn serve(acceptor: tokio_rustls::TlsAcceptor) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tokio::io::AsyncWriteExt::write_all(&mut tls, b"k").await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
        });
        addr
    }

    /// `tollgate check`'s handshake: taken, or refused with what to fix
    /// (a collector certificate the CA file does not vouch for, a client
    /// certificate missing or refused).
    #[tokio::test]
    async fn the_probe_says_why_a_handshake_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_p, cert_p, key_p) = paths(dir.path());
        let (server_ca, client_ca, stranger) = (ca(), ca(), ca());
        let addr = serve(acceptor(&server_ca, &client_ca)).await;
        let (cert, key) = leaf(&client_ca, "runner");
        std::fs::write(&ca_p, &server_ca.pem).expect("write");
        std::fs::write(&cert_p, &cert).expect("write");
        std::fs::write(&key_p, &key).expect("write");
        let other_ca = dir.path().join("other-ca.pem");
        std::fs::write(&other_ca, &stranger.pem).expect("write");
        let (s_cert, s_key) = leaf(&stranger, "runner");
        let (s_cert_p, s_key_p) = (dir.path().join("s.pem"), dir.path().join("s.key"));
        std::fs::write(&s_cert_p, &s_cert).expect("write");
        std::fs::write(&s_key_p, &s_key).expect("write");
        let pair = |c: &Path, k: &Path| {
            Some((
                file(c, "export.otlp.client_cert"),
                file(k, "export.otlp.client_key"),
            ))
        };
        let cases = [
            (Some(&ca_p), pair(&cert_p, &key_p), None),
            (
                Some(&other_ca),
                pair(&cert_p, &key_p),
                Some("is not trusted by export.otlp.ca_file"),
            ),
            (Some(&ca_p), None, Some("set export.otlp.client_cert")),
            (
                Some(&ca_p),
                pair(&s_cert_p, &s_key_p),
                Some("the client certificate shown was refused"),
            ),
        ];
        // A probe of `addr`, and whether it failed as `want` says.
        let expect = |r, store, want: Option<&'static str>| async move {
            let got = tokio::task::spawn_blocking(move || {
                probe(
                    &r,
                    &store,
                    addr,
                    Duration::from_secs(5),
                    Duration::from_secs(2),
                )
            })
            .await
            .expect("probe");
            match (want, got) {
                (None, Ok(())) => {}
                (Some(w), Err(e)) => assert!(e.contains(w), "want {w:?}: {e}"),
                (want, got) => panic!("want {want:?}, got {got:?}"),
            }
        };
        for (ca_file, identity, want) in cases {
            let r = otlp(ca_file.map(|p| file(p, "export.otlp.ca_file")), identity);
            expect(r, HostStore::Process, want).await;
        }
        // Without a CA file, the host's store as the service would find it
        // (its SSL_CERT_FILE), not this process's.
        for (bundle, want) in [
            (&ca_p, None),
            (&other_ca, Some("is not trusted by the host's CA store")),
        ] {
            let store = HostStore::Given {
                file: Some(bundle.clone()),
                dir: None,
            };
            expect(otlp(None, pair(&cert_p, &key_p)), store, want).await;
        }
    }

    #[test]
    fn the_files_are_checked_when_the_config_is_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_p, cert_p, key_p) = paths(dir.path());
        let client_ca = ca();
        let (cert, _) = leaf(&client_ca, "runner");
        let (_, other_key) = leaf(&client_ca, "other");
        std::fs::write(&ca_p, &client_ca.pem).expect("write");
        std::fs::write(&cert_p, &cert).expect("write");
        std::fs::write(&key_p, &other_key).expect("write");
        let r = otlp(
            Some(file(&ca_p, "export.otlp.ca_file")),
            Some((
                file(&cert_p, "export.otlp.client_cert"),
                file(&key_p, "export.otlp.client_key"),
            )),
        );
        match CollectorTls::new(&r) {
            Err(ExportError::TlsFile { key, message }) => {
                assert_eq!(key, "export.otlp.client_key");
                assert!(message.contains("not a usable key"), "{message}");
                assert!(!message.contains("PRIVATE KEY-----"), "{message}");
            }
            Err(e) => panic!("not a TLS file error: {e}"),
            Ok(_) => panic!("a key that is not the certificate's was taken"),
        }
    }
}
