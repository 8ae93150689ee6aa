//! Properties of the policy core over random settings and failure sequences.

use std::time::Duration;

use kiln_retry::{BudgetConfig, Class, Decision, Failure, Jitter, RetryConfig, RetryPolicy};
use proptest::prelude::*;

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        Just(Jitter::None)
    ]
}

fn class() -> impl Strategy<Value = Class> {
    prop_oneof![
        Just(Class::NotSent),
        Just(Class::Refused),
        Just(Class::MaybeProcessed),
        Just(Class::Response { status: 503 }),
        Just(Class::Response { status: 429 }),
        Just(Class::Response { status: 502 }),
    ]
}

prop_compose! {
    fn config()(
        max_retries in 0u32..8,
        initial_ms in 1u64..2_000,
        multiplier in 1.0f64..4.0,
        extra_max_ms in 0u64..60_000,
        deadline_ms in 1u64..200_000,
        jitter in jitter(),
        transparent in 0u32..4,
    ) -> RetryConfig {
        RetryConfig {
            max_retries,
            initial_backoff: Duration::from_millis(initial_ms),
            multiplier,
            max_backoff: Duration::from_millis(initial_ms + extra_max_ms),
            deadline: Some(Duration::from_millis(deadline_ms)),
            jitter,
            max_transparent_retries: transparent,
            budget: BudgetConfig { enabled: false, ..BudgetConfig::default() },
            ..RetryConfig::default()
        }
    }
}

proptest! {
    #[test]
    fn delays_sleeps_and_attempts_are_bounded(
        cfg in config(),
        seed in any::<u64>(),
        failures in proptest::collection::vec((class(), 0u64..5_000, proptest::option::of(0u64..120)), 1..40),
    ) {
        let policy = RetryPolicy::new(cfg.clone()).unwrap().with_seed(seed);
        let mut state = policy.start("h", true);
        let deadline = cfg.deadline.unwrap();
        let mut elapsed = Duration::ZERO;
        let mut slept = Duration::ZERO;
        let mut attempts = 0u32;
        for (class, attempt_ms, pushback) in failures {
            attempts += 1;
            elapsed += Duration::from_millis(attempt_ms);
            let mut f = Failure::new(class);
            if let Some(p) = pushback {
                f = f.with_pushback(Duration::from_secs(p));
            }
            match state.on_failure(&f, elapsed, false) {
                Decision::Retry { delay, .. } => {
                    prop_assert!(delay <= cfg.max_backoff, "{delay:?} > {:?}", cfg.max_backoff);
                    slept += delay;
                    elapsed += delay;
                    prop_assert!(elapsed < deadline, "retry scheduled past the deadline");
                }
                Decision::Stop { .. } => break,
                _ => unreachable!(),
            }
        }
        prop_assert!(slept <= deadline);
        prop_assert!(attempts <= cfg.max_retries + 1 + cfg.max_transparent_retries);
    }
}
