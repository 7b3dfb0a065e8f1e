//! `syncfleet-producer enqueue`: publish one job; with `--wait`, follow the run to its end.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{DatabaseConnection, EntityTrait};
use syncfleet_shared::Settings;
use syncfleet_shared::db::entities::{notion_database, sync_run};
use syncfleet_shared::job::{Priority, Reason, SyncDatabaseJob, SyncMode};
use uuid::Uuid;

use crate::cli::{EnqueueArgs, ModeArg};
use crate::publish::JobPublisher;

pub async fn run(settings: &Settings, args: &EnqueueArgs) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let database = notion_database::Entity::find_by_id(args.database)
        .one(&db)
        .await?
        .ok_or_else(|| anyhow!("database {} is not registered (run `database add` first)", args.database))?;
    let metrics = syncfleet_shared::metrics::Metrics::new(syncfleet_shared::metrics::Role::Producer);
    let publisher = JobPublisher::connect(settings, metrics).await?;
    let mode = match args.mode {
        ModeArg::Full => SyncMode::Full,
        ModeArg::Incremental => SyncMode::Incremental,
    };
    let data = SyncDatabaseJob {
        integration: database.integration.clone(),
        database_id: database.id,
        mode,
        priority: Priority::Normal,
        reason: Reason::Manual,
    };
    let job = publisher.publish(&db, "urn:syncfleet:cli", data).await?;
    println!("enqueued job {} ({} sync of {})", job.id, mode.as_str(), database.id);
    if !args.wait {
        return Ok(());
    }
    let estimate = previous_page_count(&db, database.id).await;
    wait(&db, job.id, estimate, Duration::from_secs(args.timeout_secs)).await
}

/// Pages seen by the last successful run, as the progress bar's length.
async fn previous_page_count(db: &DatabaseConnection, database_id: Uuid) -> Option<u64> {
    use sea_orm::{ColumnTrait, QueryFilter, QueryOrder};
    sync_run::Entity::find()
        .filter(sync_run::Column::DatabaseId.eq(database_id))
        .filter(sync_run::Column::Status.is_in([sync_run::status::SUCCEEDED, sync_run::status::PARTIAL]))
        .order_by_desc(sync_run::Column::FinishedAt)
        .one(db)
        .await
        .ok()
        .flatten()
        .map(|r| r.pages_seen.max(0) as u64)
        .filter(|n| *n > 0)
}

/// Follows a run with a progress bar until it reaches a final state.
pub async fn wait(
    db: &DatabaseConnection,
    run_id: Uuid,
    estimate: Option<u64>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let bar = match estimate {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = if estimate.is_some() {
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} pages · {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {pos} pages · {msg}"
    };
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    loop {
        let run = sync_run::Entity::find_by_id(run_id).one(db).await?;
        if let Some(run) = &run {
            bar.set_position(run.pages_seen.max(0) as u64);
            bar.set_message(format!(
                "{} requests · {} rate-limited · {}",
                run.requests, run.rate_limited, run.status
            ));
            if sync_run::status::is_final(&run.status) {
                bar.finish();
                println!(
                    "run {} {}: {} pages ({} created, {} updated, {} unchanged, {} deleted, {} invalid), {} requests, {} rate-limited, {:.1}s",
                    run.id,
                    run.status,
                    run.pages_seen,
                    run.pages_created,
                    run.pages_updated,
                    run.pages_unchanged,
                    run.pages_deleted,
                    run.pages_invalid,
                    run.requests,
                    run.rate_limited,
                    started.elapsed().as_secs_f64()
                );
                if run.status == sync_run::status::FAILED {
                    bail!(
                        "run failed: {} {}",
                        run.error_kind.as_deref().unwrap_or("unknown"),
                        run.error_message.as_deref().unwrap_or("")
                    );
                }
                return Ok(());
            }
        }
        if started.elapsed() > timeout {
            bar.abandon();
            bail!("gave up waiting for run {run_id} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
