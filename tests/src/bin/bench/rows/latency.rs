//! Row 1: latency added per non-streaming request on a kept-alive
//! connection. One client process (in the clients cgroup) keeps one
//! HTTP/1.1 connection open to each target and sends the same chat request
//! to each in turn, round after round (the order rotates every round), so
//! drift on a shared machine hits every target alike. The fake answers a
//! canned completion (`/canned/` path) without parsing, like a static file.
//!
//! Added latency is the difference of quantiles: p50(through) − p50(direct)
//! and p99(through) − p99(direct). Two client runs: part A alternates
//! direct and tollgate only (tollgate's targets); part B adds mitmproxy and
//! LiteLLM to the rotation (the ratios). Between two of tollgate's requests
//! part B runs ≈12 ms of the peers' Python, which leaves every path cold
//! (caches, predictors), so tollgate's added time there is larger than in
//! part A whichever target ran just before it (`--latency-samples` writes
//! part B's samples too, to check that). The peers run only for part B.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::Row;
use crate::env::Env;
use crate::load::{self, Connector, Target};
use crate::peers::PeerKind;
use crate::report::{Figure, Goal};
use crate::stats::{cpu_secs, floats, quantile};

pub struct Latency;

const PATH: &str = "/canned/v1/chat/completions";
/// Added p50 and p99 targets (ms).
const P50_MAX: f64 = 0.15;
const P99_MAX: f64 = 0.5;
/// How many times less latency than each peer tollgate must add.
const VS_LITELLM: f64 = 50.0;
const VS_MITMPROXY: f64 = 10.0;

/// Per-target latency samples (µs) from one client run.
struct Samples {
    rounds: f64,
    by_target: Value,
}

impl Samples {
    fn q(&self, name: &str, q: f64) -> f64 {
        quantile(&floats(&self.by_target[name]), q)
    }
}

impl Latency {
    /// One client run: `rounds` rounds over `targets`, one request each.
    fn measure(
        &self,
        env: &mut Env,
        targets: &[Target],
        rounds: u64,
        warmup: u64,
    ) -> Result<Samples> {
        let max_secs = if env.quick { 60 } else { 240 };
        let spec =
            json!({"targets": targets, "rounds": rounds, "max_secs": max_secs, "warmup": warmup});
        let out = env
            .spawn_client(self.id(), &spec)?
            .finish(Duration::from_secs(max_secs + 120))?;
        Ok(Samples {
            rounds: out["rounds"].as_f64().unwrap_or(0.0),
            by_target: out["samples_us"].clone(),
        })
    }
}

impl Row for Latency {
    fn id(&self) -> &'static str {
        "latency"
    }

    fn title(&self) -> &'static str {
        "added latency, non-streaming, kept-alive"
    }

    fn run(&self, env: &mut Env) -> Result<Vec<Figure>> {
        env.ensure_agent()?;
        let pair = vec![env.direct_target(PATH), env.tollgate_target(PATH)?];
        let ms = |us: f64| us / 1000.0;
        // Part A: direct and tollgate alone, interleaved request by request.
        let (rounds, warmup) = if env.quick { (1000, 50) } else { (5000, 100) };
        let agent_pid = env.agent.as_ref().map_or(0, |a| u64::from(a.pid));
        let cpu0 = cpu_secs(agent_pid);
        let a = self.measure(env, &pair, rounds, warmup)?;
        let agent_cpu = cpu_secs(agent_pid) - cpu0;
        if let Some(p) = &env.latency_samples {
            std::fs::write(p, a.by_target.to_string())
                .with_context(|| format!("writing {}", p.display()))?;
        }
        let served = a.rounds + warmup as f64;
        let (d50, d99) = (a.q("direct", 0.5), a.q("direct", 0.99));
        let (t50, t99) = (a.q("tollgate", 0.5) - d50, a.q("tollgate", 0.99) - d99);
        let mut figs = vec![
            Figure::info("direct: p50 per request", ms(d50), "ms").note(format!(
                "p99 {:.3} ms; {} requests each, direct and tollgate alternating",
                ms(d99),
                a.rounds
            )),
            Figure::goal("tollgate: added p50", ms(t50), "ms", Goal::AtMost(P50_MAX)).note(
                format!("p50 {:.3} ms through tollgate", ms(a.q("tollgate", 0.5))),
            ),
            Figure::goal("tollgate: added p99", ms(t99), "ms", Goal::AtMost(P99_MAX)),
            Figure::info(
                "tollgate: agent CPU per request",
                1e6 * agent_cpu / served,
                "us",
            )
            .note("user + system time of the agent in part A ÷ its requests"),
        ];
        // Part B: all four interleaved, for the ratios (the peers' own
        // background work after each answer then weighs on everyone alike).
        // The peers start only now and stop at the end of the row: idle,
        // they still run timers and background tasks (LiteLLM's Python
        // event loop), noise for part A and for every later row.
        let mut all = pair.clone();
        let mut missing = Vec::new();
        for kind in [PeerKind::Mitmproxy, PeerKind::Litellm] {
            match env.peer(kind) {
                Ok(t) => all.push(t),
                Err(e) => {
                    eprintln!("bench: {kind} unavailable: {e:#}");
                    missing.push((kind, format!("{e:#}")));
                }
            }
        }
        if all.len() > pair.len() {
            let rounds = if env.quick { 200 } else { 1500 };
            let b = self.measure(env, &all, rounds, 20)?;
            if let Some(p) = &env.latency_samples {
                let p = p.with_extension("partb.json");
                std::fs::write(&p, b.by_target.to_string())
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            let (d50, d99) = (b.q("direct", 0.5), b.q("direct", 0.99));
            let tb = b.q("tollgate", 0.5) - d50;
            // A ratio needs a positive denominator: below 1 µs counts as 1 µs.
            let floor = tb.max(1.0);
            for kind in [PeerKind::Litellm, PeerKind::Mitmproxy] {
                let name = kind.name();
                if missing.iter().any(|(k, _)| *k == kind) {
                    continue;
                }
                let (p50, p99) = (b.q(name, 0.5) - d50, b.q(name, 0.99) - d99);
                figs.push(Figure::info(format!("{name}: added p50"), ms(p50), "ms").note(
                    format!(
                        "p99 added {:.3} ms; part B: {} rounds of all four, tollgate added p50 there {:.3} ms",
                        ms(p99),
                        b.rounds,
                        ms(tb)
                    ),
                ));
                let want = if kind == PeerKind::Litellm {
                    VS_LITELLM
                } else {
                    VS_MITMPROXY
                };
                figs.push(Figure::goal(
                    format!("{name} added ÷ tollgate added (p50)"),
                    p50 / floor,
                    "x",
                    Goal::AtLeast(want),
                ));
            }
        }
        for (kind, why) in &missing {
            let want = if *kind == PeerKind::Litellm {
                VS_LITELLM
            } else {
                VS_MITMPROXY
            };
            let why: String = why
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .chars()
                .take(240)
                .collect();
            let name = kind.name();
            figs.push(Figure::skipped(
                format!("{name}: added p50"),
                "ms",
                None,
                why.clone(),
            ));
            figs.push(Figure::skipped(
                format!("{name} added ÷ tollgate added (p50)"),
                "x",
                Some(Goal::AtLeast(want)),
                why,
            ));
        }
        env.note("latency: LiteLLM proxy (1 worker) serves TLS with a test-CA leaf and forwards to the fake over TLS verified against the test CA (ssl_verify + SSL_CERT_FILE); mitmproxy runs as `mitmdump --mode reverse:https://api.openai.com:443`, verifying the fake with ssl_verify_upstream_trusted_ca");
        env.note(format!("peers: {}", crate::peers::versions()));
        env.stop_peers();
        Ok(figs)
    }

    fn client(&self, spec: Value, emit: &mut dyn FnMut(Value)) -> Result<()> {
        let targets: Vec<Target> = serde_json::from_value(spec["targets"].clone())?;
        let rounds = spec["rounds"].as_u64().unwrap_or(100) as usize;
        let warmup = spec["warmup"].as_u64().unwrap_or(20) as usize;
        let max = Duration::from_secs(spec["max_secs"].as_u64().unwrap_or(60));
        let rt = load::current_thread()?;
        let (samples, done) = rt.block_on(async {
            let body = load::chat_body("gpt-4o-mini");
            let mut conns = Vec::new();
            for t in &targets {
                let c = Connector::new(t)?;
                let conn = c.connect().await?;
                conns.push((c, conn));
            }
            for (c, conn) in conns.iter_mut() {
                for _ in 0..warmup {
                    load::roundtrip(conn, c.request(&body, &[]))
                        .await
                        .with_context(|| format!("{}: warm-up request", c.target.name))?;
                }
            }
            let mut samples = vec![Vec::with_capacity(rounds); conns.len()];
            let deadline = Instant::now() + max;
            let mut done = 0;
            for r in 0..rounds {
                if Instant::now() > deadline {
                    break;
                }
                for k in 0..conns.len() {
                    let i = (r + k) % conns.len();
                    let (c, conn) = &mut conns[i];
                    let dt = load::roundtrip(conn, c.request(&body, &[]))
                        .await
                        .with_context(|| format!("{}: request {r}", c.target.name))?;
                    samples[i].push(dt.as_nanos() as f64 / 1000.0);
                }
                done += 1;
            }
            Ok::<_, anyhow::Error>((samples, done))
        })?;
        let mut by_name = serde_json::Map::new();
        for (t, s) in targets.iter().zip(samples) {
            by_name.insert(t.name.clone(), json!(s));
        }
        emit(json!({"rounds": done, "samples_us": by_name}));
        Ok(())
    }
}
