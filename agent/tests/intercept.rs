//! The kernel programs, for real: each test creates a child cgroup, attaches
//! `Intercept` to it, and runs Python clients inside it against loopback
//! listeners playing "the agent" and "the provider". Nothing outside the
//! child cgroup is affected, and only loopback addresses are used.
//!
//! Needs root, cgroup v2 and BPF: run with `--include-ignored` as root.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use tollgate::intercept::{ConnOrigin, Intercept, InterceptSettings, cgroup2_root};

const NEEDS: &str = "needs root, cgroup v2 and BPF";

/// Connects as told and reports what it saw on stdout:
/// `peer <addr> <port>` after a TCP connect, `EPERM` / `udp-connected` for UDP,
/// `EPERM` / `udp-sent` for a datagram sent unconnected (`udp-sendto`),
/// `error <errno>` when the connect failed. A TCP client then waits for the
/// server: if it sends a byte, the client prints `again <addr> <port>` from
/// a second getpeername; then it waits for the close, so the test can
/// inspect the connection while it lives.
const CLIENT: &str = r#"
import errno, socket, sys
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
host, port, proto = sys.argv[2], int(sys.argv[3]), sys.argv[4]
kind = socket.SOCK_DGRAM if proto.startswith("udp") else socket.SOCK_STREAM
s = socket.socket(fam, kind)
s.settimeout(30)
if proto == "udp-sendto":
    try:
        s.sendto(b"quic initial", (host, port))
    except OSError as e:
        print("EPERM" if e.errno == errno.EPERM else "error %s" % errno.errorcode.get(e.errno, e.errno), flush=True)
        sys.exit(0)
    print("udp-sent", flush=True)
    sys.exit(0)
try:
    s.connect((host, port))
except OSError as e:
    print("EPERM" if e.errno == errno.EPERM else "error %s" % errno.errorcode.get(e.errno, e.errno), flush=True)
    sys.exit(0)
if proto == "udp":
    print("udp-connected", flush=True)
    sys.exit(0)
p = s.getpeername()
print("peer", p[0], p[1], flush=True)
s.sendall(b"hello")
if s.recv(1):
    # The server said something: ask again, then wait for the close.
    p = s.getpeername()
    print("again", p[0], p[1], flush=True)
    s.recv(1)
"#;

/// A child cgroup under the cgroup v2 root, removed on drop (its processes
/// are killed first), even when the test fails.
struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    fn create(tag: &str) -> ChildCgroup {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let root = cgroup2_root().unwrap_or_else(|e| panic!("{NEEDS}: {e}"));
        let path = root.join(format!(
            "tollgate-test-{tag}-{}-{}-{}",
            fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino()),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("{NEEDS}: cannot create {}: {e}", path.display()));
        ChildCgroup { path }
    }

    /// The cgroup id, as `bpf_get_current_cgroup_id()` reports it.
    fn id(&self) -> u64 {
        fs::metadata(&self.path).expect("cgroup dir").ino()
    }

    fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Removes the (empty) directory, as systemd does when a service stops;
    /// `rmdir` may fail briefly (EBUSY) just after the last process was
    /// reaped, so it is tried again for up to 10 s, as the harness's
    /// `TestCgroup` does (the kernel lets go later on a loaded host).
    fn remove_now(&self) {
        for _ in 0..500 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        fs::remove_dir(&self.path)
            .unwrap_or_else(|e| panic!("cannot remove {}: {e}", self.path.display()));
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // (Up to 10 s, as `remove_now`.)
        for _ in 0..500 {
            // Already removed (by `remove_now`).
            if !self.path.exists() {
                return;
            }
            let procs = fs::read_to_string(self.procs()).unwrap_or_default();
            if procs.trim().is_empty() && fs::remove_dir(&self.path).is_ok() {
                return;
            }
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: plain kill(2) of a process this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// "The agent": listeners on 127.0.0.1:PORT and [::1]:PORT.
struct Agent {
    v4: TcpListener,
    v6: TcpListener,
    port: u16,
}

impl Agent {
    fn bind() -> Agent {
        for _ in 0..50 {
            let v4 = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            let port = v4.local_addr().unwrap().port();
            if let Ok(v6) = TcpListener::bind(("::1", port)) {
                return Agent { v4, v6, port };
            }
        }
        panic!("no port free on both 127.0.0.1 and ::1");
    }
}

/// The system Python when there is one (a pyenv shim adds start-up time).
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A client process inside `cg`, dialing `host:port`.
fn spawn_client(cg: &ChildCgroup, family: &str, host: &str, port: u16, proto: &str) -> Child {
    let python = python();
    Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1" && exec "$2" -c "$3" "$4" "$5" "$6" "$7""#)
        .arg("sh")
        .arg(cg.procs())
        .arg(python)
        .arg(CLIENT)
        .args([family, host, &port.to_string(), proto])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh")
}

/// The client's stdout after it exits.
fn finish(mut child: Child) -> String {
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "client failed ({status}): {out}{err}");
    out.trim().to_owned()
}

/// Accepts one connection, or panics naming `what` after a generous wait
/// (this bounds a broken redirect; it does not measure speed).
/// A UDP socket bound to `addr`, with a read timeout, and its port.
fn bound_udp(addr: &str) -> (std::net::UdpSocket, u16) {
    let s = std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("udp read timeout");
    let port = s.local_addr().expect("udp local addr").port();
    (s, port)
}

fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false).unwrap();
                return (s, peer);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("expected a connection on {what}: {e}"),
        }
    }
}

fn assert_nothing_pending(listener: &TcpListener, what: &str) {
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what} got a connection from {peer} it should not have"),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Reads the client's greeting, so the connection is known to carry data.
fn read_hello(stream: &mut TcpStream) {
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).expect("client greeting");
    assert_eq!(&buf, b"hello");
}

fn attach(cg: &ChildCgroup, agent: &Agent, targets: &[SocketAddr]) -> Intercept {
    let intercept = Intercept::attach(&InterceptSettings::new(
        cg.path.clone(),
        Ipv4Addr::LOCALHOST,
        agent.port,
    ))
    .unwrap_or_else(|e| panic!("{NEEDS}: attach failed: {e}"));
    let set: BTreeSet<SocketAddr> = targets.iter().copied().collect();
    intercept.set_targets(&set).expect("set_targets");
    intercept
}

/// What a client dials and what it should see.
struct Dial<'a> {
    family: &'a str,
    host: &'a str,
    port: u16,
    /// `ConnOrigin::dst` expected.
    dst: SocketAddr,
    /// The address `getpeername()` should print.
    peername: &'a str,
}

/// One redirected connection: accepted by the agent listener, with the
/// origin and the restored peer name checked.
fn check_redirect(
    cg: &ChildCgroup,
    intercept: &Intercept,
    agent_listener: &TcpListener,
    dial: &Dial<'_>,
    lookup_as: impl Fn(SocketAddr) -> SocketAddr,
) -> ConnOrigin {
    let mut child = spawn_client(cg, dial.family, dial.host, dial.port, "tcp");
    let pid = child.id();
    let (mut stream, peer) = accept(agent_listener, "the agent listener");
    read_hello(&mut stream);
    let local = stream
        .local_addr()
        .expect("accepted socket's local address");
    let origin = intercept
        .origin(lookup_as(peer), lookup_as(local))
        .unwrap_or_else(|| panic!("no origin recorded for client {peer}"));
    // The origin stays until the agent forgets it (the client may still
    // call getpeername).
    let again = intercept.origin(peer, local).expect("origin read twice");
    assert_eq!(again.cookie, origin.cookie);
    // The accepted end is not a redirected socket.
    assert!(
        intercept.origin(local, peer).is_none(),
        "the agent's own end has no origin"
    );
    // After the agent has read the origin, the client still sees the
    // dialed address.
    stream.write_all(b"k").expect("poke the client");
    let mut lines = BufReader::new(child.stdout.as_mut().expect("client stdout")).lines();
    let mut said = Vec::new();
    for _ in 0..2 {
        said.push(lines.next().expect("a line").expect("client stdout"));
    }
    drop(lines);
    let want = |word: &str| format!("{word} {} {}", dial.peername, dial.port);
    assert_eq!(
        said,
        [want("peer"), want("again")],
        "getpeername shows the dialed address"
    );
    intercept.forget(origin.cookie);
    assert!(
        intercept.origin(peer, local).is_none(),
        "forget removes the entry"
    );
    drop(stream);
    assert_eq!(finish(child), "", "nothing more from the client");

    assert_eq!(origin.tgid, pid, "tgid is the client process: {origin:?}");
    assert_eq!(
        origin.pid, pid,
        "pid is the client's (main) thread: {origin:?}"
    );
    assert_eq!(
        origin.dst, dial.dst,
        "dst is the dialed address: {origin:?}"
    );
    assert_eq!(
        origin.cgroup_id,
        cg.id(),
        "cgroup id is the child cgroup's inode: {origin:?}"
    );
    assert!(origin.comm.starts_with("python3"), "comm: {origin:?}");
    assert_eq!(origin.uid, nix::unistd::getuid().as_raw(), "{origin:?}");
    assert_eq!(origin.gid, nix::unistd::getgid().as_raw(), "{origin:?}");
    assert_ne!(origin.cookie, 0, "{origin:?}");

    origin
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn redirects_v4_restores_peername_refuses_udp_and_fails_open() {
    let cg = ChildCgroup::create("v4");
    let agent = Agent::bind();
    let provider = TcpListener::bind("127.0.0.77:0").expect("bind 127.0.0.77");
    let provider_addr = provider.local_addr().unwrap();
    let other = TcpListener::bind("127.0.0.78:0").expect("bind 127.0.0.78");
    let other_addr = other.local_addr().unwrap();
    let port = provider_addr.port();

    let intercept = attach(&cg, &agent, &[provider_addr]);
    let before = intercept.stats();

    let dial = Dial {
        family: "4",
        host: "127.0.0.77",
        port,
        dst: provider_addr,
        peername: "127.0.0.77",
    };
    check_redirect(&cg, &intercept, &agent.v4, &dial, |p| p);
    assert_nothing_pending(&provider, "the provider listener (while redirected)");

    // A connect to an address that is not a provider is untouched.
    let child = spawn_client(&cg, "4", "127.0.0.78", other_addr.port(), "tcp");
    let (mut s, _) = accept(&other, "the non-provider listener");
    read_hello(&mut s);
    drop(s);
    assert_eq!(
        finish(child),
        format!("peer 127.0.0.78 {}", other_addr.port())
    );
    assert_nothing_pending(&agent.v4, "the agent listener (non-provider connect)");

    // UDP to a provider address is refused (QUIC falls back to TCP),
    // connected or sent to unconnected; UDP elsewhere is untouched.
    let udp = finish(spawn_client(&cg, "4", "127.0.0.77", port, "udp"));
    assert_eq!(udp, "EPERM", "UDP connect to a provider address");
    let sendto = finish(spawn_client(&cg, "4", "127.0.0.77", port, "udp-sendto"));
    assert_eq!(sendto, "EPERM", "UDP sendto a provider address");
    let (other_udp, other_udp_port) = bound_udp("127.0.0.78:0");
    let sent = finish(spawn_client(
        &cg,
        "4",
        "127.0.0.78",
        other_udp_port,
        "udp-sendto",
    ));
    assert_eq!(sent, "udp-sent", "UDP sendto a non-provider address");
    let mut buf = [0u8; 64];
    let (n, _) = other_udp.recv_from(&mut buf).expect("the datagram arrives");
    assert_eq!(&buf[..n], b"quic initial");

    // A client in another network namespace is left alone (the connect then
    // fails there: its loopback is down, and the provider is not in it).
    let netns = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1" && exec unshare -n "$2" -c "$3" 4 127.0.0.77 "$4" tcp"#)
        .arg("sh")
        .arg(cg.procs())
        .arg(python())
        .arg(CLIENT)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let netns_out = finish(netns);
    assert!(
        netns_out.starts_with("error"),
        "connect from another netns: {netns_out}"
    );

    let after = intercept.stats();
    assert_eq!(after.redirected - before.redirected, 1, "{after:?}");
    assert_eq!(after.udp_refused - before.udp_refused, 2, "{after:?}");
    assert_eq!(after.other_netns - before.other_netns, 1, "{after:?}");
    assert!(
        after.peername_restored > before.peername_restored,
        "{after:?}"
    );
    assert_eq!(after.map_errors, 0, "{after:?}");

    // Targets can be replaced live: with the provider removed, connects go direct.
    intercept
        .set_targets(&BTreeSet::new())
        .expect("set_targets(empty)");
    let child = spawn_client(&cg, "4", "127.0.0.77", port, "tcp");
    let (mut s, _) = accept(&provider, "the provider listener (no longer a target)");
    read_hello(&mut s);
    drop(s);
    assert_eq!(finish(child), format!("peer 127.0.0.77 {port}"));

    // Fail-open: once the agent's Intercept is gone, connects go direct.
    intercept
        .set_targets(&BTreeSet::from([provider_addr]))
        .expect("set_targets");
    drop(intercept);
    let child = spawn_client(&cg, "4", "127.0.0.77", port, "tcp");
    let (mut s, _) = accept(&provider, "the provider listener (after detach)");
    read_hello(&mut s);
    drop(s);
    assert_eq!(finish(child), format!("peer 127.0.0.77 {port}"));
    assert_nothing_pending(&agent.v4, "the agent listener (after detach)");
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn redirects_v6() {
    let cg = ChildCgroup::create("v6");
    let agent = Agent::bind();
    let provider = TcpListener::bind("[::1]:0").expect("bind [::1]");
    let provider_addr = provider.local_addr().unwrap();
    let intercept = attach(&cg, &agent, &[provider_addr]);

    let dial = Dial {
        family: "6",
        host: "::1",
        port: provider_addr.port(),
        dst: provider_addr,
        peername: "::1",
    };
    check_redirect(&cg, &intercept, &agent.v6, &dial, |p| p);
    assert_nothing_pending(&provider, "the provider listener");
    assert_nothing_pending(&agent.v4, "the IPv4 agent listener");

    let port = provider_addr.port().to_string();
    let before = intercept.stats().udp_refused;
    let sendto = finish(spawn_client(
        &cg,
        "6",
        "::1",
        provider_addr.port(),
        "udp-sendto",
    ));
    assert_eq!(sendto, "EPERM", "UDP sendto [::1]:{port}");
    assert_eq!(intercept.stats().udp_refused - before, 1);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn redirects_v4_mapped_from_a_v6_socket() {
    let cg = ChildCgroup::create("mapped");
    let agent = Agent::bind();
    let provider = TcpListener::bind("127.0.0.77:0").expect("bind 127.0.0.77");
    let provider_addr = provider.local_addr().unwrap();
    let intercept = attach(&cg, &agent, &[provider_addr]);

    // An AF_INET6 socket dials ::ffff:127.0.0.77; it lands on the IPv4
    // listener, and the proxy may look it up in either form.
    let as_mapped = |p: SocketAddr| match p {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        v6 => v6,
    };
    let dial = Dial {
        family: "6",
        host: "::ffff:127.0.0.77",
        port: provider_addr.port(),
        dst: provider_addr,
        peername: "::ffff:127.0.0.77",
    };
    check_redirect(&cg, &intercept, &agent.v4, &dial, as_mapped);
    assert_nothing_pending(&provider, "the provider listener");
    assert_nothing_pending(&agent.v6, "the IPv6 agent listener");

    // The same address in a datagram from an AF_INET6 socket is refused.
    let sendto = finish(spawn_client(
        &cg,
        "6",
        "::ffff:127.0.0.77",
        provider_addr.port(),
        "udp-sendto",
    ));
    assert_eq!(sendto, "EPERM", "UDP sendto ::ffff:127.0.0.77");
}

/// systemd removes a service's cgroup when the service stops and makes a
/// new one when it starts (an ephemeral runner's, after every job); the
/// kernel drops the programs with the old cgroup. `follow_cgroup` attaches
/// them to the new one at the same path.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_cgroup_removed_and_created_again_is_intercepted_again() {
    use tollgate::intercept::CgroupChange;
    let cg = ChildCgroup::create("recreated");
    let agent = Agent::bind();
    let provider = TcpListener::bind("127.0.0.77:0").expect("bind 127.0.0.77");
    let provider_addr = provider.local_addr().unwrap();
    let port = provider_addr.port();
    let intercept = attach(&cg, &agent, &[provider_addr]);
    let redirected = |what: &str| {
        let child = spawn_client(&cg, "4", "127.0.0.77", port, "tcp");
        let (mut s, _) = accept(&agent.v4, what);
        read_hello(&mut s);
        drop(s);
        assert_eq!(finish(child), format!("peer 127.0.0.77 {port}"));
        assert_nothing_pending(&provider, "the provider listener");
    };
    redirected("the agent listener (first cgroup)");
    assert!(matches!(intercept.follow_cgroup(), CgroupChange::Unchanged));

    let old_id = cg.id();
    cg.remove_now();
    assert!(matches!(intercept.follow_cgroup(), CgroupChange::Gone));
    assert!(matches!(intercept.follow_cgroup(), CgroupChange::Unchanged));
    fs::create_dir(&cg.path).expect("create the cgroup again");
    assert_ne!(cg.id(), old_id, "a new cgroup");

    // Before the agent looks, the new cgroup has no programs: connects go
    // to the provider.
    let child = spawn_client(&cg, "4", "127.0.0.77", port, "tcp");
    let (mut s, _) = accept(&provider, "the provider (new cgroup, not yet attached)");
    read_hello(&mut s);
    drop(s);
    assert_eq!(finish(child), format!("peer 127.0.0.77 {port}"));

    match intercept.follow_cgroup() {
        CgroupChange::Reattached => {}
        other => panic!("expected the programs on the new cgroup: {other:?}"),
    }
    redirected("the agent listener (new cgroup)");
    assert!(matches!(intercept.follow_cgroup(), CgroupChange::Unchanged));
}

/// The agent's follower attaches to a cgroup created anew as its directory
/// appears (an inotify watch on the parent), not at its next look: with
/// looks an hour apart, the new cgroup is still intercepted.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_cgroup_created_again_is_attached_to_as_it_appears() {
    let cg = ChildCgroup::create("watched");
    let agent = Agent::bind();
    let provider = TcpListener::bind("127.0.0.77:0").expect("bind 127.0.0.77");
    let provider_addr = provider.local_addr().unwrap();
    let port = provider_addr.port();
    let intercept = std::sync::Arc::new(attach(&cg, &agent, &[provider_addr]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let follow = {
        let _in_rt = rt.enter();
        tollgate::intercept::spawn_cgroup_follow(intercept.clone(), Duration::from_secs(3600), stop)
    };
    let driver = thread::spawn(move || rt.block_on(follow));
    let attached_to = |id: Option<u64>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while intercept.attached_cgroup_id() != id && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        intercept.attached_cgroup_id() == id
    };
    assert!(attached_to(Some(cg.id())));
    cg.remove_now();
    assert!(attached_to(None), "the removal was not noticed");
    fs::create_dir(&cg.path).expect("create the cgroup again");
    assert!(
        attached_to(Some(cg.id())),
        "the new cgroup was not attached to as it appeared"
    );
    let child = spawn_client(&cg, "4", "127.0.0.77", port, "tcp");
    let (mut s, _) = accept(&agent.v4, "the agent listener (new cgroup)");
    read_hello(&mut s);
    drop(s);
    assert_eq!(finish(child), format!("peer 127.0.0.77 {port}"));
    assert_nothing_pending(&provider, "the provider listener");
    stop_tx.send(true).expect("stop");
    driver.join().expect("follower").expect("follower task");
}

/// A service's cgroup that does not exist when the agent starts (the
/// runner has not started yet): attaching waits for it.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_cgroup_that_does_not_exist_yet_is_attached_once_created() {
    use tollgate::intercept::CgroupChange;
    let cg = ChildCgroup::create("not-yet");
    cg.remove_now();
    let agent = Agent::bind();
    let provider = TcpListener::bind("127.0.0.77:0").expect("bind 127.0.0.77");
    let provider_addr = provider.local_addr().unwrap();
    let port = provider_addr.port();
    let intercept = attach(&cg, &agent, &[provider_addr]);
    assert!(matches!(intercept.follow_cgroup(), CgroupChange::Unchanged));
    fs::create_dir(&cg.path).expect("create the cgroup");
    match intercept.follow_cgroup() {
        CgroupChange::Reattached => {}
        other => panic!("expected the programs on the new cgroup: {other:?}"),
    }
    let child = spawn_client(&cg, "4", "127.0.0.77", port, "tcp");
    let (mut s, _) = accept(&agent.v4, "the agent listener");
    read_hello(&mut s);
    drop(s);
    assert_eq!(finish(child), format!("peer 127.0.0.77 {port}"));
    assert_nothing_pending(&provider, "the provider listener");

    // A path whose parent is no cgroup cannot become one: refused.
    let err = Intercept::attach(&InterceptSettings::new(
        PathBuf::from("/nonexistent/tollgate-test"),
        Ipv4Addr::LOCALHOST,
        agent.port,
    ))
    .expect_err("a path that cannot become a cgroup");
    assert!(
        err.to_string().contains("/nonexistent/tollgate-test"),
        "{err}"
    );
}

/// A full set of addresses can be replaced by another full set (a
/// refresh near the bound: the stale ones must go before the new come in):
/// then an address of the new set is redirected, and one of the old set
/// only goes direct.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_full_target_set_is_replaced_by_another() {
    let cg = ChildCgroup::create("full");
    let agent = Agent::bind();
    // An address of the old set, where a connection that goes direct lands;
    // every address of both sets has its port.
    let old = TcpListener::bind("127.201.0.5:0").expect("bind 127.201.0.5");
    let port = old.local_addr().unwrap().port();
    let set = |base: u8| -> BTreeSet<SocketAddr> {
        (0..agent_common::MAX_TARGETS)
            .map(|i| {
                let ip = Ipv4Addr::new(127, base, (i >> 8) as u8, i as u8);
                SocketAddr::from((ip, port))
            })
            .collect()
    };
    let intercept = attach(&cg, &agent, &[]);
    intercept.set_targets(&set(201)).expect("a full set");
    intercept
        .set_targets(&set(202))
        .expect("another full set in its place");
    let dial = Dial {
        family: "4",
        host: "127.202.0.5",
        port,
        dst: SocketAddr::from((Ipv4Addr::new(127, 202, 0, 5), port)),
        peername: "127.202.0.5",
    };
    check_redirect(&cg, &intercept, &agent.v4, &dial, |p| p);
    let child = spawn_client(&cg, "4", "127.201.0.5", port, "tcp");
    let (mut s, _) = accept(&old, "an address of the old set (direct)");
    read_hello(&mut s);
    drop(s);
    assert_eq!(finish(child), format!("peer 127.201.0.5 {port}"));
    assert_nothing_pending(&agent.v4, "the agent listener (an old address)");
}

/// The agent's own connects are left alone, UDP included: glibc ranks the
/// addresses of the agent's lookups with UDP connects (nothing is sent),
/// which are not a job's QUIC and are not counted as refused.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn the_agents_own_connects_pass_udp_included() {
    let cg = ChildCgroup::create("self");
    let agent = Agent::bind();
    let provider = TcpListener::bind("127.0.0.77:0").expect("bind 127.0.0.77");
    let provider_addr = provider.local_addr().unwrap();
    let port = provider_addr.port();
    // "The agent": a process in the cgroup that waits for a line, then
    // connects over UDP and TCP.
    let script = r#"
import socket, sys
sys.stdin.readline()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.connect(("127.0.0.77", int(sys.argv[1])))
    print("udp-connected", flush=True)
except OSError as e:
    print("udp", e.errno, flush=True)
t = socket.create_connection(("127.0.0.77", int(sys.argv[1])), timeout=30)
print("peer", *t.getpeername(), flush=True)
t.sendall(b"hello")
t.recv(1)
"#;
    let mut me = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$1" && exec "$2" -c "$3" "$4""#)
        .arg("sh")
        .arg(cg.procs())
        .arg(python())
        .arg(script)
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let intercept = Intercept::attach(&InterceptSettings {
        agent_pid: me.id(),
        ..InterceptSettings::new(cg.path.clone(), Ipv4Addr::LOCALHOST, agent.port)
    })
    .unwrap_or_else(|e| panic!("{NEEDS}: attach failed: {e}"));
    intercept
        .set_targets(&BTreeSet::from([provider_addr]))
        .expect("set_targets");
    let before = intercept.stats();
    me.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let (mut s, _) = accept(&provider, "the provider (the agent's own connect)");
    read_hello(&mut s);
    drop(s);
    assert_eq!(
        finish(me),
        format!("udp-connected\npeer 127.0.0.77 {port}"),
        "the agent's UDP connect and TCP connect go where they were sent"
    );
    assert_nothing_pending(&agent.v4, "the agent listener");
    let after = intercept.stats();
    assert_eq!(after.udp_refused, before.udp_refused, "{after:?}");
    assert_eq!(after.agent_self - before.agent_self, 1, "{after:?}");
    assert_eq!(after.redirected, before.redirected, "{after:?}");
}
