//! `presence join --detach` and `--wait-owner`: exit statuses a script can
//! branch on, entries that outlive the command, and waiting for a turn the
//! way flock(1) waits for a lock.

use std::process::Stdio;

use crate::common::{self, Daemon, next_event, spawn_sleeper, stdout, within};
use presenced::protocol::Event;

/// The keys present on a topic, owner first.
async fn keys(daemon: &Daemon, topic: &str) -> Vec<String> {
    let (client, _events) = daemon.client().await;
    let listed = within("list", client.list(topic)).await.expect("list");
    let mut metas: Vec<(u64, String)> = listed
        .state
        .presences
        .iter()
        .flat_map(|(key, p)| p.metas.iter().map(move |m| (m.seq, key.clone())))
        .collect();
    metas.sort();
    metas.into_iter().map(|(_, key)| key).collect()
}

#[tokio::test]
async fn detach_exits_0_as_the_owner_and_3_as_a_spectator_and_the_entries_stay() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();

    let first = daemon
        .output(&["join", "doc", "--detach", "--key", "alice", "--pid", &pid])
        .await;
    assert_eq!(first.status.code(), Some(0));
    assert_eq!(stdout(&first), "owner, ref p1\n");

    let second = daemon
        .output(&["join", "doc", "--detach", "--key", "bob", "--pid", &pid])
        .await;
    assert_eq!(second.status.code(), Some(3));
    assert_eq!(
        stdout(&second),
        format!("spectator #1, owner alice (pid {pid}), ref p2\n")
    );
    assert!(second.stderr.is_empty(), "a spectator is not an error");

    // Both commands are gone; their entries are not.
    assert_eq!(keys(&daemon, "doc").await, ["alice", "bob"]);

    let json = daemon
        .output(&[
            "join", "doc", "--detach", "--key", "carol", "--pid", &pid, "--json",
        ])
        .await;
    assert_eq!(json.status.code(), Some(3));
    let reply: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(reply["role"], "spectator");
    assert_eq!(reply["position"], 2);
    assert_eq!(reply["ref"], "p3");
}

#[tokio::test]
async fn detach_gives_the_entry_to_the_process_that_ran_presence() {
    let daemon = Daemon::start().await;
    let (watcher, mut events) = daemon.client().await;
    watcher.subscribe("doc").await.expect("subscribe");
    // The shell runs presence, then becomes a sleep with the same pid.
    let mut shell = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(r#""$0" --socket "$1" --no-autostart join doc --detach --key sh && exec sleep 1000"#)
        .arg(common::presence_bin())
        .arg(&daemon.socket)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sh spawns");
    let shell_pid = shell.id().expect("shell pid");
    let joined_pid = next_event(&mut events, |event| match event {
        Event::PresenceDiff { payload, .. } => payload.joins.get("sh").map(|p| p.metas[0].pid),
        _ => None,
    })
    .await;
    assert_eq!(joined_pid, shell_pid);

    // The entry ends with the shell, not with presence.
    shell.start_kill().expect("kill the shell");
    next_event(&mut events, |event| match event {
        Event::PresenceDiff { payload, .. } => payload.leaves.contains_key("sh").then_some(()),
        _ => None,
    })
    .await;
}

#[tokio::test]
async fn wait_owner_with_detach_returns_once_the_owner_leaves_and_keeps_the_entry() {
    let daemon = Daemon::start().await;
    let owner_process = spawn_sleeper();
    let owner_pid = owner_process.id().expect("sleeper pid").to_string();
    let waiter_process = spawn_sleeper();
    let waiter_pid = waiter_process.id().expect("sleeper pid").to_string();

    let mut waiter = daemon
        .detached_owner_and_waiter("lock", &owner_pid, &waiter_pid)
        .await;
    assert_eq!(
        waiter.line().await,
        format!("spectator #1, owner a (pid {owner_pid}), ref p2")
    );

    // The owner's process ends: its entry goes, and the waiter's turn comes.
    drop(owner_process);
    assert_eq!(waiter.line().await, "owner, ref p2");
    assert_eq!(waiter.exit_code().await, Some(0));
    assert_eq!(keys(&daemon, "lock").await, ["b"]);
}

#[tokio::test]
async fn wait_owner_while_holding_prints_owner_and_goes_on_holding() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let owner = daemon
        .output(&["join", "doc", "--detach", "--key", "a", "--pid", &pid])
        .await;
    assert_eq!(owner.status.code(), Some(0));

    let mut holder = daemon.spawn(&["join", "doc", "--wait-owner", "--key", "b"]);
    assert!(holder.line().await.starts_with("spectator #1, owner a"));
    let left = daemon.output(&["leave", "doc", "--ref", "p1"]).await;
    assert_eq!(stdout(&left), "left doc (1 entry)\n");
    assert_eq!(holder.line().await, "owner");

    // Still holding: it leaves, and exits 0, on SIGTERM.
    assert_eq!(keys(&daemon, "doc").await, ["b"]);
    holder.sigterm();
    assert_eq!(holder.exit_code().await, Some(0));
    assert!(keys(&daemon, "doc").await.is_empty());
}

#[tokio::test]
async fn wait_owner_gives_up_at_its_timeout_and_leaves_the_queue() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let owner = daemon
        .output(&["join", "doc", "--detach", "--key", "a", "--pid", &pid])
        .await;
    assert_eq!(owner.status.code(), Some(0));

    for extra in [&["--detach", "--pid", &pid][..], &[]] {
        let mut args = vec![
            "join",
            "doc",
            "--key",
            "b",
            "--wait-owner",
            "--timeout",
            "0.2",
        ];
        args.extend_from_slice(extra);
        let gave_up = daemon.output(&args).await;
        assert_eq!(gave_up.status.code(), Some(3), "{args:?}");
        assert!(stdout(&gave_up).starts_with("spectator #1, owner a"));
        let stderr = String::from_utf8_lossy(&gave_up.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("still not the owner of doc"), "{stderr}");
        assert_eq!(keys(&daemon, "doc").await, ["a"], "{args:?}");
    }
}

#[tokio::test]
async fn wait_owner_interrupted_leaves_the_queue_and_exits_3() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let owner = daemon
        .output(&["join", "doc", "--detach", "--key", "a", "--pid", &pid])
        .await;
    assert_eq!(owner.status.code(), Some(0));

    let mut waiter = daemon.spawn(&[
        "join",
        "doc",
        "--detach",
        "--wait-owner",
        "--key",
        "b",
        "--pid",
        &pid,
    ]);
    assert!(waiter.line().await.starts_with("spectator"));
    common::signal(waiter.pid(), nix::sys::signal::Signal::SIGINT);
    assert_eq!(waiter.exit_code().await, Some(3));
    assert_eq!(keys(&daemon, "doc").await, ["a"]);
}

#[tokio::test]
async fn an_owner_needs_no_waiting() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let joined = daemon
        .output(&["join", "doc", "--detach", "--wait-owner", "--pid", &pid])
        .await;
    assert_eq!(joined.status.code(), Some(0));
    assert_eq!(stdout(&joined), "owner, ref p1\n");
}

#[tokio::test]
async fn timeout_without_wait_owner_is_a_usage_error() {
    let daemon = Daemon::start().await;
    let refused = daemon.output(&["join", "doc", "--timeout", "5"]).await;
    assert_eq!(refused.status.code(), Some(2));
    let empty_topic = daemon.output(&["join", ""]).await;
    assert_eq!(empty_topic.status.code(), Some(2));
}

#[tokio::test]
async fn a_pid_that_is_not_running_is_one_line_naming_the_option() {
    let daemon = Daemon::start().await;
    let mut gone = spawn_sleeper();
    let pid = gone.id().expect("sleeper pid");
    gone.start_kill().expect("kill");
    within("the sleeper to exit", gone.wait())
        .await
        .expect("wait");
    let refused = daemon
        .output(&["join", "doc", "--detach", "--pid", &pid.to_string()])
        .await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        stderr,
        format!("presence: no running process {pid}; check --pid\n")
    );
}
