//! This host's entries of shared topics across a restart: restored from
//! their rows, suspended until the first listing of etcd, then confirmed
//! in their places (their keys moved to the live lease) or queued again at
//! the back if their keys are gone; keys nobody here claims are deleted,
//! and rows that the cluster setup no longer fits leave.

use std::time::Duration;

use serde_json::{Value, json};

use super::cluster::{
    FENCE_IN_MS, FakeEtcd, HOST, LEASE, SHARED, changes, cluster_config, delete, history_of, lease,
    list, one_write, put, put_in, put_on, record, refs_listed, untrack_ref,
};
use super::harness::*;
use crate::core::registry::{
    Change, ClusterChanges, ClusterEvent, ClusterInput, ClusterWrite, Entry, LeaseView,
};
use crate::core::{Input, Restored};
use crate::protocol::{HistoryKind, LeaveReason, Lifetime, Limits};

/// A row of this host's entry `phx_ref` of the shared topic, at the
/// create revision `seq`, as the store holds it.
fn own_row(key: &str, phx_ref: &str, seq: u64, lifetime: Lifetime) -> Entry {
    Entry {
        topic: SHARED.into(),
        phx_ref: phx_ref.into(),
        resume_deadline: (lifetime == Lifetime::Connection).then_some(WALL_AT_START + 10_000),
        ..stored_entry(key, seq, lifetime)
    }
}

/// A clustered core of [`HOST`] restoring `kept` (and `departed`), its
/// first commit done, its lease live.
fn restarted(kept: Vec<Entry>, departed: Vec<Entry>) -> H {
    let restored = Restored {
        kept,
        departed,
        next_seq: 20,
    };
    let mut h = H::configured(cluster_config(Limits::default()), restored);
    if h.burst().is_some() {
        h.ok();
    }
    h.committed_batch([lease(LeaseView::Live {
        lease: LEASE,
        fence_at: BOOT_AT_START + Duration::from_millis(FENCE_IN_MS),
    })]);
    h
}

/// The first listing of etcd, at `revision`.
fn listing(revision: u64, events: Vec<ClusterEvent>) -> Input {
    Input::Cluster(ClusterInput::Listing(ClusterChanges { revision, events }))
}

/// The key of this host's entry `id`, showing `phx_ref`, at `revision`.
fn own_key(id: &str, phx_ref: &str, key: &str, revision: u64) -> ClusterEvent {
    put_in(SHARED, id, revision, record(key, phx_ref, json!({})))
}

/// The lease a stopped daemon handed this host's keys over to.
const HANDOVER: i64 = 99;

/// This host's key `id`, showing `phx_ref`, at `revision`, on `lease`.
fn own_key_on(id: &str, phx_ref: &str, key: &str, revision: u64, lease: i64) -> ClusterEvent {
    put_on(SHARED, id, revision, lease, record(key, phx_ref, json!({})))
}

/// The lease the tests' cores hold is live, its fence a day off.
fn live() -> Input {
    lease(LeaseView::Live {
        lease: LEASE,
        fence_at: BOOT_AT_START + Duration::from_millis(FENCE_IN_MS),
    })
}

/// The standing a `resume` reply gives the entry `phx_ref`.
fn resumed_standing(lines: &[Value], phx_ref: &str) -> Value {
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    lines[0]["roles"][phx_ref].clone()
}

/// The `role` events among the lines, their payloads.
fn roles(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .filter(|line| line["event"] == "role")
        .map(|line| line["payload"].clone())
        .collect()
}

#[test]
fn a_restored_owner_stands_suspended_until_the_listing_finds_its_key_then_owns_in_its_place() {
    let mine = format!("{HOST}:p3");
    let mut h = restarted(
        vec![own_row("page", &mine, 7, Lifetime::Connection)],
        Vec::new(),
    );
    h.connect([1]);
    h.committed_batch([resume(1, 1, "page")]);
    let standing = resumed_standing(&h.lines(1), &mine);
    assert_eq!(standing["role"], "spectator", "{standing}");
    assert_eq!(standing["suspended"], true, "{standing}");
    assert_eq!(standing["position"], 0, "{standing}");
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "nothing is asked of etcd before the listing"
    );

    // The listing: the key where the hand-over left it, and another
    // host's entry behind it.
    h.input(listing(
        12,
        vec![
            own_key(&mine, &mine, "page", 7),
            put("web-2:p1", "other", 9),
        ],
    ));
    let commit = h.burst().expect("the other host's entry joins");
    let (history, _) = history_of(&commit.changes);
    assert_eq!(
        history,
        [(HistoryKind::Join, None, "web-2:p1".to_owned())],
        "this host's entry neither left nor joined"
    );
    h.ok();
    let write = one_write(&mut h);
    assert_eq!(
        write,
        ClusterWrite::Adopt {
            write: match &write {
                ClusterWrite::Adopt { write, .. } => *write,
                other => panic!("an adoption: {other:?}"),
            },
            topic: SHARED.into(),
            id: mine.clone(),
        }
    );
    let told = roles(&h.lines(1));
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0]["role"], "owner", "{told:?}");
    assert_eq!(told[0]["position"], 0, "{told:?}");
    assert_eq!(told[0].get("suspended"), None, "{told:?}");

    // Moved to the live lease, the key shows again as it was: nothing
    // changes.
    h.input(changes(13, vec![own_key(&mine, &mine, "page", 7)]));
    assert!(h.burst().is_none(), "nothing to save");
    assert!(h.lines(1).is_empty());
    h.committed_batch([list(1, 2, SHARED)]);
    let lines = h.lines(1);
    let mut shown = refs_listed(&lines[0]);
    shown.sort();
    assert_eq!(shown, [mine, "web-2:p1".to_owned()]);
}

#[test]
fn a_restored_entry_whose_key_is_gone_is_queued_again_at_the_back() {
    let mine = format!("{HOST}:p3");
    let mut h = restarted(
        vec![own_row("page", &mine, 5, Lifetime::Process)],
        Vec::new(),
    );
    h.committed_batch([listing(12, vec![put("web-2:p1", "other", 8)])]);
    let write = one_write(&mut h);
    let ClusterWrite::Create { id, record, .. } = &write else {
        panic!("its key created again: {write:?}");
    };
    assert_eq!(
        (id.as_str(), record.phx_ref.as_str()),
        (mine.as_str(), mine.as_str())
    );

    let mut etcd = FakeEtcd::at(12);
    let (created, shown) = etcd.create(&write);
    h.input(created);
    h.input(shown);
    let commit = h.burst().expect("it moves to its new revision");
    let (history, _) = history_of(&commit.changes);
    assert_eq!(
        history,
        [
            (
                HistoryKind::Leave,
                Some(LeaveReason::HostLost),
                mine.clone()
            ),
            (HistoryKind::Owner, None, "web-2:p1".to_owned()),
            (HistoryKind::Join, None, mine.clone()),
        ],
        "as every other host saw it: gone with the lease, back at the back"
    );
    assert!(
        commit
            .changes
            .iter()
            .any(|change| matches!(change, Change::Put(entry) if entry.seq == 13)),
        "its row takes the new revision: {:?}",
        commit.changes
    );
    h.ok();
}

#[test]
fn an_updated_entry_is_found_by_its_revision_and_ref_and_filed_under_its_key() {
    // Tracked as p3, updated since to p9: the row keeps only the latest.
    let tracked_as = format!("{HOST}:p3");
    let now = format!("{HOST}:p9");
    let mut row = own_row("page", &now, 7, Lifetime::Connection);
    row.prev_ref = Some(format!("{HOST}:p8"));
    let mut h = restarted(vec![row], Vec::new());
    h.committed_batch([listing(12, vec![own_key(&tracked_as, &now, "page", 7)])]);
    assert!(
        matches!(one_write(&mut h), ClusterWrite::Adopt { id, .. } if id == tracked_as),
        "the key it was tracked with is moved"
    );

    h.connect([1]);
    h.committed_batch([resume(1, 1, "page")]);
    h.lines(1);
    h.committed_batch([untrack_ref(1, 2, &now)]);
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Delete { id, reason: LeaveReason::Untrack, .. } if *id == tracked_as),
        "its key is deleted by the id it was tracked with: {write:?}"
    );
}

#[test]
fn keys_no_restored_entry_claims_are_deleted_for_the_reason_they_left() {
    let stays = format!("{HOST}:p3");
    let exited = format!("{HOST}:p4");
    let stray = format!("{HOST}:p5");
    let mut h = restarted(
        vec![own_row("page", &stays, 7, Lifetime::Process)],
        vec![own_row("gone", &exited, 8, Lifetime::Process)],
    );
    h.committed_batch([listing(
        12,
        vec![
            own_key(&stays, &stays, "page", 7),
            own_key(&exited, &exited, "gone", 8),
            own_key(&stray, &stray, "stray", 9),
        ],
    )]);
    let mut writes: Vec<(String, String)> = FakeEtcd::writes(&mut h)
        .into_iter()
        .map(|write| match write {
            ClusterWrite::Adopt { id, .. } => (id, "adopt".to_owned()),
            ClusterWrite::Delete { id, reason, .. } => (id, format!("delete {reason:?}")),
            other => panic!("{other:?}"),
        })
        .collect();
    writes.sort();
    assert_eq!(
        writes,
        [
            (stays, "adopt".to_owned()),
            (exited, format!("delete {:?}", LeaveReason::ExitedWhileDown)),
            (stray, format!("delete {:?}", LeaveReason::Expired)),
        ]
    );
}

#[test]
fn a_restored_entry_that_leaves_before_the_listing_goes_at_once_and_its_key_after() {
    let mine = format!("{HOST}:p3");
    let mut h = restarted(
        vec![own_row("page", &mine, 7, Lifetime::Process)],
        Vec::new(),
    );
    let process = own_row("page", &mine, 7, Lifetime::Process).process;
    h.input(Input::ProcessExited(process));
    let commit = h.burst().expect("it leaves");
    let (history, rows) = history_of(&commit.changes);
    assert_eq!(
        history,
        [(HistoryKind::Leave, Some(LeaveReason::PidExit), mine.clone())]
    );
    assert!(rows, "its row goes");
    h.ok();
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "nothing asked before the listing"
    );

    h.committed_batch([listing(12, vec![own_key(&mine, &mine, "page", 7)])]);
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Delete { id, reason: LeaveReason::PidExit, .. } if *id == mine),
        "{write:?}"
    );
}

#[test]
fn rows_that_the_cluster_setup_no_longer_fits_leave_as_expired() {
    let other_host = "web-9:p3".to_owned();
    let unshared = Entry {
        topic: "doc".into(),
        phx_ref: format!("{HOST}:p4"),
        ..stored_entry("notes", 4, Lifetime::Process)
    };
    let restored = Restored {
        kept: vec![own_row("page", &other_host, 7, Lifetime::Process), unshared],
        departed: Vec::new(),
        next_seq: 20,
    };
    let mut h = H::configured(cluster_config(Limits::default()), restored);
    assert_eq!(h.core.counts().entries, 0, "neither is restored");
    let commit = h.burst().expect("their rows go");
    let mut deleted: Vec<&str> = commit
        .changes
        .iter()
        .filter_map(|change| match change {
            Change::Delete(phx_ref) => Some(phx_ref.as_str()),
            _ => None,
        })
        .collect();
    deleted.sort_unstable();
    let unshared_ref = format!("{HOST}:p4");
    assert_eq!(deleted, [unshared_ref.as_str(), other_host.as_str()]);
    let (history, _) = history_of(&commit.changes);
    assert!(
        history
            .iter()
            .filter(|(kind, _, _)| *kind == HistoryKind::Leave)
            .all(|(_, reason, _)| *reason == Some(LeaveReason::Expired)),
        "{history:?}"
    );
    h.ok();
}

#[test]
fn an_update_of_a_restored_entry_waits_for_the_listing() {
    let mine = format!("{HOST}:p3");
    let mut h = restarted(
        vec![own_row("page", &mine, 7, Lifetime::Connection)],
        Vec::new(),
    );
    h.connect([1]);
    h.committed_batch([resume(1, 1, "page")]);
    h.lines(1);
    h.committed_batch([super::cluster::update_ref(
        1,
        2,
        &mine,
        json!({"status": "away"}),
    )]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["ok"], false, "{lines:?}");
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
    assert!(FakeEtcd::writes(&mut h).is_empty());
}

#[test]
fn a_local_row_of_a_topic_shared_now_leaves_and_the_topic_is_shared_from_the_start() {
    // Tracked before cluster mode: a plain ref, a seq of the counter.
    let local = Entry {
        topic: SHARED.into(),
        ..stored_entry("page", 4, Lifetime::Process)
    };
    let restored = Restored {
        kept: vec![local],
        departed: Vec::new(),
        next_seq: 20,
    };
    let mut h = H::configured(cluster_config(Limits::default()), restored);
    assert_eq!(h.core.counts().entries, 0, "it is not restored");
    let commit = h.burst().expect("its row goes");
    assert!(
        commit
            .changes
            .iter()
            .any(|change| matches!(change, Change::Delete(phx_ref) if phx_ref == "p4")),
        "{:?}",
        commit.changes
    );
    let (history, _) = history_of(&commit.changes);
    assert_eq!(
        history,
        [(
            HistoryKind::Leave,
            Some(LeaveReason::Expired),
            "p4".to_owned()
        )]
    );
    h.ok();
    h.committed_batch([lease(LeaseView::Live {
        lease: LEASE,
        fence_at: BOOT_AT_START + Duration::from_millis(FENCE_IN_MS),
    })]);

    // Another host's entry of the topic is shown here, owning it as it
    // does everywhere.
    h.connect([1]);
    h.committed_batch([listing(12, vec![put("web-2:p1", "other", 9)])]);
    h.committed_batch([list(1, 1, SHARED)]);
    let lines = h.lines(1);
    assert_eq!(refs_listed(&lines[0]), ["web-2:p1"], "{lines:?}");
}

#[test]
fn a_restored_owner_found_on_the_hand_over_lease_owns_only_once_its_key_shows_on_the_live_one() {
    let mine = format!("{HOST}:p3");
    let mut h = restarted(
        vec![own_row("page", &mine, 7, Lifetime::Connection)],
        Vec::new(),
    );
    h.connect([1]);
    h.committed_batch([resume(1, 1, "page")]);
    h.lines(1);

    // Confirmed where the hand-over left it: its place is kept, but the
    // hand-over lease ends after the resume grace, with no fence here.
    h.committed_batch([listing(
        12,
        vec![own_key_on(&mine, &mine, "page", 7, HANDOVER)],
    )]);
    assert!(
        matches!(one_write(&mut h), ClusterWrite::Adopt { id, .. } if id == mine),
        "its key is moved"
    );
    assert!(roles(&h.lines(1)).is_empty(), "still suspended");

    // The move was dropped (the lease fenced as it was sent): it is
    // asked again once the lease is live again.
    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE })]);
    assert!(FakeEtcd::writes(&mut h).is_empty());
    h.committed_batch([live()]);
    assert!(
        matches!(one_write(&mut h), ClusterWrite::Adopt { id, .. } if id == mine),
        "asked again"
    );
    assert!(roles(&h.lines(1)).is_empty(), "still suspended");

    // The key shows on the live lease: now it owns.
    h.input(changes(
        13,
        vec![own_key_on(&mine, &mine, "page", 7, LEASE)],
    ));
    assert!(h.burst().is_none(), "nothing to save");
    let told = roles(&h.lines(1));
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0]["role"], "owner", "{told:?}");
    assert_eq!(told[0].get("suspended"), None, "{told:?}");
}

#[test]
fn a_restored_entry_whose_hand_over_lease_ends_before_its_key_moves_never_owns_and_is_queued_again()
{
    let mine = format!("{HOST}:p3");
    let mut h = restarted(
        vec![own_row("page", &mine, 7, Lifetime::Connection)],
        Vec::new(),
    );
    h.connect([1]);
    h.committed_batch([resume(1, 1, "page")]);
    h.lines(1);
    h.committed_batch([listing(
        12,
        vec![own_key_on(&mine, &mine, "page", 7, HANDOVER)],
    )]);
    one_write(&mut h);

    // The move never landed; the hand-over lease ends and takes the key.
    h.committed_batch([changes(13, vec![delete(&mine, None)])]);
    assert!(roles(&h.lines(1)).is_empty(), "never told it owns");
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Create { id, .. } if *id == mine),
        "queued again: {write:?}"
    );
    let mut etcd = FakeEtcd::at(13);
    let (created, shown) = etcd.create(&write);
    h.committed_batch([created, shown]);
    let told = roles(&h.lines(1));
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(
        told[0]["role"], "owner",
        "back, alone in its topic: {told:?}"
    );
    assert_eq!(told[0].get("suspended"), None, "{told:?}");
}
