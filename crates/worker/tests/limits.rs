//! Frame limits with the real SDK against a real broker over loopback WebSockets: a result
//! too large for the gateway fails its task with `result_too_large` (and the worker goes
//! on), an outbox entry over the limit is failed instead of resent forever, and an assign
//! frame over the worker's own limit is refused without dropping the connection, so the
//! task is dead-lettered as `assign_failed` while a normal task completes.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_broker::{ASSIGN_FAILED, Broker, BrokerConfig, NewTask, SqliteQueue, Task};
use kiln_protocol::TaskState;
use kiln_protocol::messages::{Capabilities, ResultStatus, TaskResult};
use kiln_test_support_gateway::serve;
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig, WorkerHandle};
use serde_json::json;
use tokio::net::TcpListener;

/// A broker whose frame limit is `max_frame_bytes`, served on a loopback port.
async fn gateway(max_frame_bytes: usize) -> (Arc<Broker>, String) {
    let cfg = BrokerConfig {
        heartbeat: Duration::from_millis(300),
        lease: Duration::from_secs(3),
        dead_after: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(100),
        max_frame_bytes,
        ..Default::default()
    };
    let b = Broker::with_queue(Arc::new(SqliteQueue::in_memory(3).unwrap()), cfg);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/workers/connect", l.local_addr().unwrap());
    serve(b.clone(), l);
    (b, url)
}

/// A worker with the `make` handler: its output is `{"data": "A" * input.bytes}`.
fn start_worker(url: String, dir: &Path, cfg: impl FnOnce(&mut WorkerConfig)) -> WorkerHandle {
    let mut wc = WorkerConfig {
        url,
        state_dir: dir.to_path_buf(),
        slots: 1,
        ..Default::default()
    };
    wc.reconnect.initial_backoff = Duration::from_millis(100);
    wc.reconnect.max_backoff = Duration::from_millis(300);
    cfg(&mut wc);
    let w = Worker::new(wc).handler("make", |ctx: TaskContext| async move {
        let n = ctx.input["bytes"].as_u64().unwrap_or(0) as usize;
        Ok::<_, TaskError>(json!({"data": "A".repeat(n)}))
    });
    let h = w.handle();
    tokio::spawn(w.run());
    h
}

async fn submit(b: &Broker, input: serde_json::Value) -> String {
    b.submit(NewTask {
        task_type: "make".into(),
        input,
        ..Default::default()
    })
    .await
    .unwrap()
    .0
    .id
}

async fn wait_terminal(b: &Broker, id: &str, secs: u64) -> Task {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = b.queue().get(id).await.unwrap().unwrap();
        if t.state.is_terminal() {
            return t;
        }
        assert!(Instant::now() < until, "task {id} did not end in {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Results waiting in a worker's outbox: the `put` lines of its `outbox.log` without a
/// later `ack` line.
fn outbox_entries(state_dir: &Path) -> usize {
    let text = std::fs::read_to_string(state_dir.join("outbox.log")).unwrap_or_default();
    let mut waiting = std::collections::HashSet::new();
    for l in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if let Some(lease) = v["put"]["result"]["lease"].as_str() {
            waiting.insert(lease.to_owned());
        } else if let Some(lease) = v["ack"].as_str() {
            waiting.remove(lease);
        }
    }
    waiting.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_too_large_fails_the_task_and_the_worker_goes_on() {
    let (b, url) = gateway(64 << 10).await;
    let dir = tempfile::tempdir().unwrap();
    // The worker's own limit is below the gateway's: the message names the one applied.
    let h = start_worker(url, dir.path(), |c| c.max_result_bytes = 32 << 10);
    let big = submit(&b, json!({"bytes": 200_000})).await;
    let t = wait_terminal(&b, &big, 10).await;
    assert_eq!(t.state, TaskState::Failed);
    let err = t.error.unwrap();
    assert_eq!(err.code, "result_too_large");
    assert!(!err.retryable);
    assert!(err.message.contains("32768-byte"), "{}", err.message);
    assert!(err.message.contains("POST /v1/files"), "{}", err.message);
    assert_eq!(t.attempt, 1, "not retried");
    let small = submit(&b, json!({"bytes": 10})).await;
    let t = wait_terminal(&b, &small, 10).await;
    assert_eq!(t.state, TaskState::Succeeded);
    assert_eq!(outbox_entries(dir.path()), 0);
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_entry_over_the_limit_is_failed_not_resent_forever() {
    let (b, url) = gateway(64 << 10).await;
    let dir = tempfile::tempdir().unwrap();
    // An earlier process of this worker finished a task with a result the gateway cannot
    // take, and left it in its outbox.
    let id = submit(&b, json!({"bytes": 0})).await;
    let caps = Capabilities {
        task_types: vec!["make".into()],
        ..Default::default()
    };
    let now = kiln_protocol::now_ms();
    let leased = b
        .queue()
        .reserve("worker_old", &caps, 1, now + 60_000, now)
        .await
        .unwrap();
    let lease = leased[0].lease.clone().unwrap();
    std::fs::create_dir_all(dir.path().join("outbox")).unwrap();
    std::fs::write(dir.path().join("worker_id"), "worker_old").unwrap();
    let entry = json!({"task_id": id, "attempt": 1, "result": TaskResult {
        lease: lease.clone(),
        status: ResultStatus::Ok,
        output: Some(json!({"data": "A".repeat(300_000)})),
        error: None,
        usage: None,
        timings: None,
    }});
    std::fs::write(
        dir.path().join("outbox").join(format!("{lease}.json")),
        entry.to_string(),
    )
    .unwrap();
    let h = start_worker(url, dir.path(), |c| c.max_result_bytes = 32 << 10);
    let t = wait_terminal(&b, &id, 10).await;
    assert_eq!(t.state, TaskState::Failed);
    let err = t.error.unwrap();
    assert_eq!(err.code, "result_too_large");
    assert!(
        err.message.contains("32768-byte"),
        "the SDK replaced it: {}",
        err.message
    );
    let until = Instant::now() + Duration::from_secs(5);
    while outbox_entries(dir.path()) != 0 {
        assert!(Instant::now() < until, "the outbox entry was not cleared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assign_over_the_workers_limit_is_refused_and_dead_lettered_while_others_run() {
    let (b, url) = gateway(1 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let h = start_worker(url, dir.path(), |c| c.max_frame_bytes = 16 << 10);
    // The worker connects first, so both tasks are dispatched as they come.
    let until = Instant::now() + Duration::from_secs(10);
    while !b.workers().iter().any(|w| w.connected) {
        assert!(Instant::now() < until, "worker connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let session = b.workers()[0].session.clone();
    let poison = submit(&b, json!({"bytes": 1, "pad": "x".repeat(40_000)})).await;
    let submitted = Instant::now();
    let normal = submit(&b, json!({"bytes": 10})).await;
    let t = wait_terminal(&b, &normal, 10).await;
    assert_eq!(t.state, TaskState::Succeeded);
    assert!(
        submitted.elapsed() < Duration::from_secs(2),
        "the normal task took {:?}",
        submitted.elapsed()
    );
    let p = wait_terminal(&b, &poison, 10).await;
    assert_eq!((p.state, p.dead_lettered), (TaskState::Failed, true));
    assert_eq!(p.error.unwrap().code, ASSIGN_FAILED);
    // The worker refused the frames without dropping its connection.
    let w = &b.workers()[0];
    assert!(w.connected);
    assert_eq!(w.session, session, "no reconnect");
    h.shutdown();
}
