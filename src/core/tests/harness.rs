//! The core driven by hand: made-up time, made-up commit results, and the
//! lines each connection would be sent, with no thread, store or socket.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::core::registry::{ConnId, Entry, Peer, ProcessId, TokenHash, Track};
use crate::core::{
    Body, Commit, CommitFailed, Core, CoreConfig, Input, MAX_BATCH, Now, Restored, Transmit,
};
use crate::ops::Op;
use crate::ops::subscribe::Subscription;
use crate::protocol::{Lifetime, Limits, TrackRequest};

/// The wall clock at the harness's time 0.
pub const WALL_AT_START: i64 = 1_700_000_000_000;
/// The boot clock when a test's core starts: the machine has been up an
/// hour.
pub const BOOT_AT_START: Duration = Duration::from_secs(3600);

/// A core and what its driver would hold: the time, the commit out, and
/// the connections with a socket.
pub struct H {
    pub core: Core,
    start: Instant,
    /// Milliseconds since the harness started.
    ms: u64,
    out: Option<Commit>,
    /// Commits that went through.
    pub committed: Vec<Commit>,
    /// Connections opened and not yet closed by the core, as the driver's
    /// outlets map: lines to any other are dropped.
    sockets: HashSet<ConnId>,
    /// What each connection was sent and not yet taken; `"closed"` when
    /// the core closed it.
    sent: HashMap<ConnId, Vec<Value>>,
}

impl H {
    /// A core with nothing restored, and nothing to commit for it.
    pub fn new() -> H {
        H::with(MAX_BATCH, nothing_restored())
    }

    /// A core that takes at most `max_batch` inputs a batch, restoring
    /// `restored`. Its first commit, if any, is left out for the test.
    pub fn with(max_batch: usize, restored: Restored) -> H {
        let config = CoreConfig {
            limits: Limits::default(),
            max_batch,
            own_uid: 0,
            cluster: None,
        };
        H::configured(config, restored)
    }

    /// A core set up as `config` says, restoring `restored`.
    pub fn configured(config: CoreConfig, restored: Restored) -> H {
        let start = Instant::now();
        let now = Now {
            at: start,
            wall_ms: WALL_AT_START,
            boot: BOOT_AT_START,
        };
        H {
            core: Core::restore(config, restored, now),
            start,
            ms: 0,
            out: None,
            committed: Vec::new(),
            sockets: HashSet::new(),
            sent: HashMap::new(),
        }
    }

    pub fn now(&self) -> Now {
        Now {
            at: self.instant(self.ms),
            wall_ms: WALL_AT_START + self.ms as i64,
            boot: BOOT_AT_START + Duration::from_millis(self.ms),
        }
    }

    /// The instant `ms` milliseconds after the harness started.
    pub fn instant(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Sets the clocks to `ms` milliseconds after the start.
    pub fn at(&mut self, ms: u64) {
        assert!(ms >= self.ms, "time goes forward");
        self.ms = ms;
    }

    /// When the core wants waking, in milliseconds after the start.
    pub fn timeout(&self) -> Option<u64> {
        let at = self.core.poll_timeout()?;
        Some(at.saturating_duration_since(self.start).as_millis() as u64)
    }

    /// The time is up, as the driver would say when `poll_timeout` passes.
    pub fn tick(&mut self) {
        self.core.handle_timeout(self.now());
    }

    pub fn input(&mut self, input: Input) {
        if let Input::Open { conn, .. } = &input {
            self.sockets.insert(*conn);
        }
        self.core.handle(self.now(), input);
    }

    pub fn inputs(&mut self, inputs: impl IntoIterator<Item = Input>) {
        inputs.into_iter().for_each(|input| self.input(input));
    }

    /// Closes the batch: the commit it needs, which stays out until
    /// [`H::ok`] or [`H::fail`]; or, if it needs none, `None`, with its
    /// lines sent.
    pub fn burst(&mut self) -> Option<&Commit> {
        assert!(self.out.is_none(), "a commit is out already");
        self.out = self.core.poll_commit(self.now());
        self.send();
        self.out.as_ref()
    }

    /// The commit out went through.
    pub fn ok(&mut self) {
        let commit = self.out.take().expect("a commit out");
        self.core.handle_commit(self.now(), commit.id, Ok(()));
        self.committed.push(commit);
        self.send();
    }

    /// The commit out failed, as on a full disk.
    pub fn fail(&mut self) {
        let commit = self.out.take().expect("a commit out");
        let cause = CommitFailed::new(std::io::Error::other("the disk is full"));
        self.core.handle_commit(self.now(), commit.id, Err(cause));
        self.send();
    }

    /// Opens connections, each of its own process, with nothing to commit.
    pub fn connect(&mut self, conns: impl IntoIterator<Item = ConnId>) {
        for conn in conns {
            self.input(open(conn));
        }
        assert!(self.burst().is_none(), "an open changes no row");
    }

    /// Runs the inputs as one batch, and its commit if it needs one.
    pub fn committed_batch(&mut self, inputs: impl IntoIterator<Item = Input>) {
        self.inputs(inputs);
        if self.burst().is_some() {
            self.ok();
        }
    }

    /// The lines the connection was sent since it was last asked.
    pub fn lines(&mut self, conn: ConnId) -> Vec<Value> {
        self.sent.remove(&conn).unwrap_or_default()
    }

    /// Does with each transmit what the daemon's driver does with it.
    fn send(&mut self) {
        while let Some(transmit) = self.core.poll_transmit() {
            match transmit {
                Transmit::Line { to, line } => {
                    if line.bytes.is_empty() {
                        continue;
                    }
                    let value: Value = serde_json::from_slice(&line.bytes).unwrap();
                    for conn in to.conns() {
                        if self.sockets.contains(conn) {
                            self.sent.entry(*conn).or_default().push(value.clone());
                        }
                    }
                }
                Transmit::Deferred {
                    conn,
                    id,
                    body: Body::Status(counts),
                } => {
                    if self.sockets.contains(&conn) {
                        let status = json!({
                            "id": id,
                            "ok": true,
                            "entries": counts.entries,
                            "topics": counts.topics,
                            "connections": counts.connections,
                            "subscriptions": counts.subscriptions,
                            "awaiting_resume": counts.awaiting_resume,
                        });
                        self.sent.entry(conn).or_default().push(status);
                    }
                }
                Transmit::View { conn, view } => {
                    if self.sockets.contains(&conn) {
                        let value = serde_json::from_slice(&view.to_line().bytes).unwrap();
                        self.sent.entry(conn).or_default().push(value);
                    }
                }
                Transmit::Close(conn) => {
                    if self.sockets.remove(&conn) {
                        self.sent.entry(conn).or_default().push(json!("closed"));
                    }
                }
            }
        }
    }
}

/// An empty store: a counter of 1 is what a fresh registry starts at, so
/// restoring it saves nothing.
pub fn nothing_restored() -> Restored {
    Restored {
        next_seq: 1,
        ..Restored::default()
    }
}

pub fn open(conn: ConnId) -> Input {
    Input::Open {
        conn,
        peer: Peer {
            pid: 4000 + conn as u32,
            uid: 1000,
            user: "alice".into(),
        },
    }
}

pub fn close(conn: ConnId) -> Input {
    Input::Close {
        conn,
        exited: false,
    }
}

pub fn shutdown() -> Input {
    Input::Shutdown {
        reason: "test".into(),
    }
}

pub fn request(conn: ConnId, id: u64, request: Op) -> Input {
    Input::Request {
        conn,
        id: json!(id),
        request,
    }
}

pub fn presence(conn: ConnId, id: u64, op: Op) -> Input {
    request(conn, id, op)
}

pub fn token_hash(key: &str) -> TokenHash {
    let mut hash = [0; 32];
    let bytes = key.as_bytes();
    hash[..bytes.len()].copy_from_slice(bytes);
    hash
}

pub fn process_of(conn: ConnId) -> ProcessId {
    ProcessId {
        pid: 4000 + conn as u32,
        start_time: 1,
    }
}

pub fn track_for(conn: ConnId, id: u64, key: &str, lifetime: Lifetime) -> Input {
    let track = Track {
        request: TrackRequest {
            topic: "doc".into(),
            key: key.into(),
            meta: serde_json::Map::new(),
            pid: None,
            lifetime,
            subscribe: false,
        },
        process: process_of(conn),
        token_hash: token_hash(key),
        token: format!("token-{key}"),
    };
    presence(conn, id, Op::Track(track))
}

pub fn track(conn: ConnId, id: u64, key: &str) -> Input {
    track_for(conn, id, key, Lifetime::Connection)
}

pub fn resume(conn: ConnId, id: u64, key: &str) -> Input {
    let tokens = vec![(format!("token-{key}"), token_hash(key))];
    presence(conn, id, Op::Resume(tokens))
}

pub fn subscribe(conn: ConnId, id: u64) -> Input {
    presence(conn, id, Op::Subscribe(Subscription::Topic("doc".into())))
}

/// An entry as the store would hold it, of a process that is not one of
/// the connections'.
pub fn stored_entry(key: &str, seq: u64, lifetime: Lifetime) -> Entry {
    Entry {
        topic: "doc".into(),
        key: key.into(),
        seq,
        phx_ref: format!("p{seq}"),
        prev_ref: None,
        meta: serde_json::Map::new(),
        joined_at: WALL_AT_START - 60_000,
        process: ProcessId {
            pid: 9000 + seq as u32,
            start_time: 1,
        },
        uid: 1000,
        user: "alice".into(),
        lifetime,
        token_hash: token_hash(key),
        conn: None,
        resume_deadline: None,
        cluster: None,
    }
}

/// The keys a `list` reply names.
pub fn keys_listed(reply: &Value) -> Vec<&str> {
    let presences = reply["presences"].as_object().unwrap();
    presences.keys().map(String::as_str).collect()
}

/// The ids of the replies among the lines, `null` for events.
pub fn ids(lines: &[Value]) -> Vec<Value> {
    lines.iter().map(|line| line["id"].clone()).collect()
}
