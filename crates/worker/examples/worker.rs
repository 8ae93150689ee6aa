//! A worker built on kiln-worker: serves `echo` (async) and `blur` (blocking) tasks,
//! reports progress, reconnects by itself when the gateway restarts.
//!
//! Run a server first (`cargo run --release -p kiln -- serve`), then:
//! `cargo run --example worker -- ws://127.0.0.1:8080/v1/workers/connect`
//! Stop with Ctrl-C (graceful: finishes or releases running tasks, then says bye).

use std::time::Duration;

use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:8080/v1/workers/connect".into());
    let worker = Worker::new(WorkerConfig {
        url,
        token: std::env::var("KILN_WORKER_TOKEN").ok(),
        state_dir: std::env::temp_dir().join("kiln-example-worker"),
        slots: 2,
        ..WorkerConfig::default()
    })
    .handler("echo", |ctx: TaskContext| async move {
        for step in 1..=5 {
            if ctx.is_cancelled() {
                return Err(TaskError::fatal("canceled", "canceled"));
            }
            ctx.progress("echoing", step, 5);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(json!({"echo": ctx.input}))
    })
    .blocking_handler("busy_loop", |ctx: TaskContext| {
        // CPU work on the blocking pool: the connection keeps heartbeating meanwhile.
        let n = ctx.input["n"].as_u64().unwrap_or(20_000_000);
        let mut x = 0u64;
        for i in 0..n {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        Ok(json!({"result": x}))
    });
    let handle = worker.handle();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        handle.shutdown();
    });
    worker.run().await?;
    Ok(())
}
