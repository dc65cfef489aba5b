//! Metering: turns what a provider adapter read into a usage record.
//!
//! Owns: the usage record and its token kinds. Must never: block the data
//! path (records leave through the ledger's bounded channel).

pub mod estimate;
pub mod pricing;
pub mod record;

pub use record::{Attribution, Usage, UsageRecord};

/// Where finished records go (the ledger writer, and later the exporters).
/// `submit` must not block or await I/O: it is called on the data path.
pub trait RecordSink: Send + Sync {
    fn submit(&self, rec: UsageRecord);
}

/// Sends every record to several sinks.
pub struct FanOut(pub Vec<std::sync::Arc<dyn RecordSink>>);

impl RecordSink for FanOut {
    fn submit(&self, rec: UsageRecord) {
        if let Some((last, rest)) = self.0.split_last() {
            for s in rest {
                s.submit(rec.clone());
            }
            last.submit(rec);
        }
    }
}
