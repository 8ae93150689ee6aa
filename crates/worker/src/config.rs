//! [`WorkerConfig`]: what the worker connects to, what it serves, and its limits and
//! timeouts, each with its default.

use std::path::PathBuf;
use std::time::Duration;

use kiln_retry::{BudgetConfig, Jitter, RetryConfig};

/// The largest frame a worker reads from the gateway unless configured otherwise
/// ([`WorkerConfig::max_frame_bytes`]): 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 << 20;

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The gateway's worker endpoint. Default: `ws://127.0.0.1:8080/v1/workers/connect`.
    pub url: String,
    /// Worker token, sent as `Authorization: Bearer` (also by [`crate::Files`]).
    /// Default: none.
    pub token: Option<String>,
    /// Directory for the persisted worker id, the worker secret the gateway issued (file
    /// `worker_secret`, owner-only, fsync'd), the result outbox and the list of files the
    /// worker uploaded. Default: `kiln-worker`.
    pub state_dir: PathBuf,
    /// Tasks run at once. Default: 1.
    pub slots: u32,
    /// Models this worker serves (routing): a task that names a model is assigned only to
    /// workers listing it; with none, the worker gets only tasks that name no model.
    /// Default: empty.
    pub models: Vec<String>,
    /// Labels (routing), e.g. `gpu=a100`: a task that asks for labels is assigned only to
    /// workers having all of them. Default: empty.
    pub labels: Vec<String>,
    /// Reconnect backoff. Default: full jitter from 1 s, doubling, capped at 60 s, forever.
    pub reconnect: RetryConfig,
    /// A connection up this long resets the backoff. Default: 60 s.
    pub reset_after: Duration,
    /// On shutdown or drain, wait this long for running tasks (and for the `result_ack` of
    /// finished ones) before releasing what still runs. Default: 30 s.
    pub shutdown_grace: Duration,
    /// Time limit of opening the connection: TCP connect and the WebSocket handshake.
    /// Default: 10 s.
    pub connect_timeout: Duration,
    /// How long the worker waits for the gateway's `welcome` after sending its `hello`.
    /// Default: 10 s.
    pub welcome_timeout: Duration,
    /// How long the worker waits for the gateway's `hb_ack` to a heartbeat; with none in
    /// that time the connection is taken as lost (a half-open TCP connection, a stalled
    /// gateway) and the worker reconnects. Default: 10 s.
    pub heartbeat_timeout: Duration,
    /// Largest frame accepted from the gateway, bytes, the `welcome` included. A larger one
    /// (up to four times this) is read, refused with an `oversized` error envelope and the
    /// connection kept (the gateway counts a failed assignment); beyond that the
    /// connection fails. At least the gateway's `broker.max_frame_bytes`.
    /// Default: [`DEFAULT_MAX_FRAME_BYTES`] (16 MiB).
    pub max_frame_bytes: usize,
    /// Largest `result` frame sent, bytes; lowered to the gateway's
    /// `welcome.max_frame_bytes`. A result over it is not sent: the task fails with
    /// `result_too_large` (large outputs go through the files API). Default: 1 MiB (the
    /// gateway's default frame limit).
    pub max_result_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:8080/v1/workers/connect".into(),
            token: None,
            state_dir: PathBuf::from("kiln-worker"),
            slots: 1,
            models: Vec::new(),
            labels: Vec::new(),
            reconnect: RetryConfig {
                max_retries: u32::MAX,
                initial_backoff: Duration::from_secs(1),
                multiplier: 2.0,
                max_backoff: Duration::from_secs(60),
                deadline: None,
                jitter: Jitter::Full,
                budget: BudgetConfig {
                    enabled: false,
                    ..BudgetConfig::default()
                },
                ..RetryConfig::default()
            },
            reset_after: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            welcome_timeout: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(10),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_result_bytes: kiln_protocol::DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

impl WorkerConfig {
    /// Checks the settings; the message names the field.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.slots == 0 {
            return Err("slots must be at least 1".into());
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("welcome_timeout", self.welcome_timeout),
            ("heartbeat_timeout", self.heartbeat_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be above zero"));
            }
        }
        if self.max_frame_bytes == 0 || self.max_result_bytes == 0 {
            return Err("max_frame_bytes and max_result_bytes must be above zero".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones_and_pass_validation() {
        let c = WorkerConfig::default();
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.welcome_timeout, Duration::from_secs(10));
        assert_eq!(c.heartbeat_timeout, Duration::from_secs(10));
        assert_eq!(c.max_frame_bytes, 16 << 20);
        assert_eq!(c.max_result_bytes, 1 << 20);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn zero_timeouts_and_slots_are_refused_by_name() {
        let mut c = WorkerConfig {
            heartbeat_timeout: Duration::ZERO,
            ..WorkerConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("heartbeat_timeout"));
        c.heartbeat_timeout = Duration::from_secs(1);
        c.slots = 0;
        assert!(c.validate().unwrap_err().contains("slots"));
    }
}
