//! `POST /v1/files` and `GET /v1/files/{id}`.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::store::FileMeta;

/// Image types `POST /v1/files` accepts.
pub(crate) const IMAGE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/webp", "image/gif"];

/// Optional compression of an uploaded image.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct UploadParams {
    /// Compress the image to fit this many bytes (JPEG out).
    max_bytes: Option<usize>,
    /// Compress so the long side is at most this many pixels.
    max_dim: Option<u32>,
}

/// A stored file.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct FileObject {
    id: String,
    url: String,
    content_type: String,
    bytes: u64,
    width: Option<u32>,
    height: Option<u32>,
    sha256: String,
    created_at: u64,
}

impl FileObject {
    pub(crate) fn new(meta: FileMeta, base: Option<&str>) -> Self {
        Self {
            url: file_url(base, &meta.id),
            id: meta.id,
            content_type: meta.content_type,
            bytes: meta.bytes,
            width: meta.width,
            height: meta.height,
            sha256: meta.sha256,
            created_at: meta.created_at,
        }
    }
}

pub(crate) fn file_url(base: Option<&str>, id: &str) -> String {
    match base {
        Some(b) => format!("{}/v1/files/{id}", b.trim_end_matches('/')),
        None => format!("/v1/files/{id}"),
    }
}

/// Upload a file: multipart with a `file` field, or a raw body with its Content-Type.
#[utoipa::path(
    post, path = "/v1/files", tag = "files",
    params(UploadParams),
    request_body(content_type = "multipart/form-data", description = "multipart with a `file` field, or the raw image with its Content-Type"),
    responses(
        (status = 201, body = FileObject),
        (status = 400, description = "malformed request"),
        (status = 413, description = "too large"),
        (status = 415, description = "not an image type kiln accepts"),
        (status = 422, description = "invalid parameter or undecodable image"),
    )
)]
pub(crate) async fn upload(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<UploadParams>,
    req: Request,
) -> Result<Response, ApiError> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (data, ctype) = if ctype.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::malformed(e.body_text()))?;
        let mut found = None;
        while let Some(field) = mp
            .next_field()
            .await
            .map_err(|e| multipart_error(e.status(), e.body_text()))?
        {
            if field.name() == Some("file") {
                let ct = field.content_type().unwrap_or("").to_ascii_lowercase();
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| multipart_error(e.status(), e.body_text()))?;
                found = Some((bytes, ct));
                break;
            }
        }
        found.ok_or_else(|| ApiError::invalid("multipart body has no `file` field"))?
    } else {
        let bytes = Bytes::from_request(req, &state).await?;
        (bytes, ctype)
    };
    let meta = store_image(&state, data, &ctype, params.max_bytes, params.max_dim).await?;
    let location = file_url(None, &meta.id);
    let obj = FileObject::new(meta, state.config().public_base_url.as_deref());
    let mut resp = (StatusCode::CREATED, ApiJson(obj)).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

fn multipart_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large("file exceeds the configured body limit")
    } else {
        ApiError::malformed(format!("malformed multipart body: {text}"))
    }
}

/// Validates, optionally compresses (off the runtime), and stores an image.
pub(crate) async fn store_image(
    state: &AppState,
    data: Bytes,
    content_type: &str,
    max_bytes: Option<usize>,
    max_dim: Option<u32>,
) -> Result<FileMeta, ApiError> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let ct = if ct == "image/jpg" { "image/jpeg" } else { ct };
    if !IMAGE_TYPES.contains(&ct) {
        return Err(ApiError::unsupported_type(format!(
            "content type {ct:?} is not accepted; send one of {}",
            IMAGE_TYPES.join(", ")
        )));
    }
    if data.is_empty() {
        return Err(ApiError::invalid("the file is empty"));
    }
    if max_bytes == Some(0) || max_dim == Some(0) {
        return Err(ApiError::invalid(
            "max_bytes and max_dim must be above zero",
        ));
    }
    let (bytes, ct, dims, compress_ms) =
        state.images().prepare(data, ct, max_bytes, max_dim).await?;
    let len = bytes.len() as u64;
    let meta = state
        .files()
        .put(bytes, &ct, dims, compress_ms)
        .await
        .map_err(storage_error)?;
    state.metrics().bytes_uploaded.inc_by(len);
    tracing::info!(message = "file stored", file_id = %meta.id, bytes = len, backend = state.files().backend().as_str(), compress_ms, store_ms = meta.store_ms);
    Ok(meta)
}

/// A storage failure as an API error: 503 when a retry may help, 500 otherwise.
pub(crate) fn storage_error(e: crate::StorageError) -> ApiError {
    if e.is_retryable() {
        tracing::warn!(message = "file storage failed", error = %e);
        ApiError::unavailable("the file storage is unavailable; retry later")
    } else {
        ApiError::internal(e)
    }
}

/// Download a file.
#[utoipa::path(
    get, path = "/v1/files/{id}", tag = "files",
    params(("id" = String, Path, description = "file id")),
    responses((status = 200, description = "the file's bytes"), (status = 404, description = "unknown id"))
)]
pub(crate) async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Some((meta, content)) = state
        .files()
        .open_content(&id)
        .await
        .map_err(storage_error)?
    else {
        return Err(ApiError::not_found(format!("no file {id}")));
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = meta.content_type.parse() {
        headers.insert(header::CONTENT_TYPE, v);
    }
    headers.insert(header::CONTENT_LENGTH, meta.bytes.into());
    if let Ok(v) = format!("\"{}\"", meta.sha256).parse() {
        headers.insert(header::ETAG, v);
    }
    if let Ok(v) = "private, max-age=31536000, immutable".parse() {
        headers.insert(header::CACHE_CONTROL, v);
    }
    let file_id = meta.id.clone();
    let content = content.inspect(move |r| {
        if let Err(e) = r {
            tracing::error!(message = "file download broke off", file_id = %file_id, error = %e);
        }
    });
    let body = Body::from_stream(content);
    Ok((headers, body).into_response())
}

/// Delete a file.
#[utoipa::path(
    delete, path = "/v1/files/{id}", tag = "files",
    params(("id" = String, Path, description = "file id")),
    responses((status = 204, description = "deleted"), (status = 404, description = "unknown id"))
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.files().delete(&id).await.map_err(storage_error)? {
        tracing::info!(message = "file deleted", file_id = %id);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no file {id}")))
    }
}
