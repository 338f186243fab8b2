//! The core's thread against a real store: batches, failed commits and
//! their recovery, start and stop.

use std::sync::mpsc;

use serde_json::json;

use super::*;
use crate::core::MAX_BATCH;
use crate::core::registry::{Change, Op, TokenHash, Track};
use crate::protocol::{GetByKeyRequest, TrackRequest};

const WAIT: Duration = Duration::from_secs(10);
/// How long SQLite waits on the test's lock before a commit fails.
const BUSY: Duration = Duration::from_millis(20);

/// Hands the test each line a connection is sent, and `"closed"` when
/// the core closes it.
struct TestOutlet(mpsc::Sender<Value>);

impl Outlet for TestOutlet {
    fn deliver(&self, line: Line) {
        let _ = self.0.send(serde_json::from_slice(&line.bytes).unwrap());
    }

    fn close(&self) {
        let _ = self.0.send(json!("closed"));
    }

    fn queued_bytes(&self) -> usize {
        0
    }
}

/// A database in a temporary folder, and a way for the test to lock it
/// as another program would.
struct TestDb {
    path: PathBuf,
    dir: tempfile::TempDir,
}

impl TestDb {
    fn new() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        TestDb {
            path: dir.path().join("p.db"),
            dir,
        }
    }

    fn open(&self, boot_id: &str) -> Store {
        let store = Store::open(&self.path, boot_id.into()).unwrap();
        store.set_busy_timeout(BUSY);
        store
    }

    fn start_core(&self) -> CoreThread {
        self.start_core_on(self.open("boot")).unwrap()
    }

    fn start_core_with_max_batch(&self, max_batch: usize) -> CoreThread {
        self.start_on(self.open("boot"), max_batch).unwrap()
    }

    fn start_core_on(&self, store: Store) -> Result<CoreThread, StoreError> {
        self.start_on(store, MAX_BATCH)
    }

    fn start_on(&self, store: Store, max_batch: usize) -> Result<CoreThread, StoreError> {
        let info = DaemonInfo {
            socket: self.dir.path().join("s.sock"),
            started: Instant::now(),
            pid_watch: "test".into(),
            started_by: "foreground".into(),
        };
        let grace = Duration::from_secs(10);
        CoreThread::start(store, Limits::default(), "boot", grace, info, max_batch)
    }

    /// Takes the database's write lock, as a `sqlite3` shell in a
    /// transaction would; commits fail until it is dropped.
    fn lock(&self) -> rusqlite::Connection {
        let locker = rusqlite::Connection::open(&self.path).unwrap();
        locker.execute_batch("BEGIN IMMEDIATE").unwrap();
        locker
    }

    fn rows(&self) -> Vec<String> {
        let db = rusqlite::Connection::open(&self.path).unwrap();
        let mut query = db
            .prepare("SELECT key FROM presences ORDER BY seq")
            .unwrap();
        query
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

fn open(conn: ConnId) -> (Command, mpsc::Receiver<Value>) {
    let (lines, receiver) = mpsc::channel();
    let command = Command::Open {
        conn,
        peer: Peer {
            pid: 4000 + conn as u32,
            uid: 1000,
            user: "alice".into(),
        },
        outlet: Box::new(TestOutlet(lines)),
    };
    (command, receiver)
}

fn request(conn: ConnId, id: u64, request: Resolved) -> Command {
    Command::Request {
        conn,
        id: json!(id),
        request,
    }
}

fn presence(conn: ConnId, id: u64, op: Op) -> Command {
    request(conn, id, Resolved::Presence(op))
}

fn token_hash(key: &str) -> TokenHash {
    let mut hash = [0; 32];
    let bytes = key.as_bytes();
    hash[..bytes.len()].copy_from_slice(bytes);
    hash
}

fn track_for(conn: ConnId, id: u64, key: &str, lifetime: Lifetime) -> Command {
    let track = Track {
        request: TrackRequest {
            topic: "doc".into(),
            key: key.into(),
            meta: serde_json::Map::new(),
            pid: None,
            lifetime,
            subscribe: false,
        },
        process: ProcessId {
            pid: 4000 + conn as u32,
            start_time: 1,
        },
        token_hash: token_hash(key),
        token: format!("token-{key}"),
    };
    presence(conn, id, Op::Track(track))
}

fn track(conn: ConnId, id: u64, key: &str) -> Command {
    track_for(conn, id, key, Lifetime::Connection)
}

fn resume(conn: ConnId, id: u64, key: &str) -> Command {
    let tokens = vec![(format!("token-{key}"), token_hash(key))];
    presence(conn, id, Op::Resume(tokens))
}

/// Runs the commands through the core as one batch, as the thread does
/// with commands that arrive together, and commits it.
fn run_batch(core: &mut CoreThread, commands: Vec<Command>) {
    let (sender, waiting) = mpsc::channel();
    let mut commands = commands.into_iter();
    let first = commands.next().expect("a command");
    commands.for_each(|command| sender.send(command).unwrap());
    let now = read_clocks();
    core.take_batch(now, first, &waiting);
    core.commit_and_release(now);
}

/// Whether facts that failed commits held back wait to be saved (the
/// tests here have no restored entries, the core's other timer).
fn facts_waiting(core: &CoreThread) -> bool {
    core.core.poll_timeout().is_some()
}

/// Runs the commands, which must end with a shutdown, through the
/// thread's own loop as one batch, and returns how it stopped.
fn run_to_stop(core: CoreThread, commands: Vec<Command>) -> Exit {
    let (sender, waiting) = mpsc::channel();
    commands.into_iter().for_each(|c| sender.send(c).unwrap());
    core.run(waiting)
}

fn connect(core: &mut CoreThread, conn: ConnId) -> mpsc::Receiver<Value> {
    let (command, lines) = open(conn);
    run_batch(core, vec![command]);
    lines
}

fn shutdown() -> Command {
    Command::Shutdown {
        reason: "test".into(),
    }
}

/// The lines a connection has been sent and not yet taken.
fn sent(lines: &mpsc::Receiver<Value>) -> Vec<Value> {
    lines.try_iter().collect()
}

fn next_line(lines: &mpsc::Receiver<Value>) -> Value {
    lines.recv_timeout(WAIT).expect("a line")
}

fn keys_listed(reply: &Value) -> Vec<&str> {
    let presences = reply["presences"].as_object().unwrap();
    presences.keys().map(String::as_str).collect()
}

#[test]
fn reads_in_a_failed_batch_show_only_what_is_committed() {
    let db = TestDb::new();
    let mut core = db.start_core();
    let owner = connect(&mut core, 1);
    let reader = connect(&mut core, 2);
    run_batch(&mut core, vec![track(1, 1, "first")]);
    assert_eq!(sent(&owner)[0]["ok"], true);

    let _locker = db.lock();
    let by_key = GetByKeyRequest {
        topic: "doc".into(),
        key: "first".into(),
    };
    run_batch(
        &mut core,
        vec![
            // Its effect, the owner leaving, is not saved: no read may
            // show it.
            Command::Close {
                conn: 1,
                exited: false,
            },
            track(2, 2, "second"),
            request(2, 3, Resolved::Status),
            presence(2, 4, Op::List(Some("doc".into()))),
            presence(2, 5, Op::GetByKey(by_key)),
            presence(2, 6, Op::Subscribe("doc".into())),
            request(2, 7, Resolved::Ping),
        ],
    );

    assert!(facts_waiting(&core), "the close waits to be saved");
    let lines = sent(&reader);
    let ids: Vec<Value> = lines.iter().map(|line| line["id"].clone()).collect();
    let expected = [
        json!(2),
        json!(3),
        json!(4),
        json!(5),
        json!(6),
        Value::Null,
        json!(7),
    ];
    assert_eq!(
        ids, expected,
        "every reply in its place, the subscribe's state after it: {lines:?}"
    );
    assert_eq!(lines[0]["error"]["code"], "internal");
    let status = &lines[1];
    assert_eq!(
        (&status["entries"], &status["subscriptions"]),
        (&json!(1), &json!(0))
    );
    assert_eq!(keys_listed(&lines[2]), ["first"]);
    assert_eq!(lines[3]["metas"].as_array().unwrap().len(), 1);
    assert_eq!(lines[4]["ok"], true);
    assert_eq!(lines[5]["event"], "presence_state");
    let state: Vec<&String> = lines[5]["payload"].as_object().unwrap().keys().collect();
    assert_eq!(state, ["first"]);
    assert_eq!(lines[6]["ok"], true);
    assert_eq!(
        sent(&owner),
        [json!("closed")],
        "closed at once, told nothing"
    );
    assert_eq!(db.rows(), ["first"]);
}

#[test]
fn a_close_still_waiting_is_applied_before_the_next_batch_that_commits() {
    let db = TestDb::new();
    let mut core = db.start_core();
    let _owner = connect(&mut core, 1);
    let newcomer = connect(&mut core, 2);
    run_batch(&mut core, vec![track(1, 1, "owner")]);
    let locker = db.lock();
    run_batch(
        &mut core,
        vec![Command::Close {
            conn: 1,
            exited: false,
        }],
    );
    assert!(facts_waiting(&core), "the close waits to be saved");
    drop(locker);

    // Straight away, within the retry pause: the close goes first.
    run_batch(&mut core, vec![track(2, 2, "late")]);

    let reply = next_line(&newcomer);
    assert_eq!(reply["role"], "owner", "{reply}");
    assert_eq!(reply["owner"]["key"], "late", "no ghost owner");
    assert_eq!(db.rows(), ["late"]);
    assert!(!facts_waiting(&core));
}

#[test]
fn a_resume_fails_while_the_close_of_its_entry_waits_then_resumes() {
    let db = TestDb::new();
    let mut core = db.start_core();
    let _first = connect(&mut core, 1);
    let second = connect(&mut core, 2);
    let tracks = vec![
        track_for(1, 1, "kept", Lifetime::Process),
        // So that the close deletes a row, and has something to save.
        track(1, 2, "gone"),
    ];
    run_batch(&mut core, tracks);
    let locker = db.lock();
    run_batch(
        &mut core,
        vec![Command::Close {
            conn: 1,
            exited: false,
        }],
    );
    assert!(facts_waiting(&core), "the close waits to be saved");

    run_batch(&mut core, vec![resume(2, 3, "kept")]);
    let refused = next_line(&second);
    assert_eq!(
        refused["error"]["code"], "internal",
        "not expired: {refused}"
    );

    drop(locker);
    run_batch(&mut core, vec![resume(2, 4, "kept")]);
    let resumed = next_line(&second);
    assert_eq!(resumed["resumed"], json!(["p1"]), "{resumed}");
}

#[test]
fn a_stop_after_a_failed_request_is_clean_when_nothing_waits_to_be_saved() {
    let db = TestDb::new();
    let mut core = db.start_core();
    let client = connect(&mut core, 1);
    let _locker = db.lock();

    let stopped = run_to_stop(core, vec![track(1, 1, "lost"), shutdown()]);

    assert!(
        matches!(stopped, Exit::Stopped(Stopped::Shutdown)),
        "{stopped:?}"
    );
    assert_eq!(next_line(&client)["error"]["code"], "internal");
    assert_eq!(next_line(&client)["event"], "shutdown");
}

#[test]
fn a_stop_with_facts_still_unsaved_fails_and_keeps_the_committed_rows() {
    let db = TestDb::new();
    let mut core = db.start_core();
    let client = connect(&mut core, 1);
    run_batch(&mut core, vec![track(1, 1, "kept")]);
    assert_eq!(next_line(&client)["ok"], true);
    let _locker = db.lock();

    let commands = vec![
        track(1, 2, "lost"),
        Command::Close {
            conn: 1,
            exited: false,
        },
        shutdown(),
    ];
    let stopped = run_to_stop(core, commands);

    let Exit::Stopped(Stopped::Unsaved(cause)) = &stopped else {
        panic!("{stopped:?}");
    };
    assert!(
        matches!(
            cause.cause().downcast_ref::<StoreError>(),
            Some(StoreError::Locked { .. })
        ),
        "{cause:?}"
    );
    assert_eq!(next_line(&client)["error"]["code"], "internal");
    assert_eq!(db.rows(), ["kept"]);
}

/// An entry of this very process, which is running.
fn live_entry() -> Entry {
    let pid = std::process::id();
    Entry {
        topic: "doc".into(),
        key: "alive".into(),
        seq: 1,
        phx_ref: "p1".into(),
        prev_ref: None,
        meta: serde_json::Map::new(),
        joined_at: 1,
        process: ProcessId {
            pid,
            start_time: crate::sys::process_start_time(pid).unwrap(),
        },
        uid: 1000,
        user: "alice".into(),
        lifetime: Lifetime::Process,
        token_hash: token_hash("alive"),
        conn: None,
        resume_deadline: None,
    }
}

#[test]
fn a_start_with_nothing_to_remove_writes_nothing() {
    let db = TestDb::new();
    let put = Change::Put(Box::new(live_entry()));
    db.open("boot").commit(&[put], 2).unwrap();
    let store = db.open("boot");
    // Any commit would fail now.
    let _locker = db.lock();

    let core = db.start_core_on(store).unwrap();

    assert_eq!(core.core.counts().entries, 1);
    assert!(!facts_waiting(&core), "nothing was written, nothing failed");
}

#[test]
fn a_start_that_cannot_delete_stale_rows_hides_them_and_deletes_them_later() {
    let db = TestDb::new();
    let put = Change::Put(Box::new(live_entry()));
    db.open("an earlier boot").commit(&[put], 2).unwrap();
    let store = db.open("boot");
    let locker = db.lock();

    let mut core = db.start_core_on(store).expect("the daemon starts anyway");

    assert_eq!(core.core.counts().entries, 0, "the stale row is not shown");
    assert!(facts_waiting(&core), "its deletion waits to be saved");
    drop(locker);
    assert_eq!(db.rows(), ["alive"], "still on disk");
    // Past the retry pause, as the thread's wait would be.
    let later = Now {
        at: Instant::now() + Duration::from_secs(1),
        wall_ms: crate::sys::now_millis(),
    };
    core.core.handle_timeout(later);
    core.commit_and_release(later);
    assert!(db.rows().is_empty());
    assert!(!facts_waiting(&core));
}

#[test]
fn a_failed_commit_reveals_nothing_and_the_close_is_retried_while_idle() {
    let db = TestDb::new();
    let mut core = db.start_core();
    let owner = connect(&mut core, 1);
    let watcher = connect(&mut core, 2);
    run_batch(&mut core, vec![presence(2, 1, Op::Subscribe("doc".into()))]);
    run_batch(&mut core, vec![track(1, 2, "first")]);
    assert_eq!(sent(&watcher).len(), 3, "reply, state, diff");
    let locker = db.lock();
    run_batch(
        &mut core,
        vec![Command::Close {
            conn: 1,
            exited: false,
        }],
    );
    assert!(facts_waiting(&core), "the close waits to be saved");
    assert_eq!(
        sent(&owner).last(),
        Some(&json!("closed")),
        "closed at once"
    );
    let (commands, waiting) = mpsc::channel();
    let core = std::thread::spawn(move || core.run(waiting));

    drop(locker);
    // Nobody asks anything: the core retries the close by itself, and
    // only then tells the watcher.
    let diff = next_line(&watcher);
    assert_eq!(diff["event"], "presence_diff");
    assert_eq!(diff["reasons"], json!({"p1": "closed"}));
    assert!(db.rows().is_empty());
    commands.send(shutdown()).unwrap();
    assert!(matches!(
        core.join().unwrap(),
        Exit::Stopped(Stopped::Shutdown)
    ));
}

/// Commands that arrive together share one transaction, up to the batch
/// limit; with a limit of one, every change is a transaction of its own.
#[test]
fn changes_that_arrive_together_share_a_transaction() {
    let tracks = |conn| (0..100).map(move |i| track(conn, i, &format!("k{i}")));
    let db = TestDb::new();
    let mut core = db.start_core();
    let lines = connect(&mut core, 1);
    let before = core.store.commits();
    run_batch(&mut core, tracks(1).collect());
    assert_eq!(core.store.commits() - before, 1);
    assert_eq!(sent(&lines).len(), 100, "every track answered");

    let db = TestDb::new();
    let mut core = db.start_core_with_max_batch(1);
    let _lines = connect(&mut core, 1);
    let before = core.store.commits();
    // The batch closes after each command; the rest wait for later ones.
    let (sender, waiting) = mpsc::channel();
    tracks(1).for_each(|command| sender.send(command).unwrap());
    while let Ok(command) = waiting.try_recv() {
        let now = read_clocks();
        core.take_batch(now, command, &waiting);
        core.commit_and_release(now);
    }
    assert_eq!(core.store.commits() - before, 100);
    assert_eq!(db.rows().len(), 100);
}

#[test]
fn closes_that_arrive_together_are_announced_together() {
    let db = TestDb::new();
    let mut core = db.start_core();
    let queue: Vec<_> = (1..=4).map(|conn| connect(&mut core, conn)).collect();
    let watcher = connect(&mut core, 5);
    let mut joins: Vec<Command> = (1..=4)
        .map(|conn| track(conn, 1, &format!("k{conn}")))
        .collect();
    joins.push(presence(5, 1, Op::Subscribe("doc".into())));
    run_batch(&mut core, joins);
    queue
        .iter()
        .chain([&watcher])
        .for_each(|lines| drop(sent(lines)));

    // Three owners in a row go at once; then, in the same batch, the
    // last in line asks who is there.
    let closes = (1..=3).map(|conn| Command::Close {
        conn,
        exited: false,
    });
    let list = presence(4, 2, Op::List(Some("doc".into())));
    run_batch(&mut core, closes.chain([list]).collect());

    let last = sent(&queue[3]);
    let roles: Vec<&Value> = last.iter().filter(|l| l["event"] == "role").collect();
    assert_eq!(
        roles.len(),
        1,
        "one role event, for the final owner: {last:?}"
    );
    assert_eq!(roles[0]["payload"]["role"], "owner");
    let listed = last.iter().find(|l| l["id"] == 2).expect("the list reply");
    assert_eq!(
        keys_listed(listed),
        ["k4"],
        "the closes apply before the list"
    );

    let diffs: Vec<Value> = sent(&watcher)
        .into_iter()
        .filter(|l| l["event"] == "presence_diff")
        .collect();
    assert_eq!(diffs.len(), 1, "one diff for the three leaves: {diffs:?}");
    let leaves = diffs[0]["payload"]["leaves"].as_object().unwrap();
    assert_eq!(leaves.len(), 3);
    assert_eq!(diffs[0]["reasons"].as_object().unwrap().len(), 3);
}
