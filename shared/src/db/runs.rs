//! `sync_runs` bookkeeping: one row per job id, updated in the same transaction as each batch.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::entities::sync_run::status;
use crate::job::JobEnvelope;

/// Where a run got to: the sort timestamp and id of the last page of the last committed batch.
///
/// A resumed run restarts its query at `sort_time` (Notion filters are minute-granular and
/// inclusive, and upserts are idempotent), never from a Notion cursor, which is session-scoped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub sort_time: DateTime<Utc>,
    pub page_id: Uuid,
    /// Notion's clock when the run first started; the watermark is derived from it.
    pub run_started: DateTime<Utc>,
    /// A full run split into disjoint `created_time` ranges keeps each range's progress here
    /// (`sort_time` is then the least progress of the unfinished ranges).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<RangeState>,
}

/// One `created_time` range `[lo, hi)` of a split full run and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeState {
    pub lo: Option<DateTime<Utc>>,
    pub hi: Option<DateTime<Utc>>,
    /// Where a resumed read of this range starts (inclusive).
    pub from: Option<DateTime<Utc>>,
    pub done: bool,
}

/// Counter increments for one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunDelta {
    pub requests: i64,
    pub rate_limited: i64,
    pub seen: i64,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub deleted: i64,
    pub invalid: i64,
}

impl std::ops::AddAssign for RunDelta {
    fn add_assign(&mut self, d: RunDelta) {
        self.requests += d.requests;
        self.rate_limited += d.rate_limited;
        self.seen += d.seen;
        self.created += d.created;
        self.updated += d.updated;
        self.unchanged += d.unchanged;
        self.deleted += d.deleted;
        self.invalid += d.invalid;
    }
}

/// What a worker finds when it starts a job.
#[derive(Debug, Clone, PartialEq)]
pub enum StartOutcome {
    /// The run already reached a final state (a redelivery): ack without rerunning.
    AlreadyFinal(String),
    /// The attempt is recorded; resume from the checkpoint when there is one.
    Started { checkpoint: Option<Checkpoint> },
}

/// The job's identifying columns ($1..$5: id, database, integration, mode, reason), then `more`.
fn job_values<const N: usize>(job: &JobEnvelope, more: [sea_orm::Value; N]) -> Vec<sea_orm::Value> {
    let mut values = vec![
        job.id.into(),
        job.data.database_id.into(),
        job.data.integration.clone().into(),
        job.data.mode.as_str().into(),
        job.data.reason.as_str().into(),
    ];
    values.extend(more);
    values
}

/// Inserts a `queued` row for a job about to be published (no-op if it exists).
pub async fn insert_queued<C: ConnectionTrait>(conn: &C, job: &JobEnvelope) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO sync_runs (id, database_id, integration, mode, reason, status, enqueued_at) \
         VALUES ($1, $2, $3, $4, $5, 'queued', COALESCE($6, now())) ON CONFLICT (id) DO NOTHING",
        job_values(job, [job.time.into()]),
    ))
    .await
    .map(|_| ())
}

/// Records that `worker` starts `attempt` of a job, unless the run is already final.
pub async fn start_attempt<C: ConnectionTrait>(
    conn: &C,
    job: &JobEnvelope,
    attempt: u32,
    worker: &str,
) -> Result<StartOutcome, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO sync_runs (id, database_id, integration, mode, reason, status, attempt, worker, \
                 enqueued_at, started_at) \
             VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, COALESCE($8, now()), now()) \
             ON CONFLICT (id) DO UPDATE SET status = 'running', attempt = EXCLUDED.attempt, \
                 worker = EXCLUDED.worker, started_at = COALESCE(sync_runs.started_at, now()), \
                 finished_at = NULL, error_kind = NULL, error_message = NULL \
             WHERE sync_runs.status NOT IN ('succeeded', 'partial', 'failed', 'skipped') \
             RETURNING checkpoint",
            job_values(job, [(attempt as i32).into(), worker.into(), job.time.into()]),
        ))
        .await?;
    match row {
        Some(row) => {
            let checkpoint: Option<serde_json::Value> = row.try_get("", "checkpoint")?;
            let checkpoint = checkpoint.and_then(|v| serde_json::from_value(v).ok());
            Ok(StartOutcome::Started { checkpoint })
        }
        None => {
            let status = current_status(conn, job.id).await?.unwrap_or_else(|| status::SUCCEEDED.into());
            Ok(StartOutcome::AlreadyFinal(status))
        }
    }
}

/// The status of a run, if the run exists.
pub async fn current_status<C: ConnectionTrait>(conn: &C, run_id: Uuid) -> Result<Option<String>, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT status FROM sync_runs WHERE id = $1",
            [run_id.into()],
        ))
        .await?;
    row.map(|r| r.try_get("", "status")).transpose()
}

/// Adds a batch's counters and moves the checkpoint; call inside the batch's transaction.
pub async fn record_progress<C: ConnectionTrait>(
    conn: &C,
    run_id: Uuid,
    delta: &RunDelta,
    checkpoint: Option<&Checkpoint>,
) -> Result<(), DbErr> {
    let checkpoint = checkpoint.and_then(|c| serde_json::to_value(c).ok());
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE sync_runs SET requests = requests + $2, rate_limited = rate_limited + $3, \
             pages_seen = pages_seen + $4, pages_created = pages_created + $5, \
             pages_updated = pages_updated + $6, pages_unchanged = pages_unchanged + $7, \
             pages_deleted = pages_deleted + $8, pages_invalid = pages_invalid + $9, \
             checkpoint = COALESCE($10, checkpoint) \
         WHERE id = $1",
        [
            run_id.into(),
            delta.requests.into(),
            delta.rate_limited.into(),
            delta.seen.into(),
            delta.created.into(),
            delta.updated.into(),
            delta.unchanged.into(),
            delta.deleted.into(),
            delta.invalid.into(),
            checkpoint.into(),
        ],
    ))
    .await
    .map(|_| ())
}

/// Moves a run to `status` with an optional error; `finished_at` is set for final states.
pub async fn set_status<C: ConnectionTrait>(
    conn: &C,
    run_id: Uuid,
    new_status: &str,
    error: Option<(&str, &str)>,
) -> Result<(), DbErr> {
    let finished = status::is_final(new_status);
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE sync_runs SET status = $2, error_kind = $3, error_message = $4, \
             finished_at = CASE WHEN $5 THEN now() ELSE finished_at END \
         WHERE id = $1",
        [
            run_id.into(),
            new_status.into(),
            error.map(|e| e.0.to_string()).into(),
            error.map(|e| e.1.to_string()).into(),
            finished.into(),
        ],
    ))
    .await
    .map(|_| ())
}

/// Records a job that found its database busy as `skipped` (a rerun was requested instead).
pub async fn mark_skipped<C: ConnectionTrait>(
    conn: &C,
    job: &JobEnvelope,
    attempt: u32,
) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO sync_runs (id, database_id, integration, mode, reason, status, attempt, enqueued_at, finished_at, \
             error_kind, error_message) \
         VALUES ($1, $2, $3, $4, $5, 'skipped', $6, COALESCE($7, now()), now(), 'database_busy', \
             'another sync of this database was running; it will run one more incremental pass') \
         ON CONFLICT (id) DO UPDATE SET status = 'skipped', attempt = EXCLUDED.attempt, finished_at = now(), \
             error_kind = EXCLUDED.error_kind, error_message = EXCLUDED.error_message \
         WHERE sync_runs.status NOT IN ('succeeded', 'partial', 'failed', 'skipped')",
        job_values(job, [(attempt as i32).into(), job.time.into()]),
    ))
    .await
    .map(|_| ())
}
