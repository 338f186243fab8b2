//! Identity comes from the socket's peer credentials, and nobody can take
//! over or remove another user's (or another connection's) entries.
//!
//! These tests need root, to run the daemon and clients as the unprivileged
//! uid 65534 with `setpriv`: they are ignored unless asked for
//! (`--ignored`, as `.ci/run` does as root), and asked for without root
//! they fail saying so.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;

use crate::common::{
    self, NOBODY, RawConnection, Running, as_nobody, binary_for_nobody, connect, error_code,
    eventually, start_daemon, within,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// A daemon running as uid 65534, from a copy of the binary that uid can
/// execute wherever the checkout lives.
struct UnprivilegedDaemon {
    _dir: tempfile::TempDir,
    binary: PathBuf,
    socket: PathBuf,
    _daemon: tokio::process::Child,
}

impl UnprivilegedDaemon {
    async fn start() -> UnprivilegedDaemon {
        UnprivilegedDaemon::start_with(&[]).await
    }

    /// With extra `presence daemon` arguments.
    async fn start_with(extra: &[&str]) -> UnprivilegedDaemon {
        let dir = tempfile::tempdir().expect("temporary folder");
        // Its folder inside one of root's that only root may write, as a
        // shared daemon's would be, so that root's clients trust it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let home = dir.path().join("nobody");
        std::fs::create_dir(&home).expect("create the folder");
        let binary = binary_for_nobody(&home);
        let socket = home.join("run/presenced.sock");
        let db = home.join("state/presence.db");
        let daemon = start_daemon(as_nobody(&binary), &socket, &db, extra).await;
        UnprivilegedDaemon {
            _dir: dir,
            binary,
            socket,
            _daemon: daemon,
        }
    }

    /// `presence ARGS` run as uid 65534 against this daemon.
    fn presence_as_nobody(&self, args: &[&str]) -> Command {
        let mut command = as_nobody(&self.binary);
        command
            .arg("--socket")
            .arg(&self.socket)
            .arg("--no-autostart")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Sends request lines as uid 65534 on one connection and returns every
    /// reply, in order.
    async fn raw_as_nobody(&self, requests: &[Value]) -> Vec<Value> {
        let mut child = self
            .presence_as_nobody(&["raw"])
            .spawn()
            .expect("presence raw spawns");
        let mut stdin = child.stdin.take().expect("stdin");
        for request in requests {
            stdin
                .write_all(format!("{request}\n").as_bytes())
                .await
                .expect("write a request");
        }
        drop(stdin);
        let output = within("presence raw", child.wait_with_output())
            .await
            .expect("output");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("JSON"))
            .filter(|line: &Value| line.get("ok").is_some())
            .collect()
    }
}

#[tokio::test]
#[ignore = "needs root"]
async fn naming_another_users_process_is_permission_denied() {
    common::needs_root();
    let daemon = UnprivilegedDaemon::start().await;
    // pid 1 belongs to root.
    let replies = daemon
        .raw_as_nobody(&[json!({"op": "track", "id": 1, "topic": "t", "key": "k", "pid": 1})])
        .await;
    assert_eq!(replies.len(), 1);
    assert_eq!(error_code(&replies[0]), "permission_denied");
}

#[tokio::test]
#[ignore = "needs root"]
async fn entries_cannot_be_removed_or_changed_from_another_connection_or_user() {
    common::needs_root();
    let daemon = UnprivilegedDaemon::start().await;

    // An entry of uid 65534, held by its own connection.
    let mut holder =
        Running::spawn(&mut daemon.presence_as_nobody(&["join", "doc", "--key", "n", "--json"]));
    let held = holder.json().await;
    assert_eq!(held["ok"], true);
    let held_ref = held["ref"].as_str().expect("ref").to_owned();

    // An entry of root, on a root connection.
    let (root, _root_events) = connect(&daemon.socket).await;
    let root_entry = root
        .track(presenced::protocol::TrackRequest::new("doc", "root"))
        .await
        .expect("root tracks");
    assert_eq!(root_entry.standing.position, 1);

    let replies = daemon
        .raw_as_nobody(&[
            // Same uid, other connection, connection lifetime: refused.
            json!({"op": "untrack", "id": 1, "topic": "doc", "ref": held_ref}),
            json!({"op": "update", "id": 2, "topic": "doc", "ref": held_ref, "meta": {"x": 1}}),
            // Another uid altogether: refused.
            json!({"op": "untrack", "id": 3, "topic": "doc", "ref": root_entry.phx_ref}),
            json!({"op": "update", "id": 4, "topic": "doc", "ref": root_entry.phx_ref, "meta": {}}),
            // By key, only what the caller may remove goes: here nothing.
            json!({"op": "untrack", "id": 5, "topic": "doc", "key": "root"}),
            json!({"op": "untrack", "id": 6, "topic": "doc", "key": "n"}),
        ])
        .await;
    let codes: Vec<&str> = replies[..4].iter().map(error_code).collect();
    assert_eq!(codes, ["permission_denied"; 4]);
    assert_eq!(replies[4]["removed"], 0);
    assert_eq!(replies[5]["removed"], 0);

    let listed = root.list("doc").await.expect("list");
    assert_eq!(listed.state.presences.len(), 2, "both entries survive");
    // The entry's identity is the peer's, whatever the client claimed.
    let held_meta = &listed.state.presences["n"].metas[0];
    assert_eq!(held_meta.uid, NOBODY);
    assert_eq!(held_meta.pid, holder.pid());
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_process_entry_may_be_removed_by_its_own_uid_from_another_connection() {
    common::needs_root();
    let daemon = UnprivilegedDaemon::start().await;
    // A long-lived process of uid 65534 to own the entry.
    let mut owner =
        Running::spawn(&mut daemon.presence_as_nobody(&["join", "other", "--key", "anchor"]));
    assert_eq!(owner.line().await, "owner");
    let owner_pid = owner.pid();

    let tracked = daemon
        .raw_as_nobody(&[json!({
            "op": "track", "id": 1, "topic": "doc", "key": "script",
            "pid": owner_pid, "lifetime": "process"
        })])
        .await;
    let process_ref = tracked[0]["ref"].as_str().expect("ref").to_owned();

    // That connection has closed; the process entry lives on.
    let (root, _events) = connect(&daemon.socket).await;
    assert_eq!(
        root.list("doc").await.expect("list").state.presences.len(),
        1
    );

    let replies = daemon
        .raw_as_nobody(&[json!({"op": "untrack", "id": 1, "topic": "doc", "ref": process_ref})])
        .await;
    assert_eq!(replies[0]["ok"], true, "{}", replies[0]);
    assert_eq!(replies[0]["removed"], 1);
    assert!(
        root.list("doc")
            .await
            .expect("list")
            .state
            .presences
            .is_empty()
    );
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_resume_token_never_hands_over_another_users_entry() {
    common::needs_root();
    use presenced::protocol::{Lifetime, TrackRequest};
    let daemon = UnprivilegedDaemon::start().await;
    let sleeper = common::spawn_sleeper();
    let (root, _events) = connect(&daemon.socket).await;
    let mut request = TrackRequest::new("doc", "root's");
    request.pid = sleeper.id();
    request.lifetime = Lifetime::Process;
    let tracked = root.track(request).await.expect("track");
    // With its connection closed, the entry waits for its uid to resume it.
    drop(root);
    let (watcher, _events) = connect(&daemon.socket).await;
    eventually("the first connection to close", async || {
        watcher.status().await.expect("status").connections <= 1
    })
    .await;

    let replies = daemon
        .raw_as_nobody(&[json!({"op": "resume", "id": 1, "tokens": [tracked.resume_token]})])
        .await;
    assert_eq!(replies[0]["ok"], true, "{}", replies[0]);
    assert_eq!(replies[0]["resumed"], json!([]));
    assert_eq!(replies[0]["expired"], json!([tracked.resume_token]));

    // The token was not spent: its own uid can still take the entry.
    let (root, _events) = connect(&daemon.socket).await;
    let resumed = root
        .resume(vec![tracked.resume_token.clone()])
        .await
        .expect("resume");
    assert_eq!(resumed.resumed, [tracked.phx_ref]);
}

/// Another user's folder could have the socket swapped under the daemon,
/// or be read by that user, whatever its mode.
#[tokio::test]
#[ignore = "needs root"]
async fn a_socket_folder_owned_by_another_user_is_refused() {
    common::needs_root();
    let dir = tempfile::tempdir().expect("temporary folder");
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).expect("mkdir");
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).expect("chown");
    let stderr =
        common::refused_start(&theirs.join("presenced.sock"), &dir.path().join("p.db")).await;
    assert!(
        stderr.contains(&format!("is owned by uid {NOBODY}, not by this user")),
        "{stderr}"
    );
}

/// On a daemon others share, one user holding every connection would lock
/// the rest out; each user other than the daemon's own has a cap.
#[tokio::test]
#[ignore = "needs root"]
async fn one_user_cannot_take_every_connection() {
    common::needs_root();
    let daemon = UnprivilegedDaemon::start_with(&["--max-connections-per-uid", "2"]).await;
    // To this daemon (uid 65534), root is another user.
    let mut held = Vec::new();
    for id in 0..2 {
        let mut raw = RawConnection::connect(&daemon.socket).await;
        let reply = raw.request(&format!(r#"{{"op":"ping","id":{id}}}"#)).await;
        assert_eq!(reply["ok"], true, "{reply}");
        held.push(raw);
    }
    let mut third = RawConnection::connect(&daemon.socket).await;
    let refusal = third.next().await.expect("a refusal line");
    assert_eq!(error_code(&refusal), "limit_exceeded", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("uid 0 already holds 2 connections"),
        "{message}"
    );
    assert_eq!(third.next().await, None, "then the connection closes");

    // The daemon's own user is not held to it.
    let mut watchers = Vec::new();
    for _ in 0..3 {
        let mut watcher = Running::spawn(&mut daemon.presence_as_nobody(&["watch", "t", "--json"]));
        let state = watcher.json().await;
        assert_eq!(state["event"], "presence_state", "{state}");
        watchers.push(watcher);
    }

    // A closed connection gives its slot back.
    drop(held.pop());
    within("root's slot to come back", async {
        loop {
            let mut raw = RawConnection::connect(&daemon.socket).await;
            if raw.request(r#"{"op":"ping","id":9}"#).await["ok"] == true {
                return;
            }
        }
    })
    .await;
}
