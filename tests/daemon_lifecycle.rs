//! Starting daemons: on demand, exactly once, never over a live one, and
//! past a stale socket file.

use crate::common::{
    self, Daemon, KillDaemonsOnDrop, daemons_serving, mode, presence_bin, refused_start, within,
};
use tokio::process::Command;

#[tokio::test]
async fn two_clients_starting_at_once_make_exactly_one_daemon() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");
    let client = |topic: &str| {
        let mut command = common::presence_command(&socket, &db);
        command.args(["list", topic, "--json"]);
        command
    };
    let _cleanup = KillDaemonsOnDrop(socket.clone());
    let first = client("a").spawn().expect("first client");
    let second = client("b").spawn().expect("second client");
    let (first, second) = within("both clients", async {
        tokio::join!(first.wait_with_output(), second.wait_with_output())
    })
    .await;
    let first = first.expect("first client output");
    let second = second.expect("second client output");

    let daemons = daemons_serving(&socket);
    assert!(
        first.status.success(),
        "first client failed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        second.status.success(),
        "second client failed: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(daemons.len(), 1, "daemons serving the socket: {daemons:?}");
    // The auto-started daemon logs beside its database.
    assert!(db.with_file_name("daemon.log").exists());
}

#[tokio::test]
async fn no_autostart_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("presenced.sock");
    let output = Command::new(presence_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["--no-autostart", "list"])
        .output()
        .await
        .expect("presence runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no daemon at"), "{stderr}");
    assert!(stderr.contains("presence daemon"), "{stderr}");
}

#[tokio::test]
async fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let daemon = Daemon::start().await;
    let stderr = refused_start(&daemon.socket, &daemon.dir.path().join("other.db")).await;
    assert!(stderr.contains("already serving"), "{stderr}");
    assert!(stderr.contains(&daemon.pid().to_string()), "{stderr}");
    // The first one still answers.
    let (client, _events) = daemon.client().await;
    client.ping().await.expect("the first daemon still serves");
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("presenced.sock");
    // A socket file nobody listens on, as a killed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());

    let db = dir.path().join("p.db");
    let _daemon = common::start_daemon(Command::new(presence_bin()), &socket, &db, &[]).await;
    let (client, _events) = common::connect(&socket).await;
    client.ping().await.expect("ping");
}

#[tokio::test]
async fn the_socket_is_private() {
    let daemon = Daemon::start().await;
    assert_eq!(mode(&daemon.socket), 0o600);
    assert_eq!(mode(daemon.socket.parent().expect("folder")), 0o700);
}

#[tokio::test]
async fn a_socket_folder_writable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temporary folder");
    let open = dir.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let stderr = refused_start(&open.join("presenced.sock"), &dir.path().join("p.db")).await;
    assert!(stderr.contains("writable by group or others"), "{stderr}");
}

#[tokio::test]
async fn sigterm_tells_clients_removes_the_socket_and_keeps_the_rows() {
    let mut daemon = Daemon::start().await;
    let (client, mut events) = daemon.client().await;
    let mut request = presenced::protocol::TrackRequest::new("doc", "alice");
    request.lifetime = presenced::protocol::Lifetime::Process;
    client.track(request).await.expect("track");

    common::signal(daemon.pid(), nix::sys::signal::Signal::SIGTERM);
    let reason = common::next_event(&mut events, |e| match e {
        presenced::protocol::Event::Shutdown { payload } => Some(payload.reason),
        _ => None,
    })
    .await;
    assert!(reason.contains("SIGTERM"), "{reason}");
    assert_eq!(daemon.wait().await, Some(0), "the daemon stops cleanly");
    assert!(!daemon.socket.exists(), "the socket should be removed");
    assert_eq!(
        common::rows_on_disk(&daemon.db),
        1,
        "the entry is kept for the restart"
    );
}

#[tokio::test]
async fn a_restart_keeps_every_place_and_still_reaps_dead_processes() {
    use presenced::protocol::{Lifetime, TrackRequest};
    let daemon = Daemon::start().await;
    let mut first_owner = common::spawn_sleeper();
    let second = common::spawn_sleeper();
    let (client, _events) = daemon.client().await;
    let mut tracked = Vec::new();
    for (key, process) in [("first", &first_owner), ("second", &second)] {
        let mut request = TrackRequest::new("doc", key);
        request.pid = process.id();
        request.lifetime = Lifetime::Process;
        tracked.push(client.track(request).await.expect("track"));
    }
    drop(client);

    let daemon = daemon.restart(&[]).await;
    let (watcher, mut events) = daemon.client().await;
    watcher.subscribe("doc").await.expect("subscribe");
    let (presences, owner) = common::next_event(&mut events, |e| match e {
        presenced::protocol::Event::PresenceState { payload, owner, .. } => Some((payload, owner)),
        _ => None,
    })
    .await;
    assert_eq!(presences["first"].metas[0].phx_ref, tracked[0].phx_ref);
    assert_eq!(presences["first"].metas[0].seq, tracked[0].seq);
    assert_eq!(presences["second"].metas[0].seq, tracked[1].seq);
    assert_eq!(owner.expect("owner").phx_ref, tracked[0].phx_ref);

    // The restarted daemon watches the owner's process again.
    first_owner.start_kill().expect("kill the owner's process");
    let (reason, owner) = common::next_event(&mut events, |e| match e {
        presenced::protocol::Event::PresenceDiff { reasons, owner, .. } => reasons
            .get(&tracked[0].phx_ref)
            .copied()
            .map(|r| (r, owner)),
        _ => None,
    })
    .await;
    assert_eq!(reason, presenced::protocol::LeaveReason::PidExit);
    assert_eq!(owner.expect("owner").phx_ref, tracked[1].phx_ref);
    // A new entry never reuses a seq from before the restart.
    let later = watcher
        .track(TrackRequest::new("doc", "later"))
        .await
        .expect("track");
    assert!(later.seq > tracked[1].seq);
}

#[tokio::test]
async fn two_daemons_never_share_a_database() {
    let daemon = Daemon::start().await;
    let stderr = refused_start(
        &daemon.dir.path().join("elsewhere/presenced.sock"),
        &daemon.db,
    )
    .await;
    assert!(stderr.contains("is using this database"), "{stderr}");
    assert!(stderr.contains(&daemon.pid().to_string()), "{stderr}");
}

#[tokio::test]
async fn a_file_at_the_socket_path_is_never_replaced() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "precious").expect("write");
    let stderr = refused_start(&notes, &dir.path().join("p.db")).await;
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&notes).expect("read"), "precious");
}

#[tokio::test]
async fn after_a_restart_connection_entries_wait_for_resume_then_expire() {
    use presenced::protocol::{Event, LeaveReason, Role, TrackRequest};
    let daemon = Daemon::start().await;
    let mut sleeper = common::spawn_sleeper();
    let (client, _events) = daemon.client().await;
    let mut tracked = Vec::new();
    for key in ["resumed", "forgotten"] {
        let mut request = TrackRequest::new("doc", key);
        // A live process, so the restart does not reap the entries.
        request.pid = sleeper.id();
        tracked.push(client.track(request).await.expect("track"));
    }

    let daemon = daemon.restart(&["--resume-grace", "0.5"]).await;
    let (watcher, mut events) = daemon.client().await;
    watcher.subscribe("doc").await.expect("subscribe");
    let state = common::next_event(&mut events, |e| match e {
        Event::PresenceState { payload, .. } => Some(payload),
        _ => None,
    })
    .await;
    assert_eq!(state.len(), 2, "both entries keep their place for now");

    let (resumer, _resumer_events) = daemon.client().await;
    let resumed = resumer
        .resume(vec![tracked[0].resume_token.clone(), "not-a-token".into()])
        .await
        .expect("resume");
    assert_eq!(resumed.resumed, [tracked[0].phx_ref.clone()]);
    assert_eq!(resumed.expired, ["not-a-token"]);
    assert_eq!(resumed.roles[&tracked[0].phx_ref].role, Role::Owner);

    let reason = common::next_event(&mut events, |e| match e {
        Event::PresenceDiff { reasons, .. } => reasons.get(&tracked[1].phx_ref).copied(),
        _ => None,
    })
    .await;
    assert_eq!(reason, LeaveReason::Expired);
    let listed = watcher.list("doc").await.expect("list");
    assert_eq!(listed.state.presences.len(), 1);
    assert!(listed.state.presences.contains_key("resumed"));
    sleeper.start_kill().expect("kill sleep");
}
