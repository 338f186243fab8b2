//! The core: one thread that owns the registry and the store.
//!
//! It drains a batch of commands from the io layer, applies them to the
//! registry, commits everything they changed in one SQLite transaction, and
//! only then releases the batch's replies and events. So no client ever
//! sees a change that a crash could take back, and a burst of operations
//! costs one commit, not one each.
//!
//! If a commit fails (a full disk, another program locking the database),
//! the registry is rolled back to what the database holds, the batch's
//! presence requests are answered with `internal` errors, and the daemon
//! carries on. What happened outside the core in that batch (a connection
//! closed, a process exited) cannot be asked again by anyone, so it is kept
//! and applied again, with a growing pause between tries, until a commit
//! takes it.
//!
//! The core has no sockets and no async runtime; it hands finished lines to
//! each connection's [`Outlet`].

pub mod registry;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sys::now_millis;

use crate::protocol::{
    ErrorBody, ErrorCode, Event, HelloReply, HelloRequest, Lifetime, PROTOCOL_VERSION, Reply,
    SERVER_NAME, ShutdownPayload, StatusReply,
};
use registry::{ConnId, Delivery, Op, Outbox, Peer, ProcessId, Registry};
use store::{Store, StoreError};

/// How many commands one transaction may take. Large enough that a burst
/// is one commit; small enough that the first reply of a burst is not held
/// back for long.
const MAX_BATCH: usize = 1024;

/// The pause before facts and expiry are tried again after a failed commit.
/// It doubles with each failed retry, up to [`MAX_RETRY_PAUSE`], so that a
/// full disk never keeps the core busy.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// What kind of line a connection is sent; the io layer uses it to bound a
/// slow reader's queue without losing anything that matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind {
    Reply,
    /// A `role` event for this ref: only the latest one matters.
    Role(String),
    /// A `presence_diff` for this topic: may be dropped for a fresh state.
    Diff(String),
    /// A `presence_state` for this topic.
    State(String),
    /// Anything else, such as `shutdown`.
    Notice,
}

/// One serialized line, newline included, shared by every connection it
/// goes to.
#[derive(Debug, Clone)]
pub struct Line {
    pub kind: LineKind,
    pub bytes: Arc<[u8]>,
}

/// Where the core sends a connection's lines. Implemented by the io layer;
/// `deliver` must never block.
pub trait Outlet: Send {
    fn deliver(&self, line: Line);
    /// No more lines will come: flush what is queued, then close.
    fn close(&self);
}

/// A request after the io layer has parsed it and resolved what needs the
/// system.
#[derive(Debug)]
pub enum Resolved {
    Hello(HelloRequest),
    Presence(Op),
    Status,
    Ping,
}

/// Everything the io layer asks of the core.
pub enum Command {
    Open {
        conn: ConnId,
        peer: Peer,
        outlet: Box<dyn Outlet>,
    },
    Request {
        conn: ConnId,
        id: Value,
        request: Resolved,
    },
    /// A request the io layer already refused. It goes through the core so
    /// that the reply keeps its place among the connection's replies.
    Refuse {
        conn: ConnId,
        id: Value,
        error: ErrorBody,
    },
    Close {
        conn: ConnId,
    },
    ProcessExited(ProcessId),
    /// The connection's queue dropped diffs for these topics; send a fresh
    /// state for each.
    Resync {
        conn: ConnId,
        topics: Vec<String>,
    },
    /// Tell every client, commit, and stop.
    Shutdown {
        reason: String,
    },
}

/// What `status` reports about the daemon beyond the registry.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    pub socket: PathBuf,
    pub started: Instant,
    pub pid_watch: String,
}

/// Why the core stopped.
#[derive(Debug)]
pub enum Stopped {
    /// A `Shutdown` command: rows are committed and kept for a restart.
    Shutdown,
    /// Every sender is gone.
    Disconnected,
    /// A `Shutdown` command, but its batch, or a last try of the facts that
    /// earlier commits could not save, failed to commit. The rows are as
    /// last committed; nothing uncommitted was revealed.
    Store(StoreError),
}

pub struct Core {
    registry: Registry,
    store: Store,
    outlets: HashMap<ConnId, Box<dyn Outlet>>,
    info: DaemonInfo,
}

impl Core {
    /// Loads the store and decides what survives the restart: rows of
    /// another boot or of a process that is gone are removed; process
    /// entries continue; connection entries wait `resume_grace` for their
    /// client to resume them.
    pub fn start(
        store: Store,
        limits: crate::protocol::Limits,
        boot_id: &str,
        resume_grace: Duration,
        info: DaemonInfo,
    ) -> Result<Core, StoreError> {
        let (stored, next_seq) = store.load()?;
        let now = now_millis();
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        let (mut of_another_boot, mut of_exited_processes) = (0usize, 0usize);
        for row in stored {
            let entry = row.entry;
            let why_gone = if row.boot_id != boot_id {
                of_another_boot += 1;
                "it was written before the machine last booted"
            } else if !crate::sys::is_running(entry.process) {
                of_exited_processes += 1;
                "its process exited while no daemon ran (pid_exit)"
            } else {
                let mut entry = entry;
                if entry.lifetime == Lifetime::Connection {
                    entry.resume_deadline = Some(now + resume_grace.as_millis() as i64);
                }
                kept.push(entry);
                continue;
            };
            tracing::debug!(
                "removing {} ({} on {}, pid {}): {why_gone}",
                entry.phx_ref,
                entry.key,
                entry.topic,
                entry.process.pid
            );
            gone.push(registry::Change::Delete(entry.phx_ref));
        }
        tracing::info!(
            kept = kept.len(),
            removed_pid_exit = of_exited_processes,
            removed_other_boot = of_another_boot,
            "loaded presences from {}",
            store.path().display()
        );
        let registry = Registry::restore(limits, kept, next_seq);
        let mut core = Core {
            registry,
            store,
            outlets: HashMap::new(),
            info,
        };
        core.store.commit(&gone, core.registry.next_seq())?;
        Ok(core)
    }

    /// The processes whose exit must be watched from the start.
    pub fn watched_processes(&self) -> Vec<ProcessId> {
        self.registry.processes().collect()
    }

    /// Runs until shutdown or every sender is gone. A failed commit does
    /// not stop it: see the module comment.
    pub fn run(mut self, commands: Receiver<Command>) -> Stopped {
        let mut recovery = Recovery::default();
        loop {
            let Ok(first) = self.next_command(&commands, &recovery) else {
                return Stopped::Disconnected;
            };
            // A failed commit is dealt with inside `upkeep` and `finish`
            // (rolled back, logged, its facts kept), so the core goes on.
            if self.upkeep_due(&recovery) {
                // Its own transaction: if it fails again, the requests that
                // woke the core are still answered from what is committed.
                let _ = self.upkeep(&mut recovery);
            }
            let Some(first) = first else { continue };
            let mut batch = self.collect(first, &commands);
            let shutdown = batch.shutdown.take();
            let committed = self.finish(batch, &mut recovery);
            if let Some(reason) = shutdown {
                return self.stop(reason, committed, &mut recovery);
            }
        }
    }

    /// Shuts down, after one last try for the facts that failed commits
    /// held back. Whatever still fails stays as last committed.
    fn stop(
        &mut self,
        reason: String,
        committed: Result<(), StoreError>,
        recovery: &mut Recovery,
    ) -> Stopped {
        let retried = if recovery.facts.is_empty() {
            Ok(())
        } else {
            self.upkeep(recovery)
        };
        self.shut_down(reason);
        match committed.and(retried) {
            Ok(()) => Stopped::Shutdown,
            Err(e) => Stopped::Store(e),
        }
    }

    /// Waits for the next command, or until upkeep is due (`Ok(None)`).
    fn next_command(
        &self,
        commands: &Receiver<Command>,
        recovery: &Recovery,
    ) -> Result<Option<Command>, RecvTimeoutError> {
        match self.upkeep_at(recovery) {
            Some(at) => match commands.recv_timeout(at.saturating_duration_since(Instant::now())) {
                Ok(command) => Ok(Some(command)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            },
            None => commands
                .recv()
                .map(Some)
                .map_err(|_| RecvTimeoutError::Disconnected),
        }
    }

    /// When the core has work of its own: a restored entry's resume
    /// deadline, or facts to retry; never before the retry pause after a
    /// failed commit, so that a failing disk cannot make the core spin.
    fn upkeep_at(&self, recovery: &Recovery) -> Option<Instant> {
        let expiry = self.registry.next_resume_deadline().map(|deadline| {
            let wait = deadline.saturating_sub(now_millis()).max(0) as u64;
            Instant::now() + Duration::from_millis(wait)
        });
        let retry = (!recovery.facts.is_empty()).then(Instant::now);
        let due = expiry.into_iter().chain(retry).min()?;
        Some(match &recovery.backoff {
            Some(backoff) => due.max(backoff.retry_at),
            None => due,
        })
    }

    fn upkeep_due(&self, recovery: &Recovery) -> bool {
        self.upkeep_at(recovery)
            .is_some_and(|at| at <= Instant::now())
    }

    /// Applies the facts still waiting for a commit, and expires restored
    /// entries whose deadline has passed, in one transaction.
    fn upkeep(&mut self, recovery: &mut Recovery) -> Result<(), StoreError> {
        let mut batch = self.new_batch();
        batch.is_upkeep = true;
        for fact in std::mem::take(&mut recovery.facts) {
            self.apply_fact(fact, &mut batch);
        }
        self.registry.expire(now_millis(), &mut batch.outbox);
        self.finish(batch, recovery)
    }

    /// Applies `first` and whatever else waits in the channel, up to
    /// [`MAX_BATCH`] commands or a shutdown.
    fn collect(&mut self, first: Command, commands: &Receiver<Command>) -> Batch {
        let mut batch = self.new_batch();
        let now = now_millis();
        let mut next = Some(first);
        while let Some(command) = next {
            self.apply(command, now, &mut batch);
            if batch.len >= MAX_BATCH || batch.shutdown.is_some() {
                break;
            }
            next = commands.try_recv().ok();
        }
        batch
    }

    fn new_batch(&mut self) -> Batch {
        self.registry.begin_batch();
        Batch {
            next_seq_before: self.registry.next_seq(),
            ..Batch::default()
        }
    }

    /// Commits the batch and reveals it. If the commit fails, the registry
    /// is rolled back and only that failure is revealed; the batch's facts
    /// wait in `recovery` for the next try.
    fn finish(&mut self, batch: Batch, recovery: &mut Recovery) -> Result<(), StoreError> {
        let Batch {
            outbox,
            presence_replies,
            facts,
            closed,
            is_upkeep,
            next_seq_before,
            ..
        } = batch;
        let unchanged = outbox.changes.is_empty() && self.registry.next_seq() == next_seq_before;
        let result = if unchanged {
            // Nothing to write, so nothing that could fail to be written:
            // reads keep working while the disk is full.
            Ok(())
        } else {
            self.store.commit(&outbox.changes, self.registry.next_seq())
        };
        let deliveries = match &result {
            Ok(()) => {
                self.registry.settle();
                if !unchanged {
                    recovery.succeeded();
                }
                outbox.deliveries
            }
            Err(cause) => {
                self.registry.roll_back();
                let deliveries = failed_deliveries(outbox.deliveries, &presence_replies, cause);
                recovery.failed(cause, facts, presence_replies.len(), is_upkeep);
                deliveries
            }
        };
        self.release(deliveries);
        // Closed connections get no more lines even if their close is to be
        // retried: their sockets are gone either way.
        for conn in closed {
            if let Some(outlet) = self.outlets.remove(&conn) {
                outlet.close();
            }
        }
        result
    }

    fn apply(&mut self, command: Command, now: i64, batch: &mut Batch) {
        batch.len += 1;
        let out = &mut batch.outbox;
        match command {
            Command::Open { conn, peer, outlet } => {
                self.registry.open(conn, peer);
                self.outlets.insert(conn, outlet);
            }
            Command::Request { conn, id, request } => match request {
                Resolved::Presence(op) => {
                    // `handle` writes the reply first, at this index.
                    batch.presence_replies.push(out.deliveries.len());
                    self.registry.handle(conn, id, op, now, out);
                }
                Resolved::Hello(hello) => {
                    let reply = Reply::from_result(id, hello_result(hello));
                    out.deliveries.push(Delivery::Reply { conn, reply });
                }
                Resolved::Status => {
                    let reply = Reply::success(id, self.status());
                    out.deliveries.push(Delivery::Reply { conn, reply });
                }
                Resolved::Ping => {
                    let reply = Reply::success(id, serde_json::Map::new());
                    out.deliveries.push(Delivery::Reply { conn, reply });
                }
            },
            Command::Refuse { conn, id, error } => {
                let reply = Reply::failure(id, error);
                out.deliveries.push(Delivery::Reply { conn, reply });
            }
            Command::Close { conn } => self.apply_fact(Fact::Closed(conn), batch),
            Command::ProcessExited(process) => {
                self.apply_fact(Fact::ProcessExited(process), batch);
            }
            Command::Resync { conn, topics } => {
                self.apply_fact(Fact::Resync { conn, topics }, batch);
            }
            Command::Shutdown { reason } => batch.shutdown = Some(reason),
        }
    }

    fn apply_fact(&mut self, fact: Fact, batch: &mut Batch) {
        let out = &mut batch.outbox;
        match &fact {
            Fact::Closed(conn) => {
                self.registry.close(*conn, out);
                batch.closed.push(*conn);
            }
            Fact::ProcessExited(process) => self.registry.process_exited(*process, out),
            Fact::Resync { conn, topics } => self.registry.resync(*conn, topics, out),
        }
        batch.facts.push(fact);
    }

    fn status(&self) -> StatusReply {
        StatusReply {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_ms: self.info.started.elapsed().as_millis() as u64,
            socket: self.info.socket.display().to_string(),
            db: self.store.path().display().to_string(),
            db_recovered: self
                .store
                .recovered_from()
                .map(|path| path.display().to_string()),
            topics: self.registry.topic_count(),
            entries: self.registry.entry_count(),
            connections: self.registry.connection_count(),
            subscriptions: self.registry.subscription_count(),
            pid_watch: self.info.pid_watch.clone(),
            awaiting_resume: self.registry.awaiting_resume_count(),
        }
    }

    /// Serializes each delivery once and hands it to its connections.
    fn release(&self, deliveries: Vec<Delivery>) {
        for delivery in deliveries {
            match delivery {
                Delivery::Reply { conn, reply } => {
                    if let Some(outlet) = self.outlets.get(&conn) {
                        outlet.deliver(Line {
                            kind: LineKind::Reply,
                            bytes: to_line(&reply),
                        });
                    }
                }
                Delivery::Event { to, event } => {
                    let line = Line {
                        kind: line_kind(&event),
                        bytes: to_line(&event),
                    };
                    for conn in to {
                        if let Some(outlet) = self.outlets.get(&conn) {
                            outlet.deliver(line.clone());
                        }
                    }
                }
            }
        }
    }

    /// Tells every client that the daemon is going away. The rows stay, so
    /// a restarted daemon gives everyone their place back.
    fn shut_down(&mut self, reason: String) {
        let event = Event::Shutdown {
            payload: ShutdownPayload { reason },
        };
        let line = Line {
            kind: LineKind::Notice,
            bytes: to_line(&event),
        };
        for (_, outlet) in self.outlets.drain() {
            outlet.deliver(line.clone());
            outlet.close();
        }
    }
}

/// `hello`: the versions agree, or the client asked for one we lack.
fn hello_result(hello: HelloRequest) -> Result<serde_json::Value, ErrorBody> {
    match hello.protocol.unwrap_or(PROTOCOL_VERSION) {
        PROTOCOL_VERSION => Ok(serde_json::to_value(HelloReply {
            protocol: PROTOCOL_VERSION,
            server: SERVER_NAME.to_owned(),
            pid: std::process::id(),
        })
        .unwrap_or_default()),
        other => Err(ErrorBody::new(
            ErrorCode::UnsupportedProtocol,
            format!("protocol {other} is not supported; this daemon speaks {PROTOCOL_VERSION}"),
        )),
    }
}

#[derive(Default)]
struct Batch {
    outbox: Outbox,
    len: usize,
    /// Where each presence op's reply sits in `outbox.deliveries`, in
    /// order: the replies that a failed commit turns into errors.
    presence_replies: Vec<usize>,
    facts: Vec<Fact>,
    closed: Vec<ConnId>,
    shutdown: Option<String>,
    /// Whether this is the core's own upkeep (facts to retry, expiry)
    /// rather than commands from the io layer.
    is_upkeep: bool,
    /// To tell whether the batch changed anything to write.
    next_seq_before: u64,
}

/// Something that happened outside the core. Unlike a request, nobody will
/// send it again if its batch fails to commit, so the core keeps it and
/// applies it again until a commit takes it.
#[derive(Debug)]
enum Fact {
    Closed(ConnId),
    ProcessExited(ProcessId),
    Resync { conn: ConnId, topics: Vec<String> },
}

/// What failed commits leave to do: the facts not yet saved, and when to
/// try again.
#[derive(Default)]
struct Recovery {
    facts: Vec<Fact>,
    /// Set from a failed commit until one succeeds.
    backoff: Option<Backoff>,
}

struct Backoff {
    pause: Duration,
    retry_at: Instant,
    failures: u64,
}

impl Recovery {
    /// Keeps the failed batch's facts, and pauses upkeep: the pause starts
    /// at the first failure and doubles with each failed upkeep. A failed
    /// batch of requests does not push a running pause further out, so
    /// busy clients cannot hold the retries off.
    fn failed(&mut self, cause: &StoreError, facts: Vec<Fact>, refused: usize, is_upkeep: bool) {
        self.facts.extend(facts);
        let failures = self.backoff.as_ref().map_or(0, |b| b.failures) + 1;
        let pause = match &self.backoff {
            None => FIRST_RETRY_PAUSE,
            Some(backoff) if is_upkeep => (backoff.pause * 2).min(MAX_RETRY_PAUSE),
            Some(backoff) => backoff.pause,
        };
        let retry_at = match &self.backoff {
            Some(backoff) if !is_upkeep => backoff.retry_at,
            _ => Instant::now() + pause,
        };
        self.backoff = Some(Backoff {
            pause,
            retry_at,
            failures,
        });
        let waiting = match describe(&self.facts) {
            Some(facts) => {
                let next_try = retry_at
                    .saturating_duration_since(Instant::now())
                    .as_millis();
                format!("; {facts} waiting to be saved, next try in {next_try} ms")
            }
            None => String::new(),
        };
        tracing::error!(
            "commit failed, batch rolled back: {cause}; answered {} with an error{waiting}",
            counted(refused, "request"),
        );
    }

    fn succeeded(&mut self) {
        if let Some(backoff) = self.backoff.take() {
            tracing::info!(
                "the database takes commits again, after {} failed",
                backoff.failures
            );
        }
    }
}

/// The facts waiting to be saved, for the log: `2 closed connections, 1
/// exited process`; `None` if there are none.
fn describe(facts: &[Fact]) -> Option<String> {
    let count = |kind: fn(&Fact) -> bool| facts.iter().filter(|f| kind(f)).count();
    let counts = [
        (count(|f| matches!(f, Fact::Closed(_))), "closed connection"),
        (
            count(|f| matches!(f, Fact::ProcessExited(_))),
            "exited process",
        ),
        (count(|f| matches!(f, Fact::Resync { .. })), "resync"),
    ];
    let parts: Vec<String> = counts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| counted(*n, what))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// `1 request`, `2 requests`.
fn counted(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// What a batch whose commit failed may still send. Each presence op's
/// reply, success or not, was worked out from changes that are now undone,
/// so it becomes an `internal` error, keeping its id and its place; other
/// replies (hello, status, ping, refusals) stand. Events described the
/// undone changes, so none is sent.
fn failed_deliveries(
    deliveries: Vec<Delivery>,
    presence_replies: &[usize],
    cause: &StoreError,
) -> Vec<Delivery> {
    let error = ErrorBody::new(
        ErrorCode::Internal,
        format!("could not save the change: {cause}"),
    );
    deliveries
        .into_iter()
        .enumerate()
        .filter_map(|(index, delivery)| match delivery {
            Delivery::Reply { conn, reply } if presence_replies.binary_search(&index).is_ok() => {
                let reply = Reply::failure(reply.id, error.clone());
                Some(Delivery::Reply { conn, reply })
            }
            Delivery::Reply { .. } => Some(delivery),
            Delivery::Event { .. } => None,
        })
        .collect()
}

fn line_kind(event: &Event) -> LineKind {
    match event {
        Event::PresenceState { topic, .. } => LineKind::State(topic.clone()),
        Event::PresenceDiff { topic, .. } => LineKind::Diff(topic.clone()),
        Event::Role { payload, .. } => LineKind::Role(payload.phx_ref.clone()),
        Event::Shutdown { .. } => LineKind::Notice,
    }
}

fn to_line(message: &impl serde::Serialize) -> Arc<[u8]> {
    let mut bytes = serde_json::to_vec(message).unwrap_or_else(|e| {
        // Our own types always serialize; say so loudly if one ever doesn't.
        tracing::error!("could not serialize an outgoing line: {e}");
        br#"{"id":null,"ok":false,"error":{"code":"internal","message":"serialization failed"}}"#
            .to_vec()
    });
    bytes.push(b'\n');
    bytes.into()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use serde_json::json;

    use super::*;
    use crate::protocol::{Limits, TrackRequest};
    use registry::Track;

    const WAIT: Duration = Duration::from_secs(10);
    /// How long SQLite waits on the test's lock before a commit fails.
    const BUSY: Duration = Duration::from_millis(20);

    /// Hands the test each line a connection is sent, and `None` when the
    /// core closes it.
    struct TestOutlet(mpsc::Sender<Option<Value>>);

    impl Outlet for TestOutlet {
        fn deliver(&self, line: Line) {
            let _ = self
                .0
                .send(Some(serde_json::from_slice(&line.bytes).unwrap()));
        }

        fn close(&self) {
            let _ = self.0.send(None);
        }
    }

    /// A core running on its own thread over a database in a temporary
    /// folder, and a way for the test to lock that database as another
    /// program would.
    struct Running {
        commands: mpsc::Sender<Command>,
        core: Option<std::thread::JoinHandle<Stopped>>,
        db: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Running {
        fn start() -> Running {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("p.db");
            let store = Store::open(&db, "boot".into()).unwrap();
            store.set_busy_timeout(BUSY);
            let info = DaemonInfo {
                socket: dir.path().join("s.sock"),
                started: Instant::now(),
                pid_watch: "test".into(),
            };
            let core = Core::start(
                store,
                Limits::default(),
                "boot",
                Duration::from_secs(10),
                info,
            )
            .unwrap();
            let (commands, receiver) = mpsc::channel();
            let core = std::thread::spawn(move || core.run(receiver));
            Running {
                commands,
                core: Some(core),
                db,
                _dir: dir,
            }
        }

        fn connect(&self, conn: ConnId) -> mpsc::Receiver<Option<Value>> {
            let (lines, receiver) = mpsc::channel();
            self.send(Command::Open {
                conn,
                peer: Peer {
                    pid: 4000 + conn as u32,
                    uid: 1000,
                    user: "alice".into(),
                },
                outlet: Box::new(TestOutlet(lines)),
            });
            receiver
        }

        fn send(&self, command: Command) {
            self.commands.send(command).unwrap();
        }

        fn request(&self, conn: ConnId, id: u64, request: Resolved) {
            self.send(Command::Request {
                conn,
                id: json!(id),
                request,
            });
        }

        fn track(&self, conn: ConnId, id: u64, key: &str) {
            let token = format!("token-{key}");
            let track = Track {
                request: TrackRequest {
                    topic: "doc".into(),
                    key: key.into(),
                    meta: serde_json::Map::new(),
                    pid: None,
                    lifetime: Lifetime::Connection,
                    subscribe: false,
                },
                process: ProcessId {
                    pid: 4000 + conn as u32,
                    start_time: 1,
                },
                token_hash: [id as u8; 32],
                token,
            };
            self.request(conn, id, Resolved::Presence(Op::Track(track)));
        }

        /// Takes the database's write lock, as a `sqlite3` shell in a
        /// transaction would; commits fail until it is dropped.
        fn lock_database(&self) -> rusqlite::Connection {
            let locker = rusqlite::Connection::open(&self.db).unwrap();
            locker.execute_batch("BEGIN IMMEDIATE").unwrap();
            locker
        }

        fn rows(&self) -> Vec<String> {
            let db = rusqlite::Connection::open(&self.db).unwrap();
            let mut query = db
                .prepare("SELECT key FROM presences ORDER BY seq")
                .unwrap();
            query
                .query_map([], |row| row.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        }

        fn stop(&mut self) -> Stopped {
            self.send(Command::Shutdown {
                reason: "test".into(),
            });
            self.core.take().unwrap().join().unwrap()
        }
    }

    fn next_line(lines: &mpsc::Receiver<Option<Value>>) -> Value {
        match lines.recv_timeout(WAIT) {
            Ok(Some(line)) => line,
            other => panic!("expected a line, got {other:?}"),
        }
    }

    #[test]
    fn a_failed_commit_answers_with_errors_reveals_nothing_and_retries_the_close() {
        let mut core = Running::start();
        let (owner, watcher) = (core.connect(1), core.connect(2));
        core.request(2, 1, Resolved::Presence(Op::Subscribe("doc".into())));
        assert_eq!(next_line(&watcher)["ok"], true);
        assert_eq!(next_line(&watcher)["event"], "presence_state");
        core.track(1, 2, "first");
        assert_eq!(next_line(&owner)["ok"], true);
        assert_eq!(next_line(&watcher)["event"], "presence_diff");

        let locker = core.lock_database();
        core.track(1, 3, "second");
        core.request(1, 4, Resolved::Ping);
        let failed = next_line(&owner);
        assert_eq!(
            (&failed["id"], &failed["ok"], &failed["error"]["code"]),
            (&json!(3), &json!(false), &json!("internal"))
        );
        let message = failed["error"]["message"].as_str().unwrap();
        assert!(message.contains("locked by another program"), "{message}");
        assert_eq!(next_line(&owner), json!({"id": 4, "ok": true}));
        core.send(Command::Close { conn: 1 });
        assert_eq!(owner.recv_timeout(WAIT).unwrap(), None, "closed at once");
        assert_eq!(core.rows(), ["first"], "the rows are as last committed");

        drop(locker);
        // The watcher's next line is the retried close: nothing of the
        // failed track reached it.
        let diff = next_line(&watcher);
        assert_eq!(diff["event"], "presence_diff");
        assert_eq!(diff["reasons"], json!({"p1": "closed"}));
        assert!(core.rows().is_empty());
        core.track(2, 5, "later");
        assert_eq!(next_line(&watcher)["ok"], true);
        assert_eq!(core.rows(), ["later"]);
        assert!(matches!(core.stop(), Stopped::Shutdown));
    }

    #[test]
    fn a_shutdown_in_a_failed_batch_still_shuts_down_and_keeps_the_committed_rows() {
        let mut core = Running::start();
        let client = core.connect(1);
        core.track(1, 1, "kept");
        assert_eq!(next_line(&client)["ok"], true);

        let _locker = core.lock_database();
        core.track(1, 2, "lost");
        core.send(Command::Close { conn: 1 });
        let stopped = core.stop();

        assert!(
            matches!(stopped, Stopped::Store(StoreError::Locked { .. })),
            "{stopped:?}"
        );
        assert_eq!(next_line(&client)["error"]["code"], "internal");
        assert_eq!(core.rows(), ["kept"]);
    }

    #[test]
    fn retries_wait_longer_after_each_failure_and_requests_do_not_hold_them_off() {
        let cause = StoreError::Io(std::io::Error::other("test"));
        let mut recovery = Recovery::default();
        let start = Instant::now();
        recovery.failed(&cause, vec![Fact::Closed(1)], 1, false);
        let first = recovery.backoff.as_ref().unwrap().retry_at;
        assert!(first >= start + FIRST_RETRY_PAUSE);

        recovery.failed(&cause, Vec::new(), 1, false);
        let backoff = recovery.backoff.as_ref().unwrap();
        assert_eq!(
            (backoff.retry_at, backoff.pause),
            (first, FIRST_RETRY_PAUSE),
            "a failed request leaves the pause alone"
        );

        for _ in 0..10 {
            recovery.failed(&cause, Vec::new(), 0, true);
        }
        assert_eq!(recovery.backoff.as_ref().unwrap().pause, MAX_RETRY_PAUSE);
        assert_eq!(recovery.facts.len(), 1, "the fact is kept");
        recovery.succeeded();
        assert!(recovery.backoff.is_none());
    }

    #[test]
    fn the_facts_waiting_are_described_for_the_log() {
        let process = ProcessId {
            pid: 1,
            start_time: 1,
        };
        let facts = [
            Fact::Closed(1),
            Fact::Closed(2),
            Fact::ProcessExited(process),
        ];
        assert_eq!(
            describe(&facts).as_deref(),
            Some("2 closed connections, 1 exited process")
        );
        assert_eq!(describe(&[]), None);
    }
}
