//! The policy core: given a failed attempt and the time spent so far, decide whether to
//! retry and after how long. No runtime, no clock: time comes in as an argument.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::budget::{Budgets, RetryBudget};
use crate::class::{Class, Failure, status_may_have_processed};
use crate::config::{InvalidConfig, RetryConfig};
use crate::schedule::Schedule;

/// Why a request stopped retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// `max_retries` retries were spent.
    AttemptsExhausted,
    /// The next sleep or attempt would not fit in the deadline.
    Deadline,
    /// The host's shared retry budget is empty.
    Budget,
    /// The failure cannot be fixed by retrying (a 4xx, a permanent error, or a request that
    /// may have been processed and is not idempotent).
    NotRetryable,
}

impl StopReason {
    /// A stable snake_case name: `attempts_exhausted`, `deadline`, `budget`, `not_retryable`.
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::AttemptsExhausted => "attempts_exhausted",
            StopReason::Deadline => "deadline",
            StopReason::Budget => "budget",
            StopReason::NotRetryable => "not_retryable",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Send the request again after `delay`.
    Retry {
        /// How long to sleep first (zero for a transparent retry).
        delay: Duration,
        /// A transparent retry of a refused request: immediate, on a new connection, not
        /// counted against `max_retries` or the budget.
        transparent: bool,
        /// The time limit for the next attempt, if any (per-attempt timeout, or what is left
        /// of the deadline after the sleep, whichever is smaller).
        attempt_timeout: Option<Duration>,
    },
    /// Stop and report the failure.
    Stop {
        /// Why.
        reason: StopReason,
        /// A sentence for the error message.
        detail: String,
    },
}

/// A validated retry policy, cheap to clone and share. Holds the per-host budgets.
#[derive(Clone)]
pub struct RetryPolicy {
    pub(crate) inner: Arc<PolicyInner>,
}

pub(crate) struct PolicyInner {
    pub(crate) cfg: RetryConfig,
    budgets: Budgets,
    seed: Option<u64>,
    requests: AtomicU64,
    pub(crate) on_retry: Option<Arc<OnRetry>>,
}

/// Called before each retry sleep.
pub(crate) type OnRetry = dyn Fn(&RetryEvent) + Send + Sync;

/// What [`RetryPolicy::on_retry`] callbacks receive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetryEvent {
    /// The attempt that failed (1-based).
    pub attempt: u32,
    /// Its class.
    pub class: Class,
    /// The sleep before the next attempt.
    pub delay: Duration,
    /// Whether the next attempt is a transparent retry.
    pub transparent: bool,
    /// Tokens left in the host's budget.
    pub budget_left: u32,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("config", &self.inner.cfg)
            .field("seed", &self.inner.seed)
            .finish_non_exhaustive()
    }
}

impl RetryPolicy {
    /// Validates `cfg` and builds the policy.
    pub fn new(cfg: RetryConfig) -> Result<Self, InvalidConfig> {
        Self::build(cfg, None, None)
    }

    fn build(
        cfg: RetryConfig,
        seed: Option<u64>,
        on_retry: Option<Arc<OnRetry>>,
    ) -> Result<Self, InvalidConfig> {
        cfg.validate()?;
        let budgets = Budgets::new(cfg.budget.clone());
        Ok(Self {
            inner: Arc::new(PolicyInner {
                cfg,
                budgets,
                seed,
                requests: AtomicU64::new(0),
                on_retry,
            }),
        })
    }

    /// The same policy with a fixed RNG seed, so jittered delays repeat (tests). Budgets
    /// are not shared with `self`.
    pub fn with_seed(&self, seed: u64) -> Self {
        let on_retry = self.inner.on_retry.clone();
        Self::rebuild(self, Some(seed), on_retry)
    }

    /// The same policy calling `f` before every retry sleep. Budgets are not shared with
    /// `self`.
    pub fn on_retry(&self, f: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        Self::rebuild(self, self.inner.seed, Some(Arc::new(f)))
    }

    fn rebuild(&self, seed: Option<u64>, on_retry: Option<Arc<OnRetry>>) -> Self {
        let cfg = self.inner.cfg.clone();
        let budgets = Budgets::new(cfg.budget.clone());
        Self {
            inner: Arc::new(PolicyInner {
                cfg,
                budgets,
                seed,
                requests: AtomicU64::new(0),
                on_retry,
            }),
        }
    }

    /// The validated settings.
    pub fn config(&self) -> &RetryConfig {
        &self.inner.cfg
    }

    /// The budget shared by every request to `host`.
    pub fn budget(&self, host: &str) -> RetryBudget {
        self.inner.budgets.get(host)
    }

    /// Starts the bookkeeping of one request to `host`. `idempotent` says whether the
    /// request may be replayed after it may have been processed (by method, or because the
    /// caller sends an idempotency key).
    pub fn start(&self, host: &str, idempotent: bool) -> RetryState {
        let n = self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let rng = match self.inner.seed {
            Some(seed) => StdRng::seed_from_u64(seed.wrapping_add(n)),
            None => StdRng::from_os_rng(),
        };
        RetryState {
            cfg: self.inner.cfg.clone(),
            budget: self.budget(host),
            idempotent,
            schedule: Schedule::new(&self.inner.cfg),
            rng,
            attempts: 0,
            retries: 0,
            transparent: 0,
            refreshed: false,
        }
    }
}

/// The retry bookkeeping of one request: attempts made, retries spent, the schedule.
#[derive(Debug)]
pub struct RetryState {
    cfg: RetryConfig,
    budget: RetryBudget,
    idempotent: bool,
    schedule: Schedule,
    rng: StdRng,
    attempts: u32,
    retries: u32,
    transparent: u32,
    refreshed: bool,
}

impl RetryState {
    /// Attempts finished so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Tokens left in the host's budget.
    pub fn budget_left(&self) -> u32 {
        self.budget.available()
    }

    /// The time limit for the first attempt.
    pub fn first_attempt_timeout(&self) -> Option<Duration> {
        min_opt(self.cfg.per_attempt_timeout, self.cfg.deadline)
    }

    /// Records a success (refunds the budget).
    pub fn on_success(&mut self) {
        self.attempts += 1;
        self.budget.deposit_success();
    }

    /// Records a failed attempt and decides what to do. `elapsed` is the time since the
    /// request started, attempts and sleeps included. `credentials_refreshed` says whether a
    /// credential-refresh hook renewed the credentials after a 401 (a 401 is retried once,
    /// and only then).
    pub fn on_failure(
        &mut self,
        failure: &Failure,
        elapsed: Duration,
        credentials_refreshed: bool,
    ) -> Decision {
        self.attempts += 1;
        let stop = |reason, detail: String| Decision::Stop { reason, detail };

        match failure.class {
            Class::Permanent => {
                return stop(StopReason::NotRetryable, "permanent error".into());
            }
            Class::MaybeProcessed if !self.idempotent => {
                return stop(
                    StopReason::NotRetryable,
                    "the server may have processed the request and it is not idempotent".into(),
                );
            }
            Class::Response { status: 401 } => {
                if !credentials_refreshed || self.refreshed {
                    return stop(StopReason::NotRetryable, "401 unauthorized".into());
                }
                self.refreshed = true;
            }
            Class::Response { status } => {
                if !self.cfg.retry_statuses.contains(&status) {
                    return stop(
                        StopReason::NotRetryable,
                        format!("status {status} is not retried"),
                    );
                }
                if status_may_have_processed(status) && !self.idempotent {
                    return stop(
                        StopReason::NotRetryable,
                        format!(
                            "status {status} means the request may have been processed and it is not idempotent"
                        ),
                    );
                }
            }
            Class::Refused if self.transparent < self.cfg.max_transparent_retries => {
                let timeout = self.attempt_timeout_after(elapsed, Duration::ZERO);
                if let Some(d) = self.deadline_stop(elapsed, Duration::ZERO) {
                    return d;
                }
                self.transparent += 1;
                return Decision::Retry {
                    delay: Duration::ZERO,
                    transparent: true,
                    attempt_timeout: timeout,
                };
            }
            Class::Refused | Class::NotSent | Class::MaybeProcessed => {}
        }

        if self.retries >= self.cfg.max_retries {
            return stop(
                StopReason::AttemptsExhausted,
                format!("{} retries spent", self.retries),
            );
        }
        let mut delay = self.schedule.next_delay(&mut self.rng);
        if let Some(wait) = failure.pushback {
            if let Some(deadline) = self.cfg.deadline {
                let left = deadline.saturating_sub(elapsed);
                if wait > left {
                    return stop(
                        StopReason::Deadline,
                        format!(
                            "the server asked to wait {} ms but only {} ms are left before the deadline",
                            wait.as_millis(),
                            left.as_millis()
                        ),
                    );
                }
            }
            delay = delay.max(wait);
        }
        let delay = delay.min(self.cfg.max_backoff);
        if let Some(d) = self.deadline_stop(elapsed, delay) {
            return d;
        }
        if !self.budget.try_withdraw(failure.timed_out) {
            return stop(
                StopReason::Budget,
                format!(
                    "the host's retry budget is empty ({} tokens left)",
                    self.budget.available()
                ),
            );
        }
        self.retries += 1;
        Decision::Retry {
            delay,
            transparent: false,
            attempt_timeout: self.attempt_timeout_after(elapsed, delay),
        }
    }

    /// Stops when sleeping `delay` and then running an attempt would pass the deadline.
    fn deadline_stop(&self, elapsed: Duration, delay: Duration) -> Option<Decision> {
        let deadline = self.cfg.deadline?;
        let start = elapsed.saturating_add(delay);
        let needed = self.cfg.per_attempt_timeout.unwrap_or(Duration::ZERO);
        if start >= deadline || start.saturating_add(needed) > deadline {
            let left = deadline.saturating_sub(elapsed);
            return Some(Decision::Stop {
                reason: StopReason::Deadline,
                detail: format!(
                    "a {} ms sleep and a {} ms attempt do not fit in the {} ms left",
                    delay.as_millis(),
                    needed.as_millis(),
                    left.as_millis()
                ),
            });
        }
        None
    }

    fn attempt_timeout_after(&self, elapsed: Duration, delay: Duration) -> Option<Duration> {
        let left = self
            .cfg
            .deadline
            .map(|d| d.saturating_sub(elapsed.saturating_add(delay)));
        min_opt(self.cfg.per_attempt_timeout, left)
    }
}

fn min_opt(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BudgetConfig, Jitter};

    fn policy(cfg: RetryConfig) -> RetryPolicy {
        RetryPolicy::new(cfg).unwrap().with_seed(1)
    }

    fn no_jitter() -> RetryConfig {
        RetryConfig {
            jitter: Jitter::None,
            ..RetryConfig::default()
        }
    }

    fn is_retry(d: &Decision) -> bool {
        matches!(d, Decision::Retry { .. })
    }

    fn reason(d: &Decision) -> Option<StopReason> {
        match d {
            Decision::Stop { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    const T0: Duration = Duration::ZERO;

    #[test]
    fn not_sent_is_retried_for_any_method() {
        let mut s = policy(no_jitter()).start("h", false);
        let d = s.on_failure(&Failure::new(Class::NotSent), T0, false);
        assert_eq!(
            d,
            Decision::Retry {
                delay: Duration::from_millis(500),
                transparent: false,
                attempt_timeout: Some(Duration::from_millis(89_500)),
            }
        );
    }

    #[test]
    fn refused_is_transparent_twice_then_counted() {
        let mut s = policy(no_jitter()).start("h", false);
        for _ in 0..2 {
            let d = s.on_failure(&Failure::new(Class::Refused), T0, false);
            assert!(matches!(
                d,
                Decision::Retry {
                    transparent: true,
                    delay: Duration::ZERO,
                    ..
                }
            ));
        }
        assert_eq!(s.budget_left(), 500, "transparent retries are free");
        let d = s.on_failure(&Failure::new(Class::Refused), T0, false);
        assert!(matches!(
            d,
            Decision::Retry {
                transparent: false,
                ..
            }
        ));
        assert_eq!(s.budget_left(), 495);
    }

    #[test]
    fn maybe_processed_needs_idempotence() {
        let p = policy(no_jitter());
        let mut post = p.start("h", false);
        assert_eq!(
            reason(&post.on_failure(&Failure::new(Class::MaybeProcessed), T0, false)),
            Some(StopReason::NotRetryable)
        );
        let mut put = p.start("h", true);
        assert!(is_retry(&put.on_failure(
            &Failure::new(Class::MaybeProcessed),
            T0,
            false
        )));
        let mut put = p.start("h", true);
        assert!(is_retry(&put.on_failure(&Failure::timeout(), T0, false)));
    }

    #[test]
    fn statuses_follow_the_list_and_processing() {
        let p = policy(no_jitter());
        let resp = |status| Failure::new(Class::Response { status });
        for (status, idempotent, retried) in [
            (503, false, true),
            (429, false, true),
            (408, false, true),
            (502, false, false), // may have been processed
            (502, true, true),
            (504, true, true),
            (500, true, false), // not in the default list
            (403, true, false),
            (404, true, false),
            (400, true, false),
        ] {
            let mut s = p.start("h", idempotent);
            let d = s.on_failure(&resp(status), T0, false);
            assert_eq!(is_retry(&d), retried, "{status} idempotent={idempotent}");
        }
    }

    #[test]
    fn origin_403_is_retried_only_when_listed() {
        let p = policy(RetryConfig {
            retry_statuses: vec![401, 429, 403, 502],
            ..no_jitter()
        });
        let mut s = p.start("h", true);
        let d = s.on_failure(&Failure::new(Class::Response { status: 403 }), T0, false);
        assert!(is_retry(&d));
    }

    #[test]
    fn unauthorized_only_after_refresh_and_once() {
        let p = policy(no_jitter());
        let f = Failure::new(Class::Response { status: 401 });
        let mut s = p.start("h", false);
        assert_eq!(
            reason(&s.on_failure(&f, T0, false)),
            Some(StopReason::NotRetryable)
        );
        let mut s = p.start("h", false);
        assert!(is_retry(&s.on_failure(&f, T0, true)));
        assert_eq!(
            reason(&s.on_failure(&f, T0, true)),
            Some(StopReason::NotRetryable)
        );
    }

    #[test]
    fn permanent_is_never_retried() {
        let mut s = policy(no_jitter()).start("h", true);
        assert_eq!(
            reason(&s.on_failure(&Failure::new(Class::Permanent), T0, false)),
            Some(StopReason::NotRetryable)
        );
    }

    #[test]
    fn attempts_exhausted_after_max_retries() {
        let mut s = policy(no_jitter()).start("h", true);
        let f = Failure::new(Class::NotSent);
        for _ in 0..3 {
            assert!(is_retry(&s.on_failure(&f, T0, false)));
        }
        assert_eq!(
            reason(&s.on_failure(&f, T0, false)),
            Some(StopReason::AttemptsExhausted)
        );
        assert_eq!(s.attempts(), 4);
    }

    #[test]
    fn pushback_is_honoured_clamped_and_checked_against_the_deadline() {
        let p = policy(no_jitter());
        let f = |secs| {
            Failure::new(Class::Response { status: 429 }).with_pushback(Duration::from_secs(secs))
        };
        let mut s = p.start("h", false);
        assert!(
            matches!(s.on_failure(&f(7), T0, false), Decision::Retry { delay, .. } if delay == Duration::from_secs(7))
        );
        let mut s = p.start("h", false);
        assert!(
            matches!(s.on_failure(&f(60), T0, false), Decision::Retry { delay, .. } if delay == Duration::from_secs(30))
        );
        let mut s = p.start("h", false);
        let d = s.on_failure(&f(20), Duration::from_secs(80), false);
        assert_eq!(reason(&d), Some(StopReason::Deadline));
        assert!(format!("{d:?}").contains("asked to wait 20000 ms"));
    }

    #[test]
    fn never_starts_an_attempt_that_cannot_fit() {
        let p = policy(RetryConfig {
            per_attempt_timeout: Some(Duration::from_secs(30)),
            ..no_jitter()
        });
        let mut s = p.start("h", true);
        let f = Failure::new(Class::NotSent);
        assert!(is_retry(&s.on_failure(&f, Duration::from_secs(59), false)));
        let mut s = p.start("h", true);
        assert_eq!(
            reason(&s.on_failure(&f, Duration::from_secs(60), false)),
            Some(StopReason::Deadline)
        );
    }

    #[test]
    fn budget_stops_retries() {
        let p = policy(RetryConfig {
            budget: BudgetConfig {
                capacity: 10,
                retry_cost: 5,
                timeout_retry_cost: 10,
                ..BudgetConfig::default()
            },
            ..no_jitter()
        });
        let f = Failure::new(Class::NotSent);
        let mut a = p.start("h", true);
        assert!(is_retry(&a.on_failure(&f, T0, false)));
        assert!(is_retry(&a.on_failure(&f, T0, false)));
        let mut b = p.start("h", true);
        assert_eq!(
            reason(&b.on_failure(&f, T0, false)),
            Some(StopReason::Budget)
        );
        let mut c = p.start("other", true);
        assert!(is_retry(&c.on_failure(&f, T0, false)));
    }
}
