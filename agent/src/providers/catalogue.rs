//! The built-in catalogue of provider hosts and the API each speaks.
//!
//! Owns: which host names are LLM providers. Must never: do I/O (resolution
//! lives in `intercept::resolver`).

use crate::config::{ApiKind, Config};

/// AWS regions with a Bedrock runtime endpoint, listed explicitly because a
/// wildcard cannot be resolved or name-constrained.
pub const BEDROCK_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "us-gov-east-1",
    "us-gov-west-1",
    "ca-central-1",
    "ca-west-1",
    "mx-central-1",
    "sa-east-1",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "il-central-1",
    "me-central-1",
    "me-south-1",
    "af-south-1",
    "ap-east-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-south-1",
    "ap-south-2",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-7",
];

/// Fixed hosts of the catalogue (Bedrock hosts come from `BEDROCK_REGIONS`).
pub const FIXED_HOSTS: &[(&str, ApiKind)] = &[
    ("api.openai.com", ApiKind::Openai),
    // OpenAI's data residency endpoints (`OpenAI(data_residency=...)`),
    // below api.openai.com: inside an existing CA's name constraints.
    ("us.api.openai.com", ApiKind::Openai),
    ("eu.api.openai.com", ApiKind::Openai),
    ("au.api.openai.com", ApiKind::Openai),
    ("in.api.openai.com", ApiKind::Openai),
    ("jp.api.openai.com", ApiKind::Openai),
    ("ae.api.openai.com", ApiKind::Openai),
    ("api.anthropic.com", ApiKind::Anthropic),
    ("generativelanguage.googleapis.com", ApiKind::Gemini),
    ("api.mistral.ai", ApiKind::Openai),
    ("api.groq.com", ApiKind::Openai),
    ("api.deepseek.com", ApiKind::Openai),
    ("api.x.ai", ApiKind::Openai),
    ("us.api.x.ai", ApiKind::Openai),
    ("openrouter.ai", ApiKind::Openai),
    ("api.together.xyz", ApiKind::Openai),
    ("api.fireworks.ai", ApiKind::Openai),
];

/// OpenAI-compatible hosts of the catalogue that refuse a request naming
/// `stream_options` (Mistral answers 422 `extra_forbidden`) and report a
/// stream's usage in its last chunk without being asked: the agent does
/// not add `include_usage` to their streams.
const REFUSE_STREAM_OPTIONS: &[&str] = &["api.mistral.ai"];

/// One provider host and its API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderHost {
    pub host: String,
    pub api: ApiKind,
    /// Streams to this host are sent without an added `stream_options`:
    /// the catalogue's [`REFUSE_STREAM_OPTIONS`], or `stream_usage = false`
    /// on a `[[providers]]` entry.
    pub refuses_stream_options: bool,
}

/// Every provider host: the built-in catalogue plus `[[providers]]` from
/// the config, de-duplicated (the config wins), sorted by host.
pub fn provider_hosts(cfg: &Config) -> Vec<ProviderHost> {
    let mut out: std::collections::BTreeMap<String, ApiKind> = FIXED_HOSTS
        .iter()
        .map(|(h, k)| (h.to_string(), *k))
        .collect();
    for r in BEDROCK_REGIONS {
        out.insert(
            format!("bedrock-runtime.{r}.amazonaws.com"),
            ApiKind::Bedrock,
        );
        out.insert(
            format!("bedrock-runtime-fips.{r}.amazonaws.com"),
            ApiKind::Bedrock,
        );
    }
    let mut stream_usage = std::collections::BTreeMap::new();
    for p in &cfg.providers {
        for h in &p.hosts {
            let h = h.to_ascii_lowercase();
            if let Some(ask) = p.stream_usage {
                stream_usage.insert(h.clone(), ask);
            }
            out.insert(h, p.api);
        }
    }
    out.into_iter()
        .map(|(host, api)| {
            let refuses = match stream_usage.get(&host) {
                Some(ask) => !ask,
                None => REFUSE_STREAM_OPTIONS.contains(&host.as_str()),
            };
            ProviderHost {
                host,
                api,
                refuses_stream_options: refuses,
            }
        })
        .collect()
}

/// The built-in catalogue's host names (no `[[providers]]`, no wildcards):
/// what a test or benchmark overrides so that no lookup reaches the DNS.
pub fn builtin_hosts() -> Vec<String> {
    provider_hosts(&Config::default())
        .into_iter()
        .map(|h| h.host)
        .collect()
}

/// The API spoken by `host`, if it is a provider host.
pub fn lookup<'a>(hosts: &'a [ProviderHost], host: &str) -> Option<&'a ProviderHost> {
    let host = host.trim_end_matches('.');
    hosts
        .binary_search_by(|p| p.host.as_str().cmp(host))
        .ok()
        .map(|i| &hosts[i])
        .or_else(|| hosts.iter().find(|p| p.host.eq_ignore_ascii_case(host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_covers_design_hosts() {
        let hosts = provider_hosts(&Config::default());
        for h in [
            "api.openai.com",
            "api.anthropic.com",
            "generativelanguage.googleapis.com",
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "openrouter.ai",
        ] {
            assert!(lookup(&hosts, h).is_some(), "{h} missing");
        }
        assert!(lookup(&hosts, "example.com").is_none());
        assert!(lookup(&hosts, "API.OpenAI.com.").is_some());
        // Data residency endpoints are OpenAI's API; an upgrade that adds
        // them keeps the CA (they are below api.openai.com).
        assert_eq!(
            lookup(&hosts, "eu.api.openai.com").map(|p| p.api),
            Some(ApiKind::Openai)
        );
        let dir = tempfile::tempdir().unwrap();
        let before: Vec<String> = hosts
            .iter()
            .map(|p| p.host.clone())
            .filter(|h| !h.ends_with(".api.openai.com") && h != "us.api.x.ai")
            .collect();
        crate::ca::LocalCa::load_or_create(dir.path(), &before).unwrap();
        let all: Vec<String> = hosts.iter().map(|p| p.host.clone()).collect();
        let (_, status) = crate::ca::LocalCa::load_or_create(dir.path(), &all).unwrap();
        assert_eq!(status, crate::ca::CaStatus::Loaded);
        for h in &hosts {
            crate::config::validate_host(&h.host).unwrap();
        }
    }

    #[test]
    fn config_adds_hosts() {
        let mut cfg = Config::default();
        cfg.providers.push(crate::config::CustomProvider {
            hosts: vec!["myres.openai.azure.com".into()],
            api: ApiKind::AzureOpenai,
            stream_usage: None,
        });
        let hosts = provider_hosts(&cfg);
        let h = lookup(&hosts, "myres.openai.azure.com").unwrap();
        assert_eq!(h.api, ApiKind::AzureOpenai);
        assert!(!h.refuses_stream_options);
    }

    #[test]
    fn stream_usage_comes_from_the_catalogue_unless_the_config_says() {
        let refuses = |cfg: &Config, host: &str| {
            lookup(&provider_hosts(cfg), host)
                .unwrap()
                .refuses_stream_options
        };
        let mut cfg = Config::default();
        assert!(refuses(&cfg, "api.mistral.ai"));
        assert!(!refuses(&cfg, "api.openai.com"));
        let entry = |hosts: &[&str], ask: Option<bool>| crate::config::CustomProvider {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            api: ApiKind::Openai,
            stream_usage: ask,
        };
        // An entry that names a catalogue host without the switch keeps
        // the catalogue's choice; with it, the entry wins.
        cfg.providers = vec![
            entry(&["API.Mistral.ai"], None),
            entry(&["Codestral.mistral.ai", "api.openai.com"], Some(false)),
            entry(&["llm.corp.example"], Some(true)),
        ];
        assert!(refuses(&cfg, "api.mistral.ai"));
        assert!(refuses(&cfg, "codestral.mistral.ai"));
        assert!(refuses(&cfg, "api.openai.com"));
        assert!(!refuses(&cfg, "llm.corp.example"));
        cfg.providers = vec![entry(&["api.mistral.ai"], Some(true))];
        assert!(!refuses(&cfg, "api.mistral.ai"));
    }
}
