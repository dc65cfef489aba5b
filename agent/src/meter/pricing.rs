//! Prices: USD per million tokens per (provider, model) and token kind,
//! versioned by the date each price took effect.
//!
//! Owns: the built-in catalogue (`agent/prices/prices.toml`, embedded), the
//! `[pricing]` config table that overrides and extends it, model-name
//! resolution (dated snapshots, aliases, Bedrock ids → a priced family) and
//! the cost of one usage. Must never: do I/O (the catalogue is compiled in),
//! or price a model it does not know (the cost is then `None`, not a guess).

use rustc_hash::FxHashMap as HashMap;
use std::borrow::Cow;

use serde::Deserialize;

use crate::meter::Usage;

/// The embedded catalogue.
const BUILTIN: &str = include_str!("../../prices/prices.toml");
/// The catalogue schema this code reads.
const FORMAT: u32 = 1;

/// Provider names as recorded in the ledger; a price for any other name
/// could never apply, so the config rejects it. Extend when an adapter with
/// a new name lands.
pub const PROVIDERS: &[&str] = &["openai", "azure-openai", "anthropic", "gemini", "bedrock"];

/// Words that, after a known family name, make a different (differently
/// priced) model: `gpt-4o-mini` is not `gpt-4o`, `o3-pro` is not `o3`.
const VARIANT_WORDS: &[&str] = &[
    "mini",
    "nano",
    "pro",
    "lite",
    "turbo",
    "realtime",
    "audio",
    "transcribe",
    "whisper",
    "translate",
    "tts",
    "search",
    "image",
    "instruct",
    "vision",
    "16k",
    "32k",
    "deep",
    "computer",
    "live",
    "embedding",
    // OpenAI's model sizes since GPT-5.6 (`gpt-5.6-sol`, `gpt-6.1-terra`)
    // and the speed variants resellers name (`gpt-6-sol-fast`): each its
    // own price.
    "sol",
    "terra",
    "luna",
    "astra",
    "fast",
    "ultrafast",
    "instant",
];

/// Bedrock model-id prefixes: cross-region inference profiles and vendors.
const BEDROCK_PREFIXES: &[&str] = &[
    "us",
    "us-gov",
    "eu",
    "apac",
    "jp",
    "au",
    "ca",
    "global",
    "anthropic",
    "amazon",
    "meta",
    "mistral",
    "cohere",
    "ai21",
    "deepseek",
    "openai",
    "qwen",
    "writer",
];

/// `[pricing]` in the config: overrides and additions to the built-in
/// price catalogue.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    /// `[[pricing.models]]`: prices that override or extend the built-in
    /// catalogue. An entry without `effective` replaces every built-in
    /// price of that (provider, model); an entry with `effective` adds a
    /// version (or replaces the built-in one of the same date). The order
    /// of the entries does not matter. A rate an entry leaves out for a
    /// model the catalogue knows keeps the catalogue's ratio (its latest
    /// `cached_input` and `cache_write` to `input`, `reasoning` to
    /// `output`): a discount written as `input` and `output` applies to
    /// cache reads too.
    pub models: Vec<ModelPrice>,
}

/// One price: a `[[pricing.models]]` entry, and the shape of each entry of
/// the built-in catalogue. Prices are USD per million tokens.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// Provider name as in the ledger: `openai`, `azure-openai`,
    /// `anthropic`, `gemini`, `bedrock`. OpenAI-compatible hosts are
    /// recorded as `openai`.
    pub provider: String,
    /// Model family (`gpt-4o`) or exact id (`gpt-4o-2024-05-13`, an Azure
    /// deployment name, a Bedrock model id). Case-insensitive.
    pub model: String,
    /// Input tokens that are neither read from nor written to a cache.
    pub input: f64,
    /// Output tokens (and reasoning tokens unless `reasoning` is given).
    pub output: f64,
    /// Input tokens read from a prompt cache (default: `input`, or for an
    /// override of a catalogued model the catalogue's ratio to `input`).
    #[serde(default)]
    pub cached_input: Option<f64>,
    /// Input tokens written to a prompt cache (default: `input`, or for an
    /// override of a catalogued model the catalogue's ratio to `input`).
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// Cache writes kept for an hour (Anthropic; default: `cache_write`,
    /// or the catalogue's ratio to `input`).
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
    /// Reasoning ("thinking") output tokens (default: `output`, or the
    /// catalogue's ratio to `output`).
    #[serde(default)]
    pub reasoning: Option<f64>,
    /// Date the price took effect, `YYYY-MM-DD` (UTC). Absent: always.
    #[serde(default)]
    pub effective: Option<String>,
    /// Rates for the whole request when its prompt is larger than a
    /// threshold (Gemini 2.5 Pro and Anthropic's 1M context above 200k).
    #[serde(default)]
    pub long_context: Option<LongContext>,
    /// Rates of a request the provider served in its flex tier (OpenAI
    /// `service_tier: "flex"`). Absent: the catalogue's flex rates for an
    /// override of a catalogued model (scaled as the override scales
    /// input and output), else standard rates.
    #[serde(default)]
    pub flex: Option<TierPrice>,
    /// Rates of a request served in the priority tier (OpenAI
    /// `service_tier: "priority"`); absent as `flex`.
    #[serde(default)]
    pub priority: Option<TierPrice>,
    /// The share Bedrock adds to every rate of a request served through a
    /// regional or geographic endpoint instead of `global.` cross-region
    /// inference (0.1 for Claude 4.5 models). Absent: the catalogue's for
    /// an override of a catalogued model, else none.
    #[serde(default)]
    pub bedrock_regional_premium: Option<f64>,
    /// USD per 1,000 web searches the provider ran for a request (see
    /// `Usage::web_searches`). Absent: the catalogue's for an override of
    /// a catalogued model, else the provider's list price
    /// ([`default_web_search`]).
    #[serde(default)]
    pub web_search: Option<f64>,
    /// USD per 1,000 searches made by OpenAI's `web_search_preview` tool
    /// (see `Usage::web_searches_preview`). Absent: the catalogue's for an
    /// override of a catalogued model, else $25 for OpenAI's non-reasoning
    /// models and `web_search` for the rest
    /// ([`default_web_search_preview`]).
    #[serde(default)]
    pub web_search_preview: Option<f64>,
    /// Audio and image input tokens (default: `input`, or the catalogue's
    /// ratio to `input` for an override of a catalogued model).
    #[serde(default)]
    pub audio_input: Option<f64>,
    #[serde(default)]
    pub image_input: Option<f64>,
    /// Audio and image output tokens (default: `output`, or the
    /// catalogue's ratio to `output`).
    #[serde(default)]
    pub audio_output: Option<f64>,
    #[serde(default)]
    pub image_output: Option<f64>,
    /// Cache reads of audio and image tokens (default: the catalogue's
    /// ratio to `cached_input` for an override of a catalogued model; else
    /// for OpenAI's and Azure OpenAI's audio `cached_input`, as their
    /// cached audio costs as cached text on most models, and otherwise
    /// `cached_input` times the audio or image input rate's ratio to
    /// `input`, as Gemini discounts both and OpenAI its images).
    #[serde(default)]
    pub cached_audio_input: Option<f64>,
    #[serde(default)]
    pub cached_image_input: Option<f64>,
    /// USD per minute of audio, for a model billed by its length (see
    /// `Usage::audio_duration_ms`). Absent: the catalogue's for an
    /// override of a catalogued model, else none (such a request is then
    /// unpriced).
    #[serde(default)]
    pub audio_per_minute: Option<f64>,
}

/// Anthropic's web search tool: $10 per 1,000 searches, beside the tokens
/// of the results (platform.claude.com/docs/en/agents-and-tools/tool-use/
/// web-search-tool). Web fetches bill tokens only.
pub const ANTHROPIC_WEB_SEARCH: f64 = 10.0;
/// OpenAI's `web_search` tool: $10 per 1,000 calls on every model, its
/// content billed as input tokens (platform.openai.com/docs/pricing,
/// built-in tools), and its earlier `web_search_preview` on reasoning
/// models (o-series, GPT-5) too.
pub const OPENAI_WEB_SEARCH: f64 = 10.0;
/// OpenAI's `web_search_preview` tool on a non-reasoning model (GPT-4o,
/// GPT-4.1): $25 per 1,000 calls, its content tokens free (same page;
/// where the usage counts them as input they are priced as input here, so
/// the cost of such a request can be over by their input price).
pub const OPENAI_WEB_SEARCH_PREVIEW_NON_REASONING: f64 = 25.0;
/// Grounding with Google Search for Gemini 3 models: $14 per 1,000 search
/// queries (ai.google.dev/gemini-api/docs/pricing).
pub const GEMINI_3_WEB_SEARCH: f64 = 14.0;
/// Grounding with Google Search for earlier Gemini models: $35 per 1,000
/// grounded prompts (same page).
pub const GEMINI_2_WEB_SEARCH: f64 = 35.0;

/// The list price of 1,000 searches by OpenAI's `web_search_preview` tool
/// of `model` of `provider`, whose `web_search` rate is `web_search`: $25
/// on OpenAI's (and Azure's) non-reasoning models, else `web_search`.
pub fn default_web_search_preview(provider: &str, model: &str, web_search: f64) -> f64 {
    let model = model.rsplit('/').next().unwrap_or(model);
    let non_reasoning = ["gpt-4o", "gpt-4.1", "chatgpt-4o"]
        .iter()
        .any(|p| model.starts_with(p));
    if matches!(provider, "openai" | "azure-openai") && non_reasoning {
        OPENAI_WEB_SEARCH_PREVIEW_NON_REASONING
    } else {
        web_search
    }
}

/// The list price of 1,000 web searches of `model` of `provider` (each
/// provider's free allowances, which a response does not show, are not
/// taken off: the cost is at most what is billed).
pub fn default_web_search(provider: &str, model: &str) -> f64 {
    match provider {
        "anthropic" | "bedrock" => ANTHROPIC_WEB_SEARCH,
        "openai" | "azure-openai" => OPENAI_WEB_SEARCH,
        "gemini" if crate::providers::gemini::bills_each_query(model) => GEMINI_3_WEB_SEARCH,
        "gemini" => GEMINI_2_WEB_SEARCH,
        _ => 0.0,
    }
}

/// `flex = { input = ..., output = ... }`: the rates of a request served
/// in a service tier. Rates left out follow the entry's own ratios.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierPrice {
    pub input: f64,
    pub output: f64,
    #[serde(default)]
    pub cached_input: Option<f64>,
    #[serde(default)]
    pub cache_write: Option<f64>,
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
    #[serde(default)]
    pub reasoning: Option<f64>,
}

/// `long_context = { above = 200000, input = ..., output = ... }`: the
/// rates of a request whose prompt (input tokens, cache reads and writes
/// included) is larger than `above` tokens. Rates left out follow the
/// entry's own ratios.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongContext {
    pub above: u64,
    pub input: f64,
    pub output: f64,
    #[serde(default)]
    pub cached_input: Option<f64>,
    #[serde(default)]
    pub cache_write: Option<f64>,
    #[serde(default)]
    pub cache_write_1h: Option<f64>,
    #[serde(default)]
    pub reasoning: Option<f64>,
}

/// A set of rates as an entry gives them (`long_context`, `flex`,
/// `priority`): input and output, the others optional.
trait GivenRates {
    /// `[input, output, cached_input, cache_write, cache_write_1h,
    /// reasoning]`, by key name.
    fn fields(&self) -> [(&'static str, Option<f64>); 6];
}

macro_rules! given_rates {
    ($t:ty) => {
        impl GivenRates for $t {
            fn fields(&self) -> [(&'static str, Option<f64>); 6] {
                [
                    ("input", Some(self.input)),
                    ("output", Some(self.output)),
                    ("cached_input", self.cached_input),
                    ("cache_write", self.cache_write),
                    ("cache_write_1h", self.cache_write_1h),
                    ("reasoning", self.reasoning),
                ]
            }
        }
    };
}
given_rates!(LongContext);
given_rates!(TierPrice);

impl PricingConfig {
    /// Pure validation; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        validate_entries("pricing.models", &self.models)
    }
}

fn validate_entries(prefix: &str, entries: &[ModelPrice]) -> Result<(), (String, String)> {
    let mut seen: Vec<(String, String, Option<i64>)> = Vec::new();
    for (i, m) in entries.iter().enumerate() {
        let key = |field: &str| format!("{prefix}[{i}].{field}");
        if !PROVIDERS.contains(&m.provider.as_str()) {
            return Err((
                key("provider"),
                format!(
                    "`{}` is not a provider name; use one of {}",
                    m.provider,
                    PROVIDERS.join(", ")
                ),
            ));
        }
        if m.model.trim().is_empty() {
            return Err((key("model"), "must not be empty".into()));
        }
        if m.model.contains('[') {
            // `claude-opus-4-6[1m]` is a client's alias of its model: a
            // price for it would replace the model's own.
            return Err((
                key("model"),
                format!(
                    "{:?} names a client's alias (the part from `[` is not sent to the provider); price the model itself",
                    m.model
                ),
            ));
        }
        let long = m.long_context.as_ref();
        if long.is_some_and(|l| l.above == 0) {
            return Err((
                key("long_context.above"),
                "must be a prompt size of at least 1 token".into(),
            ));
        }
        let mut prices = vec![
            ("input".to_string(), Some(m.input)),
            ("output".into(), Some(m.output)),
            ("cached_input".into(), m.cached_input),
            ("cache_write".into(), m.cache_write),
            ("cache_write_1h".into(), m.cache_write_1h),
            ("reasoning".into(), m.reasoning),
            ("audio_input".into(), m.audio_input),
            ("image_input".into(), m.image_input),
            ("audio_output".into(), m.audio_output),
            ("image_output".into(), m.image_output),
            ("cached_audio_input".into(), m.cached_audio_input),
            ("cached_image_input".into(), m.cached_image_input),
            ("audio_per_minute".into(), m.audio_per_minute),
        ];
        let extra: [(&str, Option<&dyn GivenRates>); 3] = [
            ("long_context", long.map(|l| l as &dyn GivenRates)),
            ("flex", m.flex.as_ref().map(|t| t as &dyn GivenRates)),
            (
                "priority",
                m.priority.as_ref().map(|t| t as &dyn GivenRates),
            ),
        ];
        if m.bedrock_regional_premium.is_some()
            && !matches!(m.provider.as_str(), "anthropic" | "bedrock")
        {
            return Err((
                key("bedrock_regional_premium"),
                "applies only to `anthropic` and `bedrock` entries (Bedrock prices Anthropic models by the anthropic entries)".into(),
            ));
        }
        if let Some(p) = m.bedrock_regional_premium
            && !(p.is_finite() && (0.0..=10.0).contains(&p))
        {
            return Err((
                key("bedrock_regional_premium"),
                format!(
                    "{p} is not a premium: give a share of the price from 0 to 10 (0.1 is 10 %)"
                ),
            ));
        }
        for (name, given) in extra {
            for (field, v) in given.map(|g| g.fields()).into_iter().flatten() {
                prices.push((format!("{name}.{field}"), v));
            }
        }
        for (field, v) in [
            ("web_search", m.web_search),
            ("web_search_preview", m.web_search_preview),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err((
                    key(field),
                    format!(
                        "{v} is not a price: give a finite, non-negative number of USD per 1,000 searches"
                    ),
                ));
            }
        }
        for (field, v) in prices {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err((
                    key(&field),
                    format!(
                        "{v} is not a price: give a finite, non-negative number of USD per million tokens"
                    ),
                ));
            }
        }
        let effective = match &m.effective {
            None => None,
            Some(d) => Some(parse_date_ms(d).ok_or_else(|| {
                (
                    key("effective"),
                    format!("`{d}` is not a date; write YYYY-MM-DD"),
                )
            })?),
        };
        let id = (
            m.provider.clone(),
            canonical(&m.model).into_owned(),
            effective,
        );
        if seen.contains(&id) {
            return Err((
                key("model"),
                format!(
                    "a second price for {} `{}` with the same `effective`; keep one",
                    m.provider, m.model
                ),
            ));
        }
        seen.push(id);
    }
    Ok(())
}

/// Midnight UTC of a `YYYY-MM-DD` date, in Unix milliseconds.
fn parse_date_ms(s: &str) -> Option<i64> {
    let mut it = s.split('-');
    let (y, m, d) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let month = time::Month::try_from(m.parse::<u8>().ok()?).ok()?;
    let date = time::Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()?;
    Some(date.midnight().assume_utc().unix_timestamp() * 1000)
}

/// The rates of one price version, USD per million tokens, defaults filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// When this price took effect (Unix ms; `i64::MIN` for "always").
    pub effective_ms: i64,
    pub input: f64,
    pub cached_input: f64,
    pub cache_write: f64,
    pub cache_write_1h: f64,
    pub output: f64,
    pub reasoning: f64,
    /// The rates above a prompt size, when the model has them.
    pub long: Option<LongRates>,
    /// The rates of the flex and priority service tiers, when the model
    /// has them (see [`Price::in_tier`]).
    pub tiers: [Option<Rates>; 2],
    /// What every rate is multiplied by on a Bedrock regional endpoint
    /// (1 + the premium; 1 when there is none).
    pub bedrock_regional: f64,
    /// What every rate is multiplied by on a Vertex AI regional endpoint
    /// (see [`VERTEX_REGIONAL_PREMIUM`]).
    pub vertex_regional: f64,
    /// The price is the config's (`[[pricing.models]]`), not the
    /// catalogue's.
    pub configured: bool,
    /// USD per 1,000 web searches, in every tier and batch alike.
    pub web_search: f64,
    /// USD per 1,000 searches by OpenAI's `web_search_preview` tool.
    pub web_search_preview: f64,
    /// The rates of audio input, image input, audio output and image
    /// output tokens: multiples of the input or output rate in force
    /// (standard, a tier's, the long-context one, a batch's), so that
    /// they follow those as cache reads do; or, where the text rate is 0,
    /// rates of their own.
    pub modal: [ModalRate; 4],
    /// USD per minute of audio billed by its length, when the model is
    /// billed so (`Some(0.0)`: free).
    pub audio_per_minute: Option<f64>,
    /// The rates of audio and image cache reads: multiples of the cache
    /// read rate in force, or, where that is 0, rates of their own. By
    /// default the same multiples of it as the audio and image input rates
    /// are of the input rate.
    pub cached_modal: [ModalRate; 2],
}

/// One of [`Price::modal`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModalRate {
    /// This many times the text rate in force.
    Times(f64),
    /// USD per million tokens (the text rate is 0).
    Usd(f64),
}

impl ModalRate {
    /// `rate` (USD per million) of a model whose text rate is `text`.
    fn of(rate: f64, text: f64) -> ModalRate {
        if text > 0.0 {
            ModalRate::Times(rate / text)
        } else {
            ModalRate::Usd(rate)
        }
    }

    /// The rate beside a text rate `text` in force.
    fn at(self, text: f64) -> f64 {
        match self {
            ModalRate::Times(k) => text * k,
            ModalRate::Usd(r) => r,
        }
    }

    fn times(self, f: f64) -> ModalRate {
        match self {
            ModalRate::Times(k) => ModalRate::Times(k),
            ModalRate::Usd(r) => ModalRate::Usd(r * f),
        }
    }
}

/// The share Vertex AI adds to every rate of a Claude model released
/// since Claude Sonnet 4.5 when it is served through a regional endpoint
/// (`locations/us-east5`) rather than the global one (Anthropic's "Claude
/// on Vertex AI": "starting with Claude Sonnet 4.5 and all future models",
/// regional endpoints cost 10 % more; older models keep their prices).
pub const VERTEX_REGIONAL_PREMIUM: f64 = 0.10;

/// Claude Sonnet 4.5's release: Anthropic models first priced from this
/// day carry [`VERTEX_REGIONAL_PREMIUM`].
const VERTEX_REGIONAL_SINCE: &str = "2025-09-29";

/// A second set of rates of a model: above a prompt size, or in a service
/// tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub input: f64,
    pub cached_input: f64,
    pub cache_write: f64,
    pub cache_write_1h: f64,
    pub output: f64,
    pub reasoning: f64,
}

impl Rates {
    /// The rates an entry gives; those it leaves out keep the ratios of
    /// the entry's own standard rates `p`.
    fn given(g: &dyn GivenRates, p: &Price) -> Rates {
        let [input, output, cached, write, write_1h, reasoning] = g.fields().map(|(_, v)| v);
        let (input, output) = (input.unwrap_or(p.input), output.unwrap_or(p.output));
        Rates {
            input,
            cached_input: cached.unwrap_or(input * ratio(p.cached_input, p.input)),
            cache_write: write.unwrap_or(input * ratio(p.cache_write, p.input)),
            cache_write_1h: write_1h.unwrap_or(input * ratio(p.cache_write_1h, p.input)),
            output,
            reasoning: reasoning.unwrap_or(output * ratio(p.reasoning, p.output)),
        }
    }

    /// These rates (of the catalogue's price `base`) for an override `p`
    /// of the same model: scaled as `p` scales input and output.
    fn scaled(self, base: &Price, p: &Price) -> Rates {
        self.scale(ratio(p.input, base.input), ratio(p.output, base.output))
    }

    /// The input rates times `fin`, the output rates times `fout`.
    fn scale(self, fin: f64, fout: f64) -> Rates {
        Rates {
            input: self.input * fin,
            cached_input: self.cached_input * fin,
            cache_write: self.cache_write * fin,
            cache_write_1h: self.cache_write_1h * fin,
            output: self.output * fout,
            reasoning: self.reasoning * fout,
        }
    }
}

/// The tier of a batch's results (see `providers::batch`).
pub const BATCH_TIER: &str = "batch";

/// What a batch's requests cost against the standard rates: OpenAI,
/// Anthropic and Google each bill them at half, every token type alike.
pub const BATCH_DISCOUNT: f64 = 0.5;

impl Price {
    /// Every rate (long-context ones included) times `f`; no tiers.
    fn times(&self, f: f64) -> Price {
        Price {
            effective_ms: self.effective_ms,
            input: self.input * f,
            cached_input: self.cached_input * f,
            cache_write: self.cache_write * f,
            cache_write_1h: self.cache_write_1h * f,
            output: self.output * f,
            reasoning: self.reasoning * f,
            long: self.long.map(|l| LongRates {
                above: l.above,
                rates: l.rates.scale(f, f),
            }),
            tiers: [None, None],
            bedrock_regional: self.bedrock_regional,
            vertex_regional: self.vertex_regional,
            configured: self.configured,
            web_search: self.web_search,
            web_search_preview: self.web_search_preview,
            modal: self.modal.map(|m| m.times(f)),
            cached_modal: self.cached_modal.map(|m| m.times(f)),
            audio_per_minute: self.audio_per_minute.map(|r| r * f),
        }
    }
}

/// Index of a priced service tier in [`Price::tiers`]; `Ok(None)` for the
/// standard rates, `Err(())` for a tier tollgate has no notion of.
fn tier_index(tier: Option<&str>) -> Result<Option<usize>, ()> {
    let Some(t) = tier else { return Ok(None) };
    let is = |name: &str| t.eq_ignore_ascii_case(name);
    if ["default", "auto", "standard", "scale", "reserved"]
        .into_iter()
        .any(is)
    {
        // Scale tier units (OpenAI) and reserved capacity (Bedrock) are
        // bought ahead; their list-price equivalent is the standard rate.
        Ok(None)
    } else if is("flex") {
        Ok(Some(0))
    } else if is("priority") || is("fast") {
        // OpenAI renamed priority processing "fast mode" (2026-07-30).
        Ok(Some(1))
    } else {
        Err(())
    }
}

/// `part / whole`, or 1 when that means nothing.
fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 && part.is_finite() {
        part / whole
    } else {
        1.0
    }
}

/// The rates of a request whose prompt is larger than `above` tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongRates {
    pub above: u64,
    pub rates: Rates,
}

impl Price {
    /// The entry's rates; those it leaves out follow `base` (the
    /// catalogue's price of the same model) in proportion, else equal
    /// `input` / `output`.
    fn from_entry(m: &ModelPrice, base: Option<&Price>, configured: bool) -> Price {
        let (cached, write, reasoning) = base.map_or((1.0, 1.0, 1.0), |b| {
            (
                ratio(b.cached_input, b.input),
                ratio(b.cache_write, b.input),
                ratio(b.reasoning, b.output),
            )
        });
        let web_search = m
            .web_search
            .or(base.map(|b| b.web_search))
            .unwrap_or_else(|| default_web_search(&m.provider, &m.model));
        let cache_write = m.cache_write.unwrap_or(m.input * write);
        let mut p = Price {
            effective_ms: m
                .effective
                .as_deref()
                .and_then(parse_date_ms)
                .unwrap_or(i64::MIN),
            input: m.input,
            cached_input: m.cached_input.unwrap_or(m.input * cached),
            cache_write,
            cache_write_1h: m.cache_write_1h.unwrap_or(match base {
                Some(b) => m.input * ratio(b.cache_write_1h, b.input),
                None => cache_write,
            }),
            output: m.output,
            reasoning: m.reasoning.unwrap_or(m.output * reasoning),
            long: None,
            tiers: [None, None],
            bedrock_regional: m
                .bedrock_regional_premium
                .map(|p| 1.0 + p)
                .or(base.map(|b| b.bedrock_regional))
                .unwrap_or(1.0),
            // The catalogue's, for a model it has (an override does not
            // make an older model newer); else by the entry's own date.
            vertex_regional: match base {
                Some(b) => b.vertex_regional,
                None => {
                    let since = parse_date_ms(VERTEX_REGIONAL_SINCE).unwrap_or(i64::MAX);
                    let newer = m
                        .effective
                        .as_deref()
                        .and_then(parse_date_ms)
                        .is_some_and(|at| at >= since);
                    if newer && m.provider.trim().eq_ignore_ascii_case("anthropic") {
                        1.0 + VERTEX_REGIONAL_PREMIUM
                    } else {
                        1.0
                    }
                }
            },
            configured,
            web_search,
            // An entry that sets `web_search` but not the preview rate: the
            // preview rate follows it where the model has no rate of its
            // own for the preview tool.
            web_search_preview: m.web_search_preview.unwrap_or_else(|| {
                match (m.web_search, base) {
                    (None, Some(b)) => b.web_search_preview,
                    _ => default_web_search_preview(&m.provider, &m.model, web_search),
                }
            }),
            modal: {
                let own = [
                    m.audio_input.map(|r| ModalRate::of(r, m.input)),
                    m.image_input.map(|r| ModalRate::of(r, m.input)),
                    m.audio_output.map(|r| ModalRate::of(r, m.output)),
                    m.image_output.map(|r| ModalRate::of(r, m.output)),
                ];
                let from = base.map_or([ModalRate::Times(1.0); 4], |b| b.modal);
                [0, 1, 2, 3].map(|i| own[i].unwrap_or(from[i]))
            },
            cached_modal: [ModalRate::Times(1.0); 2],
            audio_per_minute: m.audio_per_minute.or(base.and_then(|b| b.audio_per_minute)),
        };
        let own = [m.cached_audio_input, m.cached_image_input]
            .map(|r| r.map(|r| ModalRate::of(r, p.cached_input)));
        // Else the catalogue's; else OpenAI's cached audio costs as its
        // cached text (gpt-realtime: $0.40 each), and the rest is
        // discounted as the text is: audio at k times the input rate is
        // read from the cache at k times the cache read rate (Gemini 2.5
        // Flash: $0.10 against $1).
        let provider = m.provider.trim().to_ascii_lowercase();
        let openai = matches!(provider.as_str(), "openai" | "azure-openai");
        let from = base.map_or(
            [0, 1].map(|i| match p.modal[i] {
                // (OpenAI's cached images are discounted as its text:
                // gpt-image-1.5's $2 against $8.)
                ModalRate::Times(k) if !(openai && i == 0) => ModalRate::Times(k),
                _ => ModalRate::Times(1.0),
            }),
            |b| b.cached_modal,
        );
        p.cached_modal = [0, 1].map(|i| own[i].unwrap_or(from[i]));
        // An entry's own rates; else, for an override of a catalogued
        // model, the catalogue's, scaled as the override scales input and
        // output.
        p.long = match (&m.long_context, base.and_then(|b| b.long.map(|l| (b, l)))) {
            (Some(l), _) => Some(LongRates {
                above: l.above,
                rates: Rates::given(l, &p),
            }),
            (None, Some((b, l))) => Some(LongRates {
                above: l.above,
                rates: l.rates.scaled(b, &p),
            }),
            (None, None) => None,
        };
        for (i, own) in [&m.flex, &m.priority].into_iter().enumerate() {
            p.tiers[i] = match (own, base.and_then(|b| b.tiers[i].map(|t| (b, t)))) {
                (Some(t), _) => Some(Rates::given(t, &p)),
                (None, Some((b, t))) => Some(t.scaled(b, &p)),
                (None, None) => None,
            };
        }
        p
    }

    /// The price of a request served in service tier `tier` (as the
    /// response names it): the tier's own rates for `flex` and
    /// `priority`, the standard rates for no tier, `default`, `auto`,
    /// `standard` and `scale`. `None` when the tier has no rates here
    /// (a tier this model has no price for, or an unknown tier name).
    pub fn in_tier(&self, tier: Option<&str>) -> Option<Price> {
        if tier.is_some_and(|t| t.eq_ignore_ascii_case(BATCH_TIER)) {
            return Some(self.times(BATCH_DISCOUNT));
        }
        let Some(i) = tier_index(tier).ok()? else {
            return Some(*self);
        };
        let t = self.tiers[i]?;
        let mut p = Price {
            effective_ms: self.effective_ms,
            input: t.input,
            cached_input: t.cached_input,
            cache_write: t.cache_write,
            cache_write_1h: t.cache_write_1h,
            output: t.output,
            reasoning: t.reasoning,
            long: None,
            tiers: [None, None],
            bedrock_regional: self.bedrock_regional,
            vertex_regional: self.vertex_regional,
            configured: self.configured,
            web_search: self.web_search,
            web_search_preview: self.web_search_preview,
            modal: self.modal,
            cached_modal: self.cached_modal,
            audio_per_minute: self.audio_per_minute,
        };
        // A long prompt in a tier: the long-context rates, scaled as the
        // tier scales input and output.
        p.long = self.long.map(|l| LongRates {
            above: l.above,
            rates: l.rates.scaled(self, &p),
        });
        Some(p)
    }

    /// USD for `u`. The subsets (cached, cache write, reasoning) are capped
    /// at their totals, so an inconsistent count never yields a negative
    /// term:
    /// `((in − cached − write)·input + cached·cached_input
    ///  + (write − write_1h)·cache_write + write_1h·cache_write_1h
    ///  + (out − reasoning)·output + reasoning·reasoning) / 1e6`.
    ///
    /// A request whose prompt (`input_tokens`, which includes cache reads
    /// and writes) is larger than the long-context threshold is priced
    /// whole at the long-context rates. Web searches add
    /// `web_searches · web_search / 1000`, those of OpenAI's preview tool
    /// at `web_search_preview` instead ([`Price::search_fee`]).
    pub fn cost(&self, u: &Usage) -> f64 {
        self.token_cost(u) + self.search_fee(u) + self.duration_fee(u)
    }

    /// The web searches' fee alone: the same in every tier and batch, and
    /// not raised by a regional premium or an uplift, which are
    /// surcharges on the tokens.
    pub fn search_fee(&self, u: &Usage) -> f64 {
        let preview = u.web_searches_preview.min(u.web_searches);
        ((u.web_searches - preview) as f64 * self.web_search
            + preview as f64 * self.web_search_preview)
            / 1e3
    }

    /// The fee for audio billed by its length.
    pub fn duration_fee(&self, u: &Usage) -> f64 {
        u.audio_duration_ms as f64 / 60_000.0 * self.audio_per_minute.unwrap_or(0.0)
    }

    /// This price cannot give `u`'s cost (unknown, not 0): `u` has audio
    /// billed by its length and the model no rate for it, or the model is
    /// billed by the minute alone (no token rates) and `u` reports no
    /// length (a transcription answered as plain text, with no usage).
    pub fn cannot_price(&self, u: &Usage) -> bool {
        match self.audio_per_minute {
            None => u.audio_duration_ms > 0,
            Some(_) => {
                let by_minute_alone = [self.input, self.output, self.cached_input]
                    .iter()
                    .all(|r| *r == 0.0);
                by_minute_alone && u.audio_duration_ms == 0
            }
        }
    }

    /// [`Price::cost`] without the web searches' fee.
    fn token_cost(&self, u: &Usage) -> f64 {
        let r = match self.long {
            Some(LongRates { above, rates: l }) if u.input_tokens > above => [
                l.input,
                l.cached_input,
                l.cache_write,
                l.cache_write_1h,
                l.output,
                l.reasoning,
            ],
            _ => [
                self.input,
                self.cached_input,
                self.cache_write,
                self.cache_write_1h,
                self.output,
                self.reasoning,
            ],
        };
        let cached = u.cached_input_tokens.min(u.input_tokens);
        let write = u.cache_write_input_tokens.min(u.input_tokens - cached);
        let write_1h = u.cache_write_1h_input_tokens.min(write);
        let [audio_in, image_in, audio_out, image_out] = u.media();
        let plain_in = u.input_tokens - cached - write - audio_in - image_in;
        let reasoning = u.reasoning_tokens.min(u.output_tokens);
        let plain_out = u.output_tokens - reasoning - audio_out - image_out;
        let [m_audio_in, m_image_in, m_audio_out, m_image_out] = self.modal;
        let [cached_audio, cached_image] = u.cached_media();
        let [m_cached_audio, m_cached_image] = self.cached_modal;
        (plain_in as f64 * r[0]
            + audio_in as f64 * m_audio_in.at(r[0])
            + image_in as f64 * m_image_in.at(r[0])
            + (cached - cached_audio - cached_image) as f64 * r[1]
            + cached_audio as f64 * m_cached_audio.at(r[1])
            + cached_image as f64 * m_cached_image.at(r[1])
            + (write - write_1h) as f64 * r[2]
            + write_1h as f64 * r[3]
            + plain_out as f64 * r[4]
            + audio_out as f64 * m_audio_out.at(r[4])
            + image_out as f64 * m_image_out.at(r[4])
            + reasoning as f64 * r[5])
            / 1e6
    }
}

/// The largest prompt of a request priced with others in one sum (see
/// [`ManyRequests`]): below every long-context threshold in the catalogue
/// (the lowest is 200k tokens).
pub const SHORT_PROMPT: u64 = 32_768;

/// The usage of many requests recorded together (a batch's results):
/// long-context rates apply request by request, never to a sum. `short`
/// sums the requests whose prompts are at most [`SHORT_PROMPT`] tokens;
/// `long` lists the others, each priced alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManyRequests {
    pub short: Usage,
    pub long: Vec<Usage>,
}

/// Long prompts kept one by one at most (a batch has up to 100,000
/// requests; past this many long ones, the rest are summed with the short
/// ones, at the standard rates).
pub const MAX_LONG_PROMPTS: usize = 100_000;

impl ManyRequests {
    pub fn add(&mut self, u: Usage) {
        if u.input_tokens > SHORT_PROMPT && self.long.len() < MAX_LONG_PROMPTS {
            self.long.push(u);
        } else {
            self.short = self.short.zip_with(&u, u64::saturating_add);
        }
    }
}

impl Price {
    /// USD for many requests: the short ones at the standard rates (a
    /// long-context threshold at or above [`SHORT_PROMPT`] is above each
    /// of them; one set lower, in `[[pricing.models]]`, is not applied to
    /// them), the long ones each as itself.
    pub fn cost_of_many(&self, m: &ManyRequests) -> f64 {
        self.token_cost_of_many(m) + self.search_fee_of_many(m)
    }

    /// [`Price::cannot_price`] for any of many requests.
    fn cannot_price_many(&self, m: &ManyRequests) -> bool {
        (m.short != Usage::default() && self.cannot_price(&m.short))
            || m.long.iter().any(|u| self.cannot_price(u))
    }

    fn token_cost_of_many(&self, m: &ManyRequests) -> f64 {
        let short = Price {
            long: None,
            ..*self
        };
        short.token_cost(&m.short) + m.long.iter().map(|u| self.token_cost(u)).sum::<f64>()
    }

    fn search_fee_of_many(&self, m: &ManyRequests) -> f64 {
        let fees = |u: &Usage| self.search_fee(u) + self.duration_fee(u);
        fees(&m.short) + m.long.iter().map(fees).sum::<f64>()
    }
}

/// The built-in catalogue file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalogue {
    format: u32,
    recorded: String,
    models: Vec<ModelPrice>,
}

/// Versions of one model's price, sorted by `effective_ms`.
type Versions = Vec<Price>;

/// Prices by provider, then by canonical model name.
#[derive(Debug, Clone, Default)]
pub struct PriceBook {
    tables: HashMap<String, HashMap<String, Versions>>,
    recorded: String,
}

impl PriceBook {
    /// The embedded catalogue alone.
    pub fn builtin() -> PriceBook {
        // The file is compiled in and a unit test parses it, so a failure
        // here is a build defect, not a run-time condition.
        let cat: Catalogue =
            toml::from_str(BUILTIN).expect("the embedded prices.toml parses (unit-tested)");
        debug_assert_eq!(cat.format, FORMAT);
        Self::of_catalogue(cat)
    }

    fn of_catalogue(cat: Catalogue) -> PriceBook {
        let mut book = PriceBook {
            tables: HashMap::default(),
            recorded: cat.recorded,
        };
        for m in &cat.models {
            book.insert(m, None, false);
        }
        // Vertex's regional premium goes by when a model was first priced
        // (its release), not by the date of a later price change.
        let since = parse_date_ms(VERTEX_REGIONAL_SINCE).unwrap_or(i64::MAX);
        for versions in book
            .tables
            .get_mut("anthropic")
            .into_iter()
            .flat_map(HashMap::values_mut)
        {
            let newer = versions.first().is_some_and(|p| p.effective_ms >= since);
            for p in versions.iter_mut() {
                p.vertex_regional = if newer {
                    1.0 + VERTEX_REGIONAL_PREMIUM
                } else {
                    1.0
                };
            }
        }
        book
    }

    /// The built-in catalogue with the config's overrides applied (call
    /// after `PricingConfig::validate`). Every built-in price an undated
    /// entry replaces is removed before any entry is added, so the order
    /// of the entries does not matter.
    pub fn new(cfg: &PricingConfig) -> PriceBook {
        let mut book = Self::builtin();
        // The catalogue's latest price of each overridden model, found as a
        // request for it would be (dated ids, the fallback table), for the
        // rates an entry leaves out.
        let bases: Vec<Option<Price>> = cfg
            .models
            .iter()
            .map(|m| {
                book.versions(&m.provider, &m.model)
                    .and_then(|v| v.last().copied())
            })
            .collect();
        for m in cfg.models.iter().filter(|m| m.effective.is_none()) {
            book.tables
                .entry(m.provider.clone())
                .or_default()
                .remove(canonical(&m.model).as_ref());
        }
        let undated = cfg
            .models
            .iter()
            .zip(&bases)
            .filter(|(m, _)| m.effective.is_none());
        for (m, base) in undated {
            book.insert(m, base.as_ref(), true);
        }
        // A dated entry for a name the table does not hold by itself (a
        // Bedrock id priced through Anthropic's table, a model priced by
        // its family) starts from the prices that name has, the undated
        // entries' included: until its date the name costs what it did,
        // not the entry's future price.
        let inherited: Vec<(String, String, Versions)> = cfg
            .models
            .iter()
            .filter(|m| m.effective.is_some())
            .filter(|m| {
                !book
                    .tables
                    .get(&m.provider)
                    .is_some_and(|t| t.contains_key(canonical(&m.model).as_ref()))
            })
            .filter_map(|m| {
                let v = book.versions(&m.provider, &m.model)?.clone();
                Some((m.provider.clone(), canonical(&m.model).into_owned(), v))
            })
            .collect();
        for (provider, key, versions) in inherited {
            book.tables
                .entry(provider)
                .or_default()
                .entry(key)
                .or_insert(versions);
        }
        let dated = cfg
            .models
            .iter()
            .zip(&bases)
            .filter(|(m, _)| m.effective.is_some());
        for (m, base) in dated {
            book.insert(m, base.as_ref(), true);
        }
        book
    }

    /// The date the built-in prices were recorded (`YYYY-MM-DD`).
    pub fn recorded(&self) -> &str {
        &self.recorded
    }

    fn insert(&mut self, m: &ModelPrice, base: Option<&Price>, configured: bool) {
        let price = Price::from_entry(m, base, configured);
        let versions = self
            .tables
            .entry(m.provider.clone())
            .or_default()
            .entry(canonical(&m.model).into_owned())
            .or_default();
        versions.retain(|p| p.effective_ms != price.effective_ms);
        versions.push(price);
        versions.sort_by_key(|p| p.effective_ms);
    }

    /// The price versions for a model, after resolution.
    fn versions(&self, provider: &str, model: &str) -> Option<&Versions> {
        self.versions_of_any(provider, &[model])
    }

    /// The price versions of the first of `models` that the provider's own
    /// table prices, else of the first the fallback table prices: an Azure
    /// deployment priced in the config wins over the OpenAI model it
    /// answers as. In the fallback table Azure's names are tried the other
    /// way round, the model that answered first: a deployment is named by
    /// its owner (`gpt-4` may serve gpt-4o), and OpenAI's table resolves
    /// names by prefix.
    fn versions_of_any(&self, provider: &str, models: &[&str]) -> Option<&Versions> {
        let provider = provider.trim();
        let provider: Cow<'_, str> = if provider.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(provider.to_ascii_lowercase())
        } else {
            Cow::Borrowed(provider)
        };
        // Azure serves OpenAI's models at OpenAI's prices; Bedrock's
        // Anthropic models cost what Anthropic charges.
        let fallback = match provider.as_ref() {
            "azure-openai" => Some("openai"),
            "bedrock" => Some("anthropic"),
            _ => None,
        };
        let canons: Vec<Cow<'_, str>> = models
            .iter()
            // Resolving a name costs time quadratic in its dashes: a name
            // no model has is not looked at. Nor is one that may have been
            // cut at the cap (the proxy caps names before pricing them,
            // at a character boundary): priced by its prefix, it would
            // take its family's price.
            .filter(|m| m.len() + 4 <= super::MAX_MODEL_NAME)
            .map(|m| canonical(m))
            .filter(|c| !c.is_empty())
            .collect();
        let own = self
            .tables
            .get(provider.as_ref())
            .and_then(|t| canons.iter().find_map(|c| resolve(t, c)));
        own.or_else(|| {
            let t = self.tables.get(fallback?)?;
            if provider == "azure-openai" {
                canons.iter().rev().find_map(|c| resolve(t, c))
            } else {
                canons.iter().find_map(|c| resolve(t, c))
            }
        })
    }

    /// True when `model` of `provider` resolves to a priced model.
    pub fn knows(&self, provider: &str, model: &str) -> bool {
        self.versions(provider, model).is_some()
    }

    /// The price in effect at `at_ms` (the latest version not after it; the
    /// earliest when the request predates every version).
    pub fn price_at(&self, provider: &str, model: &str, at_ms: i64) -> Option<Price> {
        self.price_of_any_at(provider, &[model], at_ms)
    }

    /// As [`PriceBook::price_at`] for the first of `models` priced (see
    /// `versions_of_any` for the order).
    pub fn price_of_any_at(&self, provider: &str, models: &[&str], at_ms: i64) -> Option<Price> {
        let v = self.versions_of_any(provider, models)?;
        v.iter()
            .rev()
            .find(|p| p.effective_ms <= at_ms)
            .or_else(|| v.first())
            .copied()
    }

    /// Cost in USD of `usage` for a request to `model` of `provider` that
    /// started at `started_at_ms`; `None` for an unknown model.
    pub fn cost(
        &self,
        provider: &str,
        model: &str,
        started_at_ms: i64,
        usage: &Usage,
    ) -> Option<f64> {
        self.price_at(provider, model, started_at_ms)
            .filter(|p| !p.cannot_price(usage))
            .map(|p| p.cost(usage))
    }

    /// As [`PriceBook::cost`] for the first of `models` priced (see
    /// [`price_order`]), served in service tier `tier`. A tier without
    /// rates of its own for the model is priced at the standard rates,
    /// and says so.
    pub fn cost_of_any(
        &self,
        provider: &str,
        models: &[&str],
        started_at_ms: i64,
        usage: &Usage,
        serving: Serving<'_>,
    ) -> Option<Cost> {
        self.cost_with(provider, models, started_at_ms, serving, |p| {
            (!p.cannot_price(usage)).then(|| {
                (
                    p.token_cost(usage),
                    p.search_fee(usage) + p.duration_fee(usage),
                )
            })
        })
    }

    /// As [`PriceBook::cost_of_any`] for the usage of many requests
    /// together (see [`ManyRequests`]).
    pub fn cost_of_many(
        &self,
        provider: &str,
        models: &[&str],
        started_at_ms: i64,
        many: &ManyRequests,
        serving: Serving<'_>,
    ) -> Option<Cost> {
        self.cost_with(provider, models, started_at_ms, serving, |p| {
            (!p.cannot_price_many(many))
                .then(|| (p.token_cost_of_many(many), p.search_fee_of_many(many)))
        })
    }

    fn cost_with(
        &self,
        provider: &str,
        models: &[&str],
        started_at_ms: i64,
        serving: Serving<'_>,
        cost: impl Fn(&Price) -> Option<(f64, f64)>,
    ) -> Option<Cost> {
        let p = self.price_of_any_at(provider, models, started_at_ms)?;
        // The tokens, and the fees (web searches, audio by the minute);
        // none when this price cannot give the cost.
        let ((usd, fee), tier_unpriced) = match p.in_tier(serving.tier) {
            Some(t) => (cost(&t)?, false),
            None => (cost(&p)?, true),
        };
        let mut regional = 1.0;
        if serving.bedrock_regional {
            regional *= p.bedrock_regional;
        }
        if serving.vertex_regional {
            regional *= p.vertex_regional;
        }
        let uplift = 1.0 + f64::from(serving.uplift_percent) / 100.0;
        Some(Cost {
            usd: usd * regional * uplift + fee,
            tier_unpriced,
            configured: p.configured,
        })
    }
}

/// How a request was served, as far as its price depends on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Serving<'a> {
    /// The service tier the response names.
    pub tier: Option<&'a str>,
    /// A Bedrock request to a regional or geographic endpoint (see
    /// [`bedrock_regional`]).
    pub bedrock_regional: bool,
    /// A request for a Claude model to a Vertex AI regional endpoint (see
    /// [`VERTEX_REGIONAL_PREMIUM`]).
    pub vertex_regional: bool,
    /// The percentage the provider adds to every rate for where the
    /// request ran, as its response says (Anthropic's US-only inference).
    pub uplift_percent: u32,
}

impl<'a> Serving<'a> {
    pub fn tier(tier: Option<&'a str>) -> Serving<'a> {
        Serving {
            tier,
            ..Serving::default()
        }
    }
}

/// Whether a Bedrock model id (as the request's URL names it) is served
/// by a regional endpoint: an in-region id (`anthropic.claude-...`), a
/// foundation-model ARN, or a geographic cross-region profile (`us.`,
/// `eu.`, `apac.`, `jp.`, `au.`, `ca.`, `us-gov.`), as against `global.`
/// cross-region inference. An application inference profile's ARN does
/// not say: not regional.
pub fn bedrock_regional(model_id: &str) -> bool {
    // The id as the Bedrock adapter read it from the URL: percent-decoded.
    const APP_PROFILE: &[u8] = b":application-inference-profile/";
    let id = model_id.trim();
    if id
        .as_bytes()
        .windows(APP_PROFILE.len())
        .any(|w| w.eq_ignore_ascii_case(APP_PROFILE))
    {
        return false;
    }
    // Every Bedrock id has a vendor (`anthropic.`) or a profile (`us.`)
    // in front: anything but `global.` is served regionally.
    match id.rsplit('/').next().and_then(|last| last.split_once('.')) {
        Some((head, _)) => !head.is_empty() && !head.eq_ignore_ascii_case("global"),
        None => false,
    }
}

/// What [`PriceBook::cost_of_any`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub usd: f64,
    /// The request's service tier has no rates for this model: `usd` is
    /// at the standard rates.
    pub tier_unpriced: bool,
    /// The price is the config's, not the catalogue's.
    pub configured: bool,
}

/// The model names a request is priced by, in order: the response's (a
/// dated snapshot) first, except on Azure, where the request names the
/// deployment and a price given for a deployment is the more specific.
pub fn price_order<'a>(
    provider: &str,
    response: Option<&'a str>,
    request: Option<&'a str>,
) -> PriceOrder<'a> {
    price_order_with(provider, response, request, None)
}

/// [`price_order`], with the Azure deployment the request's path names
/// first (Azure serves it, whatever model the body names), then the
/// body's model and the response's.
pub fn price_order_with<'a>(
    provider: &str,
    response: Option<&'a str>,
    request: Option<&'a str>,
    deployment: Option<&'a str>,
) -> PriceOrder<'a> {
    let order = if provider == "azure-openai" {
        [deployment, request, response]
    } else {
        [response, request, None]
    };
    let mut out = PriceOrder {
        names: [""; 3],
        len: 0,
    };
    for name in order.into_iter().flatten() {
        out.names[out.len] = name;
        out.len += 1;
    }
    out
}

/// The names of [`price_order`], in order: a slice of at most two, kept on
/// the stack (one is made per record).
#[derive(Debug, Clone, Copy)]
pub struct PriceOrder<'a> {
    names: [&'a str; 3],
    len: usize,
}

impl<'a> std::ops::Deref for PriceOrder<'a> {
    type Target = [&'a str];

    fn deref(&self) -> &[&'a str] {
        &self.names[..self.len]
    }
}

/// The lookup key of a model name, for catalogue keys and queries alike:
/// lower case, percent-escapes of `:` and `/` decoded, the last path
/// segment (`models/gemini-2.5-flash`, ARNs, `openai/gpt-4o`), no `@date`
/// (Vertex), and for Bedrock ids no `-vN:M` version and no region/vendor
/// prefix (`us.anthropic.claude-...-v1:0` → `claude-...`), and Azure's
/// `gpt-35-` as OpenAI's `gpt-3.5-`.
fn canonical(model: &str) -> Cow<'_, str> {
    let t = model.trim();
    // Borrowed unless there is something to lower-case or decode (the
    // usual model name is used as it came, with no allocation).
    let c = if t.bytes().any(|b| b.is_ascii_uppercase() || b == b'%') {
        let lower = t
            .to_ascii_lowercase()
            .replace("%3a", ":")
            .replace("%2f", "/");
        Cow::Owned(canonical_lower(&lower).to_string())
    } else {
        Cow::Borrowed(canonical_lower(t))
    };
    // Azure's model names have no dots: its deployments of GPT-3.5 answer
    // as `gpt-35-turbo`, the model OpenAI calls `gpt-3.5-turbo`.
    match c.strip_prefix("gpt-35-") {
        Some(rest) => Cow::Owned(format!("gpt-3.5-{rest}")),
        None => c,
    }
}

/// [`canonical`] of a trimmed, lower-case, decoded name: a sub-slice.
fn canonical_lower(lower: &str) -> &str {
    let mut s = lower.rsplit('/').next().unwrap_or("");
    if let Some((head, _)) = s.split_once('@') {
        s = head;
    }
    // Claude Code's context-window alias (`claude-opus-4-6[1m]`): the
    // same model.
    if let Some((head, _)) = s.split_once('[') {
        s = head;
    }
    // An OpenAI fine-tune (`ft:BASE:ORG:NAME:ID`) is priced by its whole
    // name: fine-tunes of one base differ, and none costs its base's price.
    if s.starts_with("ft:") {
        return s;
    }
    if let Some((head, _)) = s.split_once(':') {
        s = head;
        if let Some(i) = s.rfind("-v")
            && s.len() > i + 2
            && s[i + 2..].bytes().all(|b| b.is_ascii_digit())
        {
            s = &s[..i];
        }
    }
    while let Some((head, rest)) = s.split_once('.') {
        if BEDROCK_PREFIXES.contains(&head) {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// `name` without one trailing snapshot or alias marker: `-latest`,
/// `-YYYY-MM-DD`, `-YYYYMMDD`, `-MMDD`, `-NNN`, or the `-0` of a version
/// `N.0` (Anthropic's `claude-sonnet-4-0` is `claude-sonnet-4`).
fn strip_snapshot(name: &str) -> Option<&str> {
    if let Some(head) = name.strip_suffix("-latest") {
        return Some(head);
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (head, last) = name.rsplit_once('-')?;
    if !digits(last) {
        return None;
    }
    if last == "0" {
        // Only after a major version (one or two digits): elsewhere a
        // `-0` is no version's minor.
        let major = head.rsplit_once('-').map(|(_, m)| m);
        return major
            .is_some_and(|m| m.len() <= 2 && digits(m))
            .then_some(head);
    }
    if last.len() == 2 {
        // -YYYY-MM-DD
        let (h2, month) = head.rsplit_once('-')?;
        let (h3, year) = h2.rsplit_once('-')?;
        return (month.len() == 2 && digits(month) && year.len() == 4 && digits(year))
            .then_some(h3);
    }
    matches!(last.len(), 3 | 4 | 8).then_some(head)
}

/// The versions `canon` resolves to in one provider's table: exact name,
/// then with snapshot markers stripped, then the longest known family that
/// is a prefix at a `-` boundary and is not followed by a variant word.
fn resolve<'a>(table: &'a HashMap<String, Versions>, canon: &str) -> Option<&'a Versions> {
    let mut name = canon;
    loop {
        if let Some(v) = table.get(name) {
            return Some(v);
        }
        match strip_snapshot(name) {
            Some(n) => name = n,
            None => break,
        }
    }
    for (i, _) in name.rmatch_indices('-') {
        let (family, rest) = (&name[..i], &name[i + 1..]);
        if let Some(v) = table.get(family)
            && variant_ok(rest)
        {
            return Some(v);
        }
    }
    None
}

/// Whether `rest` (what follows a family name) names the same model: not
/// a version number (`claude-opus-4` + `6`) and no variant word.
fn variant_ok(rest: &str) -> bool {
    let first = rest.split('-').next().unwrap_or("");
    if first.is_empty() || (first.len() <= 2 && first.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    !rest.split('-').any(|w| VARIANT_WORDS.contains(&w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2025-12-01T00:00:00Z.
    const NOW: i64 = 1_764_547_200_000;

    fn usage(input: u64, cached: u64, write: u64, output: u64, reasoning: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
            cache_write_input_tokens: write,
            reasoning_tokens: reasoning,
            cache_write_1h_input_tokens: 0,
            web_searches: 0,
            web_searches_preview: 0,
            audio_input_tokens: 0,
            image_input_tokens: 0,
            audio_output_tokens: 0,
            image_output_tokens: 0,
            cached_audio_input_tokens: 0,
            cached_image_input_tokens: 0,
            audio_duration_ms: 0,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn names_longer_than_any_model_are_not_priced() {
        let book = PriceBook::builtin();
        assert!(
            book.price_at("openai", "gpt-4o-mini-2024-07-18", NOW)
                .is_some()
        );
        // Would resolve to the gpt-4o family by its prefix.
        let mut long = format!("gpt-4o-{}", "x".repeat(crate::meter::MAX_MODEL_NAME));
        assert!(book.price_at("openai", &long, NOW).is_none());
        // The same name capped, as the proxy caps it before pricing.
        crate::meter::cap_owned(&mut long, crate::meter::MAX_MODEL_NAME);
        assert!(book.price_at("openai", &long, NOW).is_none(), "capped");
        let mut accented = format!("gpt-4o-{}", "é".repeat(200));
        crate::meter::cap_owned(&mut accented, crate::meter::MAX_MODEL_NAME);
        assert!(accented.len() < crate::meter::MAX_MODEL_NAME);
        assert!(
            book.price_at("openai", &accented, NOW).is_none(),
            "capped short of the cap"
        );
        // Dashes everywhere: the name is refused before any lookup.
        let dashed = "a-".repeat(500_000);
        assert!(book.price_at("openai", &dashed, NOW).is_none());
    }

    #[test]
    fn builtin_catalogue_parses_and_is_valid() {
        let cat: Catalogue = toml::from_str(BUILTIN).expect("prices.toml parses");
        assert_eq!(cat.format, FORMAT, "catalogue format");
        assert!(parse_date_ms(&cat.recorded).is_some(), "recorded date");
        validate_entries("models", &cat.models).expect("catalogue entries are valid");
        for (i, m) in cat.models.iter().enumerate() {
            assert!(
                m.effective.is_some(),
                "catalogue entry {i} ({}) needs `effective`",
                m.model
            );
            assert_eq!(
                canonical(&m.model),
                m.model,
                "catalogue entry {i} should be written in canonical form"
            );
        }
        assert!(BUILTIN.contains("source: https://"), "a source URL comment");
        let book = PriceBook::builtin();
        assert_eq!(book.recorded(), cat.recorded);
    }

    #[test]
    fn main_models_are_covered() {
        let book = PriceBook::builtin();
        let cases: &[(&str, &str)] = &[
            ("openai", "gpt-4o"),
            ("openai", "gpt-4o-mini"),
            ("openai", "gpt-4.1"),
            ("openai", "gpt-4.1-mini"),
            ("openai", "gpt-4.1-nano"),
            ("openai", "o1"),
            ("openai", "o3"),
            ("openai", "o3-mini"),
            ("openai", "o4-mini"),
            ("openai", "gpt-5"),
            ("openai", "gpt-5-mini"),
            ("openai", "gpt-5-nano"),
            ("openai", "text-embedding-3-small"),
            ("openai", "text-embedding-3-large"),
            ("azure-openai", "gpt-4o"),
            ("anthropic", "claude-3-5-sonnet-20241022"),
            ("anthropic", "claude-3-5-haiku-20241022"),
            ("anthropic", "claude-3-7-sonnet-20250219"),
            ("anthropic", "claude-sonnet-4-20250514"),
            ("anthropic", "claude-opus-4-20250514"),
            ("anthropic", "claude-opus-4-1-20250805"),
            ("anthropic", "claude-sonnet-4-5-20250929"),
            ("anthropic", "claude-haiku-4-5-20251001"),
            ("anthropic", "claude-opus-4-5-20251101"),
            ("gemini", "gemini-2.0-flash"),
            ("gemini", "gemini-2.0-flash-lite"),
            ("gemini", "gemini-2.5-pro"),
            ("gemini", "gemini-2.5-flash"),
            ("gemini", "gemini-2.5-flash-lite"),
            ("bedrock", "anthropic.claude-3-5-sonnet-20240620-v1:0"),
            ("bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ];
        for (p, m) in cases {
            assert!(book.knows(p, m), "{p} {m} should be priced");
        }
    }

    #[test]
    fn snapshots_and_aliases_resolve_to_their_family() {
        let book = PriceBook::builtin();
        let same = |p: &str, a: &str, b: &str| {
            let (x, y) = (book.price_at(p, a, NOW), book.price_at(p, b, NOW));
            assert!(x.is_some(), "{p} {a} should be priced");
            assert_eq!(x, y, "{p}: {a} should price as {b}");
        };
        same("openai", "gpt-4o-2024-08-06", "gpt-4o");
        same("openai", "gpt-4o-2024-11-20", "gpt-4o");
        same("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini");
        same("openai", "GPT-4.1-2025-04-14", "gpt-4.1");
        same("openai", "o3-mini-2025-01-31", "o3-mini");
        same("openai", "gpt-5-2025-08-07", "gpt-5");
        same("openai", "gpt-5-chat-latest", "gpt-5");
        same("openai", "gpt-4-0613", "gpt-4");
        same("openai", "gpt-3.5-turbo-0125", "gpt-3.5-turbo");
        same("openai", "openai/gpt-4o", "gpt-4o");
        same("azure-openai", "gpt-4o-2024-08-06", "gpt-4o");
        // Provider and model names are compared trimmed, in lower case.
        assert_eq!(
            book.price_at(" OpenAI ", " gpt-4o\t", NOW),
            book.price_at("openai", "gpt-4o", NOW)
        );
        assert_eq!(
            book.price_at("Azure-OpenAI", "GPT-4o", NOW),
            book.price_at("openai", "gpt-4o", NOW)
        );
        same(
            "anthropic",
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4-5",
        );
        same("anthropic", "claude-3-5-sonnet-latest", "claude-3-5-sonnet");
        same("gemini", "models/gemini-2.5-flash-001", "gemini-2.5-flash");
        same("gemini", "models/gemini-2.5-flash", "gemini-2.5-flash");
        same(
            "gemini",
            "gemini-2.5-flash-lite-preview-06-17",
            "gemini-2.5-flash-lite",
        );
        let anthropic = |m: &str| book.price_at("anthropic", m, NOW);
        for id in [
            "anthropic.claude-3-5-sonnet-20240620-v1:0",
            "anthropic.claude-3-5-sonnet-20241022-v2:0",
            "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
            "anthropic.claude-3-5-sonnet-20240620-v1%3A0",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20241022-v2:0",
            "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-5-sonnet-20240620-v1:0",
        ] {
            assert_eq!(
                book.price_at("bedrock", id, NOW),
                anthropic("claude-3-5-sonnet"),
                "{id}"
            );
        }
        assert_eq!(
            book.price_at(
                "bedrock",
                "global.anthropic.claude-haiku-4-5-20251001-v1:0",
                NOW
            ),
            anthropic("claude-haiku-4-5")
        );
    }

    /// Anthropic's aliases of the .0 versions (`claude-sonnet-4-0`, as its
    /// models page lists them) are those models; a `-0` that follows no
    /// version number, and other trailing numbers, are not stripped.
    #[test]
    fn point_zero_aliases_resolve_to_their_version() {
        let book = PriceBook::builtin();
        let anthropic = |m: &str| book.price_at("anthropic", m, NOW);
        for (alias, model) in [
            ("claude-sonnet-4-0", "claude-sonnet-4"),
            ("claude-opus-4-0", "claude-opus-4"),
        ] {
            assert!(anthropic(alias).is_some(), "{alias} should be priced");
            assert_eq!(anthropic(alias), anthropic(model), "{alias}");
        }
        assert_eq!(
            book.price_at("bedrock", "anthropic.claude-opus-4-0", NOW),
            anthropic("claude-opus-4")
        );
        // Neighbours keep their own prices.
        let input = |m: &str| anthropic(m).map(|p| p.input);
        assert_eq!(input("claude-3-5-sonnet"), Some(3.00));
        assert_eq!(input("claude-3-5-haiku"), Some(0.80));
        assert_ne!(
            anthropic("claude-sonnet-4-0"),
            anthropic("claude-3-5-sonnet")
        );
        assert_eq!(
            anthropic("claude-3-5-sonnet-latest"),
            anthropic("claude-3-5-sonnet")
        );
        assert_ne!(anthropic("claude-opus-4-1"), None);
        assert_eq!(
            book.price_at("openai", "gpt-4-0613", NOW),
            book.price_at("openai", "gpt-4", NOW)
        );
        for unknown in ["claude-sonnet-0", "claude-opus-4-0-9", "o1-0"] {
            assert_eq!(anthropic(unknown), None, "{unknown} must not be priced");
        }
        assert_eq!(book.price_at("openai", "o1-0", NOW), None);
    }

    /// Azure names GPT-3.5 without its dot (`gpt-35-turbo`, the model an
    /// Azure deployment answers as): priced as the same OpenAI name, and
    /// left unpriced where that is.
    #[test]
    fn azure_gpt_35_names_are_priced_as_gpt_3_5() {
        let book = PriceBook::builtin();
        for (azure, openai) in [
            ("gpt-35-turbo", "gpt-3.5-turbo"),
            ("GPT-35-Turbo", "gpt-3.5-turbo"),
            ("gpt-35-turbo-0125", "gpt-3.5-turbo-0125"),
            ("gpt-35-turbo-16k", "gpt-3.5-turbo-16k"),
            ("gpt-35-turbo-instruct", "gpt-3.5-turbo-instruct"),
        ] {
            let want = book.price_at("openai", openai, NOW);
            assert_eq!(book.price_at("azure-openai", azure, NOW), want, "{azure}");
            assert_eq!(book.price_at("openai", azure, NOW), want, "{azure}");
        }
        assert!(book.knows("azure-openai", "gpt-35-turbo"));
        assert!(book.knows("azure-openai", "gpt-35-turbo-0125"));
    }

    #[test]
    fn different_models_never_share_a_family() {
        let book = PriceBook::builtin();
        let p = |m: &str| book.price_at("openai", m, NOW).map(|p| p.input);
        assert_eq!(p("gpt-4o-mini"), Some(0.15));
        assert_eq!(p("gpt-4o"), Some(2.50));
        assert_eq!(p("gpt-4o-2024-05-13"), Some(5.00), "exact snapshot first");
        assert_ne!(p("gpt-4o-mini-2024-07-18"), p("gpt-4o"));
        assert_eq!(p("gpt-5.1-codex-mini"), Some(0.25));
        for unknown in [
            "gpt-4o-mini-search-preview",
            "gpt-4o-mini-tts",
            "gpt-5.9",
            "gpt-3.5-turbo-16k",
            "o3-deep-research",
            "ft:gpt-4o-mini-2024-07-18:acme::abc",
            "llama-3.1-70b-versatile",
            "",
        ] {
            assert_eq!(p(unknown), None, "{unknown} must not be priced");
        }
        assert!(!book.knows("anthropic", "claude-opus-4-9"), "a new version");
        assert!(!book.knows("anthropic", "claude-opus-5-6"), "a new version");
        assert!(!book.knows("openai", "claude-sonnet-4-5"), "wrong provider");
        assert!(!book.knows("bedrock", "amazon.nova-pro-v1:0"));
        assert!(!book.knows("mistral", "gpt-4o"));
    }

    /// The models released from 2025-12 to 2026-11, as their APIs name
    /// them (no dated snapshots since Claude Opus 4.6 and GPT-6), priced
    /// as the providers' pages give them; their siblings without a price
    /// stay unpriced rather than take a neighbour's.
    #[test]
    fn models_of_2026_are_priced_and_their_unpriced_siblings_are_not() {
        let book = PriceBook::builtin();
        let day = |d: &str| parse_date_ms(d).expect("date");
        let now = day("2026-11-30");
        let rates = |p: &str, m: &str| {
            book.price_at(p, m, now)
                .map(|x| (x.input, x.cached_input, x.output))
                .unwrap_or_else(|| panic!("{p} {m} should be priced"))
        };
        assert_eq!(rates("anthropic", "claude-opus-4-6"), (5.0, 0.5, 25.0));
        assert_eq!(rates("anthropic", "claude-sonnet-4-6"), (3.0, 0.3, 15.0));
        assert_eq!(rates("anthropic", "claude-opus-5-5"), (4.0, 0.2, 20.0));
        assert_eq!(rates("anthropic", "claude-opus-5"), (5.0, 0.5, 25.0));
        assert_eq!(rates("anthropic", "claude-fable-5-1"), (10.0, 0.25, 50.0));
        assert_eq!(rates("openai", "gpt-5.4-2026-03-05"), (2.5, 0.25, 15.0));
        assert_eq!(rates("openai", "gpt-6.1-terra"), (1.0, 0.05, 5.0));
        assert_eq!(rates("azure-openai", "gpt-6-sol"), (2.0, 0.2, 10.0));
        // Sonnet 5.5's cache reads halved on 2026-10-07.
        let sonnet = |d| {
            book.price_at("anthropic", "claude-sonnet-5-5", day(d))
                .unwrap()
        };
        assert_eq!(sonnet("2026-10-06").cached_input, 0.20);
        assert_eq!(sonnet("2026-10-07").cached_input, 0.10);
        // Bedrock ids of the new Claude models (no `:0`, or none at all)
        // and Claude Code's `[1m]` alias.
        for id in [
            "anthropic.claude-opus-4-6-v1",
            "anthropic.claude-opus-4-6-v1:0",
            "us.anthropic.claude-opus-4-6-v1",
            "claude-opus-4-6[1m]",
        ] {
            assert_eq!(
                book.price_at("bedrock", id, now),
                book.price_at("anthropic", "claude-opus-4-6", now),
                "{id}"
            );
        }
        assert_eq!(
            book.price_at("bedrock", "global.anthropic.claude-sonnet-5-5", now),
            book.price_at("anthropic", "claude-sonnet-5-5", now)
        );
        // Tiers and long prompts of the new OpenAI models.
        let terra = book.price_at("openai", "gpt-6.1-terra", now).unwrap();
        assert_eq!(terra.in_tier(Some("flex")).map(|r| r.input), Some(0.5));
        assert_eq!(
            terra.in_tier(Some("priority")).map(|r| r.output),
            Some(10.0)
        );
        assert_eq!(terra.cache_write, 1.25);
        // Added 2026-12-01.
        assert_eq!(rates("openai", "gpt-5.2"), (1.75, 0.175, 14.0));
        assert_eq!(rates("openai", "gpt-5.2-2025-12-11"), (1.75, 0.175, 14.0));
        assert_eq!(rates("openai", "gpt-5.2-pro"), (21.0, 21.0, 168.0));
        assert_eq!(rates("openai", "gpt-5.4-mini"), (0.75, 0.075, 4.5));
        assert_eq!(rates("openai", "gpt-5.5"), (5.0, 0.5, 30.0));
        let gpt55 = book.price_at("openai", "gpt-5.5", now).unwrap();
        assert_eq!(gpt55.long.map(|l| l.above), Some(272_000));
        assert_eq!(gpt55.in_tier(Some("flex")).map(|r| r.output), Some(15.0));
        assert_eq!(gpt55.in_tier(Some("priority")).map(|r| r.input), Some(12.5));
        assert_eq!(rates("anthropic", "claude-haiku-5-5"), (0.1, 0.01, 0.5));
        let haiku = book.price_at("anthropic", "claude-haiku-5-5", now).unwrap();
        assert_eq!(
            haiku.long.map(|l| (l.above, l.rates.input)),
            Some((100_000, 0.5))
        );
        assert_eq!(rates("anthropic", "claude-fable-5-2"), (8.0, 0.2, 40.0));
        assert!(
            book.price_at("openai", "gpt-5.2", day("2025-12-10"))
                .is_some(),
            "before its first entry a model takes its first price"
        );
        for unpriced in [
            ("openai", "gpt-5.4-pro"),
            ("openai", "gpt-5.5-pro"),
            ("openai", "gpt-5.2-mini"),
            ("openai", "gpt-5.6-terra"),
            ("openai", "gpt-6-astra"),
            ("openai", "gpt-6-sol-fast"),
            ("openai", "gpt-6.1-sol-ultrafast"),
            ("anthropic", "claude-haiku-5-6"),
        ] {
            assert!(!book.knows(unpriced.0, unpriced.1), "{unpriced:?}");
        }
    }

    /// Gemini 3 after 3 Pro Preview: the Flash models' introductory
    /// prices run to the end of 2026; their unpriced siblings stay unpriced.
    #[test]
    fn gemini_3_models_are_priced_by_date_and_their_siblings_are_not() {
        let book = PriceBook::builtin();
        let day = |d: &str| parse_date_ms(d).expect("date");
        let rates = |m: &str, d: &str| {
            book.price_at("gemini", m, day(d))
                .map(|x| (x.input, x.cached_input, x.output))
                .unwrap_or_else(|| panic!("{m} should be priced on {d}"))
        };
        assert_eq!(
            rates("gemini-3-flash-preview", "2026-11-30"),
            (0.5, 0.05, 3.0)
        );
        assert_eq!(
            rates("models/gemini-3.1-pro-preview", "2026-11-30"),
            (2.0, 0.2, 12.0)
        );
        let pro = book
            .price_at("gemini", "gemini-3.1-pro-preview", day("2026-11-30"))
            .unwrap();
        let long = pro.long.expect("long-context rates");
        assert_eq!((long.above, long.rates.output), (200_000, 18.0));
        assert_eq!(
            rates("gemini-3.5-flash-lite", "2026-11-30"),
            (0.3, 0.03, 2.5)
        );
        // 3.6 Flash: launch, introductory, list.
        assert_eq!(rates("gemini-3.6-flash", "2026-08-01"), (1.5, 0.15, 7.5));
        assert_eq!(rates("gemini-3.6-flash", "2026-12-31"), (0.75, 0.075, 3.75));
        assert_eq!(rates("gemini-3.6-flash", "2027-01-01"), (1.5, 0.15, 7.5));
        assert_eq!(
            rates("gemini-3.8-flash-preview-09-2026", "2026-11-30"),
            (0.75, 0.075, 3.75)
        );
        assert_eq!(rates("gemini-3.8-flash", "2027-01-01"), (1.5, 0.15, 7.5));
        assert_eq!(rates("gemini-embedding-2", "2026-11-30").0, 0.2);
        for unpriced in [
            "gemini-3.1-flash-lite",
            "gemini-3.6-flash-lite",
            "gemini-3.8-flash-image",
            "gemini-3.8-flash-live",
            "gemini-3.1-pro",
            "gemini-3-flash",
        ] {
            assert!(!book.knows("gemini", unpriced), "{unpriced}");
        }
    }

    #[test]
    fn the_price_in_effect_at_the_start_applies() {
        let book = PriceBook::builtin();
        let day = |d: &str| parse_date_ms(d).expect("date");
        let input = |at| book.price_at("openai", "gpt-4o", at).map(|p| p.input);
        assert_eq!(input(day("2024-06-01")), Some(5.00));
        assert_eq!(input(day("2024-10-02") - 1), Some(5.00));
        assert_eq!(input(day("2024-10-02")), Some(2.50));
        assert_eq!(input(NOW), Some(2.50));
        assert_eq!(input(0), Some(5.00), "before every version: the first");
        let o3 = |at| book.price_at("openai", "o3", at).map(|p| p.output);
        assert_eq!(o3(day("2025-05-01")), Some(40.0));
        assert_eq!(o3(day("2025-07-01")), Some(8.0));
    }

    #[test]
    fn cost_follows_the_formula() {
        let book = PriceBook::builtin();
        // claude-sonnet-4-5: 3 in, 3.75 write, 0.30 read, 15 out (a prompt
        // under its 200k long-context threshold).
        let u = usage(100_000, 20_000, 10_000, 50_000, 0);
        let c = book
            .cost("anthropic", "claude-sonnet-4-5-20250929", NOW, &u)
            .expect("priced");
        let want = 0.07 * 3.0 + 0.02 * 0.30 + 0.01 * 3.75 + 0.05 * 15.0;
        assert!(close(c, want), "{c} != {want}");
        // Reasoning defaults to the output price.
        let r = book
            .cost("openai", "o4-mini", NOW, &usage(0, 0, 0, 1000, 800))
            .expect("priced");
        assert!(close(r, 1000.0 * 4.40 / 1e6), "{r}");
        // An inconsistent count is capped, never negative.
        let odd = book
            .cost("openai", "gpt-4o", NOW, &usage(10, 50, 50, 5, 9))
            .expect("priced");
        assert!(odd >= 0.0);
        assert_eq!(book.cost("openai", "nope", NOW, &u), None);
    }

    #[test]
    fn config_overrides_and_extends() {
        let cfg: PricingConfig = toml::from_str(
            r#"
[[models]]
provider = "openai"
model = "gpt-4o"
input = 1.0
output = 2.0

[[models]]
provider = "azure-openai"
model = "My-Deployment"
input = 3.0
output = 4.0
cached_input = 0.5

[[models]]
provider = "anthropic"
model = "claude-sonnet-4-5"
effective = "2026-01-01"
input = 2.0
output = 10.0
"#,
        )
        .expect("config parses");
        cfg.validate().expect("valid");
        let book = PriceBook::new(&cfg);
        let p = book
            .price_at("openai", "gpt-4o-2024-08-06", 0)
            .expect("gpt-4o");
        // The cache rate left out keeps the catalogue's ratio (gpt-4o:
        // 1.25 of 2.50).
        assert_eq!((p.input, p.output, p.cached_input), (1.0, 2.0, 0.5));
        assert_eq!(
            book.price_at("azure-openai", "my-deployment", NOW)
                .map(|p| p.cached_input),
            Some(0.5)
        );
        assert_eq!(
            book.price_at("azure-openai", "gpt-4o", NOW)
                .map(|p| p.input),
            Some(1.0),
            "azure falls back to the (overridden) openai price"
        );
        let jan = parse_date_ms("2026-01-01").expect("date");
        let s = |at| {
            book.price_at("anthropic", "claude-sonnet-4-5", at)
                .map(|p| p.input)
        };
        assert_eq!((s(NOW), s(jan)), (Some(3.0), Some(2.0)));
    }

    /// A dated entry for a name the table holds only through another
    /// (Bedrock's id through Anthropic's table, a model through its
    /// family) takes effect on its date; before it, the name keeps the
    /// price it had.
    #[test]
    fn a_dated_price_for_a_name_priced_through_another_waits_for_its_date() {
        let builtin = PriceBook::builtin();
        let id = "us.anthropic.claude-sonnet-4-5-20250929-v1:0";
        let book = book_of(
            r#"
[[models]]
provider = "bedrock"
model = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
effective = "2099-01-01"
input = 1.0
output = 1.0

[[models]]
provider = "openai"
model = "gpt-5.1-codex-max"
effective = "2099-01-01"
input = 0.5
output = 1.0
"#,
        );
        let later = parse_date_ms("2099-01-02").expect("date");
        let input = |b: &PriceBook, p: &str, m: &str, at| b.price_at(p, m, at).map(|p| p.input);
        assert_eq!(
            input(&book, "bedrock", id, NOW),
            input(&builtin, "bedrock", id, NOW)
        );
        assert!(input(&builtin, "bedrock", id, NOW).is_some_and(|i| i > 1.0));
        assert_eq!(input(&book, "bedrock", id, later), Some(1.0));
        let codex = "gpt-5.1-codex-max";
        assert_eq!(
            input(&book, "openai", codex, NOW),
            input(&builtin, "openai", codex, NOW)
        );
        assert!(input(&builtin, "openai", codex, NOW).is_some_and(|i| i > 0.5));
        assert_eq!(input(&book, "openai", codex, later), Some(0.5));
        // With an undated price of its own, the name has that one now.
        let book = book_of(
            r#"
[[models]]
provider = "openai"
model = "gpt-5.1-codex-max"
input = 0.25
output = 1.0

[[models]]
provider = "openai"
model = "gpt-5.1-codex-max"
effective = "2099-01-01"
input = 0.5
output = 1.0
"#,
        );
        assert_eq!(input(&book, "openai", codex, NOW), Some(0.25));
        assert_eq!(input(&book, "openai", codex, later), Some(0.5));
        // An undated price of the name it resolves through holds until the
        // date too.
        let book = book_of(
            r#"
[[models]]
provider = "anthropic"
model = "claude-sonnet-4-5"
input = 2.7
output = 10.0

[[models]]
provider = "bedrock"
model = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
effective = "2099-01-01"
input = 1.0
output = 1.0
"#,
        );
        assert_eq!(input(&book, "bedrock", id, NOW), Some(2.7));
        assert_eq!(input(&book, "bedrock", id, later), Some(1.0));
    }

    fn book_of(toml_text: &str) -> PriceBook {
        let cfg: PricingConfig = toml::from_str(toml_text).expect("config parses");
        cfg.validate().expect("valid");
        PriceBook::new(&cfg)
    }

    #[test]
    fn service_tiers_are_priced_by_their_own_rates() {
        let book = PriceBook::builtin();
        // 1M plain input, 1M cache reads, 1M output.
        let u = usage(2_000_000, 1_000_000, 0, 1_000_000, 0);
        let cost = |provider: &str, model: &str, tier: Option<&str>| {
            book.cost_of_any(provider, &[model], NOW, &u, Serving::tier(tier))
                .expect("priced")
        };
        let standard = 1.25 + 0.125 + 10.0;
        for tier in [
            None,
            Some("default"),
            Some("auto"),
            Some("scale"),
            Some("reserved"),
            Some("DEFAULT"),
        ] {
            let c = cost("openai", "gpt-5-2025-08-07", tier);
            assert!(
                close(c.usd, standard) && !c.tier_unpriced,
                "{tier:?}: {c:?}"
            );
        }
        let flex = cost("openai", "gpt-5-2025-08-07", Some("flex"));
        assert!(
            close(flex.usd, standard / 2.0) && !flex.tier_unpriced,
            "{flex:?}"
        );
        let priority = cost("openai", "gpt-5", Some("priority"));
        assert!(close(priority.usd, standard * 2.0), "{priority:?}");
        // Priority processing's name since 2026-07-30.
        let fast = cost("openai", "gpt-5", Some("fast"));
        assert!(close(fast.usd, standard * 2.0), "{fast:?}");
        // Azure falls back to OpenAI's rates, tiers included.
        let azure = cost("azure-openai", "gpt-5", Some("priority"));
        assert!(close(azure.usd, standard * 2.0), "{azure:?}");
        // A tier the model has no rates for, or a tier tollgate does not
        // know: the standard rates, and it says so.
        assert!(close(cost("openai", "gpt-4o", None).usd, 2.5 + 1.25 + 10.0));
        for (provider, model, tier) in [
            ("openai", "gpt-4o", "flex"),
            ("openai", "gpt-5", "turbo"),
            ("anthropic", "claude-sonnet-4-5", "priority"),
        ] {
            let (c, standard) = (
                cost(provider, model, Some(tier)),
                cost(provider, model, None),
            );
            assert!(
                close(c.usd, standard.usd) && c.tier_unpriced,
                "{model} {tier}: {c:?}"
            );
        }
        // Batch results: half of every rate, every provider, a model's
        // long-context rates included.
        for (provider, model) in [
            ("openai", "gpt-5"),
            ("openai", "gpt-4o"),
            ("anthropic", "claude-sonnet-4-5"),
            ("gemini", "gemini-2.5-pro"),
        ] {
            let (b, standard) = (
                cost(provider, model, Some("batch")),
                cost(provider, model, None),
            );
            assert!(
                close(b.usd, standard.usd / 2.0) && !b.tier_unpriced,
                "{model}: {b:?} against {standard:?}"
            );
        }
        let long = usage(300_000, 0, 0, 1_000, 0);
        let long_cost = |tier| {
            book.cost_of_any(
                "gemini",
                &["gemini-2.5-pro"],
                NOW,
                &long,
                Serving::tier(tier),
            )
            .expect("priced")
            .usd
        };
        assert!(close(long_cost(Some("batch")), long_cost(None) / 2.0));
        assert!(
            long_cost(None) > 300_000.0 * 1.25 / 1e6,
            "long-context rates apply"
        );
        // An unknown model stays unpriced in every tier.
        assert!(
            book.cost_of_any(
                "openai",
                &["no-such-model"],
                NOW,
                &u,
                Serving::tier(Some("flex"))
            )
            .is_none()
        );
    }

    #[test]
    fn bedrock_regional_endpoints_of_claude_4_5_cost_a_tenth_more() {
        for (id, regional) in [
            ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", true),
            ("eu.anthropic.claude-haiku-4-5-20251001-v1:0", true),
            ("anthropic.claude-sonnet-4-5-20250929-v1:0", true),
            ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", false),
            ("GLOBAL.anthropic.claude-sonnet-4-5-20250929-v1:0", false),
            (
                "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-sonnet-4-5-20250929-v1:0",
                true,
            ),
            (
                "arn:aws:bedrock:us-east-1:111122223333:inference-profile/us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                true,
            ),
            (
                "arn:aws:bedrock:us-east-1:111122223333:application-inference-profile/abc123",
                false,
            ),
            ("claude-sonnet-4-5", false),
            // A vendor the table of prefixes does not list, in-region.
            ("twelvelabs.marengo-embed-2-7-v1:0", true),
        ] {
            assert_eq!(bedrock_regional(id), regional, "{id}");
        }
        let book = PriceBook::builtin();
        let u = usage(1000, 0, 0, 1000, 0);
        let cost = |model: &str, bedrock_regional: bool| {
            book.cost_of_any(
                "bedrock",
                &[model],
                NOW,
                &u,
                Serving {
                    tier: None,
                    bedrock_regional,
                    ..Serving::default()
                },
            )
            .expect("priced")
            .usd
        };
        let sonnet = "us.anthropic.claude-sonnet-4-5-20250929-v1:0";
        assert!(close(cost(sonnet, false), (3.0 + 15.0) * 1000.0 / 1e6));
        assert!(close(cost(sonnet, true), 1.1 * cost(sonnet, false)));
        // Older models have no premium.
        let old = "us.anthropic.claude-3-5-sonnet-20240620-v1:0";
        assert!(close(cost(old, true), cost(old, false)));
        // An override keeps the catalogue's premium; an entry may set its own.
        let book = book_of(
            "[[models]]\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-4-5\"\ninput = 2.7\noutput = 13.5\n\n[[models]]\nprovider = \"bedrock\"\nmodel = \"house-model\"\ninput = 1.0\noutput = 1.0\nbedrock_regional_premium = 0.5\n",
        );
        let p = |m: &str| {
            book.price_at("bedrock", m, NOW)
                .expect("priced")
                .bedrock_regional
        };
        assert!(close(p(sonnet), 1.1));
        assert!(close(p("house-model"), 1.5));
    }

    #[test]
    fn vertex_regional_endpoints_of_claude_since_sonnet_4_5_cost_a_tenth_more() {
        let book = PriceBook::builtin();
        let u = usage(1000, 0, 0, 1000, 0);
        let cost = |book: &PriceBook, model: &str, vertex_regional: bool| {
            book.cost_of_any(
                "anthropic",
                &[model],
                NOW,
                &u,
                Serving {
                    vertex_regional,
                    ..Serving::default()
                },
            )
            .expect("priced")
            .usd
        };
        for newer in [
            "claude-sonnet-4-5@20250929",
            "claude-haiku-4-5@20251001",
            "claude-opus-4-6",
            "claude-sonnet-5-5",
        ] {
            assert!(
                close(cost(&book, newer, true), 1.1 * cost(&book, newer, false)),
                "{newer}"
            );
        }
        for older in ["claude-opus-4-1@20250805", "claude-sonnet-4@20250514"] {
            assert!(
                close(cost(&book, older, true), cost(&book, older, false)),
                "{older}"
            );
        }
        // Bedrock's premium is its own: a Vertex request does not take it.
        let p = book
            .price_at("anthropic", "claude-opus-4-6", NOW)
            .expect("priced");
        assert!(close(p.bedrock_regional, 1.0) && close(p.vertex_regional, 1.1));
        // An override keeps the catalogue's answer (an old model does not
        // become new by a dated price); a model the catalogue lacks is
        // judged by its own date; Gemini models have none.
        let book = book_of(
            "[[models]]\nprovider = \"anthropic\"\nmodel = \"claude-opus-4-1\"\neffective = \"2026-01-01\"\ninput = 1.0\noutput = 1.0\n\n[[models]]\nprovider = \"anthropic\"\nmodel = \"claude-house-1\"\neffective = \"2026-01-01\"\ninput = 1.0\noutput = 1.0\n\n[[models]]\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-4-5\"\ninput = 2.7\noutput = 13.5\n",
        );
        let v = |p: &str, m: &str| book.price_at(p, m, NOW).expect("priced").vertex_regional;
        // Which prices are the config's.
        let configured = |p: &str, m: &str| book.price_at(p, m, NOW).expect("priced").configured;
        assert!(configured("anthropic", "claude-sonnet-4-5"));
        assert!(!configured("anthropic", "claude-opus-4-6"));
        assert!(
            !PriceBook::builtin()
                .price_at("gemini", "text-embedding-004", NOW)
                .expect("priced")
                .configured
        );
        // A catalogue whose older model changed its price after Sonnet
        // 4.5's release: still no premium, in either version.
        let cat: Catalogue = toml::from_str(
            "format = 1\nrecorded = \"2026-12-01\"\n\
             [[models]]\nprovider = \"anthropic\"\nmodel = \"claude-old-1\"\neffective = \"2025-01-01\"\ninput = 1.0\noutput = 1.0\n\
             [[models]]\nprovider = \"anthropic\"\nmodel = \"claude-old-1\"\neffective = \"2026-01-01\"\ninput = 0.5\noutput = 0.5\n\
             [[models]]\nprovider = \"anthropic\"\nmodel = \"claude-new-1\"\neffective = \"2026-01-01\"\ninput = 1.0\noutput = 1.0\n",
        )
        .expect("catalogue");
        let old = PriceBook::of_catalogue(cat);
        let day = |d: &str| parse_date_ms(d).expect("date");
        for d in ["2025-06-01", "2026-06-01"] {
            let p = old
                .price_at("anthropic", "claude-old-1", day(d))
                .expect("priced");
            assert!(close(p.vertex_regional, 1.0), "{d}");
        }
        let p = old
            .price_at("anthropic", "claude-new-1", NOW)
            .expect("priced");
        assert!(close(p.vertex_regional, 1.1));
        assert!(close(v("anthropic", "claude-opus-4-1"), 1.0));
        assert!(close(v("anthropic", "claude-house-1"), 1.1));
        assert!(close(v("anthropic", "claude-sonnet-4-5"), 1.1));
        assert!(close(v("gemini", "gemini-2.5-pro"), 1.0));
    }

    #[test]
    fn an_override_keeps_or_replaces_the_catalogues_tiers() {
        let u = usage(1_000_000, 0, 0, 1_000_000, 0);
        // Half price negotiated: the catalogue's tiers are halved too.
        let book = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-5-2025-08-07\"\ninput = 0.625\noutput = 5.0\n",
        );
        let c = book
            .cost_of_any(
                "openai",
                &["gpt-5-2025-08-07"],
                NOW,
                &u,
                Serving::tier(Some("flex")),
            )
            .expect("priced");
        assert!(close(c.usd, (0.625 + 5.0) / 2.0), "{c:?}");
        // An entry's own tier; its cache rate follows the entry's ratio.
        let book = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"house\"\ninput = 1.0\ncached_input = 0.5\noutput = 2.0\nflex = { input = 0.4, output = 0.8 }\n",
        );
        let p = book.price_at("openai", "house", NOW).expect("priced");
        let flex = p.in_tier(Some("flex")).expect("own flex rates");
        assert_eq!(
            (flex.input, flex.cached_input, flex.output),
            (0.4, 0.2, 0.8)
        );
        // A model with long-context rates keeps them in a tier, scaled.
        let book = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"long\"\ninput = 1.0\noutput = 2.0\nlong_context = { above = 1000, input = 2.0, output = 3.0 }\npriority = { input = 2.0, output = 6.0 }\n",
        );
        let u = usage(2000, 0, 0, 1000, 0);
        let c = book
            .cost_of_any(
                "openai",
                &["long"],
                NOW,
                &u,
                Serving::tier(Some("priority")),
            )
            .expect("priced");
        assert!(close(c.usd, (2000.0 * 4.0 + 1000.0 * 9.0) / 1e6), "{c:?}");
        assert_eq!(p.in_tier(Some("priority")), None, "no priority rates");
        assert_eq!(p.in_tier(None), Some(p));
    }

    #[test]
    fn an_override_keeps_the_catalogues_cache_ratios() {
        // A 10% discount written as input and output only.
        let book = book_of(
            "[[models]]\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-4-5\"\ninput = 2.7\noutput = 13.5\n",
        );
        let p = book
            .price_at("anthropic", "claude-sonnet-4-5", NOW)
            .expect("priced");
        assert!(close(p.cached_input, 0.27), "{p:?}");
        assert!(close(p.cache_write, 3.375), "{p:?}");
        assert!(close(p.reasoning, 13.5), "{p:?}");
        // 100k input of which 90k cache reads: 10k at 2.7 + 90k at 0.27.
        let c = book
            .cost(
                "anthropic",
                "claude-sonnet-4-5",
                NOW,
                &usage(100_000, 90_000, 0, 0, 0),
            )
            .expect("priced");
        assert!(close(c, 0.027 + 0.0243), "{c}");
        // A model the catalogue does not know: the rates left out are input's.
        let book = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"house-model\"\ninput = 1.0\noutput = 2.0\n",
        );
        let p = book.price_at("openai", "house-model", NOW).expect("priced");
        assert_eq!(
            (p.cached_input, p.cache_write, p.reasoning),
            (1.0, 1.0, 2.0)
        );
    }

    #[test]
    fn hour_long_cache_writes_cost_twice_the_input_rate() {
        let book = PriceBook::builtin();
        // Sonnet 4.5: 100k prompt with 20k cache writes, 15k of them kept
        // an hour: 80k at 3, 5k at 3.75, 15k at 6.
        let mut u = usage(100_000, 0, 20_000, 0, 0);
        u.cache_write_1h_input_tokens = 15_000;
        let c = book
            .cost("anthropic", "claude-sonnet-4-5", NOW, &u)
            .expect("priced");
        assert!(close(c, 0.08 * 3.0 + 0.005 * 3.75 + 0.015 * 6.0), "{c}");
        // Elsewhere an hour-long write costs what a write costs.
        let p = book.price_at("openai", "gpt-4o", NOW).expect("priced");
        assert_eq!(p.cache_write_1h, p.cache_write);
        // An override keeps Anthropic's 2x ratio.
        let book = book_of(
            "[[models]]\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-4-5\"\ninput = 2.0\noutput = 10.0\n",
        );
        let p = book
            .price_at("anthropic", "claude-sonnet-4-5", NOW)
            .expect("priced");
        assert!(close(p.cache_write_1h, 4.0), "{p:?}");
    }

    #[test]
    fn long_prompts_are_priced_at_the_long_context_rates() {
        let book = PriceBook::builtin();
        // Gemini 2.5 Pro: 500k prompt, 10k output: $2.50 and $15 per 1M.
        let c = book
            .cost(
                "gemini",
                "gemini-2.5-pro",
                NOW,
                &usage(500_000, 0, 0, 10_000, 0),
            )
            .expect("priced");
        assert!(close(c, 0.5 * 2.5 + 0.01 * 15.0), "{c}");
        // At the threshold itself, the standard rates.
        let c = book
            .cost("gemini", "gemini-2.5-pro", NOW, &usage(200_000, 0, 0, 0, 0))
            .expect("priced");
        assert!(close(c, 0.2 * 1.25), "{c}");
        // Sonnet 4.5 with 1M context: cache reads and writes count toward
        // the prompt and take the long rates too.
        let c = book
            .cost(
                "anthropic",
                "claude-sonnet-4-5-20250929",
                NOW,
                &usage(400_000, 300_000, 50_000, 5_000, 0),
            )
            .expect("priced");
        let want = 0.05 * 6.0 + 0.3 * 0.60 + 0.05 * 7.50 + 0.005 * 22.50;
        assert!(close(c, want), "{c} != {want}");
        // Bedrock's Anthropic models fall back to the same tier.
        assert!(
            book.price_at(
                "bedrock",
                "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                NOW
            )
            .and_then(|p| p.long)
            .is_some()
        );
        // An override of a model with a tier keeps it, scaled; one can
        // give its own, and it is validated.
        let book = book_of(
            "[[models]]\nprovider = \"gemini\"\nmodel = \"gemini-2.5-pro\"\ninput = 0.625\noutput = 5.0\n",
        );
        let l = book
            .price_at("gemini", "gemini-2.5-pro", NOW)
            .and_then(|p| p.long)
            .expect("tier kept");
        assert!(
            close(l.rates.input, 1.25) && close(l.rates.output, 7.5) && l.above == 200_000,
            "{l:?}"
        );
        let book = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"house\"\ninput = 1.0\ncached_input = 0.1\noutput = 2.0\nlong_context = { above = 1000, input = 3.0, output = 4.0 }\n",
        );
        let p = book.price_at("openai", "house", NOW).expect("priced");
        let l = p.long.expect("tier");
        assert!(
            close(l.rates.cached_input, 0.3),
            "the entry's own cache ratio: {l:?}"
        );
        assert!(close(p.cost(&usage(1001, 0, 0, 0, 0)), 1001.0 * 3.0 / 1e6));
        let bad: PricingConfig = toml::from_str(
            "[[models]]\nprovider = \"openai\"\nmodel = \"h\"\ninput = 1.0\noutput = 2.0\nlong_context = { above = 0, input = 3.0, output = 4.0 }\n",
        )
        .expect("parses");
        assert_eq!(
            bad.validate().unwrap_err().0,
            "pricing.models[0].long_context.above"
        );
        let bad: PricingConfig = toml::from_str(
            "[[models]]\nprovider = \"openai\"\nmodel = \"h\"\ninput = 1.0\noutput = 2.0\nlong_context = { above = 9, input = -3.0, output = 4.0 }\n",
        )
        .expect("parses");
        assert_eq!(
            bad.validate().unwrap_err().0,
            "pricing.models[0].long_context.input"
        );
    }

    #[test]
    fn an_override_of_a_dated_or_bedrock_id_finds_its_catalogue_ratios() {
        for (provider, model) in [
            ("anthropic", "claude-sonnet-4-5-20250929"),
            ("bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
        ] {
            let book = book_of(&format!(
                "[[models]]\nprovider = \"{provider}\"\nmodel = \"{model}\"\ninput = 2.7\noutput = 13.5\n"
            ));
            let p = book.price_at(provider, model, NOW).expect("priced");
            assert!(close(p.cached_input, 0.27), "{model}: {p:?}");
            assert!(close(p.cache_write_1h, 5.4), "{model}: {p:?}");
            assert!(p.long.is_some(), "{model}: the long-context tier is kept");
        }
    }

    #[test]
    fn the_order_of_overrides_does_not_matter() {
        let dated = "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-4o\"\neffective = \"2026-01-01\"\ninput = 2.0\noutput = 8.0\n";
        let undated =
            "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-4o\"\ninput = 1.0\noutput = 4.0\n";
        let jan = parse_date_ms("2026-01-01").expect("date");
        for text in [format!("{dated}{undated}"), format!("{undated}{dated}")] {
            let book = book_of(&text);
            let at = |ms| book.price_at("openai", "gpt-4o", ms).map(|p| p.input);
            assert_eq!((at(jan - 1), at(jan)), (Some(1.0), Some(2.0)), "{text}");
        }
    }

    #[test]
    fn fine_tunes_are_priced_by_their_whole_name() {
        let book = book_of(
            r#"
[[models]]
provider = "openai"
model = "ft:gpt-4o-mini-2024-07-18:acme::abc123"
input = 0.3
output = 1.2

[[models]]
provider = "openai"
model = "ft:gpt-4o-2024-08-06:acme::xyz789"
input = 3.75
output = 15.0
"#,
        );
        let input = |m| book.price_at("openai", m, NOW).map(|p| p.input);
        assert_eq!(input("ft:gpt-4o-mini-2024-07-18:acme::abc123"), Some(0.3));
        assert_eq!(input("ft:gpt-4o-2024-08-06:acme::xyz789"), Some(3.75));
        assert_eq!(input("ft:gpt-4o-2024-08-06:other::q1"), None, "not priced");
        // Bedrock ids still lose their version suffix.
        assert!(book.knows("bedrock", "anthropic.claude-sonnet-4-5-20250929-v1:0"));
    }

    #[test]
    fn an_azure_deployment_priced_in_the_config_wins_over_its_model() {
        let book = book_of(
            "[[models]]\nprovider = \"azure-openai\"\nmodel = \"gpt4o-ptu\"\ninput = 0\noutput = 0\n",
        );
        let u = usage(1000, 0, 0, 1000, 0);
        // The response names the model, the request the deployment; the
        // deployment is looked up first on Azure, the model elsewhere.
        let order = price_order("azure-openai", Some("gpt-4o-2024-11-20"), Some("gpt4o-ptu"));
        assert_eq!(*order, ["gpt4o-ptu", "gpt-4o-2024-11-20"]);
        assert_eq!(
            *price_order("openai", Some("gpt-4o-2024-11-20"), Some("gpt-4o")),
            ["gpt-4o-2024-11-20", "gpt-4o"]
        );
        assert_eq!(*price_order("openai", None, Some("gpt-4o")), ["gpt-4o"]);
        assert!(price_order("azure-openai", None, None).is_empty());
        let c = book.cost_of_any("azure-openai", &order, NOW, &u, Serving::default());
        assert_eq!(c.map(|c| c.usd), Some(0.0));
        // Another deployment answers at OpenAI's price of its model, also
        // when the deployment is named after another model.
        let gpt_4o = 1000.0 * 2.5 / 1e6 + 1000.0 * 10.0 / 1e6;
        for deployment in ["other", "gpt-4", "gpt-4-prod", "gpt-4o-mini"] {
            let order = price_order("azure-openai", Some("gpt-4o-2024-11-20"), Some(deployment));
            let c = book
                .cost_of_any("azure-openai", &order, NOW, &u, Serving::default())
                .expect("priced")
                .usd;
            assert!(close(c, gpt_4o), "{deployment}: {c}");
        }
        // With no model in the response, the deployment's name is all
        // there is.
        let order = price_order("azure-openai", None, Some("gpt-4o-mini"));
        let c = book
            .cost_of_any("azure-openai", &order, NOW, &u, Serving::default())
            .expect("priced")
            .usd;
        assert!(close(c, 1000.0 * 0.15 / 1e6 + 1000.0 * 0.6 / 1e6), "{c}");
        // The response's model first within one table.
        let book = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-4o-mini\"\ninput = 9\noutput = 9\n",
        );
        let p = book.price_of_any_at("openai", &["gpt-4o", "gpt-4o-mini"], NOW);
        assert_eq!(p.map(|p| p.input), Some(2.5));
    }

    /// The Realtime models are each their own, snapshots resolve to their
    /// family, and their cache reads of audio and images are priced at
    /// their own rates; where an entry gives none, cached audio and images
    /// are discounted as its text is (Gemini's audio: 10 % of its input
    /// rate), and an override keeps the catalogue's.
    #[test]
    fn realtime_models_price_their_cached_audio_apart() {
        let book = PriceBook::builtin();
        let rates = |m: &str| {
            let p = book.price_at("openai", m, NOW).expect(m);
            (p.input, p.output)
        };
        assert_eq!(rates("gpt-realtime-2025-08-28"), (4.0, 16.0));
        assert_eq!(rates("gpt-realtime-mini-2025-12-15"), (0.6, 2.4));
        assert_eq!(rates("gpt-realtime-2.1-mini"), (0.6, 2.4));
        assert_eq!(rates("gpt-realtime-2"), (4.0, 24.0));
        assert_eq!(rates("gpt-realtime-2.1"), (4.0, 24.0));
        assert_eq!(rates("gpt-realtime-1.5"), (4.0, 16.0));
        assert_eq!(rates("gpt-4o-realtime-preview-2025-06-03"), (5.0, 20.0));
        assert_eq!(rates("gpt-4o-mini-realtime-preview-2024-12-17"), (0.6, 2.4));
        assert!(!book.knows("openai", "gpt-realtime-9"));
        // Billed by the minute: never the speech model's tokens.
        let whisper = book
            .price_at("openai", "gpt-realtime-whisper", NOW)
            .unwrap();
        assert_eq!(
            (whisper.input, whisper.audio_per_minute),
            (0.0, Some(0.017))
        );
        assert!(!book.knows("openai", "gpt-realtime-translate"));
        // Gemini Live: each its own, snapshots by their family.
        let gemini = |m: &str| book.price_at("gemini", m, NOW).map(|p| (p.input, p.output));
        assert_eq!(gemini("gemini-3.8-live"), Some((0.75, 4.5)));
        assert_eq!(
            gemini("gemini-2.5-flash-native-audio-preview-12-2025"),
            Some((0.5, 2.0))
        );
        assert_eq!(
            gemini("gemini-2.5-flash-native-audio-latest"),
            Some((0.5, 2.0))
        );
        assert_eq!(
            gemini("gemini-live-2.5-flash-native-audio"),
            Some((0.5, 2.0))
        );
        assert_ne!(gemini("gemini-3.8-live"), gemini("gemini-3.8-flash"));
        // A conversation's later turn: mostly cache reads, mostly audio.
        let turn = Usage {
            input_tokens: 10_000,
            cached_input_tokens: 9_000,
            cached_audio_input_tokens: 8_000,
            cached_image_input_tokens: 500,
            audio_input_tokens: 600,
            output_tokens: 1_000,
            audio_output_tokens: 800,
            ..Usage::default()
        };
        let cost = |b: &PriceBook, p: &str, m: &str| b.cost(p, m, NOW, &turn).expect(m);
        // gpt-realtime-mini: text 0.60 / 0.06 / 2.40, audio 10 / 0.30 /
        // 20, images 0.80 / 0.08.
        let want = (400.0 * 0.60
            + 600.0 * 10.0
            + 500.0 * 0.06
            + 8_000.0 * 0.30
            + 500.0 * 0.08
            + 200.0 * 2.40
            + 800.0 * 20.0)
            / 1e6;
        let c = cost(&book, "openai", "gpt-realtime-mini");
        assert!(close(c, want), "{c} against {want}");
        // The launch snapshot's audio: 100 / 20 / 200.
        let want = (400.0 * 5.0
            + 600.0 * 100.0
            + 500.0 * 2.5
            + 8_000.0 * 20.0
            + 500.0 * 2.5
            + 200.0 * 20.0
            + 800.0 * 200.0)
            / 1e6;
        let c = cost(&book, "openai", "gpt-4o-realtime-preview-2024-10-01");
        assert!(close(c, want), "{c} against {want}");
        // An override at half the text rates keeps the ratios.
        let half = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-realtime-mini\"\ninput = 0.30\ncached_input = 0.03\noutput = 1.20\n",
        );
        let c = cost(&half, "openai", "gpt-realtime-mini");
        let full = cost(&book, "openai", "gpt-realtime-mini");
        assert!(close(c, full / 2.0), "{c} against {full}");
        // An entry's own rate for cached audio, and the default: the
        // audio's ratio to the input, applied to the cache read rate.
        let own = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"my-voice\"\ninput = 1\ncached_input = 0.5\noutput = 1\naudio_input = 8\ncached_audio_input = 1\n",
        );
        let only_cached_audio = Usage {
            input_tokens: 1_000_000,
            cached_input_tokens: 1_000_000,
            cached_audio_input_tokens: 1_000_000,
            ..Usage::default()
        };
        let c = own
            .cost("openai", "my-voice", NOW, &only_cached_audio)
            .unwrap();
        assert!(close(c, 1.0), "{c}");
        let plain = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"my-voice\"\ninput = 1\ncached_input = 0.5\noutput = 1\naudio_input = 8\n",
        );
        let c = plain
            .cost("openai", "my-voice", NOW, &only_cached_audio)
            .unwrap();
        assert!(
            close(c, 0.5),
            "OpenAI's cached audio costs as its cached text: {c}"
        );
        let ratio = book_of(
            "[[models]]\nprovider = \"gemini\"\nmodel = \"my-voice\"\ninput = 1\ncached_input = 0.5\noutput = 1\naudio_input = 8\n",
        );
        let c = ratio
            .cost("gemini", "my-voice", NOW, &only_cached_audio)
            .unwrap();
        assert!(close(c, 4.0), "discounted as the text: {c}");
        // Audio billed by its length: at the model's rate a minute; a
        // model without one leaves the cost unknown, never 0.
        let spoken = Usage {
            audio_duration_ms: 90_000,
            ..Usage::default()
        };
        let c = book.cost("openai", "whisper-1", NOW, &spoken).unwrap();
        assert!(close(c, 0.009), "{c}");
        assert_eq!(book.cost("openai", "gpt-4o-transcribe", NOW, &spoken), None);
        assert_eq!(book.cost("openai", "no-such-model", NOW, &spoken), None);
        let own = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"whisper-1\"\ninput = 0\noutput = 0\naudio_per_minute = 0.01\n",
        );
        let c = own.cost("openai", "whisper-1", NOW, &spoken).unwrap();
        assert!(close(c, 0.015), "{c}");
        // A model billed by the minute alone, answered with no length (a
        // transcription as plain text): unknown too, not 0.
        assert_eq!(
            book.cost("openai", "whisper-1", NOW, &Usage::default()),
            None
        );
        let serving = Serving::default();
        assert_eq!(
            book.cost_of_any("openai", &["whisper-1"], NOW, &Usage::default(), serving),
            None
        );
        // Free where the config says so.
        let free = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"whisper-1\"\ninput = 0\noutput = 0\naudio_per_minute = 0\n",
        );
        assert_eq!(free.cost("openai", "whisper-1", NOW, &spoken), Some(0.0));
        // Many together: the fee of each length, or unknown.
        let many = ManyRequests {
            short: Usage {
                audio_duration_ms: 120_000,
                ..Usage::default()
            },
            long: Vec::new(),
        };
        let c = book
            .cost_of_many("openai", &["whisper-1"], NOW, &many, serving)
            .expect("priced");
        assert!(close(c.usd, 0.012), "{}", c.usd);
        assert_eq!(
            book.cost_of_many("openai", &["gpt-4o-transcribe"], NOW, &many, serving),
            None
        );
        // OpenAI's cached images are discounted as its text (gpt-image-1.5:
        // image input $8, cached $2).
        let only_cached_images = Usage {
            input_tokens: 1_000_000,
            cached_input_tokens: 1_000_000,
            cached_image_input_tokens: 1_000_000,
            ..Usage::default()
        };
        let c = book
            .cost("openai", "gpt-image-1.5", NOW, &only_cached_images)
            .unwrap();
        assert!(close(c, 2.0), "{c}");
        // A batch halves them with the rest.
        let p = book.price_at("openai", "gpt-realtime-mini", NOW).unwrap();
        let batch = p.in_tier(Some(BATCH_TIER)).unwrap();
        assert!(close(batch.cost(&turn), p.cost(&turn) / 2.0));
        // Gemini reports its cache reads by modality.
        let u = crate::providers::gemini::usage_from(&serde_json::json!({
            "promptTokenCount": 1000, "candidatesTokenCount": 10,
            "cachedContentTokenCount": 800,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 100},
                {"modality": "AUDIO", "tokenCount": 900}],
            "cacheTokensDetails": [{"modality": "AUDIO", "tokenCount": 750},
                {"modality": "TEXT", "tokenCount": 50}]}))
        .unwrap();
        assert_eq!(
            (u.cached_audio_input_tokens, u.audio_input_tokens),
            (750, 150)
        );
        // Video frames count with the images.
        let u = crate::providers::gemini::usage_from(&serde_json::json!({
            "promptTokenCount": 1000, "responseTokenCount": 10,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 100},
                {"modality": "VIDEO", "tokenCount": 600}, {"modality": "IMAGE", "tokenCount": 300}]}))
        .unwrap();
        assert_eq!((u.image_input_tokens, u.output_tokens), (900, 10));
        // And its cached audio costs 10 % of its audio input rate ($1).
        let c = book
            .cost("gemini", "gemini-2.5-flash", NOW, &only_cached_audio)
            .unwrap();
        assert!(close(c, 0.10), "{c}");
    }

    /// Audio and image tokens are priced at the model's own rates for
    /// them, beside the text at `input` and `output`; those rates follow
    /// a batch's discount; an override of a catalogued model keeps the
    /// catalogue's ratios, and a model without them prices them as text.
    #[test]
    fn audio_and_image_tokens_are_priced_at_their_own_rates() {
        let book = PriceBook::builtin();
        let u = |input, audio_in, image_in, output, audio_out, image_out| Usage {
            input_tokens: input,
            audio_input_tokens: audio_in,
            image_input_tokens: image_in,
            output_tokens: output,
            audio_output_tokens: audio_out,
            image_output_tokens: image_out,
            ..Usage::default()
        };
        let cost =
            |b: &PriceBook, model: &str, x: &Usage| b.cost("openai", model, NOW, x).expect(model);
        // gpt-audio: text 2.50 / 10, audio 32 / 64.
        let c = cost(
            &book,
            "gpt-audio-2025-08-28",
            &u(1_000_000, 400_000, 0, 1_000_000, 300_000, 0),
        );
        assert!(
            close(c, 0.6 * 2.5 + 0.4 * 32.0 + 0.7 * 10.0 + 0.3 * 64.0),
            "{c}"
        );
        // gpt-image-1: text 5, image 10 in, image 40 out.
        let c = cost(
            &book,
            "gpt-image-1",
            &u(1_000_000, 0, 800_000, 1_000_000, 0, 1_000_000),
        );
        assert!(close(c, 0.2 * 5.0 + 0.8 * 10.0 + 40.0), "{c}");
        // Its successors, a dated snapshot of gpt-image-2 and ChatGPT's
        // alias: image 8 in, and 30 or 32 out.
        for (model, out) in [
            ("gpt-image-2-2026-04-21", 30.0),
            ("gpt-image-1.5", 32.0),
            ("chatgpt-image-latest", 32.0),
        ] {
            let c = cost(&book, model, &u(1_000_000, 0, 800_000, 500_000, 0, 500_000));
            assert!(close(c, 0.2 * 5.0 + 0.8 * 8.0 + 0.5 * out), "{model}: {c}");
        }
        // gpt-4o-transcribe: audio 6 in, text 2.50 in, 10 out.
        let c = cost(
            &book,
            "gpt-4o-transcribe",
            &u(1_000_000, 900_000, 0, 100_000, 0, 0),
        );
        assert!(close(c, 0.1 * 2.5 + 0.9 * 6.0 + 0.1 * 10.0), "{c}");
        // More audio than input is capped at the input.
        let c = cost(&book, "gpt-audio", &u(1_000_000, 5_000_000, 0, 0, 0, 0));
        assert!(close(c, 32.0), "{c}");
        // Gemini: audio input, and image output.
        for (model, x, want) in [
            ("gemini-2.5-flash", u(1_000_000, 1_000_000, 0, 0, 0, 0), 1.0),
            (
                "gemini-2.5-flash-image",
                u(0, 0, 0, 1_290, 0, 1_290),
                1290.0 * 30.0 / 1e6,
            ),
        ] {
            let c = book.cost("gemini", model, NOW, &x).unwrap();
            assert!(close(c, want), "{model}: {c}");
        }
        // A batch halves them with the rest.
        let p = book.price_at("openai", "gpt-audio", NOW).unwrap();
        let x = u(1_000_000, 400_000, 0, 1_000_000, 300_000, 0);
        let batch = p.in_tier(Some(BATCH_TIER)).unwrap();
        assert!(close(batch.cost(&x), p.cost(&x) / 2.0));
        // A model without modality rates: as text.
        let c = cost(&book, "gpt-4o", &u(1_000_000, 1_000_000, 0, 0, 0, 0));
        assert!(close(c, 2.5), "{c}");
        // An override keeps the catalogue's ratios (audio at 12.8 times
        // input), or gives its own.
        let half = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-audio\"\ninput = 1.25\noutput = 5\n",
        );
        let c = cost(&half, "gpt-audio", &u(1_000_000, 1_000_000, 0, 0, 0, 0));
        assert!(close(c, 16.0), "{c}");
        let own = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-audio\"\ninput = 1.25\noutput = 5\naudio_input = 20\n",
        );
        let c = cost(&own, "gpt-audio", &u(1_000_000, 1_000_000, 0, 0, 0, 0));
        assert!(close(c, 20.0), "{c}");
        // The first audio preview snapshot kept its launch price.
        let c = cost(
            &book,
            "gpt-4o-audio-preview-2024-10-01",
            &u(1_000_000, 1_000_000, 0, 0, 0, 0),
        );
        assert!(close(c, 100.0), "{c}");
        let c = cost(
            &book,
            "gpt-4o-audio-preview-2024-12-17",
            &u(1_000_000, 1_000_000, 0, 0, 0, 0),
        );
        assert!(close(c, 40.0), "{c}");
        // A model whose text is free still pays its audio and image rates.
        let free_text = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"my-transcriber\"\ninput = 0\noutput = 0\naudio_input = 6\nimage_output = 40\n",
        );
        let x = u(1_000_000, 1_000_000, 0, 1_000_000, 0, 1_000_000);
        assert!(close(cost(&free_text, "my-transcriber", &x), 46.0));
        let p = free_text.price_at("openai", "my-transcriber", NOW).unwrap();
        assert!(close(p.in_tier(Some(BATCH_TIER)).unwrap().cost(&x), 23.0));
        // Summed with others (a batch), one request's audio is priced as
        // its own: the parsers keep it beside the cache reads.
        let cached_audio = crate::providers::openai::usage_from(&serde_json::json!({
            "prompt_tokens": 1000, "completion_tokens": 0,
            "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 1000}}))
        .unwrap();
        assert_eq!(cached_audio.audio_input_tokens, 0);
    }

    /// Web searches are billed by the thousand beside the tokens, at each
    /// provider's list price (Gemini's by the model's scheme), the same in
    /// a batch and a tier; an entry's own `web_search` replaces it, and an
    /// override of a catalogued model without one keeps the catalogue's.
    #[test]
    fn web_searches_are_priced_by_the_thousand_beside_the_tokens() {
        let book = PriceBook::builtin();
        let searched = Usage {
            input_tokens: 1000,
            output_tokens: 100,
            web_searches: 3,
            ..Usage::default()
        };
        let plain = Usage {
            web_searches: 0,
            ..searched
        };
        for (provider, model, per_1k) in [
            ("anthropic", "claude-sonnet-4-5", 10.0),
            ("openai", "gpt-4.1", 10.0),
            ("gemini", "gemini-2.5-flash", 35.0),
            ("gemini", "gemini-3-pro-preview", 14.0),
        ] {
            let with = book.cost(provider, model, NOW, &searched).expect(model);
            let without = book.cost(provider, model, NOW, &plain).expect(model);
            assert!(
                close(with - without, 3.0 * per_1k / 1000.0),
                "{model}: {with} vs {without}"
            );
            let p = book.price_at(provider, model, NOW).unwrap();
            let batch = p.in_tier(Some(BATCH_TIER)).unwrap();
            assert!(
                close(
                    batch.cost(&searched) - batch.cost(&plain),
                    3.0 * per_1k / 1000.0
                ),
                "{model}: the search fee is not halved in a batch"
            );
        }
        // A regional premium or an uplift raises the tokens, not the fee.
        for serving in [
            Serving {
                uplift_percent: 10,
                ..Serving::default()
            },
            Serving {
                vertex_regional: true,
                ..Serving::default()
            },
        ] {
            let at = |u: &Usage| {
                book.cost_of_any("anthropic", &["claude-sonnet-4-5"], NOW, u, serving)
                    .expect("priced")
                    .usd
            };
            let fee = at(&searched) - at(&plain);
            assert!(close(fee, 3.0 * 10.0 / 1000.0), "{serving:?}: {fee}");
        }
        let own = book_of(
            "[[models]]\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-4-5\"\ninput = 3\noutput = 15\nweb_search = 25\n",
        );
        let p = own.price_at("anthropic", "claude-sonnet-4-5", NOW).unwrap();
        assert!(close(p.web_search, 25.0), "{p:?}");
        let kept = book_of(
            "[[models]]\nprovider = \"gemini\"\nmodel = \"gemini-2.5-flash\"\ninput = 1\noutput = 1\n",
        );
        let p = kept.price_at("gemini", "gemini-2.5-flash", NOW).unwrap();
        assert!(close(p.web_search, 35.0), "{p:?}");
        let new = book_of(
            "[[models]]\nprovider = \"gemini\"\nmodel = \"gemini-4-ultra\"\ninput = 1\noutput = 1\n",
        );
        let p = new.price_at("gemini", "gemini-4-ultra", NOW).unwrap();
        assert!(
            close(p.web_search, 14.0),
            "a later Gemini bills by the query: {p:?}"
        );
    }

    /// Searches by OpenAI's `web_search_preview` tool cost $25 per 1,000
    /// on the non-reasoning models (GPT-4o, GPT-4.1, dated or not, on
    /// OpenAI or Azure) and the `web_search` rate elsewhere; an entry's own
    /// `web_search_preview` replaces it; more preview searches than
    /// searches are capped.
    #[test]
    fn preview_searches_are_priced_by_the_model_kind() {
        let book = PriceBook::builtin();
        let u = |searches, preview| Usage {
            input_tokens: 1000,
            web_searches: searches,
            web_searches_preview: preview,
            ..Usage::default()
        };
        let fee = |b: &PriceBook, provider: &str, model: &str, x: &Usage| {
            b.cost(provider, model, NOW, x).expect(model)
                - b.cost(provider, model, NOW, &u(0, 0)).expect(model)
        };
        for (provider, model, per_1k) in [
            ("openai", "gpt-4.1", 25.0),
            ("openai", "gpt-4o-mini-2024-07-18", 25.0),
            ("azure-openai", "gpt-4o", 25.0),
            ("openai", "gpt-5", 10.0),
            ("openai", "o3", 10.0),
            ("anthropic", "claude-sonnet-4-5", 10.0),
        ] {
            let f = fee(&book, provider, model, &u(4, 4));
            assert!(close(f, 4.0 * per_1k / 1e3), "{model}: {f}");
        }
        // Two by the current tool, two by the preview one.
        let f = fee(&book, "openai", "gpt-4.1", &u(4, 2));
        assert!(close(f, (2.0 * 10.0 + 2.0 * 25.0) / 1e3), "{f}");
        let f = fee(&book, "openai", "gpt-4.1", &u(1, 9));
        assert!(close(f, 25.0 / 1e3), "capped: {f}");
        let own = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-4.1\"\ninput = 2\noutput = 8\nweb_search_preview = 30\n",
        );
        let f = fee(&own, "openai", "gpt-4.1", &u(2, 2));
        assert!(close(f, 2.0 * 30.0 / 1e3), "{f}");
        let kept = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"gpt-4.1\"\ninput = 2\noutput = 8\n",
        );
        let p = kept.price_at("openai", "gpt-4.1", NOW).unwrap();
        assert!(close(p.web_search_preview, 25.0), "{p:?}");
        // An entry's own `web_search` is the preview rate of a reasoning
        // model too; a non-reasoning one keeps $25 for the preview tool.
        let own = book_of(
            "[[models]]\nprovider = \"openai\"\nmodel = \"o3\"\ninput = 2\noutput = 8\nweb_search = 0\n\n[[models]]\nprovider = \"openai\"\nmodel = \"gpt-4o\"\ninput = 2\noutput = 8\nweb_search = 12\n",
        );
        let p = own.price_at("openai", "o3", NOW).unwrap();
        assert_eq!((p.web_search, p.web_search_preview), (0.0, 0.0));
        let p = own.price_at("openai", "gpt-4o", NOW).unwrap();
        assert_eq!((p.web_search, p.web_search_preview), (12.0, 25.0));
    }

    #[test]
    fn validation_names_the_key() {
        let base = ModelPrice {
            provider: "openai".into(),
            model: "x".into(),
            input: 1.0,
            output: 1.0,
            cached_input: None,
            cache_write: None,
            cache_write_1h: None,
            reasoning: None,
            effective: None,
            long_context: None,
            flex: None,
            priority: None,
            bedrock_regional_premium: None,
            web_search: None,
            web_search_preview: None,
            audio_input: None,
            image_input: None,
            audio_output: None,
            image_output: None,
            cached_audio_input: None,
            cached_image_input: None,
            audio_per_minute: None,
        };
        let check = |m: ModelPrice| {
            PricingConfig {
                models: vec![base.clone(), m],
            }
            .validate()
            .expect_err("invalid")
        };
        let e = check(ModelPrice {
            input: -1.0,
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].input", "{e:?}");
        let e = check(ModelPrice {
            model: "claude-opus-4-6[1m]".into(),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].model", "{e:?}");
        let e = check(ModelPrice {
            reasoning: Some(f64::NAN),
            model: "y".into(),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].reasoning", "{e:?}");
        let e = check(ModelPrice {
            cache_write: Some(f64::INFINITY),
            model: "y".into(),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].cache_write", "{e:?}");
        let e = check(ModelPrice {
            web_search: Some(-10.0),
            model: "y".into(),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].web_search", "{e:?}");
        assert!(e.1.contains("per 1,000 searches"), "{e:?}");
        let e = check(ModelPrice {
            audio_output: Some(f64::NAN),
            model: "y".into(),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].audio_output", "{e:?}");
        for bad in ["2025-13-01", "2025-02-30", "25-01-01", "2025/01/01", "x"] {
            let e = check(ModelPrice {
                effective: Some(bad.into()),
                model: "y".into(),
                ..base.clone()
            });
            assert_eq!(e.0, "pricing.models[1].effective", "{bad}: {e:?}");
        }
        let e = check(ModelPrice {
            model: "y".into(),
            priority: Some(TierPrice {
                input: 1.0,
                output: 1.0,
                cached_input: Some(-0.5),
                cache_write: None,
                cache_write_1h: None,
                reasoning: None,
            }),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].priority.cached_input", "{e:?}");
        let e = check(ModelPrice {
            model: "y".into(),
            bedrock_regional_premium: Some(-0.1),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].bedrock_regional_premium", "{e:?}");
        let e = check(ModelPrice {
            model: "y".into(),
            bedrock_regional_premium: Some(0.1),
            ..base.clone()
        });
        assert_eq!(
            e.0, "pricing.models[1].bedrock_regional_premium",
            "an openai entry: {e:?}"
        );
        let e = check(ModelPrice {
            provider: "mistral".into(),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].provider", "{e:?}");
        let e = check(base.clone());
        assert_eq!(e.0, "pricing.models[1].model", "duplicate: {e:?}");
        let e = check(ModelPrice {
            model: " ".into(),
            ..base.clone()
        });
        assert_eq!(e.0, "pricing.models[1].model", "{e:?}");
        assert!(
            toml::from_str::<PricingConfig>(
                "[[models]]\nprovider=\"openai\"\nmodel=\"x\"\ninput=1\noutput=1\nimput=2\n"
            )
            .is_err(),
            "unknown keys are rejected"
        );
    }

    fn arb_usage() -> impl Strategy<Value = Usage> {
        // Prompts on both sides of the catalogue's 200k long-context
        // thresholds, not only the huge ones a uniform draw gives.
        (prop_oneof![0u64..1 << 30, 0u64..400_000], 0u64..1 << 30)
            .prop_flat_map(|(input, output)| {
                (
                    Just(input),
                    0..=input,
                    Just(output),
                    0..=output,
                    0u64..=u64::MAX,
                )
            })
            .prop_map(|(input, cached, output, reasoning, w)| {
                let write = if input == cached {
                    0
                } else {
                    w % (input - cached + 1)
                };
                Usage {
                    input_tokens: input,
                    cached_input_tokens: cached,
                    cache_write_input_tokens: write,
                    output_tokens: output,
                    reasoning_tokens: reasoning,
                    cache_write_1h_input_tokens: write / 2,
                    web_searches: 0,
                    web_searches_preview: 0,
                    audio_input_tokens: 0,
                    image_input_tokens: 0,
                    audio_output_tokens: 0,
                    image_output_tokens: 0,
                    cached_audio_input_tokens: 0,
                    cached_image_input_tokens: 0,
                    audio_duration_ms: 0,
                }
            })
    }

    fn arb_price() -> impl Strategy<Value = Price> {
        let p = || 0.0f64..1000.0;
        (p(), p(), p(), p(), p(), p()).prop_map(|(i, c, w, h, o, r)| Price {
            effective_ms: 0,
            input: i,
            cached_input: c,
            cache_write: w,
            cache_write_1h: h,
            output: o,
            reasoning: r,
            long: None,
            tiers: [None, None],
            bedrock_regional: 1.0,
            vertex_regional: 1.0,
            configured: false,
            web_search: 0.0,
            web_search_preview: 0.0,
            modal: [ModalRate::Times(1.0); 4],
            cached_modal: [ModalRate::Times(1.0); 2],
            audio_per_minute: None,
        })
    }

    fn add(a: &Usage, b: &Usage) -> Usage {
        Usage {
            input_tokens: a.input_tokens + b.input_tokens,
            output_tokens: a.output_tokens + b.output_tokens,
            cached_input_tokens: a.cached_input_tokens + b.cached_input_tokens,
            cache_write_input_tokens: a.cache_write_input_tokens + b.cache_write_input_tokens,
            reasoning_tokens: a.reasoning_tokens + b.reasoning_tokens,
            cache_write_1h_input_tokens: a.cache_write_1h_input_tokens
                + b.cache_write_1h_input_tokens,
            web_searches: 0,
            web_searches_preview: 0,
            audio_input_tokens: 0,
            image_input_tokens: 0,
            audio_output_tokens: 0,
            image_output_tokens: 0,
            cached_audio_input_tokens: 0,
            cached_image_input_tokens: 0,
            audio_duration_ms: 0,
        }
    }

    proptest! {
        #[test]
        fn cost_is_never_negative(
            p in arb_price(),
            raw in proptest::array::uniform5(0u64..1 << 40),
        ) {
            // Any counts at all, consistent or not.
            let u = usage(raw[0], raw[1], raw[2], raw[3], raw[4]);
            let c = p.cost(&u);
            prop_assert!(c >= 0.0 && c.is_finite(), "{c}");
        }

        #[test]
        fn cost_is_monotone_in_every_token_kind(
            p in arb_price(),
            u in arb_usage(),
            k in 1u64..1 << 20,
        ) {
            let base = p.cost(&u);
            // k more tokens of one kind (a subset kind also grows its total).
            let more = [
                usage(k, 0, 0, 0, 0),
                usage(k, k, 0, 0, 0),
                usage(k, 0, k, 0, 0),
                usage(0, 0, 0, k, 0),
                usage(0, 0, 0, k, k),
            ];
            for d in more {
                let after = p.cost(&add(&u, &d));
                prop_assert!(after >= base, "{d:?}: {after} < {base}");
            }
        }

        #[test]
        fn cost_is_additive(p in arb_price(), a in arb_usage(), b in arb_usage()) {
            let (ca, cb, cab) = (p.cost(&a), p.cost(&b), p.cost(&add(&a, &b)));
            prop_assert!(close(cab, ca + cb), "{cab} != {ca} + {cb}");
        }

        /// Two requests cost what their sum costs, as long as all three
        /// are priced at the same tier. A long-context tier prices a whole
        /// request at its rates once the prompt passes the threshold, so a
        /// sum that crosses it costs more than its parts, never less.
        #[test]
        fn catalogue_costs_are_additive_within_a_tier(a in arb_usage(), b in arb_usage()) {
            let book = PriceBook::builtin();
            for (pr, m) in [
                ("anthropic", "claude-opus-4-5"),
                ("openai", "gpt-5"),
                ("gemini", "gemini-2.5-pro"),
                ("anthropic", "claude-sonnet-4-5"),
            ] {
                let c = |u: &Usage| book.cost(pr, m, NOW, u).expect("priced");
                let sum = add(&a, &b);
                let (cab, ca, cb) = (c(&sum), c(&a), c(&b));
                let tier = |u: &Usage| {
                    book.price_at(pr, m, NOW)
                        .and_then(|p| p.long)
                        .is_some_and(|l| u.input_tokens > l.above)
                };
                if tier(&a) == tier(&sum) && tier(&b) == tier(&sum) {
                    prop_assert!(close(cab, ca + cb), "{m}: {cab} != {ca} + {cb}");
                } else {
                    prop_assert!(cab >= ca + cb, "{m}: crossing the tier: {cab} < {ca} + {cb}");
                }
            }
        }

        #[test]
        fn resolution_never_panics(s in "\\PC{0,40}") {
            let book = PriceBook::builtin();
            let _ = book.cost("openai", &s, NOW, &Usage::default());
            let _ = book.cost("bedrock", &s, NOW, &Usage::default());
        }
    }
}
