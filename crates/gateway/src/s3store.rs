//! Files in an S3-compatible bucket, through kiln-upload: the content is
//! `<key_prefix><id>` (PutObject, multipart above the threshold, every request retried by
//! kiln-retry's policy), the metadata `<key_prefix><id>.json`, written after the content.
//! Downloads stream in ranged GETs of `download_chunk_bytes` and are checked against the
//! stored SHA-256 at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use kiln_upload::{Payload, S3, UploadClient, UploadFile};
use sha2::{Digest, Sha256};

use crate::Metrics;
use crate::storage::{ContentStream, StorageConfig, StorageError};
use crate::store::{FileMeta, valid_file_id};

/// Name of the object `/readyz` writes and removes.
const PROBE: &str = ".kiln-ready-probe";

/// An S3-compatible bucket holding files and their metadata.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: UploadClient,
    target: S3,
    bucket: String,
    chunk: u64,
    probe_timeout: Duration,
}

impl S3Store {
    /// Checks the settings, builds the client (its retries counted in `metrics`) and, with
    /// `create_bucket`, creates the bucket.
    pub async fn open(cfg: &StorageConfig, metrics: &Metrics) -> Result<Self, StorageError> {
        let s3 = cfg.s3.clone().ok_or_else(|| {
            StorageError::Config("backend s3 needs the bucket settings (storage.s3)".into())
        })?;
        if cfg.download_chunk_bytes == 0
            || cfg.download_chunk_bytes > cfg.client.max_response_bytes as u64
        {
            return Err(StorageError::Config(format!(
                "download_chunk_bytes must be 1 to client.max_response_bytes ({})",
                cfg.client.max_response_bytes
            )));
        }
        let bucket = s3.bucket.clone();
        let target = S3::new(s3)
            .map_err(|e| StorageError::Config(e.to_string()))?
            .named("s3-files");
        let hook = Arc::new(crate::upload_metrics::UploadMetrics::new(
            metrics, "storage",
        ));
        let client = UploadClient::with_metrics(cfg.client.clone(), hook)
            .map_err(|e| StorageError::Config(e.to_string()))?;
        if cfg.create_bucket {
            target.create_bucket(&client).await?;
        }
        Ok(Self {
            client,
            target,
            bucket,
            chunk: cfg.download_chunk_bytes,
            probe_timeout: cfg.probe_timeout,
        })
    }

    /// Uploads the content, then the metadata.
    pub(crate) async fn put(
        &self,
        mut meta: FileMeta,
        data: Bytes,
    ) -> Result<FileMeta, StorageError> {
        let started = Instant::now();
        let content = UploadFile::new(Payload::Bytes(data), &meta.id, &meta.content_type);
        self.client.upload(&self.target, &content).await?;
        meta.store_ms = Some(started.elapsed().as_millis() as u64);
        let json = serde_json::to_vec(&meta).map_err(|e| StorageError::Config(e.to_string()))?;
        let sidecar = UploadFile::new(json, format!("{}.json", meta.id), "application/json");
        self.client.upload(&self.target, &sidecar).await?;
        Ok(meta)
    }

    /// Reads the metadata object; `None` when it does not exist.
    pub(crate) async fn meta(&self, id: &str) -> Result<Option<FileMeta>, StorageError> {
        if !valid_file_id(id) {
            return Ok(None);
        }
        let key = self.target.key_for(&format!("{id}.json"));
        match self.target.get_object(&self.client, &key).await {
            Ok(body) => {
                serde_json::from_slice(&body)
                    .map(Some)
                    .map_err(|e| StorageError::Corrupt {
                        id: id.to_owned(),
                        why: format!("metadata is not JSON: {e}"),
                    })
            }
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Uploads a complete upload from its file (multipart above the threshold, every
    /// part read from the file), then the metadata; the file is removed afterwards.
    pub(crate) async fn put_spooled(
        &self,
        mut meta: FileMeta,
        spooled: crate::spool::Spooled,
    ) -> Result<FileMeta, StorageError> {
        let started = Instant::now();
        let payload = Payload::File {
            path: spooled.path.path().to_owned(),
            offset: 0,
            len: spooled.bytes,
        };
        let content = UploadFile::new(payload, &meta.id, &meta.content_type);
        self.client.upload(&self.target, &content).await?;
        drop(spooled);
        meta.store_ms = Some(started.elapsed().as_millis() as u64);
        let json = serde_json::to_vec(&meta).map_err(|e| StorageError::Config(e.to_string()))?;
        let sidecar = UploadFile::new(json, format!("{}.json", meta.id), "application/json");
        self.client.upload(&self.target, &sidecar).await?;
        Ok(meta)
    }

    /// The metadata and the content as a stream. The first chunk is fetched before this
    /// returns, so a missing object is a `None` (404), not a broken response.
    pub(crate) async fn open_content(
        &self,
        id: &str,
    ) -> Result<Option<(FileMeta, ContentStream)>, StorageError> {
        let Some(meta) = self.meta(id).await? else {
            return Ok(None);
        };
        let bytes = meta.bytes;
        Ok(self
            .open_range(&meta, 0, bytes)
            .await?
            .map(|stream| (meta, stream)))
    }

    /// `len` bytes from `start` as a stream of ranged GETs of `download_chunk_bytes`. The
    /// first chunk is fetched before this returns (a missing object is `None`); a read of
    /// the whole object is checked against the stored SHA-256 at its end.
    pub(crate) async fn open_range(
        &self,
        meta: &FileMeta,
        start: u64,
        len: u64,
    ) -> Result<Option<ContentStream>, StorageError> {
        let id = &meta.id;
        let end = start.saturating_add(len).min(meta.bytes);
        let whole = start == 0 && end == meta.bytes;
        let key = self.target.key_for(id);
        let first = match self.chunk_at(meta, &key, start, end).await {
            Ok(b) => b,
            Err(StorageError::S3(e)) if e.status() == Some(404) => {
                tracing::warn!(message = "file metadata without content in the bucket", file_id = %id, bucket = %self.bucket);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut hasher = Sha256::new();
        hasher.update(&first);
        let offset = start + first.len() as u64;
        let this = self.clone();
        let m = meta.clone();
        let rest = futures_util::stream::try_unfold((offset, hasher), move |(offset, hasher)| {
            let (this, meta, key) = (this.clone(), m.clone(), key.clone());
            async move {
                if offset >= end {
                    let got = hex::encode(hasher.finalize());
                    if whole && got != meta.sha256 {
                        return Err(StorageError::Corrupt {
                            id: meta.id.clone(),
                            why: format!("content SHA-256 is {got}, metadata says {}", meta.sha256),
                        });
                    }
                    return Ok(None);
                }
                let chunk = this.chunk_at(&meta, &key, offset, end).await?;
                let mut hasher = hasher;
                hasher.update(&chunk);
                let next = offset + chunk.len() as u64;
                Ok(Some((chunk, (next, hasher))))
            }
        });
        let stream = futures_util::stream::once(async move { Ok(first) })
            .chain(rest)
            .filter(|r| std::future::ready(!matches!(r, Ok(b) if b.is_empty())))
            .boxed();
        Ok(Some(stream))
    }

    /// The chunk at `offset`, checked to be exactly as long as asked.
    async fn chunk_at(
        &self,
        meta: &FileMeta,
        key: &str,
        offset: u64,
        end: u64,
    ) -> Result<Bytes, StorageError> {
        let len = self.chunk.min(end.saturating_sub(offset));
        if len == 0 {
            return Ok(Bytes::new());
        }
        let body = self
            .target
            .get_object_range(&self.client, key, offset, len)
            .await?;
        if body.len() as u64 != len {
            return Err(StorageError::Corrupt {
                id: meta.id.clone(),
                why: format!(
                    "asked for {len} bytes at {offset}, got {} (object size differs from the metadata's {})",
                    body.len(),
                    meta.bytes
                ),
            });
        }
        Ok(body)
    }

    /// Deletes the metadata, then the content; false when there was no metadata.
    pub(crate) async fn delete(&self, id: &str) -> Result<bool, StorageError> {
        if self.meta(id).await?.is_none() {
            return Ok(false);
        }
        let sidecar = self.target.key_for(&format!("{id}.json"));
        self.target.delete_object(&self.client, &sidecar).await?;
        self.target
            .delete_object(&self.client, &self.target.key_for(id))
            .await?;
        Ok(true)
    }

    /// Writes and deletes a probe object within `probe_timeout`.
    pub(crate) async fn probe(&self) -> Result<(), String> {
        let work = async {
            let probe = UploadFile::new(b"ok".to_vec(), PROBE, "text/plain");
            self.client.upload(&self.target, &probe).await?;
            self.target
                .delete_object(&self.client, &self.target.key_for(PROBE))
                .await
        };
        match tokio::time::timeout(self.probe_timeout, work).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("bucket {}: {e}", self.bucket)),
            Err(_) => Err(format!(
                "bucket {}: no answer within {} ms",
                self.bucket,
                self.probe_timeout.as_millis()
            )),
        }
    }
}
