//! A session: a client that outlives its connection.
//!
//! A daemon restart (an upgrade, a crash, `systemctl restart`) closes every
//! connection. The daemon keeps each entry's place for a grace period, and
//! a session uses it: it waits for the socket to come back, connects again,
//! resumes every entry it holds by its resume token, and subscribes again.
//! Whoever reads the session's events sees only what really changed: a
//! `role` event when an entry's standing differs from what it last heard,
//! and a fresh `presence_state` for each subscription.
//!
//! An entry that another connection removed (root, or the same user for a
//! `process` entry) is forgotten when its `removed` event arrives, which is
//! passed on: taking it back after the next reconnect would make its
//! holder an owner again behind the back of whoever is owner now.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Client, ClientError, Events, lock};
use crate::folder_watch::{FolderWatch, next_change};
use crate::protocol::{
    ErrorCode, Event, ResumeReply, RoleChange, Standing, TrackReply, TrackRequest, UntrackReply,
    UntrackRequest, UpdateReply, UpdateRequest,
};

/// How a session gets its connection back.
#[derive(Debug, Clone, Copy)]
pub struct Reconnect {
    /// How long one outage may last, reconnecting and resuming included,
    /// before the session gives up.
    pub deadline: Duration,
    /// Start a daemon (this program, as `presence daemon`) when the old one
    /// crashed. Never done after the daemon announced a `shutdown`: someone
    /// stopped it on purpose, and whoever restarts it (systemd, a person)
    /// must not find its place taken.
    pub autostart: bool,
}

impl Default for Reconnect {
    /// Wait 30 s; start nothing, since only the `presence` binary itself
    /// can start a daemon this way.
    fn default() -> Self {
        Reconnect {
            deadline: Duration::from_secs(30),
            autostart: false,
        }
    }
}

/// The pause after the first failed attempt; it doubles up to
/// [`MAX_RETRY_PAUSE`]. A change to the socket's name cuts a pause short,
/// but never below [`MIN_RETRY_GAP`] after the last attempt began.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(50);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);
const MIN_RETRY_GAP: Duration = Duration::from_millis(25);

/// What a session's owner hears.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// An event from the daemon, or a `role` event the session derived
    /// when a resumed entry's standing had changed while it was away. After
    /// a `removed` event the session no longer holds that entry, and will
    /// neither resume it nor track it again.
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
    /// The daemon refused to give an entry back or to track it again.
    Dropped { previous_ref: String, error: String },
    /// The daemon refused to renew a subscription.
    Unsubscribed { topic: String, error: String },
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

#[derive(Default)]
struct State {
    held: Vec<Held>,
    subscriptions: BTreeSet<String>,
    /// Counts connections. A track answered on an old connection after the
    /// new one resumed everything must resume its entry itself.
    generation: u64,
}

impl State {
    fn held_by_ref(&mut self, phx_ref: &str) -> Option<&mut Held> {
        self.held.iter_mut().find(|held| held.phx_ref == phx_ref)
    }

    /// Forgets an entry the daemon says is gone.
    fn forget(&mut self, phx_ref: &str) {
        self.held.retain(|held| held.phx_ref != phx_ref);
    }

    fn take_by_token(&mut self, token: &str) -> Option<Held> {
        let index = self.held.iter().position(|held| held.token == token)?;
        Some(self.held.remove(index))
    }
}

/// The connection calls go through, as the supervisor sees it.
#[derive(Clone)]
enum Link {
    Up {
        client: Arc<Client>,
        generation: u64,
    },
    /// Reconnecting; calls wait.
    Down,
    Lost(String),
}

type Shared = Arc<Mutex<State>>;

/// A connection to the daemon that reconnects and resumes by itself.
/// Dropping it closes the connection and stops reconnecting.
pub struct Session {
    state: Shared,
    link: watch::Receiver<Link>,
    /// The session's events, for what a call learns on its behalf (a
    /// track that crossed a reconnect).
    out: mpsc::UnboundedSender<SessionEvent>,
    supervisor: tokio::task::AbortHandle,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.supervisor.abort();
    }
}

impl Session {
    /// Wraps a fresh connection. The session takes its events; read them
    /// from the returned stream instead.
    pub fn new(
        socket: &Path,
        (client, events): (Client, Events),
        reconnect: Reconnect,
    ) -> (Session, SessionEvents) {
        let state = Shared::default();
        let (links, link) = watch::channel(Link::Up {
            client: Arc::new(client),
            generation: 0,
        });
        let (out, session_events) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            state: Arc::clone(&state),
            socket: socket.to_owned(),
            reconnect,
            links,
            out: out.clone(),
        };
        let supervisor = tokio::spawn(supervisor.run(events)).abort_handle();
        (
            Session {
                state,
                link,
                out,
                supervisor,
            },
            session_events,
        )
    }

    /// The current connection, waiting through a reconnect if one is under
    /// way. Use it for calls that hold no state (`list`, `status`, …);
    /// an entry tracked through it directly would not be resumed.
    pub async fn client(&self) -> Result<Arc<Client>, ClientError> {
        self.connection().await.map(|(client, _)| client)
    }

    async fn connection(&self) -> Result<(Arc<Client>, u64), ClientError> {
        let mut link = self.link.clone();
        loop {
            match &*link.borrow_and_update() {
                Link::Up { client, generation } => return Ok((Arc::clone(client), *generation)),
                Link::Lost(reason) => return Err(ClientError::Lost(reason.clone())),
                Link::Down => {}
            }
            if link.changed().await.is_err() {
                return Err(ClientError::Closed);
            }
        }
    }

    pub async fn track(&self, request: TrackRequest) -> Result<TrackReply, ClientError> {
        let (client, generation) = self.connection().await?;
        let reply = client.track(request.clone()).await?;
        let crossed_reconnect = {
            let mut state = lock(&self.state);
            state.held.push(Held {
                topic: request.topic.clone(),
                phx_ref: reply.phx_ref.clone(),
                token: reply.resume_token.clone(),
                standing: reply.standing.clone(),
                request,
            });
            state.generation != generation
        };
        if crossed_reconnect {
            // The reply arrived after the new connection resumed everything
            // it knew of, so this entry must be resumed on its own. Any
            // consequence (it expired and was tracked again) is reported
            // as events, as it would have been during the reconnect.
            let (client, _) = self.connection().await?;
            let resumed = client.resume(vec![reply.resume_token.clone()]).await?;
            apply_resume(&self.state, &client, resumed, &self.out).await?;
        }
        Ok(reply)
    }

    pub async fn untrack(&self, request: UntrackRequest) -> Result<UntrackReply, ClientError> {
        // Forget the entries first: a reconnect in the middle must not
        // resume (or track again) what is being left.
        let leaving: Vec<Held> = {
            let mut state = lock(&self.state);
            let (leaving, staying) = std::mem::take(&mut state.held)
                .into_iter()
                .partition(|held| is_named_by(held, &request));
            state.held = staying;
            leaving
        };
        let result = match self.client().await {
            Ok(client) => client.untrack(request).await,
            Err(e) => Err(e),
        };
        if let Err(ClientError::Refused(_)) = &result {
            // The daemon kept them (someone else's, say): so do we.
            lock(&self.state).held.extend(leaving);
        }
        result
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
        let reply = self.client().await?.update(request.clone()).await?;
        // The entry keeps its token under its new ref.
        if let Some(held) = lock(&self.state).held_by_ref(&reply.prev_ref) {
            held.phx_ref = reply.phx_ref.clone();
            held.request.meta = request.meta;
        }
        Ok(reply)
    }

    /// Subscribes, now and after every reconnect.
    pub async fn subscribe(&self, topic: &str) -> Result<(), ClientError> {
        // Noted first, so a reconnect in the middle renews it.
        let added = lock(&self.state).subscriptions.insert(topic.to_owned());
        let result = match self.client().await {
            Ok(client) => client.subscribe(topic).await,
            Err(e) => Err(e),
        };
        if added && let Err(ClientError::Refused(_)) = &result {
            lock(&self.state).subscriptions.remove(topic);
        }
        result
    }

    pub async fn unsubscribe(&self, topic: &str) -> Result<(), ClientError> {
        lock(&self.state).subscriptions.remove(topic);
        self.client().await?.unsubscribe(topic).await
    }
}

/// Whether an untrack request names a held entry.
fn is_named_by(held: &Held, request: &UntrackRequest) -> bool {
    held.topic == request.topic
        && match (&request.phx_ref, &request.key) {
            (Some(phx_ref), _) => &held.phx_ref == phx_ref,
            (None, Some(key)) => &held.request.key == key,
            (None, None) => false,
        }
}

/// The task that passes the daemon's events on and gets the connection
/// back whenever it closes. Aborted when the session is dropped.
struct Supervisor {
    state: Shared,
    socket: PathBuf,
    reconnect: Reconnect,
    links: watch::Sender<Link>,
    out: mpsc::UnboundedSender<SessionEvent>,
}

/// Why the connection went, as the first close of an outage said.
struct Outage {
    reason: String,
    /// The daemon announced `shutdown`: it was stopped on purpose.
    deliberate: bool,
    deadline: Instant,
}

impl Supervisor {
    async fn run(self, mut events: Events) {
        loop {
            let shutdown = self.forward_until_closed(&mut events).await;
            let _ = self.links.send_replace(Link::Down);
            let outage = Outage {
                deliberate: shutdown.is_some(),
                reason: shutdown.map_or_else(
                    || "the connection to the daemon closed".to_owned(),
                    |reason| format!("the daemon shut down ({reason})"),
                ),
                deadline: Instant::now() + self.reconnect.deadline,
            };
            tracing::info!(
                "{}; reconnecting to {}",
                outage.reason,
                self.socket.display()
            );
            self.emit(SessionEvent::Disconnected {
                reason: outage.reason.clone(),
            });
            match self.recover(&outage).await {
                Ok((client, new_events, generation)) => {
                    events = new_events;
                    let _ = self.links.send_replace(Link::Up { client, generation });
                    self.emit(SessionEvent::Reconnected);
                }
                Err(reason) => {
                    let _ = self.links.send_replace(Link::Lost(reason.clone()));
                    self.emit(SessionEvent::Lost { reason });
                    return;
                }
            }
        }
    }

    /// The owner may have stopped listening yet still hold entries; they
    /// are kept alive regardless.
    fn emit(&self, event: SessionEvent) {
        let _ = self.out.send(event);
    }

    /// Passes events on until the connection closes; returns the reason of
    /// a `shutdown` event if the daemon sent one.
    async fn forward_until_closed(&self, events: &mut Events) -> Option<String> {
        let mut shutdown = None;
        while let Some(event) = events.recv().await {
            match &event {
                // What matters to the owner is whether the daemon comes
                // back, not that it went.
                Event::Shutdown { payload } => {
                    shutdown = Some(payload.reason.clone());
                    continue;
                }
                Event::Role { payload, .. } => note_standing(&self.state, payload),
                Event::Removed { payload, .. } => lock(&self.state).forget(&payload.phx_ref),
                _ => {}
            }
            self.emit(SessionEvent::Event(event));
        }
        shutdown
    }

    /// Connects and restores, again and again, until both succeed or the
    /// outage's deadline passes. Each pause grows; a change to the
    /// socket's name in its folder cuts it short.
    async fn recover(&self, outage: &Outage) -> Result<(Arc<Client>, Events, u64), String> {
        let mut watch = FolderWatch::for_file(&self.socket)
            .inspect_err(|e| tracing::debug!("cannot watch for the socket: {e}"))
            .ok();
        let autostart = self.reconnect.autostart && !outage.deliberate;
        let mut pause = FIRST_RETRY_PAUSE;
        loop {
            let started = Instant::now();
            let attempt = tokio::time::timeout_at(outage.deadline, self.attempt(autostart)).await;
            let error = match attempt {
                Ok(Ok(connected)) => return Ok(connected),
                Ok(Err(e)) => e,
                Err(_) => ClientError::Lost("the daemon was still not answering".into()),
            };
            if Instant::now() >= outage.deadline {
                return Err(format!(
                    "{}, and it did not come back within {:?}: {error}",
                    outage.reason, self.reconnect.deadline
                ));
            }
            tracing::debug!("reconnecting failed: {error}");
            let earliest = (started + MIN_RETRY_GAP).min(outage.deadline);
            let latest = (started + pause).min(outage.deadline);
            tokio::select! {
                alive = next_change(watch.as_mut()) => {
                    if !alive {
                        watch = None;
                    }
                    tokio::time::sleep_until(earliest).await;
                }
                () = tokio::time::sleep_until(latest) => {}
            }
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// One try: connect, then put everything back on the new connection.
    async fn attempt(&self, autostart: bool) -> Result<(Arc<Client>, Events, u64), ClientError> {
        let (client, events) = if autostart {
            Client::connect_or_start(&self.socket).await?
        } else {
            Client::connect(&self.socket).await?
        };
        let client = Arc::new(client);
        let generation = self.restore(&client).await?;
        Ok((client, events, generation))
    }

    /// Resumes the held entries (tracking again any the daemon no longer
    /// has), then renews the subscriptions, whose fresh `presence_state`
    /// goes to the owner. Returns the new connection's generation.
    async fn restore(&self, client: &Arc<Client>) -> Result<u64, ClientError> {
        let (tokens, topics, generation) = {
            let mut state = lock(&self.state);
            state.generation += 1;
            let tokens: Vec<String> = state.held.iter().map(|h| h.token.clone()).collect();
            (tokens, state.subscriptions.clone(), state.generation)
        };
        if !tokens.is_empty() {
            let resumed = client.resume(tokens).await?;
            apply_resume(&self.state, client, resumed, &self.out).await?;
        }
        for topic in topics {
            match client.subscribe(&topic).await {
                Ok(()) => {}
                Err(ClientError::Refused(error)) => {
                    lock(&self.state).subscriptions.remove(&topic);
                    self.emit(SessionEvent::Unsubscribed {
                        topic,
                        error: error.message,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(generation)
    }
}

/// Records a standing the daemon announced for a held entry.
fn note_standing(state: &Mutex<State>, change: &RoleChange) {
    if let Some(held) = lock(state).held_by_ref(&change.phx_ref) {
        held.standing = change.standing.clone();
    }
}

/// Takes in a `resume` reply: a changed standing becomes a `role` event,
/// an expired entry is tracked again, a refused one is given up.
async fn apply_resume(
    state: &Mutex<State>,
    client: &Client,
    resumed: ResumeReply,
    out: &mpsc::UnboundedSender<SessionEvent>,
) -> Result<(), ClientError> {
    for (phx_ref, standing) in resumed.roles {
        if let Some(role) = record_resumed_standing(state, &phx_ref, standing) {
            let _ = out.send(SessionEvent::Event(role));
        }
    }
    for token in resumed.expired {
        track_again(state, client, &token, out).await?;
    }
    // A fresh connection holds nothing but what it resumes, so this only
    // happens when the session holds more than the daemon allows one
    // connection; the entry is left to expire.
    for (token, error) in resumed.refused {
        if let Some(held) = lock(state).take_by_token(&token) {
            let _ = out.send(SessionEvent::Dropped {
                previous_ref: held.phx_ref,
                error: error.message,
            });
        }
    }
    Ok(())
}

/// Records a resumed entry's standing, and returns the `role` event the
/// daemon would have sent had it been connected: only when the role or the
/// owner changed, which is the daemon's own rule for `role` events.
fn record_resumed_standing(
    state: &Mutex<State>,
    phx_ref: &str,
    standing: Standing,
) -> Option<Event> {
    let mut state = lock(state);
    let held = state.held_by_ref(phx_ref)?;
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

/// Tracks again an entry whose token the daemon no longer knows. Only a
/// refusal gives the entry up; a failed connection is for the next
/// attempt to retry.
async fn track_again(
    state: &Mutex<State>,
    client: &Client,
    token: &str,
    out: &mpsc::UnboundedSender<SessionEvent>,
) -> Result<(), ClientError> {
    let Some((previous_ref, request)) = lock(state)
        .held
        .iter()
        .find(|held| held.token == token)
        .map(|held| (held.phx_ref.clone(), held.request.clone()))
    else {
        return Ok(());
    };
    let tracked = client.track(request).await;
    let mut state = lock(state);
    match tracked {
        Ok(reply) => {
            if let Some(held) = state.held_by_ref(&previous_ref) {
                held.phx_ref = reply.phx_ref.clone();
                held.token = reply.resume_token.clone();
                held.standing = reply.standing.clone();
            }
            let _ = out.send(SessionEvent::Retracked {
                previous_ref,
                reply,
            });
            Ok(())
        }
        // A daemon that cannot save right now may well later.
        Err(ClientError::Refused(error)) if error.code != ErrorCode::Internal => {
            state.take_by_token(token);
            let _ = out.send(SessionEvent::Dropped {
                previous_ref,
                error: error.message,
            });
            Ok(())
        }
        Err(e) => Err(e),
    }
}
