//! A daemon restart must be invisible: `presence join` and `presence watch`
//! ride through a crash or a stop of the daemon, everyone keeps their seq
//! and role, and only real changes are printed.

use crate::common::{
    self, Daemon, KillDaemonsOnDrop, Running, View, connect_when_ready, eventually, within,
};
use serde_json::Value;

/// Joins `doc` as `key` and returns the process with its track reply.
async fn join(daemon: &Daemon, key: &str) -> (Running, Value) {
    let mut joined = daemon.spawn(&["join", "doc", "--key", key, "--json"]);
    let reply = joined.json().await;
    assert_eq!(reply["ok"], true, "{reply}");
    (joined, reply)
}

/// Waits until every entry restored at start has been resumed, or has
/// left; until then a restarted daemon still holds places for absent
/// clients.
async fn wait_until_resumed(daemon: &Daemon) {
    let (client, _events) = daemon.client().await;
    eventually("every client to resume", async || {
        client.status().await.expect("status").awaiting_resume == 0
    })
    .await;
}

/// The next line a `join --json` prints must be a `role` event; returns
/// its payload.
async fn next_role(joined: &mut Running) -> Value {
    let line = joined.json().await;
    assert_eq!(line["event"], "role", "expected a role change, got {line}");
    line["payload"].clone()
}

#[tokio::test]
async fn three_editors_keep_their_places_when_the_daemon_is_killed() {
    let mut daemon = Daemon::start().await;
    let (mut alice, alice_joined) = join(&daemon, "alice").await;
    let (mut bob, bob_joined) = join(&daemon, "bob").await;
    let (mut carol, _) = join(&daemon, "carol").await;
    let mut watch = daemon.spawn(&["watch", "doc", "--json"]);
    let mut view = View::default();
    view.apply(&watch.json().await);
    let before = View::listed(&daemon, "doc").await;
    assert_eq!(view, before);

    daemon.crash().await;
    daemon.start_again(&[]).await;

    // The watcher subscribes again and is sent the whole topic afresh.
    let state = watch.json().await;
    assert_eq!(state["event"], "presence_state", "{state}");
    view.apply(&state);
    wait_until_resumed(&daemon).await;
    assert_eq!(View::listed(&daemon, "doc").await, before);
    assert_eq!(view, before);

    // Nobody printed anything during the restart: the next line each
    // client prints is the change that follows.
    alice.sigkill();
    let bob_role = next_role(&mut bob).await;
    assert_eq!(bob_role["ref"], bob_joined["ref"]);
    assert_eq!(bob_role["role"], "owner");
    let carol_role = next_role(&mut carol).await;
    assert_eq!(carol_role["role"], "spectator");
    assert_eq!(carol_role["owner"]["phx_ref"], bob_joined["ref"]);
    let diff = watch.json().await;
    let alice_ref = alice_joined["ref"].as_str().expect("ref");
    // Killed, alice's connection closes and her process exits; the daemon
    // may notice either first.
    let reason = &diff["reasons"][alice_ref];
    assert!(reason == "closed" || reason == "pid_exit", "{diff}");
    view.apply(&diff);
    assert_eq!(view, View::listed(&daemon, "doc").await);
}

#[tokio::test]
async fn a_client_killed_while_the_daemon_is_down_is_gone_after_the_restart() {
    let mut daemon = Daemon::start().await;
    let (mut alice, alice_joined) = join(&daemon, "alice").await;
    let (mut bob, bob_joined) = join(&daemon, "bob").await;

    daemon.crash().await;
    alice.sigkill();
    alice.exit_code().await;
    // A long grace: alice's row must go because her process is gone, not
    // because she failed to resume in time.
    daemon.start_again(&["--resume-grace", "600"]).await;

    let role = next_role(&mut bob).await;
    assert_eq!(role["ref"], bob_joined["ref"]);
    assert_eq!(role["role"], "owner");
    let listed = View::listed(&daemon, "doc").await;
    assert!(
        !listed
            .seqs
            .contains_key(alice_joined["ref"].as_str().expect("ref"))
    );
    assert_eq!(
        listed.owner.as_ref(),
        bob_joined["ref"].as_str().map(str::to_owned).as_ref()
    );
    wait_until_resumed(&daemon).await;
}

#[tokio::test]
async fn an_owner_that_never_resumes_expires_and_the_next_in_line_is_promoted() {
    use presenced::protocol::TrackRequest;
    let mut daemon = Daemon::start().await;
    let sleeper = common::spawn_sleeper();
    // The owner is a connection whose process lives on but never comes
    // back to resume.
    let (ghost, _ghost_events) = daemon.client().await;
    let mut request = TrackRequest::new("doc", "ghost");
    request.pid = sleeper.id();
    let ghost_entry = ghost.track(request).await.expect("track");
    let (mut bob, bob_joined) = join(&daemon, "bob").await;

    daemon.crash().await;
    daemon.start_again(&["--resume-grace", "3"]).await;
    let mut watch = daemon.spawn(&["watch", "doc", "--json"]);
    let state = watch.json().await;
    assert!(
        state["payload"]["ghost"].is_object(),
        "the ghost keeps its place during the grace period: {state}"
    );

    let diff = watch.json().await;
    assert_eq!(diff["reasons"][&ghost_entry.phx_ref], "expired", "{diff}");
    let role = next_role(&mut bob).await;
    assert_eq!(role["ref"], bob_joined["ref"]);
    assert_eq!(role["role"], "owner");
}

#[tokio::test]
async fn a_row_whose_pid_now_belongs_to_another_process_is_dead() {
    use presenced::protocol::{Lifetime, TrackRequest};
    let mut daemon = Daemon::start().await;
    let sleeper = common::spawn_sleeper();
    let (client, _events) = daemon.client().await;
    let mut request = TrackRequest::new("doc", "first");
    request.pid = sleeper.id();
    request.lifetime = Lifetime::Process;
    let first = client.track(request).await.expect("track");
    drop(client);
    let (mut bob, bob_joined) = join(&daemon, "bob").await;

    daemon.stop().await;
    // Same pid, different start time: the process that joined is gone and
    // the pid was handed to another.
    let db = rusqlite::Connection::open(&daemon.db).expect("open the database");
    let changed = db
        .execute(
            "UPDATE presences SET pid_start_time = pid_start_time + 1 WHERE ref = ?1",
            [&first.phx_ref],
        )
        .expect("update");
    assert_eq!(changed, 1);
    drop(db);
    daemon.start_again(&["--resume-grace", "600"]).await;

    let role = next_role(&mut bob).await;
    assert_eq!(role["role"], "owner");
    let listed = View::listed(&daemon, "doc").await;
    assert!(!listed.seqs.contains_key(&first.phx_ref));
    assert_eq!(listed.owner.as_deref(), bob_joined["ref"].as_str());
}

/// `presence ARGS` aimed at this daemon's socket and database that,
/// unlike the harness's usual commands, may start a daemon itself.
fn may_start_a_daemon(daemon: &Daemon, args: &[&str]) -> Running {
    Running::spawn(common::presence_command(&daemon.socket, &daemon.db).args(args))
}

#[tokio::test]
async fn after_sigterm_clients_wait_for_the_restart_and_print_nothing() {
    let mut daemon = Daemon::start().await;
    let mut alice = may_start_a_daemon(&daemon, &["join", "doc", "--key", "alice"]);
    assert_eq!(alice.line().await, "owner");
    let mut bob = may_start_a_daemon(&daemon, &["join", "doc", "--key", "bob"]);
    assert!(bob.line().await.starts_with("spectator #1, owner alice"));
    let before = View::listed(&daemon, "doc").await;

    daemon.stop().await;
    assert!(
        !daemon.socket.exists(),
        "a stopped daemon removes its socket"
    );
    // The clients may start daemons, but not after a deliberate stop: if
    // one had, this start would be refused as a second daemon.
    daemon.start_again(&[]).await;
    wait_until_resumed(&daemon).await;
    assert_eq!(View::listed(&daemon, "doc").await, before);

    // Nothing was printed across the restart: bob's next line is news.
    alice.sigterm();
    assert_eq!(alice.exit_code().await, Some(0));
    assert_eq!(bob.line().await, "owner");
}

#[tokio::test]
async fn clients_start_a_new_daemon_themselves_and_keep_their_places() {
    let mut daemon = Daemon::start().await;
    // The daemon the clients start is beyond the harness's reach.
    let _cleanup = KillDaemonsOnDrop(daemon.socket.clone());
    let mut joined = Vec::new();
    for key in ["alice", "bob", "carol"] {
        let mut running = may_start_a_daemon(&daemon, &["join", "doc", "--key", key, "--json"]);
        assert_eq!(running.json().await["ok"], true);
        joined.push(running);
    }
    let before = View::listed(&daemon, "doc").await;

    let crashed_pid = daemon.pid();
    daemon.crash().await;
    // A client starts a daemon.
    let (client, _events) = connect_when_ready(&daemon.socket).await;
    let status = client.status().await.expect("status");
    assert_ne!(status.pid, crashed_pid, "a new daemon serves");
    wait_until_resumed(&daemon).await;
    assert_eq!(View::listed(&daemon, "doc").await, before);

    joined[0].sigkill();
    let role = next_role(&mut joined[1]).await;
    assert_eq!(role["role"], "owner");
}

#[tokio::test]
async fn a_session_gives_up_at_its_deadline_when_the_daemon_never_answers() {
    use presenced::client::{Reconnect, Session, SessionEvent};
    let mut daemon = Daemon::start().await;
    let reconnect = Reconnect {
        deadline: std::time::Duration::from_secs(1),
        autostart: None,
    };
    let (session, mut events) = Session::new(&daemon.socket, daemon.client().await, reconnect);
    session
        .track(presenced::protocol::TrackRequest::new("doc", "alice"))
        .await
        .expect("track");

    daemon.crash().await;
    // Something takes connections at the path but never answers, as a
    // stopped (SIGSTOP) daemon would.
    std::fs::remove_file(&daemon.socket).expect("remove the dead socket");
    let _mute = std::os::unix::net::UnixListener::bind(&daemon.socket).expect("bind");

    let lost = within("the session to give up", async {
        loop {
            match events.recv().await.expect("the session reports") {
                SessionEvent::Lost { reason } => return reason,
                SessionEvent::Disconnected { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(lost.contains("did not come back within 1s"), "{lost}");
    let call = session.client().await.err().expect("calls fail once lost");
    assert!(call.to_string().contains("did not come back"), "{call}");
}

/// Two sessions queue behind an owner whose process dies while the daemon
/// is down. After the restart each hears, once and from the daemon, what
/// changed while it was away: the first that it owns the topic, the
/// second that it moved up a place under a new owner.
#[tokio::test]
async fn sessions_behind_an_owner_dead_across_a_restart_each_hear_their_new_standing_once() {
    use presenced::client::{Reconnect, Session, SessionEvent};
    use presenced::protocol::{Event, Role, TrackRequest};
    let mut daemon = Daemon::start().await;
    let (mut alice, _) = join(&daemon, "alice").await;
    let (bob, mut bob_events) =
        Session::new(&daemon.socket, daemon.client().await, Reconnect::default());
    let bob_entry = bob
        .track(TrackRequest::new("doc", "bob"))
        .await
        .expect("track");
    let (carol, mut carol_events) =
        Session::new(&daemon.socket, daemon.client().await, Reconnect::default());
    let carol_entry = carol
        .track(TrackRequest::new("doc", "carol"))
        .await
        .expect("track");
    assert_eq!(carol_entry.standing.position, 2);

    daemon.crash().await;
    alice.sigkill();
    alice.exit_code().await;
    daemon.start_again(&["--resume-grace", "600"]).await;

    // What each session reports from the crash on, up to the state of a
    // subscription made once it is back: a second role event, or one
    // made up by the session, would show up in between.
    async fn reported(
        session: &Session,
        events: &mut presenced::client::SessionEvents,
    ) -> Vec<SessionEvent> {
        let mut seen = Vec::new();
        let back = |event: &SessionEvent| matches!(event, SessionEvent::Reconnected);
        record_until("the session to come back", events, &mut seen, back).await;
        session.subscribe("doc").await.expect("subscribe");
        let state = |event: &SessionEvent| {
            matches!(event, SessionEvent::Event(Event::PresenceState { .. }))
        };
        record_until("the state", events, &mut seen, state).await;
        seen
    }
    /// Adds the session's events to `seen` up to the first that is `last`.
    async fn record_until(
        what: &str,
        events: &mut presenced::client::SessionEvents,
        seen: &mut Vec<SessionEvent>,
        last: impl Fn(&SessionEvent) -> bool,
    ) {
        within(what, async {
            loop {
                let event = events.recv().await.expect("the session reports");
                let done = last(&event);
                seen.push(event);
                if done {
                    break;
                }
            }
        })
        .await;
    }
    let roles = |seen: &[SessionEvent]| -> Vec<(String, Role, usize, String)> {
        seen.iter()
            .filter_map(|event| match event {
                SessionEvent::Event(Event::Role { payload, .. }) => Some((
                    payload.phx_ref.clone(),
                    payload.standing.role,
                    payload.standing.position,
                    payload
                        .standing
                        .owner
                        .as_ref()
                        .expect("an owner")
                        .key
                        .clone(),
                )),
                _ => None,
            })
            .collect()
    };

    let seen = reported(&bob, &mut bob_events).await;
    assert_eq!(
        roles(&seen),
        [(bob_entry.phx_ref.clone(), Role::Owner, 0, "bob".to_owned())],
        "{seen:?}"
    );
    assert_eq!(
        bob.standing(&bob_entry.phx_ref).map(|s| s.role),
        Some(Role::Owner)
    );
    let seen = reported(&carol, &mut carol_events).await;
    assert_eq!(
        roles(&seen),
        [(
            carol_entry.phx_ref.clone(),
            Role::Spectator,
            1,
            "bob".to_owned()
        )],
        "{seen:?}"
    );
    assert_eq!(
        carol.standing(&carol_entry.phx_ref).map(|s| s.position),
        Some(1)
    );
}

/// A `presence run` waits behind alice while it is away: it is stopped
/// (SIGSTOP) across a daemon crash, so its entry is restored but not
/// resumed. Alice leaves, which promotes it while no connection holds it;
/// then the daemon stops and starts again, which forgets that nobody told
/// it. Once it runs again and resumes, the standing in the `resume` reply
/// is the only sign it owns the topic, and it must run its command.
#[tokio::test]
async fn a_run_promoted_while_away_across_two_restarts_runs_its_command() {
    use nix::sys::signal::Signal;
    let mut daemon = Daemon::start().await;
    let (mut alice, alice_joined) = join(&daemon, "alice").await;
    let mut bob = daemon.spawn(&["run", "doc", "--", "echo", "ran"]);
    eventually("bob to wait in line", async || {
        View::listed(&daemon, "doc").await.seqs.len() == 2
    })
    .await;
    let bob_ref = View::listed(&daemon, "doc")
        .await
        .seqs
        .into_keys()
        .find(|phx_ref| alice_joined["ref"] != *phx_ref)
        .expect("bob's entry");

    common::signal(bob.pid(), Signal::SIGSTOP);
    daemon.crash().await;
    daemon.start_again(&["--resume-grace", "600"]).await;
    alice.sigterm();
    eventually("bob to be promoted while away", async || {
        View::listed(&daemon, "doc").await.owner.as_ref() == Some(&bob_ref)
    })
    .await;
    daemon.stop().await;
    daemon.start_again(&["--resume-grace", "600"]).await;
    common::signal(bob.pid(), Signal::SIGCONT);

    assert_eq!(bob.line().await, "ran");
    assert_eq!(bob.exit_code().await, Some(0));
}
