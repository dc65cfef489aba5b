//! The local certificate authority that signs the leaves the proxy shows to
//! intercepted clients.
//!
//! Owns: `STATE/ca/` (the root certificate clients trust, the intermediate
//! that signs leaves and its key, the record of the hosts they cover, the
//! trust bundle `bundle.pem`), minting and caching leaf certificates, and
//! the rustls server configuration built on them.
//!
//! The CA is generated on this host and never leaves it. Both certificates
//! carry critical X.509 name constraints: the permitted DNS subtrees are
//! exactly the provider hosts, and every IPv4 and IPv6 address is excluded
//! (a DNS-only constraint leaves IP names unconstrained). The root's key
//! signs the intermediate and is then dropped, never written: the one key
//! on disk (`ca.key`, mode 0600) is the intermediate's, and every verifier
//! applies an intermediate's constraints, including Java's, which ignores
//! those of a trusted root. So a stolen key cannot mint a certificate that
//! clients accept for any other site. A CA made before intermediates (root
//! key in `ca.key`, no `intermediate.crt`) is still used, with a warning.
//!
//! Leaves are minted here rather than by hudsucker's `RcgenAuthority`, which
//! sends a leaf without its intermediate and uses the CA's own key as every
//! leaf's key; here each process has one leaf key of its own, kept in memory.
//!
//! Must never: create a CA without name constraints, mint a leaf for a host
//! outside them, write a key anywhere but `ca.key` (the root's nowhere), log
//! key material, or leave a half-written file behind (every write is temp
//! file, fsync, rename).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// CA validity.
const CA_VALIDITY_DAYS: i64 = 3650;
/// A CA expiring sooner than this is replaced: leaves it mints
/// live 365 days and must not outlive it.
const CA_MIN_REMAINING_DAYS: i64 = 400;
/// Leaf validity; a cached leaf is minted again long before it ends.
const LEAF_VALIDITY_DAYS: i64 = 365;
const LEAF_REMINT: Duration = Duration::from_secs(30 * 86_400);
/// System trust bundles, first existing wins.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

const KEY_FILE: &str = "ca.key";
pub(crate) const CERT_FILE: &str = "ca.crt";
pub(crate) const OLD_CERT_FILE: &str = "ca.crt.old";
/// The intermediate certificate, which `ca.key` belongs to.
const INTERMEDIATE_FILE: &str = "intermediate.crt";
const HOSTS_FILE: &str = "hosts.json";
pub(crate) const BUNDLE_FILE: &str = "bundle.pem";
/// The CA's directory under the state directory.
pub(crate) const CA_DIR: &str = "ca";
const LOCK_FILE: &str = ".lock";

/// What `load_or_create` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaStatus {
    /// An existing CA covering every host was loaded.
    Loaded,
    /// No CA existed; a new one was created.
    Created,
    /// The existing CA did not cover every host (or was unusable: why, in
    /// `unusable`) and was replaced; the old certificate is kept as
    /// `ca.crt.old`. Clients must trust the new one: run `tollgate trust
    /// install` again.
    Regenerated {
        added_hosts: Vec<String>,
        unusable: Option<String>,
    },
}

/// Errors of the CA. Each says what failed, where, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "no provider hosts to put in the local CA's name constraints; a CA without them is never created"
    )]
    NoHosts,
    #[error("`{host}` cannot be put in the local CA's name constraints: {reason}")]
    InvalidHost { host: String, reason: String },
    #[error(
        "permission denied: cannot {action} {}: {source}; run tollgate as root (the CA key is readable by root only)",
        path.display()
    )]
    Permission {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot generate the local CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("`{host}` is outside the local CA's name constraints; no certificate is minted for it")]
    NotCovered { host: String },
    #[error("cannot build a TLS server configuration with the local CA: {0}")]
    Tls(rustls::Error),
    #[error(
        "there is no local CA in {} yet, and only root can create it: start the agent, or run this command as root",
        dir.display()
    )]
    NotCreated { dir: PathBuf },
    #[error(
        "the local CA exists, but {} cannot be read by this user; make the state directory readable by all (chmod 755), or run this command as root",
        path.display()
    )]
    Unreadable { path: PathBuf },
    #[error(
        "{} {why}: whoever can write the local CA's files can put a CA of their own there (its key included), which `trust install` would make this host trust; make them root's alone (chown root: and chmod go-w), or remove the ca directory to start afresh",
        path.display()
    )]
    Unsafe { path: PathBuf, why: String },
}

impl CaError {
    /// Process exit code (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            CaError::Permission { .. }
            | CaError::NotCreated { .. }
            | CaError::Unreadable { .. }
            | CaError::Unsafe { .. } => crate::exit::NOPERM,
            CaError::NoHosts | CaError::InvalidHost { .. } => crate::exit::USAGE,
            CaError::Io { .. } => crate::exit::UNAVAILABLE,
            CaError::Generate(_) | CaError::NotCovered { .. } | CaError::Tls(_) => {
                crate::exit::SOFTWARE
            }
        }
    }

    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> CaError {
        let path = path.to_path_buf();
        if source.kind() == io::ErrorKind::PermissionDenied {
            CaError::Permission {
                action,
                path,
                source,
            }
        } else {
            CaError::Io {
                action,
                path,
                source,
            }
        }
    }
}

/// The loaded CA and what mints leaves with it.
pub struct LocalCa {
    cert_path: PathBuf,
    bundle_path: PathBuf,
    /// The root certificate (what clients trust).
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    /// Hosts in the certificates' permitted DNS subtrees.
    covered: BTreeSet<String>,
    minter: Minter,
}

/// Mints leaves signed by the signing certificate (the intermediate, or
/// the root of a CA made before intermediates) and caches their server
/// configurations by host.
struct Minter {
    issuer: Issuer<'static, KeyPair>,
    /// Sent after the leaf: the intermediate (empty for an older CA).
    chain: Vec<CertificateDer<'static>>,
    /// The key of every leaf this process mints; never written.
    leaf_key: KeyPair,
    cache: Mutex<HashMap<String, Minted>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// When the CA (root or intermediate, the earlier) ends, in Unix
    /// seconds: no leaf outlives it, however long the agent runs.
    ca_not_after: i64,
    /// When the CA (root or intermediate, the later) starts, in Unix
    /// seconds.
    ca_not_before: i64,
}

/// Whether the kernel says the clock is synchronised (`adjtimex`: not
/// `TIME_ERROR`, no `STA_UNSYNC`); `None` when it cannot tell.
fn clock_synchronised() -> Option<bool> {
    // SAFETY: `adjtimex` with `modes` 0 only reads into `tx`.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    match state {
        -1 => None,
        libc::TIME_ERROR => Some(false),
        _ => Some(tx.status & libc::STA_UNSYNC == 0),
    }
}

/// How long after boot a clock the kernel does not call synchronised may
/// still be behind: a runner booted before NTP set the time. Later, NTP
/// has had its chance; and many hosts never tell the kernel the clock is
/// synchronised (no NTP daemon that disciplines it, a one-off `sntp`), so
/// that alone is no sign of a clock that is behind.
const CLOCK_GRACE: Duration = Duration::from_secs(15 * 60);

/// Whether the clock may be behind (see [`CLOCK_GRACE`]): then a CA that
/// starts after it is kept rather than replaced.
fn clock_may_be_behind() -> bool {
    clock_synchronised() != Some(true) && booted_within(CLOCK_GRACE)
}

/// Whether the host booted less than `d` ago (`CLOCK_BOOTTIME`).
fn booted_within(d: Duration) -> bool {
    uptime().is_some_and(|up| up < d)
}

/// Time since boot (`CLOCK_BOOTTIME`).
fn uptime() -> Option<Duration> {
    // SAFETY: `clock_gettime` only writes into `ts`.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0;
    ok.then(|| Duration::from_secs(u64::try_from(ts.tv_sec).unwrap_or(0)))
}

/// When to look again at a CA kept though it starts after the clock
/// (`now` < `ca_not_before`, Unix seconds): once [`CLOCK_GRACE`] after
/// boot has passed, `up` being the time since boot. `None` for a CA that
/// has started.
fn recheck_in(now: i64, ca_not_before: i64, up: Duration) -> Option<Duration> {
    (now < ca_not_before).then(|| CLOCK_GRACE.saturating_sub(up))
}

/// A cached leaf's server configuration, with when it was minted (on the
/// monotonic clock) and its validity (Unix seconds, on the wall clock it
/// was minted by).
struct Minted {
    made: Instant,
    not_before: i64,
    not_after: i64,
    /// Its end is the CA's: minting again would not make it last longer.
    capped: bool,
    config: Arc<rustls::ServerConfig>,
}

impl Minted {
    /// Whether it is still the one to present at wall-clock time `now`:
    /// minted less than `LEAF_REMINT` ago, and valid at `now` with an hour
    /// to spare. A wall clock that stepped since (a runner that booted with
    /// its clock hours off, then corrected by NTP) would otherwise keep a
    /// leaf that clients take as not yet valid, or expired, for 30 days.
    fn fresh(&self, now: i64) -> bool {
        self.made.elapsed() < LEAF_REMINT
            && self.not_before <= now
            && (now + 3600 < self.not_after || self.capped)
    }
}

impl Minter {
    fn new(
        issuer: Issuer<'static, KeyPair>,
        chain: Vec<CertificateDer<'static>>,
        (ca_not_before, ca_not_after): (i64, i64),
    ) -> Result<Minter, CaError> {
        Ok(Minter {
            ca_not_after,
            ca_not_before,
            issuer,
            chain,
            leaf_key: KeyPair::generate()?,
            cache: Mutex::new(HashMap::new()),
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        })
    }

    /// A leaf for `host` (which the caller checked is covered), with its
    /// validity (Unix seconds).
    fn leaf(&self, host: &str) -> Result<(CertificateDer<'static>, i64, i64), CaError> {
        self.leaf_at(host, time::OffsetDateTime::now_utc())
    }

    /// As [`Minter::leaf`], valid around `now`.
    fn leaf_at(
        &self,
        host: &str,
        now: time::OffsetDateTime,
    ) -> Result<(CertificateDer<'static>, i64, i64), CaError> {
        let mut params = CertificateParams::default();
        let mut serial = [0u8; 16];
        self.provider
            .secure_random
            .fill(&mut serial)
            .map_err(|_| CaError::Generate(rcgen::Error::RingUnspecified))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(serial.to_vec().into());
        params.not_before = now - time::Duration::hours(1);
        params.not_after = (now + time::Duration::days(LEAF_VALIDITY_DAYS))
            .min(time::OffsetDateTime::from_unix_timestamp(self.ca_not_after).unwrap_or(now));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        let name = host
            .to_string()
            .try_into()
            .map_err(|_| CaError::InvalidHost {
                host: host.to_string(),
                reason: "not an IA5 string".into(),
            })?;
        params.subject_alt_names = vec![SanType::DnsName(name)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after) = (
            params.not_before.unix_timestamp(),
            params.not_after.unix_timestamp(),
        );
        Ok((
            params.signed_by(&self.leaf_key, &self.issuer)?.into(),
            not_before,
            not_after,
        ))
    }

    /// The server configuration for `host`: minted once, then cached (and
    /// minted again after `LEAF_REMINT`).
    fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let cached = |cache: &HashMap<String, Minted>| {
            cache
                .get(host)
                .filter(|m| m.fresh(now))
                .map(|m| Arc::clone(&m.config))
        };
        if let Some(cfg) = cached(&self.cache.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(cfg);
        }
        // Minted without the lock: connections to hosts already minted do
        // not wait for a signature. Two first connections to one host may
        // both mint; the first stored is kept, so every connection to a
        // host presents one leaf.
        let (leaf, not_before, not_after) = self.leaf(host)?;
        let mut certs = vec![leaf];
        certs.extend(self.chain.iter().cloned());
        let key = rustls_pki_types::PrivateKeyDer::from(
            rustls_pki_types::PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()),
        );
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(CaError::Tls)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(CaError::Tls)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cfg) = cached(&cache) {
            return Ok(cfg);
        }
        let cfg = Arc::new(cfg);
        cache.insert(
            host.to_string(),
            Minted {
                made: Instant::now(),
                not_before,
                not_after,
                capped: not_after >= self.ca_not_after,
                config: Arc::clone(&cfg),
            },
        );
        Ok(cfg)
    }
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("cert_path", &self.cert_path)
            .field("covered", &self.covered.len())
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Loads the CA from `state_dir/ca/`, or creates it, so that it covers
    /// every host in `hosts`; then rewrites `bundle.pem`. See [`CaStatus`].
    pub fn load_or_create(
        state_dir: &Path,
        hosts: &[String],
    ) -> Result<(LocalCa, CaStatus), CaError> {
        Self::load_or_create_with(state_dir, hosts, clock_may_be_behind())
    }

    /// As [`LocalCa::load_or_create`], told whether the clock may be wrong.
    fn load_or_create_with(
        state_dir: &Path,
        hosts: &[String],
        clock_unsure: bool,
    ) -> Result<(LocalCa, CaStatus), CaError> {
        let wanted = normalize_hosts(hosts)?;
        let dir = state_dir.join(CA_DIR);
        fs::create_dir_all(&dir).map_err(|e| CaError::io("create directory", &dir, e))?;
        // Made under any umask, or left by an older version with other
        // modes: set to 0755 when it is ours (a link or another user's
        // directory is refused below, mode or not).
        let meta = fs::symlink_metadata(&dir).map_err(|e| CaError::io("inspect", &dir, e))?;
        if meta.is_dir()
            && std::os::unix::fs::MetadataExt::uid(&meta) == nix::unistd::geteuid().as_raw()
            && meta.permissions().mode() & 0o777 != 0o755
        {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                .map_err(|e| CaError::io("set permissions of", &dir, e))?;
        }
        check_owned(&dir, nix::unistd::geteuid().as_raw(), true)?;

        // Two tollgate processes (`run` and `trust install`) must not both
        // generate a CA: hold an exclusive lock while deciding.
        let lock = lock_dir(&dir)?;

        let existing = match load_existing(&dir)? {
            Existing::Usable(files) => match LocalCa::build(&dir, files) {
                // Checked whole: a leaf it mints must verify against the
                // root (a crash between writing the files of a new CA
                // leaves an intermediate that the root did not sign).
                Ok(ca) => match ca.self_check(clock_unsure) {
                    Ok(()) => Existing::Built(Box::new(ca)),
                    Err(reason) => Existing::Unusable(reason),
                },
                Err(e) => Existing::Unusable(e.to_string()),
            },
            other => other,
        };
        let (ca, status) = match existing {
            Existing::Built(ca) if wanted.iter().all(|h| covers(&ca.covered, h)) => {
                (*ca, CaStatus::Loaded)
            }
            Existing::Built(ca) => {
                let added: Vec<String> = wanted
                    .iter()
                    .filter(|h| !covers(&ca.covered, h))
                    .cloned()
                    .collect();
                tracing::warn!(
                    added = added.len(),
                    "the local CA does not cover every provider host; generating a new one"
                );
                let ca = LocalCa::build(&dir, create(&dir, &wanted, true)?)?;
                (
                    ca,
                    CaStatus::Regenerated {
                        added_hosts: added,
                        unusable: None,
                    },
                )
            }
            Existing::Unusable(reason) => {
                let ca = LocalCa::build(&dir, create(&dir, &wanted, true)?)?;
                let added_hosts = wanted.iter().cloned().collect();
                (
                    ca,
                    CaStatus::Regenerated {
                        added_hosts,
                        unusable: Some(reason),
                    },
                )
            }
            Existing::Absent | Existing::Usable(_) => {
                let ca = LocalCa::build(&dir, create(&dir, &wanted, false)?)?;
                (ca, CaStatus::Created)
            }
        };
        drop(lock);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if now < ca.minter.ca_not_before {
            tracing::warn!(
                behind_secs = ca.minter.ca_not_before - now,
                "the clock is before the local CA's start, soon after boot: the CA is kept, and clients on this host refuse its certificates until the clock passes its start (is NTP setting the time?); if the clock is right, the CA was made by a clock that was ahead: replace it with `tollgate trust rotate`"
            );
        }
        if ca.minter.chain.is_empty() {
            tracing::warn!(
                dir = %dir.display(),
                "the local CA predates intermediate certificates: Java does not apply a trusted root's own name constraints, so for JVMs a stolen ca.key is unconstrained; replace it with `tollgate trust rotate`, then restart the agent"
            );
        }
        // The agent serves without it (a full disk at a restart must not
        // keep it down): the clients given bundle.pem are the ones told.
        if let Err(e) = ca.write_bundle() {
            if status == CaStatus::Loaded {
                tracing::warn!(
                    error = %e,
                    "cannot write bundle.pem: it is as an earlier start left it (this CA, with the system's roots of then), or missing"
                );
            } else {
                tracing::error!(
                    error = %e,
                    "cannot write bundle.pem, which still holds the previous CA: clients given it (tollgate trust env) do not trust this one until it is written (at the next start, or by `tollgate trust install`)"
                );
            }
        }
        Ok((ca, status))
    }

    /// Replaces the CA under `state_dir` with a new one covering `hosts`
    /// (the old certificate is kept as `ca.crt.old`): for a CA made before
    /// intermediates, or one to retire. Clients must trust the new root,
    /// and a running agent keeps signing with the old CA until restarted.
    pub fn rotate(state_dir: &Path, hosts: &[String]) -> Result<LocalCa, CaError> {
        let wanted = normalize_hosts(hosts)?;
        let dir = state_dir.join(CA_DIR);
        fs::create_dir_all(&dir).map_err(|e| CaError::io("create directory", &dir, e))?;
        // Not into a directory someone else controls (its files are all
        // replaced, so theirs are not judged).
        let meta = fs::symlink_metadata(&dir).map_err(|e| CaError::io("inspect", &dir, e))?;
        let euid = nix::unistd::geteuid().as_raw();
        if meta.file_type().is_symlink() || std::os::unix::fs::MetadataExt::uid(&meta) != euid {
            return Err(CaError::Unsafe {
                path: dir,
                why: "is a symbolic link or another user's".into(),
            });
        }
        let lock = lock_dir(&dir)?;
        let ca = LocalCa::build(&dir, create(&dir, &wanted, true)?)?;
        drop(lock);
        ca.write_bundle()?;
        Ok(ca)
    }

    fn build(dir: &Path, files: CaFiles) -> Result<LocalCa, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let unparsable = |path: PathBuf, reason: String| CaError::Io {
            action: "parse",
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, reason),
        };
        let root = parse_cert(&files.root_pem).map_err(|r| unparsable(cert_path.clone(), r))?;
        let (issuer, chain, validity) = match &files.intermediate_pem {
            Some(pem) => {
                let int =
                    parse_cert(pem).map_err(|r| unparsable(dir.join(INTERMEDIATE_FILE), r))?;
                (
                    Issuer::from_ca_cert_pem(pem, files.key)?,
                    vec![int.der],
                    (
                        root.not_before.max(int.not_before),
                        root.not_after.min(int.not_after),
                    ),
                )
            }
            None => (
                Issuer::from_ca_cert_pem(&files.root_pem, files.key)?,
                Vec::new(),
                (root.not_before, root.not_after),
            ),
        };
        Ok(LocalCa {
            cert_path,
            bundle_path: dir.join(BUNDLE_FILE),
            cert_pem: files.root_pem,
            cert_der: root.der,
            covered: root.covered,
            minter: Minter::new(issuer, chain, validity)?,
        })
    }

    /// Mints a leaf for one covered host and verifies it, with the chain
    /// the proxy sends, against the root alone, as a client would. With
    /// `clock_unsure` (the clock may be behind: see [`CLOCK_GRACE`]), at
    /// the CA's start if the clock is before it: such a CA is not replaced
    /// for that (see `load_or_create`). Otherwise a CA that starts later
    /// was made by a clock that was ahead, and is replaced.
    fn self_check(&self, clock_unsure: bool) -> Result<(), String> {
        let host = self.covered.iter().next().ok_or("no host is covered")?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let at = if clock_unsure {
            now.max(self.minter.ca_not_before + 60)
        } else {
            now
        };
        let at_time = time::OffsetDateTime::from_unix_timestamp(at)
            .map_err(|e| format!("the CA's dates are out of range: {e}"))?;
        let (leaf, _, _) = self
            .minter
            .leaf_at(host, at_time)
            .map_err(|e| e.to_string())?;
        let at = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(at).unwrap_or(0),
        ));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| format!("the root is not a trust anchor: {e}"))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.minter.provider),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let name =
            rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(&leaf, &self.minter.chain, &name, &[], at)
            .map(|_| ())
            .map_err(|e| format!("a leaf it signs does not verify against its root: {e}"))
    }

    /// For a CA kept at boot though it starts after the clock: waits until
    /// the grace after boot is over, then says, as an error, if the clock
    /// is still before the CA's start (the CA, not the clock, is what is
    /// wrong, and clients on this host refuse its certificates). Returns at
    /// once for a CA that has started.
    pub async fn recheck_start_after_boot(&self) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let starts = self.minter.ca_not_before;
        let Some(wait) = recheck_in(now, starts, uptime().unwrap_or(CLOCK_GRACE)) else {
            return;
        };
        tokio::time::sleep(wait).await;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if now < starts {
            tracing::error!(
                ahead_secs = starts - now,
                "15 minutes after boot the clock is still before the local CA's start: the CA was made by a clock that was ahead, and clients on this host refuse its certificates; replace it with `tollgate trust rotate` (then `tollgate trust install`) and restart the agent"
            );
        }
    }

    /// `state_dir/ca/ca.crt`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// `state_dir/ca/bundle.pem`: the system roots plus this CA.
    pub fn bundle_path(&self) -> &Path {
        &self.bundle_path
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Host names inside the CA's name constraints.
    pub fn covered_hosts(&self) -> impl Iterator<Item = &str> {
        self.covered.iter().map(String::as_str)
    }

    /// A rustls server configuration presenting a leaf for `sni` and the
    /// intermediate (minted once, then cached), ALPN `h2` and `http/1.1`.
    pub async fn server_config(&self, sni: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let host = sni.trim_end_matches('.').to_ascii_lowercase();
        if !covers(&self.covered, &host) {
            return Err(CaError::NotCovered { host });
        }
        self.minter.server_config(&host)
    }

    /// (Re)writes `bundle.pem` atomically: the first system bundle that
    /// exists (unless it already holds this CA) followed by this CA. A
    /// file that already holds exactly that is left as it is.
    pub fn write_bundle(&self) -> Result<&Path, CaError> {
        let mut out = String::new();
        let mut has_ca = false;
        if !SYSTEM_BUNDLES.iter().any(|b| Path::new(b).exists()) {
            tracing::warn!(
                looked_at = ?SYSTEM_BUNDLES,
                "no system trust bundle found: bundle.pem holds the local CA only, and a client given it as SSL_CERT_FILE or REQUESTS_CA_BUNDLE (tollgate trust env) trusts no other server; install the distribution's CA certificates (ca-certificates)"
            );
        }
        for sys in SYSTEM_BUNDLES {
            match fs::read(sys) {
                Ok(bytes) => {
                    has_ca = CertificateDer::pem_slice_iter(&bytes)
                        .filter_map(Result::ok)
                        .any(|c| c.as_ref() == self.cert_der.as_ref());
                    out.push_str(&String::from_utf8_lossy(&bytes));
                    if !out.is_empty() && !out.ends_with('\n') {
                        out.push('\n');
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    tracing::warn!(path = sys, error = %e, "cannot read the system trust bundle; bundle.pem holds the local CA only");
                    break;
                }
            }
        }
        if !has_ca {
            out.push_str(&self.cert_pem);
            if !out.ends_with('\n') {
                out.push('\n');
            }
        }
        let unchanged = fs::read(&self.bundle_path).is_ok_and(|b| b == out.as_bytes())
            && fs::metadata(&self.bundle_path)
                .is_ok_and(|m| m.permissions().mode() & 0o777 == 0o644);
        if !unchanged {
            write_atomic(&self.bundle_path, out.as_bytes(), 0o644)?;
        }
        Ok(&self.bundle_path)
    }
}

/// Lower-cases, strips a trailing dot, validates and de-duplicates.
fn normalize_hosts(hosts: &[String]) -> Result<BTreeSet<String>, CaError> {
    let mut out = BTreeSet::new();
    for h in hosts {
        let n = h.trim_end_matches('.').to_ascii_lowercase();
        crate::config::validate_host(&n).map_err(|reason| CaError::InvalidHost {
            host: h.clone(),
            reason,
        })?;
        out.insert(n);
    }
    if out.is_empty() {
        return Err(CaError::NoHosts);
    }
    Ok(out)
}

/// A CA's files, each read and checked on its own.
struct CaFiles {
    root_pem: String,
    /// `None` for a CA made before intermediates (`ca.key` is the root's).
    intermediate_pem: Option<String>,
    /// The signing key: the intermediate's (or the older root's).
    key: KeyPair,
}

enum Existing {
    Absent,
    Unusable(String),
    Usable(CaFiles),
    Built(Box<LocalCa>),
}

/// Holds `dir/.lock` exclusively (released when dropped): two tollgate
/// processes (`run` and `trust install`) must not both make a CA.
fn lock_dir(dir: &Path) -> Result<fs::File, CaError> {
    let lock_path = dir.join(LOCK_FILE);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| CaError::io("open", &lock_path, e))?;
    lock.lock()
        .map_err(|e| CaError::io("lock", &lock_path, e))?;
    Ok(lock)
}

fn read_opt(path: &Path) -> Result<Option<String>, CaError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(Some(String::new())),
        Err(e) => Err(CaError::io("read", path, e)),
    }
}

fn load_existing(dir: &Path) -> Result<Existing, CaError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let int_path = dir.join(INTERMEDIATE_FILE);
    let Some(cert_pem) = read_opt(&cert_path)? else {
        return Ok(Existing::Absent);
    };
    let Some(key_pem) = read_opt(&key_path)? else {
        return Ok(Existing::Unusable(format!(
            "{} is missing",
            key_path.display()
        )));
    };
    tighten_key_mode(&key_path);
    let root = match parse_cert(&cert_pem) {
        Ok(p) => p,
        Err(reason) => {
            return Ok(Existing::Unusable(format!(
                "{}: {reason}",
                cert_path.display()
            )));
        }
    };
    let intermediate_pem = read_opt(&int_path)?;
    let intermediate = match intermediate_pem.as_deref().map(parse_cert) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(reason)) => {
            return Ok(Existing::Unusable(format!(
                "{}: {reason}",
                int_path.display()
            )));
        }
    };
    let key = match KeyPair::from_pem(&key_pem) {
        Ok(k) => k,
        Err(e) => return Ok(Existing::Unusable(format!("{}: {e}", key_path.display()))),
    };
    let signing = intermediate.as_ref().unwrap_or(&root);
    if key.public_key_raw() != signing.public_key.as_slice() {
        return Ok(Existing::Unusable(
            "the key does not match the certificate it signs with".into(),
        ));
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let not_after = root.not_after.min(signing.not_after);
    if not_after - now < CA_MIN_REMAINING_DAYS * 86_400 {
        return Ok(Existing::Unusable("the CA expires within 400 days".into()));
    }
    let ours = |p: &ParsedCa| p.is_ca && p.constrained;
    if !ours(&root) || !ours(signing) || signing.covered != root.covered {
        return Ok(Existing::Unusable(
            "the certificate is not a name-constrained CA made by tollgate".into(),
        ));
    }
    Ok(Existing::Usable(CaFiles {
        root_pem: cert_pem,
        intermediate_pem,
        key,
    }))
}

/// A key file readable by others is made 0600 again (warned, not fatal).
/// The CA's directory and files must be `owner`'s, not symbolic links,
/// and writable by it alone: whoever else can write them can plant a CA of
/// their own. (The state directory above is checked by `run` and `trust`.)
/// The directory's own mode is not judged when `dir_mode` is false (`run`
/// sets it right when it is the owner's).
fn check_owned(dir: &Path, owner: u32, dir_mode: bool) -> Result<(), CaError> {
    use std::os::unix::fs::MetadataExt as _;
    let files = [KEY_FILE, CERT_FILE, INTERMEDIATE_FILE, HOSTS_FILE];
    for path in std::iter::once(dir.to_path_buf()).chain(files.iter().map(|f| dir.join(f))) {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(CaError::io("inspect", &path, e)),
        };
        let why = if meta.file_type().is_symlink() {
            "is a symbolic link".to_string()
        } else if meta.uid() != owner {
            format!("is owned by uid {}, not {owner}", meta.uid())
        } else if meta.mode() & 0o022 != 0 && (dir_mode || path != dir) {
            format!(
                "is writable by other users (mode {:o})",
                meta.mode() & 0o777
            )
        } else {
            continue;
        };
        return Err(CaError::Unsafe { path, why });
    }
    Ok(())
}

fn tighten_key_mode(key_path: &Path) {
    if let Ok(meta) = fs::metadata(key_path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %key_path.display(), mode = format!("{:o}", mode & 0o777), "the CA key was readable by others; setting mode 0600");
            if let Err(e) = fs::set_permissions(key_path, fs::Permissions::from_mode(0o600)) {
                tracing::warn!(path = %key_path.display(), error = %e, "cannot set mode 0600 on the CA key");
            }
        }
    }
}

/// The CA under a state directory as `tollgate check` sees it, from its
/// public files only: the key is looked for, never read; no lock is taken
/// and nothing is created. The checks are `load_or_create`'s (the
/// intermediate's signature is checked against the root's key, as `run`'s
/// self-check finds a crash between writing a new CA's files), but for
/// whether the key matches the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInspection {
    /// Why the next start cannot use the CA and makes a new one.
    pub unusable: Option<String>,
    /// Configured hosts the CA does not cover: the next start replaces it.
    pub hosts_missing: Vec<String>,
    /// Days until the CA (or its intermediate) expires; under
    /// [`CA_MIN_REMAINING_DAYS`] the next start replaces it.
    pub days_left: i64,
    /// Made before intermediates: `tollgate trust rotate` replaces it.
    pub single_level: bool,
    /// The root certificate, PEM, when it parses.
    pub cert_pem: Option<String>,
    /// Seconds until the CA starts, when the clock is before it (and may
    /// be behind, else the CA is `unusable`); 0 once it has started.
    pub starts_in_secs: i64,
}

impl CaInspection {
    /// The next start makes a new CA: clients must trust the new one.
    pub fn replaced_at_start(&self) -> bool {
        self.unusable.is_some()
            || !self.hosts_missing.is_empty()
            || self.days_left < CA_MIN_REMAINING_DAYS
    }
}

/// Inspects the CA under `state_dir` for `hosts`; `None` when there is
/// none yet.
pub fn inspect(state_dir: &Path, hosts: &[String]) -> Result<Option<CaInspection>, CaError> {
    inspect_with(state_dir, hosts, clock_may_be_behind())
}

/// As [`inspect`], told whether the clock may be behind.
fn inspect_with(
    state_dir: &Path,
    hosts: &[String],
    clock_unsure: bool,
) -> Result<Option<CaInspection>, CaError> {
    let dir = state_dir.join(CA_DIR);
    // As `run` would judge them: the owner is the state directory's (which
    // `check` judges on its own line: root's).
    if let Ok(meta) = fs::metadata(state_dir) {
        check_owned(&dir, std::os::unix::fs::MetadataExt::uid(&meta), false)?;
    }
    let cert_path = dir.join(CERT_FILE);
    let int_path = dir.join(INTERMEDIATE_FILE);
    let key_path = dir.join(KEY_FILE);
    let readable = |p: &Path| match read_opt(p) {
        Err(CaError::Permission { .. }) => Err(CaError::Unreadable {
            path: p.to_path_buf(),
        }),
        other => other,
    };
    let Some(cert_pem) = readable(&cert_path)? else {
        return Ok(None);
    };
    let int_pem = readable(&int_path)?;
    let wanted = normalize_hosts(hosts)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let parsed = parse_cert(&cert_pem);
    let verdict = (|| {
        if fs::metadata(&key_path).is_err() {
            return Err(format!("{} is missing", key_path.display()));
        }
        let root = parsed
            .as_ref()
            .map_err(|r| format!("{}: {r}", cert_path.display()))?;
        let intermediate = match int_pem.as_deref().map(parse_cert) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(r)) => return Err(format!("{}: {r}", int_path.display())),
        };
        let signing = intermediate.as_ref().unwrap_or(root);
        let ours = |p: &ParsedCa| p.is_ca && p.constrained;
        if !ours(root) || !ours(signing) || signing.covered != root.covered {
            return Err("the certificate is not a name-constrained CA made by tollgate".into());
        }
        if let Some(i) = &intermediate {
            signed_by(i, root).map_err(|e| {
                format!(
                    "{} is not signed by {}: {e}",
                    int_path.display(),
                    cert_path.display()
                )
            })?;
        }
        // As the self-check judges it at the next start.
        let not_before = root.not_before.max(signing.not_before);
        if now < not_before && !clock_unsure {
            return Err(format!(
                "it starts {} s after the clock: made by a clock that was ahead",
                not_before - now
            ));
        }
        Ok((
            root.covered.clone(),
            root.not_after.min(signing.not_after),
            not_before,
        ))
    })();
    Ok(Some(match verdict {
        Ok((covered, not_after, not_before)) => CaInspection {
            unusable: None,
            hosts_missing: wanted
                .iter()
                .filter(|h| !covers(&covered, h))
                .cloned()
                .collect(),
            days_left: (not_after - now).div_euclid(86_400),
            single_level: int_pem.is_none(),
            cert_pem: Some(cert_pem),
            starts_in_secs: (not_before - now).max(0),
        },
        Err(why) => CaInspection {
            unusable: Some(why),
            hosts_missing: Vec::new(),
            days_left: 0,
            single_level: int_pem.is_none(),
            cert_pem: parsed.is_ok().then_some(cert_pem),
            starts_in_secs: 0,
        },
    }))
}

/// Whether a CA whose permitted DNS subtrees are `covered` may sign for
/// `host`: the name itself or a name below it (RFC 5280 4.2.1.10: labels
/// added on the left), so `eu.api.openai.com` needs no new CA where
/// `api.openai.com` is permitted.
fn covers(covered: &BTreeSet<String>, host: &str) -> bool {
    covered.contains(host)
        || covered.iter().any(|c| {
            host.len() > c.len() + 1
                && host.ends_with(c.as_str())
                && host.as_bytes()[host.len() - c.len() - 1] == b'.'
        })
}

/// What tollgate needs to know about its CA certificate.
struct ParsedCa {
    der: CertificateDer<'static>,
    covered: BTreeSet<String>,
    public_key: Vec<u8>,
    not_before: i64,
    not_after: i64,
    is_ca: bool,
    /// Constrained as tollgate makes its CAs: critical name constraints,
    /// every IPv4 and IPv6 address excluded, and only host names of two
    /// labels or more permitted (a CA found on disk that would sign for
    /// a whole top-level domain, or for IP addresses, is not used).
    constrained: bool,
}

fn parse_cert(pem: &str) -> Result<ParsedCa, String> {
    use x509_parser::extensions::GeneralName;
    // One certificate and nothing else: the whole file is what `trust
    // install` puts in the trust stores, and what is checked is its first
    // certificate only.
    // Every block counts, whatever its label (`TRUSTED CERTIFICATE`, a
    // key) and however malformed.
    if pem.matches("-----BEGIN").count() > 1 {
        return Err(
            "holds more than one PEM block (only the CA's certificate belongs there)".into(),
        );
    }
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let is_ca = matches!(x509.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let mut covered = BTreeSet::new();
    let mut constrained = false;
    if let Ok(Some(nc)) = x509.name_constraints() {
        let mut only_hosts = true;
        for s in nc.value.permitted_subtrees.iter().flatten() {
            match s.base {
                GeneralName::DNSName(d) if d.contains('.') && !d.starts_with('.') => {
                    covered.insert(d.to_ascii_lowercase());
                }
                _ => only_hosts = false,
            }
        }
        let excluded = |all: &[u8]| {
            nc.value
                .excluded_subtrees
                .iter()
                .flatten()
                .any(|s| matches!(s.base, GeneralName::IPAddress(a) if a == all))
        };
        constrained = nc.critical
            && only_hosts
            && !covered.is_empty()
            && excluded(&[0; 8])
            && excluded(&[0; 32]);
    }
    Ok(ParsedCa {
        public_key: x509.public_key().subject_public_key.data.to_vec(),
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
        der: der.clone(),
        covered,
        is_ca,
        constrained,
    })
}

/// Whether `child`'s signature verifies with `issuer`'s public key.
fn signed_by(child: &ParsedCa, issuer: &ParsedCa) -> Result<(), String> {
    fn parse<'a>(d: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
        x509_parser::parse_x509_certificate(d.as_ref())
            .map(|(_, c)| c)
            .map_err(|e| format!("not an X.509 certificate: {e}"))
    }
    use x509_parser::certificate::X509Certificate;
    let (child, issuer) = (parse(&child.der)?, parse(&issuer.der)?);
    child
        .verify_signature(Some(issuer.public_key()))
        .map_err(|e| format!("the signature does not verify ({e})"))
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

/// The parameters of a CA made before intermediates (tests plant them).
#[cfg(test)]
fn ca_params(hosts: &BTreeSet<String>) -> CertificateParams {
    ca_params_named(hosts, "tollgate local CA", 0)
}

/// CA parameters: critical name constraints, CA with `path_len` (1 for the
/// root, 0 for the intermediate), keyCertSign + cRLSign, ten years.
fn ca_params_named(hosts: &BTreeSet<String>, name: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{name} ({})", hostname()));
    dn.push(DnType::OrganizationName, "tollgate");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: hosts.iter().cloned().map(GeneralSubtree::DnsName).collect(),
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    params
}

/// Generates and writes a new CA: a root, and an intermediate the root
/// signs, both constrained to `hosts`; the root's key is dropped once it
/// has signed. Written key, then intermediate, then root, then
/// hosts.json: a crash in between leaves a key that does not match the
/// intermediate, or an intermediate the root did not sign, which the next
/// load detects and replaces.
fn create(dir: &Path, hosts: &BTreeSet<String>, keep_old: bool) -> Result<CaFiles, CaError> {
    let root_key = KeyPair::generate()?;
    let root_params = ca_params_named(hosts, "tollgate local CA", 1);
    let root_pem = root_params.self_signed(&root_key)?.pem();
    let root_issuer = Issuer::new(root_params, root_key);
    let key = KeyPair::generate()?;
    let mut int_params = ca_params_named(hosts, "tollgate local CA intermediate", 0);
    int_params.use_authority_key_identifier_extension = true;
    let intermediate_pem = int_params.signed_by(&key, &root_issuer)?.pem();
    drop(root_issuer);
    if keep_old {
        let cur = dir.join(CERT_FILE);
        if let Some(old) = read_opt(&cur)?.filter(|s| !s.is_empty()) {
            write_atomic(&dir.join(OLD_CERT_FILE), old.as_bytes(), 0o644)?;
        }
    }
    write_atomic(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(
        &dir.join(INTERMEDIATE_FILE),
        intermediate_pem.as_bytes(),
        0o644,
    )?;
    write_atomic(&dir.join(CERT_FILE), root_pem.as_bytes(), 0o644)?;
    let record = serde_json::json!({ "hosts": hosts });
    let text = serde_json::to_string_pretty(&record).unwrap_or_else(|_| "{}".into());
    write_atomic(&dir.join(HOSTS_FILE), format!("{text}\n").as_bytes(), 0o644)?;
    tracing::info!(dir = %dir.display(), hosts = hosts.len(), "created the local CA");
    Ok(CaFiles {
        root_pem,
        intermediate_pem: Some(intermediate_pem),
        key,
    })
}

/// Writes `path` atomically: a temp file in the same directory created with
/// `mode`, fsync, rename over `path`, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| CaError::io("create", &tmp, e))?;
        // The umask may have removed bits from `mode` (never added any).
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| CaError::io("set permissions of", &tmp, e))?;
        f.write_all(bytes)
            .map_err(|e| CaError::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| CaError::io("sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| CaError::io("rename into", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    fn hosts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// Replaces the CA in `state` with one of the same hosts whose
    /// validity starts `shift` from now, as a CA made by a clock that was
    /// `shift` ahead of this one.
    fn plant_shifted(state: &Path, hosts: &[String], shift: time::Duration) {
        LocalCa::load_or_create(state, hosts).expect("a CA");
        let wanted: BTreeSet<String> = hosts.iter().cloned().collect();
        let dir = state.join(CA_DIR);
        let root_key = KeyPair::generate().unwrap();
        let mut rp = ca_params_named(&wanted, "tollgate local CA", 1);
        rp.not_before += shift;
        rp.not_after += shift;
        let root_pem = rp.self_signed(&root_key).unwrap().pem();
        let root = Issuer::new(rp, root_key);
        let key = KeyPair::generate().unwrap();
        let mut ip = ca_params_named(&wanted, "tollgate local CA intermediate", 0);
        ip.use_authority_key_identifier_extension = true;
        ip.not_before += shift;
        ip.not_after += shift;
        let int_pem = ip.signed_by(&key, &root).unwrap().pem();
        write_atomic(&dir.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600).unwrap();
        write_atomic(&dir.join(INTERMEDIATE_FILE), int_pem.as_bytes(), 0o644).unwrap();
        write_atomic(&dir.join(CERT_FILE), root_pem.as_bytes(), 0o644).unwrap();
    }

    fn replaced_as_unusable(st: &CaStatus) -> bool {
        matches!(
            st,
            CaStatus::Regenerated {
                unusable: Some(_),
                ..
            }
        )
    }

    /// A runner whose clock came up behind (before NTP set it) finds a CA
    /// that starts after its clock: the CA is kept, not replaced (which
    /// would leave every trust store with the old one), however far behind
    /// the clock is; with a synchronised clock, the CA is what is wrong,
    /// and it is replaced.
    #[test]
    fn a_ca_that_starts_after_the_clock_is_kept_while_the_clock_is_unsure() {
        let t = tempfile::tempdir().unwrap();
        let h = hosts(&["api.openai.com"]);
        for days in [2, 800] {
            plant_shifted(t.path(), &h, time::Duration::days(days));
            let before = fs::read_to_string(t.path().join("ca/ca.crt")).unwrap();
            let (ca, st) = LocalCa::load_or_create_with(t.path(), &h, true).expect("loads");
            assert_eq!(st, CaStatus::Loaded, "{days} days");
            assert_eq!(ca.cert_pem(), before);
        }
        let (_, st) = LocalCa::load_or_create_with(t.path(), &h, false).expect("loads");
        assert!(replaced_as_unusable(&st), "{st:?}");
        // One that has ended is still replaced.
        plant_shifted(t.path(), &h, time::Duration::days(-3660));
        let (_, st) = LocalCa::load_or_create(t.path(), &h).expect("loads");
        assert!(replaced_as_unusable(&st), "{st:?}");
    }

    /// `check` judges a CA that starts after the clock as the next start
    /// will: replaced unless the clock may be behind, and then kept with
    /// the wait shown.
    #[test]
    fn inspect_judges_a_ca_that_starts_after_the_clock_as_a_start_would() {
        let t = tempfile::tempdir().unwrap();
        let h = hosts(&["api.openai.com"]);
        plant_shifted(t.path(), &h, time::Duration::days(2));
        let sure = inspect_with(t.path(), &h, false).unwrap().expect("a CA");
        assert!(sure.replaced_at_start(), "{sure:?}");
        assert!(
            sure.unusable
                .as_deref()
                .is_some_and(|u| u.contains("ahead")),
            "{sure:?}"
        );
        let unsure = inspect_with(t.path(), &h, true).unwrap().expect("a CA");
        assert!(!unsure.replaced_at_start(), "{unsure:?}");
        assert!(unsure.starts_in_secs > 86_400, "{unsure:?}");
        // A CA that has started shows no wait.
        let t = tempfile::tempdir().unwrap();
        LocalCa::load_or_create(t.path(), &h).unwrap();
        let fine = inspect_with(t.path(), &h, false).unwrap().expect("a CA");
        assert_eq!(fine.starts_in_secs, 0);
        assert!(!fine.replaced_at_start(), "{fine:?}");
    }

    #[test]
    fn a_ca_kept_at_boot_is_looked_at_again_after_the_grace() {
        let up = Duration::from_secs(60);
        assert_eq!(recheck_in(1000, 999, up), None, "started");
        assert_eq!(recheck_in(1000, 1000, up), None, "starts now");
        assert_eq!(recheck_in(1000, 5000, up), Some(CLOCK_GRACE - up));
        assert_eq!(
            recheck_in(1000, 5000, CLOCK_GRACE * 2),
            Some(Duration::ZERO),
            "after the grace: at once"
        );
    }

    #[test]
    fn only_a_host_just_booted_may_have_a_clock_behind() {
        assert!(booted_within(Duration::from_secs(u64::MAX / 4)));
        assert!(!booted_within(Duration::ZERO));
    }

    /// Only the CA's own certificate goes to the trust stores: a `ca.crt`
    /// with more in it (a restore, a careless `cat >>`) is replaced.
    #[test]
    fn a_ca_file_with_more_than_the_certificate_is_replaced() {
        let t = tempfile::tempdir().unwrap();
        let h = hosts(&["api.openai.com"]);
        LocalCa::load_or_create(t.path(), &h).expect("a CA");
        let other_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "an unconstrained root");
        let other = p.self_signed(&other_key).unwrap().pem();
        let crt = t.path().join("ca/ca.crt");
        let mut text = fs::read_to_string(&crt).unwrap();
        text.push_str(&other);
        fs::write(&crt, &text).unwrap();
        let (ca, st) = LocalCa::load_or_create(t.path(), &h).expect("loads");
        assert!(
            matches!(&st, CaStatus::Regenerated { unusable: Some(r), .. } if r.contains("more than one PEM block")),
            "{st:?}"
        );
        assert!(!ca.cert_pem().contains(other.trim()));
        let bundle = fs::read_to_string(ca.bundle_path()).unwrap();
        assert!(
            !bundle.contains(other.trim()),
            "the other root reached bundle.pem"
        );
    }

    /// A cached leaf is minted again when the wall clock stepped out of
    /// its validity (or is within an hour of its end), not only after 30
    /// days on the monotonic clock.
    #[tokio::test]
    async fn a_cached_leaf_outside_its_validity_by_the_wall_clock_is_minted_again() {
        let t = tempfile::tempdir().unwrap();
        let (ca, _) = LocalCa::load_or_create(t.path(), &hosts(&["api.openai.com"])).unwrap();
        let first = ca.server_config("api.openai.com").await.unwrap();
        let again = ca.server_config("api.openai.com").await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "cached while valid");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let minted = |not_before: i64, not_after: i64, capped: bool| Minted {
            made: Instant::now(),
            not_before,
            not_after,
            capped,
            config: Arc::clone(&first),
        };
        assert!(minted(now - 3600, now + 86_400, false).fresh(now));
        // Minted by a clock that was ahead: not yet valid now.
        assert!(!minted(now + 7200, now + 86_400, false).fresh(now));
        // Within an hour of its end.
        assert!(!minted(now - 3600, now + 1800, false).fresh(now));
        // Unless that is the CA's end too: a new one would end as soon.
        assert!(minted(now - 3600, now + 1800, true).fresh(now));
        // And the proxy's cache acts on it.
        ca.minter
            .cache
            .lock()
            .unwrap()
            .get_mut("api.openai.com")
            .expect("cached")
            .not_before = now + 7200;
        let third = ca.server_config("api.openai.com").await.unwrap();
        assert!(
            !Arc::ptr_eq(&first, &third),
            "a leaf not valid yet was presented"
        );
    }

    fn verifier(ca: &LocalCa) -> Arc<rustls::client::WebPkiServerVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.cert_der().clone())
            .expect("CA is a valid trust anchor");
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .expect("verifier builds")
    }

    fn verify(ca: &LocalCa, leaf: &CertificateDer<'_>, name: &str) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(name.to_string()).expect("valid server name");
        verifier(ca)
            .verify_server_cert(leaf, &ca.minter.chain, &name, &[], UnixTime::now())
            .map(|_| ())
    }

    /// Mints a leaf by hand with the key on disk (the intermediate's, or an
    /// older CA's root key), bypassing `server_config`'s check: what a
    /// stolen `ca.key` could sign.
    fn mint(state: &Path, san: rcgen::SanType) -> CertificateDer<'static> {
        let key = KeyPair::from_pem(&fs::read_to_string(state.join("ca/ca.key")).expect("key"))
            .expect("key parses");
        let cert = fs::read_to_string(state.join("ca/intermediate.crt"))
            .or_else(|_| fs::read_to_string(state.join("ca/ca.crt")))
            .expect("cert");
        let issuer = Issuer::from_ca_cert_pem(&cert, key).expect("issuer");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![san];
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.signed_by(&leaf_key, &issuer)
            .expect("signs")
            .der()
            .clone()
    }

    fn dns(s: &str) -> rcgen::SanType {
        rcgen::SanType::DnsName(s.to_string().try_into().expect("ia5"))
    }

    /// Runs a real in-memory TLS handshake; returns the leaf the client saw
    /// and the negotiated ALPN.
    fn handshake(
        ca: &LocalCa,
        server: Arc<rustls::ServerConfig>,
        sni: &str,
    ) -> (CertificateDer<'static>, Option<Vec<u8>>) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).expect("anchor");
        let mut cc = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = ServerName::try_from(sni.to_string()).expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(cc), name).expect("client");
        let mut srv = rustls::ServerConnection::new(server).expect("server");
        for _ in 0..20 {
            // `read_tls` takes at most one buffer's worth per call: feed
            // each side all the other wrote.
            let mut buf = Vec::new();
            client.write_tls(&mut buf).expect("client writes");
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                srv.read_tls(&mut rd).expect("server reads");
                srv.process_new_packets()
                    .expect("server accepts the client");
            }
            let mut buf = Vec::new();
            srv.write_tls(&mut buf).expect("server writes");
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("client reads");
                client
                    .process_new_packets()
                    .expect("client verifies the minted leaf against the local CA");
            }
            if !client.is_handshaking() && !srv.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking(), "handshake did not finish");
        let leaf = client.peer_certificates().expect("peer certs")[0]
            .clone()
            .into_owned();
        (leaf, client.alpn_protocol().map(<[u8]>::to_vec))
    }

    #[test]
    fn no_leaf_outlives_the_ca() {
        let t = tempfile::tempdir().expect("tempdir");
        let (mut ca, _) =
            LocalCa::load_or_create(t.path(), &hosts(&["api.openai.com"])).expect("create");
        let leaf_end = |ca: &LocalCa| {
            let (der, _, not_after) = ca.minter.leaf("api.openai.com").expect("leaf");
            let (_, x) = x509_parser::parse_x509_certificate(&der).expect("parse");
            assert_eq!(x.validity().not_after.timestamp(), not_after);
            not_after
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // A fresh CA: the leaf's own year.
        let end = leaf_end(&ca);
        assert!(
            (end - now - LEAF_VALIDITY_DAYS * 86_400).abs() < 120,
            "{end}"
        );
        // A CA ending in ten days (an agent running long after loading it).
        ca.minter.ca_not_after = now + 10 * 86_400;
        assert_eq!(leaf_end(&ca), now + 10 * 86_400);
    }

    #[test]
    fn a_ca_directory_others_can_write_or_that_links_elsewhere_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com"]);
        LocalCa::load_or_create(t.path(), &h).expect("create");
        let dir = t.path().join("ca");
        let refused = |what: &str| match LocalCa::load_or_create(t.path(), &h) {
            Err(e @ CaError::Unsafe { .. }) => {
                assert_eq!(e.exit_code(), crate::exit::NOPERM);
                e.to_string()
            }
            other => panic!("{what}: {other:?}"),
        };
        // A certificate others may write (`check`'s inspection says so too).
        fs::set_permissions(dir.join("ca.crt"), fs::Permissions::from_mode(0o666)).unwrap();
        assert!(refused("ca.crt 0666").contains("writable by other users"));
        assert!(matches!(inspect(t.path(), &h), Err(CaError::Unsafe { .. })));
        fs::set_permissions(dir.join("ca.crt"), fs::Permissions::from_mode(0o644)).unwrap();
        LocalCa::load_or_create(t.path(), &h).expect("loads again");
        // A key that is a link (chmod would follow it).
        let elsewhere = t.path().join("elsewhere");
        fs::rename(dir.join("ca.key"), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join("ca.key")).unwrap();
        assert!(refused("ca.key a link").contains("symbolic link"));
        fs::remove_file(dir.join("ca.key")).unwrap();
        fs::rename(&elsewhere, dir.join("ca.key")).unwrap();
        // The directory itself, when it is ours, is set right (an umask of
        // 002, an older version's modes), its files still checked.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        LocalCa::load_or_create(t.path(), &h).expect("set to 0755 and loaded");
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // A link in its place is not.
        let real = t.path().join("real-ca");
        fs::rename(&dir, &real).unwrap();
        std::os::unix::fs::symlink(&real, &dir).unwrap();
        assert!(refused("ca/ a link").contains("symbolic link"));
        assert!(matches!(
            LocalCa::rotate(t.path(), &h),
            Err(CaError::Unsafe { .. })
        ));
    }

    #[test]
    #[ignore = "needs root (gives a file to another user)"]
    fn a_ca_file_of_another_user_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com"]);
        LocalCa::load_or_create(t.path(), &h).expect("create");
        let crt = t.path().join("ca").join("ca.crt");
        nix::unistd::chown(&crt, Some(nix::unistd::Uid::from_raw(65534)), None)
            .expect("chown needs root");
        match LocalCa::load_or_create(t.path(), &h) {
            Err(CaError::Unsafe { why, .. }) => {
                assert!(why.contains("owned by uid 65534"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn creates_then_loads_with_modes_and_bundle() {
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com", "API.Anthropic.com."]);
        let (ca, st) = LocalCa::load_or_create(t.path(), &h).expect("create");
        assert_eq!(st, CaStatus::Created);
        let dir = t.path().join("ca");
        let mode = |f: &str| fs::metadata(dir.join(f)).expect(f).permissions().mode() & 0o777;
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("ca.crt"), 0o644);
        assert_eq!(mode("bundle.pem"), 0o644);
        assert_eq!(
            fs::metadata(&dir).expect("dir").permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(ca.cert_path(), dir.join("ca.crt"));
        assert_eq!(ca.bundle_path(), dir.join("bundle.pem"));
        assert_eq!(
            fs::read_to_string(ca.cert_path()).expect("crt"),
            ca.cert_pem()
        );
        let bundle = fs::read_to_string(ca.bundle_path()).expect("bundle");
        assert!(
            bundle.trim_end().ends_with(ca.cert_pem().trim_end()),
            "bundle must end with the CA"
        );
        // Every machine the suite runs on has a system bundle (the
        // upstream client and the SDKs need one too).
        assert!(
            SYSTEM_BUNDLES.iter().any(|b| Path::new(b).exists()),
            "no system CA bundle at {SYSTEM_BUNDLES:?}"
        );
        assert!(
            bundle.matches("BEGIN CERTIFICATE").count() > 10,
            "system roots missing from the bundle"
        );
        let record: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("hosts.json")).expect("hosts.json"))
                .expect("json");
        assert_eq!(
            record["hosts"],
            serde_json::json!(["api.anthropic.com", "api.openai.com"])
        );
        assert!(!fs::read_dir(&dir).expect("ls").any(|e| {
            e.expect("entry")
                .file_name()
                .to_string_lossy()
                .contains(".tmp.")
        }));

        let (ca2, st) =
            LocalCa::load_or_create(t.path(), &hosts(&["api.openai.com"])).expect("load");
        assert_eq!(
            st,
            CaStatus::Loaded,
            "a subset of the covered hosts reuses the CA"
        );
        assert_eq!(ca2.cert_pem(), ca.cert_pem());
    }

    /// A start that changes nothing does not write bundle.pem again (a
    /// full disk would fail it), and one that cannot write it still starts.
    #[test]
    fn the_bundle_is_written_only_when_it_changes_and_a_failure_is_not_fatal() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com"]);
        let (ca, _) = LocalCa::load_or_create(t.path(), &h).expect("create");
        let ino = || fs::metadata(ca.bundle_path()).expect("bundle").ino();
        let first = ino();
        LocalCa::load_or_create(t.path(), &h).expect("load");
        assert_eq!(ino(), first, "rewritten unchanged");
        // A changed file is written again.
        fs::write(ca.bundle_path(), "stale").unwrap();
        LocalCa::load_or_create(t.path(), &h).expect("load");
        assert!(
            fs::read_to_string(ca.bundle_path())
                .unwrap()
                .ends_with(ca.cert_pem())
        );
        // A bundle that cannot be written (a directory in its place here; a
        // full disk in the field) leaves the CA loaded.
        fs::remove_file(ca.bundle_path()).unwrap();
        fs::create_dir(ca.bundle_path()).unwrap();
        fs::write(ca.bundle_path().join("x"), "keeps the rename out").unwrap();
        let (again, st) = LocalCa::load_or_create(t.path(), &h).expect("starts anyway");
        assert_eq!(st, CaStatus::Loaded);
        assert_eq!(again.cert_pem(), ca.cert_pem());
    }

    #[test]
    fn new_host_regenerates_and_keeps_old_cert() {
        let t = tempfile::tempdir().expect("tempdir");
        let (ca, _) =
            LocalCa::load_or_create(t.path(), &hosts(&["api.openai.com"])).expect("create");
        let (ca2, st) = LocalCa::load_or_create(t.path(), &hosts(&["api.openai.com", "api.x.ai"]))
            .expect("regen");
        assert_eq!(
            st,
            CaStatus::Regenerated {
                added_hosts: hosts(&["api.x.ai"]),
                unusable: None,
            }
        );
        assert_ne!(ca.cert_pem(), ca2.cert_pem());
        assert_eq!(
            fs::read_to_string(t.path().join("ca/ca.crt.old")).expect("old"),
            ca.cert_pem()
        );
        assert_eq!(
            ca2.covered_hosts().collect::<Vec<_>>(),
            vec!["api.openai.com", "api.x.ai"]
        );
    }

    #[test]
    fn corrupt_or_mismatched_key_regenerates() {
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com"]);
        LocalCa::load_or_create(t.path(), &h).expect("create");
        fs::write(t.path().join("ca/ca.key"), "garbage").expect("write");
        let (_, st) = LocalCa::load_or_create(t.path(), &h).expect("regen");
        assert!(matches!(st, CaStatus::Regenerated { .. }), "{st:?}");
        // A key from another CA (crash between the key and cert renames).
        fs::write(
            t.path().join("ca/ca.key"),
            KeyPair::generate().expect("k").serialize_pem(),
        )
        .expect("write");
        let (ca, st) = LocalCa::load_or_create(t.path(), &h).expect("regen");
        assert!(matches!(st, CaStatus::Regenerated { .. }), "{st:?}");
        let (_, st) = LocalCa::load_or_create(t.path(), &h).expect("load");
        assert_eq!(st, CaStatus::Loaded);
        assert!(
            verify(
                &ca,
                &mint(t.path(), dns("api.openai.com")),
                "api.openai.com"
            )
            .is_ok()
        );
    }

    /// Writes a CA made from `params` (and its key) where `load_or_create`
    /// looks.
    fn plant(state: &Path, params: CertificateParams) {
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let dir = state.join("ca");
        fs::create_dir_all(&dir).expect("dir");
        fs::write(dir.join(KEY_FILE), key.serialize_pem()).expect("key");
        fs::write(dir.join(CERT_FILE), cert.pem()).expect("cert");
    }

    #[test]
    fn a_ca_on_disk_that_is_not_constrained_as_ours_is_replaced() {
        let h = hosts(&["api.openai.com"]);
        let wanted: BTreeSet<String> = h.iter().cloned().collect();
        // Ours, planted: used as it is.
        let t = tempfile::tempdir().expect("tempdir");
        plant(t.path(), ca_params(&wanted));
        let (_, st) = LocalCa::load_or_create(t.path(), &h).expect("load");
        assert_eq!(st, CaStatus::Loaded);
        // One that also covers all of .com.
        let t = tempfile::tempdir().expect("tempdir");
        let mut wide = wanted.clone();
        wide.insert("com".into());
        plant(t.path(), ca_params(&wide));
        let (ca, st) = LocalCa::load_or_create(t.path(), &h).expect("replaced");
        assert!(matches!(st, CaStatus::Regenerated { .. }), "{st:?}");
        assert_eq!(
            ca.covered_hosts().collect::<Vec<_>>(),
            vec!["api.openai.com"]
        );
        // One that excludes a single address instead of every one.
        let t = tempfile::tempdir().expect("tempdir");
        let mut p = ca_params(&wanted);
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName("api.openai.com".into())],
            excluded_subtrees: vec![GeneralSubtree::IpAddress(CidrSubnet::V4(
                [10, 0, 0, 1],
                [255; 4],
            ))],
        });
        plant(t.path(), p);
        let (_, st) = LocalCa::load_or_create(t.path(), &h).expect("replaced");
        assert!(matches!(st, CaStatus::Regenerated { .. }), "{st:?}");
    }

    #[test]
    fn refuses_empty_or_invalid_hosts() {
        let t = tempfile::tempdir().expect("tempdir");
        let e = LocalCa::load_or_create(t.path(), &[]).expect_err("no hosts");
        assert!(matches!(e, CaError::NoHosts));
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        let e = LocalCa::load_or_create(t.path(), &hosts(&["*.openai.com"])).expect_err("wildcard");
        assert!(e.to_string().contains("*.openai.com"), "{e}");
        let perm = CaError::io(
            "read",
            Path::new("/x"),
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert_eq!(perm.exit_code(), crate::exit::NOPERM);
        assert!(perm.to_string().contains("root"), "{perm}");
    }

    #[test]
    fn encodes_critical_name_constraints_and_ca_extensions() {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com", "bedrock-runtime.us-east-1.amazonaws.com"]);
        let (ca, _) = LocalCa::load_or_create(t.path(), &h).expect("create");
        let (_, x) = x509_parser::parse_x509_certificate(ca.cert_der().as_ref()).expect("parses");
        let nc = x
            .name_constraints()
            .expect("one extension")
            .expect("name constraints present");
        assert!(nc.critical, "name constraints must be critical");
        let permitted: Vec<String> = nc
            .value
            .permitted_subtrees
            .as_ref()
            .expect("permitted")
            .iter()
            .map(|s| match s.base {
                GeneralName::DNSName(d) => d.to_string(),
                ref other => panic!("unexpected permitted subtree {other:?}"),
            })
            .collect();
        assert_eq!(
            permitted,
            vec!["api.openai.com", "bedrock-runtime.us-east-1.amazonaws.com"]
        );
        let excluded = nc
            .value
            .excluded_subtrees
            .as_ref()
            .expect("excluded IP ranges");
        assert_eq!(excluded.len(), 2);
        let bc = x.basic_constraints().expect("bc").expect("bc present");
        assert!(bc.critical && bc.value.ca);
        assert_eq!(
            bc.value.path_len_constraint,
            Some(1),
            "the root signs one intermediate"
        );
        let ku = x.key_usage().expect("ku").expect("ku present");
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign() && !ku.value.digital_signature());
        let cn = x
            .subject()
            .iter_common_name()
            .next()
            .expect("cn")
            .as_str()
            .expect("utf8");
        assert!(cn.starts_with("tollgate local CA ("), "{cn}");
        let years = (x.validity().not_after.timestamp() - x.validity().not_before.timestamp())
            / 86_400
            / 365;
        assert!((9..=10).contains(&years), "validity {years} years");
        assert!(x.extensions().iter().all(|e| !matches!(
            e.parsed_extension(),
            ParsedExtension::UnsupportedExtension { .. }
        )));

        // The intermediate: the same constraints, issued by the root, the
        // end of the path; the key on disk is its own, the root's is gone.
        assert_eq!(ca.minter.chain.len(), 1, "the proxy sends the intermediate");
        let (_, i) =
            x509_parser::parse_x509_certificate(ca.minter.chain[0].as_ref()).expect("parses");
        assert_eq!(i.issuer(), x.subject());
        let inc = i.name_constraints().expect("one").expect("present");
        assert!(inc.critical);
        assert_eq!(inc.value.permitted_subtrees, nc.value.permitted_subtrees);
        assert_eq!(inc.value.excluded_subtrees, nc.value.excluded_subtrees);
        let ibc = i.basic_constraints().expect("bc").expect("bc present");
        assert!(ibc.critical && ibc.value.ca);
        assert_eq!(ibc.value.path_len_constraint, Some(0));
        let on_disk =
            KeyPair::from_pem(&fs::read_to_string(t.path().join("ca/ca.key")).expect("key"))
                .expect("key parses");
        assert_eq!(
            on_disk.public_key_raw(),
            i.public_key().subject_public_key.data.as_ref()
        );
        assert_ne!(
            on_disk.public_key_raw(),
            x.public_key().subject_public_key.data.as_ref()
        );
        let files: Vec<String> = fs::read_dir(t.path().join("ca"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        for f in &files {
            let text = fs::read_to_string(t.path().join("ca").join(f)).unwrap_or_default();
            assert!(
                !text.contains("PRIVATE KEY") || f == "ca.key",
                "{f} holds a private key"
            );
        }
    }

    #[test]
    fn a_ca_made_before_intermediates_is_still_used() {
        // The older layout: a self-signed CA whose own key is in ca.key.
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com"]);
        let wanted: BTreeSet<String> = h.iter().cloned().collect();
        plant(t.path(), ca_params(&wanted));
        let before = fs::read(t.path().join("ca/ca.crt")).expect("crt");
        let (ca, st) = LocalCa::load_or_create(t.path(), &h).expect("load");
        assert_eq!(st, CaStatus::Loaded);
        assert_eq!(fs::read(t.path().join("ca/ca.crt")).expect("crt"), before);
        assert!(ca.minter.chain.is_empty(), "no intermediate to send");
        assert!(ca.self_check(false).is_ok());
    }

    #[test]
    fn an_intermediate_the_root_did_not_sign_is_replaced() {
        // A crash between writing a new CA's intermediate and its root.
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com"]);
        LocalCa::load_or_create(t.path(), &h).expect("create");
        let old_root = fs::read(t.path().join("ca/ca.crt")).expect("crt");
        let other = tempfile::tempdir().expect("tempdir");
        LocalCa::load_or_create(other.path(), &h).expect("create");
        for f in ["ca.key", "intermediate.crt"] {
            fs::copy(other.path().join("ca").join(f), t.path().join("ca").join(f)).expect("copy");
        }
        let (ca, st) = LocalCa::load_or_create(t.path(), &h).expect("replaced");
        assert!(matches!(st, CaStatus::Regenerated { .. }), "{st:?}");
        assert_ne!(ca.cert_der().as_ref(), old_root.as_slice());
        assert!(ca.self_check(false).is_ok());
    }

    #[test]
    fn inspect_finds_an_intermediate_the_root_did_not_sign() {
        // What `run` replaces at start (above), `check` must report as
        // replaced, without the key.
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com"]);
        LocalCa::load_or_create(t.path(), &h).expect("create");
        let seen = inspect(t.path(), &h).expect("inspect").expect("a CA");
        assert_eq!(seen.unusable, None);
        assert!(!seen.replaced_at_start(), "{seen:?}");
        let other = tempfile::tempdir().expect("tempdir");
        LocalCa::load_or_create(other.path(), &h).expect("create");
        for f in ["ca.key", "intermediate.crt"] {
            fs::copy(other.path().join("ca").join(f), t.path().join("ca").join(f)).expect("copy");
        }
        let seen = inspect(t.path(), &h).expect("inspect").expect("a CA");
        let why = seen.unusable.as_deref().unwrap_or_default();
        assert!(why.contains("is not signed by"), "{seen:?}");
        assert!(seen.replaced_at_start());
    }

    #[test]
    fn first_connections_to_a_host_at_once_share_one_leaf() {
        // Leaves are minted outside the cache's lock; of two minted at
        // once, the first stored is the one every connection presents.
        let t = tempfile::tempdir().expect("tempdir");
        let h = hosts(&["api.openai.com", "api.anthropic.com"]);
        let (ca, _) = LocalCa::load_or_create(t.path(), &h).expect("create");
        let barrier = std::sync::Barrier::new(8);
        let configs: Vec<_> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        ca.minter.server_config("api.openai.com").expect("config")
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("join"))
                .collect()
        });
        for c in &configs[1..] {
            assert!(Arc::ptr_eq(&configs[0], c), "one leaf per host");
        }
        let other = ca
            .minter
            .server_config("api.anthropic.com")
            .expect("config");
        assert!(!Arc::ptr_eq(&configs[0], &other));
    }

    /// A host below a permitted name (`eu.api.openai.com` under
    /// `api.openai.com`) is inside the name constraints: the CA is kept
    /// (no new CA, so no `trust install` again) and its leaf verifies. A
    /// name that only ends with the same letters is not below it.
    #[tokio::test]
    async fn hosts_below_a_covered_name_need_no_new_ca() {
        let t = tempfile::tempdir().expect("tempdir");
        LocalCa::load_or_create(t.path(), &hosts(&["api.openai.com"])).expect("create");
        let (ca, st) = LocalCa::load_or_create(
            t.path(),
            &hosts(&["api.openai.com", "eu.api.openai.com", "us.api.openai.com"]),
        )
        .expect("load");
        assert_eq!(st, CaStatus::Loaded);
        let cfg = ca
            .server_config("eu.api.openai.com")
            .await
            .expect("covered");
        let (leaf, _) = handshake(&ca, cfg, "eu.api.openai.com");
        verify(&ca, &leaf, "eu.api.openai.com").expect("the leaf verifies");
        for outside in [
            "evilapi.openai.com",
            "openai.com",
            "api.openai.com.evil.example",
        ] {
            let e = ca.server_config(outside).await.expect_err(outside);
            assert!(matches!(e, CaError::NotCovered { .. }), "{outside}: {e}");
        }
        let (_, st) =
            LocalCa::load_or_create(t.path(), &hosts(&["api.openai.com", "xapi.openai.com"]))
                .expect("load");
        assert!(matches!(st, CaStatus::Regenerated { .. }), "{st:?}");
    }

    #[tokio::test]
    async fn minted_leaf_verifies_and_others_are_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        let all: Vec<String> =
            crate::providers::catalogue::provider_hosts(&crate::config::Config::default())
                .into_iter()
                .map(|p| p.host)
                .collect();
        assert!(all.len() > 60, "the catalogue has many hosts");
        let (ca, _) = LocalCa::load_or_create(t.path(), &all).expect("create");
        for sni in ["api.openai.com", "bedrock-runtime.eu-west-1.amazonaws.com"] {
            let cfg = ca.server_config(sni).await.expect("server config");
            assert_eq!(
                cfg.alpn_protocols,
                vec![b"h2".to_vec(), b"http/1.1".to_vec()]
            );
            let again = ca.server_config(&sni.to_uppercase()).await.expect("cached");
            assert!(Arc::ptr_eq(&cfg, &again), "leaf configs are cached");
            let (leaf, alpn) = handshake(&ca, cfg, sni);
            assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
            verify(&ca, &leaf, sni).expect("minted leaf verifies with WebPkiServerVerifier");
        }
        let e = ca
            .server_config("example.com")
            .await
            .expect_err("not covered");
        assert!(matches!(e, CaError::NotCovered { .. }), "{e}");

        // Hand-minted leaves: inside the constraints accepted, outside refused.
        verify(
            &ca,
            &mint(t.path(), dns("api.anthropic.com")),
            "api.anthropic.com",
        )
        .expect("covered host accepted");
        let evil = verify(
            &ca,
            &mint(t.path(), dns("www.example.com")),
            "www.example.com",
        )
        .expect_err("webpki must refuse a host outside the name constraints");
        assert!(format!("{evil:?}").contains("NameConstraint"), "{evil:?}");
        let ip = rcgen::SanType::IpAddress("93.184.216.34".parse().expect("ip"));
        let e = verify(&ca, &mint(t.path(), ip), "93.184.216.34")
            .expect_err("webpki must refuse an IP address leaf");
        assert!(format!("{e:?}").contains("NameConstraint"), "{e:?}");
        // A subdomain of a permitted host is inside its subtree (RFC 5280).
        verify(
            &ca,
            &mint(t.path(), dns("eu.api.openai.com")),
            "eu.api.openai.com",
        )
        .expect("subtree");
        // But a look-alike suffix is not.
        verify(
            &ca,
            &mint(t.path(), dns("evilapi.openai.com")),
            "evilapi.openai.com",
        )
        .expect_err("label boundary");
    }
}
