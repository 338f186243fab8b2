//! Claiming and keeping the socket path: one daemon per socket, a private
//! folder, a socket only its owner can use, and a stale socket file
//! cleared away.
//!
//! - `claim`: the path taken at the start, and the socket bound (or the
//!   one systemd passed in).
//! - `keep`: the path kept afterwards, against cleaners and people who
//!   remove it.
//! - `reserve`: the spare descriptor that lets a newcomer be told the
//!   daemon is out of them, and the open-files limit.
//! - `refuse`: how a connection the daemon cannot take is told why.
//!
//! [`Serving`] is what the accept loop holds: the listener, and for a
//! socket of our own, what keeps its path.

mod claim;
mod keep;
mod refuse;
mod reserve;

use std::fs::File;
use std::io;

use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::os::unix::uds_local_socket::tokio::{Listener, Stream};
use tokio::time::Instant;

pub use claim::{Claimed, claim, claim_passed};
pub use refuse::refuse;
pub use reserve::raise_fd_limit;

use crate::folder_watch::next_change;
use crate::sys;
use keep::KeptPath;
use reserve::FdReserve;

/// The listening socket and, for a socket of our own, what keeps its path.
pub struct Serving {
    /// Declared first so that it drops first: the socket file goes while
    /// the listener still answers, never the other way round.
    kept: Option<KeptPath>,
    /// The socket bound last.
    listener: Listener,
    /// What lets the daemon answer a newcomer when it is out of file
    /// descriptors.
    reserve: FdReserve,
}

impl Serving {
    /// The next connection. Meanwhile, keeps the socket path if it is ours.
    /// Cancel-safe: an interrupted check is still due, and runs again on
    /// the next call.
    /// Out of file descriptors, newcomers are told so and closed, and
    /// the loop never spins (see [`FdReserve`]).
    pub async fn accept(&mut self) -> io::Result<Stream> {
        loop {
            self.reserve.refill();
            match self.accept_or_keep_path().await {
                Err(e) if sys::is_out_of_fds(&e) => self.refuse_for_lack_of_fds(e).await,
                Ok(stream) => {
                    self.reserve.on_accepted();
                    return Ok(stream);
                }
                Err(e) => return Err(e),
            }
        }
    }
    async fn accept_or_keep_path(&mut self) -> io::Result<Stream> {
        loop {
            let Some(kept) = self.kept.as_mut() else {
                return self.listener.accept().await;
            };
            let due = kept.next_check;
            tokio::select! {
                accepted = self.listener.accept() => return accepted,
                alive = next_change(kept.watch.as_mut().map(|w| &mut w.watch)) => kept.on_change(alive),
                () = until(due) => {
                    if let Some(rebound) = kept.check().await {
                        // The old listener goes without touching the path,
                        // which names the new socket now.
                        self.listener = rebound;
                    }
                }
            }
        }
    }

    /// Stops taking connections before shutting down: our socket file goes
    /// now, so a client reconnecting during the shutdown finds no socket
    /// rather than a backlog nobody will serve. The returned lock keeps
    /// the path claimed until the daemon is gone (a duplicate descriptor
    /// holds the same flock). systemd's socket stays: systemd queues what
    /// arrives and starts the next daemon.
    pub fn stop_listening(self) -> io::Result<Option<File>> {
        let lock = self
            .kept
            .as_ref()
            .map(|kept| kept.lock.try_clone())
            .transpose()?;
        drop(self);
        Ok(lock)
    }
}

/// Waits until `due`; forever if there is nothing due.
async fn until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
