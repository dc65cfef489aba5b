//! The one error type of `intercept`: each variant says what was wrong and
//! what to do, and maps to a sysexits code.

use std::{io, path::PathBuf};

use crate::exit;

/// Why interception could not be set up or updated.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// The mount table has no cgroup2 mount.
    #[error(
        "no cgroup v2 hierarchy is mounted (no `cgroup2` line in /proc/self/mountinfo); mount one, e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`, or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,

    /// The only cgroup2 mount shows a subtree of the hierarchy, not its root.
    #[error(
        "the only cgroup v2 mount, {mount}, shows the subtree {root} of the hierarchy, not its \
         root: jobs outside it would not be intercepted; mount the hierarchy's root, or set \
         [intercept] cgroup to the directory whose processes should be intercepted"
    )]
    Cgroup2Subtree { mount: PathBuf, root: String },

    /// The configured cgroup directory does not exist.
    #[error(
        "cgroup directory {path} does not exist; create it or set [intercept] cgroup to an \
         existing cgroup v2 directory"
    )]
    CgroupMissing { path: PathBuf },

    /// The configured path is not a directory of a cgroup v2 file system.
    #[error(
        "{path} is not a cgroup v2 directory; set [intercept] cgroup to a directory under the \
         cgroup v2 mount ({root})"
    )]
    NotCgroup2 { path: PathBuf, root: String },

    /// /sys/kernel/btf/vmlinux is missing.
    #[error(
        "kernel BTF is missing (/sys/kernel/btf/vmlinux does not exist); tollgate needs a kernel \
         built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,

    /// The binary was built with `AYA_BUILD_SKIP`: no programs embedded.
    #[error(
        "this tollgate binary was built without its eBPF programs (AYA_BUILD_SKIP was set); \
         rebuild it with the nightly toolchain, rust-src and bpf-linker (`cargo xtask setup`)"
    )]
    NoObject,

    /// The kernel said EPERM (or EACCES to a non-root user).
    #[error(
        "permission denied while {action}: {detail}; run the agent as root (it needs CAP_BPF, \
         CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON)"
    )]
    Permission { action: String, detail: String },

    /// The kernel lacks a program type, attach type or helper.
    #[error(
        "the kernel refused {action}: {detail}; tollgate needs Linux 5.15 or newer with \
         CONFIG_CGROUP_BPF and CONFIG_BPF_SYSCALL"
    )]
    Unsupported { action: String, detail: String },

    /// Any other BPF failure (verifier rejection, map full, object mismatch).
    #[error("{action} failed: {detail}; this is a bug in tollgate, please report it")]
    Bpf { action: String, detail: String },

    /// `SO_NETNS_COOKIE` failed (Linux < 5.14).
    #[error(
        "cannot read the agent's network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14 or \
         newer): {0}"
    )]
    NetnsCookie(#[source] io::Error),

    /// The kernel's socket diagnostics cannot find a loopback socket.
    #[error(
        "the kernel's TCP socket diagnostics do not work ({0}); tollgate finds each redirected \
         client socket through them (as `ss` does): load the module (`modprobe tcp_diag`) or \
         use a kernel with CONFIG_INET_DIAG and CONFIG_INET_TCP_DIAG"
    )]
    NoSockDiag(#[source] io::Error),

    /// The self-test's own loopback connection could not be made.
    #[error(
        "cannot make a TCP connection on 127.0.0.1 ({0}): the agent's listener and the jobs' \
         redirected connections need the loopback interface; is `lo` up in this network \
         namespace (`ip link set lo up`)?"
    )]
    NoLoopback(#[source] io::Error),

    /// A file the agent must read could not be read.
    #[error("{what} ({path}): {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl InterceptError {
    /// The process exit code (sysexits) for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            InterceptError::Permission { .. } => exit::NOPERM,
            InterceptError::NotCgroup2 { .. } => exit::USAGE,
            InterceptError::NoCgroup2
            | InterceptError::Cgroup2Subtree { .. }
            | InterceptError::CgroupMissing { .. }
            | InterceptError::NoBtf
            | InterceptError::Unsupported { .. }
            | InterceptError::NetnsCookie(_)
            | InterceptError::NoSockDiag(_)
            | InterceptError::NoLoopback(_)
            | InterceptError::Io { .. } => exit::UNAVAILABLE,
            InterceptError::NoObject | InterceptError::Bpf { .. } => exit::SOFTWARE,
        }
    }

    /// Classifies a failed BPF operation by the errno at the bottom of its
    /// error chain: EPERM (or EACCES when not root) means privilege, EINVAL
    /// and EOPNOTSUPP from the kernel mean a missing feature.
    pub(crate) fn bpf(action: impl Into<String>, err: &(dyn std::error::Error + 'static)) -> Self {
        let action = action.into();
        let detail = chain(err);
        let errno = errno_in(err);
        let root = nix::unistd::geteuid().is_root();
        match errno {
            Some(libc::EPERM) => InterceptError::Permission { action, detail },
            Some(libc::EACCES) if !root => InterceptError::Permission { action, detail },
            Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) if !is_verifier(err) => {
                InterceptError::Unsupported { action, detail }
            }
            _ => InterceptError::Bpf { action, detail },
        }
    }
}

/// The error and its sources, joined with ": ".
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn errno_in(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(code) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(code);
        }
        current = e.source();
    }
    None
}

/// A verifier rejection carries a verifier log; it is not a missing feature.
fn is_verifier(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(aya::programs::ProgramError::LoadError { verifier_log, .. }) =
            e.downcast_ref::<aya::programs::ProgramError>()
        {
            return !verifier_log.to_string().trim().is_empty();
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(InterceptError::NoCgroup2.exit_code(), exit::UNAVAILABLE);
        assert_eq!(InterceptError::NoBtf.exit_code(), exit::UNAVAILABLE);
        let p = PathBuf::from("/x");
        assert_eq!(
            InterceptError::CgroupMissing { path: p.clone() }.exit_code(),
            exit::UNAVAILABLE
        );
        let e = InterceptError::NotCgroup2 {
            path: p,
            root: "/sys/fs/cgroup".into(),
        };
        assert_eq!(e.exit_code(), exit::USAGE);
    }

    #[test]
    fn classifies_errno() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let e = InterceptError::bpf("loading", &eperm);
        assert_eq!(e.exit_code(), exit::NOPERM, "{e}");
        assert!(e.to_string().contains("run the agent as root"), "{e}");

        let einval = io::Error::from_raw_os_error(libc::EINVAL);
        let e = InterceptError::bpf("attaching connect4", &einval);
        assert_eq!(e.exit_code(), exit::UNAVAILABLE, "{e}");

        let other = io::Error::from_raw_os_error(libc::ENOMEM);
        assert_eq!(InterceptError::bpf("x", &other).exit_code(), exit::SOFTWARE);
    }

    #[test]
    fn classifies_wrapped_errno() {
        let wrapped = aya::sys::SyscallError {
            call: "bpf_link_create",
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        };
        let e = InterceptError::bpf("attaching", &wrapped);
        assert_eq!(e.exit_code(), exit::NOPERM, "{e}");
    }
}
