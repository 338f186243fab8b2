//! The client library as another program uses it: `examples/watch_role.rs`,
//! built by cargo, run against a real daemon. It prints its role as it
//! changes, and starts the daemon it is told to, never itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;

use crate::common::{self, Daemon, KillDaemonsOnDrop, Running, presence_bin, within};
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::process::Command;

/// The example's executable, built by the cargo that runs these tests.
///
/// A plain `cargo test` has built it already, and this finds it fresh; a
/// run of chosen test targets has not, and this builds it. Asking cargo,
/// rather than guessing a path under `target/`, finds it in whatever
/// target folder and profile the tests were built with.
fn watch_role() -> &'static Path {
    static EXECUTABLE: OnceLock<PathBuf> = OnceLock::new();
    EXECUTABLE.get_or_init(|| {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo
            .args(["build", "--example", "watch_role"])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            // Artifacts as JSON on stdout, compiler messages as text on stderr.
            .arg("--message-format=json-render-diagnostics")
            .stderr(Stdio::inherit());
        if !cfg!(debug_assertions) {
            cargo.arg("--release");
        }
        let built = cargo.output().expect("cargo runs");
        assert!(built.status.success(), "cargo could not build the example");
        serde_json::Deserializer::from_slice(&built.stdout)
            .into_iter::<Value>()
            .filter_map(Result::ok)
            .find(|message| {
                message["reason"] == "compiler-artifact"
                    && message["target"]["name"] == "watch_role"
                    && message["target"]["kind"][0] == "example"
            })
            .and_then(|artifact| artifact["executable"].as_str().map(PathBuf::from))
            .expect("cargo names the example's executable")
    })
}

/// `watch_role TOPIC KEY` for the daemon at `socket`, which it starts with
/// `daemon` (and `db`) if none listens there.
fn watch_role_command(socket: &Path, db: &Path, daemon: &str) -> Command {
    let mut command = Command::new(watch_role());
    command
        .env("PRESENCE_SOCKET", socket)
        .env("PRESENCE_DB", db)
        .env("PRESENCE_DAEMON", daemon)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The keys on `topic`, as the daemon lists them.
async fn keys(daemon: &Daemon, topic: &str) -> Vec<String> {
    let (client, _events) = daemon.client().await;
    let listed = within("list", client.list(topic)).await.expect("list");
    listed.state.presences.into_keys().collect()
}

#[tokio::test]
async fn the_example_prints_each_change_of_its_role_until_interrupted() {
    let daemon = Daemon::start().await;
    let mut alice = daemon.spawn(&["join", "doc", "--key", "alice"]);
    alice.line().await;
    let mut carol = daemon.spawn(&["join", "doc", "--key", "carol"]);
    carol.line().await;

    let mut bob = Running::spawn(
        watch_role_command(&daemon.socket, &daemon.db, presence_bin()).args(["doc", "bob"]),
    );
    assert_eq!(
        bob.line().await,
        format!("spectator #2, owner alice (pid {})", alice.pid())
    );

    // The owner is killed: carol is promoted, and bob is told who owns it.
    alice.sigkill();
    assert_eq!(
        bob.line().await,
        format!("spectator #1, owner carol (pid {})", carol.pid())
    );

    // The new owner leaves on its own: bob is promoted.
    carol.sigterm();
    assert_eq!(bob.line().await, "owner");

    // Interrupted, the example ends cleanly, and its entry leaves with it.
    common::signal(bob.pid(), Signal::SIGINT);
    assert_eq!(bob.exit_code().await, Some(0));
    common::eventually("bob's entry to leave", async || {
        keys(&daemon, "doc").await.is_empty()
    })
    .await;
}

/// The example, run as bob on `doc` where no daemon runs, with the
/// `presence` under test as its daemon program: it has started one and
/// owns the topic.
struct BobAlone {
    socket: PathBuf,
    db: PathBuf,
    _bob: Running,
    _cleanup: KillDaemonsOnDrop,
    _dir: tempfile::TempDir,
}

async fn bob_alone_with_no_daemon_running() -> BobAlone {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");
    let cleanup = KillDaemonsOnDrop(socket.clone());
    let mut bob =
        Running::spawn(watch_role_command(&socket, &db, presence_bin()).args(["doc", "bob"]));
    assert_eq!(bob.line().await, "owner");
    BobAlone {
        socket,
        db,
        _bob: bob,
        _cleanup: cleanup,
        _dir: dir,
    }
}

#[tokio::test]
async fn the_example_starts_the_daemon_it_names_when_none_runs() {
    let BobAlone { socket, db, .. } = &bob_alone_with_no_daemon_running().await;
    let (socket, db) = (socket.as_path(), db.as_path());

    // What it started is a presence daemon, on demand, with its database.
    let (client, _events) = common::connect(socket).await;
    let status = within("status", client.status()).await.expect("status");
    assert_eq!(status.started_by.as_deref(), Some("autostart"));
    assert_eq!(Path::new(&status.db), db);
    let listed = within("list", client.list("doc")).await.expect("list");
    assert_eq!(
        listed.state.owner.map(|owner| owner.key).as_deref(),
        Some("bob")
    );
}

#[tokio::test]
async fn after_a_crash_the_example_starts_its_daemon_again_and_keeps_its_place() {
    let BobAlone { socket, .. } = &bob_alone_with_no_daemon_running().await;
    let socket = socket.as_path();
    let (client, _events) = common::connect(socket).await;
    let crashed = within("status", client.status()).await.expect("status").pid;
    drop(client);
    common::signal(crashed, Signal::SIGKILL);

    // The example's session starts a daemon as the example did, and takes
    // its entry back there.
    common::eventually("a new daemon with bob's entry back", async || {
        let Ok((client, _events)) = presenced::client::Client::connect(socket).await else {
            return false;
        };
        let (Ok(status), Ok(listed)) = (client.status().await, client.list("doc").await) else {
            return false;
        };
        status.pid != crashed
            && status.started_by.as_deref() == Some("autostart")
            && listed.state.owner.is_some_and(|owner| owner.key == "bob")
    })
    .await;
}

#[tokio::test]
async fn the_example_names_a_daemon_program_it_cannot_find() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let socket = dir.path().join("run/presenced.sock");
    let db = dir.path().join("state/presence.db");

    let output = within(
        "the example to give up",
        watch_role_command(&socket, &db, "presence-not-installed")
            .args(["doc", "bob"])
            .output(),
    )
    .await
    .expect("the example runs");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "watch_role: could not start the daemon: no `presence-not-installed` on PATH to run \
         as the daemon\n"
    );
}
