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
    /// Webhook delivery attempts by `result`: `delivered`, `failed` (a retry is
    /// scheduled), `exhausted` (the schedule is spent), `disabled` (410 Gone), `refused`
    /// (the address policy refused the URL).
    pub webhook_deliveries: Family<Labels, Counter>,
    /// Webhook messages waiting for delivery (set at scrape time).
    pub webhook_pending: Gauge,
}

/// Every `result` label value of `kiln_webhook_deliveries_total`.
pub(crate) const WEBHOOK_RESULTS: [&str; 5] =
    ["delivered", "failed", "exhausted", "disabled", "refused"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates every family, registered in the gateway's own registry (prefix `kiln`,
    /// rendered by [`Metrics::render`] on `GET /metrics`).
    pub fn new() -> Self {
        let workers = Family::<Labels, Gauge>::default();
        for state in ["online", "draining", "offline"] {
            let _ = workers.get_or_create(&vec![("state", state.to_owned())]);
        }
        let worker_slots = Family::<Labels, Gauge>::default();
        for state in ["used", "total"] {
            let _ = worker_slots.get_or_create(&vec![("state", state.to_owned())]);
        }
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("kiln")),
            workers,
            workers_serving: Family::default(),
            worker_slots,
            queue_paused: Gauge::default(),
            completed: Family::default(),
            dead_lettered: Family::default(),
            queue_wait: HistogramFamily::new_with_constructor(wait_buckets as fn() -> Histogram),
            task_run: HistogramFamily::new_with_constructor(run_buckets as fn() -> Histogram),
            uploads: Family::default(),
            upload_attempts: Family::default(),
            upload_retries: Family::default(),
            upload_connections: Family::default(),
            tasks: Family::default(),
            queue_depth: Gauge::default(),
            workers_online: Gauge::default(),
            dispatch_latency: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            run_time: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            submitted: Family::default(),
            retries: Family::default(),
            bytes_uploaded: Counter::default(),
            responses: Family::default(),
            webhook_deliveries: Family::default(),
            webhook_pending: Gauge::default(),
        };
        for result in WEBHOOK_RESULTS {
            let _ = m
                .webhook_deliveries
                .get_or_create(&vec![("result", result.to_owned())]);
        }
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            m.register_families(&mut r);
        }
        // The file storage's S3 client; zero while files are kept in a directory.
        m.register_upload_client("storage");
        m
    }

    /// Registers every family also in `registry` (a host app's), under the prefix `kiln`,
    /// so one scrape of the host's endpoint carries kiln's series (`kiln_tasks_submitted_total`,
    /// …). The series are shared with the gateway's own registry: both read the same
    /// counters. The gauges set at scrape time (tasks by state, workers, queue depth) are
    /// current after [`AppState::refresh_metrics`](crate::AppState::refresh_metrics).
    pub fn register_into(&self, registry: &mut Registry) {
        self.register_families(registry.sub_registry_with_prefix("kiln"));
    }

    fn register_families(&self, r: &mut Registry) {
        r.register("tasks", "Tasks by state and type", self.tasks.clone());
        r.register(
            "queue_depth",
            "Tasks waiting to be dispatched",
            self.queue_depth.clone(),
        );
        r.register(
            "workers_online",
            "Connected workers",
            self.workers_online.clone(),
        );
        r.register(
            "dispatch_latency_seconds",
            "Time from submission to assignment",
            self.dispatch_latency.clone(),
        );
        r.register(
            "run_time_seconds",
            "Time from assignment to result",
            self.run_time.clone(),
        );
        r.register("tasks_submitted", "Tasks submitted", self.submitted.clone());
        r.register(
            "retries",
            "Retries of outbound calls by class",
            self.retries.clone(),
        );
        r.register(
            "bytes_uploaded",
            "Bytes accepted by POST /v1/files",
            self.bytes_uploaded.clone(),
        );
        r.register(
            "http_responses",
            "HTTP responses by status",
            self.responses.clone(),
        );
        r.register("workers", "Known workers by state", self.workers.clone());
        r.register(
            "workers_serving",
            "Online, not draining workers per task type",
            self.workers_serving.clone(),
        );
        r.register(
            "worker_slots",
            "Slots of online workers, used and total",
            self.worker_slots.clone(),
        );
        r.register(
            "queue_paused",
            "1 while dispatch is paused",
            self.queue_paused.clone(),
        );
        r.register(
            "tasks_completed",
            "Tasks that ended, by type and status",
            self.completed.clone(),
        );
        r.register(
            "tasks_dead_lettered",
            "Tasks failed after their last allowed attempt",
            self.dead_lettered.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time tasks waited in the queue, by type",
            self.queue_wait.clone(),
        );
        r.register(
            "task_run_seconds",
            "Time tasks ran on workers, by type",
            self.task_run.clone(),
        );
        r.register(
            "uploads",
            "Uploads by client and outcome",
            self.uploads.clone(),
        );
        r.register(
            "upload_attempts",
            "Upload HTTP requests by client and class",
            self.upload_attempts.clone(),
        );
        r.register(
            "upload_retries",
            "Upload retries by client and class",
            self.upload_retries.clone(),
        );
        r.register(
            "upload_connections",
            "Connections opened by upload clients",
            self.upload_connections.clone(),
        );
        r.register(
            "webhook_deliveries",
            "Webhook delivery attempts by result",
            self.webhook_deliveries.clone(),
        );
        r.register(
            "webhook_pending",
            "Webhook messages waiting for delivery",
            self.webhook_pending.clone(),
        );
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

    /// The text exposition of the gateway's own registry.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}
