//! Upload benchmark: N uploads of BYTES at concurrency C against a URL.
//!
//! ```text
//! cargo run --release --example upload_bench -- --url URL [--ca CA_PEM] [--method POST|PUT] \
//!     --requests N --concurrency C --size BYTES --policy pooled|fresh \
//!     [--max-requests-per-connection N] [--pool-idle-timeout 200ms]
//! ```
//!
//! Progress goes to stderr; the last stdout line is one JSON object:
//! `{"ok":N,"failed":N,"p50_ms":F,"p99_ms":F,"connections":N,"retries":N,"elapsed_s":F,`
//! `"handshake_waits":N,"spares":N,"resent":N}` (`handshake_waits`: uploads whose request
//! waited for a connection to be established; `spares`: connections opened ahead of need).
//! `crates/upload/bench/nginx-bench.sh` starts nginx on 127.0.0.1 and runs the standard set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_upload::{
    ConnectionPolicy, HttpRequest, MetricsHook, Payload, UploadClient, UploadConfig, UploadCounters,
};

struct Args {
    url: String,
    ca: Option<String>,
    method: http::Method,
    requests: usize,
    concurrency: usize,
    size: usize,
    policy: ConnectionPolicy,
    max_requests: Option<u64>,
    idle: Option<Duration>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        url: String::new(),
        ca: None,
        method: http::Method::POST,
        requests: 1000,
        concurrency: 16,
        size: 200_000,
        policy: ConnectionPolicy::Pooled,
        max_requests: None,
        idle: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = val()?,
            "--ca" => a.ca = Some(val()?),
            "--method" => {
                a.method = match val()?.to_ascii_uppercase().as_str() {
                    "POST" => http::Method::POST,
                    "PUT" => http::Method::PUT,
                    m => return Err(format!("unsupported method {m}")),
                }
            }
            "--requests" => a.requests = val()?.parse().map_err(|e| format!("--requests: {e}"))?,
            "--concurrency" => {
                a.concurrency = val()?.parse().map_err(|e| format!("--concurrency: {e}"))?
            }
            "--size" => a.size = val()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--policy" => {
                a.policy = match val()?.as_str() {
                    "pooled" => ConnectionPolicy::Pooled,
                    "fresh" => ConnectionPolicy::FreshPerRequest,
                    p => return Err(format!("unknown policy {p}")),
                }
            }
            "--max-requests-per-connection" => {
                a.max_requests = Some(val()?.parse().map_err(|e| format!("{flag}: {e}"))?)
            }
            "--pool-idle-timeout" => {
                let v = val()?;
                let ms = v
                    .strip_suffix("ms")
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| format!("{flag}: use e.g. 200ms"))?;
                a.idle = Some(Duration::from_millis(ms));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.url.is_empty() {
        return Err("--url is required".into());
    }
    Ok(a)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("upload_bench: {e}");
            std::process::exit(64);
        }
    };
    let mut cfg = UploadConfig {
        connection_policy: args.policy,
        extra_ca_pem: args.ca.clone().map(Into::into),
        ..UploadConfig::default()
    };
    if let Some(n) = args.max_requests {
        cfg.max_requests_per_connection = n;
    }
    if let Some(d) = args.idle {
        cfg.pool_idle_timeout = d;
    }
    // The benchmark is the stress case: the budget must not be what stops replays.
    cfg.retry.budget.enabled = false;
    let counters = Arc::new(UploadCounters::default());
    let hook: Arc<dyn MetricsHook> = counters.clone();
    let client = match UploadClient::with_metrics(cfg, hook) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("upload_bench: {e}");
            std::process::exit(64);
        }
    };
    let uri: http::Uri = match args.url.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("upload_bench: bad --url: {e}");
            std::process::exit(64);
        }
    };
    let body = Bytes::from((0..args.size).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(args.requests);
    for _ in 0..args.requests {
        let (client, sem, uri, body, method) = (
            client.clone(),
            sem.clone(),
            uri.clone(),
            body.clone(),
            args.method.clone(),
        );
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok();
            let t = Instant::now();
            let mut req = HttpRequest::new(method, uri, vec![Payload::Bytes(body)]);
            req.headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            let r = client.send("bench", req).await;
            (r, t.elapsed())
        }));
    }
    let mut lat = Vec::with_capacity(args.requests);
    let (mut ok, mut failed) = (0u64, 0u64);
    let step = (args.requests / 10).max(1);
    for (i, h) in handles.into_iter().enumerate() {
        match h.await {
            Ok((Ok(_), d)) => {
                ok += 1;
                lat.push(d.as_secs_f64() * 1000.0);
            }
            Ok((Err(e), _)) => {
                failed += 1;
                if failed <= 5 {
                    eprintln!("upload_bench: failure: {e}");
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("upload_bench: task failed: {e}");
            }
        }
        if (i + 1) % step == 0 {
            eprintln!(
                "upload_bench: {}/{} done, {} failed, {:.1}s",
                i + 1,
                args.requests,
                failed,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let s = counters.snapshot();
    println!(
        "{{\"ok\":{ok},\"failed\":{failed},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"connections\":{},\"retries\":{},\"elapsed_s\":{:.2},\"handshake_waits\":{},\"spares\":{},\"resent\":{}}}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        s.connections,
        s.retries,
        elapsed,
        s.handshake_waits,
        s.spares,
        s.resent
    );
}
