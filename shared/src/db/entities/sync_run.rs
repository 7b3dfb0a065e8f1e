//! `sync_runs`: one row per job id, with its status, counters and checkpoint.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "sync_runs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub database_id: Uuid,
    pub integration: String,
    pub mode: String,
    pub reason: String,
    pub status: String,
    pub attempt: i32,
    pub worker: Option<String>,
    pub enqueued_at: ChronoDateTimeUtc,
    pub started_at: Option<ChronoDateTimeUtc>,
    pub finished_at: Option<ChronoDateTimeUtc>,
    pub requests: i64,
    pub rate_limited: i64,
    pub pages_seen: i64,
    pub pages_created: i64,
    pub pages_updated: i64,
    pub pages_unchanged: i64,
    pub pages_deleted: i64,
    pub pages_invalid: i64,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    pub checkpoint: Option<Json>,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

/// Run statuses, as stored.
pub mod status {
    pub const QUEUED: &str = "queued";
    pub const RUNNING: &str = "running";
    pub const RETRYING: &str = "retrying";
    pub const SUCCEEDED: &str = "succeeded";
    pub const PARTIAL: &str = "partial";
    pub const FAILED: &str = "failed";
    pub const SKIPPED: &str = "skipped";

    /// A run in one of these states will not change again.
    pub fn is_final(status: &str) -> bool {
        matches!(status, SUCCEEDED | PARTIAL | FAILED | SKIPPED)
    }
}
