//! Export of usage and agent health: OTLP metrics on the OpenTelemetry
//! GenAI semantic conventions (and optionally one span per request), and a
//! rotated JSONL audit log of usage records.
//!
//! Owns: `[export]` (`config`), the names and attributes of what is
//! exported (`semconv`), the instruments (`metrics`), the spans (`spans`),
//! the OTLP pipeline (`otlp`) and its TLS to the collector, files
//! reloaded when renewed (`tls`), the queues and workers between the request
//! path and all of these (`pipeline`), and the audit log (`audit`).
//!
//! Must never: let exporter I/O slow a request. The request path calls
//! [`RecordSink::submit`], which only offers the record to a bounded queue
//! per pipeline (a full queue drops the record for that pipeline and counts
//! it; the ledger has its own lossless path). A worker thread per pipeline
//! records instruments or writes the audit log; the OpenTelemetry SDK's
//! reader thread exports on its interval, with retries and backoff bounded
//! by the export timeout. Memory stays bounded: queues are bounded, and the
//! SDK caps the series per instrument (2000, then an overflow series).

mod audit;
mod config;
mod metrics;
mod otlp;
mod pipeline;
pub mod semconv;
mod spans;
#[cfg(test)]
mod tests;
mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{info, warn};

use pipeline::{Shared, Sink, audit_worker, metrics_worker};
use spans::SpanMaker;

pub use audit::rotated as rotated_audit_path;
pub(crate) use config::endpoint_for_logs;

/// Reads and checks the collector's TLS files (`ca_file`, `client_cert`,
/// `client_key`) as the agent does at start; the error names the setting.
pub(crate) fn check_tls_files(r: &ResolvedOtlp) -> Result<(), String> {
    if !otlp::is_https(&r.endpoint) {
        return Ok(());
    }
    tls::check_files(r).map_err(|e| e.to_string())
}

/// `tollgate check`'s TLS handshake with an `https://` collector, and
/// where it looks for the host's CA store.
pub(crate) use tls::{HostStore, probe as probe_collector_tls};

pub use config::{
    AuditLogConfig, ExportConfig, Headers, OtlpConfig, OtlpProtocol, OtlpTemporality, ResolvedOtlp,
    Semconv, parse_env_headers,
};
pub(crate) use otlp::is_https;

use crate::meter::RecordSink;

/// tollgate's own counters at one instant, for the health metrics. The
/// caller (app.rs) fills it from `ProxyStats`, the ledger's stats and
/// whatever else it owns; it is called on the SDK's reader thread at each
/// collection and must be cheap and non-blocking.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    /// Provider connections terminated and metered.
    pub connections_intercepted: u64,
    /// Redirected connections spliced through untouched (not a provider
    /// host, or a client that does not trust the local CA).
    pub connections_passthrough: u64,
    /// Connections closed because no origin record existed.
    pub connections_refused: u64,
    /// Provider connects from another network namespace (a container with
    /// its own network), left untouched and so not metered (kernel count).
    pub connections_other_netns: u64,
    /// UDP to provider addresses refused, so that QUIC clients fall back
    /// to TCP (kernel count).
    pub connections_udp_refused: u64,
    /// Records committed to the ledger.
    pub ledger_written: u64,
    /// Records accepted by the ledger but not yet committed.
    pub ledger_queued: u64,
    /// Failed ledger write attempts (each retried).
    pub ledger_errors: u64,
    /// Usage records not written: the backlog was full during a ledger
    /// outage, or they arrived after shutdown began.
    pub ledger_dropped: u64,
    /// Request bodies forwarded unparsed because they were longer than
    /// `proxy.max_request_body`.
    pub bodies_too_long: u64,
    /// Request bodies forwarded unparsed because the agent already held
    /// `proxy.max_buffered_request_bytes` of request bodies.
    pub bodies_over_budget: u64,
    /// JSON answers not read for their usage because the agent already
    /// held `proxy.max_buffered_response_bytes` of them.
    pub responses_over_budget: u64,
    /// Request bodies forwarded unparsed because they paused longer than
    /// `proxy.request_body_stall_secs`.
    pub bodies_stalled: u64,
    /// Background responses (the Responses API's `background: true`)
    /// whose record waits for a retrieval that shows their result.
    pub background_waiting: u64,
    /// The agent is running and intercepting.
    pub up: bool,
}

/// The health callback.
pub type HealthFn = Arc<dyn Fn() -> HealthSnapshot + Send + Sync>;

/// What the resource says about this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceInfo {
    /// `host.name`.
    pub host_name: String,
    /// `cicd.worker.name`: the CI runner this host is, when known.
    pub runner_name: Option<String>,
}

impl ResourceInfo {
    /// The host name from the kernel; no runner name.
    pub fn from_host() -> ResourceInfo {
        ResourceInfo {
            host_name: hostname().unwrap_or_default(),
            runner_name: None,
        }
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most
    // that many bytes.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid export setting {key}: {message}")]
    Config { key: String, message: String },
    /// A collector TLS file that cannot be used (yet): exit 69, so that
    /// systemd starts the agent again (a certificate an issuer writes
    /// after boot), where a bad setting's 64 stops it for good.
    #[error("unusable collector TLS file, from {key}: {message}")]
    TlsFile { key: String, message: String },
    #[error(
        "OTLP over gRPC needs a Tokio runtime: start the exporter from inside the agent's runtime"
    )]
    NoRuntime,
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
    #[error(
        "cannot open the audit log {}: {source} (check [export.audit_log] path and its directory's permissions)",
        path.display()
    )]
    AuditLog {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start an export thread: {0}")]
    Thread(std::io::Error),
    #[error("export did not finish within {0:?}")]
    Timeout(Duration),
    #[error("OTLP flush or shutdown failed: {0}")]
    Sdk(String),
}

impl ExportError {
    /// Process exit code (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            ExportError::Config { .. } => crate::exit::USAGE,
            ExportError::AuditLog { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                crate::exit::NOPERM
            }
            ExportError::AuditLog { .. } | ExportError::TlsFile { .. } => crate::exit::UNAVAILABLE,
            _ => crate::exit::SOFTWARE,
        }
    }
}
/// Counters of the export pipelines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Records handed to the metrics pipeline / recorded.
    pub metrics_accepted: u64,
    pub metrics_recorded: u64,
    /// Records the metrics pipeline dropped (queue full or shut down).
    pub metrics_dropped: u64,
    /// Records handed to the audit log / written.
    pub audit_accepted: u64,
    pub audit_written: u64,
    /// Records the audit log dropped (queue full or shut down).
    pub audit_dropped: u64,
    /// Failed audit log writes (the record is lost for the audit log).
    pub audit_errors: u64,
}

/// The running export pipelines. Stop them with [`Exporter::shutdown`].
pub struct Exporter {
    shared: Arc<Shared>,
    meter_provider: Option<SdkMeterProvider>,
    tracer_provider: Option<SdkTracerProvider>,
    workers: Vec<JoinHandle<()>>,
    otlp: Option<ResolvedOtlp>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("otlp", &self.otlp)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Starts the pipelines `cfg` asks for, with the standard OTEL_* variables
/// of the process environment applied. Returns the exporter (keep it to
/// shut down) and the sink to add to the proxy's [`crate::meter::FanOut`].
/// With nothing configured, the sink does nothing.
///
/// OTLP over gRPC must be started inside a Tokio runtime (the channel lives
/// on it); everything else runs on threads of its own.
pub fn start(
    cfg: &ExportConfig,
    resource: ResourceInfo,
    health: HealthFn,
) -> Result<(Exporter, Arc<dyn RecordSink>), ExportError> {
    start_with_env(cfg, resource, health, &|k| std::env::var(k).ok())
}

/// [`start`] with the environment given as a lookup function (tests).
pub fn start_with_env(
    cfg: &ExportConfig,
    resource: ResourceInfo,
    health: HealthFn,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Exporter, Arc<dyn RecordSink>), ExportError> {
    let otlp = cfg
        .resolve(env)
        .map_err(|(key, message)| ExportError::Config { key, message })?;
    let shared = Arc::new(Shared::default());
    let mut workers = Vec::new();
    let mut meter_provider = None;
    let mut tracer_provider = None;

    // The audit log first: an error there is the user's to fix.
    let audit_q = match &cfg.audit_log.path {
        None => None,
        Some(path) => {
            let log = audit::AuditLog::open(path, cfg.audit_log.max_bytes, cfg.audit_log.keep)
                .map_err(|source| ExportError::AuditLog {
                    path: path.clone(),
                    source,
                })?;
            let (tx, rx) = sync_channel(cfg.queue);
            let sh = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name("tollgate-audit".into())
                    .spawn(move || audit_worker(log, rx, sh))
                    .map_err(ExportError::Thread)?,
            );
            Some(tx)
        }
    };

    let metrics_q = match &otlp {
        None => None,
        Some(r) => {
            let res = otlp::resource(&resource, &r.service_name);
            let tls = otlp::collector_tls(r)?;
            let mp = otlp::meter_provider(r, res.clone(), tls.as_ref())?;
            let meter = mp.meter("tollgate");
            metrics::register_health(&meter, health, shared.clone(), r.interval);
            let cumulative = r.temporality == config::OtlpTemporality::Cumulative;
            let instruments = metrics::Instruments::new(
                &meter,
                r.semconv,
                r.include_high_cardinality,
                cumulative.then(|| metrics::CardinalityWatch::new(r.cardinality_limit, r.semconv)),
            );
            if cumulative && r.include_high_cardinality {
                warn!(
                    limit = r.cardinality_limit,
                    "export.otlp.include_high_cardinality under cumulative temporality: every process and run makes series that last until the agent restarts, and past export.otlp.cardinality_limit new ones are exported only as otel.metric.overflow=true; set export.otlp.temporality = \"delta\" if the collector takes it"
                );
            }
            let spans = if r.traces {
                let tp = otlp::tracer_provider(r, res, tls.as_ref())?;
                let tracer = tp.tracer("tollgate");
                tracer_provider = Some(tp);
                Some(SpanMaker {
                    tracer,
                    semconv: r.semconv,
                    high_cardinality: r.include_high_cardinality,
                })
            } else {
                None
            };
            meter_provider = Some(mp);
            let (tx, rx) = sync_channel(cfg.queue);
            let sh = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name("tollgate-metrics".into())
                    .spawn(move || metrics_worker(instruments, spans, rx, sh))
                    .map_err(ExportError::Thread)?,
            );
            if let Some(var) = r.env_headers_ignored {
                warn!(
                    variable = var,
                    "headers from the environment are not sent: export.otlp.endpoint is set in the config, and they may be meant for another collector; set the endpoint in the environment too (OTEL_EXPORTER_OTLP_ENDPOINT, in /etc/tollgate/env) and remove it from the config"
                );
            }
            let tls_files = r
                .tls
                .ca_file
                .iter()
                .chain(r.tls.identity.iter().flat_map(|(c, k)| [c, k]))
                .map(|f| f.source.as_str())
                .collect::<Vec<_>>();
            if !tls_files.is_empty() && !otlp::is_https(&r.endpoint) {
                warn!(
                    settings = ?tls_files,
                    "TLS files are set for the collector but its endpoint is not https://: they are not used"
                );
            }
            info!(
                endpoint = %config::endpoint_for_logs(&r.endpoint),
                protocol = ?r.protocol,
                interval = ?r.interval,
                semconv = ?r.semconv,
                traces = r.traces,
                compression = ?r.compression,
                ca_file = r.tls.ca_file.as_ref().map(|f| f.path.display().to_string()),
                client_cert = r.tls.identity.as_ref().map(|(c, _)| c.path.display().to_string()),
                headers = ?r.headers.keys().collect::<Vec<_>>(),
                "OTLP export on"
            );
            Some(tx)
        }
    };

    let sink = Sink {
        metrics: metrics_q,
        audit: audit_q,
        shared: shared.clone(),
    };
    Ok((
        Exporter {
            shared,
            meter_provider,
            tracer_provider,
            workers,
            otlp,
        },
        Arc::new(sink),
    ))
}

/// Waits for `pred`, polling, until `deadline`.
async fn wait_for(deadline: Instant, pred: impl Fn() -> bool) -> bool {
    loop {
        if pred() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs a blocking SDK call on a thread of its own and waits for it, at
/// most until `deadline` (the thread is left to finish on its own).
async fn blocking_until<T: Send + 'static>(
    deadline: Instant,
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ExportError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("tollgate-otlp-{what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(ExportError::Thread)?;
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(ExportError::Sdk(format!("the {what} thread panicked"))),
        Err(_) => Err(ExportError::Timeout(left)),
    }
}

impl Exporter {
    /// The OTLP settings in force (after the environment), if OTLP is on.
    pub fn otlp(&self) -> Option<&ResolvedOtlp> {
        self.otlp.as_ref()
    }

    /// Current pipeline counters.
    pub fn stats(&self) -> ExportStats {
        let s = &self.shared;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStats {
            metrics_accepted: l(&s.metrics_accepted),
            metrics_recorded: l(&s.metrics_done),
            metrics_dropped: l(&s.metrics_dropped),
            audit_accepted: l(&s.audit_accepted),
            audit_written: l(&s.audit_done),
            audit_dropped: l(&s.audit_dropped),
            audit_errors: l(&s.audit_errors),
        }
    }

    /// Waits until every record accepted so far is recorded (and written to
    /// the audit log), then exports now. Returns within `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), ExportError> {
        let deadline = Instant::now() + timeout;
        let s = self.shared.clone();
        let drained = wait_for(deadline, || {
            let l = |a: &AtomicU64| a.load(Ordering::Acquire);
            l(&s.metrics_done) >= l(&s.metrics_accepted) && l(&s.audit_done) >= l(&s.audit_accepted)
        })
        .await;
        if !drained {
            return Err(ExportError::Timeout(timeout));
        }
        if let Some(mp) = self.meter_provider.clone() {
            blocking_until(deadline, "flush", move || mp.force_flush())
                .await?
                .map_err(|e| ExportError::Sdk(e.to_string()))?;
        }
        if let Some(tp) = self.tracer_provider.clone() {
            blocking_until(deadline, "flush", move || tp.force_flush())
                .await?
                .map_err(|e| ExportError::Sdk(e.to_string()))?;
        }
        Ok(())
    }

    /// Stops accepting records, drains the queues, exports what is left and
    /// shuts the SDK down, returning within `timeout` whatever the
    /// collector does (records still queued then are lost for export; the
    /// ledger has them).
    pub async fn shutdown(mut self, timeout: Duration) -> Result<ExportStats, ExportError> {
        let deadline = Instant::now() + timeout;
        self.shared.closed.store(true, Ordering::Release);
        let workers = std::mem::take(&mut self.workers);
        let joined = wait_for(deadline, || workers.iter().all(|w| w.is_finished())).await;
        for w in workers {
            if w.is_finished() {
                let _ = w.join();
            }
        }
        let mut result = if joined {
            Ok(())
        } else {
            Err(ExportError::Timeout(timeout))
        };
        let mp = self.meter_provider.take();
        let tp = self.tracer_provider.take();
        if mp.is_some() || tp.is_some() {
            let r = blocking_until(deadline, "shutdown", move || {
                let mut errs = Vec::new();
                // The metrics first: they are what the exporter is for,
                // and a slow traces endpoint must not use up their time.
                let left = || deadline.saturating_duration_since(Instant::now());
                if let Some(mp) = mp
                    && let Err(e) = mp.shutdown_with_timeout(left())
                {
                    errs.push(e.to_string());
                }
                if let Some(tp) = tp
                    && let Err(e) = tp.shutdown_with_timeout(left())
                {
                    errs.push(e.to_string());
                }
                errs
            })
            .await;
            match r {
                Ok(errs) if errs.is_empty() => {}
                Ok(errs) => {
                    if result.is_ok() {
                        result = Err(ExportError::Sdk(errs.join("; ")));
                    }
                }
                Err(e) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                }
            }
        }
        let stats = self.stats();
        if stats.metrics_dropped > 0 || stats.audit_dropped > 0 {
            warn!(
                metrics = stats.metrics_dropped,
                audit_log = stats.audit_dropped,
                "export pipelines dropped records (the ledger has them)"
            );
        }
        result.map(|()| stats)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Let the workers end; the SDK providers shut down on their own drop.
        self.shared.closed.store(true, Ordering::Release);
    }
}
