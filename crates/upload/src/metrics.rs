//! A small metrics hook: the client reports events, the application counts them.

use std::sync::atomic::{AtomicU64, Ordering};

use kiln_retry::Class;

/// Something that happened inside the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricEvent {
    /// A new connection was established.
    ConnectionOpened {
        /// Whether it speaks HTTP/2.
        h2: bool,
    },
    /// An attempt ended; `class` is `None` on success.
    Attempt {
        /// How it failed.
        class: Option<Class>,
        /// Whether it ran on a reused connection.
        reused: bool,
    },
    /// The retry policy decided to send again.
    Retry {
        /// The class of the failure being retried.
        class: Class,
        /// Whether it is a transparent (immediate, fresh-connection) retry.
        transparent: bool,
    },
    /// A request waited for a connection to be established (TCP + TLS + HTTP handshake) on
    /// its own path: no pooled connection had room for it.
    HandshakeWait,
    /// A warm spare connection was opened in the background, before a request needed it.
    SpareOpened,
    /// A request was resent at once on a new connection because its connection ended
    /// before the request was written.
    Resent {
        /// The error kind that showed it (`canceled`, `closed`, `dispatch_gone`, ...).
        kind: &'static str,
    },
    /// An upload ended.
    Upload {
        /// Whether it succeeded.
        ok: bool,
    },
}

/// Receives [`MetricEvent`]s. Implementations must be cheap and must not block.
pub trait MetricsHook: Send + Sync {
    /// Records one event.
    fn record(&self, event: MetricEvent);
}

/// A ready-made [`MetricsHook`] with atomic counters.
#[derive(Debug, Default)]
pub struct UploadCounters {
    connections: AtomicU64,
    attempts: AtomicU64,
    failed_attempts: AtomicU64,
    reused: AtomicU64,
    retries: AtomicU64,
    transparent_retries: AtomicU64,
    uploads_ok: AtomicU64,
    uploads_failed: AtomicU64,
    handshake_waits: AtomicU64,
    spares: AtomicU64,
    resent: AtomicU64,
}

/// A copy of [`UploadCounters`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CounterSnapshot {
    /// Connections opened.
    pub connections: u64,
    /// Attempts made.
    pub attempts: u64,
    /// Attempts that failed.
    pub failed_attempts: u64,
    /// Attempts on a reused connection.
    pub reused: u64,
    /// Retries (transparent ones included).
    pub retries: u64,
    /// Transparent retries of refused requests.
    pub transparent_retries: u64,
    /// Uploads that succeeded.
    pub uploads_ok: u64,
    /// Uploads that failed.
    pub uploads_failed: u64,
    /// Requests that waited for a connection to be established.
    pub handshake_waits: u64,
    /// Connections opened in the background as warm spares (also counted in `connections`).
    pub spares: u64,
    /// Requests resent at once because their connection ended before they were written.
    pub resent: u64,
}

impl UploadCounters {
    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            connections: l(&self.connections),
            attempts: l(&self.attempts),
            failed_attempts: l(&self.failed_attempts),
            reused: l(&self.reused),
            retries: l(&self.retries),
            transparent_retries: l(&self.transparent_retries),
            uploads_ok: l(&self.uploads_ok),
            uploads_failed: l(&self.uploads_failed),
            handshake_waits: l(&self.handshake_waits),
            spares: l(&self.spares),
            resent: l(&self.resent),
        }
    }
}

impl MetricsHook for UploadCounters {
    fn record(&self, event: MetricEvent) {
        let inc = |a: &AtomicU64| {
            a.fetch_add(1, Ordering::Relaxed);
        };
        match event {
            MetricEvent::ConnectionOpened { .. } => inc(&self.connections),
            MetricEvent::Attempt { class, reused } => {
                inc(&self.attempts);
                if class.is_some() {
                    inc(&self.failed_attempts);
                }
                if reused {
                    inc(&self.reused);
                }
            }
            MetricEvent::Retry { transparent, .. } => {
                inc(&self.retries);
                if transparent {
                    inc(&self.transparent_retries);
                }
            }
            MetricEvent::HandshakeWait => inc(&self.handshake_waits),
            MetricEvent::SpareOpened => inc(&self.spares),
            MetricEvent::Resent { .. } => inc(&self.resent),
            MetricEvent::Upload { ok: true } => inc(&self.uploads_ok),
            MetricEvent::Upload { ok: false } => inc(&self.uploads_failed),
        }
    }
}
