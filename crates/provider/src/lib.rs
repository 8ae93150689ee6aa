//! kiln-provider: runs kiln tasks on upstream OpenAI-compatible image APIs.
//!
//! [`OpenAiCompatible`] is the upstream client: generations and edits through kiln-upload's
//! pooled client under kiln-retry's policy, every attempt recorded, a call that may have
//! reached the upstream replayed only with an idempotency header, result URLs downloaded
//! with SSRF checks. With `references = "upload"` the references of an edit are first
//! uploaded to a kiln-upload target ([`TargetConfig`]) and named by URL or id.
//!
//! [`worker`] builds a [`kiln_worker::Worker`] whose handlers run the tasks of each
//! configured provider (task type [`task_type`]`(name)`, `openai.<name>`): reference images
//! are read from and results stored with the worker's files client ([`kiln_worker::Files`]),
//! and a call is marked before it is sent so that a later attempt of a task that may have
//! reached the upstream fails instead of paying twice.
//!
//! ```no_run
//! use std::collections::BTreeMap;
//!
//! use kiln_provider::ProviderConfig;
//! use kiln_worker::WorkerConfig;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut providers = BTreeMap::new();
//! providers.insert(
//!     "acme".to_owned(),
//!     ProviderConfig {
//!         base_url: "https://api.acme.example/v1".into(),
//!         api_key: Some("sk-...".into()),
//!         ..ProviderConfig::default()
//!     },
//! );
//! let worker = kiln_provider::worker(
//!     WorkerConfig {
//!         url: "ws://127.0.0.1:8080/v1/workers/connect".into(),
//!         token: Some("worker-token".into()),
//!         state_dir: "./provider-worker".into(),
//!         labels: vec!["provider".into()],
//!         ..WorkerConfig::default()
//!     },
//!     &providers,
//! )?;
//! assert_eq!(kiln_provider::task_type("acme"), "openai.acme");
//! worker.run().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Code map: `config` (settings), `client` (the upstream call), `error` (failures and the
//! attempt log), `references` (upload targets), `runner` (the worker and its handlers).

mod client;
mod config;
mod error;
mod references;
mod runner;

pub use client::{Call, Image, OpenAiCompatible, Output};
pub use config::{ProviderConfig, ProviderKind, ReferenceMode, ResponseFormat, task_type};
pub use error::{Attempt, ProviderError, attempts_json, summary};
pub use kiln_upload::FetchError;
pub use references::{
    FallbackConfig, JsonBase64Config, MultipartConfig, PutConfig, ReferenceUploadConfig,
    S3TargetConfig, Secret, SendAs, SkippedTarget, TargetConfig, UploadRecord,
};
pub use runner::worker;
