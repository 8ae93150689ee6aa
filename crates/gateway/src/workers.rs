//! The worker WebSocket endpoint and worker administration.

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use kiln_broker::WorkerInfo;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiJson};

/// Connect a worker (WebSocket, subprotocol `kiln.v1`; see docs/PROTOCOL.md).
#[utoipa::path(get, path = "/v1/workers/connect", tag = "workers",
    responses((status = 101, description = "switching to the kiln.v1 WebSocket protocol"),
        (status = 400, description = "not a WebSocket upgrade, or `Sec-WebSocket-Protocol` does not offer kiln.v1"),
        (status = 401, description = "bad worker token")))]
pub(crate) async fn connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::malformed(format!("expected a WebSocket upgrade: {}", e.body_text()))
                .into_response();
        }
    };
    if !offers_subprotocol(&headers) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "subprotocol_required",
            format!(
                "the worker protocol needs `Sec-WebSocket-Protocol: {}` on the upgrade request",
                kiln_protocol::SUBPROTOCOL
            ),
        )
        .into_response();
    }
    if state.shutting_down() {
        return ApiError::unavailable("the gateway is shutting down").into_response();
    }
    // Frames up to the hard limit are read, so that one over `max_frame_bytes` is answered
    // with an `oversized` error envelope; above it the connection closes with 1009.
    let max = state.broker().config().frame_hard_limit_bytes;
    ws.protocols([kiln_protocol::SUBPROTOCOL])
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| run(state, socket))
}

/// Whether the upgrade request offers `kiln.v1` among its subprotocols.
fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == kiln_protocol::SUBPROTOCOL)
}

/// Whether a read failed because a frame was over the WebSocket's size limit. axum hides
/// the WebSocket library's error type, so this reads its text ("Space limit exceeded:
/// Message too long: …").
fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("Message too long") || text.contains("Space limit exceeded")
}

async fn run(state: AppState, socket: WebSocket) {
    let (mut tx, rx) = socket.split();
    let too_big = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = too_big.clone();
    let frames = rx.filter_map(move |m| {
        let seen = seen.clone();
        async move {
            match m {
                Ok(WsMessage::Text(t)) => Some(Ok::<String, axum::Error>(t.to_string())),
                // Binary frames are a protocol violation; hand the session something that
                // fails to decode so it answers with an error envelope.
                Ok(WsMessage::Binary(_)) => Some(Ok("binary frame".to_owned())),
                Ok(_) => None,
                Err(e) => {
                    if is_too_big(&e) {
                        seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    Some(Err(e))
                }
            }
        }
    });
    let end = {
        let sink = Box::pin(
            (&mut tx)
                .with(|s: String| async move { Ok::<_, axum::Error>(WsMessage::Text(s.into())) }),
        );
        state
            .broker()
            .clone()
            .serve_session(Box::pin(frames), sink)
            .await
    };
    let end = if too_big.load(std::sync::atomic::Ordering::SeqCst) {
        let limit = state.broker().config().frame_hard_limit_bytes;
        tracing::warn!(message = "worker frame over the hard limit; closing", limit);
        kiln_broker::SessionEnd {
            code: kiln_protocol::close::TOO_BIG,
            reason: format!("frame over the hard limit of {limit} bytes"),
        }
    } else {
        end
    };
    let frame = CloseFrame {
        code: end.code,
        reason: end.reason.chars().take(120).collect::<String>().into(),
    };
    let _ = tx.send(WsMessage::Close(Some(frame))).await;
}

/// Connected workers.
#[utoipa::path(get, path = "/v1/workers", tag = "workers", responses((status = 200, description = "workers", body = Object)))]
pub(crate) async fn list(State(state): State<AppState>) -> ApiJson<Value> {
    let workers: Vec<WorkerInfo> = state.broker().workers();
    ApiJson(json!({"data": workers, "paused": state.broker().is_paused()}))
}

/// Ask a worker to finish its work and take no more.
#[utoipa::path(post, path = "/v1/workers/{id}/drain", tag = "workers",
    params(("id" = String, Path, description = "worker id")),
    responses((status = 202, description = "drain sent"), (status = 404, description = "unknown worker")))]
pub(crate) async fn drain(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if state.broker().drain_worker(&id) {
        state.inner.live.poke();
        Ok((
            StatusCode::ACCEPTED,
            ApiJson(json!({"worker_id": id, "draining": true})),
        )
            .into_response())
    } else {
        Err(ApiError::not_found(format!("no worker {id}")))
    }
}

/// Forget the secret issued to a worker id (after its state dir was lost): the next hello
/// under that id registers afresh and gets a new secret. A connected worker keeps running.
#[utoipa::path(delete, path = "/v1/workers/{id}/identity", tag = "workers",
    params(("id" = String, Path, description = "worker id")),
    responses((status = 200, description = "forgotten"), (status = 404, description = "no secret stored for this worker id")))]
pub(crate) async fn forget_identity(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<ApiJson<Value>, ApiError> {
    match state.broker().forget_identity(&id).await {
        Ok(true) => Ok(ApiJson(json!({"worker_id": id, "identity": "forgotten"}))),
        Ok(false) => Err(ApiError::not_found(format!(
            "no identity stored for worker {id}"
        ))),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Stop dispatching tasks (submissions are still accepted).
#[utoipa::path(post, path = "/v1/admin/queue/pause", tag = "admin", responses((status = 200, description = "paused")))]
pub(crate) async fn pause(State(state): State<AppState>) -> ApiJson<Value> {
    state.broker().set_paused(true);
    state.inner.live.poke();
    ApiJson(json!({"paused": true}))
}

/// Resume dispatching.
#[utoipa::path(post, path = "/v1/admin/queue/resume", tag = "admin", responses((status = 200, description = "resumed")))]
pub(crate) async fn resume(State(state): State<AppState>) -> ApiJson<Value> {
    state.broker().set_paused(false);
    state.inner.live.poke();
    ApiJson(json!({"paused": false}))
}
