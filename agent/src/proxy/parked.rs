//! Background responses the agent holds open until their result is seen.
//!
//! A Responses API request sent with `background: true` is answered at
//! once with the response `queued`; the provider generates it afterwards
//! and bills it when it ends. Its usage reaches the job through a later
//! retrieval (`GET …/responses/{id}`, or that stream resumed, or a cancel).
//! The request's record is parked here under the response id and settled
//! by the first retrieval that shows the response ended: one row, with the
//! provider's counts, attributed to the job that asked. A response whose
//! end the agent does not see within [`PARK_FOR`] (the job fetched it
//! elsewhere, or never), or that is still parked when the agent stops, is
//! recorded then, estimated, so that no request goes unrecorded.
//!
//! Owns: the table of parked records, its bounds and its expiry order.
//! Must never: hold more than [`MAX_PARKED`] entries (a record that does
//! not fit is handed back to be written at once), or settle a record
//! twice (an entry leaves the table when it is taken).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a parked record waits for its response's end. Background
/// responses are kept by the provider for about ten minutes after they
/// end; deep research runs take tens of minutes.
pub const PARK_FOR: Duration = Duration::from_secs(2 * 3600);
/// Most records parked at once.
pub const MAX_PARKED: usize = 4096;
/// How often expired entries are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Parked records of type `T`, by response id.
pub struct Parked<T> {
    inner: Mutex<Inner<T>>,
    park_for: Duration,
}

struct Inner<T> {
    by_id: HashMap<String, (u64, T)>,
    /// Park order: (when, id, serial). An entry taken early leaves its
    /// place here behind; the serial tells it from a later entry that
    /// reused the id.
    order: VecDeque<(Instant, String, u64)>,
    serial: u64,
}

impl<T> Default for Parked<T> {
    fn default() -> Self {
        Parked::new(PARK_FOR)
    }
}

impl<T> Parked<T> {
    pub fn new(park_for: Duration) -> Self {
        Parked {
            inner: Mutex::new(Inner {
                by_id: HashMap::new(),
                order: VecDeque::new(),
                serial: 0,
            }),
            park_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks `entry` under `id`. Hands it back when the table is full; an
    /// entry already parked under the same id is handed back instead (a
    /// provider does not reuse ids: it is written at once, not lost).
    pub fn park(&self, id: String, entry: T) -> Result<Option<T>, T> {
        let mut g = self.lock();
        if g.by_id.len() >= MAX_PARKED && !g.by_id.contains_key(&id) {
            return Err(entry);
        }
        g.serial += 1;
        let serial = g.serial;
        g.order.push_back((Instant::now(), id.clone(), serial));
        let old = g.by_id.insert(id, (serial, entry)).map(|(_, e)| e);
        // Places of entries taken early are dropped as they reach the
        // front; bound them in between too.
        if g.order.len() > 2 * MAX_PARKED {
            let Inner { by_id, order, .. } = &mut *g;
            order.retain(|(_, id, s)| by_id.get(id).is_some_and(|(cur, _)| cur == s));
        }
        Ok(old)
    }

    /// Changes the entry parked under `id`, if it is still there.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut T)) {
        if let Some((_, e)) = self.lock().by_id.get_mut(id) {
            f(e);
        }
    }

    /// Takes the entry parked under `id`, if any.
    pub fn take(&self, id: &str) -> Option<T> {
        self.lock().by_id.remove(id).map(|(_, e)| e)
    }

    /// Takes the entries parked longer than the parking time.
    pub fn expired(&self, now: Instant) -> Vec<T> {
        let mut g = self.lock();
        let mut out = Vec::new();
        while let Some((at, _, _)) = g.order.front() {
            if now.saturating_duration_since(*at) < self.park_for {
                break;
            }
            let Some((_, id, serial)) = g.order.pop_front() else {
                break;
            };
            if g.by_id.get(&id).is_some_and(|(s, _)| *s == serial)
                && let Some((_, e)) = g.by_id.remove(&id)
            {
                out.push(e);
            }
        }
        out
    }

    /// Takes every entry (the agent is stopping).
    pub fn take_all(&self) -> Vec<T> {
        let mut g = self.lock();
        g.order.clear();
        g.by_id.drain().map(|(_, (_, e))| e).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_taken_once_by_id_or_by_expiry() {
        let p = Parked::new(Duration::from_secs(60));
        assert!(p.park("resp_a".into(), 1).unwrap().is_none());
        assert!(p.park("resp_b".into(), 2).unwrap().is_none());
        assert_eq!(p.take("resp_a"), Some(1));
        assert_eq!(p.take("resp_a"), None, "settled once");
        let now = Instant::now();
        assert!(p.expired(now).is_empty(), "not yet");
        assert_eq!(p.expired(now + Duration::from_secs(61)), vec![2]);
        assert!(p.is_empty());
        assert_eq!(p.take("resp_b"), None, "expired entries are gone");
    }

    #[test]
    fn a_reused_id_keeps_its_own_expiry() {
        let p = Parked::new(Duration::from_secs(60));
        p.park("resp_a".into(), 1).unwrap();
        assert_eq!(p.take("resp_a"), Some(1));
        std::thread::sleep(Duration::from_millis(20));
        let second = Instant::now();
        p.park("resp_a".into(), 2).unwrap();
        // The first entry's place expires; the second, parked later, not.
        let at = second + Duration::from_secs(60) - Duration::from_millis(10);
        assert!(p.expired(at).is_empty());
        assert_eq!(p.take("resp_a"), Some(2));
        // The same id parked twice hands the first back.
        p.park("resp_c".into(), 3).unwrap();
        assert_eq!(p.park("resp_c".into(), 4).unwrap(), Some(3));
        assert_eq!(p.take_all(), vec![4]);
    }

    #[test]
    fn a_full_table_hands_the_entry_back() {
        let p = Parked::new(Duration::from_secs(60));
        for i in 0..MAX_PARKED {
            p.park(format!("resp_{i}"), i).unwrap();
        }
        assert_eq!(p.park("resp_more".into(), 7), Err(7));
        // Taken and parked again many times: the order list stays bounded.
        for i in 0..3 * MAX_PARKED {
            let id = format!("resp_{}", i % MAX_PARKED);
            let e = p.take(&id).unwrap();
            p.park(id, e).unwrap();
        }
        assert!(p.lock().order.len() <= 2 * MAX_PARKED + 1);
        assert_eq!(p.len(), MAX_PARKED);
    }
}
