//! Claiming the socket: the folder checked, the daemon lock taken (a
//! second daemon stops here, naming the first), a stale socket file of a
//! daemon that died cleared away, and the socket bound 0600 (0660 for a
//! group); or the socket systemd passed in, taken as it is.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use interprocess::os::unix::uds_local_socket::tokio::Listener;

use super::Serving;
use super::keep::KeptPath;
use super::reserve::FdReserve;
use crate::daemon::systemd::PassedSocket;
use crate::paths::{self, SocketAccess};
use crate::sys::{self, PidLock};

/// How long a socket found at our path may take to answer a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Device and inode: which file a path names, whatever became of the name.
pub(super) type Identity = (u64, u64);

pub(super) fn identity(meta: &std::fs::Metadata) -> Identity {
    (meta.dev(), meta.ino())
}

/// What is at the socket path.
pub(super) enum AtPath {
    Nothing,
    Socket(Identity),
    NotSocket,
}

pub(super) fn inspect(path: &Path) -> io::Result<AtPath> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(AtPath::Socket(identity(&meta))),
        Ok(_) => Ok(AtPath::NotSocket),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(AtPath::Nothing),
        Err(e) => Err(e),
    }
}

/// The socket, held for this daemon: a path it binds itself under an
/// exclusive lock, or the socket systemd made and passed in.
pub struct Claimed {
    socket: PathBuf,
    kind: ClaimKind,
    /// Set aside at the claim, before the daemon opens anything else: a
    /// start that loads more process entries than it has descriptors
    /// for must still have its spare (see [`FdReserve`]).
    reserve: FdReserve,
}

enum ClaimKind {
    /// Ours to bind, keep and remove. The lock is held open for the
    /// daemon's lifetime; it goes with the process.
    Path { lock: File, access: SocketAccess },
    /// systemd's: it made the socket, chose its mode, and removes it. Its
    /// path is never unlinked, rebound or watched here.
    Systemd(OwnedFd),
}

/// Takes the socket path for this daemon: checks the folder, takes the
/// daemon lock (a second daemon stops here, with the first one's pid), and
/// clears a stale socket file left by a daemon that died.
pub async fn claim(socket: &Path, access: &SocketAccess) -> anyhow::Result<Claimed> {
    let dir = paths::parent_dir(socket);
    paths::ensure_socket_dir(dir, access)
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
        PidLock::NotOurs(what) => bail!("{what}"),
    };

    match inspect(socket).with_context(|| format!("inspecting {}", socket.display()))? {
        AtPath::Nothing => {}
        // Only ever remove a socket: a mistyped --socket must not cost
        // anyone a file.
        AtPath::NotSocket => bail!(
            "{} exists and is not a socket; not replacing it",
            socket.display()
        ),
        AtPath::Socket(found) => {
            // We hold the lock, so no daemon of ours is there. If something
            // still answers, it is not ours to take away.
            if answers(socket)
                .await
                .with_context(|| format!("probing {}", socket.display()))?
            {
                bail!(
                    "something else is listening on {}; not replacing it",
                    socket.display()
                );
            }
            remove_stale(socket, found)?;
        }
    }
    Ok(Claimed {
        socket: socket.to_owned(),
        kind: ClaimKind::Path {
            lock,
            access: access.clone(),
        },
        reserve: FdReserve::new(),
    })
}

/// Takes the socket systemd passed in. There is no lock to take: systemd
/// starts one service per socket, and a daemon started by hand at the
/// same path finds it answering and stops.
pub fn claim_passed(passed: PassedSocket) -> Claimed {
    Claimed {
        socket: passed.path,
        kind: ClaimKind::Systemd(passed.listener),
        reserve: FdReserve::new(),
    }
}

/// Whether something listens on the socket at `socket`. It never blocks:
/// a full backlog refuses with EAGAIN, which still means someone listens,
/// and a listener that neither accepts nor refuses in time counts as alive
/// too. When in doubt, a socket is left alone.
pub(super) async fn answers(socket: &Path) -> io::Result<bool> {
    let connect = tokio::net::UnixStream::connect(socket);
    match tokio::time::timeout(PROBE_TIMEOUT, connect).await {
        Ok(Ok(_)) | Err(_) => Ok(true),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(false),
        Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Ok(Err(e)) => Err(e),
    }
}

/// Removes the dead socket at `socket`, provided it is still the one that
/// was probed: something else may have taken its place meanwhile.
pub(super) fn remove_stale(socket: &Path, probed: Identity) -> anyhow::Result<()> {
    match inspect(socket).with_context(|| format!("inspecting {}", socket.display()))? {
        AtPath::Socket(found) if found == probed => {}
        AtPath::Nothing => return Ok(()),
        _ => bail!(
            "{} changed while it was being checked; leaving it alone",
            socket.display()
        ),
    }
    tracing::info!("removing the stale socket {}", socket.display());
    std::fs::remove_file(socket)
        .with_context(|| format!("removing the stale socket {}", socket.display()))
}

impl Claimed {
    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Listens: binds our socket (mode 0600, or 0660 for a group) and
    /// starts keeping its path, or takes systemd's as it is. Done before
    /// the processes of restored entries are watched, each with a pidfd of
    /// its own: the socket must not be left without a descriptor.
    pub fn listen(self) -> anyhow::Result<Serving> {
        match self.kind {
            ClaimKind::Path { lock, access } => {
                let bound = bind(&self.socket, &access)?;
                Ok(Serving {
                    kept: Some(KeptPath::new(self.socket, access, bound.identity, lock)),
                    listener: bound.listener,
                    reserve: self.reserve,
                })
            }
            ClaimKind::Systemd(listener) => Ok(Serving {
                kept: None,
                listener: Listener::try_from(listener).with_context(|| {
                    format!(
                        "serving the socket systemd passed ({})",
                        self.socket.display()
                    )
                })?,
                reserve: self.reserve,
            }),
        }
    }
}

/// A listening socket and the file it made.
pub(super) struct Bound {
    pub(super) listener: Listener,
    pub(super) identity: Identity,
}

/// Binds a new socket at `socket`, 0600 or, shared with a group, 0660.
/// Never replaces a file.
pub(super) fn bind(socket: &Path, access: &SocketAccess) -> anyhow::Result<Bound> {
    let name = socket
        .to_fs_name::<GenericFilePath>()
        .with_context(|| format!("invalid socket path {}", socket.display()))?;
    let listener = ListenerOptions::new()
        .name(name)
        .mode(0o600)
        // Removal is ours to do, and only of the file we bound: see Drop
        // for KeptPath.
        .reclaim_name(false)
        .create_tokio_as::<Listener>()
        .with_context(|| format!("listening on {}", socket.display()))?;
    let made = std::fs::symlink_metadata(socket)
        .with_context(|| format!("inspecting {}", socket.display()))?;
    if let Err(e) = restrict(socket, access) {
        // A socket we cannot restrict is not served, nor left behind.
        let _ = std::fs::remove_file(socket);
        return Err(e);
    }
    Ok(Bound {
        listener,
        identity: identity(&made),
    })
}

/// Gives a socket just bound its group and mode. The group comes before
/// the mode lets it in, so that no other group is ever let in; the mode is
/// set again in case the platform ignored it at bind.
fn restrict(socket: &Path, access: &SocketAccess) -> anyhow::Result<()> {
    if let SocketAccess::Group { gid, .. } = access {
        std::os::unix::fs::chown(socket, None, Some(*gid))
            .with_context(|| format!("giving {} to its group", socket.display()))?;
    }
    std::fs::set_permissions(
        socket,
        std::fs::Permissions::from_mode(access.socket_mode()),
    )
    .with_context(|| format!("setting the mode of {}", socket.display()))
}
