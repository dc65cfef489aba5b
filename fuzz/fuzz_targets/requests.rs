//! Bytes from a job: every adapter's request reader and request rewrite,
//! on any body, path and content type. Never panics; a rewrite turns a
//! valid JSON object into a valid JSON object (it adds the usage option of
//! a stream), and says so in `injected_usage`.
#![no_main]

use http::{HeaderMap, HeaderValue, Method, header};
use libfuzzer_sys::fuzz_target;
use tollgate::config::ApiKind;
use tollgate::providers::{RequestView, adapter_for};

const APIS: [ApiKind; 5] = [
    ApiKind::Openai,
    ApiKind::AzureOpenai,
    ApiKind::Anthropic,
    ApiKind::Gemini,
    ApiKind::Bedrock,
];
const PATHS: [&str; 10] = [
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/completions",
    "/openai/deployments/gpt-4o/chat/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
    "/model/anthropic.claude-3-5-sonnet-20241022-v2:0/converse-stream",
    "/v1/models",
];
const TYPES: [&str; 3] = ["application/json", "text/plain", "multipart/form-data"];

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (sel, body) = data.split_at(3);
    let api = APIS[sel[0] as usize % APIS.len()];
    let path = PATHS[sel[1] as usize % PATHS.len()];
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(TYPES[sel[2] as usize % TYPES.len()]),
    );
    let query = (sel[2] & 0x80 != 0).then_some("alt=sse");
    let adapter = adapter_for(api);
    let mut info = adapter.request(&RequestView {
        method: &Method::POST,
        path,
        query,
        headers: &headers,
        body: Some(body),
    });
    match adapter.rewrite_request(&mut info, body) {
        None => assert!(!info.injected_usage),
        Some(out) => {
            assert!(info.injected_usage);
            // A body the provider would refuse may stay refusable; a valid
            // one must stay a valid object.
            if let Ok(before) = serde_json::from_slice::<serde_json::Value>(body) {
                assert!(before.is_object(), "only objects are rewritten");
                let after: serde_json::Value =
                    serde_json::from_slice(&out).expect("a rewrite of JSON is JSON");
                assert!(after.is_object());
            }
        }
    }
    let _ = adapter.response_filter(&info);
});
