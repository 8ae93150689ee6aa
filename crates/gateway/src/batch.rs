//! `POST /v1/tasks/batch`: up to [`MAX_BATCH`] task bodies (each the body of
//! `POST /v1/tasks`) stored in one transaction, each idempotent by its own `request_id`,
//! with an answer per item in a `207` body: `created`, `duplicate` (the task an earlier
//! call, or an earlier item, created under the same `request_id`) or `invalid` (the status
//! and error the single route would have answered). An invalid item does not keep the
//! others from being stored.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::AppState;
use crate::error::{ApiError, ApiJson};
use crate::links::Links;
use crate::tasks::{CreateTask, TaskView};

/// The most tasks one batch may hold.
pub(crate) const MAX_BATCH: usize = 1000;

/// Tasks to create together.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBatch {
    /// 1 to 1000 task bodies, each as `POST /v1/tasks` takes it. An item that is not a
    /// valid body is answered as `invalid`; the others are stored all the same.
    #[schema(value_type = Vec<CreateTask>, min_items = 1, max_items = 1000)]
    tasks: Vec<Value>,
}

/// An item's error: the error object of the single route.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ItemError {
    /// Stable snake_case code, e.g. `invalid_field`.
    code: String,
    /// What went wrong, for a person.
    message: String,
    /// Whether the same item may be accepted later.
    retryable: bool,
}

/// The answer for one item of a batch.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct BatchItem {
    /// The item's position in `tasks`, from 0.
    index: usize,
    /// `created`, `duplicate` or `invalid`.
    result: String,
    /// The status the single route would have answered: 202 (created or duplicate),
    /// 409, 413 or 422 (invalid).
    status: u16,
    /// The task (created or duplicate). In a batch answer `queue_position` is `null`
    /// for a created task; `GET /v1/tasks/{id}` has it.
    task: Option<TaskView>,
    /// Why the item was refused (invalid).
    error: Option<ItemError>,
}

/// The answers of a batch, one per item, in the order of `tasks`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct BatchAnswer {
    /// One answer per item.
    data: Vec<BatchItem>,
    /// How many items were created now.
    created: usize,
    /// How many named tasks that existed already.
    duplicates: usize,
    /// How many were refused.
    invalid: usize,
}

fn refused(index: usize, e: ApiError) -> BatchItem {
    BatchItem {
        index,
        result: "invalid".into(),
        status: e.status.as_u16(),
        task: None,
        error: Some(ItemError {
            code: e.code.to_owned(),
            retryable: e.is_retryable(),
            message: e.message,
        }),
    }
}

/// Create up to 1000 tasks in one transaction, each idempotent by its own `request_id`.
#[utoipa::path(post, path = "/v1/tasks/batch", tag = "tasks",
    request_body = CreateBatch,
    responses(
        (status = 207, body = BatchAnswer, description = "one answer per item: created, duplicate or invalid"),
        (status = 400, description = "malformed JSON"),
        (status = 413, description = "more than 1000 tasks, or a body over the size limit"),
        (status = 415, description = "not JSON"), (status = 422, description = "no tasks"),
        (status = 503, description = "the queue store failed; nothing was stored"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    links: Links,
    ApiJson(body): ApiJson<CreateBatch>,
) -> Result<Response, ApiError> {
    let n = body.tasks.len();
    if n > MAX_BATCH {
        return Err(ApiError::too_large(format!(
            "{n} tasks: a batch holds at most {MAX_BATCH}"
        )));
    }
    if n == 0 {
        return Err(ApiError::invalid("tasks is empty: a batch holds 1 to 1000"));
    }
    let mut answers: Vec<Option<BatchItem>> = (0..n).map(|_| None).collect();
    let mut valid = Vec::with_capacity(n);
    for (i, item) in body.tasks.into_iter().enumerate() {
        let checked = match serde_json::from_value::<CreateTask>(item) {
            Ok(b) => crate::tasks::prepare(&state, b, None).await,
            Err(e) => Err(ApiError::invalid(format!("not a task body: {e}"))),
        };
        match checked {
            Ok(t) => valid.push((i, t)),
            Err(e) => answers[i] = Some(refused(i, e)),
        }
    }
    let (index, tasks): (Vec<usize>, Vec<_>) = valid.into_iter().unzip();
    let outcomes = crate::submit::submit_many(&state, tasks)
        .await
        .map_err(ApiError::from)?;
    for (i, outcome) in index.into_iter().zip(outcomes) {
        answers[i] = Some(match outcome {
            Ok((task, true)) => BatchItem {
                index: i,
                result: "created".into(),
                status: StatusCode::ACCEPTED.as_u16(),
                task: Some(crate::tasks::fresh_view(&links, task)),
                error: None,
            },
            Ok((task, false)) => BatchItem {
                index: i,
                result: "duplicate".into(),
                status: StatusCode::ACCEPTED.as_u16(),
                task: Some(crate::tasks::view(&state, &links, task).await?),
                error: None,
            },
            Err(e) => refused(i, e.into()),
        });
    }
    let data: Vec<BatchItem> = answers.into_iter().flatten().collect();
    let count = |r: &str| data.iter().filter(|d| d.result == r).count();
    let answer = BatchAnswer {
        created: count("created"),
        duplicates: count("duplicate"),
        invalid: count("invalid"),
        data,
    };
    tracing::info!(
        message = "batch submitted",
        tasks = n,
        created = answer.created,
        duplicates = answer.duplicates,
        invalid = answer.invalid
    );
    Ok((StatusCode::MULTI_STATUS, ApiJson(answer)).into_response())
}
