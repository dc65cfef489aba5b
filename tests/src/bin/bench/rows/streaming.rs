//! Row 2: streaming. A 500-event SSE chat completion (the fake spaces its
//! chunks `x-fake-chunk-delay-ms` = 1 ms apart), direct and through
//! tollgate, alternately, each on its own kept-alive connection. Per stream:
//! time to the first complete SSE event and the gaps between events, as
//! the client's reads see them. The request does not ask for usage in the
//! stream (the SDKs' default), so tollgate injects `include_usage` upstream
//! and filters the extra chunk out: the costliest streaming path.
//!
//! A second pass sends the same streams back to back with no delay between
//! chunks. Its time to first chunk is shown beside the goal figure, not as
//! a goal: with 1 ms gaps every process on the path sleeps between events,
//! and after each pause its code runs cold, several times slower on shared
//! virtual machines (see the README's Performance section). The pair shows
//! the agent's work at a stream start both ways.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::Row;
use crate::env::Env;
use crate::load::{self, Connector, Target};
use crate::report::{Figure, Goal};
use crate::stats::{floats, median, quantile};

pub struct Streaming;

const PATH: &str = "/v1/chat/completions";
/// Events in one stream: the role chunk, 497 content chunks, the finish
/// chunk and `[DONE]`.
const EVENTS: usize = 500;
const CONTENT_CHUNKS: u64 = 497;
/// Content chunks of a back-to-back stream: short, so that the first chunk
/// is not raced by the rest of a 100 KB burst.
const HOT_CONTENT_CHUNKS: u64 = 5;
/// Messages in the long request of the back-to-back pass (an agent loop
/// some way in: ≈100 KB of JSON).
const HISTORY_TURNS: u64 = 80;
/// Added time to first chunk and added median gap, at most (ms).
const ADDED_MAX: f64 = 0.15;

impl Row for Streaming {
    fn id(&self) -> &'static str {
        "streaming"
    }

    fn title(&self) -> &'static str {
        "streaming: time to first chunk, chunk gaps"
    }

    fn run(&self, env: &mut Env) -> Result<Vec<Figure>> {
        env.ensure_agent()?;
        let targets = vec![env.direct_target(PATH), env.tollgate_target(PATH)?];
        let (streams, max_secs) = if env.quick { (4, 40) } else { (16, 150) };
        let spec =
            json!({"targets": targets, "streams": streams, "delay_ms": 1, "max_secs": max_secs});
        let conns0 = env.fake.connections();
        let out = env
            .spawn_client(self.id(), &spec)?
            .finish(Duration::from_secs(max_secs + 60))?;
        let conns = env.fake.connections() - conns0;
        // Short streams back to back: time to first chunk, [direct, tollgate].
        let (hot_streams, hot_secs) = if env.quick { (40, 20) } else { (200, 60) };
        let mut back_to_back = |history_turns: u64| -> Result<[Vec<f64>; 2]> {
            let spec = json!({"targets": targets, "streams": hot_streams, "delay_ms": 0,
                "content_chunks": HOT_CONTENT_CHUNKS, "history_turns": history_turns,
                "max_secs": hot_secs});
            let out = env
                .spawn_client(self.id(), &spec)?
                .finish(Duration::from_secs(hot_secs + 60))?;
            Ok(["direct", "tollgate"].map(|name| floats(&out["per_target"][name]["ttfc_us"])))
        };
        let [d_hot, t_hot] = back_to_back(0)?;
        let [d_long, t_long] = back_to_back(HISTORY_TURNS)?;
        let get = |name: &str, k: &str| floats(&out["per_target"][name][k]);
        let ms = |us: f64| us / 1000.0;
        let (d_ttfc, t_ttfc) = (get("direct", "ttfc_us"), get("tollgate", "ttfc_us"));
        let (d_gaps, t_gaps) = (get("direct", "gaps_us"), get("tollgate", "gaps_us"));
        let (d_hdr, t_hdr) = (get("direct", "headers_us"), get("tollgate", "headers_us"));
        let n = t_ttfc.len();
        Ok(vec![
            Figure::goal(
                "tollgate: added time to first chunk (p50)",
                ms(median(&t_ttfc) - median(&d_ttfc)),
                "ms",
                Goal::AtMost(ADDED_MAX),
            )
            .note(format!(
                "direct {:.3} ms, tollgate {:.3} ms (response headers {:.3} / {:.3} ms); {n} streams each; {conns} TLS connections accepted by the fake",
                ms(median(&d_ttfc)),
                ms(median(&t_ttfc)),
                ms(median(&d_hdr)),
                ms(median(&t_hdr))
            )),
            Figure::goal(
                "tollgate: added median inter-chunk gap",
                ms(median(&t_gaps) - median(&d_gaps)),
                "ms",
                Goal::AtMost(ADDED_MAX),
            )
            .note(format!(
                "direct {:.3} ms, tollgate {:.3} ms; p99 gap added {:.3} ms; {EVENTS} events per stream",
                ms(median(&d_gaps)),
                ms(median(&t_gaps)),
                ms(quantile(&t_gaps, 0.99) - quantile(&d_gaps, 0.99))
            )),
            Figure::info(
                "tollgate: added time to first chunk, back to back (p50)",
                ms(median(&t_hot) - median(&d_hot)),
                "ms",
            )
            .note(format!(
                "{HOT_CONTENT_CHUNKS} content chunks, no delay between them, so nothing on the path sleeps between events: direct {:.3} ms, tollgate {:.3} ms; {} streams each",
                ms(median(&d_hot)),
                ms(median(&t_hot)),
                t_hot.len()
            )),
            Figure::info(
                "tollgate: the same with an 80-turn history (p50)",
                ms(median(&t_long) - median(&d_long)),
                "ms",
            )
            .note(format!(
                "a {HISTORY_TURNS}-message, ≈100 KB request body, read whole before forwarding: direct {:.3} ms, tollgate {:.3} ms",
                ms(median(&d_long)),
                ms(median(&t_long)),
            )),
        ])
    }

    fn client(&self, spec: Value, emit: &mut dyn FnMut(Value)) -> Result<()> {
        let targets: Vec<Target> = serde_json::from_value(spec["targets"].clone())?;
        let streams = spec["streams"].as_u64().unwrap_or(4) as usize;
        let delay = spec["delay_ms"].as_u64().unwrap_or(1).to_string();
        let max = Duration::from_secs(spec["max_secs"].as_u64().unwrap_or(60));
        let chunks = spec["content_chunks"].as_u64().unwrap_or(CONTENT_CHUNKS);
        // The role chunk, the content chunks, the finish chunk and `[DONE]`.
        let expected = chunks as usize + 3;
        let messages = match spec["history_turns"].as_u64().unwrap_or(0) {
            0 => json!([{"role": "user", "content": "Explain the failing test in detail."}]),
            turns => history(turns),
        };
        let body = Bytes::from(
            json!({
                "model": "gpt-4o-mini",
                "messages": messages,
                "max_tokens": chunks,
                "stream": true
            })
            .to_string(),
        );
        let rt = load::current_thread()?;
        let per = rt.block_on(async {
            let mut conns = Vec::new();
            for t in &targets {
                let c = Connector::new(t)?;
                let conn = c.connect().await?;
                conns.push((c, conn));
            }
            let mut per: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> =
                vec![Default::default(); conns.len()];
            let deadline = Instant::now() + max;
            // One warm-up stream each, not counted.
            for s in 0..=streams {
                if Instant::now() > deadline {
                    break;
                }
                for k in 0..conns.len() {
                    let i = (s + k) % conns.len();
                    let (c, conn) = &mut conns[i];
                    let req = c.request(&body, &[("x-fake-chunk-delay-ms", &delay)]);
                    let (headers_at, events) =
                        tokio::time::timeout(load::REQUEST_TIMEOUT, one_stream(conn, req))
                            .await
                            .context("stream timed out")?
                            .with_context(|| format!("{}: stream {s}", c.target.name))?;
                    if events.len() != expected {
                        bail!(
                            "{}: {} SSE events, expected {expected}",
                            c.target.name,
                            events.len()
                        );
                    }
                    if s == 0 {
                        continue;
                    }
                    per[i].0.push(events[0]);
                    per[i].1.extend(events.windows(2).map(|w| w[1] - w[0]));
                    per[i].2.push(headers_at);
                }
            }
            Ok::<_, anyhow::Error>(per)
        })?;
        let mut by_name = serde_json::Map::new();
        for (t, (ttfc, gaps, headers)) in targets.iter().zip(per) {
            by_name.insert(
                t.name.clone(),
                json!({"ttfc_us": ttfc, "gaps_us": gaps, "headers_us": headers}),
            );
        }
        emit(json!({"per_target": by_name}));
        Ok(())
    }
}

/// An agent loop's conversation: `turns` messages of about 1.2 KB each.
fn history(turns: u64) -> Value {
    let text = "Here is the failing test output and the diff so far; fix the test. ".repeat(18);
    Value::Array(
        (0..turns)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                json!({"role": role, "content": format!("{text}(turn {i})")})
            })
            .collect(),
    )
}

/// Sends a streaming request; returns when the response headers came and
/// when each SSE event was complete (µs since the request was sent).
async fn one_stream(
    conn: &mut load::Conn,
    req: hyper::Request<http_body_util::Full<Bytes>>,
) -> Result<(f64, Vec<f64>)> {
    conn.ready().await?;
    let t0 = Instant::now();
    let resp = conn.send_request(req).await?;
    let headers_at = t0.elapsed().as_nanos() as f64 / 1000.0;
    if !resp.status().is_success() {
        bail!("HTTP {}", resp.status());
    }
    let mut body = resp.into_body();
    let mut events = Vec::with_capacity(EVENTS);
    let mut prev_nl = false;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let at = t0.elapsed().as_nanos() as f64 / 1000.0;
        for &b in data.iter() {
            let nl = b == b'\n';
            if nl && prev_nl {
                events.push(at);
            }
            prev_nl = nl;
        }
    }
    Ok((headers_at, events))
}
