//! The jittered exponential schedule. The exponential part comes from the `backoff` crate,
//! which stays private to this module.

use std::time::Duration;

use backoff::backoff::Backoff as _;
use rand::{Rng, rngs::StdRng};

use crate::config::{Jitter, RetryConfig};

/// Produces successive delays: exponential from `initial_backoff` by `multiplier`, capped
/// at `max_backoff`, then jittered and clamped so no delay exceeds `max_backoff`.
#[derive(Debug)]
pub(crate) struct Schedule {
    exp: backoff::ExponentialBackoff,
    jitter: Jitter,
    initial: Duration,
    max: Duration,
    previous: Duration,
}

impl Schedule {
    pub(crate) fn new(cfg: &RetryConfig) -> Self {
        let exp = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(cfg.initial_backoff)
            .with_multiplier(cfg.multiplier)
            .with_max_interval(cfg.max_backoff)
            .with_randomization_factor(0.0)
            .with_max_elapsed_time(None)
            .build();
        Self {
            exp,
            jitter: cfg.jitter,
            initial: cfg.initial_backoff,
            max: cfg.max_backoff,
            previous: cfg.initial_backoff,
        }
    }

    /// The next delay. Always within `[0, max_backoff]`.
    pub(crate) fn next_delay(&mut self, rng: &mut StdRng) -> Duration {
        // With no elapsed-time limit the schedule never ends; fall back to the cap anyway.
        let base = self.exp.next_backoff().unwrap_or(self.max).min(self.max);
        let delay = match self.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(rng.random::<f64>()),
            Jitter::Equal => base / 2 + (base / 2).mul_f64(rng.random::<f64>()),
            Jitter::Decorrelated => {
                let hi = self.previous.saturating_mul(3).max(self.initial);
                let span = hi - self.initial;
                self.initial + span.mul_f64(rng.random::<f64>())
            }
        };
        let delay = delay.min(self.max);
        self.previous = delay.max(self.initial);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg(jitter: Jitter) -> RetryConfig {
        RetryConfig {
            jitter,
            ..RetryConfig::default()
        }
    }

    #[test]
    fn no_jitter_is_the_exponential_schedule() {
        let mut s = Schedule::new(&cfg(Jitter::None));
        let mut rng = StdRng::seed_from_u64(1);
        let got: Vec<u64> = (0..8)
            .map(|_| s.next_delay(&mut rng).as_millis() as u64)
            .collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    }

    #[test]
    fn equal_jitter_keeps_half() {
        let mut s = Schedule::new(&cfg(Jitter::Equal));
        let mut rng = StdRng::seed_from_u64(2);
        let first = s.next_delay(&mut rng);
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
    }

    #[test]
    fn seeded_rng_repeats() {
        let run = |seed| {
            let mut s = Schedule::new(&cfg(Jitter::Decorrelated));
            let mut rng = StdRng::seed_from_u64(seed);
            (0..5).map(|_| s.next_delay(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
