//! The end-to-end suite: real PostgreSQL, RabbitMQ and Redis, and `notion-sim` over HTTP.
//! Each test has its own database, queue names and key prefix, so they run in parallel.

mod api;
mod budget;
mod drift;
mod exactness;
mod failures;
mod full_sync;
mod locks;
mod notifications;
mod observability;
mod outages;
mod poison;
mod priorities;
mod publish;
mod publishers;
mod redis_ha;
mod schedules;
mod semantics;
mod shutdown;
mod sim_conformance;
mod startup;
mod webhooks;

/// Every wait in the suite is bounded by one of these.
pub const SHORT: std::time::Duration = std::time::Duration::from_secs(30);
pub const LONG: std::time::Duration = std::time::Duration::from_secs(120);
