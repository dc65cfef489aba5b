//! OTLP end to end: real clients through the real agent, metrics into
//! receivers built on the official opentelemetry-proto types (gRPC and
//! OTLP/HTTP). Names, units, kinds, attributes and token sums are checked
//! against the ledger. Root only (see e2e.rs).

use std::collections::BTreeMap;

use tollgate_e2e::World;
use tollgate_e2e::client::ok;
use tollgate_e2e::otlp_receiver::{Kind, OtlpReceiver, Point, Value};
use tollgate_e2e::world::GITHUB_ENV;

/// `interval_secs`: gRPC's run exports only at the end (SIGTERM's flush
/// must carry everything, the proxy's counters included, though the proxy
/// is gone by then); OTLP/HTTP's every second.
fn run(protocol: &str, n: u8, interval_secs: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let receiver = rt.block_on(async {
        if protocol == "grpc" {
            OtlpReceiver::grpc().await
        } else {
            OtlpReceiver::http().await
        }
    });
    let audit = tempfile::tempdir().unwrap();
    let audit_log = audit.path().join("usage.jsonl");
    let toml = format!(
        "[export.otlp]\nendpoint = {:?}\nprotocol = {:?}\ninterval_secs = {interval_secs}\n[export.audit_log]\npath = {:?}\n",
        receiver.endpoint(),
        protocol,
        audit_log
    );
    let mut w = World::start_with(&format!("otlp{n}"), n, toml);
    let client = w.client(GITHUB_ENV);
    ok(
        &client.python(
            r#"
import openai, anthropic
o = openai.OpenAI(api_key="sk-test-OTLPSECRET-1", max_retries=0)
o.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": "a b c"}])
for _ in o.chat.completions.create(model="gpt-4o-mini", max_tokens=7, stream=True,
        messages=[{"role": "user", "content": "d e f g"}]):
    pass
a = anthropic.Anthropic(api_key="sk-ant-test-OTLPSECRET-2", max_retries=0)
a.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=[{"role": "user", "content": "h i"}],
    tools=[{"type": "web_search_20250305", "name": "web_search"}])
# QUIC's first datagram to the provider is refused (and counted).
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"quic initial", ("api.openai.com", 443))
    raise SystemExit("UDP to the provider was not refused")
except PermissionError:
    pass
"#,
        ),
        "python clients",
    );
    // A job in a network namespace of its own (a container) dials the
    // provider: left alone (its loopback is down there, so the connect
    // fails) and counted.
    let py = tollgate_e2e::python();
    let netns = client.run(&[
        "unshare",
        "-n",
        py.to_str().expect("utf-8 python path"),
        "-c",
        r#"
import socket
s = socket.socket()
s.settimeout(10)
try:
    s.connect(("api.openai.com", 443))
    raise SystemExit("connected from an empty network namespace")
except OSError:
    pass
"#,
    ]);
    ok(&netns, "client in its own network namespace");
    let rows = w.agent.wait_for_records(3);
    assert_eq!(rows.len(), 3);
    // SIGTERM flushes the exporter before exit.
    let status = w.agent.terminate().expect("running");
    assert!(status.success(), "agent exit: {status}\n{}", w.agent.log());

    // No key the clients sent reaches an export (the metrics, their
    // transport's headers, spans) or the audit log, which do hold the rows.
    let exported = format!("{:?}{:?}", receiver.received(), receiver.spans());
    let audited = std::fs::read_to_string(&audit_log).expect("the audit log");
    for (what, text) in [("OTLP", &exported), ("audit log", &audited)] {
        assert!(text.contains("widgets"), "{what} holds the rows");
        assert!(!text.contains("OTLPSECRET"), "a key reached the {what}");
    }

    let points = receiver.latest();
    assert!(
        !points.is_empty(),
        "no metrics received; log:\n{}",
        w.agent.log()
    );
    let resource = &points[0].resource;
    assert_eq!(
        resource.get("service.name"),
        Some(&Value::Str("tollgate".into()))
    );
    assert!(resource.contains_key("host.name"), "{resource:?}");

    let usage: Vec<&Point> = points
        .iter()
        .filter(|p| p.name == "gen_ai.client.token.usage")
        .collect();
    assert!(
        !usage.is_empty(),
        "gen_ai.client.token.usage missing: {points:#?}"
    );
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for p in &usage {
        assert_eq!(p.unit, "{token}");
        assert!(matches!(p.kind, Kind::Histogram { .. }), "{p:?}");
        let a = &p.attributes;
        for key in [
            "gen_ai.operation.name",
            "gen_ai.provider.name",
            "gen_ai.request.model",
            "gen_ai.response.model",
            "server.address",
            "vcs.repository.name",
            "cicd.pipeline.name",
            "cicd.pipeline.task.name",
            "process.executable.name",
        ] {
            assert!(a.contains_key(key), "{key} missing in {a:?}");
        }
        assert!(
            !a.contains_key("process.pid"),
            "high-cardinality attribute by default: {a:?}"
        );
        assert_eq!(a["gen_ai.operation.name"].as_str(), Some("chat"));
        assert_eq!(a["cicd.pipeline.task.name"].as_str(), Some("lint"));
        assert_eq!(a["vcs.repository.name"].as_str(), Some("widgets"));
        let provider = a["gen_ai.provider.name"].as_str().unwrap().to_string();
        assert!(
            provider == "openai" || provider == "anthropic",
            "{provider}"
        );
        let ty = a["gen_ai.token.type"]
            .as_str()
            .expect("gen_ai.token.type")
            .to_string();
        *sums.entry(ty).or_default() += p.value.number().expect("histogram sum");
    }
    let ledger_sum = |k: &str| rows.iter().map(|r| r[k].as_u64().unwrap()).sum::<u64>() as f64;
    assert_eq!(
        sums.get("input"),
        Some(&ledger_sum("input_tokens")),
        "{sums:?}"
    );
    assert_eq!(
        sums.get("output"),
        Some(&ledger_sum("output_tokens")),
        "{sums:?}"
    );

    let duration: Vec<&Point> = points
        .iter()
        .filter(|p| p.name == "gen_ai.client.operation.duration")
        .collect();
    assert!(!duration.is_empty() && duration.iter().all(|p| p.unit == "s"));
    assert!(
        points
            .iter()
            .any(|p| p.name == "gen_ai.client.operation.time_to_first_chunk"),
        "streams report time to first chunk"
    );
    let cost: f64 = points
        .iter()
        .filter(|p| p.name == "tollgate.cost")
        .inspect(|p| {
            assert_eq!(p.unit, "USD");
            assert!(
                matches!(
                    p.kind,
                    Kind::Sum {
                        monotonic: true,
                        ..
                    }
                ),
                "{p:?}"
            );
        })
        .map(|p| p.value.number().unwrap())
        .sum();
    let ledger_cost: f64 = rows.iter().filter_map(|r| r["cost_usd"].as_f64()).sum();
    assert!(ledger_cost > 0.0);
    assert!(
        (cost - ledger_cost).abs() < 1e-9,
        "exported {cost} vs ledger {ledger_cost}"
    );
    // The Claude request's two web searches, as the ledger has them.
    let searches: f64 = points
        .iter()
        .filter(|p| p.name == "tollgate.web_searches")
        .inspect(|p| assert_eq!(p.unit, "{search}"))
        .map(|p| p.value.number().unwrap())
        .sum();
    assert_eq!(searches, 2.0, "{points:#?}");
    assert_eq!(searches, ledger_sum("web_searches"));
    let own = |name: &str| {
        points
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.value.number())
            .unwrap_or_else(|| {
                panic!(
                    "{name} missing: {:?}",
                    points.iter().map(|p| &p.name).collect::<Vec<_>>()
                )
            })
    };
    assert!(own("tollgate.connections.intercepted") >= 1.0);
    // The kernel programs' counts, read from the agent's own maps.
    assert_eq!(own("tollgate.connections.udp_refused"), 1.0);
    assert_eq!(own("tollgate.connections.other_netns"), 1.0);
    drop(w);
    drop(rt);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn otlp_grpc_metrics_match_the_ledger() {
    run("grpc", 21, 3600);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn otlp_http_metrics_match_the_ledger() {
    run("http/protobuf", 22, 1);
}

/// Writes a client certificate from `ca` and its key into `ca`'s dir.
fn client_identity(ca: &tollgate_e2e::pki::TestPki) -> (String, String) {
    let leaf = ca.leaf("tollgate-agent");
    let (cert, key) = (ca.path().join("client.pem"), ca.path().join("client.key"));
    std::fs::write(&cert, &leaf.cert_pem).expect("write client cert");
    std::fs::write(&key, &leaf.key_pem).expect("write client key");
    (cert.display().to_string(), key.display().to_string())
}

/// Starts an agent exporting to `receiver` (made on `rt`) with `toml` and
/// `env`, sends one chat completion, and checks that its metrics arrive;
/// gives every export's headers.
fn one_export_over_tls(
    rt: tokio::runtime::Runtime,
    receiver: &OtlpReceiver,
    (name, n): (&str, u8),
    toml: String,
    env: Vec<(String, String)>,
) -> Vec<Vec<(String, String)>> {
    let mut w = World::start_with_env(name, n, toml, env);
    let client = w.client(GITHUB_ENV);
    ok(
        &client.python(tollgate_e2e::client::ONE_CHAT),
        "python client",
    );
    let got =
        rt.block_on(receiver.wait_until(std::time::Duration::from_secs(60), |r| !r.is_empty()));
    assert!(got, "no export arrived over TLS:\n{}", w.agent.log());
    let status = w.agent.terminate().expect("running");
    assert!(status.success(), "agent exit: {status}\n{}", w.agent.log());
    assert!(
        receiver
            .points()
            .iter()
            .any(|p| p.name == "gen_ai.client.token.usage"),
        "{:#?}",
        receiver.points()
    );
    drop(w);
    drop(rt);
    receiver.received().into_iter().map(|r| r.headers).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A gRPC collector over TLS whose certificate the host's store trusts
/// (here `SSL_CERT_FILE`, as a runner's own CA bundle would): the
/// exporter's handshake succeeds and the metrics arrive.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn otlp_grpc_over_tls_trusts_the_hosts_store() {
    let rt = runtime();
    let pki = tollgate_e2e::pki::TestPki::new();
    let receiver = rt.block_on(OtlpReceiver::grpc_tls(&pki));
    let toml = format!(
        "[export.otlp]\nendpoint = {:?}\nprotocol = \"grpc\"\ninterval_secs = 1\ntimeout_secs = 5\n",
        receiver.endpoint()
    );
    let ca = pki.ca_path().display().to_string();
    one_export_over_tls(
        rt,
        &receiver,
        ("otlptls", 52),
        toml,
        vec![("SSL_CERT_FILE".into(), ca)],
    );
}

/// Whether every export carried header `name` with `value`.
fn every_export_has(headers: &[Vec<(String, String)>], name: &str, value: &str) -> bool {
    headers
        .iter()
        .all(|h| h.iter().any(|(k, v)| k == name && v == value))
}

/// An OTLP/HTTP collector that asks for a client certificate, with a
/// server certificate only `ca_file` trusts (not the host's store): the
/// config names the CA and the client pair, the environment asks for
/// gzip, and the metrics arrive gzip-encoded.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn otlp_http_over_mutual_tls_with_gzip_from_the_environment() {
    let rt = runtime();
    let server_ca = tollgate_e2e::pki::TestPki::new();
    let client_ca = tollgate_e2e::pki::TestPki::new();
    let (cert, key) = client_identity(&client_ca);
    let receiver = rt.block_on(OtlpReceiver::http_mtls(&server_ca, &client_ca));
    let toml = format!(
        "[export.otlp]\nendpoint = {:?}\ninterval_secs = 1\ntimeout_secs = 5\nca_file = {:?}\nclient_cert = {cert:?}\nclient_key = {key:?}\n",
        receiver.endpoint(),
        server_ca.ca_path().display().to_string(),
    );
    let env = vec![("OTEL_EXPORTER_OTLP_COMPRESSION".into(), "gzip".into())];
    let headers = one_export_over_tls(rt, &receiver, ("otlpmtls", 53), toml, env);
    assert!(
        every_export_has(&headers, "content-encoding", "gzip"),
        "{headers:?}"
    );
}

/// The same over gRPC, with the CA and the client pair from the standard
/// variables and zstd from the config: the handshake shows the client
/// certificate and the exports arrive zstd-encoded.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn otlp_grpc_over_mutual_tls_with_zstd_from_the_config() {
    let rt = runtime();
    let server_ca = tollgate_e2e::pki::TestPki::new();
    let client_ca = tollgate_e2e::pki::TestPki::new();
    let (cert, key) = client_identity(&client_ca);
    let receiver = rt.block_on(OtlpReceiver::grpc_mtls(&server_ca, &client_ca));
    let toml = format!(
        "[export.otlp]\nendpoint = {:?}\nprotocol = \"grpc\"\ninterval_secs = 1\ntimeout_secs = 5\ncompression = \"zstd\"\n",
        receiver.endpoint()
    );
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_CERTIFICATE".into(),
            server_ca.ca_path().display().to_string(),
        ),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE".into(), cert),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY".into(), key),
    ];
    let headers = one_export_over_tls(rt, &receiver, ("otlpmtlsg", 54), toml, env);
    assert!(
        every_export_has(&headers, "grpc-encoding", "zstd"),
        "{headers:?}"
    );
}

/// DER of the first certificate in `pem`.
fn der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

/// Writes `body` to `path` as certificate issuers do: a new file renamed
/// over the old one.
fn renew(path: &str, body: &str) {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, body).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A client certificate renewed on disk while the agent runs (as
/// cert-manager, step or Vault renew one) is the one the collector sees at
/// the next handshake, with no restart; a renewal that leaves a broken
/// file is logged, and exports go on with the last good pair. The
/// collector ends each connection after a second (gRPC's
/// `max_connection_age`), so that the exporter shakes hands again.
#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn a_renewed_client_certificate_reaches_the_collector_without_a_restart() {
    let rt = runtime();
    let server_ca = tollgate_e2e::pki::TestPki::new();
    let client_ca = tollgate_e2e::pki::TestPki::new();
    let (cert, key) = client_identity(&client_ca);
    let first = der(&std::fs::read_to_string(&cert).expect("read"));
    let receiver = rt.block_on(OtlpReceiver::grpc_mtls_reconnecting(
        &server_ca,
        &client_ca,
        std::time::Duration::from_secs(1),
    ));
    let toml = format!(
        "[export.otlp]\nendpoint = {:?}\nprotocol = \"grpc\"\ninterval_secs = 1\ntimeout_secs = 5\nca_file = {:?}\nclient_cert = {cert:?}\nclient_key = {key:?}\n",
        receiver.endpoint(),
        server_ca.ca_path().display().to_string(),
    );
    let mut w = World::start_with("otlprenew", 58, toml);
    let shown = |r: &[tollgate_e2e::otlp_receiver::Received], c: &[u8]| {
        r.iter().any(|r| r.client_cert.as_deref() == Some(c))
    };
    let wait = std::time::Duration::from_secs(60);
    assert!(
        rt.block_on(receiver.wait_until(wait, |r| shown(r, &first))),
        "no export with the first certificate:\n{}",
        w.agent.log()
    );

    // Renewed with a new key: the key first, then the certificate.
    let renewed = client_ca.leaf("tollgate-agent-renewed");
    renew(&key, &renewed.key_pem);
    renew(&cert, &renewed.cert_pem);
    let second = der(&renewed.cert_pem);
    assert!(
        rt.block_on(receiver.wait_until(wait, |r| shown(r, &second))),
        "no export with the renewed certificate:\n{}",
        w.agent.log()
    );

    // A renewal that breaks off half-way: the renewed pair goes on.
    let half = &renewed.cert_pem[..renewed.cert_pem.len() / 2];
    std::fs::write(&cert, half).expect("write");
    let before = receiver.received().len();
    assert!(
        rt.block_on(receiver.wait_until(wait, |r| r.len() >= before + 3)),
        "exports stopped after a broken renewal:\n{}",
        w.agent.log()
    );
    let after = receiver.received();
    assert!(
        after[before..]
            .iter()
            .all(|r| r.client_cert.as_deref() == Some(second.as_slice())),
        "an export after the broken renewal showed another certificate"
    );
    let status = w.agent.terminate().expect("running");
    assert!(status.success(), "agent exit: {status}\n{}", w.agent.log());
    let log = w.agent.log();
    assert!(
        log.contains("client certificate changed on disk and was loaded again"),
        "{log}"
    );
    assert!(
        log.contains("client certificate changed on disk but cannot be used"),
        "{log}"
    );
    assert!(!log.contains("PRIVATE KEY-----"), "key material in the log");
    drop(w);
    drop(rt);
}

#[test]
#[ignore = "needs root, cgroup v2 and BPF"]
fn unreachable_collector_loses_no_ledger_row() {
    // Nothing listens on 127.0.0.1:1; exports fail and retry in the
    // background while requests flow.
    let toml = "[export.otlp]\nendpoint = \"http://127.0.0.1:1\"\nprotocol = \"grpc\"\ninterval_secs = 1\ntimeout_secs = 1\n";
    let mut w = World::start_with("otlpdown", 23, toml.to_string());
    let client = w.client(&[]);
    ok(
        &client.python(
            r#"
import openai
c = openai.OpenAI(api_key="sk-test", max_retries=0)
for i in range(30):
    c.chat.completions.create(model="gpt-4o-mini", max_tokens=2, messages=[{"role": "user", "content": "x"}])
"#,
        ),
        "python loop",
    );
    let status = w.agent.terminate().expect("running");
    assert!(status.success(), "clean exit: {status}\n{}", w.agent.log());
    let rows = w.agent.report_json();
    assert_eq!(rows.len(), 30, "every request is in the ledger");
    assert_eq!(w.fake.reported().len(), 30);
}
