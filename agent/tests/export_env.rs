//! Headers from `OTEL_EXPORTER_OTLP_*HEADERS` never reach a collector the
//! config names. The exporter library reads those variables from the
//! process environment by itself (tollgate's own resolution cannot keep
//! it from doing so), so this test sets them for real, in a test binary
//! of its own: nothing else here reads or writes the environment.
//!
//! One test, so the variables are set before any other thread of this
//! binary could read the environment.

use std::sync::Arc;
use std::time::Duration;

use tollgate::export::{ExportConfig, HealthSnapshot, OtlpProtocol, ResourceInfo, start_with_env};
use tollgate::meter::{Attribution, Usage, UsageRecord};
use tollgate_e2e::otlp_receiver::OtlpReceiver;

fn record() -> UsageRecord {
    UsageRecord {
        id: None,
        started_at_ms: 1_700_000_000_000,
        started_at: "2023-11-14T22:13:20Z".into(),
        duration_ms: 1200,
        ttfb_ms: Some(300),
        provider: "openai".into(),
        host: "api.openai.com".into(),
        operation: "chat".into(),
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        model: Some("gpt-4o".into()),
        response_model: Some("gpt-4o-2024-08-06".into()),
        status: 200,
        streaming: false,
        usage: Usage {
            input_tokens: 3,
            output_tokens: 4,
            ..Default::default()
        },
        estimated: false,
        cost_usd: None,
        who: Attribution::default().into(),
        error: None,
        service_tier: None,
    }
}

fn health() -> Arc<dyn Fn() -> HealthSnapshot + Send + Sync> {
    Arc::new(HealthSnapshot::default)
}

fn real_env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

async fn only_config_headers_arrive(rx: OtlpReceiver, protocol: OtlpProtocol) {
    let mut cfg = ExportConfig::default();
    cfg.otlp.endpoint = Some(rx.endpoint());
    cfg.otlp.protocol = Some(protocol);
    cfg.otlp.interval_secs = Some(3600);
    cfg.otlp.timeout_secs = Some(5);
    cfg.otlp.traces = true;
    cfg.otlp
        .headers
        .0
        .insert("X-Tenant-Token".into(), "config-value".into());
    let resource = ResourceInfo {
        host_name: "ci-host-1".into(),
        runner_name: None,
    };
    let (exporter, sink) =
        start_with_env(&cfg, resource, health(), &real_env).expect("exporter starts");
    sink.submit(record().into());
    exporter
        .flush(Duration::from_secs(20))
        .await
        .expect("flush");
    let got = rx.received();
    assert!(!got.is_empty(), "{protocol:?}: nothing arrived");
    for r in &got {
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        for leaked in ["authorization", "x-env-only", "x-traces-env"] {
            assert!(
                !names.contains(&leaked),
                "{protocol:?}: `{leaked}` from the environment reached the configured collector: {names:?}"
            );
        }
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "x-tenant-token" && v == "config-value"),
            "{protocol:?}: the config's header is missing: {names:?}"
        );
        assert!(
            !r.headers.iter().any(|(_, v)| v.contains("env-secret")
                || v.contains("otel-a")
                || v == "text/plain"),
            "{protocol:?}: {:?}",
            r.headers
        );
    }
    exporter
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}

#[test]
fn environment_headers_never_reach_a_configured_collector() {
    // SAFETY: the only test of this binary, before its runtime starts: no
    // other thread reads or writes the environment.
    unsafe {
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "Authorization=Bearer%20env-secret,x-env-only=env-secret",
        );
        // Transport headers too: a collector the config names must not
        // get the environment's Host, and the body keeps its own type.
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            "authorization=Bearer%20env-secret,Host=otel-a.internal,Content-Type=text/plain",
        );
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "x-traces-env=env-secret",
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        only_config_headers_arrive(OtlpReceiver::grpc().await, OtlpProtocol::Grpc).await;
        only_config_headers_arrive(OtlpReceiver::http().await, OtlpProtocol::HttpProtobuf).await;
    });
}
