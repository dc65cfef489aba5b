//! Provider adapters: one per provider API, all behind the [`Provider`] trait.
//!
//! Owns: recognising a provider request (operation, model, stream flag,
//! output cap) and reading usage out of its response, chunk by chunk.
//! Must never: do I/O, block, or hold a whole stream (parsers keep only the
//! partial line or the bounded JSON body they need).
//!
//! Adding a provider is one file implementing [`Provider`] plus one line in
//! [`adapter_for`].

pub mod anthropic;
pub mod azure;
pub mod batch;
pub mod bedrock;
pub mod catalogue;
pub mod decode;
pub mod evals;
pub mod eventstream;
pub mod gemini;
pub mod managed_agents;
pub mod openai;
pub mod sse;
#[cfg(test)]
pub(crate) mod testing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::budget::{BodyBudget, BodyLease};

use http::{HeaderMap, Method};
use serde_json::Value;

use crate::config::ApiKind;
use crate::meter::Usage;

/// The parts of a request an adapter may look at. Never logged whole: the
/// headers carry credentials.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The request body, when it was small enough to read (see
    /// `proxy.max_request_body`).
    pub body: Option<&'a [u8]>,
}

/// What an adapter learned from a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// `chat`, `text_completion`, `embeddings`, ... (`other` when unknown).
    pub operation: &'static str,
    /// False for calls that cost nothing (model lists, file downloads):
    /// they are forwarded but not recorded.
    pub metered: bool,
    pub model: Option<String>,
    pub streaming: bool,
    /// The output cap the request asked for, if any (budget reservations).
    pub max_output_tokens: Option<u64>,
    /// How many choices an OpenAI chat or completions request asked for
    /// (its `n`; 0 when it did not say, which is 1): a stream's generation
    /// is over when that many have finished.
    pub choices: u32,
    /// The agent asked the provider for usage the client did not ask for
    /// (OpenAI `stream_options.include_usage`): the response filter removes
    /// what the client would not otherwise have received.
    pub injected_usage: bool,
    /// The request body's top-level `stream_options` (OpenAI), as far as
    /// the adapter read it: lets the usage request be spliced in without a
    /// second scan of the body.
    pub stream_options: StreamOptions,
    /// The API version the request names refuses `stream_options` (Azure
    /// OpenAI before 2024-09-01-preview): usage must not be asked for.
    pub refuses_stream_options: bool,
    /// The API that serves this request when it is not the host's (Claude
    /// on a Vertex AI host configured as Gemini): its parsers, estimates,
    /// name and prices are used from here on.
    pub api: Option<crate::config::ApiKind>,
    /// The API whose format the request and its answer have when the
    /// provider serves another API's under its own name and prices
    /// (OpenAI's on Anthropic's and Gemini's OpenAI-compatible endpoints,
    /// Anthropic's Messages API on DeepSeek's `/anthropic`): that API's
    /// adapter rewrites, filters and reads them, and estimates their
    /// input, while the record keeps the provider (`api`, else the host's).
    pub wire: Option<crate::config::ApiKind>,
    /// The request asked to run in the background (the Responses API's
    /// `background: true`): its answer is usually the response `queued`,
    /// whose usage comes later, in a retrieval of it.
    pub background: bool,
    /// The request reads the state of an earlier response, the one with
    /// this id (`GET …/responses/{id}`, `POST …/responses/{id}/cancel`):
    /// it is never a row of its own; it settles the record of a background
    /// response the agent holds open, and is forwarded unread otherwise.
    pub retrieves: Option<String>,
    /// Claude Managed Agents: the answer shows sessions' cumulative usage
    /// (a session, a list of them, a session's events): it is never a row
    /// of its own; each session's growth since the agent last saw it is.
    pub sessions: SessionsCall,
    /// The request reads a batch's results (see [`batch`]): it is never a
    /// row of its own; the results it reads are, per model, from the line
    /// after the last one counted.
    pub batch: Option<BatchResults>,
    /// The provider prices this call by something other than tokens
    /// (Vertex AI's text embedding models, per character): recorded with
    /// its counts and `cost_usd: null`, never at a token price.
    pub not_token_priced: bool,
    /// The host may count thoughts only in `total_tokens`, beside the
    /// completion (Gemini's OpenAI-compatible endpoint): see
    /// `openai::WireUsage::usage_for`.
    pub thoughts_beside_completion: bool,
}

/// Calls that bill no tokens themselves (a batch submission, a file
/// upload, an answer that is not a batch's results): recorded with zero
/// usage.
pub(crate) struct NoUsage;

impl UsageParser for NoUsage {
    fn feed(&mut self, _: &[u8]) {}

    fn finish(&mut self) -> ParsedUsage {
        ParsedUsage {
            usage: Some(Usage::default()),
            ..Default::default()
        }
    }
}

impl RequestInfo {
    /// Its counts may be estimated locally when the provider gives none:
    /// not an image's, audio's, Realtime response's or Gemini Live turn's,
    /// whose tokens are pixels and sound, which a text tokenizer cannot
    /// count.
    pub fn estimable(&self) -> bool {
        !matches!(self.operation, "image" | "audio" | "realtime" | "live")
    }

    /// The request is a row of its own (not a retrieval that settles a
    /// parked record, a Managed Agents call that shows sessions' growth,
    /// or a read of batch results): it is estimated when the provider
    /// does not count it, and in flight while it runs.
    pub fn own_row(&self) -> bool {
        self.retrieves.is_none() && !self.sessions.is_some() && self.batch.is_none()
    }

    /// The API whose format the request has: [`RequestInfo::wire`], else
    /// the API that serves it (`api`, else the host's, `host`).
    pub fn format(&self, host: crate::config::ApiKind) -> crate::config::ApiKind {
        self.wire.or(self.api).unwrap_or(host)
    }
}

/// A read of a batch's results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResults {
    /// The batch's id (Anthropic, Gemini's `batches/…`) or its results
    /// file's (OpenAI, Gemini), sanitised by [`path_id`].
    pub id: String,
    /// How the results come.
    pub format: batch::Format,
    /// Where the read claims the results it counts (the proxy sets it).
    pub claims: batch::Claims,
}

impl BatchResults {
    pub fn new(id: String, format: batch::Format) -> BatchResults {
        BatchResults {
            id,
            format,
            claims: batch::Claims::default(),
        }
    }
}

/// Which Claude Managed Agents call a request is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SessionsCall {
    /// Not one.
    #[default]
    No,
    /// `POST /v1/sessions`: the session it answers starts at zero.
    Create,
    /// `GET /v1/sessions`: the workspace's sessions, other jobs' included.
    List,
    /// A call on the session the path names (retrieve, update, archive,
    /// its events and threads), whose `session.usage` events name none.
    Of(String),
}

impl SessionsCall {
    pub fn is_some(&self) -> bool {
        *self != SessionsCall::No
    }
}

/// What a request body's top-level `stream_options` member is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StreamOptions {
    /// The body was not read (or was not a JSON object).
    #[default]
    Unread,
    /// No such member.
    Absent,
    /// An object with `include_usage: true`.
    AsksForUsage,
    /// Anything else, `null` included.
    Other,
}

impl StreamOptions {
    /// Classifies a member read with [`present_member`].
    pub fn of(member: Option<&Value>) -> StreamOptions {
        match member {
            None => StreamOptions::Absent,
            Some(Value::Object(o))
                if o.get("include_usage").and_then(Value::as_bool) == Some(true) =>
            {
                StreamOptions::AsksForUsage
            }
            Some(_) => StreamOptions::Other,
        }
    }
}

/// Deserializes a member so that an explicit `null` is `Some(…)` (for a
/// `Value`, `Some(Value::Null)`) and only a missing member (with
/// `#[serde(default)]`) is `None`.
pub(crate) fn present_member<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Parses a JSON object into `T`, a struct of the members an adapter
/// reads (each of a lenient type: `Option<Value>`, [`Count`],
/// [`ObjectOr`]): serde skips the others without building them, where a
/// whole `Value` of a body costs some 16 times its size. `None` when
/// `body` is not a JSON object. A body the typed parse refuses for a
/// repeated member is read with the last of each, as the provider reads
/// it.
pub(crate) fn parse_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    // (A derived struct would also take an array, by position.)
    let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    if !object {
        return None;
    }
    if let Ok(t) = serde_json::from_slice::<T>(body) {
        return Some(t);
    }
    // A repeated member (which a derived struct refuses): the last of
    // each is kept, as the provider reads it. At the top level, the object
    // is read again with its values as raw text (a copy of the body, no
    // document built); deeper, as a whole document, when it is not so
    // large in values that it would take many times its size.
    if let Some(t) = last_members_only(body) {
        return Some(t);
    }
    if !whole_value_affordable(body) {
        return None;
    }
    let v = serde_json::from_slice::<Value>(body).ok()?;
    T::deserialize(&v).ok()
}

/// `body` (a JSON object whose top-level members repeat) read into `T`
/// with the last of each member; `None` when none repeats or `T` still
/// refuses it.
fn last_members_only<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    let text = std::str::from_utf8(body).ok()?;
    let members: Members = serde_json::from_str(text).ok()?;
    let mut last = std::collections::HashMap::new();
    for (i, m) in members.0.iter().enumerate() {
        last.insert(m.key.as_ref(), i);
    }
    if last.len() == members.0.len() {
        return None;
    }
    let mut once = String::with_capacity(body.len());
    once.push('{');
    for (i, m) in members.0.iter().enumerate() {
        if last.get(m.key.as_ref()) != Some(&i) {
            continue;
        }
        if once.len() > 1 {
            once.push(',');
        }
        once.push_str(&serde_json::to_string(m.key.as_ref()).ok()?);
        once.push(':');
        once.push_str(m.value.get());
    }
    once.push('}');
    serde_json::from_str::<T>(&once).ok()
}

/// Most JSON values a body may hold for the agent to build it whole as a
/// `Value` (about 32 bytes a value, besides the strings): a body of
/// millions of small values (`[0,0,0,…]`, 2 bytes each in the text) would
/// otherwise take 16 times its size.
pub(crate) const MAX_WHOLE_VALUES: usize = 1 << 20;

/// Most top-level members [`Members`] lists (bodies and events have tens;
/// a list costs about 40 bytes a member).
pub(crate) const MAX_MEMBERS: usize = 1 << 16;

/// Whether `body` holds at most [`MAX_WHOLE_VALUES`] JSON values, counted
/// as the commas, colons and opening brackets outside strings (one pass,
/// nothing built).
pub(crate) fn whole_value_affordable(body: &[u8]) -> bool {
    let mut values = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b',' | b':' | b'[' | b'{' => {
                values += 1;
                if values > MAX_WHOLE_VALUES {
                    return false;
                }
            }
            _ => {}
        }
    }
    true
}

/// As [`parse_object`], but any other JSON value (an array, a number)
/// reads as `T::default()`, having none of the members: `None` only when
/// `body` is not JSON (the test of parsers that bill a JSON answer
/// whatever it holds).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Option<T> {
    parse_object(body).or_else(|| {
        serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .is_ok()
            .then(T::default)
    })
}

/// The `Visitor` methods of a lenient member for the JSON values it does
/// not take: each reads as `Default` (nothing); arrays and objects are
/// skipped without being built. Floats, booleans, strings and nulls are
/// always among them; integers, arrays and objects when named
/// (`integers`, `arrays`, `objects`).
macro_rules! lenient_visits {
    ($($kind:ident),*) => {
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        $($crate::providers::lenient_visits!(@ $kind);)*
    };
    (@ arrays) => {
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(Default::default())
        }
    };
    (@ integers) => {
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
    (@ objects) => {
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            while a
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            Ok(Default::default())
        }
    };
}

// (So that adapters can name it, and it can name itself from theirs.)
pub(crate) use lenient_visits;

/// Reads a JSON object's members one by one: `on(name, access)` reads the
/// value of a member it wants and returns true; every other value is
/// skipped without being built. A repeated member is read each time (the
/// last wins, as the providers read it) instead of failing the parse, as
/// a derived struct would.
pub(crate) fn visit_members<'de, A: serde::de::MapAccess<'de>>(
    mut a: A,
    mut on: impl FnMut(&str, &mut A) -> Result<bool, A::Error>,
) -> Result<(), A::Error> {
    while let Some(k) = a.next_key::<std::borrow::Cow<'de, str>>()? {
        if !on(&k, &mut a)? {
            a.next_value::<serde::de::IgnoredAny>()?;
        }
    }
    Ok(())
}

/// An object's `type` member, when it is a string; `None` for anything
/// else (another JSON value, an object without it), never an error.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct TypeOf(pub Option<String>);

impl<'de> serde::Deserialize<'de> for TypeOf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TypeOf;
            lenient_visits!(integers, arrays);
            fn visit_map<A: serde::de::MapAccess<'de>>(self, a: A) -> Result<TypeOf, A::Error> {
                let mut kind = None;
                visit_members(a, |k, a| {
                    if k != "type" {
                        return Ok(false);
                    }
                    kind = a.next_value::<Option<Value>>()?;
                    Ok(true)
                })?;
                Ok(TypeOf(kind.and_then(|v| v.as_str().map(str::to_owned))))
            }
        }
        d.deserialize_any(V)
    }
}

/// A JSON number member read leniently: a non-negative integer is
/// `Some`, any other JSON value (a string, a float, an object...) is
/// `None` and skipped without being built. An unexpected type loses only
/// this member, never the parse around it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Count(pub Option<u64>);

impl<'de> serde::Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Count;
            lenient_visits!(arrays, objects);
            fn visit_u64<E>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).ok()))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Count, D::Error> {
                <Count as serde::Deserialize>::deserialize(d)
            }
        }
        d.deserialize_any(V)
    }
}

/// A member that is read as `T` when it is a JSON object and as `None`
/// (skipped, not built) when it is anything else: `T`'s derived parse
/// would otherwise also take an array, by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectOr<T>(pub Option<T>);

impl<T> Default for ObjectOr<T> {
    fn default() -> Self {
        ObjectOr(None)
    }
}

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for ObjectOr<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = ObjectOr<T>;
            lenient_visits!(integers, arrays);
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(a))
                    .map(|t| ObjectOr(Some(t)))
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                <ObjectOr<T> as serde::Deserialize>::deserialize(d)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Changes a response body on its way to the client. Used only to undo
/// what the agent itself added to a request; never to alter provider data.
pub trait BodyFilter: Send {
    /// Appends to `out` the bytes of `chunk` (plus any held back) that are
    /// ready to go to the client.
    fn filter(&mut self, chunk: &[u8], out: &mut Vec<u8>);
    /// Appends whatever is still held back at the end of the body.
    fn finish(&mut self, out: &mut Vec<u8>);
}

/// What a response parser found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedUsage {
    /// Provider-reported usage; `None` when the response carried none.
    pub usage: Option<Usage>,
    pub response_model: Option<String>,
    /// Generated text as far as the adapter could extract it (bounded by
    /// [`MAX_OUTPUT_TEXT`]), for a local estimate when usage is missing.
    pub output_text: String,
    /// `usage` is what the provider said in a stream that ended before its
    /// final counts (Anthropic's `message_start` carries the input and a
    /// placeholder output of 1; Gemini's chunks before the `finishReason`
    /// carry the counts so far): the output is provisional, and the record
    /// raises it to the estimate from `output_text` when that is higher.
    pub partial: bool,
    /// The provider's own error type, when it ended a stream with an error
    /// event after a successful status (Anthropic's `overloaded_error`,
    /// Bedrock's `throttlingException`). Sanitised: see [`error_type`].
    pub error: Option<String>,
    /// The service tier that served the request, as the response says
    /// (OpenAI `service_tier`: `default`, `flex`, `priority`, `scale`):
    /// see [`service_tier`].
    pub service_tier: Option<String>,
    /// The body could not be decoded (see [`decode::UNDECODABLE`]: a
    /// compression the agent does not read or a corrupt one, or a Bedrock
    /// event stream whose framing broke) and no final usage was read from
    /// what did.
    pub undecodable: bool,
    /// The percentage the provider adds to every rate for where the
    /// request ran (Anthropic's US-only inference, `inference_geo: "us"`:
    /// 10).
    pub uplift_percent: u32,
    /// The response's own id (the Responses API's `resp_…`, an
    /// interaction's id), sanitised by [`response_id`].
    pub response_id: Option<String>,
    /// The response's `status` as last reported (`queued`, `in_progress`,
    /// `completed`, `failed`, `cancelled`, `incomplete`), sanitised.
    pub response_status: Option<String>,
    /// Input and output tokens estimated earlier (a parked background
    /// request, whose body and streamed text are not kept while it
    /// waits): used as those estimates would be when the usage is missing.
    pub estimated: (u64, u64),
    /// Managed Agents sessions' cumulative usage, as the answer showed it
    /// last, per session.
    pub sessions: Vec<SessionSnapshot>,
    /// Batch results: what the lines read billed, per model.
    pub batch: Option<batch::BatchTally>,
    /// `usage` is the sums of many requests (a model's share of batch
    /// results), listed here as far as their prices depend on each.
    pub requests: Option<crate::meter::pricing::ManyRequests>,
}

/// A Claude Managed Agents session's cumulative usage at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// The session's id, sanitised by [`response_id`].
    pub id: String,
    /// The model of the session's agent, when the answer names it, with
    /// its speed (`fast` is recorded as that tier) and whether it runs
    /// US-only (10 % more).
    pub model: Option<String>,
    pub tier: Option<String>,
    pub uplift_percent: u32,
    /// Cumulative since the session began, normalised as any usage (a
    /// count the answer leaves out reads 0, which never lowers one seen).
    pub usage: Usage,
    /// How the answer showed it (a create starts at zero; a list shows
    /// other jobs' sessions too).
    pub seen_by: SessionsCall,
    /// What this is a share of (an Evals run, of which this is one
    /// model's usage): a share first seen while its whole is followed
    /// starts at zero, and is its whole's owner's.
    pub parent: Option<String>,
}

impl ParsedUsage {
    /// The response said it is still being generated (a background
    /// response answered `queued` or `in_progress`).
    pub fn unfinished(&self) -> bool {
        matches!(
            self.response_status.as_deref(),
            Some("queued" | "in_progress")
        )
    }
}

/// A service tier as it may be recorded: as [`error_type`], lower case
/// (one tier is one value in reports and metrics, however it was spelt).
pub fn service_tier(s: &str) -> Option<String> {
    error_type(s).map(|mut t| {
        t.make_ascii_lowercase();
        t
    })
}

/// A provider's error type as it may be recorded: at most 64 characters of
/// ASCII letters, digits, `_`, `-` and `.`; anything else gives `None`.
pub fn error_type(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    ok.then(|| s.to_string())
}

/// A response's or interaction's id as it may be kept: at most 256
/// characters of ASCII letters, digits and `_-.=~:` (OpenAI's `resp_…`,
/// Gemini's longer base64url ids); anything else gives `None`.
pub fn response_id(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'=' | b'~' | b':')
        });
    ok.then(|| s.to_string())
}

/// A retrieval of background work, as both APIs that have it spell one:
/// `GET {parent}/{id}` or `POST {parent}/{id}/cancel`. Gives the parent
/// path and the id (percent-decoded, kept as [`path_id`] keeps it).
pub(crate) fn retrieval_path<'a>(
    method: &http::Method,
    path: &'a str,
) -> Option<(&'a str, String)> {
    let p = path.trim_end_matches('/');
    let (p, cancel) = match p.strip_suffix("/cancel") {
        Some(rest) => (rest, true),
        None => (p, false),
    };
    let wanted = if cancel {
        http::Method::POST
    } else {
        http::Method::GET
    };
    if *method != wanted {
        return None;
    }
    let (parent, id) = p.rsplit_once('/')?;
    Some((parent, path_id(id)?))
}

/// An id as a URL path names it: percent-decoded (an SDK may escape `=`),
/// then as [`response_id`] keeps it.
pub fn path_id(segment: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()?;
    response_id(&decoded)
}

/// Bound on [`ParsedUsage::output_text`].
pub const MAX_OUTPUT_TEXT: usize = 4 << 20;

/// Appends to a bounded output-text buffer.
pub fn push_text(buf: &mut String, s: &str) {
    if buf.len() + s.len() <= MAX_OUTPUT_TEXT {
        buf.push_str(s);
    }
}

/// Reads usage out of a response body as it streams past.
pub trait UsageParser: Send {
    /// Called with each body chunk, in order, exactly as the client gets it.
    fn feed(&mut self, chunk: &[u8]);
    /// Called once when the body has ended (or the read was abandoned).
    fn finish(&mut self) -> ParsedUsage;
    /// The provider's usage has already been read (Anthropic's
    /// `message_start`, Gemini's `usageMetadata`), so `finish` will return
    /// some: the request body kept for a local estimate can go before the
    /// stream ends. Once true, stays true. The default, `false`, is always
    /// correct; a parser that may still drop what it read keeps it.
    fn usage_seen(&self) -> bool {
        false
    }

    /// The stream has shown its answer's generation over (OpenAI's
    /// `finish_reason`), though it has not ended: what follows (the usage
    /// chunk) costs the provider nothing more to send. The default,
    /// `false`, is always correct.
    fn generation_over(&self) -> bool {
        false
    }
}

/// One provider API.
pub trait Provider: Send + Sync {
    /// Provider name as recorded in the ledger (`openai`, `anthropic`, ...).
    fn name(&self) -> &'static str;
    /// Classifies a request.
    fn request(&self, req: &RequestView<'_>) -> RequestInfo;
    /// Optionally rewrites the request body before it is forwarded, and
    /// records what it did in `info`. Returns the new body.
    fn rewrite_request(&self, _info: &mut RequestInfo, _body: &[u8]) -> Option<bytes::Bytes> {
        None
    }

    /// A filter for the response body the client receives, when the
    /// request was rewritten.
    fn response_filter(&self, _info: &RequestInfo) -> Option<Box<dyn BodyFilter>> {
        None
    }

    /// A parser for the response to a request classified as `info`.
    /// `headers` are the response headers; the body the parser is fed is
    /// already decoded (no Content-Encoding).
    fn response_parser(
        &self,
        info: &RequestInfo,
        status: u16,
        headers: &HeaderMap,
    ) -> Box<dyn UsageParser>;
}

/// The adapter for an API kind.
pub fn adapter_for(api: ApiKind) -> &'static dyn Provider {
    match api {
        ApiKind::Anthropic => &anthropic::Anthropic,
        ApiKind::Openai => &openai::OpenAi,
        ApiKind::AzureOpenai => &azure::AzureOpenAi,
        ApiKind::Gemini => &gemini::Gemini,
        ApiKind::Bedrock => &bedrock::Bedrock,
    }
}

/// The top-level members of a request or response body that the adapters
/// read, parsed without building the rest of the document: `messages`,
/// `choices` and the like are scanned and skipped, not allocated. Each
/// member is kept as a `Value` so that an unexpected type loses only that
/// member, never the parse.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(default)]
pub struct Head {
    pub model: Option<Value>,
    /// OpenAI's `usage`, read without building it.
    pub usage: ObjectOr<openai::WireUsage>,
    pub stream: Option<Value>,
    pub max_completion_tokens: Option<Value>,
    pub max_output_tokens: Option<Value>,
    pub max_tokens: Option<Value>,
    /// OpenAI chat and completions: how many choices to generate.
    pub n: Option<Value>,
    /// `Some(Value::Null)` for an explicit `null`, `None` when missing.
    #[serde(deserialize_with = "present_member")]
    pub stream_options: Option<Value>,
    /// OpenAI: the tier that served the response.
    pub service_tier: Option<Value>,
    /// The Responses API: a request's `background`, a response's `id`
    /// and `status`.
    pub background: Option<Value>,
    pub id: Option<Value>,
    pub status: Option<Value>,
    /// The Responses API: the web searches billed among a response's
    /// `output` items, counted as they are skipped, and the search tools
    /// its `tools` lists.
    pub output: openai::WebSearchCalls,
    pub tools: openai::SearchTools,
}

impl Head {
    /// Parses `body`; `None` when it is not a JSON object (see
    /// [`parse_object`]).
    pub fn parse(body: &[u8]) -> Option<Head> {
        parse_object(body)
    }

    pub fn model(&self) -> Option<String> {
        self.model.as_ref()?.as_str().map(str::to_string)
    }

    /// `service_tier`, when it is a string [`service_tier`] accepts.
    pub fn service_tier(&self) -> Option<String> {
        self.service_tier.as_ref()?.as_str().and_then(service_tier)
    }

    /// `id` and `status`, when they are strings [`response_id`] and
    /// [`error_type`] accept.
    pub fn id_and_status(&self) -> (Option<String>, Option<String>) {
        fn s(v: &Option<Value>) -> Option<&str> {
            v.as_ref()?.as_str()
        }
        (
            s(&self.id).and_then(response_id),
            s(&self.status).and_then(error_type),
        )
    }
}

/// The budget of the bytes all [`JsonBody`]s hold together
/// (`proxy.max_buffered_response_bytes`): each answer's limit alone does
/// not bound the agent, since many large answers at once (embeddings of
/// big batches) would each hold up to it.
static RESPONSE_BUDGET: OnceLock<Arc<BodyBudget>> = OnceLock::new();
/// Answers left unread because that budget was held.
static RESPONSES_OVER_BUDGET: AtomicU64 = AtomicU64::new(0);

/// Sets the bound of the bytes all JSON answers hold at once; before the
/// first answer is read (later calls change nothing).
pub fn set_response_budget(bytes: usize) {
    let _ = RESPONSE_BUDGET.set(BodyBudget::new(bytes));
}

pub(crate) fn response_budget() -> &'static Arc<BodyBudget> {
    RESPONSE_BUDGET.get_or_init(|| BodyBudget::new(128 << 20))
}

/// Counts an answer (or a stream's event) left unread because the
/// response budget was held, and says so at powers of two.
pub(crate) fn count_over_budget() {
    let n = RESPONSES_OVER_BUDGET.fetch_add(1, Ordering::Relaxed);
    if n.is_power_of_two() || n == 0 {
        tracing::warn!(
            unparsed = n + 1,
            "the agent holds proxy.max_buffered_response_bytes of answers: this answer (or a stream's event) is not read for its usage (its record is estimated)"
        );
    }
}

/// Responses left unparsed because `proxy.max_buffered_response_bytes`
/// were held (their records are estimated), since start.
pub fn responses_over_budget() -> u64 {
    RESPONSES_OVER_BUDGET.load(Ordering::Relaxed)
}

/// Accumulates a JSON response body up to a bound and parses it at the end.
pub struct JsonBody {
    buf: Vec<u8>,
    limit: usize,
    overflowed: bool,
    /// The budget was held when the body came (not its own limit).
    over_budget: bool,
    /// Its bytes, taken from the response budget; given back on drop.
    lease: BodyLease,
}

impl JsonBody {
    /// Non-streaming responses larger than this are not parsed for usage.
    pub const DEFAULT_LIMIT: usize = 16 << 20;

    pub fn new(limit: usize) -> Self {
        Self::within(limit, response_budget())
    }

    /// As [`JsonBody::new`], holding its bytes against `budget`.
    pub fn within(limit: usize, budget: &Arc<BodyBudget>) -> Self {
        JsonBody {
            buf: Vec::new(),
            limit,
            overflowed: false,
            over_budget: false,
            lease: budget.lease(),
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.overflowed {
            return;
        }
        let fits = self.buf.len() + chunk.len() <= self.limit;
        if !(fits && self.lease.grow(chunk.len())) {
            if fits {
                self.over_budget = true;
                count_over_budget();
            }
            self.overflowed = true;
            self.buf = Vec::new();
            self.lease.release();
            return;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// Whether the body went unread because the budget was held.
    pub fn over_budget(&self) -> bool {
        self.over_budget
    }

    /// Empties the buffer for the next body, giving its bytes back (a
    /// large buffer's memory too).
    pub fn reset(&mut self) {
        if self.buf.capacity() > 1 << 20 {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.overflowed = false;
        self.over_budget = false;
        self.lease.release();
    }

    /// The bytes gathered, or `None` when the body was too large.
    pub fn bytes(&self) -> Option<&[u8]> {
        (!self.overflowed).then_some(&self.buf[..])
    }

    /// The parsed body, or `None` when it was not JSON or too large.
    pub fn take(&mut self) -> Option<serde_json::Value> {
        if self.overflowed {
            return None;
        }
        let v = serde_json::from_slice(&self.buf).ok();
        self.buf = Vec::new();
        self.lease.release();
        v
    }
}

/// The response's media type, lower-cased, without parameters.
pub fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// Reads a string field.
pub(crate) fn str_at(v: &serde_json::Value, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().map(str::to_owned)
}

/// The top-level members of a JSON object, each value kept as its raw text
/// (borrowed from the input, so where it sits is known). Keys are borrowed
/// unless they contain escapes.
#[derive(Debug)]
pub(crate) struct Members<'a>(pub(crate) Vec<Member<'a>>);

#[derive(Debug)]
pub(crate) struct Member<'a> {
    pub(crate) key: std::borrow::Cow<'a, str>,
    pub(crate) value: &'a serde_json::value::RawValue,
}

impl Members<'_> {
    /// Where member `i`'s value ends in `data` (the text it was parsed from).
    pub(crate) fn end_in(&self, data: &str, i: usize) -> usize {
        let v = self.0[i].value.get();
        v.as_ptr() as usize - data.as_ptr() as usize + v.len()
    }
}

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(Key(key)) = a.next_key()? {
                    // (A list of millions of members would take many
                    // times the body's size.)
                    if out.len() >= MAX_MEMBERS {
                        return Err(serde::de::Error::custom("too many members"));
                    }
                    out.push(Member {
                        key,
                        value: a.next_value()?,
                    });
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// An object key, borrowed from the input when it has no escapes.
pub(crate) struct Key<'a>(pub(crate) std::borrow::Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod whole_value_tests {
    use super::{MAX_MEMBERS, MAX_WHOLE_VALUES, whole_value_affordable};
    use crate::providers::testing::peak_alloc;

    /// A body of many tiny values (token ids) with a repeated member is
    /// read with the last of each, and not estimated: what either costs
    /// stays near its size, where a `Value` would take 16 times it.
    #[test]
    fn a_body_of_millions_of_tiny_values_is_not_built_whole() {
        let ids = vec!["0"; MAX_WHOLE_VALUES + 10].join(",");
        // The repeated `model` makes the typed head parse refuse it.
        let body = format!(r#"{{"model":"m","model":"text-embedding-3-small","input":[{ids}]}}"#);
        assert!(!whole_value_affordable(body.as_bytes()));
        #[derive(serde::Deserialize)]
        struct Head {
            model: Option<String>,
        }
        let (head, peak) = peak_alloc(|| super::parse_object::<Head>(body.as_bytes()));
        assert_eq!(
            head.and_then(|h| h.model).as_deref(),
            Some("text-embedding-3-small"),
            "the last member, as the provider reads it"
        );
        assert!(
            peak < 2 * body.len(),
            "{peak} bytes held for {}",
            body.len()
        );
        let (n, peak) = peak_alloc(|| {
            crate::meter::estimate::estimate_input(crate::config::ApiKind::Openai, body.as_bytes())
        });
        assert_eq!(n, None);
        assert!(peak < body.len(), "{peak} bytes held for {}", body.len());
        // Under the bound, the same shape is estimated (one token an id),
        // and a repeated member is read as the provider reads it.
        let ids = vec!["0"; 1000].join(",");
        let small = format!(r#"{{"model":"m","model":"text-embedding-3-small","input":[{ids}]}}"#);
        assert!(whole_value_affordable(small.as_bytes()));
        let n = crate::meter::estimate::estimate_input(
            crate::config::ApiKind::Openai,
            small.as_bytes(),
        );
        assert_eq!(n, Some(1000));
    }

    /// A body of millions of top-level members with a repeat is not
    /// listed member by member (that list would take many times the
    /// body): it is left unread, as before.
    #[test]
    fn millions_of_members_are_not_listed() {
        let mut body = String::from(r#"{"model":"a","model":"b""#);
        for i in 0..MAX_WHOLE_VALUES + 10 {
            body.push_str(&format!(",\"k{i}\":0"));
        }
        const { assert!(MAX_MEMBERS < MAX_WHOLE_VALUES) };
        body.push('}');
        #[derive(serde::Deserialize)]
        struct Head {
            #[allow(dead_code)]
            model: Option<String>,
        }
        let (head, peak) = peak_alloc(|| super::parse_object::<Head>(body.as_bytes()));
        assert!(head.is_none());
        assert!(peak < body.len(), "{peak} bytes held for {}", body.len());
    }

    #[test]
    fn values_are_counted_outside_strings_only() {
        let commas = ",".repeat(MAX_WHOLE_VALUES + 10);
        // Commas and brackets inside a string (escaped quotes included)
        // are text, not values.
        let text = format!(r#"{{"content":"a \"{commas}[{{ \\"}}"#);
        assert!(whole_value_affordable(text.as_bytes()));
        let arrays = "[".repeat(MAX_WHOLE_VALUES + 1);
        assert!(!whole_value_affordable(arrays.as_bytes()));
    }
}

#[cfg(test)]
mod budget_tests {
    use super::JsonBody;
    use crate::budget::BodyBudget;

    #[test]
    fn json_answers_hold_their_bytes_against_one_budget() {
        let b = BodyBudget::new(100);
        let mut a = JsonBody::within(1000, &b);
        a.feed(&[b' '; 60]);
        assert_eq!(b.used(), 60);
        // A second answer that would pass the bound is not read.
        let mut c = JsonBody::within(1000, &b);
        c.feed(&[b' '; 30]);
        c.feed(&[b' '; 20]);
        assert!(c.bytes().is_none());
        assert!(c.over_budget());
        assert_eq!(b.used(), 60, "what it had taken is given back");
        c.feed(b"more");
        assert_eq!(b.used(), 60, "and it takes nothing more");
        drop(a);
        assert_eq!(b.used(), 0, "an answer gives its bytes back when done");
        let mut d = JsonBody::within(1000, &b);
        d.feed(b"{\"a\":1}");
        assert!(d.take().is_some());
        assert_eq!(b.used(), 0, "once parsed");
        // Over its own limit: unread, but not for the budget.
        let mut e = JsonBody::within(10, &b);
        e.feed(&[b' '; 20]);
        assert!(e.bytes().is_none());
        assert!(!e.over_budget());
    }
}
