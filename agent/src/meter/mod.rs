//! Metering: turns what a provider adapter read into a usage record.
//!
//! Owns: the usage record and its token kinds. Must never: block the data
//! path (records leave through the ledger's bounded channel).

use std::sync::Arc;

pub mod bpe;
pub mod estimate;
pub mod pricing;
pub mod record;

pub use record::{Attribution, Usage, UsageRecord};

/// Where finished records go (the ledger writer, the exporters, the live
/// view). `submit` must not block or await I/O: it is called on the data
/// path. Sinks share one record (no copy per sink).
pub trait RecordSink: Send + Sync {
    fn submit(&self, rec: Arc<UsageRecord>);
}

/// Sends every record to several sinks.
pub struct FanOut(pub Vec<Arc<dyn RecordSink>>);

impl RecordSink for FanOut {
    fn submit(&self, rec: Arc<UsageRecord>) {
        if let Some((last, rest)) = self.0.split_last() {
            for s in rest {
                s.submit(rec.clone());
            }
            last.submit(rec);
        }
    }
}
