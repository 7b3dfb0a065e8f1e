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
    /// The fence of the lock holder that executes (or last executed) the run; only that holder
    /// may change its status.
    pub fence: Option<i64>,
    /// Refreshed by the holder while the run executes; a stale one means the holder is gone.
    pub heartbeat_at: Option<ChronoDateTimeUtc>,
    /// Set once a failed run's message is confirmed in the dead-letter queue.
    pub dead_lettered_at: Option<ChronoDateTimeUtc>,
    /// Deletion candidates confirmed with `GET /v1/pages/{id}`, and those found live.
    pub deletion_checks: i64,
    pub deletions_refuted: i64,
    /// Incremented by a trigger on every change; the id of the run's progress events.
    pub change_seq: i64,
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
    /// Its holder vanished (found by the reaper). Not final: a redelivery of the job resumes it,
    /// but the scheduler no longer counts it as active.
    pub const ABANDONED: &str = "abandoned";

    /// A run in one of these states will not change again.
    pub fn is_final(status: &str) -> bool {
        matches!(status, SUCCEEDED | PARTIAL | FAILED | SKIPPED)
    }
}
