//! `GET /v1/tasks/{id}/events`: server-sent events with ids, resumable with
//! `Last-Event-ID`, with a heartbeat comment so proxies keep the stream open.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use kiln_broker::TaskEvent;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, watch};

use crate::AppState;
use crate::error::{ApiError, ApiQuery};
use crate::tasks::load;

/// Where to resume.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventParams {
    /// Resume after this event id (the `Last-Event-ID` header wins).
    last_event_id: Option<i64>,
}

struct Feed {
    state: AppState,
    task_id: String,
    pending: VecDeque<TaskEvent>,
    last: i64,
    done: bool,
    rx: broadcast::Receiver<TaskEvent>,
    shutdown: watch::Receiver<bool>,
}

fn to_event(e: &TaskEvent) -> Event {
    let mut data = e.kind.data();
    if let Some(o) = data.as_object_mut() {
        o.insert("task_id".into(), json!(e.task_id));
        o.insert("ts".into(), json!(e.ts));
    }
    Event::default()
        .id(e.id.to_string())
        .event(e.kind.name())
        .data(data.to_string())
}

/// Stream a task's events: `status`, `progress` and `completed` (the last one).
#[utoipa::path(get, path = "/v1/tasks/{id}/events", tag = "tasks",
    params(("id" = String, Path, description = "task id"), ("Last-Event-ID" = Option<String>, Header, description = "resume after this id"), EventParams),
    responses((status = 200, content_type = "text/event-stream", description = "the event stream"), (status = 404, description = "unknown id")))]
pub(crate) async fn stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(p): ApiQuery<EventParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let header_id = match headers
        .get("last-event-id")
        .map(|v| v.to_str().map(|s| s.trim().parse::<i64>()))
    {
        None => None,
        Some(Ok(Ok(n))) => Some(n),
        Some(_) => {
            return Err(ApiError::invalid(
                "Last-Event-ID must be an event id this API sent",
            ));
        }
    };
    let last = header_id.or(p.last_event_id).unwrap_or(0);
    // A task already terminal before subscribing has its `completed` event in the store.
    let terminal = load(&state, &id).await?.state.is_terminal();
    // Subscribe before reading the stored events so nothing falls between the two.
    let rx = state.broker().subscribe();
    let pending: VecDeque<TaskEvent> = state
        .broker()
        .queue()
        .events_after(&id, last)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .into();
    let done = terminal && pending.is_empty();
    let feed = Feed {
        shutdown: state.shutdown_signal(),
        state: state.clone(),
        task_id: id,
        pending,
        last,
        done,
        rx,
    };
    let s = futures_util::stream::unfold(feed, |mut f| async move {
        loop {
            if let Some(e) = f.pending.pop_front() {
                if e.id <= f.last {
                    continue;
                }
                f.last = e.id;
                if e.kind.is_completed() {
                    f.done = true;
                    f.pending.clear();
                }
                return Some((Ok(to_event(&e)), f));
            }
            if f.done || *f.shutdown.borrow() {
                return None;
            }
            tokio::select! {
                r = f.rx.recv() => match r {
                    Ok(e) if e.task_id == f.task_id => f.pending.push_back(e),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the live feed: catch up from the store.
                        match f.state.broker().queue().events_after(&f.task_id, f.last).await {
                            Ok(v) => f.pending.extend(v),
                            Err(_) => return None,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = f.shutdown.changed() => return None,
            }
        }
    });
    Ok(Sse::new(s).keep_alive(
        KeepAlive::new()
            .interval(state.config().sse_heartbeat)
            .text("heartbeat"),
    ))
}
