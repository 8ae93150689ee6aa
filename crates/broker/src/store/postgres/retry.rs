//! The PostgreSQL store's retry: one transaction that locks the task, asks
//! [`lifecycle::retry`] and persists the answer (other instances hear of it at commit).

use super::PostgresQueue;
use super::tx::Tx;
use crate::lifecycle;
use crate::model::RetryOutcome;
use crate::store::Result;

impl PostgresQueue {
    /// Queues a task that ended without succeeding again (see [`lifecycle::retry`]).
    pub(super) async fn retry_(
        &self,
        id: &str,
        attempts: Option<u32>,
        now: u64,
    ) -> Result<RetryOutcome> {
        let mut c = self.pool.get().await?;
        let mut tx = Tx::begin(self, &mut c).await?;
        let Some(task) = tx.tasks("id = $1 FOR UPDATE", &[&id]).await?.pop() else {
            return Ok(RetryOutcome::NotFound);
        };
        let Some(tr) = lifecycle::retry(&task, attempts, &self.opts, now) else {
            return Ok(RetryOutcome::Refused(task));
        };
        let after = tx.persist(&task, &tr, now).await?;
        tx.commit().await?;
        Ok(RetryOutcome::Queued(after))
    }
}
