//! The PostgreSQL queue store (feature `postgres`): the same tables as SQLite in a schema of
//! its own, for several gateway instances sharing one database.
//!
//! `reserve` claims with `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED LIMIT n)
//! RETURNING`, so concurrent instances never hand out one task twice and never wait on each
//! other's claims; every other change locks the task's row (`FOR UPDATE`) and checks the lease
//! under the lock (compare-and-set). A task is durable once `enqueue` returns (committed with
//! the server's `synchronous_commit`). Each committed change is announced with `pg_notify` on
//! a channel named after the schema; every instance LISTENs on it and turns what other
//! instances did into [`Notification`]s (tasks ready, task events).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use futures_util::StreamExt;
use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use crate::model::*;
use crate::queue::*;

type Result<T> = std::result::Result<T, QueueError>;

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// libpq-style connection string or URL, e.g.
    /// `host=127.0.0.1 port=5432 user=postgres dbname=test`.
    pub url: String,
    /// Schema holding the tables (created if missing); also names the notification channel.
    /// Letters, digits and `_`, at most 40 characters. Default: `kiln`.
    pub schema: String,
    /// Most connections the pool opens (plus one for LISTEN). Default: 8.
    pub pool_size: usize,
    /// How long a call waits for a connection. Default: 5 s.
    pub connect_timeout: Duration,
    /// Attempts and retry backoff.
    pub queue: QueueOptions,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            url: "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into(),
            schema: "kiln".into(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            queue: QueueOptions::default(),
        }
    }
}

const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.tasks (
    seq BIGSERIAL PRIMARY KEY,
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
    lease_expires_at BIGINT,
    deadline BIGINT,
    not_before BIGINT NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    output TEXT,
    error TEXT,
    progress TEXT,
    dead_lettered BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    completed_at BIGINT,
    model TEXT,
    labels TEXT[] NOT NULL DEFAULT '{}'
);
-- Routing columns, added to tables made by earlier releases.
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS model TEXT;
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS labels TEXT[] NOT NULL DEFAULT '{}';
-- Assignments of the current attempt that failed on the transport in a row.
ALTER TABLE {s}.tasks ADD COLUMN IF NOT EXISTS assign_failures INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS tasks_ready ON {s}.tasks (task_type, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS tasks_running ON {s}.tasks (lease_expires_at) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_worker ON {s}.tasks (worker_id) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_deadline ON {s}.tasks (deadline) WHERE state IN ('queued', 'running') AND deadline IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.attempts (
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    lease TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    ended_at BIGINT,
    error TEXT,
    PRIMARY KEY (task_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_lease ON {s}.attempts (lease);
CREATE TABLE IF NOT EXISTS {s}.events (
    id BIGSERIAL PRIMARY KEY,
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    ts BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_task ON {s}.events (task_id, id);
CREATE TABLE IF NOT EXISTS {s}.timings (
    task_id TEXT PRIMARY KEY,
    data JSONB NOT NULL
);
-- Workers a task skips after their retryable reject, until `until`.
CREATE TABLE IF NOT EXISTS {s}.avoid (
    task_id TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    until BIGINT NOT NULL,
    PRIMARY KEY (task_id, worker_id)
);
-- Task types workers said hello with, and when last.
CREATE TABLE IF NOT EXISTS {s}.task_types (
    task_type TEXT PRIMARY KEY,
    last_seen BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.workers (
    worker_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
";

const COLS: &str = "id, request_id, task_type, state, priority, input, metadata, attempt, max_attempts, \
    lease, worker_id, lease_expires_at, deadline, cancel_requested, output, error, progress, \
    dead_lettered, created_at, started_at, completed_at, seq, model, labels";

/// NOTIFY payloads must stay below 8000 bytes; larger event batches send ids only.
const MAX_PAYLOAD: usize = 7000;

/// The PostgreSQL queue store. Implements [`Queue`].
pub struct PostgresQueue {
    pool: Pool,
    schema: String,
    channel: String,
    instance: String,
    opts: QueueOptions,
    events: Arc<Mutex<Vec<TaskEvent>>>,
    notes: Mutex<Option<mpsc::Receiver<Notification>>>,
    listener: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PostgresQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresQueue")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresQueue {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl From<tokio_postgres::Error> for QueueError {
    fn from(e: tokio_postgres::Error) -> Self {
        QueueError::Store(Box::new(e))
    }
}

impl From<deadpool_postgres::PoolError> for QueueError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        QueueError::Unavailable(e.to_string())
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn corrupt(e: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt(e.to_string())
}

fn parse_json(s: Option<String>) -> Result<Option<Value>> {
    s.map(|s| serde_json::from_str(&s).map_err(corrupt))
        .transpose()
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn row_to_task(r: &Row) -> Result<Task> {
    let state: String = r.try_get(3)?;
    let input: String = r.try_get(5)?;
    let error: Option<String> = r.try_get(15)?;
    Ok(Task {
        id: r.try_get(0)?,
        request_id: r.try_get(1)?,
        task_type: r.try_get(2)?,
        state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
        priority: r.try_get(4)?,
        input: serde_json::from_str(&input).map_err(corrupt)?,
        metadata: parse_json(r.try_get(6)?)?,
        attempt: r.try_get::<_, i32>(7)?.max(0) as u32,
        max_attempts: r.try_get::<_, i32>(8)?.max(0) as u32,
        lease: r.try_get(9)?,
        worker_id: r.try_get(10)?,
        lease_expires_at: r.try_get::<_, Option<i64>>(11)?.map(u),
        deadline: r.try_get::<_, Option<i64>>(12)?.map(u),
        cancel_requested: r.try_get(13)?,
        output: parse_json(r.try_get(14)?)?,
        error: error
            .map(|e| serde_json::from_str::<TaskError>(&e).map_err(corrupt))
            .transpose()?,
        progress: parse_json(r.try_get(16)?)?,
        dead_lettered: r.try_get(17)?,
        created_at: u(r.try_get(18)?),
        started_at: r.try_get::<_, Option<i64>>(19)?.map(u),
        completed_at: r.try_get::<_, Option<i64>>(20)?.map(u),
        seq: r.try_get(21)?,
        model: r.try_get(22)?,
        labels: r.try_get(23)?,
    })
}

fn row_to_event(r: &Row) -> Result<TaskEvent> {
    let data: String = r.try_get(3)?;
    Ok(TaskEvent {
        id: r.try_get(0)?,
        task_id: r.try_get(1)?,
        kind: r.try_get(2)?,
        data: serde_json::from_str(&data).map_err(corrupt)?,
        ts: u(r.try_get(4)?),
    })
}

fn status_data(t: &Task) -> Value {
    json!({"status": t.state.as_str(), "attempt": t.attempt, "worker_id": t.worker_id})
}

fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// One write transaction: the events it wrote and whether tasks became ready.
struct Tx<'a> {
    tx: Transaction<'a>,
    q: &'a PostgresQueue,
    events: Vec<TaskEvent>,
    ready: bool,
}

impl<'a> Tx<'a> {
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let stmt = self.tx.prepare_cached(&self.q.sql(sql)).await?;
        Ok(self.tx.query(&stmt, params).await?)
    }

    async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let stmt = self.tx.prepare_cached(&self.q.sql(sql)).await?;
        Ok(self.tx.execute(&stmt, params).await?)
    }

    async fn task(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Task>> {
        self.rows(sql, params)
            .await?
            .first()
            .map(row_to_task)
            .transpose()
    }

    async fn tasks(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Task>> {
        self.rows(sql, params)
            .await?
            .iter()
            .map(row_to_task)
            .collect()
    }

    async fn get(&self, id: &str) -> Result<Task> {
        self.task(
            &format!("SELECT {COLS} FROM {{s}}.tasks WHERE id = $1"),
            &[&id],
        )
        .await?
        .ok_or_else(|| corrupt("task vanished"))
    }

    async fn event(&mut self, task_id: &str, kind: &str, data: Value, now: u64) -> Result<()> {
        let rows = self
            .rows(
                "INSERT INTO {s}.events (task_id, kind, data, ts) VALUES ($1, $2, $3, $4) RETURNING id",
                &[&task_id, &kind, &data.to_string(), &i(now)],
            )
            .await?;
        let id: i64 = rows
            .first()
            .ok_or_else(|| corrupt("no event id"))?
            .try_get(0)?;
        self.events.push(TaskEvent {
            id,
            task_id: task_id.to_owned(),
            kind: kind.to_owned(),
            data,
            ts: now,
        });
        Ok(())
    }

    async fn status_event(&mut self, t: &Task, now: u64) -> Result<()> {
        if t.state.is_terminal() {
            self.event(&t.id, "status", status_data(t), now).await?;
            let done = json!({"status": t.state.as_str(), "output": t.output, "error": t.error});
            self.event(&t.id, "completed", done, now).await
        } else {
            if t.state == TaskState::Queued {
                self.ready = true;
            }
            self.event(&t.id, "status", status_data(t), now).await
        }
    }

    /// Announces the changes to other instances (delivered at commit), commits, and hands
    /// the events to the local broadcast.
    async fn commit(self) -> Result<()> {
        if !self.events.is_empty() || self.ready {
            let mut payload =
                json!({"src": self.q.instance, "ready": self.ready, "events": self.events})
                    .to_string();
            if payload.len() > MAX_PAYLOAD {
                let ids: Vec<i64> = self.events.iter().map(|e| e.id).collect();
                payload =
                    json!({"src": self.q.instance, "ready": self.ready, "ids": ids}).to_string();
            }
            let stmt = self.tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
            self.tx.execute(&stmt, &[&self.q.channel, &payload]).await?;
        }
        self.tx.commit().await?;
        if !self.events.is_empty() {
            self.q
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(self.events);
        }
        Ok(())
    }

    /// Puts a running task back (or ends it: canceled when a cancel was requested, failed
    /// when attempts are spent and `counted`).
    async fn requeue(&mut self, task: &Task, why: &str, counted: bool, now: u64) -> Result<Task> {
        let attempt = task.attempt as i32;
        self.exec(
            "UPDATE {s}.attempts SET ended_at = $3, error = $4 WHERE task_id = $1 AND attempt = $2",
            &[&task.id, &attempt, &i(now), &why],
        )
        .await?;
        if task.cancel_requested {
            self.exec(
                "UPDATE {s}.tasks SET state = 'canceled', lease = NULL, lease_expires_at = NULL, completed_at = $2 WHERE id = $1",
                &[&task.id, &i(now)],
            )
            .await?;
        } else if counted && task.attempt >= task.max_attempts {
            let err = json!(TaskError {
                code: "lease_expired".into(),
                message: why.into(),
                retryable: true
            })
            .to_string();
            self.exec(
                "UPDATE {s}.tasks SET state = 'failed', lease = NULL, lease_expires_at = NULL, error = $2,
                 dead_lettered = TRUE, completed_at = $3 WHERE id = $1",
                &[&task.id, &err, &i(now)],
            )
            .await?;
        } else {
            let back: i32 = if counted { 0 } else { 1 };
            self.exec(
                "UPDATE {s}.tasks SET state = 'queued', attempt = attempt - $2, lease = NULL, worker_id = NULL,
                 lease_expires_at = NULL, not_before = 0 WHERE id = $1",
                &[&task.id, &back],
            )
            .await?;
        }
        let after = self.get(&task.id).await?;
        self.status_event(&after, now).await?;
        Ok(after)
    }
}

impl PostgresQueue {
    /// Connects, creates the schema and tables if missing, and starts listening for other
    /// instances' changes (needs a tokio runtime).
    pub async fn open(opts: PostgresOptions) -> Result<Self> {
        if !valid_schema(&opts.schema) {
            return Err(QueueError::Invalid(format!(
                "schema {:?}: use lowercase letters, digits and _ (at most 40)",
                opts.schema
            )));
        }
        let pg: tokio_postgres::Config = opts
            .url
            .parse()
            .map_err(|e| QueueError::Invalid(format!("postgres url: {e}")))?;
        let mgr = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(opts.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(opts.connect_timeout))
            .create_timeout(Some(opts.connect_timeout))
            .build()
            .map_err(|e| QueueError::Invalid(format!("postgres pool: {e}")))?;
        let schema = opts.schema.clone();
        {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            // Instances starting together would race on CREATE … IF NOT EXISTS.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&schema])
                .await?;
            tx.batch_execute(&SCHEMA.replace("{s}", &schema)).await?;
            tx.commit().await?;
        }
        let channel = format!("kiln_queue_{schema}");
        let (notes_tx, notes_rx) = mpsc::channel(4096);
        let instance = new_id("inst");
        let listener = tokio::spawn(listen(
            pg,
            pool.clone(),
            schema.clone(),
            channel.clone(),
            instance.clone(),
            notes_tx,
        ));
        Ok(Self {
            pool,
            schema,
            channel,
            instance,
            opts: QueueOptions {
                default_max_attempts: opts.queue.default_max_attempts.max(1),
                ..opts.queue
            },
            events: Arc::new(Mutex::new(Vec::new())),
            notes: Mutex::new(Some(notes_rx)),
            listener,
        })
    }

    /// Drops the schema and everything in it (tests clean up with this).
    pub async fn drop_schema(&self) -> Result<()> {
        let c = self.pool.get().await?;
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await?;
        Ok(())
    }

    fn sql(&self, template: &str) -> String {
        template.replace("{s}", &self.schema)
    }

    async fn begin<'a>(&'a self, c: &'a mut deadpool_postgres::Client) -> Result<Tx<'a>> {
        Ok(Tx {
            tx: c.transaction().await?,
            q: self,
            events: Vec::new(),
            ready: false,
        })
    }

    async fn read(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let c = self.pool.get().await?;
        let stmt = c.prepare_cached(&self.sql(sql)).await?;
        Ok(c.query(&stmt, params).await?)
    }

    async fn enqueue_(&self, mut t: NewTask, now: u64) -> Result<(Task, bool)> {
        if t.task_type.trim().is_empty() {
            return Err(QueueError::Invalid("task_type is empty".into()));
        }
        normalize_routing(&mut t)?;
        let mut c = self.pool.get().await?;
        let mut tx = self.begin(&mut c).await?;
        let id = new_id("task");
        let max = t
            .max_attempts
            .unwrap_or(self.opts.default_max_attempts)
            .max(1) as i32;
        let inserted = tx
            .task(
                &format!(
                    "INSERT INTO {{s}}.tasks (id, request_id, task_type, state, priority, input, metadata, max_attempts, deadline, created_at, model, labels)
                     VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (request_id) DO NOTHING RETURNING {COLS}"
                ),
                &[
                    &id,
                    &t.request_id,
                    &t.task_type,
                    &t.priority,
                    &t.input.to_string(),
                    &t.metadata.as_ref().map(Value::to_string),
                    &max,
                    &t.deadline.map(i),
                    &i(now),
                    &t.model,
                    &t.labels,
                ],
            )
            .await?;
        let Some(task) = inserted else {
            // The request_id names a stored task (committed by us or another instance).
            let existing = tx
                .task(
                    &format!("SELECT {COLS} FROM {{s}}.tasks WHERE request_id = $1"),
                    &[&t.request_id],
                )
                .await?
                .ok_or_else(|| corrupt("request_id conflict without a task"))?;
            let rid = t.request_id.clone().unwrap_or_default();
            if !same_request(&existing, &t) {
                return Err(QueueError::Conflict(rid));
            }
            return Ok((existing, false));
        };
        tx.status_event(&task, now).await?;
        tx.commit().await?;
        Ok((task, true))
    }

    async fn reserve_(
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
        let mut c = self.pool.get().await?;
        let mut tx = self.begin(&mut c).await?;
        let mut tasks = tx
            .tasks(
                &format!(
                    "UPDATE {{s}}.tasks SET state = 'running', attempt = attempt + 1,
                       lease = 'lease_' || replace(gen_random_uuid()::text, '-', ''),
                       worker_id = $1, lease_expires_at = $2, started_at = COALESCE(started_at, $3), progress = NULL
                     WHERE id IN (
                       SELECT id FROM {{s}}.tasks
                       WHERE state = 'queued' AND not_before <= $3 AND task_type = ANY($4)
                         AND (model IS NULL OR model = ANY($6)) AND labels <@ $7
                         AND NOT EXISTS (SELECT 1 FROM {{s}}.avoid a WHERE a.task_id = {{s}}.tasks.id
                           AND a.worker_id = $1 AND a.until > $3)
                       ORDER BY priority DESC, seq LIMIT $5
                       FOR UPDATE SKIP LOCKED)
                     RETURNING {COLS}"
                ),
                &[
                    &worker_id,
                    &i(lease_until),
                    &i(now),
                    task_types,
                    &(n as i64),
                    &caps.models,
                    &caps.labels,
                ],
            )
            .await?;
        tasks.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
        for t in &tasks {
            let lease = t.lease.clone().unwrap_or_default();
            tx.exec(
                "INSERT INTO {s}.attempts (task_id, attempt, worker_id, lease, started_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (task_id, attempt) DO UPDATE SET worker_id = $3, lease = $4, started_at = $5, ended_at = NULL, error = NULL",
                &[&t.id, &(t.attempt as i32), &worker_id, &lease, &i(now)],
            )
            .await?;
            tx.status_event(t, now).await?;
        }
        tx.commit().await?;
        Ok(tasks)
    }

    async fn progress_(
        &self,
        lease: &str,
        holder: Option<&str>,
        progress: Value,
        now: u64,
    ) -> Result<Option<String>> {
        let mut c = self.pool.get().await?;
        let mut tx = self.begin(&mut c).await?;
        let rows = tx
            .rows(
                "UPDATE {s}.tasks SET progress = $2 WHERE lease = $1 AND state = 'running'
                 AND ($3::text IS NULL OR worker_id = $3) RETURNING id",
                &[&lease, &progress.to_string(), &holder],
            )
            .await?;
        let id: Option<String> = rows.first().map(|r| r.try_get(0)).transpose()?;
        if let Some(id) = &id {
            tx.event(id, "progress", progress, now).await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    async fn end_attempt(
        &self,
        lease: &str,
        holder: Option<&str>,
        ending: Ending,
        now: u64,
    ) -> Result<CompleteOutcome> {
        let mut c = self.pool.get().await?;
        let mut tx = self.begin(&mut c).await?;
        let current = tx
            .task(
                &format!("SELECT {COLS} FROM {{s}}.tasks WHERE lease = $1 FOR UPDATE"),
                &[&lease],
            )
            .await?;
        let Some(task) = current else {
            let known = !tx
                .rows("SELECT 1 FROM {s}.attempts WHERE lease = $1", &[&lease])
                .await?
                .is_empty();
            return Ok(if known {
                CompleteOutcome::stale_lease()
            } else {
                CompleteOutcome::unknown_lease()
            });
        };
        if holder.is_some_and(|w| task.worker_id.as_deref() != Some(w)) {
            return Ok(CompleteOutcome::not_holder());
        }
        if task.state != TaskState::Running {
            return Ok(CompleteOutcome::not_running(task));
        }
        let d = ending.decide(&task, &self.opts, now);
        let err_json = d.error.as_ref().map(|e| json!(e).to_string());
        let err_text = d
            .error
            .as_ref()
            .map(|e| format!("{}: {}", e.code, e.message));
        tx.exec(
            "UPDATE {s}.attempts SET ended_at = $3, error = $4 WHERE task_id = $1 AND attempt = $2",
            &[&task.id, &(task.attempt as i32), &i(now), &err_text],
        )
        .await?;
        if let Some(not_before) = d.requeue_at {
            tx.exec(
                "UPDATE {s}.tasks SET state = 'queued', lease = NULL, worker_id = NULL, lease_expires_at = NULL,
                 not_before = $2, error = $3 WHERE id = $1",
                &[&task.id, &i(not_before), &err_json],
            )
            .await?;
        } else {
            tx.exec(
                "UPDATE {s}.tasks SET state = $2, lease = NULL, lease_expires_at = NULL, output = $3, error = $4,
                 dead_lettered = $5, completed_at = $6 WHERE id = $1",
                &[
                    &task.id,
                    &d.state.as_str(),
                    &d.output.as_ref().map(Value::to_string),
                    &err_json,
                    &d.dead,
                    &i(now),
                ],
            )
            .await?;
        }
        let after = tx.get(&task.id).await?;
        tx.status_event(&after, now).await?;
        tx.commit().await?;
        Ok(CompleteOutcome {
            accepted: true,
            reason: None,
            task: Some(after),
        })
    }

    /// Gives a lease back: queued again at once, the attempt not counted (`release`, and a
    /// retryable `reject`, whose worker then skips the task until `avoid_until`).
    async fn give_back_(
        &self,
        lease: &str,
        holder: Option<&str>,
        why: &str,
        avoid_until: Option<u64>,
        now: u64,
    ) -> Result<Option<Task>> {
        let mut c = self.pool.get().await?;
        let mut tx = self.begin(&mut c).await?;
        let Some(task) = tx
            .task(
                &format!(
                    "SELECT {COLS} FROM {{s}}.tasks WHERE lease = $1 AND state = 'running'
                     AND ($2::text IS NULL OR worker_id = $2) FOR UPDATE"
                ),
                &[&lease, &holder],
            )
            .await?
        else {
            return Ok(None);
        };
        if let Some(until) = avoid_until {
            tx.exec("DELETE FROM {s}.avoid WHERE until <= $1", &[&i(now)])
                .await?;
            if let Some(w) = &task.worker_id {
                tx.exec(
                    "INSERT INTO {s}.avoid (task_id, worker_id, until) VALUES ($1, $2, $3)
                     ON CONFLICT (task_id, worker_id) DO UPDATE SET until = $3",
                    &[&task.id, w, &i(until)],
                )
                .await?;
            }
        }
        let after = tx.requeue(&task, why, false, now).await?;
        tx.commit().await?;
        Ok(Some(after))
    }

    async fn note_task_types_(&self, task_types: &[String], now: u64) -> Result<()> {
        let c = self.pool.get().await?;
        let stmt = c
            .prepare_cached(&self.sql(
                "INSERT INTO {s}.task_types (task_type, last_seen) SELECT t, $2 FROM unnest($1::text[]) AS t
                 ON CONFLICT (task_type) DO UPDATE SET last_seen = GREATEST({s}.task_types.last_seen, $2)",
            ))
            .await?;
        c.execute(&stmt, &[&task_types, &i(now)]).await?;
        Ok(())
    }

    async fn task_types_seen_(&self, since: u64) -> Result<Vec<String>> {
        let rows = self
            .read(
                "SELECT task_type FROM {s}.task_types WHERE last_seen >= $1 ORDER BY task_type",
                &[&i(since)],
            )
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn release_worker_(
        &self,
        worker_id: &str,
        keep: &[String],
        now: u64,
    ) -> Result<Vec<Task>> {
        let mut c = self.pool.get().await?;
        let mut tx = self.begin(&mut c).await?;
        let held = tx
            .tasks(
                &format!(
                    "SELECT {COLS} FROM {{s}}.tasks WHERE state = 'running' AND worker_id = $1 ORDER BY seq FOR UPDATE"
                ),
                &[&worker_id],
            )
            .await?;
        let mut out = Vec::with_capacity(held.len());
        for t in held {
            if t.lease.as_ref().is_some_and(|l| keep.contains(l)) {
                continue;
            }
            out.push(tx.requeue(&t, "worker restarted", true, now).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn sweep_(&self, now: u64) -> Result<Sweep> {
        let mut c = self.pool.get().await?;
        let mut tx = self.begin(&mut c).await?;
        // SKIP LOCKED: instances sweeping at once split the work instead of queueing on it.
        let lapsed = tx
            .tasks(
                &format!(
                    "SELECT {COLS} FROM {{s}}.tasks WHERE state = 'running' AND lease_expires_at < $1
                     ORDER BY seq FOR UPDATE SKIP LOCKED"
                ),
                &[&i(now)],
            )
            .await?;
        let mut changed = Vec::new();
        for t in lapsed {
            changed.push(tx.requeue(&t, "lease expired", true, now).await?);
        }
        let expired = tx
            .tasks(
                &format!(
                    "SELECT {COLS} FROM {{s}}.tasks WHERE state IN ('queued', 'running') AND deadline IS NOT NULL
                     AND deadline < $1 ORDER BY seq FOR UPDATE SKIP LOCKED"
                ),
                &[&i(now)],
            )
            .await?;
        let mut stop = Vec::new();
        for t in expired {
            if let (Some(w), Some(l)) = (&t.worker_id, &t.lease)
                && t.state == TaskState::Running
            {
                stop.push((w.clone(), l.clone()));
            }
            tx.exec(
                "UPDATE {s}.tasks SET state = 'expired', lease = NULL, lease_expires_at = NULL, completed_at = $2 WHERE id = $1",
                &[&t.id, &i(now)],
            )
            .await?;
            let after = tx.get(&t.id).await?;
            tx.status_event(&after, now).await?;
            changed.push(after);
        }
        tx.commit().await?;
        Ok(Sweep { changed, stop })
    }

    async fn cancel_(&self, id: &str, now: u64) -> Result<CancelOutcome> {
        let mut c = self.pool.get().await?;
        let mut tx = self.begin(&mut c).await?;
        let Some(task) = tx
            .task(
                &format!("SELECT {COLS} FROM {{s}}.tasks WHERE id = $1 FOR UPDATE"),
                &[&id],
            )
            .await?
        else {
            return Ok(CancelOutcome::NotFound);
        };
        let out = match task.state {
            TaskState::Queued => {
                tx.exec(
                    "UPDATE {s}.tasks SET state = 'canceled', completed_at = $2 WHERE id = $1",
                    &[&id, &i(now)],
                )
                .await?;
                let after = tx.get(id).await?;
                tx.status_event(&after, now).await?;
                CancelOutcome::Canceled(after)
            }
            TaskState::Running => {
                tx.exec(
                    "UPDATE {s}.tasks SET cancel_requested = TRUE WHERE id = $1",
                    &[&id],
                )
                .await?;
                let after = tx.get(id).await?;
                let data = json!({"status": "running", "cancel_requested": true});
                tx.event(id, "status", data, now).await?;
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
        tx.commit().await?;
        Ok(out)
    }

    async fn list_(&self, f: &ListFilter) -> Result<Vec<Task>> {
        let rows = self
            .read(
                &format!(
                    "SELECT {COLS} FROM {{s}}.tasks WHERE ($1::text IS NULL OR state = $1)
                     AND ($2::text IS NULL OR task_type = $2) AND ($3::bigint IS NULL OR seq < $3)
                     ORDER BY seq DESC LIMIT $4"
                ),
                &[
                    &f.state.map(|s| s.as_str()),
                    &f.task_type,
                    &f.before_seq,
                    &(f.limit.clamp(1, 500) as i64),
                ],
            )
            .await?;
        rows.iter().map(row_to_task).collect()
    }

    async fn stats_(&self) -> Result<Stats> {
        let rows = self
            .read(
                "SELECT state, task_type, COUNT(*) FROM {s}.tasks GROUP BY state, task_type",
                &[],
            )
            .await?;
        let mut by_state_type = Vec::with_capacity(rows.len());
        for r in rows {
            let (s, t, n): (String, String, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            if let Some(s) = TaskState::parse(&s) {
                by_state_type.push((s, t, u(n)));
            }
        }
        Ok(Stats { by_state_type })
    }
}

/// Keeps one connection LISTENing on the channel and turns other instances' announcements
/// into notifications; reconnects after a second when the connection drops.
async fn listen(
    pg: tokio_postgres::Config,
    pool: Pool,
    schema: String,
    channel: String,
    instance: String,
    out: mpsc::Sender<Notification>,
) {
    loop {
        match pg.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (msg_tx, mut msgs) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(m) = stream.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                if msg_tx.send(n.payload().to_owned()).is_err() {
                                    break;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(message = "queue listener connection failed", error = %e);
                                break;
                            }
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
                    Ok(()) => {
                        // Anything announced while not listening is unknown: let dispatch look.
                        if !offer(&out, Notification::TasksReady) {
                            driver.abort();
                            return;
                        }
                        while let Some(payload) = msgs.recv().await {
                            if !forward(&payload, &pool, &schema, &instance, &out).await {
                                driver.abort();
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(message = "LISTEN failed", error = %e),
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(message = "queue listener cannot connect", error = %e),
        }
        if out.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Handles one announcement. False when nobody listens any more.
async fn forward(
    payload: &str,
    pool: &Pool,
    schema: &str,
    instance: &str,
    out: &mpsc::Sender<Notification>,
) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(payload) else {
        return true;
    };
    if v["src"].as_str() == Some(instance) {
        return true;
    }
    let mut events: Vec<TaskEvent> =
        serde_json::from_value(v["events"].clone()).unwrap_or_default();
    if let Some(ids) = v["ids"].as_array() {
        let ids: Vec<i64> = ids.iter().filter_map(Value::as_i64).collect();
        let fetched = async {
            let c = pool.get().await?;
            let sql = format!(
                "SELECT id, task_id, kind, data, ts FROM {schema}.events WHERE id = ANY($1) ORDER BY id"
            );
            let rows = c.query(&sql, &[&ids]).await?;
            rows.iter().map(row_to_event).collect::<Result<Vec<_>>>()
        };
        match fetched.await {
            Ok(v) => events = v,
            Err(e) => tracing::warn!(message = "cannot read announced events", error = %e),
        }
    }
    if v["ready"].as_bool() == Some(true) && !offer(out, Notification::TasksReady) {
        return false;
    }
    events
        .into_iter()
        .all(|e| offer(out, Notification::Event(e)))
}

/// Queues a notification; when the broker falls behind it is dropped (dispatch also polls
/// every sweep interval). False when nobody listens any more.
fn offer(out: &mpsc::Sender<Notification>, n: Notification) -> bool {
    match out.try_send(n) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(message = "queue notifications dropped: the broker falls behind");
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

impl Queue for PostgresQueue {
    fn enqueue(&self, task: NewTask, now: u64) -> QueueFuture<'_, (Task, bool)> {
        Box::pin(self.enqueue_(task, now))
    }

    fn reserve<'a>(
        &'a self,
        worker_id: &'a str,
        caps: &'a Capabilities,
        n: usize,
        lease_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>> {
        Box::pin(self.reserve_(worker_id, caps, n, lease_until, now))
    }

    fn renew<'a>(&'a self, worker_id: &'a str, until: u64) -> QueueFuture<'a, usize> {
        Box::pin(async move {
            let c = self.pool.get().await?;
            let stmt = c
                .prepare_cached(&self.sql(
                    "UPDATE {s}.tasks SET lease_expires_at = $2 WHERE state = 'running' AND worker_id = $1 AND lease_expires_at < $2",
                ))
                .await?;
            Ok(c.execute(&stmt, &[&worker_id, &i(until)]).await? as usize)
        })
    }

    fn leases_of<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let rows = self
                .read(
                    "SELECT lease, id FROM {s}.tasks WHERE state = 'running' AND worker_id = $1",
                    &[&worker_id],
                )
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect()
        })
    }

    fn progress<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        progress: Value,
        now: u64,
    ) -> QueueFuture<'a, Option<String>> {
        Box::pin(self.progress_(lease, holder, progress, now))
    }

    fn finish<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        ending: Ending,
        now: u64,
    ) -> QueueFuture<'a, CompleteOutcome> {
        Box::pin(self.end_attempt(lease, holder, ending, now))
    }

    fn release<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>> {
        Box::pin(self.give_back_(lease, holder, why, None, now))
    }

    fn reject<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        avoid_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>> {
        Box::pin(self.give_back_(lease, holder, why, Some(avoid_until), now))
    }

    fn note_task_types<'a>(&'a self, task_types: &'a [String], now: u64) -> QueueFuture<'a, ()> {
        Box::pin(self.note_task_types_(task_types, now))
    }

    fn task_types_seen(&self, since: u64) -> QueueFuture<'_, Vec<String>> {
        Box::pin(self.task_types_seen_(since))
    }

    fn release_worker<'a>(
        &'a self,
        worker_id: &'a str,
        keep: &'a [String],
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>> {
        Box::pin(self.release_worker_(worker_id, keep, now))
    }

    fn record_assignment<'a>(
        &'a self,
        lease: &'a str,
        delivered: bool,
    ) -> QueueFuture<'a, Option<u32>> {
        Box::pin(async move {
            let rows = self
                .read(
                    "UPDATE {s}.tasks SET assign_failures = CASE WHEN $2 THEN 0 ELSE assign_failures + 1 END
                     WHERE lease = $1 AND state = 'running' RETURNING assign_failures",
                    &[&lease, &delivered],
                )
                .await?;
            rows.first()
                .map(|r| Ok(r.try_get::<_, i32>(0)?.max(0) as u32))
                .transpose()
        })
    }

    fn sweep(&self, now: u64) -> QueueFuture<'_, Sweep> {
        Box::pin(self.sweep_(now))
    }

    fn cancel<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, CancelOutcome> {
        Box::pin(self.cancel_(id, now))
    }

    fn get<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Task>> {
        Box::pin(async move {
            let rows = self
                .read(
                    &format!("SELECT {COLS} FROM {{s}}.tasks WHERE id = $1"),
                    &[&id],
                )
                .await?;
            rows.first().map(row_to_task).transpose()
        })
    }

    fn attempts<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Vec<AttemptRecord>> {
        Box::pin(async move {
            let rows = self
                .read(
                    "SELECT attempt, worker_id, lease, started_at, ended_at, error FROM {s}.attempts
                     WHERE task_id = $1 ORDER BY attempt",
                    &[&id],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(AttemptRecord {
                        attempt: r.try_get::<_, i32>(0)?.max(0) as u32,
                        worker_id: r.try_get(1)?,
                        lease: r.try_get(2)?,
                        started_at: u(r.try_get(3)?),
                        ended_at: r.try_get::<_, Option<i64>>(4)?.map(u),
                        error: r.try_get(5)?,
                    })
                })
                .collect()
        })
    }

    fn queue_position<'a>(&'a self, task: &'a Task) -> QueueFuture<'a, Option<u64>> {
        Box::pin(async move {
            if task.state != TaskState::Queued {
                return Ok(None);
            }
            let rows = self
                .read(
                    "SELECT COUNT(*) FROM {s}.tasks WHERE state = 'queued' AND task_type = $1
                     AND model IS NOT DISTINCT FROM $4
                     AND (priority > $2 OR (priority = $2 AND seq < $3))",
                    &[&task.task_type, &task.priority, &task.seq, &task.model],
                )
                .await?;
            let n: i64 = rows
                .first()
                .ok_or_else(|| corrupt("no count"))?
                .try_get(0)?;
            Ok(Some(u(n)))
        })
    }

    fn list<'a>(&'a self, filter: &'a ListFilter) -> QueueFuture<'a, Vec<Task>> {
        Box::pin(self.list_(filter))
    }

    fn stats(&self) -> QueueFuture<'_, Stats> {
        Box::pin(self.stats_())
    }

    fn events_after<'a>(&'a self, task_id: &'a str, after: i64) -> QueueFuture<'a, Vec<TaskEvent>> {
        Box::pin(async move {
            let rows = self
                .read(
                    "SELECT id, task_id, kind, data, ts FROM {s}.events WHERE task_id = $1 AND id > $2 ORDER BY id",
                    &[&task_id, &after],
                )
                .await?;
            rows.iter().map(row_to_event).collect()
        })
    }

    fn ping(&self) -> QueueFuture<'_, ()> {
        Box::pin(async move {
            self.pool.get().await?.simple_query("SELECT 1").await?;
            Ok(())
        })
    }

    fn timings<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Value>> {
        Box::pin(async move {
            let rows = self
                .read(
                    "SELECT data::text FROM {s}.timings WHERE task_id = $1",
                    &[&id],
                )
                .await?;
            rows.first()
                .map(|r| {
                    let text: String = r.try_get(0)?;
                    serde_json::from_str(&text).map_err(corrupt)
                })
                .transpose()
        })
    }

    fn merge_timings<'a>(
        &'a self,
        id: &'a str,
        timings: &'a serde_json::Map<String, Value>,
    ) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            // `||` replaces top-level keys and keeps the others, in one statement.
            let data = Value::Object(timings.clone()).to_string();
            self.read(
                "INSERT INTO {s}.timings (task_id, data) VALUES ($1, ($2::text)::jsonb)
                 ON CONFLICT (task_id) DO UPDATE SET data = {s}.timings.data || excluded.data
                 RETURNING task_id",
                &[&id, &data],
            )
            .await?;
            Ok(())
        })
    }

    fn record_worker_timings<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        timings: &'a std::collections::BTreeMap<String, u64>,
    ) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            let data = json!({ "worker": timings }).to_string();
            let rows = self
                .read(
                    "INSERT INTO {s}.timings (task_id, data)
                     SELECT id, ($2::text)::jsonb FROM {s}.tasks WHERE lease = $1 AND state = 'running'
                       AND ($3::text IS NULL OR worker_id = $3)
                     ON CONFLICT (task_id) DO UPDATE SET data = {s}.timings.data || excluded.data
                     RETURNING task_id",
                    &[&lease, &data, &holder],
                )
                .await?;
            Ok(!rows.is_empty())
        })
    }

    fn identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Option<String>> {
        Box::pin(async move {
            let rows = self
                .read(
                    "SELECT secret_sha256 FROM {s}.workers WHERE worker_id = $1",
                    &[&worker_id],
                )
                .await?;
            Ok(rows.first().map(|r| r.try_get(0)).transpose()?)
        })
    }

    fn set_identity<'a>(
        &'a self,
        worker_id: &'a str,
        secret_sha256: &'a str,
        now: u64,
    ) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            let rows = self
                .read(
                    "INSERT INTO {s}.workers (worker_id, secret_sha256, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (worker_id) DO NOTHING RETURNING worker_id",
                    &[&worker_id, &secret_sha256, &i(now)],
                )
                .await?;
            Ok(!rows.is_empty())
        })
    }

    fn forget_identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            let rows = self
                .read(
                    "DELETE FROM {s}.workers WHERE worker_id = $1 RETURNING worker_id",
                    &[&worker_id],
                )
                .await?;
            Ok(!rows.is_empty())
        })
    }

    fn take_events(&self) -> Vec<TaskEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn notifications(&self) -> Option<Notifications> {
        let rx = self
            .notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|n| (n, rx))
        })))
    }
}
