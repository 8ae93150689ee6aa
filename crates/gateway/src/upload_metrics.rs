//! Counts what a kiln-upload client reports in the gateway's metrics: uploads by outcome,
//! attempts and retries by class, connections by protocol, all labelled with the client.

use kiln_upload::{MetricEvent, MetricsHook};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::Metrics;
use crate::metrics::ATTEMPT_OK;

type Labels = Vec<(&'static str, String)>;

/// A [`MetricsHook`] feeding `kiln_uploads_total`, `kiln_upload_attempts_total`,
/// `kiln_upload_retries_total`, `kiln_upload_connections_total` (label `client`) and the
/// older `kiln_retries_total{class}`.
pub(crate) struct UploadMetrics {
    client: String,
    uploads: Family<Labels, Counter>,
    attempts: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    all_retries: Family<Labels, Counter>,
    connections: Family<Labels, Counter>,
}

impl UploadMetrics {
    /// A hook for the client named `client` (e.g. `storage`); its series start at zero.
    pub(crate) fn new(metrics: &Metrics, client: &str) -> Self {
        metrics.register_upload_client(client);
        Self {
            client: client.to_owned(),
            uploads: metrics.uploads.clone(),
            attempts: metrics.upload_attempts.clone(),
            retries: metrics.upload_retries.clone(),
            all_retries: metrics.retries.clone(),
            connections: metrics.upload_connections.clone(),
        }
    }

    fn labels(&self, key: &'static str, value: &str) -> Labels {
        vec![("client", self.client.clone()), (key, value.to_owned())]
    }
}

impl MetricsHook for UploadMetrics {
    fn record(&self, event: MetricEvent) {
        match event {
            MetricEvent::ConnectionOpened { h2 } => {
                let p = if h2 { "h2" } else { "h1" };
                self.connections
                    .get_or_create(&self.labels("protocol", p))
                    .inc();
            }
            MetricEvent::Attempt { class, .. } => {
                let c = class.as_ref().map_or(ATTEMPT_OK, |c| c.as_str());
                self.attempts.get_or_create(&self.labels("class", c)).inc();
            }
            MetricEvent::Retry { class, .. } => {
                self.retries
                    .get_or_create(&self.labels("class", class.as_str()))
                    .inc();
                self.all_retries
                    .get_or_create(&vec![("class", class.as_str().to_owned())])
                    .inc();
            }
            MetricEvent::Upload { ok } => {
                let o = if ok { "ok" } else { "failed" };
                self.uploads.get_or_create(&self.labels("outcome", o)).inc();
            }
            _ => {}
        }
    }
}
