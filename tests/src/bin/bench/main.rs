//! `tollgate-bench` (run by `cargo xtask bench`): tollgate side by side with
//! a direct connection and with the gateways teams would run instead,
//! against one local TLS fake of the provider, in one run, interleaved.
//! Every figure is a ratio (or difference) against a baseline measured in
//! the same run, or a memory figure; each is shown against its target
//! from issue 5 as PASS or MISS, never hidden.
//!
//! Owns: the orchestration of the rows (`rows/`, one file each), the world
//! they run in (`env`: child cgroups, fake provider, agent, peers), the load
//! generator (`load`, run as `tollgate-bench client ROW SPEC` inside the
//! child cgroup), and the report (table plus `target/bench/results.json`).
//! Must never: send traffic beyond 127.0.0.0/8, run a loop without a bound
//! in count and time, or leave a process or cgroup behind (everything it
//! starts is in one of its child cgroups, killed and removed on exit, on
//! error and on SIGINT/SIGTERM).

mod agent;
mod cleanup;
mod env;
mod load;
mod peers;
mod report;
mod rows;
mod stats;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tollgate-bench",
    about = "tollgate's benchmark suite (issue 5)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// A smaller version of every row (under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Only these rows (ids, comma separated; see `--list`).
    #[arg(long, value_delimiter = ',')]
    rows: Vec<String>,
    /// List the rows and exit.
    #[arg(long)]
    list: bool,
    /// Where to write the results (default: target/bench/results.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Diagnostic: the fake offers only HTTP/1.1 (ALPN), so the agent's
    /// upstream connections are HTTP/1.1 instead of HTTP/2.
    #[arg(long)]
    upstream_h1: bool,
    /// Diagnostic: do not start LiteLLM and mitmproxy (their figures say SKIP).
    #[arg(long)]
    no_peers: bool,
    /// Diagnostic: write row 1's per-request latencies of part A (µs,
    /// direct and tollgate, in the order sent) to this JSON file, to look
    /// at the tail, and part B's (all four targets; round r sends target i
    /// at position (i − r) mod 4) next to it as FILE.partb.json.
    #[arg(long)]
    latency_samples: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: the client side of a row, run by the bench itself inside
    /// the child cgroup. Prints one JSON value per line.
    #[command(hide = true)]
    Client { row: String, spec: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Client { row, spec }) = cli.cmd {
        return client_main(&row, &spec);
    }
    if cli.list {
        for r in rows::ROWS {
            println!("{:<12} {}", r.id(), r.title());
        }
        return ExitCode::SUCCESS;
    }
    let selected: Vec<&'static dyn rows::Row> = rows::ROWS
        .iter()
        .copied()
        .filter(|r| cli.rows.is_empty() || cli.rows.iter().any(|x| x == r.id()))
        .collect();
    if selected.is_empty() {
        eprintln!("bench: no row matches {:?} (see --list)", cli.rows);
        return ExitCode::from(64);
    }
    if let Some(why) = tollgate_e2e::kernel_test_unavailable() {
        eprintln!("bench: cannot run here: {why} (the bench loads eBPF programs: run it as root)");
        return ExitCode::from(77);
    }
    let out = cli
        .out
        .unwrap_or_else(|| env::repo_root().join("target/bench/results.json"));
    cleanup::install_signal_handler();
    let started = std::time::Instant::now();
    let mut env = match env::Env::new(cli.quick, cli.upstream_h1) {
        Ok(mut e) => {
            e.no_peers = cli.no_peers;
            e.latency_samples = cli.latency_samples.clone();
            // Set by `cargo xtask bench`: how the agent under test was built.
            if let Some(b) = std::env::var_os("TOLLGATE_BENCH_AGENT_BUILD") {
                e.note(format!("agent build: {}", b.to_string_lossy()));
            }
            e
        }
        Err(e) => {
            eprintln!("bench: cannot set up: {e:#}");
            return ExitCode::from(69);
        }
    };
    let mut results = Vec::new();
    for row in selected {
        eprintln!("bench: row {} ({})", row.id(), row.title());
        let t = std::time::Instant::now();
        let r = row.run(&mut env);
        let secs = t.elapsed().as_secs_f64();
        match &r {
            Ok(_) => eprintln!("bench: row {} done in {secs:.1} s", row.id()),
            Err(e) => eprintln!("bench: row {} failed after {secs:.1} s: {e:#}", row.id()),
        }
        results.push(report::RowResult::new(row, r, secs));
    }
    let notes = env.notes();
    drop(env);
    let report = report::Report {
        quick: cli.quick,
        upstream_h1: cli.upstream_h1,
        wall_secs: started.elapsed().as_secs_f64(),
        rows: results,
        notes,
    };
    print!("{}", report.table());
    if let Err(e) = report.write_json(&out) {
        eprintln!("bench: cannot write {}: {e}", out.display());
        return ExitCode::from(74);
    }
    eprintln!("bench: wrote {}", out.display());
    if report.rows.iter().any(|r| r.error.is_some()) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn client_main(row: &str, spec: &PathBuf) -> ExitCode {
    let Some(r) = rows::find(row) else {
        eprintln!("bench client: unknown row {row}");
        return ExitCode::from(64);
    };
    let spec: serde_json::Value = match std::fs::read(spec)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("bench client: bad spec {}: {e}", spec.display());
            return ExitCode::from(64);
        }
    };
    load::raise_nofile_limit();
    let stdout = std::io::stdout();
    let mut emit = |v: serde_json::Value| {
        let mut o = stdout.lock();
        let _ = writeln!(o, "{v}");
        let _ = o.flush();
    };
    match r.client(spec, &mut emit) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench client {row}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
