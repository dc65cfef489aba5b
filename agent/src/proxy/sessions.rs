//! What the agent last saw of each Claude Managed Agents session (and of
//! each OpenAI Evals run and its models' shares, which are read the same
//! way: see `providers::evals`).
//!
//! A session reports cumulative usage (see `providers::managed_agents`);
//! its spend between two snapshots is their difference. The first snapshot
//! of a session is its baseline, not spend: a session created through the
//! agent starts at zero, and one first seen later by its id (created before
//! the agent started, or elsewhere) is counted from then on, so that a
//! restart never counts a session's past twice. A session's growth belongs
//! to the job that created it through the agent (or, one not created
//! through it, to the first job whose call showed it by its id), whichever
//! job's call shows it later; a list of the workspace's sessions (other
//! jobs' and other machines' among them), or a page of a session's events
//! (which may begin anywhere in its past), only moves sessions already
//! followed.
//!
//! Owns: the last snapshot per (provider host, session), bounded.
//! Must never: give the same growth twice (the highest counts seen are
//! kept, under the lock that computes the difference, so a snapshot that
//! arrives late lowers nothing), or hold more than
//! [`MAX_SESSIONS`] sessions (the one seen longest ago goes first).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::meter::{Attribution, Usage};
use crate::providers::{SessionSnapshot, SessionsCall};

/// Most sessions remembered.
pub const MAX_SESSIONS: usize = 4096;

struct Seen {
    usage: Usage,
    model: Option<String>,
    tier: Option<String>,
    uplift_percent: u32,
    /// The job that created it through the agent, or the first whose call
    /// showed it by its id.
    owner: Option<Arc<Attribution>>,
    /// When it was last seen, in the table's own order (the one seen
    /// longest ago goes first when the table is full).
    at: u64,
}

/// What a session used since the agent last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Growth {
    pub usage: Usage,
    /// The session's model as last named, its tier and place uplift.
    pub model: Option<String>,
    pub tier: Option<String>,
    pub uplift_percent: u32,
    /// The job the growth belongs to (see [`Seen`]'s owner).
    pub owner: Option<Arc<Attribution>>,
}

#[derive(Default)]
pub struct Sessions(Mutex<Table>);

#[derive(Default)]
struct Table {
    seen: HashMap<String, Seen>,
    /// The last `at` given.
    tick: u64,
}

/// Takes `now` into `seen` (field by field, the higher count: the counts
/// only grow, and an older snapshot that arrives after a newer one, from
/// two calls racing, must not lower them) and gives what grew.
fn take_growth(seen: &mut Usage, now: &Usage) -> Usage {
    let grown = now.zip_with(seen, u64::saturating_sub);
    *seen = seen.zip_with(now, u64::max);
    grown
}

impl Table {
    fn tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn grew(
        &mut self,
        key: String,
        snap: SessionSnapshot,
        caller: &Arc<Attribution>,
    ) -> Option<Growth> {
        let now = self.tick();
        if let Some(seen) = self.seen.get_mut(&key) {
            let grown = take_growth(&mut seen.usage, &snap.usage);
            seen.at = now;
            if snap.model.is_some() {
                seen.model = snap.model;
                seen.tier = snap.tier;
                seen.uplift_percent = snap.uplift_percent;
            }
            return (grown != Usage::default()).then(|| Growth {
                usage: grown,
                model: seen.model.clone(),
                tier: seen.tier.clone(),
                uplift_percent: seen.uplift_percent,
                owner: seen.owner.clone(),
            });
        }
        let created = match snap.seen_by {
            // Not one of the sessions the agent follows.
            SessionsCall::List | SessionsCall::No => return None,
            SessionsCall::Create => true,
            SessionsCall::Of(_) => false,
        };
        if self.seen.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .seen
                .iter()
                .min_by_key(|(_, s)| s.at)
                .map(|(k, _)| k.clone())
        {
            self.seen.remove(&oldest);
        }
        // A new session is at zero (what its first answer shows already
        // is its spend); one first seen by its id is a baseline.
        let mut usage = if created {
            Usage::default()
        } else {
            snap.usage
        };
        let grown = take_growth(&mut usage, &snap.usage);
        let seen = Seen {
            usage,
            model: snap.model,
            tier: snap.tier,
            uplift_percent: snap.uplift_percent,
            // The job that created it, or the first that showed it by its
            // id: a list by another job later moves it, as theirs.
            owner: Some(caller.clone()),
            at: now,
        };
        let growth = (grown != Usage::default()).then(|| Growth {
            usage: grown,
            model: seen.model.clone(),
            tier: seen.tier.clone(),
            uplift_percent: seen.uplift_percent,
            owner: seen.owner.clone(),
        });
        self.seen.insert(key, seen);
        growth
    }
}

impl Sessions {
    /// Takes snapshot `snap` of session `key`, shown by a call of job
    /// `caller`, and gives what grew since the last one; `None` for a
    /// first snapshot, or when nothing grew.
    pub fn grew(
        &self,
        key: String,
        snap: SessionSnapshot,
        caller: &Arc<Attribution>,
    ) -> Option<Growth> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.grew(key, snap, caller)
    }

    /// Takes every snapshot one answer of provider `host` showed, under
    /// one lock, and gives what grew. A share (`parent` set: one model's
    /// usage in an Evals run) first seen now, of a whole the agent
    /// followed before this answer, began after the agent last saw the
    /// whole: it starts at zero and is the whole's owner's. One first seen
    /// with its whole is a baseline, as the whole is. A whole is kept seen
    /// after its shares, so that a full table forgets the shares first.
    pub fn grew_all(
        &self,
        host: &str,
        snaps: Vec<SessionSnapshot>,
        caller: &Arc<Attribution>,
    ) -> Vec<Growth> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = |id: &str| format!("{host} {id}");
        // The wholes followed before this answer, and their owners.
        let mut wholes: HashMap<String, Option<Arc<Attribution>>> = HashMap::new();
        for s in &snaps {
            if let Some(parent) = &s.parent
                && !wholes.contains_key(parent)
                && let Some(seen) = g.seen.get(&key(parent))
            {
                wholes.insert(parent.clone(), seen.owner.clone());
            }
        }
        let mut out = Vec::new();
        for mut s in snaps {
            let k = key(&s.id);
            let mut by = caller;
            if let Some(owner) = s.parent.as_ref().and_then(|p| wholes.get(p))
                && !g.seen.contains_key(&k)
            {
                s.seen_by = SessionsCall::Create;
                if let Some(owner) = owner {
                    by = owner;
                }
            }
            if let Some(grown) = g.grew(k, s, by) {
                out.push(grown);
            }
        }
        for parent in wholes.keys() {
            let now = g.tick();
            if let Some(seen) = g.seen.get_mut(&key(parent)) {
                seen.at = now;
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).seen.len()
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

    fn snap(usage: Usage, seen_by: SessionsCall, model: Option<&str>) -> SessionSnapshot {
        SessionSnapshot {
            id: "x".into(),
            model: model.map(str::to_string),
            usage,
            seen_by,
            ..Default::default()
        }
    }

    fn of() -> SessionsCall {
        SessionsCall::Of("x".into())
    }

    fn job(name: &str) -> Arc<Attribution> {
        Arc::new(Attribution {
            job: Some(name.into()),
            ..Default::default()
        })
    }

    #[test]
    fn only_growth_is_given_and_only_once() {
        let s = Sessions::default();
        let (a, b) = (job("a"), job("b"));
        let grew = |key: &str, usage, by, model, caller: &Arc<Attribution>| {
            s.grew(key.into(), snap(usage, by, model), caller)
        };
        assert_eq!(
            grew(
                "h sesn_1",
                u(0, 0),
                SessionsCall::Create,
                Some("claude-opus-4-7"),
                &a
            ),
            None
        );
        // Shown by another job's call: still the creator's.
        let g = grew("h sesn_1", u(100, 40), of(), None, &b).unwrap();
        assert_eq!(
            (g.usage, g.model.as_deref()),
            (u(100, 40), Some("claude-opus-4-7"))
        );
        assert_eq!(g.owner.and_then(|o| o.job.clone()).as_deref(), Some("a"));
        assert_eq!(
            grew("h sesn_1", u(100, 40), of(), None, &a),
            None,
            "a repeated poll"
        );
        assert_eq!(
            grew("h sesn_1", u(150, 41), SessionsCall::List, None, &b).map(|g| g.usage),
            Some(u(50, 1)),
            "a list moves a known session"
        );
        // First seen by its id with spend already: a baseline, not spend;
        // the job that showed it owns it, even when another lists it.
        assert_eq!(grew("h sesn_2", u(9000, 900), of(), None, &b), None);
        let g = grew("h sesn_2", u(9001, 900), SessionsCall::List, None, &a).unwrap();
        assert_eq!(g.usage, u(1, 0));
        assert!(g.owner.is_some_and(|o| Arc::ptr_eq(&o, &b)));
        // An older snapshot that comes after a newer one (two calls
        // racing) changes nothing: what grew is counted once.
        assert_eq!(grew("h sesn_2", u(9000, 900), of(), None, &b), None);
        assert_eq!(
            grew("h sesn_2", u(9003, 905), of(), None, &b).map(|g| g.usage),
            Some(u(2, 5))
        );
        // A list never adds a session: other jobs' and machines' are in it.
        assert_eq!(
            grew("h sesn_3", u(5, 5), SessionsCall::List, None, &b),
            None
        );
        assert_eq!(
            grew("h sesn_3", u(6, 5), SessionsCall::List, None, &b),
            None
        );
        assert_eq!(s.len(), 2);
        // A create whose answer shows spend already (initial events): that
        // is spend.
        let g = grew("h sesn_4", u(30, 3), SessionsCall::Create, None, &a).unwrap();
        assert_eq!(g.usage, u(30, 3));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_longest_unseen() {
        let s = Sessions::default();
        let a = job("a");
        let see = |key: String, n| s.grew(key, snap(u(n, 0), of(), None), &a);
        see("h 1".into(), 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        for i in (0..MAX_SESSIONS).filter(|&i| i != 1) {
            see(format!("h {i}"), 0);
        }
        // Session 0 seen again: it stays; session 1 is the oldest.
        see("h 0".into(), 1);
        see("h new".into(), 0);
        assert_eq!(s.len(), MAX_SESSIONS);
        assert_eq!(see("h 0".into(), 2).map(|g| g.usage), Some(u(1, 0)));
        assert_eq!(see("h 1".into(), 5), None, "forgotten: a new baseline");
    }

    fn share(run: &str, model: &str, input: u64, seen_by: SessionsCall) -> SessionSnapshot {
        SessionSnapshot {
            id: format!("{run} {model}"),
            model: Some(model.into()),
            usage: u(input, 0),
            seen_by,
            parent: Some(run.into()),
            ..Default::default()
        }
    }

    fn whole(run: &str, seen_by: SessionsCall) -> SessionSnapshot {
        SessionSnapshot {
            id: run.into(),
            seen_by,
            ..Default::default()
        }
    }

    #[test]
    fn a_share_new_in_a_followed_whole_starts_at_zero_and_is_the_owners() {
        let s = Sessions::default();
        let (a, b) = (job("a"), job("b"));
        let of = || SessionsCall::Of("r".into());
        // Created by a: followed.
        assert!(
            s.grew_all("h", vec![whole("r", SessionsCall::Create)], &a)
                .is_empty()
        );
        // b polls: the sampler's usage, new, from zero, a's.
        let g = s.grew_all("h", vec![whole("r", of()), share("r", "m1", 100, of())], &b);
        assert_eq!(g.len(), 1);
        assert_eq!(
            (g[0].usage, g[0].owner.as_ref().and_then(|o| o.job.clone())),
            (u(100, 0), Some("a".into()))
        );
        // A run first seen by its id, a model with it: both baselines.
        let g = s.grew_all("h", vec![whole("x", of()), share("x", "m1", 500, of())], &b);
        assert!(g.is_empty());
        let g = s.grew_all(
            "h",
            vec![
                whole("x", of()),
                share("x", "m1", 600, of()),
                share("x", "m2", 7, of()),
            ],
            &b,
        );
        let got: Vec<_> = g
            .iter()
            .map(|g| (g.model.clone(), g.usage.input_tokens))
            .collect();
        assert_eq!(got, [(Some("m1".into()), 100), (Some("m2".into()), 7)]);
    }

    #[test]
    fn a_full_table_forgets_a_wholes_shares_before_the_whole() {
        let s = Sessions::default();
        let a = job("a");
        let of = || SessionsCall::Of("r".into());
        assert!(
            s.grew_all("h", vec![whole("r", SessionsCall::Create)], &a)
                .is_empty()
        );
        s.grew_all("h", vec![whole("r", of()), share("r", "m1", 1, of())], &a);
        // Fill the table with others.
        for i in 0..MAX_SESSIONS - 1 {
            s.grew(
                format!("h s{i}"),
                snap(u(0, 0), SessionsCall::Create, None),
                &a,
            );
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        // The share went first: the run is still followed, so a model
        // new to it now still starts at zero.
        let g = s.grew_all("h", vec![whole("r", of()), share("r", "m2", 9, of())], &a);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].usage, u(9, 0));
    }
}
