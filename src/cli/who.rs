//! `presence who FILE…`: who has a file open, by the topic every editor
//! plugin uses for it ([`crate::topic::file_topic`]).

use std::path::PathBuf;

use clap::{Args, ValueHint};
use serde::Serialize;
use serde_json::{Map, Value};

use super::list::{HOST_COLUMN, host_cell};
use super::outcome::Outcome;
use super::render;
use super::render::{Cell, Style};
use super::replies::{decode, request_fields};
use super::target::Target;
use crate::protocol::{ListRequest, Meta, Owner, Request, TopicPresences, host_of_ref};
use crate::topic::file_topic;

#[derive(Debug, Args)]
pub struct WhoArgs {
    /// The files; one that does not exist yet is named by its folder
    #[arg(required = true, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub files: Vec<PathBuf>,

    /// Print a JSON array, one object per file: file, topic, owner, queue
    #[arg(long)]
    pub json: bool,
}

/// One file's answer, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Answer {
    /// The file as it was named on the command line.
    file: String,
    topic: String,
    owner: Option<Owner>,
    /// Every entry, owner first, then the spectators in the order they
    /// will be promoted.
    queue: Vec<Place>,
}

/// An entry and its place in the queue: 0 is the owner. The meta is an
/// object of its own, not flattened beside `key` and `position`: a client
/// may put any field in its meta, `key` and `position` too, and must not
/// be able to change what is said about its place.
#[derive(Debug, Serialize)]
struct Place {
    key: String,
    position: usize,
    meta: Meta,
}

/// Answers every file it can; a file without a topic is named on stderr
/// and makes the exit status 1, after the others are printed.
pub async fn run(target: &Target, args: WhoArgs) -> anyhow::Result<Outcome> {
    // Every path is resolved before the daemon is asked, so a mistyped
    // one is told at once, without waiting for a daemon to start.
    let mut unanswered = 0;
    let mut wanted = Vec::new();
    for file in &args.files {
        match file_topic(file) {
            Ok(topic) => wanted.push((file, topic)),
            Err(e) => {
                eprintln!("presence: {}", render::visible(&e.to_string()));
                unanswered += 1;
            }
        }
    }
    let mut answers = Vec::new();
    if !wanted.is_empty() {
        let (client, _events) = target.connect().await?;
        for (file, topic) in wanted {
            let request = Request::List(ListRequest {
                topic: Some(topic.clone()),
            });
            let doing = format!("could not ask about {}", file.display());
            let fields = request_fields(&client, &request, &doing).await?;
            let state: TopicPresences = decode(fields, "list")?;
            answers.push(answer(file.display().to_string(), topic, state));
        }
    }
    if args.json {
        say!("{}", serde_json::to_string(&answers)?);
    } else if !answers.is_empty() {
        say!("{}", table(&answers).trim_end());
    }
    Ok(if unanswered == 0 {
        Outcome::Done
    } else {
        Outcome::Failed
    })
}

fn answer(file: String, topic: String, state: TopicPresences) -> Answer {
    let queue = render::metas_by_seq(&state.presences)
        .into_iter()
        .enumerate()
        .map(|(position, (key, meta))| Place {
            key: key.to_owned(),
            position,
            meta: meta.clone(),
        })
        .collect();
    Answer {
        file,
        topic,
        owner: state.owner,
        queue,
    }
}

/// One row per entry, like `presence list`, the file in the first column;
/// a file nobody has open gets one row saying so.
fn table(answers: &[Answer]) -> String {
    // HOST only when some entry is on a topic shared across hosts, as in
    // `presence list`.
    let with_host = answers.iter().any(|answer| {
        answer
            .queue
            .iter()
            .any(|place| host_of_ref(&place.meta.phx_ref).is_some())
    });
    let mut rows = Vec::new();
    for answer in answers {
        if answer.queue.is_empty() {
            rows.push(vec![
                Cell::from(answer.file.as_str()),
                Cell::new("nobody", Style::Dim),
            ]);
        }
        for place in &answer.queue {
            let mut row = vec![
                Cell::from(answer.file.as_str()),
                render::role_cell(place.position),
                Cell::from(place.key.as_str()),
                Cell::from(place.meta.user.as_str()),
                Cell::from(place.meta.pid.to_string()),
                Cell::from(editor(&place.meta.client)),
                Cell::new(render::when(place.meta.joined_at), Style::Dim),
            ];
            if with_host {
                row.insert(HOST_COLUMN, host_cell(&place.meta.phx_ref));
            }
            rows.push(row);
        }
    }
    let mut header = vec!["FILE", "ROLE", "KEY", "USER", "PID", "EDITOR", "SINCE"];
    if with_host {
        header.insert(HOST_COLUMN, "HOST");
    }
    render::table(&header, &rows)
}

/// The `editor` a plugin puts in its meta (`nvim 0.7.2`), or `-` for an
/// entry that says none (a script's `presence join`).
fn editor(meta: &Map<String, Value>) -> String {
    match meta.get("editor") {
        Some(Value::String(editor)) if !editor.is_empty() => editor.clone(),
        _ => "-".to_owned(),
    }
}
