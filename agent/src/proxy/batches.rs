//! How much of each batch's results the agent has counted.
//!
//! A job may read a batch's results more than once (a retry, a second step
//! of the same pipeline), or stop part way and read them again: each line
//! is spend once. The results of a batch do not change once it has ended,
//! so the agent keeps, per (provider host, batch or file id), how many
//! lines it has counted; a later read skips those and counts the rest.
//!
//! Owns: the count of lines counted per batch, bounded.
//! Must never: let two reads count the same lines (a read counts only if
//! the count it started from still stands when it ends), or hold more
//! than [`MAX_BATCHES`] batches (the one read longest ago goes first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Most batches remembered.
pub const MAX_BATCHES: usize = 4096;

struct Counted {
    lines: u64,
    at: Instant,
}

#[derive(Default)]
pub struct Batches(Mutex<HashMap<String, Counted>>);

/// What a read that ended may count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// The lines it read past where it started: count them.
    Count,
    /// Nothing new (no line past the count, or a read that billed nothing
    /// of a batch the agent does not follow).
    Nothing,
    /// Another read counted from the same place meanwhile: this one's
    /// lines may be counted already; it counts nothing.
    Raced,
}

impl Batches {
    /// Lines of `key` counted so far: where a read starting now begins.
    pub fn counted(&self, key: &str) -> u64 {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get_mut(key).map_or(0, |c| {
            c.at = Instant::now();
            c.lines
        })
    }

    /// A read of `key` that started at line `from` has read `to` lines
    /// whole; `bills` when the lines past `from` billed something. Moves
    /// the count to `to` when the read may count them.
    pub fn advance(&self, key: String, from: u64, to: u64, bills: bool) -> Advance {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(c) = g.get_mut(&key) {
            c.at = now;
            if c.lines != from {
                // (A count below `from` is a batch forgotten and read
                // again: nothing of it was counted since.)
                return if c.lines > from {
                    Advance::Raced
                } else {
                    c.lines = c.lines.max(to);
                    Advance::Count
                };
            }
            if to <= from {
                return Advance::Nothing;
            }
            c.lines = to;
            return Advance::Count;
        }
        if !bills || to <= from {
            return Advance::Nothing;
        }
        if g.len() >= MAX_BATCHES
            && let Some(oldest) = g.iter().min_by_key(|(_, c)| c.at).map(|(k, _)| k.clone())
        {
            g.remove(&oldest);
        }
        g.insert(key, Counted { lines: to, at: now });
        Advance::Count
    }

    /// Takes `key`'s results as counted whole (read before a restart):
    /// every later read of them counts nothing.
    pub fn read_whole(&self, key: String) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() < MAX_BATCHES {
            g.insert(
                key,
                Counted {
                    lines: u64::MAX,
                    at: Instant::now(),
                },
            );
        }
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_counts_past_the_last_count_and_only_once() {
        let b = Batches::default();
        assert_eq!(b.counted("h f"), 0);
        // A file that bills nothing is not followed.
        assert_eq!(b.advance("h f".into(), 0, 10, false), Advance::Nothing);
        assert!(b.is_empty());
        // Part of the results, then all, then all again.
        assert_eq!(b.advance("h f".into(), 0, 4, true), Advance::Count);
        assert_eq!(b.counted("h f"), 4);
        assert_eq!(b.advance("h f".into(), 4, 10, true), Advance::Count);
        assert_eq!(b.advance("h f".into(), 10, 10, false), Advance::Nothing);
        assert_eq!(b.counted("h f"), 10);
        // Other hosts, other ids: their own counts.
        assert_eq!(b.counted("h2 f"), 0);
    }

    #[test]
    fn of_two_reads_from_the_same_place_only_the_first_to_end_counts() {
        let b = Batches::default();
        let from = b.counted("h f");
        let from2 = b.counted("h f");
        assert_eq!(b.advance("h f".into(), from, 10, true), Advance::Count);
        assert_eq!(b.advance("h f".into(), from2, 10, true), Advance::Raced);
        assert_eq!(b.counted("h f"), 10);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_batch_read_longest_ago() {
        let b = Batches::default();
        for i in 0..MAX_BATCHES {
            assert_eq!(b.advance(format!("h {i}"), 0, 1, true), Advance::Count);
        }
        // Read again: the most recent.
        assert_eq!(b.counted("h 0"), 1);
        assert_eq!(b.advance("h new".into(), 0, 1, true), Advance::Count);
        assert_eq!(b.len(), MAX_BATCHES);
        assert_eq!(b.counted("h 0"), 1, "kept: read recently");
        assert_eq!(b.counted("h 1"), 0, "forgotten: read longest ago");
    }
}
