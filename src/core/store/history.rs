//! The read side of the history: what the daemon remembers of each topic's
//! events, and the connections that read them.
//!
//! The `events` table has no index, so that every write stays an append
//! (see schema.sql). Without help, a read for one topic walks the table
//! back from the newest event until it has enough, which for a quiet topic
//! is the whole table: about 10 ms at the default bound of 100,000 events,
//! and on two cores a few readers doing that hold everyone else up. So the
//! store remembers, in memory, the id, time and topic of every event in
//! the table ([`KnownEvents`]); a read picks the ids it wants from there
//! and fetches those rows by id. What a read costs grows with what it
//! returns, not with the table.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::{StoreError, keep_side_files};
use crate::protocol::{
    DEFAULT_HISTORY_LIMIT, HistoryEvent, HistoryKind, HistoryReply, HistoryRequest, LeaveReason,
    MAX_HISTORY_LIMIT,
};

/// The events in the history table, as the store committed and trimmed
/// them: for each, its id, time and topic (about 40 bytes an event, 4 MB
/// at the default bound), and for each topic the ids of its events. The
/// core thread writes it after each commit and trim; readers look into it
/// for a few microseconds at a time (see [`SCAN_STEP`]), so the core never
/// waits long for them.
///
/// It is a guide, not the truth: every row a read fetches is checked
/// against the request again, so a table changed behind the daemon's back
/// costs a read some misses, never a wrong answer.
#[derive(Default)]
pub struct KnownEvents {
    known: RwLock<Known>,
}

#[derive(Default)]
struct Known {
    /// Every event, oldest (lowest id) first.
    all: VecDeque<Noted>,
    /// Each topic's event ids, oldest first. A topic with none has no key.
    by_topic: HashMap<Arc<str>, VecDeque<i64>>,
}

struct Noted {
    id: i64,
    at: i64,
    topic: Arc<str>,
}

/// How many remembered events a read looks at while it holds the lock:
/// a few microseconds' worth, after which it lets the core in.
const SCAN_STEP: usize = 4096;

impl KnownEvents {
    /// Reads what the table holds: one pass in id order, at start.
    pub(super) fn load(db: &Connection) -> rusqlite::Result<KnownEvents> {
        let mut known = Known::default();
        let mut rows = db.prepare("SELECT id, at, topic FROM events ORDER BY id")?;
        let mut rows = rows.query([])?;
        while let Some(row) = rows.next()? {
            known.add(row.get(0)?, row.get(1)?, row.get_ref(2)?.as_str()?);
        }
        Ok(KnownEvents {
            known: RwLock::new(known),
        })
    }

    /// Notes events just committed: (id, at, topic).
    pub(super) fn add<'a>(&self, events: impl IntoIterator<Item = (i64, i64, &'a str)>) {
        let mut known = self.write();
        for (id, at, topic) in events {
            known.add(id, at, topic);
        }
    }

    /// Forgets the events the table no longer holds: every one below
    /// `oldest`, the lowest id left, or all of them if none is left.
    pub(super) fn forget_below(&self, oldest: Option<i64>) {
        let mut known = self.write();
        let Known { all, by_topic } = &mut *known;
        while let Some(first) = all.front() {
            if oldest.is_some_and(|oldest| first.id >= oldest) {
                break;
            }
            let Some(first) = all.pop_front() else { break };
            if let Some(ids) = by_topic.get_mut(&first.topic) {
                if ids.front() == Some(&first.id) {
                    ids.pop_front();
                } else {
                    ids.retain(|&id| id != first.id);
                }
                if ids.is_empty() {
                    by_topic.remove(&first.topic);
                }
            }
        }
    }

    /// How many events are remembered.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.read().all.len()
    }

    /// Whether any event of `topic` is remembered.
    fn has_topic(&self, topic: &str) -> bool {
        self.read().by_topic.contains_key(topic)
    }

    /// Up to `room` ids of events that match `topic` and `since`, newest
    /// first, from those below `below`; and, if it stopped before the
    /// oldest, the id to go on below. Looks at no more than [`SCAN_STEP`]
    /// events per call.
    fn candidates(
        &self,
        topic: Option<&str>,
        since: Option<i64>,
        below: i64,
        room: usize,
    ) -> (Vec<i64>, Option<i64>) {
        let known = self.read();
        let young_enough = |at: i64| since.is_none_or(|since| at >= since);
        let mut found = Vec::new();
        match topic {
            Some(topic) => {
                let Some(ids) = known.by_topic.get(topic) else {
                    return (found, None);
                };
                let end = ids.partition_point(|&id| id < below);
                for (looked, &id) in ids.range(..end).rev().enumerate() {
                    if found.len() == room || looked == SCAN_STEP {
                        return (found, Some(id + 1));
                    }
                    // The time is the table's to tell when the event is
                    // not remembered in order.
                    if known.at(id).is_none_or(young_enough) {
                        found.push(id);
                    }
                }
            }
            None => {
                let end = known.all.partition_point(|noted| noted.id < below);
                for (looked, noted) in known.all.range(..end).rev().enumerate() {
                    if found.len() == room || looked == SCAN_STEP {
                        return (found, Some(noted.id + 1));
                    }
                    if young_enough(noted.at) {
                        found.push(noted.id);
                    }
                }
            }
        }
        (found, None)
    }

    fn read(&self) -> RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Known {
    fn add(&mut self, id: i64, at: i64, topic: &str) {
        let topic = match self.by_topic.get_key_value(topic) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(topic),
        };
        let noted = Noted {
            id,
            at,
            topic: Arc::clone(&topic),
        };
        if self.all.back().is_none_or(|last| last.id < id) {
            self.all.push_back(noted);
            self.by_topic.entry(topic).or_default().push_back(id);
            return;
        }
        // SQLite hands out ids above the highest in the table, so an id
        // out of order means someone else deleted the newest rows: the id
        // is in use again, for this event.
        let at_place = self.all.partition_point(|known| known.id < id);
        if self.all.get(at_place).is_some_and(|known| known.id == id)
            && let Some(old) = self.all.remove(at_place)
            && let Some(ids) = self.by_topic.get_mut(&old.topic)
        {
            ids.retain(|&known| known != id);
            if ids.is_empty() {
                self.by_topic.remove(&old.topic);
            }
        }
        self.all.insert(at_place, noted);
        let ids = self.by_topic.entry(topic).or_default();
        let in_topic = ids.partition_point(|&known| known < id);
        ids.insert(in_topic, id);
    }

    /// The time of the event with `id`, if it is remembered.
    fn at(&self, id: i64) -> Option<i64> {
        let place = self.all.partition_point(|known| known.id < id);
        self.all
            .get(place)
            .filter(|known| known.id == id)
            .map(|known| known.at)
    }
}

/// The connections that read the history, apart from the core's: each
/// read takes one (opening it if none is free) and puts it back. In WAL
/// mode they read the last committed state while the core writes. The
/// daemon's io layer bounds how many reads run at once, and so how many
/// connections there are.
pub struct HistoryReaders {
    path: PathBuf,
    known: Arc<KnownEvents>,
    idle: Mutex<Vec<Connection>>,
}

/// How long a history read waits for a lock. Readers wait only in rare
/// moments of the WAL's life (its recovery, or a restart of the log).
const READ_BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Each reader's page cache, in KiB: a read touches the pages of the rows
/// it returns, and with many readers SQLite's default (2 MiB each) would
/// add up.
const READER_CACHE_KIB: i64 = 512;

impl HistoryReaders {
    /// Readers of the database that a [`super::Store`] has opened, and so
    /// created and brought up to date. One connection is opened now, so
    /// that a database this process cannot read stops the start.
    pub(super) fn open(path: &Path, known: Arc<KnownEvents>) -> Result<HistoryReaders, StoreError> {
        let first = open_reader(path).map_err(|e| StoreError::from(e).about(path))?;
        Ok(HistoryReaders {
            path: path.to_owned(),
            known,
            idle: Mutex::new(vec![first]),
        })
    }

    /// The latest history events that match, oldest first, and whether
    /// older ones were left out.
    pub fn history(&self, request: &HistoryRequest) -> Result<HistoryReply, StoreError> {
        if request
            .topic
            .as_deref()
            .is_some_and(|topic| !self.known.has_topic(topic))
        {
            return Ok(HistoryReply {
                events: Vec::new(),
                truncated: false,
            });
        }
        let db = self.take()?;
        let read = read(&db, &self.known, request);
        self.give_back(db);
        read.map_err(|e| StoreError::from(e).about(&self.path))
    }

    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match idle {
            Some(db) => Ok(db),
            None => open_reader(&self.path).map_err(|e| StoreError::from(e).about(&self.path)),
        }
    }

    fn give_back(&self, db: Connection) {
        // A read that failed halfway may have left its transaction open.
        if !db.is_autocommit() && db.execute_batch("ROLLBACK").is_err() {
            return;
        }
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(db);
    }
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    db.busy_timeout(READ_BUSY_TIMEOUT)?;
    db.pragma_update(None, "query_only", true)?;
    db.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    // Should a reader be the last connection to close, the log's files
    // must stay all the same (see `keep_side_files`).
    keep_side_files(&db)?;
    Ok(db)
}

/// Reads the latest `limit` + 1 events that match (the one more tells
/// whether any were left out), in one snapshot.
fn read(
    db: &Connection,
    known: &KnownEvents,
    request: &HistoryRequest,
) -> rusqlite::Result<HistoryReply> {
    let limit = request
        .limit
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .min(MAX_HISTORY_LIMIT);
    db.execute_batch("BEGIN")?;
    let mut events = if request.topic.is_none() && request.since.is_none() {
        latest(db, limit + 1)?
    } else {
        matching(db, known, request, limit + 1)?
    };
    db.execute_batch("COMMIT")?;
    let truncated = events.len() > limit;
    events.truncate(limit);
    events.reverse();
    Ok(HistoryReply { events, truncated })
}

/// The newest `wanted` events of any topic, newest first: the table's
/// last rows, which SQLite walks to directly.
fn latest(db: &Connection, wanted: usize) -> rusqlite::Result<Vec<HistoryEvent>> {
    let mut query = db.prepare_cached(
        "SELECT at, topic, kind, key, ref, pid, user, reason FROM events
         ORDER BY id DESC LIMIT ?1",
    )?;
    query
        .query_map(params![wanted as i64], read_history_event)?
        .collect()
}

/// The newest `wanted` events that match the request, newest first,
/// fetched by the ids [`KnownEvents`] names.
fn matching(
    db: &Connection,
    known: &KnownEvents,
    request: &HistoryRequest,
    wanted: usize,
) -> rusqlite::Result<Vec<HistoryEvent>> {
    let mut by_id = db.prepare_cached(
        "SELECT at, topic, kind, key, ref, pid, user, reason FROM events WHERE id = ?1",
    )?;
    let matches = |event: &HistoryEvent| {
        request.topic.as_ref().is_none_or(|t| *t == event.topic)
            && request.since.is_none_or(|since| event.at >= since)
    };
    let mut events = Vec::new();
    let mut below = i64::MAX;
    while events.len() < wanted {
        let (ids, next) = known.candidates(
            request.topic.as_deref(),
            request.since,
            below,
            wanted - events.len(),
        );
        for id in ids {
            // A row trimmed since it was picked is simply gone.
            if let Some(event) = by_id.query_row([id], read_history_event).optional()?
                && matches(&event)
            {
                events.push(event);
            }
        }
        match next {
            Some(next) => below = next,
            None => break,
        }
    }
    Ok(events)
}

fn read_history_event(row: &rusqlite::Row) -> rusqlite::Result<HistoryEvent> {
    let unreadable = |column: usize, what: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("unknown {what}").into(),
        )
    };
    let kind: String = row.get(2)?;
    let reason: Option<String> = row.get(7)?;
    Ok(HistoryEvent {
        at: row.get(0)?,
        topic: row.get(1)?,
        kind: HistoryKind::parse(&kind).ok_or_else(|| unreadable(2, "event kind"))?,
        key: row.get(3)?,
        phx_ref: row.get(4)?,
        pid: row.get(5)?,
        user: row.get(6)?,
        reason: match reason {
            Some(reason) => {
                Some(LeaveReason::parse(&reason).ok_or_else(|| unreadable(7, "leave reason"))?)
            }
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Retention, Store};
    use super::*;
    use crate::core::registry::Change;

    fn event(at: i64, topic: &str, key: &str) -> Change {
        Change::History(Box::new(HistoryEvent {
            at,
            topic: topic.into(),
            kind: HistoryKind::Join,
            key: key.into(),
            phx_ref: format!("p{at}"),
            pid: 1,
            user: "alice".into(),
            reason: None,
        }))
    }

    fn keys(reply: &HistoryReply) -> Vec<&str> {
        reply.events.iter().map(|e| e.key.as_str()).collect()
    }

    fn request(topic: Option<&str>, since: Option<i64>, limit: Option<usize>) -> HistoryRequest {
        HistoryRequest {
            topic: topic.map(str::to_owned),
            since,
            limit,
        }
    }

    /// A store whose history holds `n` events on `busy`, with `quiet`
    /// ones (keys q0, q1, …) at times 1, 2, … among the first, committed in
    /// batches as the core would.
    fn store_with_history(n: i64, quiet: i64) -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = Store::open(&tmp.path().join("p.db"), "boot".into()).unwrap();
        let changes: Vec<Change> = (1..=n)
            .map(|at| {
                if at <= quiet {
                    event(at, "quiet", &format!("q{}", at - 1))
                } else {
                    event(at, "busy", &format!("b{at}"))
                }
            })
            .collect();
        for batch in changes.chunks(1000) {
            store.commit(batch, 1).unwrap();
        }
        (tmp, store)
    }

    #[test]
    fn a_topic_is_read_by_what_is_remembered_of_it_with_since_and_limit() {
        let (_tmp, store) = store_with_history(20_000, 3);
        let readers = store.history_readers().unwrap();
        let read = |topic, since, limit| readers.history(&request(topic, since, limit)).unwrap();

        let quiet = read(Some("quiet"), None, None);
        assert_eq!(
            (keys(&quiet), quiet.truncated),
            (vec!["q0", "q1", "q2"], false)
        );
        let latest = read(Some("quiet"), None, Some(2));
        assert_eq!((keys(&latest), latest.truncated), (vec!["q1", "q2"], true));
        let since = read(Some("quiet"), Some(2), None);
        assert_eq!(keys(&since), ["q1", "q2"]);
        assert!(read(Some("nobody"), None, None).events.is_empty());

        // More than one scan step of a topic, and of the whole history.
        let busy = read(Some("busy"), Some(10), Some(MAX_HISTORY_LIMIT));
        assert_eq!(busy.events.len(), MAX_HISTORY_LIMIT);
        assert!(busy.truncated);
        assert_eq!(busy.events[MAX_HISTORY_LIMIT - 1].key, "b20000");
        let recent = read(None, Some(20_000 - 5_000 + 1), Some(MAX_HISTORY_LIMIT));
        assert_eq!((recent.events.len(), recent.truncated), (5_000, false));
        let first = read(None, Some(1), Some(4));
        assert_eq!(keys(&first), ["b19997", "b19998", "b19999", "b20000"]);
    }

    #[test]
    fn what_is_remembered_follows_the_trim_and_survives_a_reopen() {
        let (tmp, mut store) = store_with_history(5_000, 3);
        store.set_retention(Retention {
            max_age: Duration::from_secs(3600),
            max_rows: 4_000,
        });
        while store.prune_history(10).unwrap() {}
        assert_eq!(store.known.len(), 4_000);
        let readers = store.history_readers().unwrap();
        assert!(
            readers
                .history(&request(Some("quiet"), None, None))
                .unwrap()
                .events
                .is_empty(),
            "the quiet topic's events were the oldest"
        );
        store.commit(&[event(6_000, "quiet", "again")], 1).unwrap();
        let quiet = readers
            .history(&request(Some("quiet"), None, None))
            .unwrap();
        assert_eq!(keys(&quiet), ["again"]);
        drop((readers, store));

        let store = Store::open(&tmp.path().join("p.db"), "boot".into()).unwrap();
        assert_eq!(store.known.len(), 4_001);
        let readers = store.history_readers().unwrap();
        let quiet = readers
            .history(&request(Some("quiet"), None, None))
            .unwrap();
        assert_eq!(keys(&quiet), ["again"]);
    }

    #[test]
    fn rows_deleted_behind_the_daemons_back_cost_misses_not_wrong_answers() {
        let (tmp, mut store) = store_with_history(100, 3);
        // Someone deletes the newest rows; SQLite then hands their ids out
        // again, for other topics.
        let other = Connection::open(tmp.path().join("p.db")).unwrap();
        other
            .execute_batch("DELETE FROM events WHERE id > 1")
            .unwrap();
        store
            .commit(
                &[event(200, "elsewhere", "e1"), event(201, "quiet", "q9")],
                1,
            )
            .unwrap();
        let readers = store.history_readers().unwrap();
        let quiet = readers
            .history(&request(Some("quiet"), None, None))
            .unwrap();
        assert_eq!(keys(&quiet), ["q0", "q9"]);
        let elsewhere = readers
            .history(&request(Some("elsewhere"), None, None))
            .unwrap();
        assert_eq!(keys(&elsewhere), ["e1"]);
        let busy = readers.history(&request(Some("busy"), None, None)).unwrap();
        assert!(busy.events.is_empty(), "{:?}", keys(&busy));
    }
}
