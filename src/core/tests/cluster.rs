//! Other hosts' entries of shared topics, as etcd's watch shows them: the
//! core makes of them the diffs, history and standings a local change
//! makes, keeps a topic all local or all shared, and applies them again
//! after a failed commit.

use serde_json::{Map, Value, json};

use super::harness::*;
use crate::core::registry::{
    Change, ClusterChanges, ClusterEvent, ClusterSetup, SharedRecord, SharedTopicsFn, Track,
};
use crate::core::{CoreConfig, Input, MAX_BATCH};
use crate::ops::Op;
use crate::ops::subscribe::Subscription;
use crate::protocol::{HistoryKind, LeaveReason, Lifetime, Limits, TrackRequest};

/// This host's name.
const HOST: &str = "web-1";
/// The shared topic of these tests; `doc` stays local.
const SHARED: &str = "pub:site";

fn clustered(limits: Limits) -> H {
    let config = CoreConfig {
        limits,
        max_batch: MAX_BATCH,
        own_uid: 0,
        cluster: Some(ClusterSetup {
            host: HOST.into(),
            shared: SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
        }),
    };
    H::configured(config, nothing_restored())
}

/// A clustered core with connection 2 subscribed to [`SHARED`], which
/// holds what `events` put there (up to `revision`); what connection 2
/// was told of it is read and set aside.
fn watching(revision: u64, events: Vec<ClusterEvent>) -> H {
    let mut h = clustered(Limits::default());
    h.connect([2]);
    h.committed_batch([subscribe_to(2, 1, SHARED), changes(revision, events)]);
    h.lines(2);
    h
}

fn record(key: &str, phx_ref: &str, meta: Value) -> SharedRecord {
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

fn put_in(topic: &str, id: &str, create_revision: u64, record: SharedRecord) -> ClusterEvent {
    ClusterEvent::Put {
        topic: topic.into(),
        id: id.into(),
        create_revision,
        record,
    }
}

/// A new key of `id` (also its ref) on the shared topic.
fn put(id: &str, key: &str, create_revision: u64) -> ClusterEvent {
    put_in(SHARED, id, create_revision, record(key, id, json!({})))
}

fn delete(id: &str, reason: Option<LeaveReason>) -> ClusterEvent {
    ClusterEvent::Delete {
        topic: SHARED.into(),
        id: id.into(),
        reason: reason.map(|reason| (reason, None)),
    }
}

fn changes(revision: u64, events: Vec<ClusterEvent>) -> Input {
    Input::Cluster(ClusterChanges { revision, events })
}

fn track_on(conn: u64, id: u64, topic: &str, key: &str) -> Input {
    let track = Track {
        request: TrackRequest {
            topic: topic.into(),
            key: key.into(),
            meta: Map::new(),
            pid: None,
            lifetime: Lifetime::Connection,
            subscribe: false,
        },
        process: process_of(conn),
        token_hash: token_hash(key),
        token: format!("token-{key}"),
    };
    presence(conn, id, Op::Track(track))
}

fn subscribe_to(conn: u64, id: u64, topic: &str) -> Input {
    presence(conn, id, Op::Subscribe(Subscription::Topic(topic.into())))
}

fn list(conn: u64, id: u64, topic: &str) -> Input {
    presence(conn, id, Op::List(Some(topic.into())))
}

/// The kinds and reasons of the commit's history rows, and whether it
/// saves any entry row.
fn history_of(changes: &[Change]) -> (Vec<(HistoryKind, Option<LeaveReason>, String)>, bool) {
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
fn refs_listed(reply: &Value) -> Vec<String> {
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
fn a_track_of_a_shared_topic_is_refused_unavailable() {
    let mut h = clustered(Limits::default());
    h.connect([1]);
    h.committed_batch([
        track_on(1, 1, SHARED, "page"),
        track_on(1, 2, "doc", "page"),
    ]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
    assert!(
        lines[0]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(SHARED)),
        "{lines:?}"
    );
    assert_eq!(lines[1]["ok"], true, "a local topic is tracked: {lines:?}");
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
