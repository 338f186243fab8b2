//! The store: the one owner of the SQLite connection. Nothing else in the
//! daemon touches SQL.
//!
//! The database is opened in WAL mode with `synchronous=NORMAL`: a commit
//! survives a crash of the daemon, and what a power loss could take belongs
//! to processes the power loss killed anyway (their boot id no longer
//! matches, so they are cleared at the next start).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Map, Value};

use super::registry::{Change, Entry, ProcessId, TokenHash};
use crate::protocol::Lifetime;

/// The schema, applied to a new database.
const SCHEMA: &str = include_str!("../../schema.sql");

/// The schema version this build writes, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

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
}

impl Store {
    /// Opens (or creates) the database at `path`. A file that is not a
    /// readable SQLite database is moved aside to `PATH.corrupt-<millis>`
    /// and a new one is started, so that a damaged file never keeps the
    /// daemon down; `recovered_from` then names the moved file.
    pub fn open(path: &Path, boot_id: String) -> Result<Store, StoreError> {
        let lock = lock_database(path)?;
        match Self::open_checked(path) {
            Ok(db) => Ok(Store {
                db,
                _lock: lock,
                path: path.to_owned(),
                boot_id,
                recovered_from: None,
            }),
            Err(StoreError::Sqlite(e)) if is_corruption(&e) => {
                let millis = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                let aside = PathBuf::from(format!("{}.corrupt-{millis}", path.display()));
                std::fs::rename(path, &aside)?;
                for suffix in ["-wal", "-shm"] {
                    let side_file = PathBuf::from(format!("{}{suffix}", path.display()));
                    let _ = std::fs::remove_file(side_file);
                }
                tracing::error!(
                    "database {} is corrupt ({e}); moved it to {} and started a new one",
                    path.display(),
                    aside.display()
                );
                let db = Self::open_checked(path)?;
                Ok(Store {
                    db,
                    _lock: lock,
                    path: path.to_owned(),
                    boot_id,
                    recovered_from: Some(aside),
                })
            }
            Err(e) => Err(e),
        }
    }

    fn open_checked(path: &Path) -> Result<Connection, StoreError> {
        let db = Connection::open(path)?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let check: String = db.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        if check != "ok" {
            return Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(check),
            )));
        }
        migrate(&db)?;
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn recovered_from(&self) -> Option<&Path> {
        self.recovered_from.as_deref()
    }

    /// Every persisted entry and the seq counter.
    pub fn load(&self) -> Result<(Vec<StoredEntry>, u64), StoreError> {
        let mut statement = self.db.prepare(
            "SELECT ref, topic, key, seq, prev_ref, meta, joined_at, pid, pid_start_time, uid,
                    user, lifetime, resume_token_hash, boot_id
             FROM presences ORDER BY seq",
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
                },
                boot_id: row.get(13)?,
            })
        })?;
        let entries = rows.collect::<Result<Vec<_>, _>>()?;
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

    /// Applies a batch of changes and the seq counter in one transaction.
    /// Many operations share one commit: this is the group commit that
    /// keeps the daemon fast under load.
    pub fn commit(&mut self, changes: &[Change], next_seq: u64) -> Result<(), StoreError> {
        let tx = self.db.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO presences
                   (ref, topic, key, seq, prev_ref, meta, joined_at, pid, pid_start_time, uid,
                    user, lifetime, resume_token_hash, boot_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM presences WHERE ref = ?1")?;
            for change in changes {
                match change {
                    Change::Put(entry) => {
                        put.execute(params![
                            entry.phx_ref,
                            entry.topic,
                            entry.key,
                            entry.seq as i64,
                            entry.prev_ref,
                            Value::Object(entry.meta.clone()).to_string(),
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
                }
            }
            tx.execute(
                "INSERT INTO counters (name, value) VALUES ('next_seq', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                params![next_seq as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Takes the exclusive lock `PATH.lock`.
fn lock_database(path: &Path) -> Result<std::fs::File, StoreError> {
    let lock = PathBuf::from(format!("{}.lock", path.display()));
    match crate::sys::take_pid_lock(&lock)? {
        crate::sys::PidLock::Taken(file) => Ok(file),
        crate::sys::PidLock::HeldBy(holder) => Err(StoreError::InUse { lock, holder }),
    }
}

fn migrate(db: &Connection) -> Result<(), StoreError> {
    let version: i64 = db.pragma_query_value(None, "user_version", |row| row.get(0))?;
    match version {
        0 => {
            db.execute_batch(&format!(
                "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))?;
            Ok(())
        }
        SCHEMA_VERSION => Ok(()),
        found => Err(StoreError::NewerSchema { found }),
    }
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(next_seq, 3);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].entry, entry(2));
        assert_eq!(rows[0].boot_id, "boot-a");
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("p.db");
        std::fs::write(&path, vec![0xA5; 8192]).unwrap();
        let store = Store::open(&path, "boot".into()).unwrap();
        let aside = store.recovered_from().unwrap().to_owned();
        assert!(aside.exists());
        assert_eq!(store.load().unwrap().0.len(), 0);
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
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        assert!(matches!(
            Store::open(&path, "boot".into()),
            Err(StoreError::NewerSchema { found: 99 })
        ));
    }
}
