//! Figures, their targets and the report: a table on stdout and
//! `target/bench/results.json`. A figure with a target is PASS or MISS; one
//! that could not be measured is SKIP with the reason; a row that failed is
//! ERROR. Nothing is left out of either output.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use crate::rows::Row;

/// What a figure must be to pass.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    Miss,
    Skip,
    Info,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Miss => "MISS",
            Status::Skip => "SKIP",
            Status::Info => "",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub goal: Option<Goal>,
    pub note: String,
}

impl Figure {
    /// A figure shown for context, without a target.
    pub fn info(name: impl Into<String>, value: f64, unit: &'static str) -> Figure {
        Figure {
            name: name.into(),
            value: Some(value),
            unit,
            goal: None,
            note: String::new(),
        }
    }

    /// A figure held against a target.
    pub fn goal(name: impl Into<String>, value: f64, unit: &'static str, goal: Goal) -> Figure {
        Figure {
            goal: Some(goal),
            ..Figure::info(name, value, unit)
        }
    }

    /// A figure (with its target, if any) that could not be measured.
    pub fn skipped(
        name: impl Into<String>,
        unit: &'static str,
        goal: Option<Goal>,
        why: impl Into<String>,
    ) -> Figure {
        Figure {
            name: name.into(),
            value: None,
            unit,
            goal,
            note: why.into(),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    pub fn status(&self) -> Status {
        match (self.value, self.goal) {
            (None, _) => Status::Skip,
            (Some(_), None) => Status::Info,
            (Some(v), Some(Goal::AtMost(t))) if v <= t => Status::Pass,
            (Some(v), Some(Goal::AtLeast(t))) if v >= t => Status::Pass,
            (Some(_), Some(_)) => Status::Miss,
        }
    }
}

pub fn fmt_value(v: f64, unit: &str) -> String {
    let digits = match unit {
        "ms" => 3,
        "us" => 2,
        "x" => 1,
        "%" => 2,
        "MiB" => 1,
        "MB/s" => 1,
        "ratio" => 2,
        _ => 0,
    };
    let u = match unit {
        "x" => "×",
        "ratio" => "",
        u => u,
    };
    format!("{v:.digits$} {u}").trim_end().to_string()
}

fn fmt_goal(g: Option<Goal>, unit: &str) -> String {
    match g {
        None => String::new(),
        Some(Goal::AtMost(t)) => format!("≤ {}", fmt_value(t, unit)),
        Some(Goal::AtLeast(t)) => format!("≥ {}", fmt_value(t, unit)),
    }
}

pub struct RowResult {
    pub id: &'static str,
    pub title: &'static str,
    pub secs: f64,
    pub figures: Vec<Figure>,
    pub error: Option<String>,
}

impl RowResult {
    pub fn new(row: &dyn Row, r: anyhow::Result<Vec<Figure>>, secs: f64) -> RowResult {
        let (figures, error) = match r {
            Ok(f) => (f, None),
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        };
        RowResult {
            id: row.id(),
            title: row.title(),
            secs,
            figures,
            error,
        }
    }
}

pub struct Report {
    pub quick: bool,
    pub upstream_h1: bool,
    pub wall_secs: f64,
    pub rows: Vec<RowResult>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\ntollgate bench ({}{}; {:.0} s; every figure against a baseline from the same run)\n",
            if self.quick { "quick" } else { "full" },
            if self.upstream_h1 {
                ", fake offers HTTP/1.1 only"
            } else {
                ""
            },
            self.wall_secs
        );
        let _ = writeln!(
            out,
            "{:<11} {:<44} {:>13} {:>12}  {:<6} note",
            "row", "figure", "value", "target", "status"
        );
        let _ = writeln!(out, "{}", "-".repeat(100));
        for r in &self.rows {
            if let Some(e) = &r.error {
                let first = e.lines().next().unwrap_or("");
                let _ = writeln!(
                    out,
                    "{:<11} {:<44} {:>13} {:>12}  ERROR  {first}",
                    r.id, r.title, "", ""
                );
                continue;
            }
            for f in &r.figures {
                let v = f
                    .value
                    .map(|v| fmt_value(v, f.unit))
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    out,
                    "{:<11} {:<44} {:>13} {:>12}  {:<6} {}",
                    r.id,
                    f.name,
                    v,
                    fmt_goal(f.goal, f.unit),
                    f.status().as_str(),
                    f.note
                );
            }
        }
        let count = |s: Status| {
            self.rows
                .iter()
                .flat_map(|r| &r.figures)
                .filter(|f| f.status() == s)
                .count()
        };
        let errors = self.rows.iter().filter(|r| r.error.is_some()).count();
        let _ = writeln!(
            out,
            "\n{} PASS, {} MISS, {} SKIP, {} rows in ERROR",
            count(Status::Pass),
            count(Status::Miss),
            count(Status::Skip),
            errors
        );
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                let figures: Vec<Value> = r
                    .figures
                    .iter()
                    .map(|f| {
                        let (cmp, target) = match f.goal {
                            None => (Value::Null, Value::Null),
                            Some(Goal::AtMost(t)) => (json!("<="), json!(t)),
                            Some(Goal::AtLeast(t)) => (json!(">="), json!(t)),
                        };
                        json!({
                            "name": f.name,
                            "value": f.value,
                            "unit": f.unit,
                            "cmp": cmp,
                            "target": target,
                            "status": match f.status() { Status::Info => "INFO", s => s.as_str() },
                            "note": f.note,
                        })
                    })
                    .collect();
                json!({"id": r.id, "title": r.title, "secs": r.secs, "error": r.error, "figures": figures})
            })
            .collect();
        json!({
            "suite": "tollgate-bench",
            "quick": self.quick,
            "upstream_h1": self.upstream_h1,
            "wall_secs": self.wall_secs,
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "machine": machine(),
            "tollgate_bin": tollgate_e2e::tollgate_bin().display().to_string(),
            "rows": rows,
            "notes": self.notes,
        })
    }

    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let s = serde_json::to_string_pretty(&self.to_json()).unwrap_or_default();
        std::fs::write(path, s + "\n")
    }
}

fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": kernel.trim(),
        "loadavg_at_end": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}
