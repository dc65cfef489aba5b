//! The fake's Gemini API: generateContent and streamGenerateContent
//! (`alt=sse`, and the JSON-array stream), with thoughts tokens; the
//! Interactions API (`POST /v1beta/interactions`, JSON or SSE); and Vertex
//! AI's `:predict` for text embedding models.

use serde_json::{Value, json};

use super::{Body, Call, Reported, json_for, json_response, sse, stream_response, text_words};

const THOUGHTS: u64 = 3;

pub(crate) async fn handle(call: Call) -> hyper::Response<Body> {
    if call.path.trim_end_matches('/').ends_with("/interactions") {
        return interaction(call);
    }
    let Some((model, method)) = call
        .path
        .rsplit_once("/models/")
        .and_then(|(_, rest)| rest.split_once(':'))
        .map(|(m, x)| (m.to_string(), x.to_string()))
    else {
        return json_response(
            404,
            json!({"error":{"code":404,"message":"unknown path","status":"NOT_FOUND"}}),
        );
    };
    let v = &call.body;
    if method == "predict" {
        return predict_embeddings(&call, model);
    }
    let prompt = (text_words(v.get("contents").unwrap_or(&Value::Null))
        + text_words(v.get("systemInstruction").unwrap_or(&Value::Null)))
    .max(1);
    let out = v
        .pointer("/generationConfig/maxOutputTokens")
        .and_then(Value::as_u64)
        .unwrap_or(5)
        .clamp(1, 2000);
    let stream = method == "streamGenerateContent";
    if method != "generateContent" && !stream {
        return json_response(
            404,
            json!({"error":{"code":404,"message":"unknown method","status":"NOT_FOUND"}}),
        );
    }
    // The `googleSearch` tool: the answer is grounded in two queries (one
    // of them run twice, and an empty one, as Gemini 3 lists them), sent
    // on the first chunk of a stream. Billed by the query from Gemini 3,
    // by the grounded prompt before.
    let grounded = v
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|t| t.get("googleSearch").is_some() || t.get("google_search").is_some());
    let queries = json!(["tollgate agent", "", "ebpf cgroup hooks", "tollgate agent"]);
    let by_query = model.starts_with("gemini-3");
    call.record(Reported {
        api: "gemini",
        model: model.clone(),
        stream,
        web_searches: match (grounded, by_query) {
            (false, _) => 0,
            (true, true) => 2,
            (true, false) => 1,
        },
        input_tokens: prompt,
        output_tokens: out + THOUGHTS,
        reasoning_tokens: THOUGHTS,
        usage_sent: true,
        ..Default::default()
    });
    let usage = |cand: u64| {
        json!({"promptTokenCount": prompt, "candidatesTokenCount": cand, "thoughtsTokenCount": THOUGHTS,
            "totalTokenCount": prompt + cand + THOUGHTS})
    };
    let part = |text: String, usage: Value, finish: Option<&str>| {
        let mut c = json!({"content":{"parts":[{"text":text}],"role":"model"},"index":0});
        if let Some(f) = finish {
            c["finishReason"] = json!(f);
        }
        if grounded && (text.starts_with("tok") || !stream) {
            c["groundingMetadata"] = json!({"webSearchQueries": queries});
        }
        json!({"candidates":[c],"usageMetadata":usage,"modelVersion":model,"responseId":"fake"})
    };
    if !stream {
        let text: Vec<&str> = std::iter::repeat_n("tok", out as usize).collect();
        return json_for(&call, part(text.join(" "), usage(out), Some("STOP")));
    }
    // Usage metadata is cumulative in streams; the last one is final.
    let chunks: Vec<Value> = (0..out)
        .map(|i| {
            let last = i + 1 == out;
            part(
                if i == 0 { "tok".into() } else { " tok".into() },
                usage(i + 1),
                last.then_some("STOP"),
            )
        })
        .collect();
    let delay = call.delay();
    if call.query.contains("alt=sse") {
        let ev = chunks
            .into_iter()
            .map(|c| (None, c.to_string()))
            .collect::<Vec<_>>();
        return stream_response("text/event-stream", sse(ev), delay);
    }
    // The JSON-array stream: "[{...}\r\n,{...}\r\n]".
    let mut pieces = Vec::new();
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let mut s = if i == 0 {
            String::from("[")
        } else {
            String::from(",")
        };
        s += &serde_json::to_string_pretty(&c).expect("json");
        if i + 1 == n {
            s += "]";
        } else {
            s += "\r\n";
        }
        pieces.push(s.into_bytes());
    }
    stream_response("application/json; charset=UTF-8", pieces, delay)
}

/// Vertex AI's `:predict` for a text embedding model: one prediction per
/// instance, each with its token count in `statistics` (here twice its
/// words plus one, so that no local estimate could match), as a float, as
/// protobuf's JSON may write it.
fn predict_embeddings(call: &Call, model: String) -> hyper::Response<Body> {
    let instances = call
        .body
        .get("instances")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let counts: Vec<u64> = instances.iter().map(|i| 2 * text_words(i) + 1).collect();
    call.record(Reported {
        api: "gemini",
        model,
        input_tokens: counts.iter().sum(),
        usage_sent: true,
        ..Default::default()
    });
    let predictions: Vec<Value> = counts
        .iter()
        .map(|&n| {
            json!({"embeddings": {"statistics": {"truncated": false, "token_count": n as f64},
                "values": [0.0125, -0.0431, 0.0078]}})
        })
        .collect();
    json_for(
        call,
        json!({"predictions": predictions, "metadata": {"billableCharacterCount": 42}}),
    )
}

/// `POST /{version}/interactions`: one model turn, its usage in the
/// interaction (thoughts beside the output, as in `usageMetadata`).
fn interaction(call: Call) -> hyper::Response<Body> {
    let v = &call.body;
    let model = v["model"].as_str().unwrap_or("").to_string();
    let prompt = text_words(v.get("input").unwrap_or(&Value::Null)).max(1);
    let out = v
        .pointer("/generation_config/max_output_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(5)
        .clamp(1, 2000);
    let stream = v["stream"].as_bool().unwrap_or(false);
    let reported = Reported {
        api: "gemini",
        model: model.clone(),
        stream,
        input_tokens: prompt,
        output_tokens: out + THOUGHTS,
        reasoning_tokens: THOUGHTS,
        usage_sent: true,
        ..Default::default()
    };
    let text: Vec<&str> = std::iter::repeat_n("tok", out as usize).collect();
    let usage = json!({"total_input_tokens": prompt, "total_output_tokens": out,
        "total_thought_tokens": THOUGHTS, "total_tokens": prompt + out + THOUGHTS});
    let background = v["background"].as_bool().unwrap_or(false);
    let id = if background {
        super::background::next_id("int_fake")
    } else {
        "int_fake".to_string()
    };
    let state = |status: &str| {
        json!({"id": id, "status": status, "model": model,
            "created": "2026-11-30T00:00:00Z", "updated": "2026-11-30T00:00:01Z", "outputs": []})
    };
    let mut done = state("completed");
    done["outputs"] = json!([{"type": "text", "text": text.join(" ")}]);
    done["usage"] = usage;
    if background && !stream {
        let running = state("in_progress");
        super::background::start(
            &call,
            &id,
            super::background::Job {
                running: running.clone(),
                done,
                cancelled: state("cancelled"),
                reported,
            },
        );
        return json_response(200, running);
    }
    call.record(reported);
    if !stream {
        return json_for(&call, done);
    }
    let events = vec![
        (
            Some("interaction.created"),
            json!({"event_type": "interaction.created", "interaction": {"id": "int_fake", "status": "in_progress", "model": model}}).to_string(),
        ),
        (
            Some("interaction.completed"),
            json!({"event_type": "interaction.completed", "interaction": done}).to_string(),
        ),
    ];
    stream_response("text/event-stream", sse(events), call.delay())
}
