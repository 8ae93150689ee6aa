//! `/healthz`, `/readyz`, `/metrics`.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_protocol::TaskState;
use serde_json::json;

use crate::AppState;
use crate::error::ApiJson;

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive")))]
pub(crate) async fn healthz() -> ApiJson<serde_json::Value> {
    ApiJson(json!({"status": "ok"}))
}

/// Ready to serve: the queue store answers and the file storage (directory or bucket)
/// accepts writes.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready"), (status = 503, description = "not ready")))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
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
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {"queue_store": queue, "file_store": files, "shutting_down": shutting_down},
        "storage": storage,
        "workers": {"online": online, "task_types": types, "paused": state.broker().is_paused()},
    });
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

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, content_type = "text/plain", description = "Prometheus text format")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let m = state.metrics();
    let stats = state.broker().queue().stats().await.ok();
    crate::overview::refresh_metrics(&state, stats.as_ref());
    if let Some(stats) = stats {
        m.tasks.clear();
        // Every state of every known type, so that a state with no task reads 0.
        let mut types: Vec<&String> = stats.by_state_type.iter().map(|(_, t, _)| t).collect();
        types.sort();
        types.dedup();
        for tt in types {
            for st in [
                TaskState::Queued,
                TaskState::Running,
                TaskState::Succeeded,
                TaskState::Failed,
                TaskState::Canceled,
                TaskState::Expired,
            ] {
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
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}
