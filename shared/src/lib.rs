//! Shared by the syncfleet producer and worker: the job contract, settings, the Notion client,
//! the rate budget, AMQP topology and publishing, and the PostgreSQL schema.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod amqp;
pub mod budget;
pub mod config;
pub mod crypto;
pub mod db;
pub mod hashing;
pub mod job;
pub mod lock;
pub mod mapping;
pub mod metrics;
pub mod notify;
pub mod notion;
pub mod ops;
pub mod redis_pool;
pub mod retry;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod webhook;

pub use config::{ConfigError, Settings};
