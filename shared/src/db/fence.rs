//! Fencing tokens: every lock acquisition takes the next fence of the database, and every write
//! transaction first checks (under `FOR SHARE`, which also holds off the next increment until it
//! commits) that its fence is still the current one. A stale writer is rejected in SQL.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use uuid::Uuid;

/// Increments and returns the database's fence.
pub async fn next<C: ConnectionTrait>(conn: &C, database_id: Uuid) -> Result<i64, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_databases SET fence = fence + 1 WHERE id = $1 RETURNING fence",
            [database_id.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("database {database_id}")))?;
    row.try_get("", "fence")
}

/// What a write transaction learns about its lock and server before it writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holder {
    /// `fence` is still the database's fence (the row is share-locked until the transaction ends).
    pub current: bool,
    /// When the PostgreSQL server answering came up.
    pub server_started: chrono::DateTime<chrono::Utc>,
    /// The attempt's marker (see [`mark_attempt`]) is still there: no crash recovery since.
    pub marked: bool,
}

/// Reads [`Holder`]; call first inside every write transaction.
pub async fn check_holder<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    fence: i64,
) -> Result<Holder, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT (SELECT fence FROM notion_databases WHERE id = $1 FOR SHARE) AS fence, \
                    pg_postmaster_start_time() AS server_started, \
                    EXISTS (SELECT 1 FROM sync_attempt_markers WHERE database_id = $1 AND fence = $2) AS marked",
            [database_id.into(), fence.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("no row from the fence check".into()))?;
    let current: Option<i64> = row.try_get("", "fence")?;
    Ok(Holder {
        current: current == Some(fence),
        server_started: row.try_get("", "server_started")?,
        marked: row.try_get("", "marked")?,
    })
}

/// Marks the attempt holding `fence` in the UNLOGGED `sync_attempt_markers` (PostgreSQL empties
/// it in crash recovery), dropping the markers of earlier holders of the database.
pub async fn mark_attempt<C: ConnectionTrait>(conn: &C, database_id: Uuid, fence: i64) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "WITH earlier AS (DELETE FROM sync_attempt_markers WHERE database_id = $1 AND fence < $2) \
         INSERT INTO sync_attempt_markers (database_id, fence) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        [database_id.into(), fence.into()],
    ))
    .await
    .map(|_| ())
}

/// True when `fence` is still current; call first inside every write transaction.
pub async fn is_current<C: ConnectionTrait>(conn: &C, database_id: Uuid, fence: i64) -> Result<bool, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT fence FROM notion_databases WHERE id = $1 FOR SHARE",
            [database_id.into()],
        ))
        .await?;
    Ok(match row {
        Some(row) => row.try_get::<i64>("", "fence")? == fence,
        None => false,
    })
}
