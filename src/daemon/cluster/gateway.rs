//! A client of etcd's JSON gateway (gRPC-gateway, served on each member's
//! client port), over HTTP/1.1 with hyper's low-level client.
//!
//! A [`Gateway`] holds a list of endpoints and talks to one of them at a
//! time. Each attempt has its own timeout R (connect, request and reply
//! together); when an attempt fails or times out, the gateway moves to the
//! next endpoint, for this call and the ones after it, so a stopped or
//! partitioned member costs one R and no more. Whether the call itself is
//! tried again on the next endpoint depends on the call: a read, a lease
//! grant, renewal or revoke, and a delete may be sent twice without harm,
//! but a transaction may not, since an attempt that timed out after its
//! request was written may have been committed. A transaction is retried
//! only when it surely did not reach etcd: the connection could not be
//! made, or hyper handed the request back unsent.
//!
//! The gateway's JSON is protobuf's: 64-bit integers are strings, keys and
//! values base64, and fields at their default (`false`, `0`, a `PUT`
//! event's type) are left out. Nothing read from the network is unwrapped:
//! whatever does not decode is an [`Error::Reply`].

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::http::uri::Authority;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

/// The longest line of a watch's reply read before giving up on it: a
/// revoke of a lease with many keys is one message, so this is generous.
const MAX_WATCH_LINE: usize = 64 << 20;

/// The largest reply read whole: a listing of every cluster entry is the
/// largest, so this is generous too; it bounds what a member can make the
/// daemon hold.
const MAX_REPLY: usize = 256 << 20;

/// The most operations etcd takes in each branch of one transaction, by
/// default (its `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// gRPC's codes that mean "this member cannot serve now" (no leader,
/// leader changed, request timed out): the next member may.
const GRPC_UNAVAILABLE: i64 = 14;
const GRPC_DEADLINE_EXCEEDED: i64 = 4;
/// gRPC's code for a lease or key that is not there.
const GRPC_NOT_FOUND: i64 = 5;

type Sender = SendRequest<Full<Bytes>>;

/// A client of etcd over a list of members' client URLs.
pub struct Gateway {
    endpoints: Vec<Endpoint>,
    attempt_timeout: Duration,
    /// The endpoint tried first; moved on past one that failed.
    current: AtomicUsize,
}

struct Endpoint {
    /// As given, for messages.
    url: String,
    /// `host:port`, to connect to and for the `Host` header.
    authority: String,
    /// Connections whose last exchange ended cleanly, for reuse.
    idle: Mutex<Vec<Sender>>,
}

/// A lease's id, as etcd numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A lease granted with exactly the TTL asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
}

/// What a renewal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed: it now lives `ttl` from etcd's receipt of the renewal.
    Alive { ttl: Duration },
    /// The lease is gone (expired or revoked), with every key on it.
    Gone,
}

/// A key and its value, with etcd's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Kv {
    #[serde(default, deserialize_with = "base64_bytes")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "base64_bytes")]
    pub value: Vec<u8>,
    /// The revision that created it; its place in its topic's queue.
    #[serde(default, deserialize_with = "int64")]
    pub create_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    pub mod_revision: i64,
    /// How many times it was written since it was created (1 at first).
    #[serde(default, deserialize_with = "int64")]
    pub version: i64,
    /// The lease it lives on, 0 for none.
    #[serde(default, deserialize_with = "int64")]
    pub lease: i64,
}

/// What [`Gateway::create_if_absent`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    Created(Created),
    /// The key was there already; nothing was written.
    Exists,
}

/// A key created by [`Gateway::create_if_absent`], and its queue as the
/// same transaction saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The key's create revision: the transaction's revision.
    pub create_revision: i64,
    /// The store's revision after the transaction (the same number).
    pub revision: i64,
    /// 1-based: how many keys under the prefix were created at or before
    /// this one.
    pub position: u64,
    /// The key under the prefix with the lowest create revision.
    pub owner: Kv,
}

/// What [`Gateway::rewrite`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// Written, its create revision kept, at this revision.
    Rewritten { revision: i64 },
    /// The key was not there; nothing was written.
    Missing,
}

/// What [`Gateway::delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// The store's revision after the delete.
    pub revision: i64,
    /// Whether the key was there to delete.
    pub existed: bool,
}

/// What [`Gateway::move_to_lease`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moved {
    /// How many keys now live on the new lease.
    pub moved: usize,
    /// Keys that were gone, or had been deleted and created again, so were
    /// left alone: a move never brings back a key that left.
    pub missing: Vec<Vec<u8>>,
}

/// One change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete { key: Vec<u8>, revision: i64 },
}

impl Event {
    /// The revision that made this change.
    pub fn revision(&self) -> i64 {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// One message of a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// The changes of one or more revisions; `revision` is its last
    /// event's, so a watch made again from `revision + 1` misses nothing.
    Events { revision: i64, events: Vec<Event> },
    /// The revision asked for was compacted away: list again, and watch
    /// from the listing's revision. Nothing follows on this watch.
    Compacted { compact_revision: i64 },
}

/// Everything that can go wrong talking to etcd.
#[derive(Debug)]
pub enum Error {
    /// An endpoint that is not `http://host:port`.
    Endpoint { url: String, reason: &'static str },
    /// A call this client does not send, and why.
    Refused { reason: String },
    /// The connection could not be made.
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    /// The exchange failed on the connection.
    Http {
        endpoint: String,
        source: hyper::Error,
    },
    /// The attempt took longer than its timeout.
    Timeout { endpoint: String, after: Duration },
    /// etcd answered with an error.
    Etcd {
        endpoint: String,
        status: u16,
        code: i64,
        message: String,
    },
    /// etcd's reply was not what its API says.
    Reply { endpoint: String, detail: String },
    /// Every endpoint was tried and none answered; each one's failure.
    Unavailable { failures: Vec<Error> },
    /// A transaction's attempt failed after it may have reached etcd: it
    /// may or may not have been committed, so it was not sent again.
    Uncertain { failure: Box<Error> },
    /// etcd granted a lease with another TTL than the one asked for (it
    /// raises one below its minimum, 1.5 election timeouts); the lease was
    /// revoked.
    TtlRaised {
        requested: Duration,
        granted: Duration,
    },
    /// etcd ended a watch for a reason other than compaction.
    WatchCanceled { endpoint: String, reason: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Endpoint { url, reason } => write!(f, "etcd endpoint {url:?}: {reason}"),
            Error::Refused { reason } => write!(f, "not sent to etcd: {reason}"),
            Error::Connect { endpoint, source } => {
                write!(f, "cannot connect to etcd at {endpoint}: {source}")
            }
            Error::Http { endpoint, source } => write!(f, "etcd at {endpoint}: {source}"),
            Error::Timeout { endpoint, after } => {
                write!(f, "etcd at {endpoint} did not answer within {after:?}")
            }
            Error::Etcd {
                endpoint,
                status,
                code,
                message,
            } => write!(
                f,
                "etcd at {endpoint} refused: {message} (HTTP {status}, gRPC code {code})"
            ),
            Error::Reply { endpoint, detail } => {
                write!(f, "etcd at {endpoint} sent an unreadable reply: {detail}")
            }
            Error::Unavailable { failures } => {
                write!(f, "no etcd endpoint answered")?;
                for failure in failures {
                    write!(f, "; {failure}")?;
                }
                Ok(())
            }
            Error::Uncertain { failure } => write!(
                f,
                "a transaction may or may not have been committed, so it was not retried: {failure}"
            ),
            Error::TtlRaised { requested, granted } => write!(
                f,
                "etcd granted a lease of {granted:?} when {requested:?} was asked for; \
                 its minimum is 1.5 election timeouts, so ask for at least that"
            ),
            Error::WatchCanceled { endpoint, reason } => {
                write!(f, "etcd at {endpoint} ended a watch: {reason}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } => Some(source),
            Error::Http { source, .. } => Some(source),
            Error::Uncertain { failure } => Some(failure.as_ref()),
            _ => None,
        }
    }
}

/// Whether a call may be sent again on the next endpoint after an attempt
/// that may have reached etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Idempotent: sending it twice does no harm.
    Always,
    /// A transaction: only when it surely was not sent.
    IfUnsent,
}

/// How one attempt failed.
enum Failure {
    /// It surely did not reach etcd: the next endpoint may have it.
    Unsent(Error),
    /// It may have reached etcd, and this member is of no use now.
    Lost(Error),
    /// etcd answered it with an error: final.
    Answered(Error),
}

/// A reply's body and where it came from.
struct Reply {
    endpoint: String,
    body: Bytes,
}

impl Reply {
    fn decode<T: DeserializeOwned>(&self, what: &str) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|error| Error::Reply {
            endpoint: self.endpoint.clone(),
            detail: format!("{what}: {error}"),
        })
    }

    fn wrong(&self, detail: impl Into<String>) -> Error {
        Error::Reply {
            endpoint: self.endpoint.clone(),
            detail: detail.into(),
        }
    }
}

impl Gateway {
    /// A client of the members at `endpoints` (`http://host:port`), each
    /// attempt given `attempt_timeout`. Connects to nothing yet.
    pub fn new(
        endpoints: impl IntoIterator<Item = impl AsRef<str>>,
        attempt_timeout: Duration,
    ) -> Result<Gateway, Error> {
        let endpoints = endpoints
            .into_iter()
            .map(|url| Endpoint::parse(url.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(Error::Refused {
                reason: "no etcd endpoint given".into(),
            });
        }
        Ok(Gateway {
            endpoints,
            attempt_timeout,
            current: AtomicUsize::new(0),
        })
    }

    /// The per-attempt timeout R.
    pub fn attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }

    /// The endpoint the next call tries first.
    pub fn current_endpoint(&self) -> &str {
        &self.endpoints[self.current.load(Ordering::Relaxed) % self.endpoints.len()].url
    }

    /// A new lease of exactly `ttl` (whole seconds, as etcd counts them).
    /// A lease granted with another TTL is revoked, and the grant fails.
    /// A grant whose reply was lost leaves a lease nobody renews, which
    /// etcd ends after its TTL; so a grant is sent again on failure.
    pub async fn grant(&self, ttl: Duration) -> Result<Lease, Error> {
        if ttl.subsec_nanos() != 0 || ttl.as_secs() == 0 || ttl.as_secs() > i64::MAX as u64 {
            return Err(Error::Refused {
                reason: format!("a lease's TTL is whole seconds, at least one, not {ttl:?}"),
            });
        }
        let requested = ttl.as_secs() as i64;
        let reply = self
            .call(
                "/v3/lease/grant",
                &json!({ "TTL": requested.to_string() }),
                Retry::Always,
            )
            .await?;
        let granted: LeaseJson = reply.decode("a lease grant")?;
        if let Some(error) = granted.error.filter(|error| !error.is_empty()) {
            return Err(reply.wrong(format!("a lease grant failed: {error}")));
        }
        if granted.id == 0 {
            return Err(reply.wrong("a lease grant without a lease id"));
        }
        let id = LeaseId(granted.id);
        if granted.ttl != requested {
            // Best effort: if this fails too, the lease ends after its TTL.
            let _ = self.revoke(id).await;
            return Err(Error::TtlRaised {
                requested: ttl,
                granted: Duration::from_secs(granted.ttl.max(0) as u64),
            });
        }
        Ok(Lease { id, ttl })
    }

    /// Renews `lease` once: one POST, one reply.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<Renewal, Error> {
        let reply = self
            .call(
                "/v3/lease/keepalive",
                &json!({ "ID": lease.0.to_string() }),
                Retry::Always,
            )
            .await?;
        let renewal: StreamJson<LeaseJson> = reply.decode("a lease renewal")?;
        if let Some(error) = renewal.error {
            // An error inside a 200 reply: a member that cannot serve now
            // (no leader) is passed over for the next call, as one that
            // failed outright is, so that whatever follows the gateway's
            // current member (a mirror's watch) moves on too.
            return Err(match classify(error.into_error(&reply.endpoint)) {
                Failure::Lost(error) => {
                    self.move_on_from(&reply.endpoint);
                    error
                }
                Failure::Unsent(error) | Failure::Answered(error) => error,
            });
        }
        let Some(result) = renewal.result else {
            return Err(reply.wrong("a lease renewal without a result"));
        };
        // A lease etcd no longer has is answered with no TTL, which is 0.
        Ok(if result.ttl > 0 {
            Renewal::Alive {
                ttl: Duration::from_secs(result.ttl as u64),
            }
        } else {
            Renewal::Gone
        })
    }

    /// Revokes `lease`, deleting every key on it. A lease already gone is
    /// not an error.
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), Error> {
        let reply = self
            .call(
                "/v3/lease/revoke",
                &json!({ "ID": lease.0.to_string() }),
                Retry::Always,
            )
            .await;
        match reply {
            Ok(_) => Ok(()),
            Err(Error::Etcd { code, .. }) if code == GRPC_NOT_FOUND => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// How long `lease` has left, as etcd counts it now (whole seconds,
    /// rounded down); `None` if etcd no longer has it.
    pub async fn time_to_live(&self, lease: LeaseId) -> Result<Option<Duration>, Error> {
        let reply = self
            .call(
                "/v3/lease/timetolive",
                &json!({ "ID": lease.0.to_string() }),
                Retry::Always,
            )
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(Error::Etcd { code, .. }) if code == GRPC_NOT_FOUND => return Ok(None),
            Err(error) => return Err(error),
        };
        let left: LeaseJson = reply.decode("a lease's time to live")?;
        if let Some(error) = left.error.filter(|error| !error.is_empty()) {
            return Err(reply.wrong(format!("a lease's time to live: {error}")));
        }
        // A lease etcd no longer has is answered with a TTL of -1.
        Ok(u64::try_from(left.ttl).ok().map(Duration::from_secs))
    }

    /// Creates `key` under `prefix` on `lease`, only if it is absent, and
    /// in the same transaction (one Raft commit) reads its position and the
    /// prefix's owner, the key with the lowest create revision.
    pub async fn create_if_absent(
        &self,
        prefix: &[u8],
        key: &[u8],
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Creation, Error> {
        if !key.starts_with(prefix) || key.len() == prefix.len() {
            return Err(Error::Refused {
                reason: format!(
                    "key {:?} is not under prefix {:?}",
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(prefix)
                ),
            });
        }
        let (from, to) = (BASE64.encode(prefix), BASE64.encode(prefix_end(prefix)));
        let body = json!({
            "compare": [{
                "key": BASE64.encode(key),
                "target": "CREATE",
                "result": "EQUAL",
                "create_revision": "0",
            }],
            "success": [
                { "request_put": {
                    "key": BASE64.encode(key),
                    "value": BASE64.encode(value),
                    "lease": lease.0.to_string(),
                }},
                // The transaction created the newest key under the prefix,
                // so every key there now was created at or before ours:
                // their count is our position.
                { "request_range": { "key": from, "range_end": to, "count_only": true }},
                { "request_range": {
                    "key": from,
                    "range_end": to,
                    "sort_target": "CREATE",
                    "sort_order": "ASCEND",
                    "limit": "1",
                }},
            ],
            "failure": [],
        });
        let reply = self.call("/v3/kv/txn", &body, Retry::IfUnsent).await?;
        // A reply that cannot be read, or that says the transaction went
        // through but not what it found, leaves the key possibly created:
        // never reported as not created, since the key may show.
        let uncertain = |failure: Error| Error::Uncertain {
            failure: Box::new(failure),
        };
        let txn: TxnJson = reply.decode("a create transaction").map_err(uncertain)?;
        if !txn.succeeded {
            return Ok(Creation::Exists);
        }
        let [
            _,
            ResponseJson { range: Some(count) },
            ResponseJson { range: Some(first) },
        ] = txn.responses.as_slice()
        else {
            return Err(uncertain(
                reply.wrong("a create transaction without its two ranges"),
            ));
        };
        let Some(owner) = first.kvs.first() else {
            return Err(uncertain(
                reply.wrong("a create transaction that found no key under its prefix"),
            ));
        };
        let revision = txn.header.revision;
        Ok(Creation::Created(Created {
            // The transaction wrote one key, so its revision created it.
            create_revision: revision,
            revision,
            position: u64::try_from(count.count)
                .map_err(|_| uncertain(reply.wrong(format!("a count of {}", count.count))))?,
            owner: owner.clone(),
        }))
    }

    /// Writes `value` to `key` on `lease` if the key exists, keeping its
    /// create revision (its place).
    pub async fn rewrite(
        &self,
        key: &[u8],
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Rewrite, Error> {
        let body = json!({
            "compare": [exists(key)],
            "success": [{ "request_put": {
                "key": BASE64.encode(key),
                "value": BASE64.encode(value),
                "lease": lease.0.to_string(),
            }}],
            "failure": [],
        });
        let reply = self.call("/v3/kv/txn", &body, Retry::IfUnsent).await?;
        let txn: TxnJson = reply.decode("a rewrite transaction")?;
        Ok(if txn.succeeded {
            Rewrite::Rewritten {
                revision: txn.header.revision,
            }
        } else {
            Rewrite::Missing
        })
    }

    /// Deletes `key`. Sent again on failure: a key is one entry's, and
    /// deleting it twice deletes it once. So `existed` is false also when
    /// an earlier attempt of this call deleted the key and its answer was
    /// lost: either way, the key is gone.
    pub async fn delete(&self, key: &[u8]) -> Result<Deleted, Error> {
        let reply = self
            .call(
                "/v3/kv/deleterange",
                &json!({ "key": BASE64.encode(key) }),
                Retry::Always,
            )
            .await?;
        let deleted: DeleteJson = reply.decode("a delete")?;
        Ok(Deleted {
            revision: deleted.header.revision,
            existed: deleted.deleted > 0,
        })
    }

    /// Deletes `key` and, in the same transaction (one revision, so one
    /// watch message), puts `reason` at `reason_key` on `lease`: a watcher
    /// reads why the key left beside its delete. Only if `key` is there,
    /// so that a reason is never written for a key that had already gone;
    /// which also makes sending it twice harmless for a key not created
    /// again (an entry's is not), so it is sent again on failure (and
    /// `existed` is false when an earlier attempt did it and its answer was
    /// lost).
    pub async fn delete_with_reason(
        &self,
        key: &[u8],
        reason_key: &[u8],
        reason: &[u8],
        lease: LeaseId,
    ) -> Result<Deleted, Error> {
        let body = json!({
            "compare": [exists(key)],
            "success": [
                { "request_delete_range": { "key": BASE64.encode(key) }},
                { "request_put": {
                    "key": BASE64.encode(reason_key),
                    "value": BASE64.encode(reason),
                    "lease": lease.0.to_string(),
                }},
            ],
            "failure": [],
        });
        let reply = self.call("/v3/kv/txn", &body, Retry::Always).await?;
        let txn: TxnJson = reply.decode("a delete with its reason")?;
        Ok(Deleted {
            revision: txn.header.revision,
            existed: txn.succeeded,
        })
    }

    /// Deletes each of `kvs` that is still as it was read (the same mod
    /// revision), and returns how many were deleted. One not there any
    /// more, or written again since, is left alone; so the call is sent
    /// again on failure, an attempt that arrives late deleting nothing
    /// new. A transaction deletes at most [`MAX_TXN_OPS`] keys; a chunk in
    /// which one key fails its check is deleted a key at a time.
    pub async fn delete_unchanged(&self, kvs: &[Kv]) -> Result<usize, Error> {
        let mut deleted = 0;
        for chunk in kvs.chunks(MAX_TXN_OPS) {
            if self.delete_chunk(chunk).await? {
                deleted += chunk.len();
                continue;
            }
            for kv in chunk {
                if self.delete_chunk(std::slice::from_ref(kv)).await? {
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }

    /// One transaction: every key of `kvs` deleted, if each is still at
    /// the mod revision read. Whether it succeeded.
    async fn delete_chunk(&self, kvs: &[Kv]) -> Result<bool, Error> {
        let compare: Vec<Value> = kvs
            .iter()
            .map(|kv| {
                json!({
                    "key": BASE64.encode(&kv.key),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": kv.mod_revision.to_string(),
                })
            })
            .collect();
        let success: Vec<Value> = kvs
            .iter()
            .map(|kv| json!({ "request_delete_range": { "key": BASE64.encode(&kv.key) }}))
            .collect();
        let body = json!({ "compare": compare, "success": success, "failure": [] });
        let reply = self.call("/v3/kv/txn", &body, Retry::Always).await?;
        let txn: TxnJson = reply.decode("a delete of unchanged keys")?;
        Ok(txn.succeeded)
    }

    /// Moves each of `kvs` to `lease`, keeping its value and its create
    /// revision (its place), if it is still the key that was read, on the
    /// lease it was read on: one not there any more, deleted and created
    /// again since, or moved by someone else meanwhile, is left alone. So
    /// the move is sent again on failure: an attempt that reaches etcd
    /// late, after the keys moved on, finds them on another lease and does
    /// nothing. A transaction moves at most half of [`MAX_TXN_OPS`] keys
    /// (two checks each); a chunk in which one key fails its checks is
    /// moved a key at a time.
    pub async fn move_to_lease(&self, kvs: &[Kv], lease: LeaseId) -> Result<Moved, Error> {
        let mut moved = Moved::default();
        for chunk in kvs.chunks(MAX_TXN_OPS / 2) {
            if self.move_chunk(chunk, lease).await? {
                moved.moved += chunk.len();
                continue;
            }
            for kv in chunk {
                if self.move_chunk(std::slice::from_ref(kv), lease).await? {
                    moved.moved += 1;
                } else {
                    moved.missing.push(kv.key.clone());
                }
            }
        }
        Ok(moved)
    }

    /// One transaction: every key of `kvs` to `lease`, if each is still
    /// the incarnation read, on the lease read. Whether it succeeded.
    async fn move_chunk(&self, kvs: &[Kv], lease: LeaseId) -> Result<bool, Error> {
        let compare: Vec<Value> = kvs
            .iter()
            .flat_map(|kv| {
                let key = BASE64.encode(&kv.key);
                [
                    json!({
                        "key": key,
                        "target": "CREATE",
                        "result": "EQUAL",
                        "create_revision": kv.create_revision.to_string(),
                    }),
                    json!({
                        "key": key,
                        "target": "LEASE",
                        "result": "EQUAL",
                        "lease": kv.lease.to_string(),
                    }),
                ]
            })
            .collect();
        // ignore_value: the value stays whatever it is now, so a rewrite
        // that came between the read and the move is not undone.
        let success: Vec<Value> = kvs
            .iter()
            .map(|kv| {
                json!({ "request_put": {
                    "key": BASE64.encode(&kv.key),
                    "lease": lease.0.to_string(),
                    "ignore_value": true,
                }})
            })
            .collect();
        let body = json!({ "compare": compare, "success": success, "failure": [] });
        let reply = self.call("/v3/kv/txn", &body, Retry::Always).await?;
        let txn: TxnJson = reply.decode("a move to another lease")?;
        Ok(txn.succeeded)
    }

    /// `key` as it is now, if it is there, and the revision it was read at.
    /// Only that key: not the keys it is a prefix of.
    pub async fn get(&self, key: &[u8]) -> Result<(i64, Option<Kv>), Error> {
        let body = json!({ "key": BASE64.encode(key) });
        let reply = self.call("/v3/kv/range", &body, Retry::Always).await?;
        let range: RangeJson = reply.decode("a read of one key")?;
        let kv = range.kvs.into_iter().find(|kv| kv.key == key);
        Ok((range.header.revision, kv))
    }

    /// Every key under `prefix`, in order of creation, and the revision
    /// they were read at (to watch from the next one).
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<(i64, Vec<Kv>), Error> {
        let body = json!({
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(prefix_end(prefix)),
            "sort_target": "CREATE",
            "sort_order": "ASCEND",
        });
        let reply = self.call("/v3/kv/range", &body, Retry::Always).await?;
        let range: RangeJson = reply.decode("a range")?;
        Ok((range.header.revision, range.kvs))
    }

    /// Watches every key under `prefix` from `start_revision` on (0: from
    /// now). Returns once etcd has confirmed the watch, within R of the
    /// endpoint that did.
    pub async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<Watch, Error> {
        let body = Bytes::from(
            json!({ "create_request": {
                "key": BASE64.encode(prefix),
                "range_end": BASE64.encode(prefix_end(prefix)),
                "start_revision": start_revision.to_string(),
            }})
            .to_string(),
        );
        let mut failures = Vec::new();
        for index in self.order() {
            let endpoint = &self.endpoints[index];
            let deadline = Instant::now() + self.attempt_timeout;
            let attempt = async {
                // A connection of its own, held for as long as the watch.
                let mut sender = endpoint.connect().await.map_err(Failure::Unsent)?;
                let response = sender
                    .send_request(endpoint.request("/v3/watch", body.clone())?)
                    .await
                    .map_err(|source| Failure::Lost(endpoint.http(source)))?;
                let status = response.status();
                let mut watch = Watch {
                    endpoint: endpoint.url.clone(),
                    body: response.into_body(),
                    buffer: Vec::new(),
                    scanned: 0,
                    _sender: sender,
                };
                if status != StatusCode::OK {
                    let body = watch.read_rest().await.map_err(Failure::Lost)?;
                    return Err(classify(etcd_error(&endpoint.url, status, &body)));
                }
                // The first line says whether the watch was made.
                let line = watch.line().await.map_err(Failure::Lost)?;
                let Some(line) = line else {
                    return Err(Failure::Lost(
                        watch.wrong("the watch ended before it began"),
                    ));
                };
                let first: StreamJson<WatchJson> = serde_json::from_slice(&line)
                    .map_err(|error| Failure::Lost(watch.wrong(format!("a watch: {error}"))))?;
                if let Some(error) = first.error {
                    return Err(classify(error.into_error(&endpoint.url)));
                }
                match first.result {
                    // etcd confirms a watch it refused at once (an empty
                    // range, no permission) as created and canceled both,
                    // and then keeps the reply open, silent.
                    Some(result) if result.created && result.canceled => {
                        Err(Failure::Answered(Error::WatchCanceled {
                            endpoint: endpoint.url.clone(),
                            reason: result.cancel_reason,
                        }))
                    }
                    Some(result) if result.created && result.compact_revision > 0 => {
                        Err(Failure::Answered(Error::WatchCanceled {
                            endpoint: endpoint.url.clone(),
                            reason: format!("compacted up to revision {}", result.compact_revision),
                        }))
                    }
                    Some(result) if result.created => Ok(watch),
                    _ => Err(Failure::Lost(
                        watch.wrong("a watch whose first message is not its creation"),
                    )),
                }
            };
            let outcome = match timeout_at(deadline, attempt).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Failure::Lost(Error::Timeout {
                    endpoint: endpoint.url.clone(),
                    after: self.attempt_timeout,
                })),
            };
            match outcome {
                Ok(watch) => return Ok(watch),
                Err(Failure::Answered(error)) => return Err(error),
                Err(Failure::Unsent(error) | Failure::Lost(error)) => {
                    self.move_on(index);
                    failures.push(error);
                }
            }
        }
        Err(Error::Unavailable { failures })
    }

    /// The endpoints in the order a call tries them: the current one first.
    fn order(&self) -> impl Iterator<Item = usize> + use<> {
        let count = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed);
        (0..count).map(move |step| (first + step) % count)
    }

    /// Moves the current endpoint past the one at `url`, as
    /// [`Gateway::move_on`] does.
    fn move_on_from(&self, url: &str) {
        if let Some(index) = self
            .endpoints
            .iter()
            .position(|endpoint| endpoint.url == url)
        {
            self.move_on(index);
        }
    }

    /// Moves the current endpoint past `failed`, unless another call has
    /// moved it already.
    fn move_on(&self, failed: usize) {
        let next = (failed + 1) % self.endpoints.len();
        let _ = self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// POSTs `body` to `path`, trying the endpoints in turn as `retry`
    /// allows.
    async fn call(&self, path: &str, body: &Value, retry: Retry) -> Result<Reply, Error> {
        let body = Bytes::from(body.to_string());
        let mut failures = Vec::new();
        for index in self.order() {
            match self.attempt(index, path, body.clone()).await {
                Ok(reply) => return Ok(reply),
                Err(Failure::Answered(error)) => return Err(error),
                Err(Failure::Unsent(error)) => {
                    self.move_on(index);
                    failures.push(error);
                }
                Err(Failure::Lost(error)) => {
                    self.move_on(index);
                    if retry == Retry::IfUnsent {
                        return Err(Error::Uncertain {
                            failure: Box::new(error),
                        });
                    }
                    failures.push(error);
                }
            }
        }
        Err(Error::Unavailable { failures })
    }

    /// One attempt at one endpoint, within R.
    async fn attempt(&self, index: usize, path: &str, body: Bytes) -> Result<Reply, Failure> {
        let endpoint = &self.endpoints[index];
        let deadline = Instant::now() + self.attempt_timeout;
        let timeout = || Error::Timeout {
            endpoint: endpoint.url.clone(),
            after: self.attempt_timeout,
        };
        let mut sender = match timeout_at(deadline, endpoint.sender()).await {
            Ok(Ok(sender)) => sender,
            Ok(Err(error)) => return Err(Failure::Unsent(error)),
            Err(_) => return Err(Failure::Unsent(timeout())),
        };
        let request = endpoint.request(path, body)?;
        let exchange = async {
            let response = match sender.try_send_request(request).await {
                Ok(response) => response,
                Err(mut error) => {
                    let unsent = error.take_message().is_some();
                    let error = endpoint.http(error.into_error());
                    return Err(if unsent {
                        Failure::Unsent(error)
                    } else {
                        Failure::Lost(error)
                    });
                }
            };
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_REPLY)
                .collect()
                .await
                .map_err(|error| {
                    Failure::Lost(match error.downcast::<hyper::Error>() {
                        Ok(source) => endpoint.http(*source),
                        Err(error) => Error::Reply {
                            endpoint: endpoint.url.clone(),
                            detail: error.to_string(),
                        },
                    })
                })?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(classify(etcd_error(&endpoint.url, status, &body)));
            }
            Ok(body)
        };
        let body = match timeout_at(deadline, exchange).await {
            Ok(Ok(body)) => body,
            Ok(Err(failure)) => return Err(failure),
            Err(_) => return Err(Failure::Lost(timeout())),
        };
        // The exchange ended cleanly: the connection may serve the next.
        endpoint.put_back(sender);
        Ok(Reply {
            endpoint: endpoint.url.clone(),
            body,
        })
    }
}

/// An etcd error reply is final, unless it says that this member cannot
/// serve now: then the next member may.
fn classify(error: Error) -> Failure {
    match error {
        Error::Etcd { code, .. } if code == GRPC_UNAVAILABLE || code == GRPC_DEADLINE_EXCEEDED => {
            Failure::Lost(error)
        }
        error => Failure::Answered(error),
    }
}

/// The error a non-200 reply carries.
fn etcd_error(endpoint: &str, status: StatusCode, body: &[u8]) -> Error {
    let parsed: Result<ErrorJson, _> = serde_json::from_slice(body);
    match parsed {
        Ok(error) => error.into_error(endpoint).with_status(status),
        Err(_) => Error::Etcd {
            endpoint: endpoint.to_owned(),
            status: status.as_u16(),
            code: 0,
            message: String::from_utf8_lossy(body).trim().to_owned(),
        },
    }
}

impl Error {
    fn with_status(mut self, status: StatusCode) -> Error {
        if let Error::Etcd { status: slot, .. } = &mut self {
            *slot = status.as_u16();
        }
        self
    }
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, Error> {
        let refuse = |reason| Error::Endpoint {
            url: url.to_owned(),
            reason,
        };
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(refuse(if url.starts_with("https://") {
                "TLS is not supported yet; use http://"
            } else {
                "an etcd endpoint is http://host:port"
            }));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let authority: Authority = rest.parse().map_err(|_| refuse("not host:port"))?;
        if authority.port_u16().is_none() || authority.as_str().contains('@') {
            return Err(refuse(
                "an etcd endpoint is http://host:port, with its port",
            ));
        }
        Ok(Endpoint {
            url: url.to_owned(),
            authority: authority.as_str().to_owned(),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle connection that is still open, or a new one.
    async fn sender(&self) -> Result<Sender, Error> {
        loop {
            let idle = match self.idle.lock() {
                Ok(mut idle) => idle.pop(),
                Err(poisoned) => poisoned.into_inner().pop(),
            };
            match idle {
                Some(sender) if sender.is_ready() && !sender.is_closed() => return Ok(sender),
                Some(_) => continue,
                None => return self.connect().await,
            }
        }
    }

    fn put_back(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        match self.idle.lock() {
            Ok(mut idle) => idle.push(sender),
            Err(poisoned) => poisoned.into_inner().push(sender),
        }
    }

    async fn connect(&self) -> Result<Sender, Error> {
        let connect_error = |source| Error::Connect {
            endpoint: self.url.clone(),
            source,
        };
        let stream = TcpStream::connect(self.authority.as_str())
            .await
            .map_err(connect_error)?;
        stream.set_nodelay(true).map_err(connect_error)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| self.http(source))?;
        // Ends when the sender is dropped or the member closes the
        // connection; its error is the sender's to report.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn request(&self, path: &str, body: Bytes) -> Result<Request<Full<Bytes>>, Failure> {
        Request::post(path)
            .header(HOST, self.authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|_| {
                Failure::Unsent(Error::Endpoint {
                    url: self.url.clone(),
                    reason: "not a valid request target",
                })
            })
    }

    fn http(&self, source: hyper::Error) -> Error {
        Error::Http {
            endpoint: self.url.clone(),
            source,
        }
    }
}

/// A watch of a prefix: the messages of one long reply, read as they come.
pub struct Watch {
    endpoint: String,
    body: Incoming,
    /// What has come of the next line so far.
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no newline: a long message
    /// arriving in many chunks is scanned once, not once per chunk.
    scanned: usize,
    /// The connection, kept open for as long as the watch.
    _sender: Sender,
}

impl Watch {
    /// The endpoint this watch reads from.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The next message with events, or the news that the start revision
    /// was compacted; `None` when the member ended the reply (watch again
    /// from the revision after the last one seen). Confirmations and
    /// progress notes without events are skipped.
    ///
    /// It waits for as long as nothing changes, with no timeout of its own,
    /// so a member that stops answering holds it silently: whoever watches
    /// must watch again (on the next endpoint) when the renewals show the
    /// member gone.
    pub async fn next(&mut self) -> Result<Option<WatchMessage>, Error> {
        loop {
            let Some(line) = self.line().await? else {
                return Ok(None);
            };
            let message: StreamJson<WatchJson> = serde_json::from_slice(&line)
                .map_err(|error| self.wrong(format!("a watch message: {error}")))?;
            if let Some(error) = message.error {
                return Err(error.into_error(&self.endpoint));
            }
            let Some(result) = message.result else {
                return Err(self.wrong("a watch message without a result"));
            };
            if result.compact_revision > 0 {
                return Ok(Some(WatchMessage::Compacted {
                    compact_revision: result.compact_revision,
                }));
            }
            if result.canceled {
                return Err(Error::WatchCanceled {
                    endpoint: self.endpoint.clone(),
                    reason: if result.cancel_reason.is_empty() {
                        "no reason given".into()
                    } else {
                        result.cancel_reason
                    },
                });
            }
            if result.events.is_empty() {
                continue;
            }
            let events: Vec<Event> = result
                .events
                .into_iter()
                .map(|event| {
                    if event.is_delete() {
                        Event::Delete {
                            key: event.kv.key,
                            revision: event.kv.mod_revision,
                        }
                    } else {
                        Event::Put(event.kv)
                    }
                })
                .collect();
            // The header names the store's revision, which may be later
            // than this message's last event when a watch catches up in
            // several messages: resuming after it would skip the rest.
            let revision = events.iter().map(Event::revision).max().unwrap_or_default();
            return Ok(Some(WatchMessage::Events { revision, events }));
        }
    }

    /// The next non-empty line of the reply, or `None` at its end.
    async fn line(&mut self) -> Result<Option<Vec<u8>>, Error> {
        loop {
            let unscanned = self.buffer.get(self.scanned..).unwrap_or_default();
            if let Some(at) = unscanned.iter().position(|&byte| byte == b'\n') {
                let end = self.scanned + at;
                self.scanned = 0;
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            self.scanned = self.buffer.len();
            if self.buffer.len() > MAX_WATCH_LINE {
                return Err(self.wrong(format!(
                    "a watch message longer than {MAX_WATCH_LINE} bytes"
                )));
            }
            match self.body.frame().await {
                None if self.buffer.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                // The last line, without its newline.
                None => return Ok(Some(std::mem::take(&mut self.buffer))),
                Some(Err(source)) => {
                    return Err(Error::Http {
                        endpoint: self.endpoint.clone(),
                        source,
                    });
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// The rest of the reply, for an error's message.
    async fn read_rest(&mut self) -> Result<Vec<u8>, Error> {
        while let Some(frame) = self.body.frame().await {
            let frame = frame.map_err(|source| Error::Http {
                endpoint: self.endpoint.clone(),
                source,
            })?;
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
        Ok(std::mem::take(&mut self.buffer))
    }

    fn wrong(&self, detail: impl Into<String>) -> Error {
        Error::Reply {
            endpoint: self.endpoint.clone(),
            detail: detail.into(),
        }
    }
}

/// A transaction's check that `key` is there.
fn exists(key: &[u8]) -> Value {
    json!({
        "key": BASE64.encode(key),
        "target": "VERSION",
        "result": "GREATER",
        "version": "0",
    })
}

/// The end of the range of keys that start with `prefix`: the prefix with
/// its last byte below 0xff raised by one, and what follows it dropped;
/// `\0` (every key) when there is no such byte.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

// The gateway's JSON, as far as these calls read it.

#[derive(Debug, Default, Deserialize)]
struct HeaderJson {
    #[serde(default, deserialize_with = "int64")]
    revision: i64,
}

/// A streaming call's reply: `{"result": …}` or `{"error": …}`.
#[derive(Debug, Deserialize)]
struct StreamJson<T> {
    result: Option<T>,
    error: Option<ErrorJson>,
}

#[derive(Debug, Deserialize)]
struct ErrorJson {
    #[serde(default, alias = "grpc_code")]
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    http_code: u16,
}

impl ErrorJson {
    fn into_error(self, endpoint: &str) -> Error {
        Error::Etcd {
            endpoint: endpoint.to_owned(),
            status: self.http_code,
            code: self.code,
            message: if self.message.is_empty() {
                self.error
            } else {
                self.message
            },
        }
    }
}

#[derive(Debug, Deserialize)]
struct LeaseJson {
    #[serde(rename = "ID", default, deserialize_with = "int64")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "int64")]
    ttl: i64,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TxnJson {
    #[serde(default)]
    header: HeaderJson,
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<ResponseJson>,
}

#[derive(Debug, Deserialize)]
struct ResponseJson {
    #[serde(default, rename = "response_range")]
    range: Option<RangeJson>,
}

#[derive(Debug, Deserialize)]
struct RangeJson {
    #[serde(default)]
    header: HeaderJson,
    #[serde(default)]
    kvs: Vec<Kv>,
    #[serde(default, deserialize_with = "int64")]
    count: i64,
}

#[derive(Debug, Deserialize)]
struct DeleteJson {
    #[serde(default)]
    header: HeaderJson,
    #[serde(default, deserialize_with = "int64")]
    deleted: i64,
}

#[derive(Debug, Deserialize)]
struct WatchJson {
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<EventJson>,
}

#[derive(Debug, Deserialize)]
struct EventJson {
    /// Absent for a put (protobuf leaves the default out).
    #[serde(default, rename = "type")]
    kind: Option<Value>,
    #[serde(default = "empty_kv")]
    kv: Kv,
}

impl EventJson {
    fn is_delete(&self) -> bool {
        match &self.kind {
            Some(Value::String(kind)) => kind == "DELETE",
            Some(Value::Number(kind)) => kind.as_i64() == Some(1),
            _ => false,
        }
    }
}

fn empty_kv() -> Kv {
    Kv {
        key: Vec::new(),
        value: Vec::new(),
        create_revision: 0,
        mod_revision: 0,
        version: 0,
        lease: 0,
    }
}

/// An int64, which the gateway writes as a string (a number is taken too).
fn int64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int64 {
        Text(String),
        Number(i64),
    }
    match Int64::deserialize(deserializer)? {
        Int64::Number(number) => Ok(number),
        Int64::Text(text) => text
            .parse()
            .map_err(|_| D::Error::custom(format!("{text:?} is not an int64"))),
    }
}

/// Bytes, which the gateway writes as base64.
fn base64_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    BASE64
        .decode(text.as_bytes())
        .map_err(|error| D::Error::custom(format!("not base64: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_raises_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn endpoints_are_http_with_a_port() {
        assert!(Endpoint::parse("http://127.0.0.1:2379").is_ok());
        assert!(Endpoint::parse("http://etcd-1:2379/").is_ok());
        assert!(Endpoint::parse("https://127.0.0.1:2379").is_err());
        assert!(Endpoint::parse("http://127.0.0.1").is_err());
        assert!(Endpoint::parse("127.0.0.1:2379").is_err());
    }

    #[test]
    fn the_gateway_json_decodes_and_bad_json_is_an_error() {
        let message: StreamJson<WatchJson> = serde_json::from_str(
            r#"{"result":{"header":{"revision":"7"},"events":[
                {"kv":{"key":"YQ==","value":"eA==","create_revision":"5","mod_revision":"7","version":"2","lease":"9"}},
                {"type":"DELETE","kv":{"key":"Yg==","mod_revision":"7"}}]}}"#,
        )
        .expect("a watch message");
        let result = message.result.expect("a result");
        assert_eq!(result.events[1].kv.mod_revision, 7);
        assert!(!result.events[0].is_delete());
        assert!(result.events[1].is_delete());
        assert_eq!(result.events[0].kv.key, b"a");
        assert_eq!(result.events[0].kv.create_revision, 5);
        assert!(serde_json::from_str::<RangeJson>(r#"{"count":"x"}"#).is_err());
        assert!(serde_json::from_str::<RangeJson>(r#"{"kvs":[{"key":"%%"}]}"#).is_err());
    }

    /// Answers one HTTP request on `listener` with `body`, whatever it
    /// asks.
    async fn answer_once(listener: tokio::net::TcpListener, body: &'static str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, _) = listener.accept().await.expect("a connection");
        let mut request = Vec::new();
        let mut buffer = [0; 4096];
        // The request's headers, then as much of its body as they say.
        loop {
            let read = stream.read(&mut buffer).await.expect("a request");
            assert!(read > 0, "the request ended early");
            request.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|value| value.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if request.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(reply.as_bytes()).await.expect("a reply");
        stream.flush().await.expect("a reply");
    }

    /// A create whose reply says the transaction went through but cannot
    /// be read is uncertain, not refused: its key may show.
    #[tokio::test]
    async fn a_create_that_succeeded_with_a_reply_that_does_not_decode_is_uncertain() {
        let replies = [
            r#"{"header":{"revision":"5"},"succeeded":true,"responses":[{}]}"#,
            r#"{"header":{"revision":"5"},"succeeded":true,"responses":[{},{"response_range":{"count":"1"}},{"response_range":{}}]}"#,
            r#"{"header":{"revision":"5"},"succeeded":tru"#,
        ];
        for body in replies {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a port");
            let address = listener.local_addr().expect("an address");
            let server = tokio::spawn(answer_once(listener, body));
            let gateway =
                Gateway::new([format!("http://{address}")], Duration::from_secs(2)).expect("a url");
            let result = gateway
                .create_if_absent(b"/p/t/", b"/p/t/a", b"{}", LeaseId(7))
                .await;
            assert!(
                matches!(&result, Err(Error::Uncertain { failure }) if matches!(**failure, Error::Reply { .. })),
                "{body}: {result:?}"
            );
            server.await.expect("the server answered");
        }
    }
}
