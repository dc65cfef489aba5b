//! The configuration tree: one serde struct per TOML table, defaults that
//! work on a runner with no file at all, and a pure `validate()`.
//!
//! Owns: parsing, defaults and validation of `tollgate.toml`.
//! Must never: do I/O while validating (loading reads the one file, nothing
//! else), or silently ignore a key it does not know.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where `--config` points when it is not given; used only when it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tollgate/tollgate.toml";
/// Default state directory: CA, ledger, trust bundle.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tollgate";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config{where_}: {key}: {message}")]
    Invalid {
        where_: String,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The process exit code: a file the user may not read is a privilege
    /// problem (77, as `sudo` fixes it: hooks retry on it), the rest usage.
    pub fn exit_code(&self) -> u8 {
        match self {
            ConfigError::Read { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                crate::exit::NOPERM
            }
            _ => crate::exit::USAGE,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the CA, the trust bundle and the ledger.
    pub state_dir: PathBuf,
    /// Logging.
    pub log: LogConfig,
    /// Kernel interception.
    pub intercept: InterceptConfig,
    /// The local listener that redirected connections land on.
    pub proxy: ProxyConfig,
    /// Connections from the agent to the providers.
    pub upstream: UpstreamConfig,
    /// Resolution of provider host names to the addresses that are redirected.
    pub resolver: ResolverConfig,
    /// Extra provider hosts (Azure OpenAI resources, private gateways,
    /// OpenAI-compatible services not in the built-in catalogue).
    pub providers: Vec<CustomProvider>,
    /// The ledger of completed requests.
    pub ledger: LedgerConfig,
    /// Price overrides and additions.
    pub pricing: crate::meter::pricing::PricingConfig,
    /// Repository patterns → team names.
    pub teams: Vec<crate::attribution::teams::TeamRule>,
    /// OTLP export, audit log.
    pub export: crate::export::ExportConfig,
    /// The local control socket (`tollgate top`).
    pub control: crate::control::ControlConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            log: LogConfig::default(),
            intercept: InterceptConfig::default(),
            proxy: ProxyConfig::default(),
            upstream: UpstreamConfig::default(),
            resolver: ResolverConfig::default(),
            providers: Vec::new(),
            ledger: LedgerConfig::default(),
            pricing: Default::default(),
            teams: Vec::new(),
            export: Default::default(),
            control: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `error`, `warn`, `info`, `debug`, `trace`, or a
    /// directive list such as `tollgate=debug,hyper=warn`. `RUST_LOG`
    /// overrides it.
    pub level: String,
    /// `text` (human readable) or `json` (one object per line).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InterceptConfig {
    /// cgroup v2 directory whose processes (and descendants) are
    /// intercepted. Default: the root of the cgroup v2 hierarchy, found in
    /// /proc/self/mountinfo (so hybrid hosts work; a mount that shows only a
    /// subtree of the hierarchy is refused, not taken for its root).
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Loopback address and port of the listener. IPv6 clients are sent to
    /// `[::1]` on the same port.
    pub listen: SocketAddr,
    /// How long SIGTERM waits for in-flight requests and streams to end.
    pub drain_secs: u64,
    /// Largest request body the agent reads to find the model (bytes).
    /// Larger bodies are forwarded unchanged and recorded as unparsed.
    pub max_request_body: usize,
    /// Most bytes of request bodies the agent holds at once, across all
    /// connections; a body that would pass it is forwarded unparsed.
    pub max_buffered_request_bytes: usize,
    /// Most bytes of JSON answers (non-streaming responses, read whole
    /// for their usage) and of large stream events (past 64 KiB each) the
    /// agent holds at once, across all connections; an answer or event
    /// that would pass it is forwarded without being read, and its record
    /// estimated.
    pub max_buffered_response_bytes: usize,
    /// A request body that pauses this long mid-way (a stalled or slow
    /// client), or is not whole within 3 times this long (trickled in),
    /// stops being held: it is forwarded as it arrives, unparsed, so it
    /// does not keep its share of `max_buffered_request_bytes`.
    pub request_body_stall_secs: u64,
    /// Threads that run connections; 0 = one per CPU. One keeps the
    /// agent's share of a small runner bounded and costs the least CPU per
    /// request (no wake-ups between threads); LLM request rates are far
    /// below what one thread serves.
    pub worker_threads: usize,
}

/// Upper bound of `proxy.drain_secs`.
const MAX_DRAIN_SECS: u64 = 3600;
/// Upper bound of `ledger.queue`.
const MAX_LEDGER_QUEUE: usize = 1 << 20;
/// Upper bound of `ledger.max_backlog` (≈1 KiB of memory per record).
const MAX_LEDGER_BACKLOG: usize = 1 << 22;
/// Upper bound of `proxy.worker_threads`.
const MAX_WORKER_THREADS: usize = 256;

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 15443)),
            drain_secs: 30,
            max_request_body: 32 << 20,
            max_buffered_request_bytes: 128 << 20,
            max_buffered_response_bytes: 128 << 20,
            request_body_stall_secs: 10,
            worker_threads: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// PEM file with extra CA certificates trusted for provider connections,
    /// in addition to the webpki roots (tests, private gateways). There is
    /// no setting that turns verification off.
    pub extra_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverConfig {
    /// Seconds between re-resolutions of the provider host names.
    pub refresh_secs: u64,
    /// Host name → addresses (`"10.0.0.5"`, `"10.0.0.5:8443"`,
    /// `"[2001:db8::5]:443"`). A host listed here is not looked up in DNS.
    pub overrides: BTreeMap<String, Vec<String>>,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            refresh_secs: 300,
            overrides: BTreeMap::new(),
        }
    }
}

/// A provider host that is not in the built-in catalogue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomProvider {
    /// Exact host names (`myresource.openai.azure.com`).
    pub hosts: Vec<String>,
    /// Which API the host speaks.
    pub api: ApiKind,
    /// Whether the agent adds `stream_options: {"include_usage": true}` to
    /// OpenAI-style streams sent to these hosts, so that the last chunk
    /// carries the usage. `false` for a server that refuses the field;
    /// unset: the built-in catalogue's choice for the host (on, except
    /// for hosts known to refuse it, such as `api.mistral.ai`).
    #[serde(default)]
    pub stream_usage: Option<bool>,
}

/// The wire API a host speaks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ApiKind {
    Openai,
    AzureOpenai,
    Anthropic,
    Gemini,
    Bedrock,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// Records waiting for the ledger writer before the request path starts
    /// handing them over asynchronously (not dropped).
    pub queue: usize,
    /// Most records waiting in memory, queue included, while the ledger
    /// cannot be written (a full disk, a lock held from outside); records
    /// beyond it are dropped and counted in `tollgate.ledger.dropped`.
    pub max_backlog: usize,
    /// Rows older than this many days are deleted (at start and hourly);
    /// 0 keeps every row.
    pub retention_days: u32,
}

/// Upper bound of `ledger.retention_days` (100 years).
const MAX_RETENTION_DAYS: u32 = 36_500;

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            queue: 65_536,
            max_backlog: 100_000,
            retention_days: 400,
        }
    }
}

impl LedgerConfig {
    /// How long rows are kept; `None` for ever.
    pub fn retention(&self) -> Option<std::time::Duration> {
        (self.retention_days > 0)
            .then(|| std::time::Duration::from_secs(u64::from(self.retention_days) * 86_400))
    }
}

/// An address with an optional port, as written in `resolver.overrides`.
pub fn parse_override_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let trimmed = s.trim_start_matches('[').trim_end_matches(']');
    trimmed
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 443))
        .map_err(|_| format!("`{s}` is not an IP address or IP:port"))
}

/// The dotted key a TOML error is about (`proxy.drain_secs`), if any. The
/// `toml` crate keeps it private and shows it only in its `Display` of an
/// error without the input (with the input it quotes the line instead,
/// which may hold a secret).
fn toml_key(e: &toml::de::Error) -> Option<String> {
    let mut bare = e.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let key = shown.trim_end().lines().last()?.strip_prefix("in `")?;
    let key = key.strip_suffix('`')?;
    (!key.is_empty()).then(|| key.to_owned())
}

/// serde's message without the value it could not take: `invalid type:
/// string "Bearer sk-…", expected a map` quotes what the file held, which
/// may be a header value or a key. Strings (`"…"`, with serde's escapes)
/// and unknown variants (`` unknown variant `…` ``) become `…`; names of
/// fields (`` unknown field `lisen` ``) and what was expected are kept.
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(['"', '`']) {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let quote = tail.as_bytes()[0];
        // serde shows values of other types in backticks after their
        // kind (``integer `5` ``): a header or key may be all digits.
        let value = quote == b'"'
            || [
                "unknown variant ",
                "integer ",
                "floating point ",
                "boolean ",
                "character ",
            ]
            .iter()
            .any(|kind| head.ends_with(kind));
        // The closing quote: for strings, the first one not escaped.
        let mut end = None;
        let mut escaped = false;
        for (j, b) in tail.bytes().enumerate().skip(1) {
            if quote == b'"' && escaped {
                escaped = false;
            } else if quote == b'"' && b == b'\\' {
                escaped = true;
            } else if b == quote {
                end = Some(j);
                break;
            }
        }
        match end {
            Some(j) => {
                if value {
                    out.push(quote as char);
                    out.push('…');
                    out.push(quote as char);
                } else {
                    out.push_str(&tail[..=j]);
                }
                rest = &tail[j + 1..];
            }
            // Unclosed: drop the rest rather than risk showing a value.
            None => {
                if !value {
                    out.push_str(tail);
                }
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

impl Config {
    /// Loads `path` if given, else the default path if it exists, else the
    /// defaults. Returns the config and the file it came from.
    pub fn load(path: Option<&Path>) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Config::default(), None));
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let cfg = Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.clone(),
            message,
        })?;
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid { key, message, .. } => ConfigError::Invalid {
                where_: format!(" file {}", path.display()),
                key,
                message,
            },
            other => other,
        })?;
        Ok((cfg, Some(path)))
    }

    /// Parses TOML text; the error names the line, column and key, and
    /// never quotes the line itself (it may hold a header value or a key).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str::<Config>(text).map_err(|e| {
            let message = without_values(e.message().trim_end());
            let message = match toml_key(&e) {
                Some(key) => format!("`{key}`: {message}"),
                None => message,
            };
            match e.span() {
                Some(span) => {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    format!("TOML parse error at line {line}, column {column}: {message}")
                }
                None => format!("TOML parse error: {message}"),
            }
        })
    }

    /// Checks what serde cannot. Pure: no I/O.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            where_: String::new(),
            key: key.into(),
            message,
        };
        if !self.proxy.listen.ip().is_loopback() {
            return Err(invalid(
                "proxy.listen",
                format!(
                    "{} is not a loopback address; the listener must not be reachable from the network (use 127.0.0.1:PORT)",
                    self.proxy.listen
                ),
            ));
        }
        if !self.proxy.listen.is_ipv4() {
            return Err(invalid(
                "proxy.listen",
                "give the IPv4 loopback address (127.0.0.1:PORT); IPv6 clients are sent to [::1] on the same port".into(),
            ));
        }
        if self.proxy.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "proxy.worker_threads",
                format!(
                    "{} is more than {MAX_WORKER_THREADS}; use 0 for one per CPU",
                    self.proxy.worker_threads
                ),
            ));
        }
        if self.resolver.refresh_secs == 0 {
            return Err(invalid(
                "resolver.refresh_secs",
                "must be at least 1".into(),
            ));
        }
        if self.ledger.retention_days > MAX_RETENTION_DAYS {
            return Err(invalid(
                "ledger.retention_days",
                format!(
                    "{} is more than {MAX_RETENTION_DAYS} (100 years); 0 keeps every row",
                    self.ledger.retention_days
                ),
            ));
        }
        if self.proxy.drain_secs > MAX_DRAIN_SECS {
            return Err(invalid(
                "proxy.drain_secs",
                format!(
                    "{} is more than {MAX_DRAIN_SECS} (an hour)",
                    self.proxy.drain_secs
                ),
            ));
        }
        if !(1..=MAX_DRAIN_SECS).contains(&self.proxy.request_body_stall_secs) {
            return Err(invalid(
                "proxy.request_body_stall_secs",
                format!(
                    "{} is not between 1 and {MAX_DRAIN_SECS}",
                    self.proxy.request_body_stall_secs
                ),
            ));
        }
        if self.ledger.queue > MAX_LEDGER_QUEUE {
            return Err(invalid(
                "ledger.queue",
                format!(
                    "{} is more than {MAX_LEDGER_QUEUE}; the queue's slots are allocated at start (records beyond it still wait, up to ledger.max_backlog)",
                    self.ledger.queue
                ),
            ));
        }
        if self.proxy.max_buffered_request_bytes < self.proxy.max_request_body {
            return Err(invalid(
                "proxy.max_buffered_request_bytes",
                format!(
                    "{} is less than proxy.max_request_body ({}): no body that size could be read",
                    self.proxy.max_buffered_request_bytes, self.proxy.max_request_body
                ),
            ));
        }
        if self.ledger.queue == 0 {
            return Err(invalid("ledger.queue", "must be at least 1".into()));
        }
        if self.ledger.max_backlog > MAX_LEDGER_BACKLOG
            || self.ledger.max_backlog < self.ledger.queue
        {
            return Err(invalid(
                "ledger.max_backlog",
                format!(
                    "{} must be at least ledger.queue ({}) and at most {MAX_LEDGER_BACKLOG} (each waiting record holds about 1 KiB of memory)",
                    self.ledger.max_backlog, self.ledger.queue
                ),
            ));
        }
        if let Some(c) = self.intercept.cgroup.as_ref().filter(|c| !c.is_absolute()) {
            return Err(invalid(
                "intercept.cgroup",
                format!(
                    "`{}` must be an absolute path (a cgroup v2 directory under its mount, such as /sys/fs/cgroup/ci)",
                    c.display()
                ),
            ));
        }
        if self.state_dir.as_os_str().is_empty() || !self.state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                format!("`{}` must be an absolute path", self.state_dir.display()),
            ));
        }
        for (host, addrs) in &self.resolver.overrides {
            validate_host(host)
                .map_err(|m| invalid(&format!("resolver.overrides.\"{host}\""), m))?;
            if addrs.is_empty() {
                return Err(invalid(
                    &format!("resolver.overrides.\"{host}\""),
                    "needs at least one address".into(),
                ));
            }
            for a in addrs {
                parse_override_addr(a)
                    .map_err(|m| invalid(&format!("resolver.overrides.\"{host}\""), m))?;
            }
        }
        for (i, p) in self.providers.iter().enumerate() {
            if p.stream_usage.is_some() && !matches!(p.api, ApiKind::Openai | ApiKind::AzureOpenai)
            {
                return Err(invalid(
                    &format!("providers[{i}].stream_usage"),
                    "applies only to api = \"openai\" or \"azure-openai\" \
                     (other APIs report a stream's usage unasked)"
                        .into(),
                ));
            }
            if p.hosts.is_empty() {
                return Err(invalid(
                    &format!("providers[{i}].hosts"),
                    "needs at least one host".into(),
                ));
            }
            for h in &p.hosts {
                validate_host(h).map_err(|m| invalid(&format!("providers[{i}].hosts"), m))?;
                // The CA's name constraint for a host also covers every
                // name under it: a one-label host (a typo such as "com")
                // would let it sign for a whole top-level domain.
                if !h.contains('.') {
                    return Err(invalid(
                        &format!("providers[{i}].hosts"),
                        format!(
                            "`{h}` has one label: give the full name (e.g. `{h}.corp.example`); \
                             the local CA may sign for a provider host and every name under it"
                        ),
                    ));
                }
            }
        }
        let sub = |r: Result<(), (String, String)>| r.map_err(|(k, m)| invalid(&k, m));
        sub(self.pricing.validate())?;
        sub(self.export.validate())?;
        sub(self.control.validate())?;
        sub(crate::attribution::teams::validate(&self.teams))?;
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            return Err(invalid("log.level", format!("`{}`: {e}", self.log.level)));
        }
        Ok(())
    }
}

/// An exact DNS host name: no wildcard, no scheme, no port.
pub fn validate_host(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if !ok {
        return Err(format!(
            "`{h}` is not an exact host name (wildcards, schemes and ports are not allowed)"
        ));
    }
    // A name whose last label is all digits is an IPv4 address (TLS
    // clients send no SNI for one, and the CA cannot name it): a host name
    // is needed.
    if h.rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "`{h}` is an IP address, not a host name: clients send no server name for an address, so it cannot be metered; give the provider's host name"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_working_defaults() {
        let c = Config::parse("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.proxy.listen, "127.0.0.1:15443".parse().unwrap());
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/tollgate"));
        assert_eq!(
            c.ledger.retention(),
            Some(std::time::Duration::from_secs(400 * 86_400))
        );
    }

    #[test]
    fn ledger_retention_zero_keeps_everything_and_is_bounded() {
        let c = Config::parse("[ledger]\nretention_days = 0\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.ledger.retention(), None);
        let e = Config::parse("[ledger]\nretention_days = 36501\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("ledger.retention_days"), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key_but_not_the_value() {
        let e =
            Config::parse("[proxy]\nlisten = \"127.0.0.1:1\"\ndrain_secs = \"30s\"\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("`proxy.drain_secs`"), "{e}");
        assert!(!e.contains("30s"), "{e}");
        let e = Config::parse("[export.otlp.headers]\nx-key = 123456789\n").unwrap_err();
        assert!(e.contains("`export.otlp.headers.x-key`"), "{e}");
        assert!(!e.contains("123456789"), "{e}");
        for (text, value) in [
            ("[proxy]\ndrain_secs = 1.5\n", "1.5"),
            ("[proxy]\nlisten = true\n", "true"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(!e.contains(value), "{e}");
        }
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = Config::parse("[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("lisen"), "{e}");
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            r#"
state_dir = "/tmp/tg"
[log]
level = "debug"
format = "json"
[intercept]
cgroup = "/sys/fs/cgroup/unified/ci"
[proxy]
listen = "127.0.0.1:16000"
[upstream]
extra_ca = "/tmp/ca.pem"
[resolver]
refresh_secs = 60
[resolver.overrides]
"api.openai.com" = ["127.0.0.9", "[::1]:8443"]
[[providers]]
hosts = ["myres.openai.azure.com"]
api = "azure-openai"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.providers[0].api, ApiKind::AzureOpenai);
        assert_eq!(
            parse_override_addr("[::1]:8443").unwrap(),
            "[::1]:8443".parse().unwrap()
        );
        assert_eq!(
            parse_override_addr("127.0.0.9").unwrap(),
            "127.0.0.9:443".parse().unwrap()
        );
    }

    #[test]
    fn parse_errors_name_the_place_but_do_not_quote_the_line() {
        for (text, line) in [
            (
                "[export.otlp.headers]\nauthorization = Bearer sk-SECRET\n",
                2,
            ),
            ("[export.otlp]\napi_key = \"sk-SECRET\"\n", 2),
            ("[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n", 3),
            // serde's messages quote the value they could not take: the
            // env-variable form of the headers where a table belongs, a
            // string where a number or an enum belongs.
            (
                "[export.otlp]\nheaders = \"authorization=Bearer sk-SECRET\\\"x\"\n",
                2,
            ),
            ("[export]\nsemconv = \"sk-SECRET\"\n", 2),
            ("[proxy]\nworker_threads = \"sk-SECRET\"\n", 2),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(!e.contains("SECRET"), "{e}");
            assert!(e.contains(&format!("line {line}")), "{e}");
        }
        let e = Config::parse("[export.otlp]\nheaders = \"a=b\"\n").unwrap_err();
        assert!(e.contains("expected a map"), "says what was wrong: {e}");
        for (message, shown) in [
            (
                r#"invalid type: string "k=\"v\" x", expected a map"#,
                r#"invalid type: string "…", expected a map"#,
            ),
            (
                "unknown variant `sk-1`, expected one of `default`, `x`",
                "unknown variant `…`, expected one of `default`, `x`",
            ),
            (
                "unknown field `lisen`, expected `listen`",
                "unknown field `lisen`, expected `listen`",
            ),
            (r#"invalid type: string "unclosed"#, "invalid type: string "),
        ] {
            assert_eq!(without_values(message), shown);
        }
        let e = Config::parse("[export.otlp]\napi_key = \"sk-SECRET\"\n").unwrap_err();
        assert!(e.contains("api_key"), "names the unknown key: {e}");
    }

    #[test]
    fn the_shipped_example_parses_and_validates() {
        let c = Config::parse(include_str!("../../deploy/tollgate.toml.example"))
            .expect("deploy/tollgate.toml.example parses");
        c.validate().expect("and validates");
        // Its header says "these are the defaults": in particular it must
        // leave unset what an OTEL_* variable would otherwise decide.
        assert_eq!(format!("{c:#?}"), format!("{:#?}", Config::default()));
    }

    #[test]
    fn rejects_bad_values() {
        let mut c = Config::default();
        c.proxy.listen = "0.0.0.0:15443".parse().unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("loopback"));
        let mut c = Config::default();
        c.proxy.worker_threads = 100_000;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("proxy.worker_threads")
        );
        c.proxy.worker_threads = 0;
        c.validate().expect("0 = one per CPU");
        let mut c = Config::default();
        c.proxy.drain_secs = u64::MAX;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("proxy.drain_secs")
        );
        let mut c = Config::default();
        c.intercept.cgroup = Some("sys/fs/cgroup/ci".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("intercept.cgroup"), "{e}");
        for stall in [0, u64::MAX] {
            let mut c = Config::default();
            c.proxy.request_body_stall_secs = stall;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("proxy.request_body_stall_secs"), "{stall}: {e}");
        }
        let mut c = Config::default();
        c.ledger.queue = usize::MAX;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("ledger.queue")
        );
        let mut c = Config::default();
        c.proxy.max_buffered_request_bytes = 1 << 20;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("proxy.max_buffered_request_bytes"), "{e}");
        for backlog in [usize::MAX, 1000] {
            let mut c = Config::default();
            c.ledger.max_backlog = backlog;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("ledger.max_backlog"), "{backlog}: {e}");
        }
        let mut c = Config::default();
        c.resolver
            .overrides
            .insert("*.openai.com".into(), vec!["127.0.0.1".into()]);
        assert!(c.validate().unwrap_err().to_string().contains("exact host"));
        let mut c = Config::default();
        c.resolver
            .overrides
            .insert("api.openai.com".into(), vec!["localhost".into()]);
        assert!(c.validate().is_err());
        let c = Config {
            state_dir: "relative".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    /// `[[providers]] hosts = [host]`: `None` when accepted, else the
    /// error's text (which names the key).
    fn provider_host_refused(host: &str) -> Option<String> {
        let c = Config::parse(&format!(
            "[[providers]]\nhosts = [\"{host}\"]\napi = \"openai\"\n"
        ))
        .expect("parses");
        let e = c.validate().err()?.to_string();
        assert!(e.contains("providers[0].hosts"), "{e}");
        Some(e)
    }

    #[test]
    fn a_one_label_provider_host_is_refused() {
        for (host, ok) in [("com", false), ("llm", false), ("llm.corp.example", true)] {
            match provider_host_refused(host) {
                None => assert!(ok, "{host} accepted"),
                Some(e) => assert!(!ok && e.contains("one label"), "{host}: {e}"),
            }
        }
    }

    #[test]
    fn an_ip_address_is_not_a_provider_host() {
        for (host, ok) in [
            ("10.0.0.5", false),
            ("192.168.1.300", false),
            ("llm.10", false),
            ("10.llm.example", true),
            ("llm-1.corp.example", true),
        ] {
            match provider_host_refused(host) {
                None => assert!(ok, "{host} accepted"),
                Some(e) => assert!(!ok && e.contains("IP address"), "{host}: {e}"),
            }
        }
    }

    #[test]
    fn stream_usage_is_only_for_openai_style_apis() {
        for (api, ok) in [
            ("openai", true),
            ("azure-openai", true),
            ("anthropic", false),
            ("gemini", false),
            ("bedrock", false),
        ] {
            let c = Config::parse(&format!(
                "[[providers]]\nhosts = [\"llm.corp.example\"]\napi = \"{api}\"\nstream_usage = false\n"
            ))
            .expect("parses");
            assert_eq!(c.providers[0].stream_usage, Some(false));
            match c.validate() {
                Ok(()) => assert!(ok, "{api} accepted"),
                Err(e) => {
                    assert!(!ok, "{api}: {e}");
                    assert!(e.to_string().contains("providers[0].stream_usage"), "{e}");
                }
            }
        }
        let e = Config::parse(
            "[[providers]]\nhosts = [\"a.b\"]\napi = \"openai\"\nstream_usage = \"no\"\n",
        )
        .unwrap_err();
        let e = e.to_string();
        assert!(e.contains("line 4") && e.contains("boolean"), "{e}");
    }

    #[test]
    fn an_unreadable_config_is_a_privilege_error() {
        let e = ConfigError::Read {
            path: "/etc/tollgate/tollgate.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert_eq!(e.exit_code(), crate::exit::NOPERM);
        let e = ConfigError::Read {
            path: "/nope.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(e.exit_code(), crate::exit::USAGE);
        let e = Config::parse("x = 1").map(|_| ()).unwrap_err();
        let e = ConfigError::Parse {
            path: "/x.toml".into(),
            message: e,
        };
        assert_eq!(e.exit_code(), crate::exit::USAGE);
    }
}
