//! The task lifecycle: every change a store makes to a task, decided once.
//!
//! Each function takes a task's current row and returns the [`Transition`] the store writes:
//! the new state, the task's fields after the change, the change to its attempt record and the
//! events to append. Stores never decide a state themselves; they find the rows a call is
//! about (by lease, by worker, by deadline), check the lease with [`check_lease`], and persist
//! what these functions return. The rules are therefore the same on every backend, and the
//! property test in `tests/lifecycle.rs` checks each store against them.
//!
//! ```
//! use kiln_broker::lifecycle::{self, TaskEventKind};
//! use kiln_broker::{Completion, Ending, NewTask, QueueOptions};
//! use kiln_protocol::TaskState;
//!
//! let opts = QueueOptions::default();
//! let admitted = lifecycle::admit(NewTask { task_type: "t".into(), ..Default::default() }, &opts).unwrap();
//! let queued = lifecycle::new_task(&admitted, "task_1".into(), 1, 10);
//! let running = lifecycle::claim(&queued, "w1", "lease_1", 60_000, 20).apply(&queued);
//! assert_eq!((running.state, running.attempt), (TaskState::Running, 1));
//! let done = lifecycle::finish(&running, Ending::Done(Completion::Ok(serde_json::json!(1))), &opts, 30);
//! assert_eq!(done.state, TaskState::Succeeded);
//! assert!(matches!(done.events[1], TaskEventKind::Completed { .. }));
//! ```

use kiln_protocol::TaskState;
use kiln_protocol::messages::TaskError;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::model::{CompleteOutcome, Completion, NewTask, QueueError, Task};
use crate::queue::QueueOptions;

mod webhooks;
pub use webhooks::*;

/// What happened to a task, as stored and streamed. The wire form (the stored rows, SSE,
/// notifications between instances) is `{"kind": …, "data": {…}}` as listed per variant.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TaskEventKind {
    /// `kind: "status"`, data `{"status", "attempt", "worker_id"}`: the task entered a state.
    Status {
        /// The new state.
        status: TaskState,
        /// Attempts started so far.
        attempt: u32,
        /// The worker of the latest attempt (`null` while queued).
        worker_id: Option<String>,
    },
    /// `kind: "status"`, data `{"status": "running", "cancel_requested": true}`: a cancel
    /// was requested while the task ran; its worker is told to stop.
    CancelRequested,
    /// `kind: "progress"`, data as the worker sent it (`{stage, step, total, eta_ms}`).
    Progress(Value),
    /// `kind: "completed"`, data `{"status", "output", "error"}`: the task ended (the last
    /// event of a task).
    Completed {
        /// The terminal state.
        status: TaskState,
        /// Output of a succeeded task.
        output: Option<Value>,
        /// The last error.
        error: Option<TaskError>,
    },
}

impl TaskEventKind {
    /// The event name: `status`, `progress` or `completed`.
    pub fn name(&self) -> &'static str {
        match self {
            TaskEventKind::Status { .. } | TaskEventKind::CancelRequested => "status",
            TaskEventKind::Progress(_) => "progress",
            TaskEventKind::Completed { .. } => "completed",
        }
    }

    /// The event's data object.
    pub fn data(&self) -> Value {
        match self {
            TaskEventKind::Status {
                status,
                attempt,
                worker_id,
            } => json!({"status": status.as_str(), "attempt": attempt, "worker_id": worker_id}),
            TaskEventKind::CancelRequested => {
                json!({"status": "running", "cancel_requested": true})
            }
            TaskEventKind::Progress(v) => v.clone(),
            TaskEventKind::Completed {
                status,
                output,
                error,
            } => json!({"status": status.as_str(), "output": output, "error": error}),
        }
    }

    /// Reads an event back from its name and data.
    pub fn from_parts(kind: &str, data: Value) -> Result<Self, QueueError> {
        let bad = |what: &str| QueueError::Corrupt(format!("{kind} event: {what}"));
        let status = || {
            data["status"]
                .as_str()
                .and_then(TaskState::parse)
                .ok_or_else(|| bad("no status"))
        };
        Ok(match kind {
            "progress" => TaskEventKind::Progress(data),
            "status" if data["cancel_requested"] == true => TaskEventKind::CancelRequested,
            "status" => TaskEventKind::Status {
                status: status()?,
                attempt: data["attempt"].as_u64().unwrap_or(0) as u32,
                worker_id: data["worker_id"].as_str().map(str::to_owned),
            },
            "completed" => TaskEventKind::Completed {
                status: status()?,
                output: Some(data["output"].clone()).filter(|v| !v.is_null()),
                error: match &data["error"] {
                    Value::Null => None,
                    e => Some(serde_json::from_value(e.clone()).map_err(|e| bad(&e.to_string()))?),
                },
            },
            _ => return Err(bad("unknown kind")),
        })
    }

    /// The status this event reports, if it reports one.
    pub fn status(&self) -> Option<TaskState> {
        match self {
            TaskEventKind::Status { status, .. } | TaskEventKind::Completed { status, .. } => {
                Some(*status)
            }
            TaskEventKind::CancelRequested => Some(TaskState::Running),
            TaskEventKind::Progress(_) => None,
        }
    }

    /// Whether this is the task's last event.
    pub fn is_completed(&self) -> bool {
        matches!(self, TaskEventKind::Completed { .. })
    }

    /// The `status` event of `t` as it now is.
    pub fn status_of(t: &Task) -> Self {
        TaskEventKind::Status {
            status: t.state,
            attempt: t.attempt,
            worker_id: t.worker_id.clone(),
        }
    }
}

/// A change to a task, for progress streams (SSE). Ids increase across all tasks, so
/// "events after id N" resumes a stream without loss. Serialised as
/// `{"id", "task_id", "kind", "data", "ts"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "WireEvent", try_from = "WireEvent")]
pub struct TaskEvent {
    /// Monotonic id.
    pub id: i64,
    /// The task.
    pub task_id: String,
    /// What happened.
    pub kind: TaskEventKind,
    /// Unix ms.
    pub ts: u64,
}

#[derive(Serialize, Deserialize)]
struct WireEvent {
    id: i64,
    task_id: String,
    kind: String,
    data: Value,
    ts: u64,
}

impl From<TaskEvent> for WireEvent {
    fn from(e: TaskEvent) -> Self {
        WireEvent {
            id: e.id,
            task_id: e.task_id,
            kind: e.kind.name().to_owned(),
            data: e.kind.data(),
            ts: e.ts,
        }
    }
}

impl TryFrom<WireEvent> for TaskEvent {
    type Error = QueueError;
    fn try_from(w: WireEvent) -> Result<Self, QueueError> {
        Ok(TaskEvent {
            id: w.id,
            task_id: w.task_id,
            kind: TaskEventKind::from_parts(&w.kind, w.data)?,
            ts: w.ts,
        })
    }
}

/// The fields of a task a transition may change, as they are after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fields {
    /// Attempts started.
    pub attempt: u32,
    /// Lease of the running attempt.
    pub lease: Option<String>,
    /// Worker of the latest attempt (cleared when queued again).
    pub worker_id: Option<String>,
    /// When the lease lapses.
    pub lease_expires_at: Option<u64>,
    /// A queued task runs from then on (Unix ms; 0: at once).
    pub not_before: u64,
    /// A cancel was requested while it ran.
    pub cancel_requested: bool,
    /// Output.
    pub output: Option<Value>,
    /// Last error.
    pub error: Option<TaskError>,
    /// Latest progress.
    pub progress: Option<Value>,
    /// Failed for good after a retryable error.
    pub dead_lettered: bool,
    /// First start.
    pub started_at: Option<u64>,
    /// Terminal time.
    pub completed_at: Option<u64>,
    /// Absolute deadline, Unix ms (only [`retry`] changes it).
    pub deadline: Option<u64>,
    /// Attempt limit (only [`retry`] changes it).
    pub max_attempts: u32,
}

impl Fields {
    /// The fields of `t` as stored.
    pub fn of(t: &Task) -> Self {
        Fields {
            attempt: t.attempt,
            lease: t.lease.clone(),
            worker_id: t.worker_id.clone(),
            lease_expires_at: t.lease_expires_at,
            not_before: 0,
            cancel_requested: t.cancel_requested,
            output: t.output.clone(),
            error: t.error.clone(),
            progress: t.progress.clone(),
            dead_lettered: t.dead_lettered,
            started_at: t.started_at,
            completed_at: t.completed_at,
            deadline: t.deadline,
            max_attempts: t.max_attempts,
        }
    }

    /// Off the worker: no lease.
    fn unleased(mut self) -> Self {
        self.lease = None;
        self.lease_expires_at = None;
        self
    }
}

/// What a transition does to the task's attempt records.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptChange {
    /// A new attempt started (replacing a record of the same number left by an attempt that
    /// did not count).
    Start {
        /// 1-based.
        attempt: u32,
        /// The worker.
        worker_id: String,
        /// The lease.
        lease: String,
        /// Unix ms.
        started_at: u64,
    },
    /// The attempt ended.
    End {
        /// 1-based.
        attempt: u32,
        /// Unix ms.
        ended_at: u64,
        /// Why, when it did not succeed.
        error: Option<String>,
    },
}

/// A decided change to one task: what the store writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The new state.
    pub state: TaskState,
    /// Every changeable field after the change.
    pub fields: Fields,
    /// The attempt record to start or end, if any.
    pub attempt: Option<AttemptChange>,
    /// Events to append, in order.
    pub events: Vec<TaskEventKind>,
}

impl Transition {
    /// A transition to `state` with `fields`, its events following from the result: a
    /// terminal state gets `status` then `completed`, any other state `status`.
    fn to(task: &Task, state: TaskState, fields: Fields, attempt: Option<AttemptChange>) -> Self {
        let mut t = Transition {
            state,
            fields,
            attempt,
            events: Vec::new(),
        };
        let after = t.apply(task);
        t.events.push(TaskEventKind::status_of(&after));
        if state.is_terminal() {
            t.events.push(TaskEventKind::Completed {
                status: state,
                output: after.output,
                error: after.error,
            });
        }
        t
    }

    /// The task after the change.
    pub fn apply(&self, task: &Task) -> Task {
        let f = self.fields.clone();
        Task {
            state: self.state,
            attempt: f.attempt,
            lease: f.lease,
            worker_id: f.worker_id,
            lease_expires_at: f.lease_expires_at,
            cancel_requested: f.cancel_requested,
            output: f.output,
            error: f.error,
            progress: f.progress,
            dead_lettered: f.dead_lettered,
            started_at: f.started_at,
            completed_at: f.completed_at,
            deadline: f.deadline,
            max_attempts: f.max_attempts,
            ..task.clone()
        }
    }

    /// Whether the task is ready to run after the change (queued, runnable by `now`).
    pub fn is_ready(&self, now: u64) -> bool {
        self.state == TaskState::Queued && self.fields.not_before <= now
    }
}

/// A task accepted for enqueueing: checked, routing normalised, attempts decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    /// The task, labels sorted and deduplicated.
    pub task: NewTask,
    /// Its attempt limit.
    pub max_attempts: u32,
    /// The event its creation appends.
    pub event: TaskEventKind,
}

/// Checks a new task (a type; no empty model or label) and decides its attempt limit.
pub fn admit(mut t: NewTask, opts: &QueueOptions) -> Result<Admitted, QueueError> {
    if t.task_type.trim().is_empty() {
        return Err(QueueError::Invalid("task_type is empty".into()));
    }
    if t.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
        return Err(QueueError::Invalid("model is empty".into()));
    }
    if t.labels.iter().any(|l| l.trim().is_empty()) {
        return Err(QueueError::Invalid("a label is empty".into()));
    }
    t.labels.sort();
    t.labels.dedup();
    admit_webhook(&mut t)?;
    let max_attempts = t.max_attempts.unwrap_or(opts.default_max_attempts).max(1);
    Ok(Admitted {
        task: t,
        max_attempts,
        event: TaskEventKind::Status {
            status: TaskState::Queued,
            attempt: 0,
            worker_id: None,
        },
    })
}

/// How a batch is stored: the items that get a row of their own (`fresh`, in order), and for
/// each item whether it repeats the `request_id` of an earlier one (`same_as`: that item's
/// index), in which case it names the same task.
pub fn batch_plan(admitted: &[Admitted]) -> (Vec<usize>, Vec<Option<usize>>) {
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut fresh = Vec::new();
    let mut same_as = Vec::with_capacity(admitted.len());
    for (k, a) in admitted.iter().enumerate() {
        match a.task.request_id.as_deref() {
            Some(r) if first.contains_key(r) => same_as.push(first.get(r).copied()),
            r => {
                if let Some(r) = r {
                    first.insert(r, k);
                }
                fresh.push(k);
                same_as.push(None);
            }
        }
    }
    (fresh, same_as)
}

/// The conflict an item whose `request_id` names a different task is refused with.
pub fn batch_conflict(a: &Admitted) -> QueueError {
    QueueError::Conflict(a.task.request_id.clone().unwrap_or_default())
}

/// Fills in each repeated item of a batch (`same_as`, from [`batch_plan`]) with the task of
/// the item it repeats, not created; a repeat that asks for something else is a conflict.
pub fn fill_repeats(
    out: &mut [Option<(Task, bool)>],
    same_as: &[Option<usize>],
    admitted: &[Admitted],
) -> Result<(), QueueError> {
    for (k, first) in same_as.iter().enumerate() {
        let Some(first) = *first else { continue };
        let t = out[first]
            .as_ref()
            .map(|o| o.0.clone())
            .ok_or_else(|| QueueError::Corrupt("batch".into()))?;
        if !same_request(&t, &admitted[k].task) {
            return Err(batch_conflict(&admitted[k]));
        }
        out[k] = Some((t, false));
    }
    Ok(())
}

/// The task `admitted` becomes when stored with `id` and `seq` at `now`.
pub fn new_task(a: &Admitted, id: String, seq: i64, now: u64) -> Task {
    let t = &a.task;
    Task {
        id,
        request_id: t.request_id.clone(),
        task_type: t.task_type.clone(),
        state: TaskState::Queued,
        priority: t.priority,
        input: t.input.clone(),
        metadata: t.metadata.clone(),
        attempt: 0,
        max_attempts: a.max_attempts,
        lease: None,
        worker_id: None,
        lease_expires_at: None,
        deadline: t.deadline,
        cancel_requested: false,
        output: None,
        error: None,
        progress: None,
        dead_lettered: false,
        created_at: now,
        started_at: None,
        completed_at: None,
        seq,
        model: t.model.clone(),
        labels: t.labels.clone(),
        webhook: t.webhook.clone(),
        webhook_events: t.webhook_events.clone(),
    }
}

/// Whether a stored task is the one `t` (admitted) asks for again: same type, input and
/// routing. A `request_id` reused otherwise is a conflict.
pub fn same_request(stored: &Task, t: &NewTask) -> bool {
    stored.task_type == t.task_type
        && stored.input == t.input
        && stored.model == t.model
        && stored.labels == t.labels
}

/// A queued task leased to `worker_id` under `lease` until `lease_until`: a new attempt.
pub fn claim(task: &Task, worker_id: &str, lease: &str, lease_until: u64, now: u64) -> Transition {
    let mut f = Fields::of(task);
    f.attempt += 1;
    f.lease = Some(lease.to_owned());
    f.worker_id = Some(worker_id.to_owned());
    f.lease_expires_at = Some(lease_until);
    f.started_at = f.started_at.or(Some(now));
    f.progress = None;
    let start = AttemptChange::Start {
        attempt: f.attempt,
        worker_id: worker_id.to_owned(),
        lease: lease.to_owned(),
        started_at: now,
    };
    Transition::to(task, TaskState::Running, f, Some(start))
}

/// Progress of a running attempt: stored as the latest, and appended as an event.
pub fn progress(task: &Task, progress: Value) -> Transition {
    let mut f = Fields::of(task);
    f.progress = Some(progress.clone());
    Transition {
        state: task.state,
        fields: f,
        attempt: None,
        events: vec![TaskEventKind::Progress(progress)],
    }
}

/// How an attempt ends, before the store applies it (see [`crate::Queue::finish`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Ending {
    /// A worker's result.
    Done(Completion),
    /// A failure with an explicit retry time.
    Fail {
        /// What went wrong.
        error: TaskError,
        /// When the task may run again (if it is retried), Unix ms.
        retry_at: u64,
    },
    /// A failure that dead-letters the task whatever attempts remain.
    Dead(TaskError),
}

/// The running attempt of `task` ends as `ending` says. A retryable error with attempts
/// left (and no cancel requested) queues the task again from its retry time; a retryable
/// error otherwise dead-letters it; a cancelled result cancels it.
pub fn finish(task: &Task, ending: Ending, opts: &QueueOptions, now: u64) -> Transition {
    use TaskState as S;
    let (state, output, error, requeue_at, dead) = match ending {
        Ending::Done(Completion::Ok(v)) => (S::Succeeded, Some(v), None, None, false),
        Ending::Done(Completion::Cancelled) => (S::Canceled, None, None, None, false),
        Ending::Done(Completion::Error(error)) => {
            let retry_at = opts.retry_at(task.attempt, now);
            return finish(task, Ending::Fail { error, retry_at }, opts, now);
        }
        Ending::Fail { error, retry_at } => {
            let more =
                error.retryable && task.attempt < task.max_attempts && !task.cancel_requested;
            let dead = error.retryable && !more && !task.cancel_requested;
            let state = if more { S::Queued } else { S::Failed };
            (state, None, Some(error), more.then_some(retry_at), dead)
        }
        Ending::Dead(error) => (S::Failed, None, Some(error), None, true),
    };
    let end = AttemptChange::End {
        attempt: task.attempt,
        ended_at: now,
        error: error.as_ref().map(|e| format!("{}: {}", e.code, e.message)),
    };
    let mut f = Fields::of(task).unleased();
    f.error = error;
    if let Some(not_before) = requeue_at {
        f.worker_id = None;
        f.not_before = not_before;
    } else {
        f.output = output;
        f.dead_lettered = dead;
        f.completed_at = Some(now);
    }
    Transition::to(task, state, f, Some(end))
}

/// The error code of a task failed for good because its leases kept ending without a result
/// (lapsed, or its worker restarted) until its attempts were spent.
pub const LEASE_EXPIRED: &str = "lease_expired";

/// A running task goes back to the queue, runnable at once, because its attempt ended
/// without a result (`why`). `counted`: the attempt counts (a lapsed lease, a restarted
/// worker); otherwise it is given back (`release`, a retryable `reject`, a failed
/// assignment). A task whose cancel was requested ends canceled instead, and one whose
/// counted attempts are spent fails dead-lettered with [`LEASE_EXPIRED`].
pub fn requeue(task: &Task, why: &str, counted: bool, now: u64) -> Transition {
    let end = AttemptChange::End {
        attempt: task.attempt,
        ended_at: now,
        error: Some(why.to_owned()),
    };
    let mut f = Fields::of(task).unleased();
    let state = if task.cancel_requested {
        f.completed_at = Some(now);
        TaskState::Canceled
    } else if counted && task.attempt >= task.max_attempts {
        f.error = Some(TaskError {
            code: LEASE_EXPIRED.into(),
            message: why.into(),
            retryable: true,
        });
        f.dead_lettered = true;
        f.completed_at = Some(now);
        TaskState::Failed
    } else {
        if !counted {
            f.attempt = f.attempt.saturating_sub(1);
        }
        f.worker_id = None;
        TaskState::Queued
    };
    Transition::to(task, state, f, Some(end))
}

/// A lease given back by its worker or the broker: the attempt does not count.
pub fn release(task: &Task, why: &str, now: u64) -> Transition {
    requeue(task, why, false, now)
}

/// Why the attempts of a restarted worker's released leases ended.
pub const WORKER_RESTARTED: &str = "worker restarted";
/// Why the attempt of a lapsed lease ended.
pub const LEASE_LAPSED: &str = "lease expired";

/// Whether the lease of `task` lapsed by `now` (running, its lease not renewed in time).
pub fn lapsed(task: &Task, now: u64) -> bool {
    task.state == TaskState::Running && task.lease_expires_at.is_some_and(|at| at < now)
}

/// A lapsed lease: the attempt counts (see [`requeue`]).
pub fn lapse(task: &Task, now: u64) -> Transition {
    requeue(task, LEASE_LAPSED, true, now)
}

/// Whether the deadline of `task` passed by `now` while it is queued or running.
pub fn past_deadline(task: &Task, now: u64) -> bool {
    !task.state.is_terminal() && task.deadline.is_some_and(|d| d < now)
}

/// A queued or running task whose deadline passed: expired. A running one's worker must be
/// told to stop (its `(worker, lease)` is the task's before the change).
pub fn expire(task: &Task, now: u64) -> Transition {
    let mut f = Fields::of(task).unleased();
    f.completed_at = Some(now);
    Transition::to(task, TaskState::Expired, f, None)
}

/// A cancel: a queued task ends canceled at once; a running one is marked (its worker must
/// be told, and its attempt ends canceled); `None` for a task that already ended.
pub fn cancel(task: &Task, now: u64) -> Option<Transition> {
    let mut f = Fields::of(task);
    match task.state {
        TaskState::Queued => {
            f.completed_at = Some(now);
            Some(Transition::to(task, TaskState::Canceled, f, None))
        }
        TaskState::Running => {
            f.cancel_requested = true;
            Some(Transition {
                state: TaskState::Running,
                fields: f,
                attempt: None,
                events: vec![TaskEventKind::CancelRequested],
            })
        }
        _ => None,
    }
}

/// Whether a task in `state` may be retried ([`retry`]): it ended without succeeding
/// (`failed`, dead-lettered or not, `expired`, `canceled`).
pub fn may_retry(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Failed | TaskState::Expired | TaskState::Canceled
    )
}

/// A retry asked for by a client: a task that ended without succeeding (see [`may_retry`])
/// is queued again, runnable at once, as a new attempt of the same task: same id, input,
/// metadata, routing and priority. `None` for a queued, running or succeeded task.
///
/// - The attempt counter goes on: the next claim is attempt `attempt + 1`, and the records
///   of the earlier attempts stay.
/// - The retry gets a fresh attempt budget: `max_attempts` becomes `attempt + grant`, where
///   `grant` is `attempts` or, when `None`, the store's default for new tasks
///   ([`QueueOptions::default_max_attempts`]), at least 1. Retryable failures of the new
///   attempts are retried automatically within that budget, as for a new task.
/// - `dead_lettered`, `cancel_requested`, `completed_at`, output and progress are cleared;
///   the last `error` stays until the next attempt ends (as when a retryable failure
///   requeues a task); `started_at` keeps the first start.
/// - A deadline that has passed by `now` is dropped (the task would expire at once); one
///   still ahead is kept.
/// - Its event is a `status` event `{"status": "queued", "attempt": n, "worker_id": null}`,
///   appended after the task's `completed` event.
pub fn retry(
    task: &Task,
    attempts: Option<u32>,
    opts: &QueueOptions,
    now: u64,
) -> Option<Transition> {
    if !may_retry(task.state) {
        return None;
    }
    let grant = attempts.unwrap_or(opts.default_max_attempts).max(1);
    let mut f = Fields::of(task).unleased();
    f.worker_id = None;
    f.not_before = 0;
    f.cancel_requested = false;
    f.output = None;
    f.progress = None;
    f.dead_lettered = false;
    f.completed_at = None;
    f.deadline = task.deadline.filter(|d| *d > now);
    f.max_attempts = task.attempt.saturating_add(grant);
    Some(Transition::to(task, TaskState::Queued, f, None))
}

/// The compare-and-set every call naming a lease makes: `task` is the task whose current
/// lease is `lease` (`None`: no task has it now; `known`: an attempt record has it: a lease
/// given back is forgotten with its attempt, whose number the next attempt reuses), and
/// `holder` the worker that must hold it (`None`: any). `Ok(task)` when the call may go on,
/// else the refusal to answer with.
pub fn check_lease<'t>(
    task: Option<&'t Task>,
    lease: &str,
    holder: Option<&str>,
    known: bool,
) -> Result<&'t Task, Box<CompleteOutcome>> {
    let Some(task) = task.filter(|t| t.lease.as_deref() == Some(lease)) else {
        return Err(Box::new(if known {
            CompleteOutcome::stale_lease()
        } else {
            CompleteOutcome::unknown_lease()
        }));
    };
    if holder.is_some_and(|w| task.worker_id.as_deref() != Some(w)) {
        return Err(Box::new(CompleteOutcome::not_holder()));
    }
    if task.state != TaskState::Running {
        return Err(Box::new(CompleteOutcome::not_running(task.clone())));
    }
    Ok(task)
}

/// The most tasks one `list` call returns.
pub const MAX_LIST: usize = 500;

/// How many tasks a `list` asking for `limit` returns at most (1 to [`MAX_LIST`]).
pub fn list_limit(limit: usize) -> usize {
    limit.clamp(1, MAX_LIST)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report
mod tests;
