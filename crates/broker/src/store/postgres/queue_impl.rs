//! [`Queue`] for [`PostgresQueue`]: reads run on a pooled connection, writes through
//! `tx.rs`.

use kiln_protocol::TaskState;
use serde_json::{Value, json};

use super::listen::row_to_event;
use super::{PostgresQueue, i, u};
use crate::lifecycle::{self, Ending, TaskEvent};
use crate::model::*;
use crate::queue::*;
use crate::store::{Lease, Stages, Store, Want};
use crate::store::{Result, cols, corrupt, task_from_row};
use serde_json::Map;

impl PostgresQueue {
    async fn note_task_types_(&self, task_types: &[String], now: u64) -> Result<()> {
        let c = self.pool.get().await?;
        let stmt = c
            .prepare_cached(&self.sql(
                "INSERT INTO {s}.task_types (task_type, last_seen) SELECT t, $2 FROM unnest($1::text[]) AS t
                 ON CONFLICT (task_type) DO UPDATE SET last_seen = GREATEST({s}.task_types.last_seen, $2)",
            ))
            .await?;
        c.execute(&stmt, &[&task_types, &i(now)]).await?;
        Ok(())
    }

    async fn task_types_seen_(&self, since: u64) -> Result<Vec<String>> {
        let rows = self
            .read(
                "SELECT task_type FROM {s}.task_types WHERE last_seen >= $1 ORDER BY task_type",
                &[&i(since)],
            )
            .await?;
        rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn list_(&self, f: &ListFilter) -> Result<Vec<Task>> {
        let rows = self
            .read(
                &format!(
                    "SELECT {} FROM {{s}}.tasks WHERE ($1::text IS NULL OR state = $1)
                     AND ($2::text IS NULL OR task_type = $2) AND ($3::bigint IS NULL OR seq < $3)
                     ORDER BY seq DESC LIMIT $4",
                    cols()
                ),
                &[
                    &f.state.map(|s| s.as_str()),
                    &f.task_type,
                    &f.before_seq,
                    &(lifecycle::list_limit(f.limit) as i64),
                ],
            )
            .await?;
        rows.iter().map(task_from_row).collect()
    }

    async fn stats_(&self) -> Result<Stats> {
        let rows = self
            .read(
                "SELECT state, task_type, COUNT(*) FROM {s}.tasks GROUP BY state, task_type",
                &[],
            )
            .await?;
        let counts = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Stats::from_counts(counts))
    }
}

impl Store for PostgresQueue {
    fn outbox(&self) -> &dyn crate::outbox::Outbox {
        self
    }

    async fn enqueue(&self, task: NewTask, now: u64) -> Result<(Task, bool)> {
        self.enqueue_(task, now).await
    }

    async fn enqueue_many(&self, tasks: Vec<NewTask>, now: u64) -> Result<Vec<(Task, bool)>> {
        self.enqueue_many_(tasks, now).await
    }

    async fn reserve(&self, want: Want<'_>, now: u64) -> Result<Vec<Task>> {
        self.reserve_(want, now).await
    }

    async fn renew(&self, worker_id: &str, until: u64) -> Result<usize> {
        let c = self.pool.get().await?;
        let stmt = c
            .prepare_cached(&self.sql(
                "UPDATE {s}.tasks SET lease_expires_at = $2 WHERE state = 'running' AND worker_id = $1 AND lease_expires_at < $2",
            ))
            .await?;
        Ok(c.execute(&stmt, &[&worker_id, &i(until)]).await? as usize)
    }

    async fn leases_of(&self, worker_id: &str) -> Result<Vec<(String, String)>> {
        let rows = self
            .read(
                "SELECT lease, id FROM {s}.tasks WHERE state = 'running' AND worker_id = $1",
                &[&worker_id],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    async fn progress(&self, l: Lease<'_>, progress: Value, now: u64) -> Result<Option<String>> {
        self.progress_(l, progress, now).await
    }

    async fn finish(&self, l: Lease<'_>, ending: Ending, now: u64) -> Result<CompleteOutcome> {
        self.end_attempt(l, ending, now).await
    }

    async fn release(&self, l: Lease<'_>, why: &str, now: u64) -> Result<Option<Task>> {
        self.give_back_(l, why, None, now).await
    }

    async fn reject(&self, l: Lease<'_>, why: &str, until: u64, now: u64) -> Result<Option<Task>> {
        self.give_back_(l, why, Some(until), now).await
    }

    async fn note_task_types(&self, task_types: &[String], now: u64) -> Result<()> {
        self.note_task_types_(task_types, now).await
    }

    async fn task_types_seen(&self, since: u64) -> Result<Vec<String>> {
        self.task_types_seen_(since).await
    }

    async fn release_worker(&self, worker: &str, keep: &[String], now: u64) -> Result<Vec<Task>> {
        self.release_worker_(worker, keep, now).await
    }

    async fn record_assignment(&self, lease: &str, delivered: bool) -> Result<Option<u32>> {
        let rows = self
            .read(
                "UPDATE {s}.tasks SET assign_failures = CASE WHEN $2 THEN 0 ELSE assign_failures + 1 END
                 WHERE lease = $1 AND state = 'running' RETURNING assign_failures",
                &[&lease, &delivered],
            )
            .await?;
        rows.first()
            .map(|r| Ok(r.try_get::<_, i32>(0)?.max(0) as u32))
            .transpose()
    }

    async fn sweep(&self, now: u64) -> Result<Sweep> {
        self.sweep_(now).await
    }

    async fn cancel(&self, id: &str, now: u64) -> Result<CancelOutcome> {
        self.cancel_(id, now).await
    }

    async fn retry(&self, id: &str, attempts: Option<u32>, now: u64) -> Result<RetryOutcome> {
        self.retry_(id, attempts, now).await
    }

    async fn get(&self, id: &str) -> Result<Option<Task>> {
        let rows = self
            .read(
                &format!("SELECT {} FROM {{s}}.tasks WHERE id = $1", cols()),
                &[&id],
            )
            .await?;
        rows.first().map(task_from_row).transpose()
    }

    async fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>> {
        let rows = self
            .read(
                "SELECT attempt, worker_id, lease, started_at, ended_at, error FROM {s}.attempts
                 WHERE task_id = $1 ORDER BY attempt",
                &[&id],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AttemptRecord {
                    attempt: r.try_get::<_, i32>(0)?.max(0) as u32,
                    worker_id: r.try_get(1)?,
                    lease: r.try_get(2)?,
                    started_at: u(r.try_get(3)?),
                    ended_at: r.try_get::<_, Option<i64>>(4)?.map(u),
                    error: r.try_get(5)?,
                })
            })
            .collect()
    }

    async fn queue_position(&self, task: &Task) -> Result<Option<u64>> {
        if task.state != TaskState::Queued {
            return Ok(None);
        }
        let rows = self
            .read(
                "SELECT COUNT(*) FROM {s}.tasks WHERE state = 'queued' AND task_type = $1
                 AND model IS NOT DISTINCT FROM $4
                 AND (priority > $2 OR (priority = $2 AND seq < $3))",
                &[&task.task_type, &task.priority, &task.seq, &task.model],
            )
            .await?;
        let n: i64 = rows
            .first()
            .ok_or_else(|| corrupt("no count"))?
            .try_get(0)?;
        Ok(Some(u(n)))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Task>> {
        self.list_(filter).await
    }

    async fn stats(&self) -> Result<Stats> {
        self.stats_().await
    }

    async fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<TaskEvent>> {
        let rows = self
            .read(
                "SELECT id, task_id, kind, data, ts FROM {s}.events WHERE task_id = $1 AND id > $2 ORDER BY id",
                &[&task_id, &after],
            )
            .await?;
        rows.iter().map(row_to_event).collect()
    }

    async fn ping(&self) -> Result<()> {
        self.pool.get().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    async fn timings(&self, id: &str) -> Result<Option<Value>> {
        let rows = self
            .read(
                "SELECT data::text FROM {s}.timings WHERE task_id = $1",
                &[&id],
            )
            .await?;
        rows.first()
            .map(|r| {
                let text: String = r.try_get(0)?;
                serde_json::from_str(&text).map_err(corrupt)
            })
            .transpose()
    }

    async fn merge_timings(&self, id: &str, timings: &Map<String, Value>) -> Result<()> {
        // `||` replaces top-level keys and keeps the others, in one statement.
        let data = Value::Object(timings.clone()).to_string();
        self.write_timings(
            "INSERT INTO {s}.timings (task_id, data) VALUES ($1, ($2::text)::jsonb)
             ON CONFLICT (task_id) DO UPDATE SET data = {s}.timings.data || excluded.data
             RETURNING task_id",
            &[&id, &data],
        )
        .await?;
        Ok(())
    }

    async fn record_worker_timings(&self, l: Lease<'_>, timings: &Stages) -> Result<bool> {
        let Lease { lease, holder } = l;
        let data = json!({ "worker": timings }).to_string();
        let rows = self
            .write_timings(
                "INSERT INTO {s}.timings (task_id, data)
                 SELECT id, ($2::text)::jsonb FROM {s}.tasks WHERE lease = $1 AND state = 'running'
                   AND ($3::text IS NULL OR worker_id = $3)
                 ON CONFLICT (task_id) DO UPDATE SET data = {s}.timings.data || excluded.data
                 RETURNING task_id",
                &[&lease, &data, &holder],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn identity(&self, worker_id: &str) -> Result<Option<String>> {
        let rows = self
            .read(
                "SELECT secret_sha256 FROM {s}.workers WHERE worker_id = $1",
                &[&worker_id],
            )
            .await?;
        Ok(rows.first().map(|r| r.try_get(0)).transpose()?)
    }

    async fn set_identity(&self, worker_id: &str, secret_sha256: &str, now: u64) -> Result<bool> {
        let rows = self
            .read(
                "INSERT INTO {s}.workers (worker_id, secret_sha256, created_at) VALUES ($1, $2, $3)
                 ON CONFLICT (worker_id) DO NOTHING RETURNING worker_id",
                &[&worker_id, &secret_sha256, &i(now)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn forget_identity(&self, worker_id: &str) -> Result<bool> {
        let rows = self
            .read(
                "DELETE FROM {s}.workers WHERE worker_id = $1 RETURNING worker_id",
                &[&worker_id],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    fn take_events(&self) -> Vec<TaskEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn notifications(&self) -> Option<Notifications> {
        let rx = self
            .notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|n| (n, rx))
        })))
    }
}
