//! Settings of the OpenAI-compatible images API: models, where each runs, and the names of
//! the upstream providers models may run on.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

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
    pub providers: BTreeMap<String, ProviderRoute>,
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
    /// Where the `task.completed` webhook of this model's tasks goes when a call sends no
    /// `X-Kiln-Webhook` header (an absolute http(s) URL). Default: none.
    pub webhook: Option<String>,
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
            webhook: None,
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

/// An upstream provider as the gateway sees it, `[gateway.openai.providers.<name>]`: models
/// with `runs_on = "provider"` name it, and their tasks get its task type
/// ([`provider_task_type`]), which a provider worker serves. The gateway reads only
/// `base_url` of the table; the other keys are the provider worker's settings, read and
/// checked where that worker is configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ProviderRoute {
    /// The upstream's base URL; `/v1/models` shows its host. Default: empty.
    pub base_url: String,
}

/// The task type of models on the provider `name` (`openai.<name>`): what the gateway
/// creates for them, and what the provider worker serves.
pub fn provider_task_type(name: &str) -> String {
    format!("openai.{name}")
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
            if let Some(url) = &m.webhook {
                crate::webhooks::check_url(&format!("{key}.webhook"), url)?;
            }
            if m.max_reference_bytes == 0 || m.max_reference_dimension == 0 {
                return Err(format!(
                    "{key}: max_reference_bytes and max_reference_dimension must be above zero"
                ));
            }
        }
        for name in self.providers.keys() {
            let key = format!("gateway.openai.providers.{name}");
            if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("{key}: names are letters, digits, `_` and `-`"));
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
                RunsOn::Provider => vec![provider_task_type(&m.provider)],
                _ => vec![m.generate_task_type.clone(), m.edit_task_type.clone()],
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }
}
