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

use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Value, json};

use crate::model::*;
use crate::queue::*;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    request_id TEXT UNIQUE,
    task_type TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    input TEXT NOT NULL,
    metadata TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    lease TEXT UNIQUE,
    worker_id TEXT,
    lease_expires_at INTEGER,
    deadline INTEGER,
    not_before INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    error TEXT,
    progress TEXT,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    model TEXT,
    labels TEXT
);
CREATE INDEX IF NOT EXISTS tasks_ready ON tasks (task_type, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS tasks_running ON tasks (lease_expires_at) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_worker ON tasks (worker_id) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS attempts (
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    lease TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,
    error TEXT,
    PRIMARY KEY (task_id, attempt)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task ON events (task_id, id);
CREATE TABLE IF NOT EXISTS timings (
    task_id TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS avoid (
    task_id TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    until INTEGER NOT NULL,
    PRIMARY KEY (task_id, worker_id)
);
CREATE TABLE IF NOT EXISTS task_types (
    task_type TEXT PRIMARY KEY,
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
";

/// Columns added after the first release: `ALTER TABLE ADD COLUMN` on databases without them.
/// `model`: the model a worker must list (NULL: any); `labels`: the labels a worker must
/// have, a sorted JSON array of strings (NULL: none).
/// `assign_failures`: assignments of the current attempt that failed on the transport in a
/// row.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("model", "TEXT"),
    ("labels", "TEXT"),
    ("assign_failures", "INTEGER NOT NULL DEFAULT 0"),
];

const COLS: &str = "id, request_id, task_type, state, priority, input, metadata, attempt, max_attempts, \
    lease, worker_id, lease_expires_at, deadline, cancel_requested, output, error, progress, \
    dead_lettered, created_at, started_at, completed_at, seq, model, labels";

type Result<T> = std::result::Result<T, QueueError>;

/// One call's transaction: a savepoint, so that it is a transaction of its own when run
/// alone and nests inside the writer's group commit when several calls are batched. Dropped
/// without [`Tx::commit`], it rolls back only this call's writes.
struct Tx<'c> {
    conn: &'c Connection,
    open: bool,
}

fn begin(conn: &Connection) -> Result<Tx<'_>> {
    conn.prepare_cached("SAVEPOINT kiln_call")?.execute([])?;
    Ok(Tx { conn, open: true })
}

impl Tx<'_> {
    fn commit(mut self) -> Result<()> {
        self.open = false;
        self.conn.prepare_cached("RELEASE kiln_call")?.execute([])?;
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self
                .conn
                .execute_batch("ROLLBACK TO kiln_call; RELEASE kiln_call");
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// Statements through the connection's prepared-statement cache: the queue runs the same
/// few dozen statements over and over, and parsing them is a large share of a call.
trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn parse_json(s: Option<String>) -> Result<Option<Value>> {
    s.map(|s| serde_json::from_str(&s).map_err(|e| QueueError::Corrupt(e.to_string())))
        .transpose()
}

/// A task row with its JSON columns still as text.
struct RawTask {
    task: Task,
    input: String,
    metadata: Option<String>,
    output: Option<String>,
    error: Option<String>,
    progress: Option<String>,
    labels: Option<String>,
}

fn row_to_task(r: &Row<'_>) -> rusqlite::Result<RawTask> {
    let state: String = r.get(3)?;
    let task = Task {
        id: r.get(0)?,
        request_id: r.get(1)?,
        task_type: r.get(2)?,
        state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
        priority: r.get(4)?,
        input: Value::Null,
        metadata: None,
        attempt: r.get(7)?,
        max_attempts: r.get(8)?,
        lease: r.get(9)?,
        worker_id: r.get(10)?,
        lease_expires_at: r.get(11)?,
        deadline: r.get(12)?,
        cancel_requested: r.get::<_, i64>(13)? != 0,
        output: None,
        error: None,
        progress: None,
        dead_lettered: r.get::<_, i64>(17)? != 0,
        created_at: r.get(18)?,
        started_at: r.get(19)?,
        completed_at: r.get(20)?,
        seq: r.get(21)?,
        model: r.get(22)?,
        labels: Vec::new(),
    };
    Ok(RawTask {
        task,
        input: r.get(5)?,
        metadata: r.get(6)?,
        output: r.get(14)?,
        error: r.get(15)?,
        progress: r.get(16)?,
        labels: r.get(23)?,
    })
}

fn finish_task(raw: RawTask) -> Result<Task> {
    let mut t = raw.task;
    t.input = serde_json::from_str(&raw.input).map_err(|e| QueueError::Corrupt(e.to_string()))?;
    t.metadata = parse_json(raw.metadata)?;
    t.output = parse_json(raw.output)?;
    t.progress = parse_json(raw.progress)?;
    t.labels = raw
        .labels
        .map(|l| serde_json::from_str(&l).map_err(|e| QueueError::Corrupt(e.to_string())))
        .transpose()?
        .unwrap_or_default();
    t.error = raw
        .error
        .map(|e| {
            serde_json::from_str::<TaskError>(&e).map_err(|e| QueueError::Corrupt(e.to_string()))
        })
        .transpose()?;
    Ok(t)
}

/// Brings a database made by an earlier release up to the current columns.
fn add_missing_columns(c: &Connection) -> Result<()> {
    let have: Vec<String> = {
        let mut stmt = c.prepare("SELECT name FROM pragma_table_info('tasks')")?;
        stmt.query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (name, ty) in ADDED_COLUMNS {
        if !have.iter().any(|h| h == name) {
            c.execute_batch(&format!("ALTER TABLE tasks ADD COLUMN {name} {ty}"))?;
        }
    }
    Ok(())
}

/// The stored form of a label list: a JSON array, NULL when empty.
fn labels_column(labels: &[String]) -> Option<String> {
    (!labels.is_empty()).then(|| json!(labels).to_string())
}

fn get_task(c: &Connection, id: &str) -> Result<Option<Task>> {
    let sql = format!("SELECT {COLS} FROM tasks WHERE id = ?1");
    c.row(&sql, [id], row_to_task)
        .optional()?
        .map(finish_task)
        .transpose()
}

fn task_by_lease(c: &Connection, lease: &str) -> Result<Option<Task>> {
    let sql = format!("SELECT {COLS} FROM tasks WHERE lease = ?1");
    c.row(&sql, [lease], row_to_task)
        .optional()?
        .map(finish_task)
        .transpose()
}

/// The task running under lease `?1`, held by worker `?2` (any worker when NULL).
const RUNNING_LEASE: &str = "SELECT id FROM tasks WHERE lease = ?1 AND state = 'running' \
    AND (?2 IS NULL OR worker_id = ?2)";

/// Whether `holder` (any worker when `None`) holds the lease `t` runs under.
fn holds(t: &Task, holder: Option<&str>) -> bool {
    holder.is_none_or(|w| t.worker_id.as_deref() == Some(w))
}

fn merge_timings_in(
    c: &Connection,
    id: &str,
    timings: &serde_json::Map<String, Value>,
) -> Result<()> {
    let raw: Option<String> = c
        .row("SELECT data FROM timings WHERE task_id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    let mut all = match parse_json(raw)? {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    for (k, v) in timings {
        all.insert(k.clone(), v.clone());
    }
    c.exec(
        "INSERT INTO timings (task_id, data) VALUES (?1, ?2)
         ON CONFLICT (task_id) DO UPDATE SET data = excluded.data",
        params![id, Value::Object(all).to_string()],
    )?;
    Ok(())
}

fn status_data(t: &Task) -> Value {
    json!({"status": t.state.as_str(), "attempt": t.attempt, "worker_id": t.worker_id})
}

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

/// The connection and what a call collected; lives on the executing thread.
struct Db {
    conn: Connection,
    opts: QueueOptions,
    /// Events written by the running call, published when it succeeds.
    events: RefCell<Vec<TaskEvent>>,
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
        conn.set_prepared_statement_cache_capacity(128);
        // The bundled SQLite has STAT4, which re-prepares a cached statement whenever a bound
        // value changes in case the plan should change; the queue's plans never should.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        conn.execute_batch(SCHEMA)?;
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

impl Db {
    fn event(
        &self,
        c: &Connection,
        task_id: &str,
        kind: &str,
        data: Value,
        now: u64,
    ) -> Result<()> {
        c.exec(
            "INSERT INTO events (task_id, kind, data, ts) VALUES (?1, ?2, ?3, ?4)",
            params![task_id, kind, data.to_string(), now],
        )?;
        let id = c.last_insert_rowid();
        self.events.borrow_mut().push(TaskEvent {
            id,
            task_id: task_id.to_owned(),
            kind: kind.to_owned(),
            data,
            ts: now,
        });
        Ok(())
    }

    fn terminal_event(&self, c: &Connection, t: &Task, now: u64) -> Result<()> {
        self.event(c, &t.id, "status", status_data(t), now)?;
        self.event(
            c,
            &t.id,
            "completed",
            json!({"status": t.state.as_str(), "output": t.output, "error": t.error}),
            now,
        )
    }

    /// Stores a task, or returns the task already stored under its `request_id` (with
    /// `false`). A `request_id` reused for a different type, input or routing is a conflict.
    fn enqueue(&self, mut t: NewTask, now: u64) -> Result<(Task, bool)> {
        if t.task_type.trim().is_empty() {
            return Err(QueueError::Invalid("task_type is empty".into()));
        }
        normalize_routing(&mut t)?;
        let tx = begin(&self.conn)?;
        if let Some(rid) = &t.request_id {
            let existing: Option<String> = tx
                .row("SELECT id FROM tasks WHERE request_id = ?1", [rid], |r| {
                    r.get(0)
                })
                .optional()?;
            if let Some(id) = existing {
                let task = get_task(&tx, &id)?
                    .ok_or_else(|| QueueError::Corrupt("task vanished".into()))?;
                if !same_request(&task, &t) {
                    return Err(QueueError::Conflict(rid.clone()));
                }
                return Ok((task, false));
            }
        }
        let id = new_id("task");
        tx.exec(
            "INSERT INTO tasks (id, request_id, task_type, state, priority, input, metadata, max_attempts, deadline, created_at, model, labels)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                id,
                t.request_id,
                t.task_type,
                t.priority,
                t.input.to_string(),
                t.metadata.as_ref().map(Value::to_string),
                t.max_attempts.unwrap_or(self.opts.default_max_attempts).max(1),
                t.deadline,
                now,
                t.model,
                labels_column(&t.labels)
            ],
        )?;
        let task = get_task(&tx, &id)?.ok_or_else(|| QueueError::Corrupt("insert lost".into()))?;
        self.event(&tx, &id, "status", status_data(&task), now)?;
        tx.commit()?;
        Ok((task, true))
    }

    /// Leases up to `n` queued tasks that `caps` fit to `worker_id`, highest priority
    /// then oldest first, each with a new lease id, until `lease_until`. The ready index
    /// (type, priority, seq) orders the scan; model and labels are checked per row, the
    /// worker's lists passed as JSON arrays.
    fn reserve(
        &self,
        worker_id: &str,
        caps: &Capabilities,
        n: usize,
        lease_until: u64,
        now: u64,
    ) -> Result<Vec<Task>> {
        let task_types = &caps.task_types;
        if n == 0 || task_types.is_empty() {
            return Ok(Vec::new());
        }
        let tx = begin(&self.conn)?;
        let marks = vec!["?"; task_types.len()].join(",");
        let sql = format!(
            "SELECT id FROM tasks WHERE state = 'queued' AND not_before <= ? AND task_type IN ({marks})
             AND (model IS NULL OR model IN (SELECT value FROM json_each(?)))
             AND (labels IS NULL OR NOT EXISTS (SELECT 1 FROM json_each(tasks.labels) AS need
                  WHERE need.value NOT IN (SELECT value FROM json_each(?))))
             AND NOT EXISTS (SELECT 1 FROM avoid WHERE avoid.task_id = tasks.id
                  AND avoid.worker_id = ? AND avoid.until > ?)
             ORDER BY priority DESC, seq LIMIT ?"
        );
        let ids: Vec<String> = {
            let mut stmt = tx.prepare_cached(&sql)?;
            let mut args: Vec<rusqlite::types::Value> = vec![(now as i64).into()];
            args.extend(task_types.iter().map(|t| t.clone().into()));
            args.push(json!(caps.models).to_string().into());
            args.push(json!(caps.labels).to_string().into());
            args.push(worker_id.to_owned().into());
            args.push((now as i64).into());
            args.push((n as i64).into());
            stmt.query_map(rusqlite::params_from_iter(args), |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let lease = new_id("lease");
            tx.exec(
                "UPDATE tasks SET state = 'running', attempt = attempt + 1, lease = ?2, worker_id = ?3,
                 lease_expires_at = ?4, started_at = COALESCE(started_at, ?5), progress = NULL WHERE id = ?1",
                params![id, lease, worker_id, lease_until, now],
            )?;
            let task =
                get_task(&tx, &id)?.ok_or_else(|| QueueError::Corrupt("reserve lost".into()))?;
            tx.exec(
                "INSERT OR REPLACE INTO attempts (task_id, attempt, worker_id, lease, started_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, task.attempt, worker_id, lease, now],
            )?;
            self.event(&tx, &id, "status", status_data(&task), now)?;
            out.push(task);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Extends every lease `worker_id` holds to `until`. Returns how many.
    fn renew(&self, worker_id: &str, until: u64) -> Result<usize> {
        Ok(self.conn.exec(
            "UPDATE tasks SET lease_expires_at = ?2 WHERE state = 'running' AND worker_id = ?1 AND lease_expires_at < ?2",
            params![worker_id, until],
        )?)
    }

    /// Counts a failed assignment of a running lease, or resets the count.
    fn record_assignment(&self, lease: &str, delivered: bool) -> Result<Option<u32>> {
        Ok(self
            .conn
            .row(
                "UPDATE tasks SET assign_failures = CASE WHEN ?2 THEN 0 ELSE assign_failures + 1 END
                 WHERE lease = ?1 AND state = 'running' RETURNING assign_failures",
                params![lease, delivered],
                |r| r.get::<_, u32>(0),
            )
            .optional()?)
    }

    /// The leases `worker_id` holds: `(lease, task_id)`.
    fn leases_of(&self, worker_id: &str) -> Result<Vec<(String, String)>> {
        let c = &self.conn;
        let mut stmt = c.prepare_cached(
            "SELECT lease, id FROM tasks WHERE state = 'running' AND worker_id = ?1",
        )?;
        Ok(stmt
            .query_map([worker_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Records progress of a running lease. `None` when the lease is not current (or not
    /// `holder`'s).
    fn progress(
        &self,
        lease: &str,
        holder: Option<&str>,
        progress: Value,
        now: u64,
    ) -> Result<Option<String>> {
        let c = &self.conn;
        let id: Option<String> = c
            .row(RUNNING_LEASE, params![lease, holder], |r| r.get(0))
            .optional()?;
        if let Some(id) = &id {
            c.exec(
                "UPDATE tasks SET progress = ?2 WHERE id = ?1",
                params![id, progress.to_string()],
            )?;
            self.event(c, id, "progress", progress, now)?;
        }
        Ok(id)
    }

    /// Compare-and-set on the lease: the ending counts only if `lease` is the task's current
    /// lease and the task is running.
    fn end_attempt(
        &self,
        lease: &str,
        holder: Option<&str>,
        ending: Ending,
        now: u64,
    ) -> Result<CompleteOutcome> {
        let tx = begin(&self.conn)?;
        let Some(task) = task_by_lease(&tx, lease)? else {
            let known = tx
                .row(
                    "SELECT task_id FROM attempts WHERE lease = ?1",
                    [lease],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
                .is_some();
            return Ok(if known {
                CompleteOutcome::stale_lease()
            } else {
                CompleteOutcome::unknown_lease()
            });
        };
        if !holds(&task, holder) {
            return Ok(CompleteOutcome::not_holder());
        }
        if task.state != TaskState::Running {
            return Ok(CompleteOutcome::not_running(task));
        }
        let decision = ending.decide(&task, &self.opts, now);
        let err_json = decision.error.as_ref().map(|e| json!(e).to_string());
        tx.exec(
            "UPDATE attempts SET ended_at = ?3, error = ?4 WHERE task_id = ?1 AND attempt = ?2",
            params![
                task.id,
                task.attempt,
                now,
                decision
                    .error
                    .as_ref()
                    .map(|e| format!("{}: {}", e.code, e.message))
            ],
        )?;
        if let Some(not_before) = decision.requeue_at {
            tx.exec(
                "UPDATE tasks SET state = 'queued', lease = NULL, worker_id = NULL, lease_expires_at = NULL,
                 not_before = ?2, error = ?3 WHERE id = ?1",
                params![task.id, not_before, err_json],
            )?;
        } else {
            tx.exec(
                "UPDATE tasks SET state = ?2, lease = NULL, lease_expires_at = NULL, output = ?3, error = ?4,
                 dead_lettered = ?5, completed_at = ?6 WHERE id = ?1",
                params![task.id, decision.state.as_str(), decision.output.as_ref().map(Value::to_string), err_json, decision.dead as i64, now],
            )?;
        }
        let after =
            get_task(&tx, &task.id)?.ok_or_else(|| QueueError::Corrupt("complete lost".into()))?;
        if after.state.is_terminal() {
            self.terminal_event(&tx, &after, now)?;
        } else {
            self.event(&tx, &after.id, "status", status_data(&after), now)?;
        }
        tx.commit()?;
        Ok(CompleteOutcome {
            accepted: true,
            reason: None,
            task: Some(after),
        })
    }

    /// Gives a lease back: the task is queued again at once, and the attempt does not count
    /// (`release`, retryable `reject`, a worker restarting). With `avoid_until` (a retryable
    /// reject), the lease's worker is not offered the task again before then.
    fn give_back(
        &self,
        lease: &str,
        holder: Option<&str>,
        why: &str,
        avoid_until: Option<u64>,
        now: u64,
    ) -> Result<Option<Task>> {
        let tx = begin(&self.conn)?;
        let Some(task) = task_by_lease(&tx, lease)?.filter(|t| holds(t, holder)) else {
            return Ok(None);
        };
        if let Some(until) = avoid_until {
            tx.exec("DELETE FROM avoid WHERE until <= ?1", params![now])?;
            if let Some(w) = &task.worker_id {
                tx.exec(
                    "INSERT OR REPLACE INTO avoid (task_id, worker_id, until) VALUES (?1, ?2, ?3)",
                    params![task.id, w, until],
                )?;
            }
        }
        let after = self.requeue_locked(&tx, &task, why, false, now)?;
        tx.commit()?;
        Ok(Some(after))
    }

    fn note_task_types(&self, task_types: &[String], now: u64) -> Result<()> {
        let tx = begin(&self.conn)?;
        for t in task_types {
            tx.exec(
                "INSERT INTO task_types (task_type, last_seen) VALUES (?1, ?2)
                 ON CONFLICT (task_type) DO UPDATE SET last_seen = MAX(last_seen, ?2)",
                params![t, now],
            )?;
        }
        tx.commit()
    }

    /// Puts a running task back in the queue (or ends it: canceled when a cancel was
    /// requested, failed when attempts are spent and `counted`).
    fn requeue_locked(
        &self,
        tx: &Connection,
        task: &Task,
        why: &str,
        counted: bool,
        now: u64,
    ) -> Result<Task> {
        tx.exec(
            "UPDATE attempts SET ended_at = ?3, error = ?4 WHERE task_id = ?1 AND attempt = ?2",
            params![task.id, task.attempt, now, why],
        )?;
        if task.cancel_requested {
            tx.exec(
                "UPDATE tasks SET state = 'canceled', lease = NULL, lease_expires_at = NULL, completed_at = ?2 WHERE id = ?1",
                params![task.id, now],
            )?;
        } else if counted && task.attempt >= task.max_attempts {
            let err = json!(TaskError {
                code: "lease_expired".into(),
                message: why.into(),
                retryable: true
            })
            .to_string();
            tx.exec(
                "UPDATE tasks SET state = 'failed', lease = NULL, lease_expires_at = NULL, error = ?2,
                 dead_lettered = 1, completed_at = ?3 WHERE id = ?1",
                params![task.id, err, now],
            )?;
        } else {
            let back = if counted { 0 } else { 1 };
            tx.exec(
                "UPDATE tasks SET state = 'queued', attempt = attempt - ?2, lease = NULL, worker_id = NULL,
                 lease_expires_at = NULL, not_before = 0 WHERE id = ?1",
                params![task.id, back],
            )?;
        }
        let after =
            get_task(tx, &task.id)?.ok_or_else(|| QueueError::Corrupt("requeue lost".into()))?;
        if after.state.is_terminal() {
            self.terminal_event(tx, &after, now)?;
        } else {
            self.event(tx, &after.id, "status", status_data(&after), now)?;
        }
        Ok(after)
    }

    /// Releases the leases of `worker_id` not in `keep` (its process restarted): the tasks
    /// are queued again at once, and the lost attempts count (dead-lettered when none
    /// remain). Kept leases stay as they are.
    fn release_worker(&self, worker_id: &str, keep: &[String], now: u64) -> Result<Vec<Task>> {
        let tx = begin(&self.conn)?;
        let sql = format!("SELECT {COLS} FROM tasks WHERE state = 'running' AND worker_id = ?1");
        let tasks: Vec<Task> = {
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([worker_id], row_to_task)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(finish_task).collect::<Result<_>>()?
        };
        let mut out = Vec::new();
        for t in tasks {
            if t.lease.as_ref().is_some_and(|l| keep.contains(l)) {
                continue;
            }
            out.push(self.requeue_locked(&tx, &t, "worker restarted", true, now)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Handles lapsed leases (queued again, or ended) and passed deadlines (expired).
    /// Returns tasks that changed, and the `(worker, lease)` pairs of expired running tasks
    /// whose workers should be told to stop.
    fn sweep(&self, now: u64) -> Result<Sweep> {
        let tx = begin(&self.conn)?;
        let sql =
            format!("SELECT {COLS} FROM tasks WHERE state = 'running' AND lease_expires_at < ?1");
        let lapsed: Vec<Task> = {
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([now], row_to_task)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(finish_task).collect::<Result<_>>()?
        };
        let mut changed = Vec::new();
        for t in lapsed {
            changed.push(self.requeue_locked(&tx, &t, "lease expired", true, now)?);
        }
        let sql = format!(
            "SELECT {COLS} FROM tasks WHERE state IN ('queued', 'running') AND deadline IS NOT NULL AND deadline < ?1"
        );
        let expired: Vec<Task> = {
            let mut stmt = tx.prepare_cached(&sql)?;
            let rows = stmt
                .query_map([now], row_to_task)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(finish_task).collect::<Result<_>>()?
        };
        let mut stop = Vec::new();
        for t in expired {
            if let (Some(w), Some(l)) = (&t.worker_id, &t.lease)
                && t.state == TaskState::Running
            {
                stop.push((w.clone(), l.clone()));
            }
            tx.exec(
                "UPDATE tasks SET state = 'expired', lease = NULL, lease_expires_at = NULL, completed_at = ?2 WHERE id = ?1",
                params![t.id, now],
            )?;
            let after =
                get_task(&tx, &t.id)?.ok_or_else(|| QueueError::Corrupt("expire lost".into()))?;
            self.terminal_event(&tx, &after, now)?;
            changed.push(after);
        }
        tx.commit()?;
        Ok(Sweep { changed, stop })
    }

    /// Cancels a task: queued ones at once; running ones are marked and their worker must
    /// be told.
    fn cancel(&self, id: &str, now: u64) -> Result<CancelOutcome> {
        let tx = begin(&self.conn)?;
        let Some(task) = get_task(&tx, id)? else {
            return Ok(CancelOutcome::NotFound);
        };
        let out = match task.state {
            TaskState::Queued => {
                tx.exec(
                    "UPDATE tasks SET state = 'canceled', completed_at = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
                let after =
                    get_task(&tx, id)?.ok_or_else(|| QueueError::Corrupt("cancel lost".into()))?;
                self.terminal_event(&tx, &after, now)?;
                CancelOutcome::Canceled(after)
            }
            TaskState::Running => {
                tx.exec("UPDATE tasks SET cancel_requested = 1 WHERE id = ?1", [id])?;
                let after =
                    get_task(&tx, id)?.ok_or_else(|| QueueError::Corrupt("cancel lost".into()))?;
                self.event(
                    &tx,
                    id,
                    "status",
                    json!({"status": "running", "cancel_requested": true}),
                    now,
                )?;
                match (after.worker_id.clone(), after.lease.clone()) {
                    (Some(worker_id), Some(lease)) => CancelOutcome::SignalWorker {
                        task: after,
                        worker_id,
                        lease,
                    },
                    _ => CancelOutcome::AlreadyTerminal(after),
                }
            }
            _ => CancelOutcome::AlreadyTerminal(task),
        };
        tx.commit()?;
        Ok(out)
    }

    /// A task by id.
    fn get(&self, id: &str) -> Result<Option<Task>> {
        get_task(&self.conn, id)
    }

    /// The attempts of a task, in order.
    fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>> {
        let c = &self.conn;
        let mut stmt = c.prepare_cached(
            "SELECT attempt, worker_id, lease, started_at, ended_at, error FROM attempts WHERE task_id = ?1 ORDER BY attempt",
        )?;
        Ok(stmt
            .query_map([id], |r| {
                Ok(AttemptRecord {
                    attempt: r.get(0)?,
                    worker_id: r.get(1)?,
                    lease: r.get(2)?,
                    started_at: r.get(3)?,
                    ended_at: r.get(4)?,
                    error: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    fn timings(&self, id: &str) -> Result<Option<Value>> {
        let raw: Option<String> = self
            .conn
            .row("SELECT data FROM timings WHERE task_id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        parse_json(raw)
    }

    fn merge_timings(&self, id: &str, timings: &serde_json::Map<String, Value>) -> Result<()> {
        let tx = begin(&self.conn)?;
        merge_timings_in(&tx, id, timings)?;
        tx.commit()?;
        Ok(())
    }

    fn record_worker_timings(
        &self,
        lease: &str,
        holder: Option<&str>,
        timings: &std::collections::BTreeMap<String, u64>,
    ) -> Result<bool> {
        let tx = begin(&self.conn)?;
        let id: Option<String> = tx
            .row(RUNNING_LEASE, params![lease, holder], |r| r.get(0))
            .optional()?;
        let Some(id) = id else {
            return Ok(false);
        };
        let mut m = serde_json::Map::new();
        m.insert("worker".into(), json!(timings));
        merge_timings_in(&tx, &id, &m)?;
        tx.commit()?;
        Ok(true)
    }

    /// How many queued tasks of its type and model run before this one (0: next); `None`
    /// unless queued.
    fn queue_position(&self, task: &Task) -> Result<Option<u64>> {
        if task.state != TaskState::Queued {
            return Ok(None);
        }
        let n: i64 = self.conn.row(
            "SELECT COUNT(*) FROM tasks WHERE state = 'queued' AND task_type = ?1 AND model IS ?4
             AND (priority > ?2 OR (priority = ?2 AND seq < ?3))",
            params![task.task_type, task.priority, task.seq, task.model],
            |r| r.get(0),
        )?;
        Ok(Some(n as u64))
    }

    /// Tasks, newest first.
    fn list(&self, f: &ListFilter) -> Result<Vec<Task>> {
        let c = &self.conn;
        let sql = format!(
            "SELECT {COLS} FROM tasks WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR task_type = ?2)
             AND (?3 IS NULL OR seq < ?3) ORDER BY seq DESC LIMIT ?4"
        );
        let mut stmt = c.prepare_cached(&sql)?;
        let rows = stmt
            .query_map(
                params![
                    f.state.map(|s| s.as_str()),
                    f.task_type,
                    f.before_seq,
                    f.limit.clamp(1, 500) as i64
                ],
                row_to_task,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(finish_task).collect()
    }

    /// Counts by state and type.
    fn stats(&self) -> Result<Stats> {
        let c = &self.conn;
        let mut stmt = c.prepare_cached(
            "SELECT state, task_type, COUNT(*) FROM tasks GROUP BY state, task_type",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Stats {
            by_state_type: rows
                .into_iter()
                .filter_map(|(s, t, n)| TaskState::parse(&s).map(|s| (s, t, n as u64)))
                .collect(),
        })
    }

    /// Events of `task_id` after event id `after`, oldest first.
    fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<TaskEvent>> {
        let c = &self.conn;
        let mut stmt = c.prepare_cached(
            "SELECT id, kind, data, ts FROM events WHERE task_id = ?1 AND id > ?2 ORDER BY id",
        )?;
        let rows = stmt
            .query_map(params![task_id, after], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u64>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, kind, data, ts)| {
                Ok(TaskEvent {
                    id,
                    task_id: task_id.to_owned(),
                    kind,
                    data: serde_json::from_str(&data)
                        .map_err(|e| QueueError::Corrupt(e.to_string()))?,
                    ts,
                })
            })
            .collect()
    }

    fn identity(&self, worker_id: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .row(
                "SELECT secret_sha256 FROM workers WHERE worker_id = ?1",
                [worker_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_identity(&self, worker_id: &str, hash: &str, now: u64) -> Result<bool> {
        let n = self.conn.exec(
            "INSERT INTO workers (worker_id, secret_sha256, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (worker_id) DO NOTHING",
            params![worker_id, hash, now],
        )?;
        Ok(n == 1)
    }

    fn forget_identity(&self, worker_id: &str) -> Result<bool> {
        let n = self
            .conn
            .exec("DELETE FROM workers WHERE worker_id = ?1", [worker_id])?;
        Ok(n == 1)
    }

    fn ping(&self) -> Result<()> {
        self.conn.row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
        Ok(())
    }
}

impl Queue for SqliteQueue {
    fn enqueue(&self, task: NewTask, now: u64) -> QueueFuture<'_, (Task, bool)> {
        self.call(move |db| db.enqueue(task, now))
    }

    fn reserve<'a>(
        &'a self,
        worker_id: &'a str,
        caps: &'a Capabilities,
        n: usize,
        lease_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>> {
        let (w, caps) = (worker_id.to_owned(), caps.clone());
        self.call(move |db| db.reserve(&w, &caps, n, lease_until, now))
    }

    fn renew<'a>(&'a self, worker_id: &'a str, until: u64) -> QueueFuture<'a, usize> {
        let w = worker_id.to_owned();
        self.call(move |db| db.renew(&w, until))
    }

    fn leases_of<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Vec<(String, String)>> {
        let w = worker_id.to_owned();
        self.call(move |db| db.leases_of(&w))
    }

    fn progress<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        progress: Value,
        now: u64,
    ) -> QueueFuture<'a, Option<String>> {
        let (l, h) = (lease.to_owned(), holder.map(str::to_owned));
        self.call(move |db| db.progress(&l, h.as_deref(), progress, now))
    }

    fn finish<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        ending: Ending,
        now: u64,
    ) -> QueueFuture<'a, CompleteOutcome> {
        let (l, h) = (lease.to_owned(), holder.map(str::to_owned));
        self.call(move |db| db.end_attempt(&l, h.as_deref(), ending, now))
    }

    fn release<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>> {
        let (l, h, why) = (lease.to_owned(), holder.map(str::to_owned), why.to_owned());
        self.call(move |db| db.give_back(&l, h.as_deref(), &why, None, now))
    }

    fn reject<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        avoid_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>> {
        let (l, h, why) = (lease.to_owned(), holder.map(str::to_owned), why.to_owned());
        self.call(move |db| db.give_back(&l, h.as_deref(), &why, Some(avoid_until), now))
    }

    fn note_task_types<'a>(&'a self, task_types: &'a [String], now: u64) -> QueueFuture<'a, ()> {
        let types = task_types.to_vec();
        self.call(move |db| db.note_task_types(&types, now))
    }

    fn task_types_seen(&self, since: u64) -> QueueFuture<'_, Vec<String>> {
        self.read(move |db| {
            let mut stmt = db.conn.prepare_cached(
                "SELECT task_type FROM task_types WHERE last_seen >= ?1 ORDER BY task_type",
            )?;
            let v = stmt
                .query_map(params![since as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(v)
        })
    }

    fn release_worker<'a>(
        &'a self,
        worker_id: &'a str,
        keep: &'a [String],
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>> {
        let (w, keep) = (worker_id.to_owned(), keep.to_vec());
        self.call(move |db| db.release_worker(&w, &keep, now))
    }

    fn record_assignment<'a>(
        &'a self,
        lease: &'a str,
        delivered: bool,
    ) -> QueueFuture<'a, Option<u32>> {
        let l = lease.to_owned();
        self.call(move |db| db.record_assignment(&l, delivered))
    }

    fn sweep(&self, now: u64) -> QueueFuture<'_, Sweep> {
        self.call(move |db| db.sweep(now))
    }

    fn cancel<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, CancelOutcome> {
        let id = id.to_owned();
        self.call(move |db| db.cancel(&id, now))
    }

    fn get<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Task>> {
        let id = id.to_owned();
        self.read(move |db| db.get(&id))
    }

    fn attempts<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Vec<AttemptRecord>> {
        let id = id.to_owned();
        self.read(move |db| db.attempts(&id))
    }

    fn queue_position<'a>(&'a self, task: &'a Task) -> QueueFuture<'a, Option<u64>> {
        if task.state != TaskState::Queued {
            return Box::pin(async { Ok(None) });
        }
        let t = task.clone();
        self.read(move |db| db.queue_position(&t))
    }

    fn list<'a>(&'a self, filter: &'a ListFilter) -> QueueFuture<'a, Vec<Task>> {
        let f = filter.clone();
        self.read(move |db| db.list(&f))
    }

    fn stats(&self) -> QueueFuture<'_, Stats> {
        self.read(|db| db.stats())
    }

    fn events_after<'a>(&'a self, task_id: &'a str, after: i64) -> QueueFuture<'a, Vec<TaskEvent>> {
        let id = task_id.to_owned();
        self.read(move |db| db.events_after(&id, after))
    }

    fn ping(&self) -> QueueFuture<'_, ()> {
        self.read(|db| db.ping())
    }

    fn timings<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Value>> {
        let id = id.to_owned();
        self.read(move |db| db.timings(&id))
    }

    fn detail<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<TaskDetail>> {
        let id = id.to_owned();
        self.read(move |db| {
            // One read transaction, so the three parts agree with each other.
            let tx = begin(&db.conn)?;
            let Some(task) = get_task(&tx, &id)? else {
                return Ok(None);
            };
            let d = TaskDetail::new(task, db.attempts(&id)?, db.timings(&id)?);
            tx.commit()?;
            Ok(Some(d))
        })
    }

    fn merge_timings<'a>(
        &'a self,
        id: &'a str,
        timings: &'a serde_json::Map<String, Value>,
    ) -> QueueFuture<'a, ()> {
        let (id, t) = (id.to_owned(), timings.clone());
        self.call(move |db| db.merge_timings(&id, &t))
    }

    fn record_worker_timings<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        timings: &'a std::collections::BTreeMap<String, u64>,
    ) -> QueueFuture<'a, bool> {
        let (l, h, t) = (lease.to_owned(), holder.map(str::to_owned), timings.clone());
        self.call(move |db| db.record_worker_timings(&l, h.as_deref(), &t))
    }

    fn identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Option<String>> {
        let w = worker_id.to_owned();
        self.call(move |db| db.identity(&w))
    }

    fn set_identity<'a>(
        &'a self,
        worker_id: &'a str,
        secret_sha256: &'a str,
        now: u64,
    ) -> QueueFuture<'a, bool> {
        let (w, h) = (worker_id.to_owned(), secret_sha256.to_owned());
        self.call(move |db| db.set_identity(&w, &h, now))
    }

    fn forget_identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, bool> {
        let w = worker_id.to_owned();
        self.call(move |db| db.forget_identity(&w))
    }

    fn take_events(&self) -> Vec<TaskEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report
mod tests {
    use super::*;

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
