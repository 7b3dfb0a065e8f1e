//! `database schedule <id> --cron … | --interval … | --off` and `schedules list`: per-database
//! schedules (see [`crate::schedule`]).

use anyhow::{anyhow, bail};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use syncfleet_shared::Settings;
use uuid::Uuid;

use crate::api::model;
use crate::schedule::CronSchedule;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("kind").required(true).args(["cron", "interval", "off"])))]
pub struct ScheduleArgs {
    /// The database (a Notion id, dashes optional).
    pub id: String,
    /// A cron expression: 5 fields, or 6 with seconds first (`*/30 * * * * *`), or `@hourly`.
    #[arg(long)]
    pub cron: Option<String>,
    /// The time zone the expression is read in (IANA, e.g. Europe/Paris; default UTC).
    #[arg(long, requires = "cron")]
    pub tz: Option<String>,
    /// Spread runs over up to this many seconds after each occurrence (a fixed delay per
    /// database), so databases sharing an expression do not start together.
    #[arg(long, requires = "cron", default_value_t = 0)]
    pub jitter_secs: u32,
    /// An incremental sync every this many seconds instead (at least 10).
    #[arg(long)]
    pub interval: Option<u32>,
    /// Disable the database: no scheduled runs, no full reconciliations, and Notion webhook
    /// events about it are ignored; jobs asked for by hand or over the API still run. Setting a
    /// schedule enables it again.
    #[arg(long)]
    pub off: bool,
}

/// Sets a database's schedule. A cron schedule starts with the next occurrence that is not yet
/// due (one whose jitter delay is still running counts as not due), never with one that passed
/// before it was set; setting any schedule enables the database.
pub async fn set(settings: &Settings, args: &ScheduleArgs) -> anyhow::Result<()> {
    let id = model::parse_id(&args.id).map_err(|e| anyhow!("id: {e}"))?;
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let found = if let Some(expression) = &args.cron {
        crate::schedule::store(&db, id, expression, args.tz.as_deref(), args.jitter_secs).await?
    } else {
        let (sql, values): (&str, Vec<sea_orm::Value>) = if let Some(secs) = args.interval {
            if !(10..=30 * 86_400).contains(&secs) {
                bail!("interval: must be between 10 and 2592000 seconds");
            }
            (
                "UPDATE notion_databases SET schedule_cron = NULL, schedule_tz = NULL, schedule_jitter_secs = 0, \
                     sync_interval_secs = $2, enabled = true, updated_at = now() WHERE id = $1",
                vec![id.into(), (secs as i32).into()],
            )
        } else {
            ("UPDATE notion_databases SET enabled = false, updated_at = now() WHERE id = $1", vec![id.into()])
        };
        db.execute_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, values))
            .await?
            .rows_affected()
            == 1
    };
    if !found {
        bail!("database {id} is not registered");
    }
    let listed = list_rows(settings, &db, Utc::now(), 3).await?;
    if let Some(entry) = listed.iter().find(|e| e.id == id) {
        println!("{}", line(entry));
    }
    Ok(())
}

/// One database's schedule, as `schedules list` shows it.
#[derive(Debug, Serialize)]
pub struct ScheduleEntry {
    pub id: Uuid,
    pub title: String,
    pub integration: String,
    pub enabled: bool,
    /// `cron`, `interval`, `default interval` or `on demand`.
    pub kind: String,
    /// The expression and zone, or the interval.
    pub schedule: String,
    /// The next scheduled runs (incremental).
    pub next_runs: Vec<DateTime<Utc>>,
    /// The last cron occurrence enqueued.
    pub last_fired: Option<DateTime<Utc>>,
    pub last_enqueued: Option<DateTime<Utc>>,
}

async fn list_rows(
    settings: &Settings,
    db: &sea_orm::DatabaseConnection,
    now: DateTime<Utc>,
    n: usize,
) -> anyhow::Result<Vec<ScheduleEntry>> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT d.id, d.title, d.integration, d.enabled, d.sync_interval_secs, d.schedule_cron, d.schedule_tz, \
                    d.schedule_jitter_secs, d.schedule_fired_at, \
                    (SELECT max(r.enqueued_at) FROM sync_runs r WHERE r.database_id = d.id) AS last_enqueued \
             FROM notion_databases d ORDER BY d.title, d.id",
        ))
        .await?;
    let default = settings.scheduler.default_interval_secs;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id: Uuid = r.try_get("", "id")?;
        let enabled: bool = r.try_get("", "enabled")?;
        let cron: Option<String> = r.try_get("", "schedule_cron")?;
        let tz: Option<String> = r.try_get("", "schedule_tz")?;
        let jitter: i32 = r.try_get("", "schedule_jitter_secs")?;
        let interval: Option<i32> = r.try_get("", "sync_interval_secs")?;
        let last_enqueued: Option<DateTime<Utc>> = r.try_get("", "last_enqueued")?;
        let (kind, schedule, mut next_runs) = match (&cron, interval) {
            (Some(expression), _) => {
                let tz_name = tz.clone().unwrap_or_else(|| "UTC".into());
                let jitter_note = if jitter > 0 { format!(", jitter {jitter} s") } else { String::new() };
                let next = CronSchedule::parse(expression, tz.as_deref(), jitter.max(0) as u32)
                    .map(|s| s.upcoming(id, now, n))
                    .unwrap_or_default();
                ("cron", format!("{expression} ({tz_name}{jitter_note})"), next)
            }
            (None, Some(secs)) if secs > 0 => {
                ("interval", format!("every {secs} s"), every(last_enqueued, secs as i64, now, n))
            }
            (None, _) if default > 0 => (
                "default interval",
                format!("every {default} s"),
                every(last_enqueued, default as i64, now, n),
            ),
            _ => ("on demand", "none".to_string(), Vec::new()),
        };
        if !enabled {
            next_runs.clear();
        }
        out.push(ScheduleEntry {
            id,
            title: r.try_get("", "title")?,
            integration: r.try_get("", "integration")?,
            enabled,
            kind: kind.to_string(),
            schedule,
            next_runs,
            last_fired: r.try_get("", "schedule_fired_at")?,
            last_enqueued,
        });
    }
    Ok(out)
}

/// The next `n` runs of an interval schedule (from the last enqueue, or now).
fn every(last: Option<DateTime<Utc>>, secs: i64, now: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
    let step = chrono::Duration::seconds(secs);
    let first = last.map_or(now, |l| (l + step).max(now));
    (0..n as i32).map(|i| first + step * i).collect()
}

fn line(e: &ScheduleEntry) -> String {
    let next = if !e.enabled {
        "off (disabled)".to_string()
    } else if e.next_runs.is_empty() {
        "no scheduled runs".to_string()
    } else {
        e.next_runs
            .iter()
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("{} ({}) [{}]: {} {} — next: {next}", e.title, e.id, e.integration, e.kind, e.schedule)
}

/// `schedules list`: every database's schedule and its next run times.
pub async fn list(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let entries = list_rows(settings, &db, Utc::now(), 3).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no databases registered");
    }
    for e in &entries {
        println!("{}", line(e));
    }
    Ok(())
}
