//! Background responses the agent holds open until their result is seen.
//!
//! A Responses API request sent with `background: true` (and a Gemini
//! interaction sent so) is answered at once with the work `queued`; the
//! provider generates it afterwards and bills it when it ends. Its usage
//! reaches the job through a later retrieval (`GET …/responses/{id}`, or
//! that stream resumed, or a cancel). The request's record is parked here
//! under the provider host and response id and settled by the first
//! retrieval that shows the response ended: one row, with the provider's
//! counts, attributed to the job that asked. A response whose end the
//! agent does not see within [`PARK_FOR`] (the job fetched it elsewhere,
//! or never), or that is still parked when the agent stops, is recorded
//! then, estimated, so that no request goes unrecorded.
//!
//! Owns: the table of parked records, its bounds and its expiry order.
//! Must never: hold more than [`MAX_PARKED`] entries, or more than
//! [`MAX_PARKED_PER_JOB`] of one job (so that one job cannot crowd out the
//! others), or take an entry after it was closed (a record refused is
//! handed back to be written at once); settle a record twice (an entry
//! leaves the table when it is taken).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a parked record waits for its response's end. Background
/// responses are kept by the provider for about ten minutes after they
/// end; deep research runs take tens of minutes.
pub const PARK_FOR: Duration = Duration::from_secs(2 * 3600);
/// Most records parked at once.
pub const MAX_PARKED: usize = 4096;
/// Most records of one job parked at once.
pub const MAX_PARKED_PER_JOB: usize = 256;
/// How often expired entries are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Why an entry was handed back instead of parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The agent is stopping: what is parked now would not be written.
    Closed,
    /// [`MAX_PARKED`] entries are parked.
    Full,
    /// [`MAX_PARKED_PER_JOB`] entries of this job are parked.
    JobFull,
}

/// Parked records of type `T`, by key (provider host and response id).
pub struct Parked<T> {
    inner: Mutex<Inner<T>>,
    park_for: Duration,
}

struct Inner<T> {
    by_key: HashMap<String, Slot<T>>,
    /// Park order: (when, key, serial). An entry taken early leaves its
    /// place here behind; the serial tells it from a later entry that
    /// reused the key.
    order: VecDeque<(Instant, String, u64)>,
    /// Entries parked per job.
    per_job: HashMap<String, usize>,
    serial: u64,
    closed: bool,
}

struct Slot<T> {
    serial: u64,
    job: String,
    entry: T,
}

impl<T> Default for Parked<T> {
    fn default() -> Self {
        Parked::new(PARK_FOR)
    }
}

impl<T> Inner<T> {
    fn remove(&mut self, key: &str) -> Option<T> {
        let slot = self.by_key.remove(key)?;
        if let Some(n) = self.per_job.get_mut(&slot.job) {
            *n -= 1;
            if *n == 0 {
                self.per_job.remove(&slot.job);
            }
        }
        Some(slot.entry)
    }
}

impl<T> Parked<T> {
    pub fn new(park_for: Duration) -> Self {
        Parked {
            inner: Mutex::new(Inner {
                by_key: HashMap::new(),
                order: VecDeque::new(),
                per_job: HashMap::new(),
                serial: 0,
                closed: false,
            }),
            park_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks `entry` of `job` under `key`. Hands it back when the table
    /// is closed or full; an entry already parked under the same key is
    /// handed back instead (a provider does not reuse ids: it is written
    /// at once, not lost).
    pub fn park(&self, key: String, job: String, entry: T) -> Result<Option<T>, (Refused, T)> {
        let mut g = self.lock();
        if g.closed {
            return Err((Refused::Closed, entry));
        }
        // (An entry that replaces one takes its place.)
        if !g.by_key.contains_key(&key) {
            if g.by_key.len() >= MAX_PARKED {
                return Err((Refused::Full, entry));
            }
            if g.per_job.get(&job).copied().unwrap_or(0) >= MAX_PARKED_PER_JOB {
                return Err((Refused::JobFull, entry));
            }
        }
        let old = g.remove(&key);
        g.serial += 1;
        let serial = g.serial;
        g.order.push_back((Instant::now(), key.clone(), serial));
        *g.per_job.entry(job.clone()).or_insert(0) += 1;
        g.by_key.insert(key, Slot { serial, job, entry });
        // Places of entries taken early are dropped as they reach the
        // front; bound them in between too.
        if g.order.len() > 2 * MAX_PARKED {
            let Inner { by_key, order, .. } = &mut *g;
            order.retain(|(_, k, s)| by_key.get(k).is_some_and(|slot| slot.serial == *s));
        }
        Ok(old)
    }

    /// An entry is parked under `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.lock().by_key.contains_key(key)
    }

    /// Changes the entry parked under `key`, if it is still there.
    pub fn update(&self, key: &str, f: impl FnOnce(&mut T)) {
        if let Some(slot) = self.lock().by_key.get_mut(key) {
            f(&mut slot.entry);
        }
    }

    /// Takes the entry parked under `key`, if any.
    pub fn take(&self, key: &str) -> Option<T> {
        self.lock().remove(key)
    }

    /// Takes the entries parked longer than the parking time.
    pub fn expired(&self, now: Instant) -> Vec<T> {
        let mut g = self.lock();
        let mut out = Vec::new();
        while let Some((at, _, _)) = g.order.front() {
            if now.saturating_duration_since(*at) < self.park_for {
                break;
            }
            let Some((_, key, serial)) = g.order.pop_front() else {
                break;
            };
            if g.by_key.get(&key).is_some_and(|s| s.serial == serial)
                && let Some(e) = g.remove(&key)
            {
                out.push(e);
            }
        }
        out
    }

    /// Takes every entry and closes the table (the agent is stopping):
    /// what comes later is handed back by [`Parked::park`].
    pub fn close(&self) -> Vec<T> {
        let mut g = self.lock();
        g.closed = true;
        g.order.clear();
        g.per_job.clear();
        g.by_key.drain().map(|(_, s)| s.entry).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn park(
        p: &Parked<usize>,
        key: &str,
        job: &str,
        e: usize,
    ) -> Result<Option<usize>, (Refused, usize)> {
        p.park(key.into(), job.into(), e)
    }

    #[test]
    fn an_entry_is_taken_once_by_key_or_by_expiry() {
        let p = Parked::new(Duration::from_secs(60));
        assert_eq!(park(&p, "h resp_a", "j", 1), Ok(None));
        assert_eq!(park(&p, "h resp_b", "j", 2), Ok(None));
        assert!(p.contains("h resp_a") && !p.contains("other resp_a"));
        assert_eq!(p.take("h resp_a"), Some(1));
        assert_eq!(p.take("h resp_a"), None, "settled once");
        let now = Instant::now();
        assert!(p.expired(now).is_empty(), "not yet");
        assert_eq!(p.expired(now + Duration::from_secs(61)), vec![2]);
        assert!(p.is_empty());
        assert_eq!(p.take("h resp_b"), None, "expired entries are gone");
    }

    #[test]
    fn a_reused_key_keeps_its_own_expiry() {
        let p = Parked::new(Duration::from_secs(60));
        park(&p, "k", "j", 1).unwrap();
        assert_eq!(p.take("k"), Some(1));
        std::thread::sleep(Duration::from_millis(20));
        let second = Instant::now();
        park(&p, "k", "j", 2).unwrap();
        // The first entry's place expires; the second, parked later, not.
        let at = second + Duration::from_secs(60) - Duration::from_millis(10);
        assert!(p.expired(at).is_empty());
        assert_eq!(p.take("k"), Some(2));
        // The same key parked twice hands the first back.
        park(&p, "c", "j", 3).unwrap();
        assert_eq!(park(&p, "c", "j", 4), Ok(Some(3)));
        assert_eq!(p.close(), vec![4]);
        assert_eq!(park(&p, "d", "j", 5), Err((Refused::Closed, 5)), "closed");
        assert!(p.is_empty());
    }

    #[test]
    fn one_job_cannot_fill_the_table_and_the_table_is_bounded() {
        let p = Parked::new(Duration::from_secs(60));
        for i in 0..MAX_PARKED_PER_JOB {
            park(&p, &format!("greedy {i}"), "greedy", i).unwrap();
        }
        assert_eq!(
            park(&p, "greedy more", "greedy", 7),
            Err((Refused::JobFull, 7))
        );
        // One that replaces an entry is not refused for the job's share
        // (and the one it replaces is handed back, not dropped).
        assert_eq!(park(&p, "greedy 5", "other", 70), Ok(Some(5)));
        assert_eq!(park(&p, "greedy 5", "greedy", 5), Ok(Some(70)));
        // Taking one gives the job its place back.
        p.take("greedy 0").unwrap();
        park(&p, "greedy again", "greedy", 8).unwrap();
        let mut i = 0;
        while p.len() < MAX_PARKED {
            park(
                &p,
                &format!("k {i}"),
                &format!("job {}", i / MAX_PARKED_PER_JOB),
                i,
            )
            .unwrap();
            i += 1;
        }
        assert_eq!(park(&p, "one more", "fresh", 9), Err((Refused::Full, 9)));
        // Taken and parked again many times: the order list stays bounded.
        for n in 0..3 * MAX_PARKED {
            let key = format!("k {}", n % i);
            let e = p.take(&key).unwrap();
            park(&p, &key, &format!("job {}", e / MAX_PARKED_PER_JOB), e).unwrap();
        }
        assert!(p.lock().order.len() <= 2 * MAX_PARKED + 1);
        assert_eq!(p.len(), MAX_PARKED);
        assert!(p.lock().per_job.values().all(|&n| n <= MAX_PARKED_PER_JOB));
    }
}
