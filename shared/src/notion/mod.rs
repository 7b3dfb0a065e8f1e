//! The Notion API as syncfleet uses it: typed objects, an HTTP client, and error classes.
//!
//! The same code talks to `https://api.notion.com` and to `notion-sim`; only the base URL differs.

mod client;
mod error;
mod session;
pub mod types;

pub use client::{Endpoint, NotionClient, Response};
pub use error::{FailureClass, NotionError};
pub use session::{NotionSession, RequestStats};

/// The `Notion-Version` syncfleet speaks by default (data sources API).
pub const NOTION_VERSION: &str = "2025-09-03";
/// The older version many clients still send; `notion-sim` serves it too.
pub const NOTION_VERSION_LEGACY: &str = "2022-06-28";
/// The newest version: `in_trash`/`is_archived` carry the meaning, `archived` is kept for compatibility.
pub const NOTION_VERSION_2026: &str = "2026-03-11";
/// Largest `page_size` Notion accepts.
pub const MAX_PAGE_SIZE: u8 = 100;
