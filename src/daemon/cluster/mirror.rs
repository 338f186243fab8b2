//! A copy of every key under one etcd prefix, kept current by a listing
//! and a watch, for the task that turns each change into an input to the
//! daemon's core.
//!
//! The mirror lists the prefix at some revision r and watches from r + 1,
//! so no change falls between the two. Every change it hands on it has
//! applied to its own map first, so the map always equals what etcd held
//! under the prefix at the revision last reported ([`Snapshot::revision`]).
//!
//! A watch that merely broke (its reply ended, its connection failed) is
//! made again from that revision + 1 and loses nothing. When etcd cannot
//! give that history any more (compacted away), or the watch failed in a
//! way that says nothing about what was missed (etcd ended it, or sent
//! what does not decode), the mirror lists again and reports the new state
//! with its difference from the old one: a listing is always right, where
//! guessing what a broken watch missed is not.
//!
//! A watch on a member that was stopped or cut off by a partition is not
//! broken: it is silent, and stays silent, since nothing on the connection
//! says that the member is gone. What does notice is the [`Gateway`]: any
//! call through it that fails or times out on that member (the lease
//! keeper's renewals, every K) moves it on to the next member. So while it
//! waits for the watch, the mirror looks every `check_every` at the
//! gateway's current endpoint, and when that is no longer the one it
//! watches on, it watches again there, from its revision + 1. A silent
//! member then costs the mirror at most one renewal's attempt (R) and
//! `check_every`, instead of everything until the member comes back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};

use super::gateway::{Error, Event, Gateway, Kv, Watch, WatchMessage};

/// How long after a failed listing or watch (every endpoint tried) the
/// next is tried: enough that members refusing connections at once are
/// not hammered, short beside any period.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Every key under the prefix, by key.
pub type Entries = BTreeMap<Vec<u8>, Kv>;

/// Everything under the prefix at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's revision this is the state at.
    pub revision: i64,
    pub entries: Entries,
}

impl Snapshot {
    /// The entries in the order they were created (a topic's queue).
    pub fn in_creation_order(&self) -> Vec<&Kv> {
        let mut entries: Vec<&Kv> = self.entries.values().collect();
        entries.sort_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)));
        entries
    }
}

/// What changed under the prefix, as [`PrefixMirror::next`] reports it.
#[derive(Debug)]
pub enum Update {
    /// One watch message's events, in the order etcd sent them, applied to
    /// the mirror. `revision` is the last event's: the mirror now holds
    /// what etcd held under the prefix then. (etcd's header may name a
    /// later revision, the store's when a watch catches up; the mirror
    /// counts by events, so it resumes after the last one it has.)
    Changes { revision: i64, events: Vec<Event> },
    /// The watch could not go on from where the mirror was, so it listed
    /// the prefix again: `snapshot` is the whole new state, and `removed`
    /// and `changed` its difference from the state held before, which is
    /// all a consumer that applied every earlier update needs to apply.
    Relisted {
        snapshot: Snapshot,
        /// Keys that are gone, by key.
        removed: Vec<Vec<u8>>,
        /// Entries that are new or not as they were, in order of creation.
        /// A key that was deleted and created again meanwhile is here with
        /// its new create revision: its place in its queue changed.
        changed: Vec<Kv>,
    },
    /// A listing or a watch failed on every endpoint. The mirror is as it
    /// was; the next call tries again, after a short pause.
    Unreachable { error: Error },
}

/// What the mirror does next to stay current.
enum Position {
    /// Watching from the mirror's revision + 1, on `endpoint`.
    Watching { watch: Watch, endpoint: String },
    /// The watch broke, or its member went quiet: watch again from the
    /// mirror's revision + 1.
    Rewatch,
    /// The watch cannot be resumed from the mirror's revision: list again.
    Relist,
}

/// A mirror of everything under one prefix, used from one task.
///
/// [`PrefixMirror::next`] is cancel-safe: a call dropped before it returns
/// loses no change. The watch it was reading is kept, with whatever part
/// of a message had come ([`Watch::next`] awaits only the reply's next
/// chunk, and keeps what came of a line), and nothing is applied to the
/// map except just before a return.
pub struct PrefixMirror {
    gateway: Arc<Gateway>,
    prefix: Vec<u8>,
    state: Snapshot,
    position: Position,
    /// When to look whether the gateway has moved off the watched member.
    check: Interval,
    /// Whether the last call reported [`Update::Unreachable`].
    pause_first: bool,
}

impl PrefixMirror {
    /// Lists `prefix` through `gateway` and watches it from the listing's
    /// revision + 1; returns the mirror and the listing. While waiting for
    /// the watch, the mirror looks every `check_every` (above zero) whether
    /// the gateway has moved on from the member it watches on.
    pub async fn start(
        gateway: Arc<Gateway>,
        prefix: Vec<u8>,
        check_every: Duration,
    ) -> Result<(PrefixMirror, Snapshot), Error> {
        if check_every.is_zero() {
            return Err(Error::Refused {
                reason: "a mirror's check_every must be above zero".into(),
            });
        }
        let (revision, kvs) = gateway.range_prefix(&prefix).await?;
        let state = Snapshot {
            revision,
            entries: entries_of(kvs),
        };
        let watch = gateway.watch(&prefix, revision + 1).await?;
        let mut check = tokio::time::interval(check_every);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mirror = PrefixMirror {
            gateway,
            prefix,
            state: state.clone(),
            position: Position::Watching {
                endpoint: watch.endpoint().to_owned(),
                watch,
            },
            check,
            pause_first: false,
        };
        Ok((mirror, state))
    }

    /// What the mirror holds: etcd's state under the prefix at its revision.
    pub fn state(&self) -> &Snapshot {
        &self.state
    }

    /// The endpoint the mirror's watch is on, if it has one now.
    pub fn watching(&self) -> Option<&str> {
        match &self.position {
            Position::Watching { endpoint, .. } => Some(endpoint),
            Position::Rewatch | Position::Relist => None,
        }
    }

    /// The next change under the prefix, or news that etcd could not be
    /// reached. Waits for as long as nothing changes.
    pub async fn next(&mut self) -> Update {
        if self.pause_first {
            tokio::time::sleep(RETRY_PAUSE).await;
            self.pause_first = false;
        }
        loop {
            match &mut self.position {
                Position::Relist => {
                    return match self.gateway.range_prefix(&self.prefix).await {
                        Ok((revision, kvs)) => self.relisted(revision, kvs),
                        Err(error) => self.unreachable(error),
                    };
                }
                Position::Rewatch => {
                    let from = self.state.revision + 1;
                    match self.gateway.watch(&self.prefix, from).await {
                        Ok(watch) => {
                            self.position = Position::Watching {
                                endpoint: watch.endpoint().to_owned(),
                                watch,
                            };
                        }
                        Err(error) => return self.unreachable(error),
                    }
                }
                Position::Watching { watch, endpoint } => {
                    let message = {
                        let next = watch.next();
                        tokio::pin!(next);
                        loop {
                            tokio::select! {
                                message = &mut next => break Some(message),
                                _ = self.check.tick() => {
                                    if self.gateway.current_endpoint() != endpoint.as_str() {
                                        break None;
                                    }
                                }
                            }
                        }
                    };
                    match message {
                        // The gateway moved on: the member may be silent.
                        None => self.position = Position::Rewatch,
                        Some(Ok(Some(WatchMessage::Events { events, .. }))) => {
                            if let Some(update) = self.changes(events) {
                                return update;
                            }
                        }
                        Some(Ok(Some(WatchMessage::Compacted { .. }))) => {
                            self.position = Position::Relist;
                        }
                        // The reply ended or its connection failed: what
                        // etcd sent so far was whole, so resume after it.
                        Some(Ok(None) | Err(Error::Http { .. })) => {
                            self.position = Position::Rewatch;
                        }
                        // etcd ended the watch, or sent what does not
                        // decode: what was missed is not known.
                        Some(Err(_)) => self.position = Position::Relist,
                    }
                }
            }
        }
    }

    /// Applies one watch message's events that are newer than the mirror;
    /// `None` if there are none.
    fn changes(&mut self, events: Vec<Event>) -> Option<Update> {
        let events = newer_than(events, self.state.revision);
        let revision = events.iter().map(Event::revision).max()?;
        apply(&mut self.state.entries, &events);
        self.state.revision = revision;
        Some(Update::Changes { revision, events })
    }

    /// Takes a new listing as the mirror's state, and watches after it.
    fn relisted(&mut self, revision: i64, kvs: Vec<Kv>) -> Update {
        let entries = entries_of(kvs);
        let Difference { removed, changed } = difference(&self.state.entries, &entries);
        self.state = Snapshot { revision, entries };
        self.position = Position::Rewatch;
        Update::Relisted {
            snapshot: self.state.clone(),
            removed,
            changed,
        }
    }

    fn unreachable(&mut self, error: Error) -> Update {
        self.pause_first = true;
        Update::Unreachable { error }
    }
}

/// What differs between two states of the prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Difference {
    /// Keys in the old state and not in the new, by key.
    pub removed: Vec<Vec<u8>>,
    /// Entries of the new state that the old did not have as they are now,
    /// in order of creation.
    pub changed: Vec<Kv>,
}

/// What turns `before` into `after`: unchanged entries are not in it.
pub fn difference(before: &Entries, after: &Entries) -> Difference {
    let removed = before
        .keys()
        .filter(|key| !after.contains_key(*key))
        .cloned()
        .collect();
    let mut changed: Vec<Kv> = after
        .iter()
        .filter(|(key, kv)| before.get(*key) != Some(kv))
        .map(|(_, kv)| kv.clone())
        .collect();
    changed.sort_by(|a, b| (a.create_revision, &a.key).cmp(&(b.create_revision, &b.key)));
    Difference { removed, changed }
}

/// Applies `events`, in order, to `entries`.
pub fn apply(entries: &mut Entries, events: &[Event]) {
    for event in events {
        match event {
            Event::Put(kv) => {
                entries.insert(kv.key.clone(), kv.clone());
            }
            Event::Delete { key, .. } => {
                entries.remove(key);
            }
        }
    }
}

/// The events after `revision`. A watch made from `revision` + 1 sends no
/// other; this keeps an event from being applied twice whatever a member
/// sends.
fn newer_than(mut events: Vec<Event>, revision: i64) -> Vec<Event> {
    events.retain(|event| event.revision() > revision);
    events
}

fn entries_of(kvs: Vec<Kv>) -> Entries {
    kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, create_revision: i64, mod_revision: i64) -> Kv {
        Kv {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision,
            mod_revision,
            version: 1,
            lease: 7,
        }
    }

    fn entries(kvs: &[Kv]) -> Entries {
        entries_of(kvs.to_vec())
    }

    fn delete(key: &str, revision: i64) -> Event {
        Event::Delete {
            key: key.as_bytes().to_vec(),
            revision,
        }
    }

    #[test]
    fn events_are_applied_in_order() {
        let mut state = entries(&[kv("a", "1", 2, 2), kv("b", "1", 3, 3)]);
        let rewritten = Kv {
            version: 2,
            ..kv("a", "2", 2, 4)
        };
        apply(
            &mut state,
            &[
                Event::Put(rewritten.clone()),
                delete("b", 5),
                Event::Put(kv("c", "1", 6, 6)),
                // Created and deleted within what the mirror saw.
                Event::Put(kv("d", "1", 7, 7)),
                delete("d", 8),
                // A delete of a key the mirror never had changes nothing.
                delete("e", 9),
            ],
        );
        assert_eq!(state, entries(&[rewritten, kv("c", "1", 6, 6)]));
    }

    #[test]
    fn a_deleted_and_recreated_key_holds_its_new_creation() {
        let mut state = entries(&[kv("a", "1", 2, 2)]);
        apply(
            &mut state,
            &[delete("a", 3), Event::Put(kv("a", "1", 4, 4))],
        );
        assert_eq!(state, entries(&[kv("a", "1", 4, 4)]));
    }

    #[test]
    fn the_difference_names_what_is_gone_new_or_changed_and_not_the_rest() {
        let kept = kv("kept", "1", 2, 2);
        let before = entries(&[
            kv("gone", "1", 1, 1),
            kept.clone(),
            kv("rewritten", "1", 3, 3),
            kv("recreated", "1", 4, 4),
            kv("released", "1", 5, 5),
        ]);
        let rewritten = Kv {
            version: 2,
            ..kv("rewritten", "2", 3, 8)
        };
        // Same value, another lease: still a change.
        let released = Kv {
            lease: 0,
            version: 2,
            ..kv("released", "1", 5, 9)
        };
        let after = entries(&[
            kept,
            kv("new", "1", 10, 10),
            rewritten.clone(),
            kv("recreated", "1", 7, 7),
            released.clone(),
        ]);
        let Difference { removed, changed } = difference(&before, &after);
        assert_eq!(removed, vec![b"gone".to_vec()]);
        assert_eq!(
            changed,
            vec![
                rewritten,
                released,
                kv("recreated", "1", 7, 7),
                kv("new", "1", 10, 10)
            ]
        );
        assert_eq!(difference(&after, &after), Difference::default());
    }

    #[test]
    fn applying_the_difference_turns_the_old_state_into_the_new() {
        let before = entries(&[kv("a", "1", 1, 1), kv("b", "1", 2, 2)]);
        let after = entries(&[kv("b", "2", 2, 5), kv("c", "1", 4, 4)]);
        let Difference { removed, changed } = difference(&before, &after);
        let mut state = before;
        let events: Vec<Event> = removed
            .into_iter()
            .map(|key| Event::Delete { key, revision: 6 })
            .chain(changed.into_iter().map(Event::Put))
            .collect();
        apply(&mut state, &events);
        assert_eq!(state, after);
    }

    #[test]
    fn events_the_mirror_has_are_dropped() {
        let events = vec![
            Event::Put(kv("a", "1", 4, 4)),
            delete("b", 5),
            Event::Put(kv("c", "1", 6, 6)),
        ];
        assert_eq!(newer_than(events.clone(), 3), events);
        assert_eq!(newer_than(events.clone(), 5), events[2..].to_vec());
        assert!(newer_than(events, 6).is_empty());
    }

    #[test]
    fn a_snapshot_lists_its_entries_in_order_of_creation() {
        let snapshot = Snapshot {
            revision: 9,
            entries: entries(&[kv("a", "1", 5, 5), kv("b", "1", 2, 9), kv("c", "1", 3, 3)]),
        };
        let keys: Vec<&[u8]> = snapshot
            .in_creation_order()
            .into_iter()
            .map(|kv| kv.key.as_slice())
            .collect();
        assert_eq!(keys, [b"b", b"c", b"a"]);
    }
}
