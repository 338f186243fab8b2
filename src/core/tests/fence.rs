//! The fence in the core: while this host's etcd lease is not live, its
//! entry first in a shared topic stands suspended and shared topics take
//! no new track; the core fences itself when the boot clock reaches the
//! fence, told or not; and entries whose lease ended are queued again.

use std::time::Duration;

use serde_json::{Value, json};

use super::cluster::*;
use super::harness::*;
use crate::core::Input;
use crate::core::registry::{Change, ClusterWrite, LeaseView, Track};
use crate::ops::Op;
use crate::ops::update::UpdateRequest;
use crate::protocol::{LeaveReason, Lifetime, Limits, TrackRequest};

/// How long a refused re-creation waits before it is asked again, in ms.
const REQUEUE_RETRY_PAUSE_MS: u64 = 1_000;

/// The fence of the lease the tests hold: 5 s after the harness's start.
const FENCE_AT_MS: u64 = 5_000;

fn live_until(ms: u64) -> Input {
    live_on(LEASE, ms)
}

/// The lease `id` is live, its fence `ms` after the harness's start.
fn live_on(id: i64, ms: u64) -> Input {
    lease(LeaseView::Live {
        lease: id,
        fence_at: BOOT_AT_START + Duration::from_millis(ms),
    })
}

/// The one `role` event among `lines`, as its payload.
fn role_of(lines: &[Value]) -> Value {
    let roles: Vec<&Value> = lines
        .iter()
        .filter(|line| line["event"] == "role")
        .collect();
    assert_eq!(roles.len(), 1, "{lines:?}");
    roles[0]["payload"].clone()
}

fn assert_suspended(standing: &Value, own_ref: &str) {
    assert_eq!(standing["role"], "spectator", "{standing}");
    assert_eq!(standing["readonly"], true, "{standing}");
    assert_eq!(standing["position"], 0, "{standing}");
    assert_eq!(standing["suspended"], true, "{standing}");
    assert_eq!(
        standing["owner"]["phx_ref"], own_ref,
        "still named: {standing}"
    );
}

fn assert_owner(standing: &Value) {
    assert_eq!(standing["role"], "owner", "{standing}");
    assert_eq!(standing["readonly"], false, "{standing}");
    assert_eq!(standing["position"], 0, "{standing}");
    assert_eq!(standing.get("suspended"), None, "{standing}");
}

/// Connection `conn` tracks `key` of the shared topic through `etcd`,
/// and the track is answered; returns the entry's ref and its reply.
fn track_shared(h: &mut H, etcd: &mut FakeEtcd, conn: u64, id: u64, key: &str) -> (String, Value) {
    answered(h, etcd, conn, track_on(conn, id, SHARED, key))
}

/// The reply to `track`, a track of the shared topic by `conn`, once
/// `etcd` created its key; with the entry's ref.
fn answered(h: &mut H, etcd: &mut FakeEtcd, conn: u64, track: Input) -> (String, Value) {
    h.committed_batch([track]);
    let write = one_write(h);
    let ClusterWrite::Create { id: key_id, .. } = &write else {
        panic!("a create: {write:?}");
    };
    let key_id = key_id.clone();
    let (created, put) = etcd.create(&write);
    h.committed_batch([created, put]);
    let lines = h.lines(conn);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    (key_id, lines[0].clone())
}

/// A clustered core whose lease is live until [`FENCE_AT_MS`], where
/// connection 1 owns the shared topic with its entry at revision 41 and
/// connection 2 watches it.
fn owning() -> (H, FakeEtcd, String) {
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    h.committed_batch([live_until(FENCE_AT_MS), subscribe_to(2, 1, SHARED)]);
    h.lines(2);
    let mut etcd = FakeEtcd::at(40);
    let (own_ref, reply) = track_shared(&mut h, &mut etcd, 1, 1, "page");
    assert_owner(&reply);
    assert_eq!(reply["seq"], 41);
    h.lines(2);
    (h, etcd, own_ref)
}

#[test]
fn a_fenced_owner_is_told_it_is_suspended_and_a_lift_makes_it_owner_again() {
    let (mut h, _, own_ref) = owning();

    h.input(lease(LeaseView::Fenced { lease: LEASE }));
    assert!(h.burst().is_none(), "a standing is never saved");
    let role = role_of(&h.lines(1));
    assert_eq!(role["ref"], own_ref.as_str());
    assert_suspended(&role, &own_ref);
    assert!(h.lines(2).is_empty(), "the queue is as it was: no diff");

    // Told again, it says nothing again.
    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE })]);
    assert!(h.lines(1).is_empty());

    h.committed_batch([live_until(FENCE_AT_MS + 5_000)]);
    let role = role_of(&h.lines(1));
    assert_eq!(role["ref"], own_ref.as_str());
    assert_owner(&role);
}

#[test]
fn a_shared_track_waits_for_the_first_lease_is_refused_while_fenced_and_local_topics_go_on() {
    let mut h = H::configured(cluster_config(Limits::default()), nothing_restored());
    h.connect([1]);
    // No lease yet (the daemon has just started): the track waits, its
    // key asked for, to be written once a lease is granted; the local
    // track behind it is held behind its reply.
    h.committed_batch([track_on(1, 1, SHARED, "page"), track(1, 2, "mine")]);
    assert!(
        h.lines(1).is_empty(),
        "parked, and the next reply behind it"
    );
    assert!(matches!(one_write(&mut h), ClusterWrite::Create { .. }));

    h.connect([2]);
    h.committed_batch([track(2, 1, "theirs")]);
    assert_eq!(
        h.lines(2)[0]["ok"],
        true,
        "another connection's local topic is not held"
    );

    h.committed_batch([
        lease(LeaseView::Fenced { lease: LEASE }),
        track_on(2, 2, SHARED, "other"),
    ]);
    let lines = h.lines(2);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
    let message = lines[0]["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("lease is fenced"), "{message}");
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "nothing asked of etcd while fenced"
    );

    h.committed_batch([live_until(FENCE_AT_MS), track_on(2, 3, SHARED, "other")]);
    assert!(h.lines(2).is_empty(), "parked: it waits for etcd");
    assert!(matches!(one_write(&mut h), ClusterWrite::Create { .. }));
}

#[test]
fn an_update_of_a_shared_entry_is_refused_unavailable_while_fenced() {
    let (mut h, _, own_ref) = owning();
    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE })]);
    h.lines(1);
    let update = UpdateRequest {
        topic: SHARED.into(),
        phx_ref: Some(own_ref),
        key: None,
        meta: serde_json::Map::new(),
    };
    h.committed_batch([presence(1, 2, Op::Update(update))]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
}

#[test]
fn the_core_fences_itself_when_the_boot_clock_reaches_the_fence_untold() {
    let (mut h, _, own_ref) = owning();
    assert_eq!(h.timeout(), Some(FENCE_AT_MS), "woken at the fence");
    h.at(FENCE_AT_MS - 1);
    h.committed_batch([ping(1, 2)]);
    assert_eq!(ids(&h.lines(1)), [json!(2)], "not yet");

    h.at(FENCE_AT_MS);
    h.tick();
    assert!(h.burst().is_none());
    let role = role_of(&h.lines(1));
    assert_suspended(&role, &own_ref);
    assert_eq!(h.timeout(), None, "nothing more is due");
}

#[test]
fn a_batch_past_the_fence_fences_before_its_first_line() {
    let (mut h, _, own_ref) = owning();
    h.connect([3]);
    // The machine slept through the fence: the monotonic clock says
    // nothing is due, the boot clock is past it. The first batch after
    // it says suspended before anything else, and refuses a track.
    h.at(FENCE_AT_MS + 60_000);
    h.committed_batch([
        track_on(3, 1, SHARED, "other"),
        resume(3, 2, "page"),
        ping(1, 2),
    ]);
    let lines = h.lines(1);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_suspended(&lines[0]["payload"], &own_ref);
    assert_eq!(lines[1]["id"], 2);
    let lines = h.lines(3);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");
}

#[test]
fn a_fence_that_falls_while_a_commit_is_out_is_told_right_after_it() {
    let (mut h, _, own_ref) = owning();
    h.input(track(1, 2, "local"));
    h.burst().expect("a local track is saved");
    h.at(FENCE_AT_MS);
    h.ok();
    // Released with the batch's lines, right behind them: no other
    // batch, and no commit, comes between.
    let lines = h.lines(1);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["id"], 2, "{lines:?}");
    assert_suspended(&lines[1]["payload"], &own_ref);
    assert!(h.burst().is_none(), "nothing more to commit");
    assert!(h.lines(1).is_empty());
}

#[test]
fn an_owner_told_by_a_batch_settled_past_the_fence_is_told_suspended_in_the_same_release() {
    let mut h = clustered(Limits::default());
    h.connect([1, 2]);
    h.committed_batch([live_until(FENCE_AT_MS), subscribe_to(2, 1, SHARED)]);
    h.lines(2);
    let mut etcd = FakeEtcd::at(40);
    h.committed_batch([track_on(1, 1, SHARED, "page")]);
    let (created, put) = etcd.create(&one_write(&mut h));

    // The watch shows the key before the fence; the batch that makes the
    // entry owner is committed past it.
    h.at(FENCE_AT_MS - 10);
    h.inputs([created, put]);
    h.burst().expect("the entry's row is saved");
    h.at(FENCE_AT_MS + 10);
    h.ok();
    let lines = h.lines(1);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["id"], 1, "{lines:?}");
    assert_owner(&lines[0]);
    let own_ref = lines[0]["ref"].as_str().unwrap_or_default();
    assert_eq!(lines[1]["event"], "role", "{lines:?}");
    assert_suspended(&lines[1]["payload"], own_ref);
    assert!(h.burst().is_none(), "the fence needed no commit");
    assert!(h.lines(1).is_empty());

    // Nobody else is told the entry owns: its subscriber sees it join,
    // and the fence changes no queue.
    let diffs = h.lines(2);
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert_eq!(diffs[0]["event"], "presence_diff", "{diffs:?}");
}

#[test]
fn a_fence_is_told_while_the_disk_fails_and_not_put_off_by_the_retry_pause() {
    let (mut h, _, own_ref) = owning();
    // A failed commit just before the fence: the retry pause runs past it.
    h.at(FENCE_AT_MS - 50);
    h.input(track(1, 2, "local"));
    h.burst().expect("a local track is saved");
    h.fail();
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "internal", "{lines:?}");
    assert_eq!(h.timeout(), Some(FENCE_AT_MS), "woken at the fence");

    h.at(FENCE_AT_MS);
    h.tick();
    assert!(h.burst().is_none(), "the fence needs no commit");
    assert_suspended(&role_of(&h.lines(1)), &own_ref);

    // A commit that fails past the fence still lets its suspension out.
    let (mut h, _, own_ref) = owning();
    h.input(track(1, 2, "local"));
    h.burst().expect("a local track is saved");
    h.at(FENCE_AT_MS);
    h.fail();
    let lines = h.lines(1);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["error"]["code"], "internal", "{lines:?}");
    assert_suspended(&lines[1]["payload"], &own_ref);
}

/// A track of `key` of the shared topic by `conn` whose entry outlives
/// the connection, until its process exits.
fn track_process(conn: u64, id: u64, key: &str) -> Input {
    let track = Track {
        request: TrackRequest {
            topic: SHARED.into(),
            key: key.into(),
            meta: serde_json::Map::new(),
            pid: None,
            lifetime: Lifetime::Process,
            subscribe: false,
        },
        process: process_of(conn),
        token_hash: token_hash(key),
        token: format!("token-{key}"),
    };
    presence(conn, id, Op::Track(track))
}

#[test]
fn an_owner_nobody_holds_hears_of_its_suspension_on_resume_and_not_of_a_fence_lifted() {
    let mut h = clustered(Limits::default());
    h.connect([1, 2, 3]);
    h.committed_batch([live_until(FENCE_AT_MS)]);
    let mut etcd = FakeEtcd::at(40);
    let (own_ref, reply) = answered(&mut h, &mut etcd, 1, track_process(1, 1, "page"));
    assert_owner(&reply);
    h.committed_batch([close(1)]);

    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE })]);
    h.committed_batch([resume(2, 1, "page")]);
    let lines = h.lines(2);
    assert_eq!(lines.len(), 2, "the reply, then the role event: {lines:?}");
    assert_suspended(&lines[0]["roles"][own_ref.as_str()], &own_ref);
    assert_suspended(&role_of(&lines), &own_ref);

    // Let go again, fenced and lifted meanwhile: it stands as it was told.
    h.committed_batch([close(2)]);
    h.committed_batch([live_until(FENCE_AT_MS)]);
    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE })]);
    h.committed_batch([resume(3, 1, "page")]);
    let lines = h.lines(3);
    assert_eq!(lines.len(), 1, "the reply alone: {lines:?}");
    assert_suspended(&lines[0]["roles"][own_ref.as_str()], &own_ref);
}

#[test]
fn a_remote_owner_and_this_hosts_spectators_keep_their_standings() {
    let mut h = watching(10, vec![put("web-2:p1", "theirs", 10)]);
    h.connect([1]);
    h.committed_batch([live_until(FENCE_AT_MS)]);
    let mut etcd = FakeEtcd::at(10);
    let (_, reply) = track_shared(&mut h, &mut etcd, 1, 1, "page");
    assert_eq!(reply["position"], 1);
    h.lines(2);

    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE })]);
    assert!(h.lines(1).is_empty(), "a spectator's standing is unchanged");
    assert!(h.lines(2).is_empty());
    h.committed_batch([resume(1, 2, "page")]);
    let lines = h.lines(1);
    assert!(
        lines.iter().all(|line| line["event"] != "role"),
        "{lines:?}"
    );

    // The remote owner leaves: this host's entry comes first, suspended.
    h.committed_batch([changes(12, vec![delete("web-2:p1", None)])]);
    let role = role_of(&h.lines(1));
    assert_eq!(role["position"], 0);
    assert_eq!(role["suspended"], true, "{role}");
    assert_eq!(role["role"], "spectator", "{role}");
}

#[test]
fn a_fence_applied_again_after_a_failed_commit_is_told_once() {
    let (mut h, _, own_ref) = owning();
    // A local track makes the batch need a commit, which fails.
    h.inputs([
        lease(LeaseView::Fenced { lease: LEASE }),
        track(1, 2, "local"),
    ]);
    h.burst().expect("a commit");
    h.fail();
    let lines = h.lines(1);
    assert_eq!(lines.len(), 1, "only the failed reply: {lines:?}");
    assert_eq!(lines[0]["error"]["code"], "internal", "{lines:?}");

    let retry = h.timeout().expect("the fact waits to be applied again");
    h.at(retry);
    h.tick();
    assert!(h.burst().is_none(), "the fence alone needs no commit");
    let role = role_of(&h.lines(1));
    assert_suspended(&role, &own_ref);

    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE }), ping(1, 3)]);
    assert_eq!(ids(&h.lines(1)), [json!(3)], "no second role event");
}

#[test]
fn an_entry_whose_lease_ended_is_queued_again_at_the_back_under_its_ref() {
    let (mut h, _, own_ref) = owning();
    h.committed_batch([changes(42, vec![put("web-2:p1", "theirs", 42)])]);
    h.lines(2);
    let mut etcd = FakeEtcd::at(43);

    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE })]);
    assert_suspended(&role_of(&h.lines(1)), &own_ref);
    // etcd ended the lease: the keeper asks for a new one, and the watch
    // shows this host's key gone with no reason.
    h.committed_batch([lease(LeaseView::Granting)]);
    assert!(h.lines(1).is_empty(), "still suspended");
    h.committed_batch([changes(43, vec![delete(&own_ref, None)])]);
    assert!(h.lines(1).is_empty(), "the entry stays");
    assert!(h.lines(2).is_empty(), "and nobody here sees it leave");
    h.committed_batch([list(1, 2, SHARED)]);
    assert_eq!(refs_listed(&h.lines(1)[0]), ["web-1:p1", "web-2:p1"]);

    // A new lease: the key is created again, under the same id.
    h.committed_batch([live_until(FENCE_AT_MS + 10_000)]);
    assert!(h.lines(1).is_empty(), "suspended until its key shows");
    let write = one_write(&mut h);
    let ClusterWrite::Create { id, record, .. } = &write else {
        panic!("a create: {write:?}");
    };
    assert_eq!(id, &own_ref);
    assert_eq!(record.phx_ref, own_ref);
    let (created, put_again) = etcd.create(&write);
    h.committed_batch([created]);
    h.input(put_again);
    let commit = h.burst().expect("the new place is saved");
    let moved = commit.changes.iter().any(|change| {
        matches!(change, Change::Put(entry)
            if entry.phx_ref == own_ref && entry.seq == 44)
    });
    assert!(moved, "{:?}", commit.changes);
    h.ok();

    let role = role_of(&h.lines(1));
    assert_eq!(role["ref"], own_ref.as_str());
    assert_eq!(role["role"], "spectator", "{role}");
    assert_eq!(role["position"], 1, "{role}");
    assert_eq!(role.get("suspended"), None, "{role}");
    assert_eq!(role["owner"]["phx_ref"], "web-2:p1", "{role}");
    let diffs = h.lines(2);
    assert_eq!(diffs.len(), 2, "a leave, then a join: {diffs:?}");
    assert_eq!(diffs[0]["reasons"][own_ref.as_str()], "host_lost");
    assert_eq!(diffs[0]["owner"]["phx_ref"], "web-2:p1");
    assert_eq!(
        diffs[1]["payload"]["joins"]["page"]["metas"][0]["seq"], 44,
        "{diffs:?}"
    );
    assert_eq!(h.core.counts().entries, 2);
}

#[test]
fn a_key_deleted_before_the_keeper_knows_the_lease_ended_is_queued_again_too() {
    let (mut h, mut etcd, own_ref) = owning();
    // The watch shows the delete while the lease is still live here.
    h.committed_batch([changes(42, vec![delete(&own_ref, None)])]);
    assert_suspended(&role_of(&h.lines(1)), &own_ref);
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Create { id, .. } if *id == own_ref),
        "{write:?}"
    );
    let (created, put_again) = etcd.create(&write);
    h.committed_batch([created, put_again]);
    let role = role_of(&h.lines(1));
    assert_owner(&role);
    assert_eq!(h.core.counts().entries, 1);
}

#[test]
fn a_lost_lease_and_a_move_rolled_back_are_applied_again_once() {
    let (mut h, _, own_ref) = owning();
    h.committed_batch([changes(42, vec![put("web-2:p1", "theirs", 42)])]);
    h.lines(2);
    let mut etcd = FakeEtcd::at(43);

    // The lease ends and a new one is live within one batch, which fails.
    h.inputs([
        lease(LeaseView::Granting),
        changes(43, vec![delete(&own_ref, None)]),
        live_until(FENCE_AT_MS + 10_000),
        track(1, 2, "local"),
    ]);
    h.burst().expect("a commit");
    h.fail();
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "no write of a failed batch"
    );
    let lines = h.lines(1);
    assert_eq!(ids(&lines), [json!(2)], "no role event: {lines:?}");

    let retry = h.timeout().expect("the facts wait to be applied again");
    h.at(retry);
    h.tick();
    assert!(h.burst().is_none(), "nothing to save until the key shows");
    let role = role_of(&h.lines(1));
    assert_suspended(&role, &own_ref);
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Create { id, .. } if *id == own_ref),
        "{write:?}"
    );

    let (created, put_again) = etcd.create(&write);
    h.inputs([created, put_again]);
    h.burst().expect("the new place is saved");
    h.fail();
    assert!(h.lines(1).is_empty(), "nothing told of what was not saved");
    let retry = h.timeout().expect("the changes wait to be applied again");
    h.at(retry);
    h.tick();
    h.burst().expect("saved again");
    h.ok();
    let role = role_of(&h.lines(1));
    assert_eq!(role["position"], 1, "{role}");
    let diffs = h.lines(2);
    assert_eq!(diffs.len(), 2, "one leave, one join: {diffs:?}");
    assert!(FakeEtcd::writes(&mut h).is_empty(), "asked once");
    assert_eq!(h.core.counts().entries, 2);
}

#[test]
fn an_entry_whose_key_went_with_the_lease_leaves_at_once_when_untracked() {
    let (mut h, _, own_ref) = owning();
    h.committed_batch([lease(LeaseView::Granting)]);
    assert_suspended(&role_of(&h.lines(1)), &own_ref);
    h.committed_batch([changes(42, vec![delete(&own_ref, None)])]);

    // Nothing is left in etcd to delete, and no other host shows it: the
    // untrack is answered at once, and the entry leaves here.
    h.committed_batch([untrack_ref(1, 2, &own_ref)]);
    let lines = h.lines(1);
    assert_eq!(ids(&lines), [json!(2)], "{lines:?}");
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "no delete is asked for"
    );
    let diffs = h.lines(2);
    assert_eq!(
        diffs[0]["reasons"][own_ref.as_str()],
        "untrack",
        "{diffs:?}"
    );
    assert_eq!(h.core.counts().entries, 0);

    // Nor is it created again once a lease is live.
    h.committed_batch([live_until(FENCE_AT_MS + 10_000)]);
    assert!(FakeEtcd::writes(&mut h).is_empty());
}

#[test]
fn an_entry_on_its_way_out_when_the_lease_ends_leaves_and_is_not_queued_again() {
    let (mut h, _, own_ref) = owning();
    // The untrack's delete is asked for, but the lease ends before etcd
    // takes it: the key goes with the lease instead.
    h.committed_batch([untrack_ref(1, 2, &own_ref)]);
    let write = one_write(&mut h);
    assert!(matches!(write, ClusterWrite::Delete { .. }), "{write:?}");
    assert!(h.lines(1).is_empty(), "answered once etcd shows the delete");
    h.committed_batch([lease(LeaseView::Granting)]);
    h.committed_batch([changes(42, vec![delete(&own_ref, None)])]);
    let lines = h.lines(1);
    assert_eq!(ids(&lines), [json!(2)], "{lines:?}");
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    let diffs = h.lines(2);
    assert_eq!(
        diffs[0]["reasons"][own_ref.as_str()],
        "untrack",
        "{diffs:?}"
    );

    h.committed_batch([live_until(FENCE_AT_MS + 10_000)]);
    assert!(
        FakeEtcd::writes(&mut h).is_empty(),
        "an entry that left is not created again"
    );
}

#[test]
fn a_live_lease_whose_fence_has_passed_is_a_fence() {
    let (mut h, _, own_ref) = owning();
    // The keeper's word that the lease is live until its fence reaches the
    // core only after the core fenced itself there: it lifts nothing.
    h.at(FENCE_AT_MS + 500);
    h.committed_batch([live_until(FENCE_AT_MS)]);
    assert_suspended(&role_of(&h.lines(1)), &own_ref);

    // A renewal's word comes after the fence it names: still fenced.
    h.committed_batch([live_until(FENCE_AT_MS + 400), ping(1, 2)]);
    assert_eq!(ids(&h.lines(1)), [json!(2)], "no role event");
    h.committed_batch([track_on(1, 3, SHARED, "other")]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "unavailable", "{lines:?}");

    // A fence still ahead lifts it.
    h.committed_batch([live_until(FENCE_AT_MS + 5_000)]);
    assert_owner(&role_of(&h.lines(1)));
}

#[test]
fn a_renewal_applied_again_after_its_fence_passed_does_not_say_owner() {
    let (mut h, _, own_ref) = owning();
    // A renewal to 7 s in a batch whose commit fails.
    h.at(FENCE_AT_MS - 1_000);
    h.inputs([live_until(FENCE_AT_MS + 2_000), track(1, 2, "local")]);
    h.burst().expect("a commit");
    h.fail();
    h.lines(1);
    // Applied again past 7 s: the core fences, and says nothing else.
    h.at(FENCE_AT_MS + 2_500);
    h.tick();
    assert!(h.burst().is_none());
    let lines = h.lines(1);
    assert_suspended(&role_of(&lines), &own_ref);
}

#[test]
fn a_live_view_naming_another_lease_says_the_last_one_ended() {
    let (mut h, _, own_ref) = owning();
    h.committed_batch([changes(42, vec![put("web-2:p1", "theirs", 42)])]);
    h.lines(2);
    let mut etcd = FakeEtcd::at(43);
    h.committed_batch([lease(LeaseView::Fenced { lease: LEASE })]);
    assert_suspended(&role_of(&h.lines(1)), &own_ref);

    // The keeper lost the lease and was granted the next before the core
    // heard of either: the key went with the old lease, so the entry is
    // not told it owns, and its key is created again on the new one.
    h.committed_batch([live_on(LEASE + 1, FENCE_AT_MS + 10_000)]);
    etcd.lease = LEASE + 1;
    assert!(h.lines(1).is_empty(), "still suspended");
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Create { id, .. } if *id == own_ref),
        "{write:?}"
    );
    let (created, put_again) = etcd.create(&write);
    h.committed_batch([changes(44, vec![delete(&own_ref, None)])]);
    h.committed_batch([created, put_again]);
    let role = role_of(&h.lines(1));
    assert_eq!(role["position"], 1, "at the back: {role}");
    assert_eq!(role.get("suspended"), None, "{role}");
}

#[test]
fn a_live_lease_replaced_by_another_while_live_queues_its_entries_again() {
    let (mut h, mut etcd, own_ref) = owning();
    h.committed_batch([live_on(LEASE + 1, FENCE_AT_MS + 10_000)]);
    etcd.lease = LEASE + 1;
    assert_suspended(&role_of(&h.lines(1)), &own_ref);
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Create { id, .. } if *id == own_ref),
        "{write:?}"
    );
    let (created, put_again) = etcd.create(&write);
    h.committed_batch([created, put_again]);
    assert_owner(&role_of(&h.lines(1)));
}

#[test]
fn a_refused_re_creation_is_asked_again_after_a_pause() {
    let (mut h, mut etcd, own_ref) = owning();
    h.committed_batch([lease(LeaseView::Granting)]);
    assert_suspended(&role_of(&h.lines(1)), &own_ref);
    h.committed_batch([changes(42, vec![delete(&own_ref, None)])]);
    h.committed_batch([live_on(LEASE + 1, FENCE_AT_MS + 10_000)]);
    etcd.lease = LEASE + 1;
    let write = one_write(&mut h);
    assert!(matches!(&write, ClusterWrite::Create { id, .. } if *id == own_ref));

    // etcd refuses it: nothing is asked at once, but after a pause.
    h.committed_batch([FakeEtcd::refuse(&write)]);
    assert!(FakeEtcd::writes(&mut h).is_empty(), "not at once");
    assert!(h.lines(1).is_empty(), "still suspended");
    let retry = h.timeout().expect("a retry is due");
    assert_eq!(retry, REQUEUE_RETRY_PAUSE_MS, "woken after the pause");
    h.at(retry - 1);
    h.tick();
    assert!(h.burst().is_none());
    assert!(FakeEtcd::writes(&mut h).is_empty(), "not before the pause");
    h.at(retry);
    h.tick();
    assert!(h.burst().is_none(), "asking saves nothing");
    let again = one_write(&mut h);
    assert!(
        matches!(&again, ClusterWrite::Create { id, .. } if *id == own_ref),
        "{again:?}"
    );

    // This time it goes through: the entry owns again.
    let (created, put_again) = etcd.create(&again);
    h.committed_batch([created, put_again]);
    assert_owner(&role_of(&h.lines(1)));
    assert_eq!(
        h.timeout(),
        Some(FENCE_AT_MS + 10_000),
        "nothing else is due"
    );
}

#[test]
fn a_re_creation_refused_while_the_lease_is_not_live_waits_for_the_next_lease() {
    let (mut h, mut etcd, own_ref) = owning();
    h.committed_batch([lease(LeaseView::Granting)]);
    assert_suspended(&role_of(&h.lines(1)), &own_ref);
    h.committed_batch([changes(42, vec![delete(&own_ref, None)])]);
    h.committed_batch([live_on(LEASE + 1, FENCE_AT_MS + 10_000)]);
    etcd.lease = LEASE + 1;
    let write = one_write(&mut h);
    h.committed_batch([
        lease(LeaseView::Fenced { lease: LEASE + 1 }),
        FakeEtcd::refuse(&write),
    ]);
    assert_eq!(h.timeout(), None, "nothing is asked until a lease is live");
    h.committed_batch([live_on(LEASE + 1, FENCE_AT_MS + 20_000)]);
    let again = one_write(&mut h);
    let (created, put_again) = etcd.create(&again);
    h.committed_batch([created, put_again]);
    let lines = h.lines(1);
    assert_owner(&role_of(&lines));
}

#[test]
fn an_own_key_deleted_with_a_reason_this_host_did_not_ask_for_is_queued_again() {
    let (mut h, mut etcd, own_ref) = owning();
    // Another writer deleted this host's key, with a reason beside it:
    // every other host saw the entry leave, so here it cannot go on
    // owning. It stays, suspended, and its key is created again.
    h.committed_batch([changes(
        42,
        vec![delete(&own_ref, Some(LeaveReason::Untrack))],
    )]);
    assert_suspended(&role_of(&h.lines(1)), &own_ref);
    assert!(h.lines(2).is_empty(), "nobody here sees it leave");
    let write = one_write(&mut h);
    assert!(
        matches!(&write, ClusterWrite::Create { id, .. } if *id == own_ref),
        "{write:?}"
    );
    let (created, put_again) = etcd.create(&write);
    h.committed_batch([created, put_again]);
    assert_owner(&role_of(&h.lines(1)));
    assert_eq!(h.core.counts().entries, 1);
}

#[test]
fn when_the_lease_is_no_longer_kept_other_hosts_and_leaving_entries_go_and_own_ones_stay_suspended()
{
    let mut h = watching(10, vec![put("web-2:p1", "theirs", 10)]);
    h.connect([1]);
    h.committed_batch([live_until(FENCE_AT_MS)]);
    let mut etcd = FakeEtcd::at(10);
    let (own_ref, reply) = track_shared(&mut h, &mut etcd, 1, 1, "page");
    assert_eq!(reply["position"], 1);
    let (leaving_ref, _) = track_shared(&mut h, &mut etcd, 1, 2, "other");
    h.committed_batch([untrack_ref(1, 3, &leaving_ref)]);
    assert!(matches!(one_write(&mut h), ClusterWrite::Delete { .. }));
    h.lines(1);
    h.lines(2);

    h.committed_batch([lease(LeaseView::Stopped)]);
    let lines = h.lines(1);
    let reply = lines.iter().find(|line| line["id"] == 3);
    assert_eq!(
        reply.map(|reply| &reply["ok"]),
        Some(&json!(true)),
        "the untrack is answered: {lines:?}"
    );
    let role = role_of(&lines);
    assert_eq!(role["ref"], own_ref.as_str());
    assert_suspended(&role, &own_ref);

    let diffs = h.lines(2);
    let reasons: Vec<&Value> = diffs
        .iter()
        .filter_map(|diff| diff.get("reasons"))
        .collect();
    let reason_of = |phx_ref: &str| {
        reasons
            .iter()
            .find_map(|reasons| reasons.get(phx_ref))
            .cloned()
    };
    assert_eq!(reason_of("web-2:p1"), Some(json!("host_lost")), "{diffs:?}");
    assert_eq!(reason_of(&leaving_ref), Some(json!("untrack")), "{diffs:?}");
    assert_eq!(reason_of(&own_ref), None, "{diffs:?}");
    assert_eq!(h.core.counts().entries, 1);
    h.committed_batch([list(1, 4, SHARED)]);
    assert_eq!(refs_listed(&h.lines(1)[0]), [own_ref.as_str()]);
}

#[test]
fn when_the_lease_is_no_longer_kept_tracks_and_updates_waiting_for_etcd_are_answered_unavailable() {
    let (mut h, mut etcd, own_ref) = owning();
    h.committed_batch([update_ref(1, 2, &own_ref, json!({"n": 1}))]);
    let rewrite = one_write(&mut h);
    h.committed_batch([track_on(2, 2, SHARED, "other")]);
    let create = one_write(&mut h);
    assert!(h.lines(1).is_empty() && h.lines(2).is_empty(), "both wait");

    h.committed_batch([lease(LeaseView::Stopped)]);
    let lines = h.lines(1);
    let reply = lines.iter().find(|line| line["id"] == 2);
    assert_eq!(
        reply.map(|reply| &reply["error"]["code"]),
        Some(&json!("unavailable")),
        "the update is answered now: {lines:?}"
    );
    assert_suspended(&role_of(&lines), &own_ref);
    let lines = h.lines(2);
    let reply = lines.iter().find(|line| line["id"] == 2);
    assert_eq!(
        reply.map(|reply| &reply["error"]["code"]),
        Some(&json!("unavailable")),
        "the track is answered now: {lines:?}"
    );
    assert_eq!(h.timeout(), None, "nothing waits for a deadline");

    // etcd's answers to their writes, late, change nothing.
    let (rewritten, _) = etcd.rewrite(&rewrite);
    let (created, _) = etcd.create(&create);
    h.committed_batch([rewritten, created]);
    assert!(h.lines(1).is_empty() && h.lines(2).is_empty());
    assert_eq!(h.core.counts().entries, 1);
    h.committed_batch([list(2, 3, SHARED)]);
    assert_eq!(refs_listed(&h.lines(2)[0]), [own_ref.as_str()]);
}

#[test]
fn a_track_whose_key_shows_on_a_lease_that_ended_is_suspended_then_queued_again() {
    let mut h = clustered(Limits::default());
    h.connect([1]);
    h.committed_batch([track_on(1, 1, SHARED, "page")]);
    let write = one_write(&mut h);
    let ClusterWrite::Create { id: own_ref, .. } = &write else {
        panic!("a create: {write:?}");
    };
    let own_ref = own_ref.clone();
    // Created under the first lease, shown by a watch that is behind the
    // word that the next lease is live.
    let mut etcd = FakeEtcd::at(40);
    let (created, shown) = etcd.create(&write);
    h.committed_batch([live_on(LEASE + 1, FENCE_AT_MS + 10_000)]);
    h.committed_batch([created, shown]);
    let lines = h.lines(1);
    assert_eq!(lines[0]["ok"], true, "{lines:?}");
    assert_suspended(&lines[0], &own_ref);

    // The old lease's end shows: the key is lost, and created again on
    // the live lease, where it owns.
    h.committed_batch([changes(42, vec![delete(&own_ref, None)])]);
    let again = one_write(&mut h);
    assert!(
        matches!(&again, ClusterWrite::Create { id, .. } if *id == own_ref),
        "{again:?}"
    );
    etcd.lease = LEASE + 1;
    let (created, shown) = etcd.create(&again);
    h.committed_batch([created, shown]);
    assert_owner(&role_of(&h.lines(1)));
}
