//! Coalesced rerun requests, kept durably in `notion_databases`.
//!
//! A job that finds its database's lock held does not run: it records a request here (in the
//! strongest mode asked for — `full` beats `incremental`) and is acked. Nothing ever drops a
//! request without serving it:
//! - a run that starts fresh takes the pending request and runs in the stronger mode;
//! - a lock holder, after releasing the lock (on every path: success, failure, shutdown),
//!   publishes one real job for a request still pending and clears it only if no newer request
//!   arrived meanwhile (compare on `rerun_seq`);
//! - a requester sets the request *before* its last try for the lock, so a holder that releases
//!   in between either sees the request or leaves the lock free for the requester;
//! - the scheduler's reaper publishes a job for a request left pending with no active run.
//!
//! A burst of jobs during one run therefore costs at most one more run. A request from a
//! high-priority job (`rerun_high`) is published high too, so coalescing never moves a manual,
//! API or webhook request behind a scheduled backlog.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use uuid::Uuid;

use crate::job::{Priority, SyncMode};

/// A pending request: the mode to run, whether any requester was high priority, and the
/// sequence number it was read at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub mode: SyncMode,
    pub high: bool,
    pub seq: i64,
}

impl Pending {
    pub fn priority(&self) -> Priority {
        if self.high { Priority::High } else { Priority::Normal }
    }
}

fn parse_mode(mode: &str) -> SyncMode {
    if mode == SyncMode::Full.as_str() { SyncMode::Full } else { SyncMode::Incremental }
}

/// The stronger of two modes: a full run does everything an incremental one does, and finds
/// deletions too.
pub fn strongest(a: SyncMode, b: SyncMode) -> SyncMode {
    if a == SyncMode::Full || b == SyncMode::Full { SyncMode::Full } else { SyncMode::Incremental }
}

/// Records a request for one more run of `database_id` in `mode` at `priority` (merged with any
/// pending one: the stronger mode, and high if either is).
pub async fn request<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    mode: SyncMode,
    priority: Priority,
) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE notion_databases SET \
             rerun_mode = CASE WHEN rerun_mode = 'full' OR $2 = 'full' THEN 'full' ELSE 'incremental' END, \
             rerun_high = (rerun_mode IS NOT NULL AND rerun_high) OR $3, \
             rerun_seq = rerun_seq + 1, rerun_requested_at = COALESCE(rerun_requested_at, now()) \
         WHERE id = $1",
        [database_id.into(), mode.as_str().into(), (priority == Priority::High).into()],
    ))
    .await
    .map(|_| ())
}

/// The pending request, if any.
pub async fn pending<C: ConnectionTrait>(conn: &C, database_id: Uuid) -> Result<Option<Pending>, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT rerun_mode, rerun_high, rerun_seq FROM notion_databases WHERE id = $1 AND rerun_mode IS NOT NULL",
            [database_id.into()],
        ))
        .await?;
    row.map(|r| {
        let mode: String = r.try_get("", "rerun_mode")?;
        Ok(Pending {
            mode: parse_mode(&mode),
            high: r.try_get("", "rerun_high")?,
            seq: r.try_get("", "rerun_seq")?,
        })
    })
    .transpose()
}

/// Clears the request read as `pending`, unless a newer one arrived since (then it stays, and is
/// served by the next taker). Returns whether it was cleared.
pub async fn clear<C: ConnectionTrait>(conn: &C, database_id: Uuid, pending: Pending) -> Result<bool, DbErr> {
    let result = conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_databases SET rerun_mode = NULL, rerun_high = false, rerun_requested_at = NULL \
             WHERE id = $1 AND rerun_seq = $2",
            [database_id.into(), pending.seq.into()],
        ))
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Takes (reads and clears) the pending request in one statement; for a run about to start.
pub async fn take<C: ConnectionTrait>(conn: &C, database_id: Uuid) -> Result<Option<SyncMode>, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_databases d SET rerun_mode = NULL, rerun_high = false, rerun_requested_at = NULL \
             FROM (SELECT id, rerun_mode FROM notion_databases WHERE id = $1 FOR UPDATE) old \
             WHERE d.id = old.id AND old.rerun_mode IS NOT NULL \
             RETURNING old.rerun_mode",
            [database_id.into()],
        ))
        .await?;
    row.map(|r| r.try_get::<String>("", "rerun_mode").map(|m| parse_mode(&m))).transpose()
}

/// Databases with a request pending for longer than `older_than` and no run running or
/// retrying, nor one queued recently (a queued row older than ten minutes is most likely a job
/// whose publish never happened; a duplicate of a real one is coalesced, never lost): requests
/// whose taker vanished. `(database id, integration, mode)`.
pub async fn stranded<C: ConnectionTrait>(
    conn: &C,
    older_than: std::time::Duration,
) -> Result<Vec<(Uuid, String, Pending)>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT d.id, d.integration, d.rerun_mode, d.rerun_high, d.rerun_seq FROM notion_databases d \
             WHERE d.rerun_mode IS NOT NULL AND d.rerun_requested_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM sync_runs r WHERE r.database_id = d.id \
                               AND (r.status IN ('running', 'retrying') \
                                    OR (r.status = 'queued' AND r.enqueued_at > now() - interval '10 minutes')))",
            [older_than.as_secs_f64().into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            let mode: String = r.try_get("", "rerun_mode")?;
            Ok((
                r.try_get("", "id")?,
                r.try_get("", "integration")?,
                Pending {
                    mode: parse_mode(&mode),
                    high: r.try_get("", "rerun_high")?,
                    seq: r.try_get("", "rerun_seq")?,
                },
            ))
        })
        .collect()
}
