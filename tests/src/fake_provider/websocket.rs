//! The fake's WebSocket endpoints.
//!
//! - `/v1/responses` (and any path ending `/responses`): the OpenAI
//!   Responses API's WebSocket mode. Each `response.create` is answered
//!   with `response.created`, a text delta and `response.completed` with
//!   usage (logged as reported); the model `bad-model` gets an `error`
//!   event (404), `silent-model` no answer at all, and `slow-finish` its
//!   `response.completed` a second after the text (or, when the handshake
//!   has `x-fake-hold-finish: PATH`, once the file PATH exists). When the
//!   handshake offers `permessage-deflate`, the fake
//!   accepts it and compresses every message it sends, as real servers
//!   may.
//! - Anything else, as realtime APIs use (OpenAI Realtime, Gemini Live): a
//!   text frame `ready` from the server, then every text frame the client
//!   sends comes back upper-cased, until the client closes.

use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, Response, header};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Body, Log, Reported, json_response};

/// A WebSocket handshake.
pub(crate) fn wanted(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Answers the handshake (101) and serves the connection once hyper has
/// handed it over.
pub(crate) fn accept(mut req: Request<Incoming>, sni: String, log: Log) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return json_response(400, json!({"error": {"message": "no Sec-WebSocket-Key"}}));
    };
    let mut sha1 = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key.as_bytes());
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha1.finish().as_ref());
    let path = req.uri().path().to_string();
    let responses = path.trim_end_matches('/').ends_with("/responses");
    let deflate = responses
        && req
            .headers()
            .get_all("sec-websocket-extensions")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("permessage-deflate"));
    let finish = req
        .headers()
        .get("x-fake-hold-finish")
        .and_then(|v| v.to_str().ok())
        .map(std::path::PathBuf::from);
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(io) = upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(io);
        if responses {
            serve_responses(&mut io, deflate, finish, sni, path, log).await;
            return;
        }
        if send(&mut io, b"ready").await.is_err() {
            return;
        }
        while let Ok(Some((opcode, payload))) = recv(&mut io).await {
            match opcode {
                0x1 if send(&mut io, &payload.to_ascii_uppercase()).await.is_err() => return,
                0x8 => {
                    let _ = io.write_all(&[0x88, 0]).await;
                    let _ = io.flush().await;
                    return;
                }
                _ => {}
            }
        }
    });
    let mut resp = Response::builder()
        .status(101)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", accept);
    if deflate {
        resp = resp.header(
            "sec-websocket-extensions",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        );
    }
    resp.body(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
    .expect("response")
}

/// The Responses API's WebSocket mode (see the module's doc).
async fn serve_responses<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    deflate: bool,
    finish: Option<std::path::PathBuf>,
    sni: String,
    path: String,
    log: Log,
) {
    let mut turn = 0u64;
    while let Ok(Some((opcode, payload))) = recv(io).await {
        match opcode {
            0x1 => {}
            0x8 => {
                let _ = io.write_all(&[0x88, 0]).await;
                let _ = io.flush().await;
                return;
            }
            _ => continue,
        }
        let Ok(ev) = serde_json::from_slice::<serde_json::Value>(&payload) else {
            continue;
        };
        if ev["type"] != "response.create" {
            continue;
        }
        let model = ev["model"].as_str().unwrap_or("").to_string();
        let events = if model == "silent-model" {
            Vec::new()
        } else if model == "bad-model" {
            vec![json!({"type": "error", "status": 404, "error": {
                "type": "invalid_request_error", "code": "model_not_found",
                "message": "The model `bad-model` does not exist"}})]
        } else {
            turn += 1;
            let id = format!("resp_ws_{turn}");
            let input = ev["input"]
                .as_str()
                .map_or(3, |t| t.split_whitespace().count() as u64 + 3);
            let (output, cached) = (5 + turn, 2 * (turn - 1));
            log.lock().unwrap().push(Reported {
                api: "openai",
                sni: sni.clone(),
                path: path.clone(),
                model: model.clone(),
                stream: true,
                input_tokens: input,
                output_tokens: output,
                cached_input_tokens: cached,
                usage_sent: true,
                ..Reported::default()
            });
            let head = json!({"id": id, "object": "response", "model": model, "status": "in_progress", "output": []});
            vec![
                json!({"type": "response.created", "response": head}),
                json!({"type": "response.output_text.delta", "delta": "over the socket"}),
                json!({"type": "response.completed", "response": {
                    "id": id, "object": "response", "model": model, "status": "completed",
                    "output": [], "service_tier": "default",
                    "usage": {"input_tokens": input, "output_tokens": output,
                        "input_tokens_details": {"cached_tokens": cached},
                        "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": input + output}}}),
            ]
        };
        for e in events {
            if model == "slow-finish" && e["type"] == "response.completed" {
                // Reading meanwhile, as real servers do: a client that
                // half-closes is gone, and the response is abandoned. (A
                // byte the client sends meanwhile is lost to its next
                // frame: the turn is for clients that only read.)
                let mut byte = [0u8; 1];
                let wait = async {
                    match &finish {
                        Some(path) => super::gate(path).await,
                        None => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                    }
                };
                tokio::select! {
                    _ = wait => {}
                    r = io.read(&mut byte) => {
                        if matches!(r, Ok(0) | Err(_)) {
                            return;
                        }
                    }
                }
            }
            let text = e.to_string();
            let sent = if deflate {
                send_compressed(io, text.as_bytes()).await
            } else {
                send(io, text.as_bytes()).await
            };
            if sent.is_err() {
                return;
            }
        }
    }
}

/// One text message compressed by `permessage-deflate` (RSV1 set; no
/// context kept between messages).
async fn send_compressed<W: AsyncWrite + Unpin>(io: &mut W, payload: &[u8]) -> std::io::Result<()> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    c.compress_vec(payload, &mut out, flate2::FlushCompress::Sync)
        .map_err(std::io::Error::other)?;
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
    write_frame(io, 0xc1, &out).await
}

/// One unmasked text frame (as a server sends).
async fn send<W: AsyncWrite + Unpin>(io: &mut W, payload: &[u8]) -> std::io::Result<()> {
    write_frame(io, 0x81, payload).await
}

async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    first: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut frame = vec![first];
    match u16::try_from(payload.len()) {
        Ok(n) if n < 126 => frame.push(n as u8),
        Ok(n) => {
            frame.push(126);
            frame.extend_from_slice(&n.to_be_bytes());
        }
        Err(_) => {
            frame.push(127);
            frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    io.write_all(&frame).await?;
    // A TLS stream may keep what the socket would not take yet until the
    // next write: the client would wait for this message for ever.
    io.flush().await
}

/// One frame from the client: its opcode and unmasked payload; `None` at
/// the end of the connection or past 1 MiB.
async fn recv<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 2];
    if io.read_exact(&mut head).await.is_err() {
        return Ok(None);
    }
    let opcode = head[0] & 0x0f;
    let compressed = head[0] & 0x40 != 0;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            io.read_exact(&mut b).await?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            io.read_exact(&mut b).await?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    if len > 1 << 20 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    if masked {
        io.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len as usize];
    io.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    if compressed {
        payload.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut d = flate2::Decompress::new(false);
        let mut out = Vec::with_capacity(payload.len() * 4 + 1024);
        loop {
            let before = d.total_in();
            d.decompress_vec(
                &payload[before as usize..],
                &mut out,
                flate2::FlushDecompress::Sync,
            )
            .map_err(std::io::Error::other)?;
            if d.total_in() as usize >= payload.len() || out.len() > 1 << 20 {
                break;
            }
            out.reserve(out.capacity().max(1024));
        }
        return Ok(Some((opcode, out)));
    }
    Ok(Some((opcode, payload)))
}
