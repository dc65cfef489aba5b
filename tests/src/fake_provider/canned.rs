//! A canned fast path for benchmarks: a fixed OpenAI chat completion (with
//! usage), answered without parsing the request, so the fake costs about
//! what nginx serving a static file would. Asked for with the header
//! `x-fake-canned` or a path under `/canned/` (for peers such as LiteLLM
//! that do not forward client headers but take a base URL with a prefix).
//! Nothing is recorded in [`super::Reported`]: the benchmark sends far too
//! many requests for that log.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Response;

use super::Body;

/// A chat completion of the size a short real answer has.
const CANNED_CHAT: &str = r#"{"id":"chatcmpl-canned","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"The diff looks fine: the new parse() handles empty input, the test covers it, and nothing else changes behaviour.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":42,"completion_tokens":25,"total_tokens":67,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp_canned"}"#;

/// Whether a request asks for the canned answer.
pub(crate) fn wanted<B>(req: &hyper::Request<B>) -> bool {
    req.headers().contains_key("x-fake-canned") || req.uri().path().starts_with("/canned/")
}

/// The canned answer, after reading (and dropping) the request body.
pub(crate) async fn answer(body: hyper::body::Incoming) -> Response<Body> {
    let _ = body.collect().await;
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(CANNED_CHAT.as_bytes())).boxed())
        .expect("response")
}
