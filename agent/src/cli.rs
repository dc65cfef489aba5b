//! The command line: argument definitions and the small commands
//! (`report`, `trust`). `run` lives in `app`.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::ca::LocalCa;
use crate::config::Config;
use crate::ledger::{Filter, Ledger};
use crate::providers::catalogue::provider_hosts;
use crate::report::{self, ReportFormat};
use crate::trust::{self, EnvFormat};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
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
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Print a JSON array of records instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Add the local CA to the system trust store (and Java's cacerts).
    Install {
        /// Operate on this root directory instead of / (images, tests).
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
}

impl CmdError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CmdError::Ca(e) => e.exit_code(),
            CmdError::Trust(e) => e.exit_code(),
            CmdError::Ledger(e) => e.exit_code(),
            CmdError::App(e) => e.exit_code(),
        }
    }
}

/// The ledger file under a state directory.
pub fn ledger_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ledger.sqlite")
}

fn load_ca(cfg: &Config) -> Result<LocalCa, CmdError> {
    let hosts: Vec<String> = provider_hosts(cfg).into_iter().map(|h| h.host).collect();
    let (ca, status) = LocalCa::load_or_create(&cfg.state_dir, &hosts)?;
    crate::app::log_ca_status(&status);
    Ok(ca)
}

pub fn report(cfg: &Config, args: &ReportArgs) -> Result<(), CmdError> {
    let path = ledger_path(&cfg.state_dir);
    let records = if path.exists() {
        Ledger::open(&path)?.query(&Filter::default())?
    } else {
        Vec::new()
    };
    let format = if args.json {
        ReportFormat::Json
    } else {
        ReportFormat::Table
    };
    print!("{}", report::render(&records, format));
    Ok(())
}

pub fn trust(cfg: &Config, cmd: &TrustCommand) -> Result<(), CmdError> {
    match cmd {
        TrustCommand::Install { root } => {
            let ca = load_ca(cfg)?;
            for line in trust::install(&ca, root)? {
                println!("{line}");
            }
        }
        TrustCommand::Uninstall { root } => {
            for line in trust::uninstall(&cfg.state_dir, root)? {
                println!("{line}");
            }
        }
        TrustCommand::Env { format } => {
            let ca = load_ca(cfg)?;
            let f = match format {
                EnvFormatArg::Shell => EnvFormat::Shell,
                EnvFormatArg::Dotenv => EnvFormat::Dotenv,
            };
            print!("{}", trust::env_lines(&ca, f));
        }
    }
    Ok(())
}
