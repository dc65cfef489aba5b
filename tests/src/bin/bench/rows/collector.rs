//! Row 7: an unreachable OTLP collector does not change request latency.
//! The latency row's client (direct and tollgate alternating on kept-alive
//! connections, canned answers) runs in phases against two agents started
//! in turn: one exporting nothing, one exporting its metrics every second
//! (the default configuration but for the interval) to a collector that
//! refuses every connection (`http://127.0.0.1:1`). Phases alternate (none, unreachable, none, ...)
//! so drift on a shared machine hits both alike; each configuration's
//! added latency is p50(tollgate) − p50(direct) over all its phases.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::Row;
use crate::env::Env;
use crate::report::{Figure, Goal};
use crate::stats::{floats, quantile};

pub struct Collector;

const PATH: &str = "/canned/v1/chat/completions";
/// How far apart the two configurations' added p50 may be (ms): "not
/// measurably" on a shared 2-core machine, where repeated runs of the
/// same configuration differ by about this much.
const SAME_WITHIN_MS: f64 = 0.05;

const UNREACHABLE: &str = r#"
[export.otlp]
endpoint = "http://127.0.0.1:1"
interval_secs = 1
timeout_secs = 2
"#;

/// Samples (µs) of one configuration, over its phases.
#[derive(Default)]
struct Pooled {
    direct: Vec<f64>,
    tollgate: Vec<f64>,
}

impl Pooled {
    fn added(&self, q: f64) -> f64 {
        quantile(&self.tollgate, q) - quantile(&self.direct, q)
    }
}

impl Row for Collector {
    fn id(&self) -> &'static str {
        "collector"
    }

    fn title(&self) -> &'static str {
        "unreachable OTLP collector vs none: added latency"
    }

    fn run(&self, env: &mut Env) -> Result<Vec<Figure>> {
        let (phases, rounds) = if env.quick { (2, 1000) } else { (6, 2000) };
        let mut none = Pooled::default();
        let mut down = Pooled::default();
        for phase in 0..phases * 2 {
            let unreachable = phase % 2 == 1;
            env.start_agent_with(if unreachable { UNREACHABLE } else { "" })?;
            let targets = vec![env.direct_target(PATH), env.tollgate_target(PATH)?];
            let spec = json!({"targets": targets, "rounds": rounds, "max_secs": 120, "warmup": 50});
            // The latency row's client half: the same load, the same output.
            let out = env
                .spawn_client("latency", &spec)?
                .finish(Duration::from_secs(240))?;
            env.stop_agent();
            let pool = if unreachable { &mut down } else { &mut none };
            pool.direct.extend(floats(&out["samples_us"]["direct"]));
            pool.tollgate.extend(floats(&out["samples_us"]["tollgate"]));
        }
        let ms = |us: f64| us / 1000.0;
        let (n50, d50) = (none.added(0.5), down.added(0.5));
        let (n99, d99) = (none.added(0.99), down.added(0.99));
        Ok(vec![
            Figure::info("no exporter: added p50", ms(n50), "ms").note(format!(
                "p99 added {:.3} ms; {} requests each way over {phases} phases",
                ms(n99),
                none.tollgate.len()
            )),
            Figure::info("collector unreachable: added p50", ms(d50), "ms").note(format!(
                "p99 added {:.3} ms; metrics every 1 s to http://127.0.0.1:1 (connection refused)",
                ms(d99),
            )),
            Figure::goal(
                "unreachable − none, added p50",
                ms(d50 - n50),
                "ms",
                Goal::AtMost(SAME_WITHIN_MS),
            )
            .note(format!("p99: {:+.3} ms", ms(d99 - n99))),
        ])
    }
}
