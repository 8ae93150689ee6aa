//! The broker's periodic and background jobs: every `sweep_interval` the store requeues
//! lapsed leases and expires deadlines, sessions drop the leases that ended, dispatch looks
//! again, and sessions gone longer than a lease are forgotten; and, for stores that push
//! changes made by other processes, a listener that wakes dispatch and forwards cancels.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;

use crate::broker::{Broker, now_ms};
use crate::lifecycle::TaskEventKind;
use crate::queue::{Notification, Sweep};

impl Broker {
    /// Starts the sweeper and, when the store pushes changes, their listener. Both stop
    /// once the broker is dropped.
    pub(crate) fn spawn_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.cfg.sweep_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(b) = weak.upgrade() else { break };
                b.sweep().await;
            }
        });
        if let Some(mut notes) = self.queue.notifications() {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some(n) = notes.next().await {
                    let Some(b) = weak.upgrade() else { break };
                    b.on_notification(n).await;
                }
            });
        }
    }

    /// A change another process made to the shared store.
    async fn on_notification(&self, n: Notification) {
        match n {
            Notification::TasksReady => self.wake_dispatch(),
            Notification::Event(e) => {
                // A cancel made through another instance: tell the worker if its session
                // lives here.
                if e.kind == TaskEventKind::CancelRequested {
                    self.forward_cancel(&e.task_id).await;
                }
                let _ = self.events.send(e);
            }
        }
    }

    /// One sweep tick.
    async fn sweep(&self) {
        let now = now_ms();
        match self.queue.sweep(now).await {
            Ok(Sweep { changed, stop }) => {
                self.publish();
                if !changed.is_empty() {
                    self.drop_ended_leases().await;
                }
                for (worker, lease) in stop {
                    self.send_cancel(&worker, &lease, "deadline passed");
                }
            }
            Err(e) => tracing::warn!(message = "sweep failed", error = %e),
        }
        // Tasks may have become runnable without a local event (a retry time passed, another
        // process enqueued): every tick lets sessions with free slots look.
        self.wake_dispatch();
        // Forget sessions that have been gone longer than a lease: nothing left to resume.
        let lease_ms = self.cfg.lease.as_millis() as u64;
        self.sessions().retain(|_, s| {
            s.disconnected_at
                .is_none_or(|t| now.saturating_sub(t) < lease_ms)
        });
    }

    /// Leases that lapsed or ended no longer count against a session's credits.
    async fn drop_ended_leases(&self) {
        let busy: Vec<(String, HashSet<String>)> = self
            .sessions()
            .iter()
            .filter(|(_, s)| !s.inflight.is_empty())
            .map(|(id, s)| (id.clone(), s.inflight.clone()))
            .collect();
        for (worker_id, seen) in busy {
            if let Ok(held) = self.queue.leases_of(&worker_id).await {
                let live: HashSet<String> = held.into_iter().map(|(l, _)| l).collect();
                // Only leases known before the read can have lapsed.
                let gone: HashSet<&String> = seen.difference(&live).collect();
                if let Some(s) = self.sessions().get_mut(&worker_id) {
                    s.inflight.retain(|l| !gone.contains(l));
                }
            }
        }
    }
}
