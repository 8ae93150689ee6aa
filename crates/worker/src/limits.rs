//! Frame limits on the worker's side: results too large for the gateway's frame limit are
//! replaced by a `result_too_large` error before they are stored or sent.

use kiln_protocol::messages::{ResultStatus, TaskError, TaskResult};
use kiln_protocol::{Envelope, Message};

/// The largest `result` frame this worker sends: its own `max_result_bytes`, lowered to the
/// gateway's `welcome.max_frame_bytes` when the gateway announced one.
pub(crate) fn result_limit(max_result_bytes: usize, welcome: Option<u64>) -> usize {
    welcome
        .and_then(|w| usize::try_from(w).ok())
        .map_or(max_result_bytes, |w| w.min(max_result_bytes))
}

/// Bytes of the frame `r` goes out in from `source` (with the widest timestamp).
fn frame_len(r: &TaskResult, source: &str) -> usize {
    Envelope::new(Message::Result(r.clone()), u64::MAX)
        .from_source(source)
        .encode()
        .len()
}

/// `r` when its frame fits `limit`; otherwise the error result that replaces it: status
/// `error`, code `result_too_large` (not retried), pointing the handler to the files API.
/// The stage timings are kept.
pub(crate) fn fit_result(r: TaskResult, source: &str, limit: usize) -> TaskResult {
    let len = frame_len(&r, source);
    if len <= limit {
        return r;
    }
    tracing::warn!(message = "result too large for a frame; failing the task", lease = %r.lease, bytes = len, limit);
    TaskResult {
        status: ResultStatus::Error,
        output: None,
        error: Some(TaskError::result_too_large(len, limit)),
        usage: None,
        ..r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(bytes: usize) -> TaskResult {
        TaskResult {
            lease: "l-1".into(),
            status: ResultStatus::Ok,
            output: Some(serde_json::json!({"b64": "A".repeat(bytes)})),
            error: None,
            usage: None,
            timings: None,
        }
    }

    #[test]
    fn a_result_over_the_limit_becomes_result_too_large() {
        assert_eq!(result_limit(1 << 20, Some(4096)), 4096);
        assert_eq!(result_limit(4096, Some(1 << 20)), 4096);
        assert_eq!(result_limit(4096, None), 4096);
        let small = fit_result(ok(100), "worker:w", 4096);
        assert_eq!(small.status, ResultStatus::Ok);
        let big = fit_result(ok(10_000), "worker:w", 4096);
        assert_eq!(big.status, ResultStatus::Error);
        assert!(big.output.is_none());
        let err = big.error.unwrap();
        assert_eq!(err.code, "result_too_large");
        assert!(!err.retryable);
        assert!(err.message.contains("POST /v1/files"), "{}", err.message);
    }
}
