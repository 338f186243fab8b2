//! The ideal daemon: the most direct socket daemon for a handoff, as a
//! floor the real one is measured against in the same run. Nothing is
//! kept on disk, and every event is run to completion by the thread that
//! hears it: an owner's end of file is read, the next in line promoted
//! and its `role` line written to its socket before that thread waits
//! again.
//!
//! It speaks only what the failover scenarios use, with the real
//! daemon's shapes (the protocol types themselves, so the bench's
//! spectator reads its lines through the client library unchanged):
//! `track` (replied with the entry's standing), `untrack` (by ref or key),
//! and the `role` event to every remaining entry when a topic's owner
//! leaves, by `untrack` or by its connection closing. Anything else is
//! refused with `unknown_op`.
//!
//! What it knows and what each event makes it send is [`Topics`], the same
//! for every driver; the drivers differ only in how they wait and who
//! writes, which is what a choice of loop for the real daemon is about:
//!
//! - `epoll` (`epoll.rs`): one thread, one epoll set, level-triggered.
//! - `tokio-current`: tokio on one thread, a task per connection.
//! - `tokio-combining`: tokio on its worker threads, a task per
//!   connection; whichever thread hears an event takes the lock and runs
//!   it to completion, writes included (flat combining).

mod epoll;
mod tasks;

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;

use presenced::protocol::{
    ErrorBody, ErrorCode, Event, Owner, Role, RoleChange, Standing, TrackReply, UntrackReply,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Serves on `socket` with `driver` until stdin closes (the bench's child
/// contract: it announces itself ready through `ready` once it listens).
pub fn serve(
    socket: &str,
    driver: &str,
    ready: impl FnOnce() -> std::io::Result<()>,
) -> anyhow::Result<()> {
    match driver {
        "epoll" => epoll::serve(socket, ready),
        "tokio-current" => tasks::serve(socket, tasks::Threads::One, ready),
        "tokio-combining" => tasks::serve(socket, tasks::Threads::Workers, ready),
        other => anyhow::bail!(
            "no ideal daemon driver {other:?}: epoll, tokio-current or tokio-combining"
        ),
    }
}

/// Lines to write, each to its connection, in order.
pub type Outgoing = Vec<(u64, Vec<u8>)>;

/// Who is on which topic, in join order, and who each connection is.
#[derive(Default)]
pub struct Topics {
    peers: HashMap<u64, Peer>,
    /// Each topic's entries in join order: the first is the owner.
    topics: HashMap<String, VecDeque<Entry>>,
    next_seq: u64,
}

struct Peer {
    pid: u32,
    user: String,
    /// The topics this connection has entries on (repeats allowed).
    topics: Vec<String>,
}

struct Entry {
    conn: u64,
    phx_ref: String,
    key: String,
    seq: u64,
    joined_at: i64,
    pid: u32,
    user: String,
}

/// The fields of a request line this daemon reads; others are ignored.
#[derive(Deserialize)]
struct RequestLine {
    #[serde(default)]
    id: Value,
    op: String,
    topic: Option<String>,
    key: Option<String>,
    #[serde(rename = "ref")]
    phx_ref: Option<String>,
}

impl Topics {
    /// A connection accepted from the peer at the other end of `socket`.
    pub fn open(&mut self, conn: u64, socket: impl AsFd) -> std::io::Result<()> {
        let creds = rustix::net::sockopt::socket_peercred(socket)?;
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(creds.uid.as_raw()))
            .ok()
            .flatten()
            .map_or_else(|| creds.uid.as_raw().to_string(), |user| user.name);
        let peer = Peer {
            pid: creds.pid.as_raw_nonzero().get() as u32,
            user,
            topics: Vec::new(),
        };
        self.peers.insert(conn, peer);
        Ok(())
    }

    /// Answers one request line from `conn`.
    pub fn line(&mut self, conn: u64, line: &[u8], out: &mut Outgoing) {
        let request: RequestLine = match serde_json::from_slice(line) {
            Ok(request) => request,
            Err(e) => {
                let error = ErrorBody::new(ErrorCode::BadJson, e.to_string());
                return out.push((conn, error_line(&Value::Null, error)));
            }
        };
        let id = request.id;
        match (request.op.as_str(), request.topic) {
            ("track", Some(topic)) => {
                let Some(key) = request.key else {
                    let error = ErrorBody::new(ErrorCode::BadRequest, "track needs a key");
                    return out.push((conn, error_line(&id, error)));
                };
                if let Some(reply) = self.track(conn, topic, key) {
                    out.push((conn, reply_line(&id, &reply)));
                }
            }
            ("untrack", Some(topic)) => {
                let mut told = Outgoing::new();
                let removed = self.untrack(conn, &topic, request.phx_ref, request.key, &mut told);
                // The reply goes ahead of the events the untrack caused.
                out.push((conn, reply_line(&id, &UntrackReply { removed })));
                out.extend(told);
            }
            (op, _) => {
                let message = format!("the ideal daemon does not serve {op:?}");
                let error = ErrorBody::new(ErrorCode::UnknownOp, message);
                out.push((conn, error_line(&id, error)));
            }
        }
    }

    /// `conn` closed: its entries leave, and every topic whose owner was
    /// among them tells its remaining entries their new standings.
    pub fn close(&mut self, conn: u64, out: &mut Outgoing) {
        let Some(peer) = self.peers.remove(&conn) else {
            return;
        };
        let mut topics = peer.topics;
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            self.remove(&topic, |entry| entry.conn == conn, out);
        }
    }

    fn track(&mut self, conn: u64, topic: String, key: String) -> Option<TrackReply> {
        let peer = self.peers.get_mut(&conn)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        peer.topics.push(topic.clone());
        let entry = Entry {
            conn,
            phx_ref: format!("i{seq}"),
            key,
            seq,
            joined_at: now_millis(),
            pid: peer.pid,
            user: peer.user.clone(),
        };
        let queue = self.topics.entry(topic).or_default();
        queue.push_back(entry);
        let position = queue.len() - 1;
        let entry = &queue[position];
        Some(TrackReply {
            phx_ref: entry.phx_ref.clone(),
            seq: entry.seq,
            joined_at: entry.joined_at,
            standing: standing(queue, position),
            resume_token: String::new(),
        })
    }

    fn untrack(
        &mut self,
        conn: u64,
        topic: &str,
        phx_ref: Option<String>,
        key: Option<String>,
        out: &mut Outgoing,
    ) -> usize {
        let picked = |entry: &Entry| {
            entry.conn == conn
                && (phx_ref.as_ref().is_some_and(|r| *r == entry.phx_ref)
                    || key.as_ref().is_some_and(|k| *k == entry.key))
        };
        let removed = self.remove(topic, picked, out);
        if let Some(peer) = self.peers.get_mut(&conn) {
            for _ in 0..removed {
                if let Some(at) = peer.topics.iter().position(|t| t == topic) {
                    peer.topics.swap_remove(at);
                }
            }
        }
        removed
    }

    /// Removes the entries of `topic` that `leaves` picks; if the owner
    /// was one, tells every remaining entry its new standing. Returns how
    /// many left.
    fn remove(
        &mut self,
        topic: &str,
        leaves: impl Fn(&Entry) -> bool,
        out: &mut Outgoing,
    ) -> usize {
        let Some(queue) = self.topics.get_mut(topic) else {
            return 0;
        };
        let owner = queue.front().map(|entry| entry.seq);
        let before = queue.len();
        queue.retain(|entry| !leaves(entry));
        let removed = before - queue.len();
        if queue.is_empty() {
            self.topics.remove(topic);
            return removed;
        }
        if queue.front().map(|entry| entry.seq) == owner {
            return removed;
        }
        for (position, entry) in queue.iter().enumerate() {
            let event = Event::Role {
                topic: topic.to_owned(),
                payload: RoleChange {
                    phx_ref: entry.phx_ref.clone(),
                    standing: standing(queue, position),
                },
            };
            let mut line = serde_json::to_vec(&event).expect("an event serializes");
            line.push(b'\n');
            out.push((entry.conn, line));
        }
        removed
    }
}

fn reply_line(id: &Value, fields: &impl Serialize) -> Vec<u8> {
    let fields = serde_json::to_string(fields).expect("a reply serializes");
    let mut line = format!("{{\"id\":{id},\"ok\":true");
    if fields.len() > 2 {
        line.push(',');
        line.push_str(&fields[1..fields.len() - 1]);
    }
    line.push_str("}\n");
    line.into_bytes()
}

fn error_line(id: &Value, error: ErrorBody) -> Vec<u8> {
    let error = serde_json::to_string(&error).expect("an error serializes");
    format!("{{\"id\":{id},\"ok\":false,\"error\":{error}}}\n").into_bytes()
}

/// The standing of the entry at `position` of `queue`, as the real
/// daemon reports it: the first is the owner, the rest read-only.
fn standing(queue: &VecDeque<Entry>, position: usize) -> Standing {
    let owner = &queue[0];
    Standing {
        role: if position == 0 {
            Role::Owner
        } else {
            Role::Spectator
        },
        readonly: position != 0,
        position,
        owner: Some(Owner {
            key: owner.key.clone(),
            phx_ref: owner.phx_ref.clone(),
            pid: owner.pid,
            user: owner.user.clone(),
            joined_at: owner.joined_at,
        }),
        suspended: false,
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}
