//! What the registry keeps of a topic shared across hosts through etcd.
//!
//! A shared topic's entries sit in the same queue as a local topic's, with
//! each entry's seq being its key's create revision, which is the same
//! number on every host. An entry another host tracked is kept only so
//! that its place in the queue is known here: it belongs to no process,
//! connection or user of this host.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{Entry, Outbox, ProcessId, Registry};
use crate::protocol::{Actor, LeaveReason, Lifetime, host_of_ref, meta_size, validate_name};

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
    /// Naming this host's own entries, which this daemon does not take
    /// from etcd yet.
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
