//! Why an upstream call failed, and the attempt log recorded on the task: kiln-retry's log
//! mapped to [`Attempt`]s, kiln-upload's errors mapped to [`ProviderError`]s.

use kiln_upload::{AttemptError, Class, UploadError};
use serde_json::{Value, json};

use crate::references::UploadRecord;

/// One attempt of the call, as recorded on the task.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct Attempt {
    /// 1-based.
    pub attempt: u32,
    /// `not_sent`, `refused`, `maybe_processed`, `response`, `permanent`; none for success.
    pub class: Option<&'static str>,
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    /// The wait before the next attempt, ms.
    pub delay_ms: Option<u64>,
    /// What went wrong.
    pub error: Option<String>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The upstream answered a final 4xx (403 included); its message is kept.
    #[error("the upstream answered {status}: {message}")]
    Rejected {
        /// Status.
        status: u16,
        /// The upstream's message.
        message: String,
        /// Every attempt.
        attempts: Vec<Attempt>,
    },
    /// 429 and no retry left within the deadline.
    #[error("the upstream is rate limiting: {message}")]
    RateLimited {
        /// The upstream's message.
        message: String,
        /// Every attempt.
        attempts: Vec<Attempt>,
    },
    /// Transport failures or 5xx, after the retries the policy allowed.
    #[error("the upstream call failed: {message}")]
    Failed {
        /// What happened last.
        message: String,
        /// Whether the upstream may have processed the call (so it must not be resent).
        maybe_processed: bool,
        /// Every attempt.
        attempts: Vec<Attempt>,
    },
    /// The upstream answered 2xx with something that is not an images response, or a
    /// result image could not be fetched (SSRF refusal, size, type, timeout).
    #[error("the upstream's result is unusable: {message}")]
    BadResult {
        /// What was wrong.
        message: String,
        /// Every attempt.
        attempts: Vec<Attempt>,
    },
    /// A reference could not be uploaded to the target (`references = "upload"`); the
    /// upstream was not called. The message carries kiln-upload's report: the status, a
    /// body excerpt and why retrying stopped.
    #[error("uploading {part} to the target `{target}` failed{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Upload {
        /// `image[0]`, … or `mask`.
        part: String,
        /// The target's name.
        target: String,
        /// The status the target answered last, if it answered.
        status: Option<u16>,
        /// kiln-upload's error.
        message: String,
        /// Whether a later attempt of the task may succeed (retries ran out on a
        /// transient failure).
        retryable: bool,
        /// Every attempt of the failed upload.
        attempts: Vec<Attempt>,
        /// The uploads that succeeded before it.
        uploads: Vec<UploadRecord>,
    },
    /// The call could not be built (bad configuration or input).
    #[error("invalid upstream call: {0}")]
    Invalid(String),
}

impl ProviderError {
    /// A stable code for the task error.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Rejected {
                status: 400 | 422, ..
            } => "upstream_rejected",
            ProviderError::Rejected { .. } => "upstream_refused",
            ProviderError::RateLimited { .. } => "upstream_rate_limited",
            ProviderError::Failed { .. } => "upstream_failed",
            ProviderError::BadResult { .. } => "upstream_bad_result",
            ProviderError::Upload { .. } => "upstream_upload_failed",
            ProviderError::Invalid(_) => "invalid_input",
        }
    }

    /// Whether running the task again later is safe and may succeed: only when no attempt
    /// can have reached the upstream.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Failed {
                maybe_processed, ..
            } => !maybe_processed,
            ProviderError::Upload { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Whether the upstream itself was certainly not called (the call failed before it:
    /// an upload, or a refused connection).
    pub fn upstream_untouched(&self) -> bool {
        matches!(
            self,
            ProviderError::Upload { .. } | ProviderError::Invalid(_)
        ) || self.is_retryable()
    }

    /// Every attempt of the call.
    pub fn attempts(&self) -> &[Attempt] {
        match self {
            ProviderError::Rejected { attempts, .. }
            | ProviderError::RateLimited { attempts, .. }
            | ProviderError::Failed { attempts, .. }
            | ProviderError::BadResult { attempts, .. }
            | ProviderError::Upload { attempts, .. } => attempts,
            ProviderError::Invalid(_) => &[],
        }
    }
}

/// kiln-retry's attempt log as recorded on the task; `last` supplies the status of the
/// final failed attempt.
pub(crate) fn log_attempts(
    attempts: &[kiln_retry::AttemptLog],
    last: Option<&AttemptError>,
) -> Vec<Attempt> {
    let n = attempts.len();
    attempts
        .iter()
        .enumerate()
        .map(|(i, a)| Attempt {
            attempt: a.attempt,
            class: a.class.map(|c| c.as_str()),
            status: a.class.and_then(|c| c.status()).or_else(|| {
                if i + 1 == n {
                    last.and_then(AttemptError::status)
                } else {
                    None
                }
            }),
            delay_ms: a.delay.map(|d| d.as_millis() as u64),
            error: a.error.clone(),
        })
        .collect()
}

/// The upstream's own message from an error body excerpt (`{"error":{"message":…}}`).
fn upstream_message(excerpt: &str) -> String {
    serde_json::from_str::<Value>(excerpt)
        .ok()
        .and_then(|v| {
            v["error"]["message"]
                .as_str()
                .or_else(|| v["error"].as_str())
                .or_else(|| v["message"].as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| excerpt.to_owned())
}

pub(crate) fn failure(e: &UploadError) -> ProviderError {
    let last = e.last_attempt_error();
    let mut attempts = log_attempts(e.attempts(), last);
    // A failed request of a multi-request upload (an S3 part) is judged by its own error.
    let request = match e {
        UploadError::MultipartStep { error, .. } => error.as_ref(),
        other => other,
    };
    // Why retrying stopped, on the last attempt.
    if let (UploadError::Failed { error, .. }, Some(a)) = (request, attempts.last_mut()) {
        a.error = Some(format!(
            "{}; stopped: {} ({})",
            a.error.as_deref().unwrap_or("failed"),
            error.reason.as_str(),
            error.detail
        ));
    }
    let maybe = e
        .attempts()
        .iter()
        .any(|a| !matches!(a.class, Some(Class::NotSent | Class::Refused)));
    match last {
        Some(AttemptError::Status {
            status, excerpt, ..
        }) => {
            let message = upstream_message(excerpt);
            match *status {
                429 => ProviderError::RateLimited { message, attempts },
                s @ 400..=499 if s != 408 => ProviderError::Rejected {
                    status: s,
                    message,
                    attempts,
                },
                s => ProviderError::Failed {
                    message: format!("HTTP {s}: {message}"),
                    maybe_processed: maybe,
                    attempts,
                },
            }
        }
        Some(AttemptError::Unexpected { .. } | AttemptError::ResponseTooLarge { .. }) => {
            ProviderError::BadResult {
                message: e.to_string(),
                attempts,
            }
        }
        _ => match request {
            UploadError::Failed { .. } => ProviderError::Failed {
                message: e.to_string(),
                maybe_processed: maybe,
                attempts,
            },
            other => ProviderError::Invalid(other.to_string()),
        },
    }
}

/// A short text of the attempt log for the task's error message.
pub fn summary(attempts: &[Attempt]) -> String {
    attempts
        .iter()
        .map(|a| {
            let what = match (a.class, a.status) {
                (_, Some(s)) => format!("HTTP {s}"),
                (Some(c), None) => c.to_owned(),
                (None, None) => "ok".to_owned(),
            };
            let stop = a
                .error
                .as_deref()
                .and_then(|e| e.split_once("; stopped: "))
                .map(|(_, s)| format!(", stopped: {s}"))
                .unwrap_or_default();
            match a.delay_ms {
                Some(d) => format!("#{} {what}, then waited {d} ms", a.attempt),
                None => format!("#{} {what}{stop}", a.attempt),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The attempt log as JSON, for the task output.
pub fn attempts_json(attempts: &[Attempt]) -> Value {
    json!(attempts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_messages_are_extracted() {
        assert_eq!(
            upstream_message(r#"{"error":{"message":"quota exceeded","type":"x"}}"#),
            "quota exceeded"
        );
        assert_eq!(
            upstream_message("<html>forbidden</html>"),
            "<html>forbidden</html>"
        );
    }
}
