//! How presence looks to a person at a terminal.

use std::io::Write;

use crate::protocol::{LeaveReason, Meta, Owner, Presences, Role, Standing};
use crate::sys::now_millis;

/// `owner`, or `spectator (owner: alice, pid 4242)`.
pub fn standing(standing: &Standing) -> String {
    match (&standing.role, &standing.owner) {
        (Role::Owner, _) => "owner".to_owned(),
        (Role::Spectator, Some(owner)) => {
            format!("spectator (owner: {}, pid {})", owner.key, owner.pid)
        }
        (Role::Spectator, None) => "spectator".to_owned(),
    }
}

/// `alice (pid 4242)`, or `nobody`.
pub fn owner(owner: Option<&Owner>) -> String {
    match owner {
        Some(owner) => format!("{} (pid {})", owner.key, owner.pid),
        None => "nobody".to_owned(),
    }
}

/// Every meta of a presence map, in join order.
pub fn metas_by_seq(presences: &Presences) -> Vec<(&str, &Meta)> {
    let mut metas: Vec<(&str, &Meta)> = presences
        .iter()
        .flat_map(|(key, presence)| presence.metas.iter().map(move |m| (key.as_str(), m)))
        .collect();
    metas.sort_by_key(|(_, meta)| meta.seq);
    metas
}

/// Why someone left, in words.
pub fn reason(reason: Option<&LeaveReason>) -> &'static str {
    match reason {
        Some(LeaveReason::Untrack) => "left",
        Some(LeaveReason::Closed) => "connection closed",
        Some(LeaveReason::PidExit) => "process exited",
        Some(LeaveReason::Expired) => "not resumed after a restart",
        Some(LeaveReason::Update) => "updated",
        None => "left",
    }
}

/// `3s ago`, `5m ago`, `2h ago`, `4d ago`.
pub fn ago(unix_millis: i64) -> String {
    let seconds = (now_millis() - unix_millis).max(0) / 1000;
    match seconds {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86_400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

/// Prints rows as left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
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
