//! Live aggregates by process and by job: what `tollgate top` shows.
//!
//! Fed from the data path: [`LiveState`] is a [`RecordSink`] (one call per
//! finished request) and [`LiveHandle::request_started`] hands the proxy an
//! [`InFlight`] guard per request. Both only take a short `std` mutex over
//! in-memory maps: no I/O, no await, and no allocation except for a new row
//! (rows are found with keys borrowed from the attribution).
//!
//! Bounded: a row that has nothing in flight and has not changed for
//! [`IDLE_EVICT`] is dropped (checked at most every [`SWEEP_EVERY`]); when a
//! table is full ([`MAX_PROCESSES`], [`MAX_JOBS`]) the least recently seen
//! row (idle ones first) makes room, and `evicted` counts it. The agent
//! totals are never evicted.

use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::{Equivalent, HashMap};
use rustc_hash::FxBuildHasher;

use super::protocol::{AgentInfo, Aggregate, JobRow, PROTOCOL_VERSION, ProcessRow, Snapshot};
use crate::meter::{Attribution, RecordSink, UsageRecord};

/// Length of the tokens-per-second window.
pub const WINDOW_SECS: u64 = 10;
/// A row with nothing in flight is dropped after this long without change.
pub const IDLE_EVICT: Duration = Duration::from_secs(600);
/// How often idle rows are looked for.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Most process rows kept.
pub const MAX_PROCESSES: usize = 1024;
/// Most job rows kept.
pub const MAX_JOBS: usize = 256;

type Map<K, V> = HashMap<K, V, FxBuildHasher>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ProcKey {
    pid: u32,
    exe: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct JobKey {
    repository: Option<String>,
    job: Option<String>,
}

/// A [`ProcKey`] borrowed from an attribution: rows are looked up with it
/// and the owned key is made only for a new row. Hashes like `ProcKey`
/// (same fields, same order; `String` hashes as `str`).
#[derive(Hash)]
struct ProcRef<'a> {
    pid: u32,
    exe: &'a str,
}

/// A [`JobKey`] borrowed from an attribution; hashes like `JobKey`.
#[derive(Hash)]
struct JobRef<'a> {
    repository: Option<&'a str>,
    job: Option<&'a str>,
}

impl Equivalent<ProcKey> for ProcRef<'_> {
    fn equivalent(&self, k: &ProcKey) -> bool {
        self.pid == k.pid && self.exe == k.exe
    }
}

impl Equivalent<JobKey> for JobRef<'_> {
    fn equivalent(&self, k: &JobKey) -> bool {
        self.repository == k.repository.as_deref() && self.job == k.job.as_deref()
    }
}

impl ProcRef<'_> {
    fn owned(&self) -> ProcKey {
        ProcKey {
            pid: self.pid,
            exe: self.exe.to_string(),
        }
    }
}

impl JobRef<'_> {
    fn owned(&self) -> JobKey {
        JobKey {
            repository: self.repository.map(str::to_string),
            job: self.job.map(str::to_string),
        }
    }
}

fn keys(who: &Attribution) -> (ProcRef<'_>, JobRef<'_>) {
    let exe = who
        .exe
        .as_deref()
        .filter(|e| !e.is_empty())
        .unwrap_or(who.comm.as_str());
    (
        ProcRef { pid: who.pid, exe },
        JobRef {
            repository: who.repository.as_deref(),
            job: who.job.as_deref(),
        },
    )
}

/// Tokens per second over the last [`WINDOW_SECS`]: one bucket per second.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    sec: [u64; WINDOW_SECS as usize],
    tokens: [u64; WINDOW_SECS as usize],
}

impl Window {
    fn add(&mut self, sec: u64, n: u64) {
        let i = (sec % WINDOW_SECS) as usize;
        if self.sec[i] != sec {
            self.sec[i] = sec;
            self.tokens[i] = 0;
        }
        self.tokens[i] = self.tokens[i].saturating_add(n);
    }

    fn rate(&self, now_sec: u64) -> f64 {
        let sum: u64 = self
            .sec
            .iter()
            .zip(self.tokens.iter())
            .filter(|(s, _)| **s <= now_sec && now_sec - **s < WINDOW_SECS)
            .map(|(_, t)| *t)
            .fold(0u64, u64::saturating_add);
        sum as f64 / WINDOW_SECS as f64
    }
}

/// The counters of one row; times are offsets from `LiveState::started`.
#[derive(Debug, Clone, Default)]
struct Counters {
    requests: u64,
    in_flight: u64,
    input: u64,
    output: u64,
    cost: f64,
    unpriced: u64,
    errors: u64,
    window: Window,
    last_seen: Duration,
}

impl Counters {
    fn record(&mut self, rec: &UsageRecord, now: Duration) {
        self.requests += 1;
        self.input = self.input.saturating_add(rec.usage.input_tokens);
        self.output = self.output.saturating_add(rec.usage.output_tokens);
        match rec.cost_usd.filter(|c| c.is_finite() && *c >= 0.0) {
            Some(c) => self.cost += c,
            None => self.unpriced += 1,
        }
        // No status: no response at all.
        if rec.status >= 400 || rec.status == 0 || rec.error.is_some() {
            self.errors += 1;
        }
        let tokens = rec
            .usage
            .input_tokens
            .saturating_add(rec.usage.output_tokens);
        self.window.add(now.as_secs(), tokens);
        self.last_seen = now;
    }

    fn aggregate(&self, now: Duration) -> Aggregate {
        Aggregate {
            requests: self.requests,
            in_flight: self.in_flight,
            input_tokens: self.input,
            output_tokens: self.output,
            tokens_per_sec: self.window.rate(now.as_secs()),
            cost_usd: self.cost,
            unpriced: self.unpriced,
            errors: self.errors,
        }
    }

    fn idle(&self, now: Duration) -> Duration {
        now.saturating_sub(self.last_seen)
    }
}

#[derive(Debug, Default)]
struct ProcEntry {
    c: Counters,
    repository: Option<String>,
    job: Option<String>,
}

#[derive(Debug, Default)]
struct JobEntry {
    c: Counters,
    run_id: Option<String>,
    team: Option<String>,
}

trait HasCounters {
    fn counters(&self) -> &Counters;
}
impl HasCounters for ProcEntry {
    fn counters(&self) -> &Counters {
        &self.c
    }
}
impl HasCounters for JobEntry {
    fn counters(&self) -> &Counters {
        &self.c
    }
}

/// The row for `key`, made (and room made for it) when missing.
fn row<'a, K, Q, V>(
    map: &'a mut Map<K, V>,
    key: &Q,
    owned: impl FnOnce() -> K,
    cap: usize,
    evicted: &mut u64,
) -> &'a mut V
where
    K: Hash + Eq + Clone,
    Q: Hash + Equivalent<K>,
    V: HasCounters + Default,
{
    if !map.contains_key(key) {
        if map.len() >= cap {
            // Idle rows first, then the least recently seen.
            let victim = map
                .iter()
                .min_by_key(|(_, v)| (v.counters().in_flight > 0, v.counters().last_seen))
                .map(|(k, _)| k.clone());
            if let Some(k) = victim {
                map.remove(&k);
                *evicted += 1;
            }
        }
        map.insert(owned(), V::default());
    }
    map.get_mut(key).expect("the row was just made")
}

#[derive(Debug, Default)]
struct Inner {
    procs: Map<ProcKey, ProcEntry>,
    jobs: Map<JobKey, JobEntry>,
    totals: Counters,
    evicted: u64,
    last_sweep: Duration,
}

impl Inner {
    fn sweep(&mut self, now: Duration) {
        if now.saturating_sub(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        let keep = |c: &Counters| c.in_flight > 0 || c.idle(now) < IDLE_EVICT;
        self.procs.retain(|_, v| keep(&v.c));
        self.jobs.retain(|_, v| keep(&v.c));
    }

    fn proc_row(&mut self, k: &ProcRef<'_>) -> &mut ProcEntry {
        row(
            &mut self.procs,
            k,
            || k.owned(),
            MAX_PROCESSES,
            &mut self.evicted,
        )
    }

    fn job_row(&mut self, k: &JobRef<'_>) -> &mut JobEntry {
        row(&mut self.jobs, k, || k.owned(), MAX_JOBS, &mut self.evicted)
    }
}

/// The live aggregates. Share it as `Arc<LiveState>`: give the proxy a
/// [`LiveHandle`] (`live.handle()`), put the `Arc` in the record fan-out
/// (after pricing, so costs are known), and hand it to the control server.
pub struct LiveState {
    started: Instant,
    started_at_ms: i64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for LiveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveState")
            .field("started_at_ms", &self.started_at_ms)
            .finish_non_exhaustive()
    }
}

impl Default for LiveState {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveState {
    pub fn new() -> LiveState {
        LiveState {
            started: Instant::now(),
            started_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A cheap, cloneable handle for the proxy.
    pub fn handle(self: &Arc<Self>) -> LiveHandle {
        LiveHandle(Some(self.clone()))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent counters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn offset(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// Counts a request of `who` as in flight. Prefer
    /// [`LiveHandle::request_started`], whose guard cannot forget to call
    /// [`request_finished`](Self::request_finished).
    pub fn request_started(&self, who: &Attribution) {
        let (p, j) = keys(who);
        self.started_keys(&p, &j, who, Instant::now());
    }

    /// Ends what [`request_started`](Self::request_started) began.
    pub fn request_finished(&self, who: &Attribution) {
        let (p, j) = keys(who);
        self.finished_keys(&p, &j, Instant::now());
    }

    fn started_keys(&self, p: &ProcRef<'_>, j: &JobRef<'_>, who: &Attribution, now: Instant) {
        let now = self.offset(now);
        let mut g = self.lock();
        g.sweep(now);
        g.totals.in_flight += 1;
        let pr = g.proc_row(p);
        pr.c.in_flight += 1;
        pr.c.last_seen = now;
        if pr.repository.is_none() && pr.job.is_none() {
            pr.repository.clone_from(&who.repository);
            pr.job.clone_from(&who.job);
        }
        let jr = g.job_row(j);
        jr.c.in_flight += 1;
        jr.c.last_seen = now;
        if who.run_id.is_some() {
            jr.run_id.clone_from(&who.run_id);
        }
        if who.team.is_some() {
            jr.team.clone_from(&who.team);
        }
    }

    fn finished_keys(&self, p: &ProcRef<'_>, j: &JobRef<'_>, now: Instant) {
        let now = self.offset(now);
        let mut g = self.lock();
        g.totals.in_flight = g.totals.in_flight.saturating_sub(1);
        // A row evicted meanwhile is not brought back for this.
        if let Some(pr) = g.procs.get_mut(p) {
            pr.c.in_flight = pr.c.in_flight.saturating_sub(1);
            pr.c.last_seen = now;
        }
        if let Some(jr) = g.jobs.get_mut(j) {
            jr.c.in_flight = jr.c.in_flight.saturating_sub(1);
            jr.c.last_seen = now;
        }
    }

    /// Adds a finished request (what [`RecordSink::submit`] does), at `now`.
    pub fn record_at(&self, rec: &UsageRecord, now: Instant) {
        let (p, j) = keys(&rec.who);
        let now = self.offset(now);
        let mut g = self.lock();
        g.sweep(now);
        g.totals.record(rec, now);
        let pr = g.proc_row(&p);
        pr.c.record(rec, now);
        pr.repository.clone_from(&rec.who.repository);
        pr.job.clone_from(&rec.who.job);
        let jr = g.job_row(&j);
        jr.c.record(rec, now);
        if rec.who.run_id.is_some() {
            jr.run_id.clone_from(&rec.who.run_id);
        }
        if rec.who.team.is_some() {
            jr.team.clone_from(&rec.who.team);
        }
    }

    /// The aggregates now.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_at(Instant::now())
    }

    /// The aggregates at `now` (tests move the clock forward).
    pub fn snapshot_at(&self, now: Instant) -> Snapshot {
        let off = self.offset(now);
        let (totals, mut processes, mut jobs, evicted) = {
            let mut g = self.lock();
            g.sweep(off);
            let processes: Vec<ProcessRow> = g
                .procs
                .iter()
                .map(|(k, v)| ProcessRow {
                    pid: k.pid,
                    exe: k.exe.clone(),
                    repository: v.repository.clone(),
                    job: v.job.clone(),
                    idle_secs: v.c.idle(off).as_secs(),
                    agg: v.c.aggregate(off),
                })
                .collect();
            let jobs: Vec<JobRow> = g
                .jobs
                .iter()
                .map(|(k, v)| JobRow {
                    repository: k.repository.clone(),
                    job: k.job.clone(),
                    run_id: v.run_id.clone(),
                    team: v.team.clone(),
                    idle_secs: v.c.idle(off).as_secs(),
                    agg: v.c.aggregate(off),
                })
                .collect();
            (g.totals.aggregate(off), processes, jobs, g.evicted)
        };
        // Sorting happens outside the lock.
        let busiest = |a: &Aggregate, b: &Aggregate| {
            b.in_flight
                .cmp(&a.in_flight)
                .then(b.cost_usd.total_cmp(&a.cost_usd))
                .then(b.tokens_per_sec.total_cmp(&a.tokens_per_sec))
                .then(b.requests.cmp(&a.requests))
        };
        processes.sort_by(|a, b| {
            busiest(&a.agg, &b.agg)
                .then(a.pid.cmp(&b.pid))
                .then(a.exe.cmp(&b.exe))
        });
        jobs.sort_by(|a, b| {
            busiest(&a.agg, &b.agg)
                .then(a.repository.cmp(&b.repository))
                .then(a.job.cmp(&b.job))
        });
        Snapshot {
            version: PROTOCOL_VERSION,
            agent: AgentInfo {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at_ms: self.started_at_ms,
                uptime_secs: off.as_secs(),
            },
            window_secs: WINDOW_SECS,
            totals,
            processes,
            jobs,
            evicted,
        }
    }
}

impl RecordSink for LiveState {
    fn submit(&self, rec: Arc<UsageRecord>) {
        self.record_at(&rec, Instant::now());
    }
}

/// What the proxy holds: cheap to clone (one `Arc`), and a no-op when the
/// agent runs without live state (`LiveHandle::default()`).
#[derive(Debug, Clone, Default)]
pub struct LiveHandle(Option<Arc<LiveState>>);

impl LiveHandle {
    /// A handle that counts nothing.
    pub fn disabled() -> LiveHandle {
        LiveHandle(None)
    }

    /// Counts a request of `who` as in flight until the returned guard is
    /// dropped (or [`InFlight::finish`]ed).
    pub fn request_started(&self, who: &Arc<Attribution>) -> InFlight {
        let Some(state) = &self.0 else {
            return InFlight(None);
        };
        let (p, j) = keys(who);
        state.started_keys(&p, &j, who, Instant::now());
        InFlight(Some(Started {
            state: state.clone(),
            who: who.clone(),
        }))
    }
}

#[derive(Debug)]
struct Started {
    state: Arc<LiveState>,
    /// Shared with the connection; its row keys are borrowed from it.
    who: Arc<Attribution>,
}

/// One request in flight; dropping it ends it.
#[derive(Debug)]
#[must_use = "the request counts as in flight until this guard is dropped"]
pub struct InFlight(Option<Started>);

impl InFlight {
    /// A guard that counts nothing.
    pub fn none() -> InFlight {
        InFlight(None)
    }

    /// Ends the request now (the same as dropping the guard).
    pub fn finish(self) {}
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.state.request_finished(&s.who);
        }
    }
}
