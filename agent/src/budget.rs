//! Memory budgets for what the agent holds across connections: request
//! bodies (at most `proxy.max_buffered_request_bytes` together, the
//! proxy's) and JSON answers read whole for their usage (at most
//! `proxy.max_buffered_response_bytes`, the providers' `JsonBody`).
//!
//! A request body is read whole (up to `proxy.max_request_body`) to find
//! the model and to add the usage request, and kept until the response
//! ends for a local token estimate. Each request's bound alone does not
//! bound the agent: many HTTP/2 streams or connections at once, each near
//! the per-request bound, would take the agent's memory. When the budget
//! is spent, a request's body is forwarded as it arrives, unparsed, as an
//! over-long one is; nothing waits and nothing is refused.
//!
//! Owns: the byte count. Must never: block, or let a lease outlive its
//! count (a lease gives its bytes back when dropped).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes held across connections (request bodies, or JSON answers),
/// against a bound.
#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    max: usize,
}

impl BodyBudget {
    pub fn new(max: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    /// An empty lease on this budget.
    pub fn lease(self: &Arc<Self>) -> BodyLease {
        BodyLease {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes one request body (or one answer) holds; given back on drop.
#[derive(Debug)]
pub struct BodyLease {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyLease {
    /// Takes `n` more bytes if the budget has them; false (and nothing
    /// taken) if not.
    pub fn grow(&mut self, n: usize) -> bool {
        let b = &self.budget;
        let ok = b
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= b.max)
            })
            .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }

    /// Bytes this lease holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Gives the bytes back now (the body is on its way, not kept).
    pub fn release(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
            self.bytes = 0;
        }
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_take_up_to_the_bound_and_give_back_on_drop() {
        let b = BodyBudget::new(100);
        let mut a = b.lease();
        assert!(a.grow(60));
        let mut c = b.lease();
        assert!(c.grow(40));
        assert!(!c.grow(1), "over the bound");
        assert_eq!((b.used(), a.bytes(), c.bytes()), (100, 60, 40));
        drop(a);
        assert_eq!(b.used(), 40);
        assert!(c.grow(60));
        assert!(!c.grow(usize::MAX), "no overflow");
        c.release();
        assert_eq!((b.used(), c.bytes()), (0, 0));
        assert!(c.grow(5));
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn concurrent_leases_never_pass_the_bound() {
        let b = BodyBudget::new(1000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let mut l = b.lease();
                        for _ in 0..5 {
                            if l.grow(97) {
                                assert!(b.used() <= 1000);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(b.used(), 0, "every lease gave its bytes back");
    }
}
