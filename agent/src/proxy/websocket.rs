//! WebSocket frames (RFC 6455) read as they pass through the agent, for
//! metering the APIs that answer over a WebSocket (the OpenAI Responses
//! API's WebSocket mode, the OpenAI Realtime API, Gemini Live).
//!
//! Owns: splitting a byte stream (either direction, masked or not) into
//! whole text messages (and binary ones, for an API that sends its JSON
//! in them). Must never: change, hold back or reorder a byte (the relay
//! forwards every byte before it is read here), or keep more of one
//! message than its limit or its lease of the agent's body budget allows:
//! a longer message, a compressed one (`permessage-deflate`, RSV1) and a
//! binary one not read as text are passed over unread (a text one is
//! reported as such), and a stream that breaks the framing rules is no
//! longer read at all.

/// The longest text message read (the Responses API's last event repeats
/// the whole response, as over HTTP).
pub(super) const MAX_MESSAGE: usize = 16 << 20;

/// What [`FrameReader::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Message<'a> {
    /// A whole text message.
    Text(&'a [u8]),
    /// A text message passed over unread (too long, over the budget,
    /// paused mid-way, or compressed), with its first bytes (up to
    /// [`PREFIX`]) as sent.
    Unread(&'a [u8]),
}

/// The first bytes of every text message are kept (outside the budget)
/// to tell what a message passed over was.
pub(super) const PREFIX: usize = 256;

/// Splits a WebSocket byte stream into messages as its bytes arrive, in
/// pieces of any size.
pub(super) struct FrameReader {
    limit: usize,
    /// Binary messages are read as text is (an API that sends its JSON in
    /// binary frames: Gemini Live).
    binary_as_text: bool,
    /// The share of the agent's body budget the message being read holds,
    /// when its bytes count against the budget.
    lease: Option<crate::budget::BodyLease>,
    /// A Close frame was seen.
    closed: bool,
    /// The frame header read so far (2 to 14 bytes).
    head: Vec<u8>,
    /// The current frame's payload bytes still to come, once its header
    /// is whole.
    remaining: Option<u64>,
    frame: Frame,
    /// The message being put together from its frames.
    message: Vec<u8>,
    /// Its first [`PREFIX`] bytes, kept whether or not the rest is.
    prefix: Vec<u8>,
    /// What the message being read is; `None` between messages.
    kind: Option<Kind>,
    /// The framing rules were broken: nothing more is read.
    broken: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Frame {
    fin: bool,
    control: bool,
    mask: Option<[u8; 4]>,
    /// Payload bytes of this frame already read (the mask's position).
    read: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A text message, kept.
    Text,
    /// A text message passed over (compressed, too long, over budget).
    TextSkipped,
    /// Binary: passed over.
    Skipped,
}

impl FrameReader {
    pub(super) fn new(limit: usize, lease: Option<crate::budget::BodyLease>) -> Self {
        FrameReader {
            limit,
            binary_as_text: false,
            lease,
            closed: false,
            head: Vec::with_capacity(14),
            prefix: Vec::new(),
            remaining: None,
            frame: Frame::default(),
            message: Vec::new(),
            kind: None,
            broken: false,
        }
    }

    /// Reads binary messages as text messages.
    pub(super) fn binary_as_text(mut self) -> Self {
        self.binary_as_text = true;
        self
    }

    /// Reads messages up to `limit` bytes from here on (a message under
    /// way included).
    pub(super) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Whether the stream broke the framing rules (then nothing more is
    /// read from it).
    pub(super) fn broken(&self) -> bool {
        self.broken
    }

    /// Whether a Close frame was seen.
    pub(super) fn closed(&self) -> bool {
        self.closed
    }

    /// Passes over the text message under way, if any (its sender paused
    /// mid-way): its share of the budget is given back. True if there was
    /// one.
    pub(super) fn expire_partial(&mut self) -> bool {
        if self.kind != Some(Kind::Text) || self.message.is_empty() {
            return false;
        }
        self.skip_message();
        true
    }

    /// The message under way is passed over from here on.
    fn skip_message(&mut self) {
        self.kind = Some(Kind::TextSkipped);
        self.message = Vec::new();
        if let Some(l) = self.lease.as_mut() {
            l.release();
        }
    }

    /// Reads `data`, the next bytes of the stream, and calls `on_text`
    /// with each text message it completes or passes over.
    pub(super) fn feed(&mut self, mut data: &[u8], on_text: &mut dyn FnMut(Message<'_>)) {
        while !data.is_empty() && !self.broken {
            match self.remaining {
                None => {
                    let want = header_len(&self.head);
                    let take = (want - self.head.len()).min(data.len());
                    self.head.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.head.len() == header_len(&self.head) {
                        self.start_frame(on_text);
                    }
                }
                Some(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    self.payload(&data[..take]);
                    data = &data[take..];
                    let left = left - take as u64;
                    self.remaining = Some(left);
                    if left == 0 {
                        self.end_frame(on_text);
                    }
                }
            }
        }
    }

    /// A frame's header is whole: checks it and starts its payload.
    fn start_frame(&mut self, on_text: &mut dyn FnMut(Message<'_>)) {
        let h = std::mem::take(&mut self.head);
        let (b0, b1) = (h[0], h[1]);
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        let opcode = b0 & 0x0f;
        let masked = b1 & 0x80 != 0;
        let (len, at) = match b1 & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = masked.then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
        self.head = h;
        self.head.clear();
        let control = opcode & 0x08 != 0;
        match opcode {
            // Close, ping, pong: short, whole, and between any two frames.
            0x8..=0xa if fin && len <= 125 => self.closed |= opcode == 0x8,
            // A text or binary message starts; none may be under way.
            0x1 | 0x2 if self.kind.is_none() => {
                let text = opcode == 0x1 || self.binary_as_text;
                self.kind = Some(match (text, rsv1) {
                    (true, false) => Kind::Text,
                    (true, true) => Kind::TextSkipped,
                    _ => Kind::Skipped,
                });
                self.message.clear();
                self.prefix.clear();
            }
            // The next piece of the message under way.
            0x0 if self.kind.is_some() => {}
            _ => {
                self.broken = true;
                self.message = Vec::new();
                if let Some(l) = self.lease.as_mut() {
                    l.release();
                }
                return;
            }
        }
        self.frame = Frame {
            fin,
            control,
            mask,
            read: 0,
        };
        self.remaining = Some(len);
        if len == 0 {
            self.end_frame(on_text);
        }
    }

    fn payload(&mut self, bytes: &[u8]) {
        let start = self.frame.read;
        self.frame.read += bytes.len() as u64;
        let frame = self.frame;
        if frame.control || !matches!(self.kind, Some(Kind::Text | Kind::TextSkipped)) {
            return;
        }
        if self.prefix.len() < PREFIX {
            let from = self.prefix.len();
            let take = (PREFIX - from).min(bytes.len());
            self.prefix.extend_from_slice(&bytes[..take]);
            if let Some(mask) = frame.mask {
                for (i, b) in self.prefix[from..].iter_mut().enumerate() {
                    *b ^= mask[((start + i as u64) % 4) as usize];
                }
            }
        }
        if self.kind != Some(Kind::Text) {
            return;
        }
        // (The limit first: a message over it takes nothing from the
        // budget, even for a moment.)
        if self.message.len() + bytes.len() > self.limit
            || self.lease.as_mut().is_some_and(|l| !l.grow(bytes.len()))
        {
            self.skip_message();
            return;
        }
        let from = self.message.len();
        self.message.extend_from_slice(bytes);
        if let Some(mask) = frame.mask {
            for (i, b) in self.message[from..].iter_mut().enumerate() {
                *b ^= mask[((start + i as u64) % 4) as usize];
            }
        }
    }

    fn end_frame(&mut self, on_text: &mut dyn FnMut(Message<'_>)) {
        self.remaining = None;
        let frame = self.frame;
        if frame.control || !frame.fin {
            return;
        }
        match self.kind.take() {
            Some(Kind::Text) => on_text(Message::Text(&self.message)),
            Some(Kind::TextSkipped) => on_text(Message::Unread(&self.prefix)),
            _ => {}
        }
        if let Some(l) = self.lease.as_mut() {
            l.release();
        }
        if self.message.capacity() > 1 << 20 {
            self.message = Vec::new();
        } else {
            self.message.clear();
        }
    }
}

/// The length of the frame header that starts with `head` (2 until the
/// second byte says more).
fn header_len(head: &[u8]) -> usize {
    if head.len() < 2 {
        return 2;
    }
    let ext = match head[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if head[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// One frame: `opcode` with FIN as given, masked with `mask` when set.
    pub(in crate::proxy) fn frame(
        fin: bool,
        opcode: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(k) => {
                f.extend_from_slice(&k);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => f.extend_from_slice(payload),
        }
        f
    }

    /// The text messages read from `stream` fed in pieces of `piece`
    /// bytes (0: whole).
    fn read(stream: &[u8], piece: usize, limit: usize) -> (Vec<String>, bool) {
        let mut r = FrameReader::new(limit, None);
        let mut out = Vec::new();
        let mut on = |m: Message<'_>| match m {
            Message::Text(m) => out.push(String::from_utf8_lossy(m).into_owned()),
            Message::Unread(_) => out.push("<unread>".into()),
        };
        if piece == 0 {
            r.feed(stream, &mut on);
        } else {
            for c in stream.chunks(piece) {
                r.feed(c, &mut on);
            }
        }
        (out, r.broken())
    }

    #[test]
    fn text_messages_are_read_whatever_the_pieces_they_arrive_in() {
        let key = Some([0x12, 0x34, 0x56, 0x78]);
        let long = "y".repeat(70_000);
        let medium = "m".repeat(300);
        let mut stream = Vec::new();
        stream.extend(frame(true, 0x1, b"{\"type\":\"a\"}", None));
        // Masked (as clients send), with a ping between two pieces of a
        // fragmented message, and a binary message passed over.
        stream.extend(frame(false, 0x1, b"frag", key));
        stream.extend(frame(true, 0x9, b"ping", key));
        stream.extend(frame(false, 0x0, b"men", key));
        stream.extend(frame(true, 0x0, b"ted", key));
        stream.extend(frame(true, 0x2, b"\x00\x01binary", None));
        stream.extend(frame(true, 0x1, medium.as_bytes(), key));
        stream.extend(frame(true, 0x1, long.as_bytes(), None));
        stream.extend(frame(true, 0x1, b"", None));
        // Compressed (permessage-deflate sets RSV1): passed over.
        let mut compressed = frame(true, 0x1, b"\x4a\x4c\x04\x00", None);
        compressed[0] |= 0x40;
        stream.extend(compressed);
        stream.extend(frame(true, 0x8, b"\x03\xe8", None));
        let want = vec![
            "{\"type\":\"a\"}".to_string(),
            "fragmented".to_string(),
            medium.clone(),
            long.clone(),
            String::new(),
            "<unread>".to_string(),
        ];
        for piece in [0, 1, 2, 3, 7, 13, 4096] {
            let (got, broken) = read(&stream, piece, MAX_MESSAGE);
            assert!(!broken, "piece {piece}");
            assert_eq!(got, want, "piece {piece}");
        }
    }

    #[test]
    fn a_message_over_the_limit_is_passed_over_and_the_next_is_read() {
        let mut stream = frame(false, 0x1, &[b'x'; 60], None);
        stream.extend(frame(true, 0x0, &[b'x'; 60], None));
        stream.extend(frame(true, 0x1, b"next", None));
        for piece in [0, 1, 50] {
            let (got, broken) = read(&stream, piece, 100);
            assert_eq!(
                got,
                vec!["<unread>".to_string(), "next".to_string()],
                "piece {piece}"
            );
            assert!(!broken);
        }
    }

    #[test]
    fn a_stream_that_breaks_the_framing_rules_is_no_longer_read() {
        let cases: &[(&str, Vec<u8>)] = &[
            (
                "continuation without a message",
                frame(true, 0x0, b"x", None),
            ),
            ("a message inside a message", {
                let mut s = frame(false, 0x1, b"a", None);
                s.extend(frame(true, 0x1, b"b", None));
                s
            }),
            ("a fragmented ping", frame(false, 0x9, b"p", None)),
            ("a long ping", frame(true, 0x9, &[0; 126], None)),
            ("a reserved opcode", frame(true, 0x3, b"x", None)),
        ];
        for (why, s) in cases {
            let mut s = s.clone();
            s.extend(frame(true, 0x1, b"after", None));
            let (got, broken) = read(&s, 0, MAX_MESSAGE);
            assert!(broken, "{why}");
            assert!(got.is_empty(), "{why}: {got:?}");
        }
    }

    /// A message's bytes count against the agent's body budget while it
    /// is read: past the budget it is passed over, and its share is given
    /// back at its end either way. A Close frame is noted.
    #[test]
    fn a_message_past_the_body_budget_is_passed_over_and_its_share_given_back() {
        let budget = crate::budget::BodyBudget::new(100);
        let mut r = FrameReader::new(MAX_MESSAGE, Some(budget.lease()));
        let mut got = Vec::new();
        let mut on = |m: Message<'_>| {
            got.push(match m {
                Message::Text(t) => String::from_utf8_lossy(t).into_owned(),
                Message::Unread(p) => format!("<unread {}>", String::from_utf8_lossy(p)),
            })
        };
        r.feed(&frame(false, 0x1, &[b'a'; 60], None), &mut on);
        assert_eq!(budget.used(), 60, "held while the message is read");
        r.feed(&frame(true, 0x0, &[b'a'; 60], None), &mut on);
        assert_eq!(budget.used(), 0);
        r.feed(&frame(true, 0x1, b"fits", None), &mut on);
        assert_eq!(budget.used(), 0);
        assert!(!r.closed());
        r.feed(&frame(true, 0x8, b"", None), &mut on);
        assert!(r.closed());
        // A message paused mid-way gives its share back.
        r.feed(&frame(false, 0x1, b"pau", Some([1, 2, 3, 4])), &mut on);
        r.feed(&frame(false, 0x0, b"sed", Some([5, 6, 7, 8])), &mut on);
        assert_eq!(budget.used(), 6);
        assert!(r.expire_partial());
        assert_eq!(budget.used(), 0);
        r.feed(
            &frame(true, 0x0, b" and resumed", Some([9, 10, 11, 12])),
            &mut on,
        );
        assert_eq!(
            got,
            vec![
                format!("<unread {}>", "a".repeat(120)),
                "fits".to_string(),
                "<unread paused and resumed>".to_string()
            ]
        );
        // A stream that breaks mid-message gives its share back too.
        let mut r = FrameReader::new(MAX_MESSAGE, Some(budget.lease()));
        r.feed(&frame(false, 0x1, &[b'b'; 50], None), &mut |_| {});
        assert_eq!(budget.used(), 50);
        r.feed(&frame(false, 0x9, b"", None), &mut |_| {});
        assert!(r.broken());
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_huge_announced_length_holds_nothing() {
        // 2^63 bytes announced: read as it comes, never reserved.
        let mut s = vec![0x81, 127];
        s.extend_from_slice(&(1u64 << 63).to_be_bytes());
        s.extend_from_slice(&[b'z'; 1000]);
        let mut r = FrameReader::new(100, None);
        r.feed(&s, &mut |_| panic!("no message ends"));
        assert!(!r.broken());
        assert!(r.message.capacity() <= 100);
    }
}
