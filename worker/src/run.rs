//! The second stage of the job path (consume → run → sync → write): one delivery, start to
//! finish. Validate, look the database up, take its lock (or coalesce into the holder's rerun),
//! record the attempt under a fresh fence, sync, then decide with [`policy::decide`] and record
//! the run's status once. A delivery whose status could not be recorded is never acked.
//!
//! After the lock is released, on every path, a rerun request still pending is turned into a
//! real job on the queue (see `syncfleet_shared::db::rerun`), so no accepted request is dropped.

use std::time::Duration;

use lapin::BasicProperties;
use sea_orm::{EntityTrait, TransactionTrait};
use syncfleet_shared::amqp::{self, Destination, PublishMeta};
use syncfleet_shared::budget::BudgetKey;
use syncfleet_shared::db::entities::{integration, notion_database, sync_run::status};
use syncfleet_shared::db::runs::{self, StartOutcome, Started, StatusChange};
use syncfleet_shared::db::{fence, rerun};
use syncfleet_shared::job::{ATTEMPT_HEADER, JobEnvelope, Priority, Reason, SyncDatabaseJob, SyncMode};
use syncfleet_shared::lock;
use syncfleet_shared::metrics::Outcome;
use syncfleet_shared::notion::NotionSession;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::context::WorkerContext;
use crate::error::JobFailure;
use crate::policy::{self, Decision, Disposition};
use crate::share;
use crate::sync::SyncRun;

/// The outcome of handling one delivery, with the parsed job when there was one.
pub struct Handled {
    pub decision: Decision,
    pub job: Option<JobEnvelope>,
    pub attempt: u32,
}

/// Handles one message body. Never panics on input; every failure becomes a decision.
/// `high_lane`: the delivery came from the high-priority queue. The queue decides the job's
/// priority (for its retries, parking and share), not the body's informational `priority`.
pub async fn handle(
    ctx: &WorkerContext,
    body: &[u8],
    props: &BasicProperties,
    shutdown: CancellationToken,
    high_lane: bool,
) -> Handled {
    let attempt = amqp::header_u32(props, ATTEMPT_HEADER).unwrap_or(1).max(1);
    let job = match JobEnvelope::parse(body) {
        Ok(mut job) => {
            job.data.priority = match (high_lane, job.data.priority) {
                (true, _) => Priority::High,
                (false, Priority::High) => Priority::Normal,
                (false, other) => other,
            };
            job
        }
        Err(e) => {
            tracing::warn!(error = %e, kind = e.kind(), "Rejecting a message that is not a valid sync job.");
            note_invalid_job(ctx, &e.to_string()).await;
            return Handled { decision: Decision::rejected(e.to_string()), job: None, attempt };
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
    let decision = run_job(ctx, &job, attempt, shutdown).instrument(span).await;
    Handled { decision, job: Some(job), attempt }
}

async fn run_job(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    attempt: u32,
    shutdown: CancellationToken,
) -> Decision {
    let database = match notion_database::Entity::find_by_id(job.data.database_id).one(&ctx.db).await {
        Ok(Some(db)) => db,
        Ok(None) => {
            tracing::warn!("Rejecting a job for a database that is not registered.");
            return Decision::rejected(format!("unknown database {}", job.data.database_id));
        }
        Err(e) => return unheld(ctx, job, attempt, JobFailure::Db(e)).await,
    };
    // A job that names no integration runs under the one the database is registered with.
    let resolved;
    let job = if job.data.integration.is_empty() {
        let mut named = job.clone();
        named.data.integration = database.integration.clone();
        tracing::Span::current().record("integration", tracing::field::display(&named.data.integration));
        resolved = named;
        &resolved
    } else {
        job
    };
    if database.integration != job.data.integration {
        tracing::warn!(registered = %database.integration, "Rejecting a job whose integration does not own the database.");
        return Decision::rejected(format!(
            "database {} belongs to integration {}",
            database.id, database.integration
        ));
    }
    let decision = lock_and_run(ctx, job, attempt, database, shutdown).await;
    // A high job that no longer waits drops its mark at once rather than let it hold the
    // integration's normal jobs back until it expires.
    if job.data.priority == Priority::High && !matches!(decision.disposition, Disposition::Park) {
        let (prefix, id) = (&ctx.settings.redis.key_prefix, job.id.to_string());
        share::forget_waiting(&ctx.redis, prefix, &job.data.integration, &id).await;
    }
    decision
}

/// Takes the database's lock (or coalesces the job into its holder's rerun), then a share of
/// the integration (or parks the job), runs, releases, and serves a rerun request left pending.
async fn lock_and_run(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    attempt: u32,
    database: notion_database::Model,
    shutdown: CancellationToken,
) -> Decision {
    let owner = job.id.to_string();
    let guard = match lock::try_acquire(
        &ctx.redis,
        &ctx.settings.redis.key_prefix,
        &database.id,
        &owner,
        ctx.lease(),
    )
    .await
    {
        Ok(Some(guard)) => guard,
        // A busy database coalesces the job into its holder's rerun at once: that costs no
        // Notion request, so it needs no share of the integration.
        Ok(None) => match database_busy(ctx, job, attempt).await {
            Busy::Acquired(guard) => guard,
            Busy::Done(decision) => return decision,
        },
        Err(e) => return unheld(ctx, job, attempt, JobFailure::Lock(e)).await,
    };
    let decision = match admit_share(ctx, job, &shutdown).await {
        Some(share) => {
            let decision = Box::pin(run_locked(ctx, job, attempt, database, shutdown, &guard)).await;
            if let Some(share) = share {
                share.release().await;
            }
            decision
        }
        None => {
            tracing::debug!("The integration has its fleet-wide share of running jobs; parking the job.");
            Decision::new(Disposition::Park, None, None)
        }
    };
    guard.release().await;
    serve_pending_rerun(ctx, job).await;
    decision
}

/// A place among the integration's running jobs (`Some(None)`: no cap, or Redis could not
/// tell), or `None` when the job is to be parked. The integration's one high job that waits in
/// place (see `share`) asks again for up to one park delay before it is parked; the others are
/// parked at once.
async fn admit_share(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    shutdown: &CancellationToken,
) -> Option<Option<share::Share>> {
    let owner = job.id.to_string();
    let high = job.data.priority == Priority::High;
    let park_delay = Duration::from_millis(ctx.settings.amqp.park_delay_ms);
    let patience = tokio::time::Instant::now() + if high { park_delay } else { Duration::ZERO };
    loop {
        let request = share::Request {
            prefix: &ctx.settings.redis.key_prefix,
            integration: &job.data.integration,
            job_id: &owner,
            high,
            cap: ctx.settings.worker.max_jobs_per_integration,
            high_cap: ctx.settings.worker.max_high_jobs_per_integration,
            lease: ctx.lease(),
            park_delay,
        };
        match share::admit(&ctx.redis, request).await {
            share::Admission::Admitted(share) => return Some(share),
            share::Admission::OverCap { wait: true }
                if tokio::time::Instant::now() < patience && !shutdown.is_cancelled() =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            share::Admission::OverCap { .. } => return None,
        }
    }
}

enum Busy {
    /// The lock came free on the second try: run after all.
    Acquired(lock::LeaseGuard),
    Done(Decision),
}

/// The lock is held. A fresh job records a rerun request and tries the lock once more (a holder
/// that released in between either saw the request or left the lock free); failing that it is
/// `skipped` and acked, and the holder serves its request. A job whose own earlier attempt holds
/// the lock (its worker died) waits for the lease in a retry tier instead.
async fn database_busy(ctx: &WorkerContext, job: &JobEnvelope, attempt: u32) -> Busy {
    match lock::holder(&ctx.redis, &ctx.settings.redis.key_prefix, &job.data.database_id).await {
        // An earlier attempt of this very run holds it: its worker died, and the lease expires
        // soon; the run then resumes from its checkpoint.
        Ok(Some(owner)) if owner == job.id.to_string() => {
            tracing::info!(
                "The database is locked by an earlier attempt of this job; retrying after the lease."
            );
            return Busy::Done(unheld(ctx, job, attempt, JobFailure::HeldByEarlierAttempt).await);
        }
        Ok(_) => {}
        Err(e) => return Busy::Done(unheld(ctx, job, attempt, JobFailure::Lock(e)).await),
    }
    // A redelivery of a finished run is settled as such, never turned into a rerun request; a
    // run upgraded to full asks for a full rerun.
    let run = match runs::find(&ctx.db, job.id).await {
        Ok(run) => run,
        Err(e) => return Busy::Done(unheld(ctx, job, attempt, JobFailure::Db(e)).await),
    };
    if let Some(run) = &run
        && status::is_final(&run.status)
    {
        return Busy::Done(already_final(job, &run.status, run.dead_lettered_at.is_some()));
    }
    let mode = match run.as_ref().map(|r| r.mode.as_str()) {
        Some(m) if m == SyncMode::Full.as_str() => SyncMode::Full,
        _ => job.data.mode,
    };
    if let Err(e) = rerun::request(&ctx.db, job.data.database_id, mode, job.data.priority).await {
        return Busy::Done(unheld(ctx, job, attempt, JobFailure::Db(e)).await);
    }
    let owner = job.id.to_string();
    match lock::try_acquire(
        &ctx.redis,
        &ctx.settings.redis.key_prefix,
        &job.data.database_id,
        &owner,
        ctx.lease(),
    )
    .await
    {
        Ok(Some(guard)) => return Busy::Acquired(guard),
        Ok(None) => {}
        // The request is recorded durably; the holder or the scheduler's reaper serves it.
        Err(e) => {
            tracing::warn!(error = %e, "Could not retry the database lock; the recorded request stands.")
        }
    }
    ctx.metrics.lock_contended.inc();
    match runs::mark_skipped(&ctx.db, job, attempt, ctx.stale_holder()).await {
        Ok(_) => {
            tracing::info!(
                mode = job.data.mode.as_str(),
                "Another sync of this database is running; it will run one more pass for this request."
            );
            Busy::Done(Decision::new(Disposition::Ack, Some(Outcome::Skipped), None))
        }
        Err(e) => Busy::Done(bookkeeping_failed(ctx, &e)),
    }
}

/// Runs the job while holding the database's lock.
async fn run_locked(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    attempt: u32,
    database: notion_database::Model,
    shutdown: CancellationToken,
    guard: &lock::LeaseGuard,
) -> Decision {
    let fence = match fence::next(&ctx.db, database.id).await {
        Ok(f) => f,
        Err(e) => return unheld(ctx, job, attempt, JobFailure::Db(e)).await,
    };
    // Before the run's checkpoint is read: a crash recovery after this point (which can drop
    // commits made without waiting for the WAL, the checkpoint's included) empties the marker,
    // and every later write of this attempt sees that.
    if let Err(e) = fence::mark_attempt(&ctx.db, database.id, fence).await {
        return unheld(ctx, job, attempt, JobFailure::Db(e)).await;
    }
    let started = match runs::start_attempt(&ctx.db, job, attempt, &ctx.worker_id, fence).await {
        Ok(StartOutcome::Started(started)) => started,
        Ok(StartOutcome::AlreadyFinal { status, dead_lettered }) => {
            if status == status::FAILED && !dead_lettered {
                tracing::warn!(
                    "The run failed earlier but its dead letter was never confirmed; sending it now."
                );
                let reason = format!("run {} failed earlier (dead letter re-sent)", job.id);
                return Decision::new(Disposition::DeadLetter { reason }, Some(Outcome::Failed), None);
            }
            tracing::info!(status = %status, "Job already finished; acknowledging the redelivery without rerunning.");
            return Decision::new(Disposition::Ack, Some(Outcome::Skipped), None);
        }
        Err(e) => return unheld(ctx, job, attempt, JobFailure::Db(e)).await,
    };
    let mode = match take_coalesced(ctx, job, fence, &started).await {
        Ok(mode) => mode,
        Err(e) => return held(ctx, job, attempt, fence, JobFailure::Db(e)).await,
    };
    if started.checkpoint.is_some() {
        tracing::info!("Resuming from the run's checkpoint.");
    }
    // Aborted when dropped, so it stops on every path out of here, a panic included.
    let heartbeat = spawn_heartbeat(ctx, job.id, fence);
    let result = sync_once(ctx, job, mode, database, started, fence, &shutdown, guard).await;
    drop(heartbeat);
    match result {
        Ok(()) => Decision::succeeded(),
        Err(failure) => {
            let failure = confirm_takeover(ctx, job, mode, fence, failure).await;
            held(ctx, job, attempt, fence, failure).await
        }
    }
}

/// A redelivery of a run that already ended: acked without rerunning, unless it failed and its
/// dead letter was never confirmed (the publish failed after `failed` was recorded), which is
/// then sent.
fn already_final(job: &JobEnvelope, final_status: &str, dead_lettered: bool) -> Decision {
    if final_status == status::FAILED && !dead_lettered {
        tracing::warn!("The run failed earlier but its dead letter was never confirmed; sending it now.");
        let reason = format!("run {} failed earlier (dead letter re-sent)", job.id);
        return Decision::new(Disposition::DeadLetter { reason }, Some(Outcome::Failed), None);
    }
    tracing::info!(status = %final_status, "Job already finished; acknowledging the redelivery without rerunning.");
    Decision::new(Disposition::Ack, Some(Outcome::Skipped), None)
}

/// The mode this run executes in: a fresh run takes any coalesced request pending for its
/// database (running in the stronger mode, recorded on the run so a retry keeps it). A resumed
/// run keeps its mode: its checkpoint belongs to it, and the request waits for the next run.
async fn take_coalesced(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    fence: i64,
    started: &Started,
) -> Result<SyncMode, sea_orm::DbErr> {
    let stored = if started.mode == SyncMode::Full.as_str() { SyncMode::Full } else { SyncMode::Incremental };
    if started.checkpoint.is_some() {
        return Ok(stored);
    }
    let txn = ctx.db.begin().await?;
    let taken = rerun::take(&txn, job.data.database_id).await?;
    let mode = taken.map_or(stored, |t| rerun::strongest(stored, t));
    if mode != stored {
        runs::set_mode(&txn, job.id, fence, mode.as_str()).await?;
    }
    txn.commit().await?;
    if let Some(taken) = taken {
        tracing::info!(
            requested = taken.as_str(),
            mode = mode.as_str(),
            "This run serves a coalesced rerun request."
        );
    }
    Ok(mode)
}

/// A lost lease means another holder only if the fence moved; then this job's request is handed
/// to that holder as a rerun (it runs after its current pass), and this attempt stands down.
async fn confirm_takeover(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    mode: SyncMode,
    fence: i64,
    failure: JobFailure,
) -> JobFailure {
    let lease_lost = matches!(failure, JobFailure::LeaseLost { .. });
    if !lease_lost && !matches!(failure, JobFailure::FenceRejected(_)) {
        return failure;
    }
    if lease_lost {
        ctx.metrics.lease_lost.inc();
    }
    let moved = match fence::is_current(&ctx.db, job.data.database_id, fence).await {
        Ok(current) => !current,
        // Cannot tell: retrying is safe (a new attempt takes a new fence).
        Err(e) => return JobFailure::Db(e),
    };
    if !moved {
        tracing::warn!("The lock's lease was lost but nobody took the database over; retrying the job.");
        return JobFailure::LeaseLost { fence_moved: false };
    }
    // Another attempt of this same run (a redelivery) may be the new holder: it serves the
    // request itself. Otherwise the new holder runs one more pass for it.
    let same_run_elsewhere = match runs::find(&ctx.db, job.id).await {
        Ok(run) => run.is_some_and(|r| r.fence.is_some_and(|f| f > fence)),
        Err(e) => return JobFailure::Db(e),
    };
    if !same_run_elsewhere
        && let Err(e) = rerun::request(&ctx.db, job.data.database_id, mode, job.data.priority).await
    {
        return JobFailure::Db(e);
    }
    tracing::warn!("Another worker took this database over; it will serve this job's request.");
    JobFailure::LeaseLost { fence_moved: true }
}

/// Refreshes the run's heartbeat every third of the lease while it executes, so the reaper can
/// tell a live holder from a vanished one.
fn spawn_heartbeat(ctx: &WorkerContext, run_id: uuid::Uuid, fence: i64) -> AbortOnDropHandle<()> {
    let db = ctx.db.clone();
    let every = ctx.lease() / 3;
    AbortOnDropHandle::new(tokio::spawn(
        async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = runs::heartbeat(&db, run_id, fence).await {
                    tracing::warn!(error = %e, "Could not refresh the run's heartbeat.");
                }
            }
        }
        .instrument(tracing::Span::current()),
    ))
}

#[allow(clippy::too_many_arguments)]
async fn sync_once(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    mode: SyncMode,
    database: notion_database::Model,
    started: Started,
    fence: i64,
    shutdown: &CancellationToken,
    guard: &lock::LeaseGuard,
) -> Result<(), JobFailure> {
    let session = open_session(ctx, &database).await?;
    let prepared = match crate::schema::prepare(&ctx.db, &session, &database, fence).await {
        Ok(p) => p,
        Err(e) => {
            crate::write::record_unsaved_requests(&ctx.db, job.id, &session).await;
            return Err(e);
        }
    };
    let run = SyncRun {
        db: ctx.db.clone(),
        session,
        database,
        run_id: job.id,
        mode,
        checkpoint: started.checkpoint,
        started_at: started.started_at,
        server_started: started.server_started,
        page_size: ctx.settings.sync.page_size,
        max_chains: ctx.settings.sync.max_chains,
        overlap: ctx.settings.sync.overlap(),
        fence,
        shutdown: shutdown.clone(),
        lease_lost: guard.lost(),
        metrics: ctx.metrics.clone(),
        schema: prepared.schema,
        mapping: prepared.mapping,
        confirm_deletions: ctx.settings.sync.confirm_deletions,
        max_deletion_checks: ctx.settings.sync.max_deletion_checks as usize,
    };
    let clock = std::time::Instant::now();
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
        elapsed_ms = clock.elapsed().as_millis() as u64,
        "Sync finished."
    );
    Ok(())
}

/// After the lock is released: a rerun request still pending becomes one real job on the queue
/// (recorded `queued` first, so the scheduler sees it), and is cleared only once the broker
/// confirmed it and no newer request arrived. A failure leaves the request for the next run or
/// the reaper.
async fn serve_pending_rerun(ctx: &WorkerContext, job: &JobEnvelope) {
    let pending = match rerun::pending(&ctx.db, job.data.database_id).await {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "Could not check for a pending rerun request; the scheduler will.");
            return;
        }
    };
    let data = SyncDatabaseJob {
        integration: job.data.integration.clone(),
        database_id: job.data.database_id,
        mode: pending.mode,
        priority: pending.priority(),
        reason: Reason::Rerun,
    };
    let rerun_job = JobEnvelope::new("urn:syncfleet:worker", data);
    let meta = PublishMeta {
        attempt: 1,
        app_id: format!("syncfleet-worker/{}", ctx.worker_id),
        trace_headers: syncfleet_shared::telemetry::inject(&tracing::Span::current()),
    };
    if let Err(e) = runs::insert_queued(&ctx.db, &rerun_job).await {
        tracing::warn!(error = %e, "Could not record the pending rerun's job; the request stays recorded.");
        return;
    }
    if let Err(e) = ctx.publisher.publish_job(&rerun_job, &Destination::Work, &meta).await {
        // The request stays pending (a later run or the reaper serves it); the row says why
        // its job never ran.
        tracing::warn!(error = %e, "Could not publish the pending rerun; the request stays recorded.");
        let message = e.to_string();
        let change = StatusChange::with_error(status::FAILED, "publish_failed", &message);
        if let Err(e) = runs::set_status_unheld(&ctx.db, &rerun_job, 1, change, ctx.stale_holder()).await {
            tracing::warn!(error = %e, "Could not record the failed rerun publish.");
        }
        return;
    }
    match rerun::clear(&ctx.db, job.data.database_id, pending).await {
        Ok(_) => tracing::info!(
            rerun.id = %rerun_job.id,
            mode = pending.mode.as_str(),
            "Published the coalesced rerun requested while this job held the lock."
        ),
        Err(e) => {
            tracing::warn!(error = %e, "Could not clear the served rerun request; it may run once more.")
        }
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
    let notion = &ctx.settings.notion;
    Ok(NotionSession::new(ctx.notion.clone(), token, ctx.budget.clone(), key, notion).with_workspace(
        integration.workspace.as_deref(),
        notion.workspace_rate,
        notion.workspace_burst,
    ))
}

/// Decides after a failure while holding the lock with `fence`, and records the status as that
/// holder (refused if another holder has the run now: then this attempt changes nothing).
async fn held(
    ctx: &WorkerContext,
    job: &JobEnvelope,
    attempt: u32,
    fence: i64,
    failure: JobFailure,
) -> Decision {
    let decision = decided(&failure, attempt, ctx);
    let Some(new_status) = decision.status else { return decision };
    let message = failure.to_string();
    let change = error_change(new_status, &failure, &message);
    match with_write_retries(|| runs::set_status_held(&ctx.db, job.id, fence, change)).await {
        Ok(true) => {
            announce(ctx, job, &failure).await;
            decision
        }
        // A retried write whose first try committed (the answer was lost) finds its own status.
        Ok(false) if already_written(ctx, job, new_status, Some(fence)).await => {
            announce(ctx, job, &failure).await;
            decision
        }
        Ok(false) => {
            tracing::warn!(
                status = new_status,
                "Another holder owns this run now; its status is left to it."
            );
            stand_down(decision)
        }
        Err(e) => bookkeeping_failed(ctx, &e),
    }
}

/// Decides after a failure without the lock, and records the status if nobody executes the run.
async fn unheld(ctx: &WorkerContext, job: &JobEnvelope, attempt: u32, failure: JobFailure) -> Decision {
    let decision = decided(&failure, attempt, ctx);
    let Some(new_status) = decision.status else { return decision };
    let message = failure.to_string();
    let change = error_change(new_status, &failure, &message);
    match with_write_retries(|| runs::set_status_unheld(&ctx.db, job, attempt, change, ctx.stale_holder()))
        .await
    {
        Ok(true) => decision,
        // The run is final, or a live attempt executes it: this copy may not dead-letter it.
        // A retry stays a retry (its worker may be dead; the next attempt finds out).
        Ok(false) if already_written(ctx, job, new_status, None).await => {
            announce(ctx, job, &failure).await;
            decision
        }
        Ok(false) if matches!(decision.disposition, Disposition::DeadLetter { .. }) => {
            tracing::warn!("The run is final or executed elsewhere; this copy of the job stands down.");
            stand_down(decision)
        }
        Ok(false) => decision,
        Err(e) => bookkeeping_failed(ctx, &e),
    }
}

fn decided(failure: &JobFailure, attempt: u32, ctx: &WorkerContext) -> Decision {
    let decision = policy::decide(failure, attempt, ctx.topology.tiers());
    match &decision.disposition {
        Disposition::DeadLetter { .. } => {
            tracing::error!(error = %failure, kind = failure.kind(), "Sync failed; dead-lettering the job.")
        }
        Disposition::Retry { tier, .. } => {
            tracing::warn!(error = %failure, kind = failure.kind(), tier = %tier.name, "Sync failed; retrying later.")
        }
        Disposition::Requeue { .. } => {
            tracing::info!("Shutting down mid-job; progress is committed and the job goes back to the queue.")
        }
        Disposition::Park => {}
        Disposition::Ack => {
            tracing::warn!(kind = failure.kind(), "Stood down: another worker serves this request.")
        }
    }
    decision
}

fn error_change<'a>(new_status: &'a str, failure: &JobFailure, message: &'a str) -> StatusChange<'a> {
    match failure {
        JobFailure::Interrupted => StatusChange::new(new_status),
        _ => StatusChange::with_error(new_status, failure.kind(), message),
    }
}

/// A stale holder's decision, once it finds the run taken over: nothing of the run is its to
/// settle, so the delivery is simply done (the current holder has its own delivery).
fn stand_down(decision: Decision) -> Decision {
    match decision.disposition {
        Disposition::Requeue { .. } | Disposition::Ack | Disposition::Park => decision,
        _ => Decision::new(Disposition::Ack, Some(Outcome::Skipped), None),
    }
}

/// Announces a permanent failure (bad token, database not shared, bad configuration) to the
/// failure webhook, once per database × kind within the de-duplication window.
async fn announce(ctx: &WorkerContext, job: &JobEnvelope, failure: &JobFailure) {
    let permanent = matches!(failure, JobFailure::Config(_))
        || matches!(failure, JobFailure::Notion(e) if e.class() == syncfleet_shared::notion::FailureClass::Permanent);
    if !permanent {
        return;
    }
    let slug = notion_database::Entity::find_by_id(job.data.database_id)
        .one(&ctx.db)
        .await
        .ok()
        .flatten()
        .map(|d| format!("{} ({})", d.slug, d.id))
        .unwrap_or_else(|| job.data.database_id.to_string());
    // A bad token concerns every database of the integration: one notice for all of them.
    let subject = match failure.kind() {
        "notion_unauthorized" | "configuration" => format!("integration:{}", job.data.integration),
        _ => format!("database:{}", job.data.database_id),
    };
    ctx.notifier.notify(syncfleet_shared::notify::Notice {
        subject,
        kind: failure.kind(),
        database: Some(slug),
        integration: Some(job.data.integration.clone()),
        error: failure.to_string(),
    });
}

/// Counts invalid messages fleet-wide; the third within ten minutes is announced (once per
/// de-duplication window): one stray message is noise, repeated ones are a broken publisher.
async fn note_invalid_job(ctx: &WorkerContext, error: &str) {
    let bucket = chrono::Utc::now().timestamp() / 600;
    let key = format!("{}:invalid_jobs:{{{bucket}}}", ctx.settings.redis.key_prefix);
    let counted: Result<(i64, i64), String> = async {
        let mut conn = ctx.redis.get().await.map_err(|e| e.to_string())?;
        redis::pipe()
            .atomic()
            .incr(&key, 1)
            .expire(&key, 1200)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match counted {
        Ok((n, _)) if n >= 3 => ctx.notifier.notify(syncfleet_shared::notify::Notice {
            subject: "invalid_jobs".into(),
            kind: "invalid_job",
            database: None,
            integration: None,
            error: format!("{n} invalid messages in ten minutes; the last: {error}"),
        }),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Could not count invalid messages for notifications."),
    }
}

/// Whether the run already holds `status` (and `fence`, when given): a write retried after a
/// lost answer finds its own first try.
async fn already_written(ctx: &WorkerContext, job: &JobEnvelope, status: &str, fence: Option<i64>) -> bool {
    match runs::find(&ctx.db, job.id).await {
        Ok(Some(run)) => run.status == status && fence.is_none_or(|f| run.fence == Some(f)),
        _ => false,
    }
}

/// Retries a status write through a PostgreSQL blip (about a minute, jittered backoff) while the
/// delivery stays unacked, so an outage costs few redeliveries (quorum queues count them, and
/// RabbitMQ 4 dead-letters a message past its delivery limit).
async fn with_write_retries<F, Fut>(mut write: F) -> Result<bool, sea_orm::DbErr>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, sea_orm::DbErr>>,
{
    let mut delays =
        syncfleet_shared::retry::delays(Duration::from_millis(250), Duration::from_secs(15)).take(8);
    loop {
        match write().await {
            Ok(done) => return Ok(done),
            Err(e) => match delays.next() {
                Some(delay) => {
                    tracing::warn!(error = %e, delay_ms = delay.as_millis() as u64, "Recording the run's status failed; retrying.");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(e),
            },
        }
    }
}

/// The status could not be recorded: never ack; the delivery comes back after a pause and the
/// next attempt records it.
fn bookkeeping_failed(ctx: &WorkerContext, error: &sea_orm::DbErr) -> Decision {
    ctx.metrics.status_write_failures.inc();
    tracing::error!(error = %error, "Could not record the run's status; returning the delivery to the queue.");
    Decision::new(Disposition::Requeue { after: Duration::from_secs(5) }, None, None)
}
