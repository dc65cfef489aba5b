//! The rows of the suite, one file each. A row measures in the bench
//! process (`run`) and, when it needs a load generator inside the clients
//! cgroup, runs its own `client` half there (`tollgate-bench client ID`).
//!
//! Adding a row (budget enforcement, caching, ...) is one new file with a
//! `Row` implementation plus one line in [`ROWS`]; a row that needs other
//! agent settings starts its agent with `env.start_agent_with(toml)`.

use anyhow::{Result, bail};
use serde_json::Value;

use crate::env::Env;
use crate::report::Figure;

mod collector;
mod connect;
mod latency;
mod memory;
mod streaming;
mod throughput;
mod tokens;

pub trait Row: Sync {
    /// Short id: `--rows`, the client subcommand, results.json.
    fn id(&self) -> &'static str;
    /// What the row measures, in a few words.
    fn title(&self) -> &'static str;
    /// Measures; every figure with its target (see `report`).
    fn run(&self, env: &mut Env) -> Result<Vec<Figure>>;
    /// The client half, in its own process in the clients cgroup: reads
    /// `spec` (made by `run`), prints results with `emit`.
    fn client(&self, spec: Value, emit: &mut dyn FnMut(Value)) -> Result<()> {
        let _ = (spec, emit);
        bail!("row {} has no client half", self.id())
    }
}

/// Every row, in the order they run.
pub static ROWS: &[&dyn Row] = &[
    &latency::Latency,
    &streaming::Streaming,
    &throughput::Throughput,
    &memory::Memory,
    &connect::Connect,
    &tokens::Tokens,
    &collector::Collector,
];

pub fn find(id: &str) -> Option<&'static dyn Row> {
    ROWS.iter().copied().find(|r| r.id() == id)
}
