//! The gateway's real router in process, rebuilt (new state, new store) every
//! [`REBUILD_EVERY`] inputs so that what the inputs store does not pile up. A rebuild happens
//! only in [`begin`], at the start of an input, never between two requests of one input (a
//! rebuild between an upload and its `DELETE` would lose the file the upload stored).

use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt as _;
use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, router};
use tower_service::Service as _;

const REBUILD_EVERY: u64 = 5_000;

struct Gw {
    rt: tokio::runtime::Runtime,
    app: Mutex<(axum::Router, tempfile::TempDir, u64)>,
}

fn build(rt: &tokio::runtime::Runtime) -> (axum::Router, tempfile::TempDir, u64) {
    // In memory when there is a tmpfs: every stored file is a write and an fsync.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("a temporary directory");
    let app = rt.block_on(async {
        let queue = Arc::new(SqliteQueue::in_memory(3).expect("an in-memory queue"));
        let broker = Broker::with_queue(queue, BrokerConfig::default());
        let mut config = GatewayConfig {
            files_dir: dir.path().join("files"),
            queue_unknown_task_types: true,
            ..GatewayConfig::default()
        };
        // No network: `image_url` references over http(s) are refused, not fetched.
        config.openai.image_urls.enabled = false;
        let state = AppState::new(config, broker).await.expect("the gateway state");
        router(state)
    });
    (app, dir, 0)
}

fn gw() -> &'static Gw {
    static GW: OnceLock<Gw> = OnceLock::new();
    GW.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let app = Mutex::new(build(&rt));
        Gw { rt, app }
    })
}

/// Starts one fuzz input: counts it, and rebuilds the gateway every [`REBUILD_EVERY`] inputs.
pub fn begin() {
    let gw = gw();
    let mut guard = gw.app.lock().unwrap_or_else(|p| p.into_inner());
    guard.2 += 1;
    if guard.2 > REBUILD_EVERY {
        *guard = build(&gw.rt);
        guard.2 = 1;
    }
}

/// Sends one request to the router; the status and the body, which must be JSON.
pub fn send(req: Request<Body>) -> (u16, serde_json::Value) {
    let gw = gw();
    let mut app = gw.app.lock().unwrap_or_else(|p| p.into_inner()).0.clone();
    gw.rt.block_on(async move {
        let resp = app.call(req).await.expect("the router is infallible");
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("an in-memory body")
            .to_bytes();
        // A 204 (a deleted file) has no body.
        if body.is_empty() && status == 204 {
            return (status, serde_json::Value::Null);
        }
        let v = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("{status} answer is not JSON ({e}): {:?}", String::from_utf8_lossy(&body))
        });
        (status, v)
    })
}
