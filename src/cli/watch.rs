//! `presence watch`: a topic's state, then one line per change.

use std::collections::BTreeSet;

use clap::Args;

use super::{Target, render};
use crate::client::SessionEvent;
use crate::protocol::{Event, LeaveReason};

#[derive(Debug, Args)]
#[command(after_long_help = "\
Prints the topic's owner and spectator count, then one line per change:

  doc: owner alice (pid 4242), 1 spectator
  + carol (pid 4301) joined
  - alice (pid 4242) process exited
  → bob (pid 4250) is now owner

If the daemon restarts, the command reconnects and subscribes again,
printing the summary again only if the topic changed meanwhile; with
--json it prints the fresh presence_state. It exits 1 only if the daemon
does not come back within 30 seconds.")]
pub struct WatchArgs {
    /// The topic to follow
    pub topic: String,

    /// Print the raw events as JSON lines
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: WatchArgs) -> anyhow::Result<()> {
    let (session, mut events) = target.session().await?;
    session.subscribe(&args.topic).await?;
    let mut owner_ref: Option<String> = None;
    // Who is on the topic, by ref: a fresh state after a daemon restart is
    // only worth a line when it differs from what we already showed.
    let mut shown: Option<BTreeSet<String>> = None;
    while let Some(event) = events.recv().await {
        let event = match event {
            SessionEvent::Event(event) => event,
            SessionEvent::Lost { reason } => anyhow::bail!("{reason}"),
            SessionEvent::Unsubscribed { error, .. } => {
                anyhow::bail!("the daemon refused to renew the subscription: {error}")
            }
            _ => continue,
        };
        if args.json {
            say!("{}", serde_json::to_string(&event)?);
            continue;
        }
        match event {
            Event::PresenceState { payload, owner, .. } => {
                let metas = render::metas_by_seq(&payload);
                let now_present: BTreeSet<String> =
                    metas.iter().map(|(_, m)| m.phx_ref.clone()).collect();
                let now_owner = owner.as_ref().map(|o| o.phx_ref.clone());
                if shown.as_ref() != Some(&now_present) || now_owner != owner_ref {
                    say!(
                        "{}: owner {}, {} spectator{}",
                        args.topic,
                        render::owner(owner.as_ref()),
                        metas.len().saturating_sub(1),
                        if metas.len() == 2 { "" } else { "s" }
                    );
                }
                shown = Some(now_present);
                owner_ref = now_owner;
            }
            Event::PresenceDiff {
                payload,
                owner,
                reasons,
                ..
            } => {
                for (key, meta) in render::metas_by_seq(&payload.leaves) {
                    if let Some(present) = &mut shown {
                        present.remove(&meta.phx_ref);
                    }
                    let reason = reasons.get(&meta.phx_ref);
                    if reason != Some(&LeaveReason::Update) {
                        say!("- {key} (pid {}) {}", meta.pid, render::reason(reason));
                    }
                }
                for (key, meta) in render::metas_by_seq(&payload.joins) {
                    if let Some(present) = &mut shown {
                        present.insert(meta.phx_ref.clone());
                    }
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
            Event::Role { .. } | Event::Shutdown { .. } => {}
        }
    }
    anyhow::bail!("the daemon closed the connection")
}
