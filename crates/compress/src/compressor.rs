//! Async helper: a bounded blocking pool, an LRU cache of results bounded in bytes, and
//! single flight for identical requests.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, watch};

use crate::{CompressError, CompressOptions, Compressed, compress};

/// Configuration of a [`Compressor`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CompressorConfig {
    /// Images compressed at once. Default: the number of available cores.
    pub max_concurrent: usize,
    /// Total bytes of cached outputs; 0 disables the cache. Default: 64 MiB.
    pub cache_bytes: usize,
}

impl Default for CompressorConfig {
    fn default() -> Self {
        Self {
            max_concurrent: std::thread::available_parallelism().map_or(2, NonZeroUsize::get),
            cache_bytes: 64 << 20,
        }
    }
}

type Key = [u8; 32];

/// What a finished job hands to everyone waiting on it.
type Outcome = Result<Arc<Compressed>, CompressError>;

struct Cache {
    map: lru::LruCache<Key, Arc<Compressed>>,
    bytes: usize,
    cap: usize,
    /// Jobs running now, by key: later identical requests wait on the receiver.
    inflight: HashMap<Key, watch::Receiver<Option<Outcome>>>,
}

impl Cache {
    fn insert(&mut self, key: Key, out: &Arc<Compressed>) {
        let len = out.bytes.len();
        if len > self.cap {
            return;
        }
        if let Some(old) = self.map.put(key, out.clone()) {
            self.bytes -= old.bytes.len();
        }
        self.bytes += len;
        while self.bytes > self.cap {
            match self.map.pop_lru() {
                Some((_, v)) => self.bytes -= v.bytes.len(),
                None => break,
            }
        }
    }
}

/// Runs [`compress`] off the async runtime on `spawn_blocking`, at most
/// `max_concurrent` at a time, with a cache keyed by SHA-256 of input and options.
///
/// Identical requests that arrive while one is being compressed wait for it instead of
/// compressing again (single flight); they share its result or its error.
#[derive(Clone)]
pub struct Compressor {
    permits: Arc<Semaphore>,
    cache: Arc<Mutex<Cache>>,
}

enum Role {
    Leader(watch::Sender<Option<Outcome>>),
    Follower(watch::Receiver<Option<Outcome>>),
}

/// A leader's in-flight entry, removed when this is dropped: after the job has filled the
/// cache, or early if the leader is dropped before its job starts (or the job panics), so
/// that followers (who then see the channel close) and later requests start afresh.
struct Pending {
    cache: Arc<Mutex<Cache>>,
    key: Key,
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.cache).inflight.remove(&self.key);
    }
}

impl Compressor {
    /// A compressor with the given configuration.
    pub fn new(config: CompressorConfig) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            cache: Arc::new(Mutex::new(Cache {
                map: lru::LruCache::unbounded(),
                bytes: 0,
                cap: config.cache_bytes,
                inflight: HashMap::new(),
            })),
        }
    }

    /// Compress `input` with `opts` without blocking the runtime; cached results are shared,
    /// and so is a compression of the same input and options that is already running.
    ///
    /// Dropping the returned future does not cancel a compression that has started: it
    /// finishes, fills the cache and answers the other requests waiting for it.
    pub async fn compress(
        &self,
        input: Arc<[u8]>,
        opts: CompressOptions,
    ) -> Result<Arc<Compressed>, CompressError> {
        let key = cache_key(&input, &opts);
        loop {
            let role = {
                let mut cache = lock(&self.cache);
                if let Some(hit) = cache.map.get(&key).cloned() {
                    return Ok(hit);
                }
                match cache.inflight.get(&key) {
                    Some(rx) => Role::Follower(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        cache.inflight.insert(key, rx);
                        Role::Leader(tx)
                    }
                }
            };
            match role {
                Role::Follower(mut rx) => {
                    if let Ok(done) = rx.wait_for(Option::is_some).await
                        && let Some(outcome) = done.clone()
                    {
                        return outcome;
                    }
                    // The leader went away before finishing; try again (perhaps as leader).
                    tokio::task::yield_now().await;
                }
                Role::Leader(tx) => return self.lead(key, tx, input, opts).await,
            }
        }
    }

    async fn lead(
        &self,
        key: Key,
        tx: watch::Sender<Option<Outcome>>,
        input: Arc<[u8]>,
        opts: CompressOptions,
    ) -> Outcome {
        let pending = Pending {
            cache: self.cache.clone(),
            key,
        };
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| CompressError::Worker(e.to_string()))?;
        // From here on the blocking job owns the entry (removed even if it panics) and
        // answers the followers.
        let job = tokio::task::spawn_blocking(move || {
            let outcome = compress(&input, &opts).map(Arc::new);
            drop(permit);
            if let Ok(out) = &outcome {
                lock(&pending.cache).insert(key, out);
            }
            drop(pending);
            tx.send_replace(Some(outcome.clone()));
            outcome
        });
        job.await
            .map_err(|e| CompressError::Worker(e.to_string()))?
    }

    /// Bytes currently held by the cache.
    pub fn cached_bytes(&self) -> usize {
        lock(&self.cache).bytes
    }
}

fn lock(cache: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn cache_key(input: &[u8], opts: &CompressOptions) -> Key {
    let mut h = Sha256::new();
    h.update(b"kiln-compress/1\0");
    h.update(format!("{opts:?}").as_bytes());
    h.update([0]);
    h.update(input);
    h.finalize().into()
}
