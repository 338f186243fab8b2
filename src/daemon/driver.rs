//! The core's driver: runs the sans-IO [`Core`] with the io layer's
//! commands, the clocks and the store, on whichever thread has work for
//! it.
//!
//! An io thread that hears something (a request line, a connection's end,
//! a process's exit) queues it as a [`Command`] and, once the other tasks
//! it has ready have queued theirs ([`CoreHandle::drive_soon`]), runs the
//! core to completion itself if nobody else is: applies what is queued as
//! one batch, commits the batch's changes in one SQLite transaction, and
//! hands its lines to each connection's [`Outlet`], which writes them to
//! the socket at once when nothing is queued before them. An owner's end thus
//! reaches the spectator's socket on the thread the kernel woke for it,
//! with no other thread to wake on the way. A thread that finds the core
//! busy only queues: the one running it takes what was queued before it
//! lets go, so that whatever arrives during a commit shares the next one
//! (group commit). So that no io thread is kept from its own connections
//! for long, one that finds more queued after its batch yields to them
//! before it runs the next; a caller that cannot yield hands the rest to
//! the driver's own thread after [`COMBINING_ROUNDS`] batches. That thread
//! otherwise sleeps until the core's `poll_timeout` (resume expiry,
//! retries after a failed commit).
//!
//! After each batch, with its lines out, the history is trimmed and the
//! log checkpointed when due (unless a commit failed). The core decides
//! everything; the driver only carries it out.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::cluster::ClusterProbe;
use super::lock;
use super::serializer::{Route, SerializerLane};
use crate::core::registry::{ClusterSetup, ClusterWrite, ConnId, Entry, Peer, ProcessId};
use crate::core::store::{Store, StoreError, StoredEntry};
use crate::core::{
    Body, CommitFailed, Core, CoreConfig, Counts, Input, Line, LineKind, Now, Restored, Stopped,
    To, Transmit,
};
use crate::protocol::{Lifetime, Limits, OutgoingReply, PROTOCOL_VERSION, StatusReply};

/// How many batches [`CoreHandle::drive`], which cannot yield, runs in a
/// row before it hands what is still queued to the driver's thread. One
/// batch takes everything queued up to the core's batch limit, so under
/// load this is thousands of requests; a thread that runs more keeps its
/// own connections waiting.
const COMBINING_ROUNDS: usize = 4;

/// How often the history is trimmed to its retention bounds, when the
/// last pass left nothing over.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Where the driver sends a connection's lines. Implemented by the io
/// layer; `deliver` must never block, since the core waits for it.
pub trait Outlet: Send + Sync {
    fn deliver(&self, line: Line);
    /// No more lines will come: flush what is queued, then close.
    fn close(&self);
    /// Bytes delivered and not yet written to the client, for `status`.
    fn queued_bytes(&self) -> usize;
}

/// Everything the io layer asks of the core: an [`Input`], or a new
/// connection with the outlet its lines go to, which the driver keeps
/// (the core itself only learns that the connection is open).
pub enum Command {
    Open {
        conn: ConnId,
        peer: Peer,
        outlet: Arc<dyn Outlet>,
    },
    Input(Input),
}

impl From<Input> for Command {
    fn from(input: Input) -> Command {
        Command::Input(input)
    }
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

/// What the driver needs in cluster mode: which topics are shared and
/// this host's name, for the core; where the core's writes to etcd go
/// once their batch is committed; and what `status` shows of it.
pub struct ClusterLink {
    pub setup: ClusterSetup,
    pub writes: tokio::sync::mpsc::UnboundedSender<ClusterWrite>,
    pub probe: Arc<ClusterProbe>,
}

/// The core with everything it needs to run: the store its batches are
/// committed to, and where each connection's lines go. Run by one thread
/// at a time, through a [`CoreHandle`].
pub struct Driver {
    core: Core,
    store: Store,
    outlets: HashMap<ConnId, Route>,
    /// Where large reads are made into lines, off the io threads.
    lane: SerializerLane,
    info: DaemonInfo,
    /// When to next trim the history to its retention bounds.
    next_prune: Instant,
    /// Cluster mode's writer and status, if the daemon shares topics.
    cluster_writes: Option<tokio::sync::mpsc::UnboundedSender<ClusterWrite>>,
    cluster_probe: Option<Arc<ClusterProbe>>,
}

/// Both clocks, read once per batch: every input of a batch is handled
/// at one time.
fn read_clocks() -> Now {
    Now {
        at: Instant::now(),
        wall_ms: crate::sys::now_millis(),
        boot: crate::sys::BootInstant::now().since_boot(),
    }
}

impl Driver {
    /// Loads the store and decides what survives the restart: rows of
    /// another boot or of a process that is gone are removed (committed
    /// here, or, on a full disk or a locked database, retried by the core
    /// as it runs); process entries continue; connection entries wait
    /// `resume_grace` for their client to resume them.
    pub fn start(
        store: Store,
        limits: Limits,
        boot_id: &str,
        resume_grace: Duration,
        info: DaemonInfo,
        max_batch: usize,
        cluster: Option<ClusterLink>,
    ) -> Result<Driver, StoreError> {
        let (stored, stored_next_seq) = store.load()?;
        let now = read_clocks();
        let resume_deadline = now.wall_ms + resume_grace.as_millis() as i64;
        let sorted = sort_rows(stored, boot_id, resume_deadline);
        tracing::info!(
            kept = sorted.kept.len(),
            removed_pid_exit = sorted.of_exited_processes,
            removed_other_boot = sorted.of_another_boot,
            "loaded presences from {}",
            store.path().display()
        );
        let config = CoreConfig {
            limits,
            max_batch,
            own_uid: crate::sys::current_uid(),
            cluster: cluster.as_ref().map(|link| link.setup.clone()),
        };
        let restored = Restored {
            kept: sorted.kept,
            departed: sorted.departed,
            next_seq: stored_next_seq,
        };
        let mut driver = Driver {
            core: Core::restore(config, restored, now),
            store,
            outlets: HashMap::new(),
            lane: SerializerLane::start(),
            info,
            next_prune: now.at,
            cluster_probe: cluster.as_ref().map(|link| Arc::clone(&link.probe)),
            cluster_writes: cluster.map(|link| link.writes),
        };
        // The first commit deletes the rows that did not survive. A failure
        // that passes by itself leaves them to the core's retries; any
        // other stops the start.
        while let Some(commit) = driver.core.poll_commit(now) {
            let result = driver.store.commit(&commit.changes, commit.next_seq);
            let result = match result {
                Err(cause) if !cause.is_passing() => return Err(cause),
                other => other.map_err(CommitFailed::new),
            };
            driver.core.handle_commit(read_clocks(), commit.id, result);
        }
        Ok(driver)
    }

    /// The processes whose exit must be watched from the start.
    pub fn watched_processes(&self) -> Vec<ProcessId> {
        self.core.watched_processes()
    }

    /// Runs one batch: hands the core what is queued, as far as the batch
    /// has room (the first command always, so that the queue moves), or
    /// else the core's own work if it is due; commits; and sends what the
    /// commit releases. What did not fit stays queued. Returns how the core
    /// stopped, if it did. A failed commit does not stop it: the core rolls
    /// it back and retries what it must.
    fn run_batch(&mut self, now: Now, queued: &mut VecDeque<Command>) -> Option<Stopped> {
        if let Some(first) = queued.pop_front() {
            self.hand_in(now, first);
        }
        while self.core.batch_has_room() {
            match queued.pop_front() {
                Some(command) => self.hand_in(now, command),
                None => break,
            }
        }
        // Nothing unless due, and nothing while a batch is open: the batch
        // does the core's own work at its head.
        self.core.handle_timeout(now);
        self.commit_and_release(now);
        self.core.poll_stopped()
    }

    /// Hands a command to the core, keeping the outlet of a new connection.
    fn hand_in(&mut self, now: Now, command: Command) {
        let input = match command {
            Command::Open { conn, peer, outlet } => {
                self.outlets.insert(conn, Route::new(outlet));
                Input::Open { conn, peer }
            }
            Command::Input(input) => input,
        };
        self.core.handle(now, input);
    }

    /// Commits each batch the core hands out, and sends what it releases.
    /// Then, with the lines out so that neither delays them, trims the
    /// history and checkpoints the log if due: after any wake whose
    /// commits all went through, those that needed none included, so that
    /// a quiet daemon trims too.
    fn commit_and_release(&mut self, now: Now) {
        let mut all_committed = true;
        loop {
            // `status` counts the transactions before its own batch's.
            let transactions = self.store.commits();
            let commit = self.core.poll_commit(now);
            let committed = match &commit {
                Some(commit) => {
                    let result = self.store.commit(&commit.changes, commit.next_seq);
                    let committed = result.is_ok();
                    let after = read_clocks();
                    self.core
                        .handle_commit(after, commit.id, result.map_err(CommitFailed::new));
                    committed
                }
                None => false,
            };
            self.release(transactions);
            if commit.is_none() {
                break;
            }
            all_committed &= committed;
        }
        if all_committed {
            self.prune_history_if_due(read_clocks());
            self.store.checkpoint_if_due();
        }
    }

    /// Hands each line the core releases to its connections' outlets.
    fn release(&mut self, transactions: u64) {
        // Looked at only for a `status`, and once per batch: every queue
        // is locked to add them up.
        let mut outbound = None;
        while let Some(transmit) = self.core.poll_transmit() {
            match transmit {
                Transmit::Line {
                    to: To::One(conn),
                    line,
                } => {
                    if let Some(route) = self.outlets.get(&conn) {
                        self.lane.send_line(route, line);
                    }
                }
                Transmit::Line {
                    to: To::Many(conns),
                    line,
                } => {
                    for conn in conns {
                        if let Some(route) = self.outlets.get(&conn) {
                            self.lane.send_line(route, line.clone());
                        }
                    }
                }
                Transmit::Deferred {
                    conn,
                    id,
                    body: Body::Status(counts),
                } => {
                    if !self.outlets.contains_key(&conn) {
                        continue;
                    }
                    let outbound = *outbound.get_or_insert_with(|| self.outbound_bytes());
                    let status = self.status(counts, outbound, transactions);
                    let reply = OutgoingReply::success(id, &status);
                    let line = Line {
                        kind: LineKind::Reply {
                            succeeded: reply.outcome.is_ok(),
                        },
                        bytes: reply.to_line().into(),
                    };
                    if let Some(route) = self.outlets.get(&conn) {
                        self.lane.send_line(route, line);
                    }
                }
                Transmit::View { conn, view } => {
                    if let Some(route) = self.outlets.get(&conn) {
                        self.lane.send_view(route, view);
                    }
                }
                Transmit::Close(conn) => {
                    if let Some(route) = self.outlets.remove(&conn) {
                        self.lane.close(&route);
                    }
                }
            }
        }
        // Only now, after the batch that made them committed, and behind
        // its lines, which they never delay.
        while let Some(write) = self.core.poll_cluster_write() {
            if let Some(writes) = &self.cluster_writes {
                // The writer ends only with the daemon, whose etcd lease
                // then goes with every key a write would have touched.
                let _ = writes.send(write);
            }
        }
    }

    /// What every connection has queued, and the most one has.
    fn outbound_bytes(&self) -> (usize, usize) {
        self.outlets
            .values()
            .map(|route| route.outlet().queued_bytes())
            .fold((0, 0), |(sum, largest), queued| {
                (sum + queued, largest.max(queued))
            })
    }

    fn status(&self, counts: Counts, outbound: (usize, usize), transactions: u64) -> StatusReply {
        let (outbound_bytes, largest_outbound_bytes) = outbound;
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
            topics: counts.topics,
            entries: counts.entries,
            connections: counts.connections,
            subscriptions: counts.subscriptions,
            pid_watch: self.info.pid_watch.clone(),
            started_by: Some(self.info.started_by.clone()),
            awaiting_resume: counts.awaiting_resume,
            transactions,
            outbound_bytes,
            largest_outbound_bytes,
            outbound_budget_bytes: counts.outbound_budget_bytes,
            cluster: self.cluster_probe.as_ref().map(|probe| probe.status()),
        }
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
}

/// The core, shared by the threads that run it; cheap to clone. See the
/// module's comment for who runs it when.
#[derive(Clone)]
pub struct CoreHandle {
    inner: Arc<Inner>,
}

struct Inner {
    /// Commands waiting for the next batch, in the order they were queued.
    queued: Mutex<Queue>,
    /// `None` once the core has stopped.
    driver: Mutex<Option<Driver>>,
    /// What the driver's thread waits for.
    wake: Mutex<Wake>,
    woken: Condvar,
    /// Told once, when the core stops; dropped unsent if it failed.
    stopped: Mutex<Option<tokio::sync::oneshot::Sender<Stopped>>>,
}

#[derive(Default)]
struct Queue {
    commands: VecDeque<Command>,
    /// Set when the core has stopped: nothing queued would be run.
    closed: bool,
}

#[derive(Default)]
struct Wake {
    /// The core's `poll_timeout` after the last batch.
    deadline: Option<Instant>,
    /// An io thread handed over commands still queued.
    handed_over: bool,
    /// The core has stopped: the thread ends.
    ended: bool,
}

/// The core has stopped; nothing more is taken.
#[derive(Debug)]
pub struct CoreStopped;

impl CoreHandle {
    /// Starts the driver's own thread and returns the handle, with what
    /// tells when the core has stopped: its [`Stopped`], or, if the core
    /// failed (a panic while running it), the sender dropped.
    pub fn start(
        driver: Driver,
    ) -> std::io::Result<(CoreHandle, tokio::sync::oneshot::Receiver<Stopped>)> {
        let (stopped, stopped_rx) = tokio::sync::oneshot::channel();
        let handle = CoreHandle {
            inner: Arc::new(Inner {
                queued: Mutex::default(),
                wake: Mutex::new(Wake {
                    deadline: driver.core.poll_timeout(),
                    ..Wake::default()
                }),
                driver: Mutex::new(Some(driver)),
                woken: Condvar::new(),
                stopped: Mutex::new(Some(stopped)),
            }),
        };
        let thread = handle.clone();
        std::thread::Builder::new()
            .name("presenced-core".into())
            .spawn(move || thread.run_when_woken())?;
        Ok((handle, stopped_rx))
    }

    /// Queues a command and runs the core, unless another thread is
    /// running it (which then takes the command before it lets go).
    pub fn send(&self, command: Command) -> Result<(), CoreStopped> {
        self.queue(command)?;
        self.drive();
        Ok(())
    }

    /// Only queues a command, for a caller that must let go of a lock
    /// before the core runs; it calls [`CoreHandle::drive`] then.
    pub fn queue(&self, command: Command) -> Result<(), CoreStopped> {
        let mut queue = lock(&self.inner.queued);
        if queue.closed {
            return Err(CoreStopped);
        }
        queue.commands.push_back(command);
        Ok(())
    }

    /// Runs what is queued once the other tasks this thread has ready
    /// have run, and queued what they read: under load one batch then
    /// takes a whole round of connections' requests (group commit), for
    /// the price of one yield to tokio when there is nothing else to do.
    /// While more is queued after a batch, it yields again before the
    /// next, so that the thread reads its other connections meanwhile and
    /// the next batch is as large as the load makes it.
    pub async fn drive_soon(&self) {
        let mut owed = HandOverIfDropped(Some(self));
        while self.has_queued() {
            tokio::task::yield_now().await;
            if !self.run_one_batch() {
                break;
            }
        }
        owed.0 = None;
    }

    /// Runs what is queued to completion on this thread, unless another
    /// thread is running the core: the one that holds it looks at the
    /// queue again after letting go, so nothing queued is left waiting.
    pub fn drive(&self) {
        for _ in 0..COMBINING_ROUNDS {
            if !self.has_queued() || !self.run_one_batch() {
                return;
            }
        }
        self.hand_over_if_queued();
    }

    /// One batch, if nobody else is running the core; `false` if somebody
    /// is (and so takes what is queued) or the core has stopped.
    fn run_one_batch(&self) -> bool {
        let _ending = EndIfPanicking(&self.inner);
        let mut driver = match self.inner.driver.try_lock() {
            Ok(driver) => driver,
            Err(TryLockError::WouldBlock) => return false,
            Err(TryLockError::Poisoned(_)) => {
                self.inner.end(None);
                return false;
            }
        };
        self.run_batch(&mut driver);
        driver.is_some()
    }

    /// Leaves what is still queued to the driver's thread.
    fn hand_over_if_queued(&self) {
        if self.has_queued() {
            lock(&self.inner.wake).handed_over = true;
            self.inner.woken.notify_one();
        }
    }

    /// The driver's thread: sleeps until the core's own work is due or an
    /// io thread hands work over, and then runs the core until nothing is
    /// queued.
    fn run_when_woken(&self) {
        let _ending = EndIfPanicking(&self.inner);
        loop {
            if !self.wait_for_work() {
                return;
            }
            loop {
                let mut driver = match self.inner.driver.lock() {
                    Ok(driver) => driver,
                    Err(_) => return self.inner.end(None),
                };
                if driver.is_none() {
                    return;
                }
                self.run_batch(&mut driver);
                drop(driver);
                if !self.has_queued() {
                    break;
                }
            }
        }
    }

    /// Waits until the deadline passes or work is handed over; `false`
    /// once the core has stopped.
    fn wait_for_work(&self) -> bool {
        let mut wake = lock(&self.inner.wake);
        loop {
            if wake.ended {
                return false;
            }
            if std::mem::take(&mut wake.handed_over) {
                return true;
            }
            let now = Instant::now();
            wake = match wake.deadline {
                Some(at) if at <= now => return true,
                Some(at) => {
                    let waited = self.inner.woken.wait_timeout(wake, at - now);
                    waited.unwrap_or_else(|p| p.into_inner()).0
                }
                None => {
                    let waited = self.inner.woken.wait(wake);
                    waited.unwrap_or_else(|p| p.into_inner())
                }
            };
        }
    }

    /// One batch with the core held; after it, either the core's end is
    /// told, or the driver's thread learns the core's next deadline.
    fn run_batch(&self, driver: &mut MutexGuard<'_, Option<Driver>>) {
        let Some(running) = driver.as_mut() else {
            return;
        };
        let mut queued = std::mem::take(&mut lock(&self.inner.queued).commands);
        let stopped = running.run_batch(read_clocks(), &mut queued);
        if !queued.is_empty() {
            // What did not fit goes back ahead of what came meanwhile.
            let mut queue = lock(&self.inner.queued);
            queued.append(&mut queue.commands);
            queue.commands = queued;
        }
        match stopped {
            Some(stopped) => {
                driver.take();
                self.inner.end(Some(stopped));
            }
            None => self.inner.expect_work_at(running.core.poll_timeout()),
        }
    }

    fn has_queued(&self) -> bool {
        self.queued() > 0
    }

    fn queued(&self) -> usize {
        lock(&self.inner.queued).commands.len()
    }
}

impl Inner {
    /// Tells the driver's thread when the core next has work of its own.
    /// It is woken only if that is sooner than it was told before: woken
    /// early, it finds nothing due and sleeps on.
    fn expect_work_at(&self, deadline: Option<Instant>) {
        let mut wake = lock(&self.wake);
        let sooner = match (deadline, wake.deadline) {
            (Some(new), Some(old)) => new < old,
            (Some(_), None) => true,
            (None, _) => false,
        };
        wake.deadline = deadline;
        drop(wake);
        if sooner {
            self.woken.notify_one();
        }
    }

    /// The core has stopped (`Some`) or failed (`None`): nothing more is
    /// queued, the driver's thread ends, and whoever waits is told.
    fn end(&self, stopped: Option<Stopped>) {
        lock(&self.queued).closed = true;
        lock(&self.wake).ended = true;
        self.woken.notify_one();
        if let Some(tell) = lock(&self.stopped).take()
            && let Some(stopped) = stopped
        {
            let _ = tell.send(stopped);
        }
    }
}

/// Hands what is queued to the driver's thread if a [`CoreHandle::drive_soon`]
/// is dropped while it yields (its task cancelled): others that found the
/// core busy left their commands to it.
struct HandOverIfDropped<'a>(Option<&'a CoreHandle>);

impl Drop for HandOverIfDropped<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.0 {
            handle.hand_over_if_queued();
        }
    }
}

/// Ends the core if a thread unwinds while running it: the core's state is
/// then unknown, and the daemon stops rather than serve from it.
struct EndIfPanicking<'a>(&'a Inner);

impl Drop for EndIfPanicking<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the core failed while running a batch; stopping");
            self.0.end(None);
        }
    }
}

#[cfg(test)]
impl CoreHandle {
    /// A handle with no core behind it: what is sent to it stays queued,
    /// for a test to take with [`CoreHandle::next_queued`].
    pub fn detached() -> CoreHandle {
        CoreHandle {
            inner: Arc::new(Inner {
                queued: Mutex::default(),
                driver: Mutex::new(None),
                wake: Mutex::default(),
                woken: Condvar::new(),
                stopped: Mutex::new(None),
            }),
        }
    }

    /// The first command queued, once there is one.
    pub async fn next_queued(&self) -> Command {
        loop {
            if let Some(command) = lock(&self.inner.queued).commands.pop_front() {
                return command;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The stored rows, sorted at start into those that survive the restart
/// and those that do not.
struct SortedRows {
    kept: Vec<Entry>,
    departed: Vec<Entry>,
    of_another_boot: usize,
    of_exited_processes: usize,
}

/// Keeps the rows of this boot whose process still runs; a connection
/// entry among them waits until `resume_deadline` to be resumed.
fn sort_rows(stored: Vec<StoredEntry>, boot_id: &str, resume_deadline: i64) -> SortedRows {
    let mut sorted = SortedRows {
        kept: Vec::new(),
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
        sorted.departed.push(entry);
    }
    sorted
}

#[cfg(test)]
mod tests;
