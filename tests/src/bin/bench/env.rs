//! The world every row runs in, made once per bench run:
//! - a child cgroup `clients` that the agent attaches to, where every load
//!   client runs (`spawn_client`);
//! - a child cgroup `procs`, not attached, for the agent and the peers
//!   (LiteLLM, mitmproxy), so that all of them can be killed as a group;
//! - one TLS fake of api.openai.com on two loopback addresses: the provider
//!   address (in the agent's provider map: redirected) and a direct address
//!   (not in it: the baseline, same fake, same runtime);
//! - the agent, (re)started by the rows that need it.
//!
//! Fields drop in order: agent, peers, fake, then the cgroups (which kill
//! whatever is left in them).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tollgate_e2e::{FakeProvider, TestCgroup, TestPki};

use crate::agent::{AgentSpec, BenchAgent};
use crate::load::Target;
use crate::peers::{PeerCtx, PeerKind, Peers};

/// The provider host the bench talks to.
pub const HOST: &str = "api.openai.com";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct Env {
    pub quick: bool,
    /// Peers are not started (`--no-peers`).
    pub no_peers: bool,
    /// Row 1 writes its raw samples here (`--latency-samples`).
    pub latency_samples: Option<PathBuf>,
    pub agent: Option<BenchAgent>,
    pub peers: Peers,
    /// Held for its `Drop`; rows may read what it reported.
    #[allow(dead_code)]
    pub fake: FakeProvider,
    pub pki: TestPki,
    /// Where the fake listens as "the provider": redirected for clients.
    pub provider: SocketAddr,
    /// The same fake on an address that is not a provider address.
    pub direct: SocketAddr,
    pub clients: TestCgroup,
    pub procs: TestCgroup,
    pub work: tempfile::TempDir,
    notes: Vec<String>,
    seq: u32,
}

impl Env {
    /// `upstream_h1`: the fake offers only HTTP/1.1 (a diagnostic).
    pub fn new(quick: bool, upstream_h1: bool) -> Result<Env> {
        let clients = TestCgroup::create("bench-clients");
        crate::cleanup::register_cgroup(clients.path().to_path_buf());
        let procs = TestCgroup::create("bench-procs");
        crate::cleanup::register_cgroup(procs.path().to_path_buf());
        let pki = TestPki::new();
        let provider = SocketAddr::new(IpAddr::V4(tollgate_e2e::provider_ip(1)), 443);
        let direct = SocketAddr::new(IpAddr::V4(tollgate_e2e::provider_ip(2)), 443);
        let alpn: &[&[u8]] = if upstream_h1 {
            &[b"http/1.1"]
        } else {
            &[b"h2", b"http/1.1"]
        };
        let fake = FakeProvider::start_alpn(provider, &pki, &[HOST], alpn);
        let direct = fake.listen_also(direct);
        let work = tempfile::Builder::new()
            .prefix("tollgate-bench-")
            .tempdir()?;
        Ok(Env {
            quick,
            no_peers: false,
            latency_samples: None,
            agent: None,
            peers: Peers::default(),
            fake,
            pki,
            provider,
            direct,
            clients,
            procs,
            work,
            notes: Vec::new(),
            seq: 0,
        })
    }

    /// A path in the scratch directory, unique per call.
    pub fn scratch(&mut self, name: &str) -> PathBuf {
        self.seq += 1;
        self.work.path().join(format!("{:03}-{name}", self.seq))
    }

    /// A note for the report (what was measured how, what was skipped).
    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        if !self.notes.contains(&s) {
            self.notes.push(s);
        }
    }

    pub fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    /// Starts a fresh agent (stopping a running one), with `extra_toml`.
    pub fn start_agent_with(&mut self, extra_toml: &str) -> Result<&mut BenchAgent> {
        self.stop_agent();
        let log_path = self.scratch("agent.log");
        let state_dir = self.work.path().join("agent");
        let a = BenchAgent::start(AgentSpec {
            state_dir: &state_dir,
            attach: &self.clients,
            run_in: &self.procs,
            provider: self.provider,
            upstream_ca: &self.pki.ca_path(),
            log_path,
            extra_toml,
        })?;
        Ok(self.agent.insert(a))
    }

    pub fn start_agent(&mut self) -> Result<&mut BenchAgent> {
        self.start_agent_with("")
    }

    /// The running agent, started if there is none.
    pub fn ensure_agent(&mut self) -> Result<&mut BenchAgent> {
        if !self.agent.as_mut().is_some_and(|a| a.alive()) {
            return self.start_agent();
        }
        Ok(self.agent.as_mut().expect("agent"))
    }

    pub fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop();
        }
    }

    /// The fake, reached directly (the baseline).
    pub fn direct_target(&self, path: &str) -> Target {
        Target {
            name: "direct".into(),
            addr: self.direct,
            sni: HOST.into(),
            ca: Some(self.pki.ca_path()),
            path: path.into(),
        }
    }

    /// The fake at its provider address, which the agent intercepts. The
    /// client trusts only the agent's CA, so a request that succeeds went
    /// through tollgate.
    pub fn tollgate_target(&self, path: &str) -> Result<Target> {
        let a = self.agent.as_ref().context("the agent is not running")?;
        Ok(Target {
            name: "tollgate".into(),
            addr: self.provider,
            sni: HOST.into(),
            ca: Some(a.ca_cert()),
            path: path.into(),
        })
    }

    /// A peer gateway's target, starting the peer on first use.
    pub fn peer(&mut self, kind: PeerKind) -> Result<Target> {
        if self.no_peers {
            bail!("not started (--no-peers)");
        }
        let dir = self.work.path().join(kind.name());
        self.peers.target(
            kind,
            PeerCtx {
                pki: &self.pki,
                provider: self.provider,
                cgroup: &self.procs,
                dir,
            },
        )
    }

    /// Stops the peers started so far (`peer` starts them again if asked).
    pub fn stop_peers(&mut self) {
        self.peers.stop_all();
    }

    /// Runs `tollgate-bench client ROW` in the clients cgroup with `spec`.
    pub fn spawn_client(&mut self, row: &str, spec: &Value) -> Result<ClientProc> {
        let spec_path = self.scratch(&format!("{row}-spec.json"));
        std::fs::write(&spec_path, serde_json::to_vec(spec)?)?;
        let stderr_path = spec_path.with_extension("stderr");
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.arg("client")
            .arg(row)
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path)?);
        let mut child = spawn_in(&mut cmd, &self.clients)?;
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Ok(ClientProc {
            child: Some(child),
            rx,
            stderr_path,
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_agent();
        self.peers.stop_all();
    }
}

/// Spawns `cmd` as a member of `cg`: the child writes "0" (itself) to
/// `cgroup.procs` between fork and exec, so it never runs outside it.
pub fn spawn_in(cmd: &mut Command, cg: &TestCgroup) -> Result<Child> {
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.procs_file())
        .with_context(|| format!("open {}", cg.procs_file().display()))?;
    let fd = procs.as_raw_fd();
    // Each child is also killed when the bench dies by SIGKILL, which its
    // signal watcher (`cleanup`) cannot catch; its cgroup is then swept by
    // the next run (`TestCgroup::create`). Every call is on the main thread.
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (write, prctl, getppid, _exit)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
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
    let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    drop(procs);
    Ok(child)
}

/// A running client: JSON lines from its stdout, stderr in a file.
pub struct ClientProc {
    child: Option<Child>,
    rx: mpsc::Receiver<Value>,
    stderr_path: PathBuf,
}

impl ClientProc {
    /// Whether the client process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    fn stderr(&self) -> String {
        let s = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        s.chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect()
    }

    /// The next line the client prints, waiting at most `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<Value> {
        match self.rx.recv_timeout(timeout) {
            Ok(v) => Ok(v),
            Err(_) => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                bail!(
                    "no output from the client in {timeout:?} (exit: {status:?}); stderr:\n{}",
                    self.stderr()
                )
            }
        }
    }

    /// Waits (at most `timeout`) for the client to exit successfully and
    /// returns its last line.
    pub fn finish(mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("child");
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "client did not finish in {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            bail!("client failed ({status}); stderr:\n{}", self.stderr());
        }
        let mut last = None;
        // The reader thread may still be handing over the last lines.
        while let Ok(v) = self.rx.recv_timeout(Duration::from_millis(500)) {
            last = Some(v);
        }
        last.context("the client printed no result")
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
