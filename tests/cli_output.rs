//! What people read: `presence watch` and `presence list` as a person sees
//! them, driven by real joins and a real SIGKILL.

mod common;

use common::Daemon;

#[tokio::test]
async fn watch_prints_the_state_then_one_line_per_change() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");

    let mut watch = daemon.spawn(&["watch", "doc"]);
    assert_eq!(
        watch.line().await,
        format!("doc: owner alice (pid {}), 0 spectators", alice.pid())
    );

    let mut bob = daemon.spawn(&["join", "doc", "--key", "bob"]);
    assert!(bob.line().await.starts_with("spectator"));
    assert_eq!(
        watch.line().await,
        format!("+ bob (pid {}) joined", bob.pid())
    );

    let alice_pid = alice.pid();
    alice.sigkill();
    let left = watch.line().await;
    assert!(
        left == format!("- alice (pid {alice_pid}) connection closed")
            || left == format!("- alice (pid {alice_pid}) process exited"),
        "{left}"
    );
    assert_eq!(
        watch.line().await,
        format!("→ bob (pid {}) is now owner", bob.pid())
    );
}

#[tokio::test]
async fn list_prints_a_table_in_join_order() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let mut bob = daemon.spawn(&["join", "doc", "--key", "bob"]);
    assert!(bob.line().await.starts_with("spectator"));

    let mut list = daemon.spawn(&["list"]);
    let header: Vec<String> = list
        .line()
        .await
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(header, ["TOPIC", "ROLE", "KEY", "USER", "PID", "JOINED"]);
    let first = list.line().await;
    let second = list.line().await;
    let columns =
        |row: &str| -> Vec<String> { row.split_whitespace().map(str::to_owned).collect() };
    let first = columns(&first);
    let second = columns(&second);
    assert_eq!(first[..3], ["doc", "owner", "alice"]);
    assert_eq!(first[4], alice.pid().to_string());
    assert_eq!(second[..4], ["doc", "spectator", "#1", "bob"]);
    assert_eq!(second[5], bob.pid().to_string());
    assert_eq!(list.exit_code().await, Some(0));
}
