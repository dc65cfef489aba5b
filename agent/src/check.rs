//! `tollgate check`: whether `tollgate run` would start on this host, and
//! whether what it needs around it is in place (trust, provider DNS, the
//! collector). One line per check; the exit code says whether any failed.
//!
//! Owns: the preflight checks and their wording. Must never: change the
//! host. No CA, ledger, directory or trust store is created or written;
//! the eBPF programs are loaded so that the kernel verifies them, and
//! unloaded again, never attached; the CA key is never read, and no
//! secret (OTLP headers, credentials in an endpoint) is printed.

use std::fmt;
use std::net::{TcpListener, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use crate::config::Config;
use crate::providers::catalogue::provider_hosts;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    /// Works, but something is off that the user should know.
    Warn,
    /// Not run (needs root, or what it checks is not configured).
    Skip,
    /// `tollgate run` would fail, or jobs would.
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that a width in the format string applies.
        f.pad(match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Skip => "skip",
            Level::Fail => "FAIL",
        })
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub level: Level,
    pub name: &'static str,
    pub detail: String,
}

fn outcome(level: Level, name: &'static str, detail: impl Into<String>) -> Outcome {
    Outcome {
        level,
        name,
        detail: detail.into(),
    }
}

/// What the checks look at besides the config: the host's root ("/", or a
/// test's directory for the trust store) and whether to ask the kernel.
pub struct Host<'a> {
    pub config_path: Option<&'a Path>,
    pub trust_root: &'a Path,
    pub is_root: bool,
    pub dns_timeout: Duration,
}

/// Runs every check, in the order `tollgate run` needs them.
pub fn run(cfg: &Config, host: &Host<'_>) -> Vec<Outcome> {
    let mut out = Vec::new();
    let hosts: Vec<String> = provider_hosts(cfg).into_iter().map(|h| h.host).collect();
    out.push(outcome(
        Level::Ok,
        "config",
        match host.config_path {
            Some(p) => format!("{} ({} provider hosts)", p.display(), hosts.len()),
            None => format!(
                "built-in defaults, no config file ({} provider hosts)",
                hosts.len()
            ),
        },
    ));
    out.push(if host.is_root {
        outcome(Level::Ok, "root", "running as root")
    } else {
        outcome(
            Level::Fail,
            "root",
            "not root: `tollgate run` needs root; the kernel checks are skipped",
        )
    });
    out.push(cgroup(cfg));
    out.push(if host.is_root {
        match crate::intercept::verify_kernel() {
            Ok(n) => outcome(
                Level::Ok,
                "kernel",
                format!("BTF, socket diagnostics, and the verifier accepts all {n} programs"),
            ),
            Err(e) => outcome(Level::Fail, "kernel", e.to_string()),
        }
    } else {
        outcome(Level::Skip, "kernel", "needs root")
    });
    out.push(state_dir(cfg));
    let (ca, cert) = local_ca(cfg, &hosts);
    out.push(ca);
    out.push(trust(&cert, host.trust_root));
    out.push(ledger(cfg));
    out.push(upstream(cfg));
    out.push(listener(cfg));
    out.push(providers(cfg, &hosts, host.dns_timeout));
    out.push(collector(cfg));
    out.push(audit_log(cfg));
    out
}

/// Directories the systemd unit makes read-only (`ProtectSystem=full`,
/// `ProtectHome=read-only`).
const UNIT_READ_ONLY: &[&str] = &[
    "/usr",
    "/boot",
    "/efi",
    "/etc",
    "/home",
    "/root",
    "/run/user",
];

/// Why `path` (or where its symlinks lead, `resolved`) is no place for
/// what the agent writes under the systemd unit's sandbox: under a private
/// /tmp, or a directory the unit makes read-only. `instead` is where to
/// put it.
fn sandboxed(path: &Path, resolved: Option<&Path>, instead: &str) -> Vec<String> {
    let under = |d: &&&str| path.starts_with(d) || resolved.is_some_and(|r| r.starts_with(d));
    let mut warnings = Vec::new();
    if let Some(tmp) = ["/tmp", "/var/tmp"].iter().find(under) {
        warnings.push(format!(
            "under {tmp}, which the systemd unit makes private to the agent (PrivateTmp) and discards at stop; put it under {instead}"
        ));
    }
    if let Some(ro) = UNIT_READ_ONLY.iter().find(under) {
        warnings.push(format!(
            "under {ro}, which the systemd unit makes read-only; put it under {instead}"
        ));
    }
    warnings
}

/// `[export.audit_log]`: whether `run` can open the file (or create it
/// and its directory), creating nothing.
fn audit_log(cfg: &Config) -> Outcome {
    let Some(path) = cfg.export.audit_log.path.as_deref() else {
        return outcome(Level::Skip, "audit log", "not configured");
    };
    // The file, or the nearest directory that exists above it.
    // Symlinks followed, as `run` opens it (a dangling one is created).
    let target = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if target == path && !path.is_file() {
        return outcome(
            Level::Fail,
            "audit log",
            format!("{} exists and is not a regular file", path.display()),
        );
    }
    if target != path && !target.is_dir() {
        return outcome(
            Level::Fail,
            "audit log",
            format!("{} is not a directory", target.display()),
        );
    }
    if let Err(e) = writable(target) {
        return outcome(
            Level::Fail,
            "audit log",
            format!(
                "{} is not writable ({e}): `run` cannot open the audit log",
                target.display()
            ),
        );
    }
    // Where the file really is: a symlink on the way (`/var/log/tollgate`
    // pointing into /etc or /tmp) takes it where the unit's sandbox applies.
    let resolved = std::fs::canonicalize(target)
        .ok()
        .map(|t| t.join(path.strip_prefix(target).unwrap_or(Path::new(""))))
        .filter(|r| r != path);
    let shown = match &resolved {
        Some(r) => format!("{} (that is, {})", path.display(), r.display()),
        None => path.display().to_string(),
    };
    let warnings = sandboxed(path, resolved.as_deref(), "/var/log/tollgate/");
    if !warnings.is_empty() {
        return outcome(
            Level::Warn,
            "audit log",
            format!("{shown}: {}", warnings.join("; ")),
        );
    }
    outcome(Level::Ok, "audit log", format!("{shown} can be written"))
}

/// The cgroup check, whether the agent sees the host's pids and whether
/// it shares the host's network (they say whether it runs in the host's
/// namespaces).
fn cgroup(cfg: &Config) -> Outcome {
    let o = cgroup_and_pids(cfg);
    if o.level != Level::Fail && crate::intercept::in_host_network_namespace() == Some(false) {
        return outcome(
            Level::Warn,
            "cgroup",
            format!(
                "{}; this runs in a network namespace other than the host's, and only connections made in its own are intercepted, so the host's jobs would not be: run the agent with the host's network (docker run --network=host)",
                o.detail
            ),
        );
    }
    o
}

fn cgroup_and_pids(cfg: &Config) -> Outcome {
    let o = cgroup_only(cfg);
    if crate::attribution::in_initial_pid_namespace() != Some(false) || o.level == Level::Fail {
        return o;
    }
    let path = cfg
        .intercept
        .cgroup
        .clone()
        .or_else(|| crate::intercept::cgroup2_root().ok());
    // This process stands for the agent: run in the same container, it
    // shares its cgroup.
    if let Some(path) = path
        && crate::intercept::holds_process(&path, std::process::id()).unwrap_or(false)
    {
        return outcome(
            Level::Fail,
            "cgroup",
            format!(
                "{}: this runs in a pid namespace of its own, inside the cgroup it would intercept, so the agent's own connections to providers would be sent back to it and every request would fail: run it with the host's pid namespace (docker run --pid=host), or set intercept.cgroup to a cgroup that holds the jobs but not the agent",
                path.display()
            ),
        );
    }
    outcome(
        Level::Warn,
        "cgroup",
        format!(
            "{}; this runs in a pid namespace of its own, so requests would be recorded with the kernel's fields only, without their executable, job and repository: run the agent with the host's pid namespace (docker run --pid=host)",
            o.detail
        ),
    )
}

fn cgroup_only(cfg: &Config) -> Outcome {
    let path = match &cfg.intercept.cgroup {
        Some(c) => c.clone(),
        None => match crate::intercept::cgroup2_root() {
            Ok(p) => p,
            Err(e) => return outcome(Level::Fail, "cgroup", e.to_string()),
        },
    };
    match crate::intercept::check_cgroup(&path) {
        Ok(())
            if cfg.intercept.cgroup.is_none()
                && crate::intercept::is_hierarchy_root(&path).ok() == Some(false) =>
        {
            outcome(
                Level::Warn,
                "cgroup",
                format!(
                    "{}: the cgroup v2 mount shows a cgroup namespace's root, not the hierarchy's, so jobs outside this container would not be intercepted; run the agent in the host's cgroup namespace or set intercept.cgroup",
                    path.display()
                ),
            )
        }
        Ok(()) => outcome(
            Level::Ok,
            "cgroup",
            format!("jobs under {} are intercepted", path.display()),
        ),
        Err(crate::intercept::InterceptError::CgroupMissing { .. })
            if crate::intercept::cgroup_may_appear(&path) =>
        {
            outcome(
                Level::Warn,
                "cgroup",
                format!(
                    "{} does not exist yet: the agent starts without it and attaches when it is created (a service's cgroup, once the service starts)",
                    path.display()
                ),
            )
        }
        Err(e) => outcome(Level::Fail, "cgroup", e.to_string()),
    }
}

fn state_dir(cfg: &Config) -> Outcome {
    state_dir_under(cfg, installed_unit())
}

/// Where the systemd unit is installed (README: Install on a runner).
const UNIT_FILES: &[&str] = &[
    "/etc/systemd/system/tollgate.service",
    "/usr/lib/systemd/system/tollgate.service",
    "/lib/systemd/system/tollgate.service",
];

/// The systemd unit's file, when it is installed.
fn installed_unit() -> Option<&'static Path> {
    UNIT_FILES.iter().map(Path::new).find(|p| p.exists())
}

/// [`state_dir`], with the systemd unit installed at `unit`, if it is.
fn state_dir_under(cfg: &Config, unit: Option<&Path>) -> Outcome {
    let dir = &cfg.state_dir;
    // Under the unit's sandbox, the agent's CA and ledger must outlive it
    // and be the ones the commands run from a shell see: a warning, unless
    // a failure below says more.
    let sandbox = unit.and_then(|unit| {
        let resolved = dir
            .ancestors()
            .find(|p| p.exists())
            .and_then(|p| std::fs::canonicalize(p).ok())
            .filter(|r| r != dir);
        let warnings = sandboxed(
            dir,
            resolved.as_deref(),
            "/var/lib (the default is /var/lib/tollgate)",
        );
        (!warnings.is_empty()).then(|| {
            format!(
                "{}: {} (the unit: {})",
                dir.display(),
                warnings.join("; "),
                unit.display()
            )
        })
    });
    let fine = |detail: String| match &sandbox {
        Some(w) => outcome(Level::Warn, "state directory", w.clone()),
        None => outcome(Level::Ok, "state directory", detail),
    };
    if !dir.exists() {
        return fine(format!("{} (created at the first start)", dir.display()));
    }
    // `run` runs as root: the directory must be root's.
    if let Err(e) = crate::app::check_state_dir(dir, 0) {
        return outcome(Level::Fail, "state directory", e.to_string());
    }
    // And writable: the CA and the ledger are written there.
    if nix::unistd::geteuid().is_root()
        && let Err(e) = writable(dir)
    {
        return outcome(
            Level::Fail,
            "state directory",
            format!(
                "{} cannot be written ({e}): a read-only filesystem or an immutable directory (lsattr)",
                dir.display()
            ),
        );
    }
    fine(dir.display().to_string())
}

/// Whether this process, by its effective ids, may write `path`.
fn writable(path: &Path) -> nix::Result<()> {
    nix::unistd::faccessat(
        nix::fcntl::AT_FDCWD,
        path,
        nix::unistd::AccessFlags::W_OK,
        nix::fcntl::AtFlags::AT_EACCESS,
    )
}

/// The CA's outcome, and what the trust check should judge: the
/// certificate, or `None` when there is none yet or the next start
/// replaces it (the trust check then says so).
fn local_ca(cfg: &Config, hosts: &[String]) -> (Outcome, CaForTrust) {
    match crate::ca::inspect(&cfg.state_dir, hosts) {
        Ok(None) => (
            outcome(
                Level::Ok,
                "local CA",
                "none yet: made at the first start (then run `tollgate trust install`)",
            ),
            CaForTrust::None,
        ),
        Ok(Some(ca)) if ca.replaced_at_start() => {
            let why = match (&ca.unusable, ca.hosts_missing.is_empty()) {
                (Some(why), _) => format!("it cannot be used: {why}"),
                (None, false) => format!("it does not cover {}", ca.hosts_missing.join(", ")),
                (None, true) => format!("it expires in {} days", ca.days_left),
            };
            (
                outcome(
                    Level::Warn,
                    "local CA",
                    format!("the next start replaces it ({why})"),
                ),
                CaForTrust::Replaced,
            )
        }
        Ok(Some(ca)) => {
            let o = if ca.starts_in_secs > 0 {
                outcome(
                    Level::Warn,
                    "local CA",
                    format!(
                        "starts in {} s, after the clock, soon after boot: clients on this host refuse its certificates until the clock passes it (is NTP setting the time?); if the clock is right, run `tollgate trust rotate`{}",
                        ca.starts_in_secs,
                        if ca.single_level {
                            " (which also replaces a CA made before intermediates)"
                        } else {
                            ""
                        }
                    ),
                )
            } else if ca.single_level {
                outcome(
                    Level::Warn,
                    "local CA",
                    "made before intermediates: a stolen key could sign for any site under Java's validator; run `tollgate trust rotate`",
                )
            } else {
                outcome(
                    Level::Ok,
                    "local CA",
                    format!("covers every provider host; {} days left", ca.days_left),
                )
            };
            let cert = ca.cert_pem.map_or(CaForTrust::None, CaForTrust::Cert);
            (o, cert)
        }
        Err(e) => (
            outcome(Level::Fail, "local CA", e.to_string()),
            CaForTrust::None,
        ),
    }
}

/// What the trust check judges.
enum CaForTrust {
    None,
    /// The next start makes a new CA.
    Replaced,
    Cert(String),
}

fn trust(ca: &CaForTrust, root: &Path) -> Outcome {
    use crate::trust::Installed;
    let cert = match ca {
        CaForTrust::None => return outcome(Level::Skip, "trust", "no usable CA yet"),
        CaForTrust::Replaced => {
            return outcome(
                Level::Warn,
                "trust",
                "the CA is replaced at the next start: run `tollgate trust install` after it",
            );
        }
        CaForTrust::Cert(c) => c,
    };
    match crate::trust::installed(cert, root) {
        Installed::Yes { bundle } => outcome(
            Level::Ok,
            "trust",
            format!("the system store trusts the CA ({})", bundle.display()),
        ),
        Installed::Stale { anchor } => outcome(
            Level::Fail,
            "trust",
            format!(
                "{} holds another CA: jobs' TLS clients will refuse the agent; run `tollgate trust install`",
                anchor.display()
            ),
        ),
        Installed::NotInBundle { anchor } => outcome(
            Level::Warn,
            "trust",
            format!(
                "{} is there but the system bundle lacks it: run `tollgate trust install` (or update-ca-certificates)",
                anchor.display()
            ),
        ),
        Installed::No => outcome(
            Level::Warn,
            "trust",
            "the system store does not trust the CA: run `tollgate trust install`, or give jobs `tollgate trust env`",
        ),
    }
}

fn ledger(cfg: &Config) -> Outcome {
    use crate::ledger::LedgerError;
    let path = crate::cli::ledger_path(&cfg.state_dir);
    if !path.exists() {
        return outcome(
            Level::Ok,
            "ledger",
            format!("{} (created at the first start)", path.display()),
        );
    }
    // The agent writes it: a read-only filesystem or an immutable file
    // stops it (as root, access(2) answers for both).
    if nix::unistd::geteuid().is_root()
        && let Err(e) = writable(&path)
    {
        return outcome(
            Level::Fail,
            "ledger",
            format!(
                "{} cannot be written ({e}): a read-only filesystem or an immutable file (lsattr)",
                path.display()
            ),
        );
    }
    match crate::ledger::Ledger::open_read_only(&path) {
        Ok(_) => outcome(Level::Ok, "ledger", path.display().to_string()),
        // Empty (no table yet): the first start sets it up. Another
        // program's database is refused as `Foreign`, below.
        Err(LedgerError::Outdated { .. }) => outcome(
            Level::Ok,
            "ledger",
            format!("{} (empty: set up at the first start)", path.display()),
        ),
        Err(e) => outcome(Level::Fail, "ledger", e.to_string()),
    }
}

/// The agent already running answers on its control socket; else the
/// listen address must be free.
fn listener(cfg: &Config) -> Outcome {
    let socket = &cfg.control.socket;
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return outcome(
            Level::Ok,
            "listener",
            format!(
                "an agent is running (it answers on {}); `tollgate top` shows it",
                socket.display()
            ),
        );
    }
    let addr = cfg.proxy.listen;
    if addr.port() == 0 {
        return outcome(Level::Ok, "listener", "a free port is picked at start");
    }
    let taken = |a: std::net::SocketAddr, e: std::io::Error| {
        outcome(
            Level::Fail,
            "listener",
            format!("cannot listen on {a}: {e} (another agent, or set [proxy] listen)"),
        )
    };
    let _v4 = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => return taken(addr, e),
    };
    // `run` listens on [::1] at the same port too, where the host has it.
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()));
    match crate::app::bind_v6_only_socket(v6) {
        Ok(_) => outcome(Level::Ok, "listener", format!("{addr} and {v6} are free")),
        Err(e) if crate::app::no_ipv6_loopback(&e) => outcome(
            Level::Ok,
            "listener",
            format!("{addr} is free (no IPv6 loopback)"),
        ),
        Err(e) => taken(v6, e),
    }
}

fn providers(cfg: &Config, hosts: &[String], timeout: Duration) -> Outcome {
    let overrides = crate::app::parse_overrides(cfg);
    let names: Vec<&String> = hosts.iter().filter(|h| !h.starts_with("*.")).collect();
    let looked_up = lookup_all(
        names
            .iter()
            .filter(|h| !overrides.contains_key(h.as_str()))
            .map(|h| format!("{h}:443"))
            .collect(),
        timeout,
    );
    let mut missing = Vec::new();
    let mut addresses = 0usize;
    for h in &names {
        match overrides.get(h.as_str()) {
            Some(a) => addresses += a.len(),
            None => match looked_up.get(&format!("{h}:443")) {
                Some(a) if !a.is_empty() => addresses += a.len(),
                _ => missing.push(h.as_str()),
            },
        }
    }
    if missing.is_empty() {
        outcome(
            Level::Ok,
            "providers",
            format!("{} hosts resolve to {addresses} addresses", names.len()),
        )
    } else {
        let shown: Vec<&str> = missing.iter().take(5).copied().collect();
        let more = missing.len().saturating_sub(shown.len());
        outcome(
            Level::Warn,
            "providers",
            format!(
                "{} of {} hosts do not resolve ({}{}): jobs' calls to them are not intercepted until they do",
                missing.len(),
                names.len(),
                shown.join(", "),
                if more > 0 {
                    format!(", and {more} more")
                } else {
                    String::new()
                }
            ),
        )
    }
}

/// The addresses of each `host:port`, looked up at once; a name whose
/// lookup failed or took longer than `timeout` is left out (its thread is
/// left to finish).
fn lookup_all(
    names: Vec<String>,
    timeout: Duration,
) -> std::collections::HashMap<String, Vec<std::net::SocketAddr>> {
    let (tx, rx) = std::sync::mpsc::channel();
    for name in names {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let addrs = name.to_socket_addrs().map(Iterator::collect::<Vec<_>>);
            let _ = tx.send((name, addrs.ok()));
        });
    }
    drop(tx);
    let deadline = std::time::Instant::now() + timeout;
    let mut out = std::collections::HashMap::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((name, Some(addrs))) => {
                out.insert(name, addrs);
            }
            Ok((_, None)) => {}
            Err(_) => break,
        }
    }
    out
}

/// `upstream.extra_ca` can be read and holds certificates (`run` stops
/// on it otherwise).
fn upstream(cfg: &Config) -> Outcome {
    match cfg.upstream.extra_ca.as_deref() {
        None => outcome(
            Level::Ok,
            "upstream",
            "the public web roots verify providers",
        ),
        Some(path) => match crate::proxy::upstream::client_config(Some(path)) {
            Ok(_) => outcome(
                Level::Ok,
                "upstream",
                format!(
                    "the public web roots and {} verify providers",
                    path.display()
                ),
            ),
            Err(e) => outcome(Level::Fail, "upstream", e.to_string()),
        },
    }
}

/// The environment file the systemd unit reads (`EnvironmentFile=`),
/// where the README puts the service's `OTEL_*` variables.
const UNIT_ENV_FILE: &str = "/etc/tollgate/env";

fn collector(cfg: &Config) -> Outcome {
    // Under the installed unit the service's variables are its
    // environment file's (this shell's, which `sudo` drops anyway, are
    // not the service's); without it, an agent run by hand has the shell's.
    let env_file = installed_unit().map(|_| Path::new(UNIT_ENV_FILE));
    collector_with(cfg, env_file, &|k: &str| std::env::var(k).ok())
}

/// [`collector`], with the service's variables in `env_file` when there
/// is one (none when it does not exist), else in `shell`.
fn collector_with(
    cfg: &Config,
    env_file: Option<&Path>,
    shell: &dyn Fn(&str) -> Option<String>,
) -> Outcome {
    let read = env_file.map(|f| (f, std::fs::read_to_string(f)));
    let (file_vars, source) = match read {
        Some((f, Ok(text))) => (Some(parse_env_file(&text)), f.display().to_string()),
        None => (
            None,
            "this shell's OTEL_* variables; a service's own environment may differ".to_string(),
        ),
        // (The unit's file is optional: without it the service has none.)
        Some((f, Err(e))) if e.kind() == std::io::ErrorKind::NotFound => (
            Some(Default::default()),
            format!("the unit's environment, without {}", f.display()),
        ),
        Some((f, Err(e))) => {
            return outcome(
                Level::Warn,
                "collector",
                format!(
                    "cannot read {}, which the service's OTEL_* variables come from: {e}",
                    f.display()
                ),
            );
        }
    };
    let lookup = |k: &str| match &file_vars {
        Some(vars) => vars.get(k).cloned(),
        None => shell(k),
    };
    let resolved = match cfg.export.resolve(&lookup) {
        Ok(Some(r)) => r,
        Ok(None) => {
            return outcome(
                Level::Skip,
                "collector",
                format!("OTLP export is off (by the config and {source})"),
            );
        }
        Err((key, why)) => {
            return outcome(
                Level::Fail,
                "collector",
                format!("{key} (from {source}): {why}"),
            );
        }
    };
    if let Err(why) = crate::export::check_tls_files(&resolved) {
        return outcome(Level::Fail, "collector", why);
    }
    let ignored = resolved.env_headers_ignored.map(|var| {
        format!(
            "; {var} (from {source}) is not sent, since export.otlp.endpoint is set in the config: set the endpoint in the environment too and remove it from the config"
        )
    });
    let shown = crate::export::endpoint_for_logs(&resolved.endpoint);
    let Some(addr) = endpoint_addr(&resolved.endpoint) else {
        return outcome(
            Level::Warn,
            "collector",
            format!(
                "cannot tell the host and port of {shown}{}",
                ignored.unwrap_or_default()
            ),
        );
    };
    let reachable = lookup_all(vec![addr.clone()], Duration::from_secs(5))
        .remove(&addr)
        .unwrap_or_default()
        .into_iter()
        .find(|a| std::net::TcpStream::connect_timeout(a, Duration::from_secs(3)).is_ok());
    // Over TLS, a handshake as the exporters make it: a collector whose
    // certificate the agent does not trust, or that refuses its client
    // certificate, takes connections and still gets no metrics.
    // The host's store as the service finds it: its environment file's
    // SSL_CERT_FILE and SSL_CERT_DIR, not this shell's.
    let store = match &file_vars {
        Some(vars) => crate::export::HostStore::Given {
            file: vars.get("SSL_CERT_FILE").map(std::path::PathBuf::from),
            dir: vars.get("SSL_CERT_DIR").map(std::path::PathBuf::from),
        },
        None => crate::export::HostStore::Process,
    };
    let tls = match reachable {
        Some(a) if crate::export::is_https(&resolved.endpoint) => Some(
            crate::export::probe_collector_tls(
                &resolved,
                &store,
                a,
                Duration::from_secs(5),
                Duration::from_millis(1500),
            )
            .map(|()| match &resolved.tls.ca_file {
                Some(f) => format!(", and its certificate is trusted by {}", f.source),
                None => ", and the host's CA store trusts its certificate".to_string(),
            }),
        ),
        _ => None,
    };
    let trusted = match tls {
        Some(Err(why)) => {
            return outcome(
                Level::Warn,
                "collector",
                format!(
                    "{shown} accepts connections, but a TLS handshake failed: {why}; metrics are not exported until it is fixed, the ledger is unaffected{}",
                    ignored.unwrap_or_default()
                ),
            );
        }
        Some(Ok(t)) => t,
        None => String::new(),
    };
    match (reachable.is_some(), ignored) {
        (true, None) => outcome(
            Level::Ok,
            "collector",
            format!("{shown} accepts connections{trusted}"),
        ),
        (true, Some(ignored)) => outcome(
            Level::Warn,
            "collector",
            format!("{shown} accepts connections{trusted}{ignored}"),
        ),
        (false, ignored) => outcome(
            Level::Warn,
            "collector",
            format!(
                "{shown} does not accept connections: metrics wait and are retried, the ledger is unaffected{}",
                ignored.unwrap_or_default()
            ),
        ),
    }
}

/// The variables of a systemd environment file, read as systemd reads
/// one (its `env-file.c`): `KEY=value` assignments, `#` and `;` comment
/// lines, values that start (or go on, after a closing quote) with single
/// quotes (literal) or double quotes (where `\\"`, `\\\\`, `` \\` `` and `\\$`
/// are unescaped), parts joined, a backslash escaping the next character
/// outside quotes,
/// a backslash at a line's end continuing it, and whitespace around keys
/// and unquoted values dropped. Assignments to names that are not valid
/// (`export K=v`) are left out, as systemd leaves them.
fn parse_env_file(text: &str) -> std::collections::HashMap<String, String> {
    #[derive(Clone, Copy, PartialEq)]
    enum St {
        PreKey,
        Key,
        PreValue,
        Value,
        ValueEscape,
        Single,
        Double,
        DoubleEscape,
        Comment,
        CommentEscape,
    }
    let mut vars = std::collections::HashMap::new();
    let (mut key, mut value) = (String::new(), String::new());
    // Bytes of `value` up to its last character that is not trailing
    // whitespace (an escaped or quoted space is kept).
    let mut kept = 0;
    let mut st = St::PreKey;
    let valid = |k: &str| {
        k.chars().next().is_some_and(|c| !c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut emit = |key: &mut String, value: &mut String, kept: &mut usize| {
        value.truncate(*kept);
        let k = key.trim_end();
        if valid(k) {
            vars.insert(k.to_string(), std::mem::take(value));
        }
        key.clear();
        value.clear();
        *kept = 0;
    };
    for c in text.chars() {
        st = match (st, c) {
            (St::PreKey, '#' | ';') => St::Comment,
            (St::PreKey, c) if c.is_whitespace() => St::PreKey,
            (St::PreKey, c) => {
                key.push(c);
                St::Key
            }
            (St::Key, '\n') => {
                key.clear();
                St::PreKey
            }
            (St::Key, '=') => St::PreValue,
            (St::Key, c) => {
                key.push(c);
                St::Key
            }
            (St::PreValue | St::Value, '\n') => {
                emit(&mut key, &mut value, &mut kept);
                St::PreKey
            }
            // Quotes open only where a value (or a part of it) starts.
            (St::PreValue, '\'') => St::Single,
            (St::PreValue, '"') => St::Double,
            (St::PreValue | St::Value, '\\') => St::ValueEscape,
            (St::PreValue, c) if c.is_whitespace() => St::PreValue,
            (St::PreValue | St::Value, c) => {
                value.push(c);
                if !c.is_whitespace() {
                    kept = value.len();
                }
                St::Value
            }
            // A backslash before a line's end continues the value.
            (St::ValueEscape, '\n') => St::Value,
            (St::ValueEscape, c) => {
                value.push(c);
                kept = value.len();
                St::Value
            }
            (St::Single, '\'') => {
                kept = value.len();
                St::PreValue
            }
            (St::Single, c) => {
                value.push(c);
                St::Single
            }
            (St::Double, '"') => {
                kept = value.len();
                St::PreValue
            }
            (St::Double, '\\') => St::DoubleEscape,
            (St::Double, c) => {
                value.push(c);
                St::Double
            }
            (St::DoubleEscape, '"' | '\\' | '`' | '$') => {
                value.push(c);
                St::Double
            }
            (St::DoubleEscape, '\n') => St::Double,
            (St::DoubleEscape, c) => {
                value.push('\\');
                value.push(c);
                St::Double
            }
            // (An escaped line end does not continue a comment: systemd
            // 254 on.)
            (St::Comment, '\\') => St::CommentEscape,
            (St::Comment | St::CommentEscape, '\n') => St::PreKey,
            (St::Comment | St::CommentEscape, _) => St::Comment,
        };
    }
    if matches!(
        st,
        St::PreValue | St::Value | St::ValueEscape | St::Single | St::Double | St::DoubleEscape
    ) {
        emit(&mut key, &mut value, &mut kept);
    }
    vars
}

/// `host:port` of an `http(s)://host[:port]/...` URL (the scheme's port
/// when none is given).
fn endpoint_addr(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    if authority.is_empty() {
        return None;
    }
    let has_port = match authority.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => authority.contains(':'),
    };
    if has_port {
        return Some(authority.to_string());
    }
    let port = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    Some(format!("{authority}:{port}"))
}

/// The outcomes as aligned lines, then a summary line.
pub fn render(outcomes: &[Outcome]) -> String {
    let width = outcomes.iter().map(|o| o.name.len()).max().unwrap_or(0);
    let mut s = String::new();
    for o in outcomes {
        s.push_str(&format!(
            "{:<4}  {:<width$}  {}\n",
            o.level, o.name, o.detail
        ));
    }
    let failed = outcomes.iter().filter(|o| o.level == Level::Fail).count();
    let warned = outcomes.iter().filter(|o| o.level == Level::Warn).count();
    s.push_str(&match (failed, warned) {
        (0, 0) => "tollgate can run here.\n".to_string(),
        (0, w) => format!("tollgate can run here ({w} warnings).\n"),
        (f, _) => format!("{f} checks failed: `tollgate run` would not work here as it is.\n"),
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_the_units_sandbox_hides_is_warned_about_where_the_unit_is() {
        let cfg = |dir: &str| Config {
            state_dir: dir.into(),
            ..Config::default()
        };
        let unit = Some(Path::new("/etc/systemd/system/tollgate.service"));
        for (dir, why) in [
            ("/tmp/tollgate", "PrivateTmp"),
            ("/etc/tollgate/state", "read-only"),
            ("/home/ci/tollgate", "read-only"),
        ] {
            let o = state_dir_under(&cfg(dir), unit);
            assert_eq!(o.level, Level::Warn, "{dir}: {o:?}");
            assert!(o.detail.contains(why), "{dir}: {o:?}");
            // Without the unit (a test, a container), no sandbox applies.
            let o = state_dir_under(&cfg(dir), None);
            assert_ne!(o.level, Level::Warn, "{dir}: {o:?}");
        }
        let o = state_dir_under(&cfg("/var/lib/tollgate-not-there"), unit);
        assert_eq!(o.level, Level::Ok, "{o:?}");
        // A failure says more than the sandbox's warning.
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            t.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let o = state_dir_under(&cfg(t.path().to_str().unwrap()), unit);
        assert_eq!(o.level, Level::Fail, "{o:?}");
    }

    /// The collector is checked with the service's variables, from the
    /// unit's environment file when there is one, and says where a bad
    /// value is and when its headers would not be sent.
    #[test]
    fn the_collector_is_checked_with_the_services_environment_file() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("env");
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let shell = |k: &str| {
            (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://from-the-shell:4318".to_string())
        };
        let check = |text: Option<&str>, cfg: &Config| {
            match text {
                Some(t) => std::fs::write(&file, t).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&file);
                }
            }
            collector_with(cfg, Some(&file), &shell)
        };
        let plain = Config::default();
        // The unit's file missing: the service has no variables.
        let o = check(None, &plain);
        assert_eq!(o.level, Level::Skip, "{o:?}");
        assert!(o.detail.contains("without"), "{o:?}");
        // No unit installed: the shell's, whatever file there is.
        std::fs::write(&file, "OTEL_EXPORTER_OTLP_PROTOCOL=thrift\n").unwrap();
        let o = collector_with(&plain, None, &shell);
        assert!(o.detail.contains("from-the-shell"), "{o:?}");
        // The file's, not the shell's.
        let o = check(
            Some(&format!(
                "# the service's\nRUNNER_NAME=r1\nOTEL_EXPORTER_OTLP_ENDPOINT=\"http://127.0.0.1:{port}\"\n"
            )),
            &plain,
        );
        assert_eq!(o.level, Level::Warn, "{o:?}");
        assert!(
            o.detail.contains(&format!("127.0.0.1:{port}/v1/metrics")),
            "{o:?}"
        );
        assert!(o.detail.contains("does not accept"), "{o:?}");
        let o = check(Some("RUNNER_NAME=r1\n"), &plain);
        assert_eq!(o.level, Level::Skip, "{o:?}");
        assert!(o.detail.contains(file.to_str().unwrap()), "{o:?}");
        // A value `run` would exit 64 on fails here, naming the file.
        let o = check(
            Some(&format!(
                "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{port}\nOTEL_EXPORTER_OTLP_PROTOCOL=thrift\n"
            )),
            &plain,
        );
        assert_eq!(o.level, Level::Fail, "{o:?}");
        assert!(o.detail.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{o:?}");
        assert!(o.detail.contains(file.to_str().unwrap()), "{o:?}");
        // Headers the file holds for an endpoint the config overrides.
        let mut named = Config::default();
        named.export.otlp.endpoint = Some(format!("http://127.0.0.1:{port}"));
        let o = check(
            Some("OTEL_EXPORTER_OTLP_HEADERS='x-api-key=SECRET-9'\n"),
            &named,
        );
        assert_eq!(o.level, Level::Warn, "{o:?}");
        assert!(o.detail.contains("OTEL_EXPORTER_OTLP_HEADERS"), "{o:?}");
        assert!(o.detail.contains("is not sent"), "{o:?}");
        assert!(!o.detail.contains("SECRET-9"), "{o:?}");
        let o = check(Some("RUNNER_NAME=r1\n"), &named);
        assert!(!o.detail.contains("is not sent"), "{o:?}");
        // A collector CA file the agent could not read fails the check,
        // naming the variable that set it; for an http:// collector it
        // is not used, nor read.
        let missing = t.path().join("no-ca.pem");
        let ca_var = format!("OTEL_EXPORTER_OTLP_CERTIFICATE={}\n", missing.display());
        let o = check(Some(&ca_var), &named);
        assert_ne!(o.level, Level::Fail, "{o:?}");
        let mut tls = Config::default();
        tls.export.otlp.endpoint = Some(format!("https://127.0.0.1:{port}"));
        let o = check(Some(&ca_var), &tls);
        assert_eq!(o.level, Level::Fail, "{o:?}");
        assert!(o.detail.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{o:?}");
        assert!(o.detail.contains("no-ca.pem"), "{o:?}");
        // An https:// collector that takes connections but speaks no TLS
        // (a plain listener that hangs up): a warning that the handshake
        // failed, after the connection was taken.
        let plain_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp_port = plain_tcp.local_addr().unwrap().port();
        let hang_up = std::thread::spawn(move || {
            if let Ok((c, _)) = plain_tcp.accept() {
                drop(c);
            }
            if let Ok((c, _)) = plain_tcp.accept() {
                drop(c);
            }
        });
        let ca = t.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let mut tls = Config::default();
        tls.export.otlp.endpoint = Some(format!("https://127.0.0.1:{tcp_port}"));
        let o = check(
            Some(&format!(
                "OTEL_EXPORTER_OTLP_CERTIFICATE={}\n",
                ca.display()
            )),
            &tls,
        );
        hang_up.join().unwrap();
        assert_eq!(o.level, Level::Warn, "{o:?}");
        assert!(
            o.detail
                .contains("accepts connections, but a TLS handshake failed"),
            "{o:?}"
        );
    }

    #[test]
    fn environment_files_are_read_as_systemd_reads_them() {
        let vars = parse_env_file(concat!(
            "# comment \\\n",
            "; also\n\n",
            "A=1\n",
            "  B = two words \n",
            "C=\"quoted \\\"x\\\" \\$HOME \\n\"\n",
            "D='single \\ $x'\n",
            "export E=5\n",
            "9F=6\n",
            "noequals\n",
            "G=a=b # not a comment\n",
            "H=\"a\"'b'c \"d\"\n",
            "I=one\\ two\\\\ \\\n",
            "  three\n",
            "J=it's\n",
            "K=\"multi\n",
            "line\"\n",
            "L=",
        ));
        let get = |k: &str| vars.get(k).map(String::as_str);
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("B"), Some("two words"));
        assert_eq!(get("C"), Some("quoted \"x\" $HOME \\n"));
        assert_eq!(get("D"), Some("single \\ $x"));
        assert_eq!(get("G"), Some("a=b # not a comment"));
        // Quoted parts join where a value starts; a quote inside an
        // unquoted part is a character.
        assert_eq!(get("H"), Some("abc \"d\""), "parts joined");
        assert_eq!(get("I"), Some("one two\\   three"), "escapes, continuation");
        assert_eq!(get("J"), Some("it's"));
        assert_eq!(get("K"), Some("multi\nline"));
        assert_eq!(get("L"), Some(""));
        // The comment's escaped line end does not continue it: `A` is read.
        assert_eq!(vars.len(), 10, "{vars:?}");
    }

    #[test]
    fn endpoints_give_host_and_port() {
        for (url, want) in [
            ("http://collector:4318", Some("collector:4318")),
            (
                "https://otel.example.com/v1/metrics",
                Some("otel.example.com:443"),
            ),
            ("http://user:pw@10.0.0.5/x", Some("10.0.0.5:80")),
            ("http://[::1]:4317", Some("[::1]:4317")),
            ("https://[2001:db8::1]/", Some("[2001:db8::1]:443")),
            ("grpc://collector", None),
            ("collector:4317", None),
            ("http:///path", None),
        ] {
            assert_eq!(endpoint_addr(url).as_deref(), want, "{url}");
        }
    }

    #[test]
    fn the_summary_counts_failures_and_warnings() {
        let ok = outcome(Level::Ok, "a", "fine");
        let warn = outcome(Level::Warn, "bb", "hmm");
        let fail = outcome(Level::Fail, "c", "broken");
        let text = render(&[ok.clone(), warn.clone()]);
        assert!(
            text.starts_with("ok    a   fine\nwarn  bb  hmm\n"),
            "{text}"
        );
        assert!(
            text.ends_with("tollgate can run here (1 warnings).\n"),
            "{text}"
        );
        assert!(render(std::slice::from_ref(&ok)).ends_with("tollgate can run here.\n"));
        assert!(
            render(&[ok, warn, fail])
                .ends_with("1 checks failed: `tollgate run` would not work here as it is.\n")
        );
    }
}
