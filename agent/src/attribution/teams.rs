//! Teams: a config table mapping repository patterns to team names.

use serde::Deserialize;

/// One `[[teams]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamRule {
    /// Team name recorded in `team`.
    pub name: String,
    /// Repository patterns (`acme/widgets`, `acme/*`); the first rule
    /// with a matching pattern wins.
    pub repositories: Vec<String>,
}

/// Pure validation; the error names the key.
pub fn validate(rules: &[TeamRule]) -> Result<(), (String, String)> {
    for (i, r) in rules.iter().enumerate() {
        if r.name.trim().is_empty() {
            return Err((format!("teams[{i}].name"), "must not be empty".into()));
        }
        if r.repositories.is_empty() {
            return Err((
                format!("teams[{i}].repositories"),
                "needs at least one pattern".into(),
            ));
        }
    }
    Ok(())
}
