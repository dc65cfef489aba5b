//! The control plane on the runner: live aggregates of what the agent is
//! metering right now, served over a root-only Unix socket, and the
//! `tollgate top` client that draws them.
//!
//! Owns: [`LiveState`] (per-process and per-job aggregates, fed by the
//! record sink and by the proxy's in-flight hooks), the socket and its
//! line protocol ([`protocol`]), and the `top` terminal UI ([`top`]).
//!
//! Must never: do I/O or wait on anything but a short in-memory lock on the
//! data path (`LiveState::submit`, `request_started`, and the guard's drop),
//! grow without bound (entries are evicted when idle and capped), or serve
//! the socket to anyone but root (mode 0600, peer credentials checked).
//!
//! Budget state will travel on the same socket: the snapshot is versioned
//! and additive fields keep `version: 1`.

pub mod client;
pub mod live;
pub mod protocol;
pub mod server;
pub mod top;
pub mod view;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::Deserialize;

pub use client::ClientError;
pub use live::{InFlight, LiveHandle, LiveState};
pub use protocol::{PROTOCOL_VERSION, Snapshot};
pub use server::{ControlServer, serve};

/// Default path of the control socket.
pub const DEFAULT_SOCKET: &str = "/run/tollgate/control.sock";

/// `[control]`: the local control socket that `tollgate top` (and later the
/// budget commands) talk to.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Path of the Unix socket. Created mode 0600 (root only); its
    /// directory is created mode 0755 when missing. A stale socket file
    /// left by a crashed agent is replaced at start.
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

impl ControlConfig {
    /// Checks what serde cannot (pure: no I/O). Errors are `(key, message)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let key = "control.socket".to_string();
        let s = &self.socket;
        if !s.is_absolute() {
            return Err((key, format!("`{}` must be an absolute path", s.display())));
        }
        if s.file_name().is_none() || s.as_os_str().to_string_lossy().ends_with('/') {
            return Err((key, format!("`{}` must name a file", s.display())));
        }
        // sockaddr_un.sun_path is 108 bytes, with the terminating NUL.
        if s.as_os_str().len() > 107 {
            return Err((
                key,
                format!(
                    "`{}` is {} bytes long; a Unix socket path may have at most 107",
                    s.display(),
                    s.as_os_str().len()
                ),
            ));
        }
        Ok(())
    }
}

/// An error of the control server. Client errors are [`ClientError`].
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another tollgate agent is already serving the control socket {}; stop it or set [control] socket to another path",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "{} exists and is not a socket; refusing to replace it (remove it or set [control] socket to another path)",
        path.display()
    )]
    NotASocket { path: PathBuf },
    #[error("cannot create the control socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ControlError {
    /// Process exit code (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        use crate::exit::*;
        let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
        match self {
            ControlError::Directory { source, .. } | ControlError::Bind { source, .. }
                if denied(source) =>
            {
                NOPERM
            }
            ControlError::NotASocket { .. } => USAGE,
            _ => UNAVAILABLE,
        }
    }
}
