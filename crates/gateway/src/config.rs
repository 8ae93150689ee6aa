//! The gateway's settings, with documented defaults.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Settings of the HTTP API. The binary fills it from TOML and `KILN_*` variables.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Client API keys as `sha256:<hex>` hashes (scope admin) or `<scope>:sha256:<hex>`
    /// with scope `read`, `submit` or `admin` (`kiln config hash-key --scope read KEY`
    /// prints one). Empty means no auth, which the binary allows only on a loopback address.
    /// Default: empty.
    pub api_key_hashes: Vec<String>,
    /// Worker tokens as `sha256:<hex>` hashes, checked before the WebSocket upgrade.
    /// Empty means workers need no token (loopback only). Default: empty.
    pub worker_token_hashes: Vec<String>,
    /// Largest request body in bytes (files included). Default: 32 MiB.
    pub max_body_bytes: usize,
    /// Time limit of one ordinary request (SSE and the worker socket excluded).
    /// Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests per minute per API key (per client address without auth); 0 disables.
    /// Default: 600.
    pub rate_limit_per_minute: u32,
    /// Burst size of the rate limit. Default: 60.
    pub rate_limit_burst: u32,
    /// Requests per minute per worker token and client address (file uploads, downloads,
    /// socket connections); 0 disables. Default: 6000.
    pub worker_rate_limit_per_minute: u32,
    /// Burst size of the worker rate limit. Default: 600.
    pub worker_rate_limit_burst: u32,
    /// Who may read `/metrics` and the details of `/readyz`. Default: `key`.
    pub metrics_access: MetricsAccess,
    /// Tokens for `/metrics` and `/readyz`, as `sha256:<hex>` hashes. Default: empty.
    pub metrics_token_hashes: Vec<String>,
    /// Host names (without port) the gateway answers besides loopback names (`localhost`,
    /// `*.localhost`, `127.0.0.0/8`, `::1`). When set, any other `Host` is refused; when
    /// empty, any `Host` is accepted if API keys are configured, and only loopback names
    /// without keys (against DNS rebinding). Default: empty.
    pub allowed_hosts: Vec<String>,
    /// Interval of the SSE heartbeat comment that keeps proxies from closing the stream.
    /// Default: 15 s.
    #[serde(with = "humantime_serde")]
    pub sse_heartbeat: Duration,
    /// Accept tasks whose type no connected worker serves, to wait for workers that will
    /// come; otherwise such tasks get 422. Default: false.
    pub queue_unknown_task_types: bool,
    /// Task types that are always accepted (served by workers that may be offline now).
    /// Default: empty.
    pub known_task_types: Vec<String>,
    /// Where uploaded and generated files are stored. Default: `./kiln-data/files`.
    pub files_dir: PathBuf,
    /// Base URL used in file URLs returned to clients; `None` means relative URLs
    /// (`/v1/files/{id}`). Default: none.
    pub public_base_url: Option<String>,
    /// Send CORS headers allowing these origins. Default: empty (CORS off).
    pub cors_origins: Vec<String>,
    /// Where files are stored: the local `files_dir` or an S3-compatible bucket.
    /// Default: local.
    pub storage: crate::StorageConfig,
    /// The OpenAI-compatible images API: models, providers, waits.
    /// Default: see [`crate::openai::OpenAiConfig`].
    pub openai: crate::openai::OpenAiConfig,
}

/// Who may read `/metrics` and the details of `/readyz` (`/healthz` is always open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum MetricsAccess {
    /// Anyone who can reach the port.
    Open,
    /// An API key of any scope, or a metrics token; open when neither is configured.
    #[default]
    Key,
    /// A metrics token only (`metrics_token_hashes`).
    Token,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            api_key_hashes: Vec::new(),
            worker_token_hashes: Vec::new(),
            max_body_bytes: 32 << 20,
            request_timeout: Duration::from_secs(30),
            rate_limit_per_minute: 600,
            rate_limit_burst: 60,
            worker_rate_limit_per_minute: 6000,
            worker_rate_limit_burst: 600,
            metrics_access: MetricsAccess::Key,
            metrics_token_hashes: Vec::new(),
            allowed_hosts: Vec::new(),
            sse_heartbeat: Duration::from_secs(15),
            queue_unknown_task_types: false,
            known_task_types: Vec::new(),
            files_dir: PathBuf::from("kiln-data/files"),
            public_base_url: None,
            cors_origins: Vec::new(),
            storage: crate::StorageConfig::default(),
            openai: crate::openai::OpenAiConfig::default(),
        }
    }
}
