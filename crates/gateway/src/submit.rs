//! The one way a task enters the queue, for the tasks API (`tasks.rs`) and the OpenAI
//! routes (`openai/images.rs`) alike: the input limit, the enqueue (idempotent by request
//! id), and for a task that is new its count in `kiln_tasks_submitted_total`, its `task`
//! span from acceptance and the background record of its references' `compress_ms`
//! ([`crate::timing::accepted`]); then the `202` answer with the task and its `Location`.

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
                state
                    .metrics()
                    .submitted
                    .get_or_create(&vec![("task_type", task.task_type.clone())])
                    .inc();
                crate::timing::accepted(state, &task, s.api);
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
