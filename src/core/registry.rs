//! The registry: who is present on which topic, in join order.
//!
//! A deterministic state machine with no I/O and no clock. Every input comes
//! with the time, and every consequence (the reply, the events for each
//! connection, the rows to persist) is written to an [`Outbox`]. That keeps
//! the rules of ownership in one place that can be tested exhaustively.
//!
//! The owner of a topic is its entry with the lowest seq, and an entry's
//! position is how many entries are ahead of it. Seqs only grow, so a new
//! entry never displaces anyone: a standing (role, owner, position) changes
//! only when an entry ahead leaves, and then the holder of each entry behind
//! it hears its new standing once, in a `role` event. An entry nobody holds
//! hears of it when it is resumed. This is the one place the rule is
//! computed; clients display what it sends.
//!
//! A topic shared across hosts (`registry/cluster.rs`) follows the same
//! rule with etcd's create revisions for seqs. Those come from etcd's
//! changes rather than from a counter here, so a listing may bring an
//! entry ahead of ones already shown: the holders of the entries it stands
//! ahead of hear of it as they would of a departure.
//!
//! A batch can be taken back: between [`Registry::begin_batch`] and
//! [`Registry::settle`], every change is journaled with its inverse, so that
//! [`Registry::roll_back`] can restore the registry to what the database
//! still holds when a commit fails.
//!
//! What each user holds (entries, and bytes of meta) is counted where
//! entries go in and come out, so the per-user quotas stay right through a
//! restore and a roll-back alike.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, LazyLock};

use serde_json::{Map, Value};

use super::read::ReadView;

use crate::protocol::{
    Actor, Diff, ErrorBody, ErrorCode, Event, GetByKeyRequest, HISTORY_CHANGE_MAX_BYTES,
    HISTORY_LEFT_OUT_FIELD, HISTORY_VALUE_MAX_BYTES, HistoryEvent, HistoryKind, KeyPresence,
    LeaveReason, Lifetime, Limits, Meta, OutgoingReply, Owner, Presences, Removal, RemovedEntry,
    ReplyFields, ResumeReply, ResyncPayload, Revision, Role, RoleChange, Standing,
    SubscribeAllReply, TopicPresences, TrackReply, TrackRequest, UntrackReply, UntrackRequest,
    UpdateReply, UpdateRequest, checked_meta_size, host_of_ref, json_size, meta_size,
    validate_name,
};

/// Identifies one client connection for the daemon's lifetime.
pub type ConnId = u64;

/// The SHA-256 of a resume token. Only the hash is ever stored.
pub type TokenHash = [u8; 32];

/// How long, at least, a `resume` of an entry that another connection
/// removed says so, rather than `expired`: longer than a session waits for
/// its daemon to come back (30 s), so that it learns of the removal
/// instead of tracking the entry again. An entry restored after a restart
/// is remembered until its own resume deadline, if that is later.
const TOMBSTONE_MILLIS: i64 = 60_000;

/// The most removed entries remembered at once. Past it, the one to be
/// forgotten soonest goes first, and its `resume` says `expired`: a user
/// who removes entries in a loop costs the daemon at most this many.
const MAX_TOMBSTONES: usize = 4096;

/// The registry files entries by the process that owns them.
pub use crate::process::ProcessId;

mod cluster;
mod fence;
mod restart;

pub use cluster::{
    ClusterChanges, ClusterEvent, ClusterInput, ClusterReport, ClusterSetup, ClusterWrite,
    DEFAULT_PARK_TIMEOUT, LeaseView, MAX_WAITING_PER_CONNECTION, Shared, SharedRecord,
    SharedTopicsFn, WriteId, Written,
};
use cluster::{Leaving, Parked, PendingTrack, PendingTracks, PendingUntrack, PendingUpdate};
use fence::{Requeue, Requeues};
pub use restart::{RowsForCluster, sort_rows_for_cluster};

/// Something outside the registry that ends entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A connection closed: its connection entries leave.
    Closed(ConnId),
    /// A connection closed because its process was exiting: its
    /// connection entries leave for the exit.
    ClosedByExit(ConnId),
    /// A process exited: every entry it owned leaves.
    Exited(ProcessId),
}

/// Who is on the other end of a connection, from the socket's peer
/// credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub user: String,
}

/// One tracked presence.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub topic: String,
    pub key: String,
    pub seq: u64,
    pub phx_ref: String,
    pub prev_ref: Option<String>,
    pub meta: Map<String, Value>,
    pub joined_at: i64,
    pub process: ProcessId,
    pub uid: u32,
    pub user: String,
    pub lifetime: Lifetime,
    pub token_hash: TokenHash,
    /// The connection holding the entry; `None` for a process entry whose
    /// connection has closed, or an entry restored after a restart that has
    /// not been resumed yet.
    pub conn: Option<ConnId>,
    /// For an entry restored after a restart: when it expires unless resumed.
    pub resume_deadline: Option<i64>,
    /// For an entry of a topic shared across hosts: its etcd key, and
    /// whether another host tracked it. `None` for a local topic's entry.
    pub cluster: Option<Shared>,
}

impl Entry {
    /// The entry as the wire shows it.
    pub fn to_meta(&self) -> Meta {
        Meta {
            phx_ref: self.phx_ref.clone(),
            phx_ref_prev: self.prev_ref.clone(),
            seq: self.seq,
            joined_at: self.joined_at,
            pid: self.process.pid,
            uid: self.uid,
            user: self.user.clone(),
            client: self.meta.clone(),
        }
    }

    /// Another host tracked it: it holds a place in its topic's queue
    /// here, and nothing else.
    pub fn is_remote(&self) -> bool {
        self.cluster.as_ref().is_some_and(|shared| shared.remote)
    }

    fn to_owner(&self) -> Owner {
        Owner {
            key: self.key.clone(),
            phx_ref: self.phx_ref.clone(),
            pid: self.process.pid,
            user: self.user.clone(),
            joined_at: self.joined_at,
        }
    }
}

/// A track request after the io layer has resolved what needs the system:
/// the process (checked alive and permitted) and the resume token's hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    pub request: TrackRequest,
    pub process: ProcessId,
    pub token: String,
    pub token_hash: TokenHash,
}

/// What a request that may wait for etcd came to: a `track`, `update` or
/// `untrack`, which on a shared topic is answered only once etcd's watch
/// shows what it asked.
#[derive(Debug)]
pub enum Outcome {
    /// Its reply's fields: the change is made.
    Now(ReplyFields),
    /// It waits for etcd; its reply is named by this write (the first, if
    /// it asked several).
    Awaits(WriteId),
}

/// A row-level change for the store to persist.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Insert the entry, or replace the row with the same ref.
    Put(Box<Entry>),
    /// Delete the row with this ref.
    Delete(String),
    /// Record a moment in a topic's history.
    History(Box<HistoryEvent>),
}

/// A line for one or more connections.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Reply {
        conn: ConnId,
        reply: OutgoingReply,
    },
    Event {
        to: Vec<ConnId>,
        event: Event,
    },
    /// A reply or a `presence_state` to be made from views of the
    /// registry as it was here (see `core/read.rs`).
    View {
        conn: ConnId,
        view: ReadView,
    },
    /// Every state of a resync of all topics is delivered (see
    /// [`Registry::resync_all`]): the connection's queue gives back the
    /// large-reply slot the resync held.
    ResyncedAll(ConnId),
    /// The reply to request `id` waits for etcd (a track, update or
    /// untrack of a shared topic): it takes its place among the
    /// connection's lines, and whatever follows for the connection waits
    /// behind it.
    Awaiting {
        conn: ConnId,
        id: Value,
        write: WriteId,
    },
    /// What the reply that waited on `write` turned out to be, with what
    /// goes with it (a subscribe's state), all to `conn`, in order.
    Resolved {
        conn: ConnId,
        write: WriteId,
        deliveries: Vec<Delivery>,
    },
}

/// Everything that inputs caused, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    pub deliveries: Vec<Delivery>,
    pub changes: Vec<Change>,
    /// Writes to etcd, to go out once the changes are committed.
    pub cluster: Vec<ClusterWrite>,
}

impl Outbox {
    fn record(&mut self, event: HistoryEvent) {
        self.changes.push(Change::History(Box::new(event)));
    }

    fn history(&mut self, entry: &Entry, kind: HistoryKind, reason: Option<LeaveReason>, at: i64) {
        self.record(history_event(entry, kind, reason, at));
    }

    /// An update's history event, with what it did to the meta: so that
    /// `presence log` can say what changed (an editor that wrote over the
    /// owner's copy says so in its meta). Bounded, since any client may
    /// update as often as it likes.
    fn history_of_update(&mut self, entry: &Entry, old_meta: &Map<String, Value>, at: i64) {
        let (changed, removed) = meta_change(old_meta, &entry.meta);
        let (changed, removed) = bounded_change(changed, removed);
        self.record(HistoryEvent {
            changed: Some(changed),
            removed: Some(removed),
            ..history_event(entry, HistoryKind::Update, None, at)
        });
    }

    /// A topic's `presence_state` for one connection, as `view` shows it.
    fn state(&mut self, conn: ConnId, topic: &str, view: TopicView) {
        let view = ReadView::State {
            topic: topic.to_owned(),
            view,
        };
        self.deliveries.push(Delivery::View { conn, view });
    }

    fn event(&mut self, to: Vec<ConnId>, event: Event) {
        if !to.is_empty() {
            self.deliveries.push(Delivery::Event { to, event });
        }
    }

    /// Tells the connection holding the entry `phx_ref` its standing, in a
    /// `role` event.
    fn role(&mut self, conn: ConnId, topic: String, phx_ref: String, standing: Standing) {
        let payload = RoleChange { phx_ref, standing };
        self.event(vec![conn], Event::Role { topic, payload });
    }
}

/// The history of a start: each entry found gone (`dead`, with the reason:
/// its process exited or the machine rebooted while no daemon ran, or it
/// no longer fits the daemon's cluster setup) leaves, and where one of
/// them owned its topic, the first of `kept` there becomes the owner.
/// Recorded at `now`, when the daemon found out.
pub fn departures_at_start(dead: &[(Entry, LeaveReason)], kept: &[Entry], now: i64) -> Vec<Change> {
    let mut first_kept: BTreeMap<&str, &Entry> = BTreeMap::new();
    for entry in kept {
        let first = first_kept.entry(&entry.topic).or_insert(entry);
        if entry.seq < first.seq {
            *first = entry;
        }
    }
    let mut dead: Vec<&(Entry, LeaveReason)> = dead.iter().collect();
    dead.sort_by_key(|(entry, _)| entry.seq);
    let mut changes = Vec::new();
    let mut topics_done = BTreeSet::new();
    for (entry, reason) in &dead {
        let event = history_event(entry, HistoryKind::Leave, Some(*reason), now);
        changes.push(Change::History(Box::new(event)));
    }
    for (entry, _) in &dead {
        // The topic's owner was its first entry; was that one gone?
        if !topics_done.insert(entry.topic.as_str()) {
            continue;
        }
        let Some(next) = first_kept.get(entry.topic.as_str()) else {
            continue;
        };
        if next.seq > entry.seq {
            let event = history_event(next, HistoryKind::Owner, None, now);
            changes.push(Change::History(Box::new(event)));
        }
    }
    changes
}

/// A history event of `kind` about `entry`, with nothing about its meta.
fn history_event(
    entry: &Entry,
    kind: HistoryKind,
    reason: Option<LeaveReason>,
    at: i64,
) -> HistoryEvent {
    HistoryEvent {
        at,
        topic: entry.topic.clone(),
        kind,
        key: entry.key.clone(),
        phx_ref: entry.phx_ref.clone(),
        pid: entry.process.pid,
        user: entry.user.clone(),
        reason,
        changed: None,
        removed: None,
    }
}

/// What going from meta `old` to `new` did: the fields added or changed,
/// with their new values, and the names of the fields removed.
fn meta_change(
    old: &Map<String, Value>,
    new: &Map<String, Value>,
) -> (Map<String, Value>, Vec<String>) {
    let changed = new
        .iter()
        .filter(|(field, value)| old.get(*field) != Some(value))
        .map(|(field, value)| (field.clone(), value.clone()))
        .collect();
    let removed = old
        .keys()
        .filter(|field| !new.contains_key(*field))
        .cloned()
        .collect();
    (changed, removed)
}

/// What the history keeps of a meta change: each value longer than
/// [`HISTORY_VALUE_MAX_BYTES`] as `… (N bytes)`, and the fields, changed
/// then removed, as long as they fit in [`HISTORY_CHANGE_MAX_BYTES`]; the
/// number of those that did not is under [`HISTORY_LEFT_OUT_FIELD`].
fn bounded_change(
    changed: Map<String, Value>,
    removed: Vec<String>,
) -> (Map<String, Value>, Vec<String>) {
    let mut room = HISTORY_CHANGE_MAX_BYTES;
    let mut fits = |bytes: usize| {
        let fit = bytes <= room;
        if fit {
            room -= bytes;
        }
        fit
    };
    let mut left_out = 0_u64;
    let mut kept_changed = Map::new();
    for (field, value) in changed {
        let size = json_size(&value);
        let value = if size > HISTORY_VALUE_MAX_BYTES {
            Value::String(format!("… ({size} bytes)"))
        } else {
            value
        };
        // `"field":value,`
        if fits(json_size(&field) + json_size(&value) + 2) {
            kept_changed.insert(field, value);
        } else {
            left_out += 1;
        }
    }
    let mut kept_removed = Vec::new();
    for field in removed {
        if fits(json_size(&field) + 1) {
            kept_removed.push(field);
        } else {
            left_out += 1;
        }
    }
    if left_out > 0 {
        kept_changed.insert(HISTORY_LEFT_OUT_FIELD.to_owned(), left_out.into());
    }
    (kept_changed, kept_removed)
}

/// A topic's entries by seq (the first is the owner), shared: a view of
/// them is one reference count, and the registry copies the map (of
/// `Arc`s, not entries) only when it changes one while a view is alive.
type Entries = Arc<BTreeMap<u64, Arc<Entry>>>;

#[derive(Debug, Default)]
#[cfg_attr(test, derive(Clone))]
struct Topic {
    /// Entries by seq: the first is the owner.
    entries: Entries,
    subscribers: BTreeSet<ConnId>,
}

impl Topic {
    fn owner(&self) -> Option<&Entry> {
        self.entries.values().next().map(|entry| &**entry)
    }

    /// The standing of the entry with `seq`; `owner_suspended` says
    /// whether the topic's first entry stands suspended (see
    /// [`Registry::owner_suspended`]).
    fn standing(&self, seq: u64, owner_suspended: bool) -> Standing {
        self.standing_at(self.entries.range(..seq).count(), owner_suspended)
    }

    /// The standing at `position`. The first entry owns, unless it is
    /// suspended: this host's entry of a shared topic while its etcd lease
    /// is not live, told it stands first but may not write.
    fn standing_at(&self, position: usize, owner_suspended: bool) -> Standing {
        let suspended = owner_suspended && position == 0;
        let role = if position == 0 && !suspended {
            Role::Owner
        } else {
            Role::Spectator
        };
        Standing {
            role,
            readonly: role == Role::Spectator,
            position,
            owner: self.owner().map(Entry::to_owner),
            suspended,
        }
    }

    /// The entries whose standing changed when the entries with the seqs
    /// `gone` (sorted, and out of the topic already) left: exactly those
    /// behind the first of them, each with its position now and what its
    /// standing was before. The entries ahead are walked only as far as
    /// there are entries behind (see [`Topic::count_ahead`]).
    fn moved_behind<'a>(
        &'a self,
        gone: &'a [u64],
    ) -> impl Iterator<Item = (&'a Entry, usize, StandingKey)> + 'a {
        let (behind, owner_before) = match gone.first() {
            Some(&first_gone) => (
                self.entries.range(first_gone..),
                self.entries
                    .keys()
                    .next()
                    .map_or(first_gone, |&seq| seq.min(first_gone)),
            ),
            None => (self.entries.range(0..0), 0),
        };
        let first_position = self.count_ahead(gone.first().copied(), behind.clone());
        behind.enumerate().map(move |(index, (&seq, entry))| {
            let position = first_position + index;
            let gone_ahead = gone.partition_point(|&g| g < seq);
            let before = StandingKey {
                position: position + gone_ahead,
                owner_seq: owner_before,
                // A gone entry stood ahead of it: it was not first.
                suspended: false,
            };
            (&**entry, position, before)
        })
    }

    /// How many entries sit ahead of `first_gone` (all of them if none),
    /// given the ones `behind` it: found by walking both sides in step, so
    /// that it costs the shorter of them. The owner's departure, with
    /// nobody ahead, costs nothing; a departure near the end of a long
    /// queue, little.
    fn count_ahead<'a>(
        &'a self,
        first_gone: Option<u64>,
        mut behind: impl Iterator<Item = (&'a u64, &'a Arc<Entry>)>,
    ) -> usize {
        let Some(first_gone) = first_gone else {
            return self.entries.len();
        };
        let mut ahead = self.entries.range(..first_gone);
        let mut steps = 0;
        loop {
            if ahead.next().is_none() {
                return steps;
            }
            if behind.next().is_none() {
                return self.entries.len() - steps;
            }
            steps += 1;
        }
    }

    /// What decides the standing of an entry at `position` now.
    fn standing_key_at(&self, position: usize, owner_suspended: bool) -> StandingKey {
        StandingKey {
            position,
            owner_seq: self.entries.keys().next().copied().unwrap_or_default(),
            suspended: owner_suspended && position == 0,
        }
    }

    /// The topic's entries as they are now, unchanged by anything the
    /// registry does later.
    fn view(&self) -> TopicView {
        TopicView {
            entries: Arc::clone(&self.entries),
        }
    }

    /// Adds an entry, copying the map first only if a view shares it.
    fn insert_entry(&mut self, entry: Entry) {
        Arc::make_mut(&mut self.entries).insert(entry.seq, Arc::new(entry));
    }

    /// Removes an entry, copying the map first only if a view shares it.
    fn remove_entry(&mut self, seq: u64) -> Option<Entry> {
        Arc::make_mut(&mut self.entries)
            .remove(&seq)
            .map(Arc::unwrap_or_clone)
    }
}

/// A topic's entries at one moment, taken in O(1) and unchanged by later
/// changes to the registry, so that they can be turned into a reply away
/// from the core.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopicView {
    entries: Entries,
}

impl TopicView {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn owner(&self) -> Option<&Entry> {
        self.entries.values().next().map(|entry| &**entry)
    }

    /// Its entries in join order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().map(|entry| &**entry)
    }

    pub fn presences(&self) -> Presences {
        let mut presences = Presences::new();
        for entry in self.entries() {
            presences
                .entry(entry.key.clone())
                .or_default()
                .metas
                .push(entry.to_meta());
        }
        presences
    }

    pub fn snapshot(&self) -> TopicPresences {
        TopicPresences {
            presences: self.presences(),
            owner: self.owner().map(Entry::to_owner),
        }
    }
}

#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
struct Connection {
    peer: Peer,
    /// Refs of the entries this connection holds.
    entries: BTreeSet<String>,
    /// The topic and key of each of those entries: a connection holds a
    /// pair at most once, and a track checks that without a scan.
    keys: BTreeSet<(String, String)>,
    subscriptions: BTreeSet<String>,
    /// Subscribed to every topic as well (`subscribe` with `all: true`).
    subscribed_to_all: bool,
    /// Tracks of shared topics waiting for etcd: they count toward the
    /// connection's entry limit (their keys are in `keys`).
    parked: usize,
}

/// Where an entry lives, found by its ref, and the size of its meta.
#[derive(Debug, Clone)]
struct Location {
    topic: String,
    seq: u64,
    /// The client meta, serialized, as `--max-meta` measures it: measured
    /// once, when the meta arrives, and kept with the entry through every
    /// take and insert (a detach, a resume, a rolled-back batch).
    meta_bytes: usize,
}

/// An entry another connection removed, remembered by its token's hash so
/// that a `resume` of it can say so: a client that was away when it was
/// removed (its connection closed, or the daemon restarted) would
/// otherwise find the token `expired` and track the entry again.
#[derive(Debug, Clone, PartialEq)]
struct Tombstone {
    /// The entry's uid: only a connection of that uid may learn of it, as
    /// only one of that uid could have resumed it.
    uid: u32,
    expires_at: i64,
    removed: RemovedEntry,
}

/// What one uid holds, for its quotas.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    entries: usize,
    process_entries: usize,
    /// The client metas, serialized, as `--max-meta` measures one.
    meta_bytes: usize,
    /// Of those, restored entries still waiting to be resumed: nobody has
    /// claimed them since the restart, and a `resume` claims them again
    /// within the quotas, as a `track` would.
    awaiting_entries: usize,
    awaiting_meta_bytes: usize,
}

impl Usage {
    fn count(&mut self, entry: &Entry, meta_bytes: usize) {
        self.entries += 1;
        self.meta_bytes += meta_bytes;
        if entry.lifetime == Lifetime::Process {
            self.process_entries += 1;
        }
        if entry.resume_deadline.is_some() {
            self.awaiting_entries += 1;
            self.awaiting_meta_bytes += meta_bytes;
        }
    }

    /// The inverse of [`Usage::count`] for the same entry.
    fn uncount(&mut self, entry: &Entry, meta_bytes: usize) {
        self.entries -= 1;
        self.meta_bytes -= meta_bytes;
        if entry.lifetime == Lifetime::Process {
            self.process_entries -= 1;
        }
        if entry.resume_deadline.is_some() {
            self.awaiting_entries -= 1;
            self.awaiting_meta_bytes -= meta_bytes;
        }
    }
}

/// What a new claim on an entry is weighed against: what the daemon and
/// the claiming uid already hold that counts.
struct Claimed {
    total_entries: usize,
    entries: usize,
    meta_bytes: usize,
}

/// The inverse of one change, journaled while a batch is open.
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
enum Undo {
    /// An entry was inserted under this ref: take it out again.
    Inserted(String),
    /// An entry was taken out: put it back as it was, with its meta's size.
    Taken(Box<Entry>, usize),
    /// A connection closed: put it back with what it held.
    Closed(ConnId, Connection),
    /// A removed entry was remembered: forget it again.
    Buried(TokenHash),
    /// A removed entry was forgotten: remember it again.
    Unburied(TokenHash, Box<Tombstone>),
    Subscribed {
        conn: ConnId,
        topic: String,
    },
    Unsubscribed {
        conn: ConnId,
        topic: String,
    },
    /// What the holder of the entry with this topic and seq was last told
    /// was noted (`None`) or forgotten (`Some`): put it back as it was.
    ToldBefore((String, u64), Option<StandingKey>),
    /// A connection subscribed to every topic.
    SubscribedAll(ConnId),
    UnsubscribedAll(ConnId),
    /// A track was parked to wait for etcd under this topic and key id.
    Pended((String, String)),
    /// A parked track was taken out: park it again as it was.
    Unpended(Box<PendingTrack>),
    /// The lease's view was changed from this one.
    Lease(LeaseView),
    /// The flag to queue the entry of this topic and key id again was set
    /// or changed (from `Some`) or cleared (from `None`): put it back.
    Requeue((String, String), Option<Requeue>),
    /// The leave of this host's entry of a shared topic, by key id, was
    /// set or cleared: put back what it was.
    Leaving(String, Option<Box<Leaving>>),
    /// The update waiting for etcd of an entry, by key id, was set or
    /// cleared: put back what it was.
    Updating(String, Option<Box<PendingUpdate>>),
    /// The untrack waiting for etcd named by this write was set or
    /// cleared: put back what it was.
    Untracking(WriteId, Option<Box<PendingUntrack>>),
}

/// How to take back the open batch: the inverse of each change in order,
/// and the counters as they were before it.
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
struct Journal {
    undo: Vec<Undo>,
    next_seq: u64,
    last_joined_at: i64,
    shown_revision: u64,
}

/// What became of one token of a `resume`.
enum Resumption {
    Resumed {
        topic: String,
        phx_ref: String,
        standing: Standing,
        /// Its standing is not the one its holder was last told.
        changed_while_away: bool,
    },
    /// No entry this connection may resume has the token.
    Expired,
    /// Another connection removed the entry while none held it.
    Removed(RemovedEntry),
    /// The entry exists and is free, but this connection may not hold it.
    Refused(ErrorBody),
}

/// What decides a standing, kept to compare the standing an entry's holder
/// was last told with the one it has now: the entry's place in the queue,
/// which entry owned the topic (by seq, which an update keeps; the owner's
/// ref does not decide it), and whether the entry, first, was suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StandingKey {
    position: usize,
    owner_seq: u64,
    suspended: bool,
}

/// The presence state machine.
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
pub struct Registry {
    limits: Limits,
    topics: BTreeMap<String, Topic>,
    refs: HashMap<String, Location>,
    /// How many of `refs` are other hosts' entries. They are filed by ref
    /// and in their topics only, and count toward no quota or cap: another
    /// host's load must not refuse this host's tracks.
    remote_entries: usize,
    by_process: HashMap<ProcessId, BTreeSet<String>>,
    by_token: HashMap<TokenHash, String>,
    /// What each uid holds; a uid that holds nothing has no row.
    usage_by_uid: HashMap<u32, Usage>,
    /// Held to no per-uid quota: the daemon's own user, whose daemon it is.
    /// The total cap still applies to it.
    uid_exempt_from_quotas: Option<u32>,
    /// Restored entries waiting to be resumed, soonest deadline first.
    awaiting_resume: BTreeSet<(i64, String)>,
    /// Entries other connections removed, by their tokens' hashes; and
    /// the same, soonest to be forgotten first.
    tombstones: HashMap<TokenHash, Tombstone>,
    tombstones_by_expiry: BTreeSet<(i64, TokenHash)>,
    conns: HashMap<ConnId, Connection>,
    /// Connections subscribed to every topic: they get every topic's
    /// diffs, as its own subscribers do.
    subscribed_to_all: BTreeSet<ConnId>,
    /// The next value for a seq or a ref; both draw from it, so neither is
    /// ever reused.
    next_seq: u64,
    last_joined_at: i64,
    /// Set while a batch is open: how to take it back.
    journal: Option<Journal>,
    /// By topic and seq, for each entry whose standing changed while no
    /// connection held it: the standing its holder was last told, so that
    /// a `resume` tells it what changed. An entry that is not here was told
    /// its standing as it is now: a held entry's holder is sent every
    /// change, and an entry let go keeps its standing until one comes.
    /// "Told" is queued for the connection, not read by the client, and
    /// this is kept in memory only: a crash, a restart, or a client that
    /// loses the connection that had the `role` event loses the change,
    /// which only the standings of the `resume` reply then show (a client
    /// compares them with what it held). The topic is part of the key
    /// because a seq is unique only within its topic: a shared topic's
    /// seqs are etcd create revisions, which may equal a local one's.
    told_before: HashMap<(String, u64), StandingKey>,
    /// How this daemon takes part in a cluster; `None` when every topic is
    /// local.
    cluster: Option<ClusterSetup>,
    /// The entries of shared topics by topic and key id (`HOST:pN`, which
    /// an update keeps), to their current ref.
    shared_ids: HashMap<(String, String), String>,
    /// Tracks of shared topics waiting for etcd to show their keys, by
    /// topic and key id.
    pending: PendingTracks,
    /// The id of the next write to etcd. Never taken back, so an id is
    /// never handed out twice, even for a write dropped with its batch.
    next_write: u64,
    /// Where this daemon's etcd lease stands, as last told.
    lease: LeaseView,
    /// This host's entries of shared topics whose keys went with a lease
    /// that ended, by topic and key id: each stays, suspended, until its
    /// key is created again and shows.
    requeue: Requeues,
    /// This host's entries of shared topics on their way out, by key id
    /// (`HOST:pN`, unique across topics): each stays in its place until
    /// etcd's watch shows its key deleted, so that nobody here is promoted
    /// before any other host could be.
    leaving: HashMap<String, Leaving>,
    /// Updates of this host's entries of shared topics waiting for etcd to
    /// show the new version, by key id: one at a time for each.
    updating: HashMap<String, PendingUpdate>,
    /// The key id of each of `updating`, by the write that asked for it.
    updating_by_write: HashMap<WriteId, String>,
    /// Untracks waiting for etcd to show the deletes of the shared entries
    /// they removed, by the write that names their reply.
    untracking: HashMap<WriteId, PendingUntrack>,
    /// The replies waiting for etcd that are answered `unavailable` at a
    /// time (wall clock, ms) unless etcd shows what they asked first,
    /// soonest first, by the write that names each.
    park_deadlines: BTreeSet<(i64, WriteId)>,
    /// The revision etcd's watch (or a listing) has shown this daemon up
    /// to: a key created at or below it that was not shown is gone.
    shown_revision: u64,
    /// This host's entries of shared topics that left while their keys
    /// were not confirmed after a restart (their process exited while no
    /// daemon ran, or they left before the first listing), by topic and
    /// create revision, with the reason: the first listing deletes each
    /// key still there for that reason. Only read by that listing.
    left_while_down: HashMap<(String, u64), LeaveReason>,
}

impl Registry {
    pub fn new(limits: Limits) -> Registry {
        Registry {
            limits,
            topics: BTreeMap::new(),
            refs: HashMap::new(),
            remote_entries: 0,
            by_process: HashMap::new(),
            by_token: HashMap::new(),
            awaiting_resume: BTreeSet::new(),
            tombstones: HashMap::new(),
            tombstones_by_expiry: BTreeSet::new(),
            usage_by_uid: HashMap::new(),
            uid_exempt_from_quotas: None,
            conns: HashMap::new(),
            subscribed_to_all: BTreeSet::new(),
            next_seq: 1,
            last_joined_at: 0,
            journal: None,
            told_before: HashMap::new(),
            cluster: None,
            shared_ids: HashMap::new(),
            pending: PendingTracks::default(),
            next_write: 0,
            lease: LeaseView::Granting,
            requeue: Requeues::default(),
            leaving: HashMap::new(),
            updating: HashMap::new(),
            updating_by_write: HashMap::new(),
            untracking: HashMap::new(),
            park_deadlines: BTreeSet::new(),
            shown_revision: 0,
            left_while_down: HashMap::new(),
        }
    }

    /// Rebuilds the registry from persisted entries. `next_seq` is the
    /// persisted counter; it is raised past every seq and ref number seen,
    /// whatever it says.
    pub fn restore(limits: Limits, entries: Vec<Entry>, next_seq: u64) -> Registry {
        let mut registry = Registry::new(limits);
        registry.next_seq = next_seq.max(1);
        for entry in entries {
            // Refs draw from the same counter: step past theirs too, so a
            // counter that fell behind can never hand one out again. A
            // shared topic's entry has a ref of the counter too (`HOST:pN`),
            // but its seq is an etcd create revision, which the counter
            // never made: following it would only inflate the counter.
            let seq = entry.cluster.is_none().then_some(entry.seq);
            let numbers = [seq, ref_number(&entry.phx_ref)]
                .into_iter()
                .chain([entry.prev_ref.as_deref().and_then(ref_number)]);
            for number in numbers.flatten() {
                registry.next_seq = registry.next_seq.max(number.saturating_add(1));
            }
            registry.last_joined_at = registry.last_joined_at.max(entry.joined_at);
            let meta_bytes = meta_size(&entry.meta);
            registry.insert(entry, meta_bytes);
        }
        registry
    }

    /// Holds `uid` to no per-uid quota (the daemon's own user: a per-user
    /// daemon's clients are all that user, and its memory is theirs).
    pub fn exempt_from_uid_quotas(mut self, uid: u32) -> Registry {
        self.uid_exempt_from_quotas = Some(uid);
        self
    }

    /// Shares the topics `cluster` names with other hosts; `None` keeps
    /// every topic local.
    pub fn with_cluster(mut self, cluster: Option<ClusterSetup>) -> Registry {
        self.cluster = cluster;
        self
    }

    /// Whether `topic` is shared across hosts: its entries come from etcd.
    fn is_shared(&self, topic: &str) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.shares(topic))
    }

    /// Remembers the standings the restored entries had among the rows as
    /// they were stored, `departed` included: the entries of processes that
    /// exited while no daemon ran, which are not restored. Each restored
    /// entry behind one of them stands further ahead now, and its holder,
    /// told the stored standing, hears the new one when it resumes.
    pub fn with_standings_as_stored(mut self, departed: &[Entry]) -> Registry {
        let mut gone_by_topic: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for entry in departed {
            gone_by_topic
                .entry(&entry.topic)
                .or_default()
                .push(entry.seq);
        }
        for (name, mut gone) in gone_by_topic {
            gone.sort_unstable();
            let Some(topic) = self.topics.get(name) else {
                continue;
            };
            let moved: Vec<((String, u64), StandingKey)> = topic
                .moved_behind(&gone)
                .map(|(entry, _, before)| ((name.to_owned(), entry.seq), before))
                .collect();
            self.told_before.extend(moved);
        }
        self
    }

    /// The counter to persist so that seqs are never reused after a restart.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn topic_count(&self) -> usize {
        self.topics
            .values()
            .filter(|t| !t.entries.is_empty())
            .count()
    }

    /// Every entry shown, other hosts' included.
    pub fn entry_count(&self) -> usize {
        self.refs.len()
    }

    /// Of those, other hosts' entries.
    pub fn remote_entry_count(&self) -> usize {
        self.remote_entries
    }

    /// The entries this host holds: what the total cap weighs.
    fn local_entry_count(&self) -> usize {
        self.refs.len() - self.remote_entries + self.parked_count()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.topics
            .values()
            .map(|t| t.subscribers.len())
            .sum::<usize>()
            + self.subscribed_to_all.len()
    }

    /// The topic's entries as they are now (none if nobody is on it),
    /// unchanged by anything the registry does later.
    pub fn view(&self, topic: &str) -> TopicView {
        self.topic(topic).view()
    }

    /// A view of every topic someone is on, in topic order.
    pub fn occupied_views(&self) -> Vec<(String, TopicView)> {
        self.topics
            .iter()
            .filter(|(_, t)| !t.entries.is_empty())
            .map(|(name, t)| (name.clone(), t.view()))
            .collect()
    }

    /// Every entry, topic by topic in join order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.topics
            .values()
            .flat_map(|t| t.entries.values().map(|entry| &**entry))
    }

    /// How many restored entries still wait to be resumed.
    pub fn awaiting_resume_count(&self) -> usize {
        self.awaiting_resume.len()
    }

    /// The earliest time at which a restored entry expires, if any waits.
    pub fn next_resume_deadline(&self) -> Option<i64> {
        self.awaiting_resume.first().map(|(deadline, _)| *deadline)
    }

    /// The processes whose exit must reap entries.
    pub fn processes(&self) -> impl Iterator<Item = ProcessId> + '_ {
        self.by_process.keys().copied()
    }

    /// Starts journaling changes, so that the batch that follows can be
    /// taken back with [`Registry::roll_back`] if its commit fails.
    pub fn begin_batch(&mut self) {
        debug_assert!(self.journal.is_none(), "the last batch was not ended");
        self.journal = Some(Journal {
            undo: Vec::new(),
            next_seq: self.next_seq,
            last_joined_at: self.last_joined_at,
            shown_revision: self.shown_revision,
        });
    }

    /// The batch is committed: it can no longer be taken back.
    pub fn settle(&mut self) {
        self.journal = None;
    }

    /// The batch's commit failed: undoes its changes, newest first, so that
    /// the registry holds what the database holds. Connections opened in the
    /// batch stay open: their sockets are still there.
    pub fn roll_back(&mut self) {
        // Taking the journal out also stops the undoing from being journaled.
        let Some(journal) = self.journal.take() else {
            return;
        };
        for undo in journal.undo.into_iter().rev() {
            self.undo(undo);
        }
        self.next_seq = journal.next_seq;
        self.last_joined_at = journal.last_joined_at;
        self.shown_revision = journal.shown_revision;
    }

    /// A connection has been accepted. Not journaled: the connection is
    /// open whether or not the batch commits.
    pub fn open(&mut self, conn: ConnId, peer: Peer) {
        self.conns.insert(
            conn,
            Connection {
                peer,
                entries: BTreeSet::new(),
                keys: BTreeSet::new(),
                subscriptions: BTreeSet::new(),
                subscribed_to_all: false,
                parked: 0,
            },
        );
    }

    /// Connections have closed and processes have exited. Their entries
    /// leave together: one diff per topic, and one role event for each
    /// remaining held entry whose standing changed, however many endings
    /// there were. (Taken one at a time, ten thousand closing owners would
    /// tell each remaining entry about each new owner in turn.)
    ///
    /// A closed connection's process entries stay, held by nobody, until
    /// their process exits or a connection resumes them; its subscriptions
    /// end. An entry ended twice over leaves for the first reason.
    pub fn end(&mut self, endings: &[Ending], now: i64, out: &mut Outbox) {
        let mut leaving = Vec::new();
        for ending in endings {
            match *ending {
                Ending::Closed(conn) => self.close(conn, LeaveReason::Closed, &mut leaving, out),
                Ending::ClosedByExit(conn) => {
                    self.close(conn, LeaveReason::PidExit, &mut leaving, out);
                }
                Ending::Exited(process) => {
                    if let Some(refs) = self.by_process.get(&process) {
                        leaving.extend(refs.iter().map(|r| (r.clone(), LeaveReason::PidExit)));
                    }
                    self.cancel_parked(cluster::Of::Process(process), LeaveReason::PidExit, out);
                }
            }
        }
        self.remove(leaving, now, out);
    }

    /// Forgets a closed connection and adds its connection entries to
    /// `leaving`, for `reason`.
    fn close(
        &mut self,
        conn: ConnId,
        reason: LeaveReason,
        leaving: &mut Vec<(String, LeaveReason)>,
        out: &mut Outbox,
    ) {
        let Some(connection) = self.conns.remove(&conn) else {
            return;
        };
        let subscriptions: Vec<String> = connection.subscriptions.iter().cloned().collect();
        let held: Vec<String> = connection.entries.iter().cloned().collect();
        self.record(|| Undo::Closed(conn, connection));
        self.cancel_parked(cluster::Of::Conn(conn), reason, out);
        for topic in &subscriptions {
            self.remove_subscription(conn, topic);
        }
        self.subscribed_to_all.remove(&conn);
        for phx_ref in held {
            match self.entry(&phx_ref).map(|e| e.lifetime) {
                Some(Lifetime::Connection) => leaving.push((phx_ref, reason)),
                Some(Lifetime::Process) => self.detach(&phx_ref),
                None => {}
            }
        }
    }

    /// A process entry outlives its connection: it stays, held by nobody,
    /// until its process exits or a connection resumes it.
    fn detach(&mut self, phx_ref: &str) {
        if let Some((mut entry, meta_bytes)) = self.take(phx_ref) {
            entry.conn = None;
            self.insert(entry, meta_bytes);
        }
    }

    /// Restored entries whose resume deadline has passed leave, and
    /// removed entries remembered long enough are forgotten.
    pub fn expire(&mut self, now: i64, out: &mut Outbox) {
        self.forget_tombstones_due(now);
        let expired = self
            .awaiting_resume
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|(_, phx_ref)| (phx_ref.clone(), LeaveReason::Expired))
            .collect();
        self.remove(expired, now, out);
    }

    /// Sends a fresh `presence_state` for each topic the connection still
    /// subscribes to: the io layer asks for this after dropping diffs that a
    /// slow reader could not take.
    pub fn resync(&mut self, conn: ConnId, topics: &[String], out: &mut Outbox) {
        let Some(connection) = self.conns.get(&conn) else {
            return;
        };
        for topic in topics {
            if connection.subscribed_to_all || connection.subscriptions.contains(topic) {
                out.state(conn, topic, self.view(topic));
            }
        }
    }

    /// Sends a fresh `presence_state` for every topic the connection
    /// subscribes to, like `subscribe` with `all: true` (the topics anyone
    /// is on, in topic order, and its named subscriptions besides): the io
    /// layer asks for this when a slow reader dropped diffs for more topics
    /// than it keeps the names of. Ends with [`Delivery::ResyncedAll`].
    pub fn resync_all(&mut self, conn: ConnId, out: &mut Outbox) {
        if let Some(connection) = self.conns.get(&conn) {
            let mut topics: BTreeSet<&String> = connection.subscriptions.iter().collect();
            if connection.subscribed_to_all {
                topics.extend(
                    self.topics
                        .iter()
                        .filter(|(_, t)| !t.entries.is_empty())
                        .map(|(name, _)| name),
                );
            }
            let states: Vec<(&String, TopicView)> =
                topics.into_iter().map(|t| (t, self.view(t))).collect();
            // Topics that emptied while its diffs were held back get no
            // state: the list of those that do tells the watcher which.
            if connection.subscribed_to_all {
                let topics = states.iter().map(|(topic, _)| (*topic).clone());
                let resync = Event::Resync {
                    payload: ResyncPayload {
                        topics: topics.collect(),
                    },
                };
                out.event(vec![conn], resync);
            }
            for (topic, view) in states {
                out.state(conn, topic, view);
            }
        }
        out.deliveries.push(Delivery::ResyncedAll(conn));
    }

    /// Tracks an entry: at once on a local topic; on a shared one, every
    /// check is made now, and the track waits for etcd to show its key
    /// (see [`Registry::park_track`]), to be answered then.
    pub(crate) fn track(
        &mut self,
        conn: ConnId,
        request_id: &Value,
        track: Track,
        now: i64,
        out: &mut Outbox,
    ) -> Result<Outcome, ErrorBody> {
        let Track {
            request,
            process,
            token,
            token_hash,
        } = track;
        let limits = self.limits;
        validate_name("topic", &request.topic, limits.max_name_bytes)?;
        validate_name("key", &request.key, limits.max_name_bytes)?;
        let meta_bytes = checked_meta_size(&request.meta, limits.max_meta_bytes)?;
        self.check_room_for(conn, &request.topic, &request.key)?;
        let peer = self
            .conns
            .get(&conn)
            .ok_or_else(closed_connection)?
            .peer
            .clone();
        let usage = self.usage(peer.uid);
        if request.lifetime == Lifetime::Process
            && usage.process_entries >= limits.max_process_entries_per_uid
        {
            return Err(ErrorBody::new(
                ErrorCode::LimitExceeded,
                format!(
                    "uid {} already holds {} process entries, the limit",
                    peer.uid, limits.max_process_entries_per_uid
                ),
            ));
        }
        let claimed = Claimed {
            total_entries: self.local_entry_count(),
            entries: usage.entries,
            meta_bytes: usage.meta_bytes,
        };
        self.check_quotas(peer.uid, &claimed, meta_bytes)?;
        if request.subscribe {
            self.check_subscription_limit(conn, &request.topic)?;
        }
        // A shared topic holds no local entry: rows of one tracked before
        // it was shared leave at start (`sort_rows_for_cluster`).
        let shared = self.is_shared(&request.topic);
        self.check_lease_for_track(&request.topic)?;
        // joined_at never goes backwards, even if the wall clock does.
        let joined_at = now.max(self.last_joined_at);
        self.last_joined_at = joined_at;
        let mut entry = Entry {
            topic: request.topic.clone(),
            key: request.key,
            // A local entry's seq and ref are the counter's, given below; a
            // shared one's are etcd's create revision and `HOST:pN`, given
            // when it is parked and when its key shows.
            seq: 0,
            phx_ref: String::new(),
            prev_ref: None,
            meta: request.meta,
            joined_at,
            process,
            uid: peer.uid,
            user: peer.user,
            lifetime: request.lifetime,
            token_hash,
            conn: Some(conn),
            resume_deadline: None,
            cluster: None,
        };
        if shared {
            let parked = Parked {
                conn,
                request_id: request_id.clone(),
                entry,
                meta_bytes,
                subscribe: request.subscribe,
                token,
            };
            return self.park_track(parked, now, out).map(Outcome::Awaits);
        }

        let seq = self.take_seq();
        entry.seq = seq;
        entry.phx_ref = ref_for(seq);
        let phx_ref = entry.phx_ref.clone();
        out.changes.push(Change::Put(Box::new(entry.clone())));
        self.join(entry, meta_bytes, joined_at, out);

        let topic = self.topic(&request.topic);
        let reply = TrackReply {
            phx_ref,
            seq,
            joined_at,
            // The newest seq: last in line, found without counting. A
            // local topic's owner is never suspended.
            standing: topic.standing_at(topic.entries.len().saturating_sub(1), false),
            resume_token: token,
        };
        if request.subscribe {
            self.add_subscription(conn, request.topic, out);
        }
        Ok(Outcome::Now(ReplyFields::of(&reply)))
    }

    /// Puts a new entry in its topic and tells of it: the history (its
    /// join, and its ownership if it comes first), the holders of the
    /// entries it now stands ahead of, and the topic's subscribers, in one
    /// diff. A local track's entry has the topic's highest seq, so it stands
    /// ahead of nobody; another host's may not, if etcd's changes came out
    /// of order (a listing).
    fn join(&mut self, entry: Entry, meta_bytes: usize, at: i64, out: &mut Outbox) {
        let topic_name = entry.topic.clone();
        let seq = entry.seq;
        out.history(&entry, HistoryKind::Join, None, at);
        let owner_before = self.topic(&topic_name).owner().map(|owner| owner.seq);
        let owner_suspended_before = self.owner_suspended(self.topic(&topic_name));
        if owner_before.is_none_or(|owner| seq < owner) {
            out.history(&entry, HistoryKind::Owner, None, at);
        }
        self.insert(entry, meta_bytes);

        let topic = self.topic(&topic_name);
        let owner_suspended = self.owner_suspended(topic);
        let mut behind = topic
            .entries
            .range((Bound::Excluded(seq), Bound::Unbounded))
            .peekable();
        if behind.peek().is_some() {
            let first_position = topic.entries.range(..=seq).count();
            let moved = behind.enumerate().map(|(index, (_, entry))| {
                let position = first_position + index;
                let before = StandingKey {
                    position: position - 1,
                    owner_seq: owner_before.unwrap_or(seq),
                    suspended: owner_suspended_before && position == 1,
                };
                (&**entry, position, before)
            });
            let unheld_moved = tell_moved(&topic_name, topic, owner_suspended, moved, out);
            for (moved_seq, before) in unheld_moved {
                self.note_told_before(&topic_name, moved_seq, before);
            }
        }
        let topic = self.topic(&topic_name);
        // Most topics have no subscriber: no diff to build for nobody.
        if !(topic.subscribers.is_empty() && self.subscribed_to_all.is_empty())
            && let Some(joined) = topic.entries.get(&seq)
        {
            let mut diff = Diff::default();
            diff.joins.insert(
                joined.key.clone(),
                KeyPresence {
                    metas: vec![joined.to_meta()],
                },
            );
            self.publish_diff(&topic_name, diff, BTreeMap::new(), out);
        }
    }

    /// Removes the entries named. A local topic's entries leave at once.
    /// This host's entries of a shared topic are set leaving, and the reply
    /// waits until etcd's watch shows every one of their keys deleted;
    /// their holders hear of it then. Tracks of the key still waiting for
    /// etcd are cancelled, and count as removed.
    pub(crate) fn untrack(
        &mut self,
        conn: ConnId,
        request_id: &Value,
        request: UntrackRequest,
        now: i64,
        out: &mut Outbox,
    ) -> Result<Outcome, ErrorBody> {
        let refs = match (&request.phx_ref, &request.key) {
            (Some(phx_ref), _) => match self.entry(phx_ref) {
                Some(entry) if entry.topic == request.topic && !self.is_leaving(entry) => {
                    self.check_may_change(conn, entry)?;
                    vec![phx_ref.clone()]
                }
                _ => Vec::new(),
            },
            (None, Some(key)) => self
                .entries_with_key(&request.topic, key)
                .filter(|e| !self.is_leaving(e) && self.check_may_change(conn, e).is_ok())
                .map(|e| e.phx_ref.clone())
                .collect(),
            (None, None) => {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    "untrack needs `ref` or `key`",
                ));
            }
        };
        let local: Vec<String> = refs
            .iter()
            .filter(|phx_ref| self.entry(phx_ref).is_some_and(|e| !is_own_shared(e)))
            .cloned()
            .collect();
        if local.len() < refs.len() {
            self.check_room_to_wait(conn)?;
        }
        // Refused or not, nothing is changed before this point.
        let cancelled = match (&request.phx_ref, &request.key) {
            (None, Some(key)) => self.cancel_parked_key(conn, &request.topic, key, out),
            _ => 0,
        };
        let removed = refs.len() + cancelled;
        self.tell_holders_of_removal(conn, &local, LeaveReason::Untrack, out);
        self.remember_removals(conn, &refs, LeaveReason::Untrack, now);
        let leaving = refs
            .into_iter()
            .map(|r| (r, LeaveReason::Untrack))
            .collect();
        let deletes = self.remove_by(leaving, Some(conn), now, out);
        let reply = UntrackReply { removed };
        match self.park_untrack(conn, request_id, reply.clone(), &deletes, now) {
            Some(slot) => Ok(Outcome::Awaits(slot)),
            None => Ok(Outcome::Now(ReplyFields::of(&reply))),
        }
    }

    /// Tells each connection that holds one of `refs`, other than `conn`
    /// which is removing them, that its entry is gone and who removed it.
    /// Otherwise an editor whose entry root removed would go on believing
    /// it owns the topic, while the next in line is told it does too.
    /// Sent ahead of the topics' diffs, so that a holder that also watches
    /// the topic learns of its own loss first.
    fn tell_holders_of_removal(
        &self,
        conn: ConnId,
        refs: &[String],
        reason: LeaveReason,
        out: &mut Outbox,
    ) {
        let Some(remover) = self.actor(conn) else {
            return;
        };
        for entry in refs.iter().filter_map(|phx_ref| self.entry(phx_ref)) {
            let Some(holder) = entry.conn.filter(|holder| *holder != conn) else {
                continue;
            };
            let removed = removal_of(entry, reason, &remover);
            let event = Event::Removed {
                topic: removed.topic,
                payload: removed.removal,
            };
            out.event(vec![holder], event);
        }
    }

    /// Remembers, by their tokens, the entries of `refs` that `conn` is
    /// removing but does not hold, so that a `resume` of one of them says
    /// who removed it. This matters most for an entry no connection holds
    /// (restored after a restart, or a `process` entry whose connection
    /// closed), whose client no `removed` event can reach; it also covers
    /// a holder whose connection broke before its event got through.
    fn remember_removals(&mut self, conn: ConnId, refs: &[String], reason: LeaveReason, now: i64) {
        let Some(by) = self.actor(conn) else {
            return;
        };
        let tombstones: Vec<(TokenHash, Tombstone)> = refs
            .iter()
            .filter_map(|phx_ref| self.entry(phx_ref))
            .filter(|entry| entry.conn != Some(conn))
            .map(|entry| {
                let expires_at = now
                    .saturating_add(TOMBSTONE_MILLIS)
                    .max(entry.resume_deadline.unwrap_or(i64::MIN));
                let tombstone = Tombstone {
                    uid: entry.uid,
                    expires_at,
                    removed: removal_of(entry, reason, &by),
                };
                (entry.token_hash, tombstone)
            })
            .collect();
        if tombstones.is_empty() {
            return;
        }
        self.forget_tombstones_due(now);
        for (hash, tombstone) in tombstones {
            while self.tombstones.len() >= MAX_TOMBSTONES {
                let Some(evicted) = self.tombstone_to_evict_for(tombstone.uid) else {
                    break;
                };
                self.unbury(&evicted);
            }
            self.bury(hash, tombstone);
        }
    }

    /// Which remembered removal makes room for one of an entry of `uid`:
    /// the one to be forgotten soonest among that uid's entries, else the
    /// one to be forgotten soonest of all. The bound is the daemon's, but
    /// one user removing its own entries in a loop then pushes out only
    /// its own records, not the record of another user's entry that root
    /// removed, whose session would then find its token merely `expired`
    /// and track the entry again. Only reached with the table full, so a
    /// walk of at most [`MAX_TOMBSTONES`] records.
    fn tombstone_to_evict_for(&self, uid: u32) -> Option<TokenHash> {
        let same_uid = self
            .tombstones_by_expiry
            .iter()
            .map(|&(_, hash)| hash)
            .find(|hash| self.tombstones.get(hash).is_some_and(|t| t.uid == uid));
        same_uid.or_else(|| self.tombstones_by_expiry.first().map(|&(_, hash)| hash))
    }

    /// Forgets the removed entries remembered until `now` or earlier.
    fn forget_tombstones_due(&mut self, now: i64) {
        while let Some(&(expires_at, hash)) = self.tombstones_by_expiry.first() {
            if expires_at > now {
                break;
            }
            self.unbury(&hash);
        }
    }

    fn bury(&mut self, hash: TokenHash, tombstone: Tombstone) {
        if let Some(replaced) = self.tombstones.remove(&hash) {
            self.tombstones_by_expiry
                .remove(&(replaced.expires_at, hash));
        }
        self.tombstones_by_expiry
            .insert((tombstone.expires_at, hash));
        self.tombstones.insert(hash, tombstone);
        self.record(|| Undo::Buried(hash));
    }

    fn unbury(&mut self, hash: &TokenHash) {
        let Some(tombstone) = self.tombstones.remove(hash) else {
            return;
        };
        self.tombstones_by_expiry
            .remove(&(tombstone.expires_at, *hash));
        self.record(|| Undo::Unburied(*hash, Box::new(tombstone)));
    }

    /// Tells the connection that holds `updated`, unless that is `conn`
    /// which updated it, the entry's new ref and meta and who changed them.
    /// Otherwise the holder would go on naming the entry by a ref that no
    /// longer exists: it would miss a later `removed` event for it, and a
    /// client that reconnects would not know its own entry.
    fn tell_holder_of_update(&self, conn: ConnId, updated: &Entry, out: &mut Outbox) {
        let Some(holder) = updated.conn.filter(|holder| *holder != conn) else {
            return;
        };
        if let Some(by) = self.actor(conn) {
            tell_of_update(holder, by, updated, out);
        }
    }

    /// Who is acting through `conn`, as the holder of an entry it changes
    /// is told.
    fn actor(&self, conn: ConnId) -> Option<Actor> {
        let peer = &self.conns.get(&conn)?.peer;
        Some(Actor {
            uid: peer.uid,
            user: peer.user.clone(),
            pid: peer.pid,
        })
    }

    pub(crate) fn update(
        &mut self,
        conn: ConnId,
        request_id: &Value,
        request: UpdateRequest,
        now: i64,
        out: &mut Outbox,
    ) -> Result<Outcome, ErrorBody> {
        self.check_lease_for(&request.topic)?;
        let new_bytes = checked_meta_size(&request.meta, self.limits.max_meta_bytes)?;
        let old_ref = match (&request.phx_ref, &request.key) {
            (Some(phx_ref), _) => phx_ref.clone(),
            (None, Some(key)) => self.only_ref_for_key(conn, &request.topic, key)?,
            (None, None) => {
                return Err(ErrorBody::new(
                    ErrorCode::BadRequest,
                    "update needs `ref`, or `key` when this connection holds one entry for it",
                ));
            }
        };
        let (entry, old_bytes) = match self.located(&old_ref) {
            Some((entry, bytes)) if entry.topic == request.topic && !self.is_leaving(entry) => {
                (entry, bytes)
            }
            _ => {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("no entry `{old_ref}` on `{}`", request.topic),
                ));
            }
        };
        self.check_may_change(conn, entry)?;
        // Only growth is weighed: a user over the quota (it was lowered
        // across a restart) may still shrink a meta.
        if new_bytes > old_bytes {
            let held = self.usage(entry.uid).meta_bytes - old_bytes;
            self.check_meta_quota(entry.uid, held, new_bytes)?;
        }
        if is_own_shared(entry) {
            let update = cluster::UpdateAsked {
                conn,
                request_id: request_id.clone(),
                old_ref,
                meta: request.meta,
                meta_bytes: new_bytes,
            };
            return self.park_update(update, now, out).map(Outcome::Awaits);
        }

        let new_ref = ref_for(self.take_seq());
        let meta = request.meta;
        let revise = |entry: &mut Entry| {
            entry.phx_ref = new_ref.clone();
            entry.prev_ref = Some(old_ref.clone());
            entry.meta = meta;
        };
        if !self.revise(&old_ref, revise, new_bytes, Some(conn), now, out) {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no entry `{old_ref}`"),
            ));
        }
        Ok(Outcome::Now(ReplyFields::of(&UpdateReply {
            phx_ref: new_ref,
            prev_ref: old_ref,
        })))
    }

    /// Gives the entry `old_ref` a new version, made by `revise` (a new
    /// ref, a new meta), in the same place, and tells of it: the rows
    /// (for this host's entries), the history, its holder (unless `actor`,
    /// the connection that changed it, holds it), and the topic's
    /// subscribers, as a leave and a join with the reason `update`.
    /// `false` if there is no such entry.
    fn revise(
        &mut self,
        old_ref: &str,
        revise: impl FnOnce(&mut Entry),
        new_bytes: usize,
        actor: Option<ConnId>,
        now: i64,
        out: &mut Outbox,
    ) -> bool {
        let Some((mut entry, _)) = self.take(old_ref) else {
            return false;
        };
        let old_meta = entry.to_meta();
        revise(&mut entry);
        let new_meta = entry.to_meta();
        let (topic, key) = (entry.topic.clone(), entry.key.clone());
        if !entry.is_remote() {
            out.changes.push(Change::Delete(old_ref.to_owned()));
            out.changes.push(Change::Put(Box::new(entry.clone())));
        }
        out.history_of_update(&entry, &old_meta.client, now);
        if let Some(conn) = actor {
            self.tell_holder_of_update(conn, &entry, out);
        }
        self.insert(entry, new_bytes);

        let mut diff = Diff::default();
        diff.leaves.insert(
            key.clone(),
            KeyPresence {
                metas: vec![old_meta],
            },
        );
        diff.joins.insert(
            key,
            KeyPresence {
                metas: vec![new_meta],
            },
        );
        let reasons = BTreeMap::from([(old_ref.to_owned(), LeaveReason::Update)]);
        self.publish_diff(&topic, diff, reasons, out);
        true
    }

    /// The reply to `list`, as views: made into a line by the driver.
    pub(crate) fn list(&self, id: Value, topic: Option<String>) -> ReadView {
        match topic {
            Some(topic) => ReadView::ListTopic {
                id,
                view: self.view(&topic),
                topic,
            },
            None => ReadView::ListAll {
                id,
                topics: self.occupied_views(),
            },
        }
    }

    /// The reply to `get_by_key`, as a view of the topic: the entries
    /// under the key are picked out when the line is made.
    pub(crate) fn get_by_key(&self, id: Value, request: GetByKeyRequest) -> ReadView {
        ReadView::GetByKey {
            id,
            view: self.view(&request.topic),
            key: request.key,
        }
    }

    pub(crate) fn subscribe(
        &mut self,
        conn: ConnId,
        topic: String,
        out: &mut Outbox,
    ) -> Result<ReplyFields, ErrorBody> {
        validate_name("topic", &topic, self.limits.max_name_bytes)?;
        self.check_subscription_limit(conn, &topic)?;
        self.add_subscription(conn, topic, out);
        Ok(ReplyFields::none())
    }

    /// Adds the subscription and sends the topic's state. Nothing can come
    /// between the two: the registry is single-threaded.
    fn add_subscription(&mut self, conn: ConnId, topic: String, out: &mut Outbox) {
        if self.insert_subscription(conn, &topic) {
            // Only a new subscription is undone: subscribing twice must not
            // take away the first.
            self.record(|| Undo::Subscribed {
                conn,
                topic: topic.clone(),
            });
        }
        out.state(conn, &topic, self.view(&topic));
    }

    /// Subscribes the connection to every topic, and sends the state of
    /// each topic anyone is on, in topic order. Reads are open to every
    /// user (`list` shows everyone every topic), so this shows no more.
    /// Counts as one subscription against the limit: it adds no
    /// per-topic state.
    pub(crate) fn subscribe_all(&mut self, conn: ConnId, out: &mut Outbox) -> ReplyFields {
        let Some(connection) = self.conns.get_mut(&conn) else {
            return ReplyFields::none();
        };
        if !connection.subscribed_to_all {
            connection.subscribed_to_all = true;
            self.subscribed_to_all.insert(conn);
            self.record(|| Undo::SubscribedAll(conn));
        }
        let occupied = self.occupied_views();
        let topics = occupied.iter().map(|(name, _)| name.clone()).collect();
        for (topic, view) in occupied {
            out.state(conn, &topic, view);
        }
        ReplyFields::of(&SubscribeAllReply { topics })
    }

    /// Ends a subscription to every topic. Like `unsubscribe` of a topic,
    /// it succeeds whether or not there was one.
    pub(crate) fn unsubscribe_all(&mut self, conn: ConnId) {
        let Some(connection) = self.conns.get_mut(&conn) else {
            return;
        };
        if connection.subscribed_to_all {
            connection.subscribed_to_all = false;
            self.subscribed_to_all.remove(&conn);
            self.record(|| Undo::UnsubscribedAll(conn));
        }
    }

    /// Subscribes the connection, on both sides. Returns whether it was new.
    fn insert_subscription(&mut self, conn: ConnId, topic: &str) -> bool {
        if let Some(connection) = self.conns.get_mut(&conn) {
            connection.subscriptions.insert(topic.to_owned());
        }
        self.topic_mut(topic).subscribers.insert(conn)
    }

    /// Ends a subscription, on both sides (a closed connection has only the
    /// topic's side left).
    pub(crate) fn remove_subscription(&mut self, conn: ConnId, topic: &str) {
        if let Some(connection) = self.conns.get_mut(&conn) {
            connection.subscriptions.remove(topic);
        }
        let removed = self
            .topics
            .get_mut(topic)
            .is_some_and(|t| t.subscribers.remove(&conn));
        self.drop_topic_if_unused(topic);
        if removed {
            self.record(|| Undo::Unsubscribed {
                conn,
                topic: topic.to_owned(),
            });
        }
    }

    /// Gives the connection back the entries of `tokens`. Each resumed
    /// entry's standing is in the reply; the holder of one whose standing
    /// changed since it was last told (see `told_before`) is also sent a
    /// `role` event after the reply, as it would have been had it been
    /// connected.
    pub(crate) fn resume(
        &mut self,
        conn: ConnId,
        tokens: Vec<(String, TokenHash)>,
        now: i64,
        out: &mut Outbox,
    ) -> ReplyFields {
        let mut outcome = ResumeReply::default();
        let Some(uid) = self.conns.get(&conn).map(|c| c.peer.uid) else {
            return ReplyFields::of(&outcome);
        };
        for (token, hash) in tokens {
            match self.resume_one(conn, uid, &hash, now) {
                Resumption::Resumed {
                    topic,
                    phx_ref,
                    standing,
                    changed_while_away,
                } => {
                    if changed_while_away {
                        out.role(conn, topic, phx_ref.clone(), standing.clone());
                    }
                    outcome.roles.insert(phx_ref.clone(), standing);
                    outcome.refs.insert(token, phx_ref.clone());
                    outcome.resumed.push(phx_ref);
                }
                Resumption::Expired => outcome.expired.push(token),
                Resumption::Removed(removed) => {
                    outcome.removed.insert(token, removed);
                }
                Resumption::Refused(error) => {
                    outcome.refused.insert(token, error);
                }
            }
        }
        ReplyFields::of(&outcome)
    }

    /// Gives the connection the entry with this token, if it is free, of
    /// the connection's uid, and within the rules `track` applies.
    fn resume_one(&mut self, conn: ConnId, uid: u32, hash: &TokenHash, now: i64) -> Resumption {
        let resumable = self
            .by_token
            .get(hash)
            .and_then(|phx_ref| self.located(phx_ref))
            .filter(|(e, _)| e.uid == uid && e.conn.is_none());
        let Some((entry, meta_bytes)) = resumable else {
            let removed = self
                .tombstones
                .get(hash)
                .filter(|t| t.uid == uid && t.expires_at > now);
            return match removed {
                Some(tombstone) => Resumption::Removed(tombstone.removed.clone()),
                None => match self.parked_track_of_token(uid, hash) {
                    Some(error) => Resumption::Refused(error),
                    None => Resumption::Expired,
                },
            };
        };
        if let Err(error) = self.check_room_for(conn, &entry.topic, &entry.key) {
            return Resumption::Refused(error);
        }
        // A restored entry nobody has claimed since the restart is claimed
        // again here, within the quotas as a track would be: if they were
        // lowered across the restart, the entries past them expire. Any
        // other entry is already counted as held.
        if entry.resume_deadline.is_some() {
            let usage = self.usage(uid);
            let claimed = Claimed {
                total_entries: self.local_entry_count() - self.awaiting_resume.len(),
                entries: usage.entries - usage.awaiting_entries,
                meta_bytes: usage.meta_bytes - usage.awaiting_meta_bytes,
            };
            if let Err(error) = self.check_quotas(uid, &claimed, meta_bytes) {
                return Resumption::Refused(error);
            }
        }
        let phx_ref = entry.phx_ref.clone();
        let Some((mut entry, meta_bytes)) = self.take(&phx_ref) else {
            return Resumption::Expired;
        };
        entry.conn = Some(conn);
        entry.resume_deadline = None;
        let (topic, seq) = (entry.topic.clone(), entry.seq);
        self.insert(entry, meta_bytes);
        let last_told = self.forget_told(&topic, seq);
        let standing = self.standing_of(&topic, seq);
        let standing_now = self.standing_key_of(&topic, standing.position);
        Resumption::Resumed {
            topic,
            phx_ref,
            standing,
            changed_while_away: last_told.is_some_and(|last_told| last_told != standing_now),
        }
    }

    // -- removal, the one path by which entries leave ----------------------

    /// Removes entries, each for its reason, then tells each topic's
    /// subscribers in one diff and the holder of each remaining entry whose
    /// standing changed in one role event. This host's entries of shared
    /// topics are set leaving instead (see [`Registry::leave_shared`]), and
    /// go when etcd's watch shows their keys deleted.
    fn remove(&mut self, leaving: Vec<(String, LeaveReason)>, now: i64, out: &mut Outbox) {
        self.remove_by(leaving, None, now, out);
    }

    /// [`Registry::remove`], on behalf of the connection `remover` when a
    /// request removes them. Returns the shared entries set leaving, by key
    /// id, with the write of each one's delete.
    fn remove_by(
        &mut self,
        leaving: Vec<(String, LeaveReason)>,
        remover: Option<ConnId>,
        now: i64,
        out: &mut Outbox,
    ) -> Vec<(String, WriteId)> {
        let mut shared = Vec::new();
        let mut departing = Vec::new();
        for (phx_ref, reason) in leaving {
            match self.entry(&phx_ref) {
                // On its way out already: nothing more to do.
                Some(entry) if self.is_leaving(entry) => {}
                // Its key went with an ended lease: nothing in etcd
                // to delete, and no other host shows it. (A new key
                // asked for it meanwhile is withdrawn when it shows.)
                Some(entry) if is_own_shared(entry) && !self.key_is_gone(entry) => {
                    shared.push((phx_ref, reason))
                }
                Some(entry) => {
                    let left = (entry.topic.clone(), entry.seq);
                    self.note_left_unconfirmed(left, reason);
                    departing.push((phx_ref, reason))
                }
                None => {}
            }
        }
        let deletes = shared
            .into_iter()
            .filter_map(|(phx_ref, reason)| self.leave_shared(&phx_ref, reason, remover, out))
            .collect();
        self.depart(departing, now, out);
        deletes
    }

    /// Takes entries out of their topics for good, each for its reason,
    /// and tells of it: the rows, the history, one diff per topic, one
    /// role event for each remaining held entry whose standing changed.
    /// The one place entries leave: a local topic's when they are removed,
    /// a shared topic's when etcd's watch shows their keys deleted.
    fn depart(&mut self, departing: Vec<(String, LeaveReason)>, now: i64, out: &mut Outbox) {
        let mut by_topic: BTreeMap<String, Vec<(Entry, LeaveReason)>> = BTreeMap::new();
        let mut untracks = Vec::new();
        for (phx_ref, reason) in departing {
            let Some((entry, _)) = self.take(&phx_ref) else {
                continue;
            };
            if let Some(untrack) = self.end_leaving(&entry, out) {
                untracks.push(untrack);
            }
            self.forget_told(&entry.topic, entry.seq);
            out.changes.push(Change::Delete(phx_ref));
            by_topic
                .entry(entry.topic.clone())
                .or_default()
                .push((entry, reason));
        }
        for (topic_name, departed) in by_topic {
            self.announce_departures(&topic_name, departed, now, out);
        }
        for untrack in untracks {
            self.one_delete_shown(untrack, out);
        }
    }

    /// Tells of the departures from one topic, applied together: one diff,
    /// and one role event for each held entry behind the first to leave,
    /// whose position (and, if the owner left, owner and perhaps role)
    /// changed; the entries ahead of it stand as they stood. An entry no
    /// connection holds keeps what its holder was last told, for the
    /// `resume` that takes it back.
    fn announce_departures(
        &mut self,
        topic_name: &str,
        departed: Vec<(Entry, LeaveReason)>,
        now: i64,
        out: &mut Outbox,
    ) {
        let topic = self.topic(topic_name);
        let mut gone: Vec<u64> = departed.iter().map(|(entry, _)| entry.seq).collect();
        gone.sort_unstable();
        // Seqs only grow, so the owner changed exactly when an entry left
        // that sat below every remaining one.
        let owner_changed = match (topic.owner(), gone.first()) {
            (Some(owner), Some(&first_gone)) => first_gone < owner.seq,
            _ => false,
        };

        let mut diff = Diff::default();
        let mut reasons = BTreeMap::new();
        for (entry, reason) in &departed {
            out.history(entry, HistoryKind::Leave, Some(*reason), now);
            reasons.insert(entry.phx_ref.clone(), *reason);
            diff.leaves
                .entry(entry.key.clone())
                .or_default()
                .metas
                .push(entry.to_meta());
        }
        self.publish_diff(topic_name, diff, reasons, out);

        if owner_changed && let Some(owner) = topic.owner() {
            out.history(owner, HistoryKind::Owner, None, now);
        }
        let owner_suspended = self.owner_suspended(topic);
        let moved = topic.moved_behind(&gone);
        let unheld_moved = tell_moved(topic_name, topic, owner_suspended, moved, out);
        for (seq, before) in unheld_moved {
            self.note_told_before(topic_name, seq, before);
        }
        self.drop_topic_if_unused(topic_name);
    }

    /// Remembers what the holder of the entry with `seq` in `topic`, which
    /// no connection holds, was last told, unless an earlier change while
    /// it was unheld did already.
    fn note_told_before(&mut self, topic: &str, seq: u64, before: StandingKey) {
        let key = (topic.to_owned(), seq);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.told_before.entry(key) {
            slot.insert(before);
            self.record(|| Undo::ToldBefore((topic.to_owned(), seq), None));
        }
    }

    /// Forgets what the holder of the entry with `seq` in `topic` was last
    /// told, and returns it: the entry is held again, or gone.
    fn forget_told(&mut self, topic: &str, seq: u64) -> Option<StandingKey> {
        // Every removal passes here, and the map is nearly always empty:
        // spare them building the key.
        if self.told_before.is_empty() {
            return None;
        }
        let key = (topic.to_owned(), seq);
        let before = self.told_before.remove(&key)?;
        self.record(|| Undo::ToldBefore(key, Some(before)));
        Some(before)
    }

    // -- indexes ------------------------------------------------------------

    /// Puts an entry into every index; `meta_bytes` is the size of its
    /// meta, which was measured when the meta arrived.
    ///
    /// Another host's entry goes into its topic and `refs` only: its pid,
    /// uid and token are that host's, so a local process's exit must not
    /// end it, nor its user's quotas count it, nor a local token resume it.
    /// So does this host's entry of a shared topic on its way out: nothing
    /// here may touch it again, and it only keeps its place until etcd
    /// shows it gone.
    fn insert(&mut self, entry: Entry, meta_bytes: usize) {
        if let Some(shared) = &entry.cluster {
            self.shared_ids.insert(
                (entry.topic.clone(), shared.id.clone()),
                entry.phx_ref.clone(),
            );
        }
        self.refs.insert(
            entry.phx_ref.clone(),
            Location {
                topic: entry.topic.clone(),
                seq: entry.seq,
                meta_bytes,
            },
        );
        if entry.is_remote() {
            self.remote_entries += 1;
        }
        if entry.is_remote() || self.is_leaving(&entry) {
            let phx_ref = entry.phx_ref.clone();
            self.topic_mut(&entry.topic.clone()).insert_entry(entry);
            self.record(|| Undo::Inserted(phx_ref));
            return;
        }
        self.by_process
            .entry(entry.process)
            .or_default()
            .insert(entry.phx_ref.clone());
        self.by_token
            .insert(entry.token_hash, entry.phx_ref.clone());
        if let Some(deadline) = entry.resume_deadline {
            self.awaiting_resume
                .insert((deadline, entry.phx_ref.clone()));
        }
        self.usage_by_uid
            .entry(entry.uid)
            .or_default()
            .count(&entry, meta_bytes);
        if let Some(connection) = entry.conn.and_then(|c| self.conns.get_mut(&c)) {
            connection.entries.insert(entry.phx_ref.clone());
            connection
                .keys
                .insert((entry.topic.clone(), entry.key.clone()));
        }
        let phx_ref = entry.phx_ref.clone();
        self.topic_mut(&entry.topic.clone()).insert_entry(entry);
        self.record(|| Undo::Inserted(phx_ref));
    }

    /// Removes an entry from every index and returns it, with the size of
    /// its meta.
    fn take(&mut self, phx_ref: &str) -> Option<(Entry, usize)> {
        let location = self.refs.remove(phx_ref)?;
        let entry = self
            .topics
            .get_mut(&location.topic)?
            .remove_entry(location.seq)?;
        if let Some(shared) = &entry.cluster {
            self.shared_ids
                .remove(&(entry.topic.clone(), shared.id.clone()));
        }
        if entry.is_remote() {
            self.remote_entries -= 1;
        }
        if entry.is_remote() || self.is_leaving(&entry) {
            self.record(|| Undo::Taken(Box::new(entry.clone()), location.meta_bytes));
            return Some((entry, location.meta_bytes));
        }
        if let Some(refs) = self.by_process.get_mut(&entry.process) {
            refs.remove(phx_ref);
            if refs.is_empty() {
                self.by_process.remove(&entry.process);
            }
        }
        self.by_token.remove(&entry.token_hash);
        if let Some(deadline) = entry.resume_deadline {
            self.awaiting_resume.remove(&(deadline, phx_ref.to_owned()));
        }
        if let Some(usage) = self.usage_by_uid.get_mut(&entry.uid) {
            usage.uncount(&entry, location.meta_bytes);
            if usage.entries == 0 {
                self.usage_by_uid.remove(&entry.uid);
            }
        }
        if let Some(connection) = entry.conn.and_then(|c| self.conns.get_mut(&c)) {
            connection.entries.remove(phx_ref);
            connection
                .keys
                .remove(&(entry.topic.clone(), entry.key.clone()));
        }
        self.record(|| Undo::Taken(Box::new(entry.clone()), location.meta_bytes));
        Some((entry, location.meta_bytes))
    }

    /// A topic's entries under one key, in join order.
    fn entries_with_key<'a>(
        &'a self,
        topic: &str,
        key: &'a str,
    ) -> impl Iterator<Item = &'a Entry> + 'a {
        self.topic(topic)
            .entries
            .values()
            .map(|entry| &**entry)
            .filter(move |e| e.key == key)
    }

    fn entry(&self, phx_ref: &str) -> Option<&Entry> {
        self.located(phx_ref).map(|(entry, _)| entry)
    }

    /// The entry with this ref, and the size of its meta.
    fn located(&self, phx_ref: &str) -> Option<(&Entry, usize)> {
        let location = self.refs.get(phx_ref)?;
        let entry = self
            .topics
            .get(&location.topic)?
            .entries
            .get(&location.seq)?;
        Some((entry, location.meta_bytes))
    }

    // -- the journal ----------------------------------------------------------

    /// Journals the inverse of a change, if a batch is open. Changes go
    /// through `insert`, `take`, `close` and the subscription functions,
    /// which record them; nothing changes an entry in place, so every index
    /// is rebuilt by the same code on the way back.
    fn record(&mut self, undo: impl FnOnce() -> Undo) {
        if let Some(journal) = &mut self.journal {
            journal.undo.push(undo());
        }
    }

    fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Inserted(phx_ref) => {
                if let Some((entry, _)) = self.take(&phx_ref) {
                    self.drop_topic_if_unused(&entry.topic);
                }
            }
            Undo::Taken(entry, meta_bytes) => self.insert(*entry, meta_bytes),
            Undo::Closed(conn, connection) => {
                if connection.subscribed_to_all {
                    self.subscribed_to_all.insert(conn);
                }
                self.conns.insert(conn, connection);
            }
            Undo::SubscribedAll(conn) => {
                self.subscribed_to_all.remove(&conn);
                if let Some(connection) = self.conns.get_mut(&conn) {
                    connection.subscribed_to_all = false;
                }
            }
            Undo::UnsubscribedAll(conn) => {
                if let Some(connection) = self.conns.get_mut(&conn) {
                    connection.subscribed_to_all = true;
                    self.subscribed_to_all.insert(conn);
                }
            }
            Undo::ToldBefore(key, before) => {
                match before {
                    Some(before) => self.told_before.insert(key, before),
                    None => self.told_before.remove(&key),
                };
            }
            Undo::Buried(hash) => self.unbury(&hash),
            Undo::Unburied(hash, tombstone) => self.bury(hash, *tombstone),
            Undo::Subscribed { conn, topic } => self.remove_subscription(conn, &topic),
            Undo::Unsubscribed { conn, topic } => {
                self.insert_subscription(conn, &topic);
            }
            Undo::Pended(_)
            | Undo::Unpended(_)
            | Undo::Leaving(..)
            | Undo::Updating(..)
            | Undo::Untracking(..) => self.undo_parking(undo),
            Undo::Lease(_) | Undo::Requeue(..) => self.undo_fence(undo),
        }
    }

    /// The topic, or an empty one: a topic nobody is on or watches is not
    /// kept.
    fn topic(&self, name: &str) -> &Topic {
        static EMPTY: LazyLock<Topic> = LazyLock::new(Topic::default);
        self.topics.get(name).unwrap_or(&EMPTY)
    }

    fn topic_mut(&mut self, name: &str) -> &mut Topic {
        self.topics.entry(name.to_owned()).or_default()
    }

    fn drop_topic_if_unused(&mut self, name: &str) {
        if self
            .topics
            .get(name)
            .is_some_and(|t| t.entries.is_empty() && t.subscribers.is_empty())
        {
            self.topics.remove(name);
        }
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Sends a topic's subscribers a diff, with the owner after it.
    fn publish_diff(
        &self,
        topic_name: &str,
        diff: Diff,
        reasons: BTreeMap<String, LeaveReason>,
        out: &mut Outbox,
    ) {
        let topic = self.topic(topic_name);
        out.event(
            topic
                .subscribers
                .union(&self.subscribed_to_all)
                .copied()
                .collect(),
            Event::PresenceDiff {
                topic: topic_name.to_owned(),
                payload: diff,
                owner: topic.owner().map(Entry::to_owner),
                reasons,
            },
        );
    }

    // -- rules ---------------------------------------------------------------

    /// Only the entry's own connection may change it; a process entry may
    /// also be changed by its uid; root may change anything.
    fn check_may_change(&self, conn: ConnId, entry: &Entry) -> Result<(), ErrorBody> {
        // Uids are per host, and only the host that tracked an entry
        // writes its key: nobody here, root included, may change it.
        if entry.is_remote() {
            return Err(ErrorBody::new(
                ErrorCode::PermissionDenied,
                match host_of_ref(&entry.phx_ref) {
                    Some(host) => format!(
                        "entry `{}` belongs to host {host}; change it there",
                        entry.phx_ref
                    ),
                    None => format!("entry `{}` belongs to another host", entry.phx_ref),
                },
            ));
        }
        let uid = self.conns.get(&conn).map(|c| c.peer.uid);
        let allowed = entry.conn == Some(conn)
            || uid == Some(0)
            || (entry.lifetime == Lifetime::Process && uid == Some(entry.uid));
        if allowed {
            Ok(())
        } else {
            Err(ErrorBody::new(
                ErrorCode::PermissionDenied,
                format!(
                    "entry `{}` belongs to another {}",
                    entry.phx_ref,
                    if uid == Some(entry.uid) {
                        "connection"
                    } else {
                        "user"
                    }
                ),
            ))
        }
    }

    fn only_ref_for_key(&self, conn: ConnId, topic: &str, key: &str) -> Result<String, ErrorBody> {
        let connection = self.conns.get(&conn).ok_or_else(closed_connection)?;
        let mut held = connection
            .entries
            .iter()
            .filter_map(|phx_ref| self.entry(phx_ref))
            .filter(|e| e.topic == topic && e.key == key);
        match (held.next(), held.next()) {
            (Some(entry), None) => Ok(entry.phx_ref.clone()),
            (None, _) => Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("this connection holds no entry for key `{key}` on `{topic}`"),
            )),
            (Some(_), Some(_)) => Err(ErrorBody::new(
                ErrorCode::BadRequest,
                format!("several entries for key `{key}` on `{topic}`; name one by `ref`"),
            )),
        }
    }

    /// A connection may hold one more entry on (topic, key): it is under its
    /// entry limit and holds none for that key yet. `track` and `resume`
    /// both keep to this.
    fn check_room_for(&self, conn: ConnId, topic: &str, key: &str) -> Result<(), ErrorBody> {
        let connection = self.conns.get(&conn).ok_or_else(closed_connection)?;
        let limit = self.limits.max_entries_per_connection;
        if connection.entries.len() + connection.parked >= limit {
            return Err(ErrorBody::new(
                ErrorCode::LimitExceeded,
                format!("this connection already holds {limit} entries, the limit"),
            ));
        }
        if connection
            .keys
            .contains(&(topic.to_owned(), key.to_owned()))
        {
            return Err(ErrorBody::new(
                ErrorCode::AlreadyTracked,
                format!("key `{key}` is already tracked on `{topic}` by this connection"),
            ));
        }
        Ok(())
    }

    /// What `uid` holds now.
    fn usage(&self, uid: u32) -> Usage {
        self.usage_by_uid.get(&uid).copied().unwrap_or_default()
    }

    /// Whether `uid` may claim one more entry, whose meta is `bytes` long,
    /// on top of what is already `claimed`: the daemon's total cap binds
    /// everyone, the per-uid quotas all but the exempt uid.
    fn check_quotas(&self, uid: u32, claimed: &Claimed, bytes: usize) -> Result<(), ErrorBody> {
        let limits = &self.limits;
        if claimed.total_entries >= limits.max_total_entries {
            return Err(ErrorBody::new(
                ErrorCode::LimitExceeded,
                format!(
                    "the daemon already holds {} entries, the most it holds for all users \
                     together; `presence daemon --max-total-entries` raises it",
                    limits.max_total_entries
                ),
            ));
        }
        if self.uid_exempt_from_quotas == Some(uid) {
            return Ok(());
        }
        if claimed.entries >= limits.max_entries_per_uid {
            return Err(ErrorBody::new(
                ErrorCode::LimitExceeded,
                format!(
                    "uid {uid} already holds {} entries, the most one user may; \
                     `presence daemon --max-entries-per-uid` raises it",
                    limits.max_entries_per_uid
                ),
            ));
        }
        self.check_meta_quota(uid, claimed.meta_bytes, bytes)
    }

    /// Whether `uid`, holding `held` bytes of meta, may hold `adding` more.
    fn check_meta_quota(&self, uid: u32, held: usize, adding: usize) -> Result<(), ErrorBody> {
        let limit = self.limits.max_meta_bytes_per_uid;
        if self.uid_exempt_from_quotas == Some(uid) || held.saturating_add(adding) <= limit {
            return Ok(());
        }
        Err(ErrorBody::new(
            ErrorCode::LimitExceeded,
            format!(
                "uid {uid}'s metas take {held} bytes; {adding} more would pass the {limit} \
                 one user may hold; `presence daemon --max-meta-per-uid` raises it"
            ),
        ))
    }

    fn check_subscription_limit(&self, conn: ConnId, topic: &str) -> Result<(), ErrorBody> {
        let connection = self.conns.get(&conn).ok_or_else(closed_connection)?;
        let limit = self.limits.max_subscriptions_per_connection;
        if !connection.subscriptions.contains(topic) && connection.subscriptions.len() >= limit {
            return Err(ErrorBody::new(
                ErrorCode::LimitExceeded,
                format!("this connection already has {limit} subscriptions, the limit"),
            ));
        }
        Ok(())
    }
}

/// Tells the holder of each entry of `moved` (the entry, its position
/// now, and what decided its standing before) its new standing, in a
/// `role` event; returns the entries no connection holds, with what their
/// holders were last told, for the caller to note.
fn tell_moved<'a>(
    topic_name: &str,
    topic: &Topic,
    owner_suspended: bool,
    moved: impl Iterator<Item = (&'a Entry, usize, StandingKey)>,
    out: &mut Outbox,
) -> Vec<(u64, StandingKey)> {
    let mut unheld_moved = Vec::new();
    for (entry, position, before) in moved {
        let Some(conn) = entry.conn else {
            // Another host's entry is resumed there, if anywhere: no
            // `resume` here will ask what its holder was told.
            if !entry.is_remote() {
                unheld_moved.push((entry.seq, before));
            }
            continue;
        };
        let standing = topic.standing_at(position, owner_suspended);
        out.role(conn, topic_name.to_owned(), entry.phx_ref.clone(), standing);
    }
    unheld_moved
}

/// The ref of a new entry or a new version of one.
fn ref_for(seq: u64) -> String {
    format!("p{seq}")
}

/// The counter value a ref was made from: `p<N>` for a local topic's
/// entry, `<host>:p<N>` for a shared one's.
fn ref_number(phx_ref: &str) -> Option<u64> {
    let local = match phx_ref.split_once(':') {
        Some((host, local)) if !host.is_empty() => local,
        Some(_) => return None,
        None => phx_ref,
    };
    let digits = local.strip_prefix('p')?;
    // `parse` takes a leading `+`, which no ref of the counter has.
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Tells `holder` the entry's new ref and meta, and who changed them.
fn tell_of_update(holder: ConnId, by: Actor, updated: &Entry, out: &mut Outbox) {
    let Some(prev_ref) = updated.prev_ref.clone() else {
        return;
    };
    let event = Event::Updated {
        topic: updated.topic.clone(),
        payload: Revision {
            phx_ref: updated.phx_ref.clone(),
            prev_ref,
            key: updated.key.clone(),
            meta: updated.meta.clone(),
            by,
        },
    };
    out.event(vec![holder], event);
}

/// This host's entry of a shared topic: its changes are etcd's to make.
fn is_own_shared(entry: &Entry) -> bool {
    entry.cluster.as_ref().is_some_and(|shared| !shared.remote)
}

/// What the removal of `entry` by `by` says, both to its holder (as a
/// `removed` event) and, later, to a `resume` of its token.
fn removal_of(entry: &Entry, reason: LeaveReason, by: &Actor) -> RemovedEntry {
    RemovedEntry {
        topic: entry.topic.clone(),
        removal: Removal {
            phx_ref: entry.phx_ref.clone(),
            key: entry.key.clone(),
            reason,
            by: by.clone(),
        },
    }
}

/// A request raced with its connection's close; nobody will read the reply.
fn closed_connection() -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, "the connection is closing")
}

#[cfg(test)]
mod tests;
