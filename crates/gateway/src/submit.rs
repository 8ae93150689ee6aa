//! The one way a task enters the queue, for the tasks API (`tasks.rs`) and the OpenAI
//! routes (`openai/images.rs`) alike: the input limit, the enqueue (idempotent by request
//! id), and for a task that is new its count in `kiln_tasks_submitted_total`, its `task`
//! span from acceptance and the background record of its references' `compress_ms`
//! ([`crate::timing::accepted`]); then the `202` answer with the task and its `Location`.
//! The batch route's items take the same path together ([`submit_many`]).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_broker::{ListFilter, NewTask, QueueError, Task};
use serde_json::Value;

use crate::AppState;
use crate::error::{ApiError, ApiJson};
use crate::links::Links;

/// What a reused request id with other content means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// Always a conflict: the request id names one task, its type, input, model and labels.
    Exact,
    /// The same call when both inputs carry the same `fingerprint` (edits: their stored
    /// references get new file ids on every call, so the inputs differ), else a conflict.
    #[cfg_attr(not(feature = "openai"), allow(dead_code))]
    Fingerprint,
}

/// A task to submit, and the API it came through (logged with it).
#[derive(Debug)]
pub(crate) struct Submission {
    /// The task.
    pub(crate) task: NewTask,
    /// `tasks` or `openai.images`.
    pub(crate) api: &'static str,
    /// How a reused request id is judged.
    pub(crate) repeat: Repeat,
}

/// Why a submission was refused.
#[derive(Debug)]
pub(crate) enum SubmitError {
    /// The input is over its limit (413).
    Limit(ApiError),
    /// The request id was used for a task with other content.
    Conflict(String),
    /// The queue store refused a field.
    Invalid(String),
    /// The queue store failed.
    Unavailable(String),
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Limit(e) => e,
            SubmitError::Conflict(rid) => ApiError::conflict(format!(
                "request_id {rid:?} was already used for a task with a different type, input, model or labels"
            )),
            SubmitError::Invalid(m) => ApiError::invalid(m),
            SubmitError::Unavailable(m) => ApiError::unavailable(m),
        }
    }
}

/// Submits the task: the new task, or the one an earlier call with the same request id
/// created.
pub(crate) async fn submit(state: &AppState, s: Submission) -> Result<Task, SubmitError> {
    crate::limits::check_input(state.config(), &s.task.input).map_err(SubmitError::Limit)?;
    let fingerprint = match s.repeat {
        Repeat::Fingerprint => s.task.input.get("fingerprint").cloned(),
        Repeat::Exact => None,
    };
    let task_type = s.task.task_type.clone();
    match state.broker().submit(s.task).await {
        Ok((task, created)) => {
            if created {
                count_created(state, &task, s.api);
            }
            Ok(task)
        }
        Err(QueueError::Conflict(rid)) => match fingerprint {
            Some(fp) => match find_repeat(state, &task_type, &rid, &fp).await? {
                Some(t) => Ok(t),
                None => Err(SubmitError::Conflict(rid)),
            },
            None => Err(SubmitError::Conflict(rid)),
        },
        Err(QueueError::Invalid(m)) => Err(SubmitError::Invalid(m)),
        Err(e) => Err(SubmitError::Unavailable(format!(
            "the queue store failed: {e}"
        ))),
    }
}

/// A task created now: its count in `kiln_tasks_submitted_total` and its `task` span.
fn count_created(state: &AppState, task: &Task, api: &str) {
    state
        .metrics()
        .submitted
        .get_or_create(&vec![("task_type", task.task_type.clone())])
        .inc();
    crate::timing::accepted(state, task, api);
}

/// One item's answer in a batch: the task and whether this call created it, or why the
/// item was refused.
pub(crate) type ItemOutcome = Result<(Task, bool), SubmitError>;

/// Submits the tasks of a batch (`POST /v1/tasks/batch`) with one `enqueue_many`: stored in
/// one transaction, each idempotent by its request id. An item over the input limit is
/// refused alone. When a request id is taken by a task with other content (or repeated in
/// the batch with other content) the store refuses the whole call: the items with that
/// request id are then left out and, after the others are stored, submitted one by one as
/// the single route would (the first may create, the next are duplicates or conflicts).
/// `Err` only when the store failed.
pub(crate) async fn submit_many(
    state: &AppState,
    tasks: Vec<NewTask>,
) -> Result<Vec<ItemOutcome>, SubmitError> {
    let mut out: Vec<Option<ItemOutcome>> = (0..tasks.len()).map(|_| None).collect();
    let mut rest = Vec::with_capacity(tasks.len());
    for (i, t) in tasks.into_iter().enumerate() {
        match crate::limits::check_input(state.config(), &t.input) {
            Ok(()) => rest.push((i, t)),
            Err(e) => out[i] = Some(Err(SubmitError::Limit(e))),
        }
    }
    let mut apart = Vec::new();
    loop {
        let batch: Vec<NewTask> = rest.iter().map(|(_, t)| t.clone()).collect();
        match state.broker().submit_many(batch).await {
            Ok(stored) => {
                for ((i, _), (task, created)) in rest.iter().zip(stored) {
                    if created {
                        count_created(state, &task, "tasks");
                    }
                    out[*i] = Some(Ok((task, created)));
                }
                break;
            }
            Err(QueueError::Conflict(rid)) => {
                let before = rest.len();
                let (taken, kept): (Vec<_>, Vec<_>) = rest
                    .into_iter()
                    .partition(|(_, t)| t.request_id.as_deref() == Some(rid.as_str()));
                rest = kept;
                apart.extend(taken);
                if rest.len() == before {
                    return Err(SubmitError::Unavailable(format!(
                        "the queue store named request_id {rid:?}, which no item has"
                    )));
                }
            }
            // Not attributable to one item: each is submitted alone instead.
            Err(QueueError::Invalid(_)) => {
                apart.append(&mut rest);
                break;
            }
            Err(e) => {
                return Err(SubmitError::Unavailable(format!(
                    "the queue store failed: {e}"
                )));
            }
        }
    }
    apart.sort_by_key(|(i, _)| *i);
    for (i, t) in apart {
        out[i] = Some(submit_one(state, t).await);
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(SubmitError::Unavailable("not submitted".into()))))
        .collect())
}

/// One item of a batch through the single path (after its batch refused it).
async fn submit_one(state: &AppState, t: NewTask) -> ItemOutcome {
    match state.broker().submit(t).await {
        Ok((task, created)) => {
            if created {
                count_created(state, &task, "tasks");
            }
            Ok((task, created))
        }
        Err(QueueError::Conflict(rid)) => Err(SubmitError::Conflict(rid)),
        Err(QueueError::Invalid(m)) => Err(SubmitError::Invalid(m)),
        Err(e) => Err(SubmitError::Unavailable(format!(
            "the queue store failed: {e}"
        ))),
    }
}

/// The task of an earlier call with this request id and fingerprint, among the latest 500
/// of its type.
async fn find_repeat(
    state: &AppState,
    task_type: &str,
    request_id: &str,
    fingerprint: &Value,
) -> Result<Option<Task>, SubmitError> {
    let tasks = state
        .broker()
        .queue()
        .list(&ListFilter {
            task_type: Some(task_type.to_owned()),
            limit: 500,
            ..ListFilter::default()
        })
        .await
        .map_err(|e| SubmitError::Unavailable(format!("the queue store failed: {e}")))?;
    Ok(tasks.into_iter().find(|t| {
        t.request_id.as_deref() == Some(request_id)
            && t.input.get("fingerprint") == Some(fingerprint)
    }))
}

/// The `202` answer: the task object and its `Location`.
pub(crate) async fn accepted(
    state: &AppState,
    links: &Links,
    task: Task,
) -> Result<Response, ApiError> {
    let location = links.task(&task.id);
    let v = crate::tasks::view(state, links, task).await?;
    let mut resp = (StatusCode::ACCEPTED, ApiJson(v)).into_response();
    if let Ok(l) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    Ok(resp)
}
