//! A TLS fake of the OpenAI API on a loopback address: it answers chat
//! completions (JSON and SSE) with deterministic usage and remembers every
//! usage it reported, so tests can compare the agent's ledger against it.
//! It serves a certificate from the test PKI for whichever SNI it is asked
//! (provider hosts and non-provider hosts alike), over HTTP/1.1 and HTTP/2.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ResolvesServerCertUsingSni;
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};

use crate::pki::TestPki;

/// One usage the fake provider reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub sni: String,
    pub path: String,
    pub model: String,
    pub stream: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// False when a stream was sent without a usage chunk.
    pub usage_sent: bool,
}

pub struct FakeProvider {
    pub addr: SocketAddr,
    pub reported: Arc<Mutex<Vec<Reported>>>,
    rt: Option<tokio::runtime::Runtime>,
}

type Body = BoxBody<Bytes, Infallible>;

/// Deterministic prompt size: words in every message's content, plus 3 per
/// message (the shape of OpenAI's own accounting, not its numbers).
fn prompt_tokens(req: &Value) -> u64 {
    let mut n = 0;
    if let Some(msgs) = req.get("messages").and_then(Value::as_array) {
        for m in msgs {
            n += 3;
            if let Some(c) = m.get("content").and_then(Value::as_str) {
                n += c.split_whitespace().count() as u64;
            }
        }
    }
    n.max(1)
}

fn json_response(status: u16, v: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

async fn handle(
    req: Request<Incoming>,
    sni: String,
    reported: Arc<Mutex<Vec<Reported>>>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let delay = req
        .headers()
        .get("x-fake-chunk-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if req.method() == hyper::Method::GET {
        return Ok(json_response(
            200,
            json!({"object":"list","data":[{"id":"gpt-4o-mini","object":"model"}],"sni":sni}),
        ));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(json_response(400, json!({"error":{"message":"bad body"}}))),
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return Ok(json_response(
            400,
            json!({"error":{"message":"body is not JSON","type":"invalid_request_error"}}),
        ));
    };
    if !path.ends_with("/chat/completions") {
        return Ok(json_response(
            404,
            json!({"error":{"message":"unknown path"}}),
        ));
    }
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-4o-mini")
        .to_string();
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let pt = prompt_tokens(&v);
    let ct = v
        .get("max_tokens")
        .or_else(|| v.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(5)
        .clamp(1, 2000);
    let resp_model = format!("{model}-2024-07-18");
    let usage = json!({"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
        "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}});
    reported.lock().unwrap().push(Reported {
        sni,
        path,
        model: model.clone(),
        stream,
        prompt_tokens: pt,
        completion_tokens: ct,
        usage_sent: !stream || include_usage,
    });
    if !stream {
        let words: Vec<&str> = std::iter::repeat_n("tok", ct as usize).collect();
        return Ok(json_response(
            200,
            json!({"id":"chatcmpl-fake","object":"chat.completion","created":1,"model":resp_model,
                "choices":[{"index":0,"message":{"role":"assistant","content":words.join(" ")},"finish_reason":"stop"}],
                "usage": usage}),
        ));
    }
    let mut events: Vec<String> = Vec::new();
    let chunk = |delta: Value, finish: Value| {
        json!({"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":resp_model,
            "choices":[{"index":0,"delta":delta,"finish_reason":finish}]})
    };
    events.push(chunk(json!({"role":"assistant","content":""}), Value::Null).to_string());
    for i in 0..ct {
        events.push(
            chunk(
                json!({"content": if i == 0 { "tok" } else { " tok" }}),
                Value::Null,
            )
            .to_string(),
        );
    }
    events.push(chunk(json!({}), json!("stop")).to_string());
    if include_usage {
        events.push(
            json!({"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":resp_model,
                "choices":[],"usage":usage})
            .to_string(),
        );
    }
    events.push("[DONE]".into());
    let stream = futures_util::stream::unfold(events.into_iter(), move |mut it| async move {
        let e = it.next()?;
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {e}\n\n")))),
            it,
        ))
    });
    Ok(Response::builder()
        .status(200)
        .header("content-type", "text/event-stream; charset=utf-8")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response"))
}

impl FakeProvider {
    /// Starts the fake on `addr`, with certificates for `hosts` from `pki`.
    pub fn start(addr: SocketAddr, pki: &TestPki, hosts: &[&str]) -> FakeProvider {
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
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
        let rep = reported.clone();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let rep = rep.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, sni.clone(), rep.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        FakeProvider {
            addr,
            reported,
            rt: Some(rt),
        }
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
