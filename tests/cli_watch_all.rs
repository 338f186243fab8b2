//! Queue positions as people read them: `join` says which spectator it
//! is and who owns the topic, and `watch` says where each joiner stands;
//! driven by real joins and a real SIGKILL of the owner.

mod common;

use common::Daemon;

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
