//! An entry removed by another connection (root, or the same user for a
//! `process` entry): its holder is told who removed it, `presence join`
//! says so and exits 4, and a session forgets the entry instead of taking
//! it back. Otherwise the removed holder goes on believing it owns the
//! topic while the next in line is promoted: two owners of one file.
//!
//! The same holds after another connection updated the entry first, which
//! gives it a new ref: the holder is told the new ref (an `updated`
//! event), so that it knows the removal that names it for its own.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::common::shared::SharedDaemon;
use crate::common::{self, Daemon, NOBODY, Running, eventually, spawn_sleeper, within};
use presenced::client::{Reconnect, Session, SessionEvent, SessionEvents};
use presenced::protocol::{Event, Lifetime, Removal, Revision, TrackRequest};
use serde_json::json;
use tokio::net::{UnixListener, UnixStream};

/// The keys present on a topic.
async fn keys(daemon: &Daemon, topic: &str) -> Vec<String> {
    let (client, _events) = daemon.client().await;
    let listed = within("list", client.list(topic)).await.expect("list");
    listed.state.presences.keys().cloned().collect()
}

fn me() -> (u32, String) {
    let uid = nix::unistd::geteuid().as_raw();
    (uid, presenced::sys::user_name(uid))
}

#[tokio::test]
async fn the_holding_connection_is_told_who_removed_its_entry() {
    let daemon = Daemon::start().await;
    let mut holder = daemon.raw().await;
    let tracked = holder
        .request(r#"{"op":"track","id":1,"topic":"doc","key":"editor","lifetime":"process"}"#)
        .await;
    let phx_ref = tracked["ref"].as_str().expect("ref").to_owned();

    // The same user, from another connection, may remove a process entry.
    let mut remover = daemon.raw().await;
    let untrack = json!({"op": "untrack", "id": 2, "topic": "doc", "ref": phx_ref});
    let reply = remover.request(&untrack.to_string()).await;
    assert_eq!(reply["removed"], 1, "{reply}");

    let (uid, user) = me();
    let told = holder.next().await.expect("a line for the holder");
    assert_eq!(
        told,
        json!({
            "event": "removed",
            "topic": "doc",
            "payload": {
                "ref": phx_ref,
                "key": "editor",
                "reason": "untrack",
                "by": {"uid": uid, "user": user, "pid": std::process::id()},
            },
        })
    );
    // The remover hears nothing but its reply; nor does a holder that
    // removes its own entry.
    let reply = remover.request(r#"{"op":"ping","id":3}"#).await;
    assert_eq!(reply, json!({"id": 3, "ok": true}));
    let tracked = holder
        .request(r#"{"op":"track","id":4,"topic":"doc","key":"again"}"#)
        .await;
    let untrack = json!({"op": "untrack", "id": 5, "topic": "doc", "ref": tracked["ref"]});
    assert_eq!(holder.request(&untrack.to_string()).await["removed"], 1);
    let reply = holder.request(r#"{"op":"ping","id":6}"#).await;
    assert_eq!(reply, json!({"id": 6, "ok": true}));
}

#[tokio::test]
async fn a_waiting_join_whose_entry_is_removed_says_who_did_it_and_exits_4() {
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

    // Someone of the same user clears the queue from another shell.
    let mut leave = daemon.spawn(&["leave", "lock", "--all", "--key", "b"]);
    let leave_pid = leave.pid();
    assert_eq!(leave.line().await, "left lock (1 entry)");
    assert_eq!(leave.exit_code().await, Some(0));

    let (uid, user) = me();
    assert_eq!(
        waiter.line().await,
        format!("removed by {user} (uid {uid}, pid {leave_pid})")
    );
    assert_eq!(waiter.exit_code().await, Some(4));
    assert_eq!(keys(&daemon, "lock").await, ["a"]);
}

#[tokio::test]
async fn join_json_prints_the_removed_event_and_exits_4() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    // The first is the owner at once, and leaves its entry in place.
    let owner = daemon
        .output(&["join", "lock", "--detach", "--pid", &pid, "--key", "w"])
        .await;
    assert_eq!(owner.status.code(), Some(0));
    let mut second = daemon.spawn(&[
        "join",
        "lock",
        "--detach",
        "--wait-owner",
        "--json",
        "--pid",
        &pid,
        "--key",
        "x",
    ]);
    let tracked = second.json().await;
    assert_eq!(tracked["role"], "spectator");
    let mut leave = daemon.spawn(&["leave", "lock", "--ref", tracked["ref"].as_str().unwrap()]);
    let leave_pid = leave.pid();
    assert_eq!(leave.exit_code().await, Some(0));
    let told = second.json().await;
    assert_eq!(told["event"], "removed", "{told}");
    assert_eq!(told["payload"]["ref"], tracked["ref"]);
    assert_eq!(told["payload"]["by"]["pid"], leave_pid);
    assert_eq!(second.exit_code().await, Some(4));
}

/// The next session event, skipping reconnection notices until `pick`
/// takes one; a `Retracked` or `Dropped` event fails the test, since the
/// session must not try to get back what was removed.
async fn next_session_event<T>(
    events: &mut SessionEvents,
    mut pick: impl FnMut(&SessionEvent) -> Option<T>,
) -> T {
    within("a session event", async {
        loop {
            let event = events.recv().await.expect("the session goes on");
            if let Some(found) = pick(&event) {
                return found;
            }
            assert!(
                !matches!(
                    event,
                    SessionEvent::Retracked { .. } | SessionEvent::Dropped { .. }
                ),
                "the session tried to get a removed entry back: {event:?}"
            );
        }
    })
    .await
}

#[tokio::test]
async fn a_session_forgets_a_removed_entry_and_does_not_join_it_again_after_a_restart() {
    let mut daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let connected = daemon.client().await;
    let (session, mut events) = Session::new(&daemon.socket, connected, Reconnect::default());
    let mut request = TrackRequest::new("doc", "held");
    request.lifetime = Lifetime::Process;
    request.pid = sleeper.id();
    let held = within("track", session.track(request))
        .await
        .expect("track");

    let mut remover = daemon.raw().await;
    let untrack = json!({"op": "untrack", "id": 1, "topic": "doc", "ref": held.phx_ref});
    assert_eq!(remover.request(&untrack.to_string()).await["removed"], 1);

    // The session passes the news on.
    let removal: Removal = next_session_event(&mut events, |event| match event {
        SessionEvent::Event(Event::Removed { payload, .. }) => Some(payload.clone()),
        _ => None,
    })
    .await;
    assert_eq!(removal.phx_ref, held.phx_ref);
    assert_eq!(removal.by.pid, std::process::id());
    drop(remover);

    // A restart: the session reconnects, and has nothing to take back.
    daemon.crash().await;
    daemon.start_again(&[]).await;
    next_session_event(&mut events, |event| {
        matches!(event, SessionEvent::Reconnected).then_some(())
    })
    .await;
    assert!(keys(&daemon, "doc").await.is_empty());
    // Anything the session did on reconnecting came before `Reconnected`.
    let status = within("status", session.client().await.expect("client").status())
        .await
        .expect("status");
    assert_eq!(status.entries, 0);
}

/// The ref of the one entry on `topic`.
async fn only_ref(daemon: &Daemon, topic: &str) -> String {
    let (client, _events) = daemon.client().await;
    let listed = within("list", client.list(topic)).await.expect("list");
    let metas: Vec<_> = listed
        .state
        .presences
        .values()
        .flat_map(|presence| presence.metas.iter())
        .collect();
    assert_eq!(metas.len(), 1, "{listed:?}");
    metas[0].phx_ref.clone()
}

/// Runs `presence update TOPIC --ref REF --meta META` and returns the
/// entry's new ref, from `updated TOPIC, ref NEW (was REF)`.
async fn update_elsewhere(daemon: &Daemon, topic: &str, phx_ref: &str, meta: &str) -> String {
    let mut update = daemon.spawn(&["update", topic, "--ref", phx_ref, "--meta", meta]);
    let said = update.line().await;
    assert_eq!(update.exit_code().await, Some(0), "{said}");
    let new_ref = said
        .strip_prefix(&format!("updated {topic}, ref "))
        .and_then(|rest| rest.strip_suffix(&format!(" (was {phx_ref})")))
        .unwrap_or_else(|| panic!("unexpected: {said}"));
    new_ref.to_owned()
}

#[tokio::test]
async fn a_join_is_told_of_an_update_from_elsewhere_and_of_the_removal_that_follows() {
    let daemon = Daemon::start().await;
    let (uid, user) = me();
    // The editor holds the topic for as long as it runs.
    let mut editor = daemon.spawn(&["join", "doc2", "--key", "editor"]);
    assert_eq!(editor.line().await, "owner");
    let first_ref = only_ref(&daemon, "doc2").await;

    // From another connection (root may change any entry), the entry is
    // updated, which gives it a new ref, then removed by that ref.
    let mut update = daemon.spawn(&[
        "update",
        "doc2",
        "--ref",
        &first_ref,
        "--meta",
        r#"{"file":"b.md"}"#,
    ]);
    let update_pid = update.pid();
    let said = update.line().await;
    assert_eq!(update.exit_code().await, Some(0), "{said}");
    assert_eq!(
        editor.line().await,
        format!(r#"updated by {user} (uid {uid}, pid {update_pid}), meta {{"file":"b.md"}}"#)
    );
    let new_ref = only_ref(&daemon, "doc2").await;
    assert_ne!(new_ref, first_ref);
    let mut leave = daemon.spawn(&["leave", "doc2", "--ref", &new_ref]);
    let leave_pid = leave.pid();
    assert_eq!(leave.exit_code().await, Some(0));

    // The editor knows the removal is of its own entry, and stops.
    assert_eq!(
        editor.line().await,
        format!("removed by {user} (uid {uid}, pid {leave_pid})")
    );
    assert_eq!(editor.exit_code().await, Some(4));
    // Whoever joins next is the one owner.
    let next = daemon
        .output(&["join", "doc2", "--detach", "--key", "next"])
        .await;
    assert_eq!(next.status.code(), Some(0));
    assert_eq!(keys(&daemon, "doc2").await, ["next"]);
}

#[tokio::test]
async fn a_waiting_join_whose_process_entry_is_updated_then_removed_by_its_user_exits_4() {
    let daemon = Daemon::start().await;
    let sleeper = spawn_sleeper();
    let pid = sleeper.id().expect("sleeper pid").to_string();
    let mut waiter = daemon.detached_owner_and_waiter("lock", &pid, &pid).await;
    let waiting = waiter.line().await;
    let waiting_ref = waiting
        .rsplit_once(", ref ")
        .map(|(_, phx_ref)| phx_ref.to_owned())
        .unwrap_or_else(|| panic!("unexpected: {waiting}"));

    // The same user, from another shell: a process entry is its to change.
    let new_ref = update_elsewhere(&daemon, "lock", &waiting_ref, r#"{"step":2}"#).await;
    let (uid, user) = me();
    let told = waiter.line().await;
    assert!(
        told.starts_with(&format!("updated by {user} (uid {uid}, pid "))
            && told.ends_with(&format!(r#"), meta {{"step":2}}, ref {new_ref}"#)),
        "{told}"
    );
    let mut leave = daemon.spawn(&["leave", "lock", "--ref", &new_ref]);
    let leave_pid = leave.pid();
    assert_eq!(leave.exit_code().await, Some(0));
    assert_eq!(
        waiter.line().await,
        format!("removed by {user} (uid {uid}, pid {leave_pid})")
    );
    assert_eq!(waiter.exit_code().await, Some(4));
    assert_eq!(keys(&daemon, "lock").await, ["a"]);
}

#[tokio::test]
async fn a_session_follows_an_update_from_elsewhere_and_forgets_the_entry_when_it_is_removed() {
    for lifetime in [Lifetime::Connection, Lifetime::Process] {
        let mut daemon = Daemon::start().await;
        let sleeper = spawn_sleeper();
        let connected = daemon.client().await;
        let (session, mut events) = Session::new(&daemon.socket, connected, Reconnect::default());
        let mut request = TrackRequest::new("doc", "held");
        request.lifetime = lifetime;
        if lifetime == Lifetime::Process {
            request.pid = sleeper.id();
        }
        let held = within("track", session.track(request))
            .await
            .expect("track");

        // Another connection updates the entry, then removes it by its new
        // ref. (The test runs as root, which may change any entry; a
        // process entry its own user may change too.)
        let mut other = daemon.raw().await;
        let update = json!({"op": "update", "id": 1, "topic": "doc", "ref": held.phx_ref,
                            "meta": {"file": "b.md"}});
        let updated = other.request(&update.to_string()).await;
        let new_ref = updated["ref"].as_str().expect("a new ref").to_owned();
        let revision: Revision = next_session_event(&mut events, |event| match event {
            SessionEvent::Event(Event::Updated { payload, .. }) => Some(payload.clone()),
            _ => None,
        })
        .await;
        assert_eq!(
            (revision.prev_ref.as_str(), revision.phx_ref.as_str()),
            (held.phx_ref.as_str(), new_ref.as_str()),
            "{lifetime:?}"
        );
        assert_eq!(revision.meta["file"], "b.md");
        // After a restart the session has nothing to take back: it knew
        // the removed ref for its entry's.
        removed_elsewhere_stays_removed(&mut daemon, other, &session, &mut events, &new_ref).await;
    }
}

/// `other` removes the session's entry, now `phx_ref`, on topic `doc`, and
/// the session hears of it. After a crash and restart of the daemon the
/// session reconnects and has taken nothing back.
async fn removed_elsewhere_stays_removed(
    daemon: &mut Daemon,
    mut other: common::RawConnection,
    session: &Session,
    events: &mut SessionEvents,
    phx_ref: &str,
) {
    let untrack = json!({"op": "untrack", "id": 99, "topic": "doc", "ref": phx_ref});
    assert_eq!(other.request(&untrack.to_string()).await["removed"], 1);
    let removal: Removal = next_session_event(events, |event| match event {
        SessionEvent::Event(Event::Removed { payload, .. }) => Some(payload.clone()),
        _ => None,
    })
    .await;
    assert_eq!(removal.phx_ref, phx_ref);
    drop(other);

    daemon.crash().await;
    daemon.start_again(&[]).await;
    next_session_event(events, |event| {
        matches!(event, SessionEvent::Reconnected).then_some(())
    })
    .await;
    assert!(keys(daemon, "doc").await.is_empty());
    let status = within("status", session.client().await.expect("client").status())
        .await
        .expect("status");
    assert_eq!(status.entries, 0);
}

/// A second socket that forwards each connection to the daemon's, and can
/// cut them all at once and refuse new ones: the way to close a session's
/// connection while the daemon runs on, and keep the session away until
/// the test lets it back.
struct Relay {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    fn start(path: &Path, daemon_socket: &Path) -> Relay {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("the relay listens");
        let daemon_socket = daemon_socket.to_owned();
        let task = tokio::spawn(async move {
            // Dropped with this task, which ends every forwarded connection.
            let mut forwarded = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let daemon_socket = daemon_socket.clone();
                forwarded.spawn(async move {
                    if let Ok(mut daemon) = UnixStream::connect(&daemon_socket).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut daemon).await;
                    }
                });
            }
        });
        Relay {
            path: path.to_owned(),
            task,
        }
    }

    /// Closes every forwarded connection, and accepts no more.
    fn cut(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test]
async fn a_session_learns_the_ref_of_an_entry_updated_while_it_was_away_and_forgets_it_when_removed()
 {
    let mut daemon = Daemon::start().await;
    let relay_dir = daemon.dir.path().join("relay");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&relay_dir)
        .expect("relay folder");
    let relay_socket = relay_dir.join("presenced.sock");
    let relay = Relay::start(&relay_socket, &daemon.socket);
    let sleeper = spawn_sleeper();
    let connected = common::connect(&relay_socket).await;
    let (session, mut events) = Session::new(&relay_socket, connected, Reconnect::default());
    let mut request = TrackRequest::new("doc", "held");
    request.lifetime = Lifetime::Process;
    request.pid = sleeper.id();
    let held = within("track", session.track(request))
        .await
        .expect("track");

    // The session's connection closes; its process entry stays, held by
    // no connection, so no `updated` event can reach anyone when the same
    // user updates it from elsewhere, which gives it a new ref.
    relay.cut();
    next_session_event(&mut events, |event| {
        matches!(event, SessionEvent::Disconnected { .. }).then_some(())
    })
    .await;
    connections_down_to(&daemon, 0).await;
    let mut other = daemon.raw().await;
    let update = json!({"op": "update", "id": 2, "topic": "doc", "ref": held.phx_ref,
                        "meta": {"file": "b.md"}});
    let updated = other.request(&update.to_string()).await;
    let new_ref = updated["ref"].as_str().expect("a new ref").to_owned();
    assert_ne!(new_ref, held.phx_ref);

    // The session comes back and resumes the entry by its token; the
    // reply names it by its new ref, which the session must take for its
    // entry's.
    let _relay = Relay::start(&relay_socket, &daemon.socket);
    next_session_event(&mut events, |event| {
        matches!(event, SessionEvent::Reconnected).then_some(())
    })
    .await;
    // After a restart the daemon no longer remembers the removal, so the
    // token would only be `expired`: a session that had not known the
    // removal for its entry's would track the entry again here.
    removed_elsewhere_stays_removed(&mut daemon, other, &session, &mut events, &new_ref).await;
}

/// Waits until the daemon has only `count` connections, so that one the
/// test cut is closed on the daemon's side too.
async fn connections_down_to(daemon: &Daemon, count: usize) {
    let mut asking = daemon.raw().await;
    eventually("the cut connection to close", async || {
        let status = asking.request(r#"{"op":"status","id":1}"#).await;
        status["connections"] == count + 1
    })
    .await;
}

#[tokio::test]
async fn a_session_tracks_an_entry_again_with_the_meta_it_was_given_while_the_session_was_away() {
    let mut daemon = Daemon::start().await;
    let relay_dir = daemon.dir.path().join("relay");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&relay_dir)
        .expect("relay folder");
    let relay_socket = relay_dir.join("presenced.sock");
    let relay = Relay::start(&relay_socket, &daemon.socket);
    let connected = common::connect(&relay_socket).await;
    let (session, mut events) = Session::new(&relay_socket, connected, Reconnect::default());
    let mut request = TrackRequest::new("doc", "held");
    request.meta = json!({"file": "a.md"})
        .as_object()
        .cloned()
        .expect("object");
    let held = within("track", session.track(request))
        .await
        .expect("track");

    // The daemon restarts while the session is kept away; its entry waits
    // to be resumed, held by no connection, and is updated meanwhile.
    daemon.crash().await;
    relay.cut();
    daemon.start_again(&["--resume-grace", "600"]).await;
    let mut other = daemon.raw().await;
    let update = json!({"op": "update", "id": 1, "topic": "doc", "ref": held.phx_ref,
                        "meta": {"file": "b.md"}});
    assert_eq!(other.request(&update.to_string()).await["ok"], true);
    drop(other);
    let relay = Relay::start(&relay_socket, &daemon.socket);
    next_session_event(&mut events, |event| {
        matches!(event, SessionEvent::Reconnected).then_some(())
    })
    .await;

    // The session's connection closes, and its entry with it; when the
    // session is back, it tracks the entry again, with the meta it has now.
    relay.cut();
    connections_down_to(&daemon, 0).await;
    assert!(keys(&daemon, "doc").await.is_empty());
    let _relay = Relay::start(&relay_socket, &daemon.socket);
    let tracked = within("the entry to be tracked again", async {
        loop {
            match events.recv().await.expect("the session goes on") {
                SessionEvent::Retracked { reply, .. } => return reply,
                SessionEvent::Dropped { error, .. } => panic!("dropped: {error}"),
                _ => {}
            }
        }
    })
    .await;
    let (client, _events) = daemon.client().await;
    let metas = within("get_by_key", client.get_by_key("doc", "held"))
        .await
        .expect("get_by_key");
    assert_eq!(metas.len(), 1, "{metas:?}");
    assert_eq!(metas[0].phx_ref, tracked.phx_ref);
    assert_eq!(metas[0].client["file"], "b.md");
}

#[tokio::test]
async fn a_join_whose_entry_is_removed_while_the_daemon_restarts_hears_of_it_when_it_resumes() {
    let mut daemon = Daemon::start().await;
    let mut editor = daemon.spawn(&["join", "doc", "--key", "editor"]);
    assert_eq!(editor.line().await, "owner");

    // The editor is away (stopped) while the daemon restarts, so its
    // entry waits to be resumed, held by no connection, when it is removed.
    common::signal(editor.pid(), nix::sys::signal::Signal::SIGSTOP);
    daemon.crash().await;
    daemon.start_again(&[]).await;
    let mut leave = daemon.spawn(&["leave", "doc", "--all", "--key", "editor"]);
    let leave_pid = leave.pid();
    assert_eq!(leave.line().await, "left doc (1 entry)");
    assert_eq!(leave.exit_code().await, Some(0));

    // Back, the editor resumes its entry: the daemon says who removed it,
    // and the editor stops rather than join again.
    common::signal(editor.pid(), nix::sys::signal::Signal::SIGCONT);
    let (uid, user) = me();
    assert_eq!(
        editor.line().await,
        format!("removed by {user} (uid {uid}, pid {leave_pid})")
    );
    assert_eq!(editor.exit_code().await, Some(4));
    assert!(keys(&daemon, "doc").await.is_empty());
}

#[tokio::test]
#[ignore = "needs root: runs the editors as uid 65534 with setpriv, and removes their entry as root"]
async fn roots_leave_all_tells_the_removed_editor_and_only_the_next_one_owns_the_file() {
    common::needs_root();
    let daemon = SharedDaemon::start(&[]).await;
    let mut editor =
        Running::spawn(&mut daemon.presence_as(NOBODY, &["join", "doc", "--key", "editor"]));
    assert_eq!(editor.line().await, "owner");
    let editor_pid = editor.pid();
    let mut next =
        Running::spawn(&mut daemon.presence_as(NOBODY, &["join", "doc", "--key", "next"]));
    let waiting = next.line().await;
    assert!(
        waiting.starts_with("spectator #1, owner editor (pid "),
        "{waiting}"
    );

    // Root clears the editor's entry, as an administrator would.
    let mut leave =
        Running::spawn(&mut daemon.presence_as_root(&["leave", "doc", "--all", "--key", "editor"]));
    let leave_pid = leave.pid();
    assert_eq!(leave.line().await, "left doc (1 entry)");

    // The editor is told, by whom, and stops: it owns nothing now.
    assert_eq!(
        editor.line().await,
        format!("removed by root (uid 0, pid {leave_pid})")
    );
    assert_eq!(editor.exit_code().await, Some(4));
    // The next in line is the one owner.
    assert_eq!(next.line().await, "owner");
    let mut list = Running::spawn(&mut daemon.presence_as_root(&["list", "doc", "--json"]));
    let listed = list.json().await;
    assert!(
        listed["presences"].get("editor").is_none(),
        "{listed} (editor was pid {editor_pid})"
    );
    assert_eq!(listed["owner"]["key"], "next");
}
