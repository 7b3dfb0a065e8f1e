//! `syncfleet-bench`: the demo (`script/demo`) and the benchmarks (`script/bench`), run as real
//! processes against the local services and notion-sim.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use syncfleet_tests::bench::{self, BudgetScenario, round};
use syncfleet_tests::fleet::{Fleet, FleetOptions, peak_rss_bytes};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "syncfleet-bench", about = "syncfleet demo and benchmarks")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Sync a generated database end to end with a progress bar, then check it against Notion.
    Demo {
        #[arg(long, env = "DEMO_PAGES", default_value_t = 10_000)]
        pages: u64,
        #[arg(long, env = "DEMO_RATE", default_value_t = 3.0)]
        rate: f64,
        #[arg(long, env = "DEMO_WORKERS", default_value_t = 3)]
        workers: usize,
    },
    /// Hammer one integration's shared budget from `tasks` tasks for `secs` seconds, sending
    /// `GET /v1/users` to a simulator after each admission; prints a JSON summary.
    Hammer {
        #[arg(long)]
        sim: String,
        #[arg(long, env = "HAMMER_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis: String,
        #[arg(long)]
        prefix: String,
        #[arg(long, default_value = "hammer")]
        integration: String,
        #[arg(long, default_value_t = 3.0)]
        rate: f64,
        #[arg(long, default_value_t = 3)]
        burst: u32,
        #[arg(long, default_value_t = 8)]
        tasks: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// Run benchmark scenarios; each prints one JSON line.
    Run {
        /// unthrottled, demo, budget-utilization, full-10k, multi-integration, budget-acquire,
        /// latency, incremental-noop, incremental-1pct (or incremental for both), or all
        #[arg(default_value = "all")]
        scenario: String,
        /// Pages for `unthrottled` and the incremental scenarios.
        #[arg(long, env = "BENCH_PAGES", default_value_t = 100_000)]
        pages: u64,
        /// Worker processes for `unthrottled` (the pages are then split over as many databases,
        /// so every process has one to sync).
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Demo { pages, rate, workers } => demo(pages, rate, workers).await.map(|_| ()),
        Cmd::Run { scenario, pages, workers } => run(&scenario, pages, workers.max(1)).await,
        Cmd::Hammer { sim, token, redis, prefix, integration, rate, burst, tasks, secs } => {
            hammer(HammerArgs { sim, token, redis, prefix, integration, rate, burst, tasks, secs }).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncfleet-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the demo measured.
struct DemoFigures {
    pages: i64,
    requests: u64,
    rate_limited: u64,
    elapsed: f64,
    minimum: f64,
    ratio: f64,
    floor: f64,
    ratio_to_floor: f64,
}

async fn demo(pages: u64, rate: f64, workers: usize) -> anyhow::Result<DemoFigures> {
    if rate <= 0.0 {
        bail!("DEMO_RATE must be positive");
    }
    let options = FleetOptions { narrate: true, ..FleetOptions::new("syncfleet_demo", pages, rate) };
    eprintln!("Starting notion-sim with {pages} pages at {rate} requests/s…");
    let mut fleet = Fleet::start(options).await?;
    let outcome = demo_steps(&mut fleet, pages, rate, workers).await;
    fleet.stop().await;
    outcome
}

async fn demo_steps(fleet: &mut Fleet, pages: u64, rate: f64, workers: usize) -> anyhow::Result<DemoFigures> {
    let ids = fleet.register().await?;
    let database_id = *ids.first().context("the simulator has no database")?;
    fleet.spawn_workers(workers, 4)?;
    let id = database_id.to_string();
    fleet.producer(&["enqueue", "--database", &id, "--mode", "full", "--wait"], &[], true).await?;
    let db = fleet.db().await?;
    let run = bench::wait_final(&db, &[database_id], Duration::from_secs(60)).await?.remove(0);
    let stats = fleet.sim_stats().await?;
    let minimum = (pages as f64 / 100.0).ceil() / rate;
    // The sync also reads the schema and completes relations over 25 items; with the burst of 3
    // going out at once, this is the least time its requests can take at this rate.
    let floor = (run.requests - 3).max(1) as f64 / rate;
    let figures = DemoFigures {
        pages: run.pages,
        requests: stats["requests_total"].as_u64().unwrap_or_default(),
        rate_limited: stats["rate_limited_total"].as_u64().unwrap_or_default(),
        elapsed: run.elapsed,
        minimum,
        ratio: run.elapsed / minimum,
        floor,
        ratio_to_floor: run.elapsed / floor,
    };
    println!();
    println!("  pages synced        {}", figures.pages);
    println!(
        "  Notion requests     {} ({} by the sync: the schema, the queries, relations over 25)",
        figures.requests, run.requests
    );
    println!("  429s                {}", figures.rate_limited);
    println!("  elapsed             {:.2} s (enqueue to last commit)", figures.elapsed);
    println!("  theoretical minimum {:.2} s (⌈{pages}/100⌉ requests ÷ {rate}/s)", minimum);
    println!("  ratio               {:.3}", figures.ratio);
    println!(
        "  floor for the sync  {:.2} s ({} requests − burst 3, ÷ {rate}/s): ratio {:.3}",
        floor, run.requests, figures.ratio_to_floor
    );
    let report = syncfleet_tests::verify::compare(&db, &fleet.sim_url, database_id).await?;
    if !report.is_exact() {
        bail!("PostgreSQL does not match Notion: {report:?}");
    }
    println!("  check               PostgreSQL equals notion-sim's export ({} live rows)", report.live_rows);
    println!();
    let slug = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT slug FROM notion_databases WHERE id = $1",
            [database_id.into()],
        ))
        .await?
        .map(|r| r.try_get::<String>("", "slug"))
        .transpose()?
        .unwrap_or_default();
    println!("Look at the data (the typed view of the database):");
    println!(
        "  psql postgres://postgres@127.0.0.1:5432/syncfleet_demo -c 'SELECT name, status, amount, due, tags FROM notion.\"{slug}\" LIMIT 5'"
    );
    if run.status != "succeeded" {
        bail!("run ended {}", run.status);
    }
    Ok(figures)
}

async fn run(scenario: &str, pages: u64, workers: usize) -> anyhow::Result<()> {
    let all = scenario == "all";
    let mut ran = false;
    if all || scenario == "unthrottled" {
        unthrottled(pages, workers).await?;
        ran = true;
    }
    if all || scenario == "demo" {
        let f = demo(10_000, 3.0, 3).await?;
        let line = json!({"scenario": "demo", "pages": f.pages, "rate": 3.0, "workers": 3, "requests": f.requests,
                          "rate_limited": f.rate_limited, "elapsed_s": round(f.elapsed), "minimum_s": round(f.minimum),
                          "ratio": round(f.ratio), "floor_for_requests_made_s": round(f.floor),
                          "ratio_to_floor": round(f.ratio_to_floor), "date": chrono::Utc::now().to_rfc3339()});
        println!("{line}");
        ran = true;
    }
    let budget_scenarios = [
        BudgetScenario::utilization(),
        BudgetScenario::full_10k(),
        BudgetScenario::multi_integration(),
        BudgetScenario::multi_integration_small_pages(),
        BudgetScenario::latency(),
    ];
    for s in budget_scenarios {
        if all || scenario == s.name {
            println!("{}", bench::run_budget(&s).await?);
            ran = true;
        }
    }
    if all || scenario.starts_with("incremental") {
        for line in bench::run_incremental(pages, 1000).await? {
            if all || scenario == "incremental" || line["scenario"] == scenario {
                println!("{line}");
            }
        }
        ran = true;
    }
    if all || scenario == "single-database-latency" {
        for line in bench::run_single_database_latency(24_000).await? {
            println!("{line}");
        }
        ran = true;
    }
    if all || scenario == "budget-acquire" {
        let redis = std::env::var("SYNCFLEET_REDIS__URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        println!("{}", bench::budget_acquire(&redis, 20_000).await?);
        ran = true;
    }
    if !ran {
        bail!(
            "unknown scenario {scenario} (unthrottled, demo, budget-utilization, full-10k, multi-integration, multi-integration-small-pages, budget-acquire, latency, single-database-latency, incremental-noop, incremental-1pct, incremental, all)"
        );
    }
    Ok(())
}

/// `unthrottled`: `workers` worker processes, the simulator's limit off, one database of
/// `pages`; pages/s end to end, CPU per page per process kind, and the workers' peak RSS.
async fn unthrottled(pages: u64, workers: usize) -> anyhow::Result<()> {
    let per_database = pages / workers as u64;
    let options = FleetOptions {
        burst: 100,
        databases: workers as u64,
        ..FleetOptions::new("syncfleet_bench_unthrottled", per_database, 0.0)
    };
    eprintln!("unthrottled: generating {workers} database(s) of {per_database} pages…");
    let mut fleet = Fleet::start(options).await?;
    let result = async {
        let ids = fleet.register().await?;
        fleet.spawn_workers(workers, 4)?;
        let pids = fleet.worker_pids();
        // Every worker consumes before the jobs go out, so the databases start together.
        fleet.wait_consumers(workers as u32, Duration::from_secs(60)).await?;
        let cpu = fleet.cpu_meter();
        fleet.enqueue_all(&ids, syncfleet_shared::job::SyncMode::Full).await?;
        let db = fleet.db().await?;
        let runs = bench::wait_final(&db, &ids, Duration::from_secs(1800)).await?;
        let pages = per_database * workers as u64;
        let cpu = cpu.fields(&pids, pages);
        let run = bench::RunFigures {
            status: runs.iter().find(|r| r.status != "succeeded").map_or("succeeded", |r| r.status.as_str()).to_string(),
            pages: runs.iter().map(|r| r.pages).sum(),
            created: runs.iter().map(|r| r.created).sum(),
            updated: runs.iter().map(|r| r.updated).sum(),
            requests: runs.iter().map(|r| r.requests).sum(),
            rate_limited: runs.iter().map(|r| r.rate_limited).sum(),
            elapsed: runs.iter().map(|r| r.elapsed).fold(0.0, f64::max),
        };
        let rss = pids.iter().filter_map(|pid| peak_rss_bytes(*pid)).max().unwrap_or_default();
        let rows = db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, "SELECT count(*) AS n FROM notion_pages"))
            .await?
            .map(|r| r.try_get::<i64>("", "n"))
            .transpose()?
            .unwrap_or_default();
        if run.status != "succeeded" || rows != pages as i64 {
            bail!("unthrottled run ended {} with {rows} rows", run.status);
        }
        let mut line = json!({"scenario": "unthrottled", "pages": run.pages, "workers": workers, "requests": run.requests, "rate_limited": run.rate_limited,
                          "elapsed_s": round(run.elapsed), "pages_per_s": round(run.pages as f64 / run.elapsed),
                          "worker_peak_rss_mb": round(rss as f64 / 1_048_576.0), "date": chrono::Utc::now().to_rfc3339()});
        bench::extend(&mut line, cpu);
        bench::extend(&mut line, syncfleet_tests::fleet::copy_floor(&db, pages).await?);
        if let (Some(run), Some(floor)) =
            (line["postgres_cpu_us_per_page"].as_f64(), line["postgres_copy_floor_us_per_page"].as_f64())
        {
            line["postgres_ratio_to_copy_floor"] = json!(round(run / floor.max(0.001)));
        }
        println!("{line}");
        Ok(())
    }
    .await;
    fleet.discard().await;
    result
}

struct HammerArgs {
    sim: String,
    token: String,
    redis: String,
    prefix: String,
    integration: String,
    rate: f64,
    burst: u32,
    tasks: usize,
    secs: f64,
}

/// Many tasks in one process, all drawing on one shared budget (run several processes at once).
async fn hammer(a: HammerArgs) -> anyhow::Result<()> {
    use secrecy::SecretString;
    use syncfleet_shared::budget::{Budget, BudgetKey};
    use syncfleet_shared::notion::{Endpoint, NotionClient, NotionSession};

    let mut settings = syncfleet_shared::Settings::default();
    settings.redis.url = SecretString::from(a.redis.clone());
    settings.notion.base_url = a.sim.clone();
    let pool = syncfleet_shared::redis_pool::connect(&settings.redis).await?;
    let budget = Budget::new(pool, &a.prefix);
    let key = BudgetKey { integration: a.integration.clone(), rate: a.rate, burst: a.burst };
    let session = NotionSession::new(
        NotionClient::new(
            &settings.notion,
            syncfleet_shared::metrics::Metrics::new(syncfleet_shared::metrics::Role::Worker),
        )?,
        SecretString::from(a.token),
        budget,
        key,
        &settings.notion,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(a.secs);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.tasks {
        let session = session.clone();
        tasks.spawn(async move {
            let mut ok = 0u64;
            while std::time::Instant::now() < deadline {
                let sent = session.request::<(), serde_json::Value>(Endpoint::Users, "/v1/users", None);
                match tokio::time::timeout(
                    deadline.saturating_duration_since(std::time::Instant::now()),
                    sent,
                )
                .await
                {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(e)) => return Err(anyhow::anyhow!(e)),
                    Err(_) => break,
                }
            }
            Ok(ok)
        });
    }
    let mut ok = 0;
    while let Some(joined) = tasks.join_next().await {
        ok += joined??;
    }
    let (requests, rate_limited) = session.stats().take();
    println!("{}", json!({"ok": ok, "requests": requests, "rate_limited": rate_limited}));
    Ok(())
}
