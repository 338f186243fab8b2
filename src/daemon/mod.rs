//! The io layer: the socket (put back if it is deleted while the daemon
//! runs), one task pair per connection, process watchers, signals, and the
//! core's driver (`driver.rs`: the clocks, the store's commits, the
//! outlets, run by whichever thread has work for the core). It turns bytes
//! into core inputs and core output into bytes; it never decides who owns
//! a topic. `cluster/` is cluster mode: topics shared across hosts
//! through etcd, started here only when the daemon is given etcd's
//! endpoints.

pub mod cluster;
mod connection;
mod driver;
mod listener;
mod outbound;
mod pidwatch;
mod serializer;
mod socket;
mod systemd;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::core::registry::{ClusterSetup, DEFAULT_PARK_TIMEOUT, SharedTopicsFn};
use crate::core::store::{HistoryReaders, Store};
use crate::core::{Input, Stopped};
use crate::paths::SocketAccess;
use crate::protocol::Limits;
use cluster::record::DatabaseIdentity;
use cluster::{Claimant, ClusterNode, ClusterProbe};
use connection::Shared;
use driver::{ClusterLink, CoreHandle, DaemonInfo, Driver};
use pidwatch::PidWatcher;

/// The most commands one transaction takes, unless `--max-batch` says less.
pub use crate::core::MAX_BATCH as DEFAULT_MAX_BATCH;
/// How much history the daemon keeps, as `presence daemon`'s options set it.
pub use crate::core::store::Retention;
/// Cluster mode's settings, and their defaults, as `presence daemon`'s
/// options set them.
pub use cluster::{ClusterConfig, DEFAULT_PREFIX, LeaseSettings};

/// Everything `presence daemon` is told.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where to listen, unless systemd passes a socket in.
    pub socket: PathBuf,
    /// The group whose members may connect too, to a socket the daemon
    /// binds itself; a socket systemd passes in has the group systemd gave.
    pub group: Option<String>,
    pub db: PathBuf,
    pub limits: Limits,
    /// How long a connection entry restored at start waits to be resumed.
    pub resume_grace: Duration,
    /// How much history to keep.
    pub history: Retention,
    /// Print `ready` on stdout once the socket listens (used by auto-start).
    pub ready_on_stdout: bool,
    /// Most commands per transaction.
    pub max_batch: usize,
    /// A client started us on demand (the hidden `--autostarted`).
    pub autostarted: bool,
    /// Topics shared across hosts through etcd; `None` keeps every topic
    /// local, and the daemon then starts no cluster task and makes no
    /// etcd request.
    pub cluster: Option<ClusterConfig>,
}

/// How long shutdown waits for the `shutdown` event to reach slow clients.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGTERM or SIGINT: what `presence daemon` does.
pub fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        // Handlers first: a stop signal that arrives once we listen must
        // shut down cleanly, not kill us with the socket left behind.
        let mut terminate =
            signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut daemon = start(config).await?;
        let reason = tokio::select! {
            _ = terminate.recv() => "the daemon received SIGTERM",
            _ = interrupt.recv() => "the daemon received SIGINT",
            served = &mut daemon.served => return served.context("the daemon's accept loop")?,
        };
        daemon.stop(reason).await
    })
}

/// A daemon serving its socket, started by [`start`]; it serves until
/// [`Daemon::stop`].
pub struct Daemon {
    socket: PathBuf,
    shutdown: tokio::sync::oneshot::Sender<String>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    /// The socket it serves: the configured path, or the one systemd
    /// passed in.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Tells every client why, commits what is left, and returns once the
    /// daemon has stopped. An error says what could not be saved.
    pub async fn stop(self, reason: &str) -> anyhow::Result<()> {
        // A daemon whose loop already ended has nobody to tell; its end
        // is the answer.
        let _ = self.shutdown.send(reason.to_owned());
        self.served.await.context("the daemon's accept loop")?
    }
}

/// Starts a daemon: claims the socket, opens the database, restores the
/// registry from it, listens, and serves on the current runtime until
/// [`Daemon::stop`]. Returns once clients can connect (and systemd has
/// been told so).
pub async fn start(config: DaemonConfig) -> anyhow::Result<Daemon> {
    let started = Instant::now();
    // Everything the daemon creates (database, journal, locks, socket) is
    // for its user alone, whatever umask it inherited.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let (claimed, started_by) = claim_socket(&config).await?;
    let socket = claimed.socket().to_owned();
    let opened = open_store(&config)?;

    let polling = pidwatch::pidfds_unavailable();
    let info = DaemonInfo {
        socket: socket.clone(),
        started,
        pid_watch: if polling { "polling" } else { "pidfd" }.to_owned(),
        started_by: started_by.to_owned(),
    };
    // The writer's channel before the driver, which hands it the core's
    // writes; the tasks that read it need the core's handle, so they
    // start after it.
    let (link, cluster) = match &config.cluster {
        Some(cluster) => {
            let (writes, writes_rx) = tokio::sync::mpsc::unbounded_channel();
            let probe = ClusterProbe::new(cluster);
            let shared = cluster.shared.clone();
            let link = ClusterLink {
                setup: ClusterSetup {
                    host: cluster.host.clone(),
                    shared: SharedTopicsFn::new(move |topic| shared.includes(topic)),
                    // A write may wait a whole TTL for a lease to be
                    // granted (the daemon has just started, or etcd ended
                    // the last lease), then take a few attempts: a request
                    // gives up only once that could not have been enough.
                    park_timeout: (2 * cluster.lease.ttl).max(DEFAULT_PARK_TIMEOUT),
                },
                writes,
                probe: Arc::clone(&probe),
            };
            (Some(link), Some((cluster, writes_rx, probe)))
        }
        None => (None, None),
    };
    let driver = Driver::start(
        opened.store,
        config.limits,
        &opened.boot_id,
        config.resume_grace,
        info,
        config.max_batch,
        link,
    )?;

    // The socket before the watches: each watched process takes a pidfd,
    // and with more of them than descriptors the socket would find none.
    // Whoever connects meanwhile waits in the backlog.
    listener::raise_fd_limit(config.limits.max_connections);
    let serving = claimed.listen()?;
    let watched = driver.watched_processes();
    let (core, core_stopped) = CoreHandle::start(driver).context("starting the core's driver")?;
    let pids = PidWatcher::new(core.clone(), polling);
    for process in watched {
        pids.watch(process);
    }
    let cluster = match cluster {
        Some((cluster, writes, probe)) => {
            let claimant = Claimant {
                boot_id: opened.boot_id.clone(),
                process: crate::sys::process_id(std::process::id())
                    .context("reading the daemon's start time")?,
                database: DatabaseIdentity::of(&config.db).with_context(|| {
                    format!(
                        "reading the identity of the database {}",
                        config.db.display()
                    )
                })?,
            };
            tracing::info!(
                "cluster mode: host {}, sharing {:?} through etcd at {}",
                cluster.host,
                cluster.patterns,
                cluster.endpoints.join(",")
            );
            Some(ClusterNode::start(
                cluster,
                config.limits,
                claimant,
                core.clone(),
                writes,
                probe,
            )?)
        }
        None => None,
    };
    tracing::info!(
        "presenced {} listening on {} (database {})",
        env!("CARGO_PKG_VERSION"),
        socket.display(),
        config.db.display()
    );
    // Only now: the database is loaded and the socket serves.
    systemd::notify_ready(&format!("serving {}", socket.display()));
    if config.ready_on_stdout {
        // Whoever started us may have given up waiting; that is no reason
        // to fail.
        let mut stdout = std::io::stdout();
        let _ = std::io::Write::write_all(&mut stdout, b"ready\n")
            .and_then(|()| std::io::Write::flush(&mut stdout));
    }

    let shared = Arc::new(Shared {
        core,
        pids,
        limits: config.limits,
        connections_by_uid: connection::ConnectionsByUid::new(
            config.limits.max_connections_per_uid,
            crate::sys::current_uid(),
        ),
        user_names: connection::UserNames::new(),
        history: connection::HistoryReads::new(opened.history),
        outbound: outbound::OutboundBudget::new(config.limits.max_outbound_total_bytes),
    });
    let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel();
    let cluster = cluster.map(|node| (node, config.resume_grace));
    let served = tokio::spawn(serve(serving, shared, core_stopped, shutdown_rx, cluster));
    Ok(Daemon {
        socket,
        shutdown,
        served,
    })
}

/// Takes the socket: the one systemd passed in, or the configured path.
/// Says how the daemon was started, for `status`.
async fn claim_socket(config: &DaemonConfig) -> anyhow::Result<(listener::Claimed, &'static str)> {
    let notified = std::env::var_os("NOTIFY_SOCKET").is_some_and(|value| !value.is_empty());
    let passed = systemd::passed_socket()?;
    // A client's flag first, since a client run from a systemd service
    // hands its environment down.
    let started_by = if config.autostarted {
        "autostart"
    } else if passed.is_some() || notified {
        "systemd"
    } else {
        "foreground"
    };
    let claimed = match passed {
        Some(passed) => {
            if passed.path != config.socket {
                tracing::info!(
                    "serving the socket systemd passed, {}, rather than {}",
                    passed.path.display(),
                    config.socket.display()
                );
            }
            listener::claim_passed(passed)
        }
        None => {
            let access = match &config.group {
                Some(name) => SocketAccess::group(name)?,
                None => SocketAccess::Owner,
            };
            listener::claim(&config.socket, &access).await?
        }
    };
    Ok((claimed, started_by))
}

/// The database, opened for the core's writes and for `history`'s reads,
/// and the boot it is opened in.
struct OpenedStore {
    store: Store,
    history: HistoryReaders,
    boot_id: String,
}

fn open_store(config: &DaemonConfig) -> anyhow::Result<OpenedStore> {
    if let Some(dir) = config.db.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::paths::ensure_private_dir(dir)
            .with_context(|| format!("preparing the database folder {}", dir.display()))?;
    }
    let boot_id = crate::sys::boot_id().context("reading the boot id")?;
    let mut store = Store::open(&config.db, boot_id.clone())
        .with_context(|| format!("opening the database {}", config.db.display()))?;
    store.set_retention(config.history);
    let history = store
        .history_readers()
        .with_context(|| format!("opening the database {} to read", config.db.display()))?;
    Ok(OpenedStore {
        store,
        history,
        boot_id,
    })
}

/// Accepts connections until told to stop, then shuts down: the socket
/// goes first, every client is told why, the core commits and stops, and
/// the writers get a moment to send what they owe.
async fn serve(
    mut serving: listener::Serving,
    shared: Arc<Shared>,
    mut core_stopped: tokio::sync::oneshot::Receiver<Stopped>,
    mut shutdown: tokio::sync::oneshot::Receiver<String>,
    cluster: Option<(ClusterNode, Duration)>,
) -> anyhow::Result<()> {
    tokio::spawn(Arc::clone(&shared.outbound).cut_off_stalled_holders());
    let max_connections = shared.limits.max_connections;
    let active = Arc::new(AtomicUsize::new(0));
    // Every writer holds a clone; when all are gone, every client has been
    // sent everything it was owed.
    let (writers_alive, mut writers_done) = tokio::sync::mpsc::channel::<()>(1);
    let mut next_conn = 0u64;

    let reason = loop {
        tokio::select! {
            accepted = serving.accept() => match accepted {
                Ok(stream) => {
                    next_conn += 1;
                    let conn = next_conn;
                    if active.load(Ordering::Relaxed) >= max_connections {
                        tokio::spawn(listener::refuse(
                            stream,
                            format!("the daemon is serving {max_connections} connections, its limit; try again later"),
                        ));
                        continue;
                    }
                    active.fetch_add(1, Ordering::Relaxed);
                    let shared = Arc::clone(&shared);
                    let active = Arc::clone(&active);
                    let alive = writers_alive.clone();
                    tokio::spawn(async move {
                        connection::serve(stream, conn, shared, alive).await;
                        active.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    // Out of descriptors is handled by `accept` itself;
                    // whatever else fails, do not spin on it.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            reason = &mut shutdown => {
                break reason.unwrap_or_else(|_| "the daemon's handle was dropped".to_owned());
            }
            // The core stops by itself only if it failed (a panic while
            // running it): a failed commit is rolled back and retried, and
            // shutdown comes from here.
            _ = &mut core_stopped => {
                return Err(anyhow::anyhow!("the core stopped unexpectedly"));
            }
        }
    };

    tracing::info!("shutting down: {reason}");
    systemd::notify_stopping(&format!("shutting down: {reason}"));
    // Clients told of the shutdown reconnect at once; they must find no
    // socket, not a backlog that will never be served.
    let _socket_claim = serving
        .stop_listening()
        .inspect_err(|e| tracing::warn!("the socket lock goes early: {e}"))
        .ok();
    let _ = shared.core.send(Input::Shutdown { reason }.into());
    let stopped = core_stopped.await;
    // With the core stopped nothing more is written. This host's entries
    // keep their places for the resume grace, as on one host: their keys
    // are handed over to a lease that long before the daemon's own lease
    // is revoked (its host claim goes with it, for the next daemon).
    if let Some((cluster, resume_grace)) = cluster {
        cluster.stop(Some(resume_grace)).await;
    }
    drop(writers_alive);
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, writers_done.recv()).await;
    match stopped {
        Ok(Stopped::Unsaved(e)) => Err(anyhow::Error::new(e)
            .context("departures held back by failed commits could not be saved before stopping")),
        _ => Ok(()),
    }
}

/// Takes a lock of the io layer. A panic while one of its locks was held
/// leaves plain data behind (counts, queues, sets of names), whole between
/// statements, so the daemon carries on with it rather than fail every
/// later caller.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
