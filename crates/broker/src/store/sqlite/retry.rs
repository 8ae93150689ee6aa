//! The SQLite store's retry: one transaction that reads the task, asks
//! [`lifecycle::retry`] and persists the answer.

use super::SqliteQueue;
use super::db::{Db, begin, get_task};
use crate::lifecycle;
use crate::model::RetryOutcome;
use crate::store::Result;

impl Db {
    /// Queues a task that ended without succeeding again (see [`lifecycle::retry`]).
    pub(super) fn retry(&self, id: &str, attempts: Option<u32>, now: u64) -> Result<RetryOutcome> {
        let tx = begin(&self.conn)?;
        let Some(task) = get_task(&tx, id)? else {
            return Ok(RetryOutcome::NotFound);
        };
        let Some(tr) = lifecycle::retry(&task, attempts, &self.opts, now) else {
            return Ok(RetryOutcome::Refused(task));
        };
        let after = self.persist(&tx, &task, &tr, now)?;
        tx.commit()?;
        Ok(RetryOutcome::Queued(after))
    }
}

impl SqliteQueue {
    pub(super) async fn retry_(
        &self,
        id: &str,
        attempts: Option<u32>,
        now: u64,
    ) -> Result<RetryOutcome> {
        let id = id.to_owned();
        self.call(move |db| db.retry(&id, attempts, now)).await
    }
}
