//! The `Queue` trait: the narrow contract every store backend implements (SQLite today;
//! PostgreSQL and others behind the same conformance suite).
//!
//! The trait is object safe so that `Broker` holds an `Arc<dyn Queue>`: every method returns a
//! boxed `Send` future. Times are Unix ms passed in by the caller, so backends never read the
//! clock and tests can drive time. Nothing here assumes that the worker session holding a
//! lease lives in this process: leases are rows keyed by lease id and worker id, renewed and
//! swept by whichever instance runs the call.

use std::future::Future;
use std::pin::Pin;

use futures_util::Stream;
use kiln_protocol::messages::TaskError;
use serde_json::Value;

use crate::lifecycle::Ending;
use crate::lifecycle::TaskEvent;
use crate::model::*;

/// The future a queue method returns.
pub type QueueFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, QueueError>> + Send + 'a>>;

/// A stream of changes made by other processes sharing the store.
pub type Notifications = Pin<Box<dyn Stream<Item = Notification> + Send>>;

/// A change another process made to the shared store.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Notification {
    /// Tasks became ready to run (enqueued, released or requeued): dispatch should look.
    TasksReady,
    /// A task event another process wrote; publish it to local subscribers.
    Event(TaskEvent),
}

/// What a sweep changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sweep {
    /// Tasks whose state changed.
    pub changed: Vec<Task>,
    /// `(worker_id, lease)` of expired running tasks whose workers should stop.
    pub stop: Vec<(String, String)>,
}

/// The error code of a task dead-lettered because its assignment kept failing on the
/// transport ([`Queue::assign_failed`]).
pub const ASSIGN_FAILED: &str = "assign_failed";

/// Store-wide settings every backend takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// Global webhook endpoints: each task change writes a message to every endpoint that
    /// lists its event type, in the change's transaction (see [`crate::outbox`]). On Redis
    /// the list is stored under the prefix when the store connects, so instances sharing a
    /// prefix should configure the same endpoints. Default: none.
    pub webhook_endpoints: Vec<crate::outbox::WebhookEndpoint>,
    /// Attempts for tasks that do not set their own. Default: 3.
    pub default_max_attempts: u32,
    /// A retryable failure waits this times 2^(attempt-1) before the task runs again.
    /// Default: 1000 ms.
    pub retry_base_ms: u64,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            default_max_attempts: 3,
            retry_base_ms: 1000,
            webhook_endpoints: Vec::new(),
        }
    }
}

impl QueueOptions {
    /// When a task that failed attempt `attempt` retryably may run again.
    pub fn retry_at(&self, attempt: u32, now: u64) -> u64 {
        now.saturating_add(
            self.retry_base_ms
                .saturating_mul(1 << attempt.saturating_sub(1).min(16)),
        )
    }
}

/// A durable task store with leases.
///
/// Contract (checked by the conformance suite in `tests/conformance`):
/// - `enqueue` is idempotent by `request_id`: the same key returns the stored task with
///   `false`; a key reused for another type, input, model or labels is
///   [`QueueError::Conflict`]; an empty model or label is [`QueueError::Invalid`]. A task is
///   durable when `enqueue` returns.
/// - `reserve` leases up to `n` queued tasks whose retry time has come and that the worker's
///   capabilities fit ([`serves`](crate::serves): its task types, the task's model if it
///   names one, all of the task's labels), highest priority then oldest first among those,
///   each with a fresh lease id and `attempt + 1`. Tasks that do not fit stay queued, in
///   their place, for a worker that fits.
/// - `complete`, `fail`, `dead_letter`, `release` and `progress` act only while the lease is
///   the task's current lease and the task runs (compare-and-set), and, when a `holder` is
///   given, only while that worker holds it (a worker's frames always name itself; `None`
///   is for the broker's own and operators' calls); otherwise they change nothing and say
///   why.
/// - `set_identity` stores a worker's secret hash only when none is stored;
///   `identity` reads it back; `forget_identity` removes it.
/// - Every state change appends a [`TaskEvent`] readable with `events_after`.
pub trait Queue: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a task, or returns the task already stored under its `request_id` (with
    /// `false`).
    fn enqueue(&self, task: NewTask, now: u64) -> QueueFuture<'_, (Task, bool)>;

    /// Stores many tasks in one transaction, each idempotent on its own `request_id` as with
    /// [`Queue::enqueue`] (a `request_id` repeated inside the batch names one task). Answers in
    /// the order given; `true`: created. Every store overrides this default, which only loops.
    fn enqueue_many(&self, tasks: Vec<NewTask>, now: u64) -> QueueFuture<'_, Vec<(Task, bool)>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(self.enqueue(t, now).await?);
            }
            Ok(out)
        })
    }

    /// Leases up to `n` queued tasks that `caps` fit to `worker_id` until `lease_until`.
    fn reserve<'a>(
        &'a self,
        worker_id: &'a str,
        caps: &'a Capabilities,
        n: usize,
        lease_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>>;

    /// Extends every lease `worker_id` holds to `until` (never shortens one). Returns how
    /// many leases it extended.
    fn renew<'a>(&'a self, worker_id: &'a str, until: u64) -> QueueFuture<'a, usize>;

    /// The leases `worker_id` holds: `(lease, task_id)`.
    fn leases_of<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Vec<(String, String)>>;

    /// Records progress of a running lease. Returns the task id; `None` when the lease is
    /// not current (or not `holder`'s).
    fn progress<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        progress: Value,
        now: u64,
    ) -> QueueFuture<'a, Option<String>>;

    /// Ends the attempt holding `lease` as `ending` says (compare-and-set on the lease and,
    /// when given, on the worker holding it: a lease of another worker is refused with
    /// [`CompleteOutcome::not_holder`]). The one method behind [`Queue::complete`],
    /// [`Queue::complete_as`], [`Queue::fail`] and [`Queue::dead_letter`].
    fn finish<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        ending: Ending,
        now: u64,
    ) -> QueueFuture<'a, CompleteOutcome>;

    /// Ends the attempt holding `lease`. A retryable error requeues the task after the
    /// store's backoff (see [`QueueOptions::retry_at`]) while attempts remain.
    fn complete<'a>(
        &'a self,
        lease: &'a str,
        completion: Completion,
        now: u64,
    ) -> QueueFuture<'a, CompleteOutcome> {
        self.finish(lease, None, Ending::Done(completion), now)
    }

    /// [`Queue::complete`] for a result sent by `worker_id`: refused unless that worker
    /// holds the lease.
    fn complete_as<'a>(
        &'a self,
        worker_id: &'a str,
        lease: &'a str,
        completion: Completion,
        now: u64,
    ) -> QueueFuture<'a, CompleteOutcome> {
        self.finish(lease, Some(worker_id), Ending::Done(completion), now)
    }

    /// Ends the attempt holding `lease` with `error`. A retryable error with attempts left
    /// (and no cancel requested) queues the task again, runnable from `retry_at`; otherwise
    /// the task fails (dead-lettered when the error was retryable).
    fn fail<'a>(
        &'a self,
        lease: &'a str,
        error: TaskError,
        retry_at: u64,
        now: u64,
    ) -> QueueFuture<'a, CompleteOutcome> {
        self.finish(lease, None, Ending::Fail { error, retry_at }, now)
    }

    /// Fails the attempt holding `lease` for good and marks the task dead-lettered,
    /// whatever attempts remain (a poison task).
    fn dead_letter<'a>(
        &'a self,
        lease: &'a str,
        error: TaskError,
        now: u64,
    ) -> QueueFuture<'a, CompleteOutcome> {
        self.finish(lease, None, Ending::Dead(error), now)
    }

    /// Gives a lease back: the task is queued again at once and the attempt does not count.
    /// `None` when the lease is not current (or not `holder`'s).
    fn release<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>>;

    /// Gives a lease back after its worker rejected the task retryably: like
    /// [`Queue::release`] (queued again at once, the attempt does not count), and
    /// `reserve` does not lease the task to the worker that held the lease until
    /// `avoid_until` (Unix ms); other workers may take it at once. `None` when the lease is
    /// not current (or not `holder`'s).
    fn reject<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        why: &'a str,
        avoid_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>>;

    /// Records that a worker serving `task_types` said hello at `now`, so that tasks of
    /// these types are accepted while no worker is connected (see
    /// [`Queue::task_types_seen`]).
    fn note_task_types<'a>(&'a self, task_types: &'a [String], now: u64) -> QueueFuture<'a, ()>;

    /// The task types some worker served (said hello with) at or after `since`, sorted.
    fn task_types_seen(&self, since: u64) -> QueueFuture<'_, Vec<String>>;
    /// Records how the assignment of `lease` went: `delivered == false` counts one more
    /// assignment that failed on the transport (the frame could not reach the worker),
    /// `true` resets the count (an `assign` carrying the lease was acknowledged). Returns
    /// the failures in a row after the call; `None` when `lease` is not the running
    /// attempt's.
    fn record_assignment<'a>(
        &'a self,
        lease: &'a str,
        delivered: bool,
    ) -> QueueFuture<'a, Option<u32>>;

    /// The assignment of `lease` failed on the transport (see [`Queue::record_assignment`]).
    /// Below `limit` failures in a row the task is queued again at once and the attempt
    /// does not count (as [`Queue::release`]; a task whose cancel was requested ends
    /// canceled); at `limit` it fails, dead-lettered, with error `assign_failed`. Returns
    /// the task after the call; `None` when `lease` is not current.
    fn assign_failed<'a>(
        &'a self,
        lease: &'a str,
        limit: u32,
        now: u64,
    ) -> QueueFuture<'a, Option<Task>> {
        Box::pin(async move {
            let Some(n) = self.record_assignment(lease, false).await? else {
                return Ok(None);
            };
            if n >= limit.max(1) {
                let error = TaskError {
                    code: ASSIGN_FAILED.into(),
                    message: format!(
                        "the assignment failed on the transport {n} times in a row (the frame \
                         was refused, or the connection dropped before the worker acknowledged it)"
                    ),
                    retryable: false,
                };
                return Ok(self.dead_letter(lease, error, now).await?.task);
            }
            let why = format!("assignment failed on the transport ({n} of {limit})");
            self.release(lease, None, &why, now).await
        })
    }

    /// Releases the leases of `worker_id` (its process restarted), except those named in
    /// `keep`: leases whose results the new process still holds in its outbox and is about
    /// to send. A kept lease stays current and untouched (its result is accepted as usual);
    /// a lease in `keep` that is not this worker's is ignored. Unlike [`Queue::release`]
    /// the attempts of the released leases count, as for a lapsed lease: a task whose
    /// attempts are spent fails dead-lettered, and each attempt record ends with the error
    /// `worker restarted`. Returns the released tasks.
    fn release_worker<'a>(
        &'a self,
        worker_id: &'a str,
        keep: &'a [String],
        now: u64,
    ) -> QueueFuture<'a, Vec<Task>>;

    /// Requeues (or cancels / dead-letters) lapsed leases and expires passed deadlines.
    fn sweep(&self, now: u64) -> QueueFuture<'_, Sweep>;

    /// Cancels a task: a queued one at once; a running one is marked and its worker must be
    /// told.
    fn cancel<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, CancelOutcome>;

    /// Queues a failed, expired or canceled task again as a new attempt of the same task,
    /// with `attempts` more attempts (`None`: the store's default), as
    /// [`lifecycle::retry`](crate::lifecycle::retry) decides; a queued, running or
    /// succeeded task is [`RetryOutcome::Refused`].
    fn retry<'a>(
        &'a self,
        id: &'a str,
        attempts: Option<u32>,
        now: u64,
    ) -> QueueFuture<'a, RetryOutcome>;

    /// A task by id.
    fn get<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Task>>;

    /// The attempts of a task, in order.
    fn attempts<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Vec<AttemptRecord>>;

    /// How many queued tasks of its type and model run before this one (0: next); `None`
    /// unless queued.
    fn queue_position<'a>(&'a self, task: &'a Task) -> QueueFuture<'a, Option<u64>>;

    /// Tasks, newest first.
    fn list<'a>(&'a self, filter: &'a ListFilter) -> QueueFuture<'a, Vec<Task>>;

    /// Counts by state and type.
    fn stats(&self) -> QueueFuture<'_, Stats>;

    /// Events of `task_id` after event id `after`, oldest first.
    fn events_after<'a>(&'a self, task_id: &'a str, after: i64) -> QueueFuture<'a, Vec<TaskEvent>>;

    /// Whether the store answers (readiness).
    fn ping(&self) -> QueueFuture<'_, ()>;

    /// Stage timings recorded for a task: a JSON object of `<stage>_ms` numbers, with the
    /// worker's own stages under `worker`. `None` when nothing was recorded.
    fn timings<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<Value>>;

    /// The task `id` with its attempts and recorded timings, read together: one call where
    /// the store can answer it at once (SQLite: one trip to its read connection), three
    /// otherwise. `None` when there is no such task.
    fn detail<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<TaskDetail>> {
        Box::pin(async move {
            let Some(task) = self.get(id).await? else {
                return Ok(None);
            };
            let attempts = self.attempts(id).await?;
            let timings = self.timings(id).await?;
            Ok(Some(TaskDetail::new(task, attempts, timings)))
        })
    }

    /// Sets the keys of `timings` (a JSON object) in the task's recorded timings, leaving
    /// the other keys as they are.
    fn merge_timings<'a>(
        &'a self,
        id: &'a str,
        timings: &'a serde_json::Map<String, Value>,
    ) -> QueueFuture<'a, ()>;

    /// Records the stages a worker sent with the result of `lease` as the task's `worker`
    /// timings (replacing an earlier attempt's). False, and nothing stored, when `lease` is
    /// not the running attempt's (or not `holder`'s).
    fn record_worker_timings<'a>(
        &'a self,
        lease: &'a str,
        holder: Option<&'a str>,
        timings: &'a std::collections::BTreeMap<String, u64>,
    ) -> QueueFuture<'a, bool>;

    /// The SHA-256 (lowercase hex) of the secret issued to `worker_id`, if one was.
    fn identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, Option<String>>;

    /// Stores `secret_sha256` as `worker_id`'s secret hash unless one is stored already.
    /// Returns whether it was stored (false: another registration stored one first).
    fn set_identity<'a>(
        &'a self,
        worker_id: &'a str,
        secret_sha256: &'a str,
        now: u64,
    ) -> QueueFuture<'a, bool>;

    /// Forgets `worker_id`'s secret, so that its next hello registers afresh. Returns
    /// whether one was stored.
    fn forget_identity<'a>(&'a self, worker_id: &'a str) -> QueueFuture<'a, bool>;

    /// Events written by this handle's calls since the last call, oldest first, committed
    /// only; the broker broadcasts them to local subscribers.
    fn take_events(&self) -> Vec<TaskEvent>;

    /// Changes made by other processes sharing the store, when the backend can push them
    /// (e.g. LISTEN/NOTIFY). `None`: nothing pushes, and the broker polls for ready tasks
    /// every sweep interval. Called once by the broker.
    fn notifications(&self) -> Option<Notifications> {
        None
    }

    /// The store's webhook outbox: the messages task changes wrote in their own
    /// transactions, and their delivery records (see [`crate::outbox`]).
    fn outbox(&self) -> &dyn crate::outbox::Outbox;
}
