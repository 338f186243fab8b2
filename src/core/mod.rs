//! The core: the registry, the batches around it, and what failed commits
//! leave to do, as a state machine with no I/O of its own.
//!
//! It has no channel, no clock, no socket and no database. Whoever drives
//! it (the daemon's driver, `daemon/driver.rs`, or a test) hands
//! it each input with the time ([`Core::handle`]), and asks it in turn:
//!
//! - [`Core::poll_commit`]: what the batch changed, to be saved as one
//!   unit. Nothing the batch caused is sent before the driver reports the
//!   result with [`Core::handle_commit`], so no client ever sees a change
//!   that a crash could take back, and a burst of inputs costs one commit,
//!   not one each. At most one commit is out at a time; inputs handed in
//!   meanwhile wait, and open the next batch once its result is in.
//! - [`Core::poll_transmit`]: what to send, to which connection, in order:
//!   lines serialized once however many connections they go to, bodies the
//!   driver completes with what only it knows ([`Body::Status`]), and the
//!   end of a connection.
//! - [`Core::poll_timeout`]: when it next has work of its own, which the
//!   driver reports with [`Core::handle_timeout`]: a restored entry's
//!   resume deadline, a request that waited for etcd too long, facts to
//!   retry, or the fence of the etcd lease.
//! - [`Core::poll_stopped`]: whether a shutdown has run its course.
//!
//! A batch opens with the first input after the last one closed, takes
//! inputs while [`Core::batch_has_room`] (up to `max_batch`, or a
//! shutdown), and closes when the driver asks for its commit. Every input
//! of a batch is handled at the time it opened.
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
//! One change is revealed without a commit: the fence of the etcd lease
//! (cluster mode). It changes no row and only takes away (owners of
//! shared topics stand suspended), so it is applied on its own as soon as
//! no batch is open or out, and released at once: right behind the lines
//! of a batch whose commit it fell during, and whatever the disk does.

mod line;
pub mod read;
mod recovery;
pub mod registry;
pub mod store;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ops::{self, Answered, Op, RollBack};
use crate::protocol::{
    ErrorBody, ErrorCode, Event, LeaveReason, Limits, OutgoingReply, ShutdownPayload,
};
use line::to_line;
pub use line::{Line, LineKind};
use read::ReadView;
use recovery::{Fact, Recovery};
use registry::{
    Change, ClusterInput, ClusterReport, ClusterSetup, ClusterWrite, ConnId, Delivery, Ending,
    Entry, LeaseView, Outbox, Peer, ProcessId, Registry, RowsForCluster, WriteId,
    sort_rows_for_cluster,
};

/// How many inputs one transaction may take, by default. Large enough
/// that a burst is one commit; small enough that the first reply of a
/// burst is not held back for long.
pub const MAX_BATCH: usize = 1024;

/// The pause before waiting facts are retried on their own after a failed
/// commit. It doubles with each failed retry, up to [`MAX_RETRY_PAUSE`], so
/// that a full disk never keeps an idle core busy.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(100);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// During an outage, how often a failed commit may be logged above debug
/// level: a full disk must not fill the log too.
const OUTAGE_REPORT_EVERY: Duration = Duration::from_secs(30);

/// The time, as the core is told it: the monotonic clock for its own
/// timers (retry pauses) and the wall clock for what is stored and
/// compared with stored times (resume deadlines, the history). The driver
/// reads both once per wake; tests make them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    /// Milliseconds since the Unix epoch.
    pub wall_ms: i64,
    /// The boot clock (`CLOCK_BOOTTIME`): time since boot, counting
    /// through a suspend, which the monotonic clock does not. A cluster
    /// lease's fence is set on it, as etcd's clock runs on while this
    /// machine sleeps.
    pub boot: Duration,
}

impl Now {
    /// The monotonic instant at which the wall clock reads `wall_ms`, if it
    /// runs on as it did at `self`; `self.at` if that is already past.
    pub fn instant_of(&self, wall_ms: i64) -> Instant {
        let wait = wall_ms.saturating_sub(self.wall_ms).max(0) as u64;
        self.at + Duration::from_millis(wait)
    }
}

/// Everything the io layer tells the core.
#[derive(Debug)]
pub enum Input {
    /// A connection was accepted; lines may be sent to it from now on.
    Open {
        conn: ConnId,
        peer: Peer,
    },
    /// A request, resolved by the io layer (`ops`).
    Request {
        conn: ConnId,
        id: Value,
        request: Op,
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
    /// What etcd's watch showed of shared topics, or how etcd answered a
    /// write the core handed out (cluster mode). Applied as a fact: it
    /// happened whether or not the batch commits.
    Cluster(ClusterInput),
    /// Tell every client, commit, and stop.
    Shutdown {
        reason: String,
    },
}

/// How the core is set up.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub limits: Limits,
    /// How many inputs one transaction may take (at least one). A batch of
    /// one turns group commit off, which the benchmarks do once to show
    /// what it saves.
    pub max_batch: usize,
    /// The daemon's own uid: the per-uid quotas are for the other users of
    /// a shared daemon, so its own user is held only to the total.
    pub own_uid: u32,
    /// Which topics are shared across hosts, and this host's name; `None`
    /// keeps every topic local.
    pub cluster: Option<ClusterSetup>,
}

/// What the store held at start, sorted by the driver (which alone may
/// ask the system which processes still run).
#[derive(Debug, Default)]
pub struct Restored {
    /// The entries that survive the restart.
    pub kept: Vec<Entry>,
    /// Those that do not (another boot, or their process exited while no
    /// daemon ran): their rows are deleted by the core's first commit.
    pub departed: Vec<Entry>,
    /// The seq counter as saved.
    pub next_seq: u64,
}

/// Row changes to save as one unit, handed out by [`Core::poll_commit`];
/// its result goes back through [`Core::handle_commit`] with its `id`.
#[derive(Debug)]
pub struct Commit {
    pub id: u64,
    pub changes: Vec<Change>,
    /// The seq counter to save with them.
    pub next_seq: u64,
}

/// Why a commit failed, as the driver reports it. The core only shows it
/// (in logs and `internal` errors) and hands it back in
/// [`Stopped::Unsaved`].
#[derive(Debug)]
pub struct CommitFailed(Box<dyn std::error::Error + Send + Sync>);

impl CommitFailed {
    pub fn new(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CommitFailed {
        CommitFailed(cause.into())
    }

    /// The driver's own error, to look at more closely than its message.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.0.as_ref()
    }
}

impl std::fmt::Display for CommitFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for CommitFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Who a line goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    One(ConnId),
    Many(Vec<ConnId>),
}

impl To {
    pub fn conns(&self) -> &[ConnId] {
        match self {
            To::One(conn) => std::slice::from_ref(conn),
            To::Many(conns) => conns,
        }
    }
}

/// Something to send, handed out by [`Core::poll_transmit`] in the order
/// it must reach each connection.
#[derive(Debug)]
pub enum Transmit {
    Line {
        to: To,
        line: Line,
    },
    /// A line the driver makes from views of the registry as it was at the
    /// line's place ([`ReadView::to_line`]): off the thread running the
    /// core, when it is large. Nothing may pass it on its way to `conn`.
    View {
        conn: ConnId,
        view: ReadView,
    },
    /// A successful reply whose body the driver completes: the core knows
    /// only its part of it.
    Deferred {
        conn: ConnId,
        id: Value,
        body: Body,
    },
    /// Nothing more for this connection: flush what it was sent, then
    /// close it.
    Close(ConnId),
}

/// The core's part of a deferred reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// `status`: the driver adds what is queued for clients, the store,
    /// the uptime and how the daemon runs.
    Status(Counts),
}

/// The registry's figures, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    pub topics: usize,
    pub entries: usize,
    pub connections: usize,
    pub subscriptions: usize,
    pub awaiting_resume: usize,
    pub outbound_budget_bytes: usize,
}

/// Why the core stopped.
#[derive(Debug)]
pub enum Stopped {
    /// A shutdown: rows are committed and kept for a restart.
    Shutdown,
    /// A shutdown, but facts that failed commits held back could not be
    /// saved even by a last try. The rows are as last committed; nothing
    /// uncommitted was revealed.
    Unsaved(CommitFailed),
}

/// The state machine itself; see the module comment for how to drive it.
pub struct Core {
    registry: Registry,
    recovery: Recovery,
    max_batch: usize,
    /// The connections the io layer holds a socket for: opened, not yet
    /// closed (as the io layer told, whether or not the close is saved).
    /// A shutdown is sent to each.
    connections: HashSet<ConnId>,
    /// The batch taking inputs, or closed and waiting to be polled for its
    /// commit.
    batch: Option<Batch>,
    /// The batch whose commit is out, with the commit's id.
    committing: Option<(u64, Batch)>,
    /// Inputs handed in while a commit was out or the batch was full.
    waiting: VecDeque<Input>,
    /// What settled batches left to send, in order; serialized as it is
    /// polled, so each line is made only when it goes.
    released: VecDeque<Outgoing>,
    /// For each connection with a reply waiting for etcd: that reply's
    /// place, and everything for the connection that came after it, in
    /// order (see [`Core::release`]). Empty unless a shared topic is
    /// tracked.
    gates: HashMap<ConnId, VecDeque<Slot>>,
    /// Writes to etcd of committed batches, for `poll_cluster_write`.
    cluster_out: VecDeque<ClusterWrite>,
    next_commit_id: u64,
    /// The time last handed in: `poll_timeout` turns wall-clock deadlines
    /// into instants with it.
    last_now: Now,
    /// A shutdown has been applied: nothing more is taken in.
    stopping: bool,
    stopped: Option<Stopped>,
}

impl Core {
    /// A core holding what survived the restart: process entries continue;
    /// connection entries wait until their `resume_deadline` for their
    /// client to resume them. This host's entries of shared topics are
    /// restored too, each suspended until the first listing of etcd finds
    /// its key (see [`Registry::apply_listing`]); rows of shared topics
    /// that the cluster setup no longer fits leave as expired. The rows of
    /// `departed` are deleted by the first commit (see
    /// [`Core::forget_departed`]).
    pub fn restore(config: CoreConfig, restored: Restored, now: Now) -> Core {
        let Restored {
            kept,
            departed,
            next_seq,
        } = restored;
        let RowsForCluster { kept, stale } = sort_rows_for_cluster(config.cluster.as_ref(), kept);
        let dead: Vec<(Entry, LeaveReason)> = departed
            .iter()
            .map(|entry| (entry.clone(), LeaveReason::ExitedWhileDown))
            .chain(stale.into_iter().map(|entry| (entry, LeaveReason::Expired)))
            .collect();
        let history = registry::departures_at_start(&dead, &kept, now.wall_ms);
        let gone: Vec<Entry> = dead.into_iter().map(|(entry, _)| entry).collect();
        let registry = Registry::restore(config.limits, kept, next_seq)
            .with_standings_as_stored(&gone)
            .exempt_from_uid_quotas(config.own_uid)
            .with_cluster(config.cluster)
            .awaiting_listing(&departed);
        let mut core = Core {
            registry,
            recovery: Recovery::default(),
            max_batch: config.max_batch.max(1),
            connections: HashSet::new(),
            batch: None,
            committing: None,
            waiting: VecDeque::new(),
            released: VecDeque::new(),
            gates: HashMap::new(),
            cluster_out: VecDeque::new(),
            next_commit_id: 0,
            last_now: now,
            stopping: false,
            stopped: None,
        };
        core.forget_departed(gone, history, next_seq, now);
        core
    }

    /// Opens the first batch: it deletes the rows that did not survive the
    /// restart, and saves the seq counter if restoring raised it. If
    /// nothing changed, nothing is written, so a full disk does not stop
    /// such a start.
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
    /// the deletions, and lost only if they cannot be.
    fn forget_departed(
        &mut self,
        departed: Vec<Entry>,
        history: Vec<Change>,
        stored_next_seq: u64,
        now: Now,
    ) {
        self.registry.begin_batch();
        let mut batch = Batch::new(Origin::Upkeep, now, stored_next_seq);
        batch.sealed = true;
        for entry in departed {
            self.apply_fact(Fact::DeadRow(entry.phx_ref), &mut batch);
        }
        batch.out.outbox.changes.extend(history);
        self.batch = Some(batch);
    }

    /// The processes whose exit must be watched from the start.
    pub fn watched_processes(&self) -> Vec<ProcessId> {
        self.registry.processes().collect()
    }

    /// The registry's figures, as `status` reports them.
    pub fn counts(&self) -> Counts {
        Counts {
            topics: self.registry.topic_count(),
            entries: self.registry.entry_count(),
            connections: self.registry.connection_count(),
            subscriptions: self.registry.subscription_count(),
            awaiting_resume: self.registry.awaiting_resume_count(),
            outbound_budget_bytes: self.registry.limits().max_outbound_total_bytes,
        }
    }

    /// Takes an input. It joins the open batch (opening one if none is),
    /// unless a commit is out or the batch is full: then it waits for the
    /// next. After a shutdown, inputs are dropped.
    pub fn handle(&mut self, now: Now, input: Input) {
        self.last_now = now;
        if self.stopping {
            return;
        }
        self.admit_waiting(now);
        if self.batch_has_room() && self.waiting.is_empty() {
            let mut batch = self.open_batch(Origin::Inputs, now);
            self.apply(input, &mut batch);
            self.batch = Some(batch);
        } else {
            self.waiting.push_back(input);
        }
    }

    /// Whether an input handed in now would join the open batch (or open
    /// one): not while a commit is out, once the batch holds `max_batch`
    /// inputs or a shutdown, nor after the stop. A driver draining a queue
    /// stops there, so that a burst is split into batches as it comes.
    pub fn batch_has_room(&self) -> bool {
        !self.stopping
            && self.committing.is_none()
            && self
                .batch
                .as_ref()
                .is_none_or(|batch| !batch.is_full(self.max_batch))
    }

    /// The time is up: opens a batch of the core's own work if some is due
    /// (restored entries to expire, requests that waited for etcd too long
    /// to answer, facts to retry). Nothing happens otherwise, so a driver
    /// that wakes early does no harm.
    pub fn handle_timeout(&mut self, now: Now) {
        self.last_now = now;
        if self.stopping || self.committing.is_some() || self.batch.is_some() {
            // An open batch does this work at its head already.
            return;
        }
        self.fence_alone_if_due(now);
        if self.poll_timeout().is_some_and(|at| at <= now.at) {
            let mut batch = self.open_batch(Origin::Upkeep, now);
            batch.sealed = true;
            self.batch = Some(batch);
        }
    }

    /// When the core next has work of its own: a restored entry's resume
    /// deadline, a request that waited for etcd too long, a refused
    /// re-creation of a key to ask again, or facts to retry, never before
    /// the retry pause after a failed commit, so that a failing disk
    /// cannot make an idle core spin; and the fence of a live lease, pause
    /// or not, since it writes nothing.
    /// A batch of inputs does this work too, at its head, pause or not.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stopped.is_some() || self.stopping {
            return None;
        }
        let now = self.last_now;
        let expiry = self
            .registry
            .next_resume_deadline()
            .map(|deadline| now.instant_of(deadline));
        let parked = self
            .registry
            .next_park_deadline()
            .map(|deadline| now.instant_of(deadline));
        let requeue = self
            .registry
            .next_requeue_retry()
            .map(|at| now.instant_of(at));
        let retry = (!self.recovery.facts.is_empty()).then_some(now.at);
        // A backstop: the lease keeper's alarm is what fences on time. This
        // instant is on the monotonic clock, which stops during a suspend;
        // the boot clock read with each batch covers that.
        let fence = match self.registry.lease() {
            LeaseView::Live { fence_at, .. } => Some(now.at + fence_at.saturating_sub(now.boot)),
            _ => None,
        };
        let due = expiry
            .into_iter()
            .chain(parked)
            .chain(requeue)
            .chain(retry)
            .min()
            .map(|due| match &self.recovery.outage {
                Some(outage) => due.max(outage.retry_at),
                None => due,
            });
        due.into_iter().chain(fence).min()
    }

    /// Closes the open batch (or opens one for inputs that waited) and
    /// hands out what it changed, to be committed as one unit. A batch that
    /// changed no row and no seq needs no commit: its lines are released at
    /// once and the next batch, if any, is looked at. `None` once nothing
    /// is left to commit, or while a commit is out.
    pub fn poll_commit(&mut self, now: Now) -> Option<Commit> {
        self.last_now = now;
        if self.committing.is_some() {
            return None;
        }
        loop {
            self.admit_waiting(now);
            let mut batch = self.batch.take()?;
            self.apply_endings(&mut batch);
            batch.out.take_deliveries();
            let changed = !batch.out.outbox.changes.is_empty()
                || self.registry.next_seq() != batch.next_seq_before;
            if changed {
                let id = self.next_commit_id;
                self.next_commit_id += 1;
                let commit = Commit {
                    id,
                    changes: std::mem::take(&mut batch.out.outbox.changes),
                    next_seq: self.registry.next_seq(),
                };
                self.committing = Some((id, batch));
                return Some(commit);
            }
            // Nothing to write, so nothing that could fail to be written.
            self.settle(batch, Settled::NothingToCommit, now);
        }
    }

    /// The result of the commit handed out with `id`. Committed, the
    /// batch's lines are released; failed, the batch is rolled back and
    /// what survives it is released (see [`Core::answer_again`]).
    pub fn handle_commit(&mut self, now: Now, id: u64, result: Result<(), CommitFailed>) {
        self.last_now = now;
        match self.committing.take() {
            Some((out, batch)) if out == id => {
                let settled = match result {
                    Ok(()) => Settled::Committed,
                    Err(cause) => Settled::Failed(cause),
                };
                self.settle(batch, settled, now);
            }
            other => {
                tracing::error!("the result of commit {id}, which is not the one out, ignored");
                self.committing = other;
            }
        }
    }

    /// The next thing to send, in order.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        loop {
            if let Some(transmit) = self.transmit_next()? {
                return Some(transmit);
            }
        }
    }

    /// The next released line as a transmit; `Some(None)` for what the
    /// gates consume and never release (nothing, by construction).
    fn transmit_next(&mut self) -> Option<Option<Transmit>> {
        Some(Some(match self.released.pop_front()? {
            Outgoing::Delivery(Delivery::Reply { conn, reply }) => Transmit::Line {
                to: To::One(conn),
                line: Line {
                    kind: LineKind::Reply {
                        succeeded: reply.outcome.is_ok(),
                    },
                    bytes: reply.to_line().into(),
                },
            },
            Outgoing::Delivery(Delivery::ResyncedAll(conn)) => Transmit::Line {
                to: To::One(conn),
                line: Line {
                    kind: LineKind::ResyncedAll,
                    bytes: Arc::from(&[][..]),
                },
            },
            Outgoing::Delivery(Delivery::Event { to, event }) => Transmit::Line {
                to: To::Many(to),
                line: Line {
                    kind: line_kind(&event),
                    bytes: to_line(&event),
                },
            },
            Outgoing::Delivery(Delivery::View { conn, view }) => Transmit::View { conn, view },
            Outgoing::Status { conn, id, counts } => Transmit::Deferred {
                conn,
                id,
                body: Body::Status(counts),
            },
            Outgoing::Close(conn) => Transmit::Close(conn),
            Outgoing::Delivery(Delivery::Awaiting { .. } | Delivery::Resolved { .. }) => {
                return Some(None);
            }
        }))
    }

    /// The next write to etcd: only writes of batches whose commit went
    /// through (or that had nothing to commit) are handed out, so etcd,
    /// which cannot take a write back, never holds what the database
    /// does not. The driver polls it after `poll_transmit`.
    pub fn poll_cluster_write(&mut self) -> Option<ClusterWrite> {
        self.cluster_out.pop_front()
    }

    /// How the core stopped, once a shutdown has run its course and its
    /// lines are handed out.
    pub fn poll_stopped(&mut self) -> Option<Stopped> {
        self.stopped.take()
    }

    /// Opens a batch, and applies first what the core owes from before:
    /// the facts that failed commits could not save, so that nothing in
    /// the batch is worked out from a state that has already ended (the
    /// entries of a closed connection or an exited process), and the
    /// expiry of restored entries whose deadline has passed. Returns the
    /// open batch if there is one.
    fn open_batch(&mut self, origin: Origin, now: Now) -> Batch {
        if let Some(mut batch) = self.batch.take() {
            self.fence_if_due(now, &mut batch);
            return batch;
        }
        self.fence_alone_if_due(now);
        self.registry.begin_batch();
        let mut batch = Batch::new(origin, now, self.registry.next_seq());
        self.fence_if_due(now, &mut batch);
        for fact in std::mem::take(&mut self.recovery.facts) {
            self.apply_fact(fact, &mut batch);
        }
        self.apply_endings(&mut batch);
        self.registry
            .expire(batch.now.wall_ms, &mut batch.out.outbox);
        self.registry
            .time_out_parked(batch.now.wall_ms, &mut batch.out.outbox);
        self.registry
            .retry_requeue(batch.now.wall_ms, &mut batch.out.outbox);
        batch
    }

    /// Fences this host's entries of shared topics if the boot clock has
    /// reached the fence of the lease last told live, before anything
    /// else in `batch`: no standing worked out past the fence says owner,
    /// even if the lease keeper's word of it is late (its alarm fired
    /// while the core was busy, or the machine woke from a suspend).
    fn fence_if_due(&mut self, now: Now, batch: &mut Batch) {
        if !self.fence_due(now) {
            return;
        }
        tracing::info!("the etcd lease's fence fell; the core fences ahead of the lease keeper");
        self.apply_endings(batch);
        let fenced = self.registry.lease().as_of(now.boot);
        self.registry
            .set_lease(fenced, batch.now.wall_ms, &mut batch.out.outbox);
    }

    /// Fences this host's entries of shared topics on their own, if the
    /// fence is due and no batch is open or out, and releases the
    /// suspensions at once, behind whatever was released before. A fence
    /// changes no row, so it needs no commit: it is never held back behind
    /// another batch's, nor by a disk that fails. Revealing it uncommitted
    /// is safe, as it only takes away: a client told it is suspended stops
    /// writing, and is told it owns again when a live lease says so.
    fn fence_alone_if_due(&mut self, now: Now) {
        if self.batch.is_some() || self.committing.is_some() || !self.fence_due(now) {
            return;
        }
        self.registry.begin_batch();
        let mut fence = Batch::new(Origin::Upkeep, now, self.registry.next_seq());
        fence.sealed = true;
        self.fence_if_due(now, &mut fence);
        let changed = !fence.out.outbox.changes.is_empty()
            || self.registry.next_seq() != fence.next_seq_before;
        if changed {
            // Not from a fence alone; should it ever change a row, its
            // lines wait for the commit like any batch's.
            self.batch = Some(fence);
            return;
        }
        self.settle(fence, Settled::NothingToCommit, now);
    }

    /// Whether the boot clock has reached the fence of a lease still
    /// held live.
    fn fence_due(&self, now: Now) -> bool {
        matches!(self.registry.lease(), LeaseView::Live { fence_at, .. } if now.boot >= fence_at)
    }

    /// Applies the inputs that waited for a commit, as far as the batch
    /// has room.
    fn admit_waiting(&mut self, now: Now) {
        while !self.waiting.is_empty() && self.batch_has_room() {
            let Some(input) = self.waiting.pop_front() else {
                break;
            };
            let mut batch = self.open_batch(Origin::Inputs, now);
            self.apply(input, &mut batch);
            self.batch = Some(batch);
        }
    }

    /// Ends a batch whose commit is settled: reveals it, or, if the commit
    /// failed, reveals what survives the roll-back; then closes the
    /// connections it saw close, and carries a shutdown on.
    fn settle(&mut self, mut batch: Batch, settled: Settled, now: Now) {
        batch.out.take_deliveries();
        let lines = match &settled {
            Settled::NothingToCommit | Settled::Committed => {
                self.registry.settle();
                if matches!(settled, Settled::Committed) {
                    self.recovery.succeeded(now.at);
                }
                self.cluster_out
                    .extend(std::mem::take(&mut batch.out.outbox.cluster));
                batch.out.lines
            }
            Settled::Failed(cause) => {
                self.registry.roll_back();
                let refused = batch
                    .redo
                    .iter()
                    .filter(|(_, redo)| matches!(redo, Redo::Fail))
                    .count();
                let lines = self.answer_again(batch.out.lines, batch.redo, batch.now, cause);
                self.recovery
                    .failed(cause, batch.origin, refused, batch.facts, now.at);
                lines
            }
        };
        // A failed batch's writes go nowhere: the roll-back took back what
        // asked for them.
        for line in lines {
            self.release(line);
        }
        // Closed connections get no more lines even if their close is to be
        // retried: their sockets are gone either way.
        for conn in batch.closed {
            if self.connections.remove(&conn) {
                self.release(Outgoing::Close(conn));
            }
        }
        if let Some(reason) = batch.last_try_before {
            self.stopped = Some(match settled {
                Settled::Failed(cause) => Stopped::Unsaved(cause),
                _ => Stopped::Shutdown,
            });
            self.shut_down(reason);
        } else if let Some(reason) = batch.shutdown {
            self.stop(reason, now);
        }
        // The fence fell while the batch was out: its lines may tell a
        // client it owns a shared topic, worked out while the lease was
        // live, and they go now, past the fence. The suspensions go right
        // behind them, in this same release, whether the commit went
        // through or not: a failed one's retry waits out its pause, the
        // fence must not.
        if !self.stopping {
            self.fence_alone_if_due(now);
        }
    }

    /// Shuts down, after one last try for the facts that failed commits
    /// held back. Only facts that even that cannot save make the stop a
    /// failure: a failed request was answered already, and the rows stay
    /// as last committed.
    fn stop(&mut self, reason: String, now: Now) {
        self.waiting.clear();
        if self.recovery.facts.is_empty() {
            self.stopped = Some(Stopped::Shutdown);
            self.shut_down(reason);
        } else {
            let mut last_try = self.open_batch(Origin::Upkeep, now);
            last_try.sealed = true;
            last_try.last_try_before = Some(reason);
            self.batch = Some(last_try);
        }
    }

    /// Tells every client that the daemon is going away, and closes every
    /// connection. The rows stay, so a restarted daemon gives everyone
    /// their place back.
    fn shut_down(&mut self, reason: String) {
        // Replies still waiting for etcd are not sent: every connection is
        // closed.
        self.gates.clear();
        let mut to: Vec<ConnId> = self.connections.drain().collect();
        to.sort_unstable();
        let event = Event::Shutdown {
            payload: ShutdownPayload { reason },
        };
        let closes: Vec<Outgoing> = to.iter().map(|conn| Outgoing::Close(*conn)).collect();
        if !to.is_empty() {
            self.released
                .push_back(Outgoing::Delivery(Delivery::Event { to, event }));
        }
        self.released.extend(closes);
    }

    /// The replies of a rolled-back batch, each in its place. A reply
    /// worked out from undone changes becomes an `internal` error; a read
    /// is asked again of the rolled-back registry; hello, ping and
    /// refusals stand. Events described the undone changes, so none is
    /// sent, except the `presence_state` of a subscribe asked again.
    fn answer_again(
        &mut self,
        lines: Vec<Outgoing>,
        redo: Vec<(usize, Redo)>,
        now: Now,
        cause: &CommitFailed,
    ) -> Vec<Outgoing> {
        let error = ErrorBody::new(
            ErrorCode::Internal,
            format!("could not save the change: {cause}"),
        );
        let mut redo = redo.into_iter().peekable();
        let mut out = Out::default();
        for (index, line) in lines.into_iter().enumerate() {
            let (conn, id) = match &line {
                Outgoing::Delivery(Delivery::Reply { conn, reply }) => (*conn, reply.id.clone()),
                Outgoing::Delivery(Delivery::View { conn, view }) => match view.id() {
                    Some(id) => (*conn, id.clone()),
                    // A state is an event: its subscribe, asked again,
                    // takes a new one.
                    None => continue,
                },
                Outgoing::Status { conn, id, .. } => (*conn, id.clone()),
                Outgoing::Delivery(Delivery::Awaiting { conn, id, .. }) => (*conn, id.clone()),
                _ => continue,
            };
            match redo.next_if(|(at, _)| *at == index) {
                None => {
                    out.take_deliveries();
                    out.lines.push(line);
                }
                Some((_, Redo::Fail)) => {
                    let reply = OutgoingReply::failure(id, error.clone());
                    out.push(Delivery::Reply { conn, reply });
                }
                Some((_, Redo::Ask(request))) => {
                    self.answer(conn, id, request, now.wall_ms, &mut out)
                }
            }
        }
        out.take_deliveries();
        debug_assert!(
            out.outbox.changes.is_empty(),
            "a request asked again changed a row"
        );
        out.lines
    }

    /// Releases a line of a settled batch, keeping each connection's
    /// replies in request order: once a reply waits for etcd, every later
    /// line to its connection waits behind it, and all go, in order, when
    /// it is resolved. Another connection's lines pass. A daemon with no
    /// waiting reply pays one emptiness check.
    fn release(&mut self, line: Outgoing) {
        if self.gates.is_empty() && !line.awaits() {
            self.released.push_back(line);
            return;
        }
        match line {
            Outgoing::Delivery(Delivery::Awaiting { conn, write, .. }) => {
                self.gates
                    .entry(conn)
                    .or_default()
                    .push_back(Slot::Waiting(write));
            }
            Outgoing::Delivery(Delivery::Resolved {
                conn,
                write,
                deliveries,
            }) => self.resolve(conn, write, deliveries),
            Outgoing::Delivery(Delivery::Event { to, event }) => {
                let (gated, open): (Vec<ConnId>, Vec<ConnId>) = to
                    .into_iter()
                    .partition(|conn| self.gates.contains_key(conn));
                for conn in gated {
                    let event = Delivery::Event {
                        to: vec![conn],
                        event: event.clone(),
                    };
                    self.queue(conn, Outgoing::Delivery(event));
                }
                if !open.is_empty() {
                    let event = Delivery::Event { to: open, event };
                    self.released.push_back(Outgoing::Delivery(event));
                }
            }
            Outgoing::Close(conn) => {
                // The socket is gone: what waited for it is dropped.
                self.gates.remove(&conn);
                self.released.push_back(Outgoing::Close(conn));
            }
            line => match line.conn() {
                Some(conn) if self.gates.contains_key(&conn) => self.queue(conn, line),
                _ => self.released.push_back(line),
            },
        }
    }

    /// Puts a line for a gated connection behind what waits there.
    fn queue(&mut self, conn: ConnId, line: Outgoing) {
        if let Some(gate) = self.gates.get_mut(&conn) {
            gate.push_back(Slot::Line(line));
        }
    }

    /// The reply that waited on `write` is made: it takes its place, and
    /// the connection's lines go up to the next reply still waiting.
    fn resolve(&mut self, conn: ConnId, write: WriteId, deliveries: Vec<Delivery>) {
        let Some(gate) = self.gates.get_mut(&conn) else {
            // Nothing waits there (its connection closed): nothing is
            // kept for it either.
            for delivery in deliveries {
                self.released.push_back(Outgoing::Delivery(delivery));
            }
            return;
        };
        if let Some(at) = gate
            .iter()
            .position(|slot| matches!(slot, Slot::Waiting(w) if *w == write))
        {
            let lines = deliveries
                .into_iter()
                .map(|delivery| Slot::Line(Outgoing::Delivery(delivery)));
            let rest = gate.split_off(at + 1);
            gate.pop_back();
            gate.extend(lines);
            gate.extend(rest);
        }
        while let Some(Slot::Line(_)) = gate.front() {
            if let Some(Slot::Line(line)) = gate.pop_front() {
                self.released.push_back(line);
            }
        }
        if gate.is_empty() {
            self.gates.remove(&conn);
        }
    }

    fn apply(&mut self, input: Input, batch: &mut Batch) {
        batch.len += 1;
        if !matches!(input, Input::Close { .. } | Input::ProcessExited(_)) {
            self.apply_endings(batch);
        }
        match input {
            Input::Open { conn, peer } => {
                self.registry.open(conn, peer);
                self.connections.insert(conn);
            }
            Input::Request { conn, id, request } => {
                if let Some(redo) = redo_after_roll_back(&request) {
                    // The reply is written first, at this index.
                    batch.redo.push((batch.out.take_deliveries(), redo));
                }
                self.answer(conn, id, request, batch.now.wall_ms, &mut batch.out);
            }
            Input::Refuse { conn, id, error } => {
                let reply = OutgoingReply::failure(id, error);
                batch.out.push(Delivery::Reply { conn, reply });
            }
            Input::Close {
                conn,
                exited: false,
            } => self.apply_fact(Fact::Closed(conn), batch),
            Input::Close { conn, exited: true } => {
                self.apply_fact(Fact::ClosedByExit(conn), batch);
            }
            Input::ProcessExited(process) => {
                self.apply_fact(Fact::ProcessExited(process), batch);
            }
            Input::Resync { conn, topics, all } => {
                self.apply_fact(Fact::Resync { conn, topics, all }, batch);
            }
            Input::Cluster(changes) => self.apply_fact(Fact::Cluster(changes), batch),
            Input::Shutdown { reason } => {
                batch.shutdown = Some(reason);
                self.stopping = true;
            }
        }
    }

    /// Writes the request's reply, then the events it caused.
    fn answer(&mut self, conn: ConnId, id: Value, request: Op, now: i64, out: &mut Out) {
        let answered = ops::answer(&mut self.registry, conn, id, request, now, &mut out.outbox);
        if let Answered::Status(id) = answered {
            let counts = self.counts();
            out.take_deliveries();
            out.lines.push(Outgoing::Status { conn, id, counts });
        }
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
                    self.registry.resync_all(*conn, &mut batch.out.outbox);
                } else {
                    self.registry.resync(*conn, topics, &mut batch.out.outbox);
                }
            }
            Fact::DeadRow(phx_ref) => {
                self.apply_endings(batch);
                batch
                    .out
                    .outbox
                    .changes
                    .push(Change::Delete(phx_ref.clone()));
            }
            Fact::Cluster(ClusterInput::Changes(changes)) => {
                self.apply_endings(batch);
                let report =
                    self.registry
                        .apply_cluster(changes, batch.now.wall_ms, &mut batch.out.outbox);
                log_cluster_report(changes.revision, &report);
            }
            Fact::Cluster(ClusterInput::Listing(listing)) => {
                self.apply_endings(batch);
                let report =
                    self.registry
                        .apply_listing(listing, batch.now.wall_ms, &mut batch.out.outbox);
                log_cluster_report(listing.revision, &report);
            }
            Fact::Cluster(ClusterInput::Written { write, outcome }) => {
                self.apply_endings(batch);
                self.registry.cluster_written(
                    *write,
                    outcome,
                    batch.now.wall_ms,
                    &mut batch.out.outbox,
                );
            }
            Fact::Cluster(ClusterInput::Lease(view)) => {
                self.apply_endings(batch);
                // The word may come after the fence it names (the keeper
                // told it late, or a failed commit made it wait to be
                // applied again): read as it stands now, it is a fence.
                let view = view.as_of(self.last_now.boot.max(batch.now.boot));
                self.registry
                    .set_lease(view, batch.now.wall_ms, &mut batch.out.outbox);
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
                .end(&endings, batch.now.wall_ms, &mut batch.out.outbox);
        }
    }
}

/// Says what of etcd's changes was not applied as it came: the io layer
/// checks values as it decodes them, so these are other writers' keys or
/// settings that differ between hosts, worth a line each time.
fn log_cluster_report(revision: u64, report: &ClusterReport) {
    let counts = [
        (report.not_shared, "of topics not shared here"),
        (report.own_host, "of this host's own entries"),
        (report.bad_id, "with ids naming no host"),
        (
            report.place_taken,
            "whose revision or ref another entry holds",
        ),
        (report.over_cap, "past the cap on other hosts' entries"),
    ];
    let ignored: Vec<String> = counts
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, why)| format!("{n} {why}"))
        .collect();
    if !ignored.is_empty() {
        tracing::warn!(
            "cluster changes at revision {revision}: ignored {}",
            ignored.join(", ")
        );
    }
    if report.unreadable > 0 {
        tracing::warn!(
            "cluster changes at revision {revision}: {} kept with an empty meta,              their values unreadable or past this daemon's limits",
            recovery::counted(report.unreadable, "entry")
        );
    }
}

/// How a batch's commit came out.
enum Settled {
    /// It changed nothing to write.
    NothingToCommit,
    Committed,
    Failed(CommitFailed),
}

/// What a batch sends, in order, before it is serialized.
#[derive(Debug)]
enum Outgoing {
    Delivery(Delivery),
    /// A `status` reply, completed by the driver.
    Status {
        conn: ConnId,
        id: Value,
        counts: Counts,
    },
    Close(ConnId),
}

impl Outgoing {
    /// It opens a gate: a reply waiting for etcd.
    fn awaits(&self) -> bool {
        matches!(self, Outgoing::Delivery(Delivery::Awaiting { .. }))
    }

    /// The one connection it goes to, if it goes to one.
    fn conn(&self) -> Option<ConnId> {
        match self {
            Outgoing::Delivery(
                Delivery::Reply { conn, .. }
                | Delivery::View { conn, .. }
                | Delivery::ResyncedAll(conn)
                | Delivery::Awaiting { conn, .. }
                | Delivery::Resolved { conn, .. },
            )
            | Outgoing::Status { conn, .. }
            | Outgoing::Close(conn) => Some(*conn),
            Outgoing::Delivery(Delivery::Event { .. }) => None,
        }
    }
}

/// A place in a gate: a reply still waiting for etcd, or a line that
/// waits behind one.
#[derive(Debug)]
enum Slot {
    Waiting(WriteId),
    Line(Outgoing),
}

/// Where a batch's inputs write: the registry's outbox (row changes, and
/// deliveries not yet moved on), and the lines in order.
#[derive(Debug, Default)]
struct Out {
    outbox: Outbox,
    lines: Vec<Outgoing>,
}

impl Out {
    /// Moves the registry's deliveries to the lines, so that what comes
    /// next follows them; returns the index of the next line.
    fn take_deliveries(&mut self) -> usize {
        self.lines
            .extend(self.outbox.deliveries.drain(..).map(Outgoing::Delivery));
        self.lines.len()
    }

    fn push(&mut self, delivery: Delivery) {
        self.outbox.deliveries.push(delivery);
    }
}

struct Batch {
    origin: Origin,
    /// The time the batch's inputs are handled at.
    now: Now,
    out: Out,
    /// How many inputs it took.
    len: usize,
    /// Takes no inputs: the core's own work (upkeep, the clean-up at
    /// start, the last try before stopping).
    sealed: bool,
    /// For each reply that a roll-back changes, its index in `out.lines`
    /// and what becomes of it (see [`redo_after_roll_back`]), in order.
    redo: Vec<(usize, Redo)>,
    facts: Vec<Fact>,
    /// Closes and exits not yet applied (see [`Core::apply_endings`]).
    endings: Vec<Ending>,
    closed: Vec<ConnId>,
    /// A shutdown was asked for in this batch.
    shutdown: Option<String>,
    /// This batch is the last try for waiting facts before stopping, for
    /// this reason.
    last_try_before: Option<String>,
    /// To tell whether the batch changed anything to write.
    next_seq_before: u64,
}

impl Batch {
    fn new(origin: Origin, now: Now, next_seq_before: u64) -> Batch {
        Batch {
            origin,
            now,
            out: Out::default(),
            len: 0,
            sealed: false,
            redo: Vec::new(),
            facts: Vec::new(),
            endings: Vec::new(),
            closed: Vec::new(),
            shutdown: None,
            last_try_before: None,
            next_seq_before,
        }
    }

    fn is_full(&self, max_batch: usize) -> bool {
        self.sealed || self.shutdown.is_some() || self.len >= max_batch
    }
}

/// What becomes of a reply when its batch is rolled back.
#[derive(Debug)]
enum Redo {
    /// It becomes an `internal` error.
    Fail,
    /// The request is asked again of the rolled-back registry.
    Ask(Op),
}

/// What a request's reply becomes if its batch is rolled back (each op
/// says, `OpSpec::ON_ROLL_BACK`); `None` if it stands as it is.
fn redo_after_roll_back(request: &Op) -> Option<Redo> {
    match request.on_roll_back() {
        RollBack::Stands => None,
        RollBack::AskAgain => Some(Redo::Ask(request.clone())),
        RollBack::Fails => Some(Redo::Fail),
    }
}

/// Who made a batch, which decides how its failure moves the retry pause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Origin {
    /// Inputs from the io layer.
    #[default]
    Inputs,
    /// The core's own work: waiting facts retried while idle, expiry,
    /// the clean-up at start.
    Upkeep,
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

#[cfg(test)]
pub(crate) mod tests;
