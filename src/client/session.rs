//! A session: a client that outlives its connection.
//!
//! A daemon restart (an upgrade, a crash, `systemctl restart`) closes every
//! connection. The daemon keeps each entry's place for a grace period, and
//! a session uses it: it waits for the socket to come back, connects again,
//! resumes every entry it holds by its resume token, and subscribes again.
//! Whoever reads the session's events sees only what really changed: a
//! `role` event for each entry whose standing changed while the session
//! was away, and a fresh `presence_state` for each subscription. The
//! daemon follows its `resume` reply with such `role` events, but only for
//! what it knows it told, and a crash, a restart while the entry was
//! unheld, or a reconnect that failed after its `resume` can lose one. So
//! the session compares the standing the reply gives each entry with the
//! one it held ([`Standing::same_place`]), reports each that differs, and
//! passes on none of the daemon's `role` events that repeat a standing it
//! holds already. It works no standing out itself: it keeps the one the
//! daemon last gave for each entry (a reply, a `role` event).
//!
//! An entry that another connection removed (root, or the same user for a
//! `process` entry) is forgotten when its `removed` event arrives, which is
//! passed on: taking it back after the next reconnect would make its
//! holder an owner again behind the back of whoever is owner now. One
//! removed while the session was away is in the `removed` part of the
//! `resume` reply, and is forgotten and passed on the same way. An entry
//! another connection updated is known by its new ref and meta from its
//! `updated` event on, so that a later `removed` event, a `role` event and
//! a track after a restart all find it; one updated while no connection
//! held it, from the `refs` of the `resume` reply and a `get_by_key`.
//!
//! Which entry an event is about is decided by its ref, never by topic
//! and key. A session may hold several entries, and may track an entry
//! for the same topic and key again (after a reconnect, or through its
//! owner) while a `removed` event for the old one is still on its way: a
//! match on topic and key could then forget the new entry for the old.
//! The ref is exact because every change of ref reaches the session: an
//! `updated` event for another connection's update of a held entry, and
//! the `refs` of the `resume` reply for an update made while no
//! connection held it. (`presence join` matches on topic and key instead,
//! and may: see `Printer::holds` in `cli/join.rs`.)
//!
//! The replies to the session's own calls and the daemon's events reach
//! it by two roads, so one may overtake the other: a `removed` event can
//! arrive before the reply of the track that made the entry, an `updated`
//! event after the reply of a later update of the session's own. Each
//! change of ref is therefore kept until the entry it names is held (see
//! [`State::settle`]), and applied in the order the refs follow each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Client, ClientError, DaemonCommand, Events, lock};
use crate::folder_watch::{FolderWatch, next_change};
use crate::protocol::{
    ErrorCode, Event, Removal, ResumeReply, Revision, RoleChange, Standing, TrackReply,
    TrackRequest, UntrackReply, UntrackRequest, UpdateReply, UpdateRequest,
};

/// How a session gets its connection back.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// How long one outage may last, reconnecting and resuming included,
    /// before the session gives up.
    pub deadline: Duration,
    /// The daemon to start when the old one crashed, if any. Never started
    /// after the daemon announced a `shutdown`: someone stopped it on
    /// purpose, and whoever restarts it (systemd, a person) must not find
    /// its place taken.
    pub autostart: Option<DaemonCommand>,
}

impl Default for Reconnect {
    /// Wait 30 s; start nothing.
    fn default() -> Self {
        Reconnect {
            deadline: Duration::from_secs(30),
            autostart: None,
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
    /// An event from the daemon, as it sent it. A `role` event comes for
    /// every change of a held entry's standing (role, owner or position),
    /// and, after a reconnect, for each resumed entry whose standing
    /// changed while the session was away (after
    /// [`SessionEvent::Reconnected`]; the session makes that one from the
    /// `resume` reply, and passes on no `role` event that repeats the
    /// standing it holds). After a `removed` event the session
    /// no longer holds that entry, and will neither resume it nor track it
    /// again; after an `updated` event it knows the entry by its new ref
    /// and meta.
    Event(Event),
    /// The connection closed; the session is getting it back.
    Disconnected { reason: String },
    /// Connected again, with every entry resumed and every subscription
    /// renewed. A `role` event for each standing that changed while the
    /// session was away, and the renewed subscriptions' states, follow
    /// it.
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
    /// The subscription to every topic was renewed on a new connection
    /// (it comes before [`SessionEvent::Reconnected`]). A `presence_state`
    /// follows for each of `occupied`; every other topic is empty, those
    /// that emptied while the connection was down included.
    ResubscribedToAll { occupied: Vec<String> },
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

/// A new ref for an entry: its update, by the session or by another
/// connection.
struct Rename {
    prev_ref: String,
    phx_ref: String,
    meta: serde_json::Map<String, serde_json::Value>,
}

/// How many changes of ref, and refs removed, the session keeps for
/// entries it does not hold (yet). Only a reply overtaken by an event
/// leaves one waiting, and only for as long as the reply takes; the bound
/// is for entries tracked around the session, through [`Session::client`].
const MAX_WAITING_NOTICES: usize = 64;

#[derive(Default)]
struct State {
    held: Vec<Held>,
    subscriptions: BTreeSet<String>,
    /// Subscribed to every topic ([`Session::subscribe_all`]).
    subscribed_to_all: bool,
    /// Counts connections. A track answered on an old connection after the
    /// new one resumed everything must resume its entry itself.
    generation: u64,
    /// Changes of ref not yet applied: the entry they name is not held
    /// under that ref yet.
    renames: Vec<Rename>,
    /// Refs the daemon removed that no held entry had yet.
    gone: Vec<String>,
}

impl State {
    fn held_by_ref(&mut self, phx_ref: &str) -> Option<&mut Held> {
        self.held.iter_mut().find(|held| held.phx_ref == phx_ref)
    }

    /// Forgets an entry another connection removed: the held entry with
    /// the event's ref (see the module's notes on which entry an event
    /// is about). When no held entry has it, the entry is not held yet
    /// (its track's reply is on its way) and is forgotten when it is.
    fn forget(&mut self, removal: &Removal) {
        push_bounded(&mut self.gone, removal.phx_ref.clone());
        self.settle();
    }

    /// Notes an entry's new ref and meta, and applies it as soon as the
    /// entry is held under its previous ref.
    fn rename(&mut self, rename: Rename) {
        push_bounded(&mut self.renames, rename);
        self.settle();
    }

    /// Applies every change of ref that names a held entry, in the order
    /// the refs follow each other, then forgets held entries that were
    /// removed.
    fn settle(&mut self) {
        while let Some(index) = self
            .renames
            .iter()
            .position(|r| self.held.iter().any(|h| h.phx_ref == r.prev_ref))
        {
            let rename = self.renames.remove(index);
            if let Some(held) = self.held_by_ref(&rename.prev_ref) {
                held.phx_ref = rename.phx_ref;
                held.request.meta = rename.meta;
            }
        }
        let gone = std::mem::take(&mut self.gone);
        let (removed, waiting): (Vec<String>, Vec<String>) = gone
            .into_iter()
            .partition(|phx_ref| self.held.iter().any(|h| &h.phx_ref == phx_ref));
        self.held.retain(|h| !removed.contains(&h.phx_ref));
        self.gone = waiting;
    }

    /// Takes in the refs a `resume` reply gives each resumed token. An
    /// entry another connection updated while no connection held it has a
    /// new ref that no `updated` event announced; without this the session
    /// would know neither its standing in the same reply nor a later
    /// `removed` event for it, and would track it again once its token
    /// expired. Returns the entries whose ref changed, as (topic, key,
    /// ref): their meta changed too, and the reply does not carry it.
    fn take_resumed_refs(
        &mut self,
        refs: &BTreeMap<String, String>,
    ) -> Vec<(String, String, String)> {
        let mut changed = Vec::new();
        for held in &mut self.held {
            let Some(phx_ref) = refs.get(&held.token) else {
                continue;
            };
            if *phx_ref != held.phx_ref {
                phx_ref.clone_into(&mut held.phx_ref);
                let request = &held.request;
                changed.push((request.topic.clone(), request.key.clone(), phx_ref.clone()));
            }
        }
        self.settle();
        changed
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

    /// The standing the daemon last gave the entry with this ref, if the
    /// session holds it: from its track's reply, the latest `role` event,
    /// or a `resume` reply. The daemon works standings out; a client shows
    /// this one.
    pub fn standing(&self, phx_ref: &str) -> Option<Standing> {
        lock(&self.state)
            .held
            .iter()
            .find(|held| held.phx_ref == phx_ref)
            .map(|held| held.standing.clone())
    }

    pub async fn track(&self, request: TrackRequest) -> Result<TrackReply, ClientError> {
        let (client, generation) = self.connection().await?;
        let reply = client.track(request.clone()).await?;
        let (crossed_reconnect, still_held) = {
            let mut state = lock(&self.state);
            state.held.push(Held {
                topic: request.topic.clone(),
                phx_ref: reply.phx_ref.clone(),
                token: reply.resume_token.clone(),
                standing: reply.standing.clone(),
                request,
            });
            // An event about the entry may have come ahead of this reply.
            state.settle();
            let still_held = state.held.iter().any(|h| h.token == reply.resume_token);
            (state.generation != generation, still_held)
        };
        if crossed_reconnect && still_held {
            // The reply arrived after the new connection resumed everything
            // it knew of, so this entry must be resumed on its own. Any
            // consequence (it expired and was tracked again) is reported
            // as events, as it would have been during the reconnect.
            let (client, _) = self.connection().await?;
            let resumed = client.resume(vec![reply.resume_token.clone()]).await?;
            let standings = apply_resume(&self.state, &client, resumed, &self.out).await?;
            for role in take_resumed_standings(&self.state, standings) {
                let _ = self.out.send(SessionEvent::Event(role));
            }
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
        lock(&self.state).rename(Rename {
            prev_ref: reply.prev_ref.clone(),
            phx_ref: reply.phx_ref.clone(),
            meta: request.meta,
        });
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

    /// Subscribes to every topic, now and after every reconnect.
    pub async fn subscribe_all(&self) -> Result<(), ClientError> {
        // Noted first, so a reconnect in the middle renews it.
        let added = !std::mem::replace(&mut lock(&self.state).subscribed_to_all, true);
        let result = match self.client().await {
            Ok(client) => client.subscribe_all().await.map(drop),
            Err(e) => Err(e),
        };
        if added && let Err(ClientError::Refused(_)) = &result {
            lock(&self.state).subscribed_to_all = false;
        }
        result
    }

    pub async fn unsubscribe(&self, topic: &str) -> Result<(), ClientError> {
        lock(&self.state).subscriptions.remove(topic);
        self.client().await?.unsubscribe(topic).await
    }

    /// Stops following every topic; topics subscribed by name stay.
    pub async fn unsubscribe_all(&self) -> Result<(), ClientError> {
        lock(&self.state).subscribed_to_all = false;
        self.client().await?.unsubscribe_all().await
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
                Ok(restored) => {
                    events = restored.events;
                    let moved = take_resumed_standings(&self.state, restored.standings);
                    let _ = self.links.send_replace(Link::Up {
                        client: restored.client,
                        generation: restored.generation,
                    });
                    self.emit(SessionEvent::Reconnected);
                    for role in moved {
                        self.emit(SessionEvent::Event(role));
                    }
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
                // One that repeats the standing held is the daemon's
                // after a `resume`, already reported from its reply.
                Event::Role { payload, .. } if !note_standing(&self.state, payload) => continue,
                Event::Role { .. } => {}
                Event::Removed { payload, .. } => lock(&self.state).forget(payload),
                Event::Updated { payload, .. } => lock(&self.state).rename(renamed(payload)),
                _ => {}
            }
            self.emit(SessionEvent::Event(event));
        }
        shutdown
    }

    /// Connects and restores, again and again, until both succeed or the
    /// outage's deadline passes. Each pause grows; a change to the
    /// socket's name in its folder cuts it short.
    async fn recover(&self, outage: &Outage) -> Result<Restored, String> {
        let mut watch = FolderWatch::for_file(&self.socket)
            .inspect_err(|e| tracing::debug!("cannot watch for the socket: {e}"))
            .ok();
        let autostart = self
            .reconnect
            .autostart
            .as_ref()
            .filter(|_| !outage.deliberate);
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
    async fn attempt(&self, autostart: Option<&DaemonCommand>) -> Result<Restored, ClientError> {
        let (client, events) = match autostart {
            Some(daemon) => Client::connect_or_start(&self.socket, daemon).await?,
            None => Client::connect(&self.socket).await?,
        };
        let client = Arc::new(client);
        let (generation, standings) = self.restore(&client).await?;
        Ok(Restored {
            client,
            events,
            generation,
            standings,
        })
    }

    /// Resumes the held entries (tracking again any the daemon no longer
    /// has), then renews the subscriptions, whose fresh `presence_state`
    /// goes to the owner. Returns the new connection's generation and the
    /// standings the `resume` reply gave, by ref.
    async fn restore(
        &self,
        client: &Arc<Client>,
    ) -> Result<(u64, BTreeMap<String, Standing>), ClientError> {
        let (tokens, topics, all, generation) = {
            let mut state = lock(&self.state);
            state.generation += 1;
            let tokens: Vec<String> = state.held.iter().map(|h| h.token.clone()).collect();
            (
                tokens,
                state.subscriptions.clone(),
                state.subscribed_to_all,
                state.generation,
            )
        };
        let mut standings = BTreeMap::new();
        if !tokens.is_empty() {
            let resumed = client.resume(tokens).await?;
            standings = apply_resume(&self.state, client, resumed, &self.out).await?;
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
        if all {
            match client.subscribe_all().await {
                Ok(occupied) => self.emit(SessionEvent::ResubscribedToAll { occupied }),
                Err(ClientError::Refused(error)) => {
                    lock(&self.state).subscribed_to_all = false;
                    self.emit(SessionEvent::Unsubscribed {
                        topic: String::new(),
                        error: error.message,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok((generation, standings))
    }
}

/// A connection got back, with everything put back on it.
struct Restored {
    client: Arc<Client>,
    events: Events,
    generation: u64,
    /// The standing of each resumed entry, by ref, as the `resume` reply
    /// gave it; not yet compared with the one the session held.
    standings: BTreeMap<String, Standing>,
}

/// The change of ref an `updated` event announces.
fn renamed(revision: &Revision) -> Rename {
    Rename {
        prev_ref: revision.prev_ref.clone(),
        phx_ref: revision.phx_ref.clone(),
        meta: revision.meta.clone(),
    }
}

/// Adds to a list that keeps only the newest [`MAX_WAITING_NOTICES`].
fn push_bounded<T>(list: &mut Vec<T>, item: T) {
    if list.len() >= MAX_WAITING_NOTICES {
        list.remove(0);
    }
    list.push(item);
}

/// Records a standing the daemon announced for a held entry. Returns
/// whether it is news: the daemon's `role` events after a `resume` repeat
/// what the session already took from the reply (see
/// [`take_resumed_standings`]), and are not passed on twice. An event for
/// an entry not held (yet) is passed on.
fn note_standing(state: &Mutex<State>, change: &RoleChange) -> bool {
    let mut state = lock(state);
    let Some(held) = state.held_by_ref(&change.phx_ref) else {
        return true;
    };
    let news = !held.standing.same_place(&change.standing);
    held.standing = change.standing.clone();
    news
}

/// Takes in the standings of a `resume` reply, by ref, and returns a
/// `role` event for each held entry whose standing is not the one the
/// session held. The daemon sends such events itself after the reply,
/// but only for what it knows it told: a daemon killed before a queued
/// `role` event was written, a daemon restarted while the entry was
/// unheld, or a reconnect that failed after its `resume` all lose one for
/// good. Only this comparison cannot miss a change.
fn take_resumed_standings(
    state: &Mutex<State>,
    standings: BTreeMap<String, Standing>,
) -> Vec<Event> {
    let mut state = lock(state);
    let mut moved = Vec::new();
    for (phx_ref, standing) in standings {
        let Some(held) = state.held_by_ref(&phx_ref) else {
            continue;
        };
        if !held.standing.same_place(&standing) {
            moved.push(Event::Role {
                topic: held.topic.clone(),
                payload: RoleChange {
                    phx_ref,
                    standing: standing.clone(),
                },
            });
        }
        held.standing = standing;
    }
    moved
}

/// Takes in a `resume` reply: each entry is known by the ref it has now,
/// an expired entry is tracked again, a refused one is given up, and one
/// another connection removed meanwhile is forgotten and reported as the
/// `removed` event the session would have had, had it been connected.
/// Returns the standings of the resumed entries, by ref, for
/// [`take_resumed_standings`] once the connection is restored: taken in
/// before, a failure later in this attempt would leave the session
/// believing a standing it never reported.
async fn apply_resume(
    state: &Mutex<State>,
    client: &Client,
    resumed: ResumeReply,
    out: &mpsc::UnboundedSender<SessionEvent>,
) -> Result<BTreeMap<String, Standing>, ClientError> {
    let updated = lock(state).take_resumed_refs(&resumed.refs);
    for (topic, key, phx_ref) in updated {
        learn_meta(state, client, &topic, &key, &phx_ref).await?;
    }
    for (token, removed) in resumed.removed {
        if lock(state).take_by_token(&token).is_some() {
            let _ = out.send(SessionEvent::Event(Event::Removed {
                topic: removed.topic,
                payload: removed.removal,
            }));
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
    Ok(resumed.roles)
}

/// Fetches the meta of an entry updated while the session was away, as an
/// `updated` event would have given it, so that tracking it again after
/// it expires does not undo that update.
async fn learn_meta(
    state: &Mutex<State>,
    client: &Client,
    topic: &str,
    key: &str,
    phx_ref: &str,
) -> Result<(), ClientError> {
    let metas = match client.get_by_key(topic, key).await {
        Ok(metas) => metas,
        // Only a lost connection is worth another attempt.
        Err(ClientError::Refused(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let Some(meta) = metas.into_iter().find(|meta| meta.phx_ref == phx_ref) else {
        // Gone again already; its `removed` event or the next resume says.
        return Ok(());
    };
    if let Some(held) = lock(state).held_by_ref(phx_ref) {
        held.request.meta = meta.client;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Actor, LeaveReason, Role};

    fn held(phx_ref: &str, key: &str) -> Held {
        Held {
            topic: "doc".to_owned(),
            phx_ref: phx_ref.to_owned(),
            token: format!("token-of-{key}"),
            standing: Standing {
                role: Role::Owner,
                readonly: false,
                position: 0,
                owner: None,
                suspended: false,
            },
            request: TrackRequest::new("doc", key),
        }
    }

    fn removal(phx_ref: &str, key: &str) -> Removal {
        Removal {
            phx_ref: phx_ref.to_owned(),
            key: key.to_owned(),
            reason: LeaveReason::Untrack,
            by: Actor {
                uid: 0,
                user: "root".to_owned(),
                pid: 1,
            },
        }
    }

    fn rename(prev_ref: &str, phx_ref: &str, file: &str) -> Rename {
        let mut meta = serde_json::Map::new();
        meta.insert("file".to_owned(), file.into());
        Rename {
            prev_ref: prev_ref.to_owned(),
            phx_ref: phx_ref.to_owned(),
            meta,
        }
    }

    fn refs(state: &State) -> Vec<&str> {
        state.held.iter().map(|h| h.phx_ref.as_str()).collect()
    }

    #[test]
    fn an_entry_updated_elsewhere_is_known_by_its_new_ref_and_forgotten_by_it() {
        let mut state = State::default();
        state.held.extend([held("p1", "a"), held("p2", "b")]);
        state.rename(rename("p1", "p3", "b.md"));
        assert_eq!(refs(&state), ["p3", "p2"]);
        assert_eq!(state.held[0].request.meta["file"], "b.md");
        assert_eq!(state.held[0].token, "token-of-a", "the token stays");
        state.forget(&removal("p3", "a"));
        assert_eq!(refs(&state), ["p2"]);
        assert!(state.renames.is_empty() && state.gone.is_empty());
    }

    #[test]
    fn an_event_that_overtakes_a_reply_waits_for_the_entry_it_names() {
        // The entry was removed before the reply of its track was taken in.
        let mut state = State::default();
        state.forget(&removal("p1", "a"));
        state.held.push(held("p1", "a"));
        state.settle();
        assert!(refs(&state).is_empty());

        // Another connection's update (p2 to p3) came after the session's
        // own (p1 to p2), but its event overtook the reply.
        let mut state = State::default();
        state.held.push(held("p1", "a"));
        state.rename(rename("p2", "p3", "theirs"));
        assert_eq!(refs(&state), ["p1"]);
        state.rename(rename("p1", "p2", "ours"));
        assert_eq!(refs(&state), ["p3"]);
        assert_eq!(state.held[0].request.meta["file"], "theirs");

        // A removal of a newer ref than the session knows waits for it.
        let mut state = State::default();
        state.held.push(held("p1", "a"));
        state.forget(&removal("p2", "a"));
        assert_eq!(refs(&state), ["p1"]);
        state.rename(rename("p1", "p2", "ours"));
        assert!(refs(&state).is_empty());
    }

    #[test]
    fn notices_about_entries_never_held_are_bounded() {
        let mut state = State::default();
        for n in 0..3 * MAX_WAITING_NOTICES {
            state.forget(&removal(&format!("p{n}"), "a"));
            state.rename(rename(&format!("q{n}"), &format!("r{n}"), "x"));
        }
        assert_eq!(state.gone.len(), MAX_WAITING_NOTICES);
        assert_eq!(state.renames.len(), MAX_WAITING_NOTICES);
    }

    #[test]
    fn a_changed_standing_in_a_resume_reply_is_reported_once_with_the_daemon_s_event() {
        let state = Mutex::new(State::default());
        let mut waiting = held("p2", "bob");
        waiting.standing = Standing {
            role: Role::Spectator,
            readonly: true,
            position: 1,
            owner: None,
            suspended: false,
        };
        lock(&state).held.push(waiting);
        let promoted = Standing {
            role: Role::Owner,
            readonly: false,
            position: 0,
            owner: None,
            suspended: false,
        };
        let standings = BTreeMap::from([("p2".to_owned(), promoted.clone())]);

        let reported = take_resumed_standings(&state, standings.clone());
        let expected = Event::Role {
            topic: "doc".to_owned(),
            payload: RoleChange {
                phx_ref: "p2".to_owned(),
                standing: promoted.clone(),
            },
        };
        assert_eq!(reported, [expected]);
        // The daemon's own event for the same change, and the same reply
        // again (a second attempt), are no news.
        let echo = RoleChange {
            phx_ref: "p2".to_owned(),
            standing: promoted,
        };
        assert!(!note_standing(&state, &echo));
        assert!(take_resumed_standings(&state, standings).is_empty());
        // An event for an entry not held yet is passed on.
        let unknown = RoleChange {
            phx_ref: "p9".to_owned(),
            ..echo
        };
        assert!(note_standing(&state, &unknown));
    }

    #[test]
    fn an_owner_suspended_and_lifted_is_news_each_time() {
        let state = Mutex::new(State::default());
        lock(&state).held.push(held("web-1:p1", "alice"));
        let owning = lock(&state).held[0].standing.clone();
        let suspended = RoleChange {
            phx_ref: "web-1:p1".to_owned(),
            standing: Standing {
                role: Role::Spectator,
                readonly: true,
                suspended: true,
                ..owning.clone()
            },
        };
        assert!(note_standing(&state, &suspended));
        assert!(!note_standing(&state, &suspended));
        let lifted = BTreeMap::from([("web-1:p1".to_owned(), owning)]);
        assert_eq!(take_resumed_standings(&state, lifted).len(), 1);
    }
}
