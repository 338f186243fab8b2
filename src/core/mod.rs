//! The core: one thread that owns the registry and the store.
//!
//! It drains a batch of commands from the io layer, applies them to the
//! registry, commits everything they changed in one SQLite transaction, and
//! only then releases the batch's replies and events. So no client ever
//! sees a change that a crash could take back, and a burst of operations
//! costs one commit, not one each.
//!
//! If a commit fails (a full disk, another program locking the database),
//! the registry is rolled back to what the database holds and the daemon
//! carries on. The batch's requests that change entries are answered with
//! `internal` errors; those that only read, and subscriptions, which are
//! never saved, are answered again from the rolled-back registry, so they
//! keep working and show only what is committed. What happened outside
//! the core in that batch (a connection closed, a process exited) cannot be
//! asked again by anyone, so it is kept as a fact and applied at the head
//! of every later batch until a commit takes it; while no client asks
//! anything, it is retried on its own with a growing pause.
//!
//! The core has no sockets and no async runtime; it hands finished lines to
//! each connection's [`Outlet`].

mod recovery;
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
    ErrorBody, ErrorCode, Event, HelloReply, HelloRequest, Lifetime, OutgoingReply,
    PROTOCOL_VERSION, ReplyFields, SERVER_NAME, ShutdownPayload, StatusReply,
};
use recovery::{Fact, Recovery};
use registry::{Change, ConnId, Delivery, Ending, Op, Outbox, Peer, ProcessId, Registry};
use store::{Store, StoreError, StoredEntry};

/// How many commands one transaction may take, by default. Large enough
/// that a burst is one commit; small enough that the first reply of a
/// burst is not held back for long.
pub const MAX_BATCH: usize = 1024;

/// How often the history is trimmed to its retention bounds, when the
/// last pass left nothing over.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The pause before waiting facts are retried on their own after a failed
/// commit. It doubles with each failed retry, up to [`MAX_RETRY_PAUSE`], so
/// that a full disk never keeps an idle core busy.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// During an outage, how often a failed commit may be logged above debug
/// level: a full disk must not fill the log too.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(30);

/// The time, as the core is told it: the monotonic clock for its own
/// timers (retry pauses, trimming the history) and the wall clock for what
/// is stored and compared with stored times (resume deadlines, the
/// history). Both are read once per batch, so that every input of a batch
/// is handled at one time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    /// Milliseconds since the Unix epoch.
    pub wall_ms: i64,
}

impl Now {
    /// Reads both clocks.
    pub fn read() -> Now {
        Now {
            at: Instant::now(),
            wall_ms: now_millis(),
        }
    }

    /// The monotonic instant at which the wall clock reads `wall_ms`, if it
    /// runs on as it does now; `at` if that is already past.
    pub fn instant_of(&self, wall_ms: i64) -> Instant {
        let wait = wall_ms.saturating_sub(self.wall_ms).max(0) as u64;
        self.at + Duration::from_millis(wait)
    }
}

/// What kind of line a connection is sent; the io layer uses it to bound a
/// slow reader's queue without losing anything that matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineKind {
    /// A reply, and whether it is a success: the queue counts a
    /// subscription as answered only once the state that follows a
    /// successful one is queued too.
    Reply { succeeded: bool },
    /// A `role` event for this ref: only the latest one matters.
    Role(String),
    /// A `presence_diff` for this topic: may be dropped for a fresh state.
    Diff(String),
    /// A `presence_state` for this topic.
    State(String),
    /// Not a line for the client (no bytes): the states a resync of every
    /// topic asked for are all delivered before it.
    ResyncedAll,
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
    /// Bytes delivered and not yet written to the client, for `status`.
    fn queued_bytes(&self) -> usize;
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
        /// Its process was exiting (or gone) when the connection closed,
        /// as the io layer told from `/proc` at once: the connection's
        /// entries leave because the process exited.
        exited: bool,
    },
    ProcessExited(ProcessId),
    /// The connection's queue dropped diffs for these topics; send a fresh
    /// state for each. With `all`, for every topic the connection
    /// subscribes to: its queue dropped diffs for more topics than it
    /// keeps the names of.
    Resync {
        conn: ConnId,
        topics: Vec<String>,
        all: bool,
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
    /// How the daemon was started: `autostart`, `systemd` or `foreground`.
    pub started_by: String,
}

/// Why the core stopped.
#[derive(Debug)]
pub enum Stopped {
    /// A `Shutdown` command: rows are committed and kept for a restart.
    Shutdown,
    /// Every sender is gone.
    Disconnected,
    /// A `Shutdown` command, but facts that failed commits held back could
    /// not be saved even by a last try. The rows are as last committed;
    /// nothing uncommitted was revealed.
    Store(StoreError),
}

pub struct Core {
    registry: Registry,
    store: Store,
    outlets: HashMap<ConnId, Box<dyn Outlet>>,
    info: DaemonInfo,
    recovery: Recovery,
    /// When to next trim the history to its retention bounds.
    next_prune: Instant,
    /// How many commands one transaction may take.
    max_batch: usize,
}

/// Why the core woke up.
enum Wake {
    Command(Command),
    /// Its own work is due: a restored entry's resume deadline, or facts
    /// to retry.
    Upkeep,
    /// Every sender is gone.
    Disconnected,
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
        let (stored, stored_next_seq) = store.load()?;
        let now = Now::read();
        let resume_deadline = now.wall_ms + resume_grace.as_millis() as i64;
        let sorted = sort_rows(stored, boot_id, resume_deadline);
        tracing::info!(
            kept = sorted.kept.len(),
            removed_pid_exit = sorted.of_exited_processes,
            removed_other_boot = sorted.of_another_boot,
            "loaded presences from {}",
            store.path().display()
        );
        let history = registry::departures_at_start(&sorted.departed, &sorted.kept, now.wall_ms);
        let mut core = Core {
            // The per-uid quotas are for the other users of a shared
            // daemon; its own user is held only to the total.
            registry: Registry::restore(limits, sorted.kept, stored_next_seq)
                .exempt_from_uid_quotas(crate::sys::current_uid()),
            store,
            outlets: HashMap::new(),
            info,
            recovery: Recovery::default(),
            next_prune: now.at,
            max_batch: MAX_BATCH,
        };
        core.forget_dead_rows(sorted.dead, history, stored_next_seq, now)?;
        Ok(core)
    }

    /// Deletes the rows that did not survive the restart, and saves the seq
    /// counter if restoring raised it. If nothing changed, nothing is
    /// written, so a full disk does not stop such a start.
    ///
    /// If the disk is full or another program holds the database, the
    /// daemon starts anyway and keeps trying the deletions as waiting facts.
    /// That leaves rows on disk that the registry does not hold: the one
    /// place where the two disagree, and a safe one. The rows belong to
    /// processes that are gone (or to an earlier boot), so no client is
    /// ever shown them and nobody can resume them; their refs and seqs are
    /// below the saved counter, so none is handed out again; and should the
    /// daemon stop before the delete is saved, the next start finds the
    /// same processes gone and drops them again.
    ///
    /// `history` records the departures and the new owners: written with
    /// the deletions, and lost (with a warning) only if they cannot be.
    fn forget_dead_rows(
        &mut self,
        dead: Vec<String>,
        history: Vec<Change>,
        stored_next_seq: u64,
        now: Now,
    ) -> Result<(), StoreError> {
        if dead.is_empty() && self.registry.next_seq() == stored_next_seq {
            return Ok(());
        }
        let changes: Vec<Change> = dead
            .iter()
            .cloned()
            .map(Change::Delete)
            .chain(history)
            .collect();
        match self.store.commit(&changes, self.registry.next_seq()) {
            Ok(()) => Ok(()),
            Err(cause) if cause.is_passing() => {
                let facts = dead.into_iter().map(Fact::DeadRow).collect();
                self.recovery
                    .failed(&cause, Origin::Upkeep, 0, facts, now.at);
                Ok(())
            }
            Err(cause) => Err(cause),
        }
    }

    /// Lets one transaction take at most `max_batch` commands (at least
    /// one). A batch of one turns group commit off, which the benchmarks
    /// do once to show what it saves.
    pub fn with_max_batch(mut self, max_batch: usize) -> Core {
        self.max_batch = max_batch.max(1);
        self
    }

    /// The processes whose exit must be watched from the start.
    pub fn watched_processes(&self) -> Vec<ProcessId> {
        self.registry.processes().collect()
    }

    /// Runs until shutdown or every sender is gone. A failed commit does
    /// not stop it: see the module comment.
    pub fn run(mut self, commands: Receiver<Command>) -> Stopped {
        loop {
            let wake = self.wait(&commands);
            // The clocks are read once a wake: every input of the batch is
            // handled at that time.
            let now = Now::read();
            let mut batch = match wake {
                Wake::Command(first) => {
                    let mut batch = self.new_batch(Origin::Commands, now);
                    self.collect(first, &commands, &mut batch);
                    batch
                }
                Wake::Upkeep => self.new_batch(Origin::Upkeep, now),
                Wake::Disconnected => return Stopped::Disconnected,
            };
            let shutdown = batch.shutdown.take();
            // A failed commit was rolled back, answered and logged, and its
            // facts wait for the next batch: the core goes on.
            let _ = self.finish(batch);
            if let Some(reason) = shutdown {
                return self.stop(reason);
            }
        }
    }

    /// Shuts down, after one last try for the facts that failed commits
    /// held back. Only facts that even that cannot save make the stop a
    /// failure: a failed request was answered already, and the rows stay
    /// as last committed.
    fn stop(&mut self, reason: String) -> Stopped {
        let last_try = if self.recovery.facts.is_empty() {
            Ok(())
        } else {
            let batch = self.new_batch(Origin::Upkeep, Now::read());
            self.finish(batch)
        };
        self.shut_down(reason);
        match last_try {
            Ok(()) => Stopped::Shutdown,
            Err(cause) => Stopped::Store(cause),
        }
    }

    /// Waits for the next command, or until upkeep is due.
    fn wait(&self, commands: &Receiver<Command>) -> Wake {
        let received = match self.upkeep_at(Now::read()) {
            Some(at) => commands.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(command) => Wake::Command(command),
            Err(RecvTimeoutError::Timeout) => Wake::Upkeep,
            Err(RecvTimeoutError::Disconnected) => Wake::Disconnected,
        }
    }

    /// When the core has work of its own: a restored entry's resume
    /// deadline, or facts to retry; never before the retry pause after a
    /// failed commit, so that a failing disk cannot make an idle core spin.
    /// A batch of commands does this work too, at its head, pause or not.
    fn upkeep_at(&self, now: Now) -> Option<Instant> {
        let expiry = self
            .registry
            .next_resume_deadline()
            .map(|deadline| now.instant_of(deadline));
        let retry = (!self.recovery.facts.is_empty()).then_some(now.at);
        let due = expiry.into_iter().chain(retry).min()?;
        Some(match &self.recovery.outage {
            Some(outage) => due.max(outage.retry_at),
            None => due,
        })
    }

    /// Opens a batch, and applies first what the core owes from before:
    /// the facts that failed commits could not save, so that nothing in
    /// the batch is worked out from a state that has already ended (the
    /// entries of a closed connection or an exited process), and the
    /// expiry of restored entries whose deadline has passed.
    fn new_batch(&mut self, origin: Origin, now: Now) -> Batch {
        self.registry.begin_batch();
        let mut batch = Batch::new(origin, now, self.registry.next_seq());
        for fact in std::mem::take(&mut self.recovery.facts) {
            self.apply_fact(fact, &mut batch);
        }
        self.apply_endings(&mut batch);
        self.registry.expire(batch.now.wall_ms, &mut batch.outbox);
        batch
    }

    /// Applies `first` and whatever else waits in the channel, up to
    /// `max_batch` commands or a shutdown.
    fn collect(&mut self, first: Command, commands: &Receiver<Command>, batch: &mut Batch) {
        let mut next = Some(first);
        while let Some(command) = next {
            self.apply(command, batch);
            if batch.len >= self.max_batch || batch.shutdown.is_some() {
                break;
            }
            next = commands.try_recv().ok();
        }
        self.apply_endings(batch);
    }

    /// Commits the batch and reveals it, or, if the commit fails, reveals
    /// what survives the roll-back. Returns the commit's result.
    fn finish(&mut self, mut batch: Batch) -> Result<(), StoreError> {
        // Applied already by every path here; this only makes sure.
        self.apply_endings(&mut batch);
        let closed = std::mem::take(&mut batch.closed);
        let now = batch.now;
        let (deliveries, result) = self.commit_or_roll_back(batch);
        self.release(deliveries);
        if result.is_ok() {
            self.prune_history_if_due(now);
            self.store.checkpoint_if_due();
        }
        // Closed connections get no more lines even if their close is to be
        // retried: their sockets are gone either way.
        for conn in closed {
            if let Some(outlet) = self.outlets.remove(&conn) {
                outlet.close();
            }
        }
        result
    }

    /// Trims the history a chunk at a time, after a batch's lines are
    /// out: often enough to keep it bounded, never long enough to hold
    /// anyone up.
    fn prune_history_if_due(&mut self, now: Now) {
        if now.at < self.next_prune {
            return;
        }
        let more = match self.store.prune_history(now.wall_ms) {
            Ok(more) => more,
            Err(e) => {
                tracing::debug!("could not trim the history, trying later: {e}");
                false
            }
        };
        self.next_prune = if more { now.at } else { now.at + PRUNE_EVERY };
    }

    /// Commits what the batch changed, and returns what may be sent: all
    /// of it after a commit; after a failed one, the registry is rolled
    /// back, the replies are answered again from it, no event is sent, and
    /// the batch's facts wait in `recovery`.
    fn commit_or_roll_back(&mut self, batch: Batch) -> (Vec<Delivery>, Result<(), StoreError>) {
        let changed =
            !batch.outbox.changes.is_empty() || self.registry.next_seq() != batch.next_seq_before;
        let result = if changed {
            self.store
                .commit(&batch.outbox.changes, self.registry.next_seq())
        } else {
            // Nothing to write, so nothing that could fail to be written.
            Ok(())
        };
        match result {
            Ok(()) => {
                self.registry.settle();
                if changed {
                    self.recovery.succeeded(batch.now.at);
                }
                (batch.outbox.deliveries, Ok(()))
            }
            Err(cause) => {
                self.registry.roll_back();
                let refused = batch
                    .redo
                    .iter()
                    .filter(|(_, redo)| matches!(redo, Redo::Fail))
                    .count();
                let deliveries =
                    self.answer_again(batch.outbox.deliveries, batch.redo, batch.now, &cause);
                self.recovery
                    .failed(&cause, batch.origin, refused, batch.facts, batch.now.at);
                (deliveries, Err(cause))
            }
        }
    }

    /// The replies of a rolled-back batch, each in its place. A reply
    /// worked out from undone changes becomes an `internal` error; a read
    /// is asked again of the rolled-back registry; hello, ping and
    /// refusals stand. Events described the undone changes, so none is
    /// sent, except the `presence_state` of a subscribe asked again.
    fn answer_again(
        &mut self,
        deliveries: Vec<Delivery>,
        redo: Vec<(usize, Redo)>,
        now: Now,
        cause: &StoreError,
    ) -> Vec<Delivery> {
        let error = ErrorBody::new(
            ErrorCode::Internal,
            format!("could not save the change: {cause}"),
        );
        let mut redo = redo.into_iter().peekable();
        let mut out = Outbox::default();
        for (index, delivery) in deliveries.into_iter().enumerate() {
            let Delivery::Reply { conn, reply } = delivery else {
                continue;
            };
            match redo.next_if(|(at, _)| *at == index) {
                None => out.deliveries.push(Delivery::Reply { conn, reply }),
                Some((_, Redo::Fail)) => {
                    let reply = OutgoingReply::failure(reply.id, error.clone());
                    out.deliveries.push(Delivery::Reply { conn, reply });
                }
                Some((_, Redo::Ask(request))) => {
                    self.answer(conn, reply.id, request, now.wall_ms, &mut out)
                }
            }
        }
        debug_assert!(
            out.changes.is_empty(),
            "a request asked again changed a row"
        );
        out.deliveries
    }

    fn apply(&mut self, command: Command, batch: &mut Batch) {
        batch.len += 1;
        if !matches!(command, Command::Close { .. } | Command::ProcessExited(_)) {
            self.apply_endings(batch);
        }
        match command {
            Command::Open { conn, peer, outlet } => {
                self.registry.open(conn, peer);
                self.outlets.insert(conn, outlet);
            }
            Command::Request { conn, id, request } => {
                if let Some(redo) = redo_after_roll_back(&request) {
                    // The reply is written first, at this index.
                    batch.redo.push((batch.outbox.deliveries.len(), redo));
                }
                self.answer(conn, id, request, batch.now.wall_ms, &mut batch.outbox);
            }
            Command::Refuse { conn, id, error } => {
                let reply = OutgoingReply::failure(id, error);
                batch
                    .outbox
                    .deliveries
                    .push(Delivery::Reply { conn, reply });
            }
            Command::Close {
                conn,
                exited: false,
            } => self.apply_fact(Fact::Closed(conn), batch),
            Command::Close { conn, exited: true } => {
                self.apply_fact(Fact::ClosedByExit(conn), batch);
            }
            Command::ProcessExited(process) => {
                self.apply_fact(Fact::ProcessExited(process), batch);
            }
            Command::Resync { conn, topics, all } => {
                self.apply_fact(Fact::Resync { conn, topics, all }, batch);
            }
            Command::Shutdown { reason } => batch.shutdown = Some(reason),
        }
    }

    /// Writes the request's reply, then the events it caused.
    fn answer(&mut self, conn: ConnId, id: Value, request: Resolved, now: i64, out: &mut Outbox) {
        let reply = match request {
            Resolved::Presence(op) => {
                self.registry.handle(conn, id, op, now, out);
                return;
            }
            Resolved::Hello(hello) => OutgoingReply {
                id,
                outcome: hello_result(hello),
            },
            Resolved::Status => OutgoingReply::success(id, &self.status()),
            Resolved::Ping => OutgoingReply {
                id,
                outcome: Ok(ReplyFields::none()),
            },
        };
        out.deliveries.push(Delivery::Reply { conn, reply });
    }

    /// Applies a fact. Closes and exits wait in `batch.endings` until
    /// something else comes, so that a run of them is applied at once.
    fn apply_fact(&mut self, fact: Fact, batch: &mut Batch) {
        match &fact {
            Fact::Closed(conn) => {
                batch.endings.push(Ending::Closed(*conn));
                batch.closed.push(*conn);
            }
            Fact::ClosedByExit(conn) => {
                batch.endings.push(Ending::ClosedByExit(*conn));
                batch.closed.push(*conn);
            }
            Fact::ProcessExited(process) => batch.endings.push(Ending::Exited(*process)),
            Fact::Resync { conn, topics, all } => {
                self.apply_endings(batch);
                if *all {
                    self.registry.resync_all(*conn, &mut batch.outbox);
                } else {
                    self.registry.resync(*conn, topics, &mut batch.outbox);
                }
            }
            Fact::DeadRow(phx_ref) => {
                self.apply_endings(batch);
                batch.outbox.changes.push(Change::Delete(phx_ref.clone()));
            }
        }
        batch.facts.push(fact);
    }

    /// Applies the closes and exits waiting in the batch, together: when
    /// many clients go at once (a logout, a crashed tool that held many
    /// connections), each topic announces its departures in one diff, and
    /// its remaining entries hear of the final owner once instead of once
    /// per departed owner.
    fn apply_endings(&mut self, batch: &mut Batch) {
        if !batch.endings.is_empty() {
            let endings = std::mem::take(&mut batch.endings);
            self.registry
                .end(&endings, batch.now.wall_ms, &mut batch.outbox);
        }
    }

    fn status(&self) -> StatusReply {
        let (outbound_bytes, largest_outbound_bytes) = self
            .outlets
            .values()
            .map(|outlet| outlet.queued_bytes())
            .fold((0, 0), |(sum, largest), queued| {
                (sum + queued, largest.max(queued))
            });
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
            started_by: Some(self.info.started_by.clone()),
            awaiting_resume: self.registry.awaiting_resume_count(),
            transactions: self.store.commits(),
            outbound_bytes,
            largest_outbound_bytes,
            outbound_budget_bytes: self.registry.limits().max_outbound_total_bytes,
        }
    }

    /// Serializes each delivery once and hands it to its connections.
    fn release(&self, deliveries: Vec<Delivery>) {
        for delivery in deliveries {
            match delivery {
                Delivery::Reply { conn, reply } => {
                    if let Some(outlet) = self.outlets.get(&conn) {
                        outlet.deliver(Line {
                            kind: LineKind::Reply {
                                succeeded: reply.outcome.is_ok(),
                            },
                            bytes: reply.to_line().into(),
                        });
                    }
                }
                Delivery::ResyncedAll(conn) => {
                    if let Some(outlet) = self.outlets.get(&conn) {
                        outlet.deliver(Line {
                            kind: LineKind::ResyncedAll,
                            bytes: Arc::from(&[][..]),
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

/// The stored rows, sorted at start into those that survive the restart
/// and the refs of those that do not.
struct SortedRows {
    kept: Vec<registry::Entry>,
    dead: Vec<String>,
    /// The entries of `dead`, for the history.
    departed: Vec<registry::Entry>,
    of_another_boot: usize,
    of_exited_processes: usize,
}

/// Keeps the rows of this boot whose process still runs; a connection
/// entry among them waits until `resume_deadline` to be resumed.
fn sort_rows(stored: Vec<StoredEntry>, boot_id: &str, resume_deadline: i64) -> SortedRows {
    let mut sorted = SortedRows {
        kept: Vec::new(),
        dead: Vec::new(),
        departed: Vec::new(),
        of_another_boot: 0,
        of_exited_processes: 0,
    };
    // Many rows share a process (an editor holds many files): each is
    // looked up in /proc once.
    let mut running: HashMap<ProcessId, bool> = HashMap::new();
    for StoredEntry {
        mut entry,
        boot_id: written_in,
    } in stored
    {
        let why_dead = if written_in != boot_id {
            sorted.of_another_boot += 1;
            "it was written before the machine last booted"
        } else if !*running
            .entry(entry.process)
            // If /proc cannot tell, the row is kept: its process is
            // watched from now on and reaped once it is seen to exit.
            .or_insert_with(|| crate::sys::is_running(entry.process).unwrap_or(true))
        {
            sorted.of_exited_processes += 1;
            "its process exited while no daemon ran (pid_exit)"
        } else {
            if entry.lifetime == Lifetime::Connection {
                entry.resume_deadline = Some(resume_deadline);
            }
            sorted.kept.push(entry);
            continue;
        };
        tracing::debug!(
            "removing {} ({} on {}, pid {}): {why_dead}",
            entry.phx_ref,
            entry.key,
            entry.topic,
            entry.process.pid
        );
        sorted.dead.push(entry.phx_ref.clone());
        sorted.departed.push(entry);
    }
    sorted
}

/// What becomes of a reply when its batch is rolled back.
#[derive(Debug)]
enum Redo {
    /// It becomes an `internal` error.
    Fail,
    /// The request is asked again of the rolled-back registry.
    Ask(Resolved),
}

/// What a request's reply becomes if its batch is rolled back; `None` if
/// it stands as it is (hello, ping), since no change touched it.
///
/// Reads are asked again, so that they keep working while the disk is full
/// and show only what is committed. So are subscribe and unsubscribe: they
/// change subscriptions, which are never saved and need no commit; asked
/// again, a subscribe's `presence_state` shows the committed state, and the
/// diffs that follow build on it. Track, untrack and update are undone, so
/// they fail. A resume is not saved either, but it fails too: the facts at
/// the head of its batch (its entry's old connection closing) are undone
/// with it, so asked again it would call a resumable entry `expired`; an
/// error tells the client to try again.
fn redo_after_roll_back(request: &Resolved) -> Option<Redo> {
    match request {
        Resolved::Hello(_) | Resolved::Ping => None,
        Resolved::Status => Some(Redo::Ask(Resolved::Status)),
        Resolved::Presence(op) => Some(match op {
            Op::List(_)
            | Op::GetByKey(_)
            | Op::Subscribe(_)
            | Op::SubscribeAll
            | Op::Unsubscribe(_)
            | Op::UnsubscribeAll => Redo::Ask(Resolved::Presence(op.clone())),
            Op::Track(_) | Op::Untrack(_) | Op::Update(_) | Op::Resume(_) => Redo::Fail,
        }),
    }
}

/// `hello`: the versions agree, or the client asked for one we lack.
fn hello_result(hello: HelloRequest) -> Result<ReplyFields, ErrorBody> {
    match hello.protocol.unwrap_or(PROTOCOL_VERSION) {
        PROTOCOL_VERSION => Ok(ReplyFields::of(&HelloReply {
            protocol: PROTOCOL_VERSION,
            server: SERVER_NAME.to_owned(),
            pid: std::process::id(),
        })),
        other => Err(ErrorBody::new(
            ErrorCode::UnsupportedProtocol,
            format!("protocol {other} is not supported; this daemon speaks {PROTOCOL_VERSION}"),
        )),
    }
}

/// Who made a batch, which decides how its failure moves the retry pause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Origin {
    /// Commands from the io layer.
    #[default]
    Commands,
    /// The core's own work: waiting facts retried while idle, expiry,
    /// the clean-up at start.
    Upkeep,
}

struct Batch {
    origin: Origin,
    /// The time the batch's inputs are handled at.
    now: Now,
    outbox: Outbox,
    len: usize,
    /// For each reply that a roll-back changes, its index in
    /// `outbox.deliveries` and what becomes of it (see
    /// [`redo_after_roll_back`]), in order.
    redo: Vec<(usize, Redo)>,
    facts: Vec<Fact>,
    /// Closes and exits not yet applied (see [`Core::apply_endings`]).
    endings: Vec<Ending>,
    closed: Vec<ConnId>,
    shutdown: Option<String>,
    /// To tell whether the batch changed anything to write.
    next_seq_before: u64,
}

impl Batch {
    fn new(origin: Origin, now: Now, next_seq_before: u64) -> Batch {
        Batch {
            origin,
            now,
            outbox: Outbox::default(),
            len: 0,
            redo: Vec::new(),
            facts: Vec::new(),
            endings: Vec::new(),
            closed: Vec::new(),
            shutdown: None,
            next_seq_before,
        }
    }
}

fn line_kind(event: &Event) -> LineKind {
    match event {
        Event::PresenceState { topic, .. } => LineKind::State(topic.clone()),
        Event::PresenceDiff { topic, .. } => LineKind::Diff(topic.clone()),
        Event::Role { payload, .. } => LineKind::Role(payload.phx_ref.clone()),
        // Never dropped nor coalesced: a holder that missed one would go
        // on acting on an entry that is gone, or that has another ref.
        // A watcher of every topic that missed a `resync` would keep topics
        // that emptied while its diffs were held back.
        Event::Shutdown { .. }
        | Event::Resync { .. }
        | Event::Removed { .. }
        | Event::Updated { .. } => LineKind::Notice,
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
mod tests;
