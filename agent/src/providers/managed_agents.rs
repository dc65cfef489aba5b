//! Claude Managed Agents (`/v1/sessions` on Anthropic's API): the agent
//! loop runs at Anthropic, so no Messages API call of the job's carries its
//! spend. What the job sees is each session's cumulative usage: in the
//! session object (create, retrieve, update, archive, list) and in the
//! `session.usage` events of its event list and stream. This module reads
//! those snapshots; the proxy turns each session's growth between two of
//! them into a row (see `proxy::sessions`).
//!
//! Owns: which calls are Managed Agents calls, and reading the sessions'
//! cumulative usage out of their answers.
//! Must never: count a snapshot itself (only growth is spend), or take a
//! session id from anything but the answer or the path.

use serde_json::Value;

use super::sse::SseReader;
use super::{JsonBody, ParsedUsage, RequestInfo, SessionSnapshot, SessionsCall, UsageParser};
use crate::meter::Usage;

/// The operation recorded for a session's growth.
pub const OPERATION: &str = "agent_session";

/// A Managed Agents call whose answer may show sessions' usage: which
/// call, and whether the answer streams. `None` for any other path.
pub fn call(method: &http::Method, path: &str) -> Option<RequestInfo> {
    let rest = path.trim_end_matches('/').strip_prefix("/v1/sessions")?;
    if !rest.is_empty() && !rest.starts_with('/') {
        return None;
    }
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let get = method == http::Method::GET;
    let post = method == http::Method::POST;
    let (session, streaming) = match segments.as_slice() {
        [] if post => (None, false),
        [] if get => {
            return Some(RequestInfo {
                operation: OPERATION,
                metered: true,
                sessions: SessionsCall::List,
                ..Default::default()
            });
        }
        // Retrieve, update.
        [id] if get || post => (Some(*id), false),
        [id, "archive"] if post => (Some(*id), false),
        [id, "events"] if get || post => (Some(*id), false),
        [id, "events", "stream"] if get => (Some(*id), true),
        // A thread's events carry usage events too; whether they are the
        // session's totals or the thread's is not documented: they only
        // move a session already followed (a list's rule), never start
        // following one.
        [_, "threads", _, "events"] | [_, "threads", _, "stream"] if get => {
            return Some(RequestInfo {
                operation: OPERATION,
                metered: true,
                streaming: segments[3] == "stream",
                sessions: SessionsCall::List,
                ..Default::default()
            });
        }
        _ => return None,
    };
    let sessions = match session {
        Some(id) => SessionsCall::Of(super::path_id(id)?),
        None => SessionsCall::Create,
    };
    Some(RequestInfo {
        operation: OPERATION,
        metered: true,
        streaming,
        sessions,
        ..Default::default()
    })
}

/// A session's `usage` (or a `session.usage` event's), normalised as the
/// Messages API's: input includes cache reads and writes. Writes come from
/// `cache_creation`'s split by lifetime, else the flat
/// `cache_creation_input_tokens`.
fn usage_of(u: &Value) -> Option<Usage> {
    let f = |k: &str| u.get(k).and_then(Value::as_u64);
    let input = f("input_tokens");
    let output = f("output_tokens");
    if input.is_none() && output.is_none() {
        return None;
    }
    let read = f("cache_read_input_tokens").unwrap_or(0);
    let creation = |k: &str| {
        u.get("cache_creation")
            .and_then(|c| c.get(k))
            .and_then(Value::as_u64)
    };
    let (w5m, w1h) = match (
        creation("ephemeral_5m_input_tokens"),
        creation("ephemeral_1h_input_tokens"),
    ) {
        // No breakdown by lifetime: the flat count (as the Messages API's
        // usage has it), at the 5-minute rate, the default lifetime.
        (None, None) => (f("cache_creation_input_tokens").unwrap_or(0), 0),
        (w5m, w1h) => (w5m.unwrap_or(0), w1h.unwrap_or(0)),
    };
    let written = w5m.saturating_add(w1h);
    Some(Usage {
        input_tokens: input
            .unwrap_or(0)
            .saturating_add(read)
            .saturating_add(written),
        output_tokens: output.unwrap_or(0),
        cached_input_tokens: read,
        cache_write_input_tokens: written,
        cache_write_1h_input_tokens: w1h,
        reasoning_tokens: 0,
        web_searches: 0,
        web_searches_preview: 0,
        audio_input_tokens: 0,
        image_input_tokens: 0,
        audio_output_tokens: 0,
        image_output_tokens: 0,
        cached_audio_input_tokens: 0,
        cached_image_input_tokens: 0,
        audio_duration_ms: 0,
    })
}

/// The model of a session object's agent (`agent.model.id`, or a plain
/// string), its tier (`speed: fast`) and its place uplift (`inference_geo:
/// us`, 10 %).
fn model_of(session: &Value) -> (Option<String>, Option<String>, u32) {
    let Some(m) = session.get("agent").and_then(|a| a.get("model")) else {
        return (None, None, 0);
    };
    let id = m
        .as_str()
        .or_else(|| m.get("id").and_then(Value::as_str))
        .filter(|id| !id.is_empty())
        .map(str::to_string);
    let text = |k: &str| m.get(k).and_then(Value::as_str);
    let tier = text("speed")
        .filter(|s| s.eq_ignore_ascii_case("fast"))
        .map(|_| "fast".to_string());
    let uplift = if text("inference_geo").is_some_and(|g| g.eq_ignore_ascii_case("us")) {
        10
    } else {
        0
    };
    (id, tier, uplift)
}

/// Reads the snapshots an answer shows.
pub struct SessionParser {
    sse: Option<SseReader>,
    json: JsonBody,
    /// The call: its path's session owns `session.usage` events.
    call: SessionsCall,
    found: Vec<SessionSnapshot>,
}

/// Field by field, the higher count: snapshots of one session only grow,
/// whatever order a page lists them in.
fn highest(a: &mut Usage, b: &Usage) {
    *a = a.zip_with(b, u64::max);
}

impl SessionParser {
    pub fn new(info: &RequestInfo, event_stream: bool) -> SessionParser {
        SessionParser {
            sse: event_stream.then(|| SseReader::new(JsonBody::DEFAULT_LIMIT)),
            json: JsonBody::new(JsonBody::DEFAULT_LIMIT),
            call: info.sessions.clone(),
            found: Vec::new(),
        }
    }

    /// One snapshot per session: the highest counts the answer shows.
    fn keep(found: &mut Vec<SessionSnapshot>, snap: SessionSnapshot) {
        match found.iter_mut().find(|s| s.id == snap.id) {
            Some(s) => {
                highest(&mut s.usage, &snap.usage);
                if snap.model.is_some() {
                    s.model = snap.model;
                    s.tier = snap.tier;
                    s.uplift_percent = snap.uplift_percent;
                }
            }
            None => found.push(snap),
        }
    }

    /// One object of an answer: a session, a `session.usage` event, or a
    /// page of either. A page of events may begin anywhere in the past
    /// (oldest first by default): its snapshots move a session the agent
    /// follows but never start following one (`List`); a stream's are
    /// live.
    fn on_value(found: &mut Vec<SessionSnapshot>, call: &SessionsCall, live: bool, v: &Value) {
        match v.get("type").and_then(Value::as_str) {
            Some("session") => {
                let id = v
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(super::response_id);
                // A new session is at zero whatever its answer says of it.
                let usage = v
                    .get("usage")
                    .and_then(usage_of)
                    .or_else(|| (*call == SessionsCall::Create).then(Usage::default));
                if let (Some(id), Some(usage)) = (id, usage) {
                    let (model, tier, uplift_percent) = model_of(v);
                    Self::keep(
                        found,
                        SessionSnapshot {
                            id,
                            model,
                            tier,
                            uplift_percent,
                            usage,
                            seen_by: call.clone(),
                            parent: None,
                        },
                    );
                }
            }
            Some("session.usage") => {
                if let (SessionsCall::Of(id), Some(usage)) =
                    (call, v.get("usage").and_then(usage_of))
                {
                    Self::keep(
                        found,
                        SessionSnapshot {
                            id: id.clone(),
                            usage,
                            seen_by: if live {
                                call.clone()
                            } else {
                                SessionsCall::List
                            },
                            ..Default::default()
                        },
                    );
                }
            }
            _ => {
                if let Some(items) = v.get("data").and_then(Value::as_array) {
                    for item in items {
                        if item.get("data").is_none() {
                            Self::on_value(found, call, live, item);
                        }
                    }
                }
            }
        }
    }
}

impl UsageParser for SessionParser {
    fn feed(&mut self, chunk: &[u8]) {
        let (found, call) = (&mut self.found, &self.call);
        match self.sse.as_mut() {
            Some(sse) => sse.feed(chunk, &mut |e| {
                if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                    Self::on_value(found, call, true, &v);
                }
            }),
            None => self.json.feed(chunk),
        }
    }

    fn finish(&mut self) -> ParsedUsage {
        let (found, call) = (&mut self.found, &self.call);
        match self.sse.as_mut() {
            Some(sse) => sse.finish(&mut |e| {
                if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
                    Self::on_value(found, call, true, &v);
                }
            }),
            None => {
                if let Some(v) = self.json.take() {
                    Self::on_value(found, call, false, &v);
                }
            }
        }
        ParsedUsage {
            sessions: std::mem::take(&mut self.found),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::testing::{parse_split, request};
    use crate::providers::{Provider, anthropic::Anthropic};

    #[test]
    fn session_calls_are_told_apart() {
        let of = |id: &str| SessionsCall::Of(id.to_string());
        for (method, path, want, streaming) in [
            ("POST", "/v1/sessions", SessionsCall::Create, false),
            ("GET", "/v1/sessions", SessionsCall::List, false),
            ("GET", "/v1/sessions/sesn_01A", of("sesn_01A"), false),
            ("POST", "/v1/sessions/sesn_01A", of("sesn_01A"), false),
            (
                "POST",
                "/v1/sessions/sesn_01A/archive",
                of("sesn_01A"),
                false,
            ),
            ("GET", "/v1/sessions/sesn_01A/events", of("sesn_01A"), false),
            (
                "POST",
                "/v1/sessions/sesn_01A/events",
                of("sesn_01A"),
                false,
            ),
            (
                "GET",
                "/v1/sessions/sesn_01A/events/stream",
                of("sesn_01A"),
                true,
            ),
            (
                "GET",
                "/v1/sessions/sesn_01A/threads/th_1/events",
                SessionsCall::List,
                false,
            ),
            (
                "GET",
                "/v1/sessions/sesn_01A/threads/th_1/stream",
                SessionsCall::List,
                true,
            ),
            ("GET", "/v1/sessions/sesn_01A%3D", of("sesn_01A="), false),
        ] {
            let i = Anthropic.request(&request(method, path, b"{}"));
            assert_eq!(
                (i.operation, i.metered, &i.sessions, i.streaming),
                (OPERATION, true, &want, streaming),
                "{method} {path}"
            );
        }
        for (method, path) in [
            ("GET", "/v1/sessions/sesn_01A/threads"),
            ("GET", "/v1/sessions/sesn_01A/resources"),
            ("GET", "/v1/sessions/sesn%2F/events"),
            ("GET", "/v1/sessions/sesn%ZZ/events"),
            ("POST", "/v1/messages"),
            ("GET", "/v1/sessionsX"),
        ] {
            let i = Anthropic.request(&request(method, path, b"{}"));
            assert!(!i.sessions.is_some(), "{method} {path}");
        }
    }

    fn counts(s: &SessionSnapshot) -> (u64, u64) {
        (s.usage.input_tokens, s.usage.output_tokens)
    }

    #[test]
    fn snapshots_are_read_from_sessions_pages_and_usage_events() {
        let info = call(&http::Method::GET, "/v1/sessions/sesn_1/events").unwrap();
        let session = br#"{"type":"session","id":"sesn_1","status":"idle",
            "agent":{"type":"agent","model":{"id":"claude-opus-4-7","speed":"fast","inference_geo":"us"}},
            "usage":{"input_tokens":100,"output_tokens":40,"cache_read_input_tokens":1000,
                     "cache_creation":{"ephemeral_5m_input_tokens":20,"ephemeral_1h_input_tokens":30}}}"#;
        let p = parse_split(&Anthropic, &info, "application/json", session, &[17]);
        assert_eq!(p.sessions.len(), 1);
        let s = &p.sessions[0];
        assert_eq!(
            (
                s.id.as_str(),
                s.model.as_deref(),
                s.tier.as_deref(),
                s.uplift_percent
            ),
            ("sesn_1", Some("claude-opus-4-7"), Some("fast"), 10)
        );
        let u = s.usage;
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.cache_write_input_tokens,
                u.cache_write_1h_input_tokens,
                u.output_tokens
            ),
            (1150, 1000, 50, 30, 40)
        );
        assert_eq!(p.usage, None, "a snapshot is not a request's usage");
        // A page of events: the highest `session.usage` counts, in either
        // order, are the path's session's; a count left out lowers nothing.
        let page = br#"{"data":[{"type":"session.usage","id":"e1","usage":{"input_tokens":5,"output_tokens":1}},
            {"type":"agent.message","id":"e2","content":[{"type":"text","text":"hi"}]},
            {"type":"session.usage","id":"e3","usage":{"input_tokens":9,"output_tokens":4}}],"next_page":null}"#;
        let p = parse_split(&Anthropic, &info, "application/json", page, &[]);
        assert_eq!(p.sessions.len(), 1);
        assert_eq!(counts(&p.sessions[0]), (9, 4));
        // (A page may start anywhere in the past: it only moves a session
        // already followed.)
        assert_eq!(p.sessions[0].seen_by, SessionsCall::List);
        let desc = br#"{"data":[{"type":"session.usage","id":"e3","usage":{"input_tokens":9,"output_tokens":4}},
            {"type":"session.usage","id":"e2","usage":{"output_tokens":7}},
            {"type":"session.usage","id":"e1","usage":{"input_tokens":5,"output_tokens":1}}]}"#;
        let p = parse_split(&Anthropic, &info, "application/json", desc, &[]);
        assert_eq!(counts(&p.sessions[0]), (9, 7));
        // A stream of them.
        let stream = "event: message\ndata: {\"type\":\"session.usage\",\"usage\":{\"input_tokens\":3,\"output_tokens\":2}}\n\n\
                      data: {\"type\":\"session.status_idle\"}\n\n\
                      data: {\"type\":\"session.usage\",\"usage\":{\"input_tokens\":7,\"output_tokens\":6}}\n\n";
        let live = call(&http::Method::GET, "/v1/sessions/sesn_1/events/stream").unwrap();
        let p = parse_split(
            &Anthropic,
            &live,
            "text/event-stream",
            stream.as_bytes(),
            &[30, 31],
        );
        assert_eq!(p.sessions.len(), 1);
        assert_eq!(counts(&p.sessions[0]), (7, 6));
        assert_eq!(p.sessions[0].seen_by, SessionsCall::Of("sesn_1".into()));
        // A new session starts at zero, even when its answer shows none.
        let create = call(&http::Method::POST, "/v1/sessions").unwrap();
        let new = br#"{"type":"session","id":"sesn_n","usage":{}}"#;
        let p = parse_split(&Anthropic, &create, "application/json", new, &[]);
        assert_eq!(p.sessions.len(), 1);
        assert_eq!(p.sessions[0].usage, Usage::default());
        assert_eq!(p.sessions[0].seen_by, SessionsCall::Create);
        let elsewhere = parse_split(&Anthropic, &info, "application/json", new, &[]);
        assert!(elsewhere.sessions.is_empty(), "no counts: not a snapshot");
        // A list of sessions, each its own; a session without usage, or an
        // id that is not a plain token, is not a snapshot.
        let list = call(&http::Method::GET, "/v1/sessions").unwrap();
        let page = br#"{"data":[{"type":"session","id":"sesn_a","usage":{"input_tokens":1,"output_tokens":1}},
            {"type":"session","id":"sesn_b","agent":{"model":"claude-sonnet-4-6"},"usage":{"input_tokens":2,"output_tokens":2}},
            {"type":"session","id":"sesn_c"},{"type":"session","id":"a b","usage":{"input_tokens":2}},
            {"type":"session.usage","usage":{"input_tokens":50}}]}"#;
        let p = parse_split(&Anthropic, &list, "application/json", page, &[]);
        let ids: Vec<_> = p
            .sessions
            .iter()
            .map(|s| (s.id.as_str(), s.model.as_deref()))
            .collect();
        assert_eq!(
            ids,
            [("sesn_a", None), ("sesn_b", Some("claude-sonnet-4-6"))]
        );
        assert!(p.sessions.iter().all(|s| s.seen_by == SessionsCall::List));
    }

    /// A usage object with only the flat `cache_creation_input_tokens`
    /// (as the Messages API's `usage` may be) still has its cache writes,
    /// as 5-minute ones; the breakdown, when there, is the one read.
    #[test]
    fn flat_cache_writes_count_when_the_breakdown_is_absent() {
        let writes = |u: &str| {
            let u = usage_of(&serde_json::from_str(u).expect("json")).expect("usage");
            (
                u.input_tokens,
                u.cache_write_input_tokens,
                u.cache_write_1h_input_tokens,
            )
        };
        let flat = r#"{"input_tokens":10,"output_tokens":5,"cache_read_input_tokens":3,"cache_creation_input_tokens":7}"#;
        assert_eq!(writes(flat), (20, 7, 0));
        let both = r#"{"input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":7,
            "cache_creation":{"ephemeral_5m_input_tokens":2,"ephemeral_1h_input_tokens":5}}"#;
        assert_eq!(writes(both), (17, 7, 5));
        let hour = r#"{"input_tokens":10,"cache_creation_input_tokens":7,"cache_creation":{"ephemeral_1h_input_tokens":4}}"#;
        assert_eq!(writes(hour), (14, 4, 4));
        let none = r#"{"input_tokens":10,"cache_creation":{},"cache_creation_input_tokens":"7"}"#;
        assert_eq!(writes(none), (10, 0, 0));
    }
}
