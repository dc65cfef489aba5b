//! The few /proc files attribution reads, each bounded in size.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest `cmdline` read (the rest is cut before redaction).
const CMDLINE_MAX: u64 = 256 << 10;
/// Largest `environ` read (Linux caps the initial environment near this).
const ENVIRON_MAX: u64 = 4 << 20;
/// Largest `stat` / `status` / `cgroup` / `cpuset` read.
const SMALL_MAX: u64 = 16 << 10;

/// A view of one process under a proc root.
pub(super) struct Proc {
    dir: PathBuf,
}

impl Proc {
    pub(super) fn new(proc_root: &Path, pid: u32) -> Proc {
        Proc {
            dir: proc_root.join(pid.to_string()),
        }
    }

    fn read(&self, name: &str, max: u64) -> Option<Vec<u8>> {
        let f = std::fs::File::open(self.dir.join(name)).ok()?;
        let mut buf = Vec::new();
        f.take(max).read_to_end(&mut buf).ok()?;
        Some(buf)
    }

    /// Start time in clock ticks since boot (`stat` field 22), which with
    /// the pid identifies a process across pid reuse.
    pub(super) fn start_time(&self) -> Option<u64> {
        let stat = self.read("stat", SMALL_MAX)?;
        parse_start_time(&stat)
    }

    /// Parent pid (`PPid:` in `status`).
    pub(super) fn ppid(&self) -> Option<u32> {
        let status = self.read("status", SMALL_MAX)?;
        String::from_utf8_lossy(&status)
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Target of the `exe` link.
    pub(super) fn exe(&self) -> Option<String> {
        std::fs::read_link(self.dir.join("exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// `/proc/PID/cgroup`: one `ID:CONTROLLERS:PATH` line per hierarchy.
    pub(super) fn cgroup(&self) -> Option<String> {
        self.read("cgroup", SMALL_MAX)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// `/proc/PID/cpuset`: the path of the process's cpuset cgroup.
    pub(super) fn cpuset(&self) -> Option<String> {
        self.read("cpuset", SMALL_MAX)
            .map(|b| String::from_utf8_lossy(&b).trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// A hash of the raw command line (0 when it cannot be read, or reads
    /// empty: a zombie, or a process whose main thread has exited, has no
    /// memory to read it from): an exec of the same program with other
    /// arguments changes it. The bytes themselves are not kept.
    pub(super) fn cmdline_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let Some(raw) = self.read("cmdline", CMDLINE_MAX).filter(|r| !r.is_empty()) else {
            return 0;
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.as_slice().hash(&mut h);
        h.finish()
    }

    /// The arguments, NUL-separated in the file (not redacted).
    pub(super) fn cmdline(&self) -> Option<Vec<String>> {
        let raw = self.read("cmdline", CMDLINE_MAX)?;
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        (!args.is_empty()).then_some(args)
    }

    /// Reads a file that may hold secrets, up to `max` bytes, so that no
    /// copy of its contents is freed unzeroed: `read_to_end` grows its
    /// buffer by reallocation, which frees the old contents as they are.
    /// Here each growth copies into a new buffer and zeroes the old one,
    /// and the read chunk is zeroed at the end.
    fn read_wiped(&self, name: &str, max: u64) -> Option<Vec<u8>> {
        let f = std::fs::File::open(self.dir.join(name)).ok()?;
        let mut f = f.take(max);
        let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
        let mut chunk = [0u8; 8192];
        let ok = loop {
            match f.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    if buf.len() + n > buf.capacity() {
                        let mut bigger =
                            Vec::with_capacity((buf.capacity() * 2).max(buf.len() + n));
                        bigger.extend_from_slice(&buf);
                        wipe(&mut buf);
                        buf = bigger;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        wipe(&mut chunk);
        if ok {
            Some(buf)
        } else {
            wipe(&mut buf);
            None
        }
    }

    /// Calls `keep(name, value)` for each `NAME=VALUE` of the initial
    /// environment; the buffer is zeroed before it is freed, since the rest
    /// of the environment may hold secrets.
    pub(super) fn environ(&self, mut keep: impl FnMut(&str, &str)) -> bool {
        let Some(mut raw) = self.read_wiped("environ", ENVIRON_MAX) else {
            return false;
        };
        for entry in raw.split(|b| *b == 0) {
            let Some(eq) = entry.iter().position(|b| *b == b'=') else {
                continue;
            };
            let (name, value) = (&entry[..eq], &entry[eq + 1..]);
            if let (Ok(name), Ok(value)) = (std::str::from_utf8(name), std::str::from_utf8(value)) {
                keep(name, value);
            }
        }
        wipe(&mut raw);
        true
    }
}

/// Zeroes `b` in a way the optimiser keeps.
fn wipe(b: &mut [u8]) {
    b.fill(0);
    std::hint::black_box(&*b);
}

/// Field 22 of `/proc/PID/stat`. `comm` (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub(crate) fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|b| *b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After ")": field 3 (state) is index 0, so field 22 is index 19.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_comm() {
        let stat = b"1234 (we ird) (x) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time(b"1234 (x) S 1"), None);
        assert_eq!(parse_start_time(b"garbage"), None);
    }

    /// An environment larger than the first buffer, and one past the
    /// limit, read through the growth path. (That each old buffer is
    /// zeroed before it is freed cannot be seen from a test.)
    #[test]
    fn environments_of_any_size_are_read_whole_up_to_the_limit() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("42");
        std::fs::create_dir(&dir).expect("dir");
        let mut env = Vec::new();
        for i in 0..20_000 {
            env.extend_from_slice(format!("VAR_{i}=value-{i}\0").as_bytes());
        }
        env.extend_from_slice(b"GITHUB_REPOSITORY=acme/widgets\0");
        assert!(env.len() > 3 * (64 << 10), "past two growths");
        std::fs::write(dir.join("environ"), &env).expect("environ");
        let p = Proc::new(t.path(), 42);
        let mut seen = Vec::new();
        assert!(p.environ(|k, v| {
            if k == "GITHUB_REPOSITORY" || k == "VAR_0" || k == "VAR_19999" {
                seen.push(format!("{k}={v}"));
            }
        }));
        assert_eq!(
            seen,
            [
                "VAR_0=value-0",
                "VAR_19999=value-19999",
                "GITHUB_REPOSITORY=acme/widgets"
            ]
        );
        assert_eq!(
            p.read_wiped("environ", 10).as_deref(),
            Some(&b"VAR_0=valu"[..])
        );
        assert_eq!(p.read_wiped("missing", 10), None);
    }
}
