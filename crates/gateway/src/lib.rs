//! kiln-gateway: kiln's HTTP API as a library — a `Router` and its state, mountable in any
//! axum service.
//!
//! `POST /v1/tasks` answers at once with `202` and a task id (the task is already durable
//! in the queue), `GET /v1/tasks/{id}/events` streams progress as resumable SSE, workers
//! connect to `GET /v1/workers/connect` over the `kiln.v1` WebSocket protocol, and every
//! error is JSON: `{"error":{"code","message","retryable"}}`.
//!
//! [`router`] is the whole service (API, ops routes, a JSON 404 for anything else). A host
//! app mounts [`api_router`] (and [`ops_router`] if it wants `/healthz`, `/readyz`,
//! `/metrics`, `/openapi.json`), which set no fallback, so `merge` and `nest` never panic;
//! links the API returns keep the nest prefix (and `public_base_url` before it).
//!
//! ```
//! use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
//! use kiln_gateway::{AppState, GatewayConfig, api_router};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let dir = tempfile::tempdir().unwrap();
//! let queue = std::sync::Arc::new(SqliteQueue::in_memory(3).unwrap());
//! let broker = Broker::with_queue(queue, BrokerConfig::default());
//! let config = GatewayConfig { files_dir: dir.path().join("files"), ..GatewayConfig::default() };
//! let state = AppState::new(config, broker).await.unwrap();
//! // The host's own routes and fallback, kiln's API under /kiln.
//! let app: axum::Router = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "host" }))
//!     .nest("/kiln", api_router(state.clone()))
//!     .fallback(|| async { "host 404" });
//! // Or the whole service on its own: kiln_gateway::router(state).
//! # let _ = app;
//! # }
//! ```
//!
//! Features (all on by default): `openai` (the OpenAI images API and its upstream client),
//! `s3` (file storage in an S3-compatible bucket, through kiln-upload), `compress`
//! (compression of uploaded images through kiln-compress; without it images are still
//! decoded in full to be checked, and a compression request gets 422), `openapi`
//! (`/openapi.json`), `ui` (the operator console at `/ui/`), `webhooks` (the delivery loop
//! that sends the store's webhook outbox, through kiln-webhooks' HTTP sender).

mod auth;
mod batch;
mod config;
mod error;
mod eta;
mod events;
mod files;
mod health;
mod images;
pub mod limits;
mod links;
mod listing;
mod live;
mod metrics;
#[cfg(feature = "openai")]
pub mod openai;
#[cfg(feature = "openapi")]
mod openapi;
mod overview;
mod params;
mod policy;
mod previews;
mod range;
mod retry;
#[cfg(feature = "s3")]
mod s3store;
mod sniff;
mod spool;
mod storage;
mod store;
mod submit;
mod tasks;
mod timing;
#[cfg(feature = "ui")]
mod ui;
#[cfg(feature = "s3")]
mod upload_metrics;
mod webhooks;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kiln_broker::Broker;
use tokio::sync::watch;

pub use auth::{BadHash, Scope, SecretSet, hash_key, hash_secret};
pub use config::{FilesConfig, GatewayConfig, MetricsAccess};
pub use error::ApiError;
pub use kiln_broker::BrokerConfig;
pub use metrics::{HistogramFamily, Metrics};
#[cfg(feature = "s3")]
pub use s3store::S3Store;
pub use storage::{ContentStream, FileStorage, StorageBackend, StorageConfig, StorageError};
pub use store::{FileMeta, FileStore};
pub use webhooks::{ENDPOINT_EVENTS, EndpointConfig, WebhooksConfig};

/// The gateway's shared state.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: GatewayConfig,
    broker: Arc<Broker>,
    files: FileStorage,
    spool_dir: std::path::PathBuf,
    metrics: Metrics,
    images: images::ImagePrep,
    api_keys: SecretSet,
    worker_tokens: SecretSet,
    in_process_tokens: SecretSet,
    metrics_tokens: SecretSet,
    limiter: auth::RateLimiter,
    worker_limiter: auth::RateLimiter,
    shutdown: watch::Sender<bool>,
    spans: timing::TaskSpans,
    live: live::Hub,
    webhooks: webhooks::Delivery,
    run_times: eta::RunTimes,
}

/// Why the state could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A configured key hash is malformed.
    #[error("gateway config: {0}")]
    Hash(#[from] BadHash),
    /// The files directory cannot be created.
    #[error("gateway files directory: {0}")]
    Files(#[from] std::io::Error),
    /// The file storage cannot be opened (bad S3 settings, bucket creation failed).
    #[error("gateway file storage: {0}")]
    Storage(#[from] StorageError),
    /// The webhook settings are invalid (a malformed secret, a bad schedule or endpoint).
    #[error("gateway webhooks: {0}")]
    Webhooks(String),
}

impl AppState {
    /// Builds the state: opens the file store, parses key hashes.
    pub async fn new(config: GatewayConfig, broker: Arc<Broker>) -> Result<Self, StartError> {
        let api_keys = SecretSet::from_scoped_hashes(&config.api_key_hashes)?;
        let worker_tokens = SecretSet::from_hashes(&config.worker_token_hashes)?;
        let in_process_tokens = if worker_tokens.is_empty() && api_keys.is_empty() {
            SecretSet::default()
        } else {
            SecretSet::from_hashes(&config.in_process_worker_token_hashes)?
        };
        let metrics_tokens = SecretSet::from_hashes(&config.metrics_token_hashes)?;
        let metrics = Metrics::new();
        let files = FileStorage::open(&config, &metrics).await?;
        let spool_dir = config
            .files
            .spool_dir
            .clone()
            .unwrap_or_else(|| config.files_dir.join(".incoming"));
        spool::prepare(&spool_dir).await?;
        let limiter = auth::RateLimiter::new(config.rate_limit_per_minute, config.rate_limit_burst);
        let worker_limiter = auth::RateLimiter::new(
            config.worker_rate_limit_per_minute,
            config.worker_rate_limit_burst,
        );
        let (shutdown, _) = watch::channel(false);
        let webhooks = webhooks::Delivery::new(&config.webhooks).map_err(StartError::Webhooks)?;
        let events = broker.subscribe();
        let state = Self {
            inner: Arc::new(Inner {
                config,
                broker,
                files,
                spool_dir,
                metrics,
                images: images::ImagePrep::default(),
                api_keys,
                worker_tokens,
                in_process_tokens,
                metrics_tokens,
                limiter,
                worker_limiter,
                shutdown,
                spans: timing::TaskSpans::default(),
                live: live::Hub::default(),
                webhooks,
                run_times: eta::RunTimes::default(),
            }),
        };
        #[cfg(feature = "webhooks")]
        tokio::spawn(webhooks::run(
            Arc::downgrade(&state.inner),
            state.inner.broker.subscribe(),
        ));
        if webhooks::presence::wanted(&state) {
            let (live, _) = state.inner.live.resume(None);
            tokio::spawn(webhooks::presence::follow(
                Arc::downgrade(&state.inner),
                live,
            ));
        }
        tokio::spawn(live::run(
            Arc::downgrade(&state.inner),
            state.inner.broker.subscribe(),
        ));
        tokio::spawn(timing::follow(Arc::downgrade(&state.inner), events));
        Ok(state)
    }

    /// The settings.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }
    /// The broker.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.inner.broker
    }
    /// The file storage.
    pub fn files(&self) -> &FileStorage {
        &self.inner.files
    }
    /// The metrics. A host app registers them in its own registry with
    /// [`Metrics::register_into`] and calls [`AppState::refresh_metrics`] before each scrape.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Sets the gauges that are read at scrape time (tasks by state and type, queue depth,
    /// workers, slots, the pause flag); `GET /metrics` does this itself.
    pub async fn refresh_metrics(&self) {
        health::refresh(self).await;
    }
    pub(crate) fn run_times(&self) -> &eta::RunTimes {
        &self.inner.run_times
    }
    pub(crate) fn images(&self) -> &images::ImagePrep {
        &self.inner.images
    }
    /// Where uploads wait while they stream in.
    pub(crate) fn spool_dir(&self) -> &std::path::Path {
        &self.inner.spool_dir
    }

    /// Starts shutting down: readiness turns 503, SSE streams end, workers are drained.
    pub fn begin_shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        self.inner.broker.drain_all();
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    pub(crate) fn shutting_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }
}

/// The whole service: [`api_router`], [`ops_router`] and a JSON 404 for every other path.
/// A host app that has routes (or a fallback) of its own mounts the two routers instead.
pub fn router(state: AppState) -> Router {
    let routes = api_routes(&state).merge(ops_routes()).fallback(not_found);
    finish(&state, routes)
}

/// The API (`/v1/…`, and the operator console with feature `ui`) without a fallback, to
/// `merge` into or `nest` under a host router. Links the API returns carry the nest prefix
/// after `public_base_url`.
pub fn api_router(state: AppState) -> Router {
    finish(&state, api_routes(&state))
}

/// The operations routes without a fallback: `/healthz`, `/readyz`, `/metrics` and (feature
/// `openapi`) `/openapi.json`. A host app that has its own probes and metrics endpoint
/// leaves them out and registers [`Metrics`] in its own registry.
pub fn ops_router(state: AppState) -> Router {
    finish(&state, ops_routes())
}

/// The API routes, each under its time limit, behind the key check.
fn api_routes(state: &AppState) -> Router<AppState> {
    let timeout = state.config().request_timeout;
    // Ordinary requests: a time limit.
    let api = Router::new()
        .route("/v1/tasks", post(tasks::create).get(tasks::list))
        .route("/v1/tasks/batch", post(batch::create))
        .route("/v1/tasks/{id}", get(tasks::get_one))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v1/tasks/{id}/retry", post(retry::retry))
        .route("/v1/tasks/{id}/preview", get(previews::get_latest))
        .route("/v1/tasks/{id}/webhooks", get(webhooks::task_messages))
        .route("/v1/webhooks/messages/{id}/retry", post(webhooks::retry))
        .route("/v1/files/{id}", get(files::download).delete(files::delete))
        .route("/v1/workers", get(workers::list))
        .route("/v1/workers/{id}/drain", post(workers::drain))
        .route(
            "/v1/workers/{id}/identity",
            axum::routing::delete(workers::forget_identity),
        )
        .route("/v1/admin/queue/pause", post(workers::pause))
        .route("/v1/admin/queue/resume", post(workers::resume))
        .route("/v1/queue", get(overview::queue))
        .route("/v1/queue/throughput", get(overview::throughput))
        .layer(middleware::from_fn_with_state(timeout, time_limit));
    // Uploads: any size up to `files.max_bytes`, streamed, under their own time limit.
    let uploads = Router::new()
        .route("/v1/files", post(files::upload))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            state.config().files.upload_timeout,
            time_limit,
        ));
    // Long-lived: SSE and the worker socket.
    let streams = Router::new()
        .route("/v1/tasks/{id}/events", get(events::stream))
        .route("/v1/workers/connect", get(workers::connect))
        .route("/v1/events", get(overview::events));
    let app = Router::new().merge(api).merge(uploads).merge(streams);
    #[cfg(feature = "openai")]
    let app = app.merge(openai::routes(state));
    let app = app.layer(middleware::from_fn_with_state(state.clone(), auth::layer));
    // The operator console (feature `ui`): its page and assets need no key, its data does.
    #[cfg(feature = "ui")]
    let app = app.merge(ui::routes());
    app
}

/// `/healthz`, `/readyz`, `/metrics`, `/openapi.json`: no key check of their own (the
/// handlers decide who reads what).
fn ops_routes() -> Router<AppState> {
    let ops = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics));
    #[cfg(feature = "openapi")]
    let ops = ops.route("/openapi.json", get(openapi::serve));
    ops
}

/// The rules every route of the gateway keeps: JSON 405s, the body limit, `policy.rs`, JSON
/// errors, the response count and CORS.
fn finish(state: &AppState, routes: Router<AppState>) -> Router {
    let body_limit = state.config().max_body_bytes;
    let routes = routes.method_not_allowed_fallback(method_not_allowed);
    // Unknown query parameters are refused against the OpenAPI document's list per route.
    #[cfg(feature = "openapi")]
    let routes = routes.layer(middleware::from_fn(params::layer));
    let mut app = routes
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), policy::layer))
        .layer(middleware::from_fn(policy::json_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ));
    if !state.config().cors_origins.is_empty() {
        let origins: Vec<HeaderValue> = state
            .config()
            .cors_origins
            .iter()
            .filter_map(|o| o.parse().ok())
            .collect();
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST]),
        );
    }
    app.with_state(state.clone())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}

pub(crate) async fn time_limit(
    State(limit): State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError {
            retry_after: Some(Duration::from_secs(1)),
            ..ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!("the request took longer than {} ms", limit.as_millis()),
            )
        }
        .into_response(),
    }
}

async fn count_responses(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let class = format!("{}xx", resp.status().as_u16() / 100);
    state
        .metrics()
        .responses
        .get_or_create(&vec![("class", class)])
        .inc();
    resp
}
