//! The core on its own, driven by hand (`harness.rs`): the time and every
//! commit's result are made up by the test, so roll-back, retries and
//! expiry are checked to the millisecond, with no thread, store or sleep.

mod cluster;
mod fence;
/// Also the daemon's tests' way to make up a request.
pub(crate) mod harness;
mod recovery;
mod restart;

use serde_json::{Value, json};

use super::registry::Change;
use super::{Input, Restored, Stopped};
use crate::ops::Op;
use crate::protocol::{Empty, GetByKeyRequest, Lifetime};
use harness::*;

#[test]
fn nothing_leaves_before_its_commit_and_the_reply_precedes_its_events() {
    let mut h = H::new();
    h.connect([1, 2]);
    h.committed_batch([subscribe(2, 1)]);
    h.lines(2);

    h.input(track(1, 1, "first"));
    let commit = h.burst().expect("a track is committed");
    assert!(
        commit
            .changes
            .iter()
            .any(|change| matches!(change, Change::Put(entry) if entry.key == "first")),
        "{commit:?}"
    );
    assert!(
        h.lines(1).is_empty() && h.lines(2).is_empty(),
        "nothing yet"
    );

    h.ok();
    let owner = h.lines(1);
    assert_eq!(ids(&owner)[0], json!(1), "the reply first: {owner:?}");
    assert_eq!(owner[0]["role"], "owner");
    let watcher = h.lines(2);
    assert_eq!(watcher.len(), 1, "{watcher:?}");
    assert_eq!(watcher[0]["event"], "presence_diff");
}

/// A failed batch: its track fails, its reads and its subscribe are asked
/// again of the rolled-back registry, in their places, its ping stands,
/// and none of its events goes out.
#[test]
fn a_failed_commit_fails_writes_reasks_reads_and_drops_events() {
    let mut h = H::new();
    h.connect([1, 2, 3]);
    h.committed_batch([subscribe(3, 1), track(1, 1, "first")]);
    h.lines(1);
    h.lines(3);

    let by_key = GetByKeyRequest {
        topic: "doc".into(),
        key: "first".into(),
    };
    h.inputs([
        // Its effect, the owner leaving, is not saved: no read may show it.
        close(1),
        track(2, 2, "second"),
        request(2, 3, Op::Status(Empty {})),
        presence(2, 4, Op::List(Some("doc".into()))),
        presence(2, 5, Op::GetByKey(by_key)),
        subscribe(2, 6),
        request(2, 7, Op::Ping(Empty {})),
    ]);
    assert!(h.burst().is_some());
    h.fail();

    let lines = h.lines(2);
    let expected = [
        json!(2),
        json!(3),
        json!(4),
        json!(5),
        json!(6),
        Value::Null,
        json!(7),
    ];
    assert_eq!(
        ids(&lines),
        expected,
        "every reply in its place, the subscribe's state after it: {lines:?}"
    );
    assert_eq!(lines[0]["error"]["code"], "internal");
    assert!(
        lines[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the disk is full"),
        "{}",
        lines[0]
    );
    assert_eq!(
        (&lines[1]["entries"], &lines[1]["subscriptions"]),
        (&json!(1), &json!(1)),
        "status counts what is committed: {}",
        lines[1]
    );
    assert_eq!(keys_listed(&lines[2]), ["first"]);
    assert_eq!(lines[3]["metas"].as_array().unwrap().len(), 1);
    assert_eq!(lines[4]["ok"], true);
    assert_eq!(lines[5]["event"], "presence_state");
    let state: Vec<&String> = lines[5]["payload"].as_object().unwrap().keys().collect();
    assert_eq!(state, ["first"]);
    assert_eq!(lines[6]["ok"], true);
    assert_eq!(
        h.lines(1),
        [json!("closed")],
        "closed at once, told nothing"
    );
    assert!(h.lines(3).is_empty(), "no event of the undone batch");
}

/// A close whose commit fails is retried by the core itself: 100 ms
/// after the failure, then 200 ms after the failed retry. A batch of
/// requests meanwhile takes the close at its head but leaves the pause
/// as it was, so busy clients cannot hold the retries off.
#[test]
fn a_failed_close_is_retried_after_100_ms_then_200_ms_and_requests_do_not_move_the_pause() {
    let mut h = H::new();
    h.connect([1, 2]);
    h.committed_batch([subscribe(2, 1), track(1, 2, "first")]);
    h.lines(1);
    h.lines(2);
    assert_eq!(h.timeout(), None, "nothing to do");

    h.at(1_000);
    h.input(close(1));
    assert!(h.burst().is_some());
    h.fail();
    assert_eq!(h.timeout(), Some(1_100));
    assert_eq!(h.lines(1), [json!("closed")], "closed at once");

    h.at(1_050);
    h.input(request(2, 3, Op::Ping(Empty {})));
    assert!(h.burst().is_some(), "the close again, at the head");
    h.fail();
    assert_eq!(h.timeout(), Some(1_100), "a request leaves the pause alone");
    let watcher = h.lines(2);
    assert_eq!(ids(&watcher), [json!(3)], "the ping stands, alone");

    h.at(1_099);
    h.tick();
    assert!(h.burst().is_none(), "not before its time");
    h.at(1_100);
    h.tick();
    assert!(h.burst().is_some());
    h.fail();
    assert_eq!(h.timeout(), Some(1_300), "the pause doubled");

    h.at(1_300);
    h.tick();
    assert!(h.burst().is_some());
    h.ok();
    assert_eq!(h.timeout(), None, "nothing waits");
    let diff = h.lines(2);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert_eq!(diff[0]["event"], "presence_diff");
    assert_eq!(diff[0]["reasons"], json!({"p1": "closed"}));
}

#[test]
fn a_restored_entry_expires_at_its_deadline_and_not_a_millisecond_before() {
    let mut entry = stored_entry("restored", 1, Lifetime::Connection);
    entry.resume_deadline = Some(WALL_AT_START + 10_000);
    let restored = Restored {
        kept: vec![entry],
        departed: Vec::new(),
        next_seq: 2,
    };
    let mut h = H::with(16, restored);
    assert!(
        h.burst().is_none(),
        "nothing to delete, the counter as saved"
    );
    assert_eq!(h.timeout(), Some(10_000));
    h.connect([1]);
    h.committed_batch([subscribe(1, 1)]);
    h.lines(1);

    h.at(9_999);
    h.tick();
    assert!(h.burst().is_none());
    // A batch of requests does the same work at its head, at its time.
    h.input(request(1, 2, Op::Ping(Empty {})));
    assert!(h.burst().is_none(), "still waiting for its client");
    assert_eq!(h.core.counts().awaiting_resume, 1);
    assert_eq!(ids(&h.lines(1)), [json!(2)]);

    h.at(10_000);
    assert_eq!(h.timeout(), Some(10_000));
    h.tick();
    let commit = h.burst().expect("the expiry is committed");
    assert!(
        commit
            .changes
            .iter()
            .any(|change| matches!(change, Change::Delete(r) if r == "p1"))
    );
    assert!(h.lines(1).is_empty(), "not before its commit");
    h.ok();
    let diff = h.lines(1);
    assert_eq!(diff[0]["reasons"], json!({"p1": "expired"}), "{diff:?}");
    assert_eq!(h.timeout(), None);
}

/// A resume whose batch fails fails too, rather than calling the entry
/// expired: the close of its old connection, at the head of that batch,
/// was undone with it. Once a commit goes through, it resumes.
#[test]
fn a_resume_in_the_batch_after_a_failed_close_fails_then_succeeds() {
    let mut h = H::new();
    h.connect([1, 2]);
    h.committed_batch([
        track_for(1, 1, "kept", Lifetime::Process),
        // So that the close deletes a row, and has something to save.
        track(1, 2, "gone"),
    ]);
    h.input(close(1));
    assert!(h.burst().is_some());
    h.fail();

    h.input(resume(2, 3, "kept"));
    assert!(h.burst().is_some());
    h.fail();
    let refused = h.lines(2);
    assert_eq!(refused[0]["error"]["code"], "internal", "{refused:?}");

    h.input(resume(2, 4, "kept"));
    assert!(h.burst().is_some());
    h.ok();
    let resumed = h.lines(2);
    assert_eq!(resumed[0]["resumed"], json!(["p1"]), "{resumed:?}");
    assert_eq!(h.timeout(), None, "the close is saved too");
}

/// A close still waiting to be saved goes at the head of the next batch,
/// within the retry pause: a newcomer never sees a ghost owner.
#[test]
fn a_close_still_waiting_is_applied_before_the_next_batch_that_commits() {
    let mut h = H::new();
    h.connect([1, 2]);
    h.committed_batch([track(1, 1, "owner")]);
    h.input(close(1));
    h.burst();
    h.fail();

    h.at(10);
    h.committed_batch([track(2, 2, "late")]);

    let reply = &h.lines(2)[0];
    assert_eq!(reply["role"], "owner", "{reply}");
    assert_eq!(reply["owner"]["key"], "late", "no ghost owner");
    assert_eq!(h.timeout(), None);
}

#[test]
fn inputs_while_a_commit_is_out_wait_for_its_result() {
    let mut h = H::new();
    h.connect([1, 2]);
    h.input(track(1, 1, "first"));
    assert!(h.burst().is_some());

    assert!(!h.core.batch_has_room());
    h.input(track(2, 2, "second"));
    h.input(presence(2, 3, Op::List(Some("doc".into()))));
    assert_eq!(
        h.core.counts().entries,
        1,
        "not applied while a commit is out"
    );
    assert!(
        h.core.poll_commit(h.now()).is_none(),
        "one commit out at a time"
    );

    h.ok();
    assert_eq!(ids(&h.lines(1)), [json!(1)]);
    assert!(h.lines(2).is_empty(), "its batch is not committed yet");
    let second = h.burst().expect("the inputs that waited, as one batch");
    assert_eq!(second.changes.len(), 2, "a row and its history: {second:?}");
    h.ok();
    let lines = h.lines(2);
    assert_eq!(ids(&lines), [json!(2), json!(3)]);
    assert_eq!(lines[0]["role"], "spectator");
    assert_eq!(keys_listed(&lines[1]), ["first", "second"]);
}

#[test]
fn max_batch_splits_a_burst_into_commits() {
    let mut h = H::with(3, nothing_restored());
    h.connect([1]);
    for id in 0..7 {
        h.input(track(1, id, &format!("k{id}")));
    }
    let mut sizes = Vec::new();
    while let Some(commit) = h.burst() {
        sizes.push(
            commit
                .changes
                .iter()
                .filter(|change| matches!(change, Change::Put(_)))
                .count(),
        );
        h.ok();
    }
    assert_eq!(sizes, [3, 3, 1]);
    let expected: Vec<Value> = (0..7).map(|id| json!(id)).collect();
    assert_eq!(ids(&h.lines(1)), expected, "every track answered, in order");
}

#[test]
fn a_batch_that_changes_nothing_needs_no_commit() {
    let mut h = H::new();
    h.connect([1]);
    h.inputs([
        request(1, 1, Op::Ping(Empty {})),
        presence(1, 2, Op::List(None)),
        subscribe(1, 3),
        request(1, 4, Op::Status(Empty {})),
    ]);
    assert!(h.burst().is_none());
    let lines = h.lines(1);
    assert_eq!(
        ids(&lines),
        [json!(1), json!(2), json!(3), Value::Null, json!(4)],
        "sent at once: {lines:?}"
    );
    assert_eq!(lines[4]["subscriptions"], 1);
    assert!(h.committed.is_empty());
}

/// Closes in a row go to the registry together: a topic announces its
/// departures in one diff, and the last in line hears of its promotion
/// once, before a list in the same batch.
#[test]
fn closes_that_arrive_together_are_announced_together() {
    let mut h = H::new();
    h.connect(1..=5);
    let mut joins: Vec<Input> = (1..=4)
        .map(|conn| track(conn, 1, &format!("k{conn}")))
        .collect();
    joins.push(subscribe(5, 1));
    h.committed_batch(joins);
    for conn in 1..=5 {
        h.lines(conn);
    }

    h.committed_batch(
        (1..=3)
            .map(close)
            .chain([presence(4, 2, Op::List(Some("doc".into())))]),
    );

    let last = h.lines(4);
    let roles: Vec<&Value> = last.iter().filter(|l| l["event"] == "role").collect();
    assert_eq!(
        roles.len(),
        1,
        "one role event, for the final owner: {last:?}"
    );
    assert_eq!(roles[0]["payload"]["role"], "owner");
    let listed = last.iter().find(|l| l["id"] == 2).expect("the list reply");
    assert_eq!(
        keys_listed(listed),
        ["k4"],
        "the closes apply before the list"
    );
    let diffs: Vec<Value> = h
        .lines(5)
        .into_iter()
        .filter(|l| l["event"] == "presence_diff")
        .collect();
    assert_eq!(diffs.len(), 1, "one diff for the three leaves: {diffs:?}");
    assert_eq!(diffs[0]["payload"]["leaves"].as_object().unwrap().len(), 3);
    assert_eq!(h.committed.len(), 2, "the joins, then the closes");
}

#[test]
fn a_stop_after_a_failed_request_is_clean_when_nothing_waits_to_be_saved() {
    let mut h = H::new();
    h.connect([1]);
    h.inputs([track(1, 1, "lost"), shutdown()]);
    assert!(!h.core.batch_has_room(), "a shutdown closes the batch");
    assert!(h.burst().is_some());
    h.fail();

    assert!(h.burst().is_none(), "nothing to try again");
    assert!(matches!(h.core.poll_stopped(), Some(Stopped::Shutdown)));
    let lines = h.lines(1);
    assert_eq!(lines[0]["error"]["code"], "internal");
    assert_eq!(lines[1]["event"], "shutdown");
    assert_eq!(lines[2], "closed");
}

/// A stop with facts that failed commits held back tries them once more;
/// if that fails too, the stop says so. Nothing after the shutdown is
/// taken in.
#[test]
fn stop_after_unsaved_facts_reports_them() {
    let mut h = H::new();
    h.connect([1, 2]);
    h.committed_batch([track(1, 1, "kept")]);
    h.lines(1);

    h.inputs([
        track(1, 2, "lost"),
        close(1),
        shutdown(),
        track(2, 3, "late"),
    ]);
    assert!(h.burst().is_some());
    h.fail();
    assert!(h.core.poll_stopped().is_none(), "one last try first");
    let last_try = h.burst().expect("the close, once more");
    assert!(
        last_try
            .changes
            .iter()
            .any(|change| matches!(change, Change::Delete(r) if r == "p1"))
    );
    h.fail();

    let stopped = h.core.poll_stopped();
    let Some(Stopped::Unsaved(cause)) = &stopped else {
        panic!("{stopped:?}");
    };
    assert_eq!(cause.to_string(), "the disk is full");
    let client = h.lines(1);
    assert_eq!(client[0]["error"]["code"], "internal");
    assert_eq!(client[1], "closed", "its close is not told of the shutdown");
    assert_eq!(
        h.lines(2),
        [
            json!({"event": "shutdown", "payload": {"reason": "test"}}),
            json!("closed")
        ],
        "the track after the shutdown was never applied"
    );
    assert_eq!(h.timeout(), None);
    assert_eq!(h.committed.len(), 1);
}

/// The rows of processes gone while no daemon ran are deleted by the
/// first commit, with their history; if that fails, the deletions are
/// retried like any fact (the history is not).
#[test]
fn dead_rows_at_start_are_the_first_commit_and_retried() {
    let restored = Restored {
        kept: vec![stored_entry("alive", 2, Lifetime::Process)],
        departed: vec![stored_entry("gone", 1, Lifetime::Process)],
        next_seq: 3,
    };
    let mut h = H::with(16, restored);
    assert_eq!(h.core.counts().entries, 1, "the dead row is not shown");
    let first = h.burst().expect("the deletion");
    assert!(matches!(&first.changes[0], Change::Delete(r) if r == "p1"));
    assert!(
        first
            .changes
            .iter()
            .any(|change| matches!(change, Change::History(_))),
        "the departure and the new owner are recorded: {first:?}"
    );
    h.fail();
    assert_eq!(h.timeout(), Some(100));

    h.at(100);
    h.tick();
    let retry = h.burst().expect("the deletion again");
    assert_eq!(retry.changes, [Change::Delete("p1".into())]);
    h.ok();
    assert_eq!(h.timeout(), None);
}

/// A spectator whose owner's process exited while no daemon ran was told
/// it was a spectator: resumed, it is told after the reply that it owns
/// the topic now, once the start's deletions are saved.
#[test]
fn a_spectator_behind_an_owner_dead_at_start_hears_its_promotion_on_resume() {
    let restored = Restored {
        kept: vec![stored_entry("stays", 2, Lifetime::Process)],
        departed: vec![stored_entry("gone", 1, Lifetime::Process)],
        next_seq: 3,
    };
    let mut h = H::with(16, restored);
    assert!(h.burst().is_some());
    h.ok();
    h.connect([1]);
    h.committed_batch([resume(1, 1, "stays")]);

    let lines = h.lines(1);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["id"], 1);
    assert_eq!(lines[0]["roles"]["p2"]["role"], "owner");
    assert_eq!(lines[1]["event"], "role");
    assert_eq!(lines[1]["payload"]["ref"], "p2");
    assert_eq!(lines[1]["payload"]["role"], "owner");
    assert_eq!(lines[1]["payload"]["position"], 0);
}

#[test]
fn a_start_with_nothing_to_remove_needs_no_commit() {
    let restored = Restored {
        kept: vec![stored_entry("alive", 1, Lifetime::Process)],
        departed: Vec::new(),
        next_seq: 2,
    };
    let mut h = H::with(16, restored);
    assert!(h.burst().is_none());
    assert_eq!(h.core.counts().entries, 1);
    assert_eq!(h.timeout(), None);
}

/// A restored counter that fell behind a restored entry's seq is raised,
/// and that is saved, so no seq is handed out twice.
#[test]
fn a_start_that_raises_the_counter_commits_it() {
    let restored = Restored {
        kept: vec![stored_entry("alive", 5, Lifetime::Process)],
        departed: Vec::new(),
        next_seq: 2,
    };
    let mut h = H::with(16, restored);
    let commit = h.burst().expect("the counter is saved");
    assert!(commit.changes.is_empty());
    assert_eq!(commit.next_seq, 6);
    h.ok();
}

/// A subscribe's `presence_state` is made after the batch commits, from a
/// view taken at the subscribe's place: it shows the tracks before it and
/// not those after, which reach the subscriber as the diffs that follow.
#[test]
fn a_subscribe_state_is_the_view_at_its_place_in_the_batch() {
    let mut h = H::new();
    h.connect([1, 2, 3]);
    h.committed_batch([track(1, 1, "before"), subscribe(2, 2), track(3, 3, "after")]);

    let lines = h.lines(2);
    assert_eq!(
        ids(&lines),
        [json!(2), Value::Null, Value::Null],
        "reply, state, diff: {lines:?}"
    );
    assert_eq!(lines[1]["event"], "presence_state");
    let state: Vec<&String> = lines[1]["payload"].as_object().unwrap().keys().collect();
    assert_eq!(state, ["before"], "the state as it was at the subscribe");
    assert_eq!(lines[2]["event"], "presence_diff");
    let joined: Vec<&String> = lines[2]["payload"]["joins"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(joined, ["after"], "the later track comes as a diff");
}

/// A `list` in a batch whose commit fails is answered from the rolled-back
/// registry: the view taken before the roll-back, which showed the undone
/// track, never leaves.
#[test]
fn a_list_in_a_failed_batch_shows_only_what_is_committed() {
    let mut h = H::new();
    h.connect([1, 2]);
    h.committed_batch([track(1, 1, "committed")]);
    h.lines(1);

    h.inputs([
        track(1, 2, "undone"),
        presence(2, 3, Op::List(Some("doc".into()))),
        presence(2, 4, Op::List(None)),
    ]);
    assert!(h.burst().is_some());
    h.fail();

    let lines = h.lines(2);
    assert_eq!(ids(&lines), [json!(3), json!(4)], "{lines:?}");
    assert_eq!(keys_listed(&lines[0]), ["committed"]);
    let everything = lines[1]["topics"]["doc"]["presences"].as_object().unwrap();
    let keys: Vec<&String> = everything.keys().collect();
    assert_eq!(keys, ["committed"]);

    // Committed, the same list shows the track before it.
    h.committed_batch([
        track(1, 5, "saved"),
        presence(2, 6, Op::List(Some("doc".into()))),
    ]);
    assert_eq!(keys_listed(&h.lines(2)[0]), ["committed", "saved"]);
}
