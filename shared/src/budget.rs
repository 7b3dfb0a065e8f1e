//! The rate budget every Notion request waits on.
//!
//! The budget itself is a GCRA in Redis shared by every worker replica and the producer (see
//! `budget_redis`).

use std::time::Duration;

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

/// The budget every Notion request waits on (fleet-wide, in Redis).
pub type Budget = crate::budget_redis::RedisBudget;
