//! What other hosts do to shared topics, brought to the core: a task runs
//! a [`PrefixMirror`] over everything of the cluster ([`KeySpace::all`])
//! and turns each of its updates into one [`ClusterChanges`], the core's
//! input for them.
//!
//! The turning is [`translate`], a pure function of the update. An entry
//! key's put becomes a [`ClusterEvent::Put`] of its decoded value; one
//! whose value does not decode, or breaks this daemon's limits, still
//! becomes one, marked unreadable, with an empty meta: hosts may run with
//! other limits, and an entry dropped on some hosts only would give those
//! hosts another owner of its topic. An entry key's delete becomes a
//! [`ClusterEvent::Delete`] with the reason its host put at the entry's
//! reason key in the same transaction, which is the same revision, so the
//! same watch message; a delete with no such reason went with its host's
//! lease, which the core reads as the host lost. Reason keys reach the core
//! only so, beside their delete; their own deletes (the sweep of old
//! reasons) and hosts' claims on their names mean nothing to it. A key that
//! is none of these, or an entry whose create revision is not above zero
//! (its seq), is left out and reported, for a log line.
//!
//! After a relisting, a removed entry is paired with the reason key the
//! new listing still holds for it (its host sweeps them a while after), or
//! else left without one.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::gateway::{Event, Gateway, Kv};
use super::mirror::{PrefixMirror, Snapshot, Update};
use super::record::{Departure, Key, KeySpace, Record};
use crate::core::registry::{ClusterChanges, ClusterEvent, SharedRecord};
use crate::protocol::{Actor, LeaveReason, Lifetime, Limits, host_of_ref, validate_name};

/// How often a kind of oddity is logged at most: one line per kind per
/// this, with the count of those not logged.
pub const ODDITY_LOG_EVERY: Duration = Duration::from_secs(10);

/// What kind of thing under the prefix the bridge could not take as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OddityKind {
    /// A key that is not an entry, a reason or a host's claim as a daemon
    /// writes them: left out.
    BadKey,
    /// An entry whose create revision is not above zero: it would have no
    /// place in its queue, so it is left out. (Or an update whose own
    /// revision is below zero, which the core is given as 0.)
    BadRevision,
    /// An entry's value that does not decode or breaks a limit: the entry
    /// keeps its place, with an empty meta.
    UnreadableValue,
    /// A reason beside a delete that does not decode: the delete is read
    /// as a leave for an unknown reason.
    UnreadableReason,
}

impl OddityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OddityKind::BadKey => "a key of no known kind",
            OddityKind::BadRevision => "an entry with a create revision not above zero",
            OddityKind::UnreadableValue => "an unreadable entry value",
            OddityKind::UnreadableReason => "an unreadable leave reason",
        }
    }
}

/// One thing under the prefix the bridge could not take as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oddity {
    pub kind: OddityKind,
    /// The key, and what is wrong, for a log line.
    pub detail: String,
}

impl fmt::Display for Oddity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.detail)
    }
}

/// One update of the mirror, as the core takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub changes: ClusterChanges,
    pub oddities: Vec<Oddity>,
}

/// Turns one update of a mirror over `keys.all()` into the core's input;
/// `None` for [`Update::Unreachable`], which changes nothing.
pub fn translate(keys: &KeySpace, limits: &Limits, update: &Update) -> Option<Translation> {
    match update {
        Update::Changes { revision, events } => {
            Some(translate_events(keys, limits, *revision, events))
        }
        Update::Relisted {
            snapshot,
            removed,
            changed,
        } => Some(translate_relisting(
            keys, limits, snapshot, removed, changed,
        )),
        Update::Unreachable { .. } => None,
    }
}

/// A first listing: every entry of `snapshot` a put, in order of creation.
pub fn translate_listing(keys: &KeySpace, limits: &Limits, snapshot: &Snapshot) -> Translation {
    let changed: Vec<Kv> = snapshot.in_creation_order().into_iter().cloned().collect();
    translate_relisting(keys, limits, snapshot, &[], &changed)
}

/// One watch message's events, in the order etcd sent them. An entry's
/// delete is paired with a put of its reason key at the same revision in
/// the same message.
pub fn translate_events(
    keys: &KeySpace,
    limits: &Limits,
    revision: i64,
    events: &[Event],
) -> Translation {
    let mut out = Builder::new(revision);
    // The reason keys put by this message, by what they name and when.
    let mut reasons: HashMap<(String, String, i64), &[u8]> = HashMap::new();
    let mut parsed = Vec::with_capacity(events.len());
    for event in events {
        let key = match event {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        };
        let key = match keys.parse(key) {
            Ok(key) => key,
            Err(detail) => {
                out.odd(OddityKind::BadKey, detail);
                continue;
            }
        };
        if let (Key::Reason { topic, id }, Event::Put(kv)) = (&key, event) {
            reasons.insert((topic.clone(), id.clone(), kv.mod_revision), &kv.value);
        }
        parsed.push((key, event));
    }
    for (key, event) in parsed {
        let Key::Entry { topic, id } = key else {
            continue;
        };
        match event {
            Event::Put(kv) => out.put(limits, topic, id, kv),
            Event::Delete { revision, .. } => {
                let value = reasons.get(&(topic.clone(), id.clone(), *revision));
                let reason = value.map(|value| out.reason(limits, &topic, &id, value));
                out.events.push(ClusterEvent::Delete { topic, id, reason });
            }
        }
    }
    out.finish()
}

/// A relisting: the deletes of `removed` entries, each with the reason
/// `snapshot` holds for it if any, then the puts of `changed` entries in
/// order of creation. The revision is the snapshot's.
pub fn translate_relisting(
    keys: &KeySpace,
    limits: &Limits,
    snapshot: &Snapshot,
    removed: &[Vec<u8>],
    changed: &[Kv],
) -> Translation {
    let mut out = Builder::new(snapshot.revision);
    for key in removed {
        match keys.parse(key) {
            Ok(Key::Entry { topic, id }) => {
                let reason = snapshot
                    .entries
                    .get(&keys.reason(&topic, &id))
                    .map(|kv| out.reason(limits, &topic, &id, &kv.value));
                out.events.push(ClusterEvent::Delete { topic, id, reason });
            }
            Ok(Key::Reason { .. } | Key::Host(_)) => {}
            Err(detail) => out.odd(OddityKind::BadKey, detail),
        }
    }
    let mut changed: Vec<&Kv> = changed.iter().collect();
    changed.sort_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)));
    for kv in changed {
        match keys.parse(&kv.key) {
            Ok(Key::Entry { topic, id }) => out.put(limits, topic, id, kv),
            Ok(Key::Reason { .. } | Key::Host(_)) => {}
            Err(detail) => out.odd(OddityKind::BadKey, detail),
        }
    }
    out.finish()
}

/// A [`Translation`] being made.
struct Builder {
    revision: u64,
    events: Vec<ClusterEvent>,
    oddities: Vec<Oddity>,
}

impl Builder {
    fn new(revision: i64) -> Builder {
        let mut builder = Builder {
            revision: 0,
            events: Vec::new(),
            oddities: Vec::new(),
        };
        match u64::try_from(revision) {
            Ok(revision) => builder.revision = revision,
            Err(_) => builder.odd(
                OddityKind::BadRevision,
                format!("an update at revision {revision}"),
            ),
        }
        builder
    }

    fn odd(&mut self, kind: OddityKind, detail: String) {
        self.oddities.push(Oddity { kind, detail });
    }

    fn put(&mut self, limits: &Limits, topic: String, id: String, kv: &Kv) {
        let create_revision = match u64::try_from(kv.create_revision) {
            Ok(revision) if revision > 0 => revision,
            _ => {
                return self.odd(
                    OddityKind::BadRevision,
                    format!(
                        "{:?} created at revision {}",
                        String::from_utf8_lossy(&kv.key),
                        kv.create_revision
                    ),
                );
            }
        };
        let record = match Record::decode(&kv.value, &id, limits) {
            Ok(record) => readable(record),
            Err(problem) => {
                self.odd(
                    OddityKind::UnreadableValue,
                    format!("{:?}: {problem}", String::from_utf8_lossy(&kv.key)),
                );
                unreadable(&kv.value, &id, limits)
            }
        };
        self.events.push(ClusterEvent::Put {
            topic,
            id,
            create_revision,
            lease: kv.lease,
            record,
        });
    }

    /// The reason at the reason key of `topic`'s entry `id`. One that does
    /// not decode was still written by a delete on purpose, so it is a
    /// leave for an unknown reason, not a lost host.
    fn reason(
        &mut self,
        limits: &Limits,
        topic: &str,
        id: &str,
        value: &[u8],
    ) -> (LeaveReason, Option<Actor>) {
        match Departure::decode(value, id, limits) {
            Ok(departure) => (departure.reason, departure.by),
            Err(problem) => {
                self.odd(
                    OddityKind::UnreadableReason,
                    format!("the reason of {id:?} in {topic:?}: {problem}"),
                );
                (LeaveReason::Unknown, None)
            }
        }
    }

    fn finish(self) -> Translation {
        Translation {
            changes: ClusterChanges {
                revision: self.revision,
                events: self.events,
            },
            oddities: self.oddities,
        }
    }
}

fn readable(record: Record) -> SharedRecord {
    SharedRecord {
        key: record.key,
        phx_ref: record.phx_ref,
        phx_ref_prev: record.phx_ref_prev,
        meta: record.meta,
        joined_at: record.joined_at,
        pid: record.pid,
        uid: record.uid,
        user: record.user,
        host: record.host,
        lifetime: record.lifetime,
        readable: true,
    }
}

/// What can be used of a value that did not decode: its key, user and
/// refs if they are fit to be shown, else the id; never its meta.
fn unreadable(value: &[u8], id: &str, limits: &Limits) -> SharedRecord {
    // Only a value of a size a daemon writes is looked into at all.
    let most = limits.max_meta_bytes + 4 * limits.max_name_bytes + 256;
    let fields = match serde_json::from_slice::<Value>(value) {
        Ok(Value::Object(fields)) if value.len() <= most => fields,
        _ => Map::new(),
    };
    let text = |name: &str| fields.get(name).and_then(Value::as_str);
    let name = |name: &str| {
        text(name).filter(|value| validate_name(name, value, limits.max_name_bytes).is_ok())
    };
    let id_host = host_of_ref(id);
    let own_ref = |name: &str| text(name).filter(|value| host_of_ref(value) == id_host);
    let number = |name: &str| {
        fields
            .get(name)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    SharedRecord {
        key: name("key").unwrap_or(id).to_owned(),
        phx_ref: own_ref("phx_ref").unwrap_or(id).to_owned(),
        phx_ref_prev: own_ref("phx_ref_prev").map(str::to_owned),
        meta: Map::new(),
        joined_at: fields.get("joined_at").and_then(Value::as_i64).unwrap_or(0),
        pid: number("pid"),
        uid: number("uid"),
        user: name("user").unwrap_or_default().to_owned(),
        host: id_host.unwrap_or_default().to_owned(),
        lifetime: fields
            .get("lifetime")
            .and_then(|value| serde_json::from_value::<Lifetime>(value.clone()).ok())
            .unwrap_or_default(),
        readable: false,
    }
}

/// Logs oddities at most once per kind per [`ODDITY_LOG_EVERY`], with how
/// many of that kind were not logged since the last line.
#[derive(Debug, Default)]
pub struct OddityLog {
    kinds: BTreeMap<OddityKind, KindLog>,
}

#[derive(Debug)]
struct KindLog {
    logged_at: Instant,
    unlogged: u64,
}

impl OddityLog {
    /// The line to log for `oddity` seen at `now`, if one is due: the
    /// oddity, and how many of its kind were seen and not logged since the
    /// last line of that kind.
    pub fn note(&mut self, oddity: &Oddity, now: Instant) -> Option<(String, u64)> {
        match self.kinds.get_mut(&oddity.kind) {
            Some(kind) if now.saturating_duration_since(kind.logged_at) < ODDITY_LOG_EVERY => {
                kind.unlogged += 1;
                None
            }
            Some(kind) => {
                let unlogged = std::mem::take(&mut kind.unlogged);
                kind.logged_at = now;
                Some((oddity.to_string(), unlogged))
            }
            None => {
                self.kinds.insert(
                    oddity.kind,
                    KindLog {
                        logged_at: now,
                        unlogged: 0,
                    },
                );
                Some((oddity.to_string(), 0))
            }
        }
    }

    fn log(&mut self, oddities: &[Oddity]) {
        let now = Instant::now();
        for oddity in oddities {
            if let Some((line, unlogged)) = self.note(oddity, now) {
                tracing::warn!(
                    unlogged_of_this_kind = unlogged,
                    "cluster: left out or kept unreadable: {line}"
                );
            }
        }
    }
}

/// What the bridge has done, for `presence status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeStatus {
    /// The revision the core has been brought up to: that of the last
    /// update read, whether or not it changed an entry; none before the
    /// first listing.
    pub revision: Option<u64>,
    /// The endpoint the mirror's watch is on, if it has one now.
    pub watching: Option<String>,
    /// The last failure to reach etcd, if the last attempt failed.
    pub error: Option<String>,
}

/// How the bridge reads the cluster.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    pub keys: KeySpace,
    /// The limits values are held to: this daemon's own clients'.
    pub limits: Limits,
    /// How often the mirror looks whether the gateway moved off the member
    /// it watches on.
    pub check_every: Duration,
    /// How long after a failed start (a listing or a watch that no
    /// endpoint answered) it tries again.
    pub retry_pause: Duration,
}

/// The task that brings other hosts' changes to the core.
pub struct Bridge {
    task: JoinHandle<()>,
    status: watch::Receiver<BridgeStatus>,
}

impl Bridge {
    /// Starts the task: it sends every non-empty [`ClusterChanges`] to
    /// `sink`, the listing first (every entry a put; sent even if empty),
    /// and ends when `sink` is closed.
    pub fn spawn(
        gateway: Arc<Gateway>,
        settings: BridgeSettings,
        sink: mpsc::UnboundedSender<ClusterChanges>,
    ) -> Bridge {
        let (status_tx, status) = watch::channel(BridgeStatus::default());
        let task = tokio::spawn(run(gateway, settings, sink, status_tx));
        Bridge { task, status }
    }

    /// What the bridge has done, kept current.
    pub fn status(&self) -> watch::Receiver<BridgeStatus> {
        self.status.clone()
    }

    /// Ends the task.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the bridge until `sink` is closed.
pub async fn run(
    gateway: Arc<Gateway>,
    settings: BridgeSettings,
    sink: mpsc::UnboundedSender<ClusterChanges>,
    status: watch::Sender<BridgeStatus>,
) {
    let BridgeSettings {
        keys,
        limits,
        check_every,
        retry_pause,
    } = settings;
    let mut log = OddityLog::default();
    let started = async {
        loop {
            match PrefixMirror::start(gateway.clone(), keys.all(), check_every).await {
                Ok(started) => return started,
                Err(error) => {
                    tracing::warn!("cluster: cannot list and watch etcd yet: {error}");
                    status.send_modify(|status| status.error = Some(error.to_string()));
                    tokio::time::sleep(retry_pause).await;
                }
            }
        }
    };
    let (mut mirror, snapshot) = tokio::select! {
        started = started => started,
        () = sink.closed() => return,
    };
    let translation = translate_listing(&keys, &limits, &snapshot);
    // The first listing goes even if empty: it is what settles the
    // entries a restart restored, whose keys may all be gone.
    if !pass_on(
        &sink,
        &status,
        &mut log,
        translation,
        mirror.watching(),
        true,
    ) {
        return;
    }
    loop {
        let update = tokio::select! {
            update = mirror.next() => update,
            () = sink.closed() => return,
        };
        let Some(translation) = translate(&keys, &limits, &update) else {
            if let Update::Unreachable { error } = &update {
                tracing::warn!("cluster: etcd cannot be reached: {error}");
                status.send_modify(|status| {
                    status.error = Some(error.to_string());
                    status.watching = None;
                });
            }
            continue;
        };
        if !pass_on(
            &sink,
            &status,
            &mut log,
            translation,
            mirror.watching(),
            false,
        ) {
            return;
        }
    }
}

/// Logs `translation`'s oddities and sends its changes, if it has any
/// or `even_empty`; notes the revision in `status`. False if the sink is
/// closed.
fn pass_on(
    sink: &mpsc::UnboundedSender<ClusterChanges>,
    status: &watch::Sender<BridgeStatus>,
    log: &mut OddityLog,
    translation: Translation,
    watching: Option<&str>,
    even_empty: bool,
) -> bool {
    log.log(&translation.oddities);
    let revision = translation.changes.revision;
    let worth_sending = even_empty || !translation.changes.events.is_empty();
    if worth_sending && sink.send(translation.changes).is_err() {
        return false;
    }
    status.send_modify(|status| {
        status.revision = Some(revision);
        status.watching = watching.map(str::to_owned);
        status.error = None;
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::cluster::record::RECORD_VERSION;
    use serde_json::json;

    const TOPIC: &str = "file:/srv/a.md";

    fn keys() -> KeySpace {
        KeySpace::new("/presence")
    }

    fn record(id: &str) -> Record {
        let Value::Object(meta) = json!({ "editor": "nvim" }) else {
            unreachable!("an object")
        };
        Record {
            v: RECORD_VERSION,
            key: "alice".into(),
            phx_ref: id.into(),
            phx_ref_prev: None,
            meta,
            joined_at: 1_700_000_000_000,
            pid: 4242,
            uid: 1000,
            user: "alice".into(),
            host: host_of_ref(id).unwrap_or_default().into(),
            lifetime: Lifetime::Connection,
        }
    }

    fn entry(id: &str, create_revision: i64, mod_revision: i64) -> Kv {
        Kv {
            key: keys().entry(TOPIC, id),
            value: record(id).encode(),
            create_revision,
            mod_revision,
            version: 1,
            lease: 7,
        }
    }

    fn departure(id: &str, reason: LeaveReason, by: Option<Actor>) -> Departure {
        Departure {
            v: RECORD_VERSION,
            reason,
            by,
            host: host_of_ref(id).unwrap_or_default().into(),
        }
    }

    fn reason_kv(id: &str, departure: &Departure, revision: i64) -> Kv {
        Kv {
            key: keys().reason(TOPIC, id),
            value: departure.encode(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: 7,
        }
    }

    fn root() -> Actor {
        Actor {
            uid: 0,
            user: "root".into(),
            pid: 77,
        }
    }

    fn delete(key: Vec<u8>, revision: i64) -> Event {
        Event::Delete { key, revision }
    }

    fn put_of(id: &str, create_revision: u64) -> ClusterEvent {
        ClusterEvent::Put {
            topic: TOPIC.into(),
            id: id.into(),
            create_revision,
            lease: 7,
            record: readable(record(id)),
        }
    }

    fn delete_of(id: &str, reason: Option<(LeaveReason, Option<Actor>)>) -> ClusterEvent {
        ClusterEvent::Delete {
            topic: TOPIC.into(),
            id: id.into(),
            reason,
        }
    }

    fn events(revision: i64, events: Vec<Event>) -> Translation {
        translate(
            &keys(),
            &Limits::default(),
            &Update::Changes { revision, events },
        )
        .expect("changes translate")
    }

    fn kinds(translation: &Translation) -> Vec<OddityKind> {
        translation.oddities.iter().map(|o| o.kind).collect()
    }

    #[test]
    fn puts_pass_on_in_etcds_order_with_their_decoded_records() {
        let translation = events(
            6,
            vec![
                Event::Put(entry("web-1:p2", 5, 5)),
                Event::Put(entry("web-2:p1", 3, 6)),
            ],
        );
        assert_eq!(
            translation.changes,
            ClusterChanges {
                revision: 6,
                events: vec![put_of("web-1:p2", 5), put_of("web-2:p1", 3)],
            }
        );
        assert!(translation.oddities.is_empty());
    }

    #[test]
    fn a_delete_takes_the_reason_put_beside_it_at_its_revision() {
        let untracked = departure("web-1:p2", LeaveReason::Untrack, Some(root()));
        let translation = events(
            9,
            vec![
                delete(keys().entry(TOPIC, "web-1:p2"), 9),
                Event::Put(reason_kv("web-1:p2", &untracked, 9)),
            ],
        );
        assert_eq!(
            translation.changes.events,
            vec![delete_of(
                "web-1:p2",
                Some((LeaveReason::Untrack, Some(root())))
            )]
        );
        assert!(translation.oddities.is_empty());
    }

    #[test]
    fn a_reason_at_another_revision_or_in_another_message_pairs_with_nothing() {
        let exited = departure("web-1:p2", LeaveReason::PidExit, None);
        // The reason of an earlier delete of the same id, in this message.
        let translation = events(
            9,
            vec![
                Event::Put(reason_kv("web-1:p2", &exited, 8)),
                delete(keys().entry(TOPIC, "web-1:p2"), 9),
            ],
        );
        assert_eq!(
            translation.changes.events,
            vec![delete_of("web-1:p2", None)]
        );
        // A reason alone is not passed on; in the next message it pairs
        // with no delete of the one before.
        let alone = events(10, vec![Event::Put(reason_kv("web-1:p2", &exited, 10))]);
        assert!(alone.changes.events.is_empty());
        assert_eq!(alone.changes.revision, 10);
        // Another entry's reason at the same revision is not this one's.
        let translation = events(
            11,
            vec![
                delete(keys().entry(TOPIC, "web-1:p3"), 11),
                Event::Put(reason_kv("web-1:p2", &exited, 11)),
            ],
        );
        assert_eq!(
            translation.changes.events,
            vec![delete_of("web-1:p3", None)]
        );
    }

    #[test]
    fn reason_deletes_and_host_claims_are_ignored() {
        let mut claim = entry("web-1:p2", 4, 4);
        claim.key = keys().host("web-1");
        let translation = events(
            12,
            vec![
                delete(keys().reason(TOPIC, "web-1:p2"), 11),
                Event::Put(claim),
                delete(keys().host("web-2"), 12),
            ],
        );
        assert!(translation.changes.events.is_empty());
        assert!(translation.oddities.is_empty());
    }

    #[test]
    fn an_unreadable_reason_is_a_leave_for_an_unknown_reason() {
        let mut forged = reason_kv(
            "web-1:p2",
            &departure("web-2:p2", LeaveReason::Untrack, None),
            9,
        );
        forged.key = keys().reason(TOPIC, "web-1:p2");
        let translation = events(
            9,
            vec![
                delete(keys().entry(TOPIC, "web-1:p2"), 9),
                Event::Put(forged),
            ],
        );
        assert_eq!(
            translation.changes.events,
            vec![delete_of("web-1:p2", Some((LeaveReason::Unknown, None)))]
        );
        assert_eq!(kinds(&translation), [OddityKind::UnreadableReason]);
    }

    #[test]
    fn a_relisting_pairs_removed_entries_with_the_reasons_its_snapshot_holds() {
        let untracked = departure("web-1:p2", LeaveReason::Untrack, Some(root()));
        let kept = entry("web-2:p1", 3, 3);
        let new = entry("web-3:p1", 20, 20);
        let older_new = entry("web-3:p0", 15, 21);
        let reason = reason_kv("web-1:p2", &untracked, 18);
        let snapshot = Snapshot {
            revision: 21,
            entries: [kept, new.clone(), older_new.clone(), reason.clone()]
                .into_iter()
                .map(|kv| (kv.key.clone(), kv))
                .collect(),
        };
        let update = Update::Relisted {
            snapshot,
            removed: vec![
                keys().entry(TOPIC, "web-1:p2"),
                keys().entry(TOPIC, "web-1:p4"),
                keys().host("web-9"),
            ],
            // Out of order on purpose: puts go in order of creation.
            changed: vec![new, reason, older_new],
        };
        let translation = translate(&keys(), &Limits::default(), &update).expect("relisted");
        assert_eq!(
            translation.changes,
            ClusterChanges {
                revision: 21,
                events: vec![
                    delete_of("web-1:p2", Some((LeaveReason::Untrack, Some(root())))),
                    delete_of("web-1:p4", None),
                    put_of("web-3:p0", 15),
                    put_of("web-3:p1", 20),
                ],
            }
        );
        assert!(translation.oddities.is_empty());
    }

    #[test]
    fn a_first_listing_puts_every_entry_in_order_of_creation() {
        let snapshot = Snapshot {
            revision: 30,
            entries: [
                entry("web-1:p9", 25, 30),
                entry("web-2:p1", 4, 4),
                reason_kv(
                    "web-1:p2",
                    &departure("web-1:p2", LeaveReason::Closed, None),
                    7,
                ),
            ]
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect(),
        };
        let translation = translate_listing(&keys(), &Limits::default(), &snapshot);
        assert_eq!(
            translation.changes,
            ClusterChanges {
                revision: 30,
                events: vec![put_of("web-2:p1", 4), put_of("web-1:p9", 25)],
            }
        );
    }

    #[test]
    fn an_unreadable_value_keeps_its_place_with_what_is_usable() {
        let limits = Limits::default();
        let mut too_big = record("web-1:p2");
        too_big.meta.insert(
            "note".into(),
            Value::String("x".repeat(limits.max_meta_bytes)),
        );
        too_big.phx_ref = "web-1:p5".into();
        too_big.phx_ref_prev = Some("web-1:p2".into());
        let mut garbage = entry("web-1:p3", 6, 6);
        garbage.value = b"\xff not json".to_vec();
        let mut lying = record("web-1:p4");
        lying.phx_ref = "web-2:p1".into();
        lying.key = "x".repeat(limits.max_name_bytes + 1);
        let translation = events(
            8,
            vec![
                Event::Put(Kv {
                    value: too_big.encode(),
                    ..entry("web-1:p2", 5, 5)
                }),
                Event::Put(garbage),
                Event::Put(Kv {
                    value: lying.encode(),
                    ..entry("web-1:p4", 7, 8)
                }),
            ],
        );
        let opaque = |key: &str, phx_ref: &str, prev: Option<&str>, user: &str| SharedRecord {
            key: key.into(),
            phx_ref: phx_ref.into(),
            phx_ref_prev: prev.map(str::to_owned),
            meta: Map::new(),
            joined_at: if user.is_empty() {
                0
            } else {
                1_700_000_000_000
            },
            pid: if user.is_empty() { 0 } else { 4242 },
            uid: if user.is_empty() { 0 } else { 1000 },
            user: user.into(),
            host: "web-1".into(),
            lifetime: Lifetime::Connection,
            readable: false,
        };
        let put = |id: &str, create_revision, record| ClusterEvent::Put {
            topic: TOPIC.into(),
            id: id.into(),
            create_revision,
            lease: 7,
            record,
        };
        assert_eq!(
            translation.changes.events,
            vec![
                put(
                    "web-1:p2",
                    5,
                    opaque("alice", "web-1:p5", Some("web-1:p2"), "alice")
                ),
                put("web-1:p3", 6, opaque("web-1:p3", "web-1:p3", None, "")),
                put(
                    "web-1:p4",
                    7,
                    SharedRecord {
                        user: "alice".into(),
                        ..opaque("web-1:p4", "web-1:p4", None, "alice")
                    }
                ),
            ]
        );
        assert_eq!(kinds(&translation), [OddityKind::UnreadableValue; 3]);
    }

    #[test]
    fn keys_that_do_not_parse_are_left_out_and_counted() {
        let mut stray = entry("web-1:p2", 5, 5);
        stray.key = b"/presence/x/whatever".to_vec();
        let mut no_ref = entry("web-1:p2", 6, 6);
        no_ref.key = b"/presence/t/topic/not-a-ref".to_vec();
        let translation = events(
            7,
            vec![
                Event::Put(stray),
                Event::Put(no_ref),
                delete(b"/presence/t/%zz/web-1:p1".to_vec(), 7),
                Event::Put(entry("web-1:p3", 7, 7)),
            ],
        );
        assert_eq!(translation.changes.events, vec![put_of("web-1:p3", 7)]);
        assert_eq!(kinds(&translation), [OddityKind::BadKey; 3]);
        assert!(
            translation.oddities[0]
                .detail
                .contains("/presence/x/whatever")
        );
    }

    #[test]
    fn a_create_revision_not_above_zero_is_refused() {
        let translation = events(
            9,
            vec![
                Event::Put(entry("web-1:p1", 0, 9)),
                Event::Put(entry("web-1:p2", -4, 9)),
                Event::Put(entry("web-1:p3", 9, 9)),
            ],
        );
        assert_eq!(translation.changes.events, vec![put_of("web-1:p3", 9)]);
        assert_eq!(kinds(&translation), [OddityKind::BadRevision; 2]);
    }

    #[test]
    fn nothing_comes_of_etcd_being_unreachable() {
        let update = Update::Unreachable {
            error: crate::daemon::cluster::Error::Refused {
                reason: "test".into(),
            },
        };
        assert_eq!(translate(&keys(), &Limits::default(), &update), None);
    }

    #[test]
    fn oddities_are_logged_once_per_kind_per_period_with_a_count() {
        let mut log = OddityLog::default();
        let odd = |kind| Oddity {
            kind,
            detail: "k".into(),
        };
        let start = Instant::now();
        assert!(log.note(&odd(OddityKind::BadKey), start).is_some());
        assert!(log.note(&odd(OddityKind::UnreadableValue), start).is_some());
        let soon = start + Duration::from_secs(3);
        assert_eq!(log.note(&odd(OddityKind::BadKey), soon), None);
        assert_eq!(log.note(&odd(OddityKind::BadKey), soon), None);
        let later = start + ODDITY_LOG_EVERY;
        let (line, unlogged) = log.note(&odd(OddityKind::BadKey), later).expect("due");
        assert!(line.contains(OddityKind::BadKey.as_str()));
        assert_eq!(unlogged, 2);
        assert_eq!(log.note(&odd(OddityKind::BadKey), later), None);
    }
}
