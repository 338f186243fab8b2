//! `presence join`: hold a presence on a topic and report role changes.

use clap::Args;
use serde_json::{Map, Value};
use tokio::signal::unix::{SignalKind, signal};

use super::{Target, render};
use crate::client::{ClientError, SessionEvent};
use crate::protocol::{Event, TrackReply, TrackRequest};

#[derive(Debug, Args)]
#[command(after_long_help = "\
The first to join a topic is its owner; everyone after is a read-only
spectator, in join order. The command prints its standing at once, and
again whenever it changes role or the topic gets a new owner:

  owner
  spectator (owner: alice, pid 4242)

The presence is held until SIGINT, SIGTERM or SIGHUP, or until the --pid
process exits; then it is left and the command exits 0. If the daemon
restarts, the command reconnects and keeps its place without printing
anything; it exits 1 only if the daemon does not come back within 30
seconds.")]
pub struct JoinArgs {
    /// The topic, for example `publishing_edit:docs:post-slug`
    pub topic: String,

    /// Who you are on the topic [default: your login name]
    #[arg(long)]
    pub key: Option<String>,

    /// A JSON object shown to everyone on the topic
    #[arg(long, value_name = "JSON", value_parser = parse_meta)]
    pub meta: Option<Map<String, Value>>,

    /// The process the presence belongs to [default: this one]; the
    /// presence ends, and this command exits, when it exits
    #[arg(long)]
    pub pid: Option<u32>,

    /// Print the track reply and every event as JSON lines
    #[arg(long)]
    pub json: bool,
}

fn parse_meta(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str(text) {
        Ok(Value::Object(meta)) => Ok(meta),
        Ok(_) => Err("meta must be a JSON object, like '{\"file\":\"a.md\"}'".to_owned()),
        Err(e) => Err(format!("meta is not valid JSON: {e}")),
    }
}

pub async fn run(target: &Target, args: JoinArgs) -> anyhow::Result<()> {
    // Install the handlers first, so that a signal arriving right after the
    // join still leads to a clean leave.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let watched = match args.pid {
        Some(pid) => Some(crate::sys::process_id(pid).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => anyhow::anyhow!("no running process {pid}"),
            _ => anyhow::anyhow!("cannot read process {pid}: {e}"),
        })?),
        None => None,
    };

    let (session, mut events) = target.session().await?;
    let mut request = TrackRequest::new(
        &args.topic,
        args.key
            .unwrap_or_else(|| crate::sys::user_name(crate::sys::current_uid())),
    );
    request.meta = args.meta.unwrap_or_default();
    request.pid = args.pid;
    let tracked = match session.track(request).await {
        Ok(tracked) => tracked,
        Err(ClientError::Refused(error)) => {
            anyhow::bail!("could not join {}: {}", args.topic, error.message)
        }
        Err(e) => return Err(e.into()),
    };
    let mut printed = Printed::default();
    printed.track(args.json, &tracked)?;

    let process_exit = async {
        match watched {
            Some(process) => {
                crate::sys::wait_for_exit(process, std::time::Duration::from_millis(200)).await
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(process_exit);

    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(SessionEvent::Event(event)) => printed.event(args.json, &event)?,
                // The entry expired while the daemon was away and was
                // tracked again: it has a new place, which may or may not
                // be news.
                Some(SessionEvent::Retracked { reply, .. }) => printed.track(args.json, &reply)?,
                Some(SessionEvent::Dropped { error, .. }) => {
                    anyhow::bail!("lost the presence on {}: {error}", args.topic)
                }
                Some(SessionEvent::Lost { reason }) => anyhow::bail!("{reason}"),
                // A restart the daemon came back from is not news to the
                // user; the session logs it.
                Some(
                    SessionEvent::Disconnected { .. }
                    | SessionEvent::Reconnected
                    | SessionEvent::Unsubscribed { .. },
                ) => {}
                None => anyhow::bail!("the session ended"),
            },
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => break,
            _ = &mut process_exit => break,
        }
    }
    // Leave explicitly, so the next in line is promoted now, not when the
    // daemon notices the connection closing.
    session.leave_all().await;
    Ok(())
}

/// What `join` has told its reader, so that it says only what is new.
#[derive(Default)]
struct Printed {
    /// The last standing printed, in words.
    standing: Option<String>,
}

impl Printed {
    /// A track reply: the first one, or one after the entry was tracked
    /// again. `--json` always prints it (the ref changed); words only when
    /// they changed.
    fn track(&mut self, json: bool, tracked: &TrackReply) -> anyhow::Result<()> {
        if json {
            say!("{}", track_line(tracked)?);
        } else {
            self.standing(&tracked.standing)?;
        }
        Ok(())
    }

    fn event(&mut self, json: bool, event: &Event) -> anyhow::Result<()> {
        if json {
            say!("{}", serde_json::to_string(event)?);
        } else if let Event::Role { payload, .. } = event {
            self.standing(&payload.standing)?;
        }
        Ok(())
    }

    fn standing(&mut self, standing: &crate::protocol::Standing) -> anyhow::Result<()> {
        let words = render::standing(standing);
        if self.standing.as_ref() != Some(&words) {
            say!("{words}");
            self.standing = Some(words);
        }
        Ok(())
    }
}

/// The track reply as one JSON line: what `--json` prints first, and again
/// if the entry had to be tracked anew after a restart.
fn track_line(tracked: &TrackReply) -> anyhow::Result<String> {
    let mut line = serde_json::to_value(tracked)?;
    if let Value::Object(fields) = &mut line {
        fields.insert("ok".to_owned(), Value::Bool(true));
    }
    Ok(line.to_string())
}
