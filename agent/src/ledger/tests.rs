//! Ledger tests: round trips, the writer under load, crash safety, bad files.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::meter::{Attribution, Usage, UsageRecord};

pub(crate) fn sample(i: u64) -> UsageRecord {
    UsageRecord {
        id: None,
        started_at_ms: 1_700_000_000_000 + i as i64,
        started_at: "2023-11-14T22:13:20Z".into(),
        duration_ms: 1234 + i,
        ttfb_ms: Some(17 + i),
        provider: "openai".into(),
        host: "api.openai.com".into(),
        operation: "chat".into(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some("gpt-4o-mini".into()),
        response_model: Some("gpt-4o-mini-2024-07-18".into()),
        status: 200,
        streaming: i.is_multiple_of(2),
        usage: Usage {
            input_tokens: 100 + i,
            output_tokens: 20,
            cached_input_tokens: 64,
            cache_write_input_tokens: 3,
            reasoning_tokens: 7,
            cache_write_1h_input_tokens: 2,
            web_searches: 0,
            web_searches_preview: 0,
            audio_input_tokens: 0,
            image_input_tokens: 0,
            audio_output_tokens: 0,
            image_output_tokens: 0,
            cached_audio_input_tokens: 0,
            cached_image_input_tokens: 0,
            audio_duration_ms: 0,
        },
        estimated: i.is_multiple_of(3),
        cost_usd: if i.is_multiple_of(5) {
            None
        } else {
            Some(0.000_125 * i as f64)
        },
        who: Attribution {
            pid: 4242,
            uid: 1001,
            cgroup_id: u64::MAX - i,
            comm: "python3".into(),
            exe: Some("/usr/bin/python3.11".into()),
            cmdline: Some("python3 eval.py --model gpt-4o-mini".into()),
            ci_system: Some("github-actions".into()),
            repository: Some(
                if i.is_multiple_of(2) {
                    "acme/app"
                } else {
                    "acme/lib"
                }
                .into(),
            ),
            workflow: Some("CI".into()),
            job: Some("test".into()),
            run_id: Some("987654321".into()),
            run_attempt: Some("1".into()),
            ref_name: Some("main".into()),
            runner: Some("runner-7".into()),
            job_id: Some("55".into()),
            cgroup_path: Some("/system.slice/runner.service".into()),
            container_id: None,
            team: Some("platform".into()),
        }
        .into(),
        error: None,
        service_tier: (i % 4 == 1).then(|| "flex".into()),
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    // A bound only so a broken writer fails the test instead of hanging it.
    let end = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `started_at_ms` of every row in the ledger at `path`, in row order.
fn starts_in(path: &Path) -> Vec<i64> {
    Ledger::open(path)
        .expect("open")
        .query(&Filter::default())
        .expect("query")
        .iter()
        .map(|r| r.started_at_ms)
        .collect()
}

/// `started_at_ms` of the samples `r`.
fn starts_of(r: impl IntoIterator<Item = u64>) -> Vec<i64> {
    r.into_iter().map(|i| sample(i).started_at_ms).collect()
}

/// Lets inserts succeed again (see `inject_failures`).
fn clear_failures(other: &rusqlite::Connection) {
    other
        .execute("DELETE FROM fail_flag", [])
        .expect("clear the flag");
}

/// Makes inserts into the ledger at `path` fail, from a second connection,
/// whenever `when` holds (SQL over `NEW` and the table `fail_flag`, which
/// starts with one row), with an error that is not about the record (an
/// integer overflow inside the trigger: `SQLITE_ERROR`, as a failing disk
/// or a lock is not the record's either). Returns that connection.
fn inject_failures(path: &Path, when: &str) -> rusqlite::Connection {
    let other = rusqlite::Connection::open(path).expect("second connection");
    other
        .execute_batch(&format!(
            "CREATE TABLE fail_flag (x INTEGER);
             INSERT INTO fail_flag VALUES (1);
             CREATE TRIGGER inject BEFORE INSERT ON requests
             WHEN {when}
             BEGIN SELECT abs(-9223372036854775807 - 1); END;"
        ))
        .expect("trigger");
    other
}

/// Makes the ledger refuse, for what they hold, the records for which
/// `when` holds (a constraint, as SQLite reports a CHECK it fails).
fn inject_refusal(other: &rusqlite::Connection, when: &str) {
    other
        .execute_batch(&format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON requests
             WHEN {when}
             BEGIN SELECT RAISE(ABORT, 'refused'); END;"
        ))
        .expect("trigger");
}

fn strip_id(mut r: UsageRecord) -> UsageRecord {
    assert!(r.id.is_some(), "query fills the id");
    r.id = None;
    r
}

#[test]
fn round_trips_every_field_and_filters() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("sub/ledger.sqlite");
    let mut l = Ledger::open(&path).expect("opens and creates its directory");
    let mut full = sample(1);
    full.error = Some("client hung up".into());
    let empty = UsageRecord {
        started_at_ms: 5,
        ..UsageRecord::default()
    };
    let records = vec![sample(4), full.clone(), sample(2), empty.clone()];
    l.insert_batch(&records).expect("insert");
    let got = l.query(&Filter::default()).expect("query");
    assert_eq!(got.len(), 4);
    // Oldest first.
    assert_eq!(strip_id(got[0].clone()), empty);
    assert_eq!(strip_id(got[1].clone()), full);
    assert_eq!(strip_id(got[2].clone()), sample(2));
    assert_eq!(strip_id(got[3].clone()), sample(4));
    let ids: Vec<i64> = got.iter().filter_map(|r| r.id).collect();
    assert_eq!(ids.len(), 4);

    let f = Filter {
        repository: Some("acme/app".into()),
        ..Filter::default()
    };
    assert_eq!(l.query(&f).expect("q").len(), 2);
    let f = Filter {
        since_ms: Some(1_700_000_000_002),
        job: Some("test".into()),
        ..Filter::default()
    };
    assert_eq!(l.query(&f).expect("q").len(), 2);
    let f = Filter {
        job: Some("nope".into()),
        ..Filter::default()
    };
    assert!(l.query(&f).expect("q").is_empty());
    // Runner, attempt and job id: all of the samples' match, another not.
    let f = Filter {
        runner: Some("runner-7".into()),
        run_attempt: Some("1".into()),
        job_id: Some("55".into()),
        ..Filter::default()
    };
    assert_eq!(l.query(&f).expect("q").len(), 3);
    for f in [
        Filter {
            runner: Some("runner-8".into()),
            ..Filter::default()
        },
        Filter {
            run_attempt: Some("2".into()),
            ..Filter::default()
        },
        Filter {
            job_id: Some("56".into()),
            ..Filter::default()
        },
    ] {
        assert!(l.query(&f).expect("q").is_empty(), "{f:?}");
    }

    // Reopening sees the same rows, and the pragmas are set.
    drop(l);
    let l = Ledger::open(&path).expect("reopen");
    assert_eq!(l.query(&Filter::default()).expect("q").len(), 4);
    let mode: String = l
        .conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
    let sync: i64 = l
        .conn
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .expect("sync");
    assert_eq!(sync, 1, "synchronous=NORMAL");
}

/// A filter that matched nothing names what it would have matched in
/// another case (for `report`'s hint), and nothing for an exact name or
/// one that is not there at all.
#[test]
fn names_in_another_case_are_found_for_a_filter_that_matched_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let mut l = Ledger::open(&t.path().join("ledger.sqlite")).expect("opens");
    l.insert_batch(&[sample(1), sample(2)]).expect("insert");
    let f = Filter {
        repository: Some("ACME/App".into()),
        job: Some("TEST".into()),
        runner: Some("runner-7".into()),
        ..Filter::default()
    };
    assert!(l.query(&f).expect("query").is_empty());
    assert_eq!(
        l.names_in_other_case(&f).expect("names"),
        [
            ("--repository", "acme/app".to_string()),
            ("--job", "test".to_string())
        ]
    );
    let none = Filter {
        repository: Some("acme/app".into()),
        job: Some("lint".into()),
        ..Filter::default()
    };
    assert!(l.names_in_other_case(&none).expect("names").is_empty());
}

#[test]
fn writer_writes_ten_thousand_records() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    // A small queue forces the overflow path as well.
    let (w, h) = LedgerWriter::start(&path, 64, 1 << 20).expect("start");
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let h = h.clone();
            std::thread::spawn(move || {
                for i in 0..2_500u64 {
                    h.submit(sample(k * 2_500 + i));
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("submitter");
    }
    let total = w.shutdown(Duration::from_secs(60)).expect("shutdown");
    assert_eq!(total, 10_000);
    let s = h.stats();
    assert_eq!(
        (s.written, s.queued, s.errors, s.rejected),
        (10_000, 0, 0, 0),
        "{s:?}"
    );
    let rows = Ledger::open(&path)
        .expect("open")
        .query(&Filter::default())
        .expect("q");
    assert_eq!(rows.len(), 10_000);
    let mut starts: Vec<i64> = rows.iter().map(|r| r.started_at_ms).collect();
    starts.dedup();
    assert_eq!(starts.len(), 10_000, "every record exactly once");

    h.submit(sample(1));
    assert_eq!(
        h.stats().rejected,
        1,
        "after shutdown, submits are counted as rejected"
    );
}

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// Sample `i`, started at `ms`.
fn at(i: u64, ms: i64) -> UsageRecord {
    let mut r = sample(i);
    r.started_at_ms = ms;
    r
}

#[test]
fn batch_reads_outlive_a_short_retention_for_thirty_days() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    let now = now_ms();
    let day = DAY_MS;
    let mut l = Ledger::open(&path).expect("open");
    let batch = |i: u64, ms: i64| {
        let mut r = at(i, ms);
        r.operation = "batch_results".into();
        Arc::new(r)
    };
    let rows = vec![
        Arc::new(at(1, now - 10 * day)),
        batch(2, now - 10 * day),
        batch(3, now - 40 * day),
        Arc::new(at(4, now - 1000)),
    ];
    l.insert_batch(&rows).expect("insert");
    // A 7-day retention: the request of 10 days ago goes, the batch read
    // of 10 days ago stays (the agent reads 30 days of them at start), the
    // one of 40 days ago goes.
    let week = 7 * day;
    assert_eq!(l.prune_before(now - week, week, 100).expect("prune"), 2);
    let left: Vec<i64> = l
        .query(&Filter::default())
        .expect("q")
        .iter()
        .map(|r| r.started_at_ms)
        .collect();
    assert_eq!(left, vec![now - 10 * day, now - 1000]);
    assert_eq!(
        l.batch_reads_since(now - 30 * day, 100)
            .expect("reads")
            .len(),
        1
    );
}

#[test]
fn rows_past_the_retention_are_deleted_in_pieces_and_newer_ones_kept() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    let now = now_ms();
    let day = DAY_MS;
    {
        let mut l = Ledger::open(&path).expect("open");
        // 12,000 rows from 40 days ago (more than two pieces), 3 from
        // 20 days ago, 2 from now.
        let old: Vec<Arc<UsageRecord>> = (0..12_000)
            .map(|i| Arc::new(at(i, now - 40 * day + i as i64)))
            .collect();
        let mid: Vec<Arc<UsageRecord>> = (0..3)
            .map(|i| Arc::new(at(i, now - 20 * day + i as i64)))
            .collect();
        let new: Vec<Arc<UsageRecord>> = (0..2)
            .map(|i| Arc::new(at(i, now - 1000 + i as i64)))
            .collect();
        for batch in [&old, &mid, &new] {
            l.insert_batch_pausing(batch, 1000, || {}).expect("insert");
        }
        // The unit itself: a piece at a time, oldest first.
        assert_eq!(
            l.prune_before(now - 30 * day, 30 * day, 10).expect("prune"),
            10
        );
        let rows = l.query(&Filter::default()).expect("q");
        assert_eq!(rows.len(), 12_005 - 10);
        let oldest = rows.iter().map(|r| r.started_at_ms).min().expect("rows");
        assert_eq!(oldest, now - 40 * day + 10, "the ten oldest went");
        // A clock far ahead (here: 2 years) takes nothing within the
        // retention of the newest row.
        let ahead = now + 730 * day;
        let n = l
            .prune_before(ahead - 30 * day, 30 * day, 100_000)
            .expect("prune");
        assert_eq!(n, 12_000 - 10);
        assert_eq!(l.query(&Filter::default()).expect("q").len(), 5);
        // The old rows again, for the writer's part.
        let old: Vec<Arc<UsageRecord>> = (0..12_000)
            .map(|i| Arc::new(at(i, now - 40 * day + i as i64)))
            .collect();
        l.insert_batch_pausing(&old, 1000, || {}).expect("insert");
    }
    // The writer deletes the rest past 30 days at start, and keeps 30
    // days' worth.
    let (w, h) =
        LedgerWriter::start_with_retention(&path, 64, 1024, Some(Duration::from_secs(30 * 86_400)))
            .expect("start");
    wait_for("the prune at start", || starts_in(&path).len() == 5);
    let kept = starts_in(&path);
    assert!(kept.iter().all(|ms| *ms > now - 30 * day), "{kept:?}");
    // Records go on being written.
    h.submit(at(7, now));
    w.shutdown(Duration::from_secs(60)).expect("shutdown");
    assert_eq!(starts_in(&path).len(), 6);
    // Without a retention nothing is deleted.
    let (w, _h) = LedgerWriter::start(&path, 64, 1024).expect("start");
    w.shutdown(Duration::from_secs(60)).expect("shutdown");
    let mut l = Ledger::open(&path).expect("open");
    l.insert_batch_pausing(&[Arc::new(at(8, now - 365 * day))], 1, || {})
        .expect("insert");
    drop(l);
    let (w, _h) = LedgerWriter::start(&path, 64, 1024).expect("start");
    w.shutdown(Duration::from_secs(60)).expect("shutdown");
    assert_eq!(starts_in(&path).len(), 7, "no retention: the old row stays");
}

#[test]
fn a_running_writer_deletes_rows_past_the_retention_again_later() {
    // The periodic prune, not only the one at start: a row that is past
    // the retention when it is written (a clock put right, a backfill) goes
    // at the next round.
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    let now = now_ms();
    let day = DAY_MS;
    let (w, h) = LedgerWriter::start_pruning_every(
        &path,
        64,
        1024,
        Some(Duration::from_secs(30 * 86_400)),
        Duration::from_millis(100),
    )
    .expect("start");
    h.submit(at(1, now));
    h.submit(at(2, now - 40 * day));
    wait_for("both rows written", || h.stats().written == 2);
    wait_for("the next round's prune", || starts_in(&path) == [now]);
    h.submit(at(3, now - 31 * day));
    h.submit(at(4, now - 29 * day));
    wait_for("written", || h.stats().written == 4);
    wait_for("another round", || starts_in(&path).len() == 2);
    w.shutdown(Duration::from_secs(60)).expect("shutdown");
    let mut kept = starts_in(&path);
    kept.sort_unstable();
    assert_eq!(kept, [now - 29 * day, now]);
}

#[test]
fn committed_rows_survive_a_crash() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    let (w, h) = LedgerWriter::start(&path, 16, 1 << 20).expect("start");
    for i in 0..100 {
        h.submit(sample(i));
    }
    wait_for("the flush", || h.stats().written == 100);
    // What is on disk now is what a crash would leave: copy the database
    // and its WAL while the writer still holds them open, uncheckpointed.
    let crash = t.path().join("crash");
    std::fs::create_dir(&crash).expect("dir");
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", path.display());
        if Path::new(&from).exists() {
            std::fs::copy(&from, crash.join(format!("ledger.sqlite{suffix}"))).expect("copy");
        }
    }
    let rows = Ledger::open(&crash.join("ledger.sqlite"))
        .expect("open the crash copy")
        .query(&Filter::default())
        .expect("q");
    assert_eq!(rows.len(), 100);
    // Dropping the writer without shutdown still drains in the background:
    // records handed over just before the drop are written after it.
    for i in 100..150 {
        h.submit(sample(i));
    }
    drop(w);
    wait_for("the drain after the drop", || h.stats().written == 150);
    let rows = Ledger::open(&path)
        .expect("reopen")
        .query(&Filter::default())
        .expect("q");
    assert_eq!(rows.len(), 150);
}

/// A writer whose inserts fail whenever `when` holds (see
/// `inject_failures`), handed `n` records, and the connection that makes
/// them fail.
fn failing_writer(
    when: &str,
    n: u64,
) -> (
    tempfile::TempDir,
    LedgerWriter,
    LedgerHandle,
    rusqlite::Connection,
) {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    let (w, h) = LedgerWriter::start(&path, 1024, 1 << 20).expect("start");
    let other = inject_failures(&path, when);
    for i in 0..n {
        h.submit(sample(i));
    }
    (t, w, h, other)
}

#[test]
fn failed_writes_are_retried_not_dropped() {
    // Inserts fail from outside until the flag row is removed.
    let (_t, w, h, other) = failing_writer("(SELECT count(*) FROM fail_flag) > 0", 10);
    wait_for("a failed write", || h.stats().errors >= 1);
    assert_eq!(h.stats().written, 0);
    clear_failures(&other);
    wait_for("the retry", || h.stats().written == 10);
    assert_eq!(w.shutdown(Duration::from_secs(30)).expect("shutdown"), 10);
}

#[test]
fn a_record_the_ledger_refuses_is_set_aside_and_the_others_are_written() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    // A small queue: the rest overflows, and the writer takes the whole
    // overflow at once, as it does after a long outage.
    let (w, h) = LedgerWriter::start(&path, 16, 1 << 20).expect("start");
    // Every insert fails while the flag is set (an outage: nothing is set
    // aside then); the poisoned record always, as a record SQLite refuses
    // for what it holds would.
    let other = inject_failures(&path, "(SELECT count(*) FROM fail_flag) > 0");
    inject_refusal(&other, "NEW.model = 'poison'");
    let n = 1100;
    let poison = 300;
    for i in 0..n {
        let mut r = sample(i);
        if i == poison {
            r.model = Some("poison".into());
        }
        h.submit(r);
    }
    // A second failure: the retry took the overflow, so (bar the queue's
    // 16) they are all pending together. Nothing was set aside meanwhile.
    wait_for("two failed writes", || h.stats().errors >= 2);
    assert_eq!(h.stats().refused, 0, "an outage sets nothing aside");
    clear_failures(&other);
    // Every record but the poisoned one is written, those after it too.
    wait_for("all but one", || h.stats().written == n - 1);
    let s = h.stats();
    assert_eq!((s.refused, s.queued), (1, 0), "{s:?}");
    // Later records are not held back either, nor is a refused record
    // that comes alone (a piece of one record, all of it refused).
    h.submit(sample(5000));
    wait_for("the later one", || h.stats().written == n);
    let mut alone = sample(5001);
    alone.model = Some("poison".into());
    h.submit(alone);
    wait_for("the lone one set aside", || h.stats().refused == 2);
    h.submit(sample(5002));
    assert_eq!(
        w.shutdown(Duration::from_secs(30)).expect("shutdown"),
        n + 1
    );
    let mut want = starts_of((0..n).filter(|&i| i != poison));
    want.extend(starts_of([5000, 5002]));
    assert_eq!(starts_in(&path), want);
}

#[test]
fn an_outage_holds_at_most_the_backlog_and_counts_the_rest() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    let (w, h) = LedgerWriter::start(&path, 16, 100).expect("start");
    let other = inject_failures(&path, "(SELECT count(*) FROM fail_flag) > 0");
    for i in 0..250 {
        h.submit(sample(i));
    }
    let s = h.stats();
    assert_eq!((s.written, s.queued, s.dropped), (0, 100, 150), "{s:?}");
    clear_failures(&other);
    wait_for("the backlog", || h.stats().written == 100);
    // Room again: later records are kept.
    h.submit(sample(1000));
    assert_eq!(w.shutdown(Duration::from_secs(30)).expect("shutdown"), 101);
    let mut want = starts_of(0..100);
    want.extend(starts_of(1000..1001));
    assert_eq!(
        starts_in(&path),
        want,
        "the oldest 100 and the one after the outage"
    );
    assert_eq!(h.stats().dropped, 150);
}

#[test]
fn a_panic_in_the_writer_loses_and_repeats_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    // A small queue: most of the 1100 take the overflow path and are
    // written as one backlog of three transactions.
    let (w, h) = LedgerWriter::start(&path, 16, 1 << 20).expect("start");
    let other = inject_failures(&path, "(SELECT count(*) FROM fail_flag) > 0");
    for i in 0..1100 {
        h.submit(sample(i));
    }
    wait_for("a failed write", || h.stats().errors >= 1);
    // The first piece (512 records, 63 pauses) commits, the second panics
    // after 80 of its records.
    h.plant_panic_at(63 + 10);
    clear_failures(&other);
    wait_for("the panic", || h.stats().errors >= 2);
    wait_for("the rest", || h.stats().written >= 1100);
    assert!(!h.panic_planted(), "the planted panic did not happen");
    assert_eq!(w.shutdown(Duration::from_secs(30)).expect("shutdown"), 1100);
    let mut starts = starts_in(&path);
    starts.sort();
    assert_eq!(starts, starts_of(0..1100), "each record once");
}

#[test]
fn a_ledger_deleted_or_moved_away_while_running_is_started_anew() {
    for moved in [false, true] {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("ledger.sqlite");
        let (w, h) = LedgerWriter::start(&path, 64, 1 << 20).expect("start");
        for i in 0..10 {
            h.submit(sample(i));
        }
        wait_for("the first records", || h.stats().written == 10);
        let aside = t.path().join("old.sqlite");
        if moved {
            // `mv ledger.sqlite old.sqlite`: the WAL stays behind.
            std::fs::rename(&path, &aside).expect("mv");
        } else {
            // `rm ledger.sqlite*`
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        for i in 10..15 {
            h.submit(sample(i));
        }
        wait_for("the later records", || h.stats().written == 15);
        assert_eq!(w.shutdown(Duration::from_secs(30)).expect("shutdown"), 15);
        assert_eq!(starts_in(&path), starts_of(10..15), "moved: {moved}");
        if moved {
            assert_eq!(
                starts_in(&aside),
                starts_of(0..10),
                "the moved file keeps its rows"
            );
        }
    }
}

#[test]
fn shutdown_gives_up_at_its_deadline_and_says_so() {
    let (_t, w, _h, _other) = failing_writer("1", 3);
    let e = w
        .shutdown(Duration::from_millis(300))
        .expect_err("cannot write");
    assert!(e.to_string().contains("3 records"), "{e}");
}

#[test]
fn a_writer_dropped_without_shutdown_stops_retrying_a_failing_ledger() {
    let (_t, w, h, _other) = failing_writer("1", 3);
    wait_for("a failed write", || h.stats().errors >= 1);
    drop(w);
    // Only `h` is left holding the shared state once the thread gave up.
    wait_for("the writer thread to give up", || !h.writer_thread_holds(1));
    assert_eq!(h.stats().written, 0);
    assert_eq!(h.stats().queued, 3, "{:?}", h.stats());
}

#[test]
fn a_file_that_is_not_sqlite_is_a_clear_error() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    std::fs::write(&path, vec![0x42u8; 8192]).expect("write junk");
    let e = Ledger::open(&path).expect_err("not a database");
    assert!(matches!(e, LedgerError::NotADatabase { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("ledger.sqlite") && msg.contains("move it away"),
        "{msg}"
    );
    assert_eq!(e.exit_code(), crate::exit::UNAVAILABLE);
    assert!(LedgerWriter::start(&path, 8, 1 << 20).is_err());
}

#[test]
fn another_programs_database_is_refused_and_left_as_it_was() {
    let t = tempfile::tempdir().expect("tempdir");
    for (name, setup) in [
        (
            "tables",
            "CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('x');",
        ),
        ("negative", "PRAGMA user_version = -1;"),
    ] {
        let path = t.path().join(format!("{name}.sqlite"));
        rusqlite::Connection::open(&path)
            .expect("sqlite")
            .execute_batch(setup)
            .expect("setup");
        let before = std::fs::read(&path).expect("read");
        for e in [
            Ledger::open(&path).err(),
            Ledger::open_read_only(&path).err(),
        ] {
            let e = e.expect("refused");
            assert!(matches!(e, LedgerError::Foreign { .. }), "{name}: {e:?}");
            assert!(e.to_string().contains("does not change it"), "{e}");
            assert_eq!(e.exit_code(), crate::exit::UNAVAILABLE);
        }
        assert!(LedgerWriter::start(&path, 8, 1 << 20).is_err());
        // Not switched to WAL, not migrated: the same bytes.
        assert_eq!(std::fs::read(&path).expect("read"), before, "{name}");
        assert!(!t.path().join(format!("{name}.sqlite-wal")).exists());
    }
    // An SQLite file with no table yet is tollgate's to set up.
    let path = t.path().join("empty.sqlite");
    rusqlite::Connection::open(&path)
        .expect("sqlite")
        .execute_batch("CREATE TABLE t (x); DROP TABLE t;")
        .expect("setup");
    Ledger::open(&path).expect("set up");
}

/// A ledger as a later tollgate would leave it: schema one newer, with a
/// column this build does not know, saying it is compatible back to
/// `oldest`.
fn a_later_ledger(path: &Path, oldest: i64) {
    Ledger::open(path).expect("create");
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.execute_batch(
        "ALTER TABLE requests ADD COLUMN from_the_future TEXT NOT NULL DEFAULT 'later';",
    )
    .expect("later column");
    conn.execute(
        "UPDATE tollgate_meta SET value = ?1 WHERE key = 'oldest_compatible'",
        [oldest],
    )
    .expect("meta");
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .expect("bump");
}

#[test]
fn a_newer_schema_is_refused_unless_it_says_this_build_is_compatible() {
    let t = tempfile::tempdir().expect("tempdir");
    // A later schema this build cannot write.
    let path = t.path().join("incompatible.sqlite");
    a_later_ledger(&path, SCHEMA_VERSION + 1);
    let e = Ledger::open(&path).expect_err("too new");
    assert!(matches!(e, LedgerError::TooNew { .. }), "{e:?}");
    assert!(e.to_string().contains("upgrade tollgate"), "{e}");
    let e = Ledger::open_read_only(&path).expect_err("too new");
    assert!(matches!(e, LedgerError::TooNew { .. }), "{e:?}");
    // Marked compatible, but then changed by `sql`: refused all the same.
    let refused = |name: &str, sql: &str| {
        let path = t.path().join(name);
        a_later_ledger(&path, SCHEMA_VERSION);
        rusqlite::Connection::open(&path)
            .expect("open")
            .execute_batch(sql)
            .expect(name);
        assert!(
            matches!(Ledger::open(&path), Err(LedgerError::TooNew { .. })),
            "{name}"
        );
    };
    // Without a column this build writes.
    refused(
        "missing-column.sqlite",
        "ALTER TABLE requests DROP COLUMN service_tier",
    );
    // With a mark that is not a number.
    refused("bad-mark.sqlite", "UPDATE tollgate_meta SET value = 'soon'");
    // From before the compatibility mark.
    refused("unmarked.sqlite", "DROP TABLE tollgate_meta");

    // A later schema that only added a column: a rolled-back agent keeps
    // writing it, and reads back what it wrote.
    let path = t.path().join("compatible.sqlite");
    a_later_ledger(&path, SCHEMA_VERSION);
    let mut l = Ledger::open(&path).expect("a compatible later ledger opens");
    l.insert_batch(&[sample(1)]).expect("insert");
    let got = l.query(&Filter::default()).expect("query");
    assert_eq!(
        got.into_iter().map(strip_id).collect::<Vec<_>>(),
        vec![sample(1)]
    );
    drop(l);
    let conn = rusqlite::Connection::open(&path).expect("open");
    let (version, later): (i64, String) = (
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version"),
        conn.query_row("SELECT from_the_future FROM requests", [], |r| r.get(0))
            .expect("later column"),
    );
    assert_eq!(version, SCHEMA_VERSION + 1, "left at its own version");
    assert_eq!(later, "later", "the later column takes its default");
    let l = Ledger::open_read_only(&path).expect("read-only too");
    assert_eq!(l.query(&Filter::default()).expect("query").len(), 1);
}

fn opt_string() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(any::<String>())
}

fn count() -> impl Strategy<Value = u64> {
    0..=i64::MAX as u64
}

prop_compose! {
    fn attribution()(
        ids in (any::<u32>(), any::<u32>(), any::<u64>(), any::<String>()),
        a in (opt_string(), opt_string(), opt_string(), opt_string(), opt_string()),
        b in (opt_string(), opt_string(), opt_string(), opt_string(), opt_string()),
        c in (opt_string(), opt_string(), opt_string(), opt_string()),
    ) -> Attribution {
        Attribution {
            pid: ids.0, uid: ids.1, cgroup_id: ids.2, comm: ids.3,
            exe: a.0, cmdline: a.1, ci_system: a.2, repository: a.3, workflow: a.4,
            job: b.0, run_id: b.1, run_attempt: b.2, ref_name: b.3, runner: b.4,
            job_id: c.0, cgroup_path: c.1, container_id: c.2, team: c.3,
        }
    }
}

prop_compose! {
    fn record()(
        head in (any::<i64>(), any::<String>(), count(), any::<String>(), any::<String>(), any::<String>()),
        req in (any::<String>(), any::<String>(), opt_string(), opt_string(), any::<u16>(), any::<bool>()),
        usage in (count(), count(), count(), count(), count()),
        tail in (any::<bool>(), proptest::option::of(-1e12f64..1e12), opt_string(), opt_string()),
        ttfb in proptest::option::of(count()),
        who in attribution(),
    ) -> UsageRecord {
        UsageRecord {
            id: None,
            started_at_ms: head.0, started_at: head.1, duration_ms: head.2, ttfb_ms: ttfb,
            provider: head.3, host: head.4, operation: head.5,
            method: req.0, path: req.1, model: req.2, response_model: req.3,
            status: req.4, streaming: req.5,
            usage: Usage {
                input_tokens: usage.0, output_tokens: usage.1, cached_input_tokens: usage.2,
                cache_write_input_tokens: usage.3, reasoning_tokens: usage.4,
                cache_write_1h_input_tokens: 0,
                web_searches: 0,
                web_searches_preview: 0,
                audio_input_tokens: 0,
                image_input_tokens: 0,
                audio_output_tokens: 0,
                image_output_tokens: 0,
                cached_audio_input_tokens: 0,
                cached_image_input_tokens: 0,
                audio_duration_ms: 0,
            },
            estimated: tail.0, cost_usd: tail.1, error: tail.2, who: who.into(),
            service_tier: tail.3,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn any_record_survives_a_round_trip(recs in proptest::collection::vec(record(), 1..8)) {
        let mut l = Ledger::open(Path::new(":memory:")).expect("memory ledger");
        l.insert_batch(&recs).expect("insert");
        let mut got: Vec<UsageRecord> = l.query(&Filter::default()).expect("q")
            .into_iter().map(strip_id).collect();
        let mut want = recs.clone();
        let key = |r: &UsageRecord| (r.started_at_ms, format!("{r:?}"));
        got.sort_by_key(key);
        want.sort_by_key(key);
        prop_assert_eq!(got, want);
    }
}

#[test]
fn a_batch_pauses_between_slices_and_is_still_one_whole_write() {
    let t = tempfile::tempdir().expect("tempdir");
    let mut l = Ledger::open(&t.path().join("ledger.sqlite")).expect("open");
    let recs: Vec<UsageRecord> = (0..17).map(sample).collect();
    let mut pauses = 0;
    l.insert_batch_pausing(&recs, 8, || pauses += 1)
        .expect("insert");
    // After records 8 and 16, never after the last one.
    assert_eq!(pauses, 2);
    assert_eq!(l.query(&Filter::default()).expect("query").len(), 17);
    // A pause of zero records is taken as one, not a division by zero.
    let mut pauses = 0;
    l.insert_batch_pausing(&recs[..3], 0, || pauses += 1)
        .expect("insert");
    assert_eq!(pauses, 2);
    assert_eq!(l.query(&Filter::default()).expect("query").len(), 20);
}

/// An immutable file (`chattr +i`) refuses writes even to root, so SQLite
/// opens it read-only; the agent must refuse to start on it rather than
/// fail every insert after "ready". Ignored in a plain `cargo test`;
/// `cargo xtask test` runs it as root, where it must work.
#[test]
#[ignore = "needs root and a filesystem with chattr +i (ext4, xfs, ...)"]
fn a_ledger_that_opens_read_only_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    drop(Ledger::open(&path).expect("create"));
    let chattr = |flag: &str| {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(&path)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    /// Undoes `chattr +i` however the test ends (an immutable file would
    /// outlive its temporary directory).
    struct Mutable<'a>(&'a dyn Fn(&str) -> bool);
    impl Drop for Mutable<'_> {
        fn drop(&mut self) {
            if !(self.0)("-i") {
                eprintln!("could not undo chattr +i");
            }
        }
    }
    assert!(
        chattr("+i"),
        "chattr +i failed on {}: run as root on a filesystem that supports it",
        path.display()
    );
    let mutable = Mutable(&chattr);
    let result = Ledger::open(&path);
    std::mem::forget(mutable);
    assert!(
        chattr("-i"),
        "could not undo chattr +i on {}",
        path.display()
    );
    let Err(err) = result else {
        panic!("an immutable ledger is refused")
    };
    assert!(matches!(err, LedgerError::ReadOnly { .. }), "{err}");
    assert_eq!(err.exit_code(), crate::exit::UNAVAILABLE);
}

#[test]
fn reading_a_stopped_agents_ledger_leaves_no_files_behind() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    {
        let mut l = Ledger::open(&path).expect("create");
        l.insert_batch(&[sample(1)]).expect("insert");
    }
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(t.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing();
    assert_eq!(before, ["ledger.sqlite"], "the writer cleaned up on close");
    let l = Ledger::open_read_only(&path).expect("read-only");
    assert_eq!(l.query(&Filter::default()).expect("query").len(), 1);
    drop(l);
    assert_eq!(listing(), before, "no -wal or -shm left");
}

#[test]
fn an_older_ledger_is_read_without_migrating_it() {
    // The agent not yet restarted after an upgrade: its ledger is still at
    // schema 2 when a user runs `report`, which may not migrate it.
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    {
        let conn = rusqlite::Connection::open(&path).expect("create");
        super::schema::version_2_with_one_row(&conn);
    }
    let l = Ledger::open_read_only(&path).expect("opens read-only");
    let rows = l.query(&Filter::default()).expect("query");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].usage.cache_write_input_tokens, 40);
    assert_eq!(rows[0].usage.cache_write_1h_input_tokens, 0);
    assert_eq!(rows[0].who.team.as_deref(), Some("infra"));
    drop(l);
    let conn = rusqlite::Connection::open(&path).expect("reopen");
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(v, 2, "not migrated by a read");
}

#[test]
fn batch_reads_are_found_by_host_and_path_most_recent_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let mut l = Ledger::open(&path).unwrap();
    let read = |i: u64, host: &str, p: &str, op: &str| {
        let mut r = sample(i);
        r.host = host.into();
        r.path = p.into();
        r.operation = op.into();
        r
    };
    l.insert_batch(&[
        read(1, "api.openai.com", "/v1/files/f1/content", "batch_results"),
        read(
            2,
            "api.anthropic.com",
            "/v1/messages/batches/b1/results",
            "batch_results",
        ),
        // A second model's row of the same read, and a later read.
        read(
            3,
            "api.anthropic.com",
            "/v1/messages/batches/b1/results",
            "batch_results",
        ),
        read(9, "api.openai.com", "/v1/files/f1/content", "batch_results"),
        read(4, "api.openai.com", "/v1/chat/completions", "chat"),
        read(
            0,
            "api.openai.com",
            "/v1/files/too-old/content",
            "batch_results",
        ),
    ])
    .unwrap();
    let found = Ledger::open_read_only(&path)
        .unwrap()
        .batch_reads_since(1_700_000_000_001, 10)
        .unwrap();
    let s = |h: &str, p: &str| (h.to_string(), p.to_string());
    assert_eq!(
        found,
        [
            s("api.openai.com", "/v1/files/f1/content"),
            s("api.anthropic.com", "/v1/messages/batches/b1/results"),
        ]
    );
    let one = l.batch_reads_since(0, 1).unwrap();
    assert_eq!(one, [s("api.openai.com", "/v1/files/f1/content")]);
    // Found through the batch results' own index, not every row's.
    let plan: Vec<String> = l
        .conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT host, path FROM requests \
             WHERE started_at_ms >= 0 AND operation = 'batch_results' GROUP BY host, path",
        )
        .unwrap()
        .query_map([], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter().any(|p| p.contains("requests_batch_results")),
        "{plan:?}"
    );
}

#[test]
fn a_walk_holds_no_snapshot_while_its_caller_works_and_skips_later_rows() {
    // `report --json | less`: the caller blocks between rows. The agent's
    // log must still be reset meanwhile, and what the walk returns is the
    // rows there when it began, each once, in order, across pages.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite");
    let mut l = Ledger::open(&path).unwrap();
    let total = WALK_PAGE as u64 * 2 + 7;
    // Inserted out of order, with ties on the start time across a page's
    // end: order is (started_at_ms, id).
    let recs: Vec<UsageRecord> = (0..total).rev().map(|i| at(i, (i / 3) as i64)).collect();
    l.insert_batch(&recs).unwrap();
    let agent = rusqlite::Connection::open(&path).unwrap();
    let mut seen = Vec::new();
    let mut resets = 0;
    let reader = Ledger::open_read_only(&path).unwrap();
    reader
        .for_each(&Filter::default(), |r| {
            if seen.len() % 100 == 1 {
                // The agent writes one more row and resets its log.
                // Ahead of the walk's cursor: only the snapshot bound
                // keeps it out.
                l.insert_batch(&[at(total + seen.len() as u64, 1_000_000)])
                    .unwrap();
                let busy: i64 = agent
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))
                    .unwrap();
                assert_eq!(busy, 0, "a reader held the log at row {}", seen.len());
                resets += 1;
            }
            seen.push((r.started_at_ms, r.id.unwrap()));
            Ok(())
        })
        .unwrap();
    assert!(resets >= 5, "{resets}");
    assert_eq!(
        seen.len(),
        total as usize,
        "rows written meanwhile are not in the walk"
    );
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(seen, sorted, "in order, each once");
    // A filter pages too; `since` is inclusive.
    let mut n = 0;
    reader
        .for_each(
            &Filter {
                since_ms: Some(100),
                ..Filter::default()
            },
            |r| {
                assert!(r.started_at_ms >= 100);
                n += 1;
                Ok(())
            },
        )
        .unwrap();
    // (The rows written during the first walk are in this one.)
    assert_eq!(n, (0..total).filter(|i| (i / 3) >= 100).count() + resets);
}

/// `report` started while the agent was stopped reads the ledger as an
/// immutable file; the agent starting during the walk (pruning, writing,
/// checkpointing: rewriting pages under the reader) must not make the walk
/// read a row twice, skip one, or fail as if the file were not a ledger.
#[test]
fn a_walk_of_a_stopped_ledger_survives_the_agent_starting() {
    const ROWS: u64 = 3000;
    // The agent keeps the file open (its `-wal` is there), or has already
    // stopped again by the next page (only the file's change shows).
    for agent_stays in [true, false] {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("ledger.sqlite");
        {
            let mut l = Ledger::open(&path).expect("create");
            let recs: Vec<UsageRecord> = (0..ROWS).map(sample).collect();
            l.insert_batch(&recs).expect("insert");
        }
        assert!(!wal_path(&path).exists());
        let r = Ledger::open_read_only(&path).expect("read-only");
        assert!(r.immutable.is_some());
        let mut seen = Vec::new();
        let mut agent = None;
        r.for_each(&Filter::default(), |rec| {
            seen.push(rec.id.expect("id"));
            if seen.len() == 300 {
                let mut a = Ledger::open(&path).expect("the agent opens");
                // Its retention prune at start: the oldest 1000 rows.
                let cutoff = 1_700_000_000_000 + 1000;
                while a.prune_before(cutoff, 0, 250).expect("prune") > 0 {}
                let recs: Vec<UsageRecord> = (ROWS..ROWS + 500).map(sample).collect();
                a.insert_batch(&recs).expect("insert");
                a.checkpoint().expect("checkpoint");
                if agent_stays {
                    agent = Some(a);
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("agent stays {agent_stays}: {e}"));
        drop(agent);
        // Each row once, in order: the two pages read before (the agent
        // started during the second), then every row that was there when
        // the walk began and was not pruned; none written after it began.
        let mut want: Vec<i64> = (1..=2 * WALK_PAGE as i64).collect();
        want.extend(1001..=ROWS as i64);
        assert_eq!(seen.len(), want.len(), "agent stays {agent_stays}");
        assert!(seen == want, "agent stays {agent_stays}: rows out of place");
    }
}

/// A row whose values do not fit their columns (the agent writes none; a
/// file edited by hand may hold one) is left out of a walk, which goes on
/// past it, across pages too: one odd row does not cost the whole report.
#[test]
fn a_walk_leaves_out_rows_that_do_not_fit_and_goes_on() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("ledger.sqlite");
    const ROWS: i64 = 600;
    {
        let mut l = Ledger::open(&path).expect("create");
        let recs: Vec<UsageRecord> = (0..ROWS as u64).map(sample).collect();
        l.insert_batch(&recs).expect("insert");
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    // Odd rows, some where a page ends or starts (pages of WALK_PAGE).
    let page = WALK_PAGE as i64;
    let odd: [(i64, &str); 5] = [
        (3, "status = 70000"),
        (page, "pid = -1"),
        (page + 1, "cost_usd = 'n/a'"),
        (2 * page, "input_tokens = 1.5"),
        (2 * page + 1, "started_at_ms = 'yesterday'"),
    ];
    for (id, set) in odd {
        conn.execute(&format!("UPDATE requests SET {set} WHERE id = {id}"), [])
            .unwrap();
    }
    drop(conn);
    let r = Ledger::open_read_only(&path).expect("read-only");
    let mut seen = Vec::new();
    r.for_each(&Filter::default(), |rec| {
        seen.push(rec.id.unwrap());
        Ok(())
    })
    .expect("the walk goes on past odd rows");
    let want: Vec<i64> = (1..=ROWS)
        .filter(|id| !odd.iter().any(|(o, _)| o == id))
        .collect();
    assert_eq!(seen, want);
}
