//! The settings of webhook delivery (`[webhooks]` in the binary's configuration).

use std::time::Duration;

use serde::Deserialize;

/// Webhook delivery: signing, the retry schedule, the address policy and the global
/// endpoints. See docs/WEBHOOKS.md.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// The signing secrets (`whsec_<base64>`), space-separated: the first signs alone
    /// unless more are given, in which case every delivery carries one `v1` signature per
    /// secret (a rotation). `kiln config gen-webhook-secret` prints a new one. `None`:
    /// webhooks are accepted and stored, but not sent until a secret is configured.
    /// Default: none.
    pub secret: Option<String>,
    /// An Ed25519 signing key (`whsk_<base64 seed>`): every delivery then also carries a
    /// `v1a` signature. Default: none.
    pub signing_key: Option<String>,
    /// Deliver to private, loopback, link-local and other addresses that are not globally
    /// reachable. Default: false (such endpoints are refused: the message is exhausted at
    /// its first attempt, with the refusal as its error).
    pub allow_private: bool,
    /// Seconds before each attempt: the first entry before the first attempt (0: at
    /// once), then one per retry; each is jittered by ±10 %. When the list is spent the
    /// message is exhausted. Default: `[0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000,
    /// 86400]` (the Standard Webhooks schedule).
    pub schedule_s: Vec<f64>,
    /// Time limit of one attempt. Default: 15 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts in flight at once per instance; a receiver that never answers holds one
    /// for at most `timeout`. Default: 64.
    pub concurrency: usize,
    /// How long an instance holds a message it is sending; another instance may send it
    /// after that (it must exceed `timeout`). Default: 60 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often due retries are looked for when nothing new arrives. Default: 1 s.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Endpoints that receive every matching event, besides the tasks' own webhooks.
    /// Default: none.
    pub endpoints: Vec<EndpointConfig>,
}

/// One global endpoint (`[[webhooks.endpoints]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// Where deliveries go (absolute http(s) URL).
    pub url: String,
    /// The event types it receives: `task.started`, `task.progress`, `task.completed`,
    /// `worker.online`, `worker.offline`, `queue.backlog`. Default: `["task.completed"]`.
    #[serde(default = "default_endpoint_events")]
    pub events: Vec<String>,
    /// The environment variable holding this endpoint's secret (read by the binary, which
    /// fills `secret`); without it the endpoint uses `webhooks.secret`. Default: none.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// This endpoint's secrets (`whsec_…`, space-separated), as the binary read them from
    /// `secret_env`. Never read from a file. Default: none.
    #[serde(skip)]
    pub secret: Option<String>,
}

fn default_endpoint_events() -> Vec<String> {
    vec!["task.completed".to_owned()]
}

/// Every event type a global endpoint may ask for.
pub const ENDPOINT_EVENTS: [&str; 6] = [
    "task.started",
    "task.progress",
    "task.completed",
    "worker.online",
    "worker.offline",
    "queue.backlog",
];

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            secret: None,
            signing_key: None,
            allow_private: false,
            schedule_s: vec![
                0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0,
            ],
            timeout: Duration::from_secs(15),
            concurrency: 64,
            lease: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            endpoints: Vec::new(),
        }
    }
}

/// The longest webhook URL a task may name, in bytes.
pub(crate) const MAX_URL_LEN: usize = 2048;

/// Checks a webhook URL: absolute `http` or `https` with a host, at most
/// [`MAX_URL_LEN`] bytes, no spaces or control characters. The message names `field`.
pub(crate) fn check_url(field: &str, url: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{field}: {why}"));
    if url.is_empty() || url.len() > MAX_URL_LEN {
        return bad(&format!("must be 1 to {MAX_URL_LEN} bytes"));
    }
    if url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return bad("must not contain spaces or control characters");
    }
    let rest = match url.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https") => {
            rest
        }
        _ => return bad("must be an absolute http:// or https:// URL"),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') || authority.contains('@') {
        return bad("must name a host (and no user information)");
    }
    match url.parse::<axum::http::Uri>() {
        Ok(u) if u.host().is_some_and(|h| !h.is_empty()) => Ok(()),
        _ => bad("is not a valid URL"),
    }
}

impl WebhooksConfig {
    /// Checks the settings (called when the gateway starts): the schedule, the endpoints'
    /// URLs and events, the lease against the timeout.
    pub fn validate(&self) -> Result<(), String> {
        if self.schedule_s.is_empty()
            || self
                .schedule_s
                .iter()
                .any(|s| !s.is_finite() || *s < 0.0 || *s > 30.0 * 86400.0)
        {
            return Err("webhooks.schedule_s: 1 or more entries of 0 to 2592000 seconds".into());
        }
        if self.concurrency == 0 {
            return Err("webhooks.concurrency must be above zero".into());
        }
        if self.lease <= self.timeout {
            return Err("webhooks.lease must be longer than webhooks.timeout".into());
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            check_url(&format!("webhooks.endpoints[{i}].url"), &e.url)?;
            if let Some(bad) = e
                .events
                .iter()
                .find(|ev| !ENDPOINT_EVENTS.contains(&ev.as_str()))
            {
                return Err(format!(
                    "webhooks.endpoints[{i}].events: unknown event {bad:?} (known: {})",
                    ENDPOINT_EVENTS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(check_url("webhook", "https://example.com/hook?a=1").is_ok());
        assert!(check_url("webhook", "http://127.0.0.1:8080/x").is_ok());
        for bad in [
            "",
            "ftp://example.com/",
            "example.com/hook",
            "https://",
            "https:///path",
            "https://user:pw@example.com/",
            "https://exa mple.com/",
            "http://:80/",
        ] {
            let e = check_url("webhook", bad).unwrap_err();
            assert!(e.starts_with("webhook: "), "{bad}: {e}");
        }
        assert!(
            check_url(
                "webhook",
                &format!("https://e.com/{}", "a".repeat(MAX_URL_LEN))
            )
            .is_err()
        );
    }

    #[test]
    fn the_defaults_are_valid_and_bad_settings_named() {
        assert!(WebhooksConfig::default().validate().is_ok());
        let c = WebhooksConfig {
            schedule_s: vec![],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("schedule_s"));
        let c = WebhooksConfig {
            endpoints: vec![EndpointConfig {
                url: "https://e.com/".into(),
                events: vec!["task.done".into()],
                secret_env: None,
                secret: None,
            }],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("endpoints[0].events"));
    }
}
