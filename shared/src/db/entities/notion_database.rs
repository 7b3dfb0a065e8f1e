//! `notion_databases`: a mirrored Notion database, its data source, schema, watermark and fence.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "notion_databases")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub integration: String,
    pub data_source_id: Uuid,
    pub title: String,
    /// Unique, SQL-safe name used for the per-database typed view.
    pub slug: String,
    #[sea_orm(column_type = "JsonBinary")]
    pub schema: Json,
    pub schema_hash: String,
    pub sync_interval_secs: Option<i32>,
    /// Incremental syncs read from `watermark - overlap`.
    pub watermark: Option<ChronoDateTimeUtc>,
    /// Incremented on every lock acquisition; writes carry it.
    pub fence: i64,
    pub last_success_at: Option<ChronoDateTimeUtc>,
    /// Operator-configured column names, skipped properties and transforms (see `mapping`).
    #[sea_orm(column_type = "JsonBinary")]
    pub mapping: Json,
    /// Hash of what the typed view was last generated from.
    pub view_hash: String,
    pub created_at: ChronoDateTimeUtc,
    pub updated_at: ChronoDateTimeUtc,
    /// The strongest sync mode asked for by jobs that found the database busy, until a run
    /// takes it (`db::rerun`).
    pub rerun_mode: Option<String>,
    pub rerun_seq: i64,
    pub rerun_requested_at: Option<ChronoDateTimeUtc>,
    /// Why the typed view could not be regenerated last time (a dependent view, a lock), if so.
    pub view_error: Option<String>,
    /// A disabled database is not scheduled (manual jobs still run).
    pub enabled: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
