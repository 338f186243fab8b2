//! `presence update`: replace the meta of one of your entries.

use clap::Args;
use serde_json::{Map, Value};

use super::args::{parse_meta, parse_name};
use super::completions;
use super::entries::EntryArgs;
use super::errors::failed_changing;
use super::render;
use super::target::Target;
use crate::protocol::UpdateRequest;

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The entry's topic
    #[arg(value_parser = parse_name, add = completions::topics())]
    pub topic: String,

    #[command(flatten)]
    pub entry: EntryArgs,

    /// The new meta, a JSON object; it replaces the old one whole
    #[arg(long, value_name = "JSON", value_parser = parse_meta)]
    pub meta: Map<String, Value>,

    /// Print the daemon's update reply as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: UpdateArgs) -> anyhow::Result<()> {
    let (client, _events) = target.connect().await?;
    let doing = format!("could not update {}", args.topic);
    let selection = args.entry.resolve(&client, &args.topic, &doing).await?;
    let phx_ref = match selection.refs.as_slice() {
        [phx_ref] => phx_ref.clone(),
        [] => anyhow::bail!(
            "{doing}: you have no entry there with {}{}; `presence list {}` shows who is there",
            args.entry.describe(),
            selection.hint(),
            args.topic
        ),
        several => anyhow::bail!(
            "{doing}: you have {} entries there with {} ({}); name one with --ref",
            several.len(),
            args.entry.describe(),
            several.join(", ")
        ),
    };
    let reply = client
        .update(UpdateRequest {
            topic: args.topic.clone(),
            phx_ref: Some(phx_ref),
            key: None,
            meta: args.meta,
        })
        .await
        .map_err(|e| failed_changing(&doing, e))?;
    if args.json {
        say!("{}", serde_json::to_string(&reply)?);
    } else {
        let line = format!(
            "updated {}, ref {} (was {})",
            args.topic, reply.phx_ref, reply.prev_ref
        );
        say!("{}", render::visible(&line));
    }
    Ok(())
}
