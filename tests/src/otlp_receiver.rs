//! OTLP test receivers built on the official `opentelemetry-proto` types: a
//! tonic gRPC `MetricsService` + `TraceService` and an OTLP/HTTP endpoint
//! (`POST /v1/metrics`, `POST /v1/traces`, protobuf bodies decoded with
//! prost). Both listen on 127.0.0.1 with a port
//! of the kernel's choosing, keep every request as received (resource
//! attributes and typed attribute values included), and offer a flattened
//! view of the data points for assertions.
//!
//! Must never: listen on anything but loopback, or interpret what it
//! receives beyond decoding it (tests assert on the raw structure).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

/// A typed attribute value, as it arrived.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    /// Arrays, maps, bytes: not used by tollgate, kept as their debug form.
    Other(String),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The attributes of a resource, scope or data point, sorted by key.
pub type Attributes = BTreeMap<String, Value>;

/// What kind of instrument produced a metric, as the wire says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A sum; `monotonic` true for counters.
    Sum {
        monotonic: bool,
        cumulative: bool,
    },
    Gauge,
    Histogram {
        cumulative: bool,
    },
    ExponentialHistogram,
    Summary,
}

/// The value of one data point.
#[derive(Debug, Clone, PartialEq)]
pub enum PointValue {
    Int(i64),
    Double(f64),
    Histogram {
        count: u64,
        sum: Option<f64>,
        bounds: Vec<f64>,
        bucket_counts: Vec<u64>,
    },
    Other,
}

impl PointValue {
    /// A number point as f64 (ints converted); the sum of a histogram.
    pub fn number(&self) -> Option<f64> {
        match self {
            PointValue::Int(i) => Some(*i as f64),
            PointValue::Double(d) => Some(*d),
            PointValue::Histogram { sum, .. } => *sum,
            PointValue::Other => None,
        }
    }
}

/// One data point with everything that identifies it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Index of the export request it arrived in.
    pub request: usize,
    pub resource: Attributes,
    pub scope: String,
    pub name: String,
    pub unit: String,
    pub description: String,
    pub kind: Kind,
    pub attributes: Attributes,
    pub value: PointValue,
}

/// One export request as received, with the transport's headers
/// (gRPC metadata or HTTP headers, lower-case keys).
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub request: ExportMetricsServiceRequest,
    /// DER of the certificate the exporter showed, over mutual TLS.
    pub client_cert: Option<Vec<u8>>,
}

/// What a TLS connection's handshake told the receiver: the client's
/// certificate (DER), when it showed one.
#[derive(Debug, Clone, Default)]
pub struct ClientCert(pub Option<Vec<u8>>);

impl ClientCert {
    fn of<IO>(tls: &tokio_rustls::server::TlsStream<IO>) -> ClientCert {
        ClientCert(
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
        )
    }
}

/// One span as received, with its resource.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanPoint {
    pub resource: Attributes,
    pub scope: String,
    pub name: String,
    /// OTLP `SpanKind` (3 = CLIENT).
    pub kind: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Attributes,
    /// OTLP status code (0 unset, 1 ok, 2 error) and message.
    pub status: (i32, String),
}

#[derive(Default)]
struct Store {
    received: Mutex<Vec<Received>>,
    traces: Mutex<Vec<ExportTraceServiceRequest>>,
    notify: Notify,
    /// Trace exports are held unanswered (a traces pipeline that stalls).
    stall_traces: std::sync::atomic::AtomicBool,
}

/// How long a stalled trace export is held: longer than any exporter's
/// timeout in the tests.
const TRACES_STALL: std::time::Duration = std::time::Duration::from_secs(60);

impl Store {
    fn push(&self, r: Received) {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r);
        self.notify.notify_waiters();
    }

    fn push_traces(&self, r: ExportTraceServiceRequest) {
        self.traces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r);
        self.notify.notify_waiters();
    }
}

/// Which transport a receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// A running receiver; stopped on drop.
pub struct OtlpReceiver {
    transport: Transport,
    /// Over TLS (`https://`).
    tls: bool,
    addr: SocketAddr,
    store: Arc<Store>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

struct GrpcService(Arc<Store>);

#[tonic::async_trait]
impl MetricsService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let client_cert = request
            .extensions()
            .get::<ClientCert>()
            .and_then(|c| c.0.clone());
        self.0.push(Received {
            headers,
            request: request.into_inner(),
            client_cert,
        });
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

struct GrpcTraces(Arc<Store>);

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self
            .0
            .stall_traces
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            tokio::time::sleep(TRACES_STALL).await;
        }
        self.0.push_traces(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpReceiver {
    /// A gRPC `MetricsService` and `TraceService` on 127.0.0.1:0.
    pub async fn grpc() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC receiver on 127.0.0.1:0");
        let addr = listener.local_addr().expect("receiver address");
        serve_grpc(tokio_stream_from(listener), addr, false, None)
    }

    /// [`OtlpReceiver::grpc`] over TLS (HTTP/2 by ALPN), its certificate
    /// for 127.0.0.1 signed by `pki`'s CA: a collector the exporter
    /// trusts only through the host's store (`SSL_CERT_FILE`).
    pub async fn grpc_tls(pki: &crate::pki::TestPki) -> OtlpReceiver {
        OtlpReceiver::grpc_over(tls_acceptor(pki, None, &[b"h2"]), None).await
    }

    /// [`OtlpReceiver::grpc_tls`] that asks for a client certificate
    /// signed by `client_ca` (mutual TLS) and refuses a handshake without.
    pub async fn grpc_mtls(
        pki: &crate::pki::TestPki,
        client_ca: &crate::pki::TestPki,
    ) -> OtlpReceiver {
        OtlpReceiver::grpc_over(tls_acceptor(pki, Some(client_ca), &[b"h2"]), None).await
    }

    /// [`OtlpReceiver::grpc_mtls`] that ends each connection after `age`
    /// (gRPC's `max_connection_age`, as load balancers do), so that the
    /// exporter shakes hands again with the certificate it has then.
    pub async fn grpc_mtls_reconnecting(
        pki: &crate::pki::TestPki,
        client_ca: &crate::pki::TestPki,
        age: Duration,
    ) -> OtlpReceiver {
        OtlpReceiver::grpc_over(tls_acceptor(pki, Some(client_ca), &[b"h2"]), Some(age)).await
    }

    async fn grpc_over(acceptor: tokio_rustls::TlsAcceptor, age: Option<Duration>) -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gRPC receiver on 127.0.0.1:0");
        let addr = listener.local_addr().expect("receiver address");
        // Handshakes that fail (an exporter that refuses the certificate,
        // or shows none when one is asked for) are dropped: nothing
        // reaches the service then.
        let incoming =
            futures_util::stream::unfold((listener, acceptor), |(l, acceptor)| async move {
                loop {
                    let Ok((tcp, _)) = l.accept().await else {
                        continue;
                    };
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        return Some((Ok::<_, std::io::Error>(Tls(tls)), (l, acceptor)));
                    }
                }
            });
        serve_grpc(incoming, addr, true, age)
    }

    /// [`OtlpReceiver::http`] over TLS, asking for a client certificate
    /// signed by `client_ca` (mutual TLS) and refusing a handshake without.
    pub async fn http_mtls(
        pki: &crate::pki::TestPki,
        client_ca: &crate::pki::TestPki,
    ) -> OtlpReceiver {
        OtlpReceiver::http_over(Some(tls_acceptor(
            pki,
            Some(client_ca),
            &[b"h2", b"http/1.1"],
        )))
        .await
    }

    /// An OTLP/HTTP endpoint (`POST /v1/metrics` and `/v1/traces`,
    /// `application/x-protobuf`) on 127.0.0.1:0. Other paths answer 404,
    /// other content types 415.
    pub async fn http() -> OtlpReceiver {
        OtlpReceiver::http_over(None).await
    }

    async fn http_over(acceptor: Option<tokio_rustls::TlsAcceptor>) -> OtlpReceiver {
        let tls = acceptor.is_some();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP/HTTP receiver on 127.0.0.1:0");
        let addr = listener.local_addr().expect("receiver address");
        let store = Arc::new(Store::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let st = store.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stopped => break,
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(_) => continue,
                    },
                };
                let st = st.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = |cert: ClientCert| {
                        hyper::service::service_fn(move |req| {
                            let (st, cert) = (st.clone(), cert.0.clone());
                            async move { Ok::<_, Infallible>(http_export(&st, req, cert).await) }
                        })
                    };
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    match acceptor {
                        // A failed handshake is dropped: nothing arrives.
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let svc = svc(ClientCert::of(&tls));
                                let _ = builder
                                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(
                                    hyper_util::rt::TokioIo::new(stream),
                                    svc(ClientCert::default()),
                                )
                                .await;
                        }
                    }
                });
            }
        });
        OtlpReceiver {
            transport: Transport::Http,
            tls,
            addr,
            store,
            stop: Some(stop),
        }
    }

    /// From now on, trace exports are held unanswered (metrics are not).
    pub fn stall_traces(&self) {
        self.store
            .stall_traces
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint to configure an exporter with: `http://127.0.0.1:PORT`
    /// for gRPC, `http://127.0.0.1:PORT/v1/metrics` for OTLP/HTTP.
    pub fn endpoint(&self) -> String {
        match self.transport {
            Transport::Grpc if self.tls => format!("https://{}", self.addr),
            Transport::Grpc => format!("http://{}", self.addr),
            Transport::Http if self.tls => format!("https://{}/v1/metrics", self.addr),
            Transport::Http => format!("http://{}/v1/metrics", self.addr),
        }
    }

    /// Every export request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.store
            .received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every data point of every request, in arrival order.
    pub fn points(&self) -> Vec<Point> {
        self.received()
            .iter()
            .enumerate()
            .flat_map(|(i, r)| flatten(i, &r.request))
            .collect()
    }

    /// The most recent point of each series (metric name + attributes):
    /// with cumulative temporality, the totals.
    pub fn latest(&self) -> Vec<Point> {
        let mut by_series: BTreeMap<(String, String), Point> = BTreeMap::new();
        for p in self.points() {
            by_series.insert((p.name.clone(), format!("{:?}", p.attributes)), p);
        }
        by_series.into_values().collect()
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<SpanPoint> {
        let reqs = self
            .store
            .traces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = Vec::new();
        for req in &reqs {
            for rs in &req.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| attributes(&r.attributes))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    let scope = ss
                        .scope
                        .as_ref()
                        .map(|s| s.name.clone())
                        .unwrap_or_default();
                    for sp in &ss.spans {
                        out.push(SpanPoint {
                            resource: resource.clone(),
                            scope: scope.clone(),
                            name: sp.name.clone(),
                            kind: sp.kind,
                            start_unix_nano: sp.start_time_unix_nano,
                            end_unix_nano: sp.end_time_unix_nano,
                            attributes: attributes(&sp.attributes),
                            status: sp
                                .status
                                .as_ref()
                                .map(|s| (s.code, s.message.clone()))
                                .unwrap_or_default(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Waits until `pred` holds for the received requests, or `timeout`.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Received]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.store.notify.notified();
            if pred(&self.received()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return pred(&self.received());
            }
        }
    }
}

/// The gRPC `MetricsService` and `TraceService` on the connections of
/// `incoming` (at `addr`), until the receiver is dropped.
fn serve_grpc<I, IO>(
    incoming: I,
    addr: SocketAddr,
    tls: bool,
    age: Option<Duration>,
) -> OtlpReceiver
where
    I: futures_util::Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
{
    let store = Arc::new(Store::default());
    let (stop, stopped) = oneshot::channel::<()>();
    use tonic::codec::CompressionEncoding::{Gzip, Zstd};
    // A collector accepts gzip and zstd; tonic answers UNIMPLEMENTED to an
    // encoding a service does not accept.
    let svc = MetricsServiceServer::new(GrpcService(store.clone()))
        .accept_compressed(Gzip)
        .accept_compressed(Zstd);
    let traces = TraceServiceServer::new(GrpcTraces(store.clone()))
        .accept_compressed(Gzip)
        .accept_compressed(Zstd);
    tokio::spawn(async move {
        let mut server = tonic::transport::Server::builder();
        if let Some(age) = age {
            server = server.max_connection_age(age);
        }
        let _ = server
            .add_service(svc)
            .add_service(traces)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await;
    });
    OtlpReceiver {
        transport: Transport::Grpc,
        tls,
        addr,
        store,
        stop: Some(stop),
    }
}

/// A TLS acceptor with a leaf for 127.0.0.1 from `pki`, asking for a
/// client certificate from `client_ca` when given one.
fn tls_acceptor(
    pki: &crate::pki::TestPki,
    client_ca: Option<&crate::pki::TestPki>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let leaf = pki.leaf("127.0.0.1");
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("leaf pem");
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut leaf.key_pem.as_bytes())
        .expect("key pem")
        .expect("a key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut ca.ca_pem.as_bytes()) {
                roots.add(c.expect("client CA pem")).expect("client CA");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .expect("the receiver's certificate");
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// A TLS connection to the gRPC receiver, as tonic's server takes one.
struct Tls(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ClientCert;
    fn connect_info(&self) -> Self::ConnectInfo {
        ClientCert::of(&self.0)
    }
}

impl tokio::io::AsyncRead for Tls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tls {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn tokio_stream_from(
    listener: TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

async fn http_export(
    store: &Store,
    req: Request<hyper::body::Incoming>,
    client_cert: Option<Vec<u8>>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: &'static str| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response")
    };
    let traces = match (req.method(), req.uri().path()) {
        (&hyper::Method::POST, "/v1/metrics") => false,
        (&hyper::Method::POST, "/v1/traces") => true,
        _ => return reply(StatusCode::NOT_FOUND, "not found"),
    };
    let ct = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != "application/x-protobuf" {
        return reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "want application/x-protobuf",
        );
    }
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let encoding = req
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, "body"),
    };
    // A collector decodes gzip and zstd bodies (the encoding stays in the
    // received headers for tests to look at).
    let body = match encoding.as_str() {
        "" | "identity" => body,
        "gzip" => {
            use std::io::Read;
            let mut out = Vec::new();
            match flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out) {
                Ok(_) => Bytes::from(out),
                Err(_) => return reply(StatusCode::BAD_REQUEST, "bad gzip"),
            }
        }
        "zstd" => match zstd::stream::decode_all(&body[..]) {
            Ok(out) => Bytes::from(out),
            Err(_) => return reply(StatusCode::BAD_REQUEST, "bad zstd"),
        },
        _ => {
            return reply(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unknown content-encoding",
            );
        }
    };
    if traces {
        if store
            .stall_traces
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            tokio::time::sleep(TRACES_STALL).await;
        }
        return match ExportTraceServiceRequest::decode(body) {
            Ok(r) => {
                store.push_traces(r);
                Response::builder()
                    .status(StatusCode::OK)
                    .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(Bytes::from(
                        ExportTraceServiceResponse {
                            partial_success: None,
                        }
                        .encode_to_vec(),
                    )))
                    .expect("response")
            }
            Err(_) => reply(StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest"),
        };
    }
    let request = match ExportMetricsServiceRequest::decode(body) {
        Ok(r) => r,
        Err(_) => {
            return reply(
                StatusCode::BAD_REQUEST,
                "not an ExportMetricsServiceRequest",
            );
        }
    };
    store.push(Received {
        headers,
        request,
        client_cert,
    });
    let resp = ExportMetricsServiceResponse {
        partial_success: None,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(resp.encode_to_vec())))
        .expect("response")
}

/// Converts OTLP attributes to the typed map.
pub fn attributes(kvs: &[KeyValue]) -> Attributes {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
        .collect()
}

fn value(v: Option<&AnyValue>) -> Value {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Value::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => Value::Int(*i),
        Some(any_value::Value::DoubleValue(d)) => Value::Double(*d),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        other => Value::Other(format!("{other:?}")),
    }
}

const CUMULATIVE: i32 = 2;

fn flatten(index: usize, req: &ExportMetricsServiceRequest) -> Vec<Point> {
    let mut out = Vec::new();
    for rm in &req.resource_metrics {
        let resource = rm
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for sm in &rm.scope_metrics {
            let scope = sm
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for m in &sm.metrics {
                let base = |kind: Kind, attributes: Attributes, value: PointValue| Point {
                    request: index,
                    resource: resource.clone(),
                    scope: scope.clone(),
                    name: m.name.clone(),
                    unit: m.unit.clone(),
                    description: m.description.clone(),
                    kind,
                    attributes,
                    value,
                };
                let number = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsInt(i)) => PointValue::Int(*i),
                    Some(number_data_point::Value::AsDouble(d)) => PointValue::Double(*d),
                    None => PointValue::Other,
                };
                match &m.data {
                    Some(metric::Data::Sum(s)) => {
                        let kind = Kind::Sum {
                            monotonic: s.is_monotonic,
                            cumulative: s.aggregation_temporality == CUMULATIVE,
                        };
                        for dp in &s.data_points {
                            out.push(base(kind, attributes(&dp.attributes), number(&dp.value)));
                        }
                    }
                    Some(metric::Data::Gauge(g)) => {
                        for dp in &g.data_points {
                            out.push(base(
                                Kind::Gauge,
                                attributes(&dp.attributes),
                                number(&dp.value),
                            ));
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        let kind = Kind::Histogram {
                            cumulative: h.aggregation_temporality == CUMULATIVE,
                        };
                        for dp in &h.data_points {
                            out.push(base(
                                kind,
                                attributes(&dp.attributes),
                                PointValue::Histogram {
                                    count: dp.count,
                                    sum: dp.sum,
                                    bounds: dp.explicit_bounds.clone(),
                                    bucket_counts: dp.bucket_counts.clone(),
                                },
                            ));
                        }
                    }
                    Some(metric::Data::ExponentialHistogram(_)) => out.push(base(
                        Kind::ExponentialHistogram,
                        Attributes::new(),
                        PointValue::Other,
                    )),
                    Some(metric::Data::Summary(_)) => {
                        out.push(base(Kind::Summary, Attributes::new(), PointValue::Other))
                    }
                    None => {}
                }
            }
        }
    }
    out
}
