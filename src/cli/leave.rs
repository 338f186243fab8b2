//! `presence leave`: remove your entries from a topic, typically the one
//! `presence join --detach` left behind.

use clap::Args;

use super::{EntryArgs, Target, failed_changing, parse_name};
use crate::protocol::UntrackRequest;

#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The topic to leave
    #[arg(value_parser = parse_name)]
    pub topic: String,

    #[command(flatten)]
    pub entry: EntryArgs,

    /// Print the daemon's untrack reply as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: LeaveArgs) -> anyhow::Result<()> {
    let (client, _events) = target.connect().await?;
    // The daemon takes a ref over a key; send only the one meant.
    let (phx_ref, key) = match &args.entry.phx_ref {
        Some(phx_ref) => (Some(phx_ref.clone()), None),
        None => (None, Some(args.entry.key_or_login())),
    };
    let named = match (&phx_ref, &key) {
        (Some(phx_ref), _) => format!("ref {phx_ref}"),
        (None, key) => format!("key {}", key.as_deref().unwrap_or_default()),
    };
    let reply = client
        .untrack(UntrackRequest {
            topic: args.topic.clone(),
            phx_ref,
            key,
        })
        .await
        .map_err(|e| failed_changing(&format!("could not leave {}", args.topic), e))?;
    if args.json {
        say!("{}", serde_json::to_string(&reply)?);
    } else if reply.removed == 0 {
        // Nothing to remove is the state leave is for: not an error.
        say!("nothing to leave on {} ({named})", args.topic);
    } else {
        let entries = if reply.removed == 1 {
            "entry"
        } else {
            "entries"
        };
        say!("left {} ({} {entries})", args.topic, reply.removed);
    }
    Ok(())
}
