//! Where served batch files come from: a bounded in-memory LRU, an optional
//! directory shared between runs, and the generator as the last resort.
//!
//! ```text
//!  get(minute) ──► memory LRU ──hit──► bytes
//!                     │ miss
//!                     ▼
//!               in-flight table (one generation per minute, others wait)
//!                     │
//!                     ▼  spawn_blocking, at most one per CPU
//!               <dir>/<fingerprint>/<minute>.bz2 ──hit──► bytes
//!                     │ miss
//!                     ▼
//!               batch_file() ──► written to the dir (tmp + rename) ──► bytes
//! ```
//!
//! Generation is CPU-bound (bzip2 at level 9 runs at about 10 MB/s), so it
//! never runs on the async workers, and [`BatchStore::pregenerate`] lets a
//! benchmark build its batches before timing starts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OnceCell, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::minute::{Minute, MinuteRange};

use super::batch::batch_file;
use super::settings::{BatchSettings, CacheSettings};
use super::state::SimState;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("generating the batch of {minute} failed")]
    Generation {
        minute: Minute,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the batch store is shut down")]
    Closed,
    #[error("pregeneration was cancelled")]
    Cancelled,
}

/// What [`BatchStore::pregenerate`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PregenerateReport {
    pub minutes: u64,
    pub compressed_bytes: u64,
    pub elapsed: Duration,
}

pub struct BatchStore {
    settings: BatchSettings,
    /// `<cache dir>/<settings fingerprint>`, when a cache dir is configured.
    dir: Option<PathBuf>,
    memory: Mutex<Lru>,
    inflight: Mutex<HashMap<Minute, Arc<OnceCell<Bytes>>>>,
    generators: Semaphore,
    state: Arc<SimState>,
}

impl BatchStore {
    pub fn new(settings: BatchSettings, cache: &CacheSettings, state: Arc<SimState>) -> BatchStore {
        let dir = cache.dir.as_ref().map(|d| d.join(settings.fingerprint()));
        BatchStore {
            settings,
            dir,
            memory: Mutex::new(Lru::new(cache.memory_bytes)),
            inflight: Mutex::new(HashMap::new()),
            generators: Semaphore::new(parallelism()),
            state,
        }
    }

    /// The compressed batch of minute `m`.
    pub async fn get(&self, m: Minute) -> Result<Bytes, StoreError> {
        if let Some(bytes) = lock(&self.memory).get(m) {
            return Ok(bytes);
        }
        let cell = lock(&self.inflight).entry(m).or_default().clone();
        let result = cell.get_or_try_init(|| self.load(m)).await.cloned();
        if let Ok(bytes) = &result {
            lock(&self.memory).insert(m, bytes.clone());
        }
        let mut inflight = lock(&self.inflight);
        if inflight.get(&m).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&m);
        }
        result
    }

    /// Builds the batches of `range` ahead of use, one generator per CPU.
    /// With a cache dir they go to disk only (a long range would not fit in
    /// memory); without one they fill the memory cache.
    pub async fn pregenerate(
        &self,
        range: MinuteRange,
        cancel: &CancellationToken,
    ) -> Result<PregenerateReport, StoreError> {
        let start = Instant::now();
        let work = futures::stream::iter(range.iter())
            .map(|m| async move {
                if self.dir.is_some() {
                    self.load(m).await
                } else {
                    self.get(m).await
                }
            })
            .buffer_unordered(parallelism())
            .fold(Ok(0u64), |acc, r| async move { Ok(acc? + r?.len() as u64) });
        let compressed_bytes = tokio::select! {
            total = work => total?,
            _ = cancel.cancelled() => return Err(StoreError::Cancelled),
        };
        Ok(PregenerateReport {
            minutes: range.len().max(0) as u64,
            compressed_bytes,
            elapsed: start.elapsed(),
        })
    }

    /// Reads the batch from the cache dir or generates it, off the async workers.
    async fn load(&self, m: Minute) -> Result<Bytes, StoreError> {
        let _permit = self
            .generators
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let settings = self.settings.clone();
        let dir = self.dir.clone();
        let started = Instant::now();
        let (bytes, from_disk) =
            tokio::task::spawn_blocking(move || load_blocking(&settings, dir.as_deref(), m))
                .await
                .map_err(|source| StoreError::Generation { minute: m, source })?;
        self.state.count_generated(from_disk);
        tracing::debug!(minute = %m, bytes = bytes.len(), from_disk, elapsed = ?started.elapsed(), "batch ready");
        Ok(bytes)
    }
}

fn load_blocking(settings: &BatchSettings, dir: Option<&Path>, m: Minute) -> (Bytes, bool) {
    let Some(dir) = dir else {
        return (Bytes::from(batch_file(settings, m)), false);
    };
    let path = dir.join(format!("{m}.bz2"));
    match std::fs::read(&path) {
        Ok(bytes) => return (Bytes::from(bytes), true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read cached batch; regenerating")
        }
    }
    let bytes = batch_file(settings, m);
    // A cache that cannot be written only costs speed: log and serve.
    if let Err(e) = write_atomically(dir, &path, &bytes) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write batch cache");
    }
    (Bytes::from(bytes), false)
}

/// Writes to a temporary file and renames it, so readers never see half a file.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A std Mutex: held only for map updates, never across an await.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Least-recently-used cache bounded by total bytes.
struct Lru {
    capacity: u64,
    used: u64,
    tick: u64,
    entries: HashMap<Minute, (Bytes, u64)>,
    by_age: BTreeMap<u64, Minute>,
}

impl Lru {
    fn new(capacity: u64) -> Lru {
        Lru {
            capacity,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }

    fn get(&mut self, m: Minute) -> Option<Bytes> {
        self.tick += 1;
        let (bytes, age) = self.entries.get_mut(&m)?;
        self.by_age.remove(age);
        *age = self.tick;
        self.by_age.insert(self.tick, m);
        Some(bytes.clone())
    }

    fn insert(&mut self, m: Minute, bytes: Bytes) {
        let size = bytes.len() as u64;
        if size > self.capacity || self.entries.contains_key(&m) {
            return;
        }
        while self.used + size > self.capacity {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((evicted, _)) = self.entries.remove(&oldest) {
                self.used -= evicted.len() as u64;
            }
        }
        self.tick += 1;
        self.used += size;
        self.entries.insert(m, (bytes, self.tick));
        self.by_age.insert(self.tick, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(i: i64) -> Minute {
        Minute::parse("202611230900").unwrap().plus(i)
    }

    #[test]
    fn lru_evicts_least_recently_used_by_bytes() {
        let mut lru = Lru::new(10);
        lru.insert(m(0), Bytes::from_static(b"aaaa"));
        lru.insert(m(1), Bytes::from_static(b"bbbb"));
        assert!(lru.get(m(0)).is_some());
        lru.insert(m(2), Bytes::from_static(b"cccc"));
        assert!(lru.get(m(1)).is_none(), "1 was least recently used");
        assert!(lru.get(m(0)).is_some() && lru.get(m(2)).is_some());
        lru.insert(m(3), Bytes::from_static(b"too large for it"));
        assert!(lru.get(m(3)).is_none());
        assert_eq!(lru.used, 8);
    }

    #[tokio::test]
    async fn generates_once_then_serves_from_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheSettings {
            memory_bytes: 1 << 30,
            dir: Some(dir.path().to_path_buf()),
        };
        let settings = BatchSettings::exact(1, 3);
        let state = Arc::new(SimState::default());
        let store = BatchStore::new(settings.clone(), &cache, state.clone());
        let (a, b) = tokio::join!(store.get(m(0)), store.get(m(0)));
        assert_eq!(a.unwrap(), b.unwrap());
        assert_eq!(
            state.stats().batches_generated,
            1,
            "concurrent gets share one generation"
        );
        let file = dir
            .path()
            .join(settings.fingerprint())
            .join("202611230900.bz2");
        assert_eq!(std::fs::read(&file).unwrap(), batch_file(&settings, m(0)));

        // A new store over the same dir reads instead of generating.
        let state2 = Arc::new(SimState::default());
        let store2 = BatchStore::new(settings.clone(), &cache, state2.clone());
        let report = store2
            .pregenerate(MinuteRange::new(m(0), m(2)), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(report.minutes, 3);
        assert_eq!(
            (
                state2.stats().batches_read_from_disk,
                state2.stats().batches_generated
            ),
            (1, 2)
        );
        assert_eq!(store2.get(m(2)).await.unwrap(), batch_file(&settings, m(2)));
    }
}
