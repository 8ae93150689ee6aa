//! Reliability with scaled timers (heartbeat 0.5 s, lease 3 s): a worker process killed with
//! SIGKILL mid-task and restarted has the task again within 1 s of its hello and finishes it
//! once (the killed attempt counts); a task that crashes its worker process every time is
//! dead-lettered after its 3 attempts; a TCP connection cut for 2 s with the worker alive causes no redelivery, and a
//! cancel sent meanwhile is replayed when the session resumes; a worker process killed after
//! its result reached the outbox but before the gateway had it resends the result from its
//! next boot, and the task does not run again.
//!
//! The killed worker is a real child process: this test binary run again with
//! `--ignored --exact child_worker` and the `KILN_TEST_CHILD_*` variables set.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use kiln_test_support_gateway::serve;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln_broker::{Broker, BrokerConfig, NewTask};
use kiln_protocol::TaskState;
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn cfg() -> BrokerConfig {
    BrokerConfig {
        heartbeat: Duration::from_millis(500),
        lease: Duration::from_secs(3),
        dead_after: Duration::from_millis(1500),
        sweep_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

fn worker_config(url: String, dir: &Path) -> WorkerConfig {
    let mut wc = WorkerConfig {
        url,
        state_dir: dir.to_path_buf(),
        slots: 1,
        ..Default::default()
    };
    wc.reconnect.initial_backoff = Duration::from_millis(50);
    wc.reconnect.max_backoff = Duration::from_millis(200);
    wc
}

async fn submit(b: &Broker, task_type: &str, input: serde_json::Value) -> String {
    let nt = NewTask {
        task_type: task_type.into(),
        input,
        ..Default::default()
    };
    b.submit(nt).await.unwrap().0.id
}

async fn wait_for<F: Fn() -> bool>(what: &str, secs: u64, f: F) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn state(b: &Broker, id: &str) -> TaskState {
    b.queue().get(id).await.unwrap().unwrap().state
}

/// Appends one line to the child's execution log.
fn log_line(log: &str, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

/// Entry point of the worker child process (does nothing in a normal test run).
#[test]
#[ignore = "entry point of the worker child process of these tests"]
fn child_worker() {
    let (Ok(url), Ok(dir), Ok(log)) = (
        std::env::var("KILN_TEST_CHILD_URL"),
        std::env::var("KILN_TEST_CHILD_DIR"),
        std::env::var("KILN_TEST_CHILD_LOG"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let poison_log = log.clone();
    let gate_log = log.clone();
    let w = Worker::new(worker_config(url, Path::new(&dir)))
        .handler("poison", move |ctx: TaskContext| {
            let log = poison_log.clone();
            async move {
                log_line(&log, &format!("start {} {}", ctx.task_id, ctx.attempt));
                // Gone at once, as in a crash: no result, no release, no bye.
                std::process::exit(134);
            }
        })
        .handler("gated", move |ctx: TaskContext| {
            // Finishes once the file `<log>.go` exists (the test decides when).
            let log = gate_log.clone();
            async move {
                let line = |s: String| log_line(&log, &s);
                line(format!("start {} {}", ctx.task_id, ctx.attempt));
                let gate = PathBuf::from(format!("{log}.go"));
                let until = Instant::now() + Duration::from_secs(30);
                while !gate.exists() && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                line(format!("done {} {}", ctx.task_id, ctx.attempt));
                Ok::<_, TaskError>(json!({"gated": true}))
            }
        })
        .handler("slow", move |ctx: TaskContext| {
            let log = log.clone();
            async move {
                let line = |s: String| log_line(&log, &s);
                line(format!("start {} {}", ctx.task_id, ctx.attempt));
                tokio::time::sleep(Duration::from_millis(ctx.input["ms"].as_u64().unwrap_or(0)))
                    .await;
                line(format!("done {} {}", ctx.task_id, ctx.attempt));
                Ok::<_, TaskError>(json!({"slept": true}))
            }
        });
    rt.block_on(w.run()).unwrap();
}

fn spawn_child(url: &str, dir: &Path, log: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_worker", "--nocapture"])
        .env("KILN_TEST_CHILD_URL", url)
        .env("KILN_TEST_CHILD_DIR", dir)
        .env("KILN_TEST_CHILD_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A child process killed (SIGKILL) when dropped, so that a failed test leaves none behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_lines(log: &PathBuf, prefix: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkill_mid_task_is_reassigned_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(&dir.path().join("queue.sqlite"), cfg()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/workers/connect", listener.local_addr().unwrap());
    let _server = serve(broker.clone(), listener);
    let (state_dir, log) = (dir.path().join("w"), dir.path().join("runs.log"));
    let id = submit(&broker, "slow", json!({"ms": 1500})).await;

    let mut first = spawn_child(&url, &state_dir, &log);
    wait_for("the first start", 30, || log_lines(&log, "start") == 1).await;
    let boot1 = broker.workers()[0].boot_id.clone();
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert_eq!(
        state(&broker, &id).await,
        TaskState::Running,
        "the lease is still held"
    );

    let mut second = spawn_child(&url, &state_dir, &log);
    let b = broker.clone();
    wait_for("the restarted worker's hello", 30, move || {
        b.workers()
            .iter()
            .any(|w| w.connected && w.boot_id != boot1)
    })
    .await;
    let hello = Instant::now();
    wait_for("the second start", 5, || log_lines(&log, "start") == 2).await;
    let reassigned = hello.elapsed();
    assert!(
        reassigned <= Duration::from_secs(1),
        "reassigned {reassigned:?} after hello"
    );
    let until = Instant::now() + Duration::from_secs(10);
    while state(&broker, &id).await != TaskState::Succeeded {
        assert!(Instant::now() < until, "the task did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(log_lines(&log, "done"), 1, "finished exactly once");
    // The killed attempt counts (a task that kills its worker every time ends
    // dead-lettered): the rerun is attempt 2, and attempt 1 ended with the restart.
    assert_eq!(log_lines(&log, &format!("start {id} 2")), 1);
    let attempts = broker.queue().attempts(&id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].error.as_deref(), Some("worker restarted"));
    assert!(attempts[1].ended_at.is_some() && attempts[1].error.is_none());
}

/// A task that takes its worker process down every time it runs: each restart (a new boot)
/// spends an attempt, and after `max_attempts` (3) the task is dead-lettered; the next boot
/// is not given it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_crashes_its_worker_every_time_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(&dir.path().join("queue.sqlite"), cfg()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/workers/connect", listener.local_addr().unwrap());
    let _server = serve(broker.clone(), listener);
    let (state_dir, log) = (dir.path().join("w"), dir.path().join("runs.log"));
    let id = submit(&broker, "poison", json!({})).await;
    for attempt in 1..=3u32 {
        let mut child = Guard(spawn_child(&url, &state_dir, &log));
        wait_for("the poison task to start", 30, || {
            log_lines(&log, &format!("start {id} {attempt}")) == 1
        })
        .await;
        let until = Instant::now() + Duration::from_secs(10);
        while child.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < until, "the worker did not crash");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // The next boot's hello releases the third attempt; none remains.
    let _last = Guard(spawn_child(&url, &state_dir, &log));
    let until = Instant::now() + Duration::from_secs(30);
    while state(&broker, &id).await != TaskState::Failed {
        assert!(Instant::now() < until, "the task was not dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = broker.queue().get(&id).await.unwrap().unwrap();
    assert!(t.dead_lettered);
    assert_eq!(t.error.unwrap().message, "worker restarted");
    let attempts = broker.queue().attempts(&id).await.unwrap();
    assert_eq!(attempts.len(), 3);
    assert!(
        attempts
            .iter()
            .all(|a| a.error.as_deref() == Some("worker restarted"))
    );
    // Give the last worker time to be (wrongly) assigned the task again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(log_lines(&log, "start"), 3, "ran once per attempt, no more");
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

/// A worker process finishes a task while its connection is cut, so the result goes to its
/// outbox and cannot be sent, and is then killed with SIGKILL. The next process (a new boot)
/// names the lease in its hello's `outbox`: the gateway keeps the lease instead of releasing
/// it, the resent result is accepted, and the task does not run again (one attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_sigkilled_with_an_unsent_result_resends_it_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    // The lease outlives the crash and restart: only the new boot's hello decides its fate.
    let cfg = BrokerConfig {
        lease: Duration::from_secs(30),
        ..cfg()
    };
    let broker = Broker::open(&dir.path().join("queue.sqlite"), cfg).unwrap();
    let gw = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_addr = gw.local_addr().unwrap();
    let _server = serve(broker.clone(), gw);
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_url = format!("ws://{}/v1/workers/connect", front.local_addr().unwrap());
    let (cut_tx, cut_rx) = watch::channel(false);
    proxy(front, gw_addr, cut_rx);
    let (state_dir, log) = (dir.path().join("w"), dir.path().join("runs.log"));
    let id = submit(&broker, "gated", json!({})).await;

    // The first process reaches the gateway through the proxy, which is cut while it runs.
    let mut first = Guard(spawn_child(&front_url, &state_dir, &log));
    wait_for("the first start", 30, || log_lines(&log, "start") == 1).await;
    let boot1 = broker.workers()[0].boot_id.clone();
    cut_tx.send(true).unwrap();
    let b = broker.clone();
    wait_for("the broker to see the drop", 10, move || {
        !b.workers()[0].connected
    })
    .await;
    // The task finishes now: its result is written to the outbox and cannot be sent.
    std::fs::write(format!("{}.go", log.display()), b"").unwrap();
    wait_for("the result in the outbox", 10, || {
        outbox_entries(&state_dir) == 1
    })
    .await;
    first.0.kill().unwrap(); // SIGKILL
    first.0.wait().unwrap();
    assert_eq!(log_lines(&log, "done"), 1);
    let t = broker.queue().get(&id).await.unwrap().unwrap();
    assert_eq!(
        t.state,
        TaskState::Running,
        "the gateway never had the result"
    );
    let lease = t.lease.unwrap();

    // The next boot connects directly and resends the stored result.
    let gw_url = format!("ws://{gw_addr}/v1/workers/connect");
    let _second = Guard(spawn_child(&gw_url, &state_dir, &log));
    let until = Instant::now() + Duration::from_secs(20);
    while state(&broker, &id).await != TaskState::Succeeded {
        assert!(Instant::now() < until, "the stored result was not accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        broker
            .workers()
            .iter()
            .any(|w| w.connected && w.boot_id != boot1),
        "the result came from the new boot"
    );
    let done = broker.queue().get(&id).await.unwrap().unwrap();
    assert_eq!(done.attempt, 1);
    assert_eq!(done.output, Some(json!({"gated": true})));
    let attempts = broker.queue().attempts(&id).await.unwrap();
    assert_eq!(attempts.len(), 1, "the task ran once");
    assert_eq!(attempts[0].lease, lease);
    assert!(attempts[0].error.is_none());
    // The acknowledged result leaves the outbox.
    wait_for("the outbox to empty", 10, || {
        outbox_entries(&state_dir) == 0
    })
    .await;
    // Give the new boot time to be (wrongly) assigned the task again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(log_lines(&log, "start"), 1, "not run again");
}

/// A TCP proxy whose connections can be cut (and new ones refused) while `cut` is true.
fn proxy(listener: TcpListener, upstream: std::net::SocketAddr, cut: watch::Receiver<bool>) {
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            if *cut.borrow() {
                drop(down);
                continue;
            }
            let mut cut = cut.clone();
            tokio::spawn(async move {
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    _ = cut.wait_for(|c| *c) => {}
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_cut_for_2s_resumes_without_redelivery_and_replays_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(&dir.path().join("queue.sqlite"), cfg()).unwrap();
    let gw = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw_addr = gw.local_addr().unwrap();
    let _server = serve(broker.clone(), gw);
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/workers/connect", front.local_addr().unwrap());
    let (cut_tx, cut_rx) = watch::channel(false);
    proxy(front, gw_addr, cut_rx);

    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let w = Worker::new(worker_config(url, &dir.path().join("w"))).handler(
        "wait",
        move |ctx: TaskContext| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                match tokio::time::timeout(Duration::from_secs(20), ctx.cancelled()).await {
                    Ok(()) => Err(TaskError::fatal("cancelled", "stopped on request")),
                    Err(_) => Ok(json!("not cancelled")),
                }
            }
        },
    );
    let handle = w.handle();
    tokio::spawn(w.run());

    let id = submit(&broker, "wait", json!({})).await;
    let r = runs.clone();
    wait_for("the task to start", 10, move || {
        r.load(Ordering::SeqCst) == 1
    })
    .await;
    let session = broker.workers()[0].session.clone();

    cut_tx.send(true).unwrap();
    let b = broker.clone();
    wait_for("the broker to see the drop", 5, move || {
        !b.workers()[0].connected
    })
    .await;
    // Cancel while the worker cannot hear it: kept for the resumed session.
    assert!(matches!(
        broker.cancel(&id).await.unwrap(),
        kiln_broker::CancelOutcome::SignalWorker { .. }
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    cut_tx.send(false).unwrap();

    let until = Instant::now() + Duration::from_secs(10);
    while state(&broker, &id).await != TaskState::Canceled {
        assert!(
            Instant::now() < until,
            "the replayed cancel did not stop the task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let w = &broker.workers()[0];
    assert!(w.connected);
    assert_eq!(w.session, session, "the session was resumed, not replaced");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "no redelivery");
    assert_eq!(broker.queue().attempts(&id).await.unwrap().len(), 1);
    handle.shutdown();
}
