//! The origin's settings, loaded from TOML, and the schedule they produce.

use std::time::Duration;

use kiln_retry::{Class, Decision, Failure, Jitter, RetryConfig, RetryPolicy, StopReason};

const ORIGIN: &str = r#"
max_retries = 3
initial_backoff = "500ms"
multiplier = 2.0
max_backoff = "30s"
deadline = "90s"
jitter = "full"
retry_statuses = [401, 429, 403, 502]
"#;

#[test]
fn origin_settings_load_and_schedule() {
    let cfg: RetryConfig = toml::from_str(ORIGIN).unwrap();
    assert_eq!(cfg.initial_backoff, Duration::from_millis(500));
    assert_eq!(cfg.deadline, Some(Duration::from_secs(90)));
    assert_eq!(cfg.jitter, Jitter::Full);
    let policy = RetryPolicy::new(cfg.clone()).unwrap().with_seed(7);

    // Full jitter: each delay is drawn from [0, 0.5 s x 2^n].
    let mut state = policy.start("upstream", true);
    let mut schedule = Vec::new();
    for n in 0..4 {
        match state.on_failure(
            &Failure::new(Class::Response { status: 502 }),
            Duration::ZERO,
            false,
        ) {
            Decision::Retry { delay, .. } => {
                let cap = Duration::from_millis(500 * (1 << n));
                assert!(delay <= cap, "retry {n}: {delay:?} > {cap:?}");
                schedule.push(delay);
            }
            Decision::Stop { reason, .. } => {
                assert_eq!(n, 3);
                assert_eq!(reason, StopReason::AttemptsExhausted);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(schedule.len(), 3);
    println!("origin schedule with seed 7: {schedule:?}");

    // Without jitter the same settings give the textbook schedule.
    let policy = RetryPolicy::new(RetryConfig {
        jitter: Jitter::None,
        ..cfg
    })
    .unwrap();
    let mut state = policy.start("upstream", true);
    let delays: Vec<_> = (0..3)
        .map(
            |_| match state.on_failure(&Failure::new(Class::NotSent), Duration::ZERO, false) {
                Decision::Retry { delay, .. } => delay.as_millis(),
                other => panic!("unexpected {other:?}"),
            },
        )
        .collect();
    assert_eq!(delays, [500, 1000, 2000]);
}

#[test]
fn kiln_defaults_no_longer_retry_403() {
    let policy = RetryPolicy::new(RetryConfig::default()).unwrap();
    let mut state = policy.start("upstream", true);
    let d = state.on_failure(
        &Failure::new(Class::Response { status: 403 }),
        Duration::ZERO,
        false,
    );
    assert!(matches!(
        d,
        Decision::Stop {
            reason: StopReason::NotRetryable,
            ..
        }
    ));
}

#[test]
fn unknown_keys_and_bad_values_are_errors() {
    assert!(toml::from_str::<RetryConfig>("max_retrys = 3").is_err());
    let cfg: RetryConfig = toml::from_str("multiplier = 0.5").unwrap();
    let err = RetryPolicy::new(cfg).unwrap_err();
    assert_eq!(
        err.to_string(),
        "retry.multiplier must be a finite number >= 1.0, got 0.5"
    );
}
