//! The real `tollgate` binary, started for one test with its own state
//! directory, config and child cgroup; stopped (by pid) on drop.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long the ledger must stay unchanged before [`Agent::wait_for_records`]
/// takes its records as final: several of the writer's 50 ms batch windows.
pub const SETTLE: Duration = Duration::from_millis(300);

#[derive(Default)]
pub struct AgentOptions {
    pub cgroup: PathBuf,
    /// host → addresses, for `[resolver.overrides]`.
    pub overrides: Vec<(String, Vec<String>)>,
    pub extra_ca: Option<PathBuf>,
    /// More TOML appended to the generated config; its lines that start
    /// with `proxy.` go into the generated `[proxy]` table instead (TOML
    /// cannot open a table twice).
    pub extra_toml: String,
    /// Start the agent inside the intercepted cgroup itself, as in
    /// production where it attaches to the root cgroup: its own upstream
    /// connections must not be redirected to itself.
    pub join_cgroup: bool,
    /// `proxy.listen`; `127.0.0.1:0` when unset.
    pub listen: Option<String>,
    /// Sends SIGTERM during start-up, once the log has this message: the
    /// agent is stopped (SIGSTOP) there, signalled, and continued, so the
    /// signal lands at that point of start-up whatever the machine's speed.
    pub sigterm_at: Option<&'static str>,
    /// More environment for the agent (`NOTIFY_SOCKET`, ...).
    pub env: Vec<(String, String)>,
}

pub struct Agent {
    child: Option<Child>,
    /// With `sigterm_at`: whether the log already said "ready" when the
    /// signal was sent (then it did not land during start-up).
    pub ready_before_sigterm: Option<bool>,
    pub state_dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub port: u16,
    log: Arc<Mutex<String>>,
}

impl Agent {
    pub fn start(opts: AgentOptions) -> Agent {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let config_path = state_dir.path().join("tollgate.toml");
        let mut toml = format!(
            "state_dir = {:?}\n[log]\nlevel = \"info,tollgate=debug\"\nformat = \"json\"\n[intercept]\ncgroup = {:?}\n[proxy]\nlisten = {:?}\ndrain_secs = 5\n",
            state_dir.path().join("state"),
            opts.cgroup,
            opts.listen.as_deref().unwrap_or("127.0.0.1:0")
        );
        let (proxy_keys, extra): (Vec<&str>, Vec<&str>) = opts
            .extra_toml
            .lines()
            .partition(|l| l.trim_start().starts_with("proxy."));
        for l in proxy_keys {
            toml += l.trim_start().trim_start_matches("proxy.");
            toml.push('\n');
        }
        if let Some(ca) = &opts.extra_ca {
            toml += &format!("[upstream]\nextra_ca = {ca:?}\n");
        }
        toml += &format!(
            "[control]\nsocket = {:?}\n",
            state_dir.path().join("control.sock")
        );
        toml += "[resolver]\nrefresh_secs = 3600\n[resolver.overrides]\n";
        for (h, addrs) in &opts.overrides {
            toml += &format!("{h:?} = {addrs:?}\n");
        }
        // The rest of the built-in catalogue: nowhere.
        let overridden: Vec<&str> = opts.overrides.iter().map(|(h, _)| h.as_str()).collect();
        toml += &crate::catalogue_elsewhere(&overridden, &crate::provider_ip(249).to_string());
        toml += &extra.join("\n");
        toml.push('\n');
        std::fs::write(&config_path, toml).expect("write config");
        let mut cmd = if opts.join_cgroup {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("echo $$ > \"$0\" && exec \"$@\"")
                .arg(opts.cgroup.join("cgroup.procs"))
                .arg(crate::tollgate_bin());
            c
        } else {
            Command::new(crate::tollgate_bin())
        };
        // Every agent starts with SIGTERM and SIGINT blocked, as under a
        // supervisor that waits for signals itself: the agent must unblock
        // them, or the SIGTERM tests see a SIGKILL after 30 s.
        // It is killed when the test's thread ends, so that a harness
        // killed mid-test (a CI timeout) leaves no agent behind (`Drop`
        // does not run then); the cgroup is swept by the next run
        // (`TestCgroup::create`). The `sh` of `join_cgroup` keeps the
        // setting across its exec.
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only pthread_sigmask, prctl, getppid and _exit
        // (async-signal-safe) run after fork.
        unsafe {
            cmd.pre_exec(move || {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTERM);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the setting took: no signal will come.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .arg("--config")
            .arg(&config_path)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (build it with `cargo build -p tollgate`): {e}",
                    crate::tollgate_bin().display()
                )
            });
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let (caught_up_tx, caught_up) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // The harness's own mark (see `caught_up`): not the agent's.
                // A line longer than a pipe's atomic write may have been
                // cut by the stop, the mark then ends its first part.
                let line = match line.strip_suffix(CAUGHT_UP) {
                    Some(rest) => {
                        let _ = caught_up_tx.send(());
                        if rest.is_empty() {
                            continue;
                        }
                        rest.to_owned()
                    }
                    None => line,
                };
                // Into the log first: a test that starts once the ready
                // line is seen may read the log straight away.
                {
                    let mut l = log2.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v.get("message").and_then(Value::as_str) == Some("ready")
                {
                    let _ = tx.send(v);
                }
            }
        });
        let mut agent = Agent {
            child: Some(child),
            ready_before_sigterm: None,
            state_dir,
            config_path,
            port: 0,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut sigterm_at = opts.sigterm_at;
        loop {
            if let Some(message) = sigterm_at
                && agent.log().contains(&format!("\"message\":\"{message}\""))
            {
                sigterm_at = None;
                let pid = agent.pid().expect("running") as i32;
                // SAFETY: signals to our own child, by pid.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                // The log then holds all it wrote before the stop.
                caught_up_after_stop(pid, &caught_up);
                agent.ready_before_sigterm = Some(agent.log().contains("\"message\":\"ready\""));
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                    libc::kill(pid, libc::SIGCONT);
                }
            }
            let wait = Duration::from_millis(if sigterm_at.is_some() { 5 } else { 100 });
            let exited = agent.child.as_mut().unwrap().try_wait().expect("try_wait");
            // After an exit, the reader may still hold the ready line.
            let wait = if exited.is_some() {
                Duration::from_secs(2)
            } else {
                wait
            };
            if let Ok(v) = rx.recv_timeout(wait) {
                let listen = v
                    .get("listen")
                    .and_then(Value::as_str)
                    .expect("listen in ready line");
                agent.port = listen.rsplit(':').next().unwrap().parse().expect("port");
                return agent;
            }
            if let Some(status) = exited {
                panic!(
                    "agent exited before ready ({status}); log:\n{}",
                    agent.log()
                );
            }
            if Instant::now() > deadline {
                panic!("agent not ready after 60 s; log:\n{}", agent.log());
            }
        }
    }

    /// The agent's control socket (for `tollgate top`).
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir.path().join("control.sock")
    }

    /// Every byte the ledger holds on disk: the database file and its
    /// write-ahead log, where a running agent's recent rows are until a
    /// checkpoint (a scan of the database file alone would miss them).
    pub fn ledger_raw(&self) -> Vec<u8> {
        let dir = self.state_dir.path().join("state");
        let mut raw = std::fs::read(dir.join("ledger.sqlite")).expect("ledger file");
        match std::fs::read(dir.join("ledger.sqlite-wal")) {
            Ok(wal) => raw.extend_from_slice(&wal),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("ledger WAL: {e}"),
        }
        raw
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to 20 s for `text` to appear in the log; false if it did not.
    pub fn wait_for_log(&self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(text) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Runs another `tollgate` command against this agent's config.
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(crate::tollgate_bin())
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .expect("run tollgate")
    }

    /// `tollgate trust env --format dotenv`, parsed.
    pub fn trust_env(&self) -> Vec<(String, String)> {
        let out = self.command(&["trust", "env", "--format", "dotenv"]);
        assert!(
            out.status.success(),
            "trust env failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf8")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.trim_matches('"').trim_matches('\'').to_string(),
                )
            })
            .collect()
    }

    /// `tollgate report --json`.
    pub fn report_json(&self) -> Vec<Value> {
        let out = self.command(&["report", "--json"]);
        assert!(
            out.status.success(),
            "report failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap_or_else(|e| {
                panic!(
                    "report --json is not JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            })
            .as_array()
            .cloned()
            .expect("an array")
    }

    /// Waits (bounded) until the ledger holds at least `n` records (the
    /// writer batches in the background), then until no further record has
    /// come for [`SETTLE`], and returns them all: a caller that asserts an
    /// exact count then also sees a record counted twice, or one written
    /// late by the end of a connection.
    pub fn wait_for_records(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut r = loop {
            let r = self.report_json();
            if r.len() >= n || Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        while Instant::now() < deadline {
            std::thread::sleep(SETTLE);
            let again = self.report_json();
            if again.len() == r.len() {
                break;
            }
            r = again;
        }
        r
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (bounded: see `wait_exit`).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if let Some(c) = &self.child {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        self.wait_exit()
    }

    /// Waits for the agent to exit on its own (bounded: SIGKILL after 90 s,
    /// past what a stop may take: the 5 s drain these agents have, 30 s for
    /// records still being counted, the ledger's flush).
    pub fn wait_exit(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A line the harness writes into the agent's log pipe; the log reader
/// takes it as a mark, not as the agent's.
const CAUGHT_UP: &str = "tollgate-e2e: the log reader has caught up";

/// Once the agent `pid` (sent SIGSTOP) has stopped, returns when the log
/// reader has taken every line it wrote: the pipe is first in, first out,
/// so a mark written into it after the agent's lines reaches the reader
/// after them. (If the agent exited instead, the caller sees that next.)
fn caught_up_after_stop(pid: i32, caught_up: &mpsc::Receiver<()>) {
    // Stopped, not merely signalled: WNOWAIT leaves the state (or an exit)
    // for `Child` to collect.
    // SAFETY: a zeroed siginfo_t for waitid to fill; our own child, by pid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WSTOPPED | libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "waitid: {e}");
    }
    if info.si_code != libc::CLD_STOPPED {
        return;
    }
    // The write end of the agent's stderr pipe, opened anew.
    let mut pipe = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/fd/2"))
        .expect("the agent's log pipe");
    std::io::Write::write_all(&mut pipe, format!("{CAUGHT_UP}\n").as_bytes())
        .expect("write the mark");
    caught_up
        .recv_timeout(Duration::from_secs(60))
        .expect("the log reader took the mark");
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.terminate();
    }
}
