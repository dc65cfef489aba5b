//! Exact token counting for cl100k_base and o200k_base without a regex
//! engine: a hand-written pre-tokeniser that splits text exactly where each
//! encoding's split pattern does, and byte-pair merging over a compact rank
//! table.
//!
//! tiktoken (Python and tiktoken-rs alike) spends most of its time in
//! `fancy_regex`, a backtracking engine needed only for the patterns'
//! `\s+(?!\S)` look-ahead. Each pattern is an ordered alternation of simple
//! classes, so the match at a position can be decided by looking at a few
//! runs of characters; [`Splitter::next`] does that, alternative by
//! alternative, in the pattern's own order and with its backtracking rules.
//! Unicode classes (`\p{L}` and its parts, `\p{M}`, `\p{N}`, `\s`) come
//! from `regex-syntax`, the same tables the regex engine uses.
//!
//! Owns: the rank table (built once per encoding from tiktoken-rs's encoder,
//! which is then dropped), the pre-tokeniser and the merge. Must never:
//! count differently from tiktoken (the tests compare piece boundaries with
//! `fancy_regex` running the original patterns and token sequences with
//! tiktoken-rs), panic on any `&str`, or allocate per piece for pieces that
//! are whole tokens.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::OnceLock;

use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;

/// cl100k_base's split pattern as tiktoken-rs builds its encoder (not
/// exported there); what [`Pattern::Cl100k`] implements, and what the
/// tests and the fuzz target compare it with.
pub const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";

/// Which split pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// [`CL100K_PATTERN`].
    Cl100k,
    /// tiktoken-rs's `O200K_BASE_PAT_STR` (upper/lower-case letter runs with
    /// optional contractions, 1-3 digits, punctuation runs, whitespace).
    O200k,
}

/// An encoding's ranks and its pre-tokeniser.
pub struct Bpe {
    pattern: Pattern,
    ranks: FxHashMap<&'static [u8], u32>,
}

impl Bpe {
    /// Builds the table from `core`'s ordinary tokens (ranks 0, 1, ... up
    /// to the first rank it cannot decode; the special tokens sit above
    /// that gap and are not ordinary text). The token bytes live in one
    /// buffer for the life of the process: the encoders are built once, on
    /// first need, and kept.
    pub fn from_core(pattern: Pattern, core: &CoreBPE) -> Option<Bpe> {
        let mut arena = Vec::new();
        let mut ends = Vec::new();
        let mut rank = 0u32;
        while let Ok(bytes) = core.decode_bytes(&[rank]) {
            arena.extend_from_slice(&bytes);
            ends.push(arena.len());
            rank += 1;
        }
        if ends.len() < 256 {
            return None;
        }
        let arena: &'static [u8] = Box::leak(arena.into_boxed_slice());
        let mut ranks = FxHashMap::default();
        ranks.reserve(ends.len());
        let mut start = 0;
        for (r, &end) in ends.iter().enumerate() {
            ranks.insert(&arena[start..end], r as u32);
            start = end;
        }
        // Every single byte is a token: merging starts from bytes.
        if (0..=255u8).any(|b| !ranks.contains_key(&[b][..])) {
            return None;
        }
        Some(Bpe { pattern, ranks })
    }

    /// Number of ordinary tokens.
    pub fn vocabulary(&self) -> usize {
        self.ranks.len()
    }

    /// Tokens in `text`, special-token text counted as ordinary text.
    pub fn count(&self, text: &str) -> u64 {
        let mut n = 0u64;
        let mut merge = Merge::default();
        for piece in Splitter::new(self.pattern, text) {
            let piece = piece.as_bytes();
            n += if self.ranks.contains_key(piece) {
                1
            } else {
                merge.run(&self.ranks, piece).len() as u64 - 1
            };
        }
        n
    }

    /// The tokens of `text` (what tiktoken's `encode_ordinary` returns).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut merge = Merge::default();
        for piece in Splitter::new(self.pattern, text) {
            let piece = piece.as_bytes();
            match self.ranks.get(piece) {
                Some(&r) => out.push(r),
                None => {
                    let bounds = merge.run(&self.ranks, piece);
                    out.extend(bounds.windows(2).map(|w| self.ranks[&piece[w[0]..w[1]]]));
                }
            }
        }
        out
    }
}

/// Byte-pair merging of one piece, with reusable buffers. Lowest rank
/// first, leftmost on ties: tiktoken's order.
#[derive(Default)]
struct Merge {
    /// (start of part, rank of merging it with the next part).
    parts: Vec<(usize, u32)>,
    bounds: Vec<usize>,
    next: Vec<usize>,
    prev: Vec<usize>,
    pair: Vec<u32>,
    heap: BinaryHeap<Reverse<(u32, usize)>>,
}

/// Longer pieces merge through a heap instead of rescanning (whitespace runs
/// can be long; whitespace-free runs are cut by the caller).
const SCAN_MAX: usize = 128;

impl Merge {
    /// The boundaries of `piece`'s tokens: `[0, ..., piece.len()]`.
    fn run(&mut self, ranks: &FxHashMap<&'static [u8], u32>, piece: &[u8]) -> &[usize] {
        self.bounds.clear();
        if piece.len() <= 1 {
            self.bounds.extend([0, piece.len()]);
            return &self.bounds;
        }
        if piece.len() <= SCAN_MAX {
            self.scan(ranks, piece);
        } else {
            self.with_heap(ranks, piece);
        }
        &self.bounds
    }

    fn scan(&mut self, ranks: &FxHashMap<&'static [u8], u32>, piece: &[u8]) {
        let rank = |a: usize, b: usize| ranks.get(&piece[a..b]).copied().unwrap_or(u32::MAX);
        let parts = &mut self.parts;
        parts.clear();
        parts.extend((0..piece.len() - 1).map(|i| (i, rank(i, i + 2))));
        parts.push((piece.len() - 1, u32::MAX));
        parts.push((piece.len(), u32::MAX));
        loop {
            let mut min = (u32::MAX, 0);
            for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
                if r < min.0 {
                    min = (r, i);
                }
            }
            if min.0 == u32::MAX {
                break;
            }
            let i = min.1;
            // parts[i] absorbs parts[i + 1]; the ranks of merging the new
            // part with its neighbours change.
            let after = |k: usize| {
                if k + 3 < parts.len() {
                    rank(parts[k].0, parts[k + 3].0)
                } else {
                    u32::MAX
                }
            };
            let left = if i > 0 { Some(after(i - 1)) } else { None };
            let own = after(i);
            if let Some(l) = left {
                parts[i - 1].1 = l;
            }
            parts[i].1 = own;
            parts.remove(i + 1);
        }
        self.bounds.extend(parts.iter().map(|p| p.0));
    }

    fn with_heap(&mut self, ranks: &FxHashMap<&'static [u8], u32>, piece: &[u8]) {
        let n = piece.len();
        let rank = |a: usize, b: usize| ranks.get(&piece[a..b]).copied().unwrap_or(u32::MAX);
        // Parts are a linked list over their start offsets (`next[n]` is
        // past the end); `pair[i]` is the rank of merging the part at i
        // with the next one (MAX: none, or i no longer starts a part), so
        // stale heap entries are told apart.
        self.next.clear();
        self.next.extend(1..=n + 1);
        self.prev.clear();
        self.prev.extend((0..=n).map(|i| i.wrapping_sub(1)));
        self.pair.clear();
        self.pair
            .extend((0..=n).map(|i| if i + 1 < n { rank(i, i + 2) } else { u32::MAX }));
        self.heap.clear();
        self.heap.extend(
            (0..n)
                .filter(|&i| self.pair[i] != u32::MAX)
                .map(|i| Reverse((self.pair[i], i))),
        );
        let (next, prev, pair) = (&mut self.next, &mut self.prev, &mut self.pair);
        while let Some(Reverse((r, i))) = self.heap.pop() {
            if pair[i] != r {
                continue;
            }
            // The part at i absorbs the next one, j; k follows.
            let j = next[i];
            let k = next[j];
            next[i] = k;
            if k <= n {
                prev[k] = i;
            }
            pair[j] = u32::MAX;
            pair[i] = if k < n { rank(i, next[k]) } else { u32::MAX };
            if pair[i] != u32::MAX {
                self.heap.push(Reverse((pair[i], i)));
            }
            if i > 0 {
                let p = prev[i];
                pair[p] = rank(p, k);
                if pair[p] != u32::MAX {
                    self.heap.push(Reverse((pair[p], p)));
                }
            }
        }
        let mut i = 0;
        while i <= n {
            self.bounds.push(i);
            i = next[i];
        }
    }
}

/// Character classes, as bits.
const LU: u8 = 1;
const LL: u8 = 2;
const LT: u8 = 4;
const LM: u8 = 8;
const LO: u8 = 16;
const MARK: u8 = 32;
const NUM: u8 = 64;
const SPACE: u8 = 128;
const LETTER: u8 = LU | LL | LT | LM | LO;
/// o200k's "upper" run: `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`.
const UPPER: u8 = LU | LT | LM | LO | MARK;
/// o200k's "lower" run: `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`.
const LOWER: u8 = LL | LM | LO | MARK;

/// Class bits per code point: a two-level table (blocks of 256 code points,
/// identical blocks shared).
struct Classes {
    block: Vec<u16>,
    leaves: Vec<[u8; 256]>,
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut flat = vec![0u8; 0x11_0000];
        for (class, bit) in [
            (r"\p{Lu}", LU),
            (r"\p{Ll}", LL),
            (r"\p{Lt}", LT),
            (r"\p{Lm}", LM),
            (r"\p{Lo}", LO),
            (r"\p{M}", MARK),
            (r"\p{N}", NUM),
            (r"\s", SPACE),
        ] {
            for (a, b) in unicode_ranges(class) {
                for cp in a..=b {
                    flat[cp as usize] |= bit;
                }
            }
        }
        let mut leaves: Vec<[u8; 256]> = Vec::new();
        let mut seen: FxHashMap<[u8; 256], u16> = FxHashMap::default();
        let block = flat
            .chunks_exact(256)
            .map(|chunk| {
                let leaf: [u8; 256] = chunk.try_into().expect("256-byte chunk");
                *seen.entry(leaf).or_insert_with(|| {
                    leaves.push(leaf);
                    (leaves.len() - 1) as u16
                })
            })
            .collect();
        Classes { block, leaves }
    })
}

/// The code point ranges of a Unicode class, from the regex engine's own
/// tables. The classes are fixed strings that parse; an empty list would
/// only make counts fall back to bytes, never panic.
fn unicode_ranges(class: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    let Ok(hir) = regex_syntax::Parser::new().parse(class) else {
        return Vec::new();
    };
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl Classes {
    #[inline]
    fn of(&self, c: char) -> u8 {
        let cp = c as usize;
        self.leaves[self.block[cp >> 8] as usize][cp & 0xff]
    }
}

/// The pieces of a text, in order; together they are the text.
pub struct Splitter<'a> {
    pattern: Pattern,
    text: &'a str,
    pos: usize,
    classes: &'static Classes,
}

impl<'a> Splitter<'a> {
    pub fn new(pattern: Pattern, text: &'a str) -> Splitter<'a> {
        Splitter {
            pattern,
            text,
            pos: 0,
            classes: classes(),
        }
    }

    /// The character at byte `i`, the byte after it and its class bits.
    #[inline]
    fn at(&self, i: usize) -> Option<(char, usize, u8)> {
        let c = self.text.get(i..)?.chars().next()?;
        Some((c, i + c.len_utf8(), self.classes.of(c)))
    }

    /// End of the run of characters from `i` whose class and char pass `f`.
    #[inline]
    fn run(&self, mut i: usize, f: impl Fn(char, u8) -> bool) -> usize {
        while let Some((c, n, k)) = self.at(i) {
            if !f(c, k) {
                break;
            }
            i = n;
        }
        i
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d`, case-insensitive, at `i`.
    fn contraction(&self, i: usize) -> Option<usize> {
        let (c0, i1, _) = self.at(i)?;
        if c0 != '\'' {
            return None;
        }
        let (c1, i2, _) = self.at(i1)?;
        if b"sdmt".iter().any(|&l| folds_to(c1, l)) {
            return Some(i2);
        }
        let (c2, i3, _) = self.at(i2)?;
        [(b'l', b'l'), (b'v', b'e'), (b'r', b'e')]
            .iter()
            .any(|&(a, b)| folds_to(c1, a) && folds_to(c2, b))
            .then_some(i3)
    }

    /// `[^\r\n\p{L}\p{N}]`: may lead a word.
    #[inline]
    fn leads(c: char, k: u8) -> bool {
        c != '\r' && c != '\n' && k & (LETTER | NUM) == 0
    }

    /// `[^\s\p{L}\p{N}]`: punctuation, symbols, marks, controls.
    #[inline]
    fn other(k: u8) -> bool {
        k & (SPACE | LETTER | NUM) == 0
    }

    fn next_cl100k(&self, i: usize, c0: char, i1: usize, k0: u8) -> usize {
        if let Some(e) = self.contraction(i) {
            return e;
        }
        // [^\r\n\p{L}\p{N}]?+\p{L}++
        if k0 & LETTER != 0 {
            return self.run(i, |_, k| k & LETTER != 0);
        }
        if Self::leads(c0, k0) && self.at(i1).is_some_and(|(_, _, k)| k & LETTER != 0) {
            return self.run(i1, |_, k| k & LETTER != 0);
        }
        if let Some(e) = self.digits(i, k0) {
            return e;
        }
        if let Some(e) = self.punctuation(i, c0, i1, k0, |c| c == '\r' || c == '\n') {
            return e;
        }
        // Whitespace from here on.
        let end = self.run(i, |_, k| k & SPACE != 0);
        if end == self.text.len() {
            return end; // \s++$
        }
        if let Some(e) = self.last_newline(i, end) {
            return e; // \s*[\r\n]
        }
        self.space_before_word(i, i1, end)
    }

    fn next_o200k(&self, i: usize, c0: char, i1: usize, k0: u8) -> usize {
        let starts: &[usize] = if Self::leads(c0, k0) { &[i1, i] } else { &[i] };
        // P? U* L+ C?
        for &j in starts {
            let mut last_lower = None;
            let mut u = j;
            while let Some((_, n, k)) = self.at(u) {
                if k & UPPER == 0 {
                    break;
                }
                if k & LOWER != 0 {
                    last_lower = Some(n);
                }
                u = n;
            }
            let end = match self.at(u) {
                Some((_, _, k)) if k & LOWER != 0 => Some(self.run(u, |_, k| k & LOWER != 0)),
                // Give back upper-run characters until one can be the
                // lower run (it ends there: the next one is not lower).
                _ => last_lower,
            };
            if let Some(e) = end {
                return self.contraction(e).unwrap_or(e);
            }
        }
        // P? U+ L* C?
        for &j in starts {
            if self.at(j).is_some_and(|(_, _, k)| k & UPPER != 0) {
                let e = self.run(j, |_, k| k & UPPER != 0);
                let e = self.run(e, |_, k| k & LOWER != 0);
                return self.contraction(e).unwrap_or(e);
            }
        }
        if let Some(e) = self.digits(i, k0) {
            return e;
        }
        if let Some(e) = self.punctuation(i, c0, i1, k0, |c| matches!(c, '\r' | '\n' | '/')) {
            return e;
        }
        let end = self.run(i, |_, k| k & SPACE != 0);
        if let Some(e) = self.last_newline(i, end) {
            return e; // \s*[\r\n]+
        }
        if end == self.text.len() {
            return end; // \s+(?!\S) at the end
        }
        self.space_before_word(i, i1, end)
    }

    /// `\p{N}{1,3}`.
    fn digits(&self, i: usize, k0: u8) -> Option<usize> {
        if k0 & NUM == 0 {
            return None;
        }
        let mut e = i;
        for _ in 0..3 {
            match self.at(e) {
                Some((_, n, k)) if k & NUM != 0 => e = n,
                _ => break,
            }
        }
        Some(e)
    }

    /// ` ?[^\s\p{L}\p{N}]+` then a run of `tail` characters.
    fn punctuation(
        &self,
        i: usize,
        c0: char,
        i1: usize,
        k0: u8,
        tail: impl Fn(char) -> bool,
    ) -> Option<usize> {
        let j = if c0 == ' ' && self.at(i1).is_some_and(|(_, _, k)| Self::other(k)) {
            i1
        } else if Self::other(k0) {
            i
        } else {
            return None;
        };
        let e = self.run(j, |_, k| Self::other(k));
        Some(self.run(e, |c, _| tail(c)))
    }

    /// In the whitespace run `[i, end)`: the end of its last line break.
    fn last_newline(&self, i: usize, end: usize) -> Option<usize> {
        self.text[i..end].rfind(['\r', '\n']).map(|p| i + p + 1)
    }

    /// `\s+(?!\S)|\s`, for a whitespace run `[i, end)` followed by a
    /// non-space: all of it but its last character, or one character.
    fn space_before_word(&self, i: usize, i1: usize, end: usize) -> usize {
        let last = self.text[i..end]
            .char_indices()
            .next_back()
            .map_or(i1, |(p, _)| i + p);
        if last > i { last } else { i1 }
    }
}

/// Whether `c` matches the ASCII letter `l` case-insensitively, as the
/// regex engine's simple case folding does (`ſ` folds to `s`).
fn folds_to(c: char, l: u8) -> bool {
    c.is_ascii() && c.to_ascii_lowercase() as u8 == l || (l == b's' && c == 'ſ')
}

impl<'a> Iterator for Splitter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let i = self.pos;
        let (c0, i1, k0) = self.at(i)?;
        let end = match self.pattern {
            Pattern::Cl100k => self.next_cl100k(i, c0, i1, k0),
            Pattern::O200k => self.next_o200k(i, c0, i1, k0),
        };
        // Every branch consumes at least one character; the guard keeps a
        // mistake from looping forever.
        let end = end.max(i1);
        self.pos = end;
        Some(&self.text[i..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Reference {
        regex: fancy_regex::Regex,
        core: CoreBPE,
        bpe: Bpe,
    }

    fn reference(pattern: Pattern) -> &'static Reference {
        static CL: OnceLock<Reference> = OnceLock::new();
        static O2: OnceLock<Reference> = OnceLock::new();
        let (cell, pat, core): (_, _, fn() -> anyhow::Result<CoreBPE>) = match pattern {
            Pattern::Cl100k => (&CL, CL100K_PATTERN, tiktoken_rs::cl100k_base),
            Pattern::O200k => (
                &O2,
                tiktoken_rs::O200K_BASE_PAT_STR,
                tiktoken_rs::o200k_base,
            ),
        };
        cell.get_or_init(|| {
            let core = core().expect("encoder");
            let bpe = Bpe::from_core(pattern, &core).expect("ranks");
            Reference {
                regex: fancy_regex::Regex::new(pat).expect("pattern"),
                core,
                bpe,
            }
        })
    }

    /// Checks pieces against the original pattern and tokens against
    /// tiktoken-rs; the message names the first difference.
    fn check(pattern: Pattern, text: &str) -> Result<(), String> {
        let r = reference(pattern);
        let want: Vec<&str> = r
            .regex
            .find_iter(text)
            .map(|m| m.expect("regex").as_str())
            .collect();
        let got: Vec<&str> = Splitter::new(pattern, text).collect();
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b);
            return Err(format!(
                "{pattern:?} pieces of {text:?}: first difference at {at:?}\n got {got:?}\nwant {want:?}"
            ));
        }
        let tokens = r.bpe.encode(text);
        if tokens != r.core.encode_ordinary(text) {
            return Err(format!("{pattern:?} tokens of {text:?} differ"));
        }
        if r.bpe.count(text) != tokens.len() as u64 {
            return Err(format!(
                "{pattern:?} count of {text:?} is not its token count"
            ));
        }
        Ok(())
    }

    fn check_both(text: &str) {
        for p in [Pattern::Cl100k, Pattern::O200k] {
            if let Err(e) = check(p, text) {
                panic!("{e}");
            }
        }
    }

    /// Characters at the edges of every class the patterns use.
    const ALPHABET: &[char] = &[
        'a', 'b', 's', 'S', 't', 'T', 'd', 'l', 'L', 'v', 'e', 'E', 'r', 'm', 'x', 'Z', 'Q', '0',
        '7', '9', ' ', ' ', ' ', '\t', '\n', '\r', '\u{b}', '\u{c}', '\'', '\'', '"', ',', '.',
        '!', '/', '-', '_', '(', '#', '@', '\\', '{', 'é', 'ß', 'ſ', 'K', 'İ', 'ǅ', 'ʰ', 'ª', '数',
        'א', 'ا', 'क', '\u{301}', '\u{903}', '\u{20dd}', 'Ⅻ', '½', '٣', '²', '\u{a0}', '\u{3000}',
        '\u{2028}', '\u{85}', '\u{200d}', '\u{feff}', '🚀', '€', 'Ω', 'ω', 'Ж', 'ж', 'Σ', 'ς',
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn same_pieces_and_tokens_as_tiktoken(
            chars in prop::collection::vec(prop::sample::select(ALPHABET), 0..48)
        ) {
            let text: String = chars.into_iter().collect();
            for p in [Pattern::Cl100k, Pattern::O200k] {
                prop_assert!(check(p, &text).is_ok(), "{}", check(p, &text).unwrap_err());
            }
        }
    }

    #[test]
    fn every_character_in_context() {
        // Each character alone and next to letters, digits, apostrophes,
        // spaces and line breaks: exercises its class in every branch.
        let mut chars: Vec<char> = (0..0x800u32).filter_map(char::from_u32).collect();
        chars.extend((0x800..0x11_0000u32).step_by(97).filter_map(char::from_u32));
        let mut text = String::new();
        for (n, c) in chars.iter().enumerate() {
            text.clear();
            for t in [
                "{c}", "a{c}b", "'{c}", "A'{c}", "{c}{c}x", " {c}\n", "1{c}", "{c}A{c}a",
            ] {
                text.push_str(&t.replace("{c}", &c.to_string()));
                text.push(' ');
            }
            check_both(&text);
            if n % 4096 == 0 {
                check_both(&text.repeat(2));
            }
        }
    }

    #[test]
    fn known_edges() {
        for text in [
            "",
            "hello world",
            "I'm here, they'll go; we've DON'T it's 'sup 'S 'LL 'ſ",
            "   leading and trailing   ",
            "a\n\n  b\r\n\tc  \n",
            "line\n   ",
            "x \n \n y",
            "1234567 12 3.14 ½Ⅻ٣٣٣٣",
            "<|endoftext|> is text",
            "fn main() {\n    println!(\"{}\", x);\n}\n",
            "path/to/file\n/next //",
            "e\u{301}te\u{301} \u{301}\u{301}x ABCdef abcDEF ǅungla ʰa",
            "数据处理 管道 Привет, мир 🚀 shipped größer",
        ] {
            check_both(text);
        }
    }

    #[test]
    fn long_pieces_merge_like_tiktoken() {
        // Longer than SCAN_MAX: the heap merge.
        let mut texts = vec![
            " ".repeat(300),
            format!("x{}y", " ".repeat(200)),
            "a".repeat(500),
            "ab".repeat(300),
            "\n".repeat(150),
            "-".repeat(257),
            "数".repeat(90),
        ];
        let mut x: u64 = 7;
        let b64: String = (0..400)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"[(x % 52) as usize] as char
            })
            .collect();
        texts.push(b64);
        for t in &texts {
            check_both(t);
        }
    }

    #[test]
    fn ordinary_vocabulary_only() {
        assert_eq!(reference(Pattern::Cl100k).bpe.vocabulary(), 100_256);
        assert_eq!(reference(Pattern::O200k).bpe.vocabulary(), 199_998);
        // Special-token text is ordinary text.
        let r = reference(Pattern::O200k);
        assert!(r.bpe.count("<|endoftext|>") > 1);
    }

    #[test]
    fn contraction_folding_matches_the_regex() {
        let re = fancy_regex::Regex::new("^(?i:[sdmtlver])$").expect("regex");
        for c in (0..0x11_0000u32).filter_map(char::from_u32) {
            let ours = b"sdmtlver".iter().any(|&l| folds_to(c, l));
            assert_eq!(
                ours,
                re.is_match(&c.to_string()).expect("regex"),
                "{c:?} (U+{:04X})",
                c as u32
            );
        }
    }
}
