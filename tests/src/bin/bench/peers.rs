//! The gateways teams would run instead of tollgate, started from the
//! virtualenvs `cargo xtask bench` installs under target/bench-venv:
//! - LiteLLM's proxy (one worker), TLS in front with a test-CA leaf for
//!   api.openai.com, forwarding to the fake as an OpenAI-compatible
//!   backend over TLS verified against the test CA;
//! - mitmproxy (mitmdump) in reverse mode, TLS in front with its own CA,
//!   verifying the fake against the test CA.
//!
//! Each runs in the bench's `procs` cgroup (not intercepted) in a private
//! mount namespace whose /etc/hosts maps api.openai.com to the fake's
//! provider address (the machine's own file is untouched). Started on first
//! use, stopped by pid (and with their cgroup) at the end.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tollgate_e2e::{TestCgroup, TestPki};

use crate::env::HOST;
use crate::load::Target;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    Litellm,
    Mitmproxy,
}

impl PeerKind {
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Litellm => "litellm",
            PeerKind::Mitmproxy => "mitmproxy",
        }
    }
}

/// The virtualenvs `cargo xtask bench` makes (`TOLLGATE_BENCH_VENV`).
pub fn venv_root() -> PathBuf {
    std::env::var_os("TOLLGATE_BENCH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::env::repo_root().join("target/bench-venv"))
}

/// What a peer needs from the bench's world.
pub struct PeerCtx<'a> {
    pub pki: &'a TestPki,
    pub provider: SocketAddr,
    pub cgroup: &'a TestCgroup,
    pub dir: PathBuf,
}

struct Peer {
    kind: PeerKind,
    child: Child,
    target: Target,
}

#[derive(Default)]
pub struct Peers {
    running: Vec<Peer>,
    failed: Vec<(PeerKind, String)>,
}

impl Peers {
    /// The peer's target, starting it on first use. A peer that could not
    /// start is not tried again; the error says why.
    pub fn target(&mut self, kind: PeerKind, ctx: PeerCtx<'_>) -> Result<Target> {
        if let Some(p) = self.running.iter_mut().find(|p| p.kind == kind) {
            if p.child.try_wait().ok().flatten().is_none() {
                return Ok(p.target.clone());
            }
            bail!("{} exited during the run", kind.name());
        }
        if let Some((_, why)) = self.failed.iter().find(|(k, _)| *k == kind) {
            bail!("{why}");
        }
        match start(kind, &ctx) {
            Ok(p) => {
                let t = p.target.clone();
                self.running.push(p);
                Ok(t)
            }
            Err(e) => {
                let why = format!("{e:#}");
                self.failed.push((kind, why.clone()));
                bail!("{why}")
            }
        }
    }

    pub fn stop_all(&mut self) {
        for mut p in self.running.drain(..) {
            unsafe {
                libc::kill(p.child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// `argv` in a private mount namespace with our /etc/hosts, in the cgroup.
fn spawn_with_hosts(
    ctx: &PeerCtx<'_>,
    argv: &[String],
    envs: &[(&str, String)],
    log: &Path,
) -> Result<Child> {
    let hosts = ctx.dir.join("hosts");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1 localhost\n::1 localhost\n{} {HOST}\n",
            ctx.provider.ip()
        ),
    )?;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--",
        "sh",
        "-c",
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
    ])
    .arg(&hosts)
    .args(argv)
    .current_dir(&ctx.dir)
    .env("HOME", &ctx.dir)
    .env_remove("http_proxy")
    .env_remove("https_proxy")
    .env_remove("HTTP_PROXY")
    .env_remove("HTTPS_PROXY")
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(log)?)
    .stderr(std::fs::File::create(log.with_extension("stderr"))?);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    crate::env::spawn_in(&mut cmd, ctx.cgroup)
}

fn start(kind: PeerKind, ctx: &PeerCtx<'_>) -> Result<Peer> {
    std::fs::create_dir_all(&ctx.dir)?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let log = ctx.dir.join("out.log");
    let (child, target, ready_secs) = match kind {
        PeerKind::Litellm => {
            let bin = venv_root().join("litellm/bin/litellm");
            if !bin.exists() {
                bail!(
                    "{} is missing (cargo xtask bench installs it)",
                    bin.display()
                );
            }
            let leaf = ctx.pki.leaf(HOST);
            let (cert, key) = (ctx.dir.join("front.crt"), ctx.dir.join("front.key"));
            std::fs::write(&cert, &leaf.cert_pem)?;
            std::fs::write(&key, &leaf.key_pem)?;
            let ca = ctx.pki.ca_path();
            let config = ctx.dir.join("litellm.yaml");
            std::fs::write(
                &config,
                format!(
                    "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n      api_base: https://{HOST}/canned/v1\n      api_key: sk-bench-not-a-key\n\
                     litellm_settings:\n  telemetry: false\n  ssl_verify: {ca:?}\n  drop_params: true\n  request_timeout: 30\n\
                     general_settings:\n  disable_spend_logs: true\n"
                ),
            )?;
            let argv: Vec<String> = [
                bin.display().to_string(),
                "--config".into(),
                config.display().to_string(),
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string(),
                "--num_workers".into(),
                "1".into(),
                "--ssl_keyfile_path".into(),
                key.display().to_string(),
                "--ssl_certfile_path".into(),
                cert.display().to_string(),
            ]
            .into();
            let envs = [
                ("SSL_CERT_FILE", ca.display().to_string()),
                ("REQUESTS_CA_BUNDLE", ca.display().to_string()),
                ("LITELLM_LOCAL_MODEL_COST_MAP", "True".into()),
                ("LITELLM_LOG", "ERROR".into()),
                ("LITELLM_TELEMETRY", "False".into()),
                ("LITELLM_MODE", "PRODUCTION".into()),
                ("LITELLM_MASTER_KEY", crate::load::API_KEY.into()),
                ("DISABLE_ADMIN_UI", "True".into()),
                ("NO_DOCS", "True".into()),
            ];
            let child = spawn_with_hosts(ctx, &argv, &envs, &log)?;
            let target = Target {
                name: "litellm".into(),
                addr,
                sni: HOST.into(),
                ca: Some(ca),
                path: "/v1/chat/completions".into(),
            };
            (child, target, 180)
        }
        PeerKind::Mitmproxy => {
            let bin = venv_root().join("mitmproxy/bin/mitmdump");
            if !bin.exists() {
                bail!(
                    "{} is missing (cargo xtask bench installs it)",
                    bin.display()
                );
            }
            let confdir = ctx.dir.join("conf");
            std::fs::create_dir_all(&confdir)?;
            let argv: Vec<String> = [
                bin.display().to_string(),
                "--mode".into(),
                format!("reverse:https://{HOST}:443"),
                "--listen-host".into(),
                "127.0.0.1".into(),
                "--listen-port".into(),
                port.to_string(),
                "--set".into(),
                format!("confdir={}", confdir.display()),
                "--set".into(),
                format!(
                    "ssl_verify_upstream_trusted_ca={}",
                    ctx.pki.ca_path().display()
                ),
                "--set".into(),
                "flow_detail=0".into(),
                "--set".into(),
                "termlog_verbosity=warn".into(),
                "-q".into(),
            ]
            .into();
            let child = spawn_with_hosts(ctx, &argv, &[], &log)?;
            let target = Target {
                name: "mitmproxy".into(),
                addr,
                sni: HOST.into(),
                ca: Some(confdir.join("mitmproxy-ca-cert.pem")),
                path: "/canned/v1/chat/completions".into(),
            };
            (child, target, 60)
        }
    };
    let mut peer = Peer {
        kind,
        child,
        target,
    };
    let deadline = Instant::now() + Duration::from_secs(ready_secs);
    let mut last = String::from("not started");
    while Instant::now() < deadline {
        if let Some(st) = peer.child.try_wait()? {
            bail!(
                "{} exited at start ({st}):\n{}\n{}",
                kind.name(),
                tail(&log),
                tail(&log.with_extension("stderr"))
            );
        }
        if peer.target.ca.as_ref().is_none_or(|c| c.exists()) {
            match crate::load::probe(&peer.target, Instant::now() + Duration::from_secs(1)) {
                Ok(()) => return Ok(peer),
                Err(e) => last = format!("{e:#}"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = peer.child.kill();
    let _ = peer.child.wait();
    bail!(
        "{} did not answer within {ready_secs} s ({last}):\n{}",
        kind.name(),
        tail(&log.with_extension("stderr"))
    )
}

impl std::fmt::Display for PeerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the peers' versions come from, for the report.
pub fn versions() -> String {
    let root = venv_root();
    let v = |venv: &str, pkg: &str| -> String {
        let out = Command::new(root.join(venv).join("bin/python"))
            .args([
                "-c",
                &format!("import importlib.metadata as m; print(m.version({pkg:?}))"),
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            _ => "not installed".into(),
        }
    };
    format!(
        "litellm {}, mitmproxy {}, tiktoken {}",
        v("litellm", "litellm"),
        v("mitmproxy", "mitmproxy"),
        v("litellm", "tiktoken")
    )
}
