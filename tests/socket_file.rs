//! The socket file under a running daemon: deleted (as tmp cleaners do),
//! its folder deleted, its lock deleted, or something else put in its
//! place. The daemon puts back what is gone and never touches what it did
//! not make.
//!
//! What these tests wait for is the daemon's reaction to a change in the
//! file system, which it announces nowhere but its log and the socket
//! itself. So they poll, every few milliseconds, and each wait fails at the
//! harness's deadline instead of sleeping and hoping.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::common::{Daemon, connect_when_ready, eventually, mode, refused_start};
use presenced::client::Client;
use presenced::protocol::TrackRequest;

fn folder(socket: &Path) -> &Path {
    socket.parent().expect("socket folder")
}

fn lock_file(socket: &Path) -> PathBuf {
    presenced::paths::daemon_lock(socket)
}

/// Whether `client` still sees `key` tracked in `topic`.
async fn sees(client: &Client, topic: &str, key: &str) -> bool {
    let listed = client.list(topic).await.expect("list");
    listed.state.presences.contains_key(key)
}

/// Puts `what` at `socket` in one step, as `mv` does: the daemon must never
/// find the path empty in between.
fn put_in_place(socket: &Path, what: impl FnOnce(&Path)) {
    let stand_in = folder(socket).join("stand-in");
    what(&stand_in);
    std::fs::rename(&stand_in, socket).expect("rename over the socket");
}

#[tokio::test]
async fn a_deleted_socket_is_bound_again_and_old_connections_carry_on() {
    let daemon = Daemon::start().await;
    let (old, _old_events) = daemon.client().await;
    old.track(TrackRequest::new("doc", "alice"))
        .await
        .expect("track");

    std::fs::remove_file(&daemon.socket).expect("delete the socket");
    let (fresh, _fresh_events) = connect_when_ready(&daemon.socket).await;

    assert_eq!(mode(&daemon.socket), 0o600);
    assert!(
        sees(&old, "doc", "alice").await,
        "the old connection still works"
    );
    assert!(
        sees(&fresh, "doc", "alice").await,
        "the new connection sees the same daemon"
    );
}

#[tokio::test]
async fn sigterm_after_a_rebind_removes_the_new_socket() {
    let mut daemon = Daemon::start().await;
    std::fs::remove_file(&daemon.socket).expect("delete the socket");
    let (client, _events) = connect_when_ready(&daemon.socket).await;
    drop(client);

    daemon.stop().await;
    assert!(
        std::fs::symlink_metadata(&daemon.socket).is_err(),
        "the socket bound last should be removed"
    );
}

#[tokio::test]
async fn a_deleted_socket_folder_is_made_again_with_its_lock() {
    let daemon = Daemon::start().await;
    let (old, _old_events) = daemon.client().await;
    old.track(TrackRequest::new("doc", "alice"))
        .await
        .expect("track");

    std::fs::remove_dir_all(folder(&daemon.socket)).expect("delete the socket folder");
    let (fresh, _fresh_events) = connect_when_ready(&daemon.socket).await;

    assert_eq!(mode(folder(&daemon.socket)), 0o700);
    assert_eq!(mode(&daemon.socket), 0o600);
    assert!(sees(&old, "doc", "alice").await);
    assert!(sees(&fresh, "doc", "alice").await);
    // The lock is back before the socket, so a second daemon still stops
    // at it, naming this one.
    let stderr = refused_start(&daemon.socket, &daemon.dir.path().join("other.db")).await;
    assert!(stderr.contains("already serving"), "{stderr}");
    assert!(stderr.contains(&daemon.pid().to_string()), "{stderr}");
}

#[tokio::test]
async fn a_deleted_lock_is_taken_again() {
    let daemon = Daemon::start().await;
    let lock = lock_file(&daemon.socket);
    std::fs::remove_file(&lock).expect("delete the lock");

    let pid = daemon.pid().to_string();
    eventually("the daemon to lock again", async || {
        std::fs::read_to_string(&lock).is_ok_and(|holder| holder.trim() == pid)
    })
    .await;
    let stderr = refused_start(&daemon.socket, &daemon.dir.path().join("other.db")).await;
    assert!(stderr.contains("already serving"), "{stderr}");
    let (client, _events) = daemon.client().await;
    client.ping().await.expect("the daemon still serves");
}

#[tokio::test]
async fn a_file_put_in_the_sockets_place_is_left_alone() {
    let mut daemon = Daemon::start_logged(&[]).await;
    let (old, _old_events) = daemon.client().await;
    old.track(TrackRequest::new("doc", "alice"))
        .await
        .expect("track");

    put_in_place(&daemon.socket, |path| {
        std::fs::write(path, "precious").expect("write the file");
    });
    daemon.wait_for_log(&["not a socket"]).await;

    assert_eq!(
        std::fs::read_to_string(&daemon.socket).expect("read"),
        "precious"
    );
    assert!(
        sees(&old, "doc", "alice").await,
        "the old connection still works"
    );
    daemon.stop().await;
    assert_eq!(
        std::fs::read_to_string(&daemon.socket).expect("read"),
        "precious",
        "an exiting daemon leaves the file alone too"
    );
}

#[tokio::test]
async fn once_the_file_in_its_place_is_gone_the_socket_comes_back() {
    let daemon = Daemon::start_logged(&[]).await;
    put_in_place(&daemon.socket, |path| {
        std::fs::write(path, "notes").expect("write the file");
    });
    daemon.wait_for_log(&["not a socket"]).await;

    std::fs::remove_file(&daemon.socket).expect("remove the file");
    let (client, _events) = connect_when_ready(&daemon.socket).await;
    client.ping().await.expect("ping");
}

#[tokio::test]
async fn a_live_socket_put_in_our_place_is_left_alone() {
    let mut daemon = Daemon::start_logged(&[]).await;
    let (old, _old_events) = daemon.client().await;
    old.track(TrackRequest::new("doc", "alice"))
        .await
        .expect("track");

    let mut other = None;
    put_in_place(&daemon.socket, |path| {
        other = Some(std::os::unix::net::UnixListener::bind(path).expect("bind"));
    });
    let other = other.expect("the other listener");
    let theirs = std::fs::symlink_metadata(&daemon.socket)
        .expect("metadata")
        .ino();
    daemon.wait_for_log(&["something else now listens"]).await;

    assert!(sees(&old, "doc", "alice").await);
    daemon.stop().await;
    let now = std::fs::symlink_metadata(&daemon.socket).expect("the other socket stays");
    assert_eq!(now.ino(), theirs);
    std::os::unix::net::UnixStream::connect(&daemon.socket).expect("it still answers");
    drop(other);
}

#[tokio::test]
async fn a_lock_another_process_holds_keeps_the_daemon_off_the_path() {
    let daemon = Daemon::start_logged(&[]).await;
    // Another process's lock in our lock's place, and the socket gone:
    // what a second daemon leaves behind when it wins the path after a
    // cleaner deleted both.
    let lock = lock_file(&daemon.socket);
    let mut theirs = None;
    put_in_place(&lock, |path| {
        let file = std::fs::File::create(path).expect("create the lock");
        file.try_lock().expect("lock it");
        theirs = Some(file);
    });
    std::fs::remove_file(&daemon.socket).expect("delete the socket");
    daemon.wait_for_log(&["now holds"]).await;
    assert!(
        std::fs::symlink_metadata(&daemon.socket).is_err(),
        "the daemon must not bind where another holds the lock"
    );

    // Once that lock is free, the path is the daemon's again.
    drop(theirs);
    let (client, _events) = connect_when_ready(&daemon.socket).await;
    client.ping().await.expect("ping");
}

/// A file of the user's that a link planted at the lock path names: the
/// daemon must never write its pid into it.
fn precious_file(dir: &Path) -> PathBuf {
    let victim = dir.join("precious.txt");
    std::fs::write(&victim, "precious\n").expect("write the file");
    victim
}

/// A private socket folder for a daemon the test starts itself; returns
/// the socket's path in it.
fn socket_in_private_folder(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    std::fs::create_dir(&run).expect("create the folder");
    std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    run.join("presenced.sock")
}

/// Plants `plant` at the lock of a daemon about to start, and checks that
/// the start is refused in one line naming the lock and saying `what` is
/// there, and that the file the plant names is untouched.
async fn refused_with_a_planted_lock(plant: fn(&Path, &Path), what: &str) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = socket_in_private_folder(dir.path());
    let victim = precious_file(dir.path());
    plant(&victim, &lock_file(&socket));

    let stderr = refused_start(&socket, &dir.path().join("state/presence.db")).await;

    assert!(
        stderr.contains(&lock_file(&socket).display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains(what), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("read"),
        "precious\n"
    );
    assert!(
        std::fs::symlink_metadata(&socket).is_err(),
        "no socket is made"
    );
}

#[tokio::test]
async fn a_symlink_at_the_lock_stops_the_start_and_what_it_names_is_untouched() {
    refused_with_a_planted_lock(
        |victim, lock| std::os::unix::fs::symlink(victim, lock).expect("plant the link"),
        "symbolic link",
    )
    .await;
}

#[tokio::test]
async fn a_hard_link_at_the_lock_stops_the_start_and_its_other_name_is_untouched() {
    refused_with_a_planted_lock(
        |victim, lock| std::fs::hard_link(victim, lock).expect("plant the link"),
        "with 2 names",
    )
    .await;
}

#[tokio::test]
async fn a_symlink_put_in_the_locks_place_is_never_followed() {
    let daemon = Daemon::start_logged(&[]).await;
    let (old, _old_events) = daemon.client().await;
    old.track(TrackRequest::new("doc", "alice"))
        .await
        .expect("track");
    let victim = precious_file(daemon.dir.path());
    let lock = lock_file(&daemon.socket);

    put_in_place(&lock, |path| {
        std::os::unix::fs::symlink(&victim, path).expect("plant the link");
    });
    daemon
        .wait_for_log(&["symbolic link", &lock.display().to_string()])
        .await;

    assert_eq!(
        std::fs::read_to_string(&victim).expect("read"),
        "precious\n",
        "the pid is never written through the link"
    );
    assert!(
        sees(&old, "doc", "alice").await,
        "the old connection still works"
    );

    // Once the link is gone, the path is locked again by the daemon that
    // was serving it: it never took the link for another daemon's lock.
    std::fs::remove_file(&lock).expect("remove the link");
    let pid = daemon.pid().to_string();
    eventually("the daemon to lock again", async || {
        std::fs::read_to_string(&lock).is_ok_and(|holder| holder.trim() == pid)
    })
    .await;
    assert_eq!(mode(&lock), 0o600);
    let stderr = refused_start(&daemon.socket, &daemon.dir.path().join("other.db")).await;
    assert!(stderr.contains("already serving"), "{stderr}");
    assert!(stderr.contains(&pid), "{stderr}");
}
