//! `status`: what the daemon holds and how it runs. The core counts what
//! the registry holds; its driver adds what only it knows (the queues, the
//! store, how it was started) and writes the reply.

use serde::{Deserialize, Serialize};

use super::{Answer, At, OpSpec, RollBack, System};
use crate::protocol::{Empty, ErrorBody};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub version: String,
    pub protocol: u32,
    pub pid: u32,
    pub uptime_ms: u64,
    pub socket: String,
    pub db: String,
    pub db_recovered: Option<String>,
    pub topics: usize,
    pub entries: usize,
    pub connections: usize,
    pub subscriptions: usize,
    pub pid_watch: String,
    /// Entries restored at start that no client has resumed yet.
    pub awaiting_resume: usize,
    /// Transactions committed since the daemon started; with group commit,
    /// fewer than the changes they saved. 0 from a daemon that predates it.
    #[serde(default)]
    pub transactions: u64,
    /// Bytes waiting to be written to clients, over all connections, and
    /// the most any one connection has waiting: a reader that stops
    /// reading shows here. Diffs stop being queued past `--max-outbound`,
    /// but replies, the states that follow subscriptions, roles and fresh
    /// states never drop, so one reader may hold more. 0 from a daemon
    /// that predates them.
    #[serde(default)]
    pub outbound_bytes: usize,
    #[serde(default)]
    pub largest_outbound_bytes: usize,
    /// What every connection's queue may hold together
    /// (`--max-outbound-total`); past it, large requests wait and the
    /// connections that have stopped reading are closed, those holding the
    /// most first. 0 from a daemon that predates it.
    #[serde(default)]
    pub outbound_budget_bytes: usize,
    /// How the daemon was started: `autostart` (by a client, on demand),
    /// `systemd` (socket activation or a notify service) or `foreground`
    /// (`presence daemon` run by hand). `None` from a daemon that predates
    /// it.
    #[serde(default)]
    pub started_by: Option<String>,
    /// How the daemon takes part in a cluster of hosts sharing topics
    /// through etcd; absent from a daemon that shares none, so that its
    /// reply is what it always was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// Where a daemon that shares topics through etcd stands with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This host's name, which its entries' refs carry (`HOST:pN`).
    pub host: String,
    /// Where its keys live in etcd.
    pub prefix: String,
    /// The patterns of the topics it shares.
    pub topics: Vec<String>,
    /// Every etcd member it was given, in order.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The etcd member its next call goes to.
    pub endpoint: String,
    /// Its lease: `live` (held; its entries may own), `fenced` (etcd may
    /// end it at any moment, so none of its entries owns), `granting`
    /// (none yet, or the last one ended and a new one is asked for), or
    /// `stopped` (no longer kept: the daemon is stopping, or cluster mode
    /// was refused, `last_error` says why).
    pub lease: String,
    /// The lease's id as etcd numbers it, in hex as `etcdctl` shows it.
    #[serde(default)]
    pub lease_id: Option<String>,
    /// How long ago the last renewal etcd acknowledged was sent (the
    /// lease's grant, before the first); while a lease is held, live or
    /// fenced.
    #[serde(default)]
    pub renewed_ms_ago: Option<u64>,
    /// How long until the fence falls unless a renewal is answered first;
    /// only while the lease is live.
    #[serde(default)]
    pub fence_in_ms: Option<u64>,
    /// The last failure talking to etcd, until a call succeeds again; or
    /// why cluster mode stopped.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The etcd revision other hosts' changes have been read up to; none
    /// before the first listing.
    #[serde(default)]
    pub revision: Option<u64>,
    /// The member whose watch brings other hosts' changes, if one does.
    #[serde(default)]
    pub watching: Option<String>,
    /// Writes of this host's entries handed to etcd and not yet answered,
    /// with those waiting behind an earlier write to the same key.
    #[serde(default)]
    pub writes_in_flight: usize,
}

pub struct Status;

impl OpSpec for Status {
    type Wire = Empty;
    type Resolved = Empty;
    /// Asked again, it counts what the rolled-back registry holds, which is
    /// what is committed.
    const ON_ROLL_BACK: RollBack = RollBack::AskAgain;

    fn resolve(wire: Empty, _: &mut dyn System) -> Result<Empty, ErrorBody> {
        Ok(wire)
    }

    fn answer(_: Empty, _: &mut At<'_>) -> Answer {
        Answer::Status
    }
}
