//! Cluster mode end to end: real `presence daemon` processes, each with
//! its own socket and database and its own `--host`, sharing topics
//! through a 3-member etcd on loopback (`common::etcd`). Every host shows
//! the same owner and the same queue; a host that is killed leaves the
//! others (`host_lost`) once etcd ends its lease; a daemon given no
//! `--etcd` talks to nobody; and two daemons given one `--host` cannot
//! both run cluster mode.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use presenced::client::ClientError;
use presenced::daemon::cluster::record::KeySpace;
use presenced::daemon::cluster::{Creation, Gateway, LeaseId, Renewal};
use presenced::protocol::{ErrorCode, Event, LeaveReason, Role, TrackRequest, UntrackRequest};

use crate::common::cluster::{
    MARGIN, TTL, cluster_args, editor_process_joins, host, listed_everywhere, longest_renewal_gap,
    next_leaves, spectator_at, status, three_hosts, wait_for_lease,
};
use crate::common::etcd::EtcdCluster;
use crate::common::{
    Daemon, POLL, View, eventually, needs_program, next_event, signal, stdout, within,
};

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn joins_from_every_host_give_one_owner_and_the_same_queue_on_every_host() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let (a, b, c) = three_hosts(&etcd).await;
    let topic = "shared:doc";

    let (on_a, _a_events) = a.client().await;
    let first = on_a
        .track(TrackRequest::new(topic, "alice"))
        .await
        .expect("alice joins on a");
    assert_eq!(first.standing.role, Role::Owner, "{first:?}");
    assert_eq!(first.phx_ref, "a:p1");

    let (on_b, _b_events) = b.client().await;
    let second = on_b
        .track(TrackRequest::new(topic, "bob"))
        .await
        .expect("bob joins on b");
    spectator_at(&second, 1);
    assert_eq!(second.phx_ref, "b:p1");
    assert!(second.seq > first.seq, "{first:?} then {second:?}");

    let (on_c, _c_events) = c.client().await;
    let third = on_c
        .track(TrackRequest::new(topic, "carol"))
        .await
        .expect("carol joins on c");
    spectator_at(&third, 2);
    assert!(third.seq > second.seq, "{second:?} then {third:?}");

    // Each entry's seq is its key's create revision: the same number on
    // every host, so the same queue.
    let expected = View {
        seqs: [first, second, third]
            .into_iter()
            .map(|reply| (reply.phx_ref, reply.seq))
            .collect(),
        owner: Some("a:p1".to_owned()),
    };
    listed_everywhere(&[&a, &b, &c], topic, &expected).await;

    // `presence list` names each entry's host, on every host alike.
    for daemon in [&a, &b, &c] {
        let listed = daemon.output(&["list", topic]).await;
        assert!(listed.status.success(), "{listed:?}");
        let text = stdout(&listed);
        let hosts: Vec<Vec<&str>> = text
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(
            hosts[0][..5],
            ["TOPIC", "ROLE", "KEY", "USER", "HOST"],
            "{text}"
        );
        let keys_and_hosts: Vec<(&str, &str)> = hosts[1..]
            .iter()
            .map(|row| match row[1] {
                // "spectator #1" is two words.
                "spectator" => (row[3], row[5]),
                _ => (row[2], row[4]),
            })
            .collect();
        assert_eq!(
            keys_and_hosts,
            [("alice", "a"), ("bob", "b"), ("carol", "c")],
            "{text}"
        );
    }

    // A topic outside the patterns stays local: b does not see a's.
    on_a.track(TrackRequest::new("local:doc", "alice"))
        .await
        .expect("a local join");
    let local_on_b = View::listed(&b, "local:doc").await;
    assert_eq!(local_on_b, View::default(), "a local topic is not shared");

    // `status` says how a stands in the cluster, in the reply and in words.
    let cluster = status(&a).await.cluster.expect("a is in cluster mode");
    assert_eq!(
        (cluster.host.as_str(), cluster.lease.as_str()),
        ("a", "live")
    );
    assert_eq!(cluster.endpoints, etcd.endpoints());
    assert!(cluster.endpoints.contains(&cluster.endpoint), "{cluster:?}");
    let renewed = Duration::from_millis(cluster.renewed_ms_ago.expect("a renewal"));
    assert!(renewed <= longest_renewal_gap(), "{cluster:?}");
    let fence_in = Duration::from_millis(cluster.fence_in_ms.expect("a fence ahead"));
    assert!(fence_in <= TTL - MARGIN, "{cluster:?}");
    let said = a.output(&["status"]).await;
    assert!(said.status.success(), "{said:?}");
    let text = stdout(&said);
    let lease_line = text
        .lines()
        .find(|line| line.trim_start().starts_with("lease"))
        .unwrap_or_else(|| panic!("no lease line in {text}"));
    assert!(
        lease_line.contains("live (") && lease_line.contains("renewed"),
        "{text}"
    );
    assert!(text.contains("host a, sharing shared:*"), "{text}");
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_killed_host_leaves_the_others_as_lost_within_its_ttl_and_the_next_is_promoted() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let (mut a, b, c) = three_hosts(&etcd).await;
    let topic = "shared:doc";

    let (on_a, _a_events) = a.client().await;
    let owner = on_a
        .track(TrackRequest::new(topic, "alice"))
        .await
        .expect("alice joins on a");
    let (on_b, mut b_events) = b.client().await;
    let next = on_b
        .track(TrackRequest::new(topic, "bob"))
        .await
        .expect("bob joins on b");
    spectator_at(&next, 1);
    let (on_c, mut c_events) = c.client().await;
    on_c.subscribe(topic).await.expect("c watches the topic");
    let expected = View {
        seqs: [
            (owner.phx_ref.clone(), owner.seq),
            (next.phx_ref.clone(), next.seq),
        ]
        .into_iter()
        .collect(),
        owner: Some(owner.phx_ref.clone()),
    };
    listed_everywhere(&[&b, &c], topic, &expected).await;

    let killed = Instant::now();
    a.crash().await;

    let promoted = next_event(&mut b_events, |event| match event {
        Event::Role { topic: on, payload } if on == topic && payload.phx_ref == next.phx_ref => {
            Some(payload.standing)
        }
        _ => None,
    })
    .await;
    assert_eq!(promoted.role, Role::Owner, "{promoted:?}");
    let (left, reasons) = next_event(&mut c_events, |event| match event {
        Event::PresenceDiff {
            topic: on,
            payload,
            reasons,
            ..
        } if on == topic && !payload.leaves.is_empty() => Some((payload.leaves, reasons)),
        _ => None,
    })
    .await;
    let waited = killed.elapsed();
    let left_refs: BTreeSet<&str> = left
        .values()
        .flat_map(|presence| &presence.metas)
        .map(|meta| meta.phx_ref.as_str())
        .collect();
    assert_eq!(left_refs, BTreeSet::from([owner.phx_ref.as_str()]));
    assert_eq!(
        reasons.get(&owner.phx_ref),
        Some(&LeaveReason::HostLost),
        "{reasons:?}"
    );
    assert!(
        waited <= TTL + Duration::from_secs(1),
        "a's entries left {waited:?} after it was killed, more than its TTL and a second"
    );
    let after = View {
        seqs: [(next.phx_ref.clone(), next.seq)].into_iter().collect(),
        owner: Some(next.phx_ref.clone()),
    };
    listed_everywhere(&[&b, &c], topic, &after).await;
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn an_owner_process_that_exits_leaves_every_host_and_the_next_is_promoted() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let (a, b, c) = three_hosts(&etcd).await;
    let topic = "shared:doc";

    let (on_a, _a_events) = a.client().await;
    let (mut editor, editor_pid, owner) = editor_process_joins(&on_a, topic).await;
    let (on_b, mut b_events) = b.client().await;
    let next = on_b
        .track(TrackRequest::new(topic, "bob"))
        .await
        .expect("bob joins on b");
    spectator_at(&next, 1);
    let (on_c, mut c_events) = c.client().await;
    on_c.subscribe(topic).await.expect("c watches the topic");

    signal(editor_pid, nix::sys::signal::Signal::SIGKILL);
    let _ = editor.wait().await;

    let promoted = next_event(&mut b_events, |event| match event {
        Event::Role { topic: on, payload } if on == topic && payload.phx_ref == next.phx_ref => {
            Some(payload.standing)
        }
        _ => None,
    })
    .await;
    assert_eq!(promoted.role, Role::Owner, "{promoted:?}");
    let reasons = next_leaves(&mut c_events, topic).await;
    assert_eq!(
        reasons.get(&owner.phx_ref),
        Some(&LeaveReason::PidExit),
        "{reasons:?}"
    );
}

/// The inodes of the TCP sockets (v4 and v6) of the machine's network
/// namespace, as `/proc/PID/net/tcp*` lists them.
fn tcp_socket_inodes(pid: u32) -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if let Some(inode) = line.split_whitespace().nth(9)
                && let Ok(inode) = inode.parse()
            {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// The inodes of the sockets a process holds open.
fn socket_inodes_of(pid: u32) -> BTreeSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors can be read")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// How many TCP sockets the process holds.
fn tcp_sockets_of(pid: u32) -> usize {
    let tcp = tcp_socket_inodes(pid);
    socket_inodes_of(pid)
        .iter()
        .filter(|inode| tcp.contains(inode))
        .count()
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_daemon_without_etcd_talks_to_no_etcd_and_shows_no_cluster() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let clustered = host(&etcd, "a").await;
    // The check can fail: a daemon in cluster mode does hold a connection
    // to etcd (its renewals', kept for the next).
    eventually("the cluster daemon to hold a TCP socket", async || {
        tcp_sockets_of(clustered.pid()) > 0
    })
    .await;

    let local = Daemon::start().await;
    let (client, _events) = local.client().await;
    let joined = client
        .track(TrackRequest::new("shared:doc", "alice"))
        .await
        .expect("a join of a topic another daemon would share");
    assert_eq!(joined.standing.role, Role::Owner);
    assert_eq!(joined.phx_ref, "p1", "a local ref names no host");
    let status = client.status().await.expect("status");
    assert_eq!(status.cluster, None);
    let raw = local.raw().await.request(r#"{"op":"status","id":1}"#).await;
    assert!(raw.get("cluster").is_none(), "{raw}");
    assert_eq!(
        tcp_sockets_of(local.pid()),
        0,
        "a local daemon opened a TCP socket"
    );
    // Nor did the clustered daemon see anything of it.
    assert_eq!(
        View::listed(&clustered, "shared:doc").await,
        View::default()
    );
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn local_topics_of_a_daemon_in_cluster_mode_write_nothing_to_etcd() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let a = host(&etcd, "a").await;
    let mut raw = a.raw().await;
    let before = etcd.kv_writes();
    for n in 0..20 {
        let topic = format!("local:doc-{n}");
        let joined = raw
            .request(&format!(
                r#"{{"op":"track","id":1,"topic":"{topic}","key":"alice"}}"#
            ))
            .await;
        assert_eq!(joined["role"], "owner", "{joined}");
        let phx_ref = joined["ref"].as_str().expect("a ref");
        assert!(
            !phx_ref.contains(':'),
            "a local ref names no host: {joined}"
        );
        let updated = raw
            .request(&format!(
                r#"{{"op":"update","id":2,"topic":"{topic}","ref":"{phx_ref}","meta":{{"n":{n}}}}}"#
            ))
            .await;
        assert_eq!(updated["ok"], true, "{updated}");
        let phx_ref = updated["ref"].as_str().expect("the updated ref");
        let left = raw
            .request(&format!(
                r#"{{"op":"untrack","id":3,"topic":"{topic}","ref":"{phx_ref}"}}"#
            ))
            .await;
        assert_eq!(left["ok"], true, "{left}");
    }
    assert_eq!(
        etcd.kv_writes(),
        before,
        "a local topic was written to etcd"
    );
    // The count does see this daemon's writes: a shared join is one.
    let shared = raw
        .request(r#"{"op":"track","id":4,"topic":"shared:doc","key":"alice"}"#)
        .await;
    assert_eq!(shared["role"], "owner", "{shared}");
    assert!(
        etcd.kv_writes() > before,
        "etcd's count missed a shared join"
    );
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_second_daemon_given_a_host_name_in_use_refuses_cluster_mode() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let first = host(&etcd, "a").await;
    let args = cluster_args(&etcd, "a");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let second = Daemon::start_with(&args).await;

    let refused = wait_for_lease(&second, "stopped").await;
    let cluster = refused
        .cluster
        .expect("the second daemon is in cluster mode");
    let why = cluster.last_error.expect("the second daemon says why");
    assert!(
        why.contains("host name a") && why.contains("another daemon"),
        "{why}"
    );
    let (client, _events) = second.client().await;
    match client.track(TrackRequest::new("shared:doc", "bob")).await {
        Err(ClientError::Refused(error)) => assert_eq!(error.code, ErrorCode::Unavailable),
        other => panic!("a shared topic on a daemon without cluster mode: {other:?}"),
    }
    // It serves its local topics on.
    let local = client
        .track(TrackRequest::new("local:doc", "bob"))
        .await
        .expect("a local join");
    assert_eq!(local.standing.role, Role::Owner);

    // The first daemon's claim and lease are untouched.
    let first_status = status(&first).await;
    assert_eq!(first_status.cluster.expect("cluster mode").lease, "live");
    let (on_first, _events) = first.client().await;
    let owner = on_first
        .track(TrackRequest::new("shared:doc", "alice"))
        .await
        .expect("the first daemon still writes");
    assert_eq!(owner.standing.role, Role::Owner);
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_daemon_restarted_after_a_kill_takes_its_host_name_back_at_once() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    // A TTL long enough to tell a lease revoked by the new daemon from one
    // etcd let expire.
    let long_ttl = Duration::from_secs(5);
    let args = cluster_args(&etcd, "a");
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ttl_at = args
        .iter()
        .position(|arg| *arg == "--cluster-ttl")
        .expect("the TTL is given")
        + 1;
    let long_ttl_text = long_ttl.as_secs().to_string();
    args[ttl_at] = &long_ttl_text;
    let mut a = Daemon::start_with(&args).await;
    wait_for_lease(&a, "live").await;
    let b = host(&etcd, "b").await;
    let topic = "shared:doc";

    let (on_a, _a_events) = a.client().await;
    let (mut editor, editor_pid, owner) = editor_process_joins(&on_a, topic).await;
    let (on_b, mut b_events) = b.client().await;
    on_b.subscribe(topic).await.expect("b watches the topic");
    eventually("b to list a's entry", async || {
        View::listed(&b, topic).await.owner.as_deref() == Some(owner.phx_ref.as_str())
    })
    .await;

    let killed = Instant::now();
    a.crash().await;
    // Its entry's process ends too, so the restarted daemon keeps no row.
    signal(editor_pid, nix::sys::signal::Signal::SIGKILL);
    let _ = editor.wait().await;
    a.start_again(&args).await;

    // The claim on `a` is the killed daemon's, of this boot, and its
    // process is gone: its lease is revoked rather than waited out.
    wait_for_lease(&a, "live").await;
    let reasons = next_leaves(&mut b_events, topic).await;
    assert_eq!(reasons.get(&owner.phx_ref), Some(&LeaveReason::HostLost));
    let waited = killed.elapsed();
    assert!(
        waited < long_ttl - Duration::from_secs(1),
        "the killed daemon's entry left {waited:?} after the kill: its lease expired \
         rather than being revoked by its successor"
    );
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_join_sent_as_the_daemon_starts_waits_for_its_lease_rather_than_fail() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let args = cluster_args(&etcd, "a");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Daemon::start_with(&args).await;
    // At once: the lease is granted and the host name claimed meanwhile.
    let (client, _events) = a.client().await;
    let joined = client
        .track(TrackRequest::new("shared:doc", "alice"))
        .await
        .expect("the join waits for the lease");
    assert_eq!(joined.standing.role, Role::Owner);
    assert_eq!(joined.phx_ref, "a:p1");
}

/// Puts a made-up claim on host name `host` (the daemons' default prefix)
/// on a lease of `ttl` granted for it, as a daemon other than the ones
/// under test would: `boot_id` and `database` say whose it is.
async fn made_up_claim(
    gateway: &Gateway,
    host: &str,
    boot_id: &str,
    database: serde_json::Value,
    ttl: Duration,
) -> LeaseId {
    let lease = gateway.grant(ttl).await.expect("a lease for the claim").id;
    // This process, with a start time it never had: no process runs so.
    let claim = serde_json::json!({
        "v": 1,
        "host": host,
        "boot_id": boot_id,
        "pid": std::process::id(),
        "start_time": 1,
        "database": database,
    });
    let key = format!("/presenced/h/{host}");
    let created = gateway
        .create_if_absent(
            b"/presenced/h/",
            key.as_bytes(),
            claim.to_string().as_bytes(),
            lease,
        )
        .await
        .expect("the made-up claim is written");
    assert!(matches!(created, Creation::Created(_)), "{created:?}");
    lease
}

fn this_boot() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .expect("the boot id")
        .trim()
        .to_owned()
}

/// Waits until `status` says the daemon waits for a claim's lease to end.
async fn wait_for_waiting(daemon: &Daemon) -> String {
    within("the daemon to say it waits for the claim's lease", async {
        loop {
            let status = status(daemon).await;
            let cluster = status.cluster.expect("a daemon in cluster mode");
            if let Some(error) = cluster.last_error
                && error.contains("waiting")
            {
                // Granted, but not claimed: nothing is written under it.
                assert_eq!(cluster.lease, "granting", "{error}");
                return error;
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_claim_of_this_boot_on_another_database_is_never_revoked_and_refuses_cluster_mode_while_renewed()
 {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let gateway = Arc::new(
        Gateway::new(etcd.endpoints(), Duration::from_millis(300)).expect("the endpoints"),
    );
    // A daemon of this boot whose pid means nothing here (another
    // container), on a database that is not the one under test.
    let other = serde_json::json!({ "device": 1, "inode": 1 });
    let lease = made_up_claim(&gateway, "a", &this_boot(), other, Duration::from_secs(3)).await;
    let renewer = Arc::clone(&gateway);
    let renewing = tokio::spawn(async move {
        loop {
            let _ = renewer.keep_alive(lease).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    let args = cluster_args(&etcd, "a");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Daemon::start_with(&args).await;
    let waiting = wait_for_waiting(&a).await;
    assert!(waiting.contains("this machine's boot"), "{waiting}");
    let refused = wait_for_lease(&a, "stopped").await;
    let why = refused
        .cluster
        .and_then(|cluster| cluster.last_error)
        .expect("the daemon says why");
    assert!(why.contains("another daemon"), "{why}");
    renewing.abort();
    // Its lease was never revoked: the claim is there, on it.
    assert!(
        matches!(gateway.keep_alive(lease).await, Ok(Renewal::Alive { .. })),
        "the other daemon's lease was revoked"
    );
    let (_, claim) = gateway.get(b"/presenced/h/a").await.expect("a read");
    assert_eq!(claim.map(|kv| kv.lease), Some(lease.0));
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_claim_left_by_another_boot_is_waited_out_and_the_host_name_then_claimed() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let gateway = Arc::new(
        Gateway::new(etcd.endpoints(), Duration::from_millis(300)).expect("the endpoints"),
    );
    // This machine before a reboot: nobody renews the lease any more.
    let lease = made_up_claim(
        &gateway,
        "a",
        "an-earlier-boot",
        serde_json::Value::Null,
        Duration::from_secs(3),
    )
    .await;

    let args = cluster_args(&etcd, "a");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Daemon::start_with(&args).await;
    let waiting = wait_for_waiting(&a).await;
    assert!(waiting.contains("another boot"), "{waiting}");
    let live = wait_for_lease(&a, "live").await;
    let cluster = live.cluster.expect("cluster mode");
    assert!(
        !cluster
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("waiting"),
        "{cluster:?}"
    );
    let (_, claim) = gateway.get(b"/presenced/h/a").await.expect("a read");
    let claim = claim.expect("the daemon's claim");
    assert_ne!(claim.lease, lease.0);
    let (client, _events) = a.client().await;
    let joined = client
        .track(TrackRequest::new("shared:doc", "alice"))
        .await
        .expect("the daemon writes once it holds its name");
    assert_eq!(joined.standing.role, Role::Owner);
}

#[tokio::test]
#[ignore = "needs etcd (etcd-server)"]
async fn a_host_sweeps_its_own_leave_reasons_a_minute_after_the_leave_and_nobody_sees_it() {
    needs_program("etcd", "etcd-server");
    let etcd = EtcdCluster::start(3);
    let gateway = Arc::new(
        Gateway::new(etcd.endpoints(), Duration::from_millis(300)).expect("the endpoints"),
    );
    let keys = KeySpace::new("/presenced/");
    let (a, b) = (host(&etcd, "a").await, host(&etcd, "b").await);
    let topic = "shared:doc";
    // Another host's reason, which is not a's to sweep.
    let elsewhere = gateway
        .grant(Duration::from_secs(3600))
        .await
        .expect("a lease")
        .id;
    let elsewhere_reason = keys.reason(topic, "c:p9");
    gateway
        .create_if_absent(
            &keys.reasons(),
            &elsewhere_reason,
            br#"{"v":1,"reason":"untrack","by":null,"host":"c"}"#,
            elsewhere,
        )
        .await
        .expect("c's reason is written");
    // One with a's name on a lease not a's daemon's: not its to sweep
    // either (it goes with that lease).
    let off_lease_reason = keys.reason(topic, "a:p99");
    gateway
        .create_if_absent(
            &keys.reasons(),
            &off_lease_reason,
            br#"{"v":1,"reason":"untrack","by":null,"host":"a"}"#,
            elsewhere,
        )
        .await
        .expect("a reason with a's name on another lease is written");

    let (on_a, _a_events) = a.client().await;
    let alice = on_a
        .track(TrackRequest::new(topic, "alice"))
        .await
        .expect("alice joins on a");
    let carol = on_a
        .track(TrackRequest::new(topic, "carol"))
        .await
        .expect("carol joins on a");
    let (on_b, mut b_events) = b.client().await;
    on_b.subscribe(topic).await.expect("b watches the topic");
    eventually("b to list both of a's entries", async || {
        View::listed(&b, topic).await.seqs.len() == 2
    })
    .await;
    on_a.untrack(UntrackRequest {
        topic: topic.into(),
        phx_ref: Some(alice.phx_ref.clone()),
        key: None,
    })
    .await
    .expect("alice leaves");
    let left = Instant::now();
    let reasons = next_leaves(&mut b_events, topic).await;
    assert_eq!(reasons.get(&alice.phx_ref), Some(&LeaveReason::Untrack));
    let reason_key = keys.reason(topic, &alice.phx_ref);
    let (_, reason) = gateway.get(&reason_key).await.expect("a read");
    assert!(reason.is_some(), "the leave's reason is written beside it");
    let listed = View::listed(&b, topic).await;
    assert_eq!(listed.owner.as_deref(), Some(carol.phx_ref.as_str()));

    // Kept a minute, then swept within a few sweeps.
    let sweep_deadline = Duration::from_secs(60 + 20);
    tokio::time::timeout(sweep_deadline, async {
        while gateway.get(&reason_key).await.expect("a read").1.is_some() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("a's reason key still there {sweep_deadline:?} after the leave"));
    let swept_after = left.elapsed();
    assert!(
        swept_after >= Duration::from_secs(55),
        "the reason was swept {swept_after:?} after the leave, before a minute"
    );
    // Another host's reason stays, and so does one on another lease; b
    // saw nothing of the sweep.
    let (_, kept) = gateway.get(&elsewhere_reason).await.expect("a read");
    assert!(kept.is_some(), "a swept another host's reason");
    let (_, kept) = gateway.get(&off_lease_reason).await.expect("a read");
    assert!(kept.is_some(), "a swept a reason on a lease not its own");
    assert_eq!(View::listed(&b, topic).await, listed);
    let ping = on_b.status().await.expect("b answers");
    assert!(ping.cluster.is_some());
    assert!(
        b_events.try_recv().is_err(),
        "b was told something of the sweep"
    );
}
