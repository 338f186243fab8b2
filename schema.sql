-- The presenced database. The schema version lives in PRAGMA user_version;
-- src/core/store.rs applies this file to a new database and refuses one
-- written by a newer version. PRAGMA application_id is 0x50525344
-- ("PRSD"): a file without it is taken for presenced's only if its version
-- and tables are exactly one of ours (see `belonging` in store.rs).

-- One row per tracked presence. Rows outlive the daemon so that a restart
-- loses nobody's place in a topic's queue. Keyed by ref alone (WITHOUT
-- ROWID) and with no other index: the daemon reads the table whole at
-- start and writes it by ref, and every b-tree more is a page more to
-- write at each commit. Seqs are unique within a topic: the daemon hands
-- each out once, and a topic shared across hosts takes its seqs from etcd's
-- create revisions instead, which may equal another topic's.
CREATE TABLE IF NOT EXISTS presences (
    ref               TEXT    PRIMARY KEY,          -- phx_ref, new on every update
    topic             TEXT    NOT NULL,
    key               TEXT    NOT NULL,
    seq               INTEGER NOT NULL,             -- join order; lowest live seq owns the topic
    prev_ref          TEXT,                         -- phx_ref_prev after an update
    meta              TEXT    NOT NULL,             -- the client's meta, a JSON object
    joined_at         INTEGER NOT NULL,             -- unix milliseconds
    pid               INTEGER NOT NULL,             -- the owning process
    pid_start_time    INTEGER NOT NULL,             -- its start time, to catch pid reuse
    uid               INTEGER NOT NULL,             -- from the peer's credentials
    user              TEXT    NOT NULL,
    lifetime          TEXT    NOT NULL CHECK (lifetime IN ('connection', 'process')),
    resume_token_hash BLOB    NOT NULL,             -- SHA-256; the token itself is never stored
    boot_id           TEXT    NOT NULL              -- the boot the process belongs to
) STRICT, WITHOUT ROWID;

-- Counters that must survive restarts: `next_seq` keeps seqs and refs from
-- ever being reused.
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- What happened on each topic, for `presence log`: every join, leave (with
-- its reason), update and change of owner. Written in the same transaction
-- as the change itself, and pruned to a bounded age and size, oldest ids
-- first (ids grow with time, so no index on `at` is needed).
--
-- Writing it must stay cheap, since every change writes a row. So there is
-- no index at all: each insert is an append at the end of one b-tree, where
-- an index on topic would dirty a page somewhere in the middle of another
-- for each event. Instead the daemon remembers the id, time and topic of
-- every event in the table (src/core/store/history.rs), and a read for one
-- topic fetches that topic's rows by id, never walking the table. And the
-- CHECK on `kind` is a chain of ORs: SQLite tests an IN list of more than
-- two values by building a temporary table, once for every row inserted.
CREATE TABLE IF NOT EXISTS events (
    id     INTEGER PRIMARY KEY,                  -- grows with each event; the order
    at     INTEGER NOT NULL,                     -- unix milliseconds
    topic  TEXT    NOT NULL,
    kind   TEXT    NOT NULL CHECK (kind = 'join' OR kind = 'leave' OR kind = 'update' OR kind = 'owner'),
    key    TEXT    NOT NULL,
    ref    TEXT    NOT NULL,                     -- for an update, the new ref
    pid    INTEGER NOT NULL,
    user   TEXT    NOT NULL,
    reason TEXT,                                 -- why a leave happened
    changed TEXT,                                -- an update's added or changed meta fields, a JSON object of about 1 KiB at most
    removed TEXT                                 -- an update's removed meta fields, a JSON array of names
) STRICT;
