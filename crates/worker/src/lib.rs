//! kiln-worker: the SDK a GPU box embeds to take tasks from a kiln gateway over the
//! `kiln.v1` WebSocket protocol.
//!
//! The worker connects out (NAT-friendly), registers its task types and slots, runs each
//! assigned task in its handler (blocking handlers on the blocking pool, so the socket keeps
//! heartbeating), reports progress, and keeps every result in an on-disk outbox until the
//! gateway acknowledges it. It reconnects with jittered backoff and resumes its session, so
//! a network blip causes no redelivery.
//!
//! ```no_run
//! use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
//!
//! # async fn run() -> Result<(), kiln_worker::WorkerError> {
//! let worker = Worker::new(WorkerConfig {
//!     url: "ws://127.0.0.1:8080/v1/workers/connect".into(),
//!     state_dir: "./worker-state".into(),
//!     slots: 1,
//!     ..WorkerConfig::default()
//! })
//! .blocking_handler("upscale", |ctx: TaskContext| {
//!     ctx.progress("upscaling", 1, 2);
//!     // A coarse look at the result so far (a real handler sends a small PNG or JPEG).
//!     let _ = ctx.preview(b"\x89PNG\r\n\x1a\n", "image/png");
//!     Ok::<_, TaskError>(serde_json::json!({"done": true}))
//! });
//! worker.run().await
//! # }
//! ```

mod limits;
mod outbox;
mod preview;
mod worker;

pub use kiln_protocol::messages::TaskError;
pub use preview::PreviewError;
pub use worker::{TaskContext, Worker, WorkerConfig, WorkerError, WorkerHandle};
