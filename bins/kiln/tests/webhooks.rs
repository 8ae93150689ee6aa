//! Webhooks end to end: the real `kiln serve` (its in-process demo worker runs the tasks)
//! delivers to `scripts/webhook_receiver.py`, which verifies every delivery with the
//! official `standardwebhooks` Python package and records one JSON line per request.
//!
//! 1. `five_hundred_tasks_get_five_hundred_verified_webhooks`: 500 tasks with a webhook get
//!    500 `task.completed` messages, each verified, each `webhook-id` unique; prints p50 and
//!    p99 from completion (the message's time) to receipt.
//! 2. `kill_9_while_deliveries_fail_then_every_message_arrives`: the receiver answers 503
//!    for its first seconds; kiln is killed with SIGKILL while deliveries are pending, and
//!    restarted on the same data; every message then arrives, duplicates only under the same
//!    `webhook-id`.
//! 3. `an_exhausted_message_is_visible_and_the_retry_endpoint_delivers_it`.
//! 4. `gone_disables_redirects_fail_private_addresses_are_refused`.
//! 5. `a_receiver_that_never_answers_times_out_and_blocks_nothing`.
//! 6. `global_endpoints_get_task_and_worker_events_and_openai_takes_the_header`.
//! 7. `a_rust_receiver_verifies_every_delivery_with_kiln_webhooks`: the same deliveries
//!    checked in Rust, by an axum receiver with kiln-webhooks' own verifier (needs no Python).
//!
//! The tests need Python 3 with `standardwebhooks` (`scripts/prepare.sh` installs it into
//! `$KILN_VENV`, default `~/.cache/kiln/venv`); without it they are skipped with a notice,
//! and required when `CI=true`. Every process is killed and reaped when its guard drops.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use support::{Server, call, post_json, start};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A child process killed and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python that has `standardwebhooks`, or `None` (skip) outside CI.
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("KILN_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kiln/venv")))?;
    let py = venv.join("bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import standardwebhooks"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "standardwebhooks is required in CI (scripts/prepare.sh installs it)"
    );
    eprintln!(
        "skipped: no Python with standardwebhooks at {} (run scripts/prepare.sh)",
        py.display()
    );
    None
}

/// A running receiver: its URL and the file it records to.
struct Receiver {
    _proc: Proc,
    url: String,
    out: PathBuf,
}

fn receiver(py: &Path, dir: &Path, name: &str, flags: &[&str]) -> Receiver {
    receiver_with(py, dir, name, SECRET, flags)
}

/// A receiver that verifies with `secret`.
fn receiver_with(py: &Path, dir: &Path, name: &str, secret: &str, flags: &[&str]) -> Receiver {
    let out = dir.join(format!("{name}.jsonl"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/webhook_receiver.py");
    let mut child = Command::new(py)
        .arg(script)
        .args(["--port", "0", "--secret", secret, "--out"])
        .arg(&out)
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("{line:?}"));
    Receiver {
        _proc: Proc(child),
        url: format!("http://127.0.0.1:{port}/hook"),
        out,
    }
}

/// The receiver's records so far.
fn records(r: &Receiver) -> Vec<Value> {
    std::fs::read_to_string(&r.out)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Records answered 204 (delivered), by webhook-id: the first receipt's time.
fn delivered(r: &Receiver) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for rec in records(r) {
        assert_eq!(rec["verified"], true, "a delivery did not verify: {rec}");
        if rec["status"] == 204 {
            let id = rec["webhook_id"].as_str().unwrap().to_owned();
            let at = rec["received_at"].as_f64().unwrap();
            out.entry(id).or_insert(at);
        }
    }
    out
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The server's environment: the secret, loopback allowed, no rate limit, `extra`.
fn env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = vec![
        ("KILN_WEBHOOKS__SECRET", SECRET),
        ("KILN_WEBHOOKS__ALLOW_PRIVATE", "true"),
        ("KILN_WEBHOOKS__POLL_INTERVAL", "200ms"),
        ("KILN_GATEWAY__RATE_LIMIT_PER_MINUTE", "0"),
        ("KILN_DEMO_WORKER__SLOTS", "8"),
    ];
    v.extend_from_slice(extra);
    v
}

async fn submit(base: &str, hook: &str) -> String {
    let body = json!({
        "task_type": "txt2img",
        "input": {"prompt": "a fox", "width": 16, "height": 16},
        "webhook": hook,
    });
    let r = post_json(base, "/v1/tasks", body, &[]).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

async fn messages(base: &str, task: &str) -> Vec<Value> {
    let r = call(base, "GET", &format!("/v1/tasks/{task}/webhooks"), "", &[]).await;
    assert_eq!(r.status, 200);
    r.json()["data"].as_array().unwrap().clone()
}

/// Waits until task `id` has a message in `state` and returns it.
async fn wait_message(base: &str, id: &str, state: &str, secs: u64) -> Value {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(m) = messages(base, id)
            .await
            .into_iter()
            .find(|m| m["state"] == state)
        {
            return m;
        }
        assert!(
            Instant::now() < until,
            "no {state} message for {id}: {:?}",
            messages(base, id).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unix_s(rfc3339: &str) -> f64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_tasks_get_five_hundred_verified_webhooks() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(&py, dir.path(), "all", &[]);
    let s = start(&dir.path().join("data"), &env(&[]));
    let mut ids = Vec::new();
    for chunk in 0..10 {
        let batch: Vec<_> = (0..50).map(|_| submit(&s.base, &rx.url)).collect();
        ids.extend(futures_util::future::join_all(batch).await);
        let _ = chunk;
    }
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 500);
    wait_for("500 deliveries", 180, || delivered(&rx).len() >= 500).await;
    let got = delivered(&rx);
    let recs = records(&rx);
    assert!(
        recs.iter().all(|r| r["type"] == "task.completed"),
        "only task.completed was asked for"
    );
    let mut latencies = Vec::new();
    let mut seen = BTreeSet::new();
    for id in &ids {
        let ms = messages(&s.base, id).await;
        assert_eq!(ms.len(), 1, "{id}: {ms:?}");
        let m = &ms[0];
        assert_eq!(m["event"], "task.completed");
        assert_eq!(m["state"], "delivered", "{m}");
        assert_eq!(m["attempts"][0]["status"], 204);
        let mid = m["id"].as_str().unwrap();
        assert!(seen.insert(mid.to_owned()), "webhook-id {mid} used twice");
        let at = got
            .get(mid)
            .unwrap_or_else(|| panic!("{mid} never arrived"));
        latencies.push((at - unix_s(m["created_at"].as_str().unwrap())) * 1000.0);
    }
    assert_eq!(got.len(), 500);
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), seen);
    latencies.sort_by(f64::total_cmp);
    println!(
        "webhooks: 500 tasks, {} deliveries verified, {} unique webhook-ids; completion to receipt \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        recs.len(),
        got.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
    let metrics = call(&s.base, "GET", "/metrics", "", &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("kiln_webhook_deliveries_total{result=\"delivered\"} 500"),
        "{text}"
    );
    assert!(text.contains("kiln_webhook_pending 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_while_deliveries_fail_then_every_message_arrives() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(&py, dir.path(), "flaky", &["--fail-503-for", "6"]);
    let data = dir.path().join("data");
    // A short lease: messages the killed process held are sent again 5 s after the kill.
    let extra = [
        (
            "KILN_WEBHOOKS__SCHEDULE_S",
            "0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
        ),
        ("KILN_WEBHOOKS__TIMEOUT", "3s"),
        ("KILN_WEBHOOKS__LEASE", "5s"),
    ];
    let mut s = start(&data, &env(&extra));
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(submit(&s.base, &rx.url).await);
    }
    // Deliveries are being attempted (and answered 503) when the server is killed.
    wait_for("failing deliveries", 30, || records(&rx).len() >= 5).await;
    assert!(delivered(&rx).is_empty());
    let listen = s.base.trim_start_matches("http://").to_owned();
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    drop(s);
    let mut again = env(&extra);
    again.push(("KILN_SERVER__LISTEN", &listen));
    let s: Server = start(&data, &again);
    wait_for("30 deliveries after the restart", 90, || {
        delivered(&rx).len() >= 30
    })
    .await;
    let got = delivered(&rx);
    let mut want = BTreeSet::new();
    for id in &ids {
        let m = wait_message(&s.base, id, "delivered", 30).await;
        assert!(!m["attempts"].as_array().unwrap().is_empty());
        want.insert(m["id"].as_str().unwrap().to_owned());
        assert_eq!(messages(&s.base, id).await.len(), 1, "one message per task");
    }
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), want);
    // Every request (the 503s and any sent twice across the kill) carried one of the
    // messages' ids: duplicates only under the same webhook-id.
    for r in records(&rx) {
        assert!(want.contains(r["webhook_id"].as_str().unwrap()), "{r}");
    }
    println!(
        "webhooks kill -9: 30 messages delivered after the restart, {} requests in all",
        records(&rx).len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exhausted_message_is_visible_and_the_retry_endpoint_delivers_it() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(&py, dir.path(), "down", &["--fail-503-for", "8"]);
    let s = start(
        &dir.path().join("data"),
        &env(&[("KILN_WEBHOOKS__SCHEDULE_S", "0,0.5,0.5")]),
    );
    let id = submit(&s.base, &rx.url).await;
    let m = wait_message(&s.base, &id, "exhausted", 30).await;
    let attempts = m["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{m}");
    assert!(attempts.iter().all(|a| a["status"] == 503));
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 503")
    );
    assert_eq!(m["next_attempt_at"], Value::Null);
    let mid = m["id"].as_str().unwrap().to_owned();
    let r = call(
        &s.base,
        "POST",
        "/v1/webhooks/messages/msg_nope/retry",
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    // Past the receiver's outage, the retry endpoint re-arms the message.
    wait_for("the receiver's outage to end", 20, || {
        records(&rx)
            .first()
            .and_then(|r| r["received_at"].as_f64())
            .is_some_and(|t| {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
                    > t + 8.5
            })
    })
    .await;
    let r = call(
        &s.base,
        "POST",
        &format!("/v1/webhooks/messages/{mid}/retry"),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["state"], "pending");
    let m = wait_message(&s.base, &id, "delivered", 20).await;
    assert_eq!(m["id"], mid.as_str());
    assert_eq!(m["attempts"].as_array().unwrap().len(), 4);
    assert!(delivered(&rx).contains_key(&mid));
    let r = call(
        &s.base,
        "POST",
        &format!("/v1/webhooks/messages/{mid}/retry"),
        "",
        &[],
    )
    .await;
    assert_eq!(r.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gone_disables_redirects_fail_private_addresses_are_refused() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gone = receiver(&py, dir.path(), "gone", &["--always-410"]);
    let moved = receiver(&py, dir.path(), "moved", &["--redirect-302"]);
    let s = start(
        &dir.path().join("data"),
        &env(&[("KILN_WEBHOOKS__SCHEDULE_S", "0,0.3,0.3")]),
    );
    let a = submit(&s.base, &gone.url).await;
    let m = wait_message(&s.base, &a, "disabled", 30).await;
    assert_eq!(m["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(m["attempts"][0]["status"], 410);
    // The URL stays disabled: the next task's message to it is not sent.
    let b = submit(&s.base, &gone.url).await;
    wait_message(&s.base, &b, "disabled", 30).await;
    assert_eq!(records(&gone).len(), 1);
    let c = submit(&s.base, &moved.url).await;
    let m = wait_message(&s.base, &c, "exhausted", 30).await;
    let attempts = m["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a["status"] == 302), "{m}");
    assert_eq!(records(&moved).len(), 3);
    // Invalid URLs are refused at submit, naming the field.
    for bad in ["ftp://example.com/x", "not a url", "/relative"] {
        let body = json!({"task_type": "txt2img", "input": {"prompt": "x"}, "webhook": bad});
        let r = post_json(&s.base, "/v1/tasks", body, &[]).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("webhook")
        );
    }
    drop(s);
    // Without allow_private, a loopback receiver is refused and never called.
    let ok = receiver(&py, dir.path(), "private", &[]);
    let strict: Vec<(&str, &str)> = env(&[])
        .into_iter()
        .filter(|(k, _)| *k != "KILN_WEBHOOKS__ALLOW_PRIVATE")
        .collect();
    let s = start(&dir.path().join("data2"), &strict);
    let d = submit(&s.base, &ok.url).await;
    let m = wait_message(&s.base, &d, "exhausted", 30).await;
    assert_eq!(m["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(m["attempts"][0]["status"], Value::Null);
    assert!(records(&ok).is_empty(), "a refused address was called");
    let text =
        String::from_utf8_lossy(&call(&s.base, "GET", "/metrics", "", &[]).await.body).into_owned();
    assert!(
        text.contains("kiln_webhook_deliveries_total{result=\"refused\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_that_never_answers_times_out_and_blocks_nothing() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let hang = receiver(&py, dir.path(), "hang", &["--never-answer"]);
    let ok = receiver(&py, dir.path(), "ok", &[]);
    let s = start(
        &dir.path().join("data"),
        &env(&[
            ("KILN_WEBHOOKS__TIMEOUT", "5s"),
            ("KILN_WEBHOOKS__SCHEDULE_S", "0,30"),
        ]),
    );
    let stuck = submit(&s.base, &hang.url).await;
    wait_for("the hanging request", 30, || !records(&hang).is_empty()).await;
    let fine: Vec<String> =
        futures_util::future::join_all((0..5).map(|_| submit(&s.base, &ok.url))).await;
    wait_for("the other deliveries", 30, || delivered(&ok).len() >= 5).await;
    // The hanging attempt is still in flight (not recorded) while the others arrived.
    let ms = messages(&s.base, &stuck).await;
    assert!(ms[0]["attempts"].as_array().unwrap().is_empty(), "{ms:?}");
    for id in &fine {
        wait_message(&s.base, id, "delivered", 10).await;
    }
    let m = wait_message(&s.base, &stuck, "pending", 10).await;
    let until = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let ms = messages(&s.base, &stuck).await;
        if !ms[0]["attempts"].as_array().unwrap().is_empty() {
            break ms[0].clone();
        }
        assert!(
            Instant::now() < until,
            "the hanging attempt did not time out: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let a = &m["attempts"][0];
    assert_eq!(a["status"], Value::Null);
    assert!(a["latency_ms"].as_u64().unwrap() >= 4900, "{a}");
    assert!(a["latency_ms"].as_u64().unwrap() < 10_000, "{a}");
    assert_eq!(m["state"], "pending", "retried on the schedule");
}

/// A global endpoint (from the config file, its secret from `secret_env`) gets every task's
/// `task.completed` and the demo worker's `worker.online`; the OpenAI route's
/// `X-Kiln-Webhook` header (or the model's `webhook`) gives the task a webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_endpoints_get_task_and_worker_events_and_openai_takes_the_header() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let global = receiver(&py, dir.path(), "global", &[]);
    // webhooks.secret signs the task's own webhook; the endpoint has a secret of its own.
    let other = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let own = receiver_with(&py, dir.path(), "own", other, &[]);
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[[webhooks.endpoints]]\nurl = {:?}\nevents = [\"task.completed\", \"worker.online\"]\n\
             secret_env = \"WEBHOOK_TEST_SECRET\"\n\
             [gateway.openai.models.kiln-demo]\nwebhook = {:?}\n",
            global.url, own.url
        ),
    )
    .unwrap();
    let mut e = env(&[("WEBHOOK_TEST_SECRET", SECRET)]);
    e.retain(|(k, _)| *k != "KILN_WEBHOOKS__SECRET");
    e.push(("KILN_WEBHOOKS__SECRET", other));
    let s = support::start_with(&dir.path().join("data"), Some(&config), &e);
    let plain = post_json(
        &s.base,
        "/v1/tasks",
        json!({"task_type": "txt2img", "input": {"prompt": "a fox", "width": 16, "height": 16}}),
        &[],
    )
    .await
    .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = post_json(
        &s.base,
        "/v1/images/generations",
        json!({"model": "kiln-demo", "prompt": "a fox", "size": "64x64"}),
        &[("x-kiln-webhook", &own.url)],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let openai = r.headers["x-kiln-task-id"].to_str().unwrap().to_owned();
    let bad = post_json(
        &s.base,
        "/v1/images/generations",
        json!({"model": "kiln-demo", "prompt": "a fox"}),
        &[("x-kiln-webhook", "ftp://x")],
    )
    .await;
    assert_eq!(bad.status, 400);
    wait_for("the endpoint's deliveries", 30, || {
        delivered(&global).len() >= 3
    })
    .await;
    wait_for("the header's delivery", 30, || !delivered(&own).is_empty()).await;
    let kinds: BTreeSet<String> = records(&global)
        .iter()
        .map(|r| r["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        ["task.completed", "worker.online"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    let ms = messages(&s.base, &plain).await;
    assert_eq!(ms.len(), 1);
    assert_eq!(ms[0]["url"], global.url.as_str());
    let ms = messages(&s.base, &openai).await;
    let urls: BTreeSet<&str> = ms.iter().map(|m| m["url"].as_str().unwrap()).collect();
    assert_eq!(
        urls,
        [own.url.as_str(), global.url.as_str()]
            .into_iter()
            .collect()
    );
    let t = support::task(&s.base, &openai).await;
    assert_eq!(t["webhook"], own.url.as_str());
    assert_eq!(t["webhook_events"], json!(["completed"]));
    // Without the header, the model's configured webhook.
    let r = post_json(
        &s.base,
        "/v1/images/generations",
        json!({"model": "kiln-demo", "prompt": "a hare", "size": "64x64"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let by_model = r.headers["x-kiln-task-id"].to_str().unwrap().to_owned();
    assert_eq!(
        support::task(&s.base, &by_model).await["webhook"],
        own.url.as_str()
    );
    wait_for("the model's webhook", 30, || delivered(&own).len() >= 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rust_receiver_verifies_every_delivery_with_kiln_webhooks() {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(String, Result<(), String>)>>>;
    let verifier = Arc::new(kiln_webhooks::Verifier::new(
        vec![SECRET.parse().unwrap()],
        Vec::new(),
    ));
    let seen: Seen = Arc::default();
    let (v, log) = (verifier.clone(), seen.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (v, log) = (v.clone(), log.clone());
            async move {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64;
                let checked = v
                    .verify_headers(&headers, &body, now)
                    .map_err(|e| e.to_string());
                let id = headers
                    .get("webhook-id")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let status = if checked.is_ok() {
                    // The body is the documented envelope around the task object.
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    assert_eq!(v["type"], "task.completed", "{v}");
                    assert_eq!(v["data"]["status"], "succeeded", "{v}");
                    StatusCode::NO_CONTENT
                } else {
                    StatusCode::BAD_REQUEST
                };
                log.lock().unwrap().push((id, checked));
                status
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &env(&[]));
    let batch: Vec<_> = (0..50).map(|_| submit(&s.base, &url)).collect();
    let tasks = futures_util::future::join_all(batch).await;
    wait_for("50 deliveries", 60, || seen.lock().unwrap().len() >= 50).await;
    let seen = seen.lock().unwrap().clone();
    for (id, checked) in &seen {
        assert!(checked.is_ok(), "{id} did not verify: {checked:?}");
    }
    let ids: BTreeSet<_> = seen.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 50, "one webhook-id per message");
    for t in &tasks {
        let ms = messages(&s.base, t).await;
        assert!(ids.contains(ms[0]["id"].as_str().unwrap()), "{ms:?}");
    }
    // The verifier does refuse what was not signed with the secret.
    let mut h = HeaderMap::new();
    h.insert("webhook-id", "msg_x".parse().unwrap());
    h.insert("webhook-timestamp", "1700000000".parse().unwrap());
    h.insert(
        "webhook-signature",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
            .parse()
            .unwrap(),
    );
    assert!(verifier.verify_headers(&h, b"{}", 1_700_000_000).is_err());
}
