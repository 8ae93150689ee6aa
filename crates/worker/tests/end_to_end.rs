//! The worker SDK against a real broker over loopback WebSockets: tasks run once, results
//! are accepted, and the worker survives a gateway restart.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use kiln_test_support_gateway::serve;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kiln_broker::{Broker, BrokerConfig, NewTask};
use kiln_protocol::TaskState;
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::json;
use tokio::net::TcpListener;

fn cfg() -> BrokerConfig {
    BrokerConfig {
        heartbeat: Duration::from_millis(300),
        lease: Duration::from_secs(3),
        dead_after: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

fn worker(url: String, dir: &Path, runs: Arc<AtomicU32>) -> Worker {
    let mut wc = WorkerConfig {
        url,
        state_dir: dir.to_path_buf(),
        slots: 2,
        ..Default::default()
    };
    wc.reconnect.initial_backoff = Duration::from_millis(100);
    wc.reconnect.max_backoff = Duration::from_millis(500);
    Worker::new(wc).blocking_handler("echo", move |ctx: TaskContext| {
        runs.fetch_add(1, Ordering::SeqCst);
        ctx.progress("working", 1, 2);
        std::thread::sleep(Duration::from_millis(150));
        if ctx.input["fail"] == true {
            return Err(TaskError::fatal("bad_input", "asked to fail"));
        }
        Ok(json!({"echo": ctx.input}))
    })
}

async fn wait_done(b: &Broker, ids: &[String], secs: u64) {
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let mut done = true;
        for id in ids {
            done &= b
                .queue()
                .get(id)
                .await
                .unwrap()
                .unwrap()
                .state
                .is_terminal();
        }
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "tasks did not finish in {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_tasks_and_survives_a_gateway_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("queue.sqlite");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::open(&db, cfg()).unwrap();
    let server = serve(broker.clone(), listener);

    let runs = Arc::new(AtomicU32::new(0));
    let w = worker(
        format!("ws://{addr}/v1/workers/connect"),
        &dir.path().join("w"),
        runs.clone(),
    );
    let handle = w.handle();
    let worker_task = tokio::spawn(w.run());

    async fn submit(b: &Broker, i: u32) -> String {
        b.submit(NewTask {
            task_type: "echo".into(),
            input: json!({"i": i, "fail": i == 3}),
            ..Default::default()
        })
        .await
        .unwrap()
        .0
        .id
    }
    let mut first = Vec::new();
    for i in 0..6 {
        first.push(submit(&broker, i).await);
    }
    wait_done(&broker, &first, 20).await;
    for (i, id) in first.iter().enumerate() {
        let t = broker.queue().get(id).await.unwrap().unwrap();
        if i == 3 {
            assert_eq!(t.state, TaskState::Failed);
            assert_eq!(t.error.unwrap().code, "bad_input");
        } else {
            assert_eq!(t.state, TaskState::Succeeded, "task {i}");
            assert_eq!(t.output.unwrap()["echo"]["i"], i);
        }
        assert_eq!(broker.queue().attempts(id).await.unwrap().len(), 1);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 6);

    // Gateway restart: stop the server, queue tasks while it is down, start a new broker on
    // the same file and port.
    server.abort();
    let _ = server.await;
    drop(broker);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let broker = Broker::open(&db, cfg()).unwrap();
    let mut more = Vec::new();
    for i in 10..14 {
        more.push(submit(&broker, i).await);
    }
    let listener = TcpListener::bind(addr).await.unwrap();
    let _server = serve(broker.clone(), listener);
    wait_done(&broker, &more, 20).await;
    for id in &more {
        assert_eq!(
            broker.queue().get(id).await.unwrap().unwrap().state,
            TaskState::Succeeded
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        10,
        "every task ran exactly once"
    );

    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), worker_task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outbox_entries(&dir.path().join("w")), 0, "outbox drained");
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
