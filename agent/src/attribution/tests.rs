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
fn a_parent_pid_reused_by_a_later_process_lends_no_job() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    // The child's parent exited and its pid went to a process that
    // started after the child, in another job.
    write_proc(
        root,
        &FakeProc {
            pid: 50,
            ppid: 1,
            start: 30,
            env: GITHUB,
            args: &["bash"],
            exe: "/usr/bin/bash",
        },
    );
    write_proc(
        root,
        &FakeProc {
            pid: 60,
            ppid: 50,
            start: 20,
            env: &[("HOME", "/home/runner")],
            args: &["python3", "orphan.py"],
            exe: "/usr/bin/python3",
        },
    );
    let a = Attributor::new(root.to_path_buf()).of(60, 1001, 77, "python3");
    assert_eq!(a.exe.as_deref(), Some("/usr/bin/python3"), "read");
    assert_eq!(a.repository, None, "{a:?}");
    assert_eq!(a.ci_system, None);
}

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
    let a = at.of(70, 1001, 77, "python3");
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
    // In a pid namespace of the agent's own, /proc is not read: a process
    // there with the kernel's number would be another one.
    let kernel = Attributor::new(root.to_path_buf())
        .kernel_fields_only(true)
        .of(70, 1001, 77, "python3");
    assert_eq!(
        (
            kernel.pid,
            kernel.uid,
            kernel.cgroup_id,
            kernel.comm.as_str()
        ),
        (70, 1001, 77, "python3")
    );
    assert_eq!(
        (kernel.exe, kernel.repository, kernel.cmdline),
        (None, None, None)
    );
    let all = format!("{a:?} {}", serde_json::to_string(&a).expect("json"));
    assert!(!all.contains("SECRET"), "a secret leaked: {all}");
    assert!(
        !all.contains("/home/runner"),
        "an unrelated variable leaked: {all}"
    );
}

fn proc_200(root: &Path, start: u64, repo: &str, arg: &str, exe: &str) {
    write_proc(
        root,
        &FakeProc {
            pid: 200,
            ppid: 1,
            start,
            env: &[("GITHUB_REPOSITORY", repo)],
            args: &[arg],
            exe,
        },
    );
}

fn who(a: &Attribution) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        a.repository.as_deref(),
        a.exe.as_deref(),
        a.cmdline.as_deref(),
    )
}

#[test]
fn a_reused_pid_is_a_new_process() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    proc_200(root, 5, "acme/a", "a", "/bin/a");
    let at = Attributor::new(root.to_path_buf());
    assert_eq!(
        who(&at.of(200, 0, 0, "a")),
        (Some("acme/a"), Some("/bin/a"), Some("a"))
    );

    // Same pid, start time, program and arguments: the cache answers (the
    // environment is not re-read).
    proc_200(root, 5, "acme/b", "a", "/bin/a");
    assert_eq!(
        who(&at.of(200, 0, 0, "a")),
        (Some("acme/a"), Some("/bin/a"), Some("a"))
    );

    // The same program exec'd with other arguments: read afresh,
    // environment too.
    proc_200(root, 5, "acme/b", "a2", "/bin/a");
    assert_eq!(
        who(&at.of(200, 0, 0, "a")),
        (Some("acme/b"), Some("/bin/a"), Some("a2"))
    );

    // The process exec'd another program: read afresh.
    proc_200(root, 5, "acme/c", "b", "/bin/b");
    assert_eq!(
        who(&at.of(200, 0, 0, "b")),
        (Some("acme/c"), Some("/bin/b"), Some("b"))
    );

    // Same pid, new start time: a different process.
    proc_200(root, 6, "acme/d", "c", "/bin/b");
    assert_eq!(
        who(&at.of(200, 0, 0, "c")),
        (Some("acme/d"), Some("/bin/b"), Some("c"))
    );
}

#[test]
fn a_process_that_started_after_the_connect_is_not_the_caller() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    // Started 500 ticks after boot.
    proc_200(root, 500, "acme/new", "new", "/bin/new");
    let at = Attributor::new(root.to_path_buf());
    let started = 500 * at.tick_ns;
    let caller = |connected_boot_ns| Caller {
        pid: 200,
        uid: 1000,
        cgroup_id: 9,
        comm: "old".into(),
        connected_boot_ns,
    };
    // The connect came before the process at pid 200 started: the pid was
    // reused, and nothing of the new process is taken.
    let a = at.attribute(&caller(started - 1));
    assert_eq!(
        a,
        Attribution {
            pid: 200,
            uid: 1000,
            cgroup_id: 9,
            comm: "old".into(),
            ..Attribution::default()
        }
    );
    // A connect at or after its start is its own.
    assert_eq!(
        who(&at.attribute(&caller(started))),
        (Some("acme/new"), Some("/bin/new"), Some("new"))
    );
    assert_eq!(
        who(&at.attribute(&caller(started + 3_600_000_000_000))),
        (Some("acme/new"), Some("/bin/new"), Some("new"))
    );
    assert_eq!(at.tick_ns, 10_000_000, "USER_HZ is 100 on Linux");
    // In a time namespace whose boot time is 1 s later, /proc shows every
    // start 1 s later than the kernel's clock has it.
    let mut shifted = Attributor::new(root.to_path_buf());
    shifted.boottime_offset_ns = 1_000_000_000;
    assert_eq!(
        who(&shifted.attribute(&caller(started - 1_000_000_000))),
        (Some("acme/new"), Some("/bin/new"), Some("new"))
    );
    assert_eq!(
        shifted.attribute(&caller(started - 1_000_000_001)).exe,
        None
    );
}

#[test]
fn time_namespace_offsets_are_read() {
    let text = "monotonic           0         0\nboottime       -3600    500000000\n";
    assert_eq!(
        boottime_offset_ns(text),
        Some(-3_600_000_000_000 + 500_000_000)
    );
    assert_eq!(boottime_offset_ns("monotonic 1 2\n"), None);
    assert_eq!(boottime_offset_ns("boottime x y\n"), None);
}

#[test]
fn an_exiting_process_keeps_its_cached_facts() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    proc_200(root, 5, "acme/a", "a", "/bin/a");
    let at = Attributor::new(root.to_path_buf());
    assert_eq!(who(&at.of(200, 0, 0, "a")).1, Some("/bin/a"));
    // Exiting: the exe link is gone, the rest of /proc still there.
    std::fs::remove_file(root.join("200/exe")).expect("rm exe");
    assert_eq!(
        who(&at.of(200, 0, 0, "a")),
        (Some("acme/a"), Some("/bin/a"), Some("a"))
    );
}

#[test]
fn a_zombie_keeps_its_cached_facts() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    proc_200(root, 5, "acme/a", "a", "/bin/a");
    let at = Attributor::new(root.to_path_buf());
    assert_eq!(who(&at.of(200, 0, 0, "a")).1, Some("/bin/a"));
    // A zombie (or a process whose main thread has exited): its cmdline
    // reads empty, its environ and exe cannot be read at all.
    std::fs::write(root.join("200/cmdline"), b"").expect("empty cmdline");
    std::fs::remove_file(root.join("200/exe")).expect("rm exe");
    std::fs::remove_file(root.join("200/environ")).expect("rm environ");
    assert_eq!(
        who(&at.of(200, 0, 0, "a")),
        (Some("acme/a"), Some("/bin/a"), Some("a"))
    );
}

#[test]
fn a_value_with_spaces_in_one_argument_is_redacted_whole() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    write_proc(
        root,
        &FakeProc {
            pid: 200,
            ppid: 1,
            start: 5,
            env: &[],
            args: &["python3", "eval.py", "--db-password=correct horse battery"],
            exe: "/usr/bin/python3",
        },
    );
    let at = Attributor::new(root.to_path_buf());
    let cmdline = at.of(200, 0, 0, "python3").cmdline.expect("cmdline");
    assert_eq!(cmdline, "python3 eval.py --db-password=[REDACTED]");
}

#[test]
fn a_missing_process_gives_the_kernel_fields_only() {
    let t = tempfile::tempdir().expect("tempdir");
    let at = Attributor::new(t.path().to_path_buf());
    let a = at.of(999, 1000, 42, "curl");
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
    let a = at.of(300, 0, 0, "x");
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
    assert_eq!(at.of(10, 0, 0, "sh").ci_system, None);

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
        at.of(top + 10, 0, 0, "sh").repository.is_some(),
        "10 levels up is found"
    );
    let fresh = Attributor::new(root.to_path_buf());
    assert!(
        fresh.of(top + 39, 0, 0, "sh").repository.is_none(),
        "39 levels up is beyond the limit"
    );
    // With the ancestors cached, a deep process finds the job through them.
    assert!(at.of(top + 39, 0, 0, "sh").repository.is_some());
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
    let a = Attributor::new(t.path().to_path_buf()).of(5, 0, 0, "x");
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
        at.of(pid, 0, 0, "x");
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
    let a = Attributor::new(t.path().to_path_buf()).of(7, 0, 0, "x");
    let c = a.cmdline.expect("cmdline");
    assert!(c.len() <= CMDLINE_KEEP + '…'.len_utf8(), "{}", c.len());
    assert!(c.starts_with("x [REDACTED] é") && c.ends_with('…'));
}

/// A process with `env`, alone under `root`, attributed.
fn attribute_env(env: &[(&str, &str)]) -> Attribution {
    let t = tempfile::tempdir().expect("tempdir");
    write_proc(
        t.path(),
        &FakeProc {
            pid: 40,
            ppid: 1,
            start: 1,
            env,
            args: &["x"],
            exe: "/x",
        },
    );
    let a = Attributor::new(t.path().to_path_buf()).of(40, 0, 0, "x");
    let all = format!("{a:?}");
    assert!(!all.contains("SECRET"), "a secret leaked: {all}");
    a
}

/// The CI fields, in `Attribution` order.
fn ci_fields(a: &Attribution) -> [Option<&str>; 9] {
    [
        a.ci_system.as_deref(),
        a.repository.as_deref(),
        a.workflow.as_deref(),
        a.job.as_deref(),
        a.job_id.as_deref(),
        a.run_id.as_deref(),
        a.run_attempt.as_deref(),
        a.ref_name.as_deref(),
        a.runner.as_deref(),
    ]
}

#[test]
fn each_ci_system_fills_the_same_fields() {
    let gh = attribute_env(GITHUB);
    assert_eq!(
        ci_fields(&gh),
        [
            Some("github-actions"),
            Some("acme/app"),
            Some("CI"),
            Some("test"),
            None,
            Some("123456"),
            Some("2"),
            Some("main"),
            Some("runner-1")
        ]
    );

    let gl = attribute_env(&[
        ("GITLAB_CI", "true"),
        ("CI_PROJECT_PATH", "group/sub/project"),
        ("CI_PIPELINE_NAME", "nightly"),
        ("CI_PIPELINE_ID", "9"),
        ("CI_JOB_NAME", "build"),
        ("CI_JOB_ID", "4242"),
        ("CI_COMMIT_REF_NAME", "dev"),
        ("CI_RUNNER_DESCRIPTION", "shared-1"),
        ("CI_JOB_TOKEN", "glcbt-SECRET"),
    ]);
    assert_eq!(
        ci_fields(&gl),
        [
            Some("gitlab"),
            Some("group/sub/project"),
            Some("nightly"),
            Some("build"),
            Some("4242"),
            Some("9"),
            None,
            Some("dev"),
            Some("shared-1")
        ]
    );

    let bk = attribute_env(&[
        ("BUILDKITE", "true"),
        ("BUILDKITE_REPO", "git@github.com:acme/app.git"),
        ("BUILDKITE_PIPELINE_SLUG", "app"),
        ("BUILDKITE_LABEL", ":rust: test"),
        ("BUILDKITE_BUILD_ID", "0190-aa"),
        ("BUILDKITE_JOB_ID", "0190-bb"),
        ("BUILDKITE_BRANCH", "main"),
        ("BUILDKITE_AGENT_NAME", "agent-7"),
        ("BUILDKITE_AGENT_ACCESS_TOKEN", "SECRET"),
    ]);
    assert_eq!(
        ci_fields(&bk),
        [
            Some("buildkite"),
            Some("acme/app"),
            Some("app"),
            Some(":rust: test"),
            Some("0190-bb"),
            Some("0190-aa"),
            None,
            Some("main"),
            Some("agent-7")
        ]
    );

    let jk = attribute_env(&[
        ("JENKINS_URL", "https://ci.acme.dev/"),
        ("BUILD_ID", "57"),
        ("BUILD_NUMBER", "57"),
        ("BUILD_TAG", "jenkins-acme-app-main-57"),
        ("JOB_NAME", "acme/app/main"),
        ("STAGE_NAME", "Evaluate"),
        (
            "GIT_URL",
            "https://jenkins-bot:ghp_SECRETSECRET@github.com/acme/app.git",
        ),
        ("GIT_BRANCH", "origin/main"),
        ("NODE_NAME", "linux-agent-3"),
    ]);
    assert_eq!(
        ci_fields(&jk),
        [
            Some("jenkins"),
            Some("acme/app"),
            Some("acme/app/main"),
            Some("Evaluate"),
            None,
            Some("57"),
            None,
            Some("main"),
            Some("linux-agent-3")
        ]
    );

    let cc = attribute_env(&[
        ("CIRCLECI", "true"),
        ("CIRCLE_PROJECT_USERNAME", "acme"),
        ("CIRCLE_PROJECT_REPONAME", "app"),
        ("CIRCLE_WORKFLOW_ID", "6f1c-wf"),
        ("CIRCLE_JOB", "eval"),
        ("CIRCLE_BUILD_NUM", "881"),
        ("CIRCLE_BRANCH", "feature/x"),
        ("CIRCLE_NODE_INDEX", "1"),
        ("CIRCLE_TOKEN", "SECRET"),
    ]);
    assert_eq!(
        ci_fields(&cc),
        [
            Some("circleci"),
            Some("acme/app"),
            None,
            Some("eval"),
            Some("881"),
            Some("6f1c-wf"),
            None,
            Some("feature/x"),
            Some("1")
        ]
    );

    let az = attribute_env(&[
        ("TF_BUILD", "True"),
        ("BUILD_REPOSITORY_NAME", "acme/app"),
        ("BUILD_DEFINITIONNAME", "app-ci"),
        ("SYSTEM_JOBDISPLAYNAME", "Run evals"),
        ("AGENT_JOBNAME", "Job"),
        ("SYSTEM_JOBID", "12f1170f-54f2-53f3-20dd-22fc7dff55f9"),
        ("BUILD_BUILDID", "1234"),
        ("SYSTEM_JOBATTEMPT", "3"),
        ("BUILD_SOURCEBRANCH", "refs/heads/feature/x"),
        ("BUILD_SOURCEBRANCHNAME", "x"),
        ("AGENT_NAME", "pool-agent-2"),
        ("SYSTEM_ACCESSTOKEN", "SECRET"),
    ]);
    assert_eq!(
        ci_fields(&az),
        [
            Some("azure-pipelines"),
            Some("acme/app"),
            Some("app-ci"),
            Some("Run evals"),
            Some("12f1170f-54f2-53f3-20dd-22fc7dff55f9"),
            Some("1234"),
            Some("3"),
            Some("feature/x"),
            Some("pool-agent-2")
        ]
    );
}

#[test]
fn ci_detection_needs_the_system_marker() {
    // A job that merely talks to Jenkins, or a bare BUILD_ID, is not Jenkins.
    assert_eq!(
        attribute_env(&[("JENKINS_URL", "https://ci/"), ("HOME", "/root")]).ci_system,
        None
    );
    assert_eq!(attribute_env(&[("BUILD_ID", "7")]).ci_system, None);
    assert_eq!(
        attribute_env(&[("BUILD_TAG", "jenkins-x-1"), ("BUILD_NUMBER", "1")])
            .ci_system
            .as_deref(),
        Some("jenkins")
    );
    assert_eq!(attribute_env(&[("TF_BUILD", "false")]).ci_system, None);
    assert_eq!(attribute_env(&[("CIRCLECI", "false")]).ci_system, None);
    // A GitHub job that calls Jenkins is a GitHub job.
    let mut env = GITHUB.to_vec();
    env.extend([("JENKINS_URL", "https://ci/"), ("BUILD_NUMBER", "3")]);
    assert_eq!(
        attribute_env(&env).ci_system.as_deref(),
        Some("github-actions")
    );
    // CircleCI without the project variables falls back to the remote URL.
    let cc = attribute_env(&[
        ("CIRCLECI", "true"),
        ("CIRCLE_REPOSITORY_URL", "git@github.com:acme/lib.git"),
        ("CIRCLE_TAG", "v1.2"),
    ]);
    assert_eq!(
        (cc.repository.as_deref(), cc.ref_name.as_deref()),
        (Some("acme/lib"), Some("v1.2"))
    );
}

const CONTAINER: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn proc_in_cgroup(root: &Path, pid: u32, cgroup: Option<&str>, cpuset: Option<&str>) {
    write_proc(
        root,
        &FakeProc {
            pid,
            ppid: 1,
            start: 1,
            env: &[],
            args: &["x"],
            exe: "/x",
        },
    );
    let dir = root.join(pid.to_string());
    if let Some(c) = cgroup {
        std::fs::write(dir.join("cgroup"), c).expect("cgroup");
    }
    if let Some(c) = cpuset {
        std::fs::write(dir.join("cpuset"), c).expect("cpuset");
    }
}

/// (cgroup file, cpuset file, expected cgroup_path, expected container_id).
type CgroupCase<'a> = (
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

#[test]
fn cgroup_path_and_container_id() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    let at = Attributor::new(root.to_path_buf());
    let cases: &[CgroupCase<'_>] = &[
        (
            Some("0::/system.slice/actions.runner.acme.runner-1.service\n"),
            None,
            Some("/system.slice/actions.runner.acme.runner-1.service"),
            None,
        ),
        (
            Some(&format!("0::/system.slice/docker-{CONTAINER}.scope\n")),
            None,
            Some(&format!("/system.slice/docker-{CONTAINER}.scope")),
            Some(CONTAINER),
        ),
        (
            Some(&format!("0::/actions_job/{CONTAINER}\n")),
            None,
            Some(&format!("/actions_job/{CONTAINER}")),
            Some(CONTAINER),
        ),
        (
            Some(&format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{CONTAINER}.scope\n"
            )),
            None,
            Some(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{CONTAINER}.scope"
            )),
            Some(CONTAINER),
        ),
        (
            Some(&format!("0::/kubepods/pod1/crio-{CONTAINER}\n")),
            None,
            Some(&format!("/kubepods/pod1/crio-{CONTAINER}")),
            Some(CONTAINER),
        ),
        (
            Some(&format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CONTAINER}.scope/container\n"
            )),
            None,
            Some(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CONTAINER}.scope/container"
            )),
            Some(CONTAINER),
        ),
        // Hybrid host: the container shows in the v1 hierarchies only.
        (
            Some(&format!(
                "12:memory:/docker/{CONTAINER}\n1:name=systemd:/docker/{CONTAINER}\n0::/\n"
            )),
            None,
            Some("/"),
            Some(CONTAINER),
        ),
        // Only cpuset tells (a cgroup namespace hides the path).
        (
            Some("0::/\n"),
            Some(&format!("/docker/{CONTAINER}\n")),
            Some("/"),
            Some(CONTAINER),
        ),
        (None, None, None, None),
    ];
    for (i, (cg, cs, path, id)) in cases.iter().enumerate() {
        let pid = 500 + i as u32;
        proc_in_cgroup(root, pid, *cg, *cs);
        let a = at.of(pid, 0, 0, "x");
        assert_eq!(
            (a.cgroup_path.as_deref(), a.container_id.as_deref()),
            (*path, *id),
            "case {i}: {cg:?} {cs:?}"
        );
    }
}

#[test]
fn team_comes_from_the_repository() {
    use teams::TeamRule;
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    let repos = [
        (80, "acme/app"),
        (81, "acme/infra-tf"),
        (82, "other/x"),
        (83, "Acme/Web"),
    ];
    for (pid, repo) in repos {
        let env = [("GITHUB_ACTIONS", "true"), ("GITHUB_REPOSITORY", repo)];
        write_proc(
            root,
            &FakeProc {
                pid,
                ppid: 1,
                start: 1,
                env: &env,
                args: &["x"],
                exe: "/x",
            },
        );
    }
    write_proc(
        root,
        &FakeProc {
            pid: 90,
            ppid: 1,
            start: 1,
            env: &[],
            args: &["x"],
            exe: "/x",
        },
    );
    let rules = vec![
        TeamRule {
            name: "platform".into(),
            repositories: vec!["acme/infra*".into()],
        },
        TeamRule {
            name: "web".into(),
            repositories: vec!["acme/web".into(), "acme/*".into()],
        },
    ];
    let at = Attributor::new(root.to_path_buf()).with_teams(rules);
    let team = |pid| at.of(pid, 0, 0, "x").team;
    assert_eq!(team(80).as_deref(), Some("web"));
    assert_eq!(team(81).as_deref(), Some("platform"));
    assert_eq!(team(82), None);
    assert_eq!(team(83).as_deref(), Some("web"), "case-insensitive");
    assert_eq!(team(90), None, "no repository, no team");
    assert_eq!(
        Attributor::new(root.to_path_buf()).of(80, 0, 0, "x").team,
        None,
        "no rules, no team"
    );
}

impl Attributor {
    /// `attribute` for a caller whose connect time is unknown.
    fn of(&self, pid: u32, uid: u32, cgroup_id: u64, comm: &str) -> Attribution {
        self.attribute(&Caller {
            pid,
            uid,
            cgroup_id,
            comm: comm.into(),
            connected_boot_ns: 0,
        })
    }
}
