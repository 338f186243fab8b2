//! The core's driver against a real store and a real lock: what the
//! core's own tests (`core/tests/`) cannot show, since they make up the
//! commits and the time. Start with rows the store cannot delete, a stop
//! with facts unsaved, retries on the driver's own thread, and group
//! commit as the driver takes what is queued.

use std::sync::mpsc;

use serde_json::{Value, json};

use super::*;
use crate::core::registry::Change;
use crate::core::tests::harness::{token_hash, track_for};
use crate::core::{Input, MAX_BATCH};
use crate::ops::Op;
use crate::ops::subscribe::Subscription;
use crate::protocol::Empty;

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

    fn start_core(&self) -> Driver {
        self.start_core_on(self.open("boot")).unwrap()
    }

    fn start_core_with_max_batch(&self, max_batch: usize) -> Driver {
        self.start_on(self.open("boot"), max_batch).unwrap()
    }

    fn start_core_on(&self, store: Store) -> Result<Driver, StoreError> {
        self.start_on(store, MAX_BATCH)
    }

    fn start_on(&self, store: Store, max_batch: usize) -> Result<Driver, StoreError> {
        let info = DaemonInfo {
            socket: self.dir.path().join("s.sock"),
            started: Instant::now(),
            pid_watch: "test".into(),
            started_by: "foreground".into(),
        };
        let grace = Duration::from_secs(10);
        Driver::start(
            store,
            Limits::default(),
            "boot",
            grace,
            info,
            max_batch,
            None,
        )
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
        outlet: std::sync::Arc::new(TestOutlet(lines)),
    };
    (command, receiver)
}

fn request(conn: ConnId, id: u64, request: Op) -> Command {
    Input::Request {
        conn,
        id: json!(id),
        request,
    }
    .into()
}

fn presence(conn: ConnId, id: u64, op: Op) -> Command {
    request(conn, id, op)
}

fn track(conn: ConnId, id: u64, key: &str) -> Command {
    track_for(conn, id, key, Lifetime::Connection).into()
}

/// Runs the commands through the core as one batch, as the driver does
/// with commands queued together, and commits it.
fn run_batch(core: &mut Driver, commands: Vec<Command>) {
    let mut queued = VecDeque::from(commands);
    core.run_batch(read_clocks(), &mut queued);
    assert!(queued.is_empty(), "the batch had room for every command");
}

/// Whether facts that failed commits held back wait to be saved (the
/// tests here have no restored entries, the core's other timer).
fn facts_waiting(core: &Driver) -> bool {
    core.core.poll_timeout().is_some()
}

/// Queues the commands, which must end with a shutdown, runs them as the
/// daemon does, and returns how the core stopped.
fn run_to_stop(core: Driver, commands: Vec<Command>) -> Stopped {
    let (handle, stopped) = CoreHandle::start(core).unwrap();
    for command in commands {
        handle.queue(command).unwrap();
    }
    handle.drive();
    stopped.blocking_recv().expect("the core stops")
}

fn connect(core: &mut Driver, conn: ConnId) -> mpsc::Receiver<Value> {
    let (command, lines) = open(conn);
    run_batch(core, vec![command]);
    lines
}

fn shutdown() -> Command {
    Input::Shutdown {
        reason: "test".into(),
    }
    .into()
}

/// The lines a connection has been sent and not yet taken.
fn sent(lines: &mpsc::Receiver<Value>) -> Vec<Value> {
    lines.try_iter().collect()
}

fn next_line(lines: &mpsc::Receiver<Value>) -> Value {
    lines.recv_timeout(WAIT).expect("a line")
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
        Input::Close {
            conn: 1,
            exited: false,
        }
        .into(),
        shutdown(),
    ];
    let stopped = run_to_stop(core, commands);

    let Stopped::Unsaved(cause) = &stopped else {
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
        cluster: None,
    }
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
        boot: crate::sys::BootInstant::now().since_boot(),
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
    run_batch(
        &mut core,
        vec![presence(
            2,
            1,
            Op::Subscribe(Subscription::Topic("doc".into())),
        )],
    );
    run_batch(&mut core, vec![track(1, 2, "first")]);
    assert_eq!(sent(&watcher).len(), 3, "reply, state, diff");
    let locker = db.lock();
    run_batch(
        &mut core,
        vec![
            Input::Close {
                conn: 1,
                exited: false,
            }
            .into(),
        ],
    );
    assert!(facts_waiting(&core), "the close waits to be saved");
    assert_eq!(
        sent(&owner).last(),
        Some(&json!("closed")),
        "closed at once"
    );
    let (core, stopped) = CoreHandle::start(core).unwrap();

    drop(locker);
    // Nobody asks anything: the core retries the close by itself, and
    // only then tells the watcher.
    let diff = next_line(&watcher);
    assert_eq!(diff["event"], "presence_diff");
    assert_eq!(diff["reasons"], json!({"p1": "closed"}));
    assert!(db.rows().is_empty());
    core.send(shutdown()).unwrap();
    assert!(matches!(stopped.blocking_recv(), Ok(Stopped::Shutdown)));
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
    let mut queued: VecDeque<Command> = tracks(1).collect();
    while !queued.is_empty() {
        core.run_batch(read_clocks(), &mut queued);
    }
    assert_eq!(core.store.commits() - before, 100);
    assert_eq!(db.rows().len(), 100);
}

/// The core hands out a `status` reply's registry figures; the thread
/// completes it with the store's and its own, counting the transactions
/// before the status's own batch.
#[test]
fn a_status_reply_is_completed_with_the_store_and_the_thread() {
    let db = TestDb::new();
    let mut core = db.start_core();
    let lines = connect(&mut core, 1);
    let before = core.store.commits();
    run_batch(
        &mut core,
        vec![track(1, 1, "first"), request(1, 2, Op::Status(Empty {}))],
    );

    let status = &sent(&lines)[1];
    assert_eq!(status["id"], 2, "{status}");
    assert_eq!(status["entries"], 1);
    assert_eq!(status["transactions"], before);
    assert_eq!(status["db"], db.path.display().to_string());
    assert_eq!(status["pid_watch"], "test");
    assert_eq!(status["outbound_bytes"], 0);
    assert_eq!(core.store.commits(), before + 1);
}

/// The history is trimmed after a batch whose lines are out, whether or
/// not it needed a commit: a restarted daemon that only answers reads
/// trims it at once, not at its first change.
#[test]
fn a_start_trims_the_history_at_its_first_batch_even_without_a_commit() {
    let db = TestDb::new();
    let mut first = db.start_core();
    let _lines = connect(&mut first, 1);
    run_batch(
        &mut first,
        (0..5).map(|i| track(1, i, &format!("k{i}"))).collect(),
    );
    drop(first);
    let events = |db: &TestDb| -> i64 {
        let read = rusqlite::Connection::open(&db.path).unwrap();
        read.query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .unwrap()
    };
    assert_eq!(events(&db), 6, "a join each, and the first owner");

    let mut store = db.open("boot");
    store.set_retention(crate::core::store::Retention {
        max_age: Duration::from_secs(3600),
        max_rows: 3,
    });
    let mut again = db.start_core_on(store).unwrap();
    let before = again.store.commits();
    let _lines = connect(&mut again, 2);

    assert_eq!(again.store.commits(), before, "an open commits nothing");
    assert_eq!(events(&db), 3);
}

/// A thread that has run its share of batches hands the rest to the
/// driver's thread, which runs them without anyone sending more.
#[test]
fn what_an_io_thread_leaves_queued_the_drivers_thread_runs() {
    let db = TestDb::new();
    let mut core = db.start_core_with_max_batch(1);
    let lines = connect(&mut core, 1);
    let (core, _stopped) = CoreHandle::start(core).unwrap();
    let tracks = 3 * COMBINING_ROUNDS;
    for i in 0..tracks {
        core.queue(track(1, i as u64, &format!("k{i}"))).unwrap();
    }
    core.drive();
    for i in 0..tracks {
        let reply = next_line(&lines);
        assert_eq!(reply["id"], i, "{reply}");
        assert_eq!(reply["ok"], true, "{reply}");
    }
    assert_eq!(db.rows().len(), tracks);
}

/// Threads that send at once never leave a command behind: whoever holds
/// the core looks at the queue again after letting go.
#[test]
fn commands_sent_from_many_threads_at_once_are_all_run() {
    const THREADS: u64 = 4;
    const EACH: u64 = 200;
    let db = TestDb::new();
    let mut core = db.start_core();
    let lines: Vec<_> = (1..=THREADS).map(|conn| connect(&mut core, conn)).collect();
    let (core, _stopped) = CoreHandle::start(core).unwrap();
    let senders: Vec<_> = (1..=THREADS)
        .map(|conn| {
            let core = core.clone();
            std::thread::spawn(move || {
                for i in 0..EACH {
                    core.send(track(conn, i, &format!("c{conn}-{i}"))).unwrap();
                }
            })
        })
        .collect();
    senders
        .into_iter()
        .for_each(|sender| sender.join().unwrap());
    for lines in &lines {
        for i in 0..EACH {
            let reply = next_line(lines);
            assert_eq!(
                (reply["id"].as_u64(), &reply["ok"]),
                (Some(i), &json!(true))
            );
        }
    }
    assert_eq!(db.rows().len(), (THREADS * EACH) as usize);
}

/// A task cancelled while it waits to run the core leaves nothing behind:
/// what it would have run goes to the driver's thread.
#[tokio::test]
async fn what_a_cancelled_drive_leaves_queued_the_drivers_thread_runs() {
    use std::future::Future as _;
    use std::task::Poll;
    let db = TestDb::new();
    let mut core = db.start_core();
    let lines = connect(&mut core, 1);
    let (core, _stopped) = CoreHandle::start(core).unwrap();
    core.queue(track(1, 1, "k")).unwrap();
    {
        let mut soon = std::pin::pin!(core.drive_soon());
        let first = std::future::poll_fn(|cx| Poll::Ready(soon.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "it yields before it runs the core");
    }
    let reply = tokio::task::spawn_blocking(move || next_line(&lines))
        .await
        .unwrap();
    assert_eq!((&reply["id"], &reply["ok"]), (&json!(1), &json!(true)));
}
