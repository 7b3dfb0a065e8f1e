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

/// True when `fence` is still current; call first inside every write transaction.
/// Whether `fence` is still the database's fence (the row is share-locked until the transaction
/// ends), and when the PostgreSQL server answering came up.
pub async fn check_holder<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    fence: i64,
) -> Result<(bool, chrono::DateTime<chrono::Utc>), DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT (SELECT fence FROM notion_databases WHERE id = $1 FOR SHARE) AS fence, \
                    pg_postmaster_start_time() AS server_started",
            [database_id.into()],
        ))
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("no row from the fence check".into()))?;
    let current: Option<i64> = row.try_get("", "fence")?;
    Ok((current == Some(fence), row.try_get("", "server_started")?))
}

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
