//! One delivery, start to finish: validate, look up, record the attempt, sync, record the outcome,
//! and decide the [`Disposition`].

use lapin::BasicProperties;
use sea_orm::EntityTrait;
use syncfleet_shared::db::entities::{integration, notion_database, sync_run::status};
use syncfleet_shared::db::runs::{self, StartOutcome};
use syncfleet_shared::job::{ATTEMPT_HEADER, JobEnvelope};
use syncfleet_shared::notion::{FailureClass, NotionSession};
use syncfleet_shared::{amqp, budget::BudgetKey};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Disposition, JobFailure};
use crate::sync::SyncRun;
use crate::worker::WorkerContext;

/// The outcome of handling one delivery, with the parsed job when there was one.
pub struct Handled {
    pub disposition: Disposition,
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
                job: None,
                attempt,
            };
        }
    };
    let span = tracing::info_span!(
        "job.process",
        job.id = %job.id,
        database = %job.data.database_id,
        integration = %job.data.integration,
        mode = job.data.mode.as_str(),
        attempt
    );
    let disposition = run_job(ctx, &job, attempt, shutdown).instrument(span).await;
    Handled { disposition, job: Some(job), attempt }
}

async fn run_job(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    attempt: u32,
    shutdown: CancellationToken,
) -> Disposition {
    let database = match notion_database::Entity::find_by_id(job.data.database_id).one(&ctx.db).await {
        Ok(Some(db)) => db,
        Ok(None) => {
            tracing::warn!("Rejecting a job for a database that is not registered.");
            return Disposition::DeadLetter { reason: format!("unknown database {}", job.data.database_id) };
        }
        Err(e) => return transient(ctx, job, attempt, &JobFailure::Db(e)).await,
    };
    if database.integration != job.data.integration {
        tracing::warn!(registered = %database.integration, "Rejecting a job whose integration does not own the database.");
        return Disposition::DeadLetter {
            reason: format!("database {} belongs to integration {}", database.id, database.integration),
        };
    }
    let checkpoint = match runs::start_attempt(&ctx.db, job, attempt, &ctx.worker_id).await {
        Ok(StartOutcome::Started { checkpoint }) => checkpoint,
        Ok(StartOutcome::AlreadyFinal(state)) => {
            tracing::info!(status = %state, "Job already finished; acknowledging the redelivery without rerunning.");
            return Disposition::Ack;
        }
        Err(e) => return transient(ctx, job, attempt, &JobFailure::Db(e)).await,
    };
    if checkpoint.is_some() {
        tracing::info!("Resuming from the run's checkpoint.");
    }
    let session = match open_session(ctx, &database).await {
        Ok(s) => s,
        Err(e) => return fail(ctx, job, attempt, e).await,
    };
    let run = SyncRun {
        db: ctx.db.clone(),
        session,
        database,
        run_id: job.id,
        mode: job.data.mode,
        checkpoint,
        page_size: ctx.settings.sync.page_size,
        overlap: ctx.settings.sync.overlap(),
        fence: 0,
        shutdown,
    };
    let started = std::time::Instant::now();
    match run.run().await {
        Ok(summary) => {
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
            Disposition::Ack
        }
        Err(e) => fail(ctx, job, attempt, e).await,
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
async fn fail(ctx: &WorkerContext, job: &JobEnvelope, attempt: u32, error: JobFailure) -> Disposition {
    if matches!(error, JobFailure::Interrupted) {
        tracing::info!("Shutting down mid-job; progress is committed and the job goes back to the queue.");
        let _ = runs::set_status(&ctx.db, job.id, status::QUEUED, None).await;
        return Disposition::Requeue;
    }
    match error.class() {
        FailureClass::Permanent => {
            tracing::error!(error = %error, kind = error.kind(), "Sync failed permanently.");
            let message = error.to_string();
            let _ = runs::set_status(&ctx.db, job.id, status::FAILED, Some((error.kind(), &message))).await;
            Disposition::DeadLetter { reason: format!("{}: {message}", error.kind()) }
        }
        FailureClass::Transient | FailureClass::Rate => transient(ctx, job, attempt, &error).await,
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
