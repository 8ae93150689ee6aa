//! Connections before they are needed: when the HTTP/2 connections of a busy host are about
//! to run out of room (they near `max_requests_per_connection` or the per-connection limit
//! learned from the server's GOAWAY, or idle towards `pool_idle_timeout`), the pool opens the
//! next one in the background, so that no request waits for TCP + TLS on its own path.
//!
//! The rule, checked each time a request takes a connection (so an idle pool opens nothing):
//! the request slots still free on the host's usable connections — `limit - requests` each,
//! counting nothing for a connection within the last quarter of its idle timeout — plus
//! `limit` for each connection being opened, must cover `headroom` times the requests in
//! flight on the host. `headroom` is one more than the number of requests that start, per
//! request in flight, while a connection is being opened (the host's running averages of a
//! background connect and of how long a request holds its connection), and between 2 and 8:
//! with high round-trip times a connect lasts several requests, and the next connection must
//! be started that many requests earlier.
//! When they do not, one more connection is opened in the background; a request that finds
//! no room waits for such a connection rather than opening yet another. Requests waiting
//! for a connection count as in flight. A connection opened in the background is lent only
//! once its server's first bytes (its SETTINGS) arrived, so that its first requests send into
//! the server's stream window rather than the 64 KiB default (`settled.rs`).
//! Bounds: at most `ceil(headroom x in flight / limit)` background connects at once per host,
//! and a connection that finishes opening when the host no longer needs it is kept only if
//! the host has no other unused one, so at most one warm spare per host outlives its demand.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;

use crate::metrics::MetricEvent;
use crate::pool::{H2Entry, HostLoad, Key, Lease, Pool, Sender};

/// Counts a request as waiting for a connection while it lives.
pub(crate) struct Waiting {
    pool: Pool,
    key: Key,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut loads) = self.pool.inner.loads.lock()
            && let Some(l) = loads.get_mut(&self.key)
        {
            l.waiting = l.waiting.saturating_sub(1);
        }
    }
}

/// Free request slots kept per request in flight, at least: one for the request that
/// replaces it when it ends, one more so that the connection being opened is ready before
/// that one ends too.
const HEADROOM: u64 = 2;
/// At most this many free slots per request in flight, however slow connects are.
const MAX_HEADROOM: u64 = 8;

impl HostLoad {
    /// Free slots wanted per request in flight: enough for the requests that will start
    /// while one more connection is being opened (its measured time to open over the measured
    /// time a request holds a connection), plus one, and at least `HEADROOM`.
    pub(crate) fn headroom(&self) -> u64 {
        let (Some(open), Some(request)) = (self.open_time, self.request_time) else {
            return HEADROOM;
        };
        let per_request = request.as_secs_f64().max(1e-4);
        let starts = (open.as_secs_f64() / per_request).ceil() as u64;
        (starts + 1).clamp(HEADROOM, MAX_HEADROOM)
    }

    /// Free slots wanted on the host right now.
    fn wanted(&self) -> u64 {
        (self.inflight + self.waiting) * self.headroom()
    }
}

/// Moves a running average one eighth of the way towards `sample`.
pub(crate) fn ewma(avg: &mut Option<Duration>, sample: Duration) {
    *avg = Some(match *avg {
        None => sample,
        Some(a) => (a * 7 + sample) / 8,
    });
}

impl Pool {
    /// Marks a request as waiting for a connection to `key` until the guard is dropped.
    pub(crate) fn waiting(&self, key: &Key) -> Waiting {
        if let Ok(mut loads) = self.inner.loads.lock() {
            loads.entry(key.clone()).or_default().waiting += 1;
        }
        Waiting {
            pool: self.clone(),
            key: key.clone(),
        }
    }

    /// Background connects in progress for `key`.
    pub(crate) fn opening(&self, key: &Key) -> u64 {
        self.inner
            .loads
            .lock()
            .ok()
            .and_then(|m| m.get(key).map(|l| l.opening))
            .unwrap_or(0)
    }

    /// Notified whenever a background connect for `key` ends.
    pub(crate) fn spare_done(&self, key: &Key) -> Arc<Notify> {
        self.inner
            .spare_done
            .lock()
            .map(|mut m| m.entry(key.clone()).or_default().clone())
            .unwrap_or_default()
    }

    /// Lends a connection that has served no request yet (a warm spare), if there is one.
    pub(crate) fn take_spare(&self, key: &Key) -> Option<Lease> {
        let mut map = self.inner.h2.lock().ok()?;
        let list = map.get_mut(key)?;
        let i = list.iter().position(|e| {
            e.conn.requests.load(Ordering::Relaxed) == 0 && e.conn.usable() && !e.tx.is_closed()
        })?;
        let e = &list[i];
        e.conn.requests.fetch_add(1, Ordering::Relaxed);
        let (conn, tx) = (e.conn.clone(), e.tx.clone());
        if self.inner.max_requests(key) <= 1 {
            list.remove(i);
        }
        drop(map);
        Some(self.lease(key, conn, Sender::H2(tx), false))
    }

    /// Opens a connection in the background when the host's connections will not have room
    /// for the requests in flight (see the module docs).
    pub(crate) fn prewarm(&self, key: &Key) {
        let inner = &self.inner;
        let s = &inner.settings;
        if !s.pooled || s.max_requests <= 1 {
            return;
        }
        let is_h2 = inner
            .known_h2
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
            .unwrap_or(false);
        if !is_h2 {
            return;
        }
        let limit = inner.max_requests(key);
        let near_idle = s.idle_timeout.mul_f64(0.75);
        let free = match inner.h2.lock() {
            Ok(map) => map.get(key).map_or(0, |list| {
                list.iter()
                    .filter(|e| e.conn.usable() && !e.tx.is_closed())
                    .filter(|e| {
                        e.conn.inflight.load(Ordering::Relaxed) > 0 || e.conn.idle_for() < near_idle
                    })
                    .map(|e| limit.saturating_sub(e.conn.requests.load(Ordering::Relaxed)))
                    .sum::<u64>()
            }),
            Err(_) => return,
        };
        let Ok(mut loads) = inner.loads.lock() else {
            return;
        };
        let load = loads.entry(key.clone()).or_default();
        let want = load.wanted();
        if free + load.opening * limit >= want || load.opening >= want.div_ceil(limit) {
            return;
        }
        load.opening += 1;
        drop(loads);
        let pool = self.clone();
        let key = key.clone();
        tokio::spawn(async move { pool.open_spare(key).await });
    }

    async fn open_spare(self, key: Key) {
        let started = tokio::time::Instant::now();
        let mut result = self.establish(&key).await;
        // Lent only once the server's SETTINGS arrived, so that its first requests send into
        // the server's stream window at once (`settled.rs`).
        if let Ok((conn, Sender::H2(tx))) = &result {
            let left = self
                .inner
                .settings
                .connect_timeout
                .saturating_sub(started.elapsed());
            let heard = tokio::time::timeout(left, conn.settled.wait()).await;
            if heard.is_err() || tx.is_closed() {
                result = Err(crate::error::AttemptError::Invalid(
                    "the server sent nothing on a new connection".into(),
                ));
            }
        }
        let inner = &self.inner;
        let mut loads = inner.loads.lock().ok();
        if let Some(l) = loads.as_mut().and_then(|m| m.get_mut(&key)) {
            l.opening = l.opening.saturating_sub(1);
            if result.is_ok() {
                ewma(&mut l.open_time, started.elapsed());
            }
        }
        let demand = loads
            .as_ref()
            .and_then(|m| m.get(&key))
            .map_or(0, HostLoad::wanted);
        drop(loads);
        let done = self.spare_done(&key);
        let _wake = WakeOnDrop(&done);
        let (conn, tx) = match result {
            Ok((conn, Sender::H2(tx))) => (conn, tx),
            Ok((_, Sender::H1(_))) => return,
            Err(e) => {
                tracing::debug!(host = %key.host, error = %e, "opening a spare connection failed");
                return;
            }
        };
        if let Some(m) = &inner.metrics {
            m.record(MetricEvent::SpareOpened);
        }
        let Ok(mut map) = inner.h2.lock() else {
            return;
        };
        let list = map.entry(key.clone()).or_default();
        let limit = inner.max_requests(&key);
        let free: u64 = list
            .iter()
            .filter(|e| e.conn.usable() && !e.tx.is_closed())
            .map(|e| limit.saturating_sub(e.conn.requests.load(Ordering::Relaxed)))
            .sum();
        let unused = list
            .iter()
            .any(|e| e.conn.requests.load(Ordering::Relaxed) == 0 && !e.tx.is_closed());
        if unused && free >= demand {
            // Demand went away while it was opening, and the host has a spare already.
            tracing::debug!(conn = conn.id, "spare connection not needed; closed");
            return;
        }
        tracing::debug!(conn = conn.id, host = %key.host, "spare connection ready");
        list.push(H2Entry { conn, tx });
    }
}

/// Wakes the requests waiting for background connects when a connect ends, however it ends.
struct WakeOnDrop<'a>(&'a Notify);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(open_ms: Option<u64>, request_ms: Option<u64>) -> HostLoad {
        HostLoad {
            inflight: 16,
            open_time: open_ms.map(Duration::from_millis),
            request_time: request_ms.map(Duration::from_millis),
            ..HostLoad::default()
        }
    }

    #[test]
    fn headroom_covers_the_requests_started_while_a_connection_opens() {
        // Nothing measured yet: the minimum.
        assert_eq!(load(None, Some(30)).headroom(), HEADROOM);
        // A connect shorter than a request: the minimum.
        assert_eq!(load(Some(10), Some(30)).headroom(), HEADROOM);
        // Three round trips to open, one and a half per request: two requests start per
        // request in flight while it opens, plus one.
        assert_eq!(load(Some(65), Some(30)).headroom(), 4);
        assert_eq!(load(Some(60), Some(30)).headroom(), 3);
        assert_eq!(load(Some(60), Some(30)).wanted(), 48);
        // Bounded however slow connects are.
        assert_eq!(load(Some(5000), Some(1)).headroom(), MAX_HEADROOM);
    }

    #[test]
    fn ewma_moves_an_eighth() {
        let mut a = None;
        ewma(&mut a, Duration::from_millis(80));
        assert_eq!(a, Some(Duration::from_millis(80)));
        ewma(&mut a, Duration::from_millis(160));
        assert_eq!(a, Some(Duration::from_millis(90)));
    }
}
