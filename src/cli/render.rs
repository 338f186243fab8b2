//! How presence looks to a person at a terminal: words for standings and
//! leave reasons, local times, tables, and colour.

/// Prints a line on stdout. A reader that went away (`presence watch t |
/// head -1`) ends the command quietly instead of failing it.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cli::render::say(format_args!($($arg)*))?
    };
}

use std::borrow::Cow;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use jiff::tz::TimeZone;
use jiff::{Timestamp, ZonedDateTime};
use serde_json::{Map, Value};
use unicode_width::UnicodeWidthStr;

use crate::protocol::{
    LeaveReason, Meta, Owner, Presences, Role, Standing, host_of_ref, is_hidden_char,
};
use crate::sys::now_millis;

// ---------------------------------------------------------------------------
// Colour
// ---------------------------------------------------------------------------

/// Whether stdout gets colour. Set once, before anything is printed.
static COLOR: AtomicBool = AtomicBool::new(false);

/// When to colour the output: `--color`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// When stdout is a terminal, `NO_COLOR` is unset or empty, and `TERM`
    /// is not `dumb`
    #[default]
    Auto,
    Always,
    Never,
}

/// Decides colour for the whole run.
pub fn init_color(choice: ColorChoice) {
    let wanted = match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => auto_color(),
    };
    COLOR.store(wanted, Ordering::Relaxed);
}

/// The `NO_COLOR` convention (no-color.org): any non-empty value turns
/// colour off; a terminal that cannot show it gets none either.
fn auto_color() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|value| !value.is_empty());
    std::io::IsTerminal::is_terminal(&std::io::stdout())
        && !set("NO_COLOR")
        && std::env::var_os("TERM").is_none_or(|term| term != "dumb")
}

/// What a piece of text means, and so how it is coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    /// An owner, a join, a promotion.
    Good,
    /// A departure.
    Gone,
    /// A changed meta, a recovered database.
    Notice,
    /// Spectators, times, labels: there, but not the point.
    Dim,
    /// The header of a table.
    Heading,
}

impl Style {
    fn code(self) -> Option<&'static str> {
        match self {
            Style::Plain => None,
            Style::Good => Some("32"),
            Style::Gone => Some("31"),
            Style::Notice => Some("33"),
            Style::Dim => Some("2"),
            Style::Heading => Some("1"),
        }
    }
}

/// `text` in `style`, when colour is on.
pub fn paint(style: Style, text: &str) -> String {
    match style.code() {
        Some(code) if COLOR.load(Ordering::Relaxed) => format!("\x1b[{code}m{text}\x1b[0m"),
        _ => text.to_owned(),
    }
}

/// `text` with every control and format character (see
/// [`is_hidden_char`]) written as `\u{…}`, so that what the terminal shows
/// is what the text holds: a name, meta or message from the daemon can
/// neither rewrite the screen (an escape sequence) nor pass for another
/// (a bidi override, a zero-width space). A database older than the
/// daemon's refusal of such names may still hold them.
pub fn visible(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_hidden_char) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_hidden_char(c) {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

// ---------------------------------------------------------------------------
// Presence in words
// ---------------------------------------------------------------------------

/// `owner`, or `spectator #2, owner alice (pid 4242)`: the place in the
/// queue counts the entries ahead, the owner's included. An owner held
/// back while its daemon cannot reach etcd (a topic shared across hosts)
/// is told so, and that it will own again.
pub fn standing(standing: &Standing) -> String {
    if standing.suspended {
        return paint(Style::Notice, SUSPENDED);
    }
    let place = format!("spectator #{}", standing.position);
    match (&standing.role, &standing.owner) {
        (Role::Owner, _) => paint(Style::Good, "owner"),
        (Role::Spectator, Some(owner)) => format!(
            "{}, owner {}",
            paint(Style::Dim, &place),
            who_of(&owner.key, owner.pid, &owner.phx_ref)
        ),
        (Role::Spectator, None) => paint(Style::Dim, &place),
    }
}

/// What a suspended owner is told: why it may not write, and until when.
pub const SUSPENDED: &str = "suspended: the shared topic's etcd cannot be reached; \
                             owner again when it returns";

/// `alice (pid 4242)`: a key alone is ambiguous, since every join of one
/// user has the login name as its key by default.
pub fn who(key: &str, pid: u32) -> String {
    format!("{} (pid {pid})", visible(key))
}

/// [`who`] for the entry with ref `phx_ref`: `alice (pid 4242 on web-1)`
/// when another host may hold it (a topic shared across hosts), whose
/// pid means nothing on this one.
pub fn who_of(key: &str, pid: u32, phx_ref: &str) -> String {
    match host_of_ref(phx_ref) {
        Some(host) => format!("{} (pid {pid} on {})", visible(key), visible(host)),
        None => who(key, pid),
    }
}

/// `alice (pid 4242)`, or `nobody`.
pub fn owner(owner: Option<&Owner>) -> String {
    match owner {
        Some(owner) => who_of(&owner.key, owner.pid, &owner.phx_ref),
        None => "nobody".to_owned(),
    }
}

/// Every meta of a presence map, in join order: the owner first.
pub fn metas_by_seq(presences: &Presences) -> Vec<(&str, &Meta)> {
    let mut metas: Vec<(&str, &Meta)> = presences
        .iter()
        .flat_map(|(key, presence)| presence.metas.iter().map(move |m| (key.as_str(), m)))
        .collect();
    metas.sort_by_key(|(_, meta)| meta.seq);
    metas
}

/// Why someone left, when it was not their own doing.
pub fn leave_cause(reason: Option<&LeaveReason>) -> Option<&'static str> {
    match reason? {
        LeaveReason::Untrack => None,
        LeaveReason::Closed => Some("connection closed"),
        LeaveReason::PidExit => Some("process exited"),
        LeaveReason::Expired => Some("not resumed after a restart"),
        LeaveReason::Update => Some("updated"),
        LeaveReason::ExitedWhileDown => Some("process exited while the daemon was down"),
        LeaveReason::HostLost => Some("host lost: its daemon stopped renewing its etcd lease"),
        LeaveReason::Unknown => Some("for a reason this build does not know"),
    }
}

/// The client's part of a meta as compact JSON, or nothing when empty;
/// its hidden characters made [`visible`].
pub fn client_meta(meta: &Map<String, Value>) -> Option<String> {
    (!meta.is_empty()).then(|| visible(&Value::Object(meta.clone()).to_string()).into_owned())
}

// ---------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------

/// A wall-clock instant in the local time zone (`TZ`, else
/// `/etc/localtime`, else UTC), with that zone's offset at that instant.
fn local(unix_millis: i64) -> Option<ZonedDateTime> {
    let instant = Timestamp::from_millisecond(unix_millis).ok()?;
    Some(instant.to_zoned_datetime(TimeZone::system()))
}

fn clock(time: &ZonedDateTime) -> String {
    format!(
        "{:02}:{:02}:{:02}",
        time.hour(),
        time.minute(),
        time.second()
    )
}

/// The local time now, `12:03:09`: the prefix of a timeline line.
pub fn clock_now() -> String {
    local(now_millis()).map_or_else(|| "--:--:--".to_owned(), |now| clock(&now))
}

/// `12:03:09 (3m ago)`; with the date when it is not today, as
/// `2025-01-03 12:03:09 (4d ago)`.
pub fn when(unix_millis: i64) -> String {
    format!("{} ({})", at(unix_millis), ago(unix_millis))
}

/// `12:03:09` today, `2025-01-03 12:03:09` on any other day.
pub fn at(unix_millis: i64) -> String {
    let (Some(then), Some(now)) = (local(unix_millis), local(now_millis())) else {
        return format!("@{}", unix_millis / 1000);
    };
    if then.date() == now.date() {
        clock(&then)
    } else {
        format!(
            "{:04}-{:02}-{:02} {}",
            then.year(),
            then.month(),
            then.day(),
            clock(&then)
        )
    }
}

/// `just now`, `3s ago`, `5m ago`, `2h ago`, `4d ago`. A time ahead of
/// ours (another clock, a step back of this one) counts as now.
pub fn ago(unix_millis: i64) -> String {
    let seconds = (now_millis() - unix_millis).max(0) / 1000;
    match seconds {
        0 => "just now".to_owned(),
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// `45s`, `12m 5s`, `3h 2m`, `4d 1h`: two units at most.
pub fn duration(millis: u64) -> String {
    let s = millis / 1000;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

// ---------------------------------------------------------------------------
// Layout and output
// ---------------------------------------------------------------------------

/// A table cell: its text, and how it is coloured.
pub struct Cell {
    pub text: String,
    pub style: Style,
}

impl Cell {
    /// A cell of `text`, its hidden characters made [`visible`]: a cell
    /// holds what came from the daemon (topics, keys, user names, metas).
    pub fn new(text: impl Into<String>, style: Style) -> Cell {
        let text: String = text.into();
        Cell {
            text: match visible(&text) {
                Cow::Borrowed(_) => text,
                Cow::Owned(shown) => shown,
            },
            style,
        }
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell::new(text, Style::Plain)
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell::new(text, Style::Plain)
    }
}

/// The ROLE cell of an entry at `position` in its topic's queue (0 is the
/// owner): `owner`, or `spectator #N`, N its place in the promotion order.
pub fn role_cell(position: usize) -> Cell {
    if position == 0 {
        Cell::new("owner", Style::Good)
    } else {
        Cell::new(format!("spectator #{position}"), Style::Dim)
    }
}

/// Rows as left-aligned columns, under a header. Widths come from the
/// text alone, so colour never shifts a column, and are counted in
/// terminal columns: a topic named in Chinese or with an emoji takes two
/// per character.
pub fn table(header: &[&str], rows: &[Vec<Cell>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.width()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.text.width());
        }
    }
    let header: Vec<Cell> = header
        .iter()
        .map(|h| Cell::new(*h, Style::Heading))
        .collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (column, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if column > 0 {
                line.push_str("  ");
            }
            line.push_str(&paint(cell.style, &cell.text));
            let last = column + 1 == row.len();
            if !last {
                let pad = width.saturating_sub(cell.text.width());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The width of the terminal standard output is, in columns; `None` when
/// it is not a terminal (piped, redirected) or does not say.
pub fn terminal_width() -> Option<usize> {
    use rustix::ioctl::{Getter, Opcode, ioctl};
    /// `struct winsize` of `TIOCGWINSZ`.
    #[repr(C)]
    struct Winsize {
        rows: u16,
        cols: u16,
        x_pixels: u16,
        y_pixels: u16,
    }
    const TIOCGWINSZ: Opcode = 0x5413;
    let stdout = std::io::stdout();
    if !std::io::IsTerminal::is_terminal(&stdout) {
        return None;
    }
    // SAFETY: TIOCGWINSZ writes one struct winsize, which Winsize mirrors.
    let size = unsafe { ioctl(&stdout, Getter::<TIOCGWINSZ, Winsize>::new()) }.ok()?;
    (size.cols > 0).then_some(usize::from(size.cols))
}

/// Narrows `rows` (under `header`) to `width` terminal columns, as
/// [`table`] lays them out: the columns in `shrinkable`, in that order,
/// each down to its least width, have their longer cells cut with an
/// ellipsis. A table that fits, or cannot be made to, is left as it is
/// past what shrinking gives.
pub fn fit(header: &[&str], rows: &mut [Vec<Cell>], width: usize, shrinkable: &[(usize, usize)]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.width()).collect();
    for row in rows.iter() {
        for (column, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(column) {
                *w = (*w).max(cell.text.width());
            }
        }
    }
    let total =
        |widths: &[usize]| widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
    for &(column, least) in shrinkable {
        let over = total(&widths).saturating_sub(width);
        if over == 0 {
            break;
        }
        let Some(current) = widths.get(column).copied() else {
            continue;
        };
        let floor = least.max(header.get(column).map_or(0, |h| h.width()));
        let target = current.saturating_sub(over).max(floor);
        if target >= current {
            continue;
        }
        widths[column] = target;
        for row in rows.iter_mut() {
            if let Some(cell) = row.get_mut(column) {
                cell.text = cut(&cell.text, target);
            }
        }
    }
}

/// `text` cut to `width` terminal columns, ending in `…` if it was cut.
fn cut(text: &str, width: usize) -> String {
    if text.width() <= width {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = unicode_width::UnicodeWidthChar::width(c).unwrap_or(0);
        if used + w + 1 > width {
            break;
        }
        out.push(c);
        used += w;
    }
    out.push('…');
    out
}

/// Labels and values, the values lined up: `presence status`.
pub fn pairs(rows: &[(&str, Cell)]) -> String {
    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in rows {
        let pad = " ".repeat(width - label.len() + 2);
        out.push_str(&format!(
            "{}{pad}{}\n",
            paint(Style::Dim, label),
            paint(value.style, &value.text)
        ));
    }
    out
}

/// Writes one line to stdout and flushes it, so a reader sees each change
/// as it happens.
pub fn say(line: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_fmt(line)?;
    stdout.write_all(b"\n")?;
    stdout.flush()
}

/// Whether a command failed only because nobody reads its output any more.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suspended_owner_is_told_so_and_not_called_a_spectator() {
        let owner = Owner {
            key: "alice".into(),
            phx_ref: "web-1:p1".into(),
            pid: 4242,
            user: "alice".into(),
            joined_at: 0,
        };
        let owning = Standing {
            role: Role::Owner,
            readonly: false,
            position: 0,
            owner: Some(owner.clone()),
            suspended: false,
        };
        assert_eq!(standing(&owning), "owner");
        let suspended = Standing {
            role: Role::Spectator,
            readonly: true,
            suspended: true,
            ..owning.clone()
        };
        let said = standing(&suspended);
        assert!(said.starts_with("suspended: "), "{said}");
        assert!(
            said.contains("etcd") && said.contains("owner again"),
            "{said}"
        );
        assert!(!said.contains("spectator"), "{said}");
        let waiting = Standing {
            role: Role::Spectator,
            readonly: true,
            position: 2,
            ..owning
        };
        assert_eq!(
            standing(&waiting),
            "spectator #2, owner alice (pid 4242 on web-1)"
        );
    }

    #[test]
    fn an_entry_of_another_host_is_named_with_its_host() {
        assert_eq!(who_of("alice", 4242, "p7"), "alice (pid 4242)");
        assert_eq!(
            who_of("alice", 4242, "web-1:p7"),
            "alice (pid 4242 on web-1)"
        );
    }

    #[test]
    fn a_lost_host_is_a_cause_and_an_unknown_reason_is_not_hidden() {
        assert_eq!(
            leave_cause(Some(&LeaveReason::HostLost)),
            Some("host lost: its daemon stopped renewing its etcd lease")
        );
        assert!(leave_cause(Some(&LeaveReason::Unknown)).is_some());
        assert_eq!(leave_cause(Some(&LeaveReason::Untrack)), None);
    }

    #[test]
    fn durations_keep_two_units() {
        assert_eq!(duration(45_000), "45s");
        assert_eq!(duration(725_000), "12m 5s");
        assert_eq!(duration(3 * 3_600_000 + 125_000), "3h 2m");
        assert_eq!(duration(4 * 86_400_000 + 3_600_000), "4d 1h");
    }

    #[test]
    fn ago_counts_down_from_now() {
        assert_eq!(ago(now_millis() + 5_000), "just now");
        assert_eq!(ago(now_millis() - 3 * 60_000), "3m ago");
        assert_eq!(ago(now_millis() - 4 * 86_400_000), "4d ago");
    }

    #[test]
    fn old_times_carry_their_date() {
        let today = when(now_millis());
        assert!(today.ends_with("(just now)"), "{today}");
        assert_eq!(today.split(' ').next().map(str::len), Some(8), "{today}");
        let old = when(now_millis() - 3 * 86_400_000);
        assert!(old.ends_with("(3d ago)"), "{old}");
        assert_eq!(old.split(' ').next().map(str::len), Some(10), "{old}");
    }

    #[test]
    fn table_columns_count_terminal_columns_not_characters() {
        let rows = vec![
            vec![Cell::from("文档"), Cell::from("owner")],
            vec![Cell::from("doc"), Cell::from("spectator #1")],
        ];
        let table = table(&["TOPIC", "ROLE"], &rows);
        let columns: Vec<usize> = table
            .lines()
            .zip(["ROLE", "owner", "spectator"])
            .map(|(line, role)| line[..line.find(role).unwrap()].width())
            .collect();
        // Two wide characters are four columns: every ROLE starts at the same one.
        assert_eq!(columns, [7, 7, 7], "{table}");
    }

    #[test]
    fn hidden_characters_are_shown_as_escapes() {
        assert_eq!(visible("doc"), "doc");
        assert_eq!(visible("doc\u{202e}txt.exe"), "doc\\u{202e}txt.exe");
        assert_eq!(visible("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(visible("a\u{200b}b\u{85}"), "a\\u{200b}b\\u{85}");
        assert_eq!(who("\u{202e}bob", 7), "\\u{202e}bob (pid 7)");
        let cell = Cell::from("ali\u{200b}ce");
        assert_eq!(cell.text, "ali\\u{200b}ce");
        let meta = serde_json::json!({"file": "\u{202e}txt.md", "c": "\u{1b}[2J"});
        assert_eq!(
            client_meta(meta.as_object().unwrap()).unwrap(),
            r#"{"c":"\u001b[2J","file":"\u{202e}txt.md"}"#
        );
    }

    #[test]
    fn fit_cuts_the_shrinkable_columns_in_order_with_an_ellipsis() {
        let mut rows = vec![vec![
            Cell::from("a-long-topic-name"),
            Cell::from("owner"),
            Cell::from("{\"file\":\"notes.md\"}"),
        ]];
        // 17 + 2 + 5 + 2 + 19 = 45 columns, to fit in 40: META alone.
        fit(&["TOPIC", "ROLE", "META"], &mut rows, 40, &[(2, 8), (0, 8)]);
        assert_eq!(rows[0][2].text, "{\"file\":\"note…");
        assert_eq!(rows[0][0].text, "a-long-topic-name", "META was enough");
        let table = table(&["TOPIC", "ROLE", "META"], &rows);
        assert!(table.lines().all(|l| l.width() <= 40), "{table}");

        // To 30: META down to its least, then TOPIC.
        fit(&["TOPIC", "ROLE", "META"], &mut rows, 30, &[(2, 8), (0, 8)]);
        assert_eq!(rows[0][2].text, "{\"file\"…");
        assert_eq!(rows[0][0].text, "a-long-topic…");
        assert_eq!(cut("日本語のトピック", 7), "日本語…");
    }

    #[test]
    fn table_columns_ignore_colour_codes() {
        let rows = vec![
            vec![Cell::new("owner", Style::Good), Cell::from("alice")],
            vec![Cell::new("spectator 1", Style::Dim), Cell::from("bob")],
        ];
        COLOR.store(false, Ordering::Relaxed);
        let plain = table(&["ROLE", "KEY"], &rows);
        assert_eq!(
            plain,
            "ROLE         KEY\nowner        alice\nspectator 1  bob\n"
        );
    }
}
