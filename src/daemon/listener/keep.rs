//! Keeping the socket path: tmp cleaners delete old files, and people
//! remove folders. [`KeptPath`] watches the socket's folder (inotify,
//! through `notify`) and after any change there checks the folder, the
//! lock and the socket file against what this daemon made. What is missing
//! it makes again (the folder 0700, the lock, the socket 0600); connections
//! it already has carry on, since they do not depend on the listening
//! socket. What it did not make it never touches: a file that is not a
//! socket, a socket that something else answers on, a lock another daemon
//! holds. It says so loudly, keeps serving the connections it has, and
//! looks again with a backoff. Where inotify is unavailable, it looks
//! every two seconds.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use interprocess::os::unix::uds_local_socket::tokio::Listener;
use tokio::time::Instant;

use anyhow::Context;

use super::claim::{AtPath, Identity, answers, bind, identity, inspect, remove_stale};
use crate::folder_watch::FolderWatch;
use crate::paths::{self, SocketAccess};
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

/// The path of a socket this daemon bound, with the lock that makes it this
/// daemon's and the watch that puts it back when it is deleted.
pub(super) struct KeptPath {
    socket: PathBuf,
    access: SocketAccess,
    /// The socket file bound last; the one removed on exit.
    identity: Identity,
    /// Held open for the daemon's lifetime; taken again if its file goes.
    pub(super) lock: File,
    /// `None` before the first check and whenever the folder cannot be
    /// watched; the path is polled then.
    pub(super) watch: Option<WatchedFolder>,
    /// `false` only in tests of the polling fallback.
    use_notify: bool,
    /// When to check the path next; `None` waits for a change.
    pub(super) next_check: Option<Instant>,
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

impl KeptPath {
    /// The path of the socket just bound at `socket`, under `lock`. The
    /// first check starts the watch, and finds anything that changed
    /// before it did.
    pub(super) fn new(
        socket: PathBuf,
        access: SocketAccess,
        identity: Identity,
        lock: File,
    ) -> KeptPath {
        KeptPath {
            socket,
            access,
            identity,
            lock,
            watch: None,
            use_notify: true,
            next_check: Some(Instant::now()),
            retry: RETRY_FIRST,
            setback: None,
            said_polling: false,
        }
    }
}

impl KeptPath {
    /// Something changed in the folder (or, `alive == false`, the watch
    /// ended): look soon, once the change has settled.
    pub(super) fn on_change(&mut self, alive: bool) {
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
    pub(super) async fn check(&mut self) -> Option<Listener> {
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

/// The watch on the socket's folder, with which folder it is: a folder
/// removed or moved away keeps the watch but no longer holds our path.
pub(super) struct WatchedFolder {
    pub(super) watch: FolderWatch,
    folder: Identity,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::daemon::listener::{Serving, claim};

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
