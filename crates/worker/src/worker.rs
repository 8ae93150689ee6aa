//! The worker: connection loop, task runner, heartbeats, reconnects.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kiln_protocol::messages::*;
use kiln_protocol::{Envelope, Message, close};
use kiln_retry::{BudgetConfig, Class, Decision, Failure, Jitter, RetryConfig, RetryPolicy};
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use crate::outbox::{Entry, Outbox};

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The gateway's worker endpoint. Default: `ws://127.0.0.1:8080/v1/workers/connect`.
    pub url: String,
    /// Worker token, sent as `Authorization: Bearer`. Default: none.
    pub token: Option<String>,
    /// Directory for the persisted worker id, the worker secret the gateway issued (file
    /// `worker_secret`, owner-only, fsync'd) and the result outbox. Default: `kiln-worker`.
    pub state_dir: PathBuf,
    /// Tasks run at once. Default: 1.
    pub slots: u32,
    /// Models this worker serves (routing): a task that names a model is assigned only to
    /// workers listing it; with none, the worker gets only tasks that name no model.
    /// Default: empty.
    pub models: Vec<String>,
    /// Labels (routing), e.g. `gpu=a100`: a task that asks for labels is assigned only to
    /// workers having all of them. Default: empty.
    pub labels: Vec<String>,
    /// Reconnect backoff. Default: full jitter from 1 s, doubling, capped at 60 s, forever.
    pub reconnect: RetryConfig,
    /// A connection up this long resets the backoff. Default: 60 s.
    pub reset_after: Duration,
    /// On shutdown or drain, wait this long for running tasks (and for the `result_ack` of
    /// finished ones) before releasing what still runs. Default: 30 s.
    pub shutdown_grace: Duration,
    /// Largest frame accepted from the gateway, bytes. A larger one (up to four times this)
    /// is read, refused with an `oversized` error envelope and the connection kept (the
    /// gateway counts a failed assignment); beyond that the connection fails. At least the
    /// gateway's `broker.max_frame_bytes`. Default: 16 MiB.
    pub max_frame_bytes: usize,
    /// Largest `result` frame sent, bytes; lowered to the gateway's
    /// `welcome.max_frame_bytes`. A result over it is not sent: the task fails with
    /// `result_too_large` (large outputs go through the files API). Default: 1 MiB (the
    /// gateway's default frame limit).
    pub max_result_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:8080/v1/workers/connect".into(),
            token: None,
            state_dir: PathBuf::from("kiln-worker"),
            slots: 1,
            models: Vec::new(),
            labels: Vec::new(),
            reconnect: RetryConfig {
                max_retries: u32::MAX,
                initial_backoff: Duration::from_secs(1),
                multiplier: 2.0,
                max_backoff: Duration::from_secs(60),
                deadline: None,
                jitter: Jitter::Full,
                budget: BudgetConfig {
                    enabled: false,
                    ..BudgetConfig::default()
                },
                ..RetryConfig::default()
            },
            reset_after: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            max_frame_bytes: 16 << 20,
            max_result_bytes: kiln_protocol::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The gateway refused the worker for good (bad token, unsupported version).
    #[error("gateway closed the connection with {code} ({reason}); not reconnecting")]
    Refused {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// The state directory is unusable.
    #[error("worker state directory: {0}")]
    State(#[from] std::io::Error),
    /// The configuration is invalid.
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

impl WorkerError {
    /// Whether running the worker again may succeed without a config change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WorkerError::State(_))
    }
}

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
    /// The model the task needs (one of [`WorkerConfig::models`]), if it names one.
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
}

type AsyncFn = dyn Fn(TaskContext) -> Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>
    + Send
    + Sync;
type BlockingFn = dyn Fn(TaskContext) -> Result<Value, TaskError> + Send + Sync;

#[derive(Clone)]
enum Handler {
    Async(Arc<AsyncFn>),
    Blocking(Arc<BlockingFn>),
}

struct Running {
    cancel: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    running: HashMap<String, Running>,
    finished: VecDeque<((String, u32), TaskResult)>,
    /// The largest result frame the gateway takes (see [`WorkerConfig::max_result_bytes`]).
    result_limit: usize,
}

/// Stops a running worker: it takes no new work, finishes or releases what it runs, says
/// `bye` and returns.
#[derive(Debug, Clone)]
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
}

impl WorkerHandle {
    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

/// A worker: configuration plus handlers per task type.
pub struct Worker {
    cfg: WorkerConfig,
    handlers: HashMap<String, Handler>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("cfg", &self.cfg)
            .field("task_types", &self.handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

const FINISHED_KEPT: usize = 1024;

impl Worker {
    /// A worker with no handlers yet.
    pub fn new(cfg: WorkerConfig) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            cfg,
            handlers: HashMap::new(),
            stop,
        }
    }

    /// Registers an async handler for `task_type`.
    pub fn handler<F, Fut>(mut self, task_type: &str, f: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, TaskError>> + Send + 'static,
    {
        self.handlers.insert(
            task_type.to_owned(),
            Handler::Async(Arc::new(move |c| Box::pin(f(c)))),
        );
        self
    }

    /// Registers a blocking handler for `task_type`; it runs on the blocking pool, so the
    /// connection keeps heartbeating while it computes.
    pub fn blocking_handler<F>(mut self, task_type: &str, f: F) -> Self
    where
        F: Fn(TaskContext) -> Result<Value, TaskError> + Send + Sync + 'static,
    {
        self.handlers
            .insert(task_type.to_owned(), Handler::Blocking(Arc::new(f)));
        self
    }

    /// A handle that shuts the worker down.
    pub fn handle(&self) -> WorkerHandle {
        WorkerHandle {
            stop: self.stop.clone(),
        }
    }

    /// Runs until shut down, drained, or refused by the gateway.
    pub async fn run(self) -> Result<(), WorkerError> {
        if self.handlers.is_empty() {
            return Err(WorkerError::Config("no handlers registered".into()));
        }
        tokio::fs::create_dir_all(&self.cfg.state_dir).await?;
        let worker_id = load_worker_id(&self.cfg.state_dir).await?;
        let mut secret = load_secret(&self.cfg.state_dir).await?;
        let boot_id = format!("boot_{}", uuid::Uuid::new_v4().simple());
        let outbox = Outbox::open(&self.cfg.state_dir).await?;
        let policy = RetryPolicy::new(self.cfg.reconnect.clone())
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        let mut backoff = policy.start("gateway", true);
        let state = Arc::new(Mutex::new(State {
            result_limit: self.cfg.max_result_bytes,
            ..State::default()
        }));
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let mut session: Option<(String, u64)> = None;
        let mut stop = self.stop.subscribe();
        tracing::info!(message = "worker starting", worker_id = %worker_id, boot_id = %boot_id, url = %self.cfg.url);
        loop {
            if *stop.borrow() && lock(&state).running.is_empty() {
                outbox.settle().await;
                return Ok(());
            }
            let started = Instant::now();
            let conn = Conn {
                w: &self,
                worker_id: &worker_id,
                boot_id: &boot_id,
                outbox: &outbox,
                state: &state,
                out_tx: &out_tx,
            };
            let ended = conn
                .run(&mut session, &mut secret, &mut out_rx, &mut stop)
                .await;
            let (code, reason) = match ended {
                Ended::Done => {
                    outbox.settle().await;
                    return Ok(());
                }
                Ended::Closed { code, reason } => (code, reason),
            };
            if !close::should_reconnect(code) {
                return Err(WorkerError::Refused { code, reason });
            }
            if code == close::REPLACED {
                session = None;
            }
            if started.elapsed() >= self.cfg.reset_after {
                backoff = policy.start("gateway", true);
            }
            let hint = close::retry_after_ms(&reason).map(Duration::from_millis);
            let mut failure = Failure::new(Class::NotSent);
            if let Some(h) = hint {
                failure = failure.with_pushback(h);
            }
            let delay = match backoff.on_failure(&failure, Duration::ZERO, false) {
                Decision::Retry { delay, .. } => delay,
                _ => {
                    backoff = policy.start("gateway", true);
                    self.cfg.reconnect.max_backoff
                }
            };
            tracing::info!(message = "reconnecting", code, reason = %reason, delay_ms = delay.as_millis() as u64);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

async fn load_worker_id(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("worker_id");
    match tokio::fs::read_to_string(&path).await {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        _ => {
            let id = format!("worker_{}", uuid::Uuid::new_v4().simple());
            tokio::fs::write(&path, &id).await?;
            Ok(id)
        }
    }
}

/// File in the state dir holding the secret the gateway issued to this worker id.
const SECRET_FILE: &str = "worker_secret";

async fn load_secret(dir: &std::path::Path) -> std::io::Result<Option<String>> {
    match tokio::fs::read_to_string(dir.join(SECRET_FILE)).await {
        Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the secret durably before the session goes on: a temporary file (owner-only),
/// fsync'd, renamed over the old one, and the directory fsync'd, so that a crash or power
/// loss right after leaves either no secret or the whole one, never a worker that the
/// gateway knows by a secret it lost.
async fn store_secret(dir: &std::path::Path, secret: &str) -> std::io::Result<()> {
    let (dir, secret) = (dir.to_owned(), secret.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let tmp = dir.join(format!("{SECRET_FILE}.tmp"));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, dir.join(SECRET_FILE))?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}

enum Ended {
    Done,
    Closed { code: u16, reason: String },
}

struct Conn<'a> {
    w: &'a Worker,
    worker_id: &'a str,
    boot_id: &'a str,
    outbox: &'a Outbox,
    state: &'a Arc<Mutex<State>>,
    out_tx: &'a mpsc::UnboundedSender<Message>,
}

fn frame(m: Message, source: &str) -> tungstenite::Message {
    tungstenite::Message::Text(
        Envelope::new(m, kiln_protocol::now_ms())
            .from_source(source)
            .encode()
            .into(),
    )
}

impl Conn<'_> {
    async fn run(
        &self,
        session: &mut Option<(String, u64)>,
        secret: &mut Option<String>,
        out_rx: &mut mpsc::UnboundedReceiver<Message>,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let closed = |code: u16, reason: String| Ended::Closed { code, reason };
        let mut req = match self.w.cfg.url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => return closed(close::AUTH, format!("bad url: {e}")),
        };
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            http_value(kiln_protocol::SUBPROTOCOL),
        );
        if let Some(t) = &self.w.cfg.token {
            req.headers_mut()
                .insert("Authorization", http_value(&format!("Bearer {t}")));
        }
        let mut ws = match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(req, Some(ws_config(&self.w.cfg)), true),
        )
        .await
        {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tungstenite::Error::Http(resp)))
                if resp.status() == 401 || resp.status() == 403 =>
            {
                return closed(close::AUTH, format!("gateway answered {}", resp.status()));
            }
            Ok(Err(e)) => return closed(1006, format!("connect failed: {e}")),
            Err(_) => return closed(1006, "connect timed out".into()),
        };
        let source = format!("worker:{}", self.worker_id);
        let inflight: Vec<String> = lock(self.state).running.keys().cloned().collect();
        let pending = self.outbox.all();
        let hello = Hello {
            worker_id: self.worker_id.to_owned(),
            boot_id: self.boot_id.to_owned(),
            capabilities: Capabilities {
                task_types: self.w.handlers.keys().cloned().collect(),
                models: self.w.cfg.models.clone(),
                labels: self.w.cfg.labels.clone(),
            },
            slots: self.w.cfg.slots,
            resume: session.as_ref().map(|(s, seq)| Resume {
                session: s.clone(),
                last_seq: *seq,
            }),
            inflight,
            outbox: pending.iter().map(|e| e.result.lease.clone()).collect(),
            worker_secret: secret.clone(),
        };
        if ws
            .send(frame(Message::Hello(hello), &source))
            .await
            .is_err()
        {
            return closed(1006, "send failed".into());
        }
        let welcome = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(tungstenite::Message::Text(t)))) => {
                match Envelope::decode(t.as_str(), usize::MAX) {
                    Ok(Envelope {
                        message: Message::Welcome(w),
                        ..
                    }) => w,
                    _ => return closed(close::PROTOCOL, "expected welcome".into()),
                }
            }
            Ok(Some(Ok(tungstenite::Message::Close(c)))) => {
                return c
                    .map(|c| closed(c.code.into(), c.reason.to_string()))
                    .unwrap_or_else(|| closed(1000, String::new()));
            }
            _ => return closed(1006, "no welcome".into()),
        };
        if let Some(issued) = &welcome.worker_secret {
            // Kept before anything else happens in the session: a later hello must prove it.
            if let Err(e) = store_secret(&self.w.cfg.state_dir, issued).await {
                tracing::error!(message = "cannot store the worker secret", error = %e);
                return closed(
                    close::IDENTITY,
                    format!("cannot store the worker secret: {e}"),
                );
            }
            *secret = Some(issued.clone());
        }
        if !welcome.resumed {
            *session = Some((welcome.session.clone(), 0));
        }
        let result_limit =
            crate::limits::result_limit(self.w.cfg.max_result_bytes, welcome.max_frame_bytes);
        {
            let mut s = lock(self.state);
            s.result_limit = result_limit;
            for lease in &welcome.drop {
                if let Some(r) = s.running.remove(lease) {
                    let _ = r.cancel.send(true);
                }
            }
        }
        tracing::info!(message = "connected", session = %welcome.session, resumed = welcome.resumed, keep = welcome.keep.len(), drop = welcome.drop.len());
        for mut e in pending {
            // An entry too large for the gateway (written before it said its limit, or by an
            // older version) is never resent as is: it becomes a `result_too_large` error.
            let fitted = crate::limits::fit_result(e.result.clone(), &source, result_limit);
            if fitted != e.result {
                e.result = fitted;
                if let Err(err) = self.outbox.put(&e).await {
                    tracing::error!(message = "outbox write failed", error = %err);
                }
            }
            if ws
                .send(frame(Message::Result(e.result), &source))
                .await
                .is_err()
            {
                return closed(1006, "send failed".into());
            }
        }
        let hb_ms = welcome.timers.heartbeat_ms.max(50);
        let mut draining = *stop.borrow();
        let mut drain_started: Option<Instant> = draining.then(Instant::now);
        let mut next_hb = tokio::time::Instant::now() + jitter(hb_ms);
        loop {
            if draining {
                let running = lock(self.state).running.len();
                let grace_over =
                    drain_started.is_some_and(|t| t.elapsed() >= self.w.cfg.shutdown_grace);
                // Finished results wait for their `result_ack` too (within the grace period),
                // so a graceful stop leaves nothing in the outbox to resend.
                if grace_over || (running == 0 && self.outbox.is_empty()) {
                    let leases: Vec<String> = lock(self.state)
                        .running
                        .drain()
                        .map(|(l, r)| {
                            let _ = r.cancel.send(true);
                            l
                        })
                        .collect();
                    for lease in leases {
                        let _ = ws
                            .send(frame(Message::Release(Release { lease }), &source))
                            .await;
                    }
                    let _ = ws
                        .send(frame(
                            Message::Bye(Bye {
                                reason: "shutting down".into(),
                            }),
                            &source,
                        ))
                        .await;
                    let _ = ws.close(None).await;
                    return Ended::Done;
                }
            }
            tokio::select! {
                msg = ws.next() => {
                    let text = match msg {
                        Some(Ok(tungstenite::Message::Text(t))) => t,
                        Some(Ok(tungstenite::Message::Close(c))) => {
                            return c.map(|c| closed(c.code.into(), c.reason.to_string())).unwrap_or_else(|| closed(1005, String::new()));
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return closed(1006, e.to_string()),
                        None => return closed(1006, "connection closed".into()),
                    };
                    let env = match Envelope::decode(text.as_str(), self.w.cfg.max_frame_bytes) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(message = "bad frame from gateway", error = %e);
                            // Every control message before it was acked on arrival, so the
                            // gateway takes the refused frame for its oldest unacked assign.
                            if matches!(e, kiln_protocol::DecodeError::Oversized { .. }) {
                                let reply = Envelope::error_reply(&e, kiln_protocol::now_ms()).from_source(&source);
                                let _ = ws.send(tungstenite::Message::Text(reply.encode().into())).await;
                            }
                            continue;
                        }
                    };
                    if let Some(seq) = env.message.seq()
                        && let Some((_, last)) = session.as_mut()
                    {
                        if seq <= *last {
                            continue; // replayed twice; already handled
                        }
                        *last = seq;
                    }
                    match env.message {
                        Message::Assign(a) => {
                            for t in a.tasks {
                                if draining {
                                    let _ = ws.send(frame(Message::Release(Release { lease: t.lease }), &source)).await;
                                    continue;
                                }
                                if let Some(r) = self.start(t) {
                                    let _ = ws.send(frame(r, &source)).await;
                                }
                            }
                            let _ = ws.send(frame(Message::Ack(Ack { seq: a.seq }), &source)).await;
                        }
                        Message::Cancel(c) => {
                            if let Some(r) = lock(self.state).running.get(&c.lease) {
                                let _ = r.cancel.send(true);
                            }
                            let _ = ws.send(frame(Message::Ack(Ack { seq: c.seq }), &source)).await;
                        }
                        Message::Drain(d) => {
                            draining = true;
                            drain_started.get_or_insert_with(Instant::now);
                            let _ = ws.send(frame(Message::Ack(Ack { seq: d.seq }), &source)).await;
                        }
                        Message::ResultAck(r) => {
                            if !r.accepted {
                                tracing::info!(message = "result not accepted", lease = %r.lease, reason = ?r.reason);
                            }
                            self.outbox.remove(&r.lease);
                        }
                        Message::HeartbeatAck(_) | Message::Welcome(_) => {}
                        Message::Error => tracing::warn!(message = "gateway reported an error", error = ?env.error, error_msg = ?env.error_msg),
                        other => tracing::debug!(message = "ignored frame", kind = other.type_name()),
                    }
                }
                out = out_rx.recv() => {
                    if let Some(m) = out
                        && ws.send(frame(m, &source)).await.is_err()
                    {
                        return closed(1006, "send failed".into());
                    }
                }
                _ = tokio::time::sleep_until(next_hb) => {
                    next_hb = tokio::time::Instant::now() + jitter(hb_ms);
                    let (inflight, free) = {
                        let s = lock(self.state);
                        (s.running.keys().cloned().collect::<Vec<_>>(), self.w.cfg.slots.saturating_sub(s.running.len() as u32))
                    };
                    let ack_seq = session.as_ref().map(|(_, s)| *s).unwrap_or(0);
                    if ws.send(frame(Message::Heartbeat(Heartbeat { ack_seq, inflight, free, gpu: None }), &source)).await.is_err() {
                        return closed(1006, "send failed".into());
                    }
                }
                _ = stop.changed(), if !draining => {
                    draining = true;
                    drain_started = Some(Instant::now());
                }
            }
        }
    }

    /// Starts a task, or returns a frame to send at once (a stored result, a reject).
    fn start(&self, t: TaskAssignment) -> Option<Message> {
        let mut s = lock(self.state);
        if s.running.contains_key(&t.lease) {
            return None;
        }
        if let Some((_, stored)) = s
            .finished
            .iter()
            .find(|((id, a), _)| *id == t.task_id && *a == t.attempt)
        {
            let mut r = stored.clone();
            r.lease = t.lease;
            return Some(Message::Result(r));
        }
        let Some(handler) = self.w.handlers.get(&t.task_type).cloned() else {
            return Some(Message::Reject(Reject {
                lease: t.lease,
                reason: format!("no handler for task type {}", t.task_type),
                retryable: false,
            }));
        };
        let (cancel_tx, cancel_rx) = watch::channel(false);
        s.running
            .insert(t.lease.clone(), Running { cancel: cancel_tx });
        drop(s);
        let ctx = TaskContext {
            task_id: t.task_id,
            attempt: t.attempt,
            lease: t.lease,
            task_type: t.task_type,
            request_id: t.request_id,
            deadline: t.deadline,
            model: t.model,
            input: t.input,
            out: self.out_tx.clone(),
            cancel: cancel_rx,
            timings: Arc::default(),
            previews: Arc::default(),
        };
        let timings = ctx.timings.clone();
        let state = self.state.clone();
        let outbox = self.outbox.clone();
        let out = self.out_tx.clone();
        let source = format!("worker:{}", self.worker_id);
        let span = tracing::info_span!("task", task_id = %ctx.task_id, task_type = %ctx.task_type, attempt = ctx.attempt);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let lease = ctx.lease.clone();
                let (task_id, attempt) = (ctx.task_id.clone(), ctx.attempt);
                let cancel = ctx.cancel.clone();
                let started = Instant::now();
                tracing::info!(message = "task started", task_id = %task_id, attempt, task_type = %ctx.task_type);
                let res = match handler {
                    Handler::Async(f) => f(ctx).await,
                    Handler::Blocking(f) => tokio::task::spawn_blocking(move || f(ctx))
                        .await
                        .unwrap_or_else(|e| {
                            Err(TaskError {
                                code: "handler_panicked".into(),
                                message: e.to_string(),
                                retryable: false,
                            })
                        }),
                };
                let cancelled = *cancel.borrow();
                let timings = Some(std::mem::take(
                    &mut *timings.lock().unwrap_or_else(|p| p.into_inner()),
                ))
                .filter(|t| !t.is_empty());
                let mut result = match res {
                    Ok(v) => TaskResult {
                        lease: lease.clone(),
                        status: ResultStatus::Ok,
                        output: Some(v),
                        error: None,
                        usage: None,
                        timings: None,
                    },
                    Err(_) if cancelled => TaskResult {
                        lease: lease.clone(),
                        status: ResultStatus::Cancelled,
                        output: None,
                        error: None,
                        usage: None,
                        timings: None,
                    },
                    Err(e) => TaskResult {
                        lease: lease.clone(),
                        status: ResultStatus::Error,
                        output: None,
                        error: Some(e),
                        usage: None,
                        timings: None,
                    },
                };
                result.timings = timings;
                let limit = lock(&state).result_limit;
                let result = crate::limits::fit_result(result, &source, limit);
                let entry = Entry {
                    task_id: task_id.clone(),
                    attempt,
                    result: result.clone(),
                };
                if let Err(e) = outbox.put(&entry).await {
                    tracing::error!(message = "outbox write failed", error = %e);
                }
                {
                    let mut s = lock(&state);
                    s.running.remove(&lease);
                    s.finished
                        .push_back(((task_id.clone(), attempt), result.clone()));
                    while s.finished.len() > FINISHED_KEPT {
                        s.finished.pop_front();
                    }
                }
                tracing::info!(message = "task finished", task_id = %task_id, attempt, status = ?result.status, run_ms = started.elapsed().as_millis() as u64);
                let _ = out.send(Message::Result(result));
            },
            span,
        ));
        None
    }
}

/// The WebSocket's read limits: frames up to four times `max_frame_bytes` are read (and
/// refused when over it); larger ones fail the connection.
fn ws_config(cfg: &WorkerConfig) -> tungstenite::protocol::WebSocketConfig {
    let hard = Some(cfg.max_frame_bytes.saturating_mul(4));
    tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(hard)
        .max_frame_size(hard)
}

fn http_value(s: &str) -> tungstenite::http::HeaderValue {
    tungstenite::http::HeaderValue::from_str(s)
        .unwrap_or_else(|_| tungstenite::http::HeaderValue::from_static(""))
}

fn jitter(ms: u64) -> Duration {
    let spread = (ms / 5).max(1);
    let j = rand::rng().random_range(0..=2 * spread);
    Duration::from_millis(ms - spread + j)
}
