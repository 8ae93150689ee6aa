//! Which task change writes which webhook message (see [`crate::outbox`]): decided here
//! once, so that every store writes the same messages in the transaction of the change.

use serde_json::Value;

use super::TaskEventKind;
use crate::model::{NewTask, QueueError, Task};
use crate::outbox::{NewMessage, WebhookEndpoint};
use kiln_protocol::TaskState;

/// The task events a webhook may ask for: `started`, `progress`, `completed`.
pub const WEBHOOK_EVENTS: [&str; 3] = ["started", "progress", "completed"];

/// What a task's webhook receives when it names no events.
pub const DEFAULT_WEBHOOK_EVENTS: [&str; 1] = ["completed"];

/// `task.progress` messages of one task are at least this far apart (ms): progress sent
/// sooner after the previous message writes none.
pub const PROGRESS_EVERY_MS: u64 = 1000;

/// Checks and normalises a new task's webhook: events only with a URL, known names, sorted
/// and deduplicated, `["completed"]` when a URL names none. The URL itself is checked by
/// whoever accepts it (the gateway); here only that it is not empty.
pub(super) fn admit_webhook(t: &mut NewTask) -> Result<(), QueueError> {
    let Some(url) = &t.webhook else {
        if !t.webhook_events.is_empty() {
            return Err(QueueError::Invalid(
                "webhook_events without a webhook".into(),
            ));
        }
        return Ok(());
    };
    if url.trim().is_empty() {
        return Err(QueueError::Invalid("webhook is empty".into()));
    }
    if let Some(bad) = t
        .webhook_events
        .iter()
        .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
    {
        return Err(QueueError::Invalid(format!(
            "webhook_events: unknown event {bad:?} (known: started, progress, completed)"
        )));
    }
    if t.webhook_events.is_empty() {
        t.webhook_events = DEFAULT_WEBHOOK_EVENTS.map(String::from).to_vec();
    }
    t.webhook_events.sort();
    t.webhook_events.dedup();
    Ok(())
}

/// The webhook event (`started`, `progress` or `completed`) a task event makes, if any: a
/// task entering `running` is `started` (once per attempt), a progress report `progress`,
/// the task's end (any terminal state) `completed`.
pub fn webhook_event_of(kind: &TaskEventKind) -> Option<&'static str> {
    match kind {
        TaskEventKind::Status {
            status: TaskState::Running,
            ..
        } => Some("started"),
        TaskEventKind::Progress(_) => Some("progress"),
        TaskEventKind::Completed { .. } => Some("completed"),
        _ => None,
    }
}

/// Whether a change writing `events` may write a `task.progress` message, the task's latest
/// one having been written at `last_progress_at`.
pub fn progress_due(last_progress_at: Option<u64>, now: u64) -> bool {
    last_progress_at.is_none_or(|at| now.saturating_sub(at) >= PROGRESS_EVERY_MS)
}

/// Whether a message about `after` (a task after a change) may go anywhere: it has a
/// webhook, or global endpoints are configured.
pub fn may_notify(after: &Task, endpoints: &[WebhookEndpoint]) -> bool {
    after.webhook.is_some() || !endpoints.is_empty()
}

/// Whether `after` (a task after a change) subscribed to a progress webhook, or an endpoint
/// did: only then does a store look up when its last progress message was written.
pub fn wants_progress(after: &Task, endpoints: &[WebhookEndpoint]) -> bool {
    (after.webhook.is_some() && after.webhook_events.iter().any(|e| e == "progress"))
        || endpoints
            .iter()
            .any(|e| e.events.iter().any(|t| t == "task.progress"))
}

/// The messages a change writes: for each of its events that makes a webhook event, one
/// message to the task's `webhook` when the task subscribed to it, then one to every global
/// endpoint listing `task.<event>`; the payload is the task as it is after the change.
/// `progress_ok` is [`progress_due`] for this change (at most one progress event per change
/// writes messages).
pub fn webhook_messages(
    after: &Task,
    events: &[TaskEventKind],
    progress_ok: bool,
    endpoints: &[WebhookEndpoint],
) -> Vec<NewMessage> {
    let mut out = Vec::new();
    let mut progress_ok = progress_ok;
    for e in events {
        let Some(name) = webhook_event_of(e) else {
            continue;
        };
        if name == "progress" {
            if !progress_ok {
                continue;
            }
            progress_ok = false;
        }
        let event = format!("task.{name}");
        let own = after
            .webhook
            .as_ref()
            .filter(|_| after.webhook_events.iter().any(|w| w == name));
        let global = endpoints
            .iter()
            .filter(|ep| ep.events.contains(&event))
            .map(|ep| &ep.url);
        for url in own.into_iter().chain(global) {
            out.push(NewMessage {
                task_id: Some(after.id.clone()),
                url: url.clone(),
                event: event.clone(),
                payload: serde_json::to_value(after).unwrap_or(Value::Null),
            });
        }
    }
    out
}
