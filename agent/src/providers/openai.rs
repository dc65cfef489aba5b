//! OpenAI (and the OpenAI-compatible hosts): chat completions, legacy
//! completions, embeddings and the Responses API, JSON and SSE.

use serde_json::Value;

use super::sse::SseReader;
use super::{
    Count, JsonBody, Members, ObjectOr, ParsedUsage, Provider, RequestInfo, RequestView,
    StreamOptions, UsageParser, str_at,
};
use crate::meter::Usage;

pub struct OpenAi;

/// `body` (a JSON object) with `member` (`"key":value`) inserted as its
/// first member.
fn prepend_member(body: &[u8], member: &[u8]) -> Option<bytes::Bytes> {
    let open = body.iter().position(|&b| b == b'{')?;
    let rest = &body[open + 1..];
    let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = Vec::with_capacity(body.len() + member.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(member);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
    Some(bytes::Bytes::from(out))
}

/// `body` (a JSON object) with `"include_usage":true` in its
/// `stream_options` (the last such member, which the provider reads): put
/// in front of the options' members, over a `null` or non-`true` value
/// already there, or as a new `stream_options` when there is none. Every
/// other byte stays as the client sent it (keys in their order, numbers as
/// written). `None` when the options already ask for usage, or when the
/// body or its `stream_options` is not an object (the provider refuses
/// that itself).
fn splice_include_usage(body: &[u8]) -> Option<bytes::Bytes> {
    let text = std::str::from_utf8(body).ok()?;
    let top: Members = serde_json::from_str(text).ok()?;
    let Some(i) = top.0.iter().rposition(|m| m.key == "stream_options") else {
        return prepend_member(body, br#""stream_options":{"include_usage":true}"#);
    };
    let raw = top.0[i].value.get();
    let at = top.end_in(text, i) - raw.len();
    let splice = |from: usize, to: usize, with: &[u8]| {
        let mut out = Vec::with_capacity(body.len() + with.len());
        out.extend_from_slice(&body[..from]);
        out.extend_from_slice(with);
        out.extend_from_slice(&body[to..]);
        Some(bytes::Bytes::from(out))
    };
    if raw == "null" {
        return splice(at, at + raw.len(), br#"{"include_usage":true}"#);
    }
    let opts: Members = serde_json::from_str(raw).ok()?;
    match opts.0.iter().rposition(|m| m.key == "include_usage") {
        Some(j) if opts.0[j].value.get() == "true" => None,
        Some(j) => {
            let to = at + opts.end_in(raw, j);
            splice(to - opts.0[j].value.get().len(), to, b"true")
        }
        None => {
            let inner = prepend_member(raw.as_bytes(), br#""include_usage":true"#)?;
            splice(at, at + raw.len(), &inner)
        }
    }
}

/// The operation a POST path names. Paths are matched by suffix so that
/// hosts that mount the API under a prefix (`/openai/v1/...`, `/api/v1/...`)
/// work. Batch submissions and file uploads are recorded as such with no
/// tokens (their usage is billed later, by the batch).
pub fn operation(path: &str) -> &'static str {
    let p = path.trim_end_matches('/');
    if p.ends_with("/chat/completions") {
        "chat"
    } else if p.ends_with("/completions") {
        "text_completion"
    } else if p.ends_with("/embeddings") {
        "embeddings"
    } else if p.ends_with("/responses") || p.ends_with("/responses/compact") {
        // A compaction pass reads the whole conversation and bills it.
        "responses"
    } else if p.ends_with("/batches") || p.contains("/batches/") {
        "batch"
    } else if p.ends_with("/files") || p.ends_with("/uploads") || p.contains("/uploads/") {
        "file_upload"
    } else if p.ends_with("/moderations") {
        "moderation"
    } else if p.contains("/audio/") {
        "audio"
    } else if p.contains("/images/") {
        "image"
    } else {
        "other"
    }
}

/// A request for the state of an earlier Responses API response: `GET
/// …/responses/{id}` (polling a background response, or resuming its
/// stream with `?stream=true`) and `POST …/responses/{id}/cancel`. Not
/// `…/responses/{id}/input_items`, nor `/responses/compact`. Gives the id.
fn retrieved_id(method: &http::Method, path: &str) -> Option<String> {
    let (parent, id) = super::retrieval_path(method, path)?;
    (parent.ends_with("/responses") && id != "compact").then_some(id)
}

/// A download of a file's content, `GET {prefix}/files/{id}/content`
/// where the prefix ends in an API version or `openai` (`/v1`, Azure's
/// `/openai`, Gemini's `/v1beta/openai`): a batch's output file is one.
/// Not a container's or a vector store's files. Gives the file's id.
fn file_content_id(method: &http::Method, path: &str) -> Option<String> {
    if method != http::Method::GET {
        return None;
    }
    let rest = path.trim_end_matches('/').strip_suffix("/content")?;
    let (parent, id) = rest.rsplit_once('/')?;
    let above = parent.strip_suffix("/files")?.rsplit('/').next()?;
    let versioned = above == "openai"
        || (above.len() > 1
            && above.starts_with('v')
            && above[1..].starts_with(|c: char| c.is_ascii_digit()));
    versioned.then(|| super::path_id(id)).flatten()
}

/// A line of a batch's output file, as far as it is read.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatchLine {
    response: ObjectOr<WireBatchResponse>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatchResponse {
    status_code: Count,
    body: ObjectOr<WireBatchBody>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatchBody {
    model: Option<Value>,
    usage: ObjectOr<WireUsage>,
    /// A Responses answer's searches (see [`WebSearchCalls`]), and the
    /// search tools it lists.
    output: WebSearchCalls,
    tools: SearchTools,
}

/// A line of a batch's output file: `{"custom_id", "response":
/// {"status_code", "body": {… "model", "usage"}}, "error"}`, read without
/// building the answer's content. A request the batch could not serve (an
/// error status, no body) bills nothing.
pub(crate) fn batch_result_line(line: &[u8]) -> Option<super::batch::LineUsage> {
    batch_line(line, false)
}

/// [`batch_result_line`] for a host that may count thoughts beside the
/// completion (see [`WireUsage::usage_for`]).
pub(crate) fn batch_result_line_thoughts_beside(line: &[u8]) -> Option<super::batch::LineUsage> {
    batch_line(line, true)
}

fn batch_line(line: &[u8], thoughts_beside: bool) -> Option<super::batch::LineUsage> {
    let l: WireBatchLine = serde_json::from_slice(line).ok()?;
    let r = l.response.0?;
    if r.status_code.0.is_some_and(|c| !(200..300).contains(&c)) {
        return None;
    }
    let body = r.body.0?;
    Some(super::batch::LineUsage {
        model: body
            .model
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_string),
        usage: body
            .output
            .billed(body.tools, body.usage.0?.usage_for(thoughts_beside)?),
        uplift_percent: 0,
    })
}

/// Operations whose responses may carry token usage: image generation
/// and edits with GPT image models (`usage.input_tokens`/`output_tokens`,
/// JSON or the stream's `image_generation.completed`), and transcriptions
/// with token-billed models (`usage.type = "tokens"`) too. (DALL-E and
/// `whisper-1` report none: their records have no tokens, as before.)
fn has_usage(op: &str) -> bool {
    matches!(
        op,
        "chat" | "text_completion" | "embeddings" | "responses" | "image" | "audio"
    )
}

impl Provider for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn request(&self, req: &RequestView<'_>) -> RequestInfo {
        if let Some(info) = super::evals::call(req.method, req.path) {
            return info;
        }
        if let Some(id) = file_content_id(req.method, req.path) {
            // A batch's output file, or any other file: lines that bill
            // nothing are rows of nothing.
            return RequestInfo {
                operation: super::batch::OPERATION,
                metered: true,
                batch: Some(super::BatchResults::new(id, super::batch::Format::OpenAi)),
                ..Default::default()
            };
        }
        if let Some(id) = retrieved_id(req.method, req.path) {
            return RequestInfo {
                operation: "responses",
                metered: true,
                retrieves: Some(id),
                streaming: req
                    .query
                    .is_some_and(|q| q.split('&').any(|kv| kv == "stream=true")),
                ..Default::default()
            };
        }
        if req.method != http::Method::POST {
            return RequestInfo {
                operation: "other",
                metered: false,
                ..Default::default()
            };
        }
        if req.path.starts_with("/anthropic/") {
            // Anthropic's Messages API on an OpenAI-compatible host
            // (DeepSeek's `/anthropic`, what Claude Code is pointed at):
            // read as Anthropic's, recorded and priced as the host's.
            let mut info = super::anthropic::Anthropic.request(req);
            info.wire = Some(crate::config::ApiKind::Anthropic);
            return info;
        }
        let op = operation(req.path);
        if !has_usage(op) {
            return RequestInfo {
                operation: op,
                metered: true,
                ..Default::default()
            };
        }
        let head = req.body.and_then(super::Head::parse);
        let stream_options = head.as_ref().map_or(StreamOptions::Unread, |h| {
            StreamOptions::of(h.stream_options.as_ref())
        });
        let (model, streaming, max_out) = match &head {
            Some(h) => (
                h.model(),
                h.stream.as_ref().and_then(Value::as_bool).unwrap_or(false),
                [
                    &h.max_completion_tokens,
                    &h.max_output_tokens,
                    &h.max_tokens,
                ]
                .into_iter()
                .find_map(|v| v.as_ref().and_then(Value::as_u64)),
            ),
            None => (None, false, None),
        };
        // Image edits and transcriptions are multipart forms: their model
        // and stream flag are form fields.
        let (model, streaming) = match (&head, req.body) {
            (None, Some(body)) if matches!(op, "image" | "audio") => (
                multipart_field(body, "model"),
                multipart_field(body, "stream").is_some_and(|v| v == "true"),
            ),
            _ => (model, streaming),
        };
        let background = op == "responses"
            && head
                .as_ref()
                .and_then(|h| h.background.as_ref())
                .and_then(Value::as_bool)
                .unwrap_or(false);
        let choices = head
            .as_ref()
            .and_then(|h| h.n.as_ref())
            .and_then(Value::as_u64)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        RequestInfo {
            operation: op,
            metered: true,
            model,
            streaming,
            max_output_tokens: max_out,
            choices,
            injected_usage: false,
            stream_options,
            refuses_stream_options: false,
            api: None,
            background,
            ..Default::default()
        }
    }

    fn rewrite_request(&self, info: &mut RequestInfo, body: &[u8]) -> Option<bytes::Bytes> {
        if !info.streaming
            || !matches!(info.operation, "chat" | "text_completion")
            || info.refuses_stream_options
        {
            return None;
        }
        // Usually the client names no `stream_options` (`request` read that
        // with the rest of the body's head): the member is spliced in front
        // of the client's own bytes, which reach the provider unchanged (no
        // re-serialising of a long prompt, no reordered keys or reformatted
        // numbers).
        match info.stream_options {
            StreamOptions::Absent => {
                let out = prepend_member(body, br#""stream_options":{"include_usage":true}"#)?;
                info.injected_usage = true;
                return Some(out);
            }
            StreamOptions::AsksForUsage => return None,
            // Present without it, or not read: spliced into the client's
            // own `stream_options`, the rest of the bytes as they came.
            StreamOptions::Other | StreamOptions::Unread => {}
        }
        let out = splice_include_usage(body)?;
        info.injected_usage = true;
        Some(out)
    }

    fn response_filter(&self, info: &RequestInfo) -> Option<Box<dyn super::BodyFilter>> {
        info.injected_usage
            .then(|| Box::new(UsageChunkFilter::default()) as Box<dyn super::BodyFilter>)
    }

    fn response_parser(
        &self,
        info: &RequestInfo,
        status: u16,
        headers: &http::HeaderMap,
    ) -> Box<dyn UsageParser> {
        if let Some(b) = &info.batch {
            super::batch::parser(b, status)
        } else if info.sessions.is_some() {
            Box::new(super::evals::RunParser::new(info))
        } else if matches!(info.operation, "image" | "audio") && (200..300).contains(&status) {
            match super::content_type(headers).as_str() {
                "application/json" | "text/event-stream" => Box::new(MediaUsage {
                    image: info.operation == "image",
                    ..MediaUsage::default()
                }),
                // Speech comes back as audio, a transcription as text or
                // subtitles when asked: nothing to read, and not held.
                _ => Box::new(super::NoUsage),
            }
        } else if !has_usage(info.operation) {
            Box::new(super::NoUsage)
        } else if super::content_type(headers) == "text/event-stream" {
            Box::new(StreamParser {
                thoughts_beside: info.thoughts_beside_completion,
                choices: Choices::of(info.choices),
                ..StreamParser::default()
            })
        } else {
            Box::new(JsonParser(
                JsonBody::new(JsonBody::DEFAULT_LIMIT),
                info.thoughts_beside_completion,
            ))
        }
    }
}

/// A short text field of a `multipart/form-data` body (`model`, `stream`):
/// the value after the part whose header names it, up to the line's end;
/// `None` when there is none, or it is longer than a model name may be.
fn multipart_field(body: &[u8], name: &str) -> Option<String> {
    if !body.starts_with(b"--") {
        return None;
    }
    let needle = format!("name=\"{name}\"");
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    let mut from = 0;
    while let Some(at) = finder.find(&body[from..]) {
        let after = from + at + needle.len();
        from = after;
        // The name ends the parameter (not `name="model_x"`), and the
        // part's headers end at a blank line.
        if !matches!(body.get(after), Some(b'\r' | b'\n' | b';')) {
            continue;
        }
        let rest = &body[after..];
        let head_end = memchr::memmem::find(rest, b"\r\n\r\n")?;
        let value = &rest[head_end + 4..];
        let line = value.split(|&b| b == b'\r').next()?;
        if line.len() > crate::meter::MAX_MODEL_NAME {
            return None;
        }
        return std::str::from_utf8(line).ok().map(str::to_string);
    }
    None
}

/// How much of an image's or audio's answer [`MediaUsage`] keeps: the end,
/// where the usage is.
const MEDIA_TAIL: usize = 64 * 1024;

/// Images and audio: the usage at the end of the answer (a JSON object's
/// last member, or the stream's last event), after what may be megabytes
/// of base64 image data, which is never held: only the last
/// [`MEDIA_TAIL`] bytes are. An answer with no token usage (DALL-E,
/// `whisper-1`'s `duration` usage) counts no tokens and is no error, as
/// before these operations were read.
#[derive(Default)]
struct MediaUsage {
    tail: Vec<u8>,
    /// An image operation: its output is the image, unless the usage
    /// splits it (`output_tokens_details.image_tokens`, since
    /// gpt-image-1.5; gpt-image-1 gives no split).
    image: bool,
}

impl UsageParser for MediaUsage {
    fn feed(&mut self, chunk: &[u8]) {
        if chunk.len() >= MEDIA_TAIL {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - MEDIA_TAIL..]);
            return;
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 2 * MEDIA_TAIL {
            let cut = self.tail.len() - MEDIA_TAIL;
            self.tail.drain(..cut);
        }
    }

    fn finish(&mut self) -> ParsedUsage {
        let mut usage = last_usage(&self.tail).unwrap_or_default();
        if self.image && usage.image_output_tokens == 0 {
            usage.image_output_tokens = usage.output_tokens;
        }
        ParsedUsage {
            usage: Some(usage),
            ..Default::default()
        }
    }
}

/// The last `"usage"` member in `b` whose value is a token usage. A
/// `"usage"` inside a string has its quotes escaped (`\"usage\"`), and
/// base64 has none: neither is taken.
fn last_usage(b: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = b.len();
    while let Some(i) = memchr::memmem::rfind(&b[..end], KEY) {
        end = i;
        if i > 0 && b[i - 1] == b'\\' {
            continue;
        }
        let rest = b[i + KEY.len()..].trim_ascii_start();
        let Some(value) = rest.strip_prefix(b":") else {
            continue;
        };
        let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Value>();
        if let Some(Ok(v)) = values.next()
            && let Some(u) = usage_from(&v)
        {
            return Some(u);
        }
    }
    None
}

/// Usage from an OpenAI `usage` object, in either the chat/completions
/// shape (`prompt_tokens`) or the Responses shape (`input_tokens`).
pub fn usage_from(u: &Value) -> Option<Usage> {
    usage_from_for(u, false)
}

/// Whether one item of a Responses `output` is a billed web search: a
/// `web_search_call` whose action searched (opening a page or finding in
/// it is not billed; an item without an action, as `web_search_preview`
/// gave them, searched) and that did not fail.
fn billed_search(kind: Option<&str>, action: Option<&str>, status: Option<&str>) -> bool {
    kind == Some("web_search_call")
        && action.is_none_or(|a| a == "search")
        && status != Some("failed")
}

/// The usage of a Responses object already built as a `Value` (a
/// stream's `response.completed`, an answer the fast read could not take),
/// with its billed web searches (read by [`WebSearchCalls`]).
fn response_usage(response: &Value, thoughts_beside: bool) -> Option<Usage> {
    let usage = usage_from_for(response.get("usage")?, thoughts_beside)?;
    let searches = response
        .get("output")
        .and_then(|o| <WebSearchCalls as serde::Deserialize>::deserialize(o).ok())
        .unwrap_or_default();
    let tools = response
        .get("tools")
        .and_then(|t| <SearchTools as serde::Deserialize>::deserialize(t).ok())
        .unwrap_or_default();
    Some(searches.billed(tools, usage))
}

/// The web search tools a Responses object lists in its `tools`: the
/// current `web_search` (and its dated names) and the earlier
/// `web_search_preview`, which OpenAI bills apart on non-reasoning
/// models. Any other JSON reads as none.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SearchTools {
    pub current: bool,
    pub preview: bool,
}

impl<'de> serde::Deserialize<'de> for SearchTools {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SearchTools;
            super::lenient_visits!(integers, objects);
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<SearchTools, A::Error> {
                let mut t = SearchTools::default();
                while let Some(super::TypeOf(kind)) = a.next_element()? {
                    let kind = kind.as_deref().unwrap_or("");
                    if kind.starts_with("web_search_preview") {
                        t.preview = true;
                    } else if kind == "web_search" || kind.starts_with("web_search_2") {
                        t.current = true;
                    }
                }
                Ok(t)
            }
        }
        d.deserialize_any(V)
    }
}

impl WebSearchCalls {
    /// `usage` with these searches, counted as `web_search_preview`'s when
    /// that is the only search tool `tools` lists (with both listed, the
    /// searches are priced as the current tool's, the lower price).
    pub fn billed(self, tools: SearchTools, usage: Usage) -> Usage {
        Usage {
            web_searches: self.0,
            web_searches_preview: if tools.preview && !tools.current {
                self.0
            } else {
                0
            },
            ..usage
        }
    }
}

/// The billed web searches of a Responses `output`, counted as it is read
/// (see [`billed_search`]), the items otherwise skipped, not built. Any
/// other JSON reads as none.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WebSearchCalls(pub u64);

impl<'de> serde::Deserialize<'de> for WebSearchCalls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Whether one `output` item is a billed search: its `type`,
        /// `status` and action's `type` read member by member.
        #[derive(Default)]
        struct Item(bool);
        impl<'de> serde::Deserialize<'de> for Item {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Item;
                    super::lenient_visits!(integers, arrays);
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        a: A,
                    ) -> Result<Item, A::Error> {
                        let (mut kind, mut status) = (None::<Value>, None::<Value>);
                        let mut action = super::TypeOf(None);
                        super::visit_members(a, |k, a| {
                            match k {
                                "type" => kind = a.next_value()?,
                                "status" => status = a.next_value()?,
                                "action" => action = a.next_value()?,
                                _ => return Ok(false),
                            }
                            Ok(true)
                        })?;
                        Ok(Item(billed_search(
                            kind.as_ref().and_then(Value::as_str),
                            action.0.as_deref(),
                            status.as_ref().and_then(Value::as_str),
                        )))
                    }
                }
                d.deserialize_any(V)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WebSearchCalls;
            super::lenient_visits!(integers, objects);
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<WebSearchCalls, A::Error> {
                let mut n = 0u64;
                while let Some(Item(billed)) = a.next_element::<Item>()? {
                    n += u64::from(billed);
                }
                Ok(WebSearchCalls(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// [`usage_from`], for a host that may count thoughts beside the
/// completion (see [`WireUsage::usage_for`]).
fn usage_from_for(u: &Value, thoughts_beside: bool) -> Option<Usage> {
    serde::Deserialize::deserialize(u)
        .ok()
        .and_then(|w: ObjectOr<WireUsage>| w.0?.usage_for(thoughts_beside))
}

/// An OpenAI `usage` object as it arrives, in the chat/completions names
/// or the Responses API names, read without building it; a member of an
/// unexpected type reads as missing.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(default)]
pub struct WireUsage {
    prompt_tokens: Count,
    completion_tokens: Count,
    input_tokens: Count,
    output_tokens: Count,
    total_tokens: Count,
    prompt_tokens_details: ObjectOr<WireDetails>,
    input_tokens_details: ObjectOr<WireDetails>,
    completion_tokens_details: ObjectOr<WireDetails>,
    output_tokens_details: ObjectOr<WireDetails>,
    /// A token-billed transcription's split of its input (`audio_tokens`,
    /// `text_tokens`), and a Realtime response's (with its cache reads),
    /// under this singular name.
    input_token_details: ObjectOr<WireDetails>,
    /// A Realtime response's split of its output.
    output_token_details: ObjectOr<WireDetails>,
    /// DeepSeek's cache reads, beside (or instead of) the OpenAI-shaped
    /// `prompt_tokens_details.cached_tokens`.
    prompt_cache_hit_tokens: Count,
    /// A transcription billed by the second (`"type": "duration"`): its
    /// length.
    seconds: Option<Value>,
}

#[derive(serde::Deserialize, Default, Debug)]
#[serde(default)]
struct WireDetails {
    cached_tokens: Count,
    /// Prompt tokens written to the cache (billed apart since GPT-5.6).
    cache_write_tokens: Count,
    reasoning_tokens: Count,
    /// Audio and image tokens: of the input (audio chat models,
    /// transcriptions, image edits' input images) or of the output (audio
    /// answers, generated images).
    audio_tokens: Count,
    image_tokens: Count,
    /// Of the cache reads, the audio and image tokens (a Realtime
    /// response's).
    cached_tokens_details: ObjectOr<WireCachedDetails>,
}

#[derive(serde::Deserialize, Default, Debug)]
#[serde(default)]
struct WireCachedDetails {
    audio_tokens: Count,
    image_tokens: Count,
}

impl WireUsage {
    /// The usage, when the object names its input tokens.
    pub fn usage(&self) -> Option<Usage> {
        self.usage_for(false)
    }

    /// The usage; with `thoughts_beside`, for a host that may leave its
    /// thoughts out of `completion_tokens` and count them only in
    /// `total_tokens` with no `reasoning_tokens` (Gemini's
    /// OpenAI-compatible endpoint has been seen to, and seen not to): the
    /// output is then at least `total - prompt`, the excess reasoning. Where
    /// the total adds up, nothing changes.
    pub fn usage_for(&self, thoughts_beside: bool) -> Option<Usage> {
        let detail = |d: &ObjectOr<WireDetails>, f: fn(&WireDetails) -> Count| {
            d.0.as_ref().and_then(|d| f(d).0)
        };
        let Some(input) = self.prompt_tokens.0.or(self.input_tokens.0) else {
            // Billed by the second: the length (up to a day: more is no
            // length a request has), and no tokens.
            let s = self
                .seconds
                .as_ref()?
                .as_f64()
                .filter(|s| (0.0..=86_400.0).contains(s))?;
            return Some(Usage {
                audio_duration_ms: (s * 1000.0).ceil() as u64,
                ..Usage::default()
            });
        };
        let mut output = self
            .completion_tokens
            .0
            .or(self.output_tokens.0)
            .unwrap_or(0);
        let cached = detail(&self.prompt_tokens_details, |d| d.cached_tokens)
            .or_else(|| detail(&self.input_tokens_details, |d| d.cached_tokens))
            .or_else(|| detail(&self.input_token_details, |d| d.cached_tokens))
            .or(self.prompt_cache_hit_tokens.0)
            .unwrap_or(0);
        let written = detail(&self.prompt_tokens_details, |d| d.cache_write_tokens)
            .or_else(|| detail(&self.input_tokens_details, |d| d.cache_write_tokens))
            .unwrap_or(0);
        let reasoning = detail(&self.completion_tokens_details, |d| d.reasoning_tokens)
            .or_else(|| detail(&self.output_tokens_details, |d| d.reasoning_tokens))
            .unwrap_or(0);
        let of_input = |f: fn(&WireDetails) -> Count| {
            [
                &self.prompt_tokens_details,
                &self.input_tokens_details,
                &self.input_token_details,
            ]
            .into_iter()
            .find_map(|d| detail(d, f))
            .unwrap_or(0)
        };
        let of_output = |f: fn(&WireDetails) -> Count| {
            detail(&self.completion_tokens_details, f)
                .or_else(|| detail(&self.output_tokens_details, f))
                .or_else(|| detail(&self.output_token_details, f))
                .unwrap_or(0)
        };
        let of_cached = |f: fn(&WireCachedDetails) -> Count| {
            [
                &self.prompt_tokens_details,
                &self.input_tokens_details,
                &self.input_token_details,
            ]
            .into_iter()
            .find_map(|d| f(d.0.as_ref()?.cached_tokens_details.0.as_ref()?).0)
            .unwrap_or(0)
        };
        // OpenAI counts reasoning inside the output (total = input +
        // output). xAI counts it beside the output (total = input + output
        // + reasoning) and bills it at the output rate: the total says
        // which.
        let mut reasoning = reasoning;
        if reasoning > 0
            && self.total_tokens.0 == Some(input.saturating_add(output).saturating_add(reasoning))
        {
            output = output.saturating_add(reasoning);
        } else if thoughts_beside
            && reasoning == 0
            && let Some(total) = self.total_tokens.0
            && total > input.saturating_add(output)
        {
            reasoning = total - input.saturating_add(output);
            output = output.saturating_add(reasoning);
        }
        let (cached, written) = (cached.min(input), written.min(input - cached.min(input)));
        let fresh = input - cached - written;
        // The audio and image counts of the input include their cache
        // reads where those are split out (a Realtime response's).
        let cached_audio = of_cached(|d| d.audio_tokens).min(cached);
        let cached_image = of_cached(|d| d.image_tokens).min(cached - cached_audio);
        let audio_in = of_input(|d| d.audio_tokens)
            .saturating_sub(cached_audio)
            .min(fresh);
        let image_in = of_input(|d| d.image_tokens)
            .saturating_sub(cached_image)
            .min(fresh - audio_in);
        let spoken = output - reasoning.min(output);
        let audio_out = of_output(|d| d.audio_tokens).min(spoken);
        Some(Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            // Part of the input, as cache reads are.
            cache_write_input_tokens: written,
            reasoning_tokens: reasoning.min(output),
            cache_write_1h_input_tokens: 0,
            web_searches: 0,
            web_searches_preview: 0,
            // Within the input beside its cache reads and writes, and
            // within the output beside its reasoning; the cache reads'
            // share of audio and images where the usage splits it.
            audio_input_tokens: audio_in,
            image_input_tokens: image_in,
            audio_output_tokens: audio_out,
            image_output_tokens: of_output(|d| d.image_tokens).min(spoken - audio_out),
            cached_audio_input_tokens: cached_audio,
            cached_image_input_tokens: cached_image,
            audio_duration_ms: 0,
        })
    }
}

/// Removes what `stream_options.include_usage` adds to a stream when the
/// client did not ask for it: the final usage chunk (`choices: []` with a
/// usage object) and the `"usage":null` member of every other chunk. Whole
/// events pass through as soon as they are complete; only a partial event
/// is held back, up to [`MAX_HELD_EVENT`].
#[derive(Default)]
pub struct UsageChunkFilter {
    held: Vec<u8>,
    /// Where the search of `held` for an event's end resumes: the start
    /// of its last line, and how far that line was read.
    scanned: (usize, usize),
    /// An event outgrew [`MAX_HELD_EVENT`]: the rest passes unfiltered.
    passthrough: bool,
}

/// The longest partial event the filter holds back. A stream whose event
/// is longer (or that never ends one) is passed on as it comes, unfiltered,
/// instead of being held whole in memory: the client may then see the
/// injected usage, which it ignores or reads as an extra chunk.
pub const MAX_HELD_EVENT: usize = 4 << 20;

/// End of the first complete SSE event in `b` (after its blank line), or,
/// when there is none yet, where to resume once more bytes came: the start
/// of the last line and how far it was read. Scanning resumes at `from`,
/// inside the line that starts at `line_start` (not the event's first
/// line, unless both are 0). A line ends with CRLF, LF or CR, as the SSE
/// standard has it; a CR at the very end waits for the next byte, which
/// may be its LF.
fn event_end(b: &[u8], line_start: usize, from: usize) -> Result<usize, (usize, usize)> {
    let mut line_start = line_start;
    let mut i = from;
    while i < b.len() {
        let term = match b[i] {
            b'\n' => 1,
            b'\r' => match b.get(i + 1) {
                Some(b'\n') => 2,
                Some(_) => 1,
                None => return Err((line_start, i)),
            },
            _ => {
                i += 1;
                continue;
            }
        };
        let blank = i == line_start;
        i += term;
        if blank {
            return Ok(i);
        }
        line_start = i;
    }
    Err((line_start, i))
}

/// Rewrites one complete event; `None` drops it.
fn rewrite_event(ev: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    use std::borrow::Cow;
    let Ok(text) = std::str::from_utf8(ev) else {
        return Some(Cow::Borrowed(ev));
    };
    let Some(start) = text.find("data:") else {
        return Some(Cow::Borrowed(ev));
    };
    let line_end = text[start..]
        .find(['\r', '\n'])
        .map(|e| start + e)
        .unwrap_or(text.len());
    if text[line_end..].contains("data:") {
        // Data on several lines: not a chunk the agent's request added.
        return Some(Cow::Borrowed(ev));
    }
    let data = text[start + 5..line_end].trim_start();
    // (A key may be written with escapes: `"us\u0061ge"` is `usage` too.)
    if !data.contains("\"usage\"") && !data.contains("\\u") {
        return Some(Cow::Borrowed(ev));
    }
    // One parse, which keeps each top-level value's place in `data`.
    let Ok(members) = serde_json::from_str::<Members<'_>>(data) else {
        return Some(Cow::Borrowed(ev));
    };
    let mut usage = members
        .0
        .iter()
        .enumerate()
        .filter(|(_, m)| m.key == "usage");
    let (Some((at, u)), None) = (usage.next(), usage.next()) else {
        // None, or repeated: not something the agent added.
        return Some(Cow::Borrowed(ev));
    };
    let value = u.value.get();
    if value.starts_with('{') {
        // The usage chunk itself: an object, and no choices.
        let choices = members.0.iter().rev().find(|m| m.key == "choices");
        return match choices.map(|c| c.value.get()) {
            Some(c) if c.starts_with('[') && c[1..c.len() - 1].trim().is_empty() => None,
            _ => Some(Cow::Borrowed(ev)),
        };
    }
    if value != "null" {
        return Some(Cow::Borrowed(ev));
    }
    // `"usage":null` on an ordinary chunk: cut the member out, with one of
    // its commas; every other byte stays as the provider sent it.
    let (cut_from, cut_to) = if at > 0 {
        // From the end of the previous value through this one.
        (members.end_in(data, at - 1), members.end_in(data, at))
    } else if members.0.len() > 1 {
        // First of several: from after `{` to the next member's key (past
        // the comma and the blanks that follow the value).
        let after = members.end_in(data, 0);
        let rest = &data[after..];
        let Some(comma) = rest.find(',') else {
            return Some(Cow::Borrowed(ev));
        };
        let next = &rest[comma + 1..];
        (1, data.len() - next.trim_start().len())
    } else {
        // The only member.
        (1, members.end_in(data, 0))
    };
    let data_start = line_end - data.len();
    let mut out = Vec::with_capacity(ev.len());
    out.extend_from_slice(&ev[..data_start + cut_from]);
    out.extend_from_slice(&ev[data_start + cut_to..]);
    Some(Cow::Owned(out))
}

impl super::BodyFilter for UsageChunkFilter {
    fn filter(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.passthrough {
            out.extend_from_slice(chunk);
            return;
        }
        self.held.extend_from_slice(chunk);
        let mut pos = 0;
        let (mut line_start, mut from) = self.scanned;
        loop {
            match event_end(&self.held[pos..], line_start, from) {
                Ok(end) => {
                    if let Some(ev) = rewrite_event(&self.held[pos..pos + end]) {
                        out.extend_from_slice(&ev);
                    }
                    pos += end;
                    (line_start, from) = (0, 0);
                }
                Err(resume) => {
                    self.held.drain(..pos);
                    self.scanned = resume;
                    break;
                }
            }
        }
        if self.held.len() > MAX_HELD_EVENT {
            tracing::debug!(
                held = self.held.len(),
                "an event longer than the usage filter holds: the rest of the stream passes unfiltered"
            );
            out.extend_from_slice(&std::mem::take(&mut self.held));
            self.passthrough = true;
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) {
        let rest = std::mem::take(&mut self.held);
        if let Some(ev) = rewrite_event(&rest) {
            out.extend_from_slice(&ev);
        }
    }
}

/// A Responses API object's `id` and `status`, sanitised.
fn id_and_status(v: &Value) -> (Option<String>, Option<String>) {
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    (
        s("id").and_then(super::response_id),
        s("status").and_then(super::error_type),
    )
}

/// Why a failed Responses API object failed: its `error.code` (else
/// `error.type`), sanitised.
fn failure_of(v: &Value) -> Option<String> {
    let e = v.get("error")?;
    ["code", "type"]
        .into_iter()
        .find_map(|k| e.get(k).and_then(Value::as_str))
        .and_then(super::error_type)
}

/// A response object's `service_tier`, sanitised.
fn tier_of(v: &Value) -> Option<String> {
    v.get("service_tier")
        .and_then(Value::as_str)
        .and_then(super::service_tier)
}

/// Reads a whole (bounded) JSON body; the flag: thoughts may be counted
/// beside the completion (see [`WireUsage::usage_for`]).
struct JsonParser(JsonBody, bool);

impl UsageParser for JsonParser {
    fn feed(&mut self, chunk: &[u8]) {
        self.0.feed(chunk);
    }

    fn finish(&mut self) -> ParsedUsage {
        // The usual case: usage and model, without building the choices.
        // (Not for a failed response, whose error the whole document says.)
        if let Some(h) = self.0.bytes().and_then(super::Head::parse)
            && let Some(usage) = h.usage.0.as_ref().and_then(|u| u.usage_for(self.1))
            && h.status.as_ref().and_then(Value::as_str) != Some("failed")
        {
            let (response_id, response_status) = h.id_and_status();
            return ParsedUsage {
                usage: Some(h.output.billed(h.tools, usage)),
                response_model: h.model(),
                service_tier: h.service_tier(),
                response_id,
                response_status,
                ..Default::default()
            };
        }
        // No usage: the whole document, for the text to estimate from.
        let Some(v) = self.0.take() else {
            return ParsedUsage::default();
        };
        // Responses API objects carry usage at the top level too.
        let mut text = String::new();
        if let Some(choices) = v.get("choices").and_then(Value::as_array) {
            for c in choices {
                for p in [
                    "/message/content",
                    "/message/reasoning_content",
                    "/message/refusal",
                    "/text",
                ] {
                    if let Some(t) = c.pointer(p).and_then(Value::as_str) {
                        super::push_text(&mut text, t);
                    }
                }
                if let Some(m) = c.get("message") {
                    push_calls(&mut text, m);
                }
            }
        }
        if let Some(out) = v.get("output").and_then(Value::as_array) {
            for item in out {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(t) = part.get("text").and_then(Value::as_str) {
                        super::push_text(&mut text, t);
                    }
                }
                // A `function_call` item's name and arguments.
                if item.get("type").and_then(Value::as_str) == Some("function_call") {
                    for k in ["name", "arguments"] {
                        if let Some(t) = item.get(k).and_then(Value::as_str) {
                            super::push_text(&mut text, t);
                        }
                    }
                }
            }
        }
        let (response_id, response_status) = id_and_status(&v);
        ParsedUsage {
            usage: response_usage(&v, self.1),
            response_model: str_at(&v, &["model"]),
            output_text: text,
            service_tier: tier_of(&v),
            error: (response_status.as_deref() == Some("failed"))
                .then(|| failure_of(&v))
                .flatten(),
            response_id,
            response_status,
            ..Default::default()
        }
    }
}

/// Reads SSE chunks: chat completion chunks (usage in the last chunk when
/// `stream_options.include_usage` is set) and Responses events
/// (`response.completed` carries `response.usage`).
struct StreamParser {
    sse: SseReader,
    found: ParsedUsage,
    /// Thoughts may be counted beside the completion (see
    /// [`WireUsage::usage_for`]).
    thoughts_beside: bool,
    /// An event showed the generation over.
    ended: bool,
    /// The chat choices seen, and which have finished.
    choices: Choices,
}

/// The choices of a chat stream (`n` of them, interleaved): its generation
/// is over when `n` of them have a `finish_reason`, not at the first.
#[derive(Default)]
struct Choices {
    /// The request's `n` (at least 1).
    wanted: u32,
    /// The indexes of the choices that have finished.
    finished: std::collections::BTreeSet<u64>,
}

impl Choices {
    fn of(n: u32) -> Choices {
        Choices {
            wanted: n.max(1),
            finished: Default::default(),
        }
    }

    fn all_finished(&self) -> bool {
        self.finished.len() as u64 >= u64::from(self.wanted.max(1))
    }
}

impl Default for StreamParser {
    /// Events up to 16 MiB, as for JSON bodies: the Responses API's last
    /// event repeats the whole response (generated images as base64,
    /// encrypted reasoning, the instructions and tools) beside its usage.
    fn default() -> Self {
        StreamParser {
            sse: SseReader::new(JsonBody::DEFAULT_LIMIT),
            found: ParsedUsage::default(),
            thoughts_beside: false,
            ended: false,
            choices: Choices::of(1),
        }
    }
}

/// A stream event, typed: the text pieces are borrowed from the event and
/// everything else is skipped without being built. An event this shape
/// does not fit (a member of another type) is read as a whole `Value`.
#[derive(serde::Deserialize)]
struct StreamEvent<'a> {
    #[serde(default, borrow)]
    choices: Vec<StreamChoice<'a>>,
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    usage: ObjectOr<WireUsage>,
    /// Responses API: `response.output_text.delta` carries a string.
    #[serde(default)]
    delta: Option<Value>,
    /// Responses API: `response.completed` carries the response.
    #[serde(default)]
    response: Option<Value>,
    /// Chat completion chunks carry the tier that serves the stream.
    #[serde(default)]
    service_tier: Option<Value>,
    /// A chunk that ends the stream with the provider's error.
    #[serde(default)]
    error: Option<Value>,
    /// The Responses API's `error` event: `{"type":"error","code":…}`.
    #[serde(default, rename = "type")]
    kind: Option<Value>,
    #[serde(default)]
    code: Option<Value>,
}

/// The provider's error type of a stream event: a chat chunk's `error`
/// object (its `code`, else its `type`), or the Responses API's `error`
/// event (its `code`), sanitised.
fn stream_error(
    error: Option<&Value>,
    kind: Option<&Value>,
    code: Option<&Value>,
) -> Option<String> {
    if let Some(e) = error.filter(|e| e.is_object()) {
        return ["code", "type"]
            .into_iter()
            .find_map(|k| e.get(k).and_then(Value::as_str))
            .and_then(super::error_type)
            .or_else(|| Some("error".to_string()));
    }
    if kind.and_then(Value::as_str) == Some("error") {
        return code
            .and_then(Value::as_str)
            .and_then(super::error_type)
            .or_else(|| Some("error".to_string()));
    }
    None
}

#[derive(serde::Deserialize)]
struct StreamChoice<'a> {
    /// Which of the `n` choices (0 when a server leaves it out).
    #[serde(default)]
    index: Option<Value>,
    #[serde(default, borrow)]
    delta: Option<StreamDelta<'a>>,
    /// Set on a choice's last chunk: its generation is over.
    #[serde(default)]
    finish_reason: Option<Value>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct StreamDelta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<std::borrow::Cow<'a, str>>,
    /// A tool call's name and arguments, streamed in pieces: output the
    /// provider charges for like text (an agent loop's usual turn).
    #[serde(default, borrow)]
    tool_calls: Option<Vec<StreamToolCall<'a>>>,
    /// The legacy `function_call`.
    #[serde(default, borrow)]
    function_call: Option<StreamFunction<'a>>,
}

#[derive(serde::Deserialize)]
struct StreamToolCall<'a> {
    #[serde(default, borrow)]
    function: Option<StreamFunction<'a>>,
}

#[derive(serde::Deserialize)]
struct StreamFunction<'a> {
    #[serde(default, borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<std::borrow::Cow<'a, str>>,
}

impl StreamFunction<'_> {
    fn texts(&self) -> impl Iterator<Item = &str> {
        [&self.name, &self.arguments]
            .into_iter()
            .flatten()
            .map(|t| t.as_ref())
    }
}

/// A tool call's (or legacy function call's) name and arguments in a
/// chat message or delta that was not read as typed: text to estimate.
fn push_calls(text: &mut String, message: &Value) {
    let calls = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("function"))
        .chain(message.get("function_call"));
    for f in calls {
        for k in ["name", "arguments"] {
            if let Some(t) = f.get(k).and_then(Value::as_str) {
                super::push_text(text, t);
            }
        }
    }
}

impl StreamParser {
    /// Reads one event into `found`; true when it shows the answer's
    /// generation over (a choice's `finish_reason`, the Responses API's
    /// last response event, `[DONE]`).
    fn on_event(found: &mut ParsedUsage, data: &str, thoughts_beside: bool) -> bool {
        Self::on_event_of(found, data, thoughts_beside, &mut Choices::of(1))
    }

    /// [`Self::on_event`], with the stream's `choices` so far: a choice's
    /// `finish_reason` ends the generation once as many choices as the
    /// request asked for have one.
    fn on_event_of(
        found: &mut ParsedUsage,
        data: &str,
        thoughts_beside: bool,
        choices: &mut Choices,
    ) -> bool {
        if data == "[DONE]" {
            return true;
        }
        let mut ended = false;
        if data.starts_with('{')
            && let Ok(ev) = serde_json::from_str::<StreamEvent<'_>>(data)
        {
            for c in &ev.choices {
                // (Some compatible servers send `""` on every chunk.)
                let finished = c
                    .finish_reason
                    .as_ref()
                    .is_some_and(|r| !r.is_null() && r.as_str() != Some(""));
                if finished {
                    let index = c.index.as_ref().and_then(Value::as_u64).unwrap_or(0);
                    choices.finished.insert(index);
                    ended |= choices.all_finished();
                }
                if let Some(d) = &c.delta {
                    for t in [&d.content, &d.reasoning_content, &d.refusal]
                        .into_iter()
                        .flatten()
                    {
                        super::push_text(&mut found.output_text, t);
                    }
                    let calls = d
                        .tool_calls
                        .iter()
                        .flatten()
                        .filter_map(|c| c.function.as_ref());
                    for f in calls.chain(d.function_call.as_ref()) {
                        for t in f.texts() {
                            super::push_text(&mut found.output_text, t);
                        }
                    }
                }
                if let Some(t) = &c.text {
                    super::push_text(&mut found.output_text, t);
                }
            }
            if let Some(Value::String(t)) = &ev.delta {
                super::push_text(&mut found.output_text, t);
            }
            if let Some(e) = stream_error(ev.error.as_ref(), ev.kind.as_ref(), ev.code.as_ref()) {
                found.error = Some(e);
            }
            if let Some(r) = ev.response.as_ref().filter(|r| r.is_object()) {
                let (id, status) = id_and_status(r);
                if id.is_some() {
                    found.response_id = id;
                }
                if status.is_some() {
                    if status.as_deref() == Some("failed") {
                        found.error = failure_of(r);
                    }
                    ended |= matches!(
                        status.as_deref(),
                        Some("completed" | "incomplete" | "failed" | "cancelled")
                    );
                    found.response_status = status;
                }
            }
            let (model, usage, tier) = match &ev.response {
                Some(r) if r.is_object() => (
                    r.get("model"),
                    response_usage(r, thoughts_beside),
                    tier_of(r),
                ),
                _ => (
                    ev.model.as_ref(),
                    ev.usage
                        .0
                        .as_ref()
                        .and_then(|u| u.usage_for(thoughts_beside)),
                    ev.service_tier
                        .as_ref()
                        .and_then(Value::as_str)
                        .and_then(super::service_tier),
                ),
            };
            // The last event that names one says what served the stream.
            if tier.is_some() {
                found.service_tier = tier;
            }
            if found.response_model.is_none()
                && let Some(m) = model.and_then(Value::as_str).filter(|m| !m.is_empty())
            {
                found.response_model = Some(m.to_string());
            }
            if let Some(u) = usage {
                found.usage = Some(u);
            }
            return ended;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return false;
        };
        if let Some(choices) = v.get("choices").and_then(Value::as_array) {
            for c in choices {
                for k in ["content", "reasoning_content", "refusal"] {
                    if let Some(t) = c.pointer(&format!("/delta/{k}")).and_then(Value::as_str) {
                        super::push_text(&mut found.output_text, t);
                    }
                }
                if let Some(d) = c.get("delta") {
                    push_calls(&mut found.output_text, d);
                }
                if let Some(t) = c.get("text").and_then(Value::as_str) {
                    super::push_text(&mut found.output_text, t);
                }
            }
        }
        if let Some(t) = v.get("delta").and_then(Value::as_str) {
            super::push_text(&mut found.output_text, t);
        }
        if let Some(e) = stream_error(v.get("error"), v.get("type"), v.get("code")) {
            found.error = Some(e);
        }
        let obj = v.get("response").filter(|r| r.is_object()).unwrap_or(&v);
        if let Some(t) = tier_of(obj) {
            found.service_tier = Some(t);
        }
        if found.response_model.is_none()
            && let Some(m) = str_at(obj, &["model"]).filter(|m| !m.is_empty())
        {
            found.response_model = Some(m);
        }
        if let Some(u) = response_usage(obj, thoughts_beside) {
            found.usage = Some(u);
        }
        false
    }
}

/// Reads one event of a Responses API WebSocket (the same events as its
/// SSE stream, one per text message) into `found`: the model, usage and
/// service tier of `response.completed` and its kin.
pub fn websocket_event(found: &mut ParsedUsage, data: &str) {
    StreamParser::on_event(found, data, false);
}

impl UsageParser for StreamParser {
    fn feed(&mut self, chunk: &[u8]) {
        let (found, beside, ended, choices) = (
            &mut self.found,
            self.thoughts_beside,
            &mut self.ended,
            &mut self.choices,
        );
        self.sse.feed(chunk, &mut |e| {
            *ended |= Self::on_event_of(found, &e.data, beside, choices);
        });
    }

    fn finish(&mut self) -> ParsedUsage {
        let (found, beside) = (&mut self.found, self.thoughts_beside);
        self.sse.finish(&mut |e| {
            Self::on_event(found, &e.data, beside);
        });
        std::mem::take(&mut self.found)
    }

    fn generation_over(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method};
    use proptest::prelude::*;

    const CHAT_JSON: &[u8] = include_bytes!("fixtures/openai/chat.json");
    const CHAT_SSE: &[u8] = include_bytes!("fixtures/openai/chat_stream.sse");
    const ERROR_JSON: &[u8] = include_bytes!("fixtures/openai/error_429.json");

    fn parse(ct: &str, body: &[u8], splits: &[usize]) -> ParsedUsage {
        let info = RequestInfo {
            operation: "chat",
            metered: true,
            ..Default::default()
        };
        crate::providers::testing::parse_split(&OpenAi, &info, ct, body, splits)
    }

    /// A Responses answer's `web_search_call` items that searched are the
    /// searches billed: in a JSON answer (read without building its
    /// items), in one the fast read cannot take (a repeated member), in
    /// the stream's `response.completed`; opening a page, finding in it
    /// and a failed call are not billed.
    #[test]
    fn web_search_calls_that_searched_are_counted() {
        let output = r#"[{"type":"web_search_call","id":"ws_1","status":"completed","action":{"type":"search","query":"tollgate"}},
            {"type":"web_search_call","id":"ws_2","status":"completed","action":{"type":"open_page","url":"https://x"}},
            {"type":"web_search_call","id":"ws_3","status":"completed","action":{"type":"find_in_page","pattern":"y"}},
            {"type":"web_search_call","id":"ws_4","status":"failed","action":{"type":"search"}},
            {"type":"web_search_call","id":"ws_5","status":"completed"},
            {"type":"message","content":[{"type":"output_text","text":"web_search_call"}]},
            "odd", 7, {"type":{"odd":1}}]"#;
        let usage = r#"{"input_tokens":12000,"output_tokens":300}"#;
        let json =
            format!(r#"{{"object":"response","model":"gpt-5","output":{output},"usage":{usage}}}"#);
        let u = parse("application/json", json.as_bytes(), &[])
            .usage
            .expect("usage");
        assert_eq!((u.input_tokens, u.web_searches), (12000, 2));
        let repeated = format!(
            r#"{{"object":"response","model":"gpt-5","model":"gpt-5","output":{output},"usage":{usage}}}"#
        );
        let u = parse("application/json", repeated.as_bytes(), &[])
            .usage
            .expect("usage");
        assert_eq!(u.web_searches, 2);
        let sse = format!(
            "event: response.output_item.done\ndata: {{\"type\":\"response.output_item.done\",\"item\":{{\"type\":\"web_search_call\",\"status\":\"completed\",\"action\":{{\"type\":\"search\"}}}}}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"model\":\"gpt-5\",\"status\":\"completed\",\"output\":{},\"usage\":{usage}}}}}\n\n",
            output.replace('\n', "")
        );
        let u = parse("text/event-stream", sse.as_bytes(), &[40, 300])
            .usage
            .expect("usage");
        assert_eq!(u.web_searches, 2, "counted once, from the response");
        let chat = parse("application/json", CHAT_JSON, &[])
            .usage
            .expect("usage");
        assert_eq!(chat.web_searches, 0);
        // A member repeated inside an item is read as the provider reads
        // it (the last wins), and the answer's head is still read: the
        // fast read, over a body too large to be read again whole.
        let big = format!("[{}]", vec!["0"; (1 << 20) + 10].join(","));
        let repeated = format!(
            r#"{{"model":"gpt-5","output":[{{"type":"message","type":"message","content":{big}}},
            {{"type":"web_search_call","status":"failed","status":"completed","action":{{"type":"open_page","type":"search"}}}}],
            "usage":{usage}}}"#
        );
        let h = crate::providers::Head::parse(repeated.as_bytes()).expect("the head is read");
        assert_eq!((h.model().as_deref(), h.output.0), (Some("gpt-5"), 1));
        assert!(h.usage.0.is_some());
        for odd in ["null", "{}", "\"x\"", "[[[[1]]], null, 2, {\"type\": []}]"] {
            let body = format!(r#"{{"model":"gpt-5","output":{odd},"usage":{usage}}}"#);
            let h = crate::providers::Head::parse(body.as_bytes()).expect(odd);
            assert_eq!(h.output.0, 0, "{odd}");
        }
        // A batch's Responses line counts its searches too.
        let line = format!(
            r#"{{"custom_id":"a","response":{{"status_code":200,"body":{{"object":"response","model":"gpt-5","output":{output},"usage":{usage}}}}}}}"#,
            output = output.replace('\n', "")
        );
        let l = batch_result_line(line.as_bytes()).expect("billed");
        assert_eq!(l.usage.web_searches, 2);
    }

    /// The searches of a response whose `tools` lists only
    /// `web_search_preview` (or a dated name of it) are that tool's, in a
    /// JSON answer, a stream's `response.completed` and a batch line; with
    /// `web_search` listed too, or alone, or no tools, they are not.
    #[test]
    fn searches_of_the_preview_tool_are_told_apart() {
        let output = r#"[{"type":"web_search_call","status":"completed","action":{"type":"search"}},{"type":"web_search_call","status":"completed"}]"#;
        let usage = r#"{"input_tokens":900,"output_tokens":30}"#;
        for (tools, preview) in [
            (
                r#"[{"type":"web_search_preview","search_context_size":"medium"}]"#,
                2,
            ),
            (
                r#"[{"type":"function","name":"f"},{"type":"web_search_preview_2025_03_11"}]"#,
                2,
            ),
            (r#"[{"type":"web_search"}]"#, 0),
            (
                r#"[{"type":"web_search_2025_08_26"},{"type":"web_search_preview"}]"#,
                0,
            ),
            ("[]", 0),
            (r#"{"type":"web_search_preview"}"#, 0),
            (r#"[7, "web_search_preview", {"type": 1}]"#, 0),
        ] {
            let json = format!(
                r#"{{"object":"response","model":"gpt-4.1","tools":{tools},"output":{output},"usage":{usage}}}"#
            );
            let u = parse("application/json", json.as_bytes(), &[])
                .usage
                .expect("usage");
            assert_eq!(
                (u.web_searches, u.web_searches_preview),
                (2, preview),
                "{tools}"
            );
            let sse = format!(
                "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"model\":\"gpt-4.1\",\"status\":\"completed\",\"tools\":{tools},\"output\":{output},\"usage\":{usage}}}}}\n\n"
            );
            let u = parse("text/event-stream", sse.as_bytes(), &[17])
                .usage
                .expect("usage");
            assert_eq!(
                (u.web_searches, u.web_searches_preview),
                (2, preview),
                "stream {tools}"
            );
            let line = format!(
                r#"{{"custom_id":"a","response":{{"status_code":200,"body":{{"model":"gpt-4.1","tools":{tools},"output":{output},"usage":{usage}}}}}}}"#
            );
            let l = batch_result_line(line.as_bytes()).expect("billed");
            assert_eq!(l.usage.web_searches_preview, preview, "batch {tools}");
        }
    }

    /// A tool call's name and arguments are output to estimate when no
    /// usage comes (Azure's older api-versions, a stream cut short), in a
    /// stream's deltas (typed, and as read untyped), the legacy
    /// `function_call`, a whole chat message and a Responses API item.
    #[test]
    fn tool_calls_are_output_text() {
        let args = r#"{\"cmd\":\"cargo test\"}"#;
        let sse = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"tool_calls\":[{{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{{\"name\":\"run_shell\",\"arguments\":\"\"}}}}]}},\"finish_reason\":null}}]}}\n\n\
             data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":\"{args}\"}}}}]}},\"finish_reason\":null}}]}}\n\n\
             data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"tool_calls\"}}]}}\n\ndata: [DONE]\n\n"
        );
        let want = r#"run_shell{"cmd":"cargo test"}"#;
        for at in [0, 40, 200, sse.len() - 3] {
            let p = parse("text/event-stream", sse.as_bytes(), &[at]);
            assert_eq!(p.output_text, want, "split at {at}");
            assert!(p.usage.is_none());
        }
        // A chunk the typed reading refuses (a number where text goes) is
        // read untyped, its calls too; and the legacy `function_call`.
        let odd = format!(
            "data: {{\"choices\":[{{\"text\":5,\"delta\":{{\"tool_calls\":[{{\"function\":{{\"name\":\"run_shell\",\"arguments\":\"{args}\"}}}}]}}}}]}}\n\n\
             data: {{\"choices\":[{{\"delta\":{{\"function_call\":{{\"name\":\"f\",\"arguments\":\"{{}}\"}}}}}}]}}\n\n"
        );
        let p = parse("text/event-stream", odd.as_bytes(), &[]);
        assert_eq!(p.output_text, format!("{want}f{{}}"));
        // A whole answer without usage.
        let json = br#"{"choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"run_shell","arguments":"{\"cmd\":\"ls\"}"}}]}}]}"#;
        assert_eq!(
            parse("application/json", json, &[]).output_text,
            r#"run_shell{"cmd":"ls"}"#
        );
        let refused = br#"{"choices":[{"message":{"role":"assistant","content":null,"refusal":"I can't help with that."}}]}"#;
        assert_eq!(
            parse("application/json", refused, &[]).output_text,
            "I can't help with that."
        );
        let responses = br#"{"object":"response","output":[{"type":"function_call","name":"run_shell","arguments":"{\"cmd\":\"ls\"}"},{"type":"message","content":[{"type":"output_text","text":"done"}]}]}"#;
        assert_eq!(
            parse("application/json", responses, &[]).output_text,
            r#"run_shell{"cmd":"ls"}done"#
        );
    }

    /// The audio and image parts of a usage are read as each API gives
    /// them: an audio chat answer's prompt and completion details, an
    /// image answer's input details (its output is the image, unless
    /// split), a transcription's `input_token_details`; capped at their
    /// totals.
    #[test]
    fn audio_and_image_tokens_are_read_apart() {
        use crate::providers::testing::parse_split;
        let chat = br#"{"model":"gpt-audio","usage":{"prompt_tokens":120,"completion_tokens":300,
            "prompt_tokens_details":{"cached_tokens":0,"audio_tokens":100,"text_tokens":20},
            "completion_tokens_details":{"audio_tokens":250,"text_tokens":50,"reasoning_tokens":0}}}"#;
        let u = parse("application/json", chat, &[]).usage.expect("usage");
        assert_eq!(
            (
                u.audio_input_tokens,
                u.audio_output_tokens,
                u.image_input_tokens,
                u.image_output_tokens
            ),
            (100, 250, 0, 0)
        );
        let media = |op: &'static str, body: &[u8]| {
            let info = RequestInfo {
                operation: op,
                metered: true,
                ..Default::default()
            };
            parse_split(&OpenAi, &info, "application/json", body, &[])
                .usage
                .expect("usage")
        };
        let image =
            br#"{"data":[{"b64_json":"QUFB"}],"usage":{"input_tokens":50,"output_tokens":4160,
            "input_tokens_details":{"text_tokens":10,"image_tokens":40},"total_tokens":4210}}"#;
        let u = media("image", image);
        assert_eq!((u.image_input_tokens, u.image_output_tokens), (40, 4160));
        let split = br#"{"data":[],"usage":{"input_tokens":50,"output_tokens":4200,
            "input_tokens_details":{"text_tokens":50,"image_tokens":0},
            "output_tokens_details":{"image_tokens":4160,"text_tokens":40}}}"#;
        assert_eq!(media("image", split).image_output_tokens, 4160);
        let transcript =
            br#"{"text":"hello","usage":{"type":"tokens","input_tokens":180,"output_tokens":12,
            "total_tokens":192,"input_token_details":{"audio_tokens":170,"text_tokens":10}}}"#;
        let u = media("audio", transcript);
        assert_eq!(
            (u.audio_input_tokens, u.image_output_tokens, u.output_tokens),
            (170, 0, 12)
        );
        let odd = br#"{"usage":{"prompt_tokens":5,"completion_tokens":1,
            "prompt_tokens_details":{"audio_tokens":900},"completion_tokens_details":{"audio_tokens":"x"}}}"#;
        let u = parse("application/json", odd, &[]).usage.expect("usage");
        assert_eq!((u.audio_input_tokens, u.audio_output_tokens), (5, 0));
    }

    /// A transcription billed by the second (`whisper-1`) reports its
    /// length: read as such, with no tokens; a length that is no number
    /// is no usage.
    #[test]
    fn a_transcription_billed_by_the_second_reports_its_length() {
        use crate::providers::testing::parse_split;
        let info = RequestInfo {
            operation: "audio",
            metered: true,
            ..Default::default()
        };
        let body = br#"{"text":"hello there","usage":{"type":"duration","seconds":90.25}}"#;
        let u = parse_split(&OpenAi, &info, "application/json", body, &[20])
            .usage
            .expect("usage");
        assert_eq!(
            (u.audio_duration_ms, u.input_tokens, u.output_tokens),
            (90_250, 0, 0)
        );
        for bad in [r#""x""#, "-1", "null", "1e300"] {
            let v: Value =
                serde_json::from_str(&format!(r#"{{"type":"duration","seconds":{bad}}}"#)).unwrap();
            assert_eq!(usage_from(&v), None, "{bad}");
        }
    }

    /// An image's usage is read from the answer's end, wherever the
    /// pieces are cut, and over base64 longer than the tail kept; a
    /// multipart form's field is found before or after the file.
    #[test]
    fn media_usage_is_read_from_the_end_and_form_fields_anywhere() {
        use crate::providers::testing::parse_split;
        let info = RequestInfo {
            operation: "image",
            metered: true,
            ..Default::default()
        };
        let mut body = br#"{"data":[{"b64_json":""#.to_vec();
        body.resize(body.len() + 3 * MEDIA_TAIL, b'Q');
        body.extend_from_slice(
            br#""}],"usage":{"input_tokens":7,"output_tokens":272},"size":"1024x1024"}"#,
        );
        let n = body.len();
        for splits in [
            vec![],
            vec![n - 30],
            vec![n - 80, n - 60],
            vec![5, MEDIA_TAIL, 2 * MEDIA_TAIL + 9],
        ] {
            let u = parse_split(&OpenAi, &info, "application/json", &body, &splits)
                .usage
                .expect("usage");
            assert_eq!((u.input_tokens, u.output_tokens), (7, 272), "{splits:?}");
        }
        // A "usage" inside a string is escaped, and not taken.
        let none = parse_split(
            &OpenAi,
            &info,
            "application/json",
            br#"{"data":[{"revised_prompt":"say \"usage\":{\"input_tokens\":9}"}]}"#,
            &[],
        );
        assert_eq!(none.usage.map(|u| u.input_tokens), Some(0));
        assert_eq!(none.error, None);

        let form = |parts: &[(&str, &str)]| {
            let mut b = Vec::new();
            for (name, value) in parts {
                b.extend_from_slice(
                    format!(
                        "--x\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                    )
                    .as_bytes(),
                );
            }
            b.extend_from_slice(b"--x--\r\n");
            b
        };
        let b = form(&[
            ("file", "RIFF...."),
            ("model_hint", "no"),
            ("model", "gpt-4o-transcribe"),
            ("stream", "true"),
        ]);
        assert_eq!(
            multipart_field(&b, "model").as_deref(),
            Some("gpt-4o-transcribe")
        );
        assert_eq!(multipart_field(&b, "stream").as_deref(), Some("true"));
        let info = OpenAi.request(&crate::providers::testing::request(
            "POST",
            "/v1/audio/transcriptions",
            &b,
        ));
        assert_eq!(info.model.as_deref(), Some("gpt-4o-transcribe"));
        assert!(info.streaming);
        assert_eq!(multipart_field(&form(&[("prompt", "x")]), "model"), None);
        assert_eq!(multipart_field(b"{\"model\":\"x\"}", "model"), None);
    }

    #[test]
    fn classifies_chat_request() {
        let h = HeaderMap::new();
        let body = br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"messages":[]}"#;
        let info = OpenAi.request(&RequestView {
            method: &Method::POST,
            path: "/v1/chat/completions",
            query: None,
            headers: &h,
            body: Some(body),
        });
        assert_eq!(info.operation, "chat");
        assert!(info.metered && info.streaming);
        assert_eq!(info.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(info.max_output_tokens, Some(50));
        let other = OpenAi.request(&RequestView {
            method: &Method::GET,
            path: "/v1/models",
            query: None,
            headers: &h,
            body: None,
        });
        assert!(!other.metered);
        let prefixed = OpenAi.request(&RequestView {
            method: &Method::POST,
            path: "/openai/v1/chat/completions",
            query: None,
            headers: &h,
            body: Some(b"not json"),
        });
        assert_eq!(prefixed.operation, "chat");
        assert_eq!(prefixed.model, None);
    }

    /// `/responses/compact` (Codex compacts its history with it) is a
    /// metered Responses call whose answer has usage and no model: it is
    /// priced by the request's. Cache writes (`cache_write_tokens`, billed
    /// apart since GPT-5.6) are part of the input, as cache reads are.
    #[test]
    fn compaction_is_metered_and_cache_writes_are_read() {
        use crate::providers::testing::{parse_split, request};
        let info = OpenAi.request(&request(
            "POST",
            "/v1/responses/compact",
            br#"{"model":"gpt-6-sol","input":[]}"#,
        ));
        assert_eq!(info.operation, "responses");
        assert!(info.metered);
        assert_eq!(info.model.as_deref(), Some("gpt-6-sol"));
        let body = br#"{"object":"response.compaction","output":[],"usage":{"input_tokens":120000,
            "input_tokens_details":{"cached_tokens":100000,"cache_write_tokens":15000},
            "output_tokens":3000,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123000}}"#;
        let p = parse_split(&OpenAi, &info, "application/json", body, &[33]);
        let u = p.usage.expect("usage");
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_input_tokens,
                u.output_tokens
            ),
            (120_000, 100_000, 15_000, 3_000)
        );
        // Chat's prompt details too; never more than the uncached input.
        let chat = br#"{"model":"gpt-6-sol","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":1,
            "prompt_tokens_details":{"cached_tokens":4,"cache_write_tokens":9}}}"#;
        let u = parse("application/json", chat, &[]).usage.expect("usage");
        assert_eq!((u.cached_input_tokens, u.cache_write_input_tokens), (4, 6));
        let free = OpenAi.request(&request("POST", "/v1/responses/input_tokens", b"{}"));
        assert_eq!(free.operation, "other", "a count is not a compaction");
    }

    /// Background mode: the request says so; a retrieval (`GET
    /// …/responses/{id}`, its stream resumed, a cancel) is told from the
    /// calls around it; the answers name the response and its status.
    #[test]
    fn background_requests_and_their_retrievals_are_told_apart() {
        use crate::providers::testing::{parse_split, request};
        let post = OpenAi.request(&request(
            "POST",
            "/v1/responses",
            br#"{"model":"gpt-5.2-pro","input":"hi","background":true}"#,
        ));
        assert!(post.background && post.retrieves.is_none() && post.metered);
        let plain = OpenAi.request(&request("POST", "/v1/responses", br#"{"input":"hi"}"#));
        assert!(!plain.background);
        let chat = OpenAi.request(&request(
            "POST",
            "/v1/chat/completions",
            br#"{"messages":[],"background":true}"#,
        ));
        assert!(!chat.background, "only the Responses API has it");
        for (method, path) in [
            ("GET", "/v1/responses/resp_123"),
            ("GET", "/openai/v1/responses/resp_123/"),
            ("POST", "/v1/responses/resp_123/cancel"),
        ] {
            let r = OpenAi.request(&request(method, path, b""));
            assert_eq!(r.retrieves.as_deref(), Some("resp_123"), "{method} {path}");
            assert!(r.metered);
            assert_eq!(r.operation, "responses");
        }
        for (method, path) in [
            ("GET", "/v1/responses/resp_123/input_items"),
            ("POST", "/v1/responses/compact"),
            ("GET", "/v1/responses"),
            ("POST", "/v1/responses/resp_123"),
            ("GET", "/v1/responses/resp_123/cancel"),
            ("GET", "/v1/chat/completions/chatcmpl_1"),
        ] {
            let r = OpenAi.request(&request(method, path, b"{}"));
            assert_eq!(r.retrieves, None, "{method} {path}");
        }
        let mut resumed = request("GET", "/v1/responses/resp_123", b"");
        resumed.query = Some("starting_after=7&stream=true");
        assert!(OpenAi.request(&resumed).streaming);

        let info = RequestInfo {
            operation: "responses",
            metered: true,
            ..Default::default()
        };
        let queued = br#"{"id":"resp_123","object":"response","status":"queued","model":"gpt-5.2-pro","output":[],"usage":null}"#;
        let p = parse_split(&OpenAi, &info, "application/json", queued, &[7]);
        assert_eq!(
            (p.response_id.as_deref(), p.response_status.as_deref()),
            (Some("resp_123"), Some("queued"))
        );
        assert!(p.unfinished() && p.usage.is_none());
        let done =
            br#"{"id":"resp_123","object":"response","status":"completed","model":"gpt-5.2-pro",
            "output":[],"usage":{"input_tokens":10,"output_tokens":900,"total_tokens":910}}"#;
        let p = parse_split(&OpenAi, &info, "application/json", done, &[]);
        assert!(!p.unfinished() && p.usage.is_some());
        assert_eq!(p.response_status.as_deref(), Some("completed"));
        let failed = br#"{"id":"resp_9","status":"failed","error":{"code":"server_error","message":"x"},"usage":null}"#;
        let p = parse_split(&OpenAi, &info, "application/json", failed, &[]);
        assert_eq!(p.error.as_deref(), Some("server_error"));
        let failed = br#"{"id":"resp_9","status":"failed","error":{"code":"server_error","message":"x"},"usage":{"input_tokens":3,"output_tokens":1}}"#;
        let p = parse_split(&OpenAi, &info, "application/json", failed, &[]);
        assert_eq!(p.error.as_deref(), Some("server_error"), "with usage too");
        assert_eq!(p.usage.map(|u| u.input_tokens), Some(3));
        // A resumed stream: the status follows the events.
        let sse = b"event: response.in_progress\ndata: {\"type\":\"response.in_progress\",\"response\":{\"id\":\"resp_123\",\"status\":\"in_progress\"}}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_123\",\"status\":\"completed\",\"usage\":{\"input_tokens\":10,\"output_tokens\":900}}}\n\n";
        let p = parse_split(&OpenAi, &info, "text/event-stream", sse, &[60]);
        assert_eq!(p.response_status.as_deref(), Some("completed"));
        assert_eq!(p.usage.map(|u| u.output_tokens), Some(900));
        let cut = &sse[..sse.iter().position(|&b| b == b'\n').unwrap() + 120];
        let p = parse_split(&OpenAi, &info, "text/event-stream", cut, &[]);
        assert!(p.unfinished() && p.usage.is_none(), "{p:?}");
        // An id that is not a plain token is not kept.
        let odd = br#"{"id":"resp 1\n","status":"queued"}"#;
        let p = parse_split(&OpenAi, &info, "application/json", odd, &[]);
        assert_eq!(p.response_id, None);
    }

    #[test]
    fn json_usage() {
        let p = parse("application/json", CHAT_JSON, &[]);
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 19,
                output_tokens: 10,
                cached_input_tokens: 4,
                cache_write_input_tokens: 0,
                reasoning_tokens: 2,
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
        assert_eq!(p.response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    }

    /// A chat stream's generation is over at the chunk with its
    /// `finish_reason` (the usage chunk follows), not before.
    #[test]
    fn a_streams_generation_is_over_at_its_finish_reason() {
        use crate::providers::testing::{end_of_event_with, generation_over_after};
        let info = RequestInfo {
            operation: "chat",
            metered: true,
            ..Default::default()
        };
        assert_eq!(
            generation_over_after(&OpenAi, &info, "text/event-stream", CHAT_SSE),
            Some(end_of_event_with(CHAT_SSE, r#""finish_reason":"stop""#))
        );
        assert_eq!(
            generation_over_after(&OpenAi, &info, "application/json", CHAT_JSON),
            None
        );
        // `n = 2`: over when both choices have finished, not at the first
        // (choice 1's first chunk coming after choice 0 finished).
        let chunk = |i: u8, finish: &str| {
            format!(
                "data: {{\"choices\":[{{\"index\":{i},\"delta\":{{\"content\":\"x\"}},\"finish_reason\":{finish}}}]}}\n\n"
            )
        };
        let two = [
            chunk(0, "null"),
            chunk(0, "\"stop\""),
            chunk(1, "\"\""),
            chunk(1, "null"),
            chunk(1, "\"length\""),
        ]
        .concat();
        let asked = |n: &str| {
            OpenAi.request(&crate::providers::testing::request(
                "POST",
                "/v1/chat/completions",
                format!(r#"{{"model":"m","stream":true,"n":{n},"messages":[]}}"#).as_bytes(),
            ))
        };
        assert_eq!(asked("2").choices, 2);
        assert_eq!(
            generation_over_after(&OpenAi, &asked("2"), "text/event-stream", two.as_bytes()),
            Some(two.len())
        );
        // Asked for one (or not said): over at its finish.
        let first = chunk(0, "null").len() + chunk(0, "\"stop\"").len();
        assert_eq!(
            generation_over_after(&OpenAi, &asked("1"), "text/event-stream", two.as_bytes()),
            Some(first)
        );
    }

    #[test]
    fn stream_usage_from_final_chunk() {
        let p = parse("text/event-stream; charset=utf-8", CHAT_SSE, &[]);
        let u = p.clone().usage.expect("usage chunk");
        assert_eq!((u.input_tokens, u.output_tokens), (13, 7));
        assert_eq!(p.response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    }

    #[test]
    fn responses_usage_after_a_large_image_is_read() {
        // A generated image repeated in `response.completed`: 6 MB of
        // base64 in the one event that carries the usage.
        let image = "A".repeat(6 << 20);
        let body = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"model\":\"gpt-5\",\"output\":[{{\"type\":\"image_generation_call\",\"result\":\"{image}\"}}],\"usage\":{{\"input_tokens\":30,\"output_tokens\":1056}}}}}}\n\n"
        );
        let info = RequestInfo {
            operation: "responses",
            metered: true,
            ..Default::default()
        };
        let p = crate::providers::testing::parse_split(
            &OpenAi,
            &info,
            "text/event-stream",
            body.as_bytes(),
            &[100, 4 << 20],
        );
        let u = p.usage.expect("usage");
        assert_eq!((u.input_tokens, u.output_tokens), (30, 1056));
    }

    #[test]
    fn error_body_has_no_usage() {
        let p = parse("application/json", ERROR_JSON, &[]);
        assert_eq!(p.usage, None);
    }

    #[test]
    fn responses_api_shapes() {
        let p = parse(
            "application/json",
            br#"{"id":"resp_1","object":"response","model":"gpt-4.1","usage":{"input_tokens":30,"input_tokens_details":{"cached_tokens":10},"output_tokens":12,"output_tokens_details":{"reasoning_tokens":5},"total_tokens":42}}"#,
            &[],
        );
        assert_eq!(
            p.usage.unwrap(),
            Usage {
                input_tokens: 30,
                output_tokens: 12,
                cached_input_tokens: 10,
                cache_write_input_tokens: 0,
                reasoning_tokens: 5,
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
        let s = parse(
            "text/event-stream",
            b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":null}}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}}\n\n",
            &[],
        );
        assert_eq!(s.usage.unwrap().output_tokens, 4);
    }

    #[test]
    fn the_service_tier_is_read_from_every_response_shape() {
        let json = |body: &str| parse("application/json", body.as_bytes(), &[]).service_tier;
        assert_eq!(
            parse("application/json", CHAT_JSON, &[])
                .service_tier
                .as_deref(),
            Some("default")
        );
        assert_eq!(
            json(r#"{"model":"o3","service_tier":"flex","usage":{"prompt_tokens":3,"completion_tokens":2}}"#)
                .as_deref(),
            Some("flex")
        );
        // Lower case; not an identifier, or not a string: not recorded.
        assert_eq!(
            json(r#"{"service_tier":"Flex","usage":{"prompt_tokens":3}}"#).as_deref(),
            Some("flex")
        );
        assert_eq!(
            json(r#"{"service_tier":"fl ex\n","usage":{"prompt_tokens":3}}"#),
            None
        );
        assert_eq!(
            json(r#"{"service_tier":{"a":1},"usage":{"prompt_tokens":3}}"#),
            None
        );
        // A repeated member: the whole-document read, last one wins.
        assert_eq!(
            json(
                r#"{"service_tier":"flex","service_tier":"priority","usage":{"prompt_tokens":3}}"#
            )
            .as_deref(),
            Some("priority")
        );
        // Without usage (the whole document is read).
        assert_eq!(
            json(r#"{"model":"o3","service_tier":"priority","choices":[]}"#).as_deref(),
            Some("priority")
        );
        // Chat chunks: the last one that names a tier, split anywhere.
        let chunks = "data: {\"model\":\"gpt-5\",\"service_tier\":\"auto\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                      data: {\"model\":\"gpt-5\",\"service_tier\":\"flex\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n\
                      data: {\"model\":\"gpt-5\",\"service_tier\":null,\"choices\":[]}\n\ndata: [DONE]\n\n";
        for split in [vec![], vec![7, 90], vec![130, 131]] {
            let p = parse("text/event-stream", chunks.as_bytes(), &split);
            assert_eq!(p.service_tier.as_deref(), Some("flex"), "{split:?}");
        }
        // A chunk that does not fit the typed event is read whole.
        let odd = "data: {\"model\":5,\"service_tier\":\"priority\",\"choices\":[]}\n\n";
        assert_eq!(
            parse("text/event-stream", odd.as_bytes(), &[])
                .service_tier
                .as_deref(),
            Some("priority")
        );
        // Responses API: in the response object of its events.
        let responses = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-5\",\"service_tier\":\"priority\",\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}}\n\n";
        assert_eq!(
            parse("text/event-stream", responses.as_bytes(), &[])
                .service_tier
                .as_deref(),
            Some("priority")
        );
    }

    #[test]
    fn garbage_never_panics() {
        for body in [&b""[..], b"{", b"\xff\xfe", b"data: {\n\n", b"[]"] {
            let _ = parse("application/json", body, &[]);
            let _ = parse("text/event-stream", body, &[]);
        }
    }

    fn filtered(input: &[u8], splits: &[usize]) -> Vec<u8> {
        use crate::providers::BodyFilter;
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &s in splits {
            let s = s.clamp(last, input.len());
            f.filter(&input[last..s], &mut out);
            last = s;
        }
        f.filter(&input[last..], &mut out);
        f.finish(&mut out);
        out
    }

    #[test]
    fn every_blank_line_style_filters_the_same_split_anywhere() {
        let usage = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
        let chunk = r#"{"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}"#;
        for eol in ["\n", "\r\n", "\r"] {
            let ev = |d: &str| format!("data: {d}{eol}{eol}");
            let input = [ev(chunk), ev(chunk), ev(usage), ev("[DONE]")].concat();
            let whole = filtered(input.as_bytes(), &[]);
            let text = String::from_utf8(whole.clone()).unwrap();
            assert_eq!(text.matches("\"hi\"").count(), 2, "{eol:?}: {text}");
            assert!(!text.contains("usage"), "{eol:?}: {text}");
            assert!(text.contains("[DONE]"), "{eol:?}: {text}");
            let every_byte: Vec<usize> = (1..input.len()).collect();
            assert_eq!(filtered(input.as_bytes(), &every_byte), whole, "{eol:?}");
        }
    }

    #[test]
    fn mixed_line_endings_end_events_where_sse_says() {
        // A line ends with CRLF, LF or CR, each line as it likes: "\n\r"
        // followed by the next event's first byte is a line end and a
        // blank line (the usage event alone is removed, `[DONE]` kept).
        let usage = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
        let chunk = r#"{"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}"#;
        for line in ["\n", "\r\n", "\r"] {
            for blank in ["\n", "\r\n", "\r"] {
                if line == "\r" && blank == "\n" {
                    // "\r\n" is one line end, not two: a different stream.
                    continue;
                }
                let ev = |d: &str| format!("data: {d}{line}{blank}");
                let input = [ev(chunk), ev(usage), ev("[DONE]")].concat();
                let want = [ev(chunk).replace(",\"usage\":null", ""), ev("[DONE]")].concat();
                let every_byte: Vec<usize> = (1..input.len()).collect();
                for splits in [&[][..], &every_byte[..]] {
                    let got = String::from_utf8(filtered(input.as_bytes(), splits)).unwrap();
                    assert_eq!(got, want, "{line:?} {blank:?}");
                }
            }
        }
        // Data on two lines is left alone, whole.
        let two = format!("data: {usage}\ndata: more\n\ndata: [DONE]\n\n");
        assert_eq!(filtered(two.as_bytes(), &[]), two.as_bytes());
    }

    #[test]
    fn an_event_longer_than_the_filter_holds_passes_unfiltered() {
        use crate::providers::BodyFilter;
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        let piece = vec![b'x'; 64 << 10];
        f.filter(b"data: {\"choices\":[{\"delta\":{\"content\":\"", &mut out);
        let mut fed = 0;
        while fed <= MAX_HELD_EVENT {
            f.filter(&piece, &mut out);
            fed += piece.len();
        }
        // Handed on, not held: the filter keeps no copy of it.
        assert!(out.len() > MAX_HELD_EVENT, "{}", out.len());
        assert_eq!(f.held.capacity(), 0);
        let before = out.len();
        let usage = b"\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n";
        f.filter(usage, &mut out);
        f.finish(&mut out);
        assert_eq!(&out[before..], usage, "the rest passes as it came");
    }

    #[test]
    fn injects_include_usage_only_when_missing() {
        let mut info = RequestInfo {
            operation: "chat",
            streaming: true,
            metered: true,
            ..Default::default()
        };
        let body = OpenAi
            .rewrite_request(&mut info, br#"{"model":"m","stream":true,"messages":[]}"#)
            .expect("rewritten");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        assert!(info.injected_usage);
        assert!(OpenAi.response_filter(&info).is_some());

        let mut asked = RequestInfo {
            injected_usage: false,
            ..info.clone()
        };
        assert!(
            OpenAi
                .rewrite_request(
                    &mut asked,
                    br#"{"stream":true,"stream_options":{"include_usage":true}}"#
                )
                .is_none()
        );
        assert!(!asked.injected_usage && OpenAi.response_filter(&asked).is_none());
        let mut plain = RequestInfo {
            streaming: false,
            injected_usage: false,
            ..info
        };
        assert!(OpenAi.rewrite_request(&mut plain, b"{}").is_none());
    }

    #[test]
    fn include_usage_is_spliced_in_and_the_clients_bytes_are_kept() {
        let rewrite = |body: &[u8]| {
            let mut i = streaming_chat(body);
            let out = OpenAi.rewrite_request(&mut i, body);
            (out, i.injected_usage)
        };
        // Spacing, key order and number formats survive byte for byte.
        let body = b" {\"model\":\"gpt-4o\", \"temperature\": 0.70,\n \"seed\": 12345678901234567890123, \"stream\":true}";
        let (out, injected) = rewrite(body);
        assert_eq!(
            std::str::from_utf8(&out.unwrap()).unwrap(),
            " {\"stream_options\":{\"include_usage\":true},\"model\":\"gpt-4o\", \"temperature\": 0.70,\n \"seed\": 12345678901234567890123, \"stream\":true}"
        );
        assert!(injected);
        // An empty object gets no stray comma.
        let (out, _) = rewrite(b"{ }");
        assert_eq!(
            &out.unwrap()[..],
            br#"{"stream_options":{"include_usage":true} }"#
        );
        // Options without include_usage, or null, or asking for none: it is
        // spliced into the client's own options, and every other byte
        // (a schema's key order, which strict structured outputs generate
        // in; numbers as written) stays as it came.
        let schema = r#""response_format":{"type":"json_schema","json_schema":{"strict":true,"schema":{"type":"object","properties":{"reasoning":{"type":"string"},"answer":{"type":"number"}}}}},"temperature":0.10,"seed":123456789012345678901"#;
        for (options, spliced) in [
            (
                r#"{"include_obfuscation":false}"#,
                r#"{"include_usage":true,"include_obfuscation":false}"#,
            ),
            (
                r#"{ "include_usage" : false, "x":1 }"#,
                r#"{ "include_usage" : true, "x":1 }"#,
            ),
            (r#"{}"#, r#"{"include_usage":true}"#),
            (r#"null"#, r#"{"include_usage":true}"#),
        ] {
            let body = format!(r#"{{"stream":true,"stream_options": {options},{schema}}}"#);
            let (out, injected) = rewrite(body.as_bytes());
            assert_eq!(
                std::str::from_utf8(&out.expect("rewritten")).unwrap(),
                format!(r#"{{"stream":true,"stream_options": {spliced},{schema}}}"#)
            );
            assert!(injected);
        }
        // A repeated member is read as the provider would (last wins): the
        // last is the one spliced into, never a new one in front.
        let (out, _) = rewrite(
            br#"{"stream_options":{"include_usage":true},"stream":true,"stream_options":{}}"#,
        );
        assert_eq!(
            &out.expect("rewritten")[..],
            br#"{"stream_options":{"include_usage":true},"stream":true,"stream_options":{"include_usage":true}}"#
        );
        // Options that are not an object are the provider's to refuse.
        assert_eq!(
            rewrite(br#"{"stream":true,"stream_options":"yes"}"#),
            (None, false)
        );
        // Not an object: left alone.
        assert_eq!(rewrite(br#"[{"stream":true}]"#), (None, false));
        assert_eq!(rewrite(b"not json"), (None, false));
    }

    /// What the proxy has when it rewrites: the adapter's reading of
    /// `body` as a chat request, streaming whatever the body says.
    fn streaming_chat(body: &[u8]) -> RequestInfo {
        let mut info = OpenAi.request(&RequestView {
            method: &Method::POST,
            path: "/v1/chat/completions",
            query: None,
            headers: &HeaderMap::new(),
            body: Some(body),
        });
        info.streaming = true;
        info
    }

    #[test]
    fn filter_removes_exactly_what_include_usage_added() {
        let out = filtered(CHAT_SSE, &[]);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("usage"), "{text}");
        let expect = String::from_utf8(CHAT_SSE.to_vec())
            .unwrap()
            .replace(",\"usage\":null", "");
        // Every event but the usage chunk, byte for byte.
        let expect: String = expect
            .split_inclusive("\n\n")
            .filter(|e| !e.contains("\"usage\":{"))
            .collect();
        assert_eq!(text, expect);
        // The parser still sees the provider's count in the original bytes.
        assert_eq!(
            parse("text/event-stream", CHAT_SSE, &[])
                .usage
                .unwrap()
                .output_tokens,
            7
        );
    }

    #[test]
    fn filter_leaves_unrelated_streams_alone() {
        let other =
            b"event: x\r\ndata: not json\r\n\r\ndata: {\"a\":1}\n\n: comment\n\ndata: [DONE]\n\n";
        assert_eq!(filtered(other, &[3, 17]), other.to_vec());
        // A repeated usage member is not what include_usage adds.
        let twice = b"data: {\"usage\":null,\"choices\":[],\"usage\":null}\n\n";
        assert_eq!(filtered(twice, &[]), twice.to_vec());
    }

    #[test]
    fn batch_and_files_are_recorded_without_tokens() {
        let h = HeaderMap::new();
        for (path, op) in [
            ("/v1/batches", "batch"),
            ("/v1/files", "file_upload"),
            ("/v1/uploads/u1/parts", "file_upload"),
        ] {
            let info = OpenAi.request(&RequestView {
                method: &Method::POST,
                path,
                query: None,
                headers: &h,
                body: Some(b"{}"),
            });
            assert_eq!(info.operation, op);
            assert!(info.metered);
            let p = crate::providers::testing::parse_split(
                &OpenAi,
                &info,
                "application/json",
                br#"{"id":"batch_1"}"#,
                &[],
            );
            assert_eq!(p.usage, Some(Usage::default()));
        }
    }

    #[test]
    fn a_batch_output_file_is_read_line_by_line_per_model() {
        use crate::providers::testing::request;
        let info = OpenAi.request(&request("GET", "/v1/files/file-abc%3D/content", b""));
        assert_eq!(info.operation, "batch_results");
        assert!(info.metered && !info.own_row());
        assert_eq!(
            info.batch.as_ref().map(|b| b.id.as_str()),
            Some("file-abc=")
        );
        // Not downloads: the file's metadata, an upload, a POST.
        for (m, path) in [
            ("GET", "/v1/files/file-abc"),
            ("POST", "/v1/files/file-abc/content"),
            ("GET", "/v1/containers/cntr_1/files/cfile_1/content"),
            ("GET", "/v1/vector_stores/vs_1/files/file-abc/content"),
            ("GET", "/files/file-abc/content"),
        ] {
            assert!(
                OpenAi.request(&request(m, path, b"")).batch.is_none(),
                "{m} {path}"
            );
        }
        // On a prefixed mount (Azure, Bedrock's OpenAI route).
        assert!(
            OpenAi
                .request(&request("GET", "/openai/files/file-1/content", b""))
                .batch
                .is_some()
        );
        let body =
            std::str::from_utf8(include_bytes!("fixtures/openai/batch_output.jsonl")).unwrap();
        for split in [0, 7, 300, body.len() - 3] {
            let p = crate::providers::testing::parse_split(
                &OpenAi,
                &info,
                "application/octet-stream",
                body.as_bytes(),
                &[split],
            );
            let t = p.batch.expect("a tally");
            assert_eq!(t.lines, 5);
            let got: Vec<_> = t
                .models
                .iter()
                .map(|m| (m.model.as_deref(), m.usage, m.results))
                .collect();
            assert_eq!(
                got,
                vec![
                    (
                        Some("gpt-4o-mini-2024-07-18"),
                        Usage {
                            input_tokens: 30,
                            output_tokens: 6,
                            cached_input_tokens: 10,
                            ..Default::default()
                        },
                        2
                    ),
                    (
                        Some("gpt-5-2025-08-07"),
                        Usage {
                            input_tokens: 100,
                            output_tokens: 50,
                            reasoning_tokens: 30,
                            ..Default::default()
                        },
                        1
                    ),
                ],
                "split at {split}"
            );
        }
        // An input file (requests, no responses) bills nothing.
        let input = concat!(
            r#"{"custom_id":"r1","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o-mini","messages":[],"max_tokens":1000}}"#,
            "\n"
        );
        let p = crate::providers::testing::parse_split(
            &OpenAi,
            &info,
            "application/octet-stream",
            input.as_bytes(),
            &[],
        );
        assert!(p.batch.expect("a tally").models.is_empty());
    }

    #[test]
    fn json_collects_output_text_only_when_usage_is_missing() {
        // With usage, the text is not needed (it feeds local estimates only)
        // and the choices are skipped, not built.
        let p = parse("application/json", CHAT_JSON, &[]);
        assert!(p.usage.is_some());
        assert_eq!(p.output_text, "");
        let mut v: Value = serde_json::from_slice(CHAT_JSON).unwrap();
        v.as_object_mut().unwrap().remove("usage");
        let p = parse("application/json", v.to_string().as_bytes(), &[]);
        assert_eq!(p.usage, None);
        assert_eq!(p.output_text, "The image shows a wooden boardwalk path.");
        assert_eq!(p.response_model, str_at(&v, &["model"]));
    }

    #[test]
    fn stream_event_of_an_unexpected_shape_still_gives_its_usage() {
        let mut found = ParsedUsage::default();
        StreamParser::on_event(
            &mut found,
            r#"{"choices":[{"delta":{"content":[1]}}],"model":"m","usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
            false,
        );
        assert_eq!(
            found.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((3, 2))
        );
        assert_eq!(found.response_model.as_deref(), Some("m"));
        let mut found = ParsedUsage::default();
        StreamParser::on_event(
            &mut found,
            r#"{"type":"response.output_text.delta","delta":"hi \"x\""}"#,
            false,
        );
        assert_eq!(found.output_text, "hi \"x\"");
    }

    #[test]
    fn head_survives_odd_member_types_and_repeated_members() {
        let h = crate::providers::Head::parse(
            br#"{"model":"a","model":"b","max_tokens":"7","usage":{"prompt_tokens":3}}"#,
        )
        .unwrap();
        assert_eq!(h.model().as_deref(), Some("b"), "last member wins");
        assert_eq!(h.max_tokens.and_then(|v| v.as_u64()), None);
        assert_eq!(
            h.usage
                .0
                .as_ref()
                .and_then(WireUsage::usage)
                .unwrap()
                .input_tokens,
            3
        );
        let h = crate::providers::Head::parse(br#"{"model":5,"stream":"yes"}"#).unwrap();
        assert_eq!(h.model(), None);
        assert!(crate::providers::Head::parse(b"[1,2]").is_none());
        assert!(crate::providers::Head::parse(b"not json").is_none());
    }

    #[test]
    fn usage_members_of_odd_types_lose_only_themselves() {
        /// Input, output, cached input and reasoning tokens.
        type Counts = (u64, u64, u64, u64);
        let cases: &[(&str, Option<Counts>)] = &[
            (
                r#"{"prompt_tokens":9,"completion_tokens":4}"#,
                Some((9, 4, 0, 0)),
            ),
            (
                r#"{"prompt_tokens":"9","input_tokens":7}"#,
                Some((7, 0, 0, 0)),
            ),
            (r#"{"prompt_tokens":9.0}"#, None),
            (
                r#"{"prompt_tokens":-1,"input_tokens":5}"#,
                Some((5, 0, 0, 0)),
            ),
            (
                r#"{"prompt_tokens":null,"completion_tokens":[1,{"a":2}]}"#,
                None,
            ),
            (
                r#"{"prompt_tokens":9,"completion_tokens":{"x":1},"prompt_tokens_details":[3]}"#,
                Some((9, 0, 0, 0)),
            ),
            (
                r#"{"input_tokens":10,"output_tokens":6,"input_tokens_details":{"cached_tokens":12},"output_tokens_details":{"reasoning_tokens":2,"x":{"y":[1]}}}"#,
                Some((10, 6, 10, 2)),
            ),
            (
                r#"{"prompt_tokens":10,"prompt_tokens_details":"7","input_tokens_details":{"cached_tokens":3}}"#,
                Some((10, 0, 3, 0)),
            ),
            // DeepSeek's own cache fields (its KV cache guide): the hits
            // are cache reads when no OpenAI-shaped detail says otherwise.
            (
                r#"{"prompt_tokens":1000,"completion_tokens":10,"total_tokens":1010,"prompt_cache_hit_tokens":900,"prompt_cache_miss_tokens":100}"#,
                Some((1000, 10, 900, 0)),
            ),
            (
                r#"{"prompt_tokens":1000,"completion_tokens":10,"prompt_cache_hit_tokens":900,"prompt_tokens_details":{"cached_tokens":896}}"#,
                Some((1000, 10, 896, 0)),
            ),
            (r#"[9,4]"#, None),
            (r#""9""#, None),
            (r#"null"#, None),
            // xAI: reasoning beside the output, in the total (its own
            // documented example): billed as output.
            (
                r#"{"prompt_tokens":32,"completion_tokens":9,"total_tokens":135,"completion_tokens_details":{"reasoning_tokens":94}}"#,
                Some((32, 103, 0, 94)),
            ),
            // OpenAI: reasoning inside the output.
            (
                r#"{"prompt_tokens":32,"completion_tokens":103,"total_tokens":135,"completion_tokens_details":{"reasoning_tokens":94}}"#,
                Some((32, 103, 0, 94)),
            ),
            (
                r#"{"input_tokens":30,"output_tokens":12,"total_tokens":42,"output_tokens_details":{"reasoning_tokens":5}}"#,
                Some((30, 12, 0, 5)),
            ),
            // No total, or one that fits neither: the output as given.
            (
                r#"{"prompt_tokens":32,"completion_tokens":9,"completion_tokens_details":{"reasoning_tokens":94}}"#,
                Some((32, 9, 0, 9)),
            ),
            (
                r#"{"prompt_tokens":32,"completion_tokens":9,"total_tokens":500,"completion_tokens_details":{"reasoning_tokens":94}}"#,
                Some((32, 9, 0, 9)),
            ),
        ];
        for (usage, want) in cases {
            let got = |u: Option<Usage>| {
                u.map(|u| {
                    (
                        u.input_tokens,
                        u.output_tokens,
                        u.cached_input_tokens,
                        u.reasoning_tokens,
                    )
                })
            };
            // Read from a whole document, from the typed head of a body,
            // and from a stream event: the same answer each way.
            let v: Value = serde_json::from_str(usage).unwrap();
            assert_eq!(got(usage_from(&v)), *want, "usage_from {usage}");
            let body = format!(r#"{{"model":"m","usage":{usage},"choices":[]}}"#);
            let h = crate::providers::Head::parse(body.as_bytes()).unwrap();
            assert_eq!(
                got(h.usage.0.as_ref().and_then(WireUsage::usage)),
                *want,
                "head {usage}"
            );
            assert_eq!(h.model().as_deref(), Some("m"), "the rest survives {usage}");
            let mut found = ParsedUsage::default();
            StreamParser::on_event(&mut found, &body, false);
            assert_eq!(got(found.usage), *want, "stream event {usage}");
        }
    }

    #[test]
    fn stream_collects_output_text() {
        let p = parse("text/event-stream", CHAT_SSE, &[]);
        assert_eq!(p.output_text, "Hello there, ünïcødé");
    }

    /// One chunk's data line (JSON on one line), built from members in any
    /// order with any blanks between tokens.
    fn chunk_data() -> impl Strategy<Value = String> {
        let ws = || prop::sample::select(vec!["", " ", "\t", "  "]);
        let usage = prop::sample::select(vec![
            None,
            Some(r#""usage""#.to_string() + "\u{0}null"),
            Some(r#""us\u0061ge""#.to_string() + "\u{0}null"),
            Some(r#""usage""#.to_string() + "\u{0}{\"prompt_tokens\":3,\"completion_tokens\":1}"),
            Some(r#""usage""#.to_string() + "\u{0}0"),
        ]);
        let choices = prop::sample::select(vec![
            None,
            Some("[]"),
            Some("[ ]"),
            Some(r#"[{"index":0,"delta":{"content":"\"usage\":null, }"}}]"#),
        ]);
        let others = prop::sample::subsequence(
            vec![
                r#""id""#.to_string() + "\u{0}\"chatcmpl-1\"",
                r#""model""#.to_string() + "\u{0}\"gpt-4o\"",
                r#""created""#.to_string() + "\u{0}1764547200",
                r#""x""#.to_string() + "\u{0}{\"usage\":null,\"a\":[1,{\"usage\":null}]}",
                r#""note""#.to_string() + "\u{0}\",\\\"usage\\\":null,\"",
                r#""k\"ey""#.to_string() + "\u{0}null",
            ],
            0..=6,
        );
        (usage, choices, others)
            .prop_flat_map(move |(u, c, mut o)| {
                o.extend(u);
                o.extend(c.map(|c| r#""choices""#.to_string() + "\u{0}" + c));
                let n = o.len();
                (
                    Just(o).prop_shuffle(),
                    prop::collection::vec(ws(), 4 * n + 2),
                )
            })
            .prop_map(|(members, blanks)| {
                let mut b = blanks.into_iter();
                let mut out = format!("{{{}", b.next().unwrap());
                for (i, m) in members.iter().enumerate() {
                    let (k, v) = m.split_once('\u{0}').unwrap();
                    if i > 0 {
                        out.push(',');
                        out.push_str(b.next().unwrap());
                    }
                    out.push_str(k);
                    out.push_str(b.next().unwrap());
                    out.push(':');
                    out.push_str(b.next().unwrap());
                    out.push_str(v);
                    out.push_str(b.next().unwrap());
                }
                out.push('}');
                out
            })
    }

    proptest! {
        /// The filter against the document model: an injected usage chunk
        /// (usage object, no choices) is dropped; a `usage: null` member is
        /// cut out, leaving the document otherwise equal and every other
        /// byte as it was; anything else passes unchanged.
        #[test]
        fn filter_cuts_exactly_the_usage_member(data in chunk_data()) {
            let event = format!("data: {data}\n\n");
            let out = filtered(event.as_bytes(), &[]);
            let doc: Value = serde_json::from_str(&data).expect("generated JSON");
            let usage = doc.get("usage");
            let no_choices = doc.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty);
            if usage.is_some_and(Value::is_object) && no_choices {
                prop_assert!(out.is_empty(), "kept {event:?}");
            } else if usage == Some(&Value::Null) {
                let text = String::from_utf8(out).unwrap();
                let new_data = text.strip_prefix("data: ").and_then(|t| t.strip_suffix("\n\n")).unwrap();
                let mut want = doc.clone();
                want.as_object_mut().unwrap().remove("usage");
                let got: Value = serde_json::from_str(new_data)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {new_data:?}")))?;
                prop_assert_eq!(got, want);
                // One contiguous cut: a prefix and a suffix of the original.
                let p = data.bytes().zip(new_data.bytes()).take_while(|(a, b)| a == b).count();
                prop_assert!(data.ends_with(&new_data[p..]), "{data:?} -> {new_data:?}");
            } else {
                prop_assert_eq!(String::from_utf8(out).unwrap(), event);
            }
        }
    }

    proptest! {
        #[test]
        fn any_split_filters_the_same(mut splits in proptest::collection::vec(0usize..CHAT_SSE.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(filtered(CHAT_SSE, &splits), filtered(CHAT_SSE, &[]));
        }

        #[test]
        fn any_split_of_stream_gives_same_usage(mut splits in proptest::collection::vec(0usize..CHAT_SSE.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(parse("text/event-stream", CHAT_SSE, &splits), parse("text/event-stream", CHAT_SSE, &[]));
        }

        /// Whatever object a client sends (members repeated, spacing, nested
        /// options), the rewritten body is JSON that asks for usage and
        /// otherwise says what the client's said, read last-member-wins as
        /// providers read it; no rewrite means the client already asked.
        #[test]
        fn include_usage_rewrite_keeps_the_rest_of_the_body(
            members in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("stream_options"), Just("stream"), Just("model"),
                        Just("messages"), Just("temperature"), Just("x"),
                    ],
                    prop_oneof![
                        Just("null"), Just("true"), Just("0.70"), Just("12345678901234567890123"),
                        Just(r#""gpt-4o""#), Just(r#"[{"role":"user","content":"hi \" there"}]"#),
                        Just(r#"{"include_usage":true}"#), Just(r#"{"include_usage":false}"#),
                        Just(r#"{ "x" : 1 }"#), Just("{}"),
                    ],
                    prop_oneof![Just(""), Just(" "), Just("\n  ")],
                ),
                0..8,
            ),
            lead in prop_oneof![Just(""), Just(" \n")],
        ) {
            let inner: Vec<String> = members
                .iter()
                .map(|(k, v, ws)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}"))
                .collect();
            let body = format!("{lead}{{{}}}", inner.join(","));
            let original: serde_json::Map<String, Value> = serde_json::from_str(&body).unwrap();
            let asked = original.get("stream_options").and_then(|o| o.get("include_usage"))
                == Some(&Value::Bool(true));
            // Options that are not an object are the provider's to refuse.
            let malformed = original
                .get("stream_options")
                .is_some_and(|o| !o.is_object() && !o.is_null());
            // The proxy's path: `request` reads the body's head first, and
            // the rewrite uses what it found.
            let mut info = streaming_chat(body.as_bytes());
            prop_assert!(info.stream_options != StreamOptions::Unread, "{}", body);
            match OpenAi.rewrite_request(&mut info, body.as_bytes()) {
                None => prop_assert!(asked || malformed, "not rewritten: {}", body),
                Some(out) => {
                    let mut v: serde_json::Map<String, Value> = serde_json::from_slice(&out).unwrap();
                    prop_assert!(info.injected_usage);
                    let opts = v.remove("stream_options").unwrap();
                    prop_assert_eq!(opts.get("include_usage"), Some(&Value::Bool(true)));
                    let mut rest = original.clone();
                    if let Some(Value::Object(o)) = rest.remove("stream_options") {
                        for (k, x) in o.into_iter().filter(|(k, _)| k != "include_usage") {
                            prop_assert_eq!(opts.get(&k), Some(&x), "{}", body);
                        }
                    }
                    prop_assert_eq!(v, rest, "{}", body);
                }
            }
        }

        #[test]
        fn any_split_of_json_gives_same_usage(mut splits in proptest::collection::vec(0usize..CHAT_JSON.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(parse("application/json", CHAT_JSON, &splits), parse("application/json", CHAT_JSON, &[]));
        }
    }
}
