//! Results waiting for `result_ack`, written before they are sent, in one append-only file
//! (`outbox.log` in the state directory): a line `{"put": entry}` when a result is stored,
//! `{"ack": lease}` when the gateway acknowledged it. Appending a line is one small write
//! to the page cache, so it happens in place instead of on the blocking pool. Durable
//! across a crash of the worker process (not across a power loss: no fsync). The file is
//! rewritten with only the waiting entries when the outbox opens and once it has grown past
//! [`COMPACT_AFTER`] lines. Entries of the earlier layout (one `outbox/<lease>.json` file
//! per result) are taken over when the outbox opens.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
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

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Record {
    Put(Entry),
    Ack(String),
}

/// The log is rewritten with only the waiting entries after this many lines.
const COMPACT_AFTER: usize = 4096;
/// Entries larger than this are written on the blocking pool.
const INLINE_BYTES: usize = 64 << 10;

/// The log file and what it holds.
#[derive(Debug)]
struct Log {
    path: PathBuf,
    file: File,
    /// Lines written since the file was last rewritten.
    lines: usize,
    /// The entries written and not yet acknowledged, by lease.
    pending: HashMap<String, Entry>,
}

impl Log {
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.file.write_all(line)?;
        self.lines += 1;
        Ok(())
    }

    /// Rewrites the file with only the waiting entries (a temporary file renamed over it,
    /// so that a crash leaves the old or the new one whole).
    fn compact(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("log.tmp");
        let mut bytes = Vec::new();
        for e in self.pending.values() {
            bytes.extend(line(&Record::Put(e.clone()))?);
        }
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = open_append(&self.path)?;
        self.lines = self.pending.len();
        Ok(())
    }
}

fn line(r: &Record) -> std::io::Result<Vec<u8>> {
    let mut v = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    v.push(b'\n');
    Ok(v)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    log: Arc<Mutex<Log>>,
}

impl Outbox {
    pub(crate) async fn open(state_dir: &Path) -> std::io::Result<Self> {
        let (path, legacy) = (state_dir.join("outbox.log"), state_dir.join("outbox"));
        let log = tokio::task::spawn_blocking(move || {
            let mut pending = read_log(&path);
            let old = read_legacy(&legacy);
            let migrated: Vec<PathBuf> = old.iter().map(|(p, _)| p.clone()).collect();
            for (_, e) in old {
                pending.insert(e.result.lease.clone(), e);
            }
            let mut log = Log {
                file: open_append(&path)?,
                path,
                lines: 0,
                pending,
            };
            log.compact()?;
            // Only once their entries are in the log.
            for p in migrated {
                let _ = std::fs::remove_file(p);
            }
            let _ = std::fs::remove_dir(&legacy);
            Ok::<_, std::io::Error>(log)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Self {
            log: Arc::new(Mutex::new(log)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `e` before its result is sent.
    pub(crate) async fn put(&self, e: &Entry) -> std::io::Result<()> {
        let bytes = line(&Record::Put(e.clone()))?;
        if bytes.len() <= INLINE_BYTES {
            let mut log = self.lock();
            log.append(&bytes)?;
            log.pending.insert(e.result.lease.clone(), e.clone());
            return Ok(());
        }
        let (log, e) = (self.log.clone(), e.clone());
        tokio::task::spawn_blocking(move || {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.append(&bytes)?;
            log.pending.insert(e.result.lease.clone(), e);
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Forgets the entry of `lease` (acknowledged). A crash before the line is written
    /// leaves an entry that is resent and answered with `accepted: false`, which is
    /// harmless.
    pub(crate) fn remove(&self, lease: &str) {
        let mut log = self.lock();
        if log.pending.remove(lease).is_none() {
            return;
        }
        let written = line(&Record::Ack(lease.to_owned())).and_then(|l| log.append(&l));
        let compacted = if log.lines >= COMPACT_AFTER {
            log.compact()
        } else {
            Ok(())
        };
        if let Err(e) = written.and(compacted) {
            tracing::warn!(message = "outbox write failed", error = %e);
        }
    }

    /// Rewrites the log with only the waiting entries, so that a worker that stops leaves
    /// no acknowledged result behind.
    pub(crate) async fn settle(&self) {
        if let Err(e) = self.lock().compact() {
            tracing::warn!(message = "outbox write failed", error = %e);
        }
    }

    /// Whether no result waits for its `result_ack`.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().pending.is_empty()
    }

    /// The entries waiting for their `result_ack`.
    pub(crate) fn all(&self) -> Vec<Entry> {
        self.lock().pending.values().cloned().collect()
    }
}

/// The waiting entries of the log at `path`: puts without a later ack. A torn last line
/// (the process died while writing it) is skipped.
fn read_log(path: &Path) -> HashMap<String, Entry> {
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read(path) else {
        return out;
    };
    for l in text.split(|b| *b == b'\n') {
        match serde_json::from_slice::<Record>(l) {
            Ok(Record::Put(e)) => {
                out.insert(e.result.lease.clone(), e);
            }
            Ok(Record::Ack(lease)) => {
                out.remove(&lease);
            }
            Err(_) => {}
        }
    }
    out
}

/// The entries of the earlier layout, one file each; unreadable or torn files are skipped.
fn read_legacy(dir: &Path) -> Vec<(PathBuf, Entry)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let entry = serde_json::from_slice::<Entry>(&std::fs::read(&p).ok()?).ok()?;
            Some((p, entry))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::messages::ResultStatus;

    fn entry(lease: &str) -> Entry {
        Entry {
            task_id: format!("task_{lease}"),
            attempt: 1,
            result: TaskResult {
                lease: lease.into(),
                status: ResultStatus::Ok,
                output: Some(serde_json::json!({"x": lease})),
                error: None,
                usage: None,
                timings: None,
            },
        }
    }

    /// What was put and not acknowledged is there after a reopen (a restart), a torn last
    /// line is skipped, and entries of the per-file layout are taken over.
    #[tokio::test]
    async fn waiting_entries_survive_a_reopen_and_old_files_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path()).await.unwrap();
        for l in ["a", "b", "c"] {
            o.put(&entry(l)).await.unwrap();
        }
        o.remove("b");
        drop(o);
        let mut f = open_append(&dir.path().join("outbox.log")).unwrap();
        f.write_all(br#"{"put":{"task_id":"t","att"#).unwrap();
        std::fs::create_dir_all(dir.path().join("outbox")).unwrap();
        std::fs::write(
            dir.path().join("outbox/d.json"),
            serde_json::to_vec(&entry("d")).unwrap(),
        )
        .unwrap();
        let o = Outbox::open(dir.path()).await.unwrap();
        let mut leases: Vec<String> = o.all().into_iter().map(|e| e.result.lease).collect();
        leases.sort();
        assert_eq!(leases, ["a", "c", "d"]);
        assert!(!dir.path().join("outbox").exists(), "old layout removed");
        o.put(&entry("e")).await.unwrap();
        for l in ["a", "c", "d", "e"] {
            o.remove(l);
        }
        assert!(o.is_empty());
        drop(o);
        assert!(Outbox::open(dir.path()).await.unwrap().is_empty());
    }

    /// The log is rewritten once it is long, so it does not grow without end.
    #[tokio::test]
    async fn the_log_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path()).await.unwrap();
        o.put(&entry("kept")).await.unwrap();
        for i in 0..COMPACT_AFTER {
            let l = format!("l{i}");
            o.put(&entry(&l)).await.unwrap();
            o.remove(&l);
        }
        let lines = std::fs::read_to_string(dir.path().join("outbox.log"))
            .unwrap()
            .lines()
            .count();
        assert!(lines < COMPACT_AFTER, "{lines} lines");
        drop(o);
        let o = Outbox::open(dir.path()).await.unwrap();
        assert_eq!(o.all().len(), 1);
        assert_eq!(o.all()[0].result.lease, "kept");
    }
}
