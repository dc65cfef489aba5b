//! Where the cgroup v2 hierarchy is, whether a path is a cgroup v2 directory,
//! and the agent's own network namespace cookie.

use std::{
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use super::InterceptError;

/// `statfs.f_type` of a cgroup v2 file system (linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `SO_NETNS_COOKIE` (asm-generic/socket.h, Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cgroup v2 mount point from /proc/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified; unified hosts at /sys/fs/cgroup).
pub fn cgroup2_root() -> Result<PathBuf, InterceptError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| InterceptError::Io {
        what: "cannot read the mount table",
        path: PathBuf::from("/proc/mounts"),
        source,
    })?;
    parse_cgroup2_mount(&mounts).ok_or(InterceptError::NoCgroup2)
}

/// The mount point of the first `cgroup2` line of a /proc/mounts text.
pub(crate) fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// /proc/mounts writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `path` exists and is a directory of a cgroup v2 file system.
pub(crate) fn check_cgroup_dir(path: &Path) -> Result<(), InterceptError> {
    let stat = match nix::sys::statfs::statfs(path) {
        Ok(stat) => stat,
        Err(nix::errno::Errno::ENOENT) => {
            return Err(InterceptError::CgroupMissing {
                path: path.to_path_buf(),
            });
        }
        Err(errno) => {
            return Err(InterceptError::Io {
                what: "cannot inspect the cgroup directory",
                path: path.to_path_buf(),
                source: io::Error::from(errno),
            });
        }
    };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's integer type differs by libc"
    )]
    let fs_type = stat.filesystem_type().0 as i64;
    if fs_type != CGROUP2_SUPER_MAGIC || !path.is_dir() {
        let root = cgroup2_root()
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| "none mounted".to_owned());
        return Err(InterceptError::NotCgroup2 {
            path: path.to_path_buf(),
            root,
        });
    }
    Ok(())
}

/// The cookie of the network namespace this process runs in, as
/// `bpf_get_netns_cookie` reports it for sockets created here.
pub(crate) fn own_netns_cookie() -> Result<u64, InterceptError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| InterceptError::NetnsCookie(io::Error::from(e)))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(InterceptError::NetnsCookie(io::Error::last_os_error()));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn finds_hybrid_mount() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_mount() {
        let m = "proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(m),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn v1_only_has_none() {
        let m = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\nnone /x tmpfs rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(m), None);
        assert_eq!(parse_cgroup2_mount(""), None);
        assert_eq!(parse_cgroup2_mount("garbage\n\n"), None);
    }

    #[test]
    fn unescapes_octal() {
        let m = "cgroup2 /mnt/my\\040cgroups\\134x cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(m),
            Some(PathBuf::from("/mnt/my cgroups\\x"))
        );
        assert_eq!(
            unescape_mount_path("a\\0"),
            "a\\0",
            "short escapes stay as they are"
        );
    }

    #[test]
    fn netns_cookie_is_readable() {
        // SO_NETNS_COOKIE needs no privilege; it only fails on kernels < 5.14.
        if let Ok(cookie) = own_netns_cookie() {
            assert_ne!(cookie, 0, "a namespace cookie is never 0");
            assert_eq!(
                own_netns_cookie().unwrap(),
                cookie,
                "same namespace, same cookie"
            );
        }
    }

    #[test]
    fn missing_dir_is_reported() {
        let err = check_cgroup_dir(Path::new("/nonexistent/tollgate-test")).unwrap_err();
        assert!(matches!(err, InterceptError::CgroupMissing { .. }), "{err}");
    }

    #[test]
    fn non_cgroup_dir_is_usage_error() {
        let err = check_cgroup_dir(Path::new("/tmp")).unwrap_err();
        assert!(matches!(err, InterceptError::NotCgroup2 { .. }), "{err}");
        assert_eq!(err.exit_code(), crate::exit::USAGE);
    }
}
