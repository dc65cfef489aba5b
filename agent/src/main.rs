//! `tollgate`: parse the command line, read the config, start logging, run
//! the command, map its error to an exit code. The work lives in the library.

use std::process::ExitCode;

use clap::Parser;
use tollgate::cli::{self, Cli, Command};
use tollgate::config::{Config, LogFormat};
use tollgate::{app, exit};
use tracing_subscriber::EnvFilter;

/// `RUST_LOG` if it is a valid filter, else `log.level`, else `info`. The
/// exporter library's debug lines show the collector's whole URL, which
/// may hold a vendor's ingest key: it logs at most at info, unless the
/// filter names it itself.
fn log_filter(rust_log: Option<String>, level: &str) -> EnvFilter {
    let (filter, spec) = match rust_log {
        Some(v) if EnvFilter::try_new(&v).is_ok() => (EnvFilter::new(&v), v),
        _ => match EnvFilter::try_new(level) {
            Ok(f) => (f, level.to_string()),
            Err(_) => (EnvFilter::new("info"), "info".into()),
        },
    };
    if spec.contains("opentelemetry_otlp") {
        filter
    } else {
        filter.add_directive(
            "opentelemetry_otlp=info"
                .parse()
                .expect("a valid directive"),
        )
    }
}

fn init_logging(cfg: &Config) {
    let filter = log_filter(std::env::var("RUST_LOG").ok(), &cfg.log.level);
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

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn the_exporter_library_logs_at_most_info_unless_named() {
        for (rust_log, level) in [
            (None, "debug"),
            (Some("trace".to_string()), "info"),
            (Some("not a [filter".to_string()), "debug"),
            (None, "not a [filter"),
        ] {
            let f = log_filter(rust_log.clone(), level).to_string();
            assert!(
                f.contains("opentelemetry_otlp=info"),
                "{rust_log:?} {level}: {f}"
            );
        }
        let f = log_filter(None, "debug,opentelemetry_otlp=debug").to_string();
        assert!(f.contains("opentelemetry_otlp=debug"), "{f}");
        assert!(!f.contains("opentelemetry_otlp=info"), "{f}");
        let f = log_filter(Some("warn".into()), "debug").to_string();
        assert!(
            f.contains("warn") && !f.contains("debug"),
            "RUST_LOG first: {f}"
        );
    }
}
