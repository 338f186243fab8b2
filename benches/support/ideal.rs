//! The ideal daemon: the most direct socket daemon for a handoff, as a
//! floor the real one is measured against in the same run. One thread,
//! one epoll set, level-triggered; every event is run to completion by
//! the thread the kernel wakes: an owner's EOF is read, the next in line
//! promoted and its `role` line written to its socket before the loop
//! waits again. Nothing is kept on disk and nothing crosses a thread.
//!
//! It speaks only what the failover scenarios use, with the real
//! daemon's shapes (the protocol types themselves, so the bench's
//! spectator reads its lines through the client library unchanged):
//! `track` (replied with the entry's standing), `untrack` (by ref or key),
//! and the `role` event to every remaining entry when a topic's owner
//! leaves, by `untrack` or by its connection closing. Anything else is
//! refused with `unknown_op`.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};

use anyhow::Context;
use presenced::protocol::{
    ErrorBody, ErrorCode, Event, Owner, Role, RoleChange, Standing, TrackReply, UntrackReply,
};
use rustix::event::epoll::{self, EventData, EventFlags};
use serde::Deserialize;
use serde::Serialize;
use serde_json::Value;

/// Epoll data of the listener and of stdin; connections count up from 0.
const LISTENER: u64 = u64::MAX;
const STDIN: u64 = u64::MAX - 1;

/// How much one read takes from a socket.
const READ_CHUNK: usize = 64 * 1024;

/// Serves on `socket` until stdin closes (the bench's child contract: it
/// announces itself ready through `ready` once it listens).
pub fn serve(socket: &str, ready: impl FnOnce() -> std::io::Result<()>) -> anyhow::Result<()> {
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {socket}"))?;
    listener.set_nonblocking(true)?;
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &epoll,
        &listener,
        EventData::new_u64(LISTENER),
        EventFlags::IN,
    )?;
    let stdin = std::io::stdin();
    epoll::add(
        &epoll,
        stdin.as_fd(),
        EventData::new_u64(STDIN),
        EventFlags::IN,
    )?;
    ready()?;

    let mut daemon = Ideal {
        epoll,
        conns: HashMap::new(),
        next_conn: 0,
        topics: HashMap::new(),
        next_seq: 1,
    };
    let mut events = Vec::with_capacity(256);
    let mut chunk = vec![0; READ_CHUNK];
    loop {
        events.clear();
        epoll::wait(
            &daemon.epoll,
            rustix::buffer::spare_capacity(&mut events),
            None,
        )?;
        for event in &events {
            let (token, flags) = (event.data.u64(), event.flags);
            match token {
                LISTENER => daemon.accept(&listener)?,
                STDIN => {
                    // Any byte is ignored; end of file ends the daemon.
                    if stdin.lock().read(&mut chunk)? == 0 {
                        return Ok(());
                    }
                }
                conn => {
                    if flags.contains(EventFlags::OUT) {
                        daemon.flush(conn);
                    }
                    if flags.intersects(EventFlags::IN | EventFlags::HUP | EventFlags::ERR) {
                        daemon.read(conn, &mut chunk);
                    }
                }
            }
        }
    }
}

struct Ideal {
    epoll: std::os::fd::OwnedFd,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    /// Each topic's entries in join order: the first is the owner.
    topics: HashMap<String, VecDeque<Entry>>,
    next_seq: u64,
}

struct Conn {
    stream: UnixStream,
    /// Bytes read after the last whole line.
    input: Vec<u8>,
    /// Bytes the socket has not taken yet; EPOLLOUT is armed while any.
    output: Vec<u8>,
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

impl Ideal {
    fn accept(&mut self, listener: &UnixListener) -> anyhow::Result<()> {
        loop {
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            stream.set_nonblocking(true)?;
            let creds = rustix::net::sockopt::socket_peercred(&stream)?;
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(creds.uid.as_raw()))
                .ok()
                .flatten()
                .map_or_else(|| creds.uid.as_raw().to_string(), |user| user.name);
            let conn = self.next_conn;
            self.next_conn += 1;
            epoll::add(
                &self.epoll,
                &stream,
                EventData::new_u64(conn),
                EventFlags::IN,
            )?;
            self.conns.insert(
                conn,
                Conn {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    pid: creds.pid.as_raw_nonzero().get() as u32,
                    user,
                    topics: Vec::new(),
                },
            );
        }
    }

    /// Reads what `conn` sent, answers every whole line, and on end of
    /// file (or an error) closes it and promotes where it owned.
    fn read(&mut self, conn: u64, chunk: &mut [u8]) {
        let mut closed = false;
        let mut lines = Vec::new();
        {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            loop {
                match c.stream.read(chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.input.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if let Some(end) = c.input.iter().rposition(|&b| b == b'\n') {
                let rest = c.input.split_off(end + 1);
                lines = std::mem::replace(&mut c.input, rest);
            }
        }
        for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            self.handle(conn, line);
        }
        if closed {
            self.close(conn);
        }
    }

    fn handle(&mut self, conn: u64, line: &[u8]) {
        let request: RequestLine = match serde_json::from_slice(line) {
            Ok(request) => request,
            Err(e) => {
                let error = ErrorBody::new(ErrorCode::BadJson, e.to_string());
                return self.send_error(conn, &Value::Null, error);
            }
        };
        let id = request.id;
        match (request.op.as_str(), request.topic) {
            ("track", Some(topic)) => {
                let Some(key) = request.key else {
                    let error = ErrorBody::new(ErrorCode::BadRequest, "track needs a key");
                    return self.send_error(conn, &id, error);
                };
                let reply = self.track(conn, topic, key);
                self.send_reply(conn, &id, &reply);
            }
            ("untrack", Some(topic)) => {
                let removed = self.untrack(conn, &topic, request.phx_ref, request.key);
                self.send_reply(conn, &id, &UntrackReply { removed });
            }
            (op, _) => {
                let message = format!("the ideal daemon does not serve {op:?}");
                self.send_error(conn, &id, ErrorBody::new(ErrorCode::UnknownOp, message));
            }
        }
    }

    fn track(&mut self, conn: u64, topic: String, key: String) -> TrackReply {
        let seq = self.next_seq;
        self.next_seq += 1;
        let c = self.conns.get_mut(&conn).expect("a live connection");
        c.topics.push(topic.clone());
        let entry = Entry {
            conn,
            phx_ref: format!("i{seq}"),
            key,
            seq,
            joined_at: now_millis(),
            pid: c.pid,
            user: c.user.clone(),
        };
        let queue = self.topics.entry(topic).or_default();
        queue.push_back(entry);
        let position = queue.len() - 1;
        let entry = &queue[position];
        TrackReply {
            phx_ref: entry.phx_ref.clone(),
            seq: entry.seq,
            joined_at: entry.joined_at,
            standing: standing(queue, position),
            resume_token: String::new(),
        }
    }

    fn untrack(
        &mut self,
        conn: u64,
        topic: &str,
        phx_ref: Option<String>,
        key: Option<String>,
    ) -> usize {
        let removed = self.remove(topic, |entry| {
            entry.conn == conn
                && (phx_ref.as_ref().is_some_and(|r| *r == entry.phx_ref)
                    || key.as_ref().is_some_and(|k| *k == entry.key))
        });
        if let Some(c) = self.conns.get_mut(&conn) {
            for _ in 0..removed {
                if let Some(at) = c.topics.iter().position(|t| t == topic) {
                    c.topics.swap_remove(at);
                }
            }
        }
        removed
    }

    /// Closes `conn`: its entries leave, and every topic whose owner was
    /// among them gets its new standings.
    fn close(&mut self, conn: u64) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        // The descriptor leaves the epoll set when it is closed (dropped).
        let mut topics = c.topics;
        drop(c.stream);
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            self.remove(&topic, |entry| entry.conn == conn);
        }
    }

    /// Removes the entries of `topic` that `leaves` picks; if the owner
    /// was one, tells every remaining entry its new standing. Returns how
    /// many left.
    fn remove(&mut self, topic: &str, leaves: impl Fn(&Entry) -> bool) -> usize {
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
        let lines: Vec<(u64, Vec<u8>)> = queue
            .iter()
            .enumerate()
            .map(|(position, entry)| {
                let event = Event::Role {
                    topic: topic.to_owned(),
                    payload: RoleChange {
                        phx_ref: entry.phx_ref.clone(),
                        standing: standing(queue, position),
                    },
                };
                let mut line = serde_json::to_vec(&event).expect("an event serializes");
                line.push(b'\n');
                (entry.conn, line)
            })
            .collect();
        for (conn, line) in lines {
            self.send(conn, &line);
        }
        removed
    }

    fn send_reply(&mut self, conn: u64, id: &Value, fields: &impl Serialize) {
        let fields = serde_json::to_string(fields).expect("a reply serializes");
        let mut line = format!("{{\"id\":{id},\"ok\":true");
        if fields.len() > 2 {
            line.push(',');
            line.push_str(&fields[1..fields.len() - 1]);
        }
        line.push_str("}\n");
        self.send(conn, line.as_bytes());
    }

    fn send_error(&mut self, conn: u64, id: &Value, error: ErrorBody) {
        let error = serde_json::to_string(&error).expect("an error serializes");
        let line = format!("{{\"id\":{id},\"ok\":false,\"error\":{error}}}\n");
        self.send(conn, line.as_bytes());
    }

    /// Writes `line` to `conn` at once if nothing is queued before it;
    /// what the socket does not take waits for EPOLLOUT.
    fn send(&mut self, conn: u64, line: &[u8]) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.output.is_empty() {
            c.output.extend_from_slice(line);
            return;
        }
        let written = write_some(&mut c.stream, line);
        if written < line.len() {
            c.output.extend_from_slice(&line[written..]);
            let _ = epoll::modify(
                &self.epoll,
                &c.stream,
                EventData::new_u64(conn),
                EventFlags::IN | EventFlags::OUT,
            );
        }
    }

    fn flush(&mut self, conn: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let written = write_some(&mut c.stream, &c.output);
        c.output.drain(..written);
        if c.output.is_empty() {
            let _ = epoll::modify(
                &self.epoll,
                &c.stream,
                EventData::new_u64(conn),
                EventFlags::IN,
            );
        }
    }
}

/// Writes as much of `bytes` as the socket takes now. A broken socket
/// takes everything (the bytes are dropped): its end of file comes next.
fn write_some(stream: &mut UnixStream, bytes: &[u8]) -> usize {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return bytes.len(),
        }
    }
    written
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
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as i64)
}
