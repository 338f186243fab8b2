//! What systemd gives the daemon and expects back: the listening socket of
//! a `.socket` unit (`LISTEN_FDS`, see sd_listen_fds(3)), and the readiness
//! and stopping notices of a `Type=notify` service (`NOTIFY_SOCKET`, see
//! sd_notify(3)). Outside systemd neither variable is set and all of this
//! does nothing.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use rustix::net::SocketType;
use rustix::net::sockopt;
use sd_notify::NotifyState;

/// A listening socket systemd made and passed to us, with the path it is
/// bound to.
pub struct PassedSocket {
    pub listener: OwnedFd,
    pub path: PathBuf,
}

/// Whether the passed descriptors were taken: each may be owned once.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The socket systemd passed in, if it passed one. It must be exactly one
/// listening Unix stream socket bound to a path: that is the unit we ship
/// (`ListenStream=` with a path), and anything else is a unit mistake
/// better reported than half-served.
pub fn passed_socket() -> anyhow::Result<Option<PassedSocket>> {
    let fds = sd_notify::listen_fds().context("reading LISTEN_FDS from systemd")?;
    if fds.len() == 0 {
        return Ok(None);
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        bail!("the sockets systemd passed in were already taken");
    }
    let count = fds.len();
    // SAFETY: sd_listen_fds(3) hands these descriptors to the process named
    // by LISTEN_PID, which `listen_fds` checked is us, and TAKEN makes sure
    // they are owned once. Every one is owned, so those we refuse are
    // closed rather than leaked.
    let mut owned: Vec<OwnedFd> = fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect();
    if count != 1 {
        bail!(
            "systemd passed {count} sockets; presenced serves exactly one (one ListenStream= \
             in presenced.socket)"
        );
    }
    let listener = owned.remove(0);
    if sockopt::socket_type(&listener).context("inspecting the socket systemd passed")?
        != SocketType::STREAM
        || !sockopt::socket_acceptconn(&listener).context("inspecting the socket systemd passed")?
    {
        bail!("the socket systemd passed is not a listening stream socket (use ListenStream=)");
    }
    let listener = UnixListener::from(listener);
    let address = listener
        .local_addr()
        .context("the socket systemd passed is not a Unix socket (ListenStream= takes a path)")?;
    let Some(path) = address.as_pathname().map(PathBuf::from) else {
        bail!(
            "the socket systemd passed has no path; presenced serves a socket in the file \
             system, so that clients find it and its mode guards it"
        );
    };
    Ok(Some(PassedSocket {
        listener: listener.into(),
        path,
    }))
}

/// Tells systemd the daemon serves: the socket listens and the database is
/// loaded. Without `NOTIFY_SOCKET` this does nothing.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the daemon is stopping, so that it waits for the exit
/// instead of thinking it failed.
pub fn notify_stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("could not notify systemd: {e}");
    }
}
