//! Running out of file descriptors: one held back, so that a newcomer
//! the daemon cannot take is still told why, and the open-files limit
//! raised to fit `--max-connections` at the start.

use std::fs::File;
use std::io;
use std::time::Duration;

use interprocess::local_socket::traits::tokio::Listener as _;

use super::Serving;
use super::refuse::refuse;

/// One descriptor held back for the moment the daemon runs out of them.
///
/// When `accept` fails with EMFILE the newcomer stays in the backlog, and
/// the listener stays readable: retrying at once would spin the CPU, and
/// waiting would leave the client hanging with no word. Closing the spare
/// makes room to accept that one client, tell it why, and close it.
pub(super) struct FdReserve {
    spare: Option<File>,
    /// Whether the shortage has been logged; once per episode, not at
    /// every refusal.
    short: bool,
}

impl FdReserve {
    pub(super) fn new() -> FdReserve {
        FdReserve {
            spare: FdReserve::open(),
            short: false,
        }
    }

    fn open() -> Option<File> {
        File::open("/dev/null").ok()
    }

    /// Takes the spare back if it was spent and a descriptor is free again.
    pub(super) fn refill(&mut self) {
        if self.spare.is_none() {
            self.spare = FdReserve::open();
        }
    }

    /// Notes a connection accepted after a shortage.
    pub(super) fn on_accepted(&mut self) {
        if std::mem::take(&mut self.short) {
            tracing::info!("file descriptors are free again; accepting connections");
        }
    }
}

/// How long the accept loop rests after each try that found no file
/// descriptor, instead of retrying at once.
const FD_SHORTAGE_BACKOFF: Duration = Duration::from_millis(50);

impl Serving {
    /// Spends the spare descriptor on a newcomer waiting in the backlog, to
    /// tell it why it cannot be served. Rests when there is nothing to do:
    /// while the spare is out with a refused connection, or when nobody
    /// was waiting; every accept until a descriptor frees up would fail
    /// again at once.
    pub(super) async fn refuse_for_lack_of_fds(&mut self, e: io::Error) {
        if !std::mem::replace(&mut self.reserve.short, true) {
            tracing::warn!(
                "out of file descriptors ({e}); refusing new connections until some close"
            );
        }
        if self.reserve.spare.take().is_some() {
            // EMFILE does not prove anyone is waiting, so the accept is
            // polled once rather than awaited: awaiting could park the loop
            // here, deaf to the socket path and to descriptors freeing up.
            let waiting = tokio::time::timeout(Duration::ZERO, self.listener.accept()).await;
            match waiting {
                Ok(Ok(stream)) => {
                    tokio::spawn(refuse(
                        stream,
                        "the daemon is out of file descriptors; try again once some \
                         connections close"
                            .to_owned(),
                    ));
                    // The next newcomer may be told at once, if the refused
                    // one has hung up by then.
                    return;
                }
                // Nobody there after all: the spare goes back, unspent.
                Ok(Err(_)) | Err(_) => self.reserve.refill(),
            }
        }
        tokio::time::sleep(FD_SHORTAGE_BACKOFF).await;
    }
}

/// Raises the soft open-files limit so that `max_connections` fit, within
/// the hard limit.
pub fn raise_fd_limit(max_connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // Each connection is one descriptor, plus a pidfd per watched process
    // and the daemon's own files.
    let wanted = (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(64);
    let current = getrlimit(Resource::Nofile);
    let soft = current.current.unwrap_or(u64::MAX);
    if soft >= wanted {
        return;
    }
    let target = current.maximum.map_or(wanted, |hard| hard.min(wanted));
    let raised = Rlimit {
        current: Some(target),
        maximum: current.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!("raised the open-files limit from {soft} to {target}"),
        Err(e) => tracing::warn!("could not raise the open-files limit from {soft}: {e}"),
    }
}
