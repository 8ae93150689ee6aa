//! kiln-worker: the SDK a GPU box embeds to take tasks from a kiln gateway over the
//! `kiln.v1` WebSocket protocol.
//!
//! The worker connects out (NAT-friendly), registers its task types and slots, runs each
//! assigned task in its handler (blocking handlers on the blocking pool, so the socket keeps
//! heartbeating), reports progress, and keeps every result in an on-disk outbox until the
//! gateway acknowledges it. It reconnects with jittered backoff and resumes its session, so
//! a network blip causes no redelivery. [`Files`] reads a task's input files and stores its
//! outputs through the gateway's files API.
//!
//! ```no_run
//! use kiln_worker::{Files, TaskContext, TaskError, Worker, WorkerConfig};
//!
//! # async fn run() -> Result<(), kiln_worker::WorkerError> {
//! let cfg = WorkerConfig {
//!     url: "ws://127.0.0.1:8080/v1/workers/connect".into(),
//!     state_dir: "./worker-state".into(),
//!     slots: 1,
//!     ..WorkerConfig::default()
//! };
//! let files = Files::new(&cfg);
//! let worker = Worker::new(cfg)
//!     .blocking_handler("upscale", |ctx: TaskContext| {
//!         ctx.progress("upscaling", 1, 2);
//!         // A coarse look at the result so far (a real handler sends a small PNG or JPEG).
//!         let _ = ctx.preview(b"\x89PNG\r\n\x1a\n", "image/png");
//!         if ctx.input["image"].is_null() {
//!             return Err(TaskError::fatal("invalid_input", "input.image is required"));
//!         }
//!         Ok(serde_json::json!({"done": true}))
//!     })
//!     .handler("store", move |ctx: TaskContext| {
//!         let files = files.clone();
//!         async move {
//!             let file = files.upload(ctx.input.to_string().into_bytes(), "application/json").await?;
//!             Ok::<_, TaskError>(serde_json::json!({"files": [file]}))
//!         }
//!     })
//!     .gpu_stats(|| None);
//! worker.run().await
//! # }
//! ```
//!
//! Code map: `config` (settings and defaults), `context` (what a handler gets), `connection`
//! (one socket session: hello, welcome, the read/write/heartbeat loop), `runner` (the
//! reconnect loop and running tasks), `outbox`, `limits` (result frame sizes), `files`.

mod config;
mod connection;
mod context;
mod files;
mod limits;
mod outbox;
mod preview;
mod runner;

pub use config::{DEFAULT_MAX_FRAME_BYTES, WorkerConfig};
pub use context::TaskContext;
pub use files::{DEFAULT_FILES_TIMEOUT, Deleted, Files, FilesError, UploadedFile};
pub use kiln_protocol::messages::{GpuStats, TaskError};
pub use preview::PreviewError;
pub use runner::{Worker, WorkerError, WorkerHandle};
