//! The notification reader: other processes' changes, from the `notify` stream.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, Value};

use super::reply::{array, event_from, text};
use crate::queue::Notification;

/// Reads the notification stream on a dedicated connection with `XREAD BLOCK`.
pub(super) struct NotifyReader {
    pub(super) client: Client,
    pub(super) stream: String,
    /// `readers`: the origins of the readers; `presence`: this reader's key in it.
    pub(super) readers: String,
    pub(super) presence: String,
    /// When this reader last renewed its presence.
    pub(super) renewed: Option<Instant>,
    pub(super) origin: String,
    pub(super) block: Duration,
    pub(super) conn: Option<MultiplexedConnection>,
    /// The last entry id seen; `None` before the first read (then: the newest entry).
    pub(super) last: Option<String>,
    pub(super) pending: VecDeque<Notification>,
    pub(super) failures: u32,
}

impl NotifyReader {
    pub(super) async fn next(&mut self) -> Notification {
        loop {
            if let Some(n) = self.pending.pop_front() {
                return n;
            }
            if let Err(e) = self.read().await {
                self.conn = None;
                self.renewed = None;
                self.failures += 1;
                let wait = Duration::from_millis(100 * u64::from(self.failures.min(50)));
                tracing::warn!(message = "redis notification reader failed", error = %e, retry_in_ms = wait.as_millis() as u64);
                tokio::time::sleep(wait).await;
                // Whatever was missed meanwhile: dispatch looks again.
                self.pending.push_back(Notification::TasksReady);
            }
        }
    }

    async fn read(&mut self) -> std::result::Result<(), ::redis::RedisError> {
        if self.conn.is_none() {
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(self.block + Duration::from_secs(5)));
            self.conn = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            );
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        // Writers add to the stream only while some reader other than themselves is alive:
        // announce this one (its key outlives three blocking reads) before reading.
        if self.renewed.is_none_or(|t| t.elapsed() >= self.block / 2) {
            let ttl = (self.block.as_millis() as u64).max(1) * 3;
            let _: Value = ::redis::pipe()
                .cmd("SET")
                .arg(&self.presence)
                .arg(1)
                .arg("PX")
                .arg(ttl)
                .ignore()
                .cmd("SADD")
                .arg(&self.readers)
                .arg(&self.origin)
                .ignore()
                .query_async(conn)
                .await?;
            self.renewed = Some(Instant::now());
        }
        if self.last.is_none() {
            // Start after the newest entry: changes from before this reader are in the store.
            let tail: Value = ::redis::cmd("XREVRANGE")
                .arg(&self.stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(conn)
                .await?;
            self.last = Some(
                parse_entries(tail)
                    .first()
                    .map(|(id, _)| id.clone())
                    .unwrap_or_else(|| "0-0".into()),
            );
        }
        let from = self.last.clone().unwrap_or_else(|| "0-0".into());
        let v: Value = ::redis::cmd("XREAD")
            .arg("COUNT")
            .arg(500)
            .arg("BLOCK")
            .arg(self.block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(&from)
            .query_async(conn)
            .await?;
        self.failures = 0;
        let entries = parse_xread(v);
        let mut ready = false;
        for (id, fields) in entries {
            self.last = Some(id);
            if fields.get("o") == Some(&self.origin) {
                continue;
            }
            if fields.contains_key("r") {
                ready = true;
            }
            if let Some(e) = fields.get("e").and_then(|s| event_from(s).ok()) {
                self.pending.push_back(Notification::Event(e));
            }
        }
        if ready {
            self.pending.push_back(Notification::TasksReady);
        }
        Ok(())
    }
}

type Entry = (String, HashMap<String, String>);

fn parse_entries(v: Value) -> Vec<Entry> {
    let Ok(items) = array(v) else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|e| {
            let mut e = array(e).ok()?.into_iter();
            let id = text(&e.next()?)?;
            let flat = array(e.next()?).ok()?;
            let fields = flat
                .chunks(2)
                .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
                .collect();
            Some((id, fields))
        })
        .collect()
}

/// `XREAD` answers `[[stream, [entries]]]` (RESP2) or a map (RESP3); nil on timeout.
fn parse_xread(v: Value) -> Vec<Entry> {
    match v {
        Value::Map(m) => m
            .into_iter()
            .flat_map(|(_, entries)| parse_entries(entries))
            .collect(),
        other => array(other)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|s| {
                array(s)
                    .ok()
                    .and_then(|s| s.into_iter().nth(1))
                    .map(parse_entries)
                    .unwrap_or_default()
            })
            .collect(),
    }
}
