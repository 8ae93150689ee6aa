//! The upload client: pooled connections, one retry policy, attempts classified.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Uri, header};
use http_body_util::BodyExt;
use kiln_retry::{AttemptInfo, AttemptLog, Class, RetryPolicy, is_idempotent_method};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::body::{BodySpec, Payload, Progress};
use crate::config::{ConnectionPolicy, UploadConfig};
use crate::error::{AttemptError, UploadError, excerpt};
use crate::metrics::{MetricEvent, MetricsHook};
use crate::pool::{Key, Pool, PoolSettings};

/// Signs a request's head before each attempt (S3 SigV4 signatures carry a timestamp).
pub(crate) type Signer = Arc<dyn Fn(&mut http::request::Parts) -> Result<(), String> + Send + Sync>;

/// Where the time of the successful attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Timings {
    /// TCP connect, when the attempt opened a connection.
    pub connect: Option<Duration>,
    /// TLS handshake, when the attempt opened a TLS connection.
    pub tls: Option<Duration>,
    /// From the start of the attempt to the response headers.
    pub first_byte: Duration,
    /// From the start of the upload (all attempts and sleeps) to the end of the response.
    pub total: Duration,
}

/// One HTTP request to send with retries; the low-level entry point used by the targets.
#[derive(Clone)]
pub struct HttpRequest {
    /// Method.
    pub method: Method,
    /// Absolute `http://` or `https://` URL.
    pub uri: Uri,
    /// Headers (`Host` and `Content-Length` are set by the client).
    pub headers: HeaderMap,
    body: BodySpec,
    /// Whether the request may be replayed after the server may have processed it.
    /// Defaults to the method's idempotence (PUT yes, POST no).
    pub idempotent: bool,
    /// Progress of the body, per attempt.
    pub progress: Option<Progress>,
    pub(crate) signer: Option<Signer>,
}

impl std::fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRequest")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("body_len", &self.body.len())
            .field("idempotent", &self.idempotent)
            .finish_non_exhaustive()
    }
}

impl HttpRequest {
    /// A request whose body is the concatenation of `body` segments.
    pub fn new(method: Method, uri: Uri, body: Vec<Payload>) -> Self {
        let idempotent = is_idempotent_method(&method);
        Self {
            method,
            uri,
            headers: HeaderMap::new(),
            body: BodySpec::new(body),
            idempotent,
            progress: None,
            signer: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Body length in bytes.
    pub fn body_len(&self) -> u64 {
        self.body.len()
    }
}

/// A response with status 2xx, after retries.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Sent {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body (at most `max_response_bytes`).
    pub body: Bytes,
    /// Every attempt, the successful one last.
    pub attempts: Vec<AttemptLog>,
    /// Whether the successful attempt reused a pooled connection.
    pub reused_connection: bool,
    /// Whether the successful attempt used HTTP/2.
    pub h2: bool,
    /// Timings of the successful attempt.
    pub timings: Timings,
}

impl Sent {
    /// The `Content-Type` header, or `-`.
    pub fn content_type(&self) -> &str {
        content_type(&self.headers)
    }
}

fn content_type(h: &HeaderMap) -> &str {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

struct AttemptOk {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    reused: bool,
    h2: bool,
    connect: Option<Duration>,
    tls: Option<Duration>,
    first_byte: Duration,
}

struct Inner {
    cfg: UploadConfig,
    pool: Pool,
    policy: RetryPolicy,
    metrics: Option<Arc<dyn MetricsHook>>,
}

/// A pooled HTTP/1.1 + HTTP/2 upload client. Cheap to clone; clones share the pool, the
/// retry budget and the metrics hook.
#[derive(Clone)]
pub struct UploadClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for UploadClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadClient")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl UploadClient {
    /// Builds a client. Reads `extra_ca_pem` when set.
    pub fn new(cfg: UploadConfig) -> Result<Self, UploadError> {
        Self::build(cfg, None)
    }

    /// Builds a client that reports events to `metrics`.
    pub fn with_metrics(
        cfg: UploadConfig,
        metrics: Arc<dyn MetricsHook>,
    ) -> Result<Self, UploadError> {
        Self::build(cfg, Some(metrics))
    }

    fn build(
        cfg: UploadConfig,
        metrics: Option<Arc<dyn MetricsHook>>,
    ) -> Result<Self, UploadError> {
        let tls = crate::tls::client_config(&cfg)?;
        let mut retry = cfg.retry.clone();
        if retry.per_attempt_timeout.is_none() {
            retry.per_attempt_timeout = Some(cfg.attempt_timeout);
        }
        let mut policy = RetryPolicy::new(retry).map_err(|e| UploadError::Config(e.to_string()))?;
        if let Some(m) = metrics.clone() {
            policy = policy.on_retry(move |ev| {
                m.record(MetricEvent::Retry {
                    class: ev.class,
                    transparent: ev.transparent,
                })
            });
        }
        let settings = PoolSettings {
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.pool_idle_timeout,
            max_idle_per_host: cfg.pool_max_idle_per_host,
            keep_alive_interval: cfg.http2_keep_alive_interval,
            keep_alive_timeout: cfg.http2_keep_alive_timeout,
            max_requests: cfg.max_requests_per_connection.max(1),
            pooled: cfg.connection_policy == ConnectionPolicy::Pooled,
        };
        let pool = Pool::new(tls, settings, metrics.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                pool,
                policy,
                metrics,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UploadConfig {
        &self.inner.cfg
    }

    /// Connections opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.inner.pool.connections_opened()
    }

    /// Sends `req` under the retry policy and returns the 2xx response. Non-2xx responses,
    /// transport failures and timeouts are retried as the policy allows, then reported as
    /// [`UploadError::Failed`] with the attempt log.
    pub async fn send(&self, target: &str, req: HttpRequest) -> Result<Sent, UploadError> {
        let size = req.body.len();
        if size > self.inner.cfg.max_body_bytes {
            return Err(UploadError::TooLarge {
                size,
                limit: self.inner.cfg.max_body_bytes,
            });
        }
        let key = Key::from_uri(&req.uri).map_err(|e| UploadError::Config(e.to_string()))?;
        let span = tracing::info_span!(
            "request",
            target,
            method = %req.method,
            host = %key.host,
            size,
        );
        let start = Instant::now();
        let result = self
            .inner
            .policy
            .request(key.host.clone())
            .idempotent(req.idempotent)
            .run(
                |info| self.attempt(&key, &req, info),
                |e: &AttemptError| e.failure(),
            )
            .instrument(span)
            .await;
        match result {
            Ok(done) => {
                let v = done.value;
                Ok(Sent {
                    status: v.status,
                    headers: v.headers,
                    body: v.body,
                    attempts: done.attempts,
                    reused_connection: v.reused,
                    h2: v.h2,
                    timings: Timings {
                        connect: v.connect,
                        tls: v.tls,
                        first_byte: v.first_byte,
                        total: start.elapsed(),
                    },
                })
            }
            Err(error) => Err(UploadError::Failed {
                target: target.to_owned(),
                error: Box::new(error),
            }),
        }
    }

    async fn attempt(
        &self,
        key: &Key,
        req: &HttpRequest,
        info: AttemptInfo,
    ) -> Result<AttemptOk, AttemptError> {
        let r = self.attempt_inner(key, req, info).await;
        if let Some(m) = &self.inner.metrics {
            let (class, reused) = match &r {
                Ok(ok) => (None, ok.reused),
                Err(e) => (Some(e.failure().class), false),
            };
            m.record(MetricEvent::Attempt { class, reused });
        }
        r
    }

    async fn attempt_inner(
        &self,
        key: &Key,
        req: &HttpRequest,
        info: AttemptInfo,
    ) -> Result<AttemptOk, AttemptError> {
        let started = Instant::now();
        let mut stale_retry = false;
        let (lease, res, h2) = loop {
            let body = req
                .body
                .open(req.progress.clone())
                .await
                .map_err(AttemptError::Body)?;
            let fresh = stale_retry
                || info.transparent
                || self.inner.cfg.connection_policy == ConnectionPolicy::FreshPerRequest;
            let mut lease = self.inner.pool.checkout(key, fresh).await?;
            let h2 = lease.is_h2();
            tracing::debug!(
                conn = lease.conn.id,
                reused = lease.reused,
                h2,
                transparent = info.transparent,
                "sending"
            );

            let mut builder = http::Request::builder().method(req.method.clone());
            builder = if h2 {
                builder.uri(req.uri.clone())
            } else {
                builder.uri(req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            };
            let http_req = builder
                .body(())
                .map_err(|e| AttemptError::Invalid(e.to_string()))?;
            let (mut parts, ()) = http_req.into_parts();
            parts.headers = req.headers.clone();
            if !h2 && let Some(a) = req.uri.authority() {
                let host = HeaderValue::from_str(a.as_str())
                    .map_err(|e| AttemptError::Invalid(e.to_string()))?;
                parts.headers.insert(header::HOST, host);
            }
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(req.body.len()));
            if let Some(sign) = &req.signer {
                // SigV4 signs the absolute URL's host and path.
                let uri_for_signing = parts.uri.clone();
                parts.uri = req.uri.clone();
                sign(&mut parts).map_err(AttemptError::Invalid)?;
                parts.uri = uri_for_signing;
            }
            match lease.send(http::Request::from_parts(parts, body)).await {
                Ok(res) => break (lease, res, h2),
                // The connection ended before the request was written (a pooled connection
                // that was already gone, as hyper-util resends too, or an HTTP/2 stream still
                // waiting for a concurrency slot when the server's GOAWAY arrived): nothing
                // reached the server, so use a new connection at once, once per attempt.
                Err(AttemptError::Transport {
                    class: Class::NotSent,
                    kind,
                    ..
                }) if !stale_retry && kind != "handshake" => {
                    tracing::debug!(
                        conn = lease.conn.id,
                        kind,
                        "connection ended before the request was written; resending"
                    );
                    if let Some(m) = &self.inner.metrics {
                        m.record(MetricEvent::Resent { kind });
                    }
                    stale_retry = true;
                }
                Err(e) => return Err(e),
            }
        };
        let first_byte = started.elapsed();
        let (head, mut incoming) = res.into_parts();
        let limit = self.inner.cfg.max_response_bytes;
        let mut buf = BytesMut::new();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| lease.transport_error(e, "response body"))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    lease.conn.mark_broken();
                    return Err(AttemptError::ResponseTooLarge { limit });
                }
                buf.extend_from_slice(&data);
            }
        }
        // hyper ends an HTTP/2 body quietly at RST_STREAM(NO_ERROR), which RFC 9113 allows
        // only after a complete response: a shorter body than announced is a failure.
        if let Some(expected) = head
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && (buf.len() as u64) < expected
            && head.status != http::StatusCode::NO_CONTENT
            && req.method != Method::HEAD
        {
            return Err(AttemptError::Truncated {
                expected,
                got: buf.len() as u64,
            });
        }
        let reused = lease.reused;
        let (connect, tls) = if reused {
            (None, None)
        } else {
            (Some(lease.conn.connect_time), lease.conn.tls_time)
        };
        lease.release(true);
        let status = head.status.as_u16();
        let body = buf.freeze();
        if !head.status.is_success() {
            return Err(AttemptError::Status {
                status,
                content_type: content_type(&head.headers).to_owned(),
                excerpt: excerpt(&body),
                headers: Box::new(head.headers),
            });
        }
        Ok(AttemptOk {
            status,
            headers: head.headers,
            body,
            reused,
            h2,
            connect,
            tls,
            first_byte,
        })
    }

    pub(crate) fn record_upload(&self, ok: bool) {
        if let Some(m) = &self.inner.metrics {
            m.record(MetricEvent::Upload { ok });
        }
    }
}
