//! Worker and queue events for the global endpoints: `worker.online`, `worker.offline` and
//! `queue.backlog` of the live feed (`live.rs`, the same events as `GET /v1/events`) are
//! written to the outbox for every endpoint that lists them.

use std::sync::Weak;

use kiln_broker::{NewMessage, now_ms};
use tokio::sync::broadcast;

use crate::live::LiveEvent;
use crate::{AppState, Inner};

/// The live-feed events an endpoint may receive.
pub(crate) const LIVE_EVENTS: [&str; 3] = ["worker.online", "worker.offline", "queue.backlog"];

/// Whether some endpoint of `state` receives a live-feed event (else nothing follows it).
pub(crate) fn wanted(state: &AppState) -> bool {
    state
        .config()
        .webhooks
        .endpoints
        .iter()
        .any(|e| e.events.iter().any(|ev| LIVE_EVENTS.contains(&ev.as_str())))
}

/// Follows the live feed until the gateway's state is dropped.
pub(crate) async fn follow(weak: Weak<Inner>, mut rx: broadcast::Receiver<LiveEvent>) {
    loop {
        let e = match rx.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "webhooks: live events were missed");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !LIVE_EVENTS.contains(&e.kind) {
            continue;
        }
        let Some(inner) = weak.upgrade() else { return };
        let state = AppState { inner };
        let messages: Vec<NewMessage> = state
            .config()
            .webhooks
            .endpoints
            .iter()
            .filter(|ep| ep.events.iter().any(|ev| ev == e.kind))
            .map(|ep| NewMessage {
                task_id: None,
                url: ep.url.clone(),
                event: e.kind.to_owned(),
                payload: e.data.clone(),
            })
            .collect();
        if messages.is_empty() {
            continue;
        }
        let q = state.broker().queue();
        match q.outbox().add_messages(messages, now_ms()).await {
            Ok(_) => state.inner.webhooks.wake.notify_one(),
            Err(err) => {
                tracing::warn!(event = e.kind, error = %err, "webhooks: writing an event failed")
            }
        }
    }
}
