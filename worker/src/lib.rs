//! syncfleet worker: consumes sync jobs from RabbitMQ and mirrors Notion data sources into
//! PostgreSQL. The binary only loads settings and calls [`Worker::build`] and
//! [`Worker::run_until`]; tests drive the same code in-process.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

// The job path, stage by stage: consume → run → sync → write.
pub mod consume;
pub mod run;
pub mod sync;
pub mod write;

pub mod chains;
pub mod context;
pub mod error;
pub mod policy;
pub mod schema;
pub mod share;
pub mod transform;

pub use consume::{Worker, WorkerError};
