//! The ledger writer: a dedicated thread that owns the `Ledger` and writes
//! what the request path hands it, in batches of one transaction each,
//! giving the CPU back every few records so that a batch never holds a CPU
//! that a request's next hop is waiting for.
//!
//! `LedgerHandle::submit` never blocks on disk: it tries the bounded
//! channel, and when that is full appends to an overflow list (a `Vec`
//! behind a mutex held for one push) that the writer drains. A failed write
//! keeps its records and is retried with backoff; nothing is dropped until
//! `shutdown` gives up at its deadline (and says how many were left), except
//! past the backlog bound: while the ledger cannot be written (a full disk,
//! a lock held from outside) at most `max_backlog` records wait in memory,
//! and what comes beyond is counted as dropped and logged, so that an
//! outage costs records, counted, rather than the agent's memory. A record
//! that SQLite refuses for what it holds (a constraint, a type: an error
//! about the record, not the disk or a lock) is set aside, counted as
//! refused and logged whole, so that it cannot hold back every later one. A panic
//! in the writer (a bug) rolls back its transaction, is logged and counted
//! as a write error, and the writer carries on with the records it held.
//! A ledger file deleted or moved away while the agent runs is noticed
//! before the next write, and a new one is created at the path.
//!
//! Must never: block `submit` on the disk or on the writer; hold records
//! in memory without bound.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Ledger, LedgerError};
use crate::meter::UsageRecord;

/// Most records gathered before a write starts (overflow can add more).
const BATCH: usize = 512;
/// How long records gather once one has arrived.
const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Idle poll: how often the writer looks at the overflow list and the
/// shutdown flag when nothing arrives.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Records inserted between two `sched_yield`s. Under load a 50 ms batch
/// is a few milliseconds of CPU in one piece; on a small runner a request's
/// next hop (the client, the provider, the agent's own worker) that the
/// kernel queues on this CPU would wait for that piece to end. Yielding
/// every few records bounds the wait at roughly ≈100 µs of inserts.
const YIELD_EVERY: usize = 8;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a writer dropped without `shutdown` (an error path of the
/// agent's start, a test) keeps trying a failing ledger before it gives up
/// and logs what it held.
const DROP_GRACE: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(10)
};

/// Counters of the writer, for `/metrics` and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Records committed to the ledger.
    pub written: u64,
    /// Records accepted but not yet committed.
    pub queued: u64,
    /// Records that found the channel full and took the overflow path
    /// (delivered all the same).
    pub overflowed: u64,
    /// Failed write attempts (each retried).
    pub errors: u64,
    /// Records submitted after shutdown began (not written).
    pub rejected: u64,
    /// Records dropped because `max_backlog` records were already waiting
    /// (the ledger could not be written for a while).
    pub dropped: u64,
    /// Records the ledger refused for what they held (a constraint or a
    /// type SQLite would refuse every time): each is logged whole, at
    /// error level, instead.
    pub refused: u64,
}

struct Shared {
    closed: AtomicBool,
    /// Submits between their `closed` check and their hand-over.
    inflight: AtomicUsize,
    overflow: Mutex<Vec<Arc<UsageRecord>>>,
    deadline: Mutex<Option<Instant>>,
    submitted: AtomicU64,
    written: AtomicU64,
    overflowed: AtomicU64,
    errors: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    /// Most records accepted and not yet written.
    max_backlog: u64,
    /// The ledger file.
    path: std::path::PathBuf,
    /// Rows older than this are deleted (`ledger.retention_days`); `None`
    /// keeps every row.
    retention: Option<Duration>,
    /// How often the rows past `retention` are looked for ([`PRUNE_EVERY`]).
    prune_every: Duration,
    /// Tests: the writer panics at this pause between two inserts,
    /// counting from 1 (0: never).
    #[cfg(test)]
    pub(super) panic_at: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Owns the writer thread; `shutdown` flushes and joins it.
pub struct LedgerWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    done: Receiver<Result<u64, (u64, String)>>,
}

/// Cheap to clone; what the request path holds.
#[derive(Clone)]
pub struct LedgerHandle {
    tx: SyncSender<Arc<UsageRecord>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LedgerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerHandle")
            .field("stats", &self.stats())
            .finish()
    }
}

impl LedgerWriter {
    /// Opens the ledger at `path` (errors are returned here, not later) and
    /// starts the writer thread with a channel of `queue` records, holding
    /// at most `max_backlog` unwritten records in all.
    pub fn start(
        path: &std::path::Path,
        queue: usize,
        max_backlog: usize,
    ) -> Result<(LedgerWriter, LedgerHandle), LedgerError> {
        Self::start_with_retention(path, queue, max_backlog, None)
    }

    /// [`LedgerWriter::start`], deleting rows older than `retention` at
    /// start and every [`PRUNE_EVERY`] after, between batches.
    pub fn start_with_retention(
        path: &std::path::Path,
        queue: usize,
        max_backlog: usize,
        retention: Option<Duration>,
    ) -> Result<(LedgerWriter, LedgerHandle), LedgerError> {
        Self::start_pruning_every(path, queue, max_backlog, retention, PRUNE_EVERY)
    }

    /// [`LedgerWriter::start_with_retention`], looking for rows past the
    /// retention every `prune_every` (tests).
    pub(crate) fn start_pruning_every(
        path: &std::path::Path,
        queue: usize,
        max_backlog: usize,
        retention: Option<Duration>,
        prune_every: Duration,
    ) -> Result<(LedgerWriter, LedgerHandle), LedgerError> {
        let mut ledger = Some(Ledger::open(path)?);
        let (tx, rx) = mpsc::sync_channel::<Arc<UsageRecord>>(queue.max(1));
        let (done_tx, done) = mpsc::channel();
        let shared = Arc::new(Shared {
            closed: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            overflow: Mutex::new(Vec::new()),
            deadline: Mutex::new(None),
            submitted: AtomicU64::new(0),
            written: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            max_backlog: max_backlog.max(1) as u64,
            path: path.to_path_buf(),
            retention,
            prune_every,
            #[cfg(test)]
            panic_at: AtomicUsize::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || {
                let outcome = supervise(&mut ledger, &rx, &thread_shared);
                // Nobody waits when the writer was dropped without
                // `shutdown`: what it could not write is logged here.
                if let Err(mpsc::SendError(Err((unwritten, reason)))) = done_tx.send(outcome) {
                    tracing::error!(
                        unwritten,
                        reason = %reason,
                        "the ledger writer stopped with usage records it could not write"
                    );
                }
            })
            .map_err(LedgerError::Thread)?;
        Ok((
            LedgerWriter {
                shared: Arc::clone(&shared),
                thread: Some(thread),
                done,
            },
            LedgerHandle { tx, shared },
        ))
    }

    /// Stops accepting records, writes everything accepted, and joins the
    /// thread, waiting at most `timeout`. Returns the records written in
    /// total over the writer's life.
    pub fn shutdown(mut self, timeout: Duration) -> Result<u64, LedgerError> {
        *lock(&self.shared.deadline) = Some(Instant::now() + timeout);
        self.shared.closed.store(true, Ordering::SeqCst);
        // The thread honours the deadline itself; the margin covers one write.
        match self.done.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(Ok(total)) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
                Ok(total)
            }
            Ok(Err((unwritten, reason))) => Err(LedgerError::Unwritten { unwritten, reason }),
            Err(_) => {
                let s = stats(&self.shared);
                Err(LedgerError::ShutdownTimeout {
                    waited: timeout,
                    unwritten: s.queued,
                })
            }
        }
    }
}

impl Drop for LedgerWriter {
    /// Without `shutdown`, the thread still drains what it has and exits;
    /// while the ledger fails it retries for [`DROP_GRACE`], not for ever.
    fn drop(&mut self) {
        lock(&self.shared.deadline).get_or_insert_with(|| Instant::now() + DROP_GRACE);
        self.shared.closed.store(true, Ordering::SeqCst);
    }
}

impl LedgerHandle {
    /// Hands `rec` to the writer without blocking on I/O. Never drops it
    /// while the writer runs; after shutdown began it is counted as rejected.
    pub fn submit(&self, rec: impl Into<Arc<UsageRecord>>) {
        let rec = rec.into();
        let s = &self.shared;
        s.inflight.fetch_add(1, Ordering::SeqCst);
        if s.closed.load(Ordering::SeqCst) {
            s.inflight.fetch_sub(1, Ordering::SeqCst);
            let n = s.rejected.fetch_add(1, Ordering::Relaxed);
            if n == 0 {
                tracing::warn!(
                    "a usage record arrived after the ledger writer shut down; it is not written"
                );
            }
            return;
        }
        let waiting = s
            .submitted
            .load(Ordering::Relaxed)
            .saturating_sub(settled(s));
        if waiting >= s.max_backlog {
            s.inflight.fetch_sub(1, Ordering::SeqCst);
            let n = s.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(10_000) {
                tracing::error!(
                    dropped = n + 1,
                    waiting,
                    "the ledger has not been written for a while and its backlog is full (ledger.max_backlog): usage records are being dropped; see the earlier ledger write errors"
                );
            }
            return;
        }
        s.submitted.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(rec)) | Err(TrySendError::Disconnected(rec)) => {
                lock(&s.overflow).push(rec);
                s.overflowed.fetch_add(1, Ordering::Relaxed);
            }
        }
        s.inflight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Current counters.
    pub fn stats(&self) -> LedgerStats {
        stats(&self.shared)
    }

    /// Tests: the writer panics at its `n`th pause between two inserts
    /// from now (one every `YIELD_EVERY` records of a transaction).
    #[cfg(test)]
    pub(super) fn plant_panic_at(&self, n: usize) {
        self.shared.panic_at.store(n, Ordering::SeqCst);
    }

    /// Tests: whether the writer thread still runs (it holds a reference
    /// to the shared state, as do the writer and every handle).
    #[cfg(test)]
    pub(super) fn writer_thread_holds(&self, others: usize) -> bool {
        Arc::strong_count(&self.shared) > others
    }

    /// Tests: whether the planted panic is still to come.
    #[cfg(test)]
    pub(super) fn panic_planted(&self) -> bool {
        self.shared.panic_at.load(Ordering::SeqCst) != 0
    }
}

/// Records the writer is done with: written, or refused by the ledger.
fn settled(s: &Shared) -> u64 {
    s.written.load(Ordering::Relaxed) + s.refused.load(Ordering::Relaxed)
}

fn stats(s: &Shared) -> LedgerStats {
    LedgerStats {
        written: s.written.load(Ordering::Relaxed),
        queued: s
            .submitted
            .load(Ordering::Relaxed)
            .saturating_sub(settled(s)),
        refused: s.refused.load(Ordering::Relaxed),
        overflowed: s.overflowed.load(Ordering::Relaxed),
        errors: s.errors.load(Ordering::Relaxed),
        rejected: s.rejected.load(Ordering::Relaxed),
        dropped: s.dropped.load(Ordering::Relaxed),
    }
}

/// Runs the writer loop, and again after a panic in it: the transaction
/// it was in is rolled back (rusqlite's on unwind), the records stay in
/// `pending`, and the failure counts as a write error, retried with the
/// same backoff. At shutdown past the deadline it gives up as `run` does.
fn supervise(
    ledger: &mut Option<Ledger>,
    rx: &Receiver<Arc<UsageRecord>>,
    s: &Shared,
) -> Result<u64, (u64, String)> {
    let mut pending: Vec<Arc<UsageRecord>> = Vec::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run(ledger, rx, s, &mut pending)
        }));
        let panic = match outcome {
            Ok(done) => return done,
            Err(p) => p,
        };
        let what = panic
            .downcast_ref::<&str>()
            .map(|m| m.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        s.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(panic = %what, records = pending.len(), retry_in = ?backoff, "the ledger writer failed (a bug: please report it); it keeps its records and carries on");
        if !wait_to_retry(s, &mut backoff) {
            return Err((
                unwritten(&pending, rx),
                format!("the writer failed: {what}"),
            ));
        }
    }
}

/// After a failure: sleeps `backoff` (at most what the shutdown deadline
/// leaves) and doubles it. False, without sleeping, once shutdown's
/// deadline has passed: give up.
fn wait_to_retry(s: &Shared, backoff: &mut Duration) -> bool {
    let mut sleep = *backoff;
    if s.closed.load(Ordering::SeqCst) {
        let left = lock(&s.deadline).map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return false;
        }
        if let Some(l) = left {
            sleep = sleep.min(l);
        }
    }
    std::thread::sleep(sleep);
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    true
}

/// Records held and queued, when the writer gives up.
fn unwritten(pending: &[Arc<UsageRecord>], rx: &Receiver<Arc<UsageRecord>>) -> u64 {
    pending.len() as u64 + rx.try_iter().count() as u64
}

/// The writer thread's loop. Returns the total written, or what was left
/// when the shutdown deadline passed during failing writes.
fn run(
    ledger: &mut Option<Ledger>,
    rx: &Receiver<Arc<UsageRecord>>,
    s: &Shared,
    pending: &mut Vec<Arc<UsageRecord>>,
) -> Result<u64, (u64, String)> {
    let mut backoff = BACKOFF_MIN;
    let mut backlog = false;
    let mut next_prune = Instant::now();
    // Rows past the retention remain: one more piece each time round, so
    // records never wait behind more than one piece, and a shutdown is
    // not held up by a long prune.
    let mut prune_more = false;
    let mut pruned = 0usize;
    loop {
        let closing = s.closed.load(Ordering::SeqCst);
        if let Some(keep) = s.retention
            && !closing
            && !backlog
            && (prune_more || Instant::now() >= next_prune)
        {
            if !prune_more {
                next_prune = Instant::now() + s.prune_every;
            }
            prune_more = match current(ledger, s) {
                Ok(l) => prune_piece(l, keep, &mut pruned),
                Err(_) => false,
            };
        }
        if closing {
            // Every submit that saw `closed == false` finishes its hand-over.
            while s.inflight.load(Ordering::SeqCst) != 0 {
                std::thread::yield_now();
            }
        } else if pending.is_empty()
            && let Ok(r) = rx.recv_timeout(if prune_more {
                Duration::ZERO
            } else {
                IDLE_POLL
            })
        {
            pending.push(r);
            // Let the batch gather without waking per record: a sleeping
            // receiver costs the senders nothing, a blocked one a futex wake
            // each. What does not fit the channel meanwhile takes the
            // overflow path, drained below.
            // A full last batch means a backlog: write on without a pause.
            if !backlog {
                std::thread::sleep(BATCH_WINDOW);
            }
        }
        while let Ok(r) = rx.try_recv() {
            pending.push(r);
            if !closing && pending.len() >= BATCH {
                break;
            }
        }
        {
            let mut overflow = lock(&s.overflow);
            if !overflow.is_empty() {
                pending.append(&mut overflow);
            }
        }
        if pending.is_empty() {
            if closing {
                return Ok(s.written.load(Ordering::Relaxed));
            }
            continue;
        }
        backlog = pending.len() >= BATCH;
        // One transaction per BATCH records: a backlog after failures is
        // written (and kept) piece by piece, so a shutdown deadline rolls
        // back at most one piece. A piece that fails is written again
        // record by record, setting aside what the ledger refuses.
        let mut failed = None;
        let mut target = match current(ledger, s) {
            Ok(l) => Some(l),
            Err(e) => {
                failed = Some(e);
                None
            }
        };
        // Committed pieces leave `pending` even when a later piece panics.
        let mut w = Committed { pending, done: 0 };
        while let Some(ledger) = target.as_deref_mut()
            && w.done < w.pending.len()
        {
            let end = (w.done + BATCH).min(w.pending.len());
            let pause = || {
                #[cfg(test)]
                if s.panic_at
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    == Ok(1)
                {
                    panic!("planted writer panic");
                }
                std::thread::yield_now()
            };
            match ledger.insert_batch_pausing(&w.pending[w.done..end], YIELD_EVERY, pause) {
                Ok(()) => {
                    s.written
                        .fetch_add((end - w.done) as u64, Ordering::Relaxed);
                    w.done = end;
                }
                Err(e) => match set_aside_refused(ledger, &w.pending[w.done..end], s) {
                    Ok(()) => w.done = end,
                    Err(()) => {
                        failed = Some(e);
                        break;
                    }
                },
            }
        }
        drop(w);
        match failed {
            None => backoff = BACKOFF_MIN,
            Some(e) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, records = pending.len(), retry_in = ?backoff, "ledger write failed; keeping the records and retrying");
                if !wait_to_retry(s, &mut backoff) {
                    return Err((unwritten(pending, rx), e.to_string()));
                }
            }
        }
    }
}

/// After a piece failed as a whole: writes its records one statement each
/// and sets aside those the ledger refuses for what they hold, logging each
/// whole (what it would have stored: no secrets), so that one such record
/// does not hold back every later one. `Err` when the ledger, not a
/// record, is the trouble (the disk, a lock): the piece waits for a retry.
fn set_aside_refused(
    ledger: &mut Ledger,
    piece: &[Arc<UsageRecord>],
    s: &Shared,
) -> Result<(), ()> {
    let Ok(refused) = ledger.insert_each(piece) else {
        return Err(());
    };
    s.written
        .fetch_add((piece.len() - refused.len()) as u64, Ordering::Relaxed);
    s.refused.fetch_add(refused.len() as u64, Ordering::Relaxed);
    for (i, e) in refused {
        let record = serde_json::to_string(&*piece[i]).unwrap_or_default();
        tracing::error!(error = %e, %record, "the ledger refused a usage record (it would refuse it every time); it is not in the ledger and is logged here instead");
    }
    Ok(())
}

/// How often rows past `ledger.retention_days` are deleted.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Rows deleted per transaction: records waiting to be written wait at
/// most one such piece.
const PRUNE_PIECE: usize = 1000;

/// Deletes one piece of the rows that started more than `keep` ago;
/// true when more may remain. `pruned` adds up a round's rows, logged when
/// the round ends; an error is logged and left to the next round.
fn prune_piece(ledger: &Ledger, keep: Duration, pruned: &mut usize) -> bool {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let keep_ms = keep.as_millis().min(i64::MAX as u128) as i64;
    match ledger.prune_before(now_ms.saturating_sub(keep_ms), keep_ms, PRUNE_PIECE) {
        Ok(n) => {
            *pruned += n;
            if n == PRUNE_PIECE {
                return true;
            }
            if *pruned > 0 {
                tracing::info!(
                    rows = *pruned,
                    retention_days = keep.as_secs() / 86_400,
                    "deleted ledger rows past the retention"
                );
            }
            *pruned = 0;
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not delete rows past ledger.retention_days; trying again later");
            *pruned = 0;
            false
        }
    }
}

/// The ledger to write to: the open one, unless its file was deleted or
/// replaced under the agent (then its WAL is checkpointed into the old
/// file, the old connection closed, and a new ledger created at the path),
/// or none is open after such a failure.
fn current<'a>(ledger: &'a mut Option<Ledger>, s: &Shared) -> Result<&'a mut Ledger, LedgerError> {
    if let Some(l) = ledger.as_ref()
        && l.file_replaced()
    {
        tracing::error!(path = %s.path.display(), "the ledger file was deleted or replaced while the agent ran; writing to a new one at that path (earlier records are in the old file only)");
        // Into the old file, wherever it went, before the WAL it left behind
        // under the old name is let go.
        if let Err(e) = l.checkpoint() {
            tracing::warn!(error = %e, "could not write the WAL into the replaced ledger file");
        }
        *ledger = None;
    }
    match ledger {
        Some(l) => Ok(l),
        None => Ok(ledger.insert(Ledger::open(&s.path)?)),
    }
}

/// The front of `pending` that is committed, removed from it on drop (on
/// unwind too, so that a panic does not write those records twice).
struct Committed<'a> {
    pending: &'a mut Vec<Arc<UsageRecord>>,
    done: usize,
}

impl Drop for Committed<'_> {
    fn drop(&mut self) {
        self.pending.drain(..self.done);
    }
}
