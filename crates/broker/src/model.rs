//! The records the queue stores and returns.

use kiln_protocol::TaskState;
pub use kiln_protocol::messages::Capabilities;
use kiln_protocol::messages::TaskError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A task to enqueue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    /// Task type, e.g. `txt2img`; routes the task to workers that serve it.
    pub task_type: String,
    /// The input handed to the worker.
    pub input: Value,
    /// Idempotency key: the same key returns the same task.
    pub request_id: Option<String>,
    /// Higher runs first; equal priorities run oldest first.
    pub priority: i32,
    /// Absolute deadline, Unix ms: past it the task expires.
    pub deadline: Option<u64>,
    /// Free-form client metadata, returned as given.
    pub metadata: Option<Value>,
    /// Attempts before the task is dead-lettered; `None` uses the broker's default.
    pub max_attempts: Option<u32>,
    /// The model the task needs: only a worker listing it in its `models` capability runs
    /// the task. `None`: any worker serving the type.
    #[serde(default)]
    pub model: Option<String>,
    /// Labels the worker must have, every one of them (e.g. `gpu=a100`). Stored sorted,
    /// without duplicates.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Where the task's webhook messages go (an absolute http(s) URL), if anywhere.
    #[serde(default)]
    pub webhook: Option<String>,
    /// The events the webhook receives: `started`, `progress`, `completed`. Empty with a
    /// `webhook`: `["completed"]`.
    #[serde(default)]
    pub webhook_events: Vec<String>,
}

/// A stored task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Task {
    /// `task_` + 32 hex digits.
    pub id: String,
    /// The client's idempotency key.
    pub request_id: Option<String>,
    /// Task type.
    pub task_type: String,
    /// Current state.
    pub state: TaskState,
    /// Priority.
    pub priority: i32,
    /// Input.
    pub input: Value,
    /// Client metadata.
    pub metadata: Option<Value>,
    /// Attempts started so far.
    pub attempt: u32,
    /// Attempt limit.
    pub max_attempts: u32,
    /// Lease of the running attempt.
    pub lease: Option<String>,
    /// Worker holding the lease.
    pub worker_id: Option<String>,
    /// When the lease lapses, Unix ms.
    pub lease_expires_at: Option<u64>,
    /// Deadline, Unix ms.
    pub deadline: Option<u64>,
    /// A cancel was requested while the task ran.
    pub cancel_requested: bool,
    /// Output of a succeeded task.
    pub output: Option<Value>,
    /// Last error.
    pub error: Option<TaskError>,
    /// Latest progress: `{stage, step, total, eta_ms}`.
    pub progress: Option<Value>,
    /// Failed after its last allowed attempt.
    pub dead_lettered: bool,
    /// Unix ms.
    pub created_at: u64,
    /// First start, Unix ms.
    pub started_at: Option<u64>,
    /// Terminal time, Unix ms.
    pub completed_at: Option<u64>,
    /// Position in submission order (for cursors).
    pub seq: i64,
    /// The model a worker must serve, if any.
    pub model: Option<String>,
    /// Labels a worker must have (sorted).
    pub labels: Vec<String>,
    /// Where the task's webhook messages go.
    #[serde(default)]
    pub webhook: Option<String>,
    /// The events its webhook receives (sorted).
    #[serde(default)]
    pub webhook_events: Vec<String>,
}

impl Task {
    /// Whether a worker with these capabilities may run this task (see [`serves`]).
    pub fn fits(&self, caps: &Capabilities) -> bool {
        serves(caps, &self.task_type, self.model.as_deref(), &self.labels)
    }
}

/// The routing rule: a worker with `caps` may run a task of `task_type` that needs `model`
/// and `labels` when it serves the type, lists the model (a task that names a model goes
/// only to workers listing it; a worker with no models runs only tasks that name none), and
/// has every label. A task without model and labels runs on any worker serving its type.
pub fn serves(
    caps: &Capabilities,
    task_type: &str,
    model: Option<&str>,
    labels: &[String],
) -> bool {
    caps.task_types.iter().any(|t| t == task_type)
        && model.is_none_or(|m| caps.models.iter().any(|w| w == m))
        && labels.iter().all(|l| caps.labels.contains(l))
}

/// A task with its attempts and recorded stage timings (see [`crate::Queue::detail`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TaskDetail {
    /// The task.
    pub task: Task,
    /// Its attempts, in order.
    pub attempts: Vec<AttemptRecord>,
    /// Its recorded stage timings ([`crate::Queue::timings`]).
    pub timings: Option<Value>,
}

impl TaskDetail {
    /// Puts the three parts together.
    pub fn new(task: Task, attempts: Vec<AttemptRecord>, timings: Option<Value>) -> Self {
        Self {
            task,
            attempts,
            timings,
        }
    }
}

/// One attempt of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based.
    pub attempt: u32,
    /// The worker.
    pub worker_id: String,
    /// The lease.
    pub lease: String,
    /// Unix ms.
    pub started_at: u64,
    /// Unix ms.
    pub ended_at: Option<u64>,
    /// Why it ended without success.
    pub error: Option<String>,
}

/// How a worker ended an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Finished with an output.
    Ok(Value),
    /// Failed.
    Error(TaskError),
    /// Stopped after a cancel.
    Cancelled,
}

/// The reason a result for a lease held by another worker is refused with.
pub const NOT_HOLDER: &str = "lease held by another worker";

/// The answer to a result.
#[derive(Debug, Clone, PartialEq)]
pub struct CompleteOutcome {
    /// Whether it became the task's result.
    pub accepted: bool,
    /// Why not.
    pub reason: Option<String>,
    /// The task after the call.
    pub task: Option<Task>,
}

impl CompleteOutcome {
    /// No attempt ever had this lease.
    pub(crate) fn unknown_lease() -> Self {
        Self::refused("unknown lease".into(), None)
    }

    /// The lease belonged to an earlier attempt of its task.
    pub(crate) fn stale_lease() -> Self {
        Self::refused("stale lease: the attempt is no longer current".into(), None)
    }

    /// The lease is current but another worker holds it.
    pub fn not_holder() -> Self {
        Self::refused(NOT_HOLDER.into(), None)
    }

    /// The lease is current but the task no longer runs.
    pub(crate) fn not_running(task: Task) -> Self {
        Self::refused(format!("task is {}", task.state.as_str()), Some(task))
    }

    fn refused(reason: String, task: Option<Task>) -> Self {
        Self {
            accepted: false,
            reason: Some(reason),
            task,
        }
    }
}

/// The answer to a cancel.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// It was queued and is now canceled.
    Canceled(Task),
    /// It is running: tell `worker_id` to stop `lease`.
    SignalWorker {
        /// The task (cancel requested).
        task: Task,
        /// Worker holding the lease.
        worker_id: String,
        /// The lease.
        lease: String,
    },
    /// Already finished.
    AlreadyTerminal(Task),
    /// No such task.
    NotFound,
}

/// The answer to a retry ([`crate::Queue::retry`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RetryOutcome {
    /// It was failed, expired or canceled and is now queued again.
    Queued(Task),
    /// Its state does not allow a retry (queued, running or succeeded): the task as it is.
    Refused(Task),
    /// No such task.
    NotFound,
}

/// Which tasks `list` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this state.
    pub state: Option<TaskState>,
    /// Only this type.
    pub task_type: Option<String>,
    /// At most this many (1 to 500: [`crate::lifecycle::list_limit`]).
    pub limit: usize,
    /// Only tasks older than this `seq` (newest first).
    pub before_seq: Option<i64>,
}

/// Counts for metrics and readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `(state, task_type, count)`.
    pub by_state_type: Vec<(TaskState, String, u64)>,
}

impl Stats {
    /// Counts from `(state, task_type, count)` rows; rows of unknown states are left out.
    pub(crate) fn from_counts(rows: Vec<(String, String, i64)>) -> Self {
        Stats {
            by_state_type: rows
                .into_iter()
                .filter_map(|(s, t, n)| TaskState::parse(&s).map(|s| (s, t, n.max(0) as u64)))
                .collect(),
        }
    }

    /// Tasks in `state`.
    pub fn count(&self, state: TaskState) -> u64 {
        self.by_state_type
            .iter()
            .filter(|(s, _, _)| *s == state)
            .map(|(_, _, n)| n)
            .sum()
    }
}

/// A queue store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The database failed (busy, I/O, connection lost).
    #[error("queue store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store cannot be reached or has stopped.
    #[error("queue store unavailable: {0}")]
    Unavailable(String),
    /// A stored value did not parse.
    #[error("queue store holds a corrupt value: {0}")]
    Corrupt(String),
    /// The request is invalid.
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The same request_id was used for a different task.
    #[error("request_id {0:?} already names a task with different content")]
    Conflict(String),
}

impl QueueError {
    /// Whether retrying the call may succeed (the store was busy or unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, QueueError::Store(_) | QueueError::Unavailable(_))
    }
}

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        QueueError::Store(Box::new(e))
    }
}
