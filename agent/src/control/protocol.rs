//! The control socket's line protocol (version 1).
//!
//! One JSON object per line, UTF-8, `\n`-terminated, both ways.
//!
//! The client opens the socket and sends one request line:
//!
//! - `{"cmd":"snapshot"}`: the server answers with one [`Snapshot`] line and
//!   closes the connection.
//! - `{"cmd":"watch"}` (optionally `"interval_ms": N`, 100..=60000, default
//!   1000): the server sends a [`Snapshot`] line at once and then one every
//!   interval until the client closes the connection or the agent stops.
//!
//! A request the server does not understand gets one [`ErrorReply`] line
//! (`{"version":1,"error":"..."}`), then the connection is closed. A client
//! that sends nothing within 10 s, or more than 4 KiB on a line, is
//! disconnected.
//!
//! Compatibility: fields are only ever added within a version (budget state
//! will arrive as new fields); clients must ignore fields they do not know.
//! Renaming, removing or changing the meaning of a field bumps `version`.
//!
//! Try it by hand: `echo '{"cmd":"snapshot"}' | sudo socat - UNIX-CONNECT:/run/tollgate/control.sock`.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks (the `version` of every line).
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the server reads.
pub const MAX_REQUEST_LINE: usize = 4096;
/// Default and bounds of `watch`'s `interval_ms`.
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
pub const MIN_INTERVAL_MS: u64 = 100;
pub const MAX_INTERVAL_MS: u64 = 60_000;

/// A client's request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// One snapshot, then the server closes.
    Snapshot,
    /// A snapshot now and then every `interval_ms`.
    Watch {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        interval_ms: Option<u64>,
    },
}

/// The server's answer to a request it cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub version: u32,
    pub error: String,
}

/// Everything `top` shows, at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The agent that answered.
    pub agent: AgentInfo,
    /// Length of the tokens-per-second window, seconds.
    pub window_secs: u64,
    /// Everything the agent metered since it started (never evicted).
    pub totals: Aggregate,
    /// By process (pid and executable), busiest first.
    pub processes: Vec<ProcessRow>,
    /// By job (repository and job name), busiest first.
    pub jobs: Vec<JobRow>,
    /// Rows dropped because a table was full (idle rows are also dropped
    /// after 10 minutes; those are not counted here).
    pub evicted: u64,
}

/// The agent process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub pid: u32,
    /// tollgate's version.
    pub version: String,
    /// When the agent's live state started, Unix milliseconds.
    pub started_at_ms: i64,
    pub uptime_secs: u64,
}

/// Counters of one row (or of the whole agent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Finished requests (one per usage record).
    pub requests: u64,
    /// Requests started and not finished yet.
    pub in_flight: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input plus output tokens of the requests that finished in the last
    /// `window_secs`, divided by `window_secs`.
    pub tokens_per_sec: f64,
    /// Sum of the known costs, USD.
    pub cost_usd: f64,
    /// Finished requests whose cost is not known (so `cost_usd` is a lower
    /// bound when this is not 0).
    pub unpriced: u64,
    /// Finished requests with an HTTP status >= 400, no response at all
    /// (status 0), or an error.
    pub errors: u64,
}

/// One process that talked to a provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessRow {
    pub pid: u32,
    /// Executable path, else the thread's `comm`.
    pub exe: String,
    pub repository: Option<String>,
    pub job: Option<String>,
    /// Seconds since the row last changed.
    pub idle_secs: u64,
    #[serde(flatten)]
    pub agg: Aggregate,
}

/// One CI job (or the processes outside any job: both fields null).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRow {
    pub repository: Option<String>,
    pub job: Option<String>,
    /// The latest run id seen for this job.
    pub run_id: Option<String>,
    pub team: Option<String>,
    pub idle_secs: u64,
    #[serde(flatten)]
    pub agg: Aggregate,
}

impl Request {
    /// The watch interval, clamped to the allowed range.
    pub fn interval_ms(&self) -> u64 {
        match self {
            Request::Snapshot => DEFAULT_INTERVAL_MS,
            Request::Watch { interval_ms } => interval_ms
                .unwrap_or(DEFAULT_INTERVAL_MS)
                .clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS),
        }
    }

    /// The request as a line to send.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        s.push('\n');
        s
    }
}
