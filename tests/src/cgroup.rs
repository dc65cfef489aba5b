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
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| sweep(&root));
        let name = format!(
            "tollgate-test-{}-{}-{}-{}",
            label,
            pid_namespace(),
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

/// The inode of this process's pid namespace: pids name processes only
/// within one.
pub fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}

/// The pid namespace and pid of the test process that made `name`
/// (`tollgate-test-LABEL-PIDNS-PID-SEQ`), if it is one of ours.
fn owner(name: &str) -> Option<(u64, i32)> {
    let rest = name.strip_prefix("tollgate-test-")?;
    let mut fields = rest.rsplitn(4, '-');
    let (seq, pid, ns, _label) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    seq.parse::<u32>().ok()?;
    Some((ns.parse().ok()?, pid.parse().ok()?))
}

/// Removes the test cgroups a killed run left behind: those whose test
/// process is gone (a harness SIGKILLed by a CI timeout runs no `Drop`).
/// A concurrent run's cgroups are left alone, as their process lives, and
/// so are those of runs in other pid namespaces (a container sharing the
/// cgroup tree), whose pids mean nothing here.
/// Whatever is still in a swept cgroup is killed first; its agents have
/// already died with their test thread (`PR_SET_PDEATHSIG`).
fn sweep(root: &Path) {
    let Ok(dir) = std::fs::read_dir(root) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some((ns, pid)) = name.to_str().and_then(owner) else {
            continue;
        };
        if ns != pid_namespace() || pid <= 0 || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let stale = TestCgroup { path: entry.path() };
        eprintln!(
            "note: removing {}, left behind by a test run that died",
            stale.path.display()
        );
        drop(stale);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_is_read_from_the_name() {
        assert_eq!(owner("tollgate-test-curl-99-4242-7"), Some((99, 4242)));
        assert_eq!(owner("tollgate-test-two-words-99-4242-0"), Some((99, 4242)));
        assert_eq!(owner("tollgate-test-ns-4242"), None);
        assert_eq!(owner("tollgate-test-x-99-notapid-0"), None);
        assert_eq!(owner("tollgate-test-x-99-4242-notaseq"), None);
        assert_eq!(owner("system.slice"), None);
    }

    #[test]
    #[ignore = "needs root and cgroup v2 (cargo xtask test runs it as root)"]
    fn a_dead_runs_cgroups_are_swept_and_a_live_runs_kept() {
        let root = cgroup2_root().expect("cgroup v2");
        // A pid that is gone: a child that has been reaped.
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let dead = child.id();
        child.wait().expect("wait");
        let ns = pid_namespace();
        let stale = root.join(format!("tollgate-test-sweep-{ns}-{dead}-0"));
        let live = root.join(format!(
            "tollgate-test-sweep-{ns}-{}-999999",
            std::process::id()
        ));
        // Another pid namespace's: its pid means nothing here.
        let elsewhere = root.join(format!("tollgate-test-sweep-{}-{dead}-1", ns + 1));
        for d in [&stale, &live, &elsewhere] {
            std::fs::create_dir(d).expect("test cgroup");
        }
        // Removed whatever the assertions say.
        let _kept: Vec<TestCgroup> = [&stale, &live, &elsewhere]
            .into_iter()
            .map(|d| TestCgroup { path: d.clone() })
            .collect();
        sweep(&root);
        assert!(!stale.exists(), "a dead run's cgroup was left");
        assert!(live.exists(), "a live run's cgroup was swept");
        assert!(elsewhere.exists(), "another namespace's cgroup was swept");
    }
}
