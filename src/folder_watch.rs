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
    pub fn start(dir: &Path) -> notify::Result<FolderWatch> {
        let (wake, events) = mpsc::channel(1);
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<_>| {
            if let Err(e) = event {
                tracing::debug!("watching a folder: {e}");
            }
            // This runs on notify's thread and must never block. A full
            // channel already holds a wake-up, and one is all it takes.
            let _ = wake.try_send(());
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
