//! The pipelines between the request path and the exporters: the sink
//! that offers each record to a bounded queue per pipeline (counting what a
//! full queue drops), and the worker threads that drain the queues.
//!
//! A panic in a worker's handling of one record (a bug, here or in the
//! OpenTelemetry SDK) costs that record only: it is logged, counted as
//! dropped, and the worker goes on with the next.
//!
//! Must never: block in `submit` (`try_send` only) or let a queue grow past
//! its bound.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{error, warn};

use super::audit::AuditLog;
use super::metrics::Instruments;
use super::spans::SpanMaker;
use crate::meter::{RecordSink, UsageRecord};

/// Counters shared by the sink, the workers and the health callback.
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) closed: AtomicBool,
    pub(crate) metrics_accepted: AtomicU64,
    pub(crate) metrics_done: AtomicU64,
    pub(crate) metrics_dropped: AtomicU64,
    pub(crate) audit_accepted: AtomicU64,
    pub(crate) audit_done: AtomicU64,
    pub(crate) audit_dropped: AtomicU64,
    pub(crate) audit_errors: AtomicU64,
}

pub(crate) type Queue = SyncSender<Arc<UsageRecord>>;

/// The request path's handle: offers each record to the pipelines.
pub(crate) struct Sink {
    pub(crate) metrics: Option<Queue>,
    pub(crate) audit: Option<Queue>,
    pub(crate) shared: Arc<Shared>,
}

impl Sink {
    fn offer(&self, q: &Queue, rec: &Arc<UsageRecord>, accepted: &AtomicU64, dropped: &AtomicU64) {
        if self.shared.closed.load(Ordering::Acquire) {
            dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match q.try_send(rec.clone()) {
            Ok(()) => {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl RecordSink for Sink {
    fn submit(&self, rec: Arc<UsageRecord>) {
        let s = &self.shared;
        if let Some(q) = &self.metrics {
            self.offer(q, &rec, &s.metrics_accepted, &s.metrics_dropped);
        }
        if let Some(q) = &self.audit {
            self.offer(q, &rec, &s.audit_accepted, &s.audit_dropped);
        }
    }
}

/// How often an idle worker looks at the shutdown flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// One worker's counters: records handled (`done`, which shutdown waits
/// for) and records lost (`dropped`).
struct Counters<'a> {
    name: &'static str,
    done: &'a AtomicU64,
    dropped: &'a AtomicU64,
}

/// Receives until shutdown, then drains what is queued. `f` handles one
/// record (`Some`) or an idle moment (`None`); a record it panics on is
/// counted done and dropped, and the loop goes on.
fn drain_loop(
    rx: Receiver<Arc<UsageRecord>>,
    shared: &Shared,
    counters: Counters<'_>,
    mut f: impl FnMut(Option<&UsageRecord>),
) {
    let mut panics = 0u64;
    let mut call = |rec: Option<&UsageRecord>| {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(rec)));
        if outcome.is_err() {
            if rec.is_some() {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                counters.done.fetch_add(1, Ordering::Release);
            }
            panics += 1;
            if panics.is_power_of_two() {
                error!(
                    pipeline = counters.name,
                    times = panics,
                    "an export worker failed on a record (a bug: please report it); the record is dropped and the worker goes on"
                );
            }
        }
    };
    loop {
        match rx.recv_timeout(IDLE_POLL) {
            Ok(rec) => call(Some(&rec)),
            Err(RecvTimeoutError::Timeout) => {
                call(None);
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    while let Ok(rec) = rx.try_recv() {
        call(Some(&rec));
    }
    call(None);
}

pub(crate) fn metrics_worker(
    instruments: Instruments,
    spans: Option<SpanMaker>,
    rx: Receiver<Arc<UsageRecord>>,
    shared: Arc<Shared>,
) {
    let counters = Counters {
        name: "metrics",
        done: &shared.metrics_done,
        dropped: &shared.metrics_dropped,
    };
    drain_loop(rx, &shared, counters, |rec| {
        if let Some(rec) = rec {
            instruments.record(rec);
            if let Some(s) = &spans {
                s.span(rec);
            }
            shared.metrics_done.fetch_add(1, Ordering::Release);
        }
    });
}

pub(crate) fn audit_worker(mut log: AuditLog, rx: Receiver<Arc<UsageRecord>>, shared: Arc<Shared>) {
    // One warning per failure streak, not one per record.
    let failing = Mutex::new(false);
    let report = |r: std::io::Result<()>| {
        let mut f = failing.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(()) => *f = false,
            Err(e) => {
                shared.audit_errors.fetch_add(1, Ordering::Relaxed);
                if !*f {
                    warn!(error = %e, "audit log write failed");
                }
                *f = true;
            }
        }
    };
    let counters = Counters {
        name: "audit_log",
        done: &shared.audit_done,
        dropped: &shared.audit_dropped,
    };
    drain_loop(rx, &shared, counters, |rec| match rec {
        Some(rec) => {
            report(log.append(rec));
            shared.audit_done.fetch_add(1, Ordering::Release);
        }
        // Idle: make what was written visible to readers of the file.
        None => report(log.flush()),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_a_worker_panics_on_is_dropped_and_counted_and_the_rest_go_on() {
        let shared = Shared::default();
        let (tx, rx) = std::sync::mpsc::sync_channel(8);
        for i in 0..4 {
            tx.send(Arc::new(UsageRecord {
                started_at_ms: i,
                ..Default::default()
            }))
            .unwrap();
        }
        drop(tx);
        let (done, dropped) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut handled = Vec::new();
        let counters = Counters {
            name: "test",
            done: &done,
            dropped: &dropped,
        };
        drain_loop(rx, &shared, counters, |rec| {
            if let Some(rec) = rec {
                assert_ne!(rec.started_at_ms, 1, "planted failure");
                handled.push(rec.started_at_ms);
                done.fetch_add(1, Ordering::Release);
            }
        });
        assert_eq!(handled, vec![0, 2, 3]);
        assert_eq!(
            (
                done.load(Ordering::Acquire),
                dropped.load(Ordering::Relaxed)
            ),
            (4, 1),
            "shutdown, which waits for done to reach accepted, does not wait for the lost one"
        );
    }
}
