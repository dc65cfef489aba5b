//! Names from the OpenTelemetry semantic conventions, and the one place that
//! turns a usage record into metric and span attributes.
//!
//! GenAI: semantic-conventions v1.37-v1.41 (`gen_ai.client.token.usage`,
//! `gen_ai.client.operation.*`) by default; with the
//! `gen_ai_latest_experimental` opt-in, the generation of the
//! semantic-conventions-genai repository (`gen_ai.client.inference.*`,
//! `gen_ai.client.embeddings.*`). CI attribution uses the CICD, VCS and
//! process registries; what they lack is under `tollgate.`.
//!
//! Budget metrics, when they come, take their attributes from
//! [`scope_attributes`] so that a budget's series line up with the usage
//! series of the same repository, job and team.

use std::borrow::Cow;

use opentelemetry::KeyValue;

use crate::meter::{Attribution, UsageRecord};

// GenAI attributes.
pub const GEN_AI_OPERATION_NAME: &str = "gen_ai.operation.name";
pub const GEN_AI_PROVIDER_NAME: &str = "gen_ai.provider.name";
pub const GEN_AI_REQUEST_MODEL: &str = "gen_ai.request.model";
pub const GEN_AI_RESPONSE_MODEL: &str = "gen_ai.response.model";
pub const GEN_AI_TOKEN_TYPE: &str = "gen_ai.token.type";
pub const GEN_AI_TOKEN_MODALITY: &str = "gen_ai.token.modality";
pub const SERVER_ADDRESS: &str = "server.address";
pub const SERVER_PORT: &str = "server.port";
pub const ERROR_TYPE: &str = "error.type";
/// OpenAI (and Azure OpenAI): the service tier that served the request.
pub const OPENAI_RESPONSE_SERVICE_TIER: &str = "openai.response.service_tier";

// CI attribution.
pub const CICD_PIPELINE_NAME: &str = "cicd.pipeline.name";
pub const CICD_PIPELINE_TASK_NAME: &str = "cicd.pipeline.task.name";
pub const CICD_PIPELINE_RUN_ID: &str = "cicd.pipeline.run.id";
pub const CICD_PIPELINE_TASK_RUN_ID: &str = "cicd.pipeline.task.run.id";
pub const CICD_WORKER_NAME: &str = "cicd.worker.name";
pub const VCS_REPOSITORY_NAME: &str = "vcs.repository.name";
pub const VCS_OWNER_NAME: &str = "vcs.owner.name";
pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
pub const PROCESS_PID: &str = "process.pid";
pub const PROCESS_COMMAND_LINE: &str = "process.command_line";
pub const TOLLGATE_TEAM: &str = "tollgate.team";
/// `true` on a request whose token counts are local estimates (absent when
/// they are the provider's): estimates leave out hidden reasoning and are
/// approximations for non-OpenAI models.
pub const TOLLGATE_ESTIMATED: &str = "tollgate.estimated";
pub const TOLLGATE_CI_SYSTEM: &str = "tollgate.ci.system";
pub const TOLLGATE_EXPORT_PIPELINE: &str = "tollgate.export.pipeline";

// Metric names, default generation.
pub const M_TOKEN_USAGE: &str = "gen_ai.client.token.usage";
pub const M_OPERATION_DURATION: &str = "gen_ai.client.operation.duration";
pub const M_TIME_TO_FIRST_CHUNK: &str = "gen_ai.client.operation.time_to_first_chunk";
// Latest experimental generation.
pub const M_INFERENCE_DURATION: &str = "gen_ai.client.inference.duration";
pub const M_INFERENCE_TTFC: &str = "gen_ai.client.inference.time_to_first_chunk";
pub const M_USAGE_INPUT: &str = "gen_ai.client.inference.usage.input_tokens";
pub const M_USAGE_OUTPUT: &str = "gen_ai.client.inference.usage.output_tokens";
pub const M_USAGE_CACHE_READ: &str = "gen_ai.client.inference.usage.cache_read.input_tokens";
pub const M_USAGE_CACHE_WRITE: &str = "gen_ai.client.inference.usage.cache_write.input_tokens";
pub const M_USAGE_REASONING: &str = "gen_ai.client.inference.usage.reasoning.output_tokens";
pub const M_OP_INPUT_TOKENS: &str = "gen_ai.client.inference.operation.input_tokens";
pub const M_OP_OUTPUT_TOKENS: &str = "gen_ai.client.inference.operation.output_tokens";
pub const M_EMBEDDINGS_DURATION: &str = "gen_ai.client.embeddings.duration";
pub const M_EMBEDDINGS_INPUT_TOKENS: &str = "gen_ai.client.embeddings.operation.input_tokens";
// tollgate's own.
pub const M_COST: &str = "tollgate.cost";
pub const M_REQUESTS: &str = "tollgate.requests";
pub const M_WEB_SEARCHES: &str = "tollgate.web_searches";
pub const M_CONN_INTERCEPTED: &str = "tollgate.connections.intercepted";
pub const M_CONN_PASSTHROUGH: &str = "tollgate.connections.passthrough";
pub const M_CONN_REFUSED: &str = "tollgate.connections.refused";
pub const M_CONN_OTHER_NETNS: &str = "tollgate.connections.other_netns";
pub const M_CONN_UDP_REFUSED: &str = "tollgate.connections.udp_refused";
pub const M_EXPORT_DROPPED: &str = "tollgate.export.dropped";
pub const M_LEDGER_RECORDS: &str = "tollgate.ledger.records";
pub const M_LEDGER_QUEUED: &str = "tollgate.ledger.queued";
pub const M_LEDGER_ERRORS: &str = "tollgate.ledger.errors";
pub const M_LEDGER_DROPPED: &str = "tollgate.ledger.dropped";
pub const M_BODIES_TOO_LONG: &str = "tollgate.requests.body_too_long";
pub const M_BODIES_OVER_BUDGET: &str = "tollgate.requests.body_over_budget";
pub const M_RESPONSES_OVER_BUDGET: &str = "tollgate.responses.body_over_budget";
pub const M_BODIES_STALLED: &str = "tollgate.requests.body_stalled";
pub const M_BACKGROUND_WAITING: &str = "tollgate.requests.background_waiting";
pub const M_UP: &str = "tollgate.up";

/// ExplicitBucketBoundaries the conventions give for token histograms.
pub const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];
/// ExplicitBucketBoundaries the conventions give for durations (seconds).
pub const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// Port of every intercepted connection (TLS to the provider).
pub const PROVIDER_PORT: i64 = 443;

/// What kind of operation a record is, for the conventions' purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// A model generating a response: chat, text_completion, generate_content.
    Inference,
    Embeddings,
    /// Everything else (batches, uploads, token counting, ...).
    Other,
}

/// `gen_ai.operation.name` for tollgate's operation, and its class. The
/// well-known values are used where one applies (the OpenAI Responses and
/// Realtime APIs and Bedrock Converse are `chat`); other operations keep
/// tollgate's name.
pub fn operation(op: &str) -> (Cow<'_, str>, OpClass) {
    let (name, class) = match op {
        "chat" | "responses" | "realtime" | "messages" | "converse" | "converse_stream" => {
            ("chat", OpClass::Inference)
        }
        "text_completion" | "completions" => ("text_completion", OpClass::Inference),
        "generate_content"
        | "interaction"
        | "live"
        | "stream_generate_content"
        | "generateContent"
        | "streamGenerateContent" => ("generate_content", OpClass::Inference),
        "embeddings"
        | "embed_content"
        | "batch_embed_contents"
        | "embedContent"
        | "batchEmbedContents" => ("embeddings", OpClass::Embeddings),
        // A Managed Agents session's growth: what an agent run used, timed
        // as the call that showed it (not an inference of its own).
        "agent_session" => ("invoke_agent", OpClass::Other),
        other => return (Cow::Borrowed(other), OpClass::Other),
    };
    (Cow::Borrowed(name), class)
}

/// `gen_ai.provider.name`: the registry value for tollgate's provider name,
/// refined by host for the OpenAI-compatible services the registry lists
/// (their adapter is `openai`, their telemetry flavour is their own).
pub fn provider_name<'a>(provider: &'a str, host: &str) -> Cow<'a, str> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let by_host = match host.as_str() {
        "api.mistral.ai" => Some("mistral_ai"),
        "api.groq.com" => Some("groq"),
        "api.deepseek.com" => Some("deepseek"),
        "api.x.ai" | "us.api.x.ai" => Some("x_ai"),
        "api.perplexity.ai" => Some("perplexity"),
        "api.moonshot.ai" => Some("moonshot_ai"),
        "generativelanguage.googleapis.com" => Some("gcp.gemini"),
        h if h.ends_with("aiplatform.googleapis.com") => Some("gcp.vertex_ai"),
        // Bedrock's Anthropic and OpenAI routes, read by those adapters.
        // (`bedrock-runtime-fips.`, VPC endpoints' `vpce-….bedrock-runtime.`.)
        h if (h.contains("bedrock-runtime") || h.contains("bedrock-mantle"))
            && (h.ends_with(".amazonaws.com") || h.ends_with(".api.aws")) =>
        {
            Some("aws.bedrock")
        }
        _ => None,
    };
    if let Some(p) = by_host {
        return Cow::Borrowed(p);
    }
    Cow::Borrowed(match provider {
        "openai" => "openai",
        "anthropic" => "anthropic",
        "gemini" | "google" => "gcp.gemini",
        "bedrock" | "aws-bedrock" => "aws.bedrock",
        "azure-openai" | "azure_openai" | "azureopenai" => "azure.ai.openai",
        other => return Cow::Borrowed(other),
    })
}

/// `error.type` when the request failed: the HTTP status for a non-2xx
/// answer; else the record's error when it is an identifier
/// (`client_disconnected`, `timeout`, ...), `_OTHER` when it is prose.
/// Record errors that say what the agent could not meter, not that the
/// request failed.
pub(crate) const METERING_ONLY: &[&str] = &["usage_missing", crate::providers::decode::UNDECODABLE];

pub fn error_type(rec: &UsageRecord) -> Option<Cow<'_, str>> {
    if rec.status != 0 && !(200..300).contains(&rec.status) {
        return Some(Cow::Owned(rec.status.to_string()));
    }
    match &rec.error {
        // What the agent could not count, on an answer that succeeded: the
        // request did not fail (the ledger keeps why its counts are
        // missing or estimated).
        Some(e) if rec.status != 0 && METERING_ONLY.contains(&e.as_str()) => None,
        Some(e) if is_identifier(e) => Some(Cow::Borrowed(e)),
        Some(_) => Some(Cow::Borrowed("_OTHER")),
        None if rec.status == 0 => Some(Cow::Borrowed("_OTHER")),
        None => None,
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The base name of the executable, else the thread's `comm`.
pub fn executable_name(who: &Attribution) -> Option<&str> {
    who.exe
        .as_deref()
        .and_then(|e| e.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .or(Some(who.comm.as_str()).filter(|c| !c.is_empty()))
}

/// Who spent: the CI scope (pipeline, job, repository, runner, team, CI
/// system) and the program. Low cardinality; what budgets will be keyed by.
pub fn scope_attributes(who: &Attribution, out: &mut Vec<KeyValue>) {
    push(out, CICD_PIPELINE_NAME, &who.workflow);
    push(out, CICD_PIPELINE_TASK_NAME, &who.job);
    if let Some(repo) = who.repository.as_deref().filter(|r| !r.is_empty()) {
        // The VCS registry keeps the owner out of the repository name.
        match repo.rsplit_once('/') {
            Some((owner, name)) if !owner.is_empty() && !name.is_empty() => {
                out.push(KeyValue::new(VCS_OWNER_NAME, owner.to_string()));
                out.push(KeyValue::new(VCS_REPOSITORY_NAME, name.to_string()));
            }
            _ => out.push(KeyValue::new(VCS_REPOSITORY_NAME, repo.to_string())),
        }
    }
    push(out, CICD_WORKER_NAME, &who.runner);
    push(out, TOLLGATE_TEAM, &who.team);
    push(out, TOLLGATE_CI_SYSTEM, &who.ci_system);
    if let Some(exe) = executable_name(who) {
        out.push(KeyValue::new(PROCESS_EXECUTABLE_NAME, exe.to_string()));
    }
}

fn push(out: &mut Vec<KeyValue>, k: &'static str, v: &Option<String>) {
    if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
        out.push(KeyValue::new(k, v.to_string()));
    }
}

/// Per-process and per-run attributes: only with `include_high_cardinality`.
pub fn high_cardinality_attributes(who: &Attribution, out: &mut Vec<KeyValue>) {
    if who.pid != 0 {
        out.push(KeyValue::new(PROCESS_PID, i64::from(who.pid)));
    }
    push(out, CICD_PIPELINE_RUN_ID, &who.run_id);
    push(out, CICD_PIPELINE_TASK_RUN_ID, &who.job_id);
    push(out, PROCESS_COMMAND_LINE, &who.cmdline);
}

/// The attributes every per-request metric of a record carries: the GenAI
/// common attributes (operation, provider, models, server) and the
/// attribution. `error.type` and the token kind are added by the caller
/// where the convention asks for them.
pub fn request_attributes(rec: &UsageRecord, high_cardinality: bool) -> Vec<KeyValue> {
    let mut out = Vec::with_capacity(20);
    out.push(KeyValue::new(
        GEN_AI_OPERATION_NAME,
        operation(&rec.operation).0.into_owned(),
    ));
    let provider = provider_name(&rec.provider, &rec.host);
    // OpenAI's own attribute, for OpenAI and Azure OpenAI only (not an
    // OpenAI-format route of another provider, such as Bedrock's).
    let openai = matches!(provider.as_ref(), "openai" | "azure.ai.openai");
    out.push(KeyValue::new(GEN_AI_PROVIDER_NAME, provider.into_owned()));
    if let Some(m) = rec.model.as_deref().filter(|m| !m.is_empty()) {
        out.push(KeyValue::new(GEN_AI_REQUEST_MODEL, m.to_string()));
    }
    if let Some(m) = rec.response_model.as_deref().filter(|m| !m.is_empty()) {
        out.push(KeyValue::new(GEN_AI_RESPONSE_MODEL, m.to_string()));
    }
    if !rec.host.is_empty() {
        out.push(KeyValue::new(SERVER_ADDRESS, rec.host.clone()));
        out.push(KeyValue::new(SERVER_PORT, PROVIDER_PORT));
    }
    if rec.estimated {
        out.push(KeyValue::new(TOLLGATE_ESTIMATED, true));
    }
    if openai && let Some(t) = rec.service_tier.as_deref().filter(|t| !t.is_empty()) {
        out.push(KeyValue::new(OPENAI_RESPONSE_SERVICE_TIER, t.to_string()));
    }
    scope_attributes(&rec.who, &mut out);
    if high_cardinality {
        high_cardinality_attributes(&rec.who, &mut out);
    }
    out
}

/// `attrs` plus one more.
pub fn with(attrs: &[KeyValue], kv: KeyValue) -> Vec<KeyValue> {
    let mut v = Vec::with_capacity(attrs.len() + 1);
    v.extend_from_slice(attrs);
    v.push(kv);
    v
}
