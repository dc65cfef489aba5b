//! Leaves nothing behind when the bench is interrupted: every process the
//! bench starts lives in one of its child cgroups, registered here; on
//! SIGINT, SIGTERM or SIGHUP a watcher thread kills every process in them
//! (by pid, read from `cgroup.procs`) and removes the directories. The
//! normal path cleans up through `Drop` instead.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

static CGROUPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remembers a child cgroup of the bench for the signal path.
pub fn register_cgroup(path: PathBuf) {
    CGROUPS.lock().unwrap_or_else(|p| p.into_inner()).push(path);
}

/// Blocks the termination signals in this thread (call it before any other
/// thread starts, so all inherit the mask) and waits for them in a
/// dedicated thread. Children start with an empty mask (std resets it).
pub fn install_signal_handler() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        eprintln!("bench: cannot block signals; an interrupt may leave child cgroups behind");
        return;
    }
    std::thread::spawn(move || {
        let sig = set.wait().ok();
        eprintln!("bench: {sig:?}: stopping every process the bench started");
        kill_all();
        std::process::exit(130);
    });
}

fn kill_all() {
    let cgroups = CGROUPS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for _ in 0..50 {
        let mut any = false;
        for cg in &cgroups {
            let pids = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                any = true;
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if !any {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for cg in &cgroups {
        for _ in 0..50 {
            if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
