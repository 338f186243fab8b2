//! One client connection: read request lines, turn them into core commands,
//! and write whatever the core sends back.
//!
//! Two tasks per connection: this reader, and a writer that drains the
//! connection's [`OutboundQueue`]. Neither decides anything about presence;
//! they parse, check what needs the system (a named pid, the peer's
//! credentials), and pass the rest to the core.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interprocess::local_socket::traits::StreamCommon as _;
use interprocess::os::unix::uds_local_socket::tokio::Stream;
use serde::Deserialize as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::core_thread::{Command, Outlet as _};
use super::outbound::{Next, OutboundBudget, OutboundQueue, ReplySize};
use super::pidwatch::{PidWatcher, Prepared};
use crate::core::Input;
use crate::core::registry::{ConnId, Op, Peer, ProcessId, TokenHash, Track};
use crate::core::store::HistoryReaders;
use crate::core::{Line, LineKind, Resolved};
use crate::protocol::{
    ErrorBody, ErrorCode, HistoryReply, HistoryRequest, KNOWN_OPS, Limits, OutgoingReply,
    ReplyFields, Request, TrackRequest, validate_meta, validate_name,
};
use crate::sys::{self, PeerProcess, PinnedPeer};

/// What every connection task shares.
pub struct Shared {
    pub core: Sender<Command>,
    pub pids: PidWatcher,
    pub limits: Limits,
    pub connections_by_uid: ConnectionsByUid,
    /// What every connection's queue holds together.
    pub outbound: Arc<OutboundBudget>,
    /// History reads, kept off the core (see [`answer_history`]).
    pub history: HistoryReads,
}

/// How many connections each user other than the daemon's own holds. On a
/// daemon shared by a group, one member must not be able to take every
/// connection slot and lock the others out.
pub struct ConnectionsByUid {
    held: Mutex<HashMap<u32, usize>>,
    max: usize,
    /// Not counted: in a per-user daemon every client is this user.
    daemon_uid: u32,
}

impl ConnectionsByUid {
    pub fn new(max: usize, daemon_uid: u32) -> ConnectionsByUid {
        ConnectionsByUid {
            held: Mutex::new(HashMap::new()),
            max,
            daemon_uid,
        }
    }

    /// A slot for one more connection of `uid`, given back when dropped;
    /// `None` when that user already holds the most allowed.
    fn take(&self, uid: u32) -> Option<UidSlot<'_>> {
        if uid == self.daemon_uid {
            return Some(UidSlot {
                of: self,
                uid: None,
            });
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(uid).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            of: self,
            uid: Some(uid),
        })
    }
}

/// One counted connection; see [`ConnectionsByUid::take`].
struct UidSlot<'a> {
    of: &'a ConnectionsByUid,
    uid: Option<u32>,
}

impl Drop for UidSlot<'_> {
    fn drop(&mut self) {
        let Some(uid) = self.uid else { return };
        let mut held = self.of.held.lock().unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut count) = held.entry(uid) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }
}

/// How long a connection's writer may take to flush once its client has
/// stopped sending. A client that half-closes and never reads is cut off
/// then, so it cannot hold a connection slot for ever.
const FLUSH_DEADLINE: Duration = Duration::from_secs(10);

/// Each connection's read buffer. Requests are a few hundred bytes; a
/// longer line is gathered a buffer at a time. Every idle connection
/// holds one, so it is kept small (tokio's default is 8 KiB).
const READ_BUFFER_BYTES: usize = 2048;

/// Serves one accepted connection until it closes, its reader and writer
/// both finished. `flushing` is held by the writer until it has sent its
/// last line, so that shutdown can wait for every client to get its
/// `shutdown` event.
pub async fn serve(
    stream: Stream,
    conn: ConnId,
    shared: Arc<Shared>,
    flushing: tokio::sync::mpsc::Sender<()>,
) {
    let (peer, peer_process) = match stream.peer_creds() {
        Ok(creds) => match (creds.pid(), creds.euid()) {
            (Some(pid), Some(uid)) if pid > 0 => {
                // Pinned first, as close to the client's connect as can be.
                let peer_process = match pin_peer(&stream, pid as u32, conn) {
                    Ok(pinned) => pinned,
                    Err(refusal) => {
                        super::listener::refuse(stream, refusal).await;
                        return;
                    }
                };
                let peer = Peer {
                    pid: pid as u32,
                    uid,
                    // A name service lookup may block; keep it off the reactor.
                    user: tokio::task::spawn_blocking(move || sys::user_name(uid))
                        .await
                        .unwrap_or_else(|_| uid.to_string()),
                };
                (peer, peer_process)
            }
            _ => {
                tracing::warn!(conn, "peer credentials are incomplete; closing");
                return;
            }
        },
        Err(e) => {
            tracing::warn!(conn, "could not read peer credentials ({e}); closing");
            return;
        }
    };
    let Some(_slot) = shared.connections_by_uid.take(peer.uid) else {
        let max = shared.limits.max_connections_per_uid;
        tracing::debug!(
            conn,
            uid = peer.uid,
            "refused: the user holds {max} connections"
        );
        super::listener::refuse(
            stream,
            format!(
                "uid {} already holds {max} connections, the most one user may; \
                 close some and try again",
                peer.uid
            ),
        )
        .await;
        return;
    };
    tracing::debug!(conn, pid = peer.pid, uid = peer.uid, "connection opened");

    let (recv, send) = tokio::net::UnixStream::from(stream).into_split();
    // Shared by the writer task and, for replies written straight from the
    // core's thread, the queue.
    let send = Arc::new(send);
    let queue = OutboundQueue::new(
        conn,
        shared.limits.max_outbound_bytes,
        Some(Arc::clone(&send)),
        &shared.outbound,
    );
    queue.limit_stale(shared.limits.max_subscriptions_per_connection);
    let opened = Command::Open {
        conn,
        peer: peer.clone(),
        outlet: Box::new(Arc::clone(&queue)),
    };
    if shared.core.send(opened).is_err() {
        return;
    }
    let writer = write_lines(send, Arc::clone(&queue), conn, shared.core.clone());
    let mut writer = tokio::spawn(async move {
        writer.await;
        drop(flushing);
    });
    read_requests(recv, &queue, conn, (&peer, peer_process), &shared).await;
    // Told at once from /proc, never waited for: a process killed (kill
    // -9, a crash) closes its sockets while it exits, flagged PF_EXITING.
    let exited = match peer_process {
        Some(sys::PeerProcess::Running(pinned)) => sys::is_exiting(pinned.process),
        Some(sys::PeerProcess::Exited) => true,
        None => false,
    };
    let _ = shared.core.send(Input::Close { conn, exited }.into());
    if tokio::time::timeout(FLUSH_DEADLINE, &mut writer)
        .await
        .is_err()
    {
        tracing::debug!(conn, "client stopped reading; dropping what it was owed");
        writer.abort();
    }
    tracing::debug!(conn, "connection closed");
}

async fn read_requests(
    recv: OwnedReadHalf,
    queue: &Arc<OutboundQueue>,
    conn: ConnId,
    peer: (&Peer, Option<PeerProcess>),
    shared: &Shared,
) {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, recv);
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line, shared.limits.max_line_bytes).await {
            Ok(ReadLine::Line) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let parsed = parse(&line);
                if !queue
                    .admit_request(&reply_size(&parsed, &shared.history))
                    .await
                {
                    return;
                }
                if let Some((id, request)) = handle_line(parsed, conn, peer, shared) {
                    // Admitted once every reply owed before it was queued,
                    // and no later request is read until it is answered:
                    // the reply keeps its place.
                    answer_history(id, request, queue, shared).await;
                }
            }
            Ok(ReadLine::Eof) => return,
            Ok(ReadLine::TooLong) => {
                let error = ErrorBody::new(
                    ErrorCode::LineTooLong,
                    format!(
                        "a line may be at most {} bytes; closing the connection",
                        shared.limits.max_line_bytes
                    ),
                );
                let _ = shared.core.send(
                    Input::Refuse {
                        conn,
                        id: Value::Null,
                        error,
                    }
                    .into(),
                );
                return;
            }
            Err(e) => {
                tracing::debug!(conn, "read failed: {e}");
                return;
            }
        }
    }
}

/// The history's readers, and permits for the reads that may run at once,
/// in two lanes: no more database connections and blocking threads than
/// that, however many clients ask together.
pub struct HistoryReads {
    readers: Arc<HistoryReaders>,
    /// Reads of a few rows. They have a lane of their own so that they
    /// never wait behind reads of thousands: a short read waits, at
    /// worst, for other short ones.
    quick: tokio::sync::Semaphore,
    /// Reads of more rows. Few at once: on a machine of a few cores more
    /// would not finish sooner, and would only take the cores from
    /// everyone else.
    bulk: tokio::sync::Semaphore,
}

impl HistoryReads {
    pub fn new(readers: HistoryReaders) -> HistoryReads {
        HistoryReads {
            readers: Arc::new(readers),
            quick: tokio::sync::Semaphore::new(QUICK_READS_AT_ONCE),
            bulk: tokio::sync::Semaphore::new(BULK_READS_AT_ONCE),
        }
    }
}

/// How many rows a read may fetch and still be quick: a millisecond or so
/// of work. `presence log` asks for 100 events, plus one.
const QUICK_READ_ROWS: usize = 128;

/// How many quick history reads run at once, and how many of more rows;
/// each on a blocking thread with a database connection of its own (two
/// descriptors, and at most 512 KiB of page cache). A connection reads one
/// request at a time, so it holds one permit at most: a lane's permits go
/// round the connections that want them, in turn.
const QUICK_READS_AT_ONCE: usize = 16;
const BULK_READS_AT_ONCE: usize = 2;

/// Answers a `history` request on a blocking thread, from a database
/// connection of the io layer's own, never the core's: a read that had to
/// wait for a lock would hold up every commit and announcement. A read
/// that the remembered events say finds nothing is answered at once.
async fn answer_history(
    id: Value,
    request: HistoryRequest,
    queue: &Arc<OutboundQueue>,
    shared: &Shared,
) {
    let reads = &shared.history;
    let rows = reads.readers.rows_at_most(&request);
    let line = if rows == 0 {
        reply_line(id, Ok(HistoryReply::default()))
    } else {
        let lane = if rows <= QUICK_READ_ROWS {
            &reads.quick
        } else {
            &reads.bulk
        };
        let asked = id.clone();
        let read = async {
            let _running = lane.acquire().await.map_err(|e| e.to_string())?;
            let readers = Arc::clone(&reads.readers);
            // The reply is made into its line there too: for thousands of
            // events that is milliseconds, which the io layer's few
            // threads owe everyone else.
            tokio::task::spawn_blocking(move || {
                let read = readers.history(&request).map_err(|e| e.to_string());
                reply_line(id, read)
            })
            .await
            .map_err(|e| e.to_string())
        };
        match read.await {
            Ok(line) => line,
            Err(cause) => reply_line(asked, Err(cause)),
        }
    };
    queue.deliver(line);
}

/// The line that answers a history read.
fn reply_line(id: Value, read: Result<HistoryReply, String>) -> Line {
    let outcome = match read {
        Ok(reply) => Ok(ReplyFields::of(&reply)),
        Err(cause) => Err(ErrorBody::new(
            ErrorCode::Internal,
            format!("could not read the history: {cause}"),
        )),
    };
    Line {
        kind: LineKind::Reply {
            succeeded: outcome.is_ok(),
        },
        bytes: OutgoingReply { id, outcome }.to_line().into(),
    }
}

enum ReadLine {
    Line,
    Eof,
    TooLong,
}

/// Reads one line into `line`, without its `\n` or `\r\n`, refusing to
/// buffer more than `max` bytes of it. A partial line at EOF is dropped.
async fn read_line(
    reader: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<ReadLine> {
    line.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(ReadLine::Eof);
        }
        let (chunk, found_end) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], true),
            None => (available, false),
        };
        // One byte of slack for the `\r` of a `\r\n`, checked exactly below.
        if line.len() + chunk.len() > max + 1 {
            return Ok(ReadLine::TooLong);
        }
        let needed = line.len() + chunk.len();
        if needed > line.capacity() {
            // Grow as a Vec would, by doubling, but never past the longest
            // line allowed: a client that stalls mid-line holds no more.
            let target = needed.max(line.capacity() * 2).min(max + 1);
            line.reserve_exact(target - line.len());
        }
        line.extend_from_slice(chunk);
        let used = chunk.len() + usize::from(found_end);
        reader.consume(used);
        if found_end {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(if line.len() > max {
                ReadLine::TooLong
            } else {
                ReadLine::Line
            });
        }
    }
}

/// Sends the core what a parsed request line asks for. A history read is
/// the exception, returned for the caller to answer itself.
fn handle_line(
    parsed: Result<(Value, Parsed), (Value, ErrorBody)>,
    conn: ConnId,
    (peer, peer_process): (&Peer, Option<PeerProcess>),
    shared: &Shared,
) -> Option<(Value, HistoryRequest)> {
    let (id, resolved) = match parsed {
        Ok(parsed) => parsed,
        Err((id, error)) => {
            let _ = shared.core.send(Input::Refuse { conn, id, error }.into());
            return None;
        }
    };
    let resolved = match resolved {
        Parsed::Ready(resolved) => resolved,
        Parsed::History(request) => return Some((id, request)),
        Parsed::Track(request) => {
            let target = match track_target(request.pid, peer, peer_process) {
                Ok(target) => target,
                Err(error) => {
                    let _ = shared.core.send(Input::Refuse { conn, id, error }.into());
                    return None;
                }
            };
            if let TrackTarget::Pinned(pinned) = target
                && let Some(_watched) = shared.pids.hold_if_watched(&pinned)
            {
                // The peer's very process (by its pidfs inode, where it has
                // one) is watched already: no new watch, and its exit
                // waits for this track to reach the core.
                let command = match own_process_track(request, pinned.process, &shared.limits) {
                    Ok(track) => Input::Request {
                        conn,
                        id,
                        request: Resolved::Presence(Op::Track(track)),
                    }
                    .into(),
                    Err(error) => Input::Refuse { conn, id, error }.into(),
                };
                let _ = shared.core.send(command);
                return None;
            }
            let (track, prepared) = match resolve_track(request, target, peer, shared) {
                Ok(resolved) => resolved,
                Err(error) => {
                    let _ = shared.core.send(Input::Refuse { conn, id, error }.into());
                    return None;
                }
            };
            let command = Input::Request {
                conn,
                id,
                request: Resolved::Presence(Op::Track(track)),
            }
            .into();
            // Track first, then arm: the exit of the process can then never
            // reach the core ahead of the entry it should remove.
            if shared.core.send(command).is_ok() {
                shared.pids.arm(prepared);
            }
            return None;
        }
    };
    let _ = shared.core.send(
        Input::Request {
            conn,
            id,
            request: resolved,
        }
        .into(),
    );
    None
}

/// How large the reply to a parsed line may be, with the events it brings
/// the same connection: a `presence_state` follows a subscription.
fn reply_size(
    parsed: &Result<(Value, Parsed), (Value, ErrorBody)>,
    history: &HistoryReads,
) -> ReplySize {
    let large = |state_of: Option<&String>| ReplySize::Large {
        state_of: state_of.cloned(),
    };
    match parsed {
        // A read of a few events is bounded by its request, and must not
        // wait for one of the daemon's few slots for large replies behind
        // everyone's reads of thousands.
        Ok((_, Parsed::History(request)))
            if history.readers.rows_at_most(request) <= QUICK_READ_ROWS =>
        {
            ReplySize::InTurn
        }
        Ok((_, Parsed::History(_))) => ReplySize::Bulk,
        Ok((_, Parsed::Track(track))) if track.subscribe => large(Some(&track.topic)),
        Ok((_, Parsed::Ready(Resolved::Presence(op)))) => match op {
            Op::List(_) | Op::SubscribeAll => ReplySize::Bulk,
            Op::Subscribe(topic) => large(Some(topic)),
            Op::GetByKey(_) | Op::Resume(_) => large(None),
            Op::Track(_)
            | Op::Untrack(_)
            | Op::Update(_)
            | Op::Unsubscribe(_)
            | Op::UnsubscribeAll => ReplySize::Small,
        },
        Ok((_, Parsed::Track(_) | Parsed::Ready(_))) | Err(_) => ReplySize::Small,
    }
}

enum Parsed {
    Ready(Resolved),
    /// A track still needs its process resolved.
    Track(TrackRequest),
    /// Answered by the io layer from its own database connection.
    History(HistoryRequest),
}

/// Turns a line into a request, or into the error reply it deserves.
fn parse(line: &[u8]) -> Result<(Value, Parsed), (Value, ErrorBody)> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        (
            Value::Null,
            ErrorBody::new(ErrorCode::BadJson, format!("not valid JSON: {e}")),
        )
    })?;
    let Value::Object(object) = &value else {
        return Err((
            Value::Null,
            ErrorBody::new(ErrorCode::BadRequest, "a request must be a JSON object"),
        ));
    };
    let id = object.get("id").cloned().unwrap_or(Value::Null);
    if matches!(id, Value::Array(_) | Value::Object(_)) {
        return Err((
            Value::Null,
            ErrorBody::new(
                ErrorCode::BadRequest,
                "`id` must be a string, number, boolean or null",
            ),
        ));
    }
    let op = match object.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => {
            return Err((
                id,
                ErrorBody::new(ErrorCode::BadRequest, "`op` must be a string"),
            ));
        }
        None => return Err((id, ErrorBody::new(ErrorCode::BadRequest, "missing `op`"))),
    };
    if !KNOWN_OPS.contains(&op) {
        return Err((
            id,
            ErrorBody::new(
                ErrorCode::UnknownOp,
                format!("unknown op `{op}`; known ops: {}", KNOWN_OPS.join(", ")),
            ),
        ));
    }
    // Deserialized from the parsed value by reference, not from a clone of
    // it (serde still buffers an internally tagged enum's fields).
    let request = Request::deserialize(&value).map_err(|e| {
        (
            id.clone(),
            ErrorBody::new(ErrorCode::BadRequest, format!("bad `{op}` request: {e}")),
        )
    })?;
    let parsed = match request {
        Request::Hello(hello) => Parsed::Ready(Resolved::Hello(hello)),
        Request::Track(track) => Parsed::Track(track),
        Request::Untrack(untrack) => Parsed::Ready(Resolved::Presence(Op::Untrack(untrack))),
        Request::Update(update) => Parsed::Ready(Resolved::Presence(Op::Update(update))),
        Request::List(list) => Parsed::Ready(Resolved::Presence(Op::List(list.topic))),
        Request::GetByKey(get) => Parsed::Ready(Resolved::Presence(Op::GetByKey(get))),
        Request::Subscribe(sub) => match (sub.topic, sub.all) {
            (Some(topic), false) => Parsed::Ready(Resolved::Presence(Op::Subscribe(topic))),
            (None, true) => Parsed::Ready(Resolved::Presence(Op::SubscribeAll)),
            (Some(_), true) | (None, false) => {
                return Err((id, neither_topic_nor_all("subscribe")));
            }
        },
        Request::Unsubscribe(sub) => match (sub.topic, sub.all) {
            (Some(topic), false) => Parsed::Ready(Resolved::Presence(Op::Unsubscribe(topic))),
            (None, true) => Parsed::Ready(Resolved::Presence(Op::UnsubscribeAll)),
            (Some(_), true) | (None, false) => {
                return Err((id, neither_topic_nor_all("unsubscribe")));
            }
        },
        Request::Resume(resume) => {
            let tokens = resume
                .tokens
                .into_iter()
                .map(|token| {
                    let hash = hash_token(&token);
                    (token, hash)
                })
                .collect();
            Parsed::Ready(Resolved::Presence(Op::Resume(tokens)))
        }
        Request::Status(_) => Parsed::Ready(Resolved::Status),
        Request::Ping(_) => Parsed::Ready(Resolved::Ping),
        Request::History(history) => Parsed::History(history),
    };
    Ok((id, parsed))
}

/// The connecting process, pinned when the connection was accepted, so
/// that a track without `pid` is tied to it and never to a process that
/// is given its pid later. `Ok(None)` when it could not be pinned for a
/// reason of its own; its tracks are then refused. Out of file
/// descriptors, the connection is refused instead, with the returned
/// reason, as a newcomer is when `accept` itself finds none: a
/// connection that could never track would only hold a slot.
/// `subscribe` and `unsubscribe` name one topic or all of them.
fn neither_topic_nor_all(op: &str) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::BadRequest,
        format!("bad `{op}` request: give either `topic` or `\"all\": true`"),
    )
}

fn pin_peer(stream: &Stream, pid: u32, conn: ConnId) -> Result<Option<PeerProcess>, String> {
    use std::os::fd::AsFd as _;
    match sys::pin_peer(stream.as_fd(), pid) {
        Ok(pinned) => Ok(Some(pinned)),
        Err(e) if sys::is_out_of_fds(&e) => {
            tracing::debug!(conn, pid, "refused: no descriptor to pin its process");
            Err(
                "the daemon is out of file descriptors and cannot identify the connecting \
                 process; try again once some connections close"
                    .to_owned(),
            )
        }
        Err(e) => {
            tracing::warn!(
                conn,
                pid,
                "cannot pin the connecting process ({e}); its tracks will be refused"
            );
            Ok(None)
        }
    }
}

/// Which process a track's entry is to belong to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TrackTarget {
    /// The connection's own, as pinned when it was accepted.
    Pinned(PinnedPeer),
    /// Another process the client named, by a pid of the daemon's pid
    /// namespace.
    Named(u32),
}

/// Works out which process a track names: the connection's own when it
/// names none (or its own pid, as it sees it), else the pid it names.
fn track_target(
    named: Option<u32>,
    peer: &Peer,
    pinned: Option<PeerProcess>,
) -> Result<TrackTarget, ErrorBody> {
    let pinned = match pinned {
        Some(PeerProcess::Running(pinned)) => pinned,
        // Without the process, its pid namespace is unknown too, so even a
        // pid it names cannot be read with certainty.
        Some(PeerProcess::Exited) => {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!(
                    "the process that opened this connection (pid {}) exited before the \
                     daemon accepted it, so no entry can be tied to it; connect from a \
                     running process",
                    peer.pid
                ),
            ));
        }
        None => {
            return Err(ErrorBody::new(
                ErrorCode::Internal,
                format!(
                    "the daemon could not identify the process that opened this connection \
                     (pid {}) when it accepted it (its log says why); connect again",
                    peer.pid
                ),
            ));
        }
    };
    match named {
        None => Ok(TrackTarget::Pinned(pinned)),
        Some(pid) if pid == pinned.own_pid => Ok(TrackTarget::Pinned(pinned)),
        Some(pid) if pinned.in_nested_pid_namespace => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!(
                "pid {pid} was named from another pid namespace (a container), where pids \
                 name other processes than they do to the daemon; leave out `pid` to tie the \
                 entry to the connecting process, or run the daemon in the same pid namespace"
            ),
        )),
        Some(pid) => Ok(TrackTarget::Named(pid)),
    }
}

/// Resolves what a track needs from the system: its process, watched
/// from now on, and a resume token.
fn resolve_track(
    request: TrackRequest,
    target: TrackTarget,
    peer: &Peer,
    shared: &Shared,
) -> Result<(Track, Prepared), ErrorBody> {
    // The registry checks these too; checking first here means a refused
    // track never opens a process watch.
    validate_track(&request, &shared.limits)?;
    let (process, prepared) = match target {
        TrackTarget::Pinned(pinned) => {
            let process = pinned.process;
            let prepared = shared.pids.prepare_peer(&pinned).map_err(|e| {
                watch_failed(&e, process.pid, || connection_process_exited(process))
            })?;
            (process, prepared)
        }
        TrackTarget::Named(pid) => resolve_named_process(pid, peer, &shared.pids)?,
    };
    Ok((with_token(request, process)?, prepared))
}

/// The refusal of a track tied to the connection's own process, which has
/// exited since it connected. Its pid is not looked up again: another
/// process, maybe another user's, may have it now.
fn connection_process_exited(process: ProcessId) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotFound,
        format!(
            "the process that opened this connection (pid {}) has exited, so no entry can be \
             tied to it; name a running process with `pid`, or track from a running process",
            process.pid
        ),
    )
}

/// The refusal of a track whose process could not be watched: `gone`
/// when it is not running, else why not.
fn watch_failed(e: &std::io::Error, pid: u32, gone: impl FnOnce() -> ErrorBody) -> ErrorBody {
    if e.kind() == std::io::ErrorKind::NotFound {
        gone()
    } else if sys::is_out_of_fds(e) {
        ErrorBody::new(
            ErrorCode::Internal,
            format!(
                "the daemon is out of file descriptors and cannot watch process {pid}; \
                 try again once some connections close"
            ),
        )
    } else {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("cannot watch process {pid}: {e}"),
        )
    }
}

/// A track of the peer's own process, which is watched already.
fn own_process_track(
    request: TrackRequest,
    process: ProcessId,
    limits: &Limits,
) -> Result<Track, ErrorBody> {
    validate_track(&request, limits)?;
    with_token(request, process)
}

fn validate_track(request: &TrackRequest, limits: &Limits) -> Result<(), ErrorBody> {
    validate_name("topic", &request.topic, limits.max_name_bytes)?;
    validate_name("key", &request.key, limits.max_name_bytes)?;
    validate_meta(&request.meta, limits.max_meta_bytes)
}

/// The track, with a new resume token.
fn with_token(request: TrackRequest, process: ProcessId) -> Result<Track, ErrorBody> {
    let (token, token_hash) = new_resume_token().ok_or_else(|| {
        ErrorBody::new(
            ErrorCode::Internal,
            "no randomness for a resume token; try again",
        )
    })?;
    Ok(Track {
        request,
        process,
        token,
        token_hash,
    })
}

/// Finds a process a client named by pid, which must be running and
/// (unless the client is root) of the client's uid.
fn resolve_named_process(
    pid: u32,
    peer: &Peer,
    pids: &PidWatcher,
) -> Result<(ProcessId, Prepared), ErrorBody> {
    let not_running = || ErrorBody::new(ErrorCode::NotFound, format!("no running process {pid}"));
    // The watch is opened first and pins the process; what is read about
    // it afterwards (its start time, its uid) is confirmed against the
    // watch, so a pid reused in between cannot pass for the one named.
    let (process, prepared) = pids
        .prepare_pid(pid)
        .map_err(|e| watch_failed(&e, pid, not_running))?;
    if peer.uid != 0 {
        let owner = sys::process_uid(pid).map_err(|_| not_running())?;
        if !prepared.still_running() {
            return Err(not_running());
        }
        if owner != peer.uid {
            return Err(ErrorBody::new(
                ErrorCode::PermissionDenied,
                format!("process {pid} belongs to another user"),
            ));
        }
    }
    Ok((process, prepared))
}

/// A fresh resume token and its hash; only the hash is kept. `None` when
/// the system has no randomness to give: a guessable token would let
/// anyone of the same uid take the entry over, so the track is refused.
fn new_resume_token() -> Option<(String, TokenHash)> {
    let mut bytes = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut bytes) {
        tracing::error!("no randomness for a resume token: {e}");
        return None;
    }
    let mut token = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(token, "{byte:02x}");
    }
    let hash = hash_token(&token);
    Some((token, hash))
}

fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// Drains the outbound queue to the socket until the queue closes or the
/// socket fails.
async fn write_lines(
    send: Arc<OwnedWriteHalf>,
    queue: Arc<OutboundQueue>,
    conn: ConnId,
    core: Sender<Command>,
) {
    let socket = send.as_ref().as_ref();
    loop {
        match queue.next().await {
            Next::Write => {
                // The queue writes, under its lock: the core may write to
                // the same socket when nothing is queued, and the two must
                // never interleave.
                let written = match socket.writable().await {
                    Ok(()) => queue.write_to(socket),
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    tracing::debug!(conn, "write failed: {e}");
                    queue.abandon();
                    return;
                }
                // A write stops at a chunk; whoever waits for the queue's
                // lock (the core, with a line for this client) gets a
                // chance at it before the next.
                tokio::task::yield_now().await;
            }
            Next::Resync(topics) => {
                let _ = core.send(
                    Input::Resync {
                        conn,
                        topics,
                        all: false,
                    }
                    .into(),
                );
            }
            Next::ResyncAll => {
                let _ = core.send(
                    Input::Resync {
                        conn,
                        topics: Vec::new(),
                        all: true,
                    }
                    .into(),
                );
            }
            Next::Finished => {
                // Half-close so the client sees EOF even while it keeps the
                // socket open.
                let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Write);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests_props;

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(line: &str) -> ErrorCode {
        match parse(line.as_bytes()) {
            Err((_, error)) => error.code,
            Ok(_) => panic!("expected `{line}` to be refused"),
        }
    }

    #[test]
    fn parse_tells_the_error_kinds_apart() {
        assert_eq!(code_of("{nope"), ErrorCode::BadJson);
        assert_eq!(code_of("[1]"), ErrorCode::BadRequest);
        assert_eq!(code_of(r#"{"op":"fly"}"#), ErrorCode::UnknownOp);
        assert_eq!(
            code_of(r#"{"op":"track","topic":"t"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code_of(r#"{"id":[1],"op":"ping"}"#), ErrorCode::BadRequest);
    }

    #[test]
    fn parse_accepts_escaped_slashes_and_echoes_the_id() {
        let (id, parsed) =
            parse(br#"{"id":"a\/b","op":"subscribe","topic":"file:\/tmp\/x"}"#).unwrap();
        assert_eq!(id, Value::String("a/b".into()));
        assert!(matches!(
            parsed,
            Parsed::Ready(Resolved::Presence(Op::Subscribe(topic))) if topic == "file:/tmp/x"
        ));
    }

    fn peer() -> Peer {
        Peer {
            pid: 4242,
            uid: 1000,
            user: "alice".to_owned(),
        }
    }

    fn pinned(own_pid: u32, nested: bool) -> Option<PeerProcess> {
        Some(PeerProcess::Running(pinned_peer(own_pid, nested)))
    }

    fn pinned_peer(own_pid: u32, nested: bool) -> PinnedPeer {
        PinnedPeer {
            process: ProcessId {
                pid: 4242,
                start_time: 99,
            },
            own_pid,
            in_nested_pid_namespace: nested,
            pidfs_inode: Some(7),
        }
    }

    #[test]
    fn a_track_without_pid_is_the_pinned_process_or_refused() {
        let process = pinned_peer(4242, false);
        let target = |named, pin| track_target(named, &peer(), pin);
        assert_eq!(
            target(None, pinned(4242, false)),
            Ok(TrackTarget::Pinned(process))
        );
        assert_eq!(
            target(Some(4242), pinned(4242, false)),
            Ok(TrackTarget::Pinned(process))
        );
        assert_eq!(
            target(Some(77), pinned(4242, false)),
            Ok(TrackTarget::Named(77))
        );
        let gone = target(None, Some(PeerProcess::Exited)).unwrap_err();
        assert_eq!(gone.code, ErrorCode::NotFound);
        assert!(gone.message.contains("exited"), "{}", gone.message);
        // Gone before it was pinned: its pid namespace is unknown as well.
        let named = target(Some(77), Some(PeerProcess::Exited)).unwrap_err();
        assert_eq!(named.code, ErrorCode::NotFound);
        assert_eq!(target(None, None).unwrap_err().code, ErrorCode::Internal);
    }

    #[test]
    fn a_pid_named_from_a_nested_pid_namespace_is_refused_unless_it_is_the_peer() {
        let process = pinned_peer(1, true);
        // Pid 1 in its own namespace: the peer itself.
        assert_eq!(
            track_target(Some(1), &peer(), pinned(1, true)),
            Ok(TrackTarget::Pinned(process))
        );
        for other in [2, 4242] {
            let refused = track_target(Some(other), &peer(), pinned(1, true)).unwrap_err();
            assert_eq!(refused.code, ErrorCode::BadRequest);
            assert!(
                refused.message.contains("pid namespace"),
                "{}",
                refused.message
            );
        }
    }

    #[test]
    fn tokens_are_random_and_hash_to_what_is_stored() {
        let (a, hash_a) = new_resume_token().unwrap();
        let (b, _) = new_resume_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
            "{a} is lowercase hex"
        );
        assert_eq!(hash_token(&a), hash_a);
    }
}
