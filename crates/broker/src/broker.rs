//! The broker: a queue store plus the table of worker sessions, and its public operations
//! (submit, cancel, drain, pause, the worker list). The protocol phases live beside it:
//! `hello.rs` (hello to welcome), `session.rs` (a connected worker's frames), `dispatch.rs`
//! (assignments) and `sweeper.rs` (periodic jobs).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kiln_protocol::Message;
use kiln_protocol::messages::*;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::config::BrokerConfig;
use crate::lifecycle::TaskEvent;
use crate::model::*;
use crate::queue::Queue;
use crate::session::{Outbound, SessionState};
use crate::store::sqlite::{SqliteOptions, SqliteQueue};

pub use kiln_protocol::now_ms;

/// How a session ended: the close frame the transport should send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// WebSocket close code (`kiln_protocol::close`).
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

/// A connected (or recently connected) worker, as `GET /v1/workers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    /// Stable id.
    pub worker_id: String,
    /// Current process.
    pub boot_id: String,
    /// Session id.
    pub session: String,
    /// What it serves.
    pub capabilities: Capabilities,
    /// Slots.
    pub slots: u32,
    /// Leases it runs.
    pub inflight: usize,
    /// Connected now.
    pub connected: bool,
    /// Draining (takes no new work).
    pub draining: bool,
    /// Last frame received, Unix ms.
    pub last_seen: u64,
    /// Last GPU statistics it sent.
    pub gpu: Option<GpuStats>,
}

/// The broker: a queue store plus the live worker sessions.
pub struct Broker {
    pub(crate) cfg: BrokerConfig,
    pub(crate) queue: Arc<dyn Queue>,
    sessions: Mutex<HashMap<String, SessionState>>,
    pub(crate) events: broadcast::Sender<TaskEvent>,
    pub(crate) wake: watch::Sender<u64>,
    paused: AtomicBool,
    pub(crate) conn_ids: AtomicU64,
    /// Tasks whose last assignment failed on the transport (sent alone; an ack resets
    /// their count in the store).
    pub(crate) suspects: Mutex<HashSet<String>>,
    /// The per-lease preview rate limit.
    pub(crate) previews: crate::preview::PreviewGate,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

type Shared = Arc<Broker>;

impl Broker {
    /// A broker over any queue store, configured as the caller built it. Starts the
    /// sweeper and, when the store pushes changes from other processes, their listener
    /// (needs a tokio runtime).
    pub fn new(queue: Arc<dyn Queue>, cfg: BrokerConfig) -> Shared {
        let (events, _) = broadcast::channel(4096);
        let (wake, _) = watch::channel(0);
        let b = Arc::new(Self {
            previews: crate::preview::PreviewGate::new(cfg.preview_interval, cfg.preview_burst),
            cfg,
            queue,
            sessions: Mutex::new(HashMap::new()),
            events,
            wake,
            paused: AtomicBool::new(false),
            conn_ids: AtomicU64::new(1),
            suspects: Mutex::new(HashSet::new()),
        });
        b.spawn_background();
        b
    }

    /// The same as [`Broker::new`] (its earlier name).
    pub fn with_queue(queue: Arc<dyn Queue>, cfg: BrokerConfig) -> Shared {
        Self::new(queue, cfg)
    }

    /// A broker over the SQLite queue at `path` with the default store settings
    /// ([`SqliteOptions::default`]: 3 attempts, 1 s retry base, `synchronous=NORMAL`);
    /// other settings: open a [`SqliteQueue`] and pass it to [`Broker::new`]. Needs a tokio
    /// runtime.
    pub fn open(path: &Path, cfg: BrokerConfig) -> Result<Shared, QueueError> {
        let q = SqliteQueue::open(path, SqliteOptions::default())?;
        Ok(Self::new(Arc::new(q), cfg))
    }

    /// The settings.
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// The queue store, for reads.
    pub fn queue(&self) -> &dyn Queue {
        &*self.queue
    }

    /// Live task events (state changes, progress, completion).
    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    pub(crate) fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionState>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn publish(&self) {
        for e in self.queue.take_events() {
            let _ = self.events.send(e);
        }
    }

    pub(crate) fn wake_dispatch(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes dispatch for tasks just queued, unless no session here could take them: when
    /// every session is full and none is reserving, the next `reserve` of each (after a
    /// result frees a slot) starts after the caller's commit and finds them anyway.
    fn wake_for_new_tasks(&self) {
        let could = self
            .sessions()
            .values()
            .any(|s| s.tx.is_some() && (s.free() > 0 || s.reserving > 0));
        if could {
            self.wake_dispatch();
        }
    }

    /// Stores a task (idempotent by request_id) and wakes dispatch. Returns the task and
    /// whether it was created now.
    pub async fn submit(&self, t: NewTask) -> Result<(Task, bool), QueueError> {
        let r = self.queue.enqueue(t, now_ms()).await;
        self.publish();
        if matches!(r, Ok((_, true))) {
            self.wake_for_new_tasks();
        }
        r
    }

    /// Stores many tasks in one transaction ([`Queue::enqueue_many`]: each idempotent by its
    /// request_id; a failure stores none) and wakes dispatch. Answers in the order given.
    pub async fn submit_many(&self, tasks: Vec<NewTask>) -> Result<Vec<(Task, bool)>, QueueError> {
        let r = self.queue.enqueue_many(tasks, now_ms()).await;
        self.publish();
        if r.as_ref()
            .is_ok_and(|v| v.iter().any(|(_, created)| *created))
        {
            self.wake_for_new_tasks();
        }
        r
    }

    /// Cancels a task; a running one gets a `cancel` sent to its worker (replayed on resume
    /// if the worker is offline).
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, QueueError> {
        let out = self.queue.cancel(id, now_ms()).await;
        self.publish();
        if let Ok(CancelOutcome::SignalWorker {
            worker_id, lease, ..
        }) = &out
        {
            self.stop_lease(worker_id, lease).await;
        }
        out
    }

    /// Queues a failed, expired or canceled task again as a new attempt (see
    /// [`crate::lifecycle::retry`]; `attempts`: its attempt budget, `None` for the store's
    /// default) and wakes dispatch.
    pub async fn retry(&self, id: &str, attempts: Option<u32>) -> Result<RetryOutcome, QueueError> {
        let out = self.queue.retry(id, attempts, now_ms()).await;
        self.publish();
        if matches!(out, Ok(RetryOutcome::Queued(_))) {
            self.wake_dispatch();
        }
        out
    }

    /// Tells a worker to stop a lease whose task was canceled. A lease whose `assign` the
    /// worker has not acked yet ends at once (the task is canceled, the assign is not
    /// replayed); the `cancel` still goes out in case the worker got it meanwhile.
    async fn stop_lease(&self, worker_id: &str, lease: &str) {
        if self.withdraw_unacked(worker_id, lease) {
            let why = "canceled before the worker acknowledged its assignment";
            match self.queue.release(lease, None, why, now_ms()).await {
                Ok(_) => self.publish(),
                Err(e) => {
                    tracing::warn!(message = "cancel of an unacked task not stored", error = %e)
                }
            }
            self.wake_dispatch();
        }
        self.send_cancel(worker_id, lease, "canceled by client");
    }

    pub(crate) async fn forward_cancel(&self, task_id: &str) {
        if let Ok(Some(t)) = self.queue.get(task_id).await
            && let (Some(w), Some(l)) = (&t.worker_id, &t.lease)
            && t.state == kiln_protocol::TaskState::Running
        {
            self.stop_lease(w, l).await;
        }
    }

    pub(crate) fn send_cancel(&self, worker_id: &str, lease: &str, reason: &str) {
        if let Some(s) = self.sessions().get_mut(worker_id) {
            let lease = lease.to_owned();
            let reason = reason.to_owned();
            s.push_control(|seq| Message::Cancel(Cancel { seq, lease, reason }));
        }
    }

    /// Asks a worker to finish its work and take no more. False when unknown.
    pub fn drain_worker(&self, worker_id: &str) -> bool {
        match self.sessions().get_mut(worker_id) {
            Some(s) => {
                s.draining = true;
                s.push_control(|seq| {
                    Message::Drain(Drain {
                        seq,
                        deadline: None,
                    })
                });
                true
            }
            None => false,
        }
    }

    /// Drains every worker (graceful shutdown).
    pub fn drain_all(&self) {
        let ids: Vec<String> = self.sessions().keys().cloned().collect();
        for id in ids {
            self.drain_worker(&id);
        }
    }

    /// Stops or restarts dispatching.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if !paused {
            self.wake_dispatch();
        }
    }

    /// Whether dispatch is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Known workers.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let mut v: Vec<WorkerInfo> = self
            .sessions()
            .iter()
            .map(|(id, s)| WorkerInfo {
                worker_id: id.clone(),
                boot_id: s.boot_id.clone(),
                session: s.session.clone(),
                capabilities: s.capabilities.clone(),
                slots: s.slots,
                inflight: s.inflight.len(),
                connected: s.tx.is_some(),
                draining: s.draining,
                last_seen: s.last_seen,
                gpu: s.gpu.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        v
    }

    /// Whether a connected worker could run a task of `task_type` that needs `model` and
    /// `labels` (the routing rule of [`serves`]).
    pub fn can_serve(&self, task_type: &str, model: Option<&str>, labels: &[String]) -> bool {
        self.sessions()
            .values()
            .any(|s| s.tx.is_some() && serves(&s.capabilities, task_type, model, labels))
    }

    /// Whether some worker (connected to any instance sharing the store) said hello with
    /// `task_type` in the last `window`.
    pub async fn task_type_seen(
        &self,
        task_type: &str,
        window: std::time::Duration,
    ) -> Result<bool, QueueError> {
        let since = now_ms().saturating_sub(window.as_millis() as u64);
        let seen = self.queue.task_types_seen(since).await?;
        Ok(seen.iter().any(|t| t == task_type))
    }

    /// Closes every session with `code` (e.g. 1012 on restart) and a retry hint.
    pub fn close_all(&self, code: u16, reason: &str) {
        for s in self.sessions().values() {
            if let Some(tx) = &s.tx {
                let _ = tx.send(Outbound::Close(SessionEnd {
                    code,
                    reason: reason.to_owned(),
                }));
            }
        }
    }
}

/// A session end with `code` and `reason`.
pub(crate) fn end(code: u16, reason: String) -> SessionEnd {
    SessionEnd { code, reason }
}
