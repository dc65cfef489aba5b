//! Which results of each batch the agent has counted.
//!
//! A job may read a batch's results more than once (a retry, a second step
//! of the same pipeline), stop part way and read them again, or read them
//! twice at once: each result is spend once. A batch's results do not
//! change once it has ended, and every read serves them in the same order,
//! so a result is known by its place. Reads claim the results that bill as
//! they reach them (see `providers::batch`); the table keeps, per (provider
//! host, batch or file id), the place after the last one claimed: a read
//! counts a result only if no read has reached it yet. Claimed results
//! thus always run from the first without a gap, whichever read claimed
//! them.
//!
//! Owns: the place reached per batch, bounded.
//! Must never: let two reads count one result, or hold more than
//! [`MAX_BATCHES`] batches (the one read longest ago goes first; reading
//! it again after that counts it again).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::providers::batch::Counted;

/// Most batches remembered.
pub const MAX_BATCHES: usize = 4096;

struct Reached {
    /// The place after the last result claimed.
    next: u64,
    at: Instant,
}

#[derive(Default)]
pub struct Batches(Mutex<HashMap<String, Reached>>);

impl Counted for Batches {
    fn claim(&self, key: &str, index: u64) -> bool {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(r) = g.get_mut(key) {
            r.at = now;
            if index < r.next {
                return false;
            }
            r.next = index + 1;
            return true;
        }
        if g.len() >= MAX_BATCHES
            && let Some(oldest) = g.iter().min_by_key(|(_, r)| r.at).map(|(k, _)| k.clone())
        {
            g.remove(&oldest);
        }
        g.insert(
            key.to_string(),
            Reached {
                next: index.saturating_add(1),
                at: now,
            },
        );
        true
    }

    fn read_whole(&self, key: &str) {
        self.mark_whole(key.to_string());
    }
}

impl Batches {
    /// Takes `key`'s results as counted whole (read before a restart, or
    /// a Gemini batch's inlined responses read): every later read of them
    /// counts nothing, and is not read at all.
    pub fn mark_whole(&self, key: String) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(r) = g.get_mut(&key) {
            *r = Reached {
                next: u64::MAX,
                at: now,
            };
        } else if g.len() < MAX_BATCHES {
            g.insert(
                key,
                Reached {
                    next: u64::MAX,
                    at: now,
                },
            );
        }
    }

    /// Every result of `key` has been counted.
    pub fn is_whole(&self, key: &str) -> bool {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(key).is_some_and(|r| r.next == u64::MAX)
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
    fn a_result_is_claimed_by_the_first_read_that_reaches_it() {
        let b = Batches::default();
        assert!(b.is_empty());
        // One read: results 0, 2, 3 bill (1 does not).
        assert!(b.claim("h f", 0));
        assert!(b.claim("h f", 2));
        // A second read from the top, at once: behind the first.
        assert!(!b.claim("h f", 0));
        assert!(!b.claim("h f", 2));
        // It overtakes: result 3 is its.
        assert!(b.claim("h f", 3));
        assert!(!b.claim("h f", 3), "and not the first read's too");
        // Other hosts, other ids: their own places.
        assert!(b.claim("h2 f", 0));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn results_read_before_a_restart_are_never_claimed_again() {
        let b = Batches::default();
        b.mark_whole("h f".into());
        assert!(b.is_whole("h f") && !b.is_whole("h g"));
        assert!(!b.claim("h f", 0));
        assert!(!b.claim("h f", u64::MAX - 1));
        assert!(b.claim("h g", 0));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_batch_read_longest_ago() {
        let b = Batches::default();
        for i in 0..MAX_BATCHES {
            assert!(b.claim(&format!("h {i}"), 0));
        }
        // Read again: the most recent.
        assert!(!b.claim("h 0", 0));
        assert!(b.claim("h new", 0));
        assert_eq!(b.len(), MAX_BATCHES);
        assert!(!b.claim("h 0", 0), "kept: read recently");
        assert!(b.claim("h 1", 0), "forgotten: read longest ago");
    }
}
