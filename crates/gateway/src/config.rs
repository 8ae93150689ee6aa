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
    /// Tokens of workers that run inside the embedding program and never leave it, as
    /// `sha256:<hex>` hashes (see [`hash_secret`](crate::hash_secret)). Unlike
    /// `worker_token_hashes` they may also delete files and are not rate limited; they are
    /// checked only when API keys or worker tokens are configured (otherwise workers need no
    /// token). Set by the program in code, never read from a config file. Default: empty.
    #[serde(skip)]
    pub in_process_worker_token_hashes: Vec<String>,
    /// Largest request body in bytes (files included). Default: 32 MiB.
    pub max_body_bytes: usize,
    /// Largest task input, bytes of its JSON (`POST /v1/tasks` and the OpenAI routes);
    /// larger inputs get 413. Bulk data goes as files (`POST /v1/files`) named by id. Must
    /// fit an assign frame: at most `broker.max_frame_bytes` minus
    /// [`ASSIGN_OVERHEAD_BYTES`](crate::limits::ASSIGN_OVERHEAD_BYTES). Default: 256 KiB.
    pub max_task_input_bytes: usize,
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
    /// A worker whose session ended is reported offline on `GET /v1/events` only when it
    /// has not come back within this time, so a reconnect blip is not an outage.
    /// Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub worker_offline_grace: Duration,
    /// Tasks of a type some worker said hello with within this window are accepted while
    /// no worker serving it is connected (they wait for it); 0 turns this off.
    /// Default: 7 days.
    #[serde(with = "humantime_serde")]
    pub remember_task_types: Duration,
    /// Where uploaded and generated files are stored. Default: `./kiln-data/files`.
    pub files_dir: PathBuf,
    /// The external base of every link the API returns (`Location` headers, file URLs in
    /// task outputs and file objects, OpenAI `data[].url`): scheme, host and any path a
    /// reverse proxy puts in front, e.g. `https://kiln.example.com` or
    /// `https://example.com/api`. The prefix the router is nested under in a host app
    /// (`Router::nest("/kiln", …)`) follows it, then `/v1/…`. `None` means relative links
    /// (`/v1/files/{id}`, or `/kiln/v1/files/{id}` when nested). Default: none.
    pub public_base_url: Option<String>,
    /// Send CORS headers allowing these origins. Default: empty (CORS off).
    pub cors_origins: Vec<String>,
    /// Where files are stored: the local `files_dir` or an S3-compatible bucket.
    /// Default: local.
    pub storage: crate::StorageConfig,
    /// What `POST /v1/files` accepts: sizes, types, time. Default: see [`FilesConfig`].
    pub files: FilesConfig,
    /// The OpenAI-compatible images API (feature `openai`): models, providers, waits.
    /// Default: see [`crate::openai::OpenAiConfig`].
    #[cfg(feature = "openai")]
    pub openai: crate::openai::OpenAiConfig,
    /// Webhook delivery: secrets, schedule, address policy, global endpoints (the binary's
    /// `[webhooks]` section). Default: see [`crate::WebhooksConfig`].
    #[serde(skip)]
    pub webhooks: crate::WebhooksConfig,
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
            in_process_worker_token_hashes: Vec::new(),
            max_body_bytes: 32 << 20,
            max_task_input_bytes: 256 << 10,
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
            worker_offline_grace: Duration::from_secs(30),
            remember_task_types: Duration::from_secs(7 * 24 * 3600),
            files_dir: PathBuf::from("kiln-data/files"),
            public_base_url: None,
            cors_origins: Vec::new(),
            storage: crate::StorageConfig::default(),
            files: FilesConfig::default(),
            #[cfg(feature = "openai")]
            openai: crate::openai::OpenAiConfig::default(),
            webhooks: crate::WebhooksConfig::default(),
        }
    }
}

/// Settings of the files API (`POST /v1/files`, `GET /v1/files/{id}`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// Largest file `POST /v1/files` accepts, bytes. Files other than JPEG, PNG, WebP and
    /// GIF images stream to the storage and are never held in memory whole.
    /// Default: 512 MiB.
    pub max_bytes: u64,
    /// Largest JPEG, PNG, WebP or GIF upload, bytes: images are checked (and compressed
    /// when asked) in memory. Default: 32 MiB.
    pub max_image_bytes: usize,
    /// Content types accepted, matched against the type sniffed from the content:
    /// `type/subtype`, `type/*` or `*/*`. Anything else gets 415. Default: `["*/*"]`.
    pub allowed_types: Vec<String>,
    /// Time limit of one upload, from the request to the stored file (instead of
    /// `request_timeout`). Default: 10 min.
    #[serde(with = "humantime_serde")]
    pub upload_timeout: Duration,
    /// Where uploads wait while they stream in (before they are renamed into
    /// `files_dir` or sent to the bucket); files left there by a crash are removed at
    /// start. `None`: `<files_dir>/.incoming`. Default: none.
    pub spool_dir: Option<PathBuf>,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            max_bytes: 512 << 20,
            max_image_bytes: 32 << 20,
            allowed_types: vec!["*/*".to_owned()],
            upload_timeout: Duration::from_secs(600),
            spool_dir: None,
        }
    }
}

impl FilesConfig {
    /// Checks the settings: sizes above zero, types of the form `type/subtype`,
    /// `type/*` or `*/*`.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes == 0 || self.max_image_bytes == 0 {
            return Err("files.max_bytes and files.max_image_bytes must be above zero".into());
        }
        if self.allowed_types.is_empty() {
            return Err("files.allowed_types is empty: nothing could be uploaded".into());
        }
        for t in &self.allowed_types {
            let ok = match t.split_once('/') {
                Some(("*", "*")) => true,
                Some((a, b)) => {
                    let name = |s: &str| {
                        !s.is_empty()
                            && s.bytes()
                                .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
                    };
                    name(a) && (b == "*" || name(b))
                }
                None => false,
            };
            if !ok {
                return Err(format!(
                    "files.allowed_types: {t:?} is not `type/subtype`, `type/*` or `*/*`"
                ));
            }
        }
        Ok(())
    }

    /// Whether `content_type` (lowercase, no parameters) is allowed.
    pub fn allows(&self, content_type: &str) -> bool {
        let top = content_type.split('/').next().unwrap_or("");
        self.allowed_types.iter().any(|p| {
            let p = p.to_ascii_lowercase();
            p == "*/*" || p == content_type || p.strip_suffix("/*").is_some_and(|t| t == top)
        })
    }
}
