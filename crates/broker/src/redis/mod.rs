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
//!   [`RedisOptions::notify_max_len`] entries.
//!
//! # Atomicity
//!
//! Each call is one run of a Lua script (`queue.lua`, sent with `EVALSHA` through
//! `redis::Script`, loaded again after a Redis restart). Redis runs a script to its end
//! before any other command, so reserve, renew, complete-by-lease (compare-and-set: only the
//! current lease of a running task counts, the first finisher wins), release, cancel and
//! sweep are atomic across every instance. Lua was chosen over `WATCH`/`MULTI` because a
//! reserve touches keys that are only known once it has read the streams, which a
//! transaction would have to watch up front and retry under contention. Ending an attempt
//! reads the task, lets the shared `Ending::decide` rules choose its new state, and hands
//! the script the fields that decision rests on (attempt, cancel requested): if another
//! instance changed them meanwhile the script writes nothing and the call decides again.
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

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use ::redis::{AsyncConnectionConfig, Client, Script, Value};
use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use serde::Deserialize;
use serde_json::Value as Json;

use crate::model::*;
use crate::queue::*;

type Result<T> = std::result::Result<T, QueueError>;

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
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("prefix", &self.opts.prefix)
            .finish_non_exhaustive()
    }
}

fn store(e: ::redis::RedisError) -> QueueError {
    if e.is_connection_refusal() || e.is_connection_dropped() || e.is_timeout() {
        QueueError::Unavailable(format!("redis: {e}"))
    } else {
        QueueError::Store(Box::new(e))
    }
}

fn corrupt(what: &str) -> QueueError {
    QueueError::Corrupt(format!("redis reply: {what}"))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(corrupt("expected an array")),
    }
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(n) => Ok(*n),
        other => text(other)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("expected an integer")),
    }
}

fn json_field(h: &HashMap<String, String>, k: &str) -> Result<Option<Json>> {
    h.get(k)
        .map(|s| serde_json::from_str(s).map_err(|e| QueueError::Corrupt(format!("{k}: {e}"))))
        .transpose()
}

fn num<T: std::str::FromStr>(h: &HashMap<String, String>, k: &str) -> Result<Option<T>> {
    h.get(k)
        .map(|s| {
            s.parse()
                .map_err(|_| QueueError::Corrupt(format!("{k} is not a number: {s:?}")))
        })
        .transpose()
}

/// A task from the flat field/value array of `HGETALL`; `None` when empty.
fn task_from(v: Value) -> Result<Option<Task>> {
    let items = array(v)?;
    if items.is_empty() {
        return Ok(None);
    }
    let mut h = HashMap::with_capacity(items.len() / 2);
    let mut it = items.iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Some(k), Some(v)) = (text(k), text(v)) {
            h.insert(k, v);
        }
    }
    let req = |k: &str| {
        h.get(k)
            .cloned()
            .ok_or_else(|| QueueError::Corrupt(format!("task without {k}")))
    };
    let state = req("state")?;
    Ok(Some(Task {
        id: req("id")?,
        request_id: h.get("request_id").cloned(),
        task_type: req("task_type")?,
        state: TaskState::parse(&state)
            .ok_or_else(|| QueueError::Corrupt(format!("unknown state {state:?}")))?,
        priority: num(&h, "priority")?.unwrap_or(0),
        input: json_field(&h, "input")?.unwrap_or(Json::Null),
        metadata: json_field(&h, "metadata")?,
        attempt: num(&h, "attempt")?.unwrap_or(0),
        max_attempts: num(&h, "max_attempts")?.unwrap_or(1),
        lease: h.get("lease").cloned(),
        worker_id: h.get("worker_id").cloned(),
        lease_expires_at: num(&h, "lease_expires_at")?,
        deadline: num(&h, "deadline")?,
        cancel_requested: h.get("cancel_requested").is_some_and(|v| v == "1"),
        output: json_field(&h, "output")?,
        error: json_field(&h, "error")?
            .map(serde_json::from_value::<TaskError>)
            .transpose()
            .map_err(|e| QueueError::Corrupt(format!("error: {e}")))?,
        progress: json_field(&h, "progress")?,
        dead_lettered: h.get("dead_lettered").is_some_and(|v| v == "1"),
        created_at: num(&h, "created_at")?.unwrap_or(0),
        started_at: num(&h, "started_at")?,
        completed_at: num(&h, "completed_at")?,
        seq: num(&h, "seq")?.unwrap_or(0),
        model: h.get("model").cloned(),
        labels: json_field(&h, "labels")?
            .map(serde_json::from_value::<Vec<String>>)
            .transpose()
            .map_err(|e| QueueError::Corrupt(format!("labels: {e}")))?
            .unwrap_or_default(),
    }))
}

fn need_task(v: Option<Value>) -> Result<Task> {
    task_from(v.ok_or_else(|| corrupt("missing task"))?)?.ok_or_else(|| corrupt("task vanished"))
}

fn tasks_from(v: Value) -> Result<Vec<Task>> {
    array(v)?
        .into_iter()
        .filter_map(|t| task_from(t).transpose())
        .collect()
}

fn event_from(s: &str) -> Result<TaskEvent> {
    serde_json::from_str(s).map_err(|e| QueueError::Corrupt(format!("event: {e}")))
}

/// The fields of one reply, in order.
struct Reply(std::vec::IntoIter<Value>);

impl Reply {
    fn next(&mut self) -> Option<Value> {
        self.0.next()
    }
    fn tag(&mut self) -> Result<String> {
        self.0
            .next()
            .as_ref()
            .and_then(text)
            .ok_or_else(|| corrupt("missing tag"))
    }
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
        };
        q.ping_now().await?;
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

    async fn get_task(&self, id: &str) -> Result<Option<Task>> {
        let mut conn = self.conn.clone();
        let v: Value = ::redis::cmd("HGETALL")
            .arg(self.key(&["task", id]))
            .query_async(&mut conn)
            .await
            .map_err(store)?;
        task_from(v)
    }

    async fn task_id_of_lease(&self, lease: &str) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        ::redis::cmd("HGET")
            .arg(self.key(&["leases"]))
            .arg(lease)
            .query_async(&mut conn)
            .await
            .map_err(store)
    }

    async fn enqueue_now(&self, mut t: NewTask, now: u64) -> Result<(Task, bool)> {
        if t.task_type.trim().is_empty() {
            return Err(QueueError::Invalid("task_type is empty".into()));
        }
        normalize_routing(&mut t)?;
        let id = format!("task_{}", uuid::Uuid::new_v4().simple());
        let max = t
            .max_attempts
            .unwrap_or(self.opts.queue.default_max_attempts)
            .max(1);
        let ttl = self.opts.request_id_ttl.as_millis().max(1) as u64;
        let args = vec![
            id,
            now.to_string(),
            t.task_type.clone(),
            t.priority.to_string(),
            t.input.to_string(),
            t.metadata.as_ref().map(Json::to_string).unwrap_or_default(),
            max.to_string(),
            t.deadline.map(|d| d.to_string()).unwrap_or_default(),
            t.request_id.clone().unwrap_or_default(),
            ttl.to_string(),
            t.model.clone().unwrap_or_default(),
            if t.labels.is_empty() {
                String::new()
            } else {
                serde_json::json!(t.labels).to_string()
            },
        ];
        let mut r = self.run("enqueue", args).await?;
        let tag = r.tag()?;
        let task = need_task(r.next())?;
        if tag == "exists" {
            if !same_request(&task, &t) {
                return Err(QueueError::Conflict(t.request_id.unwrap_or_default()));
            }
            return Ok((task, false));
        }
        Ok((task, true))
    }

    async fn end_attempt(
        &self,
        lease: &str,
        holder: Option<&str>,
        ending: Ending,
        now: u64,
    ) -> Result<CompleteOutcome> {
        // Optimistic: decide from a read, let the script check that the read still holds.
        for _ in 0..16 {
            let task = match self.task_id_of_lease(lease).await? {
                Some(id) => self.get_task(&id).await?,
                None => None,
            };
            let Some(task) = task else {
                return Ok(CompleteOutcome::unknown_lease());
            };
            if task.lease.as_deref() != Some(lease) {
                return Ok(CompleteOutcome::stale_lease());
            }
            if holder.is_some_and(|w| task.worker_id.as_deref() != Some(w)) {
                return Ok(CompleteOutcome::not_holder());
            }
            if task.state != TaskState::Running {
                return Ok(CompleteOutcome::not_running(task));
            }
            let d = ending.clone().decide(&task, &self.opts.queue, now);
            let err_json = d.error.as_ref().map(|e| serde_json::json!(e).to_string());
            let args = vec![
                lease.to_owned(),
                now.to_string(),
                if task.cancel_requested { "1" } else { "0" }.to_owned(),
                d.state.as_str().to_owned(),
                d.output.as_ref().map(Json::to_string).unwrap_or_default(),
                err_json.unwrap_or_default(),
                d.requeue_at.map(|t| t.to_string()).unwrap_or_default(),
                if d.dead { "1" } else { "0" }.to_owned(),
                d.error
                    .as_ref()
                    .map(|e| format!("{}: {}", e.code, e.message))
                    .unwrap_or_default(),
                task.attempt.to_string(),
                holder.unwrap_or_default().to_owned(),
            ];
            let mut r = self.run("finish", args).await?;
            match r.tag()?.as_str() {
                "ok" => {
                    return Ok(CompleteOutcome {
                        accepted: true,
                        reason: None,
                        task: Some(need_task(r.next())?),
                    });
                }
                "unknown" => return Ok(CompleteOutcome::unknown_lease()),
                "stale" => return Ok(CompleteOutcome::stale_lease()),
                "holder" => return Ok(CompleteOutcome::not_holder()),
                "state" => {
                    return Ok(CompleteOutcome::not_running(need_task(r.next())?));
                }
                _ => continue, // "retry": the task changed between the read and the script
            }
        }
        Err(QueueError::Unavailable(
            "the task kept changing while its result was stored".into(),
        ))
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

const STATES: [TaskState; 6] = [
    TaskState::Queued,
    TaskState::Running,
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Canceled,
    TaskState::Expired,
];

impl Queue for RedisQueue {
    fn enqueue(&self, task: NewTask, now: u64) -> QueueFuture<'_, (Task, bool)> {
        Box::pin(self.enqueue_now(task, now))
    }

    fn reserve<'a>(
        &'a self,
        worker_id: &'a str,
        caps: &'a Capabilities,
        n: usize,
        lease_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>> {
        Box::pin(async move {
            let set = |v: &'a [String]| {
                let mut v: Vec<&'a String> = v.iter().collect();
                v.sort();
                v.dedup();
                v
            };
            let (types, models, labels) =
                (set(&caps.task_types), set(&caps.models), set(&caps.labels));
            if n == 0 || types.is_empty() {
                return Ok(Vec::new());
            }
            let mut args = vec![
                worker_id.to_owned(),
                n.to_string(),
                lease_until.to_string(),
                now.to_string(),
                types.len().to_string(),
            ];
            args.extend(types.into_iter().cloned());
            args.push(models.len().to_string());
            args.extend(models.into_iter().cloned());
            args.push(labels.len().to_string());
            args.extend(labels.into_iter().cloned());
            args.extend((0..n).map(|_| format!("lease_{}", uuid::Uuid::new_v4().simple())));
            let mut r = self.run("reserve", args).await?;
            tasks_from(r.next().ok_or_else(|| corrupt("reserve"))?)
        })
    }

    fn renew<'a>(&'a self, worker_id: &'a str, until: u64) -> QueueFuture<'a, usize> {
        Box::pin(async move {
            let mut r = self
                .run("renew", vec![worker_id.to_owned(), until.to_string()])
                .await?;
            Ok(int(&r.next().ok_or_else(|| corrupt("renew"))?)? as usize)
        })
    }

    fn leases_of<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let mut r = self.run("leases", vec![worker_id.to_owned()]).await?;
            let flat = array(r.next().ok_or_else(|| corrupt("leases"))?)?;
            Ok(flat
                .chunks(2)
                .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
                .collect())
        })
    }

    fn progress<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        progress: Json,
        now: u64,
    ) -> QueueFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut r = self
                .run(
                    "progress",
                    vec![
                        lease.to_owned(),
                        progress.to_string(),
                        now.to_string(),
                        holder.unwrap_or_default().to_owned(),
                    ],
                )
                .await?;
            Ok(r.next().as_ref().and_then(text))
        })
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
        Box::pin(async move {
            let mut r = self
                .run(
                    "release",
                    vec![
                        lease.to_owned(),
                        why.to_owned(),
                        now.to_string(),
                        holder.unwrap_or_default().to_owned(),
                    ],
                )
                .await?;
            match r.next() {
                Some(v) => task_from(v),
                None => Ok(None),
            }
        })
    }

    fn reject<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        avoid_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>> {
        Box::pin(async move {
            let args = vec![
                lease.to_owned(),
                why.to_owned(),
                now.to_string(),
                avoid_until.to_string(),
                holder.unwrap_or_default().to_owned(),
            ];
            let mut r = self.run("reject", args).await?;
            match r.next() {
                Some(v) => task_from(v),
                None => Ok(None),
            }
        })
    }

    fn note_task_types<'a>(&'a self, task_types: &'a [String], now: u64) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut args = vec![now.to_string()];
            args.extend(task_types.iter().cloned());
            self.run("note_types", args).await.map(|_| ())
        })
    }

    fn task_types_seen(&self, since: u64) -> QueueFuture<'_, Vec<String>> {
        Box::pin(async move {
            let mut r = self.run("types_seen", vec![since.to_string()]).await?;
            let v = array(r.next().ok_or_else(|| corrupt("types_seen"))?)?;
            Ok(v.iter().filter_map(text).collect())
        })
    }

    fn record_assignment<'a>(
        &'a self,
        lease: &'a str,
        delivered: bool,
    ) -> QueueFuture<'a, Option<u32>> {
        Box::pin(async move {
            let failed = if delivered { "0" } else { "1" };
            let mut r = self
                .run("assignment", vec![lease.to_owned(), failed.to_owned()])
                .await?;
            let n = int(&r.next().ok_or_else(|| corrupt("assignment"))?)?;
            Ok(u32::try_from(n).ok())
        })
    }

    fn release_worker<'a>(
        &'a self,
        worker_id: &'a str,
        keep: &'a [String],
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>> {
        Box::pin(async move {
            // The kept leases follow the worker and the time.
            let mut args = vec![worker_id.to_owned(), now.to_string()];
            args.extend(keep.iter().cloned());
            let mut r = self.run("release_worker", args).await?;
            tasks_from(r.next().ok_or_else(|| corrupt("release_worker"))?)
        })
    }

    fn sweep(&self, now: u64) -> QueueFuture<'_, Sweep> {
        Box::pin(async move {
            let mut r = self.run("sweep", vec![now.to_string()]).await?;
            let changed = tasks_from(r.next().ok_or_else(|| corrupt("sweep"))?)?;
            let stop = array(r.next().ok_or_else(|| corrupt("sweep"))?)?
                .chunks(2)
                .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
                .collect();
            Ok(Sweep { changed, stop })
        })
    }

    fn cancel<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, CancelOutcome> {
        Box::pin(async move {
            let mut r = self
                .run("cancel", vec![id.to_owned(), now.to_string()])
                .await?;
            let tag = r.tag()?;
            if tag == "none" {
                return Ok(CancelOutcome::NotFound);
            }
            let t = need_task(r.next())?;
            Ok(match tag.as_str() {
                "canceled" => CancelOutcome::Canceled(t),
                "signal" => match (t.worker_id.clone(), t.lease.clone()) {
                    (Some(worker_id), Some(lease)) => CancelOutcome::SignalWorker {
                        task: t,
                        worker_id,
                        lease,
                    },
                    _ => CancelOutcome::AlreadyTerminal(t),
                },
                _ => CancelOutcome::AlreadyTerminal(t),
            })
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Task>> {
        Box::pin(self.get_task(id))
    }

    fn attempts<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Vec<AttemptRecord>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let raw: Vec<String> = ::redis::cmd("LRANGE")
                .arg(self.key(&["att", id]))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .map_err(store)?;
            raw.iter()
                .map(|s| {
                    let f: Vec<String> = serde_json::from_str(s)
                        .map_err(|e| QueueError::Corrupt(format!("attempt: {e}")))?;
                    let get = |i: usize| f.get(i).filter(|v| !v.is_empty()).cloned();
                    let n = |i: usize| get(i).and_then(|v| v.parse::<u64>().ok());
                    Ok(AttemptRecord {
                        attempt: n(0).unwrap_or(0) as u32,
                        worker_id: get(1).unwrap_or_default(),
                        lease: get(2).unwrap_or_default(),
                        started_at: n(3).unwrap_or(0),
                        ended_at: n(4),
                        error: get(5),
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
            let mut r = self.run("position", vec![task.id.clone()]).await?;
            match r.next() {
                Some(Value::Nil) | None => Ok(None),
                Some(v) => Ok(Some(int(&v)?.max(0) as u64)),
            }
        })
    }

    fn list<'a>(&'a self, filter: &'a ListFilter) -> QueueFuture<'a, Vec<Task>> {
        Box::pin(async move {
            let args = vec![
                filter
                    .state
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                filter.task_type.clone().unwrap_or_default(),
                filter.before_seq.map(|s| s.to_string()).unwrap_or_default(),
                filter.limit.clamp(1, 500).to_string(),
                LIST_SCAN_BUDGET.to_string(),
            ];
            let mut r = self.run("list", args).await?;
            tasks_from(r.next().ok_or_else(|| corrupt("list"))?)
        })
    }

    fn stats(&self) -> QueueFuture<'_, Stats> {
        Box::pin(async move {
            let mut pipe = ::redis::pipe();
            for s in STATES {
                pipe.cmd("HGETALL").arg(self.key(&["counts", s.as_str()]));
            }
            let mut conn = self.conn.clone();
            let per: Vec<HashMap<String, i64>> =
                pipe.query_async(&mut conn).await.map_err(store)?;
            let mut by_state_type = Vec::new();
            for (s, counts) in STATES.iter().zip(per) {
                let mut counts: Vec<(String, i64)> =
                    counts.into_iter().filter(|(_, n)| *n > 0).collect();
                counts.sort();
                by_state_type.extend(counts.into_iter().map(|(t, n)| (*s, t, n as u64)));
            }
            Ok(Stats { by_state_type })
        })
    }

    fn events_after<'a>(&'a self, task_id: &'a str, after: i64) -> QueueFuture<'a, Vec<TaskEvent>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let raw: Vec<String> = ::redis::cmd("LRANGE")
                .arg(self.key(&["ev", task_id]))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .map_err(store)?;
            let mut out = Vec::new();
            for s in &raw {
                let e = event_from(s)?;
                if e.id > after {
                    out.push(e);
                }
            }
            Ok(out)
        })
    }

    fn timings<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Json>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let h: HashMap<String, String> = ::redis::cmd("HGETALL")
                .arg(self.key(&["timings", id]))
                .query_async(&mut conn)
                .await
                .map_err(store)?;
            if h.is_empty() {
                return Ok(None);
            }
            let mut m = serde_json::Map::new();
            for (k, v) in h {
                let v = serde_json::from_str(&v)
                    .map_err(|e| QueueError::Corrupt(format!("timing {k}: {e}")))?;
                m.insert(k, v);
            }
            Ok(Some(Json::Object(m)))
        })
    }

    fn merge_timings<'a>(
        &'a self,
        id: &'a str,
        timings: &'a serde_json::Map<String, Json>,
    ) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            if timings.is_empty() {
                return Ok(());
            }
            let mut cmd = ::redis::cmd("HSET");
            cmd.arg(self.key(&["timings", id]));
            for (k, v) in timings {
                cmd.arg(k).arg(v.to_string());
            }
            let mut conn = self.conn.clone();
            let _: i64 = cmd.query_async(&mut conn).await.map_err(store)?;
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
            let data = serde_json::json!(timings).to_string();
            let holder = holder.unwrap_or_default().to_owned();
            let mut r = self
                .run("worker_timings", vec![lease.to_owned(), data, holder])
                .await?;
            Ok(int(&r.next().ok_or_else(|| corrupt("worker_timings"))?)? == 1)
        })
    }

    fn identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            ::redis::cmd("HGET")
                .arg(self.key(&["workers"]))
                .arg(worker_id)
                .query_async(&mut conn)
                .await
                .map_err(store)
        })
    }

    fn set_identity<'a>(
        &'a self,
        worker_id: &'a str,
        secret_sha256: &'a str,
        _now: u64,
    ) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            ::redis::cmd("HSETNX")
                .arg(self.key(&["workers"]))
                .arg(worker_id)
                .arg(secret_sha256)
                .query_async(&mut conn)
                .await
                .map_err(store)
        })
    }

    fn forget_identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let n: i64 = ::redis::cmd("HDEL")
                .arg(self.key(&["workers"]))
                .arg(worker_id)
                .query_async(&mut conn)
                .await
                .map_err(store)?;
            Ok(n == 1)
        })
    }

    fn ping(&self) -> QueueFuture<'_, ()> {
        Box::pin(self.ping_now())
    }

    fn take_events(&self) -> Vec<TaskEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn notifications(&self) -> Option<Notifications> {
        let reader = NotifyReader {
            client: self.client.clone(),
            stream: self.key(&["notify"]),
            origin: self.origin.clone(),
            block: self.opts.block,
            conn: None,
            last: None,
            pending: VecDeque::new(),
            failures: 0,
        };
        Some(Box::pin(futures_util::stream::unfold(
            reader,
            |mut r| async move {
                let n = r.next().await;
                Some((n, r))
            },
        )))
    }
}

/// Reads the notification stream on a dedicated connection with `XREAD BLOCK`.
struct NotifyReader {
    client: Client,
    stream: String,
    origin: String,
    block: Duration,
    conn: Option<MultiplexedConnection>,
    /// The last entry id seen; `None` before the first read (then: the newest entry).
    last: Option<String>,
    pending: VecDeque<Notification>,
    failures: u32,
}

impl NotifyReader {
    async fn next(&mut self) -> Notification {
        loop {
            if let Some(n) = self.pending.pop_front() {
                return n;
            }
            if let Err(e) = self.read().await {
                self.conn = None;
                self.failures += 1;
                let wait = Duration::from_millis(100 * u64::from(self.failures.min(50)));
                tracing::warn!(message = "redis notification reader failed", error = %e, retry_in_ms = wait.as_millis() as u64);
                tokio::time::sleep(wait).await;
                // Whatever was missed meanwhile: dispatch looks again.
                self.pending.push_back(Notification::TasksReady);
            }
        }
    }

    async fn read(&mut self) -> std::result::Result<(), ::redis::RedisError> {
        if self.conn.is_none() {
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(self.block + Duration::from_secs(5)));
            self.conn = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            );
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        if self.last.is_none() {
            // Start after the newest entry: changes from before this reader are in the store.
            let tail: Value = ::redis::cmd("XREVRANGE")
                .arg(&self.stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            self.last = Some(
                parse_entries(tail)
                    .first()
                    .map(|(id, _)| id.clone())
                    .unwrap_or_else(|| "0-0".into()),
            );
        }
        let from = self.last.clone().unwrap_or_else(|| "0-0".into());
        let v: Value = ::redis::cmd("XREAD")
            .arg("COUNT")
            .arg(500)
            .arg("BLOCK")
            .arg(self.block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(&from)
            .query_async(conn)
            .await?;
        self.failures = 0;
        let entries = parse_xread(v);
        let mut ready = false;
        for (id, fields) in entries {
            self.last = Some(id);
            if fields.get("o") == Some(&self.origin) {
                continue;
            }
            if fields.contains_key("r") {
                ready = true;
            }
            if let Some(e) = fields.get("e").and_then(|s| event_from(s).ok()) {
                self.pending.push_back(Notification::Event(e));
            }
        }
        if ready {
            self.pending.push_back(Notification::TasksReady);
        }
        Ok(())
    }
}

type Entry = (String, HashMap<String, String>);

fn parse_entries(v: Value) -> Vec<Entry> {
    let Ok(items) = array(v) else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|e| {
            let mut e = array(e).ok()?.into_iter();
            let id = text(&e.next()?)?;
            let flat = array(e.next()?).ok()?;
            let fields = flat
                .chunks(2)
                .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
                .collect();
            Some((id, fields))
        })
        .collect()
}

/// `XREAD` answers `[[stream, [entries]]]` (RESP2) or a map (RESP3); nil on timeout.
fn parse_xread(v: Value) -> Vec<Entry> {
    match v {
        Value::Map(m) => m
            .into_iter()
            .flat_map(|(_, entries)| parse_entries(entries))
            .collect(),
        other => array(other)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|s| {
                array(s)
                    .ok()
                    .and_then(|s| s.into_iter().nth(1))
                    .map(parse_entries)
                    .unwrap_or_default()
            })
            .collect(),
    }
}
