//! Export of usage and agent health: OTLP metrics on the OpenTelemetry
//! GenAI conventions. (Being written: see the export task.)

use serde::Deserialize;

/// `[export]` in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {}

impl ExportConfig {
    /// Pure validation; the error names the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
