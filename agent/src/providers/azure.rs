//! Azure OpenAI (`NAME.openai.azure.com`, hosts named in the config):
//! `/openai/deployments/{deployment}/chat/completions|completions|embeddings`
//! (`?api-version=...`) and the v1 API (`/openai/v1/chat/completions`,
//! `/openai/v1/responses`, model in the body).
//!
//! The wire format is OpenAI's: classification and usage are the OpenAI
//! adapter's, called through its trait. Azure adds only the deployment:
//! the request model is the body's `model` when present, else the
//! deployment name from the path.
//!
//! A stream whose client did not ask for usage gets
//! `stream_options.include_usage` added, as with OpenAI, when the API can
//! take it: the v1 API, and `api-version` 2024-09-01-preview or later.
//! Older versions refuse the parameter, so those requests are forwarded
//! unchanged and their streams' usage is estimated.

use http::HeaderMap;

use super::openai::OpenAi;
use super::{Provider, RequestInfo, RequestView, UsageParser};

pub struct AzureOpenAi;

/// The deployment named in `/openai/deployments/{deployment}/...`,
/// percent-decoded.
pub(crate) fn deployment(path: &str) -> Option<String> {
    let name = path
        .strip_prefix("/openai/deployments/")?
        .split('/')
        .next()
        .filter(|d| !d.is_empty())?;
    Some(
        percent_encoding::percent_decode_str(name)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// The first API version that takes `stream_options` (as a date prefix).
const STREAM_OPTIONS_SINCE: &str = "2024-09-01";

/// Whether the API the request names takes `stream_options`: the v1 API
/// does; a deployments path does from `api-version` 2024-09-01(-preview)
/// on. A missing or unreadable version does not.
fn takes_stream_options(path: &str, query: Option<&str>) -> bool {
    if path.starts_with("/openai/v1/") {
        return true;
    }
    let Some(version) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("api-version="))
    else {
        return false;
    };
    let date = version.get(..10).unwrap_or("");
    let well_formed = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    well_formed && date >= STREAM_OPTIONS_SINCE
}

impl Provider for AzureOpenAi {
    fn name(&self) -> &'static str {
        "azure-openai"
    }

    fn request(&self, req: &RequestView<'_>) -> RequestInfo {
        let mut info = OpenAi.request(req);
        if info.wire == Some(crate::config::ApiKind::Anthropic) {
            // Claude in Microsoft Foundry (`/anthropic/v1/messages` on the
            // resource's host): Anthropic's, as Claude on Bedrock and
            // Vertex AI is, recorded and priced as `anthropic`.
            info.api = Some(crate::config::ApiKind::Anthropic);
            return info;
        }
        if info.metered && info.model.is_none() {
            info.model = deployment(req.path);
        }
        info.refuses_stream_options = !takes_stream_options(req.path, req.query);
        info
    }

    fn rewrite_request(&self, info: &mut RequestInfo, body: &[u8]) -> Option<bytes::Bytes> {
        OpenAi.rewrite_request(info, body)
    }

    fn response_filter(&self, info: &RequestInfo) -> Option<Box<dyn super::BodyFilter>> {
        OpenAi.response_filter(info)
    }

    fn response_parser(
        &self,
        info: &RequestInfo,
        status: u16,
        headers: &HeaderMap,
    ) -> Box<dyn UsageParser> {
        // (The first chunk of Azure's streams, the prompt filter results,
        // names the model as `""`: the OpenAI stream parser skips an empty
        // model.)
        OpenAi.response_parser(info, status, headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::Usage;
    use crate::providers::ParsedUsage;
    use crate::providers::testing::{parse_split, request};
    use proptest::prelude::*;

    const CHAT_JSON: &[u8] = include_bytes!("fixtures/azure/chat.json");
    const CHAT_SSE: &[u8] = include_bytes!("fixtures/azure/chat_stream.sse");
    const ERR_JSON: &[u8] = include_bytes!("fixtures/azure/error_429.json");

    fn info(op: &'static str) -> RequestInfo {
        RequestInfo {
            operation: op,
            metered: true,
            ..Default::default()
        }
    }

    fn parse(ct: &str, body: &[u8], splits: &[usize]) -> ParsedUsage {
        parse_split(&AzureOpenAi, &info("chat"), ct, body, splits)
    }

    #[test]
    fn include_usage_is_added_only_where_the_api_version_takes_it() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let chat = "/openai/deployments/gpt-4o-prod/chat/completions";
        for (path, query, takes) in [
            (chat, Some("api-version=2024-10-21"), true),
            (chat, Some("api-version=2024-09-01-preview"), true),
            (chat, Some("x=1&api-version=2025-04-01-preview"), true),
            (chat, Some("api-version=2024-08-01-preview"), false),
            (chat, Some("api-version=2024-06-01"), false),
            (chat, Some("api-version=latest"), false),
            (chat, Some("api-version=2024-1x-21"), false),
            (chat, None, false),
            ("/openai/v1/chat/completions", None, true),
            (
                "/openai/v1/chat/completions",
                Some("api-version=preview"),
                true,
            ),
        ] {
            let mut view = request("POST", path, body);
            view.query = query;
            let mut info = AzureOpenAi.request(&view);
            assert_eq!(info.refuses_stream_options, !takes, "{path}?{query:?}");
            let out = AzureOpenAi.rewrite_request(&mut info, body);
            assert_eq!(out.is_some(), takes, "{path}?{query:?}");
            assert_eq!(info.injected_usage, takes, "{path}?{query:?}");
            assert_eq!(
                AzureOpenAi.response_filter(&info).is_some(),
                takes,
                "{path}?{query:?}"
            );
            if let Some(out) = out {
                let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
                assert_eq!(v["stream_options"]["include_usage"], true);
                assert_eq!(v["messages"][0]["content"], "hi");
            }
        }
        // Not streaming: never rewritten.
        let mut view = request("POST", chat, br#"{"messages":[]}"#);
        view.query = Some("api-version=2024-10-21");
        let mut info = AzureOpenAi.request(&view);
        assert!(AzureOpenAi.rewrite_request(&mut info, b"{}").is_none());
    }

    #[test]
    fn classifies_requests() {
        for (path, op) in [
            ("/openai/deployments/gpt-4o-prod/chat/completions", "chat"),
            (
                "/openai/deployments/gpt-4o-prod/completions",
                "text_completion",
            ),
            ("/openai/deployments/gpt-4o-prod/embeddings", "embeddings"),
        ] {
            let i = AzureOpenAi.request(&request(
                "POST",
                path,
                br#"{"messages":[],"max_tokens":99}"#,
            ));
            assert_eq!((i.operation, i.metered), (op, true), "{path}");
            assert_eq!(i.model.as_deref(), Some("gpt-4o-prod"), "{path}");
        }
        let s = AzureOpenAi.request(&request(
            "POST",
            "/openai/deployments/team%20a%2Fgpt4o/chat/completions",
            br#"{"messages":[],"stream":true,"max_tokens":99}"#,
        ));
        assert_eq!(s.model.as_deref(), Some("team a/gpt4o"));
        assert_eq!((s.streaming, s.max_output_tokens), (true, Some(99)));
        // The body's model wins over the deployment.
        let b = AzureOpenAi.request(&request(
            "POST",
            "/openai/deployments/prod/chat/completions",
            br#"{"model":"gpt-4.1-mini","messages":[]}"#,
        ));
        assert_eq!(b.model.as_deref(), Some("gpt-4.1-mini"));
        for (path, op) in [
            ("/openai/v1/chat/completions", "chat"),
            ("/openai/v1/responses", "responses"),
        ] {
            let i = AzureOpenAi.request(&request("POST", path, br#"{"model":"o4-mini"}"#));
            assert_eq!(i.operation, op);
            assert_eq!(i.model.as_deref(), Some("o4-mini"));
        }
        let v1 = AzureOpenAi.request(&request("POST", "/openai/v1/chat/completions", b"{}"));
        assert_eq!(v1.model, None);
        assert!(
            !AzureOpenAi
                .request(&request(
                    "GET",
                    "/openai/deployments/prod/chat/completions",
                    b""
                ))
                .metered
        );
    }

    #[test]
    fn never_rewrites_requests() {
        let mut i = AzureOpenAi.request(&request(
            "POST",
            "/openai/deployments/prod/chat/completions",
            br#"{"stream":true,"messages":[]}"#,
        ));
        assert!(
            AzureOpenAi
                .rewrite_request(&mut i, br#"{"stream":true,"messages":[]}"#)
                .is_none()
        );
        assert!(AzureOpenAi.response_filter(&i).is_none());
    }

    #[test]
    fn json_usage() {
        let p = parse("application/json", CHAT_JSON, &[]);
        assert_eq!(
            p.usage,
            Some(Usage {
                input_tokens: 1536,
                output_tokens: 12,
                cached_input_tokens: 1280,
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
        assert_eq!(p.response_model.as_deref(), Some("gpt-4o-2024-11-20"));
    }

    /// An Azure stream's generation is over at `finish_reason`, so a
    /// client that leaves there does not cut the usage chunk off.
    #[test]
    fn a_streams_generation_is_over_at_its_finish_reason() {
        use crate::providers::testing::{end_of_event_with, generation_over_after};
        assert_eq!(
            generation_over_after(&AzureOpenAi, &info("chat"), "text/event-stream", CHAT_SSE),
            Some(end_of_event_with(CHAT_SSE, r#""finish_reason":"stop""#))
        );
    }

    #[test]
    fn stream_usage_and_no_empty_model() {
        let p = parse("text/event-stream", CHAT_SSE, &[]);
        assert_eq!(
            p.usage.map(|u| (u.input_tokens, u.output_tokens)),
            Some((31, 4))
        );
        assert_ne!(p.response_model.as_deref(), Some(""));
    }

    #[test]
    fn error_has_no_usage() {
        assert_eq!(parse("application/json", ERR_JSON, &[]).usage, None);
        for body in [&b""[..], b"{", b"\xff", b"data: {\n\n"] {
            assert_eq!(parse("application/json", body, &[]).usage, None);
            assert_eq!(parse("text/event-stream", body, &[]).usage, None);
        }
    }

    proptest! {
        #[test]
        fn any_split_of_stream_same_usage(mut splits in proptest::collection::vec(0usize..CHAT_SSE.len(), 0..12)) {
            splits.sort();
            prop_assert_eq!(parse("text/event-stream", CHAT_SSE, &splits), parse("text/event-stream", CHAT_SSE, &[]));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), mut splits in proptest::collection::vec(0usize..512, 0..6)) {
            splits.sort();
            let _ = parse("text/event-stream", &bytes, &splits);
            let _ = parse("application/json", &bytes, &splits);
        }
    }
}
