//! Tests for the registry: unit tests for each rule of ownership, and a
//! property test that drives random operations against a naive reference
//! model and checks the invariants clients rely on after every step.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::*;
use crate::ops::Op;
use crate::ops::subscribe::Subscription;
use crate::protocol::{
    Diff, ErrorCode, Event, LeaveReason, Lifetime, Limits, ListAllReply, ListTopicReply, Meta,
    Owner, Presences, Reply, ResumeReply, Role, RoleChange, Standing, TopicPresences, TrackReply,
    TrackRequest, UntrackReply, UntrackRequest, UpdateReply, UpdateRequest,
};

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

const ALICE: u32 = 1000;
const BOB: u32 = 1001;
const ROOT: u32 = 0;

/// A connection id that is never opened: `list` works from anywhere, and
/// using it keeps the test's own reads out of every connection's lines.
const NOBODY: ConnId = ConnId::MAX;

fn user_name(uid: u32) -> String {
    match uid {
        ROOT => "root",
        ALICE => "alice",
        BOB => "bob",
        _ => "someone",
    }
    .to_owned()
}

fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// The process a connection's entries belong to unless a test names another.
fn process_of(conn: ConnId) -> ProcessId {
    ProcessId {
        pid: 4000 + conn as u32,
        start_time: 77,
    }
}

fn track_request(topic: &str, key: &str) -> TrackRequest {
    TrackRequest {
        topic: topic.to_owned(),
        key: key.to_owned(),
        meta: Map::new(),
        pid: None,
        lifetime: Lifetime::Connection,
        subscribe: false,
    }
}

fn process_request(topic: &str, key: &str) -> TrackRequest {
    TrackRequest {
        lifetime: Lifetime::Process,
        ..track_request(topic, key)
    }
}

fn meta(value: Value) -> Map<String, Value> {
    value.as_object().cloned().expect("a meta is a JSON object")
}

/// A registry with a clock, connection ids and resume tokens, whose calls
/// each return the outbox they filled.
struct Harness {
    registry: Registry,
    now: i64,
    next_conn: ConnId,
    next_token: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Harness {
        Harness::around(Registry::new(limits))
    }

    fn around(registry: Registry) -> Harness {
        Harness {
            registry,
            now: 1_000,
            next_conn: 1,
            next_token: 1,
        }
    }

    /// `N` connections, alice's and bob's in turn, alice's first.
    fn connect_in_turn<const N: usize>(&mut self) -> [ConnId; N] {
        std::array::from_fn(|i| self.connect(if i % 2 == 0 { ALICE } else { BOB }))
    }

    fn connect(&mut self, uid: u32) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.registry.open(
            conn,
            Peer {
                pid: process_of(conn).pid,
                uid,
                user: user_name(uid),
            },
        );
        conn
    }

    fn handle(&mut self, conn: ConnId, op: Op) -> Outbox {
        let mut out = Outbox::default();
        crate::ops::answer(
            &mut self.registry,
            conn,
            json!("req"),
            op,
            self.now,
            &mut out,
        );
        made(out)
    }

    fn track_as(&mut self, conn: ConnId, request: TrackRequest, process: ProcessId) -> Outbox {
        let token = format!("token-{}", self.next_token);
        self.next_token += 1;
        let track = Track {
            request,
            process,
            token_hash: token_hash(&token),
            token,
        };
        self.handle(conn, Op::Track(track))
    }

    fn try_track(&mut self, conn: ConnId, request: TrackRequest) -> Outbox {
        self.track_as(conn, request, process_of(conn))
    }

    /// Tracks a connection entry and returns the (successful) reply.
    fn track(&mut self, conn: ConnId, topic: &str, key: &str) -> TrackReply {
        ok_reply(&self.try_track(conn, track_request(topic, key)), conn)
    }

    fn track_process(&mut self, conn: ConnId, topic: &str, key: &str) -> TrackReply {
        ok_reply(&self.try_track(conn, process_request(topic, key)), conn)
    }

    fn untrack_ref(&mut self, conn: ConnId, topic: &str, phx_ref: &str) -> Outbox {
        self.handle(
            conn,
            Op::Untrack(UntrackRequest {
                topic: topic.to_owned(),
                phx_ref: Some(phx_ref.to_owned()),
                key: None,
            }),
        )
    }

    fn untrack_key(&mut self, conn: ConnId, topic: &str, key: &str) -> Outbox {
        self.handle(
            conn,
            Op::Untrack(UntrackRequest {
                topic: topic.to_owned(),
                phx_ref: None,
                key: Some(key.to_owned()),
            }),
        )
    }

    fn update_ref(
        &mut self,
        conn: ConnId,
        topic: &str,
        phx_ref: &str,
        meta: Map<String, Value>,
    ) -> Outbox {
        self.handle(
            conn,
            Op::Update(UpdateRequest {
                topic: topic.to_owned(),
                phx_ref: Some(phx_ref.to_owned()),
                key: None,
                meta,
            }),
        )
    }

    fn update_key(&mut self, conn: ConnId, topic: &str, key: &str) -> Outbox {
        self.handle(
            conn,
            Op::Update(UpdateRequest {
                topic: topic.to_owned(),
                phx_ref: None,
                key: Some(key.to_owned()),
                meta: meta(json!({"edited": true})),
            }),
        )
    }

    fn subscribe(&mut self, conn: ConnId, topic: &str) -> Outbox {
        self.handle(conn, Op::Subscribe(Subscription::Topic(topic.to_owned())))
    }

    fn resume(&mut self, conn: ConnId, tokens: &[&str]) -> Outbox {
        let tokens = tokens
            .iter()
            .map(|token| (token.to_string(), token_hash(token)))
            .collect();
        self.handle(conn, Op::Resume(tokens))
    }

    fn list(&mut self, topic: &str) -> TopicPresences {
        let reply: ListTopicReply = ok_reply(
            &self.handle(NOBODY, Op::List(Some(topic.to_owned()))),
            NOBODY,
        );
        assert_eq!(reply.topic, topic);
        reply.state
    }

    /// Every ref listed on the topic, in seq order.
    fn listed_refs(&mut self, topic: &str) -> Vec<String> {
        let mut metas: Vec<Meta> = self
            .list(topic)
            .presences
            .into_values()
            .flat_map(|p| p.metas)
            .collect();
        metas.sort_by_key(|m| m.seq);
        metas.into_iter().map(|m| m.phx_ref).collect()
    }

    fn close(&mut self, conn: ConnId) -> Outbox {
        self.end(&[Ending::Closed(conn)])
    }

    fn process_exited(&mut self, process: ProcessId) -> Outbox {
        self.end(&[Ending::Exited(process)])
    }

    fn end(&mut self, endings: &[Ending]) -> Outbox {
        let mut out = Outbox::default();
        self.registry.end(endings, self.now, &mut out);
        out
    }

    fn expire(&mut self) -> Outbox {
        let mut out = Outbox::default();
        self.registry.expire(self.now, &mut out);
        out
    }
}

// -- reading an outbox ------------------------------------------------------

/// The outbox with each read made into the reply or the event its view
/// makes, as the driver makes it, so that it reads like any other.
fn made(mut out: Outbox) -> Outbox {
    out.deliveries = out
        .deliveries
        .into_iter()
        .map(|delivery| match delivery {
            Delivery::View { conn, view } => match (view.reply(), view.event()) {
                (Some(reply), _) => Delivery::Reply { conn, reply },
                (None, Some(event)) => Delivery::Event {
                    to: vec![conn],
                    event,
                },
                (None, None) => unreachable!("a read makes a reply or an event"),
            },
            other => other,
        })
        .collect();
    out
}

/// The outbox's row changes, without its history records.
fn row_changes(out: &Outbox) -> Vec<Change> {
    out.changes
        .iter()
        .filter(|change| !matches!(change, Change::History(_)))
        .cloned()
        .collect()
}

/// The outbox's history records, as (kind, ref, reason).
fn history(out: &Outbox) -> Vec<(HistoryKind, String, Option<LeaveReason>)> {
    out.changes
        .iter()
        .filter_map(|change| match change {
            Change::History(event) => Some((event.kind, event.phx_ref.clone(), event.reason)),
            _ => None,
        })
        .collect()
}

/// The reply of one `handle` call: the only reply in the outbox, addressed
/// to the caller, and ahead of every event.
fn the_reply(out: &Outbox, conn: ConnId) -> Reply {
    let replies: Vec<(usize, ConnId, &OutgoingReply)> = out
        .deliveries
        .iter()
        .enumerate()
        .filter_map(|(index, delivery)| match delivery {
            Delivery::Reply { conn, reply } => Some((index, *conn, reply)),
            Delivery::Event { .. }
            | Delivery::ResyncedAll(_)
            | Delivery::View { .. }
            | Delivery::Awaiting { .. }
            | Delivery::Resolved { .. } => None,
        })
        .collect();
    assert_eq!(replies.len(), 1, "one reply per request: {out:?}");
    let (index, to, reply) = replies[0];
    assert_eq!(index, 0, "the reply goes ahead of the events: {out:?}");
    assert_eq!(to, conn, "the reply goes to the caller");
    serde_json::from_slice(&reply.to_line()).expect("the reply line reads back")
}

fn ok_reply<T: DeserializeOwned>(out: &Outbox, conn: ConnId) -> T {
    let reply = the_reply(out, conn);
    assert!(reply.ok, "expected success, got {:?}", reply.error);
    serde_json::from_value(Value::Object(reply.fields)).expect("reply fields parse")
}

/// The `refused` field of a `resume` reply, token by token.
fn refused_codes(out: &Outbox, conn: ConnId) -> BTreeMap<String, ErrorCode> {
    let refused = the_reply(out, conn).fields["refused"].clone();
    let refused: BTreeMap<String, ErrorBody> =
        serde_json::from_value(refused).expect("`refused` maps tokens to errors");
    refused
        .into_iter()
        .map(|(token, error)| (token, error.code))
        .collect()
}

fn error_code(out: &Outbox, conn: ConnId) -> ErrorCode {
    let reply = the_reply(out, conn);
    assert!(!reply.ok, "expected a failure, got {reply:?}");
    reply.error.expect("a failure carries an error").code
}

/// Asserts that a request failed with `code` and changed nothing.
fn assert_refused(out: &Outbox, conn: ConnId, code: ErrorCode) {
    assert_eq!(error_code(out, conn), code);
    assert_eq!(
        out.deliveries.len(),
        1,
        "a refusal causes no events: {out:?}"
    );
    assert!(out.changes.is_empty(), "a refusal persists nothing");
}

fn events_to(out: &Outbox, conn: ConnId) -> Vec<&Event> {
    out.deliveries
        .iter()
        .filter_map(|delivery| match delivery {
            Delivery::Event { to, event } if to.contains(&conn) => Some(event),
            _ => None,
        })
        .collect()
}

/// What one connection receives, in order, by kind.
fn kinds_for(out: &Outbox, conn: ConnId) -> Vec<&'static str> {
    out.deliveries
        .iter()
        .filter_map(|delivery| match delivery {
            Delivery::Reply { conn: to, .. } if *to == conn => Some("reply"),
            Delivery::Event { to, event } if to.contains(&conn) => Some(match event {
                Event::PresenceState { .. } => "presence_state",
                Event::PresenceDiff { .. } => "presence_diff",
                Event::Role { .. } => "role",
                Event::Shutdown { .. } => "shutdown",
                Event::Resync { .. } => "resync",
                Event::Removed { .. } => "removed",
                Event::Updated { .. } => "updated",
            }),
            _ => None,
        })
        .collect()
}

/// Every role event as (recipient, change). A role event concerns one
/// entry, so it must have exactly one recipient.
fn role_changes(out: &Outbox) -> Vec<(ConnId, RoleChange)> {
    out.deliveries
        .iter()
        .filter_map(|delivery| match delivery {
            Delivery::Event {
                to,
                event: Event::Role { payload, .. },
            } => {
                assert_eq!(to.len(), 1, "a role event has one recipient");
                Some((to[0], payload.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Every role event as (recipient, ref, standing), sorted by recipient and
/// ref so that a test can compare it with a list of its own.
fn role_summaries(out: &Outbox) -> Vec<(ConnId, String, Summary)> {
    let mut seen: Vec<_> = role_changes(out)
        .into_iter()
        .map(|(conn, change)| (conn, change.phx_ref, summary(&change.standing)))
        .collect();
    seen.sort_by(|l, r| (l.0, &l.1).cmp(&(r.0, &r.1)));
    seen
}

/// One `presence_diff` delivery.
#[derive(Debug)]
struct SeenDiff {
    to: Vec<ConnId>,
    topic: String,
    payload: Diff,
    owner: Option<Owner>,
    reasons: BTreeMap<String, LeaveReason>,
}

fn diffs(out: &Outbox) -> Vec<SeenDiff> {
    out.deliveries
        .iter()
        .filter_map(|delivery| match delivery {
            Delivery::Event {
                to,
                event:
                    Event::PresenceDiff {
                        topic,
                        payload,
                        owner,
                        reasons,
                    },
            } => Some(SeenDiff {
                to: to.clone(),
                topic: topic.clone(),
                payload: payload.clone(),
                owner: owner.clone(),
                reasons: reasons.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// The only diff in the outbox.
fn the_diff(out: &Outbox) -> SeenDiff {
    let mut all = diffs(out);
    assert_eq!(all.len(), 1, "exactly one diff: {all:?}");
    all.remove(0)
}

fn refs_of(presences: &Presences) -> BTreeSet<String> {
    presences
        .values()
        .flat_map(|p| p.metas.iter().map(|m| m.phx_ref.clone()))
        .collect()
}

fn owner_ref(owner: &Option<Owner>) -> Option<&str> {
    owner.as_ref().map(|o| o.phx_ref.as_str())
}

fn refs(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|r| r.to_string()).collect()
}

/// A standing reduced to what the tests compare: role, readonly, position
/// and the owner's ref.
type Summary = (Role, bool, usize, Option<String>);

/// The standing a role event or a reply reports, as a [`Summary`].
fn summary(standing: &Standing) -> Summary {
    (
        standing.role,
        standing.readonly,
        standing.position,
        owner_ref(&standing.owner).map(str::to_owned),
    )
}

fn owner_standing(owner: &str) -> Summary {
    (Role::Owner, false, 0, Some(owner.to_owned()))
}

fn spectator_standing(position: usize, owner: &str) -> Summary {
    (Role::Spectator, true, position, Some(owner.to_owned()))
}

/// An entry as the store would hand it back after a restart.
fn stored_entry(seq: u64, topic: &str, key: &str, lifetime: Lifetime, token: &str) -> Entry {
    Entry {
        topic: topic.to_owned(),
        key: key.to_owned(),
        seq,
        phx_ref: ref_for(seq),
        prev_ref: None,
        meta: Map::new(),
        joined_at: 500 + seq as i64,
        process: ProcessId {
            pid: 9000 + seq as u32,
            start_time: 5,
        },
        uid: ALICE,
        user: user_name(ALICE),
        lifetime,
        token_hash: token_hash(token),
        conn: None,
        resume_deadline: None,
        cluster: None,
    }
}

// ---------------------------------------------------------------------------
// Ownership and roles
// ---------------------------------------------------------------------------

#[test]
fn first_track_owns_the_topic_and_later_tracks_spectate_in_join_order() {
    let mut h = Harness::new();
    let [a, b, c] = h.connect_in_turn();

    let first = h.track(a, "doc", "x");
    let second = h.track(b, "doc", "y");
    let third = h.track(c, "doc", "z");

    assert_eq!(summary(&first.standing), owner_standing(&first.phx_ref));
    assert_eq!(
        summary(&second.standing),
        spectator_standing(1, &first.phx_ref)
    );
    assert_eq!(
        summary(&third.standing),
        spectator_standing(2, &first.phx_ref)
    );
    let owner = first.standing.owner.as_ref().unwrap();
    assert_eq!((owner.key.as_str(), owner.user.as_str()), ("x", "alice"));
    assert_eq!(owner.pid, process_of(a).pid);
    assert!(first.seq < second.seq && second.seq < third.seq);

    let listed = h.list("doc");
    assert_eq!(owner_ref(&listed.owner), Some(first.phx_ref.as_str()));
    assert_eq!(
        h.listed_refs("doc"),
        [first.phx_ref, second.phx_ref, third.phx_ref]
    );
}

#[test]
fn a_view_taken_before_a_change_still_shows_the_old_state() {
    let mut h = Harness::new();
    let [a, b] = h.connect_in_turn();
    let first = h.track(a, "doc", "x");
    let second = h.track(b, "doc", "y");

    let before = h.registry.view("doc");
    let all_before = h.registry.occupied_views();
    h.untrack_ref(a, "doc", &first.phx_ref);
    let third = h.track(a, "doc", "z");
    h.track(a, "other", "w");

    let refs_in =
        |view: &TopicView| -> Vec<String> { view.entries().map(|e| e.phx_ref.clone()).collect() };
    assert_eq!(
        refs_in(&before),
        [first.phx_ref.clone(), second.phx_ref.clone()]
    );
    assert_eq!(
        owner_ref(&before.snapshot().owner),
        Some(first.phx_ref.as_str())
    );
    assert_eq!(all_before.len(), 1);
    assert_eq!(refs_in(&all_before[0].1), refs_in(&before));
    assert_eq!(
        refs_in(&h.registry.view("doc")),
        [second.phx_ref, third.phx_ref]
    );
    assert!(h.registry.view("nobody").is_empty());
}

#[test]
fn tracks_on_different_topics_each_own_their_topic() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let b = h.connect(BOB);
    h.track(a, "one", "x");
    let other = h.track(b, "two", "x");
    assert_eq!(other.standing.role, Role::Owner);
    assert_eq!(h.registry.topic_count(), 2);
}

#[test]
fn untracking_the_owner_promotes_the_next_and_tells_each_remaining_entry_once() {
    let mut h = Harness::new();
    let [a, b, c, watcher] = h.connect_in_turn();
    h.subscribe(watcher, "doc");
    let owner = h.track(a, "doc", "x");
    let second = h.track(b, "doc", "y");
    let third = h.track(c, "doc", "z");
    // Two entries of one connection each hear about their own standing.
    let fourth = h.track(c, "doc", "w");

    let out = h.untrack_ref(a, "doc", &owner.phx_ref);

    assert_eq!(ok_reply::<UntrackReply>(&out, a).removed, 1);
    // Conns b < c, and refs of one connection sort by seq here.
    assert_eq!(
        role_summaries(&out),
        [
            (b, second.phx_ref.clone(), owner_standing(&second.phx_ref)),
            (
                c,
                third.phx_ref.clone(),
                spectator_standing(1, &second.phx_ref),
            ),
            (
                c,
                fourth.phx_ref.clone(),
                spectator_standing(2, &second.phx_ref),
            ),
        ]
    );
    assert!(kinds_for(&out, a).iter().all(|k| *k == "reply"));
    assert!(!kinds_for(&out, watcher).contains(&"role"));

    let diff = the_diff(&out);
    assert_eq!(diff.to, [watcher]);
    assert_eq!(diff.topic, "doc");
    assert!(diff.payload.joins.is_empty());
    assert_eq!(refs_of(&diff.payload.leaves), refs(&[&owner.phx_ref]));
    assert_eq!(owner_ref(&diff.owner), Some(second.phx_ref.as_str()));
    assert_eq!(
        diff.reasons,
        BTreeMap::from([(owner.phx_ref.clone(), LeaveReason::Untrack)])
    );
    assert_eq!(row_changes(&out), [Change::Delete(owner.phx_ref)]);
}

#[test]
fn closing_the_owners_connection_promotes_the_next_with_reason_closed() {
    let mut h = Harness::new();
    let [a, b, c, watcher] = h.connect_in_turn();
    h.subscribe(watcher, "doc");
    let owner = h.track(a, "doc", "x");
    let owner_too = h.track(a, "doc", "x2");
    let second = h.track(b, "doc", "y");
    let third = h.track(c, "doc", "z");

    let out = h.close(a);

    assert_eq!(
        role_summaries(&out),
        [
            (b, second.phx_ref.clone(), owner_standing(&second.phx_ref)),
            (
                c,
                third.phx_ref.clone(),
                spectator_standing(1, &second.phx_ref),
            ),
        ]
    );

    // Both of the connection's entries leave in one diff.
    let diff = the_diff(&out);
    assert_eq!(diff.to, [watcher]);
    assert_eq!(
        refs_of(&diff.payload.leaves),
        refs(&[&owner.phx_ref, &owner_too.phx_ref])
    );
    assert_eq!(owner_ref(&diff.owner), Some(second.phx_ref.as_str()));
    assert_eq!(
        diff.reasons,
        BTreeMap::from([
            (owner.phx_ref.clone(), LeaveReason::Closed),
            (owner_too.phx_ref.clone(), LeaveReason::Closed),
        ])
    );
    assert_eq!(h.listed_refs("doc"), [second.phx_ref, third.phx_ref]);
    assert_eq!(h.registry.connection_count(), 3);
}

#[test]
fn removing_a_spectator_tells_each_held_entry_behind_it_its_new_position() {
    let mut h = Harness::new();
    let [a, b, c, d, e, watcher] = h.connect_in_turn();
    h.subscribe(watcher, "doc");
    let owner = h.track(a, "doc", "x");
    let second = h.track(b, "doc", "y");
    let third = h.track(c, "doc", "z");
    let unheld = h.track_process(d, "doc", "v");
    let fifth = h.track(e, "doc", "w");
    h.close(d);

    let out = h.untrack_ref(b, "doc", &second.phx_ref);

    // The owner, ahead of it, stands as it stood: it hears nothing. Those
    // behind move up one; the one nobody holds hears it on its resume.
    assert_eq!(ok_reply::<UntrackReply>(&out, b).removed, 1);
    assert_eq!(
        role_summaries(&out),
        [
            (
                c,
                third.phx_ref.clone(),
                spectator_standing(1, &owner.phx_ref)
            ),
            (
                e,
                fifth.phx_ref.clone(),
                spectator_standing(3, &owner.phx_ref)
            ),
        ]
    );
    let diff = the_diff(&out);
    assert_eq!(owner_ref(&diff.owner), Some(owner.phx_ref.as_str()));
    assert_eq!(refs_of(&diff.payload.leaves), refs(&[&second.phx_ref]));
    assert_eq!(
        h.listed_refs("doc"),
        [
            owner.phx_ref,
            third.phx_ref,
            unheld.phx_ref,
            fifth.phx_ref.clone()
        ]
    );

    // The last in line leaving moves nobody.
    let out = h.untrack_ref(e, "doc", &fifth.phx_ref);
    assert!(role_changes(&out).is_empty(), "{out:?}");
}

#[test]
fn departures_applied_together_send_each_held_entry_one_role_event() {
    let mut h = Harness::new();
    let [a, b, c, d] = h.connect_in_turn();
    let owner = h.track(a, "doc", "x");
    let second = h.track(b, "doc", "y");
    let third = h.track(c, "doc", "z");
    let fourth = h.track(d, "doc", "w");

    // The second and third leave in one run: the fourth moves from 3 to 1
    // and hears it once; the owner hears nothing.
    let out = h.end(&[Ending::Closed(c), Ending::Closed(b)]);
    assert_eq!(
        role_summaries(&out),
        [(
            d,
            fourth.phx_ref.clone(),
            spectator_standing(1, &owner.phx_ref)
        )]
    );
    assert_eq!(h.listed_refs("doc"), [owner.phx_ref, fourth.phx_ref]);
    assert!(!h.listed_refs("doc").contains(&second.phx_ref));
    assert!(!h.listed_refs("doc").contains(&third.phx_ref));
}

#[test]
fn a_resumed_entry_hears_what_changed_while_nobody_held_it_after_the_reply() {
    let mut h = Harness::new();
    let [a, b, c, d] = h.connect_in_turn();
    let owner = h.track(a, "doc", "x");
    let second = h.track(b, "doc", "y");
    let away = h.track_process(c, "doc", "z");
    let behind = h.track_process(d, "doc", "w");
    h.close(c);
    h.close(d);
    // Two changes while away: the second leaves, then the owner.
    h.untrack_ref(b, "doc", &second.phx_ref);
    h.untrack_ref(a, "doc", &owner.phx_ref);

    // One role event, with the standing now, after the reply.
    let c_again = h.connect(ALICE);
    let out = h.resume(c_again, &[&away.resume_token]);
    let reply: ResumeReply = ok_reply(&out, c_again);
    assert_eq!(
        summary(&reply.roles[&away.phx_ref]),
        owner_standing(&away.phx_ref)
    );
    assert!(matches!(out.deliveries[0], Delivery::Reply { .. }));
    assert_eq!(
        role_summaries(&out),
        [(c_again, away.phx_ref.clone(), owner_standing(&away.phx_ref))]
    );

    // Once told, it is not told again: resumed after another close, with
    // nothing changed meanwhile, it hears only the reply.
    h.close(c_again);
    let c_third = h.connect(ALICE);
    let out = h.resume(c_third, &[&away.resume_token]);
    assert!(role_changes(&out).is_empty(), "{out:?}");
    assert_eq!(out.deliveries.len(), 1);

    // The entry behind was let go at position 3 and stands at 1 now.
    let d_again = h.connect(BOB);
    let out = h.resume(d_again, &[&behind.resume_token]);
    assert_eq!(
        role_summaries(&out),
        [(
            d_again,
            behind.phx_ref.clone(),
            spectator_standing(1, &away.phx_ref)
        )]
    );
}

#[test]
fn a_resumed_entry_whose_standing_did_not_change_hears_only_the_reply() {
    let mut h = Harness::new();
    let [a, b, c] = h.connect_in_turn();
    let owner = h.track(a, "doc", "x");
    let away = h.track_process(b, "doc", "y");
    let later = h.track(c, "doc", "z");
    h.close(b);
    // Behind it, which does not move it; and an update of the owner,
    // which gives the owner a new ref but not a new place.
    h.untrack_ref(c, "doc", &later.phx_ref);
    h.update_ref(a, "doc", &owner.phx_ref, meta(json!({"n": 1})));

    let b_again = h.connect(BOB);
    let out = h.resume(b_again, &[&away.resume_token]);
    assert_eq!(ok_reply::<ResumeReply>(&out, b_again).resumed.len(), 1);
    assert!(role_changes(&out).is_empty(), "{out:?}");
}

#[test]
fn after_a_restart_an_entry_behind_a_dead_owner_hears_of_it_on_its_resume() {
    let stored = [
        stored_entry(1, "doc", "gone", Lifetime::Process, "t1"),
        stored_entry(2, "doc", "stays", Lifetime::Connection, "t2"),
        stored_entry(3, "doc", "last", Lifetime::Connection, "t3"),
        stored_entry(4, "other", "alone", Lifetime::Connection, "t4"),
    ];
    let (dead, kept) = stored.split_at(1);
    let registry =
        Registry::restore(Limits::default(), kept.to_vec(), 5).with_standings_as_stored(dead);
    let mut h = Harness::around(registry);
    let a = h.connect(ALICE);

    let out = h.resume(a, &["t3", "t2", "t4"]);
    let reply: ResumeReply = ok_reply(&out, a);
    assert_eq!(reply.resumed.len(), 3);
    // Told when stored: 2 a spectator at 1, 3 at 2, 4 the owner.
    assert_eq!(
        role_summaries(&out),
        [
            (a, ref_for(2), owner_standing(&ref_for(2))),
            (a, ref_for(3), spectator_standing(1, &ref_for(2))),
        ]
    );
}

#[test]
fn removing_the_last_entry_sends_no_role_events_and_forgets_the_topic() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let only = h.track(a, "doc", "x");
    let out = h.untrack_ref(a, "doc", &only.phx_ref);
    assert_eq!(ok_reply::<UntrackReply>(&out, a).removed, 1);
    assert!(role_changes(&out).is_empty());
    assert_eq!(h.registry.topic_count(), 0);
    assert_eq!(h.list("doc"), TopicPresences::default());
}

#[test]
fn owner_change_skips_process_entries_whose_connection_has_closed() {
    let mut h = Harness::new();
    let [a, b, c] = h.connect_in_turn();
    let owner = h.track(a, "doc", "x");
    let detached = h.track_process(b, "doc", "y");
    let third = h.track(c, "doc", "z");
    assert!(h.close(b).deliveries.is_empty(), "a process entry stays");

    let out = h.untrack_ref(a, "doc", &owner.phx_ref);

    // The detached entry is the new owner but nobody is there to tell; it
    // learns its standing when it is resumed.
    let roles = role_changes(&out);
    assert_eq!(roles.len(), 1, "{roles:?}");
    assert_eq!(roles[0].0, c);
    assert_eq!(
        summary(&roles[0].1.standing),
        spectator_standing(1, &detached.phx_ref)
    );
    let b_again = h.connect(BOB);
    let out = h.resume(b_again, &[&detached.resume_token]);
    let resumed: ResumeReply = ok_reply(&out, b_again);
    assert_eq!(resumed.resumed, std::slice::from_ref(&detached.phx_ref));
    assert_eq!(
        summary(&resumed.roles[&detached.phx_ref]),
        owner_standing(&detached.phx_ref)
    );
    assert_eq!(
        role_summaries(&out),
        [(
            b_again,
            detached.phx_ref.clone(),
            owner_standing(&detached.phx_ref)
        )],
        "and, promoted while away, it is told so"
    );
    assert_eq!(h.listed_refs("doc"), [detached.phx_ref, third.phx_ref]);
}

// ---------------------------------------------------------------------------
// Update
// ---------------------------------------------------------------------------

#[test]
fn update_is_one_diff_leaving_the_old_meta_and_joining_the_new_one() {
    let mut h = Harness::new();
    let (a, b, watcher) = (h.connect(ALICE), h.connect(BOB), h.connect(BOB));
    h.subscribe(watcher, "doc");
    let mut request = track_request("doc", "x");
    request.meta = meta(json!({"status": "reading"}));
    let owner: TrackReply = ok_reply(&h.try_track(a, request), a);
    let spectator = h.track(b, "doc", "y");
    let listed_before = h.list("doc");
    let old_meta = listed_before.presences["x"].metas[0].clone();
    // Time passes: an update must not move joined_at.
    h.now += 5_000;

    let out = h.update_ref(a, "doc", &owner.phx_ref, meta(json!({"status": "editing"})));

    let reply: UpdateReply = ok_reply(&out, a);
    assert_ne!(reply.phx_ref, owner.phx_ref);
    assert_eq!(reply.prev_ref, owner.phx_ref);
    assert!(
        role_changes(&out).is_empty(),
        "an update never moves an owner"
    );

    let diff = the_diff(&out);
    assert_eq!(diff.to, [watcher]);
    assert_eq!(diff.payload.leaves.len(), 1);
    assert_eq!(
        diff.payload.leaves["x"].metas,
        std::slice::from_ref(&old_meta)
    );
    let joined = &diff.payload.joins["x"].metas;
    assert_eq!(joined.len(), 1);
    let new_meta = &joined[0];
    assert_eq!(new_meta.phx_ref, reply.phx_ref);
    assert_eq!(
        new_meta.phx_ref_prev.as_deref(),
        Some(owner.phx_ref.as_str())
    );
    assert_eq!(new_meta.seq, owner.seq);
    assert_eq!(new_meta.joined_at, owner.joined_at);
    assert_eq!(new_meta.client, meta(json!({"status": "editing"})));
    assert_eq!(
        diff.reasons,
        BTreeMap::from([(owner.phx_ref.clone(), LeaveReason::Update)])
    );
    assert_eq!(owner_ref(&diff.owner), Some(reply.phx_ref.as_str()));

    let listed = h.list("doc");
    assert_eq!(owner_ref(&listed.owner), Some(reply.phx_ref.as_str()));
    assert_eq!(listed.presences["x"].metas, std::slice::from_ref(new_meta));
    assert_eq!(
        h.listed_refs("doc"),
        [reply.phx_ref.clone(), spectator.phx_ref]
    );

    // The old row goes and the new version is written.
    assert_eq!(row_changes(&out).len(), 2);
    assert_eq!(row_changes(&out)[0], Change::Delete(owner.phx_ref.clone()));
    match &row_changes(&out)[1] {
        Change::Put(entry) => {
            assert_eq!(entry.phx_ref, reply.phx_ref);
            assert_eq!(entry.prev_ref.as_deref(), Some(owner.phx_ref.as_str()));
            assert_eq!(entry.seq, owner.seq);
        }
        other => panic!("expected a put, got {other:?}"),
    }

    // The old ref is gone: it can be neither updated nor untracked again.
    let stale = h.update_ref(a, "doc", &owner.phx_ref, Map::new());
    assert_refused(&stale, a, ErrorCode::NotFound);
    let stale = h.untrack_ref(a, "doc", &owner.phx_ref);
    assert_eq!(ok_reply::<UntrackReply>(&stale, a).removed, 0);
}

/// The one update event in an outbox.
fn update_event(out: &Outbox) -> HistoryEvent {
    let updates: Vec<&HistoryEvent> = out
        .changes
        .iter()
        .filter_map(|change| match change {
            Change::History(event) if event.kind == HistoryKind::Update => Some(&**event),
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), 1, "{out:?}");
    updates[0].clone()
}

#[test]
fn a_meta_change_is_the_fields_added_or_changed_and_the_names_removed() {
    let old = meta(json!({"file": "a.md", "line": 3, "mode": "insert", "same": [1]}));
    let new = meta(json!({"file": "b.md", "line": 3, "saves": 1, "same": [1]}));
    let (changed, removed) = meta_change(&old, &new);
    assert_eq!(changed, meta(json!({"file": "b.md", "saves": 1})));
    assert_eq!(removed, ["mode"]);
    assert_eq!(meta_change(&new, &new), (Map::new(), Vec::new()));
}

#[test]
fn an_update_event_says_what_the_update_did_to_the_meta() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let mut request = track_request("doc", "x");
    request.meta = meta(json!({"line": 3, "mode": "insert"}));
    let tracked: TrackReply = ok_reply(&h.try_track(a, request), a);
    h.now += 1_000;
    let out = h.update_ref(a, "doc", &tracked.phx_ref, meta(json!({"line": 4})));
    let reply: UpdateReply = ok_reply(&out, a);
    let event = update_event(&out);
    assert_eq!(
        (event.at, event.phx_ref.as_str(), event.key.as_str()),
        (h.now, reply.phx_ref.as_str(), "x")
    );
    assert_eq!(event.changed, Some(meta(json!({"line": 4}))));
    assert_eq!(event.removed, Some(vec!["mode".to_owned()]));
}

/// Any client may update as often as it likes, each time with a whole
/// meta of up to --max-meta bytes: the history keeps a bounded part.
#[test]
fn an_update_event_keeps_a_bounded_part_of_a_large_meta_change() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let mut request = track_request("doc", "x");
    let old: Map<String, Value> = (0..40).map(|n| (format!("old{n:02}"), json!(n))).collect();
    request.meta = old.clone();
    let tracked: TrackReply = ok_reply(&h.try_track(a, request), a);

    let short = "s".repeat(HISTORY_VALUE_MAX_BYTES - 2);
    let long = "l".repeat(HISTORY_VALUE_MAX_BYTES - 1);
    let mut new =
        meta(json!({"a_short": short, "b_long": long, "c_big": {"text": "x".repeat(2000)}}));
    for n in 0..60 {
        new.insert(format!("d_field{n:02}"), json!("v".repeat(60)));
    }
    assert!(meta_size(&new) <= Limits::default().max_meta_bytes);
    let event = update_event(&h.update_ref(a, "doc", &tracked.phx_ref, new.clone()));
    let changed = event.changed.expect("changed");
    let removed = event.removed.expect("removed");

    // A value whose JSON is at most HISTORY_VALUE_MAX_BYTES is kept whole;
    // a longer one becomes its size.
    assert_eq!(changed["a_short"], json!(short));
    assert_eq!(
        changed["b_long"],
        json!(format!("… ({} bytes)", HISTORY_VALUE_MAX_BYTES + 1))
    );
    assert_eq!(changed["c_big"], json!("… (2011 bytes)"));
    // The fields that fit, in order, and how many did not.
    let kept_fields = changed.len() - 1 + removed.len();
    let left_out = changed[HISTORY_LEFT_OUT_FIELD].as_u64().expect("a count");
    assert_eq!(
        kept_fields as u64 + left_out,
        63 + 40,
        "{changed:?} {removed:?}"
    );
    assert!(left_out > 0);
    assert!(changed.contains_key("d_field00"), "{changed:?}");
    for (field, value) in &changed {
        if !matches!(field.as_str(), HISTORY_LEFT_OUT_FIELD | "b_long" | "c_big") {
            assert_eq!(Some(value), new.get(field), "{field}");
        }
    }
    assert!(removed.iter().all(|field| old.contains_key(field)));
    let stored = json_size(&changed) + json_size(&removed);
    assert!(
        stored <= HISTORY_CHANGE_MAX_BYTES + 32,
        "{stored} bytes, from a meta of {}",
        meta_size(&new)
    );
}

#[test]
fn updated_entry_is_still_found_by_its_process_connection_and_token() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let tracked = h.track_process(a, "doc", "x");
    let updated: UpdateReply = ok_reply(
        &h.update_ref(a, "doc", &tracked.phx_ref, meta(json!({"n": 1}))),
        a,
    );
    // By the connection: the key is still taken, and update by key finds it.
    assert_refused(
        &h.try_track(a, process_request("doc", "x")),
        a,
        ErrorCode::AlreadyTracked,
    );
    let by_key: UpdateReply = ok_reply(&h.update_key(a, "doc", "x"), a);
    assert_eq!(by_key.prev_ref, updated.phx_ref);
    // By the token: it resumes under its latest ref.
    h.close(a);
    let a_again = h.connect(ALICE);
    let resumed: ResumeReply = ok_reply(&h.resume(a_again, &[&tracked.resume_token]), a_again);
    assert_eq!(resumed.resumed, std::slice::from_ref(&by_key.phx_ref));
    // By the process: its exit removes it.
    let out = h.process_exited(process_of(a));
    assert_eq!(row_changes(&out), [Change::Delete(by_key.phx_ref)]);
    assert_eq!(h.registry.entry_count(), 0);
}

#[test]
fn update_by_key_needs_exactly_one_entry_of_the_connection() {
    let mut h = Harness::new();
    let (a, b) = (h.connect(ALICE), h.connect(ALICE));
    h.track(b, "doc", "x");
    // The entry for the key belongs to another connection.
    assert_refused(&h.update_key(a, "doc", "x"), a, ErrorCode::NotFound);
}

// ---------------------------------------------------------------------------
// Tracking rules and permissions
// ---------------------------------------------------------------------------

#[test]
fn tracking_the_same_key_twice_on_one_connection_is_already_tracked() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    h.track(a, "doc", "x");
    assert_refused(
        &h.try_track(a, track_request("doc", "x")),
        a,
        ErrorCode::AlreadyTracked,
    );
    assert_refused(
        &h.try_track(a, process_request("doc", "x")),
        a,
        ErrorCode::AlreadyTracked,
    );
    // Another key, or the same key on another topic, is fine.
    h.track(a, "doc", "y");
    h.track(a, "other", "x");
    assert_eq!(h.registry.entry_count(), 3);
}

#[test]
fn the_same_key_from_different_connections_is_two_entries() {
    let mut h = Harness::new();
    let (a, b) = (h.connect(ALICE), h.connect(ALICE));
    let first = h.track(a, "doc", "x");
    let second = h.track(b, "doc", "x");
    assert_eq!(second.standing.position, 1);
    let listed = h.list("doc");
    let metas = &listed.presences["x"].metas;
    assert_eq!(
        metas.iter().map(|m| m.phx_ref.clone()).collect::<Vec<_>>(),
        [first.phx_ref, second.phx_ref]
    );
}

#[test]
fn another_connections_connection_entry_may_not_be_untracked_or_updated() {
    let mut h = Harness::new();
    let (a, same_user, other_user) = (h.connect(ALICE), h.connect(ALICE), h.connect(BOB));
    let entry = h.track(a, "doc", "x");

    for conn in [same_user, other_user] {
        assert_refused(
            &h.untrack_ref(conn, "doc", &entry.phx_ref),
            conn,
            ErrorCode::PermissionDenied,
        );
        assert_refused(
            &h.update_ref(conn, "doc", &entry.phx_ref, Map::new()),
            conn,
            ErrorCode::PermissionDenied,
        );
    }
    assert_eq!(h.listed_refs("doc"), [entry.phx_ref]);
}

#[test]
fn the_same_uid_may_untrack_and_update_a_process_entry_from_another_connection() {
    let mut h = Harness::new();
    let (a, same_user, other_user) = (h.connect(ALICE), h.connect(ALICE), h.connect(BOB));
    let entry = h.track_process(a, "doc", "x");

    assert_refused(
        &h.update_ref(other_user, "doc", &entry.phx_ref, Map::new()),
        other_user,
        ErrorCode::PermissionDenied,
    );
    assert_refused(
        &h.untrack_ref(other_user, "doc", &entry.phx_ref),
        other_user,
        ErrorCode::PermissionDenied,
    );

    let updated: UpdateReply = ok_reply(
        &h.update_ref(same_user, "doc", &entry.phx_ref, meta(json!({"by": "b"}))),
        same_user,
    );
    let out = h.untrack_ref(same_user, "doc", &updated.phx_ref);
    assert_eq!(ok_reply::<UntrackReply>(&out, same_user).removed, 1);
    assert_eq!(h.registry.entry_count(), 0);
}

#[test]
fn root_may_untrack_and_update_any_entry() {
    let mut h = Harness::new();
    let (a, b, root) = (h.connect(ALICE), h.connect(BOB), h.connect(ROOT));
    let alices = h.track(a, "doc", "x");
    let bobs = h.track(b, "doc", "y");

    let updated: UpdateReply = ok_reply(
        &h.update_ref(root, "doc", &bobs.phx_ref, meta(json!({"by": "root"}))),
        root,
    );
    let out = h.untrack_ref(root, "doc", &alices.phx_ref);
    assert_eq!(ok_reply::<UntrackReply>(&out, root).removed, 1);
    // Bob's updated entry is now the owner, and bob is told so.
    let roles = role_changes(&out);
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0].0, b);
    assert_eq!(roles[0].1.phx_ref, updated.phx_ref);
    assert_eq!(roles[0].1.standing.role, Role::Owner);
    // Root's update kept the entry with bob's connection.
    let out = h.close(b);
    assert_eq!(row_changes(&out), [Change::Delete(updated.phx_ref)]);
}

#[test]
fn untrack_by_key_silently_skips_entries_the_caller_may_not_remove() {
    let mut h = Harness::new();
    let (a, b, c, d, root) = (
        h.connect(ALICE),
        h.connect(BOB),
        h.connect(ALICE),
        h.connect(ALICE),
        h.connect(ROOT),
    );
    let alices_connection_entry = h.track(a, "doc", "x");
    let bobs_entry = h.track(b, "doc", "x");
    let alices_process_entry = h.track_process(c, "doc", "x");
    let other_key = h.track(d, "doc", "y");

    // d may remove alice's process entry, but neither a's connection entry
    // nor bob's.
    let out = h.untrack_key(d, "doc", "x");
    assert_eq!(ok_reply::<UntrackReply>(&out, d).removed, 1);
    assert_eq!(
        row_changes(&out),
        [Change::Delete(alices_process_entry.phx_ref)]
    );

    let out = h.untrack_key(a, "doc", "x");
    assert_eq!(ok_reply::<UntrackReply>(&out, a).removed, 1);
    assert_eq!(
        row_changes(&out),
        [Change::Delete(alices_connection_entry.phx_ref)]
    );

    let out = h.untrack_key(d, "doc", "x");
    assert_eq!(ok_reply::<UntrackReply>(&out, d).removed, 0);
    assert!(out.changes.is_empty());

    let out = h.untrack_key(root, "doc", "x");
    assert_eq!(ok_reply::<UntrackReply>(&out, root).removed, 1);
    assert_eq!(row_changes(&out), [Change::Delete(bobs_entry.phx_ref)]);
    assert_eq!(h.listed_refs("doc"), [other_key.phx_ref]);
}

#[test]
fn untrack_of_an_unknown_ref_or_a_ref_on_another_topic_removes_nothing() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let entry = h.track(a, "doc", "x");
    for (topic, phx_ref) in [("doc", "p999"), ("other", entry.phx_ref.as_str())] {
        let out = h.untrack_ref(a, topic, phx_ref);
        assert_eq!(ok_reply::<UntrackReply>(&out, a).removed, 0);
        assert!(out.changes.is_empty());
    }
    assert_refused(
        &h.update_ref(a, "other", &entry.phx_ref, Map::new()),
        a,
        ErrorCode::NotFound,
    );
    assert_eq!(h.registry.entry_count(), 1);
}

#[test]
fn untrack_and_update_need_a_ref_or_a_key() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    h.track(a, "doc", "x");
    let untrack = Op::Untrack(UntrackRequest {
        topic: "doc".into(),
        phx_ref: None,
        key: None,
    });
    assert_refused(&h.handle(a, untrack), a, ErrorCode::BadRequest);
    let update = Op::Update(UpdateRequest {
        topic: "doc".into(),
        phx_ref: None,
        key: None,
        meta: Map::new(),
    });
    assert_refused(&h.handle(a, update), a, ErrorCode::BadRequest);
}

#[test]
fn bad_topic_or_key_names_are_bad_request() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    assert_refused(
        &h.try_track(a, track_request("", "x")),
        a,
        ErrorCode::BadRequest,
    );
    assert_refused(
        &h.try_track(a, track_request("doc", "x\ny")),
        a,
        ErrorCode::BadRequest,
    );
    assert_refused(&h.subscribe(a, "a\tb"), a, ErrorCode::BadRequest);
}

#[test]
fn requests_from_a_closed_connection_change_nothing() {
    let mut h = Harness::new();
    let (a, b) = (h.connect(ALICE), h.connect(ALICE));
    let entry = h.track_process(b, "doc", "x");
    h.close(a);
    assert_refused(
        &h.try_track(a, track_request("doc", "y")),
        a,
        ErrorCode::Internal,
    );
    assert_refused(&h.subscribe(a, "doc"), a, ErrorCode::Internal);
    // A closed connection has no uid, so not even its user's process entry
    // is its to change.
    assert_refused(
        &h.untrack_ref(a, "doc", &entry.phx_ref),
        a,
        ErrorCode::PermissionDenied,
    );
    let resumed: ResumeReply = ok_reply(&h.resume(a, &[&entry.resume_token]), a);
    assert!(resumed.resumed.is_empty() && resumed.expired.is_empty());
    assert_eq!(h.registry.subscription_count(), 0);
    assert_eq!(h.registry.entry_count(), 1);
}

// ---------------------------------------------------------------------------
// Processes, closing and resuming
// ---------------------------------------------------------------------------

#[test]
fn a_process_exit_removes_every_entry_of_that_process_with_reason_pid_exit() {
    let mut h = Harness::new();
    let [a, b, c, watcher] = h.connect_in_turn();
    h.subscribe(watcher, "doc");
    h.subscribe(watcher, "notes");
    let editor = ProcessId {
        pid: 321,
        start_time: 10,
    };
    // One process joins through two connections and with both lifetimes.
    let doc: TrackReply = ok_reply(&h.track_as(a, track_request("doc", "x"), editor), a);
    let notes: TrackReply = ok_reply(&h.track_as(c, process_request("notes", "x"), editor), c);
    let survivor = h.track(b, "doc", "y");

    let out = h.process_exited(editor);

    let mut all = diffs(&out);
    all.sort_by(|l, r| l.topic.cmp(&r.topic));
    assert_eq!(all.len(), 2, "one diff per topic: {all:?}");
    assert_eq!(all[0].topic, "doc");
    assert_eq!(
        all[0].reasons,
        BTreeMap::from([(doc.phx_ref.clone(), LeaveReason::PidExit)])
    );
    assert_eq!(all[1].topic, "notes");
    assert_eq!(
        all[1].reasons,
        BTreeMap::from([(notes.phx_ref.clone(), LeaveReason::PidExit)])
    );
    assert_eq!(all[1].owner, None);
    let roles = role_changes(&out);
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0].0, b);
    assert_eq!(
        summary(&roles[0].1.standing),
        owner_standing(&survivor.phx_ref)
    );
    assert_eq!(h.registry.entry_count(), 1);
    assert_eq!(h.registry.processes().collect::<Vec<_>>(), [process_of(b)]);
}

#[test]
fn an_exit_of_a_reused_pid_with_another_start_time_removes_nothing() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    h.track(a, "doc", "x");
    let reused = ProcessId {
        start_time: process_of(a).start_time + 1,
        ..process_of(a)
    };
    let out = h.process_exited(reused);
    assert!(out.deliveries.is_empty() && out.changes.is_empty());
    assert_eq!(h.registry.entry_count(), 1);
}

#[test]
fn close_removes_connection_entries_and_keeps_process_entries() {
    let mut h = Harness::new();
    let (a, b, watcher) = (h.connect(ALICE), h.connect(BOB), h.connect(BOB));
    h.subscribe(watcher, "doc");
    h.subscribe(watcher, "build");
    let connection_entry = h.track(a, "doc", "x");
    let process_entry = h.track_process(a, "build", "x");
    let spectator = h.track(b, "build", "y");

    let out = h.close(a);

    let diff = the_diff(&out);
    assert_eq!(diff.topic, "doc");
    assert_eq!(
        diff.reasons,
        BTreeMap::from([(connection_entry.phx_ref.clone(), LeaveReason::Closed)])
    );
    assert!(role_changes(&out).is_empty(), "build keeps its owner");
    assert_eq!(
        row_changes(&out),
        [Change::Delete(connection_entry.phx_ref)]
    );
    let build = h.list("build");
    assert_eq!(
        owner_ref(&build.owner),
        Some(process_entry.phx_ref.as_str())
    );
    assert_eq!(
        h.listed_refs("build"),
        [process_entry.phx_ref.clone(), spectator.phx_ref]
    );
    let kept = h
        .registry
        .entries()
        .find(|e| e.phx_ref == process_entry.phx_ref)
        .unwrap();
    assert_eq!(kept.conn, None);
}

#[test]
fn a_process_entry_resumes_by_token_from_a_new_connection_of_the_same_uid() {
    let mut h = Harness::new();
    let [a, b] = h.connect_in_turn();
    let owner = h.track_process(a, "doc", "x");
    let spectator = h.track(b, "doc", "y");
    h.close(a);

    let a_again = h.connect(ALICE);
    let out = h.resume(a_again, &[&owner.resume_token, "token-unknown"]);

    let reply: ResumeReply = ok_reply(&out, a_again);
    assert_eq!(reply.resumed, std::slice::from_ref(&owner.phx_ref));
    assert_eq!(reply.expired, ["token-unknown"]);
    assert_eq!(
        summary(&reply.roles[&owner.phx_ref]),
        owner_standing(&owner.phx_ref)
    );
    assert_eq!(
        out.deliveries.len(),
        1,
        "resuming tells nobody else, and the owner's standing did not change"
    );

    // The new connection now holds it: it hears the role events.
    h.subscribe(b, "doc");
    let later = h.track(b, "doc", "z");
    let out = h.untrack_ref(b, "doc", &spectator.phx_ref);
    assert_eq!(
        role_summaries(&out),
        [(
            b,
            later.phx_ref.clone(),
            spectator_standing(1, &owner.phx_ref)
        )],
        "only the entry behind the one that left moves"
    );
    let out = h.untrack_ref(a_again, "doc", &owner.phx_ref);
    assert_eq!(ok_reply::<UntrackReply>(&out, a_again).removed, 1);
    let roles = role_changes(&out);
    assert_eq!(roles.len(), 1);
    assert_eq!(
        (roles[0].0, roles[0].1.phx_ref.as_str()),
        (b, later.phx_ref.as_str())
    );

    // An entry already held by a connection cannot be resumed again.
    let held = h.track_process(a_again, "doc", "w");
    let a_third = h.connect(ALICE);
    let reply: ResumeReply = ok_reply(&h.resume(a_third, &[&held.resume_token]), a_third);
    assert!(reply.resumed.is_empty());
    assert_eq!(reply.expired, [held.resume_token]);
}

#[test]
fn resuming_another_uids_token_reports_it_expired() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let entry = h.track_process(a, "doc", "x");
    h.close(a);
    let bob = h.connect(BOB);
    let reply: ResumeReply = ok_reply(&h.resume(bob, &[&entry.resume_token]), bob);
    assert!(reply.resumed.is_empty() && reply.roles.is_empty());
    assert_eq!(reply.expired, std::slice::from_ref(&entry.resume_token));
    // Root cannot take it over either: a token is its uid's.
    let root = h.connect(ROOT);
    let reply: ResumeReply = ok_reply(&h.resume(root, &[&entry.resume_token]), root);
    assert_eq!(reply.expired, [entry.resume_token]);
    assert_eq!(
        h.registry.entries().next().map(|e| e.conn),
        Some(None),
        "still detached"
    );
}

#[test]
fn resuming_past_the_entry_limit_refuses_the_token_and_keeps_it_valid() {
    let mut h = Harness::with_limits(Limits {
        max_entries_per_connection: 1,
        ..Limits::default()
    });
    let a = h.connect(ALICE);
    let first = h.track_process(a, "doc", "x");
    h.close(a);
    let full = h.connect(ALICE);
    h.track(full, "other", "y");

    let out = h.resume(full, &[&first.resume_token]);

    let reply: ResumeReply = ok_reply(&out, full);
    assert!(reply.resumed.is_empty() && reply.expired.is_empty());
    assert_eq!(
        refused_codes(&out, full),
        BTreeMap::from([(first.resume_token.clone(), ErrorCode::LimitExceeded)])
    );
    // The entry is still free: a connection with room takes it.
    let roomy = h.connect(ALICE);
    let reply: ResumeReply = ok_reply(&h.resume(roomy, &[&first.resume_token]), roomy);
    assert_eq!(reply.resumed, [first.phx_ref]);
}

#[test]
fn resuming_a_key_the_connection_already_holds_is_refused() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let first = h.track_process(a, "doc", "y");
    h.close(a);
    let a_again = h.connect(ALICE);
    h.track(a_again, "doc", "y");

    let out = h.resume(a_again, &[&first.resume_token]);

    assert_eq!(
        refused_codes(&out, a_again),
        BTreeMap::from([(first.resume_token, ErrorCode::AlreadyTracked)])
    );
    // So a connection never holds two entries for one key, and update by
    // key always knows which one is meant.
    let out = h.update_key(a_again, "doc", "y");
    ok_reply::<UpdateReply>(&out, a_again);
}

#[test]
fn a_resumed_connection_entry_leaves_when_its_new_connection_closes() {
    let entry = stored_entry(4, "doc", "x", Lifetime::Connection, "tok");
    let mut h = Harness::around(Registry::restore(Limits::default(), vec![entry], 5));
    let a = h.connect(ALICE);
    let reply: ResumeReply = ok_reply(&h.resume(a, &["tok"]), a);
    assert_eq!(reply.resumed, ["p4"]);
    let out = h.close(a);
    assert_eq!(row_changes(&out), [Change::Delete("p4".into())]);
}

// ---------------------------------------------------------------------------
// Taking a batch back
// ---------------------------------------------------------------------------

#[test]
fn a_close_rolled_back_then_retried_sends_what_an_unfailed_close_sends() {
    let mut h = Harness::new();
    let (a, b, watcher) = (h.connect(ALICE), h.connect(BOB), h.connect(BOB));
    h.subscribe(watcher, "doc");
    h.track(a, "doc", "owner");
    h.track_process(a, "build", "kept");
    h.track(b, "doc", "next");
    h.subscribe(a, "build");
    let mut unfailed = Harness::around(h.registry.clone());
    let before = dump(&h.registry);

    h.registry.begin_batch();
    let failed = h.close(a);
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), before, "the close left no trace");
    let retried = h.close(a);
    let expected = unfailed.close(a);

    assert_eq!(failed.deliveries, expected.deliveries);
    assert_eq!(retried.deliveries, expected.deliveries);
    assert_eq!(retried.changes, expected.changes);
    assert_eq!(dump(&h.registry), dump(&unfailed.registry));
    assert_eq!(
        role_summaries(&retried).len(),
        1,
        "the next in line is promoted"
    );
}

#[test]
fn a_resume_rolled_back_can_be_resumed_again() {
    let mut waiting = stored_entry(3, "doc", "x", Lifetime::Connection, "tok-3");
    waiting.resume_deadline = Some(2_000);
    let mut h = Harness::around(Registry::restore(Limits::default(), vec![waiting], 4));
    let a = h.connect(ALICE);

    h.registry.begin_batch();
    let reply: ResumeReply = ok_reply(&h.resume(a, &["tok-3"]), a);
    assert_eq!(reply.resumed, ["p3"]);
    h.registry.roll_back();

    assert_eq!(
        h.registry.next_resume_deadline(),
        Some(2_000),
        "waiting again"
    );
    assert_eq!(h.registry.entries().next().map(|e| e.conn), Some(None));
    let reply: ResumeReply = ok_reply(&h.resume(a, &["tok-3"]), a);
    assert_eq!(reply.resumed, ["p3"]);
    assert_eq!(h.registry.next_resume_deadline(), None);
}

#[test]
fn rolling_back_a_repeated_subscribe_keeps_the_first_subscription() {
    let mut h = Harness::new();
    let watcher = h.connect(BOB);
    h.subscribe(watcher, "doc");
    let before = dump(&h.registry);

    h.registry.begin_batch();
    h.subscribe(watcher, "doc");
    h.subscribe(watcher, "other");
    h.registry.roll_back();

    assert_eq!(dump(&h.registry), before);
    assert_eq!(h.registry.subscription_count(), 1);
}

#[test]
fn a_settled_batch_stays_and_the_next_roll_back_undoes_only_its_own_batch() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    h.registry.begin_batch();
    let kept = h.track(a, "doc", "x");
    h.registry.settle();
    let before = dump(&h.registry);

    h.registry.begin_batch();
    h.track(a, "doc", "y");
    h.untrack_ref(a, "doc", &kept.phx_ref);
    h.registry.roll_back();

    assert_eq!(dump(&h.registry), before);
    assert_eq!(h.listed_refs("doc"), [kept.phx_ref]);
}

// ---------------------------------------------------------------------------
// Subscriptions and the order of lines
// ---------------------------------------------------------------------------

#[test]
fn subscribe_replies_before_it_sends_the_presence_state() {
    let mut h = Harness::new();
    let (a, b, watcher) = (h.connect(ALICE), h.connect(BOB), h.connect(BOB));
    let owner = h.track(a, "doc", "x");
    let spectator = h.track(b, "doc", "y");

    let out = h.subscribe(watcher, "doc");

    assert_eq!(kinds_for(&out, watcher), ["reply", "presence_state"]);
    assert!(the_reply(&out, watcher).ok);
    match events_to(&out, watcher)[0] {
        Event::PresenceState {
            topic,
            payload,
            owner: state_owner,
        } => {
            assert_eq!(topic, "doc");
            assert_eq!(
                refs_of(payload),
                refs(&[&owner.phx_ref, &spectator.phx_ref])
            );
            assert_eq!(owner_ref(state_owner), Some(owner.phx_ref.as_str()));
        }
        other => panic!("expected a presence_state, got {other:?}"),
    }
    // Subscribing to an empty topic is fine and shows it empty.
    let out = h.subscribe(watcher, "empty");
    assert_eq!(
        events_to(&out, watcher),
        [&Event::PresenceState {
            topic: "empty".into(),
            payload: Presences::new(),
            owner: None,
        }]
    );
}

#[test]
fn a_subscribed_tracker_gets_its_reply_before_the_diff_of_its_own_join() {
    let mut h = Harness::new();
    let [a, watcher] = h.connect_in_turn();
    h.subscribe(a, "doc");
    h.subscribe(watcher, "doc");
    let out = h.try_track(a, track_request("doc", "x"));
    assert_eq!(kinds_for(&out, a), ["reply", "presence_diff"]);
    assert_eq!(kinds_for(&out, watcher), ["presence_diff"]);
    let reply: TrackReply = ok_reply(&out, a);
    let diff = the_diff(&out);
    assert_eq!(diff.to, [a, watcher]);
    assert_eq!(refs_of(&diff.payload.joins), refs(&[&reply.phx_ref]));
    assert!(diff.payload.leaves.is_empty() && diff.reasons.is_empty());
    assert_eq!(owner_ref(&diff.owner), Some(reply.phx_ref.as_str()));
}

#[test]
fn track_with_subscribe_replies_then_sends_a_state_that_includes_the_entry() {
    let mut h = Harness::new();
    let [a, watcher] = h.connect_in_turn();
    h.subscribe(watcher, "doc");
    let mut request = track_request("doc", "x");
    request.subscribe = true;

    let out = h.try_track(a, request);

    assert_eq!(kinds_for(&out, a), ["reply", "presence_state"]);
    assert_eq!(kinds_for(&out, watcher), ["presence_diff"]);
    let reply: TrackReply = ok_reply(&out, a);
    match events_to(&out, a)[0] {
        Event::PresenceState { payload, .. } => {
            assert_eq!(refs_of(payload), refs(&[&reply.phx_ref]));
        }
        other => panic!("expected a presence_state, got {other:?}"),
    }
    // The tracker is now a subscriber.
    let b = h.connect(BOB);
    let out = h.try_track(b, track_request("doc", "y"));
    assert_eq!(the_diff(&out).to, [a, watcher]);
}

#[test]
fn unsubscribe_and_close_end_a_subscription() {
    let mut h = Harness::new();
    let (a, left, closed, stays) = (
        h.connect(ALICE),
        h.connect(BOB),
        h.connect(BOB),
        h.connect(BOB),
    );
    for conn in [left, closed, stays] {
        h.subscribe(conn, "doc");
    }
    assert_eq!(h.registry.subscription_count(), 3);
    let out = h.handle(left, Op::Unsubscribe(Subscription::Topic("doc".into())));
    assert!(the_reply(&out, left).ok);
    h.close(closed);
    assert_eq!(h.registry.subscription_count(), 1);

    let out = h.try_track(a, track_request("doc", "x"));
    assert_eq!(the_diff(&out).to, [stays]);
    // Unsubscribed from everything, an empty topic is forgotten.
    h.handle(stays, Op::Unsubscribe(Subscription::Topic("doc".into())));
    h.untrack_key(a, "doc", "x");
    assert!(h.registry.topics.is_empty());
}

#[test]
fn resync_sends_a_fresh_state_only_for_topics_still_subscribed() {
    let mut h = Harness::new();
    let [a, watcher] = h.connect_in_turn();
    h.subscribe(watcher, "doc");
    let entry = h.track(a, "doc", "x");
    let mut out = Outbox::default();
    h.registry.resync(
        watcher,
        &["doc".to_owned(), "never-subscribed".to_owned()],
        &mut out,
    );
    let out = made(out);
    assert_eq!(kinds_for(&out, watcher), ["presence_state"]);
    match events_to(&out, watcher)[0] {
        Event::PresenceState { topic, payload, .. } => {
            assert_eq!(topic, "doc");
            assert_eq!(refs_of(payload), refs(&[&entry.phx_ref]));
        }
        other => panic!("expected a presence_state, got {other:?}"),
    }
}

#[test]
fn subscribing_to_all_gives_every_topic_its_state_then_its_diffs() {
    let mut h = Harness::new();
    let (a, watcher, one_topic) = (h.connect(ALICE), h.connect(BOB), h.connect(BOB));
    let x = h.track(a, "b-doc", "x");
    // A topic that only has a subscriber is nobody's: no state for it.
    h.subscribe(one_topic, "empty");

    let out = h.handle(watcher, Op::Subscribe(Subscription::All));
    assert!(the_reply(&out, watcher).ok);
    assert_eq!(kinds_for(&out, watcher), ["reply", "presence_state"]);
    match events_to(&out, watcher)[0] {
        Event::PresenceState { topic, payload, .. } => {
            assert_eq!(topic, "b-doc");
            assert_eq!(refs_of(payload), refs(&[&x.phx_ref]));
        }
        other => panic!("expected a presence_state, got {other:?}"),
    }

    // A topic that appears later, and one with its own subscriber too:
    // each diff reaches the watcher once.
    let out = h.try_track(a, track_request("a-new", "y"));
    let diff = the_diff(&out);
    assert_eq!((diff.topic.as_str(), diff.to), ("a-new", vec![watcher]));
    h.subscribe(one_topic, "b-doc");
    let out = h.try_track(a, track_request("b-doc", "z"));
    let mut to = the_diff(&out).to;
    to.sort();
    let mut both = vec![watcher, one_topic];
    both.sort();
    assert_eq!(to, both);

    // A slow reader's stale topics get fresh states.
    let mut out = Outbox::default();
    h.registry.resync(watcher, &["a-new".to_owned()], &mut out);
    let out = made(out);
    assert_eq!(kinds_for(&out, watcher), ["presence_state"]);

    // A close rolled back keeps it; a subscription rolled back is gone;
    // closed, it is gone.
    let late = h.connect(BOB);
    let before = dump(&h.registry);
    let count = h.registry.subscription_count();
    h.registry.begin_batch();
    h.close(watcher);
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), before);
    assert_eq!(h.registry.subscription_count(), count);
    h.registry.begin_batch();
    h.handle(late, Op::Subscribe(Subscription::All));
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), before);

    h.close(watcher);
    assert_eq!(h.registry.subscription_count(), count - 1);
    let out = h.try_track(a, track_request("a-new", "w"));
    assert!(diffs(&out).is_empty(), "{out:?}");
}

#[test]
fn resyncing_every_topic_sends_each_state_then_says_so() {
    let mut h = Harness::new();
    let (a, watcher, named) = (h.connect(ALICE), h.connect(BOB), h.connect(BOB));
    let topics: Vec<String> = (0..50).map(|n| format!("t{n:02}")).collect();
    for topic in &topics {
        h.track(a, topic, "x");
    }
    h.handle(watcher, Op::Subscribe(Subscription::All));
    // An empty topic subscribed to by name has its state too.
    h.subscribe(named, "empty");
    h.subscribe(named, "t07");

    // Another topic empties while the watcher's diffs are held back: the
    // `resync` ahead of the states leaves it out, which is how the
    // watcher learns it is empty.
    h.track(a, "zz-gone", "x");
    h.untrack_key(a, "zz-gone", "x");

    let mut out = Outbox::default();
    h.registry.resync_all(watcher, &mut out);
    let out = made(out);
    let events = events_to(&out, watcher);
    let (resync, events) = events.split_first().expect("events");
    match resync {
        Event::Resync { payload } => assert_eq!(payload.topics, topics),
        other => panic!("expected a resync, got {other:?}"),
    }
    let states: Vec<&str> = events
        .iter()
        .map(|event| match event {
            Event::PresenceState { topic, payload, .. } => {
                assert_eq!(payload.len(), 1, "{topic}");
                topic.as_str()
            }
            other => panic!("expected a presence_state, got {other:?}"),
        })
        .collect();
    assert_eq!(states, topics);
    assert!(matches!(
        out.deliveries.last(),
        Some(Delivery::ResyncedAll(conn)) if *conn == watcher
    ));

    let mut out = Outbox::default();
    h.registry.resync_all(named, &mut out);
    let out = made(out);
    assert_eq!(kinds_for(&out, named), ["presence_state", "presence_state"]);

    // A connection gone still has its end said, for its queue's sake.
    h.close(watcher);
    let mut out = Outbox::default();
    h.registry.resync_all(watcher, &mut out);
    let out = made(out);
    assert!(matches!(&out.deliveries[..], [Delivery::ResyncedAll(_)]));
}

// ---------------------------------------------------------------------------
// Time
// ---------------------------------------------------------------------------

#[test]
fn joined_at_never_decreases_when_the_clock_goes_backwards() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    h.now = 5_000;
    assert_eq!(h.track(a, "doc", "x").joined_at, 5_000);
    h.now = 3_000;
    let after_step_back = h.track(a, "doc", "y");
    assert_eq!(after_step_back.joined_at, 5_000);
    h.now = 6_000;
    assert_eq!(h.track(a, "doc", "z").joined_at, 6_000);
    let listed = h.list("doc");
    let joined: Vec<i64> = ["x", "y", "z"]
        .iter()
        .map(|k| listed.presences[*k].metas[0].joined_at)
        .collect();
    assert_eq!(joined, [5_000, 5_000, 6_000]);
}

#[test]
fn joined_at_after_restore_is_not_below_any_restored_entry() {
    let entry = stored_entry(3, "doc", "x", Lifetime::Process, "tok");
    let restored_joined_at = entry.joined_at;
    let mut h = Harness::around(Registry::restore(Limits::default(), vec![entry], 4));
    h.now = restored_joined_at - 100;
    let a = h.connect(ALICE);
    assert_eq!(h.track(a, "doc", "y").joined_at, restored_joined_at);
}

// ---------------------------------------------------------------------------
// Limits and validation
// ---------------------------------------------------------------------------

#[test]
fn tracking_past_the_entry_limit_per_connection_is_limit_exceeded() {
    let mut h = Harness::with_limits(Limits {
        max_entries_per_connection: 2,
        ..Limits::default()
    });
    let (a, b) = (h.connect(ALICE), h.connect(ALICE));
    let first = h.track(a, "doc", "x");
    h.track(a, "doc", "y");
    assert_refused(
        &h.try_track(a, track_request("doc", "z")),
        a,
        ErrorCode::LimitExceeded,
    );
    // The limit is per connection, and untracking frees a place.
    h.track(b, "doc", "z");
    h.untrack_ref(a, "doc", &first.phx_ref);
    h.track(a, "doc", "z");
    assert_eq!(h.registry.entry_count(), 3);
}

#[test]
fn process_entries_are_capped_per_uid_across_connections() {
    let mut h = Harness::with_limits(Limits {
        max_process_entries_per_uid: 2,
        ..Limits::default()
    });
    let (a, b, other_user) = (h.connect(ALICE), h.connect(ALICE), h.connect(BOB));
    let first = h.track_process(a, "doc", "x");
    h.track_process(a, "doc", "y");
    // Process entries outlive their connection, so closing it frees nothing.
    h.close(a);
    let mut request = track_request("doc", "z");
    request.lifetime = Lifetime::Process;
    assert_refused(&h.try_track(b, request), b, ErrorCode::LimitExceeded);
    // Connection entries and other users are not affected.
    h.track(b, "doc", "z");
    h.track_process(other_user, "doc", "w");
    // Removing one frees a place.
    h.process_exited(process_of(a));
    assert!(
        h.list("doc")
            .presences
            .values()
            .all(|p| p.metas.iter().all(|m| m.phx_ref != first.phx_ref))
    );
    h.track_process(b, "doc", "v");
}

#[test]
fn subscribing_past_the_subscription_limit_is_limit_exceeded() {
    let mut h = Harness::with_limits(Limits {
        max_subscriptions_per_connection: 2,
        ..Limits::default()
    });
    let a = h.connect(ALICE);
    assert!(the_reply(&h.subscribe(a, "one"), a).ok);
    assert!(the_reply(&h.subscribe(a, "two"), a).ok);
    assert_refused(&h.subscribe(a, "three"), a, ErrorCode::LimitExceeded);
    // Subscribing again to a topic already subscribed costs nothing.
    let again = h.subscribe(a, "one");
    assert_eq!(kinds_for(&again, a), ["reply", "presence_state"]);
    // A track that would subscribe past the limit is refused as a whole.
    let mut request = track_request("three", "x");
    request.subscribe = true;
    assert_refused(&h.try_track(a, request), a, ErrorCode::LimitExceeded);
    assert_eq!(h.registry.entry_count(), 0);
    let mut request = track_request("one", "x");
    request.subscribe = true;
    ok_reply::<TrackReply>(&h.try_track(a, request), a);
    assert_eq!(h.registry.subscription_count(), 2);
}

#[test]
fn a_reserved_meta_field_is_bad_request() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let entry = h.track(a, "doc", "x");
    for field in ["phx_ref", "seq", "joined_at", "uid"] {
        let mut request = track_request("doc", "y");
        request.meta = meta(json!({ field: 1 }));
        assert_refused(&h.try_track(a, request), a, ErrorCode::BadRequest);
        let update = h.update_ref(a, "doc", &entry.phx_ref, meta(json!({ field: 1 })));
        assert_refused(&update, a, ErrorCode::BadRequest);
    }
    assert_eq!(h.listed_refs("doc"), [entry.phx_ref]);
}

#[test]
fn an_oversized_meta_is_limit_exceeded() {
    let mut h = Harness::with_limits(Limits {
        max_meta_bytes: 32,
        ..Limits::default()
    });
    let a = h.connect(ALICE);
    let entry = h.track(a, "doc", "x");
    let big = meta(json!({"note": "x".repeat(64)}));
    let mut request = track_request("doc", "y");
    request.meta = big.clone();
    assert_refused(&h.try_track(a, request), a, ErrorCode::LimitExceeded);
    assert_refused(
        &h.update_ref(a, "doc", &entry.phx_ref, big),
        a,
        ErrorCode::LimitExceeded,
    );
    // Just under the limit is fine: {"note":"xxxxxxxxxxxxxxxxxxxx"} is 31 bytes.
    let small = meta(json!({"note": "x".repeat(20)}));
    ok_reply::<UpdateReply>(&h.update_ref(a, "doc", &entry.phx_ref, small), a);
}

/// The message of a refusal.
fn refusal_message(out: &Outbox, conn: ConnId) -> String {
    the_reply(out, conn).error.expect("a refusal").message
}

#[test]
fn entries_are_capped_per_uid_but_for_the_exempt_one_and_in_all_for_everyone() {
    let limits = Limits {
        max_total_entries: 6,
        max_entries_per_uid: 2,
        ..Limits::default()
    };
    let mut h = Harness::around(Registry::new(limits).exempt_from_uid_quotas(ROOT));
    let (a, a2, b, root) = (
        h.connect(ALICE),
        h.connect(ALICE),
        h.connect(BOB),
        h.connect(ROOT),
    );
    let first = h.track(a, "doc", "x");
    h.track_process(a2, "other", "y");
    // Across connections and lifetimes: the uid holds two.
    let refused = h.try_track(a2, track_request("doc", "z"));
    assert_refused(&refused, a2, ErrorCode::LimitExceeded);
    let message = refusal_message(&refused, a2);
    assert!(
        message.contains("uid 1000 already holds 2 entries")
            && message.contains("--max-entries-per-uid"),
        "{message}"
    );
    // Another user is not held back by it, nor the exempt user.
    h.track(b, "doc", "b1");
    h.track(root, "doc", "r1");
    h.track(root, "doc", "r2");
    h.track(root, "doc", "r3");
    // Six in all: the total binds everyone, the exempt user too.
    for conn in [b, root] {
        let refused = h.try_track(conn, track_request("doc", "more"));
        assert_refused(&refused, conn, ErrorCode::LimitExceeded);
        let message = refusal_message(&refused, conn);
        assert!(
            message.contains("already holds 6 entries") && message.contains("--max-total-entries"),
            "{message}"
        );
    }
    // Leaving frees a place in both.
    h.untrack_ref(a, "doc", &first.phx_ref);
    h.track(a2, "doc", "z");
}

#[test]
fn meta_bytes_are_capped_per_uid_on_track_and_on_an_update_that_grows() {
    // {"p":"xxxxxxxxxx"} is 18 bytes; {"p":"xxxxxxxxxxxxxxxxxxxx"} 28.
    let short = || meta(json!({"p": "x".repeat(10)}));
    let long = || meta(json!({"p": "x".repeat(20)}));
    let limits = Limits {
        max_meta_bytes_per_uid: 50,
        ..Limits::default()
    };
    let mut h = Harness::around(Registry::new(limits).exempt_from_uid_quotas(ROOT));
    let (a, b, root) = (h.connect(ALICE), h.connect(BOB), h.connect(ROOT));
    let mut request = track_request("doc", "one");
    request.meta = long();
    let one: TrackReply = ok_reply(&h.try_track(a, request), a);
    let mut request = track_request("doc", "two");
    request.meta = long();
    let refused = h.try_track(a, request.clone());
    assert_refused(&refused, a, ErrorCode::LimitExceeded);
    let message = refusal_message(&refused, a);
    assert!(
        message.contains("take 28 bytes; 28 more would pass the 50")
            && message.contains("--max-meta-per-uid"),
        "{message}"
    );
    request.meta = short();
    let two: TrackReply = ok_reply(&h.try_track(a, request), a);
    // 46 bytes held: growing one meta past 50 is refused, even by root.
    let grown = h.update_ref(root, "doc", &two.phx_ref, long());
    assert_refused(&grown, root, ErrorCode::LimitExceeded);
    assert_eq!(
        h.listed_refs("doc"),
        [one.phx_ref.clone(), two.phx_ref.clone()]
    );
    // Shrinking is always allowed, and frees room.
    let shrunk: UpdateReply = ok_reply(&h.update_ref(a, "doc", &one.phx_ref, short()), a);
    ok_reply::<UpdateReply>(&h.update_ref(a, "doc", &two.phx_ref, long()), a);
    // Other users, and the exempt one, have quotas of their own or none.
    for conn in [b, root, root] {
        let mut request = track_request("doc", &format!("k{}", h.next_token));
        request.meta = long();
        ok_reply::<TrackReply>(&h.try_track(conn, request), conn);
    }
    // Leaving gives the bytes back.
    h.untrack_ref(a, "doc", &shrunk.phx_ref);
    let mut request = track_request("doc", "three");
    request.meta = short();
    ok_reply::<TrackReply>(&h.try_track(a, request), a);
}

#[test]
fn restored_entries_count_and_a_resume_claims_them_within_lowered_quotas() {
    // Three waiting entries of alice, 18 bytes of meta each, restored
    // under quotas lowered to two entries.
    let entries: Vec<Entry> = (1..=3)
        .map(|seq| {
            let mut entry = stored_entry(
                seq,
                "doc",
                &format!("k{seq}"),
                Lifetime::Connection,
                &format!("tok-{seq}"),
            );
            entry.meta = meta(json!({"p": "x".repeat(10)}));
            entry.resume_deadline = Some(2_000);
            entry
        })
        .collect();
    let limits = Limits {
        max_entries_per_uid: 2,
        ..Limits::default()
    };
    let mut h = Harness::around(Registry::restore(limits, entries, 4));
    let (a, b) = (h.connect(ALICE), h.connect(ALICE));
    // Restored entries are held, and count against a track.
    assert_refused(
        &h.try_track(b, track_request("doc", "new")),
        b,
        ErrorCode::LimitExceeded,
    );
    // A resume claims them again as a track would: two fit, the third
    // stays free and expires.
    let reply: ResumeReply = ok_reply(&h.resume(a, &["tok-1", "tok-2", "tok-3"]), a);
    assert_eq!(reply.resumed, ["p1", "p2"]);
    assert_eq!(
        refused_codes(&h.resume(b, &["tok-3"]), b),
        BTreeMap::from([("tok-3".to_owned(), ErrorCode::LimitExceeded)])
    );
    h.now = 2_000;
    h.expire();
    assert_eq!(h.listed_refs("doc"), ["p1", "p2"]);
    // Within the quota again, the uid is refused nothing it may hold.
    h.untrack_ref(a, "doc", "p1");
    h.track(b, "doc", "new");
}

/// Whether one user (not exempt) holding `held` entries with `meta`, and
/// nothing else on the daemon, may track one more like them under the
/// default limits. The held ones are restored, as after a restart, which
/// counts them the same way and is quicker than tracking each.
fn one_more_fits_after(held: usize, meta: &Map<String, Value>) -> bool {
    let entries = (1..=held as u64)
        .map(|seq| Entry {
            uid: BOB,
            user: user_name(BOB),
            meta: meta.clone(),
            token_hash: token_hash(&format!("t{seq}")),
            ..stored_entry(
                seq,
                &format!("topic-{}", seq / 1_000),
                "k",
                Lifetime::Process,
                "",
            )
        })
        .collect();
    let mut h = Harness::around(Registry::restore(Limits::default(), entries, 1));
    let conn = h.connect(BOB);
    let mut request = track_request("one-more", "k");
    request.meta = meta.clone();
    let out = h.try_track(conn, request);
    the_reply(&out, conn).ok
}

#[test]
fn the_default_quotas_let_one_user_hold_its_largest_known_uses() {
    // The restart benchmark's 100,000 entries.
    assert!(one_more_fits_after(99_999, &Map::new()));
    // 10,000 entries with 500-byte metas.
    let big = meta(json!({"note": "x".repeat(489)}));
    assert_eq!(size_of(&big), 500);
    assert!(one_more_fits_after(9_999, &big));
}

#[test]
fn a_detached_process_entry_is_resumed_whatever_the_quotas() {
    let limits = Limits {
        max_entries_per_uid: 1,
        max_total_entries: 1,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let (a, b) = (h.connect(ALICE), h.connect(ALICE));
    let held = h.track_process(a, "doc", "x");
    h.close(a);
    // It never stopped counting, so taking it back claims nothing more.
    let reply: ResumeReply = ok_reply(&h.resume(b, &[&held.resume_token]), b);
    assert_eq!(reply.resumed, [held.phx_ref]);
}

// ---------------------------------------------------------------------------
// An entry removed by another connection
// ---------------------------------------------------------------------------

/// The `removed` events of an outbox, as (recipient, payload).
fn removals(out: &Outbox) -> Vec<(ConnId, Removal, String)> {
    out.deliveries
        .iter()
        .filter_map(|delivery| match delivery {
            Delivery::Event {
                to,
                event: Event::Removed { topic, payload },
            } => {
                assert_eq!(to.len(), 1, "a removed event has one recipient");
                Some((to[0], payload.clone(), topic.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn root_removing_an_entry_tells_its_holder_who_did_it_before_anything_else() {
    let mut h = Harness::new();
    let (editor, next, root) = (h.connect(ALICE), h.connect(BOB), h.connect(ROOT));
    let owner = h.track(editor, "doc", "alice");
    h.track(next, "doc", "bob");
    h.subscribe(editor, "doc");

    let out = h.untrack_key(root, "doc", "alice");
    assert_eq!(ok_reply::<UntrackReply>(&out, root).removed, 1);
    let removal = Removal {
        phx_ref: owner.phx_ref.clone(),
        key: "alice".to_owned(),
        reason: LeaveReason::Untrack,
        by: Actor {
            uid: ROOT,
            user: "root".to_owned(),
            pid: process_of(root).pid,
        },
    };
    assert_eq!(removals(&out), [(editor, removal, "doc".to_owned())]);
    // The holder hears of its loss before the diff that shows it; the
    // remover gets its reply only; the next in line is promoted.
    assert_eq!(kinds_for(&out, editor), ["removed", "presence_diff"]);
    assert_eq!(kinds_for(&out, root), ["reply"]);
    assert_eq!(kinds_for(&out, next), ["role"]);
}

#[test]
fn a_process_entry_removed_by_its_uid_elsewhere_tells_its_holder() {
    let mut h = Harness::new();
    let (holder, other) = (h.connect(ALICE), h.connect(ALICE));
    let held = h.track_process(holder, "doc", "x");
    let out = h.untrack_ref(other, "doc", &held.phx_ref);
    let told = removals(&out);
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].0, holder);
    assert_eq!(told[0].1.by.uid, ALICE);
    assert_eq!(told[0].1.by.pid, process_of(other).pid);
}

#[test]
fn no_removed_event_for_ones_own_untrack_or_an_entry_nobody_holds() {
    let mut h = Harness::new();
    let (a, b) = (h.connect(ALICE), h.connect(ALICE));
    let own = h.track(a, "doc", "own");
    assert!(removals(&h.untrack_ref(a, "doc", &own.phx_ref)).is_empty());
    // A process entry whose connection closed has no holder to tell.
    let left = h.track_process(a, "doc", "left");
    h.close(a);
    let out = h.untrack_ref(b, "doc", &left.phx_ref);
    assert_eq!(ok_reply::<UntrackReply>(&out, b).removed, 1);
    assert!(removals(&out).is_empty());
    // Nor for departures nobody asked for: a close or a process exit.
    let c = h.connect(ALICE);
    h.track_process(c, "doc", "exits");
    assert!(removals(&h.process_exited(process_of(c))).is_empty());
}

/// The `updated` events of an outbox, as (recipient, topic, payload).
fn revisions(out: &Outbox) -> Vec<(ConnId, String, Revision)> {
    out.deliveries
        .iter()
        .filter_map(|delivery| match delivery {
            Delivery::Event {
                to,
                event: Event::Updated { topic, payload },
            } => {
                assert_eq!(to.len(), 1, "an updated event has one recipient");
                Some((to[0], topic.clone(), payload.clone()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn an_update_from_another_connection_tells_the_holder_its_new_ref_and_meta() {
    let mut h = Harness::new();
    let (editor, root) = (h.connect(ALICE), h.connect(ROOT));
    let held = h.track(editor, "doc", "alice");
    h.subscribe(editor, "doc");

    let out = h.update_ref(root, "doc", &held.phx_ref, meta(json!({"file": "b.md"})));
    let reply: UpdateReply = ok_reply(&out, root);
    let revision = Revision {
        phx_ref: reply.phx_ref.clone(),
        prev_ref: held.phx_ref.clone(),
        key: "alice".to_owned(),
        meta: meta(json!({"file": "b.md"})),
        by: Actor {
            uid: ROOT,
            user: "root".to_owned(),
            pid: process_of(root).pid,
        },
    };
    assert_eq!(revisions(&out), [(editor, "doc".to_owned(), revision)]);
    // Before the diff that shows the change, as a removal is.
    assert_eq!(kinds_for(&out, editor), ["updated", "presence_diff"]);
    assert_eq!(kinds_for(&out, root), ["reply"]);

    // Under its new ref, a removal from elsewhere is announced with it.
    let out = h.untrack_ref(root, "doc", &reply.phx_ref);
    let told = removals(&out);
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].1.phx_ref, reply.phx_ref);
}

#[test]
fn no_updated_event_for_ones_own_update_or_an_entry_nobody_holds() {
    let mut h = Harness::new();
    let (a, b) = (h.connect(ALICE), h.connect(ALICE));
    let own = h.track(a, "doc", "own");
    assert!(revisions(&h.update_ref(a, "doc", &own.phx_ref, Map::new())).is_empty());
    assert!(revisions(&h.update_key(a, "doc", "own")).is_empty());
    let left = h.track_process(a, "doc", "left");
    h.close(a);
    let out = h.update_ref(b, "doc", &left.phx_ref, Map::new());
    let _: UpdateReply = ok_reply(&out, b);
    assert!(revisions(&out).is_empty());
}

#[test]
fn a_resume_of_an_entry_removed_while_nobody_held_it_says_who_removed_it() {
    let mut waiting = stored_entry(3, "doc", "x", Lifetime::Connection, "tok-3");
    waiting.resume_deadline = Some(2_000);
    let detached = stored_entry(5, "doc", "y", Lifetime::Process, "tok-5");
    let mut h = Harness::around(Registry::restore(
        Limits::default(),
        vec![waiting, detached],
        6,
    ));
    let root = h.connect(ROOT);
    assert_eq!(
        ok_reply::<UntrackReply>(&h.untrack_key(root, "doc", "x"), root).removed,
        1
    );
    // The same user's other connection may remove a process entry.
    let other = h.connect(ALICE);
    assert_eq!(
        ok_reply::<UntrackReply>(&h.untrack_ref(other, "doc", "p5"), other).removed,
        1
    );

    // Someone else's resume of the tokens learns nothing.
    let bob = h.connect(BOB);
    let reply: ResumeReply = ok_reply(&h.resume(bob, &["tok-3", "tok-5"]), bob);
    assert_eq!(reply.expired, ["tok-3", "tok-5"]);
    assert!(reply.removed.is_empty());

    let client = h.connect(ALICE);
    let reply: ResumeReply = ok_reply(&h.resume(client, &["tok-3", "tok-5"]), client);
    assert!(reply.resumed.is_empty() && reply.expired.is_empty());
    let removed = &reply.removed["tok-3"];
    assert_eq!(removed.topic, "doc");
    assert_eq!(
        removed.removal,
        Removal {
            phx_ref: "p3".to_owned(),
            key: "x".to_owned(),
            reason: LeaveReason::Untrack,
            by: Actor {
                uid: ROOT,
                user: "root".to_owned(),
                pid: process_of(root).pid,
            },
        }
    );
    assert_eq!(reply.removed["tok-5"].removal.by.pid, process_of(other).pid);

    // Remembered for a while only: then the tokens are merely expired.
    h.now += TOMBSTONE_MILLIS;
    h.expire();
    assert!(h.registry.tombstones.is_empty() && h.registry.tombstones_by_expiry.is_empty());
    let reply: ResumeReply = ok_reply(&h.resume(client, &["tok-3", "tok-5"]), client);
    assert_eq!(reply.expired, ["tok-3", "tok-5"]);
}

#[test]
fn ones_own_untrack_is_not_remembered_and_removed_entries_are_remembered_within_a_bound() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let own = h.track_process(a, "doc", "own");
    h.untrack_ref(a, "doc", &own.phx_ref);
    assert!(h.registry.tombstones.is_empty());

    let stored = (1..=MAX_TOMBSTONES as u64 + 1)
        .map(|seq| {
            stored_entry(
                seq,
                "doc",
                &format!("k{seq}"),
                Lifetime::Process,
                &format!("t{seq}"),
            )
        })
        .collect();
    let mut h = Harness::around(Registry::restore(Limits::default(), stored, 1));
    let root = h.connect(ROOT);
    for seq in 1..=MAX_TOMBSTONES as u64 + 1 {
        h.now += 1;
        h.untrack_ref(root, "doc", &format!("p{seq}"));
    }
    assert_eq!(h.registry.tombstones.len(), MAX_TOMBSTONES);
    let client = h.connect(ALICE);
    let last = format!("t{}", MAX_TOMBSTONES + 1);
    let reply: ResumeReply = ok_reply(&h.resume(client, &["t1", &last]), client);
    assert_eq!(
        reply.expired,
        ["t1"],
        "the one to be forgotten first goes first"
    );
    assert_eq!(reply.removed.keys().collect::<Vec<_>>(), [&last]);
}

#[test]
fn a_user_removing_its_own_entries_in_a_loop_does_not_push_out_the_record_of_anothers() {
    // Bob's entry, then more of Alice's than the daemon remembers at once.
    let mut bobs = stored_entry(1, "doc", "bob", Lifetime::Process, "bob-token");
    bobs.uid = BOB;
    bobs.user = user_name(BOB);
    let alices = (2..=MAX_TOMBSTONES as u64 + 2).map(|seq| {
        let token = format!("t{seq}");
        stored_entry(seq, "own", &format!("k{seq}"), Lifetime::Process, &token)
    });
    let stored = std::iter::once(bobs).chain(alices).collect();
    let mut h = Harness::around(Registry::restore(Limits::default(), stored, 1));

    // Root removes Bob's entry first, so its record is the one to be
    // forgotten soonest of all.
    let root = h.connect(ROOT);
    h.untrack_ref(root, "doc", "p1");
    // Alice, from a connection that holds none of them, removes her own
    // process entries, one after another, past the bound.
    let alice = h.connect(ALICE);
    for seq in 2..=MAX_TOMBSTONES as u64 + 2 {
        h.now += 1;
        h.untrack_ref(alice, "own", &format!("p{seq}"));
    }
    assert_eq!(h.registry.tombstones.len(), MAX_TOMBSTONES);

    // Bob, back, still learns that root removed his entry.
    let bob = h.connect(BOB);
    let reply: ResumeReply = ok_reply(&h.resume(bob, &["bob-token"]), bob);
    let removal = reply.removed.get("bob-token").map(|r| r.removal.by.uid);
    assert_eq!(removal, Some(ROOT), "{reply:?}");
    // What gave way were Alice's own records, the oldest first.
    let client = h.connect(ALICE);
    let newest = format!("t{}", MAX_TOMBSTONES + 2);
    let reply: ResumeReply = ok_reply(&h.resume(client, &["t2", "t3", &newest]), client);
    assert_eq!(reply.expired, ["t2", "t3"]);
    assert_eq!(reply.removed.keys().collect::<Vec<_>>(), [&newest]);
}

// ---------------------------------------------------------------------------
// Persistence: changes, restore and expiry
// ---------------------------------------------------------------------------

#[test]
fn every_new_entry_is_persisted_and_failed_requests_persist_nothing() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let out = h.try_track(a, track_request("doc", "x"));
    let reply: TrackReply = ok_reply(&out, a);
    match row_changes(&out).as_slice() {
        [Change::Put(entry)] => {
            assert_eq!(entry.phx_ref, reply.phx_ref);
            assert_eq!(entry.seq, reply.seq);
            assert_eq!(entry.token_hash, token_hash(&reply.resume_token));
            assert_eq!(entry.uid, ALICE);
            assert_eq!(entry.process, process_of(a));
        }
        other => panic!("expected one put, got {other:?}"),
    }
    assert!(h.subscribe(a, "doc").changes.is_empty());
    assert!(
        h.handle(a, Op::List(None)).changes.is_empty(),
        "reading persists nothing"
    );
}

#[test]
fn a_restored_entry_expires_at_its_deadline_and_not_before() {
    let mut waiting = stored_entry(3, "doc", "x", Lifetime::Connection, "tok-3");
    waiting.resume_deadline = Some(2_000);
    let staying = stored_entry(5, "doc", "y", Lifetime::Process, "tok-5");
    let mut h = Harness::around(Registry::restore(
        Limits::default(),
        vec![waiting, staying],
        6,
    ));
    assert_eq!(h.registry.next_resume_deadline(), Some(2_000));
    let watcher = h.connect(BOB);
    h.subscribe(watcher, "doc");

    h.now = 1_999;
    let out = h.expire();
    assert!(out.deliveries.is_empty() && out.changes.is_empty());
    assert_eq!(h.registry.entry_count(), 2);

    h.now = 2_000;
    let out = h.expire();
    let diff = the_diff(&out);
    assert_eq!(diff.to, [watcher]);
    assert_eq!(
        diff.reasons,
        BTreeMap::from([("p3".to_owned(), LeaveReason::Expired)])
    );
    assert_eq!(owner_ref(&diff.owner), Some("p5"));
    assert_eq!(row_changes(&out), [Change::Delete("p3".into())]);
    assert_eq!(h.registry.next_resume_deadline(), None);
    assert_eq!(h.listed_refs("doc"), ["p5"]);
    // Nothing is left to expire, however late it gets.
    h.now = 1_000_000;
    assert!(h.expire().changes.is_empty());
}

#[test]
fn a_restored_entry_resumed_before_its_deadline_does_not_expire() {
    let mut waiting = stored_entry(3, "doc", "x", Lifetime::Connection, "tok-3");
    waiting.resume_deadline = Some(2_000);
    let mut h = Harness::around(Registry::restore(Limits::default(), vec![waiting], 4));
    let a = h.connect(ALICE);
    let reply: ResumeReply = ok_reply(&h.resume(a, &["tok-3"]), a);
    assert_eq!(reply.resumed, ["p3"]);
    assert_eq!(h.registry.next_resume_deadline(), None);
    h.now = 10_000;
    assert!(h.expire().changes.is_empty());
    assert_eq!(h.registry.entry_count(), 1);
}

#[test]
fn restored_entries_keep_their_order_and_owner() {
    let entries = vec![
        stored_entry(9, "doc", "late", Lifetime::Process, "a"),
        stored_entry(2, "doc", "early", Lifetime::Process, "b"),
    ];
    let mut h = Harness::around(Registry::restore(Limits::default(), entries, 10));
    assert_eq!(owner_ref(&h.list("doc").owner), Some("p2"));
    assert_eq!(h.listed_refs("doc"), ["p2", "p9"]);
    assert_eq!(h.registry.processes().count(), 2);
}

#[test]
fn next_seq_after_restore_exceeds_every_restored_seq() {
    let entries = || {
        vec![
            stored_entry(7, "doc", "x", Lifetime::Process, "a"),
            stored_entry(12, "notes", "x", Lifetime::Process, "b"),
        ]
    };
    // A counter below the restored seqs is raised past them...
    let mut h = Harness::around(Registry::restore(Limits::default(), entries(), 3));
    assert_eq!(h.registry.next_seq(), 13);
    let a = h.connect(ALICE);
    let fresh = h.track(a, "doc", "y");
    assert!(fresh.seq > 12);
    assert_eq!(
        fresh.standing.position, 1,
        "the restored entry keeps the lead"
    );
    // ...and a counter above them is kept.
    let h = Harness::around(Registry::restore(Limits::default(), entries(), 40));
    assert_eq!(h.registry.next_seq(), 40);
    // A counter of zero still starts from one.
    let h = Harness::around(Registry::restore(Limits::default(), Vec::new(), 0));
    assert_eq!(h.registry.next_seq(), 1);
}

/// `restore` promises to raise a stale `next_seq` past everything restored,
/// and refs draw from the same counter ("neither is ever reused, even across
/// restarts"). It only looks at seqs, though: an updated entry's ref number
/// is above its seq, so a stale counter hands that ref out again.
#[test]
fn refs_issued_after_a_restore_never_collide_with_restored_refs() {
    // Tracked as seq 1 (ref p1), then updated twice: ref p3, counter 4.
    let mut updated = stored_entry(1, "doc", "x", Lifetime::Process, "a");
    updated.phx_ref = "p3".into();
    updated.prev_ref = Some("p2".into());
    // The counter read back says 1: restore raises it to 2 only.
    let mut h = Harness::around(Registry::restore(Limits::default(), vec![updated], 1));
    let a = h.connect(ALICE);
    let first = h.track(a, "doc", "y");
    let second = h.track(a, "doc", "z");
    let issued = [first.phx_ref.as_str(), second.phx_ref.as_str()];
    assert!(!issued.contains(&"p3"), "issued {issued:?} again");
    assert_eq!(h.registry.entry_count(), 3);
}

// ---------------------------------------------------------------------------
// Topics shared across hosts
// ---------------------------------------------------------------------------

/// An entry of a shared topic that this host tracked: its ref names the
/// host, and its seq is its key's create revision.
fn shared_entry(revision: u64, topic: &str, phx_ref: &str, token: &str) -> Entry {
    Entry {
        phx_ref: phx_ref.to_owned(),
        cluster: Some(Shared {
            id: phx_ref.to_owned(),
            remote: false,
            key_lease: Some(7),
        }),
        ..stored_entry(revision, topic, "k", Lifetime::Process, token)
    }
}

/// Another host's entry of a shared topic, with that host's pid and uid.
fn remote_entry(revision: u64, topic: &str, phx_ref: &str, process: ProcessId, uid: u32) -> Entry {
    Entry {
        phx_ref: phx_ref.to_owned(),
        process,
        uid,
        user: user_name(uid),
        meta: meta(json!({"file": "a.md"})),
        token_hash: token_hash(phx_ref),
        cluster: Some(Shared {
            id: phx_ref.to_owned(),
            remote: true,
            key_lease: None,
        }),
        ..stored_entry(revision, topic, "k", Lifetime::Process, "")
    }
}

/// Files another host's entry as the changes etcd reports will. Nothing
/// makes remote entries yet, so their bookkeeping is tested by putting
/// them in through the one function every entry goes in by.
fn put_remote(registry: &mut Registry, entry: Entry) {
    let meta_bytes = meta_size(&entry.meta);
    registry.insert(entry, meta_bytes);
}

#[test]
fn entries_of_two_topics_with_the_same_seq_are_each_told_their_own_standing_on_resume() {
    // A shared topic's seqs are create revisions: its entry has seq 2,
    // like the local topic's second entry.
    let dead = stored_entry(1, "doc", "gone", Lifetime::Process, "t1");
    let behind = stored_entry(2, "doc", "stays", Lifetime::Process, "t2");
    let shared = shared_entry(2, "publishing_edit:x", "web-1:p5", "s2");
    let registry = Registry::restore(Limits::default(), vec![behind, shared], 6)
        .with_standings_as_stored(&[dead]);
    let mut h = Harness::around(registry);
    let a = h.connect(ALICE);

    // The shared entry stood alone and still does: nothing to tell. The
    // local one moved up to owner while nobody held it.
    let out = h.resume(a, &["s2", "t2"]);
    let reply: ResumeReply = ok_reply(&out, a);
    assert_eq!(reply.resumed, ["web-1:p5", "p2"]);
    assert_eq!(
        role_summaries(&out),
        [(a, ref_for(2), owner_standing(&ref_for(2)))]
    );
}

#[test]
fn a_remote_entry_is_untouched_by_the_exit_of_a_local_process_with_its_pid() {
    let mut h = Harness::new();
    let a = h.connect(ALICE);
    let local = h.track_process(a, "doc", "mine").phx_ref;
    // Another host's entry whose pid, start time and uid happen to be
    // this connection's.
    put_remote(
        &mut h.registry,
        remote_entry(40, "publishing_edit:x", "web-2:p3", process_of(a), ALICE),
    );
    assert_eq!(h.registry.processes().collect::<Vec<_>>(), [process_of(a)]);
    assert_eq!(h.registry.usage(ALICE).entries, 1);

    let out = h.process_exited(process_of(a));
    assert_eq!(row_changes(&out), [Change::Delete(local)]);
    assert_eq!(h.listed_refs("doc"), Vec::<String>::new());
    assert_eq!(h.listed_refs("publishing_edit:x"), ["web-2:p3"]);
    assert_eq!(h.registry.entry_count(), 1);
    // Nor can its token, which means nothing here, resume it.
    let b = h.connect(ALICE);
    let reply: ResumeReply = ok_reply(&h.resume(b, &["web-2:p3"]), b);
    assert_eq!(reply.expired, ["web-2:p3"]);
}

#[test]
fn remote_entries_fill_no_quota_and_count_toward_no_total_cap() {
    let limits = Limits {
        max_total_entries: 2,
        max_entries_per_uid: 1,
        max_process_entries_per_uid: 1,
        ..Limits::default()
    };
    let mut h = Harness::with_limits(limits);
    let (a, b, c) = (h.connect(ALICE), h.connect(BOB), h.connect(BOB));
    for number in 1..=3 {
        put_remote(
            &mut h.registry,
            remote_entry(
                number,
                "publishing_edit:x",
                &format!("web-2:p{number}"),
                process_of(a),
                ALICE,
            ),
        );
    }
    assert_eq!(h.registry.entry_count(), 3);
    assert_eq!(h.registry.usage(ALICE), Usage::default());

    h.track_process(a, "doc", "k");
    h.track(b, "doc", "k");
    // Two local entries: now the cap refuses, and the uid's quota with it.
    assert_refused(
        &h.try_track(c, track_request("doc", "k")),
        c,
        ErrorCode::LimitExceeded,
    );
    assert_eq!(h.registry.entry_count(), 5);
}

#[test]
fn rolling_back_a_batch_takes_out_the_remote_entry_it_put_in_and_puts_back_the_one_it_took() {
    let mut h = Harness::new();
    let remote = remote_entry(7, "publishing_edit:x", "web-2:p1", process_of(9), BOB);
    let empty = dump(&h.registry);
    h.registry.begin_batch();
    put_remote(&mut h.registry, remote.clone());
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), empty);
    assert_eq!(h.registry.entry_count(), 0);
    assert_eq!(h.registry.remote_entries, 0);
    assert!(h.registry.topics.is_empty(), "the topic it made is gone");

    put_remote(&mut h.registry, remote.clone());
    let holding = dump(&h.registry);
    h.registry.begin_batch();
    assert_eq!(h.registry.take("web-2:p1").map(|(e, _)| e), Some(remote));
    assert_eq!(h.registry.remote_entries, 0);
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), holding);
    assert_eq!(h.registry.remote_entries, 1);
    assert_eq!(h.listed_refs("publishing_edit:x"), ["web-2:p1"]);
    assert_eq!(h.registry.processes().count(), 0);
}

#[test]
fn nobody_here_may_untrack_or_update_a_remote_entry_not_even_root() {
    let mut h = Harness::new();
    let (root, alice) = (h.connect(ROOT), h.connect(ALICE));
    let remote = remote_entry(7, "publishing_edit:x", "web-2:p1", process_of(alice), ALICE);
    put_remote(&mut h.registry, remote);
    for conn in [root, alice] {
        let out = h.untrack_ref(conn, "publishing_edit:x", "web-2:p1");
        assert_refused(&out, conn, ErrorCode::PermissionDenied);
        assert!(the_reply(&out, conn).error.is_some_and(|e| {
            e.message == "entry `web-2:p1` belongs to host web-2; change it there"
        }));
        let out = h.untrack_key(conn, "publishing_edit:x", "k");
        assert_eq!(ok_reply::<UntrackReply>(&out, conn).removed, 0);
        let out = h.update_ref(conn, "publishing_edit:x", "web-2:p1", Map::new());
        assert_refused(&out, conn, ErrorCode::PermissionDenied);
    }
    assert_eq!(h.listed_refs("publishing_edit:x"), ["web-2:p1"]);
}

#[test]
fn remote_entries_moved_up_leave_nothing_for_a_resume_here() {
    let mut h = Harness::new();
    for number in 1..=3 {
        put_remote(
            &mut h.registry,
            remote_entry(
                number * 10,
                "publishing_edit:x",
                &format!("web-2:p{number}"),
                process_of(9),
                BOB,
            ),
        );
    }
    let mut out = Outbox::default();
    h.registry.begin_batch();
    h.registry.remove(
        vec![("web-2:p1".into(), LeaveReason::Untrack)],
        h.now,
        &mut out,
    );
    assert!(h.registry.told_before.is_empty());
    assert_eq!(h.listed_refs("publishing_edit:x"), ["web-2:p2", "web-2:p3"]);
    h.registry.roll_back();
    assert_eq!(
        h.listed_refs("publishing_edit:x"),
        ["web-2:p1", "web-2:p2", "web-2:p3"]
    );
}

#[test]
fn ref_numbers_are_read_from_local_and_shared_refs() {
    assert_eq!(ref_number("p12"), Some(12));
    assert_eq!(ref_number("web-1:p12"), Some(12));
    assert_eq!(ref_number("web-1.example.org:p7"), Some(7));
    for not_of_the_counter in ["", "p", "12", "p+3", ":p3", "web-1:", "web-1:12", "web-1:p"] {
        assert_eq!(
            ref_number(not_of_the_counter),
            None,
            "{not_of_the_counter:?}"
        );
    }
}

#[test]
fn restore_steps_past_shared_refs_but_not_past_create_revisions() {
    // Tracked as web-1:p9, updated to web-1:p12; its key's create
    // revision is in the millions.
    let mut updated = shared_entry(4_000_000, "publishing_edit:x", "web-1:p12", "a");
    updated.prev_ref = Some("web-1:p9".into());
    let local = stored_entry(3, "doc", "x", Lifetime::Process, "b");
    let mut h = Harness::around(Registry::restore(
        Limits::default(),
        vec![updated, local],
        1,
    ));
    assert_eq!(h.registry.next_seq(), 13);
    let a = h.connect(ALICE);
    assert_eq!(h.track(a, "doc", "y").phx_ref, "p13");

    // Only the prev ref can be the highest number.
    let mut moved = shared_entry(4_000_001, "publishing_edit:y", "web-1:p2", "c");
    moved.prev_ref = Some("web-1:p20".into());
    let h = Harness::around(Registry::restore(Limits::default(), vec![moved], 1));
    assert_eq!(h.registry.next_seq(), 21);
}

// ---------------------------------------------------------------------------
// Property test against a reference model
// ---------------------------------------------------------------------------

/// The connections of the property test: two of the same user, another
/// user, and root.
const SLOT_UIDS: [u32; 4] = [ALICE, ALICE, BOB, ROOT];
const TOPICS: [&str; 3] = ["t0", "t1", "t2"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const PROCESSES: usize = 3;
/// How long connection entries wait to be resumed after a restart.
const RESUME_GRACE: i64 = 20;

/// Small limits, so that random sequences run into them.
fn property_limits() -> Limits {
    Limits {
        max_entries_per_connection: 4,
        max_subscriptions_per_connection: 2,
        max_total_entries: 10,
        max_entries_per_uid: 5,
        // Metas are 7 to 48 bytes (see `World::meta`): four or so.
        max_meta_bytes_per_uid: 80,
        ..Limits::default()
    }
}

/// The property limits with quotas lowered, as a daemon restarted with
/// smaller quotas has them: its restored entries may be over them.
fn lowered_limits() -> Limits {
    Limits {
        max_total_entries: 5,
        max_entries_per_uid: 2,
        max_meta_bytes_per_uid: 40,
        ..property_limits()
    }
}

/// The uid the property test's registry holds to no per-uid quota, as a
/// daemon does its own user.
const EXEMPT: u32 = ROOT;

fn property_registry(registry: Registry) -> Registry {
    registry.exempt_from_uid_quotas(EXEMPT)
}

/// A meta's size as the quotas count it.
fn size_of(meta: &Map<String, Value>) -> usize {
    serde_json::to_vec(meta).unwrap().len()
}

#[derive(Debug, Clone)]
enum Action {
    /// Opens a new connection in the slot if its last one has closed.
    Reopen {
        slot: usize,
    },
    Track {
        slot: usize,
        topic: usize,
        key: usize,
        lifetime: Lifetime,
        process: usize,
        subscribe: bool,
        bad_meta: bool,
    },
    /// `pick` chooses among every ref ever issued, live or not.
    UntrackByRef {
        slot: usize,
        pick: usize,
        wrong_topic: bool,
    },
    UntrackByKey {
        slot: usize,
        topic: usize,
        key: usize,
    },
    UpdateByRef {
        slot: usize,
        pick: usize,
        wrong_topic: bool,
        bad_meta: bool,
    },
    UpdateByKey {
        slot: usize,
        topic: usize,
        key: usize,
    },
    Subscribe {
        slot: usize,
        topic: usize,
    },
    Unsubscribe {
        slot: usize,
        topic: usize,
    },
    /// `picks` choose among the tokens of every ref ever issued or, if
    /// `detached`, of the live entries no connection holds (the ones that
    /// can be resumed).
    Resume {
        slot: usize,
        picks: Vec<usize>,
        detached: bool,
    },
    /// Connections closing and processes exiting at once, as the core
    /// applies a run of them.
    End {
        endings: Vec<EndingPick>,
    },
    /// May be negative: the wall clock can step back.
    AdvanceTime {
        millis: i64,
    },
    /// Sets the clock just before, at or just after the earliest resume
    /// deadline, where expiry must switch from keeping to removing.
    ReachDeadline {
        offset: i64,
    },
    Expire,
    /// Restores a new registry from the persisted rows, as a daemon restart
    /// does: every connection is gone, connection entries wait to resume.
    /// With `lowered`, the quotas are lower than before (or, the next time,
    /// back up).
    Restart {
        lowered: bool,
    },
}

#[derive(Debug, Clone)]
enum EndingPick {
    Close {
        slot: usize,
    },
    /// `stale` names the pid with a start time no entry has.
    ProcessExit {
        process: usize,
        stale: bool,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let slot = 0..SLOT_UIDS.len();
    let topic = 0..TOPICS.len();
    let key = 0..KEYS.len();
    let lifetime = prop_oneof![Just(Lifetime::Connection), Just(Lifetime::Process)];
    let pick = 0..1_000usize;
    let rarely = || prop::bool::weighted(0.1);
    prop_oneof![
        4 => slot.clone().prop_map(|slot| Action::Reopen { slot }),
        14 => (
            slot.clone(),
            topic.clone(),
            key.clone(),
            lifetime,
            0..PROCESSES,
            prop::bool::weighted(0.3),
            rarely(),
        )
            .prop_map(
                |(slot, topic, key, lifetime, process, subscribe, bad_meta)| Action::Track {
                    slot,
                    topic,
                    key,
                    lifetime,
                    process,
                    subscribe,
                    bad_meta,
                }
            ),
        4 => (slot.clone(), pick.clone(), rarely()).prop_map(|(slot, pick, wrong_topic)| {
            Action::UntrackByRef { slot, pick, wrong_topic }
        }),
        2 => (slot.clone(), topic.clone(), key.clone())
            .prop_map(|(slot, topic, key)| Action::UntrackByKey { slot, topic, key }),
        3 => (slot.clone(), pick.clone(), rarely(), rarely()).prop_map(
            |(slot, pick, wrong_topic, bad_meta)| Action::UpdateByRef {
                slot,
                pick,
                wrong_topic,
                bad_meta,
            }
        ),
        2 => (slot.clone(), topic.clone(), key)
            .prop_map(|(slot, topic, key)| Action::UpdateByKey { slot, topic, key }),
        4 => (slot.clone(), topic.clone())
            .prop_map(|(slot, topic)| Action::Subscribe { slot, topic }),
        1 => (slot.clone(), topic).prop_map(|(slot, topic)| Action::Unsubscribe { slot, topic }),
        4 => (slot.clone(), prop::collection::vec(pick, 1..5), prop::bool::weighted(0.8))
            .prop_map(|(slot, picks, detached)| Action::Resume { slot, picks, detached }),
        4 => prop::collection::vec(ending_pick(), 1..4).prop_map(|endings| Action::End { endings }),
        3 => (-30i64..60).prop_map(|millis| Action::AdvanceTime { millis }),
        1 => (-1i64..=1).prop_map(|offset| Action::ReachDeadline { offset }),
        2 => Just(Action::Expire),
        2 => prop::bool::ANY.prop_map(|lowered| Action::Restart { lowered }),
    ]
}

/// Mostly one ending at a time, as most closes and exits come; sometimes
/// a run of them.
fn ending_pick() -> impl Strategy<Value = EndingPick> {
    prop_oneof![
        1 => (0..SLOT_UIDS.len()).prop_map(|slot| EndingPick::Close { slot }),
        1 => (0..PROCESSES, prop::bool::weighted(0.1))
            .prop_map(|(process, stale)| EndingPick::ProcessExit { process, stale }),
    ]
}

/// One entry as the reference model sees it.
#[derive(Debug, Clone, PartialEq)]
struct ModelEntry {
    seq: u64,
    phx_ref: String,
    topic: String,
    key: String,
    conn: Option<ConnId>,
    uid: u32,
    process: ProcessId,
    lifetime: Lifetime,
    token: String,
    deadline: Option<i64>,
    meta_bytes: usize,
}

#[derive(Debug, Clone)]
struct ModelConn {
    uid: u32,
    subscriptions: BTreeSet<String>,
}

/// The rules of the registry, applied naively to a flat list.
#[derive(Debug, Clone, Default)]
struct Model {
    /// In seq order: entries are only appended, and seqs only grow.
    entries: Vec<ModelEntry>,
    conns: BTreeMap<ConnId, ModelConn>,
    /// The registry's limits, which a restart may change.
    limits: Limits,
    /// Entries another connection removed, by token: (uid, remembered
    /// until, ref).
    tombstones: BTreeMap<String, (u32, i64, String)>,
    /// By seq, the standing each entry's holder was last told (by a reply
    /// or a role event), as (position, owner's seq): a held entry whose
    /// standing is no longer this must be sent a role event.
    told: BTreeMap<u64, (usize, u64)>,
}

impl Model {
    fn uid_of(&self, conn: ConnId) -> Option<u32> {
        self.conns.get(&conn).map(|c| c.uid)
    }

    fn on_topic<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a ModelEntry> {
        self.entries.iter().filter(move |e| e.topic == topic)
    }

    fn held_by(&self, conn: ConnId) -> impl Iterator<Item = &ModelEntry> {
        self.entries.iter().filter(move |e| e.conn == Some(conn))
    }

    fn live(&self, phx_ref: &str) -> Option<&ModelEntry> {
        self.entries.iter().find(|e| e.phx_ref == phx_ref)
    }

    /// Why the connection may not hold one more entry on (topic, key), if
    /// it may not: the rule `track` and `resume` share.
    fn no_room_for(&self, conn: ConnId, topic: &str, key: &str) -> Option<ErrorCode> {
        if self.held_by(conn).count() >= self.limits.max_entries_per_connection {
            Some(ErrorCode::LimitExceeded)
        } else if self.held_by(conn).any(|e| e.topic == topic && e.key == key) {
            Some(ErrorCode::AlreadyTracked)
        } else {
            None
        }
    }

    /// Why `uid` may not claim one more entry with a meta of `bytes`, if it
    /// may not. A track counts every entry there is; a resume of a restored
    /// entry (`resuming`) only those claimed since the restart.
    fn over_quota(&self, uid: u32, bytes: usize, resuming: bool) -> Option<ErrorCode> {
        let limits = self.limits;
        let counted: Vec<&ModelEntry> = self
            .entries
            .iter()
            .filter(|e| !resuming || e.deadline.is_none())
            .collect();
        let of_uid = || counted.iter().filter(|e| e.uid == uid);
        let over = counted.len() >= limits.max_total_entries
            || (uid != EXEMPT
                && (of_uid().count() >= limits.max_entries_per_uid
                    || of_uid().map(|e| e.meta_bytes).sum::<usize>() + bytes
                        > limits.max_meta_bytes_per_uid));
        over.then_some(ErrorCode::LimitExceeded)
    }

    /// Why replacing an entry's meta with one of `bytes` breaks its uid's
    /// meta quota, if it does: only growth is weighed.
    fn update_over_quota(&self, entry: &ModelEntry, bytes: usize) -> Option<ErrorCode> {
        let held: usize = self
            .entries
            .iter()
            .filter(|e| e.uid == entry.uid)
            .map(|e| e.meta_bytes)
            .sum();
        let over = entry.uid != EXEMPT
            && bytes > entry.meta_bytes
            && held - entry.meta_bytes + bytes > self.limits.max_meta_bytes_per_uid;
        over.then_some(ErrorCode::LimitExceeded)
    }

    /// Each non-empty topic's owner, by seq.
    fn owners(&self) -> BTreeMap<String, u64> {
        let mut owners = BTreeMap::new();
        for entry in &self.entries {
            owners.entry(entry.topic.clone()).or_insert(entry.seq);
        }
        owners
    }

    fn may_change(&self, conn: ConnId, entry: &ModelEntry) -> bool {
        let uid = self.uid_of(conn);
        entry.conn == Some(conn)
            || uid == Some(ROOT)
            || (entry.lifetime == Lifetime::Process && uid == Some(entry.uid))
    }

    fn subscribed(&self, conn: ConnId, topic: &str) -> bool {
        self.conns
            .get(&conn)
            .is_some_and(|c| c.subscriptions.contains(topic))
    }

    fn subscribers(&self, topic: &str) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.subscriptions.contains(topic))
            .map(|(conn, _)| *conn)
            .collect()
    }

    /// What decides the entry's standing: (position, owner's seq).
    fn standing_by_seq(&self, entry: &ModelEntry) -> (usize, u64) {
        let position = self
            .on_topic(&entry.topic)
            .take_while(|e| e.seq < entry.seq)
            .count();
        let owner = self.on_topic(&entry.topic).next().map_or(0, |e| e.seq);
        (position, owner)
    }

    /// Notes that every entry's holder knows its standing as it is now (a
    /// restart starts from the rows as stored).
    fn all_told(&mut self) {
        self.told = self
            .entries
            .iter()
            .map(|e| (e.seq, self.standing_by_seq(e)))
            .collect();
    }

    /// Where the entry stands: (role, readonly, position, owner's ref).
    fn standing(&self, phx_ref: &str) -> Summary {
        let entry = self.live(phx_ref).expect("standing of a live entry");
        let position = self
            .on_topic(&entry.topic)
            .take_while(|e| e.seq < entry.seq)
            .count();
        let owner = self
            .on_topic(&entry.topic)
            .next()
            .map(|e| e.phx_ref.clone());
        let role = if position == 0 {
            Role::Owner
        } else {
            Role::Spectator
        };
        (role, role == Role::Spectator, position, owner)
    }

    /// Remembers the entries `conn` removed but did not hold, for a
    /// `resume` of them to say so.
    fn bury(&mut self, gone: &[ModelEntry], conn: ConnId, now: i64) {
        if self.uid_of(conn).is_none() {
            return;
        }
        for entry in gone.iter().filter(|e| e.conn != Some(conn)) {
            let until = (now + TOMBSTONE_MILLIS).max(entry.deadline.unwrap_or(i64::MIN));
            self.tombstones.insert(
                entry.token.clone(),
                (entry.uid, until, entry.phx_ref.clone()),
            );
        }
    }

    fn remove_where(&mut self, leaves: impl Fn(&ModelEntry) -> bool) -> Vec<ModelEntry> {
        let (gone, kept) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| leaves(e));
        self.entries = kept;
        gone
    }
}

/// A subscriber's picture of a topic, built from what it was sent.
#[derive(Debug, Clone, PartialEq)]
struct View {
    presences: Presences,
    owner: Option<Owner>,
}

impl View {
    /// Phoenix's syncDiff: add the joins, then remove the leaves by ref. It
    /// is strict where Phoenix is lenient: a join must be new and a leave
    /// must be exactly a meta the subscriber holds, or the lines were wrong.
    fn apply(&mut self, diff: &Diff, owner: &Option<Owner>) {
        for (key, joined) in &diff.joins {
            let metas = &mut self.presences.entry(key.clone()).or_default().metas;
            for meta in &joined.metas {
                assert!(
                    !metas.iter().any(|m| m.phx_ref == meta.phx_ref),
                    "a join of {} which the subscriber already has",
                    meta.phx_ref
                );
                metas.push(meta.clone());
            }
        }
        for (key, left) in &diff.leaves {
            let metas = &mut self
                .presences
                .get_mut(key)
                .unwrap_or_else(|| panic!("a leave on key {key} which the subscriber lacks"))
                .metas;
            for meta in &left.metas {
                assert!(
                    metas.contains(meta),
                    "a leave of {meta:?} which the subscriber does not hold as such: {metas:?}"
                );
                metas.retain(|m| m.phx_ref != meta.phx_ref);
            }
            if metas.is_empty() {
                self.presences.remove(key);
            }
        }
        self.owner = owner.clone();
    }

    /// The view in the registry's order, metas by seq, to compare with
    /// `list`. Phoenix appends joins, so an updated meta sits last until
    /// sorted.
    fn sorted(&self) -> Presences {
        let mut presences = self.presences.clone();
        for presence in presences.values_mut() {
            presence.metas.sort_by_key(|m| m.seq);
        }
        presences
    }
}

/// A diff the model expects one step to send.
#[derive(Debug, PartialEq)]
struct ExpectedDiff {
    topic: String,
    to: Vec<ConnId>,
    joins: BTreeSet<String>,
    leaves: BTreeSet<String>,
    reasons: BTreeMap<String, LeaveReason>,
}

/// What one step must send besides its reply and the role events, which
/// follow from the standings each holder was last told.
#[derive(Debug, Default)]
struct Expected {
    diffs: Vec<ExpectedDiff>,
    /// (recipient, topic) of each `presence_state`.
    states: Vec<(ConnId, String)>,
    /// (holder, ref, remover's uid) of each `removed` event.
    removed: Vec<(ConnId, String, u32)>,
    /// (holder, previous ref, new ref, updater's uid) of each `updated`
    /// event.
    updated: Vec<(ConnId, String, String, u32)>,
}

impl Expected {
    fn departures(model: &Model, gone: &[ModelEntry], reason: LeaveReason) -> Expected {
        let gone: Vec<(ModelEntry, LeaveReason)> =
            gone.iter().map(|e| (e.clone(), reason)).collect();
        Expected::departures_for(model, &gone)
    }

    /// Departures with a reason each.
    fn departures_for(model: &Model, gone: &[(ModelEntry, LeaveReason)]) -> Expected {
        let mut by_topic: BTreeMap<&str, BTreeMap<String, LeaveReason>> = BTreeMap::new();
        for (entry, reason) in gone {
            by_topic
                .entry(&entry.topic)
                .or_default()
                .insert(entry.phx_ref.clone(), *reason);
        }
        let diffs = by_topic
            .into_iter()
            .filter_map(|(topic, reasons)| {
                let to = model.subscribers(topic);
                (!to.is_empty()).then(|| ExpectedDiff {
                    topic: topic.to_owned(),
                    to,
                    joins: BTreeSet::new(),
                    leaves: reasons.keys().cloned().collect(),
                    reasons,
                })
            })
            .collect();
        Expected {
            diffs,
            ..Expected::default()
        }
    }

    /// Departures by `untrack` from `conn`: each holder but `conn` itself
    /// is told who removed its entry.
    fn untracked(model: &Model, gone: &[ModelEntry], conn: ConnId) -> Expected {
        let by = model.uid_of(conn).expect("only an open connection removes");
        Expected {
            removed: gone
                .iter()
                .filter_map(|e| match e.conn {
                    Some(holder) if holder != conn => Some((holder, e.phx_ref.clone(), by)),
                    _ => None,
                })
                .collect(),
            ..Expected::departures(model, gone, LeaveReason::Untrack)
        }
    }
}

/// A ref once issued, with what is needed to name it again.
#[derive(Debug, Clone)]
struct Issued {
    phx_ref: String,
    topic: String,
    token: String,
}

/// The registry under test, the model, and what the test saw.
#[derive(Clone)]
struct World {
    registry: Registry,
    model: Model,
    now: i64,
    /// The current connection of each slot, open or closed.
    slots: Vec<ConnId>,
    next_conn: ConnId,
    /// The start time of each process's current incarnation; bumped on exit
    /// so that a pid is never tracked again under an exited identity.
    generations: [u64; PROCESSES],
    next_counter: u64,
    issued: Vec<Issued>,
    last_seq: u64,
    seen_refs: HashSet<String>,
    last_joined_at: i64,
    views: HashMap<(ConnId, String), View>,
    /// The rows as the store would hold them after applying every change.
    persisted: BTreeMap<String, Entry>,
}

impl World {
    fn new() -> World {
        let mut world = World {
            registry: property_registry(Registry::new(property_limits())),
            model: Model {
                limits: property_limits(),
                ..Model::default()
            },
            now: 1_000,
            slots: Vec::new(),
            next_conn: 1,
            generations: [1; PROCESSES],
            next_counter: 1,
            issued: Vec::new(),
            last_seq: 0,
            seen_refs: HashSet::new(),
            last_joined_at: 0,
            views: HashMap::new(),
            persisted: BTreeMap::new(),
        };
        world.slots = (0..SLOT_UIDS.len()).map(|slot| world.open(slot)).collect();
        world
    }

    fn open(&mut self, slot: usize) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        let uid = SLOT_UIDS[slot];
        self.registry.open(
            conn,
            Peer {
                pid: 7000 + conn as u32,
                uid,
                user: user_name(uid),
            },
        );
        self.model.conns.insert(
            conn,
            ModelConn {
                uid,
                subscriptions: BTreeSet::new(),
            },
        );
        conn
    }

    fn counter(&mut self) -> u64 {
        self.next_counter += 1;
        self.next_counter
    }

    /// A meta of 7 to 48 bytes, so that the meta quota binds at a few
    /// entries and an update can grow or shrink one.
    fn meta(&mut self, bad: bool) -> Map<String, Value> {
        if bad {
            return meta(json!({"seq": 1}));
        }
        let n = self.counter();
        match n % 3 {
            0 => meta(json!({"n": n})),
            padded => meta(json!({"n": n, "p": "x".repeat(padded as usize * 15)})),
        }
    }

    /// A ref ever issued (or one never issued), with its topic or, if
    /// `wrong_topic`, another.
    fn pick_ref(&self, pick: usize, wrong_topic: bool) -> (String, String) {
        let (phx_ref, topic) = match self.issued.get(pick % self.issued.len().max(1)) {
            Some(issued) => (issued.phx_ref.clone(), issued.topic.clone()),
            None => ("p0".to_owned(), TOPICS[0].to_owned()),
        };
        if wrong_topic {
            let other = TOPICS.iter().find(|t| **t != topic).unwrap();
            (phx_ref, (*other).to_owned())
        } else {
            (phx_ref, topic)
        }
    }

    fn handle(&mut self, conn: ConnId, op: Op) -> Outbox {
        let mut out = Outbox::default();
        crate::ops::answer(&mut self.registry, conn, json!(0), op, self.now, &mut out);
        made(out)
    }

    fn check_new_ref(&mut self, phx_ref: &str) {
        assert!(
            self.seen_refs.insert(phx_ref.to_owned()),
            "ref {phx_ref} issued twice"
        );
    }

    /// Runs one action against the registry and the model and checks
    /// everything it sent and left behind.
    fn step(&mut self, action: &Action) {
        let (out, expected) = self.run(action);
        self.check_deliveries(&out, &expected);
        self.check_state();
    }

    fn run(&mut self, action: &Action) -> (Outbox, Expected) {
        match *action {
            Action::Reopen { slot } => {
                if !self.model.conns.contains_key(&self.slots[slot]) {
                    self.slots[slot] = self.open(slot);
                }
                (Outbox::default(), Expected::default())
            }
            Action::Track {
                slot,
                topic,
                key,
                lifetime,
                process,
                subscribe,
                bad_meta,
            } => self.track(
                self.slots[slot],
                TOPICS[topic],
                KEYS[key],
                lifetime,
                process,
                subscribe,
                bad_meta,
            ),
            Action::UntrackByRef {
                slot,
                pick,
                wrong_topic,
            } => {
                let conn = self.slots[slot];
                let (phx_ref, topic) = self.pick_ref(pick, wrong_topic);
                let out = self.handle(
                    conn,
                    Op::Untrack(UntrackRequest {
                        topic: topic.clone(),
                        phx_ref: Some(phx_ref.clone()),
                        key: None,
                    }),
                );
                let target = self
                    .model
                    .live(&phx_ref)
                    .filter(|e| e.topic == topic)
                    .cloned();
                match target {
                    Some(entry) if !self.model.may_change(conn, &entry) => {
                        assert_refused(&out, conn, ErrorCode::PermissionDenied);
                        (out, Expected::default())
                    }
                    Some(_) => {
                        assert_eq!(ok_reply::<UntrackReply>(&out, conn).removed, 1);
                        let gone = self.model.remove_where(|e| e.phx_ref == phx_ref);
                        self.model.bury(&gone, conn, self.now);
                        let expected = Expected::untracked(&self.model, &gone, conn);
                        (out, expected)
                    }
                    None => {
                        assert_eq!(ok_reply::<UntrackReply>(&out, conn).removed, 0);
                        (out, Expected::default())
                    }
                }
            }
            Action::UntrackByKey { slot, topic, key } => {
                let conn = self.slots[slot];
                let (topic, key) = (TOPICS[topic], KEYS[key]);
                let out = self.handle(
                    conn,
                    Op::Untrack(UntrackRequest {
                        topic: topic.to_owned(),
                        phx_ref: None,
                        key: Some(key.to_owned()),
                    }),
                );
                let removable: BTreeSet<String> = self
                    .model
                    .on_topic(topic)
                    .filter(|e| e.key == key && self.model.may_change(conn, e))
                    .map(|e| e.phx_ref.clone())
                    .collect();
                assert_eq!(
                    ok_reply::<UntrackReply>(&out, conn).removed,
                    removable.len()
                );
                let gone = self.model.remove_where(|e| removable.contains(&e.phx_ref));
                self.model.bury(&gone, conn, self.now);
                let expected = if gone.is_empty() {
                    Expected::default()
                } else {
                    Expected::untracked(&self.model, &gone, conn)
                };
                (out, expected)
            }
            Action::UpdateByRef {
                slot,
                pick,
                wrong_topic,
                bad_meta,
            } => {
                let conn = self.slots[slot];
                let (phx_ref, topic) = self.pick_ref(pick, wrong_topic);
                let meta = self.meta(bad_meta);
                let bytes = size_of(&meta);
                let out = self.handle(
                    conn,
                    Op::Update(UpdateRequest {
                        topic: topic.clone(),
                        phx_ref: Some(phx_ref.clone()),
                        key: None,
                        meta,
                    }),
                );
                let refusal = if bad_meta {
                    Some(ErrorCode::BadRequest)
                } else {
                    match self.model.live(&phx_ref).filter(|e| e.topic == topic) {
                        None => Some(ErrorCode::NotFound),
                        Some(e) if !self.model.may_change(conn, e) => {
                            Some(ErrorCode::PermissionDenied)
                        }
                        Some(e) => self.model.update_over_quota(e, bytes),
                    }
                };
                self.updated(conn, out, &phx_ref, bytes, refusal)
            }
            Action::UpdateByKey { slot, topic, key } => {
                let conn = self.slots[slot];
                let (topic, key) = (TOPICS[topic], KEYS[key]);
                let meta = self.meta(false);
                let bytes = size_of(&meta);
                let out = self.handle(
                    conn,
                    Op::Update(UpdateRequest {
                        topic: topic.to_owned(),
                        phx_ref: None,
                        key: Some(key.to_owned()),
                        meta,
                    }),
                );
                let held: Vec<String> = self
                    .model
                    .held_by(conn)
                    .filter(|e| e.topic == topic && e.key == key)
                    .map(|e| e.phx_ref.clone())
                    .collect();
                let refusal = if !self.model.conns.contains_key(&conn) {
                    Some(ErrorCode::Internal)
                } else {
                    match held.len() {
                        0 => Some(ErrorCode::NotFound),
                        1 => {
                            let entry = self.model.live(&held[0]).unwrap();
                            self.model.update_over_quota(entry, bytes)
                        }
                        _ => Some(ErrorCode::BadRequest),
                    }
                };
                let old_ref = held.first().cloned().unwrap_or_default();
                self.updated(conn, out, &old_ref, bytes, refusal)
            }
            Action::Subscribe { slot, topic } => {
                let conn = self.slots[slot];
                let topic = TOPICS[topic];
                let out = self.handle(conn, Op::Subscribe(Subscription::Topic(topic.to_owned())));
                let refusal = match self.model.conns.get(&conn) {
                    None => Some(ErrorCode::Internal),
                    Some(c)
                        if !c.subscriptions.contains(topic)
                            && c.subscriptions.len()
                                >= self.model.limits.max_subscriptions_per_connection =>
                    {
                        Some(ErrorCode::LimitExceeded)
                    }
                    Some(_) => None,
                };
                if let Some(code) = refusal {
                    assert_refused(&out, conn, code);
                    return (out, Expected::default());
                }
                assert!(the_reply(&out, conn).ok);
                if let Some(c) = self.model.conns.get_mut(&conn) {
                    c.subscriptions.insert(topic.to_owned());
                }
                let expected = Expected {
                    states: vec![(conn, topic.to_owned())],
                    ..Expected::default()
                };
                (out, expected)
            }
            Action::Unsubscribe { slot, topic } => {
                let conn = self.slots[slot];
                let topic = TOPICS[topic];
                let out = self.handle(conn, Op::Unsubscribe(Subscription::Topic(topic.to_owned())));
                assert!(the_reply(&out, conn).ok);
                if let Some(c) = self.model.conns.get_mut(&conn) {
                    c.subscriptions.remove(topic);
                }
                (out, Expected::default())
            }
            Action::Resume {
                slot,
                ref picks,
                detached,
            } => self.resume(self.slots[slot], picks, detached),
            Action::End { ref endings } => self.end_together(endings),
            Action::AdvanceTime { millis } => {
                self.now += millis;
                (Outbox::default(), Expected::default())
            }
            Action::ReachDeadline { offset } => {
                if let Some(deadline) = self.model.entries.iter().filter_map(|e| e.deadline).min() {
                    self.now = deadline + offset;
                }
                (Outbox::default(), Expected::default())
            }
            Action::Expire => {
                let mut out = Outbox::default();
                self.registry.expire(self.now, &mut out);
                let now = self.now;
                let gone = self
                    .model
                    .remove_where(|e| e.deadline.is_some_and(|deadline| deadline <= now));
                let expected = Expected::departures(&self.model, &gone, LeaveReason::Expired);
                (out, expected)
            }
            Action::Restart { lowered } => {
                self.restart(lowered);
                (Outbox::default(), Expected::default())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn track(
        &mut self,
        conn: ConnId,
        topic: &str,
        key: &str,
        lifetime: Lifetime,
        process: usize,
        subscribe: bool,
        bad_meta: bool,
    ) -> (Outbox, Expected) {
        let process = ProcessId {
            pid: 500 + process as u32,
            start_time: self.generations[process],
        };
        let token = format!("token-{}", self.counter());
        let request = TrackRequest {
            topic: topic.to_owned(),
            key: key.to_owned(),
            meta: self.meta(bad_meta),
            pid: None,
            lifetime,
            subscribe,
        };
        let meta_bytes = size_of(&request.meta);
        let out = self.handle(
            conn,
            Op::Track(Track {
                request,
                process,
                token: token.clone(),
                token_hash: token_hash(&token),
            }),
        );

        let limits = self.model.limits;
        let refusal = if bad_meta {
            Some(ErrorCode::BadRequest)
        } else {
            match self.model.conns.get(&conn) {
                None => Some(ErrorCode::Internal),
                Some(c) => self
                    .model
                    .no_room_for(conn, topic, key)
                    .or_else(|| self.model.over_quota(c.uid, meta_bytes, false))
                    .or_else(|| {
                        let over_subscribed = subscribe
                            && !c.subscriptions.contains(topic)
                            && c.subscriptions.len() >= limits.max_subscriptions_per_connection;
                        over_subscribed.then_some(ErrorCode::LimitExceeded)
                    }),
            }
        };
        if let Some(code) = refusal {
            assert_refused(&out, conn, code);
            return (out, Expected::default());
        }

        let reply: TrackReply = ok_reply(&out, conn);
        assert!(
            reply.seq > self.last_seq,
            "seq {} after {}",
            reply.seq,
            self.last_seq
        );
        self.last_seq = reply.seq;
        self.check_new_ref(&reply.phx_ref);
        let joined_at = self.now.max(self.last_joined_at);
        assert_eq!(reply.joined_at, joined_at, "joined_at never goes back");
        self.last_joined_at = joined_at;
        assert_eq!(reply.resume_token, token);

        let uid = self.model.uid_of(conn).unwrap();
        self.model.entries.push(ModelEntry {
            seq: reply.seq,
            phx_ref: reply.phx_ref.clone(),
            topic: topic.to_owned(),
            key: key.to_owned(),
            conn: Some(conn),
            uid,
            process,
            lifetime,
            token: token.clone(),
            deadline: None,
            meta_bytes,
        });
        assert_eq!(
            summary(&reply.standing),
            self.model.standing(&reply.phx_ref)
        );
        let told = self
            .model
            .standing_by_seq(self.model.entries.last().unwrap());
        self.model.told.insert(reply.seq, told);
        self.issued.push(Issued {
            phx_ref: reply.phx_ref.clone(),
            topic: topic.to_owned(),
            token,
        });

        // The diff goes to those subscribed before the track; a tracker that
        // subscribes with it gets the state instead.
        let mut expected = Expected::default();
        let to = self.model.subscribers(topic);
        if !to.is_empty() {
            expected.diffs.push(ExpectedDiff {
                topic: topic.to_owned(),
                to,
                joins: BTreeSet::from([reply.phx_ref.clone()]),
                leaves: BTreeSet::new(),
                reasons: BTreeMap::new(),
            });
        }
        if subscribe {
            let subscriptions = &mut self.model.conns.get_mut(&conn).unwrap().subscriptions;
            subscriptions.insert(topic.to_owned());
            expected.states.push((conn, topic.to_owned()));
        }
        (out, expected)
    }

    /// Checks an update's reply and applies it to the model.
    fn updated(
        &mut self,
        conn: ConnId,
        out: Outbox,
        old_ref: &str,
        meta_bytes: usize,
        refusal: Option<ErrorCode>,
    ) -> (Outbox, Expected) {
        if let Some(code) = refusal {
            assert_refused(&out, conn, code);
            return (out, Expected::default());
        }
        let reply: UpdateReply = ok_reply(&out, conn);
        assert_eq!(reply.prev_ref, old_ref);
        self.check_new_ref(&reply.phx_ref);
        let entry = self
            .model
            .entries
            .iter_mut()
            .find(|e| e.phx_ref == old_ref)
            .unwrap();
        entry.phx_ref = reply.phx_ref.clone();
        entry.meta_bytes = meta_bytes;
        let (topic, token) = (entry.topic.clone(), entry.token.clone());
        let mut expected = Expected::default();
        if let Some(holder) = entry.conn.filter(|holder| *holder != conn) {
            let by = self
                .model
                .uid_of(conn)
                .expect("only an open connection updates");
            expected
                .updated
                .push((holder, old_ref.to_owned(), reply.phx_ref.clone(), by));
        }
        self.issued.push(Issued {
            phx_ref: reply.phx_ref.clone(),
            topic: topic.clone(),
            token,
        });
        let to = self.model.subscribers(&topic);
        if !to.is_empty() {
            expected.diffs.push(ExpectedDiff {
                topic,
                to,
                joins: BTreeSet::from([reply.phx_ref]),
                leaves: BTreeSet::from([old_ref.to_owned()]),
                reasons: BTreeMap::from([(old_ref.to_owned(), LeaveReason::Update)]),
            });
        }
        (out, expected)
    }

    /// Ends connections and processes in one call, as the core applies a
    /// run of them. An entry ended twice over leaves for the first reason.
    fn end_together(&mut self, picks: &[EndingPick]) -> (Outbox, Expected) {
        let mut endings = Vec::new();
        let mut gone = Vec::new();
        for pick in picks {
            match *pick {
                EndingPick::Close { slot } => {
                    let conn = self.slots[slot];
                    endings.push(Ending::Closed(conn));
                    if self.model.conns.remove(&conn).is_none() {
                        continue;
                    }
                    let closed = self.model.remove_where(|e| {
                        e.conn == Some(conn) && e.lifetime == Lifetime::Connection
                    });
                    gone.extend(closed.into_iter().map(|e| (e, LeaveReason::Closed)));
                    for entry in &mut self.model.entries {
                        if entry.conn == Some(conn) {
                            entry.conn = None;
                        }
                    }
                }
                EndingPick::ProcessExit { process, stale } => {
                    let id = ProcessId {
                        pid: 500 + process as u32,
                        start_time: if stale {
                            self.generations[process] + 1_000_000
                        } else {
                            self.generations[process]
                        },
                    };
                    endings.push(Ending::Exited(id));
                    if !stale {
                        self.generations[process] += 1;
                    }
                    let exited = self.model.remove_where(|e| e.process == id);
                    gone.extend(exited.into_iter().map(|e| (e, LeaveReason::PidExit)));
                }
            }
        }
        let mut out = Outbox::default();
        self.registry.end(&endings, self.now, &mut out);
        (out, Expected::departures_for(&self.model, &gone))
    }

    fn resume(&mut self, conn: ConnId, picks: &[usize], detached: bool) -> (Outbox, Expected) {
        let detached: Vec<String> = self
            .model
            .entries
            .iter()
            .filter(|e| detached && e.conn.is_none())
            .map(|e| e.token.clone())
            .collect();
        let candidates: Vec<String> = if detached.is_empty() {
            self.issued.iter().map(|i| i.token.clone()).collect()
        } else {
            detached
        };
        let tokens: Vec<String> = picks
            .iter()
            .map(
                |pick| match candidates.get(pick % candidates.len().max(1)) {
                    Some(token) => token.clone(),
                    None => "token-never-issued".to_owned(),
                },
            )
            .collect();
        let out = self.handle(
            conn,
            Op::Resume(
                tokens
                    .iter()
                    .map(|token| (token.clone(), token_hash(token)))
                    .collect(),
            ),
        );
        let reply: ResumeReply = ok_reply(&out, conn);
        assert!(
            out.deliveries[1..].iter().all(|delivery| matches!(
                delivery,
                Delivery::Event { to, event: Event::Role { .. } } if *to == [conn]
            )),
            "resuming sends its reply, then role events to the resumer only"
        );
        assert!(
            out.changes.is_empty(),
            "who holds an entry is not persisted"
        );

        let mut resumed = Vec::new();
        let mut refs = BTreeMap::new();
        let mut expired = Vec::new();
        let mut refused = BTreeMap::new();
        let mut removed = BTreeMap::new();
        if let Some(uid) = self.model.uid_of(conn) {
            for token in tokens {
                let found = self
                    .model
                    .entries
                    .iter()
                    .position(|e| e.token == token && e.uid == uid && e.conn.is_none());
                let Some(index) = found else {
                    let exists = self.model.entries.iter().any(|e| e.token == token);
                    match self.model.tombstones.get(&token) {
                        Some((of, until, phx_ref))
                            if !exists && *of == uid && *until > self.now =>
                        {
                            removed.insert(token, phx_ref.clone());
                        }
                        _ => expired.push(token),
                    }
                    continue;
                };
                let entry = &self.model.entries[index];
                let refusal = self
                    .model
                    .no_room_for(conn, &entry.topic, &entry.key)
                    .or_else(|| {
                        let claimed_again = entry.deadline.is_some();
                        claimed_again
                            .then(|| self.model.over_quota(uid, entry.meta_bytes, true))
                            .flatten()
                    });
                if let Some(code) = refusal {
                    refused.insert(token, code);
                    continue;
                }
                let entry = &mut self.model.entries[index];
                entry.conn = Some(conn);
                entry.deadline = None;
                resumed.push(entry.phx_ref.clone());
                refs.insert(token, entry.phx_ref.clone());
            }
        }
        assert_eq!(reply.refs, refs, "each resumed token's ref");
        assert_eq!(reply.resumed, resumed);
        assert_eq!(reply.expired, expired);
        let told: BTreeMap<String, String> = reply
            .removed
            .iter()
            .map(|(token, entry)| (token.clone(), entry.removal.phx_ref.clone()))
            .collect();
        assert_eq!(told, removed, "tokens of removed entries");
        assert_eq!(refused_codes(&out, conn), refused, "refused tokens");
        assert_eq!(
            reply.roles.keys().cloned().collect::<BTreeSet<_>>(),
            resumed.iter().cloned().collect::<BTreeSet<_>>()
        );
        for (phx_ref, standing) in &reply.roles {
            assert_eq!(summary(standing), self.model.standing(phx_ref));
        }
        (out, Expected::default())
    }

    /// What a start does (`Driver::start`, `Core::restore`): rows come
    /// back without connections, and connection entries get a deadline to
    /// be resumed by.
    fn restart(&mut self, lowered: bool) {
        let deadline = self.now + RESUME_GRACE;
        let rows: Vec<Entry> = self
            .persisted
            .values()
            .cloned()
            .map(|mut entry| {
                entry.conn = None;
                entry.resume_deadline =
                    (entry.lifetime == Lifetime::Connection).then_some(deadline);
                entry
            })
            .collect();
        self.last_joined_at = rows.iter().map(|e| e.joined_at).max().unwrap_or(0);
        self.model.limits = if lowered {
            lowered_limits()
        } else {
            property_limits()
        };
        self.registry = property_registry(Registry::restore(
            self.model.limits,
            rows,
            self.registry.next_seq(),
        ));
        self.model.conns.clear();
        // What was removed is remembered in memory only.
        self.model.tombstones.clear();
        for entry in &mut self.model.entries {
            entry.conn = None;
            entry.deadline = (entry.lifetime == Lifetime::Connection).then_some(deadline);
        }
        self.model.all_told();
        self.views.clear();
        for slot in 0..SLOT_UIDS.len() {
            self.slots[slot] = self.open(slot);
        }
    }

    /// Checks the lines of one step, and applies them to the subscribers'
    /// views and the changes to the persisted rows.
    fn check_deliveries(&mut self, out: &Outbox, expected: &Expected) {
        // Role events: exactly one for each entry a connection holds whose
        // standing (position and owner) is not the one its holder was last
        // told, none otherwise; then its holder knows it.
        let mut expected_roles = BTreeMap::new();
        let mut told_now = Vec::new();
        for entry in &self.model.entries {
            let Some(conn) = entry.conn else { continue };
            let standing = self.model.standing_by_seq(entry);
            if self.model.told.get(&entry.seq) != Some(&standing) {
                expected_roles.insert(
                    (conn, entry.phx_ref.clone()),
                    (entry.topic.clone(), self.model.standing(&entry.phx_ref)),
                );
            }
            told_now.push((entry.seq, standing));
        }
        self.model.told.extend(told_now);
        let live: BTreeSet<u64> = self.model.entries.iter().map(|e| e.seq).collect();
        self.model.told.retain(|seq, _| live.contains(seq));
        let mut roles = BTreeMap::new();
        let mut diffs = Vec::new();
        let mut states = Vec::new();
        let mut removed = Vec::new();
        let mut updated = Vec::new();
        for delivery in &out.deliveries {
            let Delivery::Event { to, event } = delivery else {
                continue;
            };
            match event {
                Event::Role { topic, payload } => {
                    assert_eq!(to.len(), 1, "a role event has one recipient");
                    let seen = (topic.clone(), summary(&payload.standing));
                    let earlier = roles.insert((to[0], payload.phx_ref.clone()), seen);
                    assert!(earlier.is_none(), "two role events for {}", payload.phx_ref);
                }
                Event::PresenceDiff {
                    topic,
                    payload,
                    owner,
                    reasons,
                } => {
                    diffs.push(ExpectedDiff {
                        topic: topic.clone(),
                        to: to.clone(),
                        joins: refs_of(&payload.joins),
                        leaves: refs_of(&payload.leaves),
                        reasons: reasons.clone(),
                    });
                    let owner_now = self
                        .model
                        .on_topic(topic)
                        .next()
                        .map(|e| e.phx_ref.as_str());
                    assert_eq!(
                        owner_ref(owner),
                        owner_now,
                        "a diff names the owner after it"
                    );
                    for conn in to {
                        assert!(
                            self.model.subscribed(*conn, topic),
                            "a diff on {topic} to {conn}, which is not subscribed"
                        );
                        self.views
                            .get_mut(&(*conn, topic.clone()))
                            .unwrap_or_else(|| panic!("a diff to {conn} before any state"))
                            .apply(payload, owner);
                    }
                }
                Event::PresenceState {
                    topic,
                    payload,
                    owner,
                } => {
                    for conn in to {
                        assert!(self.model.subscribed(*conn, topic));
                        states.push((*conn, topic.clone()));
                        self.views.insert(
                            (*conn, topic.clone()),
                            View {
                                presences: payload.clone(),
                                owner: owner.clone(),
                            },
                        );
                    }
                }
                Event::Shutdown { .. } => panic!("the registry never shuts down"),
                Event::Resync { .. } => panic!("only a slow reader's resync sends one"),
                Event::Removed { topic, payload } => {
                    assert_eq!(to.len(), 1, "a removed event has one recipient");
                    assert!(
                        diffs.is_empty(),
                        "the holder hears of its loss before any diff"
                    );
                    assert_eq!(payload.reason, LeaveReason::Untrack);
                    assert_eq!(payload.by.user, user_name(payload.by.uid));
                    let issued = self.issued.iter().find(|i| i.phx_ref == payload.phx_ref);
                    assert_eq!(issued.map(|i| &i.topic), Some(topic));
                    removed.push((to[0], payload.phx_ref.clone(), payload.by.uid));
                }
                Event::Updated { topic, payload } => {
                    assert_eq!(to.len(), 1, "an updated event has one recipient");
                    assert!(
                        diffs.is_empty(),
                        "the holder hears of its entry's new ref before any diff"
                    );
                    assert_eq!(payload.by.user, user_name(payload.by.uid));
                    let entry = self.model.live(&payload.phx_ref);
                    assert_eq!(entry.map(|e| &e.topic), Some(topic));
                    assert_eq!(entry.map(|e| e.key.as_str()), Some(payload.key.as_str()));
                    assert_eq!(entry.map(|e| e.meta_bytes), Some(size_of(&payload.meta)));
                    updated.push((
                        to[0],
                        payload.prev_ref.clone(),
                        payload.phx_ref.clone(),
                        payload.by.uid,
                    ));
                }
            }
        }
        assert_eq!(removed, expected.removed, "removed events");
        assert_eq!(updated, expected.updated, "updated events");
        assert_eq!(roles, expected_roles, "role events");
        assert_eq!(diffs, expected.diffs, "presence diffs");
        assert_eq!(states, expected.states, "presence states");

        for change in &out.changes {
            match change {
                Change::Put(entry) => {
                    self.persisted
                        .insert(entry.phx_ref.clone(), (**entry).clone());
                }
                Change::Delete(phx_ref) => {
                    assert!(
                        self.persisted.remove(phx_ref).is_some(),
                        "a delete of {phx_ref}, which is not persisted"
                    );
                }
                Change::History(_) => {}
            }
        }
    }

    /// Compares the registry with the model, the subscribers' views and the
    /// persisted rows.
    fn check_state(&mut self) {
        // The registry's entries are the model's, down to who holds them.
        let mut actual: Vec<ModelEntry> = self
            .registry
            .entries()
            .map(|e| ModelEntry {
                seq: e.seq,
                phx_ref: e.phx_ref.clone(),
                topic: e.topic.clone(),
                key: e.key.clone(),
                conn: e.conn,
                uid: e.uid,
                process: e.process,
                lifetime: e.lifetime,
                token: String::new(),
                deadline: e.resume_deadline,
                meta_bytes: size_of(&e.meta),
            })
            .collect();
        actual.sort_by_key(|e| e.seq);
        let expected: Vec<ModelEntry> = self
            .model
            .entries
            .iter()
            .map(|e| ModelEntry {
                token: String::new(),
                ..e.clone()
            })
            .collect();
        assert_eq!(actual, expected, "registry entries");
        for entry in self.registry.entries() {
            let model = self.model.live(&entry.phx_ref).unwrap();
            assert_eq!(entry.token_hash, token_hash(&model.token));
        }

        // `list`, topic by topic: one owner, the lowest seq, and every
        // subscriber's view equal to it.
        let all: ListAllReply = ok_reply(&self.handle(NOBODY, Op::List(None)), NOBODY);
        let owners = self.model.owners();
        assert_eq!(
            all.topics.keys().cloned().collect::<Vec<_>>(),
            owners.keys().cloned().collect::<Vec<_>>(),
            "listed topics"
        );
        for topic in TOPICS {
            let reply: ListTopicReply = ok_reply(
                &self.handle(NOBODY, Op::List(Some(topic.to_owned()))),
                NOBODY,
            );
            let listed = reply.state;
            if let Some(snapshot) = all.topics.get(topic) {
                assert_eq!(snapshot, &listed);
            }
            let mut metas: Vec<(&String, &Meta)> = listed
                .presences
                .iter()
                .flat_map(|(key, p)| p.metas.iter().map(move |m| (key, m)))
                .collect();
            for presence in listed.presences.values() {
                assert!(!presence.metas.is_empty(), "a listed key has metas");
                assert!(presence.metas.windows(2).all(|w| w[0].seq < w[1].seq));
            }
            metas.sort_by_key(|(_, m)| m.seq);
            let listed_entries: Vec<(String, u64, String, u32)> = metas
                .iter()
                .map(|(key, m)| ((*key).clone(), m.seq, m.phx_ref.clone(), m.uid))
                .collect();
            let model_entries: Vec<(String, u64, String, u32)> = self
                .model
                .on_topic(topic)
                .map(|e| (e.key.clone(), e.seq, e.phx_ref.clone(), e.uid))
                .collect();
            assert_eq!(listed_entries, model_entries, "listed entries on {topic}");
            let owner = self.model.on_topic(topic).next();
            assert_eq!(
                listed.owner.as_ref().map(|o| (&o.phx_ref, &o.key, o.pid)),
                owner.map(|e| (&e.phx_ref, &e.key, e.process.pid)),
                "owner of {topic}"
            );

            for conn in self.model.subscribers(topic) {
                let view = self
                    .views
                    .get(&(conn, topic.to_owned()))
                    .unwrap_or_else(|| panic!("subscriber {conn} of {topic} has no state"));
                assert_eq!(
                    view.sorted(),
                    listed.presences,
                    "{conn}'s view of {topic} after its diffs"
                );
                assert_eq!(view.owner, listed.owner, "{conn}'s owner of {topic}");
            }
        }
        let model = &self.model;
        self.views
            .retain(|(conn, topic), _| model.subscribed(*conn, topic));

        // The persisted rows are the entries, but for who holds them.
        let unheld = |e: &Entry| Entry {
            conn: None,
            resume_deadline: None,
            ..e.clone()
        };
        let persisted: Vec<Entry> = self.persisted.values().map(unheld).collect();
        let mut live: Vec<Entry> = self.registry.entries().map(unheld).collect();
        live.sort_by(|l, r| l.phx_ref.cmp(&r.phx_ref));
        assert_eq!(persisted, live, "persisted rows");

        // Counts and indexes agree.
        let refs: HashSet<&str> = self
            .registry
            .entries()
            .map(|e| e.phx_ref.as_str())
            .collect();
        assert_eq!(refs.len(), self.model.entries.len(), "refs are unique");
        assert_eq!(self.registry.entry_count(), self.model.entries.len());
        assert_eq!(self.registry.topic_count(), owners.len());
        assert_eq!(self.registry.connection_count(), self.model.conns.len());
        assert_eq!(
            self.registry.subscription_count(),
            self.model
                .conns
                .values()
                .map(|c| c.subscriptions.len())
                .sum::<usize>()
        );
        let processes: BTreeSet<ProcessId> = self.registry.processes().collect();
        let model_processes: BTreeSet<ProcessId> =
            self.model.entries.iter().map(|e| e.process).collect();
        assert_eq!(processes, model_processes);
        assert_eq!(
            self.registry.next_resume_deadline(),
            self.model.entries.iter().filter_map(|e| e.deadline).min()
        );
        assert!(self.registry.next_seq() > self.last_seq);

        // What an entry's holder was last told is kept only while no
        // connection holds the entry: a held entry's holder is told every
        // change at once, and a gone entry has no holder to tell.
        let unheld_seqs: BTreeSet<(String, u64)> = self
            .registry
            .entries()
            .filter(|e| e.conn.is_none())
            .map(|e| (e.topic.clone(), e.seq))
            .collect();
        let remembered: BTreeSet<(String, u64)> =
            self.registry.told_before.keys().cloned().collect();
        assert!(
            remembered.is_subset(&unheld_seqs),
            "last told kept for {:?}, not all of them unheld entries ({unheld_seqs:?})",
            remembered.difference(&unheld_seqs).collect::<Vec<_>>()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Keep failures in the output rather than in a file beside the
        // sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// After every step of a random history: one owner per topic and it is
    /// the lowest seq; every subscriber's state plus its diffs equals
    /// `list`; every change of an entry's standing (position or owner)
    /// reaches its holder exactly once, at once if it is held and on its
    /// resume if not, and nothing else sends a role event; seqs and refs are never reused;
    /// and the persisted rows match the entries.
    #[test]
    fn random_histories_keep_the_registry_consistent_with_the_model(
        actions in prop::collection::vec(action(), 1..60)
    ) {
        let mut world = World::new();
        for action in &actions {
            world.step(action);
        }
    }

    /// After any history, a batch of any actions that is rolled back
    /// leaves the registry as it was, down to every index and counter; and
    /// running the batch again, as the core does with the facts of a failed
    /// commit, goes exactly as if the first attempt had never happened.
    #[test]
    fn a_rolled_back_batch_leaves_no_trace_and_can_be_run_again(
        history in prop::collection::vec(action(), 0..40),
        batch in prop::collection::vec(action(), 1..30),
        after in prop::collection::vec(action(), 0..20),
    ) {
        let mut world = World::new();
        for action in &history {
            world.step(action);
        }
        let batch: Vec<Action> = batch.into_iter().filter(is_journaled).collect();
        let before = world.clone();

        world.registry.begin_batch();
        for action in &batch {
            world.step(action);
        }
        world.registry.roll_back();
        prop_assert_eq!(dump(&world.registry), dump(&before.registry));

        // The model and everything the test saw go back too: nothing of
        // the failed batch was revealed.
        let mut world = World { registry: world.registry, ..before };
        world.registry.begin_batch();
        for action in &batch {
            world.step(action);
        }
        world.registry.settle();
        for action in &after {
            world.step(action);
        }
    }
}

/// Whether an action's effect on the registry is journaled. Opening a
/// connection is not (the socket is there whatever the commit does), and a
/// restart replaces the registry.
fn is_journaled(action: &Action) -> bool {
    !matches!(action, Action::Reopen { .. } | Action::Restart { .. })
}

/// Everything the registry holds, every index included, in a canonical
/// order; and what it answers to `list`, `processes` and
/// `next_resume_deadline`. Equal dumps mean registries that nobody can
/// tell apart.
fn dump(registry: &Registry) -> String {
    let mut lines = Vec::new();
    for (name, topic) in &registry.topics {
        lines.push(format!("topic {name}, subscribers {:?}", topic.subscribers));
        for entry in topic.entries.values() {
            lines.push(format!("  {entry:?}"));
        }
    }
    let refs: BTreeMap<_, _> = registry
        .refs
        .iter()
        .map(|(phx_ref, at)| (phx_ref, (&at.topic, at.seq)))
        .collect();
    let by_process: BTreeMap<_, _> = registry.by_process.iter().collect();
    let by_token: BTreeMap<_, _> = registry.by_token.iter().collect();
    let by_uid: BTreeMap<_, _> = registry.usage_by_uid.iter().collect();
    let conns: BTreeMap<_, _> = registry.conns.iter().collect();
    let processes: BTreeSet<ProcessId> = registry.processes().collect();
    lines.push(format!("refs {refs:?}"));
    lines.push(format!("remote entries {}", registry.remote_entries));
    lines.push(format!("by_process {by_process:?}"));
    lines.push(format!("by_token {by_token:?}"));
    lines.push(format!("usage by uid {by_uid:?}"));
    lines.push(format!("awaiting resume {:?}", registry.awaiting_resume));
    lines.push(format!(
        "subscribed to all {:?}",
        registry.subscribed_to_all
    ));
    let tombstones: BTreeMap<_, _> = registry.tombstones.iter().collect();
    lines.push(format!("tombstones {tombstones:?}"));
    lines.push(format!(
        "tombstones by expiry {:?}",
        registry.tombstones_by_expiry
    ));
    let told_before: BTreeMap<_, _> = registry.told_before.iter().collect();
    lines.push(format!("told before {told_before:?}"));
    lines.push(format!("pending {:?}", registry.pending));
    let leaving: BTreeMap<_, _> = registry.leaving.iter().collect();
    let updating: BTreeMap<_, _> = registry.updating.iter().collect();
    let untracking: BTreeMap<_, _> = registry.untracking.iter().collect();
    lines.push(format!("leaving {leaving:?}"));
    lines.push(format!("updating {updating:?}"));
    lines.push(format!("untracking {untracking:?}"));
    lines.push(format!("park deadlines {:?}", registry.park_deadlines));
    lines.push(format!("shown revision {}", registry.shown_revision));
    for (conn, connection) in conns {
        lines.push(format!("conn {conn}: {connection:?}"));
    }
    lines.push(format!(
        "next_seq {}, last_joined_at {}",
        registry.next_seq, registry.last_joined_at
    ));
    let listed = registry.list(Value::Null, None).to_line();
    lines.push(format!("list {}", String::from_utf8_lossy(&listed.bytes)));
    lines.push(format!("processes {processes:?}"));
    lines.push(format!(
        "next resume deadline {:?}",
        registry.next_resume_deadline()
    ));
    lines.join("\n")
}

#[test]
fn history_records_joins_leaves_with_reasons_and_each_new_owner() {
    let mut h = Harness::new();
    let [a, b] = h.connect_in_turn();
    let joined = h.try_track(a, track_request("doc", "x"));
    let owner = ok_reply::<TrackReply>(&joined, a);
    assert_eq!(
        history(&joined),
        [
            (HistoryKind::Join, owner.phx_ref.clone(), None),
            (HistoryKind::Owner, owner.phx_ref.clone(), None),
        ],
        "the first to join is recorded as the owner too"
    );
    let second = h.try_track(b, track_request("doc", "y"));
    let spectator = ok_reply::<TrackReply>(&second, b);
    assert_eq!(
        history(&second),
        [(HistoryKind::Join, spectator.phx_ref.clone(), None)]
    );

    let closed = h.close(a);
    assert_eq!(
        history(&closed),
        [
            (
                HistoryKind::Leave,
                owner.phx_ref.clone(),
                Some(LeaveReason::Closed)
            ),
            (HistoryKind::Owner, spectator.phx_ref.clone(), None),
        ]
    );
    let Change::History(event) = &closed.changes[1] else {
        panic!("a leave record follows the delete");
    };
    assert_eq!((event.at, event.user.as_str()), (h.now, "alice"));
}

#[test]
fn a_remote_entry_listed_ahead_of_local_ones_moves_them_back_and_their_holders_hear_it() {
    // This host's entries of a shared topic, at create revisions 50 and
    // 60; another host's key at 40 shows up later (a listing comes in key
    // order, not revision order).
    let held = shared_entry(50, "pub:x", "web-1:p5", "s5");
    let unheld = Entry {
        key: "other".into(),
        ..shared_entry(60, "pub:x", "web-1:p6", "s6")
    };
    let setup = ClusterSetup::new(
        "web-1",
        SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
    );
    let registry =
        Registry::restore(Limits::default(), vec![held, unheld], 7).with_cluster(Some(setup));
    let mut h = Harness::around(registry);
    let a = h.connect(ALICE);
    h.resume(a, &["s5"]);

    let record = SharedRecord {
        key: "theirs".into(),
        phx_ref: "web-2:p1".into(),
        phx_ref_prev: None,
        meta: Map::new(),
        joined_at: 1,
        pid: 1,
        uid: BOB,
        user: user_name(BOB),
        host: "web-2".into(),
        lifetime: Lifetime::Connection,
        readable: true,
    };
    let changes = ClusterChanges {
        revision: 70,
        events: vec![ClusterEvent::Put {
            topic: "pub:x".into(),
            id: "web-2:p1".into(),
            create_revision: 40,
            lease: 7,
            record,
        }],
    };
    let mut out = Outbox::default();
    let report = h.registry.apply_cluster(&changes, h.now, &mut out);
    assert_eq!(report.applied, 1);
    assert_eq!(
        role_summaries(&out),
        [(a, "web-1:p5".to_owned(), spectator_standing(1, "web-2:p1"))]
    );
    assert_eq!(
        history(&out),
        [
            (HistoryKind::Join, "web-2:p1".to_owned(), None),
            (HistoryKind::Owner, "web-2:p1".to_owned(), None),
        ]
    );
    assert!(
        row_changes(&out).is_empty(),
        "another host's entry is no row"
    );

    // The entry nobody held hears it when resumed.
    let out = h.resume(a, &["s6"]);
    assert_eq!(
        role_summaries(&out),
        [(a, "web-1:p6".to_owned(), spectator_standing(2, "web-2:p1"))]
    );
}

#[test]
fn parking_cancelling_and_showing_a_shared_track_are_taken_back_by_a_roll_back() {
    let setup = ClusterSetup::new(
        "web-1",
        SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
    );
    let mut registry = Registry::new(Limits::default()).with_cluster(Some(setup));
    let live = LeaseView::Live {
        lease: 7,
        fence_at: std::time::Duration::MAX,
    };
    registry.set_lease(live, 0, &mut Outbox::default());
    let mut h = Harness::around(registry);
    let a = h.connect(ALICE);
    let before = dump(&h.registry);

    // A parked track, rolled back.
    h.registry.begin_batch();
    let parked = h.try_track(a, track_request("pub:x", "page"));
    let [ClusterWrite::Create { id, record, .. }] = &parked.cluster[..] else {
        panic!("one create: {:?}", parked.cluster);
    };
    assert_eq!(record.phx_ref, *id);
    assert!(matches!(parked.deliveries[..], [Delivery::Awaiting { .. }]));
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), before);

    // Parked and settled; then a close cancels it, rolled back.
    h.registry.begin_batch();
    let parked = h.try_track(a, track_request("pub:x", "page"));
    h.registry.settle();
    let [ClusterWrite::Create { id, record, .. }] = &parked.cluster[..] else {
        panic!("one create: {:?}", parked.cluster);
    };
    let parked_state = dump(&h.registry);
    assert_ne!(parked_state, before, "the track holds its key");
    h.registry.begin_batch();
    h.close(a);
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), parked_state);

    // Its key shown, rolled back.
    let changes = ClusterChanges {
        revision: 9,
        events: vec![ClusterEvent::Put {
            topic: "pub:x".into(),
            id: id.clone(),
            create_revision: 9,
            lease: 7,
            record: record.clone(),
        }],
    };
    h.registry.begin_batch();
    let mut out = Outbox::default();
    h.registry.apply_cluster(&changes, h.now, &mut out);
    assert_eq!(h.registry.entry_count(), 1);
    assert!(
        matches!(out.deliveries.last(), Some(Delivery::Resolved { conn, .. }) if *conn == a),
        "{:?}",
        out.deliveries
    );
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), parked_state);
}

#[test]
fn a_shared_entry_leaving_and_its_delete_shown_are_each_taken_back_by_a_roll_back() {
    // A restored entry of a shared topic, never resumed: it expires.
    let mut restored = shared_entry(9, "pub:x", "web-1:p3", "s3");
    restored.resume_deadline = Some(500);
    let setup = ClusterSetup::new(
        "web-1",
        SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
    );
    let registry =
        Registry::restore(Limits::default(), vec![restored], 4).with_cluster(Some(setup));
    let mut h = Harness::around(registry);
    let before = dump(&h.registry);

    h.registry.begin_batch();
    let out = h.expire();
    let [
        ClusterWrite::Delete {
            id,
            reason: LeaveReason::Expired,
            ..
        },
    ] = &out.cluster[..]
    else {
        panic!("one delete: {:?}", out.cluster);
    };
    assert_eq!(
        out.changes,
        [Change::Delete("web-1:p3".into())],
        "only its row goes: nothing leaves yet"
    );
    assert_eq!(h.registry.entry_count(), 1, "it keeps its place");
    assert_eq!(
        h.registry.awaiting_resume_count(),
        0,
        "nothing can resume it"
    );
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), before);

    h.registry.begin_batch();
    h.expire();
    h.registry.settle();
    let leaving = dump(&h.registry);
    let changes = ClusterChanges {
        revision: 12,
        events: vec![ClusterEvent::Delete {
            topic: "pub:x".into(),
            id: id.clone(),
            reason: Some((LeaveReason::Expired, None)),
        }],
    };
    h.registry.begin_batch();
    let mut out = Outbox::default();
    h.registry.apply_cluster(&changes, h.now, &mut out);
    assert_eq!(h.registry.entry_count(), 0);
    assert_eq!(
        history(&out),
        [(
            HistoryKind::Leave,
            "web-1:p3".to_owned(),
            Some(LeaveReason::Expired)
        )]
    );
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), leaving);
}

#[test]
fn a_shared_entry_updated_through_etcd_is_taken_back_by_a_roll_back_at_each_step() {
    let entry = shared_entry(9, "pub:x", "web-1:p3", "s3");
    let setup = ClusterSetup::new(
        "web-1",
        SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
    );
    let mut registry =
        Registry::restore(Limits::default(), vec![entry], 4).with_cluster(Some(setup));
    let live = LeaseView::Live {
        lease: 7,
        fence_at: std::time::Duration::MAX,
    };
    registry.set_lease(live, 0, &mut Outbox::default());
    let mut h = Harness::around(registry);
    let a = h.connect(ALICE);
    h.resume(a, &["s3"]);
    let before = dump(&h.registry);

    h.registry.begin_batch();
    let out = h.update_ref(a, "pub:x", "web-1:p3", meta(json!({"n": 1})));
    let [ClusterWrite::Rewrite { record, .. }] = &out.cluster[..] else {
        panic!("one rewrite: {:?}", out.cluster);
    };
    assert!(matches!(out.deliveries[..], [Delivery::Awaiting { .. }]));
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), before);

    h.registry.begin_batch();
    h.update_ref(a, "pub:x", "web-1:p3", meta(json!({"n": 1})));
    h.registry.settle();
    let updating = dump(&h.registry);
    let changes = ClusterChanges {
        revision: 12,
        events: vec![ClusterEvent::Put {
            topic: "pub:x".into(),
            id: "web-1:p3".into(),
            create_revision: 9,
            lease: 7,
            record: record.clone(),
        }],
    };
    h.registry.begin_batch();
    let mut out = Outbox::default();
    h.registry.apply_cluster(&changes, h.now, &mut out);
    assert_eq!(
        h.listed_refs("pub:x"),
        std::slice::from_ref(&record.phx_ref)
    );
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), updating);
}

#[test]
fn letting_go_of_etcd_is_taken_back_by_a_roll_back() {
    let updated = shared_entry(9, "pub:x", "web-1:p3", "s3");
    let untracked = Entry {
        key: "other".into(),
        ..shared_entry(10, "pub:x", "web-1:p4", "s4")
    };
    let setup = ClusterSetup::new(
        "web-1",
        SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
    );
    let mut registry =
        Registry::restore(Limits::default(), vec![updated, untracked], 5).with_cluster(Some(setup));
    let live = LeaseView::Live {
        lease: 7,
        fence_at: std::time::Duration::MAX,
    };
    registry.set_lease(live, 0, &mut Outbox::default());
    let mut h = Harness::around(registry);
    put_remote(
        &mut h.registry,
        remote_entry(
            11,
            "pub:x",
            "web-2:p1",
            ProcessId {
                pid: 900,
                start_time: 1,
            },
            BOB,
        ),
    );
    let a = h.connect(ALICE);
    h.resume(a, &["s3", "s4"]);
    h.registry.begin_batch();
    h.update_ref(a, "pub:x", "web-1:p3", meta(json!({"n": 1})));
    h.untrack_ref(a, "pub:x", "web-1:p4");
    h.try_track(a, track_request("pub:x", "third"));
    h.registry.settle();
    let waiting = dump(&h.registry);

    h.registry.begin_batch();
    let mut out = Outbox::default();
    h.registry.set_lease(LeaseView::Stopped, h.now, &mut out);
    assert_eq!(h.listed_refs("pub:x"), ["web-1:p3"]);
    assert_eq!(
        out.deliveries
            .iter()
            .filter(|delivery| matches!(delivery, Delivery::Resolved { .. }))
            .count(),
        3,
        "the update, the untrack and the track are answered: {:?}",
        out.deliveries
    );
    h.registry.roll_back();
    assert_eq!(dump(&h.registry), waiting);
    assert_eq!(h.registry.lease(), live);
}

// ---------------------------------------------------------------------------
// This host's entries of shared topics, through a made-up etcd, at random
// ---------------------------------------------------------------------------

/// One step of a random history of requests of a shared topic and of what
/// etcd does with the writes they ask.
#[derive(Debug, Clone)]
enum SharedStep {
    Track {
        conn: usize,
        key: usize,
        process: bool,
    },
    Update {
        conn: usize,
        pick: usize,
    },
    UntrackKey {
        conn: usize,
        key: usize,
    },
    Close {
        conn: usize,
    },
    Exit {
        conn: usize,
    },
    /// etcd carries out the first write asked of the key of the `pick`th
    /// write asked (each key's writes in order), answering it before or
    /// after its watch shows it; a created key may be gone before the
    /// watch looks (`lost`).
    Carry {
        pick: usize,
        answer_first: bool,
        lost: bool,
    },
    /// etcd refuses the `pick`th write asked, if it is a create or a
    /// rewrite.
    Refuse {
        pick: usize,
    },
    /// Time passes: requests waiting too long are answered.
    Wait {
        ms: i64,
    },
}

fn shared_step() -> impl Strategy<Value = SharedStep> {
    prop_oneof![
        3 => (0..3usize, 0..3usize, any::<bool>())
            .prop_map(|(conn, key, process)| SharedStep::Track { conn, key, process }),
        2 => (0..3usize, 0..8usize).prop_map(|(conn, pick)| SharedStep::Update { conn, pick }),
        2 => (0..3usize, 0..3usize).prop_map(|(conn, key)| SharedStep::UntrackKey { conn, key }),
        1 => (0..3usize).prop_map(|conn| SharedStep::Close { conn }),
        1 => (0..3usize).prop_map(|conn| SharedStep::Exit { conn }),
        6 => (0..8usize, any::<bool>(), prop::bool::weighted(0.1)).prop_map(
            |(pick, answer_first, lost)| SharedStep::Carry { pick, answer_first, lost }
        ),
        1 => (0..8usize).prop_map(|pick| SharedStep::Refuse { pick }),
        1 => (0..4_000i64).prop_map(|ms| SharedStep::Wait { ms }),
    ]
}

/// What one step hands the registry: the same each time it is run.
#[derive(Debug, Clone)]
enum SharedInput {
    Request(ConnId, Op),
    End(Ending),
    Written(WriteId, Written),
    Changes(ClusterChanges),
    Wait,
}

/// A clustered registry, three connections of one uid, and an etcd that
/// carries out the writes the registry asks when a step says.
struct SharedWorld {
    h: Harness,
    conns: [ConnId; 3],
    /// Writes handed out and not carried out yet, in the order asked.
    asked: Vec<ClusterWrite>,
    revision: u64,
    /// The create revision of each key etcd holds, by id.
    keys: BTreeMap<String, u64>,
}

impl SharedWorld {
    fn new() -> SharedWorld {
        let setup = ClusterSetup::new(
            "web-1",
            SharedTopicsFn::new(|topic| topic.starts_with("pub:")),
        );
        let mut h = Harness::around(Registry::new(Limits::default()).with_cluster(Some(setup)));
        let conns = [h.connect(ALICE), h.connect(ALICE), h.connect(ALICE)];
        SharedWorld {
            h,
            conns,
            asked: Vec::new(),
            revision: 100,
            keys: BTreeMap::new(),
        }
    }

    /// Runs a step as a batch that is rolled back, checks that nothing of
    /// it is left, then runs it again and settles it.
    fn step(&mut self, step: &SharedStep) {
        let inputs = self.inputs(step);
        let before = dump(&self.h.registry);
        self.h.registry.begin_batch();
        self.run(&inputs);
        self.h.registry.roll_back();
        assert_eq!(dump(&self.h.registry), before, "{step:?} left a trace");

        self.h.registry.begin_batch();
        let out = self.run(&inputs);
        self.h.registry.settle();
        self.asked.extend(out.cluster);
        for slot in 0..self.conns.len() {
            if !self.h.registry.conns.contains_key(&self.conns[slot]) {
                self.conns[slot] = self.h.connect(ALICE);
            }
        }
        self.check();
    }

    fn run(&mut self, inputs: &[SharedInput]) -> Outbox {
        let mut out = Outbox::default();
        for input in inputs {
            let now = self.h.now;
            let registry = &mut self.h.registry;
            match input {
                SharedInput::Request(conn, op) => {
                    crate::ops::answer(registry, *conn, json!("req"), op.clone(), now, &mut out);
                }
                SharedInput::End(ending) => registry.end(&[*ending], now, &mut out),
                SharedInput::Written(write, outcome) => {
                    registry.cluster_written(*write, outcome, now, &mut out);
                }
                SharedInput::Changes(changes) => {
                    registry.apply_cluster(changes, now, &mut out);
                }
                SharedInput::Wait => registry.time_out_parked(now, &mut out),
            }
        }
        out
    }

    /// What a step hands the registry; etcd's side of it happens here,
    /// once.
    fn inputs(&mut self, step: &SharedStep) -> Vec<SharedInput> {
        match *step {
            SharedStep::Track { conn, key, process } => {
                let mut request = track_request("pub:x", &format!("k{key}"));
                if process {
                    request.lifetime = Lifetime::Process;
                }
                let conn = self.conns[conn];
                let token = format!("t{}", self.h.next_token);
                self.h.next_token += 1;
                let track = Track {
                    request,
                    process: process_of(conn),
                    token_hash: token_hash(&token),
                    token,
                };
                vec![SharedInput::Request(conn, Op::Track(track))]
            }
            SharedStep::Update { conn, pick } => {
                let own: Vec<String> = self
                    .h
                    .registry
                    .entries()
                    .filter(|e| is_own_shared(e))
                    .map(|e| e.phx_ref.clone())
                    .collect();
                let Some(phx_ref) = own.get(pick % own.len().max(1)) else {
                    return Vec::new();
                };
                let request = UpdateRequest {
                    topic: "pub:x".into(),
                    phx_ref: Some(phx_ref.clone()),
                    key: None,
                    meta: meta(json!({"n": pick})),
                };
                vec![SharedInput::Request(self.conns[conn], Op::Update(request))]
            }
            SharedStep::UntrackKey { conn, key } => {
                let request = UntrackRequest {
                    topic: "pub:x".into(),
                    phx_ref: None,
                    key: Some(format!("k{key}")),
                };
                vec![SharedInput::Request(self.conns[conn], Op::Untrack(request))]
            }
            SharedStep::Close { conn } => vec![SharedInput::End(Ending::Closed(self.conns[conn]))],
            SharedStep::Exit { conn } => {
                vec![SharedInput::End(Ending::Exited(process_of(
                    self.conns[conn],
                )))]
            }
            SharedStep::Carry {
                pick,
                answer_first,
                lost,
            } => self.carry(pick, answer_first, lost),
            SharedStep::Refuse { pick } => {
                if self.asked.is_empty() {
                    return Vec::new();
                }
                let at = pick % self.asked.len();
                let write = match &self.asked[at] {
                    ClusterWrite::Create { write, .. } | ClusterWrite::Rewrite { write, .. } => {
                        *write
                    }
                    // Neither is answered.
                    ClusterWrite::Delete { .. } | ClusterWrite::Adopt { .. } => {
                        return Vec::new();
                    }
                };
                self.asked.remove(at);
                let error = ErrorBody::new(ErrorCode::Unavailable, "fenced");
                vec![SharedInput::Written(write, Written::Refused(error))]
            }
            SharedStep::Wait { ms } => {
                self.h.now += ms;
                vec![SharedInput::Wait]
            }
        }
    }

    /// etcd carries out a write: the first asked of the key of the
    /// `pick`th, as the io layer sends one key's writes in order.
    fn carry(&mut self, pick: usize, answer_first: bool, lost: bool) -> Vec<SharedInput> {
        if self.asked.is_empty() {
            return Vec::new();
        }
        let id_of = |write: &ClusterWrite| write.key().1.to_owned();
        let id = id_of(&self.asked[pick % self.asked.len()]);
        let Some(at) = self.asked.iter().position(|w| id_of(w) == id) else {
            return Vec::new();
        };
        let write = self.asked.remove(at);
        let changes = |revision: u64, events: Vec<ClusterEvent>| {
            SharedInput::Changes(ClusterChanges { revision, events })
        };
        let (answer, shown) = match write {
            ClusterWrite::Create {
                write,
                topic,
                id,
                record,
            } => {
                self.revision += 1;
                let created = self.revision;
                let answer = SharedInput::Written(write, Written::Created { revision: created });
                if lost {
                    // Gone with a lease before the watch looked: it shows
                    // a later revision without it.
                    self.revision += 1;
                    (Some(answer), changes(self.revision, Vec::new()))
                } else {
                    self.keys.insert(id.clone(), created);
                    let put = ClusterEvent::Put {
                        topic,
                        id,
                        create_revision: created,
                        lease: 7,
                        record,
                    };
                    (Some(answer), changes(created, vec![put]))
                }
            }
            ClusterWrite::Rewrite {
                write,
                topic,
                id,
                record,
            } => {
                let Some(&created) = self.keys.get(&id) else {
                    let error = ErrorBody::new(ErrorCode::NotFound, "no such key");
                    return vec![SharedInput::Written(write, Written::Refused(error))];
                };
                self.revision += 1;
                let answer = SharedInput::Written(
                    write,
                    Written::Rewritten {
                        revision: self.revision,
                    },
                );
                let put = ClusterEvent::Put {
                    topic,
                    id,
                    create_revision: created,
                    lease: 7,
                    record,
                };
                (Some(answer), changes(self.revision, vec![put]))
            }
            ClusterWrite::Delete {
                topic,
                id,
                reason,
                by,
                ..
            } => {
                if self.keys.remove(&id).is_none() {
                    return Vec::new();
                }
                self.revision += 1;
                let delete = ClusterEvent::Delete {
                    topic,
                    id,
                    reason: Some((reason, by)),
                };
                (None, changes(self.revision, vec![delete]))
            }
            // Only a restart's entries are adopted; none is restored here.
            ClusterWrite::Adopt { .. } => return Vec::new(),
        };
        match (answer, answer_first) {
            (Some(answer), true) => vec![answer, shown],
            (Some(answer), false) => vec![shown, answer],
            (None, _) => vec![shown],
        }
    }

    /// What the requests waiting for etcd hold agrees with the indexes
    /// beside them.
    fn check(&self) {
        let registry = &self.h.registry;
        let mut deadlines = BTreeSet::new();
        for pending in registry.pending.values() {
            if let Some(deadline) = pending.deadline {
                deadlines.insert((deadline, pending.write));
            }
        }
        for update in registry.updating.values() {
            if let Some(deadline) = update.deadline {
                deadlines.insert((deadline, update.write));
            }
        }
        for (slot, untrack) in &registry.untracking {
            deadlines.insert((untrack.deadline, *slot));
        }
        assert_eq!(registry.park_deadlines, deadlines);
        for (conn, connection) in &registry.conns {
            let parked = registry
                .pending
                .values()
                .filter(|p| p.cancelled.is_none() && p.track.conn == *conn)
                .count();
            assert_eq!(connection.parked, parked, "connection {conn}");
            for phx_ref in &connection.entries {
                let entry = registry.entry(phx_ref).expect("a held entry exists");
                assert!(!registry.is_leaving(entry), "{phx_ref} leaving, yet held");
            }
        }
        for id in registry.leaving.keys() {
            let entry = registry
                .entries()
                .find(|e| e.cluster.as_ref().is_some_and(|s| s.id == *id))
                .expect("a leaving entry keeps its place");
            assert_eq!(entry.conn, None, "{id}");
            assert!(!registry.by_token.contains_key(&entry.token_hash), "{id}");
            assert!(
                registry
                    .by_process
                    .get(&entry.process)
                    .is_none_or(|refs| !refs.contains(&entry.phx_ref)),
                "{id}"
            );
        }
    }

    /// etcd carries out every write asked, and time passes until nothing
    /// waits: then no key is left without its entry, nor an entry of this
    /// host without its key, and nothing waits for etcd any more.
    fn settle_everything(&mut self) {
        for _ in 0..1_000 {
            if self.asked.is_empty() {
                break;
            }
            self.step(&SharedStep::Carry {
                pick: 0,
                answer_first: true,
                lost: false,
            });
        }
        self.step(&SharedStep::Wait { ms: 60_000 });
        let registry = &self.h.registry;
        assert!(self.asked.is_empty(), "{:?}", self.asked);
        assert!(registry.pending.is_empty(), "{:?}", registry.pending);
        assert!(registry.updating.is_empty(), "{:?}", registry.updating);
        assert!(registry.untracking.is_empty(), "{:?}", registry.untracking);
        assert!(registry.leaving.is_empty(), "{:?}", registry.leaving);
        assert!(registry.park_deadlines.is_empty());
        let shown: BTreeSet<String> = registry
            .entries()
            .filter_map(|e| e.cluster.as_ref().map(|s| s.id.clone()))
            .collect();
        let held: BTreeSet<String> = self.keys.keys().cloned().collect();
        assert_eq!(
            shown, held,
            "every key has its entry, and every entry its key"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every step of a random history of a shared topic's requests and of
    /// etcd's answers is taken back whole by a roll-back, keeps the
    /// indexes of what waits for etcd right, and once etcd has carried out
    /// every write, nothing waits, no key is left behind and no entry lacks
    /// its key.
    #[test]
    fn a_shared_topic_through_etcd_leaves_no_trace_and_no_key_behind(
        steps in prop::collection::vec(shared_step(), 1..60)
    ) {
        let mut world = SharedWorld::new();
        for step in &steps {
            world.step(step);
        }
        world.settle_everything();
    }
}
