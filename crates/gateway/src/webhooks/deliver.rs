//! What delivery needs (signers, the schedule, the limits), built once from the settings,
//! and the body of a message (see `send.rs` for the loop that sends them).

use std::sync::Arc;
use std::time::Duration;

use kiln_broker::{Message, Task};
use kiln_webhooks::{Schedule, Secret, Signer, SigningKey};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

use super::WebhooksConfig;
use crate::AppState;
use crate::links::Links;

/// What the delivery loop needs, built once from [`WebhooksConfig`].
#[derive(Debug)]
pub(crate) struct Delivery {
    /// Signs for every URL without an endpoint secret of its own.
    signer: Option<Signer>,
    /// Global endpoints with secrets of their own: `(url, signer)`.
    endpoints: Vec<(String, Signer)>,
    pub(super) schedule: Schedule,
    /// Time limit of one attempt.
    pub(super) timeout: Duration,
    /// Private and loopback addresses are allowed.
    pub(super) allow_private: bool,
    /// This instance's lease holder name.
    pub(super) holder: String,
    pub(super) lease: Duration,
    pub(super) poll: Duration,
    pub(super) permits: Arc<Semaphore>,
    /// Poked when an attempt ends (a permit is free) or a message was written here.
    pub(crate) wake: Arc<Notify>,
}

fn signer_of(secrets: &str, key: Option<&SigningKey>, what: &str) -> Result<Signer, String> {
    let secrets = secrets
        .split_whitespace()
        .map(|s| s.parse::<Secret>().map_err(|e| format!("{what}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Signer::new(secrets, key.cloned()).map_err(|e| format!("{what}: {e}"))
}

impl Delivery {
    /// Checks `cfg` and builds the signers, the schedule and the sender's settings.
    pub(crate) fn new(cfg: &WebhooksConfig) -> Result<Self, String> {
        cfg.validate()?;
        let key = cfg
            .signing_key
            .as_deref()
            .map(|k| k.parse::<SigningKey>())
            .transpose()
            .map_err(|e| format!("webhooks.signing_key: {e}"))?;
        let signer = match (&cfg.secret, &key) {
            (Some(s), _) => Some(signer_of(s, key.as_ref(), "webhooks.secret")?),
            (None, Some(k)) => {
                Some(Signer::new(Vec::new(), Some(k.clone())).map_err(|e| e.to_string())?)
            }
            (None, None) => None,
        };
        let mut endpoints = Vec::new();
        for (i, e) in cfg.endpoints.iter().enumerate() {
            if let Some(s) = &e.secret {
                let what = format!("webhooks.endpoints[{i}] secret");
                endpoints.push((e.url.clone(), signer_of(s, key.as_ref(), &what)?));
            }
        }
        let schedule = Schedule::from_secs(&cfg.schedule_s)
            .map_err(|e| format!("webhooks.schedule_s: {e}"))?;
        Ok(Self {
            signer,
            endpoints,
            schedule,
            timeout: cfg.timeout,
            allow_private: cfg.allow_private,
            holder: format!("deliver_{}", uuid::Uuid::new_v4().simple()),
            lease: cfg.lease,
            poll: cfg.poll_interval,
            permits: Arc::new(Semaphore::new(cfg.concurrency)),
            wake: Arc::new(Notify::new()),
        })
    }

    pub(super) fn signer_for(&self, url: &str) -> Option<&Signer> {
        self.endpoints
            .iter()
            .find(|(u, _)| u == url)
            .map(|(_, s)| s)
            .or(self.signer.as_ref())
    }

    /// Whether anything can be signed (else nothing is claimed: messages wait, pending).
    pub(super) fn can_sign(&self) -> bool {
        self.signer.is_some() || !self.endpoints.is_empty()
    }
}

/// The `data` of a task message: the task object as the API shows it, from the snapshot
/// stored with the message (its attempts up to the snapshot's, and its timings, as they are
/// now). Other messages carry their payload as written.
async fn data_of(state: &AppState, m: &Message) -> Value {
    if m.task_id.is_none() {
        return m.payload.clone();
    }
    let Ok(t) = serde_json::from_value::<Task>(m.payload.clone()) else {
        return m.payload.clone();
    };
    let q = state.broker().queue();
    let mut attempts = q.attempts(&t.id).await.unwrap_or_default();
    attempts.retain(|a| a.attempt <= t.attempt);
    let timings = q.timings(&t.id).await.ok().flatten();
    let links = Links::new(state.config().public_base_url.as_deref(), "");
    json!(crate::tasks::view_of(
        t,
        attempts,
        None,
        crate::eta::EtaView::default(),
        timings.as_ref(),
        &links
    ))
}

/// The body of `m`: the one its first attempt sent, or (first attempt) rendered now.
pub(super) async fn body_of(state: &AppState, m: &Message) -> String {
    if let Some(b) = &m.body {
        return b.clone();
    }
    json!({
        "type": m.event,
        "timestamp": crate::tasks::rfc3339(m.created_at),
        "data": data_of(state, m).await,
    })
    .to_string()
}
