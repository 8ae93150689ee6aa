//! The PostgreSQL queue store (feature `postgres`): the same tables as SQLite in a schema of
//! its own, for several gateway instances sharing one database.
//!
//! `reserve` locks the tasks it claims with `SELECT … FOR UPDATE SKIP LOCKED LIMIT n`, so
//! concurrent instances never hand out one task twice and never wait on each other's claims;
//! every other change locks the task's row (`FOR UPDATE`) and checks the lease under the lock
//! (compare-and-set). What each change writes is decided by [`crate::lifecycle`] (`tx.rs`).
//! A task is durable once `enqueue` returns (committed with the server's
//! `synchronous_commit`).
//!
//! Round trips: `enqueue` is one statement (task row, its event and, when needed, the
//! announcement); a change is `BEGIN`, the locking read, one pipelined burst of writes (task
//! rows, attempt records, one multi-row event insert) and `COMMIT`.
//!
//! Stage timings (`record_worker_timings`, `merge_timings`) are diagnostics: their commit
//! does not wait for the WAL flush (see `write_timings`); task rows and events always do.
//!
//! Each committed change is announced with `pg_notify` on a channel named after the schema,
//! but only while another instance listens: every instance LISTENs on a connection named
//! `kiln_listen_<schema>` (`application_name`), and a write looks in `pg_stat_activity` for
//! such a connection other than its own instance's, in the same burst as its writes. A
//! notifying commit holds PostgreSQL's global notification lock until it is flushed, so
//! commits that notify cannot share a WAL flush; a lone instance never takes it. The listeners
//! turn what other instances did into [`Notification`]s (tasks ready, task events).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{NoTls, Row};

use crate::lifecycle::TaskEvent;
use crate::model::*;
use crate::queue::*;
use crate::store::{Columns, Dialect, Result, new_id, schema_sql};

mod batch;
mod listen;
mod outbox;
mod queue_impl;
mod retry;
mod tx;

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

const MAX_PAYLOAD: usize = 7000;

/// Whether a LISTEN connection of another instance on this schema exists: `$1` the
/// listeners' `application_name`, `$2` this instance's listener pid.
const OTHERS_LISTEN: &str =
    "EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $1 AND pid <> $2)";

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
    /// `application_name` of every instance's LISTEN connection on this schema.
    listener_name: String,
    /// Backend pid of this instance's LISTEN connection (0: not connected).
    listener_pid: Arc<AtomicI32>,
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

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn i(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

impl Columns for Row {
    fn text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> Result<Option<i64>> {
        Ok(if *self.columns()[i].type_() == Type::INT4 {
            self.try_get::<_, Option<i32>>(i)?.map(i64::from)
        } else {
            self.try_get(i)?
        })
    }
    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.try_get::<_, Option<bool>>(i)?.unwrap_or(false))
    }
    fn list(&self, i: usize) -> Result<Vec<String>> {
        Ok(self
            .try_get::<_, Option<Vec<String>>>(i)?
            .unwrap_or_default())
    }
}

fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
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
            let sql = schema_sql(Dialect::Postgres, &format!("{schema}."));
            tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema};\n{sql}"))
                .await?;
            tx.commit().await?;
        }
        let channel = format!("kiln_queue_{schema}");
        let (notes_tx, notes_rx) = mpsc::channel(4096);
        let instance = new_id("inst");
        let listener_pid = Arc::new(AtomicI32::new(0));
        let listener_name = listen::listener_name(&schema);
        let listener = tokio::spawn(listen::listen(
            pg,
            pool.clone(),
            schema.clone(),
            channel.clone(),
            instance.clone(),
            notes_tx,
            listener_pid.clone(),
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
            listener_name,
            listener_pid,
        })
    }

    /// Drops the schema and everything in it (tests clean up with this).
    pub async fn drop_schema(&self) -> Result<()> {
        let c = self.pool.get().await?;
        c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await?;
        Ok(())
    }

    /// The backend pid of this instance's listener (0: none), which [`OTHERS_LISTEN`] skips.
    fn own_listener(&self) -> i32 {
        self.listener_pid.load(Ordering::Relaxed)
    }

    fn sql(&self, template: &str) -> String {
        template.replace("{s}", &self.schema)
    }

    /// Runs a write of stage timings. Timings are diagnostics, so their commit does not wait
    /// for the WAL flush (`SET LOCAL synchronous_commit TO OFF`: this transaction only; tasks
    /// and their events are never written so). A crash of the server can lose the timings
    /// of the last moments; a kill of kiln loses nothing, the commit has happened.
    async fn write_timings(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let stmt = tx.prepare_cached(&self.sql(sql)).await?;
        let (_, rows) = futures_util::future::try_join(
            tx.batch_execute("SET LOCAL synchronous_commit TO OFF"),
            tx.query(&stmt, params),
        )
        .await?;
        tx.commit().await?;
        Ok(rows)
    }

    async fn read(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let c = self.pool.get().await?;
        let stmt = c.prepare_cached(&self.sql(sql)).await?;
        Ok(c.query(&stmt, params).await?)
    }
}
