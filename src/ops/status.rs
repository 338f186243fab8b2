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
