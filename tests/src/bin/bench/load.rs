//! The load generator's building blocks (used inside `tollgate-bench
//! client`, i.e. in the clients cgroup): a kept-alive HTTP/1.1 connection
//! over rustls to a target address with SNI api.openai.com, trusting only
//! the CA that target should present, and requests timed from the first
//! byte sent to the last byte received.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// Where a client sends its requests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    /// `direct`, `tollgate`, `litellm`, `mitmproxy`.
    pub name: String,
    pub addr: SocketAddr,
    /// Server name sent in the ClientHello and as `Host`.
    pub sni: String,
    /// The only CA trusted for this target; `None`: plain HTTP.
    pub ca: Option<PathBuf>,
    /// Request path (`/canned/v1/chat/completions`, ...).
    pub path: String,
}

pub type Conn = http1::SendRequest<Full<Bytes>>;

/// The key every client sends (LiteLLM's master key; ignored by the fake).
pub const API_KEY: &str = "sk-bench-7c1e0d5a9b3f42e8a6d4c2b0f1e3d5c7";

/// Connection timeouts: a target that does not answer fails the row
/// instead of hanging it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn tls_config(ca: &PathBuf) -> Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca).with_context(|| format!("read CA {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Makes connections to one target (the TLS config is built once).
#[derive(Clone)]
pub struct Connector {
    pub target: Target,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Connector {
    pub fn new(target: &Target) -> Result<Connector> {
        let tls = match &target.ca {
            Some(ca) => Some(tokio_rustls::TlsConnector::from(tls_config(ca)?)),
            None => None,
        };
        Ok(Connector {
            target: target.clone(),
            tls,
        })
    }

    /// A new kept-alive HTTP/1.1 connection; its driver task is spawned.
    pub async fn connect(&self) -> Result<Conn> {
        let t = &self.target;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(t.addr))
            .await
            .with_context(|| format!("{}: connect to {} timed out", t.name, t.addr))?
            .with_context(|| format!("{}: connect to {}", t.name, t.addr))?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(t.sni.clone())?;
                let s = tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(name, tcp))
                    .await
                    .with_context(|| format!("{}: TLS handshake timed out", t.name))?
                    .with_context(|| format!("{}: TLS handshake", t.name))?;
                handshake(TokioIo::new(s), &t.name).await
            }
            None => handshake(TokioIo::new(tcp), &t.name).await,
        }
    }

    /// A POST of `body` to the target's path.
    pub fn request(&self, body: &Bytes, headers: &[(&str, &str)]) -> hyper::Request<Full<Bytes>> {
        self.request_as(hyper::Method::POST, body, headers)
    }

    /// A request of `method` with `body` to the target's path.
    pub fn request_as(
        &self,
        method: hyper::Method,
        body: &Bytes,
        headers: &[(&str, &str)],
    ) -> hyper::Request<Full<Bytes>> {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri(self.target.path.as_str())
            .header("host", self.target.sni.as_str())
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {API_KEY}"))
            .header("user-agent", "tollgate-bench/1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(body.clone())).expect("request")
    }
}

async fn handshake<I>(io: I, name: &str) -> Result<Conn>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) = http1::handshake(io)
        .await
        .with_context(|| format!("{name}: HTTP handshake"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Sends one request and reads the whole response; returns the time from
/// send to the last byte.
pub async fn roundtrip(conn: &mut Conn, req: hyper::Request<Full<Bytes>>) -> Result<Duration> {
    let t0 = Instant::now();
    let fut = async {
        conn.ready().await?;
        let resp = conn.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, anyhow::Error>((status, body))
    };
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .context("request timed out")??;
    let dt = t0.elapsed();
    if !status.is_success() {
        bail!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
    }
    Ok(dt)
}

/// A non-streaming chat request of a realistic size.
pub fn chat_body(model: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a careful code reviewer for a CI pipeline. Answer in one short paragraph."},
                {"role": "user", "content": "Review this change: parse() now returns an empty list for empty input instead of raising ValueError; the test test_parse_empty was added. Anything to worry about?"}
            ],
            "max_tokens": 64,
            "temperature": 0
        })
        .to_string(),
    )
}

/// A small single-threaded runtime (sequential clients).
pub fn current_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A two-worker runtime (concurrent clients; the machine has 2 cores).
pub fn multi_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Checks from the bench process that `target` answers a chat request
/// (peers' readiness), retrying until `deadline`.
pub fn probe(target: &Target, deadline: Instant) -> Result<()> {
    let rt = current_thread()?;
    let c = Connector::new(target)?;
    let body = chat_body("gpt-4o-mini");
    let mut last = String::new();
    while Instant::now() < deadline {
        let r = rt.block_on(async {
            let mut conn = tokio::time::timeout(Duration::from_secs(5), c.connect()).await??;
            roundtrip(&mut conn, c.request(&body, &[])).await
        });
        match r {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    bail!("{} at {} did not answer: {last}", target.name, target.addr)
}
