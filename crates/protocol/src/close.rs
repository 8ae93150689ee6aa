//! WebSocket close codes and the retry hint carried in a close reason.

/// Bad or missing worker token. Do not reconnect without new credentials.
pub const AUTH: u16 = 4001;
/// Unsupported protocol version. Do not reconnect with the same version.
pub const VERSION: u16 = 4002;
/// A newer session for the same worker_id took over. Reconnect only as a new process
/// (new boot_id).
pub const REPLACED: u16 = 4003;
/// Repeated malformed, unknown or oversized frames, or a first frame that is not `hello`.
pub const PROTOCOL: u16 = 4004;
/// The `hello` did not prove the worker's identity: its `worker_id` has a secret (issued in
/// an earlier `welcome`) and the hello carried none or another. The worker connected under
/// that id is not disturbed. Do not reconnect: the worker lost its state dir, or another
/// process claims its id.
pub const IDENTITY: u16 = 4005;
/// The worker did not read its frames fast enough (outbound queue full).
pub const SLOW_CONSUMER: u16 = 4008;
/// Nothing received for `dead_after_ms`.
pub const HEARTBEAT_TIMEOUT: u16 = 4009;
/// A frame above the receiver's hard frame limit (RFC 6455 "message too big"): frames over
/// the ordinary limit but under the hard one get an `oversized` error envelope instead.
/// Reconnect with backoff and do not resend that frame.
pub const TOO_BIG: u16 = 1009;
/// The gateway is restarting: reconnect after the hinted delay.
pub const RESTART: u16 = 1012;
/// The gateway is overloaded: reconnect after the hinted delay.
pub const TRY_LATER: u16 = 1013;

/// Whether a worker should reconnect after this close code (with backoff).
pub fn should_reconnect(code: u16) -> bool {
    !matches!(code, AUTH | VERSION | IDENTITY)
}

/// A close reason carrying a retry hint: `"<text>; retry_after_ms=<n>"`.
pub fn reason_with_retry_after(text: &str, retry_after_ms: u64) -> String {
    format!("{text}; retry_after_ms={retry_after_ms}")
}

/// The retry hint in a close reason, if any.
pub fn retry_after_ms(reason: &str) -> Option<u64> {
    reason
        .split(';')
        .filter_map(|part| part.trim().strip_prefix("retry_after_ms="))
        .find_map(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_hint_round_trips() {
        let r = reason_with_retry_after("restarting", 5000);
        assert_eq!(retry_after_ms(&r), Some(5000));
        assert_eq!(retry_after_ms("restarting"), None);
        assert!(should_reconnect(RESTART));
        assert!(!should_reconnect(AUTH));
        assert!(!should_reconnect(IDENTITY));
    }
}
