//! When the database fails: a full disk at run time costs the changes of
//! the moment, never a row and never the daemon, and reads keep answering
//! with what is committed; a full disk at start does not keep the daemon
//! down; a corrupt database is moved aside; a database the daemon cannot
//! use at start is one clear line and exit status 1.
//!
//! The full-disk and unwritable-folder tests need root, to mount a small
//! tmpfs and to run as the unprivileged uid 65534. CI runs as root; there
//! they fail without it, elsewhere they say they were skipped.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{RawConnection, Running, error_code, next_event, presence_bin, within};
use presenced::client::Client;
use presenced::protocol::{Event, ListAllReply, Role, StatusReply, TrackRequest};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const NOBODY: u32 = 65534;

/// Whether the test may do what needs root. Without root it is skipped,
/// except in CI, where being skipped would hide that it never ran.
fn running_as_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI must run it"
    );
    eprintln!("skipped {test}: needs root");
    false
}

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

/// A daemon on a given database whose log the test reads, to know when it
/// has tried, and failed, to save something. The core logs at debug level,
/// so that every failed commit, not only the first of an outage, and the
/// recovery are seen.
struct LoggedDaemon {
    socket: PathBuf,
    db: PathBuf,
    _socket_dir: tempfile::TempDir,
    child: Child,
    log: UnboundedReceiver<String>,
}

impl LoggedDaemon {
    async fn start(db: &Path) -> LoggedDaemon {
        let socket_dir = tempfile::tempdir().expect("temporary folder");
        let socket = socket_dir.path().join("run/presenced.sock");
        let (child, log) = LoggedDaemon::spawn(&socket, db).await;
        LoggedDaemon {
            socket,
            db: db.to_owned(),
            _socket_dir: socket_dir,
            child,
            log,
        }
    }

    /// Starts the daemon and returns it with its log lines, which a task
    /// reads all along, so that a full pipe can never stall the daemon.
    async fn spawn(socket: &Path, db: &Path) -> (Child, UnboundedReceiver<String>) {
        let mut child = Command::new(presence_bin())
            .arg("--socket")
            .arg(socket)
            .arg("daemon")
            .arg("--db")
            .arg(db)
            .args(["--ready-on-stdout", "--resume-grace", "60"])
            .env("PRESENCE_LOG", "warn,presenced::core=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the daemon spawns");
        let stdout = child.stdout.take().expect("piped stdout");
        let ready = within("the daemon to listen", async {
            BufReader::new(stdout).lines().next_line().await
        })
        .await;
        assert_eq!(ready.ok().flatten().as_deref(), Some("ready"));
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let (lines, log) = unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                eprintln!("daemon: {line}");
                let _ = lines.send(line);
            }
        });
        (child, log)
    }

    /// Stops the daemon with SIGTERM, checks that it exits 0, and starts
    /// another on the same socket and database.
    async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Stops the daemon with SIGTERM and checks that it exits 0.
    async fn stop(&mut self) {
        common::signal(
            self.child.id().expect("running"),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = within("the daemon to exit", self.child.wait()).await;
        assert_eq!(status.expect("wait").code(), Some(0));
    }

    /// Starts a daemon again on the same socket and database.
    async fn start_again(&mut self) {
        (self.child, self.log) = LoggedDaemon::spawn(&self.socket, &self.db).await;
    }

    /// Reads the log until a line satisfies `wanted`, and returns it.
    async fn log_line(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        within(what, async {
            loop {
                let line = self.log.recv().await;
                let line = line.unwrap_or_else(|| panic!("the log ended before {what}"));
                if wanted(&line) {
                    return line;
                }
            }
        })
        .await
    }

    async fn client(&self) -> (Client, presenced::client::Events) {
        within("connecting a client", Client::connect(&self.socket))
            .await
            .expect("client connects")
    }

    /// `presence ARGS` aimed at this daemon, with its output read line by
    /// line.
    fn spawn_presence(&self, args: &[&str]) -> Running {
        Running::spawn(
            Command::new(presence_bin())
                .arg("--socket")
                .arg(&self.socket)
                .arg("--no-autostart")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true),
        )
    }
}

async fn list_all(client: &Client) -> ListAllReply {
    within("list", client.list_all()).await.expect("list")
}

async fn status(client: &Client) -> StatusReply {
    within("status", client.status()).await.expect("status")
}

/// How many rows the database holds, as a fresh connection sees it.
fn rows_on_disk(db: &Path) -> i64 {
    let connection = rusqlite::Connection::open(db).expect("open the database");
    connection
        .query_row("SELECT count(*) FROM presences", [], |row| row.get(0))
        .expect("count the rows")
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test]
async fn a_full_disk_fails_changes_but_loses_nothing_and_the_daemon_recovers() {
    if !running_as_root("a_full_disk_fails_changes_but_loses_nothing") {
        return;
    }
    let disk = SmallDisk::mount();
    let mut daemon = LoggedDaemon::start(&disk.path().join("state/presence.db")).await;
    let mut owner = daemon.spawn_presence(&["join", "doc", "--key", "owner"]);
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
    let mut raw = RawConnection::connect(&daemon.socket).await;
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
        .log_line("the owner's departure to fail to commit", |line| {
            line.contains("commit failed")
                && line.contains("1 closed connection")
                && line.contains("1 exited process")
        })
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

    daemon.restart().await;
    let (reader, _events) = daemon.client().await;
    assert_eq!(list_all(&reader).await, before_restart);
}

#[tokio::test]
async fn a_restart_on_a_full_disk_starts_and_hides_the_rows_of_processes_gone() {
    if !running_as_root("a_restart_on_a_full_disk_starts") {
        return;
    }
    let disk = SmallDisk::mount();
    let db = disk.path().join("state/presence.db");
    let mut daemon = LoggedDaemon::start(&db).await;
    let mut sleeper = common::spawn_sleeper();
    let mut raw = RawConnection::connect(&daemon.socket).await;
    let track = format!(
        r#"{{"op":"track","id":1,"topic":"doc","key":"gone","pid":{},"lifetime":"process"}}"#,
        sleeper.id().expect("running")
    );
    assert_eq!(raw.request(&track).await["ok"], true);
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

    daemon.start_again().await;
    daemon
        .log_line("the stale row's delete to fail", |line| {
            line.contains("commit failed") && line.contains("1 stale row")
        })
        .await;
    let (client, _events) = daemon.client().await;
    assert!(
        list_all(&client).await.topics.is_empty(),
        "the row of a process gone is never shown"
    );
    assert_eq!(rows_on_disk(&db), 1, "the delete waits for room");

    std::fs::remove_file(&filler).expect("remove the filler");
    drop(reader);
    daemon
        .log_line("the delete to be saved", |line| {
            line.contains("the database takes commits again")
        })
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

    let mut daemon = LoggedDaemon::start(&db).await;

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
    daemon
        .log_line("an error naming the moved file", |line| {
            line.contains("ERROR")
                && line.contains("is corrupt")
                && line.contains(&moved.display().to_string())
        })
        .await;
    within("track", client.track(TrackRequest::new("doc", "fresh")))
        .await
        .expect("the new database takes writes");
}

/// Runs `presence daemon` where it must refuse to start, and returns what
/// it said on stderr, which must be one line.
async fn refused_start(command: &mut Command) -> String {
    let output = within(
        "the daemon to refuse",
        command.env("PRESENCE_LOG", "warn").output(),
    )
    .await
    .expect("presence runs");
    assert_eq!(output.status.code(), Some(1), "the daemon should refuse");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

fn daemon_command(binary: &Path, socket: &Path, db: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("--socket")
        .arg(socket)
        .arg("daemon")
        .arg("--db")
        .arg(db);
    command
}

#[tokio::test]
async fn a_database_locked_by_another_program_stops_the_start_with_its_path() {
    let mut daemon = common::Daemon::start().await;
    common::signal(daemon.pid(), nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait().await, Some(0));
    // As `sqlite3` would, in a transaction left open.
    let locker = rusqlite::Connection::open(&daemon.db).expect("open the database");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("lock the database");

    let stderr = refused_start(&mut daemon_command(
        Path::new(presence_bin()),
        &daemon.socket,
        &daemon.db,
    ))
    .await;

    assert!(
        stderr.contains(&daemon.db.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("locked by another program"), "{stderr}");
    assert!(stderr.contains("close that program"), "{stderr}");
}

#[tokio::test]
async fn a_database_folder_the_daemon_cannot_write_stops_the_start_with_its_path() {
    if !running_as_root("a_database_folder_the_daemon_cannot_write") {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary folder");
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown");
    // A copy of the binary that uid 65534 can run wherever the checkout is.
    let binary = dir.path().join("presence");
    std::fs::copy(presence_bin(), &binary).expect("copy the binary");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("create the folder");
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).expect("chown");
    // Private, as the daemon wants it, but not writable.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o500)).expect("chmod");

    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(&binary)
        .arg("--socket")
        .arg(dir.path().join("run/presenced.sock"))
        .arg("daemon")
        .arg("--db")
        .arg(state.join("presence.db"));
    let stderr = refused_start(&mut command).await;

    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains("point --db elsewhere"), "{stderr}");
}
