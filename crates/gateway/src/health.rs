//! `/healthz`, `/readyz`, `/metrics`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_protocol::TaskState;
use serde_json::json;

use crate::error::{ApiError, ApiJson};
use crate::{AppState, MetricsAccess};

/// Whether the caller may read metrics and readiness details (`gateway.metrics_access`).
fn may_read_metrics(state: &AppState, headers: &HeaderMap) -> bool {
    let inner = &state.inner;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer);
    let metrics_token = token.is_some_and(|t| inner.metrics_tokens.check(t).is_some());
    match state.config().metrics_access {
        MetricsAccess::Open => true,
        MetricsAccess::Token => metrics_token,
        MetricsAccess::Key => {
            (inner.api_keys.is_empty() && inner.metrics_tokens.is_empty())
                || metrics_token
                || token.is_some_and(|t| inner.api_keys.check(t).is_some())
        }
    }
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
pub(crate) async fn healthz() -> ApiJson<serde_json::Value> {
    ApiJson(json!({"status": "ok"}))
}

/// Ready to serve: the queue store answers and the file storage (directory or bucket)
/// accepts writes. The checks, storage and workers are shown only to callers that may read
/// metrics (`gateway.metrics_access`); others get the status alone.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready"), (status = 503, description = "not ready")))]
pub(crate) async fn readyz(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let queue = state.broker().queue().ping().await.is_ok();
    let probe = state.files().probe().await;
    let files = probe.is_ok();
    let storage = json!({
        "backend": state.files().backend().as_str(),
        "writable": files,
        "error": probe.as_ref().err(),
    });
    let workers = state.broker().workers();
    let online = workers.iter().filter(|w| w.connected).count();
    let mut types: Vec<String> = workers
        .iter()
        .filter(|w| w.connected)
        .flat_map(|w| w.capabilities.task_types.clone())
        .collect();
    types.sort();
    types.dedup();
    let shutting_down = state.shutting_down();
    let ready = queue && files && !shutting_down;
    let status_word = if ready { "ready" } else { "not_ready" };
    let body = if may_read_metrics(&state, &headers) {
        json!({
            "status": status_word,
            "checks": {"queue_store": queue, "file_store": files, "shutting_down": shutting_down},
            "storage": storage,
            "workers": {"online": online, "task_types": types, "paused": state.broker().is_paused()},
        })
    } else {
        json!({"status": status_word})
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !ready {
        tracing::warn!(
            message = "not ready",
            queue_store = queue,
            file_store = files,
            storage_error = probe.as_ref().err().map(String::as_str),
            shutting_down
        );
    }
    (status, ApiJson(body)).into_response()
}

/// Prometheus metrics (`gateway.metrics_access` says who may read them).
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, content_type = "text/plain", description = "Prometheus text format"), (status = 401, description = "no access")))]
pub(crate) async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !may_read_metrics(&state, &headers) {
        return ApiError::unauthorized(
            "/metrics needs an API key or a metrics token in `Authorization: Bearer`",
        )
        .into_response();
    }
    refresh(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics().render(),
    )
        .into_response()
}

/// Sets the gauges read at scrape time: tasks by state and type, queue depth, workers.
pub(crate) async fn refresh(state: &AppState) {
    let m = state.metrics();
    let stats = state.broker().queue().stats().await.ok();
    if let Ok(n) = state.broker().queue().outbox().pending_messages().await {
        m.webhook_pending.set(n as i64);
    }
    crate::overview::refresh_metrics(state, stats.as_ref());
    if let Some(stats) = stats {
        m.tasks.clear();
        // Every state of every known type, so that a state with no task reads 0.
        let mut types: Vec<&String> = stats.by_state_type.iter().map(|(_, t, _)| t).collect();
        types.sort();
        types.dedup();
        for tt in types {
            for st in TaskState::ALL {
                m.tasks
                    .get_or_create(&vec![
                        ("state", st.as_str().to_owned()),
                        ("task_type", tt.clone()),
                    ])
                    .set(0);
            }
        }
        for (st, tt, n) in &stats.by_state_type {
            m.tasks
                .get_or_create(&vec![
                    ("state", st.as_str().to_owned()),
                    ("task_type", tt.clone()),
                ])
                .set(*n as i64);
        }
        m.queue_depth.set(stats.count(TaskState::Queued) as i64);
    }
    m.workers_online.set(
        state
            .broker()
            .workers()
            .iter()
            .filter(|w| w.connected)
            .count() as i64,
    );
}
