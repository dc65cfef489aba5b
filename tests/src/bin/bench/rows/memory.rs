//! Row 4: the agent's resident memory (VmRSS from /proc/PID/status), idle
//! (a fresh agent, after start and before its first request) and at peak
//! (VmHWM, plus VmRSS sampled every 100 ms) while 1,000 SSE streams are
//! open through it at once. The fake spaces chunks 100 ms apart so the
//! streams stay open; a stream counts as open once its first event has
//! reached the client. The client raises its RLIMIT_NOFILE. Between the
//! two, one answer without usage makes the agent count tokens locally, so
//! the peak includes the tokenizer tables (shown on their own too).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::Row;
use crate::env::Env;
use crate::load::{self, Connector, Target};
use crate::report::{Figure, Goal};

pub struct Memory;

const STREAMS: usize = 1000;
const IDLE_MAX_MIB: f64 = 25.0;
const PEAK_MAX_MIB: f64 = 128.0;
/// How long all streams are held open once they are (ms).
const HOLD_MS: u64 = 3000;

impl Row for Memory {
    fn id(&self) -> &'static str {
        "memory"
    }

    fn title(&self) -> &'static str {
        "agent resident memory: idle, 1,000 open streams"
    }

    fn run(&self, env: &mut Env) -> Result<Vec<Figure>> {
        env.start_agent()?;
        std::thread::sleep(Duration::from_secs(1));
        let agent = env.agent.as_ref().context("agent")?;
        let idle = agent.rss_kib().context("no VmRSS for the agent")? as f64 / 1024.0;
        let ready_ms = agent.ready_after.as_secs_f64() * 1000.0;
        let target = env.tollgate_target("/v1/chat/completions")?;
        // One answer without usage: the agent counts it locally, which
        // loads the o200k_base tables (built on first need, kept).
        // (From a client: only processes in the bench's cgroup are
        // intercepted.)
        env.spawn_client(self.id(), &json!({"target": target, "estimate_once": true}))?
            .finish(Duration::from_secs(30))?;
        std::thread::sleep(Duration::from_secs(2));
        let agent = env.agent.as_ref().context("agent")?;
        let counted = agent.rss_kib().context("no VmRSS for the agent")? as f64 / 1024.0;
        // Streams last 100 ms × 400 chunks = 40 s: longer than opening
        // them all (bounded by open_secs) plus the hold.
        let open_secs = if env.quick { 10 } else { 30 };
        let spec = json!({
            "target": target, "streams": STREAMS, "open_parallel": 32,
            "open_secs": open_secs, "hold_ms": HOLD_MS, "delay_ms": 100, "max_tokens": 400,
        });
        let mut client = env.spawn_client(self.id(), &spec)?;
        let agent = env.agent.as_ref().context("agent")?;
        let mut sampled = 0u64;
        let mut opened = None;
        let deadline = Instant::now() + Duration::from_secs(open_secs + 60);
        while Instant::now() < deadline {
            sampled = sampled.max(agent.rss_kib().unwrap_or(0));
            // A timeout here is the sampling tick.
            if let Ok(v) = client.next(Duration::from_millis(100))
                && v.get("open").is_some()
            {
                opened = Some(v);
                break;
            }
            if client.exited() {
                break;
            }
        }
        let Some(opened) = opened else {
            client.finish(Duration::from_secs(5))?;
            anyhow::bail!("the client never reported its streams open");
        };
        let hold_end = Instant::now() + Duration::from_millis(HOLD_MS);
        while Instant::now() < hold_end {
            sampled = sampled.max(agent.rss_kib().unwrap_or(0));
            std::thread::sleep(Duration::from_millis(100));
        }
        let hwm = agent.hwm_kib().unwrap_or(0);
        let end = client.finish(Duration::from_secs(60))?;
        let peak = hwm.max(sampled) as f64 / 1024.0;
        env.stop_agent();
        let open = opened["open"].as_u64().unwrap_or(0);
        let still = end["still_open"].as_u64().unwrap_or(0);
        let errors = end["errors"].as_u64().unwrap_or(0);
        Ok(vec![
            Figure::goal(
                "agent RSS idle (after start)",
                idle,
                "MiB",
                Goal::AtMost(IDLE_MAX_MIB),
            )
            .note(format!(
                "start to ready: {ready_ms:.0} ms (CA loaded, programs attached)"
            )),
            Figure::info(
                "agent RSS after its first local token count",
                counted,
                "MiB",
            )
            .note(format!(
                "{:.1} MiB for the o200k_base tables, loaded on first need (a response without usage)",
                counted - idle
            )),
            Figure::goal(
                format!("agent RSS peak, {STREAMS} open streams"),
                peak,
                "MiB",
                Goal::AtMost(PEAK_MAX_MIB),
            )
            .note(format!(
                "{:.1} KiB per stream (above the RSS before them); {:.1} s to open all",
                (peak - counted) * 1024.0 / open.max(1) as f64,
                opened["open_secs"].as_f64().unwrap_or(0.0)
            )),
            Figure::goal(
                "streams open at once",
                open as f64,
                "streams",
                Goal::AtLeast(STREAMS as f64),
            )
            .note(format!(
                "{still} still streaming at the end of the hold; {errors} errors"
            )),
        ])
    }

    fn client(&self, spec: Value, emit: &mut dyn FnMut(Value)) -> Result<()> {
        let target: Target = serde_json::from_value(spec["target"].clone())?;
        if spec["estimate_once"].as_bool() == Some(true) {
            estimate_once(&target)?;
            emit(json!({"estimated": true}));
            return Ok(());
        }
        let n = spec["streams"].as_u64().unwrap_or(10) as usize;
        let parallel = spec["open_parallel"].as_u64().unwrap_or(16) as usize;
        let open_for = Duration::from_secs(spec["open_secs"].as_u64().unwrap_or(60));
        let hold = Duration::from_millis(spec["hold_ms"].as_u64().unwrap_or(1000));
        let delay = spec["delay_ms"].as_u64().unwrap_or(100).to_string();
        let body = Bytes::from(
            json!({
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "Stream a long answer."}],
                "max_tokens": spec["max_tokens"].as_u64().unwrap_or(300),
                "stream": true
            })
            .to_string(),
        );
        let rt = load::multi_thread()?;
        let c = Connector::new(&target)?;
        let open = Arc::new(AtomicUsize::new(0));
        let live = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
        let opened = rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..n {
                let (c, body, delay) = (c.clone(), body.clone(), delay.clone());
                let (open, live, errors, gate) = (open.clone(), live.clone(), errors.clone(), gate.clone());
                let mut stop = stop_rx.clone();
                tasks.push(tokio::spawn(async move {
                    let r = async {
                        // The gate bounds concurrent handshakes only.
                        let permit = gate.acquire_owned().await?;
                        let mut conn = c.connect().await?;
                        drop(permit);
                        conn.ready().await?;
                        let resp = conn
                            .send_request(c.request(&body, &[("x-fake-chunk-delay-ms", &delay)]))
                            .await?;
                        anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
                        let mut b = resp.into_body();
                        let mut first = true;
                        live.fetch_add(1, Ordering::Relaxed);
                        loop {
                            tokio::select! {
                                _ = stop.changed() => break,
                                f = b.frame() => match f {
                                    Some(Ok(f)) => {
                                        if first && f.data_ref().is_some_and(|d| !d.is_empty()) {
                                            first = false;
                                            open.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                    Some(Err(e)) => { live.fetch_sub(1, Ordering::Relaxed); return Err(e.into()); }
                                    None => break,
                                }
                            }
                        }
                        if !*stop.borrow() {
                            live.fetch_sub(1, Ordering::Relaxed);
                        }
                        drop(conn);
                        Ok::<_, anyhow::Error>(())
                    }
                    .await;
                    if r.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            let deadline = Instant::now() + open_for;
            while open.load(Ordering::Relaxed) + errors.load(Ordering::Relaxed) < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let opened = open.load(Ordering::Relaxed);
            (opened, tasks)
        });
        let (opened, tasks) = opened;
        emit(json!({"open": opened, "open_secs": started.elapsed().as_secs_f64()}));
        std::thread::sleep(hold);
        let still = live.load(Ordering::Relaxed);
        let _ = stop_tx.send(true);
        // Streams still queued (no response yet) do not watch `stop`: end
        // every task; dropping the runtime closes the connections.
        std::thread::sleep(Duration::from_millis(200));
        for t in &tasks {
            t.abort();
        }
        emit(json!({"still_open": still, "errors": errors.load(Ordering::Relaxed)}));
        rt.shutdown_timeout(Duration::from_secs(2));
        Ok(())
    }
}

/// Sends one chat request whose answer carries no usage (the fake leaves
/// it out on `x-fake-no-usage`), so the agent estimates its tokens.
fn estimate_once(target: &Target) -> Result<()> {
    let rt = load::current_thread()?;
    let c = Connector::new(target)?;
    let body = load::chat_body("gpt-4o-mini");
    rt.block_on(async {
        let mut conn = tokio::time::timeout(Duration::from_secs(5), c.connect()).await??;
        load::roundtrip(&mut conn, c.request(&body, &[("x-fake-no-usage", "1")])).await
    })
    .context("a request without usage through the agent")?;
    Ok(())
}
