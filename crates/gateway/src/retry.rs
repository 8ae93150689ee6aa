//! `POST /v1/tasks/{id}/retry`: a failed, dead-lettered, expired or canceled task queued
//! again as a new attempt of the same task (same id, input and files).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_broker::RetryOutcome;
use serde::Deserialize;
use serde_json::Value;

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::links::Links;
use crate::tasks::{TaskView, queue_error, view};

/// The most attempts one retry may grant.
const MAX_GRANT: u32 = 100;

/// Options of a retry.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryParams {
    /// Attempts the retried task may use before it fails for good, 1 to 100 (default: the
    /// queue's default for new tasks, `broker.max_attempts`).
    #[param(minimum = 1, maximum = 100)]
    max_attempts: Option<u32>,
}

/// The file ids `input` names: every string in it that is a file id, at any depth.
fn file_ids(input: &Value, out: &mut Vec<String>) {
    match input {
        Value::String(s) if crate::store::valid_file_id(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|v| file_ids(v, out)),
        Value::Object(o) => o.values().for_each(|v| file_ids(v, out)),
        _ => {}
    }
}

/// 409 when a file the input names was deleted: the new attempt could not read it.
async fn check_files(state: &AppState, id: &str, input: &Value) -> Result<(), ApiError> {
    let mut ids = Vec::new();
    file_ids(input, &mut ids);
    ids.dedup();
    for f in ids {
        let meta = state
            .files()
            .meta(&f)
            .await
            .map_err(crate::files::storage_error)?;
        if meta.is_none() {
            return Err(ApiError::conflict(format!(
                "task {id} cannot be retried: its input names the file {f}, which was deleted"
            )));
        }
    }
    Ok(())
}

/// Retry a task that ended without succeeding (`failed`, dead-lettered or not, `expired`,
/// `canceled`): it is queued again, runnable at once, as a new attempt of the same task:
/// same id, input, files, routing and priority. Its attempt count goes on (earlier
/// attempts stay listed), `max_attempts` grants it that many more, `dead_lettered` is
/// cleared, a deadline that has passed is dropped. Its events get a `status` event
/// (`queued`) after its `completed` one. Queued, running and succeeded tasks are refused.
#[utoipa::path(post, path = "/v1/tasks/{id}/retry", tag = "tasks",
    params(("id" = String, Path, description = "task id"), RetryParams),
    responses(
        (status = 202, body = TaskView, description = "queued again"),
        (status = 404, description = "unknown id"),
        (status = 409, description = "the task is queued, running or succeeded (the message names its status), or a file its input names was deleted"),
        (status = 422, description = "max_attempts out of range"),
    ))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    links: Links,
    Path(id): Path<String>,
    ApiQuery(p): ApiQuery<RetryParams>,
) -> Result<Response, ApiError> {
    if p.max_attempts
        .is_some_and(|n| !(1..=MAX_GRANT).contains(&n))
    {
        return Err(ApiError::invalid(format!(
            "max_attempts must be 1 to {MAX_GRANT}"
        )));
    }
    let task = crate::tasks::load(&state, &id).await?;
    if kiln_broker::lifecycle::may_retry(task.state) {
        check_files(&state, &id, &task.input).await?;
    }
    let t = match state
        .broker()
        .retry(&id, p.max_attempts)
        .await
        .map_err(queue_error)?
    {
        RetryOutcome::Queued(t) => t,
        RetryOutcome::Refused(t) => {
            return Err(ApiError::conflict(format!(
                "task {id} is {}: only failed, expired or canceled tasks can be retried",
                t.state.as_str()
            )));
        }
        RetryOutcome::NotFound => return Err(ApiError::not_found(format!("no task {id}"))),
        _ => return Err(ApiError::internal("unexpected retry outcome")),
    };
    tracing::info!(message = "task retried", task_id = %id, attempt = t.attempt + 1, max_attempts = t.max_attempts);
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(view(&state, &links, t).await?),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn file_ids_are_found_at_any_depth() {
        let a = format!("file_{}", "a".repeat(32));
        let b = format!("file_{}", "b".repeat(32));
        let input = json!({"images": [a, {"file_id": b}], "prompt": "file_x", "n": 1});
        let mut ids = Vec::new();
        file_ids(&input, &mut ids);
        assert_eq!(ids, [a, b]);
    }
}
