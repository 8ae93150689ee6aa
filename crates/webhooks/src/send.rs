//! One delivery attempt over HTTP, through kiln-upload's SSRF-checked connection.

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use kiln_upload::{FetchError, FetchPolicy};

use crate::sign::WebhookHeaders;

/// Longest error excerpt kept from a response body or an error, characters.
pub const EXCERPT_CHARS: usize = 256;

/// Bytes of a response body read for the excerpt; the rest is never read.
const BODY_READ: usize = 4096;

/// How deliveries are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SendConfig {
    /// Time limit of one attempt: resolve, connect, TLS, request and the response head and
    /// excerpt. Default: 15 s.
    pub timeout: Duration,
    /// Endpoints may be at private, link-local, CGNAT and other addresses that are not
    /// globally reachable (`webhooks.allow_private`). Default: false.
    pub allow_private: bool,
    /// Endpoints may be at loopback addresses (127.0.0.0/8, ::1). Kept apart from
    /// `allow_private` as kiln-upload's `FetchPolicy` does; a configuration that sets
    /// `webhooks.allow_private = true` normally sets both. Default: false.
    pub allow_loopback: bool,
    /// `User-Agent` of deliveries. Default: `kiln-webhooks/<version>`.
    pub user_agent: String,
    /// Longest `Retry-After` honoured; a longer one is cut to this. Default: 1 h.
    pub max_retry_after: Duration,
}

impl Default for SendConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(15),
            allow_private: false,
            allow_loopback: false,
            user_agent: concat!("kiln-webhooks/", env!("CARGO_PKG_VERSION")).to_owned(),
            max_retry_after: Duration::from_secs(3600),
        }
    }
}

/// What one attempt's result means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// A 2xx answer: the message is delivered.
    Delivered,
    /// Anything else (3xx included: redirects are never followed; 4xx other than 410, 5xx,
    /// timeouts, connection and TLS errors): try again on the schedule. `retry_after` is the
    /// receiver's `Retry-After` on a 429 or 503 (delta-seconds or an HTTP date, capped at
    /// [`SendConfig::max_retry_after`]).
    Failed {
        /// The wait the receiver asked for, if any.
        retry_after: Option<Duration>,
    },
    /// 410 Gone: the receiver wants no more; the caller disables the endpoint.
    Gone,
    /// The URL is refused by policy (an address that is not allowed, or not an http(s)
    /// URL): not sent, and trying again would be refused again.
    Refused,
}

impl Outcome {
    /// True for [`Outcome::Delivered`].
    pub fn is_delivered(&self) -> bool {
        matches!(self, Self::Delivered)
    }

    /// True for [`Outcome::Failed`]: the message should be tried again (if the schedule has
    /// attempts left).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Failed { .. })
    }

    /// A stable lowercase name, for metric labels and logs: `delivered`, `failed`, `gone`,
    /// `refused`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed { .. } => "failed",
            Self::Gone => "gone",
            Self::Refused => "refused",
        }
    }
}

/// The record of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// From the start of the attempt to its end (answer head and excerpt read, or error).
    pub latency: Duration,
    /// What it means.
    pub outcome: Outcome,
    /// The start of the response body (for answers that are not 2xx) or the error text: at
    /// most [`EXCERPT_CHARS`] characters, valid UTF-8; empty for a 2xx.
    pub excerpt: String,
}

/// Sends one delivery: POST `body` (JSON) to `url` with the three signed headers,
/// `content-type: application/json` and the configured user agent, under `cfg`'s time limit
/// and address policy. Never fails: every result, refusals and timeouts included, is an
/// [`Attempt`]. Each call is its own future; a receiver that never answers holds only its own
/// call, for at most `cfg.timeout`.
pub async fn send(url: &str, headers: &WebhookHeaders, body: Bytes, cfg: &SendConfig) -> Attempt {
    let started = Instant::now();
    let policy = FetchPolicy {
        allow_loopback: cfg.allow_loopback,
        allow_private: cfg.allow_private,
        timeout: cfg.timeout,
        max_bytes: BODY_READ,
        auth: None,
    };
    let (status, outcome, excerpt) = match request_headers(headers, cfg) {
        Err(why) => (None, Outcome::Refused, why),
        Ok(map) => match kiln_upload::post(url, map, body, &policy).await {
            Ok(resp) => judge(resp, cfg),
            Err(e) => failure(&e, cfg),
        },
    };
    Attempt {
        status,
        latency: started.elapsed(),
        outcome,
        excerpt: excerpt_of(&excerpt),
    }
}

fn request_headers(h: &WebhookHeaders, cfg: &SendConfig) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    map.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let ua = HeaderValue::from_str(&cfg.user_agent).map_err(|_| "bad user agent".to_owned())?;
    map.insert(header::USER_AGENT, ua);
    for (name, value) in h.pairs() {
        let v = HeaderValue::from_str(&value).map_err(|_| format!("bad {name} value"))?;
        map.insert(name, v);
    }
    Ok(map)
}

fn judge(resp: kiln_upload::PostResponse, cfg: &SendConfig) -> (Option<u16>, Outcome, String) {
    let status = resp.status;
    let text = String::from_utf8_lossy(&resp.body).trim().to_owned();
    let outcome = if status.is_success() {
        Outcome::Delivered
    } else if status == StatusCode::GONE {
        Outcome::Gone
    } else {
        let pushback = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        let retry_after = pushback
            .then(|| resp.headers.get(header::RETRY_AFTER)?.to_str().ok())
            .flatten()
            .and_then(|v| kiln_retry::parse_retry_after(v, SystemTime::now()))
            .map(|d| d.min(cfg.max_retry_after));
        Outcome::Failed { retry_after }
    };
    let excerpt = match outcome {
        Outcome::Delivered => String::new(),
        _ if status.is_redirection() => {
            let to = resp
                .headers
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            format!("answered {status}; redirects are not followed (location {to:?})")
        }
        _ if text.is_empty() => format!("answered {status}"),
        _ => text,
    };
    (Some(status.as_u16()), outcome, excerpt)
}

fn failure(e: &FetchError, cfg: &SendConfig) -> (Option<u16>, Outcome, String) {
    let outcome = match e {
        FetchError::Refused { .. } | FetchError::BadUrl(_) => Outcome::Refused,
        _ => Outcome::Failed { retry_after: None },
    };
    let text = match e {
        FetchError::Timeout(url) => format!("{url} did not answer within {:?}", cfg.timeout),
        other => other.to_string(),
    };
    (None, outcome, text)
}

/// At most [`EXCERPT_CHARS`] characters of `text`, cut on a character boundary.
fn excerpt_of(text: &str) -> String {
    text.chars().take(EXCERPT_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_bounded_utf8() {
        let long = "é".repeat(1000);
        let e = excerpt_of(&long);
        assert_eq!(e.chars().count(), EXCERPT_CHARS);
        assert!(excerpt_of("short") == "short");
    }

    #[test]
    fn outcome_names_are_stable() {
        let all = [
            Outcome::Delivered,
            Outcome::Failed { retry_after: None },
            Outcome::Gone,
            Outcome::Refused,
        ];
        let names: Vec<_> = all.iter().map(Outcome::as_str).collect();
        assert_eq!(names, ["delivered", "failed", "gone", "refused"]);
        assert_eq!(
            all.iter().map(Outcome::is_retryable).collect::<Vec<_>>(),
            [false, true, false, false]
        );
    }
}
