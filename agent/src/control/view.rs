//! How a snapshot reads: the cells both `top` screens share, and the
//! plain-text form of `top --once`.

use super::protocol::{Aggregate, JobRow, ProcessRow, Snapshot};

/// Columns of the process table.
pub const PROCESS_HEADER: [&str; 8] = [
    "PID",
    "EXE",
    "JOB",
    "IN FLIGHT",
    "REQ",
    "TOK/S",
    "COST",
    "ERR",
];
/// Columns of the job table.
pub const JOB_HEADER: [&str; 7] = [
    "REPOSITORY",
    "JOB",
    "IN FLIGHT",
    "REQ",
    "TOK/S",
    "COST",
    "ERR",
];
/// Leading text columns (left-aligned) of each table; the rest are numbers.
pub const PROCESS_TEXT_COLS: usize = 3;
pub const JOB_TEXT_COLS: usize = 2;

/// `3725` → `1h02m05s`; days when it is that long.
pub fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m{s:02}s"),
        _ => format!("{d}d{h:02}h{m:02}m"),
    }
}

/// Dollars with four decimals; `*` when some requests had no known price
/// (the sum is a lower bound), `-` when none had.
pub fn cost(a: &Aggregate) -> String {
    if a.requests > 0 && a.unpriced == a.requests {
        return "-".into();
    }
    let v = a.cost_usd;
    let mut s = if v > 0.0 && v < 0.00005 {
        "<0.0001".to_string()
    } else {
        format!("{v:.4}")
    };
    if a.unpriced > 0 {
        s.push('*');
    }
    s
}

pub fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Text for an optional field: `-` when absent or empty, control
/// characters replaced.
pub fn text(s: Option<&str>) -> String {
    match s.map(str::trim).filter(|s| !s.is_empty()) {
        None => "-".into(),
        Some(s) => s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    }
}

/// The executable's base name (a path's last component).
pub fn exe_name(exe: &str) -> String {
    let e = exe.trim_end_matches(" (deleted)");
    text(e.rsplit('/').next().filter(|b| !b.is_empty()).or(Some(e)))
}

fn numbers(a: &Aggregate) -> [String; 5] {
    [
        a.in_flight.to_string(),
        a.requests.to_string(),
        rate(a.tokens_per_sec),
        cost(a),
        a.errors.to_string(),
    ]
}

pub fn process_cells(p: &ProcessRow) -> Vec<String> {
    let mut v = vec![p.pid.to_string(), exe_name(&p.exe), text(p.job.as_deref())];
    v.extend(numbers(&p.agg));
    v
}

pub fn job_cells(j: &JobRow) -> Vec<String> {
    let mut v = vec![text(j.repository.as_deref()), text(j.job.as_deref())];
    v.extend(numbers(&j.agg));
    v
}

/// The header's two lines.
pub fn header_lines(s: &Snapshot) -> [String; 2] {
    [
        format!(
            "tollgate {} (pid {})  up {}",
            s.agent.version,
            s.agent.pid,
            uptime(s.agent.uptime_secs)
        ),
        format!(
            "requests {}  in flight {}  tok/s {}  spend ${}  errors {}",
            s.totals.requests,
            s.totals.in_flight,
            rate(s.totals.tokens_per_sec),
            cost(&s.totals),
            s.totals.errors
        ),
    ]
}

/// A plain table: text columns left-aligned, numbers right-aligned, two
/// spaces between columns, no trailing blanks.
fn plain_table(header: &[&str], rows: &[Vec<String>], text_cols: usize) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            let pad = " ".repeat(width[i].saturating_sub(c.chars().count()));
            if i < text_cols {
                s.push_str(c);
                s.push_str(&pad);
            } else {
                s.push_str(&pad);
                s.push_str(c);
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `top --once`: the header and both tables as plain text.
pub fn plain(s: &Snapshot) -> String {
    let [a, b] = header_lines(s);
    let mut out = format!("{a}\n{b}\n\nPROCESSES\n");
    if s.processes.is_empty() {
        out.push_str("no LLM requests in the last 10 minutes\n");
    } else {
        let rows: Vec<Vec<String>> = s.processes.iter().map(process_cells).collect();
        out.push_str(&plain_table(&PROCESS_HEADER, &rows, PROCESS_TEXT_COLS));
    }
    out.push_str("\nJOBS\n");
    if s.jobs.is_empty() {
        out.push_str("no LLM requests in the last 10 minutes\n");
    } else {
        let rows: Vec<Vec<String>> = s.jobs.iter().map(job_cells).collect();
        out.push_str(&plain_table(&JOB_HEADER, &rows, JOB_TEXT_COLS));
    }
    if s.totals.unpriced > 0 {
        out.push_str("* some requests have no known price: their cost is not in the sum\n");
    }
    out
}
