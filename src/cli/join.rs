//! `presence join`: hold a presence on a topic and report role changes, or
//! leave an entry behind for another process (`--detach`), and optionally
//! wait to be the owner first (`--wait-owner`).

use std::pin::Pin;
use std::time::Duration;

use std::io::Write as _;

use clap::Args;
use serde_json::Value;
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::args::duration_up_to;
use super::entries::{NewEntryArgs, invoking_process};
use super::errors::failed;
use super::outcome::Outcome;
use super::render;
use super::target::Target;
use crate::client::{SessionEvent, SessionEvents};
use crate::protocol::{Actor, Event, Lifetime, Removal, Revision, Role, Standing, TrackReply};

#[derive(Debug, Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub entry: NewEntryArgs,

    /// The process the presence belongs to; it ends when that process exits
    /// [default: this one; with --detach, the one that ran presence]
    #[arg(long)]
    pub pid: Option<u32>,

    /// Leave the entry to the --pid process and exit: 0 as the owner, 3 as
    /// a spectator
    #[arg(long)]
    pub detach: bool,

    /// Wait until the entry is the owner, as flock(1) waits for a lock
    #[arg(long)]
    pub wait_owner: bool,

    /// With --wait-owner: give up after this long (seconds, or 30s, 5m),
    /// remove the entry, and exit 3
    #[arg(long, value_name = "DURATION", requires = "wait_owner", value_parser = duration_up_to(365.0 * 86_400.0))]
    pub timeout: Option<Duration>,

    /// Print the track reply and every event as JSON lines
    #[arg(long)]
    pub json: bool,
}

pub async fn run(target: &Target, args: JoinArgs) -> anyhow::Result<Outcome> {
    // Installed first, so that a signal arriving right after the join
    // still leads to a clean leave.
    let mut signals = Signals::install()?;
    // A detached entry outlives this command, so by default it belongs to
    // whoever ran it: the shell or script, which `presence` is a child of.
    let pid = match (args.pid, args.detach) {
        (Some(pid), _) => Some(pid),
        (None, true) => Some(invoking_process()?),
        (None, false) => None,
    };
    let process_exit = exit_of(pid)?;

    // A signal before the entry exists cancels the join: a daemon that is
    // slow to start must not make the command unkillable.
    let joining = async {
        let (session, events) = target.session().await?;
        if let Some(pid) = pid {
            refuse_joining_twice(&session, &args, pid).await?;
        }
        let tracked = session
            .track(args.entry.track_request(
                pid,
                if args.detach {
                    Lifetime::Process
                } else {
                    Lifetime::Connection
                },
            ))
            .await
            .map_err(|e| failed(&format!("could not join {}", args.entry.topic), e))?;
        anyhow::Ok((session, events, tracked))
    };
    let (session, mut events, tracked) = tokio::select! {
        joined = joining => joined?,
        () = signals.recv() => anyhow::bail!("interrupted before joining {}", args.entry.topic),
    };

    let mut printer = Printer::new(&args, &args.entry.key_or_login());
    let held = hold(
        &args,
        &tracked,
        &mut events,
        &mut signals,
        process_exit,
        &mut printer,
    )
    .await;
    match held {
        // Owner at last, or a detached entry: it stays with its process.
        Ok(End::Owner) => Ok(outcome(Role::Owner)),
        Ok(End::Detached(role)) => Ok(outcome(role)),
        // Someone else took the entry away: there is nothing to leave, and
        // the caller must stop acting as its holder.
        Ok(End::Removed) => Ok(Outcome::Removed),
        Ok(End::Stopped { was_owner }) => {
            // Leave explicitly, so the next in line is promoted now, not
            // when the daemon notices the connection closing.
            leave_within_bounds(&session, &args.entry.topic).await;
            Ok(if args.wait_owner && !was_owner {
                Outcome::NotOwner
            } else {
                Outcome::Done
            })
        }
        // Output that cannot be written, a lost daemon: the entry must not
        // stay queued behind a command that has given up.
        Err(e) => {
            leave_within_bounds(&session, &args.entry.topic).await;
            Err(e)
        }
    }
}

/// Refuses a second entry with the same key for the same process: a
/// script or shell that joins again would otherwise queue behind itself,
/// waiting on its own entry for ever. The daemon allows it (a program may
/// want two entries under one key); the command line asks for another key.
async fn refuse_joining_twice(
    session: &crate::client::Session,
    args: &JoinArgs,
    pid: u32,
) -> anyhow::Result<()> {
    let doing = format!("could not join {}", args.entry.topic);
    let key = args.entry.key_or_login();
    let client = session.client().await.map_err(|e| failed(&doing, e))?;
    let uid = crate::sys::current_uid();
    let metas = client
        .get_by_key(&args.entry.topic, &key)
        .await
        .map_err(|e| failed(&doing, e))?;
    let mut mine = metas
        .iter()
        .filter(|m| m.uid == uid && m.pid == pid)
        .peekable();
    // On a topic shared across hosts, an entry another host tracked may
    // carry the same pid and uid by chance: only this host's count. The
    // daemon is asked its host name only when some entry names a host.
    let own_host = if mine
        .peek()
        .is_some_and(|m| crate::protocol::host_of_ref(&m.phx_ref).is_some())
    {
        let status = client.status().await.map_err(|e| failed(&doing, e))?;
        status.cluster.map(|cluster| cluster.host)
    } else {
        None
    };
    let same_host = |m: &&crate::protocol::Meta| match crate::protocol::host_of_ref(&m.phx_ref) {
        Some(host) => own_host.as_deref() == Some(host),
        None => true,
    };
    if let Some(meta) = mine.find(same_host) {
        anyhow::bail!(
            "already in line on {} with key {key} for pid {pid} (ref {}); `presence leave {}` \
             removes that entry, or join with another --key to be in line twice",
            args.entry.topic,
            meta.phx_ref,
            args.entry.topic
        );
    }
    Ok(())
}

/// Prints the standing, then holds or waits as the flags say.
async fn hold(
    args: &JoinArgs,
    tracked: &crate::protocol::TrackReply,
    events: &mut SessionEvents,
    signals: &mut Signals,
    process_exit: impl Future<Output = ()>,
    printer: &mut Printer,
) -> anyhow::Result<End> {
    printer.track(tracked)?;
    let role = tracked.standing.role;
    if args.detach && !(args.wait_owner && role != Role::Owner) {
        return Ok(End::Detached(role));
    }
    let watch = Watch {
        events,
        signals,
        process_exit: std::pin::pin!(process_exit),
        printer,
    };
    watch.until_done(args, role).await
}

/// How long leaving may take before the command gives up on it: a daemon
/// that is restarting must not hold a script past its --timeout.
const LEAVE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Leaves the topic, so that the next in line is promoted now rather than
/// when the daemon sees the process go; `join` and `run` both end so.
pub(super) async fn leave_within_bounds(session: &crate::client::Session, topic: &str) {
    if tokio::time::timeout(LEAVE_DEADLINE, session.leave_all())
        .await
        .is_err()
    {
        let _ = writeln!(
            std::io::stderr(),
            "presence: could not leave {topic} in time; `presence list {topic}` shows \
             whether the entry is still there, and `presence leave` removes it"
        );
    }
}

/// How holding, or waiting to be the owner, ended.
enum End {
    /// `--detach` without waiting: the entry stays, in this role.
    Detached(Role),
    /// `--detach --wait-owner` got there.
    Owner,
    /// A signal, the --pid process's exit, or the --timeout.
    Stopped { was_owner: bool },
    /// Another connection removed the entry.
    Removed,
}

/// What `join` keeps an eye on while it holds or waits.
struct Watch<'a, P> {
    events: &'a mut SessionEvents,
    signals: &'a mut Signals,
    process_exit: Pin<&'a mut P>,
    printer: &'a mut Printer,
}

impl<P: Future<Output = ()>> Watch<'_, P> {
    /// Prints each change of standing until something ends the command.
    async fn until_done(mut self, args: &JoinArgs, mut role: Role) -> anyhow::Result<End> {
        // The deadline of --wait-owner: dropped once the entry is the owner.
        let mut give_up: Option<Pin<Box<tokio::time::Sleep>>> = match args.timeout {
            Some(timeout) if role != Role::Owner => Some(Box::pin(tokio::time::sleep(timeout))),
            _ => None,
        };
        let mut was_owner = role == Role::Owner;
        loop {
            tokio::select! {
                event = self.events.recv() => {
                    match next_news(self.printer, event, &args.entry.topic)? {
                        News::Role(new_role) => role = new_role,
                        News::Removed => return Ok(End::Removed),
                        News::Nothing => {}
                    }
                }
                () = self.signals.recv() => break,
                () = self.process_exit.as_mut() => break,
                () = wait_or_never(&mut give_up) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "presence: still not the owner of {} after {} s; leaving the queue",
                        args.entry.topic,
                        args.timeout.unwrap_or_default().as_secs_f64()
                    );
                    break;
                }
            }
            if role == Role::Owner {
                if args.detach {
                    return Ok(End::Owner);
                }
                was_owner = true;
                give_up = None;
            }
        }
        Ok(End::Stopped { was_owner })
    }
}

fn outcome(role: Role) -> Outcome {
    match role {
        Role::Owner => Outcome::Done,
        Role::Spectator => Outcome::NotOwner,
    }
}

/// Resolves when the --pid process exits, and never without one. The
/// process must run now; it is pinned by its start time, so that a later
/// process reusing its pid is not mistaken for it.
fn exit_of(pid: Option<u32>) -> anyhow::Result<impl Future<Output = ()>> {
    let process = match pid {
        Some(pid) => Some(crate::sys::process_id(pid).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                anyhow::anyhow!("no running process {pid}; check --pid")
            }
            _ => anyhow::anyhow!("cannot read process {pid}: {e}"),
        })?),
        None => None,
    };
    Ok(async move {
        match process {
            // A watch that fails cannot tell us more: treat it as the exit,
            // so no presence outlives a process we can no longer see.
            Some(process) => {
                let _ = crate::sys::wait_for_exit(process, Duration::from_millis(200)).await;
            }
            None => std::future::pending().await,
        }
    })
}

/// What one session event means for the entry.
enum News {
    Nothing,
    /// The entry's role, which may be the one it had.
    Role(Role),
    /// Another connection removed it.
    Removed,
}

/// Handles one session event and says what it means for the entry. Ends
/// the command on what it cannot ride through.
fn next_news(
    printer: &mut Printer,
    event: Option<SessionEvent>,
    topic: &str,
) -> anyhow::Result<News> {
    match event {
        Some(SessionEvent::Event(event)) => {
            printer.event(&event)?;
            Ok(match event {
                Event::Role { payload, .. } => News::Role(payload.standing.role),
                Event::Removed {
                    topic: ref on,
                    ref payload,
                } if printer.holds(on, &payload.key) => News::Removed,
                _ => News::Nothing,
            })
        }
        // The entry expired while the daemon was away and was tracked
        // again: it has a new place, which may or may not be news.
        Some(SessionEvent::Retracked { reply, .. }) => {
            printer.track(&reply)?;
            Ok(News::Role(reply.standing.role))
        }
        other => session_trouble(other, topic).map(|()| News::Nothing),
    }
}

/// What `join` and `run` make of a session event that is not about their
/// entry's standing: the session's end is an error, and a restart the
/// daemon came back from is not news to the user (the session logs it).
pub(super) fn session_trouble(event: Option<SessionEvent>, topic: &str) -> anyhow::Result<()> {
    match event {
        Some(SessionEvent::Dropped { error, .. }) => {
            anyhow::bail!("lost the presence on {topic}: {error}")
        }
        Some(SessionEvent::Lost { reason }) => anyhow::bail!("{reason}"),
        None => anyhow::bail!("the session with the daemon ended"),
        Some(
            SessionEvent::Event(_)
            | SessionEvent::Retracked { .. }
            | SessionEvent::Disconnected { .. }
            | SessionEvent::Reconnected
            | SessionEvent::Unsubscribed { .. }
            | SessionEvent::ResubscribedToAll { .. },
        ) => Ok(()),
    }
}

/// Waits for the deadline if there is one, and forever if not.
pub(super) async fn wait_or_never(deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match deadline {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The signals that end `join`: Ctrl-C, `kill`, and a closed terminal.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = self.hangup.recv() => {}
        }
    }
}

/// What `join` has told its reader, so that it says only what is new.
struct Printer {
    json: bool,
    /// `--detach` names the entry, so that `leave --ref` can find it.
    show_ref: bool,
    /// The entry's topic and key. Its connection holds no other entry
    /// there, so a `removed` or `updated` event for them is about the
    /// entry, whatever ref it names.
    topic: String,
    key: String,
    /// The entry's ref, which changes if it is tracked again or another
    /// connection updates it.
    phx_ref: String,
    /// The last standing printed, in words.
    said: Option<String>,
}

impl Printer {
    fn new(args: &JoinArgs, key: &str) -> Printer {
        Printer {
            json: args.json,
            show_ref: args.detach,
            topic: args.entry.topic.clone(),
            key: key.to_owned(),
            phx_ref: String::new(),
            said: None,
        }
    }

    /// Whether an event on `topic` for `key` is about the entry: matched
    /// on both rather than the ref, so that an update nobody told this
    /// command of (from a daemon that predates `updated` events, or the
    /// `refs` of `resume` replies) cannot hide the entry's removal. This
    /// differs from the session's rule (by ref, see `client::session`) on
    /// purpose, and is exact here: this command's session holds one entry,
    /// a connection holds at most one per topic and key, and a `removed`
    /// or `updated` event goes only to the connection holding the entry.
    /// The session's rule guards against a newer entry for the same key
    /// being taken for a removed one; this command ends at the first
    /// removal, so it never holds such a newer entry.
    fn holds(&self, topic: &str, key: &str) -> bool {
        topic == self.topic && key == self.key
    }

    /// A track reply: the first one, or one after the entry was tracked
    /// again. `--json` always prints it (the ref changed); words only when
    /// they changed.
    fn track(&mut self, tracked: &TrackReply) -> anyhow::Result<()> {
        self.phx_ref.clone_from(&tracked.phx_ref);
        if self.json {
            say!("{}", track_line(tracked)?);
            Ok(())
        } else {
            self.standing(&tracked.standing)
        }
    }

    fn event(&mut self, event: &Event) -> anyhow::Result<()> {
        if self.json {
            say!("{}", serde_json::to_string(event)?);
            if let Event::Updated { topic, payload } = event
                && self.holds(topic, &payload.key)
            {
                self.phx_ref.clone_from(&payload.phx_ref);
            }
            return Ok(());
        }
        match event {
            Event::Role { payload, .. } => self.standing(&payload.standing)?,
            Event::Removed { topic, payload } if self.holds(topic, &payload.key) => {
                say!("{}", removed_line(payload));
            }
            Event::Updated { topic, payload } if self.holds(topic, &payload.key) => {
                self.phx_ref.clone_from(&payload.phx_ref);
                say!("{}", updated_line(payload, self.show_ref));
            }
            _ => {}
        }
        Ok(())
    }

    fn standing(&mut self, standing: &Standing) -> anyhow::Result<()> {
        let mut words = render::standing(standing);
        if self.show_ref {
            words = format!("{words}, ref {}", render::visible(&self.phx_ref));
        }
        if self.said.as_ref() != Some(&words) {
            say!("{words}");
            self.said = Some(words);
        }
        Ok(())
    }
}

/// Who removed the entry, in words: `removed by root (uid 0, pid 4711)`.
fn removed_line(removal: &Removal) -> String {
    format!("removed by {}", actor(&removal.by))
}

/// Who updated the entry and what its meta is now, in words:
/// `updated by root (uid 0, pid 4711), meta {"file":"b.md"}`, and with
/// `--detach` its new ref, which `presence leave --ref` needs.
fn updated_line(revision: &Revision, show_ref: bool) -> String {
    let meta = render::client_meta(&revision.meta).unwrap_or_else(|| "{}".to_owned());
    let mut line = format!("updated by {}, meta {meta}", actor(&revision.by));
    if show_ref {
        line = format!("{line}, ref {}", render::visible(&revision.phx_ref));
    }
    line
}

/// `root (uid 0, pid 4711)`; a user name is shown with its hidden
/// characters escaped, as every name is.
fn actor(by: &Actor) -> String {
    format!(
        "{} (uid {}, pid {})",
        render::visible(&by.user),
        by.uid,
        by.pid
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::LeaveReason;

    fn by(user: &str) -> Actor {
        Actor {
            uid: 1001,
            user: user.to_owned(),
            pid: 4711,
        }
    }

    #[test]
    fn who_removed_or_updated_an_entry_is_shown_with_hidden_characters_escaped() {
        // A user name comes from the system's user database, which takes
        // names the daemon would refuse as keys.
        let removal = Removal {
            phx_ref: "p3".to_owned(),
            key: "editor".to_owned(),
            reason: LeaveReason::Untrack,
            by: by("eve\u{202e}toor\u{1b}[2J"),
        };
        assert_eq!(
            removed_line(&removal),
            "removed by eve\\u{202e}toor\\u{1b}[2J (uid 1001, pid 4711)"
        );
        let mut meta = serde_json::Map::new();
        meta.insert("file".to_owned(), Value::from("b\u{200b}.md"));
        let revision = Revision {
            phx_ref: "p4".to_owned(),
            prev_ref: "p3".to_owned(),
            key: "editor".to_owned(),
            meta,
            by: by("root"),
        };
        assert_eq!(
            updated_line(&revision, false),
            "updated by root (uid 1001, pid 4711), meta {\"file\":\"b\\u{200b}.md\"}"
        );
        assert!(updated_line(&revision, true).ends_with(", ref p4"));
    }
}
