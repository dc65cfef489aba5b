//! `tollgate top`: a live terminal view of the agent's control socket.
//!
//! A reader thread keeps a `watch` connection open (reconnecting every
//! second when the agent goes away) and hands snapshots to the UI loop,
//! which redraws five times a second and quits on `q`, Esc or Ctrl-C. The
//! terminal is restored on every way out, panics included.

use std::io::{IsTerminal, Stdout};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};
use crossterm::{cursor, execute};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

use super::client::{ClientError, Connection, snapshot};
use super::protocol::{Request, Snapshot};
use super::view;

/// How often the screen is redrawn (and keys are looked at).
const FRAME: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "`tollgate top` needs a terminal (stdout is not one); use `tollgate top --once` in scripts"
    )]
    NotATerminal,
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

impl TopError {
    /// Process exit code (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            TopError::Client(e) => e.exit_code(),
            TopError::NotATerminal => crate::exit::USAGE,
            TopError::Terminal(_) => crate::exit::SOFTWARE,
        }
    }
}

/// `top --once`: one snapshot as plain text.
pub fn once(socket: &Path) -> Result<String, ClientError> {
    Ok(view::plain(&snapshot(socket)?))
}

enum Msg {
    Snapshot(Box<Snapshot>),
    Lost(String),
}

/// Keeps a watch connection open and forwards what arrives; ends when the
/// UI has gone (the channel is closed).
fn reader(path: PathBuf, mut conn: Connection, tx: mpsc::Sender<Msg>) {
    loop {
        let err = loop {
            match conn.next_snapshot() {
                Ok(s) => {
                    if tx.send(Msg::Snapshot(Box::new(s))).is_err() {
                        return;
                    }
                }
                Err(e) => break e,
            }
        };
        if tx.send(Msg::Lost(err.to_string())).is_err() {
            return;
        }
        conn = loop {
            std::thread::sleep(Duration::from_secs(1));
            match Connection::open(&path, &Request::Watch { interval_ms: None }) {
                Ok(c) => break c,
                Err(e) => {
                    if tx.send(Msg::Lost(e.to_string())).is_err() {
                        return;
                    }
                }
            }
        };
    }
}

/// Raw mode and the alternate screen, undone on drop and on panic.
struct TerminalGuard;

fn restore() {
    let _ = crossterm::terminal::disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
}

impl TerminalGuard {
    fn enter() -> std::io::Result<TerminalGuard> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            hook(info);
        }));
        crossterm::terminal::enable_raw_mode()?;
        let guard = TerminalGuard;
        execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// The interactive view, until the user quits.
pub fn run(socket: &Path) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    // Connect before touching the terminal: errors print plainly.
    let mut conn = Connection::open(socket, &Request::Watch { interval_ms: None })?;
    let first = conn.next_snapshot()?;
    let (tx, rx) = mpsc::channel();
    let path = socket.to_path_buf();
    std::thread::Builder::new()
        .name("top-reader".into())
        .spawn(move || reader(path, conn, tx))?;

    let _guard = TerminalGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    terminal.clear()?;
    let mut state = Screen {
        snap: first,
        at: Instant::now(),
        lost: None,
        socket: socket.display().to_string(),
    };
    loop {
        while let Ok(m) = rx.try_recv() {
            match m {
                Msg::Snapshot(s) => {
                    state.snap = *s;
                    state.at = Instant::now();
                    state.lost = None;
                }
                Msg::Lost(e) => state.lost = Some(e),
            }
        }
        draw(&mut terminal, &state)?;
        if event::poll(FRAME)?
            && let Event::Key(k) = event::read()?
            && k.kind == KeyEventKind::Press
        {
            let ctrl_c =
                k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
            if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                break;
            }
        }
    }
    Ok(())
}

struct Screen {
    snap: Snapshot,
    at: Instant,
    lost: Option<String>,
    socket: String,
}

fn numeric(s: String) -> Cell<'static> {
    Cell::from(Line::from(s).right_aligned())
}

fn table<'a>(
    title: &'a str,
    header: &'a [&'a str],
    text_cols: usize,
    rows: Vec<Vec<String>>,
    widths: Vec<Constraint>,
) -> Table<'a> {
    let head = Row::new(header.iter().enumerate().map(|(i, h)| {
        if i < text_cols {
            Cell::from(*h)
        } else {
            numeric((*h).to_string())
        }
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let body = rows.into_iter().map(|r| {
        Row::new(r.into_iter().enumerate().map(|(i, c)| {
            if i < text_cols {
                Cell::from(c)
            } else {
                numeric(c)
            }
        }))
    });
    Table::new(body, widths)
        .header(head)
        .column_spacing(1)
        .block(Block::bordered().title(title))
}

fn numbers_widths() -> [Constraint; 5] {
    [
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(4),
    ]
}

fn draw(t: &mut Terminal<CrosstermBackend<Stdout>>, s: &Screen) -> std::io::Result<()> {
    t.draw(|f| {
        let [head, procs, jobs, foot] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Fill(3),
            Constraint::Fill(2),
            Constraint::Length(1),
        ])
        .areas(f.area());
        let [l1, l2] = view::header_lines(&s.snap);
        let mut lines = vec![Line::from(l1).style(Style::new().add_modifier(Modifier::BOLD))];
        lines.push(match &s.lost {
            Some(e) => Line::from(format!("agent unreachable, retrying: {e}"))
                .style(Style::new().fg(Color::Red)),
            None => Line::from(l2),
        });
        f.render_widget(Paragraph::new(lines), head);

        let rows: Vec<Vec<String>> = s.snap.processes.iter().map(view::process_cells).collect();
        let mut w = vec![
            Constraint::Length(7),
            Constraint::Fill(1),
            Constraint::Fill(1),
        ];
        w.extend(numbers_widths());
        render_table(
            f,
            procs,
            table(" by process ", &view::PROCESS_HEADER, 3, rows, w),
            s.snap.processes.is_empty(),
        );
        let rows: Vec<Vec<String>> = s.snap.jobs.iter().map(view::job_cells).collect();
        let mut w = vec![Constraint::Fill(2), Constraint::Fill(1)];
        w.extend(numbers_widths());
        render_table(
            f,
            jobs,
            table(" by job ", &view::JOB_HEADER, 2, rows, w),
            s.snap.jobs.is_empty(),
        );

        let age = s.at.elapsed().as_secs();
        let foot_text = format!(" q quit   {}   updated {}s ago", s.socket, age);
        f.render_widget(
            Paragraph::new(foot_text).style(Style::new().add_modifier(Modifier::DIM)),
            foot,
        );
    })?;
    Ok(())
}

fn render_table(f: &mut ratatui::Frame<'_>, area: Rect, t: Table<'_>, empty: bool) {
    f.render_widget(t, area);
    if empty && area.height > 3 {
        let inner = Rect {
            x: area.x + 2,
            y: area.y + 2,
            width: area.width.saturating_sub(4),
            height: 1,
        };
        f.render_widget(
            Paragraph::new("no LLM requests in the last 10 minutes"),
            inner,
        );
    }
}
