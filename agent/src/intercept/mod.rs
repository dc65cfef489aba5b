//! Kernel interception: loads and attaches the `agent-ebpf` programs to a
//! cgroup v2 directory, keeps the provider address map current, and hands the
//! proxy the origin of each redirected connection.
//!
//! Owns: the eBPF object, its links and maps, the resolver refresh
//! (`resolver`), and finding the client socket of an accepted connection
//! (`diag`). Must never: hold request state (the proxy forgets an origin
//! when its connection ends; the kernel map is an LRU besides), or hold a
//! lock the request path takes across anything but one map syscall.
//!
//! Dropping [`Intercept`] detaches every program (bpf_link, not pinned), so a
//! dead agent fails open: connects go straight to the provider again.

mod cgroup;
mod diag;
mod error;
mod keys;
mod programs;
pub mod resolver;
mod watch;

use std::{
    collections::{BTreeSet, HashSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use agent_common::{AddrPort, Origin, stat, target_flags};
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
};

pub use cgroup::{cgroup2_root, holds_process, in_host_network_namespace, is_hierarchy_root};
pub use error::InterceptError;

/// Where and how to attach.
#[derive(Debug, Clone)]
pub struct InterceptSettings {
    /// cgroup v2 directory whose processes (and descendants) are intercepted.
    pub cgroup: PathBuf,
    /// IPv4 address of the agent's listener (IPv6 clients go to `[::1]`).
    pub listen_v4: Ipv4Addr,
    /// Port of the agent's listeners (the same on 127.0.0.1 and ::1).
    pub listen_port: u16,
    /// The process whose connects are left alone (the agent's own, to the
    /// providers): `std::process::id()` (see [`InterceptSettings::new`]).
    pub agent_pid: u32,
}

impl InterceptSettings {
    /// Settings for this process as the agent.
    pub fn new(cgroup: PathBuf, listen_v4: Ipv4Addr, listen_port: u16) -> Self {
        InterceptSettings {
            cgroup,
            listen_v4,
            listen_port,
            agent_pid: std::process::id(),
        }
    }
}

/// Who dialed a redirected connection, and where to.
#[derive(Debug, Clone)]
pub struct ConnOrigin {
    /// Process id (thread group id) of the caller.
    pub tgid: u32,
    /// Thread id of the caller.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// cgroup v2 id of the caller (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    /// `comm` of the calling thread.
    pub comm: String,
    /// The address the client dialed; IPv4 (also v4-mapped) as `SocketAddr::V4`.
    pub dst: SocketAddr,
    /// Socket cookie of the client's socket.
    pub cookie: u64,
    /// When the client connected, in nanoseconds since boot; 0 if unknown.
    pub connected_boot_ns: u64,
}

/// Sums of the per-CPU counters of the kernel programs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct InterceptStats {
    /// Connects rewritten to the agent.
    pub redirected: u64,
    /// Provider connects from another network namespace, left untouched.
    pub other_netns: u64,
    /// The agent's own provider connects, left untouched.
    pub agent_self: u64,
    /// UDP to provider addresses refused, connected or sent to with
    /// `sendto` (QUIC falls back to TCP).
    pub udp_refused: u64,
    /// Kernel map updates that failed (the connect was left untouched).
    pub map_errors: u64,
    /// `getpeername()` calls answered with the dialed address.
    pub peername_restored: u64,
}

/// The provider map and what user space last put in it.
struct Targets {
    map: HashMap<MapData, AddrPort, u32>,
    current: HashSet<AddrPort>,
}

/// The loaded, attached programs. Dropping it detaches everything (bpf_link),
/// so a dead agent fails open.
pub struct Intercept {
    cgroup: PathBuf,
    targets: Mutex<Targets>,
    /// ORIGIN_BY_COOKIE: the origin of each redirected socket by its cookie.
    origins: Mutex<HashMap<MapData, u64, Origin>>,
    stats: PerCpuArray<MapData, u64>,
    /// Owns the programs and their links: dropping it detaches them all (the
    /// kernel keeps the maps alive for as long as a program uses them).
    ebpf: Mutex<Ebpf>,
    /// The cgroup directory the links are on, by its id.
    attached: Mutex<Attached>,
}

/// Which cgroup (by id: its directory's inode number) the programs are
/// attached to, and their links; `None` once the directory is gone.
struct Attached {
    cgroup_id: Option<u64>,
    links: programs::Links,
}

/// What [`Intercept::follow_cgroup`] found.
#[derive(Debug)]
pub enum CgroupChange {
    /// Still the cgroup the programs are attached to (or still gone).
    Unchanged,
    /// The directory was removed: the kernel dropped the programs with it,
    /// and nothing is intercepted until it is back.
    Gone,
    /// The directory is back (a new cgroup): the programs are attached to it.
    Reattached,
    /// It is back, and attaching to it failed.
    Failed(InterceptError),
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intercept")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

/// What `tollgate check` asks of the kernel, without attaching anything:
/// BTF is there, the socket diagnostics answer, the agent's network
/// namespace has a cookie, and the kernel's verifier accepts every program
/// (loaded, then unloaded). Returns the number of programs. Needs root.
pub fn verify_kernel() -> Result<usize, InterceptError> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(InterceptError::NoBtf);
    }
    diag::self_test()?;
    cgroup::own_netns_cookie()?;
    programs::verify_all()
}

/// How often the agent looks whether its cgroup was replaced, besides
/// when its parent directory says so.
pub const CGROUP_FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Calls [`Intercept::follow_cgroup`] as soon as the cgroup's directory is
/// created or removed (an inotify watch on its parent: a service's cgroup
/// made anew at its restart is attached to before its first job connects),
/// and every `every` besides; logs what changed, until `stop` turns true
/// (or its sender is dropped).
pub fn spawn_cgroup_follow(
    intercept: std::sync::Arc<Intercept>,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_error = None;
        let mut parent = watch::ParentWatch::new(&intercept.cgroup);
        // The first look is at once: what changed between the attach and
        // the watch.
        let mut first = true;
        let cgroup = intercept.cgroup.clone();
        let mut next = |parent: &mut Option<watch::ParentWatch>| {
            let parent = parent.take();
            let now = std::mem::take(&mut first);
            let cgroup = cgroup.clone();
            async move {
                if now {
                    return parent;
                }
                let Some(w) = parent else {
                    // Without a watch (its directory went, a slice the
                    // runner removes and makes again), one is tried again
                    // at each look.
                    tokio::time::sleep(every).await;
                    return watch::ParentWatch::new(&cgroup);
                };
                tokio::select! {
                    _ = tokio::time::sleep(every) => Some(w),
                    r = w.changed() => match r {
                        Ok(()) => Some(w),
                        Err(e) => {
                            tracing::debug!(error = %e, "the intercepted cgroup's parent is no longer watched; looking every few seconds only");
                            None
                        }
                    },
                }
            }
        };
        while let Some(kept) = unless_stopped(next(&mut parent), &mut stop).await {
            parent = kept;
            let cgroup = intercept.cgroup.display().to_string();
            match intercept.follow_cgroup() {
                CgroupChange::Unchanged => {}
                CgroupChange::Gone => {
                    last_error = None;
                    tracing::warn!(
                        %cgroup,
                        "the intercepted cgroup was removed: nothing is intercepted until a cgroup is created at that path again"
                    );
                }
                CgroupChange::Reattached => {
                    last_error = None;
                    tracing::info!(%cgroup, "the intercepted cgroup was created anew: interception attached to it");
                }
                CgroupChange::Failed(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::error!(%cgroup, error = %text, "the intercepted cgroup was created anew, and attaching to it failed (retrying)");
                        last_error = Some(text);
                    }
                }
            }
        }
    })
}

/// Runs `fut` to its end, unless `stop` turns true first (or its sender
/// is dropped): `None` then. The background loops' way to end promptly.
pub(crate) async fn unless_stopped<F: std::future::Future>(
    fut: F,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        if *stop.borrow_and_update() {
            return None;
        }
        tokio::select! {
            out = &mut fut => return Some(out),
            changed = stop.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
        }
    }
}

/// The id of the cgroup at `dir` (its directory's inode number); `None`
/// if there is no such directory.
fn cgroup_id(dir: &Path) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata(dir) {
        Ok(m) => Ok(Some(m.ino())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `cgroup` can take the programs: a cgroup v2 directory.
pub fn check_cgroup(cgroup: &Path) -> Result<(), InterceptError> {
    cgroup::check_cgroup_dir(cgroup)
}

/// A missing `cgroup` that `run` waits for: its parent is a cgroup v2
/// directory.
pub fn cgroup_may_appear(cgroup: &Path) -> bool {
    cgroup::may_appear(cgroup)
}

impl Intercept {
    /// Loads the embedded object, fills CONFIG (agent tgid, its netns cookie,
    /// listeners 127.0.0.1/`listen_v4` and ::1 on `listen_port`, ENABLED)
    /// and attaches every program to `settings.cgroup`. Several agents may
    /// attach to different cgroups (or the same one) at once, but each
    /// exempts only its own process: an agent inside a cgroup another one
    /// intercepts has its upstream connections sent to that other agent
    /// (the README's troubleshooting says so).
    pub fn attach(settings: &InterceptSettings) -> Result<Intercept, InterceptError> {
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(InterceptError::NoBtf);
        }
        let not_yet = match cgroup::check_cgroup_dir(&settings.cgroup) {
            Ok(()) => false,
            Err(e @ InterceptError::CgroupMissing { .. }) => {
                if !cgroup::may_appear(&settings.cgroup) {
                    return Err(e);
                }
                true
            }
            Err(e) => return Err(e),
        };
        diag::self_test()?;
        let netns_cookie = cgroup::own_netns_cookie()?;
        let config = programs::config(
            settings.listen_v4,
            settings.listen_port,
            settings.agent_pid,
            netns_cookie,
        );

        let mut ebpf = programs::load_object()?;
        programs::write_config(&mut ebpf, &config)?;
        let targets = take_map(&mut ebpf, "PROVIDER_TARGETS", HashMap::try_from)?;
        let origins = take_map(&mut ebpf, "ORIGIN_BY_COOKIE", HashMap::try_from)?;
        let stats = take_map(&mut ebpf, "STATS", PerCpuArray::try_from)?;
        programs::load_all(&mut ebpf)?;
        let (links, cgroup_id) = if not_yet {
            tracing::warn!(
                cgroup = %settings.cgroup.display(),
                "the cgroup to intercept does not exist yet (a service that has not started?): the programs are attached when it is created"
            );
            (programs::Links::new(), None)
        } else {
            let (links, id) = programs::attach_loaded(&mut ebpf, &settings.cgroup)?;
            (links, Some(id))
        };
        tracing::info!(
            cgroup = %settings.cgroup.display(),
            listen_v4 = %settings.listen_v4,
            listen_port = settings.listen_port,
            "interception attached"
        );
        Ok(Intercept {
            cgroup: settings.cgroup.clone(),
            targets: Mutex::new(Targets {
                map: targets,
                current: HashSet::new(),
            }),
            origins: Mutex::new(origins),
            stats,
            ebpf: Mutex::new(ebpf),
            attached: Mutex::new(Attached { cgroup_id, links }),
        })
    }

    /// The id of the cgroup the programs are attached to (its directory's
    /// inode number); `None` while its directory does not exist.
    pub fn attached_cgroup_id(&self) -> Option<u64> {
        lock(&self.attached).cgroup_id
    }

    /// Follows the cgroup directory the programs are attached to. The
    /// kernel drops them with the cgroup when it is removed, and systemd
    /// removes a service's cgroup each time the service stops (an ephemeral
    /// runner's, after every job) and creates a new one at its start: when
    /// the path names a new cgroup, the programs are attached to it. Cheap
    /// (one `stat`): the agent calls it every few seconds.
    pub fn follow_cgroup(&self) -> CgroupChange {
        let now = match cgroup_id(&self.cgroup) {
            Ok(id) => id,
            Err(e) => {
                // Not an answer (EACCES, ENOMEM): nothing is changed.
                tracing::debug!(error = %e, "cannot look at the intercepted cgroup");
                return CgroupChange::Unchanged;
            }
        };
        let mut attached = lock(&self.attached);
        if now == attached.cgroup_id {
            return CgroupChange::Unchanged;
        }
        let mut ebpf = lock(&self.ebpf);
        programs::detach(&mut ebpf, std::mem::take(&mut attached.links));
        attached.cgroup_id = None;
        if now.is_none() {
            return CgroupChange::Gone;
        }
        match programs::attach_loaded(&mut ebpf, &self.cgroup) {
            Ok((links, id)) => {
                // The id of the directory attached to: if the path changed
                // again meanwhile, the next call attaches to the newest.
                attached.cgroup_id = Some(id);
                attached.links = links;
                CgroupChange::Reattached
            }
            Err(e) => CgroupChange::Failed(e),
        }
    }

    /// Replaces the set of redirected provider addresses (diff: delete
    /// stale, insert new), live.
    pub fn set_targets(&self, targets: &BTreeSet<SocketAddr>) -> Result<(), InterceptError> {
        let wanted: HashSet<AddrPort> = targets.iter().map(|a| keys::key_of(*a)).collect();
        let mut t = lock(&self.targets);
        let stale: Vec<AddrPort> = t.current.difference(&wanted).copied().collect();
        let new: Vec<AddrPort> = wanted.difference(&t.current).copied().collect();
        // Stale ones first: with the map near its bound (MAX_TARGETS), an
        // insert before them would fail, and every later refresh with it.
        for key in &stale {
            match t.map.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) if is_enoent(&e) => {}
                Err(e) => {
                    return Err(InterceptError::bpf(
                        "removing a provider address from PROVIDER_TARGETS",
                        &e,
                    ));
                }
            }
            t.current.remove(key);
        }
        for key in &new {
            t.map.insert(key, target_flags::REDIRECT, 0).map_err(|e| {
                InterceptError::bpf("adding a provider address to PROVIDER_TARGETS", &e)
            })?;
            t.current.insert(*key);
        }
        if !new.is_empty() || !stale.is_empty() {
            tracing::debug!(
                added = new.len(),
                removed = stale.len(),
                total = t.current.len(),
                "provider targets updated"
            );
        }
        Ok(())
    }

    /// The origin of an accepted connection: `peer` is the client's address
    /// as the accepted socket sees it, `local` the listener address it
    /// arrived on. The client socket's cookie comes from the kernel's socket
    /// diagnostics (its four-tuple is known); the origin stays filed under it
    /// (`getpeername()` in the client reads it) until [`Intercept::forget`]
    /// or LRU eviction.
    pub fn origin(&self, peer: SocketAddr, local: SocketAddr) -> Option<ConnOrigin> {
        let cookie = match diag::socket_cookie(peer, local) {
            Ok(Some(cookie)) => cookie,
            Ok(None) => {
                tracing::debug!(%peer, "client socket gone before its origin was read");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot ask the kernel for the client socket (sock_diag)");
                return None;
            }
        };
        let origin = lock(&self.origins).get(&cookie, 0).ok()?;
        Some(ConnOrigin::from(&origin))
    }

    /// Drops the origin filed under `cookie` (the proxied connection ended).
    /// Absent entries are fine: the LRU may have evicted it.
    pub fn forget(&self, cookie: u64) {
        match lock(&self.origins).remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) if is_enoent(&e) => {}
            Err(e) => tracing::debug!(error = %e, "could not forget an origin (the LRU will)"),
        }
    }

    /// Sums of the per-CPU STATS counters.
    pub fn stats(&self) -> InterceptStats {
        let get = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
                .unwrap_or(0)
        };
        InterceptStats {
            redirected: get(stat::REDIRECTED),
            other_netns: get(stat::OTHER_NETNS),
            agent_self: get(stat::AGENT_SELF),
            udp_refused: get(stat::UDP_REFUSED),
            map_errors: get(stat::MAP_ERRORS),
            peername_restored: get(stat::PEERNAME_RESTORED),
        }
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

fn take_map<M>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<M, aya::maps::MapError>,
) -> Result<M, InterceptError> {
    let map = ebpf.take_map(name).ok_or_else(|| InterceptError::Bpf {
        action: format!("finding map {name} in the embedded eBPF object"),
        detail: "not present (agent and agent-ebpf are out of step)".to_owned(),
    })?;
    convert(map).map_err(|e| InterceptError::bpf(format!("opening map {name}"), &e))
}

fn is_enoent(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// Locks for one map syscall; a poisoned lock only means another thread
/// panicked between syscalls, and the map is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn intercept_can_be_shared() {
        assert_send_sync::<Intercept>();
    }

    #[tokio::test]
    async fn a_background_step_ends_at_stop_and_not_before() {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        assert_eq!(unless_stopped(async { 7 }, &mut rx).await, Some(7));
        // A change that is not a stop does not end it.
        let step = unless_stopped(
            tokio::time::sleep(std::time::Duration::from_millis(50)),
            &mut rx,
        );
        tx.send(false).unwrap();
        assert_eq!(step.await, Some(()));
        // A stop during the step ends it (the step would never finish).
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(true).unwrap();
            tx
        });
        assert_eq!(
            unless_stopped(std::future::pending::<()>(), &mut rx).await,
            None
        );
        // Already stopped, or the sender gone: at once.
        let tx = stopper.await.unwrap();
        assert_eq!(unless_stopped(async { 1 }, &mut rx).await, None);
        drop(tx);
        let (tx2, mut rx2) = tokio::sync::watch::channel(false);
        drop(tx2);
        assert_eq!(
            unless_stopped(std::future::pending::<()>(), &mut rx2).await,
            None
        );
    }
}
