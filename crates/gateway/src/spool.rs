//! Uploads on their way to the storage: a temporary file in the spool directory, written
//! chunk by chunk while the SHA-256 and the size are counted, so a large upload is never
//! held in memory. The file is removed when the upload fails or is dropped.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;

/// A temporary file that is deleted when dropped, unless [`TempPath::keep`] took it.
#[derive(Debug)]
pub(crate) struct TempPath(Option<PathBuf>);

impl TempPath {
    /// The path.
    pub(crate) fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
    /// The path, no longer deleted on drop (it was renamed into place).
    pub(crate) fn keep(mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // Best effort, a cheap syscall; leftovers are removed at the next start.
            let _ = std::fs::remove_file(p);
        }
    }
}

/// An upload being written.
#[derive(Debug)]
pub(crate) struct Spool {
    file: tokio::fs::File,
    path: TempPath,
    hasher: Sha256,
    bytes: u64,
}

/// A complete upload on disk, synced.
#[derive(Debug)]
pub(crate) struct Spooled {
    /// The file (removed on drop unless kept).
    pub(crate) path: TempPath,
    /// Its size.
    pub(crate) bytes: u64,
    /// Hex SHA-256 of its content.
    pub(crate) sha256: String,
}

impl Spool {
    /// A new temporary file in `dir`.
    pub(crate) async fn create(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(format!("upload-{}", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::File::create(&path).await?;
        Ok(Self {
            file,
            path: TempPath(Some(path)),
            hasher: Sha256::new(),
            bytes: 0,
        })
    }

    /// Bytes written so far.
    pub(crate) fn len(&self) -> u64 {
        self.bytes
    }

    /// Appends a chunk.
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
        self.file.write_all(chunk).await
    }

    /// Flushes and syncs the file.
    pub(crate) async fn finish(mut self) -> std::io::Result<Spooled> {
        self.file.flush().await?;
        self.file.sync_all().await?;
        Ok(Spooled {
            path: self.path,
            bytes: self.bytes,
            sha256: hex::encode(self.hasher.finalize()),
        })
    }
}

/// Creates the spool directory and removes what a crash left in it.
pub(crate) async fn prepare(dir: &Path) -> std::io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let mut entries = tokio::fs::read_dir(dir).await?;
    while let Some(e) = entries.next_entry().await? {
        if e.file_name().to_string_lossy().starts_with("upload-") {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
    Ok(())
}
