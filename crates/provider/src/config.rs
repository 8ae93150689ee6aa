//! [`ProviderConfig`]: one upstream OpenAI-compatible image API, its limits, retries and
//! where reference images go. The embedder fills it (kiln's binary from its settings).

use std::time::Duration;

use serde::Deserialize;

use crate::references::ReferenceUploadConfig;

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

/// How the upstream is asked to return images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResponseFormat {
    /// The bytes, base64-encoded in the answer.
    #[default]
    B64Json,
    /// A URL the image is downloaded from (SSRF-checked, see
    /// [`ProviderConfig::allow_loopback`] and [`ProviderConfig::allow_private`]).
    Url,
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

/// The task type the provider `name`'s tasks carry (`openai.<name>`), which
/// [`crate::worker`] registers a handler for.
pub fn task_type(name: &str) -> String {
    format!("openai.{name}")
}

impl ProviderConfig {
    /// Checks the settings of the provider `name`; `key` is where they live (e.g.
    /// `providers.acme`), and the message names the offending key.
    pub fn validate(&self, name: &str, key: &str) -> Result<(), String> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("{key}: names are letters, digits, `_` and `-`"));
        }
        let ok = self.base_url.parse::<http::Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        });
        if !ok {
            return Err(format!(
                "{key}.base_url {:?} is not an http(s) URL",
                self.base_url
            ));
        }
        if self.deadline < self.request_timeout {
            return Err(format!(
                "{key}.deadline must be at least request_timeout (a retry is made only when \
                 a whole attempt fits before the deadline)"
            ));
        }
        if self.concurrency == 0 {
            return Err(format!("{key}.concurrency must be at least 1"));
        }
        match (&self.references, &self.upload.target) {
            (ReferenceMode::Upload, None) => Err(format!(
                "{key}.upload.target is required with references = \"upload\""
            )),
            (ReferenceMode::Upload, Some(t)) => t
                .build()
                .map(drop)
                .map_err(|e| format!("{key}.upload.target: {e}")),
            (_, Some(_)) => Err(format!(
                "{key}.upload is set but references is not \"upload\""
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: serde_json::Value) -> ProviderConfig {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn settings_are_checked_by_key() {
        let key = "p.acme";
        let ok = parse(serde_json::json!({"base_url": "https://api.example.com/v1"}));
        assert_eq!(ok.validate("acme", key), Ok(()));
        assert_eq!(task_type("acme"), "openai.acme");
        let e = ok.validate("a c", key).unwrap_err();
        assert!(e.contains("letters, digits"), "{e}");
        let e = parse(serde_json::json!({"base_url": "ftp://x/v1"}))
            .validate("acme", key)
            .unwrap_err();
        assert!(e.starts_with("p.acme.base_url"), "{e}");
        let e = parse(serde_json::json!({"base_url": "http://h/v1", "deadline": "1s"}))
            .validate("acme", key)
            .unwrap_err();
        assert!(
            e.contains("deadline must be at least request_timeout"),
            "{e}"
        );
        let e = parse(serde_json::json!({"base_url": "http://h/v1", "concurrency": 0}))
            .validate("acme", key)
            .unwrap_err();
        assert!(e.contains("p.acme.concurrency"), "{e}");
        let e = parse(serde_json::json!({"base_url": "http://h/v1", "references": "upload"}))
            .validate("acme", key)
            .unwrap_err();
        assert!(e.contains("p.acme.upload.target is required"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_and_defaults_documented() {
        let e = serde_json::from_value::<ProviderConfig>(serde_json::json!({"bogus": 1}));
        assert!(e.is_err());
        let d = ProviderConfig::default();
        assert_eq!(d.response_format, ResponseFormat::B64Json);
        assert_eq!((d.max_retries, d.concurrency), (3, 4));
        assert_eq!(d.deadline, Duration::from_secs(600));
    }
}
