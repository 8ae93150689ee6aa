//! `/v1/tasks`: create, get, list, cancel (retry: `retry.rs`).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_broker::{CancelOutcome, ListFilter, NewTask, QueueError, Task, now_ms};
use kiln_protocol::TaskState;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::links::Links;
use crate::submit::{Repeat, Submission};
use crate::timing::Timings;

/// A task to create.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTask {
    /// Task type, e.g. `txt2img`.
    task_type: String,
    /// Input handed to the worker.
    #[schema(value_type = Object)]
    #[serde(default)]
    input: Value,
    /// Idempotency key (the `Idempotency-Key` header is an alias).
    request_id: Option<String>,
    /// Higher runs first.
    #[serde(default)]
    priority: i32,
    /// Seconds until the task expires.
    deadline_s: Option<u64>,
    /// Free-form metadata returned with the task.
    #[schema(value_type = Object)]
    metadata: Option<Value>,
    /// The model the task needs: only workers listing it in their `models` run the task.
    /// 1 to 128 visible ASCII characters.
    #[schema(min_length = 1, max_length = 128)]
    model: Option<String>,
    /// Labels the worker must have, all of them (e.g. `gpu=a100`): at most 16, each 1 to
    /// 128 visible ASCII characters.
    #[serde(default)]
    #[schema(max_items = 16)]
    labels: Vec<String>,
    /// Where to send this task's webhook messages: an absolute `http` or `https` URL of at
    /// most 2048 bytes. See docs/WEBHOOKS.md.
    #[schema(max_length = 2048)]
    webhook: Option<String>,
    /// The events the webhook receives (`started`, `progress`, `completed`); default
    /// `["completed"]`. Only with `webhook`.
    #[serde(default)]
    #[schema(max_items = 3)]
    webhook_events: Vec<WebhookEventName>,
}

/// A task event a webhook may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WebhookEventName {
    /// `task.started`: an attempt started running.
    Started,
    /// `task.progress`: progress, at most once a second.
    Progress,
    /// `task.completed`: the task ended (any terminal state).
    Completed,
}

impl WebhookEventName {
    fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Progress => "progress",
            Self::Completed => "completed",
        }
    }
}

/// The most labels one task may ask for.
const MAX_LABELS: usize = 16;

/// A model name or label: 1 to 128 visible ASCII characters.
fn routing_name(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Progress of a running task.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ProgressView {
    stage: Option<String>,
    step: u64,
    total: u64,
    percent: Option<f64>,
    eta_ms: Option<u64>,
}

/// One attempt.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct AttemptView {
    attempt: u32,
    worker: String,
    started_at: String,
    ended_at: Option<String>,
    error: Option<String>,
}

/// A task as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TaskView {
    id: String,
    request_id: Option<String>,
    task_type: String,
    /// The input as submitted.
    #[schema(value_type = Object)]
    input: Value,
    /// queued | running | succeeded | failed | canceled | expired
    status: String,
    /// Queued tasks of the same type and model that run before this one (0: next);
    /// `null` unless queued.
    queue_position: Option<u64>,
    /// Seconds until the task should start (whole seconds, rounded to the nearest; see "Queue ETA" in
    /// docs/PROTOCOL.md); `null` unless queued, or when unknown (no worker serving it is
    /// online, no run time recorded yet, the queue is paused).
    estimated_start_s: Option<u64>,
    /// Seconds until the task should finish; `null` as `estimated_start_s`, and while no
    /// run time of its type and model is recorded.
    estimated_finish_s: Option<u64>,
    /// Queued while no connected worker serves its type, model and labels: it starts when
    /// one comes (back). False otherwise.
    waiting_for_worker: bool,
    progress: Option<ProgressView>,
    /// The latest preview the worker sent (`index`, `mime`, `url`, sizes), if any.
    #[schema(value_type = Object)]
    preview: Option<Value>,
    attempts: Vec<AttemptView>,
    created_at: String,
    started_at: Option<String>,
    completed_at: Option<String>,
    #[schema(value_type = Object)]
    output: Option<Value>,
    #[schema(value_type = Object)]
    error: Option<Value>,
    timings: Timings,
    priority: i32,
    deadline: Option<String>,
    #[schema(value_type = Object)]
    metadata: Option<Value>,
    /// The model a worker must serve, if any.
    model: Option<String>,
    /// Labels a worker must have (sorted).
    labels: Vec<String>,
    dead_lettered: bool,
    cancel_requested: bool,
    /// Where the task's webhook messages go, if anywhere.
    webhook: Option<String>,
    /// The events its webhook receives: `started`, `progress`, `completed`.
    webhook_events: Vec<String>,
}

pub(crate) fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Adds a `url` to every `output.files[]` entry that names a stored file.
fn with_file_urls(mut output: Value, links: &Links) -> Value {
    if let Some(files) = output.get_mut("files").and_then(Value::as_array_mut) {
        for f in files {
            if let Some(id) = f.get("id").and_then(Value::as_str).map(str::to_owned)
                && let Some(obj) = f.as_object_mut()
            {
                obj.entry("url")
                    .or_insert_with(|| Value::from(links.file(&id)));
            }
        }
    }
    output
}

pub(crate) async fn view(state: &AppState, links: &Links, t: Task) -> Result<TaskView, ApiError> {
    let q = state.broker().queue();
    let attempts = q.attempts(&t.id).await.map_err(ApiError::internal)?;
    let queue_position = q.queue_position(&t).await.map_err(ApiError::internal)?;
    let timings = q.timings(&t.id).await.map_err(ApiError::internal)?;
    let eta = crate::eta::of(state, &t, queue_position, now_ms())
        .await
        .map_err(ApiError::internal)?;
    Ok(view_of(
        t,
        attempts,
        queue_position,
        eta,
        timings.as_ref(),
        links,
    ))
}

/// The view of a task this call created: no attempts and no recorded timings yet, and its
/// queue position (and so its ETA) not read (`null`).
pub(crate) fn fresh_view(links: &Links, t: Task) -> TaskView {
    view_of(
        t,
        Vec::new(),
        None,
        crate::eta::EtaView::default(),
        None,
        links,
    )
}

/// The task object from its parts (what [`view`] reads from the queue): also the `data` of
/// a webhook message, rendered from the task as the message's change left it.
pub(crate) fn view_of(
    t: Task,
    attempts: Vec<kiln_broker::AttemptRecord>,
    queue_position: Option<u64>,
    eta: crate::eta::EtaView,
    recorded: Option<&Value>,
    links: &Links,
) -> TaskView {
    let progress = t
        .progress
        .as_ref()
        .filter(|_| t.state == TaskState::Running)
        .map(|p| ProgressView {
            stage: p["stage"].as_str().map(str::to_owned),
            step: p["step"].as_u64().unwrap_or(0),
            total: p["total"].as_u64().unwrap_or(0),
            percent: p["percent"].as_f64(),
            eta_ms: p["eta_ms"].as_u64(),
        });
    let timings = Timings::of(&t, &attempts, recorded, now_ms());
    let preview = crate::previews::link(links, &t);
    TaskView {
        preview,
        request_id: t.request_id,
        task_type: t.task_type,
        input: t.input,
        status: t.state.as_str().to_owned(),
        queue_position,
        estimated_start_s: eta.start_s,
        estimated_finish_s: eta.finish_s,
        waiting_for_worker: eta.waiting_for_worker,
        progress,
        attempts: attempts
            .into_iter()
            .map(|a| AttemptView {
                attempt: a.attempt,
                worker: a.worker_id,
                started_at: rfc3339(a.started_at),
                ended_at: a.ended_at.map(rfc3339),
                error: a.error,
            })
            .collect(),
        created_at: rfc3339(t.created_at),
        started_at: t.started_at.map(rfc3339),
        completed_at: t.completed_at.map(rfc3339),
        output: t.output.map(|o| with_file_urls(o, links)),
        error: t.error.map(|e| json!(e)),
        timings,
        priority: t.priority,
        deadline: t.deadline.map(rfc3339),
        metadata: t.metadata,
        model: t.model,
        labels: t.labels,
        dead_lettered: t.dead_lettered,
        cancel_requested: t.cancel_requested,
        webhook: t.webhook,
        webhook_events: t.webhook_events,
        id: t.id,
    }
}

pub(crate) fn queue_error(e: QueueError) -> ApiError {
    match e {
        QueueError::Conflict(rid) => ApiError::conflict(format!(
            "request_id {rid:?} was already used for a task with a different type, input, model or labels"
        )),
        QueueError::Invalid(m) => ApiError::invalid(m),
        other => ApiError::unavailable(format!("the queue store failed: {other}")),
    }
}

/// Create a task. Returns at once; the task is durable when this answers.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks",
    request_body = CreateTask,
    params(("Idempotency-Key" = Option<String>, Header, description = "alias of request_id")),
    responses(
        (status = 202, body = TaskView, description = "accepted (or the existing task for this request_id)"),
        (status = 400, description = "malformed JSON, or an invalid webhook URL"), (status = 409, description = "request_id reused with different content"),
        (status = 413, description = "input or metadata over its size limit"),
        (status = 415, description = "not JSON"), (status = 422, description = "invalid field or unknown task type"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    links: Links,
    ApiJson(body): ApiJson<CreateTask>,
) -> Result<Response, ApiError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let task = prepare(&state, body, key).await?;
    let task = crate::submit::submit(
        &state,
        Submission {
            task,
            api: "tasks",
            repeat: Repeat::Exact,
        },
    )
    .await?;
    crate::submit::accepted(&state, &links, task).await
}

/// The task a create body describes, once every field is checked (the batch route checks
/// each of its items the same way). `key`: the `Idempotency-Key` header.
pub(crate) async fn prepare(
    state: &AppState,
    body: CreateTask,
    key: Option<String>,
) -> Result<NewTask, ApiError> {
    let request_id = match (body.request_id, key) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "request_id and the Idempotency-Key header differ",
            ));
        }
        (a, b) => a.or(b),
    };
    if let Some(r) = &request_id
        && (r.is_empty() || r.len() > 255)
    {
        return Err(ApiError::invalid("request_id must be 1 to 255 characters"));
    }
    let tt = body.task_type.trim();
    if tt.is_empty()
        || tt.len() > 64
        || !tt
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(ApiError::invalid(
            "task_type must be 1 to 64 characters of letters, digits, `_`, `-`, `.`",
        ));
    }
    if body.model.as_deref().is_some_and(|m| !routing_name(m)) {
        return Err(ApiError::invalid(
            "model must be 1 to 128 visible ASCII characters",
        ));
    }
    if body.labels.len() > MAX_LABELS || !body.labels.iter().all(|l| routing_name(l)) {
        return Err(ApiError::invalid(format!(
            "labels: at most {MAX_LABELS}, each 1 to 128 visible ASCII characters"
        )));
    }
    crate::limits::check_metadata(body.metadata.as_ref())?;
    let webhook_events = crate::webhooks::check_task_webhook(
        body.webhook.as_deref(),
        body.webhook_events.iter().map(|e| e.as_str()).collect(),
    )?;
    accepts_type(state, tt, body.model.as_deref(), &body.labels).await?;
    if body.deadline_s == Some(0) {
        return Err(ApiError::invalid("deadline_s must be above zero"));
    }
    let deadline = body
        .deadline_s
        .map(|s| now_ms().saturating_add(s.saturating_mul(1000)));
    Ok(NewTask {
        task_type: tt.to_owned(),
        input: body.input,
        request_id,
        priority: body.priority,
        deadline,
        metadata: body.metadata,
        max_attempts: None,
        model: body.model,
        labels: body.labels,
        webhook: body.webhook,
        webhook_events,
    })
}

/// Whether a task of type `tt` may be queued: a connected worker fits it, or its type is
/// declared (`known_task_types`), or some worker served it within `remember_task_types`,
/// or `queue_unknown_task_types` is on. Otherwise 422 saying how to declare it.
async fn accepts_type(
    state: &AppState,
    tt: &str,
    model: Option<&str>,
    labels: &[String],
) -> Result<(), ApiError> {
    let cfg = state.config();
    if cfg.queue_unknown_task_types
        || cfg.known_task_types.iter().any(|t| t == tt)
        || state.broker().can_serve(tt, model, labels)
    {
        return Ok(());
    }
    let window = cfg.remember_task_types;
    if !window.is_zero()
        && state
            .broker()
            .task_type_seen(tt, window)
            .await
            .map_err(queue_error)?
    {
        return Ok(());
    }
    let connected = connected_types(state);
    let served = if connected.is_empty() {
        "no worker is connected".to_owned()
    } else {
        format!("connected workers serve: {}", connected.join(", "))
    };
    let routed = match (model, labels.is_empty()) {
        (None, true) => String::new(),
        (Some(m), true) => format!(" with model {m:?}"),
        (None, false) => format!(" with labels {labels:?}"),
        (Some(m), false) => format!(" with model {m:?} and labels {labels:?}"),
    };
    let remembered = if window.is_zero() {
        String::new()
    } else {
        format!(
            ", and no worker serving it connected in the last {}",
            humantime::format_duration(window)
        )
    };
    Err(ApiError::invalid(format!(
        "unknown task type {tt:?}{routed}: it is not declared{remembered} ({served}). \
         To queue such tasks while their workers are offline, declare the type: \
         gateway.known_task_types = [{tt:?}] in the config file, or \
         KILN_GATEWAY__KNOWN_TASK_TYPES={tt} in the environment"
    )))
}

/// Task types of the workers connected to this instance.
fn connected_types(state: &AppState) -> Vec<String> {
    let mut v: Vec<String> = state
        .broker()
        .workers()
        .into_iter()
        .filter(|w| w.connected)
        .flat_map(|w| w.capabilities.task_types)
        .collect();
    v.sort();
    v.dedup();
    v
}

pub(crate) async fn load(state: &AppState, id: &str) -> Result<Task, ApiError> {
    state
        .broker()
        .queue()
        .get(id)
        .await
        .map_err(queue_error)?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))
}

/// Get a task.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses((status = 200, body = TaskView), (status = 404, description = "unknown id")))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    links: Links,
    Path(id): Path<String>,
) -> Result<ApiJson<TaskView>, ApiError> {
    let t = load(&state, &id).await?;
    Ok(ApiJson(view(&state, &links, t).await?))
}

/// Cancel a task: queued tasks end at once; running ones are told to stop.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = String, Path, description = "task id")),
    responses((status = 202, body = TaskView), (status = 404, description = "unknown id"), (status = 409, description = "already finished")))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    links: Links,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let t = match state.broker().cancel(&id).await.map_err(queue_error)? {
        CancelOutcome::Canceled(t) | CancelOutcome::SignalWorker { task: t, .. } => t,
        CancelOutcome::AlreadyTerminal(t) => {
            return Err(ApiError::conflict(format!(
                "task {id} already ended: {}",
                t.state.as_str()
            )));
        }
        CancelOutcome::NotFound => return Err(ApiError::not_found(format!("no task {id}"))),
        _ => return Err(ApiError::internal("unexpected cancel outcome")),
    };
    Ok((
        StatusCode::ACCEPTED,
        ApiJson(view(&state, &links, t).await?),
    )
        .into_response())
}

/// Filters for listing tasks.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    /// Only this status.
    status: Option<String>,
    /// Only this task type.
    task_type: Option<String>,
    /// Only tasks that name this model.
    model: Option<String>,
    /// Only tasks whose last attempt ran on this worker id.
    worker: Option<String>,
    /// Only tasks created at or after this time (RFC 3339, e.g. `2026-01-02T03:04:05Z`).
    created_after: Option<String>,
    /// Only tasks created before this time (RFC 3339).
    created_before: Option<String>,
    /// Page size, 1 to 500 (default 50).
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A page of tasks.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct TaskPage {
    data: Vec<TaskView>,
    /// Pass as `cursor` for the next page; `null` when the list has ended. With `model`,
    /// `worker` or a time filter a page may hold fewer than `limit` tasks (at most 5000
    /// are read per request) and still have a cursor.
    next_cursor: Option<String>,
}

fn time_param(name: &str, v: Option<&str>) -> Result<Option<u64>, ApiError> {
    v.map(|s| {
        humantime::parse_rfc3339_weak(s.trim())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .ok_or_else(|| ApiError::invalid(format!("{name} must be an RFC 3339 time")))
    })
    .transpose()
}

/// List tasks, newest first, filtered by status, task type, model, worker and creation
/// time, in pages joined by `next_cursor`.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(ListParams),
    responses((status = 200, body = TaskPage), (status = 422, description = "invalid filter")))]
pub(crate) async fn list(
    State(state): State<AppState>,
    links: Links,
    ApiQuery(p): ApiQuery<ListParams>,
) -> Result<ApiJson<TaskPage>, ApiError> {
    let st = match p.status.as_deref() {
        None => None,
        Some(s) => Some(
            TaskState::parse(s)
                .ok_or_else(|| ApiError::invalid(format!("unknown status {s:?}")))?,
        ),
    };
    let limit = p.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit must be 1 to 500"));
    }
    let before_seq = match p.cursor.as_deref() {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor is not one this API returned"))?,
        ),
    };
    let extra = crate::listing::Extra {
        after_ms: time_param("created_after", p.created_after.as_deref())?,
        before_ms: time_param("created_before", p.created_before.as_deref())?,
        model: p.model,
        worker: p.worker,
    };
    let base = ListFilter {
        state: st,
        task_type: p.task_type,
        limit,
        before_seq,
    };
    let (tasks, next) = crate::listing::page(state.broker().queue(), base, &extra)
        .await
        .map_err(queue_error)?;
    let next_cursor = next.map(|s| s.to_string());
    let mut data = Vec::with_capacity(tasks.len());
    for t in tasks {
        data.push(view(&state, &links, t).await?);
    }
    Ok(ApiJson(TaskPage { data, next_cursor }))
}
