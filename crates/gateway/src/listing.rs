//! Filters of `GET /v1/tasks` that the stores do not index — model, worker and creation
//! time — applied while paging through the store's newest-first list, with a bound on the
//! rows read per request so a rare match cannot make one request scan the whole queue.

use kiln_broker::{ListFilter, Queue, QueueError, Task};

/// Rows read from the store at most to fill one page.
pub(crate) const MAX_SCAN: usize = 5000;

/// What a task must match beyond the store's own filters.
#[derive(Debug, Default)]
pub(crate) struct Extra {
    /// `model`: the task names this model.
    pub(crate) model: Option<String>,
    /// `worker`: its last attempt ran on this worker.
    pub(crate) worker: Option<String>,
    /// Created at or after this time, Unix ms.
    pub(crate) after_ms: Option<u64>,
    /// Created before this time, Unix ms.
    pub(crate) before_ms: Option<u64>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.model.is_none()
            && self.worker.is_none()
            && self.after_ms.is_none()
            && self.before_ms.is_none()
    }

    fn matches(&self, t: &Task) -> bool {
        self.model
            .as_ref()
            .is_none_or(|m| t.model.as_ref() == Some(m))
            && self
                .worker
                .as_ref()
                .is_none_or(|w| t.worker_id.as_ref() == Some(w))
            && self.after_ms.is_none_or(|a| t.created_at >= a)
            && self.before_ms.is_none_or(|b| t.created_at < b)
    }
}

/// One page: up to `base.limit` matching tasks, newest first, and the cursor (a `seq`) to
/// continue after the last row read. The cursor is `None` when the list has ended: the
/// store ran out, or (with `after_ms`) a task older than it was reached.
pub(crate) async fn page(
    q: &dyn Queue,
    base: ListFilter,
    extra: &Extra,
) -> Result<(Vec<Task>, Option<i64>), QueueError> {
    let limit = base.limit;
    if extra.is_empty() {
        let tasks = q.list(&base).await?;
        let next = (tasks.len() == limit)
            .then(|| tasks.last().map(|t| t.seq))
            .flatten();
        return Ok((tasks, next));
    }
    let mut out = Vec::with_capacity(limit);
    let mut before = base.before_seq;
    let mut scanned = 0;
    loop {
        let rows = q
            .list(&ListFilter {
                limit: 500,
                before_seq: before,
                ..base.clone()
            })
            .await?;
        let n = rows.len();
        for t in rows {
            scanned += 1;
            before = Some(t.seq);
            if extra.after_ms.is_some_and(|a| t.created_at < a) {
                // Newest first: everything after this is older still.
                return Ok((out, None));
            }
            if extra.matches(&t) {
                out.push(t);
                if out.len() == limit {
                    return Ok((out, before));
                }
            }
        }
        if n < 500 {
            return Ok((out, None));
        }
        if scanned >= MAX_SCAN {
            return Ok((out, before));
        }
    }
}
