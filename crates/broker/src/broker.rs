//! Dispatch: matches queued tasks to connected worker sessions by credits and
//! capability, keeps leases alive, replays control messages on resume, and publishes task
//! events.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use kiln_protocol::messages::*;
use kiln_protocol::{DecodeError, Envelope, Message, close};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, watch};

use crate::config::BrokerConfig;
use crate::lifecycle::{TaskEvent, TaskEventKind};
use crate::model::*;
use crate::queue::{Notification, Queue, Sweep};
use crate::store::sqlite::{SqliteOptions, SqliteQueue};

pub use kiln_protocol::now_ms;

mod assign;
mod previews;
use assign::Retained;

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

enum Outbound {
    Frame(String),
    Close(SessionEnd),
}

struct SessionState {
    session: String,
    boot_id: String,
    capabilities: Capabilities,
    slots: u32,
    inflight: HashSet<String>,
    /// Control frames sent and not yet acked, oldest first.
    retained: Vec<Retained>,
    next_seq: u64,
    /// Credits taken by a `reserve` still running.
    reserving: usize,
    /// A new hello for this worker is being registered: assign nothing more here.
    replacing: bool,
    tx: Option<mpsc::UnboundedSender<Outbound>>,
    conn_id: u64,
    draining: bool,
    last_seen: u64,
    last_renew: u64,
    disconnected_at: Option<u64>,
    gpu: Option<GpuStats>,
}

impl SessionState {
    fn free(&self) -> usize {
        (self.slots as usize).saturating_sub(self.inflight.len() + self.reserving)
    }

    /// Queues a control message (`assign`, `cancel`, `drain`) with the next seq; kept until
    /// acked so it can be replayed on resume.
    fn push_control(&mut self, build: impl FnOnce(u64) -> Message) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let message = build(seq);
        let tasks = match &message {
            Message::Assign(a) => a
                .tasks
                .iter()
                .map(|t| (t.lease.clone(), t.task_id.clone()))
                .collect(),
            _ => Vec::new(),
        };
        let frame = Envelope::new(message, now_ms())
            .from_source("gateway")
            .encode();
        self.retained.push(Retained {
            seq,
            frame: frame.clone(),
            tasks,
        });
        if let Some(tx) = &self.tx {
            let _ = tx.send(Outbound::Frame(frame));
        }
    }
}

/// The broker: a queue store plus the live worker sessions.
pub struct Broker {
    cfg: BrokerConfig,
    queue: Arc<dyn Queue>,
    sessions: Mutex<HashMap<String, SessionState>>,
    events: broadcast::Sender<TaskEvent>,
    wake: watch::Sender<u64>,
    paused: AtomicBool,
    conn_ids: std::sync::atomic::AtomicU64,
    /// Tasks whose last assignment failed on the transport (sent alone; an ack resets
    /// their count in the store).
    suspects: Mutex<HashSet<String>>,
    /// The per-lease preview rate limit.
    previews: crate::preview::PreviewGate,
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
    /// Opens the SQLite queue at `path` and starts the sweeper (needs a tokio runtime).
    pub fn open(path: &Path, cfg: BrokerConfig) -> Result<Shared, QueueError> {
        let q = SqliteQueue::open(
            path,
            SqliteOptions {
                queue: cfg.queue_options(),
                sync_full: cfg.sync_full,
                ..SqliteOptions::default()
            },
        )?;
        Ok(Self::with_queue(Arc::new(q), cfg))
    }

    /// A broker over any queue store (tests use `SqliteQueue::in_memory`). Starts the
    /// sweeper and, when the store pushes changes from other processes, their listener
    /// (needs a tokio runtime).
    pub fn with_queue(queue: Arc<dyn Queue>, cfg: BrokerConfig) -> Shared {
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
            conn_ids: std::sync::atomic::AtomicU64::new(1),
            suspects: Mutex::new(HashSet::new()),
        });
        let weak = Arc::downgrade(&b);
        let every = b.cfg.sweep_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(b) = weak.upgrade() else { break };
                b.sweep().await;
            }
        });
        if let Some(mut notes) = b.queue.notifications() {
            let weak = Arc::downgrade(&b);
            tokio::spawn(async move {
                while let Some(n) = notes.next().await {
                    let Some(b) = weak.upgrade() else { break };
                    match n {
                        Notification::TasksReady => b.wake_dispatch(),
                        Notification::Event(e) => {
                            // A cancel made through another instance: tell the worker if its
                            // session lives here.
                            if e.kind == TaskEventKind::CancelRequested {
                                b.forward_cancel(&e.task_id).await;
                            }
                            let _ = b.events.send(e);
                        }
                    }
                }
            });
        }
        b
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

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionState>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self) {
        for e in self.queue.take_events() {
            let _ = self.events.send(e);
        }
    }

    fn wake_dispatch(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Stores a task (idempotent by request_id) and wakes dispatch. Returns the task and
    /// whether it was created now.
    pub async fn submit(&self, t: NewTask) -> Result<(Task, bool), QueueError> {
        let r = self.queue.enqueue(t, now_ms()).await;
        self.publish();
        if matches!(r, Ok((_, true))) {
            self.wake_dispatch();
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

    async fn forward_cancel(&self, task_id: &str) {
        if let Ok(Some(t)) = self.queue.get(task_id).await
            && let (Some(w), Some(l)) = (&t.worker_id, &t.lease)
            && t.state == kiln_protocol::TaskState::Running
        {
            self.stop_lease(w, l).await;
        }
    }

    fn send_cancel(&self, worker_id: &str, lease: &str, reason: &str) {
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

    async fn sweep(&self) {
        let now = now_ms();
        match self.queue.sweep(now).await {
            Ok(Sweep { changed, stop }) => {
                self.publish();
                if !changed.is_empty() {
                    // Leases that lapsed or ended no longer count against a session's credits.
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

    /// Runs one worker connection until it ends. `frames` yields the text frames received,
    /// `sink` takes the text frames to send. Returns the close the transport should send.
    pub async fn serve_session<S, K, E>(self: Arc<Self>, mut frames: S, mut sink: K) -> SessionEnd
    where
        S: Stream<Item = Result<String, E>> + Unpin,
        K: Sink<String> + Unpin,
        E: std::fmt::Display,
    {
        let hello = match tokio::time::timeout(self.cfg.hello_timeout, frames.next()).await {
            Ok(Some(Ok(text))) => match Envelope::decode(&text, self.cfg.max_frame_bytes) {
                Ok(Envelope {
                    message: Message::Hello(h),
                    ..
                }) => h,
                Ok(other) => {
                    return end(
                        close::PROTOCOL,
                        format!(
                            "first frame must be hello, got {}",
                            other.message.type_name()
                        ),
                    );
                }
                Err(e) if e.is_fatal() => return end(close::VERSION, e.to_string()),
                Err(e) => return end(close::PROTOCOL, e.to_string()),
            },
            Ok(_) => return end(1000, "closed before hello".into()),
            Err(_) => return end(close::PROTOCOL, "no hello within the hello timeout".into()),
        };
        for (field, id) in [("worker_id", &hello.worker_id), ("boot_id", &hello.boot_id)] {
            if let Err(why) = check_id(id) {
                tracing::warn!(message = "hello refused", field, error = %why);
                return end(close::PROTOCOL, format!("invalid {field}: {why}"));
            }
        }
        let worker_id = hello.worker_id.clone();
        let issued = match self.prove_identity(&hello).await {
            Ok(Ok(issued)) => issued,
            Ok(Err(why)) => {
                tracing::warn!(message = "hello refused: worker identity not proven", worker_id = %worker_id, boot_id = %hello.boot_id, reason = why);
                return end(close::IDENTITY, why.into());
            }
            Err(e) => {
                return end(
                    close::TRY_LATER,
                    close::reason_with_retry_after(&format!("queue store: {e}"), 1000),
                );
            }
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<Outbound>();
        let conn_id = self.conn_ids.fetch_add(1, Ordering::Relaxed);
        let (mut welcome, replay) = match self.register(&hello, tx, conn_id).await {
            Ok(w) => w,
            Err(e) => {
                return end(
                    close::TRY_LATER,
                    close::reason_with_retry_after(&format!("queue store: {e}"), 1000),
                );
            }
        };
        welcome.worker_secret = issued;
        tracing::info!(message = "worker connected", worker_id = %worker_id, boot_id = %hello.boot_id, resumed = welcome.resumed, keep = welcome.keep.len(), drop = welcome.drop.len());
        // Remembered so that its task types are accepted while it is offline.
        if let Err(e) = self
            .queue
            .note_task_types(&hello.capabilities.task_types, now_ms())
            .await
        {
            tracing::warn!(message = "task types of a worker not recorded", worker_id = %worker_id, error = %e);
        }
        let frame = Envelope::new(Message::Welcome(welcome), now_ms())
            .from_source("gateway")
            .encode();
        if sink.send(frame).await.is_err() {
            return self.disconnect(&worker_id, conn_id, end(1006, "send failed".into()));
        }
        for f in replay {
            if sink.send(f).await.is_err() {
                return self.disconnect(&worker_id, conn_id, end(1006, "send failed".into()));
            }
        }
        self.dispatch(&worker_id).await;
        let mut wake = self.wake.subscribe();
        let mut bad_frames = 0u32;
        let dead_after = self.cfg.dead_after;
        let mut silence = Box::pin(tokio::time::sleep(dead_after));
        let outcome = loop {
            tokio::select! {
                frame = frames.next() => {
                    let text = match frame {
                        Some(Ok(t)) => t,
                        Some(Err(e)) => break end(1006, format!("transport error: {e}")),
                        None => break end(1006, "connection closed".into()),
                    };
                    silence.as_mut().reset(tokio::time::Instant::now() + dead_after);
                    match Envelope::decode(&text, self.cfg.max_frame_bytes) {
                        Ok(env) => {
                            if let Some(end) = self.handle(&worker_id, env, &mut sink).await {
                                break end;
                            }
                        }
                        Err(e @ DecodeError::Oversized { .. }) => {
                            // Read whole (under the transport's hard limit): answered, not
                            // counted as a protocol violation.
                            self.oversized_frame(&worker_id, &text, &e, &mut sink).await;
                        }
                        Err(e) => {
                            if e.is_fatal() {
                                break end(close::VERSION, e.to_string());
                            }
                            bad_frames += 1;
                            tracing::warn!(message = "bad frame from worker", worker_id = %worker_id, error = %e);
                            let _ = sink.send(Envelope::error_reply(&e, now_ms()).encode()).await;
                            if bad_frames >= 3 {
                                break end(close::PROTOCOL, format!("too many bad frames; last: {e}"));
                            }
                        }
                    }
                }
                out = rx.recv() => match out {
                    Some(Outbound::Frame(f)) => {
                        if sink.send(f).await.is_err() {
                            break end(1006, "send failed".into());
                        }
                    }
                    Some(Outbound::Close(e)) => break e,
                    None => break end(1011, "session dropped".into()),
                },
                changed = wake.changed() => {
                    if changed.is_err() { break end(close::RESTART, "gateway stopping".into()); }
                    self.dispatch(&worker_id).await;
                }
                _ = &mut silence => break end(close::HEARTBEAT_TIMEOUT, "no frame within dead_after".into()),
            }
        };
        self.disconnect(&worker_id, conn_id, outcome)
    }

    fn disconnect(&self, worker_id: &str, conn_id: u64, outcome: SessionEnd) -> SessionEnd {
        if let Some(s) = self.sessions().get_mut(worker_id)
            && s.conn_id == conn_id
        {
            s.tx = None;
            s.disconnected_at = Some(now_ms());
        }
        tracing::info!(message = "worker disconnected", worker_id = %worker_id, code = outcome.code, reason = %outcome.reason);
        outcome
    }

    /// Checks the hello's `worker_secret` against the one issued to its `worker_id`, before
    /// anything about a connected session changes. `Ok(Ok(Some(secret)))`: first
    /// registration, `secret` was issued now (sent in `welcome`); `Ok(Ok(None))`: proven (or
    /// a presented secret adopted because none was stored); `Ok(Err(why))`: refused.
    async fn prove_identity(
        &self,
        hello: &Hello,
    ) -> Result<Result<Option<String>, &'static str>, QueueError> {
        let id = &hello.worker_id;
        let presented = hello.worker_secret.as_deref().filter(|s| !s.is_empty());
        if presented.is_some_and(|s| s.len() > 256) {
            return Ok(Err("worker_secret longer than 256 bytes"));
        }
        for _ in 0..2 {
            if let Some(stored) = self.queue.identity(id).await? {
                return Ok(match presented {
                    Some(s) if same_digest(&sha256_hex(s), &stored) => Ok(None),
                    Some(_) => Err("wrong worker_secret for this worker_id"),
                    None => {
                        Err("this worker_id is registered: the hello must carry its worker_secret")
                    }
                });
            }
            let (secret, issued) = match presented {
                Some(s) => (s.to_owned(), None),
                None => {
                    let s = format!(
                        "wks_{}{}",
                        uuid::Uuid::new_v4().simple(),
                        uuid::Uuid::new_v4().simple()
                    );
                    (s.clone(), Some(s))
                }
            };
            if self
                .queue
                .set_identity(id, &sha256_hex(&secret), now_ms())
                .await?
            {
                tracing::info!(message = "worker registered", worker_id = %id, issued = issued.is_some());
                return Ok(Ok(issued));
            }
            // Another hello registered this id meanwhile: check against its secret.
        }
        Ok(Err("this worker_id was registered concurrently"))
    }

    /// Forgets the secret issued to `worker_id` (an operator's reset after a worker lost its
    /// state dir): its next hello registers afresh. Returns whether one was stored.
    pub async fn forget_identity(&self, worker_id: &str) -> Result<bool, QueueError> {
        let forgot = self.queue.forget_identity(worker_id).await?;
        tracing::warn!(message = "worker identity forgotten", worker_id = %worker_id, forgot);
        Ok(forgot)
    }

    /// Registers a hello: resume, restart or fresh session. Returns the welcome and the
    /// control frames to replay.
    async fn register(
        &self,
        hello: &Hello,
        tx: mpsc::UnboundedSender<Outbound>,
        conn_id: u64,
    ) -> Result<(Welcome, Vec<String>), QueueError> {
        let now = now_ms();
        let until = now + self.cfg.lease.as_millis() as u64;
        let worker_id = &hello.worker_id;
        // The previous session stays in place while the store is asked, so that cancels
        // sent meanwhile are retained; its connection is closed now and it assigns nothing.
        let previous = {
            let mut sessions = self.sessions();
            sessions.get_mut(worker_id).map(|p| {
                if p.tx.is_some() && p.boot_id != hello.boot_id {
                    tracing::warn!(message = "worker session taken over", worker_id = %worker_id, old_boot_id = %p.boot_id, new_boot_id = %hello.boot_id, old_session = %p.session);
                }
                if let Some(old) = p.tx.take() {
                    let _ = old.send(Outbound::Close(SessionEnd {
                        code: close::REPLACED,
                        reason: "replaced by a newer session".into(),
                    }));
                }
                p.disconnected_at.get_or_insert(now);
                (p.boot_id.clone(), p.session.clone(), p.inflight.clone())
            })
        };
        let unreceived = self.unreceived(hello);
        let resumable = match (&previous, &hello.resume) {
            (Some((boot, session, _)), Some(r)) => *boot == hello.boot_id && *session == r.session,
            _ => false,
        };
        // The worker holds the leases it runs and those whose result waits in its outbox (the
        // result follows the welcome): neither is given back, or a finished task would run
        // again.
        let claimed: HashSet<&String> = hello.inflight.iter().chain(&hello.outbox).collect();
        if let (true, Some((_, session, inflight))) = (resumable, &previous) {
            // The first control frame the worker did not receive is the one its connection
            // failed on: when it is an assign, that assignment failed (counted; the task is
            // queued again and the frame not replayed). Later ones are replayed.
            let (blamed_seq, blamed, replayed) = unreceived.split(&claimed);
            // Leases the worker no longer has go back to the queue.
            let lost: Vec<&String> = inflight
                .iter()
                .filter(|l| !claimed.contains(l) && !replayed.contains(*l) && !blamed.contains(*l))
                .collect();
            for l in &lost {
                self.queue
                    .release(l, None, "worker no longer holds the lease", now)
                    .await?;
            }
            self.queue.renew(worker_id, until).await?;
            let resumed =
                self.resume_session(hello, session, tx, conn_id, &lost, &blamed, blamed_seq);
            self.publish();
            if resumed.is_ok() {
                self.assignments_failed(worker_id, blamed).await;
            }
            return resumed;
        }
        self.register_fresh(hello, previous, claimed, tx, conn_id)
            .await
    }

    /// The resume half of `register`: the session's state after a resuming `hello`, with the
    /// welcome and the frames to replay.
    #[allow(clippy::too_many_arguments)]
    fn resume_session(
        &self,
        hello: &Hello,
        session: &str,
        tx: mpsc::UnboundedSender<Outbound>,
        conn_id: u64,
        lost: &[&String],
        blamed: &[String],
        blamed_seq: Option<u64>,
    ) -> Result<(Welcome, Vec<String>), QueueError> {
        let now = now_ms();
        let worker_id = &hello.worker_id;
        let mut sessions = self.sessions();
        let Some(s) = sessions
            .get_mut(worker_id)
            .filter(|s| s.session == *session)
        else {
            return Err(QueueError::Unavailable(
                "another hello for this worker arrived meanwhile".into(),
            ));
        };
        for l in lost.iter().copied().chain(blamed) {
            s.inflight.remove(l);
        }
        let last = hello.resume.as_ref().map(|r| r.last_seq).unwrap_or(0);
        s.retained
            .retain(|r| r.seq > last && Some(r.seq) != blamed_seq);
        let replay: Vec<String> = s.retained.iter().map(|r| r.frame.clone()).collect();
        let keep: Vec<String> = hello
            .inflight
            .iter()
            .chain(&hello.outbox)
            .filter(|l| s.inflight.contains(*l))
            .cloned()
            .collect();
        let dropped: Vec<String> = hello
            .inflight
            .iter()
            .filter(|l| !s.inflight.contains(*l))
            .cloned()
            .collect();
        s.tx = Some(tx);
        s.conn_id = conn_id;
        s.slots = hello.slots;
        s.capabilities = hello.capabilities.clone();
        s.last_seen = now;
        s.disconnected_at = None;
        let welcome = Welcome {
            session: s.session.clone(),
            timers: self.timers(),
            max_frame_bytes: Some(self.cfg.max_frame_bytes as u64),
            resumed: true,
            keep,
            drop: dropped,
            worker_secret: None,
        };
        Ok((welcome, replay))
    }

    /// The non-resume half of `register`: a new session, after a restart or a hello the
    /// gateway cannot resume.
    async fn register_fresh(
        &self,
        hello: &Hello,
        previous: Option<(String, String, HashSet<String>)>,
        claimed: HashSet<&String>,
        tx: mpsc::UnboundedSender<Outbound>,
        conn_id: u64,
    ) -> Result<(Welcome, Vec<String>), QueueError> {
        let now = now_ms();
        let until = now + self.cfg.lease.as_millis() as u64;
        let worker_id = &hello.worker_id;
        // Not a resume: a dispatch still running for the old session hands its leases back.
        if let Some(p) = self.sessions().get_mut(worker_id) {
            p.replacing = true;
        }
        // The queue's lease table decides what the worker keeps: with the same boot (gateway
        // restarted, or resume data lost) leases it still runs or holds a result for are
        // kept; a new boot keeps only the leases whose results survived in its outbox (they
        // are sent right after the welcome) and releases the rest of what the old process
        // held, and those lost attempts count (a task that crashes its worker every time
        // ends dead-lettered).
        let restarted = match &previous {
            Some((boot, _, _)) => *boot != hello.boot_id,
            // No session here (this gateway restarted, the worker was on another instance, or
            // it was gone longer than a lease): a hello with no session to resume and nothing
            // running or unsent comes from a new process, so what the store still leases to
            // this worker belonged to an earlier boot.
            None => hello.resume.is_none() && hello.inflight.is_empty() && hello.outbox.is_empty(),
        };
        let mut keep = Vec::new();
        let mut inflight = HashSet::new();
        // A new boot holds only what its outbox names; the same boot also what it runs.
        let held: HashSet<&String> = if restarted {
            self.queue
                .release_worker(worker_id, &hello.outbox, now)
                .await?;
            hello.outbox.iter().collect()
        } else {
            claimed
        };
        // What the store still leases to this worker and it holds is kept, and tracked so
        // that the arriving result frees its slot. Anything else (after a restart: reserved
        // meanwhile for the replaced session) goes back without counting.
        for (lease, _) in self.queue.leases_of(worker_id).await? {
            if held.contains(&lease) {
                keep.push(lease.clone());
                inflight.insert(lease);
            } else {
                self.queue
                    .release(&lease, None, "worker no longer holds the lease", now)
                    .await?;
            }
        }
        self.queue.renew(worker_id, until).await?;
        let dropped: Vec<String> = hello
            .inflight
            .iter()
            .filter(|l| !inflight.contains(*l))
            .cloned()
            .collect();
        let session = format!("sess_{}", uuid::Uuid::new_v4().simple());
        self.sessions().insert(
            worker_id.clone(),
            SessionState {
                session: session.clone(),
                boot_id: hello.boot_id.clone(),
                capabilities: hello.capabilities.clone(),
                slots: hello.slots,
                inflight,
                retained: Vec::new(),
                next_seq: 1,
                reserving: 0,
                replacing: false,
                tx: Some(tx),
                conn_id,
                draining: false,
                last_seen: now,
                last_renew: now,
                disconnected_at: None,
                gpu: None,
            },
        );
        self.publish();
        self.wake_dispatch();
        Ok((
            Welcome {
                session,
                timers: self.timers(),
                max_frame_bytes: Some(self.cfg.max_frame_bytes as u64),
                resumed: false,
                keep,
                drop: dropped,
                worker_secret: None,
            },
            Vec::new(),
        ))
    }

    fn timers(&self) -> Timers {
        Timers {
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
            lease_ms: self.cfg.lease.as_millis() as u64,
            dead_after_ms: self.cfg.dead_after.as_millis() as u64,
        }
    }

    /// Fills the worker's free slots from the queue.
    async fn dispatch(&self, worker_id: &str) {
        if self.is_paused() {
            return;
        }
        let now = now_ms();
        let lease_until = now + self.cfg.lease.as_millis() as u64;
        let (caps, free, session) = {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(worker_id) else {
                return;
            };
            if s.tx.is_none() || s.draining || s.replacing {
                return;
            }
            let free = s.free();
            if free == 0 {
                return;
            }
            // The credits stay taken while the store answers.
            s.reserving += free;
            (s.capabilities.clone(), free, s.session.clone())
        };
        let reserved = self
            .queue
            .reserve(worker_id, &caps, free, lease_until, now)
            .await;
        let mut refused = Vec::new();
        let orphans = {
            let mut sessions = self.sessions();
            let mut current = sessions.get_mut(worker_id).filter(|s| s.session == session);
            if let Some(s) = current.as_mut() {
                s.reserving = s.reserving.saturating_sub(free);
            }
            let tasks = match reserved {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(message = "reserve failed", error = %e);
                    return;
                }
            };
            if tasks.is_empty() {
                return;
            }
            match current.filter(|s| !s.replacing) {
                Some(s) => {
                    let assignments: Vec<TaskAssignment> = tasks
                        .into_iter()
                        .filter_map(|t| {
                            let lease = t.lease?;
                            s.inflight.insert(lease.clone());
                            Some(TaskAssignment {
                                task_id: t.id,
                                attempt: t.attempt,
                                lease,
                                request_id: t.request_id,
                                task_type: t.task_type,
                                priority: t.priority,
                                deadline: t.deadline,
                                model: t.model,
                                input: t.input,
                            })
                        })
                        .collect();
                    refused = self.push_assignments(s, assignments);
                    Vec::new()
                }
                // The session was replaced while the store answered: give the tasks back.
                None => tasks.into_iter().filter_map(|t| t.lease).collect(),
            }
        };
        self.assignments_failed(worker_id, refused).await;
        for lease in &orphans {
            if let Err(e) = self
                .queue
                .release(lease, None, "the session ended before assignment", now)
                .await
            {
                tracing::warn!(message = "release failed", error = %e);
            }
        }
        if !orphans.is_empty() {
            self.wake_dispatch();
        }
        self.publish();
    }

    /// Handles one frame from a worker. `Some` ends the session.
    async fn handle<K: Sink<String> + Unpin>(
        &self,
        worker_id: &str,
        env: Envelope,
        sink: &mut K,
    ) -> Option<SessionEnd> {
        let now = now_ms();
        // A heartbeat renews below and reports the time; other frames renew through touch.
        self.touch(
            worker_id,
            now,
            !matches!(env.message, Message::Heartbeat(_)),
        )
        .await;
        let reply = |m: Message| Envelope::new(m, now_ms()).from_source("gateway").encode();
        match env.message {
            Message::Ack(Ack { seq }) => self.acked(worker_id, seq).await,
            Message::Heartbeat(hb) => {
                self.acked(worker_id, hb.ack_seq).await;
                if let Some(s) = self.sessions().get_mut(worker_id) {
                    s.gpu = hb.gpu;
                    s.last_renew = now;
                }
                let until = now + self.cfg.lease.as_millis() as u64;
                if let Err(e) = self.queue.renew(worker_id, until).await {
                    tracing::warn!(message = "lease renewal failed", error = %e);
                }
                let _ = sink
                    .send(reply(Message::HeartbeatAck(HeartbeatAck {
                        renewed_until: until,
                    })))
                    .await;
            }
            Message::Progress(p) => {
                let data = self.previews.progress(&p);
                if let Err(e) = self
                    .queue
                    .progress(&p.lease, Some(worker_id), data, now)
                    .await
                {
                    tracing::warn!(message = "progress not stored", error = %e);
                }
                self.publish();
            }
            Message::Preview(p) => self.preview(worker_id, p, now).await,
            Message::Result(r) => {
                if let Some(t) = r.timings.as_ref().filter(|t| !t.is_empty())
                    && let Err(e) = self
                        .queue
                        .record_worker_timings(&r.lease, Some(worker_id), t)
                        .await
                {
                    tracing::warn!(message = "worker timings not stored", error = %e);
                }
                let completion = match r.status {
                    ResultStatus::Ok => Completion::Ok(r.output.unwrap_or(serde_json::Value::Null)),
                    ResultStatus::Cancelled => Completion::Cancelled,
                    ResultStatus::Error => Completion::Error(r.error.unwrap_or(TaskError {
                        code: "unknown".into(),
                        message: "the worker reported an error without details".into(),
                        retryable: false,
                    })),
                };
                // The worker's slot is free once it sent the result, whether or not the store
                // takes it: the next tasks are reserved while the result is stored, and the
                // store commits both together.
                self.free_lease(worker_id, &r.lease);
                let (stored, ()) = tokio::join!(
                    self.queue.complete_as(worker_id, &r.lease, completion, now),
                    self.dispatch(worker_id)
                );
                let (accepted, reason) = match stored {
                    Ok(o) => (o.accepted, o.reason),
                    Err(e) => {
                        // Not acknowledged: the worker keeps it in its outbox and resends.
                        tracing::warn!(message = "result not stored", error = %e);
                        return None;
                    }
                };
                self.publish();
                let _ = sink
                    .send(reply(Message::ResultAck(ResultAck {
                        lease: r.lease,
                        accepted,
                        reason,
                    })))
                    .await;
            }
            Message::Reject(r) => {
                let res = if r.retryable {
                    // This worker is not offered the task again for the back-off.
                    let until = now.saturating_add(self.cfg.reject_backoff.as_millis() as u64);
                    self.queue
                        .reject(
                            &r.lease,
                            Some(worker_id),
                            &format!("rejected: {}", r.reason),
                            until,
                            now,
                        )
                        .await
                        .map(|_| ())
                } else {
                    let err = TaskError {
                        code: "rejected".into(),
                        message: r.reason,
                        retryable: false,
                    };
                    self.queue
                        .complete_as(worker_id, &r.lease, Completion::Error(err), now)
                        .await
                        .map(|_| ())
                };
                if let Err(e) = res {
                    tracing::warn!(message = "reject not stored", error = %e);
                }
                self.publish();
                self.free_lease(worker_id, &r.lease);
                self.dispatch(worker_id).await;
            }
            Message::Release(r) => {
                if let Err(e) = self
                    .queue
                    .release(&r.lease, Some(worker_id), "released by worker", now)
                    .await
                {
                    tracing::warn!(message = "release not stored", error = %e);
                }
                self.publish();
                self.free_lease(worker_id, &r.lease);
                self.wake_dispatch();
            }
            Message::Bye(b) => return Some(end(1000, format!("bye: {}", b.reason))),
            Message::Error => {
                tracing::warn!(message = "worker reported an error", worker_id = %worker_id, error = ?env.error, error_msg = ?env.error_msg);
                if env.error.as_deref() == Some("oversized") {
                    // The worker could not take the oldest unacked assign.
                    let refused = self.take_refused(worker_id);
                    self.assignments_failed(worker_id, refused).await;
                }
            }
            other => {
                let e = DecodeError::UnknownType(format!(
                    "{} is not sent by workers",
                    other.type_name()
                ));
                let _ = sink.send(Envelope::error_reply(&e, now).encode()).await;
            }
        }
        None
    }

    async fn touch(&self, worker_id: &str, now: u64, renew_leases: bool) {
        let renew = {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(worker_id) else {
                return;
            };
            s.last_seen = now;
            // Any frame renews the session's leases, at most twice per heartbeat interval.
            let due = renew_leases
                && now.saturating_sub(s.last_renew)
                    >= (self.cfg.heartbeat.as_millis() as u64 / 2).max(1);
            if due {
                s.last_renew = now;
            }
            due
        };
        if renew
            && let Err(e) = self
                .queue
                .renew(worker_id, now + self.cfg.lease.as_millis() as u64)
                .await
        {
            tracing::warn!(message = "lease renewal failed", error = %e);
        }
    }

    fn free_lease(&self, worker_id: &str, lease: &str) {
        self.previews.forget(lease);
        if let Some(s) = self.sessions().get_mut(worker_id) {
            s.inflight.remove(lease);
        }
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

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn end(code: u16, reason: String) -> SessionEnd {
    SessionEnd { code, reason }
}
