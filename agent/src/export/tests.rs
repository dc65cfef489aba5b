//! Unit tests: configuration (parsing, validation, precedence over the
//! environment), the semantic-conventions mappings, and the audit log.

use std::collections::BTreeMap;
use std::time::Duration;

use super::config::*;
use super::semconv::{self as sc, OpClass};
use crate::meter::{Attribution, UsageRecord};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let m: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

fn parse(toml: &str) -> ExportConfig {
    toml::from_str(toml).unwrap_or_else(|e| panic!("parse {toml}: {e}"))
}

fn resolve(c: &ExportConfig, env: &[(&str, &str)]) -> Option<ResolvedOtlp> {
    c.resolve(&env_of(env)).expect("resolves")
}

#[test]
fn the_whole_table_parses_and_unknown_keys_are_errors() {
    let c = parse(
        r#"
        queue = 100
        [otlp]
        enabled = true
        endpoint = "https://otel.example.com:4317"
        protocol = "grpc"
        headers = { "x-honeycomb-team" = "abc" }
        temporality = "delta"
        timeout_secs = 3
        interval_secs = 15
        include_high_cardinality = true
        cardinality_limit = 5000
        semconv = "gen_ai_latest_experimental"
        traces = true
        [audit_log]
        path = "/var/log/tollgate/usage.jsonl"
        max_bytes = 1048576
        keep = 3
    "#,
    );
    c.validate().expect("valid");
    assert_eq!(c.queue, 100);
    assert_eq!(c.otlp.protocol, Some(OtlpProtocol::Grpc));
    assert_eq!(c.otlp.temporality, Some(OtlpTemporality::Delta));
    assert_eq!(c.otlp.cardinality_limit, Some(5000));
    assert_eq!(c.otlp.semconv, Some(Semconv::LatestExperimental));
    assert_eq!(c.audit_log.keep, 3);
    for bad in [
        "[otlp]\nendpont = \"http://x\"",
        "[audit_log]\nsize = 1",
        "bogus = 1",
        "[otlp]\nprotocol = \"http/json\"",
        "[otlp]\ntemporality = \"sometimes\"",
    ] {
        assert!(
            toml::from_str::<ExportConfig>(bad).is_err(),
            "accepted: {bad}"
        );
    }
}

#[test]
fn validate_names_the_key_and_never_echoes_a_header_value() {
    let cases: &[(&str, &str)] = &[
        ("queue = 0", "export.queue"),
        ("queue = 1048577", "export.queue"),
        ("queue = 18446744073709551615", "export.queue"),
        (
            "[otlp]\nendpoint = \"collector:4317\"",
            "export.otlp.endpoint",
        ),
        ("[otlp]\nendpoint = \"ftp://c\"", "export.otlp.endpoint"),
        (
            "[otlp]\nendpoint = \"https://u:pw@c\"",
            "export.otlp.endpoint",
        ),
        ("[otlp]\ntimeout_secs = 0", "export.otlp.timeout_secs"),
        ("[otlp]\ninterval_secs = 0", "export.otlp.interval_secs"),
        (
            "[otlp]\ncardinality_limit = 0",
            "export.otlp.cardinality_limit",
        ),
        (
            "[otlp]\ncardinality_limit = 1000001",
            "export.otlp.cardinality_limit",
        ),
        (
            "[otlp]\nheaders = { \"bad key\" = \"v\" }",
            "export.otlp.headers",
        ),
        (
            "[audit_log]\npath = \"relative.jsonl\"",
            "export.audit_log.path",
        ),
        ("[audit_log]\nmax_bytes = 10", "export.audit_log.max_bytes"),
    ];
    for (toml, key) in cases {
        let err = parse(toml).validate().expect_err(toml);
        assert_eq!(err.0, *key, "{toml}");
    }
    let c = parse("[otlp]\nheaders = { \"authorization\" = \"Bearer top\\nsecret\" }");
    let (k, m) = c.validate().expect_err("newline in a header value");
    assert_eq!(k, "export.otlp.headers");
    assert!(!m.contains("secret"), "{m}");
    assert!(!format!("{c:?}").contains("secret"));
}

#[test]
fn otlp_is_off_without_an_endpoint_and_on_with_one() {
    let none = ExportConfig::default();
    assert_eq!(resolve(&none, &[]), None);
    let r = resolve(&none, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).expect("on");
    assert_eq!(r.endpoint, "http://c:4318/v1/metrics");
    assert_eq!(r.protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!(r.timeout, DEFAULT_TIMEOUT);
    assert_eq!(r.interval, DEFAULT_INTERVAL);
    assert_eq!(r.temporality, OtlpTemporality::Cumulative);
    assert_eq!(r.semconv, Semconv::Default);
    assert_eq!(r.service_name, "tollgate");
    assert!(
        resolve(
            &none,
            &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://c:1/x")]
        )
        .is_some()
    );
    // Disabled by the environment unless the config insists.
    for off in [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_METRICS_EXPORTER", "none"),
    ] {
        assert_eq!(
            resolve(
                &none,
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), off]
            ),
            None
        );
    }
    let mut on = ExportConfig::default();
    on.otlp.enabled = Some(true);
    let r = resolve(&on, &[("OTEL_SDK_DISABLED", "true")]).expect("forced on");
    assert_eq!(r.endpoint, DEFAULT_HTTP_ENDPOINT);
    on.otlp.protocol = Some(OtlpProtocol::Grpc);
    assert_eq!(
        resolve(&on, &[]).expect("on").endpoint,
        DEFAULT_GRPC_ENDPOINT
    );
    let mut off = ExportConfig::default();
    off.otlp.enabled = Some(false);
    off.otlp.endpoint = Some("http://c:4318".into());
    assert_eq!(resolve(&off, &[]), None);
}

#[test]
fn config_beats_signal_specific_env_beats_generic_env() {
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
        (
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "http://metrics:4318/custom",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
        ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "3000"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
        ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "Delta"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-generic=1"),
        (
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            "x-tenant=env%20value,authorization=Bearer%20e",
        ),
        ("OTEL_SERVICE_NAME", "tollgate-fleet"),
    ];
    let c = ExportConfig::default();
    let r = resolve(&c, &env).expect("on");
    assert_eq!(
        r.endpoint, "http://metrics:4318/custom",
        "signal endpoint as is"
    );
    assert_eq!(r.protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!(r.timeout, Duration::from_millis(3000));
    assert_eq!(r.interval, Duration::from_millis(5000));
    assert_eq!(r.temporality, OtlpTemporality::Delta);
    assert_eq!(r.service_name, "tollgate-fleet");
    // Without OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES' service.name.
    let attrs = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=prod, service.name=ci%20llm-spend",
        ),
    ];
    assert_eq!(
        resolve(&c, &attrs).expect("on").service_name,
        "ci llm-spend"
    );
    let both = [attrs[0], attrs[1], ("OTEL_SERVICE_NAME", "named")];
    assert_eq!(resolve(&c, &both).expect("on").service_name, "named");
    assert_eq!(
        r.headers,
        BTreeMap::from([
            ("authorization".into(), "Bearer e".into()),
            ("x-tenant".into(), "env value".into()),
        ]),
        "the signal-specific variable replaces the generic one"
    );

    let mut c = ExportConfig::default();
    c.otlp.endpoint = Some("https://cfg.example.com".into());
    c.otlp.protocol = Some(OtlpProtocol::Grpc);
    c.otlp.timeout_secs = Some(7);
    c.otlp.interval_secs = Some(30);
    c.otlp.temporality = Some(OtlpTemporality::Cumulative);
    c.otlp.headers.0.insert("X-Tenant".into(), "cfg".into());
    let r = resolve(&c, &env).expect("on");
    assert_eq!(r.endpoint, "https://cfg.example.com", "gRPC: as is");
    assert_eq!(r.protocol, OtlpProtocol::Grpc);
    assert_eq!(r.timeout, Duration::from_secs(7));
    assert_eq!(r.interval, Duration::from_secs(30));
    assert_eq!(r.temporality, OtlpTemporality::Cumulative);
    assert_eq!(
        r.headers,
        BTreeMap::from([("x-tenant".into(), "cfg".into())]),
        "the environment's headers (for its collector) do not go to the config's"
    );
    assert_eq!(
        r.env_headers_ignored,
        Some("OTEL_EXPORTER_OTLP_METRICS_HEADERS")
    );
    assert!(!format!("{r:?}").contains("Bearer"), "{r:?}");
    // What the exporter library adds from these variables by itself is
    // taken out again, whatever the name.
    let mut with_traces = env.to_vec();
    with_traces.push((
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "X-Traces=1, Content-Type=text/plain,Host=elsewhere",
    ));
    let r = resolve(&c, &with_traces).expect("on");
    assert_eq!(
        r.env_header_names
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        [
            "authorization",
            "content-type",
            "host",
            "x-generic",
            "x-tenant",
            "x-traces"
        ]
    );
    // Headers in the config add to the environment's when the endpoint
    // comes from the environment.
    let mut c = ExportConfig::default();
    c.otlp.headers.0.insert("X-Extra".into(), "cfg".into());
    let r = resolve(&c, &env).expect("on");
    assert_eq!(r.headers.len(), 3, "{r:?}");
    assert_eq!(r.env_headers_ignored, None);
}

#[test]
fn http_endpoints_get_the_metrics_path_only_when_they_have_none() {
    let mut c = ExportConfig::default();
    for (given, want) in [
        ("http://c:4318", "http://c:4318/v1/metrics"),
        ("http://c:4318/", "http://c:4318/v1/metrics"),
        ("https://c/otlp/v1/metrics", "https://c/otlp/v1/metrics"),
        (
            "https://gw.example.com/custom",
            "https://gw.example.com/custom",
        ),
    ] {
        c.otlp.endpoint = Some(given.into());
        assert_eq!(resolve(&c, &[]).expect("on").endpoint, want, "{given}");
    }
    let r = resolve(
        &ExportConfig::default(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/prefix/")],
    )
    .expect("on");
    assert_eq!(r.endpoint, "http://c:4318/prefix/v1/metrics");
    assert_eq!(
        super::otlp::traces_endpoint("http://c:4318/prefix/v1/metrics"),
        "http://c:4318/prefix/v1/traces"
    );
}

#[test]
fn invalid_environment_values_are_errors_naming_the_variable() {
    let c = ExportConfig::default();
    for (var, val) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "0"),
        (
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
            "sometimes",
        ),
        ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "collector:4317"),
    ] {
        let env = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), (var, val)]);
        let env = |k: &str| {
            if k == "OTEL_EXPORTER_OTLP_ENDPOINT" && var == "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT" {
                None
            } else {
                env(k)
            }
        };
        let err = c.resolve(&env).expect_err(var);
        assert_eq!(err.0, var, "{val}");
    }
}

#[test]
fn the_semconv_opt_in_is_one_token_of_a_list() {
    let mut c = ExportConfig::default();
    c.otlp.enabled = Some(true);
    let with = |c: &ExportConfig, v: &str| {
        resolve(c, &[("OTEL_SEMCONV_STABILITY_OPT_IN", v)])
            .unwrap()
            .semconv
    };
    assert_eq!(
        with(&c, "gen_ai_latest_experimental"),
        Semconv::LatestExperimental
    );
    assert_eq!(
        with(&c, "http, gen_ai_latest_experimental"),
        Semconv::LatestExperimental
    );
    assert_eq!(with(&c, "http"), Semconv::Default);
    assert_eq!(with(&c, "gen_ai_latest_experimental_x"), Semconv::Default);
    c.otlp.semconv = Some(Semconv::Default);
    assert_eq!(
        with(&c, "gen_ai_latest_experimental"),
        Semconv::Default,
        "config wins"
    );
}

#[test]
fn env_headers_are_percent_decoded() {
    assert_eq!(
        parse_env_headers("a=1, B=x%3Dy%2Cz ,c=%E2%9C%93").unwrap(),
        vec![
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "x=y,z".to_string()),
            ("c".to_string(), "\u{2713}".to_string()),
        ]
    );
    assert!(parse_env_headers("a=%zz").is_err());
    assert!(parse_env_headers("bad key=1").is_err());
}

#[test]
fn header_and_endpoint_errors_do_not_repeat_secrets() {
    // The usual mistakes: a header written as in HTTP, base64 padding, a
    // key in the collector URL.
    for bad in [
        "Authorization: Bearer sk-SECRET123",
        "x-team=1,Authorization: Basic c2VjcmV0SECRET=",
    ] {
        let e = parse_env_headers(bad).unwrap_err();
        assert!(!e.contains("SECRET"), "{e}");
        assert!(e.contains("entry"), "{e}");
    }
    for bad in [
        "https://otlp.example/v1/metrics?api_key=SECRET",
        "grpc://user:SECRET@collector:4317",
        "https://user:SECRET@collector:4318",
        "https://:SECRET@/",
        "ftp://collector/SECRET?x=1",
    ] {
        let e = check_endpoint(bad).unwrap_err();
        assert!(!e.contains("SECRET"), "{bad}: {e}");
    }
    assert!(
        check_endpoint("https://otlp.example:4318/v1/metrics?k=1")
            .unwrap_err()
            .contains("https://otlp.example:4318/v1/metrics")
    );
    check_endpoint("https://otlp.example:4318/v1/metrics").unwrap();
    // A token in the path (some vendors' ingest URLs) is not repeated either.
    let e = check_endpoint("https://in.example/otlp/tok_SECRETSECRETSECRET/v1/metrics?x=1")
        .unwrap_err();
    assert!(!e.contains("SECRET"), "{e}");
    assert!(e.contains("https://in.example/otlp/…/v1/metrics"), "{e}");
}

#[test]
fn logs_show_the_endpoint_without_what_may_be_a_key() {
    for (url, shown) in [
        (
            "https://otlp.example:4318/v1/metrics",
            "https://otlp.example:4318/v1/metrics",
        ),
        ("http://127.0.0.1:4317", "http://127.0.0.1:4317/"),
        (
            "https://in.example/otlp/tok_SECRETSECRETSECRET/v1/metrics",
            "https://in.example/otlp/…/v1/metrics",
        ),
        (
            "https://in.example/v1/metrics?k=SECRET",
            "https://in.example/v1/metrics",
        ),
        ("not a url", "(not a URL)"),
    ] {
        assert_eq!(endpoint_for_logs(url), shown, "{url}");
    }
    let r = resolve(
        &parse("[otlp]\nendpoint = \"https://in.example/otlp/tok_SECRETSECRETSECRET\"\n"),
        &[],
    )
    .expect("on");
    let debug = format!("{r:?}");
    assert!(
        !debug.contains("SECRET") && debug.contains("in.example"),
        "{debug}"
    );
}

#[test]
fn operations_map_to_the_well_known_names() {
    for (ours, name, class) in [
        ("chat", "chat", OpClass::Inference),
        ("responses", "chat", OpClass::Inference),
        ("converse", "chat", OpClass::Inference),
        ("text_completion", "text_completion", OpClass::Inference),
        ("generate_content", "generate_content", OpClass::Inference),
        ("embeddings", "embeddings", OpClass::Embeddings),
        ("embed_content", "embeddings", OpClass::Embeddings),
        ("batch", "batch", OpClass::Other),
        ("count_tokens", "count_tokens", OpClass::Other),
        ("agent_session", "invoke_agent", OpClass::Other),
    ] {
        let (n, c) = sc::operation(ours);
        assert_eq!((n.as_ref(), c), (name, class), "{ours}");
    }
}

#[test]
fn providers_map_to_the_registry_values() {
    for (provider, host, want) in [
        ("openai", "api.openai.com", "openai"),
        ("anthropic", "api.anthropic.com", "anthropic"),
        ("gemini", "generativelanguage.googleapis.com", "gcp.gemini"),
        (
            "bedrock",
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "aws.bedrock",
        ),
        ("azure-openai", "acme.openai.azure.com", "azure.ai.openai"),
        // Bedrock's Anthropic and OpenAI routes.
        (
            "anthropic",
            "bedrock-runtime.us-east-1.amazonaws.com",
            "aws.bedrock",
        ),
        (
            "openai",
            "bedrock-runtime.us-east-1.amazonaws.com",
            "aws.bedrock",
        ),
        ("openai", "bedrock-mantle.us-east-1.api.aws", "aws.bedrock"),
        (
            "anthropic",
            "bedrock-runtime-fips.us-east-1.amazonaws.com",
            "aws.bedrock",
        ),
        (
            "anthropic",
            "vpce-0a1b-x.bedrock-runtime.us-east-1.vpce.amazonaws.com",
            "aws.bedrock",
        ),
        ("openai", "mantle.example.com", "openai"),
        ("openai", "api.mistral.ai", "mistral_ai"),
        ("openai", "api.groq.com", "groq"),
        ("openai", "api.deepseek.com", "deepseek"),
        ("openai", "API.X.AI.", "x_ai"),
        ("openai", "us.api.x.ai", "x_ai"),
        ("openai", "openrouter.ai", "openai"),
        ("openai", "llm-gateway.internal", "openai"),
        ("cohere", "api.cohere.com", "cohere"),
    ] {
        assert_eq!(sc::provider_name(provider, host), want, "{provider} {host}");
    }
}

fn record(status: u16, error: Option<&str>) -> UsageRecord {
    UsageRecord {
        status,
        error: error.map(str::to_string),
        ..Default::default()
    }
}

#[test]
fn error_type_is_low_cardinality() {
    assert_eq!(sc::error_type(&record(200, None)), None);
    assert_eq!(sc::error_type(&record(429, None)).as_deref(), Some("429"));
    assert_eq!(
        sc::error_type(&record(500, Some("client_disconnected"))).as_deref(),
        Some("500"),
        "the status wins"
    );
    assert_eq!(
        sc::error_type(&record(200, Some("client_disconnected"))).as_deref(),
        Some("client_disconnected")
    );
    assert_eq!(
        sc::error_type(&record(0, Some("connect"))).as_deref(),
        Some("connect")
    );
    assert_eq!(
        sc::error_type(&record(200, Some("no usage in the response"))).as_deref(),
        Some("_OTHER"),
        "prose is not an error type"
    );
    assert_eq!(sc::error_type(&record(0, None)).as_deref(), Some("_OTHER"));
    // A 200 the agent could not count is no failed request.
    assert_eq!(sc::error_type(&record(200, Some("usage_missing"))), None);
    assert_eq!(
        sc::error_type(&record(200, Some("content_decoding_failed"))),
        None
    );
}

#[test]
fn attribution_attributes() {
    let mut who = Attribution {
        pid: 7,
        comm: "node".into(),
        repository: Some("group/sub/project".into()),
        job: Some(String::new()),
        ..Default::default()
    };
    let mut out = Vec::new();
    sc::scope_attributes(&who, &mut out);
    let got: Vec<(String, String)> = out
        .iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("vcs.owner.name".to_string(), "group/sub".to_string()),
            ("vcs.repository.name".to_string(), "project".to_string()),
            ("process.executable.name".to_string(), "node".to_string()),
        ],
        "empty values are left out; comm stands in for a missing exe"
    );
    who.exe = Some("/opt/bin/claude".into());
    assert_eq!(sc::executable_name(&who), Some("claude"));
    let rec = UsageRecord {
        who: who.into(),
        ..Default::default()
    };
    let keys = |hc| -> Vec<String> {
        sc::request_attributes(&rec, hc)
            .iter()
            .map(|kv| kv.key.to_string())
            .collect()
    };
    assert!(!keys(false).iter().any(|k| k == "process.pid"));
    assert!(keys(true).iter().any(|k| k == "process.pid"));
    // Local estimates are marked; the provider's counts carry no mark.
    assert!(!keys(false).iter().any(|k| k == "tollgate.estimated"));
    let estimated = UsageRecord {
        estimated: true,
        ..rec.clone()
    };
    let attrs = sc::request_attributes(&estimated, false);
    let mark = attrs
        .iter()
        .find(|kv| kv.key.as_str() == "tollgate.estimated")
        .map(|kv| kv.value.to_string());
    assert_eq!(mark.as_deref(), Some("true"));
    // The OpenAI convention's service tier, on OpenAI-family records only.
    let tier = |provider: &str| {
        let r = UsageRecord {
            provider: provider.into(),
            service_tier: Some("flex".into()),
            ..rec.clone()
        };
        sc::request_attributes(&r, false)
            .iter()
            .find(|kv| kv.key.as_str() == "openai.response.service_tier")
            .map(|kv| kv.value.to_string())
    };
    assert_eq!(tier("openai").as_deref(), Some("flex"));
    assert_eq!(tier("azure-openai").as_deref(), Some("flex"));
    assert_eq!(tier("anthropic"), None);
    let untiered = UsageRecord {
        provider: "openai".into(),
        ..rec.clone()
    };
    assert!(
        !sc::request_attributes(&untiered, false)
            .iter()
            .any(|kv| kv.key.as_str() == "openai.response.service_tier"),
        "absent when the response names none"
    );
}

mod audit_log {
    use super::super::audit::{AuditLog, rotated};
    use crate::meter::UsageRecord;

    /// `started_at_ms` of each line of the log at `path`.
    fn seqs(path: &std::path::Path) -> Vec<i64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<UsageRecord>(l)
                    .unwrap()
                    .started_at_ms
            })
            .collect()
    }

    fn rec(i: i64) -> UsageRecord {
        UsageRecord {
            started_at_ms: i,
            provider: "openai".into(),
            ..Default::default()
        }
    }

    #[test]
    fn keep_zero_truncates_and_reopen_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let line = serde_json::to_vec(&rec(0)).unwrap().len() as u64 + 1;
        let mut log = AuditLog::open(&path, line * 3, 0).unwrap();
        for i in 0..7 {
            log.append(&rec(i)).unwrap();
        }
        log.flush().unwrap();
        drop(log);
        assert!(!rotated(&path, 1).exists());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "7 = 3 + 3 + 1");
        // Reopening continues the file and its size accounting.
        let mut log = AuditLog::open(&path, line * 3, 0).unwrap();
        log.append(&rec(7)).unwrap();
        log.append(&rec(8)).unwrap();
        log.append(&rec(9)).unwrap();
        log.flush().unwrap();
        let seqs = seqs(&path);
        assert_eq!(seqs, vec![9]);
    }

    #[test]
    fn a_failed_rotation_loses_no_record_and_is_not_retried_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        // A non-empty directory where the oldest kept file goes: the
        // rotation cannot delete it.
        std::fs::create_dir_all(rotated(&path, 2).join("x")).unwrap();
        let line = serde_json::to_vec(&rec(0)).unwrap().len() as u64 + 1;
        let mut log = AuditLog::open(&path, line * 2, 2).unwrap();
        let results: Vec<bool> = (0..10).map(|i| log.append(&rec(i)).is_ok()).collect();
        log.flush().unwrap();
        let mut want = vec![true; 10];
        want[2] = false;
        assert_eq!(results, want, "one failed rotation, reported once");
        let seqs = seqs(&path);
        assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "every record kept");
        assert!(!rotated(&path, 1).exists());
        assert!(rotated(&path, 2).join("x").exists());
    }

    #[test]
    fn a_record_larger_than_max_bytes_still_gets_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = AuditLog::open(&path, 10, 1).unwrap();
        log.append(&rec(1)).unwrap();
        log.append(&rec(2)).unwrap();
        log.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        assert_eq!(
            std::fs::read_to_string(rotated(&path, 1))
                .unwrap()
                .lines()
                .count(),
            1
        );
    }
}

fn otlp_on(extra: &str) -> ExportConfig {
    parse(&format!("[otlp]\nendpoint = \"https://c:4318\"\n{extra}"))
}

#[test]
fn compression_comes_from_the_config_then_the_metrics_variable_then_the_generic_one() {
    let c = otlp_on("");
    assert_eq!(
        resolve(&c, &[]).expect("on").compression,
        OtlpCompression::None
    );
    let generic = [("OTEL_EXPORTER_OTLP_COMPRESSION", "GZIP")];
    assert_eq!(
        resolve(&c, &generic).expect("on").compression,
        OtlpCompression::Gzip
    );
    let both = [
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "zstd"),
    ];
    assert_eq!(
        resolve(&c, &both).expect("on").compression,
        OtlpCompression::Zstd
    );
    let configured = otlp_on("compression = \"zstd\"");
    assert_eq!(
        resolve(&configured, &generic).expect("on").compression,
        OtlpCompression::Zstd
    );
    // The metrics variable's none beats the generic one's gzip.
    let off = [
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "none"),
    ];
    assert_eq!(
        resolve(&c, &off).expect("on").compression,
        OtlpCompression::None
    );
    let err = c
        .resolve(&env_of(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli")]))
        .expect_err("brotli");
    assert_eq!(err.0, "OTEL_EXPORTER_OTLP_COMPRESSION");
    assert!(err.1.contains("gzip, zstd or none"), "{}", err.1);
    // The library would compress anyway: the config's none is refused
    // with the variable named, never silently not applied.
    let none = otlp_on("compression = \"none\"");
    let err = none.resolve(&env_of(&generic)).expect_err("none vs gzip");
    assert_eq!(err.0, "export.otlp.compression");
    assert!(
        err.1.contains("OTEL_EXPORTER_OTLP_COMPRESSION"),
        "{}",
        err.1
    );
    let agreeing = [("OTEL_EXPORTER_OTLP_COMPRESSION", "none")];
    assert_eq!(
        resolve(&none, &agreeing).expect("on").compression,
        OtlpCompression::None
    );
    assert!(toml::from_str::<ExportConfig>("[otlp]\ncompression = \"lz4\"").is_err());
    // Spans: the traces variable, then the generic one (what the library
    // itself would read), passed explicitly.
    let spans = otlp_on("traces = true");
    let r = resolve(
        &spans,
        &[
            ("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "zstd"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ],
    )
    .expect("on");
    assert_eq!(
        (r.compression, r.traces_compression),
        (OtlpCompression::Zstd, OtlpCompression::Gzip)
    );
    let r = resolve(&spans, &generic).expect("on");
    assert_eq!(r.traces_compression, OtlpCompression::Gzip);
    // none in the config against the traces variable: refused, naming it
    // (only when spans are exported).
    let none_spans = otlp_on("traces = true\ncompression = \"none\"");
    let traces_gzip = [("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")];
    let err = none_spans
        .resolve(&env_of(&traces_gzip))
        .expect_err("none vs the traces variable");
    assert!(
        err.1.contains("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
        "{}",
        err.1
    );
    assert_eq!(
        resolve(&none, &traces_gzip).expect("no spans").compression,
        OtlpCompression::None
    );
    // The metrics variable's none shadows the generic gzip for metrics,
    // so without spans nothing would be compressed: accepted.
    assert_eq!(
        resolve(&none, &off).expect("on").compression,
        OtlpCompression::None
    );
    // A value with spaces is not one the library takes: an error, not a
    // silently different reading.
    let err = c
        .resolve(&env_of(&[("OTEL_EXPORTER_OTLP_COMPRESSION", " gzip")]))
        .expect_err("spaces");
    assert_eq!(err.0, "OTEL_EXPORTER_OTLP_COMPRESSION");
}

#[test]
fn tls_files_come_from_the_config_or_the_variables_and_the_pair_stays_together() {
    let c = otlp_on(
        "ca_file = \"/etc/ca.pem\"\nclient_cert = \"/etc/c.pem\"\nclient_key = \"/etc/k.pem\"",
    );
    c.validate().expect("valid");
    let env = [
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/env/ca.pem"),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/env/c.pem"),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/env/k.pem"),
    ];
    let tls = resolve(&c, &env).expect("on").tls;
    assert_eq!(
        tls.ca_file.as_ref().expect("ca").path,
        std::path::Path::new("/etc/ca.pem")
    );
    assert_eq!(tls.ca_file.expect("ca").source, "export.otlp.ca_file");
    let (cert, key) = tls.identity.expect("identity");
    assert_eq!(cert.path, std::path::Path::new("/etc/c.pem"));
    assert_eq!(key.source, "export.otlp.client_key");

    let bare = otlp_on("");
    let tls = resolve(&bare, &env).expect("on").tls;
    assert_eq!(
        tls.ca_file.expect("ca").source,
        "OTEL_EXPORTER_OTLP_CERTIFICATE"
    );
    let (cert, key) = tls.identity.expect("identity");
    assert_eq!(cert.path, std::path::Path::new("/env/c.pem"));
    assert_eq!(key.source, "OTEL_EXPORTER_OTLP_CLIENT_KEY");
    // The metrics variables beat the generic ones, as a pair.
    let mut metrics = env.to_vec();
    metrics.push(("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "/m/ca.pem"));
    metrics.push(("OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE", "/m/c.pem"));
    metrics.push(("OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY", "/m/k.pem"));
    let tls = resolve(&bare, &metrics).expect("on").tls;
    assert_eq!(
        tls.ca_file.expect("ca").path,
        std::path::Path::new("/m/ca.pem")
    );
    assert_eq!(
        tls.identity.expect("identity").1.path,
        std::path::Path::new("/m/k.pem")
    );
    assert_eq!(resolve(&bare, &[]).expect("on").tls, OtlpTls::default());

    // Half a pair, in either place, and relative paths, are errors.
    let err = bare
        .resolve(&env_of(&[(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            "/c.pem",
        )]))
        .expect_err("cert without key");
    assert_eq!(err.0, "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE");
    assert!(err.1.contains("_CLIENT_KEY is not"), "{}", err.1);
    // Each variable on its own: a metrics certificate and a generic key
    // pair up, as the specification resolves them.
    let mixed = resolve(
        &bare,
        &[
            ("OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE", "/m/c.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem"),
        ],
    )
    .expect("on")
    .tls
    .identity
    .expect("a pair");
    assert_eq!(
        (mixed.0.source.as_str(), mixed.1.source.as_str()),
        (
            "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY"
        )
    );
    let err = bare
        .resolve(&env_of(&[(
            "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY",
            "/k.pem",
        )]))
        .expect_err("key without cert");
    assert_eq!(err.0, "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY");
    let err = bare
        .resolve(&env_of(&[("OTEL_EXPORTER_OTLP_CERTIFICATE", "ca.pem")]))
        .expect_err("relative");
    assert_eq!(err.0, "OTEL_EXPORTER_OTLP_CERTIFICATE");
    for (toml, key) in [
        ("client_cert = \"/c.pem\"", "export.otlp.client_key"),
        ("client_key = \"/k.pem\"", "export.otlp.client_cert"),
        ("ca_file = \"ca.pem\"", "export.otlp.ca_file"),
    ] {
        let err = otlp_on(toml).validate().expect_err(toml);
        assert_eq!(err.0, key, "{toml}");
    }
}

/// A CA, and a leaf it signed, as PEM files in `dir`.
fn write_pki(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["tollgate-client".into()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    let (ca_p, cert_p, key_p) = (dir.join("ca.pem"), dir.join("c.pem"), dir.join("k.pem"));
    std::fs::write(&ca_p, ca_cert.pem()).expect("write");
    std::fs::write(&cert_p, leaf.pem()).expect("write");
    std::fs::write(&key_p, leaf_key.serialize_pem()).expect("write");
    (ca_p, cert_p, key_p)
}

#[test]
fn tls_files_are_read_and_checked_at_start_with_the_setting_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = write_pki(dir.path());
    let file = |p: &std::path::Path, source: &str| TlsFile {
        path: p.to_path_buf(),
        source: source.into(),
    };
    let mut r = resolve(&otlp_on(""), &[]).expect("on");
    r.tls = OtlpTls {
        ca_file: Some(file(&ca, "export.otlp.ca_file")),
        identity: Some((
            file(&cert, "export.otlp.client_cert"),
            file(&key, "export.otlp.client_key"),
        )),
    };
    super::tls::check_files(&r).expect("a good CA and pair");

    let missing = dir.path().join("missing.pem");
    let other_key = dir.path().join("other.pem");
    std::fs::write(
        &other_key,
        rcgen::KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("write");
    let cases: Vec<(OtlpTls, &str, &str)> = vec![
        (
            OtlpTls {
                ca_file: Some(file(&missing, "OTEL_EXPORTER_OTLP_CERTIFICATE")),
                identity: None,
            },
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            "No such file",
        ),
        (
            OtlpTls {
                ca_file: Some(file(&key, "export.otlp.ca_file")),
                identity: None,
            },
            "export.otlp.ca_file",
            "no CERTIFICATE block",
        ),
        (
            OtlpTls {
                ca_file: None,
                identity: Some((
                    file(&cert, "export.otlp.client_cert"),
                    file(&cert, "export.otlp.client_key"),
                )),
            },
            "export.otlp.client_key",
            "no PRIVATE KEY block",
        ),
        (
            OtlpTls {
                ca_file: None,
                identity: Some((
                    file(&cert, "export.otlp.client_cert"),
                    file(&other_key, "export.otlp.client_key"),
                )),
            },
            "export.otlp.client_key",
            "not a usable key",
        ),
    ];
    for (tls, key, msg) in cases {
        r.tls = tls;
        match super::tls::check_files(&r) {
            Err(e @ super::ExportError::TlsFile { .. }) => {
                assert_eq!(e.exit_code(), crate::exit::UNAVAILABLE, "restartable");
                let super::ExportError::TlsFile { key: k, message } = e else {
                    unreachable!()
                };
                assert_eq!(k, key, "{message}");
                assert!(message.contains(msg), "{key}: {message}");
            }
            Err(e) => panic!("{key}: not a TLS file error: {e}"),
            Ok(_) => panic!("{key}: accepted"),
        }
    }
}

#[test]
fn the_exporters_build_with_each_compression() {
    // The library refuses a compression whose feature it was built
    // without: this fails if a feature is dropped from Cargo.toml.
    for c in ["gzip", "zstd", "none"] {
        let cfg = parse(&format!(
            "[otlp]\nendpoint = \"http://127.0.0.1:1\"\ntimeout_secs = 1\ncompression = \"{c}\"\ntraces = true"
        ));
        let r = resolve(&cfg, &[]).expect("on");
        let res = super::otlp::resource(&super::ResourceInfo::default(), "t");
        super::otlp::meter_provider(&r, res.clone(), None).unwrap_or_else(|e| panic!("{c}: {e}"));
        super::otlp::tracer_provider(&r, res, None).unwrap_or_else(|e| panic!("{c}: {e}"));
    }
    // TLS files the start-up log says an http:// collector does not use
    // are not read either: a missing one stops nothing.
    let plain = parse("[otlp]\nendpoint = \"http://127.0.0.1:1\"\ntimeout_secs = 1");
    let r = resolve(
        &plain,
        &[("OTEL_EXPORTER_OTLP_CERTIFICATE", "/nonexistent/ca.pem")],
    )
    .expect("on");
    let res = super::otlp::resource(&super::ResourceInfo::default(), "t");
    super::otlp::meter_provider(&r, res, None).expect("no TLS file is read for http://");
    assert_eq!(super::check_tls_files(&r), Ok(()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _g = rt.enter();
    for c in ["gzip", "zstd"] {
        let cfg = parse(&format!(
            "[otlp]\nendpoint = \"http://127.0.0.1:1\"\ntimeout_secs = 1\nprotocol = \"grpc\"\ncompression = \"{c}\"\ntraces = true"
        ));
        let r = resolve(&cfg, &[]).expect("on");
        let res = super::otlp::resource(&super::ResourceInfo::default(), "t");
        super::otlp::meter_provider(&r, res.clone(), None).unwrap_or_else(|e| panic!("{c}: {e}"));
        super::otlp::tracer_provider(&r, res, None).unwrap_or_else(|e| panic!("{c}: {e}"));
    }
}
