//! `presence watch`: a topic's state, then one line per change.

use clap::Args;

use super::{Target, render};
use crate::protocol::{Event, LeaveReason};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The topic to follow
    pub topic: String,

    /// Print the raw events as JSON lines
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: WatchArgs) -> anyhow::Result<()> {
    let (client, mut events) = target.connect().await?;
    client.subscribe(&args.topic).await?;
    let mut owner_ref: Option<String> = None;
    while let Some(event) = events.recv().await {
        if args.json {
            say!("{}", serde_json::to_string(&event)?);
        }
        match event {
            Event::Shutdown { payload } => {
                anyhow::bail!("the daemon shut down ({})", payload.reason)
            }
            _ if args.json => {}
            Event::PresenceState { payload, owner, .. } => {
                let metas = render::metas_by_seq(&payload);
                say!(
                    "{}: owner {}, {} spectator{}",
                    args.topic,
                    render::owner(owner.as_ref()),
                    metas.len().saturating_sub(1),
                    if metas.len() == 2 { "" } else { "s" }
                );
                owner_ref = owner.map(|o| o.phx_ref);
            }
            Event::PresenceDiff {
                payload,
                owner,
                reasons,
                ..
            } => {
                for (key, meta) in render::metas_by_seq(&payload.leaves) {
                    let reason = reasons.get(&meta.phx_ref);
                    if reason != Some(&LeaveReason::Update) {
                        say!("- {key} (pid {}) {}", meta.pid, render::reason(reason));
                    }
                }
                for (key, meta) in render::metas_by_seq(&payload.joins) {
                    if meta.phx_ref_prev.is_some() {
                        say!("~ {key} (pid {}) updated", meta.pid);
                    } else {
                        say!("+ {key} (pid {}) joined", meta.pid);
                    }
                }
                // An update gives the owner a new ref; compare by the ref
                // it replaced too.
                let new_owner_ref = owner.as_ref().map(|o| o.phx_ref.clone());
                let renamed = payload.joins.values().flat_map(|p| &p.metas).any(|m| {
                    m.phx_ref_prev.is_some()
                        && m.phx_ref_prev == owner_ref
                        && new_owner_ref.as_ref() == Some(&m.phx_ref)
                });
                if new_owner_ref != owner_ref && !renamed {
                    say!("→ {} is now owner", render::owner(owner.as_ref()));
                }
                owner_ref = new_owner_ref;
            }
            Event::Role { .. } => {}
        }
    }
    anyhow::bail!("the daemon closed the connection")
}
