//! Attribution tests against a fake /proc tree.

use std::path::Path;

use super::*;

struct FakeProc<'a> {
    pid: u32,
    ppid: u32,
    start: u64,
    env: &'a [(&'a str, &'a str)],
    args: &'a [&'a str],
    exe: &'a str,
}

fn write_proc(root: &Path, p: &FakeProc<'_>) {
    let dir = root.join(p.pid.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("proc dir");
    let stat = format!(
        "{} (x y) S {} 1 1 0 -1 4194560 10 0 0 0 1 2 0 0 20 0 1 0 {} 1000 10 18446744073709551615",
        p.pid, p.ppid, p.start
    );
    std::fs::write(dir.join("stat"), stat).expect("stat");
    std::fs::write(
        dir.join("status"),
        format!(
            "Name:\tx\nState:\tS (sleeping)\nTgid:\t{0}\nPid:\t{0}\nPPid:\t{1}\n",
            p.pid, p.ppid
        ),
    )
    .expect("status");
    let mut env = Vec::new();
    for (k, v) in p.env {
        env.extend_from_slice(format!("{k}={v}").as_bytes());
        env.push(0);
    }
    std::fs::write(dir.join("environ"), env).expect("environ");
    let mut cmd = Vec::new();
    for a in p.args {
        cmd.extend_from_slice(a.as_bytes());
        cmd.push(0);
    }
    std::fs::write(dir.join("cmdline"), cmd).expect("cmdline");
    std::os::unix::fs::symlink(p.exe, dir.join("exe")).expect("exe link");
}

const GITHUB: &[(&str, &str)] = &[
    ("GITHUB_ACTIONS", "true"),
    ("GITHUB_REPOSITORY", "acme/app"),
    ("GITHUB_WORKFLOW", "CI"),
    ("GITHUB_JOB", "test"),
    ("GITHUB_RUN_ID", "123456"),
    ("GITHUB_RUN_ATTEMPT", "2"),
    ("GITHUB_REF_NAME", "main"),
    ("RUNNER_NAME", "runner-1"),
    ("GITHUB_TOKEN", "ghs_SECRETSECRETSECRETSECRET"),
    ("OPENAI_API_KEY", "sk-SECRETSECRETSECRETSECRET"),
];

#[test]
fn child_without_vars_inherits_the_job_of_its_parent() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    write_proc(
        root,
        &FakeProc {
            pid: 50,
            ppid: 1,
            start: 10,
            env: GITHUB,
            args: &["bash", "-e", "step.sh"],
            exe: "/usr/bin/bash",
        },
    );
    write_proc(
        root,
        &FakeProc {
            pid: 60,
            ppid: 50,
            start: 11,
            env: &[("HOME", "/home/runner")],
            args: &["make"],
            exe: "/usr/bin/make",
        },
    );
    write_proc(
        root,
        &FakeProc {
            pid: 70,
            ppid: 60,
            start: 12,
            env: &[("OPENAI_API_KEY", "sk-SECRETSECRETSECRETSECRET")],
            args: &[
                "python3",
                "eval.py",
                "--api-key",
                "sk-SECRETSECRETSECRETSECRET",
                "--max-tokens",
                "10",
            ],
            exe: "/usr/bin/python3.11",
        },
    );
    let at = Attributor::new(root.to_path_buf());
    let a = at.attribute(70, 1001, 77, "python3");
    assert_eq!(
        (a.pid, a.uid, a.cgroup_id, a.comm.as_str()),
        (70, 1001, 77, "python3")
    );
    assert_eq!(a.exe.as_deref(), Some("/usr/bin/python3.11"));
    assert_eq!(
        a.cmdline.as_deref(),
        Some("python3 eval.py --api-key [REDACTED] --max-tokens 10")
    );
    assert_eq!(a.ci_system.as_deref(), Some("github-actions"));
    assert_eq!(a.repository.as_deref(), Some("acme/app"));
    assert_eq!(a.workflow.as_deref(), Some("CI"));
    assert_eq!(a.job.as_deref(), Some("test"));
    assert_eq!(a.run_id.as_deref(), Some("123456"));
    assert_eq!(a.run_attempt.as_deref(), Some("2"));
    assert_eq!(a.ref_name.as_deref(), Some("main"));
    assert_eq!(a.runner.as_deref(), Some("runner-1"));
    let all = format!("{a:?} {}", serde_json::to_string(&a).expect("json"));
    assert!(!all.contains("SECRET"), "a secret leaked: {all}");
    assert!(
        !all.contains("/home/runner"),
        "an unrelated variable leaked: {all}"
    );
}

#[test]
fn a_reused_pid_is_a_new_process() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    let env_a = [("GITHUB_REPOSITORY", "acme/a")];
    let env_b = [("GITHUB_REPOSITORY", "acme/b")];
    write_proc(
        root,
        &FakeProc {
            pid: 200,
            ppid: 1,
            start: 5,
            env: &env_a,
            args: &["a"],
            exe: "/bin/a",
        },
    );
    let at = Attributor::new(root.to_path_buf());
    assert_eq!(
        at.attribute(200, 0, 0, "a").repository.as_deref(),
        Some("acme/a")
    );

    // Same pid and start time: the cache answers (the files are not re-read).
    write_proc(
        root,
        &FakeProc {
            pid: 200,
            ppid: 1,
            start: 5,
            env: &env_b,
            args: &["b"],
            exe: "/bin/b",
        },
    );
    let a = at.attribute(200, 0, 0, "a");
    assert_eq!(
        (a.repository.as_deref(), a.exe.as_deref()),
        (Some("acme/a"), Some("/bin/a"))
    );

    // Same pid, new start time: a different process.
    write_proc(
        root,
        &FakeProc {
            pid: 200,
            ppid: 1,
            start: 6,
            env: &env_b,
            args: &["b"],
            exe: "/bin/b",
        },
    );
    let b = at.attribute(200, 0, 0, "b");
    assert_eq!(
        (
            b.repository.as_deref(),
            b.exe.as_deref(),
            b.cmdline.as_deref()
        ),
        (Some("acme/b"), Some("/bin/b"), Some("b"))
    );
}

#[test]
fn a_missing_process_gives_the_kernel_fields_only() {
    let t = tempfile::tempdir().expect("tempdir");
    let at = Attributor::new(t.path().to_path_buf());
    let a = at.attribute(999, 1000, 42, "curl");
    assert_eq!(
        a,
        Attribution {
            pid: 999,
            uid: 1000,
            cgroup_id: 42,
            comm: "curl".into(),
            ..Attribution::default()
        }
    );
    // A process whose files vanish half-way (no environ, no exe).
    let dir = t.path().join("300");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("stat"),
        "300 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 77 0 0",
    )
    .expect("stat");
    let a = at.attribute(300, 0, 0, "x");
    assert_eq!((a.exe, a.cmdline, a.ci_system), (None, None, None));
}

#[test]
fn the_walk_stops_at_pid_1_and_at_its_depth() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    // pid 1 has the variables (e.g. a container's init): never used.
    write_proc(
        root,
        &FakeProc {
            pid: 1,
            ppid: 0,
            start: 1,
            env: GITHUB,
            args: &["init"],
            exe: "/sbin/init",
        },
    );
    write_proc(
        root,
        &FakeProc {
            pid: 10,
            ppid: 1,
            start: 2,
            env: &[],
            args: &["sh"],
            exe: "/bin/sh",
        },
    );
    let at = Attributor::new(root.to_path_buf());
    assert_eq!(at.attribute(10, 0, 0, "sh").ci_system, None);

    // A chain of 40 processes with the variables at the top.
    let top = 1000;
    write_proc(
        root,
        &FakeProc {
            pid: top,
            ppid: 1,
            start: 3,
            env: GITHUB,
            args: &["runner"],
            exe: "/bin/r",
        },
    );
    for i in 1..40u32 {
        write_proc(
            root,
            &FakeProc {
                pid: top + i,
                ppid: top + i - 1,
                start: 3,
                env: &[],
                args: &["sh"],
                exe: "/bin/sh",
            },
        );
    }
    assert!(
        at.attribute(top + 10, 0, 0, "sh").repository.is_some(),
        "10 levels up is found"
    );
    let fresh = Attributor::new(root.to_path_buf());
    assert!(
        fresh.attribute(top + 39, 0, 0, "sh").repository.is_none(),
        "39 levels up is beyond the limit"
    );
    // With the ancestors cached, a deep process finds the job through them.
    assert!(at.attribute(top + 39, 0, 0, "sh").repository.is_some());
}

#[test]
fn gitlab_job_is_recognised() {
    let t = tempfile::tempdir().expect("tempdir");
    let env = [
        ("GITLAB_CI", "true"),
        ("CI_PROJECT_PATH", "group/project"),
        ("CI_PIPELINE_ID", "9"),
        ("CI_JOB_NAME", "build"),
        ("CI_COMMIT_REF_NAME", "dev"),
        ("CI_RUNNER_DESCRIPTION", "shared-1"),
        ("CI_JOB_TOKEN", "glcbt-SECRET"),
    ];
    write_proc(
        t.path(),
        &FakeProc {
            pid: 5,
            ppid: 1,
            start: 1,
            env: &env,
            args: &["x"],
            exe: "/x",
        },
    );
    let a = Attributor::new(t.path().to_path_buf()).attribute(5, 0, 0, "x");
    assert_eq!(a.ci_system.as_deref(), Some("gitlab"));
    assert_eq!(a.repository.as_deref(), Some("group/project"));
    assert_eq!(a.job.as_deref(), Some("build"));
    assert_eq!(a.run_id.as_deref(), Some("9"));
    assert!(!format!("{a:?}").contains("SECRET"));
}

#[test]
fn the_cache_is_bounded() {
    let t = tempfile::tempdir().expect("tempdir");
    for pid in 2..60u32 {
        write_proc(
            t.path(),
            &FakeProc {
                pid,
                ppid: 1,
                start: 1,
                env: &[],
                args: &["x"],
                exe: "/x",
            },
        );
    }
    let at = Attributor::with_capacity(t.path().to_path_buf(), 16);
    for pid in 2..60u32 {
        at.attribute(pid, 0, 0, "x");
    }
    let c = at.caches();
    assert!(
        c.procs.len() <= 16 && c.ci.len() <= 16,
        "{} {}",
        c.procs.len(),
        c.ci.len()
    );
    assert!(c.procs.get(&(59, 1)).is_some(), "the newest entry is kept");
    assert!(
        c.procs.get(&(2, 1)).is_none(),
        "the oldest entry is evicted"
    );
}

#[test]
fn long_command_lines_are_cut_after_redaction() {
    let t = tempfile::tempdir().expect("tempdir");
    let long = "é".repeat(5000);
    let key = format!("sk-{}", "A".repeat(40));
    write_proc(
        t.path(),
        &FakeProc {
            pid: 7,
            ppid: 1,
            start: 1,
            env: &[],
            args: &["x", &key, &long],
            exe: "/x",
        },
    );
    let a = Attributor::new(t.path().to_path_buf()).attribute(7, 0, 0, "x");
    let c = a.cmdline.expect("cmdline");
    assert!(c.len() <= CMDLINE_KEEP + '…'.len_utf8(), "{}", c.len());
    assert!(c.starts_with("x [REDACTED] é") && c.ends_with('…'));
}
