//! Broker settings with documented defaults.

use std::time::Duration;

use serde::Deserialize;

/// Timers and limits of the broker's sessions and dispatch.
///
/// What a store decides itself — attempts before a task is dead-lettered, the retry
/// back-off, SQLite's durability — is set where the store is built
/// ([`QueueOptions`](crate::QueueOptions) inside `SqliteOptions`, `PostgresOptions` or
/// `RedisOptions`), not here.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// How often workers send `hb`. Default: 15 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A lease lapses this long after its last renewal; then the task runs elsewhere.
    /// Default: 90 s.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// A connection silent this long is closed (4009); its leases live on until they lapse.
    /// Default: 45 s.
    #[serde(with = "humantime_serde")]
    pub dead_after: Duration,
    /// Time a new connection has to send `hello`. Default: 10 s.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// How often lapsed leases and deadlines are checked. Default: 1 s.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Largest frame either way, bytes: a worker frame above it is answered with an
    /// `oversized` error envelope (the session stays open), and the gateway never sends a
    /// larger one (assign batches are split to fit; a task that cannot fit alone is an
    /// assignment failure). Default: 1 MiB.
    pub max_frame_bytes: usize,
    /// After a retryable `reject`, the rejecting worker is not offered that task again for
    /// this long (other workers may take it at once). Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub reject_backoff: Duration,
    /// Frames above this are not read at all: the transport closes the connection with
    /// 1009. At least `max_frame_bytes`. Default: 16 MiB.
    pub frame_hard_limit_bytes: usize,
    /// Assignments of one task that may fail on the transport in a row (frame refused by
    /// the gateway or the worker, or the connection dropped before the worker acknowledged
    /// it) before the task fails, dead-lettered, with error `assign_failed`. A failed
    /// assignment does not count as an attempt. Default: 3.
    pub max_assign_failures: u32,
    /// Previews (`preview` frames) of one lease stored at once before the rate limit
    /// applies. Default: 4.
    pub preview_burst: u32,
    /// After the burst, one preview per lease per this interval is stored; the others are
    /// dropped (previews are lossy, the result is not slowed). Default: 250 ms.
    #[serde(with = "humantime_serde")]
    pub preview_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            lease: Duration::from_secs(90),
            dead_after: Duration::from_secs(45),
            hello_timeout: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(1),
            max_frame_bytes: kiln_protocol::DEFAULT_MAX_FRAME_BYTES,
            reject_backoff: Duration::from_secs(30),
            frame_hard_limit_bytes: 16 << 20,
            max_assign_failures: 3,
            preview_burst: 4,
            preview_interval: Duration::from_millis(250),
        }
    }
}
