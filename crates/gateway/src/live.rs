//! The gateway-wide live feed behind `GET /v1/events`: worker presence (`worker.online`,
//! `worker.draining`, `worker.offline`, `worker.updated`), `queue.paused` / `queue.resumed`,
//! `queue.backlog` per task type, and task status changes (`task.queued`, `task.started`,
//! `task.completed`).
//!
//! One background task follows the broker's task events and, once a second (or at once
//! when an admin route pokes it), compares the broker's in-memory session table and pause
//! flag with what it last reported. A worker whose session ended is reported offline only
//! when it has not come back within `worker_offline_grace`, so a reconnect blip is not an
//! outage. Backlog counts are read from the store at most once a second, and only after a
//! task changed. Events carry ids `<epoch>-<n>`; the last [`RING`] are kept in memory so a
//! client resumes with `Last-Event-ID`, and a client whose id is unknown (older, or from
//! before a restart) gets a `resync` event first: its cue to reload its snapshots.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use kiln_broker::{TaskEvent, TaskEventKind, WorkerInfo, now_ms};
use kiln_protocol::TaskState;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

use crate::{AppState, Inner};

/// Events kept for `Last-Event-ID` resumption.
pub(crate) const RING: usize = 1024;
/// Width of one throughput bucket, ms.
pub(crate) const BUCKET_MS: u64 = 60_000;
/// Throughput buckets kept (one hour).
pub(crate) const BUCKETS: usize = 60;

/// One event of the live feed.
#[derive(Debug, Clone)]
pub(crate) struct LiveEvent {
    pub(crate) id: u64,
    pub(crate) kind: &'static str,
    pub(crate) data: Value,
}

/// Terminal tasks per minute by status, for the last hour.
#[derive(Debug, Default)]
pub(crate) struct Throughput {
    /// Bucket start (ms, a multiple of [`BUCKET_MS`]) -> status -> count.
    buckets: BTreeMap<u64, BTreeMap<String, u64>>,
}

impl Throughput {
    pub(crate) fn add(&mut self, at_ms: u64, status: &str) {
        let start = at_ms - at_ms % BUCKET_MS;
        *self
            .buckets
            .entry(start)
            .or_default()
            .entry(status.to_owned())
            .or_default() += 1;
        let oldest = start.saturating_sub(BUCKET_MS * BUCKETS as u64);
        self.buckets.retain(|k, _| *k > oldest);
    }

    /// The last hour, oldest first, one entry per minute (empty minutes included).
    pub(crate) fn snapshot(&self, now: u64) -> Vec<Value> {
        let last = now - now % BUCKET_MS;
        (0..BUCKETS as u64)
            .rev()
            .map(|i| {
                let start = last - i * BUCKET_MS;
                let counts = self.buckets.get(&start).cloned().unwrap_or_default();
                json!({"start": crate::tasks::rfc3339(start), "start_ms": start, "counts": counts})
            })
            .collect()
    }
}

/// The hub: broadcast channel, replay ring, throughput.
#[derive(Debug)]
pub(crate) struct Hub {
    tx: broadcast::Sender<LiveEvent>,
    ring: Mutex<(VecDeque<LiveEvent>, u64)>,
    epoch: String,
    poke: Notify,
    pub(crate) throughput: Mutex<Throughput>,
}

impl Default for Hub {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(RING);
        Self {
            tx,
            ring: Mutex::new((VecDeque::with_capacity(RING), 0)),
            epoch: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            poke: Notify::new(),
            throughput: Mutex::default(),
        }
    }
}

impl Hub {
    /// Publishes one event.
    pub(crate) fn emit(&self, kind: &'static str, data: Value) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.1 += 1;
        let e = LiveEvent {
            id: ring.1,
            kind,
            data,
        };
        if ring.0.len() == RING {
            ring.0.pop_front();
        }
        ring.0.push_back(e.clone());
        // Sent under the lock so that replay + subscription never reorder events.
        let _ = self.tx.send(e);
    }

    /// The wire id of event `n`.
    pub(crate) fn wire_id(&self, n: u64) -> String {
        format!("{}-{n}", self.epoch)
    }

    /// Subscribes and returns the events after `last` (a wire id), or `None` when `last`
    /// cannot be resumed from (another epoch, or fallen out of the ring).
    pub(crate) fn resume(
        &self,
        last: Option<&str>,
    ) -> (broadcast::Receiver<LiveEvent>, Option<Vec<LiveEvent>>) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let Some(last) = last else {
            return (rx, Some(Vec::new()));
        };
        let n = last
            .strip_prefix(&self.epoch)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|n| n.parse::<u64>().ok());
        let replay = match n {
            Some(n) if n <= ring.1 => {
                let oldest = ring.0.front().map_or(ring.1 + 1, |e| e.id);
                (n + 1 >= oldest).then(|| ring.0.iter().filter(|e| e.id > n).cloned().collect())
            }
            _ => None,
        };
        (rx, replay)
    }

    /// Makes the presence check run now (an admin route changed something).
    pub(crate) fn poke(&self) {
        self.poke.notify_one();
    }
}

/// What was last reported about a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Online,
    Draining,
    Offline,
}

#[derive(Debug)]
struct Seen {
    reported: Presence,
    /// When its session was first seen ended (or the worker gone from the table).
    gone_since: Option<Instant>,
    /// inflight, slots, gpu as last reported: `worker.updated` fires when they change.
    shape: Value,
    info: Value,
}

fn shape(w: &WorkerInfo) -> Value {
    json!([w.inflight, w.slots, w.gpu, w.capabilities])
}

/// Compares the session table with what was reported and emits the differences.
fn presence(
    hub: &Hub,
    known: &mut HashMap<String, Seen>,
    workers: Vec<WorkerInfo>,
    grace: Duration,
) {
    let now = Instant::now();
    let mut present = std::collections::HashSet::new();
    for w in workers {
        present.insert(w.worker_id.clone());
        let want = match (w.connected, w.draining) {
            (true, false) => Some(Presence::Online),
            (true, true) => Some(Presence::Draining),
            (false, _) => None,
        };
        let info = serde_json::to_value(&w).unwrap_or(Value::Null);
        let sh = shape(&w);
        let seen = known.entry(w.worker_id.clone()).or_insert(Seen {
            reported: Presence::Offline,
            gone_since: None,
            shape: Value::Null,
            info: info.clone(),
        });
        seen.info = info.clone();
        match want {
            Some(p) => {
                seen.gone_since = None;
                if p != seen.reported {
                    seen.reported = p;
                    seen.shape = sh;
                    let kind = match p {
                        Presence::Online => "worker.online",
                        _ => "worker.draining",
                    };
                    hub.emit(kind, info);
                } else if sh != seen.shape {
                    seen.shape = sh;
                    hub.emit("worker.updated", info);
                }
            }
            None => {
                // Drained and gone before the last look: say it drained, then (after the
                // grace period) that it is offline.
                if w.draining && seen.reported == Presence::Online {
                    seen.reported = Presence::Draining;
                    hub.emit("worker.draining", info.clone());
                }
                let since = *seen.gone_since.get_or_insert(now);
                if seen.reported != Presence::Offline && now.duration_since(since) >= grace {
                    seen.reported = Presence::Offline;
                    hub.emit("worker.offline", info);
                }
            }
        }
    }
    // Forgotten by the broker (gone longer than a lease): offline once the grace passed.
    known.retain(|id, seen| {
        if present.contains(id) {
            return true;
        }
        let since = *seen.gone_since.get_or_insert(now);
        if seen.reported == Presence::Offline {
            return false;
        }
        if now.duration_since(since) >= grace {
            let mut info = seen.info.clone();
            if let Some(o) = info.as_object_mut() {
                o.insert("connected".into(), Value::Bool(false));
            }
            hub.emit("worker.offline", info);
            return false;
        }
        true
    });
}

/// Backlog per task type: state -> count.
type Backlog = BTreeMap<String, BTreeMap<&'static str, u64>>;

async fn backlog(state: &AppState) -> Option<Backlog> {
    let stats = state.broker().queue().stats().await.ok()?;
    let mut out = Backlog::new();
    for (st, tt, n) in stats.by_state_type {
        if matches!(st, TaskState::Queued | TaskState::Running) {
            *out.entry(tt).or_default().entry(st.as_str()).or_default() += n;
        }
    }
    Some(out)
}

/// Fills the throughput buckets from tasks that ended in the last hour (bounded scan).
async fn seed_throughput(state: &AppState) {
    let since = now_ms().saturating_sub(BUCKET_MS * BUCKETS as u64);
    for st in [
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Canceled,
        TaskState::Expired,
    ] {
        let filter = kiln_broker::ListFilter {
            state: Some(st),
            limit: 500,
            ..Default::default()
        };
        let Ok(tasks) = state.broker().queue().list(&filter).await else {
            continue;
        };
        let mut tp = state
            .inner
            .live
            .throughput
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for t in tasks {
            if let Some(at) = t.completed_at.filter(|at| *at >= since) {
                tp.add(at, st.as_str());
            }
        }
    }
}

/// Follows the broker's task events and the session table; ends with the state.
pub(crate) async fn run(weak: Weak<Inner>, mut events: broadcast::Receiver<TaskEvent>) {
    if let Some(inner) = weak.upgrade() {
        seed_throughput(&AppState { inner }).await;
    }
    let mut known: HashMap<String, Seen> = HashMap::new();
    let mut paused: Option<bool> = None;
    let mut reported_backlog = Backlog::new();
    let mut dirty = true;
    let mut last_backlog = Instant::now() - Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let state = AppState { inner };
        let ev = {
            let hub = &state.inner.live;
            tokio::select! {
                r = events.recv() => Some(r),
                _ = tick.tick() => None,
                _ = hub.poke.notified() => None,
            }
        };
        let hub = &state.inner.live;
        match ev {
            Some(Ok(e)) => {
                task_event(hub, &e);
                if !matches!(e.kind, TaskEventKind::Progress(_)) {
                    dirty = true;
                }
                continue;
            }
            Some(Err(broadcast::error::RecvError::Lagged(_))) => {
                dirty = true;
                continue;
            }
            Some(Err(broadcast::error::RecvError::Closed)) => return,
            None => {}
        }
        let grace = state.config().worker_offline_grace;
        presence(hub, &mut known, state.broker().workers(), grace);
        let p = state.broker().is_paused();
        if paused != Some(p) {
            if paused.is_some() || p {
                hub.emit(
                    if p { "queue.paused" } else { "queue.resumed" },
                    json!({"paused": p}),
                );
            }
            paused = Some(p);
        }
        if dirty && last_backlog.elapsed() >= Duration::from_secs(1) {
            dirty = false;
            last_backlog = Instant::now();
            if let Some(b) = backlog(&state).await {
                for (tt, counts) in &b {
                    if reported_backlog.get(tt) != Some(counts) {
                        hub.emit("queue.backlog", backlog_data(tt, counts));
                    }
                }
                for tt in reported_backlog.keys() {
                    if !b.contains_key(tt) {
                        hub.emit("queue.backlog", backlog_data(tt, &BTreeMap::new()));
                    }
                }
                reported_backlog = b;
            }
        }
    }
}

fn backlog_data(tt: &str, counts: &BTreeMap<&'static str, u64>) -> Value {
    json!({
        "task_type": tt,
        "queued": counts.get("queued").copied().unwrap_or(0),
        "running": counts.get("running").copied().unwrap_or(0),
    })
}

fn task_event(hub: &Hub, e: &TaskEvent) {
    let data = e.kind.data();
    let status = data["status"].as_str().unwrap_or("");
    let kind = match (&e.kind, status) {
        (TaskEventKind::Completed { .. }, _) => {
            hub.throughput
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add(e.ts, status);
            "task.completed"
        }
        (TaskEventKind::Status { .. }, "queued") => "task.queued",
        (TaskEventKind::Status { .. }, "running") => "task.started",
        _ => return,
    };
    hub.emit(
        kind,
        json!({
            "task_id": e.task_id,
            "status": status,
            "attempt": data.get("attempt"),
            "worker_id": data.get("worker_id"),
            "ts": e.ts,
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_replays_after_the_id_and_refuses_unknown_ones() {
        let hub = Hub::default();
        for i in 0..3 {
            hub.emit("queue.paused", json!({ "i": i }));
        }
        let (_, all) = hub.resume(None);
        assert_eq!(all.unwrap().len(), 0);
        let (_, after1) = hub.resume(Some(&hub.wire_id(1)));
        let ids: Vec<u64> = after1.unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert!(hub.resume(Some("otherepoch-1")).1.is_none());
        assert!(hub.resume(Some(&hub.wire_id(99))).1.is_none());
        for i in 0..RING + 5 {
            hub.emit("queue.resumed", json!({ "i": i }));
        }
        assert!(hub.resume(Some(&hub.wire_id(2))).1.is_none());
        let last = hub.wire_id((RING + 8) as u64);
        assert_eq!(hub.resume(Some(&last)).1.unwrap().len(), 0);
    }

    #[test]
    fn throughput_keeps_an_hour_of_minutes() {
        let mut tp = Throughput::default();
        let now = 10 * 3_600_000 + 30_000;
        tp.add(now, "succeeded");
        tp.add(now - 1000, "failed");
        tp.add(now - 2 * 3_600_000, "succeeded");
        let snap = tp.snapshot(now);
        assert_eq!(snap.len(), BUCKETS);
        let last = &snap[BUCKETS - 1]["counts"];
        assert_eq!(last["succeeded"], 1);
        assert_eq!(last["failed"], 1);
        let total: u64 = snap
            .iter()
            .filter_map(|b| b["counts"]["succeeded"].as_u64())
            .sum();
        assert_eq!(total, 1);
    }
}
