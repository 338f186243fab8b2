//! `presence status`: how the daemon is.

use clap::Args;
use serde_json::Value;

use super::render;
use super::render::{Cell, Style};
use super::replies::{decode, request_fields};
use super::target::Target;
use crate::protocol::{Empty, Request, StatusReply};
use crate::sys::now_millis;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the daemon's `status` reply fields as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: StatusArgs) -> anyhow::Result<()> {
    let (client, _events) = target.connect_running().await?;
    let fields = request_fields(
        &client,
        &Request::Status(Empty {}),
        "could not ask the daemon",
    )
    .await?;
    if args.json {
        say!("{}", serde_json::to_string(&Value::Object(fields))?);
        return Ok(());
    }
    let status: StatusReply = decode(fields, "status")?;
    say!("{}", render::pairs(&rows(&status)).trim_end());
    Ok(())
}

/// Each fact as a label and its value.
fn rows(status: &StatusReply) -> Vec<(&'static str, Cell)> {
    let ours = env!("CARGO_PKG_VERSION");
    let version = if status.version == ours {
        Cell::from(format!("{} (protocol {})", status.version, status.protocol))
    } else {
        // Worth knowing before reading anything else it says.
        Cell::new(
            format!(
                "{} (protocol {}); this presence is {ours}",
                status.version, status.protocol
            ),
            Style::Notice,
        )
    };
    let started = now_millis() - i64::try_from(status.uptime_ms).unwrap_or(i64::MAX);
    let recovered = match &status.db_recovered {
        None => Cell::from("no"),
        Some(moved_to) => Cell::new(
            format!("yes: the unreadable file was moved to {moved_to}"),
            Style::Notice,
        ),
    };
    let count = |n: usize| Cell::from(n.to_string());
    vec![
        ("version", version),
        ("pid", count(status.pid as usize)),
        (
            "started by",
            Cell::from(started_by(status.started_by.as_deref())),
        ),
        (
            "uptime",
            Cell::from(format!(
                "{}, since {}",
                render::duration(status.uptime_ms),
                render::at(started)
            )),
        ),
        ("socket", Cell::from(status.socket.as_str())),
        ("database", Cell::from(status.db.as_str())),
        ("db recovered", recovered),
        ("topics", count(status.topics)),
        ("entries", count(status.entries)),
        ("connections", count(status.connections)),
        ("subscriptions", count(status.subscriptions)),
        ("awaiting resume", count(status.awaiting_resume)),
        ("transactions", Cell::from(status.transactions.to_string())),
        (
            "outbound",
            Cell::from(format!(
                "{} bytes unsent of a budget of {}, at most {} to one connection",
                status.outbound_bytes, status.outbound_budget_bytes, status.largest_outbound_bytes
            )),
        ),
        ("pid watch", Cell::from(status.pid_watch.as_str())),
    ]
}

/// How the daemon was started, in words.
fn started_by(how: Option<&str>) -> String {
    match how {
        Some("autostart") => "autostart (a client started it; `presence stop` stops it)".to_owned(),
        Some("systemd") => "systemd".to_owned(),
        Some("foreground") => "foreground (`presence daemon`)".to_owned(),
        Some(other) => other.to_owned(),
        None => "unknown (the daemon predates this field)".to_owned(),
    }
}
