//! The webhook outbox: messages written in the same transaction as the task change that
//! causes them, claimed with a lease by a delivery loop (which lives outside the broker: the
//! broker knows no HTTP), and ended as delivered, retried, exhausted or disabled.
//!
//! Which change writes which message is decided by [`crate::lifecycle::webhook_messages`],
//! so the three stores agree; the conformance suite checks them. A message's id (`msg_` +
//! 32 hex digits) is its `webhook-id`: stable across retries of that message. The payload
//! stored with a message is a snapshot taken when it was written (for task events the
//! [`crate::Task`] as it was after the change); the delivery loop renders the body from it
//! at the first attempt and the store keeps that body ([`Outbox::record_delivery`]), so that
//! every retry sends the same bytes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::queue::QueueFuture;

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum MessageState {
    /// Waiting for its (next) attempt.
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Every attempt of the schedule failed; [`Outbox::retry_message`] re-arms it.
    Exhausted,
    /// The endpoint answered 410 Gone: it and every pending message to its URL are
    /// disabled until a message to it is re-armed.
    Disabled,
}

impl MessageState {
    /// `pending`, `delivered`, `exhausted` or `disabled`.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Pending => "pending",
            MessageState::Delivered => "delivered",
            MessageState::Exhausted => "exhausted",
            MessageState::Disabled => "disabled",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => MessageState::Pending,
            "delivered" => MessageState::Delivered,
            "exhausted" => MessageState::Exhausted,
            "disabled" => MessageState::Disabled,
            _ => return None,
        })
    }
}

/// A global endpoint: it receives every message of the event types it lists, for every
/// task (`task.started`, `task.progress`, `task.completed`; other types are written with
/// [`Outbox::add_messages`] by whoever produces them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpoint {
    /// Where its messages go.
    pub url: String,
    /// The event types it receives, e.g. `task.completed`.
    pub events: Vec<String>,
}

/// A message to write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMessage {
    /// The task it is about (`None` for worker and queue events).
    pub task_id: Option<String>,
    /// Where it goes.
    pub url: String,
    /// The event type, e.g. `task.completed`.
    pub event: String,
    /// The snapshot the body is rendered from.
    pub payload: Value,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// `msg_` + 32 hex digits: the `webhook-id`.
    pub id: String,
    /// The task it is about.
    pub task_id: Option<String>,
    /// Where it goes.
    pub url: String,
    /// The event type.
    pub event: String,
    /// The snapshot written with it.
    pub payload: Value,
    /// The body sent by the first attempt (every later attempt sends it again).
    pub body: Option<String>,
    /// Where it stands.
    pub state: MessageState,
    /// Attempts made.
    pub attempts: u32,
    /// When the next attempt is due, Unix ms.
    pub next_at: u64,
    /// Written at, Unix ms.
    pub created_at: u64,
    /// The delivery loop holding it, while one does.
    pub lease_holder: Option<String>,
    /// When that lease lapses, Unix ms.
    pub lease_until: Option<u64>,
}

/// One delivery attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    /// 1-based.
    pub attempt: u32,
    /// When it was sent, Unix ms.
    pub at: u64,
    /// The HTTP status, when one came back.
    pub status: Option<u16>,
    /// From sending to the answer (or the failure), ms.
    pub latency_ms: u64,
    /// What went wrong (an excerpt: at most [`MAX_ERROR`] bytes).
    pub error: Option<String>,
}

/// The longest error excerpt stored with an attempt, in bytes.
pub const MAX_ERROR: usize = 512;

impl DeliveryAttempt {
    /// `error` cut to at most [`MAX_ERROR`] bytes on a character boundary.
    pub fn excerpt(error: &str) -> String {
        let mut end = error.len().min(MAX_ERROR);
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error[..end].to_owned()
    }
}

/// How an attempt ended the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryOutcome {
    /// Delivered (2xx).
    Delivered,
    /// Failed; try again at this Unix ms.
    RetryAt(u64),
    /// Failed, and the schedule is spent.
    Exhausted,
    /// 410 Gone: disable the URL.
    Disabled,
}

/// A message with its attempts, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    /// The message.
    pub message: Message,
    /// Its attempts.
    pub attempts: Vec<DeliveryAttempt>,
}

/// The outbox half of a store (see the module documentation). Every store implements it;
/// [`crate::Queue::outbox`] hands it out.
///
/// Contract (checked by the conformance suite):
/// - a task change writes its messages in its own transaction: a change that is refused
///   writes none;
/// - `claim_messages` leases pending messages that are due (`next_at <= now`) and not
///   leased by anyone until after `now`, oldest first; a message is never held by two
///   holders at once;
/// - `record_delivery` counts only while `holder` holds the lease (else `false`, nothing
///   stored), stores the attempt, keeps the first body, and ends the lease;
/// - `retry_message` re-arms a message that is not delivered (pending at once, its URL
///   enabled again); `None` for an unknown id.
pub trait Outbox: Send + Sync + std::fmt::Debug {
    /// Writes messages that no task change causes (worker and queue events), pending at
    /// once.
    fn add_messages(&self, messages: Vec<NewMessage>, now: u64) -> QueueFuture<'_, Vec<Message>>;

    /// Leases up to `n` due messages to `holder` until `lease_until`. Pending messages to a
    /// disabled URL are marked disabled instead of returned.
    fn claim_messages<'a>(
        &'a self,
        holder: &'a str,
        n: usize,
        lease_until: u64,
        now: u64,
    ) -> QueueFuture<'a, Vec<Message>>;

    /// Records an attempt of message `id` held by `holder` and how it ended the message;
    /// `body` is kept when the message has none yet. False when `holder` does not hold it.
    fn record_delivery<'a>(
        &'a self,
        id: &'a str,
        holder: &'a str,
        body: &'a str,
        attempt: DeliveryAttempt,
        outcome: DeliveryOutcome,
    ) -> QueueFuture<'a, bool>;

    /// The messages of a task with their attempts, oldest first.
    fn task_messages<'a>(&'a self, task_id: &'a str) -> QueueFuture<'a, Vec<MessageRecord>>;

    /// A message with its attempts.
    fn message<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<MessageRecord>>;

    /// Re-arms message `id` unless it was delivered: pending, due at `now`, unleased, its
    /// URL enabled again. Returns the message after the call (unchanged when delivered);
    /// `None` when there is no such message.
    fn retry_message<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, Option<Message>>;

    /// How many messages are pending.
    fn pending_messages(&self) -> QueueFuture<'_, u64>;
}
