//! Queue benchmark: broker + gateway WebSocket endpoint + one worker with a no-op handler,
//! over loopback. Submits N tasks and measures end-to-end throughput, then 500 sequential
//! submit-to-result round trips.
//!
//! Run: `cargo run --release --example queue_bench -- --n 10000 --slots 2
//! [--backend sqlite|postgres|redis] [--via http] [--submitters C] [--batch B] [--backlog]
//! [--sqlite-executor thread|pool] [--postgres-url URL] [--rtt 500]` (PostgreSQL: a schema
//! of its own in `dbname=test` on 127.0.0.1:5432, dropped at the end; Redis:
//! 127.0.0.1:6379, or `KILN_BENCH_REDIS_URL`, under a key prefix of its own, deleted at the
//! end).
//!
//! - Live (the default): the worker is connected first, then `--submitters` clients submit
//!   N tasks between them; `tasks_per_s` is N over the time from the first submit to the
//!   last completion stored.
//! - `--backlog`: N tasks are queued first (`submit_per_s`), then the worker connects;
//!   `tasks_per_s` is N over the time from its start to the last completion stored (the
//!   GPU-comes-online case).
//! - `--via http`: tasks are submitted with `POST /v1/tasks` (or `POST /v1/tasks/batch`
//!   with `--batch`) over one keep-alive connection per submitter to the gateway served on
//!   127.0.0.1; otherwise with `Broker::submit` (`Broker::submit_many` with `--batch`).
//! - `--batch B`: each submitter sends B tasks per call.
//!
//! `cpu_ms_per_task` is the process's CPU time (user + system, all threads: what
//! `getrusage(RUSAGE_SELF)` reports, read from `/proc/self/stat`) over the measured phase,
//! per task. The last stdout line is one JSON object with `tasks_per_s`, `submit_per_s`,
//! `rtt_p50_ms`, `rtt_p99_ms`, `lost`, `duplicates`, `cpu_ms_per_task` and the settings.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use kiln_broker::{
    Broker, BrokerConfig, NewTask, PostgresOptions, PostgresQueue, Queue, RedisOptions, RedisQueue,
    SqliteExecutor, SqliteOptions, SqliteQueue,
};
use kiln_gateway::{AppState, GatewayConfig};
use kiln_worker::{TaskContext, TaskError, Worker, WorkerConfig};
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    n: usize,
    slots: u32,
    backend: String,
    rtt: usize,
    sqlite_executor: SqliteExecutor,
    postgres_url: String,
    submitters: usize,
    http: bool,
    batch: usize,
    backlog: bool,
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
        http: false,
        batch: 0,
        backlog: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--n" => a.n = num(v()?)?,
            "--slots" => a.slots = v()?.parse().map_err(|e| format!("--slots: {e}"))?,
            "--backend" => a.backend = v()?,
            "--rtt" => a.rtt = num(v()?)?,
            "--postgres-url" => a.postgres_url = v()?,
            "--submitters" => a.submitters = num(v()?)?.max(1),
            "--batch" => a.batch = num(v()?)?.min(1000),
            "--backlog" => a.backlog = true,
            "--via" => match v()?.as_str() {
                "http" => a.http = true,
                "broker" => a.http = false,
                other => return Err(format!("--via: {other:?} is not http or broker")),
            },
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

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// CPU time of this process so far (user + system, every thread), in ms: fields 14 and 15
/// of `/proc/self/stat`, in clock ticks of 10 ms.
fn cpu_ms() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    (tick(11) + tick(12)) * 10.0
}

/// The stores a run opened, to clean up at the end.
#[derive(Default)]
struct Opened {
    pg: Option<Arc<PostgresQueue>>,
    redis: Option<Arc<RedisQueue>>,
    sqlite: Option<Arc<SqliteQueue>>,
}

async fn open_queue(
    a: &Args,
    dir: &std::path::Path,
    o: &mut Opened,
) -> Result<Arc<dyn Queue>, Error> {
    Ok(match a.backend.as_str() {
        "sqlite" => {
            let opts = SqliteOptions {
                executor: a.sqlite_executor,
                ..SqliteOptions::default()
            };
            let q = Arc::new(SqliteQueue::open(&dir.join("queue.sqlite"), opts)?);
            o.sqlite = Some(q.clone());
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
            o.pg = Some(q.clone());
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
            o.redis = Some(q.clone());
            q
        }
        other => {
            return Err(format!("--backend {other:?}: use sqlite, postgres or redis").into());
        }
    })
}

/// How tasks are submitted: straight to the broker, or over HTTP to the gateway.
#[derive(Clone)]
enum Path {
    Broker(Arc<Broker>),
    Http(SocketAddr),
}

fn new_task(i: usize) -> NewTask {
    NewTask {
        task_type: "noop".into(),
        input: json!({ "i": i }),
        ..Default::default()
    }
}

/// One submitting client: a keep-alive HTTP connection when submitting over HTTP.
struct Client {
    path: Path,
    http: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Client {
    async fn new(path: Path) -> Result<Self, Error> {
        let http = match &path {
            Path::Broker(_) => None,
            Path::Http(addr) => {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let io = hyper_util::rt::TokioIo::new(tcp);
                let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(conn);
                Some(send)
            }
        };
        Ok(Self { path, http })
    }

    async fn post(&mut self, route: &str, body: Value) -> Result<Value, Error> {
        let (Path::Http(addr), Some(send)) = (&self.path, self.http.as_mut()) else {
            return Err("not an HTTP client".into());
        };
        send.ready().await?;
        let req = hyper::Request::post(route)
            .header("host", addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(format!("{route}: {status}: {}", String::from_utf8_lossy(&body)).into());
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// Submits tasks `ids` (one call, or one batch call when there are several); returns
    /// their task ids.
    async fn submit(&mut self, ids: &[usize], batch: bool) -> Result<Vec<String>, Error> {
        let broker = match &self.path {
            Path::Broker(b) => Some(b.clone()),
            Path::Http(_) => None,
        };
        match (broker, batch) {
            (Some(b), false) => Ok(vec![b.submit(new_task(ids[0])).await?.0.id]),
            (Some(b), true) => {
                let tasks = ids.iter().map(|i| new_task(*i)).collect();
                Ok(b.submit_many(tasks)
                    .await?
                    .into_iter()
                    .map(|(t, _)| t.id)
                    .collect())
            }
            (None, false) => {
                let body = json!({"task_type": "noop", "input": {"i": ids[0]}});
                let v = self.post("/v1/tasks", body).await?;
                Ok(vec![v["id"].as_str().ok_or("no id")?.to_owned()])
            }
            (None, true) => {
                let tasks: Vec<Value> = ids
                    .iter()
                    .map(|i| json!({"task_type": "noop", "input": {"i": i}}))
                    .collect();
                let v = self
                    .post("/v1/tasks/batch", json!({ "tasks": tasks }))
                    .await?;
                let items = v["data"].as_array().ok_or("no data")?;
                items
                    .iter()
                    .map(|d| {
                        Ok(d["task"]["id"]
                            .as_str()
                            .ok_or("item not created")?
                            .to_owned())
                    })
                    .collect()
            }
        }
    }
}

/// `a.submitters` clients submit tasks `0..a.n` between them (client c takes every k-th
/// task, `a.batch` at a time). Returns the task ids.
async fn submit_all(a: &Args, path: &Path) -> Result<Vec<String>, Error> {
    let mut clients = tokio::task::JoinSet::new();
    let (n, k, batch) = (a.n, a.submitters, a.batch.max(1));
    for c in 0..k {
        let path = path.clone();
        clients.spawn(async move {
            let mut client = Client::new(path).await?;
            let mine: Vec<usize> = (c..n).step_by(k).collect();
            let mut ids = Vec::with_capacity(mine.len());
            for chunk in mine.chunks(batch) {
                ids.extend(client.submit(chunk, batch > 1).await?);
            }
            Ok::<_, Error>(ids)
        });
    }
    let mut ids = Vec::with_capacity(n);
    while let Some(r) = clients.join_next().await {
        ids.extend(r??);
    }
    Ok(ids)
}

/// Waits until `n` tasks are stored as ended. The worker's own count gates the store
/// reads: no task can be stored as done before it ran.
async fn wait_done(broker: &Broker, executed: &AtomicU64, n: usize) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last_print = 0;
    while (executed.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        let done = executed.load(Ordering::Relaxed) / 2000;
        if done > last_print {
            last_print = done;
            eprintln!("  {} run", done * 2000);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    loop {
        let stats = broker.queue().stats().await?;
        let done = stats.count(kiln_protocol::TaskState::Succeeded)
            + stats.count(kiln_protocol::TaskState::Failed);
        if done as usize >= n || Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// 500 (`--rtt`) tasks one at a time, submit to result. Returns the sorted times in ms.
async fn round_trips(
    a: &Args,
    broker: &Broker,
    path: &Path,
    ids: &mut Vec<String>,
) -> Result<Vec<f64>, Error> {
    let mut client = Client::new(path.clone()).await?;
    let mut rtts = Vec::with_capacity(a.rtt);
    for i in 0..a.rtt {
        let t0 = Instant::now();
        let mut events = broker.subscribe();
        let id = client.submit(&[a.n + i], false).await?.remove(0);
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
    Ok(rtts)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let a = args()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = std::env::temp_dir().join(format!("kiln-queue-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut opened = Opened::default();
    let queue = open_queue(&a, &dir, &mut opened).await?;
    let broker = Broker::new(queue, BrokerConfig::default());
    let state = AppState::new(
        GatewayConfig {
            files_dir: dir.join("files"),
            // Tasks are queued before the worker connects in the backlog mode.
            known_task_types: vec!["noop".into()],
            rate_limit_per_minute: 0,
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
    let path = if a.http {
        Path::Http(addr)
    } else {
        Path::Broker(broker.clone())
    };
    let how = format!(
        "{} submitter(s), {}{}",
        a.submitters,
        if a.http { "HTTP" } else { "broker" },
        if a.batch > 1 {
            format!(", batches of {}", a.batch)
        } else {
            String::new()
        }
    );

    let (submit_s, elapsed, cpu, mut ids): (f64, f64, f64, Vec<String>);
    if a.backlog {
        eprintln!("queueing {} tasks ({how})", a.n);
        let t0 = Instant::now();
        ids = submit_all(&a, &path).await?;
        submit_s = t0.elapsed().as_secs_f64();
        eprintln!("queued after {submit_s:.2} s; the worker connects");
        let (cpu0, start) = (cpu_ms(), Instant::now());
        tokio::spawn(worker.run());
        wait_done(&broker, &executed, a.n).await?;
        elapsed = start.elapsed().as_secs_f64();
        cpu = cpu_ms() - cpu0;
    } else {
        tokio::spawn(worker.run());
        while !broker.can_serve("noop", None, &[]) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("submitting {} tasks ({how})", a.n);
        let (cpu0, start) = (cpu_ms(), Instant::now());
        ids = submit_all(&a, &path).await?;
        submit_s = start.elapsed().as_secs_f64();
        eprintln!("all submitted after {submit_s:.2} s");
        wait_done(&broker, &executed, a.n).await?;
        elapsed = start.elapsed().as_secs_f64();
        cpu = cpu_ms() - cpu0;
    }
    let tasks_per_s = a.n as f64 / elapsed;
    let cpu_per_task = cpu / a.n as f64;
    eprintln!(
        "throughput: {} tasks in {elapsed:.2} s = {tasks_per_s:.0} tasks/s; {cpu:.0} CPU-ms = {cpu_per_task:.3} per task",
        a.n
    );

    let rtts = round_trips(&a, &broker, &path, &mut ids).await?;
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
    if let Some(q) = &opened.sqlite {
        eprintln!("sqlite: {} calls committed in groups", q.grouped_calls());
    }
    handle.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(q) = opened.pg {
        q.drop_schema().await?;
    }
    if let Some(q) = opened.redis {
        q.delete_all().await?;
    }
    println!(
        "{}",
        json!({
            "backend": a.backend, "mode": if a.backlog { "backlog" } else { "live" },
            "via": if a.http { "http" } else { "broker" }, "batch": a.batch.max(1),
            "submitters": a.submitters, "slots": a.slots, "n": a.n,
            "tasks_per_s": (tasks_per_s * 10.0).round() / 10.0,
            "submit_per_s": (a.n as f64 / submit_s * 10.0).round() / 10.0,
            "rtt_p50_ms": round3(pct(&rtts, 0.5)), "rtt_p99_ms": round3(pct(&rtts, 0.99)),
            "lost": lost + (ids.len() - stored_done), "duplicates": duplicates,
            "cpu_ms_per_task": round3(cpu_per_task),
        })
    );
    Ok(())
}
