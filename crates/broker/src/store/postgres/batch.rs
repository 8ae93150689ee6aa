//! `enqueue_many` on PostgreSQL: one transaction, one multi-row insert of the tasks and one
//! of their events.

use std::collections::HashMap;

use super::tx::Tx;
use super::{PostgresQueue, i};
use crate::lifecycle::{self, Admitted, TaskEventKind};
use crate::model::*;
use crate::store::{Result, corrupt, json_text, new_id};

/// The tasks of a batch, one row per array position (`$11`: created_at; `$12`, `$13`: the
/// webhook and its events); a taken
/// `request_id` inserts nothing. Labels travel as JSON arrays (a `text[][]` would not keep
/// rows of different lengths).
const INSERT_MANY: &str = "INSERT INTO {s}.tasks (id, request_id, task_type, state, priority, input, metadata, max_attempts, deadline, created_at, model, labels, webhook, webhook_events)
    SELECT id, rid, ty, 'queued', pr, inp, meta, ma, dl, $11, mo, ARRAY(SELECT jsonb_array_elements_text(lb::jsonb)),
      wh, ARRAY(SELECT jsonb_array_elements_text(we::jsonb))
    FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::int4[], $8::int8[], $9::text[], $10::text[], $12::text[], $13::text[])
      WITH ORDINALITY AS x(id, rid, ty, pr, inp, meta, ma, dl, mo, lb, wh, we, o)
    ORDER BY o
    ON CONFLICT (request_id) DO NOTHING RETURNING id, seq";

/// Inserts the items `fresh` names (ids `ids`) in one statement. Returns the seq of each task
/// inserted, by id (a taken `request_id` inserts nothing).
async fn insert_rows(
    tx: &Tx<'_>,
    admitted: &[Admitted],
    fresh: &[usize],
    ids: &[String],
    now: u64,
) -> Result<HashMap<String, i64>> {
    let rows: Vec<&NewTask> = fresh.iter().map(|&k| &admitted[k].task).collect();
    let labels: Vec<String> = rows
        .iter()
        .map(|t| serde_json::Value::from(t.labels.clone()).to_string())
        .collect();
    let inserted = tx
        .rows(
            INSERT_MANY,
            &[
                &ids,
                &rows
                    .iter()
                    .map(|t| t.request_id.clone())
                    .collect::<Vec<_>>(),
                &rows
                    .iter()
                    .map(|t| t.task_type.as_str())
                    .collect::<Vec<_>>(),
                &rows.iter().map(|t| t.priority).collect::<Vec<_>>(),
                &rows.iter().map(|t| t.input.to_string()).collect::<Vec<_>>(),
                &rows
                    .iter()
                    .map(|t| json_text(t.metadata.as_ref()))
                    .collect::<Vec<_>>(),
                &fresh
                    .iter()
                    .map(|&k| admitted[k].max_attempts as i32)
                    .collect::<Vec<_>>(),
                &rows.iter().map(|t| t.deadline.map(i)).collect::<Vec<_>>(),
                &rows.iter().map(|t| t.model.clone()).collect::<Vec<_>>(),
                &labels,
                &i(now),
                &rows.iter().map(|t| t.webhook.clone()).collect::<Vec<_>>(),
                &rows
                    .iter()
                    .map(|t| serde_json::json!(t.webhook_events).to_string())
                    .collect::<Vec<_>>(),
            ],
        )
        .await?;
    inserted
        .iter()
        .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?)))
        .collect::<Result<HashMap<_, _>>>()
}

impl PostgresQueue {
    pub(super) async fn enqueue_many_(
        &self,
        tasks: Vec<NewTask>,
        now: u64,
    ) -> Result<Vec<(Task, bool)>> {
        let admitted = tasks
            .into_iter()
            .map(|t| lifecycle::admit(t, &self.opts))
            .collect::<Result<Vec<_>>>()?;
        if admitted.is_empty() {
            return Ok(Vec::new());
        }
        let (fresh, same_as) = lifecycle::batch_plan(&admitted);
        let ids: Vec<String> = fresh.iter().map(|_| new_id("task")).collect();
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        let seqs = insert_rows(&tx, &admitted, &fresh, &ids, now).await?;
        // Items whose request_id names a task stored before this batch.
        let taken: Vec<&str> = fresh
            .iter()
            .zip(&ids)
            .filter(|(_, id)| !seqs.contains_key(*id))
            .filter_map(|(&k, _)| admitted[k].task.request_id.as_deref())
            .collect();
        let mut stored: HashMap<String, Task> = HashMap::new();
        if !taken.is_empty() {
            for t in tx.tasks("request_id = ANY($1)", &[&taken]).await? {
                stored.insert(t.request_id.clone().unwrap_or_default(), t);
            }
        }
        let mut out: Vec<Option<(Task, bool)>> = vec![None; admitted.len()];
        for (&k, id) in fresh.iter().zip(ids) {
            let a = &admitted[k];
            out[k] = Some(match seqs.get(&id) {
                Some(&seq) => (lifecycle::new_task(a, id, seq, now), true),
                None => {
                    let rid = a.task.request_id.as_deref().unwrap_or_default();
                    let t = stored
                        .get(rid)
                        .cloned()
                        .ok_or_else(|| corrupt("request_id conflict without a task"))?;
                    if !lifecycle::same_request(&t, &a.task) {
                        return Err(lifecycle::batch_conflict(a));
                    }
                    (t, false)
                }
            });
        }
        lifecycle::fill_repeats(&mut out, &same_as, &admitted)?;
        let out: Vec<(Task, bool)> = out.into_iter().flatten().collect();
        let events: Vec<(&str, &TaskEventKind)> = out
            .iter()
            .zip(&admitted)
            .filter(|((_, created), _)| *created)
            .map(|((t, _), a)| (t.id.as_str(), &a.event))
            .collect();
        if !events.is_empty() {
            tx.append(&events, now).await?;
            tx.set_ready();
        }
        tx.commit().await?;
        Ok(out)
    }
}
