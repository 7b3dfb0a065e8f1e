//! One module per CLI command.

pub mod database;
pub mod enqueue;
pub mod integration;
pub mod migrate;
pub mod runs;
pub mod schedules;
pub mod serve;
pub mod status;
pub mod webhook;
