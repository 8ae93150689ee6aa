//! The webhook outbox on Redis (see [`crate::outbox`]): `queue.lua` writes a task's messages
//! in the script run of the change that causes them (its `outbox` function); the `wh_*`
//! operations claim, record, re-arm and read them.

use std::collections::HashMap;

use ::redis::Value;

use super::RedisQueue;
use super::reply::{array, int, task_from, text};
use crate::model::QueueError;
use crate::outbox::*;
use crate::queue::QueueFuture;
use crate::store::outbox::after_outcome;
use crate::store::{Result, new_id};

fn bad(what: &str) -> QueueError {
    QueueError::Corrupt(format!("webhook message: {what}"))
}

fn hash(v: Value) -> Result<HashMap<String, String>> {
    let items = array(v)?;
    let mut h = HashMap::with_capacity(items.len() / 2);
    let mut it = items.iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (Some(k), Some(v)) = (text(k), text(v)) {
            h.insert(k, v);
        }
    }
    Ok(h)
}

/// The payload of a message: the task snapshot (`snap`, the task hash's field/value list) as
/// the task's JSON, or the JSON payload given to `add_messages`.
fn payload(h: &HashMap<String, String>) -> Result<serde_json::Value> {
    if let Some(snap) = h.get("snap") {
        let cells: Vec<String> = serde_json::from_str(snap).map_err(|e| bad(&e.to_string()))?;
        let v = Value::Array(
            cells
                .into_iter()
                .map(|c| Value::BulkString(c.into_bytes()))
                .collect(),
        );
        let task = task_from(v)?.ok_or_else(|| bad("empty snapshot"))?;
        return serde_json::to_value(task).map_err(|e| bad(&e.to_string()));
    }
    let raw = h.get("payload").ok_or_else(|| bad("no payload"))?;
    serde_json::from_str(raw).map_err(|e| bad(&e.to_string()))
}

fn message_from(v: Value) -> Result<Message> {
    let h = hash(v)?;
    let need = |k: &str| h.get(k).cloned().ok_or_else(|| bad(&format!("no {k}")));
    let num = |k: &str| h.get(k).and_then(|s| s.parse::<u64>().ok());
    let state = need("state")?;
    Ok(Message {
        id: need("id")?,
        task_id: h.get("task_id").cloned(),
        url: need("url")?,
        event: need("event")?,
        payload: payload(&h)?,
        body: h.get("body").cloned(),
        state: MessageState::parse(&state).ok_or_else(|| bad("unknown state"))?,
        attempts: num("attempts").unwrap_or(0) as u32,
        next_at: num("next_at").unwrap_or(0),
        created_at: num("created_at").unwrap_or(0),
        lease_holder: h.get("lease_holder").cloned(),
        lease_until: num("lease_until"),
    })
}

fn record_from(v: Value) -> Result<MessageRecord> {
    let mut parts = array(v)?.into_iter();
    let message = message_from(parts.next().ok_or_else(|| bad("no hash"))?)?;
    let attempts = array(parts.next().unwrap_or(Value::Nil))?
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let raw = text(a).ok_or_else(|| bad("attempt"))?;
            let mut a: DeliveryAttempt =
                serde_json::from_str(&raw).map_err(|e| bad(&e.to_string()))?;
            a.attempt = i as u32 + 1;
            Ok(a)
        })
        .collect::<Result<_>>()?;
    Ok(MessageRecord { message, attempts })
}

impl RedisQueue {
    /// Stores the global webhook endpoints under the prefix (`whep`), where `queue.lua`'s
    /// `outbox` reads them; none: the key is removed.
    pub(super) async fn store_endpoints(&self) -> Result<()> {
        let eps = &self.opts.queue.webhook_endpoints;
        let json = serde_json::to_string(eps).map_err(|e| bad(&e.to_string()))?;
        let mut conn = self.conn.clone();
        let key = self.key(&["whep"]);
        let mut cmd = if eps.is_empty() {
            ::redis::cmd("DEL")
        } else {
            ::redis::cmd("SET")
        };
        cmd.arg(&key);
        if !eps.is_empty() {
            cmd.arg(json);
        }
        let _: Value = cmd.query_async(&mut conn).await.map_err(super::store)?;
        Ok(())
    }

    async fn read_messages(&self, by: &str, id: &str) -> Result<Vec<MessageRecord>> {
        let mut r = self
            .run("wh_read", vec![by.to_owned(), id.to_owned()])
            .await?;
        array(r.next().ok_or_else(|| bad("wh_read"))?)?
            .into_iter()
            .map(record_from)
            .collect()
    }

    async fn claim_(&self, holder: &str, n: usize, until: u64, now: u64) -> Result<Vec<Message>> {
        let args = vec![
            holder.to_owned(),
            n.to_string(),
            until.to_string(),
            now.to_string(),
        ];
        let mut r = self.run("wh_claim", args).await?;
        array(r.next().ok_or_else(|| bad("wh_claim"))?)?
            .into_iter()
            .map(message_from)
            .collect()
    }

    async fn record_(
        &self,
        id: &str,
        holder: &str,
        body: &str,
        a: DeliveryAttempt,
        outcome: DeliveryOutcome,
    ) -> Result<bool> {
        let (state, next_at) = after_outcome(outcome, 0);
        let json = serde_json::to_string(&a).map_err(|e| bad(&e.to_string()))?;
        let args = vec![
            id.to_owned(),
            holder.to_owned(),
            body.to_owned(),
            json,
            state.as_str().to_owned(),
            next_at.to_string(),
            a.at.to_string(),
        ];
        let mut r = self.run("wh_record", args).await?;
        Ok(int(&r.next().ok_or_else(|| bad("wh_record"))?)? == 1)
    }

    async fn rearm_(&self, id: &str, now: u64) -> Result<Option<Message>> {
        let mut r = self
            .run("wh_retry", vec![id.to_owned(), now.to_string()])
            .await?;
        if r.tag()? != "ok" {
            return Ok(None);
        }
        message_from(r.next().ok_or_else(|| bad("wh_retry"))?).map(Some)
    }

    async fn add_(&self, ms: Vec<NewMessage>, now: u64) -> Result<Vec<Message>> {
        let mut args = vec![now.to_string(), ms.len().to_string()];
        let mut out = Vec::with_capacity(ms.len());
        for m in ms {
            let id = new_id("msg");
            args.extend([
                id.clone(),
                m.url.clone(),
                m.event.clone(),
                m.payload.to_string(),
            ]);
            out.push(Message {
                id,
                task_id: None,
                url: m.url,
                event: m.event,
                payload: m.payload,
                body: None,
                state: MessageState::Pending,
                attempts: 0,
                next_at: now,
                created_at: now,
                lease_holder: None,
                lease_until: None,
            });
        }
        self.run("wh_add", args).await?;
        Ok(out)
    }
}

impl Outbox for RedisQueue {
    fn add_messages(&self, ms: Vec<NewMessage>, now: u64) -> QueueFuture<'_, Vec<Message>> {
        Box::pin(self.add_(ms, now))
    }

    fn claim_messages<'a>(
        &'a self,
        holder: &'a str,
        n: usize,
        until: u64,
        now: u64,
    ) -> QueueFuture<'a, Vec<Message>> {
        Box::pin(self.claim_(holder, n, until, now))
    }

    fn record_delivery<'a>(
        &'a self,
        id: &'a str,
        holder: &'a str,
        body: &'a str,
        attempt: DeliveryAttempt,
        outcome: DeliveryOutcome,
    ) -> QueueFuture<'a, bool> {
        Box::pin(self.record_(id, holder, body, attempt, outcome))
    }

    fn task_messages<'a>(&'a self, task_id: &'a str) -> QueueFuture<'a, Vec<MessageRecord>> {
        Box::pin(self.read_messages("task", task_id))
    }

    fn message<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<MessageRecord>> {
        Box::pin(async move { Ok(self.read_messages("id", id).await?.pop()) })
    }

    fn retry_message<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, Option<Message>> {
        Box::pin(self.rearm_(id, now))
    }

    fn pending_messages(&self) -> QueueFuture<'_, u64> {
        Box::pin(async move {
            let mut r = self.run("wh_pending", Vec::new()).await?;
            Ok(int(&r.next().ok_or_else(|| bad("wh_pending"))?)?.max(0) as u64)
        })
    }
}
