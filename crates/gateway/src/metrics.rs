//! Prometheus metrics, served as text on `GET /metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// A histogram family whose members share one set of buckets.
pub type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn wait_buckets() -> Histogram {
    // 5 ms to about 3 h.
    Histogram::new(exponential_buckets(0.005, 2.0, 22))
}

fn run_buckets() -> Histogram {
    // 10 ms to about 6 h.
    Histogram::new(exponential_buckets(0.01, 2.0, 22))
}

/// The `class` label of an upload attempt that succeeded.
pub(crate) const ATTEMPT_OK: &str = "ok";
/// Every `class` label value of `kiln_upload_attempts_total` (kiln-retry's class names).
pub(crate) const ATTEMPT_CLASSES: &[&str] = &[
    ATTEMPT_OK,
    "not_sent",
    "refused",
    "maybe_processed",
    "response",
    "permanent",
];

/// The gateway's metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Tasks by state and type (set from the queue at scrape time).
    pub tasks: Family<Labels, Gauge>,
    /// Tasks waiting to be dispatched.
    pub queue_depth: Gauge,
    /// Connected workers.
    pub workers_online: Gauge,
    /// Seconds from submission to the first assignment.
    pub dispatch_latency: Histogram,
    /// Seconds from assignment to the result.
    pub run_time: Histogram,
    /// Tasks submitted, by type.
    pub submitted: Family<Labels, Counter>,
    /// Retries of outbound calls (the S3 file storage's requests), by class.
    pub retries: Family<Labels, Counter>,
    /// Bytes accepted by `POST /v1/files`.
    pub bytes_uploaded: Counter,
    /// HTTP responses by status class.
    pub responses: Family<Labels, Counter>,
    /// Known workers by `state`: `online`, `draining`, `offline` (set at scrape time).
    pub workers: Family<Labels, Gauge>,
    /// Online, not draining workers per `task_type` they serve (set at scrape time).
    pub workers_serving: Family<Labels, Gauge>,
    /// Slots of online workers by `state`: `used`, `total` (set at scrape time).
    pub worker_slots: Family<Labels, Gauge>,
    /// 1 while dispatch is paused.
    pub queue_paused: Gauge,
    /// Tasks that ended, by `task_type` and `status`.
    pub completed: Family<Labels, Counter>,
    /// Tasks dead-lettered (failed after their last allowed attempt), by `task_type`.
    pub dead_lettered: Family<Labels, Counter>,
    /// Seconds tasks waited in the queue, by `task_type` (observed when a task ends).
    pub queue_wait: HistogramFamily,
    /// Seconds tasks ran on workers (all attempts), by `task_type`.
    pub task_run: HistogramFamily,
    /// Uploads through kiln-upload clients by `client` and `outcome` (`ok`, `failed`).
    pub uploads: Family<Labels, Counter>,
    /// Upload attempts (HTTP requests) by `client` and `class` (`ok` or kiln-retry's class).
    pub upload_attempts: Family<Labels, Counter>,
    /// Upload retries by `client` and the `class` of the failure retried.
    pub upload_retries: Family<Labels, Counter>,
    /// Connections opened by upload clients, by `client` and `protocol` (`h1`, `h2`).
    pub upload_connections: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("kiln");
        let tasks = Family::<Labels, Gauge>::default();
        r.register("tasks", "Tasks by state and type", tasks.clone());
        let queue_depth = Gauge::default();
        r.register(
            "queue_depth",
            "Tasks waiting to be dispatched",
            queue_depth.clone(),
        );
        let workers_online = Gauge::default();
        r.register(
            "workers_online",
            "Connected workers",
            workers_online.clone(),
        );
        let dispatch_latency = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        r.register(
            "dispatch_latency_seconds",
            "Time from submission to assignment",
            dispatch_latency.clone(),
        );
        let run_time = Histogram::new(exponential_buckets(0.01, 2.0, 20));
        r.register(
            "run_time_seconds",
            "Time from assignment to result",
            run_time.clone(),
        );
        let submitted = Family::<Labels, Counter>::default();
        r.register("tasks_submitted", "Tasks submitted", submitted.clone());
        let retries = Family::<Labels, Counter>::default();
        r.register(
            "retries",
            "Retries of outbound calls by class",
            retries.clone(),
        );
        let bytes_uploaded = Counter::default();
        r.register(
            "bytes_uploaded",
            "Bytes accepted by POST /v1/files",
            bytes_uploaded.clone(),
        );
        let responses = Family::<Labels, Counter>::default();
        r.register(
            "http_responses",
            "HTTP responses by status",
            responses.clone(),
        );
        let workers = Family::<Labels, Gauge>::default();
        r.register("workers", "Known workers by state", workers.clone());
        let workers_serving = Family::<Labels, Gauge>::default();
        r.register(
            "workers_serving",
            "Online, not draining workers per task type",
            workers_serving.clone(),
        );
        let worker_slots = Family::<Labels, Gauge>::default();
        r.register(
            "worker_slots",
            "Slots of online workers, used and total",
            worker_slots.clone(),
        );
        let queue_paused = Gauge::default();
        r.register(
            "queue_paused",
            "1 while dispatch is paused",
            queue_paused.clone(),
        );
        let completed = Family::<Labels, Counter>::default();
        r.register(
            "tasks_completed",
            "Tasks that ended, by type and status",
            completed.clone(),
        );
        let dead_lettered = Family::<Labels, Counter>::default();
        r.register(
            "tasks_dead_lettered",
            "Tasks failed after their last allowed attempt",
            dead_lettered.clone(),
        );
        let queue_wait = HistogramFamily::new_with_constructor(wait_buckets as fn() -> Histogram);
        r.register(
            "queue_wait_seconds",
            "Time tasks waited in the queue, by type",
            queue_wait.clone(),
        );
        let task_run = HistogramFamily::new_with_constructor(run_buckets as fn() -> Histogram);
        r.register(
            "task_run_seconds",
            "Time tasks ran on workers, by type",
            task_run.clone(),
        );
        let uploads = Family::<Labels, Counter>::default();
        r.register("uploads", "Uploads by client and outcome", uploads.clone());
        let upload_attempts = Family::<Labels, Counter>::default();
        r.register(
            "upload_attempts",
            "Upload HTTP requests by client and class",
            upload_attempts.clone(),
        );
        let upload_retries = Family::<Labels, Counter>::default();
        r.register(
            "upload_retries",
            "Upload retries by client and class",
            upload_retries.clone(),
        );
        let upload_connections = Family::<Labels, Counter>::default();
        r.register(
            "upload_connections",
            "Connections opened by upload clients",
            upload_connections.clone(),
        );
        for state in ["online", "draining", "offline"] {
            let _ = workers.get_or_create(&vec![("state", state.to_owned())]);
        }
        for state in ["used", "total"] {
            let _ = worker_slots.get_or_create(&vec![("state", state.to_owned())]);
        }
        let m = Self {
            registry: Mutex::new(r),
            workers,
            workers_serving,
            worker_slots,
            queue_paused,
            completed,
            dead_lettered,
            queue_wait,
            task_run,
            uploads,
            upload_attempts,
            upload_retries,
            upload_connections,
            tasks,
            queue_depth,
            workers_online,
            dispatch_latency,
            run_time,
            submitted,
            retries,
            bytes_uploaded,
            responses,
        };
        // The file storage's S3 client; zero while files are kept in a directory.
        m.register_upload_client("storage");
        m
    }

    /// Creates the upload series of `client` at zero, so rates and alerts see them before
    /// the first upload.
    pub(crate) fn register_upload_client(&self, client: &str) {
        for outcome in ["ok", "failed"] {
            let _ = self.uploads.get_or_create(&vec![
                ("client", client.to_owned()),
                ("outcome", outcome.to_owned()),
            ]);
        }
        for class in ATTEMPT_CLASSES.iter().filter(|c| **c != ATTEMPT_OK) {
            let _ = self.upload_retries.get_or_create(&vec![
                ("client", client.to_owned()),
                ("class", (*class).to_owned()),
            ]);
            let _ = self
                .retries
                .get_or_create(&vec![("class", (*class).to_owned())]);
        }
        for class in ATTEMPT_CLASSES {
            let _ = self.upload_attempts.get_or_create(&vec![
                ("client", client.to_owned()),
                ("class", (*class).to_owned()),
            ]);
        }
    }

    /// Records a task that ended: its status, whether it was dead-lettered, and how long it
    /// waited and ran (ms, when known).
    pub(crate) fn task_ended(
        &self,
        task_type: &str,
        status: &str,
        dead: bool,
        queued_ms: Option<u64>,
        run_ms: Option<u64>,
    ) {
        let tt = || vec![("task_type", task_type.to_owned())];
        self.completed
            .get_or_create(&vec![
                ("task_type", task_type.to_owned()),
                ("status", status.to_owned()),
            ])
            .inc();
        if dead {
            self.dead_lettered.get_or_create(&tt()).inc();
        }
        if let Some(ms) = queued_ms {
            let s = ms as f64 / 1000.0;
            self.queue_wait.get_or_create(&tt()).observe(s);
            self.dispatch_latency.observe(s);
        }
        if let Some(ms) = run_ms {
            let s = ms as f64 / 1000.0;
            self.task_run.get_or_create(&tt()).observe(s);
            self.run_time.observe(s);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}
