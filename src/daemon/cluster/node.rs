//! Cluster mode as the daemon runs it: every task that connects the core
//! to etcd, over one [`Gateway`] they all share (so that when one call
//! moves the gateway off a member, the mirror's watch leaves it too).
//!
//! - The lease: a [`LeaseKeeper`], and a task that tells the core where
//!   the lease stands on every change ([`ClusterInput::Lease`]). Before a
//!   new lease counts as live, this host's name is claimed on it
//!   (`PREFIX h/HOST`, created only if absent): two daemons given one
//!   `--host` would write the same keys and each take the other's entries
//!   for its own. A claim held by another daemon stops cluster mode (the
//!   lease is revoked, every write refused, `status` says why); one left
//!   by this machine's own earlier daemon, killed before its lease ended,
//!   has its lease revoked, since that daemon's entries are gone with it.
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
//! ([`Error::Uncertain`]) is never reported refused while its key may
//! show: the key is read, and sent again if it is absent (the transaction
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
use super::record::{Departure, HostClaim, KeySpace, RECORD_VERSION, Record};
use crate::core::Input;
use crate::core::registry::{ClusterInput, ClusterWrite, LeaseView, SharedRecord, Written};
use crate::daemon::driver::CoreHandle;
use crate::ops::status::ClusterStatus;
use crate::process::ProcessId;
use crate::protocol::{ErrorBody, ErrorCode, Limits};
use crate::sys::BootInstant;

/// How often the mirror looks whether the gateway has moved off the
/// member it watches on: a load of one number, so often.
const CHECK_WATCHED_MEMBER_EVERY: Duration = Duration::from_millis(100);

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
    writes_in_flight: AtomicUsize,
}

/// What the probe reads once the tasks run.
struct ProbeLinks {
    gateway: Arc<Gateway>,
    lease: watch::Receiver<LeaseStatus>,
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
            status.last_error = lease.last_error.or(bridge.error);
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
        *super::super::lock(&probe.links) = Some(ProbeLinks {
            gateway: Arc::clone(&gateway),
            lease: keeper.status(),
            bridge: None,
        });
        let (claimed_tx, claimed) = watch::channel(None);
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
    /// Another daemon holds it: cluster mode must not go on.
    Taken(String),
    /// etcd could not be asked; try again.
    Failed(Error),
}

/// The lease's task: claims the host name on each new lease (and starts
/// the bridge after the first claim), tells the core where the lease
/// stands, and on being stopped (or refused the name) stops the keeper
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
    let mut status = keeper.status();
    let mut told: Option<LeaseView> = None;
    let refusal = loop {
        let state = status.borrow_and_update().state;
        if let LeaseState::Live { lease, .. } = state
            && *claimed.borrow() != Some(lease)
        {
            match claim_host(&shared, &claimant, lease).await {
                Claim::Held => {
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
        }
        let view = lease_view(&state, *claimed.borrow());
        if told != Some(view) {
            if !shared.tell_core(ClusterInput::Lease(view)).await {
                break None;
            }
            told = Some(view);
        }
        tokio::select! {
            asked = &mut stopped => {
                hand_over = asked.ok().flatten();
                break None;
            }
            changed = status.changed() => if changed.is_err() { break None },
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
/// this machine's earlier daemon's if it names this boot and a process
/// that no longer runs: that lease is revoked (its entries went with that
/// daemon) and the claim made again. Any other holder keeps the name.
async fn claim_host(shared: &Shared, claimant: &Claimant, lease: LeaseId) -> Claim {
    let key = shared.keys.host(&shared.host);
    let mut hosts = shared.keys.all();
    hosts.extend_from_slice(b"h/");
    let value = HostClaim {
        v: RECORD_VERSION,
        host: shared.host.clone(),
        boot_id: claimant.boot_id.clone(),
        pid: claimant.process.pid,
        start_time: claimant.process.start_time,
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
        let predecessor = holder.as_ref().is_some_and(|holder| {
            holder.boot_id == claimant.boot_id
                && !crate::sys::is_running(ProcessId {
                    pid: holder.pid,
                    start_time: holder.start_time,
                })
                .unwrap_or(true)
        });
        if predecessor && !revoked_predecessor {
            tracing::warn!(
                "cluster: host name {} is held by this machine's earlier daemon, which is \
                 gone; revoking its lease {:x}",
                shared.host,
                kv.lease
            );
            if let Err(error) = shared.gateway.revoke(LeaseId(kv.lease)).await {
                return Claim::Failed(error);
            }
            revoked_predecessor = true;
            continue;
        }
        return Claim::Taken(match holder {
            Some(holder) if holder.boot_id == claimant.boot_id => {
                format!("pid {} on this machine, lease {:x}", holder.pid, kv.lease)
            }
            Some(holder) => format!(
                "pid {} on another machine (boot {}), lease {:x}",
                holder.pid, holder.boot_id, kv.lease
            ),
            None => format!("an unreadable claim, lease {:x}", kv.lease),
        });
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
    match write {
        ClusterWrite::Create { topic, id, .. }
        | ClusterWrite::Rewrite { topic, id, .. }
        | ClusterWrite::Delete { topic, id, .. }
        | ClusterWrite::Adopt { topic, id, .. } => keys.entry(topic, id),
    }
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
/// key goes with its lease anyway.
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

    #[test]
    fn a_create_revision_not_above_zero_is_no_answer() {
        assert_eq!(created(12), Written::Created { revision: 12 });
        assert!(matches!(created(0), Written::Refused(_)));
        assert!(matches!(created(-3), Written::Refused(_)));
    }
}
