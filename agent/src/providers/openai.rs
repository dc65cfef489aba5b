//! OpenAI (and the OpenAI-compatible hosts): chat completions, legacy
//! completions, embeddings and the Responses API, JSON and SSE.

use serde_json::Value;

use super::sse::SseReader;
use super::{
    JsonBody, ParsedUsage, Provider, RequestInfo, RequestView, UsageParser, str_at, u64_at,
};
use crate::meter::Usage;

pub struct OpenAi;

/// The operation a path names. Paths are matched by suffix so that hosts
/// that mount the API under a prefix (`/openai/v1/...`, `/api/v1/...`) work.
fn operation(path: &str) -> Option<&'static str> {
    let p = path.trim_end_matches('/');
    if p.ends_with("/chat/completions") {
        Some("chat")
    } else if p.ends_with("/completions") {
        Some("text_completion")
    } else if p.ends_with("/embeddings") {
        Some("embeddings")
    } else if p.ends_with("/responses") {
        Some("responses")
    } else {
        None
    }
}

impl Provider for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn request(&self, req: &RequestView<'_>) -> RequestInfo {
        let op = match (req.method == http::Method::POST, operation(req.path)) {
            (true, Some(op)) => op,
            _ => {
                return RequestInfo {
                    operation: "other",
                    metered: false,
                    ..Default::default()
                };
            }
        };
        let body: Option<Value> = req.body.and_then(|b| serde_json::from_slice(b).ok());
        let (model, streaming, max_out) = match &body {
            Some(v) => (
                str_at(v, &["model"]),
                v.get("stream").and_then(Value::as_bool).unwrap_or(false),
                u64_at(v, &["max_completion_tokens"])
                    .or_else(|| u64_at(v, &["max_output_tokens"]))
                    .or_else(|| u64_at(v, &["max_tokens"])),
            ),
            None => (None, false, None),
        };
        RequestInfo {
            operation: op,
            metered: true,
            model,
            streaming,
            max_output_tokens: max_out,
        }
    }

    fn response_parser(
        &self,
        _info: &RequestInfo,
        _status: u16,
        headers: &http::HeaderMap,
    ) -> Box<dyn UsageParser> {
        if super::content_type(headers) == "text/event-stream" {
            Box::new(StreamParser::default())
        } else {
            Box::new(JsonParser(JsonBody::new(JsonBody::DEFAULT_LIMIT)))
        }
    }
}

/// Usage from an OpenAI `usage` object, in either the chat/completions
/// shape (`prompt_tokens`) or the Responses shape (`input_tokens`).
pub fn usage_from(u: &Value) -> Option<Usage> {
    if !u.is_object() {
        return None;
    }
    let input = u64_at(u, &["prompt_tokens"]).or_else(|| u64_at(u, &["input_tokens"]))?;
    let output = u64_at(u, &["completion_tokens"])
        .or_else(|| u64_at(u, &["output_tokens"]))
        .unwrap_or(0);
    let cached = u64_at(u, &["prompt_tokens_details", "cached_tokens"])
        .or_else(|| u64_at(u, &["input_tokens_details", "cached_tokens"]))
        .unwrap_or(0);
    let reasoning = u64_at(u, &["completion_tokens_details", "reasoning_tokens"])
        .or_else(|| u64_at(u, &["output_tokens_details", "reasoning_tokens"]))
        .unwrap_or(0);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached.min(input),
        cache_write_input_tokens: 0,
        reasoning_tokens: reasoning.min(output),
    })
}

/// Reads a whole (bounded) JSON body.
struct JsonParser(JsonBody);

impl UsageParser for JsonParser {
    fn feed(&mut self, chunk: &[u8]) {
        self.0.feed(chunk);
    }

    fn finish(&mut self) -> ParsedUsage {
        let Some(v) = self.0.take() else {
            return ParsedUsage::default();
        };
        // Responses API objects carry usage at the top level too.
        ParsedUsage {
            usage: v.get("usage").and_then(usage_from),
            response_model: str_at(&v, &["model"]),
            output_text: String::new(),
        }
    }
}

/// Reads SSE chunks: chat completion chunks (usage in the last chunk when
/// `stream_options.include_usage` is set) and Responses events
/// (`response.completed` carries `response.usage`).
#[derive(Default)]
struct StreamParser {
    sse: SseReader,
    found: ParsedUsage,
}

impl StreamParser {
    fn on_event(found: &mut ParsedUsage, data: &str) {
        if data == "[DONE]" {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let obj = v.get("response").filter(|r| r.is_object()).unwrap_or(&v);
        if found.response_model.is_none()
            && let Some(m) = str_at(obj, &["model"])
        {
            found.response_model = Some(m);
        }
        if let Some(u) = obj.get("usage").and_then(usage_from) {
            found.usage = Some(u);
        }
    }
}

impl UsageParser for StreamParser {
    fn feed(&mut self, chunk: &[u8]) {
        let found = &mut self.found;
        self.sse
            .feed(chunk, &mut |e| Self::on_event(found, &e.data));
    }

    fn finish(&mut self) -> ParsedUsage {
        let found = &mut self.found;
        self.sse.finish(&mut |e| Self::on_event(found, &e.data));
        std::mem::take(&mut self.found)
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
        crate::providers::testing::parse_split(&OpenAi, &RequestInfo::default(), ct, body, splits)
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
            })
        );
        assert_eq!(p.response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
    }

    #[test]
    fn stream_usage_from_final_chunk() {
        let p = parse("text/event-stream; charset=utf-8", CHAT_SSE, &[]);
        let u = p.usage.expect("usage chunk");
        assert_eq!((u.input_tokens, u.output_tokens), (13, 7));
        assert_eq!(p.response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
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
                reasoning_tokens: 5
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
    fn garbage_never_panics() {
        for body in [&b""[..], b"{", b"\xff\xfe", b"data: {\n\n", b"[]"] {
            let _ = parse("application/json", body, &[]);
            let _ = parse("text/event-stream", body, &[]);
        }
    }

    proptest! {
        #[test]
        fn any_split_of_stream_gives_same_usage(mut splits in proptest::collection::vec(0usize..CHAT_SSE.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(parse("text/event-stream", CHAT_SSE, &splits), parse("text/event-stream", CHAT_SSE, &[]));
        }

        #[test]
        fn any_split_of_json_gives_same_usage(mut splits in proptest::collection::vec(0usize..CHAT_JSON.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(parse("application/json", CHAT_JSON, &splits), parse("application/json", CHAT_JSON, &[]));
        }
    }
}
