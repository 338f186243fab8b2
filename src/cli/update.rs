//! `presence update`: replace the meta of one of your entries.

use clap::Args;
use serde_json::{Map, Value};

use super::{EntryArgs, Target, failed, failed_changing, parse_meta, parse_name};
use crate::client::Client;
use crate::protocol::UpdateRequest;

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The entry's topic
    #[arg(value_parser = parse_name)]
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
    let phx_ref = match &args.entry.phx_ref {
        Some(phx_ref) => phx_ref.clone(),
        None => ref_of_key(&client, &args.topic, &args.entry.key_or_login(), &doing).await?,
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
        say!(
            "updated {}, ref {} (was {})",
            args.topic,
            reply.phx_ref,
            reply.prev_ref
        );
    }
    Ok(())
}

/// The ref of your one entry with `key` on `topic`. The daemon updates by
/// key only the entries of the asking connection, and a command's
/// connection is new, so the entry is looked up first.
async fn ref_of_key(
    client: &Client,
    topic: &str,
    key: &str,
    doing: &str,
) -> anyhow::Result<String> {
    let uid = crate::sys::current_uid();
    let metas = client
        .get_by_key(topic, key)
        .await
        .map_err(|e| failed(doing, e))?;
    let refs: Vec<String> = metas
        .into_iter()
        .filter(|meta| meta.uid == uid)
        .map(|meta| meta.phx_ref)
        .collect();
    match refs.as_slice() {
        [phx_ref] => Ok(phx_ref.clone()),
        [] => anyhow::bail!(
            "{doing}: you have no entry with key {key} there; `presence list {topic}` shows who has"
        ),
        several => anyhow::bail!(
            "{doing}: you have {} entries with key {key} there ({}); name one with --ref",
            several.len(),
            several.join(", ")
        ),
    }
}
