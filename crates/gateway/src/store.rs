//! Local file storage: each file is `<dir>/<id>` plus a JSON sidecar with its metadata,
//! written to a temporary name and renamed, so a crash never leaves a half file visible.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Metadata of a stored file, as the API returns it (plus its URL, added by the handler).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileMeta {
    /// `file_` followed by 32 hex digits.
    pub id: String,
    /// MIME type.
    pub content_type: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Pixel width, for images.
    pub width: Option<u32>,
    /// Pixel height, for images.
    pub height: Option<u32>,
    /// Hex SHA-256 of the content.
    pub sha256: String,
    /// Creation time, Unix milliseconds.
    pub created_at: u64,
    /// Time spent compressing the upload to its limits, ms; absent when it was stored as
    /// sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_ms: Option<u64>,
    /// Time spent writing the content to the storage, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_ms: Option<u64>,
}

impl FileMeta {
    /// The metadata of new content, under a new id (`store_ms` is set by the backend).
    pub fn describe(
        data: &[u8],
        content_type: &str,
        dims: Option<(u32, u32)>,
        compress_ms: Option<u64>,
    ) -> Self {
        Self {
            id: format!("file_{}", uuid::Uuid::new_v4().simple()),
            content_type: content_type.to_owned(),
            bytes: data.len() as u64,
            width: dims.map(|d| d.0),
            height: dims.map(|d| d.1),
            sha256: hex::encode(Sha256::digest(data)),
            created_at: kiln_protocol::now_ms(),
            compress_ms,
            store_ms: None,
        }
    }
}

/// A directory of files.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// Whether `id` has the shape of a file id (so it can never name a path outside the store).
pub(crate) fn valid_file_id(id: &str) -> bool {
    id.len() == 37
        && id.starts_with("file_")
        && id[5..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl FileStore {
    /// A store in `dir` (created when missing).
    pub async fn open(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        tokio::fs::create_dir_all(&dir).await?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores `data` under a new id.
    pub async fn put(
        &self,
        data: &[u8],
        content_type: &str,
        dims: Option<(u32, u32)>,
    ) -> std::io::Result<FileMeta> {
        self.put_meta(FileMeta::describe(data, content_type, dims, None), data)
            .await
    }

    /// Stores `data` described by `meta` (from [`FileMeta::describe`]): the content
    /// first, the sidecar last.
    pub async fn put_meta(&self, mut meta: FileMeta, data: &[u8]) -> std::io::Result<FileMeta> {
        if !valid_file_id(&meta.id) {
            return Err(std::io::Error::other(format!("bad file id {:?}", meta.id)));
        }
        let started = std::time::Instant::now();
        write_atomic(&self.dir.join(&meta.id), data).await?;
        meta.store_ms = Some(started.elapsed().as_millis() as u64);
        let json = serde_json::to_vec(&meta).map_err(std::io::Error::other)?;
        write_atomic(&self.dir.join(format!("{}.json", meta.id)), &json).await?;
        Ok(meta)
    }

    /// Moves a complete upload (a synced file in a directory on the same file system) into
    /// place under `meta.id`, then writes the sidecar.
    pub(crate) async fn put_spooled(
        &self,
        mut meta: FileMeta,
        spooled: crate::spool::Spooled,
    ) -> std::io::Result<FileMeta> {
        if !valid_file_id(&meta.id) {
            return Err(std::io::Error::other(format!("bad file id {:?}", meta.id)));
        }
        let started = std::time::Instant::now();
        tokio::fs::rename(spooled.path.path(), self.dir.join(&meta.id)).await?;
        spooled.path.keep();
        meta.store_ms = Some(started.elapsed().as_millis() as u64);
        let json = serde_json::to_vec(&meta).map_err(std::io::Error::other)?;
        write_atomic(&self.dir.join(format!("{}.json", meta.id)), &json).await?;
        Ok(meta)
    }

    /// The content of `id` from byte `start` on, for streaming.
    pub(crate) async fn open_at(
        &self,
        id: &str,
        start: u64,
    ) -> std::io::Result<Option<tokio::fs::File>> {
        use tokio::io::AsyncSeekExt as _;
        if !valid_file_id(id) {
            return Ok(None);
        }
        match tokio::fs::File::open(self.dir.join(id)).await {
            Ok(mut f) => {
                if start > 0 {
                    f.seek(std::io::SeekFrom::Start(start)).await?;
                }
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The metadata of `id`, if stored.
    pub async fn meta(&self, id: &str) -> std::io::Result<Option<FileMeta>> {
        if !valid_file_id(id) {
            return Ok(None);
        }
        match tokio::fs::read(self.dir.join(format!("{id}.json"))).await {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the content of `id` for streaming.
    pub async fn open_content(
        &self,
        id: &str,
    ) -> std::io::Result<Option<(FileMeta, tokio::fs::File)>> {
        let Some(meta) = self.meta(id).await? else {
            return Ok(None);
        };
        match tokio::fs::File::open(self.dir.join(id)).await {
            Ok(f) => Ok(Some((meta, f))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads the whole content of `id`.
    pub async fn read(&self, id: &str) -> std::io::Result<Option<(FileMeta, Vec<u8>)>> {
        let Some(meta) = self.meta(id).await? else {
            return Ok(None);
        };
        Ok(Some((meta, tokio::fs::read(self.dir.join(id)).await?)))
    }

    /// Deletes `id`; false when it was not there.
    pub async fn delete(&self, id: &str) -> std::io::Result<bool> {
        if !valid_file_id(id) {
            return Ok(false);
        }
        let existed = match tokio::fs::remove_file(self.dir.join(format!("{id}.json"))).await {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        match tokio::fs::remove_file(self.dir.join(id)).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(existed),
            Err(e) => Err(e),
        }
    }

    /// Whether the directory accepts writes (readiness).
    pub async fn writable(&self) -> bool {
        let probe = self.dir.join(".ready-probe");
        let ok = tokio::fs::write(&probe, b"ok").await.is_ok();
        let _ = tokio::fs::remove_file(&probe).await;
        ok
    }
}

async fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    tokio::fs::write(&tmp, data).await?;
    let file = tokio::fs::File::open(&tmp).await?;
    file.sync_all().await?;
    tokio::fs::rename(&tmp, path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_read_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).await.unwrap();
        let meta = store.put(b"hello", "text/plain", None).await.unwrap();
        assert!(valid_file_id(&meta.id));
        assert_eq!(
            meta.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(meta.store_ms.is_some());
        let (m, data) = store.read(&meta.id).await.unwrap().unwrap();
        assert_eq!((m, data), (meta.clone(), b"hello".to_vec()));
        assert!(store.delete(&meta.id).await.unwrap());
        assert!(store.read(&meta.id).await.unwrap().is_none());
        assert!(store.meta("../etc/passwd").await.unwrap().is_none());
        assert!(store.writable().await);
    }
}
