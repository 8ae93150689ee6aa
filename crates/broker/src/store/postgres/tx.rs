//! The PostgreSQL store's writes: each call is one transaction that locks the rows it is
//! about, asks [`crate::lifecycle`] what becomes of them and persists the answer.

use deadpool_postgres::Transaction;
use kiln_protocol::TaskState;
use serde_json::{Value, json};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{MAX_PAYLOAD, OTHERS_LISTEN, PostgresQueue, i};
use crate::lifecycle::{self, AttemptChange, Ending, TaskEvent, TaskEventKind, Transition};
use crate::model::*;
use crate::queue::Sweep;
use crate::store::{Lease, Result, Want, cols, corrupt, holds, json_text, new_id, task_from_row};

/// One write transaction: the events it wrote, whether tasks became ready, and whether
/// another instance listens (`None`: not looked yet).
pub(super) struct Tx<'a> {
    tx: Transaction<'a>,
    q: &'a PostgresQueue,
    events: Vec<TaskEvent>,
    ready: bool,
    others: Option<bool>,
}

/// Every changeable column of a task, as a transition leaves it.
const PERSIST: &str = "UPDATE {s}.tasks SET state = $2, attempt = $3, lease = $4, worker_id = $5,
    lease_expires_at = $6, not_before = $7, cancel_requested = $8, output = $9, error = $10,
    progress = $11, dead_lettered = $12, started_at = $13, completed_at = $14, deadline = $15,
    max_attempts = $16 WHERE id = $1";

/// Events of several tasks in one statement; ids are handed out in the order given.
const EVENTS: &str = "INSERT INTO {s}.events (task_id, kind, data, ts)
    SELECT t, k, d, $4 FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS x(t, k, d, o)
    ORDER BY o RETURNING id";

/// `enqueue` as one statement: the task (unless its `request_id` is taken), its event, and
/// the announcement while another instance listens (`$14` channel, `$15` instance, `$16`
/// and `$17` as in [`OTHERS_LISTEN`]; `$18`, `$19` the webhook and its events). No row: the `request_id` names a stored task.
const ENQUEUE: &str = "WITH ins AS (
    INSERT INTO {s}.tasks (id, request_id, task_type, state, priority, input, metadata, max_attempts, deadline, created_at, model, labels, webhook, webhook_events)
    VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8, $9, $10, $11, $18, $19)
    ON CONFLICT (request_id) DO NOTHING RETURNING id, seq),
  ev AS (INSERT INTO {s}.events (task_id, kind, data, ts) SELECT id, $12, $13, $9 FROM ins RETURNING id),
  note AS (SELECT pg_notify($14, json_build_object('src', $15::text, 'ready', true, 'ids', json_build_array(ev.id))::text)
    FROM ev WHERE EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = $16 AND pid <> $17))
  SELECT ins.seq, ev.id, (SELECT count(*) FROM note) FROM ins, ev";

impl<'a> Tx<'a> {
    pub(super) async fn begin(
        q: &'a PostgresQueue,
        c: &'a mut deadpool_postgres::Client,
    ) -> Result<Tx<'a>> {
        Ok(Tx {
            tx: c.transaction().await?,
            q,
            events: Vec::new(),
            ready: false,
            others: None,
        })
    }

    /// The store this transaction writes to.
    pub(super) fn queue(&self) -> &PostgresQueue {
        self.q
    }

    pub(super) async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        let stmt = self.tx.prepare_cached(&self.q.sql(sql)).await?;
        Ok(self.tx.query(&stmt, params).await?)
    }

    pub(super) async fn exec(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let stmt = self.tx.prepare_cached(&self.q.sql(sql)).await?;
        Ok(self.tx.execute(&stmt, params).await?)
    }

    /// The tasks `SELECT {cols} FROM tasks WHERE {filter}` finds (locked with `FOR UPDATE`
    /// when `filter` says so).
    pub(super) async fn tasks(
        &self,
        filter: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Task>> {
        let sql = format!("SELECT {} FROM {{s}}.tasks WHERE {filter}", cols());
        self.rows(&sql, params)
            .await?
            .iter()
            .map(task_from_row)
            .collect()
    }

    /// Whether another instance listens (looked up once per transaction).
    async fn others_listen(&self) -> Result<bool> {
        if let Some(known) = self.others {
            return Ok(known);
        }
        let rows = self
            .rows(
                &format!("SELECT {OTHERS_LISTEN}"),
                &[&self.q.listener_name, &self.q.own_listener()],
            )
            .await?;
        Ok(rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(true))
    }

    /// Inserts `events` (task id, kind) in one statement. Returns their ids, in order.
    async fn insert_events(&self, events: &[(&str, &TaskEventKind)], now: u64) -> Result<Vec<i64>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = events.iter().map(|e| e.0).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e.1.name()).collect();
        let data: Vec<String> = events.iter().map(|e| e.1.data().to_string()).collect();
        let rows = self.rows(EVENTS, &[&ids, &kinds, &data, &i(now)]).await?;
        let mut out = rows
            .iter()
            .map(|r| Ok(r.try_get::<_, i64>(0)?))
            .collect::<Result<Vec<_>>>()?;
        if out.len() != events.len() {
            return Err(corrupt("event ids missing"));
        }
        out.sort_unstable();
        Ok(out)
    }

    fn record(&mut self, events: &[(&str, &TaskEventKind)], ids: Vec<i64>, now: u64) {
        self.events.extend(
            events
                .iter()
                .zip(ids)
                .map(|((task_id, kind), id)| TaskEvent {
                    id,
                    task_id: (*task_id).to_owned(),
                    kind: (*kind).clone(),
                    ts: now,
                }),
        );
    }

    /// Marks that tasks became ready to run (announced at commit).
    pub(super) fn set_ready(&mut self) {
        self.ready = true;
    }

    /// Appends events that come with no transition (progress).
    pub(super) async fn append(
        &mut self,
        events: &[(&str, &TaskEventKind)],
        now: u64,
    ) -> Result<()> {
        let ids = self.insert_events(events, now).await?;
        self.record(events, ids, now);
        Ok(())
    }

    /// The row and attempt record `tr` leaves for `task`, both statements sent at once.
    async fn write_task(&self, task: &Task, tr: &Transition) -> Result<()> {
        let f = &tr.fields;
        let row = async {
            self.exec(
                PERSIST,
                &[
                    &task.id,
                    &tr.state.as_str(),
                    &(f.attempt as i32),
                    &f.lease,
                    &f.worker_id,
                    &f.lease_expires_at.map(i),
                    &i(f.not_before),
                    &f.cancel_requested,
                    &json_text(f.output.as_ref()),
                    &json_text(f.error.as_ref()),
                    &json_text(f.progress.as_ref()),
                    &f.dead_lettered,
                    &f.started_at.map(i),
                    &f.completed_at.map(i),
                    &f.deadline.map(i),
                    &(f.max_attempts as i32),
                ],
            )
            .await
        };
        let attempt = async {
            match &tr.attempt {
                Some(AttemptChange::Start {
                    attempt: n,
                    worker_id: w,
                    lease: l,
                    started_at: at,
                }) => {
                    self.exec(
                        "INSERT INTO {s}.attempts (task_id, attempt, worker_id, lease, started_at) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (task_id, attempt) DO UPDATE SET worker_id = $3, lease = $4, started_at = $5, ended_at = NULL, error = NULL",
                        &[&task.id, &(*n as i32), w, l, &i(*at)],
                    )
                    .await
                }
                Some(AttemptChange::End {
                    attempt,
                    ended_at,
                    error,
                }) => {
                    self.exec(
                        "UPDATE {s}.attempts SET ended_at = $3, error = $4 WHERE task_id = $1 AND attempt = $2",
                        &[&task.id, &(*attempt as i32), &i(*ended_at), error],
                    )
                    .await
                }
                None => Ok(0),
            }
        };
        futures_util::future::try_join(row, attempt).await?;
        Ok(())
    }

    /// Writes each transition for its task: rows, attempt records and events, every
    /// statement sent in one burst (pipelined) with the look for listeners. Returns the
    /// tasks after them.
    async fn persist_all(&mut self, items: &[(&Task, &Transition)], now: u64) -> Result<Vec<Task>> {
        let events: Vec<(&str, &TaskEventKind)> = items
            .iter()
            .flat_map(|&(t, tr)| tr.events.iter().map(move |e| (t.id.as_str(), e)))
            .collect();
        let (_, ids, others) = {
            let this = &*self;
            let rows = futures_util::future::try_join_all(
                items.iter().map(|&(t, tr)| this.write_task(t, tr)),
            );
            let look = async {
                if events.is_empty() && !items.iter().any(|&(t, tr)| readies(t, tr)) {
                    return Ok(this.others);
                }
                this.others_listen().await.map(Some)
            };
            futures_util::future::try_join3(rows, this.insert_events(&events, now), look).await?
        };
        self.others = others;
        self.record(&events, ids, now);
        self.ready |= items.iter().any(|&(t, tr)| readies(t, tr));
        let after: Vec<Task> = items.iter().map(|&(t, tr)| tr.apply(t)).collect();
        for (t, &(_, tr)) in after.iter().zip(items) {
            self.write_messages(t, &tr.events, now).await?;
        }
        Ok(after)
    }

    /// [`Tx::persist_all`] for one task.
    pub(super) async fn persist(&mut self, task: &Task, tr: &Transition, now: u64) -> Result<Task> {
        let items = [(task, tr)];
        let mut after = self.persist_all(&items, now).await?;
        after.pop().ok_or_else(|| corrupt("persist"))
    }

    /// Announces the changes to other instances (delivered at commit) when another instance
    /// listens, commits, and hands the events to the local broadcast.
    pub(super) async fn commit(self) -> Result<()> {
        if (!self.events.is_empty() || self.ready) && self.others_listen().await? {
            let mut payload =
                json!({"src": self.q.instance, "ready": self.ready, "events": self.events})
                    .to_string();
            if payload.len() > MAX_PAYLOAD {
                let ids: Vec<i64> = self.events.iter().map(|e| e.id).collect();
                payload =
                    json!({"src": self.q.instance, "ready": self.ready, "ids": ids}).to_string();
            }
            let stmt = self.tx.prepare_cached("SELECT pg_notify($1, $2)").await?;
            self.tx.execute(&stmt, &[&self.q.channel, &payload]).await?;
        }
        self.tx.commit().await?;
        if !self.events.is_empty() {
            self.q
                .events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(self.events);
        }
        Ok(())
    }

    /// The running task holding `lease` (locked), if `holder` (any when `None`) holds it.
    async fn running(&self, lease: &str, holder: Option<&str>) -> Result<Option<Task>> {
        Ok(self
            .tasks("lease = $1 AND state = 'running' FOR UPDATE", &[&lease])
            .await?
            .pop()
            .filter(|t| holds(t, holder)))
    }
}

/// Whether `tr` makes `task` ready to run (queued again).
fn readies(task: &Task, tr: &Transition) -> bool {
    tr.state == TaskState::Queued && task.state != TaskState::Queued
}

impl PostgresQueue {
    pub(super) async fn enqueue_(&self, t: NewTask, now: u64) -> Result<(Task, bool)> {
        let a = lifecycle::admit(t, &self.opts)?;
        let t = &a.task;
        let c = self.pool.get().await?;
        let stmt = c.prepare_cached(&self.sql(ENQUEUE)).await?;
        let id = new_id("task");
        // One statement, so one round trip and one commit: the row, its event and (while
        // another instance listens) the announcement, which carries the event's id.
        let inserted = c
            .query(
                &stmt,
                &[
                    &id,
                    &t.request_id,
                    &t.task_type,
                    &t.priority,
                    &t.input.to_string(),
                    &json_text(t.metadata.as_ref()),
                    &(a.max_attempts as i32),
                    &t.deadline.map(i),
                    &i(now),
                    &t.model,
                    &t.labels,
                    &a.event.name(),
                    &a.event.data().to_string(),
                    &self.channel,
                    &self.instance,
                    &self.listener_name,
                    &self.own_listener(),
                    &t.webhook,
                    &t.webhook_events,
                ],
            )
            .await?;
        let Some(row) = inserted.first() else {
            // The request_id names a stored task (committed by us or another instance).
            let existing = c
                .query(
                    &c.prepare_cached(&self.sql(&format!(
                        "SELECT {} FROM {{s}}.tasks WHERE request_id = $1",
                        cols()
                    )))
                    .await?,
                    &[&t.request_id],
                )
                .await?
                .first()
                .map(task_from_row)
                .transpose()?
                .ok_or_else(|| corrupt("request_id conflict without a task"))?;
            if !lifecycle::same_request(&existing, t) {
                return Err(QueueError::Conflict(
                    t.request_id.clone().unwrap_or_default(),
                ));
            }
            return Ok((existing, false));
        };
        let task = lifecycle::new_task(&a, id, row.try_get(0)?, now);
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(TaskEvent {
                id: row.try_get(1)?,
                task_id: task.id.clone(),
                kind: a.event.clone(),
                ts: now,
            });
        Ok((task, true))
    }

    pub(super) async fn reserve_(&self, want: Want<'_>, now: u64) -> Result<Vec<Task>> {
        let Want {
            worker_id,
            caps,
            n,
            lease_until,
        } = want;
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        // SKIP LOCKED: concurrent instances never claim one task twice nor wait on each other.
        let found = tx
            .tasks(
                "state = 'queued' AND not_before <= $2 AND task_type = ANY($3)
                 AND (model IS NULL OR model = ANY($5)) AND labels <@ $6
                 AND NOT EXISTS (SELECT 1 FROM {s}.avoid a WHERE a.task_id = {s}.tasks.id
                   AND a.worker_id = $1 AND a.until > $2)
                 ORDER BY priority DESC, seq LIMIT $4 FOR UPDATE SKIP LOCKED",
                &[
                    &worker_id,
                    &i(now),
                    &caps.task_types,
                    &(n as i64),
                    &caps.models,
                    &caps.labels,
                ],
            )
            .await?;
        let claims: Vec<Transition> = found
            .iter()
            .map(|t| lifecycle::claim(t, worker_id, &new_id("lease"), lease_until, now))
            .collect();
        let items: Vec<(&Task, &Transition)> = found.iter().zip(&claims).collect();
        let out = tx.persist_all(&items, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn progress_(
        &self,
        l: Lease<'_>,
        p: Value,
        now: u64,
    ) -> Result<Option<String>> {
        let (Lease { lease, holder }, progress) = (l, p);
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        let Some(t) = tx.running(lease, holder).await? else {
            return Ok(None);
        };
        let tr = lifecycle::progress(&t, progress);
        tx.exec(
            "UPDATE {s}.tasks SET progress = $2 WHERE id = $1",
            &[&t.id, &json_text(tr.fields.progress.as_ref())],
        )
        .await?;
        let events: Vec<(&str, &TaskEventKind)> =
            tr.events.iter().map(|e| (t.id.as_str(), e)).collect();
        tx.append(&events, now).await?;
        tx.write_messages(&tr.apply(&t), &tr.events, now).await?;
        tx.commit().await?;
        Ok(Some(t.id))
    }

    pub(super) async fn end_attempt(
        &self,
        l: Lease<'_>,
        e: Ending,
        now: u64,
    ) -> Result<CompleteOutcome> {
        let (Lease { lease, holder }, ending) = (l, e);
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        let task = tx.tasks("lease = $1 FOR UPDATE", &[&lease]).await?.pop();
        let known = task.is_some()
            || !tx
                .rows("SELECT 1 FROM {s}.attempts WHERE lease = $1", &[&lease])
                .await?
                .is_empty();
        let task = match lifecycle::check_lease(task.as_ref(), lease, holder, known) {
            Ok(task) => task,
            Err(refused) => return Ok(*refused),
        };
        let tr = lifecycle::finish(task, ending, &self.opts, now);
        let after = tx.persist(task, &tr, now).await?;
        tx.commit().await?;
        Ok(CompleteOutcome {
            accepted: true,
            reason: None,
            task: Some(after),
        })
    }

    /// Gives a lease back: queued again at once, the attempt not counted (`release`, and a
    /// retryable `reject`, whose worker then skips the task until `avoid_until`).
    pub(super) async fn give_back_(
        &self,
        l: Lease<'_>,
        why: &str,
        avoid_until: Option<u64>,
        now: u64,
    ) -> Result<Option<Task>> {
        let Lease { lease, holder } = l;
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        let Some(task) = tx.running(lease, holder).await? else {
            return Ok(None);
        };
        if let (Some(until), Some(w)) = (avoid_until, &task.worker_id) {
            tx.exec("DELETE FROM {s}.avoid WHERE until <= $1", &[&i(now)])
                .await?;
            tx.exec(
                "INSERT INTO {s}.avoid (task_id, worker_id, until) VALUES ($1, $2, $3)
                 ON CONFLICT (task_id, worker_id) DO UPDATE SET until = $3",
                &[&task.id, w, &i(until)],
            )
            .await?;
        }
        let after = tx
            .persist(&task, &lifecycle::release(&task, why, now), now)
            .await?;
        tx.commit().await?;
        Ok(Some(after))
    }

    pub(super) async fn release_worker_(
        &self,
        worker_id: &str,
        keep: &[String],
        now: u64,
    ) -> Result<Vec<Task>> {
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        let held = tx
            .tasks(
                "state = 'running' AND worker_id = $1 ORDER BY seq FOR UPDATE",
                &[&worker_id],
            )
            .await?;
        let held: Vec<Task> = held
            .into_iter()
            .filter(|t| !t.lease.as_ref().is_some_and(|l| keep.contains(l)))
            .collect();
        let trs: Vec<Transition> = held
            .iter()
            .map(|t| lifecycle::requeue(t, lifecycle::WORKER_RESTARTED, true, now))
            .collect();
        let items: Vec<(&Task, &Transition)> = held.iter().zip(&trs).collect();
        let out = tx.persist_all(&items, now).await?;
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn sweep_(&self, now: u64) -> Result<Sweep> {
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        // SKIP LOCKED: instances sweeping at once split the work instead of queueing on it.
        let lapsed = tx
            .tasks(
                "state = 'running' AND lease_expires_at < $1 ORDER BY seq FOR UPDATE SKIP LOCKED",
                &[&i(now)],
            )
            .await?;
        let mut changed = Vec::new();
        for t in lapsed {
            changed.push(tx.persist(&t, &lifecycle::lapse(&t, now), now).await?);
        }
        let expired = tx
            .tasks(
                "state IN ('queued', 'running') AND deadline IS NOT NULL AND deadline < $1
                 ORDER BY seq FOR UPDATE SKIP LOCKED",
                &[&i(now)],
            )
            .await?;
        let mut stop = Vec::new();
        for t in expired {
            if let (Some(w), Some(l), TaskState::Running) = (&t.worker_id, &t.lease, t.state) {
                stop.push((w.clone(), l.clone()));
            }
            changed.push(tx.persist(&t, &lifecycle::expire(&t, now), now).await?);
        }
        tx.commit().await?;
        Ok(Sweep { changed, stop })
    }

    pub(super) async fn cancel_(&self, id: &str, now: u64) -> Result<CancelOutcome> {
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        let Some(task) = tx.tasks("id = $1 FOR UPDATE", &[&id]).await?.pop() else {
            return Ok(CancelOutcome::NotFound);
        };
        let Some(tr) = lifecycle::cancel(&task, now) else {
            return Ok(CancelOutcome::AlreadyTerminal(task));
        };
        let after = tx.persist(&task, &tr, now).await?;
        tx.commit().await?;
        Ok(crate::store::cancel_outcome(after))
    }
}
