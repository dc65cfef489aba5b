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
//! Requests are never rewritten (no injected `stream_options`): API
//! versions before 2024-09-01-preview refuse the parameter, and the
//! rewrite cannot see the `api-version` query. A stream whose client did
//! not ask for usage is estimated.

use http::HeaderMap;

use super::openai::OpenAi;
use super::{ParsedUsage, Provider, RequestInfo, RequestView, UsageParser};

pub struct AzureOpenAi;

/// The deployment named in `/openai/deployments/{deployment}/...`,
/// percent-decoded.
fn deployment(path: &str) -> Option<String> {
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

impl Provider for AzureOpenAi {
    fn name(&self) -> &'static str {
        "azure-openai"
    }

    fn request(&self, req: &RequestView<'_>) -> RequestInfo {
        let mut info = OpenAi.request(req);
        if info.metered && info.model.is_none() {
            info.model = deployment(req.path);
        }
        info
    }

    fn response_parser(
        &self,
        info: &RequestInfo,
        status: u16,
        headers: &HeaderMap,
    ) -> Box<dyn UsageParser> {
        Box::new(Parser(OpenAi.response_parser(info, status, headers)))
    }
}

/// The OpenAI parser, minus Azure's quirk: a stream's first chunk (the
/// prompt filter results) names the model as `""`.
struct Parser(Box<dyn UsageParser>);

impl UsageParser for Parser {
    fn feed(&mut self, chunk: &[u8]) {
        self.0.feed(chunk);
    }

    fn finish(&mut self) -> ParsedUsage {
        let mut p = self.0.finish();
        if p.response_model.as_deref() == Some("") {
            p.response_model = None;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::Usage;
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
            })
        );
        assert_eq!(p.response_model.as_deref(), Some("gpt-4o-2024-11-20"));
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
            let _ = parse("application/json", body, &[]);
            let _ = parse("text/event-stream", body, &[]);
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
