//! `presence stop`: the running daemon stops cleanly and is waited for;
//! and `presence status` says how the daemon was started.

use std::path::Path;

use crate::common::{
    self, Daemon, KillDaemonsOnDrop, finish, presence_command, spawn_sleeper, stdout,
};
use serde_json::Value;

/// Whether process `pid` has gone: no longer in /proc, or a zombie that
/// its new parent has yet to reap.
fn gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn presence(socket: &Path, db: &Path, args: &[&str]) -> std::process::Output {
    finish(presence_command(socket, db).args(args)).await
}

async fn status_json(socket: &Path, db: &Path) -> Value {
    let status = presence(socket, db, &["status", "--json"]).await;
    assert!(status.status.success(), "status: {status:?}");
    serde_json::from_str(&stdout(&status)).expect("status --json is JSON")
}

#[tokio::test]
async fn stop_ends_an_autostarted_daemon_and_a_detached_entry_outlives_it() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");
    let _cleanup = KillDaemonsOnDrop(socket.clone());
    let holder = spawn_sleeper();
    let holder_pid = holder.id().expect("sleep runs").to_string();

    // A client starts the daemon on demand.
    let joined = presence(
        &socket,
        &db,
        &[
            "join",
            "notes",
            "--key",
            "keeper",
            "--detach",
            "--pid",
            &holder_pid,
        ],
    )
    .await;
    assert!(joined.status.success(), "join: {joined:?}");

    let status = status_json(&socket, &db).await;
    assert_eq!(status["started_by"], "autostart", "{status}");
    let pid = status["pid"].as_u64().expect("status has the pid");
    let text = presence(&socket, &db, &["status"]).await;
    assert!(
        stdout(&text).contains("started by       autostart"),
        "{}",
        stdout(&text)
    );

    let stopped = presence(&socket, &db, &["stop"]).await;
    assert!(stopped.status.success(), "stop: {stopped:?}");
    assert!(
        stdout(&stopped).contains(&format!("stopped the daemon (pid {pid})")),
        "{}",
        stdout(&stopped)
    );
    // stop returns only once the daemon has gone: no waiting here.
    assert!(gone(pid), "daemon {pid} still runs after stop");
    assert!(!socket.exists(), "the socket is left behind");

    // The next command starts a new daemon, which still has the entry.
    let listed = presence(&socket, &db, &["list", "notes", "--json"]).await;
    assert!(listed.status.success(), "list: {listed:?}");
    assert!(
        stdout(&listed).contains("\"keeper\""),
        "the detached entry is gone: {}",
        stdout(&listed)
    );
    let again = status_json(&socket, &db).await;
    assert_ne!(again["pid"].as_u64(), Some(pid), "a new daemon serves");
    drop(holder);
}

#[tokio::test]
async fn stop_without_a_daemon_says_so_and_starts_none() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");
    let _cleanup = KillDaemonsOnDrop(socket.clone());

    let stopped = presence(&socket, &db, &["stop"]).await;
    assert!(stopped.status.success(), "stop: {stopped:?}");
    assert_eq!(
        stdout(&stopped).trim(),
        format!("no daemon is running at {}", socket.display())
    );
    assert!(!socket.exists(), "stop started a daemon");
}

#[tokio::test]
async fn status_says_a_daemon_run_by_hand_runs_in_the_foreground() {
    let daemon = Daemon::start().await;
    let status = daemon.output(&["status", "--json"]).await;
    let status: Value = serde_json::from_str(&stdout(&status)).expect("status --json is JSON");
    assert_eq!(status["started_by"], "foreground", "{status}");
    let text = daemon.output(&["status"]).await;
    assert!(
        stdout(&text).contains("started by       foreground"),
        "{}",
        stdout(&text)
    );
}

#[tokio::test]
async fn stop_gives_up_after_its_timeout_on_a_daemon_that_does_not_go() {
    let daemon = Daemon::start().await;
    let pid = daemon.pid();
    // A stopped process neither answers nor exits.
    common::signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let started = std::time::Instant::now();
    let stopped = daemon.output(&["stop", "--timeout", "0.5"]).await;
    common::signal(pid, nix::sys::signal::Signal::SIGCONT);
    assert_eq!(stopped.status.code(), Some(1), "stop: {stopped:?}");
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(stderr.contains("gave up after 0.5s"), "{stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
    assert!(!gone(u64::from(pid)), "the daemon was not to be stopped");
}

#[tokio::test]
async fn a_daemon_systemd_started_is_reported_and_left_to_systemctl() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");
    let notify_path = dir.path().join("notify");
    let _notify = tokio::net::UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
    let mut program = tokio::process::Command::new(common::presence_bin());
    program.env("NOTIFY_SOCKET", &notify_path);
    let mut daemon = common::start_daemon(program, &socket, &db, &[]).await;
    let pid = u64::from(daemon.id().expect("the daemon runs"));

    let status = status_json(&socket, &db).await;
    assert_eq!(status["started_by"], "systemd", "{status}");
    let stopped = presence(&socket, &db, &["stop"]).await;
    assert_eq!(stopped.status.code(), Some(1), "stop: {stopped:?}");
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        stderr.contains("started by systemd") && stderr.contains("systemctl --user stop"),
        "{stderr}"
    );
    assert!(!gone(pid), "stop signalled a daemon systemd runs");
    let _ = daemon.start_kill();
}

#[tokio::test]
#[ignore = "needs root: runs the caller as another uid (setpriv)"]
async fn stop_refuses_a_shared_daemon_of_another_user() {
    common::needs_root();
    // root's daemon, shared with the group nogroup, which uid 65534 is in.
    let daemon = Daemon::start_with(&["--group", "nogroup"]).await;
    let binary = common::binary_for_nobody(daemon.dir.path());
    let mut stop = common::as_nobody(&binary);
    stop.arg("--socket").arg(&daemon.socket).arg("stop");
    let stopped = finish(&mut stop).await;
    assert_eq!(stopped.status.code(), Some(1), "stop: {stopped:?}");
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        stderr.contains("runs as uid 0 (root)") && stderr.contains("only its user or root"),
        "{stderr}"
    );
    assert!(
        !gone(u64::from(daemon.pid())),
        "another user's daemon was stopped"
    );
}
