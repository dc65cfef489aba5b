//! Provider host names → the addresses the kernel redirects.
//!
//! Owns: resolving the catalogue's hosts (A and AAAA, port 443) off the
//! request path, bounded in time, and the periodic refresh that keeps
//! `PROVIDER_TARGETS` current. Must never: stall start-up on a broken DNS (a
//! timeout per host, all hosts at once), or drop addresses that resolved
//! before because one refresh failed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use futures_util::{StreamExt as _, stream};
use tokio::{sync::watch, task::JoinHandle};

use super::Intercept;

/// Port the provider APIs are dialed on.
const HTTPS_PORT: u16 = 443;
/// Longest wait for one host's answer. The system resolver can take
/// 5 s × attempts × servers when DNS is unreachable; we do not wait for it.
const PER_HOST_TIMEOUT: Duration = Duration::from_secs(3);
/// Lookups in flight at once (each occupies a blocking thread in getaddrinfo).
const CONCURRENCY: usize = 64;

/// Resolves every host (A and AAAA, port 443) with the system resolver
/// (`tokio::net::lookup_host`), except hosts in `overrides`, which are taken
/// as given. A host that fails to resolve is logged at debug and skipped; if
/// `previous` has addresses for it, those are kept.
pub async fn resolve_targets(
    hosts: &[String],
    overrides: &BTreeMap<String, Vec<SocketAddr>>,
    previous: &BTreeMap<String, Vec<SocketAddr>>,
) -> BTreeMap<String, Vec<SocketAddr>> {
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

    let results = look_up_all(to_look_up, PER_HOST_TIMEOUT, |host| {
        tokio::net::lookup_host((host, HTTPS_PORT))
    })
    .await;

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

/// Every address of every host, as `Intercept::set_targets` wants them.
pub fn all_addresses(resolved: &BTreeMap<String, Vec<SocketAddr>>) -> BTreeSet<SocketAddr> {
    resolved.values().flatten().copied().collect()
}

/// Spawns the periodic refresh: it applies `initial` at once (a no-op when
/// the caller already did), then every `refresh` re-resolves and calls
/// `intercept.set_targets` with the union; it stops when `shutdown` turns
/// true (or its sender is dropped).
pub fn spawn_refresh(
    intercept: Arc<Intercept>,
    hosts: Vec<String>,
    overrides: BTreeMap<String, Vec<SocketAddr>>,
    refresh: Duration,
    initial: BTreeMap<String, Vec<SocketAddr>>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut current = initial;
        apply(&intercept, &current);
        let refresh = refresh.max(Duration::from_secs(1));
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(refresh) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            }
            let next = tokio::select! {
                next = resolve_targets(&hosts, &overrides, &current) => next,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            current = next;
            apply(&intercept, &current);
        }
        tracing::debug!("resolver refresh stopped");
    })
}

fn apply(intercept: &Intercept, resolved: &BTreeMap<String, Vec<SocketAddr>>) {
    let all = all_addresses(resolved);
    if let Err(e) = intercept.set_targets(&all) {
        tracing::warn!(error = %e, addresses = all.len(), "could not update the provider address map");
    }
}

/// Looks every host up at once (up to CONCURRENCY), each bounded by `timeout`.
async fn look_up_all<F, Fut, I>(
    hosts: Vec<String>,
    timeout: Duration,
    lookup: F,
) -> Vec<(String, Result<Vec<SocketAddr>, String>)>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = std::io::Result<I>>,
    I: Iterator<Item = SocketAddr>,
{
    stream::iter(hosts)
        .map(|host| {
            let lookup = lookup(host.clone());
            async move {
                let result = match tokio::time::timeout(timeout, lookup).await {
                    Ok(Ok(addrs)) => Ok(normalise(addrs)),
                    Ok(Err(e)) => Err(e.to_string()),
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

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
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
        // `.invalid` never resolves (RFC 6761).
        let hosts = vec!["gone.invalid".to_owned(), "never.invalid".to_owned()];
        let previous = BTreeMap::from([("gone.invalid".to_owned(), vec![sa("10.1.2.3:443")])]);
        let out = resolve_targets(&hosts, &BTreeMap::new(), &previous).await;
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

    #[tokio::test]
    async fn silent_lookups_end_with_their_timeout() {
        // 80 hosts whose lookups never answer, as on a closed network with a
        // resolver that drops packets: each ends with its timeout, and all
        // run at once (with one at a time this would take 80 timeouts).
        let hosts: Vec<String> = (0..80).map(|i| format!("h{i}.example")).collect();
        let out = look_up_all(hosts, Duration::from_millis(50), |_| {
            std::future::pending::<std::io::Result<std::vec::IntoIter<SocketAddr>>>()
        })
        .await;
        assert_eq!(out.len(), 80);
        for (host, r) in out {
            let e = r.expect_err("a silent lookup cannot succeed");
            assert!(e.contains("no answer within"), "{host}: {e}");
        }
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
