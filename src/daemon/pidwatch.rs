//! Watches the processes that own entries, and tells the core the moment
//! one exits.
//!
//! Each process is watched once, by a pidfd registered with tokio, however
//! many entries it owns. Where the kernel has no pidfds the watcher falls
//! back to looking at `/proc` on an interval, and says so in the log and in
//! `status`.
//!
//! A watched process is known by its pidfs inode where pidfds have one
//! (Linux 6.9 on), and only otherwise by its pid and start time: the start
//! time counts in ticks of 10 ms, within which a pid can pass to another
//! process where pids are few, and a track of a connection's own process
//! that finds it watched needs no watch of its own.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::driver::CoreHandle;
use super::lock;
use crate::core::Input;
use crate::core::registry::ProcessId;
use crate::sys::{self, ExitWatch, PinnedPeer};

/// How often the fallback looks at `/proc` when pidfds are unavailable.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct PidWatcher {
    inner: Arc<Inner>,
}

/// How a watched process is told apart from every other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Watched {
    /// By its pidfs inode, never given to another process in the boot.
    Inode(u64),
    /// By pid and start time, where pidfds have no inode of their own (or
    /// there is no pidfd, and `/proc` is polled).
    Process(ProcessId),
}

impl Watched {
    fn of(process: ProcessId, pidfs_inode: Option<u64>) -> Watched {
        pidfs_inode.map_or(Watched::Process(process), Watched::Inode)
    }
}

struct Inner {
    watched: Mutex<HashSet<Watched>>,
    core: CoreHandle,
    polling: AtomicBool,
}

impl PidWatcher {
    /// A watcher that tells `core`; `polling` as [`pidfds_unavailable`]
    /// found.
    pub fn new(core: CoreHandle, polling: bool) -> PidWatcher {
        PidWatcher {
            inner: Arc::new(Inner {
                watched: Mutex::new(HashSet::new()),
                core,
                polling: AtomicBool::new(polling),
            }),
        }
    }

    /// Opens a watch on whatever process has `pid` now, before an entry is
    /// tracked for it, and returns that process with its watch. Fails with
    /// `NotFound` when it is not running. The caller must send its track
    /// command to the core before calling [`PidWatcher::arm`], so that the
    /// exit can never overtake it.
    pub fn prepare_pid(&self, pid: u32) -> io::Result<(ProcessId, Prepared)> {
        let watch = self.open_unless_polling(ExitWatch::open_pid(pid))?;
        let process = sys::process_id(pid)?;
        let prepared = Prepared::new(process, watch);
        if !prepared.still_running() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok((process, prepared))
    }

    /// Opens a watch on a known process (pid and start time).
    fn prepare(&self, process: ProcessId) -> io::Result<Prepared> {
        let watch = self.open_unless_polling(ExitWatch::open(process))?;
        self.prepared(process, watch)
    }

    /// Opens a watch on a connection's own process, as pinned when the
    /// connection was accepted. Fails with `NotFound` when that process
    /// has exited, even if its pid now belongs to another.
    pub fn prepare_peer(&self, peer: &PinnedPeer) -> io::Result<Prepared> {
        let watch = self.open_unless_polling(ExitWatch::open_peer(peer))?;
        self.prepared(peer.process, watch)
    }

    fn prepared(&self, process: ProcessId, watch: Option<ExitWatch>) -> io::Result<Prepared> {
        let prepared = Prepared::new(process, watch);
        if !prepared.still_running() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(prepared)
    }

    /// A pidfd, or `None` where the kernel has none and polling must do.
    fn open_unless_polling(&self, opened: io::Result<ExitWatch>) -> io::Result<Option<ExitWatch>> {
        match opened {
            Ok(watch) => Ok(Some(watch)),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                if !self.inner.polling.swap(true, Ordering::Relaxed) {
                    warn_polling();
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Holds the watch list if a connection's pinned process is on it.
    /// While the returned guard lives, the process's exit cannot reach the
    /// core, so a track sent under it arrives first, as a track sent
    /// before [`PidWatcher::arm`] does. Tracks of an already watched
    /// process need no new watch.
    ///
    /// The process is looked for as [`ExitWatch::open_peer`] would confirm
    /// it: by its pidfs inode where it has one. Its pid and start time
    /// alone could name another process that was given its pid within the
    /// same tick of the clock, perhaps another user's, watched for entries
    /// of its own.
    pub fn hold_if_watched(&self, peer: &PinnedPeer) -> Option<Held<'_>> {
        let watched = lock(&self.inner.watched);
        let key = Watched::of(peer.process, peer.pidfs_inode);
        watched.contains(&key).then_some(Held { _watched: watched })
    }

    /// Starts watching, unless the process is already watched.
    pub fn arm(&self, prepared: Prepared) {
        let mut watched = lock(&self.inner.watched);
        if !watched.insert(prepared.key) {
            return;
        }
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let (process, key) = (prepared.process, prepared.key);
            if let Err(e) = sys::exited(process, prepared.watch, POLL_INTERVAL).await {
                // The pidfd could not be waited on (out of resources to
                // register it); the process may well live on, so polling
                // takes over rather than reaping it now.
                tracing::warn!(
                    pid = process.pid,
                    "waiting on the pidfd failed ({e}); watching the process by polling /proc"
                );
                // Polling cannot fail: a look that cannot tell is retried.
                let _ = sys::exited(process, None, POLL_INTERVAL).await;
            }
            // Removing and queueing under the lock keeps the order: a
            // track for this process that saw it watched was queued before
            // this. The core runs once the lock is let go.
            {
                let mut watched = lock(&inner.watched);
                watched.remove(&key);
                let _ = inner.core.queue(Input::ProcessExited(process).into());
            }
            inner.core.drive_soon().await;
        });
    }

    /// Prepares and arms in one step, for processes whose entries the core
    /// already holds (restored at start).
    pub fn watch(&self, process: ProcessId) {
        match self.prepare(process) {
            Ok(prepared) => self.arm(prepared),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = self.inner.core.send(Input::ProcessExited(process).into());
            }
            // No pidfd to be had (out of file descriptors): the process may
            // well live on, so it is watched by polling instead of reaped.
            Err(e) => {
                tracing::warn!(
                    pid = process.pid,
                    "cannot open a pidfd ({e}); watching the process by polling /proc"
                );
                self.arm(Prepared::new(process, None));
            }
        }
    }
}

/// The watch list, held (see [`PidWatcher::hold_if_watched`]).
pub struct Held<'a> {
    /// Only held: while it is, no exit is sent to the core.
    _watched: MutexGuard<'a, HashSet<Watched>>,
}

/// A watch opened but not yet running.
pub struct Prepared {
    process: ProcessId,
    key: Watched,
    watch: Option<ExitWatch>,
}

impl Prepared {
    fn new(process: ProcessId, watch: Option<ExitWatch>) -> Prepared {
        let inode = watch.as_ref().and_then(ExitWatch::pidfs_inode);
        Prepared {
            process,
            key: Watched::of(process, inode),
            watch,
        }
    }

    /// Whether the pinned process still runs.
    pub fn still_running(&self) -> bool {
        match &self.watch {
            Some(watch) => !watch.has_exited(),
            // If /proc cannot tell now, the polling watch asks again later.
            None => sys::is_running(self.process).unwrap_or(true),
        }
    }
}

/// Whether the kernel has no pidfds, so that exits must be noticed by
/// polling `/proc`. Probed once, on ourselves, so that `status` can say
/// from the start how exits are noticed.
pub fn pidfds_unavailable() -> bool {
    let polling = sys::process_id(std::process::id())
        .and_then(ExitWatch::open)
        .is_err_and(|e| e.kind() == io::ErrorKind::Unsupported);
    if polling {
        warn_polling();
    }
    polling
}

fn warn_polling() {
    tracing::warn!(
        "pidfd_open is unavailable; watching processes by polling /proc every {:?}",
        POLL_INTERVAL
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::driver::Command;

    /// A process of our own to watch, pinned as a connection's would be.
    fn pinned_child() -> (std::process::Child, PinnedPeer) {
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .spawn()
            .unwrap();
        let process = sys::process_id(child.id()).unwrap();
        let inode = ExitWatch::open_pid(child.id()).unwrap().pidfs_inode();
        let peer = PinnedPeer {
            process,
            own_pid: child.id(),
            in_nested_pid_namespace: false,
            pidfs_inode: inode,
        };
        (child, peer)
    }

    /// Where the kernel has no pidfds (before Linux 5.3), opening one says
    /// `Unsupported`: the watcher turns to polling `/proc`, and a polled
    /// process's exit is told all the same.
    /// Kills `child` and waits (10 s at most) for its exit to reach the core.
    async fn kill_and_expect_exit_told(
        core: &CoreHandle,
        mut child: std::process::Child,
        peer: &PinnedPeer,
    ) {
        child.kill().unwrap();
        child.wait().unwrap();
        let exited = tokio::time::timeout(Duration::from_secs(10), core.next_queued())
            .await
            .expect("the exit is told within 10 s");
        assert!(matches!(exited, Command::Input(Input::ProcessExited(p)) if p == peer.process));
    }

    #[tokio::test]
    async fn without_pidfds_a_process_is_watched_by_polling_and_its_exit_told() {
        let core = CoreHandle::detached();
        let pids = PidWatcher::new(core.clone(), false);
        let no_pidfds = pids.open_unless_polling(Err(io::Error::from(io::ErrorKind::Unsupported)));
        assert!(
            matches!(no_pidfds, Ok(None)),
            "a watch of none, not an error"
        );
        assert!(
            pids.inner.polling.load(Ordering::Relaxed),
            "polling from now on"
        );

        let (child, peer) = pinned_child();
        let prepared = pids.prepared(peer.process, None).unwrap();
        pids.arm(prepared);
        assert!(
            tokio::time::timeout(POLL_INTERVAL * 3, core.next_queued())
                .await
                .is_err(),
            "nothing is told while the process runs"
        );
        kill_and_expect_exit_told(&core, child, &peer).await;
    }

    #[tokio::test]
    async fn a_watched_process_is_known_by_its_inode_not_by_pid_and_start_time_alone() {
        let core = CoreHandle::detached();
        let pids = PidWatcher::new(core.clone(), false);
        let (child, peer) = pinned_child();
        assert!(pids.hold_if_watched(&peer).is_none(), "not watched yet");
        pids.arm(pids.prepare_peer(&peer).unwrap());
        assert!(pids.hold_if_watched(&peer).is_some());
        if let Some(inode) = peer.pidfs_inode {
            // Another process with the same pid and start time: one that
            // was given the pid within the same tick, after ours exited.
            let impostor = PinnedPeer {
                pidfs_inode: Some(inode + 1),
                ..peer
            };
            assert!(
                pids.hold_if_watched(&impostor).is_none(),
                "a pid and start time are not enough to pass for a watched process"
            );
        }

        kill_and_expect_exit_told(&core, child, &peer).await;
        assert!(pids.hold_if_watched(&peer).is_none(), "no longer watched");
    }
}
