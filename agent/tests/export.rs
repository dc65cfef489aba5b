//! The real exporter against OTLP receivers built on the official
//! opentelemetry-proto types (tollgate_e2e::otlp_receiver): known usage
//! records in, exact metric names, units, kinds, attributes, resource and
//! sums out; the opt-in generation; high-cardinality attributes only with
//! the switch; an unreachable collector; the audit log's rotation.
//!
//! The environment is passed explicitly (`start_with_env`), so the
//! machine's OTEL_* variables cannot change what these tests see.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tollgate::export::semconv::{DURATION_BUCKETS, TOKEN_BUCKETS};
use tollgate::export::{
    ExportConfig, Exporter, HealthSnapshot, OtlpProtocol, OtlpTemporality, ResourceInfo, Semconv,
    start_with_env,
};
use tollgate::meter::{Attribution, RecordSink, Usage, UsageRecord};
use tollgate_e2e::otlp_receiver::{Kind, OtlpReceiver, Point, PointValue, Transport, Value};

const FLUSH: Duration = Duration::from_secs(20);

fn who() -> Attribution {
    Attribution {
        pid: 4242,
        uid: 1001,
        cgroup_id: 77,
        comm: "python3".into(),
        exe: Some("/usr/bin/python3.12".into()),
        cmdline: Some("python3 eval.py --api-key=[REDACTED]".into()),
        ci_system: Some("github-actions".into()),
        repository: Some("acme/widgets".into()),
        workflow: Some("nightly-eval".into()),
        job: Some("score".into()),
        run_id: Some("987654".into()),
        run_attempt: Some("1".into()),
        ref_name: Some("refs/heads/main".into()),
        runner: Some("runner-7".into()),
        job_id: Some("555".into()),
        cgroup_path: Some("/system.slice/runner.service".into()),
        container_id: None,
        team: Some("ml-platform".into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn rec(
    seq: i64,
    provider: &str,
    host: &str,
    op: &str,
    model: &str,
    input: u64,
    output: u64,
) -> UsageRecord {
    UsageRecord {
        id: None,
        started_at_ms: 1_700_000_000_000 + seq,
        started_at: "2023-11-14T22:13:20Z".into(),
        duration_ms: 1200,
        ttfb_ms: Some(300),
        provider: provider.into(),
        host: host.into(),
        operation: op.into(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some(model.into()),
        response_model: Some(format!("{model}-2024-08-06")),
        status: 200,
        streaming: false,
        usage: Usage {
            input_tokens: input,
            output_tokens: output,
            ..Default::default()
        },
        estimated: false,
        cost_usd: None,
        who: who().into(),
        error: None,
        service_tier: None,
    }
}

fn health() -> Arc<dyn Fn() -> HealthSnapshot + Send + Sync> {
    Arc::new(|| HealthSnapshot {
        connections_intercepted: 11,
        connections_passthrough: 22,
        connections_refused: 3,
        connections_other_netns: 4,
        connections_udp_refused: 5,
        ledger_written: 40,
        ledger_queued: 2,
        ledger_errors: 1,
        ledger_dropped: 6,
        bodies_too_long: 7,
        bodies_over_budget: 8,
        responses_over_budget: 13,
        bodies_stalled: 9,
        background_waiting: 12,
        up: true,
    })
}

fn resource() -> ResourceInfo {
    ResourceInfo {
        host_name: "ci-host-1".into(),
        runner_name: Some("runner-7".into()),
    }
}

fn config(endpoint: &str, protocol: OtlpProtocol) -> ExportConfig {
    let mut c = ExportConfig::default();
    c.otlp.endpoint = Some(endpoint.into());
    c.otlp.protocol = Some(protocol);
    // Only flushes export: one request per flush, nothing in between.
    c.otlp.interval_secs = Some(3600);
    c.otlp.timeout_secs = Some(5);
    c
}

fn no_env(_: &str) -> Option<String> {
    None
}

async fn start(cfg: &ExportConfig) -> (Exporter, Arc<dyn RecordSink>) {
    start_with_env(cfg, resource(), health(), &no_env).expect("exporter starts")
}

async fn receiver(t: Transport) -> OtlpReceiver {
    match t {
        Transport::Grpc => OtlpReceiver::grpc().await,
        Transport::Http => OtlpReceiver::http().await,
    }
}

fn protocol(t: Transport) -> OtlpProtocol {
    match t {
        Transport::Grpc => OtlpProtocol::Grpc,
        Transport::Http => OtlpProtocol::HttpProtobuf,
    }
}

fn named<'a>(points: &'a [Point], name: &str) -> Vec<&'a Point> {
    points.iter().filter(|p| p.name == name).collect()
}

fn keys(p: &Point) -> BTreeSet<&str> {
    p.attributes.keys().map(String::as_str).collect()
}

fn attr<'a>(p: &'a Point, k: &str) -> Option<&'a Value> {
    p.attributes.get(k)
}

fn s(v: &str) -> Value {
    Value::Str(v.into())
}

fn sum(points: &[&Point]) -> f64 {
    points.iter().map(|p| p.value.number().unwrap_or(0.0)).sum()
}

fn hist(p: &Point) -> (u64, f64, Vec<f64>) {
    match &p.value {
        PointValue::Histogram {
            count, sum, bounds, ..
        } => (*count, sum.expect("histogram sum"), bounds.clone()),
        other => panic!("{} is not a histogram point: {other:?}", p.name),
    }
}

/// The attribute keys of every per-request metric of a record with full
/// attribution and both models, without high-cardinality attributes.
const REQUEST_KEYS: &[&str] = &[
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "server.address",
    "server.port",
    "cicd.pipeline.name",
    "cicd.pipeline.task.name",
    "vcs.owner.name",
    "vcs.repository.name",
    "cicd.worker.name",
    "tollgate.team",
    "tollgate.ci.system",
    "process.executable.name",
];

fn request_keys(extra: &[&'static str]) -> BTreeSet<&'static str> {
    REQUEST_KEYS.iter().chain(extra).copied().collect()
}

fn assert_resource(points: &[Point]) {
    assert!(!points.is_empty(), "no metrics arrived");
    for p in points {
        let r = &p.resource;
        assert_eq!(r.get("service.name"), Some(&s("tollgate")), "{}", p.name);
        assert_eq!(
            r.get("service.version"),
            Some(&s(env!("CARGO_PKG_VERSION"))),
            "{}",
            p.name
        );
        assert_eq!(r.get("host.name"), Some(&s("ci-host-1")), "{}", p.name);
        assert_eq!(
            r.get("cicd.worker.name"),
            Some(&s("runner-7")),
            "{}",
            p.name
        );
        assert_eq!(p.scope, "tollgate");
    }
}

fn assert_health(points: &[Point]) {
    for (name, unit, kind, value) in [
        (
            "tollgate.connections.intercepted",
            "{connection}",
            "counter",
            11.0,
        ),
        (
            "tollgate.connections.passthrough",
            "{connection}",
            "counter",
            22.0,
        ),
        (
            "tollgate.connections.refused",
            "{connection}",
            "counter",
            3.0,
        ),
        (
            "tollgate.connections.other_netns",
            "{connection}",
            "counter",
            4.0,
        ),
        (
            "tollgate.connections.udp_refused",
            "{connection}",
            "counter",
            5.0,
        ),
        ("tollgate.ledger.records", "{record}", "counter", 40.0),
        ("tollgate.ledger.queued", "{record}", "gauge", 2.0),
        ("tollgate.ledger.errors", "{error}", "counter", 1.0),
        ("tollgate.ledger.dropped", "{record}", "counter", 6.0),
        (
            "tollgate.requests.body_too_long",
            "{request}",
            "counter",
            7.0,
        ),
        (
            "tollgate.requests.body_over_budget",
            "{request}",
            "counter",
            8.0,
        ),
        (
            "tollgate.responses.body_over_budget",
            "{response}",
            "counter",
            13.0,
        ),
        (
            "tollgate.requests.body_stalled",
            "{request}",
            "counter",
            9.0,
        ),
        (
            "tollgate.requests.background_waiting",
            "{request}",
            "gauge",
            12.0,
        ),
        ("tollgate.up", "1", "gauge", 1.0),
    ] {
        let ps = named(points, name);
        assert_eq!(ps.len(), 1, "{name}: {ps:?}");
        let p = ps[0];
        assert_eq!(p.unit, unit, "{name}");
        match kind {
            "counter" => assert_eq!(
                p.kind,
                Kind::Sum {
                    monotonic: true,
                    cumulative: true
                },
                "{name}"
            ),
            _ => assert_eq!(p.kind, Kind::Gauge, "{name}"),
        }
        assert_eq!(p.value, PointValue::Int(value as i64), "{name}");
        assert!(p.attributes.is_empty(), "{name}: {:?}", p.attributes);
    }
    let dropped = named(points, "tollgate.export.dropped");
    let pipelines: BTreeMap<_, _> = dropped
        .iter()
        .map(|p| {
            assert_eq!(p.unit, "{record}");
            (
                attr(p, "tollgate.export.pipeline")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                p.value.clone(),
            )
        })
        .collect();
    assert_eq!(
        pipelines,
        BTreeMap::from([
            (Some("audit_log".to_string()), PointValue::Int(0)),
            (Some("metrics".to_string()), PointValue::Int(0)),
        ])
    );
}

async fn default_generation(t: Transport) {
    let rx = receiver(t).await;
    let (exporter, sink) = start(&config(&rx.endpoint(), protocol(t))).await;

    // A streamed OpenAI chat with a price, an Anthropic message without
    // one, a rate-limited request, and an embeddings call.
    let mut a = rec(1, "openai", "api.openai.com", "chat", "gpt-4o", 100, 20);
    a.streaming = true;
    a.ttfb_ms = Some(150);
    a.cost_usd = Some(0.0125);
    let mut b = rec(
        2,
        "anthropic",
        "api.anthropic.com",
        "chat",
        "claude-sonnet-4",
        50,
        10,
    );
    b.duration_ms = 3400;
    let mut c = rec(3, "openai", "api.openai.com", "chat", "gpt-4o", 0, 0);
    c.status = 429;
    c.response_model = None;
    c.duration_ms = 80;
    let mut d = rec(
        4,
        "openai",
        "api.openai.com",
        "embeddings",
        "text-embedding-3-small",
        64,
        0,
    );
    d.cost_usd = Some(0.0001);
    // A 200 whose counts are unknown (no usage, nothing to estimate from):
    // timed, but no token counts (the conventions: MUST NOT report usage
    // then), where zeros would pull every percentile down.
    let mut e = rec(5, "openai", "api.openai.com", "chat", "gpt-4o-mini", 0, 0);
    e.error = Some("usage_missing".into());
    for r in [a, b, c, d, e] {
        sink.submit(r.into());
    }
    exporter.flush(FLUSH).await.expect("flush");
    let pts = rx.latest();
    assert_resource(&pts);

    let names: BTreeSet<&str> = pts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "gen_ai.client.token.usage",
            "gen_ai.client.operation.duration",
            "gen_ai.client.operation.time_to_first_chunk",
            "tollgate.cost",
            "tollgate.requests",
            "tollgate.connections.intercepted",
            "tollgate.connections.passthrough",
            "tollgate.connections.refused",
            "tollgate.connections.other_netns",
            "tollgate.connections.udp_refused",
            "tollgate.export.dropped",
            "tollgate.ledger.records",
            "tollgate.ledger.queued",
            "tollgate.ledger.errors",
            "tollgate.ledger.dropped",
            "tollgate.requests.body_too_long",
            "tollgate.requests.body_over_budget",
            "tollgate.requests.body_stalled",
            "tollgate.responses.body_over_budget",
            "tollgate.requests.background_waiting",
            "tollgate.up",
        ]),
        "exported metric names"
    );

    // gen_ai.client.token.usage: histogram of {token}, input and output per
    // request (embeddings: input only; the 429 carried no usage, the
    // usage_missing answer no known counts).
    let usage = named(&pts, "gen_ai.client.token.usage");
    for p in &usage {
        assert_eq!(p.unit, "{token}");
        assert_eq!(p.kind, Kind::Histogram { cumulative: true });
        assert_eq!(hist(p).2, TOKEN_BUCKETS.to_vec());
        assert_eq!(keys(p), request_keys(&["gen_ai.token.type"]), "{p:?}");
    }
    let of = |ty: &str| -> Vec<&Point> {
        usage
            .iter()
            .copied()
            .filter(|p| attr(p, "gen_ai.token.type") == Some(&s(ty)))
            .collect()
    };
    assert_eq!(sum(&of("input")), 100.0 + 50.0 + 64.0, "input tokens");
    assert_eq!(sum(&of("output")), 20.0 + 10.0, "output tokens");
    let counts: u64 = usage.iter().map(|p| hist(p).0).sum();
    assert_eq!(counts, 3 + 2, "one input and one output point per request");
    let claude_in = of("input")
        .into_iter()
        .find(|p| attr(p, "gen_ai.provider.name") == Some(&s("anthropic")))
        .expect("anthropic input tokens");
    assert_eq!(attr(claude_in, "gen_ai.operation.name"), Some(&s("chat")));
    assert_eq!(
        attr(claude_in, "gen_ai.request.model"),
        Some(&s("claude-sonnet-4"))
    );
    assert_eq!(
        attr(claude_in, "gen_ai.response.model"),
        Some(&s("claude-sonnet-4-2024-08-06"))
    );
    assert_eq!(
        attr(claude_in, "server.address"),
        Some(&s("api.anthropic.com"))
    );
    assert_eq!(attr(claude_in, "server.port"), Some(&Value::Int(443)));
    assert_eq!(
        attr(claude_in, "cicd.pipeline.name"),
        Some(&s("nightly-eval"))
    );
    assert_eq!(
        attr(claude_in, "cicd.pipeline.task.name"),
        Some(&s("score"))
    );
    assert_eq!(attr(claude_in, "vcs.owner.name"), Some(&s("acme")));
    assert_eq!(attr(claude_in, "vcs.repository.name"), Some(&s("widgets")));
    assert_eq!(attr(claude_in, "cicd.worker.name"), Some(&s("runner-7")));
    assert_eq!(attr(claude_in, "tollgate.team"), Some(&s("ml-platform")));
    assert_eq!(
        attr(claude_in, "tollgate.ci.system"),
        Some(&s("github-actions"))
    );
    assert_eq!(
        attr(claude_in, "process.executable.name"),
        Some(&s("python3.12"))
    );
    let emb = of("input")
        .into_iter()
        .find(|p| attr(p, "gen_ai.operation.name") == Some(&s("embeddings")))
        .expect("embeddings input tokens");
    assert_eq!(hist(emb).1, 64.0);

    // gen_ai.client.operation.duration: every request, seconds, error.type
    // only on the failure.
    let dur = named(&pts, "gen_ai.client.operation.duration");
    let mut total = 0u64;
    for p in &dur {
        assert_eq!(p.unit, "s");
        assert_eq!(p.kind, Kind::Histogram { cumulative: true });
        assert_eq!(hist(p).2, DURATION_BUCKETS.to_vec());
        total += hist(p).0;
    }
    assert_eq!(total, 5);
    let failed: Vec<_> = dur
        .iter()
        .filter(|p| attr(p, "error.type").is_some())
        .collect();
    assert_eq!(failed.len(), 1, "{dur:?}");
    assert_eq!(attr(failed[0], "error.type"), Some(&s("429")));
    assert_eq!(hist(failed[0]).0, 1);
    assert!((hist(failed[0]).1 - 0.08).abs() < 1e-9);
    // The failed request has no response model.
    assert_eq!(
        keys(failed[0]),
        request_keys(&["error.type"])
            .into_iter()
            .filter(|k| *k != "gen_ai.response.model")
            .collect()
    );
    let claude_dur = dur
        .iter()
        .find(|p| attr(p, "gen_ai.provider.name") == Some(&s("anthropic")))
        .expect("anthropic duration");
    assert!((hist(claude_dur).1 - 3.4).abs() < 1e-9);
    assert_eq!(keys(claude_dur), request_keys(&[]));

    // Time to first chunk: the one stream only.
    let ttfc = named(&pts, "gen_ai.client.operation.time_to_first_chunk");
    assert_eq!(ttfc.len(), 1, "{ttfc:?}");
    assert_eq!(ttfc[0].unit, "s");
    assert_eq!(hist(ttfc[0]).2, DURATION_BUCKETS.to_vec());
    assert_eq!(hist(ttfc[0]).0, 1);
    assert!((hist(ttfc[0]).1 - 0.15).abs() < 1e-9);
    assert_eq!(attr(ttfc[0], "gen_ai.request.model"), Some(&s("gpt-4o")));

    // tollgate.cost: USD counter, only where the price was known.
    let cost = named(&pts, "tollgate.cost");
    assert_eq!(cost.len(), 2, "{cost:?}");
    for p in &cost {
        assert_eq!(p.unit, "USD");
        assert_eq!(
            p.kind,
            Kind::Sum {
                monotonic: true,
                cumulative: true
            }
        );
        assert_eq!(keys(p), request_keys(&[]));
    }
    assert!((sum(&cost) - 0.0126).abs() < 1e-12);

    // tollgate.requests: one per record, error.type on the failure.
    let reqs = named(&pts, "tollgate.requests");
    assert_eq!(sum(&reqs), 5.0);
    for p in &reqs {
        assert_eq!(p.unit, "{request}");
        assert!(matches!(
            p.kind,
            Kind::Sum {
                monotonic: true,
                ..
            }
        ));
        assert!(matches!(p.value, PointValue::Int(_)));
    }
    assert_eq!(
        reqs.iter()
            .filter(|p| attr(p, "error.type") == Some(&s("429")))
            .count(),
        1
    );

    // No high-cardinality attribute anywhere by default.
    for p in &pts {
        for k in [
            "process.pid",
            "process.command_line",
            "cicd.pipeline.run.id",
            "cicd.pipeline.task.run.id",
        ] {
            assert!(attr(p, k).is_none(), "{k} on {}", p.name);
        }
    }
    assert_health(&pts);

    let stats = tokio::time::timeout(
        Duration::from_secs(30),
        exporter.shutdown(Duration::from_secs(10)),
    )
    .await
    .expect("shutdown returns")
    .expect("clean shutdown");
    assert_eq!(stats.metrics_recorded, 5);
    assert_eq!(stats.metrics_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_receives_the_default_genai_conventions() {
    default_generation(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_receives_the_default_genai_conventions() {
    default_generation(Transport::Http).await;
}

async fn latest_generation(t: Transport) {
    let rx = receiver(t).await;
    let mut cfg = config(&rx.endpoint(), protocol(t));
    cfg.otlp.semconv = Some(Semconv::LatestExperimental);
    let (exporter, sink) = start(&cfg).await;

    let mut a = rec(1, "openai", "api.openai.com", "chat", "o3", 1000, 500);
    a.usage.cached_input_tokens = 600;
    a.usage.reasoning_tokens = 320;
    a.streaming = true;
    a.ttfb_ms = Some(900);
    let mut b = rec(
        2,
        "anthropic",
        "api.anthropic.com",
        "chat",
        "claude-opus-4",
        2000,
        100,
    );
    b.usage.cache_write_input_tokens = 1500;
    b.usage.cached_input_tokens = 200;
    let mut c = rec(3, "openai", "api.groq.com", "chat", "llama-3.3-70b", 0, 0);
    c.status = 503;
    c.response_model = None;
    let d = rec(
        4,
        "openai",
        "api.openai.com",
        "embeddings",
        "text-embedding-3-large",
        77,
        0,
    );
    let mut e = rec(5, "openai", "api.openai.com", "batch", "gpt-4o", 0, 0);
    e.response_model = None;
    for r in [a, b, c, d, e] {
        sink.submit(r.into());
    }
    exporter.flush(FLUSH).await.expect("flush");
    let pts = rx.latest();
    assert_resource(&pts);
    let names: BTreeSet<&str> = pts
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| n.starts_with("gen_ai."))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "gen_ai.client.inference.duration",
            "gen_ai.client.inference.time_to_first_chunk",
            "gen_ai.client.inference.usage.input_tokens",
            "gen_ai.client.inference.usage.output_tokens",
            "gen_ai.client.inference.usage.cache_read.input_tokens",
            "gen_ai.client.inference.usage.cache_write.input_tokens",
            "gen_ai.client.inference.usage.reasoning.output_tokens",
            "gen_ai.client.inference.operation.input_tokens",
            "gen_ai.client.inference.operation.output_tokens",
            "gen_ai.client.embeddings.duration",
            "gen_ai.client.embeddings.operation.input_tokens",
            "gen_ai.client.operation.duration",
        ]),
        "the latest generation replaces gen_ai.client.token.usage"
    );

    // Usage counters: monotonic sums of {token} with gen_ai.token.modality.
    for (name, total) in [
        ("gen_ai.client.inference.usage.input_tokens", 3000.0),
        ("gen_ai.client.inference.usage.output_tokens", 600.0),
        (
            "gen_ai.client.inference.usage.cache_read.input_tokens",
            800.0,
        ),
        (
            "gen_ai.client.inference.usage.cache_write.input_tokens",
            1500.0,
        ),
        (
            "gen_ai.client.inference.usage.reasoning.output_tokens",
            320.0,
        ),
    ] {
        let ps = named(&pts, name);
        assert_eq!(
            ps.len(),
            3,
            "{name}: one series per inference request: {ps:?}"
        );
        for p in &ps {
            assert_eq!(p.unit, "{token}", "{name}");
            assert_eq!(
                p.kind,
                Kind::Sum {
                    monotonic: true,
                    cumulative: true
                },
                "{name}"
            );
            assert!(matches!(p.value, PointValue::Int(_)), "{name}");
            assert_eq!(attr(p, "gen_ai.token.modality"), Some(&s("unknown")));
            assert!(attr(p, "error.type").is_none(), "{name} has no error.type");
            assert!(attr(p, "gen_ai.token.type").is_none());
        }
        assert_eq!(sum(&ps), total, "{name}");
    }
    // The failed request is counted with 0, as the convention asks.
    let groq = named(&pts, "gen_ai.client.inference.usage.input_tokens")
        .into_iter()
        .find(|p| attr(p, "gen_ai.provider.name") == Some(&s("groq")))
        .expect("groq (OpenAI-compatible host) gets its registry provider name");
    assert_eq!(groq.value, PointValue::Int(0));

    // Per-operation histograms: no modality, error.type on failures.
    for (name, total) in [
        ("gen_ai.client.inference.operation.input_tokens", 3000.0),
        ("gen_ai.client.inference.operation.output_tokens", 600.0),
    ] {
        let ps = named(&pts, name);
        assert_eq!(sum(&ps), total, "{name}");
        for p in &ps {
            assert_eq!(p.unit, "{token}");
            assert_eq!(hist(p).2, TOKEN_BUCKETS.to_vec());
            assert!(attr(p, "gen_ai.token.modality").is_none());
        }
        assert_eq!(
            ps.iter()
                .filter(|p| attr(p, "error.type") == Some(&s("503")))
                .count(),
            1,
            "{name}"
        );
    }

    let inf = named(&pts, "gen_ai.client.inference.duration");
    assert_eq!(inf.iter().map(|p| hist(p).0).sum::<u64>(), 3);
    for p in &inf {
        assert_eq!(p.unit, "s");
        assert_eq!(hist(p).2, DURATION_BUCKETS.to_vec());
    }
    let ttfc = named(&pts, "gen_ai.client.inference.time_to_first_chunk");
    assert_eq!(ttfc.len(), 1);
    assert!((hist(ttfc[0]).1 - 0.9).abs() < 1e-9);

    let emb = named(&pts, "gen_ai.client.embeddings.duration");
    assert_eq!(emb.len(), 1);
    assert_eq!(
        attr(emb[0], "gen_ai.operation.name"),
        Some(&s("embeddings"))
    );
    let emb_tokens = named(&pts, "gen_ai.client.embeddings.operation.input_tokens");
    assert_eq!(emb_tokens.len(), 1);
    assert_eq!(hist(emb_tokens[0]).1, 77.0);
    assert_eq!(emb_tokens[0].unit, "{token}");

    // Other operations keep gen_ai.client.operation.duration and their name.
    let other = named(&pts, "gen_ai.client.operation.duration");
    assert_eq!(other.len(), 1);
    assert_eq!(attr(other[0], "gen_ai.operation.name"), Some(&s("batch")));
    assert_eq!(sum(&named(&pts, "tollgate.requests")), 5.0);

    exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_latest_experimental_generation() {
    latest_generation(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_latest_experimental_generation() {
    latest_generation(Transport::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_env_opt_in_selects_the_latest_generation_and_config_overrides_it() {
    let rx = OtlpReceiver::http().await;
    let env = |k: &str| {
        (k == "OTEL_SEMCONV_STABILITY_OPT_IN")
            .then(|| "http,gen_ai_latest_experimental".to_string())
    };
    let cfg = config(&rx.endpoint(), OtlpProtocol::HttpProtobuf);
    let (exporter, sink) = start_with_env(&cfg, resource(), health(), &env).expect("start");
    assert_eq!(
        exporter.otlp().map(|o| o.semconv),
        Some(Semconv::LatestExperimental)
    );
    sink.submit(rec(1, "openai", "api.openai.com", "chat", "gpt-4o", 5, 6).into());
    exporter.flush(FLUSH).await.expect("flush");
    let pts = rx.latest();
    assert_eq!(
        sum(&named(&pts, "gen_ai.client.inference.usage.output_tokens")),
        6.0
    );
    assert!(named(&pts, "gen_ai.client.token.usage").is_empty());
    exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");

    let mut cfg = cfg;
    cfg.otlp.semconv = Some(Semconv::Default);
    let (exporter, _sink) = start_with_env(&cfg, resource(), health(), &env).expect("start");
    assert_eq!(exporter.otlp().map(|o| o.semconv), Some(Semconv::Default));
    exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

async fn high_cardinality(t: Transport) {
    let rx = receiver(t).await;
    let mut cfg = config(&rx.endpoint(), protocol(t));
    cfg.otlp.include_high_cardinality = true;
    let (exporter, sink) = start(&cfg).await;
    sink.submit(rec(1, "openai", "api.openai.com", "chat", "gpt-4o", 3, 4).into());
    exporter.flush(FLUSH).await.expect("flush");
    let pts = rx.latest();
    let usage = named(&pts, "gen_ai.client.token.usage");
    assert_eq!(usage.len(), 2);
    for p in usage {
        assert_eq!(
            keys(p),
            request_keys(&[
                "gen_ai.token.type",
                "process.pid",
                "process.command_line",
                "cicd.pipeline.run.id",
                "cicd.pipeline.task.run.id",
            ])
        );
        assert_eq!(attr(p, "process.pid"), Some(&Value::Int(4242)));
        assert_eq!(attr(p, "cicd.pipeline.run.id"), Some(&s("987654")));
        assert_eq!(attr(p, "cicd.pipeline.task.run.id"), Some(&s("555")));
        assert_eq!(
            attr(p, "process.command_line"),
            Some(&s("python3 eval.py --api-key=[REDACTED]"))
        );
    }
    exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

/// `cardinality_limit` bounds the series each metric keeps: past it, new
/// attribute sets are reported as the overflow series. Under cumulative
/// temporality the sets stay until the agent restarts; under delta, a set
/// with nothing in an export interval is dropped, so a later job gets its
/// own series again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cardinality_limit_bounds_each_metrics_series() {
    let job = |seq: i64, job: &str| {
        let mut r = rec(seq, "openai", "api.openai.com", "chat", "gpt-4o", 3, 4);
        r.who = Attribution {
            job: Some(job.into()),
            ..who()
        }
        .into();
        r
    };
    let jobs_of = |pts: &[Point]| -> (BTreeSet<String>, bool) {
        let mut jobs = BTreeSet::new();
        let mut overflow = false;
        for p in named(pts, "tollgate.requests") {
            match attr(p, "cicd.pipeline.task.name") {
                Some(Value::Str(j)) => {
                    jobs.insert(j.clone());
                }
                _ => overflow |= attr(p, "otel.metric.overflow") == Some(&Value::Bool(true)),
            }
        }
        (jobs, overflow)
    };
    for temporality in [OtlpTemporality::Cumulative, OtlpTemporality::Delta] {
        let rx = receiver(Transport::Http).await;
        let mut cfg = config(&rx.endpoint(), protocol(Transport::Http));
        cfg.otlp.cardinality_limit = Some(4);
        cfg.otlp.temporality = Some(temporality);
        let (exporter, sink) = start(&cfg).await;
        for i in 0..10 {
            sink.submit(job(i, &format!("job-{i}")).into());
        }
        exporter.flush(FLUSH).await.expect("flush");
        let (jobs, overflow) = jobs_of(&rx.latest());
        assert!(
            !jobs.is_empty() && jobs.len() <= 4,
            "{temporality:?}: {jobs:?}"
        );
        assert!(overflow, "{temporality:?}: no overflow series");
        // The first jobs end; under delta their series go once an export
        // interval passes without them, and a later job gets its own.
        sink.submit(job(10, "late-job").into());
        exporter.flush(FLUSH).await.expect("flush");
        sink.submit(job(11, "later-job").into());
        let before = rx.received().len();
        exporter.flush(FLUSH).await.expect("flush");
        let next: Vec<Point> = rx
            .points()
            .into_iter()
            .filter(|p| p.request >= before)
            .collect();
        let (jobs, _) = jobs_of(&next);
        assert_eq!(
            jobs.contains("later-job"),
            temporality == OtlpTemporality::Delta,
            "{temporality:?}: {jobs:?}"
        );
        exporter
            .shutdown(Duration::from_secs(10))
            .await
            .expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_high_cardinality_attributes_only_with_the_switch() {
    high_cardinality(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_high_cardinality_attributes_only_with_the_switch() {
    high_cardinality(Transport::Http).await;
}

async fn headers_arrive(t: Transport) {
    let rx = receiver(t).await;
    let mut cfg = config(&rx.endpoint(), protocol(t));
    cfg.otlp
        .headers
        .0
        .insert("X-Tenant-Token".into(), "s3cret-value".into());
    let (exporter, sink) = start(&cfg).await;
    // The configured value never shows in logs or Debug output.
    assert!(!format!("{cfg:?}").contains("s3cret-value"));
    assert!(!format!("{exporter:?}").contains("s3cret-value"));
    sink.submit(rec(1, "openai", "api.openai.com", "chat", "gpt-4o", 1, 1).into());
    exporter.flush(FLUSH).await.expect("flush");
    let got = rx.received();
    assert!(!got.is_empty());
    for r in &got {
        let v: Vec<_> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "x-tenant-token")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(v, ["s3cret-value"], "{t:?}");
    }
    exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_config_headers_reach_the_collector() {
    headers_arrive(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_config_headers_reach_the_collector() {
    headers_arrive(Transport::Http).await;
}

/// A flood through a queue of one: submit never waits, the backlog never
/// exceeds the queue, and every record is either recorded or counted as
/// dropped, and the drop count is what `tollgate.export.dropped` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_instead_of_waiting() {
    let rx = OtlpReceiver::grpc().await;
    let mut cfg = config(&rx.endpoint(), OtlpProtocol::Grpc);
    cfg.queue = 1;
    let (exporter, sink) = start(&cfg).await;
    const N: u64 = 20_000;
    let mut max_backlog = 0;
    for i in 0..N {
        sink.submit(rec(i as i64, "openai", "api.openai.com", "chat", "gpt-4o", 1, 1).into());
        let st = exporter.stats();
        max_backlog = max_backlog.max(st.metrics_accepted.saturating_sub(st.metrics_recorded));
    }
    exporter.flush(FLUSH).await.expect("flush");
    let st = exporter.stats();
    assert_eq!(st.metrics_accepted + st.metrics_dropped, N);
    assert_eq!(st.metrics_recorded, st.metrics_accepted);
    assert!(
        st.metrics_dropped > 0,
        "a queue of one must overflow: {st:?}"
    );
    assert!(max_backlog <= 2, "backlog {max_backlog} beyond the queue");
    let pts = rx.latest();
    assert_eq!(
        sum(&named(&pts, "tollgate.requests")),
        st.metrics_recorded as f64
    );
    let dropped = named(&pts, "tollgate.export.dropped")
        .into_iter()
        .find(|p| attr(p, "tollgate.export.pipeline") == Some(&s("metrics")))
        .expect("metrics drop counter");
    assert_eq!(dropped.value, PointValue::Int(st.metrics_dropped as i64));
    exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

async fn unreachable(p: OtlpProtocol) {
    // Nothing listens on port 1.
    let mut cfg = config(
        match p {
            OtlpProtocol::Grpc => "http://127.0.0.1:1",
            OtlpProtocol::HttpProtobuf => "http://127.0.0.1:1/v1/metrics",
        },
        p,
    );
    cfg.queue = 64;
    cfg.otlp.interval_secs = Some(1);
    cfg.otlp.timeout_secs = Some(1);
    let (exporter, sink) = start(&cfg).await;
    const N: u64 = 50_000;
    let mut max_backlog = 0;
    for i in 0..N {
        // Distinct models: the SDK's per-instrument series cap bounds them.
        let model = format!("model-{}", i % 5000);
        sink.submit(rec(i as i64, "openai", "api.openai.com", "chat", &model, 10, 1).into());
        let s = exporter.stats();
        max_backlog = max_backlog.max(s.metrics_accepted.saturating_sub(s.metrics_recorded));
    }
    assert!(max_backlog <= cfg.queue as u64 + 1, "backlog {max_backlog}");
    // Let a few export attempts fail against the closed port.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let flushed = exporter.flush(Duration::from_secs(10)).await;
    assert!(flushed.is_err(), "a flush to a closed port cannot succeed");
    let s = exporter.stats();
    assert_eq!(s.metrics_accepted + s.metrics_dropped, N);
    assert_eq!(s.metrics_recorded, s.metrics_accepted);
    // Shutdown returns within its timeout (the outer timeout only guards
    // against a hang).
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        exporter.shutdown(Duration::from_secs(3)),
    )
    .await
    .expect("shutdown returned within its timeout");
    // The final export fails (or times out): either is an error, not a hang.
    assert!(r.is_err(), "shutdown cannot flush to a closed port: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unreachable_collector_costs_submit_nothing() {
    unreachable(OtlpProtocol::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_unreachable_collector_costs_submit_nothing() {
    unreachable(OtlpProtocol::HttpProtobuf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_appends_json_lines_and_rotates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit/usage.jsonl");
    let mut cfg = ExportConfig::default();
    cfg.audit_log.path = Some(path.clone());
    cfg.audit_log.max_bytes = 4096;
    cfg.audit_log.keep = 2;
    // No OTLP: the audit log alone.
    let (exporter, sink) = start(&cfg).await;
    assert!(exporter.otlp().is_none());
    const N: i64 = 60;
    for i in 0..N {
        let mut r = rec(
            i,
            "anthropic",
            "api.anthropic.com",
            "chat",
            "claude-haiku",
            10,
            2,
        );
        r.cost_usd = Some(0.001 * i as f64);
        sink.submit(r.into());
    }
    exporter.flush(FLUSH).await.expect("flush");
    let stats = exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
    assert_eq!(stats.audit_written, N as u64);
    assert_eq!(stats.audit_errors, 0);

    let rotated = |n| tollgate::export::rotated_audit_path(&path, n);
    assert!(
        rotated(1).exists() && rotated(2).exists(),
        "two rotated files"
    );
    assert!(!rotated(3).exists(), "keep = 2");
    // Oldest first: PATH.2, PATH.1, PATH. Each file within max_bytes, each
    // line a record, the sequence unbroken up to the last one.
    let mut seqs = Vec::new();
    for p in [rotated(2), rotated(1), path.clone()] {
        let text = std::fs::read_to_string(&p).expect("read audit file");
        assert!(
            text.len() as u64 <= 4096,
            "{} is {} bytes",
            p.display(),
            text.len()
        );
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            let r: UsageRecord = serde_json::from_str(line).expect("a UsageRecord per line");
            assert_eq!(r.provider, "anthropic");
            assert_eq!(*r.who, who());
            seqs.push(r.started_at_ms - 1_700_000_000_000);
        }
    }
    assert_eq!(seqs.last(), Some(&(N - 1)));
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "lines in order, none missing between files: {seqs:?}"
    );
    assert!(seqs.len() < N as usize, "older files were deleted");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode & 0o007, 0, "not world-readable: {mode:o}");
}

async fn spans(t: Transport) {
    let rx = receiver(t).await;
    let mut cfg = config(&rx.endpoint(), protocol(t));
    cfg.otlp.traces = true;
    cfg.otlp.semconv = Some(Semconv::LatestExperimental);
    let (exporter, sink) = start(&cfg).await;
    let mut a = rec(
        1,
        "anthropic",
        "api.anthropic.com",
        "chat",
        "claude-sonnet-4",
        1200,
        340,
    );
    a.usage.cached_input_tokens = 1000;
    a.usage.cache_write_input_tokens = 100;
    a.streaming = true;
    a.ttfb_ms = Some(250);
    a.cost_usd = Some(0.02);
    let mut b = rec(2, "openai", "api.openai.com", "chat", "gpt-4o", 0, 0);
    b.status = 500;
    b.response_model = None;
    sink.submit(a.into());
    sink.submit(b.into());
    exporter.flush(FLUSH).await.expect("flush");
    let spans = rx.spans();
    assert_eq!(spans.len(), 2, "{spans:?}");
    let ok = spans
        .iter()
        .find(|s| s.name == "chat claude-sonnet-4")
        .expect("span named {operation} {model}");
    assert_eq!(ok.kind, 3, "CLIENT");
    assert_eq!(ok.resource.get("service.name"), Some(&s("tollgate")));
    let start_ns = (1_700_000_000_000u64 + 1) * 1_000_000;
    assert_eq!(ok.start_unix_nano, start_ns);
    assert_eq!(ok.end_unix_nano, start_ns + 1_200_000_000);
    let a = &ok.attributes;
    assert_eq!(a.get("gen_ai.usage.input_tokens"), Some(&Value::Int(1200)));
    assert_eq!(a.get("gen_ai.usage.output_tokens"), Some(&Value::Int(340)));
    assert_eq!(
        a.get("gen_ai.usage.cache_read.input_tokens"),
        Some(&Value::Int(1000))
    );
    assert_eq!(
        a.get("gen_ai.usage.cache_write.input_tokens"),
        Some(&Value::Int(100))
    );
    assert_eq!(a.get("gen_ai.request.stream"), Some(&Value::Bool(true)));
    assert_eq!(
        a.get("gen_ai.response.time_to_first_chunk"),
        Some(&Value::Double(0.25))
    );
    assert_eq!(a.get("gen_ai.provider.name"), Some(&s("anthropic")));
    assert_eq!(a.get("gen_ai.request.model"), Some(&s("claude-sonnet-4")));
    assert_eq!(a.get("process.pid"), Some(&Value::Int(4242)));
    assert_eq!(a.get("cicd.pipeline.run.id"), Some(&s("987654")));
    assert!(
        a.get("process.command_line").is_none(),
        "only with the switch"
    );
    assert!(
        !a.keys()
            .any(|k| k.contains("messages") || k.contains("prompt") || k.contains("completion")),
        "no content attributes: {a:?}"
    );
    assert_eq!(ok.status.0, 0, "unset on success");
    let failed = spans
        .iter()
        .find(|s| s.name == "chat gpt-4o")
        .expect("failed span");
    assert_eq!(failed.attributes.get("error.type"), Some(&s("500")));
    assert_eq!(failed.status, (2, "500".to_string()));
    exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

/// A collector whose traces pipeline stalls still gets the last metrics at
/// shutdown: the metrics are shut down first, within the time given.
async fn stalled_traces(t: Transport) {
    let rx = receiver(t).await;
    rx.stall_traces();
    let mut cfg = config(&rx.endpoint(), protocol(t));
    cfg.otlp.traces = true;
    // An export may take longer than the shutdown has.
    cfg.otlp.timeout_secs = Some(10);
    let (exporter, sink) = start(&cfg).await;
    sink.submit(rec(1, "openai", "api.openai.com", "chat", "gpt-4o", 1200, 340).into());
    // (The shutdown's error says the traces did not go; what matters is
    // that the metrics did.)
    let _ = exporter.shutdown(Duration::from_secs(4)).await;
    let points = rx.points();
    let tokens = named(&points, "gen_ai.client.token.usage");
    assert!(!tokens.is_empty(), "no metrics after shutdown: {points:?}");
    assert!(rx.spans().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stalled_traces_leave_the_last_metrics_their_time() {
    stalled_traces(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_stalled_traces_leave_the_last_metrics_their_time() {
    stalled_traces(Transport::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_one_span_per_request_with_genai_attributes() {
    spans(Transport::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_one_span_per_request_with_genai_attributes() {
    spans(Transport::Http).await;
}
