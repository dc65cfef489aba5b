//! The ledger's schema, its migrations, and the mapping between a
//! `UsageRecord` and a row of `requests`.
//!
//! Counts are `u64` in the record and `INTEGER` (i64) in SQLite: they are
//! stored saturated at `i64::MAX` (no real count comes near it); `cgroup_id`
//! is an identifier, so it is stored bit for bit (`as i64`) and read back
//! the same way.

use std::sync::Arc;

use rusqlite::{Connection, Row, ToSql};

use crate::meter::{Attribution, Usage, UsageRecord};

/// The schema version this build writes (SQLite `user_version`).
pub const SCHEMA_VERSION: i64 = 7;

/// The oldest schema version whose builds may still read and write a file
/// of this build's schema: every migration since only added columns with
/// defaults, which an older build's inserts leave to their default and its
/// selects do not name, or indexes. A migration that changes what an older build
/// relies on raises it. Kept in the file (`tollgate_meta`), so that a
/// rolled-back agent at or above it keeps using a newer ledger instead of
/// refusing it.
pub const OLDEST_COMPATIBLE: i64 = 4;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE requests (
    id                       INTEGER PRIMARY KEY,
    started_at_ms            INTEGER NOT NULL,
    started_at               TEXT    NOT NULL,
    duration_ms              INTEGER NOT NULL,
    provider                 TEXT    NOT NULL,
    host                     TEXT    NOT NULL,
    operation                TEXT    NOT NULL,
    method                   TEXT    NOT NULL,
    path                     TEXT    NOT NULL,
    model                    TEXT,
    response_model           TEXT,
    status                   INTEGER NOT NULL,
    streaming                INTEGER NOT NULL CHECK (streaming IN (0, 1)),
    input_tokens             INTEGER NOT NULL,
    output_tokens            INTEGER NOT NULL,
    cached_input_tokens      INTEGER NOT NULL,
    cache_write_input_tokens INTEGER NOT NULL,
    reasoning_tokens         INTEGER NOT NULL,
    estimated                INTEGER NOT NULL CHECK (estimated IN (0, 1)),
    cost_usd                 REAL,
    pid                      INTEGER NOT NULL,
    uid                      INTEGER NOT NULL,
    cgroup_id                INTEGER NOT NULL,
    comm                     TEXT    NOT NULL,
    exe                      TEXT,
    cmdline                  TEXT,
    ci_system                TEXT,
    repository               TEXT,
    workflow                 TEXT,
    job                      TEXT,
    run_id                   TEXT,
    run_attempt              TEXT,
    ref_name                 TEXT,
    runner                   TEXT,
    error                    TEXT
);
CREATE INDEX requests_started_at_ms ON requests (started_at_ms);
CREATE INDEX requests_repository ON requests (repository, started_at_ms);
"#,
    r#"
ALTER TABLE requests ADD COLUMN ttfb_ms INTEGER;
ALTER TABLE requests ADD COLUMN job_id TEXT;
ALTER TABLE requests ADD COLUMN cgroup_path TEXT;
ALTER TABLE requests ADD COLUMN container_id TEXT;
ALTER TABLE requests ADD COLUMN team TEXT;
"#,
    r#"
ALTER TABLE requests ADD COLUMN cache_write_1h_input_tokens INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE requests ADD COLUMN service_tier TEXT;
CREATE TABLE tollgate_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"#,
    // The batch results read (the agent looks them up at start): a few
    // rows among many.
    r#"
CREATE INDEX requests_batch_results ON requests (started_at_ms) WHERE operation = 'batch_results';
"#,
    // Web searches billed by the thousand beside the tokens.
    r#"
ALTER TABLE requests ADD COLUMN web_searches INTEGER NOT NULL DEFAULT 0;
"#,
    // The audio and image parts of the input and output, billed at their
    // own rates.
    r#"
ALTER TABLE requests ADD COLUMN audio_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN image_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN audio_output_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE requests ADD COLUMN image_output_tokens INTEGER NOT NULL DEFAULT 0;
"#,
];

/// Every column but `id`, in the order `bind` writes and `from_row` reads.
pub const COLUMNS: &[&str] = &[
    "started_at_ms",
    "started_at",
    "duration_ms",
    "provider",
    "host",
    "operation",
    "method",
    "path",
    "model",
    "response_model",
    "status",
    "streaming",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_input_tokens",
    "reasoning_tokens",
    "estimated",
    "cost_usd",
    "pid",
    "uid",
    "cgroup_id",
    "comm",
    "exe",
    "cmdline",
    "ci_system",
    "repository",
    "workflow",
    "job",
    "run_id",
    "run_attempt",
    "ref_name",
    "runner",
    "error",
    "ttfb_ms",
    "job_id",
    "cgroup_path",
    "container_id",
    "team",
    "cache_write_1h_input_tokens",
    "service_tier",
    "web_searches",
    "audio_input_tokens",
    "image_input_tokens",
    "audio_output_tokens",
    "image_output_tokens",
];

/// What `migrate` found.
#[derive(Debug)]
pub enum MigrateError {
    /// The file was written by a newer tollgate.
    TooNew(i64),
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sqlite(e)
    }
}

/// Whether the file is another program's SQLite database: a schema
/// version below 0, or version 0 with tables already in it (every
/// migration step and its version are one transaction, so tollgate never
/// leaves tables at version 0). Such a file is never changed.
pub fn foreign(conn: &Connection) -> rusqlite::Result<bool> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version != 0 {
        return Ok(version < 0);
    }
    let tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
        [],
        |r| r.get(0),
    )?;
    Ok(tables > 0)
}

/// Brings the schema to `SCHEMA_VERSION`, one transaction per step.
pub fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    let mut version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        // A newer build's file: usable as it is when that build says this
        // one is still compatible (its migrations since only added columns).
        return if newer_but_compatible(conn) {
            Ok(())
        } else {
            Err(MigrateError::TooNew(version))
        };
    }
    while version < SCHEMA_VERSION {
        let step = usize::try_from(version).unwrap_or(usize::MAX);
        let Some(sql) = MIGRATIONS.get(step) else {
            return Err(MigrateError::TooNew(version));
        };
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        if version + 1 == SCHEMA_VERSION {
            tx.execute(
                "INSERT OR REPLACE INTO tollgate_meta (key, value) VALUES ('oldest_compatible', ?1)",
                [OLDEST_COMPATIBLE],
            )?;
        }
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
        version += 1;
    }
    Ok(())
}

/// The oldest schema version a file says it is compatible with (see
/// [`OLDEST_COMPATIBLE`]); `None` for a file from before the
/// `tollgate_meta` table.
pub fn oldest_compatible(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    let has_meta: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tollgate_meta')",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(None);
    }
    match conn.query_row(
        "SELECT value FROM tollgate_meta WHERE key = 'oldest_compatible'",
        [],
        |r| r.get(0),
    ) {
        Ok(v) => Ok(Some(v)),
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A file of a newer schema that this build may read and write: it says
/// so (see [`OLDEST_COMPATIBLE`]) and has every column this build names.
/// Anything unreadable about it answers no.
pub fn newer_but_compatible(conn: &Connection) -> bool {
    let marked = matches!(oldest_compatible(conn), Ok(Some(oldest)) if oldest <= SCHEMA_VERSION);
    let columns = || -> rusqlite::Result<Vec<String>> {
        conn.prepare("SELECT name FROM pragma_table_info('requests')")?
            .query_map([], |r| r.get(0))?
            .collect()
    };
    marked && columns().is_ok_and(|have| COLUMNS.iter().all(|c| have.iter().any(|h| h == c)))
}

/// `INSERT INTO requests (...) VALUES (?1, ...)`.
pub fn insert_sql() -> String {
    let marks: Vec<String> = (1..=COLUMNS.len()).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO requests ({}) VALUES ({})",
        COLUMNS.join(", "),
        marks.join(", ")
    )
}

/// `SELECT id, ... FROM requests`.
pub fn select_sql() -> String {
    select_sql_for(SCHEMA_VERSION)
}

/// The columns later migrations added, with the schema version that added
/// them and the value an older file stands for (what the migration's
/// default would have given).
const ADDED: &[(&str, i64, &str)] = &[
    ("ttfb_ms", 2, "NULL"),
    ("job_id", 2, "NULL"),
    ("cgroup_path", 2, "NULL"),
    ("container_id", 2, "NULL"),
    ("team", 2, "NULL"),
    ("cache_write_1h_input_tokens", 3, "0"),
    ("service_tier", 4, "NULL"),
    ("web_searches", 6, "0"),
    ("audio_input_tokens", 7, "0"),
    ("image_input_tokens", 7, "0"),
    ("audio_output_tokens", 7, "0"),
    ("image_output_tokens", 7, "0"),
];

/// The select of a file at schema `version` (read-only opens cannot
/// migrate): columns it does not have yet read as their defaults.
pub fn select_sql_for(version: i64) -> String {
    let cols: Vec<String> = COLUMNS
        .iter()
        .map(|c| match ADDED.iter().find(|(name, _, _)| name == c) {
            Some((_, added, default)) if *added > version => format!("{default} AS {c}"),
            _ => (*c).to_string(),
        })
        .collect();
    format!("SELECT id, {} FROM requests", cols.join(", "))
}

fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uncount(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Calls `f` with the values of a record in `COLUMNS` order (borrowed, so
/// binding a row allocates nothing).
pub fn bind<R>(r: &UsageRecord, f: impl FnOnce(&[&dyn ToSql]) -> R) -> R {
    let w = &*r.who;
    let u = &r.usage;
    let (duration, cgroup) = (count(r.duration_ms), w.cgroup_id as i64);
    let tokens = [
        count(u.input_tokens),
        count(u.output_tokens),
        count(u.cached_input_tokens),
        count(u.cache_write_input_tokens),
        count(u.reasoning_tokens),
        count(u.cache_write_1h_input_tokens),
        count(u.web_searches),
        count(u.audio_input_tokens),
        count(u.image_input_tokens),
        count(u.audio_output_tokens),
        count(u.image_output_tokens),
    ];
    let ttfb = r.ttfb_ms.map(count);
    f(&[
        &r.started_at_ms,
        &r.started_at,
        &duration,
        &r.provider,
        &r.host,
        &r.operation,
        &r.method,
        &r.path,
        &r.model,
        &r.response_model,
        &r.status,
        &r.streaming,
        &tokens[0],
        &tokens[1],
        &tokens[2],
        &tokens[3],
        &tokens[4],
        &r.estimated,
        &r.cost_usd,
        &w.pid,
        &w.uid,
        &cgroup,
        &w.comm,
        &w.exe,
        &w.cmdline,
        &w.ci_system,
        &w.repository,
        &w.workflow,
        &w.job,
        &w.run_id,
        &w.run_attempt,
        &w.ref_name,
        &w.runner,
        &r.error,
        &ttfb,
        &w.job_id,
        &w.cgroup_path,
        &w.container_id,
        &w.team,
        &tokens[5],
        &r.service_tier,
        &tokens[6],
        &tokens[7],
        &tokens[8],
        &tokens[9],
        &tokens[10],
    ])
}

/// A row of `select_sql()` back into a record.
pub fn from_row(row: &Row<'_>) -> rusqlite::Result<UsageRecord> {
    let c = |i: usize| i + 1; // column 0 is id
    Ok(UsageRecord {
        id: Some(row.get(0)?),
        started_at_ms: row.get(c(0))?,
        started_at: row.get(c(1))?,
        duration_ms: uncount(row.get(c(2))?),
        provider: row.get(c(3))?,
        host: row.get(c(4))?,
        operation: row.get(c(5))?,
        method: row.get(c(6))?,
        path: row.get(c(7))?,
        model: row.get(c(8))?,
        response_model: row.get(c(9))?,
        status: row.get(c(10))?,
        streaming: row.get(c(11))?,
        usage: Usage {
            input_tokens: uncount(row.get(c(12))?),
            output_tokens: uncount(row.get(c(13))?),
            cached_input_tokens: uncount(row.get(c(14))?),
            cache_write_input_tokens: uncount(row.get(c(15))?),
            reasoning_tokens: uncount(row.get(c(16))?),
            cache_write_1h_input_tokens: uncount(row.get(c(39))?),
            web_searches: uncount(row.get(c(41))?),
            web_searches_preview: 0,
            audio_input_tokens: uncount(row.get(c(42))?),
            image_input_tokens: uncount(row.get(c(43))?),
            audio_output_tokens: uncount(row.get(c(44))?),
            image_output_tokens: uncount(row.get(c(45))?),
            cached_audio_input_tokens: 0,
            cached_image_input_tokens: 0,
            audio_duration_ms: 0,
        },
        estimated: row.get(c(17))?,
        cost_usd: row.get(c(18))?,
        who: Arc::new(Attribution {
            pid: row.get(c(19))?,
            uid: row.get(c(20))?,
            cgroup_id: row.get::<_, i64>(c(21))? as u64,
            comm: row.get(c(22))?,
            exe: row.get(c(23))?,
            cmdline: row.get(c(24))?,
            ci_system: row.get(c(25))?,
            repository: row.get(c(26))?,
            workflow: row.get(c(27))?,
            job: row.get(c(28))?,
            run_id: row.get(c(29))?,
            run_attempt: row.get(c(30))?,
            ref_name: row.get(c(31))?,
            runner: row.get(c(32))?,
            job_id: row.get(c(35))?,
            cgroup_path: row.get(c(36))?,
            container_id: row.get(c(37))?,
            team: row.get(c(38))?,
        }),
        error: row.get(c(33))?,
        ttfb_ms: row.get::<_, Option<i64>>(c(34))?.map(uncount),
        service_tier: row.get(c(40))?,
    })
}

/// A ledger at schema 2 (before the hour-long cache writes) holding one
/// Anthropic row with 40 cache-write tokens and team `infra`.
#[cfg(test)]
pub(crate) fn version_2_with_one_row(conn: &Connection) {
    for (v, step) in MIGRATIONS[..2].iter().enumerate() {
        conn.execute_batch(step).expect("old step");
        conn.pragma_update(None, "user_version", v as i64 + 1)
            .expect("version");
    }
    conn.execute(
        "INSERT INTO requests (started_at_ms, started_at, duration_ms, provider, host, \
         operation, method, path, status, streaming, input_tokens, output_tokens, \
         cached_input_tokens, cache_write_input_tokens, reasoning_tokens, estimated, \
         pid, uid, cgroup_id, comm, team) VALUES (1, 't', 2, 'anthropic', 'h', 'chat', \
         'POST', '/v1/messages', 200, 0, 100, 10, 0, 40, 0, 0, 1, 0, 0, 'c', 'infra')",
        [],
    )
    .expect("old row");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of the file, read back.
    fn all_rows(conn: &Connection) -> Vec<UsageRecord> {
        conn.prepare(&select_sql())
            .expect("select")
            .query_map([], from_row)
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    #[test]
    fn columns_match_the_table() {
        let mut conn = Connection::open_in_memory().expect("memory db");
        migrate(&mut conn).expect("migrates");
        let stmt = conn.prepare(&select_sql()).expect("select prepares");
        assert_eq!(stmt.column_count(), COLUMNS.len() + 1);
        drop(stmt);
        conn.prepare(&insert_sql()).expect("insert prepares");
        assert_eq!(bind(&UsageRecord::default(), |v| v.len()), COLUMNS.len());
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(v, SCHEMA_VERSION);
        assert_eq!(
            oldest_compatible(&conn).expect("meta"),
            Some(OLDEST_COMPATIBLE)
        );
        migrate(&mut conn).expect("migrating twice is a no-op");
    }

    #[test]
    fn a_version_3_ledger_keeps_its_rows_and_gains_the_service_tier() {
        let mut conn = Connection::open_in_memory().expect("memory db");
        version_2_with_one_row(&conn);
        conn.execute_batch(MIGRATIONS[2]).expect("step 3");
        conn.pragma_update(None, "user_version", 3)
            .expect("version");
        conn.execute("UPDATE requests SET cache_write_1h_input_tokens = 30", [])
            .expect("v3 value");
        assert_eq!(oldest_compatible(&conn).expect("no meta yet"), None);
        migrate(&mut conn).expect("migrates");
        let rows: Vec<UsageRecord> = all_rows(&conn);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].usage.cache_write_1h_input_tokens, 30);
        assert_eq!(rows[0].service_tier, None);
        assert_eq!(
            oldest_compatible(&conn).expect("meta"),
            Some(OLDEST_COMPATIBLE)
        );
    }

    /// A version 5 ledger (the last without web searches and the audio
    /// and image counts) keeps its rows, which read as none; a record's
    /// counts are written and read back; a select of a version 5 file
    /// (read-only, not migrated) reads them as 0.
    #[test]
    fn a_version_5_ledger_gains_web_searches_and_modalities_and_they_round_trip() {
        let mut conn = Connection::open_in_memory().expect("memory db");
        version_2_with_one_row(&conn);
        for (i, step) in MIGRATIONS.iter().enumerate().take(5).skip(2) {
            conn.execute_batch(step).expect("step");
            conn.pragma_update(None, "user_version", i as i64 + 1)
                .expect("version");
        }
        let old: i64 = conn
            .query_row(&select_sql_for(5), [], |r| r.get(COLUMNS.len()))
            .expect("a version 5 file reads");
        assert_eq!(old, 0);
        // Version 6 (web searches alone), as this build's predecessor left
        // it, then the rest.
        conn.execute_batch(MIGRATIONS[5]).expect("step 6");
        conn.pragma_update(None, "user_version", 6)
            .expect("version");
        conn.query_row(&select_sql_for(6), [], |_| Ok(()))
            .expect("a version 6 file reads");
        migrate(&mut conn).expect("migrates");
        let mut r = UsageRecord::default();
        r.usage.web_searches = 7;
        r.usage.audio_input_tokens = 11;
        r.usage.image_input_tokens = 12;
        r.usage.audio_output_tokens = 13;
        r.usage.image_output_tokens = 14;
        bind(&r, |v| conn.execute(&insert_sql(), v)).expect("insert");
        let rows: Vec<UsageRecord> = all_rows(&conn);
        let searches: Vec<u64> = rows.iter().map(|r| r.usage.web_searches).collect();
        assert_eq!(searches, [0, 7]);
        assert_eq!(rows[1].usage, r.usage, "every count read back");
    }

    #[test]
    fn a_version_2_ledger_keeps_its_rows_and_gains_the_hour_long_cache_writes() {
        let mut conn = Connection::open_in_memory().expect("memory db");
        version_2_with_one_row(&conn);
        migrate(&mut conn).expect("migrates");
        let rows = all_rows(&conn);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].usage.cache_write_input_tokens, 40);
        assert_eq!(rows[0].usage.cache_write_1h_input_tokens, 0);
    }

    #[test]
    fn every_added_column_is_known_to_the_old_selects() {
        // Each column a migration after the first adds is in ADDED.
        for (i, step) in MIGRATIONS.iter().enumerate().skip(1) {
            for line in step.lines().filter(|l| l.contains("ADD COLUMN")) {
                let col = line
                    .split("ADD COLUMN ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .expect("column");
                assert!(
                    ADDED
                        .iter()
                        .any(|(c, v, _)| *c == col && *v == i as i64 + 1),
                    "{col} (migration {i}) is missing from ADDED"
                );
            }
        }
        // An old file answers the old select, with the defaults.
        for version in 1..=SCHEMA_VERSION {
            let conn = Connection::open_in_memory().expect("memory db");
            for step in &MIGRATIONS[..version as usize] {
                conn.execute_batch(step).expect("step");
            }
            conn.prepare(&select_sql_for(version))
                .unwrap_or_else(|e| panic!("version {version}: {e}"));
        }
    }

    #[test]
    fn refuses_a_newer_schema() {
        let mut conn = Connection::open_in_memory().expect("memory db");
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("set");
        assert!(
            matches!(migrate(&mut conn), Err(MigrateError::TooNew(v)) if v == SCHEMA_VERSION + 1)
        );
    }
}
