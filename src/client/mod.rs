//! The client library: how a Rust program uses a presenced daemon. Typed
//! async calls for every op of the protocol (docs/protocol.md), the
//! events the daemon pushes, starting a daemon when none runs, and a
//! [`Session`] that outlives a daemon restart. The `presence` command
//! talks to the daemon through this module alone.
//!
//! Everything here runs on tokio, and must be called from inside its
//! runtime: each connection reads and writes in tasks of its own.
//!
//! # Connecting
//!
//! A daemon serves one Unix socket, for each user by default
//! [`default_socket`]. [`Client::connect`] connects to the daemon
//! listening there; [`Client::connect_or_start`] first starts one
//! when nobody listens, by running the [`DaemonCommand`] it is given:
//! [`DaemonCommand::installed`] for the `presence` on `PATH`, or one
//! naming another program. Either returns a [`Client`], whose calls may
//! be made from several tasks at once, and the [`Events`] the daemon
//! pushes on that connection. No byte is sent before the daemon is shown
//! to be one the caller may trust (see [`connect_stream`]).
//!
//! # Joining a topic
//!
//! [`Client::track`] joins a topic under a key, usually the name of a
//! person or a tool ([`crate::topic::file_topic`] gives a file's topic,
//! the one the editor plugins use). The first entry on a topic owns it;
//! every later one is a spectator, in line. The reply's
//! [`Standing`](crate::protocol::Standing) says which, and who the owner
//! is. Whenever that changes (the owner leaves, or someone ahead in line
//! does), the entry gets an [`Event::Role`] with its new standing on its
//! events: the daemon works out every standing, and a client only shows
//! it. An entry with
//! [`TrackRequest::new`]'s defaults lasts as long as the connection:
//! dropping the client or exiting leaves the topic, and the next in line
//! is promoted.
//!
//! ```no_run
//! use presenced::client::{Client, ClientError, DaemonCommand};
//! use presenced::protocol::{Event, Role, TrackRequest};
//!
//! # async fn join() -> Result<(), ClientError> {
//! let socket = presenced::client::default_socket();
//! let (client, mut events) =
//!     Client::connect_or_start(&socket, &DaemonCommand::installed()).await?;
//! let joined = client
//!     .track(TrackRequest::new("file:/home/alice/notes.md", "alice"))
//!     .await?;
//! if joined.standing.role == Role::Spectator {
//!     if let Some(owner) = &joined.standing.owner {
//!         println!("read-only: {} has the file", owner.key);
//!     }
//!     // Wait for our turn.
//!     while let Some(event) = events.recv().await {
//!         if let Event::Role { payload, .. } = event {
//!             if payload.standing.role == Role::Owner {
//!                 break;
//!             }
//!         }
//!     }
//! }
//! println!("ours to edit");
//! # Ok(()) }
//! ```
//!
//! The other calls follow the ops: [`Client::update`] changes an entry's
//! meta, [`Client::untrack`] leaves, [`Client::list`] and
//! [`Client::subscribe`] show who is on a topic, [`Client::history`]
//! what happened on it. A refused request is a [`ClientError::Refused`]
//! carrying the daemon's error code and message.
//!
//! # Long-running programs
//!
//! A daemon restart (an upgrade, a crash) closes every connection, and a
//! plain [`Client`] stays closed. A [`Session`] wraps one and gets its
//! connection back by itself: it waits for the daemon to return, resumes
//! its entries in the places they held, tracks again any that expired,
//! and renews its subscriptions. A standing that changed while it was away
//! comes as one [`Event::Role`], whatever the daemon lost meanwhile. Its
//! events are the daemon's, plus what
//! the session did ([`SessionEvent`]). With [`Reconnect::default`] it
//! starts no daemon itself; [`Reconnect::autostart`] names one to start
//! when the old one crashed.
//!
//! ```no_run
//! use presenced::client::{Client, ClientError, Reconnect, Session, SessionEvent};
//! use presenced::protocol::{Event, TrackRequest};
//!
//! # async fn follow() -> Result<(), ClientError> {
//! let socket = presenced::client::default_socket();
//! let connected = Client::connect(&socket).await?;
//! let (session, mut events) = Session::new(&socket, connected, Reconnect::default());
//! session.track(TrackRequest::new("build", "ci-runner")).await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         SessionEvent::Event(Event::Role { payload, .. }) => {
//!             println!("now {:?}", payload.standing.role)
//!         }
//!         SessionEvent::Lost { reason } => return Err(ClientError::Lost(reason)),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! `examples/watch_role.rs` is a whole program: it joins a topic and
//! prints every change of its role until interrupted.

mod autostart;
mod session;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use interprocess::os::unix::uds_local_socket::tokio::Stream;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::paths;
use crate::protocol::{
    Empty, ErrorBody, Event, GetByKeyReply, GetByKeyRequest, HelloReply, HelloRequest,
    HistoryReply, HistoryRequest, ListAllReply, ListRequest, ListTopicReply, Meta, Reply, Request,
    ResumeReply, ResumeRequest, ServerMessage, StatusReply, SubscribeAllReply, SubscriptionRequest,
    TrackReply, TrackRequest, UntrackReply, UntrackRequest, UpdateReply, UpdateRequest,
};

/// Where a user's own daemon listens unless told otherwise.
pub use crate::paths::default_socket;
pub use autostart::{DaemonCommand, start_daemon};
pub use session::{Reconnect, Session, SessionEvent, SessionEvents};

/// Events pushed by the daemon, in the order it sent them. Ends when the
/// connection closes.
pub type Events = mpsc::UnboundedReceiver<Event>;

/// Why a call failed.
#[derive(Debug)]
pub enum ClientError {
    /// No daemon listens on the socket (and none was started), or the
    /// socket could not be reached.
    NoDaemon {
        /// The socket tried.
        socket: std::path::PathBuf,
        /// What connecting to it said: `NotFound` or `ConnectionRefused`
        /// when nobody listens, `PermissionDenied` for another's socket.
        source: std::io::Error,
    },
    /// Nothing vouches for whatever listens at the socket (see
    /// [`connect_stream`]): one line naming the path, its owner and what to
    /// do. Nothing was sent.
    Untrusted(String),
    /// Starting a daemon on demand failed: why, in one line, with the
    /// daemon's own last error when it wrote one.
    Autostart(String),
    /// Reading from or writing to the connection failed.
    Io(std::io::Error),
    /// The daemon refused the request: its error code and message
    /// (docs/protocol.md lists the codes).
    Refused(ErrorBody),
    /// The daemon sent something this client cannot read.
    Protocol(String),
    /// The connection closed before the reply arrived.
    Closed,
    /// A session's daemon went away and did not come back in time.
    Lost(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoDaemon { socket, source } => {
                write!(f, "no daemon at {} ({source})", socket.display())
            }
            ClientError::Untrusted(message) => write!(f, "{message}"),
            ClientError::Autostart(message) => write!(f, "could not start the daemon: {message}"),
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Refused(error) => write!(f, "{}", error.message),
            ClientError::Protocol(message) => {
                write!(f, "unexpected reply from the daemon: {message}")
            }
            ClientError::Closed => write!(f, "the daemon closed the connection"),
            ClientError::Lost(reason) => write!(f, "{reason}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// Requests written and waiting for their replies, in wire order.
#[derive(Default)]
struct Waiting {
    replies: VecDeque<oneshot::Sender<Reply>>,
    /// The daemon's side has closed: no reply will come.
    closed: bool,
}

type Pending = Arc<Mutex<Waiting>>;

/// A request line on its way to the socket, with where its reply goes.
struct Outgoing {
    line: Vec<u8>,
    reply: oneshot::Sender<Reply>,
}

/// A connection to the daemon. Requests may be issued concurrently from
/// several tasks; replies are matched to them in order. Dropping a request
/// future part-way is safe: one task writes every line whole, and a reply
/// nobody awaits any more is discarded.
pub struct Client {
    outgoing: mpsc::UnboundedSender<Outgoing>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Client {
    /// Connects to a running daemon, once it has shown it may be trusted
    /// (see [`connect_stream`]).
    pub async fn connect(socket: &Path) -> Result<(Client, Events), ClientError> {
        Ok(Client::from_stream(connect_stream(socket).await?))
    }

    /// Connects, starting a daemon first by running `daemon` if none is
    /// listening (see [`start_daemon`]). Concurrent callers end up with one
    /// daemon between them.
    pub async fn connect_or_start(
        socket: &Path,
        daemon: &DaemonCommand,
    ) -> Result<(Client, Events), ClientError> {
        Ok(Client::from_stream(
            connect_stream_or_start(socket, daemon).await?,
        ))
    }

    /// A client on a stream that [`connect_stream`] opened. Must be called
    /// inside a tokio runtime: the connection's reading and writing are
    /// tasks spawned on it.
    pub fn from_stream(stream: UnixStream) -> (Client, Events) {
        let (recv, send) = stream.into_split();
        let pending: Pending = Arc::default();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (outgoing, requests) = mpsc::unbounded_channel();
        tokio::spawn(route_incoming(recv, Arc::clone(&pending), events_tx));
        tokio::spawn(write_requests(send, requests, pending));
        let client = Client {
            outgoing,
            next_id: std::sync::atomic::AtomicU64::new(1),
        };
        (client, events)
    }

    /// Sends any request and returns the daemon's reply as it came,
    /// successful or not.
    pub async fn request(&self, request: &Request) -> Result<Reply, ClientError> {
        let mut line = match serde_json::to_value(request) {
            Ok(Value::Object(fields)) => fields,
            _ => return Err(ClientError::Protocol("request is not an object".into())),
        };
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        line.insert("id".into(), Value::from(id));
        let mut line =
            serde_json::to_vec(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');

        let (reply, reply_rx) = oneshot::channel();
        self.outgoing
            .send(Outgoing { line, reply })
            .map_err(|_| ClientError::Closed)?;
        let reply = reply_rx.await.map_err(|_| ClientError::Closed)?;
        // A null id answers a line the daemon could not read, or refuses the
        // whole connection (too many connections); either way, this request.
        if !reply.id.is_null() && reply.id != id {
            return Err(ClientError::Protocol(format!(
                "reply id {} does not match request id {id}",
                reply.id
            )));
        }
        Ok(reply)
    }

    /// Sends a request and decodes a successful reply's fields.
    async fn call<T: DeserializeOwned>(&self, request: Request) -> Result<T, ClientError> {
        let reply = self.request(&request).await?;
        if let Some(error) = reply.error {
            return Err(ClientError::Refused(error));
        }
        serde_json::from_value(Value::Object(reply.fields))
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Checks that the daemon speaks this build's protocol version, giving
    /// this client's name; the reply names the daemon and its pid. Refused
    /// by a daemon that does not speak it.
    pub async fn hello(&self, client: &str) -> Result<HelloReply, ClientError> {
        self.call(Request::Hello(HelloRequest {
            client: Some(client.to_owned()),
            protocol: Some(crate::protocol::PROTOCOL_VERSION),
        }))
        .await
    }

    /// Joins a topic: the reply has the entry's ref, its standing (owner,
    /// or spectator and its place) and the token that resumes it after a
    /// daemon restart. [`TrackRequest::new`] makes a request with the
    /// defaults.
    pub async fn track(&self, request: TrackRequest) -> Result<TrackReply, ClientError> {
        self.call(Request::Track(request)).await
    }

    /// Leaves: removes the entry a ref names, or every entry of a key.
    pub async fn untrack(&self, request: UntrackRequest) -> Result<UntrackReply, ClientError> {
        self.call(Request::Untrack(request)).await
    }

    /// Replaces an entry's meta; it keeps its place, under a new ref.
    pub async fn update(&self, request: UpdateRequest) -> Result<UpdateReply, ClientError> {
        self.call(Request::Update(request)).await
    }

    /// Who is on `topic`, and who owns it.
    pub async fn list(&self, topic: &str) -> Result<ListTopicReply, ClientError> {
        self.call(Request::List(ListRequest {
            topic: Some(topic.to_owned()),
        }))
        .await
    }

    /// Who is on every topic that has anyone on it.
    pub async fn list_all(&self) -> Result<ListAllReply, ClientError> {
        self.call(Request::List(ListRequest { topic: None })).await
    }

    /// The entries `key` has on `topic`.
    pub async fn get_by_key(&self, topic: &str, key: &str) -> Result<Vec<Meta>, ClientError> {
        let reply: GetByKeyReply = self
            .call(Request::GetByKey(GetByKeyRequest {
                topic: topic.to_owned(),
                key: key.to_owned(),
            }))
            .await?;
        Ok(reply.metas)
    }

    /// Subscribes; the topic's `presence_state` arrives on the events
    /// stream right after, then its diffs.
    pub async fn subscribe(&self, topic: &str) -> Result<(), ClientError> {
        self.call::<Empty>(Request::Subscribe(SubscriptionRequest {
            topic: Some(topic.to_owned()),
            all: false,
        }))
        .await
        .map(drop)
    }

    /// Subscribes to every topic: a `presence_state` for each topic with
    /// anyone on it arrives right after, then every topic's diffs. Returns
    /// the topics whose states follow.
    pub async fn subscribe_all(&self) -> Result<Vec<String>, ClientError> {
        self.call::<SubscribeAllReply>(Request::Subscribe(SubscriptionRequest {
            topic: None,
            all: true,
        }))
        .await
        .map(|reply| reply.topics)
    }

    /// Stops following every topic; topics subscribed by name stay.
    pub async fn unsubscribe_all(&self) -> Result<(), ClientError> {
        self.call::<Empty>(Request::Unsubscribe(SubscriptionRequest {
            topic: None,
            all: true,
        }))
        .await
        .map(drop)
    }

    /// Stops following `topic`.
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), ClientError> {
        self.call::<Empty>(Request::Unsubscribe(SubscriptionRequest {
            topic: Some(topic.to_owned()),
            all: false,
        }))
        .await
        .map(drop)
    }

    /// Takes back, on this connection, the entries whose resume tokens
    /// are given, after the daemon restarted or a connection closed: the
    /// reply says which are back (and their standing), which expired and
    /// which were removed meanwhile. A [`Session`] does this by itself.
    pub async fn resume(&self, tokens: Vec<String>) -> Result<ResumeReply, ClientError> {
        self.call(Request::Resume(ResumeRequest { tokens })).await
    }

    /// The latest recorded joins, leaves, updates and owner changes,
    /// oldest first.
    pub async fn history(&self, request: HistoryRequest) -> Result<HistoryReply, ClientError> {
        self.call(Request::History(request)).await
    }

    /// The daemon's version, counts and health, as `presence status`
    /// shows them.
    pub async fn status(&self) -> Result<StatusReply, ClientError> {
        self.call(Request::Status(Empty {})).await
    }

    /// Asks for an empty answer: whether the daemon answers at all.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call::<Empty>(Request::Ping(Empty {})).await.map(drop)
    }
}

impl TrackRequest {
    /// A track with the defaults: empty meta, this process, connection
    /// lifetime, no subscription.
    pub fn new(topic: impl Into<String>, key: impl Into<String>) -> TrackRequest {
        TrackRequest {
            topic: topic.into(),
            key: key.into(),
            meta: serde_json::Map::new(),
            pid: None,
            lifetime: crate::protocol::Lifetime::Connection,
            subscribe: false,
        }
    }
}

/// Opens a stream to the daemon's socket, and hands it over only once
/// the daemon has shown it may be trusted, before a byte is sent: the
/// socket's folder is one only the caller, root or a shared daemon's user
/// could have put a socket in, and the process listening runs as one of
/// them. Every connection, first or again, comes through here.
pub async fn connect_stream(socket: &Path) -> Result<UnixStream, ClientError> {
    let folder_owner = match paths::check_socket_folder(socket) {
        Ok(owner) => owner,
        Err(paths::Distrust::Unreachable(e)) => return Err(no_daemon(socket, e)),
        Err(paths::Distrust::Untrusted(message)) => return Err(ClientError::Untrusted(message)),
    };
    let connect = async {
        let name = socket.to_fs_name::<GenericFilePath>()?;
        std::io::Result::Ok(UnixStream::from(Stream::connect(name).await?))
    };
    let stream = connect.await.map_err(|e| no_daemon(socket, e))?;
    let daemon_uid = stream.peer_cred()?.uid();
    paths::check_daemon_uid(socket, folder_owner, daemon_uid).map_err(ClientError::Untrusted)?;
    Ok(stream)
}

/// Opens a stream to the daemon's socket, starting a daemon first by
/// running `daemon` when nobody listens there. Concurrent callers end up
/// with one daemon.
pub async fn connect_stream_or_start(
    socket: &Path,
    daemon: &DaemonCommand,
) -> Result<UnixStream, ClientError> {
    match connect_stream(socket).await {
        Err(ClientError::NoDaemon { source, .. }) if autostart::worth_starting(&source) => {
            start_daemon(socket, daemon).await?;
            connect_stream(socket).await
        }
        other => other,
    }
}

fn no_daemon(socket: &Path, source: std::io::Error) -> ClientError {
    ClientError::NoDaemon {
        socket: socket.to_owned(),
        source,
    }
}

/// Writes request lines in order, queueing each one's reply slot first.
async fn write_requests(
    mut send: OwnedWriteHalf,
    mut requests: mpsc::UnboundedReceiver<Outgoing>,
    pending: Pending,
) {
    while let Some(Outgoing { line, reply }) = requests.recv().await {
        {
            let mut waiting = lock(&pending);
            if waiting.closed {
                // Dropping `reply` fails the request with `Closed`.
                continue;
            }
            waiting.replies.push_back(reply);
        }
        if send.write_all(&line).await.is_err() {
            break;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads the daemon's lines: replies go to their waiting request, events to
/// the events stream. On close, waiting requests fail with `Closed`.
async fn route_incoming(
    recv: OwnedReadHalf,
    pending: Pending,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut lines = BufReader::new(recv).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match ServerMessage::parse(&line) {
            Ok(ServerMessage::Reply(reply)) => {
                if let Some(waiter) = lock(&pending).replies.pop_front() {
                    let _ = waiter.send(reply);
                } else {
                    // An error for a line we did not send as a request (the
                    // daemon refusing the connection, say): nobody waits.
                    tracing::warn!("unsolicited reply from the daemon: {line}");
                }
            }
            Ok(ServerMessage::Event(event)) => {
                let _ = events.send(event);
            }
            Err(e) => tracing::warn!("unreadable line from the daemon ({e}): {line}"),
        }
    }
    let mut waiting = lock(&pending);
    waiting.closed = true;
    waiting.replies.clear();
}
