//! Connections from the agent to the providers: verified TLS (webpki roots
//! plus an optional extra CA, never anything weaker) and a small pool of
//! HTTP/1.1 and HTTP/2 connections per (dialed address, host name, the
//! client's protocol).
//!
//! Must never: connect anywhere but the address the client dialed (or,
//! when that one does not take the connection, another address the agent
//! itself resolved for the same provider host), or accept a certificate
//! that does not verify for the client's SNI.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{self, HeaderName};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

use super::ProxyBody;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_IDLE_PER_KEY: usize = 64;
/// Streams one upstream HTTP/2 connection carries before the next request
/// opens another connection (servers commonly allow 100-250; hyper would
/// queue past the peer's limit instead of failing, which is what this
/// avoids).
const MAX_STREAMS_PER_H2: usize = 100;

/// The receive window of each upstream HTTP/2 stream: what the provider
/// may send ahead of a job that reads slowly, and so what an answer a job
/// stops reading holds in the agent (hyper's default is 2 MiB). 512 KiB
/// keeps a download at 10 MB/s over a 50 ms path; LLM answers and streams
/// are far smaller. The connection's window is this times
/// `MAX_STREAMS_PER_H2` (50 MiB), so that no set of stalled streams stops
/// the others on their connection.
const H2_STREAM_WINDOW: u32 = 512 << 10;
/// An HTTP/2 stream the provider refused before processing it: reset
/// with `REFUSED_STREAM` (RFC 9113 §8.7). (A stream past the last one a
/// GOAWAY accepted is reported by h2 with the GOAWAY's own reason, usually
/// `NO_ERROR`, as are streams the closing connection took down after it
/// processed them: the two cannot be told apart, and neither is retried.)
fn refused(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// Times a request that a closing connection gave back unsent is sent
/// again (each time on a connection that is not closed, or a new one).
const MAX_UNSENT_RETRIES: usize = 2;

#[derive(Clone, Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read extra CA file {path}: {message}")]
    ExtraCa { path: String, message: String },
    #[error("connect to {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("TLS to {host} ({addr}): {message}")]
    Tls {
        host: String,
        addr: SocketAddr,
        message: String,
    },
    #[error("HTTP to {host}: {message}")]
    Http {
        host: String,
        message: String,
        /// The provider refused the request before processing it (an
        /// HTTP/2 stream reset with `REFUSED_STREAM`): nothing to bill.
        unprocessed: bool,
    },
}

impl UpstreamError {
    /// A short, bounded label for metrics and the ledger.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::ExtraCa { .. } => "config",
            UpstreamError::Connect { .. } => "upstream_connect",
            UpstreamError::Tls { .. } => "upstream_tls",
            UpstreamError::Http { .. } => "upstream_http",
        }
    }

    /// The provider said it did not process the request.
    pub fn unprocessed(&self) -> bool {
        matches!(
            self,
            UpstreamError::Http {
                unprocessed: true,
                ..
            }
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    addr: SocketAddr,
    host: String,
    /// The client spoke HTTP/2, so HTTP/2 is offered upstream (ALPN); an
    /// HTTP/1.1 client gets HTTP/1.1 upstream. Mirroring the client keeps
    /// the provider's view of connections what it would be without the
    /// agent, and HTTP/1.1 costs the agent less per request than
    /// multiplexing one HTTP/2 connection.
    h2: bool,
}

/// An HTTP/2 connection and the streams open on it.
#[derive(Clone)]
struct H2Conn {
    send: http2::SendRequest<ProxyBody>,
    streams: Arc<AtomicUsize>,
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(H2Conn),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(h) => h.is_closed(),
            Sender::H2(c) => c.send.is_closed(),
        }
    }
}

/// Counts one open stream on an HTTP/2 connection until the response body
/// is done with (ended or dropped).
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(streams: &Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(streams.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body from upstream; on HTTP/2 it holds its stream's place
/// in the connection's count until dropped.
pub struct UpstreamBody {
    inner: Incoming,
    _stream: Option<StreamGuard>,
}

impl UpstreamBody {
    /// A body read from a connection of a test's own.
    #[cfg(test)]
    pub(crate) fn for_test(inner: Incoming) -> UpstreamBody {
        UpstreamBody {
            inner,
            _stream: None,
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream client. Cheap to share behind an `Arc`.
pub struct Upstream {
    /// Offers h2 and http/1.1.
    connector_h2: TlsConnector,
    /// Offers http/1.1 only.
    connector_h1: TlsConnector,
    pool: Mutex<Pool>,
    /// The addresses the agent resolved for each provider host: where a
    /// connection goes when the address the client dialed refuses it.
    known: KnownAddresses,
    /// Addresses that recently did not take a connection, and when: tried
    /// last for [`FAILED_FOR`].
    failed: Mutex<HashMap<SocketAddr, Instant>>,
    /// [`CONNECT_TIMEOUT`]; tests set it longer.
    connect_timeout: Duration,
}

pub use crate::intercept::resolver::KnownAddresses;

/// Other addresses tried after the dialed one fails to connect.
const MAX_OTHER_ADDRESSES: usize = 2;
/// How long a connection attempt has alone before the next address is
/// tried beside it. Linux sends a lost first SYN again after 1 s: an
/// attempt not answered a quarter second after that has lost it twice or
/// goes nowhere, and a blackholed address would otherwise hold the
/// request for the whole [`CONNECT_TIMEOUT`]. (Not 1 s exactly: one lost
/// SYN would then race the next address as a coin toss.)
const NEXT_ATTEMPT_AFTER: Duration = Duration::from_millis(1250);
/// How long an address that did not take a connection (refused, timed out,
/// or slower than another of the host's) is tried after the others.
const FAILED_FOR: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Pool {
    /// Idle HTTP/1.1 connections, and every open HTTP/2 connection.
    idle: HashMap<PoolKey, Vec<Sender>>,
    /// Keys whose next HTTP/2 connection is being opened, with the requests
    /// waiting for it: a burst past the streams one connection carries
    /// opens one more connection, not one per request.
    opening: HashMap<PoolKey, Vec<oneshot::Sender<Opened>>>,
}

/// How an attempt to open a key's next HTTP/2 connection ended, as told
/// to the requests waiting for it.
#[derive(Clone)]
enum Opened {
    /// It is in the pool: look again.
    H2,
    /// The provider chose HTTP/1.1: open your own (one request each).
    H1Only,
    Failed(UpstreamError),
}

impl Pool {
    /// An HTTP/2 connection of `key` with room, its stream counted before
    /// the pool lock is released (so a burst cannot overfill it).
    fn h2_with_room(&mut self, key: &PoolKey) -> Option<(H2Conn, StreamGuard)> {
        let list = self.idle.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        list.iter().find_map(|s| match s {
            Sender::H2(c)
                if c.send.is_ready() && c.streams.load(Ordering::Relaxed) < MAX_STREAMS_PER_H2 =>
            {
                Some((c.clone(), StreamGuard::new(&c.streams)))
            }
            _ => None,
        })
    }

    /// An idle HTTP/1.1 connection of `key`, taken out until checkin.
    fn h1_idle(&mut self, key: &PoolKey) -> Option<Sender> {
        let list = self.idle.get_mut(key)?;
        list.retain(|s| !s.is_closed());
        let i = list
            .iter()
            .position(|s| matches!(s, Sender::H1(h) if h.is_ready()))?;
        Some(list.swap_remove(i))
    }

    fn checkin(&mut self, key: PoolKey, s: Sender) {
        let list = self.idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_KEY {
            list.push(s);
        }
    }
}

/// Marks an HTTP/2 connection of a key as being opened. When it is
/// dropped, however the attempt ended, the key's entry is removed (once)
/// and the waiters are told the outcome; with none (the request that made
/// it went away) they are woken and look again.
struct Opening<'a> {
    pool: &'a Mutex<Pool>,
    key: PoolKey,
    outcome: Option<Opened>,
}

impl Opening<'_> {
    /// Ends the attempt with `outcome`. A failure fails the waiters with
    /// the same error rather than each trying (and timing out) in turn.
    fn finish(mut self, outcome: Opened) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.opening.remove(&self.key).unwrap_or_default()
        };
        // Without an outcome the senders are dropped: each waiter looks again.
        if let Some(outcome) = self.outcome.take() {
            for w in waiters {
                let _ = w.send(outcome.clone());
            }
        }
    }
}

/// What a request gets from the pool.
enum Checkout {
    H1(http1::SendRequest<ProxyBody>),
    H2(H2Conn, StreamGuard),
}

/// Builds the client TLS config: webpki roots plus `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let err = |message: String| UpstreamError::ExtraCa {
            path: path.display().to_string(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| err(format!("bad PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| err(format!("not a usable CA certificate: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(err("no CERTIFICATE block found".into()));
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| UpstreamError::ExtraCa {
        path: String::new(),
        message: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

impl Upstream {
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, UpstreamError> {
        let h2 = client_config(extra_ca)?;
        let mut h1 = h2.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Upstream {
            connector_h2: TlsConnector::from(Arc::new(h2)),
            connector_h1: TlsConnector::from(Arc::new(h1)),
            pool: Mutex::new(Pool::default()),
            known: KnownAddresses::default(),
            failed: Mutex::new(HashMap::new()),
            connect_timeout: CONNECT_TIMEOUT,
        })
    }

    /// The map of each provider host's addresses, for the resolver to keep
    /// current (see [`Upstream::connect_tls`]).
    pub fn known_addresses(&self) -> KnownAddresses {
        self.known.clone()
    }

    /// Where to connect for `key`: the dialed address first, then up to
    /// [`MAX_OTHER_ADDRESSES`] others the agent resolved for the host, of
    /// the same family first; an address that did not take a connection
    /// in the last [`FAILED_FOR`] goes after those that did not fail.
    fn candidates(&self, key: &PoolKey) -> Vec<SocketAddr> {
        let failed = self.recently_failed();
        let mut others = Vec::new();
        {
            let known = self.known.read().unwrap_or_else(|p| p.into_inner());
            if let Some(addrs) = known.get(&key.host) {
                others.extend(addrs.iter().copied().filter(|a| *a != key.addr));
            }
        }
        // Stable: in the resolver's order within each group.
        others.sort_by_key(|a| (failed.contains(a), a.is_ipv4() != key.addr.is_ipv4()));
        others.truncate(MAX_OTHER_ADDRESSES);
        let mut out = Vec::with_capacity(others.len() + 1);
        out.push(key.addr);
        out.extend(others);
        // The dialed address keeps its place unless it failed and another
        // did not.
        out.sort_by_key(|a| failed.contains(a));
        out
    }

    /// The addresses that did not take a connection in the last
    /// [`FAILED_FOR`] (expired entries are dropped).
    fn recently_failed(&self) -> Vec<SocketAddr> {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        failed.retain(|_, at| now.duration_since(*at) < FAILED_FOR);
        failed.keys().copied().collect()
    }

    /// Notes whether `addr` took a connection.
    fn note_attempt(&self, addr: SocketAddr, took: bool) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if took {
            failed.remove(&addr);
        } else {
            failed.insert(addr, Instant::now());
        }
    }

    /// A TCP connection to the first of `candidates` that takes one. Each
    /// attempt has [`NEXT_ATTEMPT_AFTER`] alone (or until it fails) before
    /// the next address is tried beside it, as clients race the addresses
    /// of a name (RFC 8305); the first to connect wins and the others are
    /// dropped. When none connects, the error is the dialed address's (else the first).
    async fn connect_first(
        &self,
        dialed: SocketAddr,
        candidates: &[SocketAddr],
    ) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let timeout = self.connect_timeout;
        let attempt =
            |addr: SocketAddr| async move { (addr, connect_tcp_within(addr, timeout).await) };
        let mut attempts = FuturesUnordered::new();
        let mut started = 0;
        // Each address's error, in the order they came.
        let mut errors: Vec<(SocketAddr, UpstreamError)> = Vec::new();
        let next_after = tokio::time::sleep(NEXT_ATTEMPT_AFTER);
        tokio::pin!(next_after);
        loop {
            // The next address starts when nothing is in flight (the last
            // attempt failed) or when the wait for it is over.
            if started < candidates.len() && attempts.is_empty() {
                attempts.push(attempt(candidates[started]));
                started += 1;
                next_after
                    .as_mut()
                    .reset(tokio::time::Instant::now() + NEXT_ATTEMPT_AFTER);
            }
            tokio::select! {
                done = attempts.next() => match done {
                    Some((addr, Ok(tcp))) => {
                        self.note_attempt(addr, true);
                        // Those started before it and still waiting had
                        // their head start and lost it: tried last for a
                        // while. Those started after it lost nothing.
                        let won_at = candidates.iter().position(|c| *c == addr).unwrap_or(0);
                        for slow in &candidates[..won_at] {
                            if !errors.iter().any(|(a, _)| a == slow) {
                                self.note_attempt(*slow, false);
                            }
                        }
                        return Ok((tcp, addr));
                    }
                    Some((addr, Err(e))) => {
                        self.note_attempt(addr, false);
                        errors.push((addr, e));
                        // Another still in flight: the next starts now
                        // rather than at the end of the wait.
                        if started < candidates.len() {
                            attempts.push(attempt(candidates[started]));
                            started += 1;
                            next_after
                                .as_mut()
                                .reset(tokio::time::Instant::now() + NEXT_ATTEMPT_AFTER);
                        }
                    }
                    None => {}
                },
                _ = &mut next_after, if started < candidates.len() && !attempts.is_empty() => {
                    attempts.push(attempt(candidates[started]));
                    started += 1;
                    next_after
                        .as_mut()
                        .reset(tokio::time::Instant::now() + NEXT_ATTEMPT_AFTER);
                }
            }
            if attempts.is_empty() && started == candidates.len() {
                // The dialed address's error (the one the client asked
                // for) before another's.
                let pick = errors.iter().position(|(a, _)| *a == dialed).unwrap_or(0);
                return Err(if errors.is_empty() {
                    UpstreamError::Connect {
                        addr: dialed,
                        message: "no address to connect to".into(),
                    }
                } else {
                    errors.swap_remove(pick).1
                });
            }
        }
    }

    /// Sends `req` to `host` at `addr`, reusing a pooled connection when one
    /// has room. `authority` is the `Host` the client asked for; the
    /// request's version (the client's) picks the upstream protocol.
    ///
    /// A connection that closes between checkout and send (a provider
    /// closing an idle keep-alive connection as it is reused) gives the
    /// request back unsent: it is sent again, on another connection, up to
    /// [`MAX_UNSENT_RETRIES`] times. A request hyper began to write is
    /// never sent twice. With `again`, which makes the request anew (its
    /// body read whole), an HTTP/2 stream the provider refused with
    /// `REFUSED_STREAM` (RFC 9113 §8.7: the request was not processed) is
    /// sent again too.
    pub async fn send(
        &self,
        addr: SocketAddr,
        host: &str,
        authority: &str,
        mut req: Request<ProxyBody>,
        again: Option<&(dyn Fn() -> Request<ProxyBody> + Send + Sync)>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let key = PoolKey {
            addr,
            host: host.to_string(),
            h2: req.version() == Version::HTTP_2,
        };
        let http_err = |e: hyper::Error| UpstreamError::Http {
            host: host.to_string(),
            message: e.to_string(),
            unprocessed: refused(&e),
        };
        let mut retries = 0;
        loop {
            let (sent, guard) = match self.checkout(&key).await? {
                Checkout::H1(mut s) => {
                    adapt_h1(&mut req, authority);
                    let sent = s.try_send_request(req).await;
                    if sent.is_ok() {
                        self.lock().checkin(key.clone(), Sender::H1(s));
                    }
                    (sent, None)
                }
                Checkout::H2(mut c, guard) => {
                    adapt_h2(&mut req, authority);
                    (c.send.try_send_request(req).await, Some(guard))
                }
            };
            match sent {
                Ok(resp) => {
                    return Ok(resp.map(|inner| UpstreamBody {
                        inner,
                        _stream: guard,
                    }));
                }
                Err(mut e) => match (e.take_message(), again) {
                    (Some(unsent), _) if retries < MAX_UNSENT_RETRIES => {
                        retries += 1;
                        tracing::debug!(
                            host,
                            error = %e.error(),
                            "upstream connection closed before the request went out; sending it on another"
                        );
                        req = unsent;
                    }
                    (None, Some(make)) if retries < MAX_UNSENT_RETRIES && refused(e.error()) => {
                        retries += 1;
                        tracing::debug!(
                            host,
                            error = %e.error(),
                            "the provider refused the stream unprocessed; sending it again"
                        );
                        req = make();
                    }
                    _ => return Err(http_err(e.into_error())),
                },
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection for one request. HTTP/1.1: an idle one or a new one.
    /// HTTP/2: a stream on a connection with room; when none has room, one
    /// request opens the next connection while the others of its key wait
    /// for it (then look again), so a burst of N requests opens
    /// N / MAX_STREAMS_PER_H2 connections, not N.
    async fn checkout(&self, key: &PoolKey) -> Result<Checkout, UpstreamError> {
        if !key.h2 {
            let idle = self.lock().h1_idle(key);
            return Ok(match idle {
                Some(Sender::H1(s)) => Checkout::H1(s),
                _ => self.adopt(key, self.connect(key).await?),
            });
        }
        loop {
            let wait = {
                let mut pool = self.lock();
                if let Some((c, guard)) = pool.h2_with_room(key) {
                    return Ok(Checkout::H2(c, guard));
                }
                // A provider that answered an earlier request in HTTP/1.1.
                if let Some(Sender::H1(s)) = pool.h1_idle(key) {
                    return Ok(Checkout::H1(s));
                }
                match pool.opening.get_mut(key) {
                    Some(waiters) => {
                        let (tx, rx) = oneshot::channel();
                        waiters.push(tx);
                        Some(rx)
                    }
                    None => {
                        pool.opening.insert(key.clone(), Vec::new());
                        None
                    }
                }
            };
            if let Some(rx) = wait {
                match rx.await {
                    Ok(Opened::Failed(e)) => return Err(e),
                    Ok(Opened::H1Only) => return Ok(self.adopt(key, self.connect(key).await?)),
                    // Opened, or its opener went away: look again.
                    Ok(Opened::H2) | Err(_) => continue,
                }
            }
            let opening = Opening {
                pool: &self.pool,
                key: key.clone(),
                outcome: None,
            };
            let out = match self.connect(key).await {
                Ok(conn) => self.adopt(key, conn),
                Err(e) => {
                    opening.finish(Opened::Failed(e.clone()));
                    return Err(e);
                }
            };
            opening.finish(match out {
                // In the pool already: the waiters join it.
                Checkout::H2(..) => Opened::H2,
                // The provider chose HTTP/1.1: each waiter opens its own.
                Checkout::H1(_) => Opened::H1Only,
            });
            return Ok(out);
        }
    }

    /// A new connection for this request. An HTTP/2 one goes into the pool
    /// at once, with this request's stream counted, for others to share.
    fn adopt(&self, key: &PoolKey, conn: Sender) -> Checkout {
        match conn {
            Sender::H1(s) => Checkout::H1(s),
            Sender::H2(c) => {
                let guard = StreamGuard::new(&c.streams);
                self.lock().checkin(key.clone(), Sender::H2(c.clone()));
                Checkout::H2(c, guard)
            }
        }
    }

    /// Sends an HTTP/1.1 upgrade request (a WebSocket handshake) on a
    /// connection of its own, never pooled: after a `101` it carries the
    /// upgraded protocol (`hyper::upgrade::on` the response). The
    /// `Upgrade` header is kept, and `Connection` says `upgrade`.
    pub async fn send_upgrade(
        &self,
        addr: SocketAddr,
        host: &str,
        authority: &str,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = PoolKey {
            addr,
            host: host.to_string(),
            h2: false,
        };
        let upgrade = req.headers().get(header::UPGRADE).cloned();
        adapt_h1(&mut req, authority);
        if let Some(u) = upgrade {
            req.headers_mut().insert(header::UPGRADE, u);
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let http_err = |e: hyper::Error| UpstreamError::Http {
            host: host.to_string(),
            message: e.to_string(),
            unprocessed: false,
        };
        let io = TokioIo::new(self.connect_tls(&key).await?);
        let (mut s, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(http_err)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream upgrade connection ended");
            }
        });
        s.send_request(req).await.map_err(http_err)
    }

    async fn connect(&self, key: &PoolKey) -> Result<Sender, UpstreamError> {
        let tls = self.connect_tls(key).await?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let http_err = |e: hyper::Error| UpstreamError::Http {
            host: key.host.clone(),
            message: e.to_string(),
            unprocessed: false,
        };
        if h2 {
            // Every stream may hold its whole window unread (a job that
            // stops reading a large answer): the connection's window is
            // the sum of its streams', so that stalled streams of some jobs
            // never stop the provider sending on the others'. hyper's
            // default connection window (5 MiB) was used up by three.
            let (s, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_STREAM_WINDOW * MAX_STREAMS_PER_H2 as u32)
                .handshake(io)
                .await
                .map_err(http_err)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            Ok(Sender::H2(H2Conn {
                send: s,
                streams: Arc::new(AtomicUsize::new(0)),
            }))
        } else {
            let (s, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(http_err)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h1 connection ended");
                }
            });
            Ok(Sender::H1(s))
        }
    }

    /// A TCP connection to `key.addr` and a TLS session for `key.host`
    /// over it (ALPN `h2` and `http/1.1` for an HTTP/2 key, else
    /// `http/1.1` alone).
    ///
    /// When the dialed address does not take the connection (refused,
    /// unreachable, not answering within [`NEXT_ATTEMPT_AFTER`]), another
    /// address the agent resolved for the same host is tried, as the client
    /// would have tried the next address of the name without the agent (its
    /// own connect went to the agent and succeeded). The certificate is
    /// verified for `key.host` whichever address answers; an address of
    /// another host is never used.
    async fn connect_tls(
        &self,
        key: &PoolKey,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
        let (tcp, addr) = self.connect_first(key.addr, &self.candidates(key)).await?;
        if addr != key.addr {
            tracing::debug!(
                host = %key.host,
                dialed = %key.addr,
                %addr,
                "the dialed provider address did not connect; another of the host's did"
            );
        }
        let tls_err = |message: String| UpstreamError::Tls {
            host: key.host.clone(),
            addr,
            message,
        };
        let name = ServerName::try_from(key.host.clone())
            .map_err(|e| tls_err(format!("bad server name: {e}")))?;
        let connector = if key.h2 {
            &self.connector_h2
        } else {
            &self.connector_h1
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| tls_err("handshake timed out".into()))?
            .map_err(|e| tls_err(e.to_string()))
    }
}

/// Keepalive probes on upstream connections: after 60 s without traffic,
/// every 15 s, 4 unanswered probes end the connection.
const KEEPALIVE_IDLE_SECS: u32 = 60;
const KEEPALIVE_INTERVAL_SECS: u32 = 15;
const KEEPALIVE_PROBES: u32 = 4;
/// Data sent and not acknowledged for this long ends the connection
/// (`TCP_USER_TIMEOUT`): keepalive does not probe while there is unsent
/// or unacknowledged data, so a path that died mid-upload would otherwise
/// retransmit for ~15 minutes. A long generation with nothing in flight
/// is not affected.
const USER_TIMEOUT_MS: u32 = 120_000;

/// A TCP connection to a provider (bounded by [`CONNECT_TIMEOUT`]), with
/// no delay for small writes and keepalive probes, so that a path that
/// died silently (a NAT that forgot a long stream or a WebSocket) ends
/// the connection instead of leaving a read waiting for ever.
pub(super) async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
    connect_tcp_within(addr, CONNECT_TIMEOUT).await
}

async fn connect_tcp_within(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| UpstreamError::Connect {
            addr,
            message: "timed out".into(),
        })?
        .map_err(|e| UpstreamError::Connect {
            addr,
            message: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    {
        use nix::sys::socket::{setsockopt, sockopt};
        let _ = setsockopt(&tcp, sockopt::KeepAlive, &true);
        let _ = setsockopt(&tcp, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE_SECS);
        let _ = setsockopt(&tcp, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL_SECS);
        let _ = setsockopt(&tcp, sockopt::TcpKeepCount, &KEEPALIVE_PROBES);
        let _ = setsockopt(&tcp, sockopt::TcpUserTimeout, &USER_TIMEOUT_MS);
    }
    Ok(tcp)
}

/// Hop-by-hop headers that belong to one connection, not the request.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP) {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

fn adapt_h1(req: &mut Request<ProxyBody>, authority: &str) {
    strip_hop_by_hop(req.headers_mut());
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if let Ok(u) = pq.parse::<Uri>() {
        *req.uri_mut() = u;
    }
    if !req.headers().contains_key(header::HOST)
        && let Ok(v) = HeaderValue::from_str(authority)
    {
        req.headers_mut().insert(header::HOST, v);
    }
    *req.version_mut() = Version::HTTP_11;
}

fn adapt_h2(req: &mut Request<ProxyBody>, authority: &str) {
    // `te: trailers` is the one TE that HTTP/2 allows (RFC 9113 §8.2.2),
    // and gRPC servers refuse a request without it: kept, alone, if the
    // client's TE names it among others.
    let trailers = req.headers().get_all(header::TE).iter().any(|v| {
        v.as_bytes().split(|&b| b == b',').any(|c| {
            c.split(|&b| b == b';')
                .next()
                .unwrap_or(c)
                .trim_ascii()
                .eq_ignore_ascii_case(b"trailers")
        })
    });
    strip_hop_by_hop(req.headers_mut());
    if trailers {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    req.headers_mut().remove(header::HOST);
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if let Ok(u) = format!("https://{authority}{pq}").parse::<Uri>() {
        *req.uri_mut() = u;
    }
    *req.version_mut() = Version::HTTP_2;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn strips_connection_named_headers() {
        let mut h = http::HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-foo".parse().unwrap());
        h.insert("x-foo", "1".parse().unwrap());
        h.insert("x-bar", "2".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-foo").is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h.get("x-bar").unwrap(), "2");
    }

    #[test]
    fn te_trailers_goes_on_to_an_http2_upstream_alone_and_no_other_te() {
        let req = |te: &str| {
            let mut r = Request::new(ProxyBody::default());
            r.headers_mut().insert(header::TE, te.parse().unwrap());
            r
        };
        let mut r = req("trailers");
        adapt_h2(&mut r, "api.example.com");
        assert_eq!(r.headers().get(header::TE).unwrap(), "trailers");
        let mut r = req("gzip, trailers");
        adapt_h2(&mut r, "api.example.com");
        assert_eq!(r.headers().get(header::TE).unwrap(), "trailers");
        let mut r = req("gzip");
        adapt_h2(&mut r, "api.example.com");
        assert!(r.headers().get(header::TE).is_none());
        let mut r = req("trailers");
        adapt_h1(&mut r, "api.example.com");
        assert!(r.headers().get(header::TE).is_none());
    }

    #[test]
    fn extra_ca_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a pem").unwrap();
        let e = client_config(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let e = client_config(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }

    #[tokio::test]
    async fn upstream_sockets_probe_a_silent_path() {
        use nix::sys::socket::{getsockopt, sockopt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = connect_tcp(listener.local_addr().unwrap()).await.unwrap();
        assert!(getsockopt(&tcp, sockopt::KeepAlive).unwrap());
        assert_eq!(
            getsockopt(&tcp, sockopt::TcpKeepIdle).unwrap(),
            KEEPALIVE_IDLE_SECS
        );
        assert_eq!(
            getsockopt(&tcp, sockopt::TcpKeepInterval).unwrap(),
            KEEPALIVE_INTERVAL_SECS
        );
        assert_eq!(
            getsockopt(&tcp, sockopt::TcpKeepCount).unwrap(),
            KEEPALIVE_PROBES
        );
        assert_eq!(
            getsockopt(&tcp, sockopt::TcpUserTimeout).unwrap(),
            USER_TIMEOUT_MS
        );
        assert!(tcp.nodelay().unwrap());
    }

    /// A TLS server for `host` (a leaf from the agent's own CA) that
    /// echoes each request's body with a 200, counting requests.
    pub(crate) struct EchoServer {
        pub(crate) addr: SocketAddr,
        pub(crate) served: Arc<AtomicUsize>,
        pub(crate) ca: crate::ca::LocalCa,
        _dir: tempfile::TempDir,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for EchoServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A loopback listener for a TLS server of `host`, with a leaf from a
    /// CA of its own (which the client is given to trust).
    async fn tls_listener(
        host: &str,
    ) -> (
        tokio::net::TcpListener,
        Arc<rustls::ServerConfig>,
        crate::ca::LocalCa,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = crate::ca::LocalCa::load_or_create(dir.path(), &[host.to_string()])
            .expect("a CA for the test server");
        let server_config = ca.server_config(host).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        (listener, server_config, ca, dir)
    }

    /// Accepts TLS connections on `listener` with `server_config`, each
    /// handed to `serve` on a task of its own.
    fn serve_tls<F, Fut>(
        listener: tokio::net::TcpListener,
        server_config: Arc<rustls::ServerConfig>,
        serve: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut
            + Send
            + Sync
            + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, serve) = (acceptor.clone(), serve.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(sock).await {
                        serve(tls).await;
                    }
                });
            }
        })
    }

    pub(crate) async fn echo_server(host: &str) -> EchoServer {
        let (listener, server_config, ca, dir) = tls_listener(host).await;
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let task = spawn_echo(listener, server_config, served.clone());
        EchoServer {
            addr,
            served,
            ca,
            _dir: dir,
            task,
        }
    }

    /// Accepts TLS connections on `listener` with `server_config` and
    /// answers each HTTP/1.1 request with a 200 echoing its body (and its
    /// Content-Encoding, as `x-echo-content-encoding`), counting the
    /// requests in `counted`.
    fn spawn_echo(
        listener: tokio::net::TcpListener,
        server_config: Arc<rustls::ServerConfig>,
        counted: Arc<AtomicUsize>,
    ) -> tokio::task::JoinHandle<()> {
        use http_body_util::{BodyExt, Full};
        serve_tls(listener, server_config, move |tls| {
            let counted = counted.clone();
            async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let counted = counted.clone();
                    async move {
                        // (What the request's body was sent in, said back.)
                        let encoding = req.headers().get(http::header::CONTENT_ENCODING).cloned();
                        let body = req.into_body().collect().await?.to_bytes();
                        counted.fetch_add(1, Ordering::SeqCst);
                        let mut resp = Response::new(Full::new(body));
                        if let Some(e) = encoding {
                            resp.headers_mut().insert("x-echo-content-encoding", e);
                        }
                        Ok::<_, hyper::Error>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            }
        })
    }

    fn post(host: &str, body: &'static [u8]) -> Request<ProxyBody> {
        use http_body_util::{BodyExt, Full};
        Request::builder()
            .method("POST")
            .uri(format!("https://{host}/v1/chat/completions"))
            .body(
                Full::new(bytes::Bytes::from_static(body))
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .unwrap()
    }

    /// The dialed address refuses the connection: another address the
    /// agent resolved for the same host takes it (as the client would have
    /// tried it without the agent). Another host's addresses are not used.
    #[tokio::test]
    async fn a_dialed_address_that_refuses_gives_way_to_another_of_the_host() {
        use http_body_util::BodyExt;
        let host = "api.openai.com";
        let server = echo_server(host).await;
        let up = Upstream::new(Some(server.ca.cert_path())).unwrap();
        // A port bound and never listened on refuses connections, and stays
        // taken for the test (a port freed again could be anyone's).
        let closed = tokio::net::TcpSocket::new_v4().unwrap();
        closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let refused = closed.local_addr().unwrap();
        let connect_error = |why: &'static str| {
            let up = &up;
            async move {
                let err = up
                    .send(refused, host, host, post(host, b"{}"), None)
                    .await
                    .err()
                    .expect(why);
                assert_eq!(err.kind(), "upstream_connect", "{why}: {err}");
            }
        };
        // Without other addresses: the dialed one's error.
        connect_error("nothing listens there").await;
        // Another host's address is not this host's.
        up.known_addresses()
            .write()
            .unwrap()
            .insert("api.anthropic.com".into(), vec![server.addr]);
        connect_error("only the host's own addresses").await;
        // The host's other address answers. (The refusals above put the
        // dialed address last for a while: forgotten here, so that the
        // fallback after a refusal is what is tested.)
        up.known_addresses()
            .write()
            .unwrap()
            .insert(host.into(), vec![refused, server.addr]);
        up.note_attempt(refused, true);
        let key = PoolKey {
            addr: refused,
            host: host.to_string(),
            h2: false,
        };
        assert_eq!(up.candidates(&key), vec![refused, server.addr]);
        let resp = up
            .send(refused, host, host, post(host, b"{\"ok\":1}"), None)
            .await
            .expect("sent to the host's other address");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"ok\":1}");
        assert_eq!(server.served.load(Ordering::SeqCst), 1);
    }

    /// A dialed address that does not answer (a full accept queue drops
    /// the SYN, as a blackholed address does) does not hold the request
    /// for the connect timeout: the host's other address is tried beside
    /// it and takes the request while the first attempt still waits, and
    /// the silent address is tried last from then on.
    #[tokio::test]
    async fn a_dialed_address_that_does_not_answer_gives_way_without_waiting_out_the_timeout() {
        let host = "api.openai.com";
        let server = echo_server(host).await;
        let mut up = Upstream::new(Some(server.ca.cert_path())).unwrap();
        // Far longer than the guard below: only trying the next address
        // while the first attempt still waits can pass.
        up.connect_timeout = Duration::from_secs(3600);
        let silent = tokio::net::TcpSocket::new_v4().unwrap();
        silent.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let silent = silent.listen(0).unwrap();
        let blackhole = silent.local_addr().unwrap();
        // Fill the accept queue (never accepted): further SYNs are dropped.
        // A loopback handshake is the kernel's alone (no task to schedule),
        // so one not done in 2 s is a dropped SYN, not a slow host.
        let mut queued = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(blackhole)).await
            {
                Ok(Ok(s)) => queued.push(s),
                Ok(Err(e)) => panic!("filling the accept queue: {e}"),
                Err(_) => break,
            }
            assert!(queued.len() < 16, "the accept queue never filled");
        }
        up.known_addresses()
            .write()
            .unwrap()
            .insert(host.into(), vec![blackhole, server.addr]);
        let resp = tokio::time::timeout(
            Duration::from_secs(60),
            up.send(blackhole, host, host, post(host, b"{}"), None),
        )
        .await
        .expect("the other address was not tried while the first waited")
        .expect("sent to the host's other address");
        assert_eq!(resp.status(), 200);
        assert_eq!(server.served.load(Ordering::SeqCst), 1);
        let key = PoolKey {
            addr: blackhole,
            host: host.to_string(),
            h2: false,
        };
        assert_eq!(
            up.candidates(&key),
            vec![server.addr, blackhole],
            "the silent address goes last"
        );
        up.note_attempt(blackhole, true);
        assert_eq!(up.candidates(&key), vec![blackhole, server.addr]);
        drop(queued);
    }

    /// A pooled HTTP/1.1 connection that closes between checkout and send
    /// (a provider closing an idle keep-alive connection just as it is
    /// reused) gives the request back unsent: it goes out once, on a new
    /// connection, and the client gets the provider's answer, not a 502.
    #[tokio::test]
    async fn a_request_a_closing_pooled_connection_gave_back_goes_out_on_a_new_one() {
        use http_body_util::BodyExt;
        let host = "api.openai.com";
        let server = echo_server(host).await;
        let (addr, served) = (server.addr, server.served.clone());
        let up = Upstream::new(Some(server.ca.cert_path())).unwrap();

        // A pooled connection whose task ends (as on the provider's FIN)
        // only once the request is queued on it: checkout sees it open and
        // ready, and hyper hands the request back unsent.
        let (io, _peer) = tokio::io::duplex(4096);
        let (stale, conn) = http1::handshake::<_, ProxyBody>(TokioIo::new(io))
            .await
            .unwrap();
        let (close, closed) = oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = closed => {}
                _ = conn => {}
            }
        });
        for _ in 0..100 {
            if stale.is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(stale.is_ready(), "the stale connection looks usable");
        let key = PoolKey {
            addr,
            host: host.to_string(),
            h2: false,
        };
        up.lock().checkin(key, Sender::H1(stale));
        close.send(()).unwrap();

        let resp = up
            .send(addr, host, host, post(host, b"{\"model\":\"m\"}"), None)
            .await
            .expect("sent again on a new connection");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"model\":\"m\"}", "the body went out whole");
        assert_eq!(served.load(Ordering::SeqCst), 1, "sent once");
    }

    /// An HTTP/2 provider that resets the first `refuse` streams with
    /// `REFUSED_STREAM` and echoes the body of the others: (address, its
    /// CA, streams refused, requests served).
    async fn refusing_h2_server(
        host: &str,
        refuse: usize,
    ) -> (
        SocketAddr,
        crate::ca::LocalCa,
        tempfile::TempDir,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        let (listener, server_config, ca, dir) = tls_listener(host).await;
        let addr = listener.local_addr().unwrap();
        let (refused, served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, sv) = (refused.clone(), served.clone());
        serve_tls(listener, server_config, move |tls| {
            let (r, sv) = (r.clone(), sv.clone());
            async move {
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if r.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    r.fetch_sub(1, Ordering::SeqCst);
                    let sv = sv.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            got.extend_from_slice(&chunk);
                        }
                        sv.fetch_add(1, Ordering::SeqCst);
                        let Ok(mut send) = respond.send_response(Response::new(()), false) else {
                            return;
                        };
                        let _ = send.send_data(bytes::Bytes::from(got), true);
                    });
                }
            }
        });
        (addr, ca, dir, refused, served)
    }

    /// An h2 server whose `/big` answers 3 MiB and anything else 5 bytes,
    /// with windows of its own far larger than the agent's; it counts the
    /// bytes it has sent.
    async fn h2_big_server(
        host: &str,
    ) -> (
        SocketAddr,
        crate::ca::LocalCa,
        tempfile::TempDir,
        Arc<AtomicUsize>,
    ) {
        let (listener, server_config, ca, dir) = tls_listener(host).await;
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicUsize::new(0));
        let counted = sent.clone();
        serve_tls(listener, server_config, move |tls| {
            let counted = counted.clone();
            async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .initial_window_size(16 << 20)
                    .initial_connection_window_size(64 << 20)
                    .handshake(tls)
                    .await
                else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let counted = counted.clone();
                    tokio::spawn(async move {
                        let mut data = if req.uri().path() == "/big" {
                            bytes::Bytes::from(vec![b'x'; 3 << 20])
                        } else {
                            bytes::Bytes::from_static(b"small")
                        };
                        let Ok(mut send) = respond.send_response(Response::new(()), false) else {
                            return;
                        };
                        while !data.is_empty() {
                            send.reserve_capacity(data.len());
                            let Some(Ok(room)) =
                                std::future::poll_fn(|cx| send.poll_capacity(cx)).await
                            else {
                                return;
                            };
                            let chunk = data.split_to(room.min(data.len()));
                            counted.fetch_add(chunk.len(), Ordering::SeqCst);
                            if send.send_data(chunk, data.is_empty()).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        (addr, ca, dir, sent)
    }

    /// Large answers that jobs do not read (stopped or slow clients) hold
    /// their streams' windows, never the whole connection's: another job's
    /// answer on the same pooled connection still arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_large_answers_do_not_stop_the_others_on_their_connection() {
        use http_body_util::BodyExt;
        let host = "api.openai.com";
        let (addr, ca, _dir, sent) = h2_big_server(host).await;
        let up = Upstream::new(Some(ca.cert_path())).unwrap();
        let get = |path: &str| {
            Request::builder()
                .version(Version::HTTP_2)
                .uri(format!("https://{host}{path}"))
                .body(
                    http_body_util::Empty::new()
                        .map_err(|e| match e {})
                        .boxed_unsync(),
                )
                .unwrap()
        };
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(up.send(addr, host, host, get("/big"), None).await.unwrap());
        }
        assert_eq!(
            up.lock().idle.values().map(Vec::len).sum::<usize>(),
            1,
            "the three share one connection"
        );
        // Until the provider has sent what the windows let it: each
        // stream's window (1.5 MiB in all), or all of a connection window
        // too small for them.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while sent.load(Ordering::SeqCst) < 3 * H2_STREAM_WINDOW as usize
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let small = up
            .send(addr, host, host, get("/small"), None)
            .await
            .unwrap();
        let body = tokio::time::timeout(Duration::from_secs(20), small.into_body().collect())
            .await
            .expect("the small answer never came: the unread streams hold the connection's window")
            .expect("the small answer");
        assert_eq!(&body.to_bytes()[..], b"small");
        drop(held);
    }

    /// A stream the provider refuses unprocessed (RFC 9113 §8.7) is sent
    /// again when the request can be made anew; a streamed request cannot,
    /// and gets the error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_h2_stream_the_provider_refused_is_sent_again() {
        use http_body_util::{BodyExt, Full};
        let host = "api.openai.com";
        let make = || {
            Request::builder()
                .method("POST")
                .version(Version::HTTP_2)
                .uri(format!("https://{host}/v1/chat/completions"))
                .body(
                    Full::new(bytes::Bytes::from_static(b"{\"model\":\"m\"}"))
                        .map_err(|e| match e {})
                        .boxed_unsync(),
                )
                .unwrap()
        };
        let (addr, ca, _dir, refused, served) = refusing_h2_server(host, 1).await;
        let up = Upstream::new(Some(ca.cert_path())).unwrap();
        let resp = up
            .send(addr, host, host, make(), Some(&make))
            .await
            .expect("sent again");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"model\":\"m\"}");
        assert_eq!(
            (
                refused.load(Ordering::SeqCst),
                served.load(Ordering::SeqCst)
            ),
            (1, 1)
        );

        let (addr, ca, _dir, refused, served) = refusing_h2_server(host, 1).await;
        let up = Upstream::new(Some(ca.cert_path())).unwrap();
        let err = match up.send(addr, host, host, make(), None).await {
            Ok(_) => panic!("a refused stream that cannot be made again succeeded"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), "upstream_http", "{err}");
        assert!(err.unprocessed(), "{err}");
        assert_eq!(
            (
                refused.load(Ordering::SeqCst),
                served.load(Ordering::SeqCst)
            ),
            (1, 0)
        );

        // A provider that keeps refusing: tried a bounded number of times.
        let (addr, ca, _dir, refused, _) = refusing_h2_server(host, usize::MAX).await;
        let up = Upstream::new(Some(ca.cert_path())).unwrap();
        assert!(
            up.send(addr, host, host, make(), Some(&make))
                .await
                .is_err()
        );
        assert_eq!(refused.load(Ordering::SeqCst), 1 + MAX_UNSENT_RETRIES);
    }

    /// A burst of HTTP/2 requests to a provider with no open connection
    /// makes one connection attempt, and when it fails every request gets
    /// its error (none retries in turn behind a timeout).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_h2_burst_opens_one_connection_and_shares_its_failure() {
        use http_body_util::{BodyExt, Empty};
        const BURST: usize = 8;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(Upstream::new(None).unwrap());
        let accepts = Arc::new(AtomicUsize::new(0));
        let (counted, pool) = (accepts.clone(), up.clone());
        let server = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                // Hold the handshake until the rest of the burst waits
                // behind it (bounded, so a broken pool fails the asserts
                // below instead of hanging), then hang up: the TLS
                // handshake fails.
                let pool = pool.clone();
                tokio::spawn(async move {
                    for _ in 0..500 {
                        let waiting: usize = pool.lock().opening.values().map(Vec::len).sum();
                        if waiting >= BURST - 1 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    drop(sock);
                });
            }
        });
        let mut tasks = Vec::new();
        for _ in 0..BURST {
            let up = up.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::builder()
                    .version(Version::HTTP_2)
                    .uri("https://api.openai.com/v1/models")
                    .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
                    .unwrap();
                up.send(addr, "api.openai.com", "api.openai.com", req, None)
                    .await
            }));
        }
        for t in tasks {
            let err = match t.await.unwrap() {
                Ok(_) => panic!("a request succeeded against a server that hangs up"),
                Err(e) => e,
            };
            assert_eq!(err.kind(), "upstream_tls", "{err}");
        }
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            1,
            "one connection attempt for the burst"
        );
        assert!(
            up.lock().opening.is_empty(),
            "no key left marked as opening"
        );
        server.abort();
    }

    /// A CA of the test's own, unconstrained (the agent's CA carries name
    /// constraints, which would fail a leaf for another host for another
    /// reason), with its certificate in a PEM file as `upstream.extra_ca`
    /// names one.
    struct TestCa {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
        pem: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl TestCa {
        fn new(name: &str) -> TestCa {
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(60);
            params.not_after = now + time::Duration::days(60);
            let issuer =
                rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                    .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let pem = dir.path().join("ca.pem");
            std::fs::write(&pem, issuer.pem()).unwrap();
            TestCa {
                issuer,
                pem,
                _dir: dir,
            }
        }

        /// A server presenting a leaf this CA signed for `san` alone (its
        /// common name is `cn`, which verification must not look at), valid
        /// from `not_before` to `not_after` days from now, answering as
        /// [`spawn_echo`] does.
        async fn serve(&self, cn: &str, san: &str, not_before: i64, not_after: i64) -> TestServer {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            params.subject_alt_names =
                vec![rcgen::SanType::DnsName(san.to_string().try_into().unwrap())];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + time::Duration::days(not_before);
            params.not_after = now + time::Duration::days(not_after);
            params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            params.use_authority_key_identifier_extension = true;
            let leaf = params.signed_by(&key, &self.issuer).unwrap();
            let key = rustls_pki_types::PrivateKeyDer::from(
                rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
            );
            let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
            // The echo service speaks HTTP/1.1: an HTTP/2 client's key
            // gets it through ALPN.
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let served = Arc::new(AtomicUsize::new(0));
            let task = spawn_echo(listener, Arc::new(cfg), served.clone());
            TestServer { addr, served, task }
        }
    }

    struct TestServer {
        addr: SocketAddr,
        served: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Sends a POST for `host` to `server` as an HTTP/1.1 client's request
    /// and as an HTTP/2 client's (the two TLS configurations), each on a
    /// new connection (a failed handshake pools nothing).
    async fn send_as_both(
        up: &Upstream,
        server: &TestServer,
        host: &str,
    ) -> Vec<Result<Response<UpstreamBody>, UpstreamError>> {
        let mut out = Vec::new();
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let mut req = post(host, b"{\"model\":\"m\"}");
            *req.version_mut() = version;
            // A hang guard only: a refused handshake ends at once.
            let sent = tokio::time::timeout(
                Duration::from_secs(30),
                up.send(server.addr, host, host, req, None),
            )
            .await
            .expect("the send did not hang");
            out.push(sent);
        }
        out
    }

    /// Every result is the TLS error for `host` at `server`, for the
    /// reason `why` (a fragment of rustls's message), and nothing reached
    /// the server's HTTP service.
    fn assert_refused(
        sent: Vec<Result<Response<UpstreamBody>, UpstreamError>>,
        server: &TestServer,
        host: &str,
        why: &str,
    ) {
        assert_eq!(sent.len(), 2);
        for sent in sent {
            match sent {
                Ok(resp) => panic!(
                    "a certificate that should fail ({why}) was accepted: answered {}",
                    resp.status()
                ),
                Err(UpstreamError::Tls {
                    host: h,
                    addr,
                    message,
                }) => {
                    assert_eq!((h.as_str(), addr), (host, server.addr));
                    assert!(message.contains(why), "expected {why:?}: {message}");
                }
                Err(other) => panic!("expected a TLS error ({why}), got {other:?}"),
            }
        }
        assert_eq!(server.served.load(Ordering::SeqCst), 0, "no request served");
    }

    /// The control for the tests below: a leaf from the extra CA, for the
    /// host asked for and in its validity period, is accepted and the
    /// request answered (so their server, leaf and extra CA work, and what
    /// fails there is the one thing each changes).
    #[tokio::test]
    async fn an_upstream_certificate_that_verifies_for_the_host_is_accepted() {
        use http_body_util::BodyExt;
        let host = "api.openai.com";
        let ca = TestCa::new("upstream test CA");
        let server = ca.serve(host, host, -1, 30).await;
        let up = Upstream::new(Some(&ca.pem)).unwrap();
        for sent in send_as_both(&up, &server, host).await {
            let resp = sent.expect("a certificate that verifies is accepted");
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"{\"model\":\"m\"}");
        }
        assert_eq!(server.served.load(Ordering::SeqCst), 2);
    }

    /// A leaf for the host from a CA that is neither a webpki root nor the
    /// extra CA is refused, with or without an extra CA configured, and
    /// when its CA bears the extra CA's very name.
    #[tokio::test]
    async fn an_upstream_certificate_from_an_untrusted_ca_is_refused() {
        let host = "api.openai.com";
        let trusted = TestCa::new("upstream test CA");
        let rogue = TestCa::new("rogue CA");
        let server = rogue.serve(host, host, -1, 30).await;
        for extra_ca in [None, Some(trusted.pem.as_path())] {
            let up = Upstream::new(extra_ca).unwrap();
            let sent = send_as_both(&up, &server, host).await;
            assert_refused(sent, &server, host, "UnknownIssuer");
        }
        // Found by its name among the roots, the impostor's signature
        // does not verify with the trusted CA's key.
        let impostor = TestCa::new("upstream test CA");
        let server = impostor.serve(host, host, -1, 30).await;
        let up = Upstream::new(Some(&trusted.pem)).unwrap();
        let sent = send_as_both(&up, &server, host).await;
        assert_refused(sent, &server, host, "BadSignature");
    }

    /// A leaf from the extra CA for another host (another provider's,
    /// though its common name is the host asked for) is refused: the
    /// certificate must verify for the SNI, not merely chain to a root.
    #[tokio::test]
    async fn an_upstream_certificate_for_another_host_is_refused() {
        let host = "api.openai.com";
        let ca = TestCa::new("upstream test CA");
        let server = ca.serve(host, "api.anthropic.com", -1, 30).await;
        let up = Upstream::new(Some(&ca.pem)).unwrap();
        let sent = send_as_both(&up, &server, host).await;
        assert_refused(sent, &server, host, "certificate not valid for name");
    }

    /// A leaf from the extra CA for the host, but expired (or not valid
    /// yet), is refused.
    #[tokio::test]
    async fn an_expired_upstream_certificate_is_refused() {
        let host = "api.openai.com";
        let ca = TestCa::new("upstream test CA");
        let up = Upstream::new(Some(&ca.pem)).unwrap();
        let expired = ca.serve(host, host, -30, -1).await;
        let sent = send_as_both(&up, &expired, host).await;
        assert_refused(sent, &expired, host, "certificate expired");
        let early = ca.serve(host, host, 1, 30).await;
        let sent = send_as_both(&up, &early, host).await;
        assert_refused(sent, &early, host, "certificate not valid yet");
    }
}
