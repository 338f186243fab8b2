//! `presence list`: who is present, on one topic or on all.

use std::collections::BTreeMap;

use clap::Args;
use serde_json::Value;

use super::args::parse_name;
use super::completions;
use super::render;
use super::render::{Cell, Style};
use super::replies::{decode, request_fields};
use super::target::Target;
use crate::client::{Client, ClientError};
use crate::protocol::{ListRequest, Request, TopicPresences, host_of_ref};

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this topic
    #[arg(value_parser = parse_name, add = completions::topics())]
    pub topic: Option<String>,

    /// Print the daemon's `list` reply fields as JSON
    #[arg(long)]
    pub json: bool,

    /// Show every column in full, however wide the terminal (as when
    /// the output is piped)
    #[arg(long)]
    pub wide: bool,

    /// Print only the names of the topics someone is present on, one per
    /// line, from a daemon that already runs: for shell completion, hence
    /// hidden
    #[arg(long, hide = true, conflicts_with_all = ["topic", "json", "wide"])]
    pub topics: bool,
}

/// The columns cut on a narrow terminal, in this order, each down to a
/// least width in columns: META, TOPIC, KEY, USER, and last JOINED (whose
/// time comes first, so its relative part goes).
const SHRINKABLE: &[(usize, usize)] = &[(6, 8), (0, 12), (2, 8), (3, 8), (5, 8)];

/// Where HOST goes when it is shown: after USER, before the PID that is
/// a process of that host.
pub const HOST_COLUMN: usize = 4;

pub async fn run(target: &Target, args: ListArgs) -> anyhow::Result<()> {
    if args.topics {
        // With no daemon running this prints nothing and exits 0, as no one
        // is present: a completion script calling it sees no topics and no
        // message. Other failures (a socket that is not ours, a daemon
        // that refuses) are told on stderr as for any command, and exit 1.
        for topic in running_topics(target).await? {
            say!("{topic}");
        }
        return Ok(());
    }
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
    // HOST only when some entry is another host's or shared (a daemon in
    // cluster mode): a local daemon's list is what it always was.
    let with_host = topics.values().any(|state| {
        state
            .presences
            .values()
            .flat_map(|presence| &presence.metas)
            .any(|meta| host_of_ref(&meta.phx_ref).is_some())
    });
    let mut rows = rows(&topics, with_host);
    if rows.is_empty() {
        eprintln!("nobody is present");
        return Ok(());
    }
    let mut header = vec!["TOPIC", "ROLE", "KEY", "USER", "PID", "JOINED"];
    if with_host {
        header.insert(HOST_COLUMN, "HOST");
    }
    // META only when someone has one: most joins carry none.
    if rows.iter().any(|row| row.len() > header.len()) {
        header.push("META");
    }
    if !args.wide
        && let Some(width) = render::terminal_width()
    {
        let shrinkable: Vec<(usize, usize)> = SHRINKABLE
            .iter()
            .map(|&(column, least)| match column {
                column if with_host && column >= HOST_COLUMN => (column + 1, least),
                column => (column, least),
            })
            .collect();
        render::fit(&header, &mut rows, width, &shrinkable);
    }
    let table = render::table(&header, &rows);
    say!("{}", table.trim_end());
    Ok(())
}

/// The names of the topics someone is present on, in name order, from the
/// daemon listening at the target's socket; none when no daemon listens
/// there.
/// Never starts a daemon, whatever `--no-autostart` says: asking what is
/// there must not change it. The socket folder and the daemon are checked
/// as for any command (by [`Client::connect`]).
///
/// A name the command line would refuse (blank, or holding control or
/// format characters, which a database from before the daemon refused them
/// may keep) is left out rather than escaped: it could not be typed back
/// as an argument, and a line break in it would split its line in two.
pub async fn running_topics(target: &Target) -> anyhow::Result<Vec<String>> {
    let client = match Client::connect(&target.socket).await {
        Ok((client, _events)) => client,
        Err(ClientError::NoDaemon { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(target.explain(e)),
    };
    let request = Request::List(ListRequest { topic: None });
    let fields = request_fields(&client, &request, "could not list the topics").await?;
    let all: crate::protocol::ListAllReply = decode(fields, "list")?;
    Ok(all
        .topics
        .into_keys()
        .filter(|topic| parse_name(topic).is_ok())
        .collect())
}

/// One row per entry: topics by name, and within a topic the owner first,
/// then the spectators in the order they will be promoted.
/// With `with_host`, each row names the host its entry is on.
fn rows(topics: &BTreeMap<String, TopicPresences>, with_host: bool) -> Vec<Vec<Cell>> {
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
            if with_host {
                row.insert(HOST_COLUMN, host_cell(&meta.phx_ref));
            }
            if let Some(client) = render::client_meta(&meta.client) {
                row.push(Cell::from(client));
            }
            rows.push(row);
        }
    }
    rows
}

/// The host an entry's ref names (`web-1` of `web-1:p3`), or a dim `-`
/// for one of this daemon's local topics.
pub fn host_cell(phx_ref: &str) -> Cell {
    match host_of_ref(phx_ref) {
        Some(host) => Cell::from(host),
        None => Cell::new("-", Style::Dim),
    }
}
