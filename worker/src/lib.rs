//! syncfleet worker: consumes sync jobs from RabbitMQ and mirrors Notion data sources into
//! PostgreSQL. The binary only loads settings and calls [`Worker::build`] and
//! [`Worker::run_until`]; tests drive the same code in-process.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod chains;
pub mod error;
pub mod handler;
pub mod schema;
pub mod sync;
pub mod transform;
pub mod worker;

pub use worker::{Worker, WorkerError};
