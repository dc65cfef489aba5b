//! The fake's OpenAI chat completions (JSON and SSE, with and without
//! `stream_options.include_usage`), the Responses API (`POST …/responses`,
//! JSON and SSE, with the `web_search` and `web_search_preview` tools
//! searching), its background mode over HTTP (`background: true`, then
//! `background`'s retrievals), and transcriptions (multipart forms).

use serde_json::{Value, json};

use super::{
    Body, Call, Reported, background, json_for, json_response, sse, stream_response, text_words,
    words,
};

fn response_object(id: &str, model: &str, status: &str, usage: Value, text: &str) -> Value {
    let output = if text.is_empty() {
        json!([])
    } else {
        json!([{"type":"message","id":"msg_fake","status":"completed","role":"assistant",
            "content":[{"type":"output_text","text":text,"annotations":[]}]}])
    };
    json!({"id":id,"object":"response","created_at":1,"status":status,"background":true,
        "model":model,"output":output,"usage":usage,"error":null,"incomplete_details":null,
        "instructions":null,"metadata":{},"parallel_tool_calls":true,"temperature":1.0,
        "tool_choice":"auto","tools":[],"top_p":1.0})
}

/// The `web_search_call` items a request with a web search tool gets, as
/// the API gives them: two searches and a page opened (not billed).
fn search_calls() -> Vec<Value> {
    vec![
        json!({"type":"web_search_call","id":"ws_fake_1","status":"completed",
            "action":{"type":"search","query":"tollgate ebpf"}}),
        json!({"type":"web_search_call","id":"ws_fake_2","status":"completed",
            "action":{"type":"open_page","url":"https://example.com/"}}),
        json!({"type":"web_search_call","id":"ws_fake_3","status":"completed",
            "action":{"type":"search","query":"tollgate aya"}}),
    ]
}

/// Input tokens a search's results add, billed as input.
const SEARCH_RESULT_TOKENS: u64 = 100;

/// What a Responses request asks for, as the fake answers it.
struct Asked {
    model: String,
    /// The input's words (at least 1), and what searches added.
    input_tokens: u64,
    /// `max_output_tokens`, 7 when not given.
    output_tokens: u64,
    usage: Value,
    text: String,
}

/// [`Asked`] of request `v`, whose input grew by `extra_input` tokens.
fn asked(v: &Value, extra_input: u64) -> Asked {
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-5.4")
        .to_string();
    let input_tokens = match v.get("input") {
        Some(Value::String(s)) => words(s),
        Some(other) => text_words(other),
        None => 0,
    }
    .max(1)
        + extra_input;
    let output_tokens = v
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(7)
        .clamp(1, 2000);
    let usage = json!({"input_tokens":input_tokens,"input_tokens_details":{"cached_tokens":0},
        "output_tokens":output_tokens,"output_tokens_details":{"reasoning_tokens":0},
        "total_tokens":input_tokens + output_tokens});
    let text = vec!["tok"; output_tokens as usize].join(" ");
    Asked {
        model,
        input_tokens,
        output_tokens,
        usage,
        text,
    }
}

/// `POST …/responses` answered at once, in JSON or as a stream: the
/// request's web search tool (`web_search` or `web_search_preview`)
/// searches twice, and the response lists the request's `tools`, as the
/// API does.
fn create(call: &Call) -> hyper::Response<Body> {
    let v = &call.body;
    let tools = v.get("tools").cloned().unwrap_or_else(|| json!([]));
    let searched = tools.as_array().is_some_and(|t| {
        t.iter().any(|t| {
            t.get("type")
                .and_then(Value::as_str)
                .is_some_and(|k| k.starts_with("web_search"))
        })
    });
    let web_searches = if searched { 2 } else { 0 };
    let Asked {
        model,
        input_tokens,
        output_tokens,
        usage,
        text,
    } = asked(v, web_searches * SEARCH_RESULT_TOKENS);
    let id = background::next_id("resp_fake");
    let calls = if searched { search_calls() } else { vec![] };
    let object = |status: &str, usage: Value, text: &str| {
        let mut o = response_object(&id, &model, status, usage, text);
        o["background"] = json!(false);
        o["tools"] = tools.clone();
        let mut output = calls.clone();
        output.extend(o["output"].as_array().cloned().unwrap_or_default());
        o["output"] = Value::Array(output);
        o
    };
    let stream = v.get("stream").and_then(Value::as_bool) == Some(true);
    call.record(Reported {
        api: "openai",
        model: model.clone(),
        stream,
        input_tokens,
        output_tokens,
        web_searches,
        usage_sent: true,
        ..Default::default()
    });
    if !stream {
        return json_for(call, object("completed", usage, &text));
    }
    let mut seq = 0u64;
    let mut event = |kind: &'static str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        (Some(kind), data.to_string())
    };
    let mut events = vec![event(
        "response.created",
        json!({"response": object("in_progress", Value::Null, "")}),
    )];
    for (i, item) in calls.iter().enumerate() {
        events.push(event(
            "response.output_item.done",
            json!({"output_index": i, "item": item}),
        ));
    }
    for _ in 0..output_tokens {
        events.push(event(
            "response.output_text.delta",
            json!({"item_id":"msg_fake","output_index":calls.len(),"content_index":0,"delta":"tok "}),
        ));
    }
    events.push(event(
        "response.completed",
        json!({"response": object("completed", usage, &text)}),
    ));
    stream_response("text/event-stream", sse(events), call.delay())
}

/// `POST …/responses` in background mode: answered `queued` at once.
fn create_background(call: &Call) -> hyper::Response<Body> {
    let v = &call.body;
    let Asked {
        model,
        input_tokens,
        output_tokens,
        usage,
        text,
    } = asked(v, 0);
    let id = background::next_id("resp_fake");
    let running = response_object(&id, &model, "queued", Value::Null, "");
    let stream = v.get("stream").and_then(Value::as_bool) == Some(true);
    let mut seq = 0u64;
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        (None, data.to_string())
    };
    // A background stream: the response's start, then its text slowly
    // (`x-fake-chunk-delay-ms`); a client that leaves resumes it with a
    // retrieval, which carries the end.
    let events = stream.then(|| {
        let mut out = vec![
            event("response.created", json!({"response": running.clone()})),
            event(
                "response.in_progress",
                json!({"response": response_object(&id, &model, "in_progress", Value::Null, "")}),
            ),
        ];
        for _ in 0..output_tokens {
            out.push(event(
                "response.output_text.delta",
                json!({"item_id":"msg_fake","output_index":0,"content_index":0,"delta":"tok "}),
            ));
        }
        out
    });
    background::start(
        call,
        &id,
        background::Job {
            running: response_object(&id, &model, "in_progress", Value::Null, ""),
            done: response_object(&id, &model, "completed", usage, &text),
            cancelled: response_object(&id, &model, "cancelled", Value::Null, ""),
            reported: Reported {
                api: "openai",
                model,
                stream,
                input_tokens,
                output_tokens,
                usage_sent: true,
                ..Default::default()
            },
        },
    );
    match events {
        Some(events) => stream_response("text/event-stream", sse(events), call.delay()),
        None => json_response(200, running),
    }
}

pub(crate) async fn handle(call: Call) -> hyper::Response<Body> {
    if call.path.trim_end_matches('/').ends_with("/responses")
        && call.body.get("background").and_then(Value::as_bool) == Some(true)
    {
        return create_background(&call);
    }
    if call.path.trim_end_matches('/').ends_with("/responses") {
        return create(&call);
    }
    if !call.path.ends_with("/chat/completions") {
        return json_response(
            404,
            json!({"error":{"message":"unknown path","type":"invalid_request_error"}}),
        );
    }
    let v = &call.body;
    // As Mistral's OpenAI-compatible API does: a request naming
    // `stream_options` is refused, and a stream's last chunk carries its
    // usage unasked.
    let mistral = call.sni.ends_with(".mistral.ai");
    if mistral && v.get("stream_options").is_some() {
        return json_response(
            422,
            json!({"object":"error","message":{"detail":[{"type":"extra_forbidden",
                "loc":["body","stream_options"],"msg":"Extra inputs are not permitted"}]},
                "type":"invalid_request_error","param":null,"code":null}),
        );
    }
    let model = v
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("gpt-4o-mini")
        .to_string();
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let n_msgs = v
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |a| a.len() as u64);
    // An audio chat model: each `input_audio` part is 50 audio tokens of
    // the prompt, and with `modalities: ["text", "audio"]` three quarters
    // of the answer is audio (its transcript the rest).
    let audio_parts = v
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("input_audio"))
        .count() as u64;
    let audio_in = 50 * audio_parts;
    let speaks = v
        .get("modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|m| m.as_str() == Some("audio")));
    let pt = (text_words(v.get("messages").unwrap_or(&Value::Null)) + 3 * n_msgs).max(1) + audio_in;
    let ct = v
        .get("max_tokens")
        .or_else(|| v.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(5)
        .clamp(1, 2000);
    // (Vertex AI's OpenAI-compatible endpoint answers with the name as
    // asked, `google/gemini-…`.)
    let resp_model = if model.contains('/') {
        model.clone()
    } else {
        format!("{model}-2024-07-18")
    };
    // As the API does: the tier that served the request, in the body and
    // in every chunk (a tier asked for is granted, `auto` is `default`,
    // unless `x-fake-served-tier` says otherwise).
    let service_tier = call
        .headers
        .get("x-fake-served-tier")
        .and_then(|h| h.to_str().ok())
        .or_else(|| {
            v.get("service_tier")
                .and_then(Value::as_str)
                .filter(|t| matches!(*t, "flex" | "priority"))
        })
        .unwrap_or("default")
        .to_string();
    let audio_out = if speaks { ct - ct / 4 } else { 0 };
    let usage = json!({"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": audio_in, "text_tokens": pt - audio_in},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": audio_out, "text_tokens": ct - audio_out}});
    call.record(Reported {
        api: "openai",
        model: model.clone(),
        stream,
        input_tokens: pt,
        output_tokens: ct,
        audio_input_tokens: audio_in,
        audio_output_tokens: audio_out,
        usage_sent: !stream || include_usage || mistral,
        ..Default::default()
    });
    if !stream {
        let words: Vec<&str> = std::iter::repeat_n("tok", ct as usize).collect();
        // `x-fake-empty-answer`: a completion with no text at all.
        let answer = if call.headers.contains_key("x-fake-empty-answer") {
            String::new()
        } else {
            words.join(" ")
        };
        let mut body = json!({"id":"chatcmpl-fake","object":"chat.completion","created":1,"model":resp_model,
            "choices":[{"index":0,"message":{"role":"assistant","content":answer},"finish_reason":"stop"}],
            "usage": usage, "service_tier": service_tier});
        if speaks {
            body["choices"][0]["message"]["content"] = Value::Null;
            body["choices"][0]["message"]["audio"] =
                json!({"id":"audio_fake","data":"UklGRg==","expires_at":1,"transcript":answer});
        }
        // Some OpenAI-compatible servers omit usage.
        if call.headers.contains_key("x-fake-no-usage") {
            body.as_object_mut().expect("object").remove("usage");
            call.log
                .lock()
                .unwrap()
                .last_mut()
                .expect("recorded")
                .usage_sent = false;
        }
        return json_for(&call, body);
    }
    // As the real API does: with include_usage every chunk carries
    // "usage":null and a last chunk with empty choices carries the usage.
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":resp_model,
            "service_tier":service_tier,"system_fingerprint":"fp_fake",
            "choices":[{"index":0,"delta":delta,"logprobs":null,"finish_reason":finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        c.to_string()
    };
    // Events are made as they are sent (see `stream_response`).
    let first = chunk(json!({"role":"assistant","content":""}), Value::Null);
    let tok = chunk(json!({"content": "tok"}), Value::Null);
    let rest = chunk(json!({"content": " tok"}), Value::Null);
    let mut stop = chunk(json!({}), json!("stop"));
    if mistral {
        let mut c: Value = serde_json::from_str(&stop).expect("chunk");
        c["usage"] = usage.clone();
        stop = c.to_string();
    }
    let last = include_usage.then(|| {
        json!({"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1,"model":resp_model,
            "service_tier":service_tier,"system_fingerprint":"fp_fake","choices":[],"usage":usage})
        .to_string()
    });
    let events = std::iter::once(first)
        .chain((0..ct).map(move |i| if i == 0 { tok.clone() } else { rest.clone() }))
        .chain(std::iter::once(stop))
        .chain(last)
        .chain(std::iter::once("[DONE]".to_string()))
        .map(|data| (None, data));
    stream_response(
        "text/event-stream; charset=utf-8",
        sse(events),
        call.delay(),
    )
}

/// `POST …/audio/transcriptions` (a multipart form): `whisper-1` is billed
/// by the second (`usage` of type `duration`: 2.5 s), any other model by
/// its tokens (38 of audio and 2 of prompt text in, 6 out), logged as
/// reported.
pub(crate) fn transcription(
    body: &[u8],
    sni: &str,
    path: &str,
    log: &super::Log,
) -> hyper::Response<Body> {
    let text = String::from_utf8_lossy(body);
    let model = text
        .split("name=\"model\"")
        .nth(1)
        .and_then(|rest| rest.trim_start_matches(['\r', '\n']).split("\r\n").next())
        .unwrap_or("")
        .to_string();
    let by_time = model == "whisper-1";
    log.lock().unwrap().push(Reported {
        api: "openai",
        sni: sni.to_string(),
        path: path.to_string(),
        model: model.clone(),
        input_tokens: if by_time { 0 } else { 40 },
        output_tokens: if by_time { 0 } else { 6 },
        audio_input_tokens: if by_time { 0 } else { 38 },
        usage_sent: true,
        ..Reported::default()
    });
    let usage = if by_time {
        json!({"type": "duration", "seconds": 2.5})
    } else {
        json!({"type": "tokens", "input_tokens": 40, "output_tokens": 6, "total_tokens": 46,
            "input_token_details": {"audio_tokens": 38, "text_tokens": 2}})
    };
    json_response(200, json!({"text": "hello from the fake", "usage": usage}))
}
