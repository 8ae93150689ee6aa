//! Bounded inputs and bad tasks with real processes: the gateway is a real `kiln serve`
//! (demo worker off, scaled timers) and the worker a real child process using the Rust SDK
//! (this test binary run again with `--ignored --exact child_worker` and the
//! `KILN_TEST_OVERSIZE_*` variables set) whose frame limit is lowered to 32 KiB, so that a
//! task stored within the gateway's limits is still too large for the worker's frames.
//!
//! 1. `one_bad_task_never_stops_the_others`: a 20 MB prompt is refused with 413; a task
//!    over the worker's frame limit (refused by the worker with an `oversized` error, the
//!    connection kept) and one over its hard limit (its connection fails on the frame) are
//!    each dead-lettered as `assign_failed` after three failed assignments; a task canceled
//!    while its assign is unacked (the worker process is stopped with SIGSTOP) is canceled
//!    at once; and a normal task submitted in the middle of it completes within 2 s.
//! 3. `every_field_a_client_controls_is_bounded`: with `gateway.max_task_input_bytes`
//!    lowered, both submit paths (`POST /v1/tasks` and `/v1/images/generations`) answer 413
//!    naming the limit, and metadata, labels, model, task type and request id over their
//!    limits are refused with 413 or 422 before anything is stored.
//! 2. `frames_over_the_limit_get_oversized_and_over_the_hard_limit_close_1009`: a raw
//!    WebSocket worker sends a frame over `broker.max_frame_bytes` (answered `oversized`,
//!    the session goes on) and one over `broker.frame_hard_limit_bytes` (closed with 1009).
//!
//! Every process is killed (SIGKILL) and reaped when its guard drops, also on failure.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kiln_protocol::messages::{Capabilities, Heartbeat, Hello};
use kiln_protocol::{Envelope, Message};
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::{Value, json};
use support::{call, post_json, start, task, wait_terminal};
use tokio_tungstenite::tungstenite;

const ENV: &[(&str, &str)] = &[
    ("KILN_BROKER__HEARTBEAT", "500ms"),
    ("KILN_BROKER__LEASE", "3s"),
    ("KILN_BROKER__DEAD_AFTER", "1500ms"),
    ("KILN_BROKER__SWEEP_INTERVAL", "100ms"),
    ("KILN_DEMO_WORKER__ENABLED", "false"),
    ("KILN_GATEWAY__KNOWN_TASK_TYPES", "make"),
];

/// The worker's frame limit in this test: 32 KiB (read up to 128 KiB, refused over 32 KiB).
const WORKER_MAX_FRAME: usize = 32 << 10;

/// A child process killed (SIGKILL) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Entry point of the worker child process (does nothing in a normal test run).
#[test]
#[ignore = "entry point of the worker child process of the oversize tests"]
fn child_worker() {
    let (Ok(url), Ok(dir)) = (
        std::env::var("KILN_TEST_OVERSIZE_URL"),
        std::env::var("KILN_TEST_OVERSIZE_DIR"),
    ) else {
        return;
    };
    kiln_test_support::trace_init("kiln_worker=info");
    let mut cfg = WorkerConfig {
        url,
        state_dir: PathBuf::from(dir),
        slots: 2,
        max_frame_bytes: WORKER_MAX_FRAME,
        ..WorkerConfig::default()
    };
    cfg.reconnect.initial_backoff = Duration::from_millis(50);
    cfg.reconnect.max_backoff = Duration::from_millis(200);
    let w = Worker::new(cfg).handler("make", |ctx: TaskContext| async move {
        let ms = ctx.input["ms"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, TaskError>(json!({"made": true}))
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(w.run()).unwrap();
}

fn spawn_worker(base: &str, dir: &Path) -> Proc {
    let url = format!(
        "{}/v1/workers/connect",
        base.replacen("http://", "ws://", 1)
    );
    let stderr = std::fs::File::create(dir.join("worker.stderr")).unwrap();
    Proc(
        Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_worker", "--nocapture"])
            .env("KILN_TEST_OVERSIZE_URL", url)
            .env("KILN_TEST_OVERSIZE_DIR", dir.join("worker"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap(),
    )
}

/// Sends a signal to the worker process (`STOP` or `CONT`).
fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &p.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

async fn submit(base: &str, input: Value) -> String {
    let r = post_json(
        base,
        "/v1/tasks",
        json!({"task_type": "make", "input": input}),
        &[],
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

async fn wait_connected(base: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let w = call(base, "GET", "/v1/workers", "", &[]).await.json();
        if w["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|w| w["connected"] == true))
        {
            return;
        }
        assert!(Instant::now() < until, "the worker did not connect: {w}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_assign_failed(t: &Value) {
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["dead_lettered"], true, "{t}");
    assert_eq!(t["error"]["code"], "assign_failed", "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_task_never_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), ENV);
    let worker = spawn_worker(&s.base, dir.path());
    wait_connected(&s.base).await;

    // 20 MB of prompt: refused at the door, naming the limit.
    let huge = json!({"task_type": "make", "input": {"prompt": "a".repeat(20_000_000)}});
    let r = post_json(&s.base, "/v1/tasks", huge, &[]).await;
    assert_eq!(r.status, 413, "{:?}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["error"]["code"], "payload_too_large", "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("max_task_input_bytes") && msg.contains("262144"),
        "{msg}"
    );

    // Within the gateway's input limit, over the worker's frame limits: one the worker
    // refuses (under 4x its limit), one its connection fails on (over 4x).
    let refused = submit(&s.base, json!({"pad": "r".repeat(60_000)})).await;
    let dropped = submit(&s.base, json!({"pad": "d".repeat(200_000)})).await;
    let submitted = Instant::now();
    let normal = submit(&s.base, json!({"ms": 50})).await;
    let t = wait_terminal(&s.base, &normal, 10).await;
    let took = submitted.elapsed();
    assert_eq!(t["status"], "succeeded", "{t}");
    assert!(
        took < Duration::from_secs(2),
        "the normal task took {took:?}"
    );

    for id in [&refused, &dropped] {
        let t = wait_terminal(&s.base, id, 20).await;
        assert_assign_failed(&t);
        assert!(
            t["error"]["message"].as_str().unwrap().contains("3 times"),
            "{t}"
        );
    }
    // The refused frames kept the connection; the one over the hard limit cost three
    // connections, each resumed (the gateway counted the assign the connection failed on).
    let log = std::fs::read_to_string(dir.path().join("worker.stderr")).unwrap();
    let resumed = log.matches("resumed=true").count();
    assert!((3..=4).contains(&resumed), "{resumed} resumes:\n{log}");

    // Cancel while the assign is unacked: the worker process is stopped, so it cannot ack.
    wait_connected(&s.base).await;
    signal(&worker, "STOP");
    let stopped = Instant::now();
    let id = submit(&s.base, json!({"ms": 50})).await;
    let until = Instant::now() + Duration::from_secs(1);
    while task(&s.base, &id).await["status"] != "running" {
        assert!(Instant::now() < until, "the task was not assigned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = call(&s.base, "POST", &format!("/v1/tasks/{id}/cancel"), "", &[]).await;
    assert!(r.status < 300, "{:?}", String::from_utf8_lossy(&r.body));
    let t = task(&s.base, &id).await;
    assert_eq!(t["status"], "canceled", "canceled at once: {t}");
    assert!(
        stopped.elapsed() < Duration::from_millis(1500),
        "the worker was stopped for less than dead_after"
    );
    signal(&worker, "CONT");

    // Nothing is left stuck: the worker takes a new task.
    let after = submit(&s.base, json!({"ms": 10})).await;
    let t = wait_terminal(&s.base, &after, 10).await;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(task(&s.base, &id).await["status"], "canceled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_limit_get_oversized_and_over_the_hard_limit_close_1009() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = ENV.to_vec();
    env.push(("KILN_BROKER__FRAME_HARD_LIMIT_BYTES", "2097152"));
    let s = start(dir.path(), &env);
    let url = format!(
        "{}/v1/workers/connect",
        s.base.replacen("http://", "ws://", 1)
    );
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "kiln.v1".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let send = |m: Message| tungstenite::Message::Text(Envelope::new(m, 0).encode().into());
    ws.send(send(Message::Hello(Hello {
        worker_id: "raw".into(),
        boot_id: "b1".into(),
        capabilities: Capabilities {
            task_types: vec!["make".into()],
            ..Default::default()
        },
        slots: 1,
        resume: None,
        inflight: vec![],
        outbox: vec![],
        worker_secret: None,
    })))
    .await
    .unwrap();
    let Message::Welcome(w) = recv(&mut ws).await.unwrap().message else {
        panic!("no welcome")
    };
    assert_eq!(w.max_frame_bytes, Some(1 << 20));
    // 1.5 MB: over max_frame_bytes, under the hard limit.
    let big = format!(
        r#"{{"type":"progress","version":"1","payload":{{"lease":"l","stage":"{}"}}}}"#,
        "x".repeat(1_500_000)
    );
    for _ in 0..4 {
        ws.send(tungstenite::Message::Text(big.clone().into()))
            .await
            .unwrap();
        let e = recv(&mut ws).await.unwrap();
        assert_eq!(e.error.as_deref(), Some("oversized"), "{e:?}");
    }
    // Four oversized frames later the session still answers.
    ws.send(send(Message::Heartbeat(Heartbeat {
        ack_seq: 0,
        inflight: vec![],
        free: 1,
        gpu: None,
    })))
    .await
    .unwrap();
    assert!(matches!(
        recv(&mut ws).await.unwrap().message,
        Message::HeartbeatAck(_)
    ));
    // 3 MB: over the hard limit, the connection closes with 1009.
    let huge = format!(
        r#"{{"type":"progress","version":"1","payload":{{"lease":"l","stage":"{}"}}}}"#,
        "x".repeat(3_000_000)
    );
    let _ = ws.send(tungstenite::Message::Text(huge.into())).await;
    let close = recv(&mut ws).await.unwrap_err().expect("a close frame");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    assert!(close.reason.contains("2097152"), "{close:?}");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame as an envelope, or the close frame (`None`: closed without one).
async fn recv(ws: &mut Ws) -> Result<Envelope, Option<tungstenite::protocol::CloseFrame>> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame in time");
        match m {
            Some(Ok(tungstenite::Message::Text(t))) => {
                return Ok(Envelope::decode(t.as_str(), usize::MAX).unwrap());
            }
            Some(Ok(tungstenite::Message::Close(c))) => return Err(c),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("connection failed without a close frame: {e}"),
            None => return Err(None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_a_client_controls_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // The demo worker serves txt2img (and the OpenAI model kiln-demo).
    let s = start(
        dir.path(),
        &[("KILN_GATEWAY__MAX_TASK_INPUT_BYTES", "16384")],
    );
    let post = |body: Value| post_json(&s.base, "/v1/tasks", body, &[]);
    let r = post(json!({"task_type": "txt2img", "input": {"prompt": "p".repeat(20_000)}})).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "payload_too_large");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("16384")
    );
    let r =
        post(json!({"task_type": "txt2img", "input": {}, "metadata": {"m": "m".repeat(20_000)}}))
            .await;
    assert_eq!(r.status, 413, "{}", r.json());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("16384-byte")
    );
    let too_long: [(Value, &str); 4] = [
        (
            json!({"task_type": "t".repeat(65), "input": {}}),
            "task_type",
        ),
        (
            json!({"task_type": "txt2img", "input": {}, "request_id": "r".repeat(256)}),
            "request_id",
        ),
        (
            json!({"task_type": "txt2img", "input": {}, "model": "m".repeat(129)}),
            "model",
        ),
        (
            json!({"task_type": "txt2img", "input": {}, "labels": (0..17).map(|i| format!("l{i}")).collect::<Vec<_>>()}),
            "labels",
        ),
    ];
    for (body, field) in too_long {
        let r = post(body).await;
        assert_eq!(r.status, 422, "{field}: {}", r.json());
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field),
            "{}",
            r.json()
        );
    }
    let r = post_json(
        &s.base,
        "/v1/images/generations",
        json!({"prompt": "p".repeat(20_000), "size": "64x64"}),
        &[("prefer", "respond-async")],
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.json());
    assert_eq!(r.json()["error"]["code"], "payload_too_large");
    let listed = call(&s.base, "GET", "/v1/tasks", "", &[]).await.json();
    assert_eq!(
        listed["data"].as_array().unwrap().len(),
        0,
        "nothing stored: {listed}"
    );
    // A task within the limits still runs.
    let r = post(
        json!({"task_type": "txt2img", "input": {"prompt": "a fox", "width": 64, "height": 64}}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.json());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_terminal(&s.base, &id, 20).await["status"], "succeeded");
}
