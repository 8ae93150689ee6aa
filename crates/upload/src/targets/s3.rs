//! S3 PutObject and multipart upload, signed with SigV4 (`aws-sigv4`).

use std::sync::Arc;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_sigv4::sign::v4;
use bytes::Bytes;
use http::{HeaderValue, Method, Uri, header};
use kiln_retry::AttemptLog;
use serde::Deserialize;

use super::{BoxFuture, UploadFile, UploadResult, UploadTarget, content_error};
use crate::body::Payload;
use crate::client::{HttpRequest, Sent, Signer, UploadClient};
use crate::error::{AttemptError, UploadError};

/// Where and how to store objects. Works with AWS S3 and S3-compatible stores (R2,
/// MinIO) with `path_style`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint, e.g. `https://s3.eu-west-1.amazonaws.com` or
    /// `https://<account>.r2.cloudflarestorage.com`. No default.
    pub endpoint: String,
    /// Bucket. No default.
    pub bucket: String,
    /// Signing region (`auto` for R2). Default: `us-east-1`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Access key id. No default.
    pub access_key_id: String,
    /// Secret access key. No default.
    pub secret_access_key: String,
    /// Session token for temporary credentials. Default: none.
    #[serde(default)]
    pub session_token: Option<String>,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key`; needed by
    /// most S3-compatible stores. Default: true.
    #[serde(default = "yes")]
    pub path_style: bool,
    /// Prefix prepended to the file name to form the object key. Default: empty.
    #[serde(default)]
    pub key_prefix: String,
    /// Bodies of at least this size use multipart upload. Default: 16 MiB.
    #[serde(default = "default_threshold")]
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (S3 minimum 5 MiB except the last part).
    /// Default: 8 MiB.
    #[serde(default = "default_part")]
    pub part_size: u64,
    /// Public base URL of the bucket reported as the result's `url` (e.g. an R2 public
    /// domain); when unset the object's endpoint URL is reported. Default: none.
    #[serde(default)]
    pub public_base_url: Option<String>,
}

impl std::fmt::Debug for S3Config {
    /// Shows every field but the secret key and the session token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("path_style", &self.path_style)
            .field("key_prefix", &self.key_prefix)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("public_base_url", &self.public_base_url)
            .finish()
    }
}

fn default_region() -> String {
    "us-east-1".into()
}
fn yes() -> bool {
    true
}
fn default_threshold() -> u64 {
    16 << 20
}
fn default_part() -> u64 {
    8 << 20
}

/// Uploads to S3 with PutObject, or with multipart upload (each part retried on its own)
/// when the body reaches `multipart_threshold`. Every request is sent as idempotent (a
/// replayed PUT overwrites with the same bytes; a replayed CreateMultipartUpload can leave an
/// unused upload behind). A part or CompleteMultipartUpload that fails for good ends the
/// upload: no further part is sent, the upload is aborted (AbortMultipartUpload) and the
/// error is [`UploadError::MultipartStep`]. S3 answers 500 InternalError for faults it asks
/// clients to retry; those are retried only when the client's `retry.retry_statuses` lists
/// 500.
#[derive(Debug, Clone)]
pub struct S3 {
    cfg: S3Config,
    name: String,
}

const MAX_PARTS: u64 = 10_000;
const MIN_PART: u64 = 5 << 20;

impl S3 {
    /// Validates the configuration.
    pub fn new(cfg: S3Config) -> Result<Self, UploadError> {
        if cfg.part_size < MIN_PART {
            return Err(UploadError::Config(format!(
                "S3 part_size {} is below the 5 MiB minimum",
                cfg.part_size
            )));
        }
        cfg.endpoint
            .parse::<Uri>()
            .map_err(|e| UploadError::Config(format!("bad S3 endpoint: {e}")))?;
        Ok(Self {
            cfg,
            name: "s3".into(),
        })
    }

    /// Sets the name used in logs and fallback reports. Default: `s3`.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The object URL (path-style or virtual-hosted), without query.
    pub fn object_url(&self, key: &str) -> Result<String, UploadError> {
        let ep: Uri = self
            .cfg
            .endpoint
            .parse()
            .map_err(|e| UploadError::Config(format!("bad S3 endpoint: {e}")))?;
        let scheme = ep.scheme_str().unwrap_or("https");
        let auth = ep
            .authority()
            .ok_or_else(|| UploadError::Config("S3 endpoint has no host".into()))?;
        let key = encode_path(key);
        Ok(if self.cfg.path_style {
            format!("{scheme}://{auth}/{}/{key}", encode(&self.cfg.bucket))
        } else {
            format!("{scheme}://{}.{auth}/{key}", self.cfg.bucket)
        })
    }

    /// Creates the bucket (CreateBucket; an existing bucket owned by the caller is fine).
    pub async fn create_bucket(&self, client: &UploadClient) -> Result<(), UploadError> {
        let url = self.object_url("")?;
        match client
            .send(&self.name, self.request(Method::PUT, &url, vec![])?)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads an object back (GetObject), up to the client's `max_response_bytes`.
    pub async fn get_object(&self, client: &UploadClient, key: &str) -> Result<Bytes, UploadError> {
        let url = self.object_url(key)?;
        Ok(client
            .send(&self.name, self.request(Method::GET, &url, vec![])?)
            .await?
            .body)
    }

    /// The object key an uploaded file named `file_name` gets: `key_prefix` + name.
    pub fn key_for(&self, file_name: &str) -> String {
        format!("{}{file_name}", self.cfg.key_prefix)
    }

    /// Reads `len` bytes of an object from `offset` (GetObject with `Range`). A server that
    /// ignores the range answers with the whole object; callers check the length.
    pub async fn get_object_range(
        &self,
        client: &UploadClient,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, UploadError> {
        let url = self.object_url(key)?;
        let mut req = self.request(Method::GET, &url, vec![])?;
        let last = offset.saturating_add(len.max(1) - 1);
        let range = HeaderValue::from_str(&format!("bytes={offset}-{last}"))
            .map_err(|e| UploadError::Config(e.to_string()))?;
        req.headers.insert(header::RANGE, range);
        Ok(client.send(&self.name, req).await?.body)
    }

    /// Deletes an object (DeleteObject). Deleting a missing key succeeds, as S3 does.
    pub async fn delete_object(&self, client: &UploadClient, key: &str) -> Result<(), UploadError> {
        let url = self.object_url(key)?;
        client
            .send(&self.name, self.request(Method::DELETE, &url, vec![])?)
            .await
            .map(|_| ())
    }

    fn signer(&self) -> Signer {
        let cfg = self.cfg.clone();
        Arc::new(move |parts: &mut http::request::Parts| sign_parts(&cfg, parts))
    }

    fn request(
        &self,
        method: Method,
        url: &str,
        body: Vec<Payload>,
    ) -> Result<HttpRequest, UploadError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| UploadError::Config(format!("bad S3 URL {url}: {e}")))?;
        let mut req = HttpRequest::new(method, uri, body);
        req.idempotent = true;
        req.signer = Some(self.signer());
        Ok(req)
    }

    async fn put_object(
        &self,
        client: &UploadClient,
        url: &str,
        file: &UploadFile,
    ) -> Result<Sent, UploadError> {
        let mut req = self.request(Method::PUT, url, vec![file.payload.clone()])?;
        if let Ok(v) = HeaderValue::from_str(&file.mime) {
            req.headers.insert(header::CONTENT_TYPE, v);
        }
        req.progress = file.progress.clone();
        client.send(&self.name, req).await
    }

    async fn multipart(
        &self,
        client: &UploadClient,
        url: &str,
        file: &UploadFile,
    ) -> Result<(Sent, String, Vec<AttemptLog>), UploadError> {
        let total = file.payload.len();
        let part_size = self.cfg.part_size.max(total.div_ceil(MAX_PARTS));
        let mut create = self.request(Method::POST, &format!("{url}?uploads"), vec![])?;
        if let Ok(v) = HeaderValue::from_str(&file.mime) {
            create.headers.insert(header::CONTENT_TYPE, v);
        }
        let created = client.send(&self.name, create).await?;
        let mut attempts = created.attempts.clone();
        let upload_id = xml_value(&created.body, "UploadId").ok_or_else(|| {
            content_error(
                &self.name,
                AttemptError::unexpected(
                    created.status,
                    created.content_type(),
                    &created.body,
                    "no UploadId in CreateMultipartUpload answer",
                ),
            )
        })?;
        let q_id = encode(&upload_id);
        // Which request failed: the part number for UploadPart, `None` for the completion.
        let result: Result<Sent, (Option<u32>, UploadError)> = async {
            let mut etags = Vec::new();
            let mut offset = 0u64;
            let mut number = 1u32;
            while offset < total {
                let len = part_size.min(total - offset);
                let part = Some(number);
                let mut req = self
                    .request(
                        Method::PUT,
                        &format!("{url}?partNumber={number}&uploadId={q_id}"),
                        vec![file.payload.slice(offset, len)],
                    )
                    .map_err(|e| (part, e))?;
                if let Some(p) = file.progress.clone() {
                    let base = offset;
                    req.progress = Some(Arc::new(move |sent, _| p(base + sent, total)));
                }
                let sent = client.send(&self.name, req).await.map_err(|e| (part, e))?;
                attempts.extend(sent.attempts.iter().cloned());
                let etag = sent
                    .headers
                    .get(header::ETAG)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        (
                            part,
                            content_error(
                                &self.name,
                                AttemptError::unexpected(
                                    sent.status,
                                    sent.content_type(),
                                    &sent.body,
                                    format!("no ETag for part {number}"),
                                ),
                            ),
                        )
                    })?;
                etags.push((number, etag));
                offset += len;
                number += 1;
            }
            let mut xml = String::from("<CompleteMultipartUpload>");
            for (n, e) in &etags {
                xml.push_str(&format!(
                    "<Part><PartNumber>{n}</PartNumber><ETag>{}</ETag></Part>",
                    xml_escape(e)
                ));
            }
            xml.push_str("</CompleteMultipartUpload>");
            let mut complete = self
                .request(
                    Method::POST,
                    &format!("{url}?uploadId={q_id}"),
                    vec![Payload::Bytes(Bytes::from(xml))],
                )
                .map_err(|e| (None, e))?;
            complete.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/xml"),
            );
            let done = client
                .send(&self.name, complete)
                .await
                .map_err(|e| (None, e))?;
            attempts.extend(done.attempts.iter().cloned());
            // S3 can answer 200 with an <Error> document.
            if xml_value(&done.body, "Code").is_some() && find(&done.body, b"<Error").is_some() {
                return Err((
                    None,
                    content_error(
                        &self.name,
                        AttemptError::unexpected(
                            done.status,
                            done.content_type(),
                            &done.body,
                            "CompleteMultipartUpload returned an error document",
                        ),
                    ),
                ));
            }
            Ok(done)
        }
        .await;
        match result {
            Ok(done) => Ok((done, upload_id, attempts)),
            Err((part, error)) => {
                let aborted = match self.request(
                    Method::DELETE,
                    &format!("{url}?uploadId={q_id}"),
                    vec![],
                ) {
                    Ok(req) => match client.send(&self.name, req).await {
                        Ok(_) => true,
                        Err(abort) => {
                            tracing::warn!(message = "abort of multipart upload failed", error = %abort);
                            false
                        }
                    },
                    Err(_) => false,
                };
                Err(UploadError::MultipartStep {
                    target: self.name.clone(),
                    step: if part.is_some() {
                        "UploadPart"
                    } else {
                        "CompleteMultipartUpload"
                    },
                    part,
                    aborted,
                    error: Box::new(error),
                })
            }
        }
    }
}

impl UploadTarget for S3 {
    fn name(&self) -> &str {
        &self.name
    }

    fn upload<'a>(
        &'a self,
        client: &'a UploadClient,
        file: &'a UploadFile,
    ) -> BoxFuture<'a, Result<UploadResult, UploadError>> {
        Box::pin(async move {
            let key = self.key_for(&file.file_name);
            let url = self.object_url(&key)?;
            let started = tokio::time::Instant::now();
            let (sent, attempts) = if file.payload.len() >= self.cfg.multipart_threshold {
                let (sent, _id, attempts) = self.multipart(client, &url, file).await?;
                (sent, attempts)
            } else {
                let sent = self.put_object(client, &url, file).await?;
                let log = sent.attempts.clone();
                (sent, log)
            };
            let mut r = UploadResult::from_sent(&self.name, file.payload.len(), &sent);
            r.attempts = attempts.len() as u32;
            r.attempt_log = attempts;
            r.timings.total = started.elapsed();
            r.id = Some(key.clone());
            r.etag = sent
                .headers
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| xml_value(&sent.body, "ETag"));
            r.url = Some(match &self.cfg.public_base_url {
                Some(base) => format!("{}/{}", base.trim_end_matches('/'), encode_path(&key)),
                None => url,
            });
            Ok(r)
        })
    }
}

fn sign_parts(cfg: &S3Config, parts: &mut http::request::Parts) -> Result<(), String> {
    let creds = Credentials::new(
        cfg.access_key_id.clone(),
        cfg.secret_access_key.clone(),
        cfg.session_token.clone(),
        None,
        "kiln-upload",
    );
    let identity = creds.into();
    let mut settings = SigningSettings::default();
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&cfg.region)
        .name("s3")
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|e| format!("SigV4 parameters: {e}"))?
        .into();
    let uri = parts.uri.to_string();
    let headers: Vec<(&str, &str)> = parts
        .headers
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
        .collect();
    let signable = SignableRequest::new(
        parts.method.as_str(),
        uri.as_str(),
        headers.into_iter(),
        SignableBody::UnsignedPayload,
    )
    .map_err(|e| format!("SigV4: {e}"))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| format!("SigV4: {e}"))?
        .into_parts();
    let mut tmp = http::Request::new(());
    *tmp.headers_mut() = std::mem::take(&mut parts.headers);
    instructions.apply_to_request_http1x(&mut tmp);
    parts.headers = std::mem::take(tmp.headers_mut());
    Ok(())
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Encodes each `/`-separated segment of an object key.
fn encode_path(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The text of the first `<tag>…</tag>` in an XML document (S3 answers are flat enough).
fn xml_value(body: &[u8], tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = find(body, open.as_bytes())? + open.len();
    let len = find(&body[start..], close.as_bytes())?;
    let raw = String::from_utf8_lossy(&body[start..start + len]).into_owned();
    Some(
        raw.replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> S3Config {
        S3Config {
            endpoint: "http://127.0.0.1:9000".into(),
            bucket: "b".into(),
            region: "us-east-1".into(),
            access_key_id: "AKID".into(),
            secret_access_key: "secret".into(),
            session_token: None,
            path_style: true,
            key_prefix: String::new(),
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            public_base_url: None,
        }
    }

    #[test]
    fn urls_and_xml() {
        let s = S3::new(cfg()).unwrap();
        assert_eq!(
            s.object_url("a b/c.png").unwrap(),
            "http://127.0.0.1:9000/b/a%20b/c.png"
        );
        assert_eq!(
            xml_value(b"<R><UploadId>x&amp;y</UploadId></R>", "UploadId").as_deref(),
            Some("x&y")
        );
        assert!(
            S3::new(S3Config {
                part_size: 1,
                ..cfg()
            })
            .is_err()
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let c = S3Config {
            session_token: Some("tok-123".into()),
            ..cfg()
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("AKID"), "{shown}");
        assert!(!shown.contains("secret\""), "{shown}");
        assert!(!shown.contains("tok-123"), "{shown}");
        assert_eq!(S3::new(c).unwrap().key_for("x.png"), "x.png");
    }

    #[test]
    fn signing_adds_sigv4_headers() {
        let (mut parts, ()) = http::Request::put("http://127.0.0.1:9000/b/k")
            .body(())
            .unwrap()
            .into_parts();
        sign_parts(&cfg(), &mut parts).unwrap();
        let auth = parts.headers["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKID/"),
            "{auth}"
        );
        assert_eq!(parts.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD");
        assert!(parts.headers.contains_key("x-amz-date"));
    }
}
