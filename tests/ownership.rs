//! Ownership end to end: real `presence join` processes on a real daemon,
//! killed for real.

use crate::common::{self, Daemon, next_event, within};
use presenced::protocol::{Event, LeaveReason, Role};

#[tokio::test]
async fn three_joins_make_one_owner_and_two_spectators_in_order() {
    let daemon = Daemon::start().await;
    let topic = "publishing_edit:docs:hello";

    let mut alice = daemon.spawn(&["join", topic, "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let mut bob = daemon.spawn(&["join", topic, "--key", "bob"]);
    let owner_is_alice = format!("owner alice (pid {})", alice.pid());
    assert_eq!(bob.line().await, format!("spectator #1, {owner_is_alice}"));
    let mut carol = daemon.spawn(&["join", topic, "--key", "carol"]);
    assert_eq!(
        carol.line().await,
        format!("spectator #2, {owner_is_alice}")
    );

    let (client, _events) = daemon.client().await;
    let listed = client.list(topic).await.expect("list");
    let owner = listed.state.owner.expect("an owner");
    assert_eq!((owner.key.as_str(), owner.pid), ("alice", alice.pid()));
    let mut order: Vec<(u64, String, u32)> = listed
        .state
        .presences
        .iter()
        .flat_map(|(key, p)| p.metas.iter().map(move |m| (m.seq, key.clone(), m.pid)))
        .collect();
    order.sort();
    let keys: Vec<&str> = order.iter().map(|(_, key, _)| key.as_str()).collect();
    assert_eq!(keys, ["alice", "bob", "carol"]);

    // What the daemon reports is what it committed.
    let db = rusqlite::Connection::open(&daemon.db).expect("open the database");
    let mut rows = db
        .prepare("SELECT key, pid FROM presences WHERE topic = ?1 ORDER BY seq")
        .expect("query");
    let rows: Vec<(String, u32)> = rows
        .query_map([topic], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows read");
    assert_eq!(
        rows,
        [
            ("alice".to_owned(), alice.pid()),
            ("bob".to_owned(), bob.pid()),
            ("carol".to_owned(), carol.pid()),
        ]
    );

    // `presence list --json` shows the same rows.
    let mut list = daemon.spawn(&["list", topic, "--json"]);
    let json = list.json().await;
    assert_eq!(json["topic"], topic);
    assert_eq!(json["owner"]["key"], "alice");
    assert_eq!(json["presences"]["carol"]["metas"][0]["pid"], carol.pid());
    assert_eq!(list.exit_code().await, Some(0));
}

#[tokio::test]
async fn sigkill_of_the_owner_promotes_the_next_in_line_and_tells_watchers() {
    let daemon = Daemon::start().await;
    let topic = "file:/srv/docs/post.md";
    let (watcher, mut events) = daemon.client().await;
    watcher.subscribe(topic).await.expect("subscribe");
    next_event(&mut events, |e| {
        matches!(e, Event::PresenceState { .. }).then_some(())
    })
    .await;

    let mut owner = daemon.spawn(&["join", topic, "--key", "alice", "--json"]);
    let owner_reply = owner.json().await;
    assert_eq!(owner_reply["role"], "owner");
    let owner_ref = owner_reply["ref"].as_str().expect("ref").to_owned();

    let mut next = daemon.spawn(&["join", topic, "--key", "bob", "--json"]);
    let next_reply = next.json().await;
    assert_eq!(next_reply["role"], "spectator");
    assert_eq!(next_reply["position"], 1);
    let next_ref = next_reply["ref"].as_str().expect("ref").to_owned();

    owner.sigkill();

    let role = next.json().await;
    assert_eq!(role["event"], "role");
    assert_eq!(role["topic"], topic);
    assert_eq!(role["payload"]["ref"], next_ref.as_str());
    assert_eq!(role["payload"]["role"], "owner");
    assert_eq!(role["payload"]["readonly"], false);
    assert_eq!(role["payload"]["owner"]["key"], "bob");

    let (reason, new_owner) = next_event(&mut events, |e| match e {
        Event::PresenceDiff {
            payload,
            owner,
            reasons,
            ..
        } if payload.leaves.contains_key("alice") => Some((reasons[&owner_ref], owner)),
        _ => None,
    })
    .await;
    assert!(
        matches!(reason, LeaveReason::Closed | LeaveReason::PidExit),
        "reason was {reason:?}"
    );
    assert_eq!(new_owner.expect("an owner").phx_ref, next_ref);
}

#[tokio::test]
async fn a_graceful_leave_promotes_the_next_and_the_leaver_exits_zero() {
    let daemon = Daemon::start().await;
    let mut first = daemon.spawn(&["join", "t", "--key", "a"]);
    assert_eq!(first.line().await, "owner");
    let mut second = daemon.spawn(&["join", "t", "--key", "b"]);
    assert!(second.line().await.starts_with("spectator"));

    first.sigterm();
    assert_eq!(first.exit_code().await, Some(0));
    assert_eq!(second.line().await, "owner");
}

#[tokio::test]
async fn join_with_pid_is_reaped_when_that_process_exits() {
    let daemon = Daemon::start().await;
    let mut sleeper = common::spawn_sleeper();
    let sleeper_pid = sleeper.id().expect("sleep pid");
    let (watcher, mut events) = daemon.client().await;
    watcher.subscribe("build").await.expect("subscribe");

    let mut join = daemon.spawn(&["join", "build", "--pid", &sleeper_pid.to_string(), "--json"]);
    let reply = join.json().await;
    assert_eq!(reply["ok"], true);
    let tracked = next_event(&mut events, |e| match e {
        Event::PresenceDiff { payload, .. } => {
            payload.joins.values().flat_map(|p| p.metas.clone()).next()
        }
        _ => None,
    })
    .await;
    assert_eq!(tracked.pid, sleeper_pid);

    common::signal(sleeper_pid, nix::sys::signal::Signal::SIGKILL);
    within("sleep to exit", sleeper.wait()).await.expect("wait");

    let reason = next_event(&mut events, |e| match e {
        Event::PresenceDiff { reasons, .. } => reasons.get(&tracked.phx_ref).copied(),
        _ => None,
    })
    .await;
    // The daemon reaps the entry itself, unless the join command, which
    // follows its --pid too, untracks it first.
    assert!(
        matches!(reason, LeaveReason::PidExit | LeaveReason::Untrack),
        "reason was {reason:?}"
    );
    // The join command follows its --pid and leaves cleanly.
    assert_eq!(join.exit_code().await, Some(0));
    let listed = watcher.list("build").await.expect("list");
    assert!(listed.state.presences.is_empty());
}

#[tokio::test]
async fn subscribe_gives_the_state_then_each_diff() {
    let daemon = Daemon::start().await;
    let (alice, _alice_events) = daemon.client().await;
    let joined = alice
        .track(presenced::protocol::TrackRequest::new("doc", "alice"))
        .await
        .expect("track");

    let (watcher, mut events) = daemon.client().await;
    watcher.subscribe("doc").await.expect("subscribe");
    match within("the state", events.recv()).await {
        Some(Event::PresenceState {
            topic,
            payload,
            owner,
        }) => {
            assert_eq!(topic, "doc");
            assert_eq!(payload["alice"].metas[0].phx_ref, joined.phx_ref);
            assert_eq!(owner.expect("owner").key, "alice");
        }
        other => panic!("expected presence_state first, got {other:?}"),
    }

    let (bob, _bob_events) = daemon.client().await;
    let bob_joined = bob
        .track(presenced::protocol::TrackRequest::new("doc", "bob"))
        .await
        .expect("track");
    assert_eq!(bob_joined.standing.role, Role::Spectator);
    match within("the join diff", events.recv()).await {
        Some(Event::PresenceDiff { payload, .. }) => {
            assert!(payload.leaves.is_empty());
            assert_eq!(payload.joins["bob"].metas[0].phx_ref, bob_joined.phx_ref);
        }
        other => panic!("expected a join diff, got {other:?}"),
    }

    alice
        .untrack(presenced::protocol::UntrackRequest {
            topic: "doc".into(),
            phx_ref: Some(joined.phx_ref.clone()),
            key: None,
        })
        .await
        .expect("untrack");
    match within("the leave diff", events.recv()).await {
        Some(Event::PresenceDiff {
            payload,
            owner,
            reasons,
            ..
        }) => {
            assert_eq!(payload.leaves["alice"].metas[0].phx_ref, joined.phx_ref);
            assert_eq!(reasons[&joined.phx_ref], LeaveReason::Untrack);
            assert_eq!(owner.expect("owner").phx_ref, bob_joined.phx_ref);
        }
        other => panic!("expected a leave diff, got {other:?}"),
    }
}

#[tokio::test]
async fn update_is_a_leave_plus_a_join_with_the_previous_ref() {
    let daemon = Daemon::start().await;
    let (client, _own_events) = daemon.client().await;
    let mut request = presenced::protocol::TrackRequest::new("doc", "alice");
    request.meta.insert("cursor".into(), 1.into());
    let joined = client.track(request).await.expect("track");
    let (watcher, mut events) = daemon.client().await;
    watcher.subscribe("doc").await.expect("subscribe");
    within("the state", events.recv()).await;

    let mut meta = serde_json::Map::new();
    meta.insert("cursor".into(), 42.into());
    let updated = client
        .update(presenced::protocol::UpdateRequest {
            topic: "doc".into(),
            phx_ref: None,
            key: Some("alice".into()),
            meta,
        })
        .await
        .expect("update");
    assert_eq!(updated.prev_ref, joined.phx_ref);
    assert_ne!(updated.phx_ref, joined.phx_ref);

    match within("the update diff", events.recv()).await {
        Some(Event::PresenceDiff {
            payload, reasons, ..
        }) => {
            let left = &payload.leaves["alice"].metas[0];
            let came = &payload.joins["alice"].metas[0];
            assert_eq!(left.phx_ref, joined.phx_ref);
            assert_eq!(left.client["cursor"], 1);
            assert_eq!(came.phx_ref, updated.phx_ref);
            assert_eq!(came.phx_ref_prev.as_deref(), Some(joined.phx_ref.as_str()));
            assert_eq!(came.client["cursor"], 42);
            assert_eq!((came.seq, came.joined_at), (joined.seq, joined.joined_at));
            assert_eq!(reasons[&joined.phx_ref], LeaveReason::Update);
        }
        other => panic!("expected an update diff, got {other:?}"),
    }
}

#[tokio::test]
async fn a_spectator_behind_a_departed_spectator_is_told_its_new_position() {
    let daemon = Daemon::start().await;
    let topic = "file:/srv/docs/queue.md";
    let mut alice = daemon.spawn(&["join", topic, "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let owner_is_alice = format!("owner alice (pid {})", alice.pid());
    let mut bob = daemon.spawn(&["join", topic, "--key", "bob"]);
    assert_eq!(bob.line().await, format!("spectator #1, {owner_is_alice}"));
    let mut carol = daemon.spawn(&["join", topic, "--key", "carol", "--json"]);
    let carol_reply = carol.json().await;
    assert_eq!(carol_reply["position"], 2, "{carol_reply}");
    let mut dave = daemon.spawn(&["join", topic, "--key", "dave"]);
    assert_eq!(dave.line().await, format!("spectator #3, {owner_is_alice}"));

    bob.sigkill();

    // Each one behind bob moves up one place and hears it once; alice,
    // ahead of him, stands as she stood.
    let role = carol.json().await;
    assert_eq!(role["event"], "role", "{role}");
    assert_eq!(role["payload"]["ref"], carol_reply["ref"]);
    assert_eq!(role["payload"]["role"], "spectator");
    assert_eq!(role["payload"]["position"], 1);
    assert_eq!(role["payload"]["owner"]["key"], "alice");
    assert_eq!(dave.line().await, format!("spectator #2, {owner_is_alice}"));

    // The owner leaving moves both again: carol is promoted, and dave is
    // first in line under her.
    alice.sigterm();
    assert_eq!(alice.exit_code().await, Some(0));
    let promoted = carol.json().await;
    assert_eq!(promoted["payload"]["role"], "owner", "{promoted}");
    assert_eq!(dave.line().await.split(',').next(), Some("spectator #1"));
}
