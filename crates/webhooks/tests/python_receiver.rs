//! The sender against scripts/webhook_receiver.py, which verifies every delivery with the
//! official `standardwebhooks` Python library. The venv comes from `scripts/prepare.sh`
//! (`KILN_VENV`, default `~/.cache/kiln/venv`); without it (or without the library) the tests
//! print a notice and return.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kiln_webhooks::{Outcome, Secret, SendConfig, Signer, SigningKey, new_message_id, send};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("KILN_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kiln/venv")))?;
    let py = venv.join("bin/python");
    let ok = std::process::Command::new(&py)
        .args(["-c", "import standardwebhooks"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "skipped: no Python venv with standardwebhooks at {} (run scripts/prepare.sh)",
            venv.display()
        );
    }
    ok.then_some(py)
}

struct Receiver {
    child: Child,
    port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    async fn start(py: &Path, secret: &Secret, switches: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("deliveries.jsonl");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/webhook_receiver.py");
        let mut child = Command::new(py)
            .arg(script)
            .args(["--port", "0", "--secret", &secret.to_string(), "--out"])
            .arg(&out)
            .args(switches)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the receiver starts within 30 s")
            .unwrap()
            .unwrap();
        let port = first.strip_prefix("listening ").unwrap().parse().unwrap();
        Self {
            child,
            port,
            out,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    async fn records(mut self) -> Vec<serde_json::Value> {
        let _ = self.child.kill().await;
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn cfg() -> SendConfig {
    let mut c = SendConfig::default();
    c.allow_loopback = true;
    c.timeout = Duration::from_secs(10);
    c
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn body(i: usize) -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"task.completed","timestamp":"2026-01-01T00:00:00Z","data":{{"id":"t{i}","status":"succeeded"}}}}"#
    ))
}

#[tokio::test]
async fn the_official_library_verifies_every_delivery() {
    let Some(py) = python() else { return };
    let old = Secret::generate().unwrap();
    let rx = Receiver::start(&py, &old, &[]).await;
    // Mid-rotation: the new secret first, the old one the receiver knows second, and a v1a
    // entry the Python library skips.
    let signer = Signer::new(
        vec![Secret::generate().unwrap(), old.clone()],
        Some(SigningKey::generate().unwrap()),
    )
    .unwrap();
    let mut ids = Vec::new();
    let sends = (0..20).map(|i| {
        let id = new_message_id().unwrap();
        ids.push(id.clone());
        let h = signer.headers(&id, now(), &body(i)).unwrap();
        let url = rx.url();
        async move { send(&url, &h, body(i), &cfg()).await }
    });
    let attempts = futures_util::future::join_all(sends).await;
    for a in &attempts {
        assert_eq!(
            (a.outcome, a.status),
            (Outcome::Delivered, Some(204)),
            "{a:?}"
        );
    }
    // A delivery signed with a key the receiver does not have is refused by it.
    let stranger = Signer::new(vec![Secret::generate().unwrap()], None).unwrap();
    let h = stranger.headers("msg_stranger", now(), &body(99)).unwrap();
    let a = send(&rx.url(), &h, body(99), &cfg()).await;
    assert_eq!(a.status, Some(400), "{a:?}");
    assert!(a.outcome.is_retryable());
    assert!(a.excerpt.contains("No matching signature"), "{}", a.excerpt);

    let records = rx.records().await;
    assert_eq!(records.len(), 21);
    let mut seen = HashSet::new();
    for r in &records {
        let id = r["webhook_id"].as_str().unwrap().to_owned();
        assert_eq!(r["type"], "task.completed");
        assert_eq!(r["verified"], id != "msg_stranger", "{r}");
        assert!(seen.insert(id), "each webhook-id arrives once");
    }
    assert!(ids.iter().all(|id| seen.contains(id)));
}

#[tokio::test]
async fn receiver_switches_503_then_ok_410_302_and_silence() {
    let Some(py) = python() else { return };
    let secret = Secret::generate().unwrap();
    let signer = Signer::new(vec![secret.clone()], None).unwrap();

    // 503 with Retry-After for the first 2 s, then accepted: the same webhook-id both times.
    let rx = Receiver::start(&py, &secret, &["--fail-503-for", "2", "--retry-after", "2"]).await;
    let h = signer.headers("msg_retry", now(), &body(1)).unwrap();
    let a = send(&rx.url(), &h, body(1), &cfg()).await;
    assert_eq!(
        (a.outcome, a.status),
        (
            Outcome::Failed {
                retry_after: Some(Duration::from_secs(2))
            },
            Some(503)
        )
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let h = signer.headers("msg_retry", now(), &body(1)).unwrap();
    let a = send(&rx.url(), &h, body(1), &cfg()).await;
    assert_eq!(a.outcome, Outcome::Delivered, "{a:?}");
    let records = rx.records().await;
    assert_eq!(records.len(), 2);
    assert!(
        records
            .iter()
            .all(|r| r["webhook_id"] == "msg_retry" && r["verified"] == true)
    );

    let rx = Receiver::start(&py, &secret, &["--always-410"]).await;
    let a = send(&rx.url(), &h, body(1), &cfg()).await;
    assert_eq!((a.outcome, a.status), (Outcome::Gone, Some(410)));

    let rx2 = Receiver::start(&py, &secret, &["--redirect-302"]).await;
    let a = send(&rx2.url(), &h, body(1), &cfg()).await;
    assert_eq!(
        (a.outcome, a.status),
        (Outcome::Failed { retry_after: None }, Some(302))
    );

    let rx3 = Receiver::start(&py, &secret, &["--never-answer"]).await;
    let mut quick = cfg();
    quick.timeout = Duration::from_secs(2);
    let a = send(&rx3.url(), &h, body(1), &quick).await;
    assert_eq!(
        (a.outcome, a.status),
        (Outcome::Failed { retry_after: None }, None)
    );
    assert!(a.latency >= quick.timeout);
    for rx in [rx, rx2, rx3] {
        let r = rx.records().await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["verified"], true);
    }
}
