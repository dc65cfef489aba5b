//! The fake's Claude Managed Agents sessions (`/v1/sessions` on
//! api.anthropic.com): create, retrieve, list, send events, list events.
//! Each user event sent makes the "agent" run one turn, which adds to the
//! session's cumulative usage: 1,000 input tokens plus the words sent,
//! 500 cache reads, 200 cache writes (5 minutes) and 250 output tokens.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use serde_json::{Value, json};

use super::{Body, json_response, text_words};

const MODEL: &str = "claude-opus-4-6";

#[derive(Default, Clone, Copy)]
struct Usage {
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
}

struct Session {
    usage: Usage,
    turns: u64,
}

static SESSIONS: LazyLock<Mutex<HashMap<String, Session>>> = LazyLock::new(Default::default);
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn usage_json(u: Usage) -> Value {
    json!({"input_tokens": u.input, "output_tokens": u.output,
        "cache_read_input_tokens": u.cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": u.cache_write, "ephemeral_1h_input_tokens": 0}})
}

fn session_json(id: &str, s: &Session) -> Value {
    json!({"type": "session", "id": id, "status": "idle", "title": null,
        "agent": {"type": "agent", "id": "agent_fake", "version": 1, "name": "reviewer",
            "description": null, "system": null, "model": {"id": MODEL, "speed": "standard"},
            "execution_identity": {"type": "service_account"}, "mcp_servers": [], "skills": [],
            "tools": [], "multiagent": null},
        "created_at": "2026-11-30T00:00:00Z", "updated_at": "2026-11-30T00:00:01Z",
        "archived_at": null, "budget": null, "environment_id": "env_fake", "metadata": {},
        "outcome_evaluations": [], "resources": [], "vault_ids": [],
        "stats": {"active_seconds": s.turns as f64, "duration_seconds": s.turns as f64},
        "usage": usage_json(s.usage)})
}

/// Answers a sessions call; `None` for any other path.
pub(crate) fn answer(
    method: &hyper::Method,
    path: &str,
    body: Option<&Value>,
) -> Option<hyper::Response<Body>> {
    let rest = path.trim_end_matches('/').strip_prefix("/v1/sessions")?;
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let mut all = SESSIONS.lock().unwrap();
    let post = method == hyper::Method::POST;
    let not_found = || {
        json_response(
            404,
            json!({"type":"error","error":{"type":"not_found_error","message":"session not found"}}),
        )
    };
    Some(match segments.as_slice() {
        [] if post => {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = format!("sesn_fake{n:06}");
            let s = Session {
                usage: Usage::default(),
                turns: 0,
            };
            let v = session_json(&id, &s);
            all.insert(id, s);
            json_response(200, v)
        }
        [] => {
            let data: Vec<Value> = all.iter().map(|(id, s)| session_json(id, s)).collect();
            json_response(200, json!({"data": data, "next_page": null}))
        }
        [id] => match all.get(*id) {
            Some(s) => json_response(200, session_json(id, s)),
            None => not_found(),
        },
        [id, "events"] if post => {
            let Some(s) = all.get_mut(*id) else {
                return Some(not_found());
            };
            let events = body
                .and_then(|b| b.get("events"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for e in &events {
                s.turns += 1;
                s.usage.input += 1000 + text_words(e);
                s.usage.output += 250;
                s.usage.cache_read += 500;
                s.usage.cache_write += 200;
            }
            let sent: Vec<Value> = events
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let mut e = e.clone();
                    e["id"] = json!(format!("sevt_{id}_{i}"));
                    e["processed_at"] = json!("2026-11-30T00:00:02Z");
                    e
                })
                .collect();
            json_response(200, json!({"data": sent}))
        }
        [id, "events"] => {
            let Some(s) = all.get(*id) else {
                return Some(not_found());
            };
            json_response(
                200,
                json!({"data": [
                    {"type": "agent.message", "id": "sevt_m", "processed_at": "2026-11-30T00:00:02Z",
                     "content": [{"type": "text", "text": "done"}]},
                    {"type": "session.usage", "id": "sevt_u", "processed_at": "2026-11-30T00:00:03Z",
                     "usage": usage_json(s.usage)}],
                    "next_page": null}),
            )
        }
        _ => not_found(),
    })
}
