//! What the agent last saw of each Claude Managed Agents session.
//!
//! A session reports cumulative usage (see `providers::managed_agents`);
//! its spend between two snapshots is their difference. The first snapshot
//! of a session is its baseline, not spend: a session created through the
//! agent starts at zero, and one first seen later (created before the
//! agent started, or elsewhere) is counted from then on, so that a restart
//! never counts a session's past twice.
//!
//! Owns: the last snapshot per (provider host, session), bounded.
//! Must never: give the same growth twice (the last snapshot is replaced
//! under the lock that computes the difference), or hold more than
//! [`MAX_SESSIONS`] sessions (the one seen longest ago goes first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::meter::Usage;

/// Most sessions remembered.
pub const MAX_SESSIONS: usize = 4096;

struct Seen {
    usage: Usage,
    model: Option<String>,
    at: Instant,
}

#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Seen>>);

/// Field by field `now - before`; `None` when a count went down (not the
/// same session's history: its snapshot becomes the new baseline).
fn growth(before: &Usage, now: &Usage) -> Option<Usage> {
    Some(Usage {
        input_tokens: now.input_tokens.checked_sub(before.input_tokens)?,
        output_tokens: now.output_tokens.checked_sub(before.output_tokens)?,
        cached_input_tokens: now
            .cached_input_tokens
            .checked_sub(before.cached_input_tokens)?,
        cache_write_input_tokens: now
            .cache_write_input_tokens
            .checked_sub(before.cache_write_input_tokens)?,
        cache_write_1h_input_tokens: now
            .cache_write_1h_input_tokens
            .checked_sub(before.cache_write_1h_input_tokens)?,
        reasoning_tokens: now.reasoning_tokens.checked_sub(before.reasoning_tokens)?,
    })
}

impl Sessions {
    /// Takes the snapshot `usage` of session `key` (naming `model`, if the
    /// answer did) and gives what grew since the last one, with the model
    /// the session is known by; `None` for a first snapshot, or when
    /// nothing grew.
    pub fn grew(
        &self,
        key: String,
        usage: Usage,
        model: Option<String>,
    ) -> Option<(Usage, Option<String>)> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(seen) = g.get_mut(&key) {
            let grown = growth(&seen.usage, &usage);
            seen.usage = usage;
            seen.at = now;
            if model.is_some() {
                seen.model = model;
            }
            return grown
                .filter(|u| *u != Usage::default())
                .map(|u| (u, seen.model.clone()));
        }
        if g.len() >= MAX_SESSIONS
            && let Some(oldest) = g.iter().min_by_key(|(_, s)| s.at).map(|(k, _)| k.clone())
        {
            g.remove(&oldest);
        }
        g.insert(
            key,
            Seen {
                usage,
                model,
                at: now,
            },
        );
        None
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

    fn u(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            ..Default::default()
        }
    }

    #[test]
    fn only_growth_is_given_and_only_once() {
        let s = Sessions::default();
        assert_eq!(
            s.grew("h sesn_1".into(), u(0, 0), Some("claude-opus-4-7".into())),
            None
        );
        assert_eq!(
            s.grew("h sesn_1".into(), u(100, 40), None),
            Some((u(100, 40), Some("claude-opus-4-7".into())))
        );
        assert_eq!(
            s.grew("h sesn_1".into(), u(100, 40), None),
            None,
            "a repeated poll"
        );
        assert_eq!(
            s.grew("h sesn_1".into(), u(150, 41), None).map(|g| g.0),
            Some(u(50, 1))
        );
        // First seen with spend already: a baseline, not spend.
        assert_eq!(s.grew("h sesn_2".into(), u(9000, 900), None), None);
        assert_eq!(
            s.grew("h sesn_2".into(), u(9001, 900), None).map(|g| g.0),
            Some(u(1, 0))
        );
        // A count that went down starts again from there.
        assert_eq!(s.grew("h sesn_2".into(), u(10, 10), None), None);
        assert_eq!(
            s.grew("h sesn_2".into(), u(12, 10), None).map(|g| g.0),
            Some(u(2, 0))
        );
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_longest_unseen() {
        let s = Sessions::default();
        s.grew("h 1".into(), u(0, 0), None);
        std::thread::sleep(std::time::Duration::from_millis(2));
        for i in (0..MAX_SESSIONS).filter(|&i| i != 1) {
            s.grew(format!("h {i}"), u(0, 0), None);
        }
        // Session 0 seen again: it stays; session 1 is the oldest.
        s.grew("h 0".into(), u(1, 0), None);
        s.grew("h new".into(), u(0, 0), None);
        assert_eq!(s.len(), MAX_SESSIONS);
        assert_eq!(
            s.grew("h 0".into(), u(2, 0), None).map(|g| g.0),
            Some(u(1, 0))
        );
        assert_eq!(
            s.grew("h 1".into(), u(5, 0), None),
            None,
            "forgotten: a new baseline"
        );
    }
}
