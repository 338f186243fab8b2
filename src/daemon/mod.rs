//! The io layer: the socket (put back if it is deleted while the daemon
//! runs), one task pair per connection, process watchers, signals, and the
//! thread that drives the core (`core_thread.rs`: the channel, the clocks,
//! the store's commits, the outlets). It turns bytes into core inputs and
//! core output into bytes; it never decides who owns a topic.

mod connection;
mod core_thread;
mod listener;
mod outbound;
mod pidwatch;
mod systemd;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::core::store::{Retention, Store};
use crate::core::{Input, Stopped};
use crate::paths::SocketAccess;
use crate::protocol::Limits;
use connection::Shared;
use core_thread::{CoreThread, DaemonInfo, Exit};
use pidwatch::PidWatcher;

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
}

/// How long shutdown waits for the `shutdown` event to reach slow clients.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: DaemonConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    // Everything the daemon creates (database, journal, locks, socket) is
    // for its user alone, whatever umask it inherited.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let notified = std::env::var_os("NOTIFY_SOCKET").is_some_and(|value| !value.is_empty());
    let passed = systemd::passed_socket()?;
    // How we were started, for `status`: a client's flag first, since a
    // client run from a systemd service hands its environment down.
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
    let socket = claimed.socket().to_owned();

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
    listener::raise_fd_limit(config.limits.max_connections);

    let (core_tx, core_rx) = std::sync::mpsc::channel();
    let pids = PidWatcher::new(core_tx.clone());
    let info = DaemonInfo {
        socket: socket.clone(),
        started,
        pid_watch: pids.mode().to_owned(),
        started_by: started_by.to_owned(),
    };
    let core = CoreThread::start(
        store,
        config.limits,
        &boot_id,
        config.resume_grace,
        info,
        config.max_batch,
    )?;

    // Handlers first: a stop signal that arrives once we listen must shut
    // down cleanly, not kill us with the socket left behind.
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    // The socket before the watches: each watched process takes a pidfd,
    // and with more of them than descriptors the socket would find none.
    // Whoever connects meanwhile waits in the backlog.
    let mut serving = claimed.listen()?;
    for process in core.watched_processes() {
        pids.watch(process);
    }

    let (stopped_tx, mut stopped_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("presenced-core".into())
        .spawn(move || {
            let _ = stopped_tx.send(core.run(core_rx));
        })
        .context("starting the core thread")?;
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
        core: core_tx.clone(),
        pids,
        limits: config.limits,
        connections_by_uid: connection::ConnectionsByUid::new(
            config.limits.max_connections_per_uid,
            crate::sys::current_uid(),
        ),
        history: connection::HistoryReads::new(history),
        outbound: outbound::OutboundBudget::new(config.limits.max_outbound_total_bytes),
    });
    tokio::spawn(Arc::clone(&shared.outbound).cut_off_stalled_holders());
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
                    if active.load(Ordering::Relaxed) >= config.limits.max_connections {
                        let max = config.limits.max_connections;
                        tokio::spawn(listener::refuse(
                            stream,
                            format!("the daemon is serving {max} connections, its limit; try again later"),
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
            _ = terminate.recv() => break "the daemon received SIGTERM",
            _ = interrupt.recv() => break "the daemon received SIGINT",
            // The core stops by itself only if it panicked: a failed commit
            // is rolled back and retried, and shutdown comes from here.
            _ = &mut stopped_rx => {
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
    let _ = core_tx.send(
        Input::Shutdown {
            reason: reason.to_owned(),
        }
        .into(),
    );
    let stopped = stopped_rx.await;
    drop(writers_alive);
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, writers_done.recv()).await;
    match stopped {
        Ok(Exit::Stopped(Stopped::Unsaved(e))) => Err(anyhow::Error::new(e)
            .context("departures held back by failed commits could not be saved before stopping")),
        _ => Ok(()),
    }
}
