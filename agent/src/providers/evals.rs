//! OpenAI Evals runs (`/v1/evals/{eval_id}/runs`): a run samples and grades
//! at OpenAI, so no call of the job's carries its spend. What the job sees
//! is each run's cumulative usage per model (`per_model_usage`: the
//! sampling model's and each grader's prompt, completion and cached
//! tokens) in the run object (create, retrieve, cancel, list). This module
//! reads those snapshots as Managed Agents sessions' are read, one per
//! (run, model), and one per run with no usage (which makes the run
//! followed); the proxy turns each one's growth into a row (see
//! `proxy::sessions`).
//!
//! Owns: which calls are Evals run calls, and reading runs' usage.
//! Must never: count a snapshot itself (only growth is spend), or take a
//! run id from anything but the answer or the path.

use serde_json::Value;

use super::{JsonBody, ParsedUsage, RequestInfo, SessionSnapshot, SessionsCall, UsageParser};
use crate::meter::Usage;

/// The operation recorded for a run's growth.
pub const OPERATION: &str = "eval_run";

/// An Evals run call whose answer shows runs' usage; `None` for any other
/// path. `POST …/evals/{eval}/runs` creates one (`Create`), `GET` of the
/// same lists the eval's runs (`List`), `GET …/runs/{run}` and `POST
/// …/runs/{run}/cancel` show one (`Of`).
pub fn call(method: &http::Method, path: &str) -> Option<RequestInfo> {
    let p = path.trim_end_matches('/');
    let (head, tail) = p.split_once("/evals/")?;
    if !(head.is_empty() || head.ends_with("/v1") || head == "/openai") {
        return None;
    }
    let segments: Vec<&str> = tail.split('/').collect();
    let get = method == http::Method::GET;
    let post = method == http::Method::POST;
    let sessions = match segments.as_slice() {
        [_, "runs"] if post => SessionsCall::Create,
        [_, "runs"] if get => SessionsCall::List,
        [_, "runs", run] if get => SessionsCall::Of(super::path_id(run)?),
        [_, "runs", run, "cancel"] if post => SessionsCall::Of(super::path_id(run)?),
        _ => return None,
    };
    Some(RequestInfo {
        operation: OPERATION,
        metered: true,
        sessions,
        ..Default::default()
    })
}

/// A `per_model_usage` entry's counts, normalised as OpenAI's usage is
/// (the prompt includes the cached tokens).
fn usage_of(u: &Value) -> Option<(String, Usage)> {
    let model = u.get("model_name").and_then(Value::as_str)?;
    let f = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut model = model.to_string();
    crate::meter::cap_owned(&mut model, crate::meter::MAX_MODEL_NAME);
    let input = f("prompt_tokens");
    Some((
        model,
        Usage {
            input_tokens: input,
            output_tokens: f("completion_tokens"),
            cached_input_tokens: f("cached_tokens").min(input),
            ..Default::default()
        },
    ))
}

/// Reads the runs an answer shows.
pub struct RunParser {
    json: JsonBody,
    call: SessionsCall,
}

impl RunParser {
    pub fn new(info: &RequestInfo) -> RunParser {
        RunParser {
            json: JsonBody::new(JsonBody::DEFAULT_LIMIT),
            call: info.sessions.clone(),
        }
    }

    /// A run: one snapshot of the run (no usage: it makes the run
    /// followed), then one per model, whose id is the run's and the
    /// model's.
    fn on_run(&self, run: &Value, found: &mut Vec<SessionSnapshot>) {
        if run.get("object").and_then(Value::as_str) != Some("eval.run") {
            return;
        }
        let Some(id) = run
            .get("id")
            .and_then(Value::as_str)
            .and_then(super::response_id)
        else {
            return;
        };
        // A list shows the eval's runs, other jobs' among them; an answer
        // about one run is about the run its path names.
        let seen_by = match &self.call {
            SessionsCall::Of(of) if *of != id => return,
            call => call.clone(),
        };
        found.push(SessionSnapshot {
            id: id.clone(),
            seen_by: seen_by.clone(),
            ..Default::default()
        });
        let models = run.get("per_model_usage").and_then(Value::as_array);
        for (model, usage) in models.into_iter().flatten().filter_map(usage_of) {
            let key = format!("{id} {model}");
            // The same model twice in one run (a sampler and a grader, if
            // the API ever lists them apart): both are its usage.
            if let Some(s) = found.iter_mut().find(|s| s.id == key) {
                s.usage = s.usage.zip_with(&usage, u64::saturating_add);
                continue;
            }
            found.push(SessionSnapshot {
                id: key,
                model: Some(model),
                usage,
                seen_by: seen_by.clone(),
                parent: Some(id.clone()),
                ..Default::default()
            });
        }
    }
}

impl UsageParser for RunParser {
    fn feed(&mut self, chunk: &[u8]) {
        self.json.feed(chunk);
    }

    fn finish(&mut self) -> ParsedUsage {
        let mut found = Vec::new();
        if let Some(v) = self.json.take() {
            match v.get("data").and_then(Value::as_array) {
                Some(runs) if self.call == SessionsCall::List => {
                    for run in runs {
                        self.on_run(run, &mut found);
                    }
                }
                _ => self.on_run(&v, &mut found),
            }
        }
        ParsedUsage {
            sessions: found,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::testing::{parse_split, request};
    use crate::providers::{Provider, openai::OpenAi};

    #[test]
    fn run_calls_are_told_apart() {
        let of = |id: &str| Some(SessionsCall::Of(id.to_string()));
        for (method, path, want) in [
            ("POST", "/v1/evals/eval_1/runs", Some(SessionsCall::Create)),
            ("GET", "/v1/evals/eval_1/runs", Some(SessionsCall::List)),
            ("GET", "/v1/evals/eval_1/runs/evalrun_9", of("evalrun_9")),
            (
                "POST",
                "/v1/evals/eval_1/runs/evalrun_9/cancel",
                of("evalrun_9"),
            ),
            ("POST", "/v1/evals/eval_1/runs/evalrun_9", None),
            ("GET", "/v1/evals/eval_1/runs/evalrun_9/cancel", None),
            (
                "GET",
                "/openai/evals/eval_1/runs/evalrun_9",
                of("evalrun_9"),
            ),
            ("DELETE", "/v1/evals/eval_1/runs/evalrun_9", None),
            ("GET", "/v1/evals/eval_1/runs/evalrun_9/output_items", None),
            ("POST", "/v1/evals", None),
            ("GET", "/v1/evals/eval_1", None),
            ("GET", "/v1/projects/p/evals/eval_1/runs", None),
        ] {
            let info = OpenAi.request(&request(method, path, b""));
            assert_eq!(
                want.as_ref().map(|_| OPERATION),
                (info.operation == OPERATION).then_some(OPERATION),
                "{method} {path}"
            );
            assert_eq!(info.sessions.is_some(), want.is_some(), "{method} {path}");
            if let Some(w) = want {
                assert_eq!(info.sessions, w, "{method} {path}");
                assert!(info.metered && !info.own_row());
            }
        }
    }

    fn run(id: &str, usage: &str) -> String {
        format!(
            r#"{{"object":"eval.run","id":"{id}","eval_id":"eval_1","status":"in_progress","model":"gpt-4o-mini","name":"nightly","per_model_usage":{usage},"result_counts":{{"total":2,"passed":1,"failed":1,"errored":0}}}}"#
        )
    }

    #[test]
    fn a_run_is_one_snapshot_and_one_per_model() {
        let info = OpenAi.request(&request("GET", "/v1/evals/eval_1/runs/evalrun_9", b""));
        let body = run(
            "evalrun_9",
            r#"[{"model_name":"gpt-4o-mini","invocation_count":2,"prompt_tokens":100,"completion_tokens":20,"total_tokens":120,"cached_tokens":40},{"model_name":"o3-mini","invocation_count":2,"prompt_tokens":300,"completion_tokens":50,"total_tokens":350,"cached_tokens":0}]"#,
        );
        let p = parse_split(&OpenAi, &info, "application/json", body.as_bytes(), &[33]);
        let got: Vec<_> = p
            .sessions
            .iter()
            .map(|s| {
                (
                    s.id.as_str(),
                    s.model.as_deref(),
                    s.usage.input_tokens,
                    s.usage.output_tokens,
                    s.usage.cached_input_tokens,
                    s.parent.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("evalrun_9", None, 0, 0, 0, None),
                (
                    "evalrun_9 gpt-4o-mini",
                    Some("gpt-4o-mini"),
                    100,
                    20,
                    40,
                    Some("evalrun_9")
                ),
                (
                    "evalrun_9 o3-mini",
                    Some("o3-mini"),
                    300,
                    50,
                    0,
                    Some("evalrun_9")
                ),
            ]
        );
        assert!(
            p.sessions
                .iter()
                .all(|s| s.seen_by == SessionsCall::Of("evalrun_9".into()))
        );
        // A created run, no usage yet; another run's answer on this path
        // (it cannot be) and other objects show nothing.
        let info = OpenAi.request(&request("POST", "/v1/evals/eval_1/runs", b"{}"));
        let p = parse_split(
            &OpenAi,
            &info,
            "application/json",
            run("evalrun_1", "null").as_bytes(),
            &[],
        );
        assert_eq!(p.sessions.len(), 1);
        assert_eq!(p.sessions[0].seen_by, SessionsCall::Create);
        let info = OpenAi.request(&request("GET", "/v1/evals/eval_1/runs/evalrun_9", b""));
        for body in [
            run("evalrun_other", "[]"),
            r#"{"error":{"message":"not found"}}"#.to_string(),
        ] {
            let p = parse_split(&OpenAi, &info, "application/json", body.as_bytes(), &[]);
            assert!(p.sessions.is_empty(), "{body}");
        }
    }

    #[test]
    fn a_list_shows_every_run_as_a_list_does() {
        let info = OpenAi.request(&request("GET", "/v1/evals/eval_1/runs", b""));
        let body = format!(
            r#"{{"object":"list","data":[{},{}],"has_more":false}}"#,
            run(
                "evalrun_1",
                r#"[{"model_name":"gpt-4o-mini","prompt_tokens":5,"completion_tokens":1,"cached_tokens":0}]"#
            ),
            run("evalrun_2", "[]")
        );
        let p = parse_split(&OpenAi, &info, "application/json", body.as_bytes(), &[]);
        assert_eq!(p.sessions.len(), 3);
        assert!(p.sessions.iter().all(|s| s.seen_by == SessionsCall::List));
    }
}
