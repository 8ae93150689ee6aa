//! The async runner under paused tokio time: sleeps, deadlines, timeouts, budgets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use kiln_retry::{BudgetConfig, Class, Failure, Jitter, RetryConfig, RetryPolicy, StopReason};
use tokio::time::Instant;

fn no_jitter() -> RetryConfig {
    RetryConfig {
        jitter: Jitter::None,
        ..RetryConfig::default()
    }
}

#[derive(Debug)]
struct Fail(Class);

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "failed: {}", self.0)
    }
}

fn classify(e: &Fail) -> Failure {
    Failure::new(e.0)
}

#[tokio::test(start_paused = true)]
async fn sleeps_follow_the_schedule() {
    let policy = RetryPolicy::new(no_jitter()).unwrap();
    let start = Instant::now();
    let mut starts = Vec::new();
    let err = policy
        .request("h")
        .run(
            |_| {
                starts.push(start.elapsed());
                async { Err::<(), _>(Fail(Class::NotSent)) }
            },
            classify,
        )
        .await
        .unwrap_err();
    assert_eq!(err.reason, StopReason::AttemptsExhausted);
    assert_eq!(
        starts,
        [0, 500, 1500, 3500].map(Duration::from_millis).to_vec()
    );
    assert_eq!(err.attempts.len(), 4);
    assert_eq!(err.elapsed, Duration::from_millis(3500));
    let text = err.to_string();
    assert!(text.contains("attempts_exhausted"), "{text}");
    assert!(text.contains("#2 not_sent"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn refused_is_replayed_at_once_on_a_new_connection() {
    let policy = RetryPolicy::new(no_jitter()).unwrap();
    let start = Instant::now();
    let calls = AtomicU32::new(0);
    let done = policy
        .request("h")
        .run(
            |info| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(Fail(Class::Refused)),
                        _ => {
                            assert!(info.transparent, "replay must use a new connection");
                            Ok(n)
                        }
                    }
                }
            },
            classify,
        )
        .await
        .unwrap();
    assert_eq!(done.value, 1);
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "no sleep before a transparent retry"
    );
    assert!(done.attempts[0].transparent);
}

#[tokio::test(start_paused = true)]
async fn post_that_may_have_been_processed_is_not_replayed() {
    let policy = RetryPolicy::new(no_jitter()).unwrap();
    let calls = AtomicU32::new(0);
    let err = policy
        .request("h")
        .run(
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(Fail(Class::MaybeProcessed)) }
            },
            classify,
        )
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(err.reason, StopReason::NotRetryable);
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn per_attempt_timeout_and_deadline() {
    let policy = RetryPolicy::new(RetryConfig {
        per_attempt_timeout: Some(Duration::from_secs(10)),
        deadline: Some(Duration::from_secs(25)),
        max_retries: 10,
        ..no_jitter()
    })
    .unwrap();
    let start = Instant::now();
    let err = policy
        .request("h")
        .idempotent(true)
        .run(
            |_| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<(), Fail>(())
            },
            classify,
        )
        .await
        .unwrap_err();
    // 10 s attempt, 0.5 s sleep, 10 s attempt; a third 10 s attempt would end past 25 s.
    assert_eq!(err.reason, StopReason::Deadline);
    assert_eq!(err.attempts.len(), 2);
    assert!(err.attempts.iter().all(|a| a.timed_out));
    assert!(err.last_error.is_none());
    assert_eq!(start.elapsed(), Duration::from_millis(20_500));
    assert!(start.elapsed() <= Duration::from_secs(25));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_slept_exactly() {
    let policy = RetryPolicy::new(no_jitter()).unwrap();
    let start = Instant::now();
    let calls = AtomicU32::new(0);
    let done = policy
        .request("h")
        .run(
            |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(Fail(Class::Response { status: 429 }))
                    } else {
                        Ok(())
                    }
                }
            },
            |e| classify(e).with_pushback(Duration::from_secs(4)),
        )
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(4));
    assert_eq!(done.attempts.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn unauthorized_is_retried_through_the_refresh_hook() {
    let policy = RetryPolicy::new(no_jitter()).unwrap();
    let refreshes = Arc::new(AtomicU32::new(0));
    let r = refreshes.clone();
    let calls = AtomicU32::new(0);
    let done = policy
        .request("h")
        .on_unauthorized(move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                true
            }
        })
        .run(
            |_| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        Err(Fail(Class::Response { status: 401 }))
                    } else {
                        Ok(())
                    }
                }
            },
            classify,
        )
        .await;
    assert!(done.is_ok());
    assert_eq!(refreshes.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn on_retry_sees_every_retry() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let policy = RetryPolicy::new(no_jitter())
        .unwrap()
        .on_retry(move |ev| s.lock().unwrap().push((ev.attempt, ev.delay)));
    let _ = policy
        .request("h")
        .run(|_| async { Err::<(), _>(Fail(Class::NotSent)) }, classify)
        .await;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (1, Duration::from_millis(500)),
            (2, Duration::from_millis(1000)),
            (3, Duration::from_millis(2000))
        ]
    );
}

/// 100 concurrent requests to a failing host: retries stop when the shared budget is spent,
/// instead of 100 x 3 retries hitting the host.
#[tokio::test(start_paused = true)]
async fn shared_budget_bounds_a_retry_storm() {
    let policy = RetryPolicy::new(RetryConfig {
        budget: BudgetConfig {
            capacity: 100,
            retry_cost: 5,
            timeout_retry_cost: 10,
            success_refund: 1,
            enabled: true,
        },
        jitter: Jitter::Full,
        ..RetryConfig::default()
    })
    .unwrap()
    .with_seed(42);
    let attempts = Arc::new(AtomicU32::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let policy = policy.clone();
        let attempts = attempts.clone();
        tasks.spawn(async move {
            policy
                .request("down.example")
                .run(
                    |_| {
                        attempts.fetch_add(1, Ordering::SeqCst);
                        async { Err::<(), _>(Fail(Class::Response { status: 503 })) }
                    },
                    classify,
                )
                .await
                .unwrap_err()
                .reason
        });
    }
    let mut by_budget = 0;
    while let Some(reason) = tasks.join_next().await {
        if reason.unwrap() == StopReason::Budget {
            by_budget += 1;
        }
    }
    let retries = attempts.load(Ordering::SeqCst) - 100;
    assert_eq!(retries, 100 / 5, "exactly the budgeted retries were spent");
    assert!(
        by_budget >= 80,
        "most requests stopped on the budget: {by_budget}"
    );
    assert_eq!(policy.budget("down.example").available(), 0);
}
