//! One span per request (`[export.otlp] traces = true`): a `CLIENT` span
//! with the GenAI span attributes of the generation in force, timed as the
//! request was.
//!
//! Must never: carry prompt or completion content (records have none).

use std::time::{Duration, UNIX_EPOCH};

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};

use super::config::Semconv;
use super::semconv as sc;
use crate::meter::UsageRecord;

/// One `CLIENT` span per request, with the GenAI span attributes of the
/// generation in force. Never prompt or completion content (records have
/// none).
pub(crate) struct SpanMaker {
    pub(crate) tracer: opentelemetry_sdk::trace::SdkTracer,
    pub(crate) semconv: Semconv,
    pub(crate) high_cardinality: bool,
}

impl SpanMaker {
    pub(crate) fn span(&self, rec: &UsageRecord) {
        let (op, _) = sc::operation(&rec.operation);
        let name = match rec.model.as_deref() {
            Some(m) if !m.is_empty() => format!("{op} {m}"),
            _ => op.into_owned(),
        };
        let mut attrs = sc::request_attributes(rec, false);
        let who = &rec.who;
        if who.pid != 0 {
            attrs.push(KeyValue::new(sc::PROCESS_PID, i64::from(who.pid)));
        }
        for (k, v) in [
            (sc::CICD_PIPELINE_RUN_ID, &who.run_id),
            (sc::CICD_PIPELINE_TASK_RUN_ID, &who.job_id),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                attrs.push(KeyValue::new(k, v.to_string()));
            }
        }
        if self.high_cardinality
            && let Some(c) = who.cmdline.as_deref().filter(|c| !c.is_empty())
        {
            attrs.push(KeyValue::new(sc::PROCESS_COMMAND_LINE, c.to_string()));
        }
        let u = &rec.usage;
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        attrs.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            int(u.input_tokens),
        ));
        attrs.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            int(u.output_tokens),
        ));
        if u.cached_input_tokens > 0 {
            attrs.push(KeyValue::new(
                "gen_ai.usage.cache_read.input_tokens",
                int(u.cached_input_tokens),
            ));
        }
        if u.cache_write_input_tokens > 0 {
            let key = match self.semconv {
                Semconv::Default => "gen_ai.usage.cache_creation.input_tokens",
                Semconv::LatestExperimental => "gen_ai.usage.cache_write.input_tokens",
            };
            attrs.push(KeyValue::new(key, int(u.cache_write_input_tokens)));
        }
        if self.semconv == Semconv::LatestExperimental {
            if u.reasoning_tokens > 0 {
                attrs.push(KeyValue::new(
                    "gen_ai.usage.reasoning.output_tokens",
                    int(u.reasoning_tokens),
                ));
            }
            attrs.push(KeyValue::new("gen_ai.request.stream", rec.streaming));
            if rec.streaming
                && let Some(t) = rec.ttfb_ms
            {
                attrs.push(KeyValue::new(
                    "gen_ai.response.time_to_first_chunk",
                    t as f64 / 1000.0,
                ));
            }
        }
        if u.web_searches > 0 {
            attrs.push(KeyValue::new("tollgate.web_searches", int(u.web_searches)));
        }
        if let Some(c) = rec.cost_usd {
            attrs.push(KeyValue::new("tollgate.cost_usd", c));
        }
        let error = sc::error_type(rec);
        if let Some(e) = &error {
            attrs.push(KeyValue::new(sc::ERROR_TYPE, e.to_string()));
        }
        let start =
            UNIX_EPOCH + Duration::from_millis(u64::try_from(rec.started_at_ms).unwrap_or(0));
        let end = start + Duration::from_millis(rec.duration_ms);
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attrs)
            .start(&self.tracer);
        if let Some(e) = error {
            span.set_status(Status::error(e.into_owned()));
        }
        span.end_with_timestamp(end);
    }
}
