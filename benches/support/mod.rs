//! What the scenarios in `benches/presence.rs` stand on: the child
//! processes they time, the daemon they drive, etcd and the daemons of a
//! cluster, deadlines, and statistics.

pub mod children;
pub mod cluster;
pub mod daemon;
pub mod dbus;
pub mod ideal;
pub mod load;
pub mod stats;

use std::time::Duration;

use anyhow::anyhow;

/// How long any one trial may take. A passing trial takes well under a
/// millisecond; one that reaches this is stuck, and the run fails loudly
/// rather than hang or report a number that means nothing.
pub const TRIAL_DEADLINE: Duration = Duration::from_secs(5);

/// How often a wait for something nothing announces (a waiter blocking in
/// `flock`) looks again. Only ever between timed steps, never inside one.
pub const POLL: Duration = Duration::from_millis(1);

/// Awaits `future`, failing with `what` at [`TRIAL_DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(TRIAL_DEADLINE, future)
        .await
        .map_err(|_| anyhow!("timed out after {TRIAL_DEADLINE:?} waiting for {what}"))
}
