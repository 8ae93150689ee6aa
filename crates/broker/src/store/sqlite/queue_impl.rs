//! [`Queue`] for [`SqliteQueue`]: each method runs its call on the writer (or, for reads,
//! the read connection).

use kiln_protocol::TaskState;
use rusqlite::params;
use serde_json::Value;

use super::SqliteQueue;
use super::db::{begin, get_task};
use crate::lifecycle::{Ending, TaskEvent};
use crate::model::*;
use crate::queue::*;
use crate::store::{Lease, Result, Stages, Store, Want};
use serde_json::Map;

impl Store for SqliteQueue {
    fn outbox(&self) -> &dyn crate::outbox::Outbox {
        self
    }

    async fn enqueue(&self, task: NewTask, now: u64) -> Result<(Task, bool)> {
        self.call(move |db| db.enqueue(task, now)).await
    }

    async fn enqueue_many(&self, tasks: Vec<NewTask>, now: u64) -> Result<Vec<(Task, bool)>> {
        self.call(move |db| db.enqueue_many(tasks, now)).await
    }

    async fn reserve(&self, want: Want<'_>, now: u64) -> Result<Vec<Task>> {
        let (w, caps, n, until) = (
            want.worker_id.to_owned(),
            want.caps.clone(),
            want.n,
            want.lease_until,
        );
        self.call(move |db| {
            let want = Want {
                worker_id: &w,
                caps: &caps,
                n,
                lease_until: until,
            };
            db.reserve(want, now)
        })
        .await
    }

    async fn renew(&self, worker_id: &str, until: u64) -> Result<usize> {
        let w = worker_id.to_owned();
        self.call(move |db| db.renew(&w, until)).await
    }

    async fn leases_of(&self, worker_id: &str) -> Result<Vec<(String, String)>> {
        let w = worker_id.to_owned();
        self.call(move |db| db.leases_of(&w)).await
    }

    async fn progress(&self, l: Lease<'_>, progress: Value, now: u64) -> Result<Option<String>> {
        let Lease { lease, holder } = l;
        let (l, h) = (lease.to_owned(), holder.map(str::to_owned));
        self.call(move |db| db.progress(&l, h.as_deref(), progress, now))
            .await
    }

    async fn finish(&self, l: Lease<'_>, ending: Ending, now: u64) -> Result<CompleteOutcome> {
        let Lease { lease, holder } = l;
        let (l, h) = (lease.to_owned(), holder.map(str::to_owned));
        self.call(move |db| db.end_attempt(&l, h.as_deref(), ending, now))
            .await
    }

    async fn release(&self, l: Lease<'_>, why: &str, now: u64) -> Result<Option<Task>> {
        let Lease { lease, holder } = l;
        let (l, h, why) = (lease.to_owned(), holder.map(str::to_owned), why.to_owned());
        self.call(move |db| db.give_back(&l, h.as_deref(), &why, None, now))
            .await
    }

    async fn reject(&self, l: Lease<'_>, why: &str, until: u64, now: u64) -> Result<Option<Task>> {
        let (Lease { lease, holder }, avoid_until) = (l, until);
        let (l, h, why) = (lease.to_owned(), holder.map(str::to_owned), why.to_owned());
        self.call(move |db| db.give_back(&l, h.as_deref(), &why, Some(avoid_until), now))
            .await
    }

    async fn note_task_types(&self, task_types: &[String], now: u64) -> Result<()> {
        let types = task_types.to_vec();
        self.call(move |db| db.note_task_types(&types, now)).await
    }

    async fn task_types_seen(&self, since: u64) -> Result<Vec<String>> {
        self.read(move |db| {
            let mut stmt = db.conn.prepare_cached(
                "SELECT task_type FROM task_types WHERE last_seen >= ?1 ORDER BY task_type",
            )?;
            let v = stmt
                .query_map(params![since as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(v)
        })
        .await
    }

    async fn release_worker(&self, worker: &str, keep: &[String], now: u64) -> Result<Vec<Task>> {
        let (w, keep) = (worker.to_owned(), keep.to_vec());
        self.call(move |db| db.release_worker(&w, &keep, now)).await
    }

    async fn record_assignment(&self, lease: &str, delivered: bool) -> Result<Option<u32>> {
        let l = lease.to_owned();
        self.call(move |db| db.record_assignment(&l, delivered))
            .await
    }

    async fn sweep(&self, now: u64) -> Result<Sweep> {
        self.call(move |db| db.sweep(now)).await
    }

    async fn cancel(&self, id: &str, now: u64) -> Result<CancelOutcome> {
        let id = id.to_owned();
        self.call(move |db| db.cancel(&id, now)).await
    }

    async fn retry(&self, id: &str, attempts: Option<u32>, now: u64) -> Result<RetryOutcome> {
        self.retry_(id, attempts, now).await
    }

    async fn get(&self, id: &str) -> Result<Option<Task>> {
        let id = id.to_owned();
        self.read(move |db| db.get(&id)).await
    }

    async fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>> {
        let id = id.to_owned();
        self.read(move |db| db.attempts(&id)).await
    }

    async fn queue_position(&self, task: &Task) -> Result<Option<u64>> {
        if task.state != TaskState::Queued {
            return Ok(None);
        }
        let t = task.clone();
        self.read(move |db| db.queue_position(&t)).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Task>> {
        let f = filter.clone();
        self.read(move |db| db.list(&f)).await
    }

    async fn stats(&self) -> Result<Stats> {
        self.read(|db| db.stats()).await
    }

    async fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<TaskEvent>> {
        let id = task_id.to_owned();
        self.read(move |db| db.events_after(&id, after)).await
    }

    async fn ping(&self) -> Result<()> {
        self.read(|db| db.ping()).await
    }

    async fn timings(&self, id: &str) -> Result<Option<Value>> {
        let id = id.to_owned();
        self.read(move |db| db.timings(&id)).await
    }

    async fn detail(&self, id: &str) -> Result<Option<TaskDetail>> {
        let id = id.to_owned();
        self.read(move |db| {
            // One read transaction, so the three parts agree with each other.
            let tx = begin(&db.conn)?;
            let Some(task) = get_task(&tx, &id)? else {
                return Ok(None);
            };
            let d = TaskDetail::new(task, db.attempts(&id)?, db.timings(&id)?);
            tx.commit()?;
            Ok(Some(d))
        })
        .await
    }

    async fn merge_timings(&self, id: &str, timings: &Map<String, Value>) -> Result<()> {
        let (id, t) = (id.to_owned(), timings.clone());
        self.call(move |db| db.merge_timings(&id, &t)).await
    }

    async fn record_worker_timings(&self, l: Lease<'_>, timings: &Stages) -> Result<bool> {
        let Lease { lease, holder } = l;
        let (l, h, t) = (lease.to_owned(), holder.map(str::to_owned), timings.clone());
        self.call(move |db| db.record_worker_timings(&l, h.as_deref(), &t))
            .await
    }

    async fn identity(&self, worker_id: &str) -> Result<Option<String>> {
        let w = worker_id.to_owned();
        self.call(move |db| db.identity(&w)).await
    }

    async fn set_identity(&self, worker_id: &str, secret_sha256: &str, now: u64) -> Result<bool> {
        let (w, h) = (worker_id.to_owned(), secret_sha256.to_owned());
        self.call(move |db| db.set_identity(&w, &h, now)).await
    }

    async fn forget_identity(&self, worker_id: &str) -> Result<bool> {
        let w = worker_id.to_owned();
        self.call(move |db| db.forget_identity(&w)).await
    }

    fn take_events(&self) -> Vec<TaskEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
