//! The SQLite queue store: one file, WAL journal. A task is durable once `enqueue`
//! returns: its transaction has been committed to the WAL, which survives a kill -9 of the
//! process (with `synchronous=NORMAL` a power loss can drop the last transactions; set
//! `sync_full` for that case).
//!
//! rusqlite is blocking, so the connection never runs on the async runtime: every call is a
//! closure executed on one dedicated thread that owns the connection (or, with
//! [`SqliteExecutor::BlockingPool`], on tokio's blocking pool under a mutex), and its answer
//! comes back through a oneshot channel.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::lifecycle::TaskEvent;
use crate::model::*;
use crate::queue::*;
use crate::store::{Dialect, Result, schema_sql};

mod db;
mod outbox;
mod queue_impl;
mod retry;

use db::{Db, add_missing_columns};

/// Where the blocking SQLite calls run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqliteExecutor {
    /// One dedicated thread owns the connection and runs the calls in order. Default.
    #[default]
    Thread,
    /// Each call runs on tokio's blocking pool, the connection behind a mutex.
    BlockingPool,
}

/// Settings of the SQLite store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Attempts and retry backoff.
    pub queue: QueueOptions,
    /// `synchronous=FULL` (survives power loss, slower); NORMAL survives a process crash.
    /// Default: false.
    pub sync_full: bool,
    /// Where the blocking calls run. Default: a dedicated thread.
    pub executor: SqliteExecutor,
}

/// What a call hands back once its writes are durable (or failed to be): the answer to its
/// caller and the events it wrote.
type Deliver = Box<dyn FnOnce(Option<&QueueError>) + Send>;
type Job = Box<dyn FnOnce(&Db) -> Deliver + Send>;

/// Calls queued for the writer beyond the first are committed together, up to this many.
const MAX_BATCH: usize = 64;
/// The writer asks the checkpointer to copy the WAL into the database file after this many
/// commits (each commit appends a few pages).
const CHECKPOINT_EVERY: u64 = 32;
/// The writer checkpoints by itself only when the WAL has grown past this many pages (the
/// checkpointer fell behind); SQLite's own default is 1000.
const WRITER_CHECKPOINT_PAGES: u32 = 10_000;

/// Page cache of each connection, KiB (SQLite's default is 2,000): the reads scan the task
/// table, and a queue of tens of thousands of tasks should not go to the file for each page.
const CACHE_KIB: i64 = 32_768;

/// What the writer thread shares with the queue.
struct Writer {
    /// Calls committed as part of a group.
    grouped: Arc<AtomicU64>,
    /// Wakes the checkpointer thread; `None` leaves checkpoints to SQLite (in the writer).
    checkpoint: Option<std::sync::mpsc::SyncSender<()>>,
}

/// Starts the thread that checkpoints the WAL of `path` when asked, on a connection of its
/// own: PASSIVE checkpoints never block the writer, so the copy into the database file (and
/// its sync) happens beside the writer instead of inside one caller's commit.
fn start_checkpointer(path: &Path) -> Result<std::sync::mpsc::SyncSender<()>> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("kiln-sqlite-ckpt".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(message = "SQLite checkpoint failed", error = %e);
                }
            }
        })
        .map_err(|e| QueueError::Unavailable(format!("start the SQLite checkpointer: {e}")))?;
    Ok(tx)
}

enum Exec {
    Thread(std::sync::mpsc::Sender<Job>),
    Pool(Arc<Mutex<Db>>),
}

impl Exec {
    fn start(db: Db, kind: SqliteExecutor, name: &str, writer: Option<Writer>) -> Result<Self> {
        Ok(match kind {
            SqliteExecutor::Thread => {
                let (tx, rx) = std::sync::mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || {
                        if let Some(w) = writer {
                            write_loop(&db, &rx, &w)
                        } else {
                            while let Ok(job) = rx.recv() {
                                job(&db)(None);
                            }
                        }
                    })
                    .map_err(|e| QueueError::Unavailable(format!("start {name}: {e}")))?;
                Exec::Thread(tx)
            }
            SqliteExecutor::BlockingPool => Exec::Pool(Arc::new(Mutex::new(db))),
        })
    }

    fn submit(&self, job: Job) -> Result<()> {
        match self {
            Exec::Thread(jobs) => jobs
                .send(job)
                .map_err(|_| QueueError::Unavailable("the SQLite thread stopped".into())),
            Exec::Pool(db) => {
                let db = db.clone();
                tokio::task::spawn_blocking(move || {
                    job(&db.lock().unwrap_or_else(|p| p.into_inner()))(None)
                });
                Ok(())
            }
        }
    }
}

/// The writer: takes every call waiting in the channel and runs them in one transaction,
/// each in its own savepoint, then commits once and answers them all. One call alone runs
/// as its own transaction. Answers go out only after the commit, so an accepted call is on
/// disk (WAL) before its caller hears of it.
fn write_loop(db: &Db, rx: &std::sync::mpsc::Receiver<Job>, w: &Writer) {
    let mut commits = 0u64;
    while let Ok(first) = rx.recv() {
        commits += 1;
        if let Some(c) = &w.checkpoint
            && commits.is_multiple_of(CHECKPOINT_EVERY)
        {
            // At most one waits; the checkpointer catches up with all commits at once.
            let _ = c.try_send(());
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        // One call alone, or a group that cannot begin: each call is its own transaction.
        if batch.len() == 1
            || db
                .conn
                .prepare_cached("BEGIN IMMEDIATE")
                .and_then(|mut s| s.execute([]))
                .is_err()
        {
            for job in batch {
                job(db)(None);
            }
            continue;
        }
        let delivers: Vec<Deliver> = batch.into_iter().map(|job| job(db)).collect();
        let committed = db
            .conn
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.execute([]))
            .map_err(QueueError::from);
        if committed.is_err() {
            let _ = db.conn.execute_batch("ROLLBACK");
        } else {
            w.grouped
                .fetch_add(delivers.len() as u64, Ordering::Relaxed);
        }
        let err = committed.err();
        for d in delivers {
            d(err.as_ref());
        }
    }
}

/// The embedded queue store. Implements [`Queue`].
///
/// Writes run on one connection, on a dedicated thread that commits waiting calls
/// together; reads of a file database run on a second connection of their own (WAL lets
/// them see every committed write without waiting for the writer).
pub struct SqliteQueue {
    exec: Exec,
    /// The read connection; `None` for an in-memory database (one connection only).
    reader: Option<Exec>,
    /// Calls committed as part of a group (more than one call per commit).
    grouped: Arc<AtomicU64>,
    /// Committed events not yet taken by the broker.
    events: Arc<Mutex<Vec<TaskEvent>>>,
}

impl std::fmt::Debug for SqliteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteQueue").finish_non_exhaustive()
    }
}

impl SqliteQueue {
    /// Opens (or creates) the queue file at `path`.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<Self> {
        let conn = Connection::open(path)?;
        let checkpoint = match opts.executor {
            SqliteExecutor::Thread => {
                conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
                Some(start_checkpointer(path)?)
            }
            SqliteExecutor::BlockingPool => None,
        };
        let mut q = Self::init(conn, opts.clone(), checkpoint)?;
        let reader = Connection::open(path)?;
        reader.pragma_update(None, "busy_timeout", 5000)?;
        reader.pragma_update(None, "query_only", true)?;
        reader.pragma_update(None, "cache_size", -CACHE_KIB)?;
        reader.set_prepared_statement_cache_capacity(64);
        reader.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        q.reader = Some(Exec::start(
            Db {
                conn: reader,
                opts: opts.queue,
                events: RefCell::new(Vec::new()),
            },
            opts.executor,
            "kiln-sqlite-read",
            None,
        )?);
        Ok(q)
    }

    /// An in-memory queue (tests), retries without backoff.
    pub fn in_memory(default_max_attempts: u32) -> Result<Self> {
        Self::init(
            Connection::open_in_memory()?,
            SqliteOptions {
                queue: QueueOptions {
                    default_max_attempts,
                    retry_base_ms: 0,
                    ..QueueOptions::default()
                },
                ..SqliteOptions::default()
            },
            None,
        )
    }

    fn init(
        conn: Connection,
        opts: SqliteOptions,
        checkpoint: Option<std::sync::mpsc::SyncSender<()>>,
    ) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(
            None,
            "synchronous",
            if opts.sync_full { "FULL" } else { "NORMAL" },
        )?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        conn.set_prepared_statement_cache_capacity(128);
        // The bundled SQLite has STAT4, which re-prepares a cached statement whenever a bound
        // value changes in case the plan should change; the queue's plans never should.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        conn.execute_batch(&schema_sql(Dialect::Sqlite, ""))?;
        add_missing_columns(&conn)?;
        let db = Db {
            conn,
            opts: QueueOptions {
                default_max_attempts: opts.queue.default_max_attempts.max(1),
                ..opts.queue
            },
            events: RefCell::new(Vec::new()),
        };
        let grouped = Arc::new(AtomicU64::new(0));
        Ok(Self {
            exec: Exec::start(
                db,
                opts.executor,
                "kiln-sqlite",
                Some(Writer {
                    grouped: grouped.clone(),
                    checkpoint,
                }),
            )?,
            reader: None,
            grouped,
            events: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// How many calls since opening were committed together with others (group commit);
    /// the rest committed alone.
    pub fn grouped_calls(&self) -> u64 {
        self.grouped.load(Ordering::Relaxed)
    }

    /// Runs `f` against the write connection off the async runtime. Its answer, and the
    /// events it wrote, are handed out once its transaction has committed.
    fn call<T, F>(&self, f: F) -> QueueFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T> + Send + 'static,
    {
        self.run_on(&self.exec, f)
    }

    /// Runs the read-only `f` on the read connection (the write connection when there is
    /// none).
    fn read<T, F>(&self, f: F) -> QueueFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T> + Send + 'static,
    {
        self.run_on(self.reader.as_ref().unwrap_or(&self.exec), f)
    }

    fn run_on<T, F>(&self, exec: &Exec, f: F) -> QueueFuture<'static, T>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let events = self.events.clone();
        let job: Job = Box::new(move |db: &Db| {
            db.events.borrow_mut().clear();
            let r = f(db);
            let written = std::mem::take(&mut *db.events.borrow_mut());
            Box::new(move |commit: Option<&QueueError>| {
                let r = match (r, commit) {
                    (Ok(_), Some(e)) => Err(QueueError::Unavailable(format!("commit: {e}"))),
                    (r, _) => r,
                };
                if r.is_ok() && !written.is_empty() {
                    events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(written);
                }
                let _ = tx.send(r);
            })
        });
        let sent = exec.submit(job);
        Box::pin(async move {
            sent?;
            rx.await
                .map_err(|_| QueueError::Unavailable("the SQLite call was dropped".into()))?
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report
mod tests {
    use super::db::{Cached, begin};
    use super::*;
    use kiln_protocol::TaskState;
    use serde_json::json;

    fn count(q: &SqliteQueue) -> QueueFuture<'static, i64> {
        q.read(|db| {
            Ok(db
                .conn
                .row("SELECT COUNT(*) FROM timings", [], |r| r.get(0))?)
        })
    }

    /// Calls that queue up behind a slow one are committed together; one of them failing
    /// after it wrote rolls back its own writes only, and every caller hears of its own
    /// outcome.
    #[tokio::test]
    async fn a_batch_commits_together_and_a_failed_call_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(&dir.path().join("q.sqlite"), SqliteOptions::default()).unwrap();
        let (started, running) = std::sync::mpsc::channel();
        let slow = q.call(move |_| {
            let _ = started.send(());
            std::thread::sleep(std::time::Duration::from_millis(100));
            Ok(())
        });
        running.recv().unwrap();
        let insert = |id: &'static str, fail: bool| {
            q.call(move |db| {
                let tx = begin(&db.conn)?;
                tx.exec(
                    "INSERT INTO timings (task_id, data) VALUES (?1, '{}')",
                    [id],
                )?;
                if fail {
                    return Err(QueueError::Invalid("refused after writing".into()));
                }
                tx.commit()
            })
        };
        // Queued while the slow call runs: the writer takes them as one batch.
        let (a, b, c) = (insert("a", false), insert("b", true), insert("c", false));
        slow.await.unwrap();
        assert!(a.await.is_ok());
        assert!(matches!(b.await, Err(QueueError::Invalid(_))));
        assert!(c.await.is_ok());
        assert_eq!(
            q.grouped.load(Ordering::Relaxed),
            3,
            "the three calls were one group"
        );
        assert_eq!(count(&q).await.unwrap(), 2);
        drop(q);
        // And it is on disk.
        let q = SqliteQueue::open(&dir.path().join("q.sqlite"), SqliteOptions::default()).unwrap();
        assert_eq!(count(&q).await.unwrap(), 2);
    }

    /// A write is visible to the read connection as soon as its caller has the answer.
    #[tokio::test]
    async fn reads_see_every_answered_write() {
        let dir = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(&dir.path().join("q.sqlite"), SqliteOptions::default()).unwrap();
        for i in 0..50 {
            let nt = NewTask {
                task_type: "t".into(),
                input: json!({ "i": i }),
                ..Default::default()
            };
            let (t, _) = q.enqueue(nt, 1).await.unwrap();
            assert_eq!(
                q.get(&t.id).await.unwrap().unwrap().input,
                json!({ "i": i })
            );
        }
        assert_eq!(q.stats().await.unwrap().count(TaskState::Queued), 50);
    }

    /// Commits reach the database file through the checkpointer although the writer no
    /// longer checkpoints by itself below 10,000 WAL pages: without it the file would hold
    /// only the schema after 600 commits of 2 KB inputs.
    #[tokio::test]
    async fn the_checkpointer_copies_the_wal_into_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let q = SqliteQueue::open(&path, SqliteOptions::default()).unwrap();
        for i in 0..600 {
            let nt = NewTask {
                task_type: "t".into(),
                input: json!({ "i": i, "pad": "x".repeat(2000) }),
                ..Default::default()
            };
            q.enqueue(nt, 1).await.unwrap();
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let size = || std::fs::metadata(&path).unwrap().len();
        while size() < 1 << 20 && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(size() >= 1 << 20, "database file is {} bytes", size());
        assert_eq!(q.stats().await.unwrap().count(TaskState::Queued), 600);
    }
}
