//! The bodies of the fuzz targets (`fuzz/`, run by `cargo xtask fuzz`), in
//! the library so that the test suite runs them too: on the tracked seeds,
//! on mutated provider fixtures and on random bytes, a short run on every
//! `cargo test` where the fuzzer runs for minutes.
//!
//! Each function takes the fuzzer's bytes (the first few choose the
//! adapter, content type, encoding or split) and panics only when a
//! property fails: never on bad input itself.
//!
//! Must never: be called by the agent.

use http::{HeaderMap, HeaderValue, Method, header};

use crate::config::ApiKind;
use crate::providers::openai::UsageChunkFilter;
use crate::providers::{BodyFilter, RequestInfo, RequestView, adapter_for, decode};

const APIS: [ApiKind; 5] = [
    ApiKind::Openai,
    ApiKind::AzureOpenai,
    ApiKind::Anthropic,
    ApiKind::Gemini,
    ApiKind::Bedrock,
];

/// Bytes from a client before the TLS handshake: the ClientHello reader.
pub fn client_hello(data: &[u8]) {
    let _ = crate::proxy::clienthello::parse_client_hello(data);
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    });
    rt.block_on(async {
        let mut r = data;
        let _ = crate::proxy::clienthello::read_client_hello(&mut r).await;
    });
}

const REQUEST_PATHS: [&str; 10] = [
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
const REQUEST_TYPES: [&str; 3] = ["application/json", "text/plain", "multipart/form-data"];

/// Bytes from a job: every adapter's request reader and request rewrite,
/// on any body, path and content type. A rewrite turns a valid JSON object
/// into a valid JSON object (it adds the usage option of a stream), and
/// says so in `injected_usage`.
pub fn requests(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let (sel, body) = data.split_at(3);
    let api = APIS[sel[0] as usize % APIS.len()];
    let path = REQUEST_PATHS[sel[1] as usize % REQUEST_PATHS.len()];
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(REQUEST_TYPES[sel[2] as usize % REQUEST_TYPES.len()]),
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
}

const RESPONSE_TYPES: [&str; 3] = [
    "application/json",
    "text/event-stream",
    "application/vnd.amazon.eventstream",
];
const RESPONSE_OPS: [&str; 5] = [
    "chat",
    "embeddings",
    "count_tokens",
    "generate_content",
    crate::providers::batch::OPERATION,
];
const BATCH_FORMATS: [crate::providers::batch::Format; 5] = [
    crate::providers::batch::Format::OpenAi,
    crate::providers::batch::Format::OpenAiThoughtsBeside,
    crate::providers::batch::Format::Anthropic,
    crate::providers::batch::Format::GeminiLines,
    crate::providers::batch::Format::GeminiInlined,
];
const ENCODINGS: [&str; 5] = ["identity", "gzip", "deflate", "br", "zstd"];

/// Bytes from a provider: every adapter's response parser, in every
/// content type and encoding, fed in pieces whose sizes the input chooses.
pub fn response_parsers(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (sel, body) = data.split_at(4);
    let api = APIS[sel[0] as usize % APIS.len()];
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(RESPONSE_TYPES[sel[1] as usize % RESPONSE_TYPES.len()]),
    );
    let operation = RESPONSE_OPS[sel[2] as usize % RESPONSE_OPS.len()];
    let info = RequestInfo {
        operation,
        metered: true,
        batch: (operation == crate::providers::batch::OPERATION).then(|| {
            crate::providers::BatchResults::new(
                "f".into(),
                BATCH_FORMATS[sel[2] as usize / RESPONSE_OPS.len() % BATCH_FORMATS.len()],
            )
        }),
        ..Default::default()
    };
    if let Some(b) = &info.batch {
        // Batch results: however the body is cut, the same results count.
        let step = 1 + sel[3] as usize % 97;
        let tally = |step: usize| {
            let mut p = crate::providers::batch::parser(b, 200);
            for chunk in body.chunks(step) {
                p.feed(chunk);
            }
            p.finish().batch
        };
        assert_eq!(
            tally(step),
            tally(body.len().max(1)),
            "cut every {step} bytes"
        );
        return;
    }
    let parser = adapter_for(api).response_parser(&info, 200, &headers);
    let mut p = decode::decoding(Some(ENCODINGS[sel[3] as usize % ENCODINGS.len()]), parser);
    let step = 1 + sel[3] as usize % 97;
    let mut seen = false;
    for chunk in body.chunks(step) {
        p.feed(chunk);
        assert!(!seen || p.usage_seen(), "usage_seen went back to false");
        seen = p.usage_seen();
    }
    // The proxy lets the request body go once usage is seen: the usage
    // must then come out of `finish`.
    let parsed = p.finish();
    assert!(
        !seen || parsed.usage.is_some(),
        "usage_seen, but finish gave none"
    );
}

/// The filter that hides an injected usage chunk from the client: any
/// input, any split, and it never emits more than it was given (it only
/// removes).
pub fn usage_filter(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let step = 1 + data[0] as usize % 61;
    let mut f = UsageChunkFilter::default();
    let mut out = Vec::new();
    for chunk in data[1..].chunks(step) {
        f.filter(chunk, &mut out);
    }
    f.finish(&mut out);
    assert!(out.len() < data.len(), "the filter only removes");
}

/// A process's command line as `/proc/PID/cmdline` gives it (arguments
/// split at NUL, any bytes, any job's choosing): redaction never panics,
/// and whatever comes before them, a provider key passed as an argument
/// of its own and the value of a sensitive flag never survive. (That a
/// second pass changes nothing is the unit tests' property, on their
/// words: a flattened line of any bytes has lost its arguments' bounds.)
pub fn command_lines(data: &[u8]) {
    use crate::attribution::{redact_args, redact_cmdline};
    const KEY: &str = "sk-proj-FuzzCanary0123456789abcdef";
    const VALUE: &str = "FuzzCanaryValue";
    let text = String::from_utf8_lossy(data);
    let mut args: Vec<&str> = text.split('\0').collect();
    args.extend([KEY, "--api-key", VALUE]);
    let out = redact_args(&args);
    if !text.contains("FuzzCanary") {
        assert!(!out.contains("FuzzCanary"), "a canary survived in {out:?}");
    }
    let _ = redact_cmdline(&text.replace('\0', " "));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Target = (&'static str, fn(&[u8]));

    /// Every target, by its fuzz name.
    const TARGETS: [Target; 5] = [
        ("client_hello", client_hello),
        ("requests", requests),
        ("response_parsers", response_parsers),
        ("usage_filter", usage_filter),
        ("command_lines", command_lines),
    ];

    fn fixtures() -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/providers/fixtures");
        let mut out = Vec::new();
        for sub in std::fs::read_dir(&dir).expect("fixtures") {
            for f in std::fs::read_dir(sub.expect("entry").path()).expect("provider dir") {
                let p = f.expect("entry").path();
                if p.extension().is_some_and(|e| e != "py") {
                    out.push(std::fs::read(&p).expect("fixture"));
                }
            }
        }
        assert!(out.len() >= 15, "{} fixtures", out.len());
        out
    }

    #[test]
    fn the_tracked_seeds_pass_every_target() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let mut seen = 0;
        for (name, target) in TARGETS {
            let Ok(dir) = std::fs::read_dir(root.join(name)) else {
                continue;
            };
            for f in dir {
                target(&std::fs::read(f.expect("seed").path()).expect("read seed"));
                seen += 1;
            }
        }
        assert!(seen >= 8, "{seen} seeds");
    }

    #[test]
    fn every_fixture_under_every_selector_passes_every_target() {
        for body in fixtures() {
            for sel in 0u8..=255 {
                let mut data = vec![sel, sel.rotate_left(3), sel ^ 0x5a, sel.wrapping_mul(7)];
                data.extend_from_slice(&body);
                for (_, target) in TARGETS {
                    target(&data);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_pass_every_target(data in proptest::collection::vec(any::<u8>(), 0..1500)) {
            for (_, target) in TARGETS {
                target(&data);
            }
        }

        /// A fixture with bytes flipped, cut short or doubled: input close
        /// enough to valid to reach the parsers' deeper states.
        #[test]
        fn mutated_fixtures_pass_every_target(
            which in any::<prop::sample::Index>(),
            sel in any::<[u8; 4]>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in any::<prop::sample::Index>(),
            doubled in any::<bool>(),
        ) {
            static FIXTURES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
            let all = FIXTURES.get_or_init(fixtures);
            let mut body = all[which.index(all.len())].clone();
            for (at, b) in flips {
                let i = at.index(body.len());
                body[i] ^= b;
            }
            body.truncate(cut.index(body.len() + 1));
            if doubled {
                body.extend_from_within(..);
            }
            let mut data = sel.to_vec();
            data.extend_from_slice(&body);
            for (_, target) in TARGETS {
                target(&data);
            }
        }
    }
}
