//! `stream: true` on generations and edits: OpenAI's server-sent events. The task's
//! previews become `image_generation.partial_image` (`image_edit.partial_image`) events, at
//! most `partial_images` of them, each in the requested output format, then every result
//! image an `image_generation.completed` (`image_edit.completed`) event; a failed task ends
//! the stream with an `error` event.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use kiln_broker::{Task, TaskEvent};
use kiln_protocol::TaskState;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::error::OpenAiError;
use super::params::ImageOptions;
use crate::AppState;
use crate::previews::is_preview;
use crate::tasks::load;

/// What the events describe besides the image.
#[derive(Debug, Clone)]
pub(crate) struct StreamCall {
    /// `image_generation` or `image_edit`.
    pub(crate) prefix: &'static str,
    /// The requested `size` (`auto` when none).
    pub(crate) size: String,
    /// The options.
    pub(crate) opts: ImageOptions,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl StreamCall {
    /// The fields every event carries.
    fn event(&self, kind: &str, b64: String, size: Option<(u64, u64)>) -> Value {
        let size = match (self.size.as_str(), size) {
            ("auto", Some((w, h))) => format!("{w}x{h}"),
            (s, _) => s.to_owned(),
        };
        json!({
            "type": format!("{}.{kind}", self.prefix),
            "b64_json": b64,
            "created_at": now_s(),
            "size": size,
            "quality": self.opts.quality.as_deref().unwrap_or("auto"),
            "background": self.opts.background.as_deref().unwrap_or("auto"),
            "output_format": self.opts.output_format.as_deref().unwrap_or("png"),
        })
    }

    fn sse(v: &Value) -> Event {
        let name = v["type"].as_str().unwrap_or("error").to_owned();
        Event::default().event(name).data(v.to_string())
    }

    /// The `partial_image` event of a preview, when its image can be read.
    async fn partial(&self, state: &AppState, e: &TaskEvent, index: u64) -> Option<Event> {
        let (bytes, mime) = crate::previews::image(state, e).await.ok().flatten()?;
        let (bytes, _) = self.opts.convert(Bytes::from(bytes), &mime).await.ok()?;
        let p = crate::previews::preview_of(e);
        let dims = p["width"].as_u64().zip(p["height"].as_u64());
        let mut v = self.event(
            "partial_image",
            base64::engine::general_purpose::STANDARD.encode(&bytes),
            dims,
        );
        v["partial_image_index"] = index.into();
        Some(Self::sse(&v))
    }

    /// The `completed` events of a finished task, or its `error` event.
    async fn finished(&self, state: &AppState, task: &Task) -> Vec<Event> {
        if task.state != TaskState::Succeeded {
            let e = super::images::task_failure(task);
            return vec![error_event(&e)];
        }
        let out = task.output.as_ref().unwrap_or(&Value::Null);
        let usage = out
            .get("usage")
            .filter(|u| u.is_object())
            .cloned()
            .unwrap_or_else(|| {
                json!({"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                    "output_tokens": 0, "total_tokens": 0})
            });
        let mut events = Vec::new();
        for f in out["files"].as_array().into_iter().flatten() {
            let Some(id) = f["id"].as_str() else { continue };
            match self.opts.apply(state, id).await {
                Ok((_, bytes)) => {
                    let dims = image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
                        .with_guessed_format()
                        .ok()
                        .and_then(|r| r.into_dimensions().ok())
                        .map(|(w, h)| (u64::from(w), u64::from(h)));
                    let mut v = self.event(
                        "completed",
                        base64::engine::general_purpose::STANDARD.encode(&bytes),
                        dims,
                    );
                    v["usage"] = usage.clone();
                    events.push(Self::sse(&v));
                }
                Err(e) => {
                    events.push(error_event(&e));
                    break;
                }
            }
        }
        events
    }
}

fn error_event(e: &OpenAiError) -> Event {
    Event::default().event("error").data(
        json!({"type": "error", "error": {"type": "server_error", "code": e.code,
            "message": e.message, "param": e.param}})
        .to_string(),
    )
}

/// Follows the task on the broker's event feed and sends what it sees.
async fn follow(state: AppState, task_id: String, call: StreamCall, tx: mpsc::Sender<Event>) {
    let mut rx = state.broker().subscribe();
    let mut shutdown = state.shutdown_signal();
    let until = tokio::time::Instant::now() + state.config().openai.max_wait;
    let want = u64::from(call.opts.partial_images);
    let mut sent = 0u64;
    // Previews stored before the subscription (a repeated call) count too.
    let mut pending: Vec<TaskEvent> = state
        .broker()
        .queue()
        .events_after(&task_id, 0)
        .await
        .unwrap_or_default();
    let mut changed = true;
    // An event committed between the subscription and the read above comes twice.
    let mut seen = 0i64;
    loop {
        let mut done = false;
        for e in pending.drain(..) {
            if e.task_id != task_id || e.id <= seen {
                continue;
            }
            seen = e.id;
            if is_preview(&e)
                && sent < want
                && let Some(ev) = call.partial(&state, &e, sent).await
            {
                if tx.send(ev).await.is_err() {
                    return;
                }
                sent += 1;
            }
            done |= e.kind.is_completed();
        }
        if changed {
            let task = match load(&state, &task_id).await {
                Ok(t) => t,
                Err(e) => {
                    let _ = tx.send(error_event(&OpenAiError::from(e))).await;
                    return;
                }
            };
            if done || task.state.is_terminal() {
                for ev in call.finished(&state, &task).await {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                return;
            }
            changed = false;
        }
        tokio::select! {
            r = rx.recv() => match r {
                Ok(e) if e.task_id == task_id => {
                    changed |= !matches!(e.kind, kiln_broker::TaskEventKind::Progress(_));
                    pending.push(e);
                }
                Ok(_) => {}
                // Fell behind the feed: the task may have ended meanwhile.
                Err(broadcast::error::RecvError::Lagged(_)) => changed = true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep_until(until) => {
                let e = OpenAiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("the task {task_id} is still running after the wait limit; follow it at /v1/tasks/{task_id}"),
                );
                let _ = tx.send(error_event(&e)).await;
                return;
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// The streaming answer for a submitted task.
pub(crate) fn respond(state: &AppState, task_id: String, mut call: StreamCall) -> Response {
    // The events name a format, so every image is sent in it (PNG unless asked otherwise).
    call.opts.output_format.get_or_insert_with(|| "png".into());
    let (tx, mut rx) = mpsc::channel::<Event>(8);
    tokio::spawn(follow(state.clone(), task_id.clone(), call, tx));
    let s = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(Ok::<_, Infallible>))
    });
    let mut resp = Sse::new(s)
        .keep_alive(KeepAlive::new().interval(state.config().sse_heartbeat))
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&task_id) {
        resp.headers_mut().insert("x-kiln-task-id", v);
    }
    resp
}
