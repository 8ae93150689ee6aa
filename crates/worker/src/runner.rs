//! [`Worker`]: handlers per task type, the reconnect loop around one connection at a time,
//! and running each assigned task off the connection's loop (blocking handlers on the
//! blocking pool), its result stored in the outbox before it is sent.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::Message;
use kiln_protocol::close;
use kiln_protocol::messages::{
    GpuStats, Reject, ResultStatus, TaskAssignment, TaskError, TaskResult,
};
use kiln_retry::{Class, Decision, Failure, RetryPolicy};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::config::WorkerConfig;
use crate::connection::{Conn, Ended, Resume};
use crate::context::TaskContext;
use crate::outbox::{Entry, Outbox};

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

type AsyncFn = dyn Fn(TaskContext) -> Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>
    + Send
    + Sync;
type BlockingFn = dyn Fn(TaskContext) -> Result<Value, TaskError> + Send + Sync;
/// The embedder's GPU statistics hook (see [`Worker::gpu_stats`]).
pub(crate) type GpuFn = dyn Fn() -> Option<GpuStats> + Send + Sync;

#[derive(Clone)]
enum Handler {
    Async(Arc<AsyncFn>),
    Blocking(Arc<BlockingFn>),
}

pub(crate) struct Running {
    pub(crate) cancel: watch::Sender<bool>,
}

/// What the connections and the running tasks share.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) running: HashMap<String, Running>,
    finished: VecDeque<((String, u32), TaskResult)>,
    /// The largest result frame the gateway takes (see [`WorkerConfig::max_result_bytes`]).
    pub(crate) result_limit: usize,
}

pub(crate) fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Results kept after they are sent, so that a replayed assignment of the same attempt is
/// answered with the stored result instead of running again.
const FINISHED_KEPT: usize = 1024;

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
    gpu: Option<Arc<GpuFn>>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("cfg", &self.cfg)
            .field("task_types", &self.handlers.keys().collect::<Vec<_>>())
            .field("gpu_stats", &self.gpu.is_some())
            .finish()
    }
}

impl Worker {
    /// A worker with no handlers yet.
    pub fn new(cfg: WorkerConfig) -> Self {
        let (stop, _) = watch::channel(false);
        Self {
            cfg,
            handlers: HashMap::new(),
            gpu: None,
            stop,
        }
    }

    /// The worker's configuration (for example to build a [`crate::Files`] client with
    /// the same gateway, token and state directory).
    pub fn config(&self) -> &WorkerConfig {
        &self.cfg
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

    /// Sets the GPU statistics hook: every heartbeat carries what it returns as `gpu`
    /// (the gateway shows it per worker). It is called on the connection's task at each
    /// heartbeat, so it must return quickly: sample the GPU elsewhere and return the
    /// latest values. Without a hook, or when it returns `None`, heartbeats carry no `gpu`.
    pub fn gpu_stats<F>(mut self, f: F) -> Self
    where
        F: Fn() -> Option<GpuStats> + Send + Sync + 'static,
    {
        self.gpu = Some(Arc::new(f));
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
        self.cfg.validate().map_err(WorkerError::Config)?;
        let policy = RetryPolicy::new(self.cfg.reconnect.clone())
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        let mut stop = self.stop.subscribe();
        let (shared, mut resume, mut out_rx) = Shared::open(self).await?;
        let mut backoff = policy.start("gateway", true);
        tracing::info!(message = "worker starting", worker_id = %shared.worker_id, boot_id = %shared.boot_id, url = %shared.cfg.url);
        loop {
            if *stop.borrow() && lock(&shared.state).running.is_empty() {
                shared.outbox.settle().await;
                return Ok(());
            }
            let started = Instant::now();
            let conn = Conn { w: &shared };
            let (code, reason) = match conn.run(&mut resume, &mut out_rx, &mut stop).await {
                Ended::Done => {
                    shared.outbox.settle().await;
                    return Ok(());
                }
                Ended::Closed { code, reason } => (code, reason),
            };
            if !close::should_reconnect(code) {
                return Err(WorkerError::Refused { code, reason });
            }
            if code == close::REPLACED {
                resume.session = None;
            }
            if started.elapsed() >= shared.cfg.reset_after {
                backoff = policy.start("gateway", true);
            }
            let failure = match close::retry_after_ms(&reason) {
                Some(ms) => Failure::new(Class::NotSent).with_pushback(Duration::from_millis(ms)),
                None => Failure::new(Class::NotSent),
            };
            let delay = match backoff.on_failure(&failure, Duration::ZERO, false) {
                Decision::Retry { delay, .. } => delay,
                _ => {
                    backoff = policy.start("gateway", true);
                    shared.cfg.reconnect.max_backoff
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

/// A running worker: its configuration, handlers, identity, outbox and running tasks,
/// shared by its connections (one at a time) and its tasks.
pub(crate) struct Shared {
    pub(crate) cfg: WorkerConfig,
    handlers: HashMap<String, Handler>,
    gpu: Option<Arc<GpuFn>>,
    pub(crate) worker_id: String,
    pub(crate) boot_id: String,
    /// `worker:<id>`, the `source` of every envelope sent.
    pub(crate) source: String,
    pub(crate) outbox: Outbox,
    pub(crate) state: Arc<Mutex<State>>,
    out_tx: mpsc::UnboundedSender<Message>,
    /// Kept so that the stop signal stays open while the worker runs (a closed one would
    /// read as a stop).
    _stop: watch::Sender<bool>,
}

impl Shared {
    /// Loads the identity and the outbox from the state directory.
    async fn open(
        w: Worker,
    ) -> Result<(Self, Resume, mpsc::UnboundedReceiver<Message>), WorkerError> {
        tokio::fs::create_dir_all(&w.cfg.state_dir).await?;
        let worker_id = load_worker_id(&w.cfg.state_dir).await?;
        let secret = crate::connection::load_secret(&w.cfg.state_dir).await?;
        let outbox = Outbox::open(&w.cfg.state_dir).await?;
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Message>();
        let state = Arc::new(Mutex::new(State {
            result_limit: w.cfg.max_result_bytes,
            ..State::default()
        }));
        let shared = Self {
            source: format!("worker:{worker_id}"),
            boot_id: format!("boot_{}", uuid::Uuid::new_v4().simple()),
            worker_id,
            cfg: w.cfg,
            handlers: w.handlers,
            gpu: w.gpu,
            outbox,
            state,
            out_tx,
            _stop: w.stop,
        };
        let resume = Resume {
            session: None,
            secret,
        };
        Ok((shared, resume, out_rx))
    }

    /// The task types this worker has handlers for.
    pub(crate) fn task_types(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// What the GPU statistics hook reports now, if one is set.
    pub(crate) fn gpu(&self) -> Option<GpuStats> {
        self.gpu.as_ref().and_then(|f| f())
    }

    /// Starts a task, or returns a frame to send at once (a stored result, a reject).
    pub(crate) fn start(&self, t: TaskAssignment) -> Option<Message> {
        let mut s = lock(&self.state);
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
        let Some(handler) = self.handlers.get(&t.task_type).cloned() else {
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
        let ctx = TaskContext::new(t, self.out_tx.clone(), cancel_rx);
        let job = Job {
            state: self.state.clone(),
            outbox: self.outbox.clone(),
            out: self.out_tx.clone(),
            source: self.source.clone(),
        };
        let span = tracing::info_span!("task", task_id = %ctx.task_id, task_type = %ctx.task_type, attempt = ctx.attempt);
        tokio::spawn(tracing::Instrument::instrument(job.run(handler, ctx), span));
        None
    }
}

/// Where a task's result goes: the outbox, the finished list, the connection.
struct Job {
    state: Arc<Mutex<State>>,
    outbox: Outbox,
    out: mpsc::UnboundedSender<Message>,
    source: String,
}

impl Job {
    async fn run(self, handler: Handler, ctx: TaskContext) {
        let lease = ctx.lease.clone();
        let (task_id, attempt) = (ctx.task_id.clone(), ctx.attempt);
        let done = ctx.clone();
        let started = Instant::now();
        tracing::info!(message = "task started", task_id = %task_id, attempt, task_type = %ctx.task_type);
        let res = match handler {
            Handler::Async(f) => f(ctx).await,
            Handler::Blocking(f) => tokio::task::spawn_blocking(move || f(ctx))
                .await
                .unwrap_or_else(|e| Err(TaskError::fatal("handler_panicked", e.to_string()))),
        };
        let mut result = outcome(lease.clone(), res, done.is_cancelled());
        result.timings = done.take_timings();
        let limit = lock(&self.state).result_limit;
        let result = crate::limits::fit_result(result, &self.source, limit);
        let entry = Entry {
            task_id: task_id.clone(),
            attempt,
            result: result.clone(),
        };
        if let Err(e) = self.outbox.put(&entry).await {
            tracing::error!(message = "outbox write failed", error = %e);
        }
        {
            let mut s = lock(&self.state);
            s.running.remove(&lease);
            s.finished
                .push_back(((task_id.clone(), attempt), result.clone()));
            while s.finished.len() > FINISHED_KEPT {
                s.finished.pop_front();
            }
        }
        tracing::info!(message = "task finished", task_id = %task_id, attempt, status = ?result.status, run_ms = started.elapsed().as_millis() as u64);
        let _ = self.out.send(Message::Result(result));
    }
}

/// The result of a handler's return: an error of a cancelled task is a cancel.
fn outcome(lease: String, res: Result<Value, TaskError>, cancelled: bool) -> TaskResult {
    let (status, output, error) = match res {
        Ok(v) => (ResultStatus::Ok, Some(v), None),
        Err(_) if cancelled => (ResultStatus::Cancelled, None, None),
        Err(e) => (ResultStatus::Error, None, Some(e)),
    };
    TaskResult {
        lease,
        status,
        output,
        error,
        usage: None,
        timings: None,
    }
}

async fn load_worker_id(dir: &Path) -> std::io::Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_of_a_cancelled_task_is_a_cancel() {
        let e = TaskError::fatal("x", "y");
        let r = outcome("l".into(), Err(e.clone()), false);
        assert_eq!((r.status, r.error), (ResultStatus::Error, Some(e.clone())));
        let r = outcome("l".into(), Err(e), true);
        assert_eq!((r.status, r.error), (ResultStatus::Cancelled, None));
        let r = outcome("l".into(), Ok(serde_json::json!(1)), true);
        assert_eq!(r.status, ResultStatus::Ok);
    }

    #[tokio::test]
    async fn the_worker_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_worker_id(dir.path()).await.unwrap();
        assert!(a.starts_with("worker_"));
        assert_eq!(load_worker_id(dir.path()).await.unwrap(), a);
    }

    #[tokio::test]
    async fn a_worker_without_handlers_or_with_bad_settings_does_not_start() {
        let e = Worker::new(WorkerConfig::default())
            .run()
            .await
            .unwrap_err();
        assert!(
            matches!(e, WorkerError::Config(_)) && !e.is_retryable(),
            "{e}"
        );
        let cfg = WorkerConfig {
            connect_timeout: Duration::ZERO,
            ..WorkerConfig::default()
        };
        let w = Worker::new(cfg).handler("t", |_| async { Ok(Value::Null) });
        let e = w.run().await.unwrap_err();
        assert!(e.to_string().contains("connect_timeout"), "{e}");
    }
}
