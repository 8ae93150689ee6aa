//! Results waiting for `result_ack`, one JSON file per lease, written before they are sent.
//! Durable across a crash of the worker process (not across a power loss: no fsync).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_protocol::messages::TaskResult;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) task_id: String,
    pub(crate) attempt: u32,
    pub(crate) result: TaskResult,
}

#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    dir: PathBuf,
    /// The entries written and not yet acknowledged, by lease: the files are read once, at
    /// open, and after that only written (and removed in the background).
    pending: Arc<Mutex<HashMap<String, Entry>>>,
    /// File removals still running in the background (finished ones are reaped as new ones
    /// start), so that a worker that stops can wait for them: see [`Outbox::settle`].
    removals: Arc<Mutex<tokio::task::JoinSet<()>>>,
}

impl Outbox {
    pub(crate) async fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("outbox");
        tokio::fs::create_dir_all(&dir).await?;
        let found = read_entries(&dir).await;
        Ok(Self {
            dir,
            pending: Arc::new(Mutex::new(found)),
            removals: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, lease: &str) -> PathBuf {
        let safe: String = lease
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect();
        self.dir.join(format!("{safe}.json"))
    }

    pub(crate) async fn put(&self, e: &Entry) -> std::io::Result<()> {
        let path = self.path(&e.result.lease);
        let tmp = path.with_extension("tmp");
        // Written to a temporary name and renamed: a crash of the process never leaves a torn
        // entry. No fsync: like the queue's WAL in NORMAL mode, an entry survives a process
        // crash; after a power loss a lost entry means the lease lapses and the task runs again.
        // One trip to the blocking pool for both steps: this is on every result's path.
        let bytes = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        tokio::task::spawn_blocking(move || {
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(std::io::Error::other)??;
        self.lock().insert(e.result.lease.clone(), e.clone());
        Ok(())
    }

    /// Deletes the entry of `lease` in the background: the session loop does not wait for
    /// the file system. A crash before it happens leaves an entry that is resent and
    /// answered with `accepted: false`, which is harmless.
    pub(crate) fn remove(&self, lease: &str) {
        if self.lock().remove(lease).is_none() {
            return;
        }
        let path = self.path(lease);
        let mut removals = self.removals.lock().unwrap_or_else(|p| p.into_inner());
        while removals.try_join_next().is_some() {}
        removals.spawn_blocking(move || {
            let _ = std::fs::remove_file(path);
        });
    }

    /// Waits for the background removals started so far, so that an acknowledged result
    /// leaves no file behind when the worker stops.
    pub(crate) async fn settle(&self) {
        let mut removals =
            std::mem::take(&mut *self.removals.lock().unwrap_or_else(|p| p.into_inner()));
        while removals.join_next().await.is_some() {}
    }

    /// Whether no result waits for its `result_ack`.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The entries waiting for their `result_ack`.
    pub(crate) fn all(&self) -> Vec<Entry> {
        self.lock().values().cloned().collect()
    }
}

/// The entries on disk, by lease; unreadable or torn files are skipped.
async fn read_entries(dir: &Path) -> HashMap<String, Entry> {
    let mut out = HashMap::new();
    let Ok(mut rd) = tokio::fs::read_dir(dir).await else {
        return out;
    };
    while let Ok(Some(e)) = rd.next_entry().await {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json")
            && let Ok(bytes) = tokio::fs::read(&p).await
            && let Ok(entry) = serde_json::from_slice::<Entry>(&bytes)
        {
            out.insert(entry.result.lease.clone(), entry);
        }
    }
    out
}
