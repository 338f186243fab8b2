//! `presence list`: who is present, on one topic or on all.

use std::collections::BTreeMap;

use clap::Args;
use serde_json::Value;

use super::{Target, render};
use crate::protocol::{ListRequest, Request, TopicPresences};

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this topic
    pub topic: Option<String>,

    /// Print the daemon's `list` reply fields as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: ListArgs) -> anyhow::Result<()> {
    let (client, _events) = target.connect().await?;
    let reply = client
        .request(&Request::List(ListRequest {
            topic: args.topic.clone(),
        }))
        .await?;
    if let Some(error) = reply.error {
        anyhow::bail!("{}", error.message);
    }
    if args.json {
        say!("{}", serde_json::to_string(&Value::Object(reply.fields))?);
        return Ok(());
    }
    let topics: BTreeMap<String, TopicPresences> = match args.topic {
        Some(topic) => {
            let state: TopicPresences = serde_json::from_value(Value::Object(reply.fields))?;
            BTreeMap::from([(topic, state)])
        }
        None => {
            let all: crate::protocol::ListAllReply =
                serde_json::from_value(Value::Object(reply.fields))?;
            all.topics
        }
    };
    let mut rows = Vec::new();
    for (topic, state) in &topics {
        for (position, (key, meta)) in render::metas_by_seq(&state.presences)
            .into_iter()
            .enumerate()
        {
            let role = if position == 0 {
                "owner".to_owned()
            } else {
                format!("spectator #{position}")
            };
            rows.push(vec![
                topic.clone(),
                role,
                key.to_owned(),
                meta.user.clone(),
                meta.pid.to_string(),
                render::ago(meta.joined_at),
            ]);
        }
    }
    if rows.is_empty() {
        eprintln!("nobody is present");
        return Ok(());
    }
    let table = render::table(&["TOPIC", "ROLE", "KEY", "USER", "PID", "JOINED"], &rows);
    say!("{}", table.trim_end());
    Ok(())
}
