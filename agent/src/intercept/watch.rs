//! Notice, as it happens, that the intercepted cgroup's directory was
//! created or removed: an inotify watch on its parent, for its name.
//!
//! Owns: one inotify descriptor. Must never: decide anything itself (the
//! caller looks at the cgroup, as it does on its timer, which stays the
//! backstop when a watch cannot be made or stops working).

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A watch on the directory that holds a cgroup, for entries of its name.
pub struct ParentWatch {
    fd: AsyncFd<Fd>,
    name: OsString,
}

impl ParentWatch {
    /// A watch for `cgroup`'s name in its parent directory; `None` for the
    /// hierarchy's root (it is never removed), or when inotify is not
    /// available (the caller's timer alone then).
    pub fn new(cgroup: &Path) -> Option<ParentWatch> {
        if super::is_hierarchy_root(cgroup).unwrap_or(false) {
            return None;
        }
        let (parent, name) = (cgroup.parent()?, cgroup.file_name()?);
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
        ino.add_watch(
            parent,
            AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_ONLYDIR,
        )
        .map_err(|e| tracing::debug!(error = %e, parent = %parent.display(), "cannot watch the intercepted cgroup's parent; looking every few seconds only"))
        .ok()?;
        // SAFETY: `Fd` owns the inotify descriptor for as long as the
        // `AsyncFd` holds it, and always returns that one.
        let fd = unsafe { AsyncFd::register_with_interest(Fd(ino), tokio::io::Interest::READABLE) }
            .ok()?;
        Some(ParentWatch {
            fd,
            name: name.to_owned(),
        })
    }

    /// Waits until an entry of the cgroup's name was created, removed or
    /// moved in the parent (or the kernel's event queue overflowed: then
    /// anything may have happened). An error means the watch no longer
    /// works.
    pub async fn changed(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let events = match ready
                .try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from))
            {
                Ok(events) => events?,
                Err(_would_block) => continue,
            };
            // First: a watch that ended says so even when the cgroup's own
            // event came in the same read (the caller looks either way).
            if events
                .iter()
                .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
            {
                return Err(std::io::Error::other("the watched directory went away"));
            }
            if events.iter().any(|e| {
                e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                    || e.name.as_deref() == Some(self.name.as_os_str())
            }) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cgroups_name_created_or_removed_wakes_it() {
        let t = tempfile::tempdir().unwrap();
        let cgroup = t.path().join("runner.service");
        let w = ParentWatch::new(&cgroup).expect("a watch");
        // A sibling alone does not wake it (read and passed over)...
        std::fs::create_dir(t.path().join("other.service")).unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), w.changed())
                .await
                .is_err(),
            "a sibling's creation woke the watch"
        );
        // ...the name does.
        std::fs::create_dir(&cgroup).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(20), w.changed())
            .await
            .expect("woken by the creation")
            .expect("the watch works");
        std::fs::remove_dir(t.path().join("other.service")).unwrap();
        std::fs::remove_dir(&cgroup).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(20), w.changed())
            .await
            .expect("woken by the removal")
            .expect("the watch works");
        // The parent itself gone: the watch says it no longer works.
        drop(t);
        let end = tokio::time::timeout(std::time::Duration::from_secs(20), w.changed())
            .await
            .expect("woken by the parent's removal");
        assert!(end.is_err());
    }

    #[test]
    fn no_watch_where_there_is_no_parent() {
        assert!(ParentWatch::new(Path::new("/")).is_none());
    }
}
