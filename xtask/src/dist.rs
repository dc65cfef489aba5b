//! `cargo xtask dist`: the agent binary as shipped, built with
//! profile-guided optimisation (PGO).
//!
//! Owns: the three-stage build under target/pgo/ (an instrumented build, a
//! training run of that build, a build that uses the profile) and the
//! result, target/dist/tollgate.
//! Must never: ship a binary built from another commit's profile without
//! saying so (the profile is retrained whenever the instrumented build
//! changes), or hide a training run that produced nothing.
//!
//! Why: the agent's request path touches TLS and HTTP on two connections
//! and the metering, and it runs cold (caches and predictors evicted by the
//! job's own work) whenever requests are apart, which is how LLM calls
//! arrive. Laying out the hot code by a profile shrinks that footprint:
//! in paired bench runs (README, Performance) the added time to first chunk
//! fell by about a third and the agent's CPU per request by about a fifth.
//!
//! The training drives every provider adapter, not only the benchmark's
//! OpenAI load: code no training request ran is laid out as cold, so an
//! adapter left out would be slower than in a plain release build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{cargo, is_root, kernel_unavailable, root, run, setup_build, setup_sdks};

/// What the build writes.
pub const DIST_BIN: &str = "target/dist/tollgate";
/// The merged training profile.
pub const PROFILE: &str = "target/pgo/tollgate.profdata";

/// Builds target/dist/tollgate and returns its path: with a profile unless
/// `plain` (then it is `cargo build --release`'s binary, copied).
pub fn dist(plain: bool, locked: bool) -> Result<PathBuf> {
    let locked: &[&str] = if locked { &["--locked"] } else { &[] };
    let out = root().join(DIST_BIN);
    if plain {
        setup_build()?;
        run(cargo()
            .args(["build", "--release", "-p", "tollgate", "--bin", "tollgate"])
            .args(locked))?;
        install(&root().join("target/release/tollgate"), &out)?;
        eprintln!("xtask: {} (plain release build, no profile)", out.display());
        return Ok(out);
    }
    // Before any building: the training loads the agent's programs.
    if !is_root() {
        bail!(
            "the profile-guided build trains on the agent intercepting real connections, which needs root: \
             run `cargo xtask dist` as root, or `cargo xtask dist --plain` for a release build without a profile"
        );
    }
    if let Some(why) = kernel_unavailable() {
        bail!(
            "the profile-guided build trains on the agent intercepting real connections, and this host cannot: \
             {why}; `cargo xtask dist --plain` builds without a profile"
        );
    }
    setup_build()?;
    let pgo = root().join("target/pgo");
    let raw = pgo.join("raw");
    let profile = root().join(PROFILE);
    let profdata = llvm_profdata()?;

    // 1. The instrumented agent (its own target directory: other flags).
    // Build scripts and proc macros are instrumented too (RUSTFLAGS reach
    // them in a build for the host); what they write while building is
    // cleared before the training.
    run(cargo()
        .env("CARGO_TARGET_DIR", pgo.join("gen"))
        .env("RUSTFLAGS", format!("-Cprofile-generate={}", raw.display()))
        .args(["build", "--release", "-p", "tollgate", "--bin", "tollgate"])
        .args(locked))?;
    let instrumented = pgo.join("gen/release/tollgate");

    // 2. Train, unless the profile is newer than the instrumented build.
    if fresh(&profile, &instrumented) {
        eprintln!(
            "xtask: {} is newer than the instrumented build: not retrained",
            profile.display()
        );
    } else {
        train(&instrumented, &raw, locked)?;
        merge(&profdata, &raw, &profile)?;
    }

    // 3. The optimised agent. The profile's path is in RUSTFLAGS, and rustc
    // lists the file among each crate's inputs: a new profile rebuilds.
    run(cargo()
        .env("CARGO_TARGET_DIR", pgo.join("use"))
        .env(
            "RUSTFLAGS",
            format!(
                "-Cprofile-use={} -Cllvm-args=-pgo-warn-missing-function=false",
                profile.display()
            ),
        )
        .args(["build", "--release", "-p", "tollgate", "--bin", "tollgate"])
        .args(locked))?;
    install(&pgo.join("use/release/tollgate"), &out)?;
    eprintln!(
        "xtask: {} (profile-guided; profile {})",
        out.display(),
        profile.display()
    );
    Ok(out)
}

/// Runs the instrumented agent under the training load; each agent writes
/// its counts into `raw` when it exits.
fn train(agent: &Path, raw: &Path, locked: &[&str]) -> Result<()> {
    let _ = std::fs::remove_dir_all(raw);
    std::fs::create_dir_all(raw).with_context(|| format!("creating {}", raw.display()))?;
    // a) The benchmark's own load (quick rows, no peers): the request path
    // at volume, HTTP/1.1 and streams.
    run(cargo()
        .args([
            "build",
            "--release",
            "-p",
            "tollgate-e2e",
            "--bin",
            "tollgate-bench",
        ])
        .args(locked))?;
    run(Command::new(root().join("target/release/tollgate-bench"))
        .env("TOLLGATE_BIN", agent)
        .env("TOLLGATE_BENCH_VENV", root().join("target/bench-venv"))
        .arg("--out")
        .arg(root().join("target/pgo/training.json"))
        .args([
            "--quick",
            "--no-peers",
            "--rows",
            "latency,streaming,throughput",
        ]))
    .context("training load (the bench's rows 1-3)")?;
    // b) The official SDKs through the agent, one test per provider and
    // API shape (HTTP/2, gzip, Bedrock's event stream, batches, ...). The
    // tests check the agent as they go; one that fails under the slower
    // instrumented build still trained it, so a failure is reported, not
    // fatal.
    setup_sdks()?;
    // A debug build of the tests (the agent under training is the
    // instrumented release binary), resolved as `cargo xtask test`
    // resolves the workspace, so the two share their build.
    let sdks = run(cargo()
        .args(["test", "--workspace", "--test", "sdks"])
        .args(locked)
        .env("TOLLGATE_BIN", agent)
        .env("TOLLGATE_PYTHON", root().join("target/e2e-venv/bin/python"))
        .env(
            "TOLLGATE_NODE_MODULES",
            root().join("target/e2e-node/node_modules"),
        )
        .args(["--", "--include-ignored"]));
    if let Err(e) = sdks {
        eprintln!(
            "xtask: warning: an SDK test failed with the instrumented agent ({e:#}); its requests still count for the profile"
        );
    }
    Ok(())
}

/// Merges the training's raw counts into `profile` (written whole, then
/// renamed, so a failed merge leaves no half profile to be taken as fresh).
fn merge(profdata: &Path, raw: &Path, profile: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(raw)
        .with_context(|| format!("reading {}", raw.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "the training wrote no profile into {}: did the agent exit by a signal it could not catch?",
            raw.display()
        );
    }
    let partial = profile.with_extension("profdata.partial");
    run(Command::new(profdata)
        .arg("merge")
        .arg("-o")
        .arg(&partial)
        .args(&files))?;
    std::fs::rename(&partial, profile)
        .with_context(|| format!("renaming {} to {}", partial.display(), profile.display()))?;
    eprintln!(
        "xtask: merged {} raw profiles into {}",
        files.len(),
        profile.display()
    );
    Ok(())
}

/// `a` exists and was written after `b`.
fn fresh(a: &Path, b: &Path) -> bool {
    let t = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (t(a), t(b)) {
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}

/// Copies the built binary to `to` (through a temporary name, so a running
/// copy of the old one is not written over).
fn install(from: &Path, to: &Path) -> Result<()> {
    let dir = to.parent().context("dist path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = to.with_extension("partial");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("renaming to {}", to.display()))?;
    Ok(())
}

/// The llvm-profdata of the active toolchain's LLVM (rustup's `llvm-tools`
/// component, which setup installs): another LLVM's cannot be relied on to
/// read or write the profile format this rustc uses.
fn llvm_profdata() -> Result<PathBuf> {
    let rustc = |arg: &str| -> Result<String> {
        let o = Command::new("rustc")
            .current_dir(root())
            .arg(arg)
            .output()
            .context("running rustc")?;
        if !o.status.success() {
            bail!("`rustc {arg}` failed");
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let sysroot = rustc("--print=sysroot")?;
    let host = rustc("-vV")?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("`rustc -vV` names no host")?;
    let p = Path::new(sysroot.trim()).join(format!("lib/rustlib/{host}/bin/llvm-profdata"));
    if !p.exists() {
        bail!(
            "{} is missing: `rustup component add llvm-tools` (cargo xtask setup adds it)",
            p.display()
        );
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{fresh, merge};

    #[test]
    fn a_profile_is_fresh_only_when_written_after_the_instrumented_build() {
        let dir = tempfile::tempdir().unwrap();
        let (profile, build) = (dir.path().join("p"), dir.path().join("b"));
        assert!(!fresh(&profile, &build), "neither exists");
        std::fs::write(&build, "b").unwrap();
        assert!(!fresh(&profile, &build), "no profile yet");
        std::fs::write(&profile, "p").unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&profile)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(fresh(&profile, &build), "profile written after the build");
        std::fs::File::options()
            .write(true)
            .open(&build)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        assert!(!fresh(&profile, &build), "the build changed since");
    }

    #[test]
    fn a_training_that_wrote_nothing_is_an_error_and_leaves_no_profile() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::create_dir(&raw).unwrap();
        std::fs::write(raw.join("notes.txt"), "not a profile").unwrap();
        let profile = dir.path().join("tollgate.profdata");
        let e = merge(Path::new("/nonexistent/llvm-profdata"), &raw, &profile).unwrap_err();
        assert!(format!("{e:#}").contains("wrote no profile"), "{e:#}");
        assert!(!profile.exists());
    }
}
