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
//! fell by about a third and the agent's CPU per request by about a quarter.
//!
//! The training drives every provider adapter, not only the benchmark's
//! OpenAI load: code no training request ran is laid out as cold, so an
//! adapter left out would be slower than in a plain release build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{
    bench_suite, cargo, is_root, kernel_unavailable, root, run, run_retried, rustup_components,
    setup_build, setup_sdks, warn_if_disk_below, with_agent_and_sdks,
};

/// What the build writes.
pub const DIST_BIN: &str = "target/dist/tollgate";
/// The merged training profile.
pub const PROFILE: &str = "target/pgo/tollgate.profdata";
/// Cargo's arguments for the agent's release build, in every stage.
const BUILD_AGENT: &[&str] = &[
    "build",
    "--release",
    "--locked",
    "-p",
    "tollgate",
    "--bin",
    "tollgate",
];

/// What the training reads besides the instrumented agent: a change to
/// any file under these (the tests, the fake provider, the bench's rows,
/// this file) trains again.
const TRAINING_INPUTS: &[&str] = &["tests/src", "tests/tests", "xtask/src/dist.rs"];

/// A plain release build of the agent (target/release/tollgate), with the
/// user's own RUSTFLAGS if any.
pub fn plain_build() -> Result<PathBuf> {
    kernel_programs_wanted()?;
    setup_build()?;
    run(cargo().args(BUILD_AGENT))?;
    Ok(root().join("target/release/tollgate"))
}

/// Builds target/dist/tollgate and returns its path: profile-guided, or
/// the plain release build when `plain`. `retrain` trains again even when
/// the profile is newer than the instrumented build and the training's
/// inputs. `task` (`dist`, `bench`) is named in the advice to use `--plain`.
///
/// Builds are `--locked`: what is shipped is what Cargo.lock says.
pub fn dist(plain: bool, retrain: bool, task: &str) -> Result<PathBuf> {
    let out = root().join(DIST_BIN);
    if plain {
        install(&plain_build()?, &out)?;
        eprintln!("xtask: {} (plain release build, no profile)", out.display());
        return Ok(out);
    }
    // Before any building: the training loads the agent's programs, and
    // drives it with the SDKs.
    if !is_root() {
        bail!(
            "the profile-guided build trains on the agent intercepting real connections, which needs root: \
             run `cargo xtask {task}` as root, or `cargo xtask {task} --plain` for a release build without a profile"
        );
    }
    if let Some(why) = kernel_unavailable() {
        bail!(
            "the profile-guided build trains on the agent intercepting real connections, and this host cannot: \
             {why}; `cargo xtask {task} --plain` builds without a profile"
        );
    }
    setup_build()?;
    setup_sdks().with_context(|| {
        format!(
            "the profile-guided build trains on the end-to-end tests, which need the SDKs; `cargo xtask {task} --plain` does not"
        )
    })?;
    kernel_programs_wanted()?;
    warn_if_disk_below(
        "the profile-guided build (two release builds under target/pgo, the tests' debug build)",
        "8 GiB",
        10,
    );
    let profdata = llvm_profdata()?;
    let pgo = root().join("target/pgo");
    let raw = pgo.join("raw");
    let profile = root().join(PROFILE);

    // 1. The instrumented agent (its own target directory: other flags).
    // Build scripts and proc macros are instrumented too (RUSTFLAGS reach
    // them in a build for the host); what they write while building is
    // cleared before the training.
    run(with_rustflags(
        cargo().env("CARGO_TARGET_DIR", pgo.join("gen")),
        &format!("-Cprofile-generate={}", raw.display()),
    )
    .args(BUILD_AGENT))?;
    let instrumented = pgo.join("gen/release/tollgate");

    // 2. Train, unless the profile is newer than the instrumented build and
    // every file of the training. A training that fails leaves the old
    // profile older than those, so the next run trains again.
    let mut inputs = vec![instrumented.clone()];
    inputs.extend(TRAINING_INPUTS.iter().map(|p| root().join(p)));
    if !retrain && fresh(&profile, &inputs) {
        eprintln!(
            "xtask: {} is newer than the instrumented build and the training's files: not retrained (`--retrain` to train again)",
            profile.display()
        );
    } else {
        train(&instrumented, &raw)?;
        merge(&profdata, &raw, &profile)?;
    }

    // 3. The optimised agent. The profile's path is in RUSTFLAGS, and rustc
    // lists the file among each crate's inputs: a new profile rebuilds.
    run(with_rustflags(
        cargo().env("CARGO_TARGET_DIR", pgo.join("use")),
        &format!(
            "-Cprofile-use={} -Cllvm-args=-pgo-warn-missing-function=false",
            profile.display()
        ),
    )
    .args(BUILD_AGENT))?;
    install(&pgo.join("use/release/tollgate"), &out)?;
    eprintln!(
        "xtask: {} (profile-guided; profile {})",
        out.display(),
        profile.display()
    );
    Ok(out)
}

/// A binary to ship or to bench must intercept: AYA_BUILD_SKIP (a build
/// without the kernel programs, for linting) is refused.
fn kernel_programs_wanted() -> Result<()> {
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        bail!(
            "AYA_BUILD_SKIP is set: the agent would be built without its kernel programs and could not intercept; unset it"
        );
    }
    Ok(())
}

/// `cmd` with `flags` after the user's own RUSTFLAGS. CARGO_ENCODED_RUSTFLAGS
/// would take precedence over RUSTFLAGS and drop the profile flags: it is
/// read into RUSTFLAGS instead.
fn with_rustflags<'a>(cmd: &'a mut Command, flags: &str) -> &'a mut Command {
    let all = rustflags(
        std::env::var("CARGO_ENCODED_RUSTFLAGS").ok().as_deref(),
        std::env::var("RUSTFLAGS").ok().as_deref(),
        flags,
    );
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", all)
}

/// RUSTFLAGS for a stage: the user's (the encoded form first, as cargo
/// reads it) and then `flags`.
fn rustflags(encoded: Option<&str>, plain: Option<&str>, flags: &str) -> String {
    let own = match encoded {
        Some(e) if !e.is_empty() => e.split('\x1f').collect::<Vec<_>>().join(" "),
        _ => plain.unwrap_or_default().to_owned(),
    };
    if own.trim().is_empty() {
        flags.to_owned()
    } else {
        format!("{} {flags}", own.trim())
    }
}

/// Runs the instrumented agent under the training load; each agent writes
/// its counts into `raw` when it exits. Every part must succeed: a part
/// that ran nothing would leave its code laid out as cold, slower than in
/// a plain build, under a binary that says it is profile-guided.
fn train(agent: &Path, raw: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(raw);
    std::fs::create_dir_all(raw).with_context(|| format!("creating {}", raw.display()))?;
    // a) The benchmark's own load (quick rows, no peers): the request path
    // at volume, HTTP/1.1 and streams, and with an OTLP exporter (row 7),
    // which records every request into its instruments.
    run(bench_suite()?
        .env("TOLLGATE_BIN", agent)
        .env_remove("LLVM_PROFILE_FILE")
        .arg("--out")
        .arg(root().join("target/pgo/training.json"))
        .args([
            "--quick",
            "--no-peers",
            "--rows",
            "latency,streaming,throughput,collector",
        ]))
    .context("training on the bench's rows 1-3 and 7 with the instrumented agent")?;
    // b) The end-to-end tests: the official SDKs through the agent, one
    // test per provider and API shape (HTTP/2, gzip, Bedrock's event
    // stream, batches, ...), WebSockets, pass-through, the OTLP export. A
    // debug build of the tests (the agent under training is the
    // instrumented release binary), resolved as `cargo xtask test`
    // resolves the workspace, so the two share their build.
    run(with_agent_and_sdks(&mut cargo(), agent)
        .args(["test", "--locked", "--workspace"])
        .args(["--test", "sdks", "--test", "e2e", "--test", "export_e2e"])
        .env_remove("LLVM_PROFILE_FILE")
        .args(["--", "--include-ignored"]))
    .context(
        "training on the end-to-end tests with the instrumented agent (a test that failed may not have run \
         its part of the agent, which would then be laid out as cold: no profile was written; run again, or \
         `cargo xtask dist --plain`)",
    )?;
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
            "the training wrote no profile into {}: every instrumented agent was killed before it could exit?",
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

/// `a` exists and was written after every file under `inputs` (files, or
/// directories walked whole), all of which exist.
fn fresh(a: &Path, inputs: &[PathBuf]) -> bool {
    let Some(a) = std::fs::metadata(a).and_then(|m| m.modified()).ok() else {
        return false;
    };
    inputs.iter().all(|p| newest(p).is_some_and(|t| a > t))
}

/// The latest modification time of `p` or of anything under it.
fn newest(p: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::symlink_metadata(p).ok()?;
    let mut t = meta.modified().ok()?;
    if meta.is_dir() {
        for e in std::fs::read_dir(p).ok()? {
            t = t.max(newest(&e.ok()?.path())?);
        }
    }
    Some(t)
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
/// component, added here when missing: only `dist` needs it): another
/// LLVM's cannot be relied on to read the profile format this rustc writes.
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
    if !p.exists() && !rustup_components(None)?.contains("llvm-tools") {
        run_retried(Command::new("rustup").current_dir(root()).args([
            "component",
            "add",
            "llvm-tools",
        ]))?;
    }
    if !p.exists() {
        bail!(
            "{} is missing (rustup's llvm-tools component, which `rustup component add llvm-tools` installs)",
            p.display()
        );
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{fresh, merge, rustflags};

    #[test]
    fn the_users_own_rustflags_are_kept_before_the_profile_flags() {
        let p = "-Cprofile-generate=/t/raw";
        assert_eq!(rustflags(None, None, p), p);
        assert_eq!(rustflags(None, Some("  "), p), p);
        assert_eq!(
            rustflags(None, Some("-Ctarget-cpu=x86-64-v2"), p),
            "-Ctarget-cpu=x86-64-v2 -Cprofile-generate=/t/raw"
        );
        // Cargo reads the encoded form first, and so does the stage.
        assert_eq!(
            rustflags(Some("-C\x1fdebuginfo=1"), Some("-Cignored"), p),
            "-C debuginfo=1 -Cprofile-generate=/t/raw"
        );
        assert_eq!(
            rustflags(Some(""), Some("-Cx"), p),
            "-Cx -Cprofile-generate=/t/raw"
        );
    }

    #[test]
    fn a_profile_is_fresh_only_when_written_after_the_build_and_the_training() {
        let dir = tempfile::tempdir().unwrap();
        let (profile, build) = (dir.path().join("p"), dir.path().join("b"));
        let tests = dir.path().join("tests");
        let inputs = [build.clone(), tests.clone()];
        let at = |p: &std::path::Path, secs: u64| {
            let t = std::time::SystemTime::now() + std::time::Duration::from_secs(secs);
            std::fs::File::open(p).unwrap().set_modified(t).unwrap();
        };
        assert!(!fresh(&profile, &inputs), "nothing exists");
        std::fs::write(&build, "b").unwrap();
        std::fs::create_dir_all(tests.join("src")).unwrap();
        std::fs::write(tests.join("src/row.rs"), "r").unwrap();
        assert!(!fresh(&profile, &inputs), "no profile yet");
        std::fs::write(&profile, "p").unwrap();
        at(&profile, 5);
        assert!(fresh(&profile, &inputs), "profile written after both");
        at(&build, 10);
        assert!(!fresh(&profile, &inputs), "the build changed since");
        at(&profile, 15);
        assert!(fresh(&profile, &inputs));
        at(&tests.join("src/row.rs"), 20);
        assert!(!fresh(&profile, &inputs), "a training file changed since");
        assert!(
            !fresh(&profile, &[dir.path().join("gone")]),
            "an input that does not exist"
        );
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
