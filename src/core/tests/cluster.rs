//! Other hosts' entries of shared topics, as etcd's watch shows them: the
//! core makes of them the diffs, history and standings a local change
//! makes, keeps a topic all local or all shared, and applies them again
//! after a failed commit.

use std::time::Duration;

use serde_json::{Map, Value, json};

use super::harness::*;
use crate::core::registry::{
    Change, ClusterChanges, ClusterEvent, ClusterInput, ClusterSetup, ClusterWrite, LeaseView,
    SharedRecord, SharedTopicsFn, Track, WriteId, Written,
};
use crate::core::{CoreConfig, Input, MAX_BATCH};
use crate::ops::Op;
use crate::ops::subscribe::Subscription;
use crate::protocol::{
    Empty, ErrorBody, ErrorCode, HistoryKind, LeaveReason, Lifetime, Limits, TrackRequest,
};

/// This host's name.
pub(super) const HOST: &str = "web-1";
/// The shared topic of these tests; `doc` stays local.
pub(super) const SHARED: &str = "pub:site";

/// A core of host [`HOST`] sharing the topics that start with `pub:`.
pub(super) fn cluster_config(limits: Limits) -> CoreConfig {
    CoreConfig {
        limits,
        max_batch: MAX_BATCH,
        own_uid: 0,
        cluster: Some(ClusterSetup {
            host: HOST.into(),
            shared: SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
        }),
    }
}

/// A clustered core whose lease is live, its fence a day off: shared
/// topics are tracked only on a live lease.
pub(super) fn clustered(limits: Limits) -> H {
    let mut h = H::configured(cluster_config(limits), nothing_restored());
    h.committed_batch([lease(LeaseView::Live {
        fence_at: BOOT_AT_START + Duration::from_secs(86_400),
    })]);
    h
}

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
    ClusterEvent::Put {
        topic: topic.into(),
        id: id.into(),
        create_revision,
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

/// A small etcd: it creates each key the core asks for at the next
/// revision, answering the write and showing the key to the watch.
pub(super) struct FakeEtcd {
    revision: u64,
}

impl FakeEtcd {
    pub(super) fn at(revision: u64) -> FakeEtcd {
        FakeEtcd { revision }
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
        let written = written(
            *write,
            Written::Created {
                revision: self.revision,
            },
        );
        let put = changes(
            self.revision,
            vec![put_in(topic, id, self.revision, record.clone())],
        );
        (written, put)
    }

    /// Refuses a write, as a lease past its fence would.
    fn refuse(write: &ClusterWrite) -> Input {
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
