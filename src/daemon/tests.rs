//! A daemon in this process, through [`start`] and [`Daemon::stop`]: what
//! the tests under `tests/` do with the binary, without a process of its
//! own.

use super::*;
use crate::client::Client;
use crate::core::MAX_BATCH;
use crate::protocol::{Role, TrackRequest};

fn config(dir: &std::path::Path) -> DaemonConfig {
    DaemonConfig {
        socket: dir.join("run/presenced.sock"),
        group: None,
        db: dir.join("state/presence.db"),
        limits: Limits::default(),
        resume_grace: Duration::from_secs(60),
        history: Retention::default(),
        ready_on_stdout: false,
        max_batch: MAX_BATCH,
        autostarted: false,
        cluster: None,
    }
}

#[tokio::test]
async fn a_daemon_started_in_process_serves_and_stops_with_its_rows_kept() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let config = config(dir.path());
    let daemon = start(config.clone()).await.expect("the daemon starts");
    assert_eq!(daemon.socket(), config.socket);

    let (client, _events) = Client::connect(daemon.socket())
        .await
        .expect("the daemon serves once started");
    let joined = client
        .track(TrackRequest::new("doc", "alice"))
        .await
        .expect("track");
    assert_eq!(joined.standing.role, Role::Owner);
    let status = client.status().await.expect("status");
    assert_eq!(
        (status.entries, status.started_by.as_deref()),
        (1, Some("foreground"))
    );

    daemon.stop("the test is done").await.expect("a clean stop");
    assert!(!config.socket.exists(), "the socket goes with the daemon");
    // The entry waits in the database for its client to resume it.
    let boot_id = crate::sys::boot_id().expect("a boot id");
    let store = Store::open(&config.db, boot_id).expect("the database opens again");
    let (rows, _next_seq) = store.load().expect("the rows load");
    assert_eq!(rows.len(), 1, "{rows:?}");
}

#[tokio::test]
async fn a_second_daemon_on_the_same_socket_names_the_first_and_starts_nothing() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let first = start(config(dir.path())).await.expect("the first starts");
    let Err(refused) = start(config(dir.path())).await else {
        panic!("a second daemon started on the same socket");
    };
    let message = format!("{refused:#}");
    let pid = std::process::id();
    assert!(
        message.contains(&format!("another daemon (pid {pid}) is already serving")),
        "{message}"
    );
    // The first is untouched by the attempt.
    let (client, _events) = Client::connect(first.socket()).await.expect("still served");
    client.status().await.expect("status");
    first.stop("the test is done").await.expect("a clean stop");
}
