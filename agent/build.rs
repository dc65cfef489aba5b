//! Builds the kernel programs (`../agent-ebpf`) for `bpfel-unknown-none` with
//! the nightly toolchain and bpf-linker (aya-build), and leaves the object at
//! `$OUT_DIR/agent-ebpf`, where `intercept` embeds it.
//!
//! `agent-ebpf` is outside the workspace (it is in `exclude`), so the nested
//! `cargo build --package agent-ebpf` that aya-build runs must start in its
//! own directory, where it is its own workspace root with its own profiles
//! (`panic = "abort"`) and lock file.
//!
//! With `AYA_BUILD_SKIP=1` no object is built; an empty placeholder is written
//! instead so the agent still compiles, and `Intercept::attach` says so at run
//! time.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR")
            .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", manifest_dir.display()))?;
    let ebpf_dir = workspace.join("agent-ebpf");
    let common_dir = workspace.join("agent-common");
    let ebpf_dir_str = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", ebpf_dir.display()))?;

    // Rerun only when the kernel side or the shared types change. aya-build
    // itself adds `rerun-if-changed` for the agent-ebpf directory.
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        common_dir.join("src"),
        common_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    std::env::set_current_dir(&ebpf_dir)
        .with_context(|| format!("cannot enter {}", ebpf_dir.display()))?;
    // aya-build relays every line the nested cargo prints on stderr as a
    // `cargo:warning`, so its progress ("Compiling core", ...) showed as
    // some 35 warnings on every rebuild of the programs. Quiet, it prints
    // only what matters: compiler diagnostics (relayed from its JSON
    // messages) and errors.
    // SAFETY: a build script is single-threaded here; nothing else reads
    // or writes the environment concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: ebpf_dir_str,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF programs failed; they need the nightly toolchain with rust-src \
         (`rustup component add rust-src --toolchain nightly`) and bpf-linker \
         (`cargo install bpf-linker --version 0.10.4 --locked`), or `cargo xtask setup`; \
         set AYA_BUILD_SKIP=1 to build the agent without them (it then cannot intercept)",
    )?;

    let out_dir =
        PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("agent-ebpf");
    if !object.exists() {
        // AYA_BUILD_SKIP: leave an empty object so `include_bytes_aligned!` compiles.
        std::fs::write(&object, b"")
            .with_context(|| format!("cannot write {}", object.display()))?;
    }
    // Tests that inspect the object are reported as ignored without one.
    println!("cargo::rustc-check-cfg=cfg(aya_build_skip)");
    if std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0) == 0 {
        println!("cargo:rustc-cfg=aya_build_skip");
    }
    Ok(())
}
