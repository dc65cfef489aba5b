//! Whether an agent is recording to a state directory, and that only one
//! does.
//!
//! - `STATE_DIR/agent.lock` (mode 0600, root's): a running agent holds it
//!   with an exclusive `flock` for its whole life, and the kernel lets go
//!   when it exits, however it exits. A second agent on the directory
//!   stops at start. Only root can open the file, so no job can hold an
//!   agent off by locking it.
//! - `STATE_DIR/agent.pid` (mode 0644): the agent's pid, its start time
//!   (`/proc/PID/stat`'s field 22) and its pid namespace. Readers
//!   (`tollgate report`, as the runner user) take no lock: an agent is
//!   recording when that process still lives with that start time (a
//!   reused pid has another). From another pid namespace, or where
//!   /proc hides other users' processes, nothing is claimed.
//!
//! Owns: both files. Must never: block, or let a reader affect the agent.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The lock file under a state directory.
pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.lock")
}

/// The file that tells readers which process the agent is.
pub fn pid_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.pid")
}

/// The running agent's hold on its state directory; let go when dropped.
#[derive(Debug)]
pub struct Presence {
    _lock: Option<File>,
}

/// Why the hold could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error(
        "another tollgate agent{} is running with the state directory {}: stop it first (systemctl stop tollgate), or give this one a state_dir of its own",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        dir.display()
    )]
    Running { dir: PathBuf, pid: Option<u32> },
    #[error("cannot use {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `agent.pid` says: a process, when it started, in which pid
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mark {
    pid: u32,
    start: u64,
    pid_ns: String,
}

impl Mark {
    fn of_self() -> Option<Mark> {
        let pid = std::process::id();
        Some(Mark {
            pid,
            start: start_time(pid).ok()??,
            pid_ns: own_pid_ns()?,
        })
    }

    fn parse(text: &str) -> Option<Mark> {
        let mut it = text.split_whitespace();
        let m = Mark {
            pid: it.next()?.parse().ok()?,
            start: it.next()?.parse().ok()?,
            pid_ns: it.next()?.to_string(),
        };
        it.next().is_none().then_some(m)
    }

    fn line(&self) -> String {
        format!("{} {} {}\n", self.pid, self.start, self.pid_ns)
    }
}

/// `/proc/PID/stat`'s start time (field 22): `Ok(None)` when the process
/// does not exist, an error when /proc does not say (hidden, unreadable).
fn start_time(pid: u32) -> std::io::Result<Option<u64>> {
    let stat = match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    crate::attribution::procfs::parse_start_time(&stat)
        .map(Some)
        .ok_or_else(|| std::io::Error::other("unreadable stat"))
}

fn own_pid_ns() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|s| !s.contains(char::is_whitespace))
}

/// Takes the state directory for this agent: an error when another agent
/// holds it. Where the file system has no locks, the agent goes on
/// without the single-agent check (a warning says so).
pub fn hold(state_dir: &Path) -> Result<Presence, PresenceError> {
    let path = lock_path(state_dir);
    let io = |path: &Path, source| PresenceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    // Root's alone, whatever made it: a lock anyone could take would let
    // them hold the next agent off.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|e| io(&path, e))?;
    let lock = match file.try_lock() {
        Ok(()) => Some(file),
        Err(TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(pid_path(state_dir))
                .ok()
                .and_then(|t| Mark::parse(&t))
                .filter(|m| start_time(m.pid).ok().flatten() == Some(m.start))
                .map(|m| m.pid);
            return Err(PresenceError::Running {
                dir: state_dir.to_path_buf(),
                pid,
            });
        }
        Err(TryLockError::Error(e)) => {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot lock the state directory (a file system without locks?): a second agent on it would not be stopped"
            );
            None
        }
    };
    // For readers: written whole, then renamed over the old one.
    if let Some(mark) = Mark::of_self() {
        let pid_file = pid_path(state_dir);
        let tmp = state_dir.join(".agent.pid.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(mark.line().as_bytes())?;
            std::fs::rename(&tmp, &pid_file)
        };
        write().map_err(|e| io(&pid_file, e))?;
    }
    Ok(Presence { _lock: lock })
}

/// Whether an agent is recording to a state directory, as far as this
/// user can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    /// The agent that wrote `agent.pid` still runs.
    Yes,
    /// It has exited: no agent runs with this state directory.
    No,
    /// No `agent.pid` (an agent from before it, or none ever), another
    /// pid namespace, or /proc does not say: nothing is claimed.
    Unknown,
}

/// Reads `agent.pid` and /proc; takes no lock and never waits.
pub fn recording(state_dir: &Path) -> Recording {
    let Some(mark) = std::fs::read_to_string(pid_path(state_dir))
        .ok()
        .and_then(|t| Mark::parse(&t))
    else {
        return Recording::Unknown;
    };
    if own_pid_ns().as_deref() != Some(mark.pid_ns.as_str()) {
        return Recording::Unknown;
    }
    match start_time(mark.pid) {
        Ok(Some(s)) if s == mark.start => Recording::Yes,
        Ok(_) => Recording::No,
        Err(_) => Recording::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// `hold`, tried again for a moment while refused: another test's
    /// fork carries a copy of the lock's descriptor until its exec, which
    /// keeps a dropped lock held for that long.
    fn hold_soon(dir: &Path) -> Presence {
        for _ in 0..100 {
            match hold(dir) {
                Ok(p) => return p,
                Err(PresenceError::Running { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the lock was never let go")
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_held_directory_is_recording_and_refuses_a_second_agent() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(recording(t.path()), Recording::Unknown, "no pid file");
        let held = hold(t.path()).expect("the first agent");
        assert_eq!(recording(t.path()), Recording::Yes);
        match hold(t.path()) {
            Err(PresenceError::Running { pid, .. }) => {
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("a second agent: {other:?}"),
        }
        let text = hold(t.path()).unwrap_err().to_string();
        assert!(text.contains("another tollgate agent"), "{text}");
        assert_eq!(mode(&lock_path(t.path())), 0o600);
        assert_eq!(mode(&pid_path(t.path())), 0o644);
        drop(held);
        let again = hold_soon(t.path());
        drop(again);
        // A lock file an earlier version left readable is made root's.
        std::fs::set_permissions(lock_path(t.path()), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        drop(hold_soon(t.path()));
        assert_eq!(mode(&lock_path(t.path())), 0o600);
    }

    /// A reader's look, or a lock a reader takes on the readable file,
    /// never holds the agent off: readers lock nothing, and the lock
    /// file is not theirs to open.
    #[test]
    fn readers_take_no_lock() {
        let t = tempfile::tempdir().unwrap();
        drop(hold_soon(t.path()));
        let pid_file = File::open(pid_path(t.path())).unwrap();
        pid_file
            .try_lock_shared()
            .expect("a reader locks agent.pid");
        let _ = recording(t.path());
        let held = hold_soon(t.path());
        drop(held);
    }

    /// A process that has exited, or a reused pid (another start time),
    /// is not recording; a mark from another pid namespace, or one that
    /// does not parse, claims nothing.
    #[test]
    fn a_dead_or_reused_pid_is_not_recording() {
        let t = tempfile::tempdir().unwrap();
        let ns = own_pid_ns().expect("this process's pid namespace");
        let me = Mark::of_self().expect("own mark");
        let write = |text: String| std::fs::write(pid_path(t.path()), text).unwrap();
        write(me.line());
        assert_eq!(recording(t.path()), Recording::Yes);
        write(
            Mark {
                start: me.start + 1,
                ..me.clone()
            }
            .line(),
        );
        assert_eq!(recording(t.path()), Recording::No, "a reused pid");
        // Above any pid_max: no such process. (Not a child that exited:
        // a fork here would carry the other tests' lock files until its
        // exec.)
        let dead = u32::MAX - 1;
        write(format!("{dead} 1 {ns}\n"));
        assert_eq!(recording(t.path()), Recording::No, "an exited process");
        write(format!("{} {} pid:[1]\n", me.pid, me.start));
        assert_eq!(recording(t.path()), Recording::Unknown, "another pid ns");
        write("garbage\n".into());
        assert_eq!(recording(t.path()), Recording::Unknown);
    }

    #[test]
    fn the_start_time_of_a_live_process_is_read_and_a_missing_one_is_none() {
        let me = std::process::id();
        let s = start_time(me).unwrap().expect("this process");
        assert!(s > 0);
        assert_eq!(start_time(u32::MAX - 1).unwrap(), None);
    }
}
