//! The serializer lane: one low-priority thread that makes the lines of
//! large reads ([`ReadView::to_line`]) so that the thread running the core
//! does not. Two clients looping a 6 MB `list` then take this thread's
//! time, not every other client's.
//!
//! Order per connection holds exactly. A connection with work in the lane
//! is *routed* through it: every later line for it (a diff, a reply, its
//! close) goes into the lane's one FIFO behind that work instead of
//! straight to its outlet, until the lane has caught up. The driver
//! counts what it put in the lane for each connection; the lane counts it
//! down once delivered, so a connection with nothing in the lane is served
//! directly, with no hop.
//!
//! The lane needs no bound of its own: a large read is admitted only with
//! one of the outbound budget's large slots (`daemon/outbound.rs`), given
//! back when its reply reaches the queue, so the lane holds at most as
//! many large reads as there are slots. Views share the registry's
//! entries; a view held in the lane costs a copy of its topic's map of
//! pointers only if the topic changes meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::thread::JoinHandle;

use super::driver::Outlet;
use crate::core::Line;
use crate::core::read::ReadView;

/// Reads made from at most this many entries are serialized at once on
/// the thread running the core: a `presence_state` of an editor's topic, a
/// `get_by_key`. Making such a line takes a few microseconds, less than
/// waking another thread and waiting for it, and an editor that subscribes
/// to each buffer it opens must not wait a thread hop for each.
pub const SERIALIZED_AT_ONCE_UP_TO: usize = 64;

/// The lane's `nice`: below every other thread of the daemon, so that a
/// large read is made with time nobody else wants.
const LANE_NICENESS: i32 = 10;

/// One connection's outlet, with how much of its work is in the lane.
#[derive(Clone)]
pub struct Route {
    outlet: Arc<dyn Outlet>,
    in_lane: Arc<AtomicUsize>,
}

impl Route {
    pub fn new(outlet: Arc<dyn Outlet>) -> Route {
        Route {
            outlet,
            in_lane: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn outlet(&self) -> &dyn Outlet {
        &*self.outlet
    }

    /// Whether the lane still holds work for this connection: then what
    /// follows must go through the lane too.
    fn routed_through_lane(&self) -> bool {
        // Pairs with the lane's `Release` once it delivered: seeing 0, the
        // driver sees every line the lane delivered before.
        self.in_lane.load(Ordering::Acquire) > 0
    }
}

enum Work {
    Serialize(ReadView),
    Deliver(Line),
    Close,
}

struct Job {
    route: Route,
    work: Work,
}

/// The lane's thread, and the way into it.
pub struct SerializerLane {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl SerializerLane {
    pub fn start() -> SerializerLane {
        let (jobs, taken) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("presenced-serializer".to_owned())
            .spawn(move || {
                // On Linux a priority set for "this process" by the thread
                // itself is the thread's own.
                if let Err(e) = rustix::process::setpriority_process(None, LANE_NICENESS) {
                    tracing::debug!("the serializer lane keeps its priority: {e}");
                }
                for Job { route, work } in taken {
                    do_here(&route, work);
                    route.in_lane.fetch_sub(1, Ordering::Release);
                }
            });
        match thread {
            Ok(thread) => SerializerLane {
                jobs: Some(jobs),
                thread: Some(thread),
            },
            Err(e) => {
                tracing::warn!("no serializer lane, reads are made where the core runs: {e}");
                SerializerLane {
                    jobs: None,
                    thread: None,
                }
            }
        }
    }

    /// Sends a read: made at once if small and nothing is ahead of it in
    /// the lane, else made by the lane.
    pub fn send_view(&self, route: &Route, view: ReadView) {
        if view.entry_count() <= SERIALIZED_AT_ONCE_UP_TO && !route.routed_through_lane() {
            route.outlet.deliver(view.to_line());
        } else {
            self.through_lane(route, Work::Serialize(view));
        }
    }

    /// Sends a line, behind the connection's work in the lane if it has
    /// any.
    pub fn send_line(&self, route: &Route, line: Line) {
        if route.routed_through_lane() {
            self.through_lane(route, Work::Deliver(line));
        } else {
            route.outlet.deliver(line);
        }
    }

    /// Closes the connection once what it was sent is delivered.
    pub fn close(&self, route: &Route) {
        if route.routed_through_lane() {
            self.through_lane(route, Work::Close);
        } else {
            route.outlet.close();
        }
    }

    fn through_lane(&self, route: &Route, work: Work) {
        let Some(jobs) = &self.jobs else {
            return do_here(route, work);
        };
        route.in_lane.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            route: route.clone(),
            work,
        };
        if let Err(returned) = jobs.send(job) {
            // The lane is gone (it panicked): nothing is left ahead of
            // this, so it is done here.
            let Job { route, work } = returned.0;
            route.in_lane.fetch_sub(1, Ordering::Relaxed);
            do_here(&route, work);
        }
    }
}

fn do_here(route: &Route, work: Work) {
    match work {
        Work::Serialize(view) => route.outlet.deliver(view.to_line()),
        Work::Deliver(line) => route.outlet.deliver(line),
        Work::Close => route.outlet.close(),
    }
}

impl Drop for SerializerLane {
    /// Waits for the lane to deliver what it holds: the lines of a
    /// shutdown go out, and the connections close, in order.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the serializer lane panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::{Value, json};

    use super::*;
    use crate::core::registry::Registry;
    use crate::core::tests::harness::stored_entry;
    use crate::protocol::{Lifetime, Limits};

    /// Records each line it is given, with the thread that gave it.
    #[derive(Default)]
    struct Recording(Mutex<Vec<(Option<String>, Value)>>);

    impl Recording {
        fn take(&self, value: Value) {
            let thread = std::thread::current().name().map(str::to_owned);
            self.0.lock().unwrap().push((thread, value));
        }

        fn seen(&self) -> Vec<(Option<String>, Value)> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Outlet for Recording {
        fn deliver(&self, line: Line) {
            self.take(serde_json::from_slice(&line.bytes).unwrap());
        }

        fn close(&self) {
            self.take(json!("closed"));
        }

        fn queued_bytes(&self) -> usize {
            0
        }
    }

    /// A `list` of a topic holding `entries` entries.
    fn list_of(entries: u64) -> ReadView {
        let restored = (1..=entries)
            .map(|seq| stored_entry(&format!("k{seq}"), seq, Lifetime::Process))
            .collect();
        let registry = Registry::restore(Limits::default(), restored, entries + 1);
        ReadView::ListTopic {
            id: json!("list"),
            topic: "doc".into(),
            view: registry.view("doc"),
        }
    }

    fn ping_reply() -> Line {
        Line {
            kind: crate::core::LineKind::Reply { succeeded: true },
            bytes: Arc::from(&b"{\"id\":\"ping\",\"ok\":true}\n"[..]),
        }
    }

    #[test]
    fn a_line_after_a_large_read_waits_for_it_in_the_lane() {
        let recording = Arc::new(Recording::default());
        let route = Route::new(recording.clone());
        let lane = SerializerLane::start();
        let large = list_of(SERIALIZED_AT_ONCE_UP_TO as u64 + 1);

        lane.send_view(&route, large);
        lane.send_line(&route, ping_reply());
        lane.close(&route);
        drop(lane);

        let seen = recording.seen();
        let ids: Vec<&Value> = seen.iter().map(|(_, value)| value).collect();
        assert_eq!(ids.len(), 3, "{seen:?}");
        assert_eq!(ids[0]["id"], "list", "the read first: {seen:?}");
        assert_eq!(ids[1]["id"], "ping", "then what followed it: {seen:?}");
        assert_eq!(ids[2], "closed");
        let lane_thread = Some("presenced-serializer".to_owned());
        assert_eq!(seen[0].0, lane_thread, "made off the calling thread");
        assert_eq!(route.in_lane.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_small_read_is_made_at_once_and_what_follows_goes_direct() {
        let recording = Arc::new(Recording::default());
        let route = Route::new(recording.clone());
        let lane = SerializerLane::start();

        lane.send_view(&route, list_of(SERIALIZED_AT_ONCE_UP_TO as u64));
        lane.send_line(&route, ping_reply());

        let seen = recording.seen();
        assert_eq!(seen.len(), 2, "both delivered before the calls returned");
        let here = std::thread::current().name().map(str::to_owned);
        assert!(seen.iter().all(|(thread, _)| *thread == here), "{seen:?}");
        assert_eq!(seen[0].1["id"], "list");
    }
}
