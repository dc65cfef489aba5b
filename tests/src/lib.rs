//! The end-to-end harness shared by every test in `tests/tests/` and by
//! `cargo xtask demo`: a child cgroup, a test PKI, a TLS fake provider, the
//! real agent binary, and a way to run real clients inside the cgroup with
//! their own /etc/hosts.
//!
//! Must never: touch the machine's own traffic, its /etc/hosts or its trust
//! store; leave a process or a cgroup behind (everything is stopped and
//! removed on drop, also when a test panics).

pub mod agent;
pub mod cgroup;
pub mod client;
pub mod fake_provider;
pub mod otlp_receiver;
pub mod pki;
pub mod world;

pub use agent::{Agent, AgentOptions};
pub use cgroup::TestCgroup;
pub use client::Client;
pub use fake_provider::{FakeProvider, Reported};
pub use pki::TestPki;
pub use world::World;

/// The ledger row (from `report --json`) whose `key` is `value`; panics,
/// listing the rows, when there is none.
pub fn row_with<'a>(
    rows: &'a [serde_json::Value],
    key: &str,
    value: &str,
) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r[key] == value)
        .unwrap_or_else(|| panic!("no row with {key} = {value}: {rows:#?}"))
}

/// Why a kernel test cannot run here, or `None` when it can.
pub fn kernel_test_unavailable() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root".into());
    }
    if cgroup::cgroup2_root().is_none() {
        return Some("needs a cgroup v2 hierarchy".into());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("needs kernel BTF".into());
    }
    None
}

/// `[resolver.overrides]` lines sending every built-in catalogue host but
/// `except` to `addr`, a loopback address where nothing listens: an agent
/// given them looks none up in the host's DNS (no query leaves the
/// machine, and a lost reply does not hold its start for the lookup
/// timeout).
pub fn catalogue_elsewhere(except: &[&str], addr: &str) -> String {
    tollgate::providers::catalogue::builtin_hosts()
        .into_iter()
        .filter(|h| !except.contains(&h.as_str()))
        .map(|h| format!("{h:?} = [{addr:?}]\n"))
        .collect()
}

/// A loopback address unique to this process and `n`, used as a provider
/// address (inside 127.77.0.0-127.140.255.255, loopback only).
pub fn provider_ip(n: u8) -> std::net::Ipv4Addr {
    let pid = std::process::id();
    std::net::Ipv4Addr::new(127, 77 + (pid % 64) as u8, n, ((pid / 64) % 250) as u8 + 2)
}

/// The agent binary: `TOLLGATE_BIN`, else target/debug/tollgate.
pub fn tollgate_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_BIN") {
        return p.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join("target/debug/tollgate")
}

/// The Python interpreter with the SDKs installed (`TOLLGATE_PYTHON`, set by
/// `cargo xtask`), else the venv `cargo xtask setup` makes.
pub fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_PYTHON") {
        return p.into();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-venv/bin/python")
}

/// Node modules with the SDKs (`TOLLGATE_NODE_MODULES`, else the folder
/// `cargo xtask setup` fills).
pub fn node_modules() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_NODE_MODULES") {
        return p.into();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-node/node_modules")
}
