//! The wire contract, protocol v1: every request, reply and event as a typed
//! value, shared by the daemon and the client library so that the two can
//! never disagree about a field name.
//!
//! Framing is one JSON object per line. Requests carry an `op`; replies carry
//! `ok`; events carry `event` and never `ok`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// What `hello` reports as `server`.
pub const SERVER_NAME: &str = concat!("presenced ", env!("CARGO_PKG_VERSION"));

/// Meta fields the daemon manages; a client meta may not set them.
pub const RESERVED_META_FIELDS: [&str; 7] = [
    "phx_ref",
    "phx_ref_prev",
    "seq",
    "joined_at",
    "pid",
    "uid",
    "user",
];

/// The daemon's limits. Each one has a default from the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_line_bytes: usize,
    pub max_name_bytes: usize,
    pub max_meta_bytes: usize,
    pub max_entries_per_connection: usize,
    /// `lifetime: "process"` entries outlive their connection, so they are
    /// also capped per uid.
    pub max_process_entries_per_uid: usize,
    pub max_subscriptions_per_connection: usize,
    pub max_connections: usize,
    /// Connections one user other than the daemon's own may hold, so that
    /// on a shared daemon nobody can take every slot.
    pub max_connections_per_uid: usize,
    pub max_outbound_bytes: usize,
    /// Entries the daemon holds in all, of every user: what bounds its
    /// memory and database however many users share it.
    pub max_total_entries: usize,
    /// Entries, and bytes of meta, one user other than the daemon's own
    /// may hold across all connections, so that on a shared daemon one
    /// member cannot fill its memory and disk.
    pub max_entries_per_uid: usize,
    pub max_meta_bytes_per_uid: usize,
    /// What every connection's queue may hold together; past it, the
    /// connections that have stopped reading are closed, those holding the
    /// most first.
    pub max_outbound_total_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 64 * 1024,
            max_name_bytes: 256,
            max_meta_bytes: 8 * 1024,
            max_entries_per_connection: 1_000,
            max_process_entries_per_uid: 1_000,
            max_subscriptions_per_connection: 1_000,
            max_connections: 10_000,
            max_connections_per_uid: 1_000,
            max_outbound_bytes: 1024 * 1024,
            // Above the largest uses one user is known to make: 100,000
            // entries (the restart benchmark), and 10,000 with 500-byte
            // metas (5 MB).
            max_total_entries: 200_000,
            max_entries_per_uid: 100_000,
            max_meta_bytes_per_uid: 16 * 1024 * 1024,
            max_outbound_total_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The `code` of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    BadRequest,
    UnknownOp,
    AlreadyTracked,
    NotFound,
    PermissionDenied,
    LimitExceeded,
    LineTooLong,
    UnsupportedProtocol,
    Internal,
    /// A topic shared across hosts cannot be changed now: the etcd
    /// cluster that holds it cannot be reached. Only a daemon that shares
    /// topics through etcd gives it.
    Unavailable,
    /// A code from a newer daemon that this build does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::AlreadyTracked => "already_tracked",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::UnsupportedProtocol => "unsupported_protocol",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `error` object of a failed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorBody {}

/// How long a tracked entry lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifetime {
    /// Until the connection closes or the process exits, whichever is first.
    #[default]
    Connection,
    /// Until the process exits or the same uid untracks it.
    Process,
}

impl Lifetime {
    pub fn as_str(self) -> &'static str {
        match self {
            Lifetime::Connection => "connection",
            Lifetime::Process => "process",
        }
    }
}

/// A topic's entry is either the owner or a read-only spectator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Spectator,
}

/// Why an entry left its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    Untrack,
    Closed,
    PidExit,
    Expired,
    Update,
    /// Found gone when the daemon started: the entry's process exited (or
    /// the machine rebooted) while no daemon ran. History only; no client
    /// is connected yet to be sent a diff.
    ExitedWhileDown,
    /// The entry was held by another host, in a topic shared across hosts,
    /// and that host stopped renewing its claim in etcd: it crashed, or
    /// was cut off from the cluster for longer than its lease.
    HostLost,
    /// A reason from a newer daemon that this build does not know. Read
    /// only: a daemon never sends it, and it serializes as `unknown`.
    #[serde(other)]
    Unknown,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Untrack => "untrack",
            LeaveReason::Closed => "closed",
            LeaveReason::PidExit => "pid_exit",
            LeaveReason::Expired => "expired",
            LeaveReason::Update => "update",
            LeaveReason::ExitedWhileDown => "exited_while_down",
            LeaveReason::HostLost => "host_lost",
            LeaveReason::Unknown => "unknown",
        }
    }

    /// The reason named `text`; `None` for a name this build does not
    /// know, `unknown` included, which names no reason a daemon gives.
    pub fn parse(text: &str) -> Option<LeaveReason> {
        [
            LeaveReason::Untrack,
            LeaveReason::Closed,
            LeaveReason::PidExit,
            LeaveReason::Expired,
            LeaveReason::Update,
            LeaveReason::ExitedWhileDown,
            LeaveReason::HostLost,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == text)
    }
}

/// What kind of moment a history event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    Join,
    Leave,
    Update,
    /// The entry became the topic's owner.
    Owner,
}

impl HistoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryKind::Join => "join",
            HistoryKind::Leave => "leave",
            HistoryKind::Update => "update",
            HistoryKind::Owner => "owner",
        }
    }

    pub fn parse(text: &str) -> Option<HistoryKind> {
        [
            HistoryKind::Join,
            HistoryKind::Leave,
            HistoryKind::Update,
            HistoryKind::Owner,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }
}

/// The most bytes of JSON a changed meta value keeps in an update's
/// history event; a longer one is recorded as the string `… (N bytes)`.
pub const HISTORY_VALUE_MAX_BYTES: usize = 256;

/// The most bytes an update's history event keeps of what it did to the
/// meta, field names and values of `changed` and names in `removed`
/// together (as compact JSON, about). An update may replace a whole meta
/// of up to `--max-meta` bytes every time, and the history keeps
/// `--history-events` of them; what does not fit is counted instead.
pub const HISTORY_CHANGE_MAX_BYTES: usize = 1024;

/// The field of an update event's `changed` that counts the changed and
/// removed fields left out past [`HISTORY_CHANGE_MAX_BYTES`].
pub const HISTORY_LEFT_OUT_FIELD: &str = "…";

/// One recorded moment of a topic's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// Unix milliseconds.
    pub at: i64,
    pub topic: String,
    pub kind: HistoryKind,
    pub key: String,
    /// The entry's ref; for an update, the new one.
    #[serde(rename = "ref")]
    pub phx_ref: String,
    pub pid: u32,
    pub user: String,
    /// Why the entry left, for a `leave`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<LeaveReason>,
    /// For an `update`: the meta fields it added or changed, with their
    /// new values, bounded ([`HISTORY_CHANGE_MAX_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<Map<String, Value>>,
    /// For an `update`: the names of the meta fields it removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<Vec<String>>,
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

// The requests and their replies live with their ops, in `src/ops/`; they
// are named here too, so that the wire contract stays one module to
// import.
pub use crate::ops::get_by_key::{GetByKeyReply, GetByKeyRequest};
pub use crate::ops::hello::{HelloReply, HelloRequest};
pub use crate::ops::history::{
    DEFAULT_HISTORY_LIMIT, HistoryReply, HistoryRequest, MAX_HISTORY_LIMIT,
};
pub use crate::ops::list::{ListAllReply, ListRequest, ListTopicReply};
pub use crate::ops::resume::{ResumeReply, ResumeRequest};
pub use crate::ops::status::StatusReply;
pub use crate::ops::subscribe::{SubscribeAllReply, SubscriptionRequest};
pub use crate::ops::track::{TrackReply, TrackRequest};
pub use crate::ops::untrack::{UntrackReply, UntrackRequest};
pub use crate::ops::update::{UpdateReply, UpdateRequest};
pub use crate::ops::{KNOWN_OPS, Request};

/// The fields of a request that has none (`status`, `ping`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

// ---------------------------------------------------------------------------
// Presence data
// ---------------------------------------------------------------------------

/// One entry as the wire shows it: the client's meta plus the fields the
/// daemon manages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub phx_ref: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phx_ref_prev: Option<String>,
    pub seq: u64,
    pub joined_at: i64,
    pub pid: u32,
    pub uid: u32,
    pub user: String,
    #[serde(flatten)]
    pub client: Map<String, Value>,
}

/// Phoenix's `{"metas": [...]}`, metas sorted by seq.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyPresence {
    pub metas: Vec<Meta>,
}

/// Phoenix's presence map: key to metas.
pub type Presences = BTreeMap<String, KeyPresence>;

/// Who owns a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub key: String,
    pub phx_ref: String,
    pub pid: u32,
    pub user: String,
    pub joined_at: i64,
}

/// A topic's presences with its owner, as `list` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopicPresences {
    pub presences: Presences,
    pub owner: Option<Owner>,
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// A reply line, as a client reads it: `{"id", "ok": true, ...fields}` or
/// `{"id", "ok": false, "error": {...}}`. The daemon writes the same line
/// from an [`OutgoingReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: Value,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// A reply as the daemon writes it. A success's fields are serialized
/// from their typed form once, straight to text: a `list` of thousands of
/// entries never becomes a tree of `Value`s on its way to the socket.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingReply {
    pub id: Value,
    pub outcome: Result<ReplyFields, ErrorBody>,
}

/// The fields of a successful reply: the text of one JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyFields(String);

impl ReplyFields {
    /// The fields of `body`, which serializes as an object (every reply
    /// type does); anything else gives no fields.
    pub fn of(body: &impl Serialize) -> ReplyFields {
        match serde_json::to_string(body) {
            Ok(text) if text.starts_with('{') => ReplyFields(text),
            _ => ReplyFields::none(),
        }
    }

    /// A success with nothing more to say.
    pub fn none() -> ReplyFields {
        ReplyFields("{}".to_owned())
    }

    /// The object's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The fields without their braces: `"a":1,"b":2`, or empty.
    fn inner(&self) -> &str {
        self.0
            .strip_prefix('{')
            .and_then(|rest| rest.strip_suffix('}'))
            .unwrap_or_default()
    }
}

impl OutgoingReply {
    pub fn success(id: Value, body: &impl Serialize) -> OutgoingReply {
        OutgoingReply {
            id,
            outcome: Ok(ReplyFields::of(body)),
        }
    }

    pub fn failure(id: Value, error: ErrorBody) -> OutgoingReply {
        OutgoingReply {
            id,
            outcome: Err(error),
        }
    }

    /// The reply's line, ending in `\n`: `id` and `ok` first, then the
    /// fields or the error, as [`Reply`] reads them.
    pub fn to_line(&self) -> Vec<u8> {
        let fields = match &self.outcome {
            Ok(fields) => fields.inner(),
            Err(_) => "",
        };
        let mut line = Vec::with_capacity(fields.len() + 48);
        line.extend_from_slice(b"{\"id\":");
        // Neither a `Value` nor an `ErrorBody` can fail to serialize (their
        // keys are strings), and a Vec takes every byte written to it.
        let _ = serde_json::to_writer(&mut line, &self.id);
        match &self.outcome {
            Ok(_) => {
                line.extend_from_slice(b",\"ok\":true");
                if !fields.is_empty() {
                    line.push(b',');
                    line.extend_from_slice(fields.as_bytes());
                }
            }
            Err(error) => {
                line.extend_from_slice(b",\"ok\":false,\"error\":");
                let _ = serde_json::to_writer(&mut line, error);
            }
        }
        line.extend_from_slice(b"}\n");
        line
    }
}

/// Where an entry stands in its topic's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    pub role: Role,
    pub readonly: bool,
    pub position: usize,
    pub owner: Option<Owner>,
    /// The owner of a topic shared across hosts, held back while its
    /// daemon cannot reach etcd: it stands first (position 0, and it is
    /// still the `owner` named) but as a read-only spectator, and owns
    /// again when etcd can be reached. Only a daemon that shares topics
    /// through etcd sets it; on the wire it is left out when false, so a
    /// standing of any other topic reads as it always has.
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspended: bool,
}

fn is_false(flag: &bool) -> bool {
    !*flag
}

impl Standing {
    /// Whether `other` is the same place in the queue: the same role,
    /// position, suspension and owner. The owner is compared by who it is
    /// (its host, key, pid, the time it joined), not by its ref: an
    /// `update` gives the owner a new ref without moving anyone, and no
    /// `role` event tells of it, so a standing that differs only in the
    /// owner's ref is no change of standing. The host is compared because
    /// two hosts' pids and clocks can coincide; an update keeps it.
    pub fn same_place(&self, other: &Standing) -> bool {
        let same_owner = match (&self.owner, &other.owner) {
            (Some(mine), Some(theirs)) => {
                mine.key == theirs.key
                    && mine.pid == theirs.pid
                    && mine.joined_at == theirs.joined_at
                    && host_of_ref(&mine.phx_ref) == host_of_ref(&theirs.phx_ref)
            }
            (None, None) => true,
            _ => false,
        };
        self.role == other.role
            && self.readonly == other.readonly
            && self.position == other.position
            && self.suspended == other.suspended
            && same_owner
    }
}

/// An entry another connection removed, as `resume` tells of it: its
/// topic, and what a `removed` event would have said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedEntry {
    pub topic: String,
    #[serde(flatten)]
    pub removal: Removal,
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// `presence_diff`'s payload: both maps are always present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Diff {
    pub joins: Presences,
    pub leaves: Presences,
}

/// `role`'s payload: an entry's new standing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    #[serde(rename = "ref")]
    pub phx_ref: String,
    #[serde(flatten)]
    pub standing: Standing,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownPayload {
    pub reason: String,
}

/// `resync`'s payload: the topics whose `presence_state` follows, in the
/// order they follow. A topic the connection was shown that is not among
/// them is empty now: it emptied while the connection's diffs were held
/// back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncPayload {
    pub topics: Vec<String>,
}

/// `removed`'s payload: which of the connection's entries another
/// connection removed, why, and who did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    #[serde(rename = "ref")]
    pub phx_ref: String,
    pub key: String,
    pub reason: LeaveReason,
    pub by: Actor,
}

/// `updated`'s payload: which of the connection's entries another
/// connection updated, its new ref and meta, and who did it. The entry
/// keeps its place and its resume token; only its ref and meta changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    /// The entry's ref from now on.
    #[serde(rename = "ref")]
    pub phx_ref: String,
    /// The ref it had, which names nothing any more.
    pub prev_ref: String,
    pub key: String,
    /// The client meta it has now.
    pub meta: Map<String, Value>,
    pub by: Actor,
}

/// Who removed or updated an entry another connection holds: the peer
/// credentials of the connection that did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub uid: u32,
    pub user: String,
    pub pid: u32,
}

/// A pushed event. Its `event` field names the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    PresenceState {
        topic: String,
        payload: Presences,
        owner: Option<Owner>,
    },
    PresenceDiff {
        topic: String,
        payload: Diff,
        owner: Option<Owner>,
        reasons: BTreeMap<String, LeaveReason>,
    },
    Role {
        topic: String,
        payload: RoleChange,
    },
    Shutdown {
        payload: ShutdownPayload,
    },
    /// To a connection subscribed to every topic, ahead of the fresh
    /// states of a slow-reader resync of every topic.
    Resync {
        payload: ResyncPayload,
    },
    /// To the connection holding an entry, when another connection has
    /// removed it: the holder is no longer on the topic.
    Removed {
        topic: String,
        payload: Removal,
    },
    /// To the connection holding an entry, when another connection has
    /// updated it: the holder's entry has a new ref and meta.
    Updated {
        topic: String,
        payload: Revision,
    },
}

impl Event {
    pub fn topic(&self) -> Option<&str> {
        match self {
            Event::PresenceState { topic, .. }
            | Event::PresenceDiff { topic, .. }
            | Event::Role { topic, .. }
            | Event::Removed { topic, .. }
            | Event::Updated { topic, .. } => Some(topic),
            Event::Shutdown { .. } | Event::Resync { .. } => None,
        }
    }
}

/// Any line the daemon sends: a reply or an event.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Reply(Reply),
    Event(Event),
}

impl ServerMessage {
    /// Parses one line from the daemon.
    pub fn parse(line: &str) -> Result<ServerMessage, serde_json::Error> {
        let value: Value = serde_json::from_str(line)?;
        if value.get("event").is_some() {
            serde_json::from_value(value).map(ServerMessage::Event)
        } else {
            serde_json::from_value(value).map(ServerMessage::Reply)
        }
    }
}

// ---------------------------------------------------------------------------
// Validation shared by the daemon and the client
// ---------------------------------------------------------------------------

/// The longest host name: a DNS label's length.
pub const MAX_HOST_BYTES: usize = 63;

/// Whether `name` can name a host in a ref: 1 to [`MAX_HOST_BYTES`] of
/// ASCII letters, digits, `-`, `_` and `.`, as a hostname is written.
/// `:` is the ref's separator and `/` an etcd key's, so neither may
/// appear.
pub fn check_host(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > MAX_HOST_BYTES || !name.chars().all(allowed) {
        return Err(format!(
            "a host name is 1 to {MAX_HOST_BYTES} letters, digits, '-', '_' or '.', not {name:?}"
        ));
    }
    Ok(())
}

/// The ref numbered `number` of an entry of a topic shared across hosts,
/// tracked on `host`: `HOST:pN`.
pub fn cluster_ref(host: &str, number: u64) -> String {
    format!("{host}:p{number}")
}

/// The host a ref of a topic shared across hosts names (`HOST:pN`), if it
/// is one; `None` for a ref of a topic kept on one host (`pN`).
pub fn host_of_ref(phx_ref: &str) -> Option<&str> {
    let (host, number) = phx_ref.split_once(":p")?;
    let numbered = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
    (check_host(host).is_ok() && numbered).then_some(host)
}

/// Checks a topic or key: 1 to `max_bytes` bytes, not only white space,
/// and no hidden characters (see [`is_hidden_char`]).
pub fn validate_name(what: &str, name: &str, max_bytes: usize) -> Result<(), ErrorBody> {
    if name.is_empty() || name.len() > max_bytes {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{what} must be 1 to {max_bytes} bytes, got {}", name.len()),
        ));
    }
    if is_blank(name) {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{what} {BLANK_PROBLEM}"),
        ));
    }
    if let Some(problem) = hidden_char_problem(name) {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("{what} {problem}"),
        ));
    }
    Ok(())
}

/// Why a name of nothing but white space is refused.
pub const BLANK_PROBLEM: &str = "must not be blank (only white space)";

/// Whether `name` is nothing but white space (which prints as nothing, so
/// no one could tell one such name from another).
pub fn is_blank(name: &str) -> bool {
    name.trim().is_empty()
}

/// Whether `c` is a control character (general category Cc: C0, DEL and
/// C1) or a format character (Cf: bidi embeddings, overrides and
/// isolates, zero-width spaces and joiners, the byte order mark). These
/// show as nothing, or change how the text around them shows, so two
/// different names could look the same, or a name could rewrite the
/// screen it is printed on.
pub fn is_hidden_char(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
    // Every name is checked on every request, and most are ASCII, where
    // no character is a format character: the table lookup is skipped.
    if c.is_ascii() {
        return c.is_ascii_control();
    }
    c.is_control() || c.general_category() == GeneralCategory::Format
}

/// Why `name` is refused for its hidden characters, naming the first
/// and where it is; `None` when it has none.
pub fn hidden_char_problem(name: &str) -> Option<String> {
    let (at, c) = name.char_indices().find(|&(_, c)| is_hidden_char(c))?;
    Some(format!(
        "must not contain control or format characters, which can make two names look \
         alike: U+{:04X} at byte {at}",
        u32::from(c)
    ))
}

/// Checks a client meta: no daemon-managed field, at most `max_bytes` when
/// serialized.
pub fn validate_meta(meta: &Map<String, Value>, max_bytes: usize) -> Result<(), ErrorBody> {
    checked_meta_size(meta, max_bytes).map(drop)
}

/// Checks a client meta as [`validate_meta`] does, and returns its size.
pub fn checked_meta_size(meta: &Map<String, Value>, max_bytes: usize) -> Result<usize, ErrorBody> {
    if let Some(field) = RESERVED_META_FIELDS
        .iter()
        .find(|field| meta.contains_key(**field))
    {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("meta field `{field}` is managed by the daemon and cannot be set"),
        ));
    }
    let size = meta_size(meta);
    if size > max_bytes {
        return Err(ErrorBody::new(
            ErrorCode::LimitExceeded,
            format!("meta is {size} bytes serialized; the limit is {max_bytes}"),
        ));
    }
    Ok(size)
}

/// A client meta's size as `--max-meta` and the per-user meta quota
/// measure it: compact JSON. Counted without building the text.
pub fn meta_size(meta: &Map<String, Value>) -> usize {
    json_size(meta)
}

/// The length of `value` as compact JSON, counted without building the
/// text.
pub fn json_size(value: &(impl Serialize + ?Sized)) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // What is measured here is JSON values, maps with string keys and
    // strings, which always serialize, and the counter takes every byte.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn standing(role: Role, position: usize, owner: Owner) -> Standing {
        Standing {
            role,
            readonly: role == Role::Spectator,
            position,
            owner: Some(owner),
            suspended: false,
        }
    }

    #[test]
    fn the_same_place_is_the_same_role_position_and_owner_whatever_the_owner_s_ref() {
        let alice = Owner {
            key: "alice".into(),
            phx_ref: "F1".into(),
            pid: 10,
            user: "u".into(),
            joined_at: 100,
        };
        let place = standing(Role::Spectator, 1, alice.clone());
        let updated_owner = Owner {
            phx_ref: "F9".into(),
            ..alice.clone()
        };
        assert!(place.same_place(&standing(Role::Spectator, 1, updated_owner)));
        assert!(!place.same_place(&standing(Role::Spectator, 2, alice.clone())));
        assert!(!place.same_place(&standing(Role::Owner, 1, alice.clone())));
        let rejoined = Owner {
            joined_at: 101,
            ..alice.clone()
        };
        assert!(!place.same_place(&standing(Role::Spectator, 1, rejoined)));
        let other_process = Owner {
            pid: 11,
            ..alice.clone()
        };
        assert!(!place.same_place(&standing(Role::Spectator, 1, other_process)));
        let other_key = Owner {
            key: "bob".into(),
            ..alice
        };
        assert!(!place.same_place(&standing(Role::Spectator, 1, other_key)));
        let ownerless = Standing {
            owner: None,
            ..place.clone()
        };
        assert!(!place.same_place(&ownerless));
        assert!(ownerless.same_place(&ownerless.clone()));
    }

    #[test]
    fn host_names_are_hostnames_and_refs_name_them() {
        assert!(check_host("web-1.example_a").is_ok());
        for bad in ["", "a:b", "a/b", "a b", &"x".repeat(64)] {
            assert!(check_host(bad).is_err(), "{bad:?}");
        }
        assert_eq!(cluster_ref("web-1", 9), "web-1:p9");
        assert_eq!(host_of_ref("web-1:p9"), Some("web-1"));
        assert_eq!(host_of_ref("p9"), None);
        assert_eq!(host_of_ref("web-1:px"), None);
    }

    #[test]
    fn the_same_place_is_an_owner_on_the_same_host_and_the_same_suspension() {
        let on = |host: &str| Owner {
            key: "alice".into(),
            phx_ref: cluster_ref(host, 1),
            pid: 10,
            user: "u".into(),
            joined_at: 100,
        };
        let place = standing(Role::Spectator, 1, on("web-1"));
        let updated = Owner {
            phx_ref: cluster_ref("web-1", 7),
            ..on("web-1")
        };
        assert!(place.same_place(&standing(Role::Spectator, 1, updated)));
        assert!(!place.same_place(&standing(Role::Spectator, 1, on("web-2"))));
        let local = Owner {
            phx_ref: "p1".into(),
            ..on("web-1")
        };
        assert!(!place.same_place(&standing(Role::Spectator, 1, local)));

        let owning = Standing {
            readonly: true,
            ..standing(Role::Spectator, 0, on("web-1"))
        };
        let suspended = Standing {
            suspended: true,
            ..owning.clone()
        };
        assert!(!owning.same_place(&suspended));
        assert!(!suspended.same_place(&owning));
        assert!(suspended.same_place(&suspended.clone()));
    }

    #[test]
    fn a_standing_not_suspended_is_written_as_before_and_a_suspended_one_says_so() {
        let owner = Owner {
            key: "alice".into(),
            phx_ref: "p1".into(),
            pid: 10,
            user: "u".into(),
            joined_at: 100,
        };
        let owning = Standing {
            readonly: false,
            ..standing(Role::Owner, 0, owner.clone())
        };
        assert_eq!(
            serde_json::to_string(&owning).unwrap(),
            r#"{"role":"owner","readonly":false,"position":0,"owner":{"key":"alice","phx_ref":"p1","pid":10,"user":"u","joined_at":100}}"#
        );
        let change = RoleChange {
            phx_ref: "p2".into(),
            standing: standing(Role::Spectator, 1, owner.clone()),
        };
        assert_eq!(
            serde_json::to_string(&change).unwrap(),
            r#"{"ref":"p2","role":"spectator","readonly":true,"position":1,"owner":{"key":"alice","phx_ref":"p1","pid":10,"user":"u","joined_at":100}}"#
        );
        let read: RoleChange =
            serde_json::from_str(&serde_json::to_string(&change).unwrap()).unwrap();
        assert_eq!(read, change);

        let suspended = json!({
            "event": "role",
            "topic": "doc",
            "payload": {
                "ref": "web-1:p1",
                "role": "spectator",
                "readonly": true,
                "position": 0,
                "owner": {"key": "alice", "phx_ref": "web-1:p1", "pid": 10, "user": "u",
                          "joined_at": 100},
                "suspended": true
            }
        });
        let ServerMessage::Event(Event::Role { payload, .. }) =
            ServerMessage::parse(&suspended.to_string()).unwrap()
        else {
            panic!("a role event");
        };
        assert!(payload.standing.suspended);
        assert_eq!(payload.standing.role, Role::Spectator);
        assert_eq!(payload.standing.position, 0);
        assert_eq!(
            serde_json::to_value(Event::Role {
                topic: "doc".into(),
                payload
            })
            .unwrap(),
            suspended
        );
    }

    #[test]
    fn host_lost_round_trips_and_a_reason_this_build_does_not_know_reads_as_unknown() {
        let diff = |reason: &str| {
            json!({
                "event": "presence_diff",
                "topic": "doc",
                "payload": {"joins": {}, "leaves": {}},
                "owner": null,
                "reasons": {"web-2:p4": reason}
            })
            .to_string()
        };
        let reasons = |line: &str| match ServerMessage::parse(line).unwrap() {
            ServerMessage::Event(Event::PresenceDiff { reasons, .. }) => reasons,
            other => panic!("a diff, not {other:?}"),
        };
        let lost = reasons(&diff("host_lost"));
        assert_eq!(lost["web-2:p4"], LeaveReason::HostLost);
        assert_eq!(
            serde_json::to_value(LeaveReason::HostLost).unwrap(),
            json!("host_lost")
        );
        assert_eq!(LeaveReason::parse("host_lost"), Some(LeaveReason::HostLost));
        assert_eq!(LeaveReason::HostLost.as_str(), "host_lost");

        let later = reasons(&diff("moved_to_the_moon"));
        assert_eq!(later["web-2:p4"], LeaveReason::Unknown);
        // Text that names no reason a daemon gives is no reason to parse.
        assert_eq!(LeaveReason::parse("unknown"), None);
        assert_eq!(LeaveReason::parse("moved_to_the_moon"), None);
    }

    #[test]
    fn unavailable_is_a_code_and_a_later_code_reads_as_unknown() {
        let body: ErrorBody =
            serde_json::from_value(json!({"code": "unavailable", "message": "etcd"})).unwrap();
        assert_eq!(body.code, ErrorCode::Unavailable);
        assert_eq!(body.code.as_str(), "unavailable");
        assert_eq!(
            serde_json::to_value(ErrorCode::Unavailable).unwrap(),
            json!("unavailable")
        );
        let body: ErrorBody =
            serde_json::from_value(json!({"code": "on_fire", "message": "?"})).unwrap();
        assert_eq!(body.code, ErrorCode::Unknown);
    }

    #[test]
    fn reply_flattens_fields_next_to_id_and_ok() {
        let reply = OutgoingReply::success(json!(7), &UntrackReply { removed: 2 });
        let line = reply.to_line();
        assert_eq!(line, b"{\"id\":7,\"ok\":true,\"removed\":2}\n");
        let read: Reply = serde_json::from_slice(&line).unwrap();
        assert_eq!(read.fields["removed"], 2);
    }

    #[test]
    fn outgoing_replies_read_back_as_the_same_reply() {
        let error = ErrorBody::new(ErrorCode::NotFound, "no such \"ref\"\n");
        let replies = [
            OutgoingReply::success(json!({"nested": [1, "x"]}), &Map::new()),
            OutgoingReply::success(Value::Null, &json!("not an object")),
            OutgoingReply::success(
                json!("id"),
                &HelloReply {
                    protocol: 1,
                    server: "presenced".into(),
                    pid: 4242,
                },
            ),
            OutgoingReply::failure(json!(3), error.clone()),
        ];
        let expected = [
            json!({"id": {"nested": [1, "x"]}, "ok": true}),
            json!({"id": null, "ok": true}),
            json!({"id": "id", "ok": true, "protocol": 1, "server": "presenced", "pid": 4242}),
            json!({"id": 3, "ok": false, "error": error}),
        ];
        for (reply, expected) in replies.iter().zip(expected) {
            let line = reply.to_line();
            assert_eq!(line.last(), Some(&b'\n'));
            let read: Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(read, expected);
            let read: Reply = serde_json::from_slice(&line).unwrap();
            assert_eq!(read.ok, reply.outcome.is_ok());
        }
    }

    #[test]
    fn events_are_tagged_and_never_carry_ok() {
        let event = Event::Shutdown {
            payload: ShutdownPayload {
                reason: "stopping".into(),
            },
        };
        let line = serde_json::to_value(&event).unwrap();
        assert_eq!(
            line,
            json!({"event": "shutdown", "payload": {"reason": "stopping"}})
        );
        let parsed = ServerMessage::parse(&line.to_string()).unwrap();
        assert_eq!(parsed, ServerMessage::Event(event));
    }

    #[test]
    fn reserved_meta_fields_are_refused() {
        let meta = json!({"seq": 1}).as_object().unwrap().clone();
        let err = validate_meta(&meta, 8192).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
    }

    #[test]
    fn a_meta_is_measured_as_its_compact_json_and_held_to_the_limit_by_that() {
        let meta = json!({"file": "/tmp/\u{e9}t\u{e9}.md", "line": 12, "tags": ["a", null]});
        let meta = meta.as_object().unwrap().clone();
        let text = serde_json::to_vec(&meta).unwrap();
        assert_eq!(meta_size(&meta), text.len());
        assert_eq!(meta_size(&Map::new()), 2);
        assert_eq!(checked_meta_size(&meta, text.len()), Ok(text.len()));
        let err = checked_meta_size(&meta, text.len() - 1).unwrap_err();
        assert_eq!(err.code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        assert!(validate_name("topic", "a\nb", 256).is_err());
        assert!(validate_name("topic", "", 256).is_err());
        assert!(validate_name("topic", "   ", 256).is_err());
        assert!(validate_name("topic", "\u{3000}", 256).is_err());
        assert!(validate_name("topic", " a ", 256).is_ok());
        assert!(validate_name("topic", "publishing_edit:docs:x", 256).is_ok());
    }

    #[test]
    fn names_with_format_characters_are_refused_and_the_character_named() {
        for (name, named) in [
            ("doc\u{202e}dm.exe", "U+202E at byte 3"),
            ("\u{200b}doc", "U+200B at byte 0"),
            ("d\u{0085}", "U+0085 at byte 1"),
            ("d\u{7f}", "U+007F at byte 1"),
            ("é\u{feff}", "U+FEFF at byte 2"),
            ("x\u{e0041}", "U+E0041 at byte 1"),
        ] {
            let error = validate_name("key", name, 256).unwrap_err();
            assert_eq!(error.code, ErrorCode::BadRequest);
            assert!(
                error.message.starts_with("key must not"),
                "{}",
                error.message
            );
            assert!(error.message.ends_with(named), "{}", error.message);
        }
        // Letters of any script, marks, emoji and plain spaces are fine.
        for name in ["文档", "café", "e\u{301}", "📝 notes", "a b"] {
            assert!(validate_name("topic", name, 256).is_ok(), "{name}");
        }
    }
}
