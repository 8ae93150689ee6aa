//! Queue benchmark: broker + gateway WebSocket endpoint + one worker with a no-op handler,
//! over loopback. Submits N tasks and measures end-to-end throughput, then 500 sequential
//! submit-to-result round trips.
//!
//! Run: `cargo run --release --example queue_bench -- --n 10000 --slots 2
//! [--backend sqlite|postgres|redis] [--sqlite-executor thread|pool] [--postgres-url URL]
//! [--rtt 500] [--submitters 1]` (PostgreSQL: a schema of its own in `dbname=test` on 127.0.0.1:5432, dropped
//! at the end; Redis: 127.0.0.1:6379, or `KILN_BENCH_REDIS_URL`, under a key prefix of its
//! own, deleted at the end).
//! The last stdout line is `{"n":N,"tasks_per_s":F,"rtt_p50_ms":F,"rtt_p99_ms":F,"lost":N,"duplicates":N}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_broker::{
    Broker, BrokerConfig, NewTask, PostgresOptions, PostgresQueue, Queue, RedisOptions, RedisQueue,
    SqliteExecutor, SqliteOptions, SqliteQueue,
};
use kiln_gateway::{AppState, GatewayConfig};
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::json;

struct Args {
    n: usize,
    slots: u32,
    backend: String,
    rtt: usize,
    sqlite_executor: SqliteExecutor,
    postgres_url: String,
    submitters: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        n: 10_000,
        slots: 2,
        backend: "sqlite".into(),
        rtt: 500,
        sqlite_executor: SqliteExecutor::Thread,
        postgres_url: "host=127.0.0.1 port=5432 user=postgres dbname=test".into(),
        submitters: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--n" => a.n = v()?.parse().map_err(|e| format!("--n: {e}"))?,
            "--slots" => a.slots = v()?.parse().map_err(|e| format!("--slots: {e}"))?,
            "--backend" => a.backend = v()?,
            "--rtt" => a.rtt = v()?.parse().map_err(|e| format!("--rtt: {e}"))?,
            "--postgres-url" => a.postgres_url = v()?,
            "--submitters" => {
                a.submitters = v()?
                    .parse::<usize>()
                    .map_err(|e| format!("--submitters: {e}"))?
                    .max(1)
            }
            "--sqlite-executor" => {
                a.sqlite_executor = match v()?.as_str() {
                    "thread" => SqliteExecutor::Thread,
                    "pool" => SqliteExecutor::BlockingPool,
                    other => {
                        return Err(format!(
                            "--sqlite-executor: {other:?} is not thread or pool"
                        ));
                    }
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = std::env::temp_dir().join(format!("kiln-queue-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = BrokerConfig::default();
    let mut pg = None;
    let mut redis_queue = None;
    let mut sqlite = None;
    let queue: Arc<dyn Queue> = match a.backend.as_str() {
        "sqlite" => {
            let q = Arc::new(SqliteQueue::open(
                &dir.join("queue.sqlite"),
                SqliteOptions {
                    executor: a.sqlite_executor,
                    ..SqliteOptions::default()
                },
            )?);
            sqlite = Some(q.clone());
            q
        }
        "postgres" => {
            let q = Arc::new(
                PostgresQueue::open(PostgresOptions {
                    url: a.postgres_url.clone(),
                    schema: format!("kiln_bench_{}", std::process::id()),
                    ..PostgresOptions::default()
                })
                .await?,
            );
            pg = Some(q.clone());
            q
        }
        "redis" => {
            let q = Arc::new(
                RedisQueue::connect(RedisOptions {
                    url: std::env::var("KILN_BENCH_REDIS_URL")
                        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
                    prefix: format!("kiln-bench:{}:", std::process::id()),
                    ..RedisOptions::default()
                })
                .await?,
            );
            redis_queue = Some(q.clone());
            q
        }
        other => {
            return Err(format!("--backend {other:?}: use sqlite, postgres or redis").into());
        }
    };
    let broker = Broker::new(queue, cfg);
    let state = AppState::new(
        GatewayConfig {
            files_dir: dir.join("files"),
            ..GatewayConfig::default()
        },
        broker.clone(),
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, kiln_gateway::router(state)).await });

    // Every execution is counted per task, so duplicates and losses are measured, not assumed.
    let runs: Arc<std::sync::Mutex<HashMap<String, u32>>> = Arc::default();
    let executed = Arc::new(AtomicU64::new(0));
    let (r, e) = (runs.clone(), executed.clone());
    let worker = Worker::new(WorkerConfig {
        url: format!("ws://{addr}/v1/workers/connect"),
        state_dir: dir.join("worker"),
        slots: a.slots,
        ..WorkerConfig::default()
    })
    .handler("noop", move |ctx: TaskContext| {
        let (r, e) = (r.clone(), e.clone());
        async move {
            *r.lock()
                .map_err(|_| TaskError::fatal("poisoned", ""))?
                .entry(ctx.task_id)
                .or_default() += 1;
            e.fetch_add(1, Ordering::Relaxed);
            Ok(json!(null))
        }
    });
    let handle = worker.handle();
    tokio::spawn(worker.run());
    while !broker.can_serve("noop", None, &[]) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let submit = {
        let broker = broker.clone();
        move |i: usize| {
            let broker = broker.clone();
            async move {
                broker
                    .submit(NewTask {
                        task_type: "noop".into(),
                        input: json!({"i": i}),
                        ..Default::default()
                    })
                    .await
                    .map(|(t, _)| t.id)
            }
        }
    };
    // Throughput: submit everything, wait for every completion.
    eprintln!("submitting {} tasks", a.n);
    let start = Instant::now();
    // One client submitting in sequence (the default, as the Celery figures were taken), or
    // `--submitters` clients at once, each taking every k-th task.
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..a.submitters {
        let (submit, n, k) = (submit.clone(), a.n, a.submitters);
        clients.spawn(async move {
            let mut ids = Vec::new();
            for i in (c..n).step_by(k) {
                ids.push(submit(i).await?);
            }
            Ok::<_, kiln_broker::QueueError>(ids)
        });
    }
    let mut ids = Vec::with_capacity(a.n);
    while let Some(r) = clients.join_next().await {
        ids.extend(r??);
    }
    eprintln!(
        "all submitted after {:.2} s ({} submitter(s))",
        start.elapsed().as_secs_f64(),
        a.submitters
    );
    // Completions are counted from the store (the event feed would lag behind 10,000 bursts).
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_print = 0;
    loop {
        let stats = broker.queue().stats().await?;
        let done = stats.count(kiln_protocol::TaskState::Succeeded)
            + stats.count(kiln_protocol::TaskState::Failed);
        if done as usize >= a.n || Instant::now() > deadline {
            break;
        }
        if done / 2000 > last_print {
            last_print = done / 2000;
            eprintln!("  {done} done");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let tasks_per_s = a.n as f64 / elapsed;
    eprintln!(
        "throughput: {} tasks in {elapsed:.2} s = {tasks_per_s:.0} tasks/s",
        a.n
    );

    // Round trips: one task at a time, submit to result.
    let mut rtts = Vec::with_capacity(a.rtt);
    for i in 0..a.rtt {
        let t0 = Instant::now();
        let mut events = broker.subscribe();
        let id = submit(a.n + i).await?;
        loop {
            match events.recv().await {
                Ok(e) if e.kind.is_completed() && e.task_id == id => break,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        rtts.push(t0.elapsed().as_secs_f64() * 1000.0);
        ids.push(id);
    }
    rtts.sort_by(f64::total_cmp);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let runs = runs.lock().map_err(|_| "poisoned")?.clone();
    let lost = ids.iter().filter(|id| !runs.contains_key(*id)).count();
    let duplicates: u32 = runs.values().map(|n| n.saturating_sub(1)).sum();
    let mut stored_done = 0;
    for id in &ids {
        if let Ok(Some(t)) = broker.queue().get(id).await
            && t.state == kiln_protocol::TaskState::Succeeded
        {
            stored_done += 1;
        }
    }
    eprintln!(
        "rtt p50 {:.3} ms, p99 {:.3} ms; {} of {} stored as succeeded; {} executions",
        pct(&rtts, 0.5),
        pct(&rtts, 0.99),
        stored_done,
        ids.len(),
        executed.load(Ordering::Relaxed)
    );
    if let Some(q) = &sqlite {
        eprintln!("sqlite: {} calls committed in groups", q.grouped_calls());
    }
    handle.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(q) = pg {
        q.drop_schema().await?;
    }
    if let Some(q) = redis_queue {
        q.delete_all().await?;
    }
    println!(
        "{}",
        json!({"backend": a.backend, "n": a.n, "tasks_per_s": (tasks_per_s * 10.0).round() / 10.0, "rtt_p50_ms": (pct(&rtts, 0.5) * 1000.0).round() / 1000.0,
               "rtt_p99_ms": (pct(&rtts, 0.99) * 1000.0).round() / 1000.0, "lost": lost + (ids.len() - stored_done), "duplicates": duplicates})
    );
    Ok(())
}
