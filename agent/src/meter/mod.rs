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

/// Longest model name kept (bytes). Names come from the client and the
/// provider; no real one is near this (Bedrock ARNs are ≈100), and
/// pricing, the ledger and metric attributes must not take megabytes.
pub const MAX_MODEL_NAME: usize = 256;
/// Longest request path kept in a record (bytes).
pub const MAX_PATH: usize = 2048;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn cap(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// [`cap`] in place.
pub fn cap_owned(s: &mut String, max: usize) {
    let keep = cap(s, max).len();
    s.truncate(keep);
}

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

#[cfg(test)]
mod cap_tests {
    use super::*;

    #[test]
    fn cap_cuts_at_a_character_boundary() {
        assert_eq!(cap("gpt-4o", 256), "gpt-4o");
        assert_eq!(cap("abcdef", 3), "abc");
        // "é" is two bytes: a cut inside it backs off.
        assert_eq!(cap("aé", 2), "a");
        let mut s = "ééé".to_string();
        cap_owned(&mut s, 5);
        assert_eq!(s, "éé");
    }
}
