//! The fence end to end (docs/cluster.md, "Fencing" and "What happens
//! when"): three daemons sharing topics through a 3-member etcd on
//! loopback, and what each failure of etcd or of a daemon does to the
//! owners on every host. A host that loses etcd demotes its owners before
//! any other host can promote; an etcd election demotes nobody; a lost
//! quorum demotes everyone, and its return gives every place back; a
//! stopped daemon never wakes up an owner; a lost host's entries leave
//! the others in a few diffs.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use presenced::client::{Client, ClientError, Events};
use presenced::daemon::cluster::MAX_TXN_OPS;
use presenced::protocol::{ErrorCode, LeaveReason, Role, TrackReply, TrackRequest};
use presenced::sys::BootInstant;

use crate::common::cluster::{
    TTL, host, host_on, listed_everywhere, logged_host, longest_renewal_gap, next_leaves,
    next_role, spectator_at, suspended_by, three_hosts, wait_for_lease,
};
use crate::common::etcd::EtcdCluster;
use crate::common::{Daemon, POLL, View, eventually, needs_program, signal, within};

/// How many times the race between a host's fence and another host's
/// promotion is run: each run is one chance for the promotion to win.
const TRIALS: usize = 20;

/// The entries the crowded host holds, and how many connections hold them
/// (each connection may hold at most 1,000).
const CROWD: usize = 1_000;
const CROWD_CONNECTIONS: usize = 4;

/// A client on `daemon` joins `topic` as `key`.
async fn join(daemon: &Daemon, topic: &str, key: &str) -> (Client, Events, TrackReply) {
    let (client, events) = daemon.client().await;
    let reply = client
        .track(TrackRequest::new(topic, key))
        .await
        .unwrap_or_else(|error| panic!("{key} joins {topic}: {error}"));
    (client, events, reply)
}

/// The queue of `topic` as `reply`s say it stands, first the owner.
fn queue_of(replies: &[&TrackReply]) -> View {
    View {
        seqs: replies
            .iter()
            .map(|reply| (reply.phx_ref.clone(), reply.seq))
            .collect(),
        owner: replies.first().map(|reply| reply.phx_ref.clone()),
    }
}

/// Waits until `daemon` lists the entry `phx_ref` of `topic` queued
/// again behind the entry with `seq`, and returns the queue it lists.
async fn queued_behind(daemon: &Daemon, topic: &str, phx_ref: &str, seq: u64) -> View {
    let what = format!("{phx_ref} to be queued again behind seq {seq}");
    within(&what, async {
        loop {
            let listed = View::listed(daemon, topic).await;
            if listed.seqs.get(phx_ref).is_some_and(|own| *own > seq) {
                return listed;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn an_owner_cut_off_from_etcd_is_suspended_before_another_host_is_promoted() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    // a talks to one follower only; b and c to every member, so they
    // carry on without it.
    let member = (etcd.leader() + 1) % 3;
    let a = host_on(&[etcd.endpoint(member)], "a").await;
    let (b, c) = (host(&etcd, "b").await, host(&etcd, "c").await);

    let mut margins = Vec::with_capacity(TRIALS);
    for trial in 0..TRIALS {
        let topic = format!("shared:cut-off-{trial}");
        // a's owner holds the topic and watches it, as an editor does.
        let (on_a, mut a_events) = a.client().await;
        let owner = on_a
            .track(TrackRequest {
                subscribe: true,
                ..TrackRequest::new(&topic, "alice")
            })
            .await
            .expect("alice joins on a");
        assert_eq!(owner.standing.role, Role::Owner, "trial {trial}: {owner:?}");
        let (_on_b, mut b_events, next) = join(&b, &topic, "bob").await;
        spectator_at(&next, 1);
        let (_on_c, mut c_events, last) = join(&c, &topic, "carol").await;
        spectator_at(&last, 2);

        etcd.stop(member);
        // Each side stamps its event as it arrives, both read at once.
        let (suspended, promoted) = tokio::join!(
            async {
                let standing = next_role(&mut a_events, &topic, &owner.phx_ref).await;
                (Instant::now(), standing)
            },
            async {
                let standing = next_role(&mut b_events, &topic, &next.phx_ref).await;
                (Instant::now(), standing)
            },
        );
        assert!(
            suspended.1.suspended && suspended.1.role == Role::Spectator && suspended.1.readonly,
            "trial {trial}: a's owner was told {:?}",
            suspended.1
        );
        assert_eq!(
            promoted.1.role,
            Role::Owner,
            "trial {trial}: {:?}",
            promoted.1
        );
        assert!(
            suspended.0 < promoted.0,
            "trial {trial}: b's entry was promoted {:?} before a's owner was suspended",
            suspended.0 - promoted.0
        );
        margins.push(promoted.0 - suspended.0);
        // c moves up behind b; it owns nothing.
        let moved = next_role(&mut c_events, &topic, &last.phx_ref).await;
        assert_eq!(
            (moved.role, moved.position),
            (Role::Spectator, 1),
            "trial {trial}: {moved:?}"
        );

        // Whole again: a finds its lease gone, takes a new one and queues
        // its entry again at the back, on every host.
        etcd.resume(member);
        for index in 0..3 {
            etcd.wait_healthy(index);
        }
        wait_for_lease(&a, "live").await;
        let back = next_role(&mut a_events, &topic, &owner.phx_ref).await;
        assert_eq!(
            (back.role, back.position, back.suspended),
            (Role::Spectator, 2, false),
            "trial {trial}: {back:?}"
        );
        let requeued = queued_behind(&b, &topic, &owner.phx_ref, last.seq).await;
        assert_eq!(
            requeued.owner.as_deref(),
            Some(next.phx_ref.as_str()),
            "trial {trial}: {requeued:?}"
        );
        listed_everywhere(&[&a, &c], &topic, &requeued).await;
    }
    margins.sort();
    println!(
        "fence ahead of the promotion over {TRIALS} trials: smallest {:?}, median {:?}",
        margins[0],
        margins[TRIALS / 2]
    );
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn an_etcd_leader_killed_demotes_nobody_and_joins_are_answered_within_a_second() {
    needs_program("etcd", "etcd-server");
    let mut etcd = EtcdCluster::start(3);
    let hosts = [
        host(&etcd, "a").await,
        host(&etcd, "b").await,
        host(&etcd, "c").await,
    ];
    // Each host owns a topic of its own, with the other two behind it.
    let mut clients = Vec::new();
    for (index, owner_host) in hosts.iter().enumerate() {
        let topic = format!("shared:election-{index}");
        let (client, events, owner) = join(owner_host, &topic, "owner").await;
        assert_eq!(owner.standing.role, Role::Owner, "{owner:?}");
        clients.push((client, events, topic.clone()));
        for other in hosts.iter().filter(|other| other.pid() != owner_host.pid()) {
            let (client, events, waiter) = join(other, &topic, "waiter").await;
            assert_eq!(waiter.standing.role, Role::Spectator, "{waiter:?}");
            clients.push((client, events, topic.clone()));
        }
    }

    let leader = etcd.leader();
    etcd.kill(leader);
    let killed = Instant::now();

    // A new join on every host at once, each waited for with the kill as
    // its start.
    let [a, b, c] = &hosts;
    let waited = tokio::join!(
        join_after(a, "a", killed),
        join_after(b, "b", killed),
        join_after(c, "c", killed),
    );
    println!("joins answered after the leader was killed: {waited:?}");

    // Nobody was told to stand suspended, over twice the longest gap
    // between renewals an election may make.
    let deadline = killed + 2 * longest_renewal_gap();
    for (_, events, topic) in &mut clients {
        if let Some(event) = suspended_by(events, deadline).await {
            panic!("a client of {topic} was suspended by an etcd election: {event:?}");
        }
    }
    for daemon in &hosts {
        wait_for_lease(daemon, "live").await;
    }
}

/// A new join of a topic of its own on `daemon`, as `host`: answered, as
/// owner, within a second of `since`. How long it took.
async fn join_after(daemon: &Daemon, host: &str, since: Instant) -> Duration {
    let (client, _events) = daemon.client().await;
    let topic = format!("shared:after-election-{host}");
    let answered = tokio::time::timeout_at(
        (since + Duration::from_secs(1)).into(),
        client.track(TrackRequest::new(&topic, "newcomer")),
    )
    .await;
    let waited = since.elapsed();
    match answered {
        Ok(Ok(reply)) => {
            assert_eq!(reply.standing.role, Role::Owner, "{reply:?}");
            waited
        }
        Ok(Err(error)) => panic!("a join on {host} was refused after {waited:?}: {error}"),
        Err(_) => panic!("a join on {host} was not answered within a second"),
    }
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_lost_quorum_suspends_every_owner_and_its_return_gives_every_place_back() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let hosts = [
        host(&etcd, "a").await,
        host(&etcd, "b").await,
        host(&etcd, "c").await,
    ];
    let [a, b, c] = &hosts;
    // Each host owns a topic of its own, with the other two behind it.
    let mut owners = Vec::new();
    let mut queues = Vec::new();
    let mut behind = Vec::new();
    for (name, owner_host, others) in [("a", a, [b, c]), ("b", b, [c, a]), ("c", c, [a, b])] {
        let topic = format!("shared:quorum-{name}");
        let (client, events, owner) = join(owner_host, &topic, "owner").await;
        assert_eq!(owner.standing.role, Role::Owner, "{owner:?}");
        let (second_client, second_events, second) = join(others[0], &topic, "second").await;
        spectator_at(&second, 1);
        let (third_client, third_events, third) = join(others[1], &topic, "third").await;
        spectator_at(&third, 2);
        let queue = queue_of(&[&owner, &second, &third]);
        listed_everywhere(&[a, b, c], &topic, &queue).await;
        behind.push((second_client, second_events, third_client, third_events));
        owners.push((client, events, owner, topic.clone()));
        queues.push((topic, queue));
    }

    // The two followers stop. The leader, left without a quorum, steps
    // down (etcd checks that it hears from one), and the leases wait,
    // unexpired, for the next leader, which extends them.
    let leader = etcd.leader();
    let followers: Vec<usize> = (0..3).filter(|member| *member != leader).collect();
    for member in &followers {
        etcd.stop(*member);
    }
    let stopped = Instant::now();
    for (_, events, owner, topic) in &mut owners {
        let standing = next_role(events, topic, &owner.phx_ref).await;
        let waited = stopped.elapsed();
        assert!(
            standing.suspended && standing.role == Role::Spectator && standing.position == 0,
            "the owner of {topic}: {standing:?}"
        );
        assert!(
            waited <= TTL,
            "the owner of {topic} was suspended {waited:?} after etcd lost its quorum, \
             more than the TTL"
        );
    }
    // Meanwhile local topics are served as ever, and shared ones refused
    // at once rather than left waiting.
    for daemon in &hosts {
        let (client, _events) = daemon.client().await;
        let local = tokio::time::timeout(
            Duration::from_secs(1),
            client.track(TrackRequest::new("local:quorum", "local")),
        )
        .await
        .expect("a local join answered within a second")
        .expect("a local join");
        assert_eq!(local.standing.role, Role::Owner, "{local:?}");
        let shared = tokio::time::timeout(
            Duration::from_secs(1),
            client.track(TrackRequest::new("shared:no-quorum", "shared")),
        )
        .await
        .expect("a shared join answered within a second");
        match shared {
            Err(ClientError::Refused(error)) => {
                assert_eq!(error.code, ErrorCode::Unavailable, "{error:?}");
            }
            other => panic!("a shared join without etcd's quorum: {other:?}"),
        }
    }

    for member in &followers {
        etcd.resume(*member);
    }
    for member in 0..3 {
        etcd.wait_healthy(member);
    }
    for (_, events, owner, topic) in &mut owners {
        let standing = next_role(events, topic, &owner.phx_ref).await;
        assert!(
            standing.role == Role::Owner && !standing.suspended && !standing.readonly,
            "the owner of {topic} once etcd has its quorum again: {standing:?}"
        );
    }
    for (topic, queue) in &queues {
        listed_everywhere(&[a, b, c], topic, queue).await;
    }
    for daemon in &hosts {
        wait_for_lease(daemon, "live").await;
    }
    drop(behind);
}

/// The moment on the boot clock, in ms, from which the daemon that logged
/// `lines` promised no entry of its owned a shared topic: the latest fence
/// it logged (a renewal acknowledged while it was stopped, read once it
/// runs, moves the fence later than its alarm's).
fn latest_fence_logged(lines: &[String]) -> Option<u128> {
    lines
        .iter()
        .filter_map(|line| {
            let (_, after) = line.split_once("its fence fell at ")?;
            let (millis, _) = after.split_once(" ms on the boot clock")?;
            millis.parse().ok()
        })
        .max()
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_daemon_stopped_past_its_lease_never_tells_its_owner_it_owns_when_continued() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let (a, b, c) = (
        logged_host(&etcd, "a").await,
        host(&etcd, "b").await,
        host(&etcd, "c").await,
    );
    // A stopped daemon tells its clients nothing: what it promises is that
    // its fence falls before another host promotes, and that its first
    // word once it runs again is not that it owns.
    let mut margins = Vec::with_capacity(TRIALS);
    for trial in 0..TRIALS {
        let topic = format!("shared:stopped-{trial}");
        // Raw lines, to see every one a sends.
        let mut owner = a.raw().await;
        let joined = owner
            .request(&format!(
                r#"{{"op":"track","id":1,"topic":"{topic}","key":"alice"}}"#
            ))
            .await;
        assert_eq!(
            (&joined["ok"], &joined["role"]),
            (&true.into(), &"owner".into()),
            "trial {trial}: {joined}"
        );
        let owner_ref = joined["ref"].as_str().expect("a ref").to_owned();
        let (_on_b, mut b_events, next) = join(&b, &topic, "bob").await;
        spectator_at(&next, 1);
        let (_on_c, _c_events, last) = join(&c, &topic, "carol").await;
        spectator_at(&last, 2);
        let mut asker = a.raw().await;
        a.log_so_far().await;

        signal(a.pid(), nix::sys::signal::Signal::SIGSTOP);
        let promoted = next_role(&mut b_events, &topic, &next.phx_ref).await;
        let promoted_at = BootInstant::now().since_boot().as_millis();
        assert_eq!(promoted.role, Role::Owner, "trial {trial}: {promoted:?}");
        // Sent while a is stopped: a reads it only once continued.
        asker
            .send(&format!(
                r#"{{"op":"track","id":2,"topic":"{topic}","key":"dave"}}"#
            ))
            .await;
        signal(a.pid(), nix::sys::signal::Signal::SIGCONT);

        // Every role line a sends its owner from now on, up to its entry's
        // new place at the back, says it does not own; the first says it
        // is suspended or already moved back.
        let mut first = true;
        loop {
            let line = owner.next().await.expect("a keeps the owner's connection");
            if line["event"] != "role" {
                continue;
            }
            let payload = &line["payload"];
            assert_ne!(payload["role"], "owner", "trial {trial}: {line}");
            if first {
                println!("trial {trial}: a's first role line once continued: {line}");
                assert!(
                    payload["suspended"] == true || payload["position"].as_u64() > Some(0),
                    "trial {trial}: the first role line after a was continued: {line}"
                );
                first = false;
            }
            if payload["position"].as_u64() > Some(0) && payload.get("suspended").is_none() {
                assert_eq!(payload["ref"], owner_ref.as_str(), "trial {trial}: {line}");
                break;
            }
        }
        // The join sent meanwhile is answered as no owner: refused while
        // a's lease is fenced, or queued behind the others.
        let reply = asker.next().await.expect("a reply to the join");
        println!("trial {trial}: the join sent while a was stopped: {reply}");
        match reply["ok"].as_bool() {
            Some(true) => assert_eq!(reply["role"], "spectator", "trial {trial}: {reply}"),
            _ => assert_eq!(
                reply["error"]["code"], "unavailable",
                "trial {trial}: {reply}"
            ),
        }

        // a's entry is at the back on every host, behind b's and c's (and
        // the join's entry, if it was queued, somewhere behind them too).
        if let Some(joined_meanwhile) = reply["ref"].as_str() {
            eventually("b to list the join sent meanwhile", async || {
                View::listed(&b, &topic)
                    .await
                    .seqs
                    .contains_key(joined_meanwhile)
            })
            .await;
        }
        let requeued = queued_behind(&b, &topic, &owner_ref, last.seq).await;
        assert_eq!(
            requeued.owner.as_deref(),
            Some(next.phx_ref.as_str()),
            "trial {trial}: {requeued:?}"
        );
        listed_everywhere(&[&a, &c], &topic, &requeued).await;
        wait_for_lease(&a, "live").await;

        let fell_at = latest_fence_logged(&a.log_so_far().await)
            .unwrap_or_else(|| panic!("trial {trial}: a logged no fence once continued"));
        assert!(
            fell_at < promoted_at,
            "trial {trial}: b's entry was promoted {} ms before a's fence fell",
            fell_at - promoted_at
        );
        margins.push(promoted_at - fell_at);
    }
    margins.sort();
    println!(
        "a stopped daemon's fence ahead of the promotion over {TRIALS} trials: \
         smallest {} ms, median {} ms",
        margins[0],
        margins[TRIALS / 2]
    );
}

/// How the crowded host goes.
#[derive(Debug, Clone, Copy)]
enum Going {
    /// SIGKILLed: its lease ends after its TTL.
    Killed,
    /// SIGTERMed: it revokes its lease as it stops.
    Stopped,
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_killed_host_with_a_thousand_entries_leaves_the_others_in_a_few_diffs() {
    a_crowded_host_leaves_the_others_in_a_few_diffs(Going::Killed).await;
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_stopped_host_with_a_thousand_entries_leaves_the_others_in_a_few_diffs() {
    a_crowded_host_leaves_the_others_in_a_few_diffs(Going::Stopped).await;
}

/// Host a holds [`CROWD`] entries of one topic and goes as `going` says:
/// every other host's subscriber sees them all leave, lost, in at most
/// one diff per transaction of [`MAX_TXN_OPS`] deletes etcd could have
/// split them into (a lease's end deletes its keys in one revision).
async fn a_crowded_host_leaves_the_others_in_a_few_diffs(going: Going) {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let (mut a, b, c) = three_hosts(&etcd).await;
    let topic = "shared:crowd";
    let (on_b, mut b_events) = b.client().await;
    on_b.subscribe(topic).await.expect("b watches the topic");
    let (on_c, mut c_events) = c.client().await;
    on_c.subscribe(topic).await.expect("c watches the topic");

    // A's entries, over several connections (each may hold 1,000), each
    // connection's joins sent one after another, the connections at once.
    let per_connection = CROWD / CROWD_CONNECTIONS;
    let mut joining = tokio::task::JoinSet::new();
    for index in 0..CROWD_CONNECTIONS {
        let (client, events) = a.client().await;
        joining.spawn(async move {
            let mut refs = Vec::with_capacity(per_connection);
            for number in 0..per_connection {
                let key = format!("user-{index}-{number}");
                let reply = client
                    .track(TrackRequest::new(topic, &key))
                    .await
                    .unwrap_or_else(|error| panic!("{key} joins: {error}"));
                refs.push(reply.phx_ref);
            }
            // The connection stays open, and its entries with it.
            (refs, client, events)
        });
    }
    let mut crowd = BTreeSet::new();
    let mut holders = Vec::new();
    while let Some(joined) = within("a's entries to join", joining.join_next()).await {
        let (refs, client, events) = joined.expect("a connection's joins");
        crowd.extend(refs);
        holders.push((client, events));
    }
    assert_eq!(crowd.len(), CROWD);
    for daemon in [&b, &c] {
        eventually("every host to list a's entries", async || {
            View::listed(daemon, topic).await.seqs.len() == CROWD
        })
        .await;
    }

    match going {
        Going::Killed => a.crash().await,
        Going::Stopped => a.stop().await,
    }
    let most = CROWD.div_ceil(MAX_TXN_OPS);
    for (name, events) in [("b", &mut b_events), ("c", &mut c_events)] {
        let mut left = BTreeSet::new();
        let mut diffs = 0;
        while left.len() < CROWD {
            let reasons = next_leaves(events, topic).await;
            diffs += 1;
            for (phx_ref, reason) in reasons {
                assert_eq!(reason, LeaveReason::HostLost, "{phx_ref} left {name}");
                assert!(crowd.contains(&phx_ref), "{phx_ref} is not a's");
                left.insert(phx_ref);
            }
        }
        println!("a's {CROWD} entries left {name} in {diffs} diffs ({going:?})");
        assert!(
            diffs <= most,
            "a's {CROWD} entries left {name} in {diffs} diffs, more than {most}"
        );
    }
    for daemon in [&b, &c] {
        assert_eq!(View::listed(daemon, topic).await, View::default());
    }
    drop(holders);
}
