//! syncfleet producer: the operator CLI (migrate, integrations, databases, enqueue, status) and
//! publishing of sync jobs. `main.rs` parses arguments and calls [`cli::run`].
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod api;
pub mod cli;
pub mod commands;
pub mod publish;
pub mod schedule;
