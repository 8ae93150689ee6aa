//! The webhook outbox on PostgreSQL (see [`crate::outbox`]): messages are written by
//! [`Tx::write_messages`] inside the transaction of the task change that causes them;
//! claims lock with `SKIP LOCKED`, so instances never hold one message together.

use tokio_postgres::Row;

use super::tx::Tx;
use super::{PostgresQueue, i};
use crate::lifecycle::{self, TaskEventKind};
use crate::model::Task;
use crate::outbox::*;
use crate::queue::QueueFuture;
use crate::store::outbox::{MESSAGE_COLUMNS, after_outcome, message_from_row};
use crate::store::{Result, new_id};

fn parse(rows: &[Row]) -> Result<Vec<Message>> {
    rows.iter().map(message_from_row).collect()
}

fn attempt_from(r: &Row) -> Result<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        attempt: r.try_get::<_, i32>(0)?.max(0) as u32,
        at: r.try_get::<_, i64>(1)?.max(0) as u64,
        status: r
            .try_get::<_, Option<i32>>(2)?
            .map(|s| s.clamp(0, 999) as u16),
        latency_ms: r.try_get::<_, i64>(3)?.max(0) as u64,
        error: r.try_get(4)?,
    })
}

impl Tx<'_> {
    /// Writes the messages a change of `after` writing `events` causes.
    pub(super) async fn write_messages(
        &self,
        after: &Task,
        events: &[TaskEventKind],
        now: u64,
    ) -> Result<()> {
        let endpoints = &self.queue().opts.webhook_endpoints;
        if !lifecycle::may_notify(after, endpoints) {
            return Ok(());
        }
        let progress_ok = if lifecycle::wants_progress(after, endpoints)
            && events
                .iter()
                .any(|e| matches!(e, TaskEventKind::Progress(_)))
        {
            let rows = self
                .rows(
                    "SELECT MAX(created_at) FROM {s}.webhook_messages WHERE task_id = $1 AND event = 'task.progress'",
                    &[&after.id],
                )
                .await?;
            let last: Option<i64> = match rows.first() {
                Some(r) => r.try_get(0)?,
                None => None,
            };
            lifecycle::progress_due(last.map(|v| v.max(0) as u64), now)
        } else {
            false
        };
        for m in lifecycle::webhook_messages(after, events, progress_ok, endpoints) {
            self.insert_message(&m, now).await?;
        }
        Ok(())
    }

    async fn insert_message(&self, m: &NewMessage, now: u64) -> Result<Message> {
        let id = new_id("msg");
        let sql = format!(
            "INSERT INTO {{s}}.webhook_messages (id, task_id, url, event, payload, state, next_at, created_at)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6) RETURNING {MESSAGE_COLUMNS}"
        );
        let rows = self
            .rows(
                &sql,
                &[
                    &id,
                    &m.task_id,
                    &m.url,
                    &m.event,
                    &m.payload.to_string(),
                    &i(now),
                ],
            )
            .await?;
        parse(&rows)?
            .pop()
            .ok_or_else(|| crate::store::corrupt("insert returned no message"))
    }
}

impl PostgresQueue {
    async fn messages(
        &self,
        filter: &str,
        p: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<MessageRecord>> {
        let c = self.pool.get().await?;
        let sql = self.sql(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM {{s}}.webhook_messages WHERE {filter}"
        ));
        let stmt = c.prepare_cached(&sql).await?;
        let ms = parse(&c.query(&stmt, p).await?)?;
        let att = c
            .prepare_cached(&self.sql(
                "SELECT attempt, at, status, latency_ms, error FROM {s}.webhook_attempts
                 WHERE message_id = $1 ORDER BY attempt",
            ))
            .await?;
        let mut out = Vec::with_capacity(ms.len());
        for message in ms {
            let attempts = c
                .query(&att, &[&message.id])
                .await?
                .iter()
                .map(attempt_from)
                .collect::<Result<_>>()?;
            out.push(MessageRecord { message, attempts });
        }
        Ok(out)
    }

    async fn claim_(&self, holder: &str, n: usize, until: u64, now: u64) -> Result<Vec<Message>> {
        let mut c = self.pool.get().await?;
        let tx = Tx::begin(self, &mut c).await?;
        tx.exec(
            "UPDATE {s}.webhook_messages SET state = 'disabled', lease_holder = NULL, lease_until = NULL
             WHERE state = 'pending' AND url IN (SELECT url FROM {s}.webhook_disabled)",
            &[],
        )
        .await?;
        let sql = format!(
            "UPDATE {{s}}.webhook_messages SET lease_holder = $1, lease_until = $2
             WHERE id IN (SELECT id FROM {{s}}.webhook_messages WHERE state = 'pending' AND next_at <= $3
               AND (lease_until IS NULL OR lease_until < $3) ORDER BY next_at, seq LIMIT $4
               FOR UPDATE SKIP LOCKED)
             RETURNING {MESSAGE_COLUMNS}"
        );
        let rows = tx
            .rows(&sql, &[&holder, &i(until), &i(now), &(n as i64)])
            .await?;
        let mut out = parse(&rows)?;
        out.sort_by_key(|m| (m.next_at, m.created_at));
        tx.commit().await?;
        Ok(out)
    }

    async fn record_(
        &self,
        id: &str,
        holder: &str,
        body: &str,
        a: &DeliveryAttempt,
        outcome: DeliveryOutcome,
    ) -> Result<bool> {
        let mut c = self.pool.get().await?;
        let tx = Tx::begin(self, &mut c).await?;
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM {{s}}.webhook_messages
             WHERE id = $1 AND lease_holder = $2 AND state = 'pending' FOR UPDATE"
        );
        let Some(m) = parse(&tx.rows(&sql, &[&id, &holder]).await?)?.pop() else {
            return Ok(false);
        };
        let n = (m.attempts + 1) as i32;
        let (state, next_at) = after_outcome(outcome, m.next_at);
        tx.exec(
            "INSERT INTO {s}.webhook_attempts (message_id, attempt, at, status, latency_ms, error)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (message_id, attempt) DO UPDATE
             SET at = $3, status = $4, latency_ms = $5, error = $6",
            &[
                &id,
                &n,
                &i(a.at),
                &a.status.map(i32::from),
                &i(a.latency_ms),
                &a.error,
            ],
        )
        .await?;
        tx.exec(
            "UPDATE {s}.webhook_messages SET attempts = $2, state = $3, next_at = $4,
             body = COALESCE(body, $5), lease_holder = NULL, lease_until = NULL WHERE id = $1",
            &[&id, &n, &state.as_str(), &i(next_at), &body],
        )
        .await?;
        if state == MessageState::Disabled {
            tx.exec(
                "INSERT INTO {s}.webhook_disabled (url, at) VALUES ($1, $2)
                 ON CONFLICT (url) DO UPDATE SET at = $2",
                &[&m.url, &i(a.at)],
            )
            .await?;
            tx.exec(
                "UPDATE {s}.webhook_messages SET state = 'disabled'
                 WHERE state = 'pending' AND url = $1 AND lease_holder IS NULL",
                &[&m.url],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn rearm_(&self, id: &str, now: u64) -> Result<Option<Message>> {
        let mut c = self.pool.get().await?;
        let tx = Tx::begin(self, &mut c).await?;
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM {{s}}.webhook_messages WHERE id = $1 FOR UPDATE"
        );
        let Some(m) = parse(&tx.rows(&sql, &[&id]).await?)?.pop() else {
            return Ok(None);
        };
        if m.state == MessageState::Delivered {
            return Ok(Some(m));
        }
        tx.exec("DELETE FROM {s}.webhook_disabled WHERE url = $1", &[&m.url])
            .await?;
        let sql = format!(
            "UPDATE {{s}}.webhook_messages SET state = 'pending', next_at = $2, lease_holder = NULL,
             lease_until = NULL WHERE id = $1 RETURNING {MESSAGE_COLUMNS}"
        );
        let after = parse(&tx.rows(&sql, &[&id, &i(now)]).await?)?.pop();
        tx.commit().await?;
        Ok(after)
    }

    async fn add_(&self, ms: Vec<NewMessage>, now: u64) -> Result<Vec<Message>> {
        let mut c = self.pool.get().await?;
        let tx = Tx::begin(self, &mut c).await?;
        let mut out = Vec::with_capacity(ms.len());
        for m in &ms {
            out.push(tx.insert_message(m, now).await?);
        }
        tx.commit().await?;
        Ok(out)
    }
}

impl Outbox for PostgresQueue {
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
        Box::pin(async move { self.record_(id, holder, body, &attempt, outcome).await })
    }

    fn task_messages<'a>(&'a self, task_id: &'a str) -> QueueFuture<'a, Vec<MessageRecord>> {
        Box::pin(async move {
            self.messages("task_id = $1 ORDER BY seq", &[&task_id])
                .await
        })
    }

    fn message<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<MessageRecord>> {
        Box::pin(async move { Ok(self.messages("id = $1", &[&id]).await?.pop()) })
    }

    fn retry_message<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, Option<Message>> {
        Box::pin(self.rearm_(id, now))
    }

    fn pending_messages(&self) -> QueueFuture<'_, u64> {
        Box::pin(async move {
            let rows = self
                .read(
                    "SELECT COUNT(*) FROM {s}.webhook_messages WHERE state = 'pending'",
                    &[],
                )
                .await?;
            let n: i64 = match rows.first() {
                Some(r) => r.try_get(0)?,
                None => 0,
            };
            Ok(n.max(0) as u64)
        })
    }
}
