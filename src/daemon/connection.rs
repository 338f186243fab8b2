//! One client connection: read request lines, turn them into core commands,
//! and write whatever the core sends back.
//!
//! Two tasks per connection: this reader, and a writer that drains the
//! connection's [`OutboundQueue`], over one [`Socket`] that the io driver
//! watches for reading only (the writer has it watched for room only while
//! it waits for some). Neither decides anything about presence:
//! the reader parses a line into an [`ops::Request`](crate::ops::Request),
//! admits it by the size its op says its reply may have, has the op
//! resolve what needs the system through [`resolver::LineResolver`] (a
//! named pid, the peer's own process, a resume token), and passes the
//! resolved op to the core.

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use interprocess::local_socket::traits::StreamCommon as _;
use interprocess::os::unix::uds_local_socket::tokio::Stream;
use serde::Deserialize as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::driver::{Command, CoreHandle, Outlet as _};
use super::lock;
use super::outbound::{Next, OutboundBudget, OutboundQueue, Sent};
use super::pidwatch::PidWatcher;
use super::socket::{Armed, Socket, SocketReader};
use crate::core::registry::{ConnId, Peer};
use crate::core::store::HistoryReaders;
use crate::core::{Input, Line, LineKind};
use crate::ops::history::QUICK_READ_ROWS;
use crate::ops::{KNOWN_OPS, ReplySize, Request};
use crate::protocol::{
    ErrorBody, ErrorCode, HistoryReply, HistoryRequest, Limits, OutgoingReply, ReplyFields,
};
use crate::sys::{self, PeerProcess};
use resolver::LineResolver;

/// What every connection task shares.
pub struct Shared {
    pub core: CoreHandle,
    pub pids: PidWatcher,
    pub limits: Limits,
    pub connections_by_uid: ConnectionsByUid,
    pub user_names: UserNames,
    /// What every connection's queue holds together.
    pub outbound: Arc<OutboundBudget>,
    /// History reads, kept off the core (see [`answer_history`]).
    pub history: HistoryReads,
}

/// The user name of each uid that connects, looked up at most once a
/// [`USER_NAME_KEPT`]: a name service lookup may block, so it runs on the
/// blocking pool, which costs a thread hop and, when the pool's threads
/// are idle, a wake-up; every `presence` command connects anew.
pub struct UserNames {
    known: Mutex<HashMap<u32, (String, Instant)>>,
}

/// How long a looked-up user name is used before it is looked up again,
/// so that a renamed user shows the new name soon.
const USER_NAME_KEPT: Duration = Duration::from_secs(60);

/// Past this many uids the names are forgotten and looked up again; a
/// machine has far fewer users who connect.
const MAX_USER_NAMES: usize = 4096;

impl UserNames {
    pub fn new() -> UserNames {
        UserNames {
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The name of `uid`, or its number when it has none.
    async fn of(&self, uid: u32) -> String {
        self.of_at(uid, Instant::now()).await
    }

    async fn of_at(&self, uid: u32, now: Instant) -> String {
        let known = |names: &HashMap<u32, (String, Instant)>| {
            names
                .get(&uid)
                .filter(|(_, looked_up)| now.duration_since(*looked_up) < USER_NAME_KEPT)
                .map(|(name, _)| name.clone())
        };
        if let Some(name) = known(&lock(&self.known)) {
            return name;
        }
        let name = tokio::task::spawn_blocking(move || sys::user_name(uid))
            .await
            .unwrap_or_else(|_| uid.to_string());
        let mut names = lock(&self.known);
        if names.len() >= MAX_USER_NAMES {
            names.clear();
        }
        names.insert(uid, (name.clone(), now));
        name
    }
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
        let mut held = lock(&self.held);
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
        let mut held = lock(&self.of.held);
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
                    user: shared.user_names.of(uid).await,
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

    // Watched for reading only from here on; see `socket.rs`.
    let socket = match Socket::from_stream(stream) {
        Ok(socket) => Arc::new(socket),
        Err(e) => {
            tracing::warn!(conn, "could not register the connection ({e}); closing");
            return;
        }
    };
    // Shared by the reader, the writer task and, for replies written
    // straight from whichever thread runs the core, the queue.
    let queue = OutboundQueue::new(
        conn,
        shared.limits.max_outbound_bytes,
        Some(Arc::clone(&socket)),
        &shared.outbound,
    );
    queue.limit_stale(shared.limits.max_subscriptions_per_connection);
    let opened = Command::Open {
        conn,
        peer: peer.clone(),
        outlet: Arc::new(Arc::clone(&queue)),
    };
    if shared.core.send(opened).is_err() {
        return;
    }
    let writer = write_lines(
        Arc::clone(&socket),
        Arc::clone(&queue),
        conn,
        shared.core.clone(),
    );
    let mut writer = tokio::spawn(async move {
        writer.await;
        drop(flushing);
    });
    let recv = SocketReader::new(socket);
    read_requests(recv, &queue, conn, (&peer, peer_process), &shared).await;
    // Told at once from /proc, never waited for: a process killed (kill
    // -9, a crash) closes its sockets while it exits, flagged PF_EXITING.
    let exited = match peer_process {
        Some(sys::PeerProcess::Running(pinned)) => sys::is_exiting(pinned.process),
        Some(sys::PeerProcess::Exited) => true,
        None => false,
    };
    if shared
        .core
        .queue(Input::Close { conn, exited }.into())
        .is_ok()
    {
        shared.core.drive_soon().await;
    }
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
    recv: SocketReader,
    queue: &Arc<OutboundQueue>,
    conn: ConnId,
    peer: (&Peer, Option<PeerProcess>),
    shared: &Shared,
) {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, recv);
    let mut line = Vec::new();
    loop {
        // Requests already read are only queued; the core runs them once
        // this connection has no whole line left to read, and the thread's
        // other ready connections have queued theirs: a client that
        // pipelines, or many that send at once, share a batch and a commit.
        if !reader.buffer().contains(&b'\n') {
            shared.core.drive_soon().await;
        }
        match read_line(&mut reader, &mut line, shared.limits.max_line_bytes).await {
            Ok(ReadLine::Line) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let parsed = parse(&line);
                let size = reply_size(&parsed, peer, shared);
                if !admit(queue, &size, &shared.core).await {
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
    reader: &mut BufReader<SocketReader>,
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

/// Queues for the core what a parsed request line asks for, resolved. A
/// history read is the exception, returned for the caller to answer
/// itself.
fn handle_line(
    parsed: Result<(Value, Request), (Value, ErrorBody)>,
    conn: ConnId,
    (peer, peer_process): (&Peer, Option<PeerProcess>),
    shared: &Shared,
) -> Option<(Value, HistoryRequest)> {
    let (id, request) = match parsed {
        Ok(parsed) => parsed,
        Err((id, error)) => {
            let _ = shared.core.queue(Input::Refuse { conn, id, error }.into());
            return None;
        }
    };
    if let Request::History(request) = request {
        return Some((id, request));
    }
    let mut resolver = LineResolver::new(shared, peer, peer_process);
    let command = match request.resolve(&mut resolver) {
        Ok(request) => Input::Request { conn, id, request },
        Err(error) => Input::Refuse { conn, id, error },
    };
    let resolved = matches!(command, Input::Request { .. });
    // Queued first, then any process watch it opened is armed: the exit
    // of the process can then never reach the core ahead of the entry it
    // should remove.
    let reached = shared.core.queue(command.into()).is_ok();
    resolver.sent(resolved && reached);
    None
}

/// Admits a request as the queue's rules say
/// ([`OutboundQueue::admit_request`]). Admission waits for replies the
/// core owes; so before it waits, the core runs what this connection has
/// queued. `false` when the queue has closed.
async fn admit(queue: &OutboundQueue, size: &ReplySize, core: &CoreHandle) -> bool {
    let mut admitted = std::pin::pin!(queue.admit_request(size));
    let at_once = std::future::poll_fn(|cx| Poll::Ready(admitted.as_mut().poll(cx))).await;
    match at_once {
        Poll::Ready(admitted) => admitted,
        Poll::Pending => {
            core.drive();
            admitted.await
        }
    }
}

/// How large the reply to a parsed line may be, with the events it brings
/// the same connection (a `presence_state` follows a subscription); the
/// op says.
fn reply_size(
    parsed: &Result<(Value, Request), (Value, ErrorBody)>,
    (peer, peer_process): (&Peer, Option<PeerProcess>),
    shared: &Shared,
) -> ReplySize {
    match parsed {
        Ok((_, request)) => request.reply_size(&LineResolver::new(shared, peer, peer_process)),
        Err(_) => ReplySize::Small,
    }
}

/// Turns a line into a request, or into the error reply it deserves.
/// What is known of the op's fields then is only that they are of its
/// types: each op's resolution checks the rest.
fn parse(line: &[u8]) -> Result<(Value, Request), (Value, ErrorBody)> {
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
    Ok((id, request))
}

/// The connecting process, pinned when the connection was accepted, so
/// that a track without `pid` is tied to it and never to a process that
/// is given its pid later. `Ok(None)` when it could not be pinned for a
/// reason of its own; its tracks are then refused. Out of file
/// descriptors, the connection is refused instead, with the returned
/// reason, as a newcomer is when `accept` itself finds none: a
/// connection that could never track would only hold a slot.
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

/// Drains the outbound queue to the socket until the queue closes or the
/// socket fails. The socket is watched for room only while the queue
/// holds what it would not take: armed then, and let go once the queue is
/// drained, so that a client reading what it was sent wakes nobody.
async fn write_lines(
    socket: Arc<Socket>,
    queue: Arc<OutboundQueue>,
    conn: ConnId,
    core: CoreHandle,
) {
    let mut armed: Option<Armed> = None;
    loop {
        match queue.next().await {
            Next::Write => {
                // The queue writes, under its lock: the core may write to
                // the same socket when nothing is queued, and the two must
                // never interleave.
                let sent = match queue.write_to(&socket) {
                    Ok(sent) => sent,
                    Err(e) => {
                        tracing::debug!(conn, "write failed: {e}");
                        queue.abandon();
                        return;
                    }
                };
                match (sent, &armed) {
                    (Sent::Drained, _) => armed = None,
                    (Sent::Chunk, _) => {}
                    (Sent::Full, Some(waiting)) => {
                        if let Err(e) = waiting.writable().await {
                            tracing::debug!(conn, "waiting for room failed: {e}");
                            queue.abandon();
                            return;
                        }
                    }
                    // Armed now, and written to again before any wait: the
                    // room may have come before the registration, which
                    // then sees no edge for it.
                    (Sent::Full, None) => match socket.arm_for_writing() {
                        Ok(waiting) => armed = Some(waiting),
                        Err(e) => {
                            // Out of descriptors, most likely: look again
                            // shortly rather than spin or drop the client.
                            tracing::debug!(conn, "cannot watch the socket for room ({e})");
                            tokio::time::sleep(ARM_RETRY).await;
                        }
                    },
                }
                // A write stops at a chunk; whoever waits for the queue's
                // lock (the core, with a line for this client) gets a
                // chance at it before the next.
                tokio::task::yield_now().await;
            }
            Next::Resync(topics) => {
                armed = None;
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
                armed = None;
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
                drop(armed);
                // Half-close so the client sees EOF even while it keeps the
                // socket open.
                let _ = socket.shutdown(rustix::net::Shutdown::Write);
                return;
            }
        }
    }
}

/// How long a writer that could not arm its socket for writing waits
/// before it tries to write again.
const ARM_RETRY: Duration = Duration::from_millis(50);

mod resolver;

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

    #[tokio::test]
    async fn a_user_name_is_looked_up_once_and_then_remembered() {
        let names = UserNames::new();
        let uid = sys::current_uid();
        let first = names.of(uid).await;
        assert_eq!(first, sys::user_name(uid));
        // A name that is remembered is what the next connection gets,
        // without a lookup.
        names
            .known
            .lock()
            .unwrap()
            .insert(uid, ("remembered".into(), Instant::now()));
        assert_eq!(names.of(uid).await, "remembered");
        // Once it is older than it may be kept, it is looked up again.
        let later = Instant::now() + USER_NAME_KEPT + Duration::from_secs(1);
        assert_eq!(names.of_at(uid, later).await, first);
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
            Request::Subscribe(subscription) if subscription.topic.as_deref() == Some("file:/tmp/x")
        ));
    }
}
