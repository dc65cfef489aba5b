//! The transparent proxy: accepts redirected connections, finds their
//! origin, peeks the ClientHello, splices non-provider traffic untouched and
//! terminates provider TLS with a leaf from the local CA.
//!
//! Owns: connections, TLS termination, the upstream pool, draining.
//! Must never: parse provider payloads (adapters do), serve a connection
//! that has no origin record (it would be an open proxy), or await disk or
//! exporter I/O before forwarding bytes.

/// `AsyncWrite` for a reading wrapper (`$ty<T>` with an `inner: T`): every
/// write goes straight to the stream it wraps.
macro_rules! forward_async_write {
    ($ty:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}

pub mod batches;

pub mod clienthello;
mod first_bytes;
mod http;
pub mod parked;
pub mod rewind;
pub mod sessions;
pub mod upstream;
mod websocket;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::attribution::{Attributor, Caller};
use crate::ca::LocalCa;
use crate::intercept::ConnOrigin;
use crate::meter::RecordSink;
use crate::providers::catalogue::{self, ProviderHost};
use clienthello::HelloError;
use rewind::Rewind;
use upstream::Upstream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// How many distinct unpriced (provider, model) pairs are warned about;
/// past that (a job inventing model names) they are logged at debug only.
const UNPRICED_WARNINGS: usize = 64;

/// How long a client may take to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection that has not sent its first request when the
/// drain begins may take to send it (one request is then served).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);
/// How long a client may stay silent after its TLS handshake: hyper's own
/// HTTP/1 header timer (30 s) starts only once the first bytes have come.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a connection's attribution (/proc reads, which a
/// process whose memory map is locked can hold up): past it the
/// connection goes on with what the kernel said at connect time.
const ATTRIBUTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Attribution reads running at once (see `ProxyState::attribution_slots`).
const ATTRIBUTION_SLOTS: usize = 16;
/// Strikes after which a client (see [`ClientKey`]) passes through.
const UNTRUSTED: u8 = 2;
/// Clients remembered at most (the key holds a path a job chooses).
const MAX_UNTRUSTED_PAIRS: usize = 4096;
/// Clients of one cgroup (one job, on most runners) in that table.
const MAX_UNTRUSTED_PER_CGROUP: usize = 64;
/// How long a client that rejected the CA passes through after its last
/// connection (or strike): then it is intercepted again (a client that
/// still rejects the CA fails one connection, which SDKs retry).
const UNTRUSTED_FOR: Duration = Duration::from_secs(600);

/// Where the proxy learns who opened an accepted connection.
pub trait OriginSource: Send + Sync {
    /// The origin of the connection whose client address is `peer`,
    /// accepted on the listener address `local`.
    fn origin(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnOrigin>;
    /// The connection whose origin this was has ended.
    fn forget(&self, origin: &ConnOrigin);
}

impl OriginSource for crate::intercept::Intercept {
    fn origin(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnOrigin> {
        crate::intercept::Intercept::origin(self, peer, local)
    }

    fn forget(&self, origin: &ConnOrigin) {
        crate::intercept::Intercept::forget(self, origin.cookie);
    }
}

/// Forgets an origin when the connection's task ends, however it ends.
struct ForgetOnDrop {
    source: Arc<dyn OriginSource>,
    origin: ConnOrigin,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        self.source.forget(&self.origin);
    }
}

/// Counters of the proxy, read by `top`, export and tests.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    /// Connections closed because no origin record existed.
    pub refused_no_origin: AtomicU64,
    /// Non-provider TLS (or non-TLS) spliced untouched.
    pub passthrough: AtomicU64,
    /// Provider connections passed through because the client does not
    /// trust the local CA.
    pub passthrough_untrusted: AtomicU64,
    /// Clients that rejected the agent's certificate.
    pub client_rejected_ca: AtomicU64,
    /// Provider connections terminated and metered.
    pub intercepted: AtomicU64,
    /// Malformed or missing ClientHellos.
    pub bad_hello: AtomicU64,
    pub requests: AtomicU64,
    pub upstream_errors: AtomicU64,
    /// Records with tokens but no known price.
    pub unpriced: AtomicU64,
    /// Request bodies forwarded unparsed because the agent already held
    /// `proxy.max_buffered_request_bytes` of request bodies.
    pub over_buffer_budget: AtomicU64,
    /// Request bodies forwarded unparsed because they were longer than
    /// `proxy.max_request_body`.
    pub body_too_long: AtomicU64,
    /// Request bodies forwarded unparsed because they paused longer than
    /// `proxy.request_body_stall_secs`.
    pub body_stalled: AtomicU64,
}

/// A copy of [`ProxyStats`] at one instant.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ProxyStatsSnapshot {
    pub accepted: u64,
    pub refused_no_origin: u64,
    pub passthrough: u64,
    pub passthrough_untrusted: u64,
    pub client_rejected_ca: u64,
    pub intercepted: u64,
    pub bad_hello: u64,
    pub requests: u64,
    pub upstream_errors: u64,
    pub unpriced: u64,
    pub over_buffer_budget: u64,
    pub body_too_long: u64,
    pub body_stalled: u64,
    /// Background responses whose record waits for their result (a
    /// gauge; see [`ProxyState::snapshot`]).
    pub background_waiting: u64,
}

impl ProxyStats {
    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStatsSnapshot {
            accepted: l(&self.accepted),
            refused_no_origin: l(&self.refused_no_origin),
            passthrough: l(&self.passthrough),
            passthrough_untrusted: l(&self.passthrough_untrusted),
            client_rejected_ca: l(&self.client_rejected_ca),
            intercepted: l(&self.intercepted),
            bad_hello: l(&self.bad_hello),
            requests: l(&self.requests),
            upstream_errors: l(&self.upstream_errors),
            unpriced: l(&self.unpriced),
            over_buffer_budget: l(&self.over_buffer_budget),
            body_too_long: l(&self.body_too_long),
            body_stalled: l(&self.body_stalled),
            background_waiting: 0,
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// Whether the listeners still accept: a streak of `accept` failures
/// (EMFILE, ENFILE, ENOMEM: the backlog fills and jobs' connections hang)
/// that has gone on for [`AcceptHealth::FAILING_FOR`] makes the agent
/// unhealthy, and it stops (draining, flushing) to be restarted (its
/// programs go with it: jobs go direct meanwhile). A streak ends at a
/// connection accepted, or when no accept has failed for
/// [`AcceptHealth::QUIET`] (none may have come to try).
#[derive(Debug, Default)]
pub struct AcceptHealth {
    /// (first failure of the streak, last failure), if one is on.
    streak: std::sync::Mutex<Option<(std::time::Instant, std::time::Instant)>>,
    /// Whether `streak` may be on: an accept that succeeds reads only this.
    failing: std::sync::atomic::AtomicBool,
}

impl AcceptHealth {
    /// How long accepts may keep failing before the agent is unhealthy.
    pub const FAILING_FOR: Duration = Duration::from_secs(15);
    /// A streak with no failure for this long is over.
    pub const QUIET: Duration = Duration::from_secs(2);

    /// An accept failed at `now`; true when it starts a streak (to log).
    pub fn failed(&self, now: std::time::Instant) -> bool {
        let mut s = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        match s.as_mut() {
            Some((_, last)) if now.saturating_duration_since(*last) < Self::QUIET => {
                *last = now;
                false
            }
            _ => {
                *s = Some((now, now));
                self.failing.store(true, Ordering::Relaxed);
                true
            }
        }
    }

    /// A connection was accepted (on the request path: a load, unless a
    /// streak is on).
    pub fn accepted(&self) {
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
            *self.streak.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// False while accepts have been failing for [`Self::FAILING_FOR`].
    pub fn healthy(&self, now: std::time::Instant) -> bool {
        let s = self.streak.lock().unwrap_or_else(|e| e.into_inner());
        match *s {
            Some((first, last)) => {
                now.saturating_duration_since(last) >= Self::QUIET
                    || now.saturating_duration_since(first) < Self::FAILING_FOR
            }
            None => true,
        }
    }
}

/// Everything a connection needs, shared by all of them.
pub struct ProxyState {
    pub origins: Arc<dyn OriginSource>,
    pub ca: Arc<LocalCa>,
    pub upstream: Upstream,
    pub hosts: Arc<Vec<ProviderHost>>,
    pub attributor: Attributor,
    pub sink: Arc<dyn RecordSink>,
    pub stats: ProxyStats,
    /// Whether the listeners still accept (else the agent stops).
    pub accept_health: AcceptHealth,
    pub max_request_body: usize,
    /// A body pausing this long mid-way is forwarded as it arrives.
    pub body_stall: Duration,
    /// A client that sends nothing this long after its TLS handshake is
    /// closed ([`FIRST_BYTES_TIMEOUT`]).
    pub first_bytes_timeout: Duration,
    /// Request bodies held across all connections.
    pub body_budget: Arc<crate::budget::BodyBudget>,
    /// Prices for `cost_usd`.
    pub prices: Arc<crate::meter::pricing::PriceBook>,
    /// In-flight counting for `tollgate top` (a no-op unless set).
    pub live: crate::control::LiveHandle,
    /// (executable, host) pairs whose client rejected the local CA.
    /// Strikes per pair: a certificate alert is [`UNTRUSTED`] at once, a
    /// hang-up in the handshake one (an interrupted client must not turn
    /// metering off for its executable); a completed handshake clears them.
    untrusted: Untrusted,
    /// Blocking threads that may read /proc for attribution at once: a
    /// read stuck on a process whose memory map is locked (a hung FUSE or
    /// NFS mount) holds its thread, and new connections from it must not
    /// take the whole blocking pool (which the record estimates share).
    attribution_slots: Arc<tokio::sync::Semaphore>,
    /// (provider, model) pairs already warned about as unpriced.
    unpriced_seen: Mutex<Seen>,
    /// (model, tier) pairs already warned about as priced at the standard
    /// rates.
    tier_unpriced_seen: Mutex<Seen>,
    http: auto::Builder<TrackedExecutor>,
    /// Shutdown began: connections finish their request and close.
    pub(crate) draining: CancellationToken,
    /// A second signal: end the drain now instead of at its deadline.
    pub cut_drain: CancellationToken,
    /// The drain time is over: what is still open is cut, and its record
    /// written with what was counted so far.
    pub(crate) stopping: CancellationToken,
    /// Work that outlives a connection (reading the rest of a response
    /// after a hang-up, local estimates): awaited before the ledger closes.
    pub(crate) background: TaskTracker,
    /// Background responses' records, until their result is seen.
    parked: parked::Parked<http::ParkedResponse>,
    /// Managed Agents sessions' last snapshots.
    sessions: sessions::Sessions,
    /// How many lines of each batch's results were counted.
    batches: Arc<batches::Batches>,
}

type Seen = hashbrown::HashSet<(String, String), rustc_hash::FxBuildHasher>;

/// A `(String, String)` set key, borrowed: hashes as the tuple does (each
/// field in turn).
#[derive(Hash)]
struct PairRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<(String, String)> for PairRef<'_> {
    fn equivalent(&self, k: &(String, String)) -> bool {
        self.0 == k.0 && self.1 == k.1
    }
}

impl ProxyState {
    /// The counters, and the background responses waiting for their
    /// result.
    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        ProxyStatsSnapshot {
            background_waiting: self.parked.len() as u64,
            ..self.stats.snapshot()
        }
    }

    pub fn new(
        origins: Arc<dyn OriginSource>,
        ca: Arc<LocalCa>,
        upstream: Upstream,
        hosts: Vec<ProviderHost>,
        attributor: Attributor,
        sink: Arc<dyn RecordSink>,
        max_request_body: usize,
    ) -> Self {
        let background = TaskTracker::new();
        let mut http = auto::Builder::new(TrackedExecutor(background.clone()));
        // `half_close` stays off: with it, a client that hangs up while
        // waiting for the answer's head is not seen until the answer is
        // written (its input then goes unestimated, the upstream request
        // runs on); a client that shuts only its writing side after the
        // request (rare; no SDK does) is taken as gone.
        http.http1().timer(hyper_util::rt::TokioTimer::new());
        // An HTTP/2 client gone silent (a host that vanished) is found by
        // pings and its connection closed, instead of held for ever.
        http.http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(20));
        ProxyState {
            origins,
            ca,
            upstream,
            hosts: Arc::new(hosts),
            attributor,
            sink,
            stats: ProxyStats::default(),
            accept_health: AcceptHealth::default(),
            max_request_body,
            body_stall: Duration::from_secs(10),
            first_bytes_timeout: FIRST_BYTES_TIMEOUT,
            body_budget: crate::budget::BodyBudget::new(max_request_body.saturating_mul(4)),
            prices: Arc::new(crate::meter::pricing::PriceBook::builtin()),
            live: crate::control::LiveHandle::default(),
            untrusted: Untrusted::default(),
            attribution_slots: Arc::new(tokio::sync::Semaphore::new(ATTRIBUTION_SLOTS)),
            unpriced_seen: Mutex::default(),
            tier_unpriced_seen: Mutex::default(),
            http,
            draining: CancellationToken::new(),
            cut_drain: CancellationToken::new(),
            stopping: CancellationToken::new(),
            background,
            parked: parked::Parked::default(),
            sessions: sessions::Sessions::default(),
            batches: Arc::default(),
        }
    }
}

/// Spawns hyper's own tasks (one per HTTP/2 stream the server serves) on
/// the background tracker. A stream's request and response bodies live
/// in its task, not in the connection's, so when the agent stops and cuts
/// a connection, the cut stream writes its record from there: the agent
/// waits for these tasks before it closes the ledger.
#[derive(Clone)]
pub(crate) struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// True the first time the pair `(a, b)` is asked about, up to
/// [`UNPRICED_WARNINGS`] of them (the last one says so, naming `what`).
fn first_time(seen: &Mutex<Seen>, a: &str, b: &str, what: &str) -> bool {
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    // Probed with borrowed names: every response of an unpriced model
    // comes here, and only the first of each pair is stored.
    if seen.len() >= UNPRICED_WARNINGS || seen.contains(&PairRef(a, b)) {
        return false;
    }
    seen.insert((a.to_owned(), b.to_owned()));
    if seen.len() == UNPRICED_WARNINGS {
        warn!("{UNPRICED_WARNINGS} {what} warned about; further ones are logged at debug");
    }
    true
}

impl ProxyState {
    /// Says once per (provider, model), at warn, that a model has no price:
    /// its requests are recorded with `cost_usd: null` until one is added.
    /// True when this call warned.
    pub(crate) fn warn_unpriced(&self, provider: &str, model: Option<&str>) -> bool {
        let model = model.unwrap_or("");
        if !first_time(&self.unpriced_seen, provider, model, "unpriced models") {
            return false;
        }
        warn!(
            provider,
            model = ?model,
            "no price for this model: its requests are recorded with cost_usd null; add it under [[pricing.models]] in the config"
        );
        true
    }

    /// Says once per (provider, model, tier), at warn, that a model has a
    /// price but none for the service tier that served a request: those
    /// requests are priced at the standard rates. True when this call
    /// warned.
    pub(crate) fn warn_tier_unpriced(&self, provider: &str, model: &str, tier: &str) -> bool {
        // Keyed by (model, tier): a model name says its provider.
        if !first_time(
            &self.tier_unpriced_seen,
            model,
            tier,
            "unpriced service tiers",
        ) {
            return false;
        }
        warn!(
            provider,
            model,
            service_tier = tier,
            "no price for this model in this service tier: its requests are priced at the standard rates; add the tier's rates under [[pricing.models]] in the config"
        );
        true
    }

    /// Replaces the price book (default: the built-in catalogue).
    pub fn with_prices(mut self, prices: Arc<crate::meter::pricing::PriceBook>) -> Self {
        self.prices = prices;
        self
    }

    /// Holds at most `bytes` of request bodies across all connections
    /// (default: four times `max_request_body`).
    pub fn with_max_buffered(mut self, bytes: usize) -> Self {
        self.body_budget = crate::budget::BodyBudget::new(bytes);
        self
    }

    /// Forwards a request body that pauses `stall` mid-way as it arrives
    /// (default: 10 s).
    pub fn with_body_stall(mut self, stall: Duration) -> Self {
        self.body_stall = stall;
        self
    }

    /// Counts in-flight requests for `tollgate top`.
    pub fn with_live(mut self, live: crate::control::LiveHandle) -> Self {
        self.live = live;
        self
    }

    /// Takes the batch results the ledger says were read (its
    /// `batch_results` rows' hosts and paths) as counted whole, so that a
    /// read after a restart does not count them again. Gives how many
    /// batches that is.
    pub fn batches_read(&self, reads: &[(String, String)]) -> usize {
        let mut n = 0;
        for (host, path) in reads {
            let Some(p) = catalogue::lookup(&self.hosts, host) else {
                continue;
            };
            let info =
                crate::providers::adapter_for(p.api).request(&crate::providers::RequestView {
                    method: &::http::Method::GET,
                    path,
                    query: None,
                    headers: &::http::HeaderMap::new(),
                    body: None,
                });
            if let Some(b) = info.batch {
                self.batches.mark_whole(http::batch_key(&p.host, &b.id));
                n += 1;
            }
        }
        n
    }
}

/// How long cut connections and background work get to write their
/// records once the drain time is over.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long, in all, records still being counted then get (their local
/// estimates are CPU work that ends; see [`finish`]).
pub(crate) const RECORD_GRACE: Duration = Duration::from_secs(30);

/// Accepts on every listener until `shutdown` turns true, then drains:
/// in-flight requests and streams get up to `drain` to finish; what is
/// still open then is cut, and every cut request still gets its record
/// (with what was counted so far) before this returns.
pub async fn serve(
    listeners: Vec<TcpListener>,
    state: Arc<ProxyState>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let tracker = TaskTracker::new();
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut accept_tasks = Vec::new();
    for l in listeners {
        let state = state.clone();
        let tracker = tracker.clone();
        let mut stop = stop_tx.subscribe();
        accept_tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.recv() => {
                        // Connections the kernel already queued were sent
                        // here before the map was cleared: serve them too.
                        while let Some(Ok((tcp, peer))) = l.accept().now_or_never() {
                            tracker.spawn(handle_conn(state.clone(), tcp, peer));
                        }
                        break;
                    }
                    r = l.accept() => match r {
                        Ok((tcp, peer)) => {
                            state.accept_health.accepted();
                            tracker.spawn(handle_conn(state.clone(), tcp, peer));
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of
                            // spinning; said once a streak (the watchdog
                            // restarts an agent whose streak goes on).
                            if state.accept_health.failed(std::time::Instant::now()) {
                                warn!(
                                    error = %e,
                                    "accept failed: jobs' connections wait in the backlog; if this goes on for 15 s, the agent stops to be restarted"
                                );
                            } else {
                                debug!(error = %e, "accept failed again");
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        }));
    }
    // Background responses whose result is not seen in time are recorded
    // as they expire.
    let sweeper = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(parked::SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => http::expire_parked(&state, std::time::Instant::now()),
                    _ = state.draining.cancelled() => break,
                }
            }
        })
    };
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    let _ = stop_tx.send(());
    for t in accept_tasks {
        let _ = t.await;
    }
    tracker.close();
    let in_flight = tracker.len();
    if in_flight > 0 {
        info!(
            connections = in_flight,
            drain_secs = drain.as_secs(),
            "draining"
        );
    }
    let deadline = tokio::time::Instant::now() + drain;
    state.draining.cancel();
    let drained = tokio::select! {
        r = tokio::time::timeout_at(deadline, tracker.wait()) => r.is_ok(),
        _ = state.cut_drain.cancelled() => {
            info!(connections = tracker.len(), "second signal: the drain is cut short");
            false
        }
    };
    let _ = sweeper.await;
    // The drain is over: a background response still parked will not be
    // retrieved through this agent.
    http::unpark_all(&state);
    state.background.close();
    let settled = drained
        && tokio::time::timeout_at(deadline, state.background.wait())
            .await
            .is_ok();
    if !settled {
        warn!(
            connections = tracker.len(),
            background = state.background.len(),
            "drain time over; cutting what is still open (each record keeps what was counted)"
        );
    }
    // Cut whatever is left; cut requests write their records on the way out.
    state.stopping.cancel();
    finish(&tracker, &state.background, STOP_GRACE, RECORD_GRACE).await;
}

/// Waits for the cut connections (up to `stop_grace`), then for the
/// background work, which is where their records are written (up to
/// `record_grace` in all): a record whose local estimate still runs (the
/// tokenizer's tables load on first use, seconds on a busy host) would
/// otherwise reach the ledger after it closed, and be lost.
async fn finish(
    connections: &TaskTracker,
    background: &TaskTracker,
    stop_grace: Duration,
    record_grace: Duration,
) {
    let start = tokio::time::Instant::now();
    if tokio::time::timeout_at(start + stop_grace, connections.wait())
        .await
        .is_err()
    {
        warn!(
            connections = connections.len(),
            "some connections did not stop in time"
        );
    }
    if tokio::time::timeout_at(start + stop_grace, background.wait())
        .await
        .is_ok()
    {
        return;
    }
    info!(
        tasks = background.len(),
        "waiting for the records still being counted"
    );
    if tokio::time::timeout_at(start + record_grace, background.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = background.len(),
            "some records were still being counted when the agent stopped; they are lost"
        );
    }
}

async fn handle_conn(state: Arc<ProxyState>, tcp: TcpStream, peer: SocketAddr) {
    // When the client's attempt began, as far as the agent can tell: its
    // handshake's hang-up counts against it only if this is after the last
    // strike (attribution and minting may take seconds before the TLS
    // handshake itself).
    let began = Instant::now();
    inc(&state.stats.accepted);
    let found = match tcp.local_addr() {
        Ok(local) => state.origins.origin(peer, local),
        Err(e) => {
            debug!(%peer, error = %e, "accepted socket without a local address");
            None
        }
    };
    let Some(origin) = found else {
        inc(&state.stats.refused_no_origin);
        debug!(%peer, "connection without an origin record: closed");
        return;
    };
    let _forget = ForgetOnDrop {
        source: state.origins.clone(),
        origin: origin.clone(),
    };
    let span = info_span!("conn", pid = origin.tgid, comm = %origin.comm, dst = %origin.dst);
    async move {
        let _ = tcp.set_nodelay(true);
        let mut tcp = tcp;
        // Anything that is not a TLS handshake is spliced untouched.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HELLO_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == 22 => {}
            Ok(Ok(1)) => {
                inc(&state.stats.passthrough);
                debug!("not TLS: passthrough");
                return splice(tcp, Vec::new(), origin.dst, &state.stopping).await;
            }
            Ok(Ok(_)) => {
                debug!("closed by the client before sending anything");
                return;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "cannot read from the client: closing");
                return;
            }
            Err(_) => {
                debug!("nothing from the client in time: closing");
                return;
            }
        }
        let (hello, prefix) =
            match tokio::time::timeout(HELLO_TIMEOUT, clienthello::read_client_hello(&mut tcp)).await
            {
                Ok(Ok(h)) => h,
                Ok(Err(HelloError::Eof)) => return,
                Ok(Err(e)) => {
                    inc(&state.stats.bad_hello);
                    debug!(error = %e, "bad ClientHello: closing");
                    return;
                }
                Err(_) => {
                    inc(&state.stats.bad_hello);
                    debug!("no ClientHello in time: closing");
                    return;
                }
            };
        let provider = hello
            .sni
            .as_deref()
            .and_then(|s| catalogue::lookup(&state.hosts, s))
            .cloned();
        let Some(provider) = provider else {
            inc(&state.stats.passthrough);
            debug!(sni = ?hello.sni, "not a provider host: passthrough");
            return splice(tcp, prefix, origin.dst, &state.stopping).await;
        };
        // Only provider connections are attributed. /proc reads are
        // blocking file I/O: they run off the async workers.
        let who = {
            let st = state.clone();
            let caller = Caller {
                pid: origin.tgid,
                uid: origin.uid,
                cgroup_id: origin.cgroup_id,
                comm: origin.comm.clone(),
                connected_boot_ns: origin.connected_boot_ns,
            };
            let read = async move {
                // The slot goes with the read: one stuck keeps it.
                let slot = st.attribution_slots.clone().acquire_owned().await.ok()?;
                tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    st.attributor.attribute(&caller)
                })
                .await
                .ok()
            };
            match tokio::time::timeout(ATTRIBUTION_TIMEOUT, read).await {
                Ok(Some(who)) => who,
                outcome => {
                    if outcome.is_err() {
                        warn!(pid = origin.tgid, "reading the process's details took too long; the connection goes on with what the kernel saw at connect time");
                    }
                    crate::meter::Attribution {
                        pid: origin.tgid,
                        uid: origin.uid,
                        cgroup_id: origin.cgroup_id,
                        comm: origin.comm.clone(),
                        ..Default::default()
                    }
                }
            }
        };
        let key = ClientKey::of(&who, &origin.comm, &provider.host);
        if state.untrusted.passes_through(&key) {
            inc(&state.stats.passthrough_untrusted);
            debug!(exe = %key.exe, host = %key.host, "client does not trust the CA: passthrough");
            return splice(tcp, prefix, origin.dst, &state.stopping).await;
        }
        let server_config = match state.ca.server_config(&provider.host).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, host = %provider.host, "cannot mint a certificate; passing through");
                inc(&state.stats.passthrough);
                return splice(tcp, prefix, origin.dst, &state.stopping).await;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        // A client that stalls mid-handshake must not hold its task, its
        // socket and its origin entry for ever.
        let handshake = tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(Rewind::new(prefix, tcp)));
        let tls = match handshake.await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let strikes = match rejection(&e) {
                    Some(Rejection::Alert) => UNTRUSTED,
                    Some(Rejection::HangUp) => 1,
                    None => {
                        debug!(error = %e, "client TLS handshake failed");
                        return;
                    }
                };
                inc(&state.stats.client_rejected_ca);
                if state.untrusted.strike(&key, strikes, began) {
                    warn!(
                        exe = %key.exe, host = %key.host, error = %e,
                        "the client does not trust the tollgate CA (pinned or bundled roots?); its later connections to this host from this job pass through uncounted (until it makes none for 10 minutes). See `tollgate trust env`"
                    );
                } else {
                    debug!(error = %e, "client hung up in the TLS handshake");
                }
                return;
            }
            Err(_) => {
                debug!("no TLS handshake in time: closing");
                return;
            }
        };
        state.untrusted.clear(&key);
        inc(&state.stats.intercepted);
        debug!(host = %provider.host, "intercepted");
        let ctx = Arc::new(http::ConnCtx {
            state: state.clone(),
            origin,
            who: who.into(),
            provider,
        });
        // Whether the connection's first request has come (see below).
        let first = Arc::new(tokio::sync::Notify::new());
        let service = {
            let first = first.clone();
            hyper::service::service_fn(move |req| {
                first.notify_one();
                http::handle(ctx.clone(), req)
            })
        };
        let (tls, silent) = first_bytes::FirstBytes::new(tls, state.first_bytes_timeout);
        let conn = state
            .http
            .serve_connection_with_upgrades(TokioIo::new(tls), service)
            .into_owned();
        let mut conn = std::pin::pin!(conn);
        let ended = tokio::select! {
            r = conn.as_mut() => Some(r),
            _ = state.draining.cancelled() => None,
            () = silent => {
                debug!("no request after the TLS handshake in time: closing");
                return;
            }
        };
        // A connection accepted as the drain began (queued, or in its
        // handshake) has not sent its request yet, and a graceful shutdown
        // now would close it unread (hyper cancels a connection still
        // telling HTTP/1 from HTTP/2): the client, its handshake done,
        // would see the connection close. It gets a moment to send it.
        let ended = match ended {
            None => tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = first.notified() => None,
                _ = tokio::time::sleep(FIRST_REQUEST_GRACE) => None,
                _ = state.stopping.cancelled() => None,
            },
            ended => ended,
        };
        let ended = match ended {
            Some(r) => r,
            None => {
                // Let the request in flight finish, then close.
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    // Dropping the connection drops its bodies, which write
                    // their records (see `http::MeteredBody`).
                    _ = state.stopping.cancelled() => Ok(()),
                }
            }
        };
        if let Err(e) = ended {
            debug!(error = %e, "client connection ended with an error");
        }
    }
    .instrument(span)
    .await
}

/// Whose connections a CA rejection concerns: one executable, talking to
/// one provider host, in one job (its cgroup and CI run and job). Another
/// job's clients, or the same program in another job, are not affected.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    /// The job's cgroup (also in `scope`): what no process in it can
    /// choose.
    cgroup: u64,
    scope: String,
    exe: String,
    host: String,
}

/// One job, as far as the agent can tell jobs apart: its cgroup, CI run
/// and job.
fn job_scope(who: &crate::meter::Attribution) -> String {
    fn part(v: &Option<String>) -> &str {
        v.as_deref().unwrap_or_default()
    }
    format!(
        "{}/{}/{}/{}",
        who.cgroup_id,
        part(&who.run_id),
        part(&who.job_id),
        part(&who.job)
    )
}

impl ClientKey {
    fn of(who: &crate::meter::Attribution, comm: &str, host: &str) -> ClientKey {
        ClientKey {
            cgroup: who.cgroup_id,
            scope: job_scope(who),
            exe: who.exe.clone().unwrap_or_else(|| comm.to_string()),
            host: host.to_string(),
        }
    }
}

/// Strikes per client ([`ClientKey`]): a certificate alert is
/// [`UNTRUSTED`] at once, a hang-up in the handshake one (an interrupted
/// client must not turn metering off for its executable); a completed
/// handshake clears them. A client passes through until [`UNTRUSTED_FOR`]
/// has gone by without a connection of its. At most [`MAX_UNTRUSTED_PAIRS`]
/// clients.
#[derive(Default)]
struct Untrusted(Mutex<HashMap<ClientKey, (u8, Instant)>>);

impl Untrusted {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, (u8, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the client's connections pass through unmetered.
    fn passes_through(&self, key: &ClientKey) -> bool {
        self.passes_through_at(key, Instant::now())
    }

    fn passes_through_at(&self, key: &ClientKey, now: Instant) -> bool {
        let mut map = self.map();
        match map.get_mut(key) {
            Some(&mut (_, at)) if now.saturating_duration_since(at) >= UNTRUSTED_FOR => {
                map.remove(key);
                false
            }
            // In use: its time runs from its last connection, so a job's
            // pinned client keeps working for as long as the job runs.
            Some((n, at)) if *n >= UNTRUSTED => {
                *at = now;
                true
            }
            _ => false,
        }
    }

    /// Adds `strikes` for a handshake that `began` then; true when this
    /// makes the client pass through.
    fn strike(&self, key: &ClientKey, strikes: u8, began: Instant) -> bool {
        self.strike_at(key, strikes, began, Instant::now())
    }

    fn strike_at(&self, key: &ClientKey, strikes: u8, began: Instant, now: Instant) -> bool {
        let mut map = self.map();
        // One cgroup holds at most MAX_UNTRUSTED_PER_CGROUP clients, its
        // oldest going first: a job that invents clients (names, CI ids)
        // churns its own entries, and cannot fill the table for others.
        if !map.contains_key(key) {
            let mine = map.iter().filter(|(k, _)| k.cgroup == key.cgroup);
            if mine.clone().count() >= MAX_UNTRUSTED_PER_CGROUP
                && let Some(oldest) = mine.min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        if map.len() >= MAX_UNTRUSTED_PAIRS && !map.contains_key(key) {
            map.retain(|_, (_, at)| now.saturating_duration_since(*at) < UNTRUSTED_FOR);
            if map.len() >= MAX_UNTRUSTED_PAIRS {
                return false;
            }
        }
        let (n, at) = map.entry(key.clone()).or_insert((0, now));
        if now.saturating_duration_since(*at) >= UNTRUSTED_FOR {
            *n = 0;
        }
        // A hang-up in a handshake that began before the last strike came
        // is one interruption seen twice (a client that gave up on several
        // connections at once, a cancelled pool), not a second try.
        if strikes < UNTRUSTED && *n > 0 && began < *at {
            return false;
        }
        let before = *n;
        *n = n.saturating_add(strikes).min(UNTRUSTED);
        *at = now;
        before < UNTRUSTED && *n >= UNTRUSTED
    }

    /// A completed handshake: strikes short of passing through are forgotten.
    fn clear(&self, key: &ClientKey) {
        let mut map = self.map();
        if map.get(key).is_some_and(|&(n, _)| n < UNTRUSTED) {
            map.remove(key);
        }
    }
}

/// How a client refused our certificate, by the handshake's error.
#[derive(Debug, PartialEq, Eq)]
enum Rejection {
    /// An alert about the certificate: it does not trust the CA.
    Alert,
    /// A hang-up in the handshake: some clients reject this way, but so
    /// does one that was interrupted.
    HangUp,
}

fn rejection(e: &std::io::Error) -> Option<Rejection> {
    use rustls::AlertDescription as A;
    if let Some(inner) = e.get_ref()
        && let Some(tls) = inner.downcast_ref::<rustls::Error>()
    {
        return matches!(
            tls,
            rustls::Error::AlertReceived(
                A::UnknownCA
                    | A::BadCertificate
                    | A::CertificateUnknown
                    | A::UnsupportedCertificate
                    | A::CertificateExpired
                    | A::AccessDenied
                    | A::DecryptError
            )
        )
        .then_some(Rejection::Alert);
    }
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
    )
    .then_some(Rejection::HangUp)
}

/// Copies bytes both ways between the client and the address it dialed,
/// after replaying what was already read. The agent's own connects are
/// never redirected, so this reaches the real destination.
async fn splice(
    mut client: TcpStream,
    prefix: Vec<u8>,
    dst: SocketAddr,
    stopping: &CancellationToken,
) {
    // Bounded as the metered path's connects are, with keepalive probes.
    let mut server = match upstream::connect_tcp(dst).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%dst, error = %e, "passthrough connect failed");
            return;
        }
    };
    if !prefix.is_empty() && server.write_all(&prefix).await.is_err() {
        return;
    }
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut server) => {
            if let Err(e) = r {
                debug!(error = %e, "passthrough ended");
            }
        }
        // Nothing is metered here: at the end of the drain it just closes.
        _ = stopping.cancelled() => {}
    }
}

#[cfg(test)]
mod accept_health_tests {
    use super::AcceptHealth;
    use std::time::{Duration, Instant};

    /// Accepts failing without a break for 15 s make the agent unhealthy;
    /// an accepted connection, or 2 s without a failure, ends the streak.
    #[test]
    fn accepts_failing_for_a_while_make_the_agent_unhealthy() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let h = AcceptHealth::default();
        assert!(h.healthy(t0));
        // Failing every 50 ms (the loop's back-off) for 15 s.
        assert!(h.failed(at(0)), "a streak starts");
        let mut ms = 0;
        while ms < 15_000 {
            ms += 50;
            assert!(!h.failed(at(ms)), "the same streak");
            assert_eq!(h.healthy(at(ms)), ms < 15_000, "at {ms} ms");
        }
        assert!(!h.healthy(at(15_100)));
        // Nothing failed for 2 s (no connection came to try): over.
        assert!(h.healthy(at(17_000)));
        assert!(h.failed(at(17_000)), "a new streak");
        assert!(h.healthy(at(17_050)));
        // A connection accepted ends a streak at once.
        assert!(!h.failed(at(18_000)));
        h.accepted();
        assert!(h.failed(at(33_500)), "after an accept, a new streak");
        assert!(h.healthy(at(33_600)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Client `i` of the job `scope` (`CGROUP/RUN/JOB_ID/JOB`).
    fn client(i: usize, scope: &str) -> ClientKey {
        ClientKey {
            cgroup: scope
                .split('/')
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
            scope: scope.to_string(),
            exe: format!("/bin/x{i}"),
            host: "api.openai.com".to_string(),
        }
    }

    #[test]
    fn strikes_add_up_clear_on_success_and_are_bounded() {
        let u = Untrusted::default();
        let k = |i: usize| client(i, "7/4242/1/lint");
        assert!(!u.strike(&k(0), 1, Instant::now()));
        u.clear(&k(0));
        assert!(
            !u.strike(&k(0), 1, Instant::now()),
            "a success in between forgets the first"
        );
        assert!(
            u.strike(&k(0), 1, Instant::now()),
            "the second hang-up in a row"
        );
        assert!(u.passes_through(&k(0)));
        u.clear(&k(0));
        assert!(u.passes_through(&k(0)), "a pair that passes through stays");
        assert!(
            !u.strike(&k(0), UNTRUSTED, Instant::now()),
            "already passing: no second warning"
        );
        assert!(
            u.strike(&k(1), UNTRUSTED, Instant::now()),
            "an alert at once"
        );
        // One job's many clients: it churns only its own entries.
        for i in 2..200 {
            u.strike(&k(i), 1, Instant::now());
        }
        assert_eq!(u.map().len(), MAX_UNTRUSTED_PER_CGROUP);
        assert!(
            u.strike(&k(500), UNTRUSTED, Instant::now()),
            "its newest client still counts"
        );
        // Many jobs: the table is bounded.
        for i in 0..MAX_UNTRUSTED_PAIRS + 10 {
            u.strike(&client(0, &format!("{}/1/1/x", 100 + i)), 1, Instant::now());
        }
        assert_eq!(u.map().len(), MAX_UNTRUSTED_PAIRS);
        let late = client(0, "99999/1/1/x");
        assert!(!u.strike(&late, UNTRUSTED, Instant::now()));
        assert!(!u.passes_through(&late));
    }

    #[test]
    fn one_job_inventing_clients_cannot_crowd_out_anothers() {
        let u = Untrusted::default();
        let theirs = client(0, "8/77/1/build");
        assert!(u.strike(&theirs, UNTRUSTED, Instant::now()));
        // A job in cgroup 7 strikes with thousands of invented names.
        for i in 0..2 * MAX_UNTRUSTED_PAIRS {
            u.strike(
                &client(i, &format!("7/{i}/1/flood")),
                UNTRUSTED,
                Instant::now(),
            );
        }
        assert!(
            u.passes_through(&theirs),
            "the other job's client keeps passing"
        );
        // And a client the other job starts later is still learned.
        assert!(u.strike(&client(1, "8/77/1/build"), UNTRUSTED, Instant::now()));
    }

    #[test]
    fn a_rejection_passes_one_jobs_client_through_for_a_while_only() {
        let u = Untrusted::default();
        let t0 = Instant::now();
        let mine = client(0, "7/4242/1/lint");
        assert!(u.strike_at(&mine, UNTRUSTED, t0, t0));
        assert!(u.passes_through_at(&mine, t0 + Duration::from_secs(60)));
        // Each connection keeps it passing: a long job's pinned client
        // keeps working.
        let t1 = t0 + UNTRUSTED_FOR + Duration::from_secs(30);
        assert!(u.passes_through_at(&mine, t0 + UNTRUSTED_FOR - Duration::from_secs(1)));
        assert!(u.passes_through_at(&mine, t1));
        let t0 = t1;
        // The same program in another job (another cgroup, another run) is
        // still metered: one job cannot switch metering off for the host.
        for other in ["8/4242/1/lint", "7/4243/2/lint", "7/4242/1/test"] {
            assert!(!u.passes_through_at(&client(0, other), t0), "{other}");
        }
        // After UNTRUSTED_FOR without a strike it is intercepted again, and
        // a new rejection starts afresh (a hang-up alone is not enough).
        let later = t0 + UNTRUSTED_FOR;
        assert!(!u.passes_through_at(&mine, later));
        assert!(!u.strike_at(&mine, 1, later, later));
        assert!(!u.passes_through_at(&mine, later));
        // When full, expired entries make room.
        for i in 1..MAX_UNTRUSTED_PAIRS {
            u.strike_at(&client(0, &format!("{}/s", 1000 + i)), 1, t0, t0);
        }
        assert!(u.strike_at(
            &client(0, "new"),
            UNTRUSTED,
            later + Duration::from_secs(1),
            later + Duration::from_secs(1)
        ));
    }

    /// Hang-ups of handshakes that overlapped (a client that gave up on
    /// several connections at once) are one strike, not two: only a
    /// hang-up of a handshake that began after the last strike adds.
    #[test]
    fn overlapping_hang_ups_are_one_strike() {
        let u = Untrusted::default();
        let mine = client(0, "7/4242/1/lint");
        let t0 = Instant::now();
        let (a, b) = (t0, t0 + Duration::from_millis(5));
        // Both handshakes began before either hung up.
        assert!(!u.strike_at(&mine, 1, a, t0 + Duration::from_millis(100)));
        assert!(!u.strike_at(&mine, 1, b, t0 + Duration::from_millis(101)));
        assert!(!u.passes_through_at(&mine, t0 + Duration::from_millis(200)));
        // A later try that hangs up too: that is two.
        let c = t0 + Duration::from_secs(1);
        assert!(u.strike_at(&mine, 1, c, c + Duration::from_millis(50)));
        // An alert counts whenever its handshake began.
        let other = client(0, "7/4242/1/test");
        assert!(!u.strike_at(&other, 1, t0, t0 + Duration::from_millis(100)));
        assert!(u.strike_at(&other, UNTRUSTED, t0, t0 + Duration::from_millis(101)));
    }

    #[test]
    fn certificate_alerts_and_hang_ups_are_told_apart() {
        let alert = |a| std::io::Error::other(rustls::Error::AlertReceived(a));
        assert_eq!(
            rejection(&alert(rustls::AlertDescription::UnknownCA)),
            Some(Rejection::Alert)
        );
        assert_eq!(
            rejection(&alert(rustls::AlertDescription::HandshakeFailure)),
            None,
            "no common cipher suite is not about our certificate"
        );
        for kind in [
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::ConnectionReset,
        ] {
            assert_eq!(
                rejection(&std::io::Error::from(kind)),
                Some(Rejection::HangUp)
            );
        }
        assert_eq!(
            rejection(&std::io::Error::from(std::io::ErrorKind::TimedOut)),
            None
        );
    }
    use std::sync::Mutex as StdMutex;
    use tokio::io::AsyncReadExt as _;

    /// Hands out one origin (or none) and records what the proxy asked and
    /// what it forgot.
    struct Recorder {
        dst: SocketAddr,
        known: bool,
        asked: StdMutex<Vec<(SocketAddr, SocketAddr)>>,
        forgotten: StdMutex<Vec<u64>>,
    }

    impl OriginSource for Recorder {
        fn origin(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnOrigin> {
            self.asked.lock().unwrap().push((peer, local));
            self.known.then(|| ConnOrigin {
                tgid: 1,
                pid: 1,
                uid: 0,
                gid: 0,
                cgroup_id: 1,
                comm: "client".into(),
                dst: self.dst,
                cookie: 4242,
                connected_boot_ns: 0,
            })
        }

        fn forget(&self, origin: &ConnOrigin) {
            self.forgotten.lock().unwrap().push(origin.cookie);
        }
    }

    struct Discard;
    impl RecordSink for Discard {
        fn submit(&self, _rec: Arc<crate::meter::UsageRecord>) {}
    }

    /// Keeps what it is given (the proxy's tests' record sink, `http`'s
    /// too).
    #[derive(Default)]
    pub(crate) struct Kept(pub(crate) StdMutex<Vec<Arc<crate::meter::UsageRecord>>>);
    impl RecordSink for Kept {
        fn submit(&self, rec: Arc<crate::meter::UsageRecord>) {
            self.0.lock().unwrap().push(rec);
        }
    }

    fn state_with(origins: Arc<dyn OriginSource>) -> ProxyState {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = LocalCa::load_or_create(dir.path(), &["api.openai.com".to_owned()]).unwrap();
        ProxyState::new(
            origins,
            Arc::new(ca),
            Upstream::new(None).unwrap(),
            Vec::new(),
            Attributor::new("/proc".into()),
            Arc::new(Discard),
            1 << 20,
        )
    }

    #[test]
    fn unpriced_models_are_warned_about_once_each_up_to_a_cap() {
        let state = state_with(Arc::new(Recorder {
            dst: "127.0.0.1:1".parse().unwrap(),
            known: false,
            asked: StdMutex::default(),
            forgotten: StdMutex::default(),
        }));
        assert!(state.warn_unpriced("openai", Some("gpt-9")));
        assert!(!state.warn_unpriced("openai", Some("gpt-9")), "once");
        assert!(
            state.warn_unpriced("anthropic", Some("gpt-9")),
            "per provider"
        );
        assert!(state.warn_unpriced("openai", None), "no model named");
        let mut warned = 3;
        for i in 0..2 * UNPRICED_WARNINGS {
            if state.warn_unpriced("openai", Some(&format!("made-up-{i}"))) {
                warned += 1;
            }
        }
        assert_eq!(warned, UNPRICED_WARNINGS, "a job inventing names is capped");
        // Tiers without rates have their own warnings, once each.
        assert!(state.warn_tier_unpriced("openai", "gpt-4o", "flex"));
        assert!(
            !state.warn_tier_unpriced("openai", "gpt-4o", "flex"),
            "once"
        );
        assert!(state.warn_tier_unpriced("openai", "gpt-4o", "priority"));
    }

    async fn run_one(known: bool) -> (Arc<Recorder>, Arc<ProxyState>, Vec<u8>) {
        // The "original destination": answers one line, then closes.
        let dst_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = dst_listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = dst_listener.accept().await {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(b"world").await;
                }
            }
        });
        let recorder = Arc::new(Recorder {
            dst,
            known,
            asked: StdMutex::default(),
            forgotten: StdMutex::default(),
        });
        let state = Arc::new(state_with(recorder.clone()));
        let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_addr = agent.local_addr().unwrap();
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                let (tcp, peer) = agent.accept().await.unwrap();
                handle_conn(state, tcp, peer).await;
            }
        });
        let mut client = TcpStream::connect(agent_addr).await.unwrap();
        let client_addr = client.local_addr().unwrap();
        // Not TLS: spliced to the dialed address when the origin is known.
        let _ = client.write_all(b"hello").await;
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(30), accept)
            .await
            .expect("the connection task ends")
            .unwrap();
        assert_eq!(
            *recorder.asked.lock().unwrap(),
            vec![(client_addr, agent_addr)],
            "asked by the client's address and the listener address"
        );
        (recorder, state, got)
    }

    /// A client of the agent for `host`, its connection taken by
    /// `handle_conn` on `state`, with the TLS handshake done (HTTP/1.1).
    async fn intercepted_client(
        state: Arc<ProxyState>,
        agent_ca: &LocalCa,
        host: &str,
    ) -> (
        tokio_rustls::client::TlsStream<TcpStream>,
        tokio::task::JoinHandle<()>,
    ) {
        let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = agent.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, peer) = agent.accept().await.unwrap();
            handle_conn(state, tcp, peer).await;
        });
        let mut config = upstream::client_config(Some(agent_ca.cert_path())).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap(),
                TcpStream::connect(addr).await.unwrap(),
            )
            .await
            .expect("the agent's handshake");
        (tls, task)
    }

    /// An agent state whose one provider, `host`, answers at an echo
    /// server: (state, the agent's CA, the server).
    async fn intercepting(
        host: &str,
    ) -> (
        Arc<ProxyState>,
        LocalCa,
        upstream::tests::EchoServer,
        tempfile::TempDir,
    ) {
        intercepting_into(host, Arc::new(Discard)).await
    }

    /// [`intercepting`], its records given to `sink`.
    async fn intercepting_into(
        host: &str,
        sink: Arc<dyn RecordSink>,
    ) -> (
        Arc<ProxyState>,
        LocalCa,
        upstream::tests::EchoServer,
        tempfile::TempDir,
    ) {
        intercepting_with(host, sink, 1 << 20).await
    }

    /// [`intercepting_into`], request bodies read up to `max_request_body`.
    async fn intercepting_with(
        host: &str,
        sink: Arc<dyn RecordSink>,
        max_request_body: usize,
    ) -> (
        Arc<ProxyState>,
        LocalCa,
        upstream::tests::EchoServer,
        tempfile::TempDir,
    ) {
        let server = upstream::tests::echo_server(host).await;
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = LocalCa::load_or_create(dir.path(), &[host.to_owned()]).unwrap();
        let (agent_ca, _) = LocalCa::load_or_create(dir.path(), &[host.to_owned()]).unwrap();
        let state = ProxyState::new(
            Arc::new(Recorder {
                dst: server.addr,
                known: true,
                asked: StdMutex::default(),
                forgotten: StdMutex::default(),
            }),
            Arc::new(ca),
            Upstream::new(Some(server.ca.cert_path())).unwrap(),
            vec![ProviderHost {
                host: host.to_owned(),
                api: crate::config::ApiKind::Openai,
                refuses_stream_options: false,
            }],
            Attributor::new("/proc".into()),
            sink,
            max_request_body,
        );
        (Arc::new(state), agent_ca, server, dir)
    }

    const GET_MODELS: &[u8] =
        b"GET /v1/models HTTP/1.1\r\nhost: api.openai.com\r\nconnection: close\r\n\r\n";

    /// Sends [`GET_MODELS`] on `tls`: answered 200 by `server` (its first
    /// request), then the connection's task ends.
    async fn get_models_is_answered(
        mut tls: tokio_rustls::client::TlsStream<TcpStream>,
        task: tokio::task::JoinHandle<()>,
        server: &upstream::tests::EchoServer,
    ) {
        tls.write_all(GET_MODELS).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "answered: {got:?}");
        assert_eq!(server.served.load(Ordering::SeqCst), 1);
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("then the connection ends")
            .unwrap();
    }

    /// A body trickled in, a byte before each pause would count as a
    /// stall, is still let go once it has taken 3 stall times: its share
    /// of the body budget is not held for as long as the client goes on.
    #[tokio::test]
    async fn a_trickled_body_is_let_go_after_three_stall_times() {
        let host = "api.openai.com";
        let (mut state, agent_ca, server, _dir) = intercepting(host).await;
        Arc::get_mut(&mut state).unwrap().body_stall = Duration::from_secs(1);
        let (mut tls, task) = intercepted_client(state.clone(), &agent_ca, host).await;
        let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\n\
                    content-type: application/json\r\ncontent-length: 4096\r\n\
                    connection: close\r\n\r\n";
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(&[b' '; 2048]).await.unwrap();
        tls.flush().await.unwrap();
        // A byte every 0.3 s, for up to 60 s: never a pause of 1 s.
        let mut sent = 2048;
        while state.snapshot().body_stalled == 0 && sent < 2048 + 200 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tls.write_all(b" ").await.unwrap();
            tls.flush().await.unwrap();
            sent += 1;
        }
        assert_eq!(
            state.snapshot().body_stalled,
            1,
            "still held after {sent} bytes"
        );
        assert_eq!(state.body_budget.used(), 0, "its share was given back");
        // It went upstream as it arrived, and goes on to its end.
        tls.write_all(&vec![b' '; 4096 - sent]).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut got)).await;
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        assert_eq!(server.served.load(Ordering::SeqCst), 1);
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }

    /// A compressed request body is read decoded (its model, a local
    /// estimate), and goes upstream as the client sent it, unless the
    /// agent rewrites it: then plain, without its Content-Encoding.
    #[tokio::test]
    async fn a_compressed_request_body_is_read_and_forwarded_as_sent_unless_rewritten() {
        use std::io::Write as _;
        let host = "api.openai.com";
        let kept = Arc::new(Kept::default());
        let (state, agent_ca, _server, _dir) = intercepting_with(host, kept.clone(), 4 << 20).await;
        let gzip = |plain: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(plain).unwrap();
            e.finish().unwrap()
        };
        // (head, body) as the provider got them, echoed.
        let send = |body: Vec<u8>| {
            let state = state.clone();
            let agent_ca = &agent_ca;
            async move {
                let (mut tls, task) = intercepted_client(state, agent_ca, host).await;
                let head = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\n\
                     content-type: application/json\r\ncontent-encoding: gzip\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                tls.write_all(head.as_bytes()).await.unwrap();
                tls.write_all(&body).await.unwrap();
                let mut got = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut got)).await;
                let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
                let end = got
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("a response")
                    + 4;
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                (head, got[end..].to_vec())
            }
        };
        let streamed = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Summarise the failing tests."}]}"#;
        let (head, body) = send(gzip(streamed)).await;
        assert!(!head.contains("x-echo-content-encoding"), "{head}");
        let body = String::from_utf8(body).expect("plain JSON upstream");
        assert!(body.contains(r#""include_usage":true"#), "{body}");
        let whole = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Summarise the failing tests."}]}"#;
        let gz = gzip(whole);
        let (head, body) = send(gz.clone()).await;
        assert!(head.contains("x-echo-content-encoding: gzip"), "{head}");
        assert_eq!(body, gz, "forwarded as sent");
        // One large enough to be decoded and read off the worker (see
        // `http::aside`): ≈2 MiB of varied words, ≈0.5 MiB compressed.
        let mut words = String::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while words.len() < 2 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            words.push_str(&format!("w{:x} ", x % 100_000));
        }
        let large =
            format!(r#"{{"model":"gpt-4.1","messages":[{{"role":"user","content":"{words}"}}]}}"#);
        let gz = gzip(large.as_bytes());
        assert!(gz.len() >= 64 << 10, "{}", gz.len());
        let (head, body) = send(gz.clone()).await;
        assert!(head.contains("x-echo-content-encoding: gzip"), "{head}");
        assert_eq!(body, gz, "forwarded as sent");
        for _ in 0..3000 {
            if kept.0.lock().unwrap().len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let recs = kept.0.lock().unwrap().clone();
        let mut models: Vec<_> = recs.iter().map(|r| r.model.as_deref()).collect();
        models.sort();
        assert_eq!(
            models,
            [Some("gpt-4.1"), Some("gpt-4o"), Some("gpt-4o-mini")],
            "{recs:#?}"
        );
        let large = recs.iter().find(|r| r.model.as_deref() == Some("gpt-4.1"));
        assert!(
            large.is_some_and(|r| r.usage.input_tokens > 100_000),
            "the large body read whole: {large:#?}"
        );
        assert!(
            recs.iter().all(|r| r.estimated && r.usage.input_tokens > 3),
            "the input estimated from the decoded body: {recs:#?}"
        );
    }

    #[tokio::test]
    async fn a_connection_whose_request_comes_after_the_drain_began_is_served() {
        let host = "api.openai.com";
        let (state, agent_ca, server, _dir) = intercepting(host).await;
        // The drain has begun by the time the client's request arrives (a
        // connection queued, or in its handshake, at SIGTERM).
        state.draining.cancel();
        let (tls, task) = intercepted_client(state.clone(), &agent_ca, host).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        get_models_is_answered(tls, task, &server).await;
    }

    /// Every attribution slot held (reads stuck on /proc): a new
    /// connection waits at most the attribution timeout for one, then goes
    /// on with what the kernel saw at connect time.
    #[tokio::test]
    async fn a_connection_goes_on_when_every_attribution_slot_is_stuck() {
        let host = "api.openai.com";
        let (state, agent_ca, server, _dir) = intercepting(host).await;
        let _stuck = state
            .attribution_slots
            .clone()
            .acquire_many_owned(ATTRIBUTION_SLOTS as u32)
            .await
            .unwrap();
        let (tls, task) = intercepted_client(state.clone(), &agent_ca, host).await;
        get_models_is_answered(tls, task, &server).await;
    }

    /// A job that leaves while its (long, forwarded as it arrives) body is
    /// on its way: the upstream request fails, but that is the job's doing,
    /// not the provider's.
    #[tokio::test]
    async fn a_client_that_leaves_mid_upload_is_not_an_upstream_failure() {
        let host = "api.openai.com";
        let kept = Arc::new(Kept::default());
        let (state, agent_ca, server, _dir) = intercepting_into(host, kept.clone()).await;
        let (mut tls, task) = intercepted_client(state.clone(), &agent_ca, host).await;
        let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\n\
                    content-type: application/json\r\ncontent-length: 3000000\r\n\r\n";
        tls.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..24 {
            tls.write_all(&chunk).await.unwrap();
        }
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(tls);
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the connection ends")
            .unwrap();
        // (The request's record is written after the connection's task:
        // waited for, bounded.)
        for _ in 0..3000 {
            if !kept.0.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.served.load(Ordering::SeqCst), 0);
        assert_eq!(state.snapshot().upstream_errors, 0);
        let recs = kept.0.lock().unwrap().clone();
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0].error.as_deref(), Some("client_disconnected"));
        assert!(
            !recs[0].estimated,
            "never whole at the provider: {:?}",
            recs[0]
        );
        assert_eq!(recs[0].status, 0);
    }

    #[tokio::test]
    async fn a_client_silent_after_its_handshake_is_closed() {
        let host = "api.openai.com";
        let (mut state, agent_ca, server, _dir) = intercepting(host).await;
        Arc::get_mut(&mut state).unwrap().first_bytes_timeout = Duration::from_secs(2);
        let (mut tls, task) = intercepted_client(state.clone(), &agent_ca, host).await;
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the agent closes the silent connection")
            .unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the client sees the connection end");
        assert!(got.is_empty(), "nothing was answered: {got:?}");
        assert_eq!(server.served.load(Ordering::SeqCst), 0);

        // A client that speaks in time is served, however long the rest
        // of its request then takes (here it ends past the deadline).
        let (mut tls, task) = intercepted_client(state.clone(), &agent_ca, host).await;
        tls.write_all(&GET_MODELS[..4]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        tls.write_all(&GET_MODELS[4..]).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "answered: {got:?}");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("then the connection ends")
            .unwrap();
    }

    #[tokio::test]
    async fn records_still_being_counted_are_waited_for_past_the_stop_grace() {
        let connections = TaskTracker::new();
        let background = TaskTracker::new();
        connections.close();
        let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let written = written.clone();
            background.spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(600));
                written.store(true, Ordering::SeqCst);
            });
        }
        background.close();
        finish(
            &connections,
            &background,
            Duration::from_millis(50),
            Duration::from_secs(60),
        )
        .await;
        assert!(
            written.load(Ordering::SeqCst),
            "the record outlasting the stop grace was waited for"
        );
    }

    #[tokio::test]
    async fn origin_is_forgotten_when_the_connection_ends() {
        let (recorder, state, got) = run_one(true).await;
        assert_eq!(got, b"world", "spliced to the dialed address");
        assert_eq!(*recorder.forgotten.lock().unwrap(), vec![4242]);
        assert_eq!(state.stats.passthrough.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn connection_without_origin_is_closed_and_nothing_forgotten() {
        let (recorder, state, got) = run_one(false).await;
        assert!(got.is_empty(), "closed without an answer: {got:?}");
        assert!(recorder.forgotten.lock().unwrap().is_empty());
        assert_eq!(state.stats.refused_no_origin.load(Ordering::Relaxed), 1);
    }
}
