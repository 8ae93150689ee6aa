//! The error a request reports when it stops retrying, and its attempt log.

use std::fmt;
use std::time::Duration;

use crate::class::Class;
use crate::policy::StopReason;

/// One attempt of a request, as recorded in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AttemptLog {
    /// 1-based attempt number.
    pub attempt: u32,
    /// How it failed; `None` for the attempt that succeeded.
    pub class: Option<Class>,
    /// The sleep that followed it, if the request was retried.
    pub delay: Option<Duration>,
    /// Whether the retry that followed was transparent (refused request).
    pub transparent: bool,
    /// Whether the attempt timed out.
    pub timed_out: bool,
    /// The error message, for failed attempts.
    pub error: Option<String>,
}

impl fmt::Display for AttemptLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.attempt)?;
        match &self.class {
            Some(c) => write!(f, " {c}")?,
            None => f.write_str(" ok")?,
        }
        if self.timed_out {
            f.write_str(" (timed out)")?;
        }
        if let Some(e) = &self.error {
            write!(f, " [{e}]")?;
        }
        if let Some(d) = self.delay {
            if self.transparent {
                f.write_str(" -> transparent retry")?;
            } else {
                write!(f, " -> retry in {} ms", d.as_millis())?;
            }
        }
        Ok(())
    }
}

/// A request that stopped retrying: why, every attempt, the time spent, and the last error.
#[derive(Debug)]
#[non_exhaustive]
pub struct RetryError<E> {
    /// Why retrying stopped.
    pub reason: StopReason,
    /// A sentence explaining the stop.
    pub detail: String,
    /// Every attempt, in order.
    pub attempts: Vec<AttemptLog>,
    /// Time from the first attempt to the stop.
    pub elapsed: Duration,
    /// The last attempt's error; `None` when it timed out.
    pub last_error: Option<E>,
}

impl<E> RetryError<E> {
    /// Whether a later, separate request might succeed (the stop came from the deadline,
    /// the budget or the attempt cap, not from a failure that retrying cannot fix).
    pub fn is_retryable(&self) -> bool {
        !matches!(self.reason, StopReason::NotRetryable)
    }

    /// The class of the last attempt.
    pub fn last_class(&self) -> Option<Class> {
        self.attempts.last().and_then(|a| a.class)
    }

    /// Maps the last error.
    pub fn map_err<F>(self, f: impl FnOnce(E) -> F) -> RetryError<F> {
        RetryError {
            reason: self.reason,
            detail: self.detail,
            attempts: self.attempts,
            elapsed: self.elapsed,
            last_error: self.last_error.map(f),
        }
    }
}

impl<E: fmt::Display> fmt::Display for RetryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gave up after {} attempt(s) in {} ms ({}: {})",
            self.attempts.len(),
            self.elapsed.as_millis(),
            self.reason,
            self.detail
        )?;
        match &self.last_error {
            Some(e) => write!(f, "; last error: {e}")?,
            None => f.write_str("; last attempt timed out")?,
        }
        f.write_str("; attempts:")?;
        for a in &self.attempts {
            write!(f, " {a};")?;
        }
        Ok(())
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RetryError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.last_error
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
