//! `[export]` in the config, and how it combines with the standard
//! `OTEL_*` environment variables.
//!
//! Precedence, as the OpenTelemetry specification has it for SDK
//! configuration: a key set in the config file wins over the environment;
//! a signal-specific variable (`OTEL_EXPORTER_OTLP_METRICS_*`) wins over the
//! generic one (`OTEL_EXPORTER_OTLP_*`); built-in defaults come last.
//! `validate()` looks at the file only; the environment is read once, by
//! [`ExportConfig::resolve`], at start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default OTLP/gRPC endpoint (the collector's default port).
pub const DEFAULT_GRPC_ENDPOINT: &str = "http://localhost:4317";
/// Default OTLP/HTTP metrics endpoint.
pub const DEFAULT_HTTP_ENDPOINT: &str = "http://localhost:4318/v1/metrics";
/// Default export timeout (OTEL_EXPORTER_OTLP_TIMEOUT's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default collection interval (OTEL_METRIC_EXPORT_INTERVAL's default).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// The `OTEL_SEMCONV_STABILITY_OPT_IN` token for the newest GenAI conventions.
pub const GEN_AI_LATEST: &str = "gen_ai_latest_experimental";

/// `[export]`: where usage records go besides the ledger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// OTLP metrics (and optionally spans) to an OpenTelemetry collector.
    pub otlp: OtlpConfig,
    /// A rotated JSONL file with one line per usage record.
    pub audit_log: AuditLogConfig,
    /// Records waiting for each export pipeline (metrics, audit log). When a
    /// pipeline falls this far behind, further records are dropped for it
    /// (never for the ledger) and counted in `tollgate.export.dropped`.
    pub queue: usize,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            otlp: OtlpConfig::default(),
            audit_log: AuditLogConfig::default(),
            queue: 8192,
        }
    }
}

/// Attribute sets one metric keeps by default (the SDK's own default).
pub const DEFAULT_CARDINALITY_LIMIT: usize = 2000;
/// The most `cardinality_limit` may be.
pub const MAX_CARDINALITY_LIMIT: usize = 1_000_000;

/// `[export.otlp]`. Every key but `include_high_cardinality`, `traces` and
/// `headers` falls back to the standard OTEL_* variable named beside it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Export OTLP. Default: on when an endpoint is configured, here or by
    /// `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// unless `OTEL_SDK_DISABLED=true` or `OTEL_METRICS_EXPORTER=none`.
    /// `true` exports even then (to the default endpoint if none is set).
    pub enabled: Option<bool>,
    /// Collector URL, `http://` or `https://`. gRPC: used as is
    /// (`http://collector:4317`). HTTP: a URL without a path gets
    /// `/v1/metrics` appended (`http://collector:4318`), one with a path is
    /// used as is. Env: `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (as is),
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL).
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (the default). Env:
    /// `OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub protocol: Option<OtlpProtocol>,
    /// Extra request headers or gRPC metadata (authentication tokens, tenant
    /// ids). Merged over `OTEL_EXPORTER_OTLP_METRICS_HEADERS` /
    /// `OTEL_EXPORTER_OTLP_HEADERS`; a key set here wins. Values are never
    /// logged.
    pub headers: Headers,
    /// `cumulative` (the default), `delta` or `lowmemory`. Env:
    /// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`.
    pub temporality: Option<OtlpTemporality>,
    /// Seconds one export may take, retries included. Env (milliseconds):
    /// `OTEL_EXPORTER_OTLP_METRICS_TIMEOUT`, `OTEL_EXPORTER_OTLP_TIMEOUT`.
    /// Default 10.
    pub timeout_secs: Option<u64>,
    /// Seconds between exports. Env (milliseconds):
    /// `OTEL_METRIC_EXPORT_INTERVAL`. Default 60.
    pub interval_secs: Option<u64>,
    /// Add per-process and per-run attributes (`process.pid`,
    /// `process.command_line`, `cicd.pipeline.run.id`,
    /// `cicd.pipeline.task.run.id`) to every request metric. Off by
    /// default: each run then makes new time series.
    pub include_high_cardinality: bool,
    /// Most attribute sets (time series) one metric keeps; measurements
    /// with a new set past it are reported with `otel.metric.overflow =
    /// true` instead. Under cumulative temporality the sets last until the
    /// agent restarts; under delta, a set with no measurement in an export
    /// interval is dropped. Default 2000 (the SDK's), 1 to 1000000.
    pub cardinality_limit: Option<usize>,
    /// Which generation of the GenAI semantic conventions to emit:
    /// `default` (`gen_ai.client.token.usage`, ...) or
    /// `gen_ai_latest_experimental` (`gen_ai.client.inference.*`). Env:
    /// `OTEL_SEMCONV_STABILITY_OPT_IN` containing `gen_ai_latest_experimental`.
    pub semconv: Option<Semconv>,
    /// Also export one span per request with the GenAI span attributes
    /// (never prompt or completion content).
    pub traces: bool,
    /// `gzip`, `zstd` or `none` (the default). Env:
    /// `OTEL_EXPORTER_OTLP_METRICS_COMPRESSION`,
    /// `OTEL_EXPORTER_OTLP_COMPRESSION`.
    pub compression: Option<OtlpCompression>,
    /// PEM file of the CA certificates an `https://` collector is checked
    /// against, instead of the host's store. Env:
    /// `OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE`,
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain) for a collector that asks
    /// for one (mutual TLS); with `client_key`. Env:
    /// `OTEL_EXPORTER_OTLP_[METRICS_]CLIENT_CERTIFICATE`.
    pub client_cert: Option<PathBuf>,
    /// PEM file of `client_cert`'s private key. Env:
    /// `OTEL_EXPORTER_OTLP_[METRICS_]CLIENT_KEY`.
    pub client_key: Option<PathBuf>,
}

/// Compression of OTLP exports.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtlpCompression {
    None,
    Gzip,
    Zstd,
}

/// A TLS file for the collector connection, and where it was named (the
/// config key or the variable), for errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFile {
    pub path: PathBuf,
    pub source: String,
}

/// TLS settings for an `https://` collector, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpTls {
    /// Trust these CAs instead of the host's store.
    pub ca_file: Option<TlsFile>,
    /// Client certificate and key (mutual TLS).
    pub identity: Option<(TlsFile, TlsFile)>,
}

/// Header map whose values never appear in logs or `Debug` output.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Headers(pub BTreeMap<String, String>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtlpTemporality {
    Cumulative,
    Delta,
    LowMemory,
}

/// Generation of the GenAI semantic conventions.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum Semconv {
    /// The conventions up to semantic-conventions v1.41 (what GenAI
    /// instrumentations emit by default).
    #[serde(rename = "default")]
    Default,
    /// The latest experimental conventions (`OTEL_SEMCONV_STABILITY_OPT_IN=
    /// gen_ai_latest_experimental`).
    #[serde(rename = "gen_ai_latest_experimental")]
    LatestExperimental,
}

/// `[export.audit_log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditLogConfig {
    /// JSONL file to append one line per usage record to (the record's JSON
    /// form, as `tollgate report --json` prints it). Absent: no audit log.
    pub path: Option<PathBuf>,
    /// Rotate when the file would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept beside the current one (`PATH.1` newest ...
    /// `PATH.KEEP` oldest); 0 keeps none.
    pub keep: u32,
}

impl Default for AuditLogConfig {
    fn default() -> Self {
        AuditLogConfig {
            path: None,
            max_bytes: 64 * 1024 * 1024,
            keep: 5,
        }
    }
}

/// Most records an export pipeline may queue.
const MAX_QUEUE: usize = 1 << 20;

impl ExportConfig {
    /// Pure validation; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| -> Result<(), (String, String)> {
            Err((format!("export.{k}"), m))
        };
        if self.queue == 0 {
            return bad("queue", "must be at least 1".into());
        }
        if self.queue > MAX_QUEUE {
            // Each pipeline's channel allocates its slots at start.
            return bad(
                "queue",
                format!(
                    "{} is more than {MAX_QUEUE}; each pipeline's queue is allocated at start",
                    self.queue
                ),
            );
        }
        let o = &self.otlp;
        if let Some(e) = &o.endpoint
            && let Err(m) = check_endpoint(e)
        {
            return bad("otlp.endpoint", m);
        }
        for (k, v) in &o.headers.0 {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                return bad("otlp.headers", format!("`{k}` is not a valid header name"));
            }
            if http::HeaderValue::from_str(v).is_err() {
                // Never echo the value: it is usually a secret.
                return bad(
                    "otlp.headers",
                    format!("the value of `{k}` is not a valid header value"),
                );
            }
        }
        if o.timeout_secs == Some(0) {
            return bad("otlp.timeout_secs", "must be at least 1".into());
        }
        if o.interval_secs == Some(0) {
            return bad("otlp.interval_secs", "must be at least 1".into());
        }
        for (k, p) in [
            ("ca_file", &o.ca_file),
            ("client_cert", &o.client_cert),
            ("client_key", &o.client_key),
        ] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                return bad(
                    &format!("otlp.{k}"),
                    format!("`{}` must be an absolute path", p.display()),
                );
            }
        }
        match (&o.client_cert, &o.client_key) {
            (Some(_), None) => {
                return bad(
                    "otlp.client_key",
                    "is needed with otlp.client_cert (the certificate's private key)".into(),
                );
            }
            (None, Some(_)) => {
                return bad(
                    "otlp.client_cert",
                    "is needed with otlp.client_key (the key's certificate)".into(),
                );
            }
            _ => {}
        }
        if o.cardinality_limit
            .is_some_and(|n| !(1..=MAX_CARDINALITY_LIMIT).contains(&n))
        {
            return bad(
                "otlp.cardinality_limit",
                format!("must be 1 to {MAX_CARDINALITY_LIMIT}"),
            );
        }
        let a = &self.audit_log;
        if let Some(p) = &a.path
            && (!p.is_absolute() || p.file_name().is_none())
        {
            return bad(
                "audit_log.path",
                format!("`{}` must be an absolute file path", p.display()),
            );
        }
        if a.max_bytes < 4096 {
            return bad("audit_log.max_bytes", "must be at least 4096".into());
        }
        if a.keep > 1000 {
            return bad("audit_log.keep", "must be at most 1000".into());
        }
        Ok(())
    }

    /// The OTLP settings after the environment is applied (`env` looks a
    /// variable up), or `None` when OTLP export is off. Invalid values in
    /// the environment are errors naming the variable.
    pub fn resolve(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<ResolvedOtlp>, (String, String)> {
        let o = &self.otlp;
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let metrics_ep = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
        let generic_ep = env("OTEL_EXPORTER_OTLP_ENDPOINT");
        let disabled_by_env = env("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || env("OTEL_METRICS_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
        let enabled = match o.enabled {
            Some(e) => e,
            None => {
                (o.endpoint.is_some() || metrics_ep.is_some() || generic_ep.is_some())
                    && !disabled_by_env
            }
        };
        if !enabled {
            return Ok(None);
        }
        let protocol = match o.protocol {
            Some(p) => p,
            None => match env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
                .map(|v| ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", v))
                .or_else(|| {
                    env("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL", v))
                }) {
                None => OtlpProtocol::HttpProtobuf,
                Some((k, v)) => match v.trim() {
                    "grpc" => OtlpProtocol::Grpc,
                    "http/protobuf" => OtlpProtocol::HttpProtobuf,
                    other => {
                        return Err((
                            k.into(),
                            format!("`{other}` is not supported: use `grpc` or `http/protobuf`"),
                        ));
                    }
                },
            },
        };
        let endpoint = if let Some(e) = &o.endpoint {
            match protocol {
                OtlpProtocol::Grpc => e.clone(),
                OtlpProtocol::HttpProtobuf => with_metrics_path(e),
            }
        } else if let Some(e) = metrics_ep {
            check_endpoint(&e).map_err(|m| ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT".into(), m))?;
            e
        } else if let Some(e) = generic_ep {
            check_endpoint(&e).map_err(|m| ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), m))?;
            match protocol {
                OtlpProtocol::Grpc => e,
                OtlpProtocol::HttpProtobuf => format!("{}/v1/metrics", e.trim_end_matches('/')),
            }
        } else {
            match protocol {
                OtlpProtocol::Grpc => DEFAULT_GRPC_ENDPOINT.into(),
                OtlpProtocol::HttpProtobuf => DEFAULT_HTTP_ENDPOINT.into(),
            }
        };
        let mut headers = BTreeMap::new();
        let env_headers = env("OTEL_EXPORTER_OTLP_METRICS_HEADERS")
            .map(|v| ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", v))
            .or_else(|| {
                env("OTEL_EXPORTER_OTLP_HEADERS").map(|v| ("OTEL_EXPORTER_OTLP_HEADERS", v))
            });
        // Headers from the environment go only to an endpoint from the
        // environment (or the default): an API key meant for the collector
        // the environment names must not reach the one the config names.
        let mut env_headers_ignored = None;
        if let Some((var, v)) = env_headers {
            let parsed = parse_env_headers(&v).map_err(|m| (var.to_string(), m))?;
            if o.endpoint.is_some() {
                env_headers_ignored = Some(var);
            } else {
                headers.extend(parsed);
            }
        }
        for (k, v) in &o.headers.0 {
            headers.insert(k.to_ascii_lowercase(), v.clone());
        }
        // The exporter library reads these variables itself and adds their
        // headers to every export, whatever the endpoint; the transports
        // take those names out again and set `headers` alone.
        let env_header_names = [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ]
        .into_iter()
        .filter_map(env)
        .flat_map(|v| {
            v.split(',')
                .filter_map(|item| Some(item.split_once('=')?.0.trim().to_ascii_lowercase()))
                .filter(|k| !k.is_empty())
                .collect::<Vec<_>>()
        })
        .collect::<BTreeSet<_>>();
        let temporality = match o.temporality {
            Some(t) => t,
            None => match env("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE") {
                None => OtlpTemporality::Cumulative,
                Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                    "cumulative" => OtlpTemporality::Cumulative,
                    "delta" => OtlpTemporality::Delta,
                    "lowmemory" => OtlpTemporality::LowMemory,
                    other => {
                        return Err((
                            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE".into(),
                            format!("`{other}`: use cumulative, delta or lowmemory"),
                        ));
                    }
                },
            },
        };
        let millis = |k: &str| -> Result<Option<Duration>, (String, String)> {
            match env(k) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Some(Duration::from_millis(n))),
                    _ => Err((
                        k.into(),
                        format!("`{v}` is not a positive number of milliseconds"),
                    )),
                },
            }
        };
        let timeout = match o.timeout_secs {
            Some(s) => Duration::from_secs(s),
            None => match millis("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT")? {
                Some(d) => d,
                None => millis("OTEL_EXPORTER_OTLP_TIMEOUT")?.unwrap_or(DEFAULT_TIMEOUT),
            },
        };
        let interval = match o.interval_secs {
            Some(s) => Duration::from_secs(s),
            None => millis("OTEL_METRIC_EXPORT_INTERVAL")?.unwrap_or(DEFAULT_INTERVAL),
        };
        let (compression, traces_compression) = resolve_compression(o.compression, o.traces, &env)?;
        let tls = resolve_tls(o, &env)?;
        let semconv = o.semconv.unwrap_or_else(|| {
            let opted_in = env("OTEL_SEMCONV_STABILITY_OPT_IN")
                .is_some_and(|v| v.split(',').any(|t| t.trim() == GEN_AI_LATEST));
            if opted_in {
                Semconv::LatestExperimental
            } else {
                Semconv::Default
            }
        });
        Ok(Some(ResolvedOtlp {
            endpoint,
            protocol,
            headers,
            temporality,
            timeout,
            interval,
            semconv,
            include_high_cardinality: o.include_high_cardinality,
            cardinality_limit: o.cardinality_limit.unwrap_or(DEFAULT_CARDINALITY_LIMIT),
            traces: o.traces,
            compression,
            traces_compression,
            tls,
            // As the specification ranks them: OTEL_SERVICE_NAME, then
            // OTEL_RESOURCE_ATTRIBUTES' service.name, then ours.
            service_name: env("OTEL_SERVICE_NAME")
                .filter(|n| !n.trim().is_empty())
                .or_else(|| env("OTEL_RESOURCE_ATTRIBUTES").and_then(|a| resource_service_name(&a)))
                .unwrap_or_else(|| "tollgate".into()),
            env_headers_ignored,
            env_header_names,
        }))
    }
}

/// OTLP settings with config and environment combined.
#[derive(Clone, PartialEq, Eq)]
pub struct ResolvedOtlp {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Lower-case keys; values are secrets.
    pub headers: BTreeMap<String, String>,
    pub temporality: OtlpTemporality,
    pub timeout: Duration,
    pub interval: Duration,
    pub semconv: Semconv,
    pub include_high_cardinality: bool,
    pub cardinality_limit: usize,
    pub traces: bool,
    pub compression: OtlpCompression,
    /// The spans' compression (`..._TRACES_COMPRESSION` before the
    /// generic variable); `None` when spans are off.
    pub traces_compression: OtlpCompression,
    /// CA and client certificate files, for an `https://` collector.
    pub tls: OtlpTls,
    /// `OTEL_SERVICE_NAME`, else `tollgate`.
    pub service_name: String,
    /// The headers variable left unused because the endpoint comes from
    /// the config (the start-up log says so).
    pub env_headers_ignored: Option<&'static str>,
    /// Lower-case names of every header in the `OTEL_EXPORTER_OTLP_*HEADERS`
    /// variables, which the exporter library adds by itself: removed from
    /// each export before `headers` are set, so that only `headers` are
    /// sent (an API key meant for the environment's collector never
    /// reaches the one the config names).
    pub env_header_names: BTreeSet<String>,
}

impl std::fmt::Debug for ResolvedOtlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedOtlp")
            .field("endpoint", &endpoint_for_logs(&self.endpoint))
            .field("protocol", &self.protocol)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("temporality", &self.temporality)
            .field("timeout", &self.timeout)
            .field("interval", &self.interval)
            .field("semconv", &self.semconv)
            .field("include_high_cardinality", &self.include_high_cardinality)
            .field("cardinality_limit", &self.cardinality_limit)
            .field("traces", &self.traces)
            .field("compression", &self.compression)
            .field("traces_compression", &self.traces_compression)
            .field("tls", &self.tls)
            .field("service_name", &self.service_name)
            .field("env_headers_ignored", &self.env_headers_ignored)
            .field("env_header_names", &self.env_header_names)
            .finish()
    }
}

/// A compression variable's value as the exporter library reads it:
/// whole, in any case; `None` for one it would not take.
fn compression_value(v: &str) -> Option<OtlpCompression> {
    match v.to_ascii_lowercase().as_str() {
        "none" => Some(OtlpCompression::None),
        "gzip" => Some(OtlpCompression::Gzip),
        "zstd" => Some(OtlpCompression::Zstd),
        _ => None,
    }
}

/// The compression of metrics and of spans: the config's, else the
/// signal's variable (`..._METRICS_COMPRESSION`, `..._TRACES_COMPRESSION`),
/// else the generic one, else none; a value the library would not take
/// is an error naming its variable (the traces one only when spans are
/// exported). The library reads the variables itself when it is given no
/// compression, so a `none` in the config cannot turn off one a signal's
/// variables ask for: that is an error naming the variable, rather than a
/// setting silently not applied.
fn resolve_compression(
    config: Option<OtlpCompression>,
    traces: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(OtlpCompression, OtlpCompression), (String, String)> {
    type Found = Option<(&'static str, OtlpCompression)>;
    let signal = |var: &'static str| -> Result<Found, (String, String)> {
        for v in [var, "OTEL_EXPORTER_OTLP_COMPRESSION"] {
            let Some(value) = env(v) else { continue };
            let Some(c) = compression_value(&value) else {
                return Err((
                    v.into(),
                    format!("`{}`: use gzip, zstd or none", value.trim()),
                ));
            };
            return Ok(Some((v, c)));
        }
        Ok(None)
    };
    let metrics = signal("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION")?;
    let spans = if traces {
        signal("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION")?
    } else {
        None
    };
    if config == Some(OtlpCompression::None) {
        for (var, c) in metrics.into_iter().chain(spans) {
            if c != OtlpCompression::None {
                return Err((
                    "export.otlp.compression".into(),
                    format!(
                        "`none` cannot turn off the compression {var} asks for (the exporter \
                         library reads the variable itself): remove the variable from the \
                         service's environment, or set it to none"
                    ),
                ));
            }
        }
    }
    let pick = |from_env: Found| {
        config
            .or(from_env.map(|(_, c)| c))
            .unwrap_or(OtlpCompression::None)
    };
    Ok((pick(metrics), pick(spans)))
}

/// The CA file and client identity: from the config if it names them,
/// else each from its metrics variable, else from the generic one; a
/// certificate without its key (or the other way) is an error.
fn resolve_tls(
    o: &OtlpConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<OtlpTls, (String, String)> {
    let from_config = |key: &str, p: &Option<PathBuf>| {
        p.as_ref().map(|p| TlsFile {
            path: p.clone(),
            source: format!("export.otlp.{key}"),
        })
    };
    let from_env = |var: &str| -> Result<Option<TlsFile>, (String, String)> {
        match env(var) {
            None => Ok(None),
            Some(v) => {
                let path = PathBuf::from(v.trim());
                if !path.is_absolute() {
                    return Err((
                        var.into(),
                        format!("`{}` must be an absolute path", path.display()),
                    ));
                }
                Ok(Some(TlsFile {
                    path,
                    source: var.into(),
                }))
            }
        }
    };
    let ca_file = match from_config("ca_file", &o.ca_file) {
        Some(f) => Some(f),
        None => match from_env("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE")? {
            Some(f) => Some(f),
            None => from_env("OTEL_EXPORTER_OTLP_CERTIFICATE")?,
        },
    };
    let identity = match (
        from_config("client_cert", &o.client_cert),
        from_config("client_key", &o.client_key),
    ) {
        (Some(c), Some(k)) => Some((c, k)),
        (Some(_), None) | (None, Some(_)) => {
            return Err((
                "export.otlp.client_cert".into(),
                "client_cert and client_key go together".into(),
            ));
        }
        (None, None) => {
            // Each variable on its own, the metrics one first, as the
            // specification resolves them; then the two must pair up.
            let first = |a: &str, b: &str| -> Result<Option<TlsFile>, (String, String)> {
                Ok(match from_env(a)? {
                    Some(f) => Some(f),
                    None => from_env(b)?,
                })
            };
            let cert = first(
                "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            )?;
            let key = first(
                "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            )?;
            match (cert, key) {
                (Some(c), Some(k)) => Some((c, k)),
                (Some(c), None) => {
                    return Err((
                        c.source,
                        "is set but OTEL_EXPORTER_OTLP[_METRICS]_CLIENT_KEY is not (the certificate's private key)".into(),
                    ));
                }
                (None, Some(k)) => {
                    return Err((
                        k.source,
                        "is set but OTEL_EXPORTER_OTLP[_METRICS]_CLIENT_CERTIFICATE is not (the key's certificate)".into(),
                    ));
                }
                (None, None) => None,
            }
        }
    };
    Ok(OtlpTls { ca_file, identity })
}

/// A collector URL as logs show it: scheme, host and port, and of the path
/// only the segments that cannot be a key (at most 16 bytes, e.g. `otlp`,
/// `v1`, `metrics`); longer ones, where some vendors put an ingest token,
/// become `…`. Queries and user info are refused by `check_endpoint`.
pub(crate) fn endpoint_for_logs(e: &str) -> String {
    let Ok(uri) = e.parse::<http::Uri>() else {
        return "(not a URL)".into();
    };
    let mut out = format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("?"),
        uri.host().unwrap_or("?")
    );
    if let Some(port) = uri.port_u16() {
        out.push_str(&format!(":{port}"));
    }
    for seg in uri.path().split('/').skip(1) {
        out.push('/');
        out.push_str(if seg.len() <= 16 { seg } else { "…" });
    }
    out
}

/// Checks a collector URL. The messages never repeat the URL beyond what
/// `endpoint_for_logs` shows: a query, user info or a long path segment may
/// hold a key.
pub(super) fn check_endpoint(e: &str) -> Result<(), String> {
    let uri: http::Uri = e
        .parse()
        .map_err(|err| format!("the value is not a URL ({err})"))?;
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        // It would end up in logs: credentials belong in `headers`.
        return Err("the URL must not contain credentials: put them in headers".into());
    }
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("the URL must start with http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if uri.query().is_some() {
        return Err(format!(
            "`{}` must not have a query string (keys belong in headers)",
            endpoint_for_logs(e)
        ));
    }
    Ok(())
}

/// An OTLP/HTTP URL from the config: a bare base URL gets `/v1/metrics`.
fn with_metrics_path(e: &str) -> String {
    match e.parse::<http::Uri>() {
        Ok(u) if matches!(u.path(), "" | "/") => {
            format!("{}/v1/metrics", e.trim_end_matches('/'))
        }
        _ => e.to_string(),
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `key1=value1,key2=value2`, values
/// percent-decoded (W3C baggage format, as the specification says).
pub fn parse_env_headers(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, item) in s
        .split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .enumerate()
    {
        let Some((k, v)) = item.split_once('=') else {
            // Not the entry itself: `Authorization: Bearer …` is the usual
            // mistake, and it holds the key.
            return Err(format!(
                "entry {} has no `=` (the format is key1=value1,key2=value2)",
                n + 1
            ));
        };
        let k = k.trim().to_ascii_lowercase();
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
            // Not echoed either: `Authorization: Basic dXNl…=` splits here.
            return Err(format!(
                "the key of entry {} is not a valid header name",
                n + 1
            ));
        }
        let v = percent_decode(v.trim())
            .ok_or_else(|| format!("the value of `{k}` is not valid percent-encoded UTF-8"))?;
        if http::HeaderValue::from_str(&v).is_err() {
            return Err(format!("the value of `{k}` is not a valid header value"));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// `service.name` from `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k=v`, values
/// percent-encoded).
fn resource_service_name(attrs: &str) -> Option<String> {
    attrs
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == "service.name")
        .and_then(|(_, v)| percent_decode(v.trim()))
        .filter(|v| !v.is_empty())
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
