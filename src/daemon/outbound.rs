//! A connection's outbound queue: the core pushes lines without ever
//! blocking, the connection's writer task drains them to the socket.
//!
//! The queue is bounded in bytes. A reader that falls behind loses its
//! queued `presence_diff` lines, never anything else: the topics they were
//! for are marked, later diffs for them are not queued, and once the queue
//! drains the writer asks the core for one fresh `presence_state` per
//! marked topic. `role` events are coalesced to the latest per entry.
//! Replies are never dropped. Instead the reader stops taking requests
//! while the queue is over its bound or while [`MAX_IN_FLIGHT`] requests
//! still wait for their reply, so a client that pipelines requests and
//! never reads cannot make the daemon hold more than that.
//!
//! When nothing is queued or being written, `deliver` writes the line to
//! the socket itself, without blocking, from the core's thread: the usual
//! reply then reaches its client without waking the writer task, a thread
//! hop that costs more than the write. Whatever the socket does not take
//! at once is queued for the writer, in order.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::unix::OwnedWriteHalf;

use tokio::sync::Notify;

use crate::core::{Line, LineKind, Outlet};

/// Requests a connection may have waiting for their replies. Enough for a
/// client to pipeline; small enough that replies it never reads stay few.
pub const MAX_IN_FLIGHT: usize = 32;

pub struct OutboundQueue {
    state: Mutex<State>,
    /// Wakes the writer when lines arrive or the queue closes.
    ready: Notify,
    /// Wakes the reader when the queue drains below its bound.
    room: Notify,
    max_bytes: usize,
}

#[derive(Default)]
struct State {
    lines: VecDeque<Line>,
    /// Bytes queued plus bytes taken by the writer and not yet written.
    bytes: usize,
    /// Requests passed to the core whose reply has not been queued yet.
    in_flight: usize,
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
    Write(Vec<Line>),
    /// The queue is drained; ask the core for fresh states for these topics.
    Resync(Vec<String>),
    /// Closed and drained: finish.
    Finished,
}

impl OutboundQueue {
    /// A queue for the socket `direct`, which its writer shares; without
    /// one, every line goes through the writer.
    pub fn new(max_bytes: usize, direct: Option<Arc<OwnedWriteHalf>>) -> Arc<OutboundQueue> {
        Arc::new(OutboundQueue {
            state: Mutex::new(State {
                direct,
                ..State::default()
            }),
            ready: Notify::new(),
            room: Notify::new(),
            max_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for the next thing the writer should do.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.ready.notified();
            {
                let mut state = self.lock();
                if !state.lines.is_empty() {
                    // The bytes stay counted until `written` says they left.
                    return Next::Write(state.lines.drain(..).collect());
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

    /// The writer has written `bytes` of what `next` gave it.
    pub fn written(&self, bytes: usize) {
        let mut state = self.lock();
        state.bytes = state.bytes.saturating_sub(bytes);
        self.room.notify_waiters();
    }

    /// Waits until the connection may send the core another request: the
    /// queue is under its bound and fewer than [`MAX_IN_FLIGHT`] requests
    /// wait for replies. Then counts the request as in flight.
    pub async fn admit_request(&self) {
        loop {
            let notified = self.room.notified();
            {
                let mut state = self.lock();
                let room = state.bytes <= self.max_bytes && state.in_flight < MAX_IN_FLIGHT;
                if room || state.closed {
                    state.in_flight += 1;
                    return;
                }
            }
            notified.await;
        }
    }

    /// Waits until the request last admitted is the only one in flight:
    /// every reply owed before it is queued, so a reply queued now goes
    /// out after them.
    pub async fn wait_for_earlier_replies(&self) {
        loop {
            let notified = self.room.notified();
            {
                let state = self.lock();
                if state.in_flight <= 1 || state.closed {
                    return;
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
        state.bytes = 0;
        self.room.notify_waiters();
    }

    #[cfg(test)]
    fn queued_kinds(&self) -> Vec<LineKind> {
        self.lock().lines.iter().map(|l| l.kind.clone()).collect()
    }
}

impl Outlet for Arc<OutboundQueue> {
    fn deliver(&self, line: Line) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        match &line.kind {
            LineKind::Reply => {
                state.in_flight = state.in_flight.saturating_sub(1);
                self.room.notify_waiters();
            }
            LineKind::Diff(topic) if state.stale.contains(topic) => return,
            LineKind::State(topic) => {
                state.stale.remove(topic);
                state.resync_requested.remove(topic);
            }
            LineKind::Role(phx_ref) => {
                let mut freed = 0;
                state.lines.retain(|queued| {
                    let superseded = matches!(&queued.kind, LineKind::Role(r) if r == phx_ref);
                    if superseded {
                        freed += queued.bytes.len();
                    }
                    !superseded
                });
                state.bytes -= freed;
            }
            _ => {}
        }
        // Nothing queued and nothing in the writer's hands: the line can go
        // now, ahead of nobody. The lock keeps the writer out meanwhile.
        let line = if state.lines.is_empty() && state.bytes == 0 {
            match write_now(&state, &line.bytes) {
                Written::All => return,
                Written::Part(sent) => Line {
                    // Half of it is on the wire: never dropped or replaced.
                    kind: LineKind::Notice,
                    bytes: Arc::from(&line.bytes[sent..]),
                },
                Written::Nothing => line,
            }
        } else {
            line
        };
        state.bytes += line.bytes.len();
        state.lines.push_back(line);
        if state.bytes > self.max_bytes {
            let mut dropped = BTreeSet::new();
            let mut freed = 0;
            state.lines.retain(|queued| match &queued.kind {
                LineKind::Diff(topic) => {
                    dropped.insert(topic.clone());
                    freed += queued.bytes.len();
                    false
                }
                _ => true,
            });
            state.bytes -= freed;
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
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.direct = None;
        drop(state);
        self.ready.notify_one();
    }

    fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// How much of a line [`write_now`] got onto the socket.
enum Written {
    All,
    Part(usize),
    Nothing,
}

/// Writes `bytes` to the socket without blocking, as far as it takes them.
/// Errors are left for the writer, which meets them on its next write and
/// ends the connection.
fn write_now(state: &State, bytes: &[u8]) -> Written {
    let Some(socket) = &state.direct else {
        return Written::Nothing;
    };
    // Never blocks: a full socket answers WouldBlock, and the writer,
    // which waits for room, takes the line instead.
    match socket.as_ref().try_write(bytes) {
        Ok(sent) if sent == bytes.len() => Written::All,
        Ok(sent) if sent > 0 => Written::Part(sent),
        _ => Written::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kind: LineKind, size: usize) -> Line {
        Line {
            kind,
            bytes: vec![b'x'; size].into(),
        }
    }

    #[tokio::test]
    async fn a_slow_reader_loses_diffs_and_gets_one_resync() {
        let queue = OutboundQueue::new(100, None);
        queue.deliver(line(LineKind::Reply, 10));
        queue.deliver(line(LineKind::Diff("t".into()), 60));
        queue.deliver(line(LineKind::Diff("t".into()), 60));
        // Over the bound: the diffs go, the reply stays.
        assert_eq!(queue.queued_kinds(), vec![LineKind::Reply]);
        // Later diffs for the stale topic are not queued.
        queue.deliver(line(LineKind::Diff("t".into()), 5));
        assert_eq!(queue.queued_kinds(), vec![LineKind::Reply]);

        assert!(matches!(queue.next().await, Next::Write(lines) if lines.len() == 1));
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
        let queue = OutboundQueue::new(1000, None);
        queue.deliver(line(LineKind::Role("p1".into()), 10));
        queue.deliver(line(LineKind::Role("p2".into()), 10));
        queue.deliver(line(LineKind::Role("p1".into()), 11));
        let Next::Write(lines) = queue.next().await else {
            panic!("expected lines");
        };
        let kinds: Vec<_> = lines
            .iter()
            .map(|l| (l.kind.clone(), l.bytes.len()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (LineKind::Role("p2".into()), 10),
                (LineKind::Role("p1".into()), 11)
            ]
        );
    }

    #[tokio::test]
    async fn requests_wait_while_too_many_replies_are_outstanding() {
        let queue = OutboundQueue::new(1000, None);
        for _ in 0..MAX_IN_FLIGHT {
            queue.admit_request().await;
        }
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(20), queue.admit_request()).await;
        assert!(blocked.is_err(), "a request past the cap must wait");
        queue.deliver(line(LineKind::Reply, 10));
        queue.admit_request().await;
    }

    #[tokio::test]
    async fn bytes_taken_by_the_writer_count_until_written() {
        let queue = OutboundQueue::new(100, None);
        queue.deliver(line(LineKind::Notice, 150));
        let Next::Write(lines) = queue.next().await else {
            panic!("expected lines");
        };
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), queue.admit_request()).await;
        assert!(waiting.is_err(), "unwritten bytes still count");
        queue.written(lines.iter().map(|l| l.bytes.len()).sum());
        queue.admit_request().await;
    }

    #[tokio::test]
    async fn a_closed_queue_drains_then_finishes() {
        let queue = OutboundQueue::new(1000, None);
        queue.deliver(line(LineKind::Reply, 10));
        queue.close();
        assert!(matches!(queue.next().await, Next::Write(_)));
        assert!(matches!(queue.next().await, Next::Finished));
    }
}
