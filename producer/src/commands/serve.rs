//! `syncfleet-producer serve`: the scheduler, plus `/metrics`, `/healthz` and `/readyz`.
//!
//! Every `scheduler.tick_secs` it looks at each registered database and publishes:
//! - a **full** reconciliation (reason `reconcile`) when none was enqueued in the last
//!   `scheduler.full_every_secs` (nightly by default) — full runs are what find deletions;
//! - otherwise an **incremental** sync (reason `schedule`) when the database has an interval
//!   (`database add --interval-secs`, or `scheduler.default_interval_secs`) and nothing was
//!   enqueued for it within that interval.
//!
//! A database with a run still queued or running gets nothing more, so a stopped fleet does not
//! pile up jobs. Several producer replicas may run: a lease in Redis (`<prefix>:scheduler`)
//! makes exactly one of them schedule, while all of them export the freshness gauges.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Statement};
use syncfleet_shared::Settings;
use syncfleet_shared::db::entities::integration;
use syncfleet_shared::job::{Priority, Reason, SyncDatabaseJob, SyncMode};
use syncfleet_shared::lock::{self, LeaseGuard};
use syncfleet_shared::metrics::{Metrics, Role};
use syncfleet_shared::ops::{self, Readiness};
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
}

/// What, if anything, to publish for `row` now.
pub fn decide(now: DateTime<Utc>, row: &DueRow, full_every: Option<Duration>) -> Option<(SyncMode, Reason)> {
    if row.active {
        return None;
    }
    let older_than = |t: Option<DateTime<Utc>>, d: Duration| {
        t.is_none_or(|t| now.signed_duration_since(t).to_std().is_ok_and(|age| age >= d))
    };
    if let Some(full_every) = full_every
        && older_than(row.last_full, full_every)
    {
        return Some((SyncMode::Full, Reason::Reconcile));
    }
    match row.interval {
        Some(interval) if older_than(row.last_enqueued, interval) => {
            Some((SyncMode::Incremental, Reason::Schedule))
        }
        _ => None,
    }
}

const DUE_SQL: &str = r#"
SELECT d.id, d.integration, d.slug, d.last_success_at,
       COALESCE(d.sync_interval_secs, NULLIF($1::integer, 0)) AS interval_secs,
       (SELECT max(r.enqueued_at) FROM sync_runs r WHERE r.database_id = d.id) AS last_enqueued,
       (SELECT max(r.enqueued_at) FROM sync_runs r
         WHERE r.database_id = d.id AND r.mode = 'full'
           AND r.status IN ('queued', 'running', 'retrying', 'succeeded', 'partial')) AS last_full,
       EXISTS (SELECT 1 FROM sync_runs r
         WHERE r.database_id = d.id AND r.status IN ('queued', 'running', 'retrying')
           AND r.enqueued_at > now() - interval '6 hours') AS active
FROM notion_databases d
ORDER BY d.slug
"#;

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
            Ok(DueRow {
                id: r.try_get("", "id")?,
                integration: r.try_get("", "integration")?,
                slug: r.try_get("", "slug")?,
                interval: interval.filter(|s| *s > 0).map(|s| Duration::from_secs(s as u64)),
                last_enqueued: r.try_get("", "last_enqueued")?,
                last_full: r.try_get("", "last_full")?,
                last_success: r.try_get("", "last_success_at")?,
                active: r.try_get("", "active")?,
            })
        })
        .collect()
}

/// Runs until `shutdown` resolves.
pub async fn run(settings: &Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Metrics::new(Role::Producer);
    let ready = Readiness::default();
    let stop = CancellationToken::new();
    if let Some(addr) = settings.metrics_addr {
        ops::serve(addr, metrics.clone(), ready.clone(), stop.clone()).await?;
    }
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let redis = syncfleet_shared::redis_pool::connect(&settings.redis).await?;
    let publisher = JobPublisher::connect(settings, metrics.clone()).await?;
    for integ in integration::Entity::find().all(&db).await? {
        metrics.observe_integration(&integ.slug, integ.rate_per_second);
    }
    let tick = Duration::from_secs(settings.scheduler.tick_secs);
    let lease = (tick * 3).max(Duration::from_secs(15));
    let lease_key = format!("{}:scheduler", settings.redis.key_prefix);
    let full_every = Some(Duration::from_secs(settings.scheduler.full_every_secs)).filter(|d| !d.is_zero());
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
        if leader.as_ref().is_none_or(|g| g.lost().is_cancelled()) {
            leader = match lock::try_acquire_key(&redis, lease_key.clone(), lease).await {
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
            let now = Utc::now();
            for row in &rows {
                let Some((mode, reason)) = decide(now, row, full_every) else { continue };
                let data = SyncDatabaseJob {
                    integration: row.integration.clone(),
                    database_id: row.id,
                    mode,
                    priority: Priority::Normal,
                    reason,
                };
                match publisher.publish(&db, "urn:syncfleet:scheduler", data).await {
                    Ok(job) => tracing::info!(
                        job.id = %job.id,
                        database = %row.slug,
                        mode = mode.as_str(),
                        reason = reason.as_str(),
                        "Scheduled a sync."
                    ),
                    Err(e) => {
                        healthy = false;
                        tracing::warn!(database = %row.slug, error = %e, "Could not publish a scheduled sync.");
                    }
                }
            }
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
        }
    }

    #[test]
    fn a_database_never_synced_gets_a_full_reconciliation_first() {
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(decide(Utc::now(), &row(), day), Some((SyncMode::Full, Reason::Reconcile)));
    }

    #[test]
    fn incremental_syncs_follow_the_interval_and_a_running_sync_blocks_both() {
        let now = Utc::now();
        let day = Some(Duration::from_secs(86_400));
        let mut r = row();
        r.last_full = Some(now - chrono::Duration::hours(3));
        r.last_enqueued = Some(now - chrono::Duration::seconds(100));
        assert_eq!(decide(now, &r, day), None, "interval not over");
        r.last_enqueued = Some(now - chrono::Duration::seconds(301));
        assert_eq!(decide(now, &r, day), Some((SyncMode::Incremental, Reason::Schedule)));
        r.active = true;
        assert_eq!(decide(now, &r, day), None);
        r.active = false;
        r.last_full = Some(now - chrono::Duration::hours(25));
        assert_eq!(decide(now, &r, day), Some((SyncMode::Full, Reason::Reconcile)));
        r.interval = None;
        r.last_full = Some(now);
        assert_eq!(decide(now, &r, day), None, "on-demand databases only get the nightly full");
        assert_eq!(decide(now, &r, None), None);
    }
}
