//! `presence leave`: remove your entries from a topic, typically the one
//! `presence join --detach` left behind.

use clap::Args;

use super::{EntryArgs, Target, failed_changing, parse_name};
use crate::protocol::{UntrackReply, UntrackRequest};

#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The topic to leave
    #[arg(value_parser = parse_name)]
    pub topic: String,

    #[command(flatten)]
    pub entry: EntryArgs,

    /// Remove every entry of yours with the key, whichever process it
    /// belongs to
    #[arg(long, conflicts_with_all = ["phx_ref", "pid"])]
    pub all: bool,

    /// Print the daemon's untrack reply as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: LeaveArgs) -> anyhow::Result<()> {
    let (client, _events) = target.connect().await?;
    let doing = format!("could not leave {}", args.topic);
    let untrack = async |phx_ref: Option<String>, key: Option<String>| {
        let request = UntrackRequest {
            topic: args.topic.clone(),
            phx_ref,
            key,
        };
        client
            .untrack(request)
            .await
            .map_err(|e| failed_changing(&doing, e))
    };

    let (removed, named, hint) = if args.all {
        // The daemon's own rule: every entry with the key that we may change.
        let key = args.entry.key_or_login();
        let reply = untrack(None, Some(key.clone())).await?;
        (reply.removed, format!("key {key}"), String::new())
    } else {
        let selection = args.entry.resolve(&client, &args.topic, &doing).await?;
        let mut removed = 0;
        for phx_ref in &selection.refs {
            removed += untrack(Some(phx_ref.clone()), None).await?.removed;
        }
        (removed, args.entry.describe(), selection.hint())
    };

    if args.json {
        say!("{}", serde_json::to_string(&UntrackReply { removed })?);
    } else if removed == 0 {
        // Nothing to remove is the state leave is for: not an error.
        say!("nothing to leave on {} ({named}){hint}", args.topic);
    } else {
        let entries = if removed == 1 { "entry" } else { "entries" };
        say!("left {} ({removed} {entries})", args.topic);
    }
    Ok(())
}
