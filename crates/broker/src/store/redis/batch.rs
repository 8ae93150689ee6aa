//! `enqueue_many` on Redis: one run of the script stores the whole batch, or nothing.
use serde_json::Value as Json;

use super::change::opt;
use super::reply::{array, int, need_task, task_from, text};
use super::{RedisQueue, corrupt};
use crate::lifecycle::{self, Admitted};
use crate::model::*;
use crate::store::{Result, new_id};

/// How often a batch is sent again when request_ids it expected to be free (or taken) turn
/// out otherwise.
const ATTEMPTS: usize = 16;

impl RedisQueue {
    /// The 15 arguments of the script's `enqueue` for `a` (a fresh task id).
    pub(super) fn enqueue_args(&self, a: &Admitted, now: u64) -> Vec<String> {
        let t = &a.task;
        let ttl = self.opts.request_id_ttl.as_millis().max(1) as u64;
        vec![
            new_id("task"),
            now.to_string(),
            t.task_type.clone(),
            t.priority.to_string(),
            t.input.to_string(),
            t.metadata.as_ref().map(Json::to_string).unwrap_or_default(),
            a.max_attempts.to_string(),
            opt(t.deadline),
            t.request_id.clone().unwrap_or_default(),
            ttl.to_string(),
            t.model.clone().unwrap_or_default(),
            if t.labels.is_empty() {
                String::new()
            } else {
                serde_json::json!(t.labels).to_string()
            },
            a.event.data().to_string(),
            t.webhook.clone().unwrap_or_default(),
            serde_json::json!(t.webhook_events).to_string(),
        ]
    }

    /// Runs the script's `enqueue_many` until its request_id expectations hold. Returns
    /// its (tag, task) pairs, flat, in the order of `sent`.
    async fn send(
        &self,
        admitted: &[Admitted],
        sent: &[usize],
        base: &[Vec<String>],
    ) -> Result<Vec<::redis::Value>> {
        let mut expect = vec![String::new(); sent.len()];
        let mut stored = None;
        for _ in 0..ATTEMPTS {
            let mut args = vec![sent.len().to_string()];
            for (b, e) in base.iter().zip(&expect) {
                args.extend(b.iter().cloned());
                args.push(e.clone());
            }
            let mut r = self.run("enqueue_many", args).await?;
            let tag = r.tag()?;
            let list = array(r.next().ok_or_else(|| corrupt("enqueue_many"))?)?;
            if tag == "done" {
                stored = Some(list);
                break;
            }
            for pair in list.chunks(2) {
                let i = int(pair.first().ok_or_else(|| corrupt("retry index"))?)? as usize;
                let found = pair.get(1).cloned().map(task_from).transpose()?.flatten();
                let a = &admitted[*sent.get(i).ok_or_else(|| corrupt("retry index"))?];
                expect[i] = match found {
                    Some(t) if !lifecycle::same_request(&t, &a.task) => {
                        return Err(lifecycle::batch_conflict(a));
                    }
                    Some(t) => t.id,
                    None => String::new(),
                };
            }
        }
        stored
            .ok_or_else(|| QueueError::Unavailable("the batch's request_ids kept changing".into()))
    }

    /// Sends the first item of each request_id with what its request_id is expected to name;
    /// when an expectation fails the script writes nothing and names the task it found,
    /// which is checked (same request, else [`QueueError::Conflict`]) and expected next time.
    pub(super) async fn enqueue_many_(
        &self,
        tasks: Vec<NewTask>,
        now: u64,
    ) -> Result<Vec<(Task, bool)>> {
        let admitted = tasks
            .into_iter()
            .map(|t| lifecycle::admit(t, &self.opts.queue))
            .collect::<Result<Vec<_>>>()?;
        let (sent, same_as) = lifecycle::batch_plan(&admitted);
        // Checked before anything is written: a batch that contradicts itself stores nothing.
        for (k, f) in same_as.iter().enumerate() {
            if let Some(f) = *f
                && !lifecycle::same_request(
                    &lifecycle::new_task(&admitted[f], String::new(), 0, now),
                    &admitted[k].task,
                )
            {
                return Err(lifecycle::batch_conflict(&admitted[k]));
            }
        }
        if sent.is_empty() {
            return Ok(Vec::new());
        }
        let base: Vec<Vec<String>> = sent
            .iter()
            .map(|&k| self.enqueue_args(&admitted[k], now))
            .collect();
        let stored = self.send(&admitted, &sent, &base).await?;
        let mut out: Vec<Option<(Task, bool)>> = vec![None; admitted.len()];
        for (pair, &k) in stored.chunks(2).zip(&sent) {
            let created = pair.first().and_then(text).as_deref() == Some("created");
            out[k] = Some((need_task(pair.get(1).cloned())?, created));
        }
        lifecycle::fill_repeats(&mut out, &same_as, &admitted)?;
        out.into_iter()
            .map(|o| o.ok_or_else(|| corrupt("batch answer missing")))
            .collect()
    }
}
