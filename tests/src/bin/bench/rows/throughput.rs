//! Row 3: throughput at saturation. A fixed number of kept-alive client
//! connections (16), each sending canned chat requests back to back, for
//! a fixed time; phases alternate direct / tollgate so drift hits both.
//! On a 2-core machine the client, the fake and the agent share the CPUs,
//! so the ratio shows what the agent's work costs the whole machine.
//!
//! A second, shorter run sends unmetered requests (GET of a model list,
//! forwarded but never recorded) the same way: the agent's cost as a plain
//! TLS-terminating proxy, shown beside the goal to split the agent's CPU
//! into proxying and metering.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::Row;
use crate::env::Env;
use crate::load::{self, Connector, Target};
use crate::report::{Figure, Goal};

pub struct Throughput;

const PATH: &str = "/canned/v1/chat/completions";
/// Unmetered: a GET is forwarded but not recorded.
const UNMETERED_PATH: &str = "/canned/v1/models";
const CONCURRENCY: usize = 16;
/// Throughput through tollgate relative to direct, at least (%).
const MIN_PERCENT: f64 = 50.0;

impl Row for Throughput {
    fn id(&self) -> &'static str {
        "throughput"
    }

    fn title(&self) -> &'static str {
        "throughput at saturation (16 connections)"
    }

    fn run(&self, env: &mut Env) -> Result<Vec<Figure>> {
        env.ensure_agent()?;
        let (pairs, phase_secs) = if env.quick { (2, 1.5) } else { (4, 3.0) };
        let m = measure(env, self.id(), PATH, "POST", pairs, phase_secs)?;
        let plain = measure(env, self.id(), UNMETERED_PATH, "GET", pairs / 2, phase_secs)?;
        let (rps, us) = (m.rps, |i: usize, k: usize| m.us(i, k));
        Ok(vec![
            Figure::info("direct: requests/s", rps[0], "req/s").note(format!(
                "{CONCURRENCY} connections, {pairs} pairs of phases of {phase_secs} s each"
            )),
            Figure::info("tollgate: requests/s", rps[1], "req/s").note(format!(
                "the agent opened {} TLS connections to the fake over {} phases of {CONCURRENCY} client connections",
                m.upstream_conns, m.agent_phases
            )),
            Figure::info(
                "direct: CPU per request (client + fake)",
                us(0, 0) + us(0, 1),
                "us",
            )
            .note(format!(
                "client {:.1} µs, fake {:.1} µs",
                us(0, 0),
                us(0, 1)
            )),
            Figure::info(
                "tollgate: CPU per request (client + fake + agent)",
                us(1, 0) + us(1, 1) + us(1, 2),
                "us",
            )
            .note(format!(
                "agent {:.1} µs, client {:.1} µs, fake {:.1} µs",
                us(1, 2),
                us(1, 0),
                us(1, 1)
            )),
            Figure::goal(
                "tollgate throughput, % of direct",
                100.0 * rps[1] / rps[0],
                "%",
                Goal::AtLeast(MIN_PERCENT),
            ),
            Figure::info(
                "unmetered GET through tollgate, % of direct",
                100.0 * plain.rps[1] / plain.rps[0],
                "%",
            )
            .note(format!(
                "forwarded, not recorded: agent {:.1} µs per request (metered above: {:.1} µs); {:.0} vs {:.0} req/s",
                plain.us(1, 2),
                us(1, 2),
                plain.rps[1],
                plain.rps[0]
            )),
        ])
    }

    fn client(&self, spec: Value, emit: &mut dyn FnMut(Value)) -> Result<()> {
        let targets: Vec<Target> = serde_json::from_value(spec["targets"].clone())?;
        let schedule: Vec<usize> = serde_json::from_value(spec["schedule"].clone())?;
        let phase = Duration::from_secs_f64(spec["phase_secs"].as_f64().unwrap_or(1.0));
        let conc = spec["concurrency"].as_u64().unwrap_or(16) as usize;
        let pids = [
            ("client", Some(std::process::id() as u64)),
            ("fake", spec["pids"]["fake"].as_u64()),
            ("agent", spec["pids"]["agent"].as_u64()),
        ];
        let cpu_now = || -> Vec<f64> {
            pids.iter()
                .map(|(_, p)| p.map_or(0.0, crate::stats::cpu_secs))
                .collect()
        };
        let method: hyper::Method = spec["method"].as_str().unwrap_or("POST").parse()?;
        let rt = load::multi_thread()?;
        let phases = rt.block_on(async {
            let body = if method == hyper::Method::POST {
                load::chat_body("gpt-4o-mini")
            } else {
                bytes::Bytes::new()
            };
            let mut phases = Vec::new();
            for &i in &schedule {
                let c = Connector::new(&targets[i])?;
                let mut conns = Vec::new();
                for _ in 0..conc {
                    let mut conn = c.connect().await?;
                    load::roundtrip(&mut conn, c.request_as(method.clone(), &body, &[]))
                        .await
                        .with_context(|| format!("{}: warm-up", c.target.name))?;
                    conns.push(conn);
                }
                let count = Arc::new(AtomicU64::new(0));
                let cpu0 = cpu_now();
                let start = Instant::now();
                let deadline = start + phase;
                let mut tasks = Vec::new();
                for mut conn in conns {
                    let (c, body, count) = (c.clone(), body.clone(), count.clone());
                    let method = method.clone();
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < deadline {
                            load::roundtrip(&mut conn, c.request_as(method.clone(), &body, &[]))
                                .await?;
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok::<_, anyhow::Error>(())
                    }));
                }
                for t in tasks {
                    t.await?
                        .with_context(|| format!("{}: request", c.target.name))?;
                }
                let secs = start.elapsed().as_secs_f64();
                let cpu: serde_json::Map<String, Value> = pids
                    .iter()
                    .zip(cpu_now().iter().zip(&cpu0))
                    .map(|((who, _), (b, a))| (who.to_string(), json!(b - a)))
                    .collect();
                phases.push(
                    json!({"target": c.target.name, "requests": count.load(Ordering::Relaxed),
                    "secs": secs, "cpu_secs": cpu}),
                );
            }
            Ok::<_, anyhow::Error>(phases)
        })?;
        emit(json!({"phases": phases}));
        Ok(())
    }
}

/// Requests per second and CPU seconds of [client, fake, agent], per
/// target ([direct, tollgate]).
struct Measured {
    rps: [f64; 2],
    req: [f64; 2],
    cpu: [[f64; 3]; 2],
    /// TLS connections the agent opened to the fake over the run.
    upstream_conns: usize,
    /// Phases through tollgate.
    agent_phases: usize,
}

impl Measured {
    /// CPU µs per request of `who` (0 client, 1 fake, 2 agent) for target `i`.
    fn us(&self, i: usize, who: usize) -> f64 {
        1e6 * self.cpu[i][who] / self.req[i]
    }
}

/// Runs `pairs` pairs of phases (direct and tollgate) of `method` requests
/// to `path`.
fn measure(
    env: &mut Env,
    id: &str,
    path: &str,
    method: &str,
    pairs: usize,
    phase_secs: f64,
) -> Result<Measured> {
    let targets = vec![env.direct_target(path), env.tollgate_target(path)?];
    // d t t d d t t d ...: each target goes first as often as second.
    let schedule: Vec<usize> = (0..pairs.max(1))
        .flat_map(|p| if p % 2 == 0 { [0, 1] } else { [1, 0] })
        .collect();
    // The client samples the CPU time of the agent and of the fake (this
    // process) at its phase boundaries.
    let agent_pid = env.agent.as_ref().map(|a| a.pid);
    let pids = json!({"agent": agent_pid, "fake": std::process::id()});
    let spec = json!({"targets": targets, "schedule": schedule, "phase_secs": phase_secs,
        "concurrency": CONCURRENCY, "pids": pids, "method": method});
    let budget = Duration::from_secs_f64(schedule.len() as f64 * (phase_secs + 20.0) + 30.0);
    let conns0 = env.fake.connections();
    let out = env.spawn_client(id, &spec)?.finish(budget)?;
    // The direct phases' own connections are the client's, one per slot.
    let direct_phases = schedule.iter().filter(|&&i| i == 0).count();
    let upstream_conns =
        (env.fake.connections() - conns0).saturating_sub(direct_phases * CONCURRENCY);
    let mut req = [0f64; 2];
    let mut secs = [0f64; 2];
    let mut cpu = [[0f64; 3]; 2];
    for p in out["phases"].as_array().context("no phases")? {
        let i = usize::from(p["target"].as_str() == Some("tollgate"));
        req[i] += p["requests"].as_f64().unwrap_or(0.0);
        secs[i] += p["secs"].as_f64().unwrap_or(0.0);
        for (k, who) in ["client", "fake", "agent"].iter().enumerate() {
            cpu[i][k] += p["cpu_secs"][who].as_f64().unwrap_or(0.0);
        }
    }
    Ok(Measured {
        rps: [req[0] / secs[0], req[1] / secs[1]],
        req,
        cpu,
        upstream_conns,
        agent_phases: schedule.len() - direct_phases,
    })
}
