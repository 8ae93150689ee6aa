//! Prometheus metrics, served as text on `GET /metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

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
        Self {
            registry: Mutex::new(r),
            tasks,
            queue_depth,
            workers_online,
            dispatch_latency,
            run_time,
            submitted,
            retries,
            bytes_uploaded,
            responses,
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
