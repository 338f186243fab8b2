//! A daemon in cluster mode restarted (SIGTERM, then started again on the
//! same socket, database and `--host`) keeps its entries' places on every
//! host, as a restart does on one: before it exits it hands its keys over
//! to a lease as long as the resume grace, and the daemon that starts next
//! finds them in its first listing and takes them back. Its process
//! entries continue, its connection entries are resumed by their holders,
//! and no other host sees any of them leave. A daemon killed hands nothing
//! over: its entries are lost to the other hosts, and the daemon started
//! next queues them again at the back.

use std::time::{Duration, Instant};

use presenced::protocol::{Event, LeaveReason, Role, TrackRequest};
use serde_json::Value;

use crate::common;
use crate::common::cluster::{
    TTL, editor_process_joins, listed_everywhere, next_leaves, started, wait_for_lease,
};
use crate::common::etcd::EtcdCluster;
use crate::common::{Daemon, View, eventually, needs_program, next_event, signal, within};

/// How long a restarted daemon's clients have to resume, and so how long
/// its entries' keys are handed over for.
const RESUME_GRACE: Duration = Duration::from_secs(30);

/// The cluster's arguments for `host`, with `--resume-grace`.
fn cluster_args(etcd: &EtcdCluster, host: &str, resume_grace: Duration) -> Vec<String> {
    let mut args = common::cluster::cluster_args(etcd, host);
    args.extend([
        "--resume-grace".to_owned(),
        resume_grace.as_secs().to_string(),
    ]);
    args
}

/// A daemon of the cluster as `host`, once its lease is live; with its
/// log at `info` for the test to read, if `logged`.
async fn host(etcd: &EtcdCluster, host: &str, logged: bool, resume_grace: Duration) -> Daemon {
    let log = logged.then_some("info");
    started(&cluster_args(etcd, host, resume_grace), log).await
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_restarted_host_keeps_its_entries_places_on_every_host() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let (mut a, b, c) = (
        host(&etcd, "a", true, RESUME_GRACE).await,
        host(&etcd, "b", false, RESUME_GRACE).await,
        host(&etcd, "c", false, RESUME_GRACE).await,
    );
    let topic = "shared:doc";

    // On a: an editor's process entry, the owner; then bob on b; then a
    // connection entry on a, held by `presence join`; then carol on c.
    let (on_a, _a_events) = a.client().await;
    let (mut editor, editor_pid, owner) = editor_process_joins(&on_a, topic).await;
    assert_eq!(owner.standing.role, Role::Owner, "{owner:?}");
    let (on_b, _b_events) = b.client().await;
    let bob = on_b
        .track(TrackRequest::new(topic, "bob"))
        .await
        .expect("bob joins on b");
    let mut ann = a.spawn(&["join", topic, "--key", "ann", "--json"]);
    let ann_joined: Value = ann.json().await;
    assert_eq!(ann_joined["ok"], true, "{ann_joined}");
    assert_eq!(ann_joined["position"], 2, "{ann_joined}");
    let (on_c, mut c_events) = c.client().await;
    let carol = on_c
        .track(TrackRequest::new(topic, "carol"))
        .await
        .expect("carol joins on c");
    on_c.subscribe(topic).await.expect("c watches the topic");
    on_b.subscribe(topic).await.expect("b watches the topic");
    let before = View {
        seqs: [
            (owner.phx_ref.clone(), owner.seq),
            (bob.phx_ref.clone(), bob.seq),
            (
                ann_joined["ref"].as_str().expect("a ref").to_owned(),
                ann_joined["seq"].as_u64().expect("a seq"),
            ),
            (carol.phx_ref.clone(), carol.seq),
        ]
        .into_iter()
        .collect(),
        owner: Some(owner.phx_ref.clone()),
    };
    listed_everywhere(&[&a, &b, &c], topic, &before).await;
    drop(on_a);

    a.stop().await;
    a.wait_for_log(&["2 keys of this host's entries handed over to lease"])
        .await;
    let args = cluster_args(&etcd, "a", RESUME_GRACE);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    a.start_again(&args).await;
    a.wait_for_log(&["2 entries of shared topics keep their places", "0 found"])
        .await;
    wait_for_lease(&a, "live").await;

    // ann's `join` resumed its entry; the editor's entry continued.
    let (on_a, _a_events) = a.client().await;
    eventually("ann to resume on the restarted a", async || {
        on_a.status().await.expect("status").awaiting_resume == 0
    })
    .await;
    listed_everywhere(&[&a, &b, &c], topic, &before).await;

    // Nobody on another host saw a's entries leave: the next change c is
    // told of is the one made now.
    on_b.track(TrackRequest::new(topic, "zed"))
        .await
        .expect("zed joins on b");
    let seen = next_event(&mut c_events, |event| match event {
        Event::PresenceDiff {
            topic: on, payload, ..
        } if on == topic => Some(payload),
        _ => None,
    })
    .await;
    assert!(seen.leaves.is_empty(), "{seen:?}");
    assert!(seen.joins.contains_key("zed"), "{seen:?}");

    // The restarted a still knows its entries as its own: the editor's
    // exit ends its entry on every host, and bob owns.
    signal(editor_pid, nix::sys::signal::Signal::SIGKILL);
    let _ = editor.wait().await;
    let promoted = next_leaves(&mut c_events, topic).await;
    assert_eq!(
        promoted.get(&owner.phx_ref),
        Some(&LeaveReason::PidExit),
        "{promoted:?}"
    );
    eventually("bob to own on every host", async || {
        let mut all = true;
        for daemon in [&a, &b, &c] {
            all &= View::listed(daemon, topic).await.owner.as_deref() == Some(&bob.phx_ref);
        }
        all
    })
    .await;
    ann.sigkill();
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_host_killed_then_restarted_queues_its_entries_again_at_the_back() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let (mut a, b) = (
        host(&etcd, "a", false, RESUME_GRACE).await,
        host(&etcd, "b", false, RESUME_GRACE).await,
    );
    let topic = "shared:doc";

    let (on_a, _a_events) = a.client().await;
    let (mut editor, editor_pid, alice) = editor_process_joins(&on_a, topic).await;
    let (on_b, mut b_events) = b.client().await;
    let bob = on_b
        .track(TrackRequest::new(topic, "bob"))
        .await
        .expect("bob joins on b");
    on_b.subscribe(topic).await.expect("b watches the topic");
    drop(on_a);

    // Killed, a hands nothing over; the daemon started next finds its
    // predecessor's claim, revokes that lease (a's keys go with it, as
    // after a crash), and queues the editor's entry again at the back.
    a.crash().await;
    let args = cluster_args(&etcd, "a", RESUME_GRACE);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    a.start_again(&args).await;
    // b sees the entry leave, then come back under the same ref (in one
    // diff or two, as its watch delivers the two revisions).
    let (reason, seq) = within("alice to leave b and join again", async {
        let (mut reason, mut seq) = (None, None);
        while reason.is_none() || seq.is_none() {
            let event = b_events.recv().await.expect("the event stream is open");
            if let Event::PresenceDiff {
                topic: on,
                payload,
                reasons,
                ..
            } = event
                && on == topic
            {
                reason = reason.or(reasons.get(&alice.phx_ref).copied());
                let joined = payload.joins.get("alice").and_then(|p| p.metas.first());
                seq = seq.or(joined
                    .filter(|meta| meta.phx_ref == alice.phx_ref)
                    .map(|meta| meta.seq));
            }
        }
        (reason, seq.unwrap_or_default())
    })
    .await;
    assert_eq!(reason, Some(LeaveReason::HostLost));
    assert!(seq > bob.seq, "{seq} after bob's {}", bob.seq);
    let after = View {
        seqs: [(bob.phx_ref.clone(), bob.seq), (alice.phx_ref.clone(), seq)]
            .into_iter()
            .collect(),
        owner: Some(bob.phx_ref.clone()),
    };
    listed_everywhere(&[&a, &b], topic, &after).await;
    signal(editor_pid, nix::sys::signal::Signal::SIGKILL);
    let _ = editor.wait().await;
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_stopped_host_that_does_not_come_back_loses_its_entries_after_the_resume_grace() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let grace = Duration::from_secs(1);
    let (mut a, b) = (
        host(&etcd, "a", false, grace).await,
        host(&etcd, "b", false, grace).await,
    );
    let topic = "shared:doc";
    let (on_a, _a_events) = a.client().await;
    let owner = on_a
        .track(TrackRequest::new(topic, "alice"))
        .await
        .expect("alice joins on a");
    let (on_b, mut b_events) = b.client().await;
    let bob = on_b
        .track(TrackRequest::new(topic, "bob"))
        .await
        .expect("bob joins on b");
    on_b.subscribe(topic).await.expect("b watches the topic");

    // alice's connection is open as a stops: closed first, it would take
    // her entry with it (reason `closed`) before anything is handed over.
    let stopped = Instant::now();
    a.stop().await;
    drop(on_a);
    let reasons = next_leaves(&mut b_events, topic).await;
    let waited = stopped.elapsed();
    assert_eq!(reasons.get(&owner.phx_ref), Some(&LeaveReason::HostLost));
    // Kept for the grace (etcd ends the hand-over lease then, or up to
    // half a second later), not revoked with the daemon's own lease.
    assert!(
        waited >= grace && waited < grace + TTL,
        "a's entry left {waited:?} after it stopped, with a resume grace of {grace:?}"
    );
    let after = View {
        seqs: [(bob.phx_ref.clone(), bob.seq)].into_iter().collect(),
        owner: Some(bob.phx_ref.clone()),
    };
    assert_eq!(View::listed(&b, topic).await, after);
}
