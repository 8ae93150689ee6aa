//! The queue stores and what they share: the task row and its mapping to [`Task`], the SQL
//! schema (written once for both SQL dialects), ids and JSON columns. The rules of every
//! change live in [`crate::lifecycle`]; a store finds rows and persists transitions.

use std::collections::BTreeMap;

use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use serde_json::{Map, Value};

use crate::lifecycle::{Ending, TaskEvent, TaskEventKind};
use crate::model::*;
use crate::queue::{Notifications, Queue, QueueFuture, Sweep};

mod outbox;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
mod schema;
pub(crate) mod sqlite;

pub(crate) use schema::{Dialect, schema_sql};

pub(crate) type Result<T> = std::result::Result<T, QueueError>;

/// The task columns every read selects, in the order [`task_from_row`] reads them.
pub(crate) const COLUMNS: [&str; 26] = [
    "id",
    "request_id",
    "task_type",
    "state",
    "priority",
    "input",
    "metadata",
    "attempt",
    "max_attempts",
    "lease",
    "worker_id",
    "lease_expires_at",
    "deadline",
    "cancel_requested",
    "output",
    "error",
    "progress",
    "dead_lettered",
    "created_at",
    "started_at",
    "completed_at",
    "seq",
    "model",
    "labels",
    "webhook",
    "webhook_events",
];

/// `COLUMNS` joined for a `SELECT`.
pub(crate) fn cols() -> &'static str {
    static COLS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    COLS.get_or_init(|| COLUMNS.join(", "))
}

/// A fresh id: `prefix` + `_` + 32 hex digits.
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

pub(crate) fn corrupt(e: impl std::fmt::Display) -> QueueError {
    QueueError::Corrupt(e.to_string())
}

/// A JSON column.
pub(crate) fn parse_json(s: Option<String>) -> Result<Option<Value>> {
    s.map(|s| serde_json::from_str(&s).map_err(corrupt))
        .transpose()
}

/// The stored text of an optional JSON value.
pub(crate) fn json_text<T: serde::Serialize>(v: Option<&T>) -> Option<String> {
    v.and_then(|v| serde_json::to_string(v).ok())
}

/// One stored row as a store reads it: cells by position in [`COLUMNS`].
pub(crate) trait Columns {
    /// A text cell (`None`: NULL or absent).
    fn text(&self, i: usize) -> Result<Option<String>>;
    /// An integer cell.
    fn int(&self, i: usize) -> Result<Option<i64>>;
    /// A boolean cell (absent: false).
    fn flag(&self, i: usize) -> Result<bool>;
    /// A list of strings (absent: empty).
    fn list(&self, i: usize) -> Result<Vec<String>>;
}

/// The task a row holds.
pub(crate) fn task_from_row(r: &impl Columns) -> Result<Task> {
    let need = |i: usize| {
        r.text(i)?
            .ok_or_else(|| corrupt(format!("task without {}", COLUMNS[i])))
    };
    let time = |i: usize| Ok::<_, QueueError>(r.int(i)?.map(|v| v.max(0) as u64));
    let count = |i: usize| Ok::<_, QueueError>(r.int(i)?.map(|v| v.max(0) as u32));
    let state = need(3)?;
    Ok(Task {
        id: need(0)?,
        request_id: r.text(1)?,
        task_type: need(2)?,
        state: TaskState::parse(&state)
            .ok_or_else(|| corrupt(format!("unknown state {state:?}")))?,
        priority: r.int(4)?.unwrap_or(0) as i32,
        input: parse_json(r.text(5)?)?.unwrap_or(Value::Null),
        metadata: parse_json(r.text(6)?)?,
        attempt: count(7)?.unwrap_or(0),
        max_attempts: count(8)?.unwrap_or(1),
        lease: r.text(9)?,
        worker_id: r.text(10)?,
        lease_expires_at: time(11)?,
        deadline: time(12)?,
        cancel_requested: r.flag(13)?,
        output: parse_json(r.text(14)?)?,
        error: parse_json(r.text(15)?)?
            .map(serde_json::from_value::<TaskError>)
            .transpose()
            .map_err(corrupt)?,
        progress: parse_json(r.text(16)?)?,
        dead_lettered: r.flag(17)?,
        created_at: time(18)?.unwrap_or(0),
        started_at: time(19)?,
        completed_at: time(20)?,
        seq: r.int(21)?.unwrap_or(0),
        model: r.text(22)?,
        labels: r.list(23)?,
        webhook: r.text(24)?,
        webhook_events: r.list(25)?,
    })
}

/// An event row: `kind` and `data` as stored.
pub(crate) fn event_from_row(
    id: i64,
    task_id: String,
    kind: &str,
    data: &str,
    ts: u64,
) -> Result<TaskEvent> {
    let data = serde_json::from_str(data).map_err(corrupt)?;
    Ok(TaskEvent {
        id,
        task_id,
        kind: TaskEventKind::from_parts(kind, data)?,
        ts,
    })
}

/// Whether `holder` (any worker when `None`) holds the lease `t` runs under.
pub(crate) fn holds(t: &Task, holder: Option<&str>) -> bool {
    holder.is_none_or(|w| t.worker_id.as_deref() == Some(w))
}

/// The answer to a cancel that changed `after`: canceled at once, or the worker to tell.
pub(crate) fn cancel_outcome(after: Task) -> CancelOutcome {
    if after.state.is_terminal() {
        return CancelOutcome::Canceled(after);
    }
    match (after.worker_id.clone(), after.lease.clone()) {
        (Some(worker_id), Some(lease)) => CancelOutcome::SignalWorker {
            task: after,
            worker_id,
            lease,
        },
        _ => CancelOutcome::AlreadyTerminal(after),
    }
}

/// A lease named by a call, and the worker that must hold it (`None`: any).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lease<'a> {
    pub(crate) lease: &'a str,
    pub(crate) holder: Option<&'a str>,
}

/// What a `reserve` asks for: up to `n` tasks that `caps` fit, leased to `worker_id` until
/// `lease_until`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Want<'a> {
    pub(crate) worker_id: &'a str,
    pub(crate) caps: &'a Capabilities,
    pub(crate) n: usize,
    pub(crate) lease_until: u64,
}

/// A worker's stage timings.
pub(crate) type Stages = BTreeMap<String, u64>;

/// What a store implements: [`Queue`](crate::Queue)'s methods as plain `async fn`s. The one
/// `impl Queue` below boxes their futures, so that the trait object stays the contract and
/// each store writes only its bodies.
pub(crate) trait Store: Send + Sync + std::fmt::Debug + 'static {
    fn enqueue(&self, t: NewTask, now: u64) -> impl Future<Output = Result<(Task, bool)>> + Send;
    /// Default: one `enqueue` after the other.
    fn enqueue_many(
        &self,
        tasks: Vec<NewTask>,
        now: u64,
    ) -> impl Future<Output = Result<Vec<(Task, bool)>>> + Send {
        async move {
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(self.enqueue(t, now).await?);
            }
            Ok(out)
        }
    }
    /// Never called for `n == 0` or a worker serving no type.
    fn reserve(&self, want: Want<'_>, now: u64) -> impl Future<Output = Result<Vec<Task>>> + Send;
    fn renew(&self, worker_id: &str, until: u64) -> impl Future<Output = Result<usize>> + Send;
    fn leases_of(
        &self,
        worker_id: &str,
    ) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;
    fn progress(
        &self,
        l: Lease<'_>,
        progress: Value,
        now: u64,
    ) -> impl Future<Output = Result<Option<String>>> + Send;
    fn finish(
        &self,
        l: Lease<'_>,
        ending: Ending,
        now: u64,
    ) -> impl Future<Output = Result<CompleteOutcome>> + Send;
    fn release(
        &self,
        l: Lease<'_>,
        why: &str,
        now: u64,
    ) -> impl Future<Output = Result<Option<Task>>> + Send;
    fn reject(
        &self,
        l: Lease<'_>,
        why: &str,
        until: u64,
        now: u64,
    ) -> impl Future<Output = Result<Option<Task>>> + Send;
    fn note_task_types(
        &self,
        types: &[String],
        now: u64,
    ) -> impl Future<Output = Result<()>> + Send;
    fn task_types_seen(&self, since: u64) -> impl Future<Output = Result<Vec<String>>> + Send;
    fn record_assignment(
        &self,
        lease: &str,
        delivered: bool,
    ) -> impl Future<Output = Result<Option<u32>>> + Send;
    fn release_worker(
        &self,
        worker_id: &str,
        keep: &[String],
        now: u64,
    ) -> impl Future<Output = Result<Vec<Task>>> + Send;
    fn sweep(&self, now: u64) -> impl Future<Output = Result<Sweep>> + Send;
    fn cancel(&self, id: &str, now: u64) -> impl Future<Output = Result<CancelOutcome>> + Send;
    fn retry(
        &self,
        id: &str,
        attempts: Option<u32>,
        now: u64,
    ) -> impl Future<Output = Result<RetryOutcome>> + Send;
    fn get(&self, id: &str) -> impl Future<Output = Result<Option<Task>>> + Send;
    fn attempts(&self, id: &str) -> impl Future<Output = Result<Vec<AttemptRecord>>> + Send;
    fn queue_position(&self, task: &Task) -> impl Future<Output = Result<Option<u64>>> + Send;
    fn list(&self, filter: &ListFilter) -> impl Future<Output = Result<Vec<Task>>> + Send;
    fn stats(&self) -> impl Future<Output = Result<Stats>> + Send;
    fn events_after(
        &self,
        task_id: &str,
        after: i64,
    ) -> impl Future<Output = Result<Vec<TaskEvent>>> + Send;
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
    fn timings(&self, id: &str) -> impl Future<Output = Result<Option<Value>>> + Send;
    /// Default: three reads.
    fn detail(&self, id: &str) -> impl Future<Output = Result<Option<TaskDetail>>> + Send {
        async move {
            let Some(task) = self.get(id).await? else {
                return Ok(None);
            };
            let attempts = self.attempts(id).await?;
            let timings = self.timings(id).await?;
            Ok(Some(TaskDetail::new(task, attempts, timings)))
        }
    }
    fn merge_timings(
        &self,
        id: &str,
        timings: &Map<String, Value>,
    ) -> impl Future<Output = Result<()>> + Send;
    fn record_worker_timings(
        &self,
        l: Lease<'_>,
        timings: &Stages,
    ) -> impl Future<Output = Result<bool>> + Send;
    fn identity(&self, worker_id: &str) -> impl Future<Output = Result<Option<String>>> + Send;
    fn set_identity(
        &self,
        worker_id: &str,
        secret_sha256: &str,
        now: u64,
    ) -> impl Future<Output = Result<bool>> + Send;
    fn forget_identity(&self, worker_id: &str) -> impl Future<Output = Result<bool>> + Send;
    fn take_events(&self) -> Vec<TaskEvent>;
    /// The webhook outbox (the store itself).
    fn outbox(&self) -> &dyn crate::outbox::Outbox;
    /// Default: nothing pushes.
    fn notifications(&self) -> Option<Notifications> {
        None
    }
}

impl<S: Store> Queue for S {
    fn enqueue(&self, task: NewTask, now: u64) -> QueueFuture<'_, (Task, bool)> {
        Box::pin(Store::enqueue(self, task, now))
    }
    fn enqueue_many(&self, tasks: Vec<NewTask>, now: u64) -> QueueFuture<'_, Vec<(Task, bool)>> {
        Box::pin(Store::enqueue_many(self, tasks, now))
    }
    fn reserve<'a>(
        &'a self,
        worker_id: &'a str,
        caps: &'a Capabilities,
        n: usize,
        lease_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>> {
        if n == 0 || caps.task_types.is_empty() {
            return Box::pin(async { Ok(Vec::new()) });
        }
        let want = Want {
            worker_id,
            caps,
            n,
            lease_until,
        };
        Box::pin(Store::reserve(self, want, now))
    }
    fn renew<'a>(&'a self, worker_id: &'a str, until: u64) -> QueueFuture<'a, usize> {
        Box::pin(Store::renew(self, worker_id, until))
    }
    fn leases_of<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Vec<(String, String)>> {
        Box::pin(Store::leases_of(self, worker_id))
    }
    fn progress<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        progress: Value,
        now: u64,
    ) -> QueueFuture<'a, Option<String>> {
        Box::pin(Store::progress(
            self,
            Lease { lease, holder },
            progress,
            now,
        ))
    }
    fn finish<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        ending: Ending,
        now: u64,
    ) -> QueueFuture<'a, CompleteOutcome> {
        Box::pin(Store::finish(self, Lease { lease, holder }, ending, now))
    }
    fn release<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>> {
        Box::pin(Store::release(self, Lease { lease, holder }, why, now))
    }
    fn reject<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        avoid_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>> {
        let l = Lease { lease, holder };
        Box::pin(Store::reject(self, l, why, avoid_until, now))
    }
    fn note_task_types<'a>(&'a self, task_types: &'a [String], now: u64) -> QueueFuture<'a, ()> {
        Box::pin(Store::note_task_types(self, task_types, now))
    }
    fn task_types_seen(&self, since: u64) -> QueueFuture<'_, Vec<String>> {
        Box::pin(Store::task_types_seen(self, since))
    }
    fn record_assignment<'a>(
        &'a self,
        lease: &'a str,
        delivered: bool,
    ) -> QueueFuture<'a, Option<u32>> {
        Box::pin(Store::record_assignment(self, lease, delivered))
    }
    fn release_worker<'a>(
        &'a self,
        worker_id: &'a str,
        keep: &'a [String],
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>> {
        Box::pin(Store::release_worker(self, worker_id, keep, now))
    }
    fn sweep(&self, now: u64) -> QueueFuture<'_, Sweep> {
        Box::pin(Store::sweep(self, now))
    }
    fn cancel<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, CancelOutcome> {
        Box::pin(Store::cancel(self, id, now))
    }
    fn retry<'a>(
        &'a self,
        id: &'a str,
        attempts: Option<u32>,
        now: u64,
    ) -> QueueFuture<'a, RetryOutcome> {
        Box::pin(Store::retry(self, id, attempts, now))
    }
    fn get<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Task>> {
        Box::pin(Store::get(self, id))
    }
    fn attempts<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Vec<AttemptRecord>> {
        Box::pin(Store::attempts(self, id))
    }
    fn queue_position<'a>(&'a self, task: &'a Task) -> QueueFuture<'a, Option<u64>> {
        Box::pin(Store::queue_position(self, task))
    }
    fn list<'a>(&'a self, filter: &'a ListFilter) -> QueueFuture<'a, Vec<Task>> {
        Box::pin(Store::list(self, filter))
    }
    fn stats(&self) -> QueueFuture<'_, Stats> {
        Box::pin(Store::stats(self))
    }
    fn events_after<'a>(&'a self, task_id: &'a str, after: i64) -> QueueFuture<'a, Vec<TaskEvent>> {
        Box::pin(Store::events_after(self, task_id, after))
    }
    fn ping(&self) -> QueueFuture<'_, ()> {
        Box::pin(Store::ping(self))
    }
    fn timings<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Value>> {
        Box::pin(Store::timings(self, id))
    }
    fn detail<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<TaskDetail>> {
        Box::pin(Store::detail(self, id))
    }
    fn merge_timings<'a>(
        &'a self,
        id: &'a str,
        timings: &'a Map<String, Value>,
    ) -> QueueFuture<'a, ()> {
        Box::pin(Store::merge_timings(self, id, timings))
    }
    fn record_worker_timings<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        timings: &'a BTreeMap<String, u64>,
    ) -> QueueFuture<'a, bool> {
        Box::pin(Store::record_worker_timings(
            self,
            Lease { lease, holder },
            timings,
        ))
    }
    fn identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Option<String>> {
        Box::pin(Store::identity(self, worker_id))
    }
    fn set_identity<'a>(
        &'a self,
        worker_id: &'a str,
        secret_sha256: &'a str,
        now: u64,
    ) -> QueueFuture<'a, bool> {
        Box::pin(Store::set_identity(self, worker_id, secret_sha256, now))
    }
    fn forget_identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, bool> {
        Box::pin(Store::forget_identity(self, worker_id))
    }
    fn take_events(&self) -> Vec<TaskEvent> {
        Store::take_events(self)
    }
    fn notifications(&self) -> Option<Notifications> {
        Store::notifications(self)
    }
    fn outbox(&self) -> &dyn crate::outbox::Outbox {
        Store::outbox(self)
    }
}
