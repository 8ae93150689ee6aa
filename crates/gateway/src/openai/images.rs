//! `POST /v1/images/generations` and `POST /v1/images/edits`: OpenAI's images API as thin
//! adapters over kiln tasks. Each call creates a durable task, waits on the broker's task
//! events (no polling) up to the wait limit, and maps the task's output files to `data[]`;
//! a task not done by then is answered with `202`, the task object and `Location`.
//! Edits take multipart files or, as OpenAI's JSON form, references by `image_url` (an
//! `http(s)` URL downloaded under the SSRF checks of `fetch.rs`, or a `data:` URL) or
//! `file_id` (a kiln file).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use kiln_broker::{NewTask, Task};
use kiln_protocol::TaskState;
use kiln_upload::{FetchPolicy, fetch_image};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use super::body::json_body;
use super::config::{ModelConfig, ResponseFormat, RunsOn, provider_task_type};
use super::error::OpenAiError;
use crate::AppState;
use crate::files::store_image;
use crate::links::Links;
use crate::params::{EDIT_FIELDS, GENERATION_FIELDS, Place, check_fields};
use crate::submit::{Repeat, Submission, SubmitError};
use crate::tasks::load;

/// Most reference images of one edit.
pub(crate) const MAX_IMAGES: usize = 16;
/// Longest prompt, in characters.
const MAX_PROMPT: usize = 32_000;
/// Smallest and largest side of a requested `size`.
const SIDES: std::ops::RangeInclusive<u32> = 16..=4096;

/// The fields common to generations and edits, validated.
#[derive(Debug)]
struct Call {
    model_name: String,
    model: ModelConfig,
    prompt: String,
    n: u32,
    size: Option<(u32, u32)>,
    size_text: Option<String>,
    response_format: ResponseFormat,
    /// Passed through to the worker or upstream as given.
    extras: Map<String, Value>,
    /// `quality`, `output_format`, `stream`, ... validated.
    opts: super::params::ImageOptions,
}

fn text<'a>(
    fields: &'a Map<String, Value>,
    key: &'static str,
) -> Result<Option<&'a str>, OpenAiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(OpenAiError::invalid(
            key,
            format!("`{key}` must be a string"),
        )),
    }
}

fn parse_size(s: &str) -> Result<Option<(u32, u32)>, OpenAiError> {
    if s == "auto" {
        return Ok(None);
    }
    let bad = || {
        OpenAiError::invalid(
            "size",
            format!(
                "size {s:?} is not `auto` or WIDTHxHEIGHT with sides from {} to {}",
                SIDES.start(),
                SIDES.end()
            ),
        )
    };
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (w, h): (u32, u32) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if !SIDES.contains(&w) || !SIDES.contains(&h) {
        return Err(bad());
    }
    Ok(Some((w, h)))
}

impl Call {
    fn parse(state: &AppState, fields: &Map<String, Value>) -> Result<Self, OpenAiError> {
        let cfg = &state.config().openai;
        let prompt = text(fields, "prompt")?
            .filter(|p| !p.trim().is_empty())
            .ok_or_else(|| OpenAiError::invalid("prompt", "`prompt` is required"))?;
        if prompt.chars().count() > MAX_PROMPT {
            return Err(OpenAiError::invalid(
                "prompt",
                format!("`prompt` is longer than {MAX_PROMPT} characters"),
            ));
        }
        let model_name = text(fields, "model")?
            .or(Some(cfg.default_model.as_str()).filter(|m| !m.is_empty()))
            .ok_or_else(|| OpenAiError::invalid("model", "`model` is required"))?
            .to_owned();
        let model = cfg.models.get(&model_name).cloned().ok_or_else(|| {
            let known: Vec<&str> = cfg.models.keys().map(String::as_str).collect();
            OpenAiError {
                code: "model_not_found".into(),
                ..OpenAiError::invalid(
                    "model",
                    format!(
                        "the model {model_name:?} does not exist here; models: {}",
                        known.join(", ")
                    ),
                )
            }
        })?;
        let n = match fields.get("n") {
            None | Some(Value::Null) => 1,
            Some(Value::Number(x)) => x.as_u64().unwrap_or(0),
            Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
            Some(_) => 0,
        };
        if !(1..=u64::from(cfg.max_n)).contains(&n) {
            return Err(OpenAiError::invalid(
                "n",
                format!("`n` must be an integer from 1 to {}", cfg.max_n),
            ));
        }
        let size_text = text(fields, "size")?.map(str::to_owned);
        let size = match &size_text {
            Some(s) => parse_size(s)?,
            None => None,
        };
        let response_format = match text(fields, "response_format")? {
            None => cfg.default_response_format,
            Some("url") => ResponseFormat::Url,
            Some("b64_json") => ResponseFormat::B64Json,
            Some(other) => {
                return Err(OpenAiError::invalid(
                    "response_format",
                    format!("response_format {other:?} is not `url` or `b64_json`"),
                ));
            }
        };
        let (opts, extras) = super::params::parse(fields)?;
        Ok(Self {
            opts,
            model_name,
            model,
            prompt: prompt.to_owned(),
            n: n as u32,
            size,
            size_text,
            response_format,
            extras,
        })
    }

    /// The task type and input for this call; `refs` are the stored reference images (and
    /// mask) of an edit.
    fn task(&self, edit: Option<(&[String], Option<&str>)>) -> (String, Value) {
        let mut input = self.extras.clone();
        input.insert("prompt".into(), self.prompt.clone().into());
        input.insert("n".into(), self.n.into());
        let task_type = match self.model.runs_on {
            RunsOn::Provider => {
                let upstream = if self.model.upstream_model.is_empty() {
                    &self.model_name
                } else {
                    &self.model.upstream_model
                };
                input.insert("model".into(), upstream.clone().into());
                let op = if edit.is_some() { "edit" } else { "generate" };
                input.insert("operation".into(), op.into());
                if let Some(s) = &self.size_text {
                    input.insert("size".into(), s.clone().into());
                }
                provider_task_type(&self.model.provider)
            }
            _ => {
                input.insert("model".into(), self.model_name.clone().into());
                if let Some((w, h)) = self.size {
                    input.insert("width".into(), w.into());
                    input.insert("height".into(), h.into());
                }
                if edit.is_some() {
                    self.model.edit_task_type.clone()
                } else {
                    self.model.generate_task_type.clone()
                }
            }
        };
        if let Some((images, mask)) = edit {
            if let Some(first) = images.first() {
                input.insert("image".into(), first.clone().into());
            }
            input.insert("images".into(), json!(images));
            if let Some(m) = mask {
                input.insert("mask".into(), m.into());
            }
        }
        (task_type, Value::Object(input))
    }
}

/// How long to wait, from `Prefer` (`respond-async`, `wait=N`).
fn wait_limit(headers: &HeaderMap, state: &AppState) -> Duration {
    let cfg = &state.config().openai;
    let mut wait = cfg.sync_wait;
    for token in headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .map(str::trim)
    {
        if token.eq_ignore_ascii_case("respond-async") {
            return Duration::ZERO;
        }
        if let Some(n) = token
            .strip_prefix("wait=")
            .and_then(|n| n.trim().parse::<u64>().ok())
        {
            wait = Duration::from_secs(n);
        }
    }
    wait.min(cfg.max_wait)
}

/// The `X-Kiln-Webhook` header: where the task's `task.completed` message goes.
fn webhook_header(headers: &HeaderMap) -> Result<Option<String>, OpenAiError> {
    let Some(v) = headers.get("x-kiln-webhook") else {
        return Ok(None);
    };
    let url = v.to_str().map_err(|_| {
        OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_webhook",
            "X-Kiln-Webhook: not ASCII",
        )
    })?;
    crate::webhooks::check_url("X-Kiln-Webhook", url)
        .map_err(|m| OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_webhook", m))?;
    Ok(Some(url.to_owned()))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, OpenAiError> {
    match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(k)) if !k.is_empty() && k.len() <= 200 => Ok(Some(format!("openai:{k}"))),
        Some(_) => Err(OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 200 visible ASCII characters",
        )),
    }
}

/// Submits the task through the gateway's one submit path; with an idempotency key, a
/// repeated call returns the first task. Edits carry a fingerprint of their content in the
/// input (their stored reference files get new ids on every call), and a repeat with the
/// same fingerprint is the same call.
async fn submit(
    state: &AppState,
    task_type: String,
    input: Value,
    request_id: Option<String>,
    model: Option<String>,
    webhook: Option<String>,
) -> Result<Task, OpenAiError> {
    let task = NewTask {
        task_type,
        input,
        request_id,
        metadata: Some(json!({"api": "openai.images"})),
        model,
        webhook_events: webhook.iter().map(|_| "completed".to_owned()).collect(),
        webhook,
        ..NewTask::default()
    };
    let s = Submission {
        task,
        api: "openai.images",
        repeat: Repeat::Fingerprint,
    };
    crate::submit::submit(state, s).await.map_err(|e| match e {
        SubmitError::Limit(e) => OpenAiError::from(e),
        SubmitError::Conflict(_) => OpenAiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "this Idempotency-Key was already used for a different request",
        ),
        SubmitError::Invalid(m) => OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_value", m),
        SubmitError::Unavailable(m) => {
            OpenAiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
        }
    })
}

/// Waits until the task is terminal or `limit` passes, on the broker's event feed.
async fn wait_done(state: &AppState, id: &str, limit: Duration) -> Result<Task, OpenAiError> {
    // Subscribe before reading, so a completion between the two is not missed.
    let mut rx = state.broker().subscribe();
    let mut shutdown = state.shutdown_signal();
    let until = tokio::time::Instant::now() + limit;
    loop {
        let task = load(state, id).await?;
        if task.state.is_terminal() || limit.is_zero() || state.shutting_down() {
            return Ok(task);
        }
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(e) if e.task_id == id && e.kind.is_completed() => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Ok(load(state, id).await?),
                },
                _ = tokio::time::sleep_until(until) => return Ok(load(state, id).await?),
                _ = shutdown.changed() => return Ok(load(state, id).await?),
            }
        }
    }
}

/// The `202` answer: the task object, `Location` and `Preference-Applied`.
async fn accepted(state: &AppState, links: &Links, task: Task) -> Result<Response, OpenAiError> {
    let mut resp = crate::submit::accepted(state, links, task).await?;
    resp.headers_mut().insert(
        "preference-applied",
        HeaderValue::from_static("respond-async"),
    );
    Ok(resp)
}

/// A failed, canceled or expired task as an OpenAI error.
pub(super) fn task_failure(task: &Task) -> OpenAiError {
    let (code, message) = match &task.error {
        Some(e) => (e.code.clone(), e.message.clone()),
        None => (
            task.state.as_str().to_owned(),
            format!("the task ended {}", task.state.as_str()),
        ),
    };
    let status = match task.state {
        TaskState::Canceled => StatusCode::CONFLICT,
        TaskState::Expired => StatusCode::GATEWAY_TIMEOUT,
        _ if code == "invalid_input" || code == "upstream_rejected" => StatusCode::BAD_REQUEST,
        _ if code == "upstream_rate_limited" => StatusCode::TOO_MANY_REQUESTS,
        _ if code.starts_with("upstream") => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    OpenAiError::new(status, code, format!("{message} (task {})", task.id))
}

/// The OpenAI body of a succeeded task.
async fn images_body(
    state: &AppState,
    links: &Links,
    task: &Task,
    fmt: ResponseFormat,
    opts: &super::params::ImageOptions,
) -> Result<Value, OpenAiError> {
    let out = task.output.as_ref().unwrap_or(&Value::Null);
    let files = out["files"].as_array().cloned().unwrap_or_default();
    let revised = out["revised_prompts"].as_array();
    let mut data = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let Some(id) = f["id"].as_str() else { continue };
        // In the requested output format (converted here when the worker did not).
        let (id, bytes) = opts.apply(state, id).await?;
        let id = id.as_str();
        let mut item = Map::new();
        match fmt {
            ResponseFormat::B64Json => {
                item.insert(
                    "b64_json".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .into(),
                );
            }
            _ => {
                item.insert("url".into(), links.file(id).into());
            }
        }
        if let Some(p) = revised.and_then(|r| r.get(i)).filter(|p| p.is_string()) {
            item.insert("revised_prompt".into(), p.clone());
        }
        data.push(Value::Object(item));
    }
    let mut body = json!({"created": task.created_at / 1000, "data": data});
    if let Some(u) = out.get("usage").filter(|u| u.is_object()) {
        body["usage"] = u.clone();
    }
    Ok(body)
}

/// Creates the task, waits, answers.
async fn run(
    state: &AppState,
    headers: &HeaderMap,
    links: &Links,
    call: &Call,
    task_type: String,
    input: Value,
    request_id: Option<String>,
) -> Result<Response, OpenAiError> {
    let model = call.model.worker_model(&call.model_name).map(str::to_owned);
    let webhook = webhook_header(headers)?.or_else(|| call.model.webhook.clone());
    let task = submit(state, task_type, input.clone(), request_id, model, webhook).await?;
    if task.input.get("images") != input.get("images") {
        // A repeat of an earlier edit: the references stored for this call are not needed.
        for id in input["images"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(input.get("mask"))
        {
            if let Some(id) = id.as_str() {
                let _ = state.files().delete(id).await;
            }
        }
    }
    if call.opts.stream {
        let call = super::stream::StreamCall {
            prefix: if input.get("images").is_some() {
                "image_edit"
            } else {
                "image_generation"
            },
            size: call.size_text.clone().unwrap_or_else(|| "auto".into()),
            opts: call.opts.clone(),
        };
        return Ok(super::stream::respond(state, task.id, call));
    }
    let task = wait_done(state, &task.id.clone(), wait_limit(headers, state)).await?;
    if !task.state.is_terminal() {
        return accepted(state, links, task).await;
    }
    if task.state != TaskState::Succeeded {
        return Err(task_failure(&task));
    }
    let body = images_body(state, links, &task, call.response_format, &call.opts).await?;
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&task.id) {
        resp.headers_mut().insert("x-kiln-task-id", v);
    }
    Ok(resp)
}

/// `POST /v1/images/generations` (JSON).
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai",
    request_body(content = Object, content_type = "application/json", description = "OpenAI's image generation request: `prompt`, `model`, `n`, `size`, `response_format`, `quality`, `background`, `output_format`, `output_compression`, `moderation`, `stream`, `partial_images`"),
    params(("Idempotency-Key" = Option<String>, Header, description = "repeat-safe key"), ("Prefer" = Option<String>, Header, description = "`respond-async` or `wait=N`"), ("X-Kiln-Webhook" = Option<String>, Header, description = "an absolute http(s) URL that receives the task's signed `task.completed` webhook (docs/WEBHOOKS.md)")),
    responses((status = 200, description = "`{created, data: [{b64_json | url}]}`; with `stream: true`, OpenAI's events (`image_generation.partial_image`, `image_generation.completed`)", content((Object = "application/json"), ("text/event-stream"))),
        (status = 202, description = "not done within the wait: the task object, with `Location`"),
        (status = 400, description = "an invalid field (OpenAI's error shape, with `param`)")))]
pub(crate) async fn generations(
    State(state): State<AppState>,
    headers: HeaderMap,
    links: Links,
    req: Request,
) -> Result<Response, OpenAiError> {
    let fields = json_object(&json_body(&state, req).await?)?;
    check_fields(
        fields.keys().map(String::as_str),
        GENERATION_FIELDS,
        Place::Body,
    )?;
    let request_id = idempotency_key(&headers)?;
    let call = Call::parse(&state, &fields)?;
    let (task_type, input) = call.task(None);
    run(
        &state, &headers, &links, &call, task_type, input, request_id,
    )
    .await
}

/// An uploaded part: bytes and the content type it claims (or that its bytes show).
struct Part {
    data: Bytes,
    content_type: String,
}

fn sniff(data: &[u8], claimed: Option<&str>) -> String {
    let claimed = claimed.unwrap_or("").to_ascii_lowercase();
    if claimed.starts_with("image/") {
        return claimed;
    }
    match image::guess_format(data) {
        Ok(image::ImageFormat::Png) => "image/png".into(),
        Ok(image::ImageFormat::Jpeg) => "image/jpeg".into(),
        Ok(image::ImageFormat::WebP) => "image/webp".into(),
        Ok(image::ImageFormat::Gif) => "image/gif".into(),
        _ => claimed,
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> OpenAiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        OpenAiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body exceeds the configured limit",
        )
    } else {
        OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_multipart",
            format!("malformed multipart body: {}", e.body_text()),
        )
    }
}

/// The references, mask and other fields of an edit.
type EditParts = (Vec<Part>, Option<Part>, Map<String, Value>);

/// One reference of a JSON edit: `{"image_url": …}` or `{"file_id": …}`.
async fn json_reference(
    state: &AppState,
    param: &'static str,
    v: &Value,
) -> Result<Part, OpenAiError> {
    let shape = || {
        OpenAiError::invalid(
            param,
            format!("each `{param}` reference is an object with one of `image_url` or `file_id`"),
        )
    };
    let obj = v.as_object().ok_or_else(shape)?;
    let (url, id) = (obj.get("image_url"), obj.get("file_id"));
    match (url.and_then(Value::as_str), id.and_then(Value::as_str)) {
        (Some(url), None) if id.is_none() => image_url(state, param, url).await,
        (None, Some(id)) if url.is_none() => {
            let missing = || OpenAiError::invalid(param, format!("the file {id:?} does not exist"));
            if !crate::store::valid_file_id(id) {
                return Err(missing());
            }
            let (meta, data) = state
                .files()
                .read(id)
                .await
                .map_err(|e| OpenAiError::from(crate::files::storage_error(e)))?
                .ok_or_else(missing)?;
            Ok(Part {
                content_type: sniff(&data, Some(&meta.content_type)),
                data,
            })
        }
        _ => Err(shape()),
    }
}

/// The bytes of an `image_url`: a `data:` URL, or an `http(s)` URL downloaded under
/// `gateway.openai.image_urls`.
async fn image_url(state: &AppState, param: &'static str, url: &str) -> Result<Part, OpenAiError> {
    let cfg = &state.config().openai.image_urls;
    if let Some(rest) = url.strip_prefix("data:") {
        let bad = || {
            OpenAiError::invalid(
                param,
                "a data URL must be `data:image/<type>;base64,<data>`",
            )
        };
        let (head, b64) = rest.split_once(',').ok_or_else(bad)?;
        let mime = head.strip_suffix(";base64").ok_or_else(bad)?;
        if b64.len() / 4 * 3 > cfg.max_bytes {
            return Err(OpenAiError::invalid(
                param,
                format!("the data URL's image exceeds {} bytes", cfg.max_bytes),
            ));
        }
        let data = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| bad())?;
        let data = Bytes::from(data);
        return Ok(Part {
            content_type: sniff(&data, Some(mime)),
            data,
        });
    }
    if !cfg.enabled {
        return Err(OpenAiError::invalid(
            param,
            "image URLs are not downloaded here (gateway.openai.image_urls.enabled = false);              send a data URL, a file_id or multipart files",
        ));
    }
    let policy = FetchPolicy {
        allow_loopback: cfg.allow_loopback,
        allow_private: cfg.allow_private,
        timeout: cfg.timeout,
        max_bytes: cfg.max_bytes,
        auth: None,
    };
    let (data, ct) = fetch_image(url, &policy).await.map_err(|e| OpenAiError {
        code: "image_url_unusable".into(),
        ..OpenAiError::invalid(param, e.to_string())
    })?;
    Ok(Part {
        content_type: sniff(&data, Some(&ct)),
        data,
    })
}

/// The request body as a JSON object; anything else is a 400 `invalid_json`.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, OpenAiError> {
    let invalid = |m: String| OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_json", m);
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("the body must be a JSON object".into())),
        Err(e) => Err(invalid(format!("the body is not valid JSON: {e}"))),
    }
}

/// The parts of a JSON edit: `images` (1 to 16 references), `mask`, the other fields.
async fn json_parts(state: &AppState, req: Request) -> Result<EditParts, OpenAiError> {
    let mut fields = json_object(&json_body(state, req).await?)?;
    let names = fields.keys().map(String::as_str);
    check_fields(
        names.filter(|k| !matches!(*k, "images" | "mask")),
        EDIT_FIELDS,
        Place::Body,
    )?;
    let refs = match fields.remove("images") {
        Some(Value::Array(a)) if (1..=MAX_IMAGES).contains(&a.len()) => a,
        _ => {
            return Err(OpenAiError::invalid(
                "images",
                format!(
                    "`images` is required: an array of 1 to {MAX_IMAGES} objects with                      `image_url` or `file_id`"
                ),
            ));
        }
    };
    let mut images = Vec::with_capacity(refs.len());
    for r in &refs {
        images.push(json_reference(state, "images", r).await?);
    }
    let mask = match fields.remove("mask") {
        None | Some(Value::Null) => None,
        Some(m) => Some(json_reference(state, "mask", &m).await?),
    };
    Ok((images, mask, fields))
}

#[utoipa::path(post, path = "/v1/images/edits", tag = "openai",
    request_body(description = "multipart (`image` / `image[]` files, `mask`, fields) or JSON (`images: [{image_url | file_id}]`, `mask`, fields); the fields as for generations",
        content(("multipart/form-data"), (Object = "application/json"))),
    params(("Idempotency-Key" = Option<String>, Header, description = "repeat-safe key"), ("Prefer" = Option<String>, Header, description = "`respond-async` or `wait=N`"), ("X-Kiln-Webhook" = Option<String>, Header, description = "an absolute http(s) URL that receives the task's signed `task.completed` webhook (docs/WEBHOOKS.md)")),
    responses((status = 200, description = "`{created, data: [...]}`; with `stream: true`, OpenAI's events (`image_edit.partial_image`, `image_edit.completed`)", content((Object = "application/json"), ("text/event-stream"))),
        (status = 202, description = "not done within the wait: the task object, with `Location`"),
        (status = 400, description = "an invalid field (OpenAI's error shape, with `param`)")))]
/// `POST /v1/images/edits`: multipart (`image` or `image[]` up to 16 files, `mask`,
/// fields), or JSON (`images: [{image_url | file_id}]`, `mask`, fields).
pub(crate) async fn edits(
    State(state): State<AppState>,
    headers: HeaderMap,
    links: Links,
    req: Request,
) -> Result<Response, OpenAiError> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let request_id = idempotency_key(&headers)?;
    let (images, mask, fields) = if ctype.starts_with("application/json") {
        json_parts(&state, req).await?
    } else if ctype.starts_with("multipart/form-data") {
        multipart_parts(&state, req).await?
    } else {
        return Err(OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_content_type",
            "edits take multipart/form-data with `image` (or `image[]`) files, or JSON with              `images: [{\"image_url\": …} | {\"file_id\": …}]`",
        ));
    };
    edit(&state, &headers, &links, request_id, images, mask, fields).await
}

/// The parts of a multipart edit.
async fn multipart_parts(state: &AppState, req: Request) -> Result<EditParts, OpenAiError> {
    let mut mp = Multipart::from_request(req, state).await.map_err(|e| {
        OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_multipart", e.body_text())
    })?;
    let mut images: Vec<Part> = Vec::new();
    let mut mask: Option<Part> = None;
    let mut fields = Map::new();
    while let Some(field) = mp.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_owned();
        match name.as_str() {
            "image" | "image[]" | "mask" => {
                let claimed = field.content_type().map(str::to_owned);
                let data = field.bytes().await.map_err(multipart_error)?;
                let part = Part {
                    content_type: sniff(&data, claimed.as_deref()),
                    data,
                };
                if name == "mask" {
                    mask = Some(part);
                } else {
                    if images.len() == MAX_IMAGES {
                        return Err(OpenAiError::invalid(
                            "image",
                            format!("at most {MAX_IMAGES} images per edit"),
                        ));
                    }
                    images.push(part);
                }
            }
            _ => {
                check_fields([name.as_str()], EDIT_FIELDS, Place::Body)?;
                let v = field.text().await.map_err(multipart_error)?;
                fields.insert(name, Value::String(v));
            }
        }
    }
    if images.is_empty() {
        return Err(OpenAiError::invalid(
            "image",
            "`image` (or `image[]`) is required: one to 16 image files",
        ));
    }
    Ok((images, mask, fields))
}

/// Stores the (compressed) references and the mask, creates the task, waits, answers.
async fn edit(
    state: &AppState,
    headers: &HeaderMap,
    links: &Links,
    request_id: Option<String>,
    images: Vec<Part>,
    mask: Option<Part>,
    fields: Map<String, Value>,
) -> Result<Response, OpenAiError> {
    let call = Call::parse(state, &fields)?;
    // The fingerprint identifies the call's content for idempotent repeats.
    let mut fp = Sha256::new();
    fp.update(serde_json::to_vec(&fields).unwrap_or_default());
    for p in images.iter().chain(mask.iter()) {
        fp.update(Sha256::digest(&p.data));
    }
    let fingerprint = hex::encode(fp.finalize());
    // Compress the references (off the runtime, inside store_image) to the model's limits.
    let (max_bytes, max_dim) = (
        call.model.max_reference_bytes,
        call.model.max_reference_dimension,
    );
    let stored = futures_util::future::try_join_all(images.into_iter().map(|p| {
        let state = state.clone();
        async move {
            store_image(
                &state,
                p.data,
                &p.content_type,
                Some(max_bytes),
                Some(max_dim),
            )
            .await
        }
    }))
    .await?;
    let ids: Vec<String> = stored.into_iter().map(|m| m.id).collect();
    let mask_id = match mask {
        Some(p) => Some(
            store_image(state, p.data, &p.content_type, None, None)
                .await?
                .id,
        ),
        None => None,
    };
    let (task_type, mut input) = call.task(Some((&ids, mask_id.as_deref())));
    if request_id.is_some() {
        input["fingerprint"] = fingerprint.into();
    }
    run(state, headers, links, &call, task_type, input, request_id).await
}
