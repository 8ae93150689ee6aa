//! Upload targets: where a file goes and how the answer is read.

use std::future::Future;
use std::pin::Pin;

use crate::body::{Payload, Progress};
use crate::client::{Sent, Timings, UploadClient};
use crate::error::{AttemptError, UploadError};

mod fallback;
mod json_base64;
mod multipart;
mod put;
mod s3;

pub use fallback::Fallback;
pub use json_base64::JsonBase64;
pub use multipart::Multipart;
pub use put::PresignedPut;
pub use s3::{S3, S3Config};

/// A boxed future, as returned by [`UploadTarget::upload`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A file to upload.
#[derive(Clone)]
pub struct UploadFile {
    /// The content.
    pub payload: Payload,
    /// File name sent to the server.
    pub file_name: String,
    /// MIME type.
    pub mime: String,
    /// Called with (bytes sent, total) of the request body during each attempt (restarting
    /// at 0 on a replay). For form and JSON targets the total includes the encoding; for S3
    /// multipart it spans all parts.
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for UploadFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadFile")
            .field("payload", &self.payload)
            .field("file_name", &self.file_name)
            .field("mime", &self.mime)
            .finish_non_exhaustive()
    }
}

impl UploadFile {
    /// A file with a name and MIME type.
    pub fn new(
        payload: impl Into<Payload>,
        file_name: impl Into<String>,
        mime: impl Into<String>,
    ) -> Self {
        Self {
            payload: payload.into(),
            file_name: file_name.into(),
            mime: mime.into(),
            progress: None,
        }
    }

    /// Sets the progress callback.
    pub fn with_progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(std::sync::Arc::new(f));
        self
    }
}

/// What a successful upload produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct UploadResult {
    /// The target that stored the file.
    pub target: String,
    /// Public URL or URI, when the target reports one.
    pub url: Option<String>,
    /// Identifier (file id, object key, upload id), when the target reports one.
    pub id: Option<String>,
    /// ETag, when the target reports one.
    pub etag: Option<String>,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Attempts made (all requests of a multi-request upload counted).
    pub attempts: u32,
    /// Every attempt of every request, in order (each request numbers its own attempts
    /// from 1); the successful attempt of each request has no class.
    pub attempt_log: Vec<kiln_retry::AttemptLog>,
    /// Whether the (last) request reused a pooled connection.
    pub reused_connection: bool,
    /// Timings of the (last) request; `total` spans the whole upload.
    pub timings: Timings,
    /// Targets that failed before this one succeeded (fallback chains), with their errors.
    pub failures: Vec<(String, String)>,
}

impl UploadResult {
    pub(crate) fn from_sent(target: &str, bytes: u64, sent: &Sent) -> Self {
        Self {
            target: target.to_owned(),
            bytes,
            attempts: sent.attempts.len() as u32,
            attempt_log: sent.attempts.clone(),
            reused_connection: sent.reused_connection,
            timings: sent.timings,
            ..Self::default()
        }
    }
}

/// A place files can be uploaded to.
pub trait UploadTarget: Send + Sync {
    /// A short name for logs, errors and fallback reports.
    fn name(&self) -> &str;

    /// Uploads `file` with `client`.
    fn upload<'a>(
        &'a self,
        client: &'a UploadClient,
        file: &'a UploadFile,
    ) -> BoxFuture<'a, Result<UploadResult, UploadError>>;
}

impl UploadClient {
    /// Uploads `file` to `target` in a `tracing` span `upload`.
    pub async fn upload(
        &self,
        target: &dyn UploadTarget,
        file: &UploadFile,
    ) -> Result<UploadResult, UploadError> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "upload",
            target = target.name(),
            bytes = file.payload.len(),
            file_name = file.file_name.as_str()
        );
        let r = target.upload(self, file).instrument(span.clone()).await;
        span.in_scope(|| match &r {
            Ok(res) => tracing::info!(
                message = "uploaded",
                target = res.target.as_str(),
                attempts = res.attempts,
                reused = res.reused_connection,
                total_ms = res.timings.total.as_millis() as u64
            ),
            Err(e) => tracing::warn!(message = "upload failed", error = %e),
        });
        self.record_upload(r.is_ok());
        r
    }
}

/// Parses a JSON response body, or explains what came back instead.
pub(crate) fn parse_json(sent: &Sent) -> Result<serde_json::Value, AttemptError> {
    let ct = sent.content_type();
    if sent.body.iter().all(u8::is_ascii_whitespace) {
        return Err(AttemptError::unexpected(
            sent.status,
            ct,
            &sent.body,
            "empty body, expected JSON",
        ));
    }
    serde_json::from_slice(&sent.body).map_err(|e| {
        let what = if ct.starts_with("text/html") || sent.body.trim_ascii_start().starts_with(b"<")
        {
            format!("expected JSON, got HTML or XML ({e})")
        } else {
            format!("invalid JSON: {e}")
        };
        AttemptError::unexpected(sent.status, ct, &sent.body, what)
    })
}

/// Looks up a dotted path (`data.url`, `files.0.id`) in a JSON value; strings are returned
/// as they are, numbers as their text.
pub(crate) fn json_path(v: &serde_json::Value, path: &str) -> Option<String> {
    let mut cur = v;
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        cur = match cur {
            serde_json::Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            other => other.get(seg)?,
        };
    }
    match cur {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads a required field; its absence is an unexpected response.
pub(crate) fn required(
    sent: &Sent,
    v: &serde_json::Value,
    path: &str,
) -> Result<String, AttemptError> {
    json_path(v, path).ok_or_else(|| {
        AttemptError::unexpected(
            sent.status,
            sent.content_type(),
            &sent.body,
            format!("no string at JSON path `{path}`"),
        )
    })
}

/// Wraps an error about a successful HTTP exchange's content as an upload failure.
pub(crate) fn content_error(target: &str, e: AttemptError) -> UploadError {
    UploadError::Unexpected {
        target: target.to_owned(),
        error: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{"data":{"url":"u","n":3,"files":[{"id":"a"}]}}"#).unwrap();
        assert_eq!(json_path(&v, "data.url").as_deref(), Some("u"));
        assert_eq!(json_path(&v, "data.n").as_deref(), Some("3"));
        assert_eq!(json_path(&v, "data.files.0.id").as_deref(), Some("a"));
        assert_eq!(json_path(&v, "data.missing"), None);
    }
}
