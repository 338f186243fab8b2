//! The daemon's lease keeper (`daemon::cluster::lease`) against a real etcd
//! on loopback: the fence falls before etcd ends the lease, every time; an
//! etcd election fences nobody; a fence is lifted when etcd still has the
//! lease; a lease etcd ended is granted anew.

use std::sync::Arc;
use std::time::Duration;

use presenced::daemon::cluster::{
    Creation, Event, Gateway, LeaseId, LeaseKeeper, LeaseSettings, LeaseState, LeaseStatus,
    Renewal, WatchMessage,
};
use presenced::sys::BootInstant;
use tokio::sync::watch;

use crate::common::etcd::{ELECTION_TIMEOUT, EtcdCluster};
use crate::common::{needs_program, within};

/// The per-attempt timeout the keepers' gateways are given.
const R: Duration = Duration::from_millis(300);

/// Short settings for the fixture's elections (E = 250 ms): the longest
/// gap between acknowledged renewals is K + max(2R, 2E) + R + 0.1 s =
/// 1.25 s, under T − m = 1.5 s.
const SHORT: LeaseSettings = LeaseSettings {
    ttl: Duration::from_secs(2),
    margin: Duration::from_millis(500),
    period: Duration::from_millis(250),
    election_timeout: ELECTION_TIMEOUT,
};

fn keeper(endpoints: impl IntoIterator<Item = String>, settings: LeaseSettings) -> LeaseKeeper {
    let gateway = Gateway::new(endpoints, R).expect("the endpoints are http://host:port");
    LeaseKeeper::start(Arc::new(gateway), settings).expect("the settings hold and an alarm")
}

/// Waits for a status `wanted` accepts, and returns it.
async fn wait_for(
    what: &str,
    status: &mut watch::Receiver<LeaseStatus>,
    wanted: impl Fn(&LeaseState) -> bool,
) -> LeaseStatus {
    within(what, status.wait_for(|status| wanted(&status.state)))
        .await
        .unwrap_or_else(|_| panic!("the keeper ended while waiting for {what}"))
        .clone()
}

async fn live(status: &mut watch::Receiver<LeaseStatus>) -> LeaseId {
    let status = wait_for("a live lease", status, |state| {
        matches!(state, LeaseState::Live { .. })
    })
    .await;
    match status.state {
        LeaseState::Live { lease, .. } => lease,
        other => unreachable!("waited for a live lease: {other:?}"),
    }
}

/// The member a keeper talks to alone is stopped, with a key on its lease
/// watched through another member: the keeper's fence falls before that
/// watch sees etcd delete the key, in every trial, whether the stopped
/// member leads (an election follows, and the new leader extends the
/// lease) or follows. Prints each trial's margin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd (etcd-server)"]
async fn the_fence_falls_before_etcd_ends_the_lease_every_time() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let mut margins = Vec::new();
    for trial in 0..6 {
        let stopped = trial % 3;
        let observer_member = (stopped + 1) % 3;
        let observer = Gateway::new([etcd.endpoint(observer_member)], R).expect("an endpoint");
        let keeper = keeper([etcd.endpoint(stopped)], SHORT);
        let mut status = keeper.status();
        let lease = live(&mut status).await;

        let prefix = format!("/presence/t/fenced-{trial}/");
        let key = format!("{prefix}h1:p1");
        let created = match observer
            .create_if_absent(prefix.as_bytes(), key.as_bytes(), b"{}", lease)
            .await
            .expect("the transaction")
        {
            Creation::Created(created) => created,
            Creation::Exists => panic!("{key} existed"),
        };
        let mut watch = observer
            .watch(prefix.as_bytes(), created.revision + 1)
            .await
            .expect("a watch");

        etcd.stop(stopped);
        let fenced = tokio::spawn(async move {
            let status = wait_for("the fence", &mut status, |state| {
                !matches!(state, LeaseState::Live { .. })
            })
            .await;
            (status, keeper)
        });
        let deleted_at = within("etcd to delete the key", async {
            loop {
                match watch.next().await.expect("the watch") {
                    Some(WatchMessage::Events { events, .. })
                        if events
                            .iter()
                            .any(|event| matches!(event, Event::Delete { .. })) =>
                    {
                        return BootInstant::now();
                    }
                    Some(_) => continue,
                    None => panic!("the watch ended"),
                }
            }
        })
        .await;
        let (status, _keeper) = fenced.await.expect("the fence's waiter");
        let LeaseState::Fenced {
            fenced_at,
            renewed_at,
            ..
        } = status.state
        else {
            panic!("trial {trial}: not fenced: {status:?}");
        };
        etcd.resume(stopped);
        for member in 0..3 {
            etcd.wait_healthy(member);
        }
        assert!(
            fenced_at < deleted_at,
            "trial {trial} (member {stopped} stopped): fenced {:?} after etcd deleted the key",
            fenced_at.saturating_duration_since(deleted_at)
        );
        // The fence fell when it was due, not before; and etcd kept the
        // key a whole TTL after the last renewal the keeper counts from,
        // so that renewal was sent no later than etcd received it.
        let due = renewed_at + SHORT.ttl.saturating_sub(SHORT.margin);
        assert!(fenced_at >= due, "trial {trial}: fenced before it was due");
        assert!(
            deleted_at >= renewed_at + SHORT.ttl,
            "trial {trial}: etcd deleted the key {:?} after the renewal the fence counts from",
            deleted_at.saturating_duration_since(renewed_at)
        );
        margins.push((stopped, deleted_at.saturating_duration_since(fenced_at)));
    }
    let smallest = margins.iter().map(|&(_, margin)| margin).min();
    println!(
        "fence before delete, by (stopped member, margin): {margins:?}; smallest {smallest:?}"
    );
}

/// With every member given, SIGKILL of etcd's leader costs an election,
/// which the settings leave room for: the lease stays live throughout, and
/// renewals are acknowledged again after it.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn an_etcd_leader_killed_fences_nobody() {
    needs_program("etcd", "etcd-server");
    lose_the_leader(Loss::Killed).await;
}

/// A SIGSTOPped leader is worse than a dead one: it holds its connections
/// and answers nothing, so an attempt on it waits out R, and a follower
/// forwards to it until the others elect a new one. Still no fence, and no
/// gap between renewals longer than the settings allow for.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn an_etcd_leader_stopped_fences_nobody() {
    needs_program("etcd", "etcd-server");
    lose_the_leader(Loss::Stopped).await;
}

enum Loss {
    Killed,
    Stopped,
}

/// A keeper given every member, etcd's leader first, loses that leader,
/// and is watched for three TTLs: every state is live on the same lease,
/// a renewal is acknowledged after the loss, and the renewals the keeper
/// counts from are sent no further apart than
/// [`LeaseSettings::longest_renewal_gap`].
async fn lose_the_leader(loss: Loss) {
    let mut etcd = EtcdCluster::start(3);
    let leader = etcd.leader();
    // The leader first, so that the keeper is talking to it when it goes.
    let mut endpoints = etcd.endpoints();
    endpoints.rotate_left(leader);
    let keeper = keeper(endpoints, SHORT);
    let mut status = keeper.status();
    let lease = live(&mut status).await;
    let mut renewals = Vec::new();
    if let LeaseState::Live { renewed_at, .. } = status.borrow_and_update().state {
        renewals.push(renewed_at);
    }

    match loss {
        Loss::Killed => etcd.kill(leader),
        Loss::Stopped => etcd.stop(leader),
    }
    let lost_at = BootInstant::now();
    let watched_until = lost_at + 3 * SHORT.ttl;
    while BootInstant::now() < watched_until {
        let left = watched_until.saturating_duration_since(BootInstant::now());
        if tokio::time::timeout(left, status.changed()).await.is_err() {
            break;
        }
        let now = status.borrow_and_update().clone();
        match now.state {
            LeaseState::Live {
                lease: current,
                renewed_at,
                ..
            } => {
                assert_eq!(current, lease, "a new lease: {now:?}");
                if renewals.last() != Some(&renewed_at) {
                    renewals.push(renewed_at);
                }
            }
            other => panic!("the leader's loss reached the lease: {other:?}, {now:?}"),
        }
    }
    if let Loss::Stopped = loss {
        etcd.resume(leader);
    }
    let after_loss = renewals.iter().find(|&&at| at > lost_at);
    let first = after_loss.expect("a renewal acknowledged after the loss");
    let longest = renewals
        .windows(2)
        .map(|pair| pair[1].saturating_duration_since(pair[0]))
        .max()
        .unwrap_or_default();
    let bound = SHORT.longest_renewal_gap(R);
    println!(
        "first renewal sent {:?} after the loss; longest gap between renewals \
         {longest:?}, bound {bound:?}",
        first.saturating_duration_since(lost_at)
    );
    assert!(longest <= bound, "a gap of {longest:?}, over {bound:?}");
}

/// The only member stopped past the fence but for less than the TTL: the
/// keeper fences, and when the member answers again etcd still has the
/// lease, so the fence is lifted with the same lease.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_fence_is_lifted_when_etcd_still_has_the_lease() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let follower = (etcd.leader() + 1) % 3;
    // Two seconds between the fence and the lease's end: room to resume.
    let settings = LeaseSettings {
        ttl: Duration::from_secs(4),
        margin: Duration::from_secs(2),
        ..SHORT
    };
    let keeper = keeper([etcd.endpoint(follower)], settings);
    let mut status = keeper.status();
    let lease = live(&mut status).await;

    etcd.stop(follower);
    let fenced = wait_for("the fence", &mut status, |state| {
        !matches!(state, LeaseState::Live { .. })
    })
    .await;
    etcd.resume(follower);
    assert!(
        matches!(fenced.state, LeaseState::Fenced { lease: current, .. } if current == lease),
        "{fenced:?}"
    );
    let lifted = live(&mut status).await;
    assert_eq!(lifted, lease);
}

/// A lease revoked behind the keeper's back (as etcd ends one that was not
/// renewed in time) is found gone at the next renewal, and a new one is
/// granted and kept.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_lease_etcd_ended_is_granted_anew() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let keeper = keeper(etcd.endpoints(), SHORT);
    let mut status = keeper.status();
    let first = live(&mut status).await;

    let other = Gateway::new(etcd.endpoints(), R).expect("endpoints");
    other.revoke(first).await.expect("a revoke");
    let renewed = wait_for(
        "a new lease",
        &mut status,
        |state| matches!(state, LeaseState::Live { lease, .. } if *lease != first),
    )
    .await;
    let LeaseState::Live { lease: second, .. } = renewed.state else {
        unreachable!("waited for a live lease")
    };
    assert!(matches!(
        other.keep_alive(second).await.expect("a renewal"),
        Renewal::Alive { .. }
    ));
    assert_eq!(keeper.stop().await, Some(second));
}
