//! Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;

/// An error of the OpenAI-compatible routes.
#[derive(Debug)]
pub(crate) struct OpenAiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) param: Option<std::borrow::Cow<'static, str>>,
    pub(crate) code: String,
    pub(crate) retry_after: Option<u64>,
}

impl OpenAiError {
    pub(crate) fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_value".into(),
            retry_after: None,
        }
    }

    pub(crate) fn new(
        status: StatusCode,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: code.into(),
            retry_after: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        // kiln's 422 (a field is invalid) is OpenAI's 400.
        let status = if e.status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            e.status
        };
        Self {
            status,
            message: e.message,
            param: None,
            code: e.code.to_owned(),
            retry_after: e.retry_after.map(|d| d.as_secs().max(1)),
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = %self.code, message = %self.message, "images request failed");
        } else {
            tracing::info!(status = self.status.as_u16(), code = %self.code, message = %self.message, "images request rejected");
        }
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}
