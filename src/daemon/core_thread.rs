//! The core's thread: drives the sans-IO [`Core`] with the io layer's
//! commands, the clocks and the store.
//!
//! It waits on a channel for the next command, or until the core's
//! `poll_timeout`; takes whatever else waits in the channel into the same
//! batch, up to the core's limit (group commit); commits the batch's
//! changes in one SQLite transaction; hands the batch's lines to each
//! connection's [`Outlet`]; and only then, with the lines out, trims the
//! history and checkpoints the log when due (unless a commit failed). The
//! core decides everything; this thread only carries it out.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::serializer::{Route, SerializerLane};
use crate::core::registry::{ConnId, Entry, Peer, ProcessId};
use crate::core::store::{Store, StoreError, StoredEntry};
use crate::core::{
    Body, CommitFailed, Core, CoreConfig, Counts, Input, Line, LineKind, Now, Restored, Stopped,
    To, Transmit,
};
use crate::protocol::{Lifetime, Limits, OutgoingReply, PROTOCOL_VERSION, StatusReply};

/// How often the history is trimmed to its retention bounds, when the
/// last pass left nothing over.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Where the core's thread sends a connection's lines. Implemented by the
/// io layer; `deliver` must never block.
pub trait Outlet: Send + Sync {
    fn deliver(&self, line: Line);
    /// No more lines will come: flush what is queued, then close.
    fn close(&self);
    /// Bytes delivered and not yet written to the client, for `status`.
    fn queued_bytes(&self) -> usize;
}

/// Everything the io layer asks of the core: an [`Input`], or a new
/// connection with the outlet its lines go to, which the core's thread
/// keeps (the core itself only learns that the connection is open).
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

/// Why the core's thread ended.
#[derive(Debug)]
pub enum Exit {
    /// A `Shutdown` command ran its course.
    Stopped(Stopped),
    /// Every sender is gone.
    Disconnected,
}

pub struct CoreThread {
    core: Core,
    store: Store,
    outlets: HashMap<ConnId, Route>,
    /// Where large reads are made into lines, off this thread.
    lane: SerializerLane,
    info: DaemonInfo,
    /// When to next trim the history to its retention bounds.
    next_prune: Instant,
}

/// Both clocks, read once per wake: every input of a batch is handled at
/// one time.
fn read_clocks() -> Now {
    Now {
        at: Instant::now(),
        wall_ms: crate::sys::now_millis(),
    }
}

impl CoreThread {
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
    ) -> Result<CoreThread, StoreError> {
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
        };
        let restored = Restored {
            kept: sorted.kept,
            departed: sorted.departed,
            next_seq: stored_next_seq,
        };
        let mut thread = CoreThread {
            core: Core::restore(config, restored, now),
            store,
            outlets: HashMap::new(),
            lane: SerializerLane::start(),
            info,
            next_prune: now.at,
        };
        // The first commit deletes the rows that did not survive. A failure
        // that passes by itself leaves them to the core's retries; any
        // other stops the start.
        while let Some(commit) = thread.core.poll_commit(now) {
            let result = thread.store.commit(&commit.changes, commit.next_seq);
            let result = match result {
                Err(cause) if !cause.is_passing() => return Err(cause),
                other => other.map_err(CommitFailed::new),
            };
            thread.core.handle_commit(read_clocks(), commit.id, result);
        }
        Ok(thread)
    }

    /// The processes whose exit must be watched from the start.
    pub fn watched_processes(&self) -> Vec<ProcessId> {
        self.core.watched_processes()
    }

    /// Runs until shutdown or every sender is gone. A failed commit does
    /// not stop it: the core rolls it back and retries what it must.
    pub fn run(mut self, commands: Receiver<Command>) -> Exit {
        loop {
            let received = match self.core.poll_timeout() {
                Some(at) => commands.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let now = read_clocks();
            match received {
                Ok(first) => self.take_batch(now, first, &commands),
                Err(RecvTimeoutError::Timeout) => self.core.handle_timeout(now),
                Err(RecvTimeoutError::Disconnected) => return Exit::Disconnected,
            }
            self.commit_and_release(now);
            if let Some(stopped) = self.core.poll_stopped() {
                return Exit::Stopped(stopped);
            }
        }
    }

    /// Hands the core `first` and whatever else waits in the channel, as
    /// far as the batch has room (group commit); the rest waits for the
    /// next batch.
    fn take_batch(&mut self, now: Now, first: Command, commands: &Receiver<Command>) {
        self.hand_in(now, first);
        while self.core.batch_has_room() {
            match commands.try_recv() {
                Ok(command) => self.hand_in(now, command),
                Err(_) => break,
            }
        }
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
