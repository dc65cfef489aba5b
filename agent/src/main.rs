//! `tollgate`: parse the command line, read the config, start logging, run
//! the command, map its error to an exit code. The work lives in the library.

use std::process::ExitCode;

use clap::Parser;
use tollgate::cli::{self, Cli, Command};
use tollgate::config::{Config, LogFormat};
use tollgate::{app, exit};
use tracing_subscriber::EnvFilter;

/// The exporter libraries' log targets (`otel_debug!` logs under the
/// crate's package name, with its hyphens). Their debug lines show the
/// collector's whole URL, which may hold a vendor's ingest key.
const EXPORTER_TARGETS: &[&str] = &["opentelemetry-otlp", "opentelemetry-http"];

/// `RUST_LOG` if it is a valid filter, else `log.level`, else `info`; the
/// exporter libraries at info at most (see [`EXPORTER_TARGETS`]), unless
/// the filter names them itself.
fn log_filter(rust_log: Option<String>, level: &str) -> EnvFilter {
    let (mut filter, spec) = match rust_log {
        Some(v) if EnvFilter::try_new(&v).is_ok() => (EnvFilter::new(&v), v),
        _ => match EnvFilter::try_new(level) {
            Ok(f) => (f, level.to_string()),
            Err(_) => (EnvFilter::new("info"), "info".into()),
        },
    };
    // Only where the filter lets debug through somewhere: a quieter
    // filter is not raised to info for them.
    let verbose = filter
        .max_level_hint()
        .is_none_or(|l| l > tracing::level_filters::LevelFilter::INFO);
    for target in EXPORTER_TARGETS {
        if verbose && !spec.contains(target) {
            let directive = format!("{target}=info").parse().expect("a valid directive");
            filter = filter.add_directive(directive);
        }
    }
    filter
}

fn init_logging(cfg: &Config) {
    let filter = log_filter(std::env::var("RUST_LOG").ok(), &cfg.log.level);
    // Colours only on a terminal: under systemd (journald), in a CI hook's
    // log or a file, escape codes would be kept as text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
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
    use tracing_subscriber::layer::SubscriberExt as _;

    /// Whether an event of `target` at `level` gets through `filter`.
    fn passes(filter: tracing_subscriber::EnvFilter, target: &str, level: tracing::Level) -> bool {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
            fn on_event(
                &self,
                _: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let n = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(Count(n.clone()));
        tracing::subscriber::with_default(subscriber, || {
            // (The target must be a literal; the cases name it.)
            match (target, level) {
                ("opentelemetry-otlp", tracing::Level::DEBUG) => {
                    tracing::debug!(target: "opentelemetry-otlp", "x")
                }
                ("opentelemetry-otlp", tracing::Level::INFO) => {
                    tracing::info!(target: "opentelemetry-otlp", "x")
                }
                ("opentelemetry-http", tracing::Level::DEBUG) => {
                    tracing::debug!(target: "opentelemetry-http", "x")
                }
                ("tollgate", tracing::Level::DEBUG) => tracing::debug!(target: "tollgate", "x"),
                _ => unreachable!("no such case"),
            }
        });
        n.load(Ordering::SeqCst) == 1
    }

    #[test]
    fn the_exporter_libraries_log_at_most_info_unless_named() {
        use tracing::Level;
        let f = || log_filter(None, "debug");
        assert!(!passes(f(), "opentelemetry-otlp", Level::DEBUG));
        assert!(!passes(f(), "opentelemetry-http", Level::DEBUG));
        assert!(passes(f(), "opentelemetry-otlp", Level::INFO));
        assert!(
            passes(f(), "tollgate", Level::DEBUG),
            "the rest stays at debug"
        );
        // RUST_LOG first, an invalid one ignored.
        assert!(!passes(
            log_filter(Some("trace".into()), "info"),
            "opentelemetry-otlp",
            Level::DEBUG
        ));
        assert!(!passes(
            log_filter(Some("not a [filter".into()), "debug"),
            "opentelemetry-otlp",
            Level::DEBUG
        ));
        // A quieter filter is not raised for them.
        assert!(!passes(
            log_filter(None, "warn"),
            "opentelemetry-otlp",
            Level::INFO
        ));
        // Named in the filter: as it says.
        let named = log_filter(None, "debug,opentelemetry-otlp=debug");
        assert!(passes(named, "opentelemetry-otlp", Level::DEBUG));
    }
}
