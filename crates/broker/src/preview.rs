//! Previews of running tasks: the per-lease rate limit and how a preview is stored.
//!
//! A preview is stored as a progress update whose data carries `preview` (the image, inline
//! base64 or a file id) and `"event": "preview"`, so it travels the task's event log, is
//! replayed to reconnecting readers and needs nothing new from the queue stores. A later
//! plain progress update keeps a link to the latest preview (the same object without
//! `data`), so the task still names it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use kiln_protocol::messages::{Preview, Progress};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

/// Leases remembered before the ones idle longest are forgotten.
const MAX_LEASES: usize = 10_000;
/// A lease silent this long is forgotten when the table is full.
const IDLE: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Lease {
    /// Token bucket: previews that may go now.
    tokens: f64,
    refilled: Instant,
    /// The latest progress fields, repeated with every preview.
    progress: Map<String, Value>,
    /// The latest preview without its data, repeated with every progress.
    link: Option<Value>,
    dropped: u64,
}

/// What to do with a preview frame.
#[derive(Debug, PartialEq)]
pub(crate) enum Admission {
    /// Store this progress data.
    Store(Value),
    /// Over the rate: dropped (the count of drops on this lease so far).
    Dropped(u64),
}

/// The per-lease preview rate limit and the latest progress/preview of each lease.
#[derive(Debug)]
pub(crate) struct PreviewGate {
    interval: Duration,
    burst: u32,
    leases: Mutex<HashMap<String, Lease>>,
}

/// The progress data of a `progress` frame.
pub(crate) fn progress_data(p: &Progress) -> Map<String, Value> {
    let percent = (p.total > 0).then(|| (p.step as f64 / p.total as f64 * 100.0).min(100.0));
    let v = json!({"stage": p.stage, "step": p.step, "total": p.total, "eta_ms": p.eta_ms,
        "percent": percent});
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl PreviewGate {
    /// At most `burst` previews at once per lease, then one per `interval`.
    pub(crate) fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst: burst.max(1),
            leases: Mutex::new(HashMap::new()),
        }
    }

    fn with<T>(&self, lease: &str, f: impl FnOnce(&mut Lease) -> T) -> T {
        let now = Instant::now();
        let mut map = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_LEASES && !map.contains_key(lease) {
            map.retain(|_, l| now.duration_since(l.refilled) < IDLE);
        }
        let burst = f64::from(self.burst);
        let l = map.entry(lease.to_owned()).or_insert_with(|| Lease {
            tokens: burst,
            refilled: now,
            progress: Map::new(),
            link: None,
            dropped: 0,
        });
        if !self.interval.is_zero() {
            let gained = now.duration_since(l.refilled).as_secs_f64() / self.interval.as_secs_f64();
            l.tokens = (l.tokens + gained).min(burst);
        } else {
            l.tokens = burst;
        }
        l.refilled = now;
        f(l)
    }

    /// The data to store for a `progress` frame: its fields plus the link to the lease's
    /// latest preview.
    pub(crate) fn progress(&self, p: &Progress) -> Value {
        let data = progress_data(p);
        self.with(&p.lease, |l| {
            l.progress = data.clone();
            let mut data = data;
            if let Some(link) = &l.link {
                data.insert("preview".into(), link.clone());
            }
            Value::Object(data)
        })
    }

    /// Checks a `preview` frame and applies the rate limit. `Err` says what is wrong with
    /// it (not base64, over the size limit, no image type).
    pub(crate) fn preview(&self, p: &Preview) -> Result<Admission, String> {
        p.check()?;
        let mut preview = json!({"index": p.index, "mime": p.mime});
        if let Some(w) = p.width {
            preview["width"] = w.into();
        }
        if let Some(h) = p.height {
            preview["height"] = h.into();
        }
        if let Some(f) = &p.file {
            preview["file"] = f.clone().into();
        }
        let mut link = preview.clone();
        if let Some(d) = &p.data {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(d)
                .map_err(|e| format!("preview data is not base64: {e}"))?;
            if bytes.len() > kiln_protocol::messages::MAX_PREVIEW_BYTES {
                return Err(format!(
                    "preview data is {} bytes (at most {})",
                    bytes.len(),
                    kiln_protocol::messages::MAX_PREVIEW_BYTES
                ));
            }
            preview["bytes"] = bytes.len().into();
            link["bytes"] = bytes.len().into();
            preview["data"] = d.clone().into();
        }
        Ok(self.with(&p.lease, |l| {
            if l.tokens < 1.0 {
                l.dropped += 1;
                return Admission::Dropped(l.dropped);
            }
            l.tokens -= 1.0;
            l.link = Some(link);
            let mut data = l.progress.clone();
            data.insert("preview".into(), preview);
            data.insert("event".into(), "preview".into());
            Admission::Store(Value::Object(data))
        }))
    }

    /// Forgets a lease that ended.
    pub(crate) fn forget(&self, lease: &str) {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(lease);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frame(index: u32) -> Preview {
        Preview {
            lease: "l-1".into(),
            index,
            mime: "image/png".into(),
            data: Some("iVBORw0KGgo=".into()),
            file: None,
            width: Some(8),
            height: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_one_per_interval() {
        let g = PreviewGate::new(Duration::from_millis(250), 3);
        let stored = |g: &PreviewGate, n: u32| {
            (0..n)
                .filter(|i| matches!(g.preview(&frame(*i)).unwrap(), Admission::Store(_)))
                .count()
        };
        assert_eq!(stored(&g, 50), 3);
        tokio::time::advance(Duration::from_millis(260)).await;
        assert_eq!(stored(&g, 50), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(stored(&g, 50), 3, "the bucket refills only up to the burst");
        assert_eq!(
            g.preview(&frame(9)).unwrap(),
            Admission::Dropped(144),
            "drops are counted"
        );
        g.forget("l-1");
        assert_eq!(stored(&g, 5), 3, "a forgotten lease starts afresh");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_keeps_a_link_and_previews_keep_the_progress() {
        let g = PreviewGate::new(Duration::from_millis(250), 2);
        let progress = Progress {
            lease: "l-1".into(),
            stage: Some("render".into()),
            step: 3,
            total: 4,
            eta_ms: None,
        };
        assert!(g.progress(&progress).get("preview").is_none());
        let Admission::Store(v) = g.preview(&frame(0)).unwrap() else {
            panic!()
        };
        assert_eq!(v["event"], "preview");
        assert_eq!(v["stage"], "render");
        assert_eq!(v["preview"]["data"], "iVBORw0KGgo=");
        assert_eq!(v["preview"]["bytes"], 8);
        let after = g.progress(&progress);
        assert_eq!(after["preview"]["index"], 0);
        assert_eq!(after["preview"]["width"], 8);
        assert!(after["preview"].get("data").is_none(), "{after}");
        assert!(after.get("event").is_none());
    }

    #[test]
    fn bad_previews_are_refused_with_a_reason() {
        let g = PreviewGate::new(Duration::from_millis(250), 2);
        let mut p = frame(0);
        p.data = Some("not base64!".into());
        assert!(g.preview(&p).unwrap_err().contains("base64"));
        p.mime = "text/html".into();
        assert!(g.preview(&p).unwrap_err().contains("text/html"));
    }
}
