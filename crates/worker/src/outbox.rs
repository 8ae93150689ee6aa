//! Results waiting for `result_ack`, one JSON file per lease, written before they are sent.
//! Durable across a crash of the worker process (not across a power loss: no fsync).

use std::path::{Path, PathBuf};

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
}

impl Outbox {
    pub(crate) async fn open(state_dir: &Path) -> std::io::Result<Self> {
        let dir = state_dir.join("outbox");
        tokio::fs::create_dir_all(&dir).await?;
        Ok(Self { dir })
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
        tokio::fs::write(&tmp, serde_json::to_vec(e).map_err(std::io::Error::other)?).await?;
        tokio::fs::rename(&tmp, &path).await
    }

    pub(crate) async fn remove(&self, lease: &str) {
        let _ = tokio::fs::remove_file(self.path(lease)).await;
    }

    /// Whether no result waits for its `result_ack`.
    pub(crate) async fn is_empty(&self) -> bool {
        let Ok(mut rd) = tokio::fs::read_dir(&self.dir).await else {
            return true;
        };
        while let Ok(Some(e)) = rd.next_entry().await {
            if e.path().extension().is_some_and(|x| x == "json") {
                return false;
            }
        }
        true
    }

    pub(crate) async fn all(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        let Ok(mut rd) = tokio::fs::read_dir(&self.dir).await else {
            return out;
        };
        while let Ok(Some(e)) = rd.next_entry().await {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json")
                && let Ok(bytes) = tokio::fs::read(&p).await
                && let Ok(entry) = serde_json::from_slice::<Entry>(&bytes)
            {
                out.push(entry);
            }
        }
        out
    }
}
