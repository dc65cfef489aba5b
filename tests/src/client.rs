//! Runs a real client inside the test cgroup with its own /etc/hosts
//! (`unshare --mount` plus a bind mount; the machine's file is untouched)
//! and a clean environment.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cgroup::TestCgroup;

const WRAPPER: &str = r#"#!/bin/sh
# wrap.sh PROCS_FILE HOSTS_FILE CMD ARGS...: join the cgroup, then run CMD
# in a private mount namespace whose /etc/hosts is HOSTS_FILE.
set -e
echo $$ > "$1"
hosts="$2"
shift 2
exec unshare --mount -- sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$hosts" "$@"
"#;

pub struct Client {
    dir: tempfile::TempDir,
    procs: PathBuf,
    env: Vec<(String, String)>,
}

impl Client {
    pub fn new(
        cgroup: &TestCgroup,
        hosts: &[(&str, IpAddr)],
        env: Vec<(String, String)>,
    ) -> Client {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for (name, ip) in hosts {
            h += &format!("{ip} {name}\n");
        }
        std::fs::write(dir.path().join("hosts"), h).expect("hosts");
        let wrapper = dir.path().join("wrap.sh");
        std::fs::write(&wrapper, WRAPPER).expect("wrapper");
        Client {
            dir,
            procs: cgroup.procs_file(),
            env,
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Runs `argv` in the cgroup; kills it after `timeout`.
    pub fn run_with_timeout(&self, argv: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg(self.dir.path().join("wrap.sh"))
            .arg(&self.procs)
            .arg(self.dir.path().join("hosts"))
            .args(argv)
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .env("HOME", self.dir.path())
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn client");
        // Read both pipes while the client runs: a client that writes more
        // than a pipe holds would otherwise block forever.
        let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = drain(child.stdout.take().map(|r| Box::new(r) as _));
        let stderr = drain(child.stderr.take().map(|r| Box::new(r) as _));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let err = stderr.join().unwrap_or_default();
                panic!(
                    "client {argv:?} did not finish in {timeout:?}; stderr:\n{}",
                    String::from_utf8_lossy(&err)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        }
    }

    pub fn run(&self, argv: &[&str]) -> Output {
        self.run_with_timeout(argv, Duration::from_secs(120))
    }

    /// Runs a Python script with the SDK venv's interpreter.
    pub fn python(&self, script: &str) -> Output {
        let path = self.dir.path().join("client.py");
        std::fs::write(&path, script).expect("script");
        let py = crate::python();
        assert!(
            py.exists(),
            "{} is missing: run `cargo xtask setup` (it creates the SDK virtualenv)",
            py.display()
        );
        self.run(&[py.to_str().unwrap(), path.to_str().unwrap()])
    }
}

impl Client {
    /// Runs a CommonJS script with the machine's Node and the SDKs that
    /// `cargo xtask setup` installs under target/e2e-node.
    pub fn node(&self, script: &str) -> Output {
        let path = self.dir.path().join("client.cjs");
        std::fs::write(&path, script).expect("script");
        let modules = crate::node_modules();
        assert!(
            modules.join("openai").exists(),
            "{} lacks the SDKs: run `cargo xtask setup`",
            modules.display()
        );
        let node_path = format!("NODE_PATH={}", modules.display());
        self.run(&["env", &node_path, "node", path.to_str().unwrap()])
    }
}

/// Asserts success and returns stdout, showing stderr on failure.
/// A Python script that makes one chat completion with the `openai` SDK
/// (`gpt-4o-mini`, 3 tokens at most), for tests about what follows it.
pub const ONE_CHAT: &str = r#"
import openai
o = openai.OpenAI(api_key="sk-test", max_retries=0)
o.chat.completions.create(model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "x"}])
"#;

pub fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
