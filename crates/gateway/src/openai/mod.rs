//! The OpenAI-compatible images API (`/v1/images/generations`, `/v1/images/edits`,
//! `/v1/models`) on top of kiln's durable tasks. Models may run on workers or on an upstream
//! provider; the gateway only names a provider model's task type, which a provider worker
//! serves.

mod body;
mod config;
mod error;
pub(crate) mod images;
pub(crate) mod models;
mod params;
mod stream;

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};

pub use config::{
    ImageUrlConfig, ModelConfig, OpenAiConfig, ProviderRoute, ResponseFormat, RunsOn,
    provider_task_type,
};
pub(crate) use error::OpenAiError;

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
