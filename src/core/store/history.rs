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
use serde_json::Value;

use super::{StoreError, keep_side_files};
use crate::protocol::{
    DEFAULT_HISTORY_LIMIT, HistoryEvent, HistoryKind, HistoryReply, HistoryRequest, LeaveReason,
    MAX_HISTORY_LIMIT,
};

/// The events in the history table, as the store committed and trimmed
/// them: for each, its id, time and topic (about 64 bytes an event, 6 MB
/// at the default bound), and for each topic the ids and times of its
/// events. The core's driver writes it after each commit and trim; readers
/// look into it for a few microseconds at a time (see [`SCAN_STEP`]), so
/// the core never waits long for them.
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
    /// Each topic's events, oldest first. A topic with none has no key.
    by_topic: HashMap<Arc<str>, VecDeque<Mark>>,
}

/// One event, as a list of events in id order remembers it.
#[derive(Clone, Copy)]
struct Mark {
    id: i64,
    at: i64,
    /// The latest time of this event and of every one before it in its
    /// list. Ids follow the order of commits, times the wall clock, which
    /// may step back: so a list is not in time order, but this is, and a
    /// read `since` a time skips every event before the first one whose
    /// `latest` reaches it, by a binary search. Events leaving a list may
    /// leave it too high, never too low: a read looks at a few events
    /// more, and misses none.
    latest: i64,
}

struct Noted {
    mark: Mark,
    topic: Arc<str>,
}

/// A list of events in id order: all of them, or one topic's.
trait Marked {
    fn mark(&self) -> &Mark;
    fn mark_mut(&mut self) -> &mut Mark;
}

impl Marked for Mark {
    fn mark(&self) -> &Mark {
        self
    }
    fn mark_mut(&mut self) -> &mut Mark {
        self
    }
}

impl Marked for Noted {
    fn mark(&self) -> &Mark {
        &self.mark
    }
    fn mark_mut(&mut self) -> &mut Mark {
        &mut self.mark
    }
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
            if oldest.is_some_and(|oldest| first.mark.id >= oldest) {
                break;
            }
            let Some(first) = all.pop_front() else { break };
            if let Some(marks) = by_topic.get_mut(&first.topic) {
                if marks.front().map(|mark| mark.id) == Some(first.mark.id) {
                    marks.pop_front();
                } else {
                    marks.retain(|mark| mark.id != first.mark.id);
                }
                if marks.is_empty() {
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

    /// At most how many rows a read of `request` fetches: none when no
    /// remembered event matches it, so that it needs no database at all.
    fn rows_at_most(&self, request: &HistoryRequest, wanted: usize) -> usize {
        if request.topic.is_none() && request.since.is_none() {
            // Read straight from the table's last rows, whatever is
            // remembered.
            return wanted;
        }
        let known = self.read();
        let matching = match request.topic.as_deref() {
            Some(topic) => known
                .by_topic
                .get(topic)
                .map_or(0, |marks| young_enough(marks, request.since)),
            None => young_enough(&known.all, request.since),
        };
        matching.min(wanted)
    }

    /// Up to `room` ids of events that match `topic` and `since`, newest
    /// first, from those below `below`; and, if it stopped before the
    /// oldest that may match, the id to go on below. Looks at no more than
    /// [`SCAN_STEP`] events per call.
    fn candidates(
        &self,
        topic: Option<&str>,
        since: Option<i64>,
        below: i64,
        room: usize,
    ) -> (Vec<i64>, Option<i64>) {
        let known = self.read();
        match topic {
            Some(topic) => match known.by_topic.get(topic) {
                Some(marks) => pick(marks, since, below, room),
                None => (Vec::new(), None),
            },
            None => pick(&known.all, since, below, room),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where the events of `list` that may be at `since` or later begin.
fn first_young_enough(list: &VecDeque<impl Marked>, since: Option<i64>) -> usize {
    since.map_or(0, |since| {
        list.partition_point(|event| event.mark().latest < since)
    })
}

/// How many events of `list` may be at `since` or later.
fn young_enough(list: &VecDeque<impl Marked>, since: Option<i64>) -> usize {
    list.len() - first_young_enough(list, since)
}

/// [`KnownEvents::candidates`] in one list.
fn pick(
    list: &VecDeque<impl Marked>,
    since: Option<i64>,
    below: i64,
    room: usize,
) -> (Vec<i64>, Option<i64>) {
    let start = first_young_enough(list, since);
    let end = list.partition_point(|event| event.mark().id < below);
    let mut found = Vec::new();
    for (looked, event) in list.range(start..end.max(start)).rev().enumerate() {
        let mark = event.mark();
        if found.len() == room || looked == SCAN_STEP {
            return (found, Some(mark.id + 1));
        }
        // Past a step back of the clock, a few events may be older.
        if since.is_none_or(|since| mark.at >= since) {
            found.push(mark.id);
        }
    }
    (found, None)
}

/// Puts `event` in its place in `list`, in id order, and keeps every
/// `latest` after it right.
fn place<T: Marked>(list: &mut VecDeque<T>, mut event: T) {
    let id = event.mark().id;
    let before = |list: &VecDeque<T>, place: usize| {
        place
            .checked_sub(1)
            .and_then(|last| list.get(last))
            .map_or(i64::MIN, |last| last.mark().latest)
    };
    if list.back().is_none_or(|last| last.mark().id < id) {
        let mark = event.mark_mut();
        mark.latest = before(list, list.len()).max(mark.at);
        list.push_back(event);
        return;
    }
    let at_place = list.partition_point(|known| known.mark().id < id);
    list.insert(at_place, event);
    let mut latest = before(list, at_place);
    for known in list.range_mut(at_place..) {
        let mark = known.mark_mut();
        latest = latest.max(mark.at);
        mark.latest = latest;
    }
}

impl Known {
    fn add(&mut self, id: i64, at: i64, topic: &str) {
        let topic = match self.by_topic.get_key_value(topic) {
            Some((name, _)) => Arc::clone(name),
            None => Arc::from(topic),
        };
        let mark = Mark { id, at, latest: at };
        // SQLite hands out ids above the highest in the table, so an id
        // out of order means someone else deleted the newest rows: the id
        // is in use again, for this event.
        if self.all.back().is_some_and(|last| last.mark.id >= id) {
            let at_place = self.all.partition_point(|known| known.mark.id < id);
            if self
                .all
                .get(at_place)
                .is_some_and(|known| known.mark.id == id)
                && let Some(old) = self.all.remove(at_place)
                && let Some(marks) = self.by_topic.get_mut(&old.topic)
            {
                marks.retain(|known| known.id != id);
                if marks.is_empty() {
                    self.by_topic.remove(&old.topic);
                }
            }
        }
        place(
            &mut self.all,
            Noted {
                mark,
                topic: Arc::clone(&topic),
            },
        );
        place(self.by_topic.entry(topic).or_default(), mark);
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

    /// At most how many rows a read of `request` fetches from the
    /// database, from what is remembered alone, in a few microseconds:
    /// none when no event matches it (a topic without events, or none
    /// since `since`), which [`HistoryReaders::history`] then answers
    /// without a database connection. What a read costs grows with this.
    pub fn rows_at_most(&self, request: &HistoryRequest) -> usize {
        self.known.rows_at_most(request, wanted(request))
    }

    /// The latest history events that match, oldest first, and whether
    /// older ones were left out.
    pub fn history(&self, request: &HistoryRequest) -> Result<HistoryReply, StoreError> {
        if self.rows_at_most(request) == 0 {
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

/// How many events a read of `request` fetches at most: its limit, and
/// one more, which tells whether any were left out.
fn wanted(request: &HistoryRequest) -> usize {
    request
        .limit
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .min(MAX_HISTORY_LIMIT)
        + 1
}

/// Reads the latest `limit` + 1 events that match (the one more tells
/// whether any were left out), in one snapshot.
fn read(
    db: &Connection,
    known: &KnownEvents,
    request: &HistoryRequest,
) -> rusqlite::Result<HistoryReply> {
    let wanted = wanted(request);
    db.execute_batch("BEGIN")?;
    let mut events = if request.topic.is_none() && request.since.is_none() {
        latest(db, wanted)?
    } else {
        matching(db, known, request, wanted)?
    };
    db.execute_batch("COMMIT")?;
    let limit = wanted - 1;
    let truncated = events.len() > limit;
    events.truncate(limit);
    events.reverse();
    Ok(HistoryReply { events, truncated })
}

/// The newest `wanted` events of any topic, newest first: the table's
/// last rows, which SQLite walks to directly.
fn latest(db: &Connection, wanted: usize) -> rusqlite::Result<Vec<HistoryEvent>> {
    let mut query = db.prepare_cached(
        "SELECT at, topic, kind, key, ref, pid, user, reason, changed, removed FROM events
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
        "SELECT at, topic, kind, key, ref, pid, user, reason, changed, removed FROM events WHERE id = ?1",
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
    let json = |column: usize| -> rusqlite::Result<Option<Value>> {
        let text: Option<String> = row.get(column)?;
        text.map(|text| serde_json::from_str(&text).map_err(|_| unreadable(column, "meta change")))
            .transpose()
    };
    let changed = match json(8)? {
        Some(Value::Object(changed)) => Some(changed),
        Some(_) => return Err(unreadable(8, "meta change")),
        None => None,
    };
    let removed = match json(9)? {
        Some(removed) => {
            Some(serde_json::from_value(removed).map_err(|_| unreadable(9, "meta change"))?)
        }
        None => None,
    };
    Ok(HistoryEvent {
        at: row.get(0)?,
        topic: row.get(1)?,
        kind: HistoryKind::parse(&kind).ok_or_else(|| unreadable(2, "event kind"))?,
        key: row.get(3)?,
        phx_ref: row.get(4)?,
        pid: row.get(5)?,
        user: row.get(6)?,
        // A reason a later build wrote (this database may outlive a
        // downgrade) is still a leave: it reads as one whose reason is not
        // known, rather than making the whole history unreadable.
        reason: reason.map(|reason| LeaveReason::parse(&reason).unwrap_or(LeaveReason::Unknown)),
        changed,
        removed,
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
            changed: None,
            removed: None,
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
    fn a_read_since_a_time_skips_older_events_and_misses_none_when_the_clock_steps_back() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = Store::open(&tmp.path().join("p.db"), "boot".into()).unwrap();
        // Times 1..=10_000 on `busy`, then the clock steps back: `quiet`
        // at 9_000, `busy` at 50, and `quiet` at 10_001.
        let mut changes: Vec<Change> = (1..=10_000)
            .map(|at| event(at, "busy", &format!("b{at}")))
            .collect();
        changes.push(event(9_000, "quiet", "stepped-back"));
        changes.push(event(50, "busy", "far-back"));
        changes.push(event(10_001, "quiet", "after"));
        for batch in changes.chunks(1000) {
            store.commit(batch, 1).unwrap();
        }
        let readers = store.history_readers().unwrap();
        let read = |topic, since| {
            let request = request(topic, since, Some(MAX_HISTORY_LIMIT));
            (
                readers.rows_at_most(&request),
                readers.history(&request).unwrap(),
            )
        };

        let (rows, quiet) = read(Some("quiet"), Some(9_000));
        assert_eq!(rows, 2);
        assert_eq!(keys(&quiet), ["stepped-back", "after"]);
        let (rows, busy) = read(Some("busy"), Some(9_999));
        assert_eq!(rows, 3, "the two at or after 9,999, and the one after them");
        assert_eq!(keys(&busy), ["b9999", "b10000"]);
        let (rows, all) = read(None, Some(9_999));
        assert_eq!(rows, 5);
        assert_eq!(keys(&all), ["b9999", "b10000", "after"]);
        let (rows, none) = read(Some("busy"), Some(10_001));
        assert_eq!((rows, none.events.len()), (0, 0), "nothing to read");
        let (rows, _) = read(None, Some(10_002));
        assert_eq!(rows, 0);
        let (rows, _) = read(Some("nobody"), None);
        assert_eq!(rows, 0);
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
    fn a_leave_whose_reason_this_build_does_not_know_reads_as_unknown() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = Store::open(&tmp.path().join("p.db"), "boot".into()).unwrap();
        let leave = |at: i64, key: &str| {
            let Change::History(mut event) = event(at, "doc", key) else {
                unreachable!("a history event")
            };
            event.kind = HistoryKind::Leave;
            event.reason = Some(LeaveReason::HostLost);
            Change::History(event)
        };
        store
            .commit(&[leave(1, "lost"), leave(2, "later")], 1)
            .unwrap();
        // A later build wrote a reason this one has no name for.
        let other = Connection::open(tmp.path().join("p.db")).unwrap();
        other
            .execute("UPDATE events SET reason = 'moved' WHERE key = 'later'", [])
            .unwrap();
        let readers = store.history_readers().unwrap();
        let read = readers.history(&request(Some("doc"), None, None)).unwrap();
        let reasons: Vec<_> = read
            .events
            .iter()
            .map(|event| (event.key.as_str(), event.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("lost", Some(LeaveReason::HostLost)),
                ("later", Some(LeaveReason::Unknown))
            ]
        );
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
