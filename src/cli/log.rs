//! `presence log`: who held a topic, and when.

use std::time::Duration;

use clap::Args;
use serde_json::Value;

use super::args::{parse_duration, parse_name};
use super::completions;
use super::render;
use super::render::{Cell, Style};
use super::replies::{decode, request_fields};
use super::target::Target;
use crate::protocol::{
    HISTORY_LEFT_OUT_FIELD, HistoryEvent, HistoryKind, HistoryReply, HistoryRequest,
    MAX_HISTORY_LIMIT, Request,
};
use crate::sys::now_millis;

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Only this topic's history
    #[arg(value_parser = parse_name, add = completions::topics())]
    pub topic: Option<String>,

    /// Only what happened this long ago or later: `90s`, `15m`, `1h`, `2d`
    #[arg(long, value_name = "AGE", value_parser = parse_duration)]
    pub since: Option<Duration>,

    /// Show at most this many events, the latest
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=MAX_HISTORY_LIMIT as u64))]
    pub limit: u64,

    /// Print the daemon's `history` reply fields as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: LogArgs) -> anyhow::Result<()> {
    let (client, _events) = target.connect().await?;
    let since = args
        .since
        .map(|age| now_millis().saturating_sub(age.as_millis().min(i64::MAX as u128) as i64));
    let request = Request::History(HistoryRequest {
        topic: args.topic.clone(),
        since,
        limit: Some(args.limit as usize),
    });
    let fields = request_fields(&client, &request, "could not read the history").await?;
    if args.json {
        say!("{}", serde_json::to_string(&Value::Object(fields))?);
        return Ok(());
    }
    let history: HistoryReply = decode(fields, "history")?;
    if history.events.is_empty() {
        eprintln!(
            "{}",
            nothing_recorded(args.topic.as_deref(), args.since.is_some())
        );
        return Ok(());
    }
    let by_topic = args.topic.is_none();
    let rows: Vec<Vec<Cell>> = history
        .events
        .iter()
        .map(|event| row(event, by_topic))
        .collect();
    let header: &[&str] = if by_topic {
        &["WHEN", "TOPIC", "KEY", "WHAT", "USER", "PID"]
    } else {
        &["WHEN", "KEY", "WHAT", "USER", "PID"]
    };
    say!("{}", render::table(header, &rows).trim_end());
    if history.truncated {
        eprintln!(
            "(older events left out; --limit {} or --since shows more)",
            (args.limit * 10).min(MAX_HISTORY_LIMIT as u64)
        );
    }
    Ok(())
}

fn row(event: &HistoryEvent, by_topic: bool) -> Vec<Cell> {
    let mut row = vec![Cell::new(render::when(event.at), Style::Dim)];
    if by_topic {
        row.push(Cell::from(event.topic.clone()));
    }
    row.extend([
        Cell::from(event.key.clone()),
        what_happened(event),
        Cell::from(event.user.clone()),
        Cell::from(event.pid.to_string()),
    ]);
    row
}

fn what_happened(event: &HistoryEvent) -> Cell {
    match event.kind {
        HistoryKind::Join => Cell::from(format!("joined ({})", event.phx_ref)),
        HistoryKind::Owner => Cell::new(format!("became owner ({})", event.phx_ref), Style::Good),
        HistoryKind::Update => Cell::new(
            format!("updated ({}){}", event.phx_ref, meta_change(event)),
            Style::Notice,
        ),
        HistoryKind::Leave => {
            let cause = render::leave_cause(event.reason.as_ref())
                .map(|cause| format!(": {cause}"))
                .unwrap_or_default();
            Cell::new(format!("left ({}){cause}", event.phx_ref), Style::Gone)
        }
    }
}

/// What an update did to the meta, after a colon: `: saves=3, -line`,
/// each changed field with its new value (long ones cut), each removed one
/// with a minus, and how many the daemon did not record, if any (it keeps
/// a bounded part of each update). The fields an editor plugin sets read
/// as words. Nothing for a daemon that does not
/// record it.
fn meta_change(event: &HistoryEvent) -> String {
    /// Columns a value may take before it is cut.
    const VALUE_WIDTH: usize = 40;
    let mut parts = Vec::new();
    let mut left_out = None;
    for (field, value) in event.changed.iter().flatten() {
        if let Some(words) = editor_words(field, value) {
            parts.push(words);
            continue;
        }
        if let (HISTORY_LEFT_OUT_FIELD, Some(count)) = (field.as_str(), value.as_u64()) {
            left_out = Some(count);
            continue;
        }
        let value = value.to_string();
        let value = match value.char_indices().nth(VALUE_WIDTH) {
            Some((cut, _)) => format!("{}…", &value[..cut]),
            None => value,
        };
        parts.push(format!("{field}={value}"));
    }
    for field in event.removed.iter().flatten() {
        parts.push(format!("-{field}"));
    }
    if let Some(count) = left_out {
        let fields = if count == 1 { "field" } else { "fields" };
        parts.push(format!("{count} more {fields} not recorded"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(", "))
    }
}

/// The fields an editor plugin sets (docs/editors.md), in words:
/// `"overrode": {"owner": KEY, "owner_pid": PID, "at": MS}`, added when its
/// user saved over the owner's copy, as `wrote over alice (pid 4242)'s
/// copy at 12:03:09` (`wrote over the file` when no owner was known), and
/// `"saved_at": MS` as `saved the file at 12:03:09`.
fn editor_words(field: &str, value: &Value) -> Option<String> {
    match field {
        "overrode" => {
            let at = value
                .get("at")
                .and_then(Value::as_i64)
                .map(|at| format!(" at {}", render::at(at)))
                .unwrap_or_default();
            let owner = value.get("owner").and_then(Value::as_str);
            let pid = value
                .get("owner_pid")
                .and_then(Value::as_u64)
                .and_then(|pid| u32::try_from(pid).ok());
            Some(match (owner, pid) {
                (Some(owner), Some(pid)) => {
                    format!("wrote over {}'s copy{at}", render::who(owner, pid))
                }
                _ => format!("wrote over the file{at}"),
            })
        }
        "saved_at" => Some(format!("saved the file at {}", render::at(value.as_i64()?))),
        _ => None,
    }
}

fn nothing_recorded(topic: Option<&str>, since: bool) -> String {
    let what = topic.map_or_else(|| "anything".to_owned(), |topic| format!("`{topic}`"));
    let when = if since { " in that time" } else { "" };
    format!("no history recorded for {what}{when}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_says_what_it_changed_and_what_was_not_recorded() {
        let event = HistoryEvent {
            at: 0,
            topic: "doc".to_owned(),
            kind: HistoryKind::Update,
            key: "alice".to_owned(),
            phx_ref: "p3".to_owned(),
            pid: 4242,
            user: "alice".to_owned(),
            reason: None,
            changed: serde_json::json!({"line": 42, "notes": "… (9000 bytes)", "…": 3})
                .as_object()
                .cloned(),
            removed: Some(vec!["mode".to_owned()]),
        };
        assert_eq!(
            meta_change(&event),
            r#": line=42, notes="… (9000 bytes)", -mode, 3 more fields not recorded"#
        );
    }

    #[test]
    fn the_fields_an_editor_sets_read_as_words() {
        let saved_at = 1_700_000_000_000;
        assert_eq!(
            editor_words("saved_at", &serde_json::json!(saved_at)),
            Some(format!("saved the file at {}", render::at(saved_at)))
        );
        assert_eq!(
            editor_words("overrode", &serde_json::json!({"at": saved_at})),
            Some(format!("wrote over the file at {}", render::at(saved_at)))
        );
        assert_eq!(
            editor_words(
                "overrode",
                &serde_json::json!({"owner": "alice", "owner_pid": 4242})
            ),
            Some("wrote over alice (pid 4242)'s copy".to_owned())
        );
        assert_eq!(editor_words("saved_at", &serde_json::json!("soon")), None);
        assert_eq!(editor_words("saves", &serde_json::json!(3)), None);
    }
}
