//! The agent as the bench runs it: the real binary (`TOLLGATE_BIN`), with
//! the production log level (`info`: nothing per request) instead of the
//! test harness's `tollgate=debug`, its log in a file, in the bench's
//! process cgroup, attached to the client cgroup. Stopped by pid.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tollgate_e2e::TestCgroup;

pub struct BenchAgent {
    child: Option<Child>,
    pub pid: u32,
    pub port: u16,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    pub started: Instant,
    /// From spawn to the "ready" log line.
    pub ready_after: Duration,
}

/// What the agent is started with.
pub struct AgentSpec<'a> {
    /// State directory, kept across restarts (the CA is made once).
    pub state_dir: &'a Path,
    /// The cgroup to attach to (the clients' cgroup).
    pub attach: &'a TestCgroup,
    /// The cgroup the agent process itself runs in.
    pub run_in: &'a TestCgroup,
    pub provider: SocketAddr,
    pub upstream_ca: &'a Path,
    pub log_path: PathBuf,
    /// More TOML for rows that need other settings (budgets, caching, ...).
    pub extra_toml: &'a str,
}

impl BenchAgent {
    pub fn start(spec: AgentSpec<'_>) -> Result<BenchAgent> {
        std::fs::create_dir_all(spec.state_dir)?;
        let config = spec.state_dir.join("bench.toml");
        // The rest of the catalogue nowhere: no lookup in the host's DNS
        // (whose lost replies cost this host's agent 3 s of its start).
        let others = tollgate_e2e::catalogue_elsewhere(&["api.openai.com"], "127.0.0.9");
        let toml = format!(
            "state_dir = {state:?}\n\
             [log]\nlevel = \"info\"\nformat = \"json\"\n\
             [intercept]\ncgroup = {cg:?}\n\
             [proxy]\nlisten = \"127.0.0.1:0\"\ndrain_secs = 2\n\
             [upstream]\nextra_ca = {ca:?}\n\
             [resolver]\nrefresh_secs = 3600\n\
             [resolver.overrides]\n\"api.openai.com\" = [\"{ip}\"]\n{others}{extra}",
            state = spec.state_dir.join("state"),
            cg = spec.attach.path(),
            ca = spec.upstream_ca,
            ip = spec.provider,
            extra = spec.extra_toml,
        );
        std::fs::write(&config, toml)?;
        let bin = tollgate_e2e::tollgate_bin();
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = crate::env::spawn_in(&mut cmd, spec.run_in).with_context(|| {
            format!(
                "cannot start {} (cargo build --release -p tollgate)",
                bin.display()
            )
        })?;
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr");
        let mut log = std::fs::File::create(&spec.log_path)?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v.pointer("/fields/message")
                        .or_else(|| v.get("message"))
                        .and_then(Value::as_str)
                        == Some("ready")
                {
                    let _ = tx.send(v);
                }
                let _ = writeln!(log, "{line}");
            }
        });
        let spawned = Instant::now();
        let mut agent = BenchAgent {
            child: Some(child),
            pid,
            port: 0,
            state_dir: spec.state_dir.join("state"),
            log_path: spec.log_path,
            started: spawned,
            ready_after: Duration::ZERO,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(v) = rx.recv_timeout(Duration::from_millis(50)) {
                let listen = v
                    .pointer("/fields/listen")
                    .or_else(|| v.get("listen"))
                    .and_then(Value::as_str)
                    .context("no listen address in the ready line")?;
                agent.port = listen.rsplit(':').next().unwrap_or("0").parse()?;
                agent.started = Instant::now();
                agent.ready_after = spawned.elapsed();
                return Ok(agent);
            }
            if let Some(st) = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "agent exited before ready ({st}); log: {}",
                    agent.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("agent not ready after 60 s; log: {}", agent.log_tail());
            }
        }
    }

    /// The local CA the agent mints leaves with (what clients must trust).
    pub fn ca_cert(&self) -> PathBuf {
        self.state_dir.join("ca/ca.crt")
    }

    fn status_kib(&self, key: &str) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Resident memory now (VmRSS), KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    /// Peak resident memory since start (VmHWM), KiB.
    pub fn hwm_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, wait (bounded), SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.stop();
    }
}
