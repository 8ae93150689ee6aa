//! kiln-upload's test support: the upload client settings for the shared PKI, an nginx
//! backend block, the latency proxy. The PKI, nginx and ports come from kiln-test-support.
// Test-only helpers: a failed setup step should panic loudly.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod latency_proxy;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

#[allow(unused_imports)] // each test file uses a different subset
pub use kiln_test_support::{Nginx, free_port};
use kiln_upload::{UploadClient, UploadConfig, UploadCounters};

/// The shared throwaway PKI ([`kiln_test_support::Pki`]) plus the upload client settings
/// that trust it.
pub struct Pki(kiln_test_support::Pki);

impl Pki {
    pub fn new() -> Self {
        Self(kiln_test_support::Pki::new())
    }

    /// A client config trusting only this CA, with fast retries for tests.
    pub fn client_config(&self) -> UploadConfig {
        let mut cfg = UploadConfig {
            extra_ca_pem: Some(self.0.ca_pem.clone()),
            webpki_roots: false,
            ..UploadConfig::default()
        };
        cfg.retry.initial_backoff = Duration::from_millis(20);
        cfg.retry.max_backoff = Duration::from_secs(3);
        cfg.retry.deadline = Some(Duration::from_secs(30));
        cfg.attempt_timeout = Duration::from_secs(15);
        cfg
    }
}

impl Deref for Pki {
    type Target = kiln_test_support::Pki;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A client with counters.
pub fn client(cfg: UploadConfig) -> (UploadClient, Arc<UploadCounters>) {
    let counters = Arc::new(UploadCounters::default());
    let c = UploadClient::with_metrics(cfg, counters.clone()).unwrap();
    (c, counters)
}

/// A JSON-answering plain-HTTP backend block for nginx to proxy to (nginx reads the whole
/// request body before proxying, so uploads really transfer their bytes).
pub fn backend_block(port: u16) -> String {
    format!(
        "server {{ listen 127.0.0.1:{port}; keepalive_requests 100000;\n\
           location / {{ default_type application/json; return 200 '{{\"data\":{{\"url\":\"https://img.example/$request_length\",\"id\":\"$request_id\"}}}}'; }} }}\n"
    )
}
