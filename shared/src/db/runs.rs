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
    /// `GET /v1/pages/{id}` confirmations of deletion candidates, and candidates found live.
    pub deletion_checks: i64,
    pub deletions_refuted: i64,
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
        self.deletion_checks += d.deletion_checks;
        self.deletions_refuted += d.deletions_refuted;
    }
}

/// What a worker finds when it starts a job.
#[derive(Debug, Clone, PartialEq)]
pub enum StartOutcome {
    /// The run already reached a final state (a redelivery): ack without rerunning — unless it
    /// failed and its dead letter was never confirmed, which is then sent again.
    AlreadyFinal { status: String, dead_lettered: bool },
    /// The attempt is recorded under the caller's fence.
    Started(Started),
}

/// A started (or resumed) attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    /// Where to resume, when an earlier attempt committed progress.
    pub checkpoint: Option<Checkpoint>,
    /// The run's mode as stored: a coalesced `full` request can upgrade an incremental job, and a
    /// retry of it must stay full.
    pub mode: String,
    /// When the run first started, on PostgreSQL's clock (kept across attempts). A full run's
    /// deletion scan only trusts rows written before it.
    pub started_at: DateTime<Utc>,
    /// When the PostgreSQL server this attempt started on came up (`pg_postmaster_start_time()`).
    /// Intermediate batches commit without waiting for the WAL; if the server restarts (or fails
    /// over) mid-run, some of them may be lost, so every later write checks this is unchanged.
    pub server_started: DateTime<Utc>,
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
        "INSERT INTO sync_runs (id, database_id, integration, mode, reason, status, enqueued_at, priority) \
         VALUES ($1, $2, $3, $4, $5, 'queued', COALESCE($6, now()), $7) ON CONFLICT (id) DO NOTHING",
        job_values(job, [job.time.into(), job.data.priority.as_str().into()]),
    ))
    .await
    .map(|_| ())
}

/// Records that `worker`, holding the database's lock with `fence`, starts `attempt` of a job,
/// unless the run is already final or a newer holder has started it.
pub async fn start_attempt<C: ConnectionTrait>(
    conn: &C,
    job: &JobEnvelope,
    attempt: u32,
    worker: &str,
    fence: i64,
) -> Result<StartOutcome, DbErr> {
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO sync_runs (id, database_id, integration, mode, reason, status, attempt, worker, \
                 enqueued_at, started_at, fence, heartbeat_at) \
             VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, COALESCE($8, now()), now(), $9, now()) \
             ON CONFLICT (id) DO UPDATE SET status = 'running', attempt = EXCLUDED.attempt, \
                 worker = EXCLUDED.worker, started_at = COALESCE(sync_runs.started_at, now()), \
                 fence = EXCLUDED.fence, heartbeat_at = now(), \
                 finished_at = NULL, error_kind = NULL, error_message = NULL \
             WHERE sync_runs.status NOT IN ('succeeded', 'partial', 'failed', 'skipped') \
               AND (sync_runs.fence IS NULL OR sync_runs.fence < EXCLUDED.fence) \
             RETURNING checkpoint, mode, started_at, pg_postmaster_start_time() AS server_started",
            job_values(job, [(attempt as i32).into(), worker.into(), job.time.into(), fence.into()]),
        ))
        .await?;
    match row {
        Some(row) => {
            let checkpoint: Option<serde_json::Value> = row.try_get("", "checkpoint")?;
            let checkpoint = checkpoint.and_then(|v| serde_json::from_value(v).ok());
            Ok(StartOutcome::Started(Started {
                checkpoint,
                mode: row.try_get("", "mode")?,
                started_at: row.try_get("", "started_at")?,
                server_started: row.try_get("", "server_started")?,
            }))
        }
        None => {
            let row = conn
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT status, dead_lettered_at IS NOT NULL AS dead_lettered FROM sync_runs WHERE id = $1",
                    [job.id.into()],
                ))
                .await?
                .ok_or_else(|| DbErr::RecordNotFound(format!("run {}", job.id)))?;
            let status: String = row.try_get("", "status")?;
            if !status::is_final(&status) {
                // A newer holder started this run: this delivery is a stale duplicate.
                return Err(DbErr::Custom(format!("run {} is held by a newer fence", job.id)));
            }
            Ok(StartOutcome::AlreadyFinal { status, dead_lettered: row.try_get("", "dead_lettered")? })
        }
    }
}

/// Upgrades a started run to `mode` (a coalesced full request taken by an incremental job).
pub async fn set_mode<C: ConnectionTrait>(
    conn: &C,
    run_id: Uuid,
    fence: i64,
    mode: &str,
) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE sync_runs SET mode = $3 WHERE id = $1 AND fence = $2",
        [run_id.into(), fence.into(), mode.into()],
    ))
    .await
    .map(|_| ())
}

/// The run's row, if it exists.
pub async fn find<C: ConnectionTrait>(
    conn: &C,
    run_id: Uuid,
) -> Result<Option<super::entities::sync_run::Model>, DbErr> {
    use sea_orm::EntityTrait;
    super::entities::sync_run::Entity::find_by_id(run_id).one(conn).await
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
             deletion_checks = deletion_checks + $11, deletions_refuted = deletions_refuted + $12, \
             checkpoint = COALESCE($10, checkpoint), heartbeat_at = now(), \
             status = CASE WHEN status = 'abandoned' THEN 'running' ELSE status END \
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
            delta.deletion_checks.into(),
            delta.deletions_refuted.into(),
        ],
    ))
    .await
    .map(|_| ())
}

/// A status change with its optional error (`kind`, `message`).
#[derive(Debug, Clone, Copy)]
pub struct StatusChange<'a> {
    pub status: &'a str,
    pub error: Option<(&'a str, &'a str)>,
}

impl<'a> StatusChange<'a> {
    pub fn new(status: &'a str) -> Self {
        Self { status, error: None }
    }

    pub fn with_error(status: &'a str, kind: &'a str, message: &'a str) -> Self {
        Self { status, error: Some((kind, message)) }
    }
}

/// Moves a run to a new status as the lock holder with `fence`. Refused (returns `false`) once
/// the run is final or when another holder has started it since: a stale worker can never
/// overwrite the run another worker executes, nor flip a final run.
pub async fn set_status_held<C: ConnectionTrait>(
    conn: &C,
    run_id: Uuid,
    fence: i64,
    change: StatusChange<'_>,
) -> Result<bool, DbErr> {
    let finished = status::is_final(change.status);
    let result = conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE sync_runs SET status = $3, error_kind = $4, error_message = $5, heartbeat_at = now(), \
                 finished_at = CASE WHEN $6 THEN now() ELSE finished_at END \
             WHERE id = $1 AND fence = $2 AND status NOT IN ('succeeded', 'partial', 'failed', 'skipped')",
            [
                run_id.into(),
                fence.into(),
                change.status.into(),
                change.error.map(|e| e.0.to_string()).into(),
                change.error.map(|e| e.1.to_string()).into(),
                finished.into(),
            ],
        ))
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Records a status for a job whose attempt holds no lock (it failed before taking one, or found
/// the database busy). It creates the row when the job came from a publisher that recorded
/// none, and changes only a run nobody executes: queued, retrying, abandoned, or running under
/// a holder whose heartbeat is older than `stale`.
pub async fn set_status_unheld<C: ConnectionTrait>(
    conn: &C,
    job: &JobEnvelope,
    attempt: u32,
    change: StatusChange<'_>,
    stale: std::time::Duration,
) -> Result<bool, DbErr> {
    let finished = status::is_final(change.status);
    let result = conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO sync_runs (id, database_id, integration, mode, reason, status, attempt, enqueued_at, \
                 heartbeat_at, finished_at, error_kind, error_message) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, now()), now(), CASE WHEN $9 THEN now() END, $10, $11) \
             ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, attempt = EXCLUDED.attempt, \
                 heartbeat_at = now(), finished_at = EXCLUDED.finished_at, \
                 error_kind = EXCLUDED.error_kind, error_message = EXCLUDED.error_message \
             WHERE sync_runs.status IN ('queued', 'retrying', 'abandoned') \
                OR (sync_runs.status = 'running' AND COALESCE(sync_runs.heartbeat_at, sync_runs.enqueued_at) \
                    < now() - make_interval(secs => $12))",
            job_values(
                job,
                [
                    change.status.into(),
                    (attempt as i32).into(),
                    job.time.into(),
                    finished.into(),
                    change.error.map(|e| e.0.to_string()).into(),
                    change.error.map(|e| e.1.to_string()).into(),
                    stale.as_secs_f64().into(),
                ],
            ),
        ))
        .await?;
    Ok(result.rows_affected() == 1)
}

/// A job that found its database busy: `skipped`, its request recorded as a rerun instead.
pub async fn mark_skipped<C: ConnectionTrait>(
    conn: &C,
    job: &JobEnvelope,
    attempt: u32,
    stale: std::time::Duration,
) -> Result<bool, DbErr> {
    let change = StatusChange::with_error(
        status::SKIPPED,
        "database_busy",
        "another sync of this database was running; its holder runs one more pass for this request",
    );
    set_status_unheld(conn, job, attempt, change, stale).await
}

/// Marks the run's dead letter as confirmed by the broker.
pub async fn mark_dead_lettered<C: ConnectionTrait>(conn: &C, run_id: Uuid) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE sync_runs SET dead_lettered_at = COALESCE(dead_lettered_at, now()) WHERE id = $1",
        [run_id.into()],
    ))
    .await
    .map(|_| ())
}

/// Refreshes a running run's heartbeat; `false` when this holder no longer owns it. A run the
/// reaper marked `abandoned` while its holder was only cut off (a PostgreSQL outage longer than
/// the reaper's period) is `running` again.
pub async fn heartbeat<C: ConnectionTrait>(conn: &C, run_id: Uuid, fence: i64) -> Result<bool, DbErr> {
    let result = conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE sync_runs SET heartbeat_at = now(), status = 'running' \
             WHERE id = $1 AND fence = $2 AND status IN ('running', 'abandoned')",
            [run_id.into(), fence.into()],
        ))
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Moves runs whose holder is gone to `abandoned`: running without a heartbeat for `running`,
/// waiting in a retry tier for longer than any tier holds a message (`retrying`), or queued
/// with an unconfirmed publish for `retrying` too (the broker most likely never took it). Their
/// databases are then no longer "active" for the scheduler; a redelivered message still
/// resumes such a run. Returns how many were reaped.
/// A run whose publish was never confirmed and that has not started since.
#[derive(Debug, Clone)]
pub struct Unconfirmed {
    pub id: Uuid,
    pub database_id: Uuid,
    pub integration: String,
    pub mode: String,
    pub reason: String,
    /// `low`, `normal` or `high`, as first published.
    pub priority: String,
}

/// Runs still `queued` with `publish_unconfirmed` this long after their last publish.
pub async fn unconfirmed<C: ConnectionTrait>(
    conn: &C,
    older_than: std::time::Duration,
) -> Result<Vec<Unconfirmed>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT id, database_id, integration, mode, reason, priority FROM sync_runs \
             WHERE status = 'queued' AND error_kind = 'publish_unconfirmed' \
               AND COALESCE(heartbeat_at, enqueued_at) < now() - make_interval(secs => $1) \
             ORDER BY enqueued_at LIMIT 100",
            [older_than.as_secs_f64().into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Unconfirmed {
                id: r.try_get("", "id")?,
                database_id: r.try_get("", "database_id")?,
                integration: r.try_get("", "integration")?,
                mode: r.try_get("", "mode")?,
                reason: r.try_get("", "reason")?,
                priority: r.try_get("", "priority")?,
            })
        })
        .collect()
}

/// Clears the unconfirmed mark of a run published again with a confirm (if it has not moved on).
pub async fn confirmed<C: ConnectionTrait>(conn: &C, id: Uuid) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE sync_runs SET error_kind = NULL, error_message = NULL \
         WHERE id = $1 AND status = 'queued' AND error_kind = 'publish_unconfirmed'",
        [id.into()],
    ))
    .await
    .map(|_| ())
}

pub async fn reap<C: ConnectionTrait>(
    conn: &C,
    running: std::time::Duration,
    retrying: std::time::Duration,
) -> Result<u64, DbErr> {
    let result = conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE sync_runs SET status = 'abandoned', error_kind = 'holder_lost', \
                 error_message = 'no worker has reported on this run for too long; a redelivery resumes it' \
             WHERE (status = 'running' \
                    AND COALESCE(heartbeat_at, started_at, enqueued_at) < now() - make_interval(secs => $1)) \
                OR (status = 'retrying' \
                    AND COALESCE(heartbeat_at, enqueued_at) < now() - make_interval(secs => $2)) \
                OR (status = 'queued' AND error_kind = 'publish_unconfirmed' \
                    AND COALESCE(heartbeat_at, enqueued_at) < now() - make_interval(secs => $2))",
            [running.as_secs_f64().into(), retrying.as_secs_f64().into()],
        ))
        .await?;
    Ok(result.rows_affected())
}
