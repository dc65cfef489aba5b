//! A TLS fake of the provider APIs (OpenAI, Anthropic, Gemini, Bedrock) on a
//! loopback address: it answers with deterministic usage, in each API's wire
//! format (JSON, SSE, AWS eventstream), and remembers every usage it
//! reported, so tests can compare the agent's ledger against it.
//! It serves a certificate from the test PKI for whichever SNI it is asked
//! (provider hosts and non-provider hosts alike), over HTTP/1.1 and HTTP/2.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ResolvesServerCertUsingSni;
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};

mod anthropic;
mod background;
mod batches;
mod bedrock;
mod canned;
mod evals;
mod gemini;
mod openai;
mod sessions;
mod websocket;

use crate::pki::TestPki;

/// One usage the fake provider reported, normalised the way tollgate's
/// ledger records it (input includes cache reads and writes; output
/// includes reasoning), so tests compare the two directly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reported {
    pub api: &'static str,
    pub sni: String,
    pub path: String,
    pub model: String,
    pub stream: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_input_tokens: u64,
    pub reasoning_tokens: u64,
    /// Web searches billed (the request asked for a search tool).
    pub web_searches: u64,
    /// The audio parts of the input and output (an audio chat model).
    pub audio_input_tokens: u64,
    pub audio_output_tokens: u64,
    /// False when a stream was sent without usage.
    pub usage_sent: bool,
}

pub struct FakeProvider {
    pub addr: SocketAddr,
    pub reported: Arc<Mutex<Vec<Reported>>>,
    counts: Arc<Counts>,
    rt: Option<tokio::runtime::Runtime>,
    acceptor: tokio_rustls::TlsAcceptor,
}

/// What the fake has seen so far (on every address it serves), for tests
/// that wait for a point of an exchange instead of sleeping.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    /// TLS connections accepted.
    connections: AtomicUsize,
    /// Requests whose body the fake has read whole.
    requests: AtomicUsize,
    /// Streamed answers dropped before their end: the peer left mid-way.
    cut: AtomicUsize,
}

pub(crate) type Body = BoxBody<Bytes, Infallible>;
pub(crate) type Log = Arc<Mutex<Vec<Reported>>>;

/// What every API handler gets.
pub(crate) struct Call {
    pub sni: String,
    pub path: String,
    pub query: String,
    pub headers: hyper::HeaderMap,
    pub body: Value,
    pub log: Log,
    pub counts: Arc<Counts>,
}

impl Call {
    /// How a stream is paced: the gap between chunks
    /// (`x-fake-chunk-delay-ms`), a wait before the first chunk, after
    /// the head (`x-fake-first-chunk-delay-ms`), and gates the test opens
    /// (`x-fake-hold: N:PATH[,N:PATH...]`: chunk N, 0 the first, waits
    /// until the file PATH exists).
    pub fn delay(&self) -> Pacing {
        let ms = |name: &str| {
            Duration::from_millis(
                self.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )
        };
        let holds = self
            .headers
            .get("x-fake-hold")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(',')
            .filter_map(|h| {
                let (n, path) = h.trim().split_once(':')?;
                Some((n.parse().ok()?, PathBuf::from(path)))
            })
            .collect();
        Pacing {
            first: ms("x-fake-first-chunk-delay-ms"),
            gap: ms("x-fake-chunk-delay-ms"),
            holds,
            counts: Some(self.counts.clone()),
        }
    }

    /// Whether to gzip a JSON response (`x-fake-gzip: 1`, if the client accepts gzip).
    pub fn gzip(&self) -> bool {
        self.headers.get("x-fake-gzip").is_some()
            && self
                .headers
                .get("accept-encoding")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("gzip"))
    }

    pub fn record(&self, r: Reported) {
        self.log.lock().unwrap().push(Reported {
            sni: self.sni.clone(),
            path: self.path.clone(),
            ..r
        });
    }
}

/// Deterministic size of a text: its whitespace-separated words.
pub(crate) fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// Sum of words in every string under `v` whose key is `text` or `content`.
pub(crate) fn text_words(v: &Value) -> u64 {
    match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, x)| match x {
                Value::String(s) if k == "text" || k == "content" => words(s),
                _ => text_words(x),
            })
            .sum(),
        Value::Array(a) => a.iter().map(text_words).sum(),
        _ => 0,
    }
}

pub(crate) fn json_response(status: u16, v: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

/// A JSON response, gzip-compressed when the call asks for it.
pub(crate) fn json_for(call: &Call, v: Value) -> Response<Body> {
    if !call.gzip() {
        return json_response(200, v);
    }
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(v.to_string().as_bytes()).expect("gzip");
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(Full::new(Bytes::from(e.finish().expect("gzip"))).boxed())
        .expect("response")
}

/// Waits until the file at `path` exists: a gate the test opens by
/// writing it. Bounded, so that a test that failed before opening it does
/// not hold the fake's answer for ever.
pub(crate) async fn gate(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pace of a streamed response (see [`Call::delay`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Pacing {
    pub first: Duration,
    pub gap: Duration,
    /// (chunk index, file): that chunk waits until the file exists.
    pub holds: Vec<(usize, PathBuf)>,
    /// Where a stream dropped before its end is counted.
    pub counts: Option<Arc<Counts>>,
}

/// Counts a stream as cut if it is dropped before its last chunk went out.
struct Unfinished(Option<Arc<Counts>>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.cut.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A streamed response of `chunks`, one frame each, paced by `pace`.
///
/// Chunks are produced as they are sent, not before the first: a real
/// provider sends its first event as soon as it has it, and a fake that
/// built a whole 500-event stream first made time to first chunk grow
/// with the stream's length (for the direct path and the agent alike).
pub(crate) fn stream_response<I>(content_type: &str, chunks: I, pace: Pacing) -> Response<Body>
where
    I: IntoIterator<Item = Vec<u8>>,
    I::IntoIter: Send + Sync + 'static,
{
    // The first chunk goes out with the headers unless `pace.first` holds
    // it back; `pace.gap` is the gap between chunks (so time to first
    // chunk measures the path, not the timer wheel's rounding of a sleep).
    let unfinished = Unfinished(pace.counts.clone());
    let pace = Arc::new(pace);
    let stream = futures_util::stream::unfold(
        (chunks.into_iter(), 0usize, unfinished),
        move |(mut it, i, mut unfinished)| {
            let pace = pace.clone();
            async move {
                let Some(c) = it.next() else {
                    // The end: not cut.
                    unfinished.0.take();
                    return None;
                };
                let wait = if i == 0 { pace.first } else { pace.gap };
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                for (_, path) in pace.holds.iter().filter(|(n, _)| *n == i) {
                    gate(path).await;
                }
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(c))),
                    (it, i + 1, unfinished),
                ))
            }
        },
    );
    Response::builder()
        .status(200)
        .header("content-type", content_type)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

/// SSE frames from (event name, JSON data) pairs, formatted as they are sent.
pub(crate) fn sse<I>(events: I) -> impl Iterator<Item = Vec<u8>> + Send + Sync + 'static
where
    I: IntoIterator<Item = (Option<&'static str>, String)>,
    I::IntoIter: Send + Sync + 'static,
{
    events.into_iter().map(|(name, data)| match name {
        Some(n) => format!("event: {n}\ndata: {data}\n\n").into_bytes(),
        None => format!("data: {data}\n\n").into_bytes(),
    })
}

/// What the fake's service fails with: hyper then drops the connection
/// (HTTP/1.1) or resets the stream (HTTP/2) without an answer.
type Dropped = Box<dyn std::error::Error + Send + Sync>;

async fn handle(
    req: Request<Incoming>,
    sni: String,
    log: Log,
    counts: Arc<Counts>,
) -> Result<Response<Body>, Dropped> {
    if canned::wanted(&req) {
        return Ok(canned::answer(req.into_body()).await);
    }
    if websocket::wanted(&req) {
        return Ok(websocket::accept(req, sni, log));
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let headers = req.headers().clone();
    if let Some(answer) = background::retrieval(req.method(), &path, &query, &sni, &log) {
        return Ok(answer);
    }
    if sni == "api.anthropic.com"
        && req.method() == hyper::Method::GET
        && let Some(answer) = sessions::answer(req.method(), &path, None)
    {
        return Ok(answer);
    }
    if let Some(answer) = evals::answer(req.method(), &path, &sni) {
        return Ok(answer);
    }
    if req.method() == hyper::Method::GET
        && let Some(answer) = batches::answer(req.method(), &path, &sni, None)
    {
        return Ok(answer);
    }
    if req.method() == hyper::Method::GET {
        return Ok(json_response(
            200,
            json!({"object":"list","data":[{"id":"gpt-4o-mini","object":"model"}],"sni":sni}),
        ));
    }
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(json_response(400, json!({"error":{"message":"bad body"}}))),
    };
    counts.requests.fetch_add(1, Ordering::SeqCst);
    // (A file upload is multipart, not JSON; so is a transcription.)
    if let Some(answer) = batches::answer(&method, &path, &sni, Some(&body)) {
        return Ok(answer);
    }
    if path.ends_with("/audio/transcriptions") {
        return Ok(openai::transcription(&body, &sni, &path, &log));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return Ok(json_response(
            400,
            json!({"error":{"message":"body is not JSON","type":"invalid_request_error"}}),
        ));
    };
    if sni == "api.anthropic.com"
        && let Some(answer) = sessions::answer(&hyper::Method::POST, &path, Some(&body))
    {
        return Ok(answer);
    }
    // `x-fake-reset`: the request was read whole, and the connection is
    // dropped without an answer (a provider's connection reset mid-way).
    if headers.contains_key("x-fake-reset") {
        return Err("x-fake-reset: dropped without an answer".into());
    }
    // `x-fake-head-delay-ms`: the answer's head waits this long (a slow,
    // non-streaming generation).
    if let Some(ms) = headers
        .get("x-fake-head-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // `x-fake-hold-head: PATH`: the answer's head waits until the file
    // PATH exists (a slow generation that ends when the test says).
    if let Some(path) = headers
        .get("x-fake-hold-head")
        .and_then(|v| v.to_str().ok())
    {
        gate(std::path::Path::new(path)).await;
    }
    let call = Call {
        sni: sni.clone(),
        path,
        query,
        headers,
        body,
        log,
        counts,
    };
    let host = sni.as_str();
    let vertex = host.ends_with("-aiplatform.googleapis.com");
    Ok(if vertex && call.path.contains("/endpoints/openapi/") {
        // Vertex AI's OpenAI-compatible endpoint.
        openai::handle(call).await
    } else if host == "api.anthropic.com"
        || (vertex && call.path.contains("/publishers/anthropic/"))
    {
        anthropic::handle(call).await
    } else if host == "generativelanguage.googleapis.com" || vertex {
        gemini::handle(call).await
    } else if host.starts_with("bedrock-runtime.") {
        bedrock::handle(call).await
    } else {
        openai::handle(call).await
    })
}

/// Accepts TLS connections on `listener` and serves them until the runtime stops.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    rep: Log,
    counts: Arc<Counts>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        // As any real server does: small SSE frames go out as written.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let rep = rep.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            counts.connections.fetch_add(1, Ordering::SeqCst);
            let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
            let svc = hyper::service::service_fn(move |req| {
                handle(req, sni.clone(), rep.clone(), counts.clone())
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await;
        });
    }
}

impl FakeProvider {
    /// Starts the fake on `addr`, with certificates for `hosts` from `pki`.
    pub fn start(addr: SocketAddr, pki: &TestPki, hosts: &[&str]) -> FakeProvider {
        Self::start_alpn(addr, pki, hosts, &[b"h2", b"http/1.1"])
    }

    /// As [`FakeProvider::start`], offering only the given ALPN protocols
    /// (`&[b"http/1.1"]` makes upstream connections HTTP/1.1).
    pub fn start_alpn(
        addr: SocketAddr,
        pki: &TestPki,
        hosts: &[&str],
        alpn: &[&[u8]],
    ) -> FakeProvider {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut resolver = ResolvesServerCertUsingSni::new();
        for h in hosts {
            let leaf = pki.leaf(h);
            let certs: Vec<CertificateDer<'static>> =
                rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("leaf pem");
            let key: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut leaf.key_pem.as_bytes())
                    .expect("key pem")
                    .expect("a key");
            let ck = CertifiedKey::from_der(certs, key, &provider).expect("certified key");
            resolver.add(h, ck).expect("add cert");
        }
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("fake provider cannot listen on {addr}: {e}"));
        let addr = listener.local_addr().expect("addr");
        let reported = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::new(Counts::default());
        rt.spawn(serve(
            listener,
            acceptor.clone(),
            reported.clone(),
            counts.clone(),
        ));
        FakeProvider {
            addr,
            reported,
            counts,
            rt: Some(rt),
            acceptor,
        }
    }

    /// Serves the same fake (same certificates, same log, same runtime) on
    /// one more address too, e.g. one that is not a provider address, as the
    /// benchmark's "direct" baseline. Returns the bound address.
    pub fn listen_also(&self, addr: SocketAddr) -> SocketAddr {
        let rt = self.rt.as_ref().expect("running");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("fake provider cannot listen on {addr}: {e}"));
        let bound = listener.local_addr().expect("addr");
        rt.spawn(serve(
            listener,
            self.acceptor.clone(),
            self.reported.clone(),
            self.counts.clone(),
        ));
        bound
    }

    /// TLS connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Requests whose body the fake has read whole so far: from then on
    /// the provider "has" the request.
    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }

    /// Streamed answers dropped before their end so far (their reader
    /// went away; see `x-fake-hold` to keep a stream from ending first).
    pub fn streams_cut(&self) -> usize {
        self.counts.cut.load(Ordering::SeqCst)
    }

    pub fn reported(&self) -> Vec<Reported> {
        self.reported.lock().unwrap().clone()
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
