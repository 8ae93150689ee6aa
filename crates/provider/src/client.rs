//! The client of an upstream OpenAI-compatible image API. Calls go through kiln-upload's
//! pooled client under kiln-retry's policy: a call that may have reached the upstream is
//! replayed only when an idempotency header is configured; 4xx answers are final (429
//! waits for `Retry-After` within the deadline); every attempt is reported. With
//! `references = "upload"` the references of an edit are uploaded to a kiln-upload target
//! first and named by URL or id in a JSON edit call.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Uri, header};
use kiln_upload::{
    FetchError, FetchPolicy, HttpRequest, Payload, RetryConfig, Sent, UploadClient, UploadConfig,
    fetch_image,
};
use serde_json::{Map, Value, json};

use crate::config::{ProviderConfig, ReferenceMode, ResponseFormat};
use crate::error::{Attempt, ProviderError, failure, log_attempts};
use crate::references::{SendAs, UploadFailure, UploadRecord, Uploader};

/// An image sent to or received from the upstream.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Image {
    /// The bytes.
    pub data: Bytes,
    /// MIME type.
    pub content_type: String,
}

impl Image {
    /// An image.
    pub fn new(data: impl Into<Bytes>, content_type: impl Into<String>) -> Self {
        Self {
            data: data.into(),
            content_type: content_type.into(),
        }
    }
}

/// One call: a generation (no references) or an edit.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Call {
    /// The task it serves; the idempotency key is `kiln-<task_id>`.
    pub task_id: String,
    /// Fields sent upstream: `model`, `prompt`, `n`, `size`, `quality`, ... (as the task
    /// input carries them; `operation`, `images`, `image`, `mask` and `fingerprint` are
    /// not sent).
    pub fields: Map<String, Value>,
    /// Reference images; empty for a generation.
    pub references: Vec<Image>,
    /// The edit's mask.
    pub mask: Option<Image>,
    /// Time left before the task's deadline, when it has one.
    pub time_left: Option<Duration>,
}

/// What the upstream produced.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Output {
    /// The images, in order.
    pub images: Vec<Image>,
    /// `revised_prompt` per image, when given.
    pub revised_prompts: Vec<Option<String>>,
    /// The upstream's `usage`, when given.
    pub usage: Option<Value>,
    /// Every attempt of the call.
    pub attempts: Vec<Attempt>,
    /// The references uploaded before the call (`references = "upload"`).
    pub uploads: Vec<UploadRecord>,
}

/// An upstream OpenAI-compatible image API.
#[derive(Debug, Clone)]
pub struct OpenAiCompatible {
    name: String,
    cfg: ProviderConfig,
    base: String,
    client: UploadClient,
    /// With `references = "upload"`: the references' target.
    uploader: Option<Arc<Uploader>>,
}

/// Fields of the task input that are kiln's, not the upstream's.
const NOT_SENT: &[&str] = &[
    "operation",
    "partial_images",
    "images",
    "image",
    "mask",
    "fingerprint",
    "width",
    "height",
];

impl OpenAiCompatible {
    /// A client for the provider `name`.
    pub fn new(name: &str, cfg: ProviderConfig) -> Result<Self, ProviderError> {
        let upload = UploadConfig {
            connect_timeout: cfg.connect_timeout,
            attempt_timeout: cfg.request_timeout.min(cfg.deadline),
            retry: RetryConfig {
                max_retries: cfg.max_retries,
                initial_backoff: cfg.initial_backoff,
                deadline: Some(cfg.deadline),
                retry_statuses: cfg.retry_statuses.clone(),
                ..RetryConfig::default()
            },
            // A b64_json answer carries all images of the call, each a third larger than
            // its file.
            max_response_bytes: cfg.max_download_bytes.saturating_mul(2),
            ..UploadConfig::default()
        };
        let client =
            UploadClient::new(upload).map_err(|e| ProviderError::Invalid(e.to_string()))?;
        let uploader = match cfg.references {
            ReferenceMode::Upload => Some(Arc::new(
                Uploader::new(&cfg.upload).map_err(ProviderError::Invalid)?,
            )),
            _ => None,
        };
        Ok(Self {
            name: name.to_owned(),
            base: cfg.base_url.trim_end_matches('/').to_owned(),
            cfg,
            client,
            uploader,
        })
    }

    /// The provider's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn request(
        &self,
        path: &str,
        body: Vec<u8>,
        ctype: &str,
        task_id: &str,
    ) -> Result<HttpRequest, ProviderError> {
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e| ProviderError::Invalid(format!("bad base_url: {e}")))?;
        let mut req = HttpRequest::new(Method::POST, uri, vec![Payload::from(body)]);
        let hv =
            |s: &str| HeaderValue::from_str(s).map_err(|e| ProviderError::Invalid(e.to_string()));
        req.headers.insert(header::CONTENT_TYPE, hv(ctype)?);
        req.headers
            .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(key) = &self.cfg.api_key {
            req.headers
                .insert(header::AUTHORIZATION, hv(&format!("Bearer {key}"))?);
        }
        if !self.cfg.idempotency_header.is_empty() {
            let name = header::HeaderName::from_bytes(self.cfg.idempotency_header.as_bytes())
                .map_err(|e| ProviderError::Invalid(format!("bad idempotency_header: {e}")))?;
            req.headers.insert(name, hv(&format!("kiln-{task_id}"))?);
            req.idempotent = true;
        } else {
            req.idempotent = false;
        }
        Ok(req)
    }

    fn fields(&self, call: &Call) -> Map<String, Value> {
        let mut f: Map<String, Value> = call
            .fields
            .iter()
            .filter(|(k, _)| !NOT_SENT.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let fmt = match self.cfg.response_format {
            ResponseFormat::Url => "url",
            _ => "b64_json",
        };
        f.insert("response_format".into(), fmt.into());
        f
    }

    /// With `references = "upload"`, uploads the references and the mask of an edit to the
    /// target, one after the other (each retried per `upload.client.retry`, all within the
    /// task's deadline); otherwise, or for a generation, does nothing. The records go to
    /// [`OpenAiCompatible::send`].
    pub async fn upload_references(&self, call: &Call) -> Result<Vec<UploadRecord>, ProviderError> {
        let Some(up) = &self.uploader else {
            return Ok(Vec::new());
        };
        let Some(limit) = call.time_left else {
            return self.upload_all(up, call).await;
        };
        match tokio::time::timeout(limit, self.upload_all(up, call)).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::Upload {
                part: "the references".into(),
                target: up.target_name().to_owned(),
                status: None,
                message: format!(
                    "the task's deadline ({} ms) passed during the uploads",
                    limit.as_millis()
                ),
                retryable: false,
                attempts: Vec::new(),
                uploads: Vec::new(),
            }),
        }
    }

    async fn upload_all(
        &self,
        up: &Uploader,
        call: &Call,
    ) -> Result<Vec<UploadRecord>, ProviderError> {
        let parts = call
            .references
            .iter()
            .enumerate()
            .map(|(i, img)| (format!("image[{i}]"), i.to_string(), img))
            .chain(
                call.mask
                    .iter()
                    .map(|m| ("mask".to_owned(), "mask".to_owned(), m)),
            );
        let mut done = Vec::new();
        for (part, stem, img) in parts {
            match up.upload(&call.task_id, &part, &stem, img).await {
                Ok(r) => {
                    tracing::info!(message = "reference uploaded", provider = %self.name, task_id = %call.task_id, part = %r.part, target = %r.target, bytes = r.bytes, attempts = r.attempts.len(), total_ms = r.total_ms);
                    done.push(r);
                }
                Err(UploadFailure {
                    part,
                    target,
                    error,
                }) => {
                    return Err(ProviderError::Upload {
                        status: error.status(),
                        retryable: error.is_retryable(),
                        attempts: log_attempts(error.attempts(), error.last_attempt_error()),
                        message: error.to_string(),
                        part,
                        target,
                        uploads: done,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Uploads the references when configured, then calls the upstream
    /// ([`OpenAiCompatible::upload_references`] and [`OpenAiCompatible::send`]).
    pub async fn run(&self, call: &Call) -> Result<Output, ProviderError> {
        let uploads = self.upload_references(call).await?;
        self.send(call, uploads).await
    }

    /// The JSON body of an edit whose references were uploaded: OpenAI's JSON form of
    /// `/images/edits`, `images: [{"image_url": …}]` (or `file_id`) and `mask: {…}`.
    fn json_edit(
        &self,
        mut fields: Map<String, Value>,
        call: &Call,
        uploads: &[UploadRecord],
    ) -> Result<Vec<u8>, ProviderError> {
        let send_as = self
            .uploader
            .as_ref()
            .map(|u| u.send_as)
            .unwrap_or_default();
        let named = |r: &UploadRecord| -> Result<Value, ProviderError> {
            let (key, v) = match send_as {
                SendAs::FileId => ("file_id", r.id.as_ref()),
                _ => ("image_url", r.url.as_ref()),
            };
            let v = v.ok_or_else(|| {
                ProviderError::Invalid(format!(
                    "the target `{}` reported no {} for {} (upload.send_as = \"{key}\")",
                    r.target,
                    if key == "file_id" { "id" } else { "URL" },
                    r.part
                ))
            })?;
            Ok(json!({ key: v }))
        };
        let (mask, images): (Vec<&UploadRecord>, Vec<&UploadRecord>) =
            uploads.iter().partition(|r| r.part == "mask");
        if images.len() != call.references.len() || mask.len() != usize::from(call.mask.is_some()) {
            return Err(ProviderError::Invalid(
                "the uploads do not match the call's references".into(),
            ));
        }
        let images = images
            .into_iter()
            .map(named)
            .collect::<Result<Vec<_>, _>>()?;
        fields.insert("images".into(), Value::Array(images));
        if let Some(m) = mask.first() {
            fields.insert("mask".into(), named(m)?);
        }
        serde_json::to_vec(&fields).map_err(|e| ProviderError::Invalid(e.to_string()))
    }

    /// Calls the upstream: `POST /images/generations` (JSON) without references; for an
    /// edit `POST /images/edits`, multipart with `image[]` parts and the mask, or with
    /// `references = "upload"` JSON naming the `uploads` by URL or id.
    pub async fn send(
        &self,
        call: &Call,
        uploads: Vec<UploadRecord>,
    ) -> Result<Output, ProviderError> {
        let fields = self.fields(call);
        let req = if call.references.is_empty() {
            let body =
                serde_json::to_vec(&fields).map_err(|e| ProviderError::Invalid(e.to_string()))?;
            self.request(
                "/images/generations",
                body,
                "application/json",
                &call.task_id,
            )?
        } else if self.uploader.is_some() {
            let body = self.json_edit(fields, call, &uploads)?;
            self.request("/images/edits", body, "application/json", &call.task_id)?
        } else {
            let boundary = format!("kiln-{}", uuid::Uuid::new_v4().simple());
            let body = multipart(&boundary, &fields, &call.references, call.mask.as_ref());
            self.request(
                "/images/edits",
                body,
                &format!("multipart/form-data; boundary={boundary}"),
                &call.task_id,
            )?
        };
        let limit = match call.time_left {
            Some(t) => t.min(self.cfg.deadline),
            None => self.cfg.deadline,
        };
        let sent = match tokio::time::timeout(limit, self.client.send(&self.name, req)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failure(&e)),
            Err(_) => {
                return Err(ProviderError::Failed {
                    message: format!(
                        "the task's deadline ({} ms) passed during the call",
                        limit.as_millis()
                    ),
                    maybe_processed: true,
                    attempts: Vec::new(),
                });
            }
        };
        let attempts = log_attempts(&sent.attempts, None);
        self.read_answer(&sent, attempts, uploads).await
    }

    /// The images of a 2xx answer: `b64_json` decoded, `url`s downloaded under the
    /// provider's fetch policy.
    async fn read_answer(
        &self,
        sent: &Sent,
        attempts: Vec<Attempt>,
        uploads: Vec<UploadRecord>,
    ) -> Result<Output, ProviderError> {
        let bad = |message: String, attempts: &[Attempt]| ProviderError::BadResult {
            message,
            attempts: attempts.to_vec(),
        };
        let json: Value = serde_json::from_slice(&sent.body).map_err(|e| {
            bad(
                format!("the answer ({}) is not JSON: {e}", sent.content_type()),
                &attempts,
            )
        })?;
        let data = json["data"]
            .as_array()
            .filter(|d| !d.is_empty())
            .ok_or_else(|| bad("the answer has no `data` images".into(), &attempts))?;
        let policy = FetchPolicy {
            allow_loopback: self.cfg.allow_loopback,
            allow_private: self.cfg.allow_private,
            timeout: self.cfg.download_timeout,
            max_bytes: self.cfg.max_download_bytes,
            auth: self
                .cfg
                .api_key
                .as_ref()
                .map(|k| (self.origin(), format!("Bearer {k}"))),
        };
        let mut images = Vec::with_capacity(data.len());
        let mut revised = Vec::with_capacity(data.len());
        for item in data {
            let image = if let Some(b64) = item["b64_json"].as_str() {
                if b64.len() / 4 * 3 > self.cfg.max_download_bytes {
                    return Err(bad(
                        "a b64_json image exceeds max_download_bytes".into(),
                        &attempts,
                    ));
                }
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| bad(format!("b64_json is not base64: {e}"), &attempts))?;
                let ct = match image::guess_format(&raw) {
                    Ok(image::ImageFormat::Jpeg) => "image/jpeg",
                    Ok(image::ImageFormat::WebP) => "image/webp",
                    Ok(image::ImageFormat::Png) => "image/png",
                    _ => {
                        return Err(bad(
                            "b64_json is not a PNG, JPEG or WebP image".into(),
                            &attempts,
                        ));
                    }
                };
                Image::new(raw, ct)
            } else if let Some(url) = item["url"].as_str() {
                let url = self.absolute(url);
                let (data, ct) = fetch_image(&url, &policy)
                    .await
                    .map_err(|e: FetchError| bad(e.to_string(), &attempts))?;
                Image::new(data, ct)
            } else {
                return Err(bad(
                    "a `data` item has neither b64_json nor url".into(),
                    &attempts,
                ));
            };
            images.push(image);
            revised.push(item["revised_prompt"].as_str().map(str::to_owned));
        }
        Ok(Output {
            images,
            revised_prompts: revised,
            usage: json.get("usage").filter(|u| u.is_object()).cloned(),
            attempts,
            uploads,
        })
    }

    /// `scheme://authority` of the base URL.
    fn origin(&self) -> String {
        self.base
            .parse::<Uri>()
            .ok()
            .and_then(|u| Some(format!("{}://{}", u.scheme_str()?, u.authority()?)))
            .unwrap_or_default()
    }

    /// A result URL relative to the upstream (`/v1/files/…`) made absolute.
    fn absolute(&self, url: &str) -> String {
        if url.starts_with('/') {
            format!("{}{url}", self.origin())
        } else {
            url.to_owned()
        }
    }
}

fn multipart(
    boundary: &str,
    fields: &Map<String, Value>,
    images: &[Image],
    mask: Option<&Image>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in fields {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Null => continue,
            other => other.to_string(),
        };
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{text}\r\n"
            )
            .as_bytes(),
        );
    }
    let field = if images.len() == 1 {
        "image"
    } else {
        "image[]"
    };
    let parts = images
        .iter()
        .enumerate()
        .map(|(i, img)| (field, format!("image{i}"), img))
        .chain(mask.map(|m| ("mask", "mask".to_owned(), m)));
    for (name, file, img) in parts {
        let ext = img.content_type.rsplit('/').next().unwrap_or("bin");
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}.{ext}\"\r\nContent-Type: {}\r\n\r\n",
                img.content_type
            )
            .as_bytes(),
        );
        out.extend_from_slice(&img.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(part: &str, url: Option<&str>, id: Option<&str>) -> UploadRecord {
        UploadRecord {
            part: part.into(),
            target: "assets".into(),
            bytes: 3,
            url: url.map(str::to_owned),
            id: id.map(str::to_owned),
            total_ms: 1,
            attempts: Vec::new(),
            skipped: Vec::new(),
        }
    }

    fn uploading(send_as: &str) -> OpenAiCompatible {
        let cfg: ProviderConfig = serde_json::from_value(json!({
            "base_url": "http://127.0.0.1:9/v1",
            "references": "upload",
            "upload": {"send_as": send_as,
                       "target": {"kind": "json_base64", "url": "http://127.0.0.1:9/a"}},
        }))
        .unwrap();
        OpenAiCompatible::new("p", cfg).unwrap()
    }

    #[test]
    fn uploaded_references_are_named_in_a_json_edit() {
        let call = Call {
            references: vec![
                Image::new(&b"AAA"[..], "image/png"),
                Image::new(&b"BBB"[..], "image/png"),
            ],
            mask: Some(Image::new(&b"MMM"[..], "image/png")),
            ..Call::default()
        };
        let mut fields = Map::new();
        fields.insert("prompt".into(), "a cat".into());
        fields.insert("n".into(), 2.into());
        let ups = [
            record("image[0]", Some("https://a/0.png"), Some("f0")),
            record("image[1]", Some("https://a/1.png"), Some("f1")),
            record("mask", Some("https://a/m.png"), Some("fm")),
        ];
        let body = uploading("image_url")
            .json_edit(fields.clone(), &call, &ups)
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"prompt": "a cat", "n": 2,
                   "images": [{"image_url": "https://a/0.png"}, {"image_url": "https://a/1.png"}],
                   "mask": {"image_url": "https://a/m.png"}})
        );
        let body = uploading("file_id")
            .json_edit(fields.clone(), &call, &ups)
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["images"], json!([{"file_id": "f0"}, {"file_id": "f1"}]));
        assert_eq!(v["mask"], json!({"file_id": "fm"}));
        // A target that reports no URL cannot serve `image_url`; a missing upload is caught.
        let no_url = [
            record("image[0]", None, Some("f0")),
            ups[1].clone(),
            ups[2].clone(),
        ];
        let e = uploading("image_url")
            .json_edit(fields.clone(), &call, &no_url)
            .unwrap_err();
        assert!(
            e.to_string().contains("reported no URL for image[0]"),
            "{e}"
        );
        assert!(
            uploading("image_url")
                .json_edit(fields, &call, &ups[..2])
                .is_err()
        );
    }

    #[tokio::test]
    async fn uploads_stop_at_the_task_deadline_without_calling_the_upstream() {
        // An asset endpoint that accepts connections and never answers.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                open.push(s);
            }
        });
        let cfg: ProviderConfig = serde_json::from_value(json!({
            "base_url": "http://127.0.0.1:9/v1",
            "references": "upload",
            "upload": {"target": {"kind": "json_base64", "name": "slow",
                                  "url": format!("http://127.0.0.1:{port}/a")}},
        }))
        .unwrap();
        let up = OpenAiCompatible::new("p", cfg).unwrap();
        let call = Call {
            task_id: "t1".into(),
            references: vec![Image::new(&b"AAA"[..], "image/png")],
            time_left: Some(Duration::from_millis(200)),
            ..Call::default()
        };
        let e = up.run(&call).await.unwrap_err();
        assert_eq!(e.code(), "upstream_upload_failed");
        assert!(e.upstream_untouched() && !e.is_retryable());
        let text = e.to_string();
        assert!(
            text.contains("`slow`") && text.contains("deadline (200 ms)"),
            "{text}"
        );
        hold.abort();
    }

    #[test]
    fn multipart_has_fields_and_image_parts() {
        let mut f = Map::new();
        f.insert("prompt".into(), "a cat".into());
        f.insert("n".into(), 2.into());
        let imgs = [
            Image::new(&b"AAA"[..], "image/png"),
            Image::new(&b"BBB"[..], "image/jpeg"),
        ];
        let body = String::from_utf8(multipart("XX", &f, &imgs, None)).unwrap();
        assert!(body.contains("name=\"prompt\"\r\n\r\na cat\r\n"));
        assert!(body.contains("name=\"n\"\r\n\r\n2\r\n"));
        assert_eq!(body.matches("name=\"image[]\"").count(), 2);
        assert!(
            body.contains("filename=\"image1.jpeg\"\r\nContent-Type: image/jpeg\r\n\r\nBBB\r\n")
        );
        assert!(body.ends_with("--XX--\r\n"));
        let one = String::from_utf8(multipart("XX", &f, &imgs[..1], Some(&imgs[0]))).unwrap();
        assert!(one.contains("name=\"image\"; filename"));
        assert!(one.contains("name=\"mask\"; filename"));
    }
}
