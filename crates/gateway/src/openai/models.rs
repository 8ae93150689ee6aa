//! `GET /v1/models` and `GET /v1/models/{id}`: the configured models and where they run.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::config::{ModelConfig, RunsOn};
use super::error::OpenAiError;
use crate::AppState;

fn model_object(state: &AppState, name: &str, m: &ModelConfig) -> Value {
    let cfg = &state.config().openai;
    let runs = match m.runs_on {
        RunsOn::Provider => {
            let host = cfg
                .providers
                .get(&m.provider)
                .and_then(|p| p.base_url.parse::<axum::http::Uri>().ok())
                .and_then(|u| u.host().map(str::to_owned));
            json!({
                "runs_on": "provider",
                "provider": m.provider,
                "upstream_model": if m.upstream_model.is_empty() { name } else { &m.upstream_model },
                "upstream_host": host,
                "task_types": [super::provider_task_type(&m.provider)],
            })
        }
        _ => {
            let worker_model = m.worker_model(name);
            let online = state
                .broker()
                .workers()
                .into_iter()
                .filter(|w| {
                    w.connected
                        && [&m.generate_task_type, &m.edit_task_type]
                            .iter()
                            .any(|t| kiln_broker::serves(&w.capabilities, t, worker_model, &[]))
                })
                .count();
            json!({
                "runs_on": "workers",
                "task_types": [m.generate_task_type, m.edit_task_type],
                "worker_model": worker_model,
                "workers_online": online,
            })
        }
    };
    json!({
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": if m.runs_on == RunsOn::Provider { m.provider.as_str() } else { "kiln" },
        "kiln": runs,
    })
}

/// `GET /v1/models`.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, content_type = "application/json", description = "the configured models, OpenAI's list shape")))]
pub(crate) async fn list(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .config()
        .openai
        .models
        .iter()
        .map(|(name, m)| model_object(&state, name, m))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "model name")),
    responses((status = 200, content_type = "application/json", description = "the model"), (status = 404, description = "no such model")))]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    match state.config().openai.models.get(&id) {
        Some(m) => Ok(Json(model_object(&state, &id, m))),
        None => Err(OpenAiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("the model {id:?} does not exist here"),
        )),
    }
}
