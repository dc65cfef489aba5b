//! The fake's OpenAI Evals runs (`/v1/evals/{eval}/runs` on
//! api.openai.com): create, retrieve, list. A run is queued when created;
//! each retrieval moves it on: the first shows the sampling model's usage
//! so far (in progress), the second and later the run completed, with the
//! sampling model's final usage and the grader's.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use serde_json::{Value, json};

use super::{Body, json_response};

static RUNS: LazyLock<Mutex<HashMap<String, (String, u32)>>> = LazyLock::new(Default::default);
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn usage(model: &str, prompt: u64, completion: u64, cached: u64) -> Value {
    json!({"model_name": model, "invocation_count": 2, "prompt_tokens": prompt,
        "completion_tokens": completion, "total_tokens": prompt + completion,
        "cached_tokens": cached})
}

fn run_json(id: &str, eval: &str, stage: u32) -> Value {
    let (status, per_model) = match stage {
        0 => ("queued", Value::Null),
        1 => ("in_progress", json!([usage("gpt-4o-mini", 100, 20, 0)])),
        _ => (
            "completed",
            json!([
                usage("gpt-4o-mini", 200, 40, 50),
                usage("o3-mini", 300, 50, 0)
            ]),
        ),
    };
    json!({"object": "eval.run", "id": id, "eval_id": eval, "created_at": 1_764_460_800,
        "status": status, "model": "gpt-4o-mini", "name": "nightly", "metadata": {},
        "data_source": {"type": "jsonl", "source": {"type": "file_content", "content": []}},
        "error": null, "report_url": "https://platform.openai.com/evals/fake",
        "per_model_usage": per_model, "per_testing_criteria_results": [],
        "result_counts": {"total": 2, "passed": 1, "failed": 1, "errored": 0}})
}

/// Answers an Evals run call; `None` for any other.
pub(crate) fn answer(
    method: &hyper::Method,
    path: &str,
    sni: &str,
) -> Option<hyper::Response<Body>> {
    if sni != "api.openai.com" {
        return None;
    }
    let rest = path.trim_end_matches('/').strip_prefix("/v1/evals/")?;
    let segments: Vec<&str> = rest.split('/').collect();
    let mut runs = RUNS.lock().unwrap();
    Some(match (segments.as_slice(), method == hyper::Method::GET) {
        ([eval, "runs"], false) => {
            let id = format!(
                "evalrun_fake{}",
                NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            );
            runs.insert(id.clone(), (eval.to_string(), 0));
            json_response(200, run_json(&id, eval, 0))
        }
        ([eval, "runs"], true) => {
            let mut data: Vec<Value> = runs
                .iter()
                .filter(|(_, (e, _))| e == eval)
                .map(|(id, (e, stage))| run_json(id, e, *stage))
                .collect();
            data.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
            json_response(
                200,
                json!({"object": "list", "data": data, "has_more": false,
                "first_id": null, "last_id": null}),
            )
        }
        ([_, "runs", id], true) => match runs.get_mut(*id) {
            Some((eval, stage)) => {
                *stage += 1;
                json_response(200, run_json(id, eval, *stage))
            }
            None => json_response(
                404,
                json!({"error": {"message": "no such run", "type": "invalid_request_error"}}),
            ),
        },
        ([_, "runs", id, "cancel"], false) => match runs.get(*id) {
            Some((eval, stage)) => {
                let mut run = run_json(id, eval, *stage);
                run["status"] = "canceled".into();
                json_response(200, run)
            }
            None => json_response(
                404,
                json!({"error": {"message": "no such run", "type": "invalid_request_error"}}),
            ),
        },
        _ => return None,
    })
}
