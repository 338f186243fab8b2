//! Other hosts' entries of shared topics, as etcd's watch shows them: the
//! core makes of them the diffs, history and standings a local change
//! makes, keeps a topic all local or all shared, and applies them again
//! after a failed commit.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::harness::*;
use crate::core::registry::{
    Change, ClusterChanges, ClusterEvent, ClusterInput, ClusterSetup, ClusterWrite,
    DEFAULT_PARK_TIMEOUT, LeaseView, MAX_WAITING_PER_CONNECTION, SharedRecord, SharedTopicsFn,
    Track, WriteId, Written,
};
use crate::core::{CoreConfig, Input, MAX_BATCH};
use crate::ops::Op;
use crate::ops::subscribe::Subscription;
use crate::protocol::{
    Empty, ErrorBody, ErrorCode, HistoryKind, LeaveReason, Lifetime, Limits, TrackRequest,
    UntrackRequest, UpdateRequest,
};

/// This host's name.
pub(super) const HOST: &str = "web-1";
/// The shared topic of these tests; `doc` stays local.
pub(super) const SHARED: &str = "pub:site";

/// A core of host [`HOST`] sharing the topics that start with `pub:`.
pub(super) fn cluster_config(limits: Limits) -> CoreConfig {
    cluster_config_as(HOST, limits)
}

/// A core of `host`, sharing the topics that start with `pub:`.
fn cluster_config_as(host: &str, limits: Limits) -> CoreConfig {
    CoreConfig {
        limits,
        max_batch: MAX_BATCH,
        own_uid: 0,
        cluster: Some(ClusterSetup::new(
            host,
            SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
        )),
    }
}

/// A clustered core of [`HOST`] whose lease is live.
pub(super) fn clustered(limits: Limits) -> H {
    clustered_as(HOST, limits)
}

/// When the lease of [`clustered`] fences, in ms after the core started:
/// a day off.
pub(super) const FENCE_IN_MS: u64 = 86_400_000;

/// A clustered core of `host` whose lease is live, its fence a day off:
/// shared topics are tracked only on a live lease.
fn clustered_as(host: &str, limits: Limits) -> H {
    let mut h = H::configured(cluster_config_as(host, limits), nothing_restored());
    h.committed_batch([lease(LeaseView::Live {
        lease: LEASE,
        fence_at: BOOT_AT_START + Duration::from_millis(FENCE_IN_MS),
    })]);
    h
}

/// The id of the lease the tests' cores hold.
pub(super) const LEASE: i64 = 7;

/// The lease keeper's word of where the lease stands.
pub(super) fn lease(view: LeaseView) -> Input {
    Input::Cluster(ClusterInput::Lease(view))
}

/// A clustered core with connection 2 subscribed to [`SHARED`], which
/// holds what `events` put there (up to `revision`); what connection 2
/// was told of it is read and set aside.
pub(super) fn watching(revision: u64, events: Vec<ClusterEvent>) -> H {
    let mut h = clustered(Limits::default());
    h.connect([2]);
    h.committed_batch([subscribe_to(2, 1, SHARED), changes(revision, events)]);
    h.lines(2);
    h
}

pub(super) fn record(key: &str, phx_ref: &str, meta: Value) -> SharedRecord {
    let Value::Object(meta) = meta else {
        panic!("a meta is an object");
    };
    SharedRecord {
        key: key.into(),
        phx_ref: phx_ref.into(),
        phx_ref_prev: None,
        meta,
        joined_at: WALL_AT_START - 5_000,
        pid: 77,
        uid: 1000,
        user: "bob".into(),
        host: phx_ref.split(':').next().unwrap_or_default().into(),
        lifetime: Lifetime::Connection,
        readable: true,
    }
}

pub(super) fn put_in(
    topic: &str,
    id: &str,
    create_revision: u64,
    record: SharedRecord,
) -> ClusterEvent {
    put_on(topic, id, create_revision, LEASE, record)
}

/// A key of `id` on `topic`, on `lease`.
pub(super) fn put_on(
    topic: &str,
    id: &str,
    create_revision: u64,
    lease: i64,
    record: SharedRecord,
) -> ClusterEvent {
    ClusterEvent::Put {
        topic: topic.into(),
        id: id.into(),
        create_revision,
        lease,
        record,
    }
}

/// A new key of `id` (also its ref) on the shared topic.
pub(super) fn put(id: &str, key: &str, create_revision: u64) -> ClusterEvent {
    put_in(SHARED, id, create_revision, record(key, id, json!({})))
}

pub(super) fn delete(id: &str, reason: Option<LeaveReason>) -> ClusterEvent {
    ClusterEvent::Delete {
        topic: SHARED.into(),
        id: id.into(),
        reason: reason.map(|reason| (reason, None)),
    }
}

pub(super) fn changes(revision: u64, events: Vec<ClusterEvent>) -> Input {
    Input::Cluster(ClusterInput::Changes(ClusterChanges { revision, events }))
}

pub(super) fn track_on(conn: u64, id: u64, topic: &str, key: &str) -> Input {
    track_with(conn, id, topic, key, false)
}

pub(super) fn track_with(conn: u64, id: u64, topic: &str, key: &str, subscribe: bool) -> Input {
    let track = Track {
        request: TrackRequest {
            topic: topic.into(),
            key: key.into(),
            meta: Map::new(),
            pid: None,
            lifetime: Lifetime::Connection,
            subscribe,
        },
        process: process_of(conn),
        token_hash: token_hash(key),
        token: format!("token-{key}"),
    };
    presence(conn, id, Op::Track(track))
}

pub(super) fn subscribe_to(conn: u64, id: u64, topic: &str) -> Input {
    presence(conn, id, Op::Subscribe(Subscription::Topic(topic.into())))
}

pub(super) fn list(conn: u64, id: u64, topic: &str) -> Input {
    presence(conn, id, Op::List(Some(topic.into())))
}

/// The kinds and reasons of the commit's history rows, and whether it
/// saves any entry row.
pub(super) fn history_of(
    changes: &[Change],
) -> (Vec<(HistoryKind, Option<LeaveReason>, String)>, bool) {
    let mut rows = false;
    let history = changes
        .iter()
        .filter_map(|change| match change {
            Change::History(event) => Some((event.kind, event.reason, event.phx_ref.clone())),
            Change::Put(_) | Change::Delete(_) => {
                rows = true;
                None
            }
        })
        .collect();
    (history, rows)
}

/// The refs of the topic's entries in a `list` reply, in the order shown:
/// by key, then by seq.
pub(super) fn refs_listed(reply: &Value) -> Vec<String> {
    let presences = reply["presences"].as_object().expect("presences");
    presences
        .values()
        .flat_map(|presence| presence["metas"].as_array().cloned().unwrap_or_default())
        .map(|meta| meta["phx_ref"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The shape of a line: its fields, and those of its payload, with the
/// values that name the entry left out.
fn shape(line: &Value) -> Vec<String> {
    let mut fields: Vec<String> = line
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    for (key, presence) in line["payload"]["joins"].as_object().into_iter().flatten() {
        fields.push(format!("join {key}"));
        for meta in presence["metas"].as_array().into_iter().flatten() {
            let names = meta
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>());
            fields.push(format!("meta {names:?}"));
        }
    }
    fields
}

#[test]
fn a_remote_join_makes_the_diff_and_history_a_local_join_makes() {
    // The local join, for comparison.
    let mut local = H::new();
    local.connect([1, 2]);
    local.committed_batch([subscribe(2, 1)]);
    local.lines(2);
    local.input(track(1, 1, "page"));
    let (local_history, _) = history_of(&local.burst().expect("a commit").changes);
    local.ok();
    let local_diff = local.lines(2);

    let mut h = clustered(Limits::default());
    h.connect([2]);
    h.committed_batch([subscribe_to(2, 1, SHARED)]);
    h.lines(2);
    h.input(changes(100, vec![put("web-2:p4", "page", 100)]));
    let (history, rows) = history_of(&h.burst().expect("its history is saved").changes);
    assert!(!rows, "another host's entry is no row here");
    let kinds = |history: &[(HistoryKind, Option<LeaveReason>, String)]| {
        history.iter().map(|(kind, ..)| *kind).collect::<Vec<_>>()
    };
    assert_eq!(kinds(&history), kinds(&local_history));
    assert_eq!(kinds(&history), [HistoryKind::Join, HistoryKind::Owner]);
    assert!(h.lines(2).is_empty(), "nothing before the commit");
    h.ok();

    let diff = h.lines(2);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(diff[0]["event"], "presence_diff");
    assert_eq!(shape(&diff[0]), shape(&local_diff[0]));
    let meta = &diff[0]["payload"]["joins"]["page"]["metas"][0];
    assert_eq!(meta["phx_ref"], "web-2:p4");
    assert_eq!(meta["seq"], 100, "the create revision");
    assert_eq!(meta["user"], "bob");
    assert_eq!(diff[0]["owner"]["phx_ref"], "web-2:p4");
}

#[test]
fn a_remote_owner_gone_without_a_reason_left_for_host_lost_and_the_next_owns() {
    let mut h = watching(
        11,
        vec![put("web-2:p1", "page", 10), put("web-3:p1", "page", 11)],
    );

    h.input(changes(12, vec![delete("web-2:p1", None)]));
    let (history, _) = history_of(&h.burst().expect("history").changes);
    assert_eq!(
        history,
        [
            (
                HistoryKind::Leave,
                Some(LeaveReason::HostLost),
                "web-2:p1".into()
            ),
            (HistoryKind::Owner, None, "web-3:p1".into()),
        ]
    );
    h.ok();
    let diff = h.lines(2);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(diff[0]["reasons"]["web-2:p1"], "host_lost");
    assert_eq!(diff[0]["owner"]["phx_ref"], "web-3:p1");

    // A reason written beside the delete is the one told.
    h.input(changes(
        13,
        vec![delete("web-3:p1", Some(LeaveReason::Untrack))],
    ));
    h.burst();
    h.ok();
    let diff = h.lines(2);
    assert_eq!(diff[0]["reasons"]["web-3:p1"], "untrack");
    assert_eq!(h.core.counts().entries, 0);
}

#[test]
fn the_deletes_of_one_message_leave_in_one_diff_per_topic() {
    let mut h = watching(
        12,
        vec![
            put("web-2:p1", "a", 10),
            put("web-2:p2", "b", 11),
            put("web-3:p1", "c", 12),
        ],
    );
    h.committed_batch([changes(
        13,
        vec![delete("web-2:p1", None), delete("web-2:p2", None)],
    )]);
    let diff = h.lines(2);
    assert_eq!(diff.len(), 1, "{diff:?}");
    let leaves = diff[0]["payload"]["leaves"].as_object().expect("leaves");
    assert_eq!(leaves.len(), 2, "{diff:?}");
    assert_eq!(diff[0]["owner"]["phx_ref"], "web-3:p1");
}

#[test]
fn a_remote_update_keeps_the_place_and_the_same_version_again_changes_nothing() {
    let mut h = watching(11, vec![put("web-2:p1", "a", 10), put("web-3:p1", "b", 11)]);

    let mut updated = record("a", "web-2:p5", json!({"mode": "edit"}));
    updated.phx_ref_prev = Some("web-2:p1".into());
    let update = put_in(SHARED, "web-2:p1", 10, updated);
    h.input(changes(12, vec![update.clone()]));
    let (history, rows) = history_of(&h.burst().expect("history").changes);
    assert!(!rows);
    assert_eq!(history, [(HistoryKind::Update, None, "web-2:p5".into())]);
    h.ok();
    let diff = h.lines(2);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(diff[0]["reasons"]["web-2:p1"], "update");
    assert_eq!(
        diff[0]["payload"]["leaves"]["a"]["metas"][0]["phx_ref"],
        "web-2:p1"
    );
    let joined = &diff[0]["payload"]["joins"]["a"]["metas"][0];
    assert_eq!(joined["phx_ref"], "web-2:p5");
    assert_eq!(joined["phx_ref_prev"], "web-2:p1");
    assert_eq!(joined["mode"], "edit");
    assert_eq!(diff[0]["owner"]["phx_ref"], "web-2:p5", "still the owner");

    // The same version again (its host moved it to another lease).
    h.input(changes(13, vec![update]));
    assert!(h.burst().is_none(), "nothing to save");
    assert!(h.lines(2).is_empty(), "nothing to tell");
}

#[test]
fn a_subscriber_is_shown_remote_entries_in_create_revision_order() {
    let mut h = clustered(Limits::default());
    h.connect([2]);
    // A listing need not come in revision order.
    h.committed_batch([changes(
        40,
        vec![
            put("web-3:p8", "page", 30),
            put("web-2:p2", "page", 20),
            put("web-4:p1", "page", 40),
        ],
    )]);
    h.committed_batch([list(2, 1, SHARED), subscribe_to(2, 2, SHARED)]);
    let lines = h.lines(2);
    assert_eq!(refs_listed(&lines[0]), ["web-2:p2", "web-3:p8", "web-4:p1"]);
    let state = lines
        .iter()
        .find(|line| line["event"] == "presence_state")
        .expect("a state");
    let metas = state["payload"]["page"]["metas"].as_array().expect("metas");
    let seqs: Vec<&Value> = metas.iter().map(|meta| &meta["seq"]).collect();
    assert_eq!(seqs, [20, 30, 40]);
}

#[test]
fn a_key_created_again_left_for_host_lost_and_joins_at_the_back() {
    let mut h = watching(11, vec![put("web-2:p1", "a", 10), put("web-3:p1", "b", 11)]);
    h.committed_batch([changes(12, vec![put("web-2:p1", "a", 12)])]);
    let diffs = h.lines(2);
    assert_eq!(diffs.len(), 2, "a leave, then a join: {diffs:?}");
    assert_eq!(diffs[0]["reasons"]["web-2:p1"], "host_lost");
    assert_eq!(diffs[1]["payload"]["joins"]["a"]["metas"][0]["seq"], 12);
    h.committed_batch([presence(2, 2, Op::List(None))]);
    let lines = h.lines(2);
    let topic = &lines[0]["topics"][SHARED];
    assert_eq!(topic["owner"]["phx_ref"], "web-3:p1", "{lines:?}");
    assert_eq!(topic["presences"]["a"]["metas"][0]["seq"], 12);
}

#[test]
fn events_of_topics_not_shared_and_of_this_host_are_ignored() {
    let mut h = clustered(Limits::default());
    h.connect([2]);
    h.input(changes(
        12,
        vec![
            put_in("doc", "web-2:p1", 10, record("a", "web-2:p1", json!({}))),
            put("web-1:p3", "mine", 11),
            put("p3", "no-host", 12),
        ],
    ));
    assert!(h.burst().is_none(), "nothing applied, nothing to save");
    // This host's key that nothing here claims is deleted, not shown.
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Delete { id, reason: LeaveReason::Untrack, .. } if id == "web-1:p3"),
        "{write:?}"
    );
    h.committed_batch([
        changes(13, vec![delete("web-1:p3", None)]),
        list(2, 1, SHARED),
        list(2, 2, "doc"),
    ]);
    let lines = h.lines(2);
    assert!(refs_listed(&lines[0]).is_empty(), "{lines:?}");
    assert!(refs_listed(&lines[1]).is_empty(), "{lines:?}");
    assert_eq!(h.core.counts().entries, 0);
}

#[test]
fn a_revision_another_key_holds_keeps_its_first_entry() {
    let mut h = clustered(Limits::default());
    h.connect([2]);
    h.committed_batch([
        changes(10, vec![put("web-2:p1", "a", 10), put("web-3:p1", "b", 10)]),
        list(2, 1, SHARED),
    ]);
    assert_eq!(refs_listed(&h.lines(2)[0]), ["web-2:p1"]);
}

#[test]
fn an_unreadable_value_keeps_its_place_with_an_empty_meta() {
    let mut h = clustered(Limits::default());
    h.connect([2]);
    let mut unreadable = record("a", "web-2:p1", json!({"secret": 1}));
    unreadable.readable = false;
    // Another host's ref, or this host's own, is not taken from a value.
    let mut foreign_ref = record("b", "web-1:p9", json!({}));
    foreign_ref.readable = true;
    h.committed_batch([
        changes(
            11,
            vec![
                put_in(SHARED, "web-2:p1", 10, unreadable),
                put_in(SHARED, "web-3:p1", 11, foreign_ref),
            ],
        ),
        list(2, 1, SHARED),
    ]);
    let lines = h.lines(2);
    assert_eq!(refs_listed(&lines[0]), ["web-2:p1", "web-3:p1"]);
    let meta = &lines[0]["presences"]["a"]["metas"][0];
    assert_eq!(meta.get("secret"), None, "{meta}");
}

#[test]
fn a_failed_commit_applies_the_cluster_changes_again() {
    let mut h = clustered(Limits::default());
    h.connect([2]);
    h.committed_batch([subscribe_to(2, 1, SHARED)]);
    h.lines(2);

    h.input(changes(10, vec![put("web-2:p1", "a", 10)]));
    assert!(h.burst().is_some());
    h.fail();
    assert!(h.lines(2).is_empty(), "nothing told of what was not saved");
    assert_eq!(
        h.core.counts().entries,
        0,
        "rolled back, to be applied again at the head of the next batch"
    );

    let retry = h.timeout().expect("the changes wait to be saved");
    h.at(retry);
    h.tick();
    let (history, _) = history_of(&h.burst().expect("saved again").changes);
    assert_eq!(history.len(), 2, "join and owner: {history:?}");
    h.ok();
    let diff = h.lines(2);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(
        diff[0]["payload"]["joins"]["a"]["metas"][0]["phx_ref"],
        "web-2:p1"
    );
    assert_eq!(h.core.counts().entries, 1, "applied once");
}

#[test]
fn remote_entries_past_the_cap_are_ignored_and_fill_no_local_room() {
    let limits = Limits {
        max_total_entries: 2,
        ..Limits::default()
    };
    let mut h = clustered(limits);
    h.connect([1, 2]);
    h.committed_batch([
        changes(
            12,
            vec![
                put("web-2:p1", "a", 10),
                put("web-2:p2", "b", 11),
                put("web-2:p3", "c", 12),
            ],
        ),
        list(2, 1, SHARED),
        track_on(1, 1, "doc", "page"),
    ]);
    assert_eq!(refs_listed(&h.lines(2)[0]), ["web-2:p1", "web-2:p2"]);
    assert_eq!(
        h.lines(1)[0]["ok"],
        true,
        "other hosts' entries fill no local room"
    );

    // A place freed is taken by the next new key.
    h.committed_batch([
        changes(14, vec![delete("web-2:p1", None), put("web-2:p4", "d", 14)]),
        list(2, 2, SHARED),
    ]);
    // Listed by key: `b`, then `d`.
    assert_eq!(refs_listed(&h.lines(2)[0]), ["web-2:p2", "web-2:p4"]);
}

// -- this host's own tracks of shared topics, through a made-up etcd --------

/// A small etcd: it writes each key the core asks for at the next
/// revision, answering the write and showing the change to the watch.
pub(super) struct FakeEtcd {
    revision: u64,
    /// The create revision of each key it holds, by id.
    created: HashMap<String, u64>,
    /// The lease the core's writes put keys on: the one live now.
    pub(super) lease: i64,
}

impl FakeEtcd {
    pub(super) fn at(revision: u64) -> FakeEtcd {
        FakeEtcd {
            revision,
            created: HashMap::new(),
            lease: LEASE,
        }
    }

    /// Rewrites the key an update asks for, keeping its create revision:
    /// what etcd answers, then what the watch shows.
    pub(super) fn rewrite(&mut self, write: &ClusterWrite) -> (Input, Input) {
        let ClusterWrite::Rewrite {
            write,
            topic,
            id,
            record,
        } = write
        else {
            panic!("a rewrite: {write:?}");
        };
        self.revision += 1;
        let created = self.created[id];
        let written = written(
            *write,
            Written::Rewritten {
                revision: self.revision,
            },
        );
        let put = changes(
            self.revision,
            vec![put_on(topic, id, created, self.lease, record.clone())],
        );
        (written, put)
    }

    /// Deletes the key a leave asks for, with its reason beside it: what
    /// the watch shows.
    fn delete(&mut self, write: &ClusterWrite) -> Input {
        let ClusterWrite::Delete {
            topic,
            id,
            reason,
            by,
            ..
        } = write
        else {
            panic!("a delete: {write:?}");
        };
        self.revision += 1;
        self.created.remove(id);
        let delete = ClusterEvent::Delete {
            topic: topic.clone(),
            id: id.clone(),
            reason: Some((*reason, by.clone())),
        };
        changes(self.revision, vec![delete])
    }

    /// The writes the core hands out now.
    pub(super) fn writes(h: &mut H) -> Vec<ClusterWrite> {
        std::iter::from_fn(|| h.core.poll_cluster_write()).collect()
    }

    /// Creates the key a write asks for: what etcd answers, then what
    /// the watch shows.
    pub(super) fn create(&mut self, write: &ClusterWrite) -> (Input, Input) {
        let ClusterWrite::Create {
            write,
            topic,
            id,
            record,
        } = write
        else {
            panic!("a create: {write:?}");
        };
        self.revision += 1;
        self.created.insert(id.clone(), self.revision);
        let written = written(
            *write,
            Written::Created {
                revision: self.revision,
            },
        );
        let put = changes(
            self.revision,
            vec![put_on(topic, id, self.revision, self.lease, record.clone())],
        );
        (written, put)
    }

    /// Refuses a write, as a lease past its fence would.
    pub(super) fn refuse(write: &ClusterWrite) -> Input {
        let ClusterWrite::Create { write, .. } = write else {
            panic!("a create: {write:?}");
        };
        let error = ErrorBody::new(ErrorCode::Unavailable, "etcd cannot be reached");
        written(*write, Written::Refused(error))
    }
}

pub(super) fn written(write: WriteId, outcome: Written) -> Input {
    Input::Cluster(ClusterInput::Written { write, outcome })
}

pub(super) fn ping(conn: u64, id: u64) -> Input {
    presence(conn, id, Op::Ping(Empty {}))
}

/// The one write the core hands out now.
pub(super) fn one_write(h: &mut H) -> ClusterWrite {
    let mut writes = FakeEtcd::writes(h);
    assert_eq!(writes.len(), 1, "{writes:?}");
    writes.remove(0)
}

#[test]
fn a_shared_track_is_answered_once_its_key_shows_and_that_is_saved() {
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    h.committed_batch([subscribe_to(2, 1, SHARED)]);
    h.lines(2);
    let mut etcd = FakeEtcd::at(40);

    h.input(track_on(1, 1, SHARED, "page"));
    let commit = h.burst().expect("the ref's number is saved");
    assert!(
        commit.changes.is_empty(),
        "no row yet: {:?}",
        commit.changes
    );
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "nothing goes to etcd before the commit"
    );
    h.ok();
    assert!(h.lines(1).is_empty(), "no reply before etcd answers");
    let write = one_write(&mut h);
    let ClusterWrite::Create { id, record, .. } = &write else {
        panic!("a create: {write:?}");
    };
    assert!(id.starts_with("web-1:p"), "{id}");
    assert_eq!(record.phx_ref, *id);
    assert_eq!(record.key, "page");
    assert_eq!(record.host, HOST);

    let (created, put) = etcd.create(&write);
    h.committed_batch([created]);
    assert!(h.lines(1).is_empty(), "etcd's answer alone reveals nothing");

    h.input(put);
    let (history, rows) = history_of(&h.burst().expect("the entry is saved").changes);
    assert!(rows, "this host's entry is a row");
    let kinds: Vec<HistoryKind> = history.iter().map(|(kind, ..)| *kind).collect();
    assert_eq!(kinds, [HistoryKind::Join, HistoryKind::Owner]);
    assert!(h.lines(1).is_empty(), "nothing before the commit");
    assert!(h.lines(2).is_empty(), "nothing before the commit");
    h.ok();

    let lines = h.lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["id"], 1);
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    assert_eq!(lines[0]["ref"], id.as_str());
    assert_eq!(lines[0]["seq"], 41, "the create revision");
    assert_eq!(lines[0]["role"], "owner", "{lines:?}");
    let diff = h.lines(2);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(
        diff[0]["payload"]["joins"]["page"]["metas"][0]["seq"], 41,
        "{diff:?}"
    );
    assert_eq!(h.core.counts().entries, 1);
}

#[test]
fn a_shared_track_behind_a_remote_owner_stands_first_in_line_even_if_the_watch_is_first() {
    let mut h = watching(10, vec![put("web-2:p1", "page", 10)]);
    h.connect([1]);
    let mut etcd = FakeEtcd::at(10);
    h.committed_batch([track_with(1, 1, SHARED, "mine", true)]);
    let (created, put) = etcd.create(&one_write(&mut h));

    // The watch shows the key before etcd's answer to the write comes.
    h.input(put);
    h.burst().expect("the entry is saved");
    assert!(h.lines(1).is_empty());
    h.ok();
    let lines = h.lines(1);
    assert_eq!(lines.len(), 2, "the reply, then the state: {lines:?}");
    assert_eq!(lines[0]["id"], 1);
    assert_eq!(lines[0]["role"], "spectator", "{lines:?}");
    assert_eq!(lines[0]["position"], 1, "{lines:?}");
    assert_eq!(lines[0]["owner"]["phx_ref"], "web-2:p1", "{lines:?}");
    assert_eq!(lines[1]["event"], "presence_state", "{lines:?}");
    assert_eq!(
        lines[1]["payload"]["mine"]["metas"][0]["seq"], 11,
        "the state shows the entry: {lines:?}"
    );

    // etcd's answer, late, changes nothing.
    h.input(created);
    assert!(h.burst().is_none(), "nothing to save");
    assert!(h.lines(1).is_empty());
}

#[test]
fn lines_to_a_connection_wait_behind_its_parked_track_and_others_do_not() {
    let mut h = clustered(Limits::default());
    h.connect([1, 3]);
    let mut etcd = FakeEtcd::at(0);
    h.committed_batch([
        track_on(1, 1, SHARED, "page"),
        ping(1, 2),
        track_on(1, 3, "doc", "page"),
        ping(3, 1),
        track_on(3, 2, "doc", "other"),
    ]);
    assert!(h.lines(1).is_empty(), "everything waits behind the track");
    let other = h.lines(3);
    assert_eq!(ids(&other)[..2], [json!(1), json!(2)], "{other:?}");

    let (created, put) = etcd.create(&one_write(&mut h));
    h.committed_batch([created, ping(1, 4)]);
    assert!(h.lines(1).is_empty(), "still waiting");
    h.committed_batch([put, ping(1, 5)]);
    let lines = h.lines(1);
    let replies: Vec<Value> = lines
        .iter()
        .filter(|line| line.get("id").is_some())
        .map(|line| line["id"].clone())
        .collect();
    assert_eq!(replies, [1, 2, 3, 4, 5], "in request order: {lines:?}");
    assert!(
        lines
            .iter()
            .all(|line| line.get("ok") == Some(&json!(true))),
        "{lines:?}"
    );

    // Nothing waits any more: the next reply goes at once.
    h.committed_batch([ping(1, 6)]);
    assert_eq!(ids(&h.lines(1)), [json!(6)]);
}

#[test]
fn a_refused_write_answers_its_error_and_frees_the_key_and_the_quota() {
    let limits = Limits {
        max_entries_per_uid: 1,
        ..Limits::default()
    };
    let mut h = clustered(limits);
    h.connect([1, 2]);
    h.committed_batch([track_on(1, 1, SHARED, "page")]);
    let write = one_write(&mut h);
    // While etcd answers, the track holds its key and its user's quota.
    h.committed_batch([track_on(1, 2, SHARED, "page"), track_on(2, 1, "doc", "x")]);
    let other = h.lines(2);
    assert_eq!(other[0]["error"]["code"], "limit_exceeded", "{other:?}");

    h.committed_batch([FakeEtcd::refuse(&write)]);
    let lines = h.lines(1);
    assert_eq!(ids(&lines), [json!(1), json!(2)], "{lines:?}");
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
    assert_eq!(lines[1]["error"]["code"], "already_tracked", "{lines:?}");

    h.committed_batch([track_on(2, 2, "doc", "x"), track_on(1, 3, "doc", "page")]);
    assert_eq!(h.lines(2)[0]["ok"], true, "the quota is free again");
    assert_eq!(h.core.counts().entries, 1);
}

#[test]
fn a_cancelled_track_counts_against_its_users_quota_until_etcd_answers() {
    let limits = Limits {
        max_entries_per_uid: 1,
        ..Limits::default()
    };
    let mut h = clustered(limits);
    h.connect([1, 2]);
    let mut etcd = FakeEtcd::at(0);
    h.committed_batch([track_on(1, 1, SHARED, "page")]);
    let write = one_write(&mut h);
    // Its connection closes before etcd answers: the key may still be
    // created, and until it is deleted it is the user's. Were it not
    // counted, a user could close and track again without end, each
    // track leaving a key behind.
    h.committed_batch([close(1)]);
    h.committed_batch([track_on(2, 1, "doc", "x")]);
    let lines = h.lines(2);
    assert_eq!(lines[0]["error"]["code"], "limit_exceeded", "{lines:?}");

    let (created, put) = etcd.create(&write);
    h.committed_batch([created, put]);
    assert!(matches!(one_write(&mut h), ClusterWrite::Delete { .. }));
    h.committed_batch([track_on(2, 2, "doc", "x")]);
    assert_eq!(h.lines(2)[0]["ok"], true, "the quota is free again");
}

#[test]
fn a_rolled_back_track_answers_internal_and_asks_nothing_of_etcd() {
    let mut h = clustered(Limits::default());
    h.connect([1]);
    h.input(track_on(1, 1, SHARED, "page"));
    h.burst().expect("a commit");
    h.fail();
    let lines = h.lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["error"]["code"], "internal", "{lines:?}");
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "no write of a failed batch"
    );

    // Nothing is held: the same key is tracked again.
    let mut etcd = FakeEtcd::at(0);
    h.committed_batch([track_on(1, 2, SHARED, "page")]);
    let (created, put) = etcd.create(&one_write(&mut h));
    h.committed_batch([created, put]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["id"], 2);
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
}

#[test]
fn a_rolled_back_put_answers_the_track_when_it_is_applied_again() {
    let mut h = clustered(Limits::default());
    h.connect([1]);
    let mut etcd = FakeEtcd::at(0);
    h.committed_batch([track_on(1, 1, SHARED, "page")]);
    let (created, put) = etcd.create(&one_write(&mut h));
    h.committed_batch([created]);
    h.input(put);
    h.burst().expect("a commit");
    h.fail();
    assert!(h.lines(1).is_empty(), "nothing told of what was not saved");

    let retry = h.timeout().expect("the changes wait to be saved");
    h.at(retry);
    h.tick();
    h.burst().expect("saved again");
    h.ok();
    let lines = h.lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["role"], "owner", "{lines:?}");
    assert_eq!(h.core.counts().entries, 1);
}

#[test]
fn a_connection_closed_before_its_key_shows_has_the_key_deleted_and_no_entry() {
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    h.committed_batch([subscribe_to(2, 1, SHARED)]);
    h.lines(2);
    let mut etcd = FakeEtcd::at(0);
    h.committed_batch([track_on(1, 1, SHARED, "page"), ping(1, 2)]);
    let write = one_write(&mut h);
    let ClusterWrite::Create { id, .. } = &write else {
        panic!("a create: {write:?}");
    };
    let id = id.clone();
    let (created, put) = etcd.create(&write);
    h.committed_batch([close(1)]);
    assert_eq!(h.lines(1), [json!("closed")], "what waited is dropped");

    h.committed_batch([created, put]);
    assert_eq!(h.core.counts().entries, 0);
    assert!(h.lines(2).is_empty(), "nobody is told of it");
    let delete = one_write(&mut h);
    let ClusterWrite::Delete {
        topic,
        id: deleted,
        reason,
        ..
    } = delete
    else {
        panic!("a delete: {delete:?}");
    };
    assert_eq!((topic.as_str(), deleted), (SHARED, id));
    assert_eq!(reason, LeaveReason::Closed);
}

#[test]
fn a_process_gone_before_its_key_shows_has_the_key_deleted_for_its_exit() {
    let mut h = clustered(Limits::default());
    h.connect([1]);
    let mut etcd = FakeEtcd::at(0);
    h.committed_batch([track_on(1, 1, SHARED, "page")]);
    let (created, put) = etcd.create(&one_write(&mut h));
    h.committed_batch([Input::ProcessExited(process_of(1))]);
    let lines = h.lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["error"]["code"], "not_found", "{lines:?}");
    h.committed_batch([created, put]);
    assert_eq!(h.core.counts().entries, 0);
    let delete = one_write(&mut h);
    assert!(
        matches!(
            delete,
            ClusterWrite::Delete {
                reason: LeaveReason::PidExit,
                ..
            }
        ),
        "{delete:?}"
    );
    // The connection is still open: the track was answered when the
    // process exited, and the connection's lines flow again.
    h.committed_batch([ping(1, 2)]);
    assert_eq!(ids(&h.lines(1)), [json!(2)]);
}

#[test]
fn events_to_a_gated_connection_wait_behind_its_parked_track_too() {
    let mut h = clustered(Limits::default());
    h.connect([1, 2, 3]);
    h.committed_batch([subscribe(1, 1), subscribe(3, 1)]);
    h.lines(1);
    h.lines(3);
    let mut etcd = FakeEtcd::at(0);
    h.committed_batch([track_on(1, 2, SHARED, "page"), track(2, 1, "x")]);
    assert_eq!(h.lines(2)[0]["ok"], true, "another connection's reply goes");
    assert_eq!(h.lines(3).len(), 1, "as does another subscriber's diff");
    assert!(h.lines(1).is_empty(), "the diff waits behind the track");

    let (created, put) = etcd.create(&one_write(&mut h));
    h.committed_batch([created, put]);
    let lines = h.lines(1);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["id"], 2, "the reply first: {lines:?}");
    assert_eq!(lines[1]["event"], "presence_diff", "{lines:?}");
}

// -- this host's shared entries leaving and changing, through etcd ----------

pub(super) fn untrack_ref(conn: u64, id: u64, phx_ref: &str) -> Input {
    let request = UntrackRequest {
        topic: SHARED.into(),
        phx_ref: Some(phx_ref.into()),
        key: None,
    };
    presence(conn, id, Op::Untrack(request))
}

fn untrack_key(conn: u64, id: u64, key: &str) -> Input {
    let request = UntrackRequest {
        topic: SHARED.into(),
        phx_ref: None,
        key: Some(key.into()),
    };
    presence(conn, id, Op::Untrack(request))
}

pub(super) fn update_ref(conn: u64, id: u64, phx_ref: &str, meta: Value) -> Input {
    let Value::Object(meta) = meta else {
        panic!("a meta is an object");
    };
    let request = UpdateRequest {
        topic: SHARED.into(),
        phx_ref: Some(phx_ref.into()),
        key: None,
        meta,
    };
    presence(conn, id, Op::Update(request))
}

/// Tracks `key` on the shared topic for `conn`, of `lifetime`, through
/// etcd, and returns its ref; the reply is read and set aside.
fn shown_track(h: &mut H, etcd: &mut FakeEtcd, conn: u64, key: &str, lifetime: Lifetime) -> String {
    let track = Track {
        request: TrackRequest {
            topic: SHARED.into(),
            key: key.into(),
            meta: Map::new(),
            pid: None,
            lifetime,
            subscribe: false,
        },
        process: process_of(conn),
        token_hash: token_hash(key),
        token: format!("token-{key}"),
    };
    h.committed_batch([presence(conn, 100, Op::Track(track))]);
    let (created, put) = etcd.create(&one_write(h));
    h.committed_batch([created, put]);
    let lines = h.lines(conn);
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    lines[0]["ref"].as_str().expect("a ref").to_owned()
}

/// A clustered core where connection 1 owns the shared topic and 3
/// stands behind it, both through `etcd`, and connection 2 subscribes.
fn owner_and_spectator(etcd: &mut FakeEtcd) -> (H, String, String) {
    let mut h = clustered(Limits::default());
    h.connect([1, 2, 3]);
    h.committed_batch([subscribe_to(2, 1, SHARED)]);
    let owner = shown_track(&mut h, etcd, 1, "page", Lifetime::Connection);
    let spectator = shown_track(&mut h, etcd, 3, "other", Lifetime::Connection);
    h.lines(2);
    (h, owner, spectator)
}

#[test]
fn an_untracked_shared_owner_keeps_its_place_until_etcd_shows_the_delete() {
    let mut etcd = FakeEtcd::at(10);
    let (mut h, owner, spectator) = owner_and_spectator(&mut etcd);

    h.input(untrack_ref(1, 1, &owner));
    let commit = h.burst().expect("its row goes at once");
    assert_eq!(
        commit.changes,
        [Change::Delete(owner.clone())],
        "only its row: nothing leaves yet"
    );
    h.ok();
    let delete = one_write(&mut h);
    let ClusterWrite::Delete { id, reason, by, .. } = &delete else {
        panic!("a delete: {delete:?}");
    };
    assert_eq!(
        (id.as_str(), *reason, by),
        (owner.as_str(), LeaveReason::Untrack, &None)
    );
    assert!(h.lines(1).is_empty(), "the reply waits for etcd");
    assert!(h.lines(2).is_empty(), "no diff before etcd deleted the key");
    assert!(
        h.lines(3).is_empty(),
        "nobody is promoted before etcd deleted the key"
    );
    h.committed_batch([list(2, 2, SHARED)]);
    // Listed by key: `other`, then `page`.
    assert_eq!(
        refs_listed(&h.lines(2)[0]),
        [spectator.clone(), owner.clone()]
    );

    h.input(etcd.delete(&delete));
    let commit = h.burst().expect("the leave is saved");
    assert!(
        commit.changes.contains(&Change::Delete(owner.clone())),
        "its row goes: {:?}",
        commit.changes
    );
    let (history, _) = history_of(&commit.changes);
    assert_eq!(
        history,
        [
            (
                HistoryKind::Leave,
                Some(LeaveReason::Untrack),
                owner.clone()
            ),
            (HistoryKind::Owner, None, spectator.clone()),
        ]
    );
    assert!(h.lines(1).is_empty(), "nothing before the commit");
    h.ok();
    let lines = h.lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        (&lines[0]["id"], &lines[0]["removed"]),
        (&json!(1), &json!(1))
    );
    let role = h.lines(3);
    assert_eq!(role.len(), 1, "{role:?}");
    assert_eq!(role[0]["payload"]["role"], "owner", "{role:?}");
    let diff = h.lines(2);
    assert_eq!(diff[0]["reasons"][&owner], "untrack", "{diff:?}");
    assert_eq!(h.core.counts().entries, 1);
}

#[test]
fn a_close_and_a_process_exit_delete_the_keys_of_shared_entries_for_their_reasons() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    let held = shown_track(&mut h, &mut etcd, 1, "page", Lifetime::Connection);
    let process = shown_track(&mut h, &mut etcd, 1, "run", Lifetime::Process);

    h.committed_batch([close(1)]);
    let delete = one_write(&mut h);
    assert!(
        matches!(&delete, ClusterWrite::Delete { id, reason: LeaveReason::Closed, .. } if *id == held),
        "{delete:?}"
    );
    h.committed_batch([etcd.delete(&delete), list(2, 1, SHARED)]);
    assert_eq!(
        refs_listed(&h.lines(2)[0]),
        std::slice::from_ref(&process),
        "the process entry stays"
    );

    h.committed_batch([Input::ProcessExited(process_of(1))]);
    let delete = one_write(&mut h);
    assert!(
        matches!(&delete, ClusterWrite::Delete { id, reason: LeaveReason::PidExit, .. } if *id == process),
        "{delete:?}"
    );
    h.input(etcd.delete(&delete));
    let (history, _) = history_of(&h.burst().expect("the leave is saved").changes);
    assert_eq!(
        history[0],
        (HistoryKind::Leave, Some(LeaveReason::PidExit), process)
    );
    h.ok();
    assert_eq!(h.core.counts().entries, 0);
}

#[test]
fn an_entry_another_connection_removes_names_it_and_its_holder_hears_once_the_key_is_gone() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1, 4]);
    let entry = shown_track(&mut h, &mut etcd, 1, "run", Lifetime::Process);

    // Connection 4, of the same uid, may remove the process entry.
    h.committed_batch([untrack_key(4, 1, "run")]);
    let delete = one_write(&mut h);
    let ClusterWrite::Delete { by, .. } = &delete else {
        panic!("a delete: {delete:?}");
    };
    assert_eq!(
        by.as_ref().map(|by| by.pid),
        Some(4004),
        "the remover: {delete:?}"
    );
    assert!(
        h.lines(1).is_empty(),
        "the holder hears nothing before the key is gone"
    );

    h.committed_batch([etcd.delete(&delete)]);
    let holder = h.lines(1);
    assert_eq!(holder.len(), 1, "{holder:?}");
    assert_eq!(holder[0]["event"], "removed", "{holder:?}");
    assert_eq!(holder[0]["payload"]["ref"], entry.as_str());
    assert_eq!(holder[0]["payload"]["by"]["pid"], 4004);
    assert_eq!(h.lines(4)[0]["removed"], 1);
}

#[test]
fn an_untrack_of_several_shared_entries_replies_once_every_delete_shows() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1, 5]);
    shown_track(&mut h, &mut etcd, 1, "page", Lifetime::Process);
    shown_track(&mut h, &mut etcd, 5, "page", Lifetime::Process);

    h.committed_batch([untrack_key(1, 1, "page"), ping(1, 2)]);
    let deletes = FakeEtcd::writes(&mut h);
    assert_eq!(deletes.len(), 2, "{deletes:?}");
    h.committed_batch([etcd.delete(&deletes[0])]);
    assert!(h.lines(1).is_empty(), "one delete still to show");
    h.committed_batch([etcd.delete(&deletes[1])]);
    let lines = h.lines(1);
    assert_eq!(
        ids(&lines),
        [json!(1), json!(2)],
        "in request order: {lines:?}"
    );
    assert_eq!(lines[0]["removed"], 2, "{lines:?}");
    assert_eq!(h.core.counts().entries, 0);
}

#[test]
fn a_rolled_back_untrack_answers_internal_and_asks_etcd_nothing() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1]);
    let entry = shown_track(&mut h, &mut etcd, 1, "page", Lifetime::Connection);

    // A local track shares the batch, which its row makes fail.
    h.inputs([untrack_ref(1, 1, &entry), track_on(1, 2, "doc", "x")]);
    h.burst().expect("a commit");
    h.fail();
    let lines = h.lines(1);
    assert_eq!(ids(&lines), [json!(1), json!(2)], "{lines:?}");
    assert_eq!(lines[0]["error"]["code"], "internal", "{lines:?}");
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "no write of a failed batch"
    );

    // Still held: it is untracked again.
    h.committed_batch([untrack_ref(1, 3, &entry)]);
    let delete = one_write(&mut h);
    h.committed_batch([etcd.delete(&delete)]);
    assert_eq!(h.lines(1)[0]["removed"], 1);
}

#[test]
fn an_update_of_a_shared_entry_is_answered_once_etcd_shows_it_and_keeps_the_place() {
    let mut etcd = FakeEtcd::at(10);
    let (mut h, owner, _) = owner_and_spectator(&mut etcd);

    h.committed_batch([
        update_ref(1, 1, &owner, json!({"mode": "edit"})),
        ping(1, 2),
    ]);
    assert!(h.lines(1).is_empty(), "the reply waits for etcd");
    assert!(h.lines(2).is_empty(), "no diff before etcd wrote it");
    let rewrite = one_write(&mut h);
    let ClusterWrite::Rewrite { id, record, .. } = &rewrite else {
        panic!("a rewrite: {rewrite:?}");
    };
    assert_eq!(id, &owner, "the key of the entry");
    assert_ne!(record.phx_ref, owner, "a new ref");
    assert!(record.phx_ref.starts_with("web-1:p"), "{record:?}");
    assert_eq!(record.phx_ref_prev.as_deref(), Some(owner.as_str()));
    assert_eq!(record.meta["mode"], "edit");
    let new_ref = record.phx_ref.clone();

    let (rewritten, put) = etcd.rewrite(&rewrite);
    h.committed_batch([rewritten]);
    assert!(h.lines(1).is_empty(), "etcd's answer alone reveals nothing");
    h.input(put);
    let commit = h.burst().expect("the new version is saved");
    assert!(commit.changes.contains(&Change::Delete(owner.clone())));
    let (history, _) = history_of(&commit.changes);
    assert_eq!(history, [(HistoryKind::Update, None, new_ref.clone())]);
    h.ok();
    let lines = h.lines(1);
    assert_eq!(
        ids(&lines),
        [json!(1), json!(2)],
        "in request order: {lines:?}"
    );
    assert_eq!(lines[0]["ref"], new_ref.as_str(), "{lines:?}");
    assert_eq!(lines[0]["prev_ref"], owner.as_str(), "{lines:?}");
    let diff = h.lines(2);
    assert_eq!(diff[0]["reasons"][&owner], "update", "{diff:?}");
    assert_eq!(
        diff[0]["owner"]["phx_ref"],
        new_ref.as_str(),
        "still the owner"
    );
    assert!(h.lines(3).is_empty(), "nobody's standing changed");
}

#[test]
fn a_second_update_while_one_waits_is_refused_and_a_refused_rewrite_answers_its_error() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1]);
    let entry = shown_track(&mut h, &mut etcd, 1, "page", Lifetime::Connection);

    h.committed_batch([
        update_ref(1, 1, &entry, json!({"n": 1})),
        update_ref(1, 2, &entry, json!({"n": 2})),
    ]);
    let rewrite = one_write(&mut h);
    let ClusterWrite::Rewrite { write, .. } = &rewrite else {
        panic!("a rewrite: {rewrite:?}");
    };
    let error = ErrorBody::new(ErrorCode::Unavailable, "the lease is fenced");
    h.committed_batch([written(*write, Written::Refused(error))]);
    let lines = h.lines(1);
    assert_eq!(ids(&lines), [json!(1), json!(2)], "{lines:?}");
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
    assert_eq!(lines[1]["error"]["code"], "limit_exceeded", "{lines:?}");

    // Nothing waits any more: the next update is sent.
    h.committed_batch([update_ref(1, 3, &entry, json!({"n": 3}))]);
    let (_, put) = etcd.rewrite(&one_write(&mut h));
    h.committed_batch([put]);
    assert_eq!(h.lines(1)[0]["prev_ref"], entry.as_str());
}

#[test]
fn an_update_overtaken_by_its_entrys_leave_is_answered_not_found() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    h.committed_batch([subscribe_to(2, 1, SHARED)]);
    let entry = shown_track(&mut h, &mut etcd, 1, "page", Lifetime::Process);
    h.lines(2);

    h.committed_batch([update_ref(1, 1, &entry, json!({"n": 1}))]);
    let rewrite = one_write(&mut h);
    h.committed_batch([Input::ProcessExited(process_of(1))]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "not_found", "{lines:?}");
    let delete = one_write(&mut h);

    // etcd wrote the update before the delete: the entry leaves as it
    // was shown here.
    let (_, put) = etcd.rewrite(&rewrite);
    h.committed_batch([put, etcd.delete(&delete)]);
    let diff = h.lines(2);
    assert_eq!(diff.len(), 1, "only the leave: {diff:?}");
    assert_eq!(diff[0]["reasons"][&entry], "pid_exit", "{diff:?}");
    assert_eq!(h.core.counts().entries, 0);
}

/// Runs the core's own work due at `ms`, and its commit if it needs one.
fn wake_at(h: &mut H, ms: u64) {
    h.at(ms);
    h.tick();
    h.committed_batch([]);
}

#[test]
fn a_track_etcd_does_not_show_in_time_is_answered_unavailable_and_its_key_deleted_later() {
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    h.committed_batch([subscribe_to(2, 1, SHARED)]);
    h.lines(2);
    let mut etcd = FakeEtcd::at(10);
    h.at(1_000);
    h.committed_batch([track_on(1, 1, SHARED, "page"), ping(1, 2)]);
    let (created, put) = etcd.create(&one_write(&mut h));
    let timeout = DEFAULT_PARK_TIMEOUT.as_millis() as u64;
    assert_eq!(h.timeout(), Some(1_000 + timeout), "woken when it is due");

    wake_at(&mut h, 1_000 + timeout - 1);
    assert!(h.lines(1).is_empty(), "not yet");
    wake_at(&mut h, 1_000 + timeout);
    let lines = h.lines(1);
    assert_eq!(
        ids(&lines),
        [json!(1), json!(2)],
        "in request order: {lines:?}"
    );
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
    assert_eq!(
        h.timeout(),
        Some(FENCE_IN_MS),
        "nothing waits any more but the lease's fence"
    );

    // The key shows after all: it is deleted, never shown here.
    h.committed_batch([created, put]);
    assert!(h.lines(2).is_empty(), "{:?}", h.lines(2));
    assert_eq!(h.core.counts().entries, 0);
    let delete = one_write(&mut h);
    assert!(
        matches!(
            delete,
            ClusterWrite::Delete {
                reason: LeaveReason::Untrack,
                ..
            }
        ),
        "{delete:?}"
    );
    // Nothing is held: the key is tracked again.
    h.committed_batch([track_on(1, 3, SHARED, "page")]);
    assert_eq!(FakeEtcd::writes(&mut h).len(), 1);
}

#[test]
fn an_update_answered_unavailable_is_still_applied_when_etcd_shows_it_and_its_holder_told() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1]);
    let entry = shown_track(&mut h, &mut etcd, 1, "page", Lifetime::Connection);

    h.committed_batch([update_ref(1, 1, &entry, json!({"n": 1}))]);
    let rewrite = one_write(&mut h);
    let due = h.timeout().expect("the update waits with a deadline");
    wake_at(&mut h, due);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");

    let (_, put) = etcd.rewrite(&rewrite);
    h.committed_batch([put]);
    let lines = h.lines(1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event"], "updated", "{lines:?}");
    assert_eq!(lines[0]["payload"]["prev_ref"], entry.as_str(), "{lines:?}");
    assert_eq!(lines[0]["payload"]["meta"]["n"], 1, "{lines:?}");
}

#[test]
fn an_untrack_answered_unavailable_still_removes_the_entry_when_etcd_shows_the_delete() {
    let mut etcd = FakeEtcd::at(10);
    let (mut h, owner, _) = owner_and_spectator(&mut etcd);

    h.committed_batch([untrack_ref(1, 1, &owner)]);
    let delete = one_write(&mut h);
    let due = h.timeout().expect("the untrack waits with a deadline");
    wake_at(&mut h, due);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
    assert!(h.lines(3).is_empty(), "still nobody promoted");

    h.committed_batch([etcd.delete(&delete)]);
    assert!(h.lines(1).is_empty(), "answered already");
    assert_eq!(h.lines(3)[0]["payload"]["role"], "owner");
    assert_eq!(h.core.counts().entries, 1);
}

#[test]
fn an_untrack_by_key_cancels_a_track_still_waiting_and_answers_at_once() {
    let mut h = clustered(Limits::default());
    h.connect([1]);
    let mut etcd = FakeEtcd::at(10);
    h.committed_batch([track_on(1, 1, SHARED, "page"), untrack_key(1, 2, "page")]);
    let lines = h.lines(1);
    assert_eq!(
        ids(&lines),
        [json!(1), json!(2)],
        "in request order: {lines:?}"
    );
    assert_eq!(lines[0]["error"]["code"], "not_found", "{lines:?}");
    assert_eq!(lines[1]["removed"], 1, "{lines:?}");

    let (created, put) = etcd.create(&one_write(&mut h));
    h.committed_batch([created, put]);
    assert_eq!(h.core.counts().entries, 0);
    let delete = one_write(&mut h);
    assert!(
        matches!(
            delete,
            ClusterWrite::Delete {
                reason: LeaveReason::Untrack,
                ..
            }
        ),
        "{delete:?}"
    );
}

#[test]
fn a_resume_of_a_token_whose_track_still_waits_is_refused() {
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    h.committed_batch([track_on(1, 1, SHARED, "page")]);
    h.committed_batch([resume(2, 1, "page")]);
    let lines = h.lines(2);
    let refused = &lines[0]["refused"]["token-page"];
    assert_eq!(refused["code"], "unavailable", "{lines:?}");
}

#[test]
fn a_key_etcd_created_but_the_watch_went_past_without_showing_is_answered_unavailable() {
    // etcd answers first; then the watch shows a later revision without it
    // (a relisting after the key came and went).
    let mut h = clustered(Limits::default());
    h.connect([1]);
    let mut etcd = FakeEtcd::at(10);
    h.committed_batch([track_on(1, 1, SHARED, "page")]);
    let (created, _) = etcd.create(&one_write(&mut h));
    h.committed_batch([created]);
    assert!(h.lines(1).is_empty());
    h.committed_batch([changes(13, vec![put("web-2:p1", "a", 13)])]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");

    // The watch first, then etcd's answer.
    h.committed_batch([track_on(1, 2, SHARED, "other")]);
    let write = one_write(&mut h);
    etcd.revision = 20;
    let (created, _) = etcd.create(&write);
    h.committed_batch([changes(30, vec![put("web-2:p2", "b", 30)])]);
    assert!(h.lines(1).is_empty(), "etcd has not said it created it yet");
    h.committed_batch([created]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "nothing left to delete"
    );
    assert_eq!(h.core.counts().entries, 2, "the other hosts' entries");
}

#[test]
fn a_connection_may_have_only_so_many_replies_waiting_for_etcd() {
    let mut h = clustered(Limits::default());
    h.connect([1]);
    let tracks = (0..MAX_WAITING_PER_CONNECTION as u64)
        .map(|n| track_on(1, n, SHARED, &format!("k{n}")))
        .collect::<Vec<_>>();
    h.committed_batch(tracks);
    let next = MAX_WAITING_PER_CONNECTION as u64;
    h.committed_batch([
        track_on(1, next, SHARED, "one-more"),
        track_on(1, next + 1, "doc", "local"),
    ]);
    let mut etcd = FakeEtcd::at(10);
    let writes = FakeEtcd::writes(&mut h);
    assert_eq!(
        writes.len(),
        MAX_WAITING_PER_CONNECTION,
        "the one past the bound asks nothing"
    );
    for write in &writes {
        let (created, put) = etcd.create(write);
        h.committed_batch([created, put]);
    }
    let lines = h.lines(1);
    let past = &lines[MAX_WAITING_PER_CONNECTION];
    assert_eq!(past["id"], next, "{past}");
    assert_eq!(past["error"]["code"], "limit_exceeded", "{past}");
    let message = past["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("waiting for etcd"), "{message}");
    assert_eq!(
        lines[MAX_WAITING_PER_CONNECTION + 1]["ok"],
        true,
        "a local topic's track is not bound"
    );
}

/// What the watch showed, as another host's core is handed it too.
fn seen_again(input: &Input) -> Input {
    let Input::Cluster(ClusterInput::Changes(changes)) = input else {
        panic!("the watch's changes: {input:?}");
    };
    Input::Cluster(ClusterInput::Changes(changes.clone()))
}

#[test]
fn another_host_sees_this_hosts_update_and_leave_with_the_reason_and_who_removed_it() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1, 4]);
    let mut other = clustered_as("web-2", Limits::default());
    other.connect([2]);
    other.committed_batch([subscribe_to(2, 1, SHARED)]);
    other.lines(2);

    // A process entry: another connection of its uid may remove it.
    let track = Track {
        request: TrackRequest {
            topic: SHARED.into(),
            key: "page".into(),
            meta: Map::new(),
            pid: None,
            lifetime: Lifetime::Process,
            subscribe: false,
        },
        process: process_of(1),
        token_hash: token_hash("page"),
        token: "token-page".into(),
    };
    h.committed_batch([presence(1, 1, Op::Track(track))]);
    let (created, put) = etcd.create(&one_write(&mut h));
    other.committed_batch([seen_again(&put)]);
    h.committed_batch([created, put]);
    let entry = h.lines(1)[0]["ref"].as_str().expect("a ref").to_owned();
    let joined = other.lines(2);
    assert_eq!(joined[0]["owner"]["phx_ref"], entry.as_str(), "{joined:?}");

    h.committed_batch([update_ref(1, 2, &entry, json!({"mode": "edit"}))]);
    let (_, put) = etcd.rewrite(&one_write(&mut h));
    other.committed_batch([seen_again(&put)]);
    h.committed_batch([put]);
    let new_ref = h.lines(1)[0]["ref"].as_str().expect("a ref").to_owned();
    let updated = other.lines(2);
    assert_eq!(updated[0]["reasons"][&entry], "update", "{updated:?}");
    assert_eq!(
        updated[0]["payload"]["joins"]["page"]["metas"][0]["phx_ref"],
        new_ref.as_str(),
        "the same ref on both hosts: {updated:?}"
    );

    h.committed_batch([untrack_key(4, 3, "page")]);
    let delete = one_write(&mut h);
    let ClusterWrite::Delete { by, .. } = &delete else {
        panic!("a delete: {delete:?}");
    };
    assert_eq!(by.as_ref().map(|by| by.pid), Some(4004), "{delete:?}");
    let deleted = etcd.delete(&delete);
    other.input(seen_again(&deleted));
    let (history, _) = history_of(&other.burst().expect("its history").changes);
    assert_eq!(
        history,
        [(
            HistoryKind::Leave,
            Some(LeaveReason::Untrack),
            new_ref.clone()
        )]
    );
    other.ok();
    let left = other.lines(2);
    assert_eq!(left[0]["reasons"][&new_ref], "untrack", "{left:?}");
    h.committed_batch([deleted]);
    assert_eq!(h.core.counts().entries, 0);
    assert_eq!(other.core.counts().entries, 0);
}

// -- reply order through etcd, at random -------------------------------------

/// One step of a random history for the reply-order test.
#[derive(Debug, Clone)]
enum OrderStep {
    /// A request from connection `conn` (1 to 3): a track, an update or an
    /// untrack of key `key` on the shared topic, a local track, or a ping.
    Ask { conn: u64, what: u8, key: u8 },
    /// etcd carries out the first write asked of the key of the `pick`th
    /// write asked, answering it before or after its watch shows it.
    Carry { pick: usize, answer_first: bool },
    /// etcd refuses the `pick`th write asked, if it is not a delete.
    Refuse { pick: usize },
    /// Time passes.
    Wait { ms: u64 },
    /// The next commit fails.
    Fail,
}

fn order_step() -> impl proptest::strategy::Strategy<Value = OrderStep> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (1..4u64, 0..5u8, 0..2u8).prop_map(|(conn, what, key)| OrderStep::Ask { conn, what, key }),
        5 => (0..6usize, any::<bool>())
            .prop_map(|(pick, answer_first)| OrderStep::Carry { pick, answer_first }),
        1 => (0..6usize).prop_map(|pick| OrderStep::Refuse { pick }),
        1 => (0..3_000u64).prop_map(|ms| OrderStep::Wait { ms }),
        1 => Just(OrderStep::Fail),
    ]
}

/// A clustered core, its made-up etcd, and what each connection asked and
/// was answered.
struct OrderWorld {
    h: H,
    etcd: FakeEtcd,
    asked: Vec<ClusterWrite>,
    ms: u64,
    next_id: HashMap<u64, u64>,
    /// The ids of the replies each connection was sent, in order.
    answered: HashMap<u64, Vec<u64>>,
}

impl OrderWorld {
    fn new() -> OrderWorld {
        let mut h = clustered(Limits::default());
        h.connect([1, 2, 3]);
        OrderWorld {
            h,
            etcd: FakeEtcd::at(10),
            asked: Vec::new(),
            ms: 0,
            next_id: HashMap::new(),
            answered: HashMap::new(),
        }
    }

    fn step(&mut self, step: &OrderStep) {
        let mut fail = false;
        let inputs = match *step {
            OrderStep::Ask { conn, what, key } => {
                let id = self.next_id.entry(conn).or_default();
                *id += 1;
                let key = format!("k{key}");
                let input = match what {
                    0 => track_on(conn, *id, SHARED, &key),
                    1 => {
                        let request = UpdateRequest {
                            topic: SHARED.into(),
                            phx_ref: None,
                            key: Some(key),
                            meta: Map::new(),
                        };
                        presence(conn, *id, Op::Update(request))
                    }
                    2 => untrack_key(conn, *id, &key),
                    3 => track_on(conn, *id, "doc", &key),
                    _ => ping(conn, *id),
                };
                vec![input]
            }
            OrderStep::Carry { pick, answer_first } => self.carry(pick, answer_first),
            OrderStep::Refuse { pick } => {
                if self.asked.is_empty() {
                    return;
                }
                let at = pick % self.asked.len();
                let write = match &self.asked[at] {
                    ClusterWrite::Create { write, .. } | ClusterWrite::Rewrite { write, .. } => {
                        *write
                    }
                    // Neither is answered.
                    ClusterWrite::Delete { .. } | ClusterWrite::Adopt { .. } => return,
                };
                self.asked.remove(at);
                let error = ErrorBody::new(ErrorCode::Unavailable, "fenced");
                vec![written(write, Written::Refused(error))]
            }
            OrderStep::Wait { ms } => {
                self.ms += ms;
                self.h.at(self.ms);
                self.h.tick();
                Vec::new()
            }
            OrderStep::Fail => {
                fail = true;
                Vec::new()
            }
        };
        self.h.inputs(inputs);
        if self.h.burst().is_some() {
            if fail {
                self.h.fail();
            } else {
                self.h.ok();
            }
        }
        // A failed batch's facts are retried on their own.
        while let Some(due) = self.h.timeout().filter(|due| *due <= self.ms) {
            self.h.at(self.ms.max(due));
            self.h.tick();
            if self.h.burst().is_some() {
                self.h.ok();
            }
        }
        self.asked.extend(FakeEtcd::writes(&mut self.h));
        for conn in 1..4 {
            let replies = self
                .h
                .lines(conn)
                .into_iter()
                .filter_map(|l| l["id"].as_u64());
            self.answered.entry(conn).or_default().extend(replies);
        }
    }

    /// etcd carries out the first write asked of the key of the `pick`th.
    fn carry(&mut self, pick: usize, answer_first: bool) -> Vec<Input> {
        if self.asked.is_empty() {
            return Vec::new();
        }
        let id_of = |write: &ClusterWrite| write.key().1.to_owned();
        let id = id_of(&self.asked[pick % self.asked.len()]);
        let Some(at) = self.asked.iter().position(|w| id_of(w) == id) else {
            return Vec::new();
        };
        let write = self.asked.remove(at);
        let (answer, shown) = match &write {
            ClusterWrite::Create { .. } => self.etcd.create(&write),
            ClusterWrite::Rewrite {
                write: asked, id, ..
            } => {
                if !self.etcd.created.contains_key(id) {
                    let error = ErrorBody::new(ErrorCode::NotFound, "no such key");
                    return vec![written(*asked, Written::Refused(error))];
                }
                self.etcd.rewrite(&write)
            }
            ClusterWrite::Delete { id, .. } => {
                if !self.etcd.created.contains_key(id) {
                    return Vec::new();
                }
                return vec![self.etcd.delete(&write)];
            }
            // Only a restart's entries are adopted; none is restored here.
            ClusterWrite::Adopt { .. } => return Vec::new(),
        };
        if answer_first {
            vec![answer, shown]
        } else {
            vec![shown, answer]
        }
    }

    /// Each connection was answered in request order, each request once
    /// at most; and once etcd has carried out everything and the park
    /// timeout has passed, each request once exactly.
    fn check(&self, done: bool) {
        for conn in 1..4 {
            let answered = self.answered.get(&conn).cloned().unwrap_or_default();
            let asked = self.next_id.get(&conn).copied().unwrap_or(0);
            let in_order: Vec<u64> = (1..=answered.len() as u64).collect();
            assert_eq!(answered, in_order, "connection {conn}, asked {asked}");
            if done {
                assert_eq!(answered.len() as u64, asked, "connection {conn}");
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Whatever etcd does with the writes (carries them out in any order,
    /// each key's in turn, answering before or after its watch shows
    /// them; refuses them; takes longer than the park timeout) and
    /// whatever commits fail, every connection is answered in the order it
    /// asked, and once etcd has done everything, answered every request.
    #[test]
    fn replies_keep_request_order_whatever_etcd_does(
        steps in proptest::collection::vec(order_step(), 1..60)
    ) {
        let mut world = OrderWorld::new();
        for step in &steps {
            world.step(step);
            world.check(false);
        }
        for _ in 0..1_000 {
            if world.asked.is_empty() {
                break;
            }
            world.step(&OrderStep::Carry { pick: 0, answer_first: true });
        }
        world.step(&OrderStep::Wait { ms: 60_000 });
        world.check(true);
    }
}

#[test]
fn an_untrack_refused_for_too_many_replies_waiting_changes_nothing() {
    let mut etcd = FakeEtcd::at(10);
    let mut h = clustered(Limits::default());
    h.connect([1, 5]);
    // Connection 5's process entry, which connection 1 (same uid) may
    // remove; and as many tracks of connection 1 waiting as may wait, one
    // of the same key.
    shown_track(&mut h, &mut etcd, 5, "page", Lifetime::Process);
    let bound = MAX_WAITING_PER_CONNECTION;
    let tracks = (0..bound as u64).map(|n| {
        let key = if n == 0 {
            "page".to_owned()
        } else {
            format!("k{n}")
        };
        track_on(1, n, SHARED, &key)
    });
    h.committed_batch(tracks);
    let creates = FakeEtcd::writes(&mut h);
    assert_eq!(creates.len(), bound);

    h.committed_batch([untrack_key(1, bound as u64, "page")]);
    assert!(FakeEtcd::writes(&mut h).is_empty(), "no delete asked");
    for write in &creates {
        let (created, put) = etcd.create(write);
        h.committed_batch([created, put]);
    }
    let lines = h.lines(1);
    let replies: Vec<&Value> = lines.iter().filter(|l| l.get("id").is_some()).collect();
    assert_eq!(replies.len(), bound + 1, "{replies:?}");
    assert!(
        replies[..bound].iter().all(|r| r["ok"] == true),
        "no track cancelled: {replies:?}"
    );
    assert_eq!(replies[bound]["error"]["code"], "limit_exceeded");
    assert_eq!(h.core.counts().entries, bound + 1, "nothing removed");
}

#[test]
fn a_track_answered_unavailable_whose_key_shows_later_has_it_deleted() {
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    h.committed_batch([subscribe_to(2, 1, SHARED), track_on(1, 2, SHARED, "page")]);
    h.lines(2);
    let write = one_write(&mut h);
    // etcd could not say whether the create went through, and the node
    // gave up: the track is answered `unavailable`.
    let error = ErrorBody::new(ErrorCode::Unavailable, "etcd cannot be reached");
    let ClusterWrite::Create { write: asked, .. } = &write else {
        panic!("a create: {write:?}");
    };
    h.committed_batch([written(*asked, Written::Refused(error))]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");

    // The first attempt was committed after all, and shows: nothing here
    // claims it, so it is deleted rather than left owning the topic on
    // every other host.
    let mut etcd = FakeEtcd::at(40);
    let (_, shown) = etcd.create(&write);
    h.input(shown);
    assert!(h.burst().is_none(), "nothing to save");
    let ClusterWrite::Create { id, .. } = &write else {
        unreachable!()
    };
    let delete = one_write(&mut h);
    assert!(
        matches!(&delete, ClusterWrite::Delete { id: deleted, reason: LeaveReason::Untrack, .. } if deleted == id),
        "{delete:?}"
    );
    assert!(h.lines(2).is_empty(), "never shown here");
    assert!(h.lines(1).is_empty());
}

#[test]
fn an_unclaimed_key_of_this_hosts_name_on_another_lease_is_left_to_that_lease() {
    // Another daemon given the same --host by mistake, waiting out this
    // one's claim, writes under the same name on its own lease: its keys
    // are not this daemon's to delete.
    let mut h = clustered(Limits::default());
    h.connect([1]);
    h.committed_batch([subscribe_to(1, 1, SHARED)]);
    h.lines(1);
    let mut elsewhere = FakeEtcd::at(40);
    elsewhere.lease = LEASE + 1;
    let id = format!("{HOST}:p77");
    let create = ClusterWrite::Create {
        write: WriteId(9_999),
        topic: SHARED.to_owned(),
        record: record("mallory", &id, json!({})),
        id,
    };
    let (_, shown) = elsewhere.create(&create);
    h.input(shown);
    assert!(h.burst().is_none(), "nothing to save");
    assert!(FakeEtcd::writes(&mut h).is_empty(), "no delete asked");
    assert!(h.lines(1).is_empty(), "never shown here");
}
