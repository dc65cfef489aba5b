//! The HTTP side of an intercepted connection: read the request (bounded),
//! let the adapter classify it, forward it upstream, and meter the response
//! as it streams back; and the WebSockets a job opens to a provider,
//! joined to the provider's and metered as they pass where the API is one
//! tollgate reads (the Responses API's WebSocket mode, the OpenAI Realtime
//! API, Gemini Live; see [`WsMeter`]).
//!
//! Must never: hold back, reorder or change what the provider sends beyond
//! what metering needs and the client cannot tell (a stream's
//! `include_usage` splice, taken out again before the client sees it; a
//! metered WebSocket's `permessage-deflate` offer), forward a request to
//! another host than the one its TLS handshake named, or lose a record:
//! a request that ends without an answer is recorded with why.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{FutureExt as _, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::upstream::UpstreamBody;
use super::{BoxError, ProxyBody, ProxyState};
use crate::intercept::ConnOrigin;
use crate::meter::{Attribution, UsageRecord, estimate};
use crate::providers::catalogue::ProviderHost;
use crate::providers::{
    BodyFilter, ParsedUsage, RequestInfo, RequestView, UsageParser, adapter_for,
};

/// After a client hangs up mid-response, how long and how much more of the
/// upstream response is read to learn the provider's count.
const DRAIN_AFTER_HANGUP: Duration = Duration::from_secs(60);
const DRAIN_MAX_BYTES: usize = 64 << 20;
/// Frames already there that a stream's hang-up reads before it cuts.
const READY_FRAMES_AT_HANGUP: usize = 64;

/// Per-connection context.
pub(super) struct ConnCtx {
    pub state: Arc<ProxyState>,
    pub origin: ConnOrigin,
    pub who: std::sync::Arc<Attribution>,
    pub provider: ProviderHost,
}

fn boxed<B>(b: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// The request body on its way upstream: notes when hyper first asks for
/// it, which it does once a connection to the provider is up and the
/// request head written. A request the client leaves before that never
/// reached the provider, and is not billed.
struct Sending {
    inner: ProxyBody,
    sent: Arc<std::sync::atomic::AtomicBool>,
    /// Set when the client's side of the body failed (the job left while
    /// its body was still being forwarded): the request never reached the
    /// provider whole.
    client_failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Body for Sending {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.sent.store(true, Ordering::Relaxed);
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &frame {
            self.client_failed.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// An error response in the OpenAI error shape (what most SDKs parse), with
/// `x-should-retry: false` when retrying cannot help.
fn error_response(
    status: StatusCode,
    kind: &str,
    message: &str,
    retry: bool,
) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": { "message": format!("tollgate: {message}"), "type": kind, "code": kind }
    });
    let mut r = Response::new(boxed(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        "x-should-retry",
        HeaderValue::from_static(if retry { "true" } else { "false" }),
    );
    r.headers_mut().insert(
        "x-tollgate-error",
        HeaderValue::from_str(kind).unwrap_or(HeaderValue::from_static("error")),
    );
    r
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Why a body was not read whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unread {
    /// Longer than `proxy.max_request_body`.
    TooLong,
    /// The agent holds `proxy.max_buffered_request_bytes` of bodies.
    OverBudget,
    /// The client paused longer than `proxy.request_body_stall_secs`, or
    /// its body was not whole within [`BODY_READ_FACTOR`] times that.
    Stalled,
}

/// A body read for its content must be whole within this many times
/// `proxy.request_body_stall_secs`: a client that trickles it, a byte
/// just before each pause would count as a stall, would otherwise hold
/// its share of the body budget for as long as it went on.
const BODY_READ_FACTOR: u32 = 3;

/// A request body at least this long is read on a blocking thread: up to
/// `proxy.max_request_body` (32 MiB) of JSON scanning takes tens of
/// milliseconds, which on the agent's one worker would stall every other
/// connection's stream. Below it, the hop to another thread costs more
/// than the read.
const READ_ASIDE: usize = 1 << 20;

/// A compressed request body at least this long is decoded on a blocking
/// thread: JSON inflates 5-20 times, so it may decode to [`READ_ASIDE`]
/// and more.
const DECODE_ASIDE: usize = 64 << 10;

/// The most large bodies read at once: each may decode to
/// `proxy.max_request_body` before the body budget is asked for it (its
/// decoded size is not known before), so this bounds that overshoot near
/// what it was when the one worker read them itself, in turn.
const ASIDE_AT_ONCE: usize = 2;
static ASIDE_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(ASIDE_AT_ONCE);

/// `read(…)` on a blocking thread when `big`, in place otherwise. A panic
/// in `read` goes on in the caller, as it would have in place; `None` only
/// when the runtime is shutting down and the thread never ran it.
async fn aside<T: Send + 'static>(
    big: bool,
    read: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    if !big {
        return Some(read());
    }
    // The read holds its slot to its end: a caller that goes away (the
    // client hung up) does not stop it. (The semaphore is never closed.)
    let slot = ASIDE_SLOTS.acquire().await.ok();
    let read = move || {
        let _slot = slot;
        read()
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(t) => Some(t),
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => None,
        },
    }
}

/// Reads up to `limit` bytes of a body, each taken from `lease` first.
/// Returns the frames read and, when the body was longer or the budget
/// spent, the rest still to stream and why.
async fn read_bounded(
    mut body: Incoming,
    limit: usize,
    stall: Duration,
    lease: &mut crate::budget::BodyLease,
) -> Result<(Vec<Bytes>, Option<(Incoming, Unread)>), hyper::Error> {
    let mut chunks = Vec::new();
    let mut size = 0usize;
    let deadline = tokio::time::Instant::now() + stall * BODY_READ_FACTOR;
    loop {
        // A client that stops mid-body must not keep its share of the
        // budget for as long as it keeps the connection. A frame already
        // there (most bodies arrive with their head) needs no timer.
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => {
                let until = deadline.min(tokio::time::Instant::now() + stall);
                match tokio::time::timeout_at(until, body.frame()).await {
                    Ok(next) => next,
                    Err(_) => return Ok((chunks, Some((body, Unread::Stalled)))),
                }
            }
        };
        let Some(frame) = next else { break };
        let frame = frame?;
        if let Ok(data) = frame.into_data() {
            size += data.len();
            let fits = lease.grow(data.len());
            chunks.push(data);
            if size > limit {
                return Ok((chunks, Some((body, Unread::TooLong))));
            }
            if !fits {
                return Ok((chunks, Some((body, Unread::OverBudget))));
            }
        }
    }
    Ok((chunks, None))
}

/// The authority the client asked for: the URI's (HTTP/2), else `Host`,
/// else the provider host the connection was for.
fn authority(parts: &http::request::Parts, provider_host: &str) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or(provider_host)
        .to_string()
}

/// The provider could not be reached or dropped the request: counted,
/// logged, and answered 502 with `x-should-retry`.
fn upstream_failed(state: &ProxyState, e: &super::upstream::UpstreamError) -> Response<ProxyBody> {
    state.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
    warn!(error = %e, "upstream request failed");
    error_response(
        StatusCode::BAD_GATEWAY,
        "tollgate_upstream_error",
        &e.to_string(),
        true,
    )
}

/// A WebSocket handshake: an HTTP/1.1 `GET` asking to switch to
/// `websocket`. Nothing else is tunnelled: a request with other Upgrade
/// headers takes the metered path, which drops them as hop-by-hop (so two
/// headers cannot take a call out of metering).
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.method() == http::Method::GET
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The OpenAI API a metered WebSocket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WsApi {
    /// The Responses API's WebSocket mode.
    Responses,
    /// The Realtime API (voice and text sessions, and the sideband
    /// socket of a WebRTC or SIP call).
    Realtime,
    /// Gemini Live (`BidiGenerateContent`, on the Gemini API and Vertex
    /// AI).
    GeminiLive,
}

impl WsApi {
    fn name(self) -> &'static str {
        match self {
            WsApi::Responses => "Responses API",
            WsApi::Realtime => "Realtime API",
            WsApi::GeminiLive => "Gemini Live",
        }
    }
}

/// Which metered API a WebSocket handshake opens, if any: the OpenAI
/// Responses API's WebSocket mode (`GET /v1/responses`, Azure's
/// `/openai/v1/responses`, Bedrock's `/openai/v1/responses` and
/// `/v1/responses`) or the OpenAI Realtime API (`/v1/realtime`, Azure's
/// `/openai/realtime` and `/openai/v1/realtime`). Their responses are
/// metered as they pass; so is Gemini Live (`…GenerativeService.BidiGenerateContent`
/// and its `…Constrained` form for ephemeral tokens, Vertex AI's
/// `…LlmBidiService/BidiGenerateContent`). Realtime translation
/// (`/v1/realtime/translations`) reports no usage and is passed through.
fn metered_websocket(api: crate::config::ApiKind, path: &str) -> Option<WsApi> {
    use crate::config::ApiKind;
    let path = path.trim_end_matches('/');
    if api == ApiKind::Gemini {
        return (path.ends_with("BidiGenerateContent")
            || path.ends_with("BidiGenerateContentConstrained"))
        .then_some(WsApi::GeminiLive);
    }
    let (openai, bedrock) = match api {
        ApiKind::Openai | ApiKind::AzureOpenai => (true, false),
        ApiKind::Bedrock => (
            path.starts_with("/openai/") || path.starts_with("/v1/"),
            true,
        ),
        ApiKind::Anthropic | ApiKind::Gemini => (false, false),
    };
    if !openai {
        None
    } else if path.ends_with("/responses") {
        Some(WsApi::Responses)
    } else if path.ends_with("/realtime")
        && !bedrock
        && (api != ApiKind::AzureOpenai
            || path == "/openai/realtime"
            || path == "/openai/v1/realtime")
    {
        // (On an Azure host only Azure OpenAI's own routes: other
        // realtime services there, such as Voice Live, bill otherwise.)
        Some(WsApi::Realtime)
    } else {
        None
    }
}

/// The model a Realtime handshake names in its query: `model=` (OpenAI,
/// Azure's `/openai/v1/realtime`), else Azure's `deployment=`.
fn realtime_model(query: Option<&str>) -> Option<String> {
    let pairs = || {
        query
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
    };
    ["model", "deployment"].into_iter().find_map(|want| {
        pairs()
            .find(|(k, v)| *k == want && !v.is_empty())
            .map(|(_, v)| {
                let v = v.replace('+', " ");
                capped_model(&percent_encoding::percent_decode_str(&v).decode_utf8_lossy())
            })
    })
}

/// Passes a protocol switch through: the handshake goes upstream on a
/// connection of its own, and after the provider's `101` the client's
/// connection and the provider's are joined until either ends or the
/// agent stops. The Responses API's WebSocket mode is metered as it
/// passes, and so are the OpenAI Realtime API and Gemini Live (see
/// [`WsMeter`]); Realtime translation is not.
async fn tunnel(ctx: Arc<ConnCtx>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let state = &ctx.state;
    let client_side = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let metered = metered_websocket(ctx.provider.api, parts.uri.path());
    let url_model = realtime_model(parts.uri.query());
    if metered.is_some() {
        // Messages compressed by `permessage-deflate` could not be read:
        // the offer is not passed on, and the two ends talk uncompressed.
        parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    let path = crate::meter::cap(parts.uri.path(), crate::meter::MAX_PATH).to_string();
    let authority = authority(&parts, &ctx.provider.host);
    let up_req = Request::from_parts(parts, boxed(body));
    let mut resp = match state
        .upstream
        .send_upgrade(ctx.origin.dst, &ctx.provider.host, &authority, up_req)
        .await
    {
        Ok(r) => r,
        Err(e) => return upstream_failed(state, &e),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut rparts, rbody) = resp.into_parts();
        super::upstream::strip_hop_by_hop(&mut rparts.headers);
        return Response::from_parts(rparts, boxed(rbody));
    }
    let upstream_side = hyper::upgrade::on(&mut resp);
    let stopping = state.stopping.clone();
    let protocol = resp
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let pid = ctx.who.pid;
    // Extensions the provider accepted all the same (it was offered none)
    // leave its messages unread: their responses are recorded without
    // usage, when they end.
    let meter = metered.map(|api| WsMeter::new(ctx.clone(), path, api, url_model));
    state.background.spawn(async move {
        let (client, upstream) = match tokio::join!(client_side, upstream_side) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                debug!(client = ?c.err(), upstream = ?u.err(), "protocol switch failed");
                return;
            }
        };
        if let Some(meter) = meter {
            debug!(
                pid,
                api = meter.api.name(),
                "WebSocket: metered as it passes"
            );
            tokio::select! {
                r = relay_metered(
                    hyper_util::rt::TokioIo::new(client),
                    hyper_util::rt::TokioIo::new(upstream),
                    meter,
                ) => {
                    debug!(pid, result = ?r, "upgraded connection ended");
                }
                _ = stopping.cancelled() => {}
            }
            return;
        }
        debug!(pid, protocol = %protocol, "upgraded connection: passed through, not metered");
        let (mut client, mut upstream) = (
            hyper_util::rt::TokioIo::new(client),
            hyper_util::rt::TokioIo::new(upstream),
        );
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                debug!(pid, result = ?r, "upgraded connection ended");
            }
            _ = stopping.cancelled() => {}
        }
    });
    // The 101 as the provider sent it: its Upgrade and Connection headers
    // belong to the switch.
    let (rparts, _) = resp.into_parts();
    Response::from_parts(rparts, boxed(http_body_util::Empty::<Bytes>::new()))
}

/// Copies both directions of a metered WebSocket, each byte forwarded as
/// it arrives and then shown to the meter. The job's side ending (or
/// failing) half-closes the provider's, as the job's own close would have
/// without the agent; the provider's side ending ends the relay. A job
/// that can no longer be written to (killed, reset) ends the relay at
/// once: the provider's connection goes as the job's would have, and the
/// provider stops generating what nobody reads. The meter then records
/// what is left open, estimated.
async fn relay_metered<C, U>(client: C, upstream: U, meter: WsMeter) -> std::io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stall = meter.ctx.state.body_stall;
    let meter = std::sync::Mutex::new(meter);
    let lock = || meter.lock().unwrap_or_else(|p| p.into_inner());
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let asks = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match tokio::time::timeout(stall, client_rd.read(&mut buf)).await {
                // A message left half-sent this long holds no more of the
                // body budget.
                Err(_) => {
                    lock().client_stalled();
                    continue;
                }
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => n,
            };
            let sent = up_wr.write_all(&buf[..n]).await;
            lock().client_sent(&buf[..n]);
            if sent.is_err() || up_wr.flush().await.is_err() {
                lock().provider_gone();
                return;
            }
        }
        // The job's side ended (its Close frame, or it vanished): the
        // provider is told at once, as it would have been without the
        // agent, and what it still sends before it closes is read.
        lock().job_ended();
        let _ = tokio::time::timeout(Duration::from_secs(5), up_wr.shutdown()).await;
    };
    let answers = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match up_rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    lock().provider_gone();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), client_wr.shutdown()).await;
                    return;
                }
                Ok(n) => n,
            };
            // Written while the job takes it (one that only half-closed
            // still reads); a job that cannot be written to is gone, and
            // the relay ends.
            let write = async {
                client_wr.write_all(&buf[..n]).await?;
                client_wr.flush().await
            };
            let job_left = lock().job_has_ended();
            let sent = if job_left {
                tokio::time::timeout(Duration::from_secs(5), write)
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            } else {
                write.await
            };
            let mut m = lock();
            m.provider_sent(&buf[..n]);
            if sent.is_err() {
                m.job_ended();
                return;
            }
        }
    };
    tokio::pin!(asks, answers);
    let mut asks_done = false;
    loop {
        if asks_done {
            // The job's side ended and the provider was told: its close,
            // or what it sends first, for at most the hang-up bound.
            let _ = tokio::time::timeout(DRAIN_AFTER_HANGUP, &mut answers).await;
            break;
        }
        tokio::select! {
            _ = &mut asks => asks_done = true,
            _ = &mut answers => break,
        }
    }
    Ok(())
}

/// The meter of one Responses API WebSocket: every response the provider
/// reports (`response.created` to `response.completed`, `.incomplete` or
/// `.failed`) is one record, as a request over HTTP would be, with the
/// model, usage and service tier of its last event; an `error` event
/// answering a `response.create` is one record with its status. A
/// response still open, or a `response.create` still unanswered, when the
/// connection ends is recorded with why it ended, its input estimated from
/// the `response.create` and its output from the text that streamed.
///
/// Requests and responses are paired per lane (`stream_id`; requests in
/// one lane are answered in order), responses told apart by their id, so
/// parallel lanes and the successors the provider starts by itself
/// (steering) are each counted once.
///
/// On a Realtime API socket every response (`response.created` to
/// `response.done`, whether the job asked for it or the provider's turn
/// detection started it) is one record, of the session's model, with the
/// usage of its `response.done`: its text, audio and image tokens, cached
/// or not. A transcription of the job's audio that reports usage
/// (`conversation.item.input_audio_transcription.completed`) is one
/// record of the session's transcription model. The job's messages (its
/// audio, mostly) are not read.
///
/// On a Gemini Live socket each turn of the model (from its first output
/// to the `usageMetadata` that counts it) is one record, of the model the
/// job's `setup` message named, with that usage. Only the job's first
/// message (its `setup`) is read; Gemini's messages arrive in binary
/// frames and are read as text.
struct WsMeter {
    ctx: Arc<ConnCtx>,
    path: String,
    api: WsApi,
    /// The records' request model: on a Realtime socket the model (or
    /// Azure deployment) the handshake named, on a Gemini Live one the
    /// model its `setup` named.
    url_model: Option<String>,
    /// Realtime: the model `session.created` and `session.updated` name,
    /// the records' response model (the request model of a socket whose
    /// handshake named none: a call's sideband, `?call_id=`).
    session_model: Option<String>,
    /// Realtime: the model transcribing the job's audio, when the session
    /// has one.
    transcription_model: Option<String>,
    /// Gemini Live: the last turn's counts recorded, to tell a repeat of
    /// its `usageMetadata` from the next turn's.
    last_live_usage: Option<crate::meter::record::Usage>,
    /// Gemini Live: the job's `setup` went by.
    setup_seen: bool,
    client: super::websocket::FrameReader,
    provider: super::websocket::FrameReader,
    /// `response.create`s sent and not answered yet, per lane.
    asked: std::collections::HashMap<Option<String>, std::collections::VecDeque<Draft>>,
    /// Responses the provider started and has not ended, by id.
    open: std::collections::HashMap<String, WsOpen>,
    /// Which side sent a Close frame first, or could no longer be reached.
    ended_by: Option<WsSide>,
    /// Requests not tracked (over [`WS_MAX_OPEN`]), said once.
    dropped: u64,
    /// A direction's framing was found broken (and said so).
    unreadable: bool,
}

struct WsOpen {
    draft: Draft,
    lane: Option<String>,
    /// The text that streamed, for an estimate if the response never ends.
    text: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WsSide {
    Job,
    Provider,
}

/// Past this many open responses (or unanswered requests) on one socket,
/// more are not tracked: their records would be guesses.
const WS_MAX_OPEN: usize = 256;
/// The longest `response.create` kept for an estimate (its share of the
/// body budget permitting).
const WS_MAX_KEPT_REQUEST: usize = 4 << 20;

#[derive(serde::Deserialize)]
struct WsClientEvent<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    stream_id: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct WsProviderEvent<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    stream_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    response_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    response: Option<WsResponseHead<'a>>,
    #[serde(default, borrow)]
    delta: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    sequence_number: Option<serde_json::Value>,
    #[serde(default)]
    status: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct WsResponseHead<'a> {
    #[serde(default, borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// The longest Gemini Live `setup` message read for its model.
const GEMINI_SETUP_LIMIT: usize = 1 << 20;

/// The model a Gemini Live `setup` message names (`models/gemini-…`, or
/// Vertex AI's `projects/…/publishers/google/models/gemini-…`), by its
/// id.
fn live_setup_model(message: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Setup {
        setup: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        model: String,
    }
    let s: Setup = serde_json::from_slice(message).ok()?;
    let id = s.setup.model.rsplit("models/").next()?.trim();
    (!id.is_empty()).then(|| capped_model(id))
}

/// The model named in the first bytes of a Gemini Live `setup` too long to
/// read whole (`{"setup":{"model":"models/…"`, as the SDKs write it).
fn live_prefix_model(prefix: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(prefix);
    let squeezed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let rest = &squeezed[squeezed.find("\"setup\":{")?..];
    let at = rest.find("\"model\":\"")? + 9;
    let model = &rest[at..];
    let model = &model[..model.find('"')?];
    let id = model.rsplit("models/").next()?;
    (!id.is_empty()).then(|| capped_model(id))
}

/// A Gemini Live server message, as far as the meter reads it (the
/// output itself, audio mostly, is skipped unread).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LiveMessage {
    #[serde(default, alias = "server_content")]
    server_content: Option<LiveContent>,
    #[serde(default, alias = "tool_call")]
    tool_call: Option<serde::de::IgnoredAny>,
    #[serde(default, alias = "usage_metadata")]
    usage_metadata: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LiveContent {
    #[serde(default, alias = "model_turn")]
    model_turn: Option<serde::de::IgnoredAny>,
}

/// A Realtime API server event, as far as the meter reads it.
#[derive(serde::Deserialize)]
struct RtEvent<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    response_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    response: Option<RtResponse>,
    #[serde(default)]
    session: Option<serde_json::Value>,
    /// A transcription's usage.
    #[serde(default)]
    usage: Option<serde_json::Value>,
}

/// A Realtime response (`response.created`, `response.done`): its id,
/// status and usage; its output is skipped unread.
#[derive(serde::Deserialize)]
struct RtResponse {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    status: Option<serde_json::Value>,
    #[serde(default)]
    status_details: Option<serde_json::Value>,
    #[serde(default)]
    usage: Option<serde_json::Value>,
}

/// The model a Realtime session object names, and the model transcribing
/// its input audio (`audio.input.transcription.model`; before the API's
/// general release, `input_audio_transcription.model`), `None` when
/// transcription is off.
fn realtime_session_models(
    session: &serde_json::Value,
) -> (Option<String>, Option<Option<String>>) {
    let model = session
        .get("model")
        .and_then(serde_json::Value::as_str)
        .filter(|m| !m.is_empty())
        .map(capped_model);
    let transcription = session
        .pointer("/audio/input")
        .and_then(|i| i.get("transcription"))
        .or_else(|| session.get("input_audio_transcription"))
        .map(|t| {
            t.get("model")
                .and_then(serde_json::Value::as_str)
                .filter(|m| !m.is_empty())
                .map(capped_model)
        });
    (model, transcription)
}

/// The error type an `error` member names (`code`, else `type`).
fn ws_error_type(error: Option<&serde_json::Value>) -> Option<String> {
    let e = error?;
    ["code", "type"]
        .into_iter()
        .find_map(|k| e.get(k).and_then(serde_json::Value::as_str))
        .and_then(crate::providers::error_type)
}

/// A lane's key: its `stream_id`, at most 128 bytes of it.
fn lane_of(id: &str) -> String {
    crate::meter::cap(id, 128).to_string()
}

/// Whether the first bytes of a message passed over unread say it is a
/// `response.create` (the type is the first member the SDKs write).
fn is_response_create(prefix: &[u8]) -> bool {
    let text = String::from_utf8_lossy(prefix);
    let squeezed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    squeezed.contains("\"type\":\"response.create\"")
}

/// The response id in the first bytes of a `response.completed`,
/// `.incomplete` or `.failed` event (a Realtime `response.done`).
fn terminal_event_id(prefix: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(prefix);
    let squeezed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let terminal = ["completed", "incomplete", "failed", "done"]
        .iter()
        .any(|k| squeezed.contains(&format!("\"type\":\"response.{k}\"")));
    if !terminal {
        return None;
    }
    let at = squeezed.find("\"response\":{")?;
    let rest = &squeezed[at..];
    let id_at = rest.find("\"id\":\"")? + 6;
    let id = &rest[id_at..];
    Some(id[..id.find('"')?].to_string())
}

fn capped_model(m: &str) -> String {
    crate::meter::cap(m, crate::meter::MAX_MODEL_NAME).to_string()
}

impl WsMeter {
    fn new(ctx: Arc<ConnCtx>, path: String, api: WsApi, url_model: Option<String>) -> Self {
        use super::websocket::{FrameReader, MAX_MESSAGE};
        // The job's messages count against the body budget while they are
        // read (the job controls their size and pace); the provider's are
        // bounded as its HTTP answers are. A Realtime job's are not read at
        // all (only their framing, for the Close): they are its audio.
        let lease = ctx.state.body_budget.lease();
        let client_limit = match api {
            WsApi::Responses => MAX_MESSAGE.min(ctx.state.max_request_body),
            WsApi::Realtime => 0,
            // Its `setup` (tools and instructions included); then nothing.
            WsApi::GeminiLive => GEMINI_SETUP_LIMIT.min(ctx.state.max_request_body),
        };
        let (mut client, mut provider) = (
            FrameReader::new(client_limit, (client_limit > 0).then_some(lease)),
            FrameReader::new(MAX_MESSAGE, None),
        );
        if api == WsApi::GeminiLive {
            client = client.binary_as_text();
            provider = provider.binary_as_text();
        }
        WsMeter {
            client,
            provider,
            ctx,
            path,
            api,
            url_model: url_model.filter(|_| api == WsApi::Realtime),
            session_model: None,
            transcription_model: None,
            last_live_usage: None,
            setup_seen: false,
            asked: Default::default(),
            open: Default::default(),
            ended_by: None,
            dropped: 0,
            unreadable: false,
        }
    }

    /// A draft for a response asked for now (or started by the provider
    /// without a request), with the request kept for an estimate when its
    /// share of the body budget permits.
    fn draft(&self, model: Option<String>, body: Option<&[u8]>) -> Draft {
        let operation = match self.api {
            WsApi::Responses => "responses",
            WsApi::Realtime => "realtime",
            WsApi::GeminiLive => "live",
        };
        self.draft_of(operation, model, body)
    }

    /// [`WsMeter::draft`], of an operation named.
    fn draft_of(
        &self,
        operation: &'static str,
        model: Option<String>,
        body: Option<&[u8]>,
    ) -> Draft {
        let state = &self.ctx.state;
        let mut lease = state.body_budget.lease();
        let body = body
            .filter(|b| b.len() <= WS_MAX_KEPT_REQUEST && lease.grow(b.len()))
            .map(Bytes::copy_from_slice);
        Draft {
            ctx: self.ctx.clone(),
            body,
            lease,
            started: Instant::now(),
            started_ms: now_ms(),
            method: "GET".to_string(),
            path: self.path.clone(),
            info: RequestInfo {
                operation,
                metered: true,
                model,
                streaming: operation != "audio",
                // OpenAI's API on an OpenAI, Bedrock or custom host; Azure
                // OpenAI keeps its own name and prices, as Gemini does.
                api: (self.api != WsApi::GeminiLive
                    && self.ctx.provider.api != crate::config::ApiKind::AzureOpenai)
                    .then_some(crate::config::ApiKind::Openai),
                ..RequestInfo::default()
            },
            status: 0,
            ttfb_ms: None,
            emitted: false,
            // Sent: the message went upstream before it was read here.
            sent: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            unanswered: false,
            _live: state.live.request_started(&self.ctx.who),
        }
    }

    fn asked_count(&self) -> usize {
        self.asked
            .values()
            .map(std::collections::VecDeque::len)
            .sum()
    }

    /// Requests or responses are still open: their usage may yet come.
    #[cfg(test)]
    fn waiting(&self) -> bool {
        !self.open.is_empty() || self.asked.values().any(|q| !q.is_empty())
    }

    /// The job's side ended first (for the records of what is open).
    fn job_ended(&mut self) {
        self.ended_by.get_or_insert(WsSide::Job);
    }

    /// The job's side has ended (what is written to it now may stall).
    fn job_has_ended(&self) -> bool {
        self.ended_by == Some(WsSide::Job)
    }

    /// The provider's side ended or failed.
    fn provider_gone(&mut self) {
        self.ended_by.get_or_insert(WsSide::Provider);
    }

    /// The job has left a message half-sent for `proxy.request_body_stall_secs`.
    fn client_stalled(&mut self) {
        if self.client.expire_partial() {
            debug!(
                host = self.ctx.provider.host.as_str(),
                "a WebSocket message paused mid-way: passed over"
            );
        }
    }

    fn client_sent(&mut self, bytes: &[u8]) {
        if self.api == WsApi::GeminiLive {
            let mut setup = None;
            let seen = self.setup_seen;
            self.client.feed(bytes, &mut |msg| {
                if !seen && setup.is_none() {
                    setup = Some(match msg {
                        super::websocket::Message::Text(m) => live_setup_model(m),
                        // Too long to read whole: the SDKs write the model
                        // first.
                        super::websocket::Message::Unread(prefix) => live_prefix_model(prefix),
                    });
                }
            });
            if let Some(model) = setup {
                // Its first message is its `setup`: the rest (its audio
                // and video, mostly) is not read.
                self.setup_seen = true;
                self.client.set_limit(0);
                if model.is_none() {
                    warn!(
                        host = self.ctx.provider.host.as_str(),
                        "a Gemini Live setup named no model the agent could read: its turns are recorded without one, unpriced"
                    );
                }
                self.url_model = model;
            }
            if self.client.closed() {
                self.ended_by.get_or_insert(WsSide::Job);
            }
            self.note_unreadable();
            return;
        }
        if self.api == WsApi::Realtime {
            // Read for its framing alone: every response is the
            // provider's to announce.
            self.client.feed(bytes, &mut |_| {});
            if self.client.closed() {
                self.ended_by.get_or_insert(WsSide::Job);
            }
            self.note_unreadable();
            return;
        }
        // (lane, model, the message) of each request read.
        type Ask = (Option<String>, Option<String>, Option<Vec<u8>>);
        let mut asks: Vec<Ask> = Vec::new();
        self.client.feed(bytes, &mut |msg| match msg {
            super::websocket::Message::Text(msg) => {
                let Ok(ev) = serde_json::from_slice::<WsClientEvent<'_>>(msg) else {
                    return;
                };
                if ev.kind.as_deref() == Some("response.create") {
                    asks.push((
                        ev.stream_id.as_deref().map(lane_of),
                        ev.model.as_deref().map(capped_model),
                        Some(msg.to_vec()),
                    ));
                }
            }
            // Passed over (too long, over the budget, paused): a request
            // if its first bytes say so, of an unknown model and lane.
            super::websocket::Message::Unread(prefix) => {
                if is_response_create(prefix) {
                    asks.push((None, None, None));
                }
            }
        });
        if self.client.closed() {
            self.ended_by.get_or_insert(WsSide::Job);
        }
        for (lane, model, body) in asks {
            if self.asked_count() >= WS_MAX_OPEN {
                self.dropped += 1;
                if self.dropped == 1 {
                    warn!(
                        host = self.ctx.provider.host.as_str(),
                        "a {} WebSocket has {WS_MAX_OPEN} requests unanswered: further ones on it are not recorded",
                        self.api.name()
                    );
                }
                continue;
            }
            let draft = self.draft(model, body.as_deref());
            self.asked.entry(lane).or_default().push_back(draft);
        }
        self.note_unreadable();
    }

    /// The oldest request waiting in `lane`; else, for an event without a
    /// lane (a provider that does not repeat it), the oldest waiting in
    /// any lane, and for one in a named lane, the oldest without a lane.
    /// Never one of another named lane.
    fn take_ask(&mut self, lane: &Option<String>) -> Option<Draft> {
        let key = if self.asked.get(lane).is_some_and(|q| !q.is_empty()) {
            lane.clone()
        } else if lane.is_some() {
            None
        } else {
            self.asked
                .iter()
                .filter_map(|(k, q)| q.front().map(|d| (k, d.started)))
                .min_by_key(|(_, at)| *at)
                .map(|(k, _)| k.clone())?
        };
        let q = self.asked.get_mut(&key)?;
        let d = q.pop_front();
        if q.is_empty() {
            self.asked.remove(&key);
        }
        d
    }

    fn provider_sent(&mut self, bytes: &[u8]) {
        let mut events = Vec::new();
        let mut unread_ends = Vec::new();
        self.provider.feed(bytes, &mut |msg| match msg {
            super::websocket::Message::Text(m) => {
                if let Ok(text) = std::str::from_utf8(m) {
                    events.push(text.to_string());
                }
            }
            // A last event too long to read (a response repeating large
            // generated images): the response it ends, if its first bytes
            // say which.
            super::websocket::Message::Unread(prefix) => {
                if let Some(id) = terminal_event_id(prefix) {
                    unread_ends.push(id);
                }
            }
        });
        for id in unread_ends {
            if let Some(o) = self.open.remove(&id) {
                let mut draft = o.draft;
                draft.status = 200;
                let parsed = ParsedUsage {
                    output_text: o.text,
                    ..ParsedUsage::default()
                };
                // No usage read: estimated, from the request and the text.
                draft.emit(parsed, None);
            }
        }
        if self.provider.closed() {
            self.ended_by.get_or_insert(WsSide::Provider);
        }
        for text in events {
            self.on_provider_event(&text);
        }
        self.note_unreadable();
    }

    /// Says once when either direction could not be read as WebSocket
    /// frames, and what that costs.
    fn note_unreadable(&mut self) {
        if self.unreadable {
            return;
        }
        let side = if self.provider.broken() {
            match self.api {
                WsApi::Responses => {
                    "the provider's messages: responses from here on are recorded when the socket ends, estimated"
                }
                WsApi::Realtime | WsApi::GeminiLive => {
                    "the provider's messages: what is open is recorded when the socket ends, uncounted, and later responses are not recorded"
                }
            }
        } else if self.api != WsApi::Responses {
            // Its job's messages are not read.
            return;
        } else if self.client.broken() {
            "the job's messages: responses from here on are recorded without the model asked for"
        } else {
            return;
        };
        self.unreadable = true;
        warn!(
            host = self.ctx.provider.host.as_str(),
            "a {} WebSocket broke the framing rules in {side}",
            self.api.name()
        );
    }

    /// An open response of `lane`, if any.
    fn open_in_lane(&self, lane: &Option<String>) -> Option<String> {
        self.open
            .iter()
            .find(|(_, o)| &o.lane == lane)
            .map(|(id, _)| id.clone())
    }

    /// The open response of `lane` when it is the only one there.
    fn only_open_in_lane(&self, lane: &Option<String>) -> Option<String> {
        let mut it = self.open.iter().filter(|(_, o)| &o.lane == lane);
        match (it.next(), it.next()) {
            (Some((id, _)), None) => Some(id.clone()),
            _ => None,
        }
    }

    fn on_provider_event(&mut self, text: &str) {
        match self.api {
            WsApi::Realtime => return self.on_realtime_event(text),
            WsApi::GeminiLive => return self.on_live_message(text),
            WsApi::Responses => {}
        }
        let Ok(ev) = serde_json::from_str::<WsProviderEvent<'_>>(text) else {
            return;
        };
        let lane = ev.stream_id.as_deref().map(lane_of);
        let id = ev
            .response
            .as_ref()
            .and_then(|r| r.id.as_deref())
            .or(ev.response_id.as_deref())
            .map(str::to_string);
        match ev.kind.as_deref() {
            Some("response.created") => {
                let Some(id) = id else { return };
                if self.open.contains_key(&id) || self.open.len() >= WS_MAX_OPEN {
                    return;
                }
                let model = ev.response.as_ref().and_then(|r| r.model.as_deref());
                // Its `response.create`, if the client sent one (a
                // successor the provider starts by itself has none).
                let asked = self.take_ask(&lane);
                let mut draft = asked.unwrap_or_else(|| self.draft(None, None));
                if draft.info.model.is_none() {
                    draft.info.model = model.map(capped_model);
                }
                draft.ttfb_ms = Some(draft.started.elapsed().as_millis() as u64);
                self.open.insert(
                    id,
                    WsOpen {
                        draft,
                        lane,
                        text: String::new(),
                    },
                );
            }
            Some(kind @ ("response.completed" | "response.incomplete" | "response.failed")) => {
                // By its id; an event without one ends the lane's open
                // response when there is exactly one.
                let found = match &id {
                    Some(id) => self.open.remove(id),
                    None => self
                        .only_open_in_lane(&lane)
                        .and_then(|id| self.open.remove(&id)),
                };
                if found.is_none() && !self.open.is_empty() {
                    // Which of the open responses it ends cannot be told:
                    // they are recorded when they end, or with the socket.
                    debug!("a Responses API WebSocket event ended a response it did not name");
                    return;
                }
                let (mut draft, streamed) = match found {
                    Some(o) => (o.draft, o.text),
                    None => {
                        let asked = self.take_ask(&lane);
                        (
                            asked.unwrap_or_else(|| self.draft(None, None)),
                            String::new(),
                        )
                    }
                };
                draft.status = 200;
                let mut parsed = ParsedUsage {
                    output_text: streamed,
                    ..ParsedUsage::default()
                };
                crate::providers::openai::websocket_event(&mut parsed, text);
                if kind == "response.failed" && parsed.error.is_none() {
                    parsed.error =
                        ws_error_type(ev.response.as_ref().and_then(|r| r.error.as_ref()))
                            .or_else(|| Some("response_failed".to_string()));
                }
                draft.emit(parsed, None);
            }
            Some("error") => {
                // An error within a response's stream (numbered among its
                // events) is about that response, which ends with its own
                // event or when the socket does. Any other answers the
                // lane's oldest request.
                if ev.sequence_number.is_some() && self.open_in_lane(&lane).is_some() {
                    return;
                }
                let Some(mut draft) = self.take_ask(&lane) else {
                    return;
                };
                draft.status = ev
                    .status
                    .as_ref()
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|s| u16::try_from(s).ok())
                    .filter(|s| (400..600).contains(s))
                    .unwrap_or(400);
                let error = ws_error_type(ev.error.as_ref()).or_else(|| Some("error".into()));
                draft.emit(ParsedUsage::default(), error);
            }
            Some(k) if k.ends_with(".delta") => {
                let Some(d) = ev.delta.as_deref() else { return };
                let target = id
                    .filter(|id| self.open.contains_key(id))
                    .or_else(|| self.only_open_in_lane(&lane));
                if let Some(o) = target.and_then(|id| self.open.get_mut(&id)) {
                    crate::providers::push_text(&mut o.text, d);
                }
            }
            _ => {}
        }
    }

    /// One Gemini Live server message: the model's output opens a turn,
    /// and a `usageMetadata` ends it with its counts (in the message that
    /// completes the turn, or one of its own). A repeat of the usage just
    /// recorded, with no output between, is not counted again.
    fn on_live_message(&mut self, text: &str) {
        const TURN: &str = "";
        let Ok(m) = serde_json::from_str::<LiveMessage>(text) else {
            return;
        };
        // (Not its transcription, which may come after the turn's usage.)
        let output = m.tool_call.is_some()
            || m.server_content
                .as_ref()
                .is_some_and(|c| c.model_turn.is_some());
        if output && !self.open.contains_key(TURN) {
            self.open_answered(TURN.to_string(), self.url_model.clone());
        }
        // A usage with no counts (Vertex's `trafficType` alone) ends no
        // turn.
        let Some(usage) = m
            .usage_metadata
            .as_ref()
            .and_then(crate::providers::gemini::usage_from)
        else {
            return;
        };
        let open = self.open.remove(TURN);
        if open.is_none() && self.last_live_usage == Some(usage) {
            debug!("a Gemini Live usage repeated: counted once");
            return;
        }
        let mut draft = open.map_or_else(|| self.draft(self.url_model.clone(), None), |o| o.draft);
        draft.status = 200;
        self.last_live_usage = Some(usage);
        let parsed = ParsedUsage {
            usage: Some(usage),
            ..ParsedUsage::default()
        };
        draft.emit(parsed, None);
    }

    /// A response (Realtime) or turn (Gemini Live) the provider started,
    /// open under `key` until its usage ends it. Answered: if it never
    /// ends, its cost is unknown (its tokens are sound, not estimated),
    /// not 0.
    fn open_answered(&mut self, key: String, model: Option<String>) {
        let mut draft = self.draft(model, None);
        draft.status = 200;
        self.open.insert(
            key,
            WsOpen {
                draft,
                lane: None,
                text: String::new(),
            },
        );
    }

    /// A Realtime response's request model.
    fn realtime_model(&self) -> Option<String> {
        self.url_model
            .clone()
            .or_else(|| self.session_model.clone())
    }

    /// One Realtime API server event.
    fn on_realtime_event(&mut self, text: &str) {
        let Ok(ev) = serde_json::from_str::<RtEvent<'_>>(text) else {
            return;
        };
        let id = ev
            .response
            .as_ref()
            .and_then(|r| r.id.as_ref())
            .and_then(serde_json::Value::as_str)
            .or(ev.response_id.as_deref())
            .map(|id| crate::meter::cap(id, 128).to_string());
        match ev.kind.as_deref() {
            Some(
                "session.created"
                | "session.updated"
                | "transcription_session.created"
                | "transcription_session.updated",
            ) => {
                let Some(session) = ev.session.as_ref() else {
                    return;
                };
                let (model, transcription) = realtime_session_models(session);
                if model.is_some() {
                    self.session_model = model;
                }
                if let Some(t) = transcription {
                    self.transcription_model = t;
                }
            }
            Some("response.created") => {
                let Some(id) = id else { return };
                if self.open.contains_key(&id) || self.open.len() >= WS_MAX_OPEN {
                    return;
                }
                self.open_answered(id, self.realtime_model());
            }
            Some("response.done") => {
                let (mut draft, streamed) = match id.as_ref().and_then(|id| self.open.remove(id)) {
                    Some(o) => (o.draft, o.text),
                    // Its `response.created` went unseen (too many open,
                    // or not read): timed from here.
                    None => (self.draft(self.realtime_model(), None), String::new()),
                };
                draft.status = 200;
                let response = ev.response.as_ref();
                let mut parsed = ParsedUsage {
                    output_text: streamed,
                    usage: response
                        .and_then(|r| r.usage.as_ref())
                        .and_then(crate::providers::openai::usage_from),
                    response_model: self.session_model.clone(),
                    ..ParsedUsage::default()
                };
                // Cancelled (the job's interruption, or its
                // `response.cancel`) and incomplete responses are billed
                // for what they used and are no error; a failed one is.
                if response
                    .and_then(|r| r.status.as_ref())
                    .and_then(serde_json::Value::as_str)
                    == Some("failed")
                {
                    let details = response.and_then(|r| r.status_details.as_ref());
                    parsed.error = ws_error_type(details.and_then(|d| d.get("error")))
                        .or_else(|| Some("response_failed".to_string()));
                }
                draft.emit(parsed, None);
            }
            Some("conversation.item.input_audio_transcription.completed") => {
                // Billed on its own, at the transcription model's rates;
                // one billed by the second (`whisper-1`) has no tokens.
                let Some(usage) = ev.usage.as_ref() else {
                    return;
                };
                let mut draft = self.draft_of("audio", self.transcription_model.clone(), None);
                draft.status = 200;
                // Tokens, or the length of audio billed by the second.
                let parsed = ParsedUsage {
                    usage: crate::providers::openai::usage_from(usage),
                    ..ParsedUsage::default()
                };
                draft.emit(parsed, None);
            }
            // The response's first output (audio or text): its time to
            // first byte. What streams is not kept: a response that never
            // ends is not estimated (its tokens are sound).
            Some(k) if k.ends_with(".delta") => {
                let Some(o) = id.as_ref().and_then(|id| self.open.get_mut(id)) else {
                    return;
                };
                o.draft
                    .ttfb_ms
                    .get_or_insert_with(|| o.draft.started.elapsed().as_millis() as u64);
            }
            _ => {}
        }
    }

    /// Records what is still open as the connection ends: why it ended,
    /// and (off the async workers) estimates from the request and the
    /// text that streamed.
    fn finish(&mut self) {
        let state = &self.ctx.state;
        let why = if state.stopping.is_cancelled() {
            "agent_stopped"
        } else if self.ended_by == Some(WsSide::Provider) {
            "upstream_closed"
        } else {
            "client_disconnected"
        };
        for (_, o) in self.open.drain() {
            let mut draft = o.draft;
            draft.unanswered = true;
            let counting = draft.info.estimable();
            let parsed = ParsedUsage {
                output_text: o.text,
                ..ParsedUsage::default()
            };
            draft.record_off_worker(parsed, Some(why.to_string()), counting);
        }
        for (_, q) in self.asked.drain() {
            for mut draft in q {
                draft.unanswered = true;
                draft.record_off_worker(ParsedUsage::default(), Some(why.to_string()), true);
            }
        }
    }
}

impl Drop for WsMeter {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A request this connection must not carry: `CONNECT` (the agent is no
/// proxy for other destinations), or one that names another host than the
/// one its TLS handshake named (`Host`, an absolute URI, HTTP/2's
/// `:authority`). Forwarded, it would be read as the handshake's provider
/// while a front end shared by several (Google's, a CDN's) routed it by its
/// own name. Answered 421 (Misdirected Request), which tells a client to
/// use a connection of its own for that host.
fn refused<B>(req: &Request<B>, provider_host: &str) -> Option<Response<ProxyBody>> {
    if req.method() == http::Method::CONNECT {
        return Some(error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "tollgate_method_not_allowed",
            "CONNECT is not forwarded",
            false,
        ));
    }
    let ours = |host: &str| {
        host.trim_end_matches('.')
            .eq_ignore_ascii_case(provider_host)
    };
    // The URI's authority (absolute form, HTTP/2's `:authority`) and every
    // `Host` header, each when present: the one upstream reads is kept as
    // the client sent it.
    let uri_ok = req.uri().authority().is_none_or(|a| ours(a.host()));
    let hosts_ok = req.headers().get_all(header::HOST).iter().all(|h| {
        // One that does not parse names no host of ours either.
        h.to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .is_some_and(|a| ours(a.host()))
    });
    if uri_ok && hosts_ok {
        return None;
    }
    debug!(%provider_host, "a request naming another host than its connection's: 421");
    Some(error_response(
        StatusCode::MISDIRECTED_REQUEST,
        "tollgate_misdirected_request",
        "the request names another host than the one this connection was opened for",
        false,
    ))
}

pub(super) async fn handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let state = &ctx.state;
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(resp) = refused(&req, &ctx.provider.host) {
        return Ok(resp);
    }
    if is_upgrade(&req) {
        return Ok(tunnel(ctx, req).await);
    }
    let started = Instant::now();
    let started_ms = now_ms();
    let (mut parts, body) = req.into_parts();
    let mut lease = state.body_budget.lease();
    let read = read_bounded(body, state.max_request_body, state.body_stall, &mut lease);
    let (chunks, rest) = match read.await {
        Ok(x) => x,
        Err(e) => {
            debug!(error = %e, "client request body failed");
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "tollgate_bad_request",
                "the request body could not be read",
                false,
            ));
        }
    };
    match rest.as_ref().map(|r| r.1) {
        Some(Unread::TooLong) => {
            state.stats.body_too_long.fetch_add(1, Ordering::Relaxed);
            debug!(
                limit = state.max_request_body,
                "request body longer than proxy.max_request_body: forwarded unparsed"
            );
        }
        Some(Unread::Stalled) => {
            state.stats.body_stalled.fetch_add(1, Ordering::Relaxed);
            debug!(
                stall_secs = state.body_stall.as_secs(),
                "request body paused longer than proxy.request_body_stall_secs: forwarded unparsed as it arrives"
            );
        }
        Some(Unread::OverBudget) => {
            let n = state
                .stats
                .over_buffer_budget
                .fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(1000) {
                warn!(
                    held = state.body_budget.used(),
                    times = n + 1,
                    "the agent holds proxy.max_buffered_request_bytes of request bodies: this request's body is forwarded unparsed (its model and usage come from the response)"
                );
            }
        }
        None => {}
    }
    let rest = rest.map(|r| r.0);
    if rest.is_some() {
        // Forwarded as it arrives, not kept: what was read is on its way
        // upstream, and holding its share until the response ends would
        // leave the budget to bodies that are gone.
        lease.release();
    }
    let adapter = adapter_for(ctx.provider.api);
    // A body read whole is joined into one buffer and its frames let go.
    let (mut whole, chunks) = if rest.is_none() {
        let whole = match chunks.len() {
            1 => chunks.into_iter().next().unwrap_or_default(),
            _ => Bytes::from(chunks.concat()),
        };
        (Some(whole), Vec::new())
    } else {
        (None, chunks)
    };
    // A compressed body is read decoded; it goes upstream as the client
    // sent it unless the agent rewrites it (then plain, its
    // Content-Encoding gone), so a signature over its bytes still holds.
    let mut sent_as = None;
    if let Some(enc) = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .filter(|e| !e.trim().eq_ignore_ascii_case("identity"))
        && let Some(b) = whole.as_ref()
    {
        let (enc_owned, body, limit) = (enc.to_owned(), b.clone(), state.max_request_body);
        let plain = aside(b.len() >= DECODE_ASIDE, move || {
            crate::providers::decode::decode_whole(&enc_owned, &body, limit)
        })
        .await
        .flatten();
        match plain {
            Some(plain) if lease.grow(plain.len().saturating_sub(b.len())) => {
                sent_as = whole.replace(Bytes::from(plain));
            }
            _ => debug!(
                encoding = enc,
                "a request body the agent could not decode (an encoding it does not read, corrupt, longer than proxy.max_request_body decoded, or past the body budget): forwarded as sent, unread"
            ),
        }
    }
    let mut info = match whole.as_ref().filter(|b| b.len() >= READ_ASIDE) {
        // A large body is read on a blocking thread (a copy of the head,
        // the body shared), not on the worker its neighbours' streams
        // run on.
        Some(body) => {
            let (method, uri, headers, body) = (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
                body.clone(),
            );
            aside(true, move || {
                adapter.request(&RequestView {
                    method: &method,
                    path: uri.path(),
                    query: uri.query(),
                    headers: &headers,
                    body: Some(&body),
                })
            })
            .await
            .unwrap_or_default()
        }
        None => adapter.request(&RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            body: whole.as_deref(),
        }),
    };
    if let Some(m) = info.model.as_mut() {
        crate::meter::cap_owned(m, crate::meter::MAX_MODEL_NAME);
    }
    read_retrieval_only_if_it_settles(state, &ctx.provider.host, &mut info);
    claim_batch_results(state, &ctx.provider.host, &parts.headers, &mut info);
    // The API whose format the request has from here on (Claude on a
    // Vertex AI host is Anthropic's; the OpenAI-compatible endpoint of
    // Anthropic's host, OpenAI's).
    let adapter = adapter_for(info.format(ctx.provider.api));
    if ctx.provider.refuses_stream_options {
        info.refuses_stream_options = true;
    }
    if let Some(new) = whole
        .as_deref()
        .and_then(|b| adapter.rewrite_request(&mut info, b))
    {
        whole = Some(new);
        parts.headers.remove(header::CONTENT_LENGTH);
        if sent_as.take().is_some() {
            parts.headers.remove(header::CONTENT_ENCODING);
        }
    }
    if info.injected_usage || info.batch.is_some() {
        // The response filter works on plain bytes; the client gets the
        // same content, uncompressed. Batch results are read whatever
        // their size, which a decoder bounds.
        parts.headers.remove(header::ACCEPT_ENCODING);
    }
    // A retrieval only settles a parked record, a Managed Agents call
    // shows sessions' growth, batch results are the batch's rows: nothing
    // to estimate, nothing in flight.
    let own_row = info.own_row();
    let kept_body = if info.metered && own_row {
        whole.clone()
    } else {
        None
    };
    // What goes upstream: the client's own bytes, if they were decoded
    // only to be read.
    let whole = sent_as.or(whole);
    // An HTTP/2 request read whole can be made again, for a stream the
    // provider refuses unprocessed (see `Upstream::send`).
    let replay = (parts.version == http::Version::HTTP_2)
        .then(|| whole.clone())
        .flatten();
    let up_body: ProxyBody = match (whole, rest) {
        (Some(b), _) => boxed(Full::new(b)),
        (None, Some(rest)) => {
            let head = futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, BoxError>(Frame::data(c))),
            );
            let tail = rest
                .into_data_stream()
                .map(|r| r.map(Frame::data).map_err(|e| Box::new(e) as BoxError));
            StreamBody::new(head.chain(tail)).boxed_unsync()
        }
        (None, None) => boxed(Full::new(Bytes::new())),
    };
    let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up_body: ProxyBody = Sending {
        inner: up_body,
        sent: sent.clone(),
        client_failed: client_failed.clone(),
    }
    .boxed_unsync();
    let authority = authority(&parts, &ctx.provider.host);
    let again = replay.map(|body| {
        let (method, uri, headers, sent) = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
            sent.clone(),
        );
        move || {
            let mut r = Request::new(
                Sending {
                    inner: boxed(Full::new(body.clone())),
                    sent: sent.clone(),
                    client_failed: Arc::default(),
                }
                .boxed_unsync(),
            );
            *r.method_mut() = method.clone();
            *r.uri_mut() = uri.clone();
            *r.version_mut() = http::Version::HTTP_2;
            *r.headers_mut() = headers.clone();
            r
        }
    });
    let draft = Draft {
        ctx: ctx.clone(),
        body: kept_body,
        lease,
        started,
        started_ms,
        method: parts.method.to_string(),
        path: crate::meter::cap(parts.uri.path(), crate::meter::MAX_PATH).to_string(),
        info: info.clone(),
        status: 0,
        ttfb_ms: None,
        // Unmetered requests have no record to write.
        emitted: !info.metered,
        sent,
        unanswered: false,
        _live: if info.metered && own_row {
            state.live.request_started(&ctx.who)
        } else {
            crate::control::InFlight::none()
        },
    };
    let up_req = Request::from_parts(parts, up_body);
    let resp = match state
        .upstream
        .send(
            ctx.origin.dst,
            &ctx.provider.host,
            &authority,
            up_req,
            again
                .as_ref()
                .map(|f| f as &(dyn Fn() -> Request<ProxyBody> + Send + Sync)),
        )
        .await
    {
        Ok(r) => r,
        Err(_) if client_failed.load(Ordering::Relaxed) => {
            // The job's body failed while it was forwarded (it left): not
            // the provider's failure, and not a request the provider had
            // whole, so nothing is estimated.
            debug!(
                host = ctx.provider.host.as_str(),
                "the client's request body ended early; the upstream request was abandoned"
            );
            if info.metered {
                let mut draft = draft;
                draft.unanswered = false;
                draft.record_off_worker(
                    ParsedUsage::default(),
                    Some(hangup_error(state).to_string()),
                    false,
                );
            }
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "tollgate_request_body_incomplete",
                "the request body ended before it was whole",
                false,
            ));
        }
        Err(e) => {
            if info.metered {
                let mut draft = draft;
                // Taken to be sent (hyper polled the body once the head
                // was on its way) and then lost: the provider may have
                // read it and bill its input, as when the client leaves;
                // it is estimated. (A request a closing pooled connection
                // gave back unsent was sent again by `Upstream::send`; one
                // hyper had begun to write is estimated too. One the
                // provider refused unprocessed is not.)
                draft.unanswered = draft.sent.load(Ordering::Relaxed) && !e.unprocessed();
                let counting = draft.unanswered && draft.body.is_some();
                draft.record_off_worker(
                    ParsedUsage::default(),
                    Some(e.kind().to_string()),
                    counting,
                );
            }
            return Ok(upstream_failed(state, &e));
        }
    };
    let (mut rparts, rbody) = resp.into_parts();
    super::upstream::strip_hop_by_hop(&mut rparts.headers);
    if !info.metered {
        return Ok(Response::from_parts(rparts, boxed(rbody)));
    }
    let status = rparts.status.as_u16();
    let encoding = rparts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let parser = crate::providers::decode::decoding(
        encoding.as_deref(),
        adapter.response_parser(&info, status, &rparts.headers),
    );
    // The injected usage chunk can only be in a successful, plain event
    // stream; anything else (an error body, a compressed or JSON answer)
    // passes as it came instead of being held until its end.
    let event_stream = crate::providers::content_type(&rparts.headers) == "text/event-stream";
    let plain = encoding
        .as_deref()
        .is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"));
    let filter = (rparts.status.is_success() && event_stream && plain)
        .then(|| adapter.response_filter(&info))
        .flatten();
    if filter.is_some() {
        rparts.headers.remove(header::CONTENT_LENGTH);
    }
    let mut draft = draft;
    draft.status = status;
    let metered = MeteredBody {
        inner: Some(rbody),
        parser: Some(parser),
        filter,
        draft: Some(draft),
        trailers: None,
    };
    Ok(Response::from_parts(rparts, boxed(metered)))
}

/// Everything of the record but the usage, known before the response ends.
struct Draft {
    ctx: Arc<ConnCtx>,
    /// The request body as forwarded (when it was read whole), for a local
    /// estimate if the provider reports no usage.
    body: Option<Bytes>,
    /// The request body's share of the agent's body budget, held while the
    /// body is: to the response's end, or until the provider's usage is
    /// read (then no estimate will need it), or the handler's end for an
    /// unmetered request.
    lease: crate::budget::BodyLease,
    started: Instant,
    started_ms: i64,
    method: String,
    path: String,
    info: RequestInfo,
    status: u16,
    ttfb_ms: Option<u64>,
    /// The record was handed on (or there is none to write).
    emitted: bool,
    /// hyper took the request body to send it (see [`Sending`]).
    sent: Arc<std::sync::atomic::AtomicBool>,
    /// Sent upstream, and the client left (or the agent stopped) before
    /// the response came: the provider has the request all the same.
    unanswered: bool,
    /// In flight for `tollgate top` until the draft is emitted or dropped.
    _live: crate::control::InFlight,
}

impl Drop for Draft {
    /// A request that ends without a response (the client left while it
    /// was forwarded, or the agent stopped) still gets its record: the
    /// provider may bill it. Once it was sent, the provider has its input
    /// (and generates a non-streaming answer all the same): the input is
    /// then estimated from the body, when it was read.
    fn drop(&mut self) {
        if self.emitted {
            return;
        }
        let error = Some(hangup_error(&self.ctx.state).to_string());
        let sent = self.status == 0 && self.sent.load(Ordering::Relaxed);
        if self.unanswered || !sent || self.body.is_none() {
            // Nothing to count, or already on the blocking pool (a task
            // dropped unrun at shutdown comes back here: record, do not
            // hand it on again).
            self.unanswered |= sent;
            self.record(ParsedUsage::default(), error);
            return;
        }
        let mut owned = self.detach();
        owned.unanswered = true;
        owned.record_off_worker(ParsedUsage::default(), error, true);
    }
}

impl Draft {
    /// Moves everything into a new draft and leaves this one emitted.
    fn detach(&mut self) -> Draft {
        let lease = self.ctx.state.body_budget.lease();
        self.emitted = true;
        Draft {
            ctx: self.ctx.clone(),
            body: self.body.take(),
            lease: std::mem::replace(&mut self.lease, lease),
            started: self.started,
            started_ms: self.started_ms,
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            info: std::mem::take(&mut self.info),
            status: self.status,
            ttfb_ms: self.ttfb_ms,
            emitted: false,
            sent: self.sent.clone(),
            unanswered: self.unanswered,
            _live: std::mem::replace(&mut self._live, crate::control::InFlight::none()),
        }
    }

    /// Drops the request body kept for a local estimate, and gives its
    /// share of the body budget back, once the provider's usage has been
    /// read: a long stream (or the drain after a hang-up) need not hold it
    /// to the end.
    fn release_body_once_counted(&mut self, parser: &dyn UsageParser) {
        if self.body.is_some() && parser.usage_seen() {
            self.body = None;
            self.lease.release();
            debug!(
                host = self.ctx.provider.host.as_str(),
                "the provider counted the request: its body is let go"
            );
        }
    }

    /// Records on the blocking pool when `counting` (local estimates are
    /// CPU work, kept off the async workers) and a runtime is there, else
    /// here.
    fn record_off_worker(mut self, parsed: ParsedUsage, error: Option<String>, counting: bool) {
        if counting && tokio::runtime::Handle::try_current().is_ok() {
            let background = self.ctx.state.background.clone();
            background.spawn_blocking(move || self.record(parsed, error));
        } else {
            self.record(parsed, error);
        }
    }

    /// Finishes the record and hands it to the sinks. When a successful
    /// response carried no usage, the counts are estimated locally (off
    /// the async workers) and the record says `estimated`.
    ///
    /// A background response still being generated is parked instead
    /// (here, before the answer's last bytes reach the job, so that no
    /// retrieval can come before it).
    fn emit(self, parsed: ParsedUsage, error: Option<String>) {
        let ok = (200..300).contains(&self.status);
        let mut parsed = parsed;
        if self.info.background
            && ok
            && parsed.unfinished()
            && let Some(id) = parsed.response_id.take()
        {
            self.park(id, parsed);
            return;
        }
        // A retrieval, a Managed Agents call count nothing themselves
        // (what they settle or show counts on its own); nor does a record
        // with nothing left to count (a parked one, counted already).
        let counting = ok
            && (parsed.usage.is_none() || parsed.partial)
            && self.info.estimable()
            && self.info.own_row()
            && (self.body.is_some() || !parsed.output_text.is_empty());
        self.record_off_worker(parsed, error, counting);
    }

    /// Builds the record and hands it to the sinks, once. A retrieval
    /// instead settles the parked record of the response it shows ended.
    fn record(&mut self, parsed: ParsedUsage, error: Option<String>) {
        if std::mem::replace(&mut self.emitted, true) {
            return;
        }
        let ok = (200..300).contains(&self.status);
        if let Some(id) = self.info.retrieves.as_deref() {
            if ok {
                settle(&self.ctx.state, &self.ctx.provider.host, id, parsed);
            }
            return;
        }
        if self.info.sessions.is_some() {
            if ok {
                self.record_sessions(parsed.sessions);
            }
            return;
        }
        if self.info.batch.is_some() {
            if ok {
                self.record_batch(parsed.batch);
            }
            return;
        }
        let mut parsed = parsed;
        let provider = adapter_for(self.info.api.unwrap_or(self.ctx.provider.api)).name();
        // The API whose format the body has, for its estimate.
        let api = self.info.format(self.ctx.provider.api);
        if let Some(m) = parsed.response_model.as_mut() {
            crate::meter::cap_owned(m, crate::meter::MAX_MODEL_NAME);
        }
        let mut usage = parsed.usage.unwrap_or_default();
        // The model whose encoding counts an estimate.
        let model =
            estimate::tokenizer_model(parsed.response_model.as_deref(), self.info.model.as_deref());
        // A successful status whose body the provider ended with its own
        // error before any count or output (Anthropic's `overloaded_error`
        // as the first event): refused, as an error status would have
        // been, so nothing is estimated.
        let refused = ok
            && parsed.usage.is_none()
            && parsed.error.is_some()
            && parsed.output_text.is_empty()
            && parsed.estimated == (0, 0);
        // An unanswered request has no usage: its input is estimated.
        let estimated = (ok || self.unanswered)
            && !refused
            && self.info.estimable()
            && match parsed.usage {
                None => {
                    // Counted earlier (a parked record's request, and the
                    // text that streamed before it parked), plus what is
                    // here (the text a resumed stream added).
                    let (input, output) = parsed.estimated;
                    usage.input_tokens = input;
                    let filled = estimate::fill_estimate(
                        &mut usage,
                        api,
                        model,
                        self.body.take().as_deref(),
                        &parsed.output_text,
                    );
                    usage.output_tokens = usage.output_tokens.saturating_add(output);
                    filled || input > 0 || output > 0
                }
                Some(_) if parsed.partial => {
                    estimate::raise_output(&mut usage, model, &parsed.output_text)
                }
                Some(_) => false,
            };
        // The provider's own error first: it says why the stream ended;
        // then why the request ended; then what is missing from the record.
        let error = parsed
            .error
            .take()
            .or(error)
            .or_else(|| {
                parsed
                    .undecodable
                    .then(|| crate::providers::decode::UNDECODABLE.to_string())
            })
            .or_else(|| {
                (ok && parsed.usage.is_none() && !estimated).then(|| "usage_missing".to_string())
            });
        // Azure serves the deployment its path names, whatever model the
        // body names (LangChain sends both, and they may differ): a
        // deployment's price is found by the deployment.
        let deployment = (provider == "azure-openai")
            .then(|| crate::providers::azure::deployment(&self.path))
            .flatten();
        let models = crate::meter::pricing::price_order_with(
            provider,
            parsed.response_model.as_deref(),
            self.info.model.as_deref(),
            deployment.as_deref(),
        );
        let priced = models.first().copied();
        let prices = &self.ctx.state.prices;
        // A successful answer whose counts are unknown (no usage, nothing
        // to estimate from) has an unknown cost, not a cost of 0.
        let counts_unknown = ok && parsed.usage.is_none() && !estimated;
        // Only the response says which tier served the request: the one a
        // request asks for is not always granted (Azure and
        // OpenAI-compatible servers ignore it).
        let service_tier = parsed.service_tier.take();
        let serving = crate::meter::pricing::Serving {
            tier: service_tier.as_deref(),
            // Bedrock's native routes and its Anthropic Messages route: a
            // regional endpoint's premium, by the model id the request
            // names.
            bedrock_regional: self.ctx.provider.api == crate::config::ApiKind::Bedrock
                && matches!(provider, "bedrock" | "anthropic")
                && self
                    .info
                    .model
                    .as_deref()
                    .is_some_and(crate::meter::pricing::bedrock_regional),
            // Claude on Vertex AI: a regional location's premium.
            vertex_regional: self.ctx.provider.api == crate::config::ApiKind::Gemini
                && provider == "anthropic"
                && crate::providers::gemini::vertex_regional(&self.path),
            uplift_percent: parsed.uplift_percent,
        };
        let price = |provider: &str| match &parsed.requests {
            // Many requests' sums (batch results): priced request by
            // request where the rates depend on the prompt's size.
            Some(many) => prices.cost_of_many(provider, &models, self.started_ms, many, serving),
            None => prices.cost_of_any(provider, &models, self.started_ms, &usage, serving),
        };
        // Another API's format on a Bedrock host (`/anthropic/`,
        // `/openai/`): Bedrock's prices first, the config's `provider =
        // "bedrock"` entries among them, then that API's provider's.
        let on_bedrock =
            self.ctx.provider.api == crate::config::ApiKind::Bedrock && provider != "bedrock";
        let cost = on_bedrock
            .then(|| price("bedrock"))
            .flatten()
            .or_else(|| price(provider))
            // A call the provider prices by something else than tokens takes
            // only a price the config gives it.
            .filter(|c| !counts_unknown && (!self.info.not_token_priced || c.configured));
        if let (Some(c), Some(tier), Some(m)) = (cost, service_tier.as_deref(), priced)
            && c.tier_unpriced
            && (usage.input_tokens > 0 || usage.output_tokens > 0)
            && !self.ctx.state.warn_tier_unpriced(provider, m, tier)
        {
            debug!(
                provider,
                model = m,
                service_tier = tier,
                "no price for this service tier"
            );
        }
        // Where the request ran may add to every rate (US-only inference).
        // A batch's submission and a file's upload bill nothing themselves
        // (the batch bills its requests when their results are read): a
        // cost of 0, not an unknown one that would mark every total as
        // counting the priced requests only.
        let bills_nothing = matches!(self.info.operation, "batch" | "file_upload")
            && usage.input_tokens == 0
            && usage.output_tokens == 0
            && !counts_unknown;
        let cost_usd = cost.map(|c| c.usd).or_else(|| bills_nothing.then_some(0.0));
        if cost_usd.is_none()
            && (usage.input_tokens > 0 || usage.output_tokens > 0 || usage.audio_duration_ms > 0)
        {
            self.ctx
                .state
                .stats
                .unpriced
                .fetch_add(1, Ordering::Relaxed);
            if !self.ctx.state.warn_unpriced(provider, priced) {
                debug!(provider, model = ?priced, "no price for this model");
            }
        }
        let rec = UsageRecord {
            id: None,
            started_at_ms: self.started_ms,
            started_at: rfc3339(self.started_ms),
            duration_ms: self.started.elapsed().as_millis() as u64,
            ttfb_ms: self.ttfb_ms,
            provider: provider.to_string(),
            host: self.ctx.provider.host.clone(),
            operation: self.info.operation.to_string(),
            method: std::mem::take(&mut self.method),
            path: std::mem::take(&mut self.path),
            model: self.info.model.take(),
            response_model: parsed.response_model,
            status: self.status,
            streaming: self.info.streaming,
            usage,
            estimated,
            cost_usd,
            who: self.ctx.who.clone(),
            error,
            service_tier,
        };
        self.ctx.state.sink.submit(Arc::new(rec));
    }
}

impl Draft {
    /// Writes one row per Managed Agents session that grew since the agent
    /// last saw it (see [`super::sessions`]): its growth, attributed to the
    /// job that created the session through the agent, or to the first
    /// job whose call showed it by its id.
    fn record_sessions(&self, sessions: Vec<crate::providers::SessionSnapshot>) {
        // One answer's snapshots are taken together (see
        // `Sessions::grew_all`: an Evals run's models are its shares).
        let grown_all =
            self.ctx
                .state
                .sessions
                .grew_all(&self.ctx.provider.host, sessions, &self.ctx.who);
        for grown in grown_all {
            let ctx = match grown.owner {
                Some(owner) if !Arc::ptr_eq(&owner, &self.ctx.who) => Arc::new(ConnCtx {
                    state: self.ctx.state.clone(),
                    origin: self.ctx.origin.clone(),
                    who: owner,
                    provider: self.ctx.provider.clone(),
                }),
                _ => self.ctx.clone(),
            };
            let mut row = self.row(RequestInfo {
                sessions: crate::providers::SessionsCall::No,
                model: grown.model,
                ..self.info.clone()
            });
            row.ctx = ctx;
            row.record(
                ParsedUsage {
                    usage: Some(grown.usage),
                    service_tier: grown.tier,
                    uplift_percent: grown.uplift_percent,
                    ..Default::default()
                },
                None,
            );
        }
    }
}

/// A batch's key in the table of counted results: the provider host and
/// the batch's (or its output file's) id.
pub(super) fn batch_key(host: &str, id: &str) -> String {
    format!("{host} {id}")
}

/// A read of batch results claims the results it counts in the agent's
/// table (see [`super::batches`]). A ranged read (a part of the results,
/// from anywhere in them: a download resumed) is forwarded unread.
fn claim_batch_results(
    state: &ProxyState,
    host: &str,
    headers: &http::HeaderMap,
    info: &mut RequestInfo,
) {
    let Some(b) = info.batch.as_mut() else {
        return;
    };
    let key = batch_key(host, &b.id);
    // Counted whole already (read before a restart, a Gemini batch read
    // once it ended): nothing to read.
    if headers.contains_key(header::RANGE) || state.batches.is_whole(&key) {
        info.batch = None;
        info.metered = false;
        return;
    }
    b.claims = crate::providers::batch::Claims::new(state.batches.clone(), key);
}

impl Draft {
    /// Writes the batch results this read counted (see
    /// [`super::batches`]): one row per model, at the batch rates,
    /// attributed to the job that read them.
    fn record_batch(&self, tally: Option<crate::providers::batch::BatchTally>) {
        let Some(t) = tally else {
            return;
        };
        if t.counted_before > 0 {
            debug!(
                host = self.ctx.provider.host.as_str(),
                results = t.counted_before,
                "batch results read again: those counted before are not counted twice"
            );
        }
        for m in t.models {
            let mut model = m.model;
            if let Some(name) = model.as_mut() {
                crate::meter::cap_owned(name, crate::meter::MAX_MODEL_NAME);
            }
            let mut row = self.row(RequestInfo {
                operation: crate::providers::batch::OPERATION,
                batch: None,
                model: model.clone(),
                ..self.info.clone()
            });
            row.record(
                ParsedUsage {
                    usage: Some(m.usage),
                    response_model: model,
                    service_tier: Some(crate::providers::batch::TIER.to_string()),
                    uplift_percent: m.uplift_percent,
                    requests: Some(m.requests),
                    ..Default::default()
                },
                None,
            );
        }
    }

    /// A row of this request's own (a session's growth, a model's share of
    /// batch results), written with `info` by the same job.
    fn row(&self, info: RequestInfo) -> Draft {
        Draft {
            ctx: self.ctx.clone(),
            body: None,
            lease: self.ctx.state.body_budget.lease(),
            started: self.started,
            started_ms: self.started_ms,
            method: self.method.clone(),
            path: self.path.clone(),
            info,
            status: self.status,
            ttfb_ms: self.ttfb_ms,
            emitted: false,
            sent: self.sent.clone(),
            unanswered: false,
            _live: crate::control::InFlight::none(),
        }
    }
}

/// A background response's record, parked (see [`super::parked`]) until a
/// retrieval shows the response ended.
pub(super) struct ParkedResponse {
    draft: Draft,
    /// What the request's own answer said (the model, text that streamed).
    first: ParsedUsage,
    /// How long the request itself took: the duration of a record written
    /// without the response's end.
    answered: Duration,
}

/// A parked record's key: the provider host and the response's id.
fn parked_key(host: &str, id: &str) -> String {
    format!("{host} {id}")
}

/// Background responses refused a place (the table or the job's share
/// full), for a warning now and then.
static PARK_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Draft {
    /// Parks this record under the response id `id`; `first` is what the
    /// request's answer said. What an estimate would need (the request
    /// body, the text that streamed) is then counted off the async workers
    /// and let go; a retrieval that settles the record first uses them as
    /// they are. A record the table refuses is written at once.
    fn park(mut self, id: String, first: ParsedUsage) {
        // Settled or expired, it is written, never parked again.
        self.info.background = false;
        let ctx = self.ctx.clone();
        let state = &ctx.state;
        let key = parked_key(&ctx.provider.host, &id);
        let body = self.body.clone();
        let text = first.output_text.clone();
        let api = self.info.format(ctx.provider.api);
        let model =
            estimate::tokenizer_model(first.response_model.as_deref(), self.info.model.as_deref())
                .map(str::to_string);
        let answered = self.started.elapsed();
        let entry = ParkedResponse {
            draft: self,
            first,
            answered,
        };
        match state
            .parked
            .park(key.clone(), super::job_scope(&ctx.who), entry)
        {
            Ok(None) => {}
            Ok(Some(same_id)) => same_id.unobserved(),
            Err((why, entry)) => {
                let n = PARK_REFUSED.fetch_add(1, Ordering::Relaxed);
                if why != super::parked::Refused::Closed && n.is_multiple_of(1000) {
                    warn!(
                        reason = ?why,
                        times = n + 1,
                        "too many background responses wait for their result: this one is recorded now, estimated"
                    );
                }
                entry.unobserved();
                return;
            }
        }
        if body.is_none() && text.is_empty() {
            return;
        }
        let parked = ctx.clone();
        let count = move || {
            let input = body
                .as_deref()
                .and_then(|b| estimate::estimate_input_for(api, model.as_deref(), b))
                .unwrap_or(0);
            let output = if text.is_empty() {
                0
            } else {
                estimate::estimate_output(model.as_deref(), &text)
            };
            parked.state.parked.update(&key, |p| {
                p.first.estimated = (input, output);
                p.first.output_text = String::new();
                p.draft.body = None;
                p.draft.lease.release();
            });
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            state.background.spawn_blocking(count);
        } else {
            count();
        }
    }
}

impl ParkedResponse {
    /// Writes the record with what a retrieval showed of the ended
    /// response: its counts, or, without them (cancelled before it
    /// started), the estimate.
    fn settle(self, mut later: ParsedUsage) {
        let ParkedResponse { draft, first, .. } = self;
        // Both parts of the output: what streamed before it parked (unless
        // counted into `estimated` already) and what the retrieval shows.
        if later.output_text.is_empty() {
            later.output_text = first.output_text;
        } else if !first.output_text.is_empty() {
            later.output_text = first.output_text + &later.output_text;
        }
        later.response_model = later.response_model.or(first.response_model);
        later.service_tier = later.service_tier.or(first.service_tier);
        later.estimated = first.estimated;
        let error = match later.response_status.as_deref() {
            Some("failed") => Some("response_failed".to_string()),
            Some("cancelled") => Some("response_cancelled".to_string()),
            _ => None,
        };
        draft.emit(later, error);
    }

    /// Writes the record without the response's end: estimated from the
    /// request and what streamed, timed as the request itself.
    fn unobserved(self) {
        let ParkedResponse {
            mut draft,
            mut first,
            answered,
        } = self;
        draft.started = Instant::now()
            .checked_sub(answered)
            .unwrap_or(draft.started);
        // Counts in an answer that was not the end are not final.
        first.usage = None;
        first.response_status = None;
        draft.emit(first, Some(BACKGROUND_UNOBSERVED.to_string()));
    }
}

/// The error of a background response whose end the agent did not see.
pub(super) const BACKGROUND_UNOBSERVED: &str = "background_unobserved";

/// Settles the parked record of response `id` on `host`, when the
/// retrieval's answer shows it ended.
fn settle(state: &ProxyState, host: &str, id: &str, parsed: ParsedUsage) {
    if parsed.response_status.is_none() {
        debug!(
            host,
            "a retrieval of a background response the agent waits for showed no status (not JSON, over 16 MiB, or not decodable): it waits on"
        );
    }
    if parsed.unfinished()
        || parsed.response_status.is_none()
        || parsed.response_id.as_deref().is_some_and(|r| r != id)
    {
        return;
    }
    let Some(parked) = state.parked.take(&parked_key(host, id)) else {
        return;
    };
    debug!("a background response ended: its record is written");
    parked.settle(parsed);
}

/// Whether a retrieval of `id` on `host` may settle a parked record.
pub(super) fn settles_something(state: &ProxyState, host: &str, id: &str) -> bool {
    state.parked.contains(&parked_key(host, id))
}

/// A retrieval is read only when it may settle a parked record; any other
/// is forwarded unread, costing nothing, as a model list is.
fn read_retrieval_only_if_it_settles(state: &ProxyState, host: &str, info: &mut RequestInfo) {
    if info
        .retrieves
        .as_deref()
        .is_some_and(|id| !settles_something(state, host, id))
    {
        info.metered = false;
        info.retrieves = None;
    }
}

/// Writes the records parked longer than [`super::parked::PARK_FOR`].
pub(super) fn expire_parked(state: &ProxyState, now: Instant) {
    for p in state.parked.expired(now) {
        p.unobserved();
    }
}

/// Writes every parked record and closes the table (the agent is
/// stopping): a background response that would park later is written at
/// once.
pub(super) fn unpark_all(state: &ProxyState) {
    let all = state.parked.close();
    if !all.is_empty() {
        tracing::info!(
            responses = all.len(),
            "background responses whose result was not seen are recorded, estimated"
        );
    }
    for p in all {
        p.unobserved();
    }
}

/// The response body on its way to the client: every chunk is handed to
/// the adapter's parser as it passes; the record is emitted exactly once,
/// when the body ends, fails, or the client hangs up (then a stream is cut
/// upstream, and the rest of any other answer is read, bounded, to get the
/// provider's count).
struct MeteredBody {
    inner: Option<UpstreamBody>,
    parser: Option<Box<dyn UsageParser>>,
    /// Undoes what the agent added to the request (see `BodyFilter`).
    filter: Option<Box<dyn BodyFilter>>,
    draft: Option<Draft>,
    /// Trailers that came while the filter held bytes back: sent after
    /// those (nothing may follow trailers).
    trailers: Option<Frame<Bytes>>,
}

impl MeteredBody {
    fn finish(&mut self, error: Option<String>) {
        if let (Some(mut p), Some(d)) = (self.parser.take(), self.draft.take()) {
            d.emit(p.finish(), error);
        }
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(t)));
        }
        loop {
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Some(data) = frame.data_ref() else {
                        // Trailers end the body: what the filter holds
                        // goes first.
                        if let Some(mut f) = this.filter.take() {
                            let mut out = Vec::new();
                            f.finish(&mut out);
                            if !out.is_empty() {
                                this.trailers = Some(frame);
                                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                            }
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    if let Some(d) = this.draft.as_mut()
                        && d.ttfb_ms.is_none()
                        && !data.is_empty()
                    {
                        d.ttfb_ms = Some(d.started.elapsed().as_millis() as u64);
                    }
                    if let Some(p) = this.parser.as_mut() {
                        p.feed(data);
                        if let Some(d) = this.draft.as_mut() {
                            d.release_body_once_counted(p.as_ref());
                        }
                    }
                    // hyper stops polling a body whose length is used up, so
                    // the end is seen here, not as a `None` from the next poll
                    // (which would come only as a drop).
                    let ended = this.inner.as_ref().is_some_and(|b| b.is_end_stream());
                    if ended {
                        this.inner = None;
                        this.finish(None);
                    }
                    let Some(f) = this.filter.as_mut() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let mut out = Vec::new();
                    f.filter(data, &mut out);
                    if ended && let Some(mut f) = this.filter.take() {
                        f.finish(&mut out);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                    // Everything was held back or removed: read on (or end).
                }
                Poll::Ready(Some(Err(e))) => {
                    this.inner = None;
                    this.finish(Some("upstream_body_error".into()));
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.inner = None;
                    this.finish(None);
                    if let Some(mut f) = this.filter.take() {
                        let mut out = Vec::new();
                        f.finish(&mut out);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.trailers.is_some() {
            return false;
        }
        match &self.inner {
            None => self.filter.is_none(),
            // A filter may still hold bytes back: only the next poll knows.
            Some(_) if self.filter.is_some() => false,
            Some(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.filter.is_some() {
            return http_body::SizeHint::default();
        }
        self.inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        let (Some(mut inner), Some(mut parser), Some(mut draft)) =
            (self.inner.take(), self.parser.take(), self.draft.take())
        else {
            return;
        };
        // The client went away (or the agent is stopping) before the end
        // of an answer that is not a stream: keep reading upstream so the
        // record gets the provider's own count (such an answer comes in
        // one piece, with its counts, at its end).
        let state = draft.ctx.state.clone();
        // A background stream goes on at the provider whatever the client
        // does, and the client resumes it with a retrieval: its record
        // parks now (with the id the stream named), for that retrieval to
        // settle, instead of after a drain the retrieval would not wait for.
        // A Managed Agents event stream (a live tail, usually left when the
        // session goes idle) shows cumulative counts: what it did not show
        // the next call will; nothing to read on for.
        // Batch results are read on once they showed a result that bills
        // (any other file is not worth the provider's bytes).
        let read_on = !(draft.info.background
            || (draft.info.sessions.is_some() && draft.info.streaming)
            || (draft.info.batch.is_some() && !parser.usage_seen()));
        if tokio::runtime::Handle::try_current().is_err()
            || state.stopping.is_cancelled()
            || !read_on
        {
            draft.emit(parser.finish(), Some(hangup_error(&state).into()));
            return;
        }
        if draft.info.streaming {
            // What has already arrived is read first: a stream the client
            // left at its very end (after `[DONE]`) was not cut short.
            let mut ended = false;
            for _ in 0..READY_FRAMES_AT_HANGUP {
                match futures_util::FutureExt::now_or_never(inner.frame()) {
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    Some(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            parser.feed(d);
                        }
                        if inner.is_end_stream() {
                            ended = true;
                            break;
                        }
                        if parser.generation_over() {
                            break;
                        }
                    }
                    // Nothing more yet, or the upstream failed.
                    Some(Some(Err(_))) | None => break,
                }
            }
            if ended {
                draft.emit(parser.finish(), None);
                return;
            }
            if !parser.generation_over() {
                // A stream the client left is cut upstream, here: the
                // provider sees the client go, as it would have without
                // the agent, and stops generating. (Read on, it would
                // generate, and bill, the rest of an answer nobody reads.)
                // The record keeps what the provider counted so far and
                // estimates what streamed.
                debug!(
                    host = draft.ctx.provider.host.as_str(),
                    "the client left a stream before its end: cut upstream"
                );
                drop(inner);
                draft.emit(parser.finish(), Some(hangup_error(&state).into()));
                return;
            }
            // Its generation is over (the client left at the finish, before
            // the usage chunk): reading on costs the provider nothing, and
            // gives its count.
        }
        debug!(
            host = draft.ctx.provider.host.as_str(),
            "the client left before the response ended: reading the rest for the provider's count"
        );
        draft.release_body_once_counted(parser.as_ref());
        // A stream left after its generation was over had its whole answer:
        // what follows (the counts, the end) is no loss, and no error.
        let whole = parser.generation_over();
        state.background.clone().spawn(async move {
            let mut read = 0usize;
            let deadline = tokio::time::Instant::now() + DRAIN_AFTER_HANGUP;
            // hyper drops a body it has read to its Content-Length without
            // polling it to the end: that is not a hang-up. Only a body
            // that still had data when the client left is one.
            let mut error = None;
            loop {
                let frame = tokio::select! {
                    biased;
                    _ = state.stopping.cancelled() => {
                        error = Some("agent_stopped".to_string());
                        break;
                    }
                    f = tokio::time::timeout_at(deadline, inner.frame()) => f,
                };
                match frame {
                    Ok(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            if !d.is_empty() && !whole {
                                error = Some("client_disconnected".to_string());
                            }
                            read += d.len();
                            parser.feed(d);
                            draft.release_body_once_counted(parser.as_ref());
                            if read > DRAIN_MAX_BYTES {
                                error = Some("client_disconnected_drain_limit".into());
                                break;
                            }
                        }
                    }
                    Ok(Some(Err(_))) => {
                        error = Some("client_disconnected_upstream_error".into());
                        break;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        error = Some("client_disconnected_drain_timeout".into());
                        break;
                    }
                }
            }
            draft.emit(parser.finish(), error);
        });
    }
}

/// Why a response ended early when it cannot be read on.
fn hangup_error(state: &ProxyState) -> &'static str {
    if state.stopping.is_cancelled() {
        "agent_stopped"
    } else {
        "client_disconnected"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::tests::Kept as Keep;

    /// A large body's read leaves the worker free: on a runtime with one
    /// thread, the read waits for a task of that runtime to run, which it
    /// could not if the read held the thread (it gives up after 30 s and
    /// says so, rather than hang). A small body is read in place.
    #[test]
    fn a_large_body_is_read_off_the_worker_a_small_one_in_place() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let neighbour = tokio::spawn(async move {
                tokio::task::yield_now().await;
                tx.send(()).unwrap();
            });
            let saw = aside(true, move || {
                rx.recv_timeout(Duration::from_secs(30)).is_ok()
            })
            .await;
            assert_eq!(saw, Some(true), "the worker ran nothing while the read ran");
            neighbour.await.unwrap();
            let worker = std::thread::current().id();
            let here = aside(false, move || std::thread::current().id()).await;
            assert_eq!(here, Some(worker));
            let there = aside(true, move || std::thread::current().id()).await;
            assert_ne!(there, Some(worker));
        });
    }

    /// At most [`ASIDE_AT_ONCE`] large reads run at once, also when their
    /// callers went away (a client that hung up) while they ran.
    #[test]
    fn large_reads_run_a_few_at_once_even_when_their_callers_left() {
        use std::sync::atomic::AtomicUsize;
        static NOW: AtomicUsize = AtomicUsize::new(0);
        static PEAK: AtomicUsize = AtomicUsize::new(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let reads: Vec<_> = (0..6)
                .map(|_| {
                    tokio::spawn(aside(true, || {
                        let n = NOW.fetch_add(1, Ordering::SeqCst) + 1;
                        PEAK.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(200));
                        NOW.fetch_sub(1, Ordering::SeqCst);
                    }))
                })
                .collect();
            // The callers of the first reads (slots are granted in turn)
            // leave once those have begun; the others wait on.
            while NOW.load(Ordering::SeqCst) < ASIDE_AT_ONCE {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut reads = reads.into_iter();
            for r in reads.by_ref().take(ASIDE_AT_ONCE) {
                r.abort();
            }
            for r in reads {
                r.await.expect("a read that waited ran");
            }
            while NOW.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let peak = PEAK.load(Ordering::SeqCst);
        assert_eq!(peak, ASIDE_AT_ONCE, "{peak} at once");
    }

    /// A read that panics on its thread panics in the caller, as it would
    /// have in place (a connection's task ends; nothing is left waiting).
    #[test]
    #[should_panic(expected = "a read that failed")]
    fn a_panic_in_a_read_aside_reaches_the_caller() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(aside(true, || -> () { panic!("a read that failed") }));
    }

    struct NoOrigins;
    impl super::super::OriginSource for NoOrigins {
        fn origin(&self, _: std::net::SocketAddr, _: std::net::SocketAddr) -> Option<ConnOrigin> {
            None
        }
        fn forget(&self, _: &ConnOrigin) {}
    }

    /// A meter of a Responses API WebSocket on api.openai.com, and what it
    /// records.
    fn ws_meter() -> (WsMeter, Arc<Keep>, tempfile::TempDir) {
        let (ctx, keep, dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        (
            WsMeter::new(ctx, "/v1/responses".into(), WsApi::Responses, None),
            keep,
            dir,
        )
    }

    /// A connection's context for `host` of `api`, and what it records.
    /// A GET of batch results at `path` through `ctx`, answered `body`,
    /// as the handler meters it: claimed, parsed and recorded, `error`
    /// as the handler would give it. False when the read is forwarded
    /// unread (counted whole before; nothing recorded).
    fn read_batch(
        ctx: &Arc<ConnCtx>,
        api: crate::config::ApiKind,
        path: &str,
        body: &[u8],
        error: Option<String>,
    ) -> bool {
        let adapter = crate::providers::adapter_for(api);
        let mut d =
            WsMeter::new(ctx.clone(), path.into(), WsApi::Responses, None).draft(None, None);
        d.info = adapter.request(&crate::providers::testing::request("GET", path, b""));
        claim_batch_results(
            &ctx.state,
            &ctx.provider.host,
            &http::HeaderMap::new(),
            &mut d.info,
        );
        if d.info.batch.is_none() {
            assert!(!d.info.metered);
            // (As the handler's draft of an unmetered request is.)
            d.emitted = true;
            return false;
        }
        d.status = 200;
        let mut p = adapter.response_parser(&d.info, 200, &http::HeaderMap::new());
        p.feed(body);
        d.emit(p.finish(), error);
        true
    }

    fn test_ctx(
        host: &str,
        api: crate::config::ApiKind,
    ) -> (Arc<ConnCtx>, Arc<Keep>, tempfile::TempDir) {
        test_ctx_after(host, api, &[])
    }

    /// As [`test_ctx`], on an agent started after a ledger whose batch
    /// results rows are `batches_read` (host, path).
    fn test_ctx_after(
        host: &str,
        api: crate::config::ApiKind,
        batches_read: &[(String, String)],
    ) -> (Arc<ConnCtx>, Arc<Keep>, tempfile::TempDir) {
        test_ctx_with(host, api, batches_read, None)
    }

    /// As [`test_ctx_after`], with `prices` instead of the built-in ones.
    fn test_ctx_with(
        host: &str,
        api: crate::config::ApiKind,
        batches_read: &[(String, String)],
        prices: Option<crate::meter::pricing::PriceBook>,
    ) -> (Arc<ConnCtx>, Arc<Keep>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = crate::ca::LocalCa::load_or_create(dir.path(), &[host.to_owned()]).unwrap();
        let keep = Arc::new(Keep::default());
        let state = ProxyState::new(
            Arc::new(NoOrigins),
            Arc::new(ca),
            super::super::upstream::Upstream::new(None).unwrap(),
            if batches_read.is_empty() {
                Vec::new()
            } else {
                crate::providers::catalogue::provider_hosts(&crate::config::Config::default())
            },
            crate::attribution::Attributor::new("/proc".into()),
            keep.clone(),
            1 << 20,
        );
        let state = match prices {
            Some(p) => state.with_prices(Arc::new(p)),
            None => state,
        };
        state.batches_read(batches_read);
        let state = Arc::new(state);
        let ctx = Arc::new(ConnCtx {
            state,
            origin: ConnOrigin {
                tgid: 1,
                pid: 1,
                uid: 0,
                gid: 0,
                cgroup_id: 1,
                comm: "codex".into(),
                dst: "127.0.0.1:443".parse().unwrap(),
                cookie: 1,
                connected_boot_ns: 0,
            },
            who: Arc::new(Attribution::default()),
            provider: ProviderHost {
                host: host.into(),
                api,
                refuses_stream_options: false,
            },
        });
        (ctx, keep, dir)
    }

    /// `ctx`'s connection, as another job's (`job` is its name).
    fn another_job(ctx: &Arc<ConnCtx>, job: &str) -> Arc<ConnCtx> {
        Arc::new(ConnCtx {
            state: ctx.state.clone(),
            origin: ctx.origin.clone(),
            who: Arc::new(Attribution {
                job: Some(job.into()),
                ..Default::default()
            }),
            provider: ctx.provider.clone(),
        })
    }

    /// The record of a POST of `body` to `path` on `host` (of `api`),
    /// answered 200 with `answer` of content type `ct`, as the handler
    /// reads and records it.
    fn answered(
        host: &str,
        api: crate::config::ApiKind,
        path: &str,
        body: &[u8],
        ct: &str,
        answer: &[u8],
    ) -> Arc<UsageRecord> {
        answered_priced(None, host, api, path, body, ct, answer)
    }

    /// As [`answered`], priced by `prices` instead of the built-in book.
    fn answered_priced(
        prices: Option<crate::meter::pricing::PriceBook>,
        host: &str,
        api: crate::config::ApiKind,
        path: &str,
        body: &[u8],
        ct: &str,
        answer: &[u8],
    ) -> Arc<UsageRecord> {
        let (ctx, keep, _dir) = test_ctx_with(host, api, &[], prices);
        let mut d =
            WsMeter::new(ctx.clone(), path.into(), WsApi::Responses, None).draft(None, Some(body));
        d.info = adapter_for(api).request(&crate::providers::testing::request("POST", path, body));
        let adapter = adapter_for(d.info.format(api));
        d.status = 200;
        let mut headers = http::HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        let mut p = adapter.response_parser(&d.info, 200, &headers);
        p.feed(answer);
        d.record(p.finish(), None);
        keep.0.lock().unwrap().pop().expect("a record")
    }

    /// An agent loop's usual turn is a tool call: streamed without usage
    /// (an Azure api-version before 2024-09-01 gets no `include_usage`),
    /// its arguments are the output estimated; ended by the provider's
    /// error after them, it is no refusal before any output, so the input
    /// the provider read is estimated too.
    /// Azure serves the deployment the path names whatever model the body
    /// names (LangChain sends both): a deployment priced under
    /// `azure-openai` is priced so, as the README says.
    #[test]
    fn an_azure_deployments_price_wins_over_the_model_the_body_names() {
        use crate::config::ApiKind;
        let cfg: crate::meter::pricing::PricingConfig = toml::from_str(
            "[[models]]\nprovider = \"azure-openai\"\nmodel = \"prod-eu\"\ninput = 9.0\noutput = 9.0\n",
        )
        .unwrap();
        let r = answered_priced(
            Some(crate::meter::pricing::PriceBook::new(&cfg)),
            "acme.openai.azure.com",
            ApiKind::AzureOpenai,
            "/openai/deployments/prod-eu/chat/completions",
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            "application/json",
            br#"{"model":"gpt-4o-2024-11-20","choices":[],"usage":{"prompt_tokens":1000000,"completion_tokens":0,"total_tokens":1000000}}"#,
        );
        assert_eq!(r.model.as_deref(), Some("gpt-4o"), "the model asked for");
        assert_eq!(r.cost_usd, Some(9.0), "{r:?}");
        // An unpriced deployment, and no model in the answer: the body's
        // model still prices it.
        let r = answered(
            "acme.openai.azure.com",
            ApiKind::AzureOpenai,
            "/openai/deployments/prod-eu/chat/completions",
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
            "application/json",
            br#"{"choices":[],"usage":{"prompt_tokens":1000000,"completion_tokens":0,"total_tokens":1000000}}"#,
        );
        assert!(r.cost_usd.is_some_and(|c| c > 0.0), "{r:?}");
    }

    /// A batch submission and a file upload bill nothing themselves: a
    /// cost of 0 (a total over them stays whole), not an unknown one.
    #[test]
    fn a_batch_submission_and_a_file_upload_cost_nothing() {
        use crate::config::ApiKind;
        let batch = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/batches",
            br#"{"input_file_id":"file-abc","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
            "application/json",
            br#"{"id":"batch_abc","object":"batch","status":"validating"}"#,
        );
        assert_eq!(batch.operation, "batch");
        assert_eq!(batch.cost_usd, Some(0.0), "{batch:?}");
        let upload = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/files",
            b"--x\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--x--\r\n",
            "application/json",
            br#"{"id":"file-abc","object":"file","purpose":"batch"}"#,
        );
        assert_eq!(upload.operation, "file_upload");
        assert_eq!(upload.cost_usd, Some(0.0), "{upload:?}");
        // An image, priced by something else than tokens: unknown still.
        let image = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/images/generations",
            br#"{"model":"dall-e-3","prompt":"a lighthouse"}"#,
            "application/json",
            br#"{"created":1,"data":[{"url":"https://x/y.png"}]}"#,
        );
        assert_eq!(image.cost_usd, None, "{image:?}");
        // Nor estimated from its prompt: no tokens are billed.
        assert!(!image.estimated, "{image:?}");
        assert_eq!(
            (image.usage.input_tokens, image.usage.output_tokens),
            (0, 0)
        );
    }

    /// GPT image models and token-billed transcriptions report their
    /// usage; it is read (it had been thrown away with the model), and
    /// speech, which reports none, is not estimated from its text.
    #[test]
    fn image_and_audio_usage_is_read_and_never_estimated() {
        use crate::config::ApiKind;
        let image = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/images/generations",
            br#"{"model":"gpt-image-1","prompt":"a lighthouse at dusk","size":"1024x1024"}"#,
            "application/json",
            br#"{"created":1,"data":[{"b64_json":"iVBORw0KGgo="}],"usage":{"input_tokens":50,"output_tokens":4160,"total_tokens":4210,"input_tokens_details":{"text_tokens":50,"image_tokens":0}}}"#,
        );
        assert_eq!(image.operation, "image");
        assert_eq!(image.model.as_deref(), Some("gpt-image-1"));
        assert_eq!(
            (image.usage.input_tokens, image.usage.output_tokens),
            (50, 4160)
        );
        assert!(!image.estimated, "{image:?}");
        let stream = concat!(
            "event: image_generation.partial_image\n",
            "data: {\"type\":\"image_generation.partial_image\",\"b64_json\":\"iVBORw0KGgo=\",\"partial_image_index\":0}\n\n",
            "event: image_generation.completed\n",
            "data: {\"type\":\"image_generation.completed\",\"b64_json\":\"iVBORw0KGgo=\",\"usage\":{\"input_tokens\":20,\"output_tokens\":272,\"total_tokens\":292}}\n\n",
        );
        let streamed = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/images/generations",
            br#"{"model":"gpt-image-1","prompt":"a lighthouse","stream":true,"partial_images":1}"#,
            "text/event-stream",
            stream.as_bytes(),
        );
        assert_eq!(
            (streamed.usage.input_tokens, streamed.usage.output_tokens),
            (20, 272),
            "{streamed:?}"
        );
        let transcription = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/audio/transcriptions",
            b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--b--\r\n",
            "application/json",
            br#"{"text":"Hello.","usage":{"type":"tokens","input_tokens":14,"input_token_details":{"text_tokens":0,"audio_tokens":14},"output_tokens":45,"total_tokens":59}}"#,
        );
        assert_eq!(transcription.operation, "audio");
        assert_eq!(
            transcription.model.as_deref(),
            Some("gpt-4o-transcribe"),
            "the form's model field"
        );
        assert_eq!(
            (
                transcription.usage.input_tokens,
                transcription.usage.output_tokens
            ),
            (14, 45)
        );
        let speech = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/audio/speech",
            br#"{"model":"gpt-4o-mini-tts","input":"The build is green.","voice":"alloy"}"#,
            "audio/mpeg",
            b"\xff\xfb\x90\x64\x00\x00",
        );
        assert_eq!(speech.model.as_deref(), Some("gpt-4o-mini-tts"));
        assert!(!speech.estimated, "{speech:?}");
        assert_eq!(speech.error, None);
        // Models that report no token usage: no tokens, and no error.
        let dalle = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/images/generations",
            br#"{"model":"dall-e-3","prompt":"a lighthouse"}"#,
            "application/json",
            br#"{"created":1,"data":[{"url":"https://x/y.png","revised_prompt":"A \"usage\": lighthouse"}]}"#,
        );
        assert_eq!(dalle.error, None, "{dalle:?}");
        assert_eq!(
            (dalle.usage.input_tokens, dalle.usage.output_tokens),
            (0, 0)
        );
        let whisper = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/audio/translations",
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\r\nID3\r\n--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b--\r\n",
            "application/json",
            br#"{"text":"Hello.","usage":{"type":"duration","seconds":9}}"#,
        );
        assert_eq!(whisper.error, None, "{whisper:?}");
        assert_eq!(
            whisper.model.as_deref(),
            Some("whisper-1"),
            "after the file"
        );
        assert_eq!(whisper.usage.input_tokens, 0);
        // A large image's answer: its usage follows 17 MiB of base64,
        // past any body the agent holds.
        let mut big = br#"{"created":1,"data":[{"b64_json":""#.to_vec();
        big.resize(big.len() + (17 << 20), b'A');
        big.extend_from_slice(
            br#""}],"usage":{"input_tokens":60,"output_tokens":6240,"total_tokens":6300},"quality":"high"}"#,
        );
        let large = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/images/generations",
            br#"{"model":"gpt-image-1","prompt":"a lighthouse","quality":"high"}"#,
            "application/json",
            &big,
        );
        assert_eq!(
            (large.usage.input_tokens, large.usage.output_tokens),
            (60, 6240),
            "{:?}",
            large.error
        );
        assert_eq!(
            (speech.usage.input_tokens, speech.usage.output_tokens),
            (0, 0)
        );
    }

    #[test]
    fn a_tool_call_stream_without_usage_has_its_output_estimated() {
        use crate::config::ApiKind;
        let body = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Run the failing test file and read its log."}]}"#;
        let call = "data: {\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"run_shell\",\"arguments\":\"{\\\"cmd\\\":\\\"cargo test --workspace 2>&1 | tail -n 200\\\"}\"}}]},\"finish_reason\":null}]}\n\n";
        let end = "data: {\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n";
        let r = answered(
            "myres.openai.azure.com",
            ApiKind::AzureOpenai,
            "/openai/deployments/gpt-4o/chat/completions",
            body,
            "text/event-stream",
            format!("{call}{end}").as_bytes(),
        );
        assert!(r.estimated, "{r:?}");
        assert!(r.usage.output_tokens >= 10, "{:?}", r.usage);
        assert_eq!(r.error, None);

        let failed = "data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";
        let r = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/chat/completions",
            body,
            "text/event-stream",
            format!("{call}{failed}").as_bytes(),
        );
        assert_eq!(r.error.as_deref(), Some("server_error"));
        assert!(r.estimated, "{r:?}");
        assert!(r.usage.input_tokens > 5, "{:?}", r.usage);
        assert!(r.usage.output_tokens >= 10, "{:?}", r.usage);
    }

    #[test]
    fn another_apis_format_on_a_providers_host_is_read_as_that_apis() {
        use crate::config::ApiKind;
        // Gemini's OpenAI-compatible endpoint: no usage in the stream (none
        // is asked for there), so the input is estimated from the body,
        // read as OpenAI's.
        let body = br#"{"model":"gemini-2.5-flash","stream":true,"messages":[{"role":"user","content":"Why is the sky blue on a clear afternoon? Answer in one paragraph."}]}"#;
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"Rayleigh scattering.\"}}],\"model\":\"gemini-2.5-flash\"}\n\ndata: [DONE]\n\n";
        let r = answered(
            "generativelanguage.googleapis.com",
            ApiKind::Gemini,
            "/v1beta/openai/chat/completions",
            body,
            "text/event-stream",
            sse,
        );
        assert_eq!(
            (r.provider.as_str(), r.operation.as_str()),
            ("gemini", "chat")
        );
        assert!(r.estimated, "{r:?}");
        assert!(r.usage.input_tokens > 10, "{:?}", r.usage);
        assert!(r.usage.output_tokens > 0, "{:?}", r.usage);
        assert!(r.cost_usd.is_some_and(|c| c > 0.0), "{r:?}");

        // Anthropic's OpenAI SDK compatibility layer: OpenAI's format,
        // Anthropic's name and prices; usage is asked for upstream.
        let body = br#"{"model":"claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let mut info = adapter_for(ApiKind::Anthropic).request(
            &crate::providers::testing::request("POST", "/v1/chat/completions", body),
        );
        assert_eq!(info.wire, Some(ApiKind::Openai));
        let rewritten = adapter_for(info.format(ApiKind::Anthropic))
            .rewrite_request(&mut info, body)
            .expect("stream_options added");
        assert!(info.injected_usage);
        assert!(
            std::str::from_utf8(&rewritten)
                .unwrap()
                .contains(r#""include_usage":true"#),
            "{rewritten:?}"
        );
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}],\"model\":\"claude-sonnet-4-5\"}\n\n\
                    data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1200,\"completion_tokens\":40,\"total_tokens\":1240}}\n\ndata: [DONE]\n\n";
        let r = answered(
            "api.anthropic.com",
            ApiKind::Anthropic,
            "/v1/chat/completions",
            body,
            "text/event-stream",
            sse,
        );
        assert_eq!(
            (r.provider.as_str(), r.operation.as_str()),
            ("anthropic", "chat")
        );
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (1200, 40));
        assert!(!r.estimated);
        assert!(r.cost_usd.is_some_and(|c| c > 0.0), "{r:?}");

        // DeepSeek's Anthropic-compatible `/anthropic` on its OpenAI host:
        // Anthropic's events, recorded as the host's provider.
        let body = br#"{"model":"deepseek-chat","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let sse = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"deepseek-chat\",\"usage\":{\"input_tokens\":5000,\"output_tokens\":1}}}\n\n\
                    event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
                    event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":800}}\n\n\
                    event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let r = answered(
            "api.deepseek.com",
            ApiKind::Openai,
            "/anthropic/v1/messages",
            body,
            "text/event-stream",
            sse,
        );
        assert_eq!(
            (r.provider.as_str(), r.operation.as_str()),
            ("openai", "chat")
        );
        assert_eq!(r.model.as_deref(), Some("deepseek-chat"));
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (5000, 800));
        assert!(!r.estimated);

        // Claude in Microsoft Foundry, on an Azure OpenAI resource's host:
        // Anthropic's, priced as Anthropic's (as on Bedrock and Vertex AI).
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let claude = String::from_utf8_lossy(sse).replace("deepseek-chat", "claude-sonnet-4-5");
        let r = answered(
            "myres.services.ai.azure.com",
            ApiKind::AzureOpenai,
            "/anthropic/v1/messages",
            body,
            "text/event-stream",
            claude.as_bytes(),
        );
        assert_eq!(
            (r.provider.as_str(), r.operation.as_str()),
            ("anthropic", "chat")
        );
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (5000, 800));
        assert!(r.cost_usd.is_some_and(|c| c > 0.0), "{r:?}");
    }

    #[test]
    fn a_stream_the_provider_ends_with_an_error_before_any_count_is_not_estimated() {
        use crate::config::ApiKind;
        let chat = br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Summarise the failing test log in three sentences, please."}]}"#;
        let messages = br#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"Summarise the failing test log in three sentences, please."}]}"#;
        let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"Summarise the failing test log in three sentences, please."}]}]}"#;
        /// Host, API, path, request body, answer, the error recorded.
        type Case<'a> = (&'a str, ApiKind, &'a str, &'a [u8], &'a [u8], &'a str);
        let cases: [Case<'_>; 4] = [
            (
                "api.anthropic.com",
                ApiKind::Anthropic,
                "/v1/messages",
                messages,
                b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
                "overloaded_error",
            ),
            (
                "api.openai.com",
                ApiKind::Openai,
                "/v1/chat/completions",
                chat,
                b"data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"code\":null}}\n\n",
                "server_error",
            ),
            (
                "api.openai.com",
                ApiKind::Openai,
                "/v1/responses",
                br#"{"model":"gpt-4o-mini","stream":true,"input":"Summarise the failing test log in three sentences, please."}"#,
                b"event: error\ndata: {\"type\":\"error\",\"code\":\"ERR_SOMETHING\",\"message\":\"Something went wrong\",\"param\":null,\"sequence_number\":1}\n\n",
                "ERR_SOMETHING",
            ),
            (
                "generativelanguage.googleapis.com",
                ApiKind::Gemini,
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                gemini,
                b"data: {\"error\":{\"code\":503,\"message\":\"The model is overloaded.\",\"status\":\"UNAVAILABLE\"}}\n\n",
                "UNAVAILABLE",
            ),
        ];
        for (host, api, path, body, answer, error) in cases {
            let r = answered(host, api, path, body, "text/event-stream", answer);
            assert_eq!(r.error.as_deref(), Some(error), "{path}: {r:?}");
            assert!(!r.estimated, "{path}: {r:?}");
            assert_eq!(r.usage, crate::meter::Usage::default(), "{path}");
            assert!(r.cost_usd.is_none_or(|c| c == 0.0), "{path}: {r:?}");
        }
        // The same request cut by the client with nothing streamed is
        // still estimated: only the provider's own error refuses it.
        let r = answered(
            "api.openai.com",
            ApiKind::Openai,
            "/v1/chat/completions",
            chat,
            "text/event-stream",
            b"",
        );
        assert!(r.estimated && r.usage.input_tokens > 10, "{r:?}");
    }

    /// The record of an answered Anthropic request of 100,000 input tokens
    /// to `model` on `ctx`'s host, with `uplift_percent` from the response.
    fn anthropic_record(
        ctx: &Arc<ConnCtx>,
        keep: &Keep,
        model: &str,
        uplift_percent: u32,
    ) -> Arc<UsageRecord> {
        let mut d = WsMeter::new(ctx.clone(), "/v1/messages".into(), WsApi::Responses, None)
            .draft(Some(model.into()), None);
        d.info.api = Some(crate::config::ApiKind::Anthropic);
        d.status = 200;
        let usage = crate::meter::Usage {
            input_tokens: 100_000,
            ..Default::default()
        };
        let parsed = ParsedUsage {
            usage: Some(usage),
            uplift_percent,
            ..Default::default()
        };
        d.record(parsed, None);
        keep.0.lock().unwrap().pop().expect("a record")
    }

    /// A background Responses API request on `ctx` (answered `queued`
    /// as `resp_id`), and a retrieval of it showing `status`.
    fn background_post(ctx: &Arc<ConnCtx>, id: &str) {
        background_answered(ctx, answer(id, "queued", None));
    }

    fn background_answered(ctx: &Arc<ConnCtx>, answer: ParsedUsage) {
        background_draft(ctx).emit(answer, None);
    }

    /// The record of a background Responses API request on `ctx`,
    /// answered 200.
    fn background_draft(ctx: &Arc<ConnCtx>) -> Draft {
        let body = br#"{"model":"gpt-4o-mini","input":"write a long story about otters","background":true}"#;
        let mut d = WsMeter::new(ctx.clone(), "/v1/responses".into(), WsApi::Responses, None)
            .draft(Some("gpt-4o-mini".into()), Some(body));
        d.method = "POST".into();
        d.info.background = true;
        d.info.streaming = false;
        d.status = 200;
        d
    }

    /// A retrieval of `answer`'s response, as `handle` lets it through:
    /// read only when it may settle a parked record.
    fn retrieve(ctx: &Arc<ConnCtx>, answer: ParsedUsage) {
        let id = answer.response_id.clone().unwrap();
        let mut info = RequestInfo {
            operation: "responses",
            metered: true,
            retrieves: Some(id),
            ..Default::default()
        };
        read_retrieval_only_if_it_settles(&ctx.state, &ctx.provider.host, &mut info);
        if !info.metered {
            assert_eq!(info.retrieves, None);
            return;
        }
        let mut d = WsMeter::new(
            ctx.clone(),
            "/v1/responses/x".into(),
            WsApi::Responses,
            None,
        )
        .draft(None, None);
        d.info = info;
        d.status = 200;
        d.emit(answer, None);
    }

    fn answer(id: &str, status: &str, usage: Option<(u64, u64)>) -> ParsedUsage {
        ParsedUsage {
            response_id: Some(id.into()),
            response_status: Some(status.into()),
            response_model: Some("gpt-4o-mini-2024-07-18".into()),
            usage: usage.map(|(i, o)| crate::meter::Usage {
                input_tokens: i,
                output_tokens: o,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A background response is one row, written when a retrieval shows
    /// it ended, with the provider's counts; polls before and after write
    /// nothing.
    #[test]
    fn a_background_response_is_recorded_once_when_its_end_is_seen() {
        let (ctx, keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        background_post(&ctx, "resp_1");
        assert!(rows(&keep).is_empty(), "parked, not written");
        assert_eq!(ctx.state.snapshot().background_waiting, 1);
        retrieve(&ctx, answer("resp_1", "in_progress", None));
        retrieve(&ctx, answer("resp_other", "completed", Some((5, 5))));
        assert!(rows(&keep).is_empty(), "still running; another's end");
        retrieve(&ctx, answer("resp_1", "completed", Some((1200, 3400))));
        let got = rows(&keep);
        assert_eq!(got.len(), 1, "{got:?}");
        let r = &got[0];
        assert_eq!((r.1, r.2, r.5, r.4.as_deref()), (1200, 3400, false, None));
        let rec = keep.0.lock().unwrap()[0].clone();
        assert_eq!((rec.method.as_str(), rec.status), ("POST", 200));
        assert!(rec.cost_usd.is_some_and(|c| c > 0.0));
        retrieve(&ctx, answer("resp_1", "completed", Some((1200, 3400))));
        assert_eq!(rows(&keep).len(), 1, "a later poll writes nothing");
        assert!(ctx.state.parked.is_empty());
        assert!(!settles_something(&ctx.state, "api.openai.com", "resp_1"));
        // Only the host that answered can settle it.
        background_post(&ctx, "resp_2");
        assert!(settles_something(&ctx.state, "api.openai.com", "resp_2"));
        assert!(!settles_something(&ctx.state, "api.x.ai", "resp_2"));
        // A retrieval whose answer names another response settles nothing.
        let mut d = WsMeter::new(
            ctx.clone(),
            "/v1/responses/x".into(),
            WsApi::Responses,
            None,
        )
        .draft(None, None);
        d.info.retrieves = Some("resp_2".into());
        d.status = 200;
        d.emit(answer("resp_3", "completed", Some((1, 1))), None);
        assert_eq!(rows(&keep).len(), 1);
        // Zeroed counts while queued are not the end.
        background_answered(&ctx, answer("resp_4", "queued", Some((0, 0))));
        assert_eq!(rows(&keep).len(), 1, "parked");
        assert_eq!(ctx.state.parked.len(), 2);
    }

    /// A background stream that parked with text, settled by a cancel
    /// that shows more text and no counts: its output is estimated from
    /// both parts, the first counted when it parked.
    #[test]
    fn both_parts_of_a_resumed_streams_text_are_estimated() {
        let (ctx, keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        let first = "the first part of the story, streamed before the client left";
        let later = "and the rest of it, shown by the retrieval that cancelled it";
        let mut parked = answer("resp_s", "in_progress", None);
        parked.output_text = first.into();
        background_answered(&ctx, parked);
        assert!(rows(&keep).is_empty());
        let mut cancelled = answer("resp_s", "cancelled", None);
        cancelled.output_text = later.into();
        retrieve(&ctx, cancelled);
        let got = rows(&keep);
        assert_eq!(got.len(), 1);
        let n = |t: &str| estimate::estimate_output(Some("gpt-4o-mini"), t);
        assert_eq!(got[0].2, n(first) + n(later), "{got:?}");
        assert!(got[0].5);
    }

    /// A background answer's record is parked by the time its last bytes
    /// are handed on to the job (before the body's end is polled), so no
    /// poll the job makes once it has the answer can come first.
    #[tokio::test]
    async fn a_background_answer_parks_before_its_last_bytes_go_on() {
        use http_body_util::BodyExt;
        let (ctx, keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        let answer = r#"{"id":"resp_q","object":"response","status":"queued","model":"gpt-4o-mini","output":[],"usage":null}"#;
        // A provider on one end of a pipe, the agent's upstream side on the
        // other: a real hyper body with a Content-Length.
        let (agent_io, provider_io) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| async move {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(answer)))
                        .unwrap(),
                )
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(provider_io), svc)
                .await;
        });
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            hyper_util::rt::TokioIo::new(agent_io),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let resp = send
            .send_request(
                Request::post("/v1/responses")
                    .header("host", "api.openai.com")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = super::super::upstream::UpstreamBody::for_test(body);
        let draft = background_draft(&ctx);
        let parser = adapter_for(crate::config::ApiKind::Openai).response_parser(
            &draft.info,
            200,
            &parts.headers,
        );
        let mut metered = MeteredBody {
            inner: Some(body),
            parser: Some(parser),
            filter: None,
            draft: Some(draft),
            trailers: None,
        };
        let mut got = Vec::new();
        while let Some(frame) = metered.frame().await {
            let frame = frame.unwrap();
            if let Some(d) = frame.data_ref() {
                got.extend_from_slice(d);
                if got.len() == answer.len() {
                    // The job has the whole answer: the record waits already.
                    assert_eq!(ctx.state.parked.len(), 1, "parked by now");
                }
            }
        }
        assert_eq!(got, answer.as_bytes());
        assert_eq!(ctx.state.parked.len(), 1);
        assert!(rows(&keep).is_empty());
    }

    /// A streaming answer from a provider on the other end of a pipe, sent
    /// as the test sends its events on the returned channel (dropping it
    /// ends the answer), read through a `MeteredBody` of a chat request on
    /// `ctx`'s host with `api`'s adapter; `cut` says when the provider saw
    /// its answer dropped (its connection went).
    async fn metered_stream(
        ctx: &Arc<ConnCtx>,
        api: crate::config::ApiKind,
    ) -> (
        MeteredBody,
        tokio::sync::mpsc::Sender<Bytes>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let (frames, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(16);
        let (tx, mut events) = tokio::sync::mpsc::channel::<Bytes>(16);
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if frames.send(Frame::data(e)).await.is_err() {
                    return;
                }
            }
        });
        let (body, cut) = metered_frames(ctx, api, rx, false).await;
        (body, tx, cut)
    }

    /// As [`metered_stream`], sent as frames (trailers too); `injected`:
    /// as the agent had added `include_usage` (its filter undoes it).
    async fn metered_frames(
        ctx: &Arc<ConnCtx>,
        api: crate::config::ApiKind,
        mut rx: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
        injected: bool,
    ) -> (MeteredBody, tokio::sync::oneshot::Receiver<()>) {
        let (cut_tx, cut) = tokio::sync::oneshot::channel();
        let (agent_io, provider_io) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let events = futures_util::stream::poll_fn(move |cx| {
                rx.poll_recv(cx)
                    .map(|f| f.map(Ok::<_, std::convert::Infallible>))
            });
            let body = Arc::new(std::sync::Mutex::new(Some(events)));
            let svc = hyper::service::service_fn(move |_req| {
                let events = body.lock().unwrap().take().expect("one request");
                async move {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "text/event-stream")
                            // (HTTP/1.1 sends only trailers declared.)
                            .header("trailer", "x-trailer")
                            .body(http_body_util::StreamBody::new(events))
                            .unwrap(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(provider_io), svc)
                .await;
            let _ = cut_tx.send(());
        });
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            hyper_util::rt::TokioIo::new(agent_io),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let (path, body): (&str, &[u8]) = match api {
            crate::config::ApiKind::Anthropic => (
                "/v1/messages",
                br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"tell me a long story about otters"}]}"#,
            ),
            _ => (
                "/v1/chat/completions",
                br#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"tell me a long story about otters"}]}"#,
            ),
        };
        let resp = send
            .send_request(
                Request::post(path)
                    .header("host", ctx.provider.host.as_str())
                    .header("te", "trailers")
                    .body(Full::new(Bytes::from_static(body)))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, upstream) = resp.into_parts();
        let mut d =
            WsMeter::new(ctx.clone(), path.into(), WsApi::Responses, None).draft(None, Some(body));
        d.info = adapter_for(api).request(&crate::providers::testing::request("POST", path, body));
        assert!(d.info.streaming);
        d.method = "POST".into();
        d.status = 200;
        let parser = adapter_for(api).response_parser(&d.info, 200, &parts.headers);
        d.info.injected_usage = injected;
        let filter = adapter_for(api).response_filter(&d.info);
        let metered = MeteredBody {
            inner: Some(super::super::upstream::UpstreamBody::for_test(upstream)),
            parser: Some(parser),
            filter,
            draft: Some(d),
            trailers: None,
        };
        (metered, cut)
    }

    /// Trailers that come while the usage filter holds the last event
    /// back (it had no blank line after it) go after that event: nothing
    /// the job is owed is left behind them.
    #[tokio::test]
    async fn trailers_wait_for_what_the_filter_holds() {
        use http_body_util::BodyExt;
        let (ctx, _keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (mut body, _cut) = metered_frames(&ctx, crate::config::ApiKind::Openai, rx, true).await;
        let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Once\"}}]}\n\n";
        let last = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"the end\"}}]}";
        for f in [
            Frame::data(Bytes::from_static(first.as_bytes())),
            Frame::data(Bytes::from_static(last.as_bytes())),
            Frame::trailers({
                let mut t = http::HeaderMap::new();
                t.insert("x-trailer", http::HeaderValue::from_static("1"));
                t
            }),
        ] {
            tx.send(f).await.unwrap();
        }
        drop(tx);
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(f) = tokio::time::timeout(Duration::from_secs(30), body.frame())
            .await
            .expect("the answer ends")
        {
            let f = f.unwrap();
            assert!(trailers.is_none(), "a frame after the trailers: {f:?}");
            match f.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(f) => trailers = Some(f.into_trailers().expect("trailers")),
            }
        }
        assert_eq!(String::from_utf8(data).unwrap(), format!("{first}{last}"));
        assert_eq!(trailers.expect("trailers")["x-trailer"], "1");
    }

    /// Reads `body` until what came ends with `end` (the events the test
    /// sent), as a client does before it leaves.
    async fn read_until(body: &mut MeteredBody, end: &[u8]) {
        use http_body_util::BodyExt;
        let mut got = Vec::new();
        while !got.ends_with(end) {
            let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
                .await
                .expect("the events the provider sent")
                .expect("not the end")
                .unwrap();
            got.extend_from_slice(frame.data_ref().expect("data"));
        }
    }

    /// The record `keep` gets, once it has one (a read-on writes it later).
    async fn one_record(keep: &Keep) -> Row {
        for _ in 0..3000 {
            let got = rows(keep);
            if !got.is_empty() {
                assert_eq!(got.len(), 1, "{got:?}");
                return got[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no record in 30 s");
    }

    const OPENAI_EVENTS: [&str; 4] = [
        "data: {\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Once upon a time, an otter named Pebble lived by the river\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":21,\"completion_tokens\":250,\"total_tokens\":271}}\n\n",
        "data: [DONE]\n\n",
    ];

    /// A client that leaves a stream mid-generation: the stream is cut
    /// upstream at once (the provider sees its connection go, as it would
    /// without the agent), and the record is `client_disconnected`,
    /// estimated from what streamed.
    #[tokio::test]
    async fn a_stream_left_mid_generation_is_cut_upstream() {
        let (ctx, keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        let (mut body, tx, cut) = metered_stream(&ctx, crate::config::ApiKind::Openai).await;
        tx.send(Bytes::from_static(OPENAI_EVENTS[0].as_bytes()))
            .await
            .unwrap();
        read_until(&mut body, OPENAI_EVENTS[0].as_bytes()).await;
        drop(body);
        tokio::time::timeout(Duration::from_secs(30), cut)
            .await
            .expect("the provider sees the stream cut")
            .unwrap();
        let (model, input, output, _, error, estimated) = one_record(&keep).await;
        assert_eq!(model, "gpt-4o-mini");
        assert_eq!(error.as_deref(), Some("client_disconnected"));
        assert!(estimated);
        assert!(input > 0 && output > 0 && output < 250, "{input} {output}");
    }

    /// A client that leaves at the `finish_reason`, before the usage chunk:
    /// the generation is over, so the rest is read on and the record has
    /// the provider's count and no error (the client had the whole
    /// answer); the provider is not cut.
    #[tokio::test]
    async fn a_stream_left_at_its_finish_is_read_on_for_the_count() {
        let (ctx, keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        let (mut body, tx, _cut) = metered_stream(&ctx, crate::config::ApiKind::Openai).await;
        for e in &OPENAI_EVENTS[..2] {
            tx.send(Bytes::from_static(e.as_bytes())).await.unwrap();
        }
        read_until(&mut body, OPENAI_EVENTS[1].as_bytes()).await;
        drop(body);
        for e in &OPENAI_EVENTS[2..] {
            // (Read on, not cut: the record below shows it.)
            tx.send(Bytes::from_static(e.as_bytes())).await.unwrap();
        }
        drop(tx);
        let (_, input, output, _, error, estimated) = one_record(&keep).await;
        assert_eq!((input, output, estimated), (21, 250, false));
        assert_eq!(error, None);
    }

    /// A client that leaves an Anthropic stream after its `message_delta`
    /// (the stop reason and final counts) but before `message_stop` and the
    /// end: nothing is cut short, so the record has no error and the
    /// provider's count.
    #[tokio::test]
    async fn a_stream_left_after_its_last_count_is_not_an_error() {
        let (ctx, keep, _dir) = test_ctx("api.anthropic.com", crate::config::ApiKind::Anthropic);
        let (mut body, tx, _cut) = metered_stream(&ctx, crate::config::ApiKind::Anthropic).await;
        let events = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5-20250929\",\"usage\":{\"input_tokens\":40,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Pebble the otter\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":300}}\n\n",
        ];
        for e in events {
            tx.send(Bytes::from_static(e.as_bytes())).await.unwrap();
        }
        read_until(&mut body, events[2].as_bytes()).await;
        drop(body);
        tx.send(Bytes::from_static(
            b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ))
        .await
        .unwrap();
        // (Read on, not cut: the record below shows it.)
        drop(tx);
        let (_, input, output, _, error, estimated) = one_record(&keep).await;
        assert_eq!((input, output, estimated), (40, 300, false));
        assert_eq!(error, None);
    }

    /// A Managed Agents call writes one row per session that grew since
    /// the last call that showed it, with the growth; a first sight by id
    /// is a baseline; repeated polls write nothing; a session created
    /// through the agent is its creator's, whoever's call shows it.
    #[test]
    fn managed_agents_sessions_are_rows_of_their_growth() {
        use crate::providers::{SessionSnapshot, SessionsCall};
        let (ctx, keep, _dir) = test_ctx("api.anthropic.com", crate::config::ApiKind::Anthropic);
        let other = another_job(&ctx, "lister");
        let show =
            |by: &Arc<ConnCtx>, call: SessionsCall, snaps: &[(&str, Option<&str>, u64, u64)]| {
                let mut d = WsMeter::new(by.clone(), "/v1/sessions".into(), WsApi::Responses, None)
                    .draft(None, None);
                d.info = crate::providers::managed_agents::call(&http::Method::GET, "/v1/sessions")
                    .unwrap();
                d.info.sessions = call.clone();
                d.status = 200;
                let sessions = snaps
                    .iter()
                    .map(|(id, model, i, o)| SessionSnapshot {
                        id: id.to_string(),
                        model: model.map(str::to_string),
                        usage: crate::meter::Usage {
                            input_tokens: *i,
                            output_tokens: *o,
                            ..Default::default()
                        },
                        seen_by: call.clone(),
                        ..Default::default()
                    })
                    .collect();
                d.emit(
                    ParsedUsage {
                        sessions,
                        ..Default::default()
                    },
                    None,
                );
            };
        let of = |id: &str| SessionsCall::Of(id.into());
        show(
            &ctx,
            SessionsCall::Create,
            &[("sesn_a", Some("claude-opus-4-6"), 0, 0)],
        );
        show(&ctx, of("sesn_b"), &[("sesn_b", None, 5000, 100)]);
        assert!(rows(&keep).is_empty(), "baselines");
        show(&ctx, of("sesn_a"), &[("sesn_a", None, 1000, 200)]);
        show(&ctx, of("sesn_a"), &[("sesn_a", None, 1000, 200)]);
        // Another job lists the workspace: the creator's session moves and
        // is the creator's; a session the agent does not follow is not.
        show(
            &other,
            SessionsCall::List,
            &[("sesn_a", None, 3000, 300), ("sesn_x", None, 77, 7)],
        );
        show(&ctx, of("sesn_b"), &[("sesn_b", None, 5600, 150)]);
        let got = rows(&keep);
        assert_eq!(
            got,
            [
                ("claude-opus-4-6".to_string(), 1000, 200, 200, None, false),
                ("claude-opus-4-6".to_string(), 2000, 100, 200, None, false),
                (String::new(), 600, 50, 200, None, false),
            ]
        );
        let recs = keep.0.lock().unwrap().clone();
        assert_eq!(
            (recs[0].operation.as_str(), recs[0].provider.as_str()),
            ("agent_session", "anthropic")
        );
        assert!(
            Arc::ptr_eq(&recs[1].who, &ctx.who),
            "the creator's, not the lister's"
        );
        // Opus 4.6: $5 / $25 per million.
        assert!(
            recs[0].cost_usd.is_some_and(|c| (c - 0.01).abs() < 1e-9),
            "{:?}",
            recs[0]
        );
    }

    /// Batch results are rows per model at the batch rates, by the job
    /// that read them; a second read counts only lines the first did not
    /// reach, a third nothing.
    #[test]
    fn batch_results_are_rows_per_model_and_each_line_counts_once() {
        let (ctx, keep, _dir) = test_ctx("api.anthropic.com", crate::config::ApiKind::Anthropic);
        let line = |model: &str, input: u64, output: u64| {
            format!(
                r#"{{"custom_id":"x","result":{{"type":"succeeded","message":{{"model":"{model}","usage":{{"input_tokens":{input},"output_tokens":{output}}}}}}}}}"#
            )
        };
        let body = [
            line("claude-sonnet-4-5", 100_000, 0),
            line("claude-haiku-4-5", 100, 10),
            line("claude-sonnet-4-5", 0, 1_000_000),
            line("claude-sonnet-4-5", 7, 3),
        ]
        .join("\n");
        let path = "/v1/messages/batches/msgbatch_1/results";
        // Reads `upto` bytes of the results (all when `None`).
        let read = |upto: Option<usize>| {
            let error = upto.map(|_| "client_disconnected".to_string());
            let cut = &body.as_bytes()[..upto.unwrap_or(body.len())];
            assert!(read_batch(
                &ctx,
                crate::config::ApiKind::Anthropic,
                path,
                cut,
                error
            ));
        };
        // Cut inside the second line: only the first is whole.
        read(Some(body.find('\n').unwrap() + 20));
        assert_eq!(
            rows(&keep),
            [(
                "claude-sonnet-4-5".to_string(),
                100_000,
                0,
                200,
                None,
                false
            )]
        );
        read(None);
        read(None);
        let got = rows(&keep);
        assert_eq!(
            got[1..],
            [
                ("claude-haiku-4-5".to_string(), 100, 10, 200, None, false),
                (
                    "claude-sonnet-4-5".to_string(),
                    7,
                    1_000_003,
                    200,
                    None,
                    false
                ),
            ]
        );
        let recs = keep.0.lock().unwrap().clone();
        assert!(recs.iter().all(|r| r.operation == "batch_results"
            && r.service_tier.as_deref() == Some("batch")
            && Arc::ptr_eq(&r.who, &ctx.who)));
        // Sonnet 4.5: $3 / $15 per million, half in a batch.
        assert!(
            recs[0].cost_usd.is_some_and(|c| (c - 0.15).abs() < 1e-9),
            "{:?}",
            recs[0].cost_usd
        );
        assert!(
            recs[2]
                .cost_usd
                .is_some_and(|c| (c - (7.0 * 3.0 + 1_000_003.0 * 15.0) / 2e6).abs() < 1e-9),
            "{:?}",
            recs[2].cost_usd
        );
        // Nothing in flight, nothing estimated.
        assert!(recs.iter().all(|r| !r.estimated));
    }

    /// A batch's requests are priced one by one where the rates depend on
    /// the prompt's size: two prompts of 150k tokens are not one of 300k.
    #[test]
    fn batch_results_get_long_context_rates_only_for_long_prompts() {
        let (ctx, keep, _dir) = test_ctx("api.anthropic.com", crate::config::ApiKind::Anthropic);
        let line = |input: u64| {
            format!(
                r#"{{"custom_id":"x","result":{{"type":"succeeded","message":{{"model":"claude-sonnet-4-5","usage":{{"input_tokens":{input},"output_tokens":1000}}}}}}}}"#
            )
        };
        let body = [line(150_000), line(150_000), line(250_000)].join("\n");
        let path = "/v1/messages/batches/msgbatch_long/results";
        assert!(read_batch(
            &ctx,
            crate::config::ApiKind::Anthropic,
            path,
            body.as_bytes(),
            None
        ));
        let recs = keep.0.lock().unwrap().clone();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].usage.input_tokens, 550_000);
        // Sonnet 4.5: $3 / $15 per million, above 200k $6 / $22.50; half
        // in a batch.
        let want = (300_000.0 * 3.0 + 2_000.0 * 15.0 + 250_000.0 * 6.0 + 1_000.0 * 22.5) / 2e6;
        assert!(
            recs[0].cost_usd.is_some_and(|c| (c - want).abs() < 1e-9),
            "{:?} against {want}",
            recs[0].cost_usd
        );
    }

    /// A finished Gemini batch, its responses inlined, is read once: its
    /// later polls are forwarded unread.
    #[test]
    fn a_gemini_batch_read_whole_is_not_read_again() {
        let (ctx, keep, _dir) = test_ctx(
            "generativelanguage.googleapis.com",
            crate::config::ApiKind::Gemini,
        );
        let path = "/v1beta/batches/abc123";
        let done = include_bytes!("../providers/fixtures/gemini/batch_inlined.json");
        let poll = || read_batch(&ctx, crate::config::ApiKind::Gemini, path, done, None);
        assert!(poll(), "the first poll is read");
        assert!(!poll(), "later ones are not");
        assert_eq!(rows(&keep).len(), 1);
    }

    /// A ranged read of batch results (a part, from anywhere) is
    /// forwarded unread.
    #[test]
    fn a_ranged_read_of_batch_results_is_not_metered() {
        let (ctx, _keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        let path = "/v1/files/file-1/content";
        let mut info = crate::providers::adapter_for(crate::config::ApiKind::Openai)
            .request(&crate::providers::testing::request("GET", path, b""));
        let mut headers = http::HeaderMap::new();
        headers.insert(header::RANGE, http::HeaderValue::from_static("bytes=100-"));
        claim_batch_results(&ctx.state, "api.openai.com", &headers, &mut info);
        assert!(info.batch.is_none() && !info.metered);
    }

    /// Batch results the ledger shows were read before the agent started
    /// count nothing when read again; others count as ever.
    #[test]
    fn batch_results_read_before_a_restart_count_nothing_after_it() {
        let read_before = [
            (
                "api.anthropic.com".to_string(),
                "/v1/messages/batches/msgbatch_old/results".to_string(),
            ),
            (
                "api.openai.com".to_string(),
                "/v1/files/file-old/content".to_string(),
            ),
            (
                "generativelanguage.googleapis.com".to_string(),
                "/v1beta/batches/old".to_string(),
            ),
            // Not batch results, not a provider: nothing.
            (
                "api.openai.com".to_string(),
                "/v1/chat/completions".to_string(),
            ),
            ("example.com".to_string(), "/v1/files/f/content".to_string()),
        ];
        let (ctx, keep, _dir) = test_ctx_after(
            "api.anthropic.com",
            crate::config::ApiKind::Anthropic,
            &read_before,
        );
        assert_eq!(ctx.state.batches.len(), 3);
        let body = r#"{"custom_id":"x","result":{"type":"succeeded","message":{"model":"claude-haiku-4-5","usage":{"input_tokens":5,"output_tokens":6}}}}"#;
        for (id, counted_whole) in [("msgbatch_old", true), ("msgbatch_new", false)] {
            let path = format!("/v1/messages/batches/{id}/results");
            let read = read_batch(
                &ctx,
                crate::config::ApiKind::Anthropic,
                &path,
                body.as_bytes(),
                None,
            );
            // Counted whole: forwarded unread.
            assert_eq!(read, !counted_whole, "{id}");
        }
        assert_eq!(
            rows(&keep),
            [("claude-haiku-4-5".to_string(), 5, 6, 200, None, false)],
            "only the batch not read before"
        );
    }

    /// OpenAI Evals runs: each model's growth is a row, the run creator's;
    /// a grader first seen after the run was followed counts from zero; a
    /// run first seen by its id is a baseline, its models too.
    #[test]
    fn evals_runs_are_rows_of_each_models_growth() {
        let (ctx, keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        let poller = another_job(&ctx, "poller");
        let adapter = crate::providers::adapter_for(crate::config::ApiKind::Openai);
        let show = |by: &Arc<ConnCtx>, method: &str, path: &str, run: &str, usage: &str| {
            let mut d =
                WsMeter::new(by.clone(), path.into(), WsApi::Responses, None).draft(None, None);
            d.info = adapter.request(&crate::providers::testing::request(method, path, b"{}"));
            d.status = 200;
            let body = format!(
                r#"{{"object":"eval.run","id":"{run}","status":"in_progress","per_model_usage":{usage}}}"#
            );
            let mut p = adapter.response_parser(&d.info, 200, &http::HeaderMap::new());
            p.feed(body.as_bytes());
            d.emit(p.finish(), None);
        };
        let m = |model: &str, i: u64, o: u64| {
            format!(
                r#"{{"model_name":"{model}","prompt_tokens":{i},"completion_tokens":{o},"cached_tokens":0}}"#
            )
        };
        show(&ctx, "POST", "/v1/evals/eval_1/runs", "evalrun_a", "null");
        let of_a = "/v1/evals/eval_1/runs/evalrun_a";
        show(
            &poller,
            "GET",
            of_a,
            "evalrun_a",
            &format!("[{}]", m("gpt-4o-mini", 100, 20)),
        );
        show(
            &ctx,
            "GET",
            of_a,
            "evalrun_a",
            &format!("[{},{}]", m("gpt-4o-mini", 200, 40), m("o3-mini", 300, 50)),
        );
        show(
            &ctx,
            "GET",
            of_a,
            "evalrun_a",
            &format!("[{},{}]", m("gpt-4o-mini", 200, 40), m("o3-mini", 300, 50)),
        );
        // Created elsewhere (or before the agent started): a baseline.
        let of_b = "/v1/evals/eval_1/runs/evalrun_b";
        show(
            &poller,
            "GET",
            of_b,
            "evalrun_b",
            &format!("[{}]", m("gpt-4o", 1000, 100)),
        );
        show(
            &poller,
            "GET",
            of_b,
            "evalrun_b",
            &format!("[{}]", m("gpt-4o", 1500, 150)),
        );
        let got = rows(&keep);
        assert_eq!(
            got,
            [
                ("gpt-4o-mini".to_string(), 100, 20, 200, None, false),
                ("gpt-4o-mini".to_string(), 100, 20, 200, None, false),
                ("o3-mini".to_string(), 300, 50, 200, None, false),
                ("gpt-4o".to_string(), 500, 50, 200, None, false),
            ]
        );
        let recs = keep.0.lock().unwrap().clone();
        assert!(
            recs.iter()
                .all(|r| r.operation == "eval_run" && r.provider == "openai")
        );
        assert!(
            recs[..3].iter().all(|r| Arc::ptr_eq(&r.who, &ctx.who)),
            "the creator's, whoever polled"
        );
        assert_eq!(recs[3].who.job.as_deref(), Some("poller"));
        assert!(recs.iter().all(|r| r.cost_usd.is_some_and(|c| c > 0.0)));
    }

    /// Once the agent stops, a background response is written at once (a
    /// stream cut at the end of the drain parks no record that nobody
    /// would write); unseen ones are timed as the request itself, not as
    /// their wait.
    #[test]
    fn after_the_stop_nothing_parks_and_unseen_rows_keep_the_requests_duration() {
        let (ctx, keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        background_post(&ctx, "resp_a");
        // As if it had waited ten hours.
        ctx.state
            .parked
            .update(&parked_key("api.openai.com", "resp_a"), |p| {
                p.draft.started -= Duration::from_secs(36_000);
            });
        super::expire_parked(
            &ctx.state,
            Instant::now() + super::super::parked::PARK_FOR + Duration::from_secs(1),
        );
        let rec = keep.0.lock().unwrap()[0].clone();
        assert_eq!(rec.error.as_deref(), Some(BACKGROUND_UNOBSERVED));
        assert!(rec.duration_ms < 3_600_000, "{}", rec.duration_ms);
        background_post(&ctx, "resp_b");
        super::unpark_all(&ctx.state);
        assert_eq!(rows(&keep).len(), 2);
        background_post(&ctx, "resp_c");
        let got = rows(&keep);
        assert_eq!(got.len(), 3, "written at once: {got:?}");
        assert_eq!(got[2].4.as_deref(), Some(BACKGROUND_UNOBSERVED));
        assert!(got[2].5 && got[2].1 > 0, "estimated: {:?}", got[2]);
        assert!(ctx.state.parked.is_empty());
    }

    /// What is not seen to end is written estimated when it expires or the
    /// agent stops; a cancelled or failed one says so; a request that did
    /// not ask for the background is not parked.
    #[test]
    fn unseen_cancelled_and_failed_background_responses_are_written_as_such() {
        let (ctx, keep, _dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        for id in ["resp_a", "resp_b", "resp_c", "resp_d"] {
            background_post(&ctx, id);
        }
        retrieve(&ctx, answer("resp_a", "cancelled", None));
        let mut failed = answer("resp_b", "failed", Some((40, 0)));
        failed.error = Some("server_error".into());
        retrieve(&ctx, failed);
        super::expire_parked(&ctx.state, Instant::now());
        assert_eq!(rows(&keep).len(), 2, "not expired yet");
        super::expire_parked(
            &ctx.state,
            Instant::now() + super::super::parked::PARK_FOR + Duration::from_secs(1),
        );
        assert_eq!(rows(&keep).len(), 4, "both expired");
        assert!(ctx.state.parked.is_empty());
        background_post(&ctx, "resp_e");
        super::unpark_all(&ctx.state);
        let got = rows(&keep);
        assert_eq!(got.len(), 5);
        let errors: Vec<_> = got.iter().map(|r| r.4.as_deref()).collect();
        assert_eq!(
            errors,
            [
                Some("response_cancelled"),
                Some("server_error"),
                Some(BACKGROUND_UNOBSERVED),
                Some(BACKGROUND_UNOBSERVED),
                Some(BACKGROUND_UNOBSERVED),
            ]
        );
        // Without the provider's counts, the input is estimated from the
        // request body, counted when it was parked.
        for r in got
            .iter()
            .filter(|r| r.4.as_deref() != Some("server_error"))
        {
            assert!(r.5 && r.1 > 0, "{r:?}");
        }
        assert_eq!((got[1].1, got[1].5), (40, false));

        // Not asked for the background: written as it is.
        let mut d = WsMeter::new(ctx.clone(), "/v1/responses".into(), WsApi::Responses, None)
            .draft(None, None);
        d.status = 200;
        d.emit(answer("resp_f", "queued", None), None);
        assert_eq!(rows(&keep).len(), 6);
        assert!(ctx.state.parked.is_empty());
    }

    /// US-only inference (Anthropic's `inference_geo: "us"`) costs 1.1
    /// times the list price.
    #[test]
    fn where_a_request_ran_can_add_to_its_price() {
        let (ctx, keep, _dir) = test_ctx("api.anthropic.com", crate::config::ApiKind::Anthropic);
        let cost = |uplift| anthropic_record(&ctx, &keep, "claude-opus-4-6", uplift).cost_usd;
        assert!(cost(0).is_some_and(|c| (c - 0.5).abs() < 1e-9));
        assert!(cost(10).is_some_and(|c| (c - 0.55).abs() < 1e-9));
    }

    /// Bedrock's Anthropic Messages route is priced as Anthropic's, with
    /// the regional premium its native routes have (an in-region or
    /// geographic profile id, not `global.`).
    #[test]
    fn bedrocks_anthropic_route_pays_the_regional_premium() {
        let host = "bedrock-runtime.us-east-1.amazonaws.com";
        let (ctx, keep, _dir) = test_ctx(host, crate::config::ApiKind::Bedrock);
        let cost = |model: &str| {
            let r = anthropic_record(&ctx, &keep, model, 0);
            assert_eq!(r.provider, "anthropic");
            r.cost_usd.expect("priced")
        };
        let regional = cost("us.anthropic.claude-sonnet-4-5-20250929-v1:0");
        let global = cost("global.anthropic.claude-sonnet-4-5-20250929-v1:0");
        assert!((global - 0.3).abs() < 1e-9, "{global}");
        assert!((regional - 0.33).abs() < 1e-9, "{regional}");
    }

    /// A price the config gives for Bedrock applies to Bedrock's Anthropic
    /// route too, though the record says `anthropic`; without one, the
    /// route has Anthropic's price.
    #[test]
    fn bedrocks_own_prices_apply_to_its_anthropic_route() {
        let host = "bedrock-runtime.us-east-1.amazonaws.com";
        let model = "global.anthropic.claude-sonnet-4-5-20250929-v1:0";
        let cfg: crate::meter::pricing::PricingConfig = toml::from_str(&format!(
            "[[models]]\nprovider = \"bedrock\"\nmodel = \"{model}\"\ninput = 1.0\noutput = 1.0\n"
        ))
        .expect("pricing");
        cfg.validate().expect("valid");
        let prices = crate::meter::pricing::PriceBook::new(&cfg);
        let (ctx, keep, _dir) =
            test_ctx_with(host, crate::config::ApiKind::Bedrock, &[], Some(prices));
        let r = anthropic_record(&ctx, &keep, model, 0);
        assert_eq!(r.provider, "anthropic");
        let cost = r.cost_usd.expect("priced");
        assert!((cost - 0.1).abs() < 1e-9, "{cost}");
        // Another model of the route: Anthropic's price, as before.
        let other = anthropic_record(&ctx, &keep, "global.anthropic.claude-opus-4-6-v1", 0);
        let cost = other.cost_usd.expect("priced");
        assert!((cost - 0.5).abs() < 1e-9, "{cost}");
    }

    fn ws_text(json: serde_json::Value, mask: Option<[u8; 4]>) -> Vec<u8> {
        super::super::websocket::tests::frame(true, 0x1, json.to_string().as_bytes(), mask)
    }

    fn completed(id: &str, model: &str, input: u64, output: u64) -> serde_json::Value {
        serde_json::json!({"type": "response.completed", "response": {
            "id": id, "model": model, "status": "completed",
            "usage": {"input_tokens": input, "output_tokens": output}}})
    }

    /// One meter's records, as (model, input, output, status, error,
    /// estimated).
    type Row = (String, u64, u64, u16, Option<String>, bool);
    fn rows(keep: &Keep) -> Vec<Row> {
        keep.0
            .lock()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.model.clone().unwrap_or_default(),
                    r.usage.input_tokens,
                    r.usage.output_tokens,
                    r.status,
                    r.error.clone(),
                    r.estimated,
                )
            })
            .collect()
    }

    fn ws_create(model: &str, lane: Option<&str>) -> Vec<u8> {
        let mut ev = serde_json::json!({"type": "response.create", "model": model,
            "input": "summarise the quarterly report for the board in three lines"});
        if let Some(l) = lane {
            ev["stream_id"] = l.into();
        }
        ws_text(ev, Some([1, 2, 3, 4]))
    }

    fn ws_created(id: &str, model: &str, lane: Option<&str>) -> Vec<u8> {
        let mut ev =
            serde_json::json!({"type": "response.created", "response": {"id": id, "model": model}});
        if let Some(l) = lane {
            ev["stream_id"] = l.into();
        }
        ws_text(ev, None)
    }

    /// A meter of a Realtime API WebSocket on api.openai.com opened with
    /// `?model=` `url_model`, and what it records.
    fn rt_meter(url_model: Option<&str>) -> (WsMeter, Arc<Keep>, tempfile::TempDir) {
        let (ctx, keep, dir) = test_ctx("api.openai.com", crate::config::ApiKind::Openai);
        let meter = WsMeter::new(
            ctx,
            "/v1/realtime".into(),
            WsApi::Realtime,
            url_model.map(str::to_string),
        );
        (meter, keep, dir)
    }

    fn rt_done(id: &str, status: &str, usage: serde_json::Value) -> Vec<u8> {
        ws_text(
            serde_json::json!({"type": "response.done", "event_id": "event_9",
                "response": {"object": "realtime.response", "id": id, "status": status,
                    "output": [{"type": "message", "content": [
                        {"type": "output_audio", "transcript": "hello there"}]}],
                    "usage": usage}}),
            None,
        )
    }

    #[test]
    fn realtime_handshakes_are_told_apart_and_name_their_model() {
        use crate::config::ApiKind;
        let m = |api, path| metered_websocket(api, path);
        assert_eq!(m(ApiKind::Openai, "/v1/realtime"), Some(WsApi::Realtime));
        assert_eq!(m(ApiKind::Openai, "/v1/realtime/"), Some(WsApi::Realtime));
        assert_eq!(
            m(ApiKind::AzureOpenai, "/openai/realtime"),
            Some(WsApi::Realtime)
        );
        assert_eq!(
            m(ApiKind::AzureOpenai, "/openai/v1/realtime"),
            Some(WsApi::Realtime)
        );
        assert_eq!(m(ApiKind::Openai, "/v1/responses"), Some(WsApi::Responses));
        assert_eq!(m(ApiKind::Openai, "/v1/realtime/translations"), None);
        assert_eq!(m(ApiKind::Bedrock, "/openai/v1/realtime"), None);
        assert_eq!(m(ApiKind::AzureOpenai, "/voice-live/realtime"), None);
        assert_eq!(
            m(
                ApiKind::Gemini,
                "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
            ),
            Some(WsApi::GeminiLive)
        );
        assert_eq!(m(ApiKind::Anthropic, "/v1/realtime"), None);
        assert_eq!(
            realtime_model(Some("model=gpt-realtime-2.1")).as_deref(),
            Some("gpt-realtime-2.1")
        );
        assert_eq!(
            realtime_model(Some(
                "api-version=2024-10-01-preview&deployment=voice%20prod"
            ))
            .as_deref(),
            Some("voice prod")
        );
        assert_eq!(
            realtime_model(Some("deployment=d&model=gpt-realtime")).as_deref(),
            Some("gpt-realtime"),
            "model= first"
        );
        assert_eq!(realtime_model(Some("call_id=rtc_1&model=")), None);
        assert_eq!(realtime_model(None), None);
    }

    /// Every Realtime response is one record of the session's model with
    /// its `response.done` usage, text, audio and image tokens and their
    /// cache reads apart and priced at their own rates, whether the job
    /// asked for it or turn detection did; a cancelled one is billed and
    /// no error, a failed one is an error. The job's messages (audio) are
    /// never read, and an input transcription's usage is a record of the
    /// transcription model.
    #[test]
    fn each_realtime_response_is_one_record_with_its_audio_apart() {
        let (mut meter, keep, _dir) = rt_meter(Some("gpt-realtime"));
        // The job's audio and its ask: passed over, not read.
        let audio = "A".repeat(64 * 1024);
        let mut job = ws_text(
            serde_json::json!({"type": "input_audio_buffer.append", "audio": audio}),
            Some([9, 8, 7, 6]),
        );
        job.extend(ws_text(
            serde_json::json!({"type": "response.create"}),
            Some([1, 2, 3, 4]),
        ));
        meter.client_sent(&job);
        let mut provider = ws_text(
            serde_json::json!({"type": "session.created", "session": {"type": "realtime",
                "model": "gpt-realtime-2025-08-28",
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}}),
            None,
        );
        provider.extend(ws_text(
            serde_json::json!({"type": "response.created",
                "response": {"object": "realtime.response", "id": "resp_1", "status": "in_progress"}}),
            None,
        ));
        provider.extend(ws_text(
            serde_json::json!({"type": "response.output_audio.delta", "response_id": "resp_1",
                "delta": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA"}),
            None,
        ));
        provider.extend(ws_text(
            serde_json::json!({"type": "response.output_audio_transcript.delta",
                "response_id": "resp_1", "delta": "hello there"}),
            None,
        ));
        provider.extend(rt_done(
            "resp_1",
            "completed",
            serde_json::json!({"total_tokens": 1600, "input_tokens": 1000, "output_tokens": 600,
                "input_token_details": {"text_tokens": 200, "audio_tokens": 800, "image_tokens": 0,
                    "cached_tokens": 500,
                    "cached_tokens_details": {"text_tokens": 100, "audio_tokens": 400}},
                "output_token_details": {"text_tokens": 100, "audio_tokens": 500}}),
        ));
        // Turn detection starts one by itself, and the job interrupts it.
        provider.extend(ws_text(
            serde_json::json!({"type": "response.created", "response": {"id": "resp_2"}}),
            None,
        ));
        provider.extend(rt_done(
            "resp_2",
            "cancelled",
            serde_json::json!({"input_tokens": 300, "output_tokens": 20,
                "input_token_details": {"audio_tokens": 300},
                "output_token_details": {"audio_tokens": 20}}),
        ));
        provider.extend(ws_text(
            serde_json::json!({"type": "response.created", "response": {"id": "resp_3"}}),
            None,
        ));
        provider.extend(rt_done(
            "resp_3",
            "failed",
            serde_json::json!({"input_tokens": 0, "output_tokens": 0}),
        ));
        // Not billed, not a record: an error about a job's event.
        provider.extend(ws_text(
            serde_json::json!({"type": "error", "error": {"type": "invalid_request_error",
                "code": "invalid_value"}}),
            None,
        ));
        provider.extend(ws_text(
            serde_json::json!({"type": "conversation.item.input_audio_transcription.completed",
                "item_id": "item_1", "transcript": "hi",
                "usage": {"type": "tokens", "total_tokens": 30, "input_tokens": 25,
                    "input_token_details": {"text_tokens": 0, "audio_tokens": 25},
                    "output_tokens": 5}}),
            None,
        ));
        for piece in provider.chunks(7) {
            meter.provider_sent(piece);
        }
        drop(meter);
        assert_eq!(
            rows(&keep),
            vec![
                ("gpt-realtime".into(), 1000, 600, 200, None, false),
                ("gpt-realtime".into(), 300, 20, 200, None, false),
                (
                    "gpt-realtime".into(),
                    0,
                    0,
                    200,
                    Some("response_failed".into()),
                    false
                ),
                ("gpt-4o-transcribe".into(), 25, 5, 200, None, false),
            ]
        );
        let records = keep.0.lock().unwrap();
        let first = &records[0];
        assert_eq!(first.operation, "realtime");
        assert_eq!(
            first.response_model.as_deref(),
            Some("gpt-realtime-2025-08-28")
        );
        assert!(first.streaming);
        let u = &first.usage;
        assert_eq!(
            (
                u.cached_input_tokens,
                u.cached_audio_input_tokens,
                u.cached_image_input_tokens
            ),
            (500, 400, 0)
        );
        assert_eq!((u.audio_input_tokens, u.audio_output_tokens), (400, 500));
        // gpt-realtime: text 4 / 0.40 cached / 16, audio 32 / 0.40 / 64.
        let want = (100.0 * 4.0 + 400.0 * 32.0 + 500.0 * 0.40 + 100.0 * 16.0 + 500.0 * 64.0) / 1e6;
        let cost = first.cost_usd.unwrap();
        assert!((cost - want).abs() < 1e-9, "{cost} against {want}");
        assert!(first.ttfb_ms.is_some(), "timed to its first audio");
        assert_eq!(records[3].operation, "audio");
        assert_eq!(records[3].usage.audio_input_tokens, 25);
        assert!(records[3].cost_usd.is_some_and(|c| c > 0.0));
    }

    /// The handshake's model until the session names one; a response open
    /// when the socket ends is recorded with why, and never estimated
    /// from its transcript (its tokens are sound); a job that sends a
    /// Close ends the socket on its side.
    #[test]
    fn a_realtime_response_left_open_is_recorded_unestimated() {
        let (mut meter, keep, _dir) = rt_meter(Some("gpt-realtime-mini"));
        meter.provider_sent(&ws_text(
            serde_json::json!({"type": "response.created", "response": {"id": "resp_1"}}),
            None,
        ));
        meter.provider_sent(&ws_text(
            serde_json::json!({"type": "response.output_text.delta", "response_id": "resp_1",
                "delta": "a long answer that the job will never hear the end of"}),
            None,
        ));
        meter.client_sent(&super::super::websocket::tests::frame(
            true,
            0x8,
            b"",
            Some([1, 2, 3, 4]),
        ));
        assert!(meter.job_has_ended());
        drop(meter);
        assert_eq!(
            keep.0.lock().unwrap()[0].cost_usd,
            None,
            "unknown, not free"
        );
        assert_eq!(
            rows(&keep),
            vec![(
                "gpt-realtime-mini".into(),
                0,
                0,
                200,
                Some("client_disconnected".into()),
                false
            )]
        );
    }

    /// A transcription session (`?intent=transcription`) names its model
    /// in `transcription_session.*` events; a transcription billed by the
    /// second is a row with no tokens and no error, priced by its length.
    #[test]
    fn realtime_transcription_sessions_name_their_model() {
        let (mut meter, keep, _dir) = rt_meter(None);
        let mut provider = ws_text(
            serde_json::json!({"type": "transcription_session.updated", "session": {
                "input_audio_transcription": {"model": "gpt-4o-mini-transcribe"}}}),
            None,
        );
        let done = |usage: serde_json::Value| {
            ws_text(
                serde_json::json!({"type": "conversation.item.input_audio_transcription.completed",
                    "item_id": "item_1", "transcript": "hi", "usage": usage}),
                None,
            )
        };
        provider.extend(done(
            serde_json::json!({"type": "tokens", "input_tokens": 40,
            "input_token_details": {"audio_tokens": 40}, "output_tokens": 4}),
        ));
        provider.extend(ws_text(
            serde_json::json!({"type": "session.updated", "session": {
                "audio": {"input": {"transcription": {"model": "whisper-1"}}}}}),
            None,
        ));
        provider.extend(done(
            serde_json::json!({"type": "duration", "seconds": 2.5}),
        ));
        meter.provider_sent(&provider);
        drop(meter);
        assert_eq!(
            rows(&keep),
            vec![
                ("gpt-4o-mini-transcribe".into(), 40, 4, 200, None, false),
                ("whisper-1".into(), 0, 0, 200, None, false),
            ]
        );
        let records = keep.0.lock().unwrap();
        assert!(records[0].cost_usd.is_some_and(|c| c > 0.0));
        // whisper-1: $0.006 a minute.
        assert_eq!(records[1].usage.audio_duration_ms, 2500);
        let c = records[1].cost_usd.expect("priced by the minute");
        assert!((c - 2.5 / 60.0 * 0.006).abs() < 1e-12, "{c}");
        assert!(
            records
                .iter()
                .all(|r| r.operation == "audio" && !r.streaming)
        );
    }

    /// A meter of a Gemini Live socket on the Gemini API, and what it
    /// records.
    fn live_meter() -> (WsMeter, Arc<Keep>, tempfile::TempDir) {
        let (ctx, keep, dir) = test_ctx(
            "generativelanguage.googleapis.com",
            crate::config::ApiKind::Gemini,
        );
        let path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
        (
            WsMeter::new(ctx, path.into(), WsApi::GeminiLive, None),
            keep,
            dir,
        )
    }

    /// A binary frame of `json`, as Gemini sends its messages.
    fn ws_binary(json: serde_json::Value, mask: Option<[u8; 4]>) -> Vec<u8> {
        super::super::websocket::tests::frame(true, 0x2, json.to_string().as_bytes(), mask)
    }

    #[test]
    fn gemini_live_handshakes_and_setup_models_are_read() {
        use crate::config::ApiKind;
        let m = |path| metered_websocket(ApiKind::Gemini, path);
        for path in [
            "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
            "/ws/google.ai.generativelanguage.v1.GenerativeService.BidiGenerateContent",
            "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained",
            "/ws/google.cloud.aiplatform.v1beta1.LlmBidiService/BidiGenerateContent",
        ] {
            assert_eq!(m(path), Some(WsApi::GeminiLive), "{path}");
        }
        assert_eq!(
            m("/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
            None
        );
        assert_eq!(m("/v1/realtime"), None);
        let setup = |model: &str| {
            live_setup_model(
                serde_json::json!({"setup": {"model": model}})
                    .to_string()
                    .as_bytes(),
            )
        };
        assert_eq!(
            setup("models/gemini-3.8-live").as_deref(),
            Some("gemini-3.8-live")
        );
        assert_eq!(
            setup("projects/p/locations/us-central1/publishers/google/models/gemini-live-2.5-flash-native-audio")
                .as_deref(),
            Some("gemini-live-2.5-flash-native-audio")
        );
        assert_eq!(setup("gemini-3.8-live").as_deref(), Some("gemini-3.8-live"));
        assert_eq!(setup("models/"), None);
        // A setup too long to read whole: from its first bytes.
        assert_eq!(
            live_prefix_model(br#"{"setup": {"model": "models/gemini-3.8-live", "systemInstruction": {"parts": [{"text": "#)
                .as_deref(),
            Some("gemini-3.8-live")
        );
        assert_eq!(
            live_prefix_model(br#"{"setup": {"systemInstruction": "#),
            None
        );
        assert_eq!(
            live_prefix_model(br#"{"setup": {"model": "models/gemini-3"#),
            None
        );
        assert_eq!(live_setup_model(br#"{"clientContent":{}}"#), None);
        assert_eq!(live_setup_model(b"not json"), None);
    }

    /// Each Gemini Live turn is one record of the `setup`'s model with
    /// the usage that ends it (in the turn's last message or one of its
    /// own, `responseTokenCount` as the Gemini API names the output), a
    /// repeat of that usage is not counted twice, the job's audio is never
    /// read, and a turn open when the socket ends is recorded with why and
    /// no tokens.
    #[test]
    fn each_gemini_live_turn_is_one_record() {
        let (mut meter, keep, _dir) = live_meter();
        let mut job = ws_text(
            serde_json::json!({"setup": {"model": "models/gemini-3.8-live",
                "generationConfig": {"responseModalities": ["AUDIO"]}}}),
            Some([1, 2, 3, 4]),
        );
        job.extend(ws_text(
            serde_json::json!({"realtimeInput": {"audio": {"data": "A".repeat(40_000),
                "mimeType": "audio/pcm;rate=16000"}}}),
            Some([5, 6, 7, 8]),
        ));
        for piece in job.chunks(1000) {
            meter.client_sent(piece);
        }
        let usage = |prompt: u64, audio_in: u64, out: u64| {
            serde_json::json!({"promptTokenCount": prompt, "responseTokenCount": out,
                "totalTokenCount": prompt + out,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt - audio_in},
                    {"modality": "AUDIO", "tokenCount": audio_in}],
                "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": out}]})
        };
        let mut provider = ws_binary(serde_json::json!({"setupComplete": {}}), None);
        let audio_part = serde_json::json!({"serverContent": {"modelTurn": {"parts": [
            {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": "B".repeat(20_000)}}]}}});
        // Turn 1: usage with the turn's end.
        provider.extend(ws_binary(audio_part.clone(), None));
        provider.extend(ws_binary(
            serde_json::json!({"serverContent": {"turnComplete": true},
                "usageMetadata": usage(500, 300, 120)}),
            None,
        ));
        // Repeated on its own: not counted again.
        provider.extend(ws_binary(
            serde_json::json!({"usageMetadata": usage(500, 300, 120)}),
            None,
        ));
        // Turn 2: its end, then its usage in a message of its own.
        provider.extend(ws_binary(audio_part.clone(), None));
        provider.extend(ws_binary(
            serde_json::json!({"serverContent": {"outputTranscription": {"text": "yes"}}}),
            None,
        ));
        provider.extend(ws_binary(
            serde_json::json!({"serverContent": {"turnComplete": true}}),
            None,
        ));
        provider.extend(ws_binary(
            serde_json::json!({"usageMetadata": usage(700, 400, 90)}),
            None,
        ));
        // A transcription arriving after its turn's usage, and a usage with
        // no counts: neither opens nor ends a turn.
        provider.extend(ws_binary(
            serde_json::json!({"serverContent": {"outputTranscription": {"text": " late"}}}),
            None,
        ));
        provider.extend(ws_binary(
            serde_json::json!({"usageMetadata": {"trafficType": "ON_DEMAND"}}),
            None,
        ));
        // Turn 3: interrupted, and the socket ends before its usage.
        provider.extend(ws_binary(audio_part, None));
        provider.extend(ws_binary(
            serde_json::json!({"serverContent": {"interrupted": true}}),
            None,
        ));
        for piece in provider.chunks(4096) {
            meter.provider_sent(piece);
        }
        meter.job_ended();
        drop(meter);
        assert_eq!(
            rows(&keep),
            vec![
                ("gemini-3.8-live".into(), 500, 120, 200, None, false),
                ("gemini-3.8-live".into(), 700, 90, 200, None, false),
                (
                    "gemini-3.8-live".into(),
                    0,
                    0,
                    200,
                    Some("client_disconnected".into()),
                    false
                ),
            ]
        );
        let records = keep.0.lock().unwrap();
        let first = &records[0];
        assert_eq!(
            (first.operation.as_str(), first.provider.as_str()),
            ("live", "gemini")
        );
        assert_eq!(
            (
                first.usage.audio_input_tokens,
                first.usage.audio_output_tokens
            ),
            (300, 120)
        );
        assert_eq!(records[2].cost_usd, None, "unknown, not free");
        // gemini-3.8-live: text 0.75, audio 3 in; audio 12 out.
        let want = (200.0 * 0.75 + 300.0 * 3.0 + 120.0 * 12.0) / 1e6;
        let cost = first.cost_usd.expect("priced");
        assert!((cost - want).abs() < 1e-12, "{cost} against {want}");
    }

    /// Responses are told apart by id and paired with their requests by
    /// lane (`stream_id`): lanes answered out of order, interleaved
    /// responses, a successor the provider starts by itself (steering)
    /// are each one record with their own usage and the model asked for;
    /// an error event with no request waiting is not a record.
    #[test]
    fn each_response_on_a_websocket_is_one_record() {
        let (mut meter, keep, _dir) = ws_meter();
        let mut client = ws_create("gpt-5.4", Some("a"));
        client.extend(ws_create("gpt-6-sol", Some("b")));
        // Both asks in one piece, split across two reads.
        let (a, b) = client.split_at(7);
        meter.client_sent(a);
        meter.client_sent(b);
        // Lane b is answered first.
        let mut provider = ws_created("resp_b", "gpt-6-sol", Some("b"));
        provider.extend(ws_created("resp_a", "gpt-5.4-2026-03-05", Some("a")));
        provider.extend(ws_text(completed("resp_b", "gpt-6-sol", 20, 2), None));
        provider.extend(ws_text(
            completed("resp_a", "gpt-5.4-2026-03-05", 10, 1),
            None,
        ));
        // A successor nobody asked for, then an unrelated error event.
        provider.extend(ws_created("resp_c", "gpt-5.4-2026-03-05", Some("a")));
        provider.extend(ws_text(
            completed("resp_c", "gpt-5.4-2026-03-05", 30, 3),
            None,
        ));
        provider.extend(ws_text(
            serde_json::json!({"type": "error", "error": {"code": "rate_limit_exceeded"}}),
            None,
        ));
        for piece in provider.chunks(5) {
            meter.provider_sent(piece);
        }
        drop(meter);
        assert_eq!(
            rows(&keep),
            vec![
                ("gpt-6-sol".into(), 20, 2, 200, None, false),
                ("gpt-5.4".into(), 10, 1, 200, None, false),
                ("gpt-5.4-2026-03-05".into(), 30, 3, 200, None, false),
            ]
        );
        for r in keep.0.lock().unwrap().iter() {
            assert_eq!(r.operation, "responses");
            assert_eq!(r.provider, "openai");
            assert!(r.streaming);
            assert!(r.cost_usd.is_some_and(|c| c > 0.0), "{r:?}");
        }
    }

    /// An error event answers the lane's waiting request; an error while a
    /// response of the lane is under way is about that response, which
    /// still ends with its own event. A response the socket closes on (the
    /// job read what streamed and left) and a request never answered are
    /// recorded with why, estimated from the request and the text that
    /// streamed: never a free row.
    #[test]
    fn errors_pair_with_their_lane_and_what_is_open_at_the_end_is_estimated() {
        let (mut meter, keep, _dir) = ws_meter();
        meter.client_sent(&ws_create("bad-model", None));
        meter.provider_sent(&ws_text(
            serde_json::json!({"type": "error", "status": 404,
                "error": {"code": "model_not_found"}}),
            None,
        ));
        meter.client_sent(&ws_create("gpt-5.4", None));
        meter.provider_sent(&ws_created("resp_1", "gpt-5.4", None));
        // Pipelined behind it: the next request.
        meter.client_sent(&ws_create("gpt-6-sol", None));
        let mut provider = ws_text(
            serde_json::json!({"type": "error", "sequence_number": 4,
                "error": {"code": "server_error"}}),
            None,
        );
        for _ in 0..40 {
            provider.extend(ws_text(
                serde_json::json!({"type": "response.output_text.delta", "delta": "several words of answer "}),
                None,
            ));
        }
        meter.provider_sent(&provider);
        meter.client_sent(&super::super::websocket::tests::frame(
            true,
            0x8,
            b"",
            Some([9, 9, 9, 9]),
        ));
        drop(meter);
        let got = rows(&keep);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            got[0],
            (
                "bad-model".into(),
                0,
                0,
                404,
                Some("model_not_found".into()),
                false
            )
        );
        let (model, input, output, status, error, estimated) = &got[1];
        assert_eq!((model.as_str(), *status), ("gpt-5.4", 0));
        assert_eq!(error.as_deref(), Some("client_disconnected"));
        assert!(*estimated && *input > 5 && *output > 40, "{:?}", got[1]);
        let (model, input, _, _, error, estimated) = &got[2];
        assert_eq!(model, "gpt-6-sol");
        assert_eq!(error.as_deref(), Some("client_disconnected"));
        assert!(*estimated && *input > 5, "{:?}", got[2]);
        for r in keep.0.lock().unwrap().iter().skip(1) {
            assert!(r.cost_usd.is_some_and(|c| c > 0.0), "{r:?}");
        }
    }

    /// A provider that does not repeat the job's `stream_id` still pairs
    /// each response with its request (the oldest waiting); a pipelined
    /// request the provider rejects (an error with a status, not numbered
    /// in a response's stream) is its own row and shifts nothing; a
    /// message passed over unread is a request only if it says so; a last
    /// event too long to read ends its response, estimated.
    #[test]
    fn pairing_holds_without_lanes_echoed_and_with_rejected_or_unread_messages() {
        let (mut meter, keep, _dir) = ws_meter();
        meter.client_sent(&ws_create("gpt-5.4", Some("main")));
        meter.provider_sent(&ws_created("resp_1", "gpt-5.4", None));
        meter.client_sent(&ws_create("gpt-6-sol", Some("main")));
        meter.provider_sent(&ws_text(
            serde_json::json!({"type": "error", "status": 429,
                "error": {"code": "rate_limit_exceeded"}}),
            None,
        ));
        meter.provider_sent(&ws_text(completed("resp_1", "gpt-5.4", 10, 1), None));
        // An unread job message that is no request (a large steer).
        let steer = format!(
            "{{\"type\":\"response.steer\",\"input\":\"{}\"}}",
            "x".repeat(2 << 20)
        );
        let limit = super::super::websocket::MAX_MESSAGE.min(1 << 20);
        assert!(steer.len() > limit);
        meter.client_sent(&super::super::websocket::tests::frame(
            true,
            0x1,
            steer.as_bytes(),
            Some([3, 1, 4, 1]),
        ));
        // A response whose last event is too long to read.
        meter.client_sent(&ws_create("gpt-5.4", None));
        meter.provider_sent(&ws_created("resp_2", "gpt-5.4", None));
        let huge = format!(
            "{{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_2\",\"output\":\"{}\"}}}}",
            "i".repeat(super::super::websocket::MAX_MESSAGE)
        );
        meter.provider_sent(&super::super::websocket::tests::frame(
            true,
            0x1,
            huge.as_bytes(),
            None,
        ));
        assert!(!meter.waiting(), "nothing is left open");
        drop(meter);
        let got = rows(&keep);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            got[0],
            (
                "gpt-6-sol".into(),
                0,
                0,
                429,
                Some("rate_limit_exceeded".into()),
                false
            )
        );
        assert_eq!(got[1], ("gpt-5.4".into(), 10, 1, 200, None, false));
        let (model, input, _, status, error, estimated) = &got[2];
        assert_eq!((model.as_str(), *status, error), ("gpt-5.4", 200, &None));
        assert!(*estimated && *input > 5, "{:?}", got[2]);
    }

    /// A `response.create` too long to read (inline images) is a request
    /// all the same, of an unknown model; when the provider's side ends
    /// first, what is open is `upstream_closed`.
    #[test]
    fn an_unread_request_counts_and_the_provider_closing_first_is_said() {
        let (mut meter, keep, _dir) = ws_meter();
        let big = format!(
            "{{\"type\":\"response.create\",\"model\":\"gpt-5.4\",\"input\":\"{}\"}}",
            "y".repeat(2 << 20)
        );
        meter.client_sent(&super::super::websocket::tests::frame(
            true,
            0x1,
            big.as_bytes(),
            Some([2, 7, 1, 8]),
        ));
        assert!(meter.waiting(), "the unread request waits for its answer");
        meter.provider_sent(&ws_created("resp_1", "gpt-5.4", None));
        meter.provider_gone();
        drop(meter);
        let got = rows(&keep);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, "gpt-5.4", "the model from the response");
        assert_eq!(got[0].4.as_deref(), Some("upstream_closed"));
    }

    /// The relay itself: a job that half-closes without a Close frame
    /// while a response is open has the provider told at once (it sees
    /// the end of the job's side, as it would without the agent); what the
    /// provider still sends reaches the job (it may still be reading), and
    /// the record has the provider's count.
    #[tokio::test]
    async fn a_job_that_half_closes_still_gets_the_open_response() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (meter, keep, _dir) = ws_meter();
        let (mut job, agent_job_side) = tokio::io::duplex(1 << 16);
        let (agent_up_side, mut provider) = tokio::io::duplex(1 << 16);
        let relay = tokio::spawn(relay_metered(agent_job_side, agent_up_side, meter));
        job.write_all(&ws_create("gpt-5.4", None)).await.unwrap();
        let mut got = vec![0u8; 4096];
        let n = provider.read(&mut got).await.unwrap();
        assert!(n > 0, "the request reached the provider");
        provider
            .write_all(&ws_created("resp_1", "gpt-5.4", None))
            .await
            .unwrap();
        job.shutdown().await.unwrap();
        // The provider sees the job's side end.
        let mut buf = [0u8; 64];
        let eof = tokio::time::timeout(Duration::from_secs(30), provider.read(&mut buf))
            .await
            .expect("the provider is told");
        assert_eq!(eof.unwrap(), 0, "the end of the job's side");
        // It still finishes the response it had under way.
        let completed_frame = ws_text(completed("resp_1", "gpt-5.4", 12, 34), None);
        provider.write_all(&completed_frame).await.unwrap();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !seen.ends_with(&completed_frame) {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, job.read(&mut buf))
                .await
                .expect("the rest of the response reached the job")
                .unwrap();
            assert!(n > 0, "the job's side was closed under the response");
            seen.extend_from_slice(&buf[..n]);
        }
        drop(provider);
        tokio::time::timeout(Duration::from_secs(30), relay)
            .await
            .expect("the relay ends")
            .unwrap()
            .unwrap();
        assert_eq!(
            rows(&keep),
            vec![("gpt-5.4".into(), 12, 34, 200, None, false)]
        );
    }

    #[test]
    fn message_prefixes_and_lanes_are_read_as_said() {
        assert!(is_response_create(
            b"{ \"type\" : \"response.create\", \"model\""
        ));
        assert!(!is_response_create(b"{\"type\":\"response.steer\""));
        assert_eq!(
            terminal_event_id(b"{\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_x\",\"object\""),
            Some("resp_x".into())
        );
        assert_eq!(
            terminal_event_id(b"{\"type\":\"response.created\",\"response\":{\"id\":\"r\"}"),
            None
        );
        assert_eq!(
            terminal_event_id(b"{\"type\":\"response.failed\",\"resp"),
            None
        );
        // 127 bytes then a two-byte character: cut before it.
        assert_eq!(lane_of(&format!("{}é", "a".repeat(127))).len(), 127);
        assert_eq!(lane_of(&"é".repeat(100)).len(), 128);
    }

    fn req(method: &str, uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_requests_for_the_connections_own_host_are_forwarded() {
        let p = "api.openai.com";
        let status = |r: &Request<()>| refused(r, p).map(|resp| resp.status().as_u16());
        // Its own host, however written; no host at all (HTTP/1.0).
        for ok in [
            req("POST", "/v1/chat/completions", Some("api.openai.com")),
            req("POST", "/v1/chat/completions", Some("API.OpenAI.com:443")),
            req("POST", "/v1/chat/completions", Some("api.openai.com.")),
            req("POST", "https://api.openai.com/v1/models", None),
            req("GET", "/v1/models", None),
        ] {
            assert_eq!(status(&ok), None, "{ok:?}");
        }
        // Another host, by Host, absolute URI (HTTP/2's :authority) or a
        // Host that does not parse; CONNECT.
        for (bad, code) in [
            (
                req("POST", "/v1/chat/completions", Some("evil.example")),
                421,
            ),
            (req("POST", "/v1/messages", Some("api.anthropic.com")), 421),
            (req("POST", "https://evil.example/v1/x", Some(p)), 421),
            (
                req("POST", "https://api.openai.com/v1/x", Some("evil.example")),
                421,
            ),
            (req("GET", "/", Some("a b")), 421),
            (req("CONNECT", "evil.example:443", None), 405),
        ] {
            assert_eq!(status(&bad), Some(code), "{bad:?}");
        }
    }
}
