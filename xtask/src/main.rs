//! `cargo xtask`: make a fresh machine ready, build, test, demo, bench.
//!
//! Owns: everything the build and the tests need that cargo does not bring
//! (the nightly rust-src, bpf-linker, llvm-tools, Debian packages, the SDK
//! virtualenv, the benchmark's peer gateways), and the profile-guided
//! release build (`dist`).
//! Must never: be needed by the agent at run time; install what is already
//! there (every step checks first, so a second `setup` takes seconds).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod dist;

#[derive(Parser)]
#[command(name = "xtask", about = "tollgate's developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Set up, check formatting and lints, and run every test (the kernel
    /// end-to-end tests too when run as root).
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (a filter, ...).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the agent against a local simulated provider
    /// with real clients, then print the spend report (needs root).
    Demo,
    /// Fuzz the parsers that read bytes from the network, the token
    /// counter against tiktoken and command-line redaction (cargo-fuzz,
    /// nightly). Each target runs for `--seconds`.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// One target (client_hello, requests, response_parsers,
        /// usage_filter, token_split, command_lines); all when absent.
        target: Option<String>,
    },
    /// Build the agent as shipped, target/dist/tollgate: profile-guided
    /// (an instrumented build, trained on the bench's load and the
    /// end-to-end tests, then a build with the profile; needs root), or a
    /// plain release build with `--plain`.
    Dist {
        /// A plain `cargo build --release`, without a profile (no root).
        #[arg(long)]
        plain: bool,
        /// Train again even when the profile is newer than the
        /// instrumented build and every file of the training.
        #[arg(long)]
        retrain: bool,
    },
    /// Build the agent as `dist` does, install the peer gateways (LiteLLM,
    /// mitmproxy, tiktoken) under target/bench-venv, and run the benchmark
    /// suite: prints a table, writes target/bench/results.json (needs root).
    Bench {
        /// A smaller version of every row (under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Bench a plain release build of the agent (no profile).
        #[arg(long)]
        plain: bool,
        /// Extra arguments for tollgate-bench (`--rows latency,tokens`, ...).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// The Python SDKs the end-to-end tests drive, and everything they pull
/// in, pinned (`pip freeze` of a fresh virtualenv with openai, anthropic,
/// google-genai and boto3).
const PY_LOCK: &str = "tests/e2e/requirements.txt";
/// The Node SDKs (openai, @anthropic-ai/sdk, and ws for openai's Realtime
/// client) and their dependencies: a
/// package.json with exact versions and its package-lock.json, copied to
/// target/e2e-node for `npm ci`. openai 7 declares Node 22 or later; these
/// machines have Node 20, so the newest 6 (which declares no bound) is
/// what a job on them would run.
const NODE_LOCK_DIR: &str = "tests/e2e/node";
/// The Node SDKs, as `name@version`: what the marker check looks for.
const NODE_REQUIREMENTS: &[&str] = &["openai@6.49.0", "@anthropic-ai/sdk@1.14.0", "ws@8.23.0"];
/// The oldest Node the Node SDKs above run on.
const NODE_MIN_MAJOR: u32 = 20;
/// What the SDK virtualenv must import (the SDKs of PY_LOCK).
const PY_IMPORTS: &str = "import openai, anthropic, google.genai, boto3";
/// Debian packages the tests use, by the command that proves them present.
const APT: &[(&str, &str)] = &[
    // The linker, and the C parts of the build (bundled SQLite, aws-lc,
    // zstd, bpf-linker).
    ("cc", "build-essential"),
    ("python3", "python3"),
    ("curl", "curl"),
    ("unshare", "util-linux"),
    ("mount", "mount"),
    ("sqlite3", "sqlite3"),
    // `tollgate top` is checked by reading its screen in tmux.
    ("tmux", "tmux"),
    // The local CA is checked with the JDK's own certificate path validator
    // (`java File.java` compiles the source: a JDK, not a JRE alone).
    ("javac", "default-jdk-headless"),
    // The ledger's test of an immutable file (`chattr +i`).
    ("chattr", "e2fsprogs"),
];
const BPF_LINKER_VERSION: &str = "0.10.4";
/// The benchmark's peers, one virtualenv each under target/bench-venv
/// (their pins conflict). litellm 1.106.12 is the newest whose `[proxy]`
/// extra resolves from PyPI here (newer ones pin packages that are not
/// published); tiktoken goes with it (litellm needs it anyway).
const BENCH_VENVS: &[(&str, &[&str])] = &[
    ("litellm", &["litellm[proxy]==1.106.12", "tiktoken==0.14.0"]),
    ("mitmproxy", &["mitmproxy==11.0.2"]),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// [`run`], tried up to three times, 5 and 15 s apart: for the steps that
/// fetch from the network (a registry's passing error must not fail a CI
/// run of an hour).
fn run_retried(cmd: &mut Command) -> Result<()> {
    let mut waits = [5u64, 15].into_iter();
    loop {
        match run(cmd) {
            Ok(()) => return Ok(()),
            Err(e) => match waits.next() {
                Some(secs) => {
                    eprintln!("xtask: {e:#}; trying again in {secs} s");
                    std::thread::sleep(std::time::Duration::from_secs(secs));
                }
                None => {
                    return Err(e.context(
                        "failed three times (a download?): check the network or the registry proxy, then run again",
                    ));
                }
            },
        }
    }
}

/// Why this host cannot run the kernel tests (cgroup v2 and BTF; root is
/// checked apart), if it cannot. The tests check the same in
/// `tollgate_e2e::kernel_test_unavailable`.
fn kernel_unavailable() -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup2 = mountinfo.lines().any(|l| {
        l.split(" - ")
            .nth(1)
            .is_some_and(|t| t.starts_with("cgroup2 "))
    });
    if !cgroup2 {
        return Some("no cgroup v2 mount in /proc/self/mountinfo".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("no kernel BTF (/sys/kernel/btf/vmlinux)".into());
    }
    None
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn have(bin: &str) -> bool {
    quiet_ok(Command::new("sh").args(["-c", &format!("command -v {bin}")]))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// What a clean `cargo xtask test` build takes under target/ (measured on a
/// clean clone), and the free space below which `test` warns (with margin).
const TEST_BUILD_TAKES: &str = "3.5 GiB";
const TEST_BUILD_WARN_GIB: u64 = 6;

/// Says so up front when the disk is nearly full: a build that runs out of
/// space fails minutes later with a bare LLVM I/O error in the middle of
/// the compiler's output.
fn warn_if_disk_low() {
    warn_if_disk_below("a clean test build", TEST_BUILD_TAKES, TEST_BUILD_WARN_GIB);
}

/// `warn_if_disk_low` for a build (`what`) that takes `takes` under
/// target/, warning below `warn_gib` GiB free.
fn warn_if_disk_below(what: &str, takes: &str, warn_gib: u64) {
    let target = root().join("target");
    let _ = std::fs::create_dir_all(&target);
    let Ok(out) = Command::new("df").args(["-Pk"]).arg(&target).output() else {
        return;
    };
    let Some(avail_gib) = available_gib(&String::from_utf8_lossy(&out.stdout)) else {
        return;
    };
    if avail_gib < warn_gib {
        eprintln!(
            "xtask: WARNING: only {avail_gib} GiB free on the filesystem of {}; {what} \
             takes about {takes} there. If the build fails with 'No space left \
             on device', free space (cargo clean removes old builds) and run again.",
            target.display()
        );
    }
}

/// Whole GiB available, from `df -Pk` output (POSIX format: one header
/// line, then one line per filesystem, "Available" in KiB in column 4).
fn available_gib(df: &str) -> Option<u64> {
    df.lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib / (1024 * 1024))
}

fn setup() -> Result<()> {
    setup_build()?;
    setup_sdks()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

/// `apt-get ARGS`, never waiting at a prompt; it waits up to 5 minutes
/// for another apt (a machine's own start-up jobs) to let go of the lock,
/// and retries downloads.
fn apt_get(args: &[&str]) -> Result<()> {
    run_retried(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", "DPkg::Lock::Timeout=300", "-o", "Acquire::Retries=3"])
            .args(args),
    )
}

/// The components rustup lists as installed for `toolchain` (the active
/// one when `None`; empty when the toolchain itself is missing).
fn rustup_components(toolchain: Option<&str>) -> Result<String> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root())
        .args(["component", "list", "--installed"]);
    if let Some(t) = toolchain {
        cmd.args(["--toolchain", t]);
    }
    let out = cmd
        .output()
        .context("rustup is needed (https://rustup.rs)")?;
    Ok(if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::new()
    })
}

/// What building the agent needs: the eBPF toolchain and Debian packages.
fn setup_build() -> Result<()> {
    // 0. Debian packages first: the linker among them.
    install_packages()?;
    // 1. clippy and rustfmt for the active toolchain (`test` lints), and
    // the nightly toolchain with rust-src (the eBPF build uses build-std).
    let active = rustup_components(None)?;
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !active.contains(c))
        .collect();
    if active.is_empty() {
        bail!(
            "`rustup component list --installed` failed: is the toolchain of rust-toolchain.toml installed (`rustup show`)?"
        );
    }
    if !missing.is_empty() {
        run_retried(
            Command::new("rustup")
                .current_dir(root())
                .args(["component", "add"])
                .args(&missing),
        )?;
    }
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !nightly {
        run_retried(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    // rust-src for build-std; clippy and rustfmt lint the eBPF crate,
    // which only nightly builds.
    let have_nightly = rustup_components(Some("nightly"))?;
    let missing: Vec<&str> = ["rust-src", "clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !have_nightly.contains(c))
        .collect();
    if !missing.is_empty() {
        run_retried(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", "nightly"])
                .args(&missing),
        )?;
    }
    // 2. bpf-linker (links the eBPF object; 0.10.4 uses rustc's own LLVM).
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if !ok {
        // A compile of minutes that fails for reasons of its own: once.
        run(Command::new("cargo").args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ]))?;
    }
    Ok(())
}

/// The Debian packages of `APT` whose command is missing, and python3-venv
/// when `python3 -m venv` cannot make a virtualenv with pip.
fn install_packages() -> Result<()> {
    let mut missing: Vec<&str> = APT
        .iter()
        .filter(|(b, _)| !have(b))
        .map(|(_, p)| *p)
        .collect();
    if !quiet_ok(Command::new("python3").args(["-c", "import ensurepip, venv"])) {
        missing.push("python3-venv");
    }
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing packages {missing:?}: run `sudo apt-get install -y {}`",
                missing.join(" ")
            );
        }
        apt_get(&["update"])?;
        let mut args = vec!["install", "-y"];
        args.extend(&missing);
        apt_get(&args)?;
    }
    Ok(())
}

/// The SDKs the end-to-end tests drive.
fn setup_sdks() -> Result<()> {
    // 4. The SDK virtualenv for the end-to-end tests.
    let venv = root().join("target/e2e-venv");
    let marker = venv.join(".tollgate-requirements");
    let lock = root().join(PY_LOCK);
    let want =
        std::fs::read_to_string(&lock).with_context(|| format!("reading {}", lock.display()))?;
    // The marker says which pins were installed; the import says they
    // still work (an interpreter the venv points at may have gone).
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(want.as_str())
        || !quiet_ok(Command::new(venv.join("bin/python")).args(["-c", PY_IMPORTS]))
    {
        // Afresh: packages an earlier lock brought must not stay.
        let _ = std::fs::remove_dir_all(&venv);
        make_venv(&venv)?;
        run_retried(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                .arg(&lock),
        )?;
        std::fs::write(&marker, want)?;
    }
    // 5. The Node SDKs. Node and npm come with the machine image; Debian's
    // own nodejs (18) is too old for them, so a missing one is reported.
    if !have("node") || !have("npm") {
        bail!(
            "node and npm are missing: install Node.js {NODE_MIN_MAJOR} or later with its npm (NodeSource's packages, or nvm)"
        );
    }
    let major = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| node_major(&String::from_utf8_lossy(&o.stdout)));
    match major {
        Some(m) if m >= NODE_MIN_MAJOR => {}
        other => bail!(
            "the Node SDKs ({}) need Node {NODE_MIN_MAJOR} or later; `node --version` says {}: install a newer Node.js",
            NODE_REQUIREMENTS.join(", "),
            other.map_or("nothing readable".to_string(), |m| format!("{m}"))
        ),
    }
    let node = root().join("target/e2e-node");
    let marker = node.join(".tollgate-requirements");
    let locks = root().join(NODE_LOCK_DIR);
    let manifest = std::fs::read_to_string(locks.join("package.json"))?;
    let lock = std::fs::read_to_string(locks.join("package-lock.json"))?;
    let want = format!("{manifest}{lock}");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(want.as_str())
        || !NODE_REQUIREMENTS
            .iter()
            .all(|r| node_package_installed(&node, r))
    {
        let _ = std::fs::remove_file(&marker);
        std::fs::create_dir_all(&node)?;
        std::fs::write(node.join("package.json"), &manifest)?;
        std::fs::write(node.join("package-lock.json"), &lock)?;
        run_retried(Command::new("npm").current_dir(&node).args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
        ]))?;
        std::fs::write(&marker, want)?;
    }
    Ok(())
}

/// `v20.20.2` → 20.
fn node_major(version: &str) -> Option<u32> {
    version
        .trim()
        .strip_prefix('v')?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Whether `name@version` is what `dir/node_modules/name/package.json`
/// says is installed.
fn node_package_installed(dir: &Path, requirement: &str) -> bool {
    let Some((name, version)) = requirement.rsplit_once('@') else {
        return false;
    };
    let manifest = dir.join("node_modules").join(name).join("package.json");
    std::fs::read_to_string(manifest).is_ok_and(|text| {
        text.contains(&format!("\"version\": \"{version}\""))
            || text.contains(&format!("\"version\":\"{version}\""))
    })
}

/// Cargo in the workspace, building under its target/ (where every task
/// looks for what it built) whatever CARGO_TARGET_DIR says.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root())
        .env("CARGO_TARGET_DIR", root().join("target"));
    c
}

fn test(no_lint: bool, args: &[String]) -> Result<()> {
    let required = std::env::var_os("TOLLGATE_REQUIRE_KERNEL_TESTS").is_some();
    if required {
        if !is_root() {
            bail!(
                "TOLLGATE_REQUIRE_KERNEL_TESTS is set (as .ci/run sets it) but this is not root: \
                 the kernel end-to-end tests would only be reported as ignored; run as root"
            );
        }
        // Said before an hour of building, not by every kernel test after.
        if let Some(why) = kernel_unavailable() {
            bail!(
                "TOLLGATE_REQUIRE_KERNEL_TESTS is set but this host cannot run the kernel tests: {why}"
            );
        }
    }
    // In CI a Cargo.lock that does not match the manifests is an error, not
    // something to rewrite quietly.
    let locked: &[&str] = if required { &["--locked"] } else { &[] };
    setup()?;
    warn_if_disk_low();
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--check"]))?;
        // Clippy's build-script run is its own (it is not the test
        // build's), and it would build the kernel programs a second time
        // (a minute, 300 MB) only to embed them: the placeholder object
        // lints the same code.
        run(cargo()
            .env("AYA_BUILD_SKIP", "1")
            .args(["clippy", "--workspace", "--all-targets"])
            .args(locked)
            .args(["--", "-D", "warnings"]))?;
        // The kernel programs are outside the workspace and built for
        // bpfel-unknown-none with nightly: their own pass.
        let ebpf = || {
            let mut c = Command::new("cargo");
            c.current_dir(root().join("agent-ebpf"))
                .env_remove("RUSTUP_TOOLCHAIN")
                .arg("+nightly");
            c
        };
        run(ebpf().args(["fmt", "--check"]))?;
        run(ebpf()
            .args([
                "clippy",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
            ])
            .args(locked)
            .args(["--", "-D", "warnings"]))?;
    }
    // No separate `cargo build -p tollgate`: the test build makes
    // target/debug/tollgate (the agent's CLI tests run it), and a build of
    // the package alone resolves other features, so it compiled the agent
    // and its OpenTelemetry crates a second time.
    let mut t = cargo();
    with_agent_and_sdks(&mut t, &root().join("target/debug/tollgate"))
        .args(["test", "--workspace"])
        .args(locked);
    match proptest_seed() {
        Ok(seed) => {
            eprintln!(
                "xtask: property tests draw from seed {seed} (set PROPTEST_RNG_SEED to choose another)"
            );
            t.env("PROPTEST_RNG_SEED", seed.to_string());
        }
        Err(why) => eprintln!("xtask: property tests draw from a fresh seed per test: {why}"),
    }
    t.arg("--");
    let unavailable = kernel_unavailable();
    if is_root() && unavailable.is_none() {
        eprintln!(
            "xtask: running as root: the kernel end-to-end tests (#[ignore]d for plain cargo test) run too"
        );
        t.arg("--include-ignored");
    } else if let Some(why) = unavailable.filter(|_| is_root()) {
        // (With TOLLGATE_REQUIRE_KERNEL_TESTS this host was refused above.)
        eprintln!(
            "xtask: root, but this host cannot run the kernel end-to-end tests ({why}): they are reported as ignored, with the few #[ignore]d tests that need a JDK, tmux or a cgroup v2 host"
        );
    } else {
        eprintln!(
            "xtask: not root: the kernel end-to-end tests are reported as ignored (they need root, cgroup v2 and BPF), and with them the few #[ignore]d tests that need root, a JDK, tmux or a cgroup v2 host (each names what it needs; all run as root); run as root to include them"
        );
    }
    t.args(args);
    run(&mut t)
}

/// The seed of the property tests' random inputs: `PROPTEST_RNG_SEED` when
/// set, else one taken from the commit checked out, so that every run on
/// one commit draws the same inputs (a clean clone of a commit whose run
/// passed passes again; uncommitted changes draw the commit's inputs) and
/// each new commit draws new ones. An error says why there is none (then
/// each test draws a fresh seed).
fn proptest_seed() -> Result<u64, String> {
    if let Some(s) = std::env::var_os("PROPTEST_RNG_SEED") {
        return s
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("PROPTEST_RNG_SEED={s:?} is not a number"));
    }
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git rev-parse HEAD failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::str::from_utf8(&out.stdout)
        .ok()
        .and_then(commit_seed)
        .ok_or_else(|| "git rev-parse HEAD gave no commit id".to_string())
}

/// The first 16 hex digits of a commit id, as a number.
fn commit_seed(commit: &str) -> Option<u64> {
    u64::from_str_radix(commit.trim().get(..16)?, 16).ok()
}

fn demo() -> Result<()> {
    // Before any set-up: a user's run would install for nothing.
    if !is_root() {
        bail!(
            "the demo loads eBPF programs: run it as root (e.g. `sudo -E env PATH=\"$PATH\" cargo xtask demo`; \
             root then writes target/ and, with your HOME kept, ~/.cargo and ~/.rustup: keep building as root, \
             or `chown -R $USER target ~/.cargo ~/.rustup` after)"
        );
    }
    setup()?;
    run(cargo().args(["build", "-p", "tollgate", "-p", "tollgate-e2e", "--bins"]))?;
    run(with_agent_and_sdks(
        &mut Command::new(root().join("target/debug/tollgate-demo")),
        &root().join("target/debug/tollgate"),
    ))
}

/// `cmd` with the variables by which the tests and the demo find the agent
/// under test (`agent`) and the SDKs `setup` installed under target/.
fn with_agent_and_sdks<'a>(cmd: &'a mut Command, agent: &Path) -> &'a mut Command {
    cmd.env("TOLLGATE_BIN", agent)
        .env("TOLLGATE_PYTHON", root().join("target/e2e-venv/bin/python"))
        .env(
            "TOLLGATE_NODE_MODULES",
            root().join("target/e2e-node/node_modules"),
        )
}

/// Makes the virtualenv `dir` unless it has pip. A half-made one (python3
/// without ensurepip leaves `bin/python` and no pip) is made afresh, and
/// one that fails to make is removed, so the next run starts clean.
fn make_venv(dir: &Path) -> Result<()> {
    // Kept when its interpreter still runs (the Python it was made from
    // may have gone: a pyenv version removed, a distribution upgrade).
    if dir.join("bin/pip").exists()
        && quiet_ok(Command::new(dir.join("bin/python")).args(["-c", ""]))
    {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    let made = run(Command::new("python3").args(["-m", "venv"]).arg(dir));
    if made.is_err() || !dir.join("bin/pip").exists() {
        let _ = std::fs::remove_dir_all(dir);
        bail!(
            "cannot make the virtualenv {} (on Debian: `apt-get install -y python3-venv`)",
            dir.display()
        );
    }
    Ok(())
}

/// A virtualenv under target/ with `reqs`, made or updated only when its
/// marker file does not list exactly `reqs`.
fn venv(dir: &Path, reqs: &[&str]) -> Result<()> {
    let marker = dir.join(".tollgate-requirements");
    let want = reqs.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    make_venv(dir)?;
    run(Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(reqs))?;
    std::fs::write(&marker, want)?;
    Ok(())
}

/// The benchmark suite's binary, built (release, `--locked`) and ready to
/// run with the peers' virtualenvs under target/bench-venv.
fn bench_suite() -> Result<Command> {
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "tollgate-e2e",
        "--bin",
        "tollgate-bench",
    ]))?;
    let mut b = Command::new(root().join("target/release/tollgate-bench"));
    b.env("TOLLGATE_BENCH_VENV", root().join("target/bench-venv"));
    Ok(b)
}

fn bench(quick: bool, plain: bool, args: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmark loads eBPF programs: run it as root (e.g. `sudo -E env PATH=\"$PATH\" cargo xtask bench`; \
             target/ then holds root's files: keep building as root, or `chown -R $USER target` after)"
        );
    }
    setup_build()?;
    // A peer that cannot be installed is reported as SKIP by its rows,
    // with the reason, rather than stopping the whole suite.
    let venvs = root().join("target/bench-venv");
    for (name, reqs) in BENCH_VENVS {
        if let Err(e) = venv(&venvs.join(name), reqs) {
            eprintln!("xtask: warning: cannot install {reqs:?}: {e:#}; its rows will say SKIP");
        }
    }
    // The agent as shipped: what users run is what the table is about.
    // (`--plain`: the release build as it is, leaving target/dist alone.)
    let (agent, build) = if plain {
        (
            dist::plain_build()?,
            "plain release build (cargo xtask bench --plain)".to_owned(),
        )
    } else {
        (
            dist::dist(false, false, "bench")?,
            format!(
                "profile-guided, as `cargo xtask dist` builds it ({})",
                dist::PROFILE
            ),
        )
    };
    let mut b = bench_suite()?;
    b.env("TOLLGATE_BIN", &agent)
        .env("TOLLGATE_BENCH_AGENT_BUILD", build)
        .arg("--out")
        .arg(root().join("target/bench/results.json"));
    if quick {
        b.arg("--quick");
    }
    run(b.args(args))
}

const FUZZ_TARGETS: &[&str] = &[
    "client_hello",
    "requests",
    "response_parsers",
    "usage_filter",
    "token_split",
    "command_lines",
];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn fuzz(seconds: u64, target: Option<String>) -> Result<()> {
    setup()?;
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    let targets: Vec<String> = match target {
        Some(t) if FUZZ_TARGETS.contains(&t.as_str()) => vec![t],
        Some(t) => bail!(
            "unknown fuzz target {t}; targets: {}",
            FUZZ_TARGETS.join(", ")
        ),
        None => FUZZ_TARGETS.iter().map(|s| s.to_string()).collect(),
    };
    for t in targets {
        // The kernel object is not needed to fuzz parsers.
        // `+nightly` needs rustup's cargo proxy, not the cargo running xtask.
        // New inputs go to the (untracked) corpus; the tracked seeds, when
        // a target has them, start it on valid requests.
        let corpus = root().join("fuzz/corpus").join(&t);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root().join("fuzz/seeds").join(&t);
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root())
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("AYA_BUILD_SKIP", "1")
            .args(["+nightly", "fuzz", "run", "--fuzz-dir", "fuzz", &t])
            .arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        run(cmd.arg("--").arg(format!("-max_total_time={seconds}")))?;
    }
    Ok(())
}

/// Puts cargo's bin directory (`$CARGO_HOME/bin`, else ~/.cargo/bin) on
/// PATH when it is missing there (`sudo` without the README's `env PATH=...`,
/// a CI shell that did not source ~/.cargo/env): bpf-linker, installed
/// there, must be found by the check below and by the eBPF build.
fn cargo_bin_on_path() {
    let bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|h| h.join("bin"));
    let Some(bin) = bin.filter(|b| b.is_dir()) else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)));
    if let Ok(joined) = joined {
        // SAFETY: at the start of main, before any thread is spawned.
        unsafe { std::env::set_var("PATH", joined) };
    }
}

fn main() -> Result<()> {
    cargo_bin_on_path();
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Fuzz { seconds, target } => fuzz(seconds, target),
        Cmd::Test { no_lint, args } => test(no_lint, &args),
        Cmd::Demo => demo(),
        Cmd::Dist { plain, retrain } => dist::dist(plain, retrain, "dist").map(|_| ()),
        Cmd::Bench { quick, plain, args } => bench(quick, plain, &args),
    }
}

#[cfg(test)]
mod tests {
    use super::{available_gib, commit_seed, make_venv, node_major, node_package_installed};

    #[test]
    fn the_lock_files_pin_the_sdks_the_tests_drive() {
        let root = super::root();
        let manifest =
            std::fs::read_to_string(root.join(super::NODE_LOCK_DIR).join("package.json")).unwrap();
        let lock =
            std::fs::read_to_string(root.join(super::NODE_LOCK_DIR).join("package-lock.json"))
                .unwrap();
        for r in super::NODE_REQUIREMENTS {
            let (name, version) = r.rsplit_once('@').unwrap();
            assert!(
                manifest.contains(&format!("\"{name}\": \"{version}\"")),
                "package.json pins {r}"
            );
            assert!(
                lock.contains(&format!(
                    "\"node_modules/{name}\": {{\n      \"version\": \"{version}\""
                )),
                "package-lock.json has {r}"
            );
        }
        let py = std::fs::read_to_string(root.join(super::PY_LOCK)).unwrap();
        for sdk in ["openai", "anthropic", "google-genai", "boto3"] {
            assert!(
                py.lines().any(|l| l.starts_with(&format!("{sdk}=="))),
                "{} pins {sdk}",
                super::PY_LOCK
            );
        }
        assert!(
            py.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .all(|l| l.contains("==")),
            "every line of {} is a pin",
            super::PY_LOCK
        );
    }

    #[test]
    fn the_seed_comes_from_the_commit_id() {
        assert_eq!(
            commit_seed("c945058a1b2c3d4e5f60718293a4b5c6d7e8f901\n"),
            Some(0xc945_058a_1b2c_3d4e)
        );
        assert_eq!(commit_seed("c945058"), None, "too short");
        assert_eq!(commit_seed("not a commit id at all"), None);
    }

    #[test]
    fn a_half_made_virtualenv_is_made_afresh() {
        // python3 without ensurepip leaves bin/python and no pip; every
        // later run used to skip the venv and fail on the missing pip.
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("venv");
        std::fs::create_dir_all(dir.join("bin")).expect("bin");
        std::fs::write(dir.join("bin/python"), "").expect("half-made");
        match make_venv(&dir) {
            Ok(()) => assert!(dir.join("bin/pip").exists(), "pip is there"),
            // This machine cannot make virtualenvs at all: then the
            // half-made one is gone, so the next run starts clean.
            Err(e) => {
                assert!(!dir.exists(), "{e:#}");
                assert!(format!("{e:#}").contains("python3-venv"), "{e:#}");
            }
        }
        // Made: kept as it is.
        if dir.join("bin/pip").exists() {
            let marker = dir.join("keep");
            std::fs::write(&marker, "").expect("marker");
            make_venv(&dir).expect("kept");
            assert!(marker.exists());
            // Its interpreter gone (a dangling link): made afresh.
            std::fs::remove_file(dir.join("bin/python")).expect("python");
            std::os::unix::fs::symlink("/nonexistent/python3", dir.join("bin/python"))
                .expect("dangling link");
            make_venv(&dir).expect("made afresh");
            assert!(!marker.exists(), "not the old one");
            assert!(
                std::process::Command::new(dir.join("bin/python"))
                    .args(["-c", ""])
                    .status()
                    .expect("runs")
                    .success()
            );
        }
    }

    #[test]
    fn node_versions_and_installed_packages_are_read() {
        assert_eq!(node_major("v20.20.2\n"), Some(20));
        assert_eq!(node_major("v18.20.4"), Some(18));
        assert_eq!(node_major("20.1.0"), None);
        assert_eq!(node_major(""), None);
        let t = tempfile::tempdir().expect("tempdir");
        let pkg = t.path().join("node_modules/@anthropic-ai/sdk");
        std::fs::create_dir_all(&pkg).expect("dir");
        assert!(!node_package_installed(
            t.path(),
            "@anthropic-ai/sdk@1.14.0"
        ));
        std::fs::write(
            pkg.join("package.json"),
            "{\n  \"name\": \"@anthropic-ai/sdk\",\n  \"version\": \"1.14.0\"\n}",
        )
        .expect("manifest");
        assert!(node_package_installed(t.path(), "@anthropic-ai/sdk@1.14.0"));
        assert!(!node_package_installed(
            t.path(),
            "@anthropic-ai/sdk@1.15.0"
        ));
        assert!(!node_package_installed(t.path(), "openai@6.49.0"));
    }

    #[test]
    fn df_available_space_is_read_from_the_posix_format() {
        let df = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n\
                  /dev/vda         263174212  90177388   6083544      94% /\n";
        assert_eq!(available_gib(df), Some(5));
        assert_eq!(
            available_gib("Filesystem 1024-blocks Used Available\n"),
            None
        );
        assert_eq!(available_gib("header\n/dev/x 1 2 lots 3% /\n"), None);
    }
}
