//! Building the OTLP pipeline: exporters (gRPC with tonic, HTTP/protobuf
//! with a blocking reqwest client on the SDK's own threads), the resource,
//! the periodic reader, and the optional span pipeline.
//!
//! Export never runs on the request path: the SDK's periodic reader thread
//! collects and exports, with the exporter's retry and backoff bounded by
//! the export timeout. Header values are secrets: they go into requests
//! and nowhere else.

use std::sync::Arc;

use http::header;

use opentelemetry::KeyValue;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{
    MetricExporter, Protocol, SpanExporter, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::SdkTracerProvider;

use super::config::{OtlpCompression, OtlpProtocol, OtlpTemporality, ResolvedOtlp};
use super::tls::CollectorTls;
use super::{ExportError, ResourceInfo, semconv as sc};
use rustls::ClientConfig;

/// The resource every metric and span carries.
pub(crate) fn resource(info: &ResourceInfo, service_name: &str) -> Resource {
    let mut attrs = vec![
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("host.name", info.host_name.clone()),
    ];
    if let Some(r) = info.runner_name.as_deref().filter(|r| !r.is_empty()) {
        attrs.push(KeyValue::new(sc::CICD_WORKER_NAME, r.to_string()));
    }
    // builder(): the SDK's telemetry.sdk.* and OTEL_RESOURCE_ATTRIBUTES,
    // then ours on top.
    Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attributes(attrs)
        .build()
}

/// gRPC metadata set last: what the exporter took from the environment by
/// itself is removed, then the resolved headers are set.
#[derive(Clone)]
struct MetadataInterceptor(Arc<MetadataPlan>);

struct MetadataPlan {
    remove: Vec<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>,
    set: Vec<(
        tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    )>,
}

impl tonic::service::Interceptor for MetadataInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        for k in &self.0.remove {
            req.metadata_mut().remove(k);
        }
        for (k, v) in &self.0.set {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        Ok(req)
    }
}

fn interceptor(r: &ResolvedOtlp) -> Result<MetadataInterceptor, ExportError> {
    let remove = r
        .env_header_names
        .iter()
        .filter_map(|k| tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).ok())
        .collect();
    let mut out = Vec::new();
    for (k, v) in &r.headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).map_err(|_| {
            ExportError::Config {
                key: "export.otlp.headers".into(),
                message: format!("`{k}` is not a valid gRPC metadata key"),
            }
        })?;
        let mut val = tonic::metadata::MetadataValue::try_from(v.as_str()).map_err(|_| {
            ExportError::Config {
                key: "export.otlp.headers".into(),
                message: format!("the value of `{k}` is not valid gRPC metadata"),
            }
        })?;
        val.set_sensitive(true);
        out.push((key, val));
    }
    Ok(MetadataInterceptor(Arc::new(MetadataPlan {
        remove,
        set: out,
    })))
}

/// The blocking reqwest client the SDK's threads use: it removes what the
/// exporter took from the environment by itself, then sets the resolved
/// headers.
struct HeaderClient {
    inner: Option<reqwest::blocking::Client>,
    remove: Vec<http::HeaderName>,
    headers: http::HeaderMap,
    /// An `https://` collector's TLS files, refreshed before each export
    /// (on the SDK's thread, not the agent's runtime).
    tls: Option<CollectorTls>,
}

impl std::fmt::Debug for HeaderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderClient")
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Drop for HeaderClient {
    fn drop(&mut self) {
        // reqwest's blocking client owns a runtime that must not be dropped
        // inside another runtime's worker.
        if let Some(c) = self.inner.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::Builder::new()
                .name("tollgate-otlp-drop".into())
                .spawn(move || drop(c));
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for HeaderClient {
    async fn send_bytes(&self, mut request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // The library sets its content type, then lets the variables'
        // headers overwrite it: a variable's value for any name (Host,
        // Content-Type, ...) must not reach a collector the config names.
        // The content type is put back as the body is encoded.
        let mut removed_content_type = false;
        for k in &self.remove {
            removed_content_type |=
                request.headers_mut().remove(k).is_some() && k == header::CONTENT_TYPE;
        }
        if removed_content_type {
            request.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-protobuf"),
            );
        }
        for (k, v) in &self.headers {
            request.headers_mut().insert(k.clone(), v.clone());
        }
        if let Some(tls) = &self.tls {
            tls.refresh();
        }
        match &self.inner {
            Some(c) => c.send_bytes(request).await,
            None => Err("the OTLP HTTP client is shut down".into()),
        }
    }
}

fn http_client(r: &ResolvedOtlp, tls: Option<&CollectorTls>) -> Result<HeaderClient, ExportError> {
    let mut headers = http::HeaderMap::new();
    for (k, v) in &r.headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| ExportError::Config {
            key: "export.otlp.headers".into(),
            message: format!("`{k}` is not a valid header name"),
        })?;
        let mut val = http::HeaderValue::from_str(v).map_err(|_| ExportError::Config {
            key: "export.otlp.headers".into(),
            message: format!("the value of `{k}` is not a valid header value"),
        })?;
        val.set_sensitive(true);
        headers.insert(name, val);
    }
    let timeout = r.timeout;
    let config = tls.map(|t| ClientConfig::clone(&t.config()));
    // Built on a thread of its own: reqwest's blocking client may not be
    // created inside an async runtime.
    let inner = std::thread::Builder::new()
        .name("tollgate-otlp-client".into())
        .spawn(move || {
            let mut b = reqwest::blocking::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout);
            if let Some(config) = config {
                b = b.tls_backend_preconfigured(config);
            }
            b.build()
        })
        .map_err(ExportError::Thread)?
        .join()
        .map_err(|_| ExportError::Build("building the HTTP client panicked".into()))?
        .map_err(|e| ExportError::Build(format!("HTTP client: {e}")))?;
    Ok(HeaderClient {
        inner: Some(inner),
        remove: r
            .env_header_names
            .iter()
            .filter_map(|k| http::HeaderName::from_bytes(k.as_bytes()).ok())
            .collect(),
        headers,
        tls: tls.cloned(),
    })
}

/// A gRPC exporter to an `https://` collector connects through
/// [`super::tls::grpc_channel`]: the host's CA store (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` too) or only `ca_file` when one is set, and the client
/// certificate when one is set, each read again when it changes on disk
/// (tonic's own TLS takes them once).
fn with_tls<B: WithTonicConfig>(
    b: B,
    r: &ResolvedOtlp,
    tls: Option<&CollectorTls>,
) -> Result<B, ExportError> {
    match tls {
        Some(tls) => Ok(b.with_channel(super::tls::grpc_channel(&r.endpoint, tls, r.timeout)?)),
        None => Ok(b),
    }
}

/// The TLS of `r`'s collector, for both exporters: `None` for an
/// `http://` one, whose TLS files (the start-up log says they are not
/// used) are not read either.
pub(crate) fn collector_tls(r: &ResolvedOtlp) -> Result<Option<CollectorTls>, ExportError> {
    if is_https(&r.endpoint) {
        CollectorTls::new(r).map(Some)
    } else {
        Ok(None)
    }
}

pub(crate) fn is_https(endpoint: &str) -> bool {
    endpoint
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// The library's compression for `c` (none: the library is given none).
fn compression(c: OtlpCompression) -> Option<opentelemetry_otlp::Compression> {
    match c {
        OtlpCompression::None => None,
        OtlpCompression::Gzip => Some(opentelemetry_otlp::Compression::Gzip),
        OtlpCompression::Zstd => Some(opentelemetry_otlp::Compression::Zstd),
    }
}

/// A gRPC exporter builder with `with_tls` and compression `c`.
fn tonic_config<B: WithTonicConfig>(
    b: B,
    r: &ResolvedOtlp,
    c: OtlpCompression,
    tls: Option<&CollectorTls>,
) -> Result<B, ExportError> {
    let b = with_tls(b, r, tls)?;
    Ok(match compression(c) {
        Some(c) => b.with_compression(c),
        None => b,
    })
}

/// An HTTP exporter builder with compression `c`.
fn http_config<B: WithHttpConfig>(b: B, c: OtlpCompression) -> B {
    match compression(c) {
        Some(c) => b.with_compression(c),
        None => b,
    }
}

fn need_runtime(r: &ResolvedOtlp) -> Result<(), ExportError> {
    if r.protocol == OtlpProtocol::Grpc && tokio::runtime::Handle::try_current().is_err() {
        return Err(ExportError::NoRuntime);
    }
    Ok(())
}

/// The meter provider exporting to the collector every `interval`.
pub(crate) fn meter_provider(
    r: &ResolvedOtlp,
    resource: Resource,
    tls: Option<&CollectorTls>,
) -> Result<SdkMeterProvider, ExportError> {
    need_runtime(r)?;
    let temporality = match r.temporality {
        OtlpTemporality::Cumulative => Temporality::Cumulative,
        OtlpTemporality::Delta => Temporality::Delta,
        OtlpTemporality::LowMemory => Temporality::LowMemory,
    };
    let exporter = match r.protocol {
        OtlpProtocol::Grpc => tonic_config(
            MetricExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc)
                .with_endpoint(r.endpoint.clone())
                .with_timeout(r.timeout)
                .with_interceptor(interceptor(r)?),
            r,
            r.compression,
            tls,
        )?
        .with_temporality(temporality)
        .build(),
        OtlpProtocol::HttpProtobuf => http_config(
            MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(r.endpoint.clone())
                .with_timeout(r.timeout)
                .with_http_client(http_client(r, tls)?),
            r.compression,
        )
        .with_temporality(temporality)
        .build(),
    }
    .map_err(|e| ExportError::Build(e.to_string()))?;
    let reader = PeriodicReader::builder(exporter)
        .with_interval(r.interval)
        .build();
    let limit = r.cardinality_limit;
    Ok(SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(reader)
        // Every instrument: only the limit, its name, unit and buckets
        // stay the instrument's own.
        .with_view(move |_: &opentelemetry_sdk::metrics::Instrument| {
            opentelemetry_sdk::metrics::Stream::builder()
                .with_cardinality_limit(limit)
                .build()
                .ok()
        })
        .build())
}

/// The tracer provider for one span per request (`traces = true`), to the
/// same collector: `/v1/traces` instead of `/v1/metrics` over HTTP.
pub(crate) fn tracer_provider(
    r: &ResolvedOtlp,
    resource: Resource,
    tls: Option<&CollectorTls>,
) -> Result<SdkTracerProvider, ExportError> {
    need_runtime(r)?;
    let exporter = match r.protocol {
        OtlpProtocol::Grpc => tonic_config(
            SpanExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc)
                .with_endpoint(r.endpoint.clone())
                .with_timeout(r.timeout)
                .with_interceptor(interceptor(r)?),
            r,
            r.traces_compression,
            tls,
        )?
        .build(),
        OtlpProtocol::HttpProtobuf => http_config(
            SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(traces_endpoint(&r.endpoint))
                .with_timeout(r.timeout)
                .with_http_client(http_client(r, tls)?),
            r.traces_compression,
        )
        .build(),
    }
    .map_err(|e| ExportError::Build(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

/// The OTLP/HTTP traces URL beside a metrics URL.
pub(crate) fn traces_endpoint(metrics: &str) -> String {
    match metrics.strip_suffix("/v1/metrics") {
        Some(base) => format!("{base}/v1/traces"),
        None => metrics.to_string(),
    }
}
