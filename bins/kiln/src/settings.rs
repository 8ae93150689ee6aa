//! The one place that reads the environment: built-in defaults < TOML file < `KILN_*`
//! variables, mapped into each library's `Config` struct.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::Deserialize;

/// The default configuration, documented key by key; `kiln config print-default` prints it.
pub(crate) const DEFAULT_TOML: &str = include_str!("../kiln.default.toml");

/// Exit status for invalid configuration (EX_CONFIG from sysexits.h).
pub(crate) const EX_CONFIG: i32 = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    pub(crate) server: Server,
    pub(crate) log: Log,
    pub(crate) gateway: kiln_gateway::GatewayConfig,
    pub(crate) storage: kiln_gateway::StorageConfig,
    pub(crate) files: kiln_gateway::FilesConfig,
    pub(crate) broker: kiln_gateway::BrokerConfig,
    /// The store's keys of `[broker]`, taken out before `[broker]` is read.
    #[serde(skip)]
    pub(crate) store: StoreSettings,
    pub(crate) queue: Queue,
    pub(crate) demo_worker: DemoWorker,
    /// `[webhooks]`: signing secrets, the retry schedule, the address policy, global
    /// endpoints (docs/WEBHOOKS.md).
    pub(crate) webhooks: kiln_gateway::WebhooksConfig,
    /// The upstream providers' settings, `[gateway.openai.providers.<name>]`, for the
    /// provider worker (the gateway reads only their names and base URLs).
    #[serde(skip)]
    pub(crate) providers: BTreeMap<String, kiln_provider::ProviderConfig>,
}

/// The settings of `[broker]` that belong to the queue store (attempts, retry back-off,
/// SQLite durability); the rest of the section is the library's `BrokerConfig`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreSettings {
    pub(crate) max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub(crate) retry_base: Duration,
    pub(crate) sync_full: bool,
}

impl StoreSettings {
    const KEYS: [&str; 3] = ["max_attempts", "retry_base", "sync_full"];

    /// Takes the store's keys out of the `[broker]` table of `root`. Errors name the key
    /// (`broker.retry_base`).
    fn take(root: &mut config::Map<String, config::Value>) -> Result<Self, config::ConfigError> {
        let mut taken = config::Map::new();
        if let Some(broker) = root.get_mut("broker") {
            let mut table = broker.clone().into_table()?;
            for key in Self::KEYS {
                if let Some(v) = table.remove(key) {
                    taken.insert(key.to_owned(), v);
                }
            }
            *broker = config::Value::from(table);
        }
        #[derive(Deserialize)]
        struct Section {
            broker: StoreSettings,
        }
        let section = config::Map::from_iter([("broker".to_owned(), config::Value::from(taken))]);
        Ok(config::Value::from(section)
            .try_deserialize::<Section>()?
            .broker)
    }

    /// The attempts and retry back-off every queue store takes.
    pub(crate) fn queue_options(&self) -> kiln_broker::QueueOptions {
        kiln_broker::QueueOptions {
            default_max_attempts: self.max_attempts,
            retry_base_ms: self.retry_base.as_millis() as u64,
            webhook_endpoints: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum QueueBackend {
    Sqlite,
    Postgres,
    Redis,
}

/// Which store holds the queue.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Queue {
    pub(crate) backend: QueueBackend,
    pub(crate) postgres_url: String,
    pub(crate) postgres_schema: String,
    pub(crate) postgres_pool_size: usize,
    pub(crate) redis_url: String,
    pub(crate) redis_prefix: String,
    #[serde(with = "humantime_serde")]
    pub(crate) redis_request_id_ttl: Duration,
}

impl std::fmt::Debug for Queue {
    // The URLs may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("backend", &self.backend)
            .field("postgres_schema", &self.postgres_schema)
            .field("postgres_pool_size", &self.postgres_pool_size)
            .field("redis_prefix", &self.redis_prefix)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Server {
    pub(crate) listen: SocketAddr,
    pub(crate) data_dir: PathBuf,
    #[serde(with = "humantime_serde")]
    pub(crate) shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub(crate) idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Auto,
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Log {
    pub(crate) format: LogFormat,
    pub(crate) filter: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DemoWorker {
    pub(crate) enabled: bool,
    pub(crate) slots: u32,
    pub(crate) models: Vec<String>,
}

/// Loads settings; the error names the offending key.
pub(crate) fn load(path: Option<&Path>) -> Result<Settings, String> {
    let mut b = config::Config::builder().add_source(config::File::from_str(
        DEFAULT_TOML,
        config::FileFormat::Toml,
    ));
    if let Some(p) = path {
        if !p.exists() {
            return Err(format!("config file {} does not exist", p.display()));
        }
        b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
    }
    b = b.add_source(
        config::Environment::with_prefix("KILN")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("gateway.api_key_hashes")
            .with_list_parse_key("gateway.worker_token_hashes")
            .with_list_parse_key("gateway.known_task_types")
            .with_list_parse_key("gateway.cors_origins")
            .with_list_parse_key("files.allowed_types")
            .with_list_parse_key("gateway.allowed_hosts")
            .with_list_parse_key("gateway.metrics_token_hashes")
            .with_list_parse_key("webhooks.schedule_s")
            .with_list_parse_key("storage.client.retry.retry_statuses"),
    );
    let cfg = b
        .build()
        .map_err(|e| format!("invalid configuration: {e}"))?;
    let providers = providers(&cfg)?;
    let read = || -> Result<Settings, config::ConfigError> {
        let mut root = config::Source::collect(&cfg)?;
        let store = StoreSettings::take(&mut root)?;
        let settings: Settings = config::Value::from(root).try_deserialize()?;
        Ok(Settings { store, ..settings })
    };
    let mut settings = read().map_err(|e| format!("invalid configuration: {e}"))?;
    settings.providers = providers;
    settings.validate()?;
    settings.resolve_secrets()?;
    Ok(settings)
}

/// The upstream providers' settings (`[gateway.openai.providers.<name>]`), as kiln-provider
/// takes them.
fn providers(
    cfg: &config::Config,
) -> Result<BTreeMap<String, kiln_provider::ProviderConfig>, String> {
    match cfg.get("gateway.openai.providers") {
        Ok(p) => Ok(p),
        Err(config::ConfigError::NotFound(_)) => Ok(BTreeMap::new()),
        Err(e) => Err(format!("invalid configuration: {e}")),
    }
}

impl Settings {
    /// The frame limits of the gateway and of kiln's worker SDK (which the demo worker and
    /// the provider runner use) fit together: a task input at its limit fits an assign
    /// frame, and the SDK accepts every frame the gateway may send.
    fn validate_frame_limits(&self) -> Result<(), String> {
        kiln_gateway::limits::check_frame_limits(&self.gateway, &self.broker)
            .map_err(|e| format!("invalid configuration: {e}"))?;
        let sdk = kiln_worker::WorkerConfig::default().max_frame_bytes;
        if self.broker.max_frame_bytes > sdk {
            return Err(format!(
                "invalid configuration: broker.max_frame_bytes ({}) is over the {sdk}-byte frame \
                 limit of kiln's worker SDK, so its workers could not read every assign",
                self.broker.max_frame_bytes
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        let open = !self.server.listen.ip().is_loopback();
        if open && self.gateway.api_key_hashes.is_empty() {
            return Err(format!(
                "invalid configuration: server.listen is {} (not loopback) but gateway.api_key_hashes is empty; \
                 add API keys or listen on 127.0.0.1",
                self.server.listen
            ));
        }
        if open && self.gateway.worker_token_hashes.is_empty() {
            return Err(format!(
                "invalid configuration: server.listen is {} (not loopback) but gateway.worker_token_hashes is empty",
                self.server.listen
            ));
        }
        if self.server.header_read_timeout.is_zero() || self.server.idle_timeout.is_zero() {
            return Err(
                "invalid configuration: server.header_read_timeout and server.idle_timeout must be above zero"
                    .into(),
            );
        }
        if self.server.idle_timeout <= self.gateway.sse_heartbeat {
            return Err(format!(
                "invalid configuration: server.idle_timeout ({:?}) must be above gateway.sse_heartbeat ({:?}), \
                 or idle SSE streams are closed between heartbeats",
                self.server.idle_timeout, self.gateway.sse_heartbeat
            ));
        }
        if self.gateway.metrics_access == kiln_gateway::MetricsAccess::Token
            && self.gateway.metrics_token_hashes.is_empty()
        {
            return Err(
                "invalid configuration: gateway.metrics_access is \"token\" but gateway.metrics_token_hashes is empty"
                    .into(),
            );
        }
        for (key, list, scoped) in [
            ("gateway.api_key_hashes", &self.gateway.api_key_hashes, true),
            (
                "gateway.worker_token_hashes",
                &self.gateway.worker_token_hashes,
                false,
            ),
            (
                "gateway.metrics_token_hashes",
                &self.gateway.metrics_token_hashes,
                false,
            ),
        ] {
            let parsed = if scoped {
                kiln_gateway::SecretSet::from_scoped_hashes(list).map(drop)
            } else {
                kiln_gateway::SecretSet::from_hashes(list).map(drop)
            };
            parsed.map_err(|e| format!("invalid configuration: {key}: {e}"))?;
        }
        if self.queue.backend == QueueBackend::Redis && cfg!(not(feature = "redis")) {
            return Err(
                "invalid configuration: queue.backend = \"redis\" but this kiln was built without the `redis` feature"
                    .into(),
            );
        }
        if self.queue.backend == QueueBackend::Postgres && self.queue.postgres_pool_size == 0 {
            return Err(
                "invalid configuration: queue.postgres_pool_size must be at least 1".into(),
            );
        }
        self.validate_storage()?;
        self.webhooks
            .validate()
            .map_err(|e| format!("invalid configuration: {e}"))?;
        for s in self
            .webhooks
            .secret
            .iter()
            .flat_map(|s| s.split_whitespace())
        {
            s.parse::<kiln_webhooks::Secret>()
                .map_err(|e| format!("invalid configuration: webhooks.secret: {e}"))?;
        }
        if let Some(k) = &self.webhooks.signing_key {
            k.parse::<kiln_webhooks::SigningKey>()
                .map_err(|e| format!("invalid configuration: webhooks.signing_key: {e}"))?;
        }
        if self.gateway.files != kiln_gateway::FilesConfig::default() {
            return Err(
                "invalid configuration: gateway.files is not a key; put files API settings in [files]"
                    .into(),
            );
        }
        self.files
            .validate()
            .map_err(|e| format!("invalid configuration: {e}"))?;
        self.validate_frame_limits()?;
        self.gateway
            .openai
            .validate()
            .map_err(|e| format!("invalid configuration: {e}"))?;
        for (name, p) in &self.providers {
            p.validate(name, &format!("gateway.openai.providers.{name}"))
                .map_err(|e| format!("invalid configuration: {e}"))?;
        }
        if self.demo_worker.enabled && self.demo_worker.slots == 0 {
            return Err("invalid configuration: demo_worker.slots must be at least 1".into());
        }
        if self
            .log
            .filter
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(format!(
                "invalid configuration: log.filter {:?} is not a tracing filter",
                self.log.filter
            ));
        }
        Ok(())
    }
}

impl Settings {
    fn validate_storage(&self) -> Result<(), String> {
        use kiln_gateway::StorageBackend;
        if self.gateway.storage != kiln_gateway::StorageConfig::default() {
            return Err(
                "invalid configuration: gateway.storage is not a key; put file storage settings in [storage]"
                    .into(),
            );
        }
        match (self.storage.backend, &self.storage.s3) {
            (StorageBackend::S3, None) => Err(
                "invalid configuration: storage.backend is \"s3\" but storage.s3 is missing \
                 (endpoint, bucket, access_key_id, secret_access_key)"
                    .into(),
            ),
            (StorageBackend::Local, Some(_)) => Err(
                "invalid configuration: storage.s3 is set but storage.backend is \"local\"; \
                 set storage.backend = \"s3\" or remove storage.s3"
                    .into(),
            ),
            (_, Some(s3)) if s3.endpoint.is_empty() || s3.bucket.is_empty() => Err(
                "invalid configuration: storage.s3.endpoint and storage.s3.bucket must not be empty"
                    .into(),
            ),
            _ => Ok(()),
        }
    }

    /// Reads the API key of each upstream provider from the variable its `api_key_env` names,
    /// and the secrets its reference upload target names (`headers_env`, `query_env`, S3
    /// credentials).
    fn resolve_secrets(&mut self) -> Result<(), String> {
        let lookup = |name: &str| std::env::var(name).ok();
        for (i, e) in self.webhooks.endpoints.iter_mut().enumerate() {
            let Some(var) = &e.secret_env else { continue };
            match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => e.secret = Some(v),
                _ => {
                    return Err(format!(
                        "invalid configuration: webhooks.endpoints[{i}].secret_env names {var:?}, which is not set"
                    ));
                }
            }
        }
        for (name, p) in self.providers.iter_mut() {
            if let Some(t) = p.upload.target.as_mut() {
                t.resolve_secrets(
                    &format!("gateway.openai.providers.{name}.upload.target"),
                    &lookup,
                )
                .map_err(|e| format!("invalid configuration: {e}"))?;
            }
            if p.api_key_env.is_empty() {
                continue;
            }
            match std::env::var(&p.api_key_env) {
                Ok(v) if !v.is_empty() => p.api_key = Some(v),
                _ => {
                    return Err(format!(
                        "invalid configuration: gateway.openai.providers.{name}.api_key_env names {:?}, which is not set",
                        p.api_key_env
                    ));
                }
            }
        }
        Ok(())
    }

    /// The queue store's settings: `[broker]`'s attempts and back-off, and the global
    /// webhook endpoints' task events (written by the store with the changes).
    pub(crate) fn queue_options(&self) -> kiln_broker::QueueOptions {
        let mut q = self.store.queue_options();
        q.webhook_endpoints = self
            .webhooks
            .endpoints
            .iter()
            .map(|e| kiln_broker::WebhookEndpoint {
                url: e.url.clone(),
                events: e
                    .events
                    .iter()
                    .filter(|ev| ev.starts_with("task."))
                    .cloned()
                    .collect(),
            })
            .collect();
        q
    }

    /// Where the queue database lives.
    pub(crate) fn queue_path(&self) -> PathBuf {
        self.server.data_dir.join("queue.sqlite")
    }

    /// The queue, for logs: the SQLite file or the Redis URL and prefix.
    pub(crate) fn queue_desc(&self) -> String {
        match self.queue.backend {
            QueueBackend::Sqlite => self.queue_path().display().to_string(),
            QueueBackend::Postgres => format!("postgres schema {:?}", self.queue.postgres_schema),
            QueueBackend::Redis => format!(
                "{} (prefix {:?})",
                redact_url(&self.queue.redis_url),
                self.queue.redis_prefix
            ),
        }
    }

    /// Where files live.
    pub(crate) fn files_dir(&self) -> PathBuf {
        if self.gateway.files_dir.as_os_str().is_empty() {
            self.server.data_dir.join("files")
        } else {
            self.gateway.files_dir.clone()
        }
    }
}

/// A URL without its password, for logs.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let s = load(None).unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        assert!(s.demo_worker.enabled);
        assert_eq!(s.queue.backend, QueueBackend::Sqlite);
    }

    #[test]
    fn the_demo_model_is_the_binarys_default_not_the_librarys() {
        let s = load(None).unwrap();
        assert_eq!(s.gateway.openai.default_model, "kiln-demo");
        assert!(s.gateway.openai.models.contains_key("kiln-demo"));
        assert!(s.demo_worker.models.contains(&"kiln-demo".to_owned()));
        let lib = kiln_gateway::openai::OpenAiConfig::default();
        assert!(lib.models.is_empty() && lib.default_model.is_empty());
        // The in-process worker tokens are set in code only.
        let e = load_toml("[gateway]\nin_process_worker_token_hashes = []\n").unwrap_err();
        assert!(e.contains("in_process_worker_token_hashes"), "{e}");
    }

    #[test]
    fn redis_url_password_is_not_logged() {
        assert_eq!(
            redact_url("redis://user:secret@10.0.0.1:6379/0"),
            "redis://***@10.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }

    /// The reference-upload example of docs/CONFIG.md, with its variables renamed.
    fn upload_example(api_key_var: &str, assets_var: &str) -> String {
        let doc = include_str!("../../../docs/CONFIG.md");
        let section = &doc[doc.find("### Reference uploads").unwrap()..];
        let start = section.find("```toml\n").unwrap() + 8;
        let end = start + section[start..].find("```").unwrap();
        section[start..end]
            .replace("ACME_API_KEY", api_key_var)
            .replace("ACME_ASSETS_KEY", assets_var)
    }

    fn load_toml(toml: &str) -> Result<Settings, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, toml).unwrap();
        load(Some(&path))
    }

    #[test]
    fn the_documented_reference_upload_example_loads() {
        use kiln_provider::{ReferenceMode, TargetConfig};
        let s = load_toml(&upload_example("PATH", "PATH")).unwrap();
        assert_eq!(
            s.gateway.openai.providers["acme"].base_url,
            s.providers["acme"].base_url
        );
        // The gateway's task type of a provider model is the one the provider worker serves.
        assert_eq!(
            kiln_gateway::openai::provider_task_type("acme"),
            kiln_provider::task_type("acme")
        );
        let p = &s.providers["acme"];
        assert_eq!(p.references, ReferenceMode::Upload);
        assert_eq!(p.upload.client.retry.max_retries, 3);
        let Some(TargetConfig::JsonBase64(t)) = &p.upload.target else {
            panic!("a json_base64 target: {:?}", p.upload.target)
        };
        assert_eq!(t.name, "acme-assets");
        assert_eq!(
            t.resolved_headers["x-api-key"].expose(),
            std::env::var("PATH").unwrap()
        );
        // An unset variable stops the start, naming the key.
        let e = load_toml(&upload_example("PATH", "KILN_TEST_SURELY_UNSET_4F1")).unwrap_err();
        assert!(
            e.contains("gateway.openai.providers.acme.upload.target.headers_env.x-api-key")
                && e.contains("KILN_TEST_SURELY_UNSET_4F1"),
            "{e}"
        );
        // `references = "upload"` needs a target, and a target needs that mode.
        let no_target = upload_example("PATH", "PATH");
        let cut = no_target
            .find("[gateway.openai.providers.acme.upload.target]")
            .unwrap();
        let e = load_toml(&no_target[..cut]).unwrap_err();
        assert!(e.contains("acme.upload.target is required"), "{e}");
        let e = load_toml(&no_target.replace("references = \"upload\"", "")).unwrap_err();
        assert!(e.contains("references is not \"upload\""), "{e}");
    }

    #[test]
    fn frame_limits_that_do_not_fit_together_stop_the_start() {
        let s = load(None).unwrap();
        assert_eq!(s.gateway.max_task_input_bytes, 256 << 10);
        assert_eq!(s.broker.max_frame_bytes, 1 << 20);
        assert_eq!(s.broker.frame_hard_limit_bytes, 16 << 20);
        assert_eq!(s.broker.max_assign_failures, 3);
        let e = load_toml("[gateway]\nmax_task_input_bytes = 2000000\n").unwrap_err();
        assert!(
            e.contains("gateway.max_task_input_bytes (2000000) does not fit"),
            "{e}"
        );
        let e = load_toml("[broker]\nmax_frame_bytes = 65536\n").unwrap_err();
        assert!(e.contains("broker.max_frame_bytes (65536)"), "{e}");
        let e = load_toml("[broker]\nframe_hard_limit_bytes = 1000\n").unwrap_err();
        assert!(e.contains("broker.frame_hard_limit_bytes (1000)"), "{e}");
        let e =
            load_toml("[broker]\nmax_frame_bytes = 33554432\nframe_hard_limit_bytes = 67108864\n")
                .unwrap_err();
        assert!(e.contains("frame limit of kiln's worker SDK"), "{e}");
        // Lowered together, they fit.
        let s = load_toml(
            "[gateway]\nmax_task_input_bytes = 32768\n[broker]\nmax_frame_bytes = 65536\n",
        )
        .unwrap();
        assert_eq!(s.broker.max_frame_bytes, 65536);
    }

    #[test]
    fn storage_defaults_are_the_library_defaults() {
        let s = load(None).unwrap();
        // The documented storage defaults are the library's defaults.
        assert_eq!(s.storage, kiln_gateway::StorageConfig::default());
        assert_eq!(s.files, kiln_gateway::FilesConfig::default());
        let g = kiln_gateway::GatewayConfig::default();
        assert_eq!(s.gateway.remember_task_types, g.remember_task_types);
        assert_eq!(
            s.broker.reject_backoff,
            kiln_gateway::BrokerConfig::default().reject_backoff
        );
    }

    #[test]
    fn the_store_keys_of_the_broker_section_reach_the_store() {
        let s = load(None).unwrap();
        assert_eq!(
            s.store.queue_options(),
            kiln_broker::QueueOptions::default()
        );
        assert!(!s.store.sync_full);
        let s = load_toml(
            "[broker]\nmax_attempts = 5\nretry_base = \"250ms\"\nsync_full = true\nlease = \"7s\"\n",
        )
        .unwrap();
        assert_eq!(s.store.queue_options().default_max_attempts, 5);
        assert_eq!(s.store.queue_options().retry_base_ms, 250);
        assert!(s.store.sync_full);
        assert_eq!(s.broker.lease, Duration::from_secs(7));
        let e = load_toml("[broker]\nretry_base = \"soon\"\n").unwrap_err();
        assert!(e.contains("broker.retry_base"), "{e}");
        let e = load_toml("[broker]\nlease = \"forever\"\n").unwrap_err();
        assert!(e.contains("broker.lease"), "{e}");
        let e = load_toml("[broker]\nmax_attempt = 5\n").unwrap_err();
        assert!(e.contains("max_attempt"), "{e}");
    }

    #[test]
    fn bad_files_settings_are_refused() {
        let e = load_toml("[files]\nallowed_types = [\"video\"]\n").unwrap_err();
        assert!(
            e.contains("files.allowed_types") && e.contains("\"video\""),
            "{e}"
        );
        let e = load_toml("[files]\nmax_bytes = 0\n").unwrap_err();
        assert!(e.contains("files.max_bytes"), "{e}");
        let e = load_toml("[gateway.files]\nmax_bytes = 5\n").unwrap_err();
        assert!(e.contains("[files]"), "{e}");
        let s = load_toml("[files]\nallowed_types = [\"video/*\", \"application/zip\"]\n").unwrap();
        assert!(s.files.allows("video/mp4") && !s.files.allows("text/plain"));
    }
}
