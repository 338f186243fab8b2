//! Claiming the socket path: one daemon per socket, a private folder, a
//! socket only its owner can use, and a stale socket file cleared away.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use interprocess::os::unix::uds_local_socket::tokio::{Listener, Stream};
use tokio::io::AsyncWriteExt;

use crate::paths;
use crate::protocol::{ErrorBody, ErrorCode, Reply};
use crate::sys::{self, PidLock};

/// The socket path, held for this daemon by an exclusive lock.
pub struct Claimed {
    socket: PathBuf,
    /// Held open for the daemon's lifetime; the lock goes with the process.
    _lock: File,
}

/// Takes the socket path for this daemon: checks the folder, takes the
/// daemon lock (a second daemon stops here, with the first one's pid), and
/// clears a stale socket file left by a daemon that died.
pub fn claim(socket: &Path) -> anyhow::Result<Claimed> {
    let dir = paths::parent_dir(socket);
    paths::ensure_socket_dir(dir)
        .with_context(|| format!("refusing the socket folder {}", dir.display()))?;

    let lock_path = paths::daemon_lock(socket);
    let lock = match sys::take_pid_lock(&lock_path)
        .with_context(|| format!("locking {}", lock_path.display()))?
    {
        PidLock::Taken(lock) => lock,
        PidLock::HeldBy(pid) => bail!(
            "another daemon (pid {pid}) is already serving {}",
            socket.display()
        ),
    };

    if let Ok(existing) = std::fs::symlink_metadata(socket) {
        // Only ever remove a socket: a mistyped --socket must not cost
        // anyone a file.
        if !existing.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; not replacing it",
                socket.display()
            );
        }
        // We hold the lock, so no daemon of ours is there. If something
        // still answers, it is not ours to take away.
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!(
                "something else is listening on {}; not replacing it",
                socket.display()
            );
        }
        tracing::info!("removing the stale socket {}", socket.display());
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale socket {}", socket.display()))?;
    }
    Ok(Claimed {
        socket: socket.to_owned(),
        _lock: lock,
    })
}

impl Claimed {
    /// Binds the socket, mode 0600. The socket file is removed when the
    /// listener is dropped, if it is still ours.
    pub fn listen(self) -> anyhow::Result<Bound> {
        let name = self
            .socket
            .as_path()
            .to_fs_name::<GenericFilePath>()
            .with_context(|| format!("invalid socket path {}", self.socket.display()))?;
        let listener = ListenerOptions::new()
            .name(name)
            .mode(0o600)
            // Removal is ours to do, and only of the file we bound: see Drop.
            .reclaim_name(false)
            .create_tokio_as::<Listener>()
            .with_context(|| format!("listening on {}", self.socket.display()))?;
        // Belt and braces: the mode is set before bind, but say it again in
        // case the platform ignored it.
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", self.socket.display()))?;
        let bound = std::fs::symlink_metadata(&self.socket)
            .with_context(|| format!("inspecting {}", self.socket.display()))?;
        Ok(Bound {
            listener,
            socket: self.socket,
            identity: (bound.dev(), bound.ino()),
            _lock: self._lock,
        })
    }
}

/// The listening socket, with the lock that makes it this daemon's.
pub struct Bound {
    pub listener: Listener,
    socket: PathBuf,
    /// Device and inode of the socket file we bound.
    identity: (u64, u64),
    _lock: File,
}

impl Drop for Bound {
    /// Removes the socket file, unless it is no longer the one we bound:
    /// if our folder was cleaned away and another daemon now listens at
    /// the path, its socket must stay.
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.socket) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.socket) {
                    tracing::warn!("could not remove {}: {e}", self.socket.display());
                }
            }
            Ok(_) => tracing::info!(
                "{} is no longer our socket; leaving it in place",
                self.socket.display()
            ),
            Err(_) => {}
        }
    }
}

/// Tells a connection over the cap why it is refused, then closes it.
pub async fn refuse_over_limit(stream: Stream, max: usize) {
    let reply = Reply::failure(
        serde_json::Value::Null,
        ErrorBody::new(
            ErrorCode::LimitExceeded,
            format!("the daemon is serving {max} connections, its limit; try again later"),
        ),
    );
    let mut stream = tokio::net::UnixStream::from(stream);
    if let Ok(mut line) = serde_json::to_vec(&reply) {
        line.push(b'\n');
        let _ = stream.write_all(&line).await;
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
