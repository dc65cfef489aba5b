//! Anthropic Messages API: `/v1/messages` (JSON and SSE), count_tokens
//! (free), message batches (recorded as such).
//!
//! Normalisation: `input_tokens` = input + cache read + cache creation, with
//! `cached_input_tokens` = cache read and `cache_write_input_tokens` = cache
//! creation, so sums mean the same across providers.

use serde_json::Value;

use super::sse::SseReader;
use super::{
    Count, JsonBody, ParsedUsage, Provider, RequestInfo, RequestView, UsageParser, str_at,
};
use crate::meter::Usage;

pub struct Anthropic;

/// A Messages API request body, as far as it is read (the messages are
/// skipped, not built).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireRequest {
    model: Option<Value>,
    stream: Option<Value>,
    max_tokens: Count,
    /// The legacy Text Completions API's cap.
    max_tokens_to_sample: Count,
}

/// A Messages API request (`op`): the model named by the caller (Claude on
/// Vertex AI names it in the URL) or the body's, whether it streams, and
/// its output cap.
pub(crate) fn messages_request(
    op: &'static str,
    model: Option<String>,
    body: Option<&[u8]>,
) -> RequestInfo {
    let body = body
        .and_then(super::parse_object::<WireRequest>)
        .unwrap_or_default();
    RequestInfo {
        operation: op,
        metered: true,
        model: model.or_else(|| body.model.as_ref()?.as_str().map(str::to_owned)),
        streaming: body.stream.as_ref().and_then(Value::as_bool) == Some(true),
        max_output_tokens: body.max_tokens.0.or(body.max_tokens_to_sample.0),
        injected_usage: false,
        ..Default::default()
    }
}

impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn request(&self, req: &RequestView<'_>) -> RequestInfo {
        if let Some(info) = super::managed_agents::call(req.method, req.path) {
            return info;
        }
        let path = req.path.trim_end_matches('/');
        if req.method == http::Method::POST && path.ends_with("/chat/completions") {
            // The OpenAI SDK compatibility layer (`base_url` ending in
            // `/v1/`): OpenAI's format, Anthropic's models and prices. It
            // takes `stream_options`, so usage is asked for as on OpenAI.
            let mut info = super::openai::OpenAi.request(req);
            info.wire = Some(crate::config::ApiKind::Openai);
            return info;
        }
        if let Some(id) = batch_results_id(req.method, path) {
            return RequestInfo {
                operation: super::batch::OPERATION,
                metered: true,
                batch: Some(super::BatchResults::new(
                    id,
                    super::batch::Format::Anthropic,
                )),
                ..Default::default()
            };
        }
        let op = if req.method != http::Method::POST {
            None
        } else if path.ends_with("/messages/count_tokens") {
            Some("count_tokens")
        } else if path.ends_with("/messages/batches") {
            Some("batch")
        } else if path.ends_with("/messages") {
            Some("chat")
        } else if path.ends_with("/complete") {
            Some("text_completion")
        } else {
            None
        };
        let Some(op) = op else {
            return RequestInfo {
                operation: "other",
                ..Default::default()
            };
        };
        messages_request(op, None, req.body)
    }

    fn response_parser(
        &self,
        info: &RequestInfo,
        status: u16,
        headers: &http::HeaderMap,
    ) -> Box<dyn UsageParser> {
        if let Some(b) = &info.batch {
            return super::batch::parser(b, status);
        }
        let event_stream = super::content_type(headers) == "text/event-stream";
        if info.sessions.is_some() {
            return Box::new(super::managed_agents::SessionParser::new(
                info,
                event_stream,
            ));
        }
        if event_stream {
            Box::new(StreamParser::default())
        } else {
            Box::new(JsonParser {
                body: JsonBody::new(JsonBody::DEFAULT_LIMIT),
                free: info.operation == "count_tokens" || info.operation == "batch",
            })
        }
    }
}

/// A read of a message batch's results, `GET …/messages/batches/{id}/results`
/// (where a batch's `results_url` points). Gives the batch's id.
fn batch_results_id(method: &http::Method, path: &str) -> Option<String> {
    if method != http::Method::GET {
        return None;
    }
    let rest = path.strip_suffix("/results")?;
    let (parent, id) = rest.rsplit_once('/')?;
    parent
        .ends_with("/messages/batches")
        .then(|| super::path_id(id))
        .flatten()
}

/// A line of a message batch's results, as far as it is read.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatchLine {
    result: super::ObjectOr<WireBatchResult>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatchResult {
    #[serde(rename = "type")]
    kind: Option<Value>,
    message: super::ObjectOr<WireBatchMessage>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatchMessage {
    model: Option<Value>,
    usage: Option<Value>,
}

/// A line of a message batch's results: `{"custom_id", "result": {"type":
/// "succeeded", "message": {… "model", "usage"}}}`, read without building
/// the message's content. Errored, cancelled and expired requests bill
/// nothing.
pub(crate) fn batch_result_line(line: &[u8]) -> Option<super::batch::LineUsage> {
    let l: WireBatchLine = serde_json::from_slice(line).ok()?;
    let result = l.result.0?;
    if result.kind.as_ref().and_then(Value::as_str) != Some("succeeded") {
        return None;
    }
    let message = result.message.0?;
    let mut raw = Raw::default();
    raw.merge(message.usage.as_ref()?);
    Some(super::batch::LineUsage {
        model: message
            .model
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_string),
        usage: raw.usage()?,
        uplift_percent: raw.uplift_percent(),
    })
}

/// Usage fields seen so far in a stream (message_delta values are
/// cumulative and may repeat or extend what message_start said).
#[derive(Default, Clone, Copy)]
struct Raw {
    input: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    /// `cache_creation.ephemeral_1h_input_tokens`: the hour-long part.
    cache_creation_1h: Option<u64>,
    output: Option<u64>,
    /// `output_tokens_details.thinking_tokens`: the thinking part of the
    /// output.
    thinking: Option<u64>,
    /// The sums over `usage.iterations`, when the response has them: with
    /// server-side compaction (and other passes the API makes within one
    /// request) the top-level counts leave those passes out, and the
    /// iterations add up to what is billed.
    iterations: Option<Usage>,
    /// The iterations include the message passes (else the top level is
    /// theirs).
    iterations_have_message: bool,
    /// `inference_geo: "us"`: US-only inference, billed at 1.1 times.
    us_only: bool,
    /// `server_tool_use.web_search_requests`: the web searches billed
    /// (cumulative in a stream, as the token counts are; web fetches
    /// bill tokens only).
    web_searches: Option<u64>,
}

impl Raw {
    fn merge(&mut self, u: &Value) {
        let f = |k: &str| u.get(k).and_then(Value::as_u64);
        self.input = f("input_tokens").or(self.input);
        self.cache_read = f("cache_read_input_tokens").or(self.cache_read);
        self.cache_creation = f("cache_creation_input_tokens").or(self.cache_creation);
        self.cache_creation_1h = u
            .pointer("/cache_creation/ephemeral_1h_input_tokens")
            .and_then(Value::as_u64)
            .or(self.cache_creation_1h);
        self.output = f("output_tokens").or(self.output);
        self.web_searches = u
            .pointer("/server_tool_use/web_search_requests")
            .and_then(Value::as_u64)
            .or(self.web_searches);
        if let Some(geo) = u.get("inference_geo").and_then(Value::as_str) {
            self.us_only = geo.eq_ignore_ascii_case("us");
        }
        self.thinking = u
            .pointer("/output_tokens_details/thinking_tokens")
            .and_then(Value::as_u64)
            .or(self.thinking);
        if let Some(list) = u.get("iterations").and_then(Value::as_array)
            && !list.is_empty()
        {
            let mut sum = Usage::default();
            // A list without the message passes themselves (a stream's
            // first event, before the answer) leaves them to the top
            // level, added when the usage is taken (it may still grow).
            self.iterations_have_message = list
                .iter()
                .any(|it| it.get("type").and_then(Value::as_str) == Some("message"));
            for it in list {
                let mut one = Raw::default();
                one.merge_counts(it);
                if let Some(u) = one.usage() {
                    add_counts(&mut sum, &u);
                }
            }
            self.iterations = Some(sum);
        }
    }

    /// The percentage added to every rate for where the request ran:
    /// US-only inference costs 1.1 times the list price.
    fn uplift_percent(&self) -> u32 {
        if self.us_only { 10 } else { 0 }
    }

    /// The counts of one usage object (or one of its iterations), without
    /// its own iterations.
    fn merge_counts(&mut self, u: &Value) {
        let f = |k: &str| u.get(k).and_then(Value::as_u64);
        self.input = f("input_tokens");
        self.cache_read = f("cache_read_input_tokens");
        self.cache_creation = f("cache_creation_input_tokens");
        self.cache_creation_1h = u
            .pointer("/cache_creation/ephemeral_1h_input_tokens")
            .and_then(Value::as_u64);
        self.output = f("output_tokens");
    }

    fn usage(&self) -> Option<Usage> {
        if let Some(mut sum) = self.iterations {
            if !self.iterations_have_message {
                let top = Raw {
                    iterations: None,
                    ..*self
                };
                if let Some(t) = top.usage() {
                    add_counts(&mut sum, &t);
                }
            }
            let top = self.output.unwrap_or(0);
            // The top level's thinking is of its own passes, within the
            // sum's output.
            sum.reasoning_tokens = self.thinking.unwrap_or(0).min(top).min(sum.output_tokens);
            sum.web_searches = self.web_searches.unwrap_or(0);
            return Some(sum);
        }
        if self.input.is_none() && self.output.is_none() {
            return None;
        }
        let read = self.cache_read.unwrap_or(0);
        let write = self.cache_creation.unwrap_or(0);
        let output = self.output.unwrap_or(0);
        Some(Usage {
            input_tokens: self
                .input
                .unwrap_or(0)
                .saturating_add(read)
                .saturating_add(write),
            output_tokens: output,
            cached_input_tokens: read,
            cache_write_input_tokens: write,
            reasoning_tokens: self.thinking.unwrap_or(0).min(output),
            cache_write_1h_input_tokens: self.cache_creation_1h.unwrap_or(0).min(write),
            web_searches: self.web_searches.unwrap_or(0),
            web_searches_preview: 0,
            audio_input_tokens: 0,
            image_input_tokens: 0,
            audio_output_tokens: 0,
            image_output_tokens: 0,
            cached_audio_input_tokens: 0,
            cached_image_input_tokens: 0,
            audio_duration_ms: 0,
        })
    }
}

/// Adds `u`'s token counts (not its reasoning) to `sum`.
fn add_counts(sum: &mut Usage, u: &Usage) {
    sum.input_tokens = sum.input_tokens.saturating_add(u.input_tokens);
    sum.output_tokens = sum.output_tokens.saturating_add(u.output_tokens);
    sum.cached_input_tokens = sum
        .cached_input_tokens
        .saturating_add(u.cached_input_tokens);
    sum.cache_write_input_tokens = sum
        .cache_write_input_tokens
        .saturating_add(u.cache_write_input_tokens);
    sum.cache_write_1h_input_tokens = sum
        .cache_write_1h_input_tokens
        .saturating_add(u.cache_write_1h_input_tokens);
}

/// `usage.service_tier` (`standard`, `priority`, `batch`), sanitised; or
/// `fast` when `usage.speed` says fast mode served the request (billed at
/// a multiple of the standard rates: priced by the model's `priority`
/// rates when it has them, else at the standard ones with a warning).
fn usage_tier(u: &Value) -> Option<String> {
    if u.get("speed").and_then(Value::as_str) == Some("fast") {
        return Some("fast".to_string());
    }
    u.get("service_tier")
        .and_then(Value::as_str)
        .and_then(super::service_tier)
}

/// A Messages API answer, as far as it is read: the content is walked for
/// its text without being built (a tool's input is skipped).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireMessage {
    model: Option<Value>,
    usage: Option<Value>,
    content: ContentText,
}

impl WireMessage {
    fn parsed(self) -> ParsedUsage {
        let mut raw = Raw::default();
        let mut service_tier = None;
        if let Some(u) = &self.usage {
            raw.merge(u);
            service_tier = usage_tier(u);
        }
        ParsedUsage {
            usage: raw.usage(),
            response_model: self
                .model
                .as_ref()
                .and_then(Value::as_str)
                .map(str::to_owned),
            output_text: self.content.0,
            service_tier,
            uplift_percent: raw.uplift_percent(),
            ..Default::default()
        }
    }
}

/// The text of a `content` array's blocks (`text`, then `thinking`),
/// bounded as [`super::push_text`] bounds it. Anything but an array, and
/// any block but an object, has none.
#[derive(Default)]
struct ContentText(String);

impl<'de> serde::Deserialize<'de> for ContentText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Block {
            text: Option<Value>,
            thinking: Option<Value>,
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = ContentText;
            super::lenient_visits!(integers, objects);
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<ContentText, A::Error> {
                let mut text = String::new();
                while let Some(block) = a.next_element::<super::ObjectOr<Block>>()? {
                    for t in block.0.iter().flat_map(|b| [&b.text, &b.thinking]) {
                        if let Some(t) = t.as_ref().and_then(Value::as_str) {
                            super::push_text(&mut text, t);
                        }
                    }
                }
                Ok(ContentText(text))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a Messages API JSON answer bills (Bedrock's InvokeModel answers
/// with Claude's too); nothing when it is not JSON.
pub(crate) fn message_json(body: &[u8]) -> ParsedUsage {
    super::parse_json::<WireMessage>(body)
        .map(WireMessage::parsed)
        .unwrap_or_default()
}

struct JsonParser {
    body: JsonBody,
    /// count_tokens and batch submissions bill nothing themselves.
    free: bool,
}

impl UsageParser for JsonParser {
    fn feed(&mut self, chunk: &[u8]) {
        self.body.feed(chunk);
    }

    fn finish(&mut self) -> ParsedUsage {
        // Free whatever the answer holds, or whether it was read (past the
        // budget of answers held it is not).
        if self.free {
            return ParsedUsage {
                usage: Some(Usage::default()),
                ..Default::default()
            };
        }
        let Some(m) = self.body.bytes().and_then(super::parse_json::<WireMessage>) else {
            return ParsedUsage::default();
        };
        m.parsed()
    }
}

#[derive(Default)]
struct StreamParser {
    sse: SseReader,
    state: StreamState,
}

#[derive(Default)]
struct StreamState {
    raw: Raw,
    model: Option<String>,
    text: String,
    /// A `message_delta` with usage came: the counts are final.
    final_usage: bool,
    /// The type of an `error` event.
    error: Option<String>,
    service_tier: Option<String>,
    /// A `message_delta` with a `stop_reason`, or `message_stop`, came:
    /// the answer's generation is over.
    over: bool,
}

impl StreamState {
    fn on_event(&mut self, data: &str) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(m) = v.get("message") {
                    if let Some(u) = m.get("usage") {
                        self.raw.merge(u);
                        self.service_tier = usage_tier(u).or(self.service_tier.take());
                    }
                    if let Some(name) = str_at(m, &["model"]) {
                        self.model = Some(name);
                    }
                }
            }
            Some("message_delta") => {
                if v.pointer("/delta/stop_reason")
                    .is_some_and(|r| !r.is_null())
                {
                    self.over = true;
                }
                if let Some(u) = v.get("usage") {
                    self.raw.merge(u);
                    self.service_tier = usage_tier(u).or(self.service_tier.take());
                    self.final_usage = true;
                }
            }
            Some("message_stop") => self.over = true,
            Some("content_block_delta") => {
                let d = v.get("delta");
                for k in ["text", "thinking", "partial_json"] {
                    if let Some(t) = d.and_then(|d| d.get(k)).and_then(Value::as_str) {
                        super::push_text(&mut self.text, t);
                    }
                }
            }
            Some("error") => {
                let kind = v.pointer("/error/type").and_then(Value::as_str);
                self.error = Some(
                    kind.and_then(super::error_type)
                        .unwrap_or_else(|| "error".into()),
                );
            }
            _ => {}
        }
    }
}

impl UsageParser for StreamParser {
    fn feed(&mut self, chunk: &[u8]) {
        let state = &mut self.state;
        self.sse.feed(chunk, &mut |e| state.on_event(&e.data));
    }

    fn usage_seen(&self) -> bool {
        self.state.raw.usage().is_some()
    }

    fn generation_over(&self) -> bool {
        self.state.over
    }

    fn finish(&mut self) -> ParsedUsage {
        let state = &mut self.state;
        self.sse.finish(&mut |e| state.on_event(&e.data));
        let usage = state.raw.usage();
        ParsedUsage {
            partial: usage.is_some() && !state.final_usage,
            usage,
            response_model: state.model.take(),
            output_text: std::mem::take(&mut state.text),
            error: state.error.take(),
            service_tier: state.service_tier.take(),
            uplift_percent: state.raw.uplift_percent(),
            ..ParsedUsage::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::testing::{parse_split, request};
    use proptest::prelude::*;

    const MSG_JSON: &[u8] = include_bytes!("fixtures/anthropic/message.json");
    const MSG_SSE: &[u8] = include_bytes!("fixtures/anthropic/message_stream.sse");
    const ERR_JSON: &[u8] = include_bytes!("fixtures/anthropic/error_overloaded.json");

    fn info(op: &'static str) -> RequestInfo {
        RequestInfo {
            operation: op,
            metered: true,
            ..Default::default()
        }
    }

    #[test]
    fn message_batch_results_are_read_line_by_line_per_model() {
        use crate::providers::testing::request;
        let info = Anthropic.request(&request(
            "GET",
            "/v1/messages/batches/msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d/results",
            b"",
        ));
        assert_eq!(info.operation, "batch_results");
        assert!(info.metered && !info.own_row());
        assert_eq!(
            info.batch.as_ref().map(|b| b.id.as_str()),
            Some("msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d")
        );
        for (m, path) in [
            ("GET", "/v1/messages/batches/msgbatch_1"),
            ("POST", "/v1/messages/batches/msgbatch_1/results"),
            ("GET", "/v1/messages/batches"),
        ] {
            assert!(
                Anthropic.request(&request(m, path, b"")).batch.is_none(),
                "{m} {path}"
            );
        }
        let body =
            std::str::from_utf8(include_bytes!("fixtures/anthropic/batch_results.jsonl")).unwrap();
        let p = crate::providers::testing::parse_split(
            &Anthropic,
            &info,
            "application/binary",
            body.as_bytes(),
            &[50, 400],
        );
        let t = p.batch.expect("a tally");
        assert_eq!(t.lines, 5, "the last line needs no newline");
        let got: Vec<_> = t
            .models
            .iter()
            .map(|m| (m.uplift_percent, m.usage, m.results))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    0,
                    Usage {
                        input_tokens: 11 + 100 + 20 + 1,
                        output_tokens: 36 + 2,
                        cached_input_tokens: 100,
                        cache_write_input_tokens: 20,
                        ..Default::default()
                    },
                    2
                ),
                (
                    10,
                    Usage {
                        input_tokens: 5,
                        output_tokens: 7,
                        ..Default::default()
                    },
                    1
                ),
            ]
        );
        assert!(
            t.models
                .iter()
                .all(|m| m.model.as_deref() == Some("claude-sonnet-4-5-20250929"))
        );
    }

    #[test]
    fn classifies_requests() {
        let i = Anthropic.request(&request(
            "POST",
            "/v1/messages",
            br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true}"#,
        ));
        assert_eq!(
            (i.operation, i.streaming, i.max_output_tokens),
            ("chat", true, Some(1024))
        );
        assert_eq!(i.model.as_deref(), Some("claude-sonnet-4-5"));
        let c = Anthropic.request(&request("POST", "/v1/messages/count_tokens", b"{}"));
        assert_eq!(c.operation, "count_tokens");
        assert!(
            !Anthropic
                .request(&request("GET", "/v1/models", b""))
                .metered
        );
    }

    /// The body is read member by member: a member of an unexpected type
    /// is missing, never the parse; a repeated member's last value wins;
    /// a body that is not a JSON object names nothing.
    #[test]
    fn request_members_of_odd_types_lose_only_themselves() {
        let chat = |body: &[u8]| Anthropic.request(&request("POST", "/v1/messages", body));
        let i = chat(br#"{"model":5,"stream":"yes","max_tokens":"x","max_tokens_to_sample":9}"#);
        assert_eq!(
            (i.model, i.streaming, i.max_output_tokens),
            (None, false, Some(9))
        );
        let i = chat(br#"{"model":"a","model":"b","stream":true,"max_tokens":-1,"max_tokens_to_sample":null}"#);
        assert_eq!(
            (i.model.as_deref(), i.streaming, i.max_output_tokens),
            (Some("b"), true, None)
        );
        for body in [&b"[1,2]"[..], b"not json", b"", b"{\"model\":\"m\""] {
            let i = chat(body);
            assert_eq!(
                (i.model, i.streaming, i.max_output_tokens),
                (None, false, None)
            );
        }
        // Claude on Vertex AI: the URL's model wins over the body's.
        let i = messages_request(
            "chat",
            Some("url".into()),
            Some(br#"{"model":"body","max_tokens":3.0}"#),
        );
        assert_eq!(
            (i.model.as_deref(), i.max_output_tokens),
            (Some("url"), None)
        );
    }

    /// A JSON answer is read as the whole document was: odd members lose
    /// only themselves, the text of `text` and `thinking` blocks is kept
    /// for an estimate, and a free call is free whenever the body is JSON.
    #[test]
    fn response_members_of_odd_types_lose_only_themselves() {
        let chat =
            |body: &[u8]| parse_split(&Anthropic, &info("chat"), "application/json", body, &[7]);
        let p = chat(br#"{"model":["m"],"usage":"none","content":"text"}"#);
        assert_eq!(p, ParsedUsage::default());
        let p = chat(
            br#"{"model":"a","model":"b","content":[1,[2],{"text":5},{"type":"text","text":"x"},{"type":"thinking","thinking":"y","text":"z"},{"type":"tool_use","input":{"text":"no"}}],
                "usage":{"input_tokens":"1","output_tokens":2,"service_tier":"priority"}}"#,
        );
        assert_eq!(p.response_model.as_deref(), Some("b"));
        assert_eq!(p.output_text, "xzy");
        assert_eq!(
            p.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((0, 2))
        );
        assert_eq!(p.service_tier.as_deref(), Some("priority"));
        let p = chat(br#"{"usage":null,"content":null,"model":null}"#);
        assert_eq!(p, ParsedUsage::default());
        for (body, usage) in [
            (&b"[1]"[..], Some(Usage::default())),
            (b"7", Some(Usage::default())),
            // Cut, empty or unread (past the budget of answers held):
            // still free.
            (b"{\"input_tokens\":", Some(Usage::default())),
            (b"", Some(Usage::default())),
        ] {
            let p = parse_split(
                &Anthropic,
                &info("count_tokens"),
                "application/json",
                body,
                &[],
            );
            assert_eq!(p.usage, usage, "{}", String::from_utf8_lossy(body));
            assert_eq!(chat(body), ParsedUsage::default());
        }
    }

    /// A request or answer is read without building what is not read (a
    /// whole `Value` of a body costs some 16 times its size): the
    /// messages, a tool's input.
    #[test]
    fn bodies_are_read_without_building_them() {
        use crate::providers::testing::{finish_peak, padded_object, peak_alloc};
        let body = padded_object(r#""model":"m","max_tokens":5,"stream":true"#, 1 << 20);
        let (i, peak) = peak_alloc(|| Anthropic.request(&request("POST", "/v1/messages", &body)));
        assert_eq!(
            (i.model.as_deref(), i.max_output_tokens, i.streaming),
            (Some("m"), Some(5), true)
        );
        assert!(peak < body.len() / 8, "the request cost {peak} bytes");
        let body = padded_object(
            r#""model":"m","content":[{"type":"text","text":"hi"},{"type":"tool_use","input":{"xs":[1,2,3]}}],"usage":{"input_tokens":3,"output_tokens":4}"#,
            1 << 20,
        );
        let (p, peak) = finish_peak(&Anthropic, &info("chat"), "application/json", &body);
        assert_eq!(
            p.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((3, 4))
        );
        assert_eq!(
            (p.response_model.as_deref(), p.output_text.as_str()),
            (Some("m"), "hi")
        );
        assert!(peak < body.len() / 8, "the answer cost {peak} bytes");
    }

    /// With server-side compaction the top-level counts leave the
    /// compaction pass out; `usage.iterations` adds up to what is billed
    /// (Anthropic's own example: 23,000/1,000 at the top, 203,000/4,500
    /// over the iterations), in a JSON answer and in a stream whose
    /// `message_delta` brings them. Thinking tokens are the reasoning.
    #[test]
    fn iterations_are_summed_and_thinking_is_reasoning() {
        let json = br#"{"model":"claude-opus-4-6","content":[],"usage":{"input_tokens":23000,"output_tokens":1000,
            "output_tokens_details":{"thinking_tokens":400},
            "iterations":[{"type":"compaction","input_tokens":180000,"output_tokens":3500},
                          {"type":"message","input_tokens":22000,"cache_read_input_tokens":1000,"output_tokens":1000}]}}"#;
        let p = parse_split(&Anthropic, &info("chat"), "application/json", json, &[17]);
        let u = p.usage.expect("usage");
        assert_eq!(
            (
                u.input_tokens,
                u.output_tokens,
                u.cached_input_tokens,
                u.reasoning_tokens
            ),
            (203_000, 4_500, 1_000, 400)
        );
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-opus-4-6\",\"usage\":{\"input_tokens\":23000,\"output_tokens\":1}}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1000,\"iterations\":[{\"type\":\"compaction\",\"input_tokens\":180000,\"output_tokens\":3500},{\"type\":\"message\",\"input_tokens\":23000,\"output_tokens\":1000}]}}\n\n";
        let mut i = info("chat");
        i.streaming = true;
        let p = parse_split(
            &Anthropic,
            &i,
            "text/event-stream",
            stream.as_bytes(),
            &[50],
        );
        let u = p.usage.expect("usage");
        assert_eq!((u.input_tokens, u.output_tokens), (203_000, 4_500));
        // Iterations without the message passes: the top level is theirs.
        let partial = br#"{"model":"m","content":[],"usage":{"input_tokens":500,"output_tokens":20,
            "iterations":[{"type":"compaction","input_tokens":9000,"output_tokens":300}]}}"#;
        let u = parse_split(&Anthropic, &info("chat"), "application/json", partial, &[])
            .usage
            .expect("usage");
        assert_eq!((u.input_tokens, u.output_tokens), (9_500, 320));
        // The same in a stream whose later event grows the output without
        // repeating the iterations.
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":500,\"output_tokens\":1,\"iterations\":[{\"type\":\"compaction\",\"input_tokens\":9000,\"output_tokens\":300}]}}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":20}}\n\n";
        let mut si = info("chat");
        si.streaming = true;
        let u = parse_split(
            &Anthropic,
            &si,
            "text/event-stream",
            stream.as_bytes(),
            &[60],
        )
        .usage
        .expect("usage");
        assert_eq!((u.input_tokens, u.output_tokens), (9_500, 320));
        // Without iterations: the top level, thinking capped at the output.
        let plain = br#"{"model":"m","content":[],"usage":{"input_tokens":5,"output_tokens":7,
            "output_tokens_details":{"thinking_tokens":9}}}"#;
        let u = parse_split(&Anthropic, &info("chat"), "application/json", plain, &[])
            .usage
            .expect("usage");
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.reasoning_tokens),
            (5, 7, 7)
        );
    }

    #[test]
    fn the_service_tier_is_read_from_the_usage() {
        let json = crate::providers::testing::parse_split(
            &Anthropic,
            &info("chat"),
            "application/json",
            MSG_JSON,
            &[],
        );
        assert_eq!(json.service_tier.as_deref(), Some("standard"));
        // US-only inference: 10 % on every rate.
        let us = br#"{"model":"claude-opus-5-5","content":[],"usage":{"input_tokens":3,"output_tokens":4,"inference_geo":"us"}}"#;
        let p = parse_split(&Anthropic, &info("chat"), "application/json", us, &[]);
        assert_eq!(p.uplift_percent, 10);
        let global = br#"{"model":"claude-opus-5-5","content":[],"usage":{"input_tokens":3,"output_tokens":4,"inference_geo":"global"}}"#;
        let p = parse_split(&Anthropic, &info("chat"), "application/json", global, &[]);
        assert_eq!(p.uplift_percent, 0);
        // Fast mode is what the bill depends on.
        let fast = br#"{"model":"claude-opus-5-5","content":[],"usage":{"input_tokens":3,"output_tokens":4,"service_tier":"standard","speed":"fast"}}"#;
        let p = parse_split(&Anthropic, &info("chat"), "application/json", fast, &[]);
        assert_eq!(p.service_tier.as_deref(), Some("fast"));
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1,\"service_tier\":\"priority\"}}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":12}}\n\n";
        let mut i = info("chat");
        i.streaming = true;
        let p = crate::providers::testing::parse_split(
            &Anthropic,
            &i,
            "text/event-stream",
            stream.as_bytes(),
            &[40],
        );
        assert_eq!(p.usage.map(|u| u.output_tokens), Some(12));
        assert_eq!(
            p.service_tier.as_deref(),
            Some("priority"),
            "kept past message_delta"
        );
    }

    #[test]
    fn a_stream_has_its_usage_from_message_start_on() {
        use crate::providers::testing::usage_seen_after;
        let start_ends = MSG_SSE.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        let seen =
            |enc| usage_seen_after(&Anthropic, &info("chat"), "text/event-stream", MSG_SSE, enc);
        assert_eq!(seen(None), Some(start_ends));
        assert!(seen(Some("gzip")).is_some());
        // A JSON answer's usage is read at its end only.
        let json = usage_seen_after(
            &Anthropic,
            &info("chat"),
            "application/json",
            MSG_JSON,
            None,
        );
        assert_eq!(json, None);
    }

    /// A stream's generation is over at `message_delta` with its
    /// `stop_reason` (only `message_stop` follows), not at one without.
    #[test]
    fn a_streams_generation_is_over_at_its_stop_reason() {
        use crate::providers::testing::{end_of_event_with, generation_over_after};
        let sse = "text/event-stream";
        assert_eq!(
            generation_over_after(&Anthropic, &info("chat"), sse, MSG_SSE),
            Some(end_of_event_with(MSG_SSE, r#""stop_reason":"tool_use""#))
        );
        // A delta without a stop reason; then only `message_stop` ends it.
        let body = b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":null},\"usage\":{\"output_tokens\":3}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(
            generation_over_after(&Anthropic, &info("chat"), sse, body),
            Some(body.len())
        );
        assert_eq!(
            generation_over_after(&Anthropic, &info("chat"), "application/json", MSG_JSON),
            None
        );
    }

    /// Where the fixture's final counts (message_delta) begin.
    fn before_message_delta() -> usize {
        MSG_SSE
            .windows(20)
            .position(|w| w == b"event: message_delta")
            .unwrap()
    }

    #[test]
    fn a_stream_cut_before_its_final_counts_is_partial() {
        let cut = before_message_delta();
        let p = parse_split(
            &Anthropic,
            &info("chat"),
            "text/event-stream",
            &MSG_SSE[..cut],
            &[],
        );
        assert!(p.partial);
        // message_start's placeholder output, and the text that streamed.
        assert_eq!(p.usage.unwrap().output_tokens, 2);
        assert!(
            p.output_text.starts_with("Okay, let's check"),
            "{}",
            p.output_text
        );
        let whole = parse_split(&Anthropic, &info("chat"), "text/event-stream", MSG_SSE, &[]);
        assert!(!whole.partial);
        assert_eq!(whole.usage.unwrap().output_tokens, 89);
        assert_eq!((whole.error, p.error), (None, None));
    }

    #[test]
    fn an_error_event_mid_stream_is_the_records_error() {
        let cut = before_message_delta();
        let mut body = MSG_SSE[..cut].to_vec();
        body.extend_from_slice(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
        );
        let p = parse_split(&Anthropic, &info("chat"), "text/event-stream", &body, &[]);
        assert_eq!(p.error.as_deref(), Some("overloaded_error"));
        assert!(p.partial);
        // A type that is not a plain identifier is not recorded as sent.
        let odd =
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"sk-ant-KEY x\"}}\n\n";
        let p = parse_split(&Anthropic, &info("chat"), "text/event-stream", odd, &[]);
        assert_eq!(p.error.as_deref(), Some("error"));
    }

    #[test]
    fn huge_counts_saturate_instead_of_wrapping() {
        let body = format!(
            r#"{{"type":"message","model":"m","usage":{{"input_tokens":{},"cache_read_input_tokens":{},"cache_creation_input_tokens":5,"output_tokens":1}}}}"#,
            u64::MAX - 1,
            u64::MAX
        );
        let p = parse_split(
            &Anthropic,
            &info("chat"),
            "application/json",
            body.as_bytes(),
            &[],
        );
        assert_eq!(p.usage.unwrap().input_tokens, u64::MAX);
    }

    /// `usage.server_tool_use.web_search_requests` is the searches billed:
    /// read from a JSON answer, and from a stream's last `message_delta`
    /// (cumulative, as its token counts are: not summed); web fetches
    /// bill nothing apart.
    #[test]
    fn web_searches_are_read_from_server_tool_use() {
        let body = br#"{"type":"message","model":"claude-sonnet-4-5","usage":{"input_tokens":9000,"output_tokens":400,"server_tool_use":{"web_search_requests":3,"web_fetch_requests":2}}}"#;
        let u = parse_split(&Anthropic, &info("chat"), "application/json", body, &[])
            .usage
            .expect("usage");
        assert_eq!((u.input_tokens, u.web_searches), (9000, 3));
        let sse = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n\
                   event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":5,\"server_tool_use\":{\"web_search_requests\":1}}}\n\n\
                   event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":5200,\"output_tokens\":90,\"server_tool_use\":{\"web_search_requests\":2}}}\n\n";
        for split in [vec![], vec![17, 200, 333]] {
            let u = parse_split(
                &Anthropic,
                &info("chat"),
                "text/event-stream",
                sse.as_bytes(),
                &split,
            )
            .usage
            .expect("usage");
            assert_eq!(
                (u.input_tokens, u.output_tokens, u.web_searches),
                (5200, 90, 2)
            );
        }
        let none = br#"{"usage":{"input_tokens":1,"output_tokens":1,"server_tool_use":null}}"#;
        let u = parse_split(&Anthropic, &info("chat"), "application/json", none, &[])
            .usage
            .expect("usage");
        assert_eq!(u.web_searches, 0);
    }

    #[test]
    fn hour_long_cache_writes_are_read() {
        let body = br#"{"type":"message","model":"claude-sonnet-4-5","usage":{"input_tokens":10,"cache_creation_input_tokens":300,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"output_tokens":5}}"#;
        let u = parse_split(&Anthropic, &info("chat"), "application/json", body, &[])
            .usage
            .expect("usage");
        assert_eq!(
            (
                u.input_tokens,
                u.cache_write_input_tokens,
                u.cache_write_1h_input_tokens
            ),
            (310, 300, 200)
        );
        // A stream: message_start carries the split.
        let sse = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":300,\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":300},\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\n";
        let u = parse_split(
            &Anthropic,
            &info("chat"),
            "text/event-stream",
            sse.as_bytes(),
            &[],
        )
        .usage
        .expect("usage");
        assert_eq!((u.cache_write_1h_input_tokens, u.output_tokens), (300, 7));
        // More than the writes is capped at them.
        let odd = br#"{"usage":{"input_tokens":1,"cache_creation_input_tokens":5,"cache_creation":{"ephemeral_1h_input_tokens":9},"output_tokens":1}}"#;
        let u = parse_split(&Anthropic, &info("chat"), "application/json", odd, &[])
            .usage
            .expect("usage");
        assert_eq!(u.cache_write_1h_input_tokens, 5);
    }

    #[test]
    fn json_usage_with_cache() {
        let p = parse_split(&Anthropic, &info("chat"), "application/json", MSG_JSON, &[]);
        assert_eq!(
            p.usage.unwrap(),
            Usage {
                input_tokens: 2095 + 1500 + 200,
                output_tokens: 503,
                cached_input_tokens: 1500,
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
            }
        );
        assert_eq!(
            p.response_model.as_deref(),
            Some("claude-sonnet-4-5-20250929")
        );
    }

    #[test]
    fn stream_usage_start_plus_delta() {
        let p = parse_split(&Anthropic, &info("chat"), "text/event-stream", MSG_SSE, &[]);
        let u = p.usage.unwrap();
        assert_eq!(u.input_tokens, 472 + 10);
        assert_eq!(u.cached_input_tokens, 10);
        assert_eq!(u.output_tokens, 89);
        assert_eq!(
            p.response_model.as_deref(),
            Some("claude-sonnet-4-5-20250929")
        );
    }

    #[test]
    fn count_tokens_is_free_and_errors_have_no_usage() {
        let p = parse_split(
            &Anthropic,
            &info("count_tokens"),
            "application/json",
            br#"{"input_tokens":2095}"#,
            &[],
        );
        assert_eq!(p.usage, Some(Usage::default()));
        let e = parse_split(&Anthropic, &info("chat"), "application/json", ERR_JSON, &[]);
        assert_eq!(e.usage, None);
    }

    proptest! {
        #[test]
        fn any_split_same_usage(mut splits in proptest::collection::vec(0usize..MSG_SSE.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(
                parse_split(&Anthropic, &info("chat"), "text/event-stream", MSG_SSE, &splits),
                parse_split(&Anthropic, &info("chat"), "text/event-stream", MSG_SSE, &[])
            );
        }
    }
}
