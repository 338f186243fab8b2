//! When the database fails: a full disk at run time costs the changes of
//! the moment, never a row and never the daemon, and reads keep answering
//! with what is committed; a full disk at start does not keep the daemon
//! down; a corrupt database is moved aside; a database the daemon cannot
//! use at start is one clear line and exit status 1.
//!
//! The full-disk and unwritable-folder tests need root, to mount a small
//! tmpfs and to run as the unprivileged uid 65534: they are ignored unless
//! asked for (`--ignored`, as `.ci/run` does as root), and asked for
//! without root they fail saying so.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::{
    self, Daemon, NOBODY, Options, RawConnection, as_nobody, binary_for_nobody, error_code,
    next_event, refused_start, refused_start_by, rows_on_disk, within,
};
use presenced::client::Client;
use presenced::protocol::{Event, ListAllReply, Role, StatusReply, TrackRequest};

/// A tmpfs of a few pages, mounted on a temporary folder for the test's
/// database and unmounted when dropped, pass or fail.
struct SmallDisk {
    mount_point: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> SmallDisk {
        let mount_point = tempfile::tempdir().expect("temporary folder");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "presence-test"])
            .arg(mount_point.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs failed");
        SmallDisk { mount_point }
    }

    fn path(&self) -> &Path {
        self.mount_point.path()
    }

    /// Writes a file until the disk has no room left, and returns it.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).expect("create the filler");
        // Large writes first, then single pages, so that not one page is
        // left over for the database.
        for chunk in [vec![0u8; 64 * 1024], vec![0u8; 4096]] {
            while file.write_all(&chunk).is_ok() {}
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: the daemon may still hold its files open while it dies.
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(self.path())
            .status();
    }
}

/// The arguments of every daemon here: a long grace, so that the clients
/// of a daemon that restarts keep their places.
const DAEMON_ARGS: &[&str] = &["--resume-grace", "60"];

/// A daemon on a given database whose log the test reads, to know when it
/// has tried, and failed, to save something. The core logs at debug level,
/// so that every failed commit, not only the first of an outage, and the
/// recovery are seen.
async fn logged_daemon(db: &Path) -> Daemon {
    Daemon::start_with_options(Options {
        db: Some(db),
        log: Some("warn,presenced::core=debug"),
        args: DAEMON_ARGS,
        ..Options::default()
    })
    .await
}

async fn list_all(client: &Client) -> ListAllReply {
    within("list", client.list_all()).await.expect("list")
}

async fn status(client: &Client) -> StatusReply {
    within("status", client.status()).await.expect("status")
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_full_disk_fails_changes_but_loses_nothing_and_the_daemon_recovers() {
    common::needs_root();
    let disk = SmallDisk::mount();
    let daemon = logged_daemon(&disk.path().join("state/presence.db")).await;
    let mut owner = daemon.spawn(&["join", "doc", "--key", "owner"]);
    assert_eq!(owner.line().await, "owner");
    let (spectator, mut events) = daemon.client().await;
    let waiting = within(
        "track",
        spectator.track(TrackRequest::new("doc", "spectator")),
    )
    .await
    .expect("track");
    assert_eq!(waiting.standing.role, Role::Spectator);
    within("track", spectator.track(TrackRequest::new("notes", "kept")))
        .await
        .expect("track");
    let committed = list_all(&spectator).await;

    let filler = disk.fill();
    let mut raw = daemon.raw().await;
    let refused = raw
        .request(r#"{"op":"track","id":1,"topic":"doc","key":"late"}"#)
        .await;
    assert_eq!(error_code(&refused), "internal");
    let message = refused["error"]["message"].as_str().expect("a message");
    assert!(message.contains("is full"), "the cause is named: {message}");
    assert_eq!(list_all(&spectator).await, committed, "reads still work");

    owner.sigkill();
    owner.exit_code().await;
    // The daemon saw the owner go, and could not save it yet.
    daemon
        .wait_for_log(&["commit failed", "1 closed connection", "1 exited process"])
        .await;
    // Every batch now starts with the owner's departure, which the disk
    // refuses; reads are answered again from what is committed.
    assert_eq!(
        list_all(&spectator).await,
        committed,
        "the registry never shows what the disk does not hold"
    );
    assert_eq!(status(&spectator).await.entries, 3, "status as committed");
    let refused = raw
        .request(r#"{"op":"track","id":2,"topic":"doc","key":"late"}"#)
        .await;
    assert_eq!(error_code(&refused), "internal", "no dead owner: {refused}");

    std::fs::remove_file(&filler).expect("remove the filler");
    // Straight away, most likely within the retry pause: whether the
    // core's own retry or this track's batch saves the departure, it is
    // saved before the track is answered.
    let late = raw
        .request(r#"{"op":"track","id":3,"topic":"doc","key":"late"}"#)
        .await;
    assert_eq!(late["ok"], true, "{late}");
    assert_eq!(late["owner"]["key"], "spectator", "no ghost owner: {late}");
    let promoted = next_event(&mut events, |event| match event {
        Event::Role { payload, .. } if payload.standing.role == Role::Owner => Some(payload),
        _ => None,
    })
    .await;
    assert_eq!(promoted.phx_ref, waiting.phx_ref);
    let before_restart = list_all(&spectator).await;
    assert_eq!(before_restart.topics["doc"].presences.len(), 2);

    let daemon = daemon.restart(DAEMON_ARGS).await;
    let (reader, _events) = daemon.client().await;
    assert_eq!(list_all(&reader).await, before_restart);
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_restart_on_a_full_disk_starts_and_hides_the_rows_of_processes_gone() {
    common::needs_root();
    let disk = SmallDisk::mount();
    let db = disk.path().join("state/presence.db");
    let mut daemon = logged_daemon(&db).await;
    let mut sleeper = common::spawn_sleeper();
    let mut raw = daemon.raw().await;
    track_for_process(&mut raw, "gone", &sleeper).await;
    // A reader that holds its snapshot keeps SQLite from reusing the start
    // of the write-ahead log, so that the next daemon's first write needs
    // room the disk no longer has.
    let reader = rusqlite::Connection::open(&db).expect("open the database");
    reader.execute_batch("BEGIN").expect("begin");
    let seen: i64 = reader
        .query_row("SELECT count(*) FROM presences", [], |row| row.get(0))
        .expect("read");
    assert_eq!(seen, 1);
    daemon.stop().await;
    sleeper.kill().await.expect("kill the sleeper");
    let filler = disk.fill();

    daemon.start_again(DAEMON_ARGS).await;
    // The stale row's delete fails.
    daemon.wait_for_log(&["commit failed", "1 stale row"]).await;
    let (client, _events) = daemon.client().await;
    assert!(
        list_all(&client).await.topics.is_empty(),
        "the row of a process gone is never shown"
    );
    assert_eq!(rows_on_disk(&db), 1, "the delete waits for room");

    std::fs::remove_file(&filler).expect("remove the filler");
    drop(reader);
    // The delete is saved.
    daemon
        .wait_for_log(&["the database takes commits again"])
        .await;
    assert_eq!(rows_on_disk(&db), 0);
    daemon.stop().await;
}

#[tokio::test]
async fn a_corrupt_database_is_moved_aside_whole_and_a_new_one_started() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("create the folder");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let db = state.join("presence.db");
    let garbage = b"not a database, only garbage ".repeat(300);
    std::fs::write(&db, &garbage).expect("write the garbage");
    let earliest = unix_seconds();

    let daemon = logged_daemon(&db).await;

    let (client, _events) = daemon.client().await;
    let recovered = status(&client).await.db_recovered;
    let moved = PathBuf::from(recovered.expect("status names the moved file"));
    assert_eq!(moved.parent(), Some(state.as_path()));
    let name = moved.file_name().and_then(|n| n.to_str()).expect("a name");
    let seconds: u64 = name
        .strip_prefix("presence.db.corrupt-")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("named PATH.corrupt-<seconds>: {name}"));
    assert!((earliest..=unix_seconds()).contains(&seconds), "{name}");
    assert_eq!(std::fs::read(&moved).expect("read it"), garbage);
    // An error naming the moved file.
    daemon
        .wait_for_log(&["ERROR", "is corrupt", &moved.display().to_string()])
        .await;
    within("track", client.track(TrackRequest::new("doc", "fresh")))
        .await
        .expect("the new database takes writes");
}

#[tokio::test]
async fn a_database_locked_by_another_program_stops_the_start_with_its_path() {
    let mut daemon = Daemon::start().await;
    daemon.stop().await;
    // As `sqlite3` would, in a transaction left open.
    let locker = rusqlite::Connection::open(&daemon.db).expect("open the database");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("lock the database");

    let stderr = refused_start(&daemon.socket, &daemon.db).await;

    assert!(
        stderr.contains(&daemon.db.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("locked by another program"), "{stderr}");
    assert!(stderr.contains("close that program"), "{stderr}");
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_database_folder_the_daemon_cannot_write_stops_the_start_with_its_path() {
    common::needs_root();
    let dir = tempfile::tempdir().expect("temporary folder");
    let binary = binary_for_nobody(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("create the folder");
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).expect("chown");
    // Private, as the daemon wants it, but not writable.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o500)).expect("chmod");

    let stderr = refused_start_by(
        as_nobody(&binary),
        &dir.path().join("run/presenced.sock"),
        &state.join("presence.db"),
    )
    .await;

    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains("point --db elsewhere"), "{stderr}");
}

/// A private folder for a database the test makes itself.
fn state_folder(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    std::fs::create_dir(&state).expect("create the folder");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    state
}

/// The SHA-256 of a file's bytes.
fn hash_of(path: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).expect("read the file")).to_vec()
}

/// The files in `folder`, by name.
fn names_in(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .expect("list the folder")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Every file in `folder`, by name, with the hash of its bytes.
fn files_in(folder: &Path) -> Vec<(String, Vec<u8>)> {
    names_in(folder)
        .into_iter()
        .map(|name| {
            let hash = hash_of(&folder.join(&name));
            (name, hash)
        })
        .collect()
}

/// Starts a daemon on `db`, which it must refuse as not its own, and
/// checks that every file in its folder, the database and whatever
/// journal or log is beside it, is as it was, and that none was added:
/// not even the daemon's `.lock`.
async fn refused_as_not_ours(dir: &Path, db: &Path) -> String {
    let folder = db.parent().expect("a folder");
    let before = files_in(folder);

    let stderr = refused_start(&dir.join("run/presenced.sock"), db).await;

    assert!(stderr.contains(&db.display().to_string()), "{stderr}");
    assert!(stderr.contains("not a presenced database"), "{stderr}");
    assert!(stderr.contains("point --db elsewhere"), "{stderr}");
    assert_eq!(
        files_in(folder),
        before,
        "every byte beside it is untouched, and no file is added"
    );
    stderr
}

#[tokio::test]
async fn another_programs_database_in_wal_mode_is_refused_with_no_file_made_beside_it() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let db = state_folder(dir.path()).join("presence.db");
    let theirs = rusqlite::Connection::open(&db).expect("create their database");
    theirs
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE notes (body TEXT);
             INSERT INTO notes VALUES ('remember the milk');",
        )
        .expect("fill it");
    drop(theirs);
    let stderr = refused_as_not_ours(dir.path(), &db).await;
    assert!(stderr.contains("notes"), "{stderr}");

    // And while their program runs, with its last changes in the log
    // only: the log and its index are left as they are.
    let theirs = rusqlite::Connection::open(&db).expect("open their database");
    theirs
        .execute_batch("PRAGMA wal_autocheckpoint = 0; INSERT INTO notes VALUES ('call home');")
        .expect("write to the log");
    for side in ["presence.db-wal", "presence.db-shm"] {
        assert!(db.with_file_name(side).exists(), "{side} is there");
    }
    refused_as_not_ours(dir.path(), &db).await;
    drop(theirs);
}

#[tokio::test]
async fn another_programs_unfinished_transaction_is_not_rolled_back_by_a_refused_start() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).expect("create the folder");
    let theirs_path = scratch.join("theirs.db");
    let theirs = rusqlite::Connection::open(&theirs_path).expect("create their database");
    theirs
        .execute_batch(
            "CREATE TABLE notes (body TEXT);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
             INSERT INTO notes SELECT zeroblob(1000) FROM n;",
        )
        .expect("fill it");
    // A transaction larger than the page cache writes into the file
    // before it commits, and keeps the pages it replaced in its journal:
    // as the program was killed here, it left a hot journal.
    theirs
        .execute_batch(
            "PRAGMA cache_size = 2;
             BEGIN;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
             INSERT INTO notes SELECT zeroblob(1000) FROM n;",
        )
        .expect("write without committing");
    let db = state_folder(dir.path()).join("presence.db");
    std::fs::copy(&theirs_path, &db).expect("copy the file");
    std::fs::copy(
        scratch.join("theirs.db-journal"),
        db.with_file_name("presence.db-journal"),
    )
    .expect("copy the journal");
    drop(theirs);

    let stderr = refused_as_not_ours(dir.path(), &db).await;
    assert!(stderr.contains("presence.db-journal"), "{stderr}");
}

#[tokio::test]
async fn another_programs_sqlite_database_is_refused_with_its_bytes_untouched() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let db = state_folder(dir.path()).join("presence.db");
    // What `--db ~/notes.db` by mistake would find: someone else's data,
    // with no application id and no user_version.
    let theirs = rusqlite::Connection::open(&db).expect("create their database");
    theirs
        .execute_batch(
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);
             INSERT INTO notes (body) VALUES ('remember the milk'), ('call home');",
        )
        .expect("fill it");
    drop(theirs);

    let stderr = refused_as_not_ours(dir.path(), &db).await;
    assert!(stderr.contains("notes"), "what it holds is named: {stderr}");
}

#[tokio::test]
async fn a_database_with_another_application_id_is_refused_even_with_our_tables() {
    let mut daemon = Daemon::start().await;
    daemon.stop().await;
    // Our tables, but stamped as another application's file.
    let theirs = rusqlite::Connection::open(&daemon.db).expect("open the database");
    theirs
        .pragma_update(None, "application_id", 0x4750_4b47)
        .expect("stamp it");
    theirs
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE;")
        .expect("leave one file");
    drop(theirs);

    let stderr = refused_as_not_ours(daemon.dir.path(), &daemon.db).await;
    assert!(stderr.contains("application_id"), "{stderr}");
}

#[tokio::test]
async fn a_database_made_before_the_application_id_is_kept_and_given_it() {
    let mut daemon = Daemon::start().await;
    let mut raw = daemon.raw().await;
    let mut sleeper = common::spawn_sleeper();
    track_for_process(&mut raw, "kept", &sleeper).await;
    drop(raw);
    daemon.stop().await;
    // As a daemon from before the id existed left it.
    let old = rusqlite::Connection::open(&daemon.db).expect("open the database");
    old.pragma_update(None, "application_id", 0)
        .expect("unstamp it");
    drop(old);

    daemon.start_again(&[]).await;

    let (client, _events) = daemon.client().await;
    let listed = list_all(&client).await;
    assert!(
        listed.topics["doc"].presences.contains_key("kept"),
        "{listed:?}"
    );
    let id: i64 = rusqlite::Connection::open(&daemon.db)
        .expect("open the database")
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .expect("read the id");
    // "PRSD": the id is part of the file format, never to change.
    assert_eq!(id, 0x5052_5344);
    sleeper.kill().await.expect("kill the sleeper");
}

#[tokio::test]
async fn a_symlink_at_the_database_lock_stops_the_start_and_what_it_names_is_untouched() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let db = state_folder(dir.path()).join("presence.db");
    let victim = dir.path().join("precious.txt");
    std::fs::write(&victim, "precious\n").expect("write the file");
    let lock = dir.path().join("state/presence.db.lock");
    std::os::unix::fs::symlink(&victim, &lock).expect("plant the link");

    let stderr = refused_start(&dir.path().join("run/presenced.sock"), &db).await;

    assert!(stderr.contains(&lock.display().to_string()), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("read"),
        "precious\n"
    );
}

#[tokio::test]
#[ignore = "needs root: mounts a small tmpfs"]
async fn a_full_disk_after_a_clean_stop_does_not_keep_the_daemon_down() {
    common::needs_root();
    let disk = SmallDisk::mount();
    let db = disk.path().join("state/presence.db");
    let mut daemon = logged_daemon(&db).await;
    let mut sleeper = common::spawn_sleeper();
    let mut raw = daemon.raw().await;
    track_for_process(&mut raw, "kept", &sleeper).await;
    drop(raw);
    // A clean stop: SIGTERM, and no other program holds the database open.
    daemon.stop().await;
    let filler = disk.fill();

    daemon.start_again(DAEMON_ARGS).await;

    let (client, _events) = daemon.client().await;
    let listed = list_all(&client).await;
    assert!(
        listed.topics["doc"].presences.contains_key("kept"),
        "it serves what it has: {listed:?}"
    );
    let history = within("history", client.history(Default::default()))
        .await
        .expect("history is read");
    assert!(!history.events.is_empty());
    let mut raw = daemon.raw().await;
    let refused = raw
        .request(r#"{"op":"track","id":2,"topic":"doc","key":"late"}"#)
        .await;
    assert_eq!(error_code(&refused), "internal", "{refused}");
    let message = refused["error"]["message"].as_str().expect("a message");
    assert!(message.contains("is full"), "the cause is named: {message}");

    std::fs::remove_file(&filler).expect("remove the filler");
    let late = raw
        .request(r#"{"op":"track","id":3,"topic":"doc","key":"late"}"#)
        .await;
    assert_eq!(late["ok"], true, "writes work once there is room: {late}");
    assert_eq!(late["owner"]["key"], "kept", "{late}");
    daemon.stop().await;
    sleeper.kill().await.expect("kill the sleeper");
}

/// Tracks `key` on `doc` as a `process` entry of `sleeper`, which outlives
/// the connection and the daemon.
async fn track_for_process(raw: &mut RawConnection, key: &str, sleeper: &tokio::process::Child) {
    let track = format!(
        r#"{{"op":"track","id":1,"topic":"doc","key":"{key}","pid":{},"lifetime":"process"}}"#,
        sleeper.id().expect("running")
    );
    assert_eq!(raw.request(&track).await["ok"], true);
}
