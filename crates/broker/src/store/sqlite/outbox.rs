//! The webhook outbox on SQLite (see [`crate::outbox`]): messages are written by
//! [`Db::write_messages`] inside the transaction of the task change that causes them.

use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteQueue;
use super::db::{Cached, Db, begin};
use crate::lifecycle::{self, TaskEventKind};
use crate::model::Task;
use crate::outbox::*;
use crate::queue::QueueFuture;
use crate::store::outbox::{MESSAGE_COLUMNS, after_outcome, message_from_row};
use crate::store::{Result, new_id};

fn insert(c: &Connection, m: &NewMessage, now: u64) -> Result<Message> {
    let id = new_id("msg");
    c.exec(
        "INSERT INTO webhook_messages (id, task_id, url, event, payload, state, next_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
        params![id, m.task_id, m.url, m.event, m.payload.to_string(), now],
    )?;
    Ok(Message {
        id,
        task_id: m.task_id.clone(),
        url: m.url.clone(),
        event: m.event.clone(),
        payload: m.payload.clone(),
        body: None,
        state: MessageState::Pending,
        attempts: 0,
        next_at: now,
        created_at: now,
        lease_holder: None,
        lease_until: None,
    })
}

fn messages(c: &Connection, filter: &str, p: impl rusqlite::Params) -> Result<Vec<Message>> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM webhook_messages WHERE {filter}");
    let mut stmt = c.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(p, |r| Ok(message_from_row(r)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().collect()
}

fn attempts_of(c: &Connection, id: &str) -> Result<Vec<DeliveryAttempt>> {
    let mut stmt = c.prepare_cached(
        "SELECT attempt, at, status, latency_ms, error FROM webhook_attempts
         WHERE message_id = ?1 ORDER BY attempt",
    )?;
    Ok(stmt
        .query_map([id], |r| {
            Ok(DeliveryAttempt {
                attempt: r.get(0)?,
                at: r.get(1)?,
                status: r.get(2)?,
                latency_ms: r.get(3)?,
                error: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?)
}

fn with_attempts(c: &Connection, ms: Vec<Message>) -> Result<Vec<MessageRecord>> {
    ms.into_iter()
        .map(|message| {
            let attempts = attempts_of(c, &message.id)?;
            Ok(MessageRecord { message, attempts })
        })
        .collect()
}

impl Db {
    /// Writes the messages a change of `after` writing `events` causes (in the caller's
    /// transaction).
    pub(super) fn write_messages(
        &self,
        c: &Connection,
        after: &Task,
        events: &[TaskEventKind],
        now: u64,
    ) -> Result<()> {
        let endpoints = &self.opts.webhook_endpoints;
        if !lifecycle::may_notify(after, endpoints) {
            return Ok(());
        }
        let progress_ok = if lifecycle::wants_progress(after, endpoints)
            && events
                .iter()
                .any(|e| matches!(e, TaskEventKind::Progress(_)))
        {
            let last: Option<u64> = c.row(
                "SELECT MAX(created_at) FROM webhook_messages WHERE task_id = ?1 AND event = 'task.progress'",
                [&after.id],
                |r| r.get(0),
            )?;
            lifecycle::progress_due(last, now)
        } else {
            false
        };
        for m in lifecycle::webhook_messages(after, events, progress_ok, endpoints) {
            insert(c, &m, now)?;
        }
        Ok(())
    }

    fn claim_messages(&self, holder: &str, n: usize, until: u64, now: u64) -> Result<Vec<Message>> {
        let tx = begin(&self.conn)?;
        tx.exec(
            "UPDATE webhook_messages SET state = 'disabled', lease_holder = NULL, lease_until = NULL
             WHERE state = 'pending' AND url IN (SELECT url FROM webhook_disabled)",
            [],
        )?;
        let found = messages(
            &tx,
            "state = 'pending' AND next_at <= ?1 AND (lease_until IS NULL OR lease_until < ?1)
             ORDER BY next_at, seq LIMIT ?2",
            params![now, n as i64],
        )?;
        let mut out = Vec::with_capacity(found.len());
        for mut m in found {
            tx.exec(
                "UPDATE webhook_messages SET lease_holder = ?2, lease_until = ?3 WHERE id = ?1",
                params![m.id, holder, until],
            )?;
            m.lease_holder = Some(holder.to_owned());
            m.lease_until = Some(until);
            out.push(m);
        }
        tx.commit()?;
        Ok(out)
    }

    fn record_delivery(
        &self,
        id: &str,
        holder: &str,
        body: &str,
        a: &DeliveryAttempt,
        outcome: DeliveryOutcome,
    ) -> Result<bool> {
        let tx = begin(&self.conn)?;
        let Some(m) = messages(
            &tx,
            "id = ?1 AND lease_holder = ?2 AND state = 'pending'",
            params![id, holder],
        )?
        .pop() else {
            return Ok(false);
        };
        let n = m.attempts + 1;
        let (state, next_at) = after_outcome(outcome, m.next_at);
        tx.exec(
            "INSERT OR REPLACE INTO webhook_attempts (message_id, attempt, at, status, latency_ms, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, n, a.at, a.status, a.latency_ms, a.error],
        )?;
        tx.exec(
            "UPDATE webhook_messages SET attempts = ?2, state = ?3, next_at = ?4,
             body = COALESCE(body, ?5), lease_holder = NULL, lease_until = NULL WHERE id = ?1",
            params![id, n, state.as_str(), next_at, body],
        )?;
        if state == MessageState::Disabled {
            tx.exec(
                "INSERT OR REPLACE INTO webhook_disabled (url, at) VALUES (?1, ?2)",
                params![m.url, a.at],
            )?;
            tx.exec(
                "UPDATE webhook_messages SET state = 'disabled' WHERE state = 'pending' AND url = ?1
                 AND lease_holder IS NULL",
                params![m.url],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    fn retry_message(&self, id: &str, now: u64) -> Result<Option<Message>> {
        let tx = begin(&self.conn)?;
        let Some(m) = messages(&tx, "id = ?1", [id])?.pop() else {
            return Ok(None);
        };
        if m.state == MessageState::Delivered {
            return Ok(Some(m));
        }
        tx.exec("DELETE FROM webhook_disabled WHERE url = ?1", [&m.url])?;
        tx.exec(
            "UPDATE webhook_messages SET state = 'pending', next_at = ?2, lease_holder = NULL,
             lease_until = NULL WHERE id = ?1",
            params![id, now],
        )?;
        let after = messages(&tx, "id = ?1", [id])?.pop();
        tx.commit()?;
        Ok(after)
    }

    fn add_messages(&self, ms: &[NewMessage], now: u64) -> Result<Vec<Message>> {
        let tx = begin(&self.conn)?;
        let out = ms
            .iter()
            .map(|m| insert(&tx, m, now))
            .collect::<Result<Vec<_>>>()?;
        tx.commit()?;
        Ok(out)
    }
}

impl Outbox for SqliteQueue {
    fn add_messages(&self, ms: Vec<NewMessage>, now: u64) -> QueueFuture<'_, Vec<Message>> {
        self.call(move |db| db.add_messages(&ms, now))
    }

    fn claim_messages<'a>(
        &'a self,
        holder: &'a str,
        n: usize,
        until: u64,
        now: u64,
    ) -> QueueFuture<'a, Vec<Message>> {
        let h = holder.to_owned();
        self.call(move |db| db.claim_messages(&h, n, until, now))
    }

    fn record_delivery<'a>(
        &'a self,
        id: &'a str,
        holder: &'a str,
        body: &'a str,
        attempt: DeliveryAttempt,
        outcome: DeliveryOutcome,
    ) -> QueueFuture<'a, bool> {
        let (id, h, body) = (id.to_owned(), holder.to_owned(), body.to_owned());
        self.call(move |db| db.record_delivery(&id, &h, &body, &attempt, outcome))
    }

    fn task_messages<'a>(&'a self, task_id: &'a str) -> QueueFuture<'a, Vec<MessageRecord>> {
        let id = task_id.to_owned();
        self.read(move |db| {
            let ms = messages(&db.conn, "task_id = ?1 ORDER BY seq", [&id])?;
            with_attempts(&db.conn, ms)
        })
    }

    fn message<'a>(&'a self, id: &'a str) -> QueueFuture<'a, Option<MessageRecord>> {
        let id = id.to_owned();
        self.read(move |db| {
            let ms = messages(&db.conn, "id = ?1", [&id])?;
            Ok(with_attempts(&db.conn, ms)?.pop())
        })
    }

    fn retry_message<'a>(&'a self, id: &'a str, now: u64) -> QueueFuture<'a, Option<Message>> {
        let id = id.to_owned();
        self.call(move |db| db.retry_message(&id, now))
    }

    fn pending_messages(&self) -> QueueFuture<'_, u64> {
        self.read(|db| {
            let n: i64 = db
                .conn
                .row(
                    "SELECT COUNT(*) FROM webhook_messages WHERE state = 'pending'",
                    [],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            Ok(n.max(0) as u64)
        })
    }
}
