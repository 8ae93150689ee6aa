//! A request that meets a refused HTTP/2 stream, a 503, and a 429 with `Retry-After: 1`
//! before it succeeds, and one that stops on a 403, each with its attempt log.
//!
//! Run: `cargo run --example retry` (set `RUST_LOG=info` to see the per-attempt spans).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use kiln_retry::{Class, Failure, RetryConfig, RetryPolicy};

/// What the simulated upstream answers, attempt after attempt.
#[derive(Debug, Clone, Copy)]
enum Answer {
    RefusedStream,
    Status(u16, Option<u64>),
    Ok,
}

#[derive(Debug)]
struct UpstreamError(Answer);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Answer::RefusedStream => f.write_str("stream error received: REFUSED_STREAM"),
            Answer::Status(s, _) => write!(f, "HTTP {s}"),
            Answer::Ok => f.write_str("ok"),
        }
    }
}

fn classify(e: &UpstreamError) -> Failure {
    match e.0 {
        Answer::RefusedStream => Failure::new(Class::Refused),
        Answer::Status(status, retry_after) => {
            let f = Failure::new(Class::Response { status });
            match retry_after {
                Some(s) => f.with_pushback(Duration::from_secs(s)),
                None => f,
            }
        }
        Answer::Ok => Failure::new(Class::Permanent),
    }
}

async fn upload(policy: &RetryPolicy, script: &[Answer]) {
    let answers = Mutex::new(script.iter().copied().collect::<VecDeque<_>>());
    println!("POST /v1/assets, upstream answers {script:?}");
    let result = policy
        .request("upstream.example")
        .run(
            |info| {
                let answer = answers
                    .lock()
                    .map(|mut a| a.pop_front().unwrap_or(Answer::Ok))
                    .unwrap_or(Answer::Ok);
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    match answer {
                        Answer::Ok => Ok(format!("asset uploaded on attempt {}", info.attempt)),
                        other => Err(UpstreamError(other)),
                    }
                }
            },
            classify,
        )
        .await;
    match result {
        Ok(done) => {
            println!("  ok after {} ms: {}", done.elapsed.as_millis(), done.value);
            for a in &done.attempts {
                println!("    {a}");
            }
        }
        Err(err) => {
            println!(
                "  failed: {} after {} ms ({})",
                err.reason,
                err.elapsed.as_millis(),
                err.detail
            );
            for a in &err.attempts {
                println!("    {a}");
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let policy = RetryPolicy::new(RetryConfig {
        initial_backoff: Duration::from_millis(200),
        ..RetryConfig::default()
    })?
    .on_retry(|ev| {
        println!(
            "  retry after attempt {} ({}): sleeping {} ms, budget left {}",
            ev.attempt,
            ev.class,
            ev.delay.as_millis(),
            ev.budget_left
        )
    });
    upload(
        &policy,
        &[
            Answer::RefusedStream,
            Answer::Status(503, None),
            Answer::Status(429, Some(1)),
        ],
    )
    .await;
    upload(&policy, &[Answer::Status(403, None)]).await;
    Ok(())
}
