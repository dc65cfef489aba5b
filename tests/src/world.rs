//! One test's world: a child cgroup, the fake provider on a loopback
//! address answering for every provider host the SDK tests use, and the
//! agent attached to the cgroup with a resolver override pointing those
//! hosts at the fake. Fields drop in order: agent, fake, cgroup.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use crate::{Agent, AgentOptions, Client, FakeProvider, Reported, TestCgroup, TestPki};

/// Hosts the fake provider answers for (and the agent intercepts).
pub const PROVIDER_HOSTS: &[&str] = &[
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "api.mistral.ai",
    AZURE_HOST,
    VERTEX_HOST,
    CODESTRAL_HOST,
];

/// An Azure OpenAI resource: not in the built-in catalogue, so every
/// world's agent is configured with it as a custom provider.
pub const AZURE_HOST: &str = "myres.openai.azure.com";

/// A Vertex AI region: configured as a custom provider with the Gemini
/// API, as the README says to.
pub const VERTEX_HOST: &str = "us-central1-aiplatform.googleapis.com";

/// Mistral's Codestral endpoint: not in the built-in catalogue, so it is
/// configured with `stream_usage = false`, as the README says to (the fake
/// refuses `stream_options` on every `*.mistral.ai` host, as Mistral does).
pub const CODESTRAL_HOST: &str = "codestral.mistral.ai";

/// A loopback address where nothing listens: connects to it are refused.
/// Every world's agent has it as one of api.openai.com's addresses.
pub fn refusing_ip() -> IpAddr {
    IpAddr::V4(crate::provider_ip(250))
}

/// Hosts that resolve to the fake but are not provider hosts.
pub const OTHER_HOSTS: &[&str] = &["example.test"];

pub const GITHUB_ENV: &[(&str, &str)] = &[
    ("GITHUB_ACTIONS", "true"),
    ("GITHUB_REPOSITORY", "acme/widgets"),
    ("GITHUB_WORKFLOW", "CI"),
    ("GITHUB_JOB", "lint"),
    ("GITHUB_RUN_ID", "4242"),
    ("GITHUB_REF_NAME", "main"),
];

pub struct World {
    pub agent: Agent,
    pub fake: FakeProvider,
    pub pki: TestPki,
    pub ip: IpAddr,
    pub cg: TestCgroup,
}

/// How the agent of a [`World`] starts (see [`AgentOptions`]).
#[derive(Default)]
struct How<'a> {
    /// Inside the cgroup it intercepts.
    in_cgroup: bool,
    /// Its `proxy.listen`.
    listen: Option<&'a str>,
    sigterm_at: Option<&'static str>,
    /// More environment.
    env: Vec<(String, String)>,
}

impl World {
    /// Starts everything; `n` picks this test's loopback address.
    pub fn start(label: &str, n: u8) -> World {
        Self::start_with(label, n, String::new())
    }

    pub fn start_with(label: &str, n: u8, extra_toml: String) -> World {
        Self::start_opts(label, n, extra_toml, &[b"h2", b"http/1.1"])
    }

    /// As [`World::start_with`], with more environment for the agent.
    pub fn start_with_env(
        label: &str,
        n: u8,
        extra_toml: String,
        env: Vec<(String, String)>,
    ) -> World {
        Self::start_inner(
            label,
            n,
            extra_toml,
            &[b"h2", b"http/1.1"],
            How {
                env,
                ..How::default()
            },
        )
    }

    /// As [`World::start_with`], with the fake provider offering only `alpn`.
    pub fn start_opts(label: &str, n: u8, extra_toml: String, alpn: &[&[u8]]) -> World {
        Self::start_full(label, n, extra_toml, alpn, false, None)
    }

    /// As [`World::start`], with SIGTERM sent to the agent during its
    /// start-up, at the log message `at` (see `AgentOptions::sigterm_at`).
    pub fn start_sigterm_at(label: &str, n: u8, at: &'static str) -> World {
        Self::start_inner(
            label,
            n,
            String::new(),
            &[b"h2", b"http/1.1"],
            How {
                sigterm_at: Some(at),
                ..How::default()
            },
        )
    }

    /// Everything configurable: `agent_in_cgroup` starts the agent inside
    /// the cgroup it intercepts; `listen` is its `proxy.listen`.
    pub fn start_full(
        label: &str,
        n: u8,
        extra_toml: String,
        alpn: &[&[u8]],
        agent_in_cgroup: bool,
        listen: Option<&str>,
    ) -> World {
        Self::start_inner(
            label,
            n,
            extra_toml,
            alpn,
            How {
                in_cgroup: agent_in_cgroup,
                listen,
                ..How::default()
            },
        )
    }

    fn start_inner(label: &str, n: u8, extra_toml: String, alpn: &[&[u8]], how: How<'_>) -> World {
        if let Some(why) = crate::kernel_test_unavailable() {
            panic!("needs root, cgroup v2 and BPF: {why}");
        }
        let cg = TestCgroup::create(label);
        let pki = TestPki::new();
        let ip = IpAddr::V4(crate::provider_ip(n));
        let mut names: Vec<&str> = PROVIDER_HOSTS.to_vec();
        names.extend_from_slice(OTHER_HOSTS);
        let fake = FakeProvider::start_alpn(SocketAddr::new(ip, 443), &pki, &names, alpn);
        let agent = Agent::start(AgentOptions {
            cgroup: cg.path().to_path_buf(),
            // api.openai.com also has an address where nothing listens:
            // the agent falls back from it (see `World::client_dialing`).
            overrides: PROVIDER_HOSTS
                .iter()
                .map(|h| {
                    let mut addrs = vec![ip.to_string()];
                    if *h == "api.openai.com" {
                        addrs.push(refusing_ip().to_string());
                    }
                    (h.to_string(), addrs)
                })
                .collect(),
            extra_ca: Some(pki.ca_path()),
            // Last: an array-of-tables header ends whatever table came before.
            extra_toml: format!(
                "{extra_toml}\n[[providers]]\nhosts = [{AZURE_HOST:?}]\napi = \"azure-openai\"\n[[providers]]\nhosts = [{VERTEX_HOST:?}]\napi = \"gemini\"\n\
                 [[providers]]\nhosts = [{CODESTRAL_HOST:?}]\napi = \"openai\"\nstream_usage = false\n"
            ),
            join_cgroup: how.in_cgroup,
            listen: how.listen.map(str::to_owned),
            sigterm_at: how.sigterm_at,
            env: how.env,
        });
        World {
            agent,
            fake,
            pki,
            ip,
            cg,
        }
    }

    /// A client in the cgroup that trusts the CA through `tollgate trust env`.
    pub fn client(&self, extra: &[(&str, &str)]) -> Client {
        let mut env = self.agent.trust_env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Client::new(&self.cg, &self.hosts(), env)
    }

    /// A client in the cgroup, trusting the agent's CA, whose /etc/hosts
    /// names only `hosts`.
    pub fn client_dialing(&self, hosts: &[(&'static str, IpAddr)]) -> Client {
        Client::new(&self.cg, hosts, self.agent.trust_env())
    }

    /// Every host name the fake answers for, at its address.
    fn hosts(&self) -> Vec<(&'static str, IpAddr)> {
        PROVIDER_HOSTS
            .iter()
            .chain(OTHER_HOSTS)
            .map(|h| (*h, self.ip))
            .collect()
    }

    /// A client in the cgroup that trusts the fake provider's CA only, not
    /// the agent's: a client with its own root store.
    pub fn client_without_agent_ca(&self, extra: &[(&str, &str)]) -> Client {
        let ca = self.pki.ca_path().display().to_string();
        let mut env: Vec<(String, String)> = ["SSL_CERT_FILE", "CURL_CA_BUNDLE"]
            .iter()
            .map(|k| (k.to_string(), ca.clone()))
            .collect();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Client::new(&self.cg, &self.hosts(), env)
    }

    /// Waits for `n` ledger rows and checks each against what the fake
    /// provider reported, in order. Returns the rows.
    pub fn assert_ledger_matches_provider(&self, n: usize) -> Vec<Value> {
        let reported = self.fake.reported();
        assert_eq!(reported.len(), n, "fake provider calls: {reported:#?}");
        let rows = self.agent.wait_for_records(n);
        assert_eq!(rows.len(), n, "one ledger row per request: {rows:#?}");
        for (row, rep) in rows.iter().zip(&reported) {
            assert_row_matches(row, rep);
        }
        rows
    }
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// Token kinds, stream flag and model of a ledger row equal the provider's.
pub fn assert_row_matches(row: &Value, rep: &Reported) {
    let ctx = format!("\nrow: {row}\nprovider reported: {rep:?}");
    assert_eq!(u(row, "input_tokens"), rep.input_tokens, "input{ctx}");
    assert_eq!(u(row, "output_tokens"), rep.output_tokens, "output{ctx}");
    assert_eq!(
        u(row, "cached_input_tokens"),
        rep.cached_input_tokens,
        "cached{ctx}"
    );
    assert_eq!(
        u(row, "cache_write_input_tokens"),
        rep.cache_write_input_tokens,
        "cache write{ctx}"
    );
    assert_eq!(
        u(row, "reasoning_tokens"),
        rep.reasoning_tokens,
        "reasoning{ctx}"
    );
    assert_eq!(
        u(row, "web_searches"),
        rep.web_searches,
        "web searches{ctx}"
    );
    assert_eq!(
        u(row, "audio_input_tokens"),
        rep.audio_input_tokens,
        "audio input{ctx}"
    );
    assert_eq!(
        u(row, "audio_output_tokens"),
        rep.audio_output_tokens,
        "audio output{ctx}"
    );
    assert_eq!(row["streaming"], rep.stream, "streaming{ctx}");
    assert_eq!(row["estimated"], false, "estimated{ctx}");
    assert!(
        row["error"].is_null(),
        "no error on a complete request{ctx}"
    );
    assert_eq!(
        row["model"].as_str(),
        Some(rep.model.as_str()),
        "model{ctx}"
    );
}
