//! Where files live: a local directory ([`FileStore`]) by default, or an S3-compatible
//! bucket (`S3Store`, feature `s3`, through kiln-upload's S3 target) when configured. Both keep the
//! content and a JSON sidecar with its [`FileMeta`]; the content is written first and the
//! sidecar last, so a file is visible only when complete, and a restarted server serves
//! every file stored before.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use serde::Deserialize;

#[cfg(feature = "s3")]
use crate::s3store::S3Store;
use crate::store::{FileMeta, FileStore};
use crate::{GatewayConfig, Metrics};

/// Which storage backend holds the files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StorageBackend {
    /// A local directory (`GatewayConfig::files_dir`). The default.
    #[default]
    Local,
    /// An S3-compatible bucket (`StorageConfig::s3`; feature `s3`).
    S3,
}

impl StorageBackend {
    /// `local` or `s3`.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageBackend::Local => "local",
            StorageBackend::S3 => "s3",
        }
    }
}

/// Settings of the file storage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` (files under `GatewayConfig::files_dir`) or `s3`. Default: local.
    pub backend: StorageBackend,
    /// The bucket, required for backend `s3`: endpoint, bucket, region, credentials,
    /// `path_style`, `key_prefix` (objects are `<key_prefix><file id>` plus
    /// `<key_prefix><file id>.json`), multipart threshold and part size (feature `s3`).
    /// Default: none.
    #[cfg(feature = "s3")]
    pub s3: Option<kiln_upload::S3Config>,
    /// Create the bucket at start when it is missing (for MinIO or test servers).
    /// Default: false.
    pub create_bucket: bool,
    /// Bytes fetched per ranged GET while streaming a file out of S3 (at most
    /// `client.max_response_bytes`). Default: 4 MiB.
    pub download_chunk_bytes: u64,
    /// Time limit of the write probe behind `/readyz`. Default: 5 s.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// The HTTP client that talks to S3: timeouts, retries, pool (kiln-upload's
    /// `UploadConfig`; feature `s3`). Default: kiln-upload's defaults.
    #[cfg(feature = "s3")]
    pub client: kiln_upload::UploadConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Local,
            #[cfg(feature = "s3")]
            s3: None,
            create_bucket: false,
            download_chunk_bytes: 4 << 20,
            probe_timeout: Duration::from_secs(5),
            #[cfg(feature = "s3")]
            client: kiln_upload::UploadConfig::default(),
        }
    }
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The local directory failed.
    #[error("file storage: {0}")]
    Io(#[from] std::io::Error),
    /// The S3 store failed (after kiln-upload's retries).
    #[cfg(feature = "s3")]
    #[error("S3 file storage: {0}")]
    S3(#[from] kiln_upload::UploadError),
    /// A stored file does not match its metadata.
    #[error("stored file {id} is damaged: {why}")]
    Corrupt {
        /// The file.
        id: String,
        /// What does not match.
        why: String,
    },
    /// The storage settings are invalid.
    #[error("storage config: {0}")]
    Config(String),
}

impl StorageError {
    /// Whether the same call may succeed later (a network or disk hiccup).
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Io(_) => true,
            #[cfg(feature = "s3")]
            StorageError::S3(e) => e.is_retryable(),
            StorageError::Corrupt { .. } | StorageError::Config(_) => false,
        }
    }
}

/// A file's content, streamed in chunks.
pub type ContentStream = BoxStream<'static, Result<Bytes, StorageError>>;

/// The file storage the gateway uses.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum FileStorage {
    /// A local directory.
    Local(FileStore),
    /// An S3-compatible bucket.
    #[cfg(feature = "s3")]
    S3(Box<S3Store>),
}

impl FileStorage {
    /// Opens the backend `config.storage` names (creating the directory, or checking the S3
    /// settings and creating the bucket when asked). S3 retries are counted in `metrics`.
    pub async fn open(config: &GatewayConfig, metrics: &Metrics) -> Result<Self, StorageError> {
        match config.storage.backend {
            StorageBackend::Local => Ok(Self::Local(FileStore::open(&config.files_dir).await?)),
            #[cfg(feature = "s3")]
            StorageBackend::S3 => Ok(Self::S3(Box::new(
                S3Store::open(&config.storage, metrics).await?,
            ))),
            #[cfg(not(feature = "s3"))]
            StorageBackend::S3 => {
                let _ = metrics;
                Err(StorageError::Config(
                    "storage backend \"s3\" needs kiln-gateway's `s3` feature".into(),
                ))
            }
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> StorageBackend {
        match self {
            FileStorage::Local(_) => StorageBackend::Local,
            #[cfg(feature = "s3")]
            FileStorage::S3(_) => StorageBackend::S3,
        }
    }

    /// Stores `data` under a new id. `compress_ms` is the time spent compressing it, kept
    /// in the metadata for task timings.
    pub async fn put(
        &self,
        data: Bytes,
        content_type: &str,
        dims: Option<(u32, u32)>,
        compress_ms: Option<u64>,
    ) -> Result<FileMeta, StorageError> {
        let meta = FileMeta::describe(&data, content_type, dims, compress_ms);
        match self {
            FileStorage::Local(s) => Ok(s.put_meta(meta, &data).await?),
            #[cfg(feature = "s3")]
            FileStorage::S3(s) => s.put(meta, data).await,
        }
    }

    /// Stores a complete upload (see [`crate::spool`]) of type `content_type` under a new
    /// id: renamed into the directory, or uploaded to the bucket from the file (multipart
    /// above the threshold, parts read from the file) and then removed.
    pub(crate) async fn put_spooled(
        &self,
        spooled: crate::spool::Spooled,
        content_type: &str,
    ) -> Result<FileMeta, StorageError> {
        let meta = FileMeta {
            id: format!("file_{}", uuid::Uuid::new_v4().simple()),
            content_type: content_type.to_owned(),
            bytes: spooled.bytes,
            width: None,
            height: None,
            sha256: spooled.sha256.clone(),
            created_at: kiln_protocol::now_ms(),
            compress_ms: None,
            store_ms: None,
        };
        match self {
            FileStorage::Local(s) => Ok(s.put_spooled(meta, spooled).await?),
            #[cfg(feature = "s3")]
            FileStorage::S3(s) => s.put_spooled(meta, spooled).await,
        }
    }

    /// `len` bytes of the content of the file `meta` describes, from byte `start`
    /// (`start + len` at most `meta.bytes`). `None` when the content is missing. A read of
    /// the whole file from S3 is checked against the stored SHA-256.
    pub(crate) async fn open_range(
        &self,
        meta: &FileMeta,
        start: u64,
        len: u64,
    ) -> Result<Option<ContentStream>, StorageError> {
        use tokio::io::AsyncReadExt as _;
        match self {
            FileStorage::Local(s) => Ok(s.open_at(&meta.id, start).await?.map(|f| {
                tokio_util::io::ReaderStream::with_capacity(f.take(len), 64 << 10)
                    .map(|r| r.map_err(StorageError::from))
                    .boxed()
            })),
            #[cfg(feature = "s3")]
            FileStorage::S3(s) => s.open_range(meta, start, len).await,
        }
    }

    /// The metadata of `id`, if stored.
    pub async fn meta(&self, id: &str) -> Result<Option<FileMeta>, StorageError> {
        match self {
            FileStorage::Local(s) => Ok(s.meta(id).await?),
            #[cfg(feature = "s3")]
            FileStorage::S3(s) => s.meta(id).await,
        }
    }

    /// The metadata and a stream of the content of `id`, if stored.
    pub async fn open_content(
        &self,
        id: &str,
    ) -> Result<Option<(FileMeta, ContentStream)>, StorageError> {
        match self {
            FileStorage::Local(s) => Ok(s.open_content(id).await?.map(|(m, f)| {
                let stream = tokio_util::io::ReaderStream::new(f)
                    .map(|r| r.map_err(StorageError::from))
                    .boxed();
                (m, stream)
            })),
            #[cfg(feature = "s3")]
            FileStorage::S3(s) => s.open_content(id).await,
        }
    }

    /// Reads the whole content of `id`.
    pub async fn read(&self, id: &str) -> Result<Option<(FileMeta, Bytes)>, StorageError> {
        let Some((meta, mut stream)) = self.open_content(id).await? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(usize::try_from(meta.bytes).unwrap_or(0));
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(Some((meta, Bytes::from(out))))
    }

    /// Deletes `id`; false when it was not there.
    pub async fn delete(&self, id: &str) -> Result<bool, StorageError> {
        match self {
            FileStorage::Local(s) => Ok(s.delete(id).await?),
            #[cfg(feature = "s3")]
            FileStorage::S3(s) => s.delete(id).await,
        }
    }

    /// Whether the storage accepts writes now (readiness): writes and removes a probe.
    /// `Err` says why not.
    pub async fn probe(&self) -> Result<(), String> {
        match self {
            FileStorage::Local(s) => {
                if s.writable().await {
                    Ok(())
                } else {
                    Err(format!("{} does not accept writes", s.dir().display()))
                }
            }
            #[cfg(feature = "s3")]
            FileStorage::S3(s) => s.probe().await,
        }
    }
}
