//! The ops of the protocol, one file each, as mini-redis's `cmd/`: an op's
//! wire request, how it is resolved (what needs the system: a process, a
//! token), how large its reply may be, how the registry answers it, and
//! what becomes of its reply when its batch is rolled back, all in
//! `ops/<op>.rs` behind one trait, [`OpSpec`].
//!
//! The list of ops is written once, in the `ops!` invocation below. From
//! it come the wire enum [`Request`] (its serde tags), [`KNOWN_OPS`], the
//! resolved enum [`Op`] the core answers, and every dispatch over them. So
//! a request is one of two enums: [`Request`] as it came off the wire,
//! [`Op`] once resolved.
//!
//! An op file imports the protocol, the registry and [`System`], never
//! `sys`, the daemon, tokio or the store: what resolution needs of the
//! system is asked through [`System`], which the io layer implements
//! (`daemon/connection/resolver.rs`) and tests fake.

use std::io;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::core::read::ReadView;
use crate::core::registry::{ConnId, Delivery, Outbox, Peer, ProcessId, Registry, WriteId};
use crate::protocol::{ErrorBody, HistoryRequest, Limits, OutgoingReply, ReplyFields};

pub mod get_by_key;
pub mod hello;
pub mod history;
pub mod list;
pub mod ping;
pub mod resume;
pub mod status;
pub mod subscribe;
pub mod track;
pub mod unsubscribe;
pub mod untrack;
pub mod update;

/// One op: its wire fields, its resolution, its reply's size, its answer
/// and its roll-back class.
pub trait OpSpec {
    /// The request's fields as the wire has them; the client builds these.
    type Wire;
    /// The request once what needs the system is resolved: what the core
    /// answers.
    type Resolved;
    /// What becomes of the reply if its batch is rolled back.
    const ON_ROLL_BACK: RollBack;

    /// How large the reply may be, with the events it brings the same
    /// connection, to admit the request before it is read further.
    fn reply_size(_wire: &Self::Wire, _system: &dyn System) -> ReplySize {
        ReplySize::Small
    }

    /// Turns the wire fields into what the core answers, asking the system
    /// for what only it knows. An error is the request's reply.
    fn resolve(wire: Self::Wire, system: &mut dyn System) -> Result<Self::Resolved, ErrorBody>;

    /// Answers the request against the registry, writing the events it
    /// causes (and the rows it changes) to `at.out`.
    fn answer(op: Self::Resolved, at: &mut At<'_>) -> Answer;
}

/// Where an op is answered: the registry, on behalf of a connection, at a
/// time, writing to the batch's outbox.
pub struct At<'a> {
    pub registry: &'a mut Registry,
    pub conn: ConnId,
    /// The request's id, for a reply made later from views.
    pub id: &'a Value,
    pub now: i64,
    pub out: &'a mut Outbox,
}

/// An op's answer.
#[derive(Debug)]
pub enum Answer {
    Reply(Result<ReplyFields, ErrorBody>),
    /// A `status` reply: the core completes it with its counts, and the
    /// driver with what only it knows (queues, the store).
    Status,
    /// A successful reply made from views of the registry, by the driver,
    /// so that a large read costs whoever runs the core nothing but the views.
    Read(ReadView),
    /// The reply waits for etcd (a track, update or untrack of a shared
    /// topic), which this write asks; the batch that applies what etcd
    /// answers makes it.
    Awaits(WriteId),
}

/// What becomes of a reply when its batch's commit fails and the batch is
/// rolled back (docs/protocol.md §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollBack {
    /// It stands as it is: no change touched it (hello, ping).
    Stands,
    /// The request is asked again of the rolled-back registry, in its
    /// place, so that it keeps working while the disk is full and shows
    /// only what is committed (reads, and subscriptions, which are never
    /// saved).
    AskAgain,
    /// It becomes an `internal` error: it was worked out from undone
    /// changes.
    Fails,
}

/// How large a request's reply, with the events it brings its own
/// connection, may be; it decides how the request is admitted
/// (`daemon/outbound.rs` has the rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplySize {
    /// Bounded by the request itself: an acknowledgement, an error, an
    /// entry's standing.
    Small,
    /// As large as what the daemon holds, though usually small: the
    /// entries under a key, a resume, a subscription with its topic's
    /// `presence_state`. Clients send these in runs (an editor tracks each
    /// buffer it opens with `subscribe`), so up to
    /// `MAX_LARGE_PER_CONNECTION` (`daemon/outbound.rs`) may be in flight at once.
    Large {
        /// The topic whose `presence_state` follows the reply when it is
        /// a success: the request is answered once that is queued too.
        state_of: Option<String>,
    },
    /// As large as what the daemon holds, and asked for to see much of
    /// it: a list, history. One at a time, nothing else in flight.
    Bulk,
    /// Bounded by the request, and answered beside the core, not by it: a
    /// history read of a few events. Like [`ReplySize::Bulk`] it waits
    /// for every reply before it to be queued, so that its own keeps its
    /// place; unlike it, it takes none of the daemon's few slots for large
    /// replies, which everyone's reads of thousands of events hold.
    InTurn,
}

/// What resolving a request asks of the system. The io layer implements
/// it per request line (`daemon/connection/resolver.rs`); it also keeps any process
/// watch it opened until the resolved request has reached the core.
pub trait System {
    fn limits(&self) -> &Limits;
    /// Who is on the other end of the connection.
    fn peer(&self) -> &Peer;
    /// The connecting process, as pinned when the connection was accepted.
    fn connector(&self) -> Connector;
    /// Watches the connecting process for an entry to be tied to it (or
    /// holds the watch it has already).
    fn watch_connector(&mut self) -> Result<(), WatchFailure>;
    /// Watches whatever process has `pid` now, pinning it, and returns it.
    fn watch_pid(&mut self, pid: u32) -> Result<ProcessId, WatchFailure>;
    /// The uid of the process [`System::watch_pid`] pinned; `None` once it
    /// has exited (or cannot be read, which comes to the same here).
    fn uid_of_watched(&self, pid: u32) -> Option<u32>;
    /// 32 random bytes, or `None` when the system has none to give.
    fn random_bytes(&mut self) -> Option<[u8; 32]>;
    /// At most how many rows a history read will fetch.
    fn history_rows_at_most(&self, request: &HistoryRequest) -> usize;
    /// The daemon's own pid.
    fn daemon_pid(&self) -> u32;
}

/// The connecting process as it was pinned when the connection was
/// accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connector {
    Running {
        process: ProcessId,
        /// The pid it has in its own pid namespace, which is what it calls
        /// itself; `process.pid` unless it runs in a nested one.
        own_pid: u32,
        /// Whether it runs in a pid namespace below the daemon's (a
        /// container), where a pid names another process than it does here.
        in_nested_pid_namespace: bool,
    },
    /// Gone before it could be pinned.
    Exited,
    /// It could not be pinned, for a reason of its own (logged then).
    Unknown,
}

/// Why a process could not be watched.
#[derive(Debug)]
pub enum WatchFailure {
    /// It is not running.
    NotRunning,
    /// The daemon is out of file descriptors.
    OutOfDescriptors,
    Other(io::Error),
}

/// Writes the list of ops once and derives from it the wire enum, the
/// known names, the resolved enum and their dispatch.
macro_rules! ops {
    ($( $tag:literal => $Variant:ident($spec:ty), )*) => {
        /// A request line: the op with its fields, tagged by `op`. The
        /// envelope's `id` is read separately so that it can be echoed
        /// even when the fields are wrong.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "op")]
        pub enum Request {
            $( #[serde(rename = $tag)] $Variant(<$spec as OpSpec>::Wire), )*
        }

        /// Every op name the daemon knows, to tell `unknown_op` from
        /// `bad_request`.
        pub const KNOWN_OPS: &[&str] = &[$($tag),*];

        /// A request after the io layer has resolved what needs the
        /// system: what the core answers.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Op {
            $( $Variant(<$spec as OpSpec>::Resolved), )*
        }

        impl Request {
            /// The op's name on the wire.
            pub fn name(&self) -> &'static str {
                match self { $( Request::$Variant(_) => $tag, )* }
            }

            pub fn reply_size(&self, system: &dyn System) -> ReplySize {
                match self {
                    $( Request::$Variant(wire) => <$spec as OpSpec>::reply_size(wire, system), )*
                }
            }

            pub fn resolve(self, system: &mut dyn System) -> Result<Op, ErrorBody> {
                match self {
                    $( Request::$Variant(wire) => <$spec as OpSpec>::resolve(wire, system).map(Op::$Variant), )*
                }
            }
        }

        impl Op {
            /// The op's name on the wire.
            pub fn name(&self) -> &'static str {
                match self { $( Op::$Variant(_) => $tag, )* }
            }

            pub fn on_roll_back(&self) -> RollBack {
                match self { $( Op::$Variant(_) => <$spec as OpSpec>::ON_ROLL_BACK, )* }
            }

            fn answer_at(self, at: &mut At<'_>) -> Answer {
                match self {
                    $( Op::$Variant(op) => <$spec as OpSpec>::answer(op, at), )*
                }
            }
        }
    };
}

ops! {
    "hello" => Hello(hello::Hello),
    "track" => Track(track::Track),
    "untrack" => Untrack(untrack::Untrack),
    "update" => Update(update::Update),
    "list" => List(list::List),
    "get_by_key" => GetByKey(get_by_key::GetByKey),
    "subscribe" => Subscribe(subscribe::Subscribe),
    "unsubscribe" => Unsubscribe(unsubscribe::Unsubscribe),
    "resume" => Resume(resume::Resume),
    "status" => Status(status::Status),
    "ping" => Ping(ping::Ping),
    "history" => History(history::History),
}

/// What answering an op leaves to the core.
#[derive(Debug, PartialEq)]
pub enum Answered {
    /// The reply is in the outbox, ahead of the events the op caused.
    Replied,
    /// A `status` request with this id: the core writes its reply.
    Status(Value),
}

/// Answers a resolved request: its reply goes into `out` ahead of the
/// events it caused, so a client learns the outcome of its request before
/// anything that follows from it.
pub fn answer(
    registry: &mut Registry,
    conn: ConnId,
    id: Value,
    op: Op,
    now: i64,
    out: &mut Outbox,
) -> Answered {
    let first_event = out.deliveries.len();
    let mut at = At {
        registry,
        conn,
        id: &id,
        now,
        out,
    };
    let reply = match op.answer_at(&mut at) {
        Answer::Reply(outcome) => Delivery::Reply {
            conn,
            reply: OutgoingReply { id, outcome },
        },
        Answer::Status => return Answered::Status(id),
        Answer::Read(view) => Delivery::View { conn, view },
        Answer::Awaits(write) => Delivery::Awaiting { conn, id, write },
    };
    out.deliveries.insert(first_event, reply);
    Answered::Replied
}

#[cfg(test)]
mod tests;
