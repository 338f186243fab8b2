//! `presence leave`: remove your entries from a topic, typically the one
//! `presence join --detach` left behind.

use clap::Args;

use super::args::parse_name;
use super::completions;
use super::entries::EntryArgs;
use super::errors::failed_changing;
use super::outcome::Outcome;
use super::render;
use super::target::Target;
use crate::client::ClientError;
use crate::protocol::{ErrorCode, UntrackReply, UntrackRequest};

#[derive(Debug, Args)]
pub struct LeaveArgs {
    /// The topic to leave
    #[arg(value_parser = parse_name, add = completions::topics())]
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

pub async fn run(target: &Target, args: LeaveArgs) -> anyhow::Result<Outcome> {
    let (client, _events) = target.connect().await?;
    let doing = format!("could not leave {}", args.topic);

    let (removed, named, hint) = if args.all {
        // The daemon's own rule: every entry with the key that we may change.
        let key = args.entry.key_or_login();
        let request = UntrackRequest {
            topic: args.topic.clone(),
            phx_ref: None,
            key: Some(key.clone()),
        };
        let reply = client
            .untrack(request)
            .await
            .map_err(|e| failed_changing(&doing, e))?;
        (reply.removed, format!("key {key}"), String::new())
    } else {
        let selection = args.entry.resolve(&client, &args.topic, &doing).await?;
        let mut removed = 0;
        let mut held = Vec::new();
        for phx_ref in &selection.refs {
            let request = UntrackRequest {
                topic: args.topic.clone(),
                phx_ref: Some(phx_ref.clone()),
                key: None,
            };
            match client.untrack(request).await {
                Ok(reply) => removed += reply.removed,
                // Found by key but held by a running command, as untrack by
                // key would skip it: leave goes on with the rest, and says
                // so. A ref named outright is an error to refuse.
                Err(ClientError::Refused(body))
                    if body.code == ErrorCode::PermissionDenied && args.entry.phx_ref.is_none() =>
                {
                    held.push(phx_ref.as_str());
                }
                Err(e) => return Err(failed_changing(&doing, e)),
            }
        }
        // Your entries elsewhere matter only when nothing was left here.
        let mut hint = if removed == 0 {
            selection.hint()
        } else {
            String::new()
        };
        if !held.is_empty() {
            hint.push_str(&format!(
                "; held by a running `presence join`, which ends it: {}",
                held.join(", ")
            ));
        }
        (removed, args.entry.describe(), hint)
    };

    if args.json {
        say!("{}", serde_json::to_string(&UntrackReply { removed })?);
    } else if removed == 0 {
        // Nothing to remove fails, so a script notices a wrong topic or
        // key; the line says what was looked for, on stderr as errors are.
        let line = format!("nothing to leave on {} ({named}){hint}", args.topic);
        eprintln!("presence: {}", render::visible(&line));
    } else {
        let entries = if removed == 1 { "entry" } else { "entries" };
        let line = format!("left {} ({removed} {entries}){hint}", args.topic);
        say!("{}", render::visible(&line));
    }
    Ok(if removed == 0 {
        Outcome::Failed
    } else {
        Outcome::Done
    })
}
