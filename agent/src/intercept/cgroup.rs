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

/// The mount point of the cgroup v2 hierarchy's root, from
/// /proc/self/mountinfo (hybrid hosts mount it at /sys/fs/cgroup/unified;
/// unified hosts at /sys/fs/cgroup). A mount that shows only a subtree
/// (mountinfo's root field is not `/`) is never taken for the hierarchy:
/// the agent would intercept that subtree and silently miss every job
/// outside it.
pub fn cgroup2_root() -> Result<PathBuf, InterceptError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let mounts = std::fs::read_to_string(&path).map_err(|source| InterceptError::Io {
        what: "cannot read the mount table",
        path,
        source,
    })?;
    match parse_cgroup2_mount(&mounts) {
        Some(Cgroup2Mount { root, mount_point }) if root == "/" => Ok(mount_point),
        Some(Cgroup2Mount { root, mount_point }) => Err(InterceptError::Cgroup2Subtree {
            mount: mount_point,
            root,
        }),
        None => Err(InterceptError::NoCgroup2),
    }
}

/// One `cgroup2` line of /proc/self/mountinfo.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Cgroup2Mount {
    /// The directory of the hierarchy the mount shows (`/` for its root).
    pub root: String,
    pub mount_point: PathBuf,
}

/// The first `cgroup2` mount of a /proc/self/mountinfo text that shows the
/// hierarchy's root, or else the first `cgroup2` mount.
///
/// A line is `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] -
/// FSTYPE SOURCE SUPER_OPTIONS`; the optional fields end at the `-`.
pub(crate) fn parse_cgroup2_mount(mountinfo: &str) -> Option<Cgroup2Mount> {
    let mounts = mountinfo.lines().filter_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
        (fstype == "cgroup2").then(|| Cgroup2Mount {
            root: unescape_mount_path(root),
            mount_point: PathBuf::from(unescape_mount_path(mount_point)),
        })
    });
    let mut first = None;
    for m in mounts {
        if m.root == "/" {
            return Some(m);
        }
        first.get_or_insert(m);
    }
    first
}

/// The mount table writes space, tab, newline and backslash as `\ooo` octal.
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

/// Whether a missing `path` may still become a cgroup: its parent is a
/// cgroup v2 directory (a service's cgroup before the service starts).
pub(crate) fn may_appear(path: &Path) -> bool {
    path.parent().is_some_and(|p| check_cgroup_dir(p).is_ok())
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

/// Whether the cgroup v2 directory `dir` is the root of the whole
/// hierarchy, which the kernel numbers 1 (the inode number of a cgroup
/// directory is its id). In a container with a cgroup namespace of its
/// own, the cgroup v2 mount shows the namespace's root, a cgroup further
/// down with another id: attached there, the programs see only the
/// container's processes.
///
/// Asked of the directory itself, this needs no access to other
/// processes (comparing `/proc/1/ns/cgroup` does, which a sandboxed root
/// may lack) and is right for a namespace rooted at the hierarchy's root,
/// which covers every job.
pub fn is_hierarchy_root(dir: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir)?.ino() == 1)
}

/// Whether the process `pid` (as this process's pid namespace numbers it)
/// is in the cgroup `dir` or one below it, read from each `cgroup.procs`
/// (which shows pids in the reader's namespace). Subdirectories that cannot
/// be read are skipped; at most `MAX_CGROUPS_WALKED` are read.
pub fn holds_process(dir: &Path, pid: u32) -> io::Result<bool> {
    const MAX_CGROUPS_WALKED: usize = 100_000;
    let wanted = pid.to_string();
    let mut stack = vec![dir.to_path_buf()];
    let mut walked = 0;
    while let Some(d) = stack.pop() {
        walked += 1;
        if walked > MAX_CGROUPS_WALKED {
            break;
        }
        match std::fs::read_to_string(d.join("cgroup.procs")) {
            Ok(procs) if procs.lines().any(|l| l.trim() == wanted) => return Ok(true),
            Ok(_) => {}
            Err(e) if d == dir => return Err(e),
            Err(_) => continue,
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    Ok(false)
}

/// Whether this process runs in the network namespace of the host's init
/// (pid 1 as the host's pid namespace shows it): the programs intercept
/// only connections from the agent's own network namespace, so an agent
/// in a container's (docker without `--network=host`) intercepts none of
/// the host's jobs. `None` when it cannot tell: in a pid namespace of its
/// own (pid 1 is the container's init), or without the right to look at
/// pid 1's namespaces (not root).
pub fn in_host_network_namespace() -> Option<bool> {
    if crate::attribution::in_initial_pid_namespace() != Some(true) {
        return None;
    }
    same_network_namespace(Path::new("/proc/self"), Path::new("/proc/1"))
}

/// Whether the processes at the two /proc entries share their network
/// namespace (`None` when one cannot be read).
fn same_network_namespace(a: &Path, b: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let id = |p: &Path| {
        std::fs::metadata(p.join("ns/net"))
            .ok()
            .map(|m| (m.dev(), m.ino()))
    };
    Some(id(a)? == id(b)?)
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
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 22 0:28 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:10 - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:11 master:3 - cgroup2 cgroup2 rw
";

    fn mount(root: &str, mount_point: &str) -> Option<Cgroup2Mount> {
        Some(Cgroup2Mount {
            root: root.into(),
            mount_point: PathBuf::from(mount_point),
        })
    }

    /// This process shares its own network namespace, and a process the
    /// test starts in a new one (`unshare -n`, root only) does not.
    #[test]
    fn network_namespaces_are_told_apart() {
        let me = Path::new("/proc/self");
        assert_eq!(same_network_namespace(me, me), Some(true));
        assert_eq!(same_network_namespace(me, Path::new("/proc/no-such")), None);
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped the other-namespace half: needs root for unshare -n");
            return;
        }
        let mut child = std::process::Command::new("unshare")
            .args(["-n", "sleep", "30"])
            .spawn()
            .expect("unshare -n sleep");
        let other = Path::new("/proc").join(child.id().to_string());
        // unshare execs sleep once the namespace is made.
        let mut told = None;
        for _ in 0..500 {
            let comm = std::fs::read_to_string(other.join("comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                told = same_network_namespace(me, &other);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(told, Some(false));
    }

    #[test]
    fn finds_hybrid_mount() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            mount("/", "/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn finds_unified_mount() {
        let m = "20 1 0:5 / /proc rw - proc proc rw\n\
                 26 20 0:23 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(m), mount("/", "/sys/fs/cgroup"));
    }

    #[test]
    fn a_subtree_mount_is_not_the_root() {
        // A subtree bind-mounted first, the hierarchy's root after it.
        let m = "50 1 0:38 /ci.slice /mnt/ci rw - cgroup2 cgroup2 rw\n\
                 51 1 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(m), mount("/", "/sys/fs/cgroup"));
        // Only a subtree: it is returned as such, and `cgroup2_root` refuses it.
        let m = "50 1 0:38 /ci.slice /mnt/ci rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(m), mount("/ci.slice", "/mnt/ci"));
        let e = InterceptError::Cgroup2Subtree {
            mount: PathBuf::from("/mnt/ci"),
            root: "/ci.slice".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("/mnt/ci")
                && text.contains("/ci.slice")
                && text.contains("[intercept] cgroup"),
            "{text}"
        );
        assert_eq!(e.exit_code(), crate::exit::UNAVAILABLE);
    }

    #[test]
    fn v1_only_has_none() {
        let m = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                 33 1 0:40 / /x rw - tmpfs none rw\n";
        assert_eq!(parse_cgroup2_mount(m), None);
        assert_eq!(parse_cgroup2_mount(""), None);
        assert_eq!(parse_cgroup2_mount("garbage\n\n"), None);
        // A line cut before its file system type.
        assert_eq!(
            parse_cgroup2_mount("41 31 0:38 / /sys/fs/cgroup/unified rw -\n"),
            None
        );
    }

    #[test]
    fn unescapes_octal() {
        let m = "41 1 0:38 / /mnt/my\\040cgroups\\134x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(m), mount("/", "/mnt/my cgroups\\x"));
        assert_eq!(
            unescape_mount_path("a\\0"),
            "a\\0",
            "short escapes stay as they are"
        );
    }

    #[test]
    #[ignore = "needs a cgroup v2 host (as the kernel tests do)"]
    fn this_hosts_root_is_found() {
        // Every machine the suite runs on has a cgroup v2 hierarchy (the
        // kernel tests need one).
        let root = cgroup2_root().expect("a cgroup v2 root");
        assert!(
            is_hierarchy_root(&root).expect("stat"),
            "the suite runs in the host's cgroup namespace"
        );
        check_cgroup_dir(&root).expect("the root is a cgroup v2 directory");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }

    #[test]
    fn netns_cookie_is_readable() {
        // SO_NETNS_COOKIE needs no privilege, and the agent cannot start
        // without it (kernels before 5.14 lack it, and `check` says so).
        let cookie = own_netns_cookie().expect("SO_NETNS_COOKIE (Linux >= 5.14)");
        assert_ne!(cookie, 0, "a namespace cookie is never 0");
        assert_eq!(
            own_netns_cookie().unwrap(),
            cookie,
            "same namespace, same cookie"
        );
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
