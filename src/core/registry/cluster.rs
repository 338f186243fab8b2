//! What the registry keeps of a topic shared across hosts through etcd.
//!
//! A shared topic's entries sit in the same queue as a local topic's, with
//! each entry's seq being its key's create revision, which is the same
//! number on every host. An entry another host tracked is kept only so
//! that its place in the queue is known here: it belongs to no process,
//! connection or user of this host.
//!
//! This host's own entries of a shared topic change only as etcd's watch
//! shows them changed, so that every host sees one order: a track, an
//! update and a removal (an untrack, a close, an exit, an expiry) each ask
//! etcd for a write and wait, parked, until the watch shows it. A request
//! waiting so is answered then, or `unavailable` after the park timeout;
//! an entry being removed keeps its place until its key is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{
    Change, ConnId, Delivery, Entry, Event, Outbox, ProcessId, Registry, Undo, removal_of,
    tell_of_update,
};
use crate::protocol::{
    Actor, ErrorBody, ErrorCode, LeaveReason, Lifetime, OutgoingReply, ReplyFields, TrackReply,
    UntrackReply, UpdateReply, cluster_ref, host_of_ref, meta_size, validate_name,
};

/// Marks an entry of a shared topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// The id of the entry's etcd key: the ref it was tracked with,
    /// `HOST:pN`, which an update of the entry does not change.
    pub id: String,
    /// Another host tracked it: its pid, uid and token are that host's,
    /// and mean nothing here.
    pub remote: bool,
    /// For this host's entry, the lease its key was last shown on by
    /// etcd's watch (or a listing); `None` before its key was shown. The
    /// entry owns only while that is the live lease (see
    /// `Registry::suspends_as_owner`).
    pub key_lease: Option<i64>,
}

/// Which topics are shared across hosts: asked of a topic's name, as the
/// daemon's `--cluster-topics` patterns answer. A function rather than the
/// patterns themselves, so that the registry names nothing of the io
/// layer that matches them.
#[derive(Clone)]
pub struct SharedTopicsFn(pub Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl SharedTopicsFn {
    pub fn new(shares: impl Fn(&str) -> bool + Send + Sync + 'static) -> SharedTopicsFn {
        SharedTopicsFn(Arc::new(shares))
    }

    pub fn shares(&self, topic: &str) -> bool {
        (self.0)(topic)
    }
}

impl std::fmt::Debug for SharedTopicsFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedTopicsFn(..)")
    }
}

/// How long a request of a shared topic waits for etcd by default before
/// it is answered `unavailable`: the default lease TTL. A daemon whose
/// etcd does not answer for that long has fenced itself anyway, and a
/// client told nothing for longer would take the daemon for hung.
pub const DEFAULT_PARK_TIMEOUT: Duration = Duration::from_secs(5);

/// How many replies to one connection may wait for etcd at once.
pub const MAX_WAITING_PER_CONNECTION: usize = 32;

/// How this daemon takes part in a cluster: its own host name, which its
/// entries' refs carry (`HOST:pN`), and which topics are shared.
#[derive(Debug, Clone)]
pub struct ClusterSetup {
    pub host: String,
    pub shared: SharedTopicsFn,
    /// How long a `track`, `update` or `untrack` of a shared topic waits
    /// for etcd's watch to show what it asked before it is answered
    /// `unavailable`. What it asked may still happen later: a track's key
    /// that shows after is deleted, an update or untrack that shows is
    /// applied, and the entry's holder told.
    pub park_timeout: Duration,
}

impl ClusterSetup {
    /// This host's setup, with the default park timeout.
    pub fn new(host: impl Into<String>, shared: SharedTopicsFn) -> ClusterSetup {
        ClusterSetup {
            host: host.into(),
            shared,
            park_timeout: DEFAULT_PARK_TIMEOUT,
        }
    }

    pub fn shares(&self, topic: &str) -> bool {
        self.shared.shares(topic)
    }
}

/// An entry's etcd value as the io layer decoded it. Untrusted: another
/// host wrote it, and the registry checks what it relies on.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedRecord {
    pub key: String,
    pub phx_ref: String,
    pub phx_ref_prev: Option<String>,
    pub meta: Map<String, Value>,
    pub joined_at: i64,
    pub pid: u32,
    pub uid: u32,
    pub user: String,
    pub host: String,
    pub lifetime: Lifetime,
    /// The value decoded and kept within this daemon's limits. One that
    /// did not still holds its key's place, with an empty meta: hosts may
    /// run with different limits, and an entry dropped on some hosts only
    /// would give those hosts another owner.
    pub readable: bool,
}

/// One change to an entry key of a shared topic, as etcd's watch showed it.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterEvent {
    /// The key was created (or rewritten, keeping its create revision).
    Put {
        topic: String,
        /// The key's id: the ref the entry was tracked with, `HOST:pN`.
        id: String,
        /// The key's create revision: the entry's seq, the same on every
        /// host.
        create_revision: u64,
        /// The lease the key is on (etcd's `kv.lease`, 0 for none). One of
        /// this host's keys owns only on the live lease: on any other, it
        /// may go at any moment, and its place with it.
        lease: i64,
        record: SharedRecord,
    },
    /// The key was deleted: with the reason its host wrote beside the
    /// delete, or none if the key went with its host's lease.
    Delete {
        topic: String,
        id: String,
        reason: Option<(LeaveReason, Option<Actor>)>,
    },
}

/// What one etcd watch message (or listing) changed, in revision order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterChanges {
    /// The revision the changes bring the mirror to.
    pub revision: u64,
    pub events: Vec<ClusterEvent>,
}

/// What became of a [`ClusterChanges`]: how many events were applied, and
/// how many were ignored, by cause, for the caller to log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClusterReport {
    pub applied: usize,
    /// Of a topic this daemon does not share.
    pub not_shared: usize,
    /// Naming this host's own entries in a way that neither a request
    /// here waits for nor the entry as shown explains (a version of an
    /// entry that no update here waits for). A key of this host's that
    /// nothing claims at all is not counted here: it is deleted.
    pub own_host: usize,
    /// With an id that names no host (`HOST:pN`).
    pub bad_id: usize,
    /// Of a new key whose create revision another key of its topic holds
    /// already, or whose ref another entry holds.
    pub place_taken: usize,
    /// A new key past the cap on other hosts' entries.
    pub over_cap: usize,
    /// Applied, but kept with an empty meta: the value did not decode or
    /// broke one of this daemon's limits.
    pub unreadable: usize,
}

impl ClusterReport {
    /// How many events were ignored.
    pub fn ignored(&self) -> usize {
        self.not_shared + self.own_host + self.bad_id + self.place_taken + self.over_cap
    }
}

impl Registry {
    /// Applies what etcd's watch showed of other hosts' entries, in
    /// order: a new key joins its topic at its create revision, a
    /// rewritten one is an update in place, a deleted one leaves. Each
    /// event makes the diff, role events and history rows a local change
    /// of the same kind makes, through the same code; a run of deletes
    /// leaves together, one diff per topic (a lost host's keys all go in
    /// one revision). Other hosts' entries are never rows here: only their
    /// history is saved. This host's own keys are read apart (see
    /// [`Registry::apply_own`]): they answer what its requests asked.
    /// Then the changes say which keys etcd created earlier are gone
    /// ([`Registry::shown_up_to`]).
    ///
    /// Ignored, and counted in the report: events of topics this daemon
    /// does not share; of
    /// this host's own ids that nothing here waits for; of ids naming no
    /// host; of a new key whose
    /// create revision or ref another entry of the topic holds; of new
    /// keys past the cap on other hosts' entries (`max_total_entries` of
    /// them, a bound on memory that another host's load cannot pass).
    pub fn apply_cluster(
        &mut self,
        changes: &ClusterChanges,
        now: i64,
        out: &mut Outbox,
    ) -> ClusterReport {
        let mut report = ClusterReport::default();
        let mut departing: Vec<(String, LeaveReason)> = Vec::new();
        for event in &changes.events {
            let (topic, id) = match event {
                ClusterEvent::Put { topic, id, .. } | ClusterEvent::Delete { topic, id, .. } => {
                    (topic, id)
                }
            };
            if self.is_shared(topic) && self.is_own_id(id) {
                self.apply_own(event, &mut departing, now, out, &mut report);
                continue;
            }
            if let Some(ignored) = self.ignored_count(&mut report, topic, id) {
                *ignored += 1;
                continue;
            }
            match event {
                ClusterEvent::Delete { reason, .. } => {
                    let Some(phx_ref) = self.shared_ids.get(&(topic.clone(), id.clone())) else {
                        // Its put was ignored, or it came and went before
                        // this daemon looked.
                        continue;
                    };
                    let reason = reason.as_ref().map_or(LeaveReason::HostLost, |r| r.0);
                    departing.push((phx_ref.clone(), reason));
                    report.applied += 1;
                }
                ClusterEvent::Put {
                    create_revision,
                    record,
                    ..
                } => {
                    // What is applied next must see the deletes before it.
                    self.depart(std::mem::take(&mut departing), now, out);
                    let put = RemotePut {
                        topic,
                        id,
                        create_revision: *create_revision,
                        record,
                    };
                    self.put_remote(put, now, out, &mut report);
                }
            }
        }
        self.depart(departing, now, out);
        self.shown_up_to(changes.revision, out);
        report
    }

    /// Whether a key's id names this host (`HOST:pN`): only this host
    /// writes such keys.
    pub(super) fn is_own_id(&self, id: &str) -> bool {
        let own_host = self.cluster.as_ref().map(|c| c.host.as_str());
        own_host.is_some() && host_of_ref(id) == own_host
    }

    /// An event of one of this host's own keys, of a shared topic: the one
    /// place they are read. A put shows a waiting track's key (its entry
    /// joins) or a waiting update's new version (the entry changes); a
    /// delete shows a leaving entry gone (it leaves, for the reason it was
    /// removed for). A delete of a key never shown here changes nothing.
    /// A key that nothing here claims is deleted; anything else is counted
    /// as not applied.
    fn apply_own(
        &mut self,
        event: &ClusterEvent,
        departing: &mut Vec<(String, LeaveReason)>,
        now: i64,
        out: &mut Outbox,
        report: &mut ClusterReport,
    ) {
        match event {
            ClusterEvent::Put {
                topic,
                id,
                create_revision,
                lease,
                record,
            } => {
                let key = (topic.clone(), id.clone());
                if self.pending.contains_key(&key) {
                    // What is applied next must see the deletes before it.
                    self.depart(std::mem::take(departing), now, out);
                    self.put_own(&key, *create_revision, *lease, now, out);
                    report.applied += 1;
                    return;
                }
                let updated = self
                    .updating
                    .get(id)
                    .is_some_and(|update| update.new_ref == record.phx_ref);
                if updated {
                    self.depart(std::mem::take(departing), now, out);
                    self.show_update(id, now, out);
                    self.note_key_lease(&key, *lease, out);
                    report.applied += 1;
                    return;
                }
                let shown = self
                    .shared_ids
                    .get(&key)
                    .and_then(|phx_ref| self.entry(phx_ref));
                let as_shown = shown.is_some_and(|entry| {
                    self.is_leaving(entry)
                        || (entry.seq == *create_revision && entry.phx_ref == record.phx_ref)
                });
                if as_shown {
                    // The version shown, written again (moved to another
                    // lease), or an update its entry's leave overtook: the
                    // entry stays as it is shown until it goes, on the
                    // lease its key is on now.
                    self.depart(std::mem::take(departing), now, out);
                    self.note_key_lease(&key, *lease, out);
                    return;
                }
            }
            ClusterEvent::Delete { topic, id, .. } => {
                let key = (topic.clone(), id.clone());
                let Some(phx_ref) = self.shared_ids.get(&key) else {
                    // Never shown here: the key of a track given up (its
                    // connection closed, or it waited too long), deleted
                    // as it asked. Nothing is left to do.
                    return;
                };
                if let Some(leaving) = self.leaving.get(id) {
                    departing.push((phx_ref.clone(), leaving.reason));
                    report.applied += 1;
                    return;
                }
            }
        }
        // Not asked for by a request: a key that went with an ended lease,
        // or the new key of an entry queued again after that.
        if self.apply_own_lost_key(event, departing, now, out) {
            report.applied += 1;
            return;
        }
        // Only a key on this daemon's own lease: the host name is claimed
        // on that lease, so the key is this daemon's. One on another lease
        // may be another daemon's, given the same --host by mistake while
        // it waits out this one's claim; it is left to that lease.
        if let ClusterEvent::Put {
            topic, id, lease, ..
        } = event
            && self.lease.lease() == Some(*lease)
            && !self.shared_ids.contains_key(&(topic.clone(), id.clone()))
        {
            self.delete_unclaimed(topic, id, out);
            report.applied += 1;
            return;
        }
        report.own_host += 1;
    }

    /// A key of this host's that nothing here claims showed: no track
    /// waits for it, and no entry has it (the create of a track answered
    /// `unavailable` that etcd committed after all, say). Left, it would
    /// hold its place on every other host for as long as this daemon
    /// runs, owning the topic there for nobody; so it is deleted, as the
    /// first listing deletes the keys nothing claims.
    fn delete_unclaimed(&mut self, topic: &str, id: &str, out: &mut Outbox) {
        tracing::warn!(
            "cluster: this host's key `{id}` of `{topic}` showed, but nothing here claims it; \
             it is deleted"
        );
        let key = (topic.to_owned(), id.to_owned());
        self.ask_delete(key, LeaveReason::Untrack, None, out);
    }

    /// The report's count an event of `id` on `topic` is ignored for, if
    /// it is.
    fn ignored_count<'a>(
        &self,
        report: &'a mut ClusterReport,
        topic: &str,
        id: &str,
    ) -> Option<&'a mut usize> {
        if !self.is_shared(topic) {
            return Some(&mut report.not_shared);
        }
        match host_of_ref(id) {
            None => Some(&mut report.bad_id),
            Some(_) => None,
        }
    }

    /// A put of another host's key: a new entry, a new version of a known
    /// one, or nothing if the record is the one already shown.
    fn put_remote(
        &mut self,
        put: RemotePut<'_>,
        now: i64,
        out: &mut Outbox,
        report: &mut ClusterReport,
    ) {
        let RemotePut {
            topic,
            id,
            create_revision,
            ..
        } = put;
        let known = self
            .shared_ids
            .get(&(topic.to_owned(), id.to_owned()))
            .and_then(|phx_ref| self.located(phx_ref))
            .map(|(entry, _)| (entry.phx_ref.clone(), entry.seq));
        let Some((old_ref, seq)) = known else {
            self.join_remote(put, now, out, report);
            return;
        };
        if seq != create_revision {
            // The key was deleted and created again, and this daemon did
            // not see the delete (a gap in the watch, or its host lost its
            // lease and queued the entry again). To every host that saw
            // the delete, the entry left for `host_lost` and came back at
            // the back of the queue: say the same here.
            self.depart(vec![(old_ref, LeaveReason::HostLost)], now, out);
            self.join_remote(put, now, out, report);
            return;
        }
        let (entry, meta_bytes, readable) = self.remote_entry(put, Some(&old_ref));
        let Some(entry) = entry else {
            report.place_taken += 1;
            return;
        };
        if entry.phx_ref == old_ref {
            // The same version written again (its host moved it to another
            // lease): the entry is as shown. Every new version has a new
            // ref, and a leave and a join under one ref would read as the
            // entry gone to a client that applies the join first.
            return;
        }
        report.applied += 1;
        report.unreadable += usize::from(!readable);
        self.revise(&old_ref, |shown| *shown = entry, meta_bytes, None, now, out);
    }

    /// A new key of another host: its entry joins its topic.
    fn join_remote(
        &mut self,
        put: RemotePut<'_>,
        now: i64,
        out: &mut Outbox,
        report: &mut ClusterReport,
    ) {
        let RemotePut {
            topic,
            create_revision,
            ..
        } = put;
        if self.remote_entries >= self.limits.max_total_entries {
            report.over_cap += 1;
            return;
        }
        // Two keys of a topic cannot share a create revision unless a
        // writer other than presenced made them in one transaction: the
        // first keeps the place.
        if self.topic(topic).entries.contains_key(&create_revision) {
            report.place_taken += 1;
            return;
        }
        let (entry, meta_bytes, readable) = self.remote_entry(put, None);
        let Some(entry) = entry else {
            report.place_taken += 1;
            return;
        };
        report.applied += 1;
        report.unreadable += usize::from(!readable);
        self.join(entry, meta_bytes, now, out);
    }

    /// The entry a record of another host's key makes, with its meta's size
    /// and whether the record was readable; `None` if the ref it would be
    /// filed by is another entry's (`current` is its own ref now, if it is
    /// shown already).
    ///
    /// The record is untrusted. Its ref must be of the id's host, or the
    /// id stands for it: refs index every entry here, and a ref of another
    /// host (this one's own, say) would take that entry's place in the
    /// index. A record that did not decode or breaks this daemon's limits
    /// keeps its place with an empty meta, under the id as its key if its
    /// own key is not one this daemon takes.
    fn remote_entry(
        &self,
        put: RemotePut<'_>,
        current: Option<&str>,
    ) -> (Option<Entry>, usize, bool) {
        let RemotePut {
            topic,
            id,
            create_revision,
            record,
        } = put;
        let limits = &self.limits;
        let meta_bytes = meta_size(&record.meta);
        let key_ok = validate_name("key", &record.key, limits.max_name_bytes).is_ok();
        let readable = record.readable && key_ok && meta_bytes <= limits.max_meta_bytes;
        let ref_ok = |phx_ref: &str| {
            host_of_ref(phx_ref).is_some()
                && host_of_ref(phx_ref) == host_of_ref(id)
                && (Some(phx_ref) == current || !self.refs.contains_key(phx_ref))
        };
        let phx_ref = if readable && ref_ok(&record.phx_ref) {
            record.phx_ref.clone()
        } else if ref_ok(id) {
            id.to_owned()
        } else {
            return (None, 0, false);
        };
        let (key, meta, meta_bytes, user, prev_ref) = if readable {
            (
                record.key.clone(),
                record.meta.clone(),
                meta_bytes,
                record.user.clone(),
                record.phx_ref_prev.clone(),
            )
        } else {
            let key = if key_ok {
                record.key.clone()
            } else {
                id.to_owned()
            };
            (key, Map::new(), 0, String::new(), None)
        };
        let entry = Entry {
            topic: topic.to_owned(),
            key,
            seq: create_revision,
            phx_ref,
            prev_ref,
            meta,
            joined_at: record.joined_at,
            // Another host's process: never filed by process here, so no
            // local exit can end it.
            process: ProcessId {
                pid: record.pid,
                start_time: 0,
            },
            uid: record.uid,
            user,
            lifetime: record.lifetime,
            // Filed by no token: no local resume can claim it.
            token_hash: [0; 32],
            conn: None,
            resume_deadline: None,
            cluster: Some(Shared {
                id: id.to_owned(),
                remote: true,
                key_lease: None,
            }),
        };
        (Some(entry), meta_bytes, readable)
    }
}

/// A put of another host's key, as [`Registry::apply_cluster`] reads it.
#[derive(Clone, Copy)]
struct RemotePut<'a> {
    topic: &'a str,
    id: &'a str,
    create_revision: u64,
    record: &'a SharedRecord,
}

/// Names one write to etcd the core handed out, so that its outcome can
/// be told back ([`Written`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// A write to etcd the core asks for, handed out by
/// `Core::poll_cluster_write` once the batch that made it is committed.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterWrite {
    /// Create the entry key `id` of `topic`, only if absent, on this
    /// daemon's lease, with `record` as its value. Its outcome comes back
    /// as [`Written`]; the entry is shown when the watch shows the key.
    Create {
        write: WriteId,
        topic: String,
        id: String,
        record: SharedRecord,
    },
    /// Rewrite the entry key `id` of `topic` with `record` (an update:
    /// a new ref and meta), only if the key still exists, keeping its
    /// create revision and so its place. Its outcome comes back as
    /// [`Written`]; the new version is shown when the watch shows it.
    Rewrite {
        write: WriteId,
        topic: String,
        id: String,
        record: SharedRecord,
    },
    /// Delete the entry key `id` of `topic`, writing `reason` (and who
    /// removed it, when another connection did) beside it. Sent until
    /// etcd answers, or the lease it is on is gone (and the key with it);
    /// the watch shows the delete.
    Delete {
        write: WriteId,
        topic: String,
        id: String,
        reason: LeaveReason,
        by: Option<Actor>,
    },
    /// Move the entry key `id` of `topic`, this host's entry last shown
    /// on another lease than the live one (restored after a restart and
    /// found in the first listing on the hand-over lease, which ends after
    /// the resume grace), to this daemon's live lease, keeping its value
    /// and create revision. A key already on the live lease is left as it
    /// is. Nothing is told back: the watch shows the same record on the
    /// live lease, from which the entry may own, and a key gone meanwhile
    /// shows as a delete with no reason, as after a lost lease. Asked
    /// again each time the lease becomes live while the key is not shown
    /// there.
    Adopt {
        write: WriteId,
        topic: String,
        id: String,
    },
}

/// What became of a [`ClusterWrite::Create`] or a
/// [`ClusterWrite::Rewrite`].
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// etcd created the key at this revision.
    Created { revision: u64 },
    /// etcd rewrote the key at this revision.
    Rewritten { revision: u64 },
    /// It was not written; the request that asked for it fails with this.
    Refused(ErrorBody),
}

/// What the io layer tells the core of etcd.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterInput {
    /// One watch message, or a relisting after the watch fell behind.
    Changes(ClusterChanges),
    /// The first listing of the cluster prefix, each key a put: what etcd
    /// holds when this daemon starts to look, which settles the entries a
    /// restart restored (see [`Registry::apply_listing`]).
    Listing(ClusterChanges),
    /// The outcome of a write the core handed out.
    Written { write: WriteId, outcome: Written },
    /// Where this daemon's lease stands, on every change.
    Lease(LeaseView),
}

/// Where this daemon's etcd lease stands, as the core is told it. Times
/// are on the boot clock ([`crate::core::Now::boot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseView {
    /// Held: etcd keeps the lease, and every key on it, at least until
    /// the fence falls at `fence_at`. The core fences itself at that
    /// moment even if it hears nothing more.
    Live {
        /// The lease's id, as etcd granted it: a view naming another id
        /// than the last says the lease this host's keys were on ended.
        lease: i64,
        fence_at: std::time::Duration,
    },
    /// The fence fell: etcd may end the lease at any moment and give this
    /// host's places to others. No local entry of a shared topic owns.
    Fenced { lease: i64 },
    /// No lease: none granted yet, or the last one ended (its keys went
    /// with it) and a new one is asked for.
    Granting,
    /// The lease is no longer kept (the daemon is stopping, or etcd
    /// grants another TTL than the one configured).
    Stopped,
}

impl ClusterWrite {
    /// The topic and id of the entry key the write is to.
    pub fn key(&self) -> (&str, &str) {
        match self {
            ClusterWrite::Create { topic, id, .. }
            | ClusterWrite::Rewrite { topic, id, .. }
            | ClusterWrite::Delete { topic, id, .. }
            | ClusterWrite::Adopt { topic, id, .. } => (topic, id),
        }
    }
}

impl LeaseView {
    /// The view as it stands at `boot` on the boot clock: a live lease
    /// whose fence is due is fenced, whatever the word it came in says.
    /// A standing worked out from it must never say owner past the fence.
    pub fn as_of(self, boot: std::time::Duration) -> LeaseView {
        match self {
            LeaseView::Live { lease, fence_at } if boot >= fence_at => LeaseView::Fenced { lease },
            view => view,
        }
    }

    /// The lease this view names, if it names one: the lease this host's
    /// keys are on while it is live or fenced.
    pub fn lease(self) -> Option<i64> {
        match self {
            LeaseView::Live { lease, .. } | LeaseView::Fenced { lease } => Some(lease),
            LeaseView::Granting | LeaseView::Stopped => None,
        }
    }
}

/// A topic and a key id: an entry of a shared topic.
type KeyOf = (String, String);

/// The tracks of shared topics waiting for etcd, by topic and key id, with
/// what finds them without a look at every one: a client may leave
/// thousands waiting (each close leaves its connection's tracks waiting,
/// cancelled, until etcd answers), and each answer, watch message, time
/// out, close or exit must not cost a scan of them all.
#[derive(Debug, Clone, Default)]
pub(super) struct PendingTracks {
    by_key: BTreeMap<KeyOf, PendingTrack>,
    /// By the write that asked for each key.
    by_write: BTreeMap<WriteId, KeyOf>,
    /// Those not cancelled, by connection, by process, and by uid and
    /// token: what a close, an exit and a resume look for.
    by_conn: BTreeMap<ConnId, BTreeSet<KeyOf>>,
    by_process: BTreeMap<ProcessId, BTreeSet<KeyOf>>,
    by_token: BTreeMap<(u32, [u8; 32]), KeyOf>,
    /// Those etcd created, by create revision: what a watch gone past
    /// their revision did not show.
    by_created: BTreeSet<(u64, KeyOf)>,
}

impl PendingTracks {
    pub(super) fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    pub(super) fn contains_key(&self, key: &KeyOf) -> bool {
        self.by_key.contains_key(key)
    }

    pub(super) fn get(&self, key: &KeyOf) -> Option<&PendingTrack> {
        self.by_key.get(key)
    }

    #[cfg(test)]
    pub(super) fn values(&self) -> impl Iterator<Item = &PendingTrack> {
        self.by_key.values()
    }

    /// The tracks of `topic`.
    fn in_topic<'a>(
        &'a self,
        topic: &'a str,
    ) -> impl Iterator<Item = (&'a KeyOf, &'a PendingTrack)> + 'a {
        self.by_key
            .range((topic.to_owned(), String::new())..)
            .take_while(move |((of, _), _)| of == topic)
    }

    fn of_write(&self, write: WriteId) -> Option<&KeyOf> {
        self.by_write.get(&write)
    }

    /// The tracks of `conn` not cancelled.
    fn of_conn(&self, conn: ConnId) -> Vec<KeyOf> {
        self.by_conn
            .get(&conn)
            .map_or_else(Vec::new, |keys| keys.iter().cloned().collect())
    }

    /// The tracks of `process` not cancelled.
    fn of_process(&self, process: ProcessId) -> Vec<KeyOf> {
        self.by_process
            .get(&process)
            .map_or_else(Vec::new, |keys| keys.iter().cloned().collect())
    }

    /// The track not cancelled of `uid` holding the token of `hash`.
    fn of_token(&self, uid: u32, hash: &[u8; 32]) -> Option<&PendingTrack> {
        let key = self.by_token.get(&(uid, *hash))?;
        self.by_key.get(key)
    }

    /// The tracks etcd created at or below `revision`.
    fn created_up_to(&self, revision: u64) -> Vec<KeyOf> {
        self.by_created
            .iter()
            .take_while(|(created, _)| *created <= revision)
            .map(|(_, key)| key.clone())
            .collect()
    }

    fn insert(&mut self, key: KeyOf, pending: PendingTrack) {
        self.remove(&key);
        self.by_write.insert(pending.write, key.clone());
        if pending.cancelled.is_none() {
            let entry = &pending.track.entry;
            self.by_conn
                .entry(pending.track.conn)
                .or_default()
                .insert(key.clone());
            self.by_process
                .entry(entry.process)
                .or_default()
                .insert(key.clone());
            self.by_token
                .insert((entry.uid, entry.token_hash), key.clone());
        }
        if let Some(created) = pending.created {
            self.by_created.insert((created, key.clone()));
        }
        self.by_key.insert(key, pending);
    }

    fn remove(&mut self, key: &KeyOf) -> Option<PendingTrack> {
        let pending = self.by_key.remove(key)?;
        self.by_write.remove(&pending.write);
        if pending.cancelled.is_none() {
            let entry = &pending.track.entry;
            remove_from(&mut self.by_conn, &pending.track.conn, key);
            remove_from(&mut self.by_process, &entry.process, key);
            if self.by_token.get(&(entry.uid, entry.token_hash)) == Some(key) {
                self.by_token.remove(&(entry.uid, entry.token_hash));
            }
        }
        if let Some(created) = pending.created {
            self.by_created.remove(&(created, key.clone()));
        }
        Some(pending)
    }
}

/// Takes `key` out of the set filed under `of`, and the set once empty.
fn remove_from<K: Ord>(index: &mut BTreeMap<K, BTreeSet<KeyOf>>, of: &K, key: &KeyOf) {
    if let Some(keys) = index.get_mut(of) {
        keys.remove(key);
        if keys.is_empty() {
            index.remove(of);
        }
    }
}

/// A track of a shared topic waiting for etcd: its key is asked for, and
/// its entry joins when the watch shows the key. Until then it counts
/// against its connection's keys and its user's quotas as its entry will.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PendingTrack {
    pub(super) write: WriteId,
    /// The track as it was parked.
    pub(super) track: Parked,
    /// The create revision etcd answered with, if it has.
    pub(super) created: Option<u64>,
    /// Its connection closed first, for this reason: the key, once shown,
    /// is deleted rather than shown here.
    pub(super) cancelled: Option<LeaveReason>,
    /// When it is answered `unavailable` unless its key shows first (wall
    /// clock, ms); `None` once it is answered (it is cancelled).
    pub(super) deadline: Option<i64>,
}

/// This host's entry of a shared topic on its way out: the delete of its
/// key is asked of etcd, and the entry keeps its place, held by nobody and
/// filed nowhere but in its topic, until the watch shows the delete.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Leaving {
    pub(super) reason: LeaveReason,
    /// Who removed it, when another connection than its holder did: its
    /// holder is told so once it is gone.
    pub(super) by: Option<Actor>,
    /// The connection that held it.
    pub(super) holder: Option<ConnId>,
    /// The untrack whose reply waits for this delete, by the write that
    /// names its reply.
    pub(super) untrack: Option<WriteId>,
}

/// An update of this host's entry of a shared topic, as it is asked.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct UpdateAsked {
    pub(super) conn: ConnId,
    pub(super) request_id: Value,
    /// The entry's ref now.
    pub(super) old_ref: String,
    pub(super) meta: Map<String, Value>,
    pub(super) meta_bytes: usize,
}

/// An update waiting for etcd to show the entry's new version.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PendingUpdate {
    pub(super) write: WriteId,
    pub(super) asked: UpdateAsked,
    /// The ref of the new version, which the watch shows it by.
    pub(super) new_ref: String,
    /// When it is answered `unavailable` unless the new version shows
    /// first (wall clock, ms); `None` once it is answered so. Shown later,
    /// the version is applied all the same, and the holder told.
    pub(super) deadline: Option<i64>,
}

/// An untrack waiting for etcd to show the deletes of the shared entries
/// it removed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PendingUntrack {
    pub(super) conn: ConnId,
    pub(super) request_id: Value,
    pub(super) reply: UntrackReply,
    /// How many of its deletes etcd has yet to show.
    pub(super) waiting: usize,
    /// When it is answered `unavailable` unless every delete shows first
    /// (wall clock, ms).
    pub(super) deadline: i64,
}

impl SharedRecord {
    /// The record of one of this host's own entries, as its key's value.
    pub fn of(entry: &Entry, host: &str) -> SharedRecord {
        SharedRecord {
            key: entry.key.clone(),
            phx_ref: entry.phx_ref.clone(),
            phx_ref_prev: entry.prev_ref.clone(),
            meta: entry.meta.clone(),
            joined_at: entry.joined_at,
            pid: entry.process.pid,
            uid: entry.uid,
            user: entry.user.clone(),
            host: host.to_owned(),
            lifetime: entry.lifetime,
            readable: true,
        }
    }
}

impl Registry {
    /// Parks a track of a shared topic until etcd shows its key: the ref
    /// `HOST:pN` is drawn from the counter (never handed out again, as the
    /// counter is saved), the track counts against the connection and the
    /// uid from now on, and the key's creation is asked of etcd.
    pub(super) fn park_track(
        &mut self,
        parked: Parked,
        now: i64,
        out: &mut Outbox,
    ) -> Result<WriteId, ErrorBody> {
        self.check_room_to_wait(parked.conn)?;
        let mut parked = parked;
        let host = self.host();
        let id = cluster_ref(&host, self.take_seq());
        parked.entry.phx_ref = id.clone();
        parked.entry.cluster = Some(Shared {
            id: id.clone(),
            remote: false,
            key_lease: None,
        });
        let write = self.new_write();
        out.cluster.push(ClusterWrite::Create {
            write,
            topic: parked.entry.topic.clone(),
            id,
            record: SharedRecord::of(&parked.entry, &host),
        });
        let deadline = Some(self.park_deadline(now));
        self.park(PendingTrack {
            write,
            track: parked,
            created: None,
            cancelled: None,
            deadline,
        });
        Ok(write)
    }

    /// Whether one more reply to `conn` may wait for etcd: at most
    /// [`MAX_WAITING_PER_CONNECTION`]. Every line to a connection queues
    /// behind its first waiting reply, so without a bound one connection
    /// could make the core hold lines for it without end while etcd is
    /// slow.
    pub(super) fn check_room_to_wait(&self, conn: ConnId) -> Result<(), ErrorBody> {
        let tracks = self.conns.get(&conn).map_or(0, |c| c.parked);
        let updates = self
            .updating
            .values()
            .filter(|u| u.asked.conn == conn && u.deadline.is_some())
            .count();
        let untracks = self.untracking.values().filter(|u| u.conn == conn).count();
        if tracks + updates + untracks < MAX_WAITING_PER_CONNECTION {
            return Ok(());
        }
        Err(ErrorBody::new(
            ErrorCode::LimitExceeded,
            format!(
                "this connection already has {MAX_WAITING_PER_CONNECTION} requests of shared \
                 topics waiting for etcd, the limit; send more once some are answered"
            ),
        ))
    }

    /// Files a pending track, and counts it as its entry will be counted.
    /// A cancelled one still counts against its user until etcd answers:
    /// its key may yet be created, and is the user's until it is deleted,
    /// so closing and tracking again cannot pass the quota. Only its
    /// connection is done with it.
    fn park(&mut self, pending: PendingTrack) {
        let key = (
            pending.track.entry.topic.clone(),
            shared_id(&pending.track.entry),
        );
        self.usage_by_uid
            .entry(pending.track.entry.uid)
            .or_default()
            .count(&pending.track.entry, pending.track.meta_bytes);
        if pending.cancelled.is_none()
            && let Some(connection) = self.conns.get_mut(&pending.track.conn)
        {
            connection.parked += 1;
            connection.keys.insert((
                pending.track.entry.topic.clone(),
                pending.track.entry.key.clone(),
            ));
        }
        if let Some(deadline) = pending.deadline {
            self.park_deadlines.insert((deadline, pending.write));
        }
        self.record(|| Undo::Pended(key.clone()));
        self.pending.insert(key, pending);
    }

    /// Takes a pending track out, with what it counted.
    fn unpark(&mut self, key: &(String, String)) -> Option<PendingTrack> {
        let pending = self.pending.remove(key)?;
        if let Some(usage) = self.usage_by_uid.get_mut(&pending.track.entry.uid) {
            usage.uncount(&pending.track.entry, pending.track.meta_bytes);
            if usage.entries == 0 {
                self.usage_by_uid.remove(&pending.track.entry.uid);
            }
        }
        if pending.cancelled.is_none()
            && let Some(connection) = self.conns.get_mut(&pending.track.conn)
        {
            connection.parked -= 1;
            connection.keys.remove(&(
                pending.track.entry.topic.clone(),
                pending.track.entry.key.clone(),
            ));
        }
        if let Some(deadline) = pending.deadline {
            self.park_deadlines.remove(&(deadline, pending.write));
        }
        self.record(|| Undo::Unpended(Box::new(pending.clone())));
        Some(pending)
    }

    /// Undoes what the requests waiting for etcd changed, while a batch is
    /// rolled back: each change is undone by the same function that made
    /// it, so the indexes beside (counts, deadlines) follow.
    pub(super) fn undo_parking(&mut self, undo: Undo) {
        match undo {
            Undo::Pended(key) => {
                self.unpark(&key);
            }
            Undo::Unpended(pending) => self.park(*pending),
            Undo::Leaving(id, before) => self.set_leaving(id, before.map(|b| *b)),
            Undo::Updating(id, before) => self.set_updating(id, before.map(|b| *b)),
            Undo::Untracking(write, before) => self.set_untracking(write, before.map(|b| *b)),
            _ => {}
        }
    }

    /// How many tracks wait for etcd, which count toward the total cap.
    pub(super) fn parked_count(&self) -> usize {
        self.pending.len()
    }

    /// The connection closed, or the process exited, while tracks of it
    /// waited for etcd: each is kept, cancelled, so that its key is
    /// deleted once it shows. (A process entry's track ends with its
    /// connection too: nothing would answer it once its key shows.)
    ///
    /// A track whose connection is still open (its process exited) is
    /// answered now, as a track naming a process that is gone is.
    pub(super) fn cancel_parked(&mut self, of: Of, reason: LeaveReason, out: &mut Outbox) {
        if self.pending.is_empty() {
            return;
        }
        let keys = match of {
            Of::Conn(conn) => self.pending.of_conn(conn),
            Of::Process(process) => self.pending.of_process(process),
        };
        for key in keys {
            let answer = self
                .pending
                .get(&key)
                .filter(|p| self.conns.contains_key(&p.track.conn))
                .map(|p| {
                    ErrorBody::new(
                        ErrorCode::NotFound,
                        format!(
                            "process {} exited before etcd showed its entry",
                            p.track.entry.process.pid
                        ),
                    )
                });
            self.cancel_track(&key, reason, answer, out);
        }
    }

    /// An untrack of `key` on `topic` by `conn` cancels the tracks of that
    /// key still waiting for etcd that it may remove, answering each with
    /// a refusal; returns how many.
    pub(super) fn cancel_parked_key(
        &mut self,
        conn: ConnId,
        topic: &str,
        key: &str,
        out: &mut Outbox,
    ) -> usize {
        if self.pending.is_empty() {
            return 0;
        }
        let keys: Vec<(String, String)> = self
            .pending
            .in_topic(topic)
            .filter(|(_, p)| p.cancelled.is_none())
            .filter(|(_, p)| p.track.entry.key == key)
            .filter(|(_, p)| self.check_may_change(conn, &p.track.entry).is_ok())
            .map(|(key, _)| key.clone())
            .collect();
        for pending in &keys {
            let error = ErrorBody::new(
                ErrorCode::NotFound,
                format!("`{key}` was untracked on `{topic}` before etcd showed its entry"),
            );
            self.cancel_track(pending, LeaveReason::Untrack, Some(error), out);
        }
        keys.len()
    }

    /// Cancels a pending track for `reason`, answering it with `answer` if
    /// anyone is to hear it: it stays parked, counting for nothing, until
    /// etcd answers its write or shows its key, which is then deleted.
    fn cancel_track(
        &mut self,
        key: &(String, String),
        reason: LeaveReason,
        answer: Option<ErrorBody>,
        out: &mut Outbox,
    ) {
        let Some(mut pending) = self.unpark(key) else {
            return;
        };
        if let Some(error) = answer {
            let request_id = pending.track.request_id.clone();
            resolve(
                out,
                pending.track.conn,
                pending.write,
                request_id,
                Err(error),
            );
        }
        pending.cancelled = Some(reason);
        pending.deadline = None;
        self.park(pending);
    }

    /// etcd answered a write at `now`: a creation is noted (the entry
    /// joins when the watch shows its key), a refusal answers the track or
    /// the update with its error and frees what it held, or, for the
    /// re-creation of a key that went with a lease, has it asked again
    /// later. A delete's answer says nothing the watch will not: it is not
    /// looked at.
    pub fn cluster_written(
        &mut self,
        write: WriteId,
        outcome: &Written,
        now: i64,
        out: &mut Outbox,
    ) {
        if self.requeue_written(write, outcome, now) {
            return;
        }
        if let Some(key) = self.pending.of_write(write).cloned() {
            self.track_written(&key, outcome, out);
            return;
        }
        let update = self.updating_of_write(write);
        if let (Some((id, update)), Written::Refused(error)) = (update, outcome) {
            self.set_updating(id, None);
            if update.deadline.is_some() {
                let PendingUpdate { write, asked, .. } = update;
                resolve(out, asked.conn, write, asked.request_id, Err(error.clone()));
            }
        }
        // Otherwise its key showed already, and the request is answered.
    }

    /// etcd answered the write of a pending track.
    fn track_written(&mut self, key: &(String, String), outcome: &Written, out: &mut Outbox) {
        let Some(mut pending) = self.unpark(key) else {
            return;
        };
        match outcome {
            Written::Created { revision } | Written::Rewritten { revision } => {
                let revision = *revision;
                pending.created = Some(revision);
                self.park(pending);
                if revision <= self.shown_revision {
                    // The watch is past it, and did not show it.
                    self.key_gone(key, out);
                }
            }
            Written::Refused(error) => {
                if pending.cancelled.is_none() {
                    let request_id = pending.track.request_id;
                    resolve(
                        out,
                        pending.track.conn,
                        pending.write,
                        request_id,
                        Err(error.clone()),
                    );
                }
            }
        }
    }

    /// The watch (or a listing) has shown everything up to `revision`: a
    /// pending track whose key etcd created at or below it, and which it
    /// did not show, lost its key before this daemon looked (this host's
    /// lease ended, say). Every change shown comes in revision order, so
    /// nothing shown later can be that key.
    pub(super) fn shown_up_to(&mut self, revision: u64, out: &mut Outbox) {
        self.shown_revision = self.shown_revision.max(revision);
        if self.pending.is_empty() {
            return;
        }
        let gone = self.pending.created_up_to(self.shown_revision);
        for key in gone {
            self.key_gone(&key, out);
        }
    }

    /// A pending track's key is gone: the track is answered `unavailable`,
    /// and nothing is left to delete.
    fn key_gone(&mut self, key: &(String, String), out: &mut Outbox) {
        let Some(pending) = self.unpark(key) else {
            return;
        };
        if pending.cancelled.is_none() {
            let error = ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "etcd created the key of `{}` on `{}`, but it was gone before this \
                     daemon's watch showed it (this host's lease may have ended); track again",
                    pending.track.entry.key, pending.track.entry.topic
                ),
            );
            let request_id = pending.track.request_id;
            resolve(
                out,
                pending.track.conn,
                pending.write,
                request_id,
                Err(error),
            );
        }
    }

    /// The watch showed the key of a track of this host's that waits: its
    /// entry joins at the key's create revision, and the track is
    /// answered with the standing it has here and now. A cancelled track's
    /// key is deleted instead.
    fn put_own(
        &mut self,
        key: &(String, String),
        create_revision: u64,
        lease: i64,
        now: i64,
        out: &mut Outbox,
    ) {
        let Some(pending) = self.unpark(key) else {
            return;
        };
        let (topic, id) = key.clone();
        if let Some(reason) = pending.cancelled {
            self.ask_delete((topic, id), reason, None, out);
            return;
        }
        let PendingTrack {
            write,
            track:
                Parked {
                    conn,
                    request_id,
                    mut entry,
                    meta_bytes,
                    subscribe,
                    token,
                },
            ..
        } = pending;
        let taken = self.topic(&topic).entries.contains_key(&create_revision)
            || self.refs.contains_key(&entry.phx_ref);
        if taken || !self.conns.contains_key(&conn) {
            // Only a writer other than presenced could have made this.
            let error = ErrorBody::new(
                ErrorCode::Internal,
                format!("the key of `{id}` took a place another entry of `{topic}` holds"),
            );
            let reply = OutgoingReply::failure(request_id, error);
            out.deliveries.push(Delivery::Resolved {
                conn,
                write,
                deliveries: vec![Delivery::Reply { conn, reply }],
            });
            self.ask_delete((topic, id), LeaveReason::Untrack, None, out);
            return;
        }
        entry.seq = create_revision;
        // A key shown on a lease that is not the live one (a watch behind
        // a lease that ended since) does not own: it stays suspended until
        // the watch shows its delete, and it is queued again.
        if let Some(shared) = entry.cluster.as_mut() {
            shared.key_lease = Some(lease);
        }
        let reply_base = (entry.phx_ref.clone(), entry.joined_at);
        out.changes.push(Change::Put(Box::new(entry.clone())));
        self.join(entry, meta_bytes, now, out);
        let standing = self.standing_of(&topic, create_revision);
        let (phx_ref, joined_at) = reply_base;
        let reply = TrackReply {
            phx_ref,
            seq: create_revision,
            joined_at,
            standing,
            resume_token: token,
        };
        let mut deliveries = vec![Delivery::Reply {
            conn,
            reply: OutgoingReply {
                id: request_id,
                outcome: Ok(ReplyFields::of(&reply)),
            },
        }];
        if subscribe {
            let mark = out.deliveries.len();
            self.add_subscription(conn, topic, out);
            deliveries.extend(out.deliveries.drain(mark..));
        }
        out.deliveries.push(Delivery::Resolved {
            conn,
            write,
            deliveries,
        });
    }

    // -- this host's entries leaving, and their updates ---------------------

    /// Whether `entry` is this host's entry of a shared topic on its way
    /// out.
    pub(super) fn is_leaving(&self, entry: &Entry) -> bool {
        !self.leaving.is_empty()
            && entry
                .cluster
                .as_ref()
                .is_some_and(|shared| !shared.remote && self.leaving.contains_key(&shared.id))
    }

    /// Sets this host's entry `phx_ref` of a shared topic leaving, for
    /// `reason`, on behalf of `remover` if a request removes it: etcd is
    /// asked to delete its key, with the reason beside it, and the entry
    /// keeps its place until the watch shows the delete. So nobody here is
    /// promoted before other hosts may be, and if etcd cannot be reached
    /// the entry stays where its key stays. Taken out of its connection,
    /// process, token and resume deadline, nothing here can take it back
    /// or remove it again. Returns its key id and the delete's write.
    pub(super) fn leave_shared(
        &mut self,
        phx_ref: &str,
        reason: LeaveReason,
        remover: Option<ConnId>,
        out: &mut Outbox,
    ) -> Option<(String, WriteId)> {
        let (mut entry, meta_bytes) = self.take(phx_ref)?;
        let id = shared_id(&entry);
        self.forget_told(&entry.topic, entry.seq);
        // Its row goes now, with the batch that decided the leave, not when
        // etcd shows the delete: a row is what a restart brings back, and
        // an entry on its way out must not come back as a live one if the
        // daemon stops before the delete shows. Its key, should the delete
        // not have reached etcd, is one no restored entry claims, and the
        // first listing after the restart deletes it.
        out.changes.push(Change::Delete(phx_ref.to_owned()));
        let holder = entry.conn.take();
        entry.resume_deadline = None;
        // As the local history would say: only another connection than the
        // holder removes an entry "by" someone.
        let by = remover
            .filter(|remover| holder != Some(*remover))
            .and_then(|remover| self.actor(remover));
        if let Some(update) = self.updating.get(&id).cloned() {
            self.set_updating(id.clone(), None);
            if update.deadline.is_some() {
                let error = ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("entry `{phx_ref}` was removed before etcd showed its update"),
                );
                let PendingUpdate { write, asked, .. } = update;
                resolve(out, asked.conn, write, asked.request_id, Err(error));
            }
        }
        let leaving = Leaving {
            reason,
            by: by.clone(),
            holder,
            untrack: None,
        };
        self.set_leaving(id.clone(), Some(leaving));
        let topic = entry.topic.clone();
        self.insert(entry, meta_bytes);
        let write = self.ask_delete((topic, id.clone()), reason, by, out);
        Some((id, write))
    }

    /// The entry, taken out of its topic for good, was on its way out:
    /// its leave is over. The holder it had hears who removed it, if
    /// another connection did. Returns the untrack waiting for it.
    pub(super) fn end_leaving(&mut self, entry: &Entry, out: &mut Outbox) -> Option<WriteId> {
        if self.leaving.is_empty() {
            return None;
        }
        let id = entry.cluster.as_ref().filter(|s| !s.remote)?.id.clone();
        let leaving = self.leaving.get(&id)?.clone();
        self.set_leaving(id, None);
        if let (Some(holder), Some(by)) = (leaving.holder, &leaving.by)
            && self.conns.contains_key(&holder)
        {
            let removed = removal_of(entry, leaving.reason, by);
            let event = Event::Removed {
                topic: removed.topic,
                payload: removed.removal,
            };
            out.event(vec![holder], event);
        }
        leaving.untrack
    }

    /// An untrack that set shared entries leaving waits for their deletes
    /// to show; its reply is named by the first delete's write, which it
    /// returns (none if it set none leaving: it is answered at once).
    pub(super) fn park_untrack(
        &mut self,
        conn: ConnId,
        request_id: &Value,
        reply: UntrackReply,
        deletes: &[(String, WriteId)],
        now: i64,
    ) -> Option<WriteId> {
        let &(_, slot) = deletes.first()?;
        for (id, _) in deletes {
            if let Some(mut leaving) = self.leaving.get(id).cloned() {
                leaving.untrack = Some(slot);
                self.set_leaving(id.clone(), Some(leaving));
            }
        }
        let untrack = PendingUntrack {
            conn,
            request_id: request_id.clone(),
            reply,
            waiting: deletes.len(),
            deadline: self.park_deadline(now),
        };
        self.set_untracking(slot, Some(untrack));
        Some(slot)
    }

    /// One of the deletes the untrack `slot` waits for showed: the last
    /// answers it.
    pub(super) fn one_delete_shown(&mut self, slot: WriteId, out: &mut Outbox) {
        // Gone if it was answered already (it timed out).
        let Some(mut untrack) = self.untracking.get(&slot).cloned() else {
            return;
        };
        untrack.waiting = untrack.waiting.saturating_sub(1);
        if untrack.waiting > 0 {
            self.set_untracking(slot, Some(untrack));
            return;
        }
        self.set_untracking(slot, None);
        let reply = ReplyFields::of(&untrack.reply);
        resolve(out, untrack.conn, slot, untrack.request_id, Ok(reply));
    }

    /// Parks an update of this host's entry of a shared topic until etcd
    /// shows its new version: a new ref `HOST:pN` from the counter, and
    /// the key rewritten with it (its create revision, so its place, is
    /// kept). One at a time for each entry: a second, while the first
    /// waits, is refused, since the version it would follow is not known
    /// to be etcd's yet, and a client that waits for each reply never
    /// meets the refusal.
    pub(super) fn park_update(
        &mut self,
        asked: UpdateAsked,
        now: i64,
        out: &mut Outbox,
    ) -> Result<WriteId, ErrorBody> {
        let Some(entry) = self.entry(&asked.old_ref) else {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("no entry `{}`", asked.old_ref),
            ));
        };
        if self.is_unconfirmed(entry) {
            // Its key's id is not known for sure until the first listing
            // names it (a row keeps the entry's ref, which an update
            // changes, and not its key's id).
            return Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "entry `{}` was restored after this daemon restarted, and etcd has not \
                     shown its key yet; update it again in a moment",
                    asked.old_ref
                ),
            ));
        }
        let id = shared_id(entry);
        self.check_room_to_wait(asked.conn)?;
        if self.updating.contains_key(&id) {
            return Err(ErrorBody::new(
                ErrorCode::LimitExceeded,
                format!(
                    "entry `{}` waits for etcd to show its last update; one update of an \
                     entry of a shared topic is sent at a time, so send this one once that \
                     one is answered",
                    asked.old_ref
                ),
            ));
        }
        let mut revised = entry.clone();
        let host = self.host();
        let new_ref = cluster_ref(&host, self.take_seq());
        revised.phx_ref = new_ref.clone();
        revised.prev_ref = Some(asked.old_ref.clone());
        revised.meta = asked.meta.clone();
        let write = self.new_write();
        out.cluster.push(ClusterWrite::Rewrite {
            write,
            topic: revised.topic.clone(),
            id: id.clone(),
            record: SharedRecord::of(&revised, &host),
        });
        let update = PendingUpdate {
            write,
            asked,
            new_ref,
            deadline: Some(self.park_deadline(now)),
        };
        self.set_updating(id, Some(update));
        Ok(write)
    }

    /// The watch showed the new version a pending update of the entry
    /// `id` wrote: the entry changes as a local update changes it, and the
    /// update is answered. One answered `unavailable` already is applied
    /// all the same, since every other host shows it, and the entry's
    /// holder is told of it, as of another connection's update.
    fn show_update(&mut self, id: &str, now: i64, out: &mut Outbox) {
        let Some(update) = self.updating.get(id).cloned() else {
            return;
        };
        self.set_updating(id.to_owned(), None);
        let PendingUpdate {
            write,
            asked,
            new_ref,
            deadline,
        } = update;
        let answered = deadline.is_none();
        let revise = |entry: &mut Entry| {
            entry.phx_ref = new_ref.clone();
            entry.prev_ref = Some(asked.old_ref.clone());
            entry.meta = asked.meta.clone();
        };
        let actor = (!answered).then_some(asked.conn);
        if !self.revise(&asked.old_ref, revise, asked.meta_bytes, actor, now, out) {
            return;
        }
        if answered {
            if let (Some(updated), Some(by)) = (self.entry(&new_ref), self.actor(asked.conn))
                && let Some(holder) = updated.conn
            {
                tell_of_update(holder, by, updated, out);
            }
            return;
        }
        let reply = UpdateReply {
            phx_ref: new_ref,
            prev_ref: asked.old_ref,
        };
        let reply = ReplyFields::of(&reply);
        resolve(out, asked.conn, write, asked.request_id, Ok(reply));
    }

    fn set_leaving(&mut self, id: String, leaving: Option<Leaving>) {
        let before = match leaving {
            Some(leaving) => self.leaving.insert(id.clone(), leaving),
            None => self.leaving.remove(&id),
        };
        self.record(|| Undo::Leaving(id, before.map(Box::new)));
    }

    fn set_updating(&mut self, id: String, update: Option<PendingUpdate>) {
        let before = self.updating.remove(&id);
        if let Some(before) = &before {
            self.updating_by_write.remove(&before.write);
            if let Some(deadline) = before.deadline {
                self.park_deadlines.remove(&(deadline, before.write));
            }
        }
        if let Some(update) = update {
            if let Some(deadline) = update.deadline {
                self.park_deadlines.insert((deadline, update.write));
            }
            self.updating_by_write.insert(update.write, id.clone());
            self.updating.insert(id.clone(), update);
        }
        self.record(|| Undo::Updating(id, before.map(Box::new)));
    }

    fn set_untracking(&mut self, slot: WriteId, untrack: Option<PendingUntrack>) {
        let before = self.untracking.remove(&slot);
        if let Some(before) = &before {
            self.park_deadlines.remove(&(before.deadline, slot));
        }
        if let Some(untrack) = untrack {
            self.park_deadlines.insert((untrack.deadline, slot));
            self.untracking.insert(slot, untrack);
        }
        self.record(|| Undo::Untracking(slot, before.map(Box::new)));
    }

    /// The update waiting for etcd that `write` asked for, with its key id.
    fn updating_of_write(&self, write: WriteId) -> Option<(String, PendingUpdate)> {
        let id = self.updating_by_write.get(&write)?;
        let update = self.updating.get(id)?;
        Some((id.clone(), update.clone()))
    }

    // -- requests that waited too long --------------------------------------

    /// When the first request waiting for etcd is answered `unavailable`
    /// unless etcd shows what it asked first (wall clock, ms).
    pub fn next_park_deadline(&self) -> Option<i64> {
        self.park_deadlines.first().map(|&(deadline, _)| deadline)
    }

    /// Answers `unavailable` every request that has waited for etcd until
    /// `now` or longer: a silent watch, or a database that cannot save
    /// what the watch showed, must not leave a client waiting forever.
    /// What they asked may still come to pass: a track's key is then
    /// deleted, an update or untrack applied.
    pub fn time_out_parked(&mut self, now: i64, out: &mut Outbox) {
        while let Some(&(deadline, write)) = self.park_deadlines.first() {
            if deadline > now {
                break;
            }
            self.time_out(write, out);
            // Whatever it was, it waits no more.
            self.park_deadlines.remove(&(deadline, write));
        }
    }

    fn time_out(&mut self, write: WriteId, out: &mut Outbox) {
        let waited = self.park_timeout();
        let unavailable = |what: &str, then: &str| {
            ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "etcd did not show {what} within {waited:?} (it may be unreachable); {then}"
                ),
            )
        };
        let track = self
            .pending
            .of_write(write)
            .filter(|key| self.pending.get(key).is_some_and(|p| p.deadline.is_some()))
            .cloned();
        if let Some(key) = track {
            let error = unavailable(
                "this entry's key",
                "the track is given up, and the key deleted if it shows later",
            );
            self.cancel_track(&key, LeaveReason::Untrack, Some(error), out);
            return;
        }
        let update = self
            .updating_of_write(write)
            .filter(|(_, update)| update.deadline.is_some());
        if let Some((id, mut update)) = update {
            update.deadline = None;
            let (conn, request_id) = (update.asked.conn, update.asked.request_id.clone());
            self.set_updating(id, Some(update));
            let error = unavailable(
                "this update",
                "if it shows later it is applied, and the entry's holder told",
            );
            resolve(out, conn, write, request_id, Err(error));
            return;
        }
        if let Some(untrack) = self.untracking.get(&write).cloned() {
            self.set_untracking(write, None);
            let error = unavailable("the removal", "the entries leave once it shows");
            resolve(out, untrack.conn, write, untrack.request_id, Err(error));
        }
    }

    /// Nothing more of etcd will be shown here (cluster mode stopped for
    /// good): every track and update still waiting for the watch is
    /// answered `unavailable` now rather than at its deadline, and
    /// forgotten. Whatever of them etcd wrote is on a lease nobody renews,
    /// and goes with it; an answer to one of their writes that comes later
    /// finds nothing waiting, and changes nothing.
    pub(super) fn give_up_waiting_for_etcd(&mut self, out: &mut Outbox) {
        let tracks: Vec<KeyOf> = self.pending.by_key.keys().cloned().collect();
        for key in tracks {
            let Some(pending) = self.unpark(&key) else {
                continue;
            };
            if pending.cancelled.is_none() {
                let error = ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!(
                        "this host's etcd lease is no longer kept, so etcd will not show the \
                         entry of `{}` on `{}`; a topic shared across hosts cannot change here \
                         now",
                        pending.track.entry.key, pending.track.entry.topic
                    ),
                );
                let request_id = pending.track.request_id;
                resolve(
                    out,
                    pending.track.conn,
                    pending.write,
                    request_id,
                    Err(error),
                );
            }
        }
        let mut updates: Vec<(String, PendingUpdate)> = self
            .updating
            .iter()
            .map(|(id, update)| (id.clone(), update.clone()))
            .collect();
        // In the order they were asked, so each connection hears its
        // answers in that order.
        updates.sort_by_key(|(_, update)| update.write);
        for (id, update) in updates {
            self.set_updating(id, None);
            if update.deadline.is_some() {
                let error = ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!(
                        "this host's etcd lease is no longer kept, so etcd will not show this \
                         update; entry `{}` stays as it was",
                        update.asked.old_ref
                    ),
                );
                let PendingUpdate { write, asked, .. } = update;
                resolve(out, asked.conn, write, asked.request_id, Err(error));
            }
        }
    }

    /// A pending track holds this token: it cannot be resumed before its
    /// key shows (nor could its client know the token before then).
    pub(super) fn parked_track_of_token(&self, uid: u32, hash: &[u8; 32]) -> Option<ErrorBody> {
        let pending = self.pending.of_token(uid, hash)?;
        Some(ErrorBody::new(
            ErrorCode::Unavailable,
            format!(
                "the entry of this token, `{}` on `{}`, waits for etcd to show it; resume it \
                 once its track is answered",
                pending.track.entry.key, pending.track.entry.topic
            ),
        ))
    }

    fn park_timeout(&self) -> Duration {
        self.cluster
            .as_ref()
            .map_or(DEFAULT_PARK_TIMEOUT, |c| c.park_timeout)
    }

    /// When a request parked `now` is answered `unavailable` at the latest.
    fn park_deadline(&self, now: i64) -> i64 {
        let timeout = i64::try_from(self.park_timeout().as_millis()).unwrap_or(i64::MAX);
        now.saturating_add(timeout)
    }

    pub(super) fn host(&self) -> String {
        self.cluster
            .as_ref()
            .map(|c| c.host.clone())
            .unwrap_or_default()
    }

    pub(super) fn new_write(&mut self) -> WriteId {
        let write = WriteId(self.next_write);
        self.next_write += 1;
        write
    }

    /// Asks etcd to move the key `id` of `topic`, this host's, to the live
    /// lease (see [`ClusterWrite::Adopt`]).
    pub(super) fn ask_adopt(&mut self, (topic, id): (String, String), out: &mut Outbox) {
        let write = self.new_write();
        out.cluster.push(ClusterWrite::Adopt { write, topic, id });
    }

    /// Asks etcd to delete the key `id` of `topic`, with `reason` (and who
    /// removed it, `by`) written beside the delete for every host to read.
    /// Returns the write, which names etcd's answer.
    pub(super) fn ask_delete(
        &mut self,
        (topic, id): (String, String),
        reason: LeaveReason,
        by: Option<Actor>,
        out: &mut Outbox,
    ) -> WriteId {
        let write = self.new_write();
        out.cluster.push(ClusterWrite::Delete {
            write,
            topic,
            id,
            reason,
            by,
        });
        write
    }
}

/// Whose parked tracks are cancelled.
#[derive(Debug, Clone, Copy)]
pub(super) enum Of {
    Conn(ConnId),
    Process(ProcessId),
}

/// A track as it is parked: what [`Registry::park_track`] takes, and what
/// a [`PendingTrack`] holds until etcd shows its key.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Parked {
    pub(super) conn: ConnId,
    pub(super) request_id: Value,
    pub(super) entry: Entry,
    pub(super) meta_bytes: usize,
    pub(super) subscribe: bool,
    pub(super) token: String,
}

/// The id of a local entry of a shared topic.
fn shared_id(entry: &Entry) -> String {
    entry
        .cluster
        .as_ref()
        .map_or_else(|| entry.phx_ref.clone(), |shared| shared.id.clone())
}

/// Answers the request that waited on `write` with `outcome`.
fn resolve(
    out: &mut Outbox,
    conn: ConnId,
    write: WriteId,
    request_id: Value,
    outcome: Result<ReplyFields, ErrorBody>,
) {
    let reply = OutgoingReply {
        id: request_id,
        outcome,
    };
    out.deliveries.push(Delivery::Resolved {
        conn,
        write,
        deliveries: vec![Delivery::Reply { conn, reply }],
    });
}
