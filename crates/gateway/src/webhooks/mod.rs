//! Webhooks: the task fields that ask for them, the delivery loop that sends the store's
//! outbox (see `kiln_broker::outbox`), and the routes that show and re-arm messages.
//!
//! The store writes a message in the transaction of the task change that causes it; this
//! module only sends: it claims due messages with a lease, renders a message's body at its
//! first attempt (the task object as the API shows it, from the snapshot stored with the
//! message) and records each attempt, so every retry sends the same bytes under the same
//! `webhook-id`. Signing, the schedule and the SSRF-checked sender are kiln-webhooks'.
//! Without the feature `webhooks` nothing is sent (messages are still written, shown and
//! re-armed).

pub(crate) mod api;
mod config;
// Without `webhooks` only the API uses the settings; nothing renders or signs.
#[cfg_attr(not(feature = "webhooks"), allow(dead_code))]
mod deliver;
pub(crate) mod presence;
#[cfg(feature = "webhooks")]
mod send;

pub(crate) use api::{retry, task_messages};
pub(crate) use config::check_url;
pub use config::{ENDPOINT_EVENTS, EndpointConfig, WebhooksConfig};
pub(crate) use deliver::Delivery;
#[cfg(feature = "webhooks")]
pub(crate) use send::run;

use axum::http::StatusCode;

use crate::error::ApiError;

/// Checks a task's `webhook` and `webhook_events` (400 naming the field) and returns the
/// events to store.
pub(crate) fn check_task_webhook(
    url: Option<&str>,
    events: Vec<&str>,
) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_webhook", m);
    let Some(url) = url else {
        if !events.is_empty() {
            return Err(bad("webhook_events: needs a webhook URL".into()));
        }
        return Ok(Vec::new());
    };
    check_url("webhook", url).map_err(bad)?;
    Ok(events.into_iter().map(str::to_owned).collect())
}
