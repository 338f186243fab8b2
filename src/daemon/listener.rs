//! Claiming and keeping the socket path: one daemon per socket, a private
//! folder, a socket only its owner can use, and a stale socket file
//! cleared away.
//!
//! Keeping it: tmp cleaners delete old files, and people remove folders.
//! [`Serving`] watches the socket's folder (inotify, through `notify`) and
//! after any change there checks the folder, the lock and the socket file
//! against what this daemon made. What is missing it makes again (the
//! folder 0700, the lock, the socket 0600); connections it already has
//! carry on, since they do not depend on the listening socket. What it did
//! not make it never touches: a file that is not a socket, a socket that
//! something else answers on, a lock another daemon holds. It says so
//! loudly, keeps serving the connections it has, and looks again with a
//! backoff. Where inotify is unavailable, it looks every two seconds.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use interprocess::os::unix::uds_local_socket::tokio::{Listener, Stream};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::systemd::PassedSocket;
use crate::folder_watch::{FolderWatch, next_change};
use crate::paths::{self, SocketAccess};
use crate::protocol::{ErrorBody, ErrorCode, OutgoingReply};
use crate::sys::{self, PidLock};

/// How long after the first change in the folder we look: a cleaner that
/// empties the folder and then removes it (as `rm -r` does, in well under
/// this) must not find our new socket in its way. If it is slower, the
/// next check puts back whatever it removed after this one.
const SETTLE: Duration = Duration::from_millis(100);
/// The first wait after a failed or refused attempt to put the socket
/// back; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the path is checked when the folder cannot be watched.
const POLL_EVERY: Duration = Duration::from_secs(2);
/// How long a socket found at our path may take to answer a probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Device and inode: which file a path names, whatever became of the name.
type Identity = (u64, u64);

fn identity(meta: &std::fs::Metadata) -> Identity {
    (meta.dev(), meta.ino())
}

/// What is at the socket path.
enum AtPath {
    Nothing,
    Socket(Identity),
    NotSocket,
}

fn inspect(path: &Path) -> io::Result<AtPath> {
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
async fn answers(socket: &Path) -> io::Result<bool> {
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
fn remove_stale(socket: &Path, probed: Identity) -> anyhow::Result<()> {
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
                    kept: Some(KeptPath {
                        socket: self.socket,
                        access,
                        identity: bound.identity,
                        lock,
                        watch: None,
                        use_notify: true,
                        // The first check starts the watch, and finds
                        // anything that changed before it did.
                        next_check: Some(Instant::now()),
                        retry: RETRY_FIRST,
                        setback: None,
                        said_polling: false,
                    }),
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
struct Bound {
    listener: Listener,
    identity: Identity,
}

/// Binds a new socket at `socket`, 0600 or, shared with a group, 0660.
/// Never replaces a file.
fn bind(socket: &Path, access: &SocketAccess) -> anyhow::Result<Bound> {
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

/// One descriptor held back for the moment the daemon runs out of them.
///
/// When `accept` fails with EMFILE the newcomer stays in the backlog, and
/// the listener stays readable: retrying at once would spin the CPU, and
/// waiting would leave the client hanging with no word. Closing the spare
/// makes room to accept that one client, tell it why, and close it.
struct FdReserve {
    spare: Option<File>,
    /// Whether the shortage has been logged; once per episode, not at
    /// every refusal.
    short: bool,
}

impl FdReserve {
    fn new() -> FdReserve {
        FdReserve {
            spare: FdReserve::open(),
            short: false,
        }
    }

    fn open() -> Option<File> {
        File::open("/dev/null").ok()
    }

    /// Takes the spare back if it was spent and a descriptor is free again.
    fn refill(&mut self) {
        if self.spare.is_none() {
            self.spare = FdReserve::open();
        }
    }

    /// Notes a connection accepted after a shortage.
    fn on_accepted(&mut self) {
        if std::mem::take(&mut self.short) {
            tracing::info!("file descriptors are free again; accepting connections");
        }
    }
}

/// How long the accept loop rests after each try that found no file
/// descriptor, instead of retrying at once.
const FD_SHORTAGE_BACKOFF: Duration = Duration::from_millis(50);

/// The path of a socket this daemon bound, with the lock that makes it this
/// daemon's and the watch that puts it back when it is deleted.
struct KeptPath {
    socket: PathBuf,
    access: SocketAccess,
    /// The socket file bound last; the one removed on exit.
    identity: Identity,
    /// Held open for the daemon's lifetime; taken again if its file goes.
    lock: File,
    /// `None` before the first check and whenever the folder cannot be
    /// watched; the path is polled then.
    watch: Option<WatchedFolder>,
    /// `false` only in tests of the polling fallback.
    use_notify: bool,
    /// When to check the path next; `None` waits for a change.
    next_check: Option<Instant>,
    /// The wait after the next failed or refused attempt.
    retry: Duration,
    /// What keeps the path from being ours, while something does; logged
    /// once, not at every retry.
    setback: Option<String>,
    /// Whether the fallback to polling has been logged.
    said_polling: bool,
}

/// Why the path is not ours right now.
enum Setback {
    /// Something this daemon did not make is there; it is left alone.
    Occupied(String),
    /// Putting our socket back failed.
    Failed(anyhow::Error),
}

impl Setback {
    fn message(&self) -> String {
        match self {
            Setback::Occupied(message) => message.clone(),
            Setback::Failed(e) => format!("{e:#}"),
        }
    }
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

    /// Spends the spare descriptor on a newcomer waiting in the backlog, to
    /// tell it why it cannot be served. Rests when there is nothing to do:
    /// while the spare is out with a refused connection, or when nobody
    /// was waiting; every accept until a descriptor frees up would fail
    /// again at once.
    async fn refuse_for_lack_of_fds(&mut self, e: io::Error) {
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

impl KeptPath {
    /// Something changed in the folder (or, `alive == false`, the watch
    /// ended): look soon, once the change has settled.
    fn on_change(&mut self, alive: bool) {
        if !alive {
            // notify's thread has ended; the next check starts a new watch.
            self.watch = None;
        }
        // While the path is not ours, the backoff alone decides when to
        // look again: our own attempts change the folder too, and must not
        // hurry the next one.
        if self.setback.is_none() {
            self.check_within(SETTLE);
        }
    }

    fn check_within(&mut self, delay: Duration) {
        let at = Instant::now() + delay;
        self.next_check = Some(self.next_check.map_or(at, |due| due.min(at)));
    }

    /// Checks the path and puts back what is missing, returning the new
    /// listener if the socket was bound again; schedules a retry with
    /// backoff if that fails or something else is there.
    async fn check(&mut self) -> Option<Listener> {
        let rebound = match self.keep().await {
            Ok(rebound) => {
                self.recovered();
                rebound
            }
            Err(setback) => {
                self.report(setback);
                None
            }
        };
        // Fallback: without a watch nothing tells us about changes.
        if self.watch.is_none() {
            self.check_within(POLL_EVERY);
        }
        rebound
    }

    fn recovered(&mut self) {
        if self.setback.take().is_some() {
            tracing::info!("serving {} again", self.socket.display());
        }
        self.retry = RETRY_FIRST;
        self.next_check = None;
    }

    fn report(&mut self, setback: Setback) {
        let message = setback.message();
        if self.setback.as_deref() == Some(message.as_str()) {
            tracing::debug!("still: {message}");
        } else {
            match setback {
                Setback::Occupied(_) => tracing::error!("{message}"),
                Setback::Failed(_) => tracing::warn!("{message}; trying again"),
            }
        }
        self.setback = Some(message);
        self.next_check = Some(Instant::now() + self.retry);
        self.retry = (self.retry * 2).min(RETRY_MAX);
    }

    /// Makes sure the folder, the lock and the socket at the path are
    /// still ours, putting back whatever is missing; a socket bound again
    /// comes back as its listener.
    async fn keep(&mut self) -> Result<Option<Listener>, Setback> {
        let dir = paths::parent_dir(&self.socket).to_owned();
        paths::ensure_socket_dir(&dir, &self.access)
            .with_context(|| format!("keeping the socket folder {}", dir.display()))
            .map_err(Setback::Failed)?;
        self.keep_watching(&dir);
        self.keep_lock()?;
        self.keep_socket().await
    }

    /// Watches `dir`, unless the folder there is the one already watched.
    fn keep_watching(&mut self, dir: &Path) {
        if !self.use_notify {
            return;
        }
        // The folder's identity is read before the watch starts: if the
        // folder is swapped in between, the watch is on the new one and the
        // stale identity costs one more restart. The other order could
        // leave us watching a folder that no longer has our path.
        let Ok(meta) = std::fs::metadata(dir) else {
            return;
        };
        let folder = identity(&meta);
        if self.watch.as_ref().is_some_and(|w| w.folder == folder) {
            return;
        }
        // A folder removed or moved away keeps no watch on our path.
        self.watch = None;
        match FolderWatch::start(dir) {
            Ok(watch) => {
                if self.said_polling {
                    tracing::info!("watching {} again", dir.display());
                    self.said_polling = false;
                }
                self.watch = Some(WatchedFolder { watch, folder });
            }
            Err(e) if !self.said_polling => {
                tracing::warn!(
                    "cannot watch {} ({e}); checking the socket every {} s instead",
                    dir.display(),
                    POLL_EVERY.as_secs()
                );
                self.said_polling = true;
            }
            Err(e) => tracing::debug!("still cannot watch {}: {e}", dir.display()),
        }
    }

    /// Takes the lock again if its file was deleted or replaced: otherwise
    /// a second daemon could lock a new file there and take the path.
    fn keep_lock(&mut self) -> Result<(), Setback> {
        let path = paths::daemon_lock(&self.socket);
        let held = self.lock.metadata().map(|m| identity(&m)).ok();
        let there = std::fs::symlink_metadata(&path).map(|m| identity(&m)).ok();
        if held.is_some() && held == there {
            return Ok(());
        }
        match sys::take_pid_lock(&path) {
            Ok(PidLock::Taken(lock)) => {
                tracing::info!(
                    "{} was removed or replaced; locked it again",
                    path.display()
                );
                self.lock = lock;
                Ok(())
            }
            Ok(PidLock::HeldBy(pid)) => Err(Setback::Occupied(format!(
                "another daemon (pid {pid}) now holds {}, so {} is its to serve; \
                 this daemon keeps only the connections it has",
                path.display(),
                self.socket.display()
            ))),
            // Put in the lock's place by someone else: never written, and
            // without the lock the socket is not ours to bind again.
            Ok(PidLock::NotOurs(what)) => Err(Setback::Occupied(format!(
                "{what}; until then this daemon keeps only the connections it has"
            ))),
            Err(e) => Err(Setback::Failed(
                anyhow::Error::new(e).context(format!("locking {} again", path.display())),
            )),
        }
    }

    /// Binds the socket again if its file is gone or dead; leaves anything
    /// else at the path alone.
    async fn keep_socket(&mut self) -> Result<Option<Listener>, Setback> {
        let found = inspect(&self.socket)
            .with_context(|| format!("inspecting {}", self.socket.display()))
            .map_err(Setback::Failed)?;
        match found {
            AtPath::Socket(found) if found == self.identity => Ok(None),
            AtPath::Nothing => self.rebind("is gone"),
            AtPath::NotSocket => Err(Setback::Occupied(format!(
                "{} was replaced by something that is not a socket; leaving it alone. \
                 New clients cannot reach this daemon until it is removed",
                self.socket.display()
            ))),
            AtPath::Socket(other) => {
                let alive = answers(&self.socket)
                    .await
                    .with_context(|| format!("probing {}", self.socket.display()))
                    .map_err(Setback::Failed)?;
                if alive {
                    return Err(Setback::Occupied(format!(
                        "something else now listens on {}; leaving it alone. \
                         New clients reach it, not this daemon",
                        self.socket.display()
                    )));
                }
                remove_stale(&self.socket, other).map_err(Setback::Failed)?;
                self.rebind("was replaced by a dead socket")
            }
        }
    }

    /// Binds a new socket at the path; `what_happened` to the old one goes
    /// into the log.
    fn rebind(&mut self, what_happened: &str) -> Result<Option<Listener>, Setback> {
        let bound = bind(&self.socket, &self.access).map_err(Setback::Failed)?;
        self.identity = bound.identity;
        tracing::info!(
            "{} {what_happened}; listening on it again",
            self.socket.display()
        );
        Ok(Some(bound.listener))
    }

    /// Removes the socket file, unless it is no longer the one we bound
    /// last: if another daemon now listens at the path, its socket must
    /// stay.
    fn remove_socket(&self) {
        match inspect(&self.socket) {
            Ok(AtPath::Socket(found)) if found == self.identity => {
                if let Err(e) = std::fs::remove_file(&self.socket) {
                    tracing::warn!("could not remove {}: {e}", self.socket.display());
                }
            }
            Ok(AtPath::Nothing) | Err(_) => {}
            Ok(_) => tracing::info!(
                "{} is no longer our socket; leaving it in place",
                self.socket.display()
            ),
        }
    }
}

impl Drop for KeptPath {
    /// The lock is still held here; it goes with the fields, after the
    /// socket file.
    fn drop(&mut self) {
        self.remove_socket();
    }
}

/// Waits until `due`; forever if there is nothing due.
async fn until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The watch on the socket's folder, with which folder it is: a folder
/// removed or moved away keeps the watch but no longer holds our path.
struct WatchedFolder {
    watch: FolderWatch,
    folder: Identity,
}

/// Tells a connection the daemon cannot take why (`limit_exceeded`, with
/// `message`), then closes it.
pub async fn refuse(stream: Stream, message: String) {
    let reply = OutgoingReply::failure(
        serde_json::Value::Null,
        ErrorBody::new(ErrorCode::LimitExceeded, message),
    );
    let mut stream = tokio::net::UnixStream::from(stream);
    let _ = stream.write_all(&reply.to_line()).await;
    // Closing with a request unread would reset the connection, and the
    // client could lose the line above. Say we are done, then read what
    // it sent, briefly and boundedly, before closing.
    let _ = stream.shutdown().await;
    // On the heap, not in the future: `serve` awaits this, so an array
    // here would make every connection's task 4 KiB larger for good.
    let mut unread = vec![0u8; 4096];
    let drain = async {
        let mut left = REFUSAL_DRAIN_BYTES;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut unread).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_DRAIN_TIME, drain).await;
}

/// How long, and how much, a refused connection is read before it is
/// closed: enough for the request a client sent right after connecting.
const REFUSAL_DRAIN_TIME: Duration = Duration::from_millis(200);
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

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

#[cfg(test)]
mod tests {
    use super::*;

    async fn serving(tmp: &tempfile::TempDir) -> (PathBuf, Serving) {
        let socket = tmp.path().join("run/test.sock");
        let serving = claim(&socket, &SocketAccess::Owner)
            .await
            .unwrap()
            .listen()
            .unwrap();
        (socket, serving)
    }

    fn kept(serving: &mut Serving) -> &mut KeptPath {
        serving.kept.as_mut().expect("our own socket")
    }

    #[tokio::test]
    async fn with_a_watch_nothing_is_polled() {
        let tmp = tempfile::tempdir().unwrap();
        let (_socket, mut serving) = serving(&tmp).await;
        let kept = kept(&mut serving);
        assert!(kept.check().await.is_none(), "nothing to bind again");
        assert!(kept.watch.is_some());
        assert_eq!(kept.next_check, None);
    }

    #[tokio::test]
    async fn without_a_watch_a_deleted_socket_is_found_by_polling() {
        let tmp = tempfile::tempdir().unwrap();
        let (socket, mut serving) = serving(&tmp).await;
        kept(&mut serving).use_notify = false;
        assert!(kept(&mut serving).check().await.is_none());
        assert!(kept(&mut serving).watch.is_none());
        assert!(kept(&mut serving).next_check.is_some(), "a poll is due");

        std::fs::remove_file(&socket).unwrap();
        let server = tokio::spawn(async move {
            let accepted = serving.accept().await;
            (serving, accepted.is_ok())
        });
        // Nothing announces the rebind, so poll for it, with a deadline.
        let connect = async {
            while tokio::net::UnixStream::connect(&socket).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(POLL_EVERY * 5, connect)
            .await
            .expect("the socket is bound again");
        let (mut serving, accepted) = server.await.unwrap();
        assert!(accepted);
        let meta = std::fs::symlink_metadata(&socket).unwrap();
        assert_eq!(identity(&meta), kept(&mut serving).identity);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}
