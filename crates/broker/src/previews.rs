//! `preview` frames: checked and rate-limited by the lease's gate, stored as progress.

use kiln_protocol::messages::Preview;

use crate::broker::Broker;
use crate::preview::Admission;

impl Broker {
    /// Stores a preview unless it is malformed or over the lease's rate.
    pub(crate) async fn preview(&self, worker_id: &str, p: Preview, now: u64) {
        match self.previews.preview(&p) {
            Ok(Admission::Store(data)) => {
                if let Err(e) = self
                    .queue
                    .progress(&p.lease, Some(worker_id), data, now)
                    .await
                {
                    tracing::warn!(message = "preview not stored", error = %e);
                }
                self.publish();
            }
            Ok(Admission::Dropped(n)) => {
                if n == 1 || n % 100 == 0 {
                    tracing::debug!(message = "previews over the rate dropped", worker_id = %worker_id, lease = %p.lease, dropped = n);
                }
            }
            Err(e) => {
                tracing::warn!(message = "preview refused", worker_id = %worker_id, lease = %p.lease, error = %e);
            }
        }
    }
}
