//! [`TaskContext`]: what a handler is given of its task, and how it reports progress,
//! stage timings and notices a cancel.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::Message;
use kiln_protocol::messages::{Progress, TaskAssignment};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

/// What a handler sees of its task.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Lease of this attempt.
    pub lease: String,
    /// Task type.
    pub task_type: String,
    /// The client's idempotency key.
    pub request_id: Option<String>,
    /// Deadline, Unix ms.
    pub deadline: Option<u64>,
    /// The model the task needs (one of [`crate::WorkerConfig::models`]), if it names one.
    pub model: Option<String>,
    /// The input.
    pub input: Value,
    pub(crate) out: mpsc::UnboundedSender<Message>,
    cancel: watch::Receiver<bool>,
    timings: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Previews sent so far (the next one's index).
    pub(crate) previews: Arc<std::sync::atomic::AtomicU32>,
}

impl TaskContext {
    /// The context of assignment `t`: progress goes to `out`, a cancel arrives on `cancel`.
    pub(crate) fn new(
        t: TaskAssignment,
        out: mpsc::UnboundedSender<Message>,
        cancel: watch::Receiver<bool>,
    ) -> Self {
        Self {
            task_id: t.task_id,
            attempt: t.attempt,
            lease: t.lease,
            task_type: t.task_type,
            request_id: t.request_id,
            deadline: t.deadline,
            model: t.model,
            input: t.input,
            out,
            cancel,
            timings: Arc::default(),
            previews: Arc::default(),
        }
    }

    /// Records how long a stage of this attempt took; sent with the result as
    /// `timings.<stage>_ms` (a repeated stage adds up). `stage` is a short name such as
    /// `render`.
    pub fn record_stage(&self, stage: &str, took: Duration) {
        let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let mut t = self.timings.lock().unwrap_or_else(|p| p.into_inner());
        let slot = t.entry(format!("{stage}_ms")).or_insert(0);
        *slot = slot.saturating_add(ms);
    }

    /// Runs `f` and records its duration as stage `stage` (see [`TaskContext::record_stage`]).
    pub async fn timed<T>(&self, stage: &str, f: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = f.await;
        self.record_stage(stage, started.elapsed());
        out
    }

    /// Reports progress (lossy: the latest wins; dropped while disconnected).
    pub fn progress(&self, stage: &str, step: u64, total: u64) {
        let _ = self.out.send(Message::Progress(Progress {
            lease: self.lease.clone(),
            stage: Some(stage.to_owned()),
            step,
            total,
            eta_ms: None,
        }));
    }

    /// Whether the gateway asked to stop this task.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves when the gateway asks to stop this task.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// The stage timings recorded so far, taken (the context keeps none after): `None`
    /// when no stage was recorded.
    pub(crate) fn take_timings(&self) -> Option<BTreeMap<String, u64>> {
        let t = std::mem::take(&mut *self.timings.lock().unwrap_or_else(|p| p.into_inner()));
        (!t.is_empty()).then_some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> (
        TaskContext,
        mpsc::UnboundedReceiver<Message>,
        watch::Sender<bool>,
    ) {
        let (out, rx) = mpsc::unbounded_channel();
        let (cancel_tx, cancel) = watch::channel(false);
        let t: TaskAssignment = serde_json::from_value(serde_json::json!({
            "lease": "l-1", "task_id": "t-1", "attempt": 2, "task_type": "echo",
            "input": {"x": 1}
        }))
        .unwrap();
        (TaskContext::new(t, out, cancel), rx, cancel_tx)
    }

    #[test]
    fn stages_add_up_and_are_taken_once() {
        let (c, _rx, _cancel) = ctx();
        assert_eq!(c.take_timings(), None);
        c.record_stage("render", Duration::from_millis(5));
        c.clone().record_stage("render", Duration::from_millis(7));
        c.record_stage("encode", Duration::from_millis(1));
        let t = c.take_timings().unwrap();
        assert_eq!(t["render_ms"], 12);
        assert_eq!(t["encode_ms"], 1);
        assert_eq!(c.take_timings(), None);
    }

    #[tokio::test]
    async fn progress_goes_out_under_the_lease_and_cancel_is_seen() {
        let (c, mut rx, cancel) = ctx();
        c.progress("work", 1, 3);
        match rx.recv().await {
            Some(Message::Progress(p)) => {
                assert_eq!((p.lease.as_str(), p.step, p.total), ("l-1", 1, 3));
                assert_eq!(p.stage.as_deref(), Some("work"));
            }
            other => panic!("expected progress, got {other:?}"),
        }
        assert!(!c.is_cancelled());
        cancel.send(true).unwrap();
        c.cancelled().await;
        assert!(c.is_cancelled());
    }
}
