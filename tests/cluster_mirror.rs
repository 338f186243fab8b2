//! The mirror of a prefix (`daemon::cluster::mirror`) against a real etcd
//! on loopback (`common::etcd`): changes made by another client arrive in
//! order; a compaction past a broken watch makes the mirror list again and
//! report exactly the difference; a stopped member's silent watch is left
//! for another member once the gateway moves on, and nothing is lost or
//! seen twice. Each test starts a cluster of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use presenced::daemon::cluster::{
    Creation, Error, Event, Gateway, Kv, LeaseId, PrefixMirror, Rewrite, Snapshot, Update,
};

use crate::common::etcd::EtcdCluster;
use crate::common::{needs_program, within};

/// The per-attempt timeout the tests give their gateways.
const R: Duration = Duration::from_millis(300);

/// How often the mirrors look whether their gateway moved on.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The prefix mirrored: every topic's.
const PREFIX: &str = "/presence/t/";

fn gateway(endpoints: impl IntoIterator<Item = String>) -> Arc<Gateway> {
    Arc::new(Gateway::new(endpoints, R).expect("the endpoints are http://host:port"))
}

/// A gateway to every member of `etcd`, member `first` first.
fn first_then_others(etcd: &EtcdCluster, first: usize) -> Arc<Gateway> {
    let others = etcd.endpoints().into_iter().enumerate();
    let others = others
        .filter(|&(index, _)| index != first)
        .map(|(_, url)| url);
    gateway(std::iter::once(etcd.endpoint(first)).chain(others))
}

async fn start(gateway: &Arc<Gateway>) -> (PrefixMirror, Snapshot) {
    within(
        "the mirror to start",
        PrefixMirror::start(gateway.clone(), PREFIX.as_bytes().to_vec(), CHECK_EVERY),
    )
    .await
    .expect("the mirror lists and watches")
}

/// What etcd holds under [`PREFIX`] now, read through `gateway`.
async fn listing(gateway: &Gateway) -> Snapshot {
    let (revision, kvs) = gateway
        .range_prefix(PREFIX.as_bytes())
        .await
        .expect("a range");
    Snapshot {
        revision,
        entries: kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
    }
}

/// The full key of `name` in the topic `doc`.
fn key(name: &str) -> Vec<u8> {
    format!("{PREFIX}doc/{name}").into_bytes()
}

/// Creates `name` in the topic `doc` (it must be absent); its revision.
async fn create(gateway: &Gateway, name: &str, lease: LeaseId) -> i64 {
    let topic = format!("{PREFIX}doc/");
    match gateway
        .create_if_absent(topic.as_bytes(), &key(name), b"{}", lease)
        .await
        .expect("the transaction")
    {
        Creation::Created(created) => created.revision,
        Creation::Exists => panic!("{name} existed already"),
    }
}

async fn rewrite(gateway: &Gateway, name: &str, value: &[u8], lease: LeaseId) -> i64 {
    match gateway
        .rewrite(&key(name), value, lease)
        .await
        .expect("the transaction")
    {
        Rewrite::Rewritten { revision } => revision,
        Rewrite::Missing => panic!("{name} is not there to rewrite"),
    }
}

async fn delete(gateway: &Gateway, name: &str) -> i64 {
    let deleted = gateway.delete(&key(name)).await.expect("a delete");
    assert!(deleted.existed, "{name} was not there to delete");
    deleted.revision
}

/// An event as the tests compare them: what happened, to which key, when.
fn summary(event: &Event) -> (&'static str, String, i64) {
    match event {
        Event::Put(kv) => (
            "put",
            String::from_utf8_lossy(&kv.key).into_owned(),
            kv.mod_revision,
        ),
        Event::Delete { key, revision } => (
            "delete",
            String::from_utf8_lossy(key).into_owned(),
            *revision,
        ),
    }
}

fn put(name: &str, revision: i64) -> (&'static str, String, i64) {
    (
        "put",
        String::from_utf8_lossy(&key(name)).into_owned(),
        revision,
    )
}

fn deleted(name: &str, revision: i64) -> (&'static str, String, i64) {
    (
        "delete",
        String::from_utf8_lossy(&key(name)).into_owned(),
        revision,
    )
}

/// Takes the mirror's updates until it holds `revision`, each one a
/// [`Update::Changes`] whose revision is its last event's; returns the
/// events of each message.
async fn changes_until(mirror: &mut PrefixMirror, revision: i64) -> Vec<Vec<Event>> {
    within(&format!("changes up to revision {revision}"), async {
        let mut messages = Vec::new();
        loop {
            match mirror.next().await {
                Update::Changes {
                    revision: reached,
                    events,
                } => {
                    assert_eq!(
                        events.iter().map(|event| summary(event).2).max(),
                        Some(reached),
                        "{events:?}"
                    );
                    assert_eq!(mirror.state().revision, reached);
                    messages.push(events);
                    if reached >= revision {
                        return messages;
                    }
                }
                other => panic!("not changes: {other:?}"),
            }
        }
    })
    .await
}

/// The mirror holds what a fresh listing finds (at its revision or later,
/// when the last writes were outside the prefix).
async fn assert_matches_etcd(mirror: &PrefixMirror, gateway: &Gateway) {
    let listed = listing(gateway).await;
    assert_eq!(mirror.state().entries, listed.entries);
    assert!(mirror.state().revision <= listed.revision);
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn changes_by_another_client_arrive_in_order_and_the_mirror_matches_a_listing() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let writer = gateway([etcd.endpoint(0)]);
    let first = writer
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    let second = writer
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant");
    create(&writer, "a", first.id).await;
    create(&writer, "b", second.id).await;

    let mirror_gateway = first_then_others(&etcd, 2);
    let (mut mirror, snapshot) = start(&mirror_gateway).await;
    assert_eq!(mirror.watching(), Some(etcd.endpoint(2).as_str()));
    let listed = listing(&writer).await;
    assert_eq!(snapshot, listed);
    assert_eq!(mirror.state(), &snapshot);
    let names: Vec<&[u8]> = snapshot
        .in_creation_order()
        .into_iter()
        .map(|kv| kv.key.as_slice())
        .collect();
    assert_eq!(names, [key("a"), key("b")]);

    let c = create(&writer, "c", first.id).await;
    let a2 = rewrite(&writer, "a", br#"{"x":1}"#, first.id).await;
    let b_gone = delete(&writer, "b").await;
    // Outside the prefix: not seen.
    let outside = writer
        .create_if_absent(b"/presence/u/", b"/presence/u/doc", b"{}", second.id)
        .await
        .expect("the transaction");
    let Creation::Created(outside) = outside else {
        panic!("/presence/u/doc existed already");
    };
    // Both of the first lease's keys go in one revision, one message.
    writer.revoke(first.id).await.expect("a revoke");
    let d = create(&writer, "d", second.id).await;

    let messages = changes_until(&mut mirror, d).await;
    let events: Vec<_> = messages.iter().flatten().map(summary).collect();
    let revoked = outside.revision + 1;
    let mut expected = vec![
        put("c", c),
        put("a", a2),
        deleted("b", b_gone),
        deleted("a", revoked),
        deleted("c", revoked),
        put("d", d),
    ];
    // etcd deletes a revoked lease's keys in no set order.
    let mut got = events.clone();
    got[3..5].sort();
    expected[3..5].sort();
    assert_eq!(got, expected, "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|message| message.len() == 2 && message.iter().all(|e| summary(e).2 == revoked)),
        "the revocation's deletes were not one message: {messages:?}"
    );
    assert_eq!(mirror.state().revision, d);
    assert_matches_etcd(&mirror, &writer).await;
    let Some(kv) = mirror.state().entries.get(&key("d")) else {
        panic!("d is not mirrored: {:?}", mirror.state());
    };
    assert_eq!(
        (
            kv.create_revision,
            kv.version,
            kv.lease,
            kv.value.as_slice()
        ),
        (d, 1, second.id.0, b"{}".as_slice())
    );
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_compaction_past_a_broken_watch_makes_the_mirror_relist_and_report_the_difference() {
    needs_program("etcd", "etcd-server");
    let mut etcd = EtcdCluster::start(3);
    // A follower, so that its death costs no election; not member 0,
    // through which the fixture compacts.
    let leader = etcd.leader();
    let watched = if leader == 1 { 2 } else { 1 };
    let writer = gateway([etcd.endpoint(0)]);
    let lease = writer
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant")
        .id;
    for name in ["kept", "gone", "rewritten", "recreated"] {
        create(&writer, name, lease).await;
    }

    let (mut mirror, before) = start(&first_then_others(&etcd, watched)).await;
    assert_eq!(mirror.watching(), Some(etcd.endpoint(watched).as_str()));
    // A mirror with no other member to go to.
    let (mut lonely, _) = start(&gateway([etcd.endpoint(watched)])).await;

    // While nothing reads the mirrors' watches, their member dies, the
    // prefix changes, and its history is compacted away.
    etcd.kill(watched);
    delete(&writer, "gone").await;
    rewrite(&writer, "rewritten", br#"{"x":1}"#, lease).await;
    delete(&writer, "recreated").await;
    create(&writer, "recreated", lease).await;
    create(&writer, "new", lease).await;
    // Created and deleted meanwhile: not in the difference.
    create(&writer, "passing", lease).await;
    let last = delete(&writer, "passing").await;
    assert!(last > before.revision + 1);
    etcd.compact(last);

    let update = within("the relisting", mirror.next()).await;
    let Update::Relisted {
        snapshot,
        removed,
        changed,
    } = update
    else {
        panic!("not a relisting: {update:?}");
    };
    let after = listing(&writer).await;
    assert_eq!(snapshot, after);
    assert_eq!(mirror.state(), &after);
    assert_eq!(removed, vec![key("gone")]);
    let entry = |name: &str| -> Kv { after.entries[&key(name)].clone() };
    assert_eq!(
        changed,
        vec![entry("rewritten"), entry("recreated"), entry("new")]
    );
    assert_eq!(entry("rewritten").value, br#"{"x":1}"#);
    assert_eq!(
        entry("rewritten").create_revision,
        before.entries[&key("rewritten")].create_revision
    );
    assert!(entry("recreated").create_revision > before.entries[&key("recreated")].create_revision);

    // It watches again after the listing, on a member that is alive.
    let later = create(&writer, "later", lease).await;
    let messages = changes_until(&mut mirror, later).await;
    let events: Vec<_> = messages.iter().flatten().map(summary).collect();
    assert_eq!(events, [put("later", later)]);
    assert_ne!(mirror.watching(), Some(etcd.endpoint(watched).as_str()));
    assert_matches_etcd(&mirror, &writer).await;

    // The lonely mirror cannot watch again: it says so, and tries again
    // on the next call, after a pause.
    for attempt in 0..2 {
        let asked = Instant::now();
        let update = within("the lonely mirror's failure", lonely.next()).await;
        let took = asked.elapsed();
        assert!(
            matches!(&update, Update::Unreachable { error: Error::Unavailable { failures } }
                if matches!(failures.as_slice(), [Error::Connect { .. }])),
            "{update:?}"
        );
        if attempt == 1 {
            assert!(
                took >= Duration::from_millis(100),
                "tried again after {took:?}"
            );
        }
    }
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_stopped_members_silent_watch_is_left_once_the_gateway_moves_on_losing_nothing() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let leader = etcd.leader();
    let silent = (leader + 1) % 3;
    let writer = gateway([etcd.endpoint(leader)]);
    let lease = writer
        .grant(Duration::from_secs(10))
        .await
        .expect("a grant")
        .id;

    let mirror_gateway = first_then_others(&etcd, silent);
    let (mut mirror, _) = start(&mirror_gateway).await;
    assert_eq!(mirror.watching(), Some(etcd.endpoint(silent).as_str()));
    let a = create(&writer, "a", lease).await;
    let messages = changes_until(&mut mirror, a).await;
    assert_eq!(
        messages.iter().flatten().map(summary).collect::<Vec<_>>(),
        [put("a", a)]
    );

    etcd.stop(silent);
    let b = create(&writer, "b", lease).await;
    let a2 = rewrite(&writer, "a", br#"{"x":1}"#, lease).await;
    let a_gone = delete(&writer, "a").await;

    // Nothing tells the watch that its member stopped: it is silent, and
    // the gateway, which nothing has sent through yet, has not moved.
    let silence = tokio::time::timeout(3 * CHECK_EVERY, mirror.next()).await;
    assert!(silence.is_err(), "{silence:?}");
    assert_eq!(mirror.watching(), Some(etcd.endpoint(silent).as_str()));

    // A call through the same gateway times out on the stopped member and
    // moves the gateway on (as the lease keeper's renewals would).
    let read = within("a read past the stopped member", listing(&mirror_gateway)).await;
    assert_ne!(mirror_gateway.current_endpoint(), etcd.endpoint(silent));
    let moved = Instant::now();
    let messages = changes_until(&mut mirror, a_gone).await;
    let caught_up = moved.elapsed();
    etcd.resume(silent);

    let events: Vec<_> = messages.iter().flatten().map(summary).collect();
    assert_eq!(
        events,
        [put("b", b), put("a", a2), deleted("a", a_gone)],
        "{messages:?}"
    );
    println!("caught up {caught_up:?} after the gateway moved on");
    assert!(
        caught_up < CHECK_EVERY + R,
        "caught up {caught_up:?} after the gateway moved on"
    );
    let watching = mirror.watching().map(str::to_owned);
    assert_eq!(watching.as_deref(), Some(mirror_gateway.current_endpoint()));
    assert_eq!(mirror.state().entries, read.entries);
    assert_matches_etcd(&mirror, &writer).await;
}
