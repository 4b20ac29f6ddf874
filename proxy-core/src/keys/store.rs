//! The shared key store that a reload swaps atomically.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
#[cfg(feature = "runtime")]
use std::path::PathBuf;
use std::sync::Arc;
#[cfg(feature = "runtime")]
use std::time::Duration;

use arc_swap::ArcSwap;
#[cfg(feature = "runtime")]
use tokio_util::sync::CancellationToken;

use crate::envelope::AgentId;

use super::{AgentKey, FileStamp, KeyLineError, KeySet, KeysError};

/// The outcome of a (re)load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys now loaded.
    pub keys: usize,
    /// Malformed lines of the file just read.
    pub problems: Vec<KeyLineError>,
}

/// A shared, hot-swappable [`KeySet`]. Cloning is cheap (one `Arc`), and lookups never take a
/// lock: a reload builds a new set and swaps it in atomically, so readers see either the old
/// or the new set, never a mix.
#[derive(Clone, Default)]
pub struct KeyStore {
    current: Arc<ArcSwap<KeySet>>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("keys", &self.current.load().len())
            .finish()
    }
}

impl KeyStore {
    /// A store holding `set`.
    pub fn new(set: KeySet) -> KeyStore {
        KeyStore {
            current: Arc::new(ArcSwap::from_pointee(set)),
        }
    }

    /// Loads a keys file into a new store.
    ///
    /// # Errors
    /// [`KeysError::Io`] when the file cannot be read.
    pub fn open(path: &Path) -> Result<(KeyStore, Vec<KeyLineError>), KeysError> {
        let (set, problems) = KeySet::read(path)?;
        Ok((KeyStore::new(set), problems))
    }

    /// The current set. Holding it keeps that version alive while newer ones are swapped in.
    pub fn snapshot(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    /// The key of an agent ID in the current set.
    pub fn get(&self, id: &AgentId) -> Option<Arc<AgentKey>> {
        self.current.load().get(id).cloned()
    }

    /// The key an ID-less message from `source` belongs to (see [`KeySet::by_ip`]).
    pub fn by_ip(&self, source: IpAddr) -> Option<Arc<AgentKey>> {
        self.current.load().by_ip(source).cloned()
    }

    /// Number of keys in the current set.
    pub fn len(&self) -> usize {
        self.current.load().len()
    }

    /// Whether the current set is empty.
    pub fn is_empty(&self) -> bool {
        self.current.load().is_empty()
    }

    /// Replaces the current set.
    pub fn replace(&self, set: KeySet) {
        self.current.store(Arc::new(set));
    }

    /// Re-reads `path` unconditionally and swaps the new set in.
    ///
    /// # Errors
    /// [`KeysError::Io`]; the current set is then kept.
    pub fn reload(&self, path: &Path) -> Result<ReloadReport, KeysError> {
        let (set, problems) = KeySet::read(path)?;
        let keys = set.len();
        self.replace(set);
        Ok(ReloadReport { keys, problems })
    }

    /// Re-reads `path` if its mtime, inode, device or size differ from the version loaded
    /// (the manager replaces the file by rename, which changes the inode). Returns `None` when
    /// nothing changed.
    ///
    /// # Errors
    /// [`KeysError::Io`]; the current set is then kept.
    pub fn reload_if_changed(&self, path: &Path) -> Result<Option<ReloadReport>, KeysError> {
        let meta = std::fs::metadata(path).map_err(|source| KeysError::Io {
            path: path.to_owned(),
            source,
        })?;
        if self.current.load().stamp == Some(FileStamp::of(&meta)) {
            return Ok(None);
        }
        self.reload(path).map(Some)
    }

    /// Polls `path` every `interval` (remoted uses
    /// [`DEFAULT_RELOAD_INTERVAL`](super::DEFAULT_RELOAD_INTERVAL)) and reloads it when it
    /// changes, until `cancel` fires. Logs the number of keys loaded and each malformed line
    /// (number and problem only); read errors keep the current keys and are logged.
    #[cfg(feature = "runtime")]
    pub async fn watch(self, path: PathBuf, interval: Duration, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let store = self.clone();
            let p = path.clone();
            // File I/O and key derivation for many agents would stall a runtime thread.
            let outcome = tokio::task::spawn_blocking(move || store.reload_if_changed(&p)).await;
            match outcome {
                Ok(Ok(Some(report))) => {
                    failing = false;
                    for problem in &report.problems {
                        tracing::warn!(path = %path.display(), %problem, "malformed client.keys line skipped");
                    }
                    tracing::info!(
                        path = %path.display(),
                        keys = report.keys,
                        malformed = report.problems.len(),
                        "agent keys reloaded"
                    );
                }
                Ok(Ok(None)) => failing = false,
                Ok(Err(error)) => {
                    // Log once per failure streak: a missing file would otherwise warn every tick.
                    if !failing {
                        tracing::warn!(%error, "agent keys not reloaded; keeping the current keys");
                    }
                    failing = true;
                }
                Err(error) => tracing::error!(%error, "agent keys reload task failed"),
            }
        }
    }
}
