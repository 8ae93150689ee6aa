//! What the stores share of the webhook outbox: the message columns and their mapping to
//! [`Message`].

use crate::outbox::{DeliveryOutcome, Message, MessageState};
use crate::store::{Columns, Result, corrupt, parse_json};

/// The message columns every read selects, in the order [`message_from_row`] reads them.
pub(crate) const MESSAGE_COLUMNS: &str = "id, task_id, url, event, payload, body, state, attempts, next_at, created_at, lease_holder, lease_until";

/// The message a row holds.
pub(crate) fn message_from_row(r: &impl Columns) -> Result<Message> {
    let need = |i: usize, what: &str| {
        r.text(i)?
            .ok_or_else(|| corrupt(format!("message without {what}")))
    };
    let state = need(6, "state")?;
    let time = |i: usize| Ok::<_, crate::QueueError>(r.int(i)?.map(|v| v.max(0) as u64));
    Ok(Message {
        id: need(0, "id")?,
        task_id: r.text(1)?,
        url: need(2, "url")?,
        event: need(3, "event")?,
        payload: parse_json(r.text(4)?)?.unwrap_or_default(),
        body: r.text(5)?,
        state: MessageState::parse(&state)
            .ok_or_else(|| corrupt(format!("unknown message state {state:?}")))?,
        attempts: r.int(7)?.unwrap_or(0).max(0) as u32,
        next_at: time(8)?.unwrap_or(0),
        created_at: time(9)?.unwrap_or(0),
        lease_holder: r.text(10)?,
        lease_until: time(11)?,
    })
}

/// The state and next due time a message has after an attempt ended as `outcome`.
pub(crate) fn after_outcome(outcome: DeliveryOutcome, next_at: u64) -> (MessageState, u64) {
    match outcome {
        DeliveryOutcome::Delivered => (MessageState::Delivered, next_at),
        DeliveryOutcome::RetryAt(at) => (MessageState::Pending, at),
        DeliveryOutcome::Exhausted => (MessageState::Exhausted, next_at),
        DeliveryOutcome::Disabled => (MessageState::Disabled, next_at),
    }
}
