//! A child cgroup v2 directory created for one test and removed on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == "cgroup2").then(|| PathBuf::from(dir))
    })
}

pub struct TestCgroup {
    path: PathBuf,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl TestCgroup {
    pub fn create(label: &str) -> TestCgroup {
        let root = cgroup2_root().expect("no cgroup v2 hierarchy in /proc/mounts");
        let name = format!(
            "tollgate-test-{}-{}-{}",
            label,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = root.join(name);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create test cgroup {}: {e}", path.display()));
        TestCgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// The cgroup id (inode of the directory), as bpf_get_current_cgroup_id sees it.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).expect("cgroup dir").ino()
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl TestCgroup {
    /// Removes the (empty) cgroup directory, as systemd does when a service
    /// stops; `rmdir` may fail briefly (EBUSY) just after its last process
    /// was reaped, so it is tried again for up to 10 s (the kernel lets go
    /// of the cgroup later on a loaded host).
    pub fn remove_now(&self) {
        for _ in 0..500 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        std::fs::remove_dir(&self.path)
            .unwrap_or_else(|e| panic!("cannot remove {}: {e}", self.path.display()));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                unsafe {
                    libc::kill(p, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Up to 10 s, as `remove_now`: the kernel lets go of a cgroup
        // later on a loaded host.
        for _ in 0..500 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "warning: could not remove test cgroup {}",
            self.path.display()
        );
    }
}
