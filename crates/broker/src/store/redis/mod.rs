//! The Redis Streams queue store (feature `redis`): several gateway instances can share one
//! Redis, and each sees the tasks, leases and events of the others.
//!
//! # Layout (every key starts with [`RedisOptions::prefix`])
//!
//! - `task:{id}` — a hash per task (the [`Task`] fields; JSON fields as JSON text).
//! - `q:{type}:{priority}` — the ready queue: one stream per task type and priority level,
//!   read through the consumer group `kiln` with the worker id as consumer name. `reserve`
//!   delivers entries with `XREADGROUP` (highest priority first, then oldest across the
//!   requested types), so a running task's entry sits in the group's pending list under its
//!   worker. When the attempt ends the entry is acknowledged and deleted (`XACK` + `XDEL`);
//!   a task that goes back to the queue gets a new entry at the back of its level.
//!   `prios:{type}` lists the levels, `cursor` mirrors the group's last delivered id.
//! - `rq:{route}:{priority}` — the ready streams of tasks that name a model or labels: one
//!   route per (type, model, labels), `route` the SHA-1 of the three, levels in
//!   `rprios:{route}`, and `routes:{type}` maps each route to its model and labels. A
//!   reserve reads only the streams of routes the worker fits (see [`crate::serves`]), so
//!   every entry it reads is one it may run and nothing is skipped or put back.
//! - `running` (lease expiry), `deadlines`, `delayed` (retry times) — sorted sets by Unix ms;
//!   `worker:{id}` — the tasks a worker holds; `leases` — lease id to task id.
//! - `att:{id}` — the attempts; `ev:{id}` — the task's events, ids from `evseq`;
//!   `timings:{id}` — stage timings, one JSON value per key (merged key by key);
//!   `counts:{state}` — tasks per type; `all` — every task by `seq` (for listing).
//! - `rid:{request_id}` — the idempotency key, written with `SET NX` and a TTL
//!   ([`RedisOptions::request_id_ttl`]): a resubmission after the TTL creates a new task.
//! - `dead` — the dead-letter stream: one entry per task failed for good after a retryable
//!   error (attempts spent, lapsed leases, poison tasks).
//! - `notify` — changes for other processes (task events, "tasks ready"), capped near
//!   [`RedisOptions::notify_max_len`] entries, and written only while another process reads
//!   it: each reader adds its origin to `readers` and keeps `reader:{origin}` alive (a key
//!   with a TTL of three blocking reads, renewed as it reads); a lone instance writes none.
//!
//! # Atomicity
//!
//! Each call is one run of a Lua script (`queue.lua`, sent with `EVALSHA` through
//! `redis::Script`, loaded again after a Redis restart). Redis runs a script to its end
//! before any other command, so reserve, renew, complete-by-lease (compare-and-set: only the
//! current lease of a running task counts, the first finisher wins), release, cancel and
//! sweep are atomic across every instance. Lua was chosen over `WATCH`/`MULTI` because a
//! reserve touches keys that are only known once it has read the streams, which a
//! transaction would have to watch up front and retry under contention. The script decides
//! no state itself: a change reads the task, lets [`crate::lifecycle`] decide the
//! transition, and hands the script that transition with the fields it rests on (state,
//! lease, attempt, cancel requested); if another instance changed them meanwhile the script
//! writes nothing and the call decides again (`change.rs`). Only `reserve` changes tasks in
//! the script, mirroring `lifecycle::claim`.
//! Redis does not roll a script back on error, so arguments are validated before the call.
//! Scripts compute key names from the prefix, so all keys must live on one Redis (no
//! cluster).
//!
//! # Time
//!
//! Leases expire by the times the caller passes (the [`Queue`] contract: backends never read
//! the clock), kept in the `running` sorted set. The pending list's idle time, which Redis
//! measures on its own clock, is therefore not what decides that a lease lapsed; `renew`
//! still re-claims the worker's own entries (`XCLAIM ... JUSTID`) so that `XPENDING` shows
//! live work as fresh. `renew` returns how many leases it extended. `sweep` takes lapsed leases from `running` and puts their tasks back
//! (or fails them past their attempts, into `dead`).
//!
//! # Connections
//!
//! Commands share one multiplexed, auto-reconnecting connection
//! (`redis::aio::ConnectionManager`). The [`Queue::notifications`] reader blocks in
//! `XREAD BLOCK` on a connection of its own, never on the shared one (a blocking read on a
//! multiplexed connection stalls every command behind it), and resumes after the last entry
//! it saw when it reconnects.
//!
//! # Durability
//!
//! A task is stored in Redis's memory when `enqueue` returns. What survives a crash of Redis
//! itself is decided by Redis's persistence settings, not by kiln: with `appendonly yes` and
//! `appendfsync always` an acknowledged write survives; with `appendfsync everysec` (Redis's
//! default when AOF is on) up to about a second of writes can be lost; with AOF off (Redis's
//! default) everything since the last RDB snapshot is lost. A kill -9 of a kiln process loses
//! nothing: the state lives in Redis.

use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script, Value};
use kiln_protocol::TaskState;
use serde::Deserialize;

use crate::lifecycle::TaskEvent;
use crate::model::*;
use crate::queue::*;
use crate::store::Result;

mod batch;
mod change;
mod notify;
mod outbox;
mod queue_impl;
mod reply;

use reply::{Reply, array, event_from, task_from, text};

const SCRIPT: &str = include_str!("queue.lua");

/// How many tasks a filtered `list` looks at, newest first, before it returns what it found.
const LIST_SCAN_BUDGET: usize = 50_000;

/// Settings of the Redis store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisOptions {
    /// Server URL (`redis://host:port/db`, credentials allowed). Default:
    /// `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every key, so that several queues (or tests) share one Redis.
    /// Default: `kiln:`.
    pub prefix: String,
    /// How long a `request_id` dedupes resubmissions. Default: 24 h.
    #[serde(with = "humantime_serde")]
    pub request_id_ttl: Duration,
    /// Time limit of one command. Default: 5 s.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long the notification reader blocks in one `XREAD`. Default: 5 s.
    #[serde(with = "humantime_serde")]
    pub block: Duration,
    /// Approximate number of entries kept in the notification and dead-letter streams.
    /// Default: 100000.
    pub notify_max_len: usize,
    /// Attempts and retry backoff (set by the broker's config, not read from a file).
    #[serde(skip)]
    pub queue: QueueOptions,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "kiln:".into(),
            request_id_ttl: Duration::from_secs(24 * 3600),
            response_timeout: Duration::from_secs(5),
            block: Duration::from_secs(5),
            notify_max_len: 100_000,
            queue: QueueOptions::default(),
        }
    }
}

/// The Redis Streams queue store. Implements [`Queue`].
pub struct RedisQueue {
    client: Client,
    conn: ConnectionManager,
    script: Script,
    opts: RedisOptions,
    /// Tells this handle's notifications from other processes'.
    origin: String,
    /// Events written by this handle's calls, not yet taken by the broker.
    events: Mutex<Vec<TaskEvent>>,
    /// The tasks this handle leased, as leased, by lease: a result decides from this copy
    /// and skips reading the task (the script's compare-and-set on state, lease, attempt and
    /// cancel request catches any change meanwhile, and the call then reads and decides
    /// again). At most [`LEASED_MAX`] entries.
    leased: Mutex<std::collections::HashMap<String, Task>>,
}

/// Most leased tasks a handle remembers (see `RedisQueue::leased`); beyond, it forgets all.
const LEASED_MAX: usize = 10_000;

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("prefix", &self.opts.prefix)
            .finish_non_exhaustive()
    }
}

pub(super) fn store(e: ::redis::RedisError) -> QueueError {
    if e.is_connection_refusal() || e.is_connection_dropped() || e.is_timeout() {
        QueueError::Unavailable(format!("redis: {e}"))
    } else {
        QueueError::Store(Box::new(e))
    }
}

pub(super) fn corrupt(what: &str) -> QueueError {
    QueueError::Corrupt(format!("redis reply: {what}"))
}

impl RedisQueue {
    /// Connects to the Redis at `opts.url` (and checks that it answers).
    pub async fn connect(opts: RedisOptions) -> Result<Self> {
        if opts.prefix.is_empty() {
            return Err(QueueError::Invalid(
                "the Redis key prefix must not be empty".into(),
            ));
        }
        let client = Client::open(opts.url.as_str())
            .map_err(|e| QueueError::Invalid(format!("redis url: {e}")))?;
        let cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(opts.response_timeout))
            .set_connection_timeout(Some(opts.response_timeout))
            .set_number_of_retries(2);
        let conn = client
            .get_connection_manager_with_config(cfg)
            .await
            .map_err(store)?;
        let q = Self {
            client,
            conn,
            script: Script::new(SCRIPT),
            opts: RedisOptions {
                queue: QueueOptions {
                    default_max_attempts: opts.queue.default_max_attempts.max(1),
                    ..opts.queue.clone()
                },
                ..opts
            },
            origin: format!("{}", uuid::Uuid::new_v4().simple()),
            events: Mutex::new(Vec::new()),
            leased: Mutex::new(std::collections::HashMap::new()),
        };
        q.ping_now().await?;
        q.store_endpoints().await?;
        Ok(q)
    }

    /// The settings in use.
    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// Deletes every key under this queue's prefix (`SCAN` + `DEL`) and returns how many it
    /// deleted. For tests and for retiring a queue; tasks are gone for good.
    pub async fn delete_all(&self) -> Result<u64> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", glob_escape(&self.opts.prefix));
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(store)?;
            if !keys.is_empty() {
                let n: u64 = ::redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .map_err(store)?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    async fn ping_now(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let _: String = ::redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(store)?;
        Ok(())
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.opts.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    /// Runs one operation of the script; the events it wrote are kept for `take_events`.
    async fn run(&self, op: &str, args: Vec<String>) -> Result<Reply> {
        let mut inv = self.script.prepare_invoke();
        inv.key(&self.opts.prefix)
            .arg(op)
            .arg(&self.origin)
            .arg(self.opts.notify_max_len);
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        let v: Value = inv.invoke_async(&mut conn).await.map_err(store)?;
        let mut items = array(v)?.into_iter();
        let evs = items.next().ok_or_else(|| corrupt("empty reply"))?;
        let evs = array(evs)?
            .iter()
            .map(|e| event_from(&text(e).ok_or_else(|| corrupt("event"))?))
            .collect::<Result<Vec<_>>>()?;
        if !evs.is_empty() {
            self.events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(evs);
        }
        Ok(Reply(items))
    }

    /// Remembers tasks just leased (see `leased`).
    fn remember(&self, tasks: &[Task]) {
        let mut m = self.leased.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() + tasks.len() > LEASED_MAX {
            m.clear();
        }
        for t in tasks {
            if let Some(l) = &t.lease {
                m.insert(l.clone(), t.clone());
            }
        }
    }

    /// The task as leased under `lease`, if this handle leased it (and forgets it).
    fn recall(&self, lease: &str) -> Option<Task> {
        self.leased
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(lease)
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let mut conn = self.conn.clone();
        let v: Value = ::redis::cmd("HGETALL")
            .arg(self.key(&["task", id]))
            .query_async(&mut conn)
            .await
            .map_err(store)?;
        task_from(v)
    }
}

/// Escapes the glob characters of a `SCAN MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

const STATES: [TaskState; 6] = TaskState::ALL;
