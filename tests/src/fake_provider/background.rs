//! The fake's background work, as OpenAI's Responses API and Gemini's
//! Interactions API have it: a create call answered at once with the work
//! running; `GET …/responses/{id}` or `GET …/interactions/{id}` answers it
//! running on the first poll and done from the second on (reported to the
//! log once, when it is first seen done); `POST …/{id}/cancel` cancels it.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use serde_json::{Value, json};

use http_body_util::BodyExt;

use super::{Body, Call, Log, Reported, json_response};

/// A piece of background work: what each retrieval shows of it.
pub(crate) struct Job {
    pub running: Value,
    pub done: Value,
    pub cancelled: Value,
    /// What the provider bills when it is done.
    pub reported: Reported,
}

struct Entry {
    sni: String,
    job: Job,
    polls: u32,
    done: bool,
}

static JOBS: LazyLock<Mutex<HashMap<String, Entry>>> = LazyLock::new(Default::default);
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A new id with `prefix` (`resp_fake`, `int_fake`).
pub(crate) fn next_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}{n:08x}")
}

/// Starts `job` under `id` for the host of `call`.
pub(crate) fn start(call: &Call, id: &str, mut job: Job) {
    job.reported.sni = call.sni.clone();
    job.reported.path = call.path.clone();
    JOBS.lock().unwrap().insert(
        id.to_string(),
        Entry {
            sni: call.sni.clone(),
            job,
            polls: 0,
            done: false,
        },
    );
}

/// Answers a retrieval of background work the fake started; `None` for
/// any other call.
pub(crate) fn retrieval(
    method: &hyper::Method,
    path: &str,
    query: &str,
    sni: &str,
    log: &Log,
) -> Option<hyper::Response<Body>> {
    let p = path.trim_end_matches('/');
    let (p, cancel) = match p.strip_suffix("/cancel") {
        Some(rest) => (rest, true),
        None => (p, false),
    };
    let (parent, id) = p.rsplit_once('/')?;
    let ours = (parent.ends_with("/responses") && id.starts_with("resp_fake"))
        || (parent.ends_with("/interactions") && id.starts_with("int_fake"));
    if !ours || cancel != (method == hyper::Method::POST) {
        return None;
    }
    let mut all = JOBS.lock().unwrap();
    let Some(e) = all.get_mut(id).filter(|e| e.sni == sni) else {
        return Some(json_response(
            404,
            json!({"error":{"message":format!("No response found with id '{id}'."),
                "type":"invalid_request_error","param":null,"code":null}}),
        ));
    };
    if cancel {
        let answer = e.job.cancelled.clone();
        all.remove(id);
        return Some(json_response(200, answer));
    }
    // A Responses API stream resumed (`?stream=true`): its end, now.
    let resumed = query.split('&').any(|kv| kv == "stream=true");
    e.polls += if resumed { 2 } else { 1 };
    if e.polls < 2 {
        return Some(json_response(200, e.job.running.clone()));
    }
    if !e.done {
        e.done = true;
        log.lock().unwrap().push(e.job.reported.clone());
    }
    if resumed {
        let data = json!({"type": "response.completed", "sequence_number": 999,
            "response": e.job.done});
        let event = format!("event: response.completed\ndata: {data}\n\n");
        return Some(
            hyper::Response::builder()
                .status(200)
                .header("content-type", "text/event-stream")
                .body(
                    http_body_util::Full::new(bytes::Bytes::from(event))
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .expect("response"),
        );
    }
    Some(json_response(200, e.job.done.clone()))
}
