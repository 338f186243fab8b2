//! The fence: what this host's entries of shared topics stand as while
//! its etcd lease is not known to be live, and how they get their places
//! back when the lease ended.
//!
//! etcd ends the lease, and deletes every key on it, at the earliest at
//! the moment the lease keeper fences (docs/cluster.md, "Fencing"). From
//! the fence on, another host may be given a place this host's entry
//! holds, so none of this host's entries may be told it owns a shared
//! topic: the first in line stands suspended (a spectator, read-only, at
//! position 0, the owner still named), and new tracks and updates of
//! shared topics are refused. Other hosts' entries, and this host's
//! entries further back, keep their standings: what they are told changes
//! nothing anyone writes. The fence covers only keys on the lease it is
//! the fence of: an entry whose key etcd's watch last showed on another
//! lease (a restart's hand-over lease, a lease that ended and that a
//! watch behind still shows) stands suspended too, however live this
//! host's lease is, until its key shows on the live lease.
//!
//! When the lease ended, etcd deleted this host's keys, and other hosts
//! saw the entries leave (`host_lost`). Here they stay, suspended, flagged
//! to be queued again: once a lease is live again each is created anew
//! under its same id, at the back of its queue, and moves there when the
//! watch shows the new key, as the other hosts see it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::{
    Change, ClusterEvent, ClusterWrite, Entry, LeaseView, Outbox, Registry, Shared, SharedRecord,
    StandingKey, Topic, Undo, WriteId, Written,
};
use crate::protocol::{ErrorBody, ErrorCode, LeaveReason, Standing};

/// How long a re-creation etcd refused waits before it is asked again.
/// etcd refuses one when the key exists already (the first try went
/// through after all: the watch shows it soon and the entry moves) or
/// when it cannot take the write now; a second early on would likely meet
/// the same, and a pause far below the lease's TTL still gives the entry
/// its place back long before anyone would give up on it.
pub(super) const REQUEUE_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Where the re-creation of the key of an entry whose lease ended stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Requeue {
    /// Waiting for a live lease to create the key on, or, after etcd
    /// refused the last try, for `retry_at` (wall clock, ms) to come.
    Waiting { retry_at: Option<i64> },
    /// Its creation was asked of etcd by `write`; the entry moves when the
    /// key shows.
    Asked { write: WriteId },
    /// Restored after a restart, its key not seen yet: the first listing
    /// either finds the key where the hand-over left it (the entry keeps
    /// its place) or finds it gone (then the entry is queued again, as
    /// `Waiting`). Nothing of it is asked of etcd before that.
    Unconfirmed,
}

/// A topic and a key id: an entry of a shared topic.
type KeyOf = (String, String);

/// The entries flagged to be queued again, with what finds them fast: the
/// write that asked for each key, and the retries by time.
#[derive(Debug, Clone, Default)]
pub(super) struct Requeues {
    flags: BTreeMap<KeyOf, Requeue>,
    by_write: HashMap<WriteId, KeyOf>,
    retries: BTreeSet<(i64, KeyOf)>,
}

impl Requeues {
    pub(super) fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    pub(super) fn contains_key(&self, key: &KeyOf) -> bool {
        self.flags.contains_key(key)
    }

    pub(super) fn get(&self, key: &KeyOf) -> Option<&Requeue> {
        self.flags.get(key)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &KeyOf> {
        self.flags.keys()
    }

    /// The entries restored after a restart whose keys are not confirmed
    /// yet.
    pub(super) fn unconfirmed(&self) -> impl Iterator<Item = &KeyOf> {
        self.flags
            .iter()
            .filter(|(_, state)| **state == Requeue::Unconfirmed)
            .map(|(key, _)| key)
    }

    /// The entry whose re-creation `write` asked for, if one did.
    fn asked_by(&self, write: WriteId) -> Option<&KeyOf> {
        self.by_write.get(&write)
    }

    /// When the first refused re-creation is due to be asked again.
    fn next_retry(&self) -> Option<i64> {
        self.retries.first().map(|(at, _)| *at)
    }

    /// Sets `key`'s flag to `state`, or clears it; returns the old one.
    pub(super) fn set(&mut self, key: &KeyOf, state: Option<Requeue>) -> Option<Requeue> {
        let old = match state {
            Some(state) => self.flags.insert(key.clone(), state),
            None => self.flags.remove(key),
        };
        match old {
            Some(Requeue::Asked { write }) => {
                self.by_write.remove(&write);
            }
            Some(Requeue::Waiting { retry_at: Some(at) }) => {
                self.retries.remove(&(at, key.clone()));
            }
            _ => {}
        }
        match state {
            Some(Requeue::Asked { write }) => {
                self.by_write.insert(write, key.clone());
            }
            Some(Requeue::Waiting { retry_at: Some(at) }) => {
                self.retries.insert((at, key.clone()));
            }
            _ => {}
        }
        old
    }
}

impl Registry {
    /// Where this daemon's etcd lease stands, as last told (or as the core
    /// found it when its fence fell).
    pub fn lease(&self) -> LeaseView {
        self.lease
    }

    pub(super) fn lease_is_live(&self) -> bool {
        matches!(self.lease, LeaseView::Live { .. })
    }

    /// Whether the lease is live and this host's key `shared` was last
    /// shown on it.
    fn key_on_live_lease(&self, shared: &Shared) -> bool {
        matches!(self.lease, LeaseView::Live { lease, .. } if shared.key_lease == Some(lease))
    }

    /// The watch showed this host's key `key` on `lease`: its entry's key
    /// is noted to be there, and if it is first in its topic and that
    /// changes its suspension (its key moved to the live lease, say), its
    /// holder is told.
    pub(super) fn note_key_lease(&mut self, key: &KeyOf, lease: i64, out: &mut Outbox) {
        let Some(phx_ref) = self.shared_ids.get(key).cloned() else {
            return;
        };
        let noted = self
            .entry(&phx_ref)
            .and_then(|entry| entry.cluster.as_ref())
            .filter(|shared| !shared.remote)
            .map(|shared| shared.key_lease);
        if noted.is_none_or(|noted| noted == Some(lease)) {
            return;
        }
        let owner_before = self.local_shared_owner(&key.0);
        let Some((mut entry, meta_bytes)) = self.take(&phx_ref) else {
            return;
        };
        if let Some(shared) = entry.cluster.as_mut() {
            shared.key_lease = Some(lease);
        }
        self.insert(entry, meta_bytes);
        self.tell_owners_whose_suspension_changed(owner_before.into_iter().collect(), out);
    }

    /// Asks etcd to move to the live lease the key of each of this host's
    /// entries last shown on another lease, and not waiting to be created
    /// again: a restored entry whose move was dropped (asked while the
    /// lease was fenced) or has not shown yet, or whose key outlived the
    /// lease that ended. Until its key shows on the live lease the entry
    /// stands suspended; a key gone meanwhile shows as a delete, and the
    /// entry is queued again.
    fn ask_to_adopt_off_lease_keys(&mut self, out: &mut Outbox) {
        let LeaseView::Live { lease, .. } = self.lease else {
            return;
        };
        let off_lease: Vec<KeyOf> = self
            .entries()
            .filter(|entry| !self.is_leaving(entry))
            .filter_map(|entry| {
                let shared = entry.cluster.as_ref().filter(|shared| !shared.remote)?;
                let off = shared.key_lease.is_some_and(|on| on != lease);
                off.then(|| (entry.topic.clone(), shared.id.clone()))
            })
            .filter(|key| !self.requeue.contains_key(key))
            .collect();
        for key in off_lease {
            self.ask_adopt(key, out);
        }
    }

    /// Whether the owner of `topic` stands suspended: it is this host's
    /// entry of a shared topic, and either the lease is not live, or its
    /// key is gone and waits to be created again, or its key was last
    /// shown on another lease than the live one.
    pub(super) fn owner_suspended(&self, topic: &Topic) -> bool {
        topic
            .owner()
            .is_some_and(|owner| self.suspends_as_owner(owner))
    }

    /// Whether `entry`, first in its topic, stands suspended. Only a
    /// key on the live lease is sure to outlive the fence: a key still on
    /// another (the hand-over lease of a restart, before it is moved; a
    /// lease that ended, shown by a watch behind) may go at any moment,
    /// with no margin, and another host be given its place.
    fn suspends_as_owner(&self, entry: &Entry) -> bool {
        let Some(shared) = entry.cluster.as_ref().filter(|shared| !shared.remote) else {
            return false;
        };
        !self.key_on_live_lease(shared) || self.key_is_gone(entry)
    }

    /// The standing of the entry with `seq` in `topic` now.
    pub(super) fn standing_of(&self, topic: &str, seq: u64) -> Standing {
        let topic = self.topic(topic);
        topic.standing(seq, self.owner_suspended(topic))
    }

    /// What decides the standing of an entry at `position` in `topic` now.
    pub(super) fn standing_key_of(&self, topic: &str, position: usize) -> StandingKey {
        let topic = self.topic(topic);
        topic.standing_key_at(position, self.owner_suspended(topic))
    }

    /// Whether `entry`'s key is gone with an ended lease and waits to be
    /// created again: nothing of it is left in etcd to delete, so it may
    /// leave at once. So may an entry restored after a restart whose key
    /// is not confirmed yet: no other host can be told anything of it
    /// before the first listing, and that listing deletes its key, if
    /// the key is still there, for the reason it left for (see
    /// [`Registry::note_left_unconfirmed`]).
    pub(super) fn key_is_gone(&self, entry: &Entry) -> bool {
        !self.requeue.is_empty()
            && entry.cluster.as_ref().is_some_and(|shared| {
                self.requeue
                    .contains_key(&(entry.topic.clone(), shared.id.clone()))
            })
    }

    /// Refuses a new track of `topic`, if it is shared, while the lease
    /// is fenced or no longer kept: a key written now could outlive this
    /// host's place. While a lease is being granted (the daemon has just
    /// started, or etcd ended the last one) the track waits for it
    /// instead: its key is written only under a live lease, and a client
    /// that joins as the daemon starts should not be told to come back.
    pub(super) fn check_lease_for_track(&self, topic: &str) -> Result<(), ErrorBody> {
        match self.lease {
            LeaseView::Granting => Ok(()),
            _ => self.check_lease_for(topic),
        }
    }

    /// Refuses an update of `topic`, if it is shared, unless the lease is
    /// live: the entry's key may be gone with an ended lease, or about to
    /// go with a fenced one.
    pub(super) fn check_lease_for(&self, topic: &str) -> Result<(), ErrorBody> {
        if !self.is_shared(topic) {
            return Ok(());
        }
        let why = match self.lease {
            LeaseView::Live { .. } => return Ok(()),
            LeaseView::Fenced { .. } => {
                "this host's etcd lease is fenced (etcd has not answered its \
                 renewals in time)"
            }
            LeaseView::Granting => {
                "this host holds no etcd lease (none granted yet, or the \
                 last one ended)"
            }
            LeaseView::Stopped => "this host's etcd lease is no longer kept",
        };
        Err(ErrorBody::new(
            ErrorCode::Unavailable,
            format!(
                "{why}; topic `{topic}` is shared across hosts and cannot change here until \
                 a lease is live again; local topics are not affected"
            ),
        ))
    }

    /// Notes where this daemon's lease stands, and tells what changes with
    /// it. Between live and not live, each of this host's entries that is
    /// first in a shared topic changes standing: its holder is sent it in
    /// a `role` event, or, if no connection holds it, hears it on resume.
    /// A lease that ended took this host's keys with it: each of this
    /// host's entries of shared topics is flagged to be queued again, and
    /// once a lease is live its key is created again. The registry knows
    /// a lease ended when told `Granting` after it, or a view naming
    /// another lease: the keeper may have lost one lease and been granted
    /// the next before the core heard of either, and the new lease holds
    /// none of the keys written under the old one.
    ///
    /// Journaled, so a batch that fails to commit takes it back; applied
    /// again then, as a fact, it says everything again, once. The same
    /// view twice says nothing the second time.
    pub fn set_lease(&mut self, view: LeaseView, now: i64, out: &mut Outbox) {
        if view == self.lease {
            return;
        }
        // The lease this host's keys are on is the one the last view
        // named: each view naming a new lease flags every key to be
        // created again on it.
        let keys_lease = self.lease.lease();
        let ended = keys_lease.is_some()
            && match view {
                LeaseView::Granting => true,
                LeaseView::Live { .. } | LeaseView::Fenced { .. } => view.lease() != keys_lease,
                LeaseView::Stopped => false,
            };
        let was_live = self.lease_is_live();
        let owners_before = self.local_shared_owners();
        let old = self.lease;
        self.lease = view;
        self.record(|| Undo::Lease(old));
        if ended {
            let ids: Vec<(String, String)> = self
                .entries()
                // An entry on its way out is not queued again: the watch
                // shows its key gone with the lease, and it leaves then.
                .filter(|entry| !self.is_leaving(entry))
                .filter_map(|entry| {
                    let shared = entry.cluster.as_ref().filter(|shared| !shared.remote)?;
                    // A key last shown on another lease (a hand-over
                    // lease not moved from yet) did not end with this one:
                    // it is moved to the next live lease instead.
                    let on_ended = shared.key_lease.is_none_or(|on| Some(on) == keys_lease);
                    on_ended.then(|| (entry.topic.clone(), shared.id.clone()))
                })
                .collect();
            for key in ids {
                if !self.requeue.contains_key(&key) {
                    self.set_requeue(key, Some(Requeue::Waiting { retry_at: None }));
                }
            }
        }
        self.tell_owners_whose_suspension_changed(owners_before, out);
        if self.lease_is_live() && (!was_live || ended) {
            let flagged = self.requeue.keys().cloned().collect();
            self.ask_to_requeue(flagged, out);
            self.ask_to_adopt_off_lease_keys(out);
        }
        if view == LeaseView::Stopped {
            self.let_go_of_etcd(now, out);
        }
    }

    /// The lease is no longer kept: nothing more of etcd will be shown
    /// here. Other hosts' entries leave (`host_lost`: this host lost the
    /// cluster), since what they are becomes unknowable, and an entry
    /// shown forever after its host left would keep owning here. This
    /// host's entries on their way out leave for the reasons they were
    /// removed for, and the untracks waiting for them are answered: the
    /// delete either went through or the key goes with the lease, which
    /// nobody renews now. Tracks and updates still waiting for the watch
    /// are answered `unavailable`. This host's own entries stay,
    /// suspended: they are still its clients' and may be given places
    /// again by a later daemon, but without etcd none of them may own a
    /// shared topic.
    fn let_go_of_etcd(&mut self, now: i64, out: &mut Outbox) {
        let departing: Vec<(String, LeaveReason)> = self
            .entries()
            .filter_map(|entry| {
                let shared = entry.cluster.as_ref()?;
                if shared.remote {
                    return Some((entry.phx_ref.clone(), LeaveReason::HostLost));
                }
                let leaving = self.leaving.get(&shared.id)?;
                Some((entry.phx_ref.clone(), leaving.reason))
            })
            .collect();
        self.depart(departing, now, out);
        self.give_up_waiting_for_etcd(out);
    }

    /// This host's entries first in shared topics, each with its topic,
    /// seq and whether it stands suspended now.
    pub(super) fn local_shared_owners(&self) -> Vec<(String, u64, bool)> {
        if self.cluster.is_none() {
            return Vec::new();
        }
        self.topics
            .keys()
            .filter_map(|name| self.local_shared_owner(name))
            .collect()
    }

    /// This host's entry first in `topic_name`, if one is, with the topic,
    /// its seq and whether it stands suspended now.
    fn local_shared_owner(&self, topic_name: &str) -> Option<(String, u64, bool)> {
        let owner = self.topic(topic_name).owner()?;
        super::is_own_shared(owner).then(|| {
            (
                topic_name.to_owned(),
                owner.seq,
                self.suspends_as_owner(owner),
            )
        })
    }

    /// Tells each of `owners` (as [`Registry::local_shared_owners`] found
    /// them before a change) still first in its topic whose suspension
    /// changed: a `role` event to its holder, else a note for its resume.
    pub(super) fn tell_owners_whose_suspension_changed(
        &mut self,
        owners: Vec<(String, u64, bool)>,
        out: &mut Outbox,
    ) {
        for (topic_name, seq, suspended_before) in owners {
            let topic = self.topic(&topic_name);
            let Some(owner) = topic.owner().filter(|owner| owner.seq == seq) else {
                continue;
            };
            if self.suspends_as_owner(owner) == suspended_before {
                continue;
            }
            match owner.conn {
                Some(conn) => {
                    let standing = topic.standing_at(0, !suspended_before);
                    out.role(conn, topic_name, owner.phx_ref.clone(), standing);
                }
                None => {
                    let before = topic.standing_key_at(0, suspended_before);
                    self.note_told_before(&topic_name, seq, before);
                }
            }
        }
    }

    /// Asks etcd to create again the key of each of `flagged`, entries
    /// flagged to be queued again, under its same id (clients keep its
    /// refs), on the live lease. An entry that left meanwhile is not
    /// created again; if its key was asked for already, that key is
    /// deleted (after the creation, as the writes of one key go out in
    /// order). A creation asked before, on a lease that ended since, is
    /// asked again: if it went through after all, etcd refuses the second.
    /// An entry restored after a restart whose key is not confirmed yet
    /// waits for the first listing instead: its key may still be there.
    pub(super) fn ask_to_requeue(&mut self, flagged: Vec<(String, String)>, out: &mut Outbox) {
        let host = self.host();
        for key in flagged {
            let Some(&state) = self.requeue.get(&key) else {
                continue;
            };
            if state == Requeue::Unconfirmed {
                continue;
            }
            let entry = self
                .shared_ids
                .get(&key)
                .and_then(|phx_ref| self.entry(phx_ref))
                .filter(|entry| !self.is_leaving(entry));
            let Some(record) = entry.map(|entry| SharedRecord::of(entry, &host)) else {
                self.set_requeue(key.clone(), None);
                if matches!(state, Requeue::Asked { .. }) {
                    self.withdraw(key, out);
                }
                continue;
            };
            let (topic, id) = key.clone();
            let write = self.new_write();
            out.cluster.push(ClusterWrite::Create {
                write,
                topic,
                id,
                record,
            });
            self.set_requeue(key, Some(Requeue::Asked { write }));
        }
    }

    /// Deletes the key of `key` that was asked for again for an entry
    /// that has left since. Its true reason was told here when it left;
    /// other hosts saw it leave for `host_lost` and come back, and see it
    /// go again as withdrawn.
    fn withdraw(&mut self, key: (String, String), out: &mut Outbox) {
        self.ask_delete(key, LeaveReason::Untrack, None, out);
    }

    /// What etcd's watch showed of this host's own keys whose lease ended:
    /// applied here, and `true`, if `event` is one of them; otherwise
    /// `false`, for [`Registry::apply_cluster`] to go on with it. The
    /// deletes waiting in `departing` leave first, as the
    /// events are in revision order.
    ///
    /// A key of this host's deleted when this host asked for no delete of
    /// it (its entry is not leaving) is lost: with no reason it went with
    /// the lease; with one, another writer deleted it, and every other
    /// host saw the entry leave all the same. Either way the entry cannot
    /// go on owning here: it stays, suspended, flagged to be queued again
    /// (at once if the lease is live). The new key of such an entry, when
    /// it shows, moves the entry to the back of its queue.
    pub(super) fn apply_own_lost_key(
        &mut self,
        event: &ClusterEvent,
        departing: &mut Vec<(String, LeaveReason)>,
        now: i64,
        out: &mut Outbox,
    ) -> bool {
        let (topic, id) = match event {
            ClusterEvent::Put { topic, id, .. } | ClusterEvent::Delete { topic, id, .. } => {
                (topic, id)
            }
        };
        if !self.is_own_id(id) || !self.is_shared(topic) {
            return false;
        }
        let key = (topic.clone(), id.clone());
        let local = self
            .shared_ids
            .get(&key)
            .and_then(|phx_ref| self.entry(phx_ref))
            .filter(|entry| !entry.is_remote())
            .map(|entry| (entry.phx_ref.clone(), entry.seq));
        match event {
            ClusterEvent::Delete { reason, .. } => {
                if local.is_none() {
                    return false;
                }
                if self.requeue.contains_key(&key) {
                    // The old key's delete, shown after the lease ended.
                    return true;
                }
                if let Some((reason, _)) = reason {
                    tracing::warn!(
                        "this host's key `{id}` of `{topic}` was deleted for `{}`, which \
                         this host did not ask for; its entry is queued again",
                        reason.as_str()
                    );
                }
                self.depart(std::mem::take(departing), now, out);
                let owner_before = self.local_shared_owner(topic);
                self.set_requeue(key.clone(), Some(Requeue::Waiting { retry_at: None }));
                self.tell_owners_whose_suspension_changed(owner_before.into_iter().collect(), out);
                if self.lease_is_live() {
                    self.ask_to_requeue(vec![key], out);
                }
                true
            }
            ClusterEvent::Put {
                create_revision,
                lease,
                ..
            } => {
                if !self.requeue.contains_key(&key) {
                    return false;
                }
                self.depart(std::mem::take(departing), now, out);
                let taken = self.topic(topic).entries.contains_key(create_revision);
                match local {
                    Some((_, seq)) if seq == *create_revision => {
                        // The old key, shown again (a listing): the new one
                        // is still to come.
                    }
                    Some(_) if taken => {
                        // Another key holds that revision: only a writer
                        // other than presenced could have made both. The
                        // entry keeps its place, suspended.
                        tracing::warn!(
                            "the key `{id}` of `{topic}` was created again at revision \
                             {create_revision}, which another entry holds; left suspended"
                        );
                    }
                    Some((phx_ref, _)) => {
                        self.set_requeue(key, None);
                        self.move_to(&phx_ref, (*create_revision, *lease), now, out);
                    }
                    None => {
                        self.set_requeue(key.clone(), None);
                        self.withdraw(key, out);
                    }
                }
                true
            }
        }
    }

    /// Moves this host's entry `phx_ref` to the new create revision of its
    /// key, at the back of its queue: to everyone here it leaves for
    /// `host_lost` and joins again, as every other host saw it, and its
    /// holder is told its new place (or hears it on resume).
    fn move_to(
        &mut self,
        phx_ref: &str,
        (create_revision, lease): (u64, i64),
        now: i64,
        out: &mut Outbox,
    ) {
        let Some((topic_name, old_seq)) = self.entry(phx_ref).map(|e| (e.topic.clone(), e.seq))
        else {
            return;
        };
        let position = self.topic(&topic_name).entries.range(..old_seq).count();
        let told = self.forget_told(&topic_name, old_seq);
        let before = told.unwrap_or_else(|| self.standing_key_of(&topic_name, position));
        let Some((entry, meta_bytes)) = self.take(phx_ref) else {
            return;
        };
        self.announce_departures(
            &topic_name,
            vec![(entry.clone(), LeaveReason::HostLost)],
            now,
            out,
        );
        let mut moved = Entry {
            seq: create_revision,
            ..entry
        };
        if let Some(shared) = moved.cluster.as_mut() {
            shared.key_lease = Some(lease);
        }
        let conn = moved.conn;
        // The row keeps its ref and takes the new seq.
        out.changes.push(Change::Put(Box::new(moved.clone())));
        self.join(moved, meta_bytes, now, out);
        let standing = self.standing_of(&topic_name, create_revision);
        match conn {
            Some(conn) => out.role(conn, topic_name, phx_ref.to_owned(), standing),
            None => {
                let now_key = self.standing_key_of(&topic_name, standing.position);
                if now_key != before {
                    self.note_told_before(&topic_name, create_revision, before);
                }
            }
        }
    }

    /// etcd answered `write`: if it asked to create again the key of an
    /// entry whose lease ended, and was refused, the entry goes back to
    /// waiting, and is asked for again after [`REQUEUE_RETRY_PAUSE`] if
    /// the lease is live, or with the next live lease otherwise. Left
    /// asked, it would stay suspended for as long as the lease lives.
    /// Returns whether `write` was such a creation. A creation that went
    /// through changes nothing: the entry moves when the watch shows it.
    pub(super) fn requeue_written(&mut self, write: WriteId, outcome: &Written, now: i64) -> bool {
        let Some(key) = self.requeue.asked_by(write).cloned() else {
            return false;
        };
        if let Written::Refused(error) = outcome {
            tracing::warn!(
                "etcd refused to create again the key `{}` of `{}` ({}); asked again later",
                key.1,
                key.0,
                error.message
            );
            let pause = i64::try_from(REQUEUE_RETRY_PAUSE.as_millis()).unwrap_or(i64::MAX);
            let retry_at = self.lease_is_live().then(|| now.saturating_add(pause));
            self.set_requeue(key, Some(Requeue::Waiting { retry_at }));
        }
        true
    }

    /// When the first refused re-creation is due to be asked again (wall
    /// clock, ms).
    pub fn next_requeue_retry(&self) -> Option<i64> {
        self.requeue.next_retry()
    }

    /// Asks again for each refused re-creation whose pause is over at
    /// `now`. Without a live lease none is asked: the next live lease asks
    /// for every flagged entry's key anyway.
    pub fn retry_requeue(&mut self, now: i64, out: &mut Outbox) {
        let mut due = Vec::new();
        while let Some((at, key)) = self.requeue.retries.first().cloned() {
            if at > now {
                break;
            }
            self.set_requeue(key.clone(), Some(Requeue::Waiting { retry_at: None }));
            due.push(key);
        }
        if self.lease_is_live() && !due.is_empty() {
            self.ask_to_requeue(due, out);
        }
    }

    /// Flags `key` to be queued again as `state`, or unflags it (`None`),
    /// journaled.
    pub(super) fn set_requeue(&mut self, key: (String, String), state: Option<Requeue>) {
        let old = self.requeue.set(&key, state);
        if old != state {
            self.record(|| Undo::Requeue(key, old));
        }
    }

    /// Undoes [`Registry::set_lease`]'s and the flags' changes while a
    /// batch is rolled back.
    pub(super) fn undo_fence(&mut self, undo: Undo) {
        match undo {
            Undo::Lease(view) => self.lease = view,
            Undo::Requeue(key, state) => {
                self.requeue.set(&key, state);
            }
            _ => {}
        }
    }
}
