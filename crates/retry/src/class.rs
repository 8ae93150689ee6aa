//! What is known about an attempt that did not succeed.

use std::fmt;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method};

use crate::pushback::pushback_from_headers;

/// What is known about whether the server processed a failed attempt. The class, not the
/// error type, decides whether the request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Class {
    /// The request never left the client (connect failed, nothing written). Retried for any
    /// method, with backoff.
    NotSent,
    /// The server guarantees it did not process the request: HTTP/2 GOAWAY with NO_ERROR for
    /// a stream above its last-stream-id, or RST_STREAM REFUSED_STREAM (RFC 9113 section
    /// 8.7). Retried for any method at once, on a new connection, without counting against
    /// `max_retries` or the budget (up to `max_transparent_retries` times).
    Refused,
    /// The server may have processed it: other stream resets, EOF, timeouts. Retried only
    /// when the request is idempotent.
    MaybeProcessed,
    /// The server answered with this status.
    Response {
        /// The HTTP status code.
        status: u16,
    },
    /// Can never succeed by retrying (e.g. a rejected TLS certificate, an invalid request).
    Permanent,
}

impl Class {
    /// A short stable name for logs and metrics: `not_sent`, `refused`, `maybe_processed`,
    /// `response`, `permanent`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Class::NotSent => "not_sent",
            Class::Refused => "refused",
            Class::MaybeProcessed => "maybe_processed",
            Class::Response { .. } => "response",
            Class::Permanent => "permanent",
        }
    }

    /// The HTTP status, for [`Class::Response`].
    pub fn status(&self) -> Option<u16> {
        match self {
            Class::Response { status } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Class::Response { status } => write!(f, "response {status}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// One failed attempt as the policy sees it: its class, and what the server asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What is known about the server having processed the attempt.
    pub class: Class,
    /// How long the server asked the client to wait (`Retry-After`, `X-RateLimit-Reset`).
    pub pushback: Option<Duration>,
    /// Whether the attempt ended by timing out (a retry after a timeout costs more budget).
    pub timed_out: bool,
}

impl Failure {
    /// A failure of the given class with no pushback.
    pub fn new(class: Class) -> Self {
        Self {
            class,
            pushback: None,
            timed_out: false,
        }
    }

    /// A response failure, reading `Retry-After` / `X-RateLimit-Reset` from its headers.
    pub fn response(status: u16, headers: &HeaderMap) -> Self {
        Self {
            class: Class::Response { status },
            pushback: pushback_from_headers(headers, SystemTime::now()),
            timed_out: false,
        }
    }

    /// An attempt that ran out of time: the server may have processed it.
    pub fn timeout() -> Self {
        Self {
            class: Class::MaybeProcessed,
            pushback: None,
            timed_out: true,
        }
    }

    /// Sets the server's requested wait.
    pub fn with_pushback(mut self, wait: Duration) -> Self {
        self.pushback = Some(wait);
        self
    }
}

/// Whether a method is idempotent by definition (RFC 9110 section 9.2.2): GET, HEAD,
/// OPTIONS, TRACE, PUT and DELETE. POST and PATCH are idempotent only when the caller makes
/// them so, e.g. with an idempotency key.
pub fn is_idempotent_method(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Statuses after which the request may have been processed (a gateway error or a server
/// error mid-request): retried only for idempotent requests even when listed in
/// `retry_statuses`. 408, 429 and 503 say the request was not processed.
pub(crate) fn status_may_have_processed(status: u16) -> bool {
    status >= 500 && status != 503
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent_method(&Method::GET));
        assert!(is_idempotent_method(&Method::PUT));
        assert!(is_idempotent_method(&Method::DELETE));
        assert!(!is_idempotent_method(&Method::POST));
        assert!(!is_idempotent_method(&Method::PATCH));
    }

    #[test]
    fn processed_statuses() {
        for s in [500, 502, 504, 507] {
            assert!(status_may_have_processed(s), "{s}");
        }
        for s in [408, 429, 503, 401, 403] {
            assert!(!status_may_have_processed(s), "{s}");
        }
    }

    #[test]
    fn names_are_stable() {
        assert_eq!(Class::Refused.to_string(), "refused");
        assert_eq!(Class::Response { status: 503 }.to_string(), "response 503");
        assert_eq!(Class::Response { status: 503 }.status(), Some(503));
    }
}
