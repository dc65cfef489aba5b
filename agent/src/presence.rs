//! Whether an agent is recording to a state directory: a running agent
//! holds `STATE_DIR/agent.lock` (mode 0644, holding its pid) with an
//! exclusive `flock` for its whole life; the kernel lets go when it exits,
//! however it exits. `tollgate report` takes a shared lock without waiting
//! to tell "no calls were made" from "nothing was counting them".
//!
//! Owns: the lock file. Must never: block (every lock is tried, never
//! waited for), or be held by any command but `run`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The lock file under a state directory.
pub fn lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.lock")
}

/// The running agent's hold on its state directory; let go when dropped.
#[derive(Debug)]
pub struct Presence {
    _file: File,
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

/// Takes the state directory for this agent: an error when another agent
/// holds it.
pub fn hold(state_dir: &Path) -> Result<Presence, PresenceError> {
    let path = lock_path(state_dir);
    let io = |source| PresenceError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(PresenceError::Running {
                dir: state_dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    // The pid, for the message above: written only under the lock.
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .map_err(io)?;
    Ok(Presence { _file: file })
}

/// Whether an agent is recording to a state directory, as far as this
/// user can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    /// An agent holds the directory.
    Yes,
    /// The lock file is there and nobody holds it: no agent runs with
    /// this state directory.
    No,
    /// No lock file (an agent from before it, or none ever), or it cannot
    /// be read: nothing is claimed.
    Unknown,
}

/// Tries a shared lock on the state directory's lock file, never waiting.
pub fn recording(state_dir: &Path) -> Recording {
    let Ok(file) = File::open(lock_path(state_dir)) else {
        return Recording::Unknown;
    };
    match file.try_lock_shared() {
        // Let go at once (and on drop): a report must not hold an agent
        // off.
        Ok(()) => {
            let _ = file.unlock();
            Recording::No
        }
        Err(TryLockError::WouldBlock) => Recording::Yes,
        Err(TryLockError::Error(_)) => Recording::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_directory_is_recording_and_refuses_a_second_agent() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(recording(t.path()), Recording::Unknown, "no lock file");
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
        drop(held);
        assert_eq!(recording(t.path()), Recording::No, "the agent stopped");
        // A report's look does not hold the next agent off.
        let again = hold(t.path()).expect("the next agent starts");
        assert_eq!(recording(t.path()), Recording::Yes);
        drop(again);
        let mode = std::fs::metadata(lock_path(t.path()))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o644
        );
    }
}
