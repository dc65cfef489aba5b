//! The pipelines between the request path and the exporters: the sink
//! that offers each record to a bounded queue per pipeline (counting what a
//! full queue drops), and the worker threads that drain the queues.
//!
//! Must never: block in `submit` (`try_send` only) or let a queue grow past
//! its bound.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

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

/// Receives until shutdown, then drains what is queued.
fn drain_loop(
    rx: Receiver<Arc<UsageRecord>>,
    shared: &Shared,
    mut f: impl FnMut(Option<&UsageRecord>),
) {
    loop {
        match rx.recv_timeout(IDLE_POLL) {
            Ok(rec) => f(Some(&rec)),
            Err(RecvTimeoutError::Timeout) => {
                f(None);
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    while let Ok(rec) = rx.try_recv() {
        f(Some(&rec));
    }
    f(None);
}

pub(crate) fn metrics_worker(
    instruments: Instruments,
    spans: Option<SpanMaker>,
    rx: Receiver<Arc<UsageRecord>>,
    shared: Arc<Shared>,
) {
    drain_loop(rx, &shared, |rec| {
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
    drain_loop(rx, &shared, |rec| match rec {
        Some(rec) => {
            report(log.append(rec));
            shared.audit_done.fetch_add(1, Ordering::Release);
        }
        // Idle: make what was written visible to readers of the file.
        None => report(log.flush()),
    });
}
