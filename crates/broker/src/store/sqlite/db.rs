//! The SQLite store's calls, run on the thread that owns the connection: each finds the
//! rows it is about and persists the transitions [`crate::lifecycle`] decides for them.

use std::cell::RefCell;

use kiln_protocol::TaskState;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Value, json};

use crate::lifecycle::{self, AttemptChange, Ending, TaskEvent, TaskEventKind, Transition};
use crate::model::*;
use crate::queue::*;
use crate::store::{
    Columns, Dialect, Result, Want, cols, event_from_row, holds, json_text, new_id, parse_json,
    task_from_row,
};

/// One call's transaction: a savepoint, so that it is a transaction of its own when run
/// alone and nests inside the writer's group commit when several calls are batched. Dropped
/// without [`Tx::commit`], it rolls back only this call's writes.
pub(super) struct Tx<'c> {
    conn: &'c Connection,
    open: bool,
}

pub(super) fn begin(conn: &Connection) -> Result<Tx<'_>> {
    conn.prepare_cached("SAVEPOINT kiln_call")?.execute([])?;
    Ok(Tx { conn, open: true })
}

impl Tx<'_> {
    pub(super) fn commit(mut self) -> Result<()> {
        self.open = false;
        self.conn.prepare_cached("RELEASE kiln_call")?.execute([])?;
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self
                .conn
                .execute_batch("ROLLBACK TO kiln_call; RELEASE kiln_call");
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// Statements through the connection's prepared-statement cache: the queue runs the same
/// few dozen statements over and over, and parsing them is a large share of a call.
pub(super) trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>;
    /// The tasks `SELECT {cols} FROM tasks WHERE {filter}` finds.
    fn tasks<P: rusqlite::Params>(&self, filter: &str, params: P) -> Result<Vec<Task>>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }

    fn tasks<P: rusqlite::Params>(&self, filter: &str, params: P) -> Result<Vec<Task>> {
        let sql = format!("SELECT {} FROM tasks WHERE {filter}", cols());
        let mut stmt = self.prepare_cached(&sql)?;
        let rows = stmt
            .query_map(params, |r| Ok(task_from_row(r)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().collect()
    }
}

impl Columns for Row<'_> {
    fn text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.get::<_, Option<i64>>(i)?.unwrap_or(0) != 0)
    }
    fn list(&self, i: usize) -> Result<Vec<String>> {
        Ok(parse_json(self.get(i)?)?
            .map(serde_json::from_value)
            .transpose()
            .map_err(crate::store::corrupt)?
            .unwrap_or_default())
    }
}

/// Brings a database made by an earlier release up to the current columns.
pub(super) fn add_missing_columns(c: &Connection) -> Result<()> {
    let have: Vec<String> = {
        let mut stmt = c.prepare("SELECT name FROM pragma_table_info('tasks')")?;
        stmt.query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (name, ty) in crate::store::schema::added_columns(Dialect::Sqlite) {
        if !have.iter().any(|h| h == name) {
            c.execute_batch(&format!("ALTER TABLE tasks ADD COLUMN {name} {ty}"))?;
        }
    }
    Ok(())
}

pub(super) fn get_task(c: &Connection, id: &str) -> Result<Option<Task>> {
    Ok(c.tasks("id = ?1", [id])?.pop())
}

/// A fresh id shaped like [`new_id`]'s (`prefix` + `_` + 32 hex digits) whose first 12
/// digits are `now` (Unix ms): ids made later sort later, so the unique indexes on task ids
/// and leases (and the event and attempt keys that start with a task id) grow at their end
/// instead of touching a random page with every insert. The other 20 digits are random.
fn ordered_id(prefix: &str, now: u64) -> String {
    let random = new_id(prefix);
    let tail = random.len().saturating_sub(20);
    format!(
        "{prefix}_{:012x}{}",
        now & 0xffff_ffff_ffff,
        &random[tail..]
    )
}

/// The task running under lease `?1`, held by worker `?2` (any worker when NULL).
const RUNNING_LEASE: &str = "SELECT id FROM tasks WHERE lease = ?1 AND state = 'running' \
    AND (?2 IS NULL OR worker_id = ?2)";

/// Every changeable column of a task, as a transition leaves it.
const PERSIST: &str = "UPDATE tasks SET state = ?2, attempt = ?3, lease = ?4, worker_id = ?5,
    lease_expires_at = ?6, not_before = ?7, cancel_requested = ?8, output = ?9, error = ?10,
    progress = ?11, dead_lettered = ?12, started_at = ?13, completed_at = ?14, deadline = ?15,
    max_attempts = ?16 WHERE id = ?1";

fn merge_timings_in(
    c: &Connection,
    id: &str,
    timings: &serde_json::Map<String, Value>,
) -> Result<()> {
    let raw: Option<String> = c
        .row("SELECT data FROM timings WHERE task_id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    let mut all = match parse_json(raw)? {
        Some(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    for (k, v) in timings {
        all.insert(k.clone(), v.clone());
    }
    c.exec(
        "INSERT INTO timings (task_id, data) VALUES (?1, ?2)
         ON CONFLICT (task_id) DO UPDATE SET data = excluded.data",
        params![id, Value::Object(all).to_string()],
    )?;
    Ok(())
}

/// The connection and what a call collected; lives on the executing thread.
pub(super) struct Db {
    pub(super) conn: Connection,
    pub(super) opts: QueueOptions,
    /// Events written by the running call, published when it succeeds.
    pub(super) events: RefCell<Vec<TaskEvent>>,
}

impl Db {
    fn event(&self, c: &Connection, task_id: &str, kind: &TaskEventKind, now: u64) -> Result<()> {
        c.exec(
            "INSERT INTO events (task_id, kind, data, ts) VALUES (?1, ?2, ?3, ?4)",
            params![task_id, kind.name(), kind.data().to_string(), now],
        )?;
        self.events.borrow_mut().push(TaskEvent {
            id: c.last_insert_rowid(),
            task_id: task_id.to_owned(),
            kind: kind.clone(),
            ts: now,
        });
        Ok(())
    }

    /// Writes `tr` for `task`: its row, its attempt record and its events. Returns the task
    /// after it.
    pub(super) fn persist(
        &self,
        c: &Connection,
        task: &Task,
        tr: &Transition,
        now: u64,
    ) -> Result<Task> {
        let f = &tr.fields;
        c.exec(
            PERSIST,
            params![
                task.id,
                tr.state.as_str(),
                f.attempt,
                f.lease,
                f.worker_id,
                f.lease_expires_at,
                f.not_before,
                f.cancel_requested,
                json_text(f.output.as_ref()),
                json_text(f.error.as_ref()),
                json_text(f.progress.as_ref()),
                f.dead_lettered,
                f.started_at,
                f.completed_at,
                f.deadline,
                f.max_attempts
            ],
        )?;
        match &tr.attempt {
            Some(AttemptChange::Start {
                attempt,
                worker_id,
                lease,
                started_at,
            }) => {
                c.exec(
                    "INSERT OR REPLACE INTO attempts (task_id, attempt, worker_id, lease, started_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![task.id, attempt, worker_id, lease, started_at],
                )?;
            }
            Some(AttemptChange::End {
                attempt,
                ended_at,
                error,
            }) => {
                c.exec(
                    "UPDATE attempts SET ended_at = ?3, error = ?4 WHERE task_id = ?1 AND attempt = ?2",
                    params![task.id, attempt, ended_at, error],
                )?;
            }
            None => {}
        }
        for e in &tr.events {
            self.event(c, &task.id, e, now)?;
        }
        let after = tr.apply(task);
        self.write_messages(c, &after, &tr.events, now)?;
        Ok(after)
    }

    /// Stores a task, or returns the task already stored under its `request_id` (with
    /// `false`). A `request_id` reused for a different type, input or routing is a conflict.
    pub(super) fn enqueue(&self, t: NewTask, now: u64) -> Result<(Task, bool)> {
        let tx = begin(&self.conn)?;
        let out = self.insert(&tx, t, now)?;
        tx.commit()?;
        Ok(out)
    }

    /// [`Db::enqueue`] for each task, in one transaction: a failure stores none of them.
    pub(super) fn enqueue_many(&self, tasks: Vec<NewTask>, now: u64) -> Result<Vec<(Task, bool)>> {
        let tx = begin(&self.conn)?;
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(self.insert(&tx, t, now)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Inserts one task inside the caller's transaction (or finds it by `request_id`).
    fn insert(&self, c: &Connection, t: NewTask, now: u64) -> Result<(Task, bool)> {
        let a = lifecycle::admit(t, &self.opts)?;
        let t = &a.task;
        if let Some(rid) = &t.request_id
            && let Some(task) = c.tasks("request_id = ?1", [rid])?.pop()
        {
            if !lifecycle::same_request(&task, t) {
                return Err(QueueError::Conflict(rid.clone()));
            }
            return Ok((task, false));
        }
        let id = ordered_id("task", now);
        c.exec(
            "INSERT INTO tasks (id, request_id, task_type, state, priority, input, metadata, max_attempts, deadline, created_at, model, labels, webhook, webhook_events)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                id,
                t.request_id,
                t.task_type,
                t.priority,
                t.input.to_string(),
                json_text(t.metadata.as_ref()),
                a.max_attempts,
                t.deadline,
                now,
                t.model,
                (!t.labels.is_empty()).then(|| json!(t.labels).to_string()),
                t.webhook,
                (!t.webhook_events.is_empty()).then(|| json!(t.webhook_events).to_string())
            ],
        )?;
        let task = lifecycle::new_task(&a, id, c.last_insert_rowid(), now);
        self.event(c, &task.id, &a.event, now)?;
        Ok((task, true))
    }

    /// Leases up to `n` queued tasks that `caps` fit to `worker_id`, highest priority
    /// then oldest first, each with a new lease id, until `lease_until`. The ready index
    /// (type, priority, seq) orders the scan; model and labels are checked per row, the
    /// worker's lists passed as JSON arrays.
    pub(super) fn reserve(&self, want: Want<'_>, now: u64) -> Result<Vec<Task>> {
        let Want {
            worker_id,
            caps,
            n,
            lease_until,
        } = want;
        let task_types = &caps.task_types;
        let tx = begin(&self.conn)?;
        let marks = vec!["?"; task_types.len()].join(",");
        let filter = format!(
            "state = 'queued' AND not_before <= ? AND task_type IN ({marks})
             AND (model IS NULL OR model IN (SELECT value FROM json_each(?)))
             AND (labels IS NULL OR NOT EXISTS (SELECT 1 FROM json_each(tasks.labels) AS need
                  WHERE need.value NOT IN (SELECT value FROM json_each(?))))
             AND NOT EXISTS (SELECT 1 FROM avoid WHERE avoid.task_id = tasks.id
                  AND avoid.worker_id = ? AND avoid.until > ?)
             ORDER BY priority DESC, seq LIMIT ?"
        );
        let mut args: Vec<rusqlite::types::Value> = vec![(now as i64).into()];
        args.extend(task_types.iter().map(|t| t.clone().into()));
        args.push(json!(caps.models).to_string().into());
        args.push(json!(caps.labels).to_string().into());
        args.push(worker_id.to_owned().into());
        args.push((now as i64).into());
        args.push((n as i64).into());
        let found = tx.tasks(&filter, rusqlite::params_from_iter(args))?;
        let mut out = Vec::with_capacity(found.len());
        for t in found {
            let tr = lifecycle::claim(&t, worker_id, &ordered_id("lease", now), lease_until, now);
            out.push(self.persist(&tx, &t, &tr, now)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Extends every lease `worker_id` holds to `until`. Returns how many.
    pub(super) fn renew(&self, worker_id: &str, until: u64) -> Result<usize> {
        Ok(self.conn.exec(
            "UPDATE tasks SET lease_expires_at = ?2 WHERE state = 'running' AND worker_id = ?1 AND lease_expires_at < ?2",
            params![worker_id, until],
        )?)
    }

    /// Counts a failed assignment of a running lease, or resets the count.
    pub(super) fn record_assignment(&self, lease: &str, delivered: bool) -> Result<Option<u32>> {
        Ok(self
            .conn
            .row(
                "UPDATE tasks SET assign_failures = CASE WHEN ?2 THEN 0 ELSE assign_failures + 1 END
                 WHERE lease = ?1 AND state = 'running' RETURNING assign_failures",
                params![lease, delivered],
                |r| r.get::<_, u32>(0),
            )
            .optional()?)
    }

    /// The leases `worker_id` holds: `(lease, task_id)`.
    pub(super) fn leases_of(&self, worker_id: &str) -> Result<Vec<(String, String)>> {
        let c = &self.conn;
        let mut stmt = c.prepare_cached(
            "SELECT lease, id FROM tasks WHERE state = 'running' AND worker_id = ?1",
        )?;
        Ok(stmt
            .query_map([worker_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }

    /// The running task holding `lease`, if `holder` (any when `None`) holds it.
    fn running(&self, c: &Connection, lease: &str, holder: Option<&str>) -> Result<Option<Task>> {
        Ok(c.tasks("lease = ?1 AND state = 'running'", [lease])?
            .pop()
            .filter(|t| holds(t, holder)))
    }

    /// Records progress of a running lease. `None` when the lease is not current (or not
    /// `holder`'s).
    pub(super) fn progress(
        &self,
        lease: &str,
        holder: Option<&str>,
        progress: Value,
        now: u64,
    ) -> Result<Option<String>> {
        let c = begin(&self.conn)?;
        let Some(t) = self.running(&c, lease, holder)? else {
            return Ok(None);
        };
        let tr = lifecycle::progress(&t, progress);
        c.exec(
            "UPDATE tasks SET progress = ?2 WHERE id = ?1",
            params![t.id, json_text(tr.fields.progress.as_ref())],
        )?;
        for e in &tr.events {
            self.event(&c, &t.id, e, now)?;
        }
        self.write_messages(&c, &tr.apply(&t), &tr.events, now)?;
        c.commit()?;
        Ok(Some(t.id))
    }

    /// Compare-and-set on the lease: the ending counts only if `lease` is the task's current
    /// lease and the task is running.
    pub(super) fn end_attempt(
        &self,
        lease: &str,
        holder: Option<&str>,
        ending: Ending,
        now: u64,
    ) -> Result<CompleteOutcome> {
        let tx = begin(&self.conn)?;
        let task = tx.tasks("lease = ?1", [lease])?.pop();
        let known = task.is_some()
            || tx
                .row("SELECT 1 FROM attempts WHERE lease = ?1", [lease], |_| {
                    Ok(())
                })
                .optional()?
                .is_some();
        let task = match lifecycle::check_lease(task.as_ref(), lease, holder, known) {
            Ok(task) => task,
            Err(refused) => return Ok(*refused),
        };
        let tr = lifecycle::finish(task, ending, &self.opts, now);
        let after = self.persist(&tx, task, &tr, now)?;
        tx.commit()?;
        Ok(CompleteOutcome {
            accepted: true,
            reason: None,
            task: Some(after),
        })
    }

    /// Gives a lease back: the task is queued again at once, and the attempt does not count
    /// (`release`, retryable `reject`). With `avoid_until` (a retryable reject), the lease's
    /// worker is not offered the task again before then.
    pub(super) fn give_back(
        &self,
        lease: &str,
        holder: Option<&str>,
        why: &str,
        avoid_until: Option<u64>,
        now: u64,
    ) -> Result<Option<Task>> {
        let tx = begin(&self.conn)?;
        let Some(task) = self.running(&tx, lease, holder)? else {
            return Ok(None);
        };
        if let (Some(until), Some(w)) = (avoid_until, &task.worker_id) {
            tx.exec("DELETE FROM avoid WHERE until <= ?1", params![now])?;
            tx.exec(
                "INSERT OR REPLACE INTO avoid (task_id, worker_id, until) VALUES (?1, ?2, ?3)",
                params![task.id, w, until],
            )?;
        }
        let after = self.persist(&tx, &task, &lifecycle::release(&task, why, now), now)?;
        tx.commit()?;
        Ok(Some(after))
    }

    pub(super) fn note_task_types(&self, task_types: &[String], now: u64) -> Result<()> {
        let tx = begin(&self.conn)?;
        for t in task_types {
            tx.exec(
                "INSERT INTO task_types (task_type, last_seen) VALUES (?1, ?2)
                 ON CONFLICT (task_type) DO UPDATE SET last_seen = MAX(last_seen, ?2)",
                params![t, now],
            )?;
        }
        tx.commit()
    }

    /// Releases the leases of `worker_id` not in `keep` (its process restarted): the tasks
    /// are queued again at once, and the lost attempts count (dead-lettered when none
    /// remain). Kept leases stay as they are.
    pub(super) fn release_worker(
        &self,
        worker_id: &str,
        keep: &[String],
        now: u64,
    ) -> Result<Vec<Task>> {
        let tx = begin(&self.conn)?;
        let mut out = Vec::new();
        for t in tx.tasks(
            "state = 'running' AND worker_id = ?1 ORDER BY seq",
            [worker_id],
        )? {
            if t.lease.as_ref().is_some_and(|l| keep.contains(l)) {
                continue;
            }
            let tr = lifecycle::requeue(&t, lifecycle::WORKER_RESTARTED, true, now);
            out.push(self.persist(&tx, &t, &tr, now)?);
        }
        tx.commit()?;
        Ok(out)
    }

    /// Handles lapsed leases (queued again, or ended) and passed deadlines (expired).
    /// Returns tasks that changed, and the `(worker, lease)` pairs of expired running tasks
    /// whose workers should be told to stop.
    pub(super) fn sweep(&self, now: u64) -> Result<Sweep> {
        let tx = begin(&self.conn)?;
        let mut changed = Vec::new();
        for t in tx.tasks(
            "state = 'running' AND lease_expires_at < ?1 ORDER BY seq",
            [now],
        )? {
            changed.push(self.persist(&tx, &t, &lifecycle::lapse(&t, now), now)?);
        }
        let mut stop = Vec::new();
        let filter = "state IN ('queued', 'running') AND deadline IS NOT NULL AND deadline < ?1 ORDER BY seq";
        for t in tx.tasks(filter, [now])? {
            if let (Some(w), Some(l), TaskState::Running) = (&t.worker_id, &t.lease, t.state) {
                stop.push((w.clone(), l.clone()));
            }
            changed.push(self.persist(&tx, &t, &lifecycle::expire(&t, now), now)?);
        }
        tx.commit()?;
        Ok(Sweep { changed, stop })
    }

    /// Cancels a task: queued ones at once; running ones are marked and their worker must
    /// be told.
    pub(super) fn cancel(&self, id: &str, now: u64) -> Result<CancelOutcome> {
        let tx = begin(&self.conn)?;
        let Some(task) = get_task(&tx, id)? else {
            return Ok(CancelOutcome::NotFound);
        };
        let Some(tr) = lifecycle::cancel(&task, now) else {
            return Ok(CancelOutcome::AlreadyTerminal(task));
        };
        let after = self.persist(&tx, &task, &tr, now)?;
        tx.commit()?;
        Ok(crate::store::cancel_outcome(after))
    }

    /// A task by id.
    pub(super) fn get(&self, id: &str) -> Result<Option<Task>> {
        get_task(&self.conn, id)
    }

    /// The attempts of a task, in order.
    pub(super) fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>> {
        let c = &self.conn;
        let mut stmt = c.prepare_cached(
            "SELECT attempt, worker_id, lease, started_at, ended_at, error FROM attempts WHERE task_id = ?1 ORDER BY attempt",
        )?;
        Ok(stmt
            .query_map([id], |r| {
                Ok(AttemptRecord {
                    attempt: r.get(0)?,
                    worker_id: r.get(1)?,
                    lease: r.get(2)?,
                    started_at: r.get(3)?,
                    ended_at: r.get(4)?,
                    error: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?)
    }

    pub(super) fn timings(&self, id: &str) -> Result<Option<Value>> {
        let raw: Option<String> = self
            .conn
            .row("SELECT data FROM timings WHERE task_id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        parse_json(raw)
    }

    pub(super) fn merge_timings(
        &self,
        id: &str,
        timings: &serde_json::Map<String, Value>,
    ) -> Result<()> {
        let tx = begin(&self.conn)?;
        merge_timings_in(&tx, id, timings)?;
        tx.commit()?;
        Ok(())
    }

    pub(super) fn record_worker_timings(
        &self,
        lease: &str,
        holder: Option<&str>,
        timings: &std::collections::BTreeMap<String, u64>,
    ) -> Result<bool> {
        let tx = begin(&self.conn)?;
        let id: Option<String> = tx
            .row(RUNNING_LEASE, params![lease, holder], |r| r.get(0))
            .optional()?;
        let Some(id) = id else {
            return Ok(false);
        };
        let mut m = serde_json::Map::new();
        m.insert("worker".into(), json!(timings));
        merge_timings_in(&tx, &id, &m)?;
        tx.commit()?;
        Ok(true)
    }

    /// How many queued tasks of its type and model run before this one (0: next); `None`
    /// unless queued.
    pub(super) fn queue_position(&self, task: &Task) -> Result<Option<u64>> {
        if task.state != TaskState::Queued {
            return Ok(None);
        }
        let n: i64 = self.conn.row(
            "SELECT COUNT(*) FROM tasks WHERE state = 'queued' AND task_type = ?1 AND model IS ?4
             AND (priority > ?2 OR (priority = ?2 AND seq < ?3))",
            params![task.task_type, task.priority, task.seq, task.model],
            |r| r.get(0),
        )?;
        Ok(Some(n as u64))
    }

    /// Tasks, newest first.
    pub(super) fn list(&self, f: &ListFilter) -> Result<Vec<Task>> {
        self.conn.tasks(
            "(?1 IS NULL OR state = ?1) AND (?2 IS NULL OR task_type = ?2)
             AND (?3 IS NULL OR seq < ?3) ORDER BY seq DESC LIMIT ?4",
            params![
                f.state.map(|s| s.as_str()),
                f.task_type,
                f.before_seq,
                lifecycle::list_limit(f.limit) as i64
            ],
        )
    }

    /// Counts by state and type.
    pub(super) fn stats(&self) -> Result<Stats> {
        let c = &self.conn;
        let mut stmt = c.prepare_cached(
            "SELECT state, task_type, COUNT(*) FROM tasks GROUP BY state, task_type",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Stats::from_counts(rows))
    }

    /// Events of `task_id` after event id `after`, oldest first.
    pub(super) fn events_after(&self, task_id: &str, after: i64) -> Result<Vec<TaskEvent>> {
        let c = &self.conn;
        let mut stmt = c.prepare_cached(
            "SELECT id, kind, data, ts FROM events WHERE task_id = ?1 AND id > ?2 ORDER BY id",
        )?;
        let rows = stmt
            .query_map(params![task_id, after], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, u64>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(id, kind, data, ts)| event_from_row(id, task_id.to_owned(), &kind, &data, ts))
            .collect()
    }

    pub(super) fn identity(&self, worker_id: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .row(
                "SELECT secret_sha256 FROM workers WHERE worker_id = ?1",
                [worker_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub(super) fn set_identity(&self, worker_id: &str, hash: &str, now: u64) -> Result<bool> {
        let n = self.conn.exec(
            "INSERT INTO workers (worker_id, secret_sha256, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (worker_id) DO NOTHING",
            params![worker_id, hash, now],
        )?;
        Ok(n == 1)
    }

    pub(super) fn forget_identity(&self, worker_id: &str) -> Result<bool> {
        let n = self
            .conn
            .exec("DELETE FROM workers WHERE worker_id = ?1", [worker_id])?;
        Ok(n == 1)
    }

    pub(super) fn ping(&self) -> Result<()> {
        self.conn.row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_ids_sort_by_time_and_keep_the_shape() {
        let (a, b) = (
            ordered_id("task", 1_700_000_000_000),
            ordered_id("task", 1_700_000_000_001),
        );
        assert!(a < b, "{a} {b}");
        for id in [&a, &b] {
            let hex = id.strip_prefix("task_").unwrap();
            assert_eq!(hex.len(), 32);
            assert!(hex.bytes().all(|c| c.is_ascii_hexdigit()));
        }
        assert_ne!(
            ordered_id("lease", 5),
            ordered_id("lease", 5),
            "random tails"
        );
    }
}
