//! A session: a client that outlives its connection.
//!
//! A daemon restart (an upgrade, a crash, `systemctl restart`) closes every
//! connection. The daemon keeps each entry's place for a grace period, and
//! a session uses it: it waits for the socket to come back, connects again,
//! resumes every entry it holds by its resume token, and subscribes again.
//! Whoever reads the session's events sees only what really changed: a
//! `role` event when an entry's standing differs from what it last heard,
//! and a fresh `presence_state` for each subscription.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Client, ClientError, Events, lock};
use crate::folder_watch::{FolderWatch, next_change};
use crate::protocol::{
    Event, RoleChange, Standing, TrackReply, TrackRequest, UntrackReply, UntrackRequest,
    UpdateReply, UpdateRequest,
};

/// How a session gets its connection back.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    /// How long to wait for the daemon to come back before giving up.
    pub deadline: Duration,
    /// Start a daemon when the old one crashed. Never done after the daemon
    /// announced a `shutdown`: someone stopped it on purpose, and whoever
    /// restarts it (systemd, a person) should not find its place taken.
    pub autostart: bool,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            deadline: Duration::from_secs(30),
            autostart: true,
        }
    }
}

/// The first wait between connection attempts; it doubles up to
/// [`MAX_RETRY_WAIT`]. A change in the socket's folder cuts any wait short.
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(50);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(1);

/// What a session's owner hears.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// An event from the daemon, or a `role` event the session derived
    /// when a resumed entry's standing had changed while it was away.
    Event(Event),
    /// The connection closed; the session is getting it back.
    Disconnected { reason: String },
    /// Connected again, with every entry resumed and every subscription
    /// renewed.
    Reconnected,
    /// An entry the daemon no longer had (it expired while the session was
    /// away) was tracked again: it has a new ref and a place at the end of
    /// the queue.
    Retracked {
        previous_ref: String,
        reply: TrackReply,
    },
    /// An entry could be neither resumed nor tracked again.
    Dropped { previous_ref: String, error: String },
    /// The daemon did not come back in time. No event follows.
    Lost { reason: String },
}

pub type SessionEvents = mpsc::UnboundedReceiver<SessionEvent>;

/// An entry this session holds, with what is needed to get it back.
struct Held {
    topic: String,
    phx_ref: String,
    token: String,
    standing: Standing,
    /// The request that created it, to track it again if it expired.
    request: TrackRequest,
}

struct State {
    client: Arc<Client>,
    held: Vec<Held>,
    subscriptions: BTreeSet<String>,
    /// Counts connections. A track answered on an old connection after the
    /// new one resumed everything must resume its entry itself.
    generation: u64,
}

/// A connection to the daemon that reconnects and resumes by itself.
pub struct Session {
    state: Arc<Mutex<State>>,
}

impl Session {
    /// Wraps a fresh connection. The session takes its events; read them
    /// from the returned stream instead.
    pub fn new(
        socket: &Path,
        (client, events): (Client, Events),
        reconnect: Reconnect,
    ) -> (Session, SessionEvents) {
        let state = Arc::new(Mutex::new(State {
            client: Arc::new(client),
            held: Vec::new(),
            subscriptions: BTreeSet::new(),
            generation: 0,
        }));
        let (out, session_events) = mpsc::unbounded_channel();
        tokio::spawn(supervise(
            Arc::downgrade(&state),
            socket.to_owned(),
            reconnect,
            events,
            out,
        ));
        (Session { state }, session_events)
    }

    /// The current connection, for calls that hold no state (`list`,
    /// `status`, …). Do not track through it: such an entry is not resumed.
    pub fn client(&self) -> Arc<Client> {
        Arc::clone(&lock(&self.state).client)
    }

    fn current(&self) -> (Arc<Client>, u64) {
        let state = lock(&self.state);
        (Arc::clone(&state.client), state.generation)
    }

    pub async fn track(&self, request: TrackRequest) -> Result<TrackReply, ClientError> {
        let (client, generation) = self.current();
        let reply = client.track(request.clone()).await?;
        let resume_now = {
            let mut state = lock(&self.state);
            state.held.push(Held {
                topic: request.topic.clone(),
                phx_ref: reply.phx_ref.clone(),
                token: reply.resume_token.clone(),
                standing: reply.standing.clone(),
                request,
            });
            (state.generation != generation).then(|| Arc::clone(&state.client))
        };
        if let Some(client) = resume_now {
            // The reply crossed a reconnect, so the session resumed without
            // this entry. Failing here only means the next reconnect (or
            // the grace period) settles it.
            let _ = client.resume(vec![reply.resume_token.clone()]).await;
        }
        Ok(reply)
    }

    pub async fn untrack(&self, request: UntrackRequest) -> Result<UntrackReply, ClientError> {
        let reply = self.client().untrack(request.clone()).await?;
        lock(&self.state).held.retain(|held| {
            held.topic != request.topic
                || match (&request.phx_ref, &request.key) {
                    (Some(phx_ref), _) => &held.phx_ref != phx_ref,
                    (None, Some(key)) => &held.request.key != key,
                    (None, None) => true,
                }
        });
        Ok(reply)
    }

    /// Leaves every entry this session holds, so the next in line is
    /// promoted now rather than when the connection closes.
    pub async fn leave_all(&self) {
        let held: Vec<(String, String)> = lock(&self.state)
            .held
            .iter()
            .map(|h| (h.topic.clone(), h.phx_ref.clone()))
            .collect();
        for (topic, phx_ref) in held {
            let _ = self
                .untrack(UntrackRequest {
                    topic,
                    phx_ref: Some(phx_ref),
                    key: None,
                })
                .await;
        }
    }

    pub async fn update(&self, request: UpdateRequest) -> Result<UpdateReply, ClientError> {
        let reply = self.client().update(request.clone()).await?;
        // The entry keeps its token under its new ref.
        if let Some(held) = lock(&self.state)
            .held
            .iter_mut()
            .find(|held| held.phx_ref == reply.prev_ref)
        {
            held.phx_ref = reply.phx_ref.clone();
            held.request.meta = request.meta;
        }
        Ok(reply)
    }

    /// Subscribes, now and after every reconnect.
    pub async fn subscribe(&self, topic: &str) -> Result<(), ClientError> {
        self.client().subscribe(topic).await?;
        lock(&self.state).subscriptions.insert(topic.to_owned());
        Ok(())
    }

    pub async fn unsubscribe(&self, topic: &str) -> Result<(), ClientError> {
        lock(&self.state).subscriptions.remove(topic);
        self.client().unsubscribe(topic).await
    }
}

/// Passes the daemon's events on, and gets the connection back whenever it
/// closes. Ends when the session is dropped or the daemon is lost.
async fn supervise(
    state: Weak<Mutex<State>>,
    socket: PathBuf,
    reconnect: Reconnect,
    mut events: Events,
    out: mpsc::UnboundedSender<SessionEvent>,
) {
    loop {
        let mut shutdown = None;
        while let Some(event) = events.recv().await {
            match &event {
                // The daemon is going away on purpose; what matters to the
                // session's owner is whether it comes back.
                Event::Shutdown { payload } => {
                    shutdown = Some(payload.reason.clone());
                    continue;
                }
                Event::Role { payload, .. } => {
                    if let Some(state) = state.upgrade() {
                        note_standing(&state, payload);
                    }
                }
                _ => {}
            }
            // The owner may have stopped listening yet still hold entries;
            // keep them alive regardless.
            let _ = out.send(SessionEvent::Event(event));
        }
        if state.strong_count() == 0 {
            return;
        }

        let graceful = shutdown.is_some();
        let reason = shutdown.map_or_else(
            || "the connection to the daemon closed".to_owned(),
            |reason| format!("the daemon shut down ({reason})"),
        );
        tracing::info!("{reason}; reconnecting to {}", socket.display());
        let _ = out.send(SessionEvent::Disconnected {
            reason: reason.clone(),
        });
        let policy = Reconnect {
            autostart: reconnect.autostart && !graceful,
            ..reconnect
        };
        let (client, new_events) = match connect_again(&socket, policy).await {
            Ok(connected) => connected,
            Err(e) => {
                let _ = out.send(SessionEvent::Lost {
                    reason: format!(
                        "{reason}, and it did not come back within {:?}: {e}",
                        reconnect.deadline
                    ),
                });
                return;
            }
        };
        let Some(state) = state.upgrade() else {
            return;
        };
        let client = Arc::new(client);
        events = new_events;
        match restore(&state, &client, &out).await {
            Ok(()) => {
                let _ = out.send(SessionEvent::Reconnected);
            }
            // The new connection failed too; the loop notices it closing
            // and tries again.
            Err(e) => tracing::debug!("resuming after a reconnect failed: {e}"),
        }
    }
}

/// Records a standing the daemon announced for a held entry.
fn note_standing(state: &Mutex<State>, change: &RoleChange) {
    if let Some(held) = lock(state)
        .held
        .iter_mut()
        .find(|held| held.phx_ref == change.phx_ref)
    {
        held.standing = change.standing.clone();
    }
}

/// Waits for the daemon's socket to accept connections again, trying at
/// each change in its folder and otherwise with a growing pause.
async fn connect_again(socket: &Path, policy: Reconnect) -> Result<(Client, Events), ClientError> {
    let deadline = Instant::now() + policy.deadline;
    // Watch before the first attempt, so a socket that appears between a
    // failed attempt and the wait is not missed.
    let folder = crate::paths::parent_dir(socket);
    let mut watch = FolderWatch::start(folder)
        .inspect_err(|e| tracing::debug!("cannot watch {}: {e}", folder.display()))
        .ok();
    let mut pause = FIRST_RETRY_WAIT;
    loop {
        let attempt = if policy.autostart {
            Client::connect_or_start(socket).await
        } else {
            Client::connect(socket).await
        };
        let error = match attempt {
            Ok(connected) => return Ok(connected),
            Err(e) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(error);
        }
        tracing::debug!("reconnect attempt failed: {error}");
        let wake = (now + pause).min(deadline);
        tokio::select! {
            alive = next_change(watch.as_mut()) => {
                if !alive {
                    watch = None;
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
        pause = (pause * 2).min(MAX_RETRY_WAIT);
    }
}

/// Puts a new connection in the old one's place: resumes the held entries
/// (tracking again any the daemon no longer has), then renews the
/// subscriptions, whose fresh `presence_state` goes to the owner.
async fn restore(
    state: &Mutex<State>,
    client: &Arc<Client>,
    out: &mpsc::UnboundedSender<SessionEvent>,
) -> Result<(), ClientError> {
    let (tokens, topics) = {
        let mut state = lock(state);
        state.client = Arc::clone(client);
        state.generation += 1;
        let tokens: Vec<String> = state.held.iter().map(|h| h.token.clone()).collect();
        (tokens, state.subscriptions.clone())
    };
    if !tokens.is_empty() {
        let resumed = client.resume(tokens).await?;
        for (phx_ref, standing) in resumed.roles {
            if let Some(role) = changed_standing(state, &phx_ref, standing) {
                let _ = out.send(SessionEvent::Event(role));
            }
        }
        for token in resumed.expired {
            track_again(state, client, &token, out).await;
        }
        // A fresh connection holds nothing but what it resumes, so this
        // only happens when the session itself holds more than the daemon
        // allows one connection; the entry is left to expire.
        for (token, error) in resumed.refused {
            let mut state = lock(state);
            if let Some(index) = state.held.iter().position(|h| h.token == token) {
                let held = state.held.remove(index);
                let _ = out.send(SessionEvent::Dropped {
                    previous_ref: held.phx_ref,
                    error: error.message,
                });
            }
        }
    }
    for topic in topics {
        client.subscribe(&topic).await?;
    }
    Ok(())
}

/// Records a resumed entry's standing, and returns the `role` event the
/// daemon would have sent had it been connected: only when the owner
/// changed, which is the daemon's own rule for `role` events.
fn changed_standing(state: &Mutex<State>, phx_ref: &str, standing: Standing) -> Option<Event> {
    let mut state = lock(state);
    let held = state.held.iter_mut().find(|held| held.phx_ref == phx_ref)?;
    // An update gives the owner a new ref but not a new place: compare who
    // it is, not its ref.
    let owner = |s: &Standing| {
        s.owner
            .as_ref()
            .map(|o| (o.key.clone(), o.pid, o.joined_at))
    };
    let changed = held.standing.role != standing.role || owner(&held.standing) != owner(&standing);
    held.standing = standing.clone();
    changed.then(|| Event::Role {
        topic: held.topic.clone(),
        payload: RoleChange {
            phx_ref: phx_ref.to_owned(),
            standing,
        },
    })
}

/// Tracks again an entry whose token the daemon no longer knows.
async fn track_again(
    state: &Mutex<State>,
    client: &Client,
    token: &str,
    out: &mpsc::UnboundedSender<SessionEvent>,
) {
    let Some((previous_ref, request)) = lock(state)
        .held
        .iter()
        .find(|held| held.token == token)
        .map(|held| (held.phx_ref.clone(), held.request.clone()))
    else {
        return;
    };
    let tracked = client.track(request).await;
    let mut state = lock(state);
    let Some(index) = state.held.iter().position(|h| h.phx_ref == previous_ref) else {
        return;
    };
    match tracked {
        Ok(reply) => {
            let held = &mut state.held[index];
            held.phx_ref = reply.phx_ref.clone();
            held.token = reply.resume_token.clone();
            held.standing = reply.standing.clone();
            let _ = out.send(SessionEvent::Retracked {
                previous_ref,
                reply,
            });
        }
        Err(e) => {
            state.held.remove(index);
            let _ = out.send(SessionEvent::Dropped {
                previous_ref,
                error: e.to_string(),
            });
        }
    }
}
