//! Server pushback: `Retry-After` and `X-RateLimit-Reset`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

/// Values of `X-RateLimit-Reset` at or above this are Unix timestamps, below it seconds to
/// wait (the two conventions in use; no sane wait is 31 years long).
const EPOCH_THRESHOLD: u64 = 1_000_000_000;

/// How long the server asked the client to wait, from `Retry-After` (delta-seconds or an
/// HTTP-date) or, failing that, `X-RateLimit-Reset` (seconds to wait or a Unix timestamp).
/// `now` is the wall clock used for dates. Returns `None` when neither header is present
/// or parses.
pub fn pushback_from_headers(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    text("retry-after")
        .and_then(|v| parse_retry_after(v, now))
        .or_else(|| text("x-ratelimit-reset").and_then(|v| parse_ratelimit_reset(v, now)))
}

/// Parses a `Retry-After` value: delta-seconds (`"120"`) or an HTTP-date. A date in the
/// past means "now" (zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses an `X-RateLimit-Reset` value: seconds to wait, or a Unix timestamp in seconds.
/// Fractions are accepted.
pub fn parse_ratelimit_reset(value: &str, now: SystemTime) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    if secs >= EPOCH_THRESHOLD as f64 {
        let at = UNIX_EPOCH + Duration::from_secs_f64(secs);
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    } else {
        Some(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = at(1_784_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(42)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(5));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn ratelimit_reset_delta_and_epoch() {
        let now = at(1_784_000_000);
        assert_eq!(
            parse_ratelimit_reset("2.5", now),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            parse_ratelimit_reset("1784000010", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_ratelimit_reset("x", now), None);
    }

    #[test]
    fn retry_after_wins_over_ratelimit_reset() {
        let now = at(1_784_000_000);
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset", HeaderValue::from_static("9"));
        assert_eq!(pushback_from_headers(&h, now), Some(Duration::from_secs(9)));
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(pushback_from_headers(&h, now), Some(Duration::from_secs(3)));
        assert_eq!(pushback_from_headers(&HeaderMap::new(), now), None);
    }
}
