//! What failed commits leave behind: the facts not yet saved, and the
//! outage they belong to, which decides when to retry and how loudly to
//! log.

use std::time::{Duration, Instant};

use super::registry::{ClusterInput, ConnId, ProcessId};
use super::{CommitFailed, FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE, OUTAGE_REPORT_EVERY, Origin};

/// Something that happened outside the core. Unlike a request, nobody will
/// send it again if its batch fails to commit, so the core keeps it and
/// applies it again until a commit takes it.
#[derive(Debug)]
pub(super) enum Fact {
    Closed(ConnId),
    /// A connection closed by its process's exit.
    ClosedByExit(ConnId),
    ProcessExited(ProcessId),
    Resync {
        conn: ConnId,
        topics: Vec<String>,
        all: bool,
    },
    /// A row that did not survive the restart but could not be deleted at
    /// start (see [`super::Core::restore`]). The registry never held it.
    DeadRow(String),
    /// What etcd's watch showed of shared topics, or how it answered a
    /// write: etcd keeps it whatever becomes of the commit, so it is
    /// applied again to the rolled-back registry.
    Cluster(ClusterInput),
}

/// What failed commits leave to do: the facts not yet saved, and when to
/// try them again on their own.
#[derive(Default)]
pub(super) struct Recovery {
    pub(super) facts: Vec<Fact>,
    /// Set from a failed commit until one succeeds.
    pub(super) outage: Option<Outage>,
}

/// A run of failed commits, from the first until one succeeds.
pub(super) struct Outage {
    pub(super) began: Instant,
    pub(super) failures: u64,
    pub(super) pause: Duration,
    pub(super) retry_at: Instant,
    /// When a failure was last logged above debug level, and how many
    /// failed since.
    pub(super) reported_at: Instant,
    pub(super) unreported: u64,
}

impl Outage {
    pub(super) fn new(now: Instant) -> Outage {
        Outage {
            began: now,
            failures: 1,
            pause: FIRST_RETRY_PAUSE,
            retry_at: now + FIRST_RETRY_PAUSE,
            reported_at: now,
            unreported: 0,
        }
    }

    /// Each failed retry of its own doubles the core's pause. A failed
    /// batch of inputs leaves the pause alone, so busy clients cannot
    /// hold the retries off.
    pub(super) fn failed_again(&mut self, origin: Origin, now: Instant) {
        self.failures += 1;
        if origin == Origin::Upkeep {
            self.pause = (self.pause * 2).min(MAX_RETRY_PAUSE);
            self.retry_at = now + self.pause;
        }
    }

    /// How loudly to log this failure: the first at error, then at most
    /// one warning per [`OUTAGE_REPORT_EVERY`], the rest at debug.
    pub(super) fn level(&mut self, now: Instant) -> tracing::Level {
        if self.failures == 1 {
            return tracing::Level::ERROR;
        }
        if now.saturating_duration_since(self.reported_at) < OUTAGE_REPORT_EVERY {
            self.unreported += 1;
            return tracing::Level::DEBUG;
        }
        self.reported_at = now;
        self.unreported = 0;
        tracing::Level::WARN
    }
}

impl Recovery {
    /// Keeps the failed batch's facts, moves the retry pause (see
    /// [`Outage::failed_again`]) and logs the failure.
    pub(super) fn failed(
        &mut self,
        cause: &CommitFailed,
        origin: Origin,
        refused: usize,
        facts: Vec<Fact>,
        now: Instant,
    ) {
        self.facts.extend(facts);
        let outage = match &mut self.outage {
            Some(outage) => {
                outage.failed_again(origin, now);
                outage
            }
            None => self.outage.insert(Outage::new(now)),
        };
        let unreported = outage.unreported;
        let level = outage.level(now);
        let next_try = outage.retry_at.saturating_duration_since(now).as_millis();
        let mut message = format!("commit failed, its changes are undone: {cause}");
        if refused > 0 {
            message += &format!("; answered {} with an error", counted(refused, "request"));
        }
        if let Some(facts) = describe(&self.facts) {
            message += &format!("; {facts} waiting to be saved, next try in {next_try} ms");
        }
        match level {
            tracing::Level::ERROR => tracing::error!("{message}"),
            tracing::Level::WARN => tracing::warn!(
                "{message} (still failing; {} since the last report)",
                counted(unreported as usize, "more failed commit")
            ),
            _ => tracing::debug!("{message}"),
        }
    }

    pub(super) fn succeeded(&mut self, now: Instant) {
        if let Some(outage) = self.outage.take() {
            tracing::info!(
                "the database takes commits again, after {} over {} s",
                counted(outage.failures as usize, "failed commit"),
                now.saturating_duration_since(outage.began).as_secs()
            );
        }
    }
}

/// The facts waiting to be saved, for the log: `2 closed connections, 1
/// exited process`; `None` if there are none.
pub(super) fn describe(facts: &[Fact]) -> Option<String> {
    let (mut closed, mut exited, mut resyncs, mut dead_rows, mut cluster) = (0, 0, 0, 0, 0);
    for fact in facts {
        match fact {
            Fact::Closed(_) | Fact::ClosedByExit(_) => closed += 1,
            Fact::ProcessExited(_) => exited += 1,
            Fact::Resync { .. } => resyncs += 1,
            Fact::DeadRow(_) => dead_rows += 1,
            Fact::Cluster(_) => cluster += 1,
        }
    }
    let parts: Vec<String> = [
        (closed, "closed connection"),
        (exited, "exited process"),
        (resyncs, "resync"),
        (dead_rows, "stale row"),
        (cluster, "cluster change"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| counted(n, what))
    .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// `1 request`, `2 requests`.
pub(super) fn counted(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}
