//! The fake's Anthropic Messages API: JSON, SSE (message_start ... message_delta),
//! count_tokens. It always reports some cache reads and writes so the
//! agent's normalisation is exercised.

use serde_json::{Value, json};

use super::{Body, Call, Reported, json_for, json_response, sse, stream_response, text_words};

const CACHE_READ: u64 = 4;
const CACHE_WRITE: u64 = 2;

pub(crate) async fn handle(call: Call) -> hyper::Response<Body> {
    let v = &call.body;
    let input = (text_words(v.get("messages").unwrap_or(&Value::Null))
        + text_words(&json!({"x": v.get("system")}))
        + 1)
    .max(1);
    if call.path.ends_with("/messages/count_tokens") {
        call.record(Reported {
            api: "anthropic",
            model: v.get("model").and_then(Value::as_str).unwrap_or("").into(),
            usage_sent: true,
            ..Default::default()
        });
        return json_response(200, json!({"input_tokens": input}));
    }
    // Claude on Vertex AI: the model in the URL, with its version after an
    // `@` (`.../publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict`).
    let vertex_model = call
        .path
        .split_once("/publishers/anthropic/models/")
        .and_then(|(_, m)| m.split_once(':'))
        .filter(|(_, method)| matches!(*method, "rawPredict" | "streamRawPredict"))
        .map(|(m, _)| m.to_string());
    if !call.path.ends_with("/v1/messages") && vertex_model.is_none() {
        return json_response(
            404,
            json!({"type":"error","error":{"type":"not_found_error","message":"unknown path"}}),
        );
    }
    let model = vertex_model.unwrap_or_else(|| {
        v.get("model")
            .and_then(Value::as_str)
            .unwrap_or("claude-sonnet-4-5")
            .to_string()
    });
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let out = v
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(5)
        .clamp(1, 2000);
    // As Anthropic answers: the model's dated name (on Vertex AI its
    // version follows an `@`).
    let resp_model = match model.split_once('@') {
        Some((base, version)) => format!("{base}-{version}"),
        None => format!("{model}-20250929"),
    };
    // A `web_search_*` server tool: the fake ran `max_uses` searches (at
    // most 2), and says so in `usage.server_tool_use`.
    let searches = v
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|t| {
            t.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("web_search_"))
        })
        .map_or(0, |t| {
            t.get("max_uses")
                .and_then(Value::as_u64)
                .unwrap_or(2)
                .min(2)
        });
    let server_tool_use = json!({"web_search_requests": searches, "web_fetch_requests": 0});
    call.record(Reported {
        api: "anthropic",
        model: model.clone(),
        stream,
        web_searches: searches,
        input_tokens: input + CACHE_READ + CACHE_WRITE,
        output_tokens: out,
        cached_input_tokens: CACHE_READ,
        cache_write_input_tokens: CACHE_WRITE,
        usage_sent: true,
        ..Default::default()
    });
    let text: Vec<&str> = std::iter::repeat_n("tok", out as usize).collect();
    if !stream {
        return json_for(
            &call,
            json!({"id":"msg_fake","type":"message","role":"assistant","model":resp_model,
                "content":[{"type":"text","text":text.join(" ")}],"stop_reason":"end_turn","stop_sequence":null,
                "usage":{"input_tokens":input,"cache_creation_input_tokens":CACHE_WRITE,"cache_read_input_tokens":CACHE_READ,"output_tokens":out,
                    "server_tool_use":server_tool_use}}),
        );
    }
    let mut ev = vec![
        (Some("message_start"), json!({"type":"message_start","message":{"id":"msg_fake","type":"message","role":"assistant",
            "content":[],"model":resp_model,"stop_reason":null,"stop_sequence":null,
            "usage":{"input_tokens":input,"cache_creation_input_tokens":CACHE_WRITE,"cache_read_input_tokens":CACHE_READ,"output_tokens":1}}}).to_string()),
        (Some("content_block_start"), json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}).to_string()),
        (Some("ping"), json!({"type":"ping"}).to_string()),
    ];
    // `x-fake-error-after: N`: an overloaded_error event after N deltas,
    // and the stream ends there, as Anthropic's does when it gives up.
    let error_after: Option<u64> = call
        .headers
        .get("x-fake-error-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let delta = |i: u64| {
        (
            Some("content_block_delta"),
            json!({"type":"content_block_delta","index":0,
            "delta":{"type":"text_delta","text": if i == 0 { "tok" } else { " tok" }}})
            .to_string(),
        )
    };
    if let Some(n) = error_after {
        ev.extend((0..n.min(out)).map(delta));
        ev.push((
            Some("error"),
            json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})
                .to_string(),
        ));
        return stream_response("text/event-stream; charset=utf-8", sse(ev), call.delay());
    }
    ev.extend((0..out).map(delta));
    ev.push((
        Some("content_block_stop"),
        json!({"type":"content_block_stop","index":0}).to_string(),
    ));
    ev.push((
        Some("message_delta"),
        json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},
        "usage":{"output_tokens":out,"server_tool_use":server_tool_use}})
        .to_string(),
    ));
    ev.push((
        Some("message_stop"),
        json!({"type":"message_stop"}).to_string(),
    ));
    stream_response("text/event-stream; charset=utf-8", sse(ev), call.delay())
}
