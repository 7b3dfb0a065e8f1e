//! `syncfleet-producer enqueue`: publish one job; with `--wait`, follow the run to its end.

use std::time::Duration;

use anyhow::anyhow;
use sea_orm::EntityTrait;
use syncfleet_shared::Settings;
use syncfleet_shared::db::entities::notion_database;
use syncfleet_shared::job::{Reason, SyncDatabaseJob, SyncMode};
use uuid::Uuid;

use crate::api::model::{ModeParam, PriorityParam};
use crate::commands::runs::WatchOutput;
use crate::publish::JobPublisher;

#[derive(clap::Args, Debug)]
pub struct EnqueueArgs {
    #[arg(long)]
    pub database: Uuid,
    #[arg(long, value_enum, default_value = "incremental")]
    pub mode: ModeParam,
    /// High (the default for a job a person asks for) goes to `<prefix>.jobs.high`, ahead of
    /// any scheduled backlog; normal and low wait their turn in `<prefix>.jobs`.
    #[arg(long, value_enum, default_value = "high")]
    pub priority: PriorityParam,
    /// Show a progress bar until the run ends (`runs watch`); exit non-zero if it fails.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 6 * 3600)]
    pub timeout_secs: u64,
    /// Print `{"job_id": …}` (and, with --wait, nothing else on stdout but the run's JSON).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(settings: &Settings, args: &EnqueueArgs) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let database = notion_database::Entity::find_by_id(args.database)
        .one(&db)
        .await?
        .ok_or_else(|| anyhow!("database {} is not registered (run `database add` first)", args.database))?;
    let metrics = syncfleet_shared::metrics::Metrics::new(syncfleet_shared::metrics::Role::Producer);
    let publisher = JobPublisher::connect(settings, metrics).await?;
    let mode: SyncMode = args.mode.into();
    let data = SyncDatabaseJob {
        integration: database.integration.clone(),
        database_id: database.id,
        mode,
        priority: args.priority.into(),
        reason: Reason::Manual,
    };
    let job = publisher.publish(&db, "urn:syncfleet:cli", data).await?;
    if args.json {
        println!("{}", serde_json::json!({"job_id": job.id}));
    } else {
        println!("enqueued job {} ({} sync of {})", job.id, mode.as_str(), database.id);
    }
    if !args.wait {
        return Ok(());
    }
    let output = if args.json { WatchOutput::JsonLines } else { WatchOutput::Bar };
    crate::commands::runs::watch(settings, &db, job.id, Duration::from_secs(args.timeout_secs), output).await
}
