//! The retry schedule: when each delivery attempt of a message is due.

use std::time::Duration;

/// The Standard Webhooks schedule, seconds: immediately, 5 s, 5 min, 30 min, 2 h, 5 h,
/// 10 h, 14 h, 20 h, 24 h. Ten attempts over about 3 days and 3 hours.
pub const DEFAULT_SCHEDULE_S: [f64; 10] = [
    0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0,
];

/// Jitter of every delay: ±10 %, uniformly (a delay `d` becomes one in `[0.9 d, 1.1 d]`), so
/// messages that failed together do not all come back in the same second.
pub const JITTER: f64 = 0.10;

/// Longest delay one entry may have: 7 days.
pub const MAX_DELAY_S: f64 = 7.0 * 86400.0;

/// Why a schedule is not usable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The list is empty: no attempt would ever be made.
    #[error("webhooks.schedule_s is empty; it needs at least one entry (0 = immediately)")]
    Empty,
    /// An entry is negative, not finite, or longer than [`MAX_DELAY_S`].
    #[error("webhooks.schedule_s[{index}] = {value} is not a delay between 0 and 604800 s")]
    BadEntry {
        /// Position in the list.
        index: usize,
        /// The value.
        value: f64,
    },
}

impl ScheduleError {
    /// Always false: a configuration mistake.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// When each delivery attempt of a message is due.
///
/// Entry `i` is the delay before attempt `i + 1`: entry 0 counts from the message's creation
/// (0 = immediately), every later one from the end of the previous failed attempt. A
/// message has as many attempts as entries; after the last one fails it is exhausted.
/// Configured as `webhooks.schedule_s`, a list of seconds (fractions allowed).
/// Default: [`DEFAULT_SCHEDULE_S`].
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "Vec<f64>", into = "Vec<f64>")]
pub struct Schedule {
    delays: Vec<Duration>,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            delays: DEFAULT_SCHEDULE_S
                .iter()
                .map(|s| Duration::from_secs_f64(*s))
                .collect(),
        }
    }
}

impl TryFrom<Vec<f64>> for Schedule {
    type Error = ScheduleError;
    fn try_from(secs: Vec<f64>) -> Result<Self, ScheduleError> {
        Self::from_secs(&secs)
    }
}

impl From<Schedule> for Vec<f64> {
    fn from(s: Schedule) -> Self {
        s.delays.iter().map(Duration::as_secs_f64).collect()
    }
}

impl Schedule {
    /// A schedule from a list of seconds (`webhooks.schedule_s`).
    pub fn from_secs(secs: &[f64]) -> Result<Self, ScheduleError> {
        if secs.is_empty() {
            return Err(ScheduleError::Empty);
        }
        let mut delays = Vec::with_capacity(secs.len());
        for (index, &value) in secs.iter().enumerate() {
            if !(value.is_finite() && (0.0..=MAX_DELAY_S).contains(&value)) {
                return Err(ScheduleError::BadEntry { index, value });
            }
            delays.push(Duration::from_secs_f64(value));
        }
        Ok(Self { delays })
    }

    /// Attempts a message gets before it is exhausted (the number of entries).
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.delays.len()).unwrap_or(u32::MAX)
    }

    /// The configured delays, unjittered.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// The unjittered delay before the next attempt after `attempts_done` attempts
    /// (`None`: exhausted).
    pub fn nominal(&self, attempts_done: u32) -> Option<Duration> {
        self.delays.get(attempts_done as usize).copied()
    }

    /// The delay before the next attempt after `attempts_done` attempts, jittered by
    /// ±[`JITTER`] from the system random generator; `None` when the message is exhausted.
    /// A zero entry stays zero.
    pub fn delay_after(&self, attempts_done: u32) -> Option<Duration> {
        let u = crate::keys::random_u64()
            .map(|r| (r >> 11) as f64 / (1u64 << 53) as f64)
            .unwrap_or(0.5);
        self.delay_after_with(attempts_done, u)
    }

    /// [`Schedule::delay_after`] with the random draw given: `unit` in `[0, 1]` maps onto
    /// `[1 - JITTER, 1 + JITTER]` times the nominal delay (values outside are clamped).
    pub fn delay_after_with(&self, attempts_done: u32, unit: f64) -> Option<Duration> {
        let d = self.nominal(attempts_done)?;
        let unit = if unit.is_nan() {
            0.5
        } else {
            unit.clamp(0.0, 1.0)
        };
        Some(d.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_default_is_the_spec_schedule() {
        let s = Schedule::default();
        assert_eq!(s.attempts(), 10);
        assert_eq!(s.nominal(0), Some(Duration::ZERO));
        assert_eq!(s.nominal(1), Some(Duration::from_secs(5)));
        assert_eq!(s.nominal(9), Some(Duration::from_secs(24 * 3600)));
        assert_eq!(s.nominal(10), None);
        assert_eq!(s.delay_after(10), None);
        assert_eq!(s.delay_after(0), Some(Duration::ZERO));
    }

    #[test]
    fn bad_lists_are_refused() {
        assert_eq!(Schedule::from_secs(&[]), Err(ScheduleError::Empty));
        for bad in [-1.0, f64::NAN, f64::INFINITY, MAX_DELAY_S + 1.0] {
            assert!(matches!(
                Schedule::from_secs(&[0.0, bad]),
                Err(ScheduleError::BadEntry { index: 1, .. })
            ));
        }
        let s = Schedule::from_secs(&[0.0, 0.25, 1.0]).unwrap();
        assert_eq!(s.nominal(1), Some(Duration::from_millis(250)));
    }

    #[test]
    fn draws_spread_over_the_jitter_band() {
        let s = Schedule::from_secs(&[100.0]).unwrap();
        let draws: Vec<f64> = (0..200)
            .map(|_| s.delay_after(0).unwrap().as_secs_f64())
            .collect();
        let lo = draws.iter().cloned().fold(f64::MAX, f64::min);
        let hi = draws.iter().cloned().fold(0.0, f64::max);
        // 200 uniform draws over [90, 110]: the extremes are within 2 s of the band's ends
        // except with probability about 2 * 0.9^200.
        assert!(
            (90.0..92.0).contains(&lo) && (108.0..=110.0).contains(&hi),
            "{lo} {hi}"
        );
    }

    proptest! {
        #[test]
        fn delays_stay_within_the_jitter_band(
            secs in proptest::collection::vec(0.0f64..MAX_DELAY_S, 1..20),
            done in 0u32..25,
            unit in proptest::num::f64::ANY,
        ) {
            let s = Schedule::from_secs(&secs).unwrap();
            match s.delay_after_with(done, unit) {
                None => prop_assert!(done as usize >= secs.len()),
                Some(d) => {
                    let nominal = secs[done as usize];
                    let d = d.as_secs_f64();
                    prop_assert!(d >= nominal * (1.0 - JITTER) - 1e-6, "{d} < {nominal}");
                    prop_assert!(d <= nominal * (1.0 + JITTER) + 1e-6, "{d} > {nominal}");
                }
            }
            let real = s.delay_after(done);
            prop_assert_eq!(real.is_some(), (done as usize) < secs.len());
        }
    }
}
