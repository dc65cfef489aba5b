//! The CI summary scripts in deploy/ on a recorded run: a ledger with known
//! records (this job, plus other runs, jobs and repositories that must not
//! show), the real binary on PATH, and the exact Markdown they write.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tollgate::ledger::Ledger;
use tollgate::meter::{Attribution, Usage, UsageRecord};

const GITHUB_HOOK: &str = "deploy/github/job-completed.sh";
const GITLAB_SCRIPT: &str = "deploy/gitlab/spend-summary.sh";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[allow(clippy::too_many_arguments)]
fn rec(
    repo: &str,
    run: &str,
    job: &str,
    exe: &str,
    model: &str,
    input: u64,
    output: u64,
    cost: Option<f64>,
) -> UsageRecord {
    UsageRecord {
        started_at_ms: 1_800_000_000_000,
        started_at: "2027-01-15T08:00:00Z".into(),
        provider: "openai".into(),
        host: "api.openai.com".into(),
        operation: "chat".into(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some(model.into()),
        status: 200,
        usage: Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        },
        cost_usd: cost,
        who: Attribution {
            pid: 4242,
            comm: "worker".into(),
            exe: Some(exe.into()),
            ci_system: Some("github-actions".into()),
            repository: Some(repo.into()),
            job: Some(job.into()),
            run_id: Some(run.into()),
            ..Attribution::default()
        }
        .into(),
        ..UsageRecord::default()
    }
}

/// A state directory holding the recorded run, and a config pointing at it.
struct Recorded {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn recorded_run() -> Recorded {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let mut ledger = Ledger::open(&state.join("ledger.sqlite")).expect("open ledger");
    let records = vec![
        // The job: run 100, job `test` of acme/app.
        rec(
            "acme/app",
            "100",
            "test",
            "/usr/bin/python3",
            "gpt-4o",
            1200,
            300,
            Some(0.0105),
        ),
        rec(
            "acme/app",
            "100",
            "test",
            "/usr/bin/python3",
            "gpt-4o",
            800,
            200,
            Some(0.007),
        ),
        rec(
            "acme/app",
            "100",
            "test",
            "/usr/local/bin/node",
            "claude-sonnet-4-5",
            5000,
            1000,
            Some(0.03),
        ),
        rec(
            "acme/app",
            "100",
            "test",
            "/usr/bin/python3",
            "text-embedding-3-small",
            10_000,
            0,
            None,
        ),
        // Not the job: an earlier run, another job, another repository.
        rec(
            "acme/app",
            "99",
            "test",
            "/usr/bin/python3",
            "gpt-4o",
            7,
            7,
            Some(9.0),
        ),
        rec(
            "acme/app",
            "100",
            "lint",
            "/usr/bin/python3",
            "gpt-4o",
            7,
            7,
            Some(9.0),
        ),
        rec(
            "acme/other",
            "100",
            "test",
            "/usr/bin/python3",
            "gpt-4o",
            7,
            7,
            Some(9.0),
        ),
    ];
    ledger.insert_batch(&records).expect("insert");
    drop(ledger);
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\n", state.display().to_string()),
    )
    .expect("write config");
    Recorded { dir, config }
}

const TABLE: &str = "\
### LLM API spend (tollgate)

| Model | Executable | Requests | Input tokens | Output tokens | Cost (USD) |
| --- | --- | ---: | ---: | ---: | ---: |
| claude-sonnet-4-5 | node | 1 | 5,000 | 1,000 | 0.0300 |
| gpt-4o | python3 | 2 | 2,000 | 500 | 0.0175 |
| text-embedding-3-small | python3 | 1 | 10,000 | 0 | - |
| **Total** |  | **4** | **17,000** | **1,500** | **0.0475\\*** |

\\* 1 of 4 requests have no known price; costs marked \\* count the priced ones only.
";

const NONE: &str = "tollgate: no LLM API calls in this job.\n";
const UNKNOWN: &str =
    "tollgate: spend unknown: no ledger on this runner (is the tollgate agent running?).\n";

/// `bash -e SCRIPT ARGS` with a clean environment: the built tollgate
/// first on PATH, no settle time, and `env`.
fn script_command(script: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_tollgate"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );
    // `-e`, as the GitHub runner runs hooks (and GitLab its scripts).
    let mut c = Command::new("bash");
    c.arg("-e")
        .arg(repo_root().join(script))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("TOLLGATE_SETTLE_SECS", "0")
        .current_dir(repo_root());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    script_command(script, args, env)
        .output()
        .expect("run bash")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn github_env<'a>(summary: &'a str, config: &'a str, run: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("GITHUB_STEP_SUMMARY", summary),
        ("GITHUB_REPOSITORY", "acme/app"),
        ("GITHUB_RUN_ID", run),
        ("GITHUB_JOB", "test"),
        ("TOLLGATE_CONFIG", config),
    ]
}

#[test]
fn github_hook_appends_the_jobs_table() {
    let r = recorded_run();
    let summary = r.dir.path().join("summary.md");
    std::fs::write(&summary, "Earlier step output.\n").expect("seed summary");
    let (s, c) = (
        summary.display().to_string(),
        r.config.display().to_string(),
    );
    let o = run_script(GITHUB_HOOK, &[], &github_env(&s, &c, "100"));
    assert!(o.status.success(), "{}", text(&o));
    let got = std::fs::read_to_string(&summary).expect("summary");
    assert_eq!(
        got,
        format!("Earlier step output.\n{TABLE}"),
        "{}",
        text(&o)
    );
}

#[test]
fn github_hook_without_calls_writes_one_line() {
    let r = recorded_run();
    let summary = r.dir.path().join("summary.md");
    let (s, c) = (
        summary.display().to_string(),
        r.config.display().to_string(),
    );
    let o = run_script(GITHUB_HOOK, &[], &github_env(&s, &c, "12345"));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&summary).expect("summary"), NONE);

    // No ledger at all (the agent never ran): the spend is unknown, and
    // the summary says so rather than "no calls".
    let empty = r.dir.path().join("empty.toml");
    std::fs::write(
        &empty,
        format!(
            "state_dir = {:?}\n",
            r.dir.path().join("nothing").display().to_string()
        ),
    )
    .expect("config");
    let summary2 = r.dir.path().join("summary2.md");
    let (s2, e) = (summary2.display().to_string(), empty.display().to_string());
    let o = run_script(GITHUB_HOOK, &[], &github_env(&s2, &e, "100"));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(&summary2).expect("summary"),
        UNKNOWN
    );
    assert!(text(&o).contains("no ledger at "), "{}", text(&o));
}

#[test]
fn github_hook_never_fails_the_job() {
    let r = recorded_run();
    let summary = r.dir.path().join("summary.md");
    let s = summary.display().to_string();
    let c = r.config.display().to_string();
    // tollgate is not installed.
    let mut env = github_env(&s, &c, "100");
    env.push(("TOLLGATE", "/nonexistent/tollgate"));
    let o = run_script(GITHUB_HOOK, &[], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("not installed"), "{}", text(&o));
    // tollgate fails (a broken config file: exit 64).
    let bad = r.dir.path().join("bad.toml");
    std::fs::write(&bad, "nonsense = 1\n").expect("config");
    let b = bad.display().to_string();
    let o = run_script(GITHUB_HOOK, &[], &github_env(&s, &b, "100"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("exit 64"), "{}", text(&o));
    // Outside a job.
    let o = run_script(GITHUB_HOOK, &[], &[("TOLLGATE_CONFIG", c.as_str())]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!summary.exists(), "nothing written on failure");
}

/// `run_script`, failing the test (and killing what the script started)
/// if it has not ended within 60 s.
fn run_script_bounded(script: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    use std::os::unix::process::CommandExt;
    let log = tempfile::NamedTempFile::new().expect("log");
    let mut c = script_command(script, &[], env);
    c.stdout(log.reopen().expect("log"))
        .stderr(log.reopen().expect("log"))
        .process_group(0);
    let mut child = c.spawn().expect("run bash");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: the process group this test started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "{script} still running after 60 s: {}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(log.path()).expect("log"))
}

#[test]
fn github_hook_never_hangs_the_runner() {
    let r = recorded_run();
    let summary = r.dir.path().join("summary.md");
    let (s, c) = (
        summary.display().to_string(),
        r.config.display().to_string(),
    );
    // A FIFO where job-started.sh leaves its note (RUNNER_TEMP is the
    // job's to write): neither hook may wait on it.
    let temp = r.dir.path().join("runner-temp");
    std::fs::create_dir(&temp).expect("runner temp");
    let note = temp.join("tollgate-job-started");
    assert!(
        Command::new("mkfifo")
            .arg(&note)
            .status()
            .expect("mkfifo")
            .success()
    );
    let t = temp.display().to_string();
    let mut env = github_env(&s, &c, "100");
    env.push(("RUNNER_TEMP", &t));
    let (status, out) = run_script_bounded(GITHUB_HOOK, &env);
    assert!(status.success(), "{out}");
    assert_eq!(
        std::fs::read_to_string(&summary).expect("summary"),
        TABLE,
        "{out}"
    );
    let (status, out) = run_script_bounded("deploy/github/job-started.sh", &env);
    assert!(status.success(), "{out}");
    assert!(note.is_file(), "the note replaced the FIFO: {out}");

    // A report that never ends (a stalled disk): given up after
    // TOLLGATE_REPORT_TIMEOUT. A settle time that is not a number is
    // refused, not slept.
    let stub = r.dir.path().join("tollgate");
    std::fs::write(&stub, "#!/bin/sh\nexec sleep 600\n").expect("stub");
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let summary2 = r.dir.path().join("summary2.md");
    let (s2, b) = (summary2.display().to_string(), stub.display().to_string());
    let mut env = github_env(&s2, &c, "100");
    env.extend([
        ("TOLLGATE", b.as_str()),
        ("TOLLGATE_REPORT_TIMEOUT", "1"),
        ("TOLLGATE_SETTLE_SECS", "infinity"),
    ]);
    for script in [GITHUB_HOOK, GITLAB_SCRIPT] {
        let mut env = env.clone();
        let out_file = r.dir.path().join("spend.md").display().to_string();
        env.extend([
            ("CI_PROJECT_PATH", "acme/app"),
            ("CI_PIPELINE_ID", "100"),
            ("CI_JOB_NAME", "test"),
            ("TOLLGATE_SPEND_FILE", out_file.as_str()),
        ]);
        let (status, out) = run_script_bounded(script, &env);
        assert!(status.success(), "{script}: {out}");
        assert!(out.contains("did not finish in time"), "{script}: {out}");
        assert!(
            out.contains("TOLLGATE_SETTLE_SECS=infinity"),
            "{script}: {out}"
        );
    }
    assert!(!summary2.exists(), "nothing written");
}

#[test]
fn gitlab_script_writes_the_table_file() {
    let r = recorded_run();
    let c = r.config.display().to_string();
    let project = r.dir.path().display().to_string();
    let env = |pipeline: &'static str| {
        vec![
            ("CI_PROJECT_PATH", "acme/app"),
            ("CI_PIPELINE_ID", pipeline),
            ("CI_JOB_NAME", "test"),
            ("CI_PROJECT_DIR", project.as_str()),
            ("TOLLGATE_CONFIG", c.as_str()),
        ]
    };
    let out = r.dir.path().join("tollgate-spend.md");
    let o = run_script(GITLAB_SCRIPT, &[], &env("100"));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&out).expect("file"), TABLE);

    // An explicit output path, and the "none" case.
    let other = r.dir.path().join("none.md");
    let o = run_script(GITLAB_SCRIPT, &[&other.display().to_string()], &env("555"));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&other).expect("file"), NONE);

    let mut missing = env("100");
    missing.push(("TOLLGATE", "/nonexistent/tollgate"));
    let o = run_script(GITLAB_SCRIPT, &[&other.display().to_string()], &missing);
    assert!(o.status.success(), "{}", text(&o));
}

/// The hook as a non-root runner user against the root-owned ledger: the
/// report opens it read-only, with the agent stopped (no -wal file) and
/// with the agent running (the ledger open for writing, its WAL in use).
#[test]
#[ignore = "needs root (runs the hook as nobody via setpriv)"]
fn github_hook_as_a_non_root_runner_user() {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        unsafe { libc::geteuid() } == 0,
        "needs root: it runs the hook as the user nobody"
    );
    let r = recorded_run();
    // tempfile makes its directory 0700; the runner user needs to reach in.
    std::fs::set_permissions(r.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = tempfile::tempdir().expect("summary dir");
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let ledger_path = r.dir.path().join("state/ledger.sqlite");
    for agent_running in [false, true] {
        // The agent keeps the ledger open and writes to it (not this job's run).
        let _agent = agent_running.then(|| {
            let mut l = Ledger::open(&ledger_path).expect("open for writing");
            l.insert_batch(&[rec("acme/app", "101", "test", "/bin/x", "m", 1, 1, None)])
                .expect("write");
            l
        });
        let wal = PathBuf::from(format!("{}-wal", ledger_path.display()));
        assert_eq!(wal.exists(), agent_running, "WAL file while the agent runs");
        let summary = out.path().join(format!("summary-{agent_running}.md"));
        let bin = env!("CARGO_BIN_EXE_tollgate");
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(["bash", "-e"])
            .arg(repo_root().join(GITHUB_HOOK))
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("TOLLGATE", bin)
            .env("TOLLGATE_SETTLE_SECS", "0")
            .env("TOLLGATE_CONFIG", &r.config)
            .env("GITHUB_STEP_SUMMARY", &summary)
            .env("GITHUB_REPOSITORY", "acme/app")
            .env("GITHUB_RUN_ID", "100")
            .env("GITHUB_JOB", "test")
            .output()
            .expect("run setpriv");
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            std::fs::read_to_string(&summary).unwrap_or_default(),
            TABLE,
            "agent running: {agent_running}: {}",
            text(&o)
        );
    }
}

/// A ledger of one job's matrix legs and retries, with a config: every
/// record is run 100, job `test` of acme/app; they differ in runner,
/// attempt, start and job id.
fn matrix_run() -> Recorded {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let mut ledger = Ledger::open(&state.join("ledger.sqlite")).expect("open ledger");
    let leg = |runner: &str, attempt: &str, at_ms: i64, job_id: &str, model: &str| {
        let mut r = rec(
            "acme/app",
            "100",
            "test",
            "/usr/bin/python3",
            model,
            100,
            10,
            None,
        );
        r.started_at_ms = at_ms;
        let who = std::sync::Arc::make_mut(&mut r.who);
        who.runner = Some(runner.into());
        who.run_attempt = Some(attempt.into());
        who.job_id = Some(job_id.into());
        r
    };
    // 2027-01-15T08:00:00Z and ten minutes later.
    let (earlier, later) = (1_800_000_000_000, 1_800_000_600_000);
    let records = vec![
        leg("runner-1", "2", later, "501", "this-leg"),
        leg("runner-1", "2", earlier, "500", "earlier-leg-same-runner"),
        leg("runner-2", "2", later, "502", "parallel-leg-other-runner"),
        leg("runner-1", "1", later, "400", "first-attempt"),
    ];
    ledger.insert_batch(&records).expect("insert");
    drop(ledger);
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\n", state.display().to_string()),
    )
    .expect("write config");
    Recorded { dir, config }
}

#[test]
fn github_hook_keeps_to_this_matrix_leg() {
    let r = matrix_run();
    let temp = r.dir.path().join("runner-temp");
    std::fs::create_dir_all(&temp).expect("RUNNER_TEMP");
    let (c, t) = (r.config.display().to_string(), temp.display().to_string());
    let summarise = |name: &str| {
        let summary = r.dir.path().join(name);
        let s = summary.display().to_string();
        let mut env = github_env(&s, &c, "100");
        env.extend([
            ("RUNNER_NAME", "runner-1"),
            ("GITHUB_RUN_ATTEMPT", "2"),
            ("RUNNER_TEMP", t.as_str()),
        ]);
        let o = run_script(GITHUB_HOOK, &[], &env);
        assert!(o.status.success(), "{}", text(&o));
        (
            std::fs::read_to_string(&summary).expect("summary"),
            text(&o),
        )
    };
    // The job-started hook's note, five minutes into the run: between
    // the two legs on this runner.
    std::fs::write(temp.join("tollgate-job-started"), "2027-01-15T08:05:00Z\n").expect("note");
    let (got, log) = summarise("one.md");
    assert!(got.contains("this-leg"), "{got}{log}");
    for other in ["earlier-leg", "parallel-leg", "first-attempt"] {
        assert!(!got.contains(other), "{other} in:\n{got}");
    }
    // Without the note, this runner's legs of this attempt.
    std::fs::remove_file(temp.join("tollgate-job-started")).expect("rm");
    let (got, _) = summarise("two.md");
    assert!(
        got.contains("this-leg") && got.contains("earlier-leg"),
        "{got}"
    );
    assert!(
        !got.contains("parallel-leg") && !got.contains("first-attempt"),
        "{got}"
    );
    // The real job-started hook writes a note the completed hook takes as
    // a start time (which records it then shows depends on today's date,
    // so only the note's acceptance is checked).
    let o = run_script(
        "deploy/github/job-started.sh",
        &[],
        &[("RUNNER_TEMP", t.as_str())],
    );
    assert!(o.status.success(), "{}", text(&o));
    let note = std::fs::read_to_string(temp.join("tollgate-job-started")).expect("note");
    assert_eq!(note.trim().len(), "2026-11-30T06:00:00Z".len(), "{note}");
    let (_, log) = summarise("three.md");
    assert!(
        !log.contains("ignoring") && !log.contains("failed"),
        "{log}"
    );
    // A note that is not a time is ignored, not passed on.
    std::fs::write(temp.join("tollgate-job-started"), "--json\n").expect("note");
    let (got, log) = summarise("four.md");
    assert!(
        got.contains("this-leg") && log.contains("ignoring"),
        "{got}{log}"
    );
}

#[test]
fn gitlab_script_keeps_to_this_job_id() {
    let r = matrix_run();
    let c = r.config.display().to_string();
    let out = r.dir.path().join("spend.md");
    let o = run_script(
        GITLAB_SCRIPT,
        &[&out.display().to_string()],
        &[
            ("CI_PROJECT_PATH", "acme/app"),
            ("CI_PIPELINE_ID", "100"),
            ("CI_JOB_NAME", "test"),
            ("CI_JOB_ID", "501"),
            ("TOLLGATE_CONFIG", c.as_str()),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let got = std::fs::read_to_string(&out).expect("file");
    assert!(got.contains("this-leg"), "{got}");
    assert_eq!(got.matches("| 1 |").count(), 1, "one row: {got}");
}
