//! Connections before they are needed: when the HTTP/2 connections of a busy host are about
//! to run out of room (they near `max_requests_per_connection` or the per-connection limit
//! learned from the server's GOAWAY, or idle towards `pool_idle_timeout`), the pool opens the
//! next one in the background, so that no request waits for TCP + TLS on its own path.
//!
//! The rule, checked each time a request takes a connection (so an idle pool opens nothing):
//! the request slots still free on the host's usable connections — `limit - requests` each,
//! counting nothing for a connection within the last quarter of its idle timeout — plus
//! `limit` for each connection being opened, must cover twice the requests in flight on the
//! host (`HEADROOM`).
//! When they do not, one more connection is opened in the background; a request that finds
//! no room waits for such a connection rather than opening yet another. Requests waiting
//! for a connection count as in flight. Bounds: at most `ceil(2 x in flight / limit)`
//! background connects at once per host, and a connection that
//! finishes opening when the host no longer needs it is kept only if the host has no other
//! unused one, so at most one warm spare per host outlives its demand.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::Notify;

use crate::metrics::MetricEvent;
use crate::pool::{H2Entry, Key, Lease, Pool, Sender};

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

/// Free request slots kept per request in flight: one for the request that replaces it when
/// it ends, one more so that the connection being opened is ready before that one ends too.
const HEADROOM: u64 = 2;

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
        let want = (load.inflight + load.waiting) * HEADROOM;
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
        let result = self.establish(&key).await;
        let inner = &self.inner;
        let mut loads = inner.loads.lock().ok();
        if let Some(l) = loads.as_mut().and_then(|m| m.get_mut(&key)) {
            l.opening = l.opening.saturating_sub(1);
        }
        let demand = loads
            .as_ref()
            .and_then(|m| m.get(&key))
            .map_or(0, |l| (l.inflight + l.waiting) * HEADROOM);
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
