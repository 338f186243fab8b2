//! What resolving a request asks of the system, for one request line: the
//! io layer's side of [`ops::System`]. It pins and watches processes with
//! the connection's [`PidWatcher`](crate::daemon::pidwatch::PidWatcher), reads `/proc` through `sys`, and draws
//! randomness; a watch it opens is kept until the resolved request has
//! reached the core ([`LineResolver::sent`]), so that the process's exit
//! can never reach the core ahead of the entry it should remove.

use super::Shared;
use crate::core::registry::{Peer, ProcessId};
use crate::daemon::pidwatch::{Held, Prepared};
use crate::ops::{self, Connector, WatchFailure};
use crate::protocol::{HistoryRequest, Limits};
use crate::sys::{self, PeerProcess};

pub struct LineResolver<'a> {
    shared: &'a Shared,
    peer: &'a Peer,
    pinned: Option<PeerProcess>,
    /// The connecting process's watch, held because it was on already: its
    /// exit waits while this lives.
    held: Option<Held<'a>>,
    /// A watch opened for the request, to start once it reached the core.
    prepared: Option<Prepared>,
}

impl<'a> LineResolver<'a> {
    pub fn new(shared: &'a Shared, peer: &'a Peer, pinned: Option<PeerProcess>) -> Self {
        LineResolver {
            shared,
            peer,
            pinned,
            held: None,
            prepared: None,
        }
    }

    /// The resolved request was handed to the core (`reached`), or not:
    /// a watch opened for it starts now, and a held one is let go.
    pub fn sent(self, reached: bool) {
        let LineResolver { held, prepared, .. } = self;
        drop(held);
        if let Some(prepared) = prepared
            && reached
        {
            self.shared.pids.arm(prepared);
        }
    }
}

/// 32 bytes from the kernel's random source; `None`, logged, when it has
/// none to give.
fn random_bytes() -> Option<[u8; 32]> {
    let mut bytes = [0u8; 32];
    if let Err(e) = getrandom::fill(&mut bytes) {
        tracing::error!("no randomness for a resume token: {e}");
        return None;
    }
    Some(bytes)
}

/// Why a watch could not be opened, as resolution tells it to the client.
fn failure(e: std::io::Error) -> WatchFailure {
    if e.kind() == std::io::ErrorKind::NotFound {
        WatchFailure::NotRunning
    } else if sys::is_out_of_fds(&e) {
        WatchFailure::OutOfDescriptors
    } else {
        WatchFailure::Other(e)
    }
}

impl ops::System for LineResolver<'_> {
    fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    fn peer(&self) -> &Peer {
        self.peer
    }

    fn connector(&self) -> Connector {
        match self.pinned {
            Some(PeerProcess::Running(pinned)) => Connector::Running {
                process: pinned.process,
                own_pid: pinned.own_pid,
                in_nested_pid_namespace: pinned.in_nested_pid_namespace,
            },
            Some(PeerProcess::Exited) => Connector::Exited,
            None => Connector::Unknown,
        }
    }

    fn watch_connector(&mut self) -> Result<(), WatchFailure> {
        let Some(PeerProcess::Running(pinned)) = self.pinned else {
            return Err(WatchFailure::NotRunning);
        };
        // The peer's very process (by its pidfs inode, where it has one)
        // is watched already: no new watch, and its exit waits for this
        // track to reach the core.
        if let Some(held) = self.shared.pids.hold_if_watched(&pinned) {
            self.held = Some(held);
            return Ok(());
        }
        self.prepared = Some(self.shared.pids.prepare_peer(&pinned).map_err(failure)?);
        Ok(())
    }

    fn watch_pid(&mut self, pid: u32) -> Result<ProcessId, WatchFailure> {
        let (process, prepared) = self.shared.pids.prepare_pid(pid).map_err(failure)?;
        self.prepared = Some(prepared);
        Ok(process)
    }

    fn uid_of_watched(&self, pid: u32) -> Option<u32> {
        let uid = sys::process_uid(pid).ok()?;
        // Read after the watch pinned the process: confirmed against it, so
        // a pid reused in between cannot pass for the one named.
        let still_running = self.prepared.as_ref().is_some_and(Prepared::still_running);
        still_running.then_some(uid)
    }

    fn random_bytes(&mut self) -> Option<[u8; 32]> {
        random_bytes()
    }

    fn history_rows_at_most(&self, request: &HistoryRequest) -> usize {
        self.shared.history.readers.rows_at_most(request)
    }

    fn daemon_pid(&self) -> u32 {
        std::process::id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resume tokens are drawn from these: two draws never agree.
    #[test]
    fn random_bytes_are_random() {
        let (Some(a), Some(b)) = (random_bytes(), random_bytes()) else {
            panic!("no randomness on this machine");
        };
        assert_ne!(a, b);
    }
}
