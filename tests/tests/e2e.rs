//! End to end, as root: the real agent attached to a child cgroup, a TLS
//! fake provider on a loopback address, and real clients (curl, the
//! official `openai` Python SDK) inside the cgroup.
//!
//! These tests are `#[ignore]`d for plain `cargo test` because they need
//! root, cgroup v2 and BPF; `cargo xtask test` runs them with
//! `--include-ignored` when it runs as root, and says so.

use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_e2e::World;
use tollgate_e2e::client::ok;
use tollgate_e2e::world::GITHUB_ENV;

fn u(v: &Value, k: &str) -> u64 {
    v.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

const PY_SDK: &str = r#"
import json, socket, openai
c = openai.OpenAI(api_key="sk-test-PYSECRET-0123456789", max_retries=0, timeout=30)
out = {}
r = c.chat.completions.create(model="gpt-4o-mini",
    messages=[{"role": "user", "content": "say hello to the test suite"}], max_tokens=9)
out["ns"] = [r.usage.prompt_tokens, r.usage.completion_tokens]
s = c.chat.completions.create(model="gpt-4o-mini",
    messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}],
    max_tokens=12, stream=True, stream_options={"include_usage": True})
text, usage = "", None
for ch in s:
    if ch.choices:
        text += ch.choices[0].delta.content or ""
    if ch.usage:
        usage = [ch.usage.prompt_tokens, ch.usage.completion_tokens]
out["s"] = usage
out["text"] = text
sock = socket.create_connection(("api.openai.com", 443))
out["peer"] = list(sock.getpeername()[:2])
sock.close()
print(json.dumps(out))
"#;

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn openai_python_sdk_is_counted_streaming_and_not() {
    let w = World::start("pysdk", 1);
    let client = w.client(GITHUB_ENV);
    let out = ok(&client.python(PY_SDK), "python openai SDK");
    let got: Value = serde_json::from_str(out.trim()).expect("client JSON");
    assert_eq!(
        got["text"],
        "tok tok tok tok tok tok tok tok tok tok tok tok"
    );
    assert_eq!(
        got["peer"],
        serde_json::json!([w.ip.to_string(), 443]),
        "getpeername returns the dialed address"
    );

    let reported = w.fake.reported();
    let rows = w.assert_ledger_matches_provider(2);
    for row in &rows {
        assert_eq!(s(row, "provider"), "openai");
        assert_eq!(s(row, "model"), "gpt-4o-mini");
        assert_eq!(s(row, "response_model"), "gpt-4o-mini-2024-07-18");
        assert_eq!(s(row, "operation"), "chat");
        assert_eq!(u(row, "status"), 200);
        let cost = row["cost_usd"].as_f64().expect("gpt-4o-mini has a price");
        assert!(cost > 0.0 && cost < 0.01, "{row}");
        assert_eq!(s(row, "repository"), "acme/widgets");
        assert_eq!(s(row, "job"), "lint");
        assert_eq!(s(row, "workflow"), "CI");
        assert_eq!(s(row, "run_id"), "4242");
        assert_eq!(s(row, "ref"), "main");
        assert!(u(row, "pid") > 1);
        assert!(s(row, "exe").contains("python"), "{row}");
    }
    assert_eq!(
        got["ns"],
        serde_json::json!([reported[0].input_tokens, reported[0].output_tokens])
    );
    assert_eq!(
        got["s"],
        serde_json::json!([reported[1].input_tokens, reported[1].output_tokens])
    );

    // The API key never reaches the ledger, the report or the log.
    let report = w.agent.command(&["report", "--json"]);
    let table = w.agent.command(&["report"]);
    for text in [
        String::from_utf8_lossy(&report.stdout).into_owned(),
        String::from_utf8_lossy(&table.stdout).into_owned(),
        w.agent.log(),
        String::from_utf8_lossy(&w.agent.ledger_raw()).into_owned(),
    ] {
        assert!(!text.contains("PYSECRET"), "secret leaked: {text}");
    }
    assert!(
        String::from_utf8_lossy(&w.agent.ledger_raw()).contains("acme/widgets"),
        "the scanned ledger bytes hold the rows"
    );
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("acme/widgets") && table.contains("gpt-4o-mini"),
        "{table}"
    );
    // A repository named in another case matches nothing, and the
    // report says which name would.
    let other = w.agent.command(&["report", "--repository", "ACME/Widgets"]);
    let other = String::from_utf8_lossy(&other.stdout);
    assert!(
        other.contains("no requests match these filters")
            && other.contains(r#"--repository "acme/widgets" is in the ledger"#),
        "{other}"
    );
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn curl_is_counted_and_attributed_through_a_parent() {
    let w = World::start("curl", 2);
    let client = w.client(GITHUB_ENV);
    // curl runs with an empty environment: the CI variables are found on
    // its parent shell.
    let script = r#"env -i CURL_CA_BUNDLE="$CURL_CA_BUNDLE" curl -sS --fail-with-body \
        -H 'Authorization: Bearer sk-test-CURLSECRET-99' -H 'Content-Type: application/json' \
        -d '{"model":"gpt-4o","messages":[{"role":"user","content":"a b c d"}],"max_tokens":4}' \
        https://api.openai.com/v1/chat/completions; rc=$?; exit $rc"#;
    let out = ok(&client.run(&["sh", "-c", script]), "curl");
    let body: Value = serde_json::from_str(&out).expect("JSON from curl");
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0];
    assert_eq!(u(row, "input_tokens"), u(&body["usage"], "prompt_tokens"));
    assert_eq!(u(row, "output_tokens"), 4);
    assert_eq!(row["streaming"], false);
    assert!(s(row, "exe").ends_with("curl"), "{row}");
    assert_eq!(s(row, "repository"), "acme/widgets");
    assert_eq!(s(row, "ci_system"), "github-actions");
    // The key was on curl's command line: the row keeps the command
    // line, redacted, and the key is in no log, row or ledger byte.
    let cmdline = s(row, "cmdline");
    assert!(
        cmdline.contains("Authorization: [REDACTED]") || cmdline.contains("Bearer [REDACTED]"),
        "{cmdline}"
    );
    assert!(!cmdline.contains("CURLSECRET"), "{cmdline}");
    assert!(!w.agent.log().contains("CURLSECRET"));
    let raw = String::from_utf8_lossy(&w.agent.ledger_raw()).into_owned();
    assert!(
        raw.contains("acme/widgets"),
        "the scanned bytes hold the row"
    );
    assert!(!raw.contains("CURLSECRET"), "the key reached the ledger");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_listener_on_another_loopback_address_is_where_the_kernel_sends_jobs() {
    // Any 127.0.0.0/8 address is a valid `proxy.listen`; the redirect must
    // follow it (it once always pointed at 127.0.0.1).
    let listen_ip = tollgate_e2e::provider_ip(200);
    let listen = format!("{listen_ip}:0");
    let w = World::start_full(
        "listen",
        11,
        String::new(),
        &[b"h2", b"http/1.1"],
        false,
        Some(&listen),
    );
    assert!(
        w.agent
            .log()
            .contains(&format!("\"listen\":\"{listen_ip}:{}\"", w.agent.port)),
        "ready line names the configured address: {}",
        w.agent.log()
    );
    let client = w.client(GITHUB_ENV);
    let script = r#"curl -sS --fail-with-body -H 'Authorization: Bearer sk-test-LISTEN-1' \
        -H 'Content-Type: application/json' \
        -d '{"model":"gpt-4o","messages":[{"role":"user","content":"a b c"}],"max_tokens":3}' \
        https://api.openai.com/v1/chat/completions"#;
    let out = ok(&client.run(&["sh", "-c", script]), "curl");
    let body: Value = serde_json::from_str(&out).expect("JSON from curl");
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(
        u(&rows[0], "input_tokens"),
        u(&body["usage"], "prompt_tokens")
    );
}

/// Python's urllib (the bundle from `trust env`), one chat completion of 3
/// tokens with `key`.
fn urllib_chat(key: &str) -> String {
    format!(
        r#"
import json, urllib.request
req = urllib.request.Request("https://api.openai.com/v1/chat/completions",
    data=json.dumps({{"model": "gpt-4o", "messages": [{{"role": "user", "content": "x"}}], "max_tokens": 3}}).encode(),
    headers={{"Content-Type": "application/json", "Authorization": "Bearer {key}"}})
print(urllib.request.urlopen(req, timeout=30).read().decode())
"#
    )
}

const CURL_CHAT: &str = r#"curl -sS --fail-with-body -H 'Authorization: Bearer sk-test-UNTRUSTED-1' \
    -H 'Content-Type: application/json' \
    -d '{"model":"gpt-4o","messages":[{"role":"user","content":"a b"}],"max_tokens":2}' \
    https://api.openai.com/v1/chat/completions"#;

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_client_that_rejects_the_agent_ca_is_passed_through_after_its_first_try() {
    let w = World::start("untrusted", 12);
    // curl with a root store that has the provider's CA but not the agent's.
    let own_roots = w.client_without_agent_ca(GITHUB_ENV);
    let first = own_roots.run(&["sh", "-c", CURL_CHAT]);
    assert_eq!(
        first.status.code(),
        Some(60),
        "curl must refuse the agent's certificate: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        w.agent.wait_for_log("does not trust the tollgate CA"),
        "{}",
        w.agent.log()
    );
    // Its next connection goes to the provider untouched, and works.
    let out = ok(
        &own_roots.run(&["sh", "-c", CURL_CHAT]),
        "curl, passed through",
    );
    let body: Value = serde_json::from_str(&out).expect("JSON from the provider");
    assert_eq!(u(&body["usage"], "completion_tokens"), 2);
    // The same program in another job is still intercepted (and, not
    // trusting the CA either, fails its first try): one job cannot switch
    // metering off for the others.
    let other_job: Vec<(&str, &str)> = GITHUB_ENV
        .iter()
        .map(|&(k, v)| (k, if k == "GITHUB_RUN_ID" { "4343" } else { v }))
        .collect();
    let other = w.client_without_agent_ca(&other_job);
    let refused = other.run(&["sh", "-c", CURL_CHAT]);
    // 60: curl could not verify the certificate (the agent's), not
    // another failure.
    assert_eq!(
        refused.status.code(),
        Some(60),
        "another job's curl is intercepted: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // Passed-through requests are not metered; a client that trusts the CA
    // still is (another executable).
    let trusting = w.client(GITHUB_ENV);
    ok(
        &trusting.python(&urllib_chat("sk-test-TRUSTING-1")),
        "python",
    );
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert!(s(&rows[0], "exe").contains("python"), "{:#?}", rows[0]);
    assert!(!w.agent.log().contains("UNTRUSTED-1"));
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_client_interrupted_in_the_handshake_is_still_metered_next_time() {
    let w = World::start("hsabort", 13);
    let client = w.client(GITHUB_ENV);
    // A ClientHello, the first byte of the agent's answer, then a hang-up:
    // what an interrupted client looks like to the agent.
    ok(
        &client.python(
            r#"
import socket, ssl
ctx = ssl.create_default_context()
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname="api.openai.com")
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
s = socket.create_connection(("api.openai.com", 443))
s.sendall(out.read())
s.settimeout(10)
assert s.recv(1)
s.close()
"#,
        ),
        "python hang-up",
    );
    assert!(
        w.agent.wait_for_log("client hung up in the TLS handshake"),
        "{}",
        w.agent.log()
    );
    // The same executable, trusting the CA: intercepted and metered.
    ok(
        &client.python(&urllib_chat("sk-test-HANGUP-1")),
        "python request",
    );
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(u(&rows[0], "output_tokens"), 3);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn non_provider_sni_is_passed_through_undecrypted() {
    let mut w = World::start("passthru", 3);
    let client = w.client(&[]);
    let ca = w.pki.ca_path();
    let ca = ca.to_str().unwrap();
    // Trusting only the upstream's test CA: example.test reaches the fake
    // provider untouched, so its certificate verifies...
    let out = client.run(&[
        "curl",
        "-sS",
        "--cacert",
        ca,
        "https://example.test/v1/models",
    ]);
    let body = ok(&out, "curl example.test");
    assert!(body.contains("\"sni\":\"example.test\""), "{body}");
    // ...while api.openai.com on the same address is intercepted, so the
    // same trust fails (the leaf comes from the tollgate CA).
    let out = client.run(&[
        "curl",
        "-sS",
        "--cacert",
        ca,
        "https://api.openai.com/v1/models",
    ]);
    // curl's 60: the peer's certificate did not verify (it is the
    // agent's), not a refused or broken connection.
    assert_eq!(
        out.status.code(),
        Some(60),
        "provider SNI must be intercepted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was metered: stopped, the agent has written every record.
    let status = w.agent.terminate().expect("agent was running");
    assert!(status.success(), "{status}; log:\n{}", w.agent.log());
    let rows = w.agent.report_json();
    assert!(rows.is_empty(), "{rows:#?}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn connection_without_origin_is_refused() {
    let w = World::start("noorigin", 4);
    // This test process is not in the cgroup: its connection to the
    // listener has no origin record.
    let ca_pem =
        std::fs::read(w.agent.state_dir.path().join("state/ca/ca.crt")).expect("CA written by run");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let res = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", w.agent.port))
            .await
            .expect("connect");
        let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        tokio::time::timeout(
            Duration::from_secs(20),
            conn.connect("api.openai.com".try_into().unwrap(), tcp),
        )
        .await
    });
    match res {
        Ok(Ok(_)) => panic!("the agent served a connection without an origin record"),
        Ok(Err(_)) => {}
        Err(_) => panic!("the agent neither served nor closed the connection"),
    }
    assert!(w.fake.reported().is_empty());
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn sigkill_fails_open() {
    let mut w = World::start("sigkill", 5);
    let env = w.agent.trust_env();
    let tollgate_ca = env
        .iter()
        .find(|(k, _)| k == "NODE_EXTRA_CA_CERTS")
        .map(|(_, v)| v.clone())
        .expect("NODE_EXTRA_CA_CERTS");
    let client = w.client(&[]);
    let upstream_ca = w.pki.ca_path().to_str().unwrap().to_string();
    let get = |ca: &str| {
        client.run(&[
            "curl",
            "-sS",
            "--cacert",
            ca,
            "https://api.openai.com/v1/models",
        ])
    };
    ok(
        &get(&tollgate_ca),
        "intercepted curl trusting the tollgate CA",
    );
    // curl's 60: a certificate the provider's CA did not sign (the agent's).
    let out = get(&upstream_ca);
    assert_eq!(
        out.status.code(),
        Some(60),
        "intercepted while the agent runs: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    w.agent.kill9();
    // The kernel dropped the links with the process: connections go direct.
    ok(&get(&upstream_ca), "direct curl after SIGKILL");
    let out = get(&tollgate_ca);
    assert_eq!(
        out.status.code(),
        Some(60),
        "no interception after SIGKILL (the provider's own certificate): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A harness killed mid-test (a CI timeout) runs no `Drop`: the agent a
/// test started must not outlive the test's thread, or every timeout
/// leaves an agent running on the runner.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn an_agent_does_not_outlive_the_test_thread_that_started_it() {
    use tollgate_e2e::agent::{Agent, AgentOptions};
    let cg = tollgate_e2e::cgroup::TestCgroup::create("orphan");
    let cgroup = cg.path().to_path_buf();
    let (pid, state) = std::thread::spawn(move || {
        let agent = Agent::start(AgentOptions {
            cgroup,
            ..Default::default()
        });
        let started = (
            agent.pid().expect("running") as i32,
            agent.state_dir.path().to_owned(),
        );
        // As if the harness died here: nothing stops it.
        std::mem::forget(agent);
        started
    })
    .join()
    .expect("the starting thread");
    // Killed or not, reaped (and the state directory removed) at the end.
    struct Reap(i32, std::path::PathBuf);
    impl Drop for Reap {
        fn drop(&mut self) {
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), 0);
            }
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let _reap = Reap(pid, state);
    // Dead: a zombie (its parent, this process, has not reaped it) or gone.
    let dead = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')))
            .unwrap_or(true)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dead() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dead(), "the agent outlived the thread that started it");
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): the agent says it is
/// ready, feeds the watchdog while it runs, and says it is stopping, with
/// how long the stop may take.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn under_systemd_the_agent_says_ready_feeds_the_watchdog_and_says_stopping() {
    use std::os::unix::net::UnixDatagram;
    use tollgate_e2e::agent::{Agent, AgentOptions};
    let cg = tollgate_e2e::cgroup::TestCgroup::create("watchdog");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).expect("the notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut agent = Agent::start(AgentOptions {
        cgroup: cg.path().to_path_buf(),
        env: vec![
            ("NOTIFY_SOCKET".into(), path.to_str().unwrap().into()),
            // 0.6 s: fed every 0.2 s.
            ("WATCHDOG_USEC".into(), "600000".into()),
        ],
        ..Default::default()
    });
    let next = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    for _ in 0..3 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    assert!(agent.terminate().expect("running").success());
    let mut rest = Vec::new();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 256];
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // Stopping, and the most the stop can take asked for: the harness's
    // 5 s drain and 90 s of records' grace and flushes.
    assert!(
        rest.contains(&"STOPPING=1\nEXTEND_TIMEOUT_USEC=95000000".to_owned()),
        "{rest:?}"
    );
}

/// An agent whose listener cannot accept (out of file descriptors: the
/// connections wait in the backlog) stops by itself once that has gone on
/// for 15 s, as for SIGTERM (draining, flushing, telling systemd), and
/// exits 69 for its supervisor to restart it.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn an_agent_that_cannot_accept_stops_to_be_restarted() {
    use std::os::unix::net::UnixDatagram;
    use tollgate_e2e::agent::{Agent, AgentOptions};
    let cg = tollgate_e2e::cgroup::TestCgroup::create("accept-fails");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).expect("the notify socket");
    let mut agent = Agent::start(AgentOptions {
        cgroup: cg.path().to_path_buf(),
        env: vec![("NOTIFY_SOCKET".into(), path.to_str().unwrap().into())],
        ..Default::default()
    });
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1");
    assert_eq!(&buf[..n], b"READY=1");
    // No new descriptor at all (a limit at the count of those open could
    // still leave holes below it). Only the soft limit moves: raising the
    // hard one needs CAP_SYS_RESOURCE, which a test host may not grant.
    let pid = agent.pid().expect("running") as i32;
    let lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: libc::RLIM_INFINITY,
    };
    let mut was = lim;
    // SAFETY: reads the test's own agent's limit, by its pid.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut was) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: was.rlim_max,
    };
    // SAFETY: sets the test's own agent's limit, by its pid.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let waiting = std::net::TcpStream::connect(("127.0.0.1", agent.port)).expect("in the backlog");
    assert!(agent.wait_for_log("accept failed"), "{}", agent.log());
    // It goes on serving (the streak may end) until 15 s of failures,
    // then stops by itself.
    let status = agent.wait_exit().expect("the agent was running");
    let log = agent.log();
    assert_eq!(status.code(), Some(69), "{status}; log:\n{log}");
    let said = log.find("the listeners have failed to accept for 15 s");
    let first = log.find("accept failed").expect("logged above");
    assert!(said.is_some_and(|s| s > first), "{log}");
    assert!(log.contains("ledger flushed; bye"), "a clean stop:\n{log}");
    // It told systemd it was stopping, with its bound.
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut told = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        told.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        told.iter()
            .any(|m| m.starts_with("STOPPING=1\nEXTEND_TIMEOUT_USEC=")),
        "{told:?}"
    );
    drop(waiting);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_sigterm_during_start_up_stops_the_agent_cleanly_once_it_is_up() {
    // The signal lands after the CA is made, before the resolver, the
    // programs and the listeners are up (the harness holds the agent there
    // with SIGSTOP while it signals). An agent that handled signals only
    // once up would die of it half-started.
    let mut w = World::start_sigterm_at("startsig", 29, "created the local CA");
    assert_eq!(
        w.agent.ready_before_sigterm,
        Some(false),
        "the signal was to land during start-up; log:\n{}",
        w.agent.log()
    );
    let status = w.agent.wait_exit().expect("agent was running");
    let log = w.agent.log();
    assert!(status.success(), "clean exit: {status}; log:\n{log}");
    let ready = log.find("\"message\":\"ready\"").expect("it came up");
    let stop = log
        .find("SIGTERM: shutting down")
        .expect("it saw the signal");
    assert!(ready < stop, "up first, then stopped; log:\n{log}");
    assert!(log.contains("ledger flushed; bye"), "{log}");
    // Its programs went with it: the provider is reached directly.
    let client = w.client(&[]);
    let upstream_ca = w.pki.ca_path().to_str().unwrap().to_string();
    ok(
        &client.run(&[
            "curl",
            "-sS",
            "--cacert",
            &upstream_ca,
            "https://api.openai.com/v1/models",
        ]),
        "direct curl after the agent stopped",
    );
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn sigterm_flushes_every_record() {
    let mut w = World::start("sigterm", 6);
    // A hang-up first: said not to reload, and the agent goes on serving
    // (by default SIGHUP would end it at once, with nothing flushed).
    let pid = w.agent.pid().expect("agent running") as i32;
    // SAFETY: a signal to the test's own agent, by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(w.agent.wait_for_log("SIGHUP: ignored"), "{}", w.agent.log());
    let client = w.client(&[]);
    let script = r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
for i in range(20):
    c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x " * i}], max_tokens=i + 1)
"#;
    ok(&client.python(script), "python loop");
    let status = w.agent.terminate().expect("agent was running");
    assert!(
        status.success(),
        "clean exit on SIGTERM: {status}; log:\n{}",
        w.agent.log()
    );
    let rows = w.agent.report_json();
    assert_eq!(rows.len(), 20, "every record flushed before exit");
    let total: u64 = rows.iter().map(|r| u(r, "output_tokens")).sum();
    assert_eq!(total, (1..=20).sum::<u64>());
}

/// Runs a stream of 400 chunks that holds after its 10th (on a gate never
/// opened: it outlives the agent's 5 s drain however slow the machine) in
/// a client in the cgroup, calls `during` once it is under way, and
/// returns what the client printed and how it ended.
fn during_a_long_stream(w: &mut World, during: impl FnOnce(&mut World)) -> std::process::Output {
    let client = w.client(&[]);
    let marker = client.dir().join("streaming");
    let hold = format!("10:{}", client.dir().join("never").display());
    let script = format!(
        r#"
import openai, pathlib
c = openai.OpenAI(api_key="sk-test", max_retries=0)
s = c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "long"}}],
    max_tokens=400, stream=True, extra_headers={{"x-fake-hold": {hold:?}}})
for i, ch in enumerate(s):
    if i == 5:
        pathlib.Path({marker:?}).write_text("yes")
"#
    );
    std::thread::scope(|sc| {
        let running = sc.spawn(|| client.python(&script));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !marker.exists() {
            assert!(Instant::now() < deadline, "the stream never started");
            std::thread::sleep(Duration::from_millis(50));
        }
        during(w);
        running.join().expect("client thread")
    })
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn sigterm_mid_stream_cuts_it_after_the_drain_and_keeps_its_record() {
    let mut w = World::start("sigstream", 10);
    let out = during_a_long_stream(&mut w, |w| {
        let status = w.agent.terminate().expect("agent was running");
        assert!(
            status.success(),
            "clean exit on SIGTERM: {status}; log:\n{}",
            w.agent.log()
        );
    });
    assert!(
        !out.status.success(),
        "the stream outlived the drain, so the client sees it cut"
    );
    let rows = w.agent.report_json();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(s(&rows[0], "error"), "agent_stopped", "{}", rows[0]);
    // No usage chunk came: what was streamed so far is counted locally.
    assert_eq!(rows[0]["estimated"], true, "{}", rows[0]);
    let out = u(&rows[0], "output_tokens");
    assert!((5..400).contains(&out), "{out} output tokens: {}", rows[0]);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn sigterm_mid_stream_keeps_the_record_of_an_http2_client() {
    // hyper runs each HTTP/2 stream as a task of its own, outside the
    // connection's: the agent must wait for those too before it closes
    // the ledger.
    let mut w = World::start("sigstream-h2", 36);
    let client = w.client(&[]);
    let out_file = client.dir().join("stream.txt");
    // After its 10th chunk the stream holds on a gate never opened: it
    // outlives the agent's drain however slow the machine.
    let hold = format!("x-fake-hold: 10:{}", client.dir().join("never").display());
    let body = r#"{"model":"gpt-4o-mini","max_tokens":400,"stream":true,"messages":[{"role":"user","content":"long"}]}"#;
    let out = std::thread::scope(|sc| {
        let running = sc.spawn(|| {
            client.run(&[
                "curl",
                "--http2",
                "-sS",
                "-N",
                "-o",
                out_file.to_str().expect("utf-8"),
                "-w",
                "%{http_version}",
                "-H",
                "Content-Type: application/json",
                "-H",
                "Authorization: Bearer sk-test",
                "-H",
                &hold,
                "-d",
                body,
                "https://api.openai.com/v1/chat/completions",
            ])
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_to_string(&out_file).map_or(0, |t| t.matches("data:").count()) < 6 {
            assert!(Instant::now() < deadline, "the stream never started");
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = w.agent.terminate().expect("agent was running");
        assert!(status.success(), "{status}; log:\n{}", w.agent.log());
        running.join().expect("client thread")
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2",
        "the client spoke HTTP/2: {out:?}"
    );
    let rows = w.agent.report_json();
    assert_eq!(rows.len(), 1, "{rows:#?}\n{}", w.agent.log());
    assert_eq!(s(&rows[0], "error"), "agent_stopped", "{}", rows[0]);
    assert_eq!(rows[0]["estimated"], true, "{}", rows[0]);
    let n = u(&rows[0], "output_tokens");
    assert!((5..400).contains(&n), "{n} output tokens: {}", rows[0]);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_client_that_leaves_before_the_answer_still_has_its_input_counted() {
    let w = World::start("early-hangup", 27);
    let client = w.client(&[]);
    // The client leaves once the fake provider has the whole request (the
    // test opens `leave` then), whatever the time that took; the answer's
    // head waits for a gate the test never opens.
    let leave = client.dir().join("leave");
    let script = r#"
import os, pathlib, sys, threading, time, traceback, openai
here = pathlib.Path(__file__).parent
c = openai.OpenAI(api_key="sk-test", max_retries=0, timeout=600)
def ask():
    try:
        c.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
            messages=[{"role": "user", "content": "summarise this: " + "lorem ipsum dolor " * 300}],
            extra_headers={"x-fake-hold-head": str(here / "answer")})
        print("answered before the client left", file=sys.stderr)
    except Exception:
        traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
threading.Thread(target=ask, daemon=True).start()
while not (here / "leave").exists():
    time.sleep(0.02)
# Gone at once, without closing anything first (as a killed job).
os._exit(0)
"#;
    let out = std::thread::scope(|sc| {
        let running = sc.spawn(|| client.python(script));
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.fake.requests() == 0 && !running.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let arrived = w.fake.requests() == 1;
        std::fs::write(&leave, "").expect("leave");
        let out = running.join().expect("client thread");
        assert!(arrived, "the request never reached the provider: {out:?}");
        out
    });
    ok(&out, "python early hang-up");
    let rows = w.agent.wait_for_records(1);
    let r = &rows[0];
    assert_eq!(s(r, "error"), "client_disconnected", "{r}");
    assert_eq!(r["status"], 0, "{r}");
    // The provider had the request: its input is estimated from the body
    // (≈900 words), the output, never seen, is 0.
    assert_eq!(r["estimated"], true, "{r}");
    let input = u(r, "input_tokens");
    assert!((600..=2000).contains(&input), "{r}");
    assert_eq!(u(r, "output_tokens"), 0, "{r}");
    assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn websocket_apis_pass_through_the_agent() {
    // A WebSocket API tollgate does not meter (Realtime translation,
    // Gemini Live): the handshake goes upstream with its Upgrade headers,
    // and after the 101 the two connections are joined. The client trusts
    // only the agent's CA, so a handshake that succeeds went through the
    // agent.
    let w = World::start("websocket", 38);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
from websockets.sync.client import connect
with connect("wss://api.openai.com/v1/realtime/translations?model=gpt-realtime-translate",
        additional_headers={"Authorization": "Bearer sk-test"}, open_timeout=10) as ws:
    assert ws.recv(timeout=10) == "ready"
    for text in ("hello realtime", "x" * 70000):
        ws.send(text)
        assert ws.recv(timeout=10) == text.upper()
# Upgrade headers on an API call do not take it out of metering.
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
r = c.chat.completions.create(model="gpt-4o-mini", max_tokens=3,
    messages=[{"role": "user", "content": "still counted"}],
    extra_headers={"Upgrade": "websocket", "Connection": "Upgrade"})
assert r.usage.completion_tokens == 3, r.usage
"#,
        ),
        "python websockets through the agent",
    );
    assert!(
        w.agent.wait_for_log("upgraded connection"),
        "{}",
        w.agent.log()
    );
    // The WebSocket is not metered: the one record, written after
    // anything the WebSocket could have left, is the chat's.
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(s(&rows[0], "operation"), "chat", "{}", rows[0]);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn the_responses_api_over_a_websocket_is_metered_response_by_response() {
    // The Responses API's WebSocket mode (Codex's default) with the
    // official SDK: each response on the connection is a record, as over
    // HTTP. The second connection offers permessage-deflate (the SDK turns
    // compression off unless given a message size limit), and the fake
    // would compress everything it sends if the offer reached it: the
    // agent takes the offer out so that it can read the messages.
    let w = World::start("ws-responses", 43);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import faulthandler, openai
# A hang shows where (once, in CI, a run waited out the harness's 120 s
# with nothing on stderr).
faulthandler.dump_traceback_later(60, exit=True)
c = openai.OpenAI(api_key="sk-test-WSSECRET-0123456789", max_retries=0, timeout=30)
usage = []
def completed(conn):
    for ev in conn:
        if ev.type == "response.completed":
            usage.append((ev.response.usage.input_tokens, ev.response.usage.output_tokens))
            return
# (A handshake has taken over the library's default 10 s on a loaded CI
# host: 30 s here.)
with c.responses.connect(websocket_connection_options={"open_timeout": 30}) as conn:
    conn.response.create(model="gpt-5.4", input="first turn over the socket")
    completed(conn)
    conn.response.create(model="bad-model", input="no such model")
    for ev in conn:
        if ev.type == "error":
            break
with c.responses.connect(websocket_connection_options={"max_size": 1 << 24, "open_timeout": 30}) as conn:
    conn.response.create(model="gpt-6-sol", input="second")
    completed(conn)
    # Asked for and never answered (the fake ignores this model): the
    # client leaves first.
    conn.response.create(model="silent-model", input="left behind")
assert usage == [(8, 6), (4, 6)], usage
"#,
        ),
        "python openai responses websocket",
    );
    let reported = w.fake.reported();
    assert_eq!(reported.len(), 2, "{reported:#?}");
    let rows = w.agent.wait_for_records(4);
    assert_eq!(rows.len(), 4, "{rows:#?}");
    for (row, rep) in [&rows[0], &rows[2]].into_iter().zip(&reported) {
        tollgate_e2e::world::assert_row_matches(row, rep);
        assert_eq!(s(row, "operation"), "responses", "{row}");
        assert_eq!(s(row, "path"), "/v1/responses", "{row}");
        assert_eq!(u(row, "status"), 200, "{row}");
        assert_eq!(s(row, "service_tier"), "default", "{row}");
        assert!(row["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{row}");
        assert!(row["error"].is_null(), "{row}");
    }
    assert_eq!(s(&rows[0], "model"), "gpt-5.4");
    assert_eq!(s(&rows[2], "response_model"), "gpt-6-sol");
    assert_eq!(u(&rows[1], "status"), 404, "{}", rows[1]);
    assert_eq!(s(&rows[1], "error"), "model_not_found", "{}", rows[1]);
    assert_eq!(s(&rows[1], "model"), "bad-model");
    assert_eq!(s(&rows[3], "model"), "silent-model");
    assert_eq!(s(&rows[3], "error"), "client_disconnected", "{}", rows[3]);
    // The key stays out of the ledger and the log.
    let report = w.agent.command(&["report", "--json"]);
    for text in [
        String::from_utf8_lossy(&report.stdout).into_owned(),
        w.agent.log(),
    ] {
        assert!(!text.contains("WSSECRET"), "{text}");
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_job_that_vanishes_mid_websocket_response_has_it_cut_and_estimated() {
    // The job reads the text of a Responses API WebSocket answer and resets
    // the connection before `response.completed`. Without the agent the
    // provider would see the connection go and abandon the response; with
    // it, it must see the same (the fake abandons a response whose client
    // half-closes; its `response.completed` waits on a gate never opened,
    // so only an agent that tells it can have the record in time).
    let w = World::start("ws-leave-early", 45);
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import json, pathlib, socket, struct
from websockets.sync.client import connect
here = pathlib.Path(__file__).parent
ws = connect("wss://api.openai.com/v1/responses", open_timeout=10,
    additional_headers={"Authorization": "Bearer sk-test",
                        "x-fake-hold-finish": str(here / "never")})
ws.send(json.dumps({"type": "response.create", "model": "slow-finish",
    "input": "answer and let me leave early"}))
while json.loads(ws.recv(timeout=10))["type"] != "response.output_text.delta":
    pass
# Gone at once, as a killed job: no close frame, the connection reset
# when the process ends (a close in this thread would not wake the
# library's reader thread, which then keeps the interpreter alive).
ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
import os
os._exit(0)
"#,
        ),
        "python websocket leaving early",
    );
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}\n{}", w.agent.log());
    let r = &rows[0];
    assert_eq!(s(r, "error"), "client_disconnected", "{r}");
    assert_eq!(s(r, "model"), "slow-finish", "{r}");
    // Estimated: the input from the `response.create`, the output from
    // the text that streamed.
    assert_eq!(r["estimated"], true, "{r}");
    assert!(u(r, "input_tokens") > 0 && u(r, "output_tokens") > 0, "{r}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_request_the_provider_dropped_after_reading_has_its_input_counted() {
    // The provider read the whole request, then the connection went away
    // without an answer: it may bill the input, as when a client leaves.
    let w = World::start("upstream-reset", 37);
    let client = w.client(&[]);
    let script = r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
try:
    c.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
        messages=[{"role": "user", "content": "summarise this: " + "lorem ipsum dolor " * 300}],
        extra_headers={"x-fake-reset": "1"})
    raise SystemExit("answered")
except openai.APIStatusError as e:
    assert e.status_code == 502, e
"#;
    ok(&client.python(script), "python upstream reset");
    let rows = w.agent.wait_for_records(1);
    let r = &rows[0];
    assert_eq!(r["status"], 0, "{r}");
    // The request was sent and no answer came: an upstream HTTP failure.
    assert_eq!(s(r, "error"), "upstream_http", "{r}");
    assert_eq!(r["estimated"], true, "{r}");
    let input = u(r, "input_tokens");
    assert!((600..=2000).contains(&input), "{r}");
    assert_eq!(u(r, "output_tokens"), 0, "{r}");
    assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
}

/// The thread that accepts and holds the silent upstream's connections:
/// stopped and joined when dropped too, so that a test that fails first
/// does not leave it holding the listener and its sockets.
struct Holder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Holder {
    /// Stops the thread; how many connections it held.
    fn stop(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.thread.take().expect("running");
        thread.join().expect("holder thread")
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_client_that_leaves_while_the_agent_is_still_connecting_is_not_billed() {
    // A provider host whose address accepts TCP and never answers TLS: the
    // request cannot have reached the provider when the client gives up.
    let silent_ip = tollgate_e2e::provider_ip(30);
    let silent = std::net::TcpListener::bind((silent_ip, 443)).expect("silent listener");
    silent.set_nonblocking(true).expect("nonblocking");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = Holder {
        stop: stop.clone(),
        thread: Some(std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match silent.accept() {
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            // And what the backlog still holds.
            while let Ok((conn, _)) = silent.accept() {
                held.push(conn);
            }
            held.len()
        })),
    };
    // A bare line lands in the harness's [resolver.overrides] table.
    let w = World::start_with(
        "silent-upstream",
        31,
        format!(
            "\"silent.test\" = [\"{silent_ip}\"]\n[[providers]]\nhosts = [\"silent.test\"]\napi = \"openai\"\n"
        ),
    );
    let client = tollgate_e2e::client::Client::new(
        &w.cg,
        &[("silent.test", std::net::IpAddr::V4(silent_ip))],
        w.agent.trust_env(),
    );
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":5,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "lorem ipsum dolor ".repeat(300)
    );
    let out = client.run(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-H",
        "Content-Type: application/json",
        "-d",
        &body,
        "https://silent.test/v1/chat/completions",
    ]);
    let held = holder.stop();
    assert_eq!(out.status.code(), Some(28), "curl timed out: {out:?}");
    assert!(held >= 1, "the agent connected to the silent upstream");
    let rows = w.agent.wait_for_records(1);
    let r = &rows[0];
    assert_eq!(s(r, "error"), "client_disconnected", "{r}");
    assert_eq!(
        (r["status"].as_u64(), s(r, "model")),
        (Some(0), "gpt-4o-mini"),
        "{r}"
    );
    // Never sent: nothing was billed, so nothing is estimated.
    assert_eq!(r["estimated"], false, "{r}");
    assert_eq!((u(r, "input_tokens"), u(r, "output_tokens")), (0, 0), "{r}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_second_sigterm_cuts_the_drain_short_and_keeps_the_record() {
    let mut w = World::start("sigtwice", 28);
    during_a_long_stream(&mut w, |w| {
        let pid = w.agent.pid().expect("running") as i32;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        assert!(w.agent.wait_for_log("draining"), "{}", w.agent.log());
        unsafe { libc::kill(pid, libc::SIGTERM) };
        assert!(
            w.agent.wait_for_log("the drain is cut short"),
            "{}",
            w.agent.log()
        );
        let status = w.agent.terminate().expect("agent was running");
        assert!(status.success(), "{status}; log:\n{}", w.agent.log());
    });
    let rows = w.agent.report_json();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(s(&rows[0], "error"), "agent_stopped", "{}", rows[0]);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_stream_the_client_leaves_is_cut_upstream_and_counted_as_far_as_it_went() {
    let w = World::start("hangup", 7);
    let client = w.client(&[]);
    // The stream holds after its 5th chunk (a gate the test never opens):
    // it cannot end before the client leaves. Without the agent the
    // provider would see the client go and stop generating; through it,
    // it must see the same.
    let script = r#"
import openai, pathlib
here = pathlib.Path(__file__).parent
c = openai.OpenAI(api_key="sk-test", max_retries=0)
s = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "count"}],
    max_tokens=40, stream=True, stream_options={"include_usage": True},
    extra_headers={"x-fake-hold": "5:" + str(here / "never")})
for i, ch in enumerate(s):
    if i == 3:
        break
s.close()
"#;
    ok(&client.python(script), "python hang-up");
    assert!(
        w.agent
            .wait_for_log("the client left a stream before its end: cut upstream"),
        "{}",
        w.agent.log()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while w.fake.streams_cut() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(w.fake.streams_cut(), 1, "the provider's stream went on");
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let r = &rows[0];
    assert_eq!(s(r, "error"), "client_disconnected", "{r}");
    // The usage chunk never came: what streamed is estimated, the input
    // from the request body.
    assert_eq!(r["estimated"], true, "{r}");
    assert!(u(r, "input_tokens") > 0, "{r}");
    let out = u(r, "output_tokens");
    assert!(out > 0 && out < 40, "only what streamed: {r}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn top_shows_the_live_spend_of_the_running_agent() {
    let w = World::start("top", 8);
    let client = w.client(GITHUB_ENV);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
for _ in range(3):
    c.chat.completions.create(model="gpt-4o", max_tokens=40, messages=[{"role": "user", "content": "hi"}])
"#,
        ),
        "python",
    );
    let rows = w.agent.wait_for_records(3);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    // The spend top is to show, with its four decimals.
    let spend = format!(
        "{:.4}",
        rows.iter()
            .map(|r| r["cost_usd"].as_f64().unwrap())
            .sum::<f64>()
    );
    assert_ne!(spend, "0.0000", "{rows:#?}");
    // The live view takes each record just after the ledger does: ask
    // again (bounded) until it has all three and none in flight.
    let sock = w.agent.control_socket();
    let top = || {
        let out = w
            .agent
            .command(&["top", "--once", "--socket", sock.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = top();
    while !text.contains("requests 3  in flight 0") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        text = top();
    }
    // The totals line: "requests 3  in flight 0  tok/s R  spend $S  errors 0"
    // (the rate depends on the time, the rest does not).
    let totals: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("requests "))
        .unwrap_or_else(|| panic!("no totals line in\n{text}"))
        .split_whitespace()
        .collect();
    assert_eq!(totals.len(), 11, "{text}");
    assert_eq!(
        totals[..6],
        ["requests", "3", "in", "flight", "0", "tok/s"],
        "{text}"
    );
    assert_eq!(
        totals[7..],
        ["spend", format!("${spend}").as_str(), "errors", "0"],
        "{text}"
    );
    // The job's row and the process's: 0 in flight, 3 requests, the spend,
    // no error.
    let row = |first: &dyn Fn(&str) -> bool| -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|c| c.first().is_some_and(|c| first(c)))
            .unwrap_or_else(|| panic!("no such row in\n{text}"))
    };
    let job = row(&|c| c == "acme/widgets");
    assert_eq!(job.len(), 7, "{text}");
    assert_eq!(job[..4], ["acme/widgets", "lint", "0", "3"], "{text}");
    assert_eq!(job[5..], [spend.as_str(), "0"], "{text}");
    let process = row(&|c| c.parse::<u32>().is_ok());
    assert_eq!(process.len(), 8, "{text}");
    assert!(process[1].starts_with("python"), "{text}");
    assert_eq!(process[2..5], ["lint", "0", "3"], "{text}");
    assert_eq!(process[6..], [spend.as_str(), "0"], "{text}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn the_agent_inside_its_own_cgroup_is_not_redirected_to_itself() {
    let w = World::start_full("self", 9, String::new(), &[b"h2", b"http/1.1"], true, None);
    let procs = std::fs::read_to_string(w.cg.procs_file()).unwrap();
    let pid = w.agent.pid().expect("running").to_string();
    assert!(
        procs.lines().any(|l| l == pid),
        "agent {pid} is in the cgroup: {procs}"
    );
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
c.chat.completions.create(model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "self"}])
"#,
        ),
        "python",
    );
    w.assert_ledger_matches_provider(1);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_provider_address_that_refuses_gives_way_to_another_the_agent_resolved() {
    // The job dials an address of api.openai.com where nothing listens.
    // Without the agent its connect would be refused and it would try the
    // name's next address; redirected, its connect succeeded, so the agent
    // tries the host's other addresses itself.
    let w = World::start("refusing", 42);
    let client = w.client_dialing(&[("api.openai.com", tollgate_e2e::world::refusing_ip())]);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
r = c.chat.completions.create(model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "next"}])
assert r.usage.completion_tokens == 3, r.usage
"#,
        ),
        "python openai via a refusing address",
    );
    w.assert_ledger_matches_provider(1);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_cgroup_removed_and_created_again_is_followed_by_the_agent() {
    // What systemd does to a runner service's cgroup at each restart.
    let w = World::start("recreated", 41);
    let call = r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
c.chat.completions.create(model="gpt-4o-mini", max_tokens=3, messages=[{"role": "user", "content": "again"}])
"#;
    ok(&w.client(&[]).python(call), "python, first cgroup");
    w.agent.wait_for_records(1);
    w.cg.remove_now();
    assert!(
        w.agent
            .wait_for_log("the intercepted cgroup was removed: nothing is intercepted"),
        "{}",
        w.agent.log()
    );
    std::fs::create_dir(w.cg.path()).expect("create it again");
    assert!(
        w.agent
            .wait_for_log("the intercepted cgroup was created anew: interception attached"),
        "{}",
        w.agent.log()
    );
    ok(&w.client(&[]).python(call), "python, new cgroup");
    w.assert_ledger_matches_provider(2);
    let rows = w.agent.wait_for_records(2);
    assert!(
        rows.iter().all(|r| r["host"] == "api.openai.com"),
        "{rows:?}"
    );
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_client_that_leaves_at_the_finish_still_gets_the_providers_count() {
    // The client breaks at the chunk with `finish_reason` (a common loop),
    // before the usage chunk, which the fake holds until the test has
    // seen the agent read on: the generation is over, so reading on costs
    // the provider nothing and gives its own count.
    let w = World::start("hangup-finish", 51);
    let client = w.client(&[]);
    let script = r#"
import openai, pathlib
here = pathlib.Path(__file__).parent
c = openai.OpenAI(api_key="sk-test", max_retries=0)
s = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "count"}],
    max_tokens=5, stream=True, stream_options={"include_usage": True},
    extra_headers={"x-fake-hold": "7:" + str(here / "usage")})
for ch in s:
    if ch.choices and ch.choices[0].finish_reason:
        break
s.close()
"#;
    ok(&client.python(script), "python leaves at the finish");
    let reading = w
        .agent
        .wait_for_log("the client left before the response ended: reading the rest");
    std::fs::write(client.dir().join("usage"), "").expect("usage gate");
    assert!(reading, "{}", w.agent.log());
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let r = &rows[0];
    assert_eq!(r["estimated"], false, "the provider's own count: {r}");
    assert_eq!(u(r, "output_tokens"), 5, "{r}");
    // The client had the whole answer: leaving early lost nothing.
    assert!(r["error"].is_null(), "{r}");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_stream_whose_client_left_gives_its_body_budget_back() {
    // Room for one ≈5 KB body at a time. An Anthropic stream's client
    // leaves after the response's head, before the first event (which
    // waits on a gate never opened); the agent cuts the stream upstream,
    // records it, and gives the body's share of the budget back: the next
    // request's body fits once that record is written.
    let w = World::start_with(
        "hangup-budget",
        33,
        "proxy.max_request_body = 6000\nproxy.max_buffered_request_bytes = 8000\n".to_string(),
    );
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import json, pathlib, urllib.request
here = pathlib.Path(__file__).parent
body = {"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": True,
        "messages": [{"role": "user", "content": "word " * 1000}]}
h = {"Content-Type": "application/json", "x-api-key": "sk-ant-HANGUP-1",
     "anthropic-version": "2023-06-01",
     "x-fake-hold": "0:" + str(here / "never")}
req = urllib.request.Request("https://api.anthropic.com/v1/messages",
    data=json.dumps(body).encode(), headers=h)
urllib.request.urlopen(req, timeout=60).close()
"#,
        ),
        "python anthropic hang-up",
    );
    assert!(
        w.agent
            .wait_for_log("the client left a stream before its end: cut upstream"),
        "{}",
        w.agent.log()
    );
    // Its record (the input estimated from the body it holds till then).
    let rows = w.agent.wait_for_records(1);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    ok(
        &client.python(
            r#"
import json, urllib.request
body = {"model": "gpt-4o", "max_tokens": 10,
        "messages": [{"role": "user", "content": "word " * 1000}]}
req = urllib.request.Request("https://api.openai.com/v1/chat/completions",
    data=json.dumps(body).encode(),
    headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test-HANGUP-2"})
urllib.request.urlopen(req, timeout=60).read()
"#,
        ),
        "python openai after the hang-up",
    );
    let rows = w.agent.wait_for_records(2);
    let left = tollgate_e2e::row_with(&rows, "model", "claude-sonnet-4-5");
    assert_eq!(s(left, "error"), "client_disconnected", "{left}");
    assert!(
        u(left, "input_tokens") > 900,
        "estimated from the body: {left}"
    );
    let r = tollgate_e2e::row_with(&rows, "response_model", "gpt-4o-2024-07-18");
    assert_eq!(r["model"], "gpt-4o", "read whole, not over budget: {r}");
    assert!(
        !w.agent
            .log()
            .contains("this request's body is forwarded unparsed"),
        "{}",
        w.agent.log()
    );
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_request_past_the_body_budget_is_forwarded_unparsed_and_still_counted() {
    // Room for one ≈5 KB body at a time: a stream holds its body until it
    // ends (for a local estimate), so a second request meanwhile is over
    // the agent's budget.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let receiver = rt.block_on(tollgate_e2e::otlp_receiver::OtlpReceiver::http());
    let mut w = World::start_with(
        "budget",
        25,
        format!(
            "proxy.max_request_body = 6000\nproxy.max_buffered_request_bytes = 8000\n\
             proxy.request_body_stall_secs = 1\n\
             [export.otlp]\nendpoint = {:?}\nprotocol = \"http/protobuf\"\ninterval_secs = 1\n",
            receiver.endpoint()
        ),
    );
    let client = w.client(&[]);
    // Each stream that is to run while another request is read holds
    // after its first chunk until the script opens its gate, once that
    // request is done: no race with the stream's end.
    let script = r#"
import json, pathlib, threading, time, urllib.request
here = pathlib.Path(__file__).parent
def hold(name):
    return "1:" + str(here / name)
def release(name):
    (here / name).write_text("go")
def call(model, stream, held=None, words=1000, opened=None):
    body = {"model": model, "messages": [{"role": "user", "content": "word " * words}],
            "max_tokens": 10, "stream": stream}
    h = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-BUDGET-1"}
    if held:
        h["x-fake-hold"] = hold(held)
    req = urllib.request.Request("https://api.openai.com/v1/chat/completions",
        data=json.dumps(body).encode(), headers=h)
    resp = urllib.request.urlopen(req, timeout=60)
    # The response's head comes after the agent has read the whole body
    # and sent it on: from here the stream holds (or not) its share.
    if opened:
        opened.set()
    return resp.read().decode()
out = {}
a_open = threading.Event()
def a():
    out["a"] = call("gpt-4o-mini", True, "a", opened=a_open)
t = threading.Thread(target=a)
t.start()
try:
    assert a_open.wait(30), "stream a never answered"
    out["b"] = json.loads(call("gpt-4o", False))["usage"]
finally:
    release("a")
t.join()
out["c"] = json.loads(call("gpt-4.1", False))["usage"]
out["a"] = "[DONE]" in out["a"]
# A body over max_request_body is forwarded as it arrives and not kept:
# it does not hold the budget while its stream runs.
d_open = threading.Event()
def d():
    out["d"] = "[DONE]" in call("gpt-4.1-nano", True, "d", words=1400, opened=d_open)
t = threading.Thread(target=d)
t.start()
try:
    assert d_open.wait(30), "stream d never answered"
    out["e"] = json.loads(call("gpt-4.1-mini", False))["usage"]
finally:
    release("d")
t.join()
# An Anthropic stream reports its input tokens in its first event: from
# then on its body is not needed for an estimate and gives its share back
# (the agent reads each event before the client gets it).
started = threading.Event()
def f():
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "word " * 1000}]}
    h = {"Content-Type": "application/json", "x-api-key": "sk-ant-BUDGET-2",
         "anthropic-version": "2023-06-01", "x-fake-hold": hold("f")}
    req = urllib.request.Request("https://api.anthropic.com/v1/messages",
        data=json.dumps(body).encode(), headers=h)
    resp = urllib.request.urlopen(req, timeout=60)
    got = b""
    while b"message_start" not in got:
        line = resp.readline()
        if not line:
            break
        got += line
    started.set()
    out["f"] = "message_stop" in (got + resp.read()).decode()
t = threading.Thread(target=f)
t.start()
try:
    assert started.wait(30), "no message_start"
    out["g"] = json.loads(call("gpt-4-turbo", False))["usage"]
finally:
    release("f")
t.join()
# A body that pauses mid-way longer than request_body_stall_secs is
# forwarded as it arrives instead of held. Its rest comes once the agent
# has said so (the test opens `stalled` then).
head = b'{"model": "o3-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "'
tail = b'slow body"}]}'
def slow():
    yield head
    while not (here / "stalled").exists():
        time.sleep(0.02)
    yield tail
req = urllib.request.Request("https://api.openai.com/v1/chat/completions", data=slow(),
    headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test-BUDGET-1",
             "Content-Length": str(len(head) + len(tail))})
out["h"] = json.loads(urllib.request.urlopen(req, timeout=60).read())["usage"]
print(json.dumps(out))
"#;
    let out = std::thread::scope(|sc| {
        let running = sc.spawn(|| client.python(script));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !w.agent.log().contains(
            "request body paused longer than proxy.request_body_stall_secs: forwarded unparsed",
        ) && !running.is_finished()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(client.dir().join("stalled"), "").expect("stalled");
        running.join().expect("client thread")
    });
    let out = ok(&out, "python urllib");
    let got: Value = serde_json::from_str(out.trim()).expect("client JSON");
    assert_eq!(
        (&got["a"], &got["d"], &got["f"]),
        (&Value::Bool(true), &Value::Bool(true), &Value::Bool(true)),
        "{got}"
    );
    let rows = w.agent.wait_for_records(8);
    assert_eq!(rows.len(), 8, "{rows:#?}");
    let by = |resp| tollgate_e2e::row_with(&rows, "response_model", resp);
    // The stream and the request after it were read whole: their model
    // comes from the request.
    assert_eq!(by("gpt-4o-mini-2024-07-18")["model"], "gpt-4o-mini");
    let c = by("gpt-4.1-2024-07-18");
    assert_eq!(c["model"], "gpt-4.1");
    assert_eq!(u(c, "input_tokens"), u(&got["c"], "prompt_tokens"));
    // Read whole while an over-long body streamed: that one held nothing.
    assert_eq!(by("gpt-4.1-nano-2024-07-18")["model"], Value::Null);
    assert_eq!(by("gpt-4.1-mini-2024-07-18")["model"], "gpt-4.1-mini");
    // Read whole while an Anthropic stream ran on after its usage came.
    let f = by("claude-sonnet-4-5-20250929");
    assert_eq!(f["model"], "claude-sonnet-4-5");
    assert!(
        f["estimated"] == false && u(f, "input_tokens") > 1000,
        "{f}"
    );
    assert_eq!(by("gpt-4-turbo-2024-07-18")["model"], "gpt-4-turbo");
    // The stalled body: unparsed, counted from the response.
    let h = by("o3-mini-2024-07-18");
    assert_eq!(h["model"], Value::Null, "{h}");
    assert_eq!(u(h, "input_tokens"), u(&got["h"], "prompt_tokens"));
    // The one in between was forwarded unparsed, and counted all the same
    // from the response.
    let b = by("gpt-4o-2024-07-18");
    assert_eq!(b["model"], Value::Null, "{b}");
    assert_eq!(u(b, "input_tokens"), u(&got["b"], "prompt_tokens"));
    assert_eq!(u(b, "output_tokens"), 10);
    let log = w.agent.log();
    assert_eq!(
        log.matches("this request's body is forwarded unparsed")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("BUDGET-1") && !log.contains("BUDGET-2"));
    // Both kinds of unparsed body are counted in the agent's own metrics.
    let status = w.agent.terminate().expect("running");
    assert!(status.success(), "agent exit: {status}\n{}", w.agent.log());
    let points = receiver.latest();
    let own = |name: &str| {
        points
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.value.number())
            .unwrap_or_else(|| panic!("{name} missing: {points:#?}"))
    };
    assert_eq!(own("tollgate.requests.body_over_budget"), 1.0);
    assert_eq!(own("tollgate.requests.body_too_long"), 1.0);
    assert_eq!(own("tollgate.requests.body_stalled"), 1.0);
    drop(w);
    drop(rt);
}

/// `report` run by a user the ledger refuses says which part refused it
/// (the file's mode, or a directory on its path), without SQLite's
/// internal URI, and exits 77.
#[test]
#[ignore = "needs root (runs report as another user with setpriv)"]
fn report_names_what_refused_a_user_the_ledger() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = t.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let ledger = state.join("ledger.sqlite");
    rusqlite::Connection::open(&ledger)
        .and_then(|c| c.execute_batch("CREATE TABLE x (a INTEGER);"))
        .expect("an SQLite file");
    let config = t.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\n", state.display().to_string()),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let report = || {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(tollgate_e2e::tollgate_bin())
            .arg("--config")
            .arg(&config)
            .arg("report")
            .output()
            .expect("setpriv runs")
    };
    for (dir_mode, file_mode, says) in [
        (0o755, 0o600, "the file's owner and mode"),
        (0o700, 0o644, "a directory on its path"),
    ] {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(dir_mode)).unwrap();
        std::fs::set_permissions(&ledger, std::fs::Permissions::from_mode(file_mode)).unwrap();
        let out = report();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(77),
            "{dir_mode:o}/{file_mode:o}: {err}"
        );
        assert!(err.contains(says), "{dir_mode:o}/{file_mode:o}: {err}");
        assert!(!err.contains("file:"), "SQLite's URI: {err}");
    }
}

/// Text logs written to a pipe or a file (journald, a CI hook's log) carry
/// no terminal escape codes. `trust env` on a new state directory makes
/// the CA there and logs it.
#[test]
#[ignore = "needs root (makes a CA in a temp state directory)"]
fn text_logs_off_a_terminal_have_no_escape_codes() {
    let t = tempfile::tempdir().expect("tempdir");
    let config = t.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[log]\nformat = \"text\"\nlevel = \"info\"\n",
            t.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(tollgate_e2e::tollgate_bin())
        .arg("--config")
        .arg(&config)
        .args(["trust", "env"])
        .env_remove("NO_COLOR")
        .output()
        .expect("tollgate runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("created the local CA"), "{err}");
    assert!(!err.contains('\x1b'), "escape codes: {err:?}");
    // Output that cannot be written (a full disk, a closed pipe) exits
    // 74 with a message, not a panic (101).
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = std::process::Command::new(tollgate_e2e::tollgate_bin())
        .arg("--config")
        .arg(&config)
        .args(["trust", "env"])
        .stdout(full)
        .output()
        .expect("tollgate runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{err}");
    assert!(err.contains("cannot write the output"), "{err}");
}

/// The job-summary scripts (`deploy/github/job-completed.sh`,
/// `deploy/gitlab/spend-summary.sh`) against a real agent's ledger: the
/// job's table while the agent runs; once it is stopped, "spend unknown"
/// for a job with no rows (nothing was counting), never "no calls".
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn job_summary_scripts_tell_no_calls_from_an_agent_that_is_not_running() {
    let mut w = World::start("summary", 55);
    let client = w.client(GITHUB_ENV);
    ok(
        &client.python(tollgate_e2e::client::ONE_CHAT),
        "python client",
    );
    w.agent.wait_for_records(1);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out_dir = tempfile::tempdir().expect("tempdir");
    let config = w.agent.config_path.clone();
    // (github summary text, gitlab file text) for one run id.
    let summaries = |run: &str| -> (String, String) {
        let gh = out_dir.path().join(format!("gh-{run}.md"));
        let gl = out_dir.path().join(format!("gl-{run}.md"));
        let common = |c: &mut std::process::Command| {
            c.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("TOLLGATE", tollgate_e2e::tollgate_bin())
                .env("TOLLGATE_CONFIG", &config)
                .env("TOLLGATE_SETTLE_SECS", "0");
        };
        let mut c = std::process::Command::new("bash");
        c.arg(root.join("deploy/github/job-completed.sh"));
        common(&mut c);
        c.env("GITHUB_STEP_SUMMARY", &gh)
            .env("GITHUB_REPOSITORY", "acme/widgets")
            .env("GITHUB_RUN_ID", run)
            .env("GITHUB_JOB", "lint");
        let o = c.output().expect("job-completed.sh runs");
        assert!(o.status.success(), "{o:?}");
        let mut c = std::process::Command::new("bash");
        c.arg(root.join("deploy/gitlab/spend-summary.sh")).arg(&gl);
        common(&mut c);
        c.env("TOLLGATE_REPOSITORY", "acme/widgets")
            .env("TOLLGATE_RUN_ID", run)
            .env("TOLLGATE_JOB", "lint");
        let o = c.output().expect("spend-summary.sh runs");
        assert!(o.status.success(), "{o:?}");
        (
            std::fs::read_to_string(&gh).unwrap_or_default(),
            std::fs::read_to_string(&gl).unwrap_or_default(),
        )
    };
    for text in <[String; 2]>::from(summaries("4242")) {
        assert!(
            text.contains("LLM API spend") && text.contains("gpt-4o-mini"),
            "{text}"
        );
        assert!(!text.contains("not counted"), "{text}");
    }
    for text in <[String; 2]>::from(summaries("1")) {
        assert_eq!(text, "tollgate: no LLM API calls in this job.\n");
    }
    let status = w.agent.terminate().expect("running");
    assert!(status.success(), "agent exit: {status}\n{}", w.agent.log());
    for text in <[String; 2]>::from(summaries("2")) {
        assert_eq!(
            text,
            "tollgate: spend unknown: the tollgate agent is not running on this runner.\n"
        );
    }
    // What was recorded is still shown, and report warns that nothing is
    // counting now.
    for text in <[String; 2]>::from(summaries("4242")) {
        assert!(text.contains("gpt-4o-mini"), "{text}");
        assert!(text.contains("are not counted"), "{text}");
    }
    let o = w.agent.command(&["report"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no agent is recording to"), "{err}");
}
