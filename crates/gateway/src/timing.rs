//! Per-stage task timings and the gateway's `task` span.
//!
//! Stages measured here: `queued_ms` (all waits in the queue), `dispatch_ms` (the wait
//! before the latest attempt was assigned), `run_ms` (all attempts, assignment to end),
//! `compress_ms` (compressing the task's reference images when they were uploaded) and
//! `upload_ms` (storing the task's output files). Workers report their own stages with the
//! result (`timings.worker`). Recorded stages live in the queue store beside the task.
//!
//! Each task gets one `task` span (task_id, task_type, attempt) from acceptance to its end,
//! when the stage timings are recorded on it as fields and a `task ended` event is logged
//! in it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, Weak};

use kiln_broker::{AttemptRecord, Task, TaskDetail, TaskEvent, TaskEventKind, now_ms};
use kiln_protocol::TaskState;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast::{self, error::RecvError};
use tracing::Span;
use tracing::field::Empty;

use crate::store::valid_file_id;
use crate::{AppState, Inner};

/// Open spans kept at most; beyond it a span is made when the task ends.
const MAX_OPEN: usize = 10_000;
/// File ids looked up in a task's input, at most.
const MAX_REFS: usize = 32;

/// Time spent per stage, ms. Stages that did not happen are absent (`queued_ms` and
/// `run_ms` are null before the first assignment).
#[derive(Debug, Default, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub(crate) struct Timings {
    /// Time in the queue, all attempts.
    pub(crate) queued_ms: Option<u64>,
    /// Wait before the latest attempt was assigned to a worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) dispatch_ms: Option<u64>,
    /// Time running, all attempts (assignment to result, or to now).
    pub(crate) run_ms: Option<u64>,
    /// Compressing the reference images the input names, at upload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) compress_ms: Option<u64>,
    /// Storing the output files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upload_ms: Option<u64>,
    /// Stages the worker reported with its result (e.g. `render_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) worker: Option<BTreeMap<String, u64>>,
}

impl Timings {
    /// The timings of `t` from its attempts and the recorded stages.
    pub(crate) fn of(
        t: &Task,
        attempts: &[AttemptRecord],
        recorded: Option<&Value>,
        now: u64,
    ) -> Self {
        let mut out = Timings::default();
        let mut since = t.created_at;
        let last = attempts.len().saturating_sub(1);
        for (i, a) in attempts.iter().enumerate() {
            let wait = a.started_at.saturating_sub(since);
            out.queued_ms = Some(out.queued_ms.unwrap_or(0) + wait);
            out.dispatch_ms = Some(wait);
            let end = match a.ended_at {
                Some(e) => e,
                None if i == last => t.completed_at.unwrap_or(now),
                None => a.started_at,
            };
            out.run_ms = Some(out.run_ms.unwrap_or(0) + end.saturating_sub(a.started_at));
            since = end.max(a.started_at);
        }
        if t.state == TaskState::Queued && !attempts.is_empty() {
            out.queued_ms = out.queued_ms.map(|q| q + now.saturating_sub(since));
        }
        if let Some(r) = recorded {
            out.compress_ms = r["compress_ms"].as_u64();
            out.upload_ms = r["upload_ms"].as_u64();
            out.worker = r["worker"].as_object().map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_u64().map(|v| (k.clone(), v)))
                    .collect()
            });
        }
        out
    }
}

/// The open `task` spans, by task id.
#[derive(Debug, Default)]
pub(crate) struct TaskSpans {
    open: Mutex<HashMap<String, Span>>,
}

fn task_span(id: &str, task_type: &str, attempt: u32) -> Span {
    tracing::info_span!(
        "task",
        task_id = %id,
        task_type = %task_type,
        attempt,
        status = Empty,
        queued_ms = Empty,
        dispatch_ms = Empty,
        run_ms = Empty,
        compress_ms = Empty,
        upload_ms = Empty,
        worker = Empty,
    )
}

impl TaskSpans {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Span>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Option<Span> {
        self.lock().get(id).cloned()
    }

    fn take(&self, t: &Task) -> Span {
        self.lock()
            .remove(&t.id)
            .unwrap_or_else(|| task_span(&t.id, &t.task_type, t.attempt))
    }
}

/// A task was accepted through `api` (`tasks`, `openai.images`): opens its span, logs it
/// there, and records the compression time of the reference images its input names (in
/// the background).
pub(crate) fn accepted(state: &AppState, task: &Task, api: &str) {
    let span = task_span(&task.id, &task.task_type, task.attempt);
    tracing::info!(parent: &span, message = "task accepted", task_id = %task.id, task_type = %task.task_type, api);
    {
        let mut open = state.inner.spans.lock();
        if open.len() < MAX_OPEN {
            open.insert(task.id.clone(), span);
        }
    }
    let mut refs = Vec::new();
    file_refs(&task.input, 0, &mut refs);
    if refs.is_empty() {
        return;
    }
    let (state, id) = (state.clone(), task.id.clone());
    tokio::spawn(async move {
        if let Some(ms) = stage_sum(&state, &refs, |m| m.compress_ms).await {
            record(&state, &id, "compress_ms", ms).await;
        }
    });
}

/// File ids anywhere in `v` (strings shaped like `file_<32 hex>`), at most [`MAX_REFS`].
fn file_refs(v: &Value, depth: usize, out: &mut Vec<String>) {
    if out.len() >= MAX_REFS || depth > 4 {
        return;
    }
    match v {
        Value::String(s) if valid_file_id(s) && !out.contains(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| file_refs(x, depth + 1, out)),
        Value::Object(m) => m.values().for_each(|x| file_refs(x, depth + 1, out)),
        _ => {}
    }
}

/// The sum of one metadata stage over the files that have it; `None` when none has.
async fn stage_sum(
    state: &AppState,
    ids: &[String],
    stage: impl Fn(&crate::FileMeta) -> Option<u64>,
) -> Option<u64> {
    let mut sum = None;
    for id in ids {
        match state.files().meta(id).await {
            Ok(Some(m)) => {
                if let Some(ms) = stage(&m) {
                    sum = Some(sum.unwrap_or(0) + ms);
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(message = "file metadata unavailable for timings", file_id = %id, error = %e)
            }
        }
    }
    sum
}

async fn record(state: &AppState, task_id: &str, stage: &str, ms: u64) {
    let mut m = serde_json::Map::new();
    m.insert(stage.to_owned(), Value::from(ms));
    if let Err(e) = state.broker().queue().merge_timings(task_id, &m).await {
        tracing::warn!(message = "task timing not stored", task_id = %task_id, stage, error = %e);
    }
}

/// Follows the broker's events: records assignments on the open span, and at a task's
/// end its upload time, then every stage on the span. Stops when the state or the
/// broker is gone.
pub(crate) async fn follow(state: Weak<Inner>, mut events: broadcast::Receiver<TaskEvent>) {
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(RecvError::Closed) => return,
            Err(RecvError::Lagged(n)) => {
                let Some(inner) = state.upgrade() else { return };
                let state = AppState { inner };
                tracing::warn!(
                    message = "task events missed; closing spans of ended tasks",
                    missed = n
                );
                let ids: Vec<String> = state.inner.spans.lock().keys().cloned().collect();
                for id in ids {
                    if let Ok(Some(d)) = state.broker().queue().detail(&id).await
                        && d.task.state.is_terminal()
                    {
                        ended(&state, d).await;
                    }
                }
                continue;
            }
        };
        let Some(inner) = state.upgrade() else { return };
        let state = AppState { inner };
        match &ev.kind {
            TaskEventKind::Status {
                status: TaskState::Running,
                attempt,
                worker_id,
            } => {
                if let Some(span) = state.inner.spans.get(&ev.task_id) {
                    span.record("attempt", attempt);
                    tracing::info!(parent: &span, message = "task assigned", attempt, worker_id = worker_id.as_deref().unwrap_or(""));
                }
            }
            TaskEventKind::Completed { .. } => {
                match state.broker().queue().detail(&ev.task_id).await {
                    Ok(Some(d)) => ended(&state, d).await,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(message = "ended task unreadable", task_id = %ev.task_id, error = %e)
                    }
                }
            }
            _ => {}
        }
    }
}

/// Records the upload time of the task's output files, then closes its span with every
/// stage.
async fn ended(state: &AppState, d: TaskDetail) {
    let TaskDetail {
        task: t,
        attempts,
        timings: mut recorded,
        ..
    } = d;
    let outputs: Vec<String> = t
        .output
        .as_ref()
        .and_then(|o| o["files"].as_array())
        .map(|a| {
            a.iter()
                .filter_map(|f| f["id"].as_str())
                .filter(|id| valid_file_id(id))
                .take(MAX_REFS)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(ms) = stage_sum(state, &outputs, |m| m.store_ms).await {
        record(state, &t.id, "upload_ms", ms).await;
        // What was just stored, without reading it back.
        match &mut recorded {
            Some(Value::Object(m)) => {
                m.insert("upload_ms".into(), Value::from(ms));
            }
            _ => recorded = Some(serde_json::json!({ "upload_ms": ms })),
        }
    }
    let timings = Timings::of(&t, &attempts, recorded.as_ref(), now_ms());
    state.metrics().task_ended(
        &t.task_type,
        t.state.as_str(),
        t.dead_lettered,
        timings.queued_ms,
        timings.run_ms,
    );
    let span = state.inner.spans.take(&t);
    span.record("attempt", t.attempt);
    span.record("status", t.state.as_str());
    for (field, v) in [
        ("queued_ms", timings.queued_ms),
        ("dispatch_ms", timings.dispatch_ms),
        ("run_ms", timings.run_ms),
        ("compress_ms", timings.compress_ms),
        ("upload_ms", timings.upload_ms),
    ] {
        if let Some(v) = v {
            span.record(field, v);
        }
    }
    if let Some(w) = &timings.worker {
        span.record("worker", tracing::field::display(serde_json::json!(w)));
    }
    tracing::info!(parent: &span, message = "task ended", task_id = %t.id, status = t.state.as_str(), attempt = t.attempt);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn stages_come_from_attempts_and_records() {
        use kiln_broker::Queue as _;
        let q = kiln_broker::SqliteQueue::in_memory(3).unwrap();
        let new = kiln_broker::NewTask {
            task_type: "t".into(),
            ..Default::default()
        };
        let t0 = 1_000_000;
        let (t, _) = q.enqueue(new, t0).await.unwrap();
        let types = kiln_broker::Capabilities {
            task_types: vec!["t".to_owned()],
            ..Default::default()
        };
        // Queued 100 ms, then the first attempt fails after 50 ms (retryable).
        let lease = q
            .reserve("w", &types, 1, t0 + 90_000, t0 + 100)
            .await
            .unwrap()[0]
            .lease
            .clone()
            .unwrap();
        let err = kiln_protocol::messages::TaskError::retryable("oom", "x");
        q.complete(&lease, kiln_broker::Completion::Error(err), t0 + 150)
            .await
            .unwrap();
        // Waits 30 ms again (past the retry backoff), runs 20 ms, succeeds.
        let lease = q
            .reserve("w", &types, 1, t0 + 90_000, t0 + 180)
            .await
            .unwrap()[0]
            .lease
            .clone()
            .unwrap();
        q.complete(&lease, kiln_broker::Completion::Ok(json!({})), t0 + 200)
            .await
            .unwrap();
        let t = q.get(&t.id).await.unwrap().unwrap();
        let attempts = q.attempts(&t.id).await.unwrap();
        let rec = json!({"compress_ms": 9, "worker": {"render_ms": 15}});
        let got = Timings::of(&t, &attempts, Some(&rec), t0 + 10_000);
        assert_eq!(got.queued_ms, Some(130));
        assert_eq!(got.dispatch_ms, Some(30));
        assert_eq!(got.run_ms, Some(70));
        assert_eq!(got.compress_ms, Some(9));
        assert_eq!(got.upload_ms, None);
        assert_eq!(got.worker, Some([("render_ms".to_owned(), 15)].into()));
        let wall = t.completed_at.unwrap() - t.created_at;
        assert!(got.queued_ms.unwrap() + got.run_ms.unwrap() <= wall);
        // Absent stages are left out of the JSON.
        let v = serde_json::to_value(Timings::default()).unwrap();
        assert_eq!(v, json!({"queued_ms": null, "run_ms": null}));
    }

    #[test]
    fn file_refs_are_found_once_and_bounded() {
        let a = format!("file_{}", "a".repeat(32));
        let b = format!("file_{}", "b".repeat(32));
        let input = json!({"image": a, "refs": [b, a, "file_nope"], "prompt": "x"});
        let mut out = Vec::new();
        file_refs(&input, 0, &mut out);
        out.sort();
        assert_eq!(out, vec![a, b]);
        let many: Vec<String> = (0..100).map(|i| format!("file_{i:032x}")).collect();
        let mut out = Vec::new();
        file_refs(&json!(many), 0, &mut out);
        assert_eq!(out.len(), MAX_REFS);
    }
}
