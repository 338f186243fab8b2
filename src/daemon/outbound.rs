//! A connection's outbound queue: the core pushes lines without ever
//! blocking, the connection's writer task drains them to the socket.
//!
//! Every byte queued for a connection counts against its bound: replies,
//! events, and the unwritten rest of a line half on the wire. A reader
//! that falls behind loses its queued `presence_diff` lines, never
//! anything else: the topics they were for are marked, later diffs for
//! them are not queued, and once the queue drains the writer asks the core
//! for one fresh `presence_state` per marked topic. The marks are names
//! of topics the connection subscribes to, so at most
//! `--max-subscriptions` of them, except on a connection subscribed to
//! every topic: there, past that many the names give way to one mark for
//! every topic, and the writer asks for a state per topic once the budget
//! would admit a `list` ([`OutboundBudget::take_large_slot`]), holding
//! its large slot until they are all queued. `role` events are
//! coalesced to the latest per entry. Replies are never dropped. Instead
//! the reader admits a request only while the queue is within its bound
//! (see [`OutboundQueue::admit_request`]). A request whose reply may be as
//! large as what the daemon holds is admitted only while few others are
//! in flight: a list or history alone, once every earlier reply is
//! queued; a subscription, a `get_by_key` or a `resume` with at most
//! [`MAX_LARGE_PER_CONNECTION`] of its kind, each counted until its reply
//! and the state that follows are queued. So, however many requests it
//! pipelines, a connection holds at most its bound plus what was in
//! flight when it last went past it: up to [`MAX_IN_FLIGHT`] replies, no
//! more than four of them large (subscriptions with their states,
//! `get_by_key`s, `resume`s), or else one list or history alone. Each is
//! sent whole.
//!
//! All the queues together answer to one daemon-wide budget
//! ([`OutboundBudget`]). What takes the total past it is rarely a client
//! that does not read: the core builds every reply of a batch before any
//! writer runs, so twenty clients asking for a large list at once all hold
//! almost a whole reply for a moment, and read it a moment later. So the
//! budget acts twice, and neither time on whoever merely holds the most:
//! - while it is spent, and while [`MAX_LARGE_IN_FLIGHT`] requests whose
//!   reply may be large are with the core, another such request waits
//!   before it reaches the core, so the daemon never builds large replies
//!   much faster than its clients take them;
//! - a timer, not the core, looks at it while it is spent, and cuts off
//!   only connections whose client has taken next to nothing for
//!   [`STALL`], the largest first: what they were owed is dropped, they
//!   are sent one line saying why, and closed. Dropping lines from a
//!   connection that stays open would leave it with a wrong picture;
//!   closing it tells it so. A client that reads is never cut off,
//!   however much it was sent at once.
//!
//! The connections are weighed one by one, not summed per user: what
//! marks a connection for closing is that it does not read, and every
//! connection of a user who holds the budget by not reading is stalled,
//! so it goes whoever else shares its uid.
//!
//! When nothing is queued, `deliver` writes the line to the socket itself,
//! without blocking, on whichever thread runs the core: the usual reply
//! then reaches its client without waking the writer task, a thread hop
//! that costs more than the write. Whatever the socket does not take at once is queued for
//! the writer, in order. Every write to the socket, the writer's too, is
//! made under the queue's lock, so the queue always knows exactly how much
//! of its first line the client has been sent; each such write is at most
//! [`WRITE_CHUNK`], so that the core, delivering to a queue whose client
//! reads a large reply as fast as the socket goes, waits for one chunk, not
//! for the whole reply.
//!
//! Every such write is a non-blocking send on the connection's [`Socket`],
//! which the io driver watches for reading only: a client reading what it
//! was sent wakes nobody. The writer has the socket watched for room only
//! while the queue holds what the socket would not take
//! ([`Sent::Full`]), and lets the watch go once the queue is drained.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Notify;

use super::driver::Outlet;
use super::lock;
use super::socket::Socket;
use crate::core::registry::ConnId;
use crate::core::{Line, LineKind};
pub use crate::ops::ReplySize;
use crate::protocol::{ErrorBody, ErrorCode, OutgoingReply};

/// Requests with small replies a connection may have waiting for their
/// replies. Enough for a client to pipeline; small enough that replies it
/// never reads stay few.
pub const MAX_IN_FLIGHT: usize = 32;

/// Requests whose reply may be of any size that the whole daemon has
/// passed to the core and not yet seen answered. The core holds every
/// reply of a batch before it hands any of them over, so this bounds what
/// a burst of such requests, from however many connections, costs beyond
/// what the queues hold; the core works through one batch at a time, so
/// more would not answer them sooner.
pub const MAX_LARGE_IN_FLIGHT: usize = 4;

/// Requests of [`ReplySize::Large`] one connection may have in flight at
/// once. A run of them is then answered a few to a batch and commit, not
/// each in one of its own: 200 pipelined `track`s with `subscribe` take
/// about 60 commits instead of 200, and 500 of them about half the time.
/// A connection that never reads holds this many such replies past its
/// bound at most, where one at a time it held one.
pub const MAX_LARGE_PER_CONNECTION: usize = 4;

/// How long a connection's client may take next to nothing
/// ([`PROGRESS_BYTES`]) of what is queued for it before, while the budget
/// is spent, it may be cut off. Long enough that a client whose event loop
/// is busy for a moment, or starved of a CPU, is not taken for one that
/// does not read.
pub const STALL: Duration = Duration::from_secs(2);

/// What a client must take within [`STALL`] to count as reading: a client
/// that trickles a few bytes at a time holds what it was sent as surely
/// as one that reads nothing.
const PROGRESS_BYTES: usize = 64 * 1024;

/// How often the budget is looked at while it is spent.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The most written to a socket under its queue's lock at once.
pub const WRITE_CHUNK: usize = 256 * 1024;

impl ReplySize {
    fn holds_large_slot(&self) -> bool {
        !matches!(self, ReplySize::Small | ReplySize::InTurn)
    }
}

/// A request passed to the core and not yet fully answered.
struct InFlight {
    size: ReplySize,
    /// Its reply is queued, and was a success; the `presence_state` that
    /// follows it is not yet.
    replied: bool,
}

/// What every connection's queue holds together, against the daemon-wide
/// budget (`--max-outbound-total`).
pub struct OutboundBudget {
    max_bytes: usize,
    total: AtomicUsize,
    /// Requests of unbounded reply passed to the core and not answered
    /// yet, at most [`MAX_LARGE_IN_FLIGHT`].
    large_in_flight: AtomicUsize,
    /// Every live queue, to find the ones to cut off. A queue removes
    /// itself when it is dropped.
    queues: Mutex<HashMap<ConnId, Weak<OutboundQueue>>>,
    /// Wakes [`OutboundBudget::cut_off_stalled_holders`] when the total
    /// goes past the budget.
    spent: Notify,
    /// Wakes requests of unbounded reply waiting on the budget: the total
    /// is back within it, or one such request was answered.
    room: Notify,
}

impl OutboundBudget {
    pub fn new(max_bytes: usize) -> Arc<OutboundBudget> {
        Arc::new(OutboundBudget {
            max_bytes,
            total: AtomicUsize::new(0),
            large_in_flight: AtomicUsize::new(0),
            queues: Mutex::new(HashMap::new()),
            spent: Notify::new(),
            room: Notify::new(),
        })
    }

    fn is_spent(&self) -> bool {
        self.total.load(Ordering::Relaxed) > self.max_bytes
    }

    fn add(&self, bytes: usize) {
        let before = self.total.fetch_add(bytes, Ordering::Relaxed);
        if before <= self.max_bytes && before + bytes > self.max_bytes {
            self.spent.notify_one();
        }
    }

    fn remove(&self, bytes: usize) {
        let before = self.total.fetch_sub(bytes, Ordering::Relaxed);
        if before > self.max_bytes && before - bytes <= self.max_bytes {
            self.room.notify_waiters();
        }
    }

    /// Counts one more request of unbounded reply on its way to the core,
    /// if the budget has room for it: it is not spent, and fewer than
    /// [`MAX_LARGE_IN_FLIGHT`] such requests are.
    fn take_large_slot(&self) -> bool {
        !self.is_spent()
            && self
                .large_in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < MAX_LARGE_IN_FLIGHT).then_some(n + 1)
                })
                .is_ok()
    }

    fn give_back_large_slot(&self) {
        self.large_in_flight.fetch_sub(1, Ordering::Relaxed);
        self.room.notify_waiters();
    }

    /// Runs for the daemon's lifetime: whenever the total is past the
    /// budget, cuts off stalled connections (see
    /// [`OutboundBudget::cut_off_stalled`]), looking again every
    /// [`CHECK_EVERY`] until it is back within it. A timer, and not the
    /// line that took the total past the budget, decides: at that moment
    /// every queue may just have been handed a whole reply its client is
    /// about to read.
    pub async fn cut_off_stalled_holders(self: Arc<Self>) {
        loop {
            let spent = self.spent.notified();
            if !self.is_spent() {
                spent.await;
                continue;
            }
            self.cut_off_stalled(Instant::now());
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }

    /// Cuts off connections whose client has taken next to nothing for
    /// [`STALL`] by `now`, those holding the most first, until the total
    /// is back within the budget. Returns how many it cut off. The scan
    /// visits every queue, but only runs while the budget is spent.
    fn cut_off_stalled(&self, now: Instant) -> usize {
        let queues: Vec<Arc<OutboundQueue>> = lock(&self.queues)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        let mut stalled: Vec<(usize, Arc<OutboundQueue>)> = queues
            .into_iter()
            .filter_map(|queue| Some((queue.stalled_holding(now)?, queue)))
            .collect();
        stalled.sort_unstable_by_key(|(held, _)| std::cmp::Reverse(*held));
        let mut cut = 0;
        for (held, queue) in &stalled {
            let total = self.total.load(Ordering::Relaxed);
            if total <= self.max_bytes {
                break;
            }
            let farewell = OutgoingReply::failure(
                Value::Null,
                ErrorBody::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the daemon holds {total} bytes its clients have not read, more than its \
                         budget of {} (--max-outbound-total); this connection held {held} of \
                         them and took next to none in {} s, the most of any connection not \
                         reading, so it is closed: read what you ask for",
                        self.max_bytes,
                        STALL.as_secs()
                    ),
                ),
            );
            let freed = queue.cut_off(&farewell.to_line());
            cut += 1;
            tracing::warn!(
                conn = queue.conn,
                held = freed,
                total,
                budget = self.max_bytes,
                "outbound budget spent: closed the stalled connection holding the most"
            );
        }
        // A queue dropped with `stalled` takes the `queues` lock, which
        // nothing here holds any more.
        cut
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

struct State {
    lines: VecDeque<Line>,
    /// How much of the first line the client has been sent. A line begun
    /// is never dropped or replaced: its head is on the wire.
    front_sent: usize,
    /// Bytes queued and not yet sent, counted in the budget's total too.
    bytes: usize,
    /// When the client last showed it reads: the queue went from empty to
    /// holding something, or the socket took [`PROGRESS_BYTES`] since the
    /// time before.
    progress_at: Instant,
    /// Bytes the socket took since `progress_at`.
    taken_since_progress: usize,
    /// The requests passed to the core and not yet answered, in order.
    /// Each but the small ones holds one of the budget's large slots.
    in_flight: VecDeque<InFlight>,
    closed: bool,
    /// Cut off for the budget: all it holds is the line saying so.
    cut_off: bool,
    /// Topics whose diffs were dropped; waiting for a fresh state.
    stale: BTreeSet<String>,
    /// Stale topics the writer has already asked the core to resync.
    resync_requested: BTreeSet<String>,
    /// The most names `stale` holds: past it, they give way to
    /// `resync_all`.
    max_stale: usize,
    /// Diffs were dropped for more topics than `max_stale`: every topic
    /// waits for a fresh state, and no diff is queued until they come.
    resync_all: bool,
    /// The writer has asked the core for that resync, holding one of the
    /// budget's large slots until [`LineKind::ResyncedAll`] comes.
    resync_all_requested: bool,
    /// The socket, shared with the reader and the writer, for writing
    /// directly when nothing is queued; let go when the queue closes.
    direct: Option<Arc<Socket>>,
}

impl State {
    fn new(direct: Option<Arc<Socket>>) -> State {
        State {
            lines: VecDeque::new(),
            front_sent: 0,
            bytes: 0,
            progress_at: Instant::now(),
            taken_since_progress: 0,
            in_flight: VecDeque::new(),
            closed: false,
            cut_off: false,
            stale: BTreeSet::new(),
            resync_requested: BTreeSet::new(),
            max_stale: usize::MAX,
            resync_all: false,
            resync_all_requested: false,
            direct,
        }
    }

    /// Notes that the socket took `bytes`.
    fn taken(&mut self, bytes: usize) {
        self.taken_since_progress += bytes;
        if self.taken_since_progress >= PROGRESS_BYTES {
            self.progress_at = Instant::now();
            self.taken_since_progress = 0;
        }
    }
}

/// How far a [`OutboundQueue::write_to`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Everything queued is sent.
    Drained,
    /// A chunk was sent and more waits: write again, after letting the
    /// core at the lock.
    Chunk,
    /// The socket would take no more: wait for room.
    Full,
}

/// What the writer should do next.
pub enum Next {
    /// Lines wait: write them once the socket takes more
    /// ([`OutboundQueue::write_to`]).
    Write,
    /// The queue is drained; ask the core for fresh states for these topics.
    Resync(Vec<String>),
    /// The queue is drained; ask the core for a fresh state for every
    /// topic the connection subscribes to. A large slot is taken for it.
    ResyncAll,
    /// Closed and drained: finish.
    Finished,
}

impl OutboundQueue {
    /// The queue of connection `conn`, bounded at `max_bytes` and counted
    /// in `budget`, for the socket `direct`, which its writer shares;
    /// without one, every line goes through the writer.
    pub fn new(
        conn: ConnId,
        max_bytes: usize,
        direct: Option<Arc<Socket>>,
        budget: &Arc<OutboundBudget>,
    ) -> Arc<OutboundQueue> {
        let queue = Arc::new(OutboundQueue {
            conn,
            state: Mutex::new(State::new(direct)),
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

    /// Keeps at most `max_names` stale topic names (`--max-subscriptions`):
    /// past that, a connection subscribed to every topic is resynced whole.
    pub fn limit_stale(&self, max_names: usize) {
        self.lock().max_stale = max_names;
    }

    fn count(&self, state: &mut State, bytes: usize) {
        if state.bytes == 0 {
            // The client cannot have been slow to read what was not there.
            state.progress_at = Instant::now();
            state.taken_since_progress = 0;
        }
        state.bytes += bytes;
        self.budget.add(bytes);
    }

    fn uncount(&self, state: &mut State, bytes: usize) {
        let was_over = state.bytes > self.max_bytes;
        state.bytes -= bytes;
        self.budget.remove(bytes);
        if was_over && state.bytes <= self.max_bytes {
            self.room.notify_waiters();
        }
    }

    /// Waits for the next thing the writer should do.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.ready.notified();
            let budget_room = self.budget.room.notified();
            // Whether it waits on the budget too, for a resync of every topic.
            let waiting_on_budget = {
                let mut state = self.lock();
                if !state.lines.is_empty() {
                    return Next::Write;
                }
                if state.closed {
                    return Next::Finished;
                }
                if state.resync_all {
                    // Through the same gate as a `list`: a state per topic
                    // may be as large as what the daemon holds.
                    if state.resync_all_requested {
                        false
                    } else if self.budget.take_large_slot() {
                        state.resync_all_requested = true;
                        return Next::ResyncAll;
                    } else {
                        true
                    }
                } else {
                    let unrequested: Vec<String> = state
                        .stale
                        .difference(&state.resync_requested)
                        .cloned()
                        .collect();
                    if !unrequested.is_empty() {
                        state.resync_requested.extend(unrequested.iter().cloned());
                        return Next::Resync(unrequested);
                    }
                    false
                }
            };
            if waiting_on_budget {
                tokio::select! {
                    () = notified => {}
                    () = budget_room => {}
                }
            } else {
                notified.await;
            }
        }
    }

    /// Writes queued lines to `socket` for as long as it takes them
    /// without blocking, [`WRITE_CHUNK`] at most: the lock is held for
    /// the write, and the core may be waiting for it. Says whether the
    /// queue is drained, or the chunk was sent, or the socket would take
    /// no more: only then need the writer wait for room. An error means
    /// the socket is done for.
    pub fn write_to(&self, socket: &Socket) -> std::io::Result<Sent> {
        let mut state = self.lock();
        let mut allowance = WRITE_CHUNK;
        while allowance > 0 {
            let Some(front) = state.lines.front() else {
                return Ok(Sent::Drained);
            };
            let line_len = front.bytes.len();
            let end = line_len.min(state.front_sent.saturating_add(allowance));
            let sent = match socket.send(&front.bytes[state.front_sent..end]) {
                Ok(0) => return Ok(Sent::Full),
                Ok(sent) => sent,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Sent::Full),
                Err(e) => return Err(e),
            };
            allowance -= sent;
            state.front_sent += sent;
            if state.front_sent == line_len {
                state.lines.pop_front();
                state.front_sent = 0;
            }
            state.taken(sent);
            self.uncount(&mut state, sent);
        }
        Ok(if state.lines.is_empty() {
            Sent::Drained
        } else {
            Sent::Chunk
        })
    }

    /// Waits until the connection may send the core a request whose reply
    /// is of `size`, then counts it as in flight. The queue must be
    /// within its bound, and no request of unbounded reply still in
    /// flight; a small request also waits while [`MAX_IN_FLIGHT`] others
    /// do, and an unbounded one until every earlier reply is queued, so
    /// that the bound it is checked against counts them all, and until the
    /// daemon-wide budget has room for it
    /// ([`OutboundBudget::take_large_slot`]). `false` when the queue has
    /// closed: read no more.
    pub async fn admit_request(&self, size: &ReplySize) -> bool {
        loop {
            // Both made before looking, so that no wake-up is missed.
            let queue_room = self.room.notified();
            let budget_room = self.budget.room.notified();
            let waiting_on_budget = {
                let mut state = self.lock();
                if state.closed {
                    return false;
                }
                let in_flight = &state.in_flight;
                let bulk_in_flight = in_flight.iter().any(|r| r.size == ReplySize::Bulk);
                let large_in_flight = || {
                    in_flight
                        .iter()
                        .filter(|r| matches!(r.size, ReplySize::Large { .. }))
                        .count()
                };
                let queue_has_room = state.bytes <= self.max_bytes
                    && !bulk_in_flight
                    && match *size {
                        ReplySize::Small => in_flight.len() < MAX_IN_FLIGHT,
                        ReplySize::Large { .. } => {
                            in_flight.len() < MAX_IN_FLIGHT
                                && large_in_flight() < MAX_LARGE_PER_CONNECTION
                        }
                        ReplySize::Bulk | ReplySize::InTurn => in_flight.is_empty(),
                    };
                let admitted =
                    queue_has_room && (!size.holds_large_slot() || self.budget.take_large_slot());
                if admitted {
                    state.in_flight.push_back(InFlight {
                        size: size.clone(),
                        replied: false,
                    });
                    return true;
                }
                queue_has_room
            };
            if waiting_on_budget {
                // This queue's own conditions can only get better while it
                // waits; its room is still watched, as a close wakes it.
                tokio::select! {
                    () = queue_room => {}
                    () = budget_room => {}
                }
            } else {
                queue_room.await;
            }
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
        state.resync_all = false;
        self.uncount(&mut state, held);
        self.count(&mut state, last.len());
        state.lines.push_back(Line {
            kind: LineKind::Notice,
            bytes: last.into(),
        });
        state.closed = true;
        state.cut_off = true;
        let socket = state.direct.take();
        drop(state);
        if let Some(socket) = socket {
            // The reader may be waiting for a request that never comes:
            // ending the socket's reading side wakes it to an end of file.
            let _ = socket.shutdown(rustix::net::Shutdown::Read);
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
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.budget.remove(state.bytes);
        if state.resync_all_requested {
            // The core will not be delivering the end of that resync.
            self.budget.give_back_large_slot();
        }
        for request in state.in_flight.drain(..) {
            if request.size.holds_large_slot() {
                // Its reply will never come: the core is done with it.
                self.budget.give_back_large_slot();
            }
        }
        lock(&self.budget.queues).remove(&self.conn);
    }
}

impl Outlet for Arc<OutboundQueue> {
    fn deliver(&self, line: Line) {
        let mut state = self.lock();
        // Counted even for a closed queue: the request is answered, and
        // the large slot it held is free for another.
        self.answered(&mut state, &line);
        if line.kind == LineKind::ResyncedAll {
            if std::mem::take(&mut state.resync_all_requested) {
                state.resync_all = false;
                self.budget.give_back_large_slot();
            }
            // Not for the client: nothing to queue.
            return;
        }
        if state.closed {
            return;
        }
        // The first line may be half on the wire; it is never touched.
        let begun = state.front_sent > 0;
        match &line.kind {
            LineKind::Diff(topic) if state.resync_all || state.stale.contains(topic) => return,
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
            let first_chunk = &line.bytes[..line.bytes.len().min(WRITE_CHUNK)];
            let sent = match &state.direct {
                // Never blocks: a full socket answers WouldBlock. Errors
                // are left for the writer, which meets them on its next
                // write and ends the connection.
                Some(socket) => socket.send(first_chunk).unwrap_or(0),
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
            if !state.resync_all {
                state.stale.extend(dropped);
            }
            if state.stale.len() > state.max_stale {
                // A connection subscribed to every topic, in practice (the
                // others have at most this many subscriptions): one mark
                // stands for them all.
                tracing::debug!(
                    topics = state.stale.len(),
                    "slow reader: too many stale topics, will resync every topic"
                );
                state.stale = BTreeSet::new();
                state.resync_requested = BTreeSet::new();
                state.resync_all = true;
            }
        }
        drop(state);
        self.ready.notify_one();
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

impl OutboundQueue {
    /// Notes what `line` answers of the requests in flight: a reply
    /// answers the first not yet replied to, unless a `presence_state` is
    /// to follow it; that state answers it then. The core sends a
    /// request's reply before the events it causes, and the state right
    /// after: counting the request as answered at its reply would let the
    /// reader admit the next one, within the bound, while the core is
    /// still serializing a state that takes the queue far past it.
    fn answered(&self, state: &mut State, line: &Line) {
        let mut answered = Vec::new();
        match &line.kind {
            LineKind::Reply { succeeded } => {
                // A state still awaited when the next reply comes is not
                // coming: its request is answered all the same.
                while state.in_flight.front().is_some_and(|r| r.replied) {
                    answered.extend(state.in_flight.pop_front());
                }
                let Some(request) = state.in_flight.front_mut() else {
                    return;
                };
                if matches!(&request.size, ReplySize::Large { state_of: Some(_) }) && *succeeded {
                    request.replied = true;
                } else {
                    answered.extend(state.in_flight.pop_front());
                }
            }
            LineKind::State(topic) => {
                if let Some(InFlight {
                    size:
                        ReplySize::Large {
                            state_of: Some(awaited),
                        },
                    replied: true,
                }) = state.in_flight.front()
                    && awaited == topic
                {
                    answered.extend(state.in_flight.pop_front());
                }
            }
            _ => {}
        }
        if answered.is_empty() {
            return;
        }
        for request in answered {
            if request.size.holds_large_slot() {
                self.budget.give_back_large_slot();
            }
        }
        self.room.notify_waiters();
    }

    /// What the queue holds, if its client has taken next to nothing of it
    /// for [`STALL`] by `now`: a connection that may be cut off for the
    /// budget. One its client has closed counts too: its writer may try
    /// to flush for seconds yet, and a client that hangs up without
    /// reading must not hold the budget meanwhile.
    fn stalled_holding(&self, now: Instant) -> Option<usize> {
        let state = self.lock();
        let stalled = state.bytes > 0
            && !state.cut_off
            && now.saturating_duration_since(state.progress_at) >= STALL;
        stalled.then_some(state.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::net::UnixStream;

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
    ) -> (Arc<OutboundQueue>, Arc<Socket>, UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        theirs.set_nonblocking(true).expect("non-blocking");
        let theirs = UnixStream::from_std(theirs).expect("tokio");
        let socket = Arc::new(Socket::new(ours.into()).expect("registered"));
        let queue = OutboundQueue::new(conn, max_bytes, Some(Arc::clone(&socket)), budget);
        (queue, socket, theirs)
    }

    #[tokio::test]
    async fn a_slow_reader_of_every_topic_keeps_few_names_and_is_resynced_whole() {
        let budget = OutboundBudget::new(usize::MAX);
        let queue = OutboundQueue::new(1, 100, None, &budget);
        queue.limit_stale(3);
        queue.deliver(line(LineKind::Reply { succeeded: true }, 10));
        for n in 0..1000 {
            queue.deliver(line(LineKind::Diff(format!("t{n}")), 60));
            let state = queue.lock();
            assert!(state.stale.len() <= 3, "{} stale names", state.stale.len());
            assert!(state.resync_requested.len() <= 3);
        }
        assert!(queue.lock().resync_all);
        assert_eq!(
            queue.queued_kinds(),
            vec![LineKind::Reply { succeeded: true }]
        );

        // The resync waits, like a list, while the daemon's large slots
        // are all taken.
        queue.pretend_sent();
        for _ in 0..MAX_LARGE_IN_FLIGHT {
            assert!(budget.take_large_slot());
        }
        let next = tokio::time::timeout(Duration::from_millis(20), queue.next()).await;
        assert!(next.is_err(), "the resync waits for a large slot");
        budget.give_back_large_slot();
        assert!(matches!(queue.next().await, Next::ResyncAll));
        assert_eq!(
            budget.large_in_flight.load(Ordering::Relaxed),
            MAX_LARGE_IN_FLIGHT
        );
        for _ in 1..MAX_LARGE_IN_FLIGHT {
            budget.give_back_large_slot();
        }

        // Until its states are all delivered, no diff is queued, and the
        // writer asks for nothing more.
        queue.deliver(line(LineKind::Diff("t1".into()), 5));
        assert!(queue.queued_kinds().is_empty());
        let next = tokio::time::timeout(Duration::from_millis(20), queue.next()).await;
        assert!(next.is_err(), "one resync at a time");
        queue.deliver(line(LineKind::State("t0".into()), 5));
        queue.deliver(line(LineKind::State("t1".into()), 5));
        queue.deliver(Line {
            kind: LineKind::ResyncedAll,
            bytes: Arc::from(&[][..]),
        });
        assert_eq!(budget.large_in_flight.load(Ordering::Relaxed), 0);
        queue.deliver(line(LineKind::Diff("t1".into()), 5));
        assert_eq!(
            queue.queued_kinds(),
            vec![
                LineKind::State("t0".into()),
                LineKind::State("t1".into()),
                LineKind::Diff("t1".into())
            ]
        );
        queue.pretend_sent();
        let next = tokio::time::timeout(Duration::from_millis(20), queue.next()).await;
        assert!(next.is_err(), "nothing left to resync");
    }

    #[tokio::test]
    async fn a_slow_reader_loses_diffs_and_gets_one_resync() {
        let queue = queue(100);
        queue.deliver(line(LineKind::Reply { succeeded: true }, 10));
        queue.deliver(line(LineKind::Diff("t".into()), 60));
        queue.deliver(line(LineKind::Diff("t".into()), 60));
        // Over the bound: the diffs go, the reply stays.
        assert_eq!(
            queue.queued_kinds(),
            vec![LineKind::Reply { succeeded: true }]
        );
        // Later diffs for the stale topic are not queued.
        queue.deliver(line(LineKind::Diff("t".into()), 5));
        assert_eq!(
            queue.queued_kinds(),
            vec![LineKind::Reply { succeeded: true }]
        );

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
            assert!(queue.admit_request(&ReplySize::Small).await);
        }
        assert!(
            waits(queue.admit_request(&ReplySize::Small)).await,
            "a request past the cap must wait"
        );
        queue.deliver(line(LineKind::Reply { succeeded: true }, 10));
        assert!(queue.admit_request(&ReplySize::Small).await);
    }

    #[tokio::test]
    async fn a_bulk_reply_is_the_only_one_past_the_bound() {
        let queue = queue(100);
        assert!(queue.admit_request(&ReplySize::Small).await);
        // Not before the reply owed ahead of it is counted...
        assert!(waits(queue.admit_request(&ReplySize::Bulk)).await);
        queue.deliver(line(LineKind::Reply { succeeded: true }, 10));
        assert!(queue.admit_request(&ReplySize::Bulk).await);
        // ...and nothing after it until its own reply is.
        assert!(waits(queue.admit_request(&ReplySize::Small)).await);
        assert!(waits(queue.admit_request(&ReplySize::Bulk)).await);
        queue.deliver(line(LineKind::Reply { succeeded: true }, 5000));
        // Whole, though far past the bound; the next waits for room.
        assert_eq!(queue.queued_bytes(), 5010);
        assert!(waits(queue.admit_request(&ReplySize::Small)).await);
        queue.pretend_sent();
        assert!(queue.admit_request(&ReplySize::Bulk).await);
    }

    fn subscription(topic: &str) -> ReplySize {
        ReplySize::Large {
            state_of: Some(topic.to_owned()),
        }
    }

    fn reply(outcome: Result<(), ()>) -> Line {
        let reply = match outcome {
            Ok(()) => OutgoingReply::success(json!("a"), &json!({})),
            Err(()) => OutgoingReply::failure(
                json!("a"),
                ErrorBody::new(ErrorCode::LimitExceeded, "too many"),
            ),
        };
        Line {
            kind: LineKind::Reply {
                succeeded: outcome.is_ok(),
            },
            bytes: reply.to_line().into(),
        }
    }

    #[tokio::test]
    async fn a_few_subscriptions_are_in_flight_at_once_each_until_its_state_is_queued() {
        let queue = queue(100);
        assert!(queue.admit_request(&ReplySize::Small).await);
        // Subscriptions need not wait for the replies before them.
        for n in 0..MAX_LARGE_PER_CONNECTION {
            assert!(queue.admit_request(&subscription(&format!("t{n}"))).await);
        }
        assert!(waits(queue.admit_request(&subscription("u"))).await);
        assert!(waits(queue.admit_request(&ReplySize::Bulk)).await);
        // The small request is answered, then the first subscription; but
        // its state is still to come, and may be as large as the topic: it
        // still counts.
        queue.deliver(reply(Ok(())));
        queue.deliver(reply(Ok(())));
        assert!(waits(queue.admit_request(&subscription("u"))).await);
        queue.deliver(line(LineKind::State("t0".into()), 5000));
        // Its state is queued: a large request may go if the queue is
        // within its bound, and it is not.
        assert!(waits(queue.admit_request(&subscription("u"))).await);
        queue.pretend_sent();
        assert!(queue.admit_request(&subscription("u")).await);
        // A refused subscription brings no state: its reply answers it.
        queue.deliver(reply(Err(())));
        assert!(queue.admit_request(&subscription("v")).await);
    }

    #[test]
    fn a_state_that_never_follows_its_reply_holds_nothing_back() {
        let budget = OutboundBudget::new(usize::MAX);
        let queue = OutboundQueue::new(1, 100, None, &budget);
        let admit = |size: ReplySize| {
            let mut state = queue.lock();
            assert!(budget.take_large_slot());
            state.in_flight.push_back(InFlight {
                size,
                replied: false,
            });
        };
        admit(subscription("t"));
        admit(ReplySize::Large { state_of: None });
        queue.deliver(reply(Ok(())));
        assert_eq!(budget.large_in_flight.load(Ordering::Relaxed), 2);
        queue.deliver(reply(Ok(())));
        assert!(queue.lock().in_flight.is_empty());
        assert_eq!(budget.large_in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn bytes_count_until_the_socket_takes_them() {
        let budget = OutboundBudget::new(usize::MAX);
        let (queue, socket, client) = connected(1, 100, &budget);
        // Watched for room from the start, as a writer that waits is.
        let room = socket.arm_for_writing().expect("armed");
        // Far more than the socket buffers: most of it waits.
        let big = line(LineKind::Reply { succeeded: true }, 4 << 20);
        queue.deliver(big.clone());
        let held = queue.queued_bytes();
        assert!(held > 0 && held < big.bytes.len(), "{held} bytes held");
        assert_eq!(budget.total.load(Ordering::Relaxed), held);
        assert!(waits(queue.admit_request(&ReplySize::Small)).await);

        // The client reads; the writer's part sends the rest.
        let stream: &Socket = &socket;
        let mut received = Vec::new();
        // Waits for room only once the socket would take no more, as the
        // writer does.
        let mut full = false;
        while received.len() < big.bytes.len() {
            if full {
                room.writable().await.expect("writable");
            }
            full = queue.write_to(stream).expect("write") == Sent::Full;
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
        assert!(queue.admit_request(&ReplySize::Small).await);
    }

    #[tokio::test]
    async fn past_the_budget_the_largest_stalled_holder_is_cut_off_and_told_why() {
        let budget = OutboundBudget::new(6 << 20);
        let (small, _small_socket, _small_client) = connected(1, 100, &budget);
        let (large, large_socket, mut large_client) = connected(2, 100, &budget);
        let room = large_socket.arm_for_writing().expect("armed");
        // Two-byte characters: the line may be cut inside one.
        let text = "é".repeat(2 << 20);
        let reply = |text: &str| Line {
            kind: LineKind::Reply { succeeded: true },
            bytes: format!("{{\"id\":1,\"ok\":true,\"text\":\"{text}\"}}\n")
                .into_bytes()
                .into(),
        };
        large.deliver(reply(&text));
        small.deliver(reply(&text[..1 << 20]));
        assert!(!budget.is_spent());
        assert!(large.queued_bytes() > small.queued_bytes());
        // One more line for the smaller one tips the total over; but both
        // were just sent what they hold, and nobody is cut off for that.
        small.deliver(reply(&text[..2 << 20]));
        assert!(budget.is_spent());
        assert_eq!(budget.cut_off_stalled(Instant::now()), 0);
        assert!(!large.lock().closed);
        // Neither reads for a while: the largest goes, and that is enough.
        assert_eq!(budget.cut_off_stalled(Instant::now() + STALL), 1);
        assert!(!budget.is_spent());
        assert!(small.queued_bytes() > 0, "the smaller one keeps its lines");
        assert!(!small.lock().closed, "the smaller one stays open");
        assert!(large.lock().closed, "the largest holder is closed");
        assert!(!large.admit_request(&ReplySize::Small).await);

        // Its client reads the head it had, ended at a character boundary,
        // then one line saying why, then the end.
        let socket: &Socket = &large_socket;
        let mut received = Vec::new();
        // Waits for room only once the socket would take no more, as the
        // writer does.
        let mut full = false;
        loop {
            if full {
                room.writable().await.expect("writable");
            }
            full = large.write_to(socket).expect("write") == Sent::Full;
            if matches!(large.next().await, Next::Finished) {
                break;
            }
            let mut chunk = vec![0; 1 << 20];
            large_client.readable().await.expect("readable");
            if let Ok(n) = large_client.try_read(&mut chunk) {
                received.extend_from_slice(&chunk[..n]);
            }
        }
        let _ = socket.shutdown(rustix::net::Shutdown::Write);
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

    /// Pretends the client of `queue` last read `ago`.
    fn last_read(queue: &OutboundQueue, ago: Duration) {
        let mut state = queue.lock();
        state.progress_at = Instant::now()
            .checked_sub(ago)
            .expect("the clock has run that long");
    }

    #[tokio::test]
    async fn a_client_that_reads_is_never_cut_off_however_much_it_holds() {
        let budget = OutboundBudget::new(1 << 20);
        let (reading, socket, client) = connected(1, 100, &budget);
        let room = socket.arm_for_writing().expect("armed");
        let (idle, _idle_socket, _idle_client) = connected(2, 100, &budget);
        let trickling = OutboundQueue::new(3, 100, None, &budget);
        reading.deliver(line(LineKind::Reply { succeeded: true }, 4 << 20));
        idle.deliver(line(LineKind::Reply { succeeded: true }, 1 << 20));
        trickling.deliver(line(LineKind::Reply { succeeded: true }, 1 << 20));
        for queue in [&reading, &idle, &trickling] {
            last_read(queue, STALL);
        }
        // One client reads a good part of its reply; another takes a
        // little, as if to look alive.
        let stream: &Socket = &socket;
        let before = reading.queued_bytes();
        // Waits for room only once the socket would take no more, as the
        // writer does.
        let mut full = false;
        while before - reading.queued_bytes() < 2 * PROGRESS_BYTES {
            if full {
                room.writable().await.expect("writable");
            }
            full = reading.write_to(stream).expect("write") == Sent::Full;
            let mut chunk = vec![0; 1 << 20];
            client.readable().await.expect("readable");
            match client.try_read(&mut chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        trickling.lock().taken(PROGRESS_BYTES - 1);
        assert!(reading.queued_bytes() > idle.queued_bytes());

        // The one that reads holds the most, and the budget is still spent
        // once the others are gone; it stays all the same.
        assert_eq!(budget.cut_off_stalled(Instant::now()), 2);
        assert!(idle.lock().closed && trickling.lock().closed);
        assert!(budget.is_spent());
        assert!(!reading.lock().closed);
        // Until it stops reading too.
        assert_eq!(budget.cut_off_stalled(Instant::now() + STALL), 1);
        assert!(reading.lock().closed);
    }

    #[test]
    fn a_client_that_hangs_up_without_reading_is_cut_off_but_only_once() {
        // A budget even the farewell line is past.
        let budget = OutboundBudget::new(100);
        let queue = OutboundQueue::new(1, 100, None, &budget);
        queue.deliver(line(LineKind::Reply { succeeded: true }, 5000));
        // The client has gone; its writer would try to flush for a while.
        queue.close();
        last_read(&queue, STALL);
        assert_eq!(budget.cut_off_stalled(Instant::now()), 1);
        let farewell = queue.queued_kinds();
        assert_eq!(farewell, vec![LineKind::Notice]);
        // All it holds is the line saying why, which is never replaced.
        assert!(budget.is_spent());
        assert_eq!(budget.cut_off_stalled(Instant::now() + STALL), 0);
        assert_eq!(queue.queued_kinds(), farewell);
    }

    #[tokio::test]
    async fn requests_with_large_replies_wait_while_the_budget_is_spent_or_busy() {
        let budget = OutboundBudget::new(1000);
        let queues: Vec<_> = (0..=MAX_LARGE_IN_FLIGHT as ConnId)
            .map(|conn| OutboundQueue::new(conn, 100, None, &budget))
            .collect();
        let (last, first) = queues.split_last().expect("queues");

        // The core builds a few large replies at a time, for anyone.
        for queue in first {
            assert!(queue.admit_request(&ReplySize::Bulk).await);
        }
        assert!(waits(last.admit_request(&ReplySize::Bulk)).await);
        first[0].deliver(line(LineKind::Reply { succeeded: true }, 2000));
        // One is answered, but its reply spends the budget: the next waits
        // for the client to read it; a small request does not.
        assert!(budget.is_spent());
        assert!(waits(last.admit_request(&ReplySize::Bulk)).await);
        assert!(last.admit_request(&ReplySize::Small).await);
        last.deliver(line(LineKind::Reply { succeeded: true }, 10));
        first[0].pretend_sent();
        assert!(last.admit_request(&ReplySize::Bulk).await);

        // A connection that closes before its reply comes gives its slot
        // back.
        let newcomer = OutboundQueue::new(99, 100, None, &budget);
        assert!(waits(newcomer.admit_request(&ReplySize::Bulk)).await);
        let mut queues = queues.into_iter();
        drop(queues.nth(1).expect("a queue in flight"));
        assert!(newcomer.admit_request(&ReplySize::Bulk).await);
    }

    #[tokio::test]
    async fn a_write_under_the_queues_lock_stops_at_a_chunk() {
        // A socket that takes more than a chunk at a time, and a client
        // that reads as fast as it goes.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        ours.set_nonblocking(true).expect("non-blocking");
        rustix::net::sockopt::set_socket_send_buffer_size(&ours, 1 << 20).expect("SO_SNDBUF");
        let buffer = rustix::net::sockopt::socket_send_buffer_size(&ours).expect("SO_SNDBUF");
        assert!(buffer > WRITE_CHUNK, "a send buffer of {buffer} bytes");
        let reader = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut theirs, &mut all).expect("read");
            all.len()
        });
        let write = Arc::new(Socket::new(ours.into()).expect("registered"));
        let room = write.arm_for_writing().expect("armed");
        let budget = OutboundBudget::new(usize::MAX);
        let queue = OutboundQueue::new(1, 100, Some(Arc::clone(&write)), &budget);

        let big = line(LineKind::Reply { succeeded: true }, 8 << 20);
        queue.deliver(big.clone());
        let mut held = queue.queued_bytes();
        assert!(
            big.bytes.len() - held <= WRITE_CHUNK,
            "the core wrote {}",
            big.bytes.len() - held
        );
        let socket: &Socket = &write;
        // Waits for room only once the socket would take no more, as the
        // writer does.
        let mut full = false;
        while held > 0 {
            if full {
                room.writable().await.expect("writable");
            }
            full = queue.write_to(socket).expect("write") == Sent::Full;
            let now = queue.queued_bytes();
            assert!(
                held - now <= WRITE_CHUNK,
                "one write under the lock sent {}",
                held - now
            );
            held = now;
        }
        drop(queue);
        drop(write);
        drop(room);
        assert_eq!(reader.join().expect("reader"), big.bytes.len());
    }

    #[tokio::test]
    async fn a_closed_queue_drains_then_finishes() {
        let queue = queue(1000);
        queue.deliver(line(LineKind::Reply { succeeded: true }, 10));
        queue.close();
        assert!(matches!(queue.next().await, Next::Write));
        assert!(!queue.admit_request(&ReplySize::Small).await);
        queue.pretend_sent();
        assert!(matches!(queue.next().await, Next::Finished));
    }

    #[test]
    fn a_line_cut_mid_character_is_ended_after_it() {
        let queue = queue(100);
        let text = "{\"text\":\"é€\"}\n";
        queue.deliver(Line {
            kind: LineKind::Reply { succeeded: true },
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
        queue.deliver(line(LineKind::Reply { succeeded: true }, 500));
        assert_eq!(budget.total.load(Ordering::Relaxed), 500);
        drop(queue);
        assert_eq!(budget.total.load(Ordering::Relaxed), 0);
        assert!(lock(&budget.queues).is_empty());
    }
}
