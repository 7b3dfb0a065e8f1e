//! The rate budget every Notion request waits on.
//!
//! [`Budget::Redis`] is the fleet-wide budget every worker replica and the producer share (see
//! `budget_redis`). [`LocalBudget`] is the same GCRA inside one process, for tools that run
//! without Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::budget_redis::BudgetError;

/// Which budget a request draws from, and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetKey {
    pub integration: String,
    /// Requests per second.
    pub rate: f64,
    /// Requests that may go back to back after a quiet period.
    pub burst: u32,
}

impl BudgetKey {
    /// Time between two requests at the configured rate.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate.max(0.001))
    }
    /// How far ahead of schedule a burst may run.
    pub fn tolerance(&self) -> Duration {
        self.interval() * self.burst.saturating_sub(1)
    }
}

/// A rate budget shared by the tasks that hold a clone.
#[derive(Debug, Clone)]
pub enum Budget {
    /// Shared by the whole fleet through Redis.
    Redis(crate::budget_redis::RedisBudget),
    Local(LocalBudget),
    /// No pacing at all (benchmarks against an unthrottled simulator).
    Unlimited,
}

impl Budget {
    pub fn local() -> Self {
        Budget::Local(LocalBudget::default())
    }

    /// Waits (sleeping, never spinning) until this caller may send its next request.
    pub async fn acquire(&self, key: &BudgetKey) -> Result<(), BudgetError> {
        match self {
            Budget::Redis(b) => b.acquire(key).await,
            Budget::Local(b) => {
                let wait = b.reserve(key);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok(())
            }
            Budget::Unlimited => Ok(()),
        }
    }

    /// No request may start for `retry_after` (a 429/529 from Notion).
    pub async fn pause(&self, key: &BudgetKey, retry_after: Duration) -> Result<(), BudgetError> {
        match self {
            Budget::Redis(b) => b.pause(key, retry_after).await,
            Budget::Local(b) => {
                b.pause(key, retry_after);
                Ok(())
            }
            Budget::Unlimited => {
                tokio::time::sleep(retry_after).await;
                Ok(())
            }
        }
    }
}

/// GCRA state per integration: the theoretical arrival time of the next request.
#[derive(Debug, Clone, Default)]
pub struct LocalBudget {
    tat: Arc<Mutex<HashMap<String, Instant>>>,
}

impl LocalBudget {
    /// Reserves the next slot; returns how long until it.
    pub fn reserve(&self, key: &BudgetKey) -> Duration {
        let now = Instant::now();
        let mut map = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let tat = map.get(&key.integration).copied().unwrap_or(now).max(now);
        let allowed_at = tat.checked_sub(key.tolerance()).unwrap_or(now).max(now);
        map.insert(key.integration.clone(), tat + key.interval());
        allowed_at - now
    }

    fn pause(&self, key: &BudgetKey, retry_after: Duration) {
        let now = Instant::now();
        let mut map = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let resume = now + retry_after + key.tolerance();
        let entry = map.entry(key.integration.clone()).or_insert(now);
        if *entry < resume {
            *entry = resume;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> BudgetKey {
        BudgetKey { integration: "acme".into(), rate: 3.0, burst: 3 }
    }

    #[tokio::test(start_paused = true)]
    async fn admits_a_burst_then_paces_at_the_rate() {
        let budget = LocalBudget::default();
        let mut waits = Vec::new();
        for _ in 0..6 {
            waits.push(budget.reserve(&key()));
        }
        let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
        assert_eq!(&ms[..3], &[0, 0, 0]);
        assert_eq!(ms[3], 333);
        assert_eq!(ms[5], 999);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_caller_for_retry_after() {
        let budget = LocalBudget::default();
        budget.pause(&key(), Duration::from_secs(2));
        assert!(budget.reserve(&key()) >= Duration::from_secs(2));
        assert!(budget.reserve(&key()) >= Duration::from_secs(2));
    }
}
