//! The write checkpoints of the users connected to this process, kept current by the hub.
//!
//! Only keys with an open connection are held: a connection registers its key, the first one
//! reads the stored row (later ones wait for that read instead of repeating it), and the entry
//! goes when its last connection does. So memory follows connected users, not every user that
//! ever requested a write checkpoint, and storage is read once per connected user.

use ferrosync_storage::{StorageError, WriteCheckpoint};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::OnceCell;

#[derive(Clone, Copy)]
struct Stored {
    /// Storage's global write order: of two versions of a row, the later one has the larger seq
    /// (even when a pruned key started over).
    seq: i64,
    id: i64,
    lsn: u64,
}

struct Watched {
    connections: usize,
    latest: Option<Stored>,
    /// Set once the stored row was read (after the key was watched, so `latest` is current).
    loaded: Arc<OnceCell<()>>,
}

#[derive(Default)]
pub(crate) struct WriteCheckpoints {
    keys: Mutex<HashMap<String, Watched>>,
}

/// Keeps a key's write checkpoint in memory while it lives (one per connection).
pub struct WriteCheckpointWatch {
    map: Arc<WriteCheckpoints>,
    key: String,
    loaded: Arc<OnceCell<()>>,
}

impl WriteCheckpointWatch {
    /// Whether the key's stored row was read already (by this or another connection).
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded.initialized()
    }

    /// Run `read_stored` (which reads the key's stored row into the map) unless another
    /// connection of the key already did; waits while one is doing it, and takes over if it
    /// failed.
    pub(crate) async fn load(&self, read_stored: impl Future<Output = Result<(), StorageError>>) -> Result<(), StorageError> {
        self.loaded.get_or_try_init(|| read_stored).await.map(|_| ())
    }
}

impl Drop for WriteCheckpointWatch {
    fn drop(&mut self) {
        let mut keys = self.map.keys();
        if let Some(w) = keys.get_mut(&self.key) {
            w.connections -= 1;
            if w.connections == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl WriteCheckpoints {
    fn keys(&self) -> MutexGuard<'_, HashMap<String, Watched>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start keeping `key` (before its stored row is read, so no update in between is missed).
    pub fn watch(self: &Arc<Self>, key: &str) -> WriteCheckpointWatch {
        let mut keys = self.keys();
        let watched = keys.entry(key.to_string()).or_insert_with(|| Watched {
            connections: 0,
            latest: None,
            loaded: Arc::default(),
        });
        watched.connections += 1;
        WriteCheckpointWatch {
            map: self.clone(),
            key: key.to_string(),
            loaded: watched.loaded.clone(),
        }
    }

    /// Take a stored row, if its key is watched and it is newer than what is held.
    pub fn update(&self, wc: &WriteCheckpoint) {
        let mut keys = self.keys();
        let Some(w) = keys.get_mut(&wc.user_key) else { return };
        if w.latest.is_some_and(|l| l.seq >= wc.seq) {
            return;
        }
        w.latest = Some(Stored {
            seq: wc.seq,
            id: wc.write_checkpoint,
            lsn: wc.lsn,
        });
    }

    /// `key`'s write checkpoint visible at source position `lsn` (`None` for unwatched keys).
    pub fn visible(&self, key: &str, lsn: u64) -> Option<i64> {
        let keys = self.keys();
        let latest = keys.get(key)?.latest?;
        (latest.lsn <= lsn).then_some(latest.id)
    }

    pub fn len(&self) -> usize {
        self.keys().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, seq: i64, id: i64, lsn: u64) -> WriteCheckpoint {
        WriteCheckpoint {
            user_key: key.into(),
            write_checkpoint: id,
            lsn,
            seq,
        }
    }

    #[test]
    fn holds_watched_keys_only_and_the_newest_version() {
        let map = Arc::new(WriteCheckpoints::default());
        map.update(&row("a", 1, 1, 10));
        let a1 = map.watch("a");
        let a2 = map.watch("a");
        assert_eq!(map.visible("a", 100), None, "updates before the watch are not kept");
        map.update(&row("a", 3, 7, 30));
        // An older version read late (the registration's read racing a refresh) changes nothing.
        map.update(&row("a", 2, 6, 20));
        assert_eq!(map.visible("a", 29), None);
        assert_eq!(map.visible("a", 30), Some(7));
        map.update(&row("b", 4, 1, 10));
        assert_eq!(map.len(), 1);
        drop(a1);
        assert_eq!(map.visible("a", 30), Some(7), "another connection still watches it");
        drop(a2);
        assert_eq!(map.len(), 0);
        assert_eq!(map.visible("a", 30), None);
    }
}
