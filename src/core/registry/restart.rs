//! This host's entries of shared topics across a restart of its daemon.
//!
//! A daemon that stops moves its entries' keys to a hand-over lease as
//! long as the resume grace, keeping their values and create revisions,
//! so that they hold their places on every host while no daemon runs here.
//! Their rows come back at start with their seqs, the keys' create
//! revisions, but nothing says yet that the keys are still there: the
//! hand-over may have failed, the daemon may have been killed (its
//! successor then revokes its lease, and the keys go with it), or the
//! grace may have run out. So each restored entry is unconfirmed: it
//! stands suspended, as under a fenced lease, and nothing of it is asked
//! of etcd until the first listing shows what etcd holds. Its key there,
//! at its revision and with its ref, confirms it: it keeps its place, and
//! the key is moved to the live lease. It stays suspended until the watch
//! shows its key there: on the hand-over lease, the key may go when the
//! grace runs out, with no fence here to come first. A key not there is
//! gone, and the
//! entry is queued again at the back, as after a lost lease. A key of
//! this host's that no entry claims is deleted.

use super::fence::Requeue;
use super::{
    ClusterChanges, ClusterEvent, ClusterReport, ClusterSetup, Entry, LeaveReason, Outbox,
    Registry, Shared,
};
use crate::protocol::host_of_ref;

/// The rows kept at start, sorted by what they are to this daemon's
/// cluster setup.
#[derive(Debug, Default)]
pub struct RowsForCluster {
    /// Rows to restore: local topics' entries as they were, and this
    /// host's entries of shared topics marked as such (their seqs are
    /// create revisions).
    pub kept: Vec<Entry>,
    /// Rows that the daemon's setup no longer fits: an entry of a shared
    /// topic whose topic is no longer shared, or whose ref names another
    /// host than this daemon's `--host` (nothing here can hold their
    /// keys); or a local entry of a topic shared now (tracked before
    /// cluster mode, or before `--cluster-topics` matched it), which no
    /// other host sees. They leave (reason `expired`).
    pub stale: Vec<Entry>,
}

/// Sorts the rows kept at start (`kept`: of this boot, their process
/// running) by `cluster`, the daemon's setup. A row whose ref names a host
/// (`HOST:pN`) was an entry of a topic shared then; it is restored only if
/// its topic is still shared and its host is still this daemon's. A row
/// with a plain ref was a local entry; it is restored only if its topic is
/// not shared now. One of a topic shared now leaves: kept, it would own
/// the topic here while other hosts, which never see it, give the topic
/// to one of theirs, so the topic is shared from the start instead.
pub fn sort_rows_for_cluster(cluster: Option<&ClusterSetup>, kept: Vec<Entry>) -> RowsForCluster {
    let mut sorted = RowsForCluster::default();
    for mut entry in kept {
        let Some(host) = host_of_ref(&entry.phx_ref) else {
            if cluster.is_some_and(|setup| setup.shares(&entry.topic)) {
                sorted.stale.push(entry);
            } else {
                sorted.kept.push(entry);
            }
            continue;
        };
        match cluster {
            Some(setup) if setup.host == host && setup.shares(&entry.topic) => {
                // Its key's id is the ref it was tracked with, which an
                // update changes and the row does not keep: the current
                // ref stands in for it until the first listing names the
                // key (and a key created again for the entry under it is
                // unique all the same, as the ref is).
                entry.cluster = Some(Shared {
                    id: entry.phx_ref.clone(),
                    remote: false,
                    key_lease: None,
                });
                sorted.kept.push(entry);
            }
            _ => sorted.stale.push(entry),
        }
    }
    if !sorted.stale.is_empty() {
        tracing::warn!(
            "{} stored entries leave (expired): their topics are shared here now, or no \
             longer, or they are another host's (--cluster-topics or --host changed)",
            sorted.stale.len()
        );
    }
    sorted
}

/// What the first listing holds under one of this host's keys.
enum Listed {
    /// The key of the unconfirmed entry `phx_ref`, where the hand-over
    /// left it, on `lease`.
    Confirms { phx_ref: String, lease: i64 },
    /// A key no entry here claims, to delete for this reason.
    Unclaimed(LeaveReason),
    /// Anything else, applied as a watch message would be.
    Other,
}

impl Registry {
    /// Marks every one of this host's entries of shared topics, as
    /// restored, unconfirmed until the first listing, and notes the keys
    /// of `departed` (rows of this boot whose process exited while no
    /// daemon ran) for that listing to delete, for the reason they left.
    /// Called once, before any batch.
    pub fn awaiting_listing(mut self, departed: &[Entry]) -> Registry {
        let restored: Vec<(String, String)> = self
            .entries()
            .filter_map(|entry| {
                let shared = entry.cluster.as_ref().filter(|shared| !shared.remote)?;
                Some((entry.topic.clone(), shared.id.clone()))
            })
            .collect();
        for key in restored {
            self.requeue.set(&key, Some(Requeue::Unconfirmed));
        }
        for entry in departed {
            if self.is_shared(&entry.topic) && self.is_own_id(&entry.phx_ref) {
                self.left_while_down.insert(
                    (entry.topic.clone(), entry.seq),
                    LeaveReason::ExitedWhileDown,
                );
            }
        }
        self
    }

    /// Whether `entry` is this host's, restored after a restart, and its
    /// key not confirmed yet.
    pub(super) fn is_unconfirmed(&self, entry: &Entry) -> bool {
        !self.requeue.is_empty()
            && entry
                .cluster
                .as_ref()
                .filter(|shared| !shared.remote)
                .is_some_and(|shared| {
                    self.requeue.get(&(entry.topic.clone(), shared.id.clone()))
                        == Some(&Requeue::Unconfirmed)
                })
    }

    /// Notes that the entry at `seq` of `topic` left for `reason` while
    /// unconfirmed, if it is one: it left here at once (no other host can
    /// be told anything of it before the first listing), and that listing
    /// deletes its key, if the key is still there, for this reason.
    pub(super) fn note_left_unconfirmed(&mut self, left: (String, u64), reason: LeaveReason) {
        let unconfirmed = self
            .topic(&left.0)
            .entries
            .get(&left.1)
            .is_some_and(|entry| self.is_unconfirmed(entry));
        if unconfirmed {
            self.left_while_down.insert(left, reason);
        }
    }

    /// Applies the first listing of etcd after a start. Other hosts' keys,
    /// and this host's keys that a request here waits for, are applied as
    /// a watch message's puts would be ([`Registry::apply_cluster`]). Then
    /// each unconfirmed entry (see [`Registry::awaiting_listing`]) is
    /// settled: its key found at its create revision with its ref confirms
    /// it, keeping its place, and the key is moved to the live lease
    /// ([`ClusterWrite::Adopt`]); its key not found is gone (the hand-over
    /// failed, the daemon was killed, or the resume grace ran out), and
    /// the entry is queued again at the back, as after a lost lease. An
    /// owner confirmed while the lease is live is no longer suspended: its
    /// holder is told in a `role` event, or hears it on resume. A key of
    /// this host's that nothing here claims is deleted: an entry that left
    /// while no daemon ran, or whose leave was decided before the daemon
    /// stopped and did not reach etcd, for the reason noted, else
    /// `expired`.
    pub fn apply_listing(
        &mut self,
        listing: &ClusterChanges,
        now: i64,
        out: &mut Outbox,
    ) -> ClusterReport {
        let mut confirmed = Vec::new();
        let mut unclaimed = Vec::new();
        let mut rest = Vec::with_capacity(listing.events.len());
        for event in &listing.events {
            match self.listed(event) {
                Listed::Confirms { phx_ref, lease } => {
                    confirmed.push((phx_ref, lease, event_key(event)));
                }
                Listed::Unclaimed(reason) => unclaimed.push((event_key(event), reason)),
                Listed::Other => rest.push(event.clone()),
            }
        }
        let others = ClusterChanges {
            revision: listing.revision,
            events: rest,
        };
        let mut report = self.apply_cluster(&others, now, out);
        report.applied += confirmed.len() + unclaimed.len();

        let owners_before = self.local_shared_owners();
        let adopted = confirmed.len();
        for (phx_ref, lease, key) in confirmed {
            self.confirm(&phx_ref, key, lease, out);
        }
        let missing: Vec<(String, String)> = self.requeue.unconfirmed().cloned().collect();
        for key in &missing {
            self.set_requeue(key.clone(), Some(Requeue::Waiting { retry_at: None }));
        }
        // Before any key is created again: one created again under the id
        // of a key deleted here is written after that delete.
        let deleted = unclaimed.len();
        for (key, reason) in unclaimed {
            self.ask_delete(key, reason, None, out);
        }
        self.tell_owners_whose_suspension_changed(owners_before, out);
        let requeued = missing.len();
        if self.lease_is_live() {
            self.ask_to_requeue(missing, out);
        }
        if adopted + requeued + deleted > 0 {
            tracing::info!(
                "cluster: after the restart, {adopted} entries of shared topics keep their places, \
                 {requeued} found their keys gone and are queued again at the back, and \
                 {deleted} keys no entry here claims are deleted"
            );
        }
        report
    }

    /// What a listed event is to this host's restored entries.
    fn listed(&self, event: &ClusterEvent) -> Listed {
        let ClusterEvent::Put {
            topic,
            id,
            create_revision,
            lease,
            record,
        } = event
        else {
            return Listed::Other;
        };
        if !self.is_shared(topic) || !self.is_own_id(id) {
            return Listed::Other;
        }
        let key = (topic.clone(), id.clone());
        if self.pending.contains_key(&key) {
            // A track's key, created as the daemon started.
            return Listed::Other;
        }
        let at_revision = self.topic(topic).entries.get(create_revision);
        if let Some(entry) = at_revision
            && entry.phx_ref == record.phx_ref
            && self.is_unconfirmed(entry)
        {
            return Listed::Confirms {
                phx_ref: entry.phx_ref.clone(),
                lease: *lease,
            };
        }
        let claimant = self
            .shared_ids
            .get(&key)
            .and_then(|phx_ref| self.entry(phx_ref));
        match claimant {
            // An entry queued again after a lease lost since the start:
            // its new key moves it, as the watch would.
            Some(entry) if !self.is_unconfirmed(entry) => Listed::Other,
            // Nobody's, or under an unconfirmed entry's id but not its
            // key (another revision or ref): that entry finds no key, and
            // is queued again once this one is deleted.
            _ => Listed::Unclaimed(
                self.left_while_down
                    .get(&(topic.clone(), *create_revision))
                    .copied()
                    .unwrap_or(LeaveReason::Expired),
            ),
        }
    }

    /// The unconfirmed entry `phx_ref` was found under the key `id` of
    /// `topic`, on `lease`: it is confirmed, filed under that id (its
    /// current ref stood in for it), and its key is moved to the live
    /// lease. It owns only once its key shows there: until then its key
    /// is on the hand-over lease, which ends after the resume grace
    /// whether or not this daemon is live, with no fence before it.
    fn confirm(
        &mut self,
        phx_ref: &str,
        (topic, id): (String, String),
        lease: i64,
        out: &mut Outbox,
    ) {
        let Some(stood_in) = self
            .entry(phx_ref)
            .and_then(|entry| entry.cluster.as_ref())
            .map(|shared| shared.id.clone())
        else {
            return;
        };
        self.set_requeue((topic.clone(), stood_in.clone()), None);
        if let Some((mut entry, meta_bytes)) = self.take(phx_ref) {
            entry.cluster = Some(Shared {
                id: id.clone(),
                remote: false,
                key_lease: Some(lease),
            });
            self.insert(entry, meta_bytes);
        }
        self.ask_adopt((topic, id), out);
    }
}

/// The topic and key id an event is of.
fn event_key(event: &ClusterEvent) -> (String, String) {
    match event {
        ClusterEvent::Put { topic, id, .. } | ClusterEvent::Delete { topic, id, .. } => {
            (topic.clone(), id.clone())
        }
    }
}
