//! `syncfleet-producer serve`: the scheduler, plus `/metrics`, `/healthz` and `/readyz`.
//!
//! Every `scheduler.tick_secs` it looks at each registered database and publishes:
//! - a **full** reconciliation (reason `reconcile`) when none was enqueued in the last
//!   `scheduler.full_every_secs` (nightly by default) — full runs are what find deletions;
//! - otherwise an **incremental** sync (reason `schedule`) when the database has a cron schedule
//!   (`database schedule --cron`, see [`crate::schedule`]) whose latest occurrence is due and not
//!   yet enqueued, or, without one, an interval (`database add --interval-secs`, or
//!   `scheduler.default_interval_secs`) and nothing was enqueued for it within that interval.
//!
//! A database with a run still queued or running gets nothing more, so a stopped fleet does not
//! pile up jobs. A database whose runs keep failing is retried with exponential backoff
//! (`scheduler.failure_backoff_secs`, doubling per consecutive failure), not every tick.
//! Several producer replicas may run: a lease in Redis (`<prefix>:scheduler`) makes exactly one
//! of them schedule, while all of them export the freshness gauges.
//!
//! The leader also runs the reaper: runs whose holder is gone (no heartbeat) become `abandoned`
//! so their databases are scheduled again, and coalesced rerun requests left with no run to
//! serve them are published as jobs. `/healthz` fails when the loop stops ticking.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Statement};
use syncfleet_shared::Settings;
use syncfleet_shared::db::entities::integration;
use syncfleet_shared::db::{rerun, runs};
use syncfleet_shared::job::{Priority, Reason, SyncDatabaseJob, SyncMode};
use syncfleet_shared::lock::{self, LeaseGuard};
use syncfleet_shared::metrics::{Metrics, Role};
use syncfleet_shared::ops::{self, Liveness, Readiness};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::publish::JobPublisher;

/// One database as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct DueRow {
    pub id: Uuid,
    pub integration: String,
    pub slug: String,
    pub interval: Option<Duration>,
    pub last_enqueued: Option<DateTime<Utc>>,
    pub last_full: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    pub active: bool,
    /// A disabled database is not scheduled (`PATCH /v1/databases/{id}`).
    pub enabled: bool,
    /// Failed runs since the last success, and when the last one was enqueued.
    pub failures: u32,
    pub last_failure: Option<DateTime<Utc>>,
    /// The cron schedule, which replaces the interval when set.
    pub cron: Option<crate::schedule::CronSchedule>,
    /// A cron schedule is stored but cannot be read (edited by hand): no scheduled runs, rather
    /// than silently falling back to an interval.
    pub cron_invalid: bool,
    /// The last cron occurrence enqueued.
    pub fired_at: Option<DateTime<Utc>>,
}

/// What the scheduler publishes for a database now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub mode: SyncMode,
    pub reason: Reason,
    /// The cron occurrence this run serves (its job id derives from it).
    pub occurrence: Option<DateTime<Utc>>,
}

/// How long the scheduler leaves a database alone after `failures` consecutive failed runs.
#[derive(Debug, Clone, Copy)]
pub struct FailureBackoff {
    pub base: Duration,
    pub max: Duration,
}

impl FailureBackoff {
    pub fn after(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures.saturating_sub(1).min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// When and how often full reconciliations run.
#[derive(Debug, Clone, Copy)]
pub struct FullPolicy {
    /// How often; `None` turns them off.
    pub every: Option<Duration>,
    /// The UTC hours they may start in (a database's first one starts at any hour).
    pub hours: Option<syncfleet_shared::config::HourWindow>,
}

/// What, if anything, to publish for `row` now. `grace` is the cron misfire grace.
pub fn decide(
    now: DateTime<Utc>,
    row: &DueRow,
    full: FullPolicy,
    backoff: FailureBackoff,
    grace: Duration,
) -> Option<Due> {
    if row.active || !row.enabled {
        return None;
    }
    let older_than = |t: Option<DateTime<Utc>>, d: Duration| {
        t.is_none_or(|t| now.signed_duration_since(t).to_std().is_ok_and(|age| age >= d))
    };
    // Failed runs count as attempts: after consecutive failures, wait before the next one.
    if row.failures > 0 && !older_than(row.last_failure, backoff.after(row.failures)) {
        return None;
    }
    // A due cron occurrence; a full run due at the same time serves it too.
    let occurrence = row.cron.as_ref().and_then(|c| c.latest_due(row.id, row.fired_at, now, grace));
    let in_window =
        row.last_full.is_none() || full.hours.is_none_or(|w| w.contains(chrono::Timelike::hour(&now)));
    if let Some(full_every) = full.every
        && in_window
        && older_than(row.last_full, full_every)
    {
        return Some(Due { mode: SyncMode::Full, reason: Reason::Reconcile, occurrence });
    }
    if row.cron_invalid {
        return None;
    }
    if row.cron.is_some() {
        return occurrence.map(|o| Due {
            mode: SyncMode::Incremental,
            reason: Reason::Schedule,
            occurrence: Some(o),
        });
    }
    match row.interval {
        Some(interval) if older_than(row.last_enqueued, interval) => {
            Some(Due { mode: SyncMode::Incremental, reason: Reason::Schedule, occurrence: None })
        }
        _ => None,
    }
}

const DUE_SQL: &str = r#"
SELECT d.id, d.integration, d.slug, d.last_success_at, d.enabled,
       d.schedule_cron, d.schedule_tz, d.schedule_jitter_secs, d.schedule_fired_at,
       COALESCE(d.sync_interval_secs, NULLIF($1::integer, 0)) AS interval_secs,
       (SELECT max(r.enqueued_at) FROM sync_runs r WHERE r.database_id = d.id) AS last_enqueued,
       (SELECT max(r.enqueued_at) FROM sync_runs r
         WHERE r.database_id = d.id AND r.mode = 'full'
           AND r.status IN ('queued', 'running', 'retrying', 'abandoned', 'skipped', 'succeeded', 'partial')) AS last_full,
       EXISTS (SELECT 1 FROM sync_runs r
         WHERE r.database_id = d.id AND r.status IN ('queued', 'running', 'retrying')
           AND r.enqueued_at > now() - interval '6 hours') AS active,
       f.failures, f.last_failure
FROM notion_databases d
CROSS JOIN LATERAL (
    SELECT count(*)::integer AS failures, max(COALESCE(r.finished_at, r.enqueued_at)) AS last_failure
    FROM sync_runs r
    WHERE r.database_id = d.id AND r.status = 'failed'
      -- A job the broker never took is not an attempt (the publisher's reconnect backoff paces those).
      AND r.error_kind IS DISTINCT FROM 'publish_failed'
      AND r.enqueued_at > COALESCE((SELECT max(s.enqueued_at) FROM sync_runs s
                                    WHERE s.database_id = d.id AND s.status IN ('succeeded', 'partial')),
                                   '-infinity'::timestamptz)
) f
ORDER BY d.slug
"#;

/// `pg_notification_queue_usage()`: the share of PostgreSQL's NOTIFY queue in use.
async fn notify_queue_usage(db: &DatabaseConnection) -> Result<f64, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_notification_queue_usage() AS usage",
        ))
        .await?;
    Ok(row.map(|r| r.try_get::<f64>("", "usage")).transpose()?.unwrap_or(0.0))
}

async fn load(db: &DatabaseConnection, default_interval_secs: u64) -> Result<Vec<DueRow>, sea_orm::DbErr> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            DUE_SQL,
            [(default_interval_secs.min(i32::MAX as u64) as i32).into()],
        ))
        .await?;
    rows.iter()
        .map(|r| {
            let interval: Option<i32> = r.try_get("", "interval_secs")?;
            let id: Uuid = r.try_get("", "id")?;
            let expression: Option<String> = r.try_get("", "schedule_cron")?;
            let tz: Option<String> = r.try_get("", "schedule_tz")?;
            let jitter: i32 = r.try_get("", "schedule_jitter_secs")?;
            let parsed = expression.as_deref().map(|e| {
                crate::schedule::CronSchedule::parse(e, tz.as_deref(), jitter.clamp(0, i32::MAX) as u32)
            });
            let cron_invalid = matches!(parsed, Some(Err(_)));
            if let Some(Err(err)) = &parsed {
                warn_once(id, &err.to_string());
            }
            let cron = parsed.and_then(Result::ok);
            Ok(DueRow {
                id,
                integration: r.try_get("", "integration")?,
                slug: r.try_get("", "slug")?,
                interval: interval.filter(|s| *s > 0).map(|s| Duration::from_secs(s as u64)),
                last_enqueued: r.try_get("", "last_enqueued")?,
                last_full: r.try_get("", "last_full")?,
                last_success: r.try_get("", "last_success_at")?,
                active: r.try_get("", "active")?,
                enabled: r.try_get("", "enabled")?,
                failures: r.try_get::<i32>("", "failures")?.max(0) as u32,
                last_failure: r.try_get("", "last_failure")?,
                cron,
                cron_invalid,
                fired_at: r.try_get("", "schedule_fired_at")?,
            })
        })
        .collect()
}

/// Logs an invalid stored schedule once per database and error, not every tick.
fn warn_once(database: Uuid, error: &str) {
    static SEEN: std::sync::Mutex<Option<std::collections::HashSet<(Uuid, String)>>> =
        std::sync::Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.get_or_insert_with(Default::default).insert((database, error.to_string())) {
        tracing::error!(database = %database, error = %error,
            "A stored cron schedule cannot be read; the database gets no scheduled runs until it is set again.");
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(settings: &Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Metrics::new(Role::Producer);
    let ready = Readiness::default();
    let tick = Duration::from_secs(settings.scheduler.tick_secs);
    // A tick may include publishes that wait on the broker (reconnect, confirm timeout).
    let stale = Duration::from_secs(settings.worker.liveness_stale_secs).max(tick * 3);
    let live = Liveness::new(stale);
    live.beat();
    let stop = CancellationToken::new();
    if let Some(addr) = settings.metrics_addr {
        ops::serve(addr, metrics.clone(), ready.clone(), live.clone(), stop.clone()).await?;
    }
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let redis = syncfleet_shared::redis_pool::connect(&settings.redis).await?;
    let publisher = std::sync::Arc::new(JobPublisher::connect(settings, metrics.clone()).await?);
    if let Some(addr) = settings.api.addr {
        crate::api::serve(
            addr,
            settings,
            db.clone(),
            publisher.clone(),
            redis.clone(),
            metrics.clone(),
            stop.clone(),
        )
        .await?;
    }
    for integ in integration::Entity::find().all(&db).await? {
        metrics.observe_integration(&integ.slug, integ.rate_per_second);
    }
    let lease = (tick * 3).max(Duration::from_secs(15));
    let backoff = FailureBackoff {
        base: Duration::from_secs(settings.scheduler.failure_backoff_secs),
        max: Duration::from_secs(settings.scheduler.failure_backoff_max_secs),
    };
    let reaper = Reaper::new(settings);
    let lease_key = format!("{}:scheduler", settings.redis.key_prefix);
    let full_every = Some(Duration::from_secs(settings.scheduler.full_every_secs)).filter(|d| !d.is_zero());
    let grace = Duration::from_secs(settings.scheduler.misfire_grace_secs);
    // Validated with the settings; an unparsable window would have stopped the process.
    let full = FullPolicy {
        every: full_every,
        hours: settings
            .scheduler
            .full_hours
            .as_deref()
            .and_then(|h| syncfleet_shared::config::HourWindow::parse(h).ok()),
    };
    let mut leader: Option<LeaseGuard> = None;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    tracing::info!(
        tick_secs = tick.as_secs(),
        full_every_secs = settings.scheduler.full_every_secs,
        "Scheduler started."
    );
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        live.beat();
        if leader.as_ref().is_none_or(|g| g.lost().is_cancelled()) {
            leader = match lock::try_acquire_key(&redis, lease_key.clone(), "scheduler", lease).await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::warn!(error = %e, "Could not reach Redis for the scheduler lease.");
                    None
                }
            };
        }
        let rows = match load(&db, settings.scheduler.default_interval_secs).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "The scheduler could not read the databases; will try again.");
                ready.set(false);
                continue;
            }
        };
        for row in &rows {
            if let Some(every) = row.interval.or(full_every) {
                metrics
                    .database_interval
                    .with_label_values(&[&row.integration, &row.slug])
                    .set(every.as_secs_f64());
            }
            if let Some(at) = row.last_success {
                metrics
                    .database_last_success
                    .with_label_values(&[&row.integration, &row.slug])
                    .set(at.timestamp_millis() as f64 / 1000.0);
            }
        }
        let mut healthy = true;
        if leader.is_some() {
            healthy &= reaper.run(&db, &publisher, &metrics).await;
            let now = Utc::now();
            for row in &rows {
                let Some(due) = decide(now, row, full, backoff, grace) else { continue };
                healthy &= publish_due(&db, &publisher, row, due).await;
            }
        }
        match notify_queue_usage(&db).await {
            Ok(usage) => metrics.notify_queue_usage.set(usage),
            Err(e) => tracing::debug!(error = %e, "Could not read the NOTIFY queue usage."),
        }
        metrics.scheduler_last_tick.set(Utc::now().timestamp_millis() as f64 / 1000.0);
        ready.set(healthy);
    }
    ready.set(false);
    if let Some(guard) = leader {
        guard.release().await;
    }
    stop.cancel();
    tracing::info!("Scheduler stopped.");
    Ok(())
}

/// Publishes what [`decide`] chose; returns false when it could not.
async fn publish_due(db: &DatabaseConnection, publisher: &JobPublisher, row: &DueRow, due: Due) -> bool {
    let data = SyncDatabaseJob {
        integration: row.integration.clone(),
        database_id: row.id,
        mode: due.mode,
        priority: Priority::Normal,
        reason: due.reason,
    };
    let published = match due.occurrence {
        // The occurrence's own id: published twice (two leaders, a leader that died before
        // recording it), it is still one run.
        Some(at) => {
            let id = crate::schedule::occurrence_job_id(row.id, at);
            publisher.publish_as(db, "urn:syncfleet:scheduler", data, id).await
        }
        None => publisher.publish(db, "urn:syncfleet:scheduler", data).await,
    };
    match published {
        Ok(job) => tracing::info!(
            job.id = %job.id,
            database = %row.slug,
            mode = due.mode.as_str(),
            reason = due.reason.as_str(),
            occurrence = ?due.occurrence,
            "Scheduled a sync."
        ),
        Err(e) => {
            tracing::warn!(database = %row.slug, error = %e, "Could not publish a scheduled sync.");
            return false;
        }
    }
    let Some(at) = due.occurrence else { return true };
    let recorded = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_databases SET schedule_fired_at = $2 \
             WHERE id = $1 AND (schedule_fired_at IS NULL OR schedule_fired_at < $2)",
            [row.id.into(), at.into()],
        ))
        .await;
    if let Err(e) = recorded {
        // The next tick publishes the same occurrence again (the same job id): still one run.
        tracing::warn!(database = %row.slug, error = %e, "Could not record the cron occurrence enqueued.");
        return false;
    }
    true
}

/// The leader's clean-up pass, once per tick.
struct Reaper {
    /// A running run without a heartbeat for this long has lost its holder.
    running: Duration,
    /// A retrying run (or an unconfirmed publish) older than the longest retry tier plus this
    /// margin will not come back by itself.
    retrying: Duration,
    /// A rerun request pending this long with no run to serve it is published here.
    stranded: Duration,
    /// A publish left unconfirmed this long without its run starting is published again, under
    /// the same job id (a second delivery of one run id is still one run).
    unconfirmed: Duration,
}

impl Reaper {
    fn new(settings: &Settings) -> Self {
        let lease = Duration::from_secs(settings.worker.lease_secs);
        let longest_tier = settings
            .amqp
            .retry_tiers
            .iter()
            .map(|t| Duration::from_millis(t.delay_ms))
            .max()
            .unwrap_or_default();
        Self {
            running: Duration::from_secs(settings.scheduler.reap_running_after_secs).max(lease * 2),
            retrying: longest_tier + Duration::from_secs(300),
            stranded: lease * 2 + Duration::from_secs(settings.scheduler.tick_secs),
            unconfirmed: Duration::from_secs(settings.amqp.confirm_timeout_secs.saturating_mul(3))
                .max(Duration::from_secs(30)),
        }
    }

    /// Returns whether everything it needed to do worked.
    async fn run(&self, db: &DatabaseConnection, publisher: &JobPublisher, metrics: &Metrics) -> bool {
        let mut ok = self.republish_unconfirmed(db, publisher).await;
        match runs::reap(db, self.running, self.retrying).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.runs_reaped.inc_by(n);
                tracing::warn!(
                    runs = n,
                    "Reaped runs whose worker is gone; their databases are scheduled again."
                );
            }
            Err(e) => {
                ok = false;
                tracing::warn!(error = %e, "The reaper could not read the runs; will try again.");
            }
        }
        let stranded = match rerun::stranded(db, self.stranded).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "The reaper could not read pending rerun requests.");
                return false;
            }
        };
        for (database_id, integration, pending) in stranded {
            let data = SyncDatabaseJob {
                integration,
                database_id,
                mode: pending.mode,
                priority: pending.priority(),
                reason: Reason::Rerun,
            };
            match publisher.publish(db, "urn:syncfleet:scheduler", data).await {
                Ok(job) => {
                    tracing::info!(job.id = %job.id, database = %database_id, "Published a rerun request no run had served.");
                    if let Err(e) = rerun::clear(db, database_id, pending).await {
                        tracing::warn!(error = %e, "Could not clear a served rerun request; it may run once more.");
                    }
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(error = %e, database = %database_id, "Could not publish a pending rerun request.");
                }
            }
        }
        ok
    }

    /// The message of an unconfirmed publish may never have reached the queue: publish it again
    /// under its own id. If the first one did arrive, the worker runs the run once and acks the
    /// other delivery as a finished run's.
    async fn republish_unconfirmed(&self, db: &DatabaseConnection, publisher: &JobPublisher) -> bool {
        let stuck = match runs::unconfirmed(db, self.unconfirmed).await {
            Ok(stuck) => stuck,
            Err(e) => {
                tracing::warn!(error = %e, "The reaper could not read unconfirmed publishes.");
                return false;
            }
        };
        let mut ok = true;
        for run in stuck {
            let mode = serde_json::from_value::<SyncMode>(serde_json::Value::String(run.mode.clone()));
            let reason = serde_json::from_value::<Reason>(serde_json::Value::String(run.reason.clone()));
            let priority =
                serde_json::from_value::<Priority>(serde_json::Value::String(run.priority.clone()));
            let (Ok(mode), Ok(reason), Ok(priority)) = (mode, reason, priority) else {
                tracing::warn!(run = %run.id, "An unconfirmed run has an unknown mode, reason or priority; not published again.");
                continue;
            };
            let data = SyncDatabaseJob {
                integration: run.integration.clone(),
                database_id: run.database_id,
                mode,
                priority,
                reason,
            };
            match publisher.publish_as(db, "urn:syncfleet:scheduler", data, run.id).await {
                Ok(_) => {
                    tracing::info!(run = %run.id, "Published an unconfirmed job again; it is confirmed now.");
                    if let Err(e) = runs::confirmed(db, run.id).await {
                        ok = false;
                        tracing::warn!(run = %run.id, error = %e, "Could not clear the unconfirmed mark; it is published once more.");
                    }
                }
                Err(e) => {
                    ok = false;
                    tracing::warn!(run = %run.id, error = %e, "Could not publish an unconfirmed job again.");
                }
            }
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> DueRow {
        DueRow {
            id: Uuid::nil(),
            integration: "acme".into(),
            slug: "tasks".into(),
            interval: Some(Duration::from_secs(300)),
            last_enqueued: None,
            last_full: None,
            last_success: None,
            active: false,
            enabled: true,
            failures: 0,
            last_failure: None,
            cron: None,
            cron_invalid: false,
            fired_at: None,
        }
    }

    const GRACE: Duration = Duration::from_secs(3600);

    fn due(mode: SyncMode, reason: Reason) -> Option<Due> {
        Some(Due { mode, reason, occurrence: None })
    }

    const BACKOFF: FailureBackoff =
        FailureBackoff { base: Duration::from_secs(60), max: Duration::from_secs(6 * 3600) };

    #[test]
    fn a_database_never_synced_gets_a_full_reconciliation_first() {
        let day = FullPolicy { every: Some(Duration::from_secs(86_400)), hours: None };
        assert_eq!(decide(Utc::now(), &row(), day, BACKOFF, GRACE), due(SyncMode::Full, Reason::Reconcile));
    }

    #[test]
    fn incremental_syncs_follow_the_interval_and_a_running_sync_blocks_both() {
        let now = Utc::now();
        let day = FullPolicy { every: Some(Duration::from_secs(86_400)), hours: None };
        let mut r = row();
        r.last_full = Some(now - chrono::Duration::hours(3));
        r.last_enqueued = Some(now - chrono::Duration::seconds(100));
        assert_eq!(decide(now, &r, day, BACKOFF, GRACE), None, "interval not over");
        r.last_enqueued = Some(now - chrono::Duration::seconds(301));
        assert_eq!(decide(now, &r, day, BACKOFF, GRACE), due(SyncMode::Incremental, Reason::Schedule));
        r.active = true;
        assert_eq!(decide(now, &r, day, BACKOFF, GRACE), None);
        r.active = false;
        r.last_full = Some(now - chrono::Duration::hours(25));
        assert_eq!(decide(now, &r, day, BACKOFF, GRACE), due(SyncMode::Full, Reason::Reconcile));
        r.interval = None;
        r.last_full = Some(now);
        assert_eq!(
            decide(now, &r, day, BACKOFF, GRACE),
            None,
            "on-demand databases only get the nightly full"
        );
        assert_eq!(decide(now, &r, FullPolicy { every: None, hours: None }, BACKOFF, GRACE), None);
    }

    #[test]
    fn full_reconciliations_start_only_in_their_hours_except_the_first() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc);
        let hours = syncfleet_shared::config::HourWindow::parse("1-5").ok();
        let night = FullPolicy { every: Some(Duration::from_secs(86_400)), hours };
        let mut r = row();
        r.interval = None;
        // Never reconciled: at once, whatever the hour.
        assert_eq!(
            decide(at("2026-11-24T14:00:00Z"), &r, night, BACKOFF, GRACE),
            due(SyncMode::Full, Reason::Reconcile)
        );
        r.last_full = Some(at("2026-11-23T02:00:00Z"));
        assert_eq!(decide(at("2026-11-24T14:00:00Z"), &r, night, BACKOFF, GRACE), None, "outside 01-05 UTC");
        assert_eq!(
            decide(at("2026-11-25T01:10:00Z"), &r, night, BACKOFF, GRACE),
            due(SyncMode::Full, Reason::Reconcile)
        );
    }

    #[test]
    fn a_cron_schedule_replaces_the_interval_and_a_busy_database_gets_one_catch_up_later() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T11:30:00Z").expect("time").with_timezone(&Utc);
        let day = FullPolicy { every: Some(Duration::from_secs(86_400)), hours: None };
        let mut r = row();
        r.last_full = Some(now - chrono::Duration::hours(3));
        r.last_enqueued = Some(now - chrono::Duration::hours(2));
        r.cron = Some(crate::schedule::CronSchedule::parse("0 * * * *", None, 0).expect("hourly"));
        r.fired_at = Some(now - chrono::Duration::minutes(30));
        assert_eq!(decide(now, &r, day, BACKOFF, GRACE), None, "11:00 is enqueued; the interval is ignored");
        // 09:00, 10:00 and 11:00 missed while a run was active: one run, for 11:00, once it ends.
        r.fired_at = Some(now - chrono::Duration::minutes(150));
        r.active = true;
        assert_eq!(decide(now, &r, day, BACKOFF, GRACE), None);
        r.active = false;
        let eleven = now - chrono::Duration::minutes(30);
        assert_eq!(
            decide(now, &r, day, BACKOFF, GRACE),
            Some(Due { mode: SyncMode::Incremental, reason: Reason::Schedule, occurrence: Some(eleven) })
        );
        // A stored schedule that cannot be read schedules nothing (no fallback to the interval).
        let mut broken = r.clone();
        broken.cron = None;
        broken.cron_invalid = true;
        assert_eq!(decide(now, &broken, day, BACKOFF, GRACE), None);
        // A full run due at the same time serves the occurrence too.
        r.last_full = Some(now - chrono::Duration::hours(25));
        assert_eq!(
            decide(now, &r, day, BACKOFF, GRACE),
            Some(Due { mode: SyncMode::Full, reason: Reason::Reconcile, occurrence: Some(eleven) })
        );
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(3600);

    fn due(mode: SyncMode, reason: Reason) -> Option<Due> {
        Some(Due { mode, reason, occurrence: None })
    }

    #[test]
    fn a_database_whose_runs_keep_failing_is_retried_with_exponential_backoff() {
        let backoff = FailureBackoff { base: Duration::from_secs(60), max: Duration::from_secs(3600) };
        assert_eq!(backoff.after(0), Duration::ZERO);
        assert_eq!(backoff.after(1), Duration::from_secs(60));
        assert_eq!(backoff.after(3), Duration::from_secs(240));
        assert_eq!(backoff.after(40), Duration::from_secs(3600));
        let now = Utc::now();
        let mut r = DueRow {
            id: Uuid::nil(),
            integration: "acme".into(),
            slug: "tasks".into(),
            interval: Some(Duration::from_secs(5)),
            last_enqueued: Some(now - chrono::Duration::seconds(100)),
            last_full: None,
            last_success: None,
            active: false,
            enabled: true,
            failures: 3,
            last_failure: Some(now - chrono::Duration::seconds(100)),
            cron: None,
            cron_invalid: false,
            fired_at: None,
        };
        let day = FullPolicy { every: Some(Duration::from_secs(86_400)), hours: None };
        assert_eq!(
            decide(now, &r, day, backoff, GRACE),
            None,
            "a failed full run is an attempt: no new job every tick"
        );
        r.last_failure = Some(now - chrono::Duration::seconds(241));
        assert_eq!(decide(now, &r, day, backoff, GRACE), due(SyncMode::Full, Reason::Reconcile));
    }
}
