//! The AWS event stream framing (`application/vnd.amazon.eventstream`),
//! as Bedrock's streaming operations send it: an incremental decoder that
//! verifies both CRCs, and an encoder for tests and the fake provider.
//!
//! A frame is: total length (u32 BE), headers length (u32 BE), CRC32 of
//! those 8 bytes, headers, payload, CRC32 of everything before it.
//!
//! Owns: framing only; what a frame means is the adapter's business.
//! Must never: panic on any input, or buffer more than one frame (bounded),
//! or hold more than [`Decoder::FREE`] of a frame outside the response
//! budget: a larger frame takes the rest from `proxy.max_buffered_response_bytes`,
//! and one the budget cannot hold is passed over unread (counted), as an
//! SSE event is.

use std::sync::Arc;

use crate::budget::{BodyBudget, BodyLease};

/// Bytes of the prelude: two lengths and their CRC.
const PRELUDE: usize = 12;
/// Smallest frame: prelude plus the message CRC.
const MIN_FRAME: usize = PRELUDE + 4;

/// Why a stream could not be decoded. Decoding stops at the first error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("event stream prelude CRC mismatch")]
    PreludeCrc,
    #[error("event stream message CRC mismatch")]
    MessageCrc,
    #[error("event stream frame of {0} bytes is outside the allowed size")]
    FrameSize(u32),
    #[error("event stream headers length {0} does not fit its frame")]
    HeadersLength(u32),
    #[error("event stream header block is malformed")]
    Headers,
    #[error("event stream ended inside a frame")]
    Truncated,
}

/// A header value, by wire type (0 to 9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Bool(bool),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Bytes(Vec<u8>),
    String(String),
    Timestamp(i64),
    Uuid([u8; 16]),
}

/// One decoded, CRC-verified frame.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub headers: Vec<(String, HeaderValue)>,
    pub payload: Vec<u8>,
}

impl Message {
    /// The value of a string header (`:event-type`, `:message-type`, ...).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|(n, v)| match v {
            HeaderValue::String(s) if n == name => Some(s.as_str()),
            _ => None,
        })
    }
}

/// Incremental decoder: feed bytes cut anywhere, get whole frames.
pub struct Decoder {
    /// The current frame so far (never more than one frame).
    buf: Vec<u8>,
    /// Total length of the current frame, once its prelude is checked.
    frame_len: Option<usize>,
    max_frame: usize,
    error: Option<DecodeError>,
    /// What the current frame holds past [`Self::FREE`].
    lease: BodyLease,
    /// Bytes still to pass over of a frame the budget could not hold.
    skip: usize,
    /// Frames passed over because the response budget was held.
    pub over_budget: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_FRAME)
    }
}

impl Decoder {
    /// Frames larger than this are refused (Bedrock's are a few KiB).
    pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

    /// What a frame may hold without the response budget.
    pub const FREE: usize = 64 << 10;

    pub fn new(max_frame: usize) -> Self {
        Self::within(max_frame, super::response_budget())
    }

    /// As [`Decoder::new`], holding what a frame has past [`Self::FREE`]
    /// against `budget`.
    pub fn within(max_frame: usize, budget: &Arc<BodyBudget>) -> Self {
        Decoder {
            buf: Vec::new(),
            frame_len: None,
            max_frame,
            error: None,
            lease: budget.lease(),
            skip: 0,
            over_budget: 0,
        }
    }

    /// The error that stopped decoding, if any.
    pub fn error(&self) -> Option<&DecodeError> {
        self.error.as_ref()
    }

    /// Feeds bytes; calls `on_message` for each complete, verified frame.
    /// After an error, further input is ignored.
    pub fn feed(&mut self, mut chunk: &[u8], on_message: &mut dyn FnMut(Message)) {
        while !chunk.is_empty() && self.error.is_none() {
            if self.skip > 0 {
                let n = self.skip.min(chunk.len());
                self.skip -= n;
                chunk = &chunk[n..];
                continue;
            }
            let want = self.frame_len.unwrap_or(PRELUDE);
            let need = want - self.buf.len();
            let take = need.min(chunk.len());
            if self.buf.capacity() - self.buf.len() < take {
                // Grows with what arrives, never past the frame: a prelude
                // alone does not get its claimed length (up to 16 MiB).
                let step = need.min(self.buf.len().max(64 << 10)).max(take);
                self.buf.reserve_exact(step);
            }
            self.buf.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.buf.len() < want {
                return;
            }
            if self.frame_len.is_none() {
                match self.check_prelude() {
                    Ok(len) if self.lease.grow(len.saturating_sub(Self::FREE)) => {
                        self.frame_len = Some(len)
                    }
                    Ok(len) => {
                        // Its prelude was checked: the next frame starts
                        // `len` bytes from this one's start.
                        self.skip = len - PRELUDE;
                        self.buf = Vec::new();
                        self.over_budget += 1;
                        super::count_over_budget();
                    }
                    Err(e) => self.fail(e),
                }
                continue;
            }
            let frame = std::mem::take(&mut self.buf);
            self.frame_len = None;
            self.lease.release();
            match decode_frame(&frame) {
                Ok(m) => on_message(m),
                Err(e) => self.fail(e),
            }
        }
    }

    /// Ends the stream: an unfinished frame is [`DecodeError::Truncated`].
    pub fn finish(&mut self) -> Result<(), DecodeError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if !self.buf.is_empty() || self.skip > 0 {
            self.fail(DecodeError::Truncated);
            return Err(DecodeError::Truncated);
        }
        Ok(())
    }

    fn fail(&mut self, e: DecodeError) {
        self.error = Some(e);
        self.buf = Vec::new();
        self.frame_len = None;
        self.skip = 0;
        self.lease.release();
    }

    /// Checks the 12-byte prelude in `buf`; returns the frame length.
    fn check_prelude(&self) -> Result<usize, DecodeError> {
        let p = &self.buf;
        let total = be32(&p[0..4]);
        let headers = be32(&p[4..8]);
        if crc32fast::hash(&p[0..8]) != be32(&p[8..12]) {
            return Err(DecodeError::PreludeCrc);
        }
        let len = total as usize;
        if len < MIN_FRAME || len > self.max_frame {
            return Err(DecodeError::FrameSize(total));
        }
        if headers as usize > len - MIN_FRAME {
            return Err(DecodeError::HeadersLength(headers));
        }
        Ok(len)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Decodes one whole frame whose prelude was already checked.
fn decode_frame(f: &[u8]) -> Result<Message, DecodeError> {
    let crc_at = f.len() - 4;
    if crc32fast::hash(&f[..crc_at]) != be32(&f[crc_at..]) {
        return Err(DecodeError::MessageCrc);
    }
    let headers_len = be32(&f[4..8]) as usize;
    let headers = parse_headers(&f[PRELUDE..PRELUDE + headers_len])?;
    Ok(Message {
        headers,
        payload: f[PRELUDE + headers_len..crc_at].to_vec(),
    })
}

fn parse_headers(mut b: &[u8]) -> Result<Vec<(String, HeaderValue)>, DecodeError> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
        if b.len() < n {
            return Err(DecodeError::Headers);
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn fixed<const N: usize>(b: &mut &[u8]) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(take(b, N)?);
        Ok(out)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let name_len = take(&mut b, 1)?[0] as usize;
        let name = String::from_utf8_lossy(take(&mut b, name_len)?).into_owned();
        let value = match take(&mut b, 1)?[0] {
            0 => HeaderValue::Bool(true),
            1 => HeaderValue::Bool(false),
            2 => HeaderValue::Byte(i8::from_be_bytes(fixed(&mut b)?)),
            3 => HeaderValue::Short(i16::from_be_bytes(fixed(&mut b)?)),
            4 => HeaderValue::Int(i32::from_be_bytes(fixed(&mut b)?)),
            5 => HeaderValue::Long(i64::from_be_bytes(fixed(&mut b)?)),
            t @ (6 | 7) => {
                let len = u16::from_be_bytes(fixed(&mut b)?) as usize;
                let v = take(&mut b, len)?;
                if t == 6 {
                    HeaderValue::Bytes(v.to_vec())
                } else {
                    HeaderValue::String(String::from_utf8_lossy(v).into_owned())
                }
            }
            8 => HeaderValue::Timestamp(i64::from_be_bytes(fixed(&mut b)?)),
            9 => HeaderValue::Uuid(fixed(&mut b)?),
            // An unknown type has an unknown size: nothing after it can be
            // read reliably.
            _ => return Err(DecodeError::Headers),
        };
        out.push((name, value));
    }
    Ok(out)
}

/// Encodes one frame with string headers (type 7), as Bedrock sends them.
///
/// # Panics
/// When a header name exceeds 255 bytes or a value 65535 bytes (the wire
/// format cannot carry them); this is for tests and the fake provider.
pub fn encode_frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let typed: Vec<(&str, HeaderValue)> = headers
        .iter()
        .map(|(n, v)| (*n, HeaderValue::String((*v).to_owned())))
        .collect();
    encode_frame_typed(&typed, payload)
}

/// Encodes one frame with headers of any type. Panics as [`encode_frame`].
pub fn encode_frame_typed(headers: &[(&str, HeaderValue)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        let n = u8::try_from(name.len()).expect("event stream header name over 255 bytes");
        h.push(n);
        h.extend_from_slice(name.as_bytes());
        let var = |h: &mut Vec<u8>, t: u8, v: &[u8]| {
            let len = u16::try_from(v.len()).expect("event stream header value over 65535 bytes");
            h.push(t);
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(v);
        };
        match value {
            HeaderValue::Bool(true) => h.push(0),
            HeaderValue::Bool(false) => h.push(1),
            HeaderValue::Byte(v) => {
                h.push(2);
                h.extend_from_slice(&v.to_be_bytes());
            }
            HeaderValue::Short(v) => {
                h.push(3);
                h.extend_from_slice(&v.to_be_bytes());
            }
            HeaderValue::Int(v) => {
                h.push(4);
                h.extend_from_slice(&v.to_be_bytes());
            }
            HeaderValue::Long(v) => {
                h.push(5);
                h.extend_from_slice(&v.to_be_bytes());
            }
            HeaderValue::Bytes(v) => var(&mut h, 6, v),
            HeaderValue::String(v) => var(&mut h, 7, v.as_bytes()),
            HeaderValue::Timestamp(v) => {
                h.push(8);
                h.extend_from_slice(&v.to_be_bytes());
            }
            HeaderValue::Uuid(v) => {
                h.push(9);
                h.extend_from_slice(v);
            }
        }
    }
    let total = MIN_FRAME + h.len() + payload.len();
    let total32 = u32::try_from(total).expect("event stream frame over 4 GiB");
    let mut f = Vec::with_capacity(total);
    f.extend_from_slice(&total32.to_be_bytes());
    f.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&f);
    f.extend_from_slice(&prelude_crc.to_be_bytes());
    f.extend_from_slice(&h);
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_be_bytes());
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(input: &[u8], splits: &[usize]) -> (Vec<Message>, Result<(), DecodeError>) {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &s in splits {
            let s = s.clamp(last, input.len());
            d.feed(&input[last..s], &mut |m| out.push(m));
            last = s;
        }
        d.feed(&input[last..], &mut |m| out.push(m));
        let r = d.finish();
        (out, r)
    }

    fn sample() -> Vec<u8> {
        let mut s = encode_frame(
            &[
                (":event-type", "contentBlockDelta"),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            br#"{"contentBlockIndex":0,"delta":{"text":"Hi"}}"#,
        );
        s.extend(encode_frame(&[(":message-type", "event")], b""));
        s.extend(encode_frame(
            &[(":event-type", "metadata"), (":message-type", "event")],
            br#"{"usage":{"inputTokens":3,"outputTokens":1}}"#,
        ));
        s
    }

    #[test]
    fn known_vector_decodes() {
        // The frame from the AWS event stream specification's test suite
        // ("int32_header"): header `event-type` of type 4 = 0x0000A00C,
        // payload `{'foo':'bar'}`.
        let frame: &[u8] = &[
            0x00, 0x00, 0x00, 0x2d, 0x00, 0x00, 0x00, 0x10, 0x41, 0xc4, 0x24, 0xb8, 0x0a, 0x65,
            0x76, 0x65, 0x6e, 0x74, 0x2d, 0x74, 0x79, 0x70, 0x65, 0x04, 0x00, 0x00, 0xa0, 0x0c,
            0x7b, 0x27, 0x66, 0x6f, 0x6f, 0x27, 0x3a, 0x27, 0x62, 0x61, 0x72, 0x27, 0x7d, 0x36,
            0xf4, 0x80, 0xa0,
        ];
        let (msgs, r) = decode(frame, &[]);
        assert_eq!(r, Ok(()));
        assert_eq!(
            msgs,
            vec![Message {
                headers: vec![("event-type".into(), HeaderValue::Int(0xa00c))],
                payload: b"{'foo':'bar'}".to_vec(),
            }]
        );
        assert_eq!(
            encode_frame_typed(
                &[("event-type", HeaderValue::Int(0xa00c))],
                b"{'foo':'bar'}"
            ),
            frame
        );
    }

    #[test]
    fn round_trip_every_header_type() {
        let headers = vec![
            ("t", HeaderValue::Bool(true)),
            ("f", HeaderValue::Bool(false)),
            ("b", HeaderValue::Byte(-3)),
            ("s", HeaderValue::Short(-300)),
            ("i", HeaderValue::Int(70000)),
            ("l", HeaderValue::Long(-1 << 40)),
            ("by", HeaderValue::Bytes(vec![0, 1, 255])),
            (":event-type", HeaderValue::String("metadata".into())),
            ("ts", HeaderValue::Timestamp(1_700_000_000_000)),
            ("u", HeaderValue::Uuid([7; 16])),
        ];
        let frame = encode_frame_typed(&headers, b"payload");
        let (msgs, r) = decode(&frame, &[]);
        assert_eq!(r, Ok(()));
        assert_eq!(msgs.len(), 1);
        let m = &msgs[0];
        assert_eq!(m.payload, b"payload");
        assert_eq!(m.header_str(":event-type"), Some("metadata"));
        let expect: Vec<(String, HeaderValue)> = headers
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect();
        assert_eq!(m.headers, expect);
    }

    #[test]
    fn every_byte_boundary_gives_same_frames() {
        let s = sample();
        let (whole, r) = decode(&s, &[]);
        assert_eq!((whole.len(), r), (3, Ok(())));
        for i in 0..=s.len() {
            assert_eq!(decode(&s, &[i]), (whole.clone(), Ok(())), "split at {i}");
        }
        // One byte at a time.
        let all: Vec<usize> = (0..=s.len()).collect();
        assert_eq!(decode(&s, &all), (whole, Ok(())));
    }

    #[test]
    fn corrupt_prelude_crc_stops_decoding() {
        let mut s = sample();
        s[8] ^= 1;
        let (msgs, r) = decode(&s, &[]);
        assert!(msgs.is_empty());
        assert_eq!(r, Err(DecodeError::PreludeCrc));
    }

    #[test]
    fn corrupt_message_crc_stops_decoding() {
        let mut s = sample();
        let first = be32(&s[0..4]) as usize;
        // Flip a payload byte of the second frame: the first still decodes.
        s[first + PRELUDE + 2] ^= 0x20;
        let (msgs, r) = decode(&s, &[]);
        assert_eq!(msgs.len(), 1);
        assert_eq!(r, Err(DecodeError::MessageCrc));
    }

    #[test]
    fn truncated_frame_is_reported() {
        let s = sample();
        let (msgs, r) = decode(&s[..s.len() - 1], &[]);
        assert_eq!(msgs.len(), 2);
        assert_eq!(r, Err(DecodeError::Truncated));
    }

    /// A frame past `Decoder::FREE` takes the rest from the response
    /// budget while it is read, and gives it back once decoded; one the
    /// budget cannot hold is passed over, counted, and the next frame is
    /// read.
    #[test]
    fn a_large_frame_is_held_against_the_budget_or_passed_over() {
        let big = encode_frame(&[(":event-type", "chunk")], &vec![b'x'; 200 << 10]);
        let small = encode_frame(&[(":event-type", "metadata")], b"{}");
        let stream = [big.clone(), small.clone(), big, small].concat();
        for (budget, decoded, passed_over) in [(1 << 20, 4, 0), (100 << 10, 2, 2)] {
            let budget = BodyBudget::new(budget);
            let mut d = Decoder::within(Decoder::DEFAULT_MAX_FRAME, &budget);
            let mut got = Vec::new();
            // Cut anywhere: in 1000-byte pieces.
            for piece in stream.chunks(1000) {
                d.feed(piece, &mut |m| {
                    got.push(m.payload.len());
                    assert!(budget.used() <= (200 << 10), "more than one frame held");
                });
            }
            assert_eq!(d.finish(), Ok(()));
            assert_eq!(got.len(), decoded, "{got:?}");
            assert_eq!(d.over_budget, passed_over);
            assert!(got.contains(&2), "the small frames are read");
            assert_eq!(budget.used(), 0, "given back");
        }
        // A stream that ends inside a frame passed over is truncated.
        let budget = BodyBudget::new(0);
        let mut d = Decoder::within(Decoder::DEFAULT_MAX_FRAME, &budget);
        let big = encode_frame(&[(":event-type", "chunk")], &vec![b'x'; 200 << 10]);
        d.feed(&big[..big.len() - 1], &mut |_| panic!("passed over"));
        assert_eq!(d.finish(), Err(DecodeError::Truncated));
    }

    /// A prelude (with a valid CRC) claiming `total` bytes of frame and
    /// `headers` bytes of headers.
    fn prelude(total: u32, headers: u32) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&headers.to_be_bytes());
        let crc = crc32fast::hash(&p);
        p.extend_from_slice(&crc.to_be_bytes());
        p
    }

    #[test]
    fn oversized_and_undersized_lengths_are_refused_before_buffering() {
        for total in [u32::MAX, (16 << 20) + 1, 15, 0] {
            let p = prelude(total, 0);
            let mut d = Decoder::default();
            d.feed(&p, &mut |_| panic!("no frame expected"));
            assert_eq!(d.error(), Some(&DecodeError::FrameSize(total)));
            assert!(d.buf.capacity() < 1024, "buffered for a refused frame");
        }
        // Headers longer than the frame.
        let (_, r) = decode(&prelude(16, 1), &[]);
        assert_eq!(r, Err(DecodeError::HeadersLength(1)));
    }

    #[test]
    fn a_large_frame_is_buffered_as_it_arrives_not_as_its_prelude_claims() {
        let total = 16u32 << 20;
        let p = prelude(total, 0);
        let mut d = Decoder::default();
        d.feed(&p, &mut |_| panic!("no frame yet"));
        assert_eq!(d.error(), None);
        assert!(d.buf.capacity() <= 128 << 10, "{}", d.buf.capacity());
        // 1 MiB of it: the buffer grows with the data, not past the frame.
        for _ in 0..64 {
            d.feed(&[7u8; 16 << 10], &mut |_| panic!("no frame yet"));
        }
        assert!(d.buf.capacity() <= 4 << 20, "{}", d.buf.capacity());
        while d.buf.len() < total as usize - 4 {
            let n = (total as usize - 4 - d.buf.len()).min(1 << 20);
            d.feed(&vec![7u8; n], &mut |_| panic!("no frame yet"));
        }
        assert!(d.buf.capacity() <= total as usize, "{}", d.buf.capacity());
        // One chunk larger than what is reserved: still not past the frame.
        let mut d = Decoder::default();
        d.feed(&p, &mut |_| panic!("no frame yet"));
        d.feed(&vec![7u8; (total as usize) - 16], &mut |_| {
            panic!("no frame yet")
        });
        assert!(d.buf.capacity() <= total as usize, "{}", d.buf.capacity());
    }

    #[test]
    fn unknown_header_type_is_an_error() {
        let mut f = encode_frame(&[("a", "b")], b"x");
        // Header type byte sits after the name length (1) and name (1).
        f[PRELUDE + 2] = 10;
        // Re-seal the message CRC so only the header is wrong.
        let at = f.len() - 4;
        let crc = crc32fast::hash(&f[..at]);
        f[at..].copy_from_slice(&crc.to_be_bytes());
        let (msgs, r) = decode(&f, &[]);
        assert!(msgs.is_empty());
        assert_eq!(r, Err(DecodeError::Headers));
    }

    proptest! {
        #[test]
        fn any_split_gives_same_frames(mut splits in proptest::collection::vec(0usize..400, 0..12)) {
            let s = sample();
            splits.sort();
            prop_assert_eq!(decode(&s, &splits), decode(&s, &[]));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), mut splits in proptest::collection::vec(0usize..512, 0..6)) {
            splits.sort();
            let _ = decode(&bytes, &splits);
        }

        #[test]
        fn flipped_bits_never_panic_or_pass_silently(at in 0usize..200, bit in 0u8..8) {
            let mut s = sample();
            let at = at % s.len();
            s[at] ^= 1 << bit;
            let (msgs, r) = decode(&s, &[]);
            // A single bit flip is always caught by one of the CRCs.
            prop_assert!(r.is_err());
            prop_assert!(msgs.len() < 3);
        }
    }
}
