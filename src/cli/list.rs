//! `presence list`: who is present, on one topic or on all.

use std::collections::BTreeMap;

use clap::Args;
use serde_json::Value;

use super::render::Cell;
use super::{Target, decode, render, request_fields};
use crate::protocol::{ListRequest, Request, TopicPresences};

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this topic
    #[arg(value_parser = super::parse_name)]
    pub topic: Option<String>,

    /// Print the daemon's `list` reply fields as JSON
    #[arg(long)]
    pub json: bool,

    /// Show every column in full, however wide the terminal (as when
    /// the output is piped)
    #[arg(long)]
    pub wide: bool,
}

/// The columns cut on a narrow terminal, in this order, each down to a
/// least width in columns: META, TOPIC, KEY, USER, and last JOINED (whose
/// time comes first, so its relative part goes).
const SHRINKABLE: &[(usize, usize)] = &[(6, 8), (0, 12), (2, 8), (3, 8), (5, 8)];

pub async fn run(target: &Target, args: ListArgs) -> anyhow::Result<()> {
    let (client, _events) = target.connect().await?;
    let request = Request::List(ListRequest {
        topic: args.topic.clone(),
    });
    let fields = request_fields(&client, &request, "could not list").await?;
    if args.json {
        say!("{}", serde_json::to_string(&Value::Object(fields))?);
        return Ok(());
    }
    let topics: BTreeMap<String, TopicPresences> = match args.topic {
        Some(topic) => {
            let state: TopicPresences = decode(fields, "list")?;
            BTreeMap::from([(topic, state)])
        }
        None => {
            let all: crate::protocol::ListAllReply = decode(fields, "list")?;
            all.topics
        }
    };
    let mut rows = rows(&topics);
    if rows.is_empty() {
        eprintln!("nobody is present");
        return Ok(());
    }
    // META only when someone has one: most joins carry none.
    let with_meta = rows.iter().any(|row| row.len() > 6);
    let mut header = vec!["TOPIC", "ROLE", "KEY", "USER", "PID", "JOINED"];
    if with_meta {
        header.push("META");
    }
    if !args.wide
        && let Some(width) = render::terminal_width()
    {
        render::fit(&header, &mut rows, width, SHRINKABLE);
    }
    let table = render::table(&header, &rows);
    say!("{}", table.trim_end());
    Ok(())
}

/// One row per entry: topics by name, and within a topic the owner first,
/// then the spectators in the order they will be promoted.
fn rows(topics: &BTreeMap<String, TopicPresences>) -> Vec<Vec<Cell>> {
    let mut rows = Vec::new();
    for (topic, state) in topics {
        for (position, (key, meta)) in render::metas_by_seq(&state.presences)
            .into_iter()
            .enumerate()
        {
            let mut row = vec![
                Cell::from(topic.as_str()),
                render::role_cell(position),
                Cell::from(key),
                Cell::from(meta.user.as_str()),
                Cell::from(meta.pid.to_string()),
                Cell::from(render::when(meta.joined_at)),
            ];
            if let Some(client) = render::client_meta(&meta.client) {
                row.push(Cell::from(client));
            }
            rows.push(row);
        }
    }
    rows
}
