//! `tollgate top` and its control socket: the snapshot protocol against a
//! real server on a temporary socket, `top --once` as a script sees it, and
//! the interactive view read back from a tmux screen.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tollgate::control::client::{Connection, snapshot};
use tollgate::control::protocol::Request;
use tollgate::control::{ControlConfig, ControlServer, LiveState};
use tollgate::meter::{Attribution, RecordSink, Usage, UsageRecord};

/// A control server on a temporary socket, stopped on drop.
struct Server {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    live: Arc<LiveState>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    rt: tokio::runtime::Runtime,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/control.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let live = Arc::new(LiveState::new());
        let server = ControlServer::bind(&ControlConfig {
            socket: socket.clone(),
        })
        .expect("bind the control socket");
        let (stop, rx) = tokio::sync::watch::channel(false);
        let l = live.clone();
        let task = rt.spawn(async move {
            server.run(l, rx).await.expect("control server");
        });
        Server {
            _dir: dir,
            socket,
            live,
            stop,
            task: Some(task),
            rt,
        }
    }

    fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            self.rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), t).await })
                .expect("the server stops within 10 s")
                .expect("the server task did not panic");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn who(pid: u32, exe: &str, repo: &str, job: &str) -> Attribution {
    Attribution {
        pid,
        comm: "comm".into(),
        exe: Some(exe.into()),
        repository: Some(repo.into()),
        job: Some(job.into()),
        run_id: Some("4711".into()),
        ..Attribution::default()
    }
}

fn rec(w: &Attribution, input: u64, output: u64, cost: Option<f64>, status: u16) -> UsageRecord {
    UsageRecord {
        provider: "openai".into(),
        model: Some("gpt-4o".into()),
        status,
        usage: Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        },
        cost_usd: cost,
        who: w.clone().into(),
        ..UsageRecord::default()
    }
}

/// Two processes of one job, one of another; one request still running.
fn feed(live: &Arc<LiveState>) -> tollgate::control::InFlight {
    let py = who(4242, "/usr/bin/python3.12", "acme/app", "test");
    let node = who(4343, "/usr/local/bin/node", "acme/app", "test");
    let curl = who(4444, "/usr/bin/curl", "acme/lib", "lint");
    live.submit(rec(&py, 1000, 200, Some(0.75), 200).into());
    live.submit(rec(&py, 500, 100, Some(0.25), 200).into());
    live.submit(rec(&node, 300, 0, None, 429).into());
    live.submit(rec(&curl, 0, 0, None, 0).into());
    live.handle()
        .request_started(&std::sync::Arc::new(py.clone()))
}

#[test]
fn snapshot_protocol() {
    let mut server = Server::start();
    let running = feed(&server.live);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&server.socket)
            .expect("socket exists")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let s = snapshot(&server.socket).expect("one snapshot");
    assert_eq!(s.version, 1);
    assert_eq!(s.agent.pid, std::process::id());
    assert_eq!(s.window_secs, 10);
    let t = &s.totals;
    assert_eq!(
        (t.requests, t.in_flight, t.input_tokens, t.output_tokens),
        (4, 1, 1800, 300)
    );
    assert_eq!(t.tokens_per_sec, 210.0, "2100 tokens over the 10 s window");
    assert_eq!((t.cost_usd, t.unpriced, t.errors), (1.0, 2, 2));

    assert_eq!(s.processes.len(), 3);
    let p = &s.processes[0];
    assert_eq!((p.pid, p.exe.as_str()), (4242, "/usr/bin/python3.12"));
    assert_eq!(
        (p.repository.as_deref(), p.job.as_deref()),
        (Some("acme/app"), Some("test"))
    );
    assert_eq!((p.agg.requests, p.agg.in_flight, p.agg.errors), (2, 1, 0));
    assert_eq!((p.agg.tokens_per_sec, p.agg.cost_usd), (180.0, 1.0));
    let node = s
        .processes
        .iter()
        .find(|p| p.pid == 4343)
        .expect("node row");
    assert_eq!((node.agg.errors, node.agg.unpriced), (1, 1));

    assert_eq!(s.jobs.len(), 2);
    let j = &s.jobs[0];
    assert_eq!(
        (
            j.repository.as_deref(),
            j.job.as_deref(),
            j.run_id.as_deref()
        ),
        (Some("acme/app"), Some("test"), Some("4711"))
    );
    assert_eq!(
        (
            j.agg.requests,
            j.agg.in_flight,
            j.agg.errors,
            j.agg.cost_usd
        ),
        (3, 1, 1, 1.0)
    );

    // watch: a line at once, then one per interval, showing changes.
    let mut w = Connection::open(
        &server.socket,
        &Request::Watch {
            interval_ms: Some(100),
        },
    )
    .expect("watch");
    assert_eq!(w.next_snapshot().expect("first").totals.in_flight, 1);
    drop(running);
    let mut last = None;
    for _ in 0..50 {
        let s = w.next_snapshot().expect("next");
        if s.totals.in_flight == 0 {
            last = Some(s);
            break;
        }
    }
    let last = last.expect("the finished request shows within 50 snapshots");
    assert_eq!(last.processes[0].agg.in_flight, 0);

    // A bad request gets an error line.
    {
        use std::io::{BufRead, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&server.socket).expect("connect");
        c.write_all(b"{\"cmd\":\"budget\"}\n").expect("send");
        let mut line = String::new();
        std::io::BufReader::new(c)
            .read_line(&mut line)
            .expect("reply");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["version"], 1);
        assert!(
            v["error"].as_str().unwrap_or("").contains("watch"),
            "{line}"
        );
    }

    // Shutdown closes watchers and removes the socket.
    // (A snapshot sent on the last tick before the stop may still be read.)
    server.stop();
    let mut after_stop = 0;
    while w.next_snapshot().is_ok() {
        after_stop += 1;
        assert!(after_stop < 5, "the watcher is not closed");
    }
    assert!(!server.socket.exists(), "socket removed at shutdown");
}

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The cells of the first line of `text` whose first cell is `first`.
fn row<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|c| c.first() == Some(&first))
        .unwrap_or_else(|| panic!("no row starting with {first} in\n{text}"))
}

#[test]
fn top_once_prints_the_rows() {
    let server = Server::start();
    let _running = feed(&server.live);
    let o = tollgate()
        .args(["top", "--once", "--socket"])
        .arg(&server.socket)
        .output()
        .expect("run tollgate top --once");
    let text = output_text(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("requests 4  in flight 1  tok/s 210  spend $1.0000*  errors 2"),
        "{text}"
    );
    assert_eq!(
        row(&text, "4242"),
        ["4242", "python3.12", "test", "1", "2", "180", "1.0000", "0"]
    );
    assert_eq!(
        row(&text, "4343"),
        ["4343", "node", "test", "0", "1", "30.0", "-", "1"]
    );
    assert_eq!(
        row(&text, "4444"),
        ["4444", "curl", "lint", "0", "1", "0.0", "-", "1"]
    );
    assert_eq!(
        row(&text, "acme/app"),
        ["acme/app", "test", "1", "3", "210", "1.0000*", "1"]
    );
    assert_eq!(
        row(&text, "acme/lib"),
        ["acme/lib", "lint", "0", "1", "0.0", "-", "1"]
    );
}

#[test]
fn top_without_an_agent_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("none.sock");
    for once in [true, false] {
        let mut c = tollgate();
        c.arg("top").arg("--socket").arg(&socket);
        if once {
            c.arg("--once");
        }
        let o = c.output().expect("run tollgate top");
        let text = output_text(&o);
        if once {
            assert_eq!(o.status.code(), Some(69), "{text}");
            assert!(
                text.contains("no tollgate agent is listening on") && text.contains("none.sock"),
                "{text}"
            );
        } else {
            // Not a terminal: says what to use instead, before connecting.
            assert_eq!(o.status.code(), Some(64), "{text}");
            assert!(text.contains("--once"), "{text}");
        }
    }
}

/// A tmux server of our own (its own socket name), killed on drop.
struct Tmux {
    name: String,
}

impl Tmux {
    fn new(n: usize) -> Tmux {
        Tmux {
            name: format!("tollgate-top-test-{}-{n}", std::process::id()),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.name, "-f", "/dev/null"]);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let o = self.cmd().args(args).output().expect("run tmux");
        assert!(o.status.success(), "tmux {args:?}: {}", output_text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn screen(&self, target: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", target])
    }

    fn query(&self, target: &str, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", target, format])
            .trim()
            .to_string()
    }

    /// Polls (bounded: 200 times 100 ms) until `pred` holds for the screen.
    fn wait_for(&self, target: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        for _ in 0..200 {
            last = self.screen(target);
            if pred(&last) {
                return last;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the screen never showed {what}; it shows:\n{last}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .arg("kill-server")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn have_tmux() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

#[test]
#[ignore = "needs tmux (cargo xtask setup installs it)"]
fn top_under_tmux_draws_and_quits_cleanly() {
    assert!(
        have_tmux(),
        "this test needs tmux, which is not installed: install it (apt-get install tmux, or cargo xtask setup)"
    );
    let server = Server::start();
    let _running = feed(&server.live);
    for (i, key) in ["q", "Escape", "C-c"].iter().enumerate() {
        // A tmux server per run: one whose last session ended may still be
        // exiting when the next one would start.
        let tmux = Tmux::new(i);
        let target = format!("top{i}");
        let command = format!(
            "{} top --socket {}; echo \"top exited with $?\"; \
             echo \"tty: $(stty -a | tr ' ;' '\\n\\n' | grep -x -e -icanon -e icanon -e -echo -e echo | tr '\\n' ' ')\"; \
             sleep 600",
            shell_quote(Path::new(env!("CARGO_BIN_EXE_tollgate"))),
            shell_quote(&server.socket)
        );
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            &target,
            "-x",
            "80",
            "-y",
            "24",
            &command,
        ]);
        let screen = tmux.wait_for(&target, "the python3.12 process row", |s| {
            s.lines().any(|l| {
                let c: Vec<&str> = l
                    .split(|ch: char| ch.is_whitespace() || ch == '│')
                    .filter(|c| !c.is_empty())
                    .collect();
                c.starts_with(&["4242", "python3.12", "test", "1", "2"])
            })
        });
        assert!(screen.contains("requests 4"), "{screen}");
        assert!(screen.contains("acme/app"), "the job table: {screen}");
        assert_eq!(tmux.query(&target, "#{alternate_on}"), "1", "{screen}");
        assert_eq!(tmux.query(&target, "#{cursor_flag}"), "0", "cursor hidden");

        tmux.run(&["send-keys", "-t", &target, key]);
        let after = tmux.wait_for(&target, "top exiting", |s| s.contains("tty: "));
        assert!(after.contains("top exited with 0"), "{key}: {after}");
        // Raw mode is off again: the line discipline is canonical and echoes.
        assert!(after.contains("tty: icanon echo"), "{key}: {after}");
        assert!(!after.contains("4242"), "the table is gone: {after}");
        assert_eq!(
            tmux.query(&target, "#{alternate_on}"),
            "0",
            "{key}: the alternate screen was left"
        );
        assert_eq!(
            tmux.query(&target, "#{cursor_flag}"),
            "1",
            "{key}: the cursor is visible again"
        );
    }
}
