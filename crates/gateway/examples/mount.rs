//! kiln's API mounted inside a host axum app: the host keeps its own routes, fallback and
//! metrics endpoint; kiln's API lives under `/kiln`, its health routes are left out, and
//! its metrics join the host's Prometheus registry.
//!
//! `cargo run -p kiln-gateway --example mount` submits a task through the host app and
//! prints the answer, whose `Location` keeps the `/kiln` prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::Request;
use axum::routing::get;
use http_body_util::BodyExt as _;
use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, api_router};
use prometheus_client::registry::Registry;
use tower_service::Service as _;

/// The host's state: its registry (kiln's families included) and kiln's state.
#[derive(Clone)]
struct Host {
    registry: Arc<Mutex<Registry>>,
    kiln: AppState,
}

/// The host's `/metrics`: its own registry, kiln's gauges refreshed first.
async fn metrics(State(host): State<Host>) -> String {
    host.kiln.refresh_metrics().await;
    let mut out = String::new();
    let registry = host.registry.lock().unwrap();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

/// The host app: its own routes and fallback, kiln's API nested under `/kiln`.
fn host_app(kiln: AppState) -> Router {
    let mut registry = Registry::default();
    kiln.metrics().register_into(&mut registry);
    let host = Host {
        registry: Arc::new(Mutex::new(registry)),
        kiln: kiln.clone(),
    };
    Router::new()
        .route("/", get(|| async { "the host app" }))
        .route("/metrics", get(metrics))
        .with_state(host)
        .nest("/kiln", api_router(kiln))
        .fallback(|| async { "not a host route" })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue, BrokerConfig::default());
    let config = GatewayConfig {
        files_dir: dir.path().join("files"),
        // No worker is connected in this example: accept the task anyway.
        queue_unknown_task_types: true,
        ..GatewayConfig::default()
    };
    let state = AppState::new(config, broker).await.unwrap();
    let mut app = host_app(state);

    let req = Request::post("/kiln/v1/tasks")
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"task_type": "txt2img", "input": {"prompt": "a lighthouse"}}"#,
        ))
        .unwrap();
    let resp = app.call(req).await.unwrap();
    println!("POST /kiln/v1/tasks -> {}", resp.status());
    println!("Location: {:?}", resp.headers()["location"]);

    let resp = app
        .call(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    for line in text
        .lines()
        .filter(|l| l.starts_with("kiln_tasks_submitted"))
    {
        println!("host /metrics: {line}");
    }

    let resp = app
        .call(Request::get("/elsewhere").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    println!("GET /elsewhere -> {}", String::from_utf8_lossy(&text));
}
