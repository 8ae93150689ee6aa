//! Settings of the OpenAI-compatible images API: models, where each runs, and upstream
//! providers.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::references::ReferenceUploadConfig;

/// Settings of `/v1/images/*` and `/v1/models`. The binary fills it from `[gateway.openai]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Serve the OpenAI images API. Default: true.
    pub enabled: bool,
    /// How long a call waits for its task before answering `202` with the task instead
    /// (kept under Cloudflare's 100 s). `Prefer: wait=N` overrides it per call.
    /// Default: 90 s.
    #[serde(with = "humantime_serde")]
    pub sync_wait: Duration,
    /// The longest wait `Prefer: wait=N` may ask for. Default: 90 s.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Model used when a request names none; empty: such a request gets 400 (`model` is
    /// required). Default: empty.
    pub default_model: String,
    /// `response_format` when a request gives none: `url` or `b64_json`. Default: `url`.
    pub default_response_format: ResponseFormat,
    /// Largest `n` of one call. Default: 10.
    pub max_n: u32,
    /// Models by the name clients send in `model`. Default: none (every call gets 400
    /// `model_not_found` until models are configured).
    pub models: BTreeMap<String, ModelConfig>,
    /// Upstream providers by name, referenced by models with `runs_on = "provider"`.
    /// Default: none.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// How `image_url` references of JSON edits are downloaded. Default: see
    /// [`ImageUrlConfig`].
    pub image_urls: ImageUrlConfig,
}

/// `[gateway.openai.image_urls]`: downloads of the `image_url` references of JSON edits
/// (`{"images": [{"image_url": "https://…"}]}`). `data:` URLs are always accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageUrlConfig {
    /// Download `http(s)` image URLs at all. Default: true.
    pub enabled: bool,
    /// URLs may point at loopback addresses. Default: false.
    pub allow_loopback: bool,
    /// URLs may point at private, link-local and other non-public addresses. Default:
    /// false.
    pub allow_private: bool,
    /// Time limit of one download. Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest image downloaded. Default: 20 MiB.
    pub max_bytes: usize,
}

impl Default for ImageUrlConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            allow_loopback: false,
            allow_private: false,
            timeout: Duration::from_secs(30),
            max_bytes: 20 << 20,
        }
    }
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sync_wait: Duration::from_secs(90),
            max_wait: Duration::from_secs(90),
            default_model: String::new(),
            default_response_format: ResponseFormat::Url,
            max_n: 10,
            models: BTreeMap::new(),
            providers: BTreeMap::new(),
            image_urls: ImageUrlConfig::default(),
        }
    }
}

/// How images come back in `data[]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResponseFormat {
    /// A URL of the stored file (`/v1/files/{id}`, absolute with `public_base_url`).
    #[default]
    Url,
    /// The file's bytes, base64-encoded.
    B64Json,
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunsOn {
    /// kiln workers that serve the model's task types.
    #[default]
    Workers,
    /// An upstream provider, called by the provider runner (an in-process kiln worker).
    Provider,
}

/// One model.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Workers or an upstream provider. Default: workers.
    pub runs_on: RunsOn,
    /// Task type of generations on workers. Default: `txt2img`.
    pub generate_task_type: String,
    /// Task type of edits on workers. Default: `img2img`.
    pub edit_task_type: String,
    /// With `runs_on = "workers"`: the model the tasks ask for, which only workers listing
    /// it in their `models` capability run; empty means the model's own name. Default:
    /// empty.
    pub worker_model: String,
    /// With `runs_on = "provider"`: the provider's name. Default: empty.
    pub provider: String,
    /// With `runs_on = "provider"`: the model name sent upstream; empty means the same
    /// name. Default: empty.
    pub upstream_model: String,
    /// Reference images of edits are compressed to at most this many bytes before they
    /// reach a worker or the upstream. Default: 4 MiB.
    pub max_reference_bytes: usize,
    /// ... and to at most this many pixels on the long side. Default: 2048.
    pub max_reference_dimension: u32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            runs_on: RunsOn::Workers,
            generate_task_type: "txt2img".into(),
            edit_task_type: "img2img".into(),
            worker_model: String::new(),
            provider: String::new(),
            upstream_model: String::new(),
            max_reference_bytes: 4 << 20,
            max_reference_dimension: 2048,
        }
    }
}

impl ModelConfig {
    /// The model workers must list to run this model's tasks, for the model called `name`
    /// (`None` with `runs_on = "provider"`: the provider's task type routes those).
    pub fn worker_model<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        match self.runs_on {
            RunsOn::Provider => None,
            _ if self.worker_model.is_empty() => Some(name),
            _ => Some(&self.worker_model),
        }
    }
}

/// The kind of an upstream provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProviderKind {
    /// An OpenAI-compatible images API (`POST {base_url}/images/generations`, `/images/edits`).
    #[default]
    OpenaiCompatible,
}

/// How reference images of an edit reach the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReferenceMode {
    /// As `image[]` parts of a multipart POST to `{base_url}/images/edits`.
    #[default]
    Multipart,
    /// Uploaded first to the kiln-upload target of `upload.target`, then named in a JSON
    /// POST to `{base_url}/images/edits`: `images: [{"image_url": …}]` (or `file_id`,
    /// per `upload.send_as`) and `mask: {…}`.
    Upload,
}

/// An upstream OpenAI-compatible image API.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderConfig {
    /// The API's kind. Default: `openai_compatible`.
    pub kind: ProviderKind,
    /// Base URL including the version, e.g. `https://api.example.com/v1`. Default: empty
    /// (required).
    pub base_url: String,
    /// Name of the environment variable holding the API key; the binary reads it into
    /// [`ProviderConfig::api_key`]. Empty: no key is sent. Default: empty.
    pub api_key_env: String,
    /// The API key itself, filled by the binary from `api_key_env`; never read from a
    /// config file.
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Time limit of TCP connect + TLS handshake. Default: 10 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time limit of one upstream request (generation calls can be slow). Default: 180 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Time limit of downloading one result image from a URL. Default: 60 s.
    #[serde(with = "humantime_serde")]
    pub download_timeout: Duration,
    /// Largest result image downloaded or decoded from base64; a JSON answer of the
    /// upstream may be twice this size (all images of the call together). Default: 50 MiB.
    pub max_download_bytes: usize,
    /// Result URLs may point at loopback addresses (127.0.0.0/8, ::1). Default: false.
    pub allow_loopback: bool,
    /// Result URLs may point at private, link-local, CGNAT and other non-public addresses
    /// (10/8, 172.16/12, 192.168/16, 169.254/16, fc00::/7, fe80::/10, ...). Default: false.
    pub allow_private: bool,
    /// Header carrying an idempotency key (`kiln-<task id>`) the upstream honours, e.g.
    /// `Idempotency-Key`. When set, a call that may have reached the upstream is replayed
    /// (with the same key); when empty it never is. Default: empty.
    pub idempotency_header: String,
    /// How edit references are sent. Default: multipart.
    pub references: ReferenceMode,
    /// With `references = "upload"`: the target and client of the uploads. Default: no
    /// target.
    pub upload: ReferenceUploadConfig,
    /// `response_format` asked of the upstream: `b64_json` or `url`. Default: `b64_json`.
    pub response_format: ResponseFormat,
    /// Retries of one upstream call after the first attempt (refused requests are replayed
    /// for free besides). Default: 3.
    pub max_retries: u32,
    /// First backoff delay (exponential, full jitter; `Retry-After` raises it). Default: 1 s.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Overall time of one upstream call, attempts and waits included; the task's own
    /// deadline, when sooner, wins. Default: 10 min.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Statuses worth retrying (502/504 only when the call is idempotent). Default: 408,
    /// 429, 500, 502, 503, 504.
    pub retry_statuses: Vec<u16>,
    /// Concurrent upstream calls (slots of the provider's worker). Default: 4.
    pub concurrency: u32,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            kind: ProviderKind::OpenaiCompatible,
            base_url: String::new(),
            api_key_env: String::new(),
            api_key: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(180),
            download_timeout: Duration::from_secs(60),
            max_download_bytes: 50 << 20,
            allow_loopback: false,
            allow_private: false,
            idempotency_header: String::new(),
            references: ReferenceMode::Multipart,
            upload: ReferenceUploadConfig::default(),
            response_format: ResponseFormat::B64Json,
            max_retries: 3,
            initial_backoff: Duration::from_secs(1),
            deadline: Duration::from_secs(600),
            retry_statuses: vec![408, 429, 500, 502, 503, 504],
            concurrency: 4,
        }
    }
}

impl ProviderConfig {
    /// The task type the gateway creates for models on the provider `name`, and that the
    /// provider runner serves.
    pub fn task_type(name: &str) -> String {
        format!("openai.{name}")
    }
}

impl OpenAiConfig {
    /// Checks that models and providers fit together; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_n == 0 {
            return Err("gateway.openai.max_n must be at least 1".into());
        }
        for (name, m) in &self.models {
            let key = format!("gateway.openai.models.{name}");
            if m.runs_on == RunsOn::Provider && !self.providers.contains_key(&m.provider) {
                return Err(format!(
                    "{key}.provider {:?} names no entry of gateway.openai.providers",
                    m.provider
                ));
            }
            if m.runs_on == RunsOn::Workers
                && (m.generate_task_type.is_empty() || m.edit_task_type.is_empty())
            {
                return Err(format!(
                    "{key}: generate_task_type and edit_task_type must be set"
                ));
            }
            if m.max_reference_bytes == 0 || m.max_reference_dimension == 0 {
                return Err(format!(
                    "{key}: max_reference_bytes and max_reference_dimension must be above zero"
                ));
            }
        }
        for (name, p) in &self.providers {
            let key = format!("gateway.openai.providers.{name}");
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("{key}: names are letters, digits, `_` and `-`"));
            }
            let ok = p.base_url.parse::<axum::http::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return Err(format!(
                    "{key}.base_url {:?} is not an http(s) URL",
                    p.base_url
                ));
            }
            if p.deadline < p.request_timeout {
                return Err(format!(
                    "{key}.deadline must be at least request_timeout (a retry is made only when \
                     a whole attempt fits before the deadline)"
                ));
            }
            if p.concurrency == 0 {
                return Err(format!("{key}.concurrency must be at least 1"));
            }
            match (&p.references, &p.upload.target) {
                (ReferenceMode::Upload, None) => {
                    return Err(format!(
                        "{key}.upload.target is required with references = \"upload\""
                    ));
                }
                (ReferenceMode::Upload, Some(t)) => {
                    t.build().map_err(|e| format!("{key}.upload.target: {e}"))?;
                }
                (_, Some(_)) => {
                    return Err(format!(
                        "{key}.upload is set but references is not \"upload\""
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The task types the configured models are served by (accepted even while no worker
    /// is connected).
    pub fn task_types(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .models
            .values()
            .flat_map(|m| match m.runs_on {
                RunsOn::Provider => vec![ProviderConfig::task_type(&m.provider)],
                _ => vec![m.generate_task_type.clone(), m.edit_task_type.clone()],
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}
