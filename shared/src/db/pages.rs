//! The bulk write path: one response's pages upserted in one statement, unchanged pages untouched,
//! and the previous version of each changed page kept in `notion_page_versions`.
//!
//! The batch travels as one array per column (`unnest`), so a batch of 100 pages is one round
//! trip and PostgreSQL parses each page's JSON exactly once. A page whose `content_hash` is unchanged is not rewritten
//! (a full run only stamps `seen_full_at` on it, which deletion detection needs).
//!
//! Deletion depends only on what a full run saw: `seen_full_at` holds the start time (on
//! PostgreSQL's clock) of the newest full run that read the page, and only full runs write it.
//! `last_seen_run` is just the last run that wrote the row.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use uuid::Uuid;

/// One page as it is written.
#[derive(Debug, Clone)]
pub struct PageRow {
    pub page_id: Uuid,
    /// The properties keyed by property id, as JSON text: serialized once, where the page was
    /// parsed, so a batch carries compact strings and binding it copies bytes instead of
    /// deep-cloning JSON trees.
    pub properties: String,
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
    SELECT page_id, properties::jsonb AS properties, NULLIF(url, '') AS url, created_time, last_edited_time,
           NULLIF(created_by, '00000000-0000-0000-0000-000000000000') AS created_by,
           NULLIF(last_edited_by, '00000000-0000-0000-0000-000000000000') AS last_edited_by,
           archived, in_trash, content_hash
    FROM unnest($5::uuid[], $6::text[], $7::text[], $8::timestamptz[], $9::timestamptz[], $10::uuid[],
                $11::uuid[], $12::boolean[], $13::boolean[], $14::text[])
        AS r(page_id, properties, url, created_time, last_edited_time, created_by, last_edited_by,
             archived, in_trash, content_hash)
),
-- Each row is looked up with one probe of the primary key, whatever the statistics say: as a
-- join, the planner scanned every row of the database per batch when its estimate was stale
-- (a new database, or a table not yet analyzed), which made a 100,000-page first sync
-- quadratic. The LIMIT keeps each lookup a parameterized subquery instead of a join.
existing AS MATERIALIZED (
    SELECT i.page_id, e.content_hash, e.deleted_at
    FROM input i CROSS JOIN LATERAL (
        SELECT p.content_hash, p.deleted_at FROM notion_pages p
        WHERE p.database_id = $1 AND p.page_id = i.page_id LIMIT 1
    ) e
),
versioned AS (
    -- The previous version of every page whose content changes (same statement snapshot, so
    -- these are the rows as they were before this batch).
    INSERT INTO notion_page_versions (database_id, page_id, properties, content_hash, last_edited_time,
        archived, in_trash, deleted_at, replaced_by_run)
    SELECT p.database_id, p.page_id, p.properties, p.content_hash, p.last_edited_time, p.archived,
        p.in_trash, p.deleted_at, $2
    FROM existing e JOIN input i ON i.page_id = e.page_id
    CROSS JOIN LATERAL (
        SELECT * FROM notion_pages p WHERE p.database_id = $1 AND p.page_id = e.page_id LIMIT 1
    ) p
    WHERE e.content_hash IS DISTINCT FROM i.content_hash
    RETURNING 1
),
upserted AS (
    INSERT INTO notion_pages AS p (database_id, page_id, properties, url, created_time, last_edited_time,
        created_by, last_edited_by, archived, in_trash, deleted_at, content_hash, last_seen_run,
        written_fence, synced_at, seen_full_at)
    SELECT $1, page_id, properties, url, created_time, last_edited_time, created_by, last_edited_by,
        archived, in_trash, NULL, content_hash, $2, $3, now(), $4::timestamptz
    FROM input
    ON CONFLICT (database_id, page_id) DO UPDATE SET
        properties = EXCLUDED.properties, url = EXCLUDED.url,
        created_time = EXCLUDED.created_time, last_edited_time = EXCLUDED.last_edited_time,
        created_by = EXCLUDED.created_by, last_edited_by = EXCLUDED.last_edited_by,
        archived = EXCLUDED.archived, in_trash = EXCLUDED.in_trash, deleted_at = NULL,
        content_hash = EXCLUDED.content_hash, last_seen_run = EXCLUDED.last_seen_run,
        written_fence = EXCLUDED.written_fence,
        -- `synced_at` is when the content was last written: a stamp alone does not move it.
        synced_at = CASE WHEN p.content_hash IS DISTINCT FROM EXCLUDED.content_hash OR p.deleted_at IS NOT NULL
                         THEN now() ELSE p.synced_at END,
        seen_full_at = GREATEST(p.seen_full_at, EXCLUDED.seen_full_at)
    WHERE p.content_hash IS DISTINCT FROM EXCLUDED.content_hash
       OR p.deleted_at IS NOT NULL
       OR ($4::timestamptz IS NOT NULL AND (p.seen_full_at IS NULL OR p.seen_full_at < $4::timestamptz))
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

/// Upserts `rows` (page ids must be unique within the batch) for `database_id`. Takes the rows
/// by value so the (large) property documents move into the statement instead of being copied.
///
/// `seen_full_at` is the start of the full run writing the batch (`None` for incremental runs):
/// every row, unchanged ones included, is stamped as seen by it.
pub async fn upsert_batch<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    run_id: Uuid,
    fence: i64,
    seen_full_at: Option<DateTime<Utc>>,
    rows: Vec<PageRow>,
) -> Result<BatchCounts, DbErr> {
    if rows.is_empty() {
        return Ok(BatchCounts::default());
    }
    // Arrays cannot carry NULLs here; '' and the nil UUID stand for them and NULLIF restores them.
    let nil = Uuid::nil();
    let mut documents = Vec::with_capacity(rows.len());
    let mut page_ids = Vec::with_capacity(rows.len());
    let mut urls = Vec::with_capacity(rows.len());
    let mut created = Vec::with_capacity(rows.len());
    let mut edited = Vec::with_capacity(rows.len());
    let mut created_by = Vec::with_capacity(rows.len());
    let mut edited_by = Vec::with_capacity(rows.len());
    let mut archived = Vec::with_capacity(rows.len());
    let mut in_trash = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    for r in rows {
        page_ids.push(r.page_id);
        documents.push(r.properties);
        urls.push(r.url.unwrap_or_default());
        created.push(r.created_time);
        edited.push(r.last_edited_time);
        created_by.push(r.created_by.unwrap_or(nil));
        edited_by.push(r.last_edited_by.unwrap_or(nil));
        archived.push(r.archived);
        in_trash.push(r.in_trash);
        hashes.push(r.content_hash);
    }
    let stmt = Statement::from_sql_and_values(
        DbBackend::Postgres,
        UPSERT,
        [
            database_id.into(),
            run_id.into(),
            fence.into(),
            seen_full_at.into(),
            page_ids.into(),
            documents.into(),
            urls.into(),
            created.into(),
            edited.into(),
            created_by.into(),
            edited_by.into(),
            archived.into(),
            in_trash.into(),
            hashes.into(),
        ],
    );
    let row =
        conn.query_one_raw(stmt).await?.ok_or_else(|| DbErr::Custom("upsert returned no row".into()))?;
    Ok(BatchCounts {
        created: row.try_get("", "created")?,
        updated: row.try_get("", "updated")?,
        unchanged: row.try_get("", "unchanged")?,
    })
}

/// Stamps pages a full run saw but could not store (they failed validation): they exist in
/// Notion, so their rows stay live.
pub async fn stamp_seen<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    seen_full_at: DateTime<Utc>,
    page_ids: Vec<Uuid>,
) -> Result<(), DbErr> {
    if page_ids.is_empty() {
        return Ok(());
    }
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE notion_pages SET seen_full_at = GREATEST(seen_full_at, $2) \
         WHERE database_id = $1 AND page_id = ANY($3)",
        [database_id.into(), seen_full_at.into(), page_ids.into()],
    ))
    .await
    .map(|_| ())
}

/// Live pages that the full run started at `run_started` (PostgreSQL's clock) did not see:
/// the candidates for deletion. A row written after the run started (by an incremental run
/// while this one was interrupted, or by a later full run) is never a candidate: this run
/// cannot tell whether it passed that page's place before the write.
pub async fn unseen<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    run_started: DateTime<Utc>,
) -> Result<Vec<Uuid>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT page_id FROM notion_pages \
             WHERE database_id = $1 AND deleted_at IS NULL \
               AND (seen_full_at IS NULL OR seen_full_at < $2) AND synced_at < $2 \
             ORDER BY seen_full_at NULLS FIRST, page_id",
            [database_id.into(), run_started.into()],
        ))
        .await?;
    rows.iter().map(|r| r.try_get("", "page_id")).collect()
}

/// Marks `page_ids` deleted, unless a write after `run_started` brought one back meanwhile.
pub async fn mark_deleted<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    run_started: DateTime<Utc>,
    page_ids: Vec<Uuid>,
) -> Result<u64, DbErr> {
    if page_ids.is_empty() {
        return Ok(0);
    }
    let stmt = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE notion_pages SET deleted_at = now(), synced_at = now() \
         WHERE database_id = $1 AND page_id = ANY($3) AND deleted_at IS NULL \
           AND (seen_full_at IS NULL OR seen_full_at < $2) AND synced_at < $2",
        [database_id.into(), run_started.into(), page_ids.into()],
    );
    Ok(conn.execute_raw(stmt).await?.rows_affected())
}

/// A page that failed validation.
#[derive(Debug, Clone)]
pub struct PageError {
    pub page_id: Option<String>,
    pub reason: String,
    pub page: Option<serde_json::Value>,
}

/// Records a batch's invalid pages in `sync_page_errors` (same transaction as the batch).
pub async fn record_errors<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    run_id: Uuid,
    errors: Vec<PageError>,
) -> Result<(), DbErr> {
    if errors.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(errors.len());
    let mut reasons = Vec::with_capacity(errors.len());
    let mut documents = Vec::with_capacity(errors.len());
    for e in errors {
        ids.push(e.page_id.unwrap_or_default());
        reasons.push(e.reason);
        documents.push(e.page.unwrap_or(serde_json::Value::Null));
    }
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO sync_page_errors (run_id, database_id, page_id, reason, page) \
         SELECT $1, $2, NULLIF(i, ''), r, NULLIF(d, 'null'::jsonb) FROM unnest($3::text[], $4::text[], $5::jsonb[]) AS t(i, r, d)",
        [run_id.into(), database_id.into(), ids.into(), reasons.into(), documents.into()],
    ))
    .await?;
    Ok(())
}
