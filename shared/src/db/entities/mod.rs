//! sea-orm entities of the durable tables. Bulk page writes use SQL in [`super::pages`] instead.

pub mod integration;
pub mod notion_database;
pub mod sync_run;
