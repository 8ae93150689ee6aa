//! The delivery loop (feature `webhooks`): claims due messages from the store's outbox
//! with a lease, sends each (signed, through kiln-webhooks' SSRF-checked sender) in a task
//! of its own, and records the attempt and what it means for the message (delivered, retry
//! at, exhausted, disabled).

use std::sync::Weak;
use std::time::Duration;

use bytes::Bytes;
use kiln_broker::{DeliveryAttempt, DeliveryOutcome, Message, TaskEvent, TaskEventKind, now_ms};
use kiln_webhooks::{Outcome, SendConfig};
use tokio::sync::broadcast;

use super::deliver::{Delivery, body_of};
use crate::{AppState, Inner};

/// Messages claimed in one round at most.
const BATCH: usize = 64;

/// Whether a task event may have written a message (so the loop looks at once).
fn may_have_written(e: &TaskEvent) -> bool {
    kiln_broker::lifecycle::webhook_event_of(&e.kind).is_some()
        && !matches!(e.kind, TaskEventKind::CancelRequested)
}

/// Claims and sends due messages until the gateway's state is dropped; wakes on task events
/// of this process, on [`Delivery::wake`], and every `poll_interval` (retries coming due,
/// messages written by other instances).
pub(crate) async fn run(weak: Weak<Inner>, mut events: broadcast::Receiver<TaskEvent>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let state = AppState { inner };
        let d = &state.inner.webhooks;
        let (wake, poll) = (d.wake.clone(), d.poll);
        let full = claim_round(&state).await;
        drop(state);
        if full {
            continue;
        }
        let mut closed = false;
        tokio::select! {
            r = events.recv() => match r {
                Ok(e) if !may_have_written(&e) => {}
                Err(broadcast::error::RecvError::Closed) => closed = true,
                _ => {}
            },
            _ = wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
        }
        // Coalesce what else arrived meanwhile: one claim serves them all.
        while let Ok(_e) = events.try_recv() {}
        if closed {
            tokio::time::sleep(poll).await;
        }
    }
}

/// One round: claims as many due messages as there are free slots and starts sending them.
/// Returns whether it claimed a full round (more may be due at once).
async fn claim_round(state: &AppState) -> bool {
    let d = &state.inner.webhooks;
    let free = d.permits.available_permits().min(BATCH);
    if free == 0 || !d.can_sign() {
        return false;
    }
    let now = now_ms();
    let until = now.saturating_add(d.lease.as_millis() as u64);
    let claimed = match state
        .broker()
        .queue()
        .outbox()
        .claim_messages(&d.holder, free, until, now)
        .await
    {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "webhooks: claiming due messages failed");
            return false;
        }
    };
    let n = claimed.len();
    for m in claimed {
        let Ok(permit) = d.permits.clone().try_acquire_owned() else {
            break;
        };
        let state = state.clone();
        tokio::spawn(async move {
            deliver_one(&state, m).await;
            drop(permit);
            state.inner.webhooks.wake.notify_one();
        });
    }
    n == free
}

/// The host of `url`, for logs (a URL's path and query may carry tokens).
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or("")
}

/// What an attempt means for the message, and the metric's `result` label.
fn outcome_of(d: &Delivery, m: &Message, o: &Outcome, now: u64) -> (DeliveryOutcome, &'static str) {
    match o {
        Outcome::Delivered => (DeliveryOutcome::Delivered, "delivered"),
        Outcome::Gone => (DeliveryOutcome::Disabled, "disabled"),
        Outcome::Refused => (DeliveryOutcome::Exhausted, "refused"),
        Outcome::Failed { retry_after } => retry_or_exhaust(d, m, *retry_after, now),
        _ => retry_or_exhaust(d, m, None, now),
    }
}

fn retry_or_exhaust(
    d: &Delivery,
    m: &Message,
    retry_after: Option<Duration>,
    now: u64,
) -> (DeliveryOutcome, &'static str) {
    match d.schedule.delay_after(m.attempts + 1) {
        None => (DeliveryOutcome::Exhausted, "exhausted"),
        Some(delay) => {
            let wait = delay.max(retry_after.unwrap_or_default());
            let at = now.saturating_add(wait.as_millis() as u64);
            (DeliveryOutcome::RetryAt(at), "failed")
        }
    }
}

/// Sends `m` once and records the attempt.
async fn deliver_one(state: &AppState, m: Message) {
    let d = &state.inner.webhooks;
    let body = body_of(state, &m).await;
    let start = now_ms();
    let signed = match d.signer_for(&m.url) {
        Some(s) => s
            .headers(&m.id, (start / 1000) as i64, body.as_bytes())
            .map_err(|e| e.to_string()),
        None => Err("no signing secret is configured for this endpoint".to_owned()),
    };
    let (attempt, outcome, result) = match signed {
        Ok(headers) => {
            let a =
                kiln_webhooks::send(&m.url, &headers, Bytes::from(body.clone()), &send_config(d))
                    .await;
            let (outcome, result) = outcome_of(d, &m, &a.outcome, now_ms());
            let error = (!a.outcome.is_delivered()).then(|| {
                let status = a.status.map_or(String::new(), |s| format!("HTTP {s}: "));
                DeliveryAttempt::excerpt(&format!("{status}{}", a.excerpt))
            });
            let attempt = DeliveryAttempt {
                attempt: 0,
                at: start,
                status: a.status,
                latency_ms: a.latency.as_millis() as u64,
                error,
            };
            (attempt, outcome, result)
        }
        Err(e) => {
            let (outcome, result) = retry_or_exhaust(d, &m, None, now_ms());
            let attempt = DeliveryAttempt {
                attempt: 0,
                at: start,
                status: None,
                latency_ms: 0,
                error: Some(DeliveryAttempt::excerpt(&e)),
            };
            (attempt, outcome, result)
        }
    };
    state
        .metrics()
        .webhook_deliveries
        .get_or_create(&vec![("result", result.to_owned())])
        .inc();
    if result != "delivered" {
        tracing::warn!(
            message = %m.id, event = %m.event, host = host_of(&m.url), status = ?attempt.status,
            attempt = m.attempts + 1, result, error = attempt.error.as_deref().unwrap_or(""),
            next = ?match outcome { DeliveryOutcome::RetryAt(at) => Some(at), _ => None },
            "webhook delivery failed"
        );
    }
    let recorded = state
        .broker()
        .queue()
        .outbox()
        .record_delivery(&m.id, &d.holder, &body, attempt, outcome)
        .await;
    match recorded {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(message = %m.id, "webhooks: the lease on the message lapsed before its attempt was recorded")
        }
        Err(e) => {
            tracing::warn!(message = %m.id, error = %e, "webhooks: recording an attempt failed")
        }
    }
}

fn send_config(d: &Delivery) -> SendConfig {
    let mut c = SendConfig::default();
    c.timeout = d.timeout;
    c.allow_private = d.allow_private;
    c.allow_loopback = d.allow_private;
    c
}
