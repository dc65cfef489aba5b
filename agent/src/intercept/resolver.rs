//! Provider host names → the addresses the kernel redirects.
//!
//! Owns: resolving the catalogue's hosts (A and AAAA, port 443) off the
//! request path, bounded in time, and the periodic refresh that keeps
//! `PROVIDER_TARGETS` current, redirecting every address a lookup gave in
//! the last hour (rotating DNS, see [`Remembered`]). Must never: redirect an address this host
//! has no route to (see [`redirected_addresses`]), stall start-up on a broken DNS (a
//! timeout per host, all hosts at once), leave a host that no lookup
//! answered (DNS not up yet at boot, a lost reply) out until the next
//! refresh (such hosts are looked up again from 5 s on, the wait doubling
//! up to the refresh), drop addresses that resolved
//! before because one refresh failed, or pile up blocked lookups: a
//! getaddrinfo call cannot be cancelled, so a host whose last lookup is
//! still blocked in its thread is not looked up again until it returns.
//! Otherwise a silent DNS and a short refresh would fill the blocking pool
//! that attribution shares.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{SocketAddr, ToSocketAddrs as _},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{StreamExt as _, stream};
use tokio::{sync::watch, task::JoinHandle};

use super::{Intercept, unless_stopped};

/// Provider host → the addresses the agent resolved for it and redirects,
/// kept current by the refresh: where the proxy connects when the address
/// a client dialed does not take the connection.
pub type KnownAddresses =
    Arc<std::sync::RwLock<std::collections::HashMap<String, Vec<SocketAddr>>>>;

/// Port the provider APIs are dialed on.
const HTTPS_PORT: u16 = 443;
/// Longest wait for one host's answer. The system resolver can take
/// 5 s × attempts × servers when DNS is unreachable; we do not wait for it.
const PER_HOST_TIMEOUT: Duration = Duration::from_secs(3);
/// Lookups in flight at once (each occupies a blocking thread in getaddrinfo).
const CONCURRENCY: usize = 64;
/// First wait before hosts that no lookup has answered yet (DNS not up
/// at boot, a lost reply) are looked up again, doubling up to the refresh.
const RETRY_FIRST: Duration = Duration::from_secs(5);

/// Resolves every host (A and AAAA, port 443) with the system resolver
/// (`tokio::net::lookup_host`), except hosts in `overrides`, which are taken
/// as given. A host that fails to resolve is logged at debug and skipped; if
/// `previous` has addresses for it, those are kept.
pub async fn resolve_targets(
    hosts: &[String],
    overrides: &BTreeMap<String, Vec<SocketAddr>>,
    previous: &BTreeMap<String, Vec<SocketAddr>>,
) -> BTreeMap<String, Vec<SocketAddr>> {
    resolve_targets_with(hosts, overrides, previous, |host| {
        (host, HTTPS_PORT).to_socket_addrs()
    })
    .await
}

/// [`resolve_targets`] with `lookup` in place of the system resolver.
async fn resolve_targets_with<F, I>(
    hosts: &[String],
    overrides: &BTreeMap<String, Vec<SocketAddr>>,
    previous: &BTreeMap<String, Vec<SocketAddr>>,
    lookup: F,
) -> BTreeMap<String, Vec<SocketAddr>>
where
    F: Fn(&str) -> std::io::Result<I> + Send + Sync + 'static,
    I: Iterator<Item = SocketAddr>,
{
    let mut out = BTreeMap::new();
    let mut to_look_up = Vec::new();
    for host in hosts {
        if let Some(addrs) = overrides.get(host) {
            out.insert(host.clone(), normalise(addrs.iter().copied()));
        } else if is_wildcard(host) {
            tracing::debug!(%host, "not resolving a wildcard host name");
        } else if !out.contains_key(host) && !to_look_up.contains(host) {
            to_look_up.push(host.clone());
        }
    }
    // Overrides for hosts that are not in the catalogue still count.
    for (host, addrs) in overrides {
        out.entry(host.clone())
            .or_insert_with(|| normalise(addrs.iter().copied()));
    }

    let results = look_up_all(to_look_up, PER_HOST_TIMEOUT, in_flight(), lookup).await;

    for (host, result) in results {
        match result {
            Ok(addrs) if !addrs.is_empty() => {
                out.insert(host, addrs);
            }
            other => {
                let reason = other.err().unwrap_or_else(|| "no addresses".to_owned());
                match previous.get(&host) {
                    Some(prev) if !prev.is_empty() => {
                        tracing::debug!(%host, %reason, kept = prev.len(), "resolution failed; keeping the previous addresses");
                        out.insert(host, prev.clone());
                    }
                    _ => tracing::debug!(%host, %reason, "resolution failed; host skipped"),
                }
            }
        }
    }
    out
}

/// The hosts of `hosts` (wildcards and overridden hosts aside) that no
/// lookup has answered: not redirected until one does.
fn unanswered(
    hosts: &[String],
    overrides: &BTreeMap<String, Vec<SocketAddr>>,
    answers: &Answers,
) -> Vec<String> {
    hosts
        .iter()
        .filter(|h| {
            !is_wildcard(h)
                && !overrides.contains_key(*h)
                && answers.get(*h).is_none_or(Vec::is_empty)
        })
        .cloned()
        .collect()
}

/// How long an address stays redirected after a lookup last returned it:
/// an hour, and at least three refreshes.
fn remember_for(refresh: Duration) -> Duration {
    (refresh * 3).max(Duration::from_secs(3600))
}

/// Addresses that earlier lookups returned, by host, with when each was
/// last seen. Providers behind rotating DNS (Google's front ends, AWS
/// endpoints) answer each query with another subset of a pool: a job's
/// lookup may return an address the agent's last lookup did not, and a
/// job keeps using what it looked up for its TTL. Redirecting every
/// address seen in the last hour covers far more of what jobs dial. An
/// address no longer the provider's costs nothing if kept: a connection
/// whose TLS names no provider host is passed through untouched.
#[derive(Default)]
struct Remembered {
    seen: BTreeMap<String, BTreeMap<SocketAddr, Instant>>,
    /// The last answers, which the next lookups fall back on (a host whose
    /// lookup fails keeps its last good answer while it fails). Not the
    /// remembered addresses: a failing host would keep all of them for ever.
    answers: BTreeMap<String, Vec<SocketAddr>>,
}

impl Remembered {
    /// The last answers: `previous` for [`resolve_targets`].
    fn answers(&self) -> &BTreeMap<String, Vec<SocketAddr>> {
        &self.answers
    }

    /// Notes `resolved` as seen `now`, forgets what was last seen more
    /// than `keep` ago, and returns every host's addresses still
    /// remembered (a superset of `resolved`).
    fn merge(
        &mut self,
        resolved: BTreeMap<String, Vec<SocketAddr>>,
        now: Instant,
        keep: Duration,
    ) -> BTreeMap<String, Vec<SocketAddr>> {
        self.answers = BTreeMap::new();
        self.add(resolved, now, keep)
    }

    /// The hosts of `resolved` that gave an address not remembered, having
    /// given others before: their DNS rotates through a pool the agent has
    /// not seen whole yet.
    fn rotating(&self, resolved: &Answers) -> Vec<String> {
        resolved
            .iter()
            .filter(|(host, addrs)| {
                self.seen
                    .get(*host)
                    .is_some_and(|seen| addrs.iter().any(|a| !seen.contains_key(a)))
            })
            .map(|(host, _)| host.clone())
            .collect()
    }

    /// As [`Remembered::merge`], for lookups of some hosts only (a retry
    /// of those without an answer): the other hosts' answers stay as they
    /// were, and so does when their addresses were last seen.
    fn add(
        &mut self,
        resolved: BTreeMap<String, Vec<SocketAddr>>,
        now: Instant,
        keep: Duration,
    ) -> BTreeMap<String, Vec<SocketAddr>> {
        for (host, addrs) in resolved {
            let seen = self.seen.entry(host.clone()).or_default();
            for a in &addrs {
                seen.insert(*a, now);
            }
            self.answers.insert(host, addrs);
        }
        self.seen.retain(|_, seen| {
            seen.retain(|_, at| now.saturating_duration_since(*at) <= keep);
            !seen.is_empty()
        });
        self.seen
            .iter()
            .map(|(host, seen)| (host.clone(), seen.keys().copied().collect()))
            .collect()
    }
}

/// Every address of every host, as `Intercept::set_targets` wants them.
pub fn all_addresses(resolved: &BTreeMap<String, Vec<SocketAddr>>) -> BTreeSet<SocketAddr> {
    resolved.values().flatten().copied().collect()
}

/// The addresses to redirect: every address of every host that this host
/// has a route to (see [`has_route`]). A provider's IPv6 addresses on a
/// runner without IPv6 egress are left out: a job's connect to one then
/// fails at once, and a client that tries a name's next address goes on to
/// it (one that tries only the first fails, as IPv6 may rank first; see
/// below). Redirected, the connect would succeed (to the local
/// listener), the client would not fall back, and the agent's own connect
/// upstream would fail: a 502 for every request. It matters more than it
/// seems, since the kernel refuses the UDP connects with which glibc ranks
/// a name's addresses, so a client sees no difference between the families
/// and tries IPv6 first. Which addresses are left out is logged when it
/// changes.
pub fn redirected_addresses(resolved: &BTreeMap<String, Vec<SocketAddr>>) -> BTreeSet<SocketAddr> {
    let (kept, left_out) = split_by_route(all_addresses(resolved), has_route);
    static LOGGED: Mutex<BTreeSet<SocketAddr>> = Mutex::new(BTreeSet::new());
    let mut logged = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
    if *logged != left_out {
        if left_out.is_empty() {
            tracing::info!("every provider address has a route again: all are redirected");
        } else {
            let list: Vec<String> = left_out.iter().map(ToString::to_string).collect();
            tracing::info!(
                addresses = %list.join(" "),
                "provider addresses this host has no route to are not redirected (connects to them fail as without the agent, and clients use the others)"
            );
        }
        *logged = left_out;
    }
    kept
}

/// Puts each host's redirected addresses (those of `resolved` in
/// `redirected`) in `known`.
pub fn publish(
    known: &KnownAddresses,
    resolved: &BTreeMap<String, Vec<SocketAddr>>,
    redirected: &BTreeSet<SocketAddr>,
) {
    let by_host = resolved
        .iter()
        .map(|(host, addrs)| {
            let kept = addrs.iter().filter(|a| redirected.contains(a)).copied();
            (host.clone(), kept.collect())
        })
        .collect();
    *known.write().unwrap_or_else(|p| p.into_inner()) = by_host;
}

/// Splits `all` into the addresses `route` says are reachable and the rest.
fn split_by_route(
    all: BTreeSet<SocketAddr>,
    route: impl Fn(&SocketAddr) -> bool,
) -> (BTreeSet<SocketAddr>, BTreeSet<SocketAddr>) {
    all.into_iter().partition(|a| route(a))
}

/// Port the route probe connects to: any port but a target's, so the
/// kernel programs (which refuse UDP to a target) never see the probe.
const PROBE_PORT: u16 = 9;

/// Whether the kernel has a route to `addr`: a UDP connect, which sends
/// nothing and only picks a route and a source address (glibc ranks a
/// name's addresses the same way). Only a definite "no route" (or an
/// address family the host lacks) counts as unreachable; any other error
/// keeps the address, so a probe that fails for another reason never takes
/// a provider out of interception.
pub(crate) fn has_route(addr: &SocketAddr) -> bool {
    use nix::errno::Errno;
    let mut probe = *addr;
    probe.set_port(if addr.port() == PROBE_PORT {
        PROBE_PORT + 1
    } else {
        PROBE_PORT
    });
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let reachable_despite = |e: std::io::Error| {
        let errno = e.raw_os_error().map(Errno::from_raw);
        !matches!(
            errno,
            Some(
                Errno::ENETUNREACH
                    | Errno::EHOSTUNREACH
                    | Errno::EADDRNOTAVAIL
                    | Errno::EAFNOSUPPORT
            )
        )
    };
    match std::net::UdpSocket::bind(local) {
        Ok(s) => s.connect(probe).map_or_else(reachable_despite, |()| true),
        Err(e) => reachable_despite(e),
    }
}

/// Spawns the periodic refresh: it applies `initial` at once (a no-op when
/// the caller already did), then every `refresh` re-resolves and calls
/// `intercept.set_targets` with the union; hosts no lookup has answered
/// yet are looked up again sooner (see [`RETRY_FIRST`]). It stops when
/// `shutdown` turns true (or its sender is dropped).
pub fn spawn_refresh(
    intercept: Arc<Intercept>,
    known: KnownAddresses,
    hosts: Vec<String>,
    overrides: BTreeMap<String, Vec<SocketAddr>>,
    refresh: Duration,
    initial: BTreeMap<String, Vec<SocketAddr>>,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let lookups = Lookups {
        hosts,
        overrides,
        refresh: refresh.max(Duration::from_secs(1)),
        retry_first: RETRY_FIRST,
        rotating_every: ROTATING_EVERY,
    };
    tokio::spawn(async move {
        lookups
            .run(
                initial,
                shutdown,
                |hosts, overrides, previous| async move {
                    resolve_targets(&hosts, &overrides, &previous).await
                },
                |targets| apply(&intercept, &known, targets),
            )
            .await;
        tracing::debug!("resolver refresh stopped");
    })
}

/// What the refresh looks up, and how often.
struct Lookups {
    hosts: Vec<String>,
    overrides: BTreeMap<String, Vec<SocketAddr>>,
    refresh: Duration,
    retry_first: Duration,
    /// How often a host whose DNS rotates is looked up between refreshes.
    rotating_every: Duration,
}

/// See [`Lookups::rotating_every`].
const ROTATING_EVERY: Duration = Duration::from_secs(30);
/// A rotating host is looked up between refreshes until this many lookups
/// in a row gave nothing new. DNS that answers each lookup with a random
/// few of a large pool repeats an address long before it has shown the
/// pool (and a caching resolver repeats its answer until the TTL): one
/// repeat says little.
const QUIET_LOOKUPS: u32 = 10;

type Answers = BTreeMap<String, Vec<SocketAddr>>;

impl Lookups {
    /// The refresh loop: `resolve(hosts, overrides, previous)` as
    /// [`resolve_targets`], `apply` given every address to redirect after
    /// each lookup that changed something.
    async fn run<R, F>(
        &self,
        initial: Answers,
        mut stop: watch::Receiver<bool>,
        mut resolve: R,
        mut apply: impl FnMut(&Answers),
    ) where
        R: FnMut(Vec<String>, Answers, Answers) -> F,
        F: std::future::Future<Output = Answers>,
    {
        let mut remembered = Remembered::default();
        let keep = remember_for(self.refresh);
        apply(&remembered.merge(initial, Instant::now(), keep));
        let stop = &mut stop;
        let mut next_refresh = tokio::time::Instant::now() + self.refresh;
        let mut retry = self.retry_first;
        // Hosts whose lookup gave an address not seen before (DNS rotating
        // through a pool), looked up again every `self.rotating_every`
        // until QUIET_LOOKUPS in a row gave nothing new (the count so far
        // by host): a job's own lookup may get any address of the pool,
        // and a connection to one not yet redirected goes direct for its
        // whole life.
        let mut rotating: BTreeMap<String, u32> = BTreeMap::new();
        let rotating_every = self.rotating_every.min(self.refresh);
        let mut next_rotating = next_refresh;
        loop {
            let missing = unanswered(&self.hosts, &self.overrides, remembered.answers());
            let mut wake = next_refresh;
            if missing.is_empty() {
                retry = self.retry_first;
            } else {
                wake = wake.min(tokio::time::Instant::now() + retry);
            }
            if !rotating.is_empty() {
                wake = wake.min(next_rotating);
            }
            if unless_stopped(tokio::time::sleep_until(wake), stop)
                .await
                .is_none()
            {
                return;
            }
            if wake == next_refresh {
                next_refresh = tokio::time::Instant::now() + self.refresh;
                let lookups = resolve(
                    self.hosts.clone(),
                    self.overrides.clone(),
                    remembered.answers().clone(),
                );
                let Some(next) = unless_stopped(lookups, stop).await else {
                    return;
                };
                for h in remembered.rotating(&next) {
                    rotating.insert(h, 0);
                }
                next_rotating = tokio::time::Instant::now() + rotating_every;
                apply(&remembered.merge(next, Instant::now(), keep));
                continue;
            }
            // Between refreshes: the hosts still without an answer and the
            // rotating ones, together.
            if !missing.is_empty() {
                retry = (retry * 2).min(self.refresh);
            }
            let mut hosts = missing.clone();
            hosts.extend(rotating.keys().filter(|h| !missing.contains(h)).cloned());
            next_rotating = tokio::time::Instant::now() + rotating_every;
            let lookups = resolve(hosts, Answers::new(), Answers::new());
            let Some(found) = unless_stopped(lookups, stop).await else {
                return;
            };
            // Those that showed new addresses start their quiet count again.
            let still = remembered.rotating(&found);
            for (h, quiet) in rotating.iter_mut() {
                *quiet = if still.contains(h) { 0 } else { *quiet + 1 };
            }
            rotating.retain(|_, quiet| *quiet < QUIET_LOOKUPS);
            let answered: Vec<&String> = found.keys().filter(|h| missing.contains(h)).collect();
            if !answered.is_empty() {
                tracing::info!(hosts = ?answered, "provider hosts resolved on a retry");
            }
            if !found.is_empty() {
                apply(&remembered.add(found, Instant::now(), keep));
            }
        }
    }
}

fn apply(
    intercept: &Intercept,
    known: &KnownAddresses,
    resolved: &BTreeMap<String, Vec<SocketAddr>>,
) {
    let all = redirected_addresses(resolved);
    publish(known, resolved, &all);
    if let Err(e) = intercept.set_targets(&all) {
        tracing::warn!(error = %e, addresses = all.len(), "could not update the provider address map");
    }
}

/// Hosts whose lookup thread has not returned yet, across refreshes.
type InFlight = Arc<Mutex<HashSet<String>>>;

/// The process's lookups in flight (getaddrinfo threads are the process's).
fn in_flight() -> InFlight {
    static SET: std::sync::OnceLock<InFlight> = std::sync::OnceLock::new();
    SET.get_or_init(InFlight::default).clone()
}

/// Takes `host` out of the in-flight set when its lookup thread returns,
/// whether or not anyone still waits for the answer.
struct Landed(InFlight, String);

impl Drop for Landed {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// Looks every host up at once (up to CONCURRENCY), each on a blocking
/// thread and bounded by `timeout`. A host whose previous lookup (recorded
/// in `busy`) has not returned is not looked up again: it fails at once.
async fn look_up_all<F, I>(
    hosts: Vec<String>,
    timeout: Duration,
    busy: InFlight,
    lookup: F,
) -> Vec<(String, Result<Vec<SocketAddr>, String>)>
where
    F: Fn(&str) -> std::io::Result<I> + Send + Sync + 'static,
    I: Iterator<Item = SocketAddr>,
{
    let lookup = Arc::new(lookup);
    stream::iter(hosts)
        .map(|host| {
            let started = busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(host.clone());
            let task = started.then(|| {
                let (lookup, landed) = (lookup.clone(), Landed(busy.clone(), host.clone()));
                tokio::task::spawn_blocking(move || lookup(&landed.1).map(normalise))
            });
            async move {
                let Some(task) = task else {
                    return (
                        host,
                        Err("the previous lookup has not returned yet".to_owned()),
                    );
                };
                let result = match tokio::time::timeout(timeout, task).await {
                    Ok(Ok(Ok(addrs))) => Ok(addrs),
                    Ok(Ok(Err(e))) => Err(e.to_string()),
                    Ok(Err(e)) => Err(format!("lookup failed: {e}")),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                (host, result)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

/// Sorted, deduplicated, v4-mapped IPv6 folded to IPv4, scope ids dropped.
fn normalise(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let set: BTreeSet<SocketAddr> = addrs
        .into_iter()
        .map(|a| match a {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::from((v4, v6.port())),
                None => SocketAddr::from((*v6.ip(), v6.port())),
            },
            v4 => v4,
        })
        .collect();
    set.into_iter().collect()
}

fn is_wildcard(host: &str) -> bool {
    host.contains('*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_without_an_answer_are_those_to_retry() {
        let hosts: Vec<String> = ["a.test", "b.test", "c.test", "*.d.test", "e.test"]
            .map(String::from)
            .into();
        let overrides = BTreeMap::from([("e.test".to_owned(), vec![])]);
        let answers = BTreeMap::from([
            ("a.test".to_owned(), vec![sa("10.0.0.1:443")]),
            ("b.test".to_owned(), vec![]),
        ]);
        assert_eq!(
            unanswered(&hosts, &overrides, &answers),
            vec!["b.test".to_owned(), "c.test".to_owned()],
            "an empty answer is none; wildcards are never looked up, overridden hosts never by DNS"
        );
    }

    #[test]
    fn a_retry_adds_its_answers_and_leaves_the_others_as_they_were() {
        let t0 = Instant::now();
        let keep = Duration::from_secs(3600);
        let mut r = Remembered::default();
        r.merge(
            BTreeMap::from([("a.test".to_owned(), vec![sa("10.0.0.1:443")])]),
            t0,
            keep,
        );
        let all = r.add(
            BTreeMap::from([("b.test".to_owned(), vec![sa("10.0.0.2:443")])]),
            t0 + Duration::from_secs(3000),
            keep,
        );
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(
            r.answers().len(),
            2,
            "a's answer is kept for the next fallback"
        );
        // a.test was last seen at t0: a full lookup 3601 s after it, which
        // no longer returns its address, forgets it; b's stays.
        let all = r.merge(BTreeMap::new(), t0 + Duration::from_secs(3601), keep);
        assert_eq!(
            all,
            BTreeMap::from([("b.test".to_owned(), vec![sa("10.0.0.2:443")])]),
            "the retry did not count as seeing a.test again"
        );
    }

    /// The refresh loop with a lookup that answers `a.test` from its
    /// second call on and never `b.test`: (the hosts of each call, every
    /// set of targets applied).
    async fn run_lookups(
        initial: Answers,
        calls_wanted: usize,
    ) -> (Vec<Vec<String>>, Vec<Answers>) {
        let lookups = Lookups {
            hosts: vec!["a.test".to_owned(), "b.test".to_owned()],
            overrides: BTreeMap::new(),
            refresh: Duration::from_secs(3600),
            retry_first: Duration::from_millis(20),
            rotating_every: ROTATING_EVERY,
        };
        let calls = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let applied = Arc::new(Mutex::new(Vec::new()));
        let run = lookups.run(
            initial,
            stop_rx,
            |hosts, _, _| {
                let calls = calls.clone();
                async move {
                    let mut calls = calls.lock().unwrap();
                    calls.push(hosts.clone());
                    let mut out = Answers::new();
                    if calls.len() >= 2 && hosts.iter().any(|h| h == "a.test") {
                        out.insert("a.test".to_owned(), vec![sa("10.0.0.1:443")]);
                    }
                    out
                }
            },
            |targets| applied.lock().unwrap().push(targets.clone()),
        );
        let watch = async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while calls.lock().unwrap().len() < calls_wanted
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop_tx.send(true).unwrap();
        };
        tokio::join!(run, watch);
        let calls = calls.lock().unwrap().clone();
        let applied = applied.lock().unwrap().clone();
        (calls, applied)
    }

    #[tokio::test(start_paused = true)]
    async fn hosts_no_lookup_answered_are_looked_up_again_before_the_refresh() {
        let (calls, applied) = run_lookups(Answers::new(), 3).await;
        let both = vec!["a.test".to_owned(), "b.test".to_owned()];
        assert_eq!(
            calls[..3],
            [both.clone(), both, vec!["b.test".to_owned()]],
            "both retried, then only the one still without an answer"
        );
        assert_eq!(
            applied.last().unwrap(),
            &BTreeMap::from([("a.test".to_owned(), vec![sa("10.0.0.1:443")])]),
            "a.test is redirected from its first answer on"
        );
        assert_eq!(
            applied.len(),
            2,
            "applied at start and when a.test answered: {applied:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hosts_all_answered_wait_for_the_refresh() {
        let initial = BTreeMap::from([
            ("a.test".to_owned(), vec![sa("10.0.0.1:443")]),
            ("b.test".to_owned(), vec![sa("10.0.0.2:443")]),
        ]);
        let run = run_lookups(initial, 1);
        // The loop retries after 20 ms when a host is missing; with every
        // host answered it must not look anything up until the hour's
        // refresh: none in the 29 s before the harness gives up waiting
        // for one at 30 s (the clock is paused: it jumps from timer to
        // timer, so those seconds pass at once, and exactly).
        let within = tokio::time::timeout(Duration::from_secs(29), run).await;
        assert!(within.is_err(), "no lookup before the refresh: {within:?}");
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A host whose DNS answers each lookup with the next address of a
    /// pool of six: once a refresh shows it rotating, it is looked up again
    /// between refreshes until every address of the pool is redirected and
    /// QUIET_LOOKUPS more showed nothing new, and then left alone until
    /// the next refresh.
    #[tokio::test(start_paused = true)]
    async fn a_host_whose_dns_rotates_is_looked_up_until_its_pool_is_known() {
        let pool: Vec<SocketAddr> = (1..=6).map(|i| sa(&format!("10.0.0.{i}:443"))).collect();
        let lookups = Lookups {
            hosts: vec!["a.test".to_owned()],
            overrides: BTreeMap::new(),
            refresh: Duration::from_secs(2),
            retry_first: Duration::from_millis(20),
            rotating_every: Duration::from_millis(20),
        };
        let calls = Arc::new(Mutex::new(0usize));
        let (stop_tx, stop_rx) = watch::channel(false);
        let applied = Arc::new(Mutex::new(Vec::<Answers>::new()));
        let initial = BTreeMap::from([("a.test".to_owned(), vec![pool[0]])]);
        let run = lookups.run(
            initial,
            stop_rx,
            |hosts, _, _| {
                let (calls, pool) = (calls.clone(), pool.clone());
                async move {
                    let mut n = calls.lock().unwrap();
                    *n += 1;
                    let mut out = Answers::new();
                    if hosts.iter().any(|h| h == "a.test") {
                        out.insert("a.test".to_owned(), vec![pool[*n % pool.len()]]);
                    }
                    out
                }
            },
            |targets| applied.lock().unwrap().push(targets.clone()),
        );
        let watch = async {
            // One refresh (2 s), the lookups it starts, and time to spare
            // before the next (paused time: exactly 3.5 s pass).
            tokio::time::sleep(Duration::from_millis(3500)).await;
            stop_tx.send(true).unwrap();
        };
        tokio::join!(run, watch);
        let last = applied.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            last["a.test"], pool,
            "every address of the pool is redirected"
        );
        // The refresh, one lookup per new address, then QUIET_LOOKUPS that
        // showed nothing new: not a lookup every 20 ms for the rest of the
        // time.
        let calls = *calls.lock().unwrap();
        let quiet = QUIET_LOOKUPS as usize;
        assert!((5 + quiet..=8 + quiet).contains(&calls), "{calls} lookups");
    }

    /// DNS that answers each lookup with one random address of a pool of
    /// 20 (Google's and AWS's front ends answer with a few of many): a
    /// repeat comes long before the pool is known, so one repeat does not
    /// end the lookups between refreshes. Paused time, seeded draws: the
    /// figures are the same on every run.
    #[tokio::test(start_paused = true)]
    async fn a_host_answering_at_random_from_a_large_pool_is_learnt() {
        let pool: Vec<SocketAddr> = (1..=20).map(|i| sa(&format!("10.1.0.{i}:443"))).collect();
        let known_after = |secs: u64, seed: u64| {
            let pool = pool.clone();
            async move {
                let lookups = Lookups {
                    hosts: vec!["a.test".to_owned()],
                    overrides: BTreeMap::new(),
                    refresh: Duration::from_secs(300),
                    retry_first: Duration::from_secs(5),
                    rotating_every: ROTATING_EVERY,
                };
                let state = Arc::new(Mutex::new(seed));
                let (stop_tx, stop_rx) = watch::channel(false);
                let applied = Arc::new(Mutex::new(0usize));
                let initial = BTreeMap::from([("a.test".to_owned(), vec![pool[0]])]);
                let run = lookups.run(
                    initial,
                    stop_rx,
                    |hosts, _, _| {
                        let (state, pool) = (state.clone(), pool.clone());
                        async move {
                            let mut x = state.lock().unwrap();
                            // A 64-bit LCG (Knuth's MMIX constants).
                            *x = x
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let mut out = Answers::new();
                            if hosts.iter().any(|h| h == "a.test") {
                                let i = (*x >> 33) as usize % pool.len();
                                out.insert("a.test".to_owned(), vec![pool[i]]);
                            }
                            out
                        }
                    },
                    |targets| *applied.lock().unwrap() = targets["a.test"].len(),
                );
                let watch = async {
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    stop_tx.send(true).unwrap();
                };
                tokio::join!(run, watch);
                *applied.lock().unwrap()
            }
        };
        let mut at_10_min = 0;
        let mut at_1_hour = 0;
        for seed in 1..=20u64 {
            at_10_min += known_after(599, seed).await;
            at_1_hour += known_after(3599, seed).await;
        }
        // One repeat ending the lookups knew 5.0 and 14.4 of 20 on average;
        // ten in a row, 7.85 and 18.9.
        assert!(at_10_min >= 20 * 7, "{at_10_min} of 400 after 10 minutes");
        assert!(at_1_hour >= 20 * 18, "{at_1_hour} of 400 after an hour");
    }

    #[test]
    fn addresses_are_remembered_for_a_while_after_a_lookup_last_gave_them() {
        let mut r = Remembered::default();
        let keep = remember_for(Duration::from_secs(300));
        assert_eq!(keep, Duration::from_secs(3600));
        assert_eq!(
            remember_for(Duration::from_secs(7200)),
            Duration::from_secs(21600)
        );
        let t0 = Instant::now();
        let at = |mins: u64| t0 + Duration::from_secs(mins * 60);
        let one = |host: &str, addrs: &[&str]| {
            BTreeMap::from([(host.to_owned(), addrs.iter().map(|a| sa(a)).collect())])
        };
        let host = "generativelanguage.googleapis.com";
        let got = r.merge(one(host, &["192.0.2.1:443"]), at(0), keep);
        assert_eq!(got[host], [sa("192.0.2.1:443")]);
        // A rotating answer: both are redirected.
        let got = r.merge(one(host, &["192.0.2.2:443"]), at(5), keep);
        assert_eq!(got[host], [sa("192.0.2.1:443"), sa("192.0.2.2:443")]);
        // Another host's lookup does not refresh this one's addresses.
        let got = r.merge(one("api.openai.com", &["192.0.2.9:443"]), at(50), keep);
        assert_eq!(got[host].len(), 2);
        assert_eq!(got["api.openai.com"], [sa("192.0.2.9:443")]);
        // An hour after it was last seen, the first goes; the second,
        // seen again, stays.
        let got = r.merge(one(host, &["192.0.2.2:443"]), at(61), keep);
        assert_eq!(got[host], [sa("192.0.2.2:443")]);
        // A host unseen for longer than that is forgotten whole.
        let got = r.merge(BTreeMap::new(), at(111), keep);
        assert!(!got.contains_key("api.openai.com"), "{got:?}");
        assert_eq!(got[host], [sa("192.0.2.2:443")]);
    }

    /// A lookup that fails as getaddrinfo does for a name that does not
    /// exist (the tests send no query to the host's DNS).
    fn no_such_host(_: &str) -> std::io::Result<std::vec::IntoIter<SocketAddr>> {
        Err(std::io::Error::other("Name or service not known"))
    }

    #[tokio::test]
    async fn a_host_whose_lookups_fail_keeps_its_last_answer_not_everything_remembered() {
        let host = "gone.invalid".to_owned();
        let keep = Duration::from_secs(3600);
        let t0 = Instant::now();
        let at = |mins: u64| t0 + Duration::from_secs(mins * 60);
        let mut r = Remembered::default();
        r.merge(
            BTreeMap::from([(host.clone(), vec![sa("192.0.2.1:443")])]),
            at(0),
            keep,
        );
        r.merge(
            BTreeMap::from([(host.clone(), vec![sa("192.0.2.2:443")])]),
            at(5),
            keep,
        );
        assert_eq!(r.answers()[&host], [sa("192.0.2.2:443")]);
        // Now its lookups fail: the last answer is kept, and the address
        // seen before it expires on time.
        let next = resolve_targets_with(
            std::slice::from_ref(&host),
            &BTreeMap::new(),
            r.answers(),
            no_such_host,
        )
        .await;
        assert_eq!(next[&host], [sa("192.0.2.2:443")]);
        let got = r.merge(next, at(70), keep);
        assert_eq!(got[&host], [sa("192.0.2.2:443")]);
    }

    #[test]
    fn addresses_without_a_route_are_left_out() {
        let all = BTreeSet::from([
            sa("127.0.0.77:443"),
            sa("[2001:db8::1]:443"),
            sa("[::1]:443"),
        ]);
        let (kept, left) = split_by_route(all, |a| a.is_ipv4() || a.ip().is_loopback());
        assert_eq!(
            kept,
            BTreeSet::from([sa("127.0.0.77:443"), sa("[::1]:443")])
        );
        assert_eq!(left, BTreeSet::from([sa("[2001:db8::1]:443")]));
        // This host reaches its own loopback, on any port.
        assert!(has_route(&sa("127.0.0.1:443")));
        assert!(has_route(&sa("127.0.0.1:9")));
    }

    /// The probe asks the kernel: in a network namespace of its own, with
    /// its loopback down and no routes, nothing is reachable (an IPv4-only
    /// runner is the same for IPv6).
    #[test]
    #[ignore = "needs root (a network namespace of its own)"]
    fn the_route_probe_sees_a_namespace_without_routes() {
        let here = sa("127.0.0.1:443");
        let unreachable = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET) needs root");
            [
                here,
                sa("[2001:db8::1]:443"),
                sa("192.0.2.7:443"),
                sa("[::1]:443"),
            ]
            .iter()
            .filter(|a| has_route(a))
            .copied()
            .collect::<Vec<_>>()
        })
        .join()
        .unwrap();
        assert_eq!(
            unreachable,
            Vec::<SocketAddr>::new(),
            "reachable in an empty namespace"
        );
        assert!(has_route(&here), "the test's own namespace is untouched");
    }

    #[tokio::test]
    async fn overrides_are_taken_as_given() {
        let hosts = vec!["api.openai.com".to_owned()];
        let overrides = BTreeMap::from([(
            "api.openai.com".to_owned(),
            vec![sa("127.0.0.77:443"), sa("[::1]:8443"), sa("127.0.0.77:443")],
        )]);
        let out = resolve_targets(&hosts, &overrides, &BTreeMap::new()).await;
        assert_eq!(
            out["api.openai.com"],
            vec![sa("127.0.0.77:443"), sa("[::1]:8443")]
        );
    }

    #[tokio::test]
    async fn literal_addresses_resolve_without_dns() {
        let hosts = vec!["127.0.0.9".to_owned(), "::1".to_owned()];
        let out = resolve_targets(&hosts, &BTreeMap::new(), &BTreeMap::new()).await;
        assert_eq!(out["127.0.0.9"], vec![sa("127.0.0.9:443")]);
        assert_eq!(out["::1"], vec![sa("[::1]:443")]);
    }

    #[tokio::test]
    async fn failure_keeps_previous_addresses() {
        let hosts = vec!["gone.invalid".to_owned(), "never.invalid".to_owned()];
        let previous = BTreeMap::from([("gone.invalid".to_owned(), vec![sa("10.1.2.3:443")])]);
        let out = resolve_targets_with(&hosts, &BTreeMap::new(), &previous, no_such_host).await;
        assert_eq!(out.get("gone.invalid"), Some(&vec![sa("10.1.2.3:443")]));
        assert!(
            !out.contains_key("never.invalid"),
            "a host that never resolved is skipped"
        );
    }

    #[tokio::test]
    async fn wildcards_are_skipped() {
        let hosts = vec!["*.openai.azure.com".to_owned()];
        let out = resolve_targets(&hosts, &BTreeMap::new(), &BTreeMap::new()).await;
        assert!(out.is_empty());
    }

    type Lookup =
        Arc<dyn Fn(&str) -> std::io::Result<std::vec::IntoIter<SocketAddr>> + Send + Sync>;

    /// A lookup that blocks its thread until `release` is dropped, counting
    /// its calls, as getaddrinfo does on a resolver that drops packets.
    fn silent(
        calls: &Arc<std::sync::atomic::AtomicUsize>,
    ) -> (std::sync::mpsc::SyncSender<()>, Lookup) {
        let (release, wait) = std::sync::mpsc::sync_channel::<()>(0);
        let wait = Mutex::new(wait);
        let calls = calls.clone();
        let lookup = move |_: &str| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Err once `release` is dropped.
            let _ = wait.lock().unwrap().recv();
            Err(std::io::Error::other("released"))
        };
        (release, Arc::new(lookup))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn silent_lookups_end_with_their_timeout() {
        // 80 hosts whose lookups never answer: each ends with its timeout,
        // and they run at once (one at a time would take 80 timeouts).
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, lookup) = silent(&calls);
        let hosts: Vec<String> = (0..80).map(|i| format!("h{i}.example")).collect();
        let busy = InFlight::default();
        let out = look_up_all(hosts, Duration::from_millis(50), busy, move |h: &str| {
            lookup(h)
        })
        .await;
        assert_eq!(out.len(), 80);
        for (host, r) in out {
            let e = r.expect_err("a silent lookup cannot succeed");
            assert!(e.contains("no answer within"), "{host}: {e}");
        }
        drop(release);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_blocked_lookup_is_not_started_again_until_it_returns() {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (release, lookup) = silent(&calls);
        let hosts = vec!["slow.example".to_owned()];
        let busy = InFlight::default();
        let run = |lookup: Lookup, timeout: Duration| {
            look_up_all(hosts.clone(), timeout, busy.clone(), move |h: &str| {
                lookup(h)
            })
        };
        let short = Duration::from_millis(50);
        let first = run(lookup.clone(), short).await;
        assert!(
            first[0]
                .1
                .as_ref()
                .unwrap_err()
                .contains("no answer within")
        );
        // A refresh while the first lookup still blocks its thread: no new
        // thread, an error at once.
        let second = run(lookup.clone(), short).await;
        assert!(
            second[0]
                .1
                .as_ref()
                .unwrap_err()
                .contains("has not returned"),
            "{second:?}"
        );
        // (The first lookup's thread may start after its 50 ms are up.)
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while calls.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "never looked up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Once it returns, the host is looked up again.
        drop(release);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !busy.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the lookup never landed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Time enough for a blocking thread to start on a loaded machine:
        // this checks that it is looked up again, not how fast.
        let third = run(lookup, Duration::from_secs(10)).await;
        assert!(
            third[0].1.as_ref().unwrap_err().contains("released"),
            "{third:?}"
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn normalise_folds_mapped_and_dedups() {
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            443,
            0,
            2,
        ));
        let out = normalise([sa("[::ffff:1.2.3.4]:443"), sa("1.2.3.4:443"), scoped]);
        assert_eq!(out, vec![sa("1.2.3.4:443"), sa("[fe80::1]:443")]);
    }

    #[test]
    fn union_of_all_hosts() {
        let m = BTreeMap::from([
            ("a".to_owned(), vec![sa("1.1.1.1:443"), sa("2.2.2.2:443")]),
            ("b".to_owned(), vec![sa("2.2.2.2:443")]),
        ]);
        assert_eq!(all_addresses(&m).len(), 2);
    }
}
