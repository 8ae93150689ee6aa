//! Helpers shared by the binary's integration tests: the real `kiln` on a free loopback
//! port, and a small HTTP client.
#![allow(dead_code, unreachable_pub)] // each test file uses a different subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start(data: &Path, env: &[(&str, &str)]) -> Server {
    start_with(data, None, env)
}

/// Starts `kiln serve`, with `--config` when given.
pub fn start_with(data: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> Server {
    start_full(data, config, env, Stdio::null())
}

/// Starts `kiln serve` with its stderr (the log) sent to `stderr`.
pub fn start_logging(data: &Path, env: &[(&str, &str)], stderr: Stdio) -> Server {
    start_full(data, None, env, stderr)
}

fn start_full(data: &Path, config: Option<&Path>, env: &[(&str, &str)], stderr: Stdio) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("serve");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.env("KILN_SERVER__LISTEN", "127.0.0.1:0")
        .env("KILN_SERVER__DATA_DIR", data)
        .env("KILN_SERVER__SHUTDOWN_GRACE", "2s")
        .env("KILN_LOG__FILTER", "warn")
        // The tests' own setting, not one of the server's (unknown keys stop it).
        .env_remove("KILN_MOTO_SERVER")
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let base = line
        .trim()
        .strip_prefix("kiln listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Server { child, base }
}

pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn call(
    base: &str,
    method: &str,
    path: &str,
    body: impl Into<Bytes>,
    headers: &[(&str, &str)],
) -> Resp {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(req.body(Full::new(body.into())).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}

pub async fn post_json(base: &str, path: &str, v: Value, headers: &[(&str, &str)]) -> Resp {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    call(base, "POST", path, v.to_string(), &h).await
}

/// The task object of `id`.
pub async fn task(base: &str, id: &str) -> Value {
    call(base, "GET", &format!("/v1/tasks/{id}"), "", &[])
        .await
        .json()
}

/// Waits until the task is terminal (neither queued nor running) and returns it.
pub async fn wait_terminal(base: &str, id: &str, secs: u64) -> Value {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = task(base, id).await;
        if !matches!(t["status"].as_str(), Some("queued" | "running")) {
            return t;
        }
        assert!(Instant::now() < until, "task {id} did not end: {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn wait_status(base: &str, id: &str, want: &str, secs: u64) -> Value {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = task(base, id).await;
        if t["status"] == want {
            return t;
        }
        assert!(
            Instant::now() < until,
            "task {id} is {} not {want}: {t}",
            t["status"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const PG_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3";

/// A PostgreSQL queue on a fresh schema, or `None` (with a notice) when the server is not
/// reachable outside CI.
pub async fn pg_schema(name: &str) -> Option<kiln_broker::PostgresQueue> {
    let opts = kiln_broker::PostgresOptions {
        url: PG_URL.into(),
        schema: format!("{name}_{}", std::process::id()),
        ..Default::default()
    };
    match kiln_broker::PostgresQueue::open(opts).await {
        Ok(q) => {
            q.drop_schema().await.unwrap();
            Some(q)
        }
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("PostgreSQL at {PG_URL} is required in CI: {e}")
        }
        Err(e) => {
            eprintln!("notice: PostgreSQL at {PG_URL} not reachable ({e}); test skipped");
            None
        }
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}
