//! The etcd gateway client (`daemon::cluster::gateway`) against a real
//! etcd on loopback (`common::etcd`): leases, the create-if-absent
//! transaction and the order it reads, a delete with its reason, a move
//! to another lease, watches across members, and a stopped member. Each
//! test starts a cluster of its own.

use std::time::{Duration, Instant};

use presenced::daemon::cluster::{
    Creation, Error, Event, Gateway, Kv, LeaseId, MAX_TXN_OPS, Renewal, Rewrite, WatchMessage,
};

use crate::common::etcd::EtcdCluster;
use crate::common::{needs_program, within};

/// The per-attempt timeout the tests give their gateways.
const R: Duration = Duration::from_millis(300);

fn gateway(endpoints: impl IntoIterator<Item = String>) -> Gateway {
    Gateway::new(endpoints, R).expect("the endpoints are http://host:port")
}

/// A gateway to every member of `etcd`, member `first` first.
fn first_then_others(etcd: &EtcdCluster, first: usize) -> Gateway {
    let others = etcd.endpoints().into_iter().enumerate();
    let others = others
        .filter(|&(index, _)| index != first)
        .map(|(_, url)| url);
    gateway(std::iter::once(etcd.endpoint(first)).chain(others))
}

/// Creates `key` under `prefix`, which must be absent.
async fn create(
    gateway: &Gateway,
    prefix: &str,
    key: &str,
    lease: LeaseId,
) -> presenced::daemon::cluster::Created {
    let key = format!("{prefix}{key}");
    match gateway
        .create_if_absent(prefix.as_bytes(), key.as_bytes(), b"{}", lease)
        .await
        .expect("the transaction")
    {
        Creation::Created(created) => created,
        Creation::Exists => panic!("{key} existed already"),
    }
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_lease_is_granted_and_renewed_and_a_ttl_below_the_minimum_refused() {
    needs_program("etcd", "etcd-server");
    // One member with etcd's default election timeout, 1 s: its minimum
    // TTL is 1.5 s, rounded up to 2 s.
    let etcd = EtcdCluster::start_with(1, Duration::from_millis(100), Duration::from_secs(1));
    let gateway = gateway(etcd.endpoints());

    match gateway.grant(Duration::from_secs(1)).await {
        Err(Error::TtlRaised { requested, granted }) => {
            assert_eq!(requested, Duration::from_secs(1));
            assert_eq!(granted, Duration::from_secs(2));
        }
        other => panic!("a 1 s lease below the 2 s minimum: {other:?}"),
    }
    assert!(matches!(
        gateway.grant(Duration::from_millis(2500)).await,
        Err(Error::Refused { .. })
    ));

    let lease = gateway
        .grant(Duration::from_secs(3))
        .await
        .expect("a grant");
    assert_eq!(lease.ttl, Duration::from_secs(3));
    assert_eq!(
        gateway.keep_alive(lease.id).await.expect("a renewal"),
        Renewal::Alive {
            ttl: Duration::from_secs(3)
        }
    );
    gateway.revoke(lease.id).await.expect("a revoke");
    assert_eq!(
        gateway.keep_alive(lease.id).await.expect("a renewal"),
        Renewal::Gone
    );
    // Revoking a lease that is gone is not an error.
    gateway.revoke(lease.id).await.expect("a second revoke");
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn clients_on_different_members_agree_on_owner_and_positions() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let a = gateway([etcd.endpoint(0)]);
    let b = gateway([etcd.endpoint(1)]);
    let lease_a = a.grant(Duration::from_secs(10)).await.expect("a grant").id;
    let lease_b = b.grant(Duration::from_secs(10)).await.expect("a grant").id;
    let prefix = "/presence/t/doc/";

    let first = create(&a, prefix, "a1", lease_a).await;
    let second = create(&b, prefix, "b1", lease_b).await;
    let third = create(&a, prefix, "a2", lease_a).await;
    // Another topic's keys are not in this one's queue.
    create(&b, "/presence/t/doc2/", "b1", lease_b).await;
    let fourth = create(&b, prefix, "b2", lease_b).await;

    let created = [&first, &second, &third, &fourth];
    for (index, created) in created.iter().enumerate() {
        assert_eq!(created.position, index as u64 + 1, "{created:?}");
        assert_eq!(created.owner.key, format!("{prefix}a1").as_bytes());
        assert_eq!(created.owner.create_revision, first.create_revision);
        assert_eq!(created.create_revision, created.revision);
    }
    assert!(
        created
            .windows(2)
            .all(|pair| pair[0].create_revision < pair[1].create_revision)
    );

    // Both members list the same queue, in order of creation.
    let (_, listed_a) = a.range_prefix(prefix.as_bytes()).await.expect("a range");
    let (_, listed_b) = b.range_prefix(prefix.as_bytes()).await.expect("a range");
    assert_eq!(listed_a, listed_b);
    let keys: Vec<String> = listed_a
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert_eq!(
        keys,
        ["a1", "b1", "a2", "b2"].map(|key| format!("{prefix}{key}"))
    );
    let revisions: Vec<i64> = listed_a.iter().map(|kv| kv.create_revision).collect();
    assert_eq!(revisions, created.map(|created| created.create_revision));
    assert_eq!(listed_a[1].lease, lease_b.0);

    // A key that exists is not created again; a rewrite keeps its place.
    let again = a
        .create_if_absent(
            prefix.as_bytes(),
            format!("{prefix}b1").as_bytes(),
            b"{}",
            lease_a,
        )
        .await
        .expect("the transaction");
    assert_eq!(again, Creation::Exists);
    let key_b1 = format!("{prefix}b1");
    assert!(matches!(
        a.rewrite(key_b1.as_bytes(), br#"{"x":1}"#, lease_b).await,
        Ok(Rewrite::Rewritten { .. })
    ));
    assert_eq!(
        a.rewrite(format!("{prefix}none").as_bytes(), b"{}", lease_b)
            .await
            .expect("the transaction"),
        Rewrite::Missing
    );
    let (_, listed) = b.range_prefix(prefix.as_bytes()).await.expect("a range");
    assert_eq!(listed[1].create_revision, second.create_revision);
    assert_eq!(listed[1].version, 2);
    assert_eq!(listed[1].value, br#"{"x":1}"#);

    // The owner leaves: the next by create revision owns the topic.
    let deleted = a
        .delete(format!("{prefix}a1").as_bytes())
        .await
        .expect("a delete");
    assert!(deleted.existed);
    let fifth = create(&b, prefix, "b3", lease_b).await;
    assert_eq!(fifth.position, 4);
    assert_eq!(fifth.owner.key, key_b1.as_bytes());
    assert!(
        !a.delete(format!("{prefix}a1").as_bytes())
            .await
            .expect("a delete")
            .existed
    );
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_watch_on_one_member_sees_a_put_and_a_delete_through_another() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let writer = gateway([etcd.endpoint(0)]);
    let watcher = gateway([etcd.endpoint(2)]);
    let prefix = "/presence/t/watched/";
    let (revision, listed) = watcher
        .range_prefix(prefix.as_bytes())
        .await
        .expect("a range");
    assert!(listed.is_empty());
    let mut watch = watcher
        .watch(prefix.as_bytes(), revision + 1)
        .await
        .expect("a watch");
    assert_eq!(watch.endpoint(), etcd.endpoint(2));

    let lease = writer
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let created = create(&writer, prefix, "alice", lease.id).await;
    // A key outside the prefix is not seen.
    create(&writer, "/presence/t/other/", "bob", lease.id).await;
    let deleted = writer
        .delete(format!("{prefix}alice").as_bytes())
        .await
        .expect("a delete");

    let put = within("the put", watch.next()).await.expect("a message");
    let Some(WatchMessage::Events { revision, events }) = put else {
        panic!("not the put: {put:?}");
    };
    assert_eq!(revision, created.revision);
    let [Event::Put(kv)] = events.as_slice() else {
        panic!("not one put: {events:?}");
    };
    assert_eq!(kv.key, format!("{prefix}alice").as_bytes());
    assert_eq!(kv.value, b"{}");
    assert_eq!(kv.create_revision, created.create_revision);
    assert_eq!(kv.lease, lease.id.0);

    let delete = within("the delete", watch.next()).await.expect("a message");
    assert_eq!(
        delete,
        Some(WatchMessage::Events {
            revision: deleted.revision,
            events: vec![Event::Delete {
                key: format!("{prefix}alice").into_bytes(),
                revision: deleted.revision
            }]
        })
    );
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_watch_from_a_compacted_revision_is_told_so() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let client = gateway(etcd.endpoints());
    let prefix = "/presence/t/compacted/";
    let lease = client
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let first = create(&client, prefix, "a", lease.id).await;
    create(&client, prefix, "b", lease.id).await;
    let last = create(&client, prefix, "c", lease.id).await;
    etcd.compact(last.revision);

    let mut watch = client
        .watch(prefix.as_bytes(), first.revision)
        .await
        .expect("a watch");
    let message = within("the compaction", watch.next())
        .await
        .expect("a message");
    assert_eq!(
        message,
        Some(WatchMessage::Compacted {
            compact_revision: last.revision
        })
    );
    // From the compacted revision on, the watch works.
    let mut watch = client
        .watch(prefix.as_bytes(), last.revision)
        .await
        .expect("a watch");
    let message = within("the last put", watch.next())
        .await
        .expect("a message");
    assert!(
        matches!(message, Some(WatchMessage::Events { revision, .. }) if revision == last.revision),
        "{message:?}"
    );
}

/// A transaction moves on past a member it cannot connect to, since it
/// surely did not reach etcd; one that timed out on a stopped member may
/// have, so it is not sent again.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_transaction_moves_past_a_dead_member_but_not_past_a_silent_one() {
    needs_program("etcd", "etcd-server");
    let mut etcd = EtcdCluster::start(3);
    // Followers, so that neither costs an election: one stopped, then
    // continued; the other killed.
    let leader = etcd.leader();
    let (silent, dead) = ((leader + 1) % 3, (leader + 2) % 3);
    let prefix = "/presence/t/moved/";
    let lease = gateway(etcd.endpoints())
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");

    etcd.stop(silent);
    let client = gateway([silent, leader, dead].map(|index| etcd.endpoint(index)));
    let attempt = Instant::now();
    let result = client
        .create_if_absent(
            prefix.as_bytes(),
            format!("{prefix}a").as_bytes(),
            b"{}",
            lease.id,
        )
        .await;
    let took = attempt.elapsed();
    assert!(
        matches!(&result, Err(Error::Uncertain { failure }) if matches!(**failure, Error::Timeout { .. })),
        "{result:?}"
    );
    assert!(took < R + Duration::from_millis(200), "{took:?}");
    // The next call goes elsewhere.
    assert_eq!(client.current_endpoint(), etcd.endpoint(leader));
    etcd.resume(silent);
    etcd.wait_healthy(silent);

    etcd.kill(dead);
    let client = gateway([dead, leader, silent].map(|index| etcd.endpoint(index)));
    // Another prefix: the silent member, continued, may yet commit "a".
    let prefix = "/presence/t/moved-on/";
    let created = create(&client, prefix, "b", lease.id).await;
    assert_eq!(created.position, 1);
    assert_eq!(created.owner.key, format!("{prefix}b").as_bytes());
    assert_eq!(client.current_endpoint(), etcd.endpoint(leader));
}

/// How often the renewal tests renew.
const PERIOD: Duration = Duration::from_millis(250);

/// A stopped follower costs one attempt: the renewal after it moves to
/// the next member, which answers at once. So no gap between renewals is
/// longer than R + the period + one election timeout (the bound the
/// fencing design asks for, with an election to spare).
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn renewals_go_on_through_a_stopped_follower_and_stop_with_the_only_one() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let leader = etcd.leader();
    let follower = (leader + 1) % 3;
    let longest = renew_through_a_stop(&etcd, follower).await;
    let bound = R + PERIOD + etcd.election_timeout();
    assert!(longest <= bound, "a gap of {longest:?}, over {bound:?}");
}

/// A stopped leader costs more: the attempt on it times out (R), and a
/// follower asked next forwards the renewal to the stopped leader until a
/// new one is elected, which raft does within two election timeouts (each
/// member's is drawn from [E, 2E)); until then, that attempt may time out
/// too (R). The third attempt finds the new leader. So the longest gap is
/// the period + the greater of 2R and 2E, plus a round trip.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn renewals_go_on_through_a_stopped_leader_and_stop_with_the_only_one() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let leader = etcd.leader();
    let longest = renew_through_a_stop(&etcd, leader).await;
    let bound = PERIOD + (2 * R).max(2 * etcd.election_timeout()) + Duration::from_millis(100);
    assert!(longest <= bound, "a gap of {longest:?}, over {bound:?}");
}

/// Renews a lease every [`PERIOD`] through a client given every member,
/// `stopped` first; SIGSTOPs `stopped` after a second, and renews for three
/// more. Meanwhile a client given only `stopped` must fail within R.
/// Returns the longest gap between two renewals.
async fn renew_through_a_stop(etcd: &EtcdCluster, stopped: usize) -> Duration {
    let all = first_then_others(etcd, stopped);
    let only = gateway([etcd.endpoint(stopped)]);
    let lease = all.grant(Duration::from_secs(5)).await.expect("a grant");

    let started = Instant::now();
    let mut renewed = vec![started];
    let mut failures = Vec::new();
    let mut stopped_at = None;
    let mut only = Some(only);
    let mut only_probe = None;
    while started.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(PERIOD).await;
        if let Some(only) = only.take_if(|_| started.elapsed() > Duration::from_secs(1)) {
            etcd.stop(stopped);
            stopped_at = Some(Instant::now());
            // The client with only the stopped member, alongside.
            only_probe = Some(tokio::spawn(async move {
                let attempt = Instant::now();
                let result = only.keep_alive(lease.id).await;
                (attempt.elapsed(), result)
            }));
        }
        match all.keep_alive(lease.id).await {
            Ok(Renewal::Alive { .. }) => renewed.push(Instant::now()),
            Ok(Renewal::Gone) => panic!("the lease was lost"),
            Err(error) => failures.push(format!("{:?}: {error}", started.elapsed())),
        }
    }
    let (only_failed_after, result) = only_probe
        .expect("the member was stopped")
        .await
        .expect("the probe ended");
    etcd.resume(stopped);

    let stopped_at = stopped_at.expect("the member was stopped");
    let longest = renewed
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .expect("renewals");
    let renewed_after_stop = renewed.iter().filter(|&&at| at > stopped_at).count();
    println!(
        "member {stopped} stopped: {} renewals ({renewed_after_stop} after the \
         stop), longest gap {longest:?}; the one-endpoint client failed after \
         {only_failed_after:?}; failed renewals: {failures:?}",
        renewed.len(),
    );
    assert!(
        matches!(&result, Err(Error::Unavailable { failures })
            if matches!(failures.as_slice(), [Error::Timeout { .. }])),
        "{result:?}"
    );
    assert!(
        only_failed_after >= R && only_failed_after < R + Duration::from_millis(200),
        "the one-endpoint client failed after {only_failed_after:?}, R is {R:?}"
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        renewed_after_stop >= 5,
        "{renewed_after_stop} renewals after the stop"
    );
    assert_ne!(all.current_endpoint(), etcd.endpoint(stopped));
    longest
}

/// A delete and its reason are one transaction: a watcher of both
/// prefixes reads them in one message, at one revision. A second delete of
/// the same key writes no reason.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_delete_and_its_reason_reach_a_watcher_together() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let writer = gateway([etcd.endpoint(0)]);
    let watcher = gateway([etcd.endpoint(1)]);
    let lease = writer
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let entries = "/presence/t/reasons/";
    let created = create(&writer, entries, "h:p1", lease.id).await;
    let mut watch = watcher
        .watch(b"/presence/", created.revision + 1)
        .await
        .expect("a watch");

    let key = format!("{entries}h:p1");
    let reason_key = "/presence/r/reasons/h:p1";
    let deleted = writer
        .delete_with_reason(key.as_bytes(), reason_key.as_bytes(), b"untrack", lease.id)
        .await
        .expect("the delete");
    assert!(deleted.existed);
    let message = within("the delete and its reason", watch.next())
        .await
        .expect("a message");
    let Some(WatchMessage::Events { revision, events }) = message else {
        panic!("not the delete: {message:?}");
    };
    assert_eq!(revision, deleted.revision);
    let [
        Event::Delete {
            key: gone,
            revision: deleted_at,
        },
        Event::Put(reason),
    ] = events.as_slice()
    else {
        panic!("not a delete and a put: {events:?}");
    };
    assert_eq!(gone, key.as_bytes());
    assert_eq!(*deleted_at, deleted.revision);
    assert_eq!(reason.key, reason_key.as_bytes());
    assert_eq!(reason.value, b"untrack");
    assert_eq!(reason.mod_revision, deleted.revision);
    assert_eq!(reason.lease, lease.id.0);

    let again = writer
        .delete_with_reason(key.as_bytes(), b"/presence/r/reasons/again", b"x", lease.id)
        .await
        .expect("the second delete");
    assert!(!again.existed);
    assert_eq!(again.revision, deleted.revision, "nothing was written");
    assert_eq!(
        writer
            .get(b"/presence/r/reasons/again")
            .await
            .expect("a read")
            .1,
        None
    );
}

/// Keys moved to another lease keep their values and create revisions,
/// and outlive the first lease; more keys than one transaction takes are
/// moved in chunks; a key that left before the move is not brought back,
/// nor is one deleted and created again since it was read.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn keys_moved_to_another_lease_keep_their_places_and_outlive_the_first() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let client = gateway(etcd.endpoints());
    let first = client
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let prefix = "/presence/t/moved/";
    // Enough for several transactions: the first two each hold a key that
    // fails its check (and are moved a key at a time), the rest none.
    let count = 2 * MAX_TXN_OPS + 10;
    for index in 0..count {
        create(&client, prefix, &format!("h:p{index}"), first.id).await;
    }
    let (_, before) = client
        .range_prefix(prefix.as_bytes())
        .await
        .expect("a range");
    assert_eq!(before.len(), count);

    // One key leaves, and another is deleted and created again, between
    // the read and the move.
    let gone = before[3].key.clone();
    client.delete(&gone).await.expect("a delete");
    let reborn = before[MAX_TXN_OPS / 2 + 5].key.clone();
    client.delete(&reborn).await.expect("a delete");
    let reborn_name = String::from_utf8_lossy(&reborn[prefix.len()..]).into_owned();
    create(&client, prefix, &reborn_name, first.id).await;

    let second = client
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let moved = client
        .move_to_lease(&before, second.id)
        .await
        .expect("the move");
    assert_eq!(moved.moved, count - 2);
    assert_eq!(moved.missing, vec![gone.clone(), reborn.clone()]);

    // The same move sent again, late (as an attempt that timed out may
    // reach etcd after the keys moved on), finds them on another lease
    // than the one read, and leaves them where they are.
    let third = client
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let late = client
        .move_to_lease(&before, third.id)
        .await
        .expect("the late move");
    assert_eq!(late.moved, 0);
    assert_eq!(late.missing.len(), count);

    client.revoke(first.id).await.expect("a revoke");
    client.revoke(third.id).await.expect("a revoke");
    let (_, after) = client
        .range_prefix(prefix.as_bytes())
        .await
        .expect("a range");
    let kept: Vec<&Kv> = before
        .iter()
        .filter(|kv| kv.key != gone && kv.key != reborn)
        .collect();
    assert_eq!(
        after.len(),
        kept.len(),
        "the reborn key went with the first lease"
    );
    for (was, is) in kept.iter().zip(&after) {
        assert_eq!(is.key, was.key);
        assert_eq!(is.value, was.value);
        assert_eq!(is.create_revision, was.create_revision);
        assert_eq!(is.lease, second.id.0);
    }
}

/// A read of one key is of that key only, not of the keys it begins.
#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_read_of_one_key_finds_it_and_only_it() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(1);
    let client = gateway(etcd.endpoints());
    let lease = client
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let prefix = "/presence/t/read/";
    let created = create(&client, prefix, "h:p12", lease.id).await;
    let (_, short) = client
        .get(format!("{prefix}h:p1").as_bytes())
        .await
        .expect("a read");
    assert_eq!(short, None);
    let (revision, found) = client
        .get(format!("{prefix}h:p12").as_bytes())
        .await
        .expect("a read");
    assert!(revision >= created.revision);
    let found = found.expect("the key");
    assert_eq!(found.create_revision, created.create_revision);
    assert_eq!(found.value, b"{}");
}
