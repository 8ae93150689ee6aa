//! The async runner on tokio's timer (feature `tokio`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tracing::Instrument as _;

use crate::class::Failure;
use crate::error::{AttemptLog, RetryError};
use crate::policy::{Decision, RetryEvent, RetryPolicy};

/// What the operation learns about the attempt it is making.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AttemptInfo {
    /// 1-based attempt number.
    pub attempt: u32,
    /// Whether this attempt is a transparent retry of a refused request: use a new
    /// connection.
    pub transparent: bool,
    /// The time limit the runner enforces on this attempt.
    pub timeout: Option<Duration>,
}

/// A value produced after retries, with the attempt log.
#[derive(Debug)]
#[non_exhaustive]
pub struct Completed<T> {
    /// The operation's result.
    pub value: T,
    /// Every attempt, the successful one last.
    pub attempts: Vec<AttemptLog>,
    /// Time from the first attempt to the success.
    pub elapsed: Duration,
}

type RefreshHook = dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync;

/// One request to run under a [`RetryPolicy`]; made by [`RetryPolicy::request`].
#[must_use = "a request does nothing until `run` is awaited"]
pub struct Request<'a> {
    policy: &'a RetryPolicy,
    host: String,
    idempotent: bool,
    refresh: Option<Box<RefreshHook>>,
}

impl RetryPolicy {
    /// Starts describing a request to `host` (the key of the shared budget). Requests are
    /// not idempotent unless [`Request::idempotent`] says so.
    pub fn request(&self, host: impl Into<String>) -> Request<'_> {
        Request {
            policy: self,
            host: host.into(),
            idempotent: false,
            refresh: None,
        }
    }
}

impl Request<'_> {
    /// Whether the request may be replayed after it may have been processed (idempotent
    /// method, or an idempotency key the server honours).
    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }

    /// A hook that renews credentials after a 401; when it returns true the request is
    /// retried once.
    pub fn on_unauthorized<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        self.refresh = Some(Box::new(move || Box::pin(hook())));
        self
    }

    /// Runs `op` until it succeeds or the policy stops. `classify` turns an error into a
    /// [`Failure`]. Each attempt runs in a `tracing` span `attempt` with the fields
    /// `attempt`, `class`, `status`, `delay_ms` and `budget_left`.
    pub async fn run<T, E, F, Fut, C>(
        self,
        mut op: F,
        classify: C,
    ) -> Result<Completed<T>, RetryError<E>>
    where
        F: FnMut(AttemptInfo) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&E) -> Failure,
        E: std::fmt::Display,
    {
        let start = tokio::time::Instant::now();
        let mut state = self.policy.start(&self.host, self.idempotent);
        let mut log: Vec<AttemptLog> = Vec::new();
        let mut info = AttemptInfo {
            attempt: 1,
            transparent: false,
            timeout: state.first_attempt_timeout(),
        };
        loop {
            let span = tracing::info_span!(
                "attempt",
                attempt = info.attempt,
                class = tracing::field::Empty,
                status = tracing::field::Empty,
                delay_ms = tracing::field::Empty,
                budget_left = tracing::field::Empty,
            );
            let fut = op(info).instrument(span.clone());
            let result = match info.timeout {
                Some(limit) => tokio::time::timeout(limit, fut).await.ok(),
                None => Some(fut.await),
            };
            let (failure, error) = match result {
                Some(Ok(value)) => {
                    state.on_success();
                    log.push(AttemptLog {
                        attempt: info.attempt,
                        class: None,
                        delay: None,
                        transparent: false,
                        timed_out: false,
                        error: None,
                    });
                    return Ok(Completed {
                        value,
                        attempts: log,
                        elapsed: start.elapsed(),
                    });
                }
                Some(Err(e)) => (classify(&e), Some(e)),
                None => (Failure::timeout(), None),
            };
            span.record("class", failure.class.as_str());
            if let Some(status) = failure.class.status() {
                span.record("status", status);
            }
            let refreshed = match (&self.refresh, failure.class.status()) {
                (Some(hook), Some(401)) => hook().await,
                _ => false,
            };
            let decision = state.on_failure(&failure, start.elapsed(), refreshed);
            let budget_left = state.budget_left();
            span.record("budget_left", budget_left);
            let mut entry = AttemptLog {
                attempt: info.attempt,
                class: Some(failure.class),
                delay: None,
                transparent: false,
                timed_out: failure.timed_out,
                error: Some(match &error {
                    Some(e) => e.to_string(),
                    None => "attempt timed out".to_owned(),
                }),
            };
            match decision {
                Decision::Retry {
                    delay,
                    transparent,
                    attempt_timeout,
                } => {
                    span.record("delay_ms", delay.as_millis() as u64);
                    span.in_scope(|| {
                        tracing::info!(
                            message = "retrying",
                            class = failure.class.as_str(),
                            delay_ms = delay.as_millis() as u64,
                            transparent,
                        )
                    });
                    entry.delay = Some(delay);
                    entry.transparent = transparent;
                    log.push(entry);
                    if let Some(cb) = &self.policy.inner.on_retry {
                        cb(&RetryEvent {
                            attempt: info.attempt,
                            class: failure.class,
                            delay,
                            transparent,
                            budget_left,
                        });
                    }
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    info = AttemptInfo {
                        attempt: info.attempt + 1,
                        transparent,
                        timeout: attempt_timeout,
                    };
                }
                Decision::Stop { reason, detail } => {
                    span.in_scope(|| {
                        tracing::warn!(
                            message = "giving up",
                            reason = reason.as_str(),
                            detail = detail.as_str()
                        )
                    });
                    log.push(entry);
                    return Err(RetryError {
                        reason,
                        detail,
                        attempts: log,
                        elapsed: start.elapsed(),
                        last_error: error,
                    });
                }
            }
        }
    }
}
