//! What an operator watches: `GET /v1/events` (the gateway-wide live feed, see `live.rs`),
//! `GET /v1/queue` (depth per task type and model), `GET /v1/queue/throughput` (ended tasks
//! per minute over the last hour), and the scrape-time gauges of `/metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use kiln_broker::{ListFilter, Stats, Task, now_ms};
use kiln_protocol::TaskState;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::live::LiveEvent;

/// Where to resume the live feed.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct LiveParams {
    /// Resume after this event id (the `Last-Event-ID` header wins).
    last_event_id: Option<String>,
}

struct Feed {
    state: AppState,
    pending: VecDeque<Event>,
    rx: broadcast::Receiver<LiveEvent>,
    shutdown: watch::Receiver<bool>,
}

fn to_event(state: &AppState, e: &LiveEvent) -> Event {
    Event::default()
        .id(state.inner.live.wire_id(e.id))
        .event(e.kind)
        .data(e.data.to_string())
}

fn resync(reason: &str) -> Event {
    Event::default()
        .event("resync")
        .data(json!({ "reason": reason }).to_string())
}

/// The gateway-wide live feed (SSE): `worker.online`, `worker.draining`, `worker.offline`,
/// `worker.updated`, `queue.paused`, `queue.resumed`, `queue.backlog`, `task.queued`,
/// `task.started`, `task.completed`, and `resync` when the events after `Last-Event-ID`
/// are no longer known (reload snapshots). See docs/EVENTS.md.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(("Last-Event-ID" = Option<String>, Header, description = "resume after this id"), LiveParams),
    responses((status = 200, content_type = "text/event-stream", description = "the event stream")))]
pub(crate) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(p): ApiQuery<LiveParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let header_id = match headers.get("last-event-id").map(|v| v.to_str()) {
        None => None,
        Some(Ok(s)) => Some(s.trim().to_owned()),
        Some(Err(_)) => {
            return Err(ApiError::invalid(
                "Last-Event-ID must be an event id this API sent",
            ));
        }
    };
    let last = header_id.or(p.last_event_id).filter(|s| !s.is_empty());
    let (rx, replay) = state.inner.live.resume(last.as_deref());
    let pending: VecDeque<Event> = match replay {
        Some(v) => v.iter().map(|e| to_event(&state, e)).collect(),
        None => [resync("unknown_last_event_id")].into(),
    };
    let feed = Feed {
        shutdown: state.shutdown_signal(),
        state: state.clone(),
        pending,
        rx,
    };
    let s = futures_util::stream::unfold(feed, |mut f| async move {
        loop {
            if let Some(e) = f.pending.pop_front() {
                return Some((Ok(e), f));
            }
            if *f.shutdown.borrow() {
                return None;
            }
            tokio::select! {
                r = f.rx.recv() => match r {
                    Ok(e) => f.pending.push_back(to_event(&f.state, &e)),
                    Err(broadcast::error::RecvError::Lagged(_)) => f.pending.push_back(resync("lagged")),
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

/// Tasks scanned per state at most by `GET /v1/queue`.
const SCAN: usize = 5000;

/// Queue depth of one (task type, model).
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub(crate) struct DepthRow {
    task_type: String,
    model: Option<String>,
    /// Queued, never run.
    queued: u64,
    /// Queued again after a failed attempt, waiting for its retry time.
    retry_waiting: u64,
    /// Leased to a worker.
    running: u64,
    /// Failed after their last allowed attempt (dead-lettered).
    dead: u64,
}

/// Queue depth by task type and model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct QueueView {
    /// Dispatch is paused (`/v1/admin/queue/pause`).
    paused: bool,
    rows: Vec<DepthRow>,
    /// False when a state held more tasks than one scan reads (5000): counts are then lower
    /// bounds; `kiln_tasks` in `/metrics` has exact counts by state and type.
    exact: bool,
}

async fn scan(state: &AppState, st: TaskState) -> Result<(Vec<Task>, bool), ApiError> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = state
            .broker()
            .queue()
            .list(&ListFilter {
                state: Some(st),
                task_type: None,
                limit: 500,
                before_seq: before,
            })
            .await
            .map_err(|e| ApiError::unavailable(format!("the queue store failed: {e}")))?;
        let n = page.len();
        before = page.last().map(|t| t.seq);
        out.extend(page);
        if n < 500 {
            return Ok((out, true));
        }
        if out.len() >= SCAN {
            return Ok((out, false));
        }
    }
}

/// Queue depth per task type and model: queued, waiting for a retry, running, dead.
#[utoipa::path(get, path = "/v1/queue", tag = "queue",
    responses((status = 200, body = QueueView)))]
pub(crate) async fn queue(State(state): State<AppState>) -> Result<ApiJson<QueueView>, ApiError> {
    let mut rows: BTreeMap<(String, Option<String>), DepthRow> = BTreeMap::new();
    let mut exact = true;
    for st in [TaskState::Queued, TaskState::Running, TaskState::Failed] {
        let (tasks, all) = scan(&state, st).await?;
        exact &= all;
        for t in tasks {
            if st == TaskState::Failed && !t.dead_lettered {
                continue;
            }
            let row = rows
                .entry((t.task_type.clone(), t.model.clone()))
                .or_insert_with(|| DepthRow {
                    task_type: t.task_type.clone(),
                    model: t.model.clone(),
                    ..DepthRow::default()
                });
            match st {
                TaskState::Queued if t.attempt > 0 => row.retry_waiting += 1,
                TaskState::Queued => row.queued += 1,
                TaskState::Running => row.running += 1,
                _ => row.dead += 1,
            }
        }
    }
    Ok(ApiJson(QueueView {
        paused: state.broker().is_paused(),
        rows: rows.into_values().collect(),
        exact,
    }))
}

/// Tasks that ended per minute over the last hour, by status.
#[utoipa::path(get, path = "/v1/queue/throughput", tag = "queue",
    responses((status = 200, description = "`{bucket_s, buckets: [{start, start_ms, counts: {status: n}}]}`, oldest first", body = Object)))]
pub(crate) async fn throughput(State(state): State<AppState>) -> ApiJson<Value> {
    let buckets = state
        .inner
        .live
        .throughput
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .snapshot(now_ms());
    ApiJson(json!({"bucket_s": crate::live::BUCKET_MS / 1000, "buckets": buckets}))
}

/// Sets the scrape-time gauges from the queue's counts and the session table.
pub(crate) fn refresh_metrics(state: &AppState, stats: Option<&Stats>) {
    let m = state.metrics();
    if let Some(stats) = stats {
        for (_, tt, _) in &stats.by_state_type {
            let tt = || ("task_type", tt.clone());
            let _ = m.dead_lettered.get_or_create(&vec![tt()]);
            let _ = m.queue_wait.get_or_create(&vec![tt()]);
            let _ = m.task_run.get_or_create(&vec![tt()]);
            for st in ["succeeded", "failed", "canceled", "expired"] {
                let _ = m
                    .completed
                    .get_or_create(&vec![tt(), ("status", st.to_owned())]);
            }
        }
    }
    let workers = state.broker().workers();
    let mut by_state: BTreeMap<&str, i64> = [("online", 0), ("draining", 0), ("offline", 0)].into();
    let mut serving: BTreeMap<String, i64> = BTreeMap::new();
    let (mut used, mut total) = (0i64, 0i64);
    for w in &workers {
        let st = match (w.connected, w.draining) {
            (true, false) => "online",
            (true, true) => "draining",
            (false, _) => "offline",
        };
        *by_state.entry(st).or_default() += 1;
        if w.connected {
            used += w.inflight as i64;
            total += i64::from(w.slots);
        }
        if st == "online" {
            for tt in &w.capabilities.task_types {
                *serving.entry(tt.clone()).or_default() += 1;
            }
        }
    }
    for (st, n) in by_state {
        m.workers
            .get_or_create(&vec![("state", st.to_owned())])
            .set(n);
    }
    m.workers_serving.clear();
    for (tt, n) in serving {
        m.workers_serving
            .get_or_create(&vec![("task_type", tt)])
            .set(n);
    }
    m.worker_slots
        .get_or_create(&vec![("state", "used".to_owned())])
        .set(used);
    m.worker_slots
        .get_or_create(&vec![("state", "total".to_owned())])
        .set(total);
    m.queue_paused.set(i64::from(state.broker().is_paused()));
}
