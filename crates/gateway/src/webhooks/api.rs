//! `GET /v1/tasks/{id}/webhooks` and `POST /v1/webhooks/messages/{id}/retry`.

use axum::extract::{Path, State};
use kiln_broker::{DeliveryAttempt, Message, MessageRecord, MessageState, now_ms};
use serde::Serialize;

use crate::AppState;
use crate::error::{ApiError, ApiJson};
use crate::tasks::rfc3339;

/// One delivery attempt of a message.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AttemptView {
    /// 1-based.
    attempt: u32,
    /// When it was sent (RFC 3339).
    at: String,
    /// The HTTP status, when an answer came.
    status: Option<u16>,
    /// From sending to the answer or the failure, ms.
    latency_ms: u64,
    /// What went wrong: the status and the start of the answer, or the error (at most 512
    /// bytes).
    error: Option<String>,
}

/// A webhook message (its `id` is the `webhook-id` header of every attempt).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct MessageView {
    /// `msg_` + 32 hex digits.
    id: String,
    /// `task.started`, `task.progress`, `task.completed`, …
    event: String,
    /// Where it goes.
    url: String,
    /// `pending`, `delivered`, `exhausted` (every attempt failed; retry re-arms it) or
    /// `disabled` (the endpoint answered 410 Gone).
    state: String,
    /// When it was written (RFC 3339).
    created_at: String,
    /// When the next attempt is due, while pending (RFC 3339).
    next_attempt_at: Option<String>,
    /// Every attempt, oldest first.
    attempts: Vec<AttemptView>,
}

/// The webhook messages of a task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct MessageList {
    /// Oldest first.
    data: Vec<MessageView>,
}

fn attempt_view(a: DeliveryAttempt) -> AttemptView {
    AttemptView {
        attempt: a.attempt,
        at: rfc3339(a.at),
        status: a.status,
        latency_ms: a.latency_ms,
        error: a.error,
    }
}

fn message_view(m: Message, attempts: Vec<DeliveryAttempt>) -> MessageView {
    MessageView {
        next_attempt_at: (m.state == MessageState::Pending).then(|| rfc3339(m.next_at)),
        id: m.id,
        event: m.event,
        url: m.url,
        state: m.state.as_str().to_owned(),
        created_at: rfc3339(m.created_at),
        attempts: attempts.into_iter().map(attempt_view).collect(),
    }
}

fn store_error(e: kiln_broker::QueueError) -> ApiError {
    ApiError::unavailable(format!("the queue store failed: {e}"))
}

/// The webhook messages of a task, with every delivery attempt.
#[utoipa::path(get, path = "/v1/tasks/{id}/webhooks", tag = "webhooks",
    params(("id" = String, Path, description = "task id")),
    responses((status = 200, body = MessageList), (status = 404, description = "unknown task")))]
pub(crate) async fn task_messages(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<ApiJson<MessageList>, ApiError> {
    crate::tasks::load(&state, &id).await?;
    let records = state
        .broker()
        .queue()
        .outbox()
        .task_messages(&id)
        .await
        .map_err(store_error)?;
    let data = records
        .into_iter()
        .map(|MessageRecord { message, attempts }| message_view(message, attempts))
        .collect();
    Ok(ApiJson(MessageList { data }))
}

/// Re-arm a message that is not delivered (exhausted, disabled, or waiting for a retry):
/// it is sent again at once, with the same `webhook-id` and body, and a URL disabled by a
/// 410 is enabled again.
#[utoipa::path(post, path = "/v1/webhooks/messages/{id}/retry", tag = "webhooks",
    params(("id" = String, Path, description = "message id")),
    responses((status = 200, body = MessageView), (status = 404, description = "unknown message"),
        (status = 409, description = "already delivered")))]
pub(crate) async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<ApiJson<MessageView>, ApiError> {
    let o = state.broker().queue().outbox();
    let Some(m) = o.retry_message(&id, now_ms()).await.map_err(store_error)? else {
        return Err(ApiError::not_found(format!("no webhook message {id}")));
    };
    if m.state == MessageState::Delivered {
        return Err(ApiError::conflict(format!(
            "message {id} was delivered already"
        )));
    }
    state.inner.webhooks.wake.notify_one();
    let attempts = o
        .message(&id)
        .await
        .map_err(store_error)?
        .map(|r| r.attempts)
        .unwrap_or_default();
    Ok(ApiJson(message_view(m, attempts)))
}
