//! The ledger: one durable row per request that reached a provider.
//!
//! Owns: `STATE/ledger.sqlite` (SQLite, WAL, `synchronous=NORMAL`: a process
//! crash loses nothing committed), its schema and migrations (`schema`), and
//! the writer thread the request path hands records to (`writer`).
//!
//! Must never: lose a settled record while memory allows (a full queue
//! spills to an overflow list, a failed write is retried; only past
//! `ledger.max_backlog` unwritten records are new ones dropped, counted and
//! logged), hold unbounded memory, make the request path wait on
//! disk, or store a secret (the record types carry no headers, keys or query
//! strings; do not add any).

mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::meter::UsageRecord;

pub use schema::SCHEMA_VERSION;
pub use writer::{LedgerHandle, LedgerStats, LedgerWriter};

/// How long rows of batch reads (`operation = 'batch_results'`) are kept
/// whatever `ledger.retention_days` says, and how far back the agent reads
/// them at start: the longest any provider keeps a batch's results
/// (Anthropic: 29 days; OpenAI keeps output files until deleted, and older
/// ones are rarely read again). A shorter retention would count results
/// read again after a restart a second time.
pub const BATCH_READS_KEPT: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long a writer waits for another process's lock (e.g. `sqlite3`).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows a walk over the ledger ([`Ledger::for_each`]) reads in one read
/// transaction.
const WALK_PAGE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(
        "permission denied: cannot open the ledger {}: {refused}; run tollgate as root (sudo), or change that",
        path.display()
    )]
    Permission {
        path: PathBuf,
        /// Which was refused, the file or a directory on its path (SQLite's
        /// own message names its internal URI, not what to change).
        refused: &'static str,
        source: rusqlite::Error,
    },
    #[error(
        "{} is not a tollgate ledger (not an SQLite database, or corrupt): {source}; move it away and tollgate will start a new one",
        path.display()
    )]
    NotADatabase {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the ledger {} has schema version {found}, newer than this tollgate understands ({SCHEMA_VERSION}); upgrade tollgate",
        path.display()
    )]
    TooNew { path: PathBuf, found: i64 },
    #[error(
        "the ledger {} has schema version {found}, which holds no table yet, and it is opened read-only; start the agent (or run this as root) once to create it",
        path.display()
    )]
    Outdated { path: PathBuf, found: i64 },
    #[error(
        "the ledger {} can only be opened read-only (a read-only file or filesystem); the agent must be able to write it",
        path.display()
    )]
    ReadOnly { path: PathBuf },
    #[error(
        "{} is an SQLite database without a tollgate schema (another program's tables, or a schema version below 0); tollgate does not change it: move it away and tollgate starts a new ledger",
        path.display()
    )]
    Foreign { path: PathBuf },
    #[error("cannot create the directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the ledger writer thread: {0}")]
    Thread(std::io::Error),
    #[error("ledger {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the ledger writer did not finish within {waited:?}; {unwritten} records were not written"
    )]
    ShutdownTimeout { waited: Duration, unwritten: u64 },
    #[error("the ledger writer stopped with {unwritten} records unwritten: {reason}")]
    Unwritten { unwritten: u64, reason: String },
    /// What the records were read for could not take them (a report's
    /// output closed early).
    #[error("cannot write the records out: {0}")]
    Output(std::io::Error),
}

impl LedgerError {
    /// Process exit code (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            LedgerError::Permission { .. } => crate::exit::NOPERM,
            LedgerError::Directory { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                crate::exit::NOPERM
            }
            LedgerError::NotADatabase { .. }
            | LedgerError::ReadOnly { .. }
            | LedgerError::Foreign { .. }
            | LedgerError::TooNew { .. }
            | LedgerError::Outdated { .. }
            | LedgerError::Directory { .. } => crate::exit::UNAVAILABLE,
            LedgerError::Sqlite { source, .. }
                if matches!(
                    source.sqlite_error_code(),
                    Some(
                        ErrorCode::DiskFull
                            | ErrorCode::SystemIoFailure
                            | ErrorCode::ReadOnly
                            | ErrorCode::DatabaseBusy
                    )
                ) =>
            {
                crate::exit::UNAVAILABLE
            }
            LedgerError::Output(_) => crate::exit::IOERR,
            _ => crate::exit::SOFTWARE,
        }
    }

    fn classify(path: &Path, source: rusqlite::Error) -> LedgerError {
        let path = path.to_path_buf();
        match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                LedgerError::NotADatabase { path, source }
            }
            Some(ErrorCode::PermissionDenied) => LedgerError::Permission {
                refused: refused_part(&path),
                path,
                source,
            },
            Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly) if permission_denied(&path) => {
                LedgerError::Permission {
                    refused: refused_part(&path),
                    path,
                    source,
                }
            }
            _ => LedgerError::Sqlite { path, source },
        }
    }
}

/// Whether `e` is about the record being written rather than the ledger:
/// the same record would fail again, and another would not.
fn refuses_the_record(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::ToSqlConversionFailure(_) => true,
        _ => matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig)
        ),
    }
}

/// What refused this user `path`: a directory on the way (the file cannot
/// even be looked at), or the file's own mode.
fn refused_part(path: &Path) -> &'static str {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            "a directory on its path does not let this user in"
        }
        Ok(_) => "the file's owner and mode do not let this user open it",
        Err(_) => "its directory does not let this user create files in it",
    }
}

/// Whether opening `path` (or creating a file beside it) is refused.
fn permission_denied(path: &Path) -> bool {
    let denied = |r: std::io::Result<std::fs::File>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied);
    if path.exists() {
        denied(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path),
        )
    } else {
        let probe = path.with_extension("sqlite.probe");
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe);
        if r.is_ok() {
            let _ = std::fs::remove_file(&probe);
        }
        denied(r)
    }
}

/// The WAL file SQLite keeps beside `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Which rows `query` returns. Empty filter: all rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Requests started at or after this Unix millisecond.
    pub since_ms: Option<i64>,
    /// Exact repository (`owner/name`).
    pub repository: Option<String>,
    /// Exact job name.
    pub job: Option<String>,
    /// Exact CI run id (`GITHUB_RUN_ID`, `CI_PIPELINE_ID`, ...).
    pub run_id: Option<String>,
    /// Exact run attempt (`GITHUB_RUN_ATTEMPT`).
    pub run_attempt: Option<String>,
    /// Exact CI job id (`CI_JOB_ID`, `BUILDKITE_JOB_ID`, ...).
    pub job_id: Option<String>,
    /// Exact runner name (`RUNNER_NAME`, `CI_RUNNER_DESCRIPTION`, ...).
    pub runner: Option<String>,
}

/// An open ledger file.
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    insert_sql: String,
    /// The select for this file's schema.
    select_sql: String,
    /// (device, inode) of the file when it was opened.
    file_id: Option<(u64, u64)>,
    /// Opened as an immutable file (no agent had it open): how the file
    /// looked then, to see an agent start writing it during a walk.
    immutable: Option<FileStamp>,
}

/// What shows that a file read as immutable has changed: its identity,
/// length and modification time.
type FileStamp = Option<((u64, u64), u64, std::time::SystemTime)>;

fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(((m.dev(), m.ino()), m.len(), m.modified().ok()?))
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens (creating it and its directory) the ledger at `path`, sets WAL,
    /// `synchronous=NORMAL` and a busy timeout, and migrates the schema.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LedgerError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let err = |e| LedgerError::classify(path, e);
        let mut conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        // SQLite falls back to read-only when the OS refuses writes; every
        // insert would then fail after "ready".
        if conn.is_readonly(rusqlite::MAIN_DB).map_err(err)? {
            return Err(LedgerError::ReadOnly {
                path: path.to_path_buf(),
            });
        }
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        // The first statement that reads the file: a non-SQLite file fails
        // here; another program's database is left as it is.
        if schema::foreign(&conn).map_err(err)? {
            return Err(LedgerError::Foreign {
                path: path.to_path_buf(),
            });
        }
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), %mode, "the ledger could not switch to WAL mode");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        schema::migrate(&mut conn).map_err(|e| match e {
            schema::MigrateError::TooNew(found) => LedgerError::TooNew {
                path: path.to_path_buf(),
                found,
            },
            schema::MigrateError::Sqlite(e) => err(e),
        })?;
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
            insert_sql: schema::insert_sql(),
            select_sql: schema::select_sql(),
            file_id: crate::file_id(path),
            immutable: None,
        })
    }

    /// Whether the file at the ledger's path is no longer the one opened
    /// (deleted, or another moved in its place): rows written now would go
    /// to a file nobody can find.
    pub fn file_replaced(&self) -> bool {
        crate::file_id(&self.path) != self.file_id
    }

    /// Deletes up to `limit` of the oldest rows that started before
    /// `cutoff_ms` (batch reads: before [`BATCH_READS_KEPT`] ago, if that
    /// is earlier), and never a row within `keep_ms` of the newest row: a
    /// clock far ahead at boot (not yet synced) would otherwise take rows
    /// that are not yet past the retention. One transaction; the index on
    /// `started_at_ms` finds them. Returns how many went.
    pub fn prune_before(
        &self,
        cutoff_ms: i64,
        keep_ms: i64,
        limit: usize,
    ) -> Result<usize, LedgerError> {
        // Batch reads stay for BATCH_READS_KEPT whatever the retention:
        // the agent reads them at start so as not to count results again.
        let kept_ms = BATCH_READS_KEPT.as_millis() as i64;
        let batch_cutoff_ms = cutoff_ms
            .saturating_add(keep_ms)
            .saturating_sub(keep_ms.max(kept_ms));
        self.conn
            .execute(
                "DELETE FROM requests WHERE id IN \
                 (SELECT id FROM requests WHERE started_at_ms < \
                    MIN(?1, (SELECT MAX(started_at_ms) FROM requests) - ?2) \
                  AND (operation != 'batch_results' OR started_at_ms < ?4) \
                  ORDER BY started_at_ms LIMIT ?3)",
                rusqlite::params![cutoff_ms, keep_ms, limit as i64, batch_cutoff_ms],
            )
            .map_err(|e| LedgerError::classify(&self.path, e))
    }

    /// Copies what the WAL holds into the database file and empties the
    /// WAL. SQLite skips this when it closes a file that was moved, so a
    /// ledger moved away without its WAL would miss its latest rows.
    pub fn checkpoint(&self) -> Result<(), LedgerError> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(|e| LedgerError::classify(&self.path, e))
    }

    /// Opens an existing ledger for reading only (`report` by a user who
    /// may read but not write the root-owned ledger): nothing is created,
    /// switched or migrated. A file of an older schema (the agent not yet
    /// restarted after an upgrade) is read as it is, the columns it lacks
    /// as their defaults; an empty one (version 0) is refused. When the
    /// agent is stopped (no `-wal` file) and the directory is not writable,
    /// the file is opened as immutable; an agent that starts writing it
    /// during a walk ([`Ledger::for_each`]) is seen, and the walk goes on
    /// through an ordinary read-only connection.
    pub fn open_read_only(path: &Path) -> Result<Ledger, LedgerError> {
        let err = |e| LedgerError::classify(path, e);
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let version = |conn: &Connection| -> rusqlite::Result<i64> {
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.pragma_query_value(None, "user_version", |r| r.get(0))
        };
        // No `-wal` file: no agent has the ledger open, and it is read as
        // an immutable file, which creates nothing (a read-only connection
        // to a WAL database would leave `-wal` and `-shm` files behind,
        // and cannot open one in a directory it may not write).
        let mut immutable = None;
        let conn = if wal_path(path).exists() {
            Connection::open_with_flags(path, flags).map_err(err)?
        } else {
            immutable = Some(stamp(path));
            let escaped = path
                .to_string_lossy()
                .replace('%', "%25")
                .replace('?', "%3f")
                .replace('#', "%23");
            Connection::open_with_flags(
                format!("file:{escaped}?immutable=1"),
                flags | OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(err)?
        };
        let found = version(&conn).map_err(err)?;
        if schema::foreign(&conn).map_err(err)? {
            return Err(LedgerError::Foreign {
                path: path.to_path_buf(),
            });
        }
        if found > SCHEMA_VERSION && !schema::newer_but_compatible(&conn) {
            return Err(LedgerError::TooNew {
                path: path.to_path_buf(),
                found,
            });
        }
        if found < 1 {
            return Err(LedgerError::Outdated {
                path: path.to_path_buf(),
                found,
            });
        }
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
            insert_sql: schema::insert_sql(),
            select_sql: schema::select_sql_for(found),
            file_id: crate::file_id(path),
            immutable,
        })
    }

    /// Opened as immutable, and an agent has since opened the file (its
    /// `-wal` is there) or changed it.
    fn written_since_opened(&self) -> bool {
        self.immutable
            .as_ref()
            .is_some_and(|then| wal_path(&self.path).exists() || stamp(&self.path) != *then)
    }

    /// The file this ledger writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Inserts `records` in one transaction: all or none.
    pub fn insert_batch(
        &mut self,
        records: &[impl std::borrow::Borrow<UsageRecord>],
    ) -> Result<(), LedgerError> {
        self.insert_batch_pausing(records, usize::MAX, || {})
    }

    /// `insert_batch`, calling `pause` after every `every` records (not
    /// after the last): the writer thread uses it to give the CPU back
    /// between slices of a long batch.
    pub fn insert_batch_pausing(
        &mut self,
        records: &[impl std::borrow::Borrow<UsageRecord>],
        every: usize,
        mut pause: impl FnMut(),
    ) -> Result<(), LedgerError> {
        if records.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let err = |e| LedgerError::classify(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut stmt = tx.prepare_cached(&self.insert_sql).map_err(err)?;
            let every = every.max(1);
            for (i, r) in records.iter().enumerate() {
                if i > 0 && i % every == 0 {
                    pause();
                }
                schema::bind(r.borrow(), |values| stmt.execute(values)).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Inserts `records` one statement each in one transaction, leaving out
    /// those SQLite refuses for what they hold (a constraint, a type, a
    /// size): the writer's fallback when a whole batch failed, so that one
    /// such record does not hold back the others. Returns the refused ones'
    /// indices with their errors; any other error (the disk, a lock) rolls
    /// everything back and is returned.
    pub fn insert_each(
        &mut self,
        records: &[impl std::borrow::Borrow<UsageRecord>],
    ) -> Result<Vec<(usize, LedgerError)>, LedgerError> {
        let path = self.path.clone();
        let err = |e| LedgerError::classify(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        let mut refused = Vec::new();
        {
            let mut stmt = tx.prepare_cached(&self.insert_sql).map_err(err)?;
            for (i, r) in records.iter().enumerate() {
                // A failed statement undoes only itself (ABORT); the
                // transaction goes on.
                if let Err(e) = schema::bind(r.borrow(), |values| stmt.execute(values)) {
                    if !refuses_the_record(&e) {
                        return Err(err(e));
                    }
                    refused.push((i, err(e)));
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(refused)
    }

    /// Rows in the ledger, whatever they hold.
    pub fn count(&self) -> Result<u64, LedgerError> {
        self.conn
            .query_row("SELECT count(*) FROM requests", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|e| LedgerError::classify(&self.path, e))
    }

    /// For a filter that matched nothing: the repository, job and runner
    /// names in the ledger that differ from the filter's only in case
    /// (ASCII), at most three each, with the `report` option that takes
    /// them; anywhere in the ledger (the filter's other terms are not
    /// applied). A scan of the table: only for a report that found nothing.
    pub fn names_in_other_case(
        &self,
        filter: &Filter,
    ) -> Result<Vec<(&'static str, String)>, LedgerError> {
        let err = |e| LedgerError::classify(&self.path, e);
        let mut out = Vec::new();
        for (option, column, value) in [
            ("--repository", "repository", &filter.repository),
            ("--job", "job", &filter.job),
            ("--runner", "runner", &filter.runner),
        ] {
            let Some(value) = value else { continue };
            let mut stmt = self
                .conn
                .prepare(&format!(
                    "SELECT DISTINCT {column} FROM requests \
                     WHERE {column} = ?1 COLLATE NOCASE AND {column} != ?1 LIMIT 3"
                ))
                .map_err(err)?;
            let names = stmt
                .query_map([value], |r| r.get::<_, String>(0))
                .map_err(err)?;
            for n in names {
                out.push((option, n.map_err(err)?));
            }
        }
        Ok(out)
    }

    /// Records matching `filter`, oldest first, with `id` filled.
    pub fn query(&self, filter: &Filter) -> Result<Vec<UsageRecord>, LedgerError> {
        let mut out = Vec::new();
        self.for_each(filter, |r| {
            out.push(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// The provider hosts and paths of the batch results read since
    /// `since_ms` (the rows of `operation = 'batch_results'`), the most
    /// recently read first, at most `limit`.
    pub fn batch_reads_since(
        &self,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, LedgerError> {
        let err = |e| LedgerError::classify(&self.path, e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT host, path FROM requests \
                 WHERE started_at_ms >= ?1 AND operation = 'batch_results' \
                 GROUP BY host, path ORDER BY MAX(started_at_ms) DESC LIMIT ?2",
            )
            .map_err(err)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(rusqlite::params![since_ms, limit], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Calls `f` with each record `filter` matches, oldest first, among
    /// the rows there when the walk began. Rows are read [`WALK_PAGE`] at
    /// a time (a report over millions of rows holds one page), each page
    /// in its own read transaction, and `f` runs between them: a report
    /// piped into a pager that waits for a key holds no snapshot of the
    /// ledger meanwhile, so the agent's write-ahead log can still be
    /// checkpointed (an open reader keeps it from being reset, and it
    /// grows by every write until the reader ends). An error from `f` (a
    /// closed stdout) ends the walk.
    pub fn for_each(
        &self,
        filter: &Filter,
        mut f: impl FnMut(UsageRecord) -> std::io::Result<()>,
    ) -> Result<(), LedgerError> {
        let err = |e| LedgerError::classify(&self.path, e);
        let mut sql = self.select_sql.clone();
        let mut clauses = Vec::new();
        let mut params: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
        // `since` is where the walk starts (below): as a clause of its own
        // it would be SQLite's seek for every page, each page then reading
        // again from `since` to where the last one ended.
        if let Some(repo) = &filter.repository {
            params.push(Box::new(repo.clone()));
            clauses.push(format!("repository = ?{}", params.len()));
        }
        if let Some(job) = &filter.job {
            params.push(Box::new(job.clone()));
            clauses.push(format!("job = ?{}", params.len()));
        }
        for (column, value) in [
            ("run_id", &filter.run_id),
            ("run_attempt", &filter.run_attempt),
            ("job_id", &filter.job_id),
            ("runner", &filter.runner),
        ] {
            if let Some(v) = value {
                params.push(Box::new(v.clone()));
                clauses.push(format!("{column} = ?{}", params.len()));
            }
        }
        // Rows written after the walk began are not part of it.
        let last: Option<i64> = self
            .conn
            .query_row("SELECT max(id) FROM requests", [], |r| r.get(0))
            .map_err(err)?;
        let Some(last) = last else {
            return Ok(());
        };
        params.push(Box::new(last));
        clauses.push(format!("id <= ?{}", params.len()));
        // Where the previous page ended (the index on `started_at_ms`
        // holds the row id: each page starts with a seek).
        let n = params.len();
        clauses.push(format!("(started_at_ms, id) > (?{}, ?{})", n + 1, n + 2));
        sql.push_str(" WHERE ");
        sql.push_str(&clauses.join(" AND "));
        sql.push_str(&format!(" ORDER BY started_at_ms, id LIMIT {WALK_PAGE}"));
        // Every row id is above i64::MIN: the first page starts at `since`.
        // (The start time as SQLite holds it: a row edited to hold another
        // type there still has its place in the order.)
        let mut after = (
            rusqlite::types::Value::Integer(filter.since_ms.unwrap_or(i64::MIN)),
            i64::MIN,
        );
        // Each row's place, and the record, or why it could not be read (a
        // value that does not fit its column: the agent writes none, but a
        // file edited by hand may hold one): such a row is left out and
        // counted, not the end of the walk.
        type Read = (rusqlite::types::Value, i64, Result<UsageRecord, String>);
        let mut page: Vec<Read> = Vec::with_capacity(WALK_PAGE);
        let mut unreadable: (u64, Option<(i64, String)>) = (0, None);
        // An immutable file that an agent began to write (a `-wal` file
        // came, or the file changed: its checkpoints rewrite pages under
        // an immutable reader, which would read rows twice, skip some, or
        // see a malformed file): the walk goes on from where it was
        // through an ordinary read-only connection, which sees the
        // agent's writes as they are made.
        let mut ordinary: Option<Connection> = None;
        loop {
            let conn = ordinary.as_ref().unwrap_or(&self.conn);
            let read = (|| -> rusqlite::Result<()> {
                let mut stmt = conn.prepare_cached(&sql)?;
                let mut refs: Vec<&dyn rusqlite::ToSql> =
                    params.iter().map(|b| b.as_ref()).collect();
                refs.push(&after.0);
                refs.push(&after.1);
                let mut rows = stmt.query(refs.as_slice())?;
                while let Some(row) = rows.next()? {
                    let (id, at) = (row.get(0)?, row.get(1)?);
                    page.push((at, id, schema::from_row(row).map_err(|e| e.to_string())));
                }
                // The statement is reset here, which ends its read
                // transaction before `f` runs.
                Ok(())
            })();
            if ordinary.is_none() && self.written_since_opened() {
                tracing::debug!(path = %self.path.display(), "the ledger is being written: reading on through a read-only connection");
                page.clear();
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(err)?;
                c.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
                ordinary = Some(c);
                continue;
            }
            read.map_err(err)?;
            let full = page.len() == WALK_PAGE;
            for (at, id, r) in page.drain(..) {
                after = (at, id);
                match r {
                    Ok(r) => f(r).map_err(LedgerError::Output)?,
                    Err(e) => {
                        unreadable.0 += 1;
                        unreadable.1.get_or_insert((id, e));
                    }
                }
            }
            if !full {
                if let (n @ 1.., Some((id, why))) = unreadable {
                    tracing::warn!(
                        rows = n,
                        first = id,
                        error = %why,
                        path = %self.path.display(),
                        "ledger rows that do not fit their columns were left out (the agent writes none: was the file edited?)"
                    );
                }
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
