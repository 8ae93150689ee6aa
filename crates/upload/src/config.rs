//! Upload client settings with documented defaults.

use std::path::PathBuf;
use std::time::Duration;

use kiln_retry::RetryConfig;
use serde::Deserialize;

/// How connections are used across requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConnectionPolicy {
    /// Keep connections open and reuse them (HTTP/2 streams are multiplexed on one
    /// connection). The default.
    #[default]
    Pooled,
    /// Open a new connection for every attempt and close it afterwards. Slow (a TCP and TLS
    /// handshake per upload); kept as an escape hatch and as the benchmark baseline.
    FreshPerRequest,
}

/// Settings of an [`crate::UploadClient`]. Durations are humantime strings in config files
/// (`"500ms"`, `"30s"`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadConfig {
    /// Time limit for TCP connect plus TLS handshake. Default: 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time limit of one attempt (connect, send, response and its body). Copied into
    /// `retry.per_attempt_timeout` when that is unset. Default: 60 s.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Retry policy (kiln-retry). Default: [`RetryConfig::default`].
    pub retry: RetryConfig,
    /// A pooled connection idle for longer than this is closed instead of reused. Keep it
    /// below the servers' keep-alive timeout (nginx 75 s, many app servers 5 s) so the
    /// client, not the server, ends idle connections. Default: 4 s.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per host (HTTP/2 keeps one shared connection per
    /// host, more when rotation is in progress). Default: 16.
    pub pool_max_idle_per_host: usize,
    /// HTTP/2 PING interval on open connections; `None` disables pings. Default: 20 s.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_interval: Option<Duration>,
    /// How long to wait for a PING acknowledgement before closing the connection.
    /// Default: 10 s.
    #[serde(with = "humantime_serde")]
    pub http2_keep_alive_timeout: Duration,
    /// Requests sent on one connection before the client stops using it for new requests
    /// (set it at or below the server's `keepalive_requests`, 1000 in nginx, so rotation
    /// happens before the server's GOAWAY). Default: 1000.
    pub max_requests_per_connection: u64,
    /// Pooled or a fresh connection per request. Default: pooled.
    pub connection_policy: ConnectionPolicy,
    /// Offer only HTTP/1.1 in ALPN. Default: false (h2 preferred, HTTP/1.1 fallback).
    pub http1_only: bool,
    /// Extra PEM CA certificate(s) to trust besides the webpki roots. Default: none.
    pub extra_ca_pem: Option<PathBuf>,
    /// Whether the webpki (Mozilla) roots are trusted. Default: true.
    pub webpki_roots: bool,
    /// Largest upload body accepted; larger bodies fail before anything is sent.
    /// Default: 5 GiB.
    pub max_body_bytes: u64,
    /// Largest response body read; longer responses are an error. Default: 4 MiB.
    pub max_response_bytes: usize,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(60),
            retry: RetryConfig::default(),
            pool_idle_timeout: Duration::from_secs(4),
            pool_max_idle_per_host: 16,
            http2_keep_alive_interval: Some(Duration::from_secs(20)),
            http2_keep_alive_timeout: Duration::from_secs(10),
            max_requests_per_connection: 1000,
            connection_policy: ConnectionPolicy::Pooled,
            http1_only: false,
            extra_ca_pem: None,
            webpki_roots: true,
            max_body_bytes: 5 << 30,
            max_response_bytes: 4 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_humantime_and_policy() {
        let cfg: UploadConfig = serde_json::from_str(
            r#"{"pool_idle_timeout":"200ms","connection_policy":"fresh_per_request",
                "retry":{"max_retries":5}}"#,
        )
        .unwrap();
        assert_eq!(cfg.pool_idle_timeout, Duration::from_millis(200));
        assert_eq!(cfg.connection_policy, ConnectionPolicy::FreshPerRequest);
        assert_eq!(cfg.retry.max_retries, 5);
        assert_eq!(cfg.max_requests_per_connection, 1000);
    }
}
