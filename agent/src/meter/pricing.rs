//! Prices: USD per million tokens per model and token kind, versioned by
//! the date each price took effect. (Being written: see the pricing task.)

use serde::Deserialize;

/// `[pricing]` in the config: overrides and additions to the built-in
/// price catalogue.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {}

impl PricingConfig {
    /// Pure validation; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
