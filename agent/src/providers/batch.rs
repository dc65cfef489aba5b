//! Batch results: what a provider serves once a batch has ended, each
//! result with the usage of the request it answered (OpenAI's output file,
//! `GET …/files/{id}/content`, and Anthropic's results, `GET
//! …/messages/batches/{id}/results`, one result per JSONL line; Gemini's
//! responses file the same, or a finished batch with its responses
//! inlined in one document).
//!
//! A batch's submission bills nothing itself; its spend is in these
//! results, at the batch rates (half the standard ones at every provider
//! that has batches). This module reads the results as they stream past,
//! line by line, and sums each model's usage. Each result that bills is
//! claimed, by its place in the results, in the proxy's table of what was
//! counted (see `proxy::batches`) as it is read: a result is counted by
//! the first read that reaches it, however many reads there are, at once
//! or one after another, whole or cut short.
//!
//! Owns: reading results and summing their usage per model.
//! Must never: hold more than one line of the results (or one bounded
//! document) besides the sums (and the counts of each long prompt, see
//! `ManyRequests`), count a result another read claimed, or count a line
//! that did not arrive whole.

use std::collections::HashMap;
use std::sync::Arc;

use super::{ParsedUsage, UsageParser};
use crate::meter::pricing::ManyRequests;
use crate::meter::{MAX_MODEL_NAME, Usage};

/// The operation recorded for a batch's results.
pub const OPERATION: &str = "batch_results";

/// The service tier of every result row: each provider bills a batch's
/// requests at its batch rates, whatever tier a result line names.
pub const TIER: &str = crate::meter::pricing::BATCH_TIER;

/// The longest result line read (a longer one is passed on, counted as a
/// line, and its usage left out, logged at debug).
pub const MAX_LINE: usize = 16 << 20;

/// The most models (with their uplifts) a read sums apart. Results name
/// whatever model their file says, so one read could name a new one on
/// every line; past this many, the results of models not seen yet are
/// summed in one more tally without a model ([`BatchTally::result`]):
/// their tokens are counted (at an unknown cost, as any result without a
/// model), and a read holds at most this many tallies plus that one.
pub const MAX_MODELS: usize = 256;

/// What one result says was billed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineUsage {
    pub model: Option<String>,
    pub usage: Usage,
    /// The percentage added to every rate for where the request ran.
    pub uplift_percent: u32,
}

/// Reads a result line (one JSON document, without its newline); `None`
/// for a line that bills nothing (an errored, cancelled or expired
/// request, a line of a file that is not results).
pub type LineReader = fn(&[u8]) -> Option<LineUsage>;

/// How a provider serves a batch's results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// OpenAI's output file: `{"custom_id", "response": {"status_code",
    /// "body"}}` per line.
    #[default]
    OpenAi,
    /// OpenAI's format from a host that may count thoughts only in
    /// `total_tokens` (Gemini's OpenAI-compatible endpoint; see
    /// `openai::WireUsage::usage_for`).
    OpenAiThoughtsBeside,
    /// Anthropic's results: `{"custom_id", "result": {"type", "message"}}`
    /// per line.
    Anthropic,
    /// Gemini's responses file: `{"key", "response"}` per line.
    GeminiLines,
    /// A finished Gemini batch, its responses inlined.
    GeminiInlined,
}

/// The table of what was counted (the proxy's).
pub trait Counted: Send + Sync {
    /// Result `index` (its place in the results) of batch `key` bills:
    /// whether this read is the first to reach it, and counts it.
    fn claim(&self, key: &str, index: u64) -> bool;
    /// Every result of batch `key` has been read (and claimed).
    fn read_whole(&self, key: &str);
}

/// Where a read claims its results: the table and the batch's key there.
/// Without one (tests of a parser alone) every result counts. Compares
/// equal to any other: a request is not told apart by its table.
#[derive(Clone, Default)]
pub struct Claims(Option<(Arc<dyn Counted>, String)>);

impl Claims {
    pub fn new(table: Arc<dyn Counted>, key: String) -> Claims {
        Claims(Some((table, key)))
    }

    fn claim(&self, index: u64) -> bool {
        self.0.as_ref().is_none_or(|(t, k)| t.claim(k, index))
    }

    /// Every result has been read: later reads need not be.
    pub(crate) fn read_whole(&self) {
        if let Some((t, k)) = &self.0 {
            t.read_whole(k);
        }
    }
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some((_, key)) => write!(f, "Claims({key:?})"),
            None => f.write_str("Claims(none)"),
        }
    }
}

impl PartialEq for Claims {
    fn eq(&self, _: &Claims) -> bool {
        true
    }
}

impl Eq for Claims {}

/// One model's share of the results read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelTally {
    pub model: Option<String>,
    pub uplift_percent: u32,
    /// The sums.
    pub usage: Usage,
    /// The same, request by request as far as prices depend on it (a
    /// long prompt is priced alone).
    pub requests: ManyRequests,
    /// Results summed here.
    pub results: u64,
}

/// What a read of batch results found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchTally {
    /// Results read whole (lines, or inlined responses).
    pub lines: u64,
    /// Results that bill but were counted by another read.
    pub counted_before: u64,
    /// Lines too long to read (their usage left out).
    pub too_long: u64,
    /// In the order their models were first read; filled by
    /// [`BatchTally::result`] only (it keeps an index of them).
    pub models: Vec<ModelTally>,
    index: ModelIndex,
}

/// Where each tally of [`BatchTally::models`] is, by its model (capped to
/// [`MAX_MODEL_NAME`], as the ledger keeps it) and uplift.
#[derive(Clone, Default, PartialEq, Eq)]
struct ModelIndex {
    at: HashMap<(Option<String>, u32), usize>,
    /// The tally of the results of models past [`MAX_MODELS`].
    overflow: Option<usize>,
}

impl std::fmt::Debug for ModelIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // What it holds is in the tallies themselves.
        f.debug_struct("ModelIndex")
            .field("len", &self.at.len())
            .field("overflow", &self.overflow)
            .finish()
    }
}

impl BatchTally {
    /// Per model: name, input and output tokens, results (tests).
    #[cfg(test)]
    pub(crate) fn sums(&self) -> Vec<(Option<&str>, u64, u64, u64)> {
        self.models
            .iter()
            .map(|m| {
                (
                    m.model.as_deref(),
                    m.usage.input_tokens,
                    m.usage.output_tokens,
                    m.results,
                )
            })
            .collect()
    }

    /// Result `index`, read whole: what it bills, if anything, counts
    /// when this read claims it, in the tally of its model (its name
    /// capped to [`MAX_MODEL_NAME`]) and uplift. Once [`MAX_MODELS`]
    /// tallies are held, a result of a model not seen yet is summed in
    /// the tally without a model of its uplift when there is one, else in
    /// one overflow tally without a model (made by the first such result,
    /// with its uplift: a tally without a model has no price, so the
    /// uplift of the others there changes no cost).
    pub(crate) fn result(&mut self, index: u64, bills: Option<LineUsage>, claims: &Claims) {
        self.lines = self.lines.max(index + 1);
        let Some(line) = bills else { return };
        if !claims.claim(index) {
            self.counted_before += 1;
            return;
        }
        let mut model = line.model;
        if let Some(name) = model.as_mut() {
            crate::meter::cap_owned(name, MAX_MODEL_NAME);
        }
        let key = (model, line.uplift_percent);
        let at = match self.index.at.get(&key) {
            Some(&at) => at,
            None if self.models.len() < MAX_MODELS => self.push(key),
            None => {
                let unnamed = (None, line.uplift_percent);
                match self.index.at.get(&unnamed).copied().or(self.index.overflow) {
                    Some(at) => at,
                    None => {
                        let at = self.push(unnamed);
                        self.index.overflow = Some(at);
                        at
                    }
                }
            }
        };
        let m = &mut self.models[at];
        m.usage = m.usage.zip_with(&line.usage, u64::saturating_add);
        m.requests.add(line.usage);
        m.results += 1;
    }

    /// A new tally for `key` (model, uplift), indexed: its place.
    fn push(&mut self, key: (Option<String>, u32)) -> usize {
        let at = self.models.len();
        self.models.push(ModelTally {
            model: key.0.clone(),
            uplift_percent: key.1,
            ..Default::default()
        });
        self.index.at.insert(key, at);
        at
    }
}

/// The parser for a read of batch results answered `status`: only a
/// whole answer (200) is read; a part of the results (206, a ranged
/// download resumed) or an error counts nothing.
pub fn parser(results: &super::BatchResults, status: u16) -> Box<dyn UsageParser> {
    if status != 200 {
        // Not the batch's whole results: nothing billed.
        return Box::new(super::NoUsage);
    }
    let claims = results.claims.clone();
    match results.format {
        Format::OpenAi => Box::new(ResultsParser::new(super::openai::batch_result_line, claims)),
        Format::OpenAiThoughtsBeside => Box::new(ResultsParser::new(
            super::openai::batch_result_line_thoughts_beside,
            claims,
        )),
        Format::Anthropic => Box::new(ResultsParser::new(
            super::anthropic::batch_result_line,
            claims,
        )),
        Format::GeminiLines => {
            Box::new(ResultsParser::new(super::gemini::batch_result_line, claims))
        }
        Format::GeminiInlined => Box::new(super::gemini::InlinedParser::new(claims)),
    }
}

/// Reads JSONL batch results line by line.
pub struct ResultsParser {
    read: LineReader,
    claims: Claims,
    buf: Vec<u8>,
    /// The line being read is over [`MAX_LINE`]: dropped up to its end.
    overlong: bool,
    /// Lines read whole so far (blank ones aside).
    index: u64,
    tally: BatchTally,
}

impl ResultsParser {
    pub fn new(read: LineReader, claims: Claims) -> ResultsParser {
        ResultsParser {
            read,
            claims,
            buf: Vec::new(),
            overlong: false,
            index: 0,
            tally: BatchTally::default(),
        }
    }

    /// A line read whole (without its newline).
    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let index = self.index;
        self.index += 1;
        // A line that names no usage (`"usage"`, `"usageMetadata"`) bills
        // nothing, whatever it is: most lines of a file that is not batch
        // results are not parsed.
        let bills = if line.windows(6).any(|w| w == b"\"usage") {
            (self.read)(line)
        } else {
            None
        };
        self.tally.result(index, bills, &self.claims);
    }

    fn overlong_line(&mut self) {
        let index = self.index;
        self.index += 1;
        self.tally.lines = self.index;
        self.tally.too_long += 1;
        tracing::debug!(
            line = index,
            "a batch result line is longer than 16 MiB: its usage is left out"
        );
    }
}

impl UsageParser for ResultsParser {
    fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(nl) = chunk.iter().position(|b| *b == b'\n') {
            let (head, rest) = (&chunk[..nl], &chunk[nl + 1..]);
            chunk = rest;
            if self.overlong {
                self.overlong = false;
                self.overlong_line();
            } else if self.buf.is_empty() && head.len() <= MAX_LINE {
                self.line(head);
            } else if self.buf.len() + head.len() > MAX_LINE {
                self.buf = Vec::new();
                self.overlong_line();
            } else {
                let mut buf = std::mem::take(&mut self.buf);
                buf.extend_from_slice(head);
                self.line(&buf);
                buf.clear();
                self.buf = buf;
            }
        }
        if self.overlong || chunk.is_empty() {
            return;
        }
        if self.buf.len() + chunk.len() > MAX_LINE {
            self.buf = Vec::new();
            self.overlong = true;
        } else {
            self.buf.extend_from_slice(chunk);
        }
    }

    /// Once a result billed, these are batch results: worth reading on
    /// for after the job leaves (a file that is not results is not).
    fn usage_seen(&self) -> bool {
        self.tally.counted_before > 0 || !self.tally.models.is_empty()
    }

    fn finish(&mut self) -> ParsedUsage {
        // A last line without its newline counts when it is a whole JSON
        // document (the end of the results); a line cut off mid-way (the
        // read was abandoned) does not parse, and is left for the next
        // read of the results.
        let last = std::mem::take(&mut self.buf);
        if !last.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&last).is_ok() {
            self.line(&last);
        }
        ParsedUsage {
            usage: Some(Usage::default()),
            batch: Some(std::mem::take(&mut self.tally)),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// `{"model": M, "usage": N}` bills N input tokens; `{"error": …}`
    /// nothing.
    fn read(line: &[u8]) -> Option<LineUsage> {
        let v: Value = serde_json::from_slice(line).ok()?;
        let n = v.get("usage")?.as_u64()?;
        Some(LineUsage {
            model: v.get("model").and_then(Value::as_str).map(str::to_string),
            usage: Usage {
                input_tokens: n,
                output_tokens: 1,
                ..Default::default()
            },
            uplift_percent: 0,
        })
    }

    fn results() -> Vec<u8> {
        let mut s = String::new();
        for (i, m) in ["a", "b", "a", "a"].iter().enumerate() {
            s.push_str(&format!(
                "{{\"model\":\"{m}\",\"usage\":{}}}\n",
                10 * (i + 1)
            ));
            if i == 1 {
                s.push_str("{\"error\":{\"type\":\"expired\"}}\r\n");
            }
        }
        s.into_bytes()
    }

    fn sums(t: &BatchTally) -> Vec<(Option<&str>, u64, u64, u64)> {
        t.sums()
    }

    fn table() -> (Arc<crate::proxy::batches::Batches>, Claims) {
        let t = Arc::new(crate::proxy::batches::Batches::default());
        let claims = Claims::new(t.clone(), "h b".into());
        (t, claims)
    }

    fn parse(claims: &Claims, body: &[u8]) -> BatchTally {
        let mut p = ResultsParser::new(read, claims.clone());
        p.feed(body);
        p.finish().batch.unwrap()
    }

    #[test]
    fn lines_are_summed_per_model_over_every_split() {
        let body = results();
        for split in 0..=body.len() {
            let mut p = ResultsParser::new(read, Claims::default());
            p.feed(&body[..split]);
            p.feed(&body[split..]);
            let t = p.finish().batch.unwrap();
            assert_eq!(
                sums(&t),
                vec![(Some("a"), 10 + 30 + 40, 3, 3), (Some("b"), 20, 1, 1)],
                "split at {split}"
            );
            assert_eq!(t.lines, 5, "the errored line is a line");
        }
    }

    #[test]
    fn a_result_counts_once_however_often_it_is_read() {
        let body = results();
        let (_t, claims) = table();
        let first = parse(&claims, &body);
        assert_eq!(first.models.len(), 2);
        let again = parse(&claims, &body);
        assert!(again.models.is_empty());
        assert_eq!((again.lines, again.counted_before), (5, 4));
    }

    #[test]
    fn a_read_cut_short_is_completed_by_the_next_and_the_last_line_needs_no_newline() {
        let body = results();
        let (_t, claims) = table();
        // Cut inside the fourth line.
        let cut = body
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(2)
            .unwrap()
            .0
            + 8;
        let first = parse(&claims, &body[..cut]);
        assert_eq!(first.lines, 3);
        let second = parse(&claims, &body);
        assert_eq!(sums(&second), vec![(Some("a"), 30 + 40, 2, 2)]);
        let total: u64 = first
            .models
            .iter()
            .chain(&second.models)
            .map(|m| m.usage.input_tokens)
            .sum();
        assert_eq!(total, 100, "every result once");
        // No newline after the last line.
        let t = parse(&Claims::default(), body.strip_suffix(b"\n").unwrap());
        assert_eq!(t.lines, 5);
    }

    #[test]
    fn two_reads_at_once_share_the_results_between_them() {
        // A download that drained to its limit and a retry that started
        // from the top, interleaved: each result is counted by one.
        let body = results();
        let (_t, claims) = table();
        let mut a = ResultsParser::new(read, claims.clone());
        let mut b = ResultsParser::new(read, claims.clone());
        let lines: Vec<&[u8]> = body.split_inclusive(|c| *c == b'\n').collect();
        a.feed(lines[0]);
        a.feed(lines[1]);
        for l in &lines {
            b.feed(l);
        }
        for l in &lines[2..] {
            a.feed(l);
        }
        let (a, b) = (a.finish().batch.unwrap(), b.finish().batch.unwrap());
        assert_eq!(sums(&a), vec![(Some("a"), 10, 1, 1), (Some("b"), 20, 1, 1)]);
        assert_eq!(sums(&b), vec![(Some("a"), 30 + 40, 2, 2)]);
    }

    #[test]
    fn only_a_whole_answer_is_read() {
        let info = crate::providers::BatchResults::default();
        for status in [206, 404, 500] {
            let mut p = parser(&info, status);
            p.feed(&results());
            assert_eq!(p.finish().batch, None, "{status}");
        }
    }

    #[test]
    fn an_overlong_line_is_a_line_without_usage_and_is_not_held() {
        let mut p = ResultsParser::new(read, Claims::default());
        p.feed(b"{\"model\":\"a\",\"usage\":1}\n{\"model\":\"a\",\"pad\":\"");
        let pad = vec![b'x'; 1 << 20];
        for _ in 0..17 {
            p.feed(&pad);
            assert!(p.buf.len() <= MAX_LINE);
        }
        p.feed(b"\",\"usage\":5}\n{\"model\":\"a\",\"usage\":2}\n");
        let t = p.finish().batch.unwrap();
        assert_eq!(sums(&t), vec![(Some("a"), 3, 2, 2)]);
        assert_eq!((t.lines, t.too_long), (3, 1));
    }

    #[test]
    fn garbage_is_a_line_that_bills_nothing() {
        let t = parse(
            &Claims::default(),
            b"not json \"usage\"\n\n{\"model\":\"a\",\"usage\":\"7\"}\n[1,2]\n{\"model\":\"a\",\"usage\":7}\n",
        );
        assert_eq!(sums(&t), vec![(Some("a"), 7, 1, 1)]);
        assert_eq!(t.lines, 4, "blank lines are not lines");
    }

    #[test]
    fn long_prompts_are_kept_apart_for_their_prices() {
        let mut body = String::new();
        for n in [100, 150_000, 200, 150_000] {
            body.push_str(&format!("{{\"model\":\"a\",\"usage\":{n}}}\n"));
        }
        let t = parse(&Claims::default(), body.as_bytes());
        let m = &t.models[0];
        assert_eq!(m.usage.input_tokens, 300_300);
        assert_eq!(m.requests.short.input_tokens, 300);
        assert_eq!(
            m.requests
                .long
                .iter()
                .map(|u| u.input_tokens)
                .collect::<Vec<_>>(),
            [150_000, 150_000]
        );
    }

    /// `n` lines, line `i` of model `name(i)` billing `i + 1` input tokens.
    fn lines_of(n: u64, name: impl Fn(u64) -> String) -> Vec<u8> {
        let mut body = String::new();
        for i in 0..n {
            body.push_str(&format!(
                "{{\"model\":\"{}\",\"usage\":{}}}\n",
                name(i),
                i + 1
            ));
        }
        body.into_bytes()
    }

    #[test]
    fn models_past_the_bound_are_summed_together_and_nothing_is_lost() {
        let n = 12_000;
        let t = parse(&Claims::default(), &lines_of(n, |i| format!("m-{i}")));
        assert_eq!(t.models.len(), MAX_MODELS + 1);
        // The first models each have their own tally, in the order read.
        for (i, m) in t.models[..MAX_MODELS].iter().enumerate() {
            assert_eq!(m.model.as_deref(), Some(format!("m-{i}").as_str()));
            assert_eq!((m.usage.input_tokens, m.results), (i as u64 + 1, 1));
        }
        // The rest in one tally without a model.
        let rest = &t.models[MAX_MODELS];
        assert_eq!(rest.model, None);
        assert_eq!(rest.results, n - MAX_MODELS as u64);
        let input: u64 = t.models.iter().map(|m| m.usage.input_tokens).sum();
        let output: u64 = t.models.iter().map(|m| m.usage.output_tokens).sum();
        let results: u64 = t.models.iter().map(|m| m.results).sum();
        assert_eq!(input, n * (n + 1) / 2, "every token counted");
        assert_eq!((output, results, t.lines), (n, n, n));
        // A model seen before the bound still has its own tally after it.
        let mut p = ResultsParser::new(read, Claims::default());
        p.feed(&lines_of(n, |i| format!("m-{i}")));
        p.feed(b"{\"model\":\"m-3\",\"usage\":1000}\n{\"usage\":5}\n");
        let t = p.finish().batch.unwrap();
        assert_eq!(t.models.len(), MAX_MODELS + 1);
        assert_eq!(t.models[3].usage.input_tokens, 4 + 1000);
        assert_eq!(t.models[MAX_MODELS].results, n - MAX_MODELS as u64 + 1);
    }

    #[test]
    fn results_of_a_model_merge_into_its_one_tally() {
        let t = parse(
            &Claims::default(),
            &lines_of(3_000, |i| format!("m-{}", i % 3)),
        );
        assert_eq!(t.models.len(), 3);
        for (i, m) in t.models.iter().enumerate() {
            assert_eq!(m.model.as_deref(), Some(format!("m-{i}").as_str()));
            assert_eq!(m.results, 1_000);
        }
        let input: u64 = t.models.iter().map(|m| m.usage.input_tokens).sum();
        assert_eq!(input, 3_000 * 3_001 / 2);
        // The same model at another uplift is a tally of its own.
        let mut t = BatchTally::default();
        for (i, uplift) in [0, 10, 0, 10].into_iter().enumerate() {
            let line = LineUsage {
                model: Some("claude".into()),
                usage: Usage {
                    input_tokens: 1,
                    ..Default::default()
                },
                uplift_percent: uplift,
            };
            t.result(i as u64, Some(line), &Claims::default());
        }
        let tallies: Vec<_> = t
            .models
            .iter()
            .map(|m| (m.uplift_percent, m.results))
            .collect();
        assert_eq!(tallies, [(0, 2), (10, 2)]);
    }

    #[test]
    fn an_overlong_model_name_is_capped_and_names_past_the_cap_merge() {
        let long = "x".repeat(MAX_MODEL_NAME);
        let t = parse(
            &Claims::default(),
            &lines_of(4, |i| format!("{long}{}", "é".repeat(i as usize + 1))),
        );
        assert_eq!(t.models.len(), 1, "{:?}", t.sums());
        assert_eq!(t.models[0].model.as_deref(), Some(long.as_str()));
        assert_eq!(t.models[0].results, 4);
        // Capped at a character boundary.
        let t = parse(
            &Claims::default(),
            &lines_of(1, |_| format!("{}é", "x".repeat(MAX_MODEL_NAME - 1))),
        );
        assert_eq!(
            t.models[0].model.as_deref(),
            Some("x".repeat(MAX_MODEL_NAME - 1).as_str())
        );
    }
}
