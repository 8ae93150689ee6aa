//! A gateway served on a loopback port, so that real `kiln-worker` workers connect to it
//! over TCP, while the test calls the same router in process.
#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use kiln_broker::{Broker, BrokerConfig, SqliteQueue};
use kiln_gateway::{AppState, GatewayConfig, router};
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::Value;
use tower_service::Service as _;

/// The gateway under test.
pub struct Gw {
    pub dir: tempfile::TempDir,
    pub state: AppState,
    pub app: axum::Router,
    pub addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A broker config with quick heartbeats, so that sessions notice a lost peer soon.
pub fn broker_config() -> BrokerConfig {
    BrokerConfig {
        heartbeat: Duration::from_millis(300),
        dead_after: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(100),
        ..BrokerConfig::default()
    }
}

/// Serves a gateway (in-memory queue, any task type accepted) on 127.0.0.1; `tweak`
/// changes its config first.
pub async fn serve(tweak: impl FnOnce(&mut GatewayConfig)) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(SqliteQueue::in_memory(3).unwrap());
    let broker = Broker::with_queue(queue, broker_config());
    let mut config = GatewayConfig {
        files_dir: dir.path().join("files"),
        queue_unknown_task_types: true,
        ..GatewayConfig::default()
    };
    tweak(&mut config);
    let state = AppState::new(config, broker).await.unwrap();
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = app.clone();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, served).await;
    });
    Gw {
        dir,
        state,
        app,
        addr,
        server,
    }
}

/// A response, read whole.
pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

impl Gw {
    /// The worker URL of this gateway.
    pub fn worker_url(&self) -> String {
        format!("ws://{}/v1/workers/connect", self.addr)
    }

    /// One request through the router, with `headers` and a JSON `body` (`Value::Null`:
    /// none).
    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> Resp {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let body = if body.is_null() {
            Body::empty()
        } else {
            b = b.header("content-type", "application/json");
            Body::from(body.to_string())
        };
        let resp = self.app.clone().call(b.body(body).unwrap()).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Resp { status, body }
    }

    /// `GET uri` as JSON, expecting 200.
    pub async fn get(&self, uri: &str) -> Value {
        let r = self.call("GET", uri, &[], Value::Null).await;
        assert_eq!(r.status, 200, "{uri}: {}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    /// Waits until `GET /v1/tasks/{id}` has `status`, at most `secs`.
    pub async fn wait_status(&self, id: &str, status: &str, secs: u64) -> Value {
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.get(&format!("/v1/tasks/{id}")).await;
            if t["status"] == status {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < until,
                "task {id} is {} after {secs} s, not {status}",
                t["status"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `n` workers are connected, at most 10 s.
    pub async fn wait_workers(&self, n: usize) {
        for _ in 0..200 {
            let up = self
                .state
                .broker()
                .workers()
                .iter()
                .filter(|w| w.connected)
                .count();
            if up == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{n} workers did not connect");
    }
}

/// A worker of `slots` slots serving `sleep`: it sleeps `input.ms` ms and answers
/// `{"slept": ms}`; with `input.fail_first` its first run of each task fails (fatally).
pub fn sleeper(url: String, dir: &Path, slots: u32) -> Worker {
    let mut wc = WorkerConfig {
        url,
        state_dir: dir.to_path_buf(),
        slots,
        ..WorkerConfig::default()
    };
    wc.reconnect.initial_backoff = Duration::from_millis(100);
    wc.reconnect.max_backoff = Duration::from_millis(300);
    Worker::new(wc).blocking_handler("sleep", |ctx: TaskContext| {
        if ctx.input["fail_first"] == true && ctx.attempt == 1 {
            return Err(TaskError::fatal(
                "first_run",
                "the first run of this task fails",
            ));
        }
        let ms = ctx.input["ms"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(serde_json::json!({ "slept": ms }))
    })
}
