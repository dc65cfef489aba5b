//! The command line: argument definitions and the small commands
//! (`report`, `trust`). `run` lives in `app`.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::ca::LocalCa;
use crate::config::Config;
use crate::ledger::{Filter, Ledger};
use crate::providers::catalogue::provider_hosts;
use crate::report::{self, GroupBy, ReportFormat};
use crate::trust::{self, EnvFormat};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    propagate_version = true,
    about = "LLM API spend for CI runners: intercept, count, export, enforce",
    long_about = "tollgate intercepts the connections CI jobs make to LLM providers (eBPF cgroup \
                  hooks), counts the tokens and dollars of every request, and keeps a ledger. \
                  Jobs change nothing."
)]
pub struct Cli {
    /// Config file (TOML). Default: /etc/tollgate/tollgate.toml when it exists.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (needs root).
    Run,
    /// Print the spend recorded in the ledger.
    Report(ReportArgs),
    /// Manage trust in the local CA.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Live view of the running agent: spend by process and job (root).
    Top(TopArgs),
    /// Check whether `tollgate run` would work on this host, changing
    /// nothing (as root, to check the kernel too).
    Check,
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The agent's control socket. Default: [control] socket of the config
    /// (/run/tollgate/control.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print one plain-text snapshot and exit (for scripts).
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Print a JSON array of the matching records instead of a table.
    #[arg(long, conflicts_with_all = ["csv", "markdown"])]
    pub json: bool,
    /// Print the table's groups as CSV.
    #[arg(long, conflicts_with = "markdown")]
    pub csv: bool,
    /// Print the table as GitHub-flavoured Markdown (job summaries).
    #[arg(long)]
    pub markdown: bool,
    /// Only requests since a time: a duration back from now (`90m`, `24h`,
    /// `7d`), a date (`2026-11-01`, midnight UTC) or an RFC 3339 time
    /// (`2026-11-01T12:00:00Z`).
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<i64>,
    /// Only this repository (`owner/name`).
    #[arg(long)]
    pub repository: Option<String>,
    /// Only this job.
    #[arg(long)]
    pub job: Option<String>,
    /// Only this CI run (`GITHUB_RUN_ID`, `CI_PIPELINE_ID`, ...).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Only this attempt of the run (`GITHUB_RUN_ATTEMPT`).
    #[arg(long)]
    pub run_attempt: Option<String>,
    /// Only this CI job id (`CI_JOB_ID`, `BUILDKITE_JOB_ID`, ...).
    #[arg(long)]
    pub job_id: Option<String>,
    /// Only requests made on this runner (`RUNNER_NAME`, ...).
    #[arg(long)]
    pub runner: Option<String>,
    /// Group the table by these keys, in order (comma-separated or repeated).
    /// Default: repository,job,exe,model.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub by: Vec<ByArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ByArg {
    Repository,
    Job,
    Exe,
    Model,
    Team,
    Provider,
    /// The service tier that served the request.
    Tier,
    /// What was called (chat, embeddings, batch_results, ...).
    Operation,
    /// The UTC day the request started, in date order.
    Day,
}

impl From<ByArg> for GroupBy {
    fn from(b: ByArg) -> GroupBy {
        match b {
            ByArg::Repository => GroupBy::Repository,
            ByArg::Job => GroupBy::Job,
            ByArg::Exe => GroupBy::Exe,
            ByArg::Model => GroupBy::Model,
            ByArg::Team => GroupBy::Team,
            ByArg::Provider => GroupBy::Provider,
            ByArg::Tier => GroupBy::Tier,
            ByArg::Operation => GroupBy::Operation,
            ByArg::Day => GroupBy::Day,
        }
    }
}

/// `--since`: a duration back from now, or an RFC 3339 date or date-time.
/// Returns Unix milliseconds.
pub fn parse_since(s: &str) -> Result<i64, String> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    parse_since_at(s, now_ms)
}

fn parse_since_at(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    let unit = |c: char| -> Option<i64> {
        Some(match c {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            'w' => 7 * 86_400_000,
            _ => return None,
        })
    };
    if let Some(last) = s.chars().last()
        && let Some(ms) = unit(last)
        && let Ok(n) = s[..s.len() - 1].parse::<i64>()
        && n >= 0
    {
        return Ok(now_ms - n.saturating_mul(ms));
    }
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = time::Date::parse(s, &fmt) {
        return Ok(d.midnight().assume_utc().unix_timestamp() * 1000);
    }
    Err(format!(
        "`{s}` is neither a duration (90m, 24h, 7d) nor a date (2026-11-01) or RFC 3339 time"
    ))
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Add the local CA to the system trust store (and Java's cacerts).
    Install {
        /// Write the trust-store files under this root directory instead of
        /// / (tests, chroots). The CA is always this host's own (from the
        /// state directory): for a machine image, run `trust install` on
        /// each runner after its first start, not at build time.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Replace the local CA with a new one (kept: the old certificate as
    /// ca.crt.old) and install it; then restart the agent.
    Rotate {
        /// As for `install`.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Remove the local CA from the system trust store.
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Print environment variables that make SDKs trust the local CA.
    Env {
        #[arg(long, value_enum, default_value_t = EnvFormatArg::Shell)]
        format: EnvFormatArg,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EnvFormatArg {
    /// `export NAME=VALUE` lines.
    Shell,
    /// `NAME=VALUE` lines, for a runner's .env file.
    Dotenv,
}

/// An error of a command, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    App(#[from] crate::app::AppError),
    #[error(transparent)]
    Top(#[from] crate::control::top::TopError),
    #[error("{0} checks failed")]
    ChecksFailed(usize),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

/// Standard output for a command: a write that fails (a full disk, a
/// closed pipe) is an error with exit code 74, not a panic. The first
/// failure is kept and the command's work goes on (a trust change is
/// finished even when its messages cannot be shown).
#[derive(Default)]
struct Out {
    failed: Option<std::io::Error>,
}

impl Out {
    fn say(&mut self, text: &str) {
        use std::io::Write as _;
        if self.failed.is_none() {
            let mut o = std::io::stdout().lock();
            if let Err(e) = o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
                self.failed = Some(e);
            }
        }
    }

    fn line(&mut self, line: &str) {
        self.say(&format!("{line}\n"));
    }

    fn done(self) -> Result<(), CmdError> {
        match self.failed {
            Some(e) => Err(CmdError::Output(e)),
            None => Ok(()),
        }
    }
}

impl CmdError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CmdError::Ca(e) => e.exit_code(),
            CmdError::Trust(e) => e.exit_code(),
            CmdError::Ledger(e) => e.exit_code(),
            CmdError::App(e) => e.exit_code(),
            CmdError::Top(e) => e.exit_code(),
            CmdError::ChecksFailed(_) => crate::exit::UNAVAILABLE,
            CmdError::Output(_) => crate::exit::IOERR,
        }
    }
}

/// The ledger file under a state directory.
pub fn ledger_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ledger.sqlite")
}

/// The state directory's owner and mode, as `run` checks them, when it
/// exists: a CA found in a directory another user can write is not trusted.
fn check_state_dir(cfg: &Config) -> Result<(), CmdError> {
    if cfg.state_dir.exists() {
        crate::app::check_state_dir(&cfg.state_dir, nix::unistd::geteuid().as_raw())?;
    }
    Ok(())
}

/// Loads (or makes) the CA, logging what changed as `run` does.
fn load_ca(cfg: &Config) -> Result<LocalCa, CmdError> {
    let (ca, status) = load_ca_status(cfg)?;
    crate::app::log_ca_status(&status);
    Ok(ca)
}

/// Loads (or makes) the CA; the caller says what changed (`trust install`
/// does, in its own words: the log's "run `tollgate trust install` again"
/// would be wrong there).
fn load_ca_status(cfg: &Config) -> Result<(LocalCa, crate::ca::CaStatus), CmdError> {
    let hosts: Vec<String> = provider_hosts(cfg).into_iter().map(|h| h.host).collect();
    Ok(LocalCa::load_or_create(&cfg.state_dir, &hosts)?)
}

/// `tollgate check`: prints one line per check; an error when any failed.
pub fn check(cfg: &Config, config_path: Option<&Path>) -> Result<(), CmdError> {
    let outcomes = crate::check::run(
        cfg,
        &crate::check::Host {
            config_path,
            trust_root: Path::new("/"),
            is_root: nix::unistd::geteuid().is_root(),
            dns_timeout: std::time::Duration::from_secs(5),
        },
    );
    let mut out = Out::default();
    out.say(&crate::check::render(&outcomes));
    out.done()?;
    match outcomes
        .iter()
        .filter(|o| o.level == crate::check::Level::Fail)
        .count()
    {
        0 => Ok(()),
        n => Err(CmdError::ChecksFailed(n)),
    }
}

pub fn report(cfg: &Config, args: &ReportArgs) -> Result<(), CmdError> {
    let path = ledger_path(&cfg.state_dir);
    let filter = Filter {
        since_ms: args.since,
        repository: args.repository.clone(),
        job: args.job.clone(),
        run_id: args.run_id.clone(),
        run_attempt: args.run_attempt.clone(),
        job_id: args.job_id.clone(),
        runner: args.runner.clone(),
    };
    // Read only, as root too: a report never switches, migrates or
    // creates the file. A missing ledger, or one with no table yet, is an
    // empty one; an unreadable directory is an error.
    let ledger = match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => match Ledger::open_read_only(&path) {
            Err(crate::ledger::LedgerError::Outdated { .. }) => None,
            other => Some(other?),
        },
    };
    let format = if args.json {
        ReportFormat::Json
    } else if args.csv {
        ReportFormat::Csv
    } else if args.markdown {
        ReportFormat::Markdown
    } else {
        ReportFormat::Table
    };
    // A ledger no agent writes to now: what it holds is real, but calls
    // made while the agent is stopped are not in it.
    let stopped = ledger.is_some()
        && crate::presence::recording(&cfg.state_dir) == crate::presence::Recording::No;
    if stopped {
        eprintln!(
            "tollgate: warning: {}{}: the agent is not running (calls made while it is stopped are not counted)",
            report::NO_AGENT,
            path.display()
        );
    }
    let output = crate::ledger::LedgerError::Output;
    // The records are read one at a time, never all held: JSON is written
    // as they come, the other formats add them up per group.
    if format == ReportFormat::Json {
        let stdout = std::io::stdout();
        let mut json = report::JsonWriter::new(std::io::BufWriter::new(stdout.lock()));
        if let Some(l) = &ledger {
            l.for_each(&filter, |r| json.add(&r))?;
        }
        return Ok(json.finish().map_err(output)?);
    }
    let by: Vec<GroupBy> = args.by.iter().map(|b| (*b).into()).collect();
    let mut summary = report::Summary::new(&by);
    if let Some(l) = &ledger {
        l.for_each(&filter, |r| {
            summary.add(&r);
            Ok(())
        })?;
    }
    // Nothing to show: say why, where "no requests recorded yet" would
    // mislead (a ledger that is not there, filters that matched nothing).
    let mut text = summary.render(format);
    if summary.is_empty() && matches!(format, ReportFormat::Table | ReportFormat::Markdown) {
        text = match &ledger {
            None if std::fs::metadata(&path).is_err() => format!(
                "{}{}: nothing has been recorded there (is the agent running, with this config's state_dir?)\n",
                report::NO_LEDGER,
                path.display()
            ),
            Some(_) if stopped => format!(
                "{}{}: nothing is counting calls on this host (is the tollgate agent running?)\n",
                report::NO_AGENT,
                path.display()
            ),
            Some(l) if filter != crate::ledger::Filter::default() => match l.count()? {
                0 => text,
                n => {
                    // The hint about names only where names were given.
                    let names = filter
                        != crate::ledger::Filter {
                            since_ms: filter.since_ms,
                            ..Default::default()
                        };
                    let other_case = if names {
                        l.names_in_other_case(&filter)?
                    } else {
                        Vec::new()
                    };
                    let like = other_case
                        .iter()
                        .map(|(option, name)| format!("{option} {name:?}"))
                        .collect::<Vec<_>>();
                    format!(
                        "no requests match these filters ({n} requests in the ledger{}{})\n",
                        if names {
                            "; names match exactly, case included"
                        } else {
                            ""
                        },
                        if like.is_empty() {
                            String::new()
                        } else {
                            format!(": {} is in the ledger", like.join(", "))
                        }
                    )
                }
            },
            _ => text,
        };
    }
    if stopped && !summary.is_empty() && format == ReportFormat::Markdown {
        // A job summary shows what was counted, and says that the count
        // may be short.
        text.push_str(
            "\n_The tollgate agent is not running now: calls made while it is stopped are not counted._\n",
        );
    }
    let mut out = Out::default();
    out.say(&text);
    out.done()
}

/// `tollgate top`: the live view, or one plain snapshot with `--once`.
pub fn top(cfg: &Config, args: &TopArgs) -> Result<(), CmdError> {
    let socket = args.socket.as_deref().unwrap_or(&cfg.control.socket);
    if args.once {
        let text =
            crate::control::top::once(socket).map_err(crate::control::top::TopError::from)?;
        let mut out = Out::default();
        out.say(&text);
        return out.done();
    }
    Ok(crate::control::top::run(socket)?)
}

pub fn trust(cfg: &Config, cmd: &TrustCommand) -> Result<(), CmdError> {
    let mut out = Out::default();
    match cmd {
        TrustCommand::Install { root } => {
            check_state_dir(cfg)?;
            let (ca, status) = load_ca_status(cfg)?;
            let replaced = matches!(status, crate::ca::CaStatus::Regenerated { .. });
            if replaced {
                // Said first: the new CA is on disk whatever happens next,
                // and a running agent signs with the CA it loaded at start.
                out.line(&format!(
                    "replaced the local CA in {} (it did not cover every provider host, or could not be used); restart the agent now if it runs (systemctl restart tollgate): until then it signs with the old CA, which clients no longer trust",
                    ca.cert_path().display()
                ));
            }
            let report = trust::install(&ca, root)?;
            for line in &report.lines {
                out.line(line);
            }
            report.finish()?;
        }
        TrustCommand::Rotate { root } => {
            check_state_dir(cfg)?;
            let hosts: Vec<String> = provider_hosts(cfg).into_iter().map(|h| h.host).collect();
            let ca = LocalCa::rotate(&cfg.state_dir, &hosts)?;
            out.line(&format!(
                "replaced the local CA in {}",
                ca.cert_path().display()
            ));
            let report = trust::install(&ca, root)?;
            for line in &report.lines {
                out.line(line);
            }
            out.line(
                "restart the agent now (systemctl restart tollgate): until then it signs with the old CA, which clients no longer trust",
            );
            report.finish()?;
        }
        TrustCommand::Uninstall { root } => {
            let report = trust::uninstall(&cfg.state_dir, root)?;
            for line in &report.lines {
                out.line(line);
            }
            report.finish()?;
        }
        TrustCommand::Env { format } => {
            // Only paths are printed: an existing CA is not opened (no key,
            // no lock, no regeneration while an agent runs), so any user
            // may ask. Without one, root creates it as `run` would.
            let published = match trust::Published::existing(&cfg.state_dir)? {
                Some(p) => p,
                None if !nix::unistd::geteuid().is_root() => {
                    return Err(crate::ca::CaError::NotCreated {
                        dir: cfg.state_dir.join("ca"),
                    }
                    .into());
                }
                None => {
                    check_state_dir(cfg)?;
                    trust::Published::of(&load_ca(cfg)?)
                }
            };
            for w in published.unreadable_by_others() {
                eprintln!("tollgate: {w}");
            }
            let f = match format {
                EnvFormatArg::Shell => EnvFormat::Shell,
                EnvFormatArg::Dotenv => EnvFormat::Dotenv,
            };
            out.say(&trust::env_lines(&published, f));
        }
    }
    out.done()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_durations_and_dates() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_since_at("90m", now).unwrap(), now - 90 * 60_000);
        assert_eq!(parse_since_at("24h", now).unwrap(), now - 86_400_000);
        assert_eq!(parse_since_at("7d", now).unwrap(), now - 7 * 86_400_000);
        assert_eq!(
            parse_since_at("2026-11-01", now).unwrap(),
            1_793_491_200_000
        );
        assert_eq!(
            parse_since_at("2026-11-01T12:00:00Z", now).unwrap(),
            1_793_491_200_000 + 12 * 3_600_000
        );
        for bad in ["yesterday", "-5h", "5y", "", "2026-13-01"] {
            assert!(parse_since_at(bad, now).is_err(), "{bad}");
        }
    }
}
