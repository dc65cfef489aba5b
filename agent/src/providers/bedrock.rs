//! AWS Bedrock runtime: `/model/{modelId}/converse`, `converse-stream`,
//! `invoke`, `invoke-with-response-stream` and `count-tokens` (recorded,
//! free). The model id is the percent-decoded path segment (a model id,
//! an inference profile or an ARN).
//!
//! Usage, normalised as everywhere: `input_tokens` includes cache reads and
//! writes. Bedrock reports them apart (Converse `inputTokens` and the
//! invocation metrics' `inputTokenCount` exclude both), so they are added.
//! - Converse: the body's `usage`; ConverseStream: the `metadata` event.
//! - InvokeModel: an Anthropic Messages body is read by the Anthropic
//!   adapter; otherwise the `x-amzn-bedrock-*-token-count` response headers.
//! - InvokeModelWithResponseStream: each `chunk` event carries a base64
//!   model event; Anthropic events go to the Anthropic adapter, and the last
//!   chunk's `amazon-bedrock-invocationMetrics` is the fallback.
//!
//! A stream whose framing is corrupt (bad CRC, impossible length) yields no
//! usage at all: nothing after the damage can be trusted.

use base64::Engine as _;
use http::HeaderMap;
use serde_json::Value;

use super::anthropic::Anthropic;
use super::eventstream::{DecodeError, Decoder, Message};
use super::{
    Count, JsonBody, ObjectOr, ParsedUsage, Provider, RequestInfo, RequestView, UsageParser,
};
use crate::meter::Usage;

pub struct Bedrock;

/// The media type of Bedrock's streaming responses.
pub const EVENTSTREAM: &str = "application/vnd.amazon.eventstream";

/// Splits `/model/{modelId}/{action}`; the model id is percent-decoded and
/// may itself contain `/` when a client did not encode an ARN.
fn model_path(path: &str) -> Option<(String, &str)> {
    let rest = path.trim_end_matches('/').strip_prefix("/model/")?;
    let (model, action) = rest.rsplit_once('/')?;
    if model.is_empty() {
        return None;
    }
    let model = percent_encoding::percent_decode_str(model)
        .decode_utf8_lossy()
        .into_owned();
    Some((model, action))
}

/// Bedrock's other APIs on its hosts: Anthropic's Messages API under
/// `/anthropic/`, OpenAI's (chat completions, Responses) under `/openai/`
/// (bedrock-runtime) or `/v1/` (bedrock-mantle). Each is read by that
/// API's adapter and recorded as its provider with the Bedrock host, as
/// Claude on Vertex AI is. The agent does not add `stream_options` there
/// (Bedrock does not document it): a stream without usage is estimated.
fn other_api(req: &RequestView<'_>) -> Option<RequestInfo> {
    use crate::config::ApiKind;
    let path = req.path.trim_end_matches('/');
    if path.starts_with("/anthropic/") {
        let mut info = Anthropic.request(req);
        info.api = Some(ApiKind::Anthropic);
        return Some(info);
    }
    if path.starts_with("/openai/") || path.starts_with("/v1/") {
        let mut info = super::openai::OpenAi.request(req);
        info.api = Some(ApiKind::Openai);
        info.refuses_stream_options = true;
        return Some(info);
    }
    None
}

/// A request body, as far as it is read: the output cap, in whichever
/// shape the model family spells it (the messages are skipped, not built).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireRequest {
    /// Converse's (`maxTokens`) and Nova's InvokeModel body's
    /// (`max_new_tokens`).
    #[serde(rename = "inferenceConfig")]
    inference_config: ObjectOr<WireInferenceConfig>,
    max_tokens: Count,
    max_completion_tokens: Count,
    /// Llama.
    max_gen_len: Count,
    /// Titan Text.
    #[serde(rename = "textGenerationConfig")]
    text_generation_config: ObjectOr<WireTextGenerationConfig>,
    /// AI21 Jurassic-2.
    #[serde(rename = "maxTokens")]
    max_tokens_camel: Count,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireInferenceConfig {
    #[serde(rename = "maxTokens")]
    max_tokens: Count,
    max_new_tokens: Count,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireTextGenerationConfig {
    #[serde(rename = "maxTokenCount")]
    max_token_count: Count,
}

impl WireRequest {
    /// The output cap: the first spelling that holds a count.
    fn max_output(&self) -> Option<u64> {
        let inference = self.inference_config.0.as_ref();
        [
            inference.map_or(Count(None), |c| c.max_tokens),
            self.max_tokens,
            self.max_completion_tokens,
            self.max_gen_len,
            self.text_generation_config
                .0
                .as_ref()
                .map_or(Count(None), |c| c.max_token_count),
            inference.map_or(Count(None), |c| c.max_new_tokens),
            self.max_tokens_camel,
        ]
        .into_iter()
        .find_map(|c| c.0)
    }
}

impl Provider for Bedrock {
    fn name(&self) -> &'static str {
        "bedrock"
    }

    fn request(&self, req: &RequestView<'_>) -> RequestInfo {
        let unmetered = RequestInfo {
            operation: "other",
            ..Default::default()
        };
        if req.method != http::Method::POST {
            // The OpenAI route's retrievals of background responses
            // (bedrock-mantle runs them); nothing else that is not a POST
            // is billed.
            return other_api(req)
                .filter(|i| i.retrieves.is_some())
                .unwrap_or(unmetered);
        }
        let Some((model, action)) = model_path(req.path) else {
            return other_api(req).unwrap_or(unmetered);
        };
        let (operation, streaming) = match action {
            "converse" => ("chat", false),
            "converse-stream" => ("chat", true),
            "invoke" | "invoke-with-response-stream" => {
                let op = if model.to_ascii_lowercase().contains("embed") {
                    "embeddings"
                } else {
                    "chat"
                };
                (op, action != "invoke")
            }
            "count-tokens" => ("count_tokens", false),
            _ => return unmetered,
        };
        let max_output_tokens = match operation {
            "chat" => req
                .body
                .and_then(super::parse_object::<WireRequest>)
                .and_then(|r| r.max_output()),
            _ => None,
        };
        RequestInfo {
            operation,
            metered: true,
            model: Some(model),
            streaming,
            max_output_tokens,
            ..Default::default()
        }
    }

    fn response_parser(
        &self,
        info: &RequestInfo,
        status: u16,
        headers: &HeaderMap,
    ) -> Box<dyn UsageParser> {
        if super::content_type(headers) == EVENTSTREAM {
            Box::new(StreamParser::new(status))
        } else {
            Box::new(JsonParser {
                body: JsonBody::new(JsonBody::DEFAULT_LIMIT),
                free: info.operation == "count_tokens",
                from_headers: header_usage(headers),
            })
        }
    }
}

/// Usage with Bedrock's split of input: `input` excludes cache reads and
/// writes, which are added to make the normalised total.
fn usage(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Usage {
    Usage {
        input_tokens: input.saturating_add(cache_read).saturating_add(cache_write),
        output_tokens: output,
        cached_input_tokens: cache_read,
        cache_write_input_tokens: cache_write,
        web_searches: 0,
        web_searches_preview: 0,
        reasoning_tokens: 0,
        cache_write_1h_input_tokens: 0,
        audio_input_tokens: 0,
        image_input_tokens: 0,
        audio_output_tokens: 0,
        image_output_tokens: 0,
        cached_audio_input_tokens: 0,
        cached_image_input_tokens: 0,
        audio_duration_ms: 0,
    }
}

/// The tier that served a Converse request, from the `serviceTier` of its
/// body or of the stream's `metadata` event (its `type`: `default`,
/// `priority`, `flex`, `reserved`).
fn converse_tier(service_tier: &Value) -> Option<String> {
    service_tier
        .get("type")
        .and_then(Value::as_str)
        .and_then(super::service_tier)
}

/// Usage from a Converse `usage` object (JSON body or `metadata` event),
/// or from an Amazon Nova InvokeModel answer's, which names its cache
/// counts `cacheReadInputTokenCount` and `cacheWriteInputTokenCount`.
/// `cacheDetails` splits the cache writes by how long they are kept; the
/// hour-long part is priced higher.
pub fn converse_usage(u: &Value) -> Option<Usage> {
    let f = |k: &str| u.get(k).and_then(Value::as_u64);
    let (input, output) = (f("inputTokens"), f("outputTokens"));
    if input.is_none() && output.is_none() {
        return None;
    }
    let mut out = usage(
        input.unwrap_or(0),
        output.unwrap_or(0),
        f("cacheReadInputTokens")
            .or_else(|| f("cacheReadInputTokenCount"))
            .unwrap_or(0),
        f("cacheWriteInputTokens")
            .or_else(|| f("cacheWriteInputTokenCount"))
            .unwrap_or(0),
    );
    let hour: u64 = u
        .get("cacheDetails")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|d| d.get("ttl").and_then(Value::as_str) == Some("1h"))
        .filter_map(|d| d.get("inputTokens").and_then(Value::as_u64))
        .fold(0, u64::saturating_add);
    out.cache_write_1h_input_tokens = hour.min(out.cache_write_input_tokens);
    Some(out)
}

/// The model a prompt router sent a Converse request to (`trace.
/// promptRouter.invokedModelId` of the answer or of the stream's
/// `metadata` event): the request names only the router. An ARN gives its
/// last part, the model or inference profile id (not the account's ARN).
fn routed_model(trace: &Value) -> Option<String> {
    let id = trace
        .pointer("/promptRouter/invokedModelId")
        .and_then(Value::as_str)?;
    let id = id.rsplit('/').next().unwrap_or(id);
    (!id.is_empty()).then(|| id.to_string())
}

/// Usage from `amazon-bedrock-invocationMetrics`.
fn metrics_usage(m: &Value) -> Option<Usage> {
    let f = |k: &str| m.get(k).and_then(Value::as_u64);
    let (input, output) = (f("inputTokenCount"), f("outputTokenCount"));
    if input.is_none() && output.is_none() {
        return None;
    }
    Some(usage(
        input.unwrap_or(0),
        output.unwrap_or(0),
        f("cacheReadInputTokenCount").unwrap_or(0),
        f("cacheWriteInputTokenCount").unwrap_or(0),
    ))
}

/// Usage from InvokeModel's `x-amzn-bedrock-*-token-count` headers.
fn header_usage(h: &HeaderMap) -> Option<Usage> {
    let f = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let input = f("x-amzn-bedrock-input-token-count");
    let output = f("x-amzn-bedrock-output-token-count");
    if input.is_none() && output.is_none() {
        return None;
    }
    Some(usage(
        input.unwrap_or(0),
        output.unwrap_or(0),
        f("x-amzn-bedrock-cache-read-input-token-count").unwrap_or(0),
        f("x-amzn-bedrock-cache-write-input-token-count").unwrap_or(0),
    ))
}

/// A Converse answer, as far as it is read (the output message is
/// skipped, not built).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireConverse {
    usage: Option<Value>,
    trace: Option<Value>,
    #[serde(rename = "serviceTier")]
    service_tier: Option<Value>,
}

/// Converse, InvokeModel and CountTokens JSON bodies.
struct JsonParser {
    body: JsonBody,
    free: bool,
    from_headers: Option<Usage>,
}

impl UsageParser for JsonParser {
    fn feed(&mut self, chunk: &[u8]) {
        self.body.feed(chunk);
    }

    fn finish(&mut self) -> ParsedUsage {
        // CountTokens bills nothing, whatever its answer holds (or whether
        // it was read: past the budget of answers held it is not).
        if self.free {
            return ParsedUsage {
                usage: Some(Usage::default()),
                ..Default::default()
            };
        }
        let body = self.body.bytes();
        let v: Option<WireConverse> = body.and_then(super::parse_json);
        if let Some(v) = &v
            && let Some(u) = v.usage.as_ref().and_then(converse_usage)
        {
            return ParsedUsage {
                usage: Some(u),
                service_tier: v.service_tier.as_ref().and_then(converse_tier),
                response_model: v.trace.as_ref().and_then(routed_model),
                ..Default::default()
            };
        }
        // InvokeModel with Claude: an Anthropic Messages answer.
        let mut found = match (v.is_some(), body) {
            (true, Some(body)) => super::anthropic::message_json(body),
            _ => ParsedUsage::default(),
        };
        if found.usage.is_none() {
            found.usage = self.from_headers;
        }
        found
    }
}

/// ConverseStream and InvokeModelWithResponseStream bodies.
struct StreamParser {
    decoder: Decoder,
    /// From the Converse `metadata` event.
    converse: Option<Usage>,
    /// The metadata event's `serviceTier`.
    tier: Option<String>,
    /// The model a prompt router chose (the metadata event's `trace`).
    routed: Option<String>,
    /// From the last chunk's invocation metrics.
    metrics: Option<Usage>,
    /// The Anthropic adapter's stream parser, fed the decoded chunk events.
    anthropic: Box<dyn UsageParser>,
    text: String,
    /// The exception that ended the stream.
    error: Option<String>,
    /// Converse's `messageStop` came (its `metadata`, with the counts,
    /// follows).
    stopped: bool,
}

impl StreamParser {
    fn new(status: u16) -> Self {
        let mut sse = HeaderMap::new();
        sse.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        let info = RequestInfo {
            operation: "chat",
            metered: true,
            streaming: true,
            ..Default::default()
        };
        StreamParser {
            decoder: Decoder::default(),
            converse: None,
            tier: None,
            routed: None,
            metrics: None,
            anthropic: Anthropic.response_parser(&info, status, &sse),
            text: String::new(),
            error: None,
            stopped: false,
        }
    }

    fn on_message(&mut self, m: Message) {
        if matches!(m.header_str(":message-type"), Some("exception" | "error")) {
            let kind = m
                .header_str(":exception-type")
                .or_else(|| m.header_str(":error-code"))
                .unwrap_or("unknown");
            // The stream ends here; usage stays what the frames before said.
            tracing::debug!(exception = kind, "bedrock stream carried an exception");
            self.error = Some(super::error_type(kind).unwrap_or_else(|| "exception".into()));
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
            return;
        };
        match m.header_str(":event-type") {
            Some("metadata") => {
                if let Some(u) = v.get("usage").and_then(converse_usage) {
                    self.converse = Some(u);
                }
                if let Some(t) = v.get("serviceTier").and_then(converse_tier) {
                    self.tier = Some(t);
                }
                if let Some(m) = v.get("trace").and_then(routed_model) {
                    self.routed = Some(m);
                }
            }
            Some("contentBlockDelta") => {
                for p in [
                    "/delta/text",
                    "/delta/reasoningContent/text",
                    "/delta/toolUse/input",
                ] {
                    if let Some(t) = v.pointer(p).and_then(Value::as_str) {
                        super::push_text(&mut self.text, t);
                    }
                }
            }
            Some("messageStop") => self.stopped = true,
            Some("chunk") => self.on_chunk(&v),
            _ => {}
        }
    }

    /// One InvokeModelWithResponseStream chunk: `{"bytes":"<base64>"}`.
    fn on_chunk(&mut self, v: &Value) {
        let Some(b64) = v.get("bytes").and_then(Value::as_str) else {
            return;
        };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return;
        };
        let Ok(ev) = serde_json::from_slice::<Value>(&raw) else {
            return;
        };
        if let Some(u) = ev
            .get("amazon-bedrock-invocationMetrics")
            .and_then(metrics_usage)
        {
            self.metrics = Some(u);
        }
        // Other model families' text, for an estimate if usage is missing
        // (Anthropic text is collected by the Anthropic parser).
        for p in [
            "/generation",
            "/outputText",
            "/completion",
            "/outputs/0/text",
        ] {
            if let Some(t) = ev.pointer(p).and_then(Value::as_str) {
                super::push_text(&mut self.text, t);
            }
        }
        // As one SSE event: raw CR and LF are JSON whitespace here (inside
        // strings they are escaped), so turning them into spaces keeps it.
        let mut sse = Vec::with_capacity(raw.len() + 8);
        sse.extend_from_slice(b"data: ");
        sse.extend(
            raw.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        sse.extend_from_slice(b"\n\n");
        self.anthropic.feed(&sse);
    }
}

impl UsageParser for StreamParser {
    fn feed(&mut self, chunk: &[u8]) {
        let mut msgs = Vec::new();
        self.decoder.feed(chunk, &mut |m| msgs.push(m));
        for m in msgs {
            self.on_message(m);
        }
    }

    fn generation_over(&self) -> bool {
        self.stopped || self.anthropic.generation_over()
    }

    fn finish(&mut self) -> ParsedUsage {
        let corrupt = match self.decoder.finish() {
            Ok(()) | Err(DecodeError::Truncated) => false,
            Err(e) => {
                tracing::debug!(error = %e, "bedrock event stream is corrupt; usage not read");
                true
            }
        };
        let mut a = self.anthropic.finish();
        let mut text = std::mem::take(&mut a.output_text);
        super::push_text(&mut text, &self.text);
        // Anthropic's own counts first; when its stream was cut before its
        // final counts, the invocation metrics (if they came) are final.
        let (usage, partial) = match (self.converse, a.usage, self.metrics) {
            (Some(c), ..) => (Some(c), false),
            (None, Some(_), Some(m)) if a.partial => (Some(m), false),
            (None, Some(u), _) => (Some(u), a.partial),
            (None, None, m) => (m, false),
        };
        // Every frame read before the damage passed its checksums: its
        // counts stand. When they are not final, the record says the
        // stream could not be read (`content_decoding_failed`, estimated
        // as any unreadable answer); it is not the provider's error.
        ParsedUsage {
            undecodable: corrupt && (usage.is_none() || partial),
            usage,
            response_model: self.routed.take().or(a.response_model),
            output_text: text,
            partial,
            error: self.error.take().or(a.error),
            service_tier: self.tier.take().or(a.service_tier),
            ..ParsedUsage::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::eventstream::encode_frame;
    use crate::providers::testing::{parse_split, parse_split_with, request};
    use proptest::prelude::*;

    const CONVERSE_JSON: &[u8] = include_bytes!("fixtures/bedrock/converse.json");
    const CONVERSE_STREAM: &[u8] = include_bytes!("fixtures/bedrock/converse_stream.bin");
    const THROTTLED_STREAM: &[u8] =
        include_bytes!("fixtures/bedrock/converse_stream_throttled.bin");
    const INVOKE_JSON: &[u8] = include_bytes!("fixtures/bedrock/invoke_anthropic.json");
    const INVOKE_STREAM: &[u8] = include_bytes!("fixtures/bedrock/invoke_stream.bin");
    const ERR_JSON: &[u8] = include_bytes!("fixtures/bedrock/error_throttling.json");

    fn info(op: &'static str) -> RequestInfo {
        RequestInfo {
            operation: op,
            metered: true,
            ..Default::default()
        }
    }

    fn stream(body: &[u8], splits: &[usize]) -> ParsedUsage {
        parse_split(&Bedrock, &info("chat"), EVENTSTREAM, body, splits)
    }

    fn json(body: &[u8]) -> ParsedUsage {
        parse_split(&Bedrock, &info("chat"), "application/json", body, &[])
    }

    fn chunk(event: &str) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(event);
        encode_frame(
            &[
                (":event-type", "chunk"),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            format!(r#"{{"bytes":"{b64}","p":"abc"}}"#).as_bytes(),
        )
    }

    /// bedrock-runtime's (and bedrock-mantle's) OpenAI-compatible and
    /// Anthropic Messages routes are read by those APIs' adapters; the
    /// native routes stay Bedrock's.
    #[test]
    fn the_openai_and_anthropic_routes_are_read_by_their_adapters() {
        use crate::config::ApiKind;
        let body = br#"{"model":"openai.gpt-oss-120b-1:0","stream":true,"messages":[]}"#;
        for path in ["/openai/v1/chat/completions", "/v1/chat/completions"] {
            let i = Bedrock.request(&request("POST", path, body));
            assert_eq!(i.api, Some(ApiKind::Openai), "{path}");
            assert_eq!((i.operation, i.metered, i.streaming), ("chat", true, true));
            assert_eq!(i.model.as_deref(), Some("openai.gpt-oss-120b-1:0"));
            assert!(i.refuses_stream_options, "{path}");
        }
        let r = Bedrock.request(&request(
            "POST",
            "/openai/v1/responses",
            br#"{"model":"m"}"#,
        ));
        assert_eq!((r.api, r.operation), (Some(ApiKind::Openai), "responses"));
        // bedrock-mantle runs background responses: their retrievals are
        // the OpenAI route's; other GETs are not billed.
        let g = Bedrock.request(&request("GET", "/v1/responses/resp_9", b""));
        assert_eq!(
            (g.api, g.retrieves.as_deref(), g.metered),
            (Some(ApiKind::Openai), Some("resp_9"), true)
        );
        for path in [
            "/v1/models",
            "/openai/v1/responses/resp_9/input_items",
            "/anthropic/v1/models",
        ] {
            assert!(
                !Bedrock.request(&request("GET", path, b"")).metered,
                "{path}"
            );
        }
        let m = Bedrock.request(&request(
            "POST",
            "/anthropic/v1/messages",
            br#"{"model":"anthropic.claude-opus-4-7","max_tokens":9}"#,
        ));
        assert_eq!(
            (m.api, m.operation, m.metered),
            (Some(ApiKind::Anthropic), "chat", true)
        );
        assert_eq!(m.model.as_deref(), Some("anthropic.claude-opus-4-7"));
        let native = Bedrock.request(&request(
            "POST",
            "/model/anthropic.claude-3-haiku-20240307-v1:0/converse",
            b"{}",
        ));
        assert_eq!((native.api, native.operation), (None, "chat"));
        assert!(
            !Bedrock
                .request(&request("POST", "/elsewhere", b"{}"))
                .metered
        );
    }

    /// Converse says which tier served it (`serviceTier.type`), in its
    /// body and in the stream's metadata event.
    #[test]
    fn the_converse_service_tier_is_read() {
        let info = RequestInfo {
            operation: "chat",
            metered: true,
            ..Default::default()
        };
        let body = br#"{"output":{},"usage":{"inputTokens":3,"outputTokens":4},"serviceTier":{"type":"flex"}}"#;
        let p = parse_split(&Bedrock, &info, "application/json", body, &[11]);
        assert_eq!(p.service_tier.as_deref(), Some("flex"));
        let meta = encode_frame(
            &[(":event-type", "metadata"), (":message-type", "event")],
            br#"{"usage":{"inputTokens":3,"outputTokens":4},"serviceTier":{"type":"priority"}}"#,
        );
        let p = parse_split(&Bedrock, &info, EVENTSTREAM, &meta, &[20]);
        assert_eq!(p.service_tier.as_deref(), Some("priority"));
        assert_eq!(p.usage.map(|u| u.output_tokens), Some(4));
    }

    #[test]
    fn classifies_requests() {
        let i = Bedrock.request(&request(
            "POST",
            "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse-stream",
            br#"{"messages":[],"inferenceConfig":{"maxTokens":512}}"#,
        ));
        assert_eq!(
            (i.operation, i.metered, i.streaming, i.max_output_tokens),
            ("chat", true, true, Some(512))
        );
        assert_eq!(
            i.model.as_deref(),
            Some("anthropic.claude-3-5-sonnet-20240620-v1:0")
        );
        let arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-7-sonnet-20250219-v1:0";
        for path in [
            "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-3-7-sonnet-20250219-v1%3A0/invoke",
            "/model/arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-7-sonnet-20250219-v1:0/invoke",
        ] {
            let i = Bedrock.request(&request("POST", path, br#"{"max_tokens":100}"#));
            assert_eq!((i.operation, i.streaming), ("chat", false), "{path}");
            assert_eq!(i.model.as_deref(), Some(arn), "{path}");
            assert_eq!(i.max_output_tokens, Some(100));
        }
        let s = Bedrock.request(&request(
            "POST",
            "/model/meta.llama3-8b-instruct-v1%3A0/invoke-with-response-stream",
            br#"{"prompt":"hi","max_gen_len":64}"#,
        ));
        assert_eq!((s.streaming, s.max_output_tokens), (true, Some(64)));
        let e = Bedrock.request(&request(
            "POST",
            "/model/amazon.titan-embed-text-v2%3A0/invoke",
            br#"{"inputText":"hi"}"#,
        ));
        assert_eq!(e.operation, "embeddings");
        let c = Bedrock.request(&request(
            "POST",
            "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/count-tokens",
            b"{}",
        ));
        assert_eq!(c.operation, "count_tokens");
        for (m, p) in [
            ("GET", "/model/x/converse"),
            ("POST", "/async-invoke"),
            ("POST", "/guardrail/g1/version/1/apply"),
            ("POST", "/model//converse"),
        ] {
            assert!(!Bedrock.request(&request(m, p, b"{}")).metered, "{m} {p}");
        }
    }

    #[test]
    fn converse_json_usage_adds_cache_to_input() {
        let p = json(CONVERSE_JSON);
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 25 + 1024 + 200,
                output_tokens: 48,
                cached_input_tokens: 1024,
                cache_write_input_tokens: 200,
                reasoning_tokens: 0,
                cache_write_1h_input_tokens: 0,
                web_searches: 0,
                web_searches_preview: 0,
                audio_input_tokens: 0,
                image_input_tokens: 0,
                audio_output_tokens: 0,
                image_output_tokens: 0,
                cached_audio_input_tokens: 0,
                cached_image_input_tokens: 0,
                audio_duration_ms: 0,
            })
        );
    }

    #[test]
    fn converse_cache_writes_kept_an_hour_are_told_apart() {
        let u = |details: &str| {
            converse_usage(
                &serde_json::from_str(&format!(
                    r#"{{"inputTokens":12,"outputTokens":300,"cacheReadInputTokens":0,
                    "cacheWriteInputTokens":50000{details}}}"#
                ))
                .unwrap(),
            )
            .unwrap()
        };
        let both = u(
            r#","cacheDetails":[{"ttl":"1h","inputTokens":30000},{"ttl":"5m","inputTokens":20000}]"#,
        );
        assert_eq!(both.cache_write_input_tokens, 50000);
        assert_eq!(both.cache_write_1h_input_tokens, 30000);
        assert_eq!(both.input_tokens, 50012);
        assert_eq!(u("").cache_write_1h_input_tokens, 0, "no details");
        assert_eq!(
            u(r#","cacheDetails":[{"ttl":"5m","inputTokens":50000}]"#).cache_write_1h_input_tokens,
            0
        );
        // Never more than the writes, whatever the details say.
        assert_eq!(
            u(r#","cacheDetails":[{"ttl":"1h","inputTokens":90000},{"ttl":"1h","inputTokens":"x"}]"#)
                .cache_write_1h_input_tokens,
            50000
        );
        let book = crate::meter::pricing::PriceBook::builtin();
        let cost = |u: &Usage| {
            book.cost_of_any(
                "bedrock",
                &["global.anthropic.claude-sonnet-4-5-20250929-v1:0"],
                1_764_547_200_000, // 2025-12-01, the catalogue's date
                u,
                crate::meter::pricing::Serving::default(),
            )
            .expect("priced")
            .usd
        };
        assert!(cost(&both) > cost(&u("")), "hour-long writes cost more");
    }

    #[test]
    fn converse_stream_usage_from_metadata() {
        let p = stream(CONVERSE_STREAM, &[]);
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 21 + 1024,
                output_tokens: 35,
                cached_input_tokens: 1024,
                cache_write_input_tokens: 0,
                reasoning_tokens: 0,
                cache_write_1h_input_tokens: 0,
                web_searches: 0,
                web_searches_preview: 0,
                audio_input_tokens: 0,
                image_input_tokens: 0,
                audio_output_tokens: 0,
                image_output_tokens: 0,
                cached_audio_input_tokens: 0,
                cached_image_input_tokens: 0,
                audio_duration_ms: 0,
            })
        );
        assert_eq!(p.output_text, "Hello, ünïcødé world.");
    }

    #[test]
    fn invoke_anthropic_json_reuses_anthropic_normalisation() {
        let p = json(INVOKE_JSON);
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 12 + 2048,
                output_tokens: 12,
                cached_input_tokens: 2048,
                cache_write_input_tokens: 0,
                reasoning_tokens: 0,
                cache_write_1h_input_tokens: 0,
                web_searches: 0,
                web_searches_preview: 0,
                audio_input_tokens: 0,
                image_input_tokens: 0,
                audio_output_tokens: 0,
                image_output_tokens: 0,
                cached_audio_input_tokens: 0,
                cached_image_input_tokens: 0,
                audio_duration_ms: 0,
            })
        );
        assert_eq!(
            p.response_model.as_deref(),
            Some("claude-3-5-sonnet-20240620")
        );
    }

    /// Each family's output cap is read member by member: one of an
    /// unexpected type is missing and the next spelling is tried.
    #[test]
    fn request_members_of_odd_types_lose_only_themselves() {
        let cap = |body: &[u8]| {
            Bedrock
                .request(&request("POST", "/model/m/converse", body))
                .max_output_tokens
        };
        for (body, want) in [
            (
                &br#"{"inferenceConfig":{"maxTokens":"x","max_new_tokens":5},"maxTokens":6}"#[..],
                Some(5),
            ),
            (br#"{"inferenceConfig":[1],"maxTokens":7}"#, Some(7)),
            (
                br#"{"inferenceConfig":{"maxTokens":8},"max_tokens":1}"#,
                Some(8),
            ),
            (
                br#"{"max_tokens":-1,"max_completion_tokens":2,"max_gen_len":3}"#,
                Some(2),
            ),
            (
                br#"{"max_gen_len":3.5,"textGenerationConfig":{"maxTokenCount":4}}"#,
                Some(4),
            ),
            (br#"{"textGenerationConfig":"x","maxTokens":null}"#, None),
            (br#"{"max_tokens":1,"max_tokens":2}"#, Some(2)),
            (b"[1]", None),
            (b"not json", None),
        ] {
            assert_eq!(cap(body), want, "{}", String::from_utf8_lossy(body));
        }
    }

    /// A JSON answer is read as the whole document was: odd members lose
    /// only themselves; a free call is free whenever the body is JSON.
    #[test]
    fn response_members_of_odd_types_lose_only_themselves() {
        let p = json(
            br#"{"usage":{"inputTokens":3,"outputTokens":"4"},"serviceTier":{"type":"flex"}}"#,
        );
        assert_eq!(
            p.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((3, 0))
        );
        assert_eq!(p.service_tier.as_deref(), Some("flex"));
        let p =
            json(br#"{"usage":{"inputTokens":3},"serviceTier":"flex","usage":{"outputTokens":4}}"#);
        assert_eq!(
            p.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((0, 4))
        );
        assert_eq!(p.service_tier, None);
        let p = json(
            br#"{"usage":"x","serviceTier":{"type":"flex"},"model":"m","content":[{"text":"t"}]}"#,
        );
        assert_eq!((p.usage, p.service_tier), (None, None));
        assert_eq!(
            (p.response_model.as_deref(), p.output_text.as_str()),
            (Some("m"), "t")
        );
        for (body, usage) in [
            (&b"[1]"[..], Some(Usage::default())),
            (b"{}", Some(Usage::default())),
            // Cut or unread (past the budget of answers held): still free.
            (b"{\"inputTokens\":", Some(Usage::default())),
        ] {
            let p = parse_split(
                &Bedrock,
                &info("count_tokens"),
                "application/json",
                body,
                &[],
            );
            assert_eq!(p.usage, usage, "{}", String::from_utf8_lossy(body));
            assert_eq!(json(body), ParsedUsage::default());
        }
    }

    /// A request or answer is read without building what is not read (a
    /// whole `Value` of a body costs some 16 times its size).
    #[test]
    fn bodies_are_read_without_building_them() {
        use crate::providers::testing::{finish_peak, padded_object, peak_alloc};
        let body = padded_object(r#""inferenceConfig":{"maxTokens":5}"#, 1 << 20);
        let (i, peak) =
            peak_alloc(|| Bedrock.request(&request("POST", "/model/m/converse", &body)));
        assert_eq!(i.max_output_tokens, Some(5));
        assert!(peak < body.len() / 8, "the request cost {peak} bytes");
        for (members, input) in [
            (
                r#""usage":{"inputTokens":3,"outputTokens":4},"serviceTier":{"type":"flex"}"#,
                3,
            ),
            // InvokeModel with Claude: read by the Anthropic adapter.
            (
                r#""model":"m","usage":{"input_tokens":5,"output_tokens":4}"#,
                5,
            ),
        ] {
            let body = padded_object(members, 1 << 20);
            let (p, peak) = finish_peak(&Bedrock, &info("chat"), "application/json", &body);
            assert_eq!(
                p.usage.map(|u| (u.input_tokens, u.output_tokens)),
                Some((input, 4))
            );
            assert!(
                peak < body.len() / 8,
                "the answer cost {peak} bytes: {members}"
            );
        }
    }

    #[test]
    fn invoke_other_models_use_token_count_headers() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-amzn-bedrock-input-token-count", "17".parse().unwrap());
        h.insert("x-amzn-bedrock-output-token-count", "5".parse().unwrap());
        h.insert("x-amzn-bedrock-invocation-latency", "301".parse().unwrap());
        let llama = br#"{"generation":"Hi there.","prompt_token_count":17,"generation_token_count":5,"stop_reason":"stop"}"#;
        let p = parse_split_with(&Bedrock, &info("chat"), &h, llama, &[3]);
        assert_eq!(
            p.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((17, 5))
        );
        // The body's usage wins over the headers when it has one.
        let a = parse_split_with(&Bedrock, &info("chat"), &h, INVOKE_JSON, &[]);
        assert_eq!(a.usage.map(|u| u.input_tokens), Some(12 + 2048));
        // Embeddings: no usage in the body at all.
        let e = parse_split_with(
            &Bedrock,
            &info("embeddings"),
            &h,
            br#"{"embedding":[0.1,0.2],"inputTextTokenCount":17}"#,
            &[],
        );
        assert_eq!(e.usage.map(|u| u.input_tokens), Some(17));
    }

    #[test]
    fn a_prompt_routers_choice_is_the_response_model() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        let answer = br#"{"output":{"message":{"role":"assistant","content":[{"text":"Hi."}]}},"stopReason":"end_turn","usage":{"inputTokens":30,"outputTokens":5},"trace":{"promptRouter":{"invokedModelId":"arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0"}}}"#;
        let p = parse_split_with(&Bedrock, &info("chat"), &h, answer, &[]);
        let model = p.response_model.expect("the routed model");
        assert_eq!(model, "us.anthropic.claude-3-5-haiku-20241022-v1:0");
        let prices = crate::meter::pricing::PriceBook::builtin();
        assert!(prices.knows("bedrock", &model), "{model}");
        // The stream's metadata event says the same.
        let meta = encode_frame(
            &[(":event-type", "metadata"), (":message-type", "event")],
            br#"{"usage":{"inputTokens":30,"outputTokens":5},"metrics":{"latencyMs":100},"trace":{"promptRouter":{"invokedModelId":"us.anthropic.claude-3-5-haiku-20241022-v1:0"}}}"#,
        );
        let mut sh = HeaderMap::new();
        sh.insert("content-type", EVENTSTREAM.parse().unwrap());
        let s = parse_split_with(&Bedrock, &info("chat"), &sh, &meta, &[5]);
        assert_eq!(
            s.response_model.as_deref(),
            Some("us.anthropic.claude-3-5-haiku-20241022-v1:0")
        );
    }

    #[test]
    fn invoke_nova_reads_its_cache_counts() {
        // Amazon Nova's InvokeModel answer: Converse's token names, but
        // the cache counts as the invocation metrics spell them.
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        let nova = br#"{"output":{"message":{"role":"assistant","content":[{"text":"Hi."}]}},"stopReason":"end_turn","usage":{"inputTokens":100,"outputTokens":20,"totalTokens":1620,"cacheReadInputTokenCount":1000,"cacheWriteInputTokenCount":500}}"#;
        let p = parse_split_with(&Bedrock, &info("chat"), &h, nova, &[7]);
        let u = p.usage.expect("usage");
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_input_tokens,
                u.output_tokens
            ),
            (1600, 1000, 500, 20)
        );
    }

    /// A Converse stream's generation is over at `messageStop` (its
    /// `metadata`, with the counts, follows); an InvokeModel stream of
    /// Claude's at Anthropic's stop reason (its `message_stop`, with the
    /// invocation metrics, follows).
    #[test]
    fn a_streams_generation_is_over_before_its_counts() {
        use crate::providers::testing::generation_over_after;
        let over = |body| generation_over_after(&Bedrock, &info("chat"), EVENTSTREAM, body);
        let at = over(CONVERSE_STREAM).expect("over at messageStop");
        let has = |b: &[u8], s: &str| b.windows(s.len()).any(|w| w == s.as_bytes());
        assert!(has(&CONVERSE_STREAM[..at], "messageStop"));
        assert!(!has(&CONVERSE_STREAM[..at], "metadata"));
        assert!(has(&CONVERSE_STREAM[at..], "metadata"));
        let at = over(INVOKE_STREAM).expect("over at the stop reason");
        assert!(at < INVOKE_STREAM.len(), "before the last chunk");
        // The throttled stream ends in an exception: never over.
        assert_eq!(over(THROTTLED_STREAM), None);
    }

    #[test]
    fn invoke_stream_anthropic_events() {
        let p = stream(INVOKE_STREAM, &[]);
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 18 + 300,
                output_tokens: 42,
                cached_input_tokens: 0,
                cache_write_input_tokens: 300,
                reasoning_tokens: 0,
                cache_write_1h_input_tokens: 0,
                web_searches: 0,
                web_searches_preview: 0,
                audio_input_tokens: 0,
                image_input_tokens: 0,
                audio_output_tokens: 0,
                image_output_tokens: 0,
                cached_audio_input_tokens: 0,
                cached_image_input_tokens: 0,
                audio_duration_ms: 0,
            })
        );
        assert_eq!(
            p.response_model.as_deref(),
            Some("claude-3-5-sonnet-20240620")
        );
        assert_eq!(p.output_text, "Bonjour à tous.");
    }

    #[test]
    fn invoke_stream_invocation_metrics_fallback() {
        let mut body = chunk(
            r#"{"generation":"Hello","prompt_token_count":10,"generation_token_count":1,"stop_reason":null}"#,
        );
        body.extend(chunk(
            "{\"generation\":\" world\",\"prompt_token_count\":null,\"generation_token_count\":12,\"stop_reason\":\"stop\",\n\"amazon-bedrock-invocationMetrics\":{\"inputTokenCount\":10,\"outputTokenCount\":12,\"invocationLatency\":600,\"firstByteLatency\":200,\"cacheReadInputTokenCount\":4}}",
        ));
        let p = stream(&body, &[]);
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 14,
                output_tokens: 12,
                cached_input_tokens: 4,
                cache_write_input_tokens: 0,
                reasoning_tokens: 0,
                cache_write_1h_input_tokens: 0,
                web_searches: 0,
                web_searches_preview: 0,
                audio_input_tokens: 0,
                image_input_tokens: 0,
                audio_output_tokens: 0,
                image_output_tokens: 0,
                cached_audio_input_tokens: 0,
                cached_image_input_tokens: 0,
                audio_duration_ms: 0,
            })
        );
        assert_eq!(p.output_text, "Hello world");
    }

    #[test]
    fn errors_have_no_usage() {
        let e = parse_split(&Bedrock, &info("chat"), "application/json", ERR_JSON, &[]);
        assert_eq!(e, ParsedUsage::default());
        let t = stream(THROTTLED_STREAM, &[]);
        assert_eq!(t.usage, None);
        assert_eq!(t.output_text, "Hello");
        assert_eq!(t.error.as_deref(), Some("throttlingException"));
        let c = parse_split(
            &Bedrock,
            &info("count_tokens"),
            "application/json",
            br#"{"inputTokens":123}"#,
            &[],
        );
        assert_eq!(c.usage, Some(Usage::default()));
    }

    #[test]
    fn corrupt_or_cut_streams_give_no_usage_past_the_damage() {
        // The metadata frame is the last one; damage each part of it.
        let mut starts = Vec::new();
        let mut i = 0;
        while i + 4 <= CONVERSE_STREAM.len() {
            starts.push(i);
            i += u32::from_be_bytes(CONVERSE_STREAM[i..i + 4].try_into().unwrap()) as usize;
        }
        let metadata_start = *starts.last().unwrap();
        for at in [
            metadata_start + 8,         // prelude CRC
            metadata_start + 2,         // total length
            CONVERSE_STREAM.len() - 10, // payload
            CONVERSE_STREAM.len() - 1,  // message CRC
        ] {
            let mut s = CONVERSE_STREAM.to_vec();
            s[at] ^= 0x10;
            let p = stream(&s, &[]);
            assert_eq!(p.usage, None, "flip at {at}");
            assert!(p.undecodable, "flip at {at}");
        }
        // Damage early in the stream also stops everything after it.
        let mut early = CONVERSE_STREAM.to_vec();
        early[20] ^= 1;
        assert_eq!(
            stream(&early, &[]),
            ParsedUsage {
                undecodable: true,
                ..ParsedUsage::default()
            }
        );
        // Damage after the metadata frame: its checked counts stand.
        let mut after = CONVERSE_STREAM.to_vec();
        after.extend_from_slice(b"\0\0\0\x20\0\0\0\0garbage-after-the-last-frame....");
        let p = stream(&after, &[]);
        assert_eq!(p.usage, stream(CONVERSE_STREAM, &[]).usage);
        assert!(p.usage.is_some() && !p.partial);
        assert!(!p.undecodable, "its counts are final");
        // Truncated inside the metadata frame.
        let cut = stream(&CONVERSE_STREAM[..CONVERSE_STREAM.len() - 5], &[]);
        assert_eq!(cut.usage, None);
        // An impossible length.
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&0u32.to_be_bytes());
        let crc = crc32fast::hash(&huge);
        huge.extend_from_slice(&crc.to_be_bytes());
        let mut s = CONVERSE_STREAM.to_vec();
        s.splice(0..0, huge);
        assert_eq!(stream(&s, &[]).usage, None);
    }

    #[test]
    fn every_byte_boundary_of_a_stream() {
        let whole = stream(CONVERSE_STREAM, &[]);
        assert!(whole.usage.is_some());
        for i in 0..=CONVERSE_STREAM.len() {
            assert_eq!(stream(CONVERSE_STREAM, &[i]), whole, "split at {i}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        for body in [
            &b""[..],
            b"\0\0\0\x10",
            b"{",
            b"\xff\xfe",
            br#"{"usage":{"inputTokens":-1}}"#,
        ] {
            let _ = json(body);
            let _ = stream(body, &[]);
        }
        let _ = stream(&chunk("not json"), &[]);
        let _ = stream(
            &encode_frame(&[(":event-type", "chunk")], br#"{"bytes":"!!notbase64"}"#),
            &[],
        );
    }

    proptest! {
        #[test]
        fn any_split_of_converse_stream_same_usage(mut splits in proptest::collection::vec(0usize..CONVERSE_STREAM.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(stream(CONVERSE_STREAM, &splits), stream(CONVERSE_STREAM, &[]));
        }

        #[test]
        fn any_split_of_invoke_stream_same_usage(mut splits in proptest::collection::vec(0usize..INVOKE_STREAM.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(stream(INVOKE_STREAM, &splits), stream(INVOKE_STREAM, &[]));
        }

        #[test]
        fn any_split_of_json_same_usage(mut splits in proptest::collection::vec(0usize..CONVERSE_JSON.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(
                parse_split(&Bedrock, &info("chat"), "application/json", CONVERSE_JSON, &splits),
                json(CONVERSE_JSON)
            );
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), mut splits in proptest::collection::vec(0usize..512, 0..6)) {
            splits.sort();
            let _ = stream(&bytes, &splits);
            let _ = parse_split(&Bedrock, &info("chat"), "application/json", &bytes, &splits);
        }

        #[test]
        fn random_payloads_in_valid_frames_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..256), kind in prop::sample::select(vec!["chunk", "metadata", "contentBlockDelta", "messageStart"])) {
            let f = encode_frame(&[(":event-type", kind), (":message-type", "event")], &payload);
            let _ = stream(&f, &[]);
        }
    }
}
