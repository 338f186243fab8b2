//! A connection's outbound queue: the core pushes lines without ever
//! blocking, the connection's writer task drains them to the socket.
//!
//! Every byte queued for a connection counts against its bound: replies,
//! events, and the unwritten rest of a line half on the wire. A reader
//! that falls behind loses its queued `presence_diff` lines, never
//! anything else: the topics they were for are marked, later diffs for
//! them are not queued, and once the queue drains the writer asks the core
//! for one fresh `presence_state` per marked topic. `role` events are
//! coalesced to the latest per entry. Replies are never dropped. Instead
//! the reader admits a request only while the queue is within its bound
//! (see [`OutboundQueue::admit_request`]). A request whose reply may be of
//! any size (a list, a subscription's state, history) is admitted only
//! once every earlier reply is queued, and nothing after it until its own
//! reply is: so a connection holds at most its bound and one such reply,
//! however many requests it pipelines, and that reply is always sent
//! whole.
//!
//! All the queues together answer to one daemon-wide budget
//! ([`OutboundBudget`]). Past it, the connections holding the most are
//! cut off: what they were owed is dropped, they are sent one line saying
//! why, and closed. Dropping lines from a connection that stays open
//! would leave it with a wrong picture; closing it tells it so.
//!
//! When nothing is queued, `deliver` writes the line to the socket itself,
//! without blocking, from the core's thread: the usual reply then reaches
//! its client without waking the writer task, a thread hop that costs more
//! than the write. Whatever the socket does not take at once is queued for
//! the writer, in order. Every write to the socket, the writer's too, is
//! made under the queue's lock, so the queue always knows exactly how much
//! of its first line the client has been sent.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde_json::Value;
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::core::registry::ConnId;
use crate::core::{Line, LineKind, Outlet};
use crate::protocol::{ErrorBody, ErrorCode, OutgoingReply};

/// Requests with small replies a connection may have waiting for their
/// replies. Enough for a client to pipeline; small enough that replies it
/// never reads stay few.
pub const MAX_IN_FLIGHT: usize = 32;

/// How large a request's reply, with the events it brings its own
/// connection, may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplySize {
    /// Bounded by the request itself: an acknowledgement, an error, an
    /// entry's standing.
    Small,
    /// As large as what the daemon holds: a list, a subscription's
    /// `presence_state`, history.
    Unbounded,
}

/// What every connection's queue holds together, against the daemon-wide
/// budget (`--max-outbound-total`).
pub struct OutboundBudget {
    max_bytes: usize,
    total: AtomicUsize,
    /// Every live queue, to find the ones holding the most. A queue
    /// removes itself when it is dropped.
    queues: Mutex<HashMap<ConnId, Weak<OutboundQueue>>>,
    /// Held while connections are cut off, so that two threads that see
    /// the same excess do not both cut for it.
    cutting: Mutex<()>,
}

impl OutboundBudget {
    pub fn new(max_bytes: usize) -> Arc<OutboundBudget> {
        Arc::new(OutboundBudget {
            max_bytes,
            total: AtomicUsize::new(0),
            queues: Mutex::new(HashMap::new()),
            cutting: Mutex::new(()),
        })
    }

    fn is_spent(&self) -> bool {
        self.total.load(Ordering::Relaxed) > self.max_bytes
    }

    /// Cuts off the connections holding the most until the total is back
    /// within the budget. The scan visits every queue, but only runs
    /// while the budget is spent, and each run brings it back.
    fn enforce(&self) {
        let _cutting = lock(&self.cutting);
        if !self.is_spent() {
            return;
        }
        let mut holders: Vec<(usize, Arc<OutboundQueue>)> = lock(&self.queues)
            .values()
            .filter_map(Weak::upgrade)
            .map(|queue| (queue.queued_bytes(), queue))
            .collect();
        holders.sort_unstable_by_key(|(held, _)| std::cmp::Reverse(*held));
        for (held, queue) in &holders {
            let total = self.total.load(Ordering::Relaxed);
            if total <= self.max_bytes || *held == 0 {
                break;
            }
            let farewell = OutgoingReply::failure(
                Value::Null,
                ErrorBody::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the daemon holds {total} bytes its clients have not read, more than its \
                         budget of {} (--max-outbound-total); this connection held {held} of \
                         them, more than any other still open, so it is closed: read what you \
                         ask for",
                        self.max_bytes
                    ),
                ),
            );
            let cut = queue.cut_off(&farewell.to_line());
            tracing::warn!(
                conn = queue.conn,
                held = cut,
                total,
                budget = self.max_bytes,
                "outbound budget spent: closed the connection holding the most"
            );
        }
        // `holders` goes before `_cutting`: a queue dropped with it takes
        // the registry's lock, which is free by now.
    }
}

pub struct OutboundQueue {
    conn: ConnId,
    state: Mutex<State>,
    /// Wakes the writer when lines arrive or the queue closes.
    ready: Notify,
    /// Wakes the reader when a request may be admitted, or never will.
    room: Notify,
    max_bytes: usize,
    budget: Arc<OutboundBudget>,
}

#[derive(Default)]
struct State {
    lines: VecDeque<Line>,
    /// How much of the first line the client has been sent. A line begun
    /// is never dropped or replaced: its head is on the wire.
    front_sent: usize,
    /// Bytes queued and not yet sent, counted in the budget's total too.
    bytes: usize,
    /// Requests passed to the core whose reply has not been queued yet.
    in_flight: usize,
    /// The request in flight has a reply of any size: nothing more is
    /// admitted until that reply is queued.
    unbounded_in_flight: bool,
    closed: bool,
    /// Topics whose diffs were dropped; waiting for a fresh state.
    stale: BTreeSet<String>,
    /// Stale topics the writer has already asked the core to resync.
    resync_requested: BTreeSet<String>,
    /// The socket, shared with the writer, for writing directly when
    /// nothing is queued; let go when the queue closes.
    direct: Option<Arc<OwnedWriteHalf>>,
}

/// What the writer should do next.
pub enum Next {
    /// Lines wait: write them once the socket takes more
    /// ([`OutboundQueue::write_to`]).
    Write,
    /// The queue is drained; ask the core for fresh states for these topics.
    Resync(Vec<String>),
    /// Closed and drained: finish.
    Finished,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // carry on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl OutboundQueue {
    /// The queue of connection `conn`, bounded at `max_bytes` and counted
    /// in `budget`, for the socket `direct`, which its writer shares;
    /// without one, every line goes through the writer.
    pub fn new(
        conn: ConnId,
        max_bytes: usize,
        direct: Option<Arc<OwnedWriteHalf>>,
        budget: &Arc<OutboundBudget>,
    ) -> Arc<OutboundQueue> {
        let queue = Arc::new(OutboundQueue {
            conn,
            state: Mutex::new(State {
                direct,
                ..State::default()
            }),
            ready: Notify::new(),
            room: Notify::new(),
            max_bytes,
            budget: Arc::clone(budget),
        });
        lock(&budget.queues).insert(conn, Arc::downgrade(&queue));
        queue
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn count(&self, state: &mut State, bytes: usize) {
        state.bytes += bytes;
        self.budget.total.fetch_add(bytes, Ordering::Relaxed);
    }

    fn uncount(&self, state: &mut State, bytes: usize) {
        let was_over = state.bytes > self.max_bytes;
        state.bytes -= bytes;
        self.budget.total.fetch_sub(bytes, Ordering::Relaxed);
        if was_over && state.bytes <= self.max_bytes {
            self.room.notify_waiters();
        }
    }

    /// Waits for the next thing the writer should do.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.ready.notified();
            {
                let mut state = self.lock();
                if !state.lines.is_empty() {
                    return Next::Write;
                }
                if state.closed {
                    return Next::Finished;
                }
                let unrequested: Vec<String> = state
                    .stale
                    .difference(&state.resync_requested)
                    .cloned()
                    .collect();
                if !unrequested.is_empty() {
                    state.resync_requested.extend(unrequested.iter().cloned());
                    return Next::Resync(unrequested);
                }
            }
            notified.await;
        }
    }

    /// Writes queued lines to `socket` for as long as it takes them
    /// without blocking. An error means the socket is done for.
    pub fn write_to(&self, socket: &UnixStream) -> std::io::Result<()> {
        let mut state = self.lock();
        self.send_queued(&mut state, socket)
    }

    fn send_queued(&self, state: &mut State, socket: &UnixStream) -> std::io::Result<()> {
        loop {
            let Some(front) = state.lines.front() else {
                return Ok(());
            };
            let line_len = front.bytes.len();
            let sent = match socket.try_write(&front.bytes[state.front_sent..]) {
                Ok(0) => return Ok(()),
                Ok(sent) => sent,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            state.front_sent += sent;
            if state.front_sent == line_len {
                state.lines.pop_front();
                state.front_sent = 0;
            }
            self.uncount(state, sent);
        }
    }

    /// Waits until the connection may send the core a request whose reply
    /// is of `size`, then counts it as in flight. The queue must be
    /// within its bound, and no request of unbounded reply still in
    /// flight; a small request also waits while [`MAX_IN_FLIGHT`] others
    /// do, and an unbounded one until every earlier reply is queued, so
    /// that the bound it is checked against counts them all. `false` when
    /// the queue has closed: read no more.
    pub async fn admit_request(&self, size: ReplySize) -> bool {
        loop {
            let notified = self.room.notified();
            {
                let mut state = self.lock();
                if state.closed {
                    return false;
                }
                let room = state.bytes <= self.max_bytes
                    && !state.unbounded_in_flight
                    && match size {
                        ReplySize::Small => state.in_flight < MAX_IN_FLIGHT,
                        ReplySize::Unbounded => state.in_flight == 0,
                    };
                if room {
                    state.in_flight += 1;
                    state.unbounded_in_flight = size == ReplySize::Unbounded;
                    return true;
                }
            }
            notified.await;
        }
    }

    /// Marks the queue closed from the writer's side (the socket failed).
    pub fn abandon(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.direct = None;
        state.lines.clear();
        state.front_sent = 0;
        let held = state.bytes;
        self.uncount(&mut state, held);
        self.room.notify_waiters();
    }

    /// Drops everything queued, ends the line the client is in the middle
    /// of, if any, queues `farewell` as the last line, and closes: the
    /// reader stops and the writer finishes once `farewell` is out.
    /// Returns the bytes the queue held.
    fn cut_off(&self, farewell: &[u8]) -> usize {
        let mut state = self.lock();
        let held = state.bytes;
        let mut last = Vec::with_capacity(farewell.len() + 4);
        if state.front_sent > 0
            && let Some(begun) = state.lines.front()
        {
            // The client has the head of this line. It is cut short at a
            // character boundary and ended, so that the farewell is a line
            // of its own, and valid UTF-8 still.
            let unsent = &begun.bytes[state.front_sent..];
            let rest_of_char = unsent.iter().take_while(|&&b| b & 0xC0 == 0x80).count();
            last.extend_from_slice(&unsent[..rest_of_char]);
            last.push(b'\n');
        }
        last.extend_from_slice(farewell);
        state.lines.clear();
        state.front_sent = 0;
        state.stale.clear();
        state.resync_requested.clear();
        self.uncount(&mut state, held);
        self.count(&mut state, last.len());
        state.lines.push_back(Line {
            kind: LineKind::Notice,
            bytes: last.into(),
        });
        state.closed = true;
        let socket = state.direct.take();
        drop(state);
        if let Some(socket) = socket {
            // The reader may be waiting for a request that never comes:
            // ending the socket's reading side wakes it to an end of file.
            let socket: &UnixStream = socket.as_ref().as_ref();
            let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Read);
        }
        self.ready.notify_one();
        self.room.notify_waiters();
        held
    }

    #[cfg(test)]
    fn queued_kinds(&self) -> Vec<LineKind> {
        self.lock().lines.iter().map(|l| l.kind.clone()).collect()
    }

    /// As if the writer had sent everything queued.
    #[cfg(test)]
    fn pretend_sent(&self) {
        let mut state = self.lock();
        state.lines.clear();
        state.front_sent = 0;
        let held = state.bytes;
        self.uncount(&mut state, held);
    }
}

impl Drop for OutboundQueue {
    fn drop(&mut self) {
        // A writer cut short by the flush deadline leaves bytes behind.
        let held = self
            .state
            .get_mut()
            .map_or_else(|poisoned| poisoned.into_inner().bytes, |state| state.bytes);
        self.budget.total.fetch_sub(held, Ordering::Relaxed);
        lock(&self.budget.queues).remove(&self.conn);
    }
}

impl Outlet for Arc<OutboundQueue> {
    fn deliver(&self, line: Line) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        // The first line may be half on the wire; it is never touched.
        let begun = state.front_sent > 0;
        match &line.kind {
            LineKind::Reply => {
                state.in_flight = state.in_flight.saturating_sub(1);
                if state.in_flight == 0 {
                    state.unbounded_in_flight = false;
                }
                self.room.notify_waiters();
            }
            LineKind::Diff(topic) if state.stale.contains(topic) => return,
            LineKind::State(topic) => {
                state.stale.remove(topic);
                state.resync_requested.remove(topic);
            }
            LineKind::Role(phx_ref) => {
                let mut freed = 0;
                let mut keep = begun;
                state.lines.retain(|queued| {
                    let superseded = !std::mem::take(&mut keep)
                        && matches!(&queued.kind, LineKind::Role(r) if r == phx_ref);
                    if superseded {
                        freed += queued.bytes.len();
                    }
                    !superseded
                });
                self.uncount(&mut state, freed);
            }
            _ => {}
        }
        if state.lines.is_empty() {
            // Nothing queued: the line can go now, ahead of nobody.
            let sent = match &state.direct {
                // Never blocks: a full socket answers WouldBlock. Errors
                // are left for the writer, which meets them on its next
                // write and ends the connection.
                Some(socket) => socket.as_ref().try_write(&line.bytes).unwrap_or(0),
                None => 0,
            };
            if sent == line.bytes.len() {
                return;
            }
            state.front_sent = sent;
            self.count(&mut state, line.bytes.len() - sent);
        } else {
            self.count(&mut state, line.bytes.len());
        }
        state.lines.push_back(line);
        if state.bytes > self.max_bytes {
            let mut dropped = BTreeSet::new();
            let mut freed = 0;
            let mut keep = state.front_sent > 0;
            state.lines.retain(|queued| match &queued.kind {
                _ if std::mem::take(&mut keep) => true,
                LineKind::Diff(topic) => {
                    dropped.insert(topic.clone());
                    freed += queued.bytes.len();
                    false
                }
                _ => true,
            });
            self.uncount(&mut state, freed);
            if !dropped.is_empty() {
                tracing::debug!(
                    topics = dropped.len(),
                    "slow reader: dropped diffs, will resync"
                );
            }
            state.stale.extend(dropped);
        }
        drop(state);
        self.ready.notify_one();
        if self.budget.is_spent() {
            self.budget.enforce();
        }
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.direct = None;
        drop(state);
        self.ready.notify_one();
        self.room.notify_waiters();
    }

    fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(kind: LineKind, size: usize) -> Line {
        let mut bytes = vec![b'x'; size];
        if let Some(last) = bytes.last_mut() {
            *last = b'\n';
        }
        Line {
            kind,
            bytes: bytes.into(),
        }
    }

    /// A queue with no socket, under a budget nothing reaches.
    fn queue(max_bytes: usize) -> Arc<OutboundQueue> {
        OutboundQueue::new(1, max_bytes, None, &OutboundBudget::new(usize::MAX))
    }

    /// Whether `admit` is still waiting shortly after it starts.
    async fn waits(admit: impl std::future::Future<Output = bool>) -> bool {
        tokio::time::timeout(Duration::from_millis(20), admit)
            .await
            .is_err()
    }

    /// A queue whose socket's far end is returned: it reads nothing until
    /// the test reads it.
    fn connected(
        conn: ConnId,
        max_bytes: usize,
        budget: &Arc<OutboundBudget>,
    ) -> (Arc<OutboundQueue>, Arc<OwnedWriteHalf>, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let (_read, write) = ours.into_split();
        let write = Arc::new(write);
        let queue = OutboundQueue::new(conn, max_bytes, Some(Arc::clone(&write)), budget);
        (queue, write, theirs)
    }

    #[tokio::test]
    async fn a_slow_reader_loses_diffs_and_gets_one_resync() {
        let queue = queue(100);
        queue.deliver(line(LineKind::Reply, 10));
        queue.deliver(line(LineKind::Diff("t".into()), 60));
        queue.deliver(line(LineKind::Diff("t".into()), 60));
        // Over the bound: the diffs go, the reply stays.
        assert_eq!(queue.queued_kinds(), vec![LineKind::Reply]);
        // Later diffs for the stale topic are not queued.
        queue.deliver(line(LineKind::Diff("t".into()), 5));
        assert_eq!(queue.queued_kinds(), vec![LineKind::Reply]);

        queue.pretend_sent();
        assert!(matches!(queue.next().await, Next::Resync(topics) if topics == ["t"]));
        queue.deliver(line(LineKind::State("t".into()), 50));
        queue.deliver(line(LineKind::Diff("t".into()), 5));
        assert_eq!(
            queue.queued_kinds(),
            vec![LineKind::State("t".into()), LineKind::Diff("t".into())]
        );
    }

    #[tokio::test]
    async fn role_events_coalesce_to_the_latest_per_entry() {
        let queue = queue(1000);
        queue.deliver(line(LineKind::Role("p1".into()), 10));
        queue.deliver(line(LineKind::Role("p2".into()), 10));
        queue.deliver(line(LineKind::Role("p1".into()), 11));
        assert_eq!(
            queue.queued_kinds(),
            vec![LineKind::Role("p2".into()), LineKind::Role("p1".into())]
        );
        assert_eq!(queue.queued_bytes(), 21);
    }

    #[tokio::test]
    async fn small_requests_wait_while_too_many_replies_are_outstanding() {
        let queue = queue(1000);
        for _ in 0..MAX_IN_FLIGHT {
            assert!(queue.admit_request(ReplySize::Small).await);
        }
        assert!(
            waits(queue.admit_request(ReplySize::Small)).await,
            "a request past the cap must wait"
        );
        queue.deliver(line(LineKind::Reply, 10));
        assert!(queue.admit_request(ReplySize::Small).await);
    }

    #[tokio::test]
    async fn an_unbounded_reply_is_the_only_one_past_the_bound() {
        let queue = queue(100);
        assert!(queue.admit_request(ReplySize::Small).await);
        // Not before the reply owed ahead of it is counted...
        assert!(waits(queue.admit_request(ReplySize::Unbounded)).await);
        queue.deliver(line(LineKind::Reply, 10));
        assert!(queue.admit_request(ReplySize::Unbounded).await);
        // ...and nothing after it until its own reply is.
        assert!(waits(queue.admit_request(ReplySize::Small)).await);
        assert!(waits(queue.admit_request(ReplySize::Unbounded)).await);
        queue.deliver(line(LineKind::Reply, 5000));
        // Whole, though far past the bound; the next waits for room.
        assert_eq!(queue.queued_bytes(), 5010);
        assert!(waits(queue.admit_request(ReplySize::Small)).await);
        queue.pretend_sent();
        assert!(queue.admit_request(ReplySize::Unbounded).await);
    }

    #[tokio::test]
    async fn bytes_count_until_the_socket_takes_them() {
        let budget = OutboundBudget::new(usize::MAX);
        let (queue, socket, client) = connected(1, 100, &budget);
        // Far more than the socket buffers: most of it waits.
        let big = line(LineKind::Reply, 4 << 20);
        queue.deliver(big.clone());
        let held = queue.queued_bytes();
        assert!(held > 0 && held < big.bytes.len(), "{held} bytes held");
        assert_eq!(budget.total.load(Ordering::Relaxed), held);
        assert!(waits(queue.admit_request(ReplySize::Small)).await);

        // The client reads; the writer's part sends the rest.
        let stream: &UnixStream = socket.as_ref().as_ref();
        let mut received = Vec::new();
        while received.len() < big.bytes.len() {
            stream.writable().await.expect("writable");
            queue.write_to(stream).expect("write");
            let mut chunk = vec![0; 1 << 20];
            client.readable().await.expect("readable");
            match client.try_read(&mut chunk) {
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(received, &big.bytes[..], "sent whole, in order");
        assert_eq!(queue.queued_bytes(), 0);
        assert_eq!(budget.total.load(Ordering::Relaxed), 0);
        assert!(queue.admit_request(ReplySize::Small).await);
    }

    #[tokio::test]
    async fn past_the_budget_the_largest_holder_is_cut_off_and_told_why() {
        let budget = OutboundBudget::new(6 << 20);
        let (small, _small_socket, _small_client) = connected(1, 100, &budget);
        let (large, large_socket, mut large_client) = connected(2, 100, &budget);
        // Two-byte characters: the line may be cut inside one.
        let text = "é".repeat(2 << 20);
        let reply = |text: &str| Line {
            kind: LineKind::Reply,
            bytes: format!("{{\"id\":1,\"ok\":true,\"text\":\"{text}\"}}\n")
                .into_bytes()
                .into(),
        };
        large.deliver(reply(&text));
        small.deliver(reply(&text[..1 << 20]));
        assert!(!budget.is_spent());
        assert!(large.queued_bytes() > small.queued_bytes());
        // One more line for the smaller one tips the total over.
        small.deliver(reply(&text[..2 << 20]));
        assert!(!budget.is_spent());
        assert!(small.queued_bytes() > 0, "the smaller one keeps its lines");
        assert!(!small.lock().closed, "the smaller one stays open");
        assert!(large.lock().closed, "the largest holder is closed");
        assert!(!large.admit_request(ReplySize::Small).await);

        // Its client reads the head it had, ended at a character boundary,
        // then one line saying why, then the end.
        let socket: &UnixStream = large_socket.as_ref().as_ref();
        let mut received = Vec::new();
        loop {
            socket.writable().await.expect("writable");
            large.write_to(socket).expect("write");
            if matches!(large.next().await, Next::Finished) {
                break;
            }
            let mut chunk = vec![0; 1 << 20];
            large_client.readable().await.expect("readable");
            if let Ok(n) = large_client.try_read(&mut chunk) {
                received.extend_from_slice(&chunk[..n]);
            }
        }
        let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Write);
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut large_client, &mut rest)
            .await
            .expect("read");
        received.extend_from_slice(&rest);
        let text = String::from_utf8(received).expect("valid UTF-8 throughout");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "a line cut short, then the farewell");
        assert!(serde_json::from_str::<Value>(lines[0]).is_err());
        let farewell: Value = serde_json::from_str(lines[1]).expect("JSON");
        assert_eq!(farewell["id"], Value::Null);
        assert_eq!(farewell["error"]["code"], "limit_exceeded");
        assert!(
            farewell["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("--max-outbound-total")),
            "{farewell}"
        );
        assert_eq!(large.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn a_closed_queue_drains_then_finishes() {
        let queue = queue(1000);
        queue.deliver(line(LineKind::Reply, 10));
        queue.close();
        assert!(matches!(queue.next().await, Next::Write));
        assert!(!queue.admit_request(ReplySize::Small).await);
        queue.pretend_sent();
        assert!(matches!(queue.next().await, Next::Finished));
    }

    #[test]
    fn a_line_cut_mid_character_is_ended_after_it() {
        let queue = queue(100);
        let text = "{\"text\":\"é€\"}\n";
        queue.deliver(Line {
            kind: LineKind::Reply,
            bytes: text.as_bytes().into(),
        });
        {
            // The client has been sent the line up to the middle of `€`.
            let mut state = queue.lock();
            let sent = text.find('€').expect("€") + 1;
            state.front_sent = sent;
            queue.uncount(&mut state, sent);
        }
        queue.cut_off(b"bye\n");
        let state = queue.lock();
        assert_eq!(state.lines.len(), 1);
        assert_eq!(&state.lines[0].bytes[..], b"\x82\xac\nbye\n");
        assert_eq!(state.bytes, 7);
    }

    #[test]
    fn a_dropped_queue_gives_back_what_it_held() {
        let budget = OutboundBudget::new(usize::MAX);
        let queue = OutboundQueue::new(7, 100, None, &budget);
        queue.deliver(line(LineKind::Reply, 500));
        assert_eq!(budget.total.load(Ordering::Relaxed), 500);
        drop(queue);
        assert_eq!(budget.total.load(Ordering::Relaxed), 0);
        assert!(lock(&budget.queues).is_empty());
    }
}
