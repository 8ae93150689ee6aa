//! Retry configuration with documented defaults and a validating constructor.

use std::time::Duration;

use serde::Deserialize;

/// How a backoff delay is randomised. Every variant keeps the delay within
/// `[0, max_backoff]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Jitter {
    /// `U(0, d)`: the best spread for many clients retrying at once (the default).
    #[default]
    Full,
    /// `d/2 + U(0, d/2)`: never retries sooner than half the schedule.
    Equal,
    /// `min(max, U(initial, 3 * previous))`, independent of the attempt number.
    Decorrelated,
    /// The exponential schedule as it is.
    None,
}

/// A retry budget shared by every request to one host: a token bucket in the style of the
/// AWS SDK retry quota. A retry withdraws tokens, a success puts some back, and when the
/// bucket is empty requests stop retrying, so an outage cannot turn into a retry storm.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Whether the budget applies. Default: true.
    pub enabled: bool,
    /// Tokens in a full bucket (the bucket starts full). Default: 500.
    pub capacity: u32,
    /// Tokens one retry costs. Default: 5.
    pub retry_cost: u32,
    /// Tokens a retry after a timeout costs (timeouts hint at overload). Default: 10.
    pub timeout_retry_cost: u32,
    /// Tokens a successful request returns to the bucket. Default: 1.
    pub success_refund: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            capacity: 500,
            retry_cost: 5,
            timeout_retry_cost: 10,
            success_refund: 1,
        }
    }
}

/// Retry settings. Deserialize it from a config file (durations as humantime strings such as
/// `"500ms"` or `"30s"`), then turn it into a [`crate::RetryPolicy`] with
/// [`crate::RetryPolicy::new`], which validates it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt (transparent retries of refused requests not
    /// included). Default: 3.
    pub max_retries: u32,
    /// First backoff delay before jitter. Default: 500 ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Growth factor of the delay per retry; at least 1.0. Default: 2.0.
    pub multiplier: f64,
    /// Largest delay, jitter and server pushback included. Default: 30 s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Overall time for the request, attempts and sleeps together; `None` means unbounded.
    /// Default: 90 s.
    #[serde(with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// How delays are randomised. Default: full.
    pub jitter: Jitter,
    /// Response statuses worth retrying. 401 is retried only through a credential-refresh
    /// hook, whatever this list says. Default: 408, 429, 502, 503, 504.
    pub retry_statuses: Vec<u16>,
    /// Time limit of one attempt; `None` means only the deadline bounds it. An attempt is not
    /// started when this limit no longer fits in what is left of the deadline. Default: none.
    #[serde(with = "humantime_serde")]
    pub per_attempt_timeout: Option<Duration>,
    /// Immediate retries of requests the server refused without processing them (HTTP/2
    /// GOAWAY NO_ERROR, REFUSED_STREAM); they count against neither `max_retries` nor the
    /// budget. Default: 2.
    pub max_transparent_retries: u32,
    /// Budget shared by requests to the same host. Default: see [`BudgetConfig`].
    pub budget: BudgetConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_backoff: Duration::from_millis(500),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(30),
            deadline: Some(Duration::from_secs(90)),
            jitter: Jitter::Full,
            retry_statuses: vec![408, 429, 502, 503, 504],
            per_attempt_timeout: None,
            max_transparent_retries: 2,
            budget: BudgetConfig::default(),
        }
    }
}

/// A [`RetryConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidConfig {
    /// `multiplier` below 1.0 or not a finite number.
    #[error("retry.multiplier must be a finite number >= 1.0, got {0}")]
    Multiplier(f64),
    /// `max_backoff` below `initial_backoff`.
    #[error("retry.max_backoff ({max:?}) must not be below retry.initial_backoff ({initial:?})")]
    MaxBelowInitial {
        /// The configured initial backoff.
        initial: Duration,
        /// The configured maximum backoff.
        max: Duration,
    },
    /// `initial_backoff` of zero with a multiplier: the schedule would never grow.
    #[error("retry.initial_backoff must be above zero")]
    ZeroInitial,
    /// A per-attempt timeout longer than the whole deadline.
    #[error("retry.per_attempt_timeout ({attempt:?}) exceeds retry.deadline ({deadline:?})")]
    AttemptLongerThanDeadline {
        /// The configured per-attempt timeout.
        attempt: Duration,
        /// The configured deadline.
        deadline: Duration,
    },
    /// A zero per-attempt timeout or deadline: no attempt could ever run.
    #[error("retry.{0} must be above zero")]
    ZeroDuration(&'static str),
    /// A status outside 100..=599 in `retry_statuses`.
    #[error("retry.retry_statuses contains {0}, which is not an HTTP status")]
    Status(u16),
    /// A budget whose single retry costs more than the whole bucket.
    #[error("retry.budget: a retry costs more tokens ({cost}) than the bucket holds ({capacity})")]
    BudgetCost {
        /// Tokens a retry costs.
        cost: u32,
        /// Tokens in a full bucket.
        capacity: u32,
    },
}

impl RetryConfig {
    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(InvalidConfig::Multiplier(self.multiplier));
        }
        if self.initial_backoff.is_zero() {
            return Err(InvalidConfig::ZeroInitial);
        }
        if self.max_backoff < self.initial_backoff {
            return Err(InvalidConfig::MaxBelowInitial {
                initial: self.initial_backoff,
                max: self.max_backoff,
            });
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return Err(InvalidConfig::ZeroDuration("deadline"));
        }
        if let Some(attempt) = self.per_attempt_timeout {
            if attempt.is_zero() {
                return Err(InvalidConfig::ZeroDuration("per_attempt_timeout"));
            }
            if let Some(deadline) = self.deadline.filter(|d| attempt > *d) {
                return Err(InvalidConfig::AttemptLongerThanDeadline { attempt, deadline });
            }
        }
        if let Some(bad) = self
            .retry_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            return Err(InvalidConfig::Status(*bad));
        }
        let b = &self.budget;
        if b.enabled {
            let cost = b.retry_cost.max(b.timeout_retry_cost);
            if cost > b.capacity {
                return Err(InvalidConfig::BudgetCost {
                    cost,
                    capacity: b.capacity,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RetryConfig::default().validate().unwrap();
    }

    #[test]
    fn rejects_bad_combinations() {
        let base = RetryConfig::default();
        let cases = [
            RetryConfig {
                multiplier: 0.5,
                ..base.clone()
            },
            RetryConfig {
                multiplier: f64::NAN,
                ..base.clone()
            },
            RetryConfig {
                max_backoff: Duration::from_millis(100),
                ..base.clone()
            },
            RetryConfig {
                initial_backoff: Duration::ZERO,
                ..base.clone()
            },
            RetryConfig {
                per_attempt_timeout: Some(Duration::from_secs(120)),
                ..base.clone()
            },
            RetryConfig {
                deadline: Some(Duration::ZERO),
                ..base.clone()
            },
            RetryConfig {
                retry_statuses: vec![503, 999],
                ..base.clone()
            },
            RetryConfig {
                budget: BudgetConfig {
                    capacity: 3,
                    ..BudgetConfig::default()
                },
                ..base.clone()
            },
        ];
        for c in cases {
            let err = c.validate().unwrap_err();
            assert!(err.to_string().starts_with("retry."), "{err}");
        }
    }
}
