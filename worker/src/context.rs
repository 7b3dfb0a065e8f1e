//! What every job task of a worker process shares.

use std::sync::Arc;

use sea_orm::DatabaseConnection;
use syncfleet_shared::Settings;
use syncfleet_shared::amqp::{Publisher, Topology};
use syncfleet_shared::budget::Budget;
use syncfleet_shared::crypto::TokenCipher;
use syncfleet_shared::metrics::Metrics;
use syncfleet_shared::notion::NotionClient;

pub struct WorkerContext {
    pub settings: Settings,
    pub db: DatabaseConnection,
    pub notion: NotionClient,
    pub budget: Budget,
    /// `None` when no key is configured: jobs then fail with a configuration error.
    pub cipher: Option<TokenCipher>,
    /// Confirmed publishing for retry tiers, dead letters and coalesced reruns.
    pub publisher: Publisher,
    pub topology: Topology,
    /// Coordination state (rate budgets, locks) lives in Redis.
    pub redis: syncfleet_shared::redis_pool::RedisPool,
    pub worker_id: String,
    pub metrics: Arc<Metrics>,
    /// Announces permanent failures (a no-op without `notify.webhook_url`).
    pub notifier: syncfleet_shared::notify::Notifier,
}

impl WorkerContext {
    /// The lock's lease.
    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.settings.worker.lease_secs)
    }

    /// How long a `running` run may go without a heartbeat before another attempt may take its
    /// bookkeeping over (its holder is gone: the lease would have been renewed otherwise).
    pub fn stale_holder(&self) -> std::time::Duration {
        self.lease() * 2
    }
}
