//! The OpenAI-compatible images API (`/v1/images/generations`, `/v1/images/edits`,
//! `/v1/models`) on top of kiln's durable tasks, and the upstream provider client that
//! forwards work to another OpenAI-compatible image API.

mod body;
mod config;
mod error;
mod fetch;
pub(crate) mod images;
mod ip_ranges;
pub(crate) mod models;
mod params;
mod provider;
mod references;
mod stream;

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};

pub use config::{
    ImageUrlConfig, ModelConfig, OpenAiConfig, ProviderConfig, ProviderKind, ReferenceMode,
    ResponseFormat, RunsOn,
};
pub(crate) use error::OpenAiError;
pub use fetch::FetchError;
pub use provider::{
    Attempt, Call, Image, OpenAiCompatible, Output, ProviderError, attempts_json, summary,
};
pub use references::{
    FallbackConfig, JsonBase64Config, MultipartConfig, PutConfig, ReferenceUploadConfig,
    S3TargetConfig, Secret, SendAs, SkippedTarget, TargetConfig, UploadRecord,
};

use crate::AppState;

/// The routes, with a time limit that covers the longest wait.
pub(crate) fn routes(state: &AppState) -> Router<AppState> {
    if !state.config().openai.enabled {
        return Router::new();
    }
    let limit = state.config().openai.max_wait + state.config().request_timeout;
    Router::new()
        .route("/v1/images/generations", post(images::generations))
        .route("/v1/images/edits", post(images::edits))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::get_one))
        .layer(axum::middleware::from_fn_with_state(
            limit.max(Duration::from_secs(1)),
            crate::time_limit,
        ))
}
