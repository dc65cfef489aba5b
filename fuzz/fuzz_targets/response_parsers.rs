//! Bytes from a provider: every adapter's response parser, in every
//! content type and encoding, fed in pieces whose sizes the input chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::ApiKind;
use tollgate::providers::{RequestInfo, adapter_for, decode};

const APIS: [ApiKind; 5] = [
    ApiKind::Openai,
    ApiKind::AzureOpenai,
    ApiKind::Anthropic,
    ApiKind::Gemini,
    ApiKind::Bedrock,
];
const TYPES: [&str; 3] = [
    "application/json",
    "text/event-stream",
    "application/vnd.amazon.eventstream",
];
const OPS: [&str; 4] = ["chat", "embeddings", "count_tokens", "generate_content"];
const ENCODINGS: [&str; 5] = ["identity", "gzip", "deflate", "br", "zstd"];

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (sel, body) = data.split_at(4);
    let api = APIS[sel[0] as usize % APIS.len()];
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(TYPES[sel[1] as usize % TYPES.len()]),
    );
    let info = RequestInfo {
        operation: OPS[sel[2] as usize % OPS.len()],
        metered: true,
        ..Default::default()
    };
    let parser = adapter_for(api).response_parser(&info, 200, &headers);
    let mut p = decode::decoding(Some(ENCODINGS[sel[3] as usize % ENCODINGS.len()]), parser);
    let step = 1 + sel[3] as usize % 97;
    for chunk in body.chunks(step) {
        p.feed(chunk);
    }
    let _ = p.finish();
});
