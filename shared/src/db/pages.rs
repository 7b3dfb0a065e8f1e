//! The bulk write path: one response's pages upserted in one statement, unchanged pages untouched.
//!
//! The batch travels as one `jsonb` parameter and is expanded with `jsonb_to_recordset`, so a
//! batch of 100 pages is one round trip. A page whose `content_hash` is unchanged is not rewritten
//! (a full run only stamps `last_seen_run` on it, which deletion detection needs).

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde::Serialize;
use uuid::Uuid;

/// One page as it is written.
#[derive(Debug, Clone, Serialize)]
pub struct PageRow {
    pub page_id: Uuid,
    pub properties: serde_json::Value,
    pub url: Option<String>,
    pub created_time: DateTime<Utc>,
    pub last_edited_time: DateTime<Utc>,
    pub created_by: Option<Uuid>,
    pub last_edited_by: Option<Uuid>,
    pub archived: bool,
    pub in_trash: bool,
    pub content_hash: String,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchCounts {
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
}

const UPSERT: &str = r#"
WITH input AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(
        page_id uuid, properties jsonb, url text, created_time timestamptz, last_edited_time timestamptz,
        created_by uuid, last_edited_by uuid, archived boolean, in_trash boolean, content_hash text)
),
existing AS (
    SELECT p.page_id, p.content_hash, p.deleted_at
    FROM notion_pages p JOIN input i ON i.page_id = p.page_id
    WHERE p.database_id = $2
),
upserted AS (
    INSERT INTO notion_pages AS p (database_id, page_id, properties, url, created_time, last_edited_time,
        created_by, last_edited_by, archived, in_trash, deleted_at, content_hash, last_seen_run,
        written_fence, synced_at)
    SELECT $2, page_id, properties, url, created_time, last_edited_time, created_by, last_edited_by,
        archived, in_trash, NULL, content_hash, $3, $4, now()
    FROM input
    ON CONFLICT (database_id, page_id) DO UPDATE SET
        properties = EXCLUDED.properties, url = EXCLUDED.url,
        created_time = EXCLUDED.created_time, last_edited_time = EXCLUDED.last_edited_time,
        created_by = EXCLUDED.created_by, last_edited_by = EXCLUDED.last_edited_by,
        archived = EXCLUDED.archived, in_trash = EXCLUDED.in_trash, deleted_at = NULL,
        content_hash = EXCLUDED.content_hash, last_seen_run = EXCLUDED.last_seen_run,
        written_fence = EXCLUDED.written_fence, synced_at = now()
    WHERE p.content_hash IS DISTINCT FROM EXCLUDED.content_hash
       OR p.deleted_at IS NOT NULL
       OR ($5 AND p.last_seen_run IS DISTINCT FROM EXCLUDED.last_seen_run)
    RETURNING p.page_id
)
SELECT
    count(*) FILTER (WHERE e.page_id IS NULL) AS created,
    count(*) FILTER (WHERE e.page_id IS NOT NULL
        AND (e.content_hash IS DISTINCT FROM i.content_hash OR e.deleted_at IS NOT NULL)) AS updated,
    count(*) FILTER (WHERE e.page_id IS NOT NULL
        AND e.content_hash = i.content_hash AND e.deleted_at IS NULL) AS unchanged,
    (SELECT count(*) FROM upserted) AS touched
FROM input i LEFT JOIN existing e ON e.page_id = i.page_id
"#;

/// Upserts `rows` (page ids must be unique within the batch) for `database_id`.
///
/// `stamp_seen` marks unchanged rows as seen by `run_id` too (full runs need it for deletions).
pub async fn upsert_batch<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    run_id: Uuid,
    fence: i64,
    stamp_seen: bool,
    rows: &[PageRow],
) -> Result<BatchCounts, DbErr> {
    if rows.is_empty() {
        return Ok(BatchCounts::default());
    }
    let batch = serde_json::to_value(rows).map_err(|e| DbErr::Custom(format!("encoding batch: {e}")))?;
    let stmt = Statement::from_sql_and_values(
        DbBackend::Postgres,
        UPSERT,
        [batch.into(), database_id.into(), run_id.into(), fence.into(), stamp_seen.into()],
    );
    let row = conn.query_one_raw(stmt).await?.ok_or_else(|| DbErr::Custom("upsert returned no row".into()))?;
    Ok(BatchCounts {
        created: row.try_get("", "created")?,
        updated: row.try_get("", "updated")?,
        unchanged: row.try_get("", "unchanged")?,
    })
}

/// After a complete full run: marks live pages that the run did not see as deleted.
pub async fn mark_unseen_deleted<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    run_id: Uuid,
) -> Result<u64, DbErr> {
    let stmt = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE notion_pages SET deleted_at = now(), synced_at = now() \
         WHERE database_id = $1 AND deleted_at IS NULL AND last_seen_run IS DISTINCT FROM $2",
        [database_id.into(), run_id.into()],
    );
    Ok(conn.execute_raw(stmt).await?.rows_affected())
}
