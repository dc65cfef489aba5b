//! The audit log: one JSON line per usage record (the record's serde form),
//! appended by the audit worker thread and rotated by size
//! (`PATH` → `PATH.1` → ... → `PATH.KEEP`, the oldest deleted).
//!
//! A rotation that fails (a full disk, a directory in the way) does not
//! cost records: they go on into the current file, and the rotation is
//! tried again a minute later (not on every record, which would shift and
//! delete the kept files over and over).
//!
//! Must never: run on the request path, or write anything a record does not
//! contain (records carry no secrets: no headers, keys or query strings).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::meter::UsageRecord;

/// An open audit log.
pub(crate) struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: BufWriter<File>,
    size: u64,
    /// (device, inode) of the open file when it was opened at `path`.
    file_id: Option<(u64, u64)>,
    /// After a failed rotation: no new try before this.
    retry_at: Option<Instant>,
}

/// How long after a failed rotation the next is tried.
const ROTATE_RETRY: Duration = Duration::from_secs(60);

fn open(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let size = f.metadata()?.len();
    Ok((BufWriter::with_capacity(64 * 1024, f), size))
}

/// `PATH.n`: the audit log's `n`th rotated file (1 is the newest).
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl AuditLog {
    /// Opens (creating) the log and its directory.
    pub(crate) fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<AuditLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let (file, size) = open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            file,
            size,
            file_id: crate::file_id(path),
            retry_at: None,
        })
    }

    /// Appends one record (buffered; see [`AuditLog::flush`]). A failed
    /// rotation is returned after the record was written to the current
    /// file all the same.
    pub(crate) fn append(&mut self, rec: &UsageRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let len = line.len() as u64;
        let mut rotation = Ok(());
        if self.size > 0
            && self.size + len > self.max_bytes
            && self.retry_at.is_none_or(|t| Instant::now() >= t)
        {
            rotation = self.rotate();
            self.retry_at = rotation.is_err().then(|| Instant::now() + ROTATE_RETRY);
        }
        self.file.write_all(&line)?;
        self.size += len;
        rotation
    }

    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        // Shift only while the open file is still the one at `path`: after
        // a rotation that moved it away but could not open a new one, the
        // next try only opens.
        if crate::file_id(&self.path).is_some_and(|id| Some(id) == self.file_id) {
            if self.keep == 0 {
                std::fs::remove_file(&self.path)?;
            } else {
                match std::fs::remove_file(rotated(&self.path, self.keep)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                for n in (1..self.keep).rev() {
                    match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
                std::fs::rename(&self.path, rotated(&self.path, 1))?;
            }
        }
        let (file, size) = open(&self.path)?;
        self.file = file;
        self.size = size;
        self.file_id = crate::file_id(&self.path);
        Ok(())
    }
}
