//! A retry budget shared by all requests to one host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::BudgetConfig;

/// A token bucket shared by clones. Retries withdraw tokens, successes deposit some back.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: BudgetConfig,
    tokens: AtomicU32,
}

impl RetryBudget {
    /// A full bucket.
    pub fn new(cfg: BudgetConfig) -> Self {
        let tokens = AtomicU32::new(cfg.capacity);
        Self {
            inner: Arc::new(Inner { cfg, tokens }),
        }
    }

    /// Tokens left (the capacity when the budget is disabled).
    pub fn available(&self) -> u32 {
        if self.inner.cfg.enabled {
            self.inner.tokens.load(Ordering::Relaxed)
        } else {
            self.inner.cfg.capacity
        }
    }

    /// Takes the cost of one retry (a timeout retry costs more). Returns false, taking
    /// nothing, when the bucket cannot pay.
    pub fn try_withdraw(&self, after_timeout: bool) -> bool {
        let cfg = &self.inner.cfg;
        if !cfg.enabled {
            return true;
        }
        let cost = if after_timeout {
            cfg.timeout_retry_cost
        } else {
            cfg.retry_cost
        };
        self.inner
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(cost))
            .is_ok()
    }

    /// Returns the refund of one success to the bucket, up to its capacity.
    pub fn deposit_success(&self) {
        let cfg = &self.inner.cfg;
        if !cfg.enabled || cfg.success_refund == 0 {
            return;
        }
        let _ = self
            .inner
            .tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(cfg.success_refund).min(cfg.capacity))
            });
    }
}

/// One budget per host, created on first use.
#[derive(Debug, Default)]
pub(crate) struct Budgets {
    cfg: BudgetConfig,
    by_host: Mutex<HashMap<String, RetryBudget>>,
}

impl Budgets {
    pub(crate) fn new(cfg: BudgetConfig) -> Self {
        Self {
            cfg,
            by_host: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn get(&self, host: &str) -> RetryBudget {
        // A poisoned lock only means another thread panicked while inserting; the map is
        // still consistent, so keep using it.
        let mut map = self.by_host.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(host.to_owned())
            .or_insert_with(|| RetryBudget::new(self.cfg.clone()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withdraw_until_empty_then_refund() {
        let b = RetryBudget::new(BudgetConfig {
            capacity: 12,
            retry_cost: 5,
            timeout_retry_cost: 10,
            success_refund: 1,
            enabled: true,
        });
        assert!(b.try_withdraw(false));
        assert!(b.try_withdraw(false));
        assert!(!b.try_withdraw(false));
        assert_eq!(b.available(), 2);
        for _ in 0..20 {
            b.deposit_success();
        }
        assert_eq!(b.available(), 12);
        assert!(b.try_withdraw(true));
        assert!(!b.try_withdraw(true));
    }

    #[test]
    fn disabled_budget_always_pays() {
        let b = RetryBudget::new(BudgetConfig {
            enabled: false,
            ..BudgetConfig::default()
        });
        for _ in 0..1000 {
            assert!(b.try_withdraw(true));
        }
    }

    #[test]
    fn budgets_are_shared_per_host() {
        let budgets = Budgets::new(BudgetConfig::default());
        let a = budgets.get("a");
        assert!(a.try_withdraw(false));
        assert_eq!(budgets.get("a").available(), 495);
        assert_eq!(budgets.get("b").available(), 500);
    }
}
