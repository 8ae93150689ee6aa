//! `POST /v1/files` and `GET /v1/files/{id}`.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::links::Links;
use crate::range::{self, Ranged};
use crate::sniff::{SNIFF_BYTES, Sniffed, sniff};
use crate::spool::Spool;
use crate::store::FileMeta;

/// Image types `POST /v1/files` checks (and compresses when asked); other types are
/// stored as sent.
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

/// Longest value of a form field other than `file`.
const FORM_TEXT_BYTES: usize = 1024;

impl UploadParams {
    /// The form fields a multipart upload takes besides `file`: the query's options.
    const FORM_FIELDS: &[&str] = &["file", "max_bytes", "max_dim"];

    /// Sets the option a form field names, as the query would; an option given both ways,
    /// a value that is no number and an unknown field are refused.
    fn set_form_field(&mut self, name: &str, value: String) -> Result<(), ApiError> {
        crate::params::check_fields([name], Self::FORM_FIELDS, crate::params::Place::Form)?;
        fn number<T: std::str::FromStr>(
            slot: &mut Option<T>,
            name: &str,
            value: &str,
        ) -> Result<(), ApiError> {
            if slot.is_some() {
                return Err(ApiError::invalid(format!(
                    "{name} is given twice (in the query or the form)"
                )));
            }
            let v = value.trim().parse().map_err(|_| {
                ApiError::invalid(format!("{name} must be a whole number, not {value:?}"))
            })?;
            *slot = Some(v);
            Ok(())
        }
        match name {
            "max_bytes" => number(&mut self.max_bytes, name, &value),
            "max_dim" => number(&mut self.max_dim, name, &value),
            _ => Err(ApiError::malformed(format!(
                "the form field {name:?} is not an option"
            ))),
        }
    }

    /// Refuses the image options for a file of type `ct`, which is no image.
    fn only_for_images(&self, ct: &str) -> Result<(), ApiError> {
        if self.max_bytes.is_some() || self.max_dim.is_some() {
            return Err(ApiError::invalid(format!(
                "max_bytes and max_dim apply to JPEG, PNG, WebP and GIF images; this file is {ct}"
            )));
        }
        Ok(())
    }
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
    pub(crate) fn new(meta: FileMeta, links: &Links) -> Self {
        Self {
            url: links.file(&meta.id),
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

/// Upload a file: the raw body with its Content-Type, or multipart with a `file` field.
/// Either way the body streams to the storage; the type is sniffed from the content.
/// The options (`max_bytes`, `max_dim`) go in the query or, in a multipart body, as form
/// fields; any other form field is `400 unknown_parameter`.
#[utoipa::path(
    post, path = "/v1/files", tag = "files",
    params(UploadParams),
    request_body(content_type = "application/octet-stream", description = "the raw file with its Content-Type (any type within `files.max_bytes`), or multipart/form-data with a `file` field and optionally `max_bytes` and `max_dim` fields"),
    responses(
        (status = 201, body = FileObject),
        (status = 400, description = "malformed request, or an unknown query parameter or form field"),
        (status = 413, description = "too large"),
        (status = 415, description = "a content type `files.allowed_types` does not allow"),
        (status = 422, description = "invalid parameter, empty file or undecodable image"),
    )
)]
pub(crate) async fn upload(
    State(state): State<AppState>,
    links: Links,
    ApiQuery(params): ApiQuery<UploadParams>,
    req: Request,
) -> Result<Response, ApiError> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let limit = state.config().files.max_bytes;
    let declared_len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let multipart = ctype.starts_with("multipart/form-data");
    // A multipart body carries its boundaries and part headers beside the file.
    let slack = if multipart { 64 << 10 } else { 0 };
    if declared_len.is_some_and(|n| n > limit.saturating_add(slack)) {
        return Err(too_large(limit));
    }
    let meta = if multipart {
        let mut mp = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::malformed(e.body_text()))?;
        let mut params = params;
        let mut found = None;
        // Options may come as form fields (`curl -F max_bytes=300000`), before or after the
        // file, which waits in memory or in the spool until the whole form is read.
        while let Some(field) = mp
            .next_field()
            .await
            .map_err(|e| multipart_error(e.status(), e.body_text(), limit))?
        {
            let name = field.name().unwrap_or("").to_owned();
            if name != "file" {
                params.set_form_field(&name, form_text(field, limit).await?)?;
                continue;
            }
            if found.is_some() {
                return Err(ApiError::malformed(
                    "the multipart body has more than one `file` field",
                ));
            }
            let ct = field.content_type().unwrap_or("").to_ascii_lowercase();
            let body = Box::pin(
                field.map(|r| r.map_err(|e| multipart_error(e.status(), e.body_text(), limit))),
            );
            found = Some(receive(&state, body, &ct, &params).await?);
        }
        let found = found.ok_or_else(|| ApiError::invalid("multipart body has no `file` field"))?;
        keep(&state, found, &params).await?
    } else {
        let body = Box::pin(
            req.into_body()
                .into_data_stream()
                .map(|r| r.map_err(|e| ApiError::malformed(format!("the upload broke off: {e}")))),
        );
        let received = receive(&state, body, &ctype, &params).await?;
        keep(&state, received, &params).await?
    };
    let location = links.file(&meta.id);
    let obj = FileObject::new(meta, &links);
    let mut resp = (StatusCode::CREATED, ApiJson(obj)).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::too_large(format!(
        "the file is larger than the limit of {limit} bytes"
    ))
}

/// An upload read in full, not yet stored.
enum Received {
    /// An image, in memory, to be checked (and compressed when asked) before it is stored.
    Image { data: Bytes, content_type: String },
    /// Anything else, in the spool.
    Other {
        spooled: crate::spool::Spooled,
        content_type: String,
    },
}

/// Reads an upload's first bytes, decides its type, then either gathers an image in memory
/// or streams anything else to the spool. `params` are the options known so far (a form
/// field after the file may add some; [`keep`] checks them all).
async fn receive(
    state: &AppState,
    mut body: impl futures_util::Stream<Item = Result<Bytes, ApiError>> + Unpin,
    declared: &str,
    params: &UploadParams,
) -> Result<Received, ApiError> {
    let cfg = &state.config().files;
    let mut head = BytesMut::new();
    let mut complete = false;
    while head.len() < SNIFF_BYTES {
        match body.next().await {
            Some(chunk) => head.extend_from_slice(&chunk?),
            None => {
                complete = true;
                break;
            }
        }
    }
    if head.len() as u64 > cfg.max_bytes {
        return Err(too_large(cfg.max_bytes));
    }
    if head.is_empty() {
        return Err(ApiError::invalid("the file is empty"));
    }
    let ct = content_type(declared, sniff(&head, complete))?;
    if !cfg.allows(&ct) {
        return Err(ApiError::unsupported_type(format!(
            "content type {ct:?} (read from the content) is not accepted; allowed: {}",
            cfg.allowed_types.join(", ")
        )));
    }
    if IMAGE_TYPES.contains(&ct.as_str()) {
        let limit = cfg
            .max_image_bytes
            .min(usize::try_from(cfg.max_bytes).unwrap_or(usize::MAX));
        let too_big = || {
            ApiError::too_large(format!(
                "images are checked in memory and may be at most {limit} bytes"
            ))
        };
        if head.len() > limit {
            return Err(too_big());
        }
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if head.len() + chunk.len() > limit {
                return Err(too_big());
            }
            head.extend_from_slice(&chunk);
        }
        return Ok(Received::Image {
            data: head.freeze(),
            content_type: ct,
        });
    }
    params.only_for_images(&ct)?;
    let mut spool = Spool::create(state.spool_dir())
        .await
        .map_err(|e| storage_error(e.into()))?;
    spool
        .write(&head)
        .await
        .map_err(|e| storage_error(e.into()))?;
    drop(head);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if spool.len() + chunk.len() as u64 > cfg.max_bytes {
            return Err(too_large(cfg.max_bytes));
        }
        spool
            .write(&chunk)
            .await
            .map_err(|e| storage_error(e.into()))?;
    }
    let spooled = spool.finish().await.map_err(|e| storage_error(e.into()))?;
    Ok(Received::Other {
        spooled,
        content_type: ct,
    })
}

/// Stores what [`receive`] read, with every option of the request.
async fn keep(
    state: &AppState,
    received: Received,
    params: &UploadParams,
) -> Result<FileMeta, ApiError> {
    let (spooled, ct) = match received {
        Received::Image { data, content_type } => {
            return store_image(state, data, &content_type, params.max_bytes, params.max_dim).await;
        }
        Received::Other {
            spooled,
            content_type,
        } => (spooled, content_type),
    };
    params.only_for_images(&ct)?;
    let len = spooled.bytes;
    let meta = state
        .files()
        .put_spooled(spooled, &ct)
        .await
        .map_err(storage_error)?;
    state.metrics().bytes_uploaded.inc_by(len);
    tracing::info!(message = "file stored", file_id = %meta.id, content_type = %ct, bytes = len, backend = state.files().backend().as_str(), store_ms = meta.store_ms);
    Ok(meta)
}

/// The value of a form field other than `file`, at most [`FORM_TEXT_BYTES`] bytes.
async fn form_text(
    mut field: axum::extract::multipart::Field<'_>,
    limit: u64,
) -> Result<String, ApiError> {
    let name = field.name().unwrap_or("").to_owned();
    let mut value = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| multipart_error(e.status(), e.body_text(), limit))?
    {
        if value.len() + chunk.len() > FORM_TEXT_BYTES {
            return Err(ApiError::invalid(format!(
                "the form field {name:?} is longer than {FORM_TEXT_BYTES} bytes"
            )));
        }
        value.extend_from_slice(&chunk);
    }
    String::from_utf8(value)
        .map_err(|_| ApiError::invalid(format!("the form field {name:?} is not UTF-8 text")))
}

/// The type recorded for an upload declared as `declared` whose first bytes sniffed as
/// `sniffed`. The content wins when the sniffer recognises it; otherwise the declared type
/// is kept, except that a declared image must be an image (422) and a declared text or
/// JSON type must be text (else `application/octet-stream`).
fn content_type(declared: &str, sniffed: Sniffed) -> Result<String, ApiError> {
    let d = declared.split(';').next().unwrap_or("").trim();
    let d = if d == "image/jpg" { "image/jpeg" } else { d };
    let generic = d.is_empty()
        || d == "application/octet-stream"
        || d.starts_with("multipart/")
        || !d.contains('/');
    let textual = d.starts_with("text/") || d.ends_with("json") || d.ends_with("+xml");
    match sniffed {
        Sniffed::Known(t) => Ok(t.to_owned()),
        _ if IMAGE_TYPES.contains(&d) => Err(ApiError::invalid(format!(
            "not a valid {d} image: the content is not a JPEG, PNG, WebP or GIF image"
        ))),
        Sniffed::Json if generic => Ok("application/json".to_owned()),
        Sniffed::Text if generic => Ok("text/plain".to_owned()),
        Sniffed::Json | Sniffed::Text => Ok(d.to_owned()),
        Sniffed::Binary if generic || textual => Ok("application/octet-stream".to_owned()),
        Sniffed::Binary => Ok(d.to_owned()),
    }
}

fn multipart_error(status: StatusCode, text: String, limit: u64) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
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

/// Download a file, or one byte range of it (`Range: bytes=a-b`, `a-`, `-n`).
#[utoipa::path(
    get, path = "/v1/files/{id}", tag = "files",
    params(("id" = String, Path, description = "file id")),
    responses(
        (status = 200, description = "the file's bytes"),
        (status = 206, description = "the requested range, with Content-Range"),
        (status = 404, description = "unknown id"),
        (status = 416, description = "the range lies outside the file"),
    )
)]
pub(crate) async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req_headers: HeaderMap,
) -> Result<Response, ApiError> {
    let missing = || ApiError::not_found(format!("no file {id}"));
    let meta = state
        .files()
        .meta(&id)
        .await
        .map_err(storage_error)?
        .ok_or_else(missing)?;
    let etag = format!("\"{}\"", meta.sha256);
    let header_str = |name: header::HeaderName| req_headers.get(name).and_then(|v| v.to_str().ok());
    let ranged = range::parse(
        header_str(header::RANGE),
        header_str(header::IF_RANGE),
        &etag,
        meta.bytes,
    );
    let mut headers = HeaderMap::new();
    if let Ok(v) = meta.content_type.parse() {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = etag.parse() {
        headers.insert(header::ETAG, v);
    }
    headers.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    if active_content(&meta.content_type) {
        // Uploaded HTML or SVG must not run scripts with the API's origin.
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            header::HeaderValue::from_static("sandbox"),
        );
    }
    if let Ok(v) = "private, max-age=31536000, immutable".parse() {
        headers.insert(header::CACHE_CONTROL, v);
    }
    let (status, start, len) = match ranged {
        Ranged::Full => (StatusCode::OK, 0, meta.bytes),
        Ranged::Part { start, end } => {
            if let Ok(v) = format!("bytes {start}-{end}/{}", meta.bytes).parse() {
                headers.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        Ranged::Unsatisfiable => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the range lies outside the file of {} bytes", meta.bytes),
            )
            .into_response();
            if let Ok(v) = format!("bytes */{}", meta.bytes).parse() {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    headers.insert(header::CONTENT_LENGTH, len.into());
    let content = state
        .files()
        .open_range(&meta, start, len)
        .await
        .map_err(storage_error)?
        .ok_or_else(missing)?;
    let file_id = meta.id.clone();
    let content = content.inspect(move |r| {
        if let Err(e) = r {
            tracing::error!(message = "file download broke off", file_id = %file_id, error = %e);
        }
    });
    Ok((status, headers, Body::from_stream(content)).into_response())
}

/// Types a browser would run scripts in.
fn active_content(ct: &str) -> bool {
    ct.contains("html") || ct.contains("xml") || ct.contains("javascript")
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
