//! Waking up when a folder changes, without polling: an inotify watch
//! (through `notify`) on one folder, not recursive. The daemon waits on one
//! to put its socket back when a cleaner deletes it; a client waits on one
//! for a restarted daemon's socket to appear.

use std::path::Path;

use notify::Watcher as _;
use tokio::sync::mpsc;

/// A watch on one folder. Any number of changes between two waits count
/// as one: whoever wakes looks at the folder itself.
pub struct FolderWatch {
    /// `Some` until dropped.
    watcher: Option<notify::RecommendedWatcher>,
    events: mpsc::Receiver<()>,
}

impl FolderWatch {
    /// Wakes on any change in `dir`.
    pub fn start(dir: &Path) -> notify::Result<FolderWatch> {
        FolderWatch::start_filtered(dir, |_| true)
    }

    /// Wakes only on changes that name `file` (in its folder): a client
    /// waiting for a socket must not be woken by its own lock files.
    pub fn for_file(file: &Path) -> notify::Result<FolderWatch> {
        let name = file.file_name().map(ToOwned::to_owned);
        FolderWatch::start_filtered(crate::paths::parent_dir(file), move |event| {
            event
                .paths
                .iter()
                .any(|path| path.file_name() == name.as_deref())
        })
    }

    fn start_filtered(
        dir: &Path,
        wanted: impl Fn(&notify::Event) -> bool + Send + 'static,
    ) -> notify::Result<FolderWatch> {
        let (wake, events) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<_>| {
            let relevant = match &event {
                Ok(event) => wanted(event),
                // An error (say, the queue overflowed) may hide a change.
                Err(e) => {
                    tracing::debug!("watching a folder: {e}");
                    true
                }
            };
            // This runs on notify's thread and must never block. A full
            // channel already holds a wake-up, and one is all it takes.
            if relevant {
                let _ = wake.try_send(());
            }
        })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(FolderWatch {
            watcher: Some(watcher),
            events,
        })
    }
}

/// Waits for a change in the watched folder; `false` once the watch has
/// ended. Without a watch, never returns: the caller's own timer is all
/// that is left.
pub async fn next_change(watch: Option<&mut FolderWatch>) -> bool {
    match watch {
        Some(watch) => watch.events.recv().await.is_some(),
        None => std::future::pending().await,
    }
}

impl Drop for FolderWatch {
    fn drop(&mut self) {
        // notify's Drop unwraps a send to its thread, which panics if that
        // thread has ended; its end also closed our channel. The thread and
        // the inotify descriptor are gone then, so there is nothing left to
        // release: leak the handle rather than panic.
        let Some(watcher) = self.watcher.take() else {
            return;
        };
        if self.events.is_closed() {
            std::mem::forget(watcher);
        } else {
            drop(watcher);
        }
    }
}
