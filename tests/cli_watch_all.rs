//! Queue positions as people read them: `join` says which spectator it
//! is and who owns the topic, and `watch` says where each joiner stands;
//! driven by real joins and a real SIGKILL of the owner.

use crate::common::{self, Daemon};

/// A `watch` line without its `12:03:09  ` time.
async fn timeline_line(watch: &mut common::Running) -> String {
    let line = watch.line().await;
    match line.split_at_checked(10) {
        Some((_, rest)) => rest.to_owned(),
        None => panic!("no time prefix: {line:?}"),
    }
}

#[tokio::test]
async fn join_and_watch_give_each_spectator_its_place_in_the_queue() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let alice_pid = alice.pid();

    let mut watch = daemon.spawn(&["watch", "doc"]);
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("doc: owner alice (pid {alice_pid}), 0 spectators")
    );

    let mut bob = daemon.spawn(&["join", "doc", "--key", "bob"]);
    assert_eq!(
        bob.line().await,
        format!("spectator #1, owner alice (pid {alice_pid})")
    );
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("+ bob (pid {}) joined as spectator #1", bob.pid())
    );

    let mut carol = daemon.spawn(&["join", "doc", "--key", "carol"]);
    assert_eq!(
        carol.line().await,
        format!("spectator #2, owner alice (pid {alice_pid})")
    );
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("+ carol (pid {}) joined as spectator #2", carol.pid())
    );

    // The owner dies: bob moves up to owner, carol to first in line.
    alice.sigkill();
    assert_eq!(bob.line().await, "owner");
    assert_eq!(
        carol.line().await,
        format!("spectator #1, owner bob (pid {})", bob.pid())
    );
    let left = timeline_line(&mut watch).await;
    assert!(
        left.starts_with(&format!("- alice (pid {alice_pid}) left"))
            && left.ends_with(&format!("→ bob (pid {}) is now owner", bob.pid())),
        "{left}"
    );
}

#[tokio::test]
async fn a_detached_spectator_prints_its_place_and_ref() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "deploy", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let sleeper = common::spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let joined = daemon
        .command()
        .args(["join", "deploy", "--detach", "--key", "bob", "--pid", &pid])
        .output()
        .await
        .expect("presence runs");
    assert_eq!(joined.status.code(), Some(3), "{joined:?}");
    assert_eq!(
        String::from_utf8_lossy(&joined.stdout),
        format!("spectator #1, owner alice (pid {}), ref p2\n", alice.pid())
    );
}

/// Waits until the daemon counts `n` subscriptions: a watch that has
/// subscribed sees what follows as changes, not as its first state.
async fn subscriptions_reach(daemon: &Daemon, n: usize) {
    let (client, _events) = daemon.client().await;
    common::eventually("the watch to subscribe", async || {
        client.status().await.expect("status").subscriptions == n
    })
    .await;
}

#[tokio::test]
async fn watch_all_follows_every_topic_with_the_topic_first() {
    let daemon = Daemon::start().await;
    let mut all = daemon.spawn(&["watch", "--all"]);
    let mut json = daemon.spawn(&["watch", "--json"]);
    subscriptions_reach(&daemon, 2).await;

    let mut alice = daemon.spawn(&["join", "doc:a", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let alice_pid = alice.pid();
    assert_eq!(
        timeline_line(&mut all).await,
        format!("doc:a: + alice (pid {alice_pid}) joined as owner")
    );
    let mut bob = daemon.spawn(&["join", "doc:a", "--key", "bob"]);
    assert!(bob.line().await.starts_with("spectator #1"));
    assert_eq!(
        timeline_line(&mut all).await,
        format!("doc:a: + bob (pid {}) joined as spectator #1", bob.pid())
    );
    let mut carol = daemon.spawn(&["join", "wiki", "--key", "carol"]);
    assert_eq!(carol.line().await, "owner");
    assert_eq!(
        timeline_line(&mut all).await,
        format!("wiki: + carol (pid {}) joined as owner", carol.pid())
    );

    alice.sigkill();
    let left = timeline_line(&mut all).await;
    assert!(
        left.starts_with(&format!("doc:a: - alice (pid {alice_pid}) left"))
            && left.ends_with(&format!("→ bob (pid {}) is now owner", bob.pid())),
        "{left}"
    );

    // --json: one event per line, each naming its topic, in order.
    let mut topics = Vec::new();
    for _ in 0..4 {
        let event = json.json().await;
        assert_eq!(event["event"], "presence_diff", "{event}");
        topics.push(event["topic"].as_str().expect("a topic").to_owned());
    }
    assert_eq!(topics, ["doc:a", "doc:a", "wiki", "doc:a"]);
}

#[tokio::test]
async fn watch_all_starts_with_the_state_of_each_occupied_topic() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let mut bob = daemon.spawn(&["join", "wiki", "--key", "bob"]);
    assert_eq!(bob.line().await, "owner");
    let mut watch = daemon.spawn(&["watch"]);
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("doc: owner alice (pid {}), 0 spectators", alice.pid())
    );
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("wiki: owner bob (pid {}), 0 spectators", bob.pid())
    );
}

#[tokio::test]
async fn subscribe_takes_a_topic_or_all_but_not_both() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    for (id, request) in [
        (1, r#"{"op":"subscribe","id":1,"topic":"doc","all":true}"#),
        (2, r#"{"op":"subscribe","id":2}"#),
    ] {
        raw.send(request).await;
        let reply = raw.next().await.expect("a reply");
        assert_eq!(reply["id"], id, "{reply}");
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    }
    raw.send(r#"{"op":"subscribe","id":3,"all":true}"#).await;
    let reply = raw.next().await.expect("a reply");
    assert_eq!(
        (reply["id"].clone(), reply["ok"].clone()),
        (3.into(), true.into())
    );
}

#[tokio::test]
async fn watch_all_subscribes_again_after_a_daemon_crash() {
    let mut daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let mut watch = daemon.spawn(&["watch", "--all"]);
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("doc: owner alice (pid {}), 0 spectators", alice.pid())
    );
    daemon.crash().await;
    daemon.start_again(&["--resume-grace", "600"]).await;
    // alice resumes her entry and the watch subscribes again: both count.
    let (client, _events) = daemon.client().await;
    common::eventually("the watch and alice to be back", async || {
        let status = client.status().await.expect("status");
        status.subscriptions == 1 && status.awaiting_resume == 0
    })
    .await;
    let mut bob = daemon.spawn(&["join", "wiki", "--key", "bob"]);
    assert_eq!(bob.line().await, "owner");
    // The same state again is not news: the next line is bob's join.
    assert_eq!(
        timeline_line(&mut watch).await,
        format!("wiki: + bob (pid {}) joined as owner", bob.pid())
    );
}

/// A topic whose only entry's process died while the daemon was down
/// gets no state when the watch subscribes again: the watch must still
/// say that it emptied, or its reader believes the dead owner still owns it.
#[tokio::test]
async fn watch_all_says_when_a_topic_emptied_while_the_daemon_was_down() {
    for json in [false, true] {
        let mut daemon = Daemon::start().await;
        let mut sleeper = common::spawn_sleeper();
        let sleeper_pid = sleeper.id().expect("the sleeper runs").to_string();
        let joined = daemon
            .output(&[
                "join",
                "doc",
                "--key",
                "alice",
                "--detach",
                "--pid",
                &sleeper_pid,
            ])
            .await;
        assert!(joined.status.success(), "{joined:?}");
        let mut watch = match json {
            false => daemon.spawn(&["watch", "--all"]),
            true => daemon.spawn(&["watch", "--all", "--json"]),
        };
        if json {
            let reply = watch.json().await;
            assert_eq!(reply["event"], "presence_state", "{reply}");
            assert!(reply["payload"]["alice"].is_object(), "{reply}");
        } else {
            assert_eq!(
                timeline_line(&mut watch).await,
                format!("doc: owner alice (pid {sleeper_pid}), 0 spectators")
            );
        }
        daemon.stop().await;
        sleeper.kill().await.expect("the sleeper is killed");
        daemon.start_again(&[]).await;
        if json {
            let state = watch.json().await;
            assert_eq!(
                (&state["event"], &state["topic"], &state["payload"]),
                (
                    &"presence_state".into(),
                    &"doc".into(),
                    &serde_json::json!({})
                ),
                "{state}"
            );
        } else {
            assert_eq!(timeline_line(&mut watch).await, "doc: nobody is present");
        }
    }
}

#[tokio::test]
async fn unsubscribe_all_ends_every_topic_but_keeps_those_named() {
    let daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    let reply = raw.request(r#"{"op":"subscribe","id":1,"all":true}"#).await;
    assert_eq!(reply["topics"], serde_json::json!([]), "{reply}");
    let reply = raw
        .request(r#"{"op":"subscribe","id":2,"topic":"doc"}"#)
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        raw.next().await.expect("doc's state")["event"],
        "presence_state"
    );
    let reply = raw
        .request(r#"{"op":"unsubscribe","id":3,"all":true}"#)
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    for (id, request) in [
        (4, r#"{"op":"unsubscribe","id":4}"#),
        (5, r#"{"op":"unsubscribe","id":5,"topic":"doc","all":true}"#),
    ] {
        let reply = raw.request(request).await;
        assert_eq!(reply["id"], id, "{reply}");
        assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    }
    // A join on another topic reaches this connection no more; one on
    // the topic it named still does, and is the next line it reads.
    let sleeper = common::spawn_sleeper();
    let sleeper_pid = sleeper.id().expect("the sleeper runs").to_string();
    for topic in ["wiki", "doc"] {
        let joined = daemon
            .output(&["join", topic, "--detach", "--pid", &sleeper_pid])
            .await;
        assert!(joined.status.success(), "{joined:?}");
    }
    let diff = raw.next().await.expect("doc's diff");
    assert_eq!(
        (&diff["event"], &diff["topic"]),
        (&"presence_diff".into(), &"doc".into()),
        "{diff}"
    );
    // The reply to subscribing to all again names the occupied topics,
    // whose states follow in that order.
    let reply = raw.request(r#"{"op":"subscribe","id":6,"all":true}"#).await;
    assert_eq!(
        reply["topics"],
        serde_json::json!(["doc", "wiki"]),
        "{reply}"
    );
    for topic in ["doc", "wiki"] {
        let state = raw.next().await.expect("a state");
        assert_eq!(state["topic"], topic, "{state}");
    }
}
