//! [`Queue`] for [`RedisQueue`].

use std::collections::{HashMap, VecDeque};

use ::redis::Value;
use kiln_protocol::TaskState;
use serde_json::Value as Json;

use super::change::Changed;
use super::notify::NotifyReader;
use super::reply::{array, event_from, int, need_task, tasks_from, text};
use super::{LIST_SCAN_BUDGET, RedisQueue, STATES, corrupt, store};
use crate::lifecycle::{self, Ending, TaskEvent};
use crate::model::*;
use crate::queue::*;
use crate::store::{Lease, Result, Stages, Store, Want, holds};
use serde_json::Map;

impl Store for RedisQueue {
    fn outbox(&self) -> &dyn crate::outbox::Outbox {
        self
    }

    async fn enqueue(&self, t: NewTask, now: u64) -> Result<(Task, bool)> {
        let a = lifecycle::admit(t, &self.opts.queue)?;
        let t = &a.task;
        let args = self.enqueue_args(&a, now);
        let mut r = self.run("enqueue", args).await?;
        let tag = r.tag()?;
        let task = need_task(r.next())?;
        if tag == "exists" {
            if !lifecycle::same_request(&task, t) {
                return Err(QueueError::Conflict(
                    t.request_id.clone().unwrap_or_default(),
                ));
            }
            return Ok((task, false));
        }
        Ok((task, true))
    }

    async fn enqueue_many(&self, tasks: Vec<NewTask>, now: u64) -> Result<Vec<(Task, bool)>> {
        self.enqueue_many_(tasks, now).await
    }

    async fn reserve(&self, want: Want<'_>, now: u64) -> Result<Vec<Task>> {
        let Want {
            worker_id,
            caps,
            n,
            lease_until,
        } = want;
        fn set(v: &[String]) -> Vec<&String> {
            let mut v: Vec<&String> = v.iter().collect();
            v.sort();
            v.dedup();
            v
        }
        let (types, models, labels) = (set(&caps.task_types), set(&caps.models), set(&caps.labels));
        if n == 0 || types.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![
            worker_id.to_owned(),
            n.to_string(),
            lease_until.to_string(),
            now.to_string(),
            types.len().to_string(),
        ];
        args.extend(types.into_iter().cloned());
        args.push(models.len().to_string());
        args.extend(models.into_iter().cloned());
        args.push(labels.len().to_string());
        args.extend(labels.into_iter().cloned());
        args.extend((0..n).map(|_| format!("lease_{}", uuid::Uuid::new_v4().simple())));
        let mut r = self.run("reserve", args).await?;
        let tasks = tasks_from(r.next().ok_or_else(|| corrupt("reserve"))?)?;
        self.remember(&tasks);
        Ok(tasks)
    }

    async fn renew(&self, worker_id: &str, until: u64) -> Result<usize> {
        let mut r = self
            .run("renew", vec![worker_id.to_owned(), until.to_string()])
            .await?;
        Ok(int(&r.next().ok_or_else(|| corrupt("renew"))?)? as usize)
    }

    async fn leases_of(&self, worker_id: &str) -> Result<Vec<(String, String)>> {
        let mut r = self.run("leases", vec![worker_id.to_owned()]).await?;
        let flat = array(r.next().ok_or_else(|| corrupt("leases"))?)?;
        Ok(flat
            .chunks(2)
            .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
            .collect())
    }

    async fn progress(&self, l: Lease<'_>, progress: Json, now: u64) -> Result<Option<String>> {
        let Lease { lease, holder } = l;
        let mut r = self
            .run(
                "progress",
                vec![
                    lease.to_owned(),
                    progress.to_string(),
                    now.to_string(),
                    holder.unwrap_or_default().to_owned(),
                ],
            )
            .await?;
        Ok(r.next().as_ref().and_then(text))
    }

    async fn finish(&self, l: Lease<'_>, ending: Ending, now: u64) -> Result<CompleteOutcome> {
        let Lease { lease, holder } = l;
        // The copy from `reserve` serves only a call it would accept; a refusal is decided
        // from the task as stored.
        let cached = self
            .recall(lease)
            .filter(|t| lifecycle::check_lease(Some(t), lease, holder, true).is_ok());
        let (task, known) = match cached {
            Some(t) => (Some(t), true),
            None => self.by_lease(lease).await?,
        };
        let refusal = |t: Option<&Task>| {
            lifecycle::check_lease(t, lease, holder, known)
                .err()
                .map(|r| *r)
        };
        let Some(task) = task else {
            return Ok(refusal(None).unwrap_or_else(CompleteOutcome::unknown_lease));
        };
        let decide = |t: &Task| {
            lifecycle::check_lease(Some(t), lease, holder, known)
                .ok()
                .map(|t| lifecycle::finish(t, ending.clone(), &self.opts.queue, now))
        };
        Ok(match self.change(task, None, now, decide).await? {
            Changed::Done(d) => CompleteOutcome {
                accepted: true,
                reason: None,
                task: Some(d.1),
            },
            Changed::Declined(t) => refusal(Some(&t)).unwrap_or_else(CompleteOutcome::stale_lease),
            Changed::Gone => CompleteOutcome::stale_lease(),
        })
    }

    async fn release(&self, l: Lease<'_>, why: &str, now: u64) -> Result<Option<Task>> {
        self.give_back(l, None, why, now).await
    }

    async fn reject(&self, l: Lease<'_>, why: &str, until: u64, now: u64) -> Result<Option<Task>> {
        self.give_back(l, Some(until), why, now).await
    }

    async fn note_task_types(&self, task_types: &[String], now: u64) -> Result<()> {
        let mut args = vec![now.to_string()];
        args.extend(task_types.iter().cloned());
        self.run("note_types", args).await.map(|_| ())
    }

    async fn task_types_seen(&self, since: u64) -> Result<Vec<String>> {
        let mut r = self.run("types_seen", vec![since.to_string()]).await?;
        let v = array(r.next().ok_or_else(|| corrupt("types_seen"))?)?;
        Ok(v.iter().filter_map(text).collect())
    }

    async fn record_assignment(&self, lease: &str, delivered: bool) -> Result<Option<u32>> {
        let failed = if delivered { "0" } else { "1" };
        let mut r = self
            .run("assignment", vec![lease.to_owned(), failed.to_owned()])
            .await?;
        let n = int(&r.next().ok_or_else(|| corrupt("assignment"))?)?;
        Ok(u32::try_from(n).ok())
    }

    async fn release_worker(&self, worker: &str, keep: &[String], now: u64) -> Result<Vec<Task>> {
        let worker_id = worker;
        let mut r = self.run("held", vec![worker_id.to_owned()]).await?;
        let held = tasks_from(r.next().ok_or_else(|| corrupt("held"))?)?;
        let mut out = Vec::new();
        for t in held {
            if t.lease.as_ref().is_some_and(|l| keep.contains(l)) {
                continue;
            }
            let lease = t.lease.clone();
            let decide = |t: &Task| {
                (t.state == TaskState::Running && t.lease == lease && holds(t, Some(worker_id)))
                    .then(|| lifecycle::requeue(t, lifecycle::WORKER_RESTARTED, true, now))
            };
            if let Changed::Done(d) = self.change(t, None, now, decide).await? {
                out.push(d.1);
            }
        }
        Ok(out)
    }

    async fn sweep(&self, now: u64) -> Result<Sweep> {
        let mut r = self.run("due", vec![now.to_string()]).await?;
        let lapsed = tasks_from(r.next().ok_or_else(|| corrupt("due"))?)?;
        let late = tasks_from(r.next().ok_or_else(|| corrupt("due"))?)?;
        let mut sweep = Sweep::default();
        for t in lapsed {
            let decide = |t: &Task| lifecycle::lapsed(t, now).then(|| lifecycle::lapse(t, now));
            if let Changed::Done(d) = self.change(t, None, now, decide).await? {
                sweep.changed.push(d.1);
            }
        }
        for t in late {
            let decide =
                |t: &Task| lifecycle::past_deadline(t, now).then(|| lifecycle::expire(t, now));
            if let Changed::Done(d) = self.change(t, None, now, decide).await? {
                let (before, after) = *d;
                if let (Some(w), Some(l), TaskState::Running) =
                    (before.worker_id, before.lease, before.state)
                {
                    sweep.stop.push((w, l));
                }
                sweep.changed.push(after);
            }
        }
        Ok(sweep)
    }

    async fn cancel(&self, id: &str, now: u64) -> Result<CancelOutcome> {
        let Some(task) = self.get_task(id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        Ok(
            match self
                .change(task, None, now, |t| lifecycle::cancel(t, now))
                .await?
            {
                Changed::Done(d) => crate::store::cancel_outcome(d.1),
                Changed::Declined(t) => CancelOutcome::AlreadyTerminal(*t),
                Changed::Gone => CancelOutcome::NotFound,
            },
        )
    }

    async fn retry(&self, id: &str, attempts: Option<u32>, now: u64) -> Result<RetryOutcome> {
        let Some(task) = self.get_task(id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        let opts = &self.opts.queue;
        let decide = |t: &Task| lifecycle::retry(t, attempts, opts, now);
        Ok(match self.change(task, None, now, decide).await? {
            Changed::Done(d) => RetryOutcome::Queued(d.1),
            Changed::Declined(t) => RetryOutcome::Refused(*t),
            Changed::Gone => RetryOutcome::NotFound,
        })
    }

    async fn get(&self, id: &str) -> Result<Option<Task>> {
        self.get_task(id).await
    }

    async fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = ::redis::cmd("LRANGE")
            .arg(self.key(&["att", id]))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(store)?;
        raw.iter()
            .map(|s| {
                let f: Vec<String> = serde_json::from_str(s)
                    .map_err(|e| QueueError::Corrupt(format!("attempt: {e}")))?;
                let get = |i: usize| f.get(i).filter(|v| !v.is_empty()).cloned();
                let n = |i: usize| get(i).and_then(|v| v.parse::<u64>().ok());
                Ok(AttemptRecord {
                    attempt: n(0).unwrap_or(0) as u32,
                    worker_id: get(1).unwrap_or_default(),
                    lease: get(2).unwrap_or_default(),
                    started_at: n(3).unwrap_or(0),
                    ended_at: n(4),
                    error: get(5),
                })
            })
            .collect()
    }

    async fn queue_position(&self, task: &Task) -> Result<Option<u64>> {
        if task.state != TaskState::Queued {
            return Ok(None);
        }
        let mut r = self.run("position", vec![task.id.clone()]).await?;
        match r.next() {
            Some(Value::Nil) | None => Ok(None),
            Some(v) => Ok(Some(int(&v)?.max(0) as u64)),
        }
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Task>> {
        let args = vec![
            filter
                .state
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            filter.task_type.clone().unwrap_or_default(),
            filter.before_seq.map(|s| s.to_string()).unwrap_or_default(),
            lifecycle::list_limit(filter.limit).to_string(),
            LIST_SCAN_BUDGET.to_string(),
        ];
        let mut r = self.run("list", args).await?;
        tasks_from(r.next().ok_or_else(|| corrupt("list"))?)
    }

    async fn stats(&self) -> Result<Stats> {
        let mut pipe = ::redis::pipe();
        for s in STATES {
            pipe.cmd("HGETALL").arg(self.key(&["counts", s.as_str()]));
        }
        let mut conn = self.conn.clone();
        let per: Vec<HashMap<String, i64>> = pipe.query_async(&mut conn).await.map_err(store)?;
        let mut by_state_type = Vec::new();
        for (s, counts) in STATES.iter().zip(per) {
            let mut counts: Vec<(String, i64)> =
                counts.into_iter().filter(|(_, n)| *n > 0).collect();
            counts.sort();
            by_state_type.extend(counts.into_iter().map(|(t, n)| (*s, t, n as u64)));
        }
        Ok(Stats { by_state_type })
    }

    async fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<TaskEvent>> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = ::redis::cmd("LRANGE")
            .arg(self.key(&["ev", task_id]))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(store)?;
        let mut out = Vec::new();
        for s in &raw {
            let e = event_from(s)?;
            if e.id > after {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn timings(&self, id: &str) -> Result<Option<Json>> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = ::redis::cmd("HGETALL")
            .arg(self.key(&["timings", id]))
            .query_async(&mut conn)
            .await
            .map_err(store)?;
        if h.is_empty() {
            return Ok(None);
        }
        let mut m = serde_json::Map::new();
        for (k, v) in h {
            let v = serde_json::from_str(&v)
                .map_err(|e| QueueError::Corrupt(format!("timing {k}: {e}")))?;
            m.insert(k, v);
        }
        Ok(Some(Json::Object(m)))
    }

    async fn merge_timings(&self, id: &str, timings: &Map<String, Json>) -> Result<()> {
        if timings.is_empty() {
            return Ok(());
        }
        let mut cmd = ::redis::cmd("HSET");
        cmd.arg(self.key(&["timings", id]));
        for (k, v) in timings {
            cmd.arg(k).arg(v.to_string());
        }
        let mut conn = self.conn.clone();
        let _: i64 = cmd.query_async(&mut conn).await.map_err(store)?;
        Ok(())
    }

    async fn record_worker_timings(&self, l: Lease<'_>, timings: &Stages) -> Result<bool> {
        let Lease { lease, holder } = l;
        let data = serde_json::json!(timings).to_string();
        let holder = holder.unwrap_or_default().to_owned();
        let mut r = self
            .run("worker_timings", vec![lease.to_owned(), data, holder])
            .await?;
        Ok(int(&r.next().ok_or_else(|| corrupt("worker_timings"))?)? == 1)
    }

    async fn identity(&self, worker_id: &str) -> Result<Option<String>> {
        let mut conn = self.conn.clone();
        ::redis::cmd("HGET")
            .arg(self.key(&["workers"]))
            .arg(worker_id)
            .query_async(&mut conn)
            .await
            .map_err(store)
    }

    async fn set_identity(&self, worker_id: &str, secret_sha256: &str, _now: u64) -> Result<bool> {
        let mut conn = self.conn.clone();
        ::redis::cmd("HSETNX")
            .arg(self.key(&["workers"]))
            .arg(worker_id)
            .arg(secret_sha256)
            .query_async(&mut conn)
            .await
            .map_err(store)
    }

    async fn forget_identity(&self, worker_id: &str) -> Result<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = ::redis::cmd("HDEL")
            .arg(self.key(&["workers"]))
            .arg(worker_id)
            .query_async(&mut conn)
            .await
            .map_err(store)?;
        Ok(n == 1)
    }

    async fn ping(&self) -> Result<()> {
        self.ping_now().await
    }

    fn take_events(&self) -> Vec<TaskEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn notifications(&self) -> Option<Notifications> {
        let reader = NotifyReader {
            client: self.client.clone(),
            stream: self.key(&["notify"]),
            readers: self.key(&["readers"]),
            presence: self.key(&["reader", &self.origin]),
            renewed: None,
            origin: self.origin.clone(),
            block: self.opts.block,
            conn: None,
            last: None,
            pending: VecDeque::new(),
            failures: 0,
        };
        Some(Box::pin(futures_util::stream::unfold(
            reader,
            |mut r| async move {
                let n = r.next().await;
                Some((n, r))
            },
        )))
    }
}
