//! A connection's outbound queue: the core pushes lines without ever
//! blocking, the connection's writer task drains them to the socket.
//!
//! The queue is bounded in bytes. A reader that falls behind loses its
//! queued `presence_diff` lines, never anything else: the topics they were
//! for are marked, later diffs for them are not queued, and once the queue
//! drains the writer asks the core for one fresh `presence_state` per
//! marked topic. `role` events are coalesced to the latest per entry.
//! Replies are never dropped; the reader stops taking requests while the
//! queue is over its bound, so replies cannot pile up either.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::core::{Line, LineKind, Outlet};

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
    bytes: usize,
    closed: bool,
    /// Topics whose diffs were dropped; waiting for a fresh state.
    stale: BTreeSet<String>,
    /// Stale topics the writer has already asked the core to resync.
    resync_requested: BTreeSet<String>,
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
    pub fn new(max_bytes: usize) -> Arc<OutboundQueue> {
        Arc::new(OutboundQueue {
            state: Mutex::new(State::default()),
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
                    let lines: Vec<Line> = state.lines.drain(..).collect();
                    state.bytes = 0;
                    self.room.notify_waiters();
                    return Next::Write(lines);
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

    /// Waits until the queue is under its bound, so that a client that does
    /// not read cannot make the daemon hold an unbounded pile of replies.
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            {
                let state = self.lock();
                if state.bytes <= self.max_bytes || state.closed {
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
            LineKind::Diff(topic) if state.stale.contains(topic) => return,
            LineKind::State(topic) => {
                state.stale.remove(topic);
                state.resync_requested.remove(topic);
            }
            LineKind::Role(phx_ref) => {
                let before = state.lines.len();
                state
                    .lines
                    .retain(|queued| !matches!(&queued.kind, LineKind::Role(r) if r == phx_ref));
                if state.lines.len() != before {
                    state.bytes = state.lines.iter().map(|l| l.bytes.len()).sum();
                }
            }
            _ => {}
        }
        state.bytes += line.bytes.len();
        state.lines.push_back(line);
        if state.bytes > self.max_bytes {
            let mut dropped = BTreeSet::new();
            state.lines.retain(|queued| match &queued.kind {
                LineKind::Diff(topic) => {
                    dropped.insert(topic.clone());
                    false
                }
                _ => true,
            });
            state.bytes = state.lines.iter().map(|l| l.bytes.len()).sum();
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
        self.lock().closed = true;
        self.ready.notify_one();
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
        let queue = OutboundQueue::new(100);
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
        let queue = OutboundQueue::new(1000);
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
    async fn a_closed_queue_drains_then_finishes() {
        let queue = OutboundQueue::new(1000);
        queue.deliver(line(LineKind::Reply, 10));
        queue.close();
        assert!(matches!(queue.next().await, Next::Write(_)));
        assert!(matches!(queue.next().await, Next::Finished));
    }
}
