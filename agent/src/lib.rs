//! tollgate: a host agent for self-hosted CI runners that makes LLM API spend
//! visible and bounded, with zero changes to the jobs.
//!
//! The binary (`main.rs`) only wires these modules together; see DESIGN.md
//! for what each one owns.

pub mod app;
pub mod attribution;
pub mod budget;
pub mod ca;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod intercept;
pub mod ledger;
pub mod meter;
pub mod presence;
pub mod providers;
pub mod proxy;
pub mod report;
pub mod trust;

/// (device, inode) of the file at `path`, or `None` if it cannot be read:
/// tells whether the file at a path is still the one a handle was opened
/// on (deleted, moved away, replaced).
pub(crate) fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Exit codes (sysexits.h), chosen by what the user has to do.
pub mod exit {
    /// Bad command line or config: fix the input.
    pub const USAGE: u8 = 64;
    /// Something the agent needs is missing (cgroup v2, BTF, a port).
    pub const UNAVAILABLE: u8 = 69;
    /// An internal error.
    pub const SOFTWARE: u8 = 70;
    /// Output could not be written (a closed pipe, a full disk).
    pub const IOERR: u8 = 74;
    /// Not enough privilege: run as root.
    pub const NOPERM: u8 = 77;
}
