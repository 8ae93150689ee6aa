//! Async helper: a bounded blocking pool plus an LRU cache of results bounded in bytes.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

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

struct Cache {
    map: lru::LruCache<Key, Arc<Compressed>>,
    bytes: usize,
    cap: usize,
}

/// Runs [`compress`] off the async runtime on `spawn_blocking`, at most
/// `max_concurrent` at a time, with a cache keyed by SHA-256 of input and options.
#[derive(Clone)]
pub struct Compressor {
    permits: Arc<Semaphore>,
    cache: Arc<Mutex<Cache>>,
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
            })),
        }
    }

    /// Compress `input` with `opts` without blocking the runtime; cached results are shared.
    pub async fn compress(
        &self,
        input: Arc<[u8]>,
        opts: CompressOptions,
    ) -> Result<Arc<Compressed>, CompressError> {
        let key = cache_key(&input, &opts);
        if let Some(hit) = self.lock().map.get(&key).cloned() {
            return Ok(hit);
        }
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| CompressError::Worker(e.to_string()))?;
        let out = tokio::task::spawn_blocking(move || compress(&input, &opts))
            .await
            .map_err(|e| CompressError::Worker(e.to_string()))??;
        let out = Arc::new(out);
        let mut cache = self.lock();
        let len = out.bytes.len();
        if len <= cache.cap {
            if let Some(old) = cache.map.put(key, out.clone()) {
                cache.bytes -= old.bytes.len();
            }
            cache.bytes += len;
            while cache.bytes > cache.cap {
                match cache.map.pop_lru() {
                    Some((_, v)) => cache.bytes -= v.bytes.len(),
                    None => break,
                }
            }
        }
        Ok(out)
    }

    /// Bytes currently held by the cache.
    pub fn cached_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn cache_key(input: &[u8], opts: &CompressOptions) -> Key {
    let mut h = Sha256::new();
    h.update(b"kiln-compress/1\0");
    h.update(format!("{opts:?}").as_bytes());
    h.update([0]);
    h.update(input);
    h.finalize().into()
}
