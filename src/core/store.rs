//! The store: the one owner of the SQLite connection. Nothing else in the
//! daemon touches SQL.
//!
//! The database is opened in WAL mode with `synchronous=NORMAL`: a commit
//! survives a crash of the daemon, and what a power loss could take belongs
//! to processes the power loss killed anyway (their boot id no longer
//! matches, so they are cleared at the next start).

use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::hooks::Wal;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use serde_json::{Map, Value};

use super::registry::{Change, Entry, ProcessId, TokenHash};
use crate::paths;
use crate::protocol::{LeaveReason, Lifetime};

mod history;

pub use history::HistoryReaders;
use history::KnownEvents;

/// The schema, applied to a new database.
const SCHEMA: &str = include_str!("../../schema.sql");

/// The schema version this build writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 5;

/// What marks a database file as presenced's: `PRAGMA application_id`, the
/// four bytes at offset 68 of the file's header. ASCII "PRSD". Part of the
/// file format: never to change, or every existing database would look
/// like someone else's.
pub const APPLICATION_ID: i32 = 0x5052_5344;

/// The tables each older version had, with their columns: a database from
/// before [`APPLICATION_ID`] existed is taken for ours only if its tables
/// are exactly these.
const PRESENCES_COLUMNS: &[&str] = &[
    "ref",
    "topic",
    "key",
    "seq",
    "prev_ref",
    "meta",
    "joined_at",
    "pid",
    "pid_start_time",
    "uid",
    "user",
    "lifetime",
    "resume_token_hash",
    "boot_id",
];
const COUNTERS_COLUMNS: &[&str] = &["name", "value"];
/// Versions 2 to 4.
const EVENTS_COLUMNS_BEFORE_5: &[&str] = &[
    "id", "at", "topic", "kind", "key", "ref", "pid", "user", "reason",
];
const EVENTS_COLUMNS: &[&str] = &[
    "id", "at", "topic", "kind", "key", "ref", "pid", "user", "reason", "changed", "removed",
];
/// Every index any version made.
const OUR_INDEXES: &[&str] = &["presences_by_topic", "events_by_topic", "events_by_time"];

/// From version 2: the same columns in fewer b-trees, so that a commit
/// writes fewer pages. `presences` and `counters` are keyed by their
/// primary key alone (WITHOUT ROWID); the indexes nothing reads go.
const FROM_VERSION_2: &str = "
    CREATE TABLE presences_v3 (
        ref TEXT PRIMARY KEY, topic TEXT NOT NULL, key TEXT NOT NULL,
        seq INTEGER NOT NULL, prev_ref TEXT, meta TEXT NOT NULL,
        joined_at INTEGER NOT NULL, pid INTEGER NOT NULL,
        pid_start_time INTEGER NOT NULL, uid INTEGER NOT NULL, user TEXT NOT NULL,
        lifetime TEXT NOT NULL CHECK (lifetime IN ('connection', 'process')),
        resume_token_hash BLOB NOT NULL, boot_id TEXT NOT NULL
    ) STRICT, WITHOUT ROWID;
    INSERT INTO presences_v3 SELECT ref, topic, key, seq, prev_ref, meta, joined_at, pid,
        pid_start_time, uid, user, lifetime, resume_token_hash, boot_id FROM presences;
    DROP TABLE presences;
    ALTER TABLE presences_v3 RENAME TO presences;
    CREATE TABLE counters_v3 (name TEXT PRIMARY KEY, value INTEGER NOT NULL)
        STRICT, WITHOUT ROWID;
    INSERT INTO counters_v3 SELECT name, value FROM counters;
    DROP TABLE counters;
    ALTER TABLE counters_v3 RENAME TO counters;
    DROP INDEX IF EXISTS events_by_time;
";

/// From versions 2 and 3: the history moves to the `events` table that
/// schema.sql defines now, with no index and a CHECK that costs no
/// temporary table per insert. The old table is put aside before the
/// schema runs, and its rows are copied into the new one after.
const HISTORY_ASIDE: &str = "
    DROP INDEX IF EXISTS events_by_topic;
    ALTER TABLE events RENAME TO events_v3;
";
const HISTORY_BACK: &str = "
    INSERT INTO events (id, at, topic, kind, key, ref, pid, user, reason)
        SELECT id, at, topic, kind, key, ref, pid, user, reason FROM events_v3;
    DROP TABLE events_v3;
";

/// From version 4: an update's event says what it did to the meta.
const FROM_VERSION_4: &str = "
    ALTER TABLE events ADD COLUMN changed TEXT;
    ALTER TABLE events ADD COLUMN removed TEXT;
";

/// How long opening the database waits for another program's lock on it
/// before it gives up: long enough for a brief look with `sqlite3`. Nobody
/// is served yet, so nobody waits with it.
const OPEN_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a commit waits for another program's lock. The thread running
/// the core waits with it, and every client with the core, so it is short: a commit
/// that fails is rolled back and its facts are tried again later, which
/// costs less than holding every client up.
const COMMIT_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
    Io(std::io::Error),
    /// The file was written by a newer presenced.
    NewerSchema {
        found: i64,
    },
    /// Another daemon holds the database.
    InUse {
        lock: PathBuf,
        holder: String,
    },
    /// Another program, not a presenced (none holds the `.lock`), holds a
    /// lock inside the database file itself.
    Locked {
        path: PathBuf,
    },
    DiskFull {
        path: PathBuf,
    },
    /// The daemon may not create or write the files in the database folder.
    NotWritable {
        path: PathBuf,
        cause: String,
    },
    /// A readable SQLite database, but another program's: it is left
    /// exactly as it was found.
    NotOurs {
        path: PathBuf,
        why: String,
    },
    /// Something at the lock's path that this daemon will not write.
    LockNotOurs(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "database error: {e}"),
            StoreError::Io(e) => write!(f, "database file error: {e}"),
            StoreError::InUse { lock, holder } => write!(
                f,
                "another daemon (pid {holder}) is using this database (lock {}); \
                 two daemons must not share one",
                lock.display()
            ),
            StoreError::NewerSchema { found } => write!(
                f,
                "the database has schema version {found}; this presenced understands up to \
                 {SCHEMA_VERSION}. Upgrade presenced or point --db elsewhere"
            ),
            StoreError::Locked { path } => write!(
                f,
                "the database {} is locked by another program (not a presenced daemon); \
                 close that program, or point --db elsewhere",
                path.display()
            ),
            StoreError::DiskFull { path } => write!(
                f,
                "the disk holding the database {} is full",
                path.display()
            ),
            StoreError::NotWritable { path, cause } => write!(
                f,
                "cannot write the database {} ({cause}); this user must be able to create \
                 and write files in {}, or point --db elsewhere",
                path.display(),
                paths::parent_dir(path).display()
            ),
            StoreError::NotOurs { path, why } => write!(
                f,
                "{} is not a presenced database ({why}); it was left untouched: point --db \
                 elsewhere",
                path.display()
            ),
            StoreError::LockNotOurs(what) => write!(f, "{what}"),
        }
    }
}

impl StoreError {
    /// Whether the failure passes without the daemon's help: someone frees
    /// space on the disk, or the other program lets go of its lock.
    pub fn is_passing(&self) -> bool {
        matches!(
            self,
            StoreError::DiskFull { .. } | StoreError::Locked { .. }
        )
    }

    /// Names the database in the errors that a person can do something
    /// about; leaves the others as SQLite said them.
    fn about(self, path: &Path) -> StoreError {
        let code = match &self {
            StoreError::Sqlite(e) => e.sqlite_error_code(),
            StoreError::Io(e) if is_not_writable(e) => {
                return StoreError::NotWritable {
                    path: path.to_owned(),
                    cause: e.to_string(),
                };
            }
            _ => None,
        };
        let path = path.to_owned();
        match code {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                StoreError::Locked { path }
            }
            Some(ErrorCode::DiskFull) => StoreError::DiskFull { path },
            Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => {
                StoreError::NotWritable {
                    path,
                    cause: self.to_string(),
                }
            }
            _ => self,
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e)
    }
}

/// A persisted entry with the boot it was written under.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub entry: Entry,
    pub boot_id: String,
}

pub struct Store {
    db: Connection,
    /// An exclusive lock beside the database, held while the store lives:
    /// two daemons on one database would hand out the same seqs and refs.
    _lock: std::fs::File,
    path: PathBuf,
    /// Written into every row, so that the next start can tell rows of this
    /// boot from rows of an earlier one.
    boot_id: String,
    /// Where a corrupt database was moved at open, if it was.
    recovered_from: Option<PathBuf>,
    retention: Retention,
    /// Transactions committed since the store was opened: with group
    /// commit, far fewer than the operations they saved.
    commits: u64,
    /// Frames in the write-ahead log after the last commit, as SQLite's
    /// WAL hook reports them (see [`Store::checkpoint_if_due`]).
    wal_frames: Arc<AtomicU32>,
    /// The seq counter as this store last committed it: every seq handed
    /// out is below it (see [`SEQ_RESERVATION`]). Zero until the first
    /// commit.
    reserved_seq: u64,
    /// The history's events as committed, for the readers to find a
    /// topic's without walking the table.
    known: Arc<KnownEvents>,
}

/// Seqs are reserved this many at a time: the counter is written when the
/// registry passes the last reservation, not in every commit that hands
/// one out, which spares most commits a page. A restart continues after
/// the reservation, so up to this many numbers go unused; seqs and refs
/// promise to grow and never to be reused, not to be dense.
const SEQ_RESERVATION: u64 = 1024;

/// WAL frames past which the core checkpoints: SQLite's own default for
/// its automatic checkpoints, which this replaces.
const CHECKPOINT_FRAMES: u32 = 1000;

/// How much history is kept: whichever bound is reached first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_rows: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_rows: 100_000,
        }
    }
}

/// How many history rows one pruning pass deletes at most: enough to keep
/// up with any realistic rate, few enough that a pass takes milliseconds
/// and the core never stalls on it.
const PRUNE_CHUNK: i64 = 2_000;

impl Store {
    /// Opens (or creates) the database at `path`. A file that is not a
    /// readable SQLite database is moved aside to `PATH.corrupt-<seconds>`
    /// and a new one is started, so that a damaged file never keeps the
    /// daemon down; `recovered_from` then names the moved file.
    pub fn open(path: &Path, boot_id: String) -> Result<Store, StoreError> {
        // Whose the file is, read from its bytes before anything is
        // created beside it: even the lock file would be a change in the
        // folder of another program's database. Read again once the lock
        // is held, in case the file was replaced in between.
        belonging_on_disk(path).map_err(|e| e.about(path))?;
        let lock = lock_database(path).map_err(|e| e.about(path))?;
        belonging_on_disk(path).map_err(|e| e.about(path))?;
        let (mut db, recovered_from) = match Self::open_checked(path) {
            Ok(db) => (db, None),
            Err(StoreError::Sqlite(e)) if is_corruption(&e) => {
                let aside = move_aside(path).map_err(|e| StoreError::from(e).about(path))?;
                tracing::error!(
                    "database {} is corrupt ({e}); moved it to {} and started a new one",
                    path.display(),
                    aside.display()
                );
                let db = Self::open_checked(path).map_err(|e| e.about(path))?;
                (db, Some(aside))
            }
            Err(e) => return Err(e.about(path)),
        };
        // A WAL hook of our own replaces SQLite's automatic checkpoint,
        // which would otherwise run inside a commit, fsyncs and all, before
        // that commit's batch could announce anything.
        let wal_frames = Arc::new(AtomicU32::new(0));
        let frames = Arc::clone(&wal_frames);
        db.wal_hook(Some(move |_: &mut Wal, pages: c_int| {
            frames.store(u32::try_from(pages).unwrap_or(0), Ordering::Relaxed);
            Ok(())
        }))
        .map_err(|e| StoreError::from(e).about(path))?;
        let known = KnownEvents::load(&db).map_err(|e| StoreError::from(e).about(path))?;
        Ok(Store {
            db,
            _lock: lock,
            path: path.to_owned(),
            boot_id,
            recovered_from,
            retention: Retention::default(),
            commits: 0,
            wal_frames,
            reserved_seq: 0,
            known: Arc::new(known),
        })
    }

    /// Copies the write-ahead log back into the database once it holds
    /// [`CHECKPOINT_FRAMES`], so that it stops growing. The core calls
    /// this after a batch's lines are out, so the checkpoint's fsyncs
    /// delay at most the next batch, never the announcements of the one
    /// that filled the log. Passive: it never waits for anyone, and what
    /// it cannot copy now (another program reading) is tried after a
    /// later commit.
    pub fn checkpoint_if_due(&mut self) {
        if self.wal_frames.load(Ordering::Relaxed) < CHECKPOINT_FRAMES {
            return;
        }
        // The next commit reports the log's size again; until then,
        // nothing more to do.
        self.wal_frames.store(0, Ordering::Relaxed);
        if let Err(e) = self
            .db
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::debug!("could not checkpoint the database, trying later: {e}");
        }
    }

    /// Frames in the write-ahead log after the last commit.
    #[cfg(test)]
    fn wal_frames(&self) -> u32 {
        self.wal_frames.load(Ordering::Relaxed)
    }

    fn open_checked(path: &Path) -> Result<Connection, StoreError> {
        let db = Connection::open(path)?;
        // Until the file has proved readable and ours, closing it must not
        // checkpoint: that would copy the WAL into a damaged database and
        // delete it (a corrupt database is to be moved aside whole), or
        // write into another program's file.
        db.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        db.busy_timeout(OPEN_BUSY_TIMEOUT)?;
        // Whose the file is is decided from reads alone: even switching to
        // WAL writes to the header.
        db.pragma_update(None, "query_only", true)?;
        let belonging = belonging(&db, path)?;
        db.pragma_update(None, "query_only", false)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        keep_side_files(&db)?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let check: String = db.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        if check != "ok" {
            return Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(check),
            )));
        }
        migrate(&db, belonging)?;
        // Take the write lock once, so that a database this daemon cannot
        // write (another program holds the lock, or the file is read-only)
        // stops the start here, rather than failing every commit later.
        db.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
        db.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, false)?;
        db.busy_timeout(COMMIT_BUSY_TIMEOUT)?;
        Ok(db)
    }

    /// Readers of the history, apart from this connection and the core
    /// thread (see [`HistoryReaders`]).
    pub fn history_readers(&self) -> Result<HistoryReaders, StoreError> {
        HistoryReaders::open(&self.path, Arc::clone(&self.known))
    }

    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    /// Deletes up to [`PRUNE_CHUNK`] of the oldest history rows that are
    /// past the retention bounds. Returns whether more are left to delete.
    pub fn prune_history(&mut self, now: i64) -> Result<bool, StoreError> {
        let oldest_kept = now.saturating_sub(self.retention.max_age.as_millis() as i64);
        let max_rows = self.retention.max_rows.min(i64::MAX as u64) as i64;
        let deleted = self
            .db
            .execute(
                // Ids grow with time, so what is past either bound is a run
                // of the lowest ids: found by walking from the oldest row to
                // the first one young enough, never by scanning the rest.
                "DELETE FROM events WHERE id IN (
                   SELECT id FROM events
                   WHERE id < max(
                     coalesce(
                       (SELECT id FROM events WHERE at >= ?1 ORDER BY id LIMIT 1),
                       (SELECT max(id) FROM events) + 1),
                     (SELECT max(id) FROM events) - ?2 + 1)
                   ORDER BY id LIMIT ?3)",
                params![oldest_kept, max_rows, PRUNE_CHUNK],
            )
            .map_err(|e| StoreError::from(e).about(&self.path))?;
        if deleted > 0 {
            let oldest: Option<i64> = self
                .db
                .query_row("SELECT min(id) FROM events", [], |row| row.get(0))
                .map_err(|e| StoreError::from(e).about(&self.path))?;
            self.known.forget_below(oldest);
        }
        Ok(deleted as i64 == PRUNE_CHUNK)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets a test's own lock on the database fail a commit quickly.
    #[cfg(test)]
    pub(crate) fn set_busy_timeout(&self, timeout: Duration) {
        self.db.busy_timeout(timeout).unwrap();
    }

    pub fn recovered_from(&self) -> Option<&Path> {
        self.recovered_from.as_deref()
    }

    /// How many batches of changes were committed since the store opened.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Every persisted entry, and the seq counter: at or above every seq
    /// ever handed out.
    pub fn load(&self) -> Result<(Vec<StoredEntry>, u64), StoreError> {
        self.read_rows().map_err(|e| e.about(&self.path))
    }

    fn read_rows(&self) -> Result<(Vec<StoredEntry>, u64), StoreError> {
        let mut statement = self.db.prepare(
            "SELECT ref, topic, key, seq, prev_ref, meta, joined_at, pid, pid_start_time, uid,
                    user, lifetime, resume_token_hash, boot_id
             FROM presences",
        )?;
        let rows = statement.query_map([], |row| {
            let meta: String = row.get(5)?;
            let lifetime: String = row.get(11)?;
            let hash: Vec<u8> = row.get(12)?;
            Ok(StoredEntry {
                entry: Entry {
                    phx_ref: row.get(0)?,
                    topic: row.get(1)?,
                    key: row.get(2)?,
                    seq: row.get::<_, i64>(3)? as u64,
                    prev_ref: row.get(4)?,
                    meta: serde_json::from_str::<Map<String, Value>>(&meta).unwrap_or_else(|e| {
                        tracing::warn!("a stored meta is unreadable ({e}); using {{}}");
                        Map::new()
                    }),
                    joined_at: row.get(6)?,
                    process: ProcessId {
                        pid: row.get(7)?,
                        start_time: row.get::<_, i64>(8)? as u64,
                    },
                    uid: row.get(9)?,
                    user: row.get(10)?,
                    lifetime: if lifetime == "process" {
                        Lifetime::Process
                    } else {
                        Lifetime::Connection
                    },
                    token_hash: TokenHash::try_from(hash.as_slice()).unwrap_or_default(),
                    conn: None,
                    resume_deadline: None,
                    cluster: None,
                },
                boot_id: row.get(13)?,
            })
        })?;
        let mut entries = rows.collect::<Result<Vec<_>, _>>()?;
        // In join order. Sorted here rather than by SQLite, which has no
        // index on seq and would sort through a temporary b-tree.
        entries.sort_unstable_by_key(|stored| stored.entry.seq);
        let next_seq: Option<i64> = self
            .db
            .query_row(
                "SELECT value FROM counters WHERE name = 'next_seq'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        Ok((entries, next_seq.map_or(1, |n| n.max(1) as u64)))
    }

    /// Applies a batch of changes in one transaction, with a new seq
    /// reservation when `next_seq` has passed the last one. Many operations
    /// share one commit: this is the group commit that keeps the daemon
    /// fast under load.
    ///
    /// A failed commit keeps nothing of the batch: the transaction is rolled
    /// back (rusqlite does so when a `Transaction` is dropped uncommitted,
    /// also after a failed `COMMIT`), and the next commit starts afresh.
    pub fn commit(&mut self, changes: &[Change], next_seq: u64) -> Result<(), StoreError> {
        self.end_stray_transaction();
        let recorded = self
            .write(changes, next_seq)
            .map_err(|e| e.about(&self.path))?;
        // Before any reply of the batch goes out: a history read that
        // follows it must find its events.
        self.known.add(recorded);
        self.commits += 1;
        Ok(())
    }

    /// rusqlite ignores a failed rollback, which would leave a transaction
    /// open and make every later `BEGIN` fail: end it here.
    fn end_stray_transaction(&self) {
        if !self.db.is_autocommit()
            && let Err(e) = self.db.execute_batch("ROLLBACK")
        {
            tracing::warn!("could not end an unfinished transaction: {e}");
        }
    }

    /// Writes and commits the batch; returns the history events it
    /// recorded, as (id, at, topic).
    fn write<'a>(
        &mut self,
        changes: &'a [Change],
        next_seq: u64,
    ) -> Result<Vec<(i64, i64, &'a str)>, StoreError> {
        let reservation =
            (next_seq > self.reserved_seq).then(|| next_seq.saturating_add(SEQ_RESERVATION));
        // Immediate: take the write lock first, so that a busy database
        // fails here, before any work, and never halfway.
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut recorded = Vec::new();
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO presences
                   (ref, topic, key, seq, prev_ref, meta, joined_at, pid, pid_start_time, uid,
                    user, lifetime, resume_token_hash, boot_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM presences WHERE ref = ?1")?;
            let mut record = tx.prepare_cached(
                "INSERT INTO events (at, topic, kind, key, ref, pid, user, reason, changed, removed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for change in changes {
                match change {
                    Change::Put(entry) => {
                        put.execute(params![
                            entry.phx_ref,
                            entry.topic,
                            entry.key,
                            entry.seq as i64,
                            entry.prev_ref,
                            json_column(&entry.meta)?,
                            entry.joined_at,
                            entry.process.pid,
                            entry.process.start_time as i64,
                            entry.uid,
                            entry.user,
                            entry.lifetime.as_str(),
                            &entry.token_hash[..],
                            self.boot_id,
                        ])?;
                    }
                    Change::Delete(phx_ref) => {
                        delete.execute(params![phx_ref])?;
                    }
                    Change::History(event) => {
                        record.execute(params![
                            event.at,
                            event.topic,
                            event.kind.as_str(),
                            event.key,
                            event.phx_ref,
                            event.pid,
                            event.user,
                            event.reason.map(LeaveReason::as_str),
                            event.changed.as_ref().map(json_column).transpose()?,
                            event.removed.as_ref().map(json_column).transpose()?,
                        ])?;
                        recorded.push((tx.last_insert_rowid(), event.at, event.topic.as_str()));
                    }
                }
            }
            if let Some(reserved) = reservation {
                tx.prepare_cached(
                    "INSERT INTO counters (name, value) VALUES ('next_seq', ?1)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                )?
                .execute(params![reserved as i64])?;
            }
        }
        tx.commit()?;
        if let Some(reserved) = reservation {
            self.reserved_seq = reserved;
        }
        Ok(recorded)
    }
}

/// Takes the exclusive lock `PATH.lock`.
fn lock_database(path: &Path) -> Result<std::fs::File, StoreError> {
    let lock = paths::sibling(path, ".lock");
    match crate::sys::take_pid_lock(&lock)? {
        crate::sys::PidLock::Taken(file) => Ok(file),
        crate::sys::PidLock::HeldBy(holder) => Err(StoreError::InUse { lock, holder }),
        crate::sys::PidLock::NotOurs(what) => Err(StoreError::LockNotOurs(what)),
    }
}

/// The fields of a database header that say whose the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    user_version: i64,
    application_id: i32,
    /// Changes with every change of the schema: equal in two copies of
    /// page 1, the two have the same tables.
    schema_cookie: u32,
}

impl Header {
    /// Reads the header at the start of page 1; `None` if `page` is not
    /// one of an SQLite database.
    fn parse(page: &[u8]) -> Option<Header> {
        let field = |at: usize| -> Option<[u8; 4]> { page.get(at..at + 4)?.try_into().ok() };
        if page.get(..16) != Some(b"SQLite format 3\0".as_slice()) {
            return None;
        }
        Some(Header {
            schema_cookie: u32::from_be_bytes(field(40)?),
            user_version: i64::from(i32::from_be_bytes(field(60)?)),
            application_id: i32::from_be_bytes(field(68)?),
        })
    }
}

/// The header of page 1 as the last transaction committed to the
/// write-ahead log at `wal` left it, if the log holds one: until a
/// checkpoint copies it back, that page 1, not the file's, is the
/// database's. Read as SQLite reads a log: frames count while their salts
/// are the log's and their checksums chain, and a frame counts only once
/// a commit frame follows it.
fn header_in_wal(wal: &Path) -> std::io::Result<Option<Header>> {
    use std::io::Read;
    let mut log = match std::fs::File::open(wal) {
        Ok(file) => std::io::BufReader::new(file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut header = [0u8; 32];
    if log.read_exact(&mut header).is_err() {
        return Ok(None);
    }
    let word = |bytes: &[u8], at: usize| {
        u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    };
    let magic = word(&header, 0);
    if magic & !1 != 0x377f_0682 {
        return Ok(None);
    }
    let big_endian = magic & 1 == 1;
    let page_size = word(&header, 8) as usize;
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Ok(None);
    }
    // SQLite's checksum: over pairs of 32-bit words in the log's byte order.
    let checksum = |mut sum: (u32, u32), bytes: &[u8]| {
        for pair in bytes.chunks_exact(8) {
            let read = |b: &[u8]| {
                let b = [b[0], b[1], b[2], b[3]];
                if big_endian {
                    u32::from_be_bytes(b)
                } else {
                    u32::from_le_bytes(b)
                }
            };
            sum.0 = sum.0.wrapping_add(read(&pair[..4])).wrapping_add(sum.1);
            sum.1 = sum.1.wrapping_add(read(&pair[4..])).wrapping_add(sum.0);
        }
        sum
    };
    let mut sum = checksum((0, 0), &header[..24]);
    if sum != (word(&header, 24), word(&header, 28)) {
        return Ok(None);
    }
    let salts = &header[16..24];
    let mut frame = vec![0u8; 24 + page_size];
    let (mut pending, mut committed) = (None, None);
    while log.read_exact(&mut frame).is_ok() {
        if &frame[8..16] != salts {
            break;
        }
        sum = checksum(checksum(sum, &frame[..8]), &frame[24..]);
        if sum != (word(&frame, 16), word(&frame, 20)) {
            break;
        }
        if word(&frame, 0) == 1 {
            pending = Header::parse(&frame[24..]);
        }
        if word(&frame, 4) != 0 {
            committed = pending.or(committed);
            pending = None;
        }
    }
    Ok(committed)
}

/// Decides whose the database at `path` is from its bytes alone, with
/// nothing opened for writing and no file made beside it: a connection
/// SQLite opens read-write would create `-wal` and `-shm` files, or roll
/// back another program's unfinished transaction (its hot `-journal`),
/// before a word of the file is read.
///
/// Ours by its [`APPLICATION_ID`], or new (no file, or an empty one), it
/// may be opened. With no id, the tables are looked at through a
/// connection SQLite opens `immutable`: that one reads the database file
/// alone, and so is trusted only where the file alone is the database.
/// A log whose last page 1 has another schema than the file's (its
/// changes not yet copied back), an unfinished transaction's `-journal`,
/// or a log beside an empty file: without an id, these are refused,
/// rather than have SQLite apply them to a file that may be another
/// program's. A presenced never leaves those but for a crash in the middle
/// of an upgrade; opening the file once with `sqlite3` settles them.
///
/// Returns `None` for a file that is not an SQLite database at all, which
/// the ordinary open finds corrupt and moves aside.
fn belonging_on_disk(path: &Path) -> Result<Option<Belonging>, StoreError> {
    use std::io::Read;
    let mut page = Vec::with_capacity(100);
    match std::fs::File::open(path) {
        Ok(file) => {
            file.take(100).read_to_end(&mut page)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let in_file = if page.is_empty() {
        None
    } else {
        match Header::parse(&page) {
            Some(header) => Some(header),
            None => return Ok(None),
        }
    };
    let in_wal = header_in_wal(&paths::sibling(path, "-wal"))?;
    let not_ours = |why: &str| {
        Err(StoreError::NotOurs {
            path: path.to_owned(),
            why: why.to_owned(),
        })
    };
    let Some(header) = in_wal.or(in_file) else {
        return Ok(Some(Belonging::New));
    };
    if header.application_id == APPLICATION_ID {
        return Ok(Some(Belonging::Ours));
    }
    if header.application_id != 0 {
        return not_ours(&format!(
            "its application_id is {:#010x}, not presenced's {APPLICATION_ID:#010x}",
            header.application_id
        ));
    }
    let journal = paths::sibling(path, "-journal");
    if std::fs::metadata(&journal).is_ok_and(|meta| meta.len() > 0) {
        return not_ours(&format!(
            "it has no presenced application_id and another program's transaction on it is \
             unfinished ({} is beside it)",
            journal.display()
        ));
    }
    let Some(in_file) = in_file else {
        return not_ours(
            "it has no presenced application_id, and it is empty but for a write-ahead log",
        );
    };
    if in_file.schema_cookie != header.schema_cookie {
        return not_ours(
            "it has no presenced application_id, and its write-ahead log holds changes to its \
             tables not yet in the file; open it once with sqlite3 if it is one of ours",
        );
    }
    let db = Connection::open_with_flags(
        immutable_uri(path),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_URI
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    belonging_of(&db, path, header).map(Some)
}

/// `file:PATH?mode=ro&immutable=1`, the path's bytes escaped as a URI
/// wants them.
fn immutable_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut uri = String::from("file:");
    for &byte in path.as_os_str().as_bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri.push_str("?mode=ro&immutable=1");
    uri
}

/// Whose a database file is, as read from it before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Belonging {
    /// No tables and no version: a new file, made ours.
    New,
    /// It carries presenced's [`APPLICATION_ID`].
    Ours,
    /// Written by a presenced from before the id: one of our versions,
    /// with exactly that version's tables. Upgraded, and given the id.
    OursWithoutId,
}

/// Decides whether the database at `path` is presenced's, by reading its
/// header and its list of tables. Anything else is another program's, and
/// is refused (`NotOurs`) before a byte of it changes.
fn belonging(db: &Connection, path: &Path) -> Result<Belonging, StoreError> {
    let header = Header {
        application_id: db.pragma_query_value(None, "application_id", |row| row.get(0))?,
        user_version: db.pragma_query_value(None, "user_version", |row| row.get(0))?,
        schema_cookie: 0,
    };
    belonging_of(db, path, header)
}

/// [`belonging`], with the id and version from `header`, the tables from
/// `db`.
fn belonging_of(db: &Connection, path: &Path, header: Header) -> Result<Belonging, StoreError> {
    let Header {
        application_id,
        user_version: version,
        ..
    } = header;
    if application_id == APPLICATION_ID {
        return Ok(Belonging::Ours);
    }
    let not_ours = |why: String| {
        Err(StoreError::NotOurs {
            path: path.to_owned(),
            why,
        })
    };
    if application_id != 0 {
        return not_ours(format!(
            "its application_id is {application_id:#010x}, not presenced's {APPLICATION_ID:#010x}"
        ));
    }
    // SQLite's own tables (sqlite_sequence, sqlite_stat1, ...) say nothing
    // about whose the file is.
    let objects: Vec<(String, String)> = db
        .prepare(
            "SELECT type, name FROM sqlite_schema
             WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY type DESC, name",
        )?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    if objects.is_empty() && version == 0 {
        return Ok(Belonging::New);
    }
    let holds = || {
        let listed: Vec<String> = objects
            .iter()
            .map(|(kind, name)| format!("{kind} {name}"))
            .collect();
        if listed.is_empty() {
            "no tables".to_owned()
        } else {
            listed.join(", ")
        }
    };
    let tables: &[(&str, &[&str])] = match version {
        1 => &[
            ("counters", COUNTERS_COLUMNS),
            ("presences", PRESENCES_COLUMNS),
        ],
        2..=4 => &[
            ("counters", COUNTERS_COLUMNS),
            ("events", EVENTS_COLUMNS_BEFORE_5),
            ("presences", PRESENCES_COLUMNS),
        ],
        SCHEMA_VERSION => &[
            ("counters", COUNTERS_COLUMNS),
            ("events", EVENTS_COLUMNS),
            ("presences", PRESENCES_COLUMNS),
        ],
        _ => {
            return not_ours(format!(
                "it has no presenced application_id, its user_version is {version}, and it \
                 holds {}",
                holds()
            ));
        }
    };
    let expected = |kind: &str, name: &str| match kind {
        "table" => tables.iter().any(|(table, _)| *table == name),
        "index" => OUR_INDEXES.contains(&name),
        _ => false,
    };
    let mut columns_match = true;
    for (table, wanted) in tables {
        let columns: Vec<String> = db
            .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?
            .query_map([table], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        columns_match &= columns
            .iter()
            .map(String::as_str)
            .eq(wanted.iter().copied());
    }
    if !columns_match || !objects.iter().all(|(kind, name)| expected(kind, name)) {
        return not_ours(format!(
            "it has no presenced application_id, and what it holds ({}) is not presenced's \
             schema version {version}",
            holds()
        ));
    }
    Ok(Belonging::OursWithoutId)
}

fn migrate(db: &Connection, belonging: Belonging) -> Result<(), StoreError> {
    let version: i64 = db.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let stamp = match belonging {
        Belonging::Ours => String::new(),
        Belonging::New | Belonging::OursWithoutId => {
            format!("PRAGMA application_id = {APPLICATION_ID};")
        }
    };
    // Every statement in the schema is `IF NOT EXISTS`: it makes a new
    // database, and adds what later versions added to an older one. A
    // version that changes an existing table has steps of its own around
    // it. All of it is one transaction: a failure leaves the old version
    // whole. (Version 1 had no history.)
    let (before, after) = match version {
        0 => (String::new(), ""),
        1 => (FROM_VERSION_2.to_owned(), ""),
        2 => (format!("{FROM_VERSION_2} {HISTORY_ASIDE}"), HISTORY_BACK),
        3 => (HISTORY_ASIDE.to_owned(), HISTORY_BACK),
        4 => (FROM_VERSION_4.to_owned(), ""),
        SCHEMA_VERSION if stamp.is_empty() => return Ok(()),
        SCHEMA_VERSION => {
            // Up to date but for the id, which only spares the next start
            // the look at the tables: a full disk must not stop this one
            // for it. It is given at a later start.
            return match db.execute_batch(&stamp) {
                Err(e) if e.sqlite_error_code() == Some(ErrorCode::DiskFull) => {
                    tracing::warn!("the disk is full; the database gets its application_id later");
                    Ok(())
                }
                done => done.map_err(StoreError::from),
            };
        }
        found => return Err(StoreError::NewerSchema { found }),
    };
    db.execute_batch(&format!(
        "BEGIN; {before} {SCHEMA} {after} PRAGMA user_version = {SCHEMA_VERSION}; {stamp} COMMIT;"
    ))?;
    Ok(())
}

/// A JSON column's text: a meta, or an update's changed fields or removed
/// names, as compact JSON.
fn json_column(value: &(impl serde::Serialize + ?Sized)) -> Result<String, StoreError> {
    Ok(serde_json::to_string(value).map_err(std::io::Error::from)?)
}

/// Keeps the `-wal` and `-shm` files when the database closes, rather
/// than SQLite's default of deleting them after a last checkpoint. A
/// daemon that starts on a full disk can make neither, and without the
/// shared-memory file it cannot open the database in WAL mode at all; kept
/// from the last run, they are reused. What the log holds is checkpointed
/// at close all the same.
fn keep_side_files(db: &Connection) -> rusqlite::Result<()> {
    let mut keep: c_int = 1;
    // SAFETY: the handle is this open connection's, used on this thread
    // only for this call; SQLITE_FCNTL_PERSIST_WAL reads and writes one
    // int, which `keep` is, alive for the whole call.
    let code = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            db.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&raw mut keep).cast(),
        )
    };
    match code {
        rusqlite::ffi::SQLITE_OK => Ok(()),
        code => Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some("keeping the write-ahead log's files".to_owned()),
        )),
    }
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

fn is_not_writable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

/// The files SQLite keeps beside a database in WAL mode.
const SIDE_FILES: [&str; 2] = ["-wal", "-shm"];

/// Moves a corrupt database and its side files out of the way, to
/// `PATH.corrupt-<unix seconds>` (and `…-wal`, `…-shm` beside it), and
/// returns where. Nothing is deleted: whoever looks into the damage may
/// need every file, and a side file left behind would be applied to the new
/// database.
fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = free_aside_name(path, seconds);
    std::fs::rename(path, &aside)?;
    for suffix in SIDE_FILES {
        match std::fs::rename(paths::sibling(path, suffix), paths::sibling(&aside, suffix)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(aside)
}

/// `PATH.corrupt-<seconds>`, or with `-1`, `-2`, … added when a file of
/// that name (or its side files) is already there: a rename would replace
/// it.
fn free_aside_name(path: &Path, seconds: u64) -> PathBuf {
    let base = paths::sibling(path, &format!(".corrupt-{seconds}"));
    let taken = |candidate: &Path| {
        std::iter::once("")
            .chain(SIDE_FILES)
            .any(|suffix| paths::sibling(candidate, suffix).symlink_metadata().is_ok())
    };
    let mut candidate = base.clone();
    let mut n = 0;
    while taken(&candidate) {
        n += 1;
        candidate = paths::sibling(&base, &format!("-{n}"));
    }
    candidate
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{HistoryReply, HistoryRequest};

    fn entry(seq: u64) -> Entry {
        Entry {
            topic: "t".into(),
            key: "alice".into(),
            seq,
            phx_ref: format!("p{seq}"),
            prev_ref: None,
            meta: serde_json::json!({"file": "a.md"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            joined_at: 1000 + seq as i64,
            process: ProcessId {
                pid: 42,
                start_time: 7,
            },
            uid: 1000,
            user: "alice".into(),
            lifetime: Lifetime::Process,
            token_hash: [seq as u8; 32],
            conn: None,
            resume_deadline: None,
            cluster: None,
        }
    }

    #[test]
    fn committed_rows_and_counter_survive_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let mut store = Store::open(&path, "boot-a".into()).unwrap();
        store
            .commit(
                &[
                    Change::Put(Box::new(entry(1))),
                    Change::Put(Box::new(entry(2))),
                    Change::Delete("p1".into()),
                ],
                3,
            )
            .unwrap();
        drop(store);

        let store = Store::open(&path, "boot-b".into()).unwrap();
        let (rows, next_seq) = store.load().unwrap();
        assert_eq!(next_seq, 3 + SEQ_RESERVATION, "the reservation");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].entry, entry(2));
        assert_eq!(rows[0].boot_id, "boot-a");
    }

    #[test]
    fn seqs_are_reserved_in_blocks_and_a_reopen_continues_above_all_handed_out() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let mut store = Store::open(&path, "boot".into()).unwrap();
        store.commit(&[Change::Put(Box::new(entry(1)))], 2).unwrap();
        let before = store.wal_frames();
        store.commit(&[Change::Put(Box::new(entry(2)))], 3).unwrap();
        assert_eq!(
            store.wal_frames() - before,
            1,
            "within the reservation, a track writes its row's page and no counter"
        );
        // Past the first reservation: a new one is written with the commit.
        let past = 2 + SEQ_RESERVATION;
        store
            .commit(&[Change::Put(Box::new(entry(past)))], past + 1)
            .unwrap();
        drop(store);

        let (rows, next_seq) = Store::open(&path, "boot".into()).unwrap().load().unwrap();
        let highest = rows.iter().map(|r| r.entry.seq).max().unwrap();
        assert_eq!(highest, past);
        assert!(next_seq > highest, "{next_seq} continues above {highest}");
    }

    #[test]
    fn commits_never_checkpoint_and_checkpoint_if_due_restarts_the_log() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let mut store = Store::open(&path, "boot".into()).unwrap();
        // One commit of a row is a frame or two: past the threshold after
        // a thousand or so, where SQLite's own automatic checkpoint would
        // have restarted the log.
        let mut seq = 1;
        while store.wal_frames() < 2 * CHECKPOINT_FRAMES {
            store
                .commit(&[Change::Put(Box::new(entry(seq)))], seq + 1)
                .unwrap();
            seq += 1;
            assert!(
                seq < 10_000,
                "the log never grew to {CHECKPOINT_FRAMES} frames"
            );
        }

        store.checkpoint_if_due();
        store
            .commit(&[Change::Put(Box::new(entry(seq)))], seq + 1)
            .unwrap();
        assert!(
            store.wal_frames() < 10,
            "the log starts over after a checkpoint: {} frames",
            store.wal_frames()
        );
        let (rows, _) = store.load().unwrap();
        assert_eq!(rows.len() as u64, seq);
    }

    fn unix_seconds() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_with_its_side_files_and_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        std::fs::write(&path, vec![0xA5; 8192]).unwrap();
        std::fs::write(paths::sibling(&path, "-wal"), "old wal").unwrap();
        std::fs::write(paths::sibling(&path, "-shm"), "old shm").unwrap();
        let earliest = unix_seconds();

        let store = Store::open(&path, "boot".into()).unwrap();

        let aside = store.recovered_from().unwrap().to_owned();
        let name = aside.file_name().unwrap().to_str().unwrap();
        let seconds: u64 = name.strip_prefix("p.db.corrupt-").unwrap().parse().unwrap();
        assert!((earliest..=unix_seconds()).contains(&seconds), "{name}");
        assert_eq!(std::fs::read(&aside).unwrap(), vec![0xA5; 8192]);
        assert_eq!(
            std::fs::read_to_string(paths::sibling(&aside, "-wal")).unwrap(),
            "old wal"
        );
        // SQLite rebuilds the shared-memory index as it opens, so only its
        // name is checked.
        assert!(paths::sibling(&aside, "-shm").exists());
        assert_eq!(store.load().unwrap().0.len(), 0);
    }

    #[test]
    fn a_corrupt_file_never_replaces_one_moved_aside_before() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let first = paths::sibling(&path, ".corrupt-100");
        assert_eq!(free_aside_name(&path, 100), first);
        std::fs::write(&first, "first").unwrap();
        assert_eq!(free_aside_name(&path, 100), paths::sibling(&first, "-1"));
        // A side file left from another recovery counts too.
        std::fs::write(paths::sibling(&first, "-1-wal"), "wal").unwrap();
        assert_eq!(free_aside_name(&path, 100), paths::sibling(&first, "-2"));
    }

    #[test]
    fn a_commit_that_fails_keeps_nothing_and_the_next_one_works() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let mut store = Store::open(&path, "boot".into()).unwrap();
        store.commit(&[Change::Put(Box::new(entry(1)))], 2).unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();

        let started = std::time::Instant::now();
        let failed = store.commit(
            &[Change::Put(Box::new(entry(2))), Change::Delete("p1".into())],
            3,
        );

        // The commit waits the short run-time timeout, not the one for
        // opening: the core must not be held up for long.
        assert!(started.elapsed() < OPEN_BUSY_TIMEOUT / 2);
        match failed {
            Err(StoreError::Locked { path: named }) => assert_eq!(named, path),
            other => panic!("expected Locked, got {other:?}"),
        }
        assert!(store.db.is_autocommit(), "no transaction is left open");
        other.execute_batch("ROLLBACK").unwrap();
        let (rows, next_seq) = store.load().unwrap();
        let reserved = 2 + SEQ_RESERVATION;
        assert_eq!((rows.len(), rows[0].entry.seq, next_seq), (1, 1, reserved));
        store.commit(&[Change::Put(Box::new(entry(2)))], 3).unwrap();
        assert_eq!(store.load().unwrap().0.len(), 2);
    }

    #[test]
    fn a_second_store_on_the_same_database_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let _first = Store::open(&path, "boot".into()).unwrap();
        let second = Store::open(&path, "boot".into());
        assert!(matches!(second, Err(StoreError::InUse { .. })));
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        // A newer presenced's database carries our id.
        let newer = Connection::open(&path).unwrap();
        newer
            .pragma_update(None, "application_id", APPLICATION_ID)
            .unwrap();
        newer.pragma_update(None, "user_version", 99).unwrap();
        drop(newer);
        assert!(matches!(
            Store::open(&path, "boot".into()),
            Err(StoreError::NewerSchema { found: 99 })
        ));
    }

    fn application_id(db: &Connection) -> i32 {
        db.pragma_query_value(None, "application_id", |row| row.get(0))
            .unwrap()
    }

    /// Opens a database that `make` fills, which must be refused as not
    /// ours with its bytes as they were.
    fn refused_as_not_ours(make: &str) -> String {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(make)
            .unwrap();
        let before = std::fs::read(&path).unwrap();
        let refused = Store::open(&path, "boot".into());
        assert_eq!(std::fs::read(&path).unwrap(), before, "bytes untouched");
        match refused {
            Err(StoreError::NotOurs { why, .. }) => why,
            Err(other) => panic!("expected NotOurs, got {other}"),
            Ok(_) => panic!("expected NotOurs, got a store"),
        }
    }

    #[test]
    fn a_closed_store_leaves_its_write_ahead_files_for_the_next_start() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let mut store = Store::open(&path, "boot".into()).unwrap();
        store.commit(&[Change::Put(Box::new(entry(1)))], 2).unwrap();
        drop(store);
        for suffix in SIDE_FILES {
            assert!(paths::sibling(&path, suffix).exists(), "{suffix} is kept");
        }
        // Checkpointed all the same: another program reads the row from
        // the database file alone.
        std::fs::remove_file(paths::sibling(&path, "-wal")).unwrap();
        std::fs::remove_file(paths::sibling(&path, "-shm")).unwrap();
        let (rows, _) = Store::open(&path, "boot".into()).unwrap().load().unwrap();
        assert_eq!(rows.len(), 1);
    }

    #[test]
    fn a_new_database_carries_the_application_id() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let store = Store::open(&path, "boot".into()).unwrap();
        assert_eq!(application_id(&store.db), APPLICATION_ID);
    }

    #[test]
    fn a_database_of_another_program_is_not_ours() {
        let why = refused_as_not_ours("CREATE TABLE notes (body TEXT);");
        assert!(why.contains("table notes"), "{why}");
        // With one of our version numbers, but not our tables.
        let why = refused_as_not_ours("CREATE TABLE notes (body TEXT); PRAGMA user_version = 4;");
        assert!(why.contains("schema version 4"), "{why}");
        // A version no presenced wrote.
        let why = refused_as_not_ours("PRAGMA user_version = 99;");
        assert!(why.contains("user_version is 99"), "{why}");
        let why = refused_as_not_ours("PRAGMA application_id = 7;");
        assert!(why.contains("0x00000007"), "{why}");
    }

    /// A copy of the database at `path` and its write-ahead log, taken
    /// while they are open: what a daemon killed now would leave.
    fn as_left_by_a_crash(path: &Path, copy: &Path) {
        std::fs::copy(path, copy).unwrap();
        std::fs::copy(paths::sibling(path, "-wal"), paths::sibling(copy, "-wal")).unwrap();
    }

    fn header_in_file(path: &Path) -> Header {
        Header::parse(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn a_new_database_whose_id_is_still_in_its_log_is_ours() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let mut store = Store::open(&path, "boot".into()).unwrap();
        store.commit(&[Change::Put(Box::new(entry(1)))], 2).unwrap();
        let crashed = tmp.path().join("crashed.db");
        as_left_by_a_crash(&path, &crashed);
        drop(store);

        assert_eq!(
            header_in_file(&crashed).application_id,
            0,
            "not checkpointed"
        );
        assert_eq!(belonging_on_disk(&crashed).unwrap(), Some(Belonging::Ours));
        let (rows, _) = Store::open(&crashed, "boot".into())
            .unwrap()
            .load()
            .unwrap();
        assert_eq!(rows.len(), 1);
    }

    /// One of our databases from before the id, still open by a daemon
    /// that wrote `then` into its log.
    fn before_the_id_with_in_its_log(then: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        drop(Store::open(&path, "boot".into()).unwrap());
        let old = Connection::open(&path).unwrap();
        old.execute_batch("PRAGMA application_id = 0; PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
        old.execute_batch(&format!("PRAGMA wal_autocheckpoint = 0; {then}"))
            .unwrap();
        let crashed = tmp.path().join("crashed.db");
        as_left_by_a_crash(&path, &crashed);
        (tmp, crashed)
    }

    #[test]
    fn rows_in_the_log_of_a_database_from_before_the_id_do_not_hide_it() {
        let (_tmp, crashed) = before_the_id_with_in_its_log(
            "INSERT INTO counters (name, value) VALUES ('next_seq', 77);",
        );
        assert_eq!(
            belonging_on_disk(&crashed).unwrap(),
            Some(Belonging::OursWithoutId)
        );
        let store = Store::open(&crashed, "boot".into()).unwrap();
        assert_eq!(store.load().unwrap().1, 77, "the log's rows are kept");
        assert_eq!(application_id(&store.db), APPLICATION_ID);
    }

    #[test]
    fn tables_changed_in_the_log_of_a_file_without_the_id_are_refused_untouched() {
        let (_tmp, crashed) = before_the_id_with_in_its_log("CREATE TABLE notes (body TEXT);");
        let wal = paths::sibling(&crashed, "-wal");
        let before = (
            std::fs::read(&crashed).unwrap(),
            std::fs::read(&wal).unwrap(),
        );
        match Store::open(&crashed, "boot".into()) {
            Err(StoreError::NotOurs { why, .. }) => assert!(why.contains("log"), "{why}"),
            Err(other) => panic!("expected NotOurs, got {other}"),
            Ok(_) => panic!("expected NotOurs, got a store"),
        }
        let after = (
            std::fs::read(&crashed).unwrap(),
            std::fs::read(&wal).unwrap(),
        );
        assert!(before == after, "the file and its log are untouched");
        assert!(!paths::sibling(&crashed, "-shm").exists());
        assert!(!paths::sibling(&crashed, ".lock").exists());
    }

    /// Today's database, its id taken away as before the id existed, then
    /// changed by `change` and opened again: what opening gave, and
    /// whether the file was left byte for byte as it was.
    struct WithoutTheId {
        _tmp: tempfile::TempDir,
        opened: Result<Store, StoreError>,
        untouched: bool,
    }

    fn reopened_without_the_id(change: &str) -> WithoutTheId {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        drop(Store::open(&path, "boot".into()).unwrap());
        let db = Connection::open(&path).unwrap();
        db.execute_batch(&format!(
            "PRAGMA application_id = 0; {change} PRAGMA journal_mode = DELETE;"
        ))
        .unwrap();
        drop(db);
        let before = std::fs::read(&path).unwrap();
        let opened = Store::open(&path, "boot".into());
        let untouched = std::fs::read(&path).unwrap() == before;
        WithoutTheId {
            _tmp: tmp,
            opened,
            untouched,
        }
    }

    /// Asserts that `change` makes a database presenced refuses, untouched.
    fn assert_not_ours(change: &str) -> String {
        let reopened = reopened_without_the_id(change);
        match reopened.opened {
            Err(StoreError::NotOurs { why, .. }) if reopened.untouched => why,
            Err(StoreError::NotOurs { .. }) => panic!("{change}: refused, but changed"),
            Err(other) => panic!("{change}: expected NotOurs, got {other}"),
            Ok(_) => panic!("{change}: expected NotOurs, got a store"),
        }
    }

    #[test]
    fn our_tables_with_something_more_or_other_columns_are_not_ours() {
        assert!(
            reopened_without_the_id("").opened.is_ok(),
            "our own tables, before the id"
        );
        for extra in [
            "CREATE TABLE notes (body TEXT);",
            "CREATE VIEW everyone AS SELECT user FROM presences;",
            "ALTER TABLE counters ADD COLUMN note TEXT;",
        ] {
            assert_not_ours(extra);
        }
    }

    /// Version 4's `events`: today's without `changed` and `removed`.
    const EVENTS_OF_VERSION_4: &str = "
        DROP TABLE events;
        CREATE TABLE events (id INTEGER PRIMARY KEY, at INTEGER NOT NULL,
            topic TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind = 'join' OR kind = 'leave' OR kind = 'update' OR kind = 'owner'),
            key TEXT NOT NULL, ref TEXT NOT NULL, pid INTEGER NOT NULL,
            user TEXT NOT NULL, reason TEXT) STRICT;";

    fn columns(db: &Connection, table: &str) -> Vec<String> {
        db.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
            .unwrap()
            .query_map([table], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// A presenced from before the id, at version 4, left a database like
    /// this: its events without `changed` and `removed`. It is ours, and
    /// is upgraded, given the columns and the id, its history kept.
    #[test]
    fn a_version_4_database_without_the_id_is_upgraded_and_given_it() {
        let reopened = reopened_without_the_id(&format!(
            "{EVENTS_OF_VERSION_4}
             INSERT INTO events (at, topic, kind, key, ref, pid, user, reason)
                 VALUES (5, 'doc', 'leave', 'alice', 'p1', 42, 'alice', 'closed');
             PRAGMA user_version = 4;"
        ));
        let store = reopened.opened.expect("ours");
        let version: i64 = store
            .db
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(application_id(&store.db), APPLICATION_ID);
        assert_eq!(columns(&store.db, "events"), EVENTS_COLUMNS);
        let history = store
            .history_readers()
            .unwrap()
            .history(&HistoryRequest::default())
            .unwrap();
        let kept: Vec<_> = history
            .events
            .iter()
            .map(|event| (event.key.as_str(), event.reason, event.changed.as_ref()))
            .collect();
        assert_eq!(kept, [("alice", Some(LeaveReason::Closed), None)]);
    }

    /// Without the id, the version must match the tables: version 4 with
    /// version 5's events, or version 5 with version 4's, is no presenced's
    /// database, and is left as it is.
    #[test]
    fn a_version_and_events_of_another_version_are_not_ours() {
        let why = assert_not_ours("PRAGMA user_version = 4;");
        assert!(why.contains("schema version 4"), "{why}");
        let why = assert_not_ours(EVENTS_OF_VERSION_4);
        assert!(why.contains("schema version 5"), "{why}");
    }

    /// A database holding entry 1, turned back into an older version by
    /// `to_old_version`, then opened again: its row and counter must have
    /// come through. Returns the store and everything in its history.
    fn upgraded_from(to_old_version: &str) -> (tempfile::TempDir, Store, HistoryReply) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        let mut store = Store::open(&path, "boot".into()).unwrap();
        store.commit(&[Change::Put(Box::new(entry(1)))], 2).unwrap();
        drop(store);
        Connection::open(&path)
            .unwrap()
            .execute_batch(to_old_version)
            .unwrap();

        let store = Store::open(&path, "boot".into()).unwrap();
        let (rows, next_seq) = store.load().unwrap();
        assert_eq!((rows.len(), next_seq), (1, 2 + SEQ_RESERVATION));
        let history = store
            .history_readers()
            .unwrap()
            .history(&HistoryRequest::default())
            .unwrap();
        (tmp, store, history)
    }

    #[test]
    fn a_version_1_database_gains_the_history_and_keeps_its_rows() {
        // What version 1 looked like: no history table.
        let (_tmp, store, history) = upgraded_from("DROP TABLE events; PRAGMA user_version = 1;");
        assert!(history.events.is_empty());
        let version: i64 = store
            .db
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_version_2_database_moves_to_fewer_b_trees_and_keeps_its_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        // Version 2's layout, with one presence, its counter and an event.
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE presences (
                 ref TEXT PRIMARY KEY, topic TEXT NOT NULL, key TEXT NOT NULL,
                 seq INTEGER NOT NULL UNIQUE, prev_ref TEXT, meta TEXT NOT NULL,
                 joined_at INTEGER NOT NULL, pid INTEGER NOT NULL,
                 pid_start_time INTEGER NOT NULL, uid INTEGER NOT NULL, user TEXT NOT NULL,
                 lifetime TEXT NOT NULL, resume_token_hash BLOB NOT NULL, boot_id TEXT NOT NULL
             ) STRICT;
             CREATE INDEX presences_by_topic ON presences (topic, seq);
             CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
             CREATE TABLE events (id INTEGER PRIMARY KEY, at INTEGER NOT NULL,
                 topic TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
                 ref TEXT NOT NULL, pid INTEGER NOT NULL, user TEXT NOT NULL,
                 reason TEXT) STRICT;
             CREATE INDEX events_by_topic ON events (topic, id);
             CREATE INDEX events_by_time ON events (at);
             INSERT INTO presences VALUES ('p1', 'doc', 'alice', 1, NULL, '{}', 5, 42, 7, 1000,
                 'alice', 'process', x'00', 'boot');
             INSERT INTO counters VALUES ('next_seq', 2);
             INSERT INTO events (at, topic, kind, key, ref, pid, user)
                 VALUES (5, 'doc', 'join', 'alice', 'p1', 42, 'alice');
             PRAGMA user_version = 2;",
        )
        .unwrap();
        drop(old);

        let store = Store::open(&path, "boot".into()).unwrap();
        let (rows, next_seq) = store.load().unwrap();
        assert_eq!((rows.len(), next_seq), (1, 2));
        assert_eq!(rows[0].entry.phx_ref, "p1");
        let history = store
            .history_readers()
            .unwrap()
            .history(&HistoryRequest::default())
            .unwrap();
        assert_eq!(history.events.len(), 1);
        let indexes = index_names(&store.db);
        assert!(indexes.is_empty(), "no index is left: {indexes:?}");
        assert_eq!(application_id(&store.db), APPLICATION_ID, "given the id");
    }

    #[test]
    fn a_version_4_database_gains_the_meta_change_of_updates() {
        let (_tmp, mut store, history) = upgraded_from(&format!(
            "{EVENTS_OF_VERSION_4}
             INSERT INTO events (id, at, topic, kind, key, ref, pid, user, reason)
                 VALUES (3, 5, 'doc', 'update', 'alice', 'p2', 42, 'alice', NULL);
             PRAGMA user_version = 4;"
        ));
        let old = &history.events[0];
        assert_eq!(
            (old.kind, old.changed.as_ref(), old.removed.as_ref()),
            (crate::protocol::HistoryKind::Update, None, None)
        );
        let changed = serde_json::json!({"saves": 2});
        let update = crate::protocol::HistoryEvent {
            changed: changed.as_object().cloned(),
            removed: Some(vec!["line".to_owned()]),
            phx_ref: "p3".into(),
            at: 6,
            ..old.clone()
        };
        store
            .commit(&[Change::History(Box::new(update.clone()))], 4)
            .unwrap();
        let history = store
            .history_readers()
            .unwrap()
            .history(&HistoryRequest::default())
            .unwrap();
        assert_eq!(history.events, [old.clone(), update]);
    }

    fn index_names(db: &Connection) -> Vec<String> {
        db.prepare("SELECT name FROM sqlite_schema WHERE type = 'index' ORDER BY name")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_version_3_database_moves_its_history_to_the_cheaper_table() {
        // Version 3 had today's presences and counters; its history had an
        // index on topic, and an IN list in the CHECK.
        let (_tmp, store, history) = upgraded_from(
            "DROP TABLE events;
             CREATE TABLE events (id INTEGER PRIMARY KEY, at INTEGER NOT NULL,
                 topic TEXT NOT NULL,
                 kind TEXT NOT NULL CHECK (kind IN ('join', 'leave', 'update', 'owner')),
                 key TEXT NOT NULL, ref TEXT NOT NULL, pid INTEGER NOT NULL,
                 user TEXT NOT NULL, reason TEXT) STRICT;
             CREATE INDEX events_by_topic ON events (topic, id);
             INSERT INTO events (id, at, topic, kind, key, ref, pid, user, reason)
                 VALUES (7, 5, 'doc', 'join', 'alice', 'p1', 42, 'alice', NULL),
                        (9, 6, 'doc', 'leave', 'bob', 'p0', 43, 'bob', 'closed');
             PRAGMA user_version = 3;
             PRAGMA application_id = 0;",
        );
        assert_eq!(application_id(&store.db), APPLICATION_ID, "given the id");
        let kept: Vec<(&str, Option<LeaveReason>)> = history
            .events
            .iter()
            .map(|e| (e.key.as_str(), e.reason))
            .collect();
        assert_eq!(kept, [("alice", None), ("bob", Some(LeaveReason::Closed))]);
        let ids: Vec<i64> = store
            .db
            .prepare("SELECT id FROM events ORDER BY id")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, [7, 9], "ids, the history's order, are kept");
        let indexes = index_names(&store.db);
        assert!(indexes.is_empty(), "no index is left: {indexes:?}");
        let bad_kind = store.db.execute(
            "INSERT INTO events (at, topic, kind, key, ref, pid, user) \
             VALUES (1, 'doc', 'jion', 'k', 'p', 1, 'u')",
            [],
        );
        assert!(bad_kind.is_err(), "the CHECK on kind still holds");
    }
}
