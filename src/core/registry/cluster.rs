//! What the registry keeps of a topic shared across hosts through etcd.
//!
//! A shared topic's entries sit in the same queue as a local topic's, with
//! each entry's seq being its key's create revision, which is the same
//! number on every host. An entry another host tracked is kept only so
//! that its place in the queue is known here: it belongs to no process,
//! connection or user of this host.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Change, ConnId, Delivery, Entry, Outbox, ProcessId, Registry, Undo};
use crate::protocol::{
    Actor, ErrorBody, ErrorCode, LeaveReason, Lifetime, OutgoingReply, ReplyFields, TrackReply,
    cluster_ref, host_of_ref, meta_size, validate_name,
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

/// How this daemon takes part in a cluster: its own host name, which its
/// entries' refs carry (`HOST:pN`), and which topics are shared.
#[derive(Debug, Clone)]
pub struct ClusterSetup {
    pub host: String,
    pub shared: SharedTopicsFn,
}

impl ClusterSetup {
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
    /// Of a topic holding this host's own entries of before cluster mode,
    /// whose seqs are not create revisions: a topic is all local or all
    /// shared, never mixed.
    pub held_locally: usize,
    /// Naming this host's own entries that no track here waits for: a
    /// restart's leftovers, or another daemon using this host's name.
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
        self.not_shared
            + self.held_locally
            + self.own_host
            + self.bad_id
            + self.place_taken
            + self.over_cap
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
    /// history is saved.
    ///
    /// Ignored, and counted in the report: events of topics this daemon
    /// does not share, or that hold entries of before cluster mode; of
    /// this host's own ids; of ids naming no host; of a new key whose
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
        let mut leaving: Vec<(String, LeaveReason)> = Vec::new();
        for event in &changes.events {
            let (topic, id) = match event {
                ClusterEvent::Put { topic, id, .. } | ClusterEvent::Delete { topic, id, .. } => {
                    (topic, id)
                }
            };
            if let ClusterEvent::Put {
                create_revision, ..
            } = event
            {
                let key = (topic.clone(), id.clone());
                if self.pending.contains_key(&key) {
                    self.remove(std::mem::take(&mut leaving), now, out);
                    self.put_own(&key, *create_revision, now, out);
                    report.applied += 1;
                    continue;
                }
            }
            if self.apply_own_lost_key(event, &mut leaving, now, out) {
                report.applied += 1;
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
                    leaving.push((phx_ref.clone(), reason));
                    report.applied += 1;
                }
                ClusterEvent::Put {
                    create_revision,
                    record,
                    ..
                } => {
                    // What is applied next must see the deletes before it.
                    self.remove(std::mem::take(&mut leaving), now, out);
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
        self.remove(leaving, now, out);
        report
    }

    /// The report's count an event of `id` on `topic` is ignored for, if
    /// it is.
    fn ignored_count<'a>(
        &self,
        report: &'a mut ClusterReport,
        topic: &str,
        id: &str,
    ) -> Option<&'a mut usize> {
        let own_host = self.cluster.as_ref().map(|c| c.host.as_str());
        if !self.is_shared(topic) {
            return Some(&mut report.not_shared);
        }
        if self
            .topic(topic)
            .owner()
            .is_some_and(|owner| owner.cluster.is_none())
        {
            return Some(&mut report.held_locally);
        }
        match host_of_ref(id) {
            None => Some(&mut report.bad_id),
            Some(host) if Some(host) == own_host => Some(&mut report.own_host),
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
            self.remove(vec![(old_ref, LeaveReason::HostLost)], now, out);
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
    /// One watch message, or one listing.
    Changes(ClusterChanges),
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
    Live { fence_at: std::time::Duration },
    /// The fence fell: etcd may end the lease at any moment and give this
    /// host's places to others. No local entry of a shared topic owns.
    Fenced,
    /// No lease: none granted yet, or the last one ended (its keys went
    /// with it) and a new one is asked for.
    Granting,
    /// The lease is no longer kept (the daemon is stopping, or etcd
    /// grants another TTL than the one configured).
    Stopped,
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
    pub(super) fn park_track(&mut self, parked: Parked, out: &mut Outbox) -> WriteId {
        let mut parked = parked;
        let host = self
            .cluster
            .as_ref()
            .map(|c| c.host.clone())
            .unwrap_or_default();
        let id = cluster_ref(&host, self.take_seq());
        parked.entry.phx_ref = id.clone();
        parked.entry.cluster = Some(Shared {
            id: id.clone(),
            remote: false,
        });
        let write = self.new_write();
        out.cluster.push(ClusterWrite::Create {
            write,
            topic: parked.entry.topic.clone(),
            id,
            record: SharedRecord::of(&parked.entry, &host),
        });
        self.park(PendingTrack {
            write,
            track: parked,
            created: None,
            cancelled: None,
        });
        write
    }

    /// Files a pending track, and counts it as its entry will be counted.
    fn park(&mut self, pending: PendingTrack) {
        let key = (
            pending.track.entry.topic.clone(),
            shared_id(&pending.track.entry),
        );
        if pending.cancelled.is_none() {
            self.usage_by_uid
                .entry(pending.track.entry.uid)
                .or_default()
                .count(&pending.track.entry, pending.track.meta_bytes);
            if let Some(connection) = self.conns.get_mut(&pending.track.conn) {
                connection.parked += 1;
                connection.keys.insert((
                    pending.track.entry.topic.clone(),
                    pending.track.entry.key.clone(),
                ));
            }
        }
        self.record(|| Undo::Pended(key.clone()));
        self.pending.insert(key, pending);
    }

    /// Takes a pending track out, with what it counted.
    fn unpark(&mut self, key: &(String, String)) -> Option<PendingTrack> {
        let pending = self.pending.remove(key)?;
        if pending.cancelled.is_none() {
            if let Some(usage) = self.usage_by_uid.get_mut(&pending.track.entry.uid) {
                usage.uncount(&pending.track.entry, pending.track.meta_bytes);
                if usage.entries == 0 {
                    self.usage_by_uid.remove(&pending.track.entry.uid);
                }
            }
            if let Some(connection) = self.conns.get_mut(&pending.track.conn) {
                connection.parked -= 1;
                connection.keys.remove(&(
                    pending.track.entry.topic.clone(),
                    pending.track.entry.key.clone(),
                ));
            }
        }
        self.record(|| Undo::Unpended(Box::new(pending.clone())));
        Some(pending)
    }

    /// Undoes [`Registry::park`] or [`Registry::unpark`] while a batch is
    /// rolled back.
    pub(super) fn undo_parking(&mut self, undo: Undo) {
        match undo {
            Undo::Pended(key) => {
                self.unpark(&key);
            }
            Undo::Unpended(pending) => self.park(*pending),
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
        let keys: Vec<(String, String)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.cancelled.is_none())
            .filter(|(_, p)| match of {
                Of::Conn(conn) => p.track.conn == conn,
                Of::Process(process) => p.track.entry.process == process,
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            let Some(mut pending) = self.unpark(&key) else {
                continue;
            };
            if self.conns.contains_key(&pending.track.conn) {
                let error = ErrorBody::new(
                    ErrorCode::NotFound,
                    format!(
                        "process {} exited before etcd showed its entry",
                        pending.track.entry.process.pid
                    ),
                );
                let reply = OutgoingReply::failure(pending.track.request_id.clone(), error);
                out.deliveries.push(Delivery::Resolved {
                    conn: pending.track.conn,
                    write: pending.write,
                    deliveries: vec![Delivery::Reply {
                        conn: pending.track.conn,
                        reply,
                    }],
                });
            }
            pending.cancelled = Some(reason);
            self.park(pending);
        }
    }

    /// etcd answered a write: a creation is noted (the entry joins when
    /// the watch shows its key), a refusal answers the track with its
    /// error and frees what it held.
    pub fn cluster_written(&mut self, write: WriteId, outcome: &Written, out: &mut Outbox) {
        let Some(key) = self
            .pending
            .iter()
            .find(|(_, p)| p.write == write)
            .map(|(key, _)| key.clone())
        else {
            // Its key showed already, and the track is answered.
            return;
        };
        let Some(mut pending) = self.unpark(&key) else {
            return;
        };
        match outcome {
            Written::Created { revision } | Written::Rewritten { revision } => {
                pending.created = Some(*revision);
                self.park(pending);
            }
            Written::Refused(error) => {
                if pending.cancelled.is_none() {
                    let reply = OutgoingReply::failure(pending.track.request_id, error.clone());
                    out.deliveries.push(Delivery::Resolved {
                        conn: pending.track.conn,
                        write,
                        deliveries: vec![Delivery::Reply {
                            conn: pending.track.conn,
                            reply,
                        }],
                    });
                }
            }
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
        now: i64,
        out: &mut Outbox,
    ) {
        let Some(pending) = self.unpark(key) else {
            return;
        };
        let (topic, id) = key.clone();
        if let Some(reason) = pending.cancelled {
            let write = self.new_write();
            out.cluster.push(ClusterWrite::Delete {
                write,
                topic,
                id,
                reason,
                by: None,
            });
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
            let write = self.new_write();
            out.cluster.push(ClusterWrite::Delete {
                write,
                topic,
                id,
                reason: LeaveReason::Untrack,
                by: None,
            });
            return;
        }
        entry.seq = create_revision;
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

    pub(super) fn new_write(&mut self) -> WriteId {
        let write = WriteId(self.next_write);
        self.next_write += 1;
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
