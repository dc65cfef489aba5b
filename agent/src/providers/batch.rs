//! Batch results: the JSONL a provider serves once a batch has ended, one
//! result per line, each with the usage of the request it answered (the
//! OpenAI Batch API's output file, `GET …/files/{id}/content`; Anthropic's
//! Message Batches results, `GET …/messages/batches/{id}/results`).
//!
//! A batch's submission bills nothing itself; its spend is in these
//! results, at the batch rates (half the standard ones at every provider
//! that has batches). This module reads the results as they stream past,
//! line by line, and sums each model's usage; the proxy writes the sums as
//! rows and remembers how many lines of each batch it has counted, so that
//! reading the same results again counts nothing twice (see
//! `proxy::batches`).
//!
//! Owns: reading result lines and summing their usage per model.
//! Must never: hold more than one line of the results, count a line it
//! was told to skip, or count a line that did not arrive whole.

use serde_json::Value;

use super::{ParsedUsage, UsageParser};
use crate::meter::Usage;

/// The operation recorded for a batch's results.
pub const OPERATION: &str = "batch_results";

/// The service tier of every result row: each provider bills a batch's
/// requests at its batch rates, whatever tier a result line names.
pub const TIER: &str = crate::meter::pricing::BATCH_TIER;

/// The longest result line read (a longer one is passed on, counted as a
/// line, and its usage left out, logged at debug).
pub const MAX_LINE: usize = 16 << 20;

/// What one result line says was billed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineUsage {
    pub model: Option<String>,
    pub usage: Usage,
    /// The percentage added to every rate for where the request ran.
    pub uplift_percent: u32,
}

/// Reads a result line (a whole JSON document); `None` for a line that
/// bills nothing (an errored, cancelled or expired request, an input
/// line).
pub type LineReader = fn(&Value) -> Option<LineUsage>;

/// One model's share of the results read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelTally {
    pub model: Option<String>,
    pub uplift_percent: u32,
    pub usage: Usage,
    /// Result lines summed here.
    pub results: u64,
}

/// What a read of batch results found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchTally {
    /// Lines skipped at the start (counted by an earlier read).
    pub skipped: u64,
    /// Lines read whole, the skipped ones included: where the next read
    /// of the same results starts counting.
    pub lines: u64,
    /// Lines too long to read (counted in `lines`, their usage left out).
    pub too_long: u64,
    pub models: Vec<ModelTally>,
}

impl BatchTally {
    fn add(&mut self, line: LineUsage) {
        let found = self
            .models
            .iter_mut()
            .find(|m| m.model == line.model && m.uplift_percent == line.uplift_percent);
        let m = match found {
            Some(m) => m,
            None => {
                self.models.push(ModelTally {
                    model: line.model,
                    uplift_percent: line.uplift_percent,
                    ..Default::default()
                });
                self.models.last_mut().expect("just pushed")
            }
        };
        m.usage = m.usage.zip_with(&line.usage, u64::saturating_add);
        m.results += 1;
    }
}

/// Reads batch results line by line, skipping the first `skip` lines.
pub struct ResultsParser {
    read: LineReader,
    skip: u64,
    buf: Vec<u8>,
    /// The line being read is over [`MAX_LINE`]: dropped up to its end.
    overlong: bool,
    tally: BatchTally,
}

impl ResultsParser {
    pub fn new(read: LineReader, skip: u64) -> ResultsParser {
        ResultsParser {
            read,
            skip,
            buf: Vec::new(),
            overlong: false,
            tally: BatchTally::default(),
        }
    }

    /// A line read whole (without its newline).
    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let index = self.tally.lines;
        self.tally.lines += 1;
        if index < self.skip {
            self.tally.skipped += 1;
            return;
        }
        // A line that names no usage (`"usage"`, `"usageMetadata"`) bills
        // nothing, whatever it is: most lines of a file that is not batch
        // results are not parsed.
        if !line.windows(6).any(|w| w == b"\"usage") {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(line)
            && let Some(u) = (self.read)(&v)
        {
            self.tally.add(u);
        }
    }

    fn overlong_line(&mut self) {
        let index = self.tally.lines;
        self.tally.lines += 1;
        if index < self.skip {
            self.tally.skipped += 1;
        } else {
            self.tally.too_long += 1;
            tracing::debug!(
                line = index,
                "a batch result line is longer than 16 MiB: its usage is left out"
            );
        }
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
            } else if self.buf.is_empty() {
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

/// Finds a JSON document's list of results (a Gemini batch's inlined
/// responses), if it has one yet, and the model a result that names none
/// was served by.
pub type ItemsOf = fn(&Value) -> Option<(&Vec<Value>, Option<String>)>;

/// Reads batch results that come as one JSON document holding a list of
/// them (a finished Gemini batch, with its responses inlined): each item
/// is a "line", in the list's order.
pub struct ItemsParser {
    body: super::JsonBody,
    items: ItemsOf,
    read: LineReader,
    skip: u64,
}

impl ItemsParser {
    pub fn new(items: ItemsOf, read: LineReader, skip: u64) -> ItemsParser {
        ItemsParser {
            body: super::JsonBody::new(super::JsonBody::DEFAULT_LIMIT),
            items,
            read,
            skip,
        }
    }
}

impl UsageParser for ItemsParser {
    fn feed(&mut self, chunk: &[u8]) {
        self.body.feed(chunk);
    }

    fn finish(&mut self) -> ParsedUsage {
        let mut tally = BatchTally::default();
        if let Some(v) = self.body.take()
            && let Some((items, model)) = (self.items)(&v)
        {
            for (i, item) in items.iter().enumerate() {
                tally.lines += 1;
                if (i as u64) < self.skip {
                    tally.skipped += 1;
                } else if let Some(mut u) = (self.read)(item) {
                    if u.model.is_none() {
                        u.model.clone_from(&model);
                    }
                    tally.add(u);
                }
            }
        }
        ParsedUsage {
            usage: Some(Usage::default()),
            batch: Some(tally),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{"model": M, "usage": N}` bills N input tokens; `{"error": …}`
    /// nothing.
    fn read(v: &Value) -> Option<LineUsage> {
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
        t.models
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

    #[test]
    fn lines_are_summed_per_model_over_every_split() {
        let body = results();
        for split in 0..=body.len() {
            let mut p = ResultsParser::new(read, 0);
            p.feed(&body[..split]);
            p.feed(&body[split..]);
            let t = p.finish().batch.unwrap();
            assert_eq!(
                sums(&t),
                vec![(Some("a"), 10 + 30 + 40, 3, 3), (Some("b"), 20, 1, 1)],
                "split at {split}"
            );
            assert_eq!((t.lines, t.skipped), (5, 0), "the errored line is a line");
        }
    }

    #[test]
    fn skipped_lines_are_not_counted_and_the_next_read_starts_after_them() {
        let body = results();
        let mut p = ResultsParser::new(read, 3);
        p.feed(&body);
        let t = p.finish().batch.unwrap();
        assert_eq!(sums(&t), vec![(Some("a"), 30 + 40, 2, 2)]);
        assert_eq!((t.lines, t.skipped), (5, 3));
        let mut p = ResultsParser::new(read, 5);
        p.feed(&body);
        let t = p.finish().batch.unwrap();
        assert!(t.models.is_empty());
        assert_eq!(t.lines, 5);
    }

    #[test]
    fn a_line_cut_off_is_left_for_the_next_read_and_a_last_line_without_newline_counts() {
        let body = results();
        // Cut inside the fourth line.
        let cut = body
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(2)
            .unwrap()
            .0
            + 8;
        let mut p = ResultsParser::new(read, 0);
        p.feed(&body[..cut]);
        let first = p.finish().batch.unwrap();
        assert_eq!(first.lines, 3);
        let mut p = ResultsParser::new(read, first.lines);
        p.feed(&body);
        let second = p.finish().batch.unwrap();
        assert_eq!(sums(&second), vec![(Some("a"), 30 + 40, 2, 2)]);
        // Together, every line once.
        let total: u64 = first
            .models
            .iter()
            .chain(&second.models)
            .map(|m| m.usage.input_tokens)
            .sum();
        assert_eq!(total, 100);
        // No newline after the last line.
        let mut p = ResultsParser::new(read, 0);
        p.feed(body.strip_suffix(b"\n").unwrap());
        assert_eq!(p.finish().batch.unwrap().lines, 5);
    }

    #[test]
    fn an_overlong_line_is_a_line_without_usage_and_is_not_held() {
        let mut p = ResultsParser::new(read, 0);
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
        let mut p = ResultsParser::new(read, 0);
        p.feed(b"not json \"usage\"\n\n{\"model\":\"a\",\"usage\":\"7\"}\n[1,2]\n{\"model\":\"a\",\"usage\":7}\n");
        let t = p.finish().batch.unwrap();
        assert_eq!(sums(&t), vec![(Some("a"), 7, 1, 1)]);
        assert_eq!(t.lines, 4, "blank lines are not lines");
    }
}
