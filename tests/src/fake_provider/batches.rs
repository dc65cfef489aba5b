//! The fake's batch APIs: OpenAI's (`POST /v1/files`, `POST /v1/batches`,
//! `GET /v1/batches/{id}`, `GET /v1/files/{id}/content`), Anthropic's
//! Message Batches (`POST /v1/messages/batches`, `GET …/{id}`,
//! `GET …/{id}/results`) and Gemini's (`POST …:batchGenerateContent` with
//! inlined requests, `GET /v1beta/batches/{id}`). A batch ends at once:
//! its first retrieval shows it ended. Each request of a batch is answered
//! with input = 10 + its words and output = its output cap (16 without
//! one); a request whose id starts with `bad` fails (no usage).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::{Body, json_response, text_words};

#[derive(Default)]
struct Store {
    /// OpenAI files by id: their content.
    files: HashMap<String, Vec<u8>>,
    /// OpenAI batches by id: (input file, output file).
    openai: HashMap<String, (String, String)>,
    /// Anthropic batches by id: their requests.
    anthropic: HashMap<String, Vec<Value>>,
    /// Gemini batches by id: (model, inlined requests, whether their
    /// responses go to a file).
    gemini: HashMap<String, (String, Vec<Value>, bool)>,
    next: u64,
}

static STORE: LazyLock<Mutex<Store>> = LazyLock::new(Default::default);

impl Store {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }
}

/// Input and output tokens of one request of a batch.
fn usage_of(body: &Value, cap: Option<u64>) -> (u64, u64) {
    (10 + text_words(body), cap.unwrap_or(16))
}

fn jsonl(status: u16, lines: Vec<Value>, content_type: &str) -> hyper::Response<Body> {
    let mut out = String::new();
    for l in lines {
        out.push_str(&l.to_string());
        out.push('\n');
    }
    hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(out)).boxed())
        .expect("response")
}

/// The JSONL part of a multipart upload (the lines that are JSON objects).
fn multipart_jsonl(body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('{') && serde_json::from_str::<Value>(line).is_ok() {
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
    out
}

fn openai_batch(id: &str, input: &str, output: Option<&str>) -> Value {
    json!({"id": id, "object": "batch", "endpoint": "/v1/chat/completions",
        "input_file_id": input, "completion_window": "24h",
        "status": if output.is_some() { "completed" } else { "validating" },
        "output_file_id": output, "error_file_id": null, "created_at": 1_764_460_800,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}})
}

/// The output file of an OpenAI batch whose input file is `input`.
fn openai_output(input: &[u8]) -> Vec<Value> {
    let mut lines = Vec::new();
    for (i, line) in String::from_utf8_lossy(input).lines().enumerate() {
        let Ok(req) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let id = req["custom_id"].as_str().unwrap_or("").to_string();
        let body = &req["body"];
        let response = if id.starts_with("bad") {
            json!({"status_code": 400, "request_id": format!("req_{i}"),
                "body": {"error": {"message": "bad request", "type": "invalid_request_error"}}})
        } else {
            let (input, output) = usage_of(&body["messages"], body["max_tokens"].as_u64());
            json!({"status_code": 200, "request_id": format!("req_{i}"),
                "body": {"id": format!("chatcmpl-{i}"), "object": "chat.completion",
                    "created": 1_764_460_800, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "length"}],
                    "usage": {"prompt_tokens": input, "completion_tokens": output,
                        "total_tokens": input + output}}})
        };
        lines.push(json!({"id": format!("batch_req_{i}"), "custom_id": id,
            "response": response, "error": null}));
    }
    lines
}

fn anthropic_batch(id: &str, n: usize, ended: bool) -> Value {
    json!({"id": id, "type": "message_batch",
    "processing_status": if ended { "ended" } else { "in_progress" },
    "request_counts": {"processing": if ended { 0 } else { n }, "succeeded": if ended { n } else { 0 },
        "errored": 0, "canceled": 0, "expired": 0},
    "ended_at": if ended { json!("2026-11-30T00:00:01Z") } else { Value::Null },
    "created_at": "2026-11-30T00:00:00Z", "expires_at": "2026-12-01T00:00:00Z",
    "archived_at": null, "cancel_initiated_at": null,
    "results_url": if ended {
        json!(format!("https://api.anthropic.com/v1/messages/batches/{id}/results"))
    } else {
        Value::Null
    }})
}

fn anthropic_results(requests: &[Value]) -> Vec<Value> {
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let id = r["custom_id"].as_str().unwrap_or("").to_string();
            if id.starts_with("bad") {
                return json!({"custom_id": id, "result": {"type": "errored",
                    "error": {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}}});
            }
            let p = &r["params"];
            let (input, output) = usage_of(&p["messages"], p["max_tokens"].as_u64());
            json!({"custom_id": id, "result": {"type": "succeeded", "message": {
                "id": format!("msg_b{i}"), "type": "message", "role": "assistant",
                "model": p["model"], "content": [{"type": "text", "text": "ok"}],
                "stop_reason": "max_tokens", "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": output,
                    "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                    "service_tier": "batch"}}}})
        })
        .collect()
}

/// A Gemini batch's responses, in the order of its requests.
fn gemini_responses(model: &str, requests: &[Value]) -> Vec<Value> {
    requests
        .iter()
        .map(|r| {
            let key = r["metadata"]["key"].as_str().unwrap_or("");
            if key.starts_with("bad") {
                return json!({"error": {"code": 400, "message": "bad"}, "metadata": r["metadata"]});
            }
            let req = &r["request"];
            let (input, output) = usage_of(
                &req["contents"],
                req["generationConfig"]["maxOutputTokens"].as_u64(),
            );
            json!({"response": {"candidates": [{"content": {"role": "model",
                    "parts": [{"text": "ok"}]}, "finishReason": "MAX_TOKENS"}],
                "usageMetadata": {"promptTokenCount": input, "candidatesTokenCount": output,
                    "totalTokenCount": input + output},
                "modelVersion": model}, "metadata": r["metadata"]})
        })
        .collect()
}

/// A Gemini batch; ended when `requests` are given, its responses
/// inlined, or in the file `files/out{id}` when `to_file`.
fn gemini_batch(id: &str, model: &str, requests: Option<&[Value]>, to_file: bool) -> Value {
    let mut meta = json!({"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
        "model": format!("models/{model}"), "displayName": "fake",
        "createTime": "2026-11-30T00:00:00Z",
        "state": if requests.is_some() { "BATCH_STATE_SUCCEEDED" } else { "BATCH_STATE_PENDING" }});
    if let Some(requests) = requests {
        meta["output"] = if to_file {
            json!({"responsesFile": format!("files/out{id}")})
        } else {
            json!({"inlinedResponses": {"inlinedResponses": gemini_responses(model, requests)}})
        };
        meta["endTime"] = json!("2026-11-30T00:00:01Z");
    }
    json!({"name": format!("batches/{id}"), "metadata": meta, "done": requests.is_some()})
}

/// The inlined requests of a Gemini batch create, wherever they sit.
fn gemini_requests(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) if a.iter().all(|r| r.get("request").is_some()) && !a.is_empty() => {
            a.clone()
        }
        Value::Array(a) => a.iter().flat_map(gemini_requests).collect(),
        Value::Object(m) => m.values().flat_map(gemini_requests).collect(),
        _ => Vec::new(),
    }
}

/// Answers a batch call; `None` for any other. `body` is the request's
/// raw body (`None` for a GET).
pub(crate) fn answer(
    method: &hyper::Method,
    path: &str,
    sni: &str,
    body: Option<&[u8]>,
) -> Option<hyper::Response<Body>> {
    let p = path.trim_end_matches('/');
    let get = method == hyper::Method::GET;
    let mut store = STORE.lock().unwrap();
    let json_body = || body.and_then(|b| serde_json::from_slice::<Value>(b).ok());
    if sni == "api.anthropic.com" {
        if let Some(rest) = p.strip_prefix("/v1/messages/batches") {
            let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
            return Some(match (segments.as_slice(), get) {
                ([], false) => {
                    let requests = json_body()?["requests"].as_array()?.clone();
                    let id = store.id("msgbatch_");
                    let n = requests.len();
                    store.anthropic.insert(id.clone(), requests);
                    json_response(200, anthropic_batch(&id, n, false))
                }
                ([id], true) => match store.anthropic.get(*id) {
                    Some(r) => json_response(200, anthropic_batch(id, r.len(), true)),
                    None => json_response(
                        404,
                        json!({"type": "error", "error": {"type": "not_found_error"}}),
                    ),
                },
                ([id, "results"], true) => match store.anthropic.get(*id) {
                    Some(r) => jsonl(200, anthropic_results(r), "application/binary"),
                    None => json_response(
                        404,
                        json!({"type": "error", "error": {"type": "not_found_error"}}),
                    ),
                },
                _ => return None,
            });
        }
        return None;
    }
    if sni == "generativelanguage.googleapis.com" {
        if !get && let Some(model) = p.strip_suffix(":batchGenerateContent") {
            let model = model.rsplit('/').next()?.to_string();
            let body = json_body()?;
            let requests = gemini_requests(&body);
            // A batch whose display name is `to-file` answers in a file.
            let to_file = body["batch"]["displayName"] == "to-file";
            let id = store.id("fakebatch");
            let answer = gemini_batch(&id, &model, None, to_file);
            store.gemini.insert(id, (model, requests, to_file));
            return Some(json_response(200, answer));
        }
        let (version, rest) = p.trim_start_matches('/').split_once('/')?;
        if !version.starts_with('v') {
            return None;
        }
        if let Some(id) = rest.strip_prefix("batches/") {
            return Some(match store.gemini.get(id) {
                Some((model, requests, to_file)) if get => {
                    json_response(200, gemini_batch(id, model, Some(requests), *to_file))
                }
                _ => json_response(404, json!({"error": {"code": 404, "status": "NOT_FOUND"}})),
            });
        }
        let file = rest.strip_prefix("files/out")?.strip_suffix(":download")?;
        let (model, requests, _) = store.gemini.get(file)?;
        let lines = gemini_responses(model, requests)
            .into_iter()
            .zip(requests)
            .map(|(mut r, q)| {
                r["key"] = q["metadata"]["key"].clone();
                r.as_object_mut().map(|o| o.remove("metadata"));
                r
            })
            .collect();
        return Some(jsonl(200, lines, "application/octet-stream"));
    }
    // OpenAI.
    if !get && p == "/v1/files" {
        let content = multipart_jsonl(body?);
        let id = store.id("file-in");
        let bytes = content.len();
        store.files.insert(id.clone(), content);
        return Some(json_response(
            200,
            json!({"id": id, "object": "file", "bytes": bytes, "created_at": 1_764_460_800,
                "filename": "in.jsonl", "purpose": "batch", "status": "processed"}),
        ));
    }
    if !get && p == "/v1/batches" {
        let input = json_body()?["input_file_id"].as_str()?.to_string();
        let id = store.id("batch_");
        let output = store.id("file-out");
        let answer = openai_batch(&id, &input, None);
        store.openai.insert(id, (input, output));
        return Some(json_response(200, answer));
    }
    if get && let Some(id) = p.strip_prefix("/v1/batches/") {
        let (input, output) = store.openai.get(id)?.clone();
        // The output file exists once the batch has ended.
        if !store.files.contains_key(&output) {
            let lines = openai_output(store.files.get(&input)?);
            let mut content = Vec::new();
            for l in lines {
                content.extend_from_slice(l.to_string().as_bytes());
                content.push(b'\n');
            }
            store.files.insert(output.clone(), content);
        }
        return Some(json_response(200, openai_batch(id, &input, Some(&output))));
    }
    if get
        && let Some(id) = p
            .strip_prefix("/v1/files/")
            .and_then(|r| r.strip_suffix("/content"))
    {
        let content = store.files.get(id)?.clone();
        return Some(
            hyper::Response::builder()
                .status(200)
                .header("content-type", "application/octet-stream")
                .body(Full::new(Bytes::from(content)).boxed())
                .expect("response"),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gemini_batch_is_answered_on_any_api_version() {
        let body = br#"{"batch":{"displayName":"x","inputConfig":{"requests":{"requests":[{"request":{"contents":[{"parts":[{"text":"hi there"}]}]},"metadata":{"key":"g1"}}]}}}}"#;
        let r = answer(
            &hyper::Method::POST,
            "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
            "generativelanguage.googleapis.com",
            Some(body),
        );
        assert!(r.is_some());
        let r = answer(
            &hyper::Method::GET,
            "/v1beta/batches/fakebatch1",
            "generativelanguage.googleapis.com",
            None,
        );
        assert!(r.is_some());
    }
}
