//! `tollgate`: parse the command line, read the config, start logging, run
//! the command, map its error to an exit code. The work lives in the library.

use std::process::ExitCode;

use clap::Parser;
use tollgate::cli::{self, Cli, Command};
use tollgate::config::{Config, LogFormat};
use tollgate::{app, exit};
use tracing_subscriber::EnvFilter;

fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    // clap's own exit code for a bad command line is 2; ours is EX_USAGE,
    // as for a bad config. Help and version still exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    let (cfg, path) = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    init_logging(&cfg);
    let result = match &cli.command {
        Command::Run => app::run_blocking(cfg).map_err(cli::CmdError::from),
        Command::Report(args) => cli::report(&cfg, args),
        Command::Trust(cmd) => cli::trust(&cfg, cmd),
        Command::Top(args) => cli::top(&cfg, args),
        Command::Check => cli::check(&cfg, path.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
