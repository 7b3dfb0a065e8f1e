//! One delivery, start to finish: validate, look up, record the attempt, sync, record the outcome,
//! and decide the [`Disposition`].

use lapin::BasicProperties;
use sea_orm::EntityTrait;
use std::time::Duration;

use syncfleet_shared::db::entities::{integration, notion_database, sync_run::status};
use syncfleet_shared::db::fence;
use syncfleet_shared::db::runs::{self, StartOutcome};
use syncfleet_shared::job::{ATTEMPT_HEADER, JobEnvelope, Reason, SyncDatabaseJob, SyncMode};
use syncfleet_shared::lock;
use syncfleet_shared::notion::{FailureClass, NotionSession};
use syncfleet_shared::{amqp, budget::BudgetKey};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Disposition, JobFailure, Verdict};
use crate::sync::SyncRun;
use crate::worker::WorkerContext;
use syncfleet_shared::metrics::Outcome;

/// The outcome of handling one delivery, with the parsed job when there was one.
pub struct Handled {
    pub disposition: Disposition,
    pub outcome: Outcome,
    pub job: Option<JobEnvelope>,
    pub attempt: u32,
}

/// Handles one message body. Never panics on input; every failure becomes a disposition.
pub async fn handle(
    ctx: &WorkerContext,
    body: &[u8],
    props: &BasicProperties,
    shutdown: CancellationToken,
) -> Handled {
    let attempt = amqp::header_u32(props, ATTEMPT_HEADER).unwrap_or(1).max(1);
    let job = match JobEnvelope::parse(body) {
        Ok(job) => job,
        Err(e) => {
            tracing::warn!(error = %e, kind = e.kind(), "Rejecting a message that is not a valid sync job.");
            return Handled {
                disposition: Disposition::DeadLetter { reason: e.to_string() },
                outcome: Outcome::Rejected,
                job: None,
                attempt,
            };
        }
    };
    let current = tracing::Span::current();
    current.record("job.id", tracing::field::display(job.id));
    current.record("database", tracing::field::display(job.data.database_id));
    current.record("attempt", attempt);
    let span = tracing::info_span!(
        "job.process",
        job.id = %job.id,
        database = %job.data.database_id,
        integration = %job.data.integration,
        mode = job.data.mode.as_str(),
        attempt
    );
    let verdict = run_job(ctx, &job, attempt, shutdown).instrument(span).await;
    Handled { disposition: verdict.disposition, outcome: verdict.outcome, job: Some(job), attempt }
}

async fn run_job(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    attempt: u32,
    shutdown: CancellationToken,
) -> Verdict {
    let database = match notion_database::Entity::find_by_id(job.data.database_id).one(&ctx.db).await {
        Ok(Some(db)) => db,
        Ok(None) => {
            tracing::warn!("Rejecting a job for a database that is not registered.");
            let reason = format!("unknown database {}", job.data.database_id);
            return Verdict::new(Disposition::DeadLetter { reason }, Outcome::Rejected);
        }
        Err(e) => return transient(ctx, job, attempt, &JobFailure::Db(e)).await.into(),
    };
    if database.integration != job.data.integration {
        tracing::warn!(registered = %database.integration, "Rejecting a job whose integration does not own the database.");
        let reason = format!("database {} belongs to integration {}", database.id, database.integration);
        return Verdict::new(Disposition::DeadLetter { reason }, Outcome::Rejected);
    }
    // One running sync per database.
    let lease = Duration::from_secs(ctx.settings.worker.lease_secs);
    let guard = match lock::try_acquire(&ctx.redis, &ctx.settings.redis.key_prefix, &database.id, lease).await
    {
        Ok(Some(guard)) => guard,
        Ok(None) => return database_busy(ctx, job, attempt).await,
        Err(e) => return transient(ctx, job, attempt, &JobFailure::Lock(e)).await.into(),
    };
    let disposition = run_locked(ctx, job, attempt, database, shutdown, &guard).await;
    guard.release().await;
    disposition
}

/// The lock is held. A fresh job asks the holder for one more pass and is recorded as skipped;
/// a job that was already running (its worker died holding the lock) waits for the lease instead.
async fn database_busy(ctx: &WorkerContext, job: &JobEnvelope, attempt: u32) -> Verdict {
    match runs::current_status(&ctx.db, job.id).await {
        Ok(Some(state)) if state == status::RUNNING || state == status::RETRYING => {
            tracing::info!(
                "The database is locked by an earlier attempt of this job; retrying after the lease."
            );
            let error = JobFailure::Lock(lock::LockError("held by an earlier attempt".into()));
            return transient(ctx, job, attempt, &error).await.into();
        }
        Ok(_) => {}
        Err(e) => return transient(ctx, job, attempt, &JobFailure::Db(e)).await.into(),
    }
    if let Err(e) = request_rerun(ctx, job.data.database_id).await {
        return transient(ctx, job, attempt, &JobFailure::Lock(e)).await.into();
    }
    if let Err(e) = runs::mark_skipped(&ctx.db, job, attempt).await {
        return transient(ctx, job, attempt, &JobFailure::Db(e)).await.into();
    }
    ctx.metrics.lock_contended.inc();
    tracing::info!("Another sync of this database is running; it will make one more incremental pass.");
    Verdict::new(Disposition::Ack, Outcome::Skipped)
}

async fn request_rerun(ctx: &WorkerContext, database: uuid::Uuid) -> Result<(), lock::LockError> {
    let mut conn = ctx.redis.get().await.map_err(|e| lock::LockError(e.to_string()))?;
    let key = lock::rerun_key(&ctx.settings.redis.key_prefix, &database);
    redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("PX")
        .arg(24 * 3600 * 1000)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| lock::LockError(e.to_string()))
}

/// Takes (and clears) a pending rerun request.
async fn take_rerun(ctx: &WorkerContext, database: uuid::Uuid) -> Result<bool, lock::LockError> {
    let mut conn = ctx.redis.get().await.map_err(|e| lock::LockError(e.to_string()))?;
    let key = lock::rerun_key(&ctx.settings.redis.key_prefix, &database);
    let value: Option<String> = redis::cmd("GETDEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .map_err(|e| lock::LockError(e.to_string()))?;
    Ok(value.is_some())
}

/// Runs the job while holding the database's lock, then the coalesced rerun pass if requested.
async fn run_locked(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    attempt: u32,
    database: notion_database::Model,
    shutdown: CancellationToken,
    guard: &lock::LeaseGuard,
) -> Verdict {
    let fence = match fence::next(&ctx.db, database.id).await {
        Ok(f) => f,
        Err(e) => return transient(ctx, job, attempt, &JobFailure::Db(e)).await.into(),
    };
    let checkpoint = match runs::start_attempt(&ctx.db, job, attempt, &ctx.worker_id).await {
        Ok(StartOutcome::Started { checkpoint }) => checkpoint,
        Ok(StartOutcome::AlreadyFinal(state)) => {
            tracing::info!(status = %state, "Job already finished; acknowledging the redelivery without rerunning.");
            return Verdict::new(Disposition::Ack, Outcome::Skipped);
        }
        Err(e) => return transient(ctx, job, attempt, &JobFailure::Db(e)).await.into(),
    };
    if checkpoint.is_some() {
        tracing::info!("Resuming from the run's checkpoint.");
    }
    let database_id = database.id;
    if let Err(e) = sync_once(ctx, job, database, checkpoint, fence, &shutdown, guard).await {
        return fail(ctx, job, attempt, e).await;
    }
    // Jobs that arrived while this one ran were coalesced into one more incremental pass.
    match take_rerun(ctx, database_id).await {
        Ok(true) if !shutdown.is_cancelled() => rerun(ctx, job, database_id, fence, &shutdown, guard).await,
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Could not check for a requested rerun."),
    }
    Disposition::Ack.into()
}

async fn sync_once(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    database: notion_database::Model,
    checkpoint: Option<runs::Checkpoint>,
    fence: i64,
    shutdown: &CancellationToken,
    guard: &lock::LeaseGuard,
) -> Result<(), JobFailure> {
    let session = open_session(ctx, &database).await?;
    let prepared = match crate::schema::prepare(&ctx.db, &session, &database, fence).await {
        Ok(p) => p,
        Err(e) => {
            crate::sync::record_unsaved_requests(&ctx.db, job.id, &session).await;
            return Err(e);
        }
    };
    let run = SyncRun {
        db: ctx.db.clone(),
        session,
        database,
        run_id: job.id,
        mode: job.data.mode,
        checkpoint,
        page_size: ctx.settings.sync.page_size,
        max_chains: ctx.settings.sync.max_chains,
        overlap: ctx.settings.sync.overlap(),
        fence,
        shutdown: shutdown.clone(),
        lease_lost: guard.lost(),
        metrics: ctx.metrics.clone(),
        schema: prepared.schema,
        mapping: prepared.mapping,
    };
    let started = std::time::Instant::now();
    let summary = run.run().await?;
    tracing::info!(
        pages = summary.seen,
        created = summary.created,
        updated = summary.updated,
        unchanged = summary.unchanged,
        deleted = summary.deleted,
        invalid = summary.invalid,
        requests = summary.requests,
        rate_limited = summary.rate_limited,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Sync finished."
    );
    Ok(())
}

/// The coalesced pass: an incremental run of its own (its own `sync_runs` row, reason `rerun`).
async fn rerun(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    database_id: uuid::Uuid,
    fence: i64,
    shutdown: &CancellationToken,
    guard: &lock::LeaseGuard,
) {
    let data = SyncDatabaseJob { mode: SyncMode::Incremental, reason: Reason::Rerun, ..job.data.clone() };
    let pass = JobEnvelope::new("urn:syncfleet:worker", data);
    tracing::info!(rerun.id = %pass.id, "Running the requested incremental pass.");
    let outcome = async {
        let database = notion_database::Entity::find_by_id(database_id)
            .one(&ctx.db)
            .await?
            .ok_or_else(|| JobFailure::Config("the database was removed".into()))?;
        runs::start_attempt(&ctx.db, &pass, 1, &ctx.worker_id).await?;
        sync_once(ctx, &pass, database, None, fence, shutdown, guard).await
    }
    .await;
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "The requested incremental pass failed.");
        let message = e.to_string();
        let _ = runs::set_status(&ctx.db, pass.id, status::FAILED, Some((e.kind(), &message))).await;
    }
}

async fn open_session(
    ctx: &WorkerContext,
    database: &notion_database::Model,
) -> Result<NotionSession, JobFailure> {
    let integration =
        integration::Entity::find_by_id(database.integration.clone()).one(&ctx.db).await?.ok_or_else(
            || JobFailure::Config(format!("integration {} is not registered", database.integration)),
        )?;
    let cipher = ctx.cipher.as_ref().ok_or_else(|| {
        JobFailure::Config(
            "encryption_key is not configured; the worker cannot read integration tokens".into(),
        )
    })?;
    let token =
        cipher.decrypt(&integration.token_encrypted).map_err(|e| JobFailure::Config(e.to_string()))?;
    let key = BudgetKey {
        integration: integration.slug.clone(),
        rate: integration.rate_per_second,
        burst: integration.burst.max(1) as u32,
    };
    Ok(NotionSession::new(ctx.notion.clone(), token, ctx.budget.clone(), key, &ctx.settings.notion))
}

/// Records a failed attempt and chooses requeue, retry tier or dead letter.
async fn fail(ctx: &WorkerContext, job: &JobEnvelope, attempt: u32, error: JobFailure) -> Verdict {
    if matches!(error, JobFailure::Interrupted) {
        tracing::info!("Shutting down mid-job; progress is committed and the job goes back to the queue.");
        let _ = runs::set_status(&ctx.db, job.id, status::QUEUED, None).await;
        return Disposition::Requeue.into();
    }
    if matches!(error, JobFailure::LeaseLost) {
        ctx.metrics.lease_lost.inc();
    }
    if matches!(error, JobFailure::LeaseLost | JobFailure::FenceRejected(_)) {
        // Another worker owns the database now; make sure it runs one more pass, and stand down.
        let message = error.to_string();
        let _ = request_rerun(ctx, job.data.database_id).await;
        let _ = runs::set_status(&ctx.db, job.id, status::FAILED, Some((error.kind(), &message))).await;
        tracing::warn!(kind = error.kind(), "Stood down: another worker holds this database's lock.");
        return Verdict::new(Disposition::Ack, Outcome::Failed);
    }
    match error.class() {
        FailureClass::Permanent => {
            tracing::error!(error = %error, kind = error.kind(), "Sync failed permanently.");
            let message = error.to_string();
            let _ = runs::set_status(&ctx.db, job.id, status::FAILED, Some((error.kind(), &message))).await;
            let reason = format!("{}: {message}", error.kind());
            Verdict::new(Disposition::DeadLetter { reason }, Outcome::Failed)
        }
        FailureClass::Transient | FailureClass::Rate => transient(ctx, job, attempt, &error).await.into(),
    }
}

async fn transient(ctx: &WorkerContext, job: &JobEnvelope, attempt: u32, error: &JobFailure) -> Disposition {
    let message = error.to_string();
    if ctx.topology.tier_for_attempt(attempt).is_some() {
        tracing::warn!(error = %error, kind = error.kind(), "Sync failed; retrying later.");
        let _ = runs::set_status(&ctx.db, job.id, status::RETRYING, Some((error.kind(), &message))).await;
        Disposition::Retry { reason: format!("{}: {message}", error.kind()) }
    } else {
        tracing::error!(error = %error, kind = error.kind(), "Sync failed and every retry tier is used up.");
        let _ = runs::set_status(&ctx.db, job.id, status::FAILED, Some((error.kind(), &message))).await;
        Disposition::DeadLetter { reason: format!("retries exhausted after attempt {attempt}: {message}") }
    }
}
