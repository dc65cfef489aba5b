//! Google Gemini API (generativelanguage.googleapis.com): generateContent,
//! streamGenerateContent (SSE with `alt=sse`, otherwise a JSON array sent
//! element by element), countTokens (recorded, free), embedContent and
//! batchEmbedContents, on `models/` and `tunedModels/`, under `/v1beta/`,
//! `/v1/` or `/v1alpha/`. The OpenAI-compatible endpoints (`/v1beta/openai/...`
//! on this host, Vertex AI's `…/endpoints/openapi/chat/completions`,
//! `completions` and `embeddings`) are handed to the OpenAI adapter.
//!
//! Gemini on Vertex AI (`{region}-aiplatform.googleapis.com`, configured
//! as a `[[providers]]` host with `api = "gemini"`) speaks the same
//! methods and `usageMetadata` on
//! `/{version}/projects/{p}/locations/{l}/publishers/google/models/{model}`
//! (and `/{version}/publishers/google/models/{model}` with an API key).
//! Claude there (`publishers/anthropic/models/{model}:rawPredict` and
//! `:streamRawPredict`) is Anthropic's Messages API with the model in the
//! URL: such a request is handed to the Anthropic adapter
//! ([`RequestInfo::api`]) and recorded and priced as Anthropic's.
//!
//! Normalisation of `usageMetadata`: `input_tokens` = promptTokenCount +
//! toolUsePromptTokenCount, `cached_input_tokens` = cachedContentTokenCount
//! (a subset of the prompt), `output_tokens` = candidatesTokenCount +
//! thoughtsTokenCount (thoughts are billed as output), `reasoning_tokens` =
//! thoughtsTokenCount. In streams each chunk repeats the cumulative usage:
//! the last one wins.
//!
//! The API key may travel in a `key=` query parameter: nothing here reads
//! the query, and nothing derived from it is returned.

use serde_json::Value;

use super::anthropic;
use super::openai::{self, OpenAi};
use super::sse::SseReader;
use super::{
    Count, JsonBody, ObjectOr, ParsedUsage, Provider, RequestInfo, RequestView, UsageParser, str_at,
};
use crate::config::ApiKind;
use crate::meter::Usage;

pub struct Gemini;

/// Operations this adapter reads itself; anything else that is metered
/// came from the OpenAI-compatible endpoint.
const OWN_OPERATIONS: &[&str] = &[
    "generate_content",
    "count_tokens",
    "embeddings",
    "batch",
    "interaction",
];

/// The Interactions API's create call: `POST /{version}/interactions`
/// (not `/interactions/{id}/cancel`, nor a GET of one).
fn is_interactions_create(path: &str) -> bool {
    let p = path.trim_end_matches('/');
    p.strip_suffix("/interactions").is_some_and(|v| {
        v.trim_start_matches('/').starts_with('v') && !v.trim_start_matches('/').contains('/')
    })
}

/// A retrieval of an interaction: `GET /{version}/interactions/{id}`
/// (polling a background interaction, or resuming its stream with
/// `?stream=true`) and `POST /{version}/interactions/{id}/cancel`. Gives
/// the id.
fn interaction_retrieved(method: &http::Method, path: &str) -> Option<String> {
    let (parent, id) = super::retrieval_path(method, path)?;
    is_interactions_create(parent).then_some(id)
}

/// A native API path: `/{version}/{models|tunedModels}/{name}:{method}`,
/// or Vertex AI's Google models (see the module's doc), percent-decoded.
/// Returns the model and the method.
fn native_path(path: &str) -> Option<(String, String)> {
    let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let (version, rest) = path.trim_start_matches('/').split_once('/')?;
    if !version.starts_with('v') {
        return None;
    }
    let rest = vertex_google_model(rest).unwrap_or(rest);
    let (collection, name) = rest.split_once('/')?;
    let (model, method) = name.rsplit_once(':')?;
    if model.is_empty() || model.contains('/') {
        return None;
    }
    let model = match collection {
        "models" => model.to_owned(),
        "tunedModels" => format!("tunedModels/{model}"),
        _ => return None,
    };
    Some((model, method.trim_end_matches('/').to_owned()))
}

/// A text embedding model, by a whole `embedding` word in its name
/// (`text-embedding-005`, `text-multilingual-embedding-002`,
/// `gemini-embedding-001`; not `multimodalembedding`).
fn is_embedding_model(model: &str) -> bool {
    model
        .split(['-', '@', '.', '_'])
        .any(|w| w.eq_ignore_ascii_case("embedding"))
}

/// What follows `publishers/google/` in a Vertex AI path (`models/...`).
fn vertex_google_model(rest: &str) -> Option<&str> {
    vertex_publisher(rest, "google")
}

/// What follows `publishers/{publisher}/` in a Vertex AI path (after the
/// version): after `projects/{p}/locations/{l}/`, or at the start
/// (express mode).
fn vertex_publisher<'a>(rest: &'a str, publisher: &str) -> Option<&'a str> {
    let rest = match rest.strip_prefix("projects/") {
        Some(r) => {
            let (_project, r) = r.split_once('/')?;
            let r = r.strip_prefix("locations/")?;
            r.split_once('/')?.1
        }
        None => rest,
    };
    rest.strip_prefix("publishers/")?
        .strip_prefix(publisher)?
        .strip_prefix('/')
}

/// Whether a Vertex AI path names a regional location
/// (`/v1/projects/{p}/locations/us-east5/...`) rather than the global
/// endpoint (`locations/global`) or none (express mode): Claude models
/// cost more there (see `meter::pricing::VERTEX_REGIONAL_PREMIUM`).
pub(crate) fn vertex_regional(path: &str) -> bool {
    let mut parts = path.trim_start_matches('/').split('/');
    let _version = parts.next();
    if parts.next() != Some("projects") {
        return false;
    }
    let _project = parts.next();
    if parts.next() != Some("locations") {
        return false;
    }
    parts
        .next()
        .is_some_and(|l| !l.is_empty() && !l.eq_ignore_ascii_case("global"))
}

/// Claude on Vertex AI:
/// `/{version}/projects/{p}/locations/{l}/publishers/anthropic/models/{model}:{method}`,
/// percent-decoded. Returns the model and the method.
fn vertex_anthropic(path: &str) -> Option<(String, String)> {
    let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let (version, rest) = path.trim_start_matches('/').split_once('/')?;
    if !version.starts_with('v') {
        return None;
    }
    let name = vertex_publisher(rest, "anthropic")?.strip_prefix("models/")?;
    let (model, method) = name.rsplit_once(':')?;
    if model.is_empty() || model.contains('/') {
        return None;
    }
    Some((model.to_owned(), method.trim_end_matches('/').to_owned()))
}

/// True for the OpenAI-compatible endpoints: the Gemini API's
/// (`/v1beta/openai/...`) and Vertex AI's
/// (`/v1/projects/P/locations/L/endpoints/openapi/...`, which serves
/// Gemini as `google/gemini-…` and partner models such as
/// `meta/llama-…-maas`).
fn is_openai_compat(path: &str) -> bool {
    let Some((_, rest)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    if rest.starts_with("openai/") {
        return true;
    }
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    matches!(
        parts.as_slice(),
        [
            "projects",
            _,
            "locations",
            _,
            "endpoints",
            "openapi",
            "chat",
            "completions"
        ] | [
            "projects",
            _,
            "locations",
            _,
            "endpoints",
            "openapi",
            "completions" | "embeddings"
        ]
    )
}

/// A generateContent request body, as far as it is read (the contents are
/// skipped, not built): its `generationConfig`, in either JSON spelling.
/// A member that is there, even as `null`, is the one read.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireGenerateRequest {
    #[serde(
        rename = "generationConfig",
        deserialize_with = "super::present_member"
    )]
    generation_config_camel: Option<ObjectOr<WireGenerationConfig>>,
    #[serde(deserialize_with = "super::present_member")]
    generation_config: Option<ObjectOr<WireGenerationConfig>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireGenerationConfig {
    #[serde(rename = "maxOutputTokens")]
    max_output_tokens_camel: Count,
    max_output_tokens: Count,
    #[serde(rename = "candidateCount")]
    candidate_count_camel: Count,
    candidate_count: Count,
}

impl WireGenerateRequest {
    /// The output cap (per candidate, times the number of candidates).
    fn max_output(&self) -> Option<u64> {
        let cfg = self
            .generation_config_camel
            .as_ref()
            .or(self.generation_config.as_ref())?
            .0
            .as_ref()?;
        let per = cfg.max_output_tokens_camel.0.or(cfg.max_output_tokens.0)?;
        let n = cfg
            .candidate_count_camel
            .0
            .or(cfg.candidate_count.0)
            .unwrap_or(1)
            .max(1);
        Some(per.saturating_mul(n))
    }
}

/// An Interactions API create body, as far as it is read (the input is
/// skipped, not built).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireInteractionRequest {
    /// Absent when an agent is named instead.
    model: Option<Value>,
    stream: Option<Value>,
    generation_config: ObjectOr<WireGenerationConfig>,
    background: Option<Value>,
}

impl Provider for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn request(&self, req: &RequestView<'_>) -> RequestInfo {
        if is_openai_compat(req.path) {
            let mut info = OpenAi.request(req);
            // Read (and estimated) as OpenAI's, recorded as Gemini's; no
            // `stream_options` is added there.
            info.wire = Some(crate::config::ApiKind::Openai);
            info.refuses_stream_options = true;
            // Gemini models only (`gemini-…`, Vertex's `google/gemini-…`),
            // not the partner models Vertex serves there.
            let gemini = info.model.as_deref().is_none_or(|m| {
                let m = m.strip_prefix("google/").unwrap_or(m);
                m.starts_with("gemini") || m.starts_with("models/gemini")
            });
            info.thoughts_beside_completion = gemini;
            if let Some(b) = &mut info.batch
                && b.format == super::batch::Format::OpenAi
            {
                b.format = super::batch::Format::OpenAiThoughtsBeside;
            }
            return info;
        }
        let unmetered = RequestInfo {
            operation: "other",
            ..Default::default()
        };
        if let Some(id) = interaction_retrieved(req.method, req.path) {
            return RequestInfo {
                operation: "interaction",
                metered: true,
                retrieves: Some(id),
                streaming: req
                    .query
                    .is_some_and(|q| q.split('&').any(|kv| kv == "stream=true")),
                ..Default::default()
            };
        }
        if let Some(results) = batch_results(req.method, req.path) {
            // A batch's state (its responses inlined once it has ended),
            // or a file's content (a batch's responses file).
            return RequestInfo {
                operation: super::batch::OPERATION,
                metered: true,
                batch: Some(results),
                ..Default::default()
            };
        }
        if req.method != http::Method::POST {
            return unmetered;
        }
        if let Some((model, method)) = vertex_anthropic(req.path) {
            // Claude's Messages API, the model in the URL (`count-tokens`
            // names the free counting call, whose body names the model).
            let op = match (method.as_str(), model.as_str()) {
                ("rawPredict", "count-tokens") => "count_tokens",
                ("rawPredict" | "streamRawPredict", _) => "chat",
                _ => return unmetered,
            };
            let model = (op == "chat").then_some(model);
            let mut info = anthropic::messages_request(op, model, req.body);
            info.streaming |= method == "streamRawPredict";
            info.api = Some(ApiKind::Anthropic);
            return info;
        }
        if is_interactions_create(req.path) {
            // The model (or an agent, which names no model) and `stream`
            // are in the body.
            let body = req
                .body
                .and_then(super::parse_object::<WireInteractionRequest>)
                .unwrap_or_default();
            return RequestInfo {
                operation: "interaction",
                metered: true,
                model: body
                    .model
                    .as_ref()
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                streaming: body.stream.as_ref().and_then(Value::as_bool) == Some(true),
                max_output_tokens: body.generation_config.0.and_then(|g| g.max_output_tokens.0),
                // Deep Think and Deep Research run so: answered at once,
                // the usage in a later retrieval.
                background: body.background.as_ref().and_then(Value::as_bool) == Some(true),
                ..Default::default()
            };
        }
        let Some((model, method)) = native_path(req.path) else {
            return unmetered;
        };
        let (operation, streaming) = match method.as_str() {
            "generateContent" => ("generate_content", false),
            "streamGenerateContent" => ("generate_content", true),
            "countTokens" => ("count_tokens", false),
            "embedContent" | "batchEmbedContents" => ("embeddings", false),
            // Vertex AI's embedding models (`text-embedding-005`,
            // `gemini-embedding-001`); other models' `:predict` (Imagen,
            // multimodal embeddings) are priced per image or character.
            "predict" if is_embedding_model(&model) => ("embeddings", false),
            "batchGenerateContent" | "asyncBatchEmbedContent" => ("batch", false),
            _ => return unmetered,
        };
        let max_output_tokens = if operation == "generate_content" {
            req.body
                .and_then(super::parse_object::<WireGenerateRequest>)
                .and_then(|r| r.max_output())
        } else {
            None
        };
        // Vertex AI prices its older text embedding models per character
        // (Gemini embedding models per token).
        let not_token_priced = method == "predict"
            && !model
                .get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("gemini-"));
        RequestInfo {
            operation,
            metered: true,
            model: Some(model),
            streaming,
            max_output_tokens,
            not_token_priced,
            ..Default::default()
        }
    }

    fn response_parser(
        &self,
        info: &RequestInfo,
        status: u16,
        headers: &http::HeaderMap,
    ) -> Box<dyn UsageParser> {
        if let Some(b) = &info.batch {
            // (OpenAI's format on the OpenAI-compatible endpoint.)
            return super::batch::parser(b, status);
        }
        if !OWN_OPERATIONS.contains(&info.operation) {
            return OpenAi.response_parser(info, status, headers);
        }
        if info.operation == "interaction" {
            return Box::new(InteractionParser {
                sse: (super::content_type(headers) == "text/event-stream")
                    .then(|| SseReader::new(JsonBody::DEFAULT_LIMIT)),
                json: JsonBody::new(JsonBody::DEFAULT_LIMIT),
                found: ParsedUsage {
                    service_tier: header_tier(headers),
                    ..ParsedUsage::default()
                },
                done: false,
            });
        }
        let free = matches!(info.operation, "count_tokens" | "batch");
        let mut found = Found::new(free);
        found.request_model.clone_from(&info.model);
        found.service_tier = header_tier(headers);
        found.ok_status = (200..300).contains(&status);
        if super::content_type(headers) == "text/event-stream" {
            Box::new(SseParser {
                sse: SseReader::new(JsonBody::DEFAULT_LIMIT),
                found,
            })
        } else {
            Box::new(JsonParser {
                split: ArraySplitter::new(JsonBody::DEFAULT_LIMIT),
                found,
            })
        }
    }
}

/// The tier a Vertex AI `trafficType` names (`ON_DEMAND_FLEX` → `flex`,
/// `ON_DEMAND_PRIORITY` → `priority`, plain `ON_DEMAND` → `standard`);
/// provisioned throughput is bought ahead: no tier.
fn traffic_tier(t: &str) -> Option<String> {
    match t.to_ascii_uppercase().as_str() {
        "ON_DEMAND" => Some("standard".into()),
        "ON_DEMAND_FLEX" => Some("flex".into()),
        "ON_DEMAND_PRIORITY" => Some("priority".into()),
        _ => None,
    }
}

/// The tier the Gemini API says served a request (`x-gemini-service-tier`).
fn header_tier(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("x-gemini-service-tier")
        .and_then(|v| v.to_str().ok())
        .and_then(super::service_tier)
}

/// Usage from an Interactions API `usage` object (the same counts as
/// `usageMetadata` under other names), or `None` when it has none.
fn interaction_usage(u: &Value) -> Option<Usage> {
    let f = |k: &str| u.get(k).and_then(Value::as_u64);
    let prompt = f("total_input_tokens");
    let out = f("total_output_tokens");
    if prompt.is_none() && out.is_none() {
        return None;
    }
    let input = prompt
        .unwrap_or(0)
        .saturating_add(f("total_tool_use_tokens").unwrap_or(0));
    let out = out.unwrap_or(0);
    let thoughts = f("total_thought_tokens").unwrap_or(0);
    // As in `usageMetadata`, thoughts are beside the output, unless the
    // total says the output already holds them.
    let output = if thoughts > 0 && f("total_tokens") == Some(input.saturating_add(out)) {
        out
    } else {
        out.saturating_add(thoughts)
    };
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: f("total_cached_tokens").unwrap_or(0).min(input),
        cache_write_input_tokens: 0,
        reasoning_tokens: thoughts.min(output),
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
}

/// The Interactions API's answer: a JSON interaction (`model`, `usage`),
/// or a stream whose lifecycle events (`interaction.completed`, or the
/// legacy `interaction.complete` sent when steps are disabled) carry the
/// interaction.
struct InteractionParser {
    sse: Option<SseReader>,
    json: JsonBody,
    found: ParsedUsage,
    /// The interaction's final counts were read (a completed event, or a
    /// JSON interaction).
    done: bool,
}

impl InteractionParser {
    fn on_interaction(found: &mut ParsedUsage, done: &mut bool, v: &Value) {
        let event = v.get("event_type").and_then(Value::as_str);
        // The text that streams, for an estimate if the counts never come.
        if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
            super::push_text(&mut found.output_text, t);
        }
        let i = v.get("interaction").filter(|i| i.is_object()).unwrap_or(v);
        let text = |k: &str| i.get(k).and_then(Value::as_str);
        if let Some(id) = text("id")
            .filter(|_| i.get("status").is_some())
            .and_then(super::response_id)
        {
            found.response_id = Some(id);
        }
        if let Some(status) = text("status").and_then(super::error_type) {
            found.response_status = Some(status);
        }
        // Counts only from the end of the interaction: a stream's earlier
        // events (and an interaction still running) may carry some that
        // are not final. `interaction.complete` is the final event's legacy
        // name (streams with steps disabled).
        let last = event
            .is_none_or(|e| matches!(e, "interaction.completed" | "interaction.complete"))
            && !matches!(
                i.get("status").and_then(Value::as_str),
                Some("in_progress" | "queued")
            );
        if last && let Some(u) = i.get("usage").and_then(interaction_usage) {
            found.usage = Some(u);
            *done = true;
        }
        if let Some(m) = i
            .get("model")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            found.response_model = Some(m.strip_prefix("models/").unwrap_or(m).to_owned());
        }
        if let Some(t) = i
            .get("service_tier")
            .and_then(Value::as_str)
            .and_then(super::service_tier)
        {
            found.service_tier = Some(t);
        }
        if let Some(e) = v.get("error").filter(|_| event.is_some()) {
            found.error = ["status", "code"]
                .into_iter()
                .find_map(|k| e.get(k).and_then(Value::as_str))
                .and_then(super::error_type);
        }
    }
}

impl UsageParser for InteractionParser {
    fn feed(&mut self, chunk: &[u8]) {
        let (found, done) = (&mut self.found, &mut self.done);
        match self.sse.as_mut() {
            Some(sse) => sse.feed(chunk, &mut |e| {
                if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                    Self::on_interaction(found, done, &v);
                }
            }),
            None => self.json.feed(chunk),
        }
    }

    fn usage_seen(&self) -> bool {
        self.done
    }

    fn finish(&mut self) -> ParsedUsage {
        let (found, done) = (&mut self.found, &mut self.done);
        match self.sse.as_mut() {
            Some(sse) => sse.finish(&mut |e| {
                if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                    Self::on_interaction(found, done, &v);
                }
            }),
            None => {
                if let Some(v) = self.json.take() {
                    Self::on_interaction(found, done, &v);
                }
            }
        }
        std::mem::take(&mut self.found)
    }
}

/// A read of a batch's results: `GET /{version}/batches/{id}` (the
/// batch, whose responses are inlined in it once it has ended; the id is
/// kept as `batches/{id}`), or a file's content, `GET
/// /{version}/files/{id}:download` (what the SDK's `files.download` asks
/// for) or `GET /download/{version}/files/{id}:download` (the file's
/// `downloadUri`): a batch's responses file is one.
fn batch_results(method: &http::Method, path: &str) -> Option<super::BatchResults> {
    use super::batch::Format;
    if method != http::Method::GET {
        return None;
    }
    let p = path.trim_end_matches('/');
    let segments: Vec<&str> = p.trim_start_matches('/').split('/').collect();
    let version = |v: &str| v.starts_with('v') && v[1..].starts_with(|c: char| c.is_ascii_digit());
    let (id, format) = match segments.as_slice() {
        [v, "batches", id] if version(v) && !id.contains(':') => (
            format!("batches/{}", super::path_id(id)?),
            Format::GeminiInlined,
        ),
        [v, "files", file] | ["download", v, "files", file] if version(v) => (
            super::path_id(file.strip_suffix(":download")?)?,
            Format::GeminiLines,
        ),
        _ => return None,
    };
    Some(super::BatchResults::new(id, format))
}

/// A GenerateContent response, as far as a batch result is read, member
/// by member (a repeated member is read again, not an error).
#[derive(Default)]
struct WireBatchResponse {
    model_version: Option<Value>,
    usage_metadata: Option<Value>,
    /// The searches it was grounded in.
    candidates: GroundingQueries,
}

impl<'de> serde::Deserialize<'de> for WireBatchResponse {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WireBatchResponse;
            super::lenient_visits!(integers, arrays);
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<WireBatchResponse, A::Error> {
                let mut r = WireBatchResponse::default();
                super::visit_members(a, |k, a| {
                    match k {
                        "modelVersion" => r.model_version = a.next_value()?,
                        "usageMetadata" => r.usage_metadata = a.next_value()?,
                        "candidates" => r.candidates = a.next_value()?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                Ok(r)
            }
        }
        d.deserialize_any(V)
    }
}

/// A batch result, inlined (`{"response": {…}, "metadata"}`) or a line of
/// a responses file (`{"key", "response": {…}}`).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatchResult {
    response: super::ObjectOr<WireBatchResponse>,
}

impl WireBatchResult {
    /// What it bills: the response's `usageMetadata`, at its
    /// `modelVersion`. One that failed (`error`, no response) bills
    /// nothing.
    fn bills(&self) -> Option<super::batch::LineUsage> {
        let r = self.response.0.as_ref()?;
        let model = r
            .model_version
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_string);
        let searches = billed_searches(r.candidates.0.len(), [model.as_deref(), None]);
        Some(super::batch::LineUsage {
            usage: Usage {
                web_searches: searches,
                ..usage_from(r.usage_metadata.as_ref()?)?
            },
            model,
            uplift_percent: 0,
        })
    }
}

/// A line of a batch's responses file.
pub(crate) fn batch_result_line(line: &[u8]) -> Option<super::batch::LineUsage> {
    serde_json::from_slice::<WireBatchResult>(line)
        .ok()?
        .bills()
}

/// A batch's state, as far as its inlined responses are read:
/// `metadata.output.inlinedResponses.inlinedResponses` (or the
/// operation's `response`, which repeats the output), and the batch's
/// model (`metadata.model`, `models/…`).
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatch {
    metadata: super::ObjectOr<WireBatchMetadata>,
    response: super::ObjectOr<WireBatchOutput>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct WireBatchMetadata {
    model: Option<Value>,
    output: super::ObjectOr<WireBatchOutput>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WireBatchOutput {
    inlined_responses: super::ObjectOr<WireInlined>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct WireInlined {
    inlined_responses: Vec<WireBatchResult>,
}

/// Reads a finished batch's inlined responses (one bounded document, read
/// at its end); each response is a result, by its place in the list.
pub(crate) struct InlinedParser {
    body: JsonBody,
    claims: super::batch::Claims,
}

impl InlinedParser {
    pub(crate) fn new(claims: super::batch::Claims) -> InlinedParser {
        InlinedParser {
            body: JsonBody::new(JsonBody::DEFAULT_LIMIT),
            claims,
        }
    }
}

impl UsageParser for InlinedParser {
    fn feed(&mut self, chunk: &[u8]) {
        self.body.feed(chunk);
    }

    fn finish(&mut self) -> ParsedUsage {
        let mut tally = super::batch::BatchTally::default();
        let Some(bytes) = self.body.bytes() else {
            if self.body.over_budget() {
                tracing::debug!(
                    "a Gemini batch read while the agent held proxy.max_buffered_response_bytes of answers: its inlined responses are not read (a later read counts them)"
                );
            } else {
                tracing::debug!(
                    "a Gemini batch larger than 16 MiB: its inlined responses are not read"
                );
            }
            return ParsedUsage {
                usage: Some(Usage::default()),
                ..Default::default()
            };
        };
        let batch = serde_json::from_slice::<WireBatch>(bytes).ok();
        if let Some(b) = batch {
            let model = b
                .metadata
                .0
                .as_ref()
                .and_then(|m| m.model.as_ref())
                .and_then(Value::as_str)
                .map(|m| m.strip_prefix("models/").unwrap_or(m).to_string());
            let output = b
                .metadata
                .0
                .and_then(|m| m.output.0)
                .or(b.response.0)
                .and_then(|o| o.inlined_responses.0);
            let mut whole = false;
            for (i, r) in output
                .into_iter()
                .flat_map(|o| o.inlined_responses)
                .enumerate()
            {
                let bills = r.bills().map(|mut u| {
                    if u.model.is_none() {
                        u.model.clone_from(&model);
                    }
                    u
                });
                tally.result(i as u64, bills, &self.claims);
                whole = true;
            }
            // Read whole, every response claimed: later polls of the
            // batch need not be read.
            if whole {
                self.claims.read_whole();
            }
        }
        ParsedUsage {
            usage: Some(Usage::default()),
            batch: Some(tally),
            ..Default::default()
        }
    }
}

/// Usage from a `usageMetadata` object, or `None` when it has no counts.
pub fn usage_from(m: &Value) -> Option<Usage> {
    let f = |k: &str| m.get(k).and_then(Value::as_u64);
    let prompt = f("promptTokenCount");
    // Gemini Live on the Gemini API names the output `responseTokenCount`
    // (and its split `responseTokensDetails`).
    let candidates = f("candidatesTokenCount").or_else(|| f("responseTokenCount"));
    if prompt.is_none() && candidates.is_none() && f("totalTokenCount").is_none() {
        return None;
    }
    let input = prompt
        .unwrap_or(0)
        .saturating_add(f("toolUsePromptTokenCount").unwrap_or(0));
    let thoughts = f("thoughtsTokenCount").unwrap_or(0);
    let output = candidates.unwrap_or(0).saturating_add(thoughts);
    // `[{modality, tokenCount}]`: the audio and image parts (video frames
    // with the images: the models that price them apart price both
    // alike).
    let by_modality = |k: &str, modality: &str| {
        m.get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|d| {
                let m = d.get("modality").and_then(Value::as_str);
                m == Some(modality) || (modality == "IMAGE" && m == Some("VIDEO"))
            })
            .filter_map(|d| d.get("tokenCount").and_then(Value::as_u64))
            .fold(0u64, u64::saturating_add)
    };
    let uncached = |modality: &str| {
        by_modality("promptTokensDetails", modality)
            .saturating_sub(by_modality("cacheTokensDetails", modality))
    };
    let cached = f("cachedContentTokenCount").unwrap_or(0).min(input);
    let fresh = input - cached;
    let audio_in = uncached("AUDIO").min(fresh);
    let cached_audio = by_modality("cacheTokensDetails", "AUDIO").min(cached);
    let spoken = output - thoughts.min(output);
    let output_details = if m.get("candidatesTokensDetails").is_some() {
        "candidatesTokensDetails"
    } else {
        "responseTokensDetails"
    };
    let audio_out = by_modality(output_details, "AUDIO").min(spoken);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        cache_write_input_tokens: 0,
        reasoning_tokens: thoughts,
        cache_write_1h_input_tokens: 0,
        web_searches: 0,
        web_searches_preview: 0,
        // Beside the cache reads, which the prompt's counts include, and
        // beside the thoughts.
        audio_input_tokens: audio_in,
        image_input_tokens: uncached("IMAGE").min(fresh - audio_in),
        audio_output_tokens: audio_out,
        image_output_tokens: by_modality(output_details, "IMAGE").min(spoken - audio_out),
        cached_audio_input_tokens: cached_audio,
        cached_image_input_tokens: by_modality("cacheTokensDetails", "IMAGE")
            .min(cached - cached_audio),

        audio_duration_ms: 0,
    })
}

/// Whether `model` bills grounding with Google Search by the query
/// (Gemini 3 and later: each distinct non-empty query the model ran)
/// rather than by the grounded prompt (Gemini 2.x and earlier: one per
/// request grounded, however many queries).
pub(crate) fn bills_each_query(model: &str) -> bool {
    gemini_major(model).is_some_and(|n| n >= 3)
}

/// The major version a model name gives (`gemini-3-pro-preview`: 3), if
/// it gives one (`gemini-flash-latest` does not).
fn gemini_major(model: &str) -> Option<u32> {
    let m = model.to_ascii_lowercase();
    let at = m.find("gemini-")?;
    let major: String = m[at + 7..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    major.parse().ok()
}

/// The searches billed for an answer grounded in `queries` (distinct,
/// non-empty) by `models` (the response's first: the one that ran, where
/// the request's may be an alias): each query from Gemini 3 on, else the
/// grounded prompt once.
fn billed_searches(queries: usize, models: [Option<&str>; 2]) -> u64 {
    let n = queries as u64;
    let model = models
        .into_iter()
        .flatten()
        .find(|m| gemini_major(m).is_some());
    if model.is_some_and(bills_each_query) {
        n
    } else {
        n.min(1)
    }
}

/// The distinct non-empty `groundingMetadata.webSearchQueries` of every
/// candidate, read member by member (a repeated member is no error, the
/// rest of a candidate is skipped, not built); any other JSON reads as
/// none.
#[derive(Debug, Default)]
struct GroundingQueries(std::collections::BTreeSet<String>);

impl GroundingQueries {
    /// Keeps the non-empty strings of `queries`, up to the bound.
    fn add(&mut self, queries: &Value) {
        for q in queries
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !q.trim().is_empty() && self.0.len() < MAX_SEARCH_QUERIES {
                self.0.insert(q.to_owned());
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for GroundingQueries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{MapAccess, SeqAccess, Visitor};
        /// The queries of one candidate's `groundingMetadata`, or of the
        /// candidate (`nested`: its `groundingMetadata` member first).
        struct Member<'q>(&'q mut GroundingQueries, bool);
        impl<'de> serde::de::DeserializeSeed<'de> for Member<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(self)
            }
        }
        impl<'de> Visitor<'de> for Member<'_> {
            type Value = ();
            super::lenient_visits!(integers, arrays);
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<(), A::Error> {
                let (found, nested) = (self.0, self.1);
                super::visit_members(a, |k, a| match (k, nested) {
                    ("groundingMetadata", true) => {
                        a.next_value_seed(Member(&mut *found, false))?;
                        Ok(true)
                    }
                    ("webSearchQueries", false) => {
                        found.add(&a.next_value::<Value>()?);
                        Ok(true)
                    }
                    _ => Ok(false),
                })
            }
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GroundingQueries;
            super::lenient_visits!(integers, objects);
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<GroundingQueries, A::Error> {
                let mut found = GroundingQueries::default();
                while a.next_element_seed(Member(&mut found, true))?.is_some() {}
                Ok(found)
            }
        }
        d.deserialize_any(V)
    }
}

/// The most distinct search queries kept for one request.
const MAX_SEARCH_QUERIES: usize = 1024;

/// What the responses of one body said so far.
#[derive(Default)]
struct Found {
    /// countTokens and batch submissions bill nothing themselves.
    free: bool,
    /// At least one JSON response object was read.
    any: bool,
    usage: Option<Usage>,
    model: Option<String>,
    text: String,
    /// A generate response was read (an object with `candidates`).
    generating: bool,
    /// A candidate gave its `finishReason`, or the prompt was blocked: the
    /// usage read with it is final. A stream cut before that has only the
    /// counts so far (cumulative, and some chunks carry only the prompt's).
    finished: bool,
    /// Candidates (by `index`) that have streamed without their
    /// `finishReason` yet (`candidateCount` above 1): the generation is
    /// over once none is left. At most 64 kept.
    open_candidates: std::collections::BTreeSet<u64>,
    /// The provider's error status, from an error object that ended a
    /// body after responses (a stream's mid-way `{"error": ...}`), or
    /// that was all of a successful status's body.
    error: Option<String>,
    /// The response's status was a success: an error object in its body
    /// is the provider's own error even before any response.
    ok_status: bool,
    /// The tier that served the request: the Gemini API's
    /// `x-gemini-service-tier` header, or Vertex AI's
    /// `usageMetadata.trafficType` (`ON_DEMAND_PRIORITY` → `priority`).
    service_tier: Option<String>,
    /// The distinct non-empty `groundingMetadata.webSearchQueries` of
    /// every candidate of every response (a stream may send them on any
    /// chunk, or split), at most [`MAX_SEARCH_QUERIES`].
    search_queries: GroundingQueries,
    /// The request's model, which says how searches are billed (else the
    /// response's).
    request_model: Option<String>,
}

impl Found {
    fn new(free: bool) -> Self {
        Found {
            free,
            ..Default::default()
        }
    }

    /// One GenerateContentResponse (or embed/count response) object.
    fn on_response(&mut self, v: &Value) {
        if !v.is_object() {
            return;
        }
        let answered = self.usage.is_some() || self.generating;
        self.any = true;
        if let Some(e) = v.get("error") {
            if answered || self.ok_status {
                self.error = e
                    .get("status")
                    .and_then(Value::as_str)
                    .and_then(super::error_type)
                    .or_else(|| Some("error".to_string()));
            }
            return;
        }
        if v.pointer("/promptFeedback/blockReason").is_some() {
            self.finished = true;
        }
        if let Some(t) = v
            .pointer("/usageMetadata/trafficType")
            .and_then(Value::as_str)
            .and_then(traffic_tier)
        {
            self.service_tier = Some(t);
        }
        if let Some(u) = v.get("usageMetadata").and_then(usage_from) {
            self.usage = Some(u);
        } else if let Some(u) = v.get("usage").and_then(openai::usage_from) {
            // Embeddings through the OpenAI-compatible endpoint.
            self.usage = Some(u);
        } else if let Some(n) = v
            .get("predictions")
            .and_then(Value::as_array)
            .and_then(|p| prediction_tokens(p))
        {
            self.usage = Some(Usage {
                input_tokens: n,
                ..Usage::default()
            });
        }
        if let Some(m) = str_at(v, &["modelVersion"]).filter(|m| !m.is_empty()) {
            let m = m.strip_prefix("models/").map(str::to_owned).unwrap_or(m);
            self.model = Some(m);
        }
        let candidates = v.get("candidates").and_then(Value::as_array);
        self.generating |= candidates.is_some();
        for c in candidates.into_iter().flatten() {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            if c.get("finishReason")
                .and_then(Value::as_str)
                .is_some_and(|r| !r.is_empty())
            {
                self.finished = true;
                self.open_candidates.remove(&index);
            } else if self.open_candidates.len() < 64 {
                self.open_candidates.insert(index);
            }
            if let Some(q) = c.pointer("/groundingMetadata/webSearchQueries") {
                self.search_queries.add(q);
            }
            let parts = c.pointer("/content/parts").and_then(Value::as_array);
            for p in parts.into_iter().flatten() {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    super::push_text(&mut self.text, t);
                }
                // A function call's name and arguments are output too.
                if let Some(f) = p.get("functionCall") {
                    if let Some(n) = f.get("name").and_then(Value::as_str) {
                        super::push_text(&mut self.text, n);
                    }
                    if let Some(a) = f.get("args").filter(|a| !a.is_null()) {
                        super::push_text(&mut self.text, &a.to_string());
                    }
                }
            }
        }
    }

    fn on_bytes(&mut self, b: &[u8]) {
        if let Ok(v) = serde_json::from_slice::<Value>(b) {
            self.on_response(&v);
        }
    }

    /// The searches billed: the distinct queries for a model billed by
    /// the query, else 1 for a grounded answer.
    fn web_searches(&self) -> u64 {
        billed_searches(
            self.search_queries.0.len(),
            [self.model.as_deref(), self.request_model.as_deref()],
        )
    }

    /// `take` will give usage.
    fn seen(&self) -> bool {
        self.usage.is_some() || (self.free && self.any)
    }

    fn take(&mut self) -> ParsedUsage {
        let usage = if self.free && self.any {
            Some(Usage::default())
        } else {
            self.usage.map(|u| Usage {
                web_searches: self.web_searches(),
                ..u
            })
        };
        // Usage without the final counts: a generate stream that ended
        // before a finishReason, or with an error.
        let partial = !self.free
            && self.usage.is_some()
            && ((self.generating && !self.finished) || self.error.is_some());
        ParsedUsage {
            usage,
            response_model: self.model.take(),
            output_text: std::mem::take(&mut self.text),
            partial,
            error: self.error.take(),
            service_tier: self.service_tier.take(),
            ..ParsedUsage::default()
        }
    }
}

/// More tokens than any one embedding instance could have (models take a
/// few thousand): a count past it is not a count.
const MAX_PREDICTION_TOKENS: f64 = 1e9;

/// The input tokens of Vertex AI's `:predict` answer for an embedding
/// model: the sum of each instance's `embeddings.statistics.token_count`
/// (a number, which protobuf's JSON may write as `6.0`); `None` when no
/// instance has one.
fn prediction_tokens(predictions: &[Value]) -> Option<u64> {
    let mut total: Option<u64> = None;
    for p in predictions {
        let Some(n) = p
            .pointer("/embeddings/statistics/token_count")
            .and_then(Value::as_f64)
            .filter(|n| (0.0..=MAX_PREDICTION_TOKENS).contains(n))
        else {
            continue;
        };
        total = Some(total.unwrap_or(0).saturating_add(n.round() as u64));
    }
    total
}

/// `alt=sse`: one response object per event.
struct SseParser {
    sse: SseReader,
    found: Found,
}

impl UsageParser for SseParser {
    fn feed(&mut self, chunk: &[u8]) {
        let found = &mut self.found;
        self.sse
            .feed(chunk, &mut |e| found.on_bytes(e.data.as_bytes()));
    }

    fn finish(&mut self) -> ParsedUsage {
        let found = &mut self.found;
        self.sse.finish(&mut |e| found.on_bytes(e.data.as_bytes()));
        self.found.take()
    }

    fn usage_seen(&self) -> bool {
        self.found.seen()
    }

    /// A candidate's `finishReason` (or a blocked prompt): what follows
    /// costs the provider nothing more.
    fn generation_over(&self) -> bool {
        self.found.finished && self.found.open_candidates.is_empty()
    }
}

/// A plain JSON body: one object, or (streamGenerateContent without
/// `alt=sse`) an array whose elements arrive one by one.
struct JsonParser {
    split: ArraySplitter,
    found: Found,
}

impl UsageParser for JsonParser {
    fn feed(&mut self, chunk: &[u8]) {
        let found = &mut self.found;
        self.split.feed(chunk, &mut |b| found.on_bytes(b));
    }

    fn finish(&mut self) -> ParsedUsage {
        let found = &mut self.found;
        self.split.finish(&mut |b| found.on_bytes(b));
        self.found.take()
    }

    fn usage_seen(&self) -> bool {
        self.found.seen()
    }

    /// A candidate's `finishReason` (or a blocked prompt): what follows
    /// costs the provider nothing more.
    fn generation_over(&self) -> bool {
        self.found.finished && self.found.open_candidates.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    /// Before the first value.
    Start,
    /// Inside a top-level array, between elements.
    Array,
    /// The top-level value is not an array: it is the single element.
    Single,
    /// After the top-level value (or on input that cannot be a JSON value).
    Done,
}

/// Splits a JSON text into its top-level array's elements as they arrive,
/// across any chunk boundary. A top-level value that is not an array is
/// passed on whole, as one element. Keeps only the current element, up to
/// `limit` bytes: a larger one is skipped (and counted) while the scan
/// stays in step with the structure.
pub struct ArraySplitter {
    top: Top,
    in_elem: bool,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// The element being read, held against the response budget.
    elem: JsonBody,
    skipping: bool,
    /// Elements dropped because they exceeded the bound.
    pub oversized: u64,
}

impl ArraySplitter {
    pub fn new(limit: usize) -> Self {
        Self::within(JsonBody::new(limit))
    }

    /// As [`ArraySplitter::new`], the element held in `elem` (a
    /// [`JsonBody`] on a budget of the test's).
    fn within(elem: JsonBody) -> Self {
        ArraySplitter {
            top: Top::Start,
            in_elem: false,
            depth: 0,
            in_string: false,
            escape: false,
            elem,
            skipping: false,
            oversized: 0,
        }
    }

    /// Feeds bytes; calls `on_elem` with each complete element's bytes.
    pub fn feed(&mut self, chunk: &[u8], on_elem: &mut dyn FnMut(&[u8])) {
        let mut start = 0;
        let mut i = 0;
        while i < chunk.len() {
            let b = chunk[i];
            if !self.in_elem {
                match (self.top, b) {
                    (Top::Done | Top::Single, _) => return,
                    (_, b' ' | b'\t' | b'\r' | b'\n') => {}
                    (Top::Start, b'[') => self.top = Top::Array,
                    (Top::Start, 0xEF | 0xBB | 0xBF) => {} // a UTF-8 BOM
                    (Top::Start, b']' | b'}' | b',' | b':') => self.top = Top::Done,
                    (Top::Array, b',') => {}
                    (Top::Array, b']') => self.top = Top::Done,
                    (Top::Array, b'}' | b':') => {} // not JSON; stay in step
                    (top, _) => {
                        if top == Top::Start {
                            self.top = Top::Single;
                        }
                        // `b` is not a terminator, so the element is never
                        // empty: the scan always moves on.
                        self.in_elem = true;
                        start = i;
                        continue;
                    }
                }
                i += 1;
                continue;
            }
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        self.end(&chunk[start..=i], on_elem);
                    }
                }
                i += 1;
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                b'}' | b']' if self.depth > 0 => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        self.end(&chunk[start..=i], on_elem);
                    }
                }
                b'}' | b']' | b',' | b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => {
                    // The end of a scalar element: `b` belongs to the array.
                    self.end(&chunk[start..i], on_elem);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        if self.in_elem {
            self.append(&chunk[start..]);
        }
    }

    /// Ends the body: a scalar element cut by the end is complete; a
    /// partial object or string is dropped.
    pub fn finish(&mut self, on_elem: &mut dyn FnMut(&[u8])) {
        if self.in_elem && self.depth == 0 && !self.in_string {
            self.end(&[], on_elem);
        }
        self.elem.reset();
        self.in_elem = false;
        self.top = Top::Done;
    }

    fn append(&mut self, b: &[u8]) {
        if self.skipping {
            return;
        }
        self.elem.feed(b);
        if self.elem.bytes().is_none() {
            // Past its bound, or past the budget of all answers held.
            self.skipping = true;
            self.oversized += 1;
            self.elem.reset();
        }
    }

    fn end(&mut self, tail: &[u8], on_elem: &mut dyn FnMut(&[u8])) {
        self.append(tail);
        if !self.skipping
            && let Some(elem) = self.elem.bytes()
        {
            on_elem(elem);
        }
        self.elem.reset();
        self.skipping = false;
        self.in_elem = false;
        self.depth = 0;
        if self.top == Top::Single {
            self.top = Top::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    /// A candidate's `finishReason` ends the generation: a client that
    /// leaves then has had its whole answer (not a cut stream).
    #[test]
    fn the_generation_is_over_at_a_finish_reason() {
        let info = RequestInfo {
            operation: "generate_content",
            metered: true,
            streaming: true,
            ..Default::default()
        };
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        let first = b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hel\"}],\"role\":\"model\"}}],\"modelVersion\":\"gemini-2.5-flash\"}\n\n";
        let last = b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"lo\"}],\"role\":\"model\"},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":3,\"candidatesTokenCount\":2,\"totalTokenCount\":5}}\n\n";
        let mut p = Gemini.response_parser(&info, 200, &h);
        p.feed(first);
        assert!(!p.generation_over());
        // (A function call's name and arguments are output text.)
        let mut c = Gemini.response_parser(&info, 200, &h);
        c.feed(b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"functionCall\":{\"name\":\"run_shell\",\"args\":{\"cmd\":\"ls\"}}}],\"role\":\"model\"}}]}\n\n");
        assert_eq!(c.finish().output_text, r#"run_shell{"cmd":"ls"}"#);
        p.feed(last);
        assert!(p.generation_over());
        // Two candidates: over when both have finished.
        let mut two = Gemini.response_parser(&info, 200, &h);
        two.feed(b"data: {\"candidates\":[{\"index\":0,\"content\":{\"parts\":[{\"text\":\"a\"}]}},{\"index\":1,\"content\":{\"parts\":[{\"text\":\"b\"}]}}]}\n\n");
        two.feed(b"data: {\"candidates\":[{\"index\":0,\"content\":{\"parts\":[{\"text\":\"c\"}]},\"finishReason\":\"STOP\"}]}\n\n");
        assert!(!two.generation_over(), "candidate 1 still generates");
        two.feed(b"data: {\"candidates\":[{\"index\":1,\"content\":{\"parts\":[{\"text\":\"d\"}]},\"finishReason\":\"STOP\"}]}\n\n");
        assert!(two.generation_over());
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        let mut p = Gemini.response_parser(&info, 200, &h);
        p.feed(b"[");
        p.feed(&first[6..first.len() - 2]);
        assert!(!p.generation_over());
        p.feed(b",");
        p.feed(&last[6..last.len() - 2]);
        assert!(p.generation_over());
    }

    #[test]
    fn batch_results_inlined_or_in_a_responses_file_are_read_per_model() {
        use crate::providers::testing::{parse_split, request};
        let id = |m: &str, path: &str| Gemini.request(&request(m, path, b"")).batch.map(|b| b.id);
        assert_eq!(
            id("GET", "/v1beta/batches/abc123").as_deref(),
            Some("batches/abc123")
        );
        // The file's downloadUri, and what the SDK's files.download asks.
        for path in [
            "/download/v1beta/files/xyz:download",
            "/v1beta/files/xyz:download",
        ] {
            assert_eq!(id("GET", path).as_deref(), Some("xyz"), "{path}");
            let b = Gemini.request(&request("GET", path, b"")).batch.unwrap();
            assert_eq!(b.format, crate::providers::batch::Format::GeminiLines);
        }
        // The OpenAI-compatible endpoint's files are OpenAI's format.
        let compat = Gemini.request(&request("GET", "/v1beta/openai/files/f1/content", b""));
        assert_eq!(
            compat.batch.map(|b| (b.id, b.format)),
            Some((
                "f1".to_string(),
                crate::providers::batch::Format::OpenAiThoughtsBeside
            ))
        );
        for (m, path) in [
            ("GET", "/v1beta/batches"),
            ("POST", "/v1beta/batches/abc:cancel"),
            ("GET", "/v1beta/files/xyz"),
            ("GET", "/v1beta/models/gemini-2.5-flash"),
            ("GET", "/upload/v1beta/files/xyz:download"),
        ] {
            assert_eq!(id(m, path), None, "{m} {path}");
        }
        let info = Gemini.request(&request("GET", "/v1beta/batches/abc123", b""));
        assert_eq!(info.operation, "batch_results");
        // Still running: nothing.
        let running = br#"{"name":"batches/abc123","metadata":{"@type":"type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch","model":"models/gemini-2.5-flash","state":"BATCH_STATE_RUNNING"}}"#;
        let t = parse_split(&Gemini, &info, "application/json", running, &[])
            .batch
            .unwrap();
        assert_eq!((t.lines, t.models.len()), (0, 0));
        let done = include_bytes!("fixtures/gemini/batch_inlined.json");
        // Read three times, another read having reached the first result.
        use crate::providers::batch::Counted;
        let table = std::sync::Arc::new(crate::proxy::batches::Batches::default());
        let mut info = info.clone();
        info.batch.as_mut().unwrap().claims =
            crate::providers::batch::Claims::new(table.clone(), "h batches/abc123".into());
        assert!(table.claim("h batches/abc123", 0));
        for want in [vec![(Some("gemini-2.5-flash"), 1, 1, 1)], vec![]] {
            let t = parse_split(&Gemini, &info, "application/json", done, &[100])
                .batch
                .unwrap();
            assert_eq!(t.lines, 3);
            assert_eq!(
                t.sums(),
                want,
                "the model named by the batch when the response does not"
            );
        }
        // Alone: both that bill.
        let mut info = info.clone();
        info.batch.as_mut().unwrap().claims = crate::providers::batch::Claims::default();
        let t = parse_split(&Gemini, &info, "application/json", done, &[7])
            .batch
            .unwrap();
        assert_eq!(
            (
                t.models[0].usage.input_tokens,
                t.models[0].usage.output_tokens,
                t.models[0].results
            ),
            (11, 8, 2)
        );
        let info = Gemini.request(&request("GET", "/download/v1beta/files/xyz:download", b""));
        let file =
            std::str::from_utf8(include_bytes!("fixtures/gemini/batch_responses.jsonl")).unwrap();
        let t = parse_split(
            &Gemini,
            &info,
            "application/octet-stream",
            file.as_bytes(),
            &[9],
        )
        .batch
        .unwrap();
        assert_eq!(t.lines, 2);
        assert_eq!(t.models.len(), 1);
        assert_eq!(t.models[0].model.as_deref(), Some("gemini-2.5-pro"));
        assert_eq!(
            (
                t.models[0].usage.input_tokens,
                t.models[0].usage.output_tokens,
                t.models[0].usage.cached_input_tokens
            ),
            (4, 6, 2)
        );
    }

    /// The Interactions API (`POST /v1beta/interactions`): the model and
    /// `stream` from the body, usage from the interaction, as JSON or from
    /// the stream's lifecycle events; thoughts beside the output unless
    /// the total says otherwise. Its cancel and GET calls are not metered.
    #[test]
    fn interactions_are_metered() {
        let i = Gemini.request(&request(
            "POST",
            "/v1beta/interactions",
            br#"{"model":"gemini-3-pro-preview","input":"hi","stream":true}"#,
        ));
        assert_eq!(
            (i.operation, i.metered, i.streaming),
            ("interaction", true, true)
        );
        assert_eq!(i.model.as_deref(), Some("gemini-3-pro-preview"));
        assert!(!i.background && i.retrieves.is_none());
        let other = Gemini.request(&request("POST", "/v1beta/models/x/interactions", b"{}"));
        assert_ne!(other.operation, "interaction");
        // Background ones, and the retrievals that settle them.
        let bg = Gemini.request(&request(
            "POST",
            "/v1beta/interactions",
            br#"{"agent":"deep-research-pro-preview-12-2025","input":"hi","background":true}"#,
        ));
        assert!(bg.background && bg.retrieves.is_none());
        for (method, path) in [
            ("POST", "/v1beta/interactions/abc/cancel"),
            ("GET", "/v1beta/interactions/abc"),
            ("GET", "/v1/interactions/abc/"),
        ] {
            let r = Gemini.request(&request(method, path, b""));
            assert_eq!(r.retrieves.as_deref(), Some("abc"), "{method} {path}");
            assert!(r.metered);
            assert_eq!(r.operation, "interaction");
        }
        for (method, path) in [
            ("GET", "/v1beta/interactions/abc/cancel"),
            ("POST", "/v1beta/interactions/abc"),
            ("GET", "/v1beta/models/x/interactions/abc"),
            ("GET", "/v1beta/interactions"),
        ] {
            let r = Gemini.request(&request(method, path, b""));
            assert_eq!(r.retrieves, None, "{method} {path}");
        }
        let running = br#"{"id":"v1_ChdHb29nbGUtSW50ZXJhY3Rpb24tSWQtVGhhdC1Jcy1Mb25nZXItVGhhbi02NC1DaGFycw","status":"in_progress","usage":{"total_input_tokens":7,"total_output_tokens":0}}"#;
        let p = parse_split(&Gemini, &bg, "application/json", running, &[]);
        assert!(p.unfinished() && p.usage.is_none(), "not final: {p:?}");
        assert!(p.response_id.as_ref().is_some_and(|id| id.len() > 64));
        let json = br#"{"id":"i1","model":"gemini-3-pro-preview","status":"completed","outputs":[],
            "usage":{"total_input_tokens":100,"total_tool_use_tokens":10,"total_cached_tokens":40,
                     "total_output_tokens":20,"total_thought_tokens":5,"total_tokens":135}}"#;
        let mut info = i.clone();
        info.streaming = false;
        let p = parse_split(&Gemini, &info, "application/json", json, &[31]);
        let u = p.usage.expect("usage");
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.output_tokens,
                u.reasoning_tokens
            ),
            (110, 40, 25, 5)
        );
        assert_eq!(p.response_model.as_deref(), Some("gemini-3-pro-preview"));
        let sse = "event: interaction.created\ndata: {\"event_type\":\"interaction.created\",\"interaction\":{\"id\":\"i1\",\"status\":\"in_progress\"}}\n\n\
                   event: interaction.completed\ndata: {\"event_type\":\"interaction.completed\",\"interaction\":{\"id\":\"i1\",\"status\":\"completed\",\"model\":\"gemini-3-pro-preview\",\"usage\":{\"total_input_tokens\":7,\"total_output_tokens\":9,\"total_thought_tokens\":4,\"total_tokens\":16}}}\n\n";
        let p = parse_split(&Gemini, &i, "text/event-stream", sse.as_bytes(), &[40, 90]);
        let u = p.usage.expect("usage");
        // total 16 = 7 + 9: the thoughts are inside the output.
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.reasoning_tokens),
            (7, 9, 4)
        );
        // A stream cut before its end: no counts (an early event's are
        // not final), the text that streamed for the estimate.
        let cut = "event: interaction.created\ndata: {\"event_type\":\"interaction.created\",\"interaction\":{\"id\":\"i2\",\"status\":\"in_progress\",\"usage\":{\"total_input_tokens\":7,\"total_output_tokens\":0}}}\n\n\
                   event: content.delta\ndata: {\"event_type\":\"content.delta\",\"delta\":{\"type\":\"text\",\"text\":\"the sky is blue because\"}}\n\n";
        let p = parse_split(&Gemini, &i, "text/event-stream", cut.as_bytes(), &[]);
        assert_eq!(p.usage, None);
        assert_eq!(p.output_text, "the sky is blue because");
        // The request's input can be estimated.
        let body = br#"{"model":"gemini-3-pro-preview","system_instruction":"be brief","input":[{"role":"user","content":[{"type":"text","text":"why is the sky blue on a clear day"}]}]}"#;
        let n = crate::meter::estimate::estimate_input_for(
            ApiKind::Gemini,
            Some("gemini-3-pro-preview"),
            body,
        );
        assert!(n.is_some_and(|n| n > 8), "{n:?}");
    }

    /// Request bodies are read member by member: a member of an
    /// unexpected type is missing, never the parse; a repeated member's
    /// last value wins.
    #[test]
    fn request_members_of_odd_types_lose_only_themselves() {
        let interaction =
            |body: &[u8]| Gemini.request(&request("POST", "/v1beta/interactions", body));
        let i = interaction(
            br#"{"model":5,"stream":"yes","generation_config":{"max_output_tokens":"9"},"background":"true"}"#,
        );
        assert_eq!(
            (i.model, i.streaming, i.max_output_tokens, i.background),
            (None, false, None, false)
        );
        let i = interaction(
            br#"{"model":"a","model":"b","stream":true,"generation_config":{"max_output_tokens":9,"candidate_count":2},"background":true}"#,
        );
        assert_eq!(
            (
                i.model.as_deref(),
                i.streaming,
                i.max_output_tokens,
                i.background
            ),
            (Some("b"), true, Some(9), true)
        );
        for body in [&br#"{"generation_config":[9]}"#[..], b"[1]", b"no"] {
            let i = interaction(body);
            assert_eq!(
                (i.operation, i.model, i.max_output_tokens),
                ("interaction", None, None)
            );
        }
        let cap = |body: &[u8]| {
            Gemini
                .request(&request(
                    "POST",
                    "/v1beta/models/gemini-2.5-flash:generateContent",
                    body,
                ))
                .max_output_tokens
        };
        for (body, want) in [
            (&br#"{"generationConfig":{"maxOutputTokens":"5","max_output_tokens":5,"candidate_count":3}}"#[..], Some(15)),
            (br#"{"generationConfig":{"maxOutputTokens":4,"candidateCount":0}}"#, Some(4)),
            (br#"{"generationConfig":{"maxOutputTokens":4,"candidateCount":"2","candidate_count":2}}"#, Some(8)),
            // A camelCase member that is there, even as null, is the one read.
            (br#"{"generationConfig":null,"generation_config":{"max_output_tokens":5}}"#, None),
            (br#"{"generationConfig":[1],"generation_config":{"max_output_tokens":5}}"#, None),
            (br#"{"generation_config":{"max_output_tokens":5},"generation_config":{"max_output_tokens":6}}"#, Some(6)),
            (br#"{"generation_config":{"max_output_tokens":5,"max_output_tokens":6}}"#, Some(6)),
            (b"[1]", None),
        ] {
            assert_eq!(cap(body), want, "{}", String::from_utf8_lossy(body));
        }
    }

    /// A request is read without building what is not read (a whole
    /// `Value` of a body costs some 16 times its size): the contents.
    #[test]
    fn request_bodies_are_read_without_building_them() {
        use crate::providers::testing::{padded_object, peak_alloc};
        for (path, members) in [
            (
                "/v1beta/interactions",
                r#""model":"m","generation_config":{"max_output_tokens":5}"#,
            ),
            (
                "/v1beta/models/m:generateContent",
                r#""generationConfig":{"maxOutputTokens":5}"#,
            ),
        ] {
            let body = padded_object(members, 1 << 20);
            let (i, peak) = peak_alloc(|| Gemini.request(&request("POST", path, &body)));
            assert_eq!(
                (i.model.as_deref(), i.max_output_tokens),
                (Some("m"), Some(5)),
                "{path}"
            );
            assert!(
                peak < body.len() / 8,
                "{path}: the request cost {peak} bytes"
            );
        }
    }

    /// The legacy stream event names (`interaction.start`,
    /// `interaction.complete`, sent when steps are disabled): the final
    /// event's interaction carries the counts as `interaction.completed`'s does.
    #[test]
    fn a_legacy_interaction_complete_event_gives_the_counts() {
        let i = Gemini.request(&request(
            "POST",
            "/v1beta/interactions",
            br#"{"model":"gemini-3-pro-preview","input":"hi","stream":true}"#,
        ));
        let legacy = "event: interaction.start\ndata: {\"event_type\":\"interaction.start\",\"interaction\":{\"id\":\"i1\",\"status\":\"in_progress\"}}\n\n\
                      event: interaction.complete\ndata: {\"event_type\":\"interaction.complete\",\"interaction\":{\"id\":\"i1\",\"status\":\"completed\",\"usage\":{\"total_input_tokens\":7,\"total_output_tokens\":9,\"total_tokens\":16}}}\n\n";
        let p = parse_split(&Gemini, &i, "text/event-stream", legacy.as_bytes(), &[50]);
        let u = p.usage.expect("usage from interaction.complete");
        assert_eq!((u.input_tokens, u.output_tokens), (7, 9));
    }

    /// The tier that served a request: the Gemini API's
    /// `x-gemini-service-tier` header, Vertex AI's `trafficType`.
    #[test]
    fn the_service_tier_is_read_from_the_header_or_the_traffic_type() {
        let info = RequestInfo {
            operation: "generate_content",
            metered: true,
            ..Default::default()
        };
        let body = br#"{"candidates":[{"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4}}"#;
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-gemini-service-tier", "Priority".parse().unwrap());
        let p = crate::providers::testing::parse_split_with(&Gemini, &info, &h, body, &[9]);
        assert_eq!(p.service_tier.as_deref(), Some("priority"));
        let vertex = br#"{"candidates":[{"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"trafficType":"ON_DEMAND_FLEX"}}"#;
        let p =
            crate::providers::testing::parse_split(&Gemini, &info, "application/json", vertex, &[]);
        assert_eq!(p.service_tier.as_deref(), Some("flex"));
        let none =
            crate::providers::testing::parse_split(&Gemini, &info, "application/json", body, &[]);
        assert_eq!(none.service_tier, None);
    }

    use super::*;
    use crate::providers::testing::{parse_split, request};
    use http::{HeaderMap, Method};
    use proptest::prelude::*;

    const GEN_JSON: &[u8] = include_bytes!("fixtures/gemini/generate.json");
    const GEN_SSE: &[u8] = include_bytes!("fixtures/gemini/stream.sse");
    const GEN_ARRAY: &[u8] = include_bytes!("fixtures/gemini/stream_array.json");
    const ERR_JSON: &[u8] = include_bytes!("fixtures/gemini/error_429.json");

    fn info(op: &'static str) -> RequestInfo {
        RequestInfo {
            operation: op,
            metered: true,
            ..Default::default()
        }
    }

    fn parse(op: &'static str, ct: &str, body: &[u8], splits: &[usize]) -> ParsedUsage {
        parse_split(&Gemini, &info(op), ct, body, splits)
    }

    fn elements(input: &[u8], splits: &[usize]) -> Vec<Vec<u8>> {
        let mut s = ArraySplitter::new(1 << 20);
        let mut out = Vec::new();
        let mut last = 0;
        for &at in splits {
            let at = at.clamp(last, input.len());
            s.feed(&input[last..at], &mut |e| out.push(e.to_vec()));
            last = at;
        }
        s.feed(&input[last..], &mut |e| out.push(e.to_vec()));
        s.finish(&mut |e| out.push(e.to_vec()));
        out
    }

    /// `usageMetadata`'s per-modality details: the audio and image parts
    /// of the prompt, beside their cache reads, and of the answer.
    #[test]
    fn audio_input_and_image_output_are_read_from_the_modality_details() {
        let body = br#"{"candidates":[{"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":1000,
            "cachedContentTokenCount":300,"candidatesTokenCount":1300,
            "promptTokensDetails":[{"modality":"TEXT","tokenCount":100},{"modality":"AUDIO","tokenCount":800},{"modality":"IMAGE","tokenCount":100}],
            "cacheTokensDetails":[{"modality":"AUDIO","tokenCount":300}],
            "candidatesTokensDetails":[{"modality":"IMAGE","tokenCount":1290},{"modality":"TEXT","tokenCount":10}]}}"#;
        let u = parse("generate_content", "application/json", body, &[])
            .usage
            .expect("usage");
        assert_eq!(
            (
                u.audio_input_tokens,
                u.image_input_tokens,
                u.image_output_tokens,
                u.audio_output_tokens
            ),
            (500, 100, 1290, 0)
        );
    }

    /// Grounding with Google Search: Gemini 3 bills each distinct
    /// non-empty query (over every candidate and chunk of a stream, which
    /// may send them on any chunk), earlier models the grounded answer
    /// once; the request's model decides, else the response's.
    #[test]
    fn grounded_answers_count_their_web_searches_by_the_models_scheme() {
        let chunks = "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"a\"}]},\"groundingMetadata\":{\"webSearchQueries\":[\"rust tls\",\"\"]}}],\"modelVersion\":\"MODEL\"}\n\n\
                      data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"b\"}]},\"finishReason\":\"STOP\",\"groundingMetadata\":{\"webSearchQueries\":[\"rust tls\",\"aya ebpf\",\"  \",7]}}],\"usageMetadata\":{\"promptTokenCount\":30,\"candidatesTokenCount\":5,\"toolUsePromptTokenCount\":900}}\n\n";
        for (model, searches) in [
            ("gemini-3-pro-preview", 2),
            ("gemini-3.1-flash", 2),
            ("gemini-2.5-flash", 1),
            ("gemini-2.0-flash", 1),
        ] {
            let body = chunks.replace("MODEL", model);
            let u = parse(
                "generate_content",
                "text/event-stream",
                body.as_bytes(),
                &[50, 260],
            )
            .usage
            .expect("usage");
            assert_eq!((u.input_tokens, u.web_searches), (930, searches), "{model}");
            let by_request = RequestInfo {
                model: Some(model.into()),
                ..info("generate_content")
            };
            let other = chunks.replace("MODEL", "something-else");
            let u = parse_split(
                &Gemini,
                &by_request,
                "text/event-stream",
                other.as_bytes(),
                &[],
            )
            .usage
            .expect("usage");
            assert_eq!(u.web_searches, searches, "{model} named by the request");
        }
        let ungrounded = br#"{"candidates":[{"finishReason":"STOP","groundingMetadata":{"webSearchQueries":[]}}],"modelVersion":"gemini-3-pro-preview","usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4}}"#;
        let u = parse("generate_content", "application/json", ungrounded, &[])
            .usage
            .expect("usage");
        assert_eq!(u.web_searches, 0);
        // The response's model is the one that ran: an alias the request
        // named does not decide.
        let alias = RequestInfo {
            model: Some("gemini-flash-latest".into()),
            ..info("generate_content")
        };
        let body = chunks.replace("MODEL", "gemini-3-flash-preview");
        let u = parse_split(&Gemini, &alias, "text/event-stream", body.as_bytes(), &[])
            .usage
            .expect("usage");
        assert_eq!(u.web_searches, 2);
        // A batch's result line, read member by member (a repeated member
        // is no error).
        let line = br#"{"key":"a","response":{"candidates":[{"finishReason":"STOP","groundingMetadata":{"webSearchQueries":["q1","q2",""],"webSearchQueries":["q1","q2","q3"]}},7,null],"modelVersion":"gemini-3-pro-preview","usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":5}}}"#;
        let l = batch_result_line(line).expect("billed");
        assert_eq!((l.usage.input_tokens, l.usage.web_searches), (10, 3));
        let old = String::from_utf8_lossy(line).replace("gemini-3-pro-preview", "gemini-2.5-flash");
        let l = batch_result_line(old.as_bytes()).expect("billed");
        assert_eq!(l.usage.web_searches, 1);
        let twice = br#"{"key":"a","response":{"candidates":[],"candidates":[{"groundingMetadata":{"webSearchQueries":["q"]}}],"modelVersion":"gemini-2.5-flash","usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":5}}}"#;
        let l = batch_result_line(twice).expect("a repeated member is no error");
        assert_eq!((l.usage.input_tokens, l.usage.web_searches), (10, 1));
        assert!(bills_each_query("publishers/google/models/gemini-3-flash"));
        assert!(!bills_each_query("gemini-1.5-pro"));
        assert!(!bills_each_query("gemma-3-27b-it"));
    }

    #[test]
    fn classifies_requests() {
        let body =
            br#"{"contents":[],"generationConfig":{"maxOutputTokens":256,"candidateCount":2}}"#;
        let i = Gemini.request(&request(
            "POST",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            body,
        ));
        assert_eq!(
            (i.operation, i.metered, i.streaming, i.max_output_tokens),
            ("generate_content", true, false, Some(512))
        );
        assert_eq!(i.model.as_deref(), Some("gemini-2.5-flash"));

        let s = Gemini.request(&request(
            "POST",
            "/v1/models/gemini-2.0-flash%3AstreamGenerateContent",
            br#"{"generation_config":{"max_output_tokens":64}}"#,
        ));
        assert_eq!(
            (s.operation, s.streaming, s.max_output_tokens),
            ("generate_content", true, Some(64))
        );
        assert_eq!(s.model.as_deref(), Some("gemini-2.0-flash"));

        for (path, op, model) in [
            (
                "/v1beta/models/gemini-2.5-pro:countTokens",
                "count_tokens",
                "gemini-2.5-pro",
            ),
            (
                "/v1beta/models/gemini-embedding-001:embedContent",
                "embeddings",
                "gemini-embedding-001",
            ),
            (
                "/v1beta/models/text-embedding-004:batchEmbedContents",
                "embeddings",
                "text-embedding-004",
            ),
            (
                "/v1beta/tunedModels/my-model-x1y2%2Dz:generateContent",
                "generate_content",
                "tunedModels/my-model-x1y2-z",
            ),
            // Vertex AI: a project's region, the global location, and
            // express mode (an API key, no project).
            (
                "/v1/projects/acme-ci/locations/us-central1/publishers/google/models/gemini-2.5-pro:streamGenerateContent",
                "generate_content",
                "gemini-2.5-pro",
            ),
            (
                "/v1beta1/projects/123456/locations/global/publishers/google/models/gemini-2.5-flash:countTokens",
                "count_tokens",
                "gemini-2.5-flash",
            ),
            (
                "/v1/publishers/google/models/gemini-2.5-flash-lite:generateContent",
                "generate_content",
                "gemini-2.5-flash-lite",
            ),
            // Vertex AI's embedding models answer `:predict`.
            (
                "/v1/projects/acme-ci/locations/us-central1/publishers/google/models/text-embedding-005:predict",
                "embeddings",
                "text-embedding-005",
            ),
            (
                "/v1/projects/acme-ci/locations/us-central1/publishers/google/models/gemini-embedding-001:predict",
                "embeddings",
                "gemini-embedding-001",
            ),
            (
                "/v1/projects/acme-ci/locations/europe-west4/publishers/google/models/text-multilingual-embedding-002:predict",
                "embeddings",
                "text-multilingual-embedding-002",
            ),
        ] {
            let i = Gemini.request(&request("POST", path, b"{}"));
            assert_eq!((i.operation, i.metered), (op, true), "{path}");
            assert_eq!(i.model.as_deref(), Some(model), "{path}");
            // Only Vertex's per-character embedding models are never
            // priced by the token.
            assert_eq!(
                i.not_token_priced,
                path.ends_with(":predict") && !model.starts_with("gemini-"),
                "{path}"
            );
        }
        for (method, path) in [
            ("GET", "/v1beta/models"),
            ("GET", "/v1beta/models/gemini-2.5-flash"),
            ("POST", "/v1beta/models/gemini-2.5-flash:unknownMethod"),
            ("POST", "/upload/v1beta/files"),
            ("POST", "/v1beta/cachedContents"),
            // Vertex AI paths that are not models it reads.
            (
                "POST",
                "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:predict",
            ),
            (
                "POST",
                "/v1/projects/p/locations/l/publishers/meta/models/llama:rawPredict",
            ),
            (
                "POST",
                "/v1/projects/p/locations/us-central1/endpoints/42:predict",
            ),
            // Priced per image or character, not token.
            (
                "POST",
                "/v1/projects/p/locations/us-central1/publishers/google/models/imagen-4.0-generate-001:predict",
            ),
            (
                "POST",
                "/v1/projects/p/locations/us-central1/publishers/google/models/multimodalembedding@001:predict",
            ),
            (
                "POST",
                "/v1/projects/p/publishers/google/models/gemini-2.5-pro:generateContent",
            ),
        ] {
            let i = Gemini.request(&request(method, path, b"{}"));
            assert!(!i.metered, "{method} {path}");
        }
    }

    #[test]
    fn vertex_regional_locations_are_told_from_the_global_one() {
        for (path, regional) in [
            (
                "/v1/projects/acme/locations/us-east5/publishers/anthropic/models/claude-opus-4-6:rawPredict",
                true,
            ),
            (
                "/v1beta1/projects/acme/locations/europe-west1/publishers/google/models/gemini-2.5-pro:generateContent",
                true,
            ),
            (
                "/v1/projects/acme/locations/global/publishers/anthropic/models/claude-opus-4-6:rawPredict",
                false,
            ),
            (
                "/v1/publishers/google/models/gemini-2.5-flash:generateContent",
                false,
            ),
            ("/v1/projects/acme/locations//publishers", false),
            ("/v1/projects/acme", false),
            ("", false),
        ] {
            assert_eq!(vertex_regional(path), regional, "{path}");
        }
    }

    #[test]
    fn claude_on_vertex_is_handed_to_the_anthropic_adapter() {
        let body = br#"{"anthropic_version":"vertex-2023-10-16","max_tokens":64,"messages":[]}"#;
        let i = Gemini.request(&request(
            "POST",
            "/v1/projects/acme-ci/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict",
            body,
        ));
        assert_eq!(
            (
                i.operation,
                i.metered,
                i.streaming,
                i.max_output_tokens,
                i.api
            ),
            ("chat", true, false, Some(64), Some(ApiKind::Anthropic))
        );
        assert_eq!(i.model.as_deref(), Some("claude-sonnet-4-5@20250929"));
        let s = Gemini.request(&request(
            "POST",
            "/v1/projects/acme-ci/locations/global/publishers/anthropic/models/claude-opus-4-5%4020251101:streamRawPredict",
            br#"{"stream":true,"max_tokens":5,"messages":[]}"#,
        ));
        assert_eq!((s.operation, s.streaming), ("chat", true));
        assert_eq!(s.model.as_deref(), Some("claude-opus-4-5@20251101"));
        let c = Gemini.request(&request(
            "POST",
            "/v1/projects/acme-ci/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict",
            br#"{"model":"claude-sonnet-4-5@20250929","messages":[]}"#,
        ));
        assert_eq!(
            (c.operation, c.api),
            ("count_tokens", Some(ApiKind::Anthropic))
        );
        assert_eq!(c.model.as_deref(), Some("claude-sonnet-4-5@20250929"));
        // Gemini's own paths name no other API.
        let g = Gemini.request(&request(
            "POST",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            b"{}",
        ));
        assert_eq!(g.api, None);
    }

    #[test]
    fn api_key_in_query_is_never_returned() {
        let h = HeaderMap::new();
        let i = Gemini.request(&RequestView {
            method: &Method::POST,
            path: "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            query: Some("alt=sse&key=AIzaSyTOPSECRET"),
            headers: &h,
            body: Some(b"{}"),
        });
        assert!(i.streaming);
        assert!(!format!("{i:?}").contains("TOPSECRET"));
    }

    #[test]
    fn openai_compatible_endpoint_is_delegated() {
        let i = Gemini.request(&request(
            "POST",
            "/v1beta/openai/chat/completions",
            br#"{"model":"gemini-2.5-flash","messages":[]}"#,
        ));
        assert_eq!(i.operation, "chat");
        assert_eq!(i.model.as_deref(), Some("gemini-2.5-flash"));
        // Vertex AI's, for Gemini and partner models.
        let v = Gemini.request(&request(
            "POST",
            "/v1/projects/acme/locations/us-central1/endpoints/openapi/chat/completions",
            br#"{"model":"google/gemini-2.5-flash","messages":[],"stream":true}"#,
        ));
        assert_eq!((v.operation, v.metered, v.streaming), ("chat", true, true));
        assert_eq!(v.model.as_deref(), Some("google/gemini-2.5-flash"));
        let e = Gemini.request(&request(
            "POST",
            "/v1/projects/acme/locations/us-central1/endpoints/openapi/embeddings",
            br#"{"model":"google/gemini-embedding-001","input":"x"}"#,
        ));
        assert_eq!((e.operation, e.metered), ("embeddings", true));
        for (method, other) in [
            (
                "POST",
                "/v1/projects/acme/locations/us-central1/endpoints/openapi",
            ),
            (
                "POST",
                "/v1/projects/acme/locations/us-central1/endpoints/openapi/files",
            ),
            (
                "GET",
                "/v1/projects/acme/locations/us-central1/endpoints/openapi/models",
            ),
            (
                "POST",
                "/v1/projects/acme/locations/us-central1/endpoints/1234:predict",
            ),
            ("POST", "/v1/projects/acme/openapi/chat/completions"),
        ] {
            let o = Gemini.request(&request(method, other, b"{}"));
            assert!(!o.metered, "{method} {other}");
        }
        let p = parse(
            "chat",
            "application/json",
            br#"{"model":"gemini-2.5-flash","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":3,"total_tokens":11}}"#,
            &[],
        );
        assert_eq!(
            p.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((8, 3))
        );
        let e = parse(
            "embeddings",
            "application/json",
            br#"{"object":"list","data":[],"model":"gemini-embedding-001","usage":{"prompt_tokens":4,"total_tokens":4}}"#,
            &[],
        );
        assert_eq!(e.usage.map(|u| u.input_tokens), Some(4));
    }

    /// Gemini's OpenAI-compatible endpoint has been seen to leave thoughts
    /// out of `completion_tokens` and count them only in `total_tokens`
    /// (and seen to count them in, with `reasoning_tokens`): the output is
    /// at least `total - prompt`, in JSON answers and streams alike.
    #[test]
    fn openai_compatible_thoughts_counted_only_in_the_total_are_output() {
        let compat = Gemini.request(&request(
            "POST",
            "/v1beta/openai/chat/completions",
            br#"{"model":"gemini-3-flash-preview","messages":[]}"#,
        ));
        assert!(compat.thoughts_beside_completion);
        let vertex = |model: &str| {
            Gemini
                .request(&request(
                    "POST",
                    "/v1/projects/a/locations/us-central1/endpoints/openapi/chat/completions",
                    format!(r#"{{"model":"{model}","messages":[]}}"#).as_bytes(),
                ))
                .thoughts_beside_completion
        };
        assert!(vertex("google/gemini-2.5-flash"));
        assert!(
            !vertex("meta/llama-3.1-8b-instruct-maas"),
            "partner models: as OpenAI"
        );
        // Batch results read there, line by line.
        let line = br#"{"custom_id":"a","response":{"status_code":200,"body":{"model":"gemini-2.5-flash","usage":{"prompt_tokens":20,"completion_tokens":424,"total_tokens":1016}}}}"#;
        let u = crate::providers::openai::batch_result_line_thoughts_beside(line).expect("a line");
        assert_eq!(
            (u.usage.output_tokens, u.usage.reasoning_tokens),
            (996, 572)
        );
        let counts = |p: ParsedUsage| {
            p.usage
                .map(|u| (u.input_tokens, u.output_tokens, u.reasoning_tokens))
        };
        let json = |usage: &str| {
            format!(r#"{{"model":"gemini-3-flash-preview","choices":[],"usage":{usage}}}"#)
        };
        for (usage, want) in [
            // Thoughts beside: 1016 - 20 - 424 = 572 of them.
            (
                r#"{"prompt_tokens":20,"completion_tokens":424,"total_tokens":1016}"#,
                (20, 996, 572),
            ),
            // Thoughts inside, said so: as OpenAI counts them.
            (
                r#"{"prompt_tokens":20,"completion_tokens":996,"total_tokens":1016,"completion_tokens_details":{"reasoning_tokens":572}}"#,
                (20, 996, 572),
            ),
            // No thoughts: the total adds up.
            (
                r#"{"prompt_tokens":8,"completion_tokens":3,"total_tokens":11}"#,
                (8, 3, 0),
            ),
            // A total short of the sum changes nothing.
            (
                r#"{"prompt_tokens":8,"completion_tokens":3,"total_tokens":2}"#,
                (8, 3, 0),
            ),
        ] {
            let p = parse_split(
                &Gemini,
                &compat,
                "application/json",
                json(usage).as_bytes(),
                &[],
            );
            assert_eq!(counts(p), Some(want), "{usage}");
        }
        // A stream with usage in every chunk (as reported): the last one.
        let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":60}}\n\n\
                   data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":103}}\n\ndata: [DONE]\n\n";
        let streaming = RequestInfo {
            streaming: true,
            ..compat.clone()
        };
        let p = parse_split(
            &Gemini,
            &streaming,
            "text/event-stream",
            sse.as_bytes(),
            &[40],
        );
        assert_eq!(counts(p), Some((9, 94, 92)));
        // The same answer from OpenAI's own API: its totals add up, and one
        // that did not would not be read as thoughts.
        let p = parse_split(
            &super::OpenAi,
            &super::OpenAi.request(&request(
                "POST",
                "/v1/chat/completions",
                br#"{"model":"gpt-5","messages":[]}"#,
            )),
            "application/json",
            json(r#"{"prompt_tokens":20,"completion_tokens":424,"total_tokens":1016}"#).as_bytes(),
            &[],
        );
        assert_eq!(counts(p), Some((20, 424, 0)));
    }

    #[test]
    fn json_usage_with_cache_tools_and_thoughts() {
        let p = parse(
            "generate_content",
            "application/json; charset=UTF-8",
            GEN_JSON,
            &[],
        );
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 1210 + 50,
                output_tokens: 13 + 482,
                cached_input_tokens: 1024,
                cache_write_input_tokens: 0,
                reasoning_tokens: 482,
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
        assert_eq!(p.response_model.as_deref(), Some("gemini-2.5-flash"));
        assert!(p.output_text.contains("**Weighing the options**"));
        assert!(p.output_text.ends_with("make predictions."));
    }

    #[test]
    fn a_stream_has_its_usage_from_the_first_usage_metadata_on() {
        use crate::providers::testing::usage_seen_after;
        // This fixture ends its lines with CRLF, as Google's servers do.
        let first_ends = GEN_SSE.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let info = info("generate_content");
        let at = usage_seen_after(&Gemini, &info, "text/event-stream", GEN_SSE, None);
        // A lone CR ends a line in SSE: the event is complete at the
        // blank line's CR, before its LF arrives.
        assert_eq!(at, Some(first_ends + 3));
        let no_usage = b"data: {\"candidates\": []}\n\n";
        assert_eq!(
            usage_seen_after(&Gemini, &info, "text/event-stream", no_usage, None),
            None
        );
    }

    #[test]
    fn sse_stream_last_usage_wins() {
        let p = parse("generate_content", "text/event-stream", GEN_SSE, &[]);
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 5,
                output_tokens: 39 + 186,
                cached_input_tokens: 0,
                cache_write_input_tokens: 0,
                reasoning_tokens: 186,
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
        assert_eq!(p.response_model.as_deref(), Some("gemini-2.5-flash"));
        assert!(p.output_text.starts_with("Here you go!\n\n1."));
        assert!(p.output_text.contains("Bonjour — ünïcødé"));
        assert!(p.output_text.ends_with("Hallo"));
    }

    #[test]
    fn array_stream_last_usage_wins() {
        let p = parse(
            "generate_content",
            "application/json; charset=UTF-8",
            GEN_ARRAY,
            &[],
        );
        assert_eq!(
            p.usage
                .map(|u| (u.input_tokens, u.output_tokens, u.reasoning_tokens)),
            Some((9, 24, 0))
        );
        assert_eq!(p.response_model.as_deref(), Some("gemini-2.0-flash"));
        assert_eq!(
            p.output_text,
            "He said \"{not json]\" and \\ left, then [ran] {away}, ünïcødé 🚀."
        );
    }

    #[test]
    fn array_splitter_elements() {
        let els = elements(GEN_ARRAY, &[]);
        assert_eq!(els.len(), 3);
        for e in &els {
            assert!(serde_json::from_slice::<Value>(e).is_ok());
        }
        assert_eq!(
            elements(br#" [1, "a]\"", {"b":[2,{}]} ,true,[],null] trailing"#, &[]),
            vec![
                b"1".to_vec(),
                br#""a]\"""#.to_vec(),
                br#"{"b":[2,{}]}"#.to_vec(),
                b"true".to_vec(),
                b"[]".to_vec(),
                b"null".to_vec()
            ]
        );
        assert_eq!(
            elements(b"{\"a\":1} {\"b\":2}", &[]),
            vec![b"{\"a\":1}".to_vec()]
        );
        assert_eq!(elements(b"[]", &[]), Vec::<Vec<u8>>::new());
        assert_eq!(
            elements(b"[{\"a\":1},{\"b\"", &[]),
            vec![b"{\"a\":1}".to_vec()]
        );
    }

    #[test]
    fn array_elements_are_held_against_the_budget_of_answers() {
        let b = crate::budget::BodyBudget::new(100);
        let mut s = ArraySplitter::within(JsonBody::within(1000, &b));
        let mut got = Vec::new();
        let obj = |n: usize| format!("{{\"a\":\"{}\"}}", "x".repeat(n));
        // Two elements of 60 and 50 bytes: one at a time, both fit.
        s.feed(format!("[{},{}", obj(52), obj(42)).as_bytes(), &mut |e| {
            got.push(e.len())
        });
        s.feed(b"]", &mut |e| got.push(e.len()));
        assert_eq!(got, [60, 50]);
        assert_eq!(b.used(), 0);
        // One of 150 bytes, fed in pieces: past the budget, skipped.
        let mut s = ArraySplitter::within(JsonBody::within(1000, &b));
        let big = obj(142);
        for piece in big.as_bytes().chunks(40) {
            s.feed(piece, &mut |e| got.push(e.len()));
        }
        s.finish(&mut |e| got.push(e.len()));
        assert_eq!(got, [60, 50], "not read");
        assert_eq!(s.oversized, 1);
        assert_eq!(b.used(), 0, "nothing kept");
    }

    #[test]
    fn array_splitter_skips_oversized_elements_and_stays_in_step() {
        let mut s = ArraySplitter::new(16);
        let mut out = Vec::new();
        s.feed(br#"[{"big":"0123456789abcdef[{"},{"ok":1}]"#, &mut |e| {
            out.push(e.to_vec())
        });
        s.finish(&mut |e| out.push(e.to_vec()));
        assert_eq!(out, vec![br#"{"ok":1}"#.to_vec()]);
        assert_eq!(s.oversized, 1);
    }

    #[test]
    fn every_split_of_array_stream_gives_same_elements() {
        let whole = elements(GEN_ARRAY, &[]);
        for i in 0..=GEN_ARRAY.len() {
            assert_eq!(elements(GEN_ARRAY, &[i]), whole, "split at {i}");
        }
    }

    #[test]
    fn vertex_embedding_predictions_count_each_instance() {
        let body: &[u8] = include_bytes!("fixtures/gemini/vertex_predict_embeddings.json");
        for splits in [&[][..], &[1, 40, 41, 120], &[body.len() / 2]] {
            let p = parse(
                "embeddings",
                "application/json; charset=UTF-8",
                body,
                splits,
            );
            assert_eq!(
                p.usage,
                Some(Usage {
                    input_tokens: 2054,
                    ..Usage::default()
                }),
                "{splits:?}"
            );
            assert!(!p.partial);
        }
        // No statistics at all: no usage (the record is estimated).
        let none = parse(
            "embeddings",
            "application/json",
            br#"{"predictions":[{"embeddings":{"values":[0.1]}}]}"#,
            &[],
        );
        assert_eq!(none.usage, None);
        // Nonsense counts are skipped.
        let odd = parse(
            "embeddings",
            "application/json",
            br#"{"predictions":[{"embeddings":{"statistics":{"token_count":-3}}},{"embeddings":{"statistics":{"token_count":"7"}}},{"embeddings":{"statistics":{"token_count":1e300}}},{"embeddings":{"statistics":{"token_count":5}}}]}"#,
            &[],
        );
        assert_eq!(odd.usage.map(|u| u.input_tokens), Some(5));
    }

    #[test]
    fn count_tokens_is_free_embeddings_have_no_usage_errors_none() {
        let c = parse(
            "count_tokens",
            "application/json",
            br#"{"totalTokens":31,"promptTokensDetails":[{"modality":"TEXT","tokenCount":31}]}"#,
            &[],
        );
        assert_eq!(c.usage, Some(Usage::default()));
        let e = parse(
            "embeddings",
            "application/json",
            br#"{"embedding":{"values":[0.013168523,-0.008711934,-0.046782676]}}"#,
            &[],
        );
        assert_eq!(e.usage, None);
        // An error body with its error status: the status says it all.
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().unwrap(),
        );
        for op in ["generate_content", "embeddings"] {
            let mut p = Gemini.response_parser(&info(op), 429, &h);
            p.feed(ERR_JSON);
            assert_eq!(p.finish(), ParsedUsage::default(), "{op}");
        }
        // The same body under a success status is the provider's error.
        let p = parse("generate_content", "application/json", ERR_JSON, &[]);
        assert_eq!((p.usage, p.error.is_some()), (None, true), "{p:?}");
        // An error in the middle of an array stream keeps what came before.
        let mid = br#"[{"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1}},
{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}]"#;
        let m = parse("generate_content", "application/json", mid, &[]);
        assert_eq!(m.usage.map(|u| u.output_tokens), Some(1));
        assert_eq!(
            (m.partial, m.error.as_deref()),
            (true, Some("UNAVAILABLE")),
            "the error ended the stream before its final counts"
        );
    }

    #[test]
    fn a_stream_cut_before_its_finish_reason_is_partial() {
        let whole = parse("generate_content", "text/event-stream", GEN_SSE, &[]);
        assert!(!whole.partial);
        assert_eq!(whole.error, None);
        // The SSE fixture without its last event (the one with finishReason).
        let text = std::str::from_utf8(GEN_SSE).expect("utf-8");
        let last = text.trim_end().rfind("data: ").expect("events");
        let cut = parse(
            "generate_content",
            "text/event-stream",
            &GEN_SSE[..last],
            &[],
        );
        assert!(cut.partial);
        assert_eq!(cut.usage.map(|u| u.output_tokens), Some(30 + 186));
        assert_eq!(cut.error, None);
        // The array stream cut mid-way.
        let whole = parse("generate_content", "application/json", GEN_ARRAY, &[]);
        assert!(!whole.partial && whole.usage.is_some());
        let cut = parse(
            "generate_content",
            "application/json",
            &GEN_ARRAY[..GEN_ARRAY.len() * 2 / 3],
            &[],
        );
        assert!(cut.usage.is_some(), "{cut:?}");
        assert!(cut.partial, "{cut:?}");
        // Whole answers are final: one with a finishReason, a blocked
        // prompt (no candidates), embeddings (no candidates).
        assert!(!parse("generate_content", "application/json", GEN_JSON, &[]).partial);
        let blocked = br#"{"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":5,"totalTokenCount":5}}"#;
        let b = parse("generate_content", "application/json", blocked, &[]);
        assert_eq!(
            (b.usage.map(|u| u.input_tokens), b.partial),
            (Some(5), false)
        );
        let blocked_stream = br#"[{"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":{"promptTokenCount":5}},
{"promptFeedback":{"blockReason":"OTHER"},"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":1}}]"#;
        assert!(!parse("generate_content", "application/json", blocked_stream, &[]).partial);
        // An error status that is not an identifier is not recorded as
        // it came: the record says only that there was one.
        let odd = br#"[{"candidates":[],"usageMetadata":{"promptTokenCount":3}},
{"error":{"code":500,"status":"a b <c>"}}]"#;
        let o = parse("generate_content", "application/json", odd, &[]);
        assert_eq!((o.partial, o.error.as_deref()), (true, Some("error")));
    }

    #[test]
    fn garbage_never_panics() {
        for body in [
            &b""[..],
            b"[",
            b"]",
            b"}",
            b"[}]",
            b"[\"\\",
            b"\xff\xfe",
            b"data: {\n\n",
            b"[[[[[[[[",
            b"{\"usageMetadata\":{\"promptTokenCount\":-1}}",
        ] {
            for ct in ["application/json", "text/event-stream"] {
                let _ = parse("generate_content", ct, body, &[]);
            }
        }
    }

    proptest! {
        #[test]
        fn any_split_of_sse_same_usage(mut splits in proptest::collection::vec(0usize..GEN_SSE.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(
                parse("generate_content", "text/event-stream", GEN_SSE, &splits),
                parse("generate_content", "text/event-stream", GEN_SSE, &[])
            );
        }

        #[test]
        fn any_split_of_array_same_usage(mut splits in proptest::collection::vec(0usize..GEN_ARRAY.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(
                parse("generate_content", "application/json", GEN_ARRAY, &splits),
                parse("generate_content", "application/json", GEN_ARRAY, &[])
            );
        }

        #[test]
        fn any_split_of_json_same_usage(mut splits in proptest::collection::vec(0usize..GEN_JSON.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(
                parse("generate_content", "application/json", GEN_JSON, &splits),
                parse("generate_content", "application/json", GEN_JSON, &[])
            );
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), mut splits in proptest::collection::vec(0usize..512, 0..6)) {
            splits.sort();
            for ct in ["application/json", "text/event-stream"] {
                let _ = parse("generate_content", ct, &bytes, &splits);
            }
            let _ = elements(&bytes, &splits);
        }

        #[test]
        fn random_json_ish_bytes_split_the_same(bytes in proptest::collection::vec(prop::sample::select(b"[]{},:\"\\ a1\n".to_vec()), 0..64), at in 0usize..64) {
            prop_assert_eq!(elements(&bytes, &[at]), elements(&bytes, &[]));
        }
    }
}
