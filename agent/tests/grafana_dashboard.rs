//! deploy/grafana/tollgate.json queries only metrics tollgate exports: every
//! metric name in its PromQL is in deploy/grafana/metrics.txt, every name in
//! that list is derived from an exported instrument (semconv name, unit and
//! kind, translated the way Prometheus does), and every label it uses is a
//! translated attribute key.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use serde_json::Value;
use tollgate::export::semconv as sc;

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana")
        .join(file)
}

fn allowed_metrics() -> BTreeSet<String> {
    let path = deploy("metrics.txt");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Histogram,
}

/// The Prometheus series names of an OTLP instrument under the default
/// translation (UnderscoreEscapingWithSuffixes).
fn prometheus_names(name: &str, unit: &str, kind: Kind) -> Vec<String> {
    let mut base = name.replace('.', "_");
    let suffix = match unit {
        "s" => "seconds",
        "1" => "",
        u if u.contains('{') => "",
        u => u,
    };
    if !suffix.is_empty() && !base.ends_with(suffix) {
        base = format!("{base}_{suffix}");
    }
    match kind {
        Kind::Counter => vec![format!("{base}_total")],
        Kind::Histogram => ["bucket", "sum", "count"]
            .iter()
            .map(|s| format!("{base}_{s}"))
            .collect(),
    }
}

/// What tollgate exports (default generation), with the units and kinds of
/// agent/src/export/metrics.rs.
fn exported() -> BTreeSet<String> {
    let instruments = [
        (sc::M_TOKEN_USAGE, "{token}", Kind::Histogram),
        (sc::M_OPERATION_DURATION, "s", Kind::Histogram),
        (sc::M_TIME_TO_FIRST_CHUNK, "s", Kind::Histogram),
        (sc::M_COST, "USD", Kind::Counter),
        (sc::M_REQUESTS, "{request}", Kind::Counter),
        (sc::M_CONN_INTERCEPTED, "{connection}", Kind::Counter),
        (sc::M_CONN_PASSTHROUGH, "{connection}", Kind::Counter),
        (sc::M_CONN_REFUSED, "{connection}", Kind::Counter),
        (sc::M_CONN_OTHER_NETNS, "{connection}", Kind::Counter),
        (sc::M_CONN_UDP_REFUSED, "{connection}", Kind::Counter),
        (sc::M_EXPORT_DROPPED, "{record}", Kind::Counter),
        (sc::M_LEDGER_ERRORS, "{error}", Kind::Counter),
    ];
    instruments
        .iter()
        .flat_map(|(n, u, k)| prometheus_names(n, u, *k))
        .collect()
}

/// Attribute keys the metrics carry, as Prometheus labels, plus `le`.
fn allowed_labels() -> HashSet<String> {
    [
        sc::GEN_AI_OPERATION_NAME,
        sc::GEN_AI_PROVIDER_NAME,
        sc::GEN_AI_REQUEST_MODEL,
        sc::GEN_AI_RESPONSE_MODEL,
        sc::GEN_AI_TOKEN_TYPE,
        sc::SERVER_ADDRESS,
        sc::ERROR_TYPE,
        sc::CICD_PIPELINE_NAME,
        sc::CICD_PIPELINE_TASK_NAME,
        sc::CICD_WORKER_NAME,
        sc::VCS_REPOSITORY_NAME,
        sc::VCS_OWNER_NAME,
        sc::PROCESS_EXECUTABLE_NAME,
        sc::TOLLGATE_TEAM,
        sc::TOLLGATE_CI_SYSTEM,
    ]
    .iter()
    .map(|k| k.replace('.', "_"))
    .chain(["le".to_string()])
    .collect()
}

const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
];

/// Aggregation operators (`sum by (x) (...)` puts a keyword before the call).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Metric names and label names used in a PromQL expression.
fn scan(expr: &str) -> (Vec<String>, Vec<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let mut metrics = Vec::new();
    let mut labels = Vec::new();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let read_ident = |i: &mut usize| -> String {
        let s = *i;
        while *i < chars.len() && ident_char(chars[*i]) {
            *i += 1;
        }
        chars[s..*i].iter().collect()
    };
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
                i += 1;
            }
            '{' => {
                // Label matchers: name op "value", ...
                i += 1;
                while i < chars.len() && chars[i] != '}' {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                        i += 1;
                    } else if ident_start(chars[i]) {
                        labels.push(read_ident(&mut i));
                    } else {
                        i += 1;
                    }
                }
                i += 1;
            }
            '$' => {
                i += 1;
                read_ident(&mut i);
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if ident_start(c) => {
                let word = read_ident(&mut i);
                let mut j = i;
                skip_ws(&mut j);
                let call = j < chars.len() && chars[j] == '(';
                if KEYWORDS.contains(&word.as_str()) {
                    if call {
                        // by (a, b): a label list.
                        j += 1;
                        while j < chars.len() && chars[j] != ')' {
                            if ident_start(chars[j]) {
                                labels.push(read_ident(&mut j));
                            } else {
                                j += 1;
                            }
                        }
                        i = j + 1;
                    }
                } else if !call && !AGGREGATIONS.contains(&word.as_str()) {
                    metrics.push(word);
                }
            }
            _ => i += 1,
        }
    }
    (metrics, labels)
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter());
        }
    }
    out
}

#[test]
fn the_metric_list_is_what_tollgate_exports() {
    let allowed = allowed_metrics();
    let exported = exported();
    assert!(!allowed.is_empty());
    let unknown: Vec<&String> = allowed.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "deploy/grafana/metrics.txt lists names tollgate does not export: {unknown:?} (exported: {exported:?})"
    );
    assert!(allowed.contains("tollgate_cost_USD_total"));
}

#[test]
fn every_query_uses_listed_metrics_and_known_labels() {
    let path = deploy("tollgate.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let allowed = allowed_metrics();
    let labels = allowed_labels();
    let mut used = BTreeSet::new();
    let mut ids = HashSet::new();
    let mut queries = 0;

    let mut check = |what: &str, expr: &str| {
        let (metrics, ls) = scan(expr);
        assert!(!metrics.is_empty(), "{what}: no metric in `{expr}`");
        for m in metrics {
            assert!(
                allowed.contains(&m),
                "{what}: `{m}` is not in deploy/grafana/metrics.txt (query `{expr}`)"
            );
            used.insert(m);
        }
        for l in ls {
            assert!(
                labels.contains(&l),
                "{what}: unknown label `{l}` in `{expr}`"
            );
        }
    };

    for p in panels(&dash) {
        let title = p["title"].as_str().expect("every panel has a title");
        let id = p["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().expect("x"), g["w"].as_u64().expect("w"));
        assert!(x + w <= 24, "{title}: wider than the grid");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expr");
            check(title, expr);
            queries += 1;
            // Legends only name labels the query keeps.
            let legend = t["legendFormat"].as_str().unwrap_or("");
            for part in legend.split("{{").skip(1) {
                let l = part.split("}}").next().unwrap_or("").trim();
                assert!(labels.contains(l), "{title}: legend label `{l}`");
            }
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        let Some(q) = v["definition"].as_str() else {
            continue;
        };
        let args = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: not label_values(): {q}", v["name"]));
        let (metric, label) = args.split_once(',').expect("label_values(metric, label)");
        check(&format!("variable {}", v["name"]), metric.trim());
        assert!(
            labels.contains(label.trim()),
            "variable {}: label {label}",
            v["name"]
        );
    }
    assert!(queries >= 15, "only {queries} queries");
    // What the issue asks for is there.
    for m in [
        "tollgate_cost_USD_total",
        "gen_ai_client_token_usage_sum",
        "gen_ai_client_operation_duration_seconds_bucket",
        "tollgate_requests_total",
    ] {
        assert!(used.contains(m), "no panel uses {m}");
    }
    for needle in [
        "sum by (vcs_owner_name, vcs_repository_name)",
        "cicd_pipeline_task_name",
        "sum by (gen_ai_request_model)",
        "sum by (tollgate_team)",
        "histogram_quantile(0.95",
        "histogram_quantile(0.5",
        "error_type",
    ] {
        assert!(text.contains(needle), "the dashboard has no `{needle}`");
    }
}

#[test]
fn the_scanner_reads_promql() {
    let (m, l) = scan(
        "histogram_quantile(0.95, sum by (le, gen_ai_provider_name) (rate(a_b_bucket{x=~\"$v\", y!=\"a b\"}[$__rate_interval]))) / on(z) sum(b_total offset 5m) * 3600",
    );
    assert_eq!(m, ["a_b_bucket", "b_total"]);
    assert_eq!(l, ["le", "gen_ai_provider_name", "x", "y", "z"]);
}
