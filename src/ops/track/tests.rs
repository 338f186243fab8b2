//! How a track is resolved, against a made-up system.

use super::super::tests::FakeSystem;
use super::*;
use crate::ops::{Op, Request};

fn track(pid: Option<u32>) -> Request {
    Request::Track(TrackRequest {
        topic: "doc".into(),
        key: "alice".into(),
        meta: Map::new(),
        pid,
        lifetime: Lifetime::Connection,
        subscribe: false,
    })
}

fn resolve(pid: Option<u32>, system: &mut FakeSystem) -> Result<Resolved, ErrorBody> {
    match track(pid).resolve(system)? {
        Op::Track(track) => Ok(track),
        other => panic!("a track resolved to {other:?}"),
    }
}

fn running(own_pid: u32, nested: bool) -> Connector {
    Connector::Running {
        process: ProcessId {
            pid: 4242,
            start_time: 99,
        },
        own_pid,
        in_nested_pid_namespace: nested,
    }
}

#[test]
fn a_track_without_pid_is_the_connecting_process_watched() {
    for pid in [None, Some(4242)] {
        let mut system = FakeSystem::default();
        let track = resolve(pid, &mut system).unwrap();
        assert_eq!(track.process.pid, 4242);
        assert_eq!(track.process.start_time, 99);
        assert_eq!(system.watched, [4242]);
    }
}

#[test]
fn a_connecting_process_that_is_gone_or_unknown_is_refused() {
    let gone = |connector, watchable| {
        let mut system = FakeSystem {
            connector,
            connector_watchable: watchable,
            ..FakeSystem::default()
        };
        let error = resolve(None, &mut system).unwrap_err();
        assert!(system.watched.is_empty());
        error
    };
    let exited = gone(Connector::Exited, true);
    assert_eq!(exited.code, ErrorCode::NotFound);
    assert!(exited.message.contains("exited"), "{}", exited.message);
    assert_eq!(gone(Connector::Unknown, true).code, ErrorCode::Internal);
    // Exited since it connected: its pid is not looked up again.
    let since = gone(running(4242, false), false);
    assert_eq!(since.code, ErrorCode::NotFound);
    assert!(since.message.contains("has exited"), "{}", since.message);
    // Gone before it was pinned: its pid namespace is unknown as well.
    let mut system = FakeSystem {
        connector: Connector::Exited,
        processes: vec![(77, 1000)],
        ..FakeSystem::default()
    };
    assert_eq!(
        resolve(Some(77), &mut system).unwrap_err().code,
        ErrorCode::NotFound
    );
}

#[test]
fn a_named_process_must_run_and_be_the_users_unless_root() {
    let mut system = FakeSystem {
        processes: vec![(77, 1000), (78, 0)],
        ..FakeSystem::default()
    };
    assert_eq!(resolve(Some(77), &mut system).unwrap().process.pid, 77);
    let theirs = resolve(Some(78), &mut system).unwrap_err();
    assert_eq!(theirs.code, ErrorCode::PermissionDenied);
    let missing = resolve(Some(79), &mut system).unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound);
    assert_eq!(missing.message, "no running process 79");
    system.peer.uid = 0;
    assert_eq!(resolve(Some(78), &mut system).unwrap().process.pid, 78);
}

#[test]
fn a_pid_named_from_a_nested_pid_namespace_is_refused_unless_it_is_the_peer() {
    let mut system = FakeSystem {
        connector: running(1, true),
        processes: vec![(2, 1000), (4242, 1000)],
        ..FakeSystem::default()
    };
    // Pid 1 in its own namespace: the peer itself.
    assert_eq!(resolve(Some(1), &mut system).unwrap().process.pid, 4242);
    for other in [2, 4242] {
        let refused = resolve(Some(other), &mut system).unwrap_err();
        assert_eq!(refused.code, ErrorCode::BadRequest);
        assert!(
            refused.message.contains("pid namespace"),
            "{}",
            refused.message
        );
    }
}

#[test]
fn a_refused_track_opens_no_watch() {
    let mut system = FakeSystem::default();
    let long = "k".repeat(system.limits.max_name_bytes + 1);
    let Request::Track(mut request) = track(None) else {
        unreachable!()
    };
    request.key = long;
    assert!(Request::Track(request).resolve(&mut system).is_err());
    assert!(system.watched.is_empty());
}

#[test]
fn tokens_are_random_hex_and_hash_to_what_is_stored() {
    let mut system = FakeSystem::default();
    let track = resolve(None, &mut system).unwrap();
    assert_eq!(track.token, "07".repeat(32));
    assert_eq!(hash_token(&track.token), track.token_hash);
    system.randomness = false;
    let error = resolve(None, &mut system).unwrap_err();
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(error.message.contains("randomness"), "{}", error.message);
}
