//! Changes to tasks: read the task, let [`crate::lifecycle`] decide, and have the script
//! write the transition if the task is still as read (else read again and decide again).

use kiln_protocol::TaskState;

use super::RedisQueue;
use super::reply::{need_task, task_from, text};
use crate::lifecycle::{self, AttemptChange, Fields, Transition};
use crate::model::*;
use crate::store::{Lease, Result, holds, json_text};

/// How often a change is decided again when other calls keep changing its task.
const ATTEMPTS: usize = 16;

/// What became of a change.
pub(super) enum Changed {
    /// Written: the task before and after.
    Done(Box<(Task, Task)>),
    /// The rules decline to change the task as it now is.
    Declined(Box<Task>),
    /// No such task.
    Gone,
}

pub(super) fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_owned()
}

/// The fields `tr` changes, as `(name, stored value)` ('' unsets); `not_before` always when
/// the task goes back to the queue.
fn changed_fields(before: &Task, tr: &Transition) -> Vec<(&'static str, String)> {
    let (a, b) = (Fields::of(before), &tr.fields);
    let mut out = Vec::new();
    let mut put = |name, changed: bool, v: String| {
        if changed {
            out.push((name, v));
        }
    };
    put("attempt", a.attempt != b.attempt, b.attempt.to_string());
    put(
        "lease",
        a.lease != b.lease,
        b.lease.clone().unwrap_or_default(),
    );
    let worker = b.worker_id.clone().unwrap_or_default();
    put("worker_id", a.worker_id != b.worker_id, worker);
    let expires = opt(b.lease_expires_at);
    put(
        "lease_expires_at",
        a.lease_expires_at != b.lease_expires_at,
        expires,
    );
    let requeued = tr.state == TaskState::Queued && before.state != TaskState::Queued;
    put("not_before", requeued, b.not_before.to_string());
    let cancel = flag(b.cancel_requested);
    put(
        "cancel_requested",
        a.cancel_requested != b.cancel_requested,
        cancel,
    );
    let output = json_text(b.output.as_ref()).unwrap_or_default();
    put("output", a.output != b.output, output);
    put(
        "error",
        a.error != b.error,
        json_text(b.error.as_ref()).unwrap_or_default(),
    );
    let progress = json_text(b.progress.as_ref()).unwrap_or_default();
    put("progress", a.progress != b.progress, progress);
    put(
        "dead_lettered",
        a.dead_lettered != b.dead_lettered,
        flag(b.dead_lettered),
    );
    put(
        "started_at",
        a.started_at != b.started_at,
        opt(b.started_at),
    );
    put(
        "completed_at",
        a.completed_at != b.completed_at,
        opt(b.completed_at),
    );
    put("deadline", a.deadline != b.deadline, opt(b.deadline));
    let limit = b.max_attempts.to_string();
    put("max_attempts", a.max_attempts != b.max_attempts, limit);
    out
}

impl RedisQueue {
    /// Has the script write `tr` if `task` is still as read. `None`: it changed meanwhile
    /// (or is gone).
    async fn apply(
        &self,
        task: &Task,
        tr: &Transition,
        avoid_until: Option<u64>,
        now: u64,
    ) -> Result<Option<Task>> {
        let mut args = vec![
            task.id.clone(),
            now.to_string(),
            task.state.as_str().to_owned(),
            task.lease.clone().unwrap_or_default(),
            task.attempt.to_string(),
            flag(task.cancel_requested),
            tr.state.as_str().to_owned(),
        ];
        match &tr.attempt {
            Some(AttemptChange::End {
                attempt,
                ended_at,
                error,
            }) => args.extend([
                attempt.to_string(),
                ended_at.to_string(),
                error.clone().unwrap_or_default(),
            ]),
            _ => args.extend([String::new(), String::new(), String::new()]),
        }
        args.push(opt(avoid_until));
        let fields = changed_fields(task, tr);
        args.push(fields.len().to_string());
        for (name, v) in fields {
            args.extend([name.to_owned(), v]);
        }
        args.push(tr.events.len().to_string());
        for e in &tr.events {
            args.extend([e.name().to_owned(), e.data().to_string()]);
        }
        let mut r = self.run("apply", args).await?;
        match r.tag()?.as_str() {
            "ok" => Ok(Some(need_task(r.next())?)),
            _ => Ok(None),
        }
    }

    /// Changes `task` as `decide` says for the task as it is when written.
    pub(super) async fn change<F>(
        &self,
        mut task: Task,
        avoid_until: Option<u64>,
        now: u64,
        decide: F,
    ) -> Result<Changed>
    where
        F: Fn(&Task) -> Option<Transition>,
    {
        for _ in 0..ATTEMPTS {
            let Some(tr) = decide(&task) else {
                return Ok(Changed::Declined(Box::new(task)));
            };
            if let Some(after) = self.apply(&task, &tr, avoid_until, now).await? {
                return Ok(Changed::Done(Box::new((task, after))));
            }
            match self.get_task(&task.id).await? {
                Some(t) => task = t,
                None => return Ok(Changed::Gone),
            }
        }
        Err(QueueError::Unavailable(
            "the task kept changing while its change was stored".into(),
        ))
    }

    /// The task holding `lease` now, and whether any task ever had it (one round trip).
    pub(super) async fn by_lease(&self, lease: &str) -> Result<(Option<Task>, bool)> {
        let mut r = self.run("by_lease", vec![lease.to_owned()]).await?;
        if r.next().as_ref().and_then(text).is_none() {
            return Ok((None, false));
        }
        Ok((r.next().map(task_from).transpose()?.flatten(), true))
    }

    /// `release` and `reject`: the lease given back, the attempt not counted; a reject keeps
    /// the task from its worker until `avoid_until`.
    pub(super) async fn give_back(
        &self,
        l: Lease<'_>,
        avoid_until: Option<u64>,
        why: &str,
        now: u64,
    ) -> Result<Option<Task>> {
        let Lease { lease, holder } = l;
        drop(self.recall(lease));
        let (Some(task), _) = self.by_lease(lease).await? else {
            return Ok(None);
        };
        let decide = |t: &Task| {
            let current = t.lease.as_deref() == Some(lease) && t.state == TaskState::Running;
            (current && holds(t, holder)).then(|| lifecycle::release(t, why, now))
        };
        Ok(match self.change(task, avoid_until, now, decide).await? {
            Changed::Done(d) => Some(d.1),
            _ => None,
        })
    }
}
