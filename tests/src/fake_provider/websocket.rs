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
//! - `/v1/realtime` (any path ending `/realtime`): the OpenAI Realtime
//!   API. `session.created` names the handshake's `model=` (or
//!   `gpt-realtime-2025-08-28`); a `session.update` that sets an input
//!   transcription model is answered `session.updated`. The job's
//!   `input_audio_buffer.append`s are counted, and its
//!   `input_audio_buffer.commit` is answered with
//!   `input_audio_buffer.committed`, the transcription's
//!   `conversation.item.input_audio_transcription.completed` with token
//!   usage (when the session has a transcription model) and, as server
//!   turn detection would, a response. A `response.create` is answered
//!   with a response too: `response.created`, an audio delta, a transcript
//!   delta and `response.done` with usage split into text and audio and,
//!   from the second response on, cache reads (all logged as reported);
//!   one whose `response.metadata.fake` is `hang` gets no
//!   `response.done`.
//! - A path ending `BidiGenerateContent`: Gemini Live, every message in a
//!   binary frame as Google's servers send them. The `setup` is answered
//!   `setupComplete`; a `clientContent` turn, or the end of the job's
//!   `realtimeInput` audio (`audioStreamEnd`), with a turn of audio and its
//!   transcription, then `usageMetadata` (logged as reported): with the
//!   `turnComplete` in the first turn, in a message after it from the
//!   second on. A turn whose text is `hang` gets its audio and nothing
//!   more.
//! - Anything else, as the other realtime APIs use (Realtime
//!   translation): a text frame `ready` from the server, then every text
//!   frame the client sends comes back upper-cased, until the client
//!   closes.

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
    let realtime = path.trim_end_matches('/').ends_with("/realtime");
    let live = path.ends_with("BidiGenerateContent");
    let url_model = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("model="))
        .map(str::to_string);
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
        if realtime {
            serve_realtime(&mut io, url_model, sni, path, log).await;
            return;
        }
        if live {
            serve_live(&mut io, sni, path, log).await;
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
    while let Some(ev) = next_json(io).await {
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

/// The OpenAI Realtime API (see the module's doc).
async fn serve_realtime<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    url_model: Option<String>,
    sni: String,
    path: String,
    log: Log,
) {
    let model = url_model.unwrap_or_else(|| "gpt-realtime-2025-08-28".into());
    let session = |transcription: &Option<String>| {
        json!({"type": "realtime", "object": "realtime.session", "id": "sess_fake",
            "model": model,
            "audio": {"input": {"transcription": transcription.as_ref().map(|m| json!({"model": m})),
                "turn_detection": {"type": "server_vad"}}}})
    };
    let mut transcription: Option<String> = None;
    if send_json(
        io,
        json!({"type": "session.created", "session": session(&transcription)}),
    )
    .await
    .is_err()
    {
        return;
    }
    let (mut appended, mut turn) = (0usize, 0u64);
    let report = |r: Reported| log.lock().unwrap().push(r);
    while let Some(ev) = next_json(io).await {
        let mut out = Vec::new();
        let mut respond = None;
        match ev["type"].as_str().unwrap_or("") {
            "session.update" => {
                if let Some(m) = ev
                    .pointer("/session/audio/input/transcription/model")
                    .and_then(|m| m.as_str())
                {
                    transcription = Some(m.to_string());
                }
                out.push(json!({"type": "session.updated", "session": session(&transcription)}));
            }
            "input_audio_buffer.append" => {
                appended += ev["audio"].as_str().map_or(0, str::len);
            }
            "input_audio_buffer.commit" => {
                out.push(json!({"type": "input_audio_buffer.committed", "item_id": "item_1"}));
                if let Some(m) = &transcription {
                    let audio = (appended / 1000).max(1) as u64;
                    report(Reported {
                        api: "openai",
                        sni: sni.clone(),
                        path: path.clone(),
                        model: m.clone(),
                        input_tokens: audio,
                        output_tokens: 5,
                        audio_input_tokens: audio,
                        usage_sent: true,
                        ..Reported::default()
                    });
                    out.push(
                        json!({"type": "conversation.item.input_audio_transcription.completed",
                        "item_id": "item_1", "content_index": 0, "transcript": "hello",
                        "usage": {"type": "tokens", "total_tokens": audio + 5,
                            "input_tokens": audio,
                            "input_token_details": {"text_tokens": 0, "audio_tokens": audio},
                            "output_tokens": 5}}),
                    );
                }
                // Server turn detection answers the committed turn.
                respond = Some(false);
            }
            "response.create" => {
                respond = Some(
                    ev.pointer("/response/metadata/fake")
                        .and_then(|v| v.as_str())
                        == Some("hang"),
                );
            }
            _ => {}
        }
        if let Some(hang) = respond {
            turn += 1;
            let id = format!("resp_rt_{turn}");
            out.push(json!({"type": "response.created", "response": {
                "object": "realtime.response", "id": id, "status": "in_progress", "output": []}}));
            out.push(
                json!({"type": "response.output_audio.delta", "response_id": id,
                "item_id": "item_a", "output_index": 0, "content_index": 0,
                "delta": "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="}),
            );
            out.push(
                json!({"type": "response.output_audio_transcript.delta", "response_id": id,
                "item_id": "item_a", "output_index": 0, "content_index": 0,
                "delta": "spoken back"}),
            );
            if !hang {
                // Each turn reads the conversation so far: from the second
                // on, the earlier turns' 800 tokens (600 of them audio)
                // from the cache.
                let (text, audio) = (200 + 10 * turn, 600 + 100 * turn);
                let cached = if turn > 1 { (200, 600) } else { (0, 0) };
                let (out_text, out_audio) = (40, 300 + turn);
                report(Reported {
                    api: "openai",
                    sni: sni.clone(),
                    path: path.clone(),
                    model: model.clone(),
                    stream: true,
                    input_tokens: text + audio,
                    output_tokens: out_text + out_audio,
                    cached_input_tokens: cached.0 + cached.1,
                    audio_input_tokens: audio - cached.1,
                    audio_output_tokens: out_audio,
                    usage_sent: true,
                    ..Reported::default()
                });
                out.push(json!({"type": "response.done", "event_id": "event_done", "response": {
                    "object": "realtime.response", "id": id, "status": "completed",
                    "status_details": null,
                    "output": [{"type": "message", "role": "assistant", "content": [
                        {"type": "output_audio", "transcript": "spoken back"}]}],
                    "usage": {"total_tokens": text + audio + out_text + out_audio,
                        "input_tokens": text + audio, "output_tokens": out_text + out_audio,
                        "input_token_details": {"text_tokens": text, "audio_tokens": audio,
                            "image_tokens": 0, "cached_tokens": cached.0 + cached.1,
                            "cached_tokens_details": {"text_tokens": cached.0,
                                "audio_tokens": cached.1, "image_tokens": 0}},
                        "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio}}}}));
            }
        }
        for e in out {
            if send_json(io, e).await.is_err() {
                return;
            }
        }
    }
}

/// Gemini Live (see the module's doc).
async fn serve_live<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    sni: String,
    path: String,
    log: Log,
) {
    let (mut model, mut turn, mut audio) = (String::new(), 0u64, 0usize);
    while let Some(ev) = next_json(io).await {
        let mut out = Vec::new();
        let mut answer = None;
        if let Some(m) = ev.pointer("/setup/model").and_then(|m| m.as_str()) {
            model = m.rsplit("models/").next().unwrap_or(m).to_string();
            out.push(json!({"setupComplete": {}}));
        }
        if let Some(c) = ev.get("clientContent").or_else(|| ev.get("client_content")) {
            let text: String = c["turns"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|t| t["parts"].as_array().into_iter().flatten())
                .filter_map(|p| p["text"].as_str())
                .collect();
            answer = Some(text);
        }
        if let Some(r) = ev.get("realtimeInput").or_else(|| ev.get("realtime_input")) {
            audio += r
                .pointer("/audio/data")
                .and_then(|d| d.as_str())
                .map_or(0, str::len);
            if r.get("audioStreamEnd")
                .or_else(|| r.get("audio_stream_end"))
                == Some(&json!(true))
            {
                answer = Some(String::new());
            }
        }
        if let Some(text) = answer {
            turn += 1;
            out.push(
                json!({"serverContent": {"modelTurn": {"parts": [{"inlineData": {
                "mimeType": "audio/pcm;rate=24000",
                "data": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}]}}}),
            );
            out.push(json!({"serverContent": {"outputTranscription": {"text": "spoken back"}}}));
            if text != "hang" {
                // Each turn re-reads the session: its prompt grows.
                let heard = (audio / 100) as u64;
                let (prompt_text, spoken) = (100 * turn, 200 + turn);
                let usage = json!({"promptTokenCount": prompt_text + heard,
                    "responseTokenCount": spoken,
                    "totalTokenCount": prompt_text + heard + spoken,
                    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_text},
                        {"modality": "AUDIO", "tokenCount": heard}],
                    "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": spoken}]});
                log.lock().unwrap().push(Reported {
                    api: "gemini",
                    sni: sni.clone(),
                    path: path.clone(),
                    model: model.clone(),
                    stream: true,
                    input_tokens: prompt_text + heard,
                    output_tokens: spoken,
                    audio_input_tokens: heard,
                    audio_output_tokens: spoken,
                    usage_sent: true,
                    ..Reported::default()
                });
                if turn == 1 {
                    out.push(
                        json!({"serverContent": {"turnComplete": true}, "usageMetadata": usage}),
                    );
                } else {
                    out.push(json!({"serverContent": {"turnComplete": true}}));
                    out.push(json!({"usageMetadata": usage}));
                }
            }
        }
        for e in out {
            if write_frame(io, 0x82, e.to_string().as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

async fn send_json<W: AsyncWrite + Unpin>(io: &mut W, v: serde_json::Value) -> std::io::Result<()> {
    send(io, v.to_string().as_bytes()).await
}

/// The client's next message read as JSON (from a text or binary frame),
/// its pings answered and anything else passed over; `None` once it
/// closes (its Close answered) or the connection ends.
async fn next_json<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> Option<serde_json::Value> {
    loop {
        let (opcode, payload) = recv(io).await.ok()??;
        match opcode {
            0x1 | 0x2 => {}
            0x9 => {
                write_frame(io, 0x8a, &payload).await.ok()?;
                continue;
            }
            0x8 => {
                let _ = io.write_all(&[0x88, 0]).await;
                let _ = io.flush().await;
                return None;
            }
            _ => continue,
        }
        if let Ok(ev) = serde_json::from_slice(&payload) {
            return Some(ev);
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
