//! The core: one thread that owns the registry and the store.
//!
//! It drains a batch of commands from the io layer, applies them to the
//! registry, commits everything they changed in one SQLite transaction, and
//! only then releases the batch's replies and events. So no client ever
//! sees a change that a crash could take back, and a burst of operations
//! costs one commit, not one each.
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
    /// A commit failed; nothing from the failed batch was revealed.
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
        for row in stored {
            let alive = row.boot_id == boot_id && crate::sys::is_running(row.entry.process);
            if alive {
                let mut entry = row.entry;
                if entry.lifetime == Lifetime::Connection {
                    entry.resume_deadline = Some(now + resume_grace.as_millis() as i64);
                }
                kept.push(entry);
            } else {
                gone.push(registry::Change::Delete(row.entry.phx_ref));
            }
        }
        tracing::info!(
            kept = kept.len(),
            removed = gone.len(),
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

    /// Runs until shutdown, a store failure, or every sender is gone.
    pub fn run(mut self, commands: Receiver<Command>) -> Stopped {
        loop {
            let first = match self.registry.next_resume_deadline() {
                Some(deadline) => {
                    let wait =
                        Duration::from_millis(deadline.saturating_sub(now_millis()).max(0) as u64);
                    match commands.recv_timeout(wait) {
                        Ok(command) => Some(command),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return Stopped::Disconnected,
                    }
                }
                None => match commands.recv() {
                    Ok(command) => Some(command),
                    Err(_) => return Stopped::Disconnected,
                },
            };

            let mut batch = Batch::default();
            let now = now_millis();
            if self
                .registry
                .next_resume_deadline()
                .is_some_and(|deadline| deadline <= now)
            {
                self.registry.expire(now, &mut batch.outbox);
            }
            let mut next = first;
            while let Some(command) = next {
                self.apply(command, now, &mut batch);
                if batch.len >= MAX_BATCH || batch.shutdown.is_some() {
                    break;
                }
                next = commands.try_recv().ok();
            }

            if let Err(e) = self
                .store
                .commit(&batch.outbox.changes, self.registry.next_seq())
            {
                tracing::error!(
                    "commit failed, stopping so that nothing uncommitted is shown: {e}"
                );
                return Stopped::Store(e);
            }
            self.release(batch.outbox.deliveries);
            for conn in batch.closed {
                if let Some(outlet) = self.outlets.remove(&conn) {
                    outlet.close();
                }
            }
            if let Some(reason) = batch.shutdown {
                self.shut_down(reason);
                return Stopped::Shutdown;
            }
        }
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
                Resolved::Presence(op) => self.registry.handle(conn, id, op, now, out),
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
            Command::Close { conn } => {
                self.registry.close(conn, out);
                batch.closed.push(conn);
            }
            Command::ProcessExited(process) => self.registry.process_exited(process, out),
            Command::Resync { conn, topics } => self.registry.resync(conn, &topics, out),
            Command::Shutdown { reason } => batch.shutdown = Some(reason),
        }
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
    closed: Vec<ConnId>,
    shutdown: Option<String>,
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
