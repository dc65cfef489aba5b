//! Attribution: which process, CI job and repository made a request.
//!
//! Owns: turning the kernel's origin record (pid, uid, cgroup id, comm) into
//! an `Attribution`, from `/proc/PID/{stat,status,exe,cmdline,environ,
//! cgroup,cpuset}` of the process and, for the CI variables, of its
//! ancestors; the team, from the config's `[[teams]]` rules and the
//! repository; a bounded cache keyed by (pid, start time) so a reused pid
//! is never confused with the process that had it before, and checked
//! against the process's `exe` link and a hash of its command line, which
//! an exec changes (the same program run again with other arguments
//! changes only the second).
//!
//! The CI job is the nearest environment naming one, walking up from the
//! process: what the job says of itself. A job can name another repository
//! in a child's environment; only the kernel's fields (pid, uid, cgroup)
//! are beyond its reach. The README says so (What is recorded).
//!
//! A process that started after the connect (its pid was reused between
//! the connect and the attribution) is not read at all: the record keeps
//! what the kernel said at connect time.
//!
//! Must never: keep, log or return any environment variable but the CI
//! variables it names (`ci`), store a command line before redacting it
//! (`redact`), read more of /proc than those files, or fail: a process that
//! is gone gives a record with what the kernel said.

mod cgroup;
mod ci;
pub(crate) mod procfs;
mod redact;
pub mod teams;

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::meter::Attribution;
use ci::{CiJob, CiVars};
use procfs::Proc;
use teams::TeamRule;

pub use redact::{REDACTED, redact_args, redact_cmdline};

/// The inode number of the initial pid namespace (the kernel's
/// `PROC_PID_INIT_INO`).
const INITIAL_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// Whether this process sees the host's pids. The kernel reports the pid
/// of a connecting process in the initial pid namespace; in a container
/// with a pid namespace of its own, `/proc` shows other numbers (or none
/// of those processes), and requests would be recorded without their
/// process, job and repository. `None` when it cannot tell.
pub fn in_initial_pid_namespace() -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata("/proc/self/ns/pid").ok()?.ino();
    Some(ino == INITIAL_PID_NS_INO)
}

/// Ancestors searched for CI variables.
const MAX_DEPTH: usize = 32;
/// Entries kept in each cache.
const CACHE_ENTRIES: usize = 4096;
/// Longest command line stored (bytes, after redaction).
const CMDLINE_KEEP: usize = 4096;

/// A process, across pid reuse: (pid, start time in ticks since boot).
type ProcKey = (u32, u64);

/// What the kernel said about the process that connected.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// Process id (thread group id).
    pub pid: u32,
    pub uid: u32,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// `comm` of the connecting thread.
    pub comm: String,
    /// When it connected, in nanoseconds since boot; 0 if unknown.
    pub connected_boot_ns: u64,
}

/// A map that forgets its oldest entries beyond `cap`.
struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Hash + Eq + Copy, V: Clone> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn get(&self, k: &K) -> Option<V> {
        self.map.get(k).cloned()
    }

    fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// What /proc said about one process.
#[derive(Debug, Clone)]
struct ProcInfo {
    exe: Option<String>,
    /// A hash of the raw command line (see `Proc::cmdline_hash`).
    cmdline_hash: u64,
    cmdline: Option<String>,
    cgroup_path: Option<String>,
    container_id: Option<String>,
}

struct Caches {
    procs: Bounded<ProcKey, Arc<ProcInfo>>,
    /// The CI job a process belongs to (its own variables or an ancestor's);
    /// `None` when none was found.
    ci: Bounded<ProcKey, Option<Arc<CiJob>>>,
}

/// Fills `Attribution`s from /proc, with a cache.
pub struct Attributor {
    proc_root: PathBuf,
    /// Nanoseconds per clock tick of `/proc/PID/stat`'s start time.
    tick_ns: u64,
    /// This process's time namespace's boot-time offset: /proc shows start
    /// times shifted by it, the kernel programs' clock is not.
    boottime_offset_ns: i64,
    teams: Vec<TeamRule>,
    caches: Mutex<Caches>,
    /// The kernel's pids are not this /proc's (a pid namespace of the
    /// agent's own): /proc is not read at all, since a process there with
    /// the same number is another one.
    kernel_fields_only: bool,
}

impl std::fmt::Debug for Attributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attributor")
            .field("proc_root", &self.proc_root)
            .field("teams", &self.teams.len())
            .finish_non_exhaustive()
    }
}

impl Attributor {
    /// `proc_root` is `/proc` in production; tests pass a fake tree.
    pub fn new(proc_root: PathBuf) -> Self {
        Self::with_capacity(proc_root, CACHE_ENTRIES)
    }

    fn with_capacity(proc_root: PathBuf, cap: usize) -> Self {
        Attributor {
            proc_root,
            tick_ns: tick_ns(),
            boottime_offset_ns: std::fs::read_to_string("/proc/self/timens_offsets")
                .ok()
                .and_then(|t| boottime_offset_ns(&t))
                .unwrap_or(0),
            teams: Vec::new(),
            kernel_fields_only: false,
            caches: Mutex::new(Caches {
                procs: Bounded::new(cap),
                ci: Bounded::new(cap),
            }),
        }
    }

    /// Fills `team` from these rules (the config's `[[teams]]`, already
    /// validated): the first rule with a pattern matching the repository.
    pub fn with_teams(mut self, rules: Vec<TeamRule>) -> Self {
        self.teams = rules;
        self
    }

    /// With `true`, records keep only what the kernel said (pid, uid,
    /// cgroup, comm): for an agent in a pid namespace of its own, whose
    /// /proc does not show the kernel's pids.
    pub fn kernel_fields_only(mut self, only: bool) -> Self {
        self.kernel_fields_only = only;
        self
    }

    fn caches(&self) -> MutexGuard<'_, Caches> {
        self.caches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who made a connection: the kernel's fields plus what /proc says about
    /// the caller and its ancestors. Never fails; missing data stays `None`.
    pub fn attribute(&self, caller: &Caller) -> Attribution {
        let pid = caller.pid;
        let mut a = Attribution {
            pid,
            uid: caller.uid,
            cgroup_id: caller.cgroup_id,
            comm: caller.comm.clone(),
            ..Attribution::default()
        };
        if self.kernel_fields_only {
            return a;
        }
        let Some(start) = Proc::new(&self.proc_root, pid).start_time() else {
            return a;
        };
        // The start time is truncated to a tick, so a process that started
        // at or before the connect never reads as later than it.
        let started_ns =
            i128::from(start) * i128::from(self.tick_ns) - i128::from(self.boottime_offset_ns);
        if caller.connected_boot_ns != 0 && started_ns > i128::from(caller.connected_boot_ns) {
            tracing::debug!(
                pid,
                "the connecting process is gone and its pid reused: attributed from the kernel's fields"
            );
            return a;
        }
        let key = (pid, start);
        let (info, exec_since) = self.proc_info(key);
        a.exe = info.exe.clone();
        a.cmdline = info.cmdline.clone();
        a.cgroup_path = info.cgroup_path.clone();
        a.container_id = info.container_id.clone();
        if let Some(job) = self.ci_job(key, exec_since) {
            a.ci_system = Some(job.system.to_string());
            a.repository = job.repository.clone();
            a.workflow = job.workflow.clone();
            a.job = job.job.clone();
            a.job_id = job.job_id.clone();
            a.run_id = job.run_id.clone();
            a.run_attempt = job.run_attempt.clone();
            a.ref_name = job.ref_name.clone();
            a.runner = job.runner.clone();
        }
        a.team = a
            .repository
            .as_deref()
            .and_then(|r| teams::team_for(&self.teams, r))
            .map(str::to_string);
        a
    }

    /// The process's /proc facts, from the cache while its `exe` link and
    /// command line are the ones cached. The flag is true when the cached
    /// entry was stale: the process exec'd since (same pid and start time,
    /// another program or the same one with other arguments).
    fn proc_info(&self, key: ProcKey) -> (Arc<ProcInfo>, bool) {
        let p = Proc::new(&self.proc_root, key.0);
        let exe = p.exe();
        let cmdline_hash = p.cmdline_hash();
        let cached = self.caches().procs.get(&key);
        // An exe link or command line that cannot be read (the process is
        // exiting) is no sign of an exec: the cached facts stand.
        if let Some(hit) = cached.as_ref().filter(|hit| {
            (exe.is_none() || hit.exe == exe)
                && (cmdline_hash == 0 || hit.cmdline_hash == cmdline_hash)
        }) {
            return (Arc::clone(hit), false);
        }
        let cg = p.cgroup();
        let info = Arc::new(ProcInfo {
            exe,
            cmdline_hash,
            cmdline: p
                .cmdline()
                .map(|args| truncate(redact_args(&args), CMDLINE_KEEP)),
            cgroup_path: cg.as_deref().and_then(cgroup::unified_path),
            container_id: cg
                .as_deref()
                .and_then(cgroup::container_in_cgroup_file)
                .or_else(|| p.cpuset().and_then(|c| cgroup::container_id(&c))),
        });
        self.caches().procs.insert(key, Arc::clone(&info));
        (info, cached.is_some())
    }

    /// Walks from `key` up the parent chain (at most `MAX_DEPTH` processes,
    /// never pid 1) to the first environment naming a CI job. With `exec`,
    /// `key` itself exec'd since it was cached (an exec may change the
    /// environment), so its cached answer is not used.
    fn ci_job(&self, key: ProcKey, exec: bool) -> Option<Arc<CiJob>> {
        let mut walked: Vec<ProcKey> = Vec::new();
        let mut cur = key;
        let mut found: Option<Arc<CiJob>> = None;
        for _ in 0..MAX_DEPTH {
            let fresh = exec && cur == key;
            if let Some(hit) = self.caches().ci.get(&cur).filter(|_| !fresh) {
                found = hit;
                break;
            }
            walked.push(cur);
            let p = Proc::new(&self.proc_root, cur.0);
            let mut vars = CiVars::default();
            p.environ(|name, value| vars.offer(name, value));
            if let Some(job) = vars.identify() {
                found = Some(Arc::new(job));
                break;
            }
            let Some(ppid) = p.ppid().filter(|pp| *pp > 1 && *pp != cur.0) else {
                break;
            };
            // A parent that started after its child is another process
            // with the parent's pid (the parent exited and the pid was
            // reused as the walk read it): its environment is not the job's.
            let Some(pstart) = Proc::new(&self.proc_root, ppid)
                .start_time()
                .filter(|&s| s <= cur.1)
            else {
                break;
            };
            cur = (ppid, pstart);
        }
        let mut caches = self.caches();
        for k in walked {
            caches.ci.insert(k, found.clone());
        }
        found
    }
}

/// The `boottime` offset of a `/proc/self/timens_offsets` text
/// (`boottime SECS NANOS`), in nanoseconds.
fn boottime_offset_ns(text: &str) -> Option<i64> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("boottime"))?;
    let mut f = line.split_whitespace().skip(1);
    let secs: i64 = f.next()?.parse().ok()?;
    let nanos: i64 = f.next()?.parse().ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Nanoseconds per clock tick (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|hz| *hz > 0).unwrap_or(100);
    1_000_000_000 / hz
}

/// Cuts `s` to at most `max` bytes at a character boundary, marking the cut.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        s.truncate(s.floor_char_boundary(max));
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests;
