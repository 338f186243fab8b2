//! Topics shared across hosts through etcd: [`gateway`] talks to etcd's
//! JSON gateway over HTTP/1.1, with the typed calls the cluster design
//! needs (a lease and its renewals, an entry created only if absent with
//! its place in its topic's queue, a rewrite that keeps that place, a
//! listing and a watch of a prefix); [`lease`] keeps the daemon's one
//! lease alive and fences it by the boot clock before etcd could end it;
//! [`record`] is how an entry is written there (its key and value) and
//! which topics are shared; [`mirror`] keeps a copy of everything under
//! one prefix current, from a listing and a watch, and reports each
//! change; [`bridge`] runs that mirror over the whole prefix and turns
//! each change into the core's input (each entry's decoded value, each
//! delete with the reason its host wrote beside it); and [`node`] runs
//! them all for the daemon, with the writer that carries the core's
//! writes to etcd, and claims this host's name. [`ClusterConfig`] is what
//! `presence daemon`'s cluster options say; docs/cluster.md gives the
//! design, and the fencing argument `lease` keeps.

pub mod bridge;
pub mod gateway;
pub mod lease;
pub mod mirror;
pub mod node;
pub mod record;

use std::time::Duration;

pub use bridge::{
    Bridge, BridgeSettings, BridgeStatus, Oddity, OddityKind, Translation, translate,
};
pub use gateway::{
    Created, Creation, Deleted, Error, Event, Gateway, Kv, Lease, LeaseId, MAX_TXN_OPS, Moved,
    Renewal, Rewrite, Watch, WatchMessage,
};
pub use lease::{LeaseKeeper, LeaseSettings, LeaseState, LeaseStatus};
pub use mirror::{PrefixMirror, Snapshot, Update};
pub use node::{Claimant, ClusterNode, ClusterProbe};
pub use record::SharedTopics;

/// The prefix every host's keys live under unless `--cluster-prefix`
/// says otherwise.
pub const DEFAULT_PREFIX: &str = "/presenced/";

/// How this daemon takes part in a cluster, as `presence daemon`'s
/// cluster options say; checked whole by [`ClusterConfig::new`], so that a
/// daemon given settings that could not work stops before it starts.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd's members' client URLs, `http://host:port`.
    pub endpoints: Vec<String>,
    /// The patterns of the shared topics, as given (for `status`).
    pub patterns: Vec<String>,
    pub shared: SharedTopics,
    /// This host's name, unique in the cluster: its entries' refs carry it.
    pub host: String,
    /// Where every key lives; several clusters may share one etcd.
    pub prefix: String,
    pub lease: LeaseSettings,
    /// R: how long one attempt on one member may take.
    pub attempt_timeout: Duration,
}

impl ClusterConfig {
    /// Checks every setting: the endpoints' form, the patterns, the host
    /// name, the prefix, and that the lease's times keep the fence's
    /// promise ([`LeaseSettings::check`]). The error is one line.
    pub fn new(
        endpoints: Vec<String>,
        patterns: Vec<String>,
        host: String,
        prefix: String,
        lease: LeaseSettings,
        attempt_timeout: Duration,
    ) -> Result<ClusterConfig, String> {
        if patterns.is_empty() {
            return Err(
                "--etcd needs at least one --cluster-topics pattern: the topics to share".into(),
            );
        }
        let shared = SharedTopics::new(&patterns)?;
        crate::protocol::check_host(&host).map_err(|problem| format!("--host: {problem}"))?;
        if prefix.is_empty() || prefix.chars().any(char::is_control) {
            return Err(format!(
                "--cluster-prefix must be a non-empty key prefix without control characters, \
                 not {prefix:?}"
            ));
        }
        // The gateway reads the endpoints' form; it connects to nothing yet.
        Gateway::new(&endpoints, attempt_timeout).map_err(|error| error.to_string())?;
        lease.check(attempt_timeout)?;
        Ok(ClusterConfig {
            endpoints,
            patterns,
            shared,
            host,
            prefix,
            lease,
            attempt_timeout,
        })
    }
}
