//! Test helpers shared by every adapter's tests: build a request view,
//! feed a fixture to a parser split at given offsets, and measure what a
//! parse allocates.

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

/// Feeds `body` (of `content_type`) a byte at a time and returns how many
/// bytes the parser had taken when it first said `generation_over`, and
/// that it still said so at the end.
pub fn generation_over_after(
    p: &dyn Provider,
    info: &RequestInfo,
    content_type: &str,
    body: &[u8],
) -> Option<usize> {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("content type"),
    );
    let mut parser = super::decode::decoding(None, p.response_parser(info, 200, &h));
    let mut first = None;
    for (i, b) in body.iter().enumerate() {
        parser.feed(std::slice::from_ref(b));
        if parser.generation_over() {
            first.get_or_insert(i + 1);
        } else {
            assert!(first.is_none(), "generation_over went back to false");
        }
    }
    first
}

/// The end of the first SSE event (its blank line included) in `body`
/// that contains `needle`.
pub fn end_of_event_with(body: &[u8], needle: &str) -> usize {
    let at = body
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .expect("needle in body");
    at + body[at..]
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("event end")
        + 2
}

/// The allocator of the library's tests: the system's, counting the bytes
/// each thread holds, so that a test can bound what a parse allocates
/// (libtest runs each test on a thread of its own, so others' allocations
/// do not count).
struct Counting;

thread_local! {
    /// Bytes this thread allocated and has not freed (negative when it
    /// freed what another thread allocated).
    static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    /// The most `LIVE` has been since [`peak_alloc`] reset it.
    static PEAK: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

fn count(by: isize) {
    // (`try_with`: never panic inside the allocator, even while the
    // thread's locals are torn down.)
    let _ = LIVE.try_with(|live| {
        let n = live.get().saturating_add(by);
        live.set(n);
        let _ = PEAK.try_with(|p| p.set(p.get().max(n)));
    });
}

// SAFETY: every call is passed to `System` unchanged; only the counters,
// which never allocate, are touched besides.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(l) };
        if !p.is_null() {
            count(l.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(p, l) };
        count(-(l.size() as isize));
    }

    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        let q = unsafe { std::alloc::System.realloc(p, l, new) };
        if !q.is_null() {
            count(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f`; gives what it returned and the most bytes it held at once.
pub fn peak_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(std::cell::Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(std::cell::Cell::get);
    (r, peak.saturating_sub(base).max(0) as usize)
}

/// A JSON object of about `size` bytes: `members` (each `"key":value`,
/// comma-separated) after a `"padding"` member, an array of small numbers,
/// which costs some 16 times its size when built as a `serde_json::Value`.
pub fn padded_object(members: &str, size: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(size + members.len() + 32);
    b.extend_from_slice(b"{\"padding\":[0");
    while b.len() < size {
        b.extend_from_slice(b",0");
    }
    b.extend_from_slice(b"]");
    if !members.is_empty() {
        b.push(b',');
        b.extend_from_slice(members.as_bytes());
    }
    b.push(b'}');
    b
}

/// Feeds `body` whole to a parser and gives what it found and the most
/// bytes the parser's `finish` held at once: the body itself is already
/// gathered by then.
pub fn finish_peak(
    p: &dyn Provider,
    info: &RequestInfo,
    content_type: &str,
    body: &[u8],
) -> (ParsedUsage, usize) {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("content type"),
    );
    let mut parser = p.response_parser(info, 200, &h);
    parser.feed(body);
    peak_alloc(|| parser.finish())
}
