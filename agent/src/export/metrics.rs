//! The metric instruments, and what one usage record adds to them.
//!
//! Owns: instrument names, units, kinds and bucket boundaries (see
//! `semconv` for the names), and the agent-health observables. Runs on the
//! metrics worker thread, never on the request path.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{AsyncInstrumentBuilder, Counter, Histogram, Meter};

use super::config::Semconv;
use super::pipeline::Shared;
use super::semconv::{self as sc, OpClass};
use super::{HealthFn, HealthSnapshot};
use crate::meter::UsageRecord;

/// The instruments of one semantic-conventions generation plus tollgate's.
pub(crate) struct Instruments {
    generation: Generation,
    high_cardinality: bool,
    cost: Counter<f64>,
    requests: Counter<u64>,
    web_searches: Counter<u64>,
    watch: Option<Mutex<CardinalityWatch>>,
}

/// Counts the attribute sets the request metrics have seen, under
/// cumulative temporality (where the SDK keeps every set until the agent
/// restarts), and warns once when the next new set would pass the limit:
/// from then on new jobs' measurements go to the `otel.metric.overflow`
/// series, and the backend can no longer tell them apart.
pub(crate) struct CardinalityWatch {
    /// Hashes of the sets seen, at most `sets` of them.
    seen: std::collections::HashSet<u64>,
    /// Sets that fit: the limit over the series one set makes in the
    /// instrument that makes most (`gen_ai.token.type` input and output).
    sets: usize,
    limit: usize,
    warned: bool,
}

impl CardinalityWatch {
    pub(crate) fn new(limit: usize, semconv: Semconv) -> Self {
        let per_set = match semconv {
            Semconv::Default => 2,
            Semconv::LatestExperimental => 1,
        };
        CardinalityWatch {
            seen: Default::default(),
            sets: (limit / per_set).max(1),
            limit,
            warned: false,
        }
    }

    /// Notes one measurement's attribute set; true the first time a set
    /// did not fit.
    fn note(&mut self, attrs: &[KeyValue]) -> bool {
        use std::hash::{Hash, Hasher};
        if self.warned {
            return false;
        }
        let mut h = std::hash::DefaultHasher::new();
        for kv in attrs {
            kv.key.as_str().hash(&mut h);
            kv.value.as_str().hash(&mut h);
        }
        let h = h.finish();
        if self.seen.contains(&h) || self.seen.len() < self.sets {
            self.seen.insert(h);
            return false;
        }
        self.warned = true;
        true
    }
}

enum Generation {
    Default {
        token_usage: Histogram<u64>,
        duration: Histogram<f64>,
        ttfc: Histogram<f64>,
    },
    Latest {
        inference_duration: Histogram<f64>,
        inference_ttfc: Histogram<f64>,
        embeddings_duration: Histogram<f64>,
        other_duration: Histogram<f64>,
        usage_input: Counter<u64>,
        usage_output: Counter<u64>,
        usage_cache_read: Counter<u64>,
        usage_cache_write: Counter<u64>,
        usage_reasoning: Counter<u64>,
        op_input: Histogram<u64>,
        op_output: Histogram<u64>,
        embeddings_input: Histogram<u64>,
    },
}

fn duration(meter: &Meter, name: &'static str, description: &'static str) -> Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(sc::DURATION_BUCKETS.to_vec())
        .build()
}

fn tokens(meter: &Meter, name: &'static str, description: &'static str) -> Histogram<u64> {
    meter
        .u64_histogram(name)
        .with_unit("{token}")
        .with_description(description)
        .with_boundaries(sc::TOKEN_BUCKETS.to_vec())
        .build()
}

fn token_counter(meter: &Meter, name: &'static str, description: &'static str) -> Counter<u64> {
    meter
        .u64_counter(name)
        .with_unit("{token}")
        .with_description(description)
        .build()
}

impl Instruments {
    pub(crate) fn new(
        meter: &Meter,
        semconv: Semconv,
        high_cardinality: bool,
        watch: Option<CardinalityWatch>,
    ) -> Instruments {
        let generation = match semconv {
            Semconv::Default => Generation::Default {
                token_usage: tokens(
                    meter,
                    sc::M_TOKEN_USAGE,
                    "Number of input and output tokens used.",
                ),
                duration: duration(meter, sc::M_OPERATION_DURATION, "GenAI operation duration."),
                ttfc: duration(
                    meter,
                    sc::M_TIME_TO_FIRST_CHUNK,
                    "Time to receive the first chunk of a streamed response.",
                ),
            },
            Semconv::LatestExperimental => Generation::Latest {
                inference_duration: duration(
                    meter,
                    sc::M_INFERENCE_DURATION,
                    "GenAI client inference operation duration.",
                ),
                inference_ttfc: duration(
                    meter,
                    sc::M_INFERENCE_TTFC,
                    "Time to receive the first chunk of a streamed response.",
                ),
                embeddings_duration: duration(
                    meter,
                    sc::M_EMBEDDINGS_DURATION,
                    "GenAI client embeddings operation duration.",
                ),
                other_duration: duration(
                    meter,
                    sc::M_OPERATION_DURATION,
                    "GenAI operation duration.",
                ),
                usage_input: token_counter(
                    meter,
                    sc::M_USAGE_INPUT,
                    "Input tokens used, including cached tokens.",
                ),
                usage_output: token_counter(
                    meter,
                    sc::M_USAGE_OUTPUT,
                    "Output tokens used, including reasoning tokens.",
                ),
                usage_cache_read: token_counter(
                    meter,
                    sc::M_USAGE_CACHE_READ,
                    "Input tokens served from a provider-managed cache.",
                ),
                usage_cache_write: token_counter(
                    meter,
                    sc::M_USAGE_CACHE_WRITE,
                    "Input tokens written to a provider-managed cache.",
                ),
                usage_reasoning: token_counter(
                    meter,
                    sc::M_USAGE_REASONING,
                    "Output tokens used for reasoning.",
                ),
                op_input: tokens(
                    meter,
                    sc::M_OP_INPUT_TOKENS,
                    "Input tokens used per inference operation.",
                ),
                op_output: tokens(
                    meter,
                    sc::M_OP_OUTPUT_TOKENS,
                    "Output tokens used per inference operation.",
                ),
                embeddings_input: tokens(
                    meter,
                    sc::M_EMBEDDINGS_INPUT_TOKENS,
                    "Input tokens used per embeddings operation.",
                ),
            },
        };
        Instruments {
            generation,
            high_cardinality,
            cost: meter
                .f64_counter(sc::M_COST)
                .with_unit("USD")
                .with_description("Cost of the requests in US dollars, where the price is known.")
                .build(),
            requests: meter
                .u64_counter(sc::M_REQUESTS)
                .with_unit("{request}")
                .with_description("Requests to LLM providers that tollgate metered.")
                .build(),
            web_searches: meter
                .u64_counter(sc::M_WEB_SEARCHES)
                .with_unit("{search}")
                .with_description(
                    "Web searches the providers ran for the requests and bill by the thousand.",
                )
                .build(),
            watch: watch.map(Mutex::new),
        }
    }

    /// Adds one record to the instruments.
    pub(crate) fn record(&self, rec: &UsageRecord) {
        let attrs = sc::request_attributes(rec, self.high_cardinality);
        let (_, class) = sc::operation(&rec.operation);
        let error = sc::error_type(rec).map(|e| KeyValue::new(sc::ERROR_TYPE, e.into_owned()));
        let with_error = match &error {
            Some(e) => sc::with(&attrs, e.clone()),
            None => attrs.clone(),
        };
        let full = self.watch.as_ref().and_then(|w| {
            let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
            w.note(&attrs).then_some(w.limit)
        });
        if let Some(limit) = full {
            tracing::warn!(
                limit,
                high_cardinality = self.high_cardinality,
                "the request metrics have as many attribute sets (jobs, repositories, models{}) as export.otlp.cardinality_limit lets a metric keep under cumulative temporality: new ones are exported as otel.metric.overflow=true until the agent restarts; raise the limit, set export.otlp.temporality = \"delta\"{}",
                if self.high_cardinality {
                    ", processes, runs"
                } else {
                    ""
                },
                if self.high_cardinality {
                    ", or turn include_high_cardinality off"
                } else {
                    ""
                },
            );
        }
        let seconds = rec.duration_ms as f64 / 1000.0;
        let ttfc = rec
            .ttfb_ms
            .filter(|_| rec.streaming)
            .map(|ms| ms as f64 / 1000.0);
        let u = &rec.usage;
        let any_tokens = u.input_tokens > 0 || u.output_tokens > 0;
        // Token counts exist for operations that carry usage, and for any
        // other operation that reported some (never invented for a batch
        // submission or an upload).
        // A success whose counts are unknown (no usage came and nothing
        // could be estimated: `usage_missing`, an undecodable answer) has
        // none: the conventions say not to report usage then, and zeros
        // would pull every percentile down.
        let unknown = !any_tokens
            && !rec.estimated
            && rec
                .error
                .as_deref()
                .is_some_and(|e| sc::METERING_ONLY.contains(&e));
        let has_usage = match class {
            OpClass::Inference | OpClass::Embeddings => (error.is_none() && !unknown) || any_tokens,
            OpClass::Other => any_tokens,
        };

        match &self.generation {
            Generation::Default {
                token_usage,
                duration,
                ttfc: ttfc_h,
            } => {
                duration.record(seconds, &with_error);
                if let Some(t) = ttfc {
                    ttfc_h.record(t, &attrs);
                }
                if has_usage {
                    token_usage.record(
                        u.input_tokens,
                        &sc::with(&attrs, KeyValue::new(sc::GEN_AI_TOKEN_TYPE, "input")),
                    );
                    if class != OpClass::Embeddings {
                        token_usage.record(
                            u.output_tokens,
                            &sc::with(&attrs, KeyValue::new(sc::GEN_AI_TOKEN_TYPE, "output")),
                        );
                    }
                }
            }
            Generation::Latest {
                inference_duration,
                inference_ttfc,
                embeddings_duration,
                other_duration,
                usage_input,
                usage_output,
                usage_cache_read,
                usage_cache_write,
                usage_reasoning,
                op_input,
                op_output,
                embeddings_input,
            } => {
                match class {
                    OpClass::Inference => {
                        inference_duration.record(seconds, &with_error);
                        if let Some(t) = ttfc {
                            inference_ttfc.record(t, &attrs);
                        }
                    }
                    OpClass::Embeddings => embeddings_duration.record(seconds, &with_error),
                    OpClass::Other => other_duration.record(seconds, &with_error),
                }
                match class {
                    OpClass::Embeddings if has_usage => {
                        embeddings_input.record(u.input_tokens, &attrs);
                    }
                    // The conventions ask for every inference operation,
                    // failed ones included (0 when no usage arrived).
                    OpClass::Inference | OpClass::Other
                        if class == OpClass::Inference || any_tokens =>
                    {
                        // The audio and image parts the provider split
                        // out; the rest is of no known modality (text,
                        // mostly, but a provider that does not split
                        // may count images in it).
                        let modality = |m: &'static str| {
                            sc::with(&attrs, KeyValue::new(sc::GEN_AI_TOKEN_MODALITY, m))
                        };
                        let m = modality("unknown");
                        let [audio_in, image_in, audio_out, image_out] = u.media();
                        // The cache reads' audio and images are the
                        // input's as well.
                        let [cached_audio, cached_image] = u.cached_media();
                        let (audio_in, image_in) =
                            (audio_in + cached_audio, image_in + cached_image);
                        usage_input.add(u.input_tokens - audio_in - image_in, &m);
                        usage_output.add(u.output_tokens - audio_out - image_out, &m);
                        usage_cache_read
                            .add(u.cached_input_tokens - cached_audio - cached_image, &m);
                        for (counter, n, kind) in [
                            (usage_input, audio_in, "audio"),
                            (usage_input, image_in, "image"),
                            (usage_output, audio_out, "audio"),
                            (usage_output, image_out, "image"),
                            (usage_cache_read, cached_audio, "audio"),
                            (usage_cache_read, cached_image, "image"),
                        ] {
                            if n > 0 {
                                counter.add(n, &modality(kind));
                            }
                        }
                        usage_cache_write.add(u.cache_write_input_tokens, &m);
                        usage_reasoning.add(u.reasoning_tokens, &m);
                        op_input.record(u.input_tokens, &with_error);
                        op_output.record(u.output_tokens, &with_error);
                    }
                    _ => {}
                }
            }
        }

        self.requests.add(1, &with_error);
        if rec.usage.web_searches > 0 {
            self.web_searches.add(rec.usage.web_searches, &attrs);
        }
        if let Some(c) = rec.cost_usd.filter(|c| c.is_finite() && *c >= 0.0) {
            self.cost.add(c, &attrs);
        }
    }
}

/// One health figure: instrument name, unit, description, and where its
/// value is in a [`HealthSnapshot`].
type HealthFigure = (
    &'static str,
    &'static str,
    &'static str,
    fn(&HealthSnapshot) -> u64,
);

/// Health counters (monotonic).
const HEALTH_COUNTERS: [HealthFigure; 12] = [
    (
        sc::M_CONN_INTERCEPTED,
        "{connection}",
        "Provider connections terminated and metered.",
        |h| h.connections_intercepted,
    ),
    (
        sc::M_CONN_PASSTHROUGH,
        "{connection}",
        "Redirected connections passed through untouched.",
        |h| h.connections_passthrough,
    ),
    (
        sc::M_CONN_REFUSED,
        "{connection}",
        "Connections closed because no origin record existed.",
        |h| h.connections_refused,
    ),
    (
        sc::M_CONN_OTHER_NETNS,
        "{connection}",
        "Provider connects from another network namespace, left untouched (not metered).",
        |h| h.connections_other_netns,
    ),
    (
        sc::M_CONN_UDP_REFUSED,
        "{connection}",
        "UDP to provider addresses refused (QUIC falls back to TCP).",
        |h| h.connections_udp_refused,
    ),
    (
        sc::M_LEDGER_RECORDS,
        "{record}",
        "Usage records written to the ledger.",
        |h| h.ledger_written,
    ),
    (
        sc::M_LEDGER_ERRORS,
        "{error}",
        "Failed ledger write attempts (each retried).",
        |h| h.ledger_errors,
    ),
    (
        sc::M_LEDGER_DROPPED,
        "{record}",
        "Usage records not written to the ledger: its backlog was full during an outage, or they arrived after shutdown began.",
        |h| h.ledger_dropped,
    ),
    (
        sc::M_BODIES_TOO_LONG,
        "{request}",
        "Request bodies longer than proxy.max_request_body, forwarded unparsed (model and usage from the response).",
        |h| h.bodies_too_long,
    ),
    (
        sc::M_BODIES_OVER_BUDGET,
        "{request}",
        "Request bodies forwarded unparsed because proxy.max_buffered_request_bytes was held (model and usage from the response).",
        |h| h.bodies_over_budget,
    ),
    (
        sc::M_RESPONSES_OVER_BUDGET,
        "{response}",
        "JSON answers not read for their usage because proxy.max_buffered_response_bytes was held (their records are estimated).",
        |h| h.responses_over_budget,
    ),
    (
        sc::M_BODIES_STALLED,
        "{request}",
        "Request bodies that paused longer than proxy.request_body_stall_secs, forwarded unparsed as they arrived.",
        |h| h.bodies_stalled,
    ),
];

/// Health gauges (current values).
const HEALTH_GAUGES: [HealthFigure; 3] = [
    (
        sc::M_LEDGER_QUEUED,
        "{record}",
        "Usage records accepted but not yet written to the ledger.",
        |h| h.ledger_queued,
    ),
    (
        sc::M_BACKGROUND_WAITING,
        "{request}",
        "Background responses whose record waits for a retrieval that shows their result.",
        |h| h.background_waiting,
    ),
    (
        sc::M_UP,
        "1",
        "1 while the agent runs and intercepts.",
        |h| u64::from(h.up),
    ),
];

// `HealthCache` keeps one bit per health figure in a u64.
const _: () = assert!(HEALTH_COUNTERS.len() + HEALTH_GAUGES.len() <= 64);

/// How long one health snapshot may serve the instruments' callbacks, at
/// most (see `HealthCache`).
const HEALTH_SNAPSHOT_TTL: Duration = Duration::from_millis(200);

/// One health read per collection. The SDK calls every observable's
/// callback in turn at each collection (there is no batch callback), and a
/// snapshot costs a bpf syscall per kernel counter. The first figure asked
/// for takes a snapshot and the other figures reuse it; a figure asked for
/// again means a new collection, which takes a fresh one. So a snapshot
/// never outlives its collection: the last export at shutdown, which can
/// come right after a periodic one, reports the counters as they are then.
/// `ttl` bounds a snapshot's age besides, should a collection skip a figure.
struct HealthCache {
    health: HealthFn,
    ttl: Duration,
    /// The snapshot, when it was taken, and a bit per figure served from it.
    last: Mutex<Option<(HealthSnapshot, Instant, u64)>>,
}

impl HealthCache {
    fn new(health: HealthFn, ttl: Duration) -> Arc<HealthCache> {
        Arc::new(HealthCache {
            health,
            ttl,
            last: Mutex::new(None),
        })
    }

    /// The snapshot for `figure` (an index into the counters, then the
    /// gauges) in the current collection.
    fn read(&self, figure: usize) -> HealthSnapshot {
        let bit = 1u64 << figure;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((snap, at, served)) = last.as_mut()
            && *served & bit == 0
            && at.elapsed() < self.ttl
        {
            *served |= bit;
            return *snap;
        }
        let snap = (self.health)();
        *last = Some((snap, Instant::now(), bit));
        snap
    }
}

/// Unit, description and callback of one health figure, whatever the kind
/// of instrument `b` builds.
fn observing<'a, I>(
    b: AsyncInstrumentBuilder<'a, I, u64>,
    (_, unit, description, value): HealthFigure,
    health: &Arc<HealthCache>,
    figure: usize,
) -> AsyncInstrumentBuilder<'a, I, u64> {
    let h = health.clone();
    b.with_unit(unit)
        .with_description(description)
        .with_callback(move |o| o.observe(value(&h.read(figure)), &[]))
}

/// Registers the observable instruments of agent health. The callbacks run
/// on the SDK's reader thread at each collection, every `interval`.
pub(crate) fn register_health(
    meter: &Meter,
    health: HealthFn,
    shared: Arc<Shared>,
    interval: Duration,
) {
    let health = HealthCache::new(health, HEALTH_SNAPSHOT_TTL.min(interval / 2));
    for (i, f) in HEALTH_COUNTERS.into_iter().enumerate() {
        let _ = observing(meter.u64_observable_counter(f.0), f, &health, i).build();
    }
    let n = HEALTH_COUNTERS.len();
    for (i, f) in HEALTH_GAUGES.into_iter().enumerate() {
        let _ = observing(meter.u64_observable_gauge(f.0), f, &health, n + i).build();
    }
    let _ = meter
        .u64_observable_counter(sc::M_EXPORT_DROPPED)
        .with_unit("{record}")
        .with_description("Usage records an export pipeline dropped because its queue was full.")
        .with_callback(move |o| {
            for (name, n) in [
                ("metrics", &shared.metrics_dropped),
                ("audit_log", &shared.audit_dropped),
            ] {
                o.observe(
                    n.load(Ordering::Relaxed),
                    &[KeyValue::new(sc::TOLLGATE_EXPORT_PIPELINE, name)],
                );
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn the_cardinality_watch_speaks_once_when_a_set_does_not_fit() {
        let set = |job: &str, error: Option<&str>| {
            let mut v = vec![KeyValue::new("cicd.pipeline.task.name", job.to_string())];
            if let Some(e) = error {
                v.push(KeyValue::new("error.type", e.to_string()));
            }
            v
        };
        // Default generation: two series (input, output) per set.
        let mut w = CardinalityWatch::new(6, Semconv::Default);
        assert!(!w.note(&set("a", None)));
        assert!(!w.note(&set("b", None)));
        assert!(!w.note(&set("b", Some("timeout"))));
        // Sets already seen never count again.
        for _ in 0..10 {
            assert!(!w.note(&set("a", None)));
        }
        assert!(w.note(&set("c", None)), "the fourth set does not fit");
        assert!(!w.note(&set("d", None)), "said once");
        let mut latest = CardinalityWatch::new(2, Semconv::LatestExperimental);
        assert!(!latest.note(&set("a", None)));
        assert!(!latest.note(&set("b", None)));
        assert!(latest.note(&set("c", None)));
    }

    /// A health function that counts its calls and reports the count.
    fn counting() -> (HealthFn, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let f: HealthFn = Arc::new(move || HealthSnapshot {
            ledger_written: c.fetch_add(1, Ordering::SeqCst) + 1,
            ..HealthSnapshot::default()
        });
        (f, calls)
    }

    #[test]
    fn one_health_read_serves_every_instrument_of_a_collection() {
        let (f, calls) = counting();
        let h = HealthCache::new(f, Duration::from_secs(3600));
        let seen: Vec<u64> = (0..9).map(|i| h.read(i).ledger_written).collect();
        assert_eq!(seen, vec![1; 9]);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The next collection, however soon, reads again.
        let seen: Vec<u64> = (0..9).rev().map(|i| h.read(i).ledger_written).collect();
        assert_eq!(seen, vec![2; 9]);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    use opentelemetry_sdk::metrics::ManualReader;
    use opentelemetry_sdk::metrics::reader::MetricReader;

    /// A manual reader the test keeps a handle of while the provider owns
    /// it.
    #[derive(Debug, Clone)]
    struct Shared(Arc<ManualReader>);

    impl MetricReader for Shared {
        fn register_pipeline(&self, p: std::sync::Weak<opentelemetry_sdk::metrics::Pipeline>) {
            self.0.register_pipeline(p)
        }
        fn collect(
            &self,
            rm: &mut opentelemetry_sdk::metrics::data::ResourceMetrics,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.collect(rm)
        }
        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.force_flush()
        }
        fn shutdown_with_timeout(&self, t: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.shutdown_with_timeout(t)
        }
        fn temporality(
            &self,
            k: opentelemetry_sdk::metrics::InstrumentKind,
        ) -> opentelemetry_sdk::metrics::Temporality {
            self.0.temporality(k)
        }
    }

    /// A meter provider read by hand, and its reader.
    fn read_by_hand() -> (opentelemetry_sdk::metrics::SdkMeterProvider, Shared) {
        let reader = Shared(Arc::new(ManualReader::builder().build()));
        let mp = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        (mp, reader)
    }

    /// Under the newer conventions, the usage counters split the audio
    /// and image tokens a provider reported from the rest, by
    /// `gen_ai.token.modality`.
    #[test]
    fn usage_counters_split_audio_and_image_tokens_by_modality() {
        use opentelemetry::metrics::MeterProvider as _;
        use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
        let (mp, reader) = read_by_hand();
        let i = Instruments::new(&mp.meter("t"), Semconv::LatestExperimental, false, None);
        let mut rec = UsageRecord {
            operation: "chat".into(),
            status: 200,
            ..UsageRecord::default()
        };
        rec.usage.input_tokens = 1120;
        rec.usage.audio_input_tokens = 100;
        rec.usage.output_tokens = 300;
        rec.usage.image_output_tokens = 250;
        // A Realtime turn's cache reads: audio, mostly.
        rec.usage.cached_input_tokens = 1000;
        rec.usage.cached_audio_input_tokens = 900;
        i.record(&rec);
        let mut rm = ResourceMetrics::default();
        reader.collect(&mut rm).expect("collect");
        let mut got = Vec::new();
        for m in rm.scope_metrics().flat_map(|s| s.metrics()) {
            if let AggregatedMetrics::U64(MetricData::Sum(sum)) = m.data()
                && m.name().starts_with("gen_ai.client.inference.usage.")
            {
                for p in sum.data_points() {
                    let modality = p
                        .attributes()
                        .find(|kv| kv.key.as_str() == sc::GEN_AI_TOKEN_MODALITY)
                        .map(|kv| kv.value.to_string());
                    if p.value() > 0 {
                        got.push((
                            m.name().to_string(),
                            modality.unwrap_or_default(),
                            p.value(),
                        ));
                    }
                }
            }
        }
        got.sort();
        let want = |n: &str, m: &str, v: u64| {
            (
                format!("gen_ai.client.inference.usage.{n}"),
                m.to_string(),
                v,
            )
        };
        assert_eq!(
            got,
            [
                want("cache_read.input_tokens", "audio", 900),
                want("cache_read.input_tokens", "unknown", 100),
                want("input_tokens", "audio", 1000),
                want("input_tokens", "unknown", 120),
                want("output_tokens", "image", 250),
                want("output_tokens", "unknown", 50),
            ]
        );
    }

    #[test]
    fn a_collection_reads_health_once_and_reports_every_figure() {
        use opentelemetry::metrics::MeterProvider as _;
        use opentelemetry_sdk::metrics::data::ResourceMetrics;

        let (mp, reader) = read_by_hand();
        let (f, calls) = counting();
        register_health(&mp.meter("t"), f, Arc::default(), Duration::from_secs(60));
        let mut rm = ResourceMetrics::default();
        reader.collect(&mut rm).expect("collect");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one health read per collection"
        );
        // A collection right after the last (as at shutdown) sees fresh
        // figures, not the previous collection's snapshot.
        let mut again = ResourceMetrics::default();
        reader.collect(&mut again).expect("collect");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a fresh read");
        let names: Vec<&str> = rm
            .scope_metrics()
            .flat_map(|s| s.metrics())
            .map(|m| m.name())
            .collect();
        for (name, ..) in HEALTH_COUNTERS.iter().chain(HEALTH_GAUGES.iter()) {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
    }

    #[test]
    fn a_stale_health_snapshot_is_read_again() {
        let (f, calls) = counting();
        let h = HealthCache::new(f, Duration::ZERO);
        assert_eq!(h.read(0).ledger_written, 1);
        assert_eq!(h.read(1).ledger_written, 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
