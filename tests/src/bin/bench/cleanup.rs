//! Leaves nothing behind when the bench is interrupted: every process the
//! bench starts lives in one of its child cgroups, registered here; on
//! SIGINT, SIGTERM or SIGHUP a watcher thread kills every process in them
//! (by pid, read from `cgroup.procs`) and removes the directories. The
//! normal path cleans up through `Drop` instead.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

static CGROUPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remembers a child cgroup of the bench for the signal path.
pub fn register_cgroup(path: PathBuf) {
    CGROUPS.lock().unwrap_or_else(|p| p.into_inner()).push(path);
}

/// Write end of the pipe the signal handler reports on (-1: none).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `b` outlives the call.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

/// Catches the termination signals with a handler that writes to a pipe,
/// and kills everything from a watcher thread that reads it. Not a blocked
/// mask and `sigwait`: a blocked mask is inherited across fork and exec
/// (std no longer resets it), so every agent, client and peer the bench
/// started ignored SIGTERM, and each agent stop waited out its 15 s before
/// SIGKILL. A caught signal's handler is reset to the default by exec.
pub fn install_signal_handler() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("bench: cannot catch signals; an interrupt may leave child cgroups behind");
        return;
    }
    SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
    std::thread::spawn(move || {
        let mut b = 0u8;
        loop {
            // SAFETY: reads one byte into `b`.
            let n = unsafe { libc::read(fds[0], (&mut b as *mut u8).cast(), 1) };
            if n == 1 {
                break;
            }
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        eprintln!("bench: signal {b}: stopping every process the bench started");
        kill_all();
        std::process::exit(130);
    });
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls write(2).
        unsafe {
            libc::signal(s, on_signal as *const () as libc::sighandler_t);
        }
    }
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
