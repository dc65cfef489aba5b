//! An incremental Server-Sent Events reader: bytes in, events out, with any
//! chunk boundary (inside a line, inside a CRLF, inside a UTF-8 sequence).
//!
//! Keeps only the current partial line and the current event's data, both
//! bounded: an event larger than the bound is dropped and counted. What an
//! event holds past [`SseReader::FREE`] is taken from the response budget
//! (`proxy.max_buffered_response_bytes`, shared with the JSON answers), so
//! that many streams carrying large events at once (the Responses API's
//! last event repeats the whole response) do not each buffer up to the
//! event bound: an event the budget cannot hold is dropped, as an
//! oversized one is. (Not charged: the first [`SseReader::FREE`] of each
//! event, and the copy and parse of an event as it is handed on.)

use std::sync::Arc;

use crate::budget::{BodyBudget, BodyLease};

/// The UTF-8 byte order mark, which the SSE spec strips once from the
/// start of a stream.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    pub event: Option<String>,
    pub data: String,
}

pub struct SseReader {
    line: Vec<u8>,
    event: Option<String>,
    data: Vec<u8>,
    has_data: bool,
    last_was_cr: bool,
    limit: usize,
    /// Events dropped because they exceeded the bound.
    pub oversized: u64,
    /// The current line is over the bound: its bytes are not kept.
    skipping: bool,
    /// The current event was dropped (a line or its data over the bound):
    /// its other lines are ignored up to the blank line that ends it, so
    /// no part of it is taken for the whole.
    dropped: bool,
    /// How much of a leading [`BOM`] has been read (and held back) while
    /// the stream may still start with one; `None` once it cannot.
    bom: Option<usize>,
    /// What the current event holds past [`Self::FREE`].
    lease: BodyLease,
    /// Events dropped because the response budget was held.
    pub over_budget: u64,
    /// The current event is being dropped for the budget (not counted as
    /// oversized too).
    budget_failed: bool,
    /// The current line of a dropped event has bytes (it is not the blank
    /// line that ends the event); the bytes themselves are not kept.
    dropped_line: bool,
}

impl Default for SseReader {
    fn default() -> Self {
        Self::new(4 << 20)
    }
}

impl SseReader {
    /// What an event may hold without the response budget (most events are
    /// a few hundred bytes).
    pub const FREE: usize = 64 << 10;

    pub fn new(limit: usize) -> Self {
        Self::within(limit, super::response_budget())
    }

    /// As [`SseReader::new`], holding what is past [`Self::FREE`] against
    /// `budget`.
    pub fn within(limit: usize, budget: &Arc<BodyBudget>) -> Self {
        SseReader {
            line: Vec::new(),
            event: None,
            data: Vec::new(),
            has_data: false,
            last_was_cr: false,
            limit,
            oversized: 0,
            skipping: false,
            dropped: false,
            bom: Some(0),
            lease: budget.lease(),
            over_budget: 0,
            budget_failed: false,
            dropped_line: false,
        }
    }

    /// Takes from the budget what the event holds past [`Self::FREE`];
    /// false (the event must go) when the budget cannot hold it.
    fn charge(&mut self, more: usize) -> bool {
        let held = self.line.len() + self.data.len() + more;
        let owed = held.saturating_sub(Self::FREE);
        if owed <= self.lease.bytes() {
            return true;
        }
        if self.lease.grow(owed - self.lease.bytes()) {
            return true;
        }
        self.over_budget += 1;
        self.budget_failed = true;
        super::count_over_budget();
        false
    }

    /// `chunk` without the part of a leading [`BOM`] it holds. Bytes held
    /// back as its start that turn out not to be one go to the line.
    fn skip_bom<'a>(&mut self, mut chunk: &'a [u8]) -> &'a [u8] {
        while let Some(n) = self.bom {
            let Some(&b) = chunk.first() else {
                break;
            };
            if b == BOM[n] {
                chunk = &chunk[1..];
                self.bom = (n + 1 < BOM.len()).then_some(n + 1);
            } else {
                self.bom = None;
                self.push_line_bytes(&BOM[..n]);
            }
        }
        chunk
    }

    /// Feeds bytes; calls `on_event` for each complete event.
    pub fn feed(&mut self, chunk: &[u8], on_event: &mut dyn FnMut(Event)) {
        let mut chunk = self.skip_bom(chunk);
        while !chunk.is_empty() {
            if self.last_was_cr && chunk[0] == b'\n' {
                // The LF of a CRLF split across chunks.
                chunk = &chunk[1..];
                self.last_was_cr = false;
                continue;
            }
            self.last_was_cr = false;
            match chunk.iter().position(|b| *b == b'\n' || *b == b'\r') {
                Some(i) => {
                    self.push_line_bytes(&chunk[..i]);
                    let cr = chunk[i] == b'\r';
                    chunk = &chunk[i + 1..];
                    if cr {
                        if chunk.first() == Some(&b'\n') {
                            chunk = &chunk[1..];
                        } else if chunk.is_empty() {
                            self.last_was_cr = true;
                        }
                    }
                    self.end_line(on_event);
                }
                None => {
                    self.push_line_bytes(chunk);
                    chunk = &[];
                }
            }
        }
    }

    /// Dispatches a final event that was not followed by a blank line.
    pub fn finish(&mut self, on_event: &mut dyn FnMut(Event)) {
        if let Some(n) = self.bom.take() {
            // The stream ended inside what could have been a mark.
            self.push_line_bytes(&BOM[..n]);
        }
        if self.skipping {
            // The stream ended inside an over-long line: the event goes.
            self.skipping = false;
            self.drop_event();
        } else if !self.line.is_empty() {
            self.end_line(on_event);
        }
        self.dispatch(on_event);
    }

    fn push_line_bytes(&mut self, b: &[u8]) {
        if self.skipping {
            return;
        }
        if self.dropped {
            // The rest of a dropped event is not kept (nor charged): only
            // whether a line is blank, which ends the event, matters.
            self.dropped_line |= !b.is_empty();
            return;
        }
        if self.line.len() + b.len() > self.limit || !self.charge(b.len()) {
            self.skipping = true;
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(b);
    }

    fn end_line(&mut self, on_event: &mut dyn FnMut(Event)) {
        if self.skipping {
            self.skipping = false;
            self.drop_event();
            return;
        }
        if self.dropped {
            if !std::mem::take(&mut self.dropped_line) {
                // The blank line: the dropped event is over.
                self.dropped = false;
            }
            return;
        }
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &b""[..]),
        };
        match field {
            b"data" => {
                // (The line it comes from is still charged: it goes next.)
                if self.data.len() + value.len() + 1 > self.limit || !self.charge(value.len() + 1) {
                    self.drop_event();
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }

    /// Drops the current event, counted (as oversized, unless the budget
    /// dropped it), and ignores the rest of it.
    fn drop_event(&mut self) {
        if !self.dropped && !std::mem::take(&mut self.budget_failed) {
            self.oversized += 1;
        }
        self.dropped = true;
        self.clear_event();
    }

    fn clear_event(&mut self) {
        self.event = None;
        self.has_data = false;
        self.lease.release();
        // A large event's buffer is not kept for the rest of the stream
        // (what it held past FREE was charged; its memory goes with it).
        if self.data.capacity() > Self::FREE {
            self.data = Vec::new();
        } else {
            self.data.clear();
        }
    }

    fn dispatch(&mut self, on_event: &mut dyn FnMut(Event)) {
        if self.has_data && !self.dropped {
            let data = String::from_utf8_lossy(&self.data).into_owned();
            on_event(Event {
                event: self.event.take(),
                data,
            });
        }
        self.dropped = false;
        self.dropped_line = false;
        self.clear_event();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An event past [`SseReader::FREE`] takes its bytes from the budget
    /// while it is read and gives them back once dispatched; one the
    /// budget cannot hold is dropped, counted, and the stream goes on.
    #[test]
    fn large_events_are_held_against_the_response_budget() {
        let budget = BodyBudget::new(256 << 10);
        let mut r = SseReader::within(16 << 20, &budget);
        let mut got = Vec::new();
        let event = |n: usize| format!("data: {}\n\n", "x".repeat(n)).into_bytes();
        // Small: nothing taken.
        r.feed(&event(100), &mut |e| got.push(e.data.len()));
        assert_eq!(budget.used(), 0);
        // 200 KiB, in pieces: taken while read, given back when dispatched.
        let big = event(200 << 10);
        r.feed(&big[..150 << 10], &mut |e| got.push(e.data.len()));
        assert!(budget.used() > 0, "held while read");
        r.feed(&big[150 << 10..], &mut |e| got.push(e.data.len()));
        assert_eq!(budget.used(), 0, "given back");
        // Another reader holds most of the budget: a large event is dropped
        // (counted once, for the budget), and the rest of it, a second
        // large line, is neither kept nor charged while it streams.
        let mut other = budget.lease();
        assert!(other.grow(200 << 10));
        let line = format!("data: {}\n", "y".repeat(200 << 10));
        r.feed(line.as_bytes(), &mut |e| got.push(e.data.len()));
        assert_eq!(budget.used(), 200 << 10, "nothing kept for it");
        r.feed(line.as_bytes(), &mut |e| got.push(e.data.len()));
        assert_eq!(budget.used(), 200 << 10, "nor for the rest of it");
        r.feed(b"\n", &mut |e| got.push(e.data.len()));
        assert_eq!((r.over_budget, r.oversized), (1, 0));
        // ...and the stream goes on.
        r.feed(&event(10), &mut |e| got.push(e.data.len()));
        r.finish(&mut |e| got.push(e.data.len()));
        assert_eq!(got, [100, 200 << 10, 10]);
        other.release();
        assert_eq!(budget.used(), 0);
    }

    fn all(input: &[u8], splits: &[usize]) -> Vec<Event> {
        let mut r = SseReader::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &s in splits {
            let s = s.min(input.len()).max(last);
            r.feed(&input[last..s], &mut |e| out.push(e));
            last = s;
        }
        r.feed(&input[last..], &mut |e| out.push(e));
        r.finish(&mut |e| out.push(e));
        out
    }

    const SAMPLE: &[u8] = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: comment\n\ndata: x\ndata: y\n\nid: 3\ndata:[DONE]\n\n";

    #[test]
    fn parses_events() {
        let ev = all(SAMPLE, &[]);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].event.as_deref(), Some("message_start"));
        assert_eq!(ev[0].data, "{\"a\":1}");
        assert_eq!(ev[1].data, "x\ny");
        assert_eq!(ev[2].data, "[DONE]");
    }

    /// The SSE spec strips one UTF-8 byte order mark at the start of the
    /// stream: it is no part of the first field's name (the first event,
    /// Anthropic's `message_start` with the input counts, was lost), also
    /// when it arrives split across reads. Only one, and only there.
    #[test]
    fn a_leading_byte_order_mark_is_skipped() {
        let input = b"\xEF\xBB\xBFdata: {\"type\":\"message_start\"}\n\nevent: x\ndata: 2\n\n";
        let want = vec![
            Event {
                event: None,
                data: "{\"type\":\"message_start\"}".into(),
            },
            Event {
                event: Some("x".into()),
                data: "2".into(),
            },
        ];
        assert_eq!(all(input, &[]), want);
        for at in 0..input.len() {
            assert_eq!(all(input, &[at]), want, "split at {at}");
        }
        assert_eq!(all(input, &[1, 2]), want);
        // A second mark, a broken one, or one later is kept as it came.
        for input in [
            &b"\xEF\xBB\xBF\xEF\xBB\xBFdata: 1\n\n"[..],
            b"\xEF\xBBdata: 1\n\n",
            b"\xEFdata: 1\n\n",
        ] {
            for at in 0..input.len() {
                assert_eq!(all(input, &[at]), [], "{input:?} split at {at}");
            }
        }
        let later = all(b"data: 1\n\n\xEF\xBB\xBFdata: 2\n\n", &[]);
        assert_eq!(later.len(), 1);
        // A stream of a partial mark alone ends with nothing.
        assert_eq!(all(b"\xEF\xBB", &[1]), []);
    }

    #[test]
    fn oversized_event_is_dropped_not_kept() {
        let mut r = SseReader::new(16);
        let mut out = Vec::new();
        r.feed(
            b"data: 0123456789012345678901234\n\ndata: ok\n\n",
            &mut |e| out.push(e),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, "ok");
        assert_eq!(r.oversized, 1);
    }

    #[test]
    fn no_part_of_a_dropped_event_is_taken_for_the_whole() {
        // An over-long line, then more lines of the same event: none of it
        // is dispatched, at the blank line nor at the end of the stream
        // (also one that ends inside the over-long line); the other event is.
        for input in [
            &b"data: 0123456789012345678901234\ndata: tail\n\ndata: ok\n\n"[..],
            b"data: 0123456\ndata: 0123456789\ndata: tail\n\ndata: ok\n\n",
            b"data: ok\n\ndata: 0123456789012345678901234\ndata: tail",
            b"data: ok\n\ndata: head\ndata: 0123456789012345678901234",
        ] {
            for piece in [3, input.len()] {
                let mut r = SseReader::new(16);
                let mut out = Vec::new();
                for b in input.chunks(piece) {
                    r.feed(b, &mut |e| out.push(e));
                }
                r.finish(&mut |e| out.push(e));
                let data: Vec<&str> = out.iter().map(|e| e.data.as_str()).collect();
                assert_eq!(data, ["ok"], "{:?}", String::from_utf8_lossy(input));
                assert_eq!(r.oversized, 1);
            }
        }
    }

    #[test]
    fn a_large_event_buffer_is_not_kept() {
        let mut r = SseReader::new(4 << 20);
        let big = format!("data: {}\n\n", "x".repeat(3 << 20));
        let mut n = 0;
        r.feed(big.as_bytes(), &mut |_| n += 1);
        assert_eq!(n, 1);
        assert!(r.data.capacity() <= 1 << 20, "{}", r.data.capacity());
    }

    proptest! {
        #[test]
        fn any_split_gives_same_events(mut splits in proptest::collection::vec(0usize..SAMPLE.len(), 0..8)) {
            splits.sort();
            prop_assert_eq!(all(SAMPLE, &splits), all(SAMPLE, &[]));
        }
    }
}
