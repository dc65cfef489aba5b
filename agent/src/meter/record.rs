//! The usage record: one row per request that reached a provider.

use serde::{Deserialize, Serialize};

/// Token counts, normalised across providers: `input_tokens` is every input
/// token billed at any rate, with the subsets `cached_input_tokens` and
/// `cache_write_input_tokens`; `output_tokens` is every output token, with
/// the subset `reasoning_tokens`. `cache_write_1h_input_tokens` is the
/// part of the cache writes kept for an hour (Anthropic), priced higher.
/// `web_searches` is not a token count: the web searches the provider ran
/// for the request and bills by the thousand, in the unit it bills them
/// (see [`Usage::web_searches`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_input_tokens: u64,
    pub reasoning_tokens: u64,
    #[serde(default)]
    pub cache_write_1h_input_tokens: u64,
    /// Billed web searches: Anthropic's
    /// `usage.server_tool_use.web_search_requests`; OpenAI's Responses
    /// `web_search_call` items that searched (opening or reading a page
    /// is not billed); Gemini 3's distinct non-empty
    /// `groundingMetadata.webSearchQueries`, and for earlier Gemini
    /// models, which bill the grounded prompt, 1 when the answer was
    /// grounded in a search. Their result text is billed as input tokens,
    /// already counted there.
    #[serde(default)]
    pub web_searches: u64,
    /// Of `web_searches`, those OpenAI's earlier `web_search_preview` tool
    /// made (the only search tool a Responses object lists in its
    /// `tools`): billed at their own rate on non-reasoning models. Not a
    /// ledger column (the row's `cost_usd` holds its price); the audit
    /// log has it.
    #[serde(default)]
    pub web_searches_preview: u64,
    /// The parts of the input (beside its cache reads and writes) and of
    /// the output (beside its reasoning) that are audio or images, where
    /// the provider says so: priced at the model's own rates for them
    /// (OpenAI's audio and image models, Gemini's audio input and image
    /// output), else as the rest.
    #[serde(default)]
    pub audio_input_tokens: u64,
    #[serde(default)]
    pub image_input_tokens: u64,
    #[serde(default)]
    pub audio_output_tokens: u64,
    #[serde(default)]
    pub image_output_tokens: u64,
    /// Of the cache reads, those that are audio or images, where the
    /// provider says so (a Realtime response's
    /// `input_token_details.cached_tokens_details`): priced at the model's
    /// cached rates for them, else as the other cache reads. Not ledger
    /// columns (the row's `cost_usd` holds their price); the audit log has
    /// them.
    #[serde(default)]
    pub cached_audio_input_tokens: u64,
    #[serde(default)]
    pub cached_image_input_tokens: u64,
    /// Audio billed by its length, in milliseconds: a transcription that
    /// reports `usage: {"type": "duration", "seconds": …}` (`whisper-1`
    /// over HTTP, a Realtime session's minute-billed transcription model).
    /// Priced at the model's `audio_per_minute`. Not a ledger column (the
    /// row's `cost_usd` holds its price); the audit log has it.
    #[serde(default)]
    pub audio_duration_ms: u64,
}

impl Usage {
    /// The audio and image parts, `[audio input, image input, audio
    /// output, image output]`, each within what is left of the input
    /// beside its cache reads and writes, and of the output beside its
    /// reasoning, in that order: an inconsistent count never makes the
    /// parts more than their whole.
    pub fn media(&self) -> [u64; 4] {
        let cached = self.cached_input_tokens.min(self.input_tokens);
        let write = self
            .cache_write_input_tokens
            .min(self.input_tokens - cached);
        let rest_in = self.input_tokens - cached - write;
        let audio_in = self.audio_input_tokens.min(rest_in);
        let image_in = self.image_input_tokens.min(rest_in - audio_in);
        let rest_out = self.output_tokens - self.reasoning_tokens.min(self.output_tokens);
        let audio_out = self.audio_output_tokens.min(rest_out);
        let image_out = self.image_output_tokens.min(rest_out - audio_out);
        [audio_in, image_in, audio_out, image_out]
    }

    /// The audio and image parts of the cache reads, `[audio, image]`,
    /// within them: an inconsistent count never makes the parts more than
    /// their whole.
    pub fn cached_media(&self) -> [u64; 2] {
        let cached = self.cached_input_tokens.min(self.input_tokens);
        let audio = self.cached_audio_input_tokens.min(cached);
        let image = self.cached_image_input_tokens.min(cached - audio);
        [audio, image]
    }

    /// Each count of `self` and `other` combined by `f`, field by field.
    pub fn zip_with(&self, other: &Usage, f: impl Fn(u64, u64) -> u64) -> Usage {
        Usage {
            input_tokens: f(self.input_tokens, other.input_tokens),
            output_tokens: f(self.output_tokens, other.output_tokens),
            cached_input_tokens: f(self.cached_input_tokens, other.cached_input_tokens),
            cache_write_input_tokens: f(
                self.cache_write_input_tokens,
                other.cache_write_input_tokens,
            ),
            reasoning_tokens: f(self.reasoning_tokens, other.reasoning_tokens),
            cache_write_1h_input_tokens: f(
                self.cache_write_1h_input_tokens,
                other.cache_write_1h_input_tokens,
            ),
            web_searches: f(self.web_searches, other.web_searches),
            web_searches_preview: f(self.web_searches_preview, other.web_searches_preview),
            audio_input_tokens: f(self.audio_input_tokens, other.audio_input_tokens),
            image_input_tokens: f(self.image_input_tokens, other.image_input_tokens),
            audio_output_tokens: f(self.audio_output_tokens, other.audio_output_tokens),
            image_output_tokens: f(self.image_output_tokens, other.image_output_tokens),
            cached_audio_input_tokens: f(
                self.cached_audio_input_tokens,
                other.cached_audio_input_tokens,
            ),
            cached_image_input_tokens: f(
                self.cached_image_input_tokens,
                other.cached_image_input_tokens,
            ),
            audio_duration_ms: f(self.audio_duration_ms, other.audio_duration_ms),
        }
    }
}

/// Who made the request: from the kernel's origin record and /proc.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    pub pid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    /// `comm` of the thread that connected.
    pub comm: String,
    /// Path of the executable (`/proc/PID/exe`).
    pub exe: Option<String>,
    /// Command line with secrets redacted.
    pub cmdline: Option<String>,
    /// `github-actions`, `gitlab`, ... when a CI system's variables were found.
    pub ci_system: Option<String>,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub job: Option<String>,
    pub run_id: Option<String>,
    pub run_attempt: Option<String>,
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    pub runner: Option<String>,
    /// Job id within the run, where the CI system has one (GitLab CI_JOB_ID,
    /// Buildkite BUILDKITE_JOB_ID, ...).
    pub job_id: Option<String>,
    /// cgroup v2 path of the process (`/system.slice/actions.runner...`).
    pub cgroup_path: Option<String>,
    /// Container id when the process runs in a container.
    pub container_id: Option<String>,
    /// Team from the `[[teams]]` table of the config, by repository.
    pub team: Option<String>,
}

/// One completed request (the ledger row, the report's JSON object).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Ledger row id (absent until stored).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<i64>,
    /// Start of the request, Unix milliseconds.
    pub started_at_ms: i64,
    /// Start of the request, RFC 3339 UTC.
    pub started_at: String,
    pub duration_ms: u64,
    /// Time from sending the request to the first response body byte
    /// (streams: the first chunk), when a body arrived.
    pub ttfb_ms: Option<u64>,
    /// Provider name (`openai`, `anthropic`, ...).
    pub provider: String,
    /// The provider host name (the TLS SNI).
    pub host: String,
    /// `chat`, `text_completion`, `embeddings`, ...
    pub operation: String,
    pub method: String,
    /// Request path without the query string.
    pub path: String,
    /// Model named in the request.
    pub model: Option<String>,
    /// Model named in the response.
    pub response_model: Option<String>,
    /// HTTP status from the provider (0 when none was received).
    pub status: u16,
    pub streaming: bool,
    #[serde(flatten)]
    pub usage: Usage,
    /// True when the counts are local estimates, not the provider's.
    pub estimated: bool,
    /// Cost in USD; null until pricing knows the model.
    pub cost_usd: Option<f64>,
    #[serde(flatten)]
    pub who: std::sync::Arc<Attribution>,
    /// What went wrong, if anything (never contains secrets).
    pub error: Option<String>,
    /// The service tier that served the request, as the response says
    /// (OpenAI: `default`, `flex`, `priority`, `scale`); `None` when it
    /// does not say (the tier a request asked for is not recorded). Priced
    /// by its own rates where the catalogue has them.
    #[serde(default)]
    pub service_tier: Option<String>,
}
