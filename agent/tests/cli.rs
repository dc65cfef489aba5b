//! The command line as a user meets it: help, version, config errors and
//! their exit codes, report on an empty state directory. No kernel needed.

use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn version_and_help() {
    let o = tollgate().arg("--version").output().unwrap();
    assert!(o.status.success());
    assert!(text(&o).starts_with("tollgate "), "{}", text(&o));
    let o = tollgate().arg("--help").output().unwrap();
    assert!(o.status.success());
    for cmd in ["run", "report", "trust", "--config"] {
        assert!(text(&o).contains(cmd), "help lacks {cmd}: {}", text(&o));
    }
    let o = tollgate().args(["trust", "--help"]).output().unwrap();
    for cmd in ["install", "uninstall", "env"] {
        assert!(text(&o).contains(cmd), "{}", text(&o));
    }
}

#[test]
fn every_command_takes_version() {
    for cmd in [&["report"][..], &["trust", "env"], &["top"], &["run"]] {
        let o = tollgate().args(cmd).arg("--version").output().unwrap();
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
        assert!(text(&o).contains(env!("CARGO_PKG_VERSION")), "{}", text(&o));
    }
}

#[test]
fn bad_command_line_is_a_usage_error() {
    for args in [&["frobnicate"][..], &["report", "--by", "colour"], &[]] {
        let o = tollgate().args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", text(&o));
        // clap's message, pointing at --help or showing the usage.
        let t = text(&o);
        assert!(t.contains("--help") || t.contains("Usage"), "{args:?}: {t}");
    }
}

#[test]
fn unknown_config_key_is_a_usage_error_with_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, "[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap();
    let o = tollgate()
        .arg("--config")
        .arg(&cfg)
        .arg("report")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("t.toml") && t.contains("line 3") && t.contains("lisen"),
        "{t}"
    );
}

#[test]
fn invalid_value_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, "[proxy]\nlisten = \"0.0.0.0:15443\"\n").unwrap();
    let o = tollgate()
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("loopback"), "{}", text(&o));
}

#[test]
fn missing_explicit_config_is_a_usage_error() {
    let o = tollgate()
        .args(["--config", "/nonexistent/tollgate.toml", "report"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(
        text(&o).contains("/nonexistent/tollgate.toml"),
        "{}",
        text(&o)
    );
}

#[test]
fn report_on_an_empty_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(
        &cfg,
        format!("state_dir = {:?}\n", dir.path().join("state")),
    )
    .unwrap();
    let o = tollgate()
        .arg("--config")
        .arg(&cfg)
        .arg("report")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // No ledger at all: not "nothing recorded yet", but where it looked.
    let ledger = dir.path().join("state").join("ledger.sqlite");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!(
            "no ledger at {}: nothing has been recorded there (is the agent running, with this config's state_dir?)\n",
            ledger.display()
        )
    );
    let o = tollgate()
        .arg("--config")
        .arg(&cfg)
        .args(["report", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]));
}

/// Filters that match none of the ledger's rows say so, with the count,
/// where "no requests recorded yet" would read as an empty ledger.
#[test]
fn report_filters_that_match_nothing_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, format!("state_dir = {state:?}\n")).unwrap();
    let mut ledger = tollgate::ledger::Ledger::open(&state.join("ledger.sqlite")).unwrap();
    let mut rec = tollgate::meter::UsageRecord {
        started_at_ms: 1_700_000_000_000,
        provider: "openai".into(),
        operation: "chat".into(),
        status: 200,
        ..Default::default()
    };
    rec.who = tollgate::meter::Attribution {
        repository: Some("acme/app".into()),
        ..Default::default()
    }
    .into();
    ledger.insert_batch(&[rec]).unwrap();
    drop(ledger);
    let report = |args: &[&str]| {
        let o = tollgate()
            .arg("--config")
            .arg(&cfg)
            .arg("report")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    for format in [&[][..], &["--markdown"]] {
        let out = report(&[&["--repository", "Acme/App"], format].concat());
        assert_eq!(
            out,
            "no requests match these filters (1 requests in the ledger; names match exactly, case included: --repository \"acme/app\" is in the ledger)\n"
        );
    }
    let out = report(&["--repository", "acme/app", "--by", "repository"]);
    assert!(out.contains("acme/app"), "{out}");
}

#[test]
fn report_changes_no_file_even_as_root() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, format!("state_dir = {state:?}\n")).unwrap();
    let ledger = state.join("ledger.sqlite");
    let report = || {
        tollgate()
            .arg("--config")
            .arg(&cfg)
            .arg("report")
            .output()
            .unwrap()
    };
    // An empty file (no table yet) is an empty ledger, and stays empty.
    std::fs::write(&ledger, b"").unwrap();
    let o = report();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no requests recorded"), "{}", text(&o));
    assert_eq!(std::fs::metadata(&ledger).unwrap().len(), 0);
    // Another program's database is refused, not taken over.
    std::fs::remove_file(&ledger).unwrap();
    rusqlite::Connection::open(&ledger)
        .unwrap()
        .execute_batch("CREATE TABLE notes (body TEXT);")
        .unwrap();
    let before = std::fs::read(&ledger).unwrap();
    let o = report();
    assert_eq!(o.status.code(), Some(69), "{}", text(&o));
    assert!(text(&o).contains("does not change it"), "{}", text(&o));
    assert_eq!(std::fs::read(&ledger).unwrap(), before);
    let names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ledger.sqlite"], "nothing created beside it");
}

#[test]
fn trust_env_creates_the_ca_and_prints_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(
        &cfg,
        format!("state_dir = {:?}\n", dir.path().join("state")),
    )
    .unwrap();
    let o = tollgate()
        .arg("--config")
        .arg(&cfg)
        .args(["trust", "env"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let shell = String::from_utf8_lossy(&o.stdout).into_owned();
    for var in [
        "NODE_EXTRA_CA_CERTS",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "AWS_CA_BUNDLE",
    ] {
        assert!(shell.contains(&format!("export {var}=")), "{shell}");
    }
    let o = tollgate()
        .arg("--config")
        .arg(&cfg)
        .args(["trust", "env", "--format", "dotenv"])
        .output()
        .unwrap();
    let dotenv = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(!dotenv.contains("export "), "{dotenv}");
    let ca_line = dotenv
        .lines()
        .find(|l| l.starts_with("NODE_EXTRA_CA_CERTS="))
        .unwrap();
    let ca_path = ca_line.split_once('=').unwrap().1.trim_matches('"');
    let pem = std::fs::read_to_string(ca_path).unwrap();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1, "the CA alone");
    let bundle_line = dotenv
        .lines()
        .find(|l| l.starts_with("SSL_CERT_FILE="))
        .unwrap();
    let bundle =
        std::fs::read_to_string(bundle_line.split_once('=').unwrap().1.trim_matches('"')).unwrap();
    assert!(bundle.contains(pem.trim()), "the bundle holds the CA");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A directory other users may enter, holding a copy of the binary they
/// can run (root only).
fn shared_dir_with_binary() -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    assert!(is_root(), "run as root (cargo xtask test does)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("tollgate");
    std::fs::copy(env!("CARGO_BIN_EXE_tollgate"), &bin).unwrap();
    (dir, bin)
}

/// `tollgate ARGS` as user `nobody` (the binary copied where it can run it).
fn as_nobody(bin: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin)
        .args(args)
        .output()
        .expect("setpriv")
}

#[test]
#[ignore = "needs root (runs tollgate as another user)"]
fn trust_env_is_read_only_and_any_user_may_ask() {
    use std::os::unix::fs::PermissionsExt as _;
    let (dir, bin) = shared_dir_with_binary();
    let state = dir.path().join("state");
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, format!("state_dir = {state:?}\n")).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let env = |as_root: bool| {
        let args = ["--config", cfg_s, "trust", "env", "--format", "dotenv"];
        if as_root {
            tollgate().args(args).output().unwrap()
        } else {
            as_nobody(&bin, &args)
        }
    };
    // Before there is a CA, another user is told who can make it.
    std::fs::create_dir_all(&state).unwrap();
    let none = env(false);
    assert_eq!(none.status.code(), Some(77), "{}", text(&none));
    assert!(text(&none).contains("no local CA"), "{}", text(&none));
    // Root makes the CA; then any user gets the same paths, with no key
    // or lock opened and no warning (the files are world-readable).
    let first = env(true);
    assert!(first.status.success(), "{}", text(&first));
    let theirs = env(false);
    assert!(theirs.status.success(), "{}", text(&theirs));
    assert_eq!(theirs.stdout, first.stdout);
    assert!(theirs.stderr.is_empty(), "{}", text(&theirs));
    // A config that adds a host does not rotate the CA under a running
    // agent: `trust env` only prints paths.
    let crt = state.join("ca/ca.crt");
    let before = std::fs::read(&crt).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {state:?}\n[[providers]]\nhosts = [\"llm.corp.example\"]\napi = \"openai\"\n"
        ),
    )
    .unwrap();
    assert!(env(true).status.success());
    assert_eq!(
        std::fs::read(&crt).unwrap(),
        before,
        "the CA was not replaced"
    );
    // A private state directory: jobs could not read the bundle, and the
    // user is told so.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let o = env(true);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot read") && err.contains("bundle.pem"),
        "{err}"
    );
    // Another user is told the CA exists but is not readable to them.
    let o = env(false);
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(text(&o).contains("exists, but"), "{}", text(&o));
    // `trust install` refuses a state directory other users can write.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let o = tollgate()
        .args(["--config", cfg_s, "trust", "install", "--root"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(77), "{}", text(&o));
    assert!(text(&o).contains("writable by other users"), "{}", text(&o));
}

#[test]
fn trust_rotate_replaces_the_ca_and_installs_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, format!("state_dir = {state:?}\n")).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let run = |args: &[&str]| {
        tollgate()
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .arg("--root")
            .arg(&root)
            .output()
            .unwrap()
    };
    let o = run(&["trust", "install"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("restart the agent"), "{}", text(&o));
    let ca = state.join("ca");
    let before = std::fs::read_to_string(ca.join("ca.crt")).unwrap();
    // A new provider host: install replaces the CA, and says a running
    // agent must be restarted.
    std::fs::write(
        &cfg,
        format!("state_dir = {state:?}\n[[providers]]\nhosts = [\"llm.corp.example\"]\napi = \"openai\"\n"),
    )
    .unwrap();
    let o = run(&["trust", "install"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("replaced the local CA"), "{}", text(&o));
    assert!(text(&o).contains("restart the agent"), "{}", text(&o));
    // Not the agent's advice to run the command that is running.
    assert!(!text(&o).contains("trust install` "), "{}", text(&o));
    let before = {
        let now = std::fs::read_to_string(ca.join("ca.crt")).unwrap();
        assert_ne!(now, before, "a new root for the new host");
        now
    };
    let o = run(&["trust", "rotate"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("restart the agent"), "{}", text(&o));
    let after = std::fs::read_to_string(ca.join("ca.crt")).unwrap();
    assert_ne!(after, before, "a new root");
    assert_eq!(
        std::fs::read_to_string(ca.join("ca.crt.old")).unwrap(),
        before
    );
    assert!(ca.join("intermediate.crt").is_file());
    let anchor = root.join("usr/local/share/ca-certificates/tollgate-local-ca.crt");
    assert_eq!(
        std::fs::read_to_string(anchor).unwrap(),
        after,
        "the new root is installed"
    );
}

/// A config for `check` under `dir`: its own state directory, a free port,
/// a control socket nobody answers, no OTLP export, and every catalogue
/// host at a loopback address (no DNS query leaves the machine).
fn check_config(dir: &std::path::Path) -> std::path::PathBuf {
    let cfg = dir.join("t.toml");
    let mut overrides = String::from("[resolver.overrides]\n");
    for h in tollgate::providers::catalogue::builtin_hosts() {
        overrides += &format!("{h:?} = [\"127.0.0.9\"]\n");
    }
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[proxy]\nlisten = \"127.0.0.1:0\"\n[control]\nsocket = {:?}\n[export.otlp]\nenabled = false\n{overrides}",
            dir.join("state"),
            dir.join("control.sock")
        ),
    )
    .unwrap();
    cfg
}

/// `tollgate check`'s lines as (level, name), and its exit code.
fn check(cfg: &std::path::Path) -> (Vec<(String, String)>, String, Option<i32>) {
    let o = tollgate()
        .arg("--config")
        .arg(cfg)
        .arg("check")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let names = [
        "config",
        "root",
        "cgroup",
        "kernel",
        "state directory",
        "local CA",
        "trust",
        "ledger",
        "upstream",
        "listener",
        "providers",
        "collector",
        "audit log",
    ];
    let lines = out
        .lines()
        .filter_map(|l| {
            let (level, rest) = l.split_once("  ")?;
            let rest = rest.trim_start();
            let name = names.iter().find(|n| rest.starts_with(**n))?;
            Some((level.trim().to_string(), name.to_string()))
        })
        .collect();
    (lines, text(&o), o.status.code())
}

/// The line of `tollgate check`'s output for the check `name`.
fn check_line(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(name)))
        .unwrap_or_else(|| panic!("no {name} line: {out}"))
        .to_string()
}

fn level_of<'a>(lines: &'a [(String, String)], name: &str) -> &'a str {
    lines
        .iter()
        .find(|(_, n)| n == name)
        .map(|(l, _)| l.as_str())
        .unwrap_or_else(|| panic!("no {name} line: {lines:?}"))
}

#[test]
fn check_reports_every_check_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = check_config(dir.path());
    let (lines, out, code) = check(&cfg);
    assert_eq!(lines.len(), 13, "{out}");
    for (name, want) in [
        ("audit log", "skip"),
        ("config", "ok"),
        ("state directory", "ok"),
        ("local CA", "ok"),
        ("trust", "skip"),
        ("ledger", "ok"),
        ("upstream", "ok"),
        ("listener", "ok"),
        ("providers", "ok"),
        ("collector", "skip"),
    ] {
        assert_eq!(level_of(&lines, name), want, "{name}: {out}");
    }
    assert!(out.contains("created at the first start"), "{out}");
    if is_root() {
        assert_eq!(level_of(&lines, "root"), "ok", "{out}");
        // This machine runs the kernel tests: it can run the agent.
        assert_eq!(level_of(&lines, "kernel"), "ok", "{out}");
        assert_eq!(level_of(&lines, "cgroup"), "ok", "{out}");
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("tollgate can run here"), "{out}");
    } else {
        assert_eq!(level_of(&lines, "root"), "FAIL", "{out}");
        assert_eq!(level_of(&lines, "kernel"), "skip", "{out}");
        assert_eq!(code, Some(69), "{out}");
    }
    assert!(
        !dir.path().join("state").exists(),
        "check created the state directory"
    );
}

#[test]
#[ignore = "needs root: `trust env` makes the CA only as root"]
fn check_fails_on_an_unsafe_state_dir_and_a_taken_port_and_sees_an_existing_ca() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let cfg = check_config(dir.path());
    // A CA as the agent makes it (`trust env` makes one when there is
    // none).
    let o = tollgate()
        .arg("--config")
        .arg(&cfg)
        .args(["trust", "env"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // And a ledger, as the agent opens it.
    tollgate::ledger::Ledger::open(&dir.path().join("state/ledger.sqlite")).unwrap();
    let (lines, out, _) = check(&cfg);
    assert_eq!(level_of(&lines, "local CA"), "ok", "{out}");
    assert!(out.contains("covers every provider host"), "{out}");
    assert_eq!(level_of(&lines, "ledger"), "ok", "{out}");
    assert!(!out.contains("created at the first start"), "{out}");
    // The machine's own store does not trust a test's CA.
    let trust = level_of(&lines, "trust");
    assert!(trust == "warn" || trust == "FAIL", "{out}");
    // A host added to the config: the next start replaces the CA.
    let with_host = format!(
        "{}[[providers]]\nhosts = [\"llm.internal.example\"]\napi = \"openai\"\n",
        std::fs::read_to_string(&cfg).unwrap()
    );
    let cfg2 = dir.path().join("t2.toml");
    std::fs::write(&cfg2, with_host).unwrap();
    let (lines, out, _) = check(&cfg2);
    assert_eq!(level_of(&lines, "local CA"), "warn", "{out}");
    assert!(out.contains("does not cover llm.internal.example"), "{out}");
    assert_eq!(level_of(&lines, "trust"), "warn", "{out}");
    assert!(out.contains("replaced at the next start"), "{out}");
    // A CA whose key is gone cannot be used: the next start replaces it.
    let key = dir.path().join("state/ca/ca.key");
    let kept = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let (lines, out, _) = check(&cfg);
    assert_eq!(level_of(&lines, "local CA"), "warn", "{out}");
    assert!(
        out.contains("cannot be used") && out.contains("ca.key is missing"),
        "{out}"
    );
    std::fs::write(&key, kept).unwrap();
    // A port in use, and a state directory anyone may write.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text_cfg = std::fs::read_to_string(&cfg).unwrap().replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&cfg, text_cfg).unwrap();
    let state = dir.path().join("state");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (lines, out, code) = check(&cfg);
    assert_eq!(level_of(&lines, "listener"), "FAIL", "{out}");
    assert_eq!(level_of(&lines, "state directory"), "FAIL", "{out}");
    assert!(out.contains("writable by other users"), "{out}");
    assert_eq!(code, Some(69), "{out}");
    assert!(out.contains("checks failed"), "{out}");
}

#[test]
#[ignore = "needs root (runs tollgate as another user)"]
fn check_as_another_user_fails_on_root_and_skips_the_kernel() {
    let (dir, bin) = shared_dir_with_binary();
    let cfg = check_config(dir.path());
    // A correct install: the state directory is root's, mode 755.
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o755)
        .create(dir.path().join("state"))
        .unwrap();
    std::fs::set_permissions(
        dir.path().join("state"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let o = as_nobody(&bin, &["--config", cfg.to_str().unwrap(), "check"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(69), "{out}");
    let line = |name: &str| check_line(&out, name);
    assert!(line("root").starts_with("FAIL"), "{out}");
    assert!(line("kernel").starts_with("skip"), "{out}");
    assert!(line("state directory").starts_with("ok"), "{out}");
}

/// A cgroup the test makes under the hierarchy's root and removes when
/// dropped, even when the test fails (a process it left is killed first).
struct ChildCgroup(std::path::PathBuf);

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if !self.0.exists() {
                return;
            }
            let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() && std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: plain kill(2) of a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.0.display());
    }
}

#[test]
#[ignore = "needs root (runs tollgate in a cgroup namespace of its own)"]
fn check_warns_in_a_container_cgroup_namespace() {
    // What a containerised agent sees: a cgroup namespace rooted at a
    // child cgroup, and a cgroup2 mount made inside it (here over the
    // host's mount point, in a mount namespace of the test's own), which
    // shows that child, so the default cgroup covers only the container.
    let root = tollgate::intercept::cgroup2_root().expect("a cgroup v2 root");
    let child = ChildCgroup(root.join(format!("tollgate-test-ns-{}", std::process::id())));
    std::fs::create_dir(&child.0).expect("create a child cgroup");
    let dir = tempfile::tempdir().unwrap();
    let cfg = check_config(dir.path());
    let run = |cfg: &std::path::Path| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(
                r#"echo $$ > "$1/cgroup.procs" && exec unshare --cgroup --mount --propagation private sh -c 'umount -l "$1" && mount -t cgroup2 none "$1" && exec "$2" --config "$3" check' - "$4" "$2" "$3""#,
            )
            .arg("-")
            .arg(&child.0)
            .arg(env!("CARGO_BIN_EXE_tollgate"))
            .arg(cfg)
            .arg(&root)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            .output()
            .expect("sh runs");
        let out = text(&o);
        (check_line(&out, "cgroup"), o.status.code(), out)
    };
    let (line, code, out) = run(&cfg);
    assert!(line.starts_with("warn"), "{out}");
    assert!(line.contains("cgroup namespace's root"), "{out}");
    assert_eq!(code, Some(0), "a warning is not a failure: {out}");

    // The host's own view (the same check outside the namespace) is ok.
    let (lines, out, _) = check(&cfg);
    assert_eq!(level_of(&lines, "cgroup"), "ok", "{out}");
}

#[test]
#[ignore = "needs root (runs tollgate in a pid namespace of its own)"]
fn a_pid_namespace_of_its_own_warns_and_refuses_inside_the_intercepted_cgroup() {
    // A container without the host's pids: the kernel's pids are not the
    // ones its /proc shows, and the programs cannot tell the agent's own
    // connections from a job's.
    let root = tollgate::intercept::cgroup2_root().expect("a cgroup v2 root");
    let child = ChildCgroup(root.join(format!("tollgate-test-pidns-{}", std::process::id())));
    std::fs::create_dir(&child.0).expect("create a child cgroup");
    let dir = tempfile::tempdir().unwrap();
    let cfg = check_config(dir.path());
    let base = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{base}[intercept]\ncgroup = {:?}\n", child.0)).unwrap();
    // `inside`: the process joins the intercepted cgroup first.
    let in_pid_ns = |inside: bool, command: &str| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(
                r#"if [ "$1" = yes ]; then echo $$ > "$2/cgroup.procs" || exit 99; fi
exec timeout -s KILL 60 unshare --pid --fork --kill-child --mount-proc "$3" --config "$4" "$5""#,
            )
            .arg("-")
            .arg(if inside { "yes" } else { "no" })
            .arg(&child.0)
            .arg(env!("CARGO_BIN_EXE_tollgate"))
            .arg(&cfg)
            .arg(command)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            .output()
            .expect("sh runs");
        (text(&o), o.status.code())
    };

    // Jobs elsewhere: it works, without process details; a warning.
    let (out, code) = in_pid_ns(false, "check");
    let line = check_line(&out, "cgroup");
    assert!(line.starts_with("warn"), "{out}");
    assert!(line.contains("pid namespace of its own"), "{out}");
    assert_eq!(code, Some(0), "a warning is not a failure: {out}");

    // Inside the cgroup it would intercept: its upstream connects would
    // come back to it. `check` fails, and `run` refuses to start.
    let (out, code) = in_pid_ns(true, "check");
    let line = check_line(&out, "cgroup");
    assert!(line.starts_with("FAIL"), "{out}");
    assert!(line.contains("sent back to it"), "{out}");
    assert_eq!(code, Some(69), "{out}");
    let (out, code) = in_pid_ns(true, "run");
    assert_eq!(code, Some(69), "{out}");
    assert!(
        out.contains("inside the cgroup it would intercept") && out.contains("--pid=host"),
        "{out}"
    );

    // Outside it, the same check is ok.
    let (lines, out, _) = check(&cfg);
    assert_eq!(level_of(&lines, "cgroup"), "ok", "{out}");
}

#[test]
#[ignore = "needs root (runs tollgate in a network namespace of its own)"]
fn check_says_when_the_loopback_interface_is_down() {
    // A fresh network namespace: `lo` is down, so the kernel check's own
    // loopback connection fails, which is not the socket diagnostics' fault.
    let dir = tempfile::tempdir().unwrap();
    let cfg = check_config(dir.path());
    let o = Command::new("unshare")
        .arg("-n")
        .arg(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&cfg)
        .arg("check")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        .output()
        .expect("unshare (util-linux) runs");
    let out = text(&o);
    let line = check_line(&out, "kernel");
    assert!(line.starts_with("FAIL"), "{out}");
    assert!(line.contains("ip link set lo up"), "{out}");
    assert!(!line.contains("tcp_diag"), "{out}");
    assert_eq!(o.status.code(), Some(69), "{out}");
}

#[test]
fn check_tells_a_cgroup_still_to_come_from_a_wrong_path() {
    // A service's cgroup before the service starts: `run` waits for it.
    let root = tollgate::intercept::cgroup2_root().expect("a cgroup v2 mount (tollgate needs one)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = check_config(dir.path());
    let base = std::fs::read_to_string(&cfg).unwrap();
    let with = |cgroup: &std::path::Path| {
        std::fs::write(&cfg, format!("{base}[intercept]\ncgroup = {cgroup:?}\n")).unwrap();
        let (lines, out, _) = check(&cfg);
        (level_of(&lines, "cgroup").to_string(), out)
    };
    let (level, out) = with(&root.join(format!("tollgate-test-later-{}", std::process::id())));
    assert_eq!(level, "warn", "{out}");
    assert!(out.contains("attaches when it is created"), "{out}");
    let (level, out) = with(std::path::Path::new("/nonexistent/tollgate-test"));
    assert_eq!(level, "FAIL", "{out}");
}

#[test]
fn check_judges_the_audit_log_path_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = check_config(dir.path());
    let base = std::fs::read_to_string(&cfg).unwrap();
    let with = |path: &std::path::Path| {
        std::fs::write(&cfg, format!("{base}[export.audit_log]\npath = {path:?}\n")).unwrap();
        let (lines, out, _) = check(&cfg);
        (level_of(&lines, "audit log").to_string(), out)
    };
    // A directory still to be made under a writable one: ok (a warning
    // under /tmp, where CI's clone is, see below), and not made.
    let under_tmp = dir.path().starts_with("/tmp") || dir.path().starts_with("/var/tmp");
    let fresh = dir.path().join("logs/tollgate/audit.jsonl");
    let (level, out) = with(&fresh);
    assert_eq!(level, if under_tmp { "warn" } else { "ok" }, "{out}");
    assert!(!dir.path().join("logs").exists(), "check created it");
    // A directory where the file should be.
    std::fs::create_dir_all(dir.path().join("taken.jsonl")).unwrap();
    let (level, out) = with(&dir.path().join("taken.jsonl"));
    assert_eq!(level, "FAIL", "{out}");
    // A file where a directory should be.
    std::fs::write(dir.path().join("plain"), "x").unwrap();
    let (level, out) = with(&dir.path().join("plain/audit.jsonl"));
    assert_eq!(level, "FAIL", "{out}");
    assert!(out.contains("is not a directory"), "{out}");
    // Under /tmp, which the unit makes private to the agent.
    let (level, out) = with(std::path::Path::new("/tmp/tollgate-test-audit/audit.jsonl"));
    assert_eq!(level, "warn", "{out}");
    assert!(out.contains("PrivateTmp"), "{out}");
    assert!(!std::path::Path::new("/tmp/tollgate-test-audit").exists());
    // Under a directory the systemd unit makes read-only.
    let (level, out) = with(std::path::Path::new(
        "/etc/tollgate-test-nonexistent/audit.jsonl",
    ));
    if is_root() {
        assert_eq!(level, "warn", "{out}");
        assert!(out.contains("read-only"), "{out}");
    } else {
        assert_eq!(level, "FAIL", "{out}");
    }
    assert!(!std::path::Path::new("/etc/tollgate-test-nonexistent").exists());
    // The same through a symlink: judged where the file would really be.
    std::os::unix::fs::symlink("/etc", dir.path().join("etc-link")).unwrap();
    let (level, out) = with(
        &dir.path()
            .join("etc-link/tollgate-test-nonexistent/audit.jsonl"),
    );
    if is_root() {
        assert_eq!(level, "warn", "{out}");
        assert!(out.contains("read-only"), "{out}");
        assert!(
            out.contains("that is, /etc/tollgate-test-nonexistent/audit.jsonl"),
            "{out}"
        );
    } else {
        assert_eq!(level, "FAIL", "{out}");
    }
    assert!(!std::path::Path::new("/etc/tollgate-test-nonexistent").exists());
}

#[test]
fn check_tells_an_empty_ledger_from_another_database() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = check_config(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let ledger = state.join("ledger.sqlite");
    std::fs::write(&ledger, b"").unwrap();
    let (lines, out, _) = check(&cfg);
    assert_eq!(level_of(&lines, "ledger"), "ok", "{out}");
    assert!(out.contains("empty: set up at the first start"), "{out}");
    std::fs::remove_file(&ledger).unwrap();
    rusqlite::Connection::open(&ledger)
        .unwrap()
        .execute_batch("CREATE TABLE notes (body TEXT);")
        .unwrap();
    let (lines, out, code) = check(&cfg);
    assert_eq!(level_of(&lines, "ledger"), "FAIL", "{out}");
    assert!(out.contains("without a tollgate schema"), "{out}");
    assert_eq!(code, Some(69), "{out}");
}
