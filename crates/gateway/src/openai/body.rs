//! Request bodies of the OpenAI routes: JSON only, within the body limit, every refusal in
//! OpenAI's error shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};

use super::error::OpenAiError;
use crate::AppState;

/// The body of a JSON request: `Content-Type: application/json` (else 415), at most the
/// configured body limit (else 413).
pub(super) async fn json_body(state: &AppState, req: Request) -> Result<Bytes, OpenAiError> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json {
        return Err(OpenAiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_content_type",
            "this route takes JSON: send Content-Type: application/json",
        ));
    }
    Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            OpenAiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body exceeds the configured limit",
            )
        } else {
            OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text())
        }
    })
}
