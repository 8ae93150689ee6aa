//! Reliability with real processes and scaled timers (heartbeat 0.5 s, lease 3 s, dead
//! connection after 1.5 s, sweep every 0.1 s): the gateway is a real `kiln serve` process
//! and the worker a real child process (this test binary run again with
//! `--ignored --exact child_worker` and the `KILN_TEST_CHILD_*` variables set), whose
//! handler appends `start <task> <attempt>` and `done <task> <attempt>` to a file, so
//! executions are counted on the worker's side.
//!
//! 1. `a_task_ten_times_the_lease_runs_once`: a 30 s task (10x the lease) runs exactly once,
//!    as attempt 1, kept alive by heartbeats alone. Takes about 31 s; bounded: the task must
//!    start within 20 s and end within 45 s of its start.
//! 2. `kill_9_of_the_server_with_tasks_running_and_queued_loses_nothing`: `kiln serve` is
//!    killed with SIGKILL while the worker runs two tasks and three more are queued; one
//!    running task finishes while the server is down (its result waits in the worker's
//!    outbox). The server restarts on the same data directory and port; the worker
//!    reconnects, the welcome keeps both leases, and every task succeeds exactly once, the
//!    kept ones as attempt 1. Takes about 6 s; every wait is bounded (at most 30 s for each
//!    task to end after the restart). The same on PostgreSQL
//!    (`kill_9_of_the_server_on_postgres_loses_nothing`; skipped with a notice when
//!    PostgreSQL at 127.0.0.1:5432 is not reachable, required when `CI=true`).
//!
//! Every process is killed (SIGKILL) and reaped when its guard drops, also on failure.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::{Value, json};
use support::{PG_URL, Server, call, pg_schema, post_json, start, task, wait_terminal};

/// The scaled timers of the server under test.
const TIMERS: &[(&str, &str)] = &[
    ("KILN_BROKER__HEARTBEAT", "500ms"),
    ("KILN_BROKER__LEASE", "3s"),
    ("KILN_BROKER__DEAD_AFTER", "1500ms"),
    ("KILN_BROKER__SWEEP_INTERVAL", "100ms"),
    ("KILN_DEMO_WORKER__ENABLED", "false"),
    ("KILN_GATEWAY__KNOWN_TASK_TYPES", "sleep"),
];

/// A child process killed (SIGKILL) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

/// Entry point of the worker child process (does nothing in a normal test run).
#[test]
#[ignore = "entry point of the worker child process of the reliability tests"]
fn child_worker() {
    let (Ok(url), Ok(dir), Ok(log), Ok(slots)) = (
        std::env::var("KILN_TEST_CHILD_URL"),
        std::env::var("KILN_TEST_CHILD_DIR"),
        std::env::var("KILN_TEST_CHILD_LOG"),
        std::env::var("KILN_TEST_CHILD_SLOTS"),
    ) else {
        return;
    };
    // The SDK's log (connections, welcome keep/drop) goes to stderr, which the test keeps.
    kiln_test_support::trace_init("kiln_worker=info");
    let mut cfg = WorkerConfig {
        url,
        state_dir: PathBuf::from(dir),
        slots: slots.parse().unwrap(),
        ..WorkerConfig::default()
    };
    cfg.reconnect.initial_backoff = Duration::from_millis(50);
    cfg.reconnect.max_backoff = Duration::from_millis(200);
    let log = PathBuf::from(log);
    // A blocking handler, as a GPU job is: the connection heartbeats beside it.
    let w = Worker::new(cfg).blocking_handler("sleep", move |ctx: TaskContext| {
        append(&log, &format!("start {} {}", ctx.task_id, ctx.attempt));
        let ms = ctx.input["ms"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        append(&log, &format!("done {} {}", ctx.task_id, ctx.attempt));
        Ok::<_, TaskError>(json!({"slept_ms": ms}))
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(w.run()).unwrap();
}

fn spawn_worker(base: &str, dir: &Path, slots: u32) -> Proc {
    let url = format!(
        "{}/v1/workers/connect",
        base.replacen("http://", "ws://", 1)
    );
    let stderr = std::fs::File::create(dir.join("worker.stderr")).unwrap();
    Proc(
        Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_worker", "--nocapture"])
            .env("KILN_TEST_CHILD_URL", url)
            .env("KILN_TEST_CHILD_DIR", dir.join("worker"))
            .env("KILN_TEST_CHILD_LOG", dir.join("runs.log"))
            .env("KILN_TEST_CHILD_SLOTS", slots.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap(),
    )
}

/// Lines of the worker's run log starting with `prefix`.
fn runs(dir: &Path, prefix: &str) -> usize {
    std::fs::read_to_string(dir.join("runs.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .count()
}

async fn wait_for(what: &str, secs: u64, f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn submit(base: &str, ms: u64) -> String {
    let r = post_json(
        base,
        "/v1/tasks",
        json!({"task_type": "sleep", "input": {"ms": ms}}),
        &[],
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

/// Checks that the task succeeded once, on the worker's side and in its attempts.
fn assert_ran_once(dir: &Path, t: &Value) {
    let id = t["id"].as_str().unwrap();
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(runs(dir, &format!("start {id} ")), 1, "started once: {t}");
    assert_eq!(runs(dir, &format!("done {id} ")), 1, "finished once: {t}");
    assert_eq!(runs(dir, &format!("start {id} 1")), 1, "as attempt 1: {t}");
    let attempts = t["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "one attempt recorded: {t}");
    assert_eq!(attempts[0]["attempt"], 1, "{t}");
    assert!(attempts[0]["error"].is_null(), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_ten_times_the_lease_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), TIMERS);
    let _worker = spawn_worker(&s.base, dir.path(), 1);
    let id = submit(&s.base, 30_000).await;
    wait_for("the task to start", 20, || runs(dir.path(), "start") == 1).await;
    let started = Instant::now();
    // Until it ends the task stays running on its first attempt: its lease never lapses.
    let t = loop {
        let t = task(&s.base, &id).await;
        if t["status"] != "running" {
            break t;
        }
        assert_eq!(t["attempts"].as_array().unwrap().len(), 1, "{t}");
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "the task did not end: {t}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "the 30 s task ended {:?} after it started",
        started.elapsed()
    );
    assert_ran_once(dir.path(), &t);
    assert_eq!(t["output"]["slept_ms"], 30_000);
    assert!(t["timings"]["run_ms"].as_u64().unwrap() >= 30_000, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_server_with_tasks_running_and_queued_loses_nothing() {
    kill_9_with_tasks_running_and_queued(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_server_on_postgres_loses_nothing() {
    let Some(pg) = pg_schema("kiln_reliability_kill9").await else {
        return;
    };
    let schema = format!("kiln_reliability_kill9_{}", std::process::id());
    kill_9_with_tasks_running_and_queued(&[
        ("KILN_QUEUE__BACKEND", "postgres"),
        ("KILN_QUEUE__POSTGRES_URL", PG_URL),
        ("KILN_QUEUE__POSTGRES_SCHEMA", schema.as_str()),
    ])
    .await;
    pg.drop_schema().await.unwrap();
}

/// The kill -9 scenario on the queue store `store` selects (SQLite in the data directory when
/// empty).
async fn kill_9_with_tasks_running_and_queued(store: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut env = TIMERS.to_vec();
    env.extend_from_slice(store);
    let s = start(dir.path(), &env);
    let addr = s.base.strip_prefix("http://").unwrap().to_owned();
    let _worker = spawn_worker(&s.base, dir.path(), 2);
    // Two tasks run on the worker's two slots: `finishes_while_down` ends while the server
    // is away; `outlives_the_kill` runs on well after the restart.
    let finishes_while_down = submit(&s.base, 1200).await;
    wait_for("the first start", 20, || runs(dir.path(), "start") == 1).await;
    let first_started = Instant::now();
    let outlives_the_kill = submit(&s.base, 5000).await;
    wait_for("the second start", 10, || runs(dir.path(), "start") == 2).await;
    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(submit(&s.base, 200).await);
    }
    for id in &queued {
        assert_eq!(task(&s.base, id).await["status"], "queued");
    }
    for id in [&finishes_while_down, &outlives_the_kill] {
        assert_eq!(task(&s.base, id).await["status"], "running");
    }
    tokio::time::sleep(Duration::from_millis(800).saturating_sub(first_started.elapsed())).await;
    assert_eq!(
        runs(dir.path(), "done"),
        0,
        "a task ended before the kill; the test needs both running"
    );
    drop(s); // SIGKILL
    let killed = Instant::now();
    wait_for("the task finishing while the server is down", 10, || {
        runs(dir.path(), &format!("done {finishes_while_down} ")) == 1
    })
    .await;
    env.push(("KILN_SERVER__LISTEN", addr.as_str()));
    let s: Server = start(dir.path(), &env);
    let down = killed.elapsed();
    eprintln!("the server was down for {down:?} (the lease is 3 s)");
    let mut all = vec![finishes_while_down.clone(), outlives_the_kill.clone()];
    all.extend(queued);
    for id in &all {
        let t = wait_terminal(&s.base, id, 30).await;
        assert_ran_once(dir.path(), &t);
    }
    // The worker reconciled through the welcome of a new session: it kept the lease it
    // runs and the one whose result waited in its outbox, and dropped nothing.
    let log = std::fs::read_to_string(dir.path().join("worker.stderr")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("connected") && l.contains("resumed=false keep=2 drop=0")),
        "no welcome keeping both leases (server down {down:?}):\n{log}"
    );
    let workers = call(&s.base, "GET", "/v1/workers", "", &[]).await.json();
    assert_eq!(workers["data"].as_array().unwrap().len(), 1, "{workers}");
    assert_eq!(workers["data"][0]["connected"], true, "{workers}");
}
