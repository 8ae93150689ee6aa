//! kiln-upload: a pooled HTTP/1.1 + HTTP/2 upload client that survives GOAWAY, stream
//! resets and stale connections without giving up connection reuse.
//!
//! Every attempt's outcome is classified for [kiln_retry]: a remote GOAWAY NO_ERROR or
//! REFUSED_STREAM means the server never processed the request, so it is replayed at once
//! on a fresh connection for any method; other resets, EOFs and timeouts are replayed only
//! for idempotent requests; TLS failures and our own body failing never. A request whose
//! connection ended before it was written (hyper handed it back, or still held it when the
//! connection task ended) is resent at once on a new connection. Each transport error
//! carries a stable `kind` name ([`AttemptError::Transport`]). Bodies are replayable (bytes,
//! or file ranges reopened per attempt). Connections are pooled, rotated after
//! `max_requests_per_connection` (or the limit learned from a server's GOAWAY) and dropped
//! after `pool_idle_timeout`; for a busy HTTP/2 host the next connection is opened in the
//! background before it is needed, and requests that still had to wait for a handshake are
//! counted ([`CounterSnapshot::handshake_waits`]).
//!
//! Targets implement [`UploadTarget`]: [`Multipart`] form POST, [`PresignedPut`], [`S3`]
//! (SigV4, multipart above a threshold), [`JsonBase64`], and [`Fallback`] chains.
//! [`fetch_image`] downloads an image from a URL someone else named, refusing addresses
//! that are not globally reachable (SSRF protection) unless its [`FetchPolicy`] allows them;
//! [`post`] sends one POST under the same checks (webhook deliveries).
//!
//! ```
//! use kiln_upload::{PresignedPut, UploadClient, UploadConfig, UploadError, UploadFile};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut cfg = UploadConfig::default();
//! cfg.retry.max_retries = 1;
//! cfg.retry.initial_backoff = std::time::Duration::from_millis(10);
//! let client = UploadClient::new(cfg).expect("valid config");
//!
//! // Nothing listens on port 9: the connect fails twice (never sent, so retried even for a
//! // POST) and the error carries the attempt log.
//! let target = PresignedPut::new("http://127.0.0.1:9/bucket/cat.png".parse().expect("url"));
//! let file = UploadFile::new(b"\x89PNG...".to_vec(), "cat.png", "image/png");
//! let err = client.upload(&target, &file).await.expect_err("nothing listens");
//! assert!(matches!(err, UploadError::Failed { .. }));
//! assert_eq!(err.attempts().len(), 2);
//! assert!(err.is_retryable());
//! # }
//! ```

mod body;
mod classify;
mod client;
mod config;
mod error;
mod fetch;
mod metrics;
mod pool;
mod settled;
mod spare;
mod targets;
mod tls;

pub use body::{Payload, Progress};
pub use client::{HttpRequest, Sent, Timings, UploadClient};
pub use config::{ConnectionPolicy, UploadConfig};
pub use error::{AttemptError, EXCERPT_LEN, UploadError};
pub use fetch::{FetchError, FetchPolicy, PostResponse, fetch_image, post};
pub use kiln_retry::{Class, RetryConfig};
pub use metrics::{CounterSnapshot, MetricEvent, MetricsHook, UploadCounters};
pub use targets::{
    BoxFuture, Fallback, JsonBase64, Multipart, PresignedPut, S3, S3Config, UploadFile,
    UploadResult, UploadTarget,
};
