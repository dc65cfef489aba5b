//! `tollgate trust install|uninstall|env`: making clients trust the local CA.
//!
//! Owns: the CA's copies in system trust stores (the Debian/Ubuntu anchor
//! directory, the RHEL anchor directory when present, Java's `cacerts`
//! under the alias `tollgate-local-ca`) and the environment lines that point
//! SDKs at the CA or at `bundle.pem`.
//!
//! Must never: copy the CA key anywhere, touch a trust store entry it did not
//! create, or run system tools against the host's store when asked to work
//! under another `--root` (then it writes files only and says so).

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use crate::ca::{CaError, LocalCa, write_atomic};

/// File name of the CA in the system anchor directories.
pub const ANCHOR_NAME: &str = "tollgate-local-ca.crt";
/// Alias of the CA in Java keystores.
pub const JAVA_ALIAS: &str = "tollgate-local-ca";
/// Alias Debian's `ca-certificates-java` hook gives the same certificate.
const DEBIAN_JAVA_ALIAS: &str = "debian:tollgate-local-ca.pem";
/// Debian/Ubuntu anchor directory, relative to the root.
const DEBIAN_ANCHORS: &str = "usr/local/share/ca-certificates";
/// Link `update-ca-certificates` makes for the anchor, relative to the root.
const DEBIAN_LINK: &str = "etc/ssl/certs/tollgate-local-ca.pem";
/// RHEL/Fedora anchor directory, used only when it exists.
const RHEL_ANCHORS: &str = "etc/pki/ca-trust/source/anchors";
/// Java cacerts on Debian/Ubuntu (ca-certificates-java).
const DEBIAN_CACERTS: &str = "etc/ssl/certs/java/cacerts";
/// Default store password of Java cacerts (it protects integrity, not secrecy).
const CACERTS_PASSWORD: &str = "changeit";

/// Output format of `trust env`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvFormat {
    /// `export NAME=VALUE`, quoted for a POSIX shell (`eval "$(tollgate trust env)"`).
    Shell,
    /// `NAME=VALUE`, unquoted, as `$GITHUB_ENV` and systemd `EnvironmentFile=` read it.
    Dotenv,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(
        "permission denied: cannot {action} {}: {source}; run `tollgate trust` as root",
        path.display()
    )]
    Permission {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}; {advice}")]
    Command {
        command: String,
        status: String,
        stderr: String,
        /// What to do, for the command that ran it.
        advice: &'static str,
    },
    /// Some steps of `install` or `uninstall` could not be done (the rest
    /// were, and were printed).
    #[error("{}", failed.join("; "))]
    Incomplete { failed: Vec<String> },
}

/// What `install` or `uninstall` did, one line each, and what it could
/// not do.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub failed: Vec<String>,
}

impl Report {
    /// An error when a step failed.
    pub fn finish(self) -> Result<(), TrustError> {
        if self.failed.is_empty() {
            Ok(())
        } else {
            Err(TrustError::Incomplete {
                failed: self.failed,
            })
        }
    }
}

/// What `trust install` says after a command failed.
const INSTALL_AGAIN: &str =
    "the CA file is in place, fix the error and run `tollgate trust install` again";
/// What `trust uninstall` says after a command failed.
const UNINSTALL_AGAIN: &str = "fix the error and run `tollgate trust uninstall` again";

impl TrustError {
    /// Process exit code (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            TrustError::Ca(e) => e.exit_code(),
            TrustError::Permission { .. } => crate::exit::NOPERM,
            TrustError::Io { .. } | TrustError::Command { .. } | TrustError::Incomplete { .. } => {
                crate::exit::UNAVAILABLE
            }
        }
    }

    fn io(action: &'static str, path: &Path, source: std::io::Error) -> TrustError {
        let path = path.to_path_buf();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            TrustError::Permission {
                action,
                path,
                source,
            }
        } else {
            TrustError::Io {
                action,
                path,
                source,
            }
        }
    }
}

/// Environment lines for clients that read their trust from variables:
/// Node gets the CA alone (it adds it to its own roots); Python, curl and
/// botocore get `bundle.pem` (system roots plus the CA), since they replace
/// their roots with the file they are given.
pub fn env_lines(published: &Published, format: EnvFormat) -> String {
    let ca_path = published.cert.to_string_lossy();
    let bundle = published.bundle.to_string_lossy();
    let vars: [(&str, &str); 5] = [
        ("NODE_EXTRA_CA_CERTS", &ca_path),
        ("SSL_CERT_FILE", &bundle),
        ("REQUESTS_CA_BUNDLE", &bundle),
        ("CURL_CA_BUNDLE", &bundle),
        ("AWS_CA_BUNDLE", &bundle),
    ];
    let mut out = String::new();
    for (name, value) in vars {
        match format {
            EnvFormat::Shell => out.push_str(&format!("export {name}={}\n", shell_quote(value))),
            EnvFormat::Dotenv => out.push_str(&format!("{name}={value}\n")),
        }
    }
    out
}

/// The CA's public files, which clients are pointed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// `STATE/ca/ca.crt`.
    pub cert: PathBuf,
    /// `STATE/ca/bundle.pem`.
    pub bundle: PathBuf,
}

impl Published {
    pub fn of(ca: &LocalCa) -> Published {
        Published {
            cert: ca.cert_path().to_path_buf(),
            bundle: ca.bundle_path().to_path_buf(),
        }
    }

    /// The files of a CA that already exists under `state_dir`, found
    /// without the key or the lock (so any user may ask), or `None` when
    /// there is none yet. A file this user may not reach is an error: the
    /// CA is there, and root must make it readable.
    pub fn existing(state_dir: &Path) -> Result<Option<Published>, CaError> {
        let dir = state_dir.join(crate::ca::CA_DIR);
        let p = Published {
            cert: dir.join(crate::ca::CERT_FILE),
            bundle: dir.join(crate::ca::BUNDLE_FILE),
        };
        for f in [&p.cert, &p.bundle] {
            match std::fs::File::open(f) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(CaError::Unreadable { path: f.clone() });
                }
                Err(e) => return Err(CaError::io("read", f, e)),
            }
        }
        Ok(Some(p))
    }

    /// Warnings for each file that users other than its owner cannot read
    /// (a directory on the way without `o+x`, or the file without `o+r`):
    /// a job running as another user with `SSL_CERT_FILE` pointing there
    /// would fail every HTTPS call.
    pub fn unreadable_by_others(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt as _;
        let mut out = Vec::new();
        for file in [&self.cert, &self.bundle] {
            let mut blocked: Option<(PathBuf, u32)> = None;
            for dir in file.ancestors().skip(1) {
                if let Ok(m) = std::fs::metadata(dir)
                    && m.permissions().mode() & 0o001 == 0
                {
                    blocked = Some((dir.to_path_buf(), m.permissions().mode() & 0o7777));
                }
            }
            if blocked.is_none()
                && let Ok(m) = std::fs::metadata(file)
                && m.permissions().mode() & 0o004 == 0
            {
                blocked = Some((file.clone(), m.permissions().mode() & 0o7777));
            }
            if let Some((path, mode)) = blocked {
                out.push(format!(
                    "warning: jobs running as other users cannot read {} ({} has mode {mode:o}); \
                     clients pointed at it fail every HTTPS call: make the state directory 0755",
                    file.display(),
                    path.display()
                ));
            }
        }
        out
    }
}

/// Quotes `s` for a POSIX shell when it holds anything but safe characters.
fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'/' | b'.' | b'_' | b'-' | b',' | b':' | b'+' | b'=' | b'@' | b'%'
                )
        });
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn is_host_root(root: &Path) -> bool {
    let mut c = root.components();
    matches!((c.next(), c.next()), (Some(Component::RootDir), None))
}

/// `root` joined with a path relative to it.
fn under(root: &Path, rel: &str) -> PathBuf {
    root.join(rel)
}

/// Finds `name` on PATH or in the usual sbin directories.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

struct Output {
    ok: bool,
    status: String,
    text: String,
}

/// The command `run` runs: in English, whatever the locale (keytool's
/// "does not exist" is read), and without a JVM's option variables, which
/// a JVM echoes ("Picked up JAVA_TOOL_OPTIONS: ...") and which may hold a
/// password (`-Djavax.net.ssl.trustStorePassword=`); keytool needs none
/// of them to edit a keystore.
fn command(program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).env("LC_ALL", "C").env("LANG", "C");
    for v in JVM_OPTION_VARIABLES {
        c.env_remove(v);
    }
    c
}

const JVM_OPTION_VARIABLES: [&str; 3] = ["JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS"];

fn run(program: &Path, args: &[&str]) -> Result<Output, TrustError> {
    let out = command(program, args)
        .output()
        .map_err(|e| TrustError::io("run", program, e))?;
    // Both streams: keytool says what went wrong on stdout, and a JVM may
    // write its own notes (JAVA_TOOL_OPTIONS) on stderr.
    let text = [&out.stderr, &out.stdout]
        .iter()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    // Keep the message short: the last few lines say what went wrong. A
    // JVM's echo of its options (set some other way) is none of them.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("Picked up "))
        .collect();
    let text = lines[lines.len().saturating_sub(4)..].join(" / ");
    Ok(Output {
        ok: out.status.success(),
        status: out.status.to_string(),
        text,
    })
}

fn command_line(program: &Path, args: &[&str]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(if *a == CACERTS_PASSWORD { "***" } else { a });
    }
    s
}

fn run_checked(program: &Path, args: &[&str], advice: &'static str) -> Result<String, TrustError> {
    let out = run(program, args)?;
    if out.ok {
        Ok(out.text)
    } else {
        Err(TrustError::Command {
            command: command_line(program, args),
            status: out.status,
            stderr: out.text,
            advice,
        })
    }
}

/// The keytool arguments that select the keystore, or why there is none.
fn java_store(root: &Path, keytool: &Path) -> Result<Vec<String>, String> {
    if is_host_root(root) {
        // The file, where it can be found: JDK 8's keytool has no
        // `-cacerts` (every install would fail on it), and for later ones
        // it is the file `-cacerts` means.
        Ok(match cacerts_of(keytool) {
            Some(ks) => vec!["-keystore".into(), ks.to_string_lossy().into_owned()],
            None => vec!["-cacerts".into()],
        })
    } else {
        let ks = under(root, DEBIAN_CACERTS);
        if ks.is_file() {
            Ok(vec!["-keystore".into(), ks.to_string_lossy().into_owned()])
        } else {
            Err(format!("no Java cacerts at {}", ks.display()))
        }
    }
}

/// The cacerts of the JDK a keytool belongs to, links followed
/// (`/usr/bin/keytool` → `/usr/lib/jvm/java-8-openjdk-amd64/jre/bin/keytool`):
/// `lib/security/cacerts` beside its `bin`, or under `jre/` (JDK 8).
fn cacerts_of(keytool: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(keytool).ok()?;
    let home = real.parent()?.parent()?;
    ["lib/security/cacerts", "jre/lib/security/cacerts"]
        .iter()
        .map(|p| home.join(p))
        .find(|p| p.exists())
}

/// What a `keytool -delete` did.
#[derive(Debug, PartialEq, Eq)]
enum Deletion {
    Deleted,
    /// The alias was not there.
    Absent,
    /// Anything else (another store password, a keytool without
    /// `-cacerts`): the alias may still be there.
    Failed(String),
}

impl Deletion {
    fn of(ok: bool, text: &str) -> Deletion {
        if ok {
            Deletion::Deleted
        } else if text.contains("does not exist") {
            Deletion::Absent
        } else {
            Deletion::Failed(text.to_string())
        }
    }
}

fn keytool_delete(keytool: &Path, store: &[String], alias: &str) -> Result<Deletion, TrustError> {
    let mut args: Vec<&str> = vec![
        "-J-Duser.language=en",
        "-J-Duser.country=US",
        "-delete",
        "-noprompt",
        "-alias",
        alias,
    ];
    args.extend(store.iter().map(String::as_str));
    args.extend(["-storepass", CACERTS_PASSWORD]);
    let out = run(keytool, &args)?;
    Ok(Deletion::of(out.ok, &out.text))
}

/// Whether the system trust store under `root` trusts a CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// The system bundle holds it.
    Yes { bundle: PathBuf },
    /// tollgate's anchor file holds another certificate (a CA replaced
    /// since `trust install`).
    Stale { anchor: PathBuf },
    /// The anchor is there but no system bundle holds it (the store was
    /// not rebuilt).
    NotInBundle { anchor: PathBuf },
    /// Not installed.
    No,
}

/// Whether the system store under `root` trusts the CA whose certificate
/// is `cert_pem`: its anchor file, then the first system bundle there is.
pub fn installed(cert_pem: &str, root: &Path) -> Installed {
    // The certificate's base64 body, as every bundle format keeps it.
    let body: String = cert_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    if body.is_empty() {
        return Installed::No;
    }
    let bundle_has_it = |text: &str| {
        text.lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect::<String>()
            .contains(&body)
    };
    let anchors = [DEBIAN_ANCHORS, RHEL_ANCHORS].map(|d| under(root, d).join(ANCHOR_NAME));
    let anchor = anchors
        .iter()
        .find_map(|a| std::fs::read_to_string(a).ok().map(|t| (a.clone(), t)));
    if let Some((a, text)) = &anchor
        && !bundle_has_it(text)
    {
        return Installed::Stale { anchor: a.clone() };
    }
    for b in crate::ca::SYSTEM_BUNDLES {
        let path = under(root, b.trim_start_matches('/'));
        if let Ok(text) = std::fs::read_to_string(&path) {
            if bundle_has_it(&text) {
                return Installed::Yes { bundle: path };
            }
            break;
        }
    }
    match anchor {
        Some((anchor, _)) => Installed::NotInBundle { anchor },
        None => Installed::No,
    }
}

/// Adds the CA to the trust stores under `root` ("/" for this host) and
/// rewrites `bundle.pem`. Returns what was done, one line each.
pub fn install(ca: &LocalCa, root: &Path) -> Result<Report, TrustError> {
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    let host = is_host_root(root);

    let dir = under(root, DEBIAN_ANCHORS);
    std::fs::create_dir_all(&dir).map_err(|e| TrustError::io("create directory", &dir, e))?;
    let anchor = dir.join(ANCHOR_NAME);
    write_atomic(&anchor, ca.cert_pem().as_bytes(), 0o644)?;
    lines.push(format!("copied the CA certificate to {}", anchor.display()));

    let rhel_dir = under(root, RHEL_ANCHORS);
    let rhel = rhel_dir.is_dir();
    if rhel {
        let p = rhel_dir.join(ANCHOR_NAME);
        write_atomic(&p, ca.cert_pem().as_bytes(), 0o644)?;
        lines.push(format!("copied the CA certificate to {}", p.display()));
    }

    if host {
        let trusted = || matches!(installed(ca.cert_pem(), root), Installed::Yes { .. });
        match find_program("update-ca-certificates") {
            // A failure is said at the end: Java's store and bundle.pem
            // are done whatever happens here.
            Some(p) => match run_checked(&p, &[], INSTALL_AGAIN) {
                Ok(_) => lines
                    .push("ran update-ca-certificates: the system store trusts the CA".into()),
                Err(e) => failed.push(e.to_string()),
            },
            None if !rhel && !trusted() => failed.push(
                "update-ca-certificates not found, and the system store does not trust the CA: install the ca-certificates package and run `tollgate trust install` again"
                    .into(),
            ),
            None => {}
        }
        if rhel {
            match find_program("update-ca-trust") {
                Some(p) => match run_checked(&p, &["extract"], INSTALL_AGAIN) {
                    Ok(_) => lines.push("ran update-ca-trust extract".into()),
                    Err(e) => failed.push(e.to_string()),
                },
                None if !trusted() => failed.push(
                    "update-ca-trust not found, and the system store does not trust the CA: run `update-ca-trust extract`".into(),
                ),
                None => {}
            }
        }
    } else {
        lines.push(format!(
            "root is {}: wrote files only; run `update-ca-certificates` inside that root to refresh its store",
            root.display()
        ));
    }

    match find_program("keytool").map(|k| (java_store(root, &k), k)) {
        None => lines.push("keytool not found: Java trust store left alone".into()),
        Some((Err(why), _)) => lines.push(format!("{why}: Java trust store left alone")),
        Some((Ok(store), keytool)) => {
            // Replace an older tollgate CA under the same alias, and under
            // the alias Debian's ca-certificates-java hook gave it: after a
            // rotation `update-ca-certificates` sees the anchor's name
            // unchanged and does not call the hook, so JVMs would go on
            // trusting the old CA.
            let mut cleared = true;
            for alias in [JAVA_ALIAS, DEBIAN_JAVA_ALIAS] {
                if let Deletion::Failed(why) = keytool_delete(&keytool, &store, alias)? {
                    cleared = false;
                    failed.push(format!(
                        "could not remove an older `{alias}` from Java cacerts ({why}): JVMs may trust a CA other than this one; fix the error and run `tollgate trust install` again"
                    ));
                }
            }
            let cert = ca.cert_path().to_string_lossy().into_owned();
            let mut args: Vec<&str> = vec![
                "-J-Duser.language=en",
                "-J-Duser.country=US",
                "-importcert",
                "-noprompt",
                "-trustcacerts",
                "-alias",
                JAVA_ALIAS,
                "-file",
                &cert,
            ];
            args.extend(store.iter().map(String::as_str));
            args.extend(["-storepass", CACERTS_PASSWORD]);
            let out = run(&keytool, &args)?;
            if out.ok {
                lines.push(format!(
                    "imported the CA into Java cacerts as `{JAVA_ALIAS}`"
                ));
            } else if cleared && out.text.contains("already exists") {
                // The certificate itself is there under another alias.
                lines.push(
                    "Java cacerts already trusts the CA (added by the system store's hook)".into(),
                );
            } else {
                failed.push(format!(
                    "could not import the CA into Java cacerts ({}): {}; JVMs will not trust it: fix the error and run `tollgate trust install` again",
                    out.status, out.text
                ));
            }
        }
    }

    let bundle = ca.write_bundle()?;
    lines.push(format!(
        "wrote {} (system roots + the CA); `tollgate trust env` prints the variables for Node, Python, curl and AWS SDKs",
        bundle.display()
    ));
    Ok(Report { lines, failed })
}

fn remove_if_present(path: &Path) -> Result<bool, TrustError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(TrustError::io("remove", path, e)),
    }
}

/// Which system stores an uninstall refreshes.
#[derive(Debug, PartialEq, Eq)]
struct Refresh {
    /// `update-ca-certificates --fresh`.
    debian: bool,
    /// `update-ca-trust extract`.
    rhel: bool,
}

impl Refresh {
    /// A store is refreshed when its anchor was removed now, a link to
    /// the Debian anchor is left, or the system bundle still trusts the
    /// CA (an earlier uninstall whose refresh failed): then the store the
    /// system uses (`rhel_system`: it has RHEL's anchor directory).
    fn needed(
        removed_debian: bool,
        removed_rhel: bool,
        stale_link: bool,
        rhel_system: bool,
        still_trusted: bool,
    ) -> Refresh {
        Refresh {
            debian: removed_debian || stale_link || (still_trusted && !rhel_system),
            rhel: removed_rhel || (still_trusted && rhel_system),
        }
    }
}

/// Removes what `install` added under `root`; running it twice is harmless.
/// The CA itself stays in `state_dir/ca`.
pub fn uninstall(state_dir: &Path, root: &Path) -> Result<Report, TrustError> {
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    let host = is_host_root(root);

    let debian = under(root, DEBIAN_ANCHORS).join(ANCHOR_NAME);
    let removed_debian = remove_if_present(&debian)?;
    lines.push(if removed_debian {
        format!("removed {}", debian.display())
    } else {
        format!("{} was not present", debian.display())
    });
    let rhel = under(root, RHEL_ANCHORS).join(ANCHOR_NAME);
    let removed_rhel = remove_if_present(&rhel)?;
    if removed_rhel {
        lines.push(format!("removed {}", rhel.display()));
    }

    let stale_link = under(root, DEBIAN_LINK).symlink_metadata().is_ok();
    // RHEL's store does not read the Debian anchor directory (install
    // writes both): no update-ca-certificates there is no failure.
    let rhel = under(root, RHEL_ANCHORS).is_dir();
    // A bundle that still holds the CA (or the one it replaced) with the
    // anchors gone: an earlier uninstall whose refresh failed. Refreshed
    // again, not reported clean.
    let ca_dir = state_dir.join("ca");
    let certs: Vec<String> = [crate::ca::CERT_FILE, crate::ca::OLD_CERT_FILE]
        .iter()
        .filter_map(|f| std::fs::read_to_string(ca_dir.join(f)).ok())
        .collect();
    let trusted = || {
        certs
            .iter()
            .any(|pem| matches!(installed(pem, root), Installed::Yes { .. }))
    };
    let refresh = Refresh::needed(removed_debian, removed_rhel, stale_link, rhel, trusted());
    if host {
        if refresh.debian {
            match find_program("update-ca-certificates") {
                // A failure is said at the end: Java's store is cleaned
                // whatever happens here.
                Some(p) => match run_checked(&p, &["--fresh"], UNINSTALL_AGAIN) {
                    Ok(_) => lines.push("ran update-ca-certificates --fresh".into()),
                    Err(e) => failed.push(e.to_string()),
                },
                None if !rhel => failed.push(
                    "update-ca-certificates not found: the system store was not refreshed and may still trust the CA".into(),
                ),
                None => {}
            }
        }
        if refresh.rhel {
            match find_program("update-ca-trust") {
                Some(p) => match run_checked(&p, &["extract"], UNINSTALL_AGAIN) {
                    Ok(_) => lines.push("ran update-ca-trust extract".into()),
                    Err(e) => failed.push(e.to_string()),
                },
                None => failed.push(
                    "update-ca-trust not found: the system store was not refreshed and may still trust the CA".into(),
                ),
            }
        }
        if trusted() {
            failed.push(
                "the system bundle still holds the CA after the refresh: remove the certificate named tollgate from the trust store's sources and refresh it".into(),
            );
        }
    } else {
        for (needed, command) in [
            (refresh.debian, "update-ca-certificates --fresh"),
            (refresh.rhel, "update-ca-trust extract"),
        ] {
            if needed {
                lines.push(format!(
                    "root is {}: removed files only; run `{command}` inside that root",
                    root.display()
                ));
            }
        }
    }

    if let Some(keytool) = find_program("keytool")
        && let Ok(store) = java_store(root, &keytool)
    {
        let mut removed = false;
        for alias in [JAVA_ALIAS, DEBIAN_JAVA_ALIAS] {
            match keytool_delete(&keytool, &store, alias)? {
                Deletion::Deleted => removed = true,
                Deletion::Absent => {}
                Deletion::Failed(why) => failed.push(format!(
                    "could not remove `{alias}` from Java cacerts ({why}): JVMs may still trust the CA; remove it with keytool -delete -alias '{alias}'"
                )),
            }
        }
        if removed {
            lines.push("removed the CA from Java cacerts".into());
        } else if failed.iter().all(|f| !f.contains("Java cacerts")) {
            lines.push("the CA was not in Java cacerts".into());
        }
    }

    lines.push(format!(
        "the CA stays in {}; delete that directory to discard its key",
        state_dir.join("ca").display()
    ));
    Ok(Report { lines, failed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &Path) -> LocalCa {
        LocalCa::load_or_create(dir, &["api.openai.com".to_string()])
            .expect("CA")
            .0
    }

    #[test]
    fn env_lines_in_both_formats() {
        let t = tempfile::tempdir().expect("tempdir");
        let state = t.path().join("state dir's");
        let ca = ca(&state);
        let published = Published::of(&ca);
        let shell = env_lines(&published, EnvFormat::Shell);
        let dotenv = env_lines(&published, EnvFormat::Dotenv);
        let crt = ca.cert_path().display().to_string();
        let bundle = ca.bundle_path().display().to_string();
        assert!(
            dotenv.contains(&format!("NODE_EXTRA_CA_CERTS={crt}\n")),
            "{dotenv}"
        );
        for v in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "AWS_CA_BUNDLE",
        ] {
            assert!(
                dotenv.contains(&format!("{v}={bundle}\n")),
                "{v} in {dotenv}"
            );
            assert!(
                shell.contains(&format!("export {v}='")),
                "{v} quoted in {shell}"
            );
        }
        assert_eq!(shell.lines().count(), 5);
        assert!(shell.contains(r"state dir'\''s/ca/bundle.pem'"), "{shell}");
        // A shell reads the quoted value back unchanged.
        if Path::new("/bin/sh").exists() {
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("{shell}printf %s \"$AWS_CA_BUNDLE\""))
                .output()
                .expect("sh runs");
            assert_eq!(String::from_utf8_lossy(&out.stdout), bundle);
        }
        assert_eq!(
            shell_quote("/var/lib/tollgate/ca/ca.crt"),
            "/var/lib/tollgate/ca/ca.crt"
        );
    }

    fn keytool_list(keytool: &Path, ks: &Path, alias: &str) -> bool {
        Command::new(keytool)
            .args(["-list", "-alias", alias, "-keystore"])
            .arg(ks)
            .args(["-storepass", CACERTS_PASSWORD])
            .output()
            .expect("keytool runs")
            .status
            .success()
    }

    #[test]
    fn install_and_uninstall_under_a_temp_root() {
        install_and_uninstall(false);
    }

    #[test]
    #[ignore = "needs a JDK (keytool on PATH; cargo xtask setup installs one)"]
    fn install_and_uninstall_under_a_temp_root_with_java_cacerts() {
        install_and_uninstall(true);
    }

    /// With `java`, the root has a Java cacerts (made with the host's
    /// keytool) that install imports into and uninstall cleans.
    fn install_and_uninstall(java: bool) {
        let t = tempfile::tempdir().expect("tempdir");
        let ca = ca(&t.path().join("state"));
        let root = t.path().join("root");
        std::fs::create_dir_all(&root).expect("root");
        assert!(!is_host_root(&root));
        assert!(is_host_root(Path::new("/")));

        // A Java cacerts under the root with one unrelated entry.
        let keytool = java.then(|| {
            find_program("keytool").expect("keytool on PATH (cargo xtask setup installs a JDK)")
        });
        let ks = root.join(DEBIAN_CACERTS);
        if let Some(kt) = &keytool {
            std::fs::create_dir_all(ks.parent().expect("parent")).expect("java dir");
            let other = t.path().join("other.crt");
            let other_ca = ca_other(t.path());
            std::fs::write(&other, other_ca).expect("write");
            // An unrelated CA, and an older tollgate CA as Debian's Java
            // hook imported it.
            for alias in ["other", DEBIAN_JAVA_ALIAS] {
                let ok = Command::new(kt)
                    .args(["-importcert", "-noprompt", "-alias", alias, "-file"])
                    .arg(&other)
                    .arg("-keystore")
                    .arg(&ks)
                    .args(["-storepass", CACERTS_PASSWORD])
                    .output()
                    .expect("keytool runs");
                assert!(
                    ok.status.success(),
                    "{}",
                    String::from_utf8_lossy(&ok.stderr)
                );
            }
        }

        let report = install(&ca, &root).expect("install");
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let text = report.lines.join("\n");
        let anchor = root.join(DEBIAN_ANCHORS).join(ANCHOR_NAME);
        assert_eq!(
            std::fs::read_to_string(&anchor).expect("anchor"),
            ca.cert_pem()
        );
        assert!(text.contains("wrote files only"), "{text}");
        assert!(!text.contains(CACERTS_PASSWORD), "{text}");
        if let Some(kt) = &keytool {
            assert!(text.contains("imported the CA into Java"), "{text}");
            assert!(keytool_list(kt, &ks, JAVA_ALIAS));
            assert!(
                !keytool_list(kt, &ks, DEBIAN_JAVA_ALIAS),
                "the old CA under the hook's alias is no longer trusted"
            );
            // Again: replaces, does not fail.
            install(&ca, &root).expect("second install");
            assert!(keytool_list(kt, &ks, JAVA_ALIAS));
        }

        let report = uninstall(&t.path().join("state"), &root).expect("uninstall");
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        let text = report.lines.join("\n");
        assert!(!anchor.exists());
        assert!(text.contains("removed"), "{text}");
        if let Some(kt) = &keytool {
            assert!(!keytool_list(kt, &ks, JAVA_ALIAS), "alias removed");
            assert!(keytool_list(kt, &ks, "other"), "unrelated entry kept");
        }
        let text = uninstall(&t.path().join("state"), &root)
            .expect("idempotent")
            .lines
            .join("\n");
        assert!(text.contains("was not present"), "{text}");
    }

    #[test]
    fn a_keytool_deletion_is_told_from_an_absent_alias_and_a_failure() {
        assert_eq!(Deletion::of(true, ""), Deletion::Deleted);
        assert_eq!(
            Deletion::of(
                false,
                "keytool error: java.lang.Exception: Alias <tollgate-local-ca> does not exist"
            ),
            Deletion::Absent
        );
        assert!(matches!(
            Deletion::of(
                false,
                "keytool error: java.io.IOException: keystore password was incorrect"
            ),
            Deletion::Failed(_)
        ));
    }

    /// keytool says an alias is absent on stdout; a JVM's own note
    /// (`Picked up JAVA_TOOL_OPTIONS`) on stderr must not hide it.
    #[test]
    fn a_message_on_stdout_is_read_past_notes_on_stderr() {
        let out = run(
            Path::new("/bin/sh"),
            &[
                "-c",
                "echo 'Picked up JAVA_TOOL_OPTIONS: -Xmx1g' >&2; echo 'keytool error: java.lang.Exception: Alias <tollgate-local-ca> does not exist'; exit 1",
            ],
        )
        .expect("sh runs");
        assert_eq!(Deletion::of(out.ok, &out.text), Deletion::Absent);
        // A JVM's echo of its options, which may hold a password, is left
        // out of the message; and keytool is run without them.
        let out = run(
            Path::new("/bin/sh"),
            &[
                "-c",
                "echo 'Picked up _JAVA_OPTIONS: -Djavax.net.ssl.keyStorePassword=Hunter2' >&2; echo \"opts=$JAVA_TOOL_OPTIONS$_JAVA_OPTIONS$JDK_JAVA_OPTIONS.\"; exit 1",
            ],
        )
        .expect("sh runs");
        assert_eq!(out.text, "opts=.");
        let c = command(Path::new("keytool"), &["-list"]);
        let removed: Vec<_> = c
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for v in JVM_OPTION_VARIABLES {
            assert!(removed.iter().any(|r| r == v), "{v} in {removed:?}");
        }
    }

    /// A Java cacerts under `root` with `cert` as `alias`, made with a
    /// store password other than the one tollgate uses.
    fn foreign_cacerts(root: &Path, alias: &str, cert: &Path) {
        let kt = find_program("keytool").expect("keytool on PATH");
        let ks = root.join(DEBIAN_CACERTS);
        std::fs::create_dir_all(ks.parent().expect("parent")).expect("java dir");
        let out = Command::new(&kt)
            .args(["-importcert", "-noprompt", "-alias", alias, "-file"])
            .arg(cert)
            .arg("-keystore")
            .arg(&ks)
            .args(["-storepass", "not-changeit"])
            .output()
            .expect("keytool runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `uninstall` with a Java cacerts keytool cannot open (another store
    /// password: any failure) says so and fails, rather than reporting
    /// the CA absent while JVMs still trust it.
    #[test]
    #[ignore = "needs a JDK (keytool on PATH; cargo xtask setup installs one)"]
    fn uninstall_fails_when_java_cacerts_cannot_be_cleaned() {
        let t = tempfile::tempdir().expect("tempdir");
        let ca = ca(&t.path().join("state"));
        let root = t.path().join("root");
        foreign_cacerts(&root, JAVA_ALIAS, ca.cert_path());
        let report = uninstall(&t.path().join("state"), &root).expect("uninstall runs");
        let text = report.lines.join("\n");
        assert!(!text.contains("was not in Java cacerts"), "{text}");
        assert_eq!(report.failed.len(), 2, "{:?}", report.failed);
        assert!(
            report.failed[0].contains("JVMs may still trust the CA"),
            "{:?}",
            report.failed
        );
        assert!(!report.failed.join(" ").contains(CACERTS_PASSWORD));
        let err = report.finish().expect_err("a failure");
        assert_eq!(err.exit_code(), crate::exit::UNAVAILABLE);
    }

    /// `install` with a Java cacerts keytool cannot open fails (exit 69)
    /// after doing the rest, rather than saying it is done while JVMs do
    /// not trust the CA.
    #[test]
    #[ignore = "needs a JDK (keytool on PATH; cargo xtask setup installs one)"]
    fn install_fails_when_java_cacerts_cannot_take_the_ca() {
        let t = tempfile::tempdir().expect("tempdir");
        let ca = ca(&t.path().join("state"));
        let root = t.path().join("root");
        let other = t.path().join("other.crt");
        std::fs::write(&other, ca_other(t.path())).expect("write");
        foreign_cacerts(&root, "other", &other);
        let report = install(&ca, &root).expect("install runs");
        assert!(
            report.failed.iter().any(|f| f.contains("could not import")),
            "{:?}",
            report.failed
        );
        // The rest is done all the same.
        assert!(root.join(DEBIAN_ANCHORS).join(ANCHOR_NAME).exists());
        assert!(ca.bundle_path().exists());
        assert!(!report.failed.join(" ").contains(CACERTS_PASSWORD));
        let err = report.finish().expect_err("a failure");
        assert_eq!(err.exit_code(), crate::exit::UNAVAILABLE);
    }

    #[test]
    fn an_uninstall_refreshes_the_stores_that_need_it() {
        let r = |d, r, link, rhel, trusted| {
            let x = Refresh::needed(d, r, link, rhel, trusted);
            (x.debian, x.rhel)
        };
        assert_eq!(r(false, false, false, false, false), (false, false));
        assert_eq!(r(true, false, false, false, false), (true, false));
        assert_eq!(r(false, false, true, false, false), (true, false));
        assert_eq!(r(true, true, false, true, false), (true, true));
        // Nothing removed now, the bundle still trusting the CA: the store
        // this system uses.
        assert_eq!(r(false, false, false, false, true), (true, false));
        assert_eq!(r(false, false, false, true, true), (false, true));
    }

    /// An uninstall whose store refresh failed removed the anchor but left
    /// the bundle trusting the CA: the next uninstall says the store must
    /// be refreshed, not that nothing was there.
    #[test]
    fn uninstall_again_refreshes_a_store_that_still_trusts_the_ca() {
        let t = tempfile::tempdir().expect("tempdir");
        let state = t.path().join("state");
        let mine = ca(&state);
        let root = t.path().join("root");
        let bundle = root.join(crate::ca::SYSTEM_BUNDLES[0].trim_start_matches('/'));
        std::fs::create_dir_all(bundle.parent().expect("dir")).expect("dirs");
        std::fs::write(
            &bundle,
            format!("{}\n{}", ca_other(t.path()), mine.cert_pem()),
        )
        .expect("bundle");
        let text = uninstall(&state, &root)
            .expect("uninstall runs")
            .lines
            .join("\n");
        assert!(text.contains("was not present"), "{text}");
        assert!(
            text.contains("run `update-ca-certificates --fresh` inside that root"),
            "{text}"
        );
        // A store that no longer holds it needs nothing.
        std::fs::write(&bundle, ca_other(t.path())).expect("bundle");
        let text = uninstall(&state, &root)
            .expect("uninstall runs")
            .lines
            .join("\n");
        assert!(!text.contains("inside that root"), "{text}");
    }

    /// JDK 8's keytool has no `-cacerts`: the store is found as a file
    /// from where keytool lives, its links followed.
    #[test]
    fn a_keytools_cacerts_is_found_beside_it_or_under_jre() {
        let t = tempfile::tempdir().expect("tempdir");
        let jdk8 = t.path().join("java-8/jre");
        std::fs::create_dir_all(jdk8.join("bin")).expect("bin");
        std::fs::create_dir_all(jdk8.join("lib/security")).expect("security");
        std::fs::write(jdk8.join("bin/keytool"), "").expect("keytool");
        std::fs::write(jdk8.join("lib/security/cacerts"), "").expect("cacerts");
        let bin = t.path().join("usr/bin");
        std::fs::create_dir_all(&bin).expect("usr/bin");
        std::os::unix::fs::symlink(jdk8.join("bin/keytool"), bin.join("keytool")).expect("link");
        let found = cacerts_of(&bin.join("keytool")).expect("found");
        assert_eq!(
            found,
            std::fs::canonicalize(jdk8.join("lib/security/cacerts")).expect("real")
        );
        // The JDK's own bin, with the store under jre/.
        let jdk = t.path().join("java-8");
        std::fs::create_dir_all(jdk.join("bin")).expect("bin");
        std::fs::write(jdk.join("bin/keytool"), "").expect("keytool");
        assert!(
            cacerts_of(&jdk.join("bin/keytool"))
                .is_some_and(|p| p.ends_with("java-8/jre/lib/security/cacerts"))
        );
        // None beside it: `-cacerts` is left to keytool.
        assert_eq!(cacerts_of(&t.path().join("nowhere/bin/keytool")), None);
        assert_eq!(
            java_store(Path::new("/"), &t.path().join("nowhere/bin/keytool")),
            Ok(vec!["-cacerts".to_string()])
        );
    }

    #[test]
    fn whether_the_system_store_trusts_the_ca() {
        let t = tempfile::tempdir().expect("tempdir");
        let mine = ca(&t.path().join("state"));
        let pem = mine.cert_pem();
        let root = t.path().join("root");
        assert_eq!(installed(pem, &root), Installed::No);
        // The anchor, before the bundle was rebuilt.
        let anchor = root.join(DEBIAN_ANCHORS).join(ANCHOR_NAME);
        std::fs::create_dir_all(anchor.parent().expect("dir")).expect("dirs");
        std::fs::write(&anchor, pem).expect("anchor");
        let bundle = root.join(crate::ca::SYSTEM_BUNDLES[0].trim_start_matches('/'));
        std::fs::create_dir_all(bundle.parent().expect("dir")).expect("dirs");
        let other = ca_other(t.path());
        std::fs::write(&bundle, &other).expect("bundle");
        assert_eq!(
            installed(pem, &root),
            Installed::NotInBundle {
                anchor: anchor.clone()
            }
        );
        // Rebuilt: the bundle holds it among others.
        std::fs::write(&bundle, format!("{other}\n{pem}")).expect("bundle");
        assert_eq!(installed(pem, &root), Installed::Yes { bundle });
        // The CA replaced since: the anchor holds the old one.
        std::fs::write(&anchor, &other).expect("anchor");
        assert_eq!(installed(pem, &root), Installed::Stale { anchor });
    }

    fn ca_other(dir: &Path) -> String {
        LocalCa::load_or_create(&dir.join("other"), &["example.org".to_string()])
            .expect("other CA")
            .0
            .cert_pem()
            .to_string()
    }

    #[test]
    fn errors_map_to_exit_codes() {
        let e = TrustError::io(
            "remove",
            Path::new("/x"),
            std::io::ErrorKind::PermissionDenied.into(),
        );
        assert_eq!(e.exit_code(), crate::exit::NOPERM);
        let e = TrustError::Command {
            command: "update-ca-certificates".into(),
            status: "exit status: 1".into(),
            stderr: "boom".into(),
            advice: UNINSTALL_AGAIN,
        };
        assert_eq!(e.exit_code(), crate::exit::UNAVAILABLE);
        assert!(e.to_string().contains("boom"));
        assert!(e.to_string().contains("trust uninstall` again"), "{e}");
    }
}
