//! Test helpers shared by every adapter's tests: build a request view,
//! and feed a fixture to a parser split at given offsets.

use http::{HeaderMap, HeaderValue, Method};

use super::{ParsedUsage, Provider, RequestInfo, RequestView};

/// A request view over static parts (no headers).
pub fn request<'a>(method: &str, path: &'a str, body: &'a [u8]) -> RequestView<'a> {
    let method: &'static Method = match method {
        "GET" => &Method::GET,
        "POST" => &Method::POST,
        _ => &Method::PUT,
    };
    static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    RequestView {
        method,
        path,
        query: None,
        headers: EMPTY.get_or_init(HeaderMap::new),
        body: Some(body),
    }
}

/// Feeds `body` to the adapter's parser in pieces cut at `splits`.
pub fn parse_split(
    p: &dyn Provider,
    info: &RequestInfo,
    content_type: &str,
    body: &[u8],
    splits: &[usize],
) -> ParsedUsage {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("content type"),
    );
    parse_split_with(p, info, &h, body, splits)
}

/// As [`parse_split`], with explicit response headers.
pub fn parse_split_with(
    p: &dyn Provider,
    info: &RequestInfo,
    headers: &HeaderMap,
    body: &[u8],
    splits: &[usize],
) -> ParsedUsage {
    let mut parser = p.response_parser(info, 200, headers);
    let mut last = 0;
    for &s in splits {
        let s = s.clamp(last, body.len());
        parser.feed(&body[last..s]);
        last = s;
    }
    parser.feed(&body[last..]);
    parser.finish()
}

/// Feeds `body` a byte at a time, compressed with `encoding` first when one
/// is given, and returns how many input bytes the parser had taken when it
/// first said `usage_seen`.
pub fn usage_seen_after(
    p: &dyn Provider,
    info: &RequestInfo,
    content_type: &str,
    body: &[u8],
    encoding: Option<&str>,
) -> Option<usize> {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("content type"),
    );
    let body = match encoding {
        Some("gzip") => {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("gzip");
            e.finish().expect("gzip")
        }
        None => body.to_vec(),
        Some(other) => panic!("no encoder for {other} here"),
    };
    let mut parser = super::decode::decoding(encoding, p.response_parser(info, 200, &h));
    for (i, b) in body.iter().enumerate() {
        parser.feed(std::slice::from_ref(b));
        if parser.usage_seen() {
            let usage = parser.finish().usage;
            assert!(usage.is_some(), "usage_seen but finish gave none");
            return Some(i + 1);
        }
    }
    None
}
