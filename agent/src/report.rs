//! `tollgate report`: the ledger's records as a table or as JSON.
//!
//! Owns: the presentation of records. Must never: read the ledger itself
//! (the caller queries it), hold every record of a report in memory (a
//! [`Summary`] adds them up as they come), or show anything the record does
//! not hold.
//!
//! Cost in the table: the sum of the known costs of a group. When some
//! requests of the group have no known price, the sum is marked `*` (a
//! lower bound) and a footnote says so; when none has a price it is `-`.
//! Groups are sorted by that sum, then by tokens, both descending; a table
//! grouped by day first lists the days oldest first, each sorted so.

use std::collections::BTreeMap;

use crate::meter::UsageRecord;

/// Output format of `report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    /// A plain-text table of groups (see [`GroupBy`]) with a total.
    Table,
    /// A JSON array of the records, as serde writes `UsageRecord`.
    Json,
    /// The table's groups as CSV (RFC 4180), one header line, no total.
    Csv,
    /// The table as a GitHub-flavoured Markdown table with a total row
    /// and the same footnotes (job summaries, merge request notes).
    Markdown,
}

/// A grouping key of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Repository,
    Job,
    Exe,
    Model,
    Team,
    Provider,
    /// The service tier that served the request (`default`, `flex`, ...).
    Tier,
    /// What was called (`chat`, `embeddings`, `batch_results`, ...).
    Operation,
    /// The UTC day the request started (`2026-12-01`); groups by day are
    /// listed in date order.
    Day,
}

impl GroupBy {
    /// The default grouping: repository, job, executable, model.
    pub const DEFAULT: &'static [GroupBy] = &[
        GroupBy::Repository,
        GroupBy::Job,
        GroupBy::Exe,
        GroupBy::Model,
    ];

    fn header(self) -> &'static str {
        match self {
            GroupBy::Repository => "REPOSITORY",
            GroupBy::Job => "JOB",
            GroupBy::Exe => "EXECUTABLE",
            GroupBy::Model => "MODEL",
            GroupBy::Team => "TEAM",
            GroupBy::Provider => "PROVIDER",
            GroupBy::Tier => "TIER",
            GroupBy::Operation => "OPERATION",
            GroupBy::Day => "DAY",
        }
    }

    /// The column title in Markdown.
    fn title(self) -> &'static str {
        match self {
            GroupBy::Repository => "Repository",
            GroupBy::Job => "Job",
            GroupBy::Exe => "Executable",
            GroupBy::Model => "Model",
            GroupBy::Team => "Team",
            GroupBy::Provider => "Provider",
            GroupBy::Tier => "Service tier",
            GroupBy::Operation => "Operation",
            GroupBy::Day => "Day (UTC)",
        }
    }

    fn key(self, r: &UsageRecord) -> String {
        match self {
            GroupBy::Repository => cell(r.who.repository.as_deref()),
            GroupBy::Job => cell(r.who.job.as_deref()),
            GroupBy::Exe => exe_name(r),
            GroupBy::Model => cell(r.model.as_deref().or(r.response_model.as_deref())),
            GroupBy::Team => cell(r.who.team.as_deref()),
            GroupBy::Provider => cell(Some(r.provider.as_str())),
            GroupBy::Tier => cell(r.service_tier.as_deref()),
            GroupBy::Operation => cell(Some(r.operation.as_str())),
            GroupBy::Day => day_of(r.started_at_ms),
        }
    }
}

/// The UTC date (`YYYY-MM-DD`) of a Unix time in milliseconds.
fn day_of(ms: i64) -> String {
    // Days since 1970-01-01, then the civil date (Howard Hinnant's
    // days_from_civil inverse), valid for every i64 millisecond count.
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Longest text cell before it is shortened with `…`.
const CELL_MAX: usize = 40;

#[derive(Default, Clone)]
struct Group {
    requests: u64,
    input: u64,
    output: u64,
    cost: f64,
    priced: u64,
}

impl Group {
    fn add(&mut self, r: &UsageRecord) {
        self.requests += 1;
        self.input = self.input.saturating_add(r.usage.input_tokens);
        self.output = self.output.saturating_add(r.usage.output_tokens);
        if let Some(c) = r.cost_usd.filter(|c| c.is_finite()) {
            self.cost += c;
            self.priced += 1;
        }
    }

    fn merge(&mut self, g: &Group) {
        self.requests += g.requests;
        self.input = self.input.saturating_add(g.input);
        self.output = self.output.saturating_add(g.output);
        self.cost += g.cost;
        self.priced += g.priced;
    }

    fn cost_cell(&self) -> String {
        if self.priced == 0 {
            "-".into()
        } else if self.priced < self.requests {
            format!("{}*", money(self.cost))
        } else {
            money(self.cost)
        }
    }
}

fn money(v: f64) -> String {
    if v > 0.0 && v < 0.00005 {
        "<0.0001".into()
    } else {
        format!("{v:.4}")
    }
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A group key's text: whole (groups are never merged by a shortened
/// name), control characters blanked, `-` for none.
fn cell(s: Option<&str>) -> String {
    match s.map(str::trim).filter(|s| !s.is_empty()) {
        None => "-".into(),
        Some(s) => s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    }
}

/// A key as the text table shows it: at most `CELL_MAX` characters.
fn shorten(s: String) -> String {
    if s.chars().count() > CELL_MAX {
        let mut t: String = s.chars().take(CELL_MAX - 1).collect();
        t.push('…');
        t
    } else {
        s
    }
}

fn exe_name(r: &UsageRecord) -> String {
    let base = r
        .who
        .exe
        .as_deref()
        .map(|e| e.trim_end_matches(" (deleted)"))
        .and_then(|e| e.rsplit('/').next())
        .filter(|b| !b.is_empty());
    cell(base.or(Some(r.who.comm.as_str())))
}

/// The records of a report, added up one at a time: its groups and
/// counts, never the records themselves, so a report over millions of
/// rows holds one entry per group.
pub struct Summary {
    by: Vec<GroupBy>,
    groups: BTreeMap<Vec<String>, Group>,
    records: u64,
    estimated: u64,
}

impl Summary {
    /// An empty summary grouping by `by` (the default grouping if empty).
    pub fn new(by: &[GroupBy]) -> Summary {
        let by = if by.is_empty() { GroupBy::DEFAULT } else { by };
        Summary {
            by: by.to_vec(),
            groups: BTreeMap::new(),
            records: 0,
            estimated: 0,
        }
    }

    pub fn add(&mut self, r: &UsageRecord) {
        let key: Vec<String> = self.by.iter().map(|b| b.key(r)).collect();
        self.groups.entry(key).or_default().add(r);
        self.records += 1;
        self.estimated += u64::from(r.estimated);
    }

    /// Renders the summary as a table, CSV or Markdown (JSON is the
    /// records themselves: see [`JsonWriter`]).
    /// No record was added.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub fn render(&self, format: ReportFormat) -> String {
        match format {
            ReportFormat::Table | ReportFormat::Json => table(self),
            ReportFormat::Csv => csv(self),
            ReportFormat::Markdown => markdown(self),
        }
    }

    /// The groups, sorted by cost, then tokens (descending), then key;
    /// by day first (oldest first) when the first grouping is the day.
    fn rows(&self) -> Vec<(Vec<String>, Group)> {
        let mut rows: Vec<(Vec<String>, Group)> = self
            .groups
            .iter()
            .map(|(k, g)| (k.clone(), g.clone()))
            .collect();
        let by_day = self.by.first() == Some(&GroupBy::Day);
        rows.sort_by(|(ka, a), (kb, b)| {
            (if by_day {
                ka[0].cmp(&kb[0])
            } else {
                std::cmp::Ordering::Equal
            })
            .then(b.cost.total_cmp(&a.cost))
            .then((b.input.saturating_add(b.output)).cmp(&a.input.saturating_add(a.output)))
            .then(ka.cmp(kb))
        });
        rows
    }
}

/// Writes records as the JSON array serde writes for a `Vec<UsageRecord>`
/// (pretty, byte for byte), one record at a time.
pub struct JsonWriter<W: std::io::Write> {
    out: W,
    first: bool,
}

impl<W: std::io::Write> JsonWriter<W> {
    pub fn new(out: W) -> Self {
        JsonWriter { out, first: true }
    }

    pub fn add(&mut self, r: &UsageRecord) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(r).map_err(std::io::Error::other)?;
        self.out
            .write_all(if self.first { b"[\n" } else { b",\n" })?;
        self.first = false;
        // An element of a pretty array is indented one level: every line
        // of it (a string's newlines are escaped, so lines are structure).
        for (i, line) in text.lines().enumerate() {
            if i > 0 {
                self.out.write_all(b"\n")?;
            }
            self.out.write_all(b"  ")?;
            self.out.write_all(line.as_bytes())?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.out
            .write_all(if self.first { b"[]\n" } else { b"\n]\n" })?;
        self.out.flush()
    }
}

/// Renders `records` grouped by repository, job, executable and model
/// (see the module docs for the table's rules).
pub fn render(records: &[UsageRecord], format: ReportFormat) -> String {
    render_by(records, format, GroupBy::DEFAULT)
}

/// Renders `records` grouped by `by` (JSON ignores the grouping).
pub fn render_by(records: &[UsageRecord], format: ReportFormat, by: &[GroupBy]) -> String {
    if format == ReportFormat::Json {
        return match serde_json::to_string_pretty(records) {
            Ok(s) => s + "\n",
            Err(e) => format!("{{\"error\": {:?}}}\n", e.to_string()),
        };
    }
    let mut summary = Summary::new(by);
    for r in records {
        summary.add(r);
    }
    summary.render(format)
}

/// A Markdown table cell: pipes, backslashes and emphasis characters
/// escaped, so a model or job name cannot break or style the table.
fn md_cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '|' | '\\' | '*' | '_' | '`' | '<' | '>' | '[' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// How `tollgate report` starts its one line when there is no ledger
/// file at all (the job-summary scripts look for it).
pub const NO_LEDGER: &str = "no ledger at ";
/// How a report with nothing to show starts when the ledger is there but
/// no agent is recording to it (the job summary scripts look for it: the
/// spend is unknown then, not nil).
pub const NO_AGENT: &str = "no agent is recording to ";

fn markdown(summary: &Summary) -> String {
    if summary.records == 0 {
        return "no requests recorded yet\n".into();
    }
    let by = &summary.by;
    let rows = summary.rows();
    let mut total = Group::default();
    for (_, g) in &rows {
        total.merge(g);
    }
    let numbers = |g: &Group| {
        [
            thousands(g.requests),
            thousands(g.input),
            thousands(g.output),
            md_cell(&g.cost_cell()),
        ]
    };
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let mut head: Vec<String> = by.iter().map(|b| b.title().to_string()).collect();
    head.extend(["Requests", "Input tokens", "Output tokens", "Cost (USD)"].map(String::from));
    let mut out = line(head);
    let mut rule: Vec<String> = by.iter().map(|_| "---".to_string()).collect();
    rule.extend(["---:"; 4].map(String::from));
    out.push_str(&line(rule));
    for (k, g) in &rows {
        let mut cells: Vec<String> = k.iter().map(|c| md_cell(c)).collect();
        cells.extend(numbers(g));
        out.push_str(&line(cells));
    }
    let mut last = vec![String::new(); by.len()];
    last[0] = "**Total**".into();
    last.extend(numbers(&total).map(|n| format!("**{n}**")));
    out.push_str(&line(last));
    if total.priced < total.requests && total.priced > 0 {
        out.push_str(&format!(
            "\n\\* {} of {} requests have no known price; costs marked \\* count the priced ones only.\n",
            total.requests - total.priced,
            total.requests
        ));
    } else if total.priced == 0 {
        out.push_str("\nNo request has a known price yet.\n");
    }
    let estimated = summary.estimated;
    if estimated > 0 {
        out.push_str(&format!(
            "\n{estimated} requests were estimated locally (the provider sent no count).\n"
        ));
    }
    out
}

/// One CSV cell. Keys come from jobs (job names from their environment,
/// model names from request bodies): a cell a spreadsheet would run as a
/// formula (`=`, `+`, `-`, `@`, or a tab or carriage return first) is
/// prefixed with `'`, as OWASP advises for CSV injection.
fn csv_field(s: &str) -> String {
    let s: std::borrow::Cow<'_, str> = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}").into()
    } else {
        s.into()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

/// A cost for CSV: ten decimals, trailing zeros dropped. Six had shown
/// a small known cost (an embeddings group: 1.6e-7) as 0.000000.
fn csv_cost(c: f64) -> String {
    let s = format!("{c:.10}");
    let s = s.trim_end_matches('0');
    s.strip_suffix('.').unwrap_or(s).to_string()
}

fn csv(summary: &Summary) -> String {
    let mut out: Vec<String> = summary
        .by
        .iter()
        .map(|b| b.header().to_ascii_lowercase())
        .collect();
    out.extend(
        [
            "requests",
            "input_tokens",
            "output_tokens",
            "cost_usd",
            "priced_requests",
        ]
        .map(String::from),
    );
    let mut text = out.join(",") + "\n";
    for (k, g) in summary.rows() {
        let mut f: Vec<String> = k
            .iter()
            .map(|c| csv_field(if c == "-" { "" } else { c }))
            .collect();
        f.push(g.requests.to_string());
        f.push(g.input.to_string());
        f.push(g.output.to_string());
        f.push(if g.priced == 0 {
            String::new()
        } else {
            csv_cost(g.cost)
        });
        f.push(g.priced.to_string());
        text += &(f.join(",") + "\n");
    }
    text
}

fn table(summary: &Summary) -> String {
    if summary.records == 0 {
        return "no requests recorded yet\n".into();
    }
    let by = &summary.by;
    let mut rows = summary.rows();
    let mut total = Group::default();
    for (_, g) in &rows {
        total.merge(g);
    }

    let nk = by.len();
    let mut header: Vec<&str> = by.iter().map(|b| b.header()).collect();
    header.extend(["REQUESTS", "INPUT", "OUTPUT", "COST (USD)"]);
    let numbers = |g: &Group| {
        [
            thousands(g.requests),
            thousands(g.input),
            thousands(g.output),
            g.cost_cell(),
        ]
    };
    let mut lines: Vec<Vec<String>> = rows
        .iter_mut()
        .map(|(k, g)| {
            let mut l: Vec<String> = std::mem::take(k).into_iter().map(shorten).collect();
            l.extend(numbers(g));
            l
        })
        .collect();
    let mut last = vec![String::new(); nk];
    last[0] = "TOTAL".into();
    last.extend(numbers(&total));
    lines.push(last);

    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for l in &lines {
        for (w, c) in width.iter_mut().zip(l.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let fmt_line = |cells: &[&str]| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if i >= nk {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            }
        }
        s.trim_end().to_string() + "\n"
    };

    let mut out = fmt_line(&header);
    let n = lines.len();
    for (i, l) in lines.iter().enumerate() {
        if i + 1 == n {
            let rule: usize = width.iter().sum::<usize>() + 2 * (width.len() - 1);
            out.push_str(&"-".repeat(rule));
            out.push('\n');
        }
        let cells: Vec<&str> = l.iter().map(String::as_str).collect();
        out.push_str(&fmt_line(&cells));
    }
    if total.priced < total.requests && total.priced > 0 {
        out.push_str(&format!(
            "* {} of {} requests have no known price; costs marked * count the priced ones only\n",
            total.requests - total.priced,
            total.requests
        ));
    } else if total.priced == 0 {
        out.push_str("no request has a known price yet\n");
    }
    let estimated = summary.estimated;
    if estimated > 0 {
        out.push_str(&format!("({estimated} requests estimated locally)\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::{Attribution, Usage};

    fn rec(
        repo: &str,
        job: &str,
        exe: &str,
        model: &str,
        input: u64,
        output: u64,
        cost: Option<f64>,
    ) -> UsageRecord {
        UsageRecord {
            model: Some(model.into()),
            usage: Usage {
                input_tokens: input,
                output_tokens: output,
                ..Usage::default()
            },
            cost_usd: cost,
            who: Attribution {
                comm: "comm".into(),
                exe: Some(exe.into()),
                repository: Some(repo.into()),
                job: Some(job.into()),
                ..Attribution::default()
            }
            .into(),
            ..UsageRecord::default()
        }
    }

    /// The cells of the first line whose leading cells are `starts`.
    fn row<'a>(out: &'a str, starts: &str) -> Vec<&'a str> {
        let want: Vec<&str> = starts.split_whitespace().collect();
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.starts_with(&want))
            .unwrap_or_else(|| panic!("no line starting with {starts} in\n{out}"))
    }

    #[test]
    fn empty_ledger() {
        assert_eq!(
            render(&[], ReportFormat::Table),
            "no requests recorded yet\n"
        );
        assert_eq!(render(&[], ReportFormat::Json).trim(), "[]");
    }

    #[test]
    fn table_groups_sorts_and_totals() {
        let mut est = rec(
            "acme/app",
            "test",
            "/usr/bin/python3.11",
            "gpt-4o",
            1000,
            10,
            Some(0.5),
        );
        est.estimated = true;
        let records = vec![
            rec(
                "acme/app",
                "test",
                "/usr/bin/python3.11",
                "gpt-4o",
                1000,
                100,
                Some(1.25),
            ),
            est,
            rec(
                "acme/lib",
                "lint",
                "/usr/bin/node",
                "claude-sonnet-4",
                5_000_000,
                20,
                None,
            ),
            rec(
                "acme/lib",
                "lint",
                "/usr/bin/node",
                "claude-sonnet-4",
                10,
                20,
                Some(0.25),
            ),
            rec(
                "acme/app",
                "build",
                "/usr/bin/curl",
                "gpt-4o-mini",
                7,
                3,
                None,
            ),
        ];
        let out = render(&records, ReportFormat::Table);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "REPOSITORY",
                "JOB",
                "EXECUTABLE",
                "MODEL",
                "REQUESTS",
                "INPUT",
                "OUTPUT",
                "COST",
                "(USD)"
            ]
        );
        // Sorted by cost: the python group (1.75) before node (0.25*) before curl (-).
        assert!(lines[1].starts_with("acme/app"), "{out}");
        assert_eq!(
            row(&out, "acme/app  test"),
            [
                "acme/app",
                "test",
                "python3.11",
                "gpt-4o",
                "2",
                "2,000",
                "110",
                "1.7500"
            ]
        );
        assert_eq!(
            row(&out, "acme/lib"),
            [
                "acme/lib",
                "lint",
                "node",
                "claude-sonnet-4",
                "2",
                "5,000,010",
                "40",
                "0.2500*"
            ]
        );
        assert_eq!(
            row(&out, "acme/app  build"),
            [
                "acme/app",
                "build",
                "curl",
                "gpt-4o-mini",
                "1",
                "7",
                "3",
                "-"
            ]
        );
        assert!(
            lines[3].contains("curl"),
            "unpriced, fewest tokens last: {out}"
        );
        assert_eq!(
            row(&out, "TOTAL"),
            ["TOTAL", "5", "5,002,017", "153", "2.0000*"]
        );
        assert!(out.contains("2 of 5 requests have no known price"), "{out}");
        assert!(out.contains("(1 requests estimated locally)"), "{out}");
        // Numbers are right-aligned under their header.
        let end = lines[0].find("REQUESTS").expect("header") + "REQUESTS".len();
        for l in &lines[1..4] {
            let b = l.as_bytes();
            assert!(
                b[end - 1].is_ascii_digit() && b[end] == b' ',
                "misaligned: {l}"
            );
        }
    }

    #[test]
    fn missing_fields_and_long_names() {
        let mut r = rec("x", "y", "", "m", 1, 1, None);
        let w = std::sync::Arc::make_mut(&mut r.who);
        w.repository = None;
        w.job = None;
        w.exe = None;
        w.comm = "curl".into();
        r.model = None;
        r.response_model = Some("gpt-4o-2024-08-06".into());
        let mut long = rec(
            &"a/".repeat(60),
            "j",
            "/x/tool (deleted)",
            "m",
            1,
            1,
            Some(0.00001),
        );
        std::sync::Arc::make_mut(&mut long.who).job = Some("line\nbreak".into());
        let out = render(&[r, long], ReportFormat::Table);
        assert_eq!(
            row(&out, "-"),
            ["-", "-", "curl", "gpt-4o-2024-08-06", "1", "1", "1", "-"]
        );
        assert!(
            out.contains('…') && out.contains("tool") && !out.contains("(deleted)"),
            "{out}"
        );
        assert!(
            out.contains("line break") && out.contains("<0.0001"),
            "{out}"
        );
        assert!(!out.contains("estimated"), "{out}");
    }

    #[test]
    fn long_names_that_share_a_prefix_stay_apart() {
        // Bedrock ARN model ids share their first 39 characters.
        let arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/";
        let a = rec("o/r", "j", "/bin/x", &format!("{arn}claude-a"), 1, 1, None);
        let b = rec("o/r", "j", "/bin/x", &format!("{arn}claude-b"), 2, 2, None);
        let by = [GroupBy::Model];
        let csv = render_by(&[a.clone(), b.clone()], ReportFormat::Csv, &by);
        assert!(csv.contains(&format!("{arn}claude-a,1,")), "{csv}");
        assert!(csv.contains(&format!("{arn}claude-b,1,")), "{csv}");
        let md = render_by(&[a.clone(), b.clone()], ReportFormat::Markdown, &by);
        assert!(md.contains("claude-a") && md.contains("claude-b"), "{md}");
        // The text table shortens what it shows, but keeps two rows.
        let t = render_by(&[a, b], ReportFormat::Table, &by);
        assert_eq!(t.matches('…').count(), 2, "{t}");
    }

    #[test]
    fn json_written_a_record_at_a_time_is_serdes_array_byte_for_byte() {
        let mut a = rec(
            "acme/app",
            "test",
            "/usr/bin/python3",
            "gpt-4o",
            3,
            4,
            Some(0.5),
        );
        a.path = "/v1/x\n\"y\"\t[z]".into();
        let b = rec("acme/other", "lint", "/usr/bin/node", "claude", 1, 2, None);
        for records in [vec![], vec![a.clone()], vec![a, b.clone(), b]] {
            let mut out = Vec::new();
            let mut w = JsonWriter::new(&mut out);
            for r in &records {
                w.add(r).unwrap();
            }
            w.finish().unwrap();
            let want = serde_json::to_string_pretty(&records).unwrap() + "\n";
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn json_is_the_records_serde_form() {
        let mut r = rec(
            "acme/app",
            "test",
            "/usr/bin/python3",
            "gpt-4o",
            3,
            4,
            Some(0.5),
        );
        r.id = Some(9);
        r.estimated = true;
        let out = render(std::slice::from_ref(&r), ReportFormat::Json);
        let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        let arr = v.as_array().expect("an array");
        assert_eq!(arr.len(), 1);
        assert_eq!(arr[0]["id"], 9);
        assert_eq!(arr[0]["repository"], "acme/app");
        assert_eq!(arr[0]["input_tokens"], 3);
        assert_eq!(arr[0]["cost_usd"], 0.5);
        assert_eq!(arr[0]["estimated"], true);
        let back: Vec<UsageRecord> = serde_json::from_str(&out).expect("round trips");
        assert_eq!(back, vec![r]);
    }

    #[test]
    fn markdown_table() {
        let mut est = rec(
            "acme/app",
            "test",
            "/usr/bin/python3",
            "gpt-4o",
            1000,
            10,
            Some(0.5),
        );
        est.estimated = true;
        let recs = vec![
            rec(
                "acme/app",
                "test",
                "/usr/bin/python3",
                "gpt-4o",
                1000,
                100,
                Some(1.25),
            ),
            est,
            rec(
                "acme/app",
                "test",
                "/usr/bin/node",
                "claude|x_y",
                7,
                3,
                None,
            ),
        ];
        let md = render_by(
            &recs,
            ReportFormat::Markdown,
            &[GroupBy::Model, GroupBy::Exe],
        );
        assert_eq!(
            md,
            "| Model | Executable | Requests | Input tokens | Output tokens | Cost (USD) |\n\
             | --- | --- | ---: | ---: | ---: | ---: |\n\
             | gpt-4o | python3 | 2 | 2,000 | 110 | 1.7500 |\n\
             | claude\\|x\\_y | node | 1 | 7 | 3 | - |\n\
             | **Total** |  | **3** | **2,007** | **113** | **1.7500\\*** |\n\
             \n\\* 1 of 3 requests have no known price; costs marked \\* count the priced ones only.\n\
             \n1 requests were estimated locally (the provider sent no count).\n"
        );
        assert_eq!(
            render(&[], ReportFormat::Markdown),
            "no requests recorded yet\n"
        );
    }

    #[test]
    fn days_are_utc_dates_and_listed_in_date_order() {
        for (ms, day) in [
            (0, "1970-01-01"),
            (86_399_999, "1970-01-01"),
            (-1, "1969-12-31"),
            (951_782_400_000, "2000-02-29"),
            (1_796_083_200_000, "2026-12-01"),
            (1_796_169_599_999, "2026-12-01"),
            (4_102_444_800_000, "2100-01-01"),
        ] {
            assert_eq!(day_of(ms), day, "{ms}");
        }
        // Every day of four centuries round-trips through the civil date.
        let mut prev = day_of(-1);
        for d in 0..146_097i64 {
            let next = day_of(d * 86_400_000);
            assert!(next > prev, "{prev} then {next}");
            prev = next;
        }
        assert!(day_of(i64::MIN).len() >= 10 && day_of(i64::MAX).len() >= 10);
        let at = |ms: i64, op: &str, cost: f64| {
            let mut r = rec(
                "acme/app",
                "lint",
                "/usr/bin/python3",
                "gpt-4o",
                10,
                1,
                Some(cost),
            );
            r.started_at_ms = ms;
            r.operation = op.into();
            r
        };
        let recs = vec![
            at(1_796_083_200_000, "chat", 0.5),
            at(1_795_996_800_000, "chat", 0.25),
            at(1_795_996_800_001, "embeddings", 1.0),
            at(1_796_083_200_001, "chat", 0.5),
        ];
        let t = render_by(
            &recs,
            ReportFormat::Table,
            &[GroupBy::Day, GroupBy::Operation],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("DAY") && lines[0].contains("OPERATION"),
            "{t}"
        );
        // Oldest first, then by cost within a day.
        assert!(
            lines[1].starts_with("2026-11-30") && lines[1].contains("embeddings"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("2026-11-30") && lines[2].contains("chat"),
            "{t}"
        );
        assert_eq!(row(&t, "2026-12-01")[2..4], ["2", "20"], "{t}");
        // Day second: by cost, as any grouping.
        let t = render_by(
            &recs,
            ReportFormat::Table,
            &[GroupBy::Operation, GroupBy::Day],
        );
        let lines: Vec<&str> = t.lines().collect();
        // (Equal costs: more tokens first.)
        assert!(
            lines[1].starts_with("chat") && lines[1].contains("2026-12-01"),
            "{t}"
        );
        assert!(lines[2].starts_with("embeddings"), "{t}");
        assert!(
            lines[3].starts_with("chat") && lines[3].contains("2026-11-30"),
            "{t}"
        );
        let c = render_by(&recs, ReportFormat::Csv, &[GroupBy::Day]);
        assert!(c.starts_with("day,requests,"), "{c}");
    }

    #[test]
    fn group_by_model_and_csv() {
        let recs = vec![
            rec(
                "acme/app",
                "lint",
                "/usr/bin/python3",
                "gpt-4o",
                10,
                1,
                Some(0.25),
            ),
            rec("acme/lib", "test", "/usr/bin/node", "gpt-4o", 5, 2, None),
            rec(
                "acme/app",
                "lint",
                "/usr/bin/curl",
                "claude, \"x\"",
                1,
                1,
                Some(0.5),
            ),
        ];
        let t = render_by(&recs, ReportFormat::Table, &[GroupBy::Model]);
        let first = t.lines().next().unwrap();
        assert!(
            first.starts_with("MODEL") && !first.contains("REPOSITORY"),
            "{t}"
        );
        let gpt = row(&t, "gpt-4o");
        assert_eq!(gpt[1..4], ["2", "15", "3"], "{t}");
        assert_eq!(gpt[4], "0.2500*", "{t}");

        let c = render_by(
            &recs,
            ReportFormat::Csv,
            &[GroupBy::Repository, GroupBy::Model],
        );
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(
            lines[0],
            "repository,model,requests,input_tokens,output_tokens,cost_usd,priced_requests"
        );
        assert_eq!(lines.len(), 4, "{c}");
        assert!(
            lines.contains(&"acme/app,\"claude, \"\"x\"\"\",1,1,1,0.5,1"),
            "{c}"
        );
        assert!(lines.contains(&"acme/lib,gpt-4o,1,5,2,,0"), "{c}");
        // A small known cost is not shown as zero.
        let small = rec(
            "a/b",
            "j",
            "/bin/x",
            "text-embedding-3-small",
            8,
            0,
            Some(1.6e-7),
        );
        let c = render_by(&[small], ReportFormat::Csv, &[GroupBy::Model]);
        assert!(c.contains(",0.00000016,1"), "{c}");
        assert_eq!(super::csv_cost(2.0), "2");
        assert_eq!(super::csv_cost(0.0), "0");
        // A cell a spreadsheet would run as a formula is not one.
        let evil = vec![rec(
            "acme/app",
            "=HYPERLINK(\"http://x\")",
            "/usr/bin/curl",
            "@SUM(1)",
            1,
            1,
            None,
        )];
        let c = render_by(&evil, ReportFormat::Csv, &[GroupBy::Job, GroupBy::Model]);
        let line = c.lines().nth(1).expect("a row");
        assert!(
            line.starts_with("\"'=HYPERLINK(\"\"http://x\"\")\",'@SUM(1),"),
            "{c}"
        );

        // By service tier: records that name none are `-`.
        let mut tiered = recs.clone();
        tiered[0].service_tier = Some("flex".into());
        let t = render_by(&tiered, ReportFormat::Table, &[GroupBy::Tier]);
        assert!(t.lines().next().unwrap().starts_with("TIER"), "{t}");
        assert_eq!(row(&t, "flex")[1], "1", "{t}");
        assert_eq!(row(&t, "-")[1], "2", "{t}");
    }
}
