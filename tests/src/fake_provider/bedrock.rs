//! The fake's Bedrock runtime: Converse (JSON), ConverseStream (AWS binary
//! eventstream, written here independently of the agent's decoder), and
//! InvokeModel with an Anthropic body.

use serde_json::{Value, json};

use super::{Body, Call, Reported, json_for, json_response, stream_response, text_words};

const CACHE_READ: u64 = 5;

/// One eventstream frame: prelude (total length, headers length, CRC),
/// string headers, payload, message CRC.
pub fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (k, v) in headers {
        h.push(k.len() as u8);
        h.extend_from_slice(k.as_bytes());
        h.push(7);
        h.extend_from_slice(&(v.len() as u16).to_be_bytes());
        h.extend_from_slice(v.as_bytes());
    }
    let total = 12 + h.len() + payload.len() + 4;
    let mut f = Vec::with_capacity(total);
    f.extend_from_slice(&(total as u32).to_be_bytes());
    f.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_be_bytes());
    f.extend_from_slice(&h);
    f.extend_from_slice(payload);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_be_bytes());
    f
}

fn event(kind: &str, payload: Value) -> Vec<u8> {
    frame(
        &[
            (":event-type", kind),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

pub(crate) async fn handle(call: Call) -> hyper::Response<Body> {
    let Some(rest) = call.path.strip_prefix("/model/") else {
        return json_response(404, json!({"message":"unknown path"}));
    };
    let Some((model_enc, op)) = rest.rsplit_once('/') else {
        return json_response(404, json!({"message":"unknown path"}));
    };
    let model = model_enc.replace("%3A", ":").replace("%3a", ":");
    let v = &call.body;
    match op {
        "converse" | "converse-stream" => {
            let input = (text_words(v.get("messages").unwrap_or(&Value::Null))
                + text_words(v.get("system").unwrap_or(&Value::Null)))
            .max(1);
            let out = v
                .pointer("/inferenceConfig/maxTokens")
                .and_then(Value::as_u64)
                .unwrap_or(5)
                .clamp(1, 2000);
            let stream = op == "converse-stream";
            call.record(Reported {
                api: "bedrock",
                model: model.clone(),
                stream,
                input_tokens: input + CACHE_READ,
                output_tokens: out,
                cached_input_tokens: CACHE_READ,
                usage_sent: true,
                ..Default::default()
            });
            let usage = json!({"inputTokens": input, "outputTokens": out, "totalTokens": input + out + CACHE_READ,
                "cacheReadInputTokens": CACHE_READ, "cacheWriteInputTokens": 0});
            if !stream {
                let text: Vec<&str> = std::iter::repeat_n("tok", out as usize).collect();
                return json_for(
                    &call,
                    json!({"output":{"message":{"role":"assistant","content":[{"text":text.join(" ")}]}},
                        "stopReason":"end_turn","usage":usage,"metrics":{"latencyMs":12}}),
                );
            }
            let mut frames = vec![event("messageStart", json!({"role":"assistant"}))];
            for i in 0..out {
                frames.push(event(
                    "contentBlockDelta",
                    json!({"contentBlockIndex":0,"delta":{"text": if i == 0 { "tok" } else { " tok" }}}),
                ));
            }
            frames.push(event("contentBlockStop", json!({"contentBlockIndex":0})));
            frames.push(event("messageStop", json!({"stopReason":"end_turn"})));
            frames.push(event(
                "metadata",
                json!({"usage":usage,"metrics":{"latencyMs":12}}),
            ));
            stream_response("application/vnd.amazon.eventstream", frames, call.delay())
        }
        "invoke" => {
            let input = text_words(v.get("messages").unwrap_or(&Value::Null)).max(1);
            let out = v
                .get("max_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(5)
                .clamp(1, 2000);
            call.record(Reported {
                api: "bedrock",
                model: model.clone(),
                input_tokens: input,
                output_tokens: out,
                usage_sent: true,
                ..Default::default()
            });
            json_for(
                &call,
                json!({"id":"msg_bdrk_fake","type":"message","role":"assistant","model":"claude-3-5-sonnet-20240620",
                    "content":[{"type":"text","text":"tok"}],"stop_reason":"end_turn",
                    "usage":{"input_tokens":input,"output_tokens":out}}),
            )
        }
        _ => json_response(404, json!({"message":"unknown operation"})),
    }
}
