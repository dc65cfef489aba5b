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
