//! The CLI twins of the HTTP API's reads and updates: `runs list|show|watch`, `stats`,
//! `database list|show|update`. They run the same queries as the API (`api::model`), and
//! `runs watch` follows the same event stream (`NOTIFY syncfleet_runs`) as the API's SSE.

use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use syncfleet_shared::Settings;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::api::Hub;
use crate::api::model::{self, NotionId, RunRow, StatusParam};

#[derive(Subcommand, Debug)]
pub enum RunsCommand {
    /// Run history, newest first (the API's `GET /v1/runs`).
    List {
        /// Only this database's runs.
        #[arg(long)]
        database: Option<String>,
        #[arg(long, value_enum)]
        status: Option<StatusParam>,
        /// Only runs enqueued at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// One run: status, counters, progress and error (the API's `GET /v1/jobs/{id}`).
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// A live progress bar until the run ends; exits non-zero if it fails (fed by the same
    /// event stream as the API's `/v1/jobs/{id}/events`).
    Watch {
        id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 6 * 3600)]
        timeout_secs: u64,
        /// One JSON line per change of the run (as `runs show --json`, on one line) instead of
        /// a progress bar; the last line is the final state.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    pub id: String,
    /// Seconds between scheduled incremental syncs.
    #[arg(long, conflicts_with = "default_interval")]
    pub interval_secs: Option<u32>,
    /// Return to the default interval.
    #[arg(long)]
    pub default_interval: bool,
    /// Schedule the database again.
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Stop scheduling the database (manual jobs still run).
    #[arg(long)]
    pub disable: bool,
    /// Replace the whole mapping with this JSON file's content.
    #[arg(long)]
    pub mapping_file: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn id_arg(name: &str, text: &str) -> anyhow::Result<Uuid> {
    model::parse_id(text).map_err(|e| anyhow!("{name}: {e}"))
}

pub async fn run(settings: &Settings, command: RunsCommand) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    match command {
        RunsCommand::List { database, status, since, limit, cursor, json } => {
            let query = model::RunsQuery {
                database: database.as_deref().map(|d| id_arg("--database", d)).transpose()?.map(NotionId),
                status,
                since,
                limit: Some(limit),
                cursor,
            };
            let page =
                model::runs_page(&db, &query).await?.map_err(|e| anyhow!("--{}: {}", e.field, e.message))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
                return Ok(());
            }
            println!(
                "{:<36}  {:<36}  {:<11} {:<10} {:>8} {:>9}  enqueued",
                "run", "database", "mode", "status", "pages", "requests"
            );
            for r in &page.runs {
                println!(
                    "{:<36}  {:<36}  {:<11} {:<10} {:>8} {:>9}  {}",
                    r.id,
                    r.database_id,
                    r.mode,
                    r.status,
                    r.counters.pages_seen,
                    r.counters.requests,
                    r.enqueued_at.to_rfc3339()
                );
            }
            if let Some(next) = page.next_cursor {
                println!("more: --cursor {next}");
            }
            Ok(())
        }
        RunsCommand::Show { id, json } => {
            let id = id_arg("id", &id)?;
            let run = model::run_view(&db, id).await?.ok_or_else(|| anyhow!("no run {id}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&run)?);
            } else {
                println!("{}", summary(&run));
                if let Some(e) = &run.error {
                    println!("error: {}: {}\nwhat to do: {}", e.kind, e.message, e.suggested_fix);
                }
            }
            Ok(())
        }
        RunsCommand::Watch { id, timeout_secs, json } => {
            let output = if json { WatchOutput::JsonLines } else { WatchOutput::Bar };
            watch(settings, &db, id_arg("id", &id)?, Duration::from_secs(timeout_secs), output).await
        }
    }
}

fn summary(run: &model::Run) -> String {
    let c = &run.counters;
    format!(
        "run {} {}: {} pages ({} created, {} updated, {} unchanged, {} deleted, {} invalid), {} requests, {} rate-limited, {} ({} sync)",
        run.id,
        run.status,
        c.pages_seen,
        c.pages_created,
        c.pages_updated,
        c.pages_unchanged,
        c.pages_deleted,
        c.pages_invalid,
        c.requests,
        c.rate_limited,
        run.duration_secs.map(|s| format!("{s:.1}s")).unwrap_or_else(|| "not started".into()),
        run.mode,
    )
}

/// How [`watch`] shows a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchOutput {
    /// A progress bar and a summary line.
    Bar,
    /// One JSON object per line, per change.
    JsonLines,
}

/// Follows run `id` until it is final.
pub async fn watch(
    settings: &Settings,
    db: &sea_orm::DatabaseConnection,
    id: Uuid,
    timeout: Duration,
    output: WatchOutput,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let hub = Hub::start(&settings.database.url, db.clone(), stop).await?;
    let mut rx = hub.watch(id);
    let mut current = RunRow::find(db, id).await?.ok_or_else(|| anyhow!("no run {id}"))?;
    let estimate = model::estimate(db, current.database_id, &current.mode).await?;
    let bar = match estimate {
        Some(n) if n > 0 => ProgressBar::new(n as u64),
        _ => ProgressBar::new_spinner(),
    };
    let template = if estimate.is_some_and(|n| n > 0) {
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} pages · {msg}"
    } else {
        "{spinner} [{elapsed_precise}] {pos} pages · {msg}"
    };
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    if output == WatchOutput::JsonLines {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        bar.enable_steady_tick(Duration::from_millis(120));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    // Whether `current` is a state not shown yet (a wake-up can bring nothing new).
    let mut fresh = true;
    loop {
        if output == WatchOutput::JsonLines && fresh {
            println!("{}", serde_json::to_string(&current.view(estimate))?);
        }
        fresh = false;
        if let Some(len) = bar.length()
            && current.pages_seen.max(0) as u64 > len
        {
            bar.set_length(current.pages_seen as u64);
        }
        bar.set_position(current.pages_seen.max(0) as u64);
        bar.set_message(format!(
            "{} requests · {} rate-limited · {}",
            current.requests, current.rate_limited, current.status
        ));
        if current.is_final() {
            bar.finish();
            let view = current.view(estimate);
            if output == WatchOutput::Bar {
                println!("{}", summary(&view));
            }
            if current.status == "failed" {
                let e = view
                    .error
                    .map(|e| format!("{}: {} — {}", e.kind, e.message, e.suggested_fix))
                    .unwrap_or_default();
                bail!("run failed: {e}");
            }
            return Ok(());
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    bail!("the event stream ended");
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                bar.abandon();
                bail!("gave up waiting for run {id} after {timeout:?}");
            }
        }
        if let Some(newer) = rx.borrow_and_update().clone()
            && newer.supersedes(&current)
        {
            current = (*newer).clone();
            fresh = true;
        }
    }
}

/// What the status page shows, on the terminal (the API's `/v1/overview`).
pub async fn overview(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let redis = syncfleet_shared::redis_pool::connect(&settings.redis).await?;
    let metrics = syncfleet_shared::metrics::Metrics::new(syncfleet_shared::metrics::Role::Producer);
    let publisher = crate::publish::JobPublisher::connect(settings, metrics).await?;
    let o = crate::api::routes::build_overview(&db, &publisher, &redis, &settings.redis.key_prefix)
        .await
        .map_err(|e| anyhow!("{}", e.message))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&o)?);
        return Ok(());
    }
    let count = |n: Option<u32>| n.map_or_else(|| "?".to_string(), |n| n.to_string());
    println!(
        "queue: {} ready, {} high priority, {} parked, {} consumers{}",
        count(o.queue.ready),
        count(o.queue.high_ready),
        count(o.queue.parked),
        count(o.queue.consumers),
        o.queue.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
    );
    println!("active runs: {}", o.active.len());
    for run in &o.active {
        let of = run.progress.estimated_total.map(|t| format!("/{t}")).unwrap_or_default();
        println!(
            "  {} {} {} {}{of} pages, {} requests",
            run.id, run.mode, run.status, run.counters.pages_seen, run.counters.requests
        );
    }
    println!("integrations:");
    for i in &o.integrations {
        let budget = match (i.backlog_ms, i.paused_ms, i.circuit_open, i.rate_factor) {
            (Some(backlog), Some(paused), Some(open), Some(factor)) => format!(
                "backlog {backlog:.0} ms, paused {paused} ms, circuit {}, rate factor {factor:.2}",
                if open { "open" } else { "closed" }
            ),
            _ => "budget unreadable (Redis)".to_string(),
        };
        println!(
            "  {}: {}/s burst {}; {} requests in the last hour ({:.0}% of the rate); {budget}",
            i.slug,
            i.rate,
            i.burst,
            i.requests_last_hour,
            i.use_last_hour * 100.0
        );
    }
    println!("databases, last 24 h:");
    for d in &o.databases {
        println!(
            "  {} ({}){}: {} runs, {} failed, {} pages; last {}{}",
            d.title,
            d.id,
            if d.enabled { "" } else { " [disabled]" },
            d.runs,
            d.failed,
            d.pages,
            d.last_status.as_deref().unwrap_or("never run"),
            d.last_duration_secs.map(|s| format!(", took {s:.1}s")).unwrap_or_default(),
        );
    }
    println!("failures, last 24 h: {}", o.failures.len());
    for run in &o.failures {
        let e = run.error.as_ref().map(|e| format!("{}: {}", e.kind, e.message)).unwrap_or_default();
        println!("  {} {} {}", run.id, run.enqueued_at.format("%Y-%m-%d %H:%M:%S"), e);
    }
    Ok(())
}

pub async fn stats(settings: &Settings, hours: u32, json: bool) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let stats = model::stats(&db, Some(hours)).await?.map_err(|e| anyhow!("--{}: {}", e.field, e.message))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    let pct = |r: Option<f64>| r.map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "-".into());
    let s = |d: Option<f64>| d.map(|d| format!("{d:.1}s")).unwrap_or_else(|| "-".into());
    println!(
        "last {} h: {} runs, {} success, p50 {}, p95 {}, {} pages ({:.0}/h), {} requests, {} rate-limited",
        stats.hours,
        stats.overall.runs,
        pct(stats.overall.success_rate),
        s(stats.overall.p50_duration_secs),
        s(stats.overall.p95_duration_secs),
        stats.overall.pages,
        stats.overall.pages_per_hour,
        stats.overall.requests,
        stats.overall.rate_limited
    );
    for d in &stats.databases {
        let title: String = d.title.chars().take(30).collect();
        println!(
            "  {:<30} {:>5} runs {:>7} p50 {:>8} p95 {:>8} {:>9} pages {:>7} req {:>5} 429",
            title,
            d.stats.runs,
            pct(d.stats.success_rate),
            s(d.stats.p50_duration_secs),
            s(d.stats.p95_duration_secs),
            d.stats.pages,
            d.stats.requests,
            d.stats.rate_limited
        );
    }
    Ok(())
}

pub async fn list_databases(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let list = model::databases(&db).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for d in &list {
        println!(
            "{}  {:<30} {:<12} {:>8} pages  {}  interval {}  last run {}",
            d.id,
            d.title.chars().take(30).collect::<String>(),
            d.integration,
            d.pages,
            if d.enabled { "enabled " } else { "disabled" },
            d.interval_secs.map(|s| format!("{s}s")).unwrap_or_else(|| "default".into()),
            d.last_run.as_ref().map(|r| r.status.as_str()).unwrap_or("-"),
        );
    }
    Ok(())
}

pub async fn show_database(settings: &Settings, id: &str, json: bool) -> anyhow::Result<()> {
    let id = id_arg("id", id)?;
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let d = model::database(&db, id).await?.ok_or_else(|| anyhow!("database {id} is not registered"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        println!("{} {:?} (integration {}, data source {})", d.id, d.title, d.integration, d.data_source_id);
        println!(
            "  {} · interval {} · {} pages · last success {}",
            if d.enabled { "enabled" } else { "disabled" },
            d.interval_secs.map(|s| format!("{s}s")).unwrap_or_else(|| "default".into()),
            d.pages,
            d.last_success_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
        );
        println!("  mapping: {}", d.mapping);
    }
    Ok(())
}

pub async fn update_database(settings: &Settings, args: &UpdateArgs) -> anyhow::Result<()> {
    let id = id_arg("id", &args.id)?;
    let mapping = match &args.mapping_file {
        None => None,
        Some(path) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(path).map_err(|e| anyhow!("{}: {e}", path.display()))?,
            )
            .map_err(|e| anyhow!("{}: {e}", path.display()))?,
        ),
    };
    let patch = model::UpdateDatabase {
        interval_secs: if args.default_interval { Some(None) } else { args.interval_secs.map(Some) },
        enabled: if args.enable {
            Some(true)
        } else if args.disable {
            Some(false)
        } else {
            None
        },
        mapping,
        // Cron schedules are set with `database schedule`.
        cron: None,
        tz: None,
        jitter_secs: None,
    };
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let d = model::update_database(&db, id, &patch)
        .await?
        .map_err(|e| anyhow!("{}: {}", e.field, e.message))?
        .ok_or_else(|| anyhow!("database {id} is not registered"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        println!(
            "database {} updated: {}, interval {}",
            d.id,
            if d.enabled { "enabled" } else { "disabled" },
            d.interval_secs.map(|s| format!("{s}s")).unwrap_or_else(|| "default".into())
        );
    }
    Ok(())
}
