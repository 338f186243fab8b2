//! `presence stop`: asks the running daemon to stop, and waits until it
//! has gone.
//!
//! How it asks: with SIGTERM, on which the daemon already stops cleanly
//! (it stops listening, removes its socket, saves what it holds and tells
//! its clients). A `stop` request in the protocol would have to decide who
//! may stop a daemon that members of a group share; a signal leaves that
//! to the kernel, which lets only the daemon's user and root send it. But
//! a pid is only a number: before signalling, we make sure the process is
//! the daemon serving this socket. The kernel names the process listening
//! at the other end of our connection (its peer credentials, the same the
//! client checks with `paths::check_daemon_uid`), and that process must
//! report the same pid in its `status` reply. The signal then goes through
//! a pidfd pinned to that very process, so a pid handed to another process
//! meanwhile is never signalled. And we refuse, in words, to stop a daemon
//! of another user (a shared daemon) unless run as root, rather than leave
//! the kernel's EPERM to speak for us.

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use clap::Args;

use super::args::duration_up_to;
use super::outcome::Outcome;
use super::replies::{decode, request_fields};
use super::target::Target;
use crate::client::{Client, ClientError};
use crate::protocol::{Empty, Request, StatusReply};
use crate::sys::{self, ExitWatch, PeerProcess};

/// How often to look again at a daemon without a pidfd, and at its socket.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Give up waiting for the daemon to go after this long (seconds, or
    /// 10s, 1m), and exit 1
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration_up_to(86_400.0))]
    pub timeout: Duration,
}

pub async fn run(target: &Target, args: StopArgs) -> anyhow::Result<Outcome> {
    let socket = &target.socket;
    let deadline = tokio::time::Instant::now() + args.timeout;
    let stream = match crate::client::connect_stream(socket).await {
        Ok(stream) => stream,
        Err(ClientError::NoDaemon { source, .. }) if nobody_listens(&source) => {
            say!("no daemon is running at {}", socket.display());
            return Ok(Outcome::Done);
        }
        Err(e) => return Err(target.explain(e)),
    };
    let cred = stream.peer_cred()?;
    let daemon_uid = cred.uid();
    // No pid (0 or none) when the daemon runs in a pid namespace we cannot
    // see into: then there is nothing we could safely signal.
    let Some(pid) = cred
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid > 0)
    else {
        anyhow::bail!(
            "the daemon at {} runs in another pid namespace, where this command cannot see \
             it; stop it from there",
            socket.display()
        );
    };
    let me = sys::current_uid();
    if me != daemon_uid && me != 0 {
        anyhow::bail!(
            "the daemon at {} runs as {} and serves others too; only its user or root can \
             stop it (a system-wide daemon: `sudo systemctl stop presenced.socket \
             presenced.service`)",
            socket.display(),
            describe_uid(daemon_uid)
        );
    }
    let peer = match sys::pin_peer(stream.as_fd(), pid)? {
        PeerProcess::Running(peer) => peer,
        // Gone between our connect and now: it is stopping by itself.
        PeerProcess::Exited => return wait_for_socket(socket, pid, deadline, args.timeout).await,
    };
    // Where the kernel cannot pin the listener itself (no SO_PEERPIDFD),
    // the pid may have been handed to another process since it listened:
    // the process pinned must run as the daemon's uid, or root could be
    // led to signal one of its own.
    if sys::process_uid(pid).ok() != Some(daemon_uid) {
        anyhow::bail!(
            "not stopping anything: pid {pid}, which listened at {}, is no longer a process              of {}",
            socket.display(),
            describe_uid(daemon_uid)
        );
    }
    let (client, _events) = Client::from_stream(stream);
    let asked = request_fields(
        &client,
        &Request::Status(Empty {}),
        "could not ask the daemon",
    );
    let fields = tokio::time::timeout_at(deadline, asked)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "gave up after {}s: the daemon (pid {pid}) does not answer, so it \
                 was not signalled",
                args.timeout.as_secs_f64()
            )
        })??;
    let status: StatusReply = decode(fields, "status")?;
    drop(client);
    // Asked first: with socket activation the listener is systemd
    // itself, so the pids below would not match.
    if status.started_by.as_deref() == Some("systemd") {
        let scope = if target.system {
            "sudo systemctl"
        } else {
            "systemctl --user"
        };
        anyhow::bail!(
            "the daemon at {} (pid {}) was started by systemd, which would start it again \
             at the next connection; stop it with `{scope} stop presenced.socket \
             presenced.service`",
            socket.display(),
            status.pid
        );
    }

    if status.pid != peer.own_pid {
        anyhow::bail!(
            "not stopping anything: the process listening at {} is pid {pid}, but the daemon \
             answering there says it is pid {}",
            socket.display(),
            status.pid
        );
    }
    let watch = match ExitWatch::open_peer(&peer) {
        Ok(watch) => Some(watch),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return wait_for_socket(socket, pid, deadline, args.timeout).await;
        }
        Err(e) if e.kind() == ErrorKind::Unsupported => None,
        Err(e) => return Err(anyhow::anyhow!("watching the daemon (pid {pid}): {e}")),
    };
    let sent = match &watch {
        Some(watch) => watch.send_signal(rustix::process::Signal::TERM),
        // No pidfds in this kernel: the start time stands in for one.
        None if sys::is_running(peer.process).unwrap_or(false) => nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .map_err(std::io::Error::from),
        None => Ok(()),
    };
    match sent {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc_esrch()) => {}
        Err(e) => anyhow::bail!("could not signal the daemon (pid {pid}): {e}"),
    }
    let exited = tokio::time::timeout_at(deadline, sys::exited(peer.process, watch, POLL)).await;
    match exited {
        Ok(Ok(())) => wait_for_socket(socket, pid, deadline, args.timeout).await,
        Ok(Err(e)) => Err(anyhow::anyhow!("watching the daemon (pid {pid}): {e}")),
        Err(_) => anyhow::bail!(
            "gave up after {}s: the daemon (pid {pid}) is still running; `kill -9 {pid}` ends \
             it without saving anything new",
            args.timeout.as_secs_f64()
        ),
    }
}

/// ESRCH: the process had already gone when signalled.
fn libc_esrch() -> i32 {
    rustix::io::Errno::SRCH.raw_os_error()
}

/// Whether a failed connect means nobody serves the socket.
fn nobody_listens(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::NotFound | ErrorKind::ConnectionRefused
    )
}

/// The daemon's process has gone; waits until its socket no longer
/// answers either (it removes it before it exits, so this is at once
/// unless another daemon has taken its place).
async fn wait_for_socket(
    socket: &Path,
    pid: u32,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let unanswered = async {
        loop {
            match std::os::unix::net::UnixStream::connect(socket) {
                Err(e) if nobody_listens(&e) => return,
                _ => tokio::time::sleep(POLL).await,
            }
        }
    };
    match tokio::time::timeout_at(deadline, unanswered).await {
        Ok(()) => {
            say!("stopped the daemon (pid {pid}) at {}", socket.display());
            Ok(Outcome::Done)
        }
        Err(_) => anyhow::bail!(
            "gave up after {}s: the daemon (pid {pid}) has exited, but {} still answers; \
             another daemon may have started there (`presence status` says)",
            timeout.as_secs_f64(),
            socket.display()
        ),
    }
}

/// `uid 1001 (bob)`, or `uid 1001` for a uid without a name.
fn describe_uid(uid: u32) -> String {
    let name = sys::user_name(uid);
    if name == uid.to_string() {
        format!("uid {uid}")
    } else {
        format!("uid {uid} ({name})")
    }
}
