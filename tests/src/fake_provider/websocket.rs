//! The fake's WebSocket endpoint, as realtime APIs use (OpenAI Realtime,
//! Gemini Live): the handshake on any path, then a text frame `ready`
//! from the server, then every text frame the client sends comes back
//! upper-cased, until the client closes.

use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, Response, header};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Body, json_response};

/// A WebSocket handshake.
pub(crate) fn wanted(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Answers the handshake (101) and serves the connection once hyper has
/// handed it over.
pub(crate) fn accept(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return json_response(400, json!({"error": {"message": "no Sec-WebSocket-Key"}}));
    };
    let mut sha1 = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key.as_bytes());
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha1.finish().as_ref());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(io) = upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(io);
        if send(&mut io, b"ready").await.is_err() {
            return;
        }
        while let Ok(Some((opcode, payload))) = recv(&mut io).await {
            match opcode {
                0x1 if send(&mut io, &payload.to_ascii_uppercase()).await.is_err() => return,
                0x8 => {
                    let _ = io.write_all(&[0x88, 0]).await;
                    return;
                }
                _ => {}
            }
        }
    });
    Response::builder()
        .status(101)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header("sec-websocket-accept", accept)
        .body(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("response")
}

/// One unmasked text frame (as a server sends).
async fn send<W: AsyncWrite + Unpin>(io: &mut W, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = vec![0x81];
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
    io.write_all(&frame).await
}

/// One frame from the client: its opcode and unmasked payload; `None` at
/// the end of the connection or past 1 MiB.
async fn recv<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 2];
    if io.read_exact(&mut head).await.is_err() {
        return Ok(None);
    }
    let opcode = head[0] & 0x0f;
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
    Ok(Some((opcode, payload)))
}
