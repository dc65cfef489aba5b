//! `tollgate run`: assembles the agent (CA, ledger, listeners, kernel
//! programs, resolver, proxy), reports readiness, and shuts down in order.
//!
//! Owns: start-up order and shutdown order. Must never: hold request state
//! or do per-request work.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::attribution::Attributor;
use crate::ca::{CaStatus, LocalCa};
use crate::config::{Config, parse_override_addr};
use crate::intercept::{self, Intercept, InterceptSettings, resolver};
use crate::ledger::LedgerWriter;
use crate::meter::pricing::PriceBook;
use crate::meter::{RecordSink, UsageRecord};
use crate::providers::catalogue::provider_hosts;
use crate::proxy::{self, ProxyState, upstream::Upstream};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "`tollgate run` needs root (CAP_BPF, CAP_NET_ADMIN and the state directory); run it with sudo or as a systemd service"
    )]
    NotRoot,
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the state directory {path} {why}: whoever can write it can replace the CA key and the ledger; make it owned by root and writable by root only (chmod 755)"
    )]
    StateDirUnsafe { path: String, why: String },
    #[error("the state directory {path} belongs to root: run this command as root (sudo)")]
    StateDirOfRoot { path: String },
    #[error(
        "cannot listen on {addr}: {source} (is another tollgate running? set [proxy] listen to a free port)"
    )]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    Intercept(#[from] crate::intercept::InterceptError),
    #[error("upstream TLS: {0} (check [upstream] extra_ca)")]
    Upstream(#[from] crate::proxy::upstream::UpstreamError),
    #[error(
        "the agent runs in a pid namespace of its own, inside the cgroup it would intercept ({cgroup}): the kernel would not know its connections to providers as its own and would send them back to it, so every request would fail; run it with the host's pid namespace (docker run --pid=host), or set intercept.cgroup to a cgroup that holds the jobs but not the agent"
    )]
    SelfInterceptedInPidNamespace { cgroup: String },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "the listeners failed to accept for 15 s (out of file descriptors? see LimitNOFILE): stopped to be restarted"
    )]
    CannotAccept,
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
    #[error(transparent)]
    Presence(#[from] crate::presence::PresenceError),
}

impl AppError {
    pub fn exit_code(&self) -> u8 {
        use crate::exit::*;
        match self {
            AppError::NotRoot => NOPERM,
            AppError::StateDir { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                NOPERM
            }
            AppError::StateDir { .. } => UNAVAILABLE,
            AppError::StateDirUnsafe { .. } | AppError::StateDirOfRoot { .. } => NOPERM,
            AppError::Listen { .. } => UNAVAILABLE,
            AppError::SelfInterceptedInPidNamespace { .. } => UNAVAILABLE,
            AppError::Ca(e) => e.exit_code(),
            AppError::Ledger(e) => e.exit_code(),
            AppError::Intercept(e) => e.exit_code(),
            AppError::Upstream(_) => USAGE,
            AppError::Runtime(_) => SOFTWARE,
            AppError::CannotAccept => UNAVAILABLE,
            AppError::Export(e) => e.exit_code(),
            AppError::Presence(crate::presence::PresenceError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                NOPERM
            }
            AppError::Presence(_) => UNAVAILABLE,
        }
    }
}

/// Logs what loading the CA did.
pub fn log_ca_status(status: &CaStatus) {
    match status {
        CaStatus::Loaded => {}
        CaStatus::Created => info!("created the local CA"),
        CaStatus::Regenerated {
            unusable: Some(reason),
            ..
        } => warn!(
            %reason,
            "the local CA was unusable: created a new one. Run `tollgate trust install` (and refresh `tollgate trust env`) again"
        ),
        CaStatus::Regenerated {
            added_hosts,
            unusable: None,
        } => warn!(
            hosts = ?added_hosts,
            "the provider hosts changed beyond what the CA's name constraints allow: created a new CA. Run `tollgate trust install` (and refresh `tollgate trust env`) again"
        ),
    }
}

impl RecordSink for crate::ledger::LedgerHandle {
    fn submit(&self, rec: Arc<UsageRecord>) {
        crate::ledger::LedgerHandle::submit(self, rec)
    }
}

/// The signals the agent shuts down on. A blocked signal mask survives
/// fork and exec, so an agent started by a program that blocks these (to
/// `sigwait` for them, as many supervisors and test harnesses do) would
/// never see SIGTERM: it would run on until SIGKILL and lose what the
/// ledger had not written. Unblocked here, before any thread starts, so
/// every thread inherits the cleared mask.
/// (SIGHUP is left as found: the agent only logs it, as it does not
/// reload; one blocked by the parent stays blocked, and is never seen.)
const SHUTDOWN_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// How long the ledger's last batch may take to write at a stop.
const LEDGER_FLUSH: Duration = Duration::from_secs(30);
/// How long the exporters' last export may take at a stop.
const EXPORT_FLUSH: Duration = Duration::from_secs(10);

/// The sd_notify message of a stop that drains for `drain`: `STOPPING=1`,
/// and the most the stop can take (the drain, the grace of cut requests'
/// records, the ledger's and the exporters' flushes, and a margin) as
/// `EXTEND_TIMEOUT_USEC`, which raises systemd's stop timeout to it when
/// that is larger.
fn stopping_message(drain: Duration) -> String {
    let bound = drain
        + proxy::STOP_GRACE
        + proxy::RECORD_GRACE
        + LEDGER_FLUSH
        + EXPORT_FLUSH
        + Duration::from_secs(15);
    format!("STOPPING=1\nEXTEND_TIMEOUT_USEC={}", bound.as_micros())
}

/// A signal set holding `signals`.
fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn unblock_shutdown_signals() {
    let set = signal_set(&SHUTDOWN_SIGNALS);
    // SAFETY: `set` is initialised; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        warn!(
            errno = rc,
            "could not unblock SIGTERM and SIGINT; if the parent blocked them, the agent will not stop on them"
        );
    }
}

/// Runs the agent until SIGTERM or SIGINT on `proxy.worker_threads`
/// threads (0: one per CPU). Blocking work (attribution's /proc reads,
/// local token estimates) has its own pool either way; the ledger its own
/// thread.
pub fn run_blocking(cfg: Config) -> Result<(), AppError> {
    unblock_shutdown_signals();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.proxy.worker_threads > 0 {
        builder.worker_threads(cfg.proxy.worker_threads);
    }
    let rt = builder
        .enable_all()
        .thread_name("tollgate")
        .build()
        .map_err(AppError::Runtime)?;
    rt.block_on(run(cfg))
}

fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(1 << 20);
        if soft < want && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_err() {
            warn!(soft, hard, "could not raise the open-file limit");
        }
    }
}

/// Tells systemd (Type=notify) about a state change, when NOTIFY_SOCKET is set.
/// The socket is made once and kept: out of descriptors, the agent can
/// still say it is stopping. False when the message could not be sent.
pub fn sd_notify(state: &str) -> bool {
    static SOCKET: std::sync::Mutex<Option<std::os::unix::net::UnixDatagram>> =
        std::sync::Mutex::new(None);
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return true;
    };
    let mut kept = SOCKET.lock().unwrap_or_else(|e| e.into_inner());
    if kept.is_none() {
        // A send waits for room in the receiver's queue: bounded, since
        // it runs on the worker that serves every connection (a service
        // manager that stops reading must not stall the proxy).
        *kept = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| {
                s.set_write_timeout(Some(Duration::from_millis(100)))?;
                Ok(s)
            })
            .ok();
    }
    let Some(sock) = kept.as_ref() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = r {
        warn!(error = %e, "sd_notify failed");
        return false;
    }
    true
}

/// How often to tell systemd the agent is alive, when its unit sets
/// `WatchdogSec=` (systemd passes `WATCHDOG_USEC`, and `WATCHDOG_PID` when
/// the watchdog is another process's): a third of the timeout. `None`
/// when there is no watchdog for this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(me)) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 3).max(Duration::from_millis(10)))
}

/// How often the agent looks whether jobs' provider connections come only
/// from other network namespaces (see [`only_other_network_namespaces`]).
const NETNS_LOOK_EVERY: Duration = Duration::from_secs(60);

/// Provider connections came from other network namespaces (left alone,
/// as a container's with its own network is) and none from the agent's:
/// the host's jobs are not intercepted, which an agent in a container's
/// network namespace would explain.
fn only_other_network_namespaces(s: &crate::intercept::InterceptStats) -> bool {
    s.redirected == 0 && s.other_netns >= 3
}

/// Feeds systemd's watchdog from the async runtime that serves every
/// connection: the runtime wedged (with the default single worker, any
/// task that blocks it: a deadlock, a loop that never yields) or the
/// process stopped starves it, and systemd kills the agent, which takes
/// its programs with it, so jobs' connections go direct again instead of
/// to a listener nobody serves (fail open). (Listeners that fail to accept
/// are the agent's own to notice: see [`proxy::AcceptHealth`].)
fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let every = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = sd_notify("WATCHDOG=1");
        }
    }))
}

pub(crate) fn parse_overrides(cfg: &Config) -> BTreeMap<String, Vec<SocketAddr>> {
    cfg.resolver
        .overrides
        .iter()
        .map(|(h, addrs)| {
            (
                h.to_ascii_lowercase(),
                // Validated already: parse errors cannot happen here.
                addrs
                    .iter()
                    .filter_map(|a| parse_override_addr(a).ok())
                    .collect(),
            )
        })
        .collect()
}

pub async fn run(cfg: Config) -> Result<(), AppError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AppError::NotRoot);
    }
    // Caught from the start: a signal during start-up (CA, DNS, programs)
    // waits until the agent is up, which then stops cleanly at once,
    // instead of killing it half-started.
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Runtime)?;
    // A hang-up (a habitual `kill -HUP`, `systemctl kill -s HUP`) would
    // otherwise end the agent at once, without a drain or the ledger's
    // flush: it is caught and said not to reload.
    let mut hup = signal(SignalKind::hangup()).map_err(AppError::Runtime)?;
    raise_nofile_limit();
    // At most 755 (the umask only takes bits away): a directory we create
    // passes the check below.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o755)
        .create(&cfg.state_dir)
        .map_err(|source| AppError::StateDir {
            path: cfg.state_dir.display().to_string(),
            source,
        })?;
    check_state_dir(&cfg.state_dir, nix::unistd::geteuid().as_raw())?;
    // Held until the agent exits: `report` tells from it whether anything
    // is counting, and a second agent on this state directory stops here.
    let _presence = crate::presence::hold(&cfg.state_dir)?;

    let hosts = provider_hosts(&cfg);
    let host_names: Vec<String> = hosts.iter().map(|h| h.host.clone()).collect();
    let (ca, status) = LocalCa::load_or_create(&cfg.state_dir, &host_names)?;
    log_ca_status(&status);
    let upstream = Upstream::new(cfg.upstream.extra_ca.as_deref())?;
    let (ledger_writer, ledger) = LedgerWriter::start_with_retention(
        &crate::cli::ledger_path(&cfg.state_dir),
        cfg.ledger.queue,
        cfg.ledger.max_backlog,
        cfg.ledger.retention(),
    )?;

    // Exporters get the records through the same sink as the ledger; their
    // health view reads the proxy's counters once the proxy exists.
    let proxy_slot = Arc::new(std::sync::OnceLock::<std::sync::Weak<ProxyState>>::new());
    let intercept_slot = Arc::new(std::sync::OnceLock::<std::sync::Weak<Intercept>>::new());
    let health: crate::export::HealthFn = {
        let slot = proxy_slot.clone();
        let kernel = intercept_slot.clone();
        let ledger = ledger.clone();
        // The last counters seen, so the final export after the proxy and
        // the programs are gone still reports them.
        let last = std::sync::Mutex::new((
            crate::proxy::ProxyStatsSnapshot::default(),
            crate::intercept::InterceptStats::default(),
        ));
        Arc::new(move || {
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = slot.get().and_then(std::sync::Weak::upgrade) {
                last.0 = s.snapshot();
            }
            if let Some(i) = kernel.get().and_then(std::sync::Weak::upgrade) {
                last.1 = i.stats();
            }
            let (p, k) = *last;
            let l = ledger.stats();
            crate::export::HealthSnapshot {
                connections_intercepted: p.intercepted,
                connections_passthrough: p.passthrough + p.passthrough_untrusted,
                connections_refused: p.refused_no_origin,
                connections_other_netns: k.other_netns,
                connections_udp_refused: k.udp_refused,
                ledger_written: l.written,
                ledger_queued: l.queued,
                ledger_errors: l.errors,
                ledger_dropped: l.dropped + l.rejected + l.refused,
                bodies_too_long: p.body_too_long,
                bodies_over_budget: p.over_buffer_budget,
                responses_over_budget: crate::providers::responses_over_budget(),
                bodies_stalled: p.body_stalled,
                background_waiting: p.background_waiting,
                up: true,
            }
        })
    };
    crate::providers::set_response_budget(cfg.proxy.max_buffered_response_bytes);
    let mut resource = crate::export::ResourceInfo::from_host();
    resource.runner_name = std::env::var("RUNNER_NAME").ok().filter(|s| !s.is_empty());
    let (exporter, export_sink) = crate::export::start(&cfg.export, resource, health.clone())?;
    let live = Arc::new(crate::control::LiveState::new());
    let sink: Arc<dyn RecordSink> = Arc::new(crate::meter::FanOut(vec![
        Arc::new(ledger.clone()),
        export_sink,
        live.clone(),
    ]));

    // Listeners before programs: a redirected connect must find someone home.
    let (listeners, port) = bind_listeners(cfg.proxy.listen).await?;

    let cgroup = match &cfg.intercept.cgroup {
        Some(c) => c.clone(),
        None => {
            let root = intercept::cgroup2_root()?;
            if intercept::is_hierarchy_root(&root).ok() == Some(false) {
                warn!(
                    cgroup = %root.display(),
                    "the cgroup v2 mount shows a cgroup namespace's root, not the hierarchy's: jobs outside this container are not intercepted; run the agent in the host's cgroup namespace or set intercept.cgroup"
                );
            }
            root
        }
    };
    if crate::attribution::in_initial_pid_namespace() == Some(false) {
        // The programs know the agent by the host's pid of it, which a pid
        // namespace of its own hides: inside the cgroup, its upstream
        // connects would come back to its own listener.
        if intercept::holds_process(&cgroup, std::process::id()).unwrap_or(false) {
            return Err(AppError::SelfInterceptedInPidNamespace {
                cgroup: cgroup.display().to_string(),
            });
        }
        warn!(
            "the agent runs in a pid namespace of its own: the kernel reports the host's pids, which this /proc does not show, so requests are recorded with the kernel's fields only (pid, uid, cgroup, comm), without their executable, job and repository; run it with the host's pid namespace (docker run --pid=host)"
        );
    }
    if intercept::in_host_network_namespace() == Some(false) {
        warn!(
            "the agent runs in a network namespace other than the host's: only connections made in its own network namespace are intercepted, so the host's jobs are not; run it with the host's network (docker run --network=host)"
        );
    }
    // `validate` admits only IPv4 loopback addresses; any of 127.0.0.0/8
    // works, and the kernel must send connections to the one we bound.
    let listen_v4 = match cfg.proxy.listen.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => Ipv4Addr::LOCALHOST,
    };
    let intercept = Arc::new(Intercept::attach(&InterceptSettings::new(
        cgroup.clone(),
        listen_v4,
        port,
    ))?);
    let _ = intercept_slot.set(Arc::downgrade(&intercept));

    let overrides = parse_overrides(&cfg);
    let initial = resolver::resolve_targets(&host_names, &overrides, &BTreeMap::new()).await;
    let targets = resolver::redirected_addresses(&initial);
    let known = upstream.known_addresses();
    resolver::publish(&known, &initial, &targets);
    intercept.set_targets(&targets)?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    // The resolver stops first, on its own signal (see the shutdown below).
    let (refresh_stop_tx, refresh_stop_rx) = tokio::sync::watch::channel(false);
    let follow = intercept::spawn_cgroup_follow(
        intercept.clone(),
        intercept::CGROUP_FOLLOW_EVERY,
        refresh_stop_rx.clone(),
    );
    let refresh = resolver::spawn_refresh(
        intercept.clone(),
        known,
        host_names.clone(),
        overrides,
        Duration::from_secs(cfg.resolver.refresh_secs),
        initial,
        refresh_stop_rx,
    );

    let ca = Arc::new(ca);
    // A CA kept at boot though it starts after the clock: said again, as an
    // error, if the clock has not passed its start once the grace is over.
    tokio::spawn({
        let ca = Arc::clone(&ca);
        async move { ca.recheck_start_after_boot().await }
    });
    let state = ProxyState::new(
        intercept.clone(),
        ca,
        upstream,
        hosts,
        Attributor::new("/proc".into())
            .with_teams(cfg.teams.clone())
            .kernel_fields_only(crate::attribution::in_initial_pid_namespace() == Some(false)),
        sink,
        cfg.proxy.max_request_body,
    )
    .with_prices(Arc::new(PriceBook::new(&cfg.pricing)))
    .with_max_buffered(cfg.proxy.max_buffered_request_bytes)
    .with_body_stall(Duration::from_secs(cfg.proxy.request_body_stall_secs))
    .with_live(live.handle());
    // Before the first request: a read of results counted before this
    // start must find them counted (an index makes it quick).
    seed_batches_read(&state, &cfg);
    let state = Arc::new(state);
    let _ = proxy_slot.set(Arc::downgrade(&state));
    let control_task = match crate::control::ControlServer::bind(&cfg.control) {
        Ok(server) => Some(tokio::spawn(server.run(live.clone(), shutdown_rx.clone()))),
        Err(e) => {
            warn!(error = %e, "no control socket: `tollgate top` will not work");
            None
        }
    };
    let drain = Duration::from_secs(cfg.proxy.drain_secs);
    let proxy_task = tokio::spawn(proxy::serve(listeners, state.clone(), shutdown_rx, drain));
    // Jobs that connect only from other network namespaces: the agent is
    // likely in a container's, where `check` cannot always tell.
    tokio::spawn({
        let intercept = Arc::downgrade(&intercept);
        async move {
            let mut every = tokio::time::interval(NETNS_LOOK_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(i) = intercept.upgrade() else { return };
                let s = i.stats();
                if only_other_network_namespaces(&s) {
                    warn!(
                        from_other_namespaces = s.other_netns,
                        "connections to provider addresses came only from network namespaces other than the agent's, and were left alone: if the jobs run in the host's network, the agent must too (docker run --network=host); jobs in containers with networks of their own are not intercepted"
                    );
                    return;
                }
                if s.redirected > 0 {
                    return;
                }
            }
        }
    });

    info!(
        listen = %SocketAddr::from((listen_v4, port)),
        cgroup = %cgroup.display(),
        provider_addresses = targets.len(),
        state_dir = %cfg.state_dir.display(),
        "ready"
    );
    let _ = sd_notify("READY=1");
    let watchdog = spawn_watchdog();
    // Listeners that keep failing to accept (out of descriptors): jobs'
    // connections wait in the backlog. The agent stops as for SIGTERM
    // (draining, flushing) and exits 69 for its supervisor to restart it.
    let accepts_failing = {
        let state = Arc::downgrade(&state);
        async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if state
                    .upgrade()
                    .is_some_and(|s| !s.accept_health.healthy(std::time::Instant::now()))
                {
                    return;
                }
            }
        }
    };
    tokio::pin!(accepts_failing);
    let mut cannot_accept = false;

    loop {
        tokio::select! {
            _ = term.recv() => {
                info!("SIGTERM: shutting down");
                break;
            }
            _ = int.recv() => {
                info!("SIGINT: shutting down");
                break;
            }
            _ = hup.recv() => warn!(
                "SIGHUP: ignored; the agent does not reload its config or CA: restart it (systemctl restart tollgate) to apply changes"
            ),
            _ = &mut accepts_failing => {
                error!(
                    "the listeners have failed to accept for 15 s: stopping (drain, ledger flush) to exit 69, for the supervisor to restart the agent"
                );
                cannot_accept = true;
                break;
            }
        }
    }
    // systemd's TimeoutStopSec (120 s in the shipped unit) would SIGKILL a
    // stop that takes longer, losing the records of the drain's cut
    // requests and the ledger's last batch: the stop's own bound is asked
    // for (a larger `proxy.drain_secs`).
    // (Tried for up to a second: off the request path now, and a lost
    // extension would have a long drain SIGKILLed.)
    let stopping = stopping_message(drain);
    for _ in 0..10 {
        if sd_notify(&stopping) {
            break;
        }
    }
    // Stop redirecting first, while the listeners still accept: new
    // connections then go direct, and none is sent to a closed port. The
    // resolver stops before the map is cleared, so it cannot fill it
    // again. Then the proxy takes what is queued, drains, and the ledger
    // is flushed.
    let _ = refresh_stop_tx.send(true);
    let _ = refresh.await;
    let _ = follow.await;
    if let Err(e) = intercept.set_targets(&BTreeSet::new()) {
        warn!(error = %e, "could not clear the provider map before draining");
    }
    let _ = shutdown_tx.send(true);
    // A second signal ends the drain now (records are still written).
    let mut proxy_task = proxy_task;
    tokio::select! {
        _ = &mut proxy_task => {}
        _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
            state.cut_drain.cancel();
            let _ = proxy_task.await;
        }
    }
    if let Some(t) = control_task {
        let _ = t.await;
    }
    // The health view keeps the proxy's last counters for the exporters'
    // final export, which comes after the proxy is gone: read them now,
    // or a run shorter than the export interval would end with none.
    let _ = health();
    drop(state);
    // systemd stops watching once the stop begins; the stop's bound is
    // what `stopping_message` asked for.
    let written = ledger_writer.shutdown(LEDGER_FLUSH);
    // The exporters' last export and the audit log's flush happen whatever
    // the ledger's outcome.
    if let Err(e) = exporter.shutdown(EXPORT_FLUSH).await {
        warn!(error = %e, "export shutdown");
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    let written = written?;
    info!(records = written, "ledger flushed; bye");
    if cannot_accept {
        return Err(AppError::CannotAccept);
    }
    Ok(())
}

/// Tells the proxy which batches' results the ledger says were read, so
/// that reading them again after this restart counts nothing. A ledger
/// that cannot be read for it costs only that (said at warn).
fn seed_batches_read(state: &ProxyState, cfg: &Config) {
    let path = crate::cli::ledger_path(&cfg.state_dir);
    let since = std::time::SystemTime::now()
        .checked_sub(crate::ledger::BATCH_READS_KEPT)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let reads = crate::ledger::Ledger::open_read_only(&path)
        .and_then(|l| l.batch_reads_since(since, proxy::batches::MAX_BATCHES));
    match reads {
        Ok(reads) => {
            let n = state.batches_read(&reads);
            if n > 0 {
                info!(
                    batches = n,
                    "batch results read before this start are counted already"
                );
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot read the ledger for batch results already counted: results read before this start would count again if read again");
        }
    }
}

/// Refuses a state directory that someone other than `owner` could write:
/// it holds the CA's key and the ledger.
pub(crate) fn check_state_dir(dir: &std::path::Path, owner: u32) -> Result<(), AppError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).map_err(|source| AppError::StateDir {
        path: dir.display().to_string(),
        source,
    })?;
    if meta.uid() == 0 && owner != 0 && meta.mode() & 0o022 == 0 {
        // As it should be, for a command run as another user.
        return Err(AppError::StateDirOfRoot {
            path: dir.display().to_string(),
        });
    }
    let why = if meta.uid() != owner {
        format!("is owned by uid {}, not {owner}", meta.uid())
    } else if meta.mode() & 0o022 != 0 {
        format!(
            "is writable by other users (mode {:o})",
            meta.mode() & 0o7777
        )
    } else {
        return Ok(());
    };
    Err(AppError::StateDirUnsafe {
        path: dir.display().to_string(),
        why,
    })
}

/// The IPv4 listener at `listen` and, when the host has IPv6 loopback, one
/// on `[::1]` at the same port (the kernel programs send IPv6 provider
/// connections there). Returns them and the port.
///
/// A port taken on `[::1]` by another process is an error, as it is on
/// IPv4: the programs would send jobs' provider connections, API keys and
/// all, to that process. With port 0 the kernel's pick is tried again.
async fn bind_listeners(listen: SocketAddr) -> Result<(Vec<TcpListener>, u16), AppError> {
    let mut attempts = 0;
    loop {
        let v4 = TcpListener::bind(listen)
            .await
            .map_err(|source| AppError::Listen {
                addr: listen,
                source,
            })?;
        let port = v4.local_addr().map(|a| a.port()).unwrap_or(listen.port());
        let v6_addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        match bind_v6_only(v6_addr) {
            Ok(v6) => return Ok((vec![v4, v6], port)),
            // No IPv6 loopback here: nobody else can have [::1] either.
            Err(e) if no_ipv6_loopback(&e) => {
                warn!(addr = %v6_addr, error = %e, "no IPv6 loopback: IPv6 connections to providers fail while intercepted (clients fall back to IPv4)");
                return Ok((vec![v4], port));
            }
            Err(_) if listen.port() == 0 && attempts < 16 => attempts += 1,
            Err(source) => {
                return Err(AppError::Listen {
                    addr: v6_addr,
                    source,
                });
            }
        }
    }
}

/// The errors of binding `[::1]` that mean the host has no IPv6 loopback
/// (nobody else can have it either).
pub(crate) fn no_ipv6_loopback(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT)
    )
}

/// Binds `addr` ([::1]) as `run` does, IPv6 only, not yet listening: the
/// bind fails as `run`'s would when the port is taken. Needs no runtime.
pub(crate) fn bind_v6_only_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let sock = tokio::net::TcpSocket::new_v6()?;
    sock.set_reuseaddr(true)?;
    // Only [::1]: IPv4 clients are sent to the IPv4 listener.
    let fd = std::os::fd::AsFd::as_fd(&sock);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Ipv6V6Only, &true)
        .map_err(std::io::Error::from)?;
    sock.bind(addr)?;
    Ok(sock)
}

fn bind_v6_only(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bind_v6_only_socket(addr)?.listen(1024)
}

#[cfg(test)]
mod tests {
    /// Provider connections only from other network namespaces (three or
    /// more, none redirected) are what an agent in a container's network
    /// sees; one redirected connection says the agent's own namespace has
    /// jobs.
    #[test]
    fn only_other_network_namespaces_is_told() {
        use crate::intercept::InterceptStats;
        let s = |redirected, other_netns| InterceptStats {
            redirected,
            other_netns,
            ..Default::default()
        };
        assert!(super::only_other_network_namespaces(&s(0, 3)));
        assert!(!super::only_other_network_namespaces(&s(0, 2)));
        assert!(!super::only_other_network_namespaces(&s(1, 50)));
        assert!(!super::only_other_network_namespaces(&s(0, 0)));
    }

    /// A stop asks systemd for as long as it can take, so a drain longer
    /// than the unit's TimeoutStopSec allows is not SIGKILLed; the shipped
    /// unit's own timeout covers the default drain without asking.
    #[test]
    fn a_stop_asks_for_what_it_can_take() {
        use std::time::Duration;
        let usec = |drain: u64| -> u64 {
            let m = super::stopping_message(Duration::from_secs(drain));
            let mut lines = m.lines();
            assert_eq!(lines.next(), Some("STOPPING=1"));
            lines
                .next()
                .and_then(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
                .and_then(|v| v.parse().ok())
                .expect("EXTEND_TIMEOUT_USEC")
        };
        // The drain, 35 s for cut requests' records, 40 s of flushes.
        assert!(usec(600) >= (600 + 75) * 1_000_000, "{}", usec(600));
        assert_eq!(usec(600) - usec(30), 570 * 1_000_000);
        let unit = include_str!("../../deploy/systemd/tollgate.service");
        let stop_secs: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .and_then(|v| v.trim().parse().ok())
            .expect("TimeoutStopSec in the unit");
        let default_drain = crate::config::Config::default().proxy.drain_secs;
        assert!(
            usec(default_drain) <= stop_secs * 1_000_000,
            "the unit's TimeoutStopSec={stop_secs} is below a default stop ({} us)",
            usec(default_drain)
        );
    }

    #[test]
    fn the_watchdog_is_fed_three_times_per_timeout_for_this_process_only() {
        use super::watchdog_interval as w;
        use std::time::Duration;
        assert_eq!(w(Some("30000000"), None, 7), Some(Duration::from_secs(10)));
        assert_eq!(
            w(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(10))
        );
        assert_eq!(w(Some("30000000"), Some("8"), 7), None, "another's");
        assert_eq!(w(None, None, 7), None, "no watchdog");
        for bad in ["0", "", "x", "-5"] {
            assert_eq!(w(Some(bad), None, 7), None, "{bad:?}");
        }
        assert_eq!(w(Some("3"), None, 7), Some(Duration::from_millis(10)));
    }

    use super::*;

    #[tokio::test]
    async fn a_port_taken_on_ipv6_loopback_is_an_error_not_a_warning() {
        let other = match std::net::TcpListener::bind("[::1]:0") {
            Ok(l) => l,
            // A host without IPv6 loopback (a container's default): the
            // agent listens on IPv4 only, and says so.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                ) =>
            {
                let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
                let (ls, _) = bind_listeners(any).await.expect("IPv4 only");
                assert_eq!(ls.len(), 1);
                return;
            }
            Err(e) => panic!("[::1]:0: {e}"),
        };
        let port = other.local_addr().unwrap().port();
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match bind_listeners(listen).await {
            Err(AppError::Listen { addr, .. }) => {
                assert_eq!(addr, SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("listened although [::1]:{port} belongs to someone else"),
        }
        // Port 0: another pick, with both families on the same port.
        let (ls, port) = bind_listeners(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind");
        assert_eq!(ls.len(), 2);
        for l in &ls {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
    }

    /// Whether `sig` is blocked in the calling thread.
    fn blocked(sig: libc::c_int) -> bool {
        // SAFETY: sigset_t is plain data; pthread_sigmask only reads the
        // (null) new set and fills `old`.
        unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
            libc::sigismember(&old, sig) == 1
        }
    }

    #[test]
    fn a_state_dir_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let set = |mode| std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(mode));
        set(0o755).unwrap();
        check_state_dir(t.path(), me).expect("755, own: fine");
        set(0o700).unwrap();
        check_state_dir(t.path(), me).expect("700, own: fine");
        for mode in [0o775, 0o757, 0o777] {
            set(mode).unwrap();
            let e = check_state_dir(t.path(), me).expect_err("writable by others");
            assert!(e.to_string().contains("writable by other users"), "{e}");
            assert_eq!(e.exit_code(), crate::exit::NOPERM);
        }
        set(0o755).unwrap();
        let e = check_state_dir(t.path(), me.wrapping_add(1)).expect_err("someone else's");
        if me == 0 {
            // Root's, as it should be: the command is run as another user.
            assert!(e.to_string().contains("run this command as root"), "{e}");
        } else {
            assert!(e.to_string().contains("owned by uid"), "{e}");
        }
        assert_eq!(e.exit_code(), crate::exit::NOPERM);
    }

    #[test]
    fn shutdown_signals_blocked_by_a_parent_are_unblocked() {
        // A thread of its own: the mask is per thread, and the test
        // harness's threads must keep theirs.
        std::thread::spawn(|| {
            let set = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]);
            // SAFETY: blocks three signals in this thread only.
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
            assert!(blocked(libc::SIGTERM) && blocked(libc::SIGINT));
            unblock_shutdown_signals();
            assert!(!blocked(libc::SIGTERM));
            assert!(!blocked(libc::SIGINT));
            // Not handled by the agent: left as the parent set it.
            assert!(blocked(libc::SIGHUP));
        })
        .join()
        .expect("the test thread");
    }
}
