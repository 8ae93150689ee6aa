//! Task previews: the `preview` SSE event, the task object's link to the latest preview and
//! `GET /v1/tasks/{id}/preview`.
//!
//! The broker stores a preview as a progress event whose data holds `preview` (inline base64
//! `data` or a `file` id) and `"event": "preview"`; a later progress event keeps the
//! preview without its data, as a link. The latest preview is therefore the last such event
//! of the task, found in its stored event log.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use kiln_broker::{Task, TaskEvent, TaskEventKind};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::links::Links;
use crate::tasks::load;

/// The preview a progress event carries (`Null` for any other event).
pub(crate) fn preview_of(e: &TaskEvent) -> &Value {
    match &e.kind {
        TaskEventKind::Progress(d) if d["event"] == "preview" => &d["preview"],
        _ => &Value::Null,
    }
}

/// Whether `e` carries a new preview (not just the link a progress update repeats).
pub(crate) fn is_preview(e: &TaskEvent) -> bool {
    preview_of(e).is_object()
}

/// The URL of a task's latest preview.
fn preview_url(links: &Links, task_id: &str) -> String {
    format!("{}/preview", links.task(task_id))
}

/// The data of the `preview` SSE event for `e`: `task_id`, `ts`, `index`, `mime`,
/// `width`/`height` when known, and the image as `data` (base64) or `file_id` with its
/// `url`.
pub(crate) fn sse_data(links: &Links, e: &TaskEvent) -> Value {
    let p = preview_of(e);
    let mut out = json!({"task_id": e.task_id, "ts": e.ts, "index": p["index"], "mime": p["mime"]});
    for k in ["width", "height", "bytes", "data"] {
        if let Some(v) = p.get(k).filter(|v| !v.is_null()) {
            out[k] = v.clone();
        }
    }
    match p["file"].as_str() {
        Some(f) => {
            out["file_id"] = f.into();
            out["url"] = links.file(f).into();
        }
        None => out["url"] = preview_url(links, &e.task_id).into(),
    }
    out
}

/// What the task object shows of its latest preview: `index`, `mime`, sizes and `url`;
/// `None` when the task has sent none.
pub(crate) fn link(links: &Links, t: &Task) -> Option<Value> {
    let p = t.progress.as_ref()?.get("preview")?.as_object()?;
    let mut out = json!({"index": p.get("index"), "mime": p.get("mime")});
    for k in ["width", "height", "bytes"] {
        if let Some(v) = p.get(k).filter(|v| !v.is_null()) {
            out[k] = v.clone();
        }
    }
    out["url"] = match p.get("file").and_then(Value::as_str) {
        Some(f) => links.file(f),
        None => preview_url(links, &t.id),
    }
    .into();
    Some(out)
}

/// The task's latest preview event, when it has one.
pub(crate) async fn latest(state: &AppState, t: &Task) -> Result<Option<TaskEvent>, ApiError> {
    if link(&Links::new(None, ""), t).is_none() {
        return Ok(None);
    }
    let events = state
        .broker()
        .queue()
        .events_after(&t.id, 0)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(events.into_iter().rev().find(is_preview))
}

/// The bytes and type of a preview event: decoded inline data, or the named file.
pub(crate) async fn image(
    state: &AppState,
    e: &TaskEvent,
) -> Result<Option<(Vec<u8>, String)>, ApiError> {
    let p = preview_of(e);
    let mime = p["mime"].as_str().unwrap_or("image/png").to_owned();
    if let Some(d) = p["data"].as_str() {
        return Ok(base64::engine::general_purpose::STANDARD
            .decode(d)
            .ok()
            .map(|b| (b, mime)));
    }
    let Some(id) = p["file"]
        .as_str()
        .filter(|id| crate::store::valid_file_id(id))
    else {
        return Ok(None);
    };
    let found = state
        .files()
        .read(id)
        .await
        .map_err(crate::files::storage_error)?;
    Ok(found.map(|(meta, data)| (data.to_vec(), meta.content_type)))
}

/// The latest preview image of a task.
#[utoipa::path(get, path = "/v1/tasks/{id}/preview", tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses((status = 200, content_type = "image/*", description = "the latest preview image the task's worker sent"),
        (status = 404, description = "unknown task, or no preview yet")))]
pub(crate) async fn get_latest(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = load(&state, &id).await?;
    let none = || ApiError::not_found(format!("task {id} has no preview"));
    let e = latest(&state, &t).await?.ok_or_else(none)?;
    let (bytes, mime) = image(&state, &e).await?.ok_or_else(none)?;
    let mut resp = (StatusCode::OK, bytes).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&mime) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Some(v) = preview_of(&e)["index"]
        .as_u64()
        .and_then(|i| HeaderValue::from_str(&i.to_string()).ok())
    {
        h.insert("x-kiln-preview-index", v);
    }
    Ok(resp)
}

/// Keeps, of the events in `pending`, only the last preview (earlier ones are superseded).
pub(crate) fn keep_latest(pending: &mut std::collections::VecDeque<TaskEvent>) {
    if let Some(last) = pending.iter().rposition(is_preview) {
        let mut i = 0;
        pending.retain(|e| {
            let keep = i == last || !is_preview(e);
            i += 1;
            keep
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(id: i64, data: Value) -> TaskEvent {
        TaskEvent {
            id,
            task_id: "t-1".into(),
            kind: TaskEventKind::Progress(data),
            ts: 5,
        }
    }

    #[test]
    fn only_the_latest_preview_of_a_replay_is_kept() {
        let p = |i: u32| {
            ev(
                i64::from(i),
                json!({"event": "preview", "preview": {"index": i, "mime": "image/png", "data": "AA=="}}),
            )
        };
        let plain = ev(
            10,
            json!({"step": 1, "preview": {"index": 1, "mime": "image/png"}}),
        );
        let mut q: std::collections::VecDeque<_> =
            vec![p(1), p(2), plain.clone(), p(3), ev(11, json!({"step": 2}))].into();
        keep_latest(&mut q);
        let ids: Vec<i64> = q.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![10, 3, 11]);
        assert!(
            !is_preview(&plain),
            "a progress update's link is not a new preview"
        );
    }

    #[test]
    fn sse_data_names_the_image_by_data_or_file() {
        let inline = ev(
            1,
            json!({"event": "preview", "preview": {"index": 0, "mime": "image/png", "data": "AA==", "bytes": 1}}),
        );
        let d = sse_data(&Links::new(None, ""), &inline);
        assert_eq!(d["data"], "AA==");
        assert_eq!(d["url"], "/v1/tasks/t-1/preview");
        let file = ev(
            2,
            json!({"event": "preview", "preview": {"index": 1, "mime": "image/jpeg", "file": "file_9"}}),
        );
        let d = sse_data(&Links::new(Some("https://k.example/"), ""), &file);
        assert_eq!(d["file_id"], "file_9");
        assert_eq!(d["url"], "https://k.example/v1/files/file_9");
        assert!(d.get("data").is_none());
    }
}
