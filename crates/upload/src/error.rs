//! Errors: what one attempt met ([`AttemptError`]) and what an upload reports
//! ([`UploadError`]).

use std::time::Duration;

use kiln_retry::{AttemptLog, Class, Failure, RetryError, StopReason};

/// At most this many bytes of a response body are kept in an error.
pub const EXCERPT_LEN: usize = 256;

/// What one attempt met.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError {
    /// TCP connect failed or timed out: nothing was sent.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (certificate rejected, protocol mismatch). Never retried.
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        /// `host:port`.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed after the connection was made.
    #[error("{what} ({class}, {kind}{}): {source}", h2_reason.map(|r| format!(", h2 {r}")).unwrap_or_default())]
    Transport {
        /// What is known about the server having processed the request.
        class: Class,
        /// The stable name of the hyper/h2 error kind (`h2_goaway`, `h2_reset`,
        /// `dispatch_gone`, `canceled`, `incomplete_message`, ...; the table in the crate
        /// docs lists them all).
        kind: &'static str,
        /// The HTTP/2 error code, when the failure was an HTTP/2 reset or GOAWAY.
        h2_reason: Option<&'static str>,
        /// A short description (`send`, `response body`).
        what: &'static str,
        /// The hyper error.
        #[source]
        source: hyper::Error,
    },
    /// The server answered with a status that is not a success.
    #[error("HTTP {status} ({content_type}): {excerpt:?}")]
    Status {
        /// The status code.
        status: u16,
        /// The response's `Content-Type`, or `-`.
        content_type: String,
        /// The first bytes of the body, lossily decoded.
        excerpt: String,
        /// The response headers (`Retry-After` is read from them).
        headers: Box<http::HeaderMap>,
    },
    /// The response was a success but not what the target expects (an HTML page from a
    /// gateway, an empty body, invalid JSON, a missing field).
    #[error(
        "unexpected response (HTTP {status}, {content_type}): {reason}; body starts {excerpt:?}"
    )]
    Unexpected {
        /// The status code.
        status: u16,
        /// The response's `Content-Type`, or `-`.
        content_type: String,
        /// What was wrong.
        reason: String,
        /// The first bytes of the body, lossily decoded.
        excerpt: String,
    },
    /// The response ended before the length its `Content-Length` announced (an HTTP/2
    /// stream reset with NO_ERROR in the middle of the body, which hyper reports as a clean
    /// end). The request may have been processed.
    #[error("response truncated: {got} of {expected} bytes")]
    Truncated {
        /// The announced length.
        expected: u64,
        /// The bytes received.
        got: u64,
    },
    /// The response body was longer than `max_response_bytes`.
    #[error("response body longer than {limit} bytes")]
    ResponseTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The request body could not be read (a file vanished). Never retried.
    #[error("reading the upload body failed: {0}")]
    Body(#[source] std::io::Error),
    /// The request could not be built (invalid URL, signing failed). Never retried.
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl AttemptError {
    /// The retry class of this attempt's failure, with any server pushback.
    pub fn failure(&self) -> Failure {
        match self {
            AttemptError::Connect { .. } => Failure::new(Class::NotSent),
            AttemptError::Transport { class, .. } => Failure::new(*class),
            AttemptError::Truncated { .. } => Failure::new(Class::MaybeProcessed),
            AttemptError::Status {
                status, headers, ..
            } => Failure::response(*status, headers),
            AttemptError::Tls { .. }
            | AttemptError::Unexpected { .. }
            | AttemptError::ResponseTooLarge { .. }
            | AttemptError::Body(_)
            | AttemptError::Invalid(_) => Failure::new(Class::Permanent),
        }
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            AttemptError::Status { status, .. } | AttemptError::Unexpected { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    pub(crate) fn unexpected(
        status: u16,
        content_type: &str,
        body: &[u8],
        reason: impl Into<String>,
    ) -> Self {
        AttemptError::Unexpected {
            status,
            content_type: content_type.to_owned(),
            reason: reason.into(),
            excerpt: excerpt(body),
        }
    }
}

/// The first [`EXCERPT_LEN`] bytes of a body, lossily decoded, whitespace collapsed.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let cut = &body[..body.len().min(EXCERPT_LEN)];
    let s = String::from_utf8_lossy(cut);
    let mut out = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if body.len() > EXCERPT_LEN {
        out.push('…');
    }
    out
}

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UploadError {
    /// Every attempt the retry policy allowed failed (or the failure was not retryable).
    #[error("{target}: {error}")]
    Failed {
        /// The target's name.
        target: String,
        /// The retry report: reason, attempts, elapsed time, last error.
        #[source]
        error: Box<RetryError<AttemptError>>,
    },
    /// The server answered 2xx but not with what the target expects (HTML from a gateway,
    /// an empty body, invalid JSON, a missing field). Not retried: the request was processed.
    #[error("{target}: {error}")]
    Unexpected {
        /// The target's name.
        target: String,
        /// An [`AttemptError::Unexpected`] with status, content type and a body excerpt.
        #[source]
        error: AttemptError,
    },
    /// The body is larger than `max_body_bytes` (or the target's own limit).
    #[error("body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The body size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The body could not be opened.
    #[error("cannot read the upload body: {0}")]
    Body(#[source] std::io::Error),
    /// The client or target configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A request of an S3 multipart upload (a part, or CompleteMultipartUpload) failed for
    /// good; no further parts were sent and the upload was aborted (AbortMultipartUpload)
    /// unless `aborted` is false. `error` is the failed request's own error.
    #[error("{target}: {step}{} failed ({}): {error}", part.map(|p| format!(" {p}")).unwrap_or_default(), if *aborted { "multipart upload aborted" } else { "abort of the multipart upload failed" })]
    MultipartStep {
        /// The target's name.
        target: String,
        /// The S3 operation: `UploadPart` or `CompleteMultipartUpload`.
        step: &'static str,
        /// The 1-based part number, for `UploadPart`.
        part: Option<u32>,
        /// Whether AbortMultipartUpload succeeded.
        aborted: bool,
        /// The failed request's error ([`UploadError::Failed`] or [`UploadError::Unexpected`]).
        #[source]
        error: Box<UploadError>,
    },
    /// Every target of a fallback chain failed; one error per target, in order.
    #[error("all {} targets failed: {}", .0.len(), .0.iter().map(|(t, e)| format!("[{t}: {e}]")).collect::<Vec<_>>().join(" "))]
    AllTargetsFailed(Vec<(String, UploadError)>),
}

impl UploadError {
    /// Whether trying the same upload again later might succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            UploadError::Failed { error, .. } => {
                error.is_retryable()
                    || matches!(
                        error.last_class(),
                        Some(Class::NotSent | Class::Refused | Class::MaybeProcessed)
                    )
            }
            UploadError::AllTargetsFailed(v) => v.iter().any(|(_, e)| e.is_retryable()),
            UploadError::MultipartStep { error, .. } => error.is_retryable(),
            UploadError::Unexpected { .. }
            | UploadError::TooLarge { .. }
            | UploadError::Body(_)
            | UploadError::Config(_) => false,
        }
    }

    /// The last attempt's error, if the upload got that far.
    pub fn last_attempt_error(&self) -> Option<&AttemptError> {
        match self {
            UploadError::Failed { error, .. } => error.last_error.as_ref(),
            UploadError::Unexpected { error, .. } => Some(error),
            UploadError::MultipartStep { error, .. } => error.last_attempt_error(),
            _ => None,
        }
    }

    /// The HTTP status the server answered last, if any.
    pub fn status(&self) -> Option<u16> {
        self.last_attempt_error().and_then(AttemptError::status)
    }

    /// Why retrying stopped, for [`UploadError::Failed`].
    pub fn stop_reason(&self) -> Option<StopReason> {
        match self {
            UploadError::Failed { error, .. } => Some(error.reason),
            UploadError::MultipartStep { error, .. } => error.stop_reason(),
            _ => None,
        }
    }

    /// The attempt log, for [`UploadError::Failed`] (of the failed request, for
    /// [`UploadError::MultipartStep`]).
    pub fn attempts(&self) -> &[AttemptLog] {
        match self {
            UploadError::Failed { error, .. } => &error.attempts,
            UploadError::MultipartStep { error, .. } => error.attempts(),
            _ => &[],
        }
    }

    /// Time spent, for [`UploadError::Failed`].
    pub fn elapsed(&self) -> Option<Duration> {
        match self {
            UploadError::Failed { error, .. } => Some(error.elapsed),
            UploadError::MultipartStep { error, .. } => error.elapsed(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_is_short_and_flat() {
        let html = format!("<html>\n  <body>{}</body></html>", "x".repeat(1000));
        let e = excerpt(html.as_bytes());
        assert!(e.starts_with("<html> <body>xx"));
        assert!(e.chars().count() <= EXCERPT_LEN + 1);
    }

    #[test]
    fn classes() {
        let e = AttemptError::unexpected(200, "text/html", b"<html>", "not JSON");
        assert_eq!(e.failure().class, Class::Permanent);
        assert_eq!(e.status(), Some(200));
        assert!(e.to_string().contains("text/html"));
    }
}
