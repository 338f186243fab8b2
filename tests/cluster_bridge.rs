//! The bridge from etcd to the core's input (`daemon::cluster::bridge`)
//! against a real etcd on loopback (`common::etcd`): the entries already
//! there arrive first, as puts in order of creation; an entry deleted with
//! its reason arrives as a delete with that reason; one whose lease ended
//! arrives as a delete without one, which the core reads as its host lost.
//! And without etcd: a bridge that cannot reach it keeps trying, and says
//! why in its status.

use std::sync::Arc;
use std::time::Duration;

use presenced::core::registry::{ClusterChanges, ClusterEvent};
use presenced::daemon::cluster::record::{Departure, KeySpace, RECORD_VERSION, Record};
use presenced::daemon::cluster::{Bridge, BridgeSettings, Creation, Gateway, LeaseId};
use presenced::protocol::{Actor, LeaveReason, Lifetime, Limits};
use serde_json::Map;
use tokio::sync::mpsc;

use crate::common::etcd::EtcdCluster;
use crate::common::{needs_program, within};

/// The per-attempt timeout the tests give their gateways.
const R: Duration = Duration::from_millis(300);

const TOPIC: &str = "file:/srv/site/a.md";

fn keys() -> KeySpace {
    KeySpace::new("/presence")
}

fn record(id: &str, key: &str) -> Record {
    Record {
        v: RECORD_VERSION,
        key: key.into(),
        phx_ref: id.into(),
        phx_ref_prev: None,
        meta: Map::new(),
        joined_at: 1_700_000_000_000,
        pid: 4242,
        uid: 1000,
        user: key.into(),
        host: "web-1".into(),
        lifetime: Lifetime::Connection,
    }
}

/// Creates the entry `id` of [`TOPIC`] on `lease`; its create revision.
async fn create(gateway: &Gateway, id: &str, key: &str, lease: LeaseId) -> u64 {
    let creation = gateway
        .create_if_absent(
            &keys().topic(TOPIC),
            &keys().entry(TOPIC, id),
            &record(id, key).encode(),
            lease,
        )
        .await
        .expect("the transaction");
    match creation {
        Creation::Created(created) => {
            u64::try_from(created.create_revision).expect("a revision above zero")
        }
        Creation::Exists => panic!("{id} existed already"),
    }
}

/// The next changes the bridge sends.
async fn next(changes: &mut mpsc::UnboundedReceiver<ClusterChanges>, what: &str) -> ClusterChanges {
    within(what, changes.recv())
        .await
        .expect("the bridge runs while its sink is open")
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn the_listing_arrives_as_puts_then_deletes_with_their_reason_or_none() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(1);
    let gateway = Arc::new(Gateway::new(etcd.endpoints(), R).expect("http://host:port"));
    let stays = gateway
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let ends = gateway
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let alice = create(&gateway, "web-1:p1", "alice", stays.id).await;
    let bob = create(&gateway, "web-1:p2", "bob", stays.id).await;
    let carol = create(&gateway, "web-1:p3", "carol", ends.id).await;

    let (sink, mut changes) = mpsc::unbounded_channel();
    let bridge = Bridge::spawn(
        gateway.clone(),
        BridgeSettings {
            keys: keys(),
            limits: Limits::default(),
            check_every: Duration::from_millis(250),
            retry_pause: Duration::from_millis(100),
        },
        sink,
    );

    let listed = next(&mut changes, "the listing").await;
    let puts: Vec<(&str, u64, i64, &str, bool)> = listed
        .events
        .iter()
        .map(|event| match event {
            ClusterEvent::Put {
                id,
                create_revision,
                lease,
                record,
                topic,
            } => {
                assert_eq!(topic, TOPIC);
                (
                    id.as_str(),
                    *create_revision,
                    *lease,
                    record.key.as_str(),
                    record.readable,
                )
            }
            ClusterEvent::Delete { .. } => panic!("a delete in the listing: {event:?}"),
        })
        .collect();
    assert_eq!(
        puts,
        [
            ("web-1:p1", alice, stays.id.0, "alice", true),
            ("web-1:p2", bob, stays.id.0, "bob", true),
            ("web-1:p3", carol, ends.id.0, "carol", true),
        ]
    );
    assert_eq!(listed.revision, carol);

    let root = Actor {
        uid: 0,
        user: "root".into(),
        pid: 77,
    };
    let departure = Departure {
        v: RECORD_VERSION,
        reason: LeaveReason::Untrack,
        by: Some(root.clone()),
        host: "web-1".into(),
    };
    let deleted = gateway
        .delete_with_reason(
            &keys().entry(TOPIC, "web-1:p1"),
            &keys().reason(TOPIC, "web-1:p1"),
            &departure.encode(),
            stays.id,
        )
        .await
        .expect("a delete with its reason");
    assert!(deleted.existed);
    assert_eq!(
        next(&mut changes, "alice's delete").await,
        ClusterChanges {
            revision: u64::try_from(deleted.revision).expect("a revision above zero"),
            events: vec![ClusterEvent::Delete {
                topic: TOPIC.into(),
                id: "web-1:p1".into(),
                reason: Some((LeaveReason::Untrack, Some(root))),
            }],
        }
    );

    gateway.revoke(ends.id).await.expect("a revocation");
    let lost = next(&mut changes, "carol's delete").await;
    assert_eq!(
        lost.events,
        [ClusterEvent::Delete {
            topic: TOPIC.into(),
            id: "web-1:p3".into(),
            reason: None,
        }]
    );

    let status = bridge.status().borrow().clone();
    assert_eq!(status.revision, Some(lost.revision));
    assert_eq!(status.watching, Some(etcd.endpoint(0)));
    assert_eq!(status.error, None);
}

#[tokio::test]
async fn a_bridge_that_cannot_reach_etcd_says_so_in_its_status_and_sends_nothing() {
    // A port nothing listens on: connections to it are refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let gateway =
        Arc::new(Gateway::new([format!("http://127.0.0.1:{port}")], R).expect("http://host:port"));
    let (sink, mut changes) = mpsc::unbounded_channel();
    let bridge = Bridge::spawn(
        gateway,
        BridgeSettings {
            keys: keys(),
            limits: Limits::default(),
            check_every: Duration::from_millis(250),
            retry_pause: Duration::from_millis(50),
        },
        sink,
    );
    let mut status = bridge.status();
    let failed = within(
        "the failed start in the status",
        status.wait_for(|status| status.error.is_some()),
    )
    .await
    .expect("the bridge runs")
    .clone();
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains(&port.to_string())),
        "{failed:?}"
    );
    assert_eq!((failed.revision, failed.watching), (None, None));
    assert!(changes.try_recv().is_err());
}
