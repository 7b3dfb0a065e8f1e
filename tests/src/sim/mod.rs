//! `notion-sim`: a faithful stand-in for the Notion API, for tests, benchmarks and the demo.
//!
//! It follows `docs/notion-api.md`: bearer auth, the `Notion-Version` header (2022-06-28,
//! 2025-09-03 and 2026-03-11 shapes), data sources, session-scoped cursors, `page_size` ≤ 100,
//! minute-rounded timestamps with timestamp filters and sorts, Notion's error bodies, and a
//! per-token rate limit that answers 429 `rate_limited` with an integer `Retry-After`.
//! Under `/_sim/` it has an admin API: stats, a request log, mutations, the ground-truth export,
//! fault injection, cursor invalidation and runtime configuration.

mod admin;
mod api;
pub mod blocks;
pub mod comments;
pub mod data;
mod limits;
pub mod query;
mod server;
pub mod webhook;

pub use server::{SimConfig, SimServer, SimState};
