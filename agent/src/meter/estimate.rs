//! Local token estimates, for when a provider does not report usage (a
//! stream without its usage chunk, a client that hung up, an API that never
//! says). The record that carries them says `estimated = true`.
//!
//! Owns: choosing an encoding (the model's own for OpenAI models, o200k_base
//! as the stated approximation for every other provider), pulling the prompt
//! text out of a request body per API, and counting. o200k_base and
//! cl100k_base are counted by [`crate::meter::bpe`] (no regex engine, same
//! counts as tiktoken), the retired encodings by tiktoken-rs. Encoders are
//! built on first use (`OnceLock`), never at start: each costs several MB.
//!
//! Must never: panic on a body it does not understand (it answers `None`),
//! or spend unbounded CPU: at most [`EXACT_BYTES`] of text per call are
//! tokenised, the rest is extrapolated at the rate measured on the counted
//! part, and whitespace-free runs are cut so byte-pair merging (quadratic in
//! the length of one piece) stays cheap. Counting is CPU work (about
//! 25-35 MB/s in release builds); callers on an async runtime should not run
//! it for every request, only when usage is missing.

use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

use crate::config::ApiKind;
use crate::meter::Usage;
use crate::meter::bpe::{Bpe, Pattern};

/// Tokens added per message for the role and the separators around it
/// (OpenAI's published formula for its chat models: 3 per message, 1 more
/// when the message has a `name`, 3 to prime the reply). Applied to every
/// chat-shaped API; for the others it is an approximation like the rest.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens added for a message's `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens added once per chat request for the start of the reply.
pub const REPLY_PRIMING: u64 = 3;
/// Text tokenised exactly per call (bytes); beyond it the count is
/// extrapolated.
pub const EXACT_BYTES: usize = 1 << 20;
/// Longest whitespace-free run handed to the encoder in one piece (bytes).
/// Longer runs are cut, where possible at a point the encoder would split
/// at anyway (so ordinary text counts exactly).
const RUN_MAX: usize = 256;
/// Text is handed to the encoder in segments of about this size, cut before
/// a space that follows a non-space (a point where the encoder splits).
const SEGMENT: usize = 16 << 10;

/// A byte-pair encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, o-series, gpt-5; the approximation for every
    /// model tiktoken does not know (Claude, Gemini, Llama, ...).
    O200kBase,
    /// gpt-4, gpt-3.5-turbo, text-embedding-3-*, ada-002.
    Cl100kBase,
    /// Retired codex / text-davinci-002/003 models.
    P50kBase,
    /// Retired GPT-3 models.
    R50kBase,
}

impl Encoding {
    /// The tiktoken name of the encoding.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::P50kBase => "p50k_base",
            Encoding::R50kBase => "r50k_base",
        }
    }

    /// The encoder, built on first use; `None` if it cannot be built (the
    /// data is compiled in, so that is not expected).
    fn bpe(self) -> Option<&'static CoreBPE> {
        static O200K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static CL100K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static P50K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        static R50K: OnceLock<Option<CoreBPE>> = OnceLock::new();
        match self {
            Encoding::O200kBase => O200K.get_or_init(|| tiktoken_rs::o200k_base().ok()),
            Encoding::Cl100kBase => CL100K.get_or_init(|| tiktoken_rs::cl100k_base().ok()),
            Encoding::P50kBase => P50K.get_or_init(|| tiktoken_rs::p50k_base().ok()),
            Encoding::R50kBase => R50K.get_or_init(|| tiktoken_rs::r50k_base().ok()),
        }
        .as_ref()
    }

    /// The regex-free counter of [`crate::meter::bpe`], for the encodings
    /// current models use; built on first use from tiktoken-rs's ranks,
    /// whose encoder is then dropped.
    fn fast(self) -> Option<&'static Bpe> {
        static O200K: OnceLock<Option<Bpe>> = OnceLock::new();
        static CL100K: OnceLock<Option<Bpe>> = OnceLock::new();
        let (cell, pattern, core): (_, _, fn() -> anyhow::Result<CoreBPE>) = match self {
            Encoding::O200kBase => (&O200K, Pattern::O200k, tiktoken_rs::o200k_base),
            Encoding::Cl100kBase => (&CL100K, Pattern::Cl100k, tiktoken_rs::cl100k_base),
            Encoding::P50kBase | Encoding::R50kBase => return None,
        };
        cell.get_or_init(|| {
            let bpe = Bpe::from_core(pattern, &core().ok()?);
            release_freed_memory();
            bpe
        })
        .as_ref()
    }
}

/// Hands memory freed by a dropped encoder back to the system (glibc keeps
/// it otherwise, and the resident size would show the encoder for good).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The encoding used for `model`: its own for models tiktoken knows (after
/// a `vendor/` or `models/` prefix), o200k_base otherwise.
pub fn encoding_for(model: Option<&str>) -> Encoding {
    let Some(m) = model else {
        return Encoding::O200kBase;
    };
    let m = m.trim().to_ascii_lowercase();
    let m = m.rsplit('/').next().unwrap_or("");
    match get_tokenizer(m) {
        Some(Tokenizer::Cl100kBase) => Encoding::Cl100kBase,
        Some(Tokenizer::P50kBase | Tokenizer::P50kEdit) => Encoding::P50kBase,
        Some(Tokenizer::R50kBase | Tokenizer::Gpt2) => Encoding::R50kBase,
        Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony) | None => Encoding::O200kBase,
    }
}

/// The model whose encoding counts a request: the response's when
/// tiktoken knows it (an Azure deployment answers as the model it runs,
/// `gpt-35-turbo`, where the request names only the deployment), else the
/// request's, else the response's.
pub fn tokenizer_model<'a>(response: Option<&'a str>, request: Option<&'a str>) -> Option<&'a str> {
    let known = |m: &str| {
        let m = m.trim().to_ascii_lowercase();
        get_tokenizer(m.rsplit('/').next().unwrap_or("")).is_some()
    };
    match response {
        Some(r) if known(r) => Some(r),
        _ => request.or(response),
    }
}

/// Tokens in `text` for `model` (no special tokens: text that looks like
/// `<|endoftext|>` counts as ordinary text).
pub fn count_tokens(model: Option<&str>, text: &str) -> u64 {
    let mut c = Counter::new(encoding_for(model));
    c.text(text);
    c.total()
}

/// Estimated output tokens for generated `text`. Hidden reasoning tokens
/// are not in the text and are not counted.
pub fn estimate_output(model: Option<&str>, text: &str) -> u64 {
    count_tokens(model, text)
}

/// Estimated input tokens of a request body, counted with the encoding of
/// the body's `model` (if it names one). `None` when the body is not JSON
/// or has none of the prompt fields of `api`.
///
/// What is counted: the text of every message (system prompt included),
/// tool-call arguments and tool results, and tool definitions as compact
/// JSON; images, audio and files are not. The total is
/// `Σ text + TOKENS_PER_MESSAGE × messages + TOKENS_PER_NAME × names +
/// REPLY_PRIMING` for chat-shaped requests, and `Σ text` for plain inputs
/// (embeddings, legacy `prompt`).
pub fn estimate_input(api: ApiKind, body: &[u8]) -> Option<u64> {
    estimate_input_for(api, None, body)
}

/// [`estimate_input`] with the model named by the caller (the body of an
/// Azure, Gemini or Bedrock request does not name it); the body's own
/// `model` is used when `model` is `None`.
pub fn estimate_input_for(api: ApiKind, model: Option<&str>, body: &[u8]) -> Option<u64> {
    // A body of millions of tiny values would take many times its size as
    // a document: not estimated (no request the providers take holds that
    // many; their token limits stop far short of it).
    if !crate::providers::whole_value_affordable(body) {
        tracing::debug!(
            bytes = body.len(),
            "request body of over a million JSON values: its input is not estimated"
        );
        return None;
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object()?;
    let model = model.or_else(|| obj.get("model").and_then(Value::as_str));
    let mut c = Counter::new(encoding_for(model));
    let known = match api {
        ApiKind::Openai | ApiKind::AzureOpenai => openai(&v, &mut c),
        ApiKind::Anthropic => chat(&v, &mut c),
        ApiKind::Gemini => gemini(&v, &mut c),
        ApiKind::Bedrock => bedrock(&v, &mut c),
    };
    known.then(|| c.total())
}

/// Fills the counts a provider did not report with local estimates: input
/// from the request body when `usage.input_tokens` is 0, output from the
/// generated text when `usage.output_tokens` is 0. Cache and reasoning
/// subsets are left as they are. Returns true when it filled anything (the
/// record is then `estimated`).
///
/// `model` is the request's model (or the response's); `request_body` the
/// body as forwarded, when it was read (`None` leaves input as it is).
pub fn fill_estimate(
    usage: &mut Usage,
    api: ApiKind,
    model: Option<&str>,
    request_body: Option<&[u8]>,
    output_text: &str,
) -> bool {
    let mut filled = false;
    if usage.input_tokens == 0
        && let Some(n) = request_body.and_then(|b| estimate_input_for(api, model, b))
        && n > 0
    {
        usage.input_tokens = n;
        filled = true;
    }
    if usage.output_tokens == 0 && !output_text.is_empty() {
        let n = estimate_output(model, output_text);
        if n > 0 {
            usage.output_tokens = n;
            filled = true;
        }
    }
    filled
}

/// Raises a provisional output count (a stream cut before the provider's
/// final counts) to the local estimate of the text that did stream, when
/// that is higher. Returns true when it changed the count.
pub fn raise_output(usage: &mut Usage, model: Option<&str>, output_text: &str) -> bool {
    if output_text.is_empty() {
        return false;
    }
    let n = estimate_output(model, output_text);
    if n <= usage.output_tokens {
        return false;
    }
    usage.output_tokens = n;
    true
}

/// OpenAI chat (`messages`), responses (`input`, `instructions`),
/// embeddings (`input`) and legacy completions (`prompt`).
fn openai(v: &Value, c: &mut Counter) -> bool {
    if v.get("messages").is_some_and(Value::is_array) {
        return chat(v, c);
    }
    let mut known = false;
    let mut chat_like = false;
    if let Some(s) = v.get("instructions").and_then(Value::as_str) {
        c.message();
        c.text(s);
        chat_like = true;
        known = true;
    }
    for key in ["input", "prompt"] {
        match v.get(key) {
            Some(Value::String(s)) => {
                c.text(s);
                known = true;
            }
            Some(Value::Array(items)) => {
                known = true;
                for item in items {
                    match item {
                        Value::String(s) => c.text(s),
                        // Token ids (embeddings accept them).
                        Value::Number(_) => c.tokens += 1,
                        Value::Array(ids) => c.tokens += ids.len() as u64,
                        Value::Object(_) => {
                            chat_like = true;
                            message(item, c);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if known {
            break;
        }
    }
    if chat_like {
        c.tokens += REPLY_PRIMING;
        tools(v, c);
    }
    known
}

/// Chat-shaped bodies: OpenAI chat, Anthropic messages, Bedrock Converse
/// (and Anthropic bodies sent to Bedrock's InvokeModel): a top-level
/// `system` (string or blocks) and `messages`.
fn chat(v: &Value, c: &mut Counter) -> bool {
    let Some(messages) = v.get("messages").and_then(Value::as_array) else {
        return false;
    };
    if let Some(system) = v.get("system") {
        c.message();
        content(system, c);
    }
    for m in messages {
        message(m, c);
    }
    c.tokens += REPLY_PRIMING;
    tools(v, c);
    true
}

/// One message: its content, name, and (OpenAI) tool calls.
fn message(m: &Value, c: &mut Counter) {
    c.message();
    if let Some(x) = m.get("content") {
        content(x, c);
    }
    if let Some(name) = m.get("name").and_then(Value::as_str) {
        c.tokens += TOKENS_PER_NAME;
        c.text(name);
    }
    // Responses API items that are not messages.
    for key in ["output", "arguments"] {
        if let Some(s) = m.get(key).and_then(Value::as_str) {
            c.text(s);
        }
    }
    let calls = m.get("tool_calls").and_then(Value::as_array);
    for call in calls.into_iter().flatten() {
        if let Some(f) = call.get("function") {
            block(f, c);
        }
    }
    if let Some(f) = m.get("function_call") {
        block(f, c);
    }
}

/// Message content: a string, or an array of parts/blocks.
fn content(v: &Value, c: &mut Counter) {
    match v {
        Value::String(s) => c.text(s),
        Value::Array(parts) => {
            for p in parts {
                match p {
                    Value::String(s) => c.text(s),
                    Value::Object(_) => block(p, c),
                    _ => {}
                }
            }
        }
        Value::Object(_) => block(v, c),
        _ => {}
    }
}

/// One content block of any API: `text` (OpenAI parts, Anthropic, Converse,
/// Gemini parts); structured tool data counted as compact JSON (Anthropic
/// `tool_use.input`, Gemini `functionCall.args` / `functionResponse.response`,
/// Converse `json`); nested results (Anthropic `tool_result.content`,
/// Converse `toolUse` / `toolResult`, Gemini `functionCall` / ...).
fn block(b: &Value, c: &mut Counter) {
    if let Some(s) = b.get("text").and_then(Value::as_str) {
        c.text(s);
    }
    for key in ["name", "arguments"] {
        if let Some(s) = b.get(key).and_then(Value::as_str) {
            c.text(s);
        }
    }
    for key in ["input", "args", "response", "json"] {
        match b.get(key) {
            Some(Value::String(s)) => c.text(s),
            Some(x @ (Value::Object(_) | Value::Array(_))) => c.json(x),
            _ => {}
        }
    }
    if let Some(x) = b.get("content") {
        content(x, c);
    }
    for key in ["toolUse", "toolResult", "functionCall", "functionResponse"] {
        if let Some(x) = b.get(key).filter(|x| x.is_object()) {
            block(x, c);
        }
    }
}

/// Tool definitions, as compact JSON (providers render them differently;
/// JSON is an over-estimate, which is the safe side for budgets).
fn tools(v: &Value, c: &mut Counter) {
    for key in ["tools", "functions", "toolConfig"] {
        if let Some(x) = v.get(key).filter(|x| !x.is_null()) {
            c.json(x);
        }
    }
}

/// Gemini `generateContent` (`contents`, `systemInstruction`),
/// `embedContent` (`content`) and `batchEmbedContents` (`requests`).
fn gemini(v: &Value, c: &mut Counter) -> bool {
    let mut known = false;
    if let Some(contents) = v.get("contents").and_then(Value::as_array) {
        known = true;
        let system = v
            .get("systemInstruction")
            .or_else(|| v.get("system_instruction"));
        if let Some(s) = system {
            c.message();
            gemini_content(s, c);
        }
        for m in contents {
            c.message();
            gemini_content(m, c);
        }
        c.tokens += REPLY_PRIMING;
        tools(v, c);
    }
    if let Some(x) = v.get("content").filter(|x| x.is_object()) {
        known = true;
        gemini_content(x, c);
    }
    if let Some(reqs) = v.get("requests").and_then(Value::as_array) {
        known = true;
        for r in reqs {
            if let Some(x) = r.get("content") {
                gemini_content(x, c);
            }
        }
    }
    // Vertex AI's `:predict` for embedding models: each instance's
    // `content` and optional `title`.
    if let Some(instances) = v.get("instances").and_then(Value::as_array) {
        known = true;
        for i in instances {
            for key in ["title", "content"] {
                if let Some(s) = i.get(key).and_then(Value::as_str) {
                    c.text(s);
                }
            }
        }
    }
    // The Interactions API: `input` (text, content items, or turns) and
    // `system_instruction`.
    if v.get("contents").is_none()
        && let Some(input) = v.get("input")
    {
        known = true;
        if let Some(s) = v.get("system_instruction").and_then(Value::as_str) {
            c.message();
            c.text(s);
        }
        c.message();
        interaction_input(input, c, 0);
        c.tokens += REPLY_PRIMING;
        tools(v, c);
    }
    known
}

/// The text of an Interactions API `input`, however nested (bounded).
fn interaction_input(v: &Value, c: &mut Counter, depth: usize) {
    if depth > 8 {
        return;
    }
    match v {
        Value::String(s) => c.text(s),
        Value::Array(items) => {
            for i in items {
                interaction_input(i, c, depth + 1);
            }
        }
        Value::Object(o) => {
            if let Some(Value::String(t)) = o.get("text") {
                c.text(t);
            }
            for k in ["content", "parts"] {
                if let Some(x) = o.get(k) {
                    interaction_input(x, c, depth + 1);
                }
            }
        }
        _ => {}
    }
}

/// A Gemini `Content` (`{role, parts: [...]}`), or a bare string.
fn gemini_content(v: &Value, c: &mut Counter) {
    match v {
        Value::String(s) => c.text(s),
        _ => {
            if let Some(parts) = v.get("parts") {
                content(parts, c);
            }
        }
    }
}

/// Bedrock: Converse (`messages`, `system`), Anthropic bodies for
/// InvokeModel, and the single-prompt InvokeModel bodies (`inputText`,
/// `prompt`).
fn bedrock(v: &Value, c: &mut Counter) -> bool {
    if chat(v, c) {
        return true;
    }
    for key in ["inputText", "prompt"] {
        if let Some(s) = v.get(key).and_then(Value::as_str) {
            c.text(s);
            return true;
        }
    }
    false
}

/// Adds up tokens, tokenising at most [`EXACT_BYTES`] and extrapolating
/// the rest.
struct Counter {
    enc: Encoding,
    tokens: u64,
    exact_left: usize,
    counted_bytes: u64,
    counted_tokens: u64,
    skipped_bytes: u64,
}

impl Counter {
    fn new(enc: Encoding) -> Counter {
        Counter {
            enc,
            tokens: 0,
            exact_left: EXACT_BYTES,
            counted_bytes: 0,
            counted_tokens: 0,
            skipped_bytes: 0,
        }
    }

    fn message(&mut self) {
        self.tokens += TOKENS_PER_MESSAGE;
    }

    fn json(&mut self, v: &Value) {
        if let Ok(s) = serde_json::to_string(v) {
            self.text(&s);
        }
    }

    fn text(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        let (head, tail) = s.split_at(s.floor_char_boundary(self.exact_left));
        if !head.is_empty() {
            let n = count_exact(self.enc, head);
            self.counted_bytes += head.len() as u64;
            self.counted_tokens += n;
            self.exact_left -= head.len();
        }
        self.skipped_bytes += tail.len() as u64;
    }

    fn total(&self) -> u64 {
        let extra = if self.skipped_bytes == 0 {
            0
        } else if self.counted_bytes == 0 {
            self.skipped_bytes.div_ceil(4)
        } else {
            (self.skipped_bytes as f64 * self.counted_tokens as f64 / self.counted_bytes as f64)
                .ceil() as u64
        };
        self.tokens + self.counted_tokens + extra
    }
}

/// Tokens in `text` (all of it) with `enc`.
fn count_exact(enc: Encoding, text: &str) -> u64 {
    let fast = enc.fast();
    let slow = if fast.is_none() { enc.bpe() } else { None };
    if fast.is_none() && slow.is_none() {
        return (text.len() as u64).div_ceil(4);
    }
    let mut n = 0u64;
    segments(text, |seg| {
        // tiktoken-rs unwraps its regex matches; a panic in either counter
        // must not take the request path with it.
        let counted =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match (fast, slow) {
                (Some(f), _) => f.count(seg),
                (None, Some(b)) => b.encode_ordinary(seg).len() as u64,
                (None, None) => 0,
            }));
        n += counted.unwrap_or_else(|_| (seg.len() as u64).div_ceil(4));
    });
    n
}

/// Calls `f` with consecutive pieces of `text` that together are `text`.
/// Pieces end before a space that follows a non-space once they reach
/// [`SEGMENT`] bytes, and no whitespace-free run is longer than
/// [`RUN_MAX`]: such a run is cut at the last point where tiktoken's
/// pre-tokeniser splits anyway (after a letter or digit, before ASCII
/// punctuation or a digit/letter change), or else hard at a character.
fn segments(text: &str, mut f: impl FnMut(&str)) {
    let mut start = 0usize;
    let mut run: Option<usize> = None;
    let mut safe: Option<usize> = None;
    let mut prev: Option<char> = None;
    for (i, ch) in text.char_indices() {
        if ch.is_whitespace() {
            if ch == ' ' && prev.is_some_and(|p| !p.is_whitespace()) && i - start >= SEGMENT {
                f(&text[start..i]);
                start = i;
            }
            run = None;
            safe = None;
        } else {
            match run {
                None => run = Some(i),
                Some(_) => {
                    if prev.is_some_and(|p| splits(p, ch)) {
                        safe = Some(i);
                    }
                }
            }
            let run_start = run.unwrap_or(i).max(start);
            if i - run_start >= RUN_MAX {
                let cut = safe.filter(|s| *s > start).unwrap_or(i);
                f(&text[start..cut]);
                start = cut;
                run = Some(cut);
                safe = None;
            }
        }
        prev = Some(ch);
    }
    if start < text.len() {
        f(&text[start..]);
    }
}

/// Whether tiktoken's pre-tokeniser (cl100k, o200k and the older ones)
/// always ends a piece between `a` and `b`: a letter piece ends before
/// anything but a letter or an apostrophe, a digit piece before a
/// non-digit. ASCII only, to stay clear of Unicode letter classes.
fn splits(a: char, b: char) -> bool {
    if !(a.is_ascii() && b.is_ascii()) {
        return false;
    }
    (a.is_ascii_alphabetic() && (b.is_ascii_digit() || (b.is_ascii_punctuation() && b != '\'')))
        || (a.is_ascii_digit() && !b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(enc: Encoding, s: &str) -> u64 {
        enc.bpe().expect("encoder").encode_ordinary(s).len() as u64
    }

    #[test]
    fn a_provisional_output_count_is_raised_to_the_estimate_only() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        let mut u = Usage {
            input_tokens: 500,
            output_tokens: 1,
            ..Default::default()
        };
        assert!(raise_output(&mut u, Some("claude-sonnet-4-5"), &text));
        assert!(u.output_tokens > 100, "{u:?}");
        assert_eq!(u.input_tokens, 500);
        // Never lowered, and nothing to estimate from changes nothing.
        let mut high = Usage {
            output_tokens: 100_000,
            ..Default::default()
        };
        assert!(!raise_output(&mut high, None, &text));
        assert_eq!(high.output_tokens, 100_000);
        assert!(!raise_output(&mut u, None, ""));
    }

    #[test]
    fn current_encodings_use_the_regex_free_counter() {
        assert!(Encoding::O200kBase.fast().is_some());
        assert!(Encoding::Cl100kBase.fast().is_some());
        assert!(Encoding::P50kBase.fast().is_none());
        // And it agrees with tiktoken-rs through the public entry point.
        let text = "fn main() { println!(\"I'm here\"); }  \n\n  数据 1234567";
        assert_eq!(
            count_tokens(Some("gpt-4o"), text),
            exact(Encoding::O200kBase, text)
        );
        assert_eq!(
            count_tokens(Some("gpt-4"), text),
            exact(Encoding::Cl100kBase, text)
        );
    }

    #[test]
    fn known_counts() {
        assert_eq!(count_tokens(Some("gpt-4o"), "hello world"), 2);
        assert_eq!(count_tokens(Some("gpt-4"), "hello world"), 2);
        assert_eq!(count_tokens(None, "hello world"), 2);
        // OpenAI cookbook: "tiktoken is great!" is 6 tokens in cl100k_base.
        assert_eq!(count_tokens(Some("gpt-3.5-turbo"), "tiktoken is great!"), 6);
        assert_eq!(count_tokens(Some("gpt-4o"), ""), 0);
        // Special tokens count as text.
        assert!(count_tokens(None, "<|endoftext|>") > 1);
    }

    #[test]
    fn encodings_per_model() {
        let e = |m: &str| encoding_for(Some(m));
        assert_eq!(e("gpt-4o-2024-08-06"), Encoding::O200kBase);
        assert_eq!(e("gpt-4.1-mini"), Encoding::O200kBase);
        assert_eq!(e("o3-mini"), Encoding::O200kBase);
        assert_eq!(e("gpt-5"), Encoding::O200kBase);
        assert_eq!(e("gpt-4-0613"), Encoding::Cl100kBase);
        assert_eq!(e("gpt-3.5-turbo"), Encoding::Cl100kBase);
        assert_eq!(e("gpt-35-turbo"), Encoding::Cl100kBase);
        assert_eq!(e("text-embedding-3-small"), Encoding::Cl100kBase);
        assert_eq!(e("openai/gpt-4"), Encoding::Cl100kBase);
        assert_eq!(e("claude-sonnet-4-5"), Encoding::O200kBase);
        assert_eq!(e("models/gemini-2.5-flash"), Encoding::O200kBase);
        assert_eq!(e("my-azure-deployment"), Encoding::O200kBase);
        assert_eq!(encoding_for(None), Encoding::O200kBase);
        assert_eq!(Encoding::Cl100kBase.name(), "cl100k_base");
    }

    #[test]
    fn the_response_model_picks_the_encoding_when_tiktoken_knows_it() {
        // An Azure deployment: the model it answers as picks the encoding.
        assert_eq!(
            encoding_for(tokenizer_model(Some("gpt-35-turbo"), Some("my-deployment"))),
            Encoding::Cl100kBase
        );
        assert_eq!(
            tokenizer_model(Some("gpt-4o-2024-08-06"), Some("gpt4o-ptu")),
            Some("gpt-4o-2024-08-06")
        );
        // A response model tiktoken does not know: the request's.
        assert_eq!(
            tokenizer_model(Some("claude-x"), Some("gpt-4")),
            Some("gpt-4")
        );
        assert_eq!(tokenizer_model(Some("claude-x"), None), Some("claude-x"));
        assert_eq!(tokenizer_model(None, Some("gpt-4")), Some("gpt-4"));
    }

    #[test]
    fn openai_chat_body() {
        let body = br#"{"model":"gpt-4o","messages":[
            {"role":"system","content":"You are terse."},
            {"role":"user","name":"ann","content":[{"type":"text","text":"hello world"},{"type":"image_url","image_url":{"url":"data:..."}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"}
        ]}"#;
        let t = |s| count_tokens(Some("gpt-4o"), s);
        let want = t("You are terse.")
            + t("hello world")
            + t("ann")
            + TOKENS_PER_NAME
            + t("f")
            + t("{\"a\":1}")
            + t("42")
            + 4 * TOKENS_PER_MESSAGE
            + REPLY_PRIMING;
        assert_eq!(estimate_input(ApiKind::Openai, body), Some(want));
        // gpt-4 counts with cl100k.
        let old =
            br#"{"model":"gpt-4","messages":[{"role":"user","content":"tiktoken is great!"}]}"#;
        assert_eq!(
            estimate_input(ApiKind::Openai, old),
            Some(6 + TOKENS_PER_MESSAGE + REPLY_PRIMING)
        );
    }

    #[test]
    fn openai_other_shapes() {
        let hw = 2;
        let e = |b: &[u8]| estimate_input(ApiKind::Openai, b);
        assert_eq!(
            e(br#"{"model":"text-embedding-3-small","input":"hello world"}"#),
            Some(hw)
        );
        assert_eq!(
            e(br#"{"model":"text-embedding-3-small","input":["hello world","hello world"]}"#),
            Some(2 * hw)
        );
        assert_eq!(e(br#"{"input":[[1,2,3],[4,5]]}"#), Some(5));
        assert_eq!(e(br#"{"prompt":"hello world"}"#), Some(hw));
        assert_eq!(
            e(br#"{"model":"gpt-5","instructions":"hello world","input":[{"role":"user","content":[{"type":"input_text","text":"hello world"}]}]}"#),
            Some(2 * hw + 2 * TOKENS_PER_MESSAGE + REPLY_PRIMING)
        );
        assert_eq!(
            estimate_input(
                ApiKind::AzureOpenai,
                br#"{"messages":[{"role":"user","content":"hello world"}]}"#
            ),
            Some(hw + TOKENS_PER_MESSAGE + REPLY_PRIMING)
        );
    }

    #[test]
    fn anthropic_body_with_blocks() {
        let body = br#"{"model":"claude-sonnet-4-5","max_tokens":10,
            "system":[{"type":"text","text":"You are terse.","cache_control":{"type":"ephemeral"}}],
            "tools":[{"name":"get","input_schema":{"type":"object"}}],
            "messages":[
              {"role":"user","content":"hello world"},
              {"role":"assistant","content":[{"type":"text","text":"hi"},{"type":"tool_use","id":"t","name":"get","input":{"q":"x"}}]},
              {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"result"}]},{"type":"image","source":{"type":"base64","data":"AAAA"}}]}
            ]}"#;
        let t = |s| count_tokens(None, s);
        let want = t("You are terse.")
            + t("hello world")
            + t("hi")
            + t("get")
            + t(r#"{"q":"x"}"#)
            + t("result")
            + t(&serde_json::json!([{"name":"get","input_schema":{"type":"object"}}]).to_string())
            + 4 * TOKENS_PER_MESSAGE
            + REPLY_PRIMING;
        assert_eq!(estimate_input(ApiKind::Anthropic, body), Some(want));
        let plain =
            br#"{"system":"hello world","messages":[{"role":"user","content":"hello world"}]}"#;
        assert_eq!(
            estimate_input(ApiKind::Anthropic, plain),
            Some(4 + 2 * TOKENS_PER_MESSAGE + REPLY_PRIMING)
        );
    }

    #[test]
    fn gemini_body() {
        let body = br#"{"systemInstruction":{"parts":[{"text":"You are terse."}]},
            "contents":[{"role":"user","parts":[{"text":"hello world"},{"inlineData":{"mimeType":"image/png","data":"AAAA"}}]},
                        {"role":"model","parts":[{"functionCall":{"name":"f","args":{"a":1}}}]},
                        {"role":"user","parts":[{"functionResponse":{"name":"f","response":{"r":2}}}]}],
            "generationConfig":{"maxOutputTokens":10}}"#;
        let t = |s| count_tokens(None, s);
        let want = t("You are terse.")
            + t("hello world")
            + 2 * t("f")
            + t(r#"{"a":1}"#)
            + t(r#"{"r":2}"#)
            + 4 * TOKENS_PER_MESSAGE
            + REPLY_PRIMING;
        assert_eq!(estimate_input(ApiKind::Gemini, body), Some(want));
        assert_eq!(
            estimate_input(
                ApiKind::Gemini,
                br#"{"content":{"parts":[{"text":"hello world"}]}}"#
            ),
            Some(2)
        );
        assert_eq!(
            estimate_input(
                ApiKind::Gemini,
                br#"{"system_instruction":{"parts":[{"text":"hello world"}]},"contents":[]}"#
            ),
            Some(2 + TOKENS_PER_MESSAGE + REPLY_PRIMING)
        );
        // Vertex AI's `:predict` for an embedding model.
        assert_eq!(
            estimate_input(
                ApiKind::Gemini,
                br#"{"instances":[{"task_type":"RETRIEVAL_DOCUMENT","title":"hello","content":"hello world"},{"content":"world"}],"parameters":{"autoTruncate":true}}"#
            ),
            Some(t("hello") + t("hello world") + t("world"))
        );
    }

    #[test]
    fn bedrock_bodies() {
        let converse = br#"{"system":[{"text":"You are terse."}],
            "messages":[{"role":"user","content":[{"text":"hello world"}]},
                        {"role":"assistant","content":[{"toolUse":{"toolUseId":"t","name":"f","input":{"a":1}}}]},
                        {"role":"user","content":[{"toolResult":{"toolUseId":"t","content":[{"json":{"r":2}},{"text":"ok"}]}}]}],
            "inferenceConfig":{"maxTokens":10}}"#;
        let t = |s| count_tokens(None, s);
        let want = t("You are terse.")
            + t("hello world")
            + t("f")
            + t(r#"{"a":1}"#)
            + t(r#"{"r":2}"#)
            + t("ok")
            + 4 * TOKENS_PER_MESSAGE
            + REPLY_PRIMING;
        assert_eq!(estimate_input(ApiKind::Bedrock, converse), Some(want));
        let invoke = br#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[{"role":"user","content":"hello world"}]}"#;
        assert_eq!(
            estimate_input(ApiKind::Bedrock, invoke),
            Some(2 + TOKENS_PER_MESSAGE + REPLY_PRIMING)
        );
        assert_eq!(
            estimate_input(ApiKind::Bedrock, br#"{"inputText":"hello world"}"#),
            Some(2)
        );
    }

    #[test]
    fn garbage_is_none() {
        for api in [
            ApiKind::Openai,
            ApiKind::AzureOpenai,
            ApiKind::Anthropic,
            ApiKind::Gemini,
            ApiKind::Bedrock,
        ] {
            for body in [
                &b""[..],
                b"not json",
                b"null",
                b"[]",
                b"{}",
                b"\xff\xfe{",
                br#"{"messages":"hello"}"#,
                br#"{"model":"gpt-4o"}"#,
                br#"{"contents":{"parts":"x"},"content":"x"}"#,
            ] {
                assert_eq!(
                    estimate_input(api, body),
                    None,
                    "{api:?} {}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(estimate_input(ApiKind::Openai, deep.as_bytes()), None);
    }

    #[test]
    fn fill_estimate_fills_only_what_is_missing() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#;
        let mut u = Usage::default();
        assert!(fill_estimate(
            &mut u,
            ApiKind::Openai,
            Some("gpt-4o"),
            Some(body),
            "hello world"
        ));
        assert_eq!(
            (u.input_tokens, u.output_tokens),
            (2 + TOKENS_PER_MESSAGE + REPLY_PRIMING, 2)
        );
        let mut reported = Usage {
            input_tokens: 100,
            ..Usage::default()
        };
        assert!(fill_estimate(
            &mut reported,
            ApiKind::Anthropic,
            None,
            Some(body),
            "hello world"
        ));
        assert_eq!((reported.input_tokens, reported.output_tokens), (100, 2));
        let mut none = Usage::default();
        assert!(!fill_estimate(
            &mut none,
            ApiKind::Openai,
            None,
            Some(b"garbage"),
            ""
        ));
        assert_eq!(none, Usage::default());
    }

    #[test]
    fn segmenting_keeps_ordinary_text_exact() {
        let mut text = String::new();
        let mut i = 0u32;
        while text.len() < 200_000 {
            text.push_str("The quick brown fox jumps over the lazy dog, said Ann's 3 friends. ");
            text.push_str(&format!(
                "{{\"id\":{i},\"name\":\"item{i}\",\"tags\":[\"a\",\"bb\",\"ccc\"],\"url\":\"https://example.com/path/to/resource?q={i}&x=y\"}}"
            ));
            text.push_str("\n\tfn main() { let x = vec![1, 2, 3]; println!(\"{x:?}\"); }\n");
            text.push_str("Ünïcödé wörds and 漢字 text; 12345678901234567890 digits.\n  \n");
            i += 1;
        }
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            assert_eq!(count_exact(enc, &text), exact(enc, &text), "{enc:?}");
        }
        let mut pieces = String::new();
        segments(&text, |s| pieces.push_str(s));
        assert_eq!(pieces, text, "segments cover the text");
    }

    #[test]
    fn long_runs_are_cut_and_large_texts_extrapolated() {
        // A single 300 KB "word" would take the encoder minutes in one piece.
        let run = "a".repeat(300_000);
        let n = count_tokens(None, &run);
        assert!(n > 300_000 / 64 && n < 300_000, "{n}");
        let mut max = 0;
        segments(&run, |s| max = max.max(s.len()));
        assert!(max <= RUN_MAX, "{max}");
        // Beyond EXACT_BYTES the count is extrapolated from the counted part.
        let para = "hello world, this is a test of token counting. ";
        let big = para.repeat(EXACT_BYTES / para.len() * 3 / 2);
        let sample = para.repeat(1000);
        let per = count_tokens(None, &sample) as f64 / sample.len() as f64;
        let est = count_tokens(None, &big) as f64;
        let want = per * big.len() as f64;
        assert!((est - want).abs() / want < 0.01, "{est} vs {want}");
    }

    proptest! {
        #[test]
        fn never_panics_on_any_body(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            for api in [ApiKind::Openai, ApiKind::Anthropic, ApiKind::Gemini, ApiKind::Bedrock] {
                let _ = estimate_input(api, &body);
            }
        }

        #[test]
        fn segments_always_cover_the_text(s in "\\PC{0,600}") {
            let mut out = String::new();
            segments(&s, |p| out.push_str(p));
            prop_assert_eq!(out, s);
        }

        #[test]
        fn json_shaped_bodies_never_panic(s in "\\PC{0,64}", n in 0u64..5) {
            let body = serde_json::json!({
                "messages": [{"role": "user", "content": [{"text": s.clone()}, s.clone(), n]}],
                "contents": [{"parts": [{"text": s.clone()}, {"functionCall": s.clone()}]}],
                "input": [s.clone(), n, [n]],
                "system": [{"text": s}],
            });
            let b = serde_json::to_vec(&body).expect("json");
            for api in [ApiKind::Openai, ApiKind::Anthropic, ApiKind::Gemini, ApiKind::Bedrock] {
                prop_assert!(estimate_input(api, &b).is_some());
            }
        }
    }
}
