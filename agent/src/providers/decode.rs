//! Content-Encoding for accounting only: a parser wrapper that decodes
//! gzip, deflate, br and zstd response bodies before the adapter sees them.
//! The client still receives the bytes the provider sent.
//!
//! Must never: grow without bound (decoded bytes go to the parser as the
//! decoder writes them, a piece at a time, never gathered per chunk; a
//! decompression bomb stops feeding the parser at [`MAX_DECODED`]; the
//! record then has what the parser read from the bytes before it, which
//! for a usage at the end is none, and says so).

use std::io::Write;

use super::{ParsedUsage, UsageParser};

/// Decoded bytes handed to a parser at most.
pub const MAX_DECODED: usize = 256 << 20;

/// The largest zstd window read: 8 MiB, as RFC 9659 sets for HTTP.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// The decoder's output: fed to the parser as it is written, until the
/// bound.
struct Feed {
    inner: Box<dyn UsageParser>,
    total: usize,
}

impl Feed {
    fn new(inner: Box<dyn UsageParser>) -> Feed {
        Feed { inner, total: 0 }
    }
}

impl Write for Feed {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.total += b.len();
        if self.total > MAX_DECODED {
            return Err(std::io::Error::other("decoded body over the bound"));
        }
        self.inner.feed(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Feed>),
    Deflate(flate2::write::ZlibDecoder<Feed>),
    RawDeflate(flate2::write::DeflateDecoder<Feed>),
    Br(Box<brotli_decompressor::DecompressorWriter<Feed>>),
    Zstd(zstd::stream::write::Decoder<'static, Feed>),
}

impl Decoder {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Decoder::Gzip(d) => d,
            Decoder::Deflate(d) => d,
            Decoder::RawDeflate(d) => d,
            Decoder::Br(d) => d.as_mut(),
            Decoder::Zstd(d) => d,
        }
    }
    fn out_ref(&self) -> &Feed {
        match self {
            Decoder::Gzip(d) => d.get_ref(),
            Decoder::Deflate(d) => d.get_ref(),
            Decoder::RawDeflate(d) => d.get_ref(),
            Decoder::Br(d) => d.get_ref(),
            Decoder::Zstd(d) => d.get_ref(),
        }
    }
    fn out(&mut self) -> &mut Feed {
        match self {
            Decoder::Gzip(d) => d.get_mut(),
            Decoder::Deflate(d) => d.get_mut(),
            Decoder::RawDeflate(d) => d.get_mut(),
            Decoder::Br(d) => d.get_mut(),
            Decoder::Zstd(d) => d.get_mut(),
        }
    }
}

/// Wraps `inner` so it is fed decoded bytes. Returns `inner` unchanged for
/// identity (or absent) encodings, and a parser that finds nothing for an
/// encoding it does not know.
pub fn decoding(encoding: Option<&str>, inner: Box<dyn UsageParser>) -> Box<dyn UsageParser> {
    let enc = encoding.unwrap_or("").trim().to_ascii_lowercase();
    let dec = match enc.as_str() {
        "" | "identity" => return inner,
        // HTTP "deflate" is zlib; some servers send raw deflate. The first
        // two bytes tell (see `is_zlib_header`).
        "deflate" => {
            return Box::new(Decoding {
                dec: None,
                pending_deflate: Some(inner),
                failed: false,
            });
        }
        "gzip" | "x-gzip" => Decoder::Gzip(flate2::write::MultiGzDecoder::new(Feed::new(inner))),
        "br" => Decoder::Br(Box::new(brotli_decompressor::DecompressorWriter::new(
            Feed::new(inner),
            4096,
        ))),
        // A frame may ask for a window of up to 2 GiB, which the decoder
        // then holds for the whole response: HTTP's zstd allows 8 MiB
        // (RFC 9659), and a frame asking more is not read.
        "zstd" => match zstd::stream::write::Decoder::new(Feed::new(inner)) {
            Ok(mut d) => match d.window_log_max(ZSTD_WINDOW_LOG_MAX) {
                Ok(()) => Decoder::Zstd(d),
                Err(_) => return Box::new(Nothing),
            },
            Err(_) => return Box::new(Nothing),
        },
        _ => return Box::new(Nothing),
    };
    Box::new(Decoding {
        dec: Some(dec),
        pending_deflate: None,
        failed: false,
    })
}

/// A whole request body in `encoding`, decoded, for reading (the model,
/// the usage request, a local estimate): `None` for an encoding the agent
/// does not read (a list of them too), a corrupt body, or one that decodes
/// to more than `limit` bytes.
pub fn decode_whole(encoding: &str, body: &[u8], limit: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let enc = encoding.trim().to_ascii_lowercase();
    let reader: Box<dyn Read + '_> = match enc.as_str() {
        "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(body)),
        "deflate" if !body.is_empty() && is_zlib_header(body) => {
            Box::new(flate2::read::ZlibDecoder::new(body))
        }
        "deflate" => Box::new(flate2::read::DeflateDecoder::new(body)),
        "br" => Box::new(brotli_decompressor::Decompressor::new(body, 4096)),
        "zstd" => {
            let mut d = zstd::stream::read::Decoder::new(body).ok()?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX).ok()?;
            Box::new(d)
        }
        _ => return None,
    };
    let mut out = Vec::new();
    reader.take(limit as u64 + 1).read_to_end(&mut out).ok()?;
    (out.len() <= limit).then_some(out)
}

/// A zlib header (RFC 1950): CM = 8 in the first byte's low nibble, a
/// window of at most 32 KiB, and the first two bytes, read as a big-endian
/// number, a multiple of 31. A raw deflate stream rarely passes all three
/// (one of its first byte's low nibble 8 alone is common). With a single
/// byte in hand, the first two tests decide.
fn is_zlib_header(b: &[u8]) -> bool {
    let cm_cinfo = b[0] & 0x0f == 8 && b[0] >> 4 <= 7;
    match b.get(1) {
        Some(flg) => cm_cinfo && (u16::from(b[0]) << 8 | u16::from(*flg)) % 31 == 0,
        None => cm_cinfo,
    }
}

struct Nothing;

impl UsageParser for Nothing {
    fn feed(&mut self, _: &[u8]) {}
    fn finish(&mut self) -> ParsedUsage {
        ParsedUsage {
            undecodable: true,
            ..ParsedUsage::default()
        }
    }
}

/// The record's `error` when the body could not be decoded (an encoding
/// the agent does not read, or a corrupt or over-long compressed body; a
/// cut one is read as far as it goes) and no usage was read from what did
/// decode. Why the request ended (a client that left) comes first.
pub const UNDECODABLE: &str = "content_decoding_failed";

struct Decoding {
    dec: Option<Decoder>,
    /// "deflate" before its first byte: the parser, until it is known
    /// whether zlib or raw deflate comes.
    pending_deflate: Option<Box<dyn UsageParser>>,
    failed: bool,
}

impl UsageParser for Decoding {
    fn feed(&mut self, chunk: &[u8]) {
        if self.failed || chunk.is_empty() {
            return;
        }
        if let Some(inner) = self.pending_deflate.take() {
            let out = Feed::new(inner);
            self.dec = Some(if is_zlib_header(chunk) {
                Decoder::Deflate(flate2::write::ZlibDecoder::new(out))
            } else {
                Decoder::RawDeflate(flate2::write::DeflateDecoder::new(out))
            });
        }
        let Some(d) = self.dec.as_mut() else { return };
        if d.writer().write_all(chunk).is_err() || d.writer().flush().is_err() {
            self.failed = true;
        }
    }

    /// What the parser read from the bytes that decoded, also when the
    /// rest did not (a cut or corrupt stream, or one over the bound): the
    /// usage in it is the provider's all the same.
    fn finish(&mut self) -> ParsedUsage {
        if let Some(d) = self.dec.as_mut()
            && !self.failed
        {
            let _ = d.writer().flush();
        }
        let mut parsed = match (self.dec.as_mut(), self.pending_deflate.as_mut()) {
            (Some(d), _) => d.out().inner.finish(),
            (None, Some(inner)) => inner.finish(),
            (None, None) => ParsedUsage::default(),
        };
        // (The inner parser may have found its own body unreadable: a
        // Bedrock event stream whose framing broke.)
        parsed.undecodable |= self.failed && parsed.usage.is_none();
        parsed
    }

    fn usage_seen(&self) -> bool {
        match (self.dec.as_ref(), self.pending_deflate.as_ref()) {
            (Some(d), _) => d.out_ref().inner.usage_seen(),
            (None, Some(inner)) => inner.usage_seen(),
            (None, None) => false,
        }
    }

    fn generation_over(&self) -> bool {
        match (self.dec.as_ref(), self.pending_deflate.as_ref()) {
            (Some(d), _) => d.out_ref().inner.generation_over(),
            (None, Some(inner)) => inner.generation_over(),
            (None, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Provider;
    use crate::providers::RequestInfo;
    use crate::providers::openai::OpenAi;

    const CHAT_SSE: &[u8] = include_bytes!("fixtures/openai/chat_stream.sse");

    fn encode(enc: &str, data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        match enc {
            "gzip" => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "deflate" => {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "raw-deflate" => {
                let mut e =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            "zstd" => zstd::stream::encode_all(data, 3).unwrap(),
            "br" => {
                // A stored (uncompressed) brotli stream: the decoder reads
                // it like any other; real compression is tested through the
                // e2e fake provider.
                brotli_stored(data)
            }
            _ => unreachable!(),
        }
    }

    /// Minimal brotli encoder emitting uncompressed meta-blocks.
    fn brotli_stored(data: &[u8]) -> Vec<u8> {
        let mut bits = BitWriter::default();
        bits.put(0, 1); // WBITS = 16
        for chunk in data.chunks(65536) {
            bits.put(0, 1); // ISLAST = 0
            let len = chunk.len() - 1;
            let nibbles = if len < 1 << 16 {
                4
            } else if len < 1 << 20 {
                5
            } else {
                6
            };
            bits.put(nibbles - 4, 2);
            bits.put(len as u32, nibbles * 4);
            bits.put(1, 1); // ISUNCOMPRESSED
            bits.align();
            bits.bytes.extend_from_slice(chunk);
        }
        bits.put(1, 1); // ISLAST
        bits.put(1, 1); // ISLASTEMPTY
        bits.align();
        bits.bytes
    }

    #[derive(Default)]
    struct BitWriter {
        bytes: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl BitWriter {
        fn put(&mut self, v: u32, n: u32) {
            self.acc |= (v as u64) << self.n;
            self.n += n;
            while self.n >= 8 {
                self.bytes.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        fn align(&mut self) {
            if self.n > 0 {
                self.bytes.push(self.acc as u8);
                self.acc = 0;
                self.n = 0;
            }
        }
    }

    fn parse(enc: &str, body: &[u8], step: usize) -> ParsedUsage {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            "text/event-stream".parse().unwrap(),
        );
        let info = RequestInfo {
            operation: "chat",
            metered: true,
            ..Default::default()
        };
        let inner = OpenAi.response_parser(&info, 200, &h);
        let mut p = decoding(Some(enc), inner);
        for c in body.chunks(step) {
            p.feed(c);
        }
        p.finish()
    }

    /// A request body is decoded whole, in every encoding the agent
    /// reads, and refused past its bound, corrupt or in another encoding.
    #[test]
    fn whole_bodies_decode_within_their_bound() {
        let plain = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hello hello hello hello"}]}"#;
        let gz = encode("gzip", plain);
        for (enc, body) in [
            ("gzip", gz.clone()),
            (" GZIP ", gz.clone()),
            ("deflate", encode("deflate", plain)),
            ("deflate", encode("raw-deflate", plain)),
            ("zstd", encode("zstd", plain)),
            ("br", encode("br", plain)),
        ] {
            assert_eq!(
                decode_whole(enc, &body, 1 << 20).as_deref(),
                Some(&plain[..]),
                "{enc}"
            );
        }
        assert_eq!(
            decode_whole("gzip", &gz, plain.len()).as_deref(),
            Some(&plain[..])
        );
        assert_eq!(
            decode_whole("gzip", &gz, plain.len() - 1),
            None,
            "over the bound"
        );
        assert_eq!(
            decode_whole("gzip", &gz[..gz.len() / 2], 1 << 20),
            None,
            "cut"
        );
        assert_eq!(decode_whole("gzip", plain, 1 << 20), None, "not gzip");
        assert_eq!(decode_whole("gzip, br", &gz, 1 << 20), None, "a list");
        assert_eq!(decode_whole("compress", &gz, 1 << 20), None, "unknown");
    }

    #[test]
    fn every_encoding_gives_the_identity_count() {
        let want = parse("identity", CHAT_SSE, 7);
        assert_eq!(want.usage.unwrap().input_tokens, 13);
        for enc in ["gzip", "deflate", "raw-deflate", "zstd", "br"] {
            let body = encode(enc, CHAT_SSE);
            let header = if enc == "raw-deflate" { "deflate" } else { enc };
            for step in [1, 3, 64, body.len()] {
                assert_eq!(parse(header, &body, step), want, "{enc} step {step}");
            }
        }
    }

    #[test]
    fn corrupt_or_unknown_encodings_give_no_usage_and_no_panic() {
        for (enc, body) in [
            ("gzip", &b"\x1f\x8bnot gzip at all"[..]),
            ("zstd", b"garbage"),
            ("br", b"\xff\xff\xff"),
            ("compress", CHAT_SSE),
        ] {
            let p = parse(enc, body, 4);
            assert_eq!(p.usage, None, "{enc}");
            assert!(p.undecodable, "{enc}: the record says why");
        }
        // A usage read before the damage stands, without the error.
        let mut body = encode("gzip", CHAT_SSE);
        body.extend_from_slice(b"\x00garbage");
        let p = parse("gzip", &body, 5);
        assert!(p.usage.is_some());
        assert!(!p.undecodable);
    }

    #[test]
    fn a_zstd_frame_asking_for_a_window_over_8_mib_is_not_read() {
        use std::io::Write;
        let frame = |window_log: u32| {
            let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            e.include_contentsize(false).unwrap();
            e.window_log(window_log).unwrap();
            e.write_all(CHAT_SSE).unwrap();
            e.finish().unwrap()
        };
        let want = parse("identity", CHAT_SSE, 7);
        assert!(want.usage.is_some());
        assert_eq!(parse("zstd", &frame(23), 5).usage, want.usage);
        assert_eq!(parse("zstd", &frame(27), 5).usage, None);
    }

    #[test]
    fn raw_deflate_whose_first_byte_looks_like_zlib_is_read_as_raw() {
        // A non-final stored block whose padding bit 3 is set: first byte
        // 0x08, as a zlib header's (CM = 8, a 256-byte window). Encoders
        // leave padding zero; decoders ignore it. Then a final empty block.
        let mut data = CHAT_SSE.to_vec();
        while (0x0800 + usize::from(data.len() as u8)) % 31 == 0 {
            data.push(b'\n');
        }
        let len = u16::try_from(data.len()).expect("one stored block");
        let mut raw = vec![0x08];
        raw.extend_from_slice(&len.to_le_bytes());
        raw.extend_from_slice(&(!len).to_le_bytes());
        raw.extend_from_slice(&data);
        raw.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
        assert!(!is_zlib_header(&raw));
        let want = parse("identity", &data, 7);
        assert!(want.usage.is_some());
        assert_eq!(parse("deflate", &raw, 5).usage, want.usage);
        assert!(is_zlib_header(&encode("deflate", CHAT_SSE)));
    }

    #[test]
    fn what_decoded_before_a_corrupt_tail_is_still_read() {
        let want = parse("identity", CHAT_SSE, 7);
        for enc in ["gzip", "zstd"] {
            let mut body = encode(enc, CHAT_SSE);
            body.extend_from_slice(b"\x00garbage after the compressed stream");
            assert_eq!(parse(enc, &body, 5).usage, want.usage, "{enc}");
        }
    }

    /// Records what reaches it.
    struct Pieces(std::sync::Arc<std::sync::Mutex<(usize, usize)>>);

    impl UsageParser for Pieces {
        fn feed(&mut self, chunk: &[u8]) {
            let mut g = self.0.lock().unwrap();
            g.0 += chunk.len();
            g.1 = g.1.max(chunk.len());
        }
        fn finish(&mut self) -> ParsedUsage {
            ParsedUsage::default()
        }
    }

    #[test]
    fn decoded_bytes_reach_the_parser_a_piece_at_a_time() {
        // 32 MiB of zeros: a few KB compressed, so one 16 KB chunk of it
        // decodes to megabytes. They must not be gathered per chunk.
        let zeros = vec![0u8; 32 << 20];
        for enc in ["gzip", "zstd", "br", "deflate"] {
            let body = encode(enc, &zeros);
            let seen = std::sync::Arc::new(std::sync::Mutex::new((0, 0)));
            let mut p = decoding(Some(enc), Box::new(Pieces(seen.clone())));
            for c in body.chunks(16 << 10) {
                p.feed(c);
            }
            p.finish();
            let (total, largest) = *seen.lock().unwrap();
            assert_eq!(total, zeros.len(), "{enc}");
            assert!(largest <= 1 << 20, "{enc}: a {largest}-byte piece");
        }
    }
}
