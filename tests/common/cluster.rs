//! Daemons of a cluster: real `presence daemon` processes, each with its
//! own socket, database and `--host`, sharing the topics [`SHARED`] names
//! through an etcd on loopback ([`super::etcd`]), with a lease short
//! enough that a lost host is noticed within seconds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use presenced::client::{Client, Events};
use presenced::daemon::LeaseSettings;
use presenced::protocol::{
    Event, LeaveReason, Lifetime, Role, Standing, StatusReply, TrackReply, TrackRequest,
};
use tokio::process::Child;

use super::etcd::{ELECTION_TIMEOUT, EtcdCluster};
use super::{Daemon, Options, POLL, View, eventually, next_event, spawn_sleeper, within};

/// The topics the daemons share; every other topic stays local.
pub const SHARED: &str = "shared:*";

/// The lease's TTL T the daemons are given: etcd ends a lost host's lease,
/// and so its entries, this long after its last renewal (plus up to half
/// a second: etcd looks for expired leases twice a second).
pub const TTL: Duration = Duration::from_secs(2);

/// m: how long before etcd could end a daemon's lease its fence falls.
pub const MARGIN: Duration = Duration::from_millis(500);

/// K: how often a daemon renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_millis(250);

/// R: how long one attempt on one etcd member may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);

/// The fence's settings the daemons run with.
pub fn lease_settings() -> LeaseSettings {
    LeaseSettings {
        ttl: TTL,
        margin: MARGIN,
        period: RENEW_EVERY,
        election_timeout: ELECTION_TIMEOUT,
    }
}

/// G: the longest time between two acknowledged renewals while etcd
/// elects a leader. With the fixture's election timeout (E = 250 ms) it
/// is K + max(2R, 2E) + R + 0.1 s = 1.25 s, under T − m = 1.5 s, which
/// the daemon checks at start.
pub fn longest_renewal_gap() -> Duration {
    lease_settings().longest_renewal_gap(ATTEMPT_TIMEOUT)
}

/// `presence daemon` arguments for `host` talking to every member.
pub fn cluster_args(etcd: &EtcdCluster, host: &str) -> Vec<String> {
    cluster_args_on(&etcd.endpoints(), host)
}

/// `presence daemon` arguments for `host` talking to `endpoints` only.
pub fn cluster_args_on(endpoints: &[String], host: &str) -> Vec<String> {
    [
        "--etcd",
        &endpoints.join(","),
        "--cluster-topics",
        SHARED,
        "--host",
        host,
        "--cluster-ttl",
        &TTL.as_secs().to_string(),
        "--etcd-election-timeout",
        &ELECTION_TIMEOUT.as_secs_f64().to_string(),
        "--cluster-margin",
        &MARGIN.as_secs_f64().to_string(),
        "--cluster-renew-every",
        &RENEW_EVERY.as_secs_f64().to_string(),
        "--etcd-attempt-timeout",
        &ATTEMPT_TIMEOUT.as_secs_f64().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A daemon of the cluster as `host`, talking to every member, once its
/// lease is live (its host name claimed on it), so that it may write
/// entries.
pub async fn host(etcd: &EtcdCluster, host: &str) -> Daemon {
    host_on(&etcd.endpoints(), host).await
}

/// A daemon of the cluster as `host`, talking to `endpoints` only, once
/// its lease is live.
pub async fn host_on(endpoints: &[String], host: &str) -> Daemon {
    started(&cluster_args_on(endpoints, host), None).await
}

/// [`host`], logging at `warn`, for a test that reads its log.
pub async fn logged_host(etcd: &EtcdCluster, host: &str) -> Daemon {
    started(&cluster_args(etcd, host), Some("warn")).await
}

/// A daemon of the cluster started with `args`, logging at `log` if
/// given, once its lease is live.
pub async fn started(args: &[String], log: Option<&str>) -> Daemon {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Daemon::start_with_options(Options {
        log,
        args: &args,
        ..Options::default()
    })
    .await;
    wait_for_lease(&daemon, "live").await;
    daemon
}

pub async fn status(daemon: &Daemon) -> StatusReply {
    let (client, _events) = daemon.client().await;
    client.status().await.expect("status")
}

/// Waits until the daemon's lease is in `state`, as `status` says.
pub async fn wait_for_lease(daemon: &Daemon, state: &str) -> StatusReply {
    let what = format!("the daemon's lease to be {state}");
    within(&what, async {
        loop {
            let status = status(daemon).await;
            let cluster = status.cluster.as_ref().expect("a daemon in cluster mode");
            if cluster.lease == state {
                return status;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

/// An editor's process (a sleeper) joins `topic` as alice through
/// `client`, with an entry that lasts as long as the process runs rather
/// than the connection. Returns the process, its pid and the reply.
pub async fn editor_process_joins(client: &Client, topic: &str) -> (Child, u32, TrackReply) {
    let editor = spawn_sleeper();
    let pid = editor.id().expect("the sleeper runs");
    let reply = client
        .track(TrackRequest {
            pid: Some(pid),
            lifetime: Lifetime::Process,
            ..TrackRequest::new(topic, "alice")
        })
        .await
        .expect("alice's editor joins");
    (editor, pid, reply)
}

/// The three hosts of most tests, a, b and c, each talking to every
/// member, once their leases are live.
pub async fn three_hosts(etcd: &EtcdCluster) -> (Daemon, Daemon, Daemon) {
    (
        host(etcd, "a").await,
        host(etcd, "b").await,
        host(etcd, "c").await,
    )
}

/// The reasons of the next diff on `topic` in which entries leave.
pub async fn next_leaves(events: &mut Events, topic: &str) -> BTreeMap<String, LeaveReason> {
    next_event(events, |event| match event {
        Event::PresenceDiff {
            topic: on,
            payload,
            reasons,
            ..
        } if on == topic && !payload.leaves.is_empty() => Some(reasons),
        _ => None,
    })
    .await
}

pub fn spectator_at(reply: &TrackReply, position: usize) {
    assert_eq!(reply.standing.role, Role::Spectator, "{reply:?}");
    assert_eq!(reply.standing.position, position, "{reply:?}");
}

/// Waits until every daemon lists `topic` as `expected`.
pub async fn listed_everywhere(daemons: &[&Daemon], topic: &str, expected: &View) {
    for daemon in daemons {
        eventually("every host to list the same queue", async || {
            View::listed(daemon, topic).await == *expected
        })
        .await;
    }
}

/// The standing of the next `role` event for the entry `phx_ref` of
/// `topic`, other events skipped.
pub async fn next_role(events: &mut Events, topic: &str, phx_ref: &str) -> Standing {
    next_event(events, |event| match event {
        Event::Role { topic: on, payload } if on == topic && payload.phx_ref == phx_ref => {
            Some(payload.standing)
        }
        _ => None,
    })
    .await
}

/// The first `role` event, among those sent before `deadline`, telling
/// an entry of this connection it is suspended. Events already received
/// are all looked at, even once the deadline has passed.
pub async fn suspended_by(events: &mut Events, deadline: Instant) -> Option<Event> {
    tokio::time::timeout_at(deadline.into(), async {
        loop {
            match events.recv().await {
                Some(event @ Event::Role { .. })
                    if matches!(&event, Event::Role { payload, .. } if payload.standing.suspended) =>
                {
                    return event;
                }
                Some(_) => {}
                None => panic!("the event stream closed"),
            }
        }
    })
    .await
    .ok()
}
