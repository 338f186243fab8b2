//! Cluster mode as the daemon runs it: every task that connects the core
//! to etcd, over one [`Gateway`] they all share (so that when one call
//! moves the gateway off a member, the mirror's watch leaves it too).
//!
//! - The lease: a [`LeaseKeeper`], and a task that tells the core where
//!   the lease stands on every change ([`ClusterInput::Lease`]). Before a
//!   new lease counts as live, this host's name is claimed on it
//!   (`PREFIX h/HOST`, created only if absent): two daemons given one
//!   `--host` would write the same keys and each take the other's entries
//!   for its own. A claim left by this daemon's own earlier run (this
//!   boot, this database), killed before its lease ended, has its lease
//!   revoked, since that run's entries are gone with it. Any other claim
//!   may be a live daemon's, or one that is gone (this machine before a
//!   reboot, a daemon killed elsewhere): its lease's time to live is
//!   waited out (`status` says so), and if it holds the name still after
//!   that, it was renewed, and cluster mode stops (the lease is revoked,
//!   every write refused, `status` says why).
//! - The bridge ([`Bridge`]), started once this host's name is first
//!   claimed (before, keys with its name may be another daemon's): other
//!   hosts' changes, forwarded to the core as [`ClusterInput::Changes`],
//!   the first listing as [`ClusterInput::Listing`].
//! - The writer: the core's writes ([`ClusterWrite`]), handed over by the
//!   driver once their batch committed, each sent to etcd and its outcome
//!   told back ([`ClusterInput::Written`]). Writes to different keys run at
//!   once; writes to one key run in the order the core made them, each
//!   after the one before it was answered. An entry is created or
//!   rewritten only under a lease live now and claimed (waited for, up to
//!   a TTL, while a lease is being granted; refused at once while it is
//!   fenced); a delete is sent
//!   until etcd answers or the lease it was made under is gone (and the
//!   key with it).
//!
//! A create whose transaction may or may not have been committed
//! ([`Error::Uncertain`]: no answer, or an answer that says it went
//! through but cannot be read) is never reported refused while its key
//! may show: the key is read, and sent again if it is absent (the transaction
//! creates only if absent, so a late first attempt cannot make a second
//! key). What is found decides: the key on this lease with this value is
//! this create's, and its create revision is the answer.
//!
//! Stopping ([`ClusterNode::stop`]) ends the tasks and revokes the lease.
//! A daemon that means to come back first hands its entries' keys over to
//! a lease as long as the resume grace, so that they keep their places on
//! every host while it is away; the daemon that starts next finds them in
//! its first listing and moves them to its own lease
//! ([`ClusterWrite::Adopt`]). Without a hand-over (or if it fails) this
//! host's keys go with the lease, and other hosts remove its entries as
//! lost.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{Id, JoinHandle, JoinSet};

use super::ClusterConfig;
use super::bridge::{Bridge, BridgeSettings, BridgeStatus};
use super::gateway::{Creation, Error, Gateway, Kv, LeaseId, Rewrite};
use super::lease::{LeaseKeeper, LeaseState, LeaseStatus, RETRY_PAUSE};
use super::record::{
    DatabaseIdentity, Departure, HostClaim, Key, KeySpace, RECORD_VERSION, Record,
};
use crate::core::Input;
use crate::core::registry::{ClusterInput, ClusterWrite, LeaseView, SharedRecord, Written};
use crate::daemon::driver::CoreHandle;
use crate::ops::status::ClusterStatus;
use crate::process::ProcessId;
use crate::protocol::{ErrorBody, ErrorCode, Limits, host_of_ref};
use crate::sys::BootInstant;

/// How often the mirror looks whether the gateway has moved off the
/// member it watches on: a load of one number, so often.
const CHECK_WATCHED_MEMBER_EVERY: Duration = Duration::from_millis(100);

/// How long this host's reasons for its entries' leaving are kept in etcd:
/// every host's watch reads a reason in the message of its delete, so
/// this only serves a host that lists again (after a compaction left its
/// watch behind), which pairs the entries it finds removed with the
/// reasons still there. Past this, such a host reads the leave as the
/// host lost.
const KEEP_REASONS_FOR: Duration = Duration::from_secs(60);

/// How often this host's old reasons are looked for.
const SWEEP_REASONS_EVERY: Duration = Duration::from_secs(5);

/// How long a stopping daemon may spend handing its keys over before it
/// revokes its lease all the same: a stop is not to hang on etcd.
const HAND_OVER_WITHIN: Duration = Duration::from_secs(2);

/// What `status` shows of cluster mode, kept current by its tasks and
/// read by the driver when it completes a `status` reply.
pub struct ClusterProbe {
    host: String,
    prefix: String,
    patterns: Vec<String>,
    endpoints: Vec<String>,
    links: Mutex<Option<ProbeLinks>>,
    /// Why cluster mode stopped, if it did.
    refused: Mutex<Option<String>>,
    /// Whose lease on the host name is being waited out, while it is.
    waiting: Mutex<Option<String>>,
    writes_in_flight: AtomicUsize,
}

/// What the probe reads once the tasks run.
struct ProbeLinks {
    gateway: Arc<Gateway>,
    lease: watch::Receiver<LeaseStatus>,
    /// The lease the host name is claimed on.
    claimed: watch::Receiver<Option<LeaseId>>,
    /// Once the bridge runs: from the first claim of the host name on.
    bridge: Option<watch::Receiver<BridgeStatus>>,
}

impl ClusterProbe {
    pub fn new(config: &ClusterConfig) -> Arc<ClusterProbe> {
        Arc::new(ClusterProbe {
            host: config.host.clone(),
            prefix: config.prefix.clone(),
            patterns: config.patterns.clone(),
            endpoints: config.endpoints.clone(),
            links: Mutex::new(None),
            refused: Mutex::new(None),
            waiting: Mutex::new(None),
            writes_in_flight: AtomicUsize::new(0),
        })
    }

    /// Where cluster mode stands now.
    pub fn status(&self) -> ClusterStatus {
        let mut status = ClusterStatus {
            host: self.host.clone(),
            prefix: self.prefix.clone(),
            topics: self.patterns.clone(),
            endpoints: self.endpoints.clone(),
            endpoint: String::new(),
            lease: "granting".to_owned(),
            lease_id: None,
            renewed_ms_ago: None,
            fence_in_ms: None,
            last_error: None,
            revision: None,
            watching: None,
            writes_in_flight: self.writes_in_flight.load(Ordering::Relaxed),
        };
        if let Some(links) = &*super::super::lock(&self.links) {
            status.endpoint = links.gateway.current_endpoint().to_owned();
            let lease = links.lease.borrow().clone();
            let bridge = links
                .bridge
                .as_ref()
                .map(|bridge| bridge.borrow().clone())
                .unwrap_or_default();
            let now = BootInstant::now();
            let millis =
                |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
            let (name, lease_id) = match lease.state {
                LeaseState::Granting => ("granting", None),
                // Entries are written under a lease only once the host
                // name is claimed on it; until then it is still to come.
                LeaseState::Live { lease, .. } if *links.claimed.borrow() != Some(lease) => {
                    ("granting", Some(lease))
                }
                LeaseState::Live {
                    lease,
                    renewed_at,
                    fence_at,
                } => {
                    status.renewed_ms_ago = Some(millis(now.saturating_duration_since(renewed_at)));
                    status.fence_in_ms = Some(millis(fence_at.saturating_duration_since(now)));
                    ("live", Some(lease))
                }
                LeaseState::Fenced {
                    lease, renewed_at, ..
                } => {
                    status.renewed_ms_ago = Some(millis(now.saturating_duration_since(renewed_at)));
                    ("fenced", Some(lease))
                }
                LeaseState::Stopped => ("stopped", None),
            };
            status.lease = name.to_owned();
            status.lease_id = lease_id.map(|lease| lease.to_string());
            let waiting = super::super::lock(&self.waiting).clone();
            status.last_error = waiting.or(lease.last_error).or(bridge.error);
            status.revision = bridge.revision;
            status.watching = bridge.watching;
        }
        if let Some(refused) = &*super::super::lock(&self.refused) {
            status.lease = "stopped".to_owned();
            status.lease_id = None;
            status.renewed_ms_ago = None;
            status.fence_in_ms = None;
            status.last_error = Some(refused.clone());
        }
        status
    }
}

/// Cluster mode, running: what [`ClusterNode::stop`] ends.
pub struct ClusterNode {
    forwarder: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// Tells the lease's task to stop keeping the lease and revoke it,
    /// after handing this host's keys over to a lease of the given TTL,
    /// if one is given.
    stop_lease: Option<oneshot::Sender<Option<Duration>>>,
    lease_task: JoinHandle<()>,
}

/// What the node's tasks share.
struct Shared {
    gateway: Arc<Gateway>,
    keys: KeySpace,
    host: String,
    core: CoreHandle,
    probe: Arc<ClusterProbe>,
    lease: watch::Receiver<LeaseStatus>,
    /// The lease this host's name is claimed on, once it is: only under
    /// it are entries written.
    claimed: watch::Receiver<Option<LeaseId>>,
    /// How long a write waits for a lease to be granted and claimed.
    grant_wait: Duration,
}

impl Shared {
    /// The lease entries may be written under now: claimed, live, and its
    /// fence not yet due.
    fn writable_lease(&self) -> Option<LeaseId> {
        let lease = self.lease.borrow().state.live_at(BootInstant::now())?;
        (*self.claimed.borrow() == Some(lease)).then_some(lease)
    }

    /// The lease a new write goes under: the writable one, waited for
    /// while none is granted and claimed yet (the daemon has just started,
    /// or etcd ended the last lease), for at most the lease's TTL. None at
    /// once while the lease is fenced (a write now could outlive the
    /// claims it rests on) or cluster mode has stopped.
    async fn lease_to_write(&self) -> Option<LeaseId> {
        let mut lease = self.lease.clone();
        let mut claimed = self.claimed.clone();
        let waiting = async {
            loop {
                if let Some(writable) = self.writable_lease() {
                    return Some(writable);
                }
                match lease.borrow_and_update().state {
                    LeaseState::Granting | LeaseState::Live { .. } => {}
                    LeaseState::Fenced { .. } | LeaseState::Stopped => return None,
                }
                if super::super::lock(&self.probe.refused).is_some() {
                    return None;
                }
                claimed.borrow_and_update();
                tokio::select! {
                    changed = lease.changed() => changed.ok()?,
                    changed = claimed.changed() => changed.ok()?,
                }
            }
        };
        tokio::time::timeout(self.grant_wait, waiting)
            .await
            .ok()
            .flatten()
    }

    /// Whether etcd may still hold `lease` (live or fenced, not yet known
    /// to be gone).
    fn may_hold(&self, lease: LeaseId) -> bool {
        held_lease(&self.lease.borrow().state) == Some(lease)
    }

    /// Tells the core; false once it has stopped.
    async fn tell_core(&self, input: ClusterInput) -> bool {
        tell_core(&self.core, input).await
    }
}

/// The lease a state names, live or fenced.
fn held_lease(state: &LeaseState) -> Option<LeaseId> {
    match *state {
        LeaseState::Live { lease, .. } | LeaseState::Fenced { lease, .. } => Some(lease),
        LeaseState::Granting | LeaseState::Stopped => None,
    }
}

async fn tell_core(core: &CoreHandle, input: ClusterInput) -> bool {
    if core.queue(Input::Cluster(input).into()).is_err() {
        return false;
    }
    core.drive_soon().await;
    true
}

/// Who this daemon is, for its claim on its host name.
pub struct Claimant {
    pub boot_id: String,
    pub process: ProcessId,
    /// The database this daemon has open (and locked).
    pub database: DatabaseIdentity,
}

impl ClusterNode {
    /// Starts every task of cluster mode on the current runtime: the
    /// lease and the claim on the host name, the bridge, and the writer of
    /// the `writes` the driver hands over. Fails only if the fence's alarm
    /// cannot be made; etcd being out of reach is retried by the tasks.
    pub fn start(
        config: &ClusterConfig,
        limits: Limits,
        claimant: Claimant,
        core: CoreHandle,
        writes: mpsc::UnboundedReceiver<ClusterWrite>,
        probe: Arc<ClusterProbe>,
    ) -> anyhow::Result<ClusterNode> {
        let gateway = Arc::new(
            Gateway::new(&config.endpoints, config.attempt_timeout)
                .map_err(|error| anyhow::anyhow!("cluster mode: {error}"))?,
        );
        let keys = KeySpace::new(&config.prefix);
        let keeper = LeaseKeeper::start(Arc::clone(&gateway), config.lease)
            .map_err(|error| anyhow::anyhow!("cluster mode: keeping a lease: {error}"))?;
        let (changes, mut changes_rx) = mpsc::unbounded_channel();
        let bridge = BridgeStart {
            settings: BridgeSettings {
                keys: keys.clone(),
                limits,
                check_every: CHECK_WATCHED_MEMBER_EVERY,
                retry_pause: RETRY_PAUSE,
            },
            sink: changes,
        };
        let (claimed_tx, claimed) = watch::channel(None);
        *super::super::lock(&probe.links) = Some(ProbeLinks {
            gateway: Arc::clone(&gateway),
            lease: keeper.status(),
            claimed: claimed.clone(),
            bridge: None,
        });
        let shared = Arc::new(Shared {
            gateway,
            keys,
            host: config.host.clone(),
            core: core.clone(),
            probe,
            lease: keeper.status(),
            claimed,
            grant_wait: config.lease.ttl,
        });
        let forwarder = tokio::spawn(async move {
            // The bridge sends its first listing first, even an empty one:
            // it settles the entries a restart restored.
            let mut listing = true;
            while let Some(changes) = changes_rx.recv().await {
                let input = if std::mem::take(&mut listing) {
                    ClusterInput::Listing(changes)
                } else {
                    ClusterInput::Changes(changes)
                };
                if !tell_core(&core, input).await {
                    return;
                }
            }
        });
        let (stop_lease, lease_stopped) = oneshot::channel();
        let lease_task = tokio::spawn(keep_lease(
            Arc::clone(&shared),
            keeper,
            claimant,
            claimed_tx,
            bridge,
            lease_stopped,
        ));
        let writer = tokio::spawn(write_all(shared, writes));
        Ok(ClusterNode {
            forwarder,
            writer,
            stop_lease: Some(stop_lease),
            lease_task,
        })
    }

    /// Ends cluster mode: no more changes are read or writes sent, and
    /// the lease is revoked. With `hand_over` (the resume grace), this
    /// host's entries' keys are first moved to a new lease that long
    /// (whole seconds, and at least etcd's minimum), so they keep their
    /// places while the daemon restarts; without, or if that fails within
    /// a few seconds, they go with the lease.
    pub async fn stop(mut self, hand_over: Option<Duration>) {
        self.forwarder.abort();
        self.writer.abort();
        if let Some(stop) = self.stop_lease.take() {
            let _ = stop.send(hand_over);
        }
        let _ = (&mut self.lease_task).await;
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.forwarder.abort();
        self.writer.abort();
        self.lease_task.abort();
    }
}

/// The bridge, to start once this host's name is first claimed: before
/// that, keys carrying the name may be another daemon's (or this
/// machine's killed daemon's, whose lease the claim revokes), and the
/// core is not to read them as this host's.
struct BridgeStart {
    settings: BridgeSettings,
    sink: mpsc::UnboundedSender<crate::core::registry::ClusterChanges>,
}

/// How a claim on the host name went.
enum Claim {
    /// Held on this lease.
    Held,
    /// Held by `holder` on `lease`, which etcd says ends within `left`
    /// unless renewed: the holder may be gone (this machine's daemon
    /// before a reboot, or a daemon killed elsewhere), so try again once
    /// that has passed.
    HeldUntil {
        holder: String,
        lease: LeaseId,
        left: Duration,
    },
    /// Another daemon holds it, and has renewed its lease past the time
    /// it had: cluster mode must not go on.
    Taken(String),
    /// etcd could not be asked; try again.
    Failed(Error),
}

/// How long past a holding lease's time to live a claim is tried again:
/// etcd answers that time rounded down to a second, and looks for expired
/// leases only twice a second.
const LEASE_END_SLACK: Duration = Duration::from_millis(1500);

/// The lease's task: claims the host name on each new lease (and starts
/// the bridge after the first claim), tells the core where the lease
/// stands (that the last lease ended, before a new one is claimed: see
/// [`next_step`]), and on being stopped (or refused the name) stops the keeper
/// and revokes the lease. The bridge ends with it.
async fn keep_lease(
    shared: Arc<Shared>,
    keeper: LeaseKeeper,
    claimant: Claimant,
    claimed: watch::Sender<Option<LeaseId>>,
    bridge: BridgeStart,
    mut stopped: oneshot::Receiver<Option<Duration>>,
) {
    let mut hand_over: Option<Duration> = None;
    let mut bridge_start = Some(bridge);
    let mut running_bridge: Option<Bridge> = None;
    // Ends with this task, as the bridge does.
    let _sweeper = ReasonSweeper::spawn(Arc::clone(&shared));
    let mut status = keeper.status();
    let mut told: Option<LeaseView> = None;
    // The holder's lease last waited out: found holding the name again
    // after that, it was renewed, so its daemon is alive.
    let mut waited_out: Option<LeaseId> = None;
    let refusal = loop {
        let state = status.borrow_and_update().state;
        let claimed_now = *claimed.borrow();
        let lease = match next_step(&state, claimed_now, told) {
            Step::Tell(view) => {
                if !shared.tell_core(ClusterInput::Lease(view)).await {
                    break None;
                }
                told = Some(view);
                // The state may have moved on while telling.
                continue;
            }
            Step::Claim(lease) => lease,
            Step::Wait => {
                tokio::select! {
                    asked = &mut stopped => {
                        hand_over = asked.ok().flatten();
                        break None;
                    }
                    changed = status.changed() => if changed.is_err() { break None },
                }
                continue;
            }
        };
        match claim_host(&shared, &claimant, lease, waited_out).await {
            Claim::Held => {
                waited_out = None;
                claimed.send_replace(Some(lease));
                tracing::info!(
                    "cluster: host name {} claimed on lease {lease}",
                    shared.host
                );
                if let Some(BridgeStart { settings, sink }) = bridge_start.take() {
                    let started = Bridge::spawn(Arc::clone(&shared.gateway), settings, sink);
                    if let Some(links) = &mut *super::super::lock(&shared.probe.links) {
                        links.bridge = Some(started.status());
                    }
                    running_bridge = Some(started);
                }
                // The state may have moved on while claiming.
                continue;
            }
            Claim::HeldUntil {
                holder,
                lease: holding,
                left,
            } => {
                let why = format!(
                    "the host name {} is held by {holder}; waiting {left:?} for that lease to \
                     end, in case its daemon is gone, before trying again",
                    shared.host
                );
                tracing::warn!("cluster: {why}");
                *super::super::lock(&shared.probe.waiting) = Some(why);
                let waited = tokio::select! {
                    asked = &mut stopped => {
                        hand_over = asked.ok().flatten();
                        false
                    }
                    () = tokio::time::sleep(left + LEASE_END_SLACK) => true,
                };
                *super::super::lock(&shared.probe.waiting) = None;
                if !waited {
                    break None;
                }
                waited_out = Some(holding);
            }
            Claim::Taken(holder) => break Some(holder),
            Claim::Failed(error) => {
                tracing::warn!(
                    "cluster: cannot claim host name {} yet: {error}",
                    shared.host
                );
                tokio::select! {
                    asked = &mut stopped => {
                        hand_over = asked.ok().flatten();
                        break None;
                    }
                    () = tokio::time::sleep(RETRY_PAUSE) => continue,
                    changed = status.changed() => {
                        if changed.is_err() { break None; }
                        continue;
                    }
                }
            }
        }
    };
    claimed.send_replace(None);
    if let Some(holder) = &refusal {
        let why = format!(
            "cluster mode stopped: the host name {} is held by another daemon ({holder}); \
             give each daemon its own --host",
            shared.host
        );
        tracing::error!("{why}");
        *super::super::lock(&shared.probe.refused) = Some(why);
    }
    // No more of other hosts' changes: dropping the bridge ends it.
    drop(running_bridge);
    if let Some(lease) = keeper.stop().await {
        if let Some(grace) = hand_over {
            let handing = hand_over_keys(&shared, lease, grace);
            match tokio::time::timeout(HAND_OVER_WITHIN, handing).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(
                    "cluster: this host's keys could not be handed over, they go with lease \
                     {lease} (other hosts see its entries lost): {error}"
                ),
                Err(_) => tracing::warn!(
                    "cluster: handing this host's keys over took longer than \
                     {HAND_OVER_WITHIN:?}; those not moved go with lease {lease} (other hosts \
                     see those entries lost)"
                ),
            }
        }
        match shared.gateway.revoke(lease).await {
            Ok(()) => tracing::info!("cluster: lease {lease} revoked"),
            Err(error) => tracing::warn!(
                "cluster: lease {lease} could not be revoked, etcd ends it after its TTL: {error}"
            ),
        }
    }
    if refusal.is_some() {
        shared
            .tell_core(ClusterInput::Lease(LeaseView::Stopped))
            .await;
    }
}

/// What the lease's task does next, given the lease's state, the lease
/// the host name was last claimed on, and what the core was last told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Tell the core where the lease stands.
    Tell(LeaseView),
    /// Claim the host name on this live lease.
    Claim(LeaseId),
    /// Nothing to do until the state changes.
    Wait,
}

/// The next step of the lease's task. The core is told before a claim,
/// so that it hears a lease ended before it hears its successor is live:
/// the keeper's watch shows only its latest state, and may have gone from
/// one lease to the next without the task ever seeing `Granting` between.
/// A lease other than the claimed one, live or fenced, means the claimed
/// one ended (the keeper moves on only from a lease etcd no longer has),
/// and its entries' keys with it: to the core that is `Granting`, which it
/// reads as the end of the lease it knew, whatever it was told of that
/// lease before (live or fenced).
fn next_step(state: &LeaseState, claimed: Option<LeaseId>, told: Option<LeaseView>) -> Step {
    let held = held_lease(state);
    let view = if held.is_some() && held != claimed {
        LeaseView::Granting
    } else {
        lease_view(state, claimed)
    };
    if told != Some(view) {
        return Step::Tell(view);
    }
    match *state {
        LeaseState::Live { lease, .. } if claimed != Some(lease) => Step::Claim(lease),
        _ => Step::Wait,
    }
}

/// Moves every key of this host's entries on `lease` (all topics; keys
/// already deleted are not there to move) to a new lease of `grace`, in
/// whole seconds rounded up: the time a restarted daemon's clients have to
/// resume, and so the time its entries need to keep their places. etcd
/// raises a TTL below its minimum, which [`Gateway::grant`] refuses; the
/// smallest it grants is taken then. Each key keeps its value and create
/// revision, so other hosts see the same record written again, which
/// changes nothing there. The host's claim and the reasons stay on
/// `lease`, and go when it is revoked.
async fn hand_over_keys(shared: &Shared, lease: LeaseId, grace: Duration) -> Result<(), Error> {
    let (_, kvs) = shared.gateway.range_prefix(&shared.keys.topics()).await?;
    let own: Vec<Kv> = kvs.into_iter().filter(|kv| kv.lease == lease.0).collect();
    if own.is_empty() {
        return Ok(());
    }
    let whole_seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    let ttl = Duration::from_secs(whole_seconds.max(1));
    let handed_to = match shared.gateway.grant(ttl).await {
        Ok(granted) => granted,
        Err(Error::TtlRaised { granted, .. }) => {
            tracing::info!(
                "cluster: etcd grants no lease shorter than {granted:?}, so this host's \
                 entries keep their places that long rather than the resume grace of \
                 {grace:?}"
            );
            shared.gateway.grant(granted).await?
        }
        Err(error) => return Err(error),
    };
    let moved = shared.gateway.move_to_lease(&own, handed_to.id).await?;
    tracing::info!(
        "cluster: {} keys of this host's entries handed over to lease {} for {:?} \
         ({} gone meanwhile)",
        moved.moved,
        handed_to.id,
        handed_to.ttl,
        moved.missing.len()
    );
    Ok(())
}

/// The core's view of the lease: live only once the host name is claimed
/// on it.
fn lease_view(state: &LeaseState, claimed: Option<LeaseId>) -> LeaseView {
    match *state {
        LeaseState::Live {
            lease, fence_at, ..
        } if claimed == Some(lease) => LeaseView::Live {
            lease: lease.0,
            fence_at: fence_at.since_boot(),
        },
        LeaseState::Live { .. } | LeaseState::Granting => LeaseView::Granting,
        LeaseState::Fenced { lease, .. } => LeaseView::Fenced { lease: lease.0 },
        LeaseState::Stopped => LeaseView::Stopped,
    }
}

/// Claims `PREFIX h/HOST` on `lease`. A claim found on another lease is
/// this daemon's own earlier run's if it names this boot and the database
/// this daemon has open: that lease is revoked (its entries went with that
/// run) and the claim made again. Any other holder may be alive, and keeps
/// the name for as long as its lease lives: the answer is how long that is
/// (`waited_out` names a lease already waited for once; found holding the
/// name still, it was renewed since, and its daemon is alive).
async fn claim_host(
    shared: &Shared,
    claimant: &Claimant,
    lease: LeaseId,
    waited_out: Option<LeaseId>,
) -> Claim {
    let key = shared.keys.host(&shared.host);
    let hosts = shared.keys.hosts();
    let value = HostClaim {
        v: RECORD_VERSION,
        host: shared.host.clone(),
        boot_id: claimant.boot_id.clone(),
        pid: claimant.process.pid,
        start_time: claimant.process.start_time,
        database: Some(claimant.database),
    }
    .encode();
    // A predecessor's lease is revoked once; a claim found again after
    // that is another daemon's.
    let mut revoked_predecessor = false;
    loop {
        match shared
            .gateway
            .create_if_absent(&hosts, &key, &value, lease)
            .await
        {
            Ok(Creation::Created(_)) => return Claim::Held,
            Ok(Creation::Exists) => {}
            // Read below: a claim of ours that landed is found there.
            Err(Error::Uncertain { .. }) => {}
            Err(error) => return Claim::Failed(error),
        }
        let kv = match shared.gateway.get(&key).await {
            Ok((_, Some(kv))) => kv,
            // Gone meanwhile (its lease ended): claim again.
            Ok((_, None)) => continue,
            Err(error) => return Claim::Failed(error),
        };
        if kv.lease == lease.0 {
            return Claim::Held;
        }
        let holder = HostClaim::decode(&kv.value);
        if is_predecessor(holder.as_ref(), claimant) && !revoked_predecessor {
            tracing::warn!(
                "cluster: host name {} is held by this daemon's earlier run on this machine \
                 (the same boot and database), which is gone; revoking its lease {:x}",
                shared.host,
                kv.lease
            );
            if let Err(error) = shared.gateway.revoke(LeaseId(kv.lease)).await {
                return Claim::Failed(error);
            }
            revoked_predecessor = true;
            continue;
        }
        let holding = LeaseId(kv.lease);
        let holder = describe_holder(holder.as_ref(), claimant, holding);
        // A claim on no lease never ends, and one on a lease already
        // waited out was renewed since.
        if kv.lease == 0 || waited_out == Some(holding) {
            return Claim::Taken(holder);
        }
        match shared.gateway.time_to_live(holding).await {
            Ok(Some(left)) => {
                return Claim::HeldUntil {
                    holder,
                    lease: holding,
                    left,
                };
            }
            // Ended since it was read, and the claim with it.
            Ok(None) => continue,
            Err(error) => return Claim::Failed(error),
        }
    }
}

/// Whether a claim is this daemon's own earlier run's: made in this boot,
/// on the database this daemon has open, which no other running daemon
/// can have (see [`DatabaseIdentity`]).
fn is_predecessor(holder: Option<&HostClaim>, claimant: &Claimant) -> bool {
    holder.is_some_and(|holder| {
        holder.boot_id == claimant.boot_id && holder.database == Some(claimant.database)
    })
}

/// Who holds a claim, for the log and `status`.
fn describe_holder(holder: Option<&HostClaim>, claimant: &Claimant, lease: LeaseId) -> String {
    match holder {
        Some(holder) if holder.boot_id == claimant.boot_id => format!(
            "pid {} of this machine's boot, on another database or in another container, \
             lease {lease}",
            holder.pid
        ),
        Some(holder) => format!(
            "pid {} of another boot ({}): another machine, or this one before a reboot, \
             lease {lease}",
            holder.pid, holder.boot_id
        ),
        None => format!("an unreadable claim, lease {lease}"),
    }
}

/// The task that deletes this host's reason keys once they are
/// [`KEEP_REASONS_FOR`] old; it ends when dropped. Without it they would
/// pile up on its lease, and in every host's mirror, for as long as the
/// daemon runs.
struct ReasonSweeper {
    task: JoinHandle<()>,
}

impl ReasonSweeper {
    fn spawn(shared: Arc<Shared>) -> ReasonSweeper {
        ReasonSweeper {
            task: tokio::spawn(sweep_reasons(shared)),
        }
    }
}

impl Drop for ReasonSweeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every [`SWEEP_REASONS_EVERY`], while this host's lease is live and its
/// name claimed on it, reads the reason keys and deletes those of this
/// host's entries, on that lease, that have stood unchanged for
/// [`KEEP_REASONS_FOR`]. Keys with this host's name are this daemon's only
/// while it holds the name, and a reason is written on the lease of the
/// delete beside it, so one on another lease is not this daemon's to
/// delete (it goes with that lease). The lease is looked at again before
/// the delete, which the read may have outlasted.
async fn sweep_reasons(shared: Arc<Shared>) {
    let mut ages = ReasonAges::default();
    let mut ticks = tokio::time::interval(SWEEP_REASONS_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(lease) = shared.writable_lease() else {
            continue;
        };
        let kvs = match shared.gateway.range_prefix(&shared.keys.reasons()).await {
            Ok((_, kvs)) => kvs,
            Err(error) => {
                tracing::debug!("cluster: reading the reasons to sweep failed: {error}");
                continue;
            }
        };
        let own = kvs.into_iter().filter(|kv| {
            kv.lease == lease.0
                && matches!(
                    shared.keys.parse(&kv.key),
                    Ok(Key::Reason { id, .. }) if host_of_ref(&id) == Some(shared.host.as_str())
                )
        });
        let due = ages.due(own, BootInstant::now());
        if due.is_empty() || shared.writable_lease() != Some(lease) {
            continue;
        }
        match shared.gateway.delete_unchanged(&due).await {
            Ok(deleted) => tracing::debug!(
                "cluster: swept {deleted} of this host's reasons older than {KEEP_REASONS_FOR:?}"
            ),
            Err(error) => tracing::debug!("cluster: sweeping old reasons failed: {error}"),
        }
    }
}

/// Since when each of this host's reason keys has been seen as it is, by
/// its mod revision: a key is at least that old. A daemon that starts
/// anew sees its predecessor's reasons as new, and keeps them a little
/// longer than needed, never shorter.
#[derive(Default)]
struct ReasonAges {
    seen: HashMap<Vec<u8>, (i64, BootInstant)>,
}

impl ReasonAges {
    /// Notes the keys read at `now` (forgetting those no longer there)
    /// and returns those seen unchanged for [`KEEP_REASONS_FOR`].
    fn due(&mut self, kvs: impl Iterator<Item = Kv>, now: BootInstant) -> Vec<Kv> {
        let mut seen = HashMap::new();
        let mut due = Vec::new();
        for kv in kvs {
            let since = match self.seen.get(&kv.key) {
                Some(&(revision, since)) if revision == kv.mod_revision => since,
                _ => now,
            };
            seen.insert(kv.key.clone(), (kv.mod_revision, since));
            if now.saturating_duration_since(since) >= KEEP_REASONS_FOR {
                due.push(kv);
            }
        }
        self.seen = seen;
        due
    }
}

/// The writer: runs each write the driver hands over, one key's writes
/// in order, different keys' at once.
async fn write_all(shared: Arc<Shared>, mut writes: mpsc::UnboundedReceiver<ClusterWrite>) {
    // Per busy key, the writes waiting behind the one running.
    let mut waiting: HashMap<Vec<u8>, VecDeque<ClusterWrite>> = HashMap::new();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut key_of_task: HashMap<Id, Vec<u8>> = HashMap::new();
    let start = |running: &mut JoinSet<()>,
                 key_of_task: &mut HashMap<Id, Vec<u8>>,
                 key: Vec<u8>,
                 write: ClusterWrite| {
        let task = running.spawn(write_one(Arc::clone(&shared), key.clone(), write));
        key_of_task.insert(task.id(), key);
    };
    loop {
        tokio::select! {
            write = writes.recv() => {
                let Some(write) = write else { return };
                shared.probe.writes_in_flight.fetch_add(1, Ordering::Relaxed);
                let key = entry_key(&shared.keys, &write);
                match waiting.get_mut(&key) {
                    Some(queue) => queue.push_back(write),
                    None => {
                        waiting.insert(key.clone(), VecDeque::new());
                        start(&mut running, &mut key_of_task, key, write);
                    }
                }
            }
            Some(done) = running.join_next_with_id() => {
                shared.probe.writes_in_flight.fetch_sub(1, Ordering::Relaxed);
                let id = match &done {
                    Ok((id, ())) => *id,
                    Err(error) => {
                        tracing::error!("cluster: a write to etcd failed: {error}");
                        error.id()
                    }
                };
                let Some(key) = key_of_task.remove(&id) else { continue };
                let next = waiting.get_mut(&key).and_then(VecDeque::pop_front);
                match next {
                    Some(write) => start(&mut running, &mut key_of_task, key, write),
                    None => {
                        waiting.remove(&key);
                    }
                }
            }
        }
    }
}

/// The etcd key a write is to.
fn entry_key(keys: &KeySpace, write: &ClusterWrite) -> Vec<u8> {
    let (topic, id) = write.key();
    keys.entry(topic, id)
}

/// Sends one write and tells the core its outcome (a delete's outcome is
/// the watch's to show).
async fn write_one(shared: Arc<Shared>, key: Vec<u8>, write: ClusterWrite) {
    let (write_id, outcome) = match write {
        ClusterWrite::Create {
            write,
            topic,
            record,
            ..
        } => (write, create(&shared, &topic, &key, record).await),
        ClusterWrite::Rewrite { write, record, .. } => {
            (write, rewrite(&shared, &key, record).await)
        }
        ClusterWrite::Delete {
            topic,
            id,
            reason,
            by,
            ..
        } => {
            let departure = Departure {
                v: RECORD_VERSION,
                reason,
                by,
                host: shared.host.clone(),
            };
            delete(&shared, &key, &shared.keys.reason(&topic, &id), &departure).await;
            return;
        }
        ClusterWrite::Adopt { .. } => {
            adopt(&shared, &key).await;
            return;
        }
    };
    if let Written::Refused(error) = &outcome {
        tracing::warn!(
            "cluster: {} not written: {}",
            String::from_utf8_lossy(&key),
            error.message
        );
    }
    shared
        .tell_core(ClusterInput::Written {
            write: write_id,
            outcome,
        })
        .await;
}

fn unavailable(message: impl Into<String>) -> Written {
    Written::Refused(ErrorBody::new(ErrorCode::Unavailable, message))
}

fn not_live() -> Written {
    unavailable(
        "the etcd cluster holding this topic cannot be reached now (this host's lease is not live)",
    )
}

/// The value an entry is written with.
fn record_of(shared: SharedRecord) -> Record {
    Record {
        v: RECORD_VERSION,
        key: shared.key,
        phx_ref: shared.phx_ref,
        phx_ref_prev: shared.phx_ref_prev,
        meta: shared.meta,
        joined_at: shared.joined_at,
        pid: shared.pid,
        uid: shared.uid,
        user: shared.user,
        host: shared.host,
        lifetime: shared.lifetime,
    }
}

/// Creates an entry's key, only if absent.
async fn create(shared: &Shared, topic: &str, key: &[u8], record: SharedRecord) -> Written {
    let value = record_of(record).encode();
    let Some(lease) = shared.lease_to_write().await else {
        return not_live();
    };
    let queue = shared.keys.topic(topic);
    let mut uncertain = false;
    loop {
        if uncertain {
            tokio::time::sleep(RETRY_PAUSE).await;
            // Did an earlier attempt land? The key on this lease with this
            // value is this create's: no other write to it ran meanwhile.
            match shared.gateway.get(key).await {
                Ok((_, Some(kv))) if kv.lease == lease.0 && kv.value == value => {
                    return created(kv.create_revision);
                }
                Ok((_, Some(_))) => return exists(key),
                Ok((_, None)) => {}
                Err(_) if shared.may_hold(lease) => continue,
                Err(error) => return unavailable(error.to_string()),
            }
            // Absent: sent again, under the lease it was first sent under
            // and only while that is writable.
            if shared.writable_lease() != Some(lease) {
                return not_live();
            }
        }
        match shared
            .gateway
            .create_if_absent(&queue, key, &value, lease)
            .await
        {
            Ok(Creation::Created(created_now)) => return created(created_now.create_revision),
            // After an uncertain attempt, the read above tells whose.
            Ok(Creation::Exists) if uncertain => {}
            Ok(Creation::Exists) => return exists(key),
            Err(Error::Uncertain { failure }) => {
                tracing::debug!(
                    "cluster: a create of {} may have been committed, reading it: {failure}",
                    String::from_utf8_lossy(key)
                );
                uncertain = true;
            }
            Err(error) => return unavailable(error.to_string()),
        }
    }
}

fn created(create_revision: i64) -> Written {
    match u64::try_from(create_revision) {
        Ok(revision) if revision > 0 => Written::Created { revision },
        _ => unavailable(format!(
            "etcd answered a create with the revision {create_revision}"
        )),
    }
}

fn exists(key: &[u8]) -> Written {
    unavailable(format!(
        "the key {} is in etcd already: another daemon may have been given this host's name",
        String::from_utf8_lossy(key)
    ))
}

/// Rewrites an entry's key, only if it is there, keeping its place.
async fn rewrite(shared: &Shared, key: &[u8], record: SharedRecord) -> Written {
    let value = record_of(record).encode();
    let Some(lease) = shared.lease_to_write().await else {
        return not_live();
    };
    loop {
        match shared.gateway.rewrite(key, &value, lease).await {
            Ok(Rewrite::Rewritten { revision }) => {
                return match u64::try_from(revision) {
                    Ok(revision) => Written::Rewritten { revision },
                    Err(_) => unavailable(format!(
                        "etcd answered a rewrite with the revision {revision}"
                    )),
                };
            }
            Ok(Rewrite::Missing) => {
                return unavailable(format!(
                    "the key {} is no longer in etcd: its lease ended",
                    String::from_utf8_lossy(key)
                ));
            }
            Err(Error::Uncertain { failure }) => {
                tracing::debug!(
                    "cluster: a rewrite of {} may have been committed, reading it: {failure}",
                    String::from_utf8_lossy(key)
                );
            }
            Err(error) => return unavailable(error.to_string()),
        }
        // Uncertain: the key holding this value says it landed. Otherwise
        // it is written again, which writes the same value.
        loop {
            tokio::time::sleep(RETRY_PAUSE).await;
            match shared.gateway.get(key).await {
                Ok((_, Some(kv))) if kv.value == value => {
                    return match u64::try_from(kv.mod_revision) {
                        Ok(revision) => Written::Rewritten { revision },
                        Err(_) => unavailable("etcd showed a negative revision"),
                    };
                }
                Ok(_) => break,
                Err(_) if shared.may_hold(lease) => {}
                Err(error) => return unavailable(error.to_string()),
            }
        }
        if shared.writable_lease() != Some(lease) {
            return not_live();
        }
    }
}

/// Deletes an entry's key with why it left beside it, sent again (after
/// the lease's pause) until etcd answers or the lease is gone, since the
/// key goes with its lease anyway. Sending it again is safe even when an
/// attempt may have landed: the transaction deletes the key, and writes
/// the reason, only if the key is there, and once an entry has left
/// nothing creates its key again (the writes to one key run in order, and
/// its id is a ref not given out twice); so an attempt that lands after
/// another finds the key gone and changes nothing.
async fn delete(shared: &Shared, key: &[u8], reason_key: &[u8], departure: &Departure) {
    let value = departure.encode();
    let Some(lease) = held_lease(&shared.lease.borrow().state) else {
        return;
    };
    loop {
        match shared
            .gateway
            .delete_with_reason(key, reason_key, &value, lease)
            .await
        {
            Ok(_) => return,
            // Failed or uncertain: sent again, which deletes nothing new
            // (see above).
            Err(error) if shared.may_hold(lease) => {
                tracing::debug!(
                    "cluster: deleting {} failed, trying again: {error}",
                    String::from_utf8_lossy(key)
                );
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(error) => {
                tracing::debug!(
                    "cluster: {} went with lease {lease}: {error}",
                    String::from_utf8_lossy(key)
                );
                return;
            }
        }
    }
}

/// Moves a restored entry's key, found where the hand-over left it, to
/// the live lease, keeping its value and create revision. A key gone
/// meanwhile, or on the live lease already, is left alone: the watch shows
/// what became of it. If etcd cannot be reached while the lease holds,
/// the key is read and moved again; once the lease is gone, nothing is
/// left to do (the key ends with the hand-over lease, and the entry is
/// queued again when the watch shows that).
async fn adopt(shared: &Shared, key: &[u8]) {
    let Some(lease) = shared.lease_to_write().await else {
        tracing::warn!(
            "cluster: {} not moved to this daemon's lease, which is not live; it ends with \
             the hand-over lease",
            String::from_utf8_lossy(key)
        );
        return;
    };
    loop {
        let error = match shared.gateway.get(key).await {
            Ok((_, None)) => return,
            Ok((_, Some(kv))) if kv.lease == lease.0 => return,
            Ok((_, Some(kv))) => match shared.gateway.move_to_lease(&[kv], lease).await {
                Ok(moved) => {
                    if !moved.missing.is_empty() {
                        tracing::debug!(
                            "cluster: {} changed before it was moved to lease {lease}",
                            String::from_utf8_lossy(key)
                        );
                    }
                    return;
                }
                Err(error) => error,
            },
            Err(error) => error,
        };
        if !shared.may_hold(lease) {
            tracing::warn!(
                "cluster: {} not moved to lease {lease}, which ended: {error}",
                String::from_utf8_lossy(key)
            );
            return;
        }
        tracing::debug!(
            "cluster: moving {} to lease {lease} failed, trying again: {error}",
            String::from_utf8_lossy(key)
        );
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_sees_a_lease_live_only_once_the_host_name_is_claimed_on_it() {
        let now = BootInstant::now();
        let live = LeaseState::Live {
            lease: LeaseId(7),
            renewed_at: now,
            fence_at: now + Duration::from_secs(4),
        };
        assert_eq!(lease_view(&live, None), LeaseView::Granting);
        assert_eq!(lease_view(&live, Some(LeaseId(6))), LeaseView::Granting);
        assert_eq!(
            lease_view(&live, Some(LeaseId(7))),
            LeaseView::Live {
                lease: 7,
                fence_at: (now + Duration::from_secs(4)).since_boot()
            }
        );
        let fenced = LeaseState::Fenced {
            lease: LeaseId(7),
            renewed_at: now,
            fenced_at: now,
        };
        assert_eq!(
            lease_view(&fenced, Some(LeaseId(7))),
            LeaseView::Fenced { lease: 7 },
            "the core is told which lease is fenced: one it has not heard of ended the last"
        );
        assert_eq!(lease_view(&LeaseState::Stopped, None), LeaseView::Stopped);
        assert_eq!(held_lease(&fenced), Some(LeaseId(7)));
        assert_eq!(held_lease(&LeaseState::Granting), None);
    }

    fn live(lease: i64, now: BootInstant) -> LeaseState {
        LeaseState::Live {
            lease: LeaseId(lease),
            renewed_at: now,
            fence_at: now + Duration::from_secs(4),
        }
    }

    #[test]
    fn a_new_lease_seen_straight_after_the_claimed_one_is_told_as_its_end_before_it_is_claimed() {
        let now = BootInstant::now();
        let first = live(1, now);
        let live_view = lease_view(&first, Some(LeaseId(1)));
        assert_eq!(
            next_step(&first, Some(LeaseId(1)), Some(live_view)),
            Step::Wait
        );
        // The keeper went Granting and on to lease 2 before the task
        // looked again: the core hears lease 1 ended, then the claim.
        let second = live(2, now);
        assert_eq!(
            next_step(&second, Some(LeaseId(1)), Some(live_view)),
            Step::Tell(LeaseView::Granting)
        );
        assert_eq!(
            next_step(&second, Some(LeaseId(1)), Some(LeaseView::Granting)),
            Step::Claim(LeaseId(2))
        );
        // Fenced on lease 1, then lease 2 live: the same.
        let fenced = LeaseState::Fenced {
            lease: LeaseId(1),
            renewed_at: now,
            fenced_at: now,
        };
        let fenced_view = lease_view(&fenced, Some(LeaseId(1)));
        assert_eq!(
            next_step(&fenced, Some(LeaseId(1)), Some(live_view)),
            Step::Tell(fenced_view)
        );
        assert_eq!(
            next_step(&second, Some(LeaseId(1)), Some(fenced_view)),
            Step::Tell(LeaseView::Granting)
        );
        // A new lease fenced before its claim is no lease the core has:
        // lease 1's end is told, once, and lease 2 is claimed once live.
        let second_fenced = LeaseState::Fenced {
            lease: LeaseId(2),
            renewed_at: now,
            fenced_at: now,
        };
        assert_eq!(
            next_step(&second_fenced, Some(LeaseId(1)), Some(live_view)),
            Step::Tell(LeaseView::Granting)
        );
        assert_eq!(
            next_step(&second_fenced, Some(LeaseId(1)), Some(LeaseView::Granting)),
            Step::Wait
        );
        assert_eq!(
            next_step(&second, Some(LeaseId(1)), Some(LeaseView::Granting)),
            Step::Claim(LeaseId(2))
        );
        // Once claimed, the core hears it live.
        assert_eq!(
            next_step(&second, Some(LeaseId(2)), Some(LeaseView::Granting)),
            Step::Tell(lease_view(&second, Some(LeaseId(2))))
        );
    }

    #[test]
    fn the_first_lease_is_claimed_after_the_core_hears_it_is_being_granted() {
        let now = BootInstant::now();
        assert_eq!(
            next_step(&LeaseState::Granting, None, None),
            Step::Tell(LeaseView::Granting)
        );
        assert_eq!(
            next_step(&live(1, now), None, None),
            Step::Tell(LeaseView::Granting)
        );
        assert_eq!(
            next_step(&live(1, now), None, Some(LeaseView::Granting)),
            Step::Claim(LeaseId(1))
        );
        assert_eq!(
            next_step(
                &LeaseState::Stopped,
                Some(LeaseId(1)),
                Some(LeaseView::Granting)
            ),
            Step::Tell(LeaseView::Stopped)
        );
    }

    #[test]
    fn only_a_claim_of_this_boot_on_this_database_is_taken_for_an_earlier_run_of_this_daemon() {
        let database = DatabaseIdentity {
            device: 2049,
            inode: 77,
        };
        let claimant = Claimant {
            boot_id: "boot-1".to_owned(),
            process: ProcessId {
                pid: 100,
                start_time: 5,
            },
            database,
        };
        let claim = |boot_id: &str, database: Option<DatabaseIdentity>| HostClaim {
            v: RECORD_VERSION,
            host: "web-1".to_owned(),
            boot_id: boot_id.to_owned(),
            // A pid that runs nothing here says nothing: it may be
            // another container's.
            pid: 4242,
            start_time: 1,
            database,
        };
        assert!(is_predecessor(
            Some(&claim("boot-1", Some(database))),
            &claimant
        ));
        let other_file = DatabaseIdentity {
            device: 2049,
            inode: 78,
        };
        assert!(!is_predecessor(
            Some(&claim("boot-1", Some(other_file))),
            &claimant
        ));
        assert!(!is_predecessor(Some(&claim("boot-1", None)), &claimant));
        // This database before a reboot: waited out, not revoked.
        assert!(!is_predecessor(
            Some(&claim("boot-0", Some(database))),
            &claimant
        ));
        assert!(!is_predecessor(None, &claimant));
        // A claim written before claims named their database still reads.
        let old = br#"{"v":1,"host":"web-1","boot_id":"boot-1","pid":4242,"start_time":1}"#;
        assert_eq!(HostClaim::decode(old), Some(claim("boot-1", None)));
    }

    #[test]
    fn a_reason_is_due_for_the_sweep_once_seen_unchanged_for_a_minute() {
        let reason = |key: &str, mod_revision: i64| Kv {
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            create_revision: mod_revision,
            mod_revision,
            version: 1,
            lease: 7,
        };
        let keys = |due: Vec<Kv>| -> Vec<Vec<u8>> { due.into_iter().map(|kv| kv.key).collect() };
        let start = BootInstant::now();
        let mut ages = ReasonAges::default();
        let read = [reason("r/t/a:p1", 10), reason("r/t/a:p2", 11)];
        assert!(ages.due(read.clone().into_iter(), start).is_empty());
        let almost = start + (KEEP_REASONS_FOR - Duration::from_millis(1));
        assert!(ages.due(read.clone().into_iter(), almost).is_empty());
        // Written again meanwhile: as new as that.
        let rewritten = [reason("r/t/a:p1", 10), reason("r/t/a:p2", 20)];
        let due = ages.due(rewritten.clone().into_iter(), start + KEEP_REASONS_FOR);
        assert_eq!(keys(due), [b"r/t/a:p1".to_vec()]);
        // One gone is forgotten: seen again, it is new.
        let later = start + KEEP_REASONS_FOR + Duration::from_secs(1);
        assert!(
            ages.due([reason("r/t/a:p2", 20)].into_iter(), later)
                .is_empty()
        );
        assert!(
            ages.due(rewritten.into_iter(), later + Duration::from_secs(1))
                .is_empty()
        );
        assert_eq!(ages.seen.len(), 2);
    }

    #[test]
    fn a_create_revision_not_above_zero_is_no_answer() {
        assert_eq!(created(12), Written::Created { revision: 12 });
        assert!(matches!(created(0), Written::Refused(_)));
        assert!(matches!(created(-3), Written::Refused(_)));
    }
}
