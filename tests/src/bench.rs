//! The rate-budget benchmarks of `script/bench` (`syncfleet-bench run <scenario>`): real worker
//! processes, notion-sim with the same rate and burst as the fleet, and utilisation measured at
//! the simulator from its request log — never from the clients' own counts.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::fleet::{Fleet, FleetOptions};

/// One multi-database run of the fleet.
#[derive(Debug, Clone)]
pub struct BudgetScenario {
    pub name: &'static str,
    pub integrations: u64,
    pub databases: u64,
    pub pages: u64,
    pub rate: f64,
    pub burst: u32,
    pub workers: usize,
    pub concurrency: u16,
    pub latency_ms: u64,
    /// Rows per query (`sync.page_size`); 100 unless a scenario keeps CPU out of the picture.
    pub page_size: u8,
}

impl BudgetScenario {
    /// `budget-utilization`: 1 integration at 3/s, 8 databases × 3,000 pages, 4 workers × 4.
    pub fn utilization() -> Self {
        Self {
            name: "budget-utilization",
            integrations: 1,
            databases: 8,
            pages: 3000,
            rate: 3.0,
            burst: 3,
            workers: 4,
            concurrency: 4,
            latency_ms: 0,
            page_size: 100,
        }
    }

    /// `latency`: the same with every simulator answer 400 ms late.
    pub fn latency() -> Self {
        Self { name: "latency", latency_ms: 400, ..Self::utilization() }
    }

    /// `multi-integration`: 10 integrations × 3/s, one database of 6,000 pages each, 4 workers × 4.
    pub fn multi_integration() -> Self {
        Self {
            name: "multi-integration",
            integrations: 10,
            databases: 10,
            pages: 6000,
            ..Self::utilization()
        }
    }

    /// `multi-integration` with 10 rows per query: the same 600 requests at 30/s, but a tenth of
    /// the pages, so this 2-core machine's CPU (simulator, 4 workers and PostgreSQL at ≈3,000
    /// pages/s otherwise) does not hide what the budgets achieve.
    pub fn multi_integration_small_pages() -> Self {
        Self { name: "multi-integration-small-pages", pages: 600, page_size: 10, ..Self::multi_integration() }
    }

    /// `full-10k`: one database of 10,000 pages at 3/s, one worker.
    pub fn full_10k() -> Self {
        Self { name: "full-10k", databases: 1, pages: 10_000, workers: 1, ..Self::utilization() }
    }
}

/// Admitted requests per simulator token since `since_ms` (the syncs' queries, schema reads and
/// relation completions — everything that spends the budget): (count, first ms, last ms).
fn per_token(entries: &[Value], since_ms: f64) -> std::collections::BTreeMap<u64, (u64, f64, f64)> {
    let mut out = std::collections::BTreeMap::new();
    for e in entries {
        let (Some(token), Some(t)) = (e["token"].as_u64(), e["t_ms"].as_f64()) else { continue };
        if t < since_ms || e["status"] != 200 {
            continue;
        }
        let slot = out.entry(token).or_insert((0u64, f64::MAX, 0f64));
        slot.0 += 1;
        slot.1 = slot.1.min(t);
        slot.2 = slot.2.max(t);
    }
    out
}

/// Runs the scenario and returns its JSON line.
///
/// `utilization` per integration = (admitted requests − burst) ÷ (last − first arrival)
/// ÷ rate: the share of what a GCRA of that rate admits after its initial burst, so 1.0 is the
/// physical ceiling. The reported figure is the mean over integrations (their sum over the
/// summed rate for `multi-integration`), and the minimum is given too.
pub async fn run_budget(s: &BudgetScenario) -> anyhow::Result<Value> {
    let name = format!("syncfleet_bench_{}", s.name.replace('-', "_"));
    let options = FleetOptions {
        databases: s.databases,
        burst: s.burst,
        latency_ms: s.latency_ms,
        integrations: s.integrations,
        ..FleetOptions::new(&name, s.pages, s.rate)
    };
    eprintln!(
        "{}: {} database(s) × {} pages, {} integration(s) at {}/s…",
        s.name, s.databases, s.pages, s.integrations, s.rate
    );
    let mut fleet = Fleet::start(options).await?;
    let result = measure(&mut fleet, s).await;
    fleet.discard().await;
    result
}

async fn measure(fleet: &mut Fleet, s: &BudgetScenario) -> anyhow::Result<Value> {
    let ids = fleet.register().await?;
    fleet.set_env("SYNCFLEET_SYNC__PAGE_SIZE", &s.page_size.to_string());
    fleet.spawn_workers(s.workers, s.concurrency)?;
    // Every worker consumes before the jobs go out, so they start together.
    fleet.wait_consumers(s.workers as u32, Duration::from_secs(60)).await?;
    let since = fleet.sim_stats().await?["requests_total"].as_u64().unwrap_or_default();
    let log_url = format!("{}/_sim/requests", fleet.sim_url);
    let since_ms =
        reqwest::get(&log_url).await?.json::<Value>().await?["now_ms"].as_f64().unwrap_or_default();
    let cpu = fleet.cpu_meter();
    fleet.enqueue_all(&ids, syncfleet_shared::job::SyncMode::Full).await?;
    let db = fleet.db().await?;
    let expected_requests = (s.pages as f64 / f64::from(s.page_size.max(1))).ceil() as u64;
    let budget_secs = (expected_requests * s.databases) as f64 / (s.rate * s.integrations as f64);
    let runs = wait_final(&db, &ids, Duration::from_secs_f64(budget_secs * 3.0 + 120.0)).await?;
    let stats = fleet.sim_stats().await?;
    let log: Value = reqwest::get(&log_url).await?.json().await?;
    let entries = log["entries"].as_array().cloned().unwrap_or_default();
    let tokens = per_token(&entries, since_ms);
    let mut utilizations = Vec::new();
    let (mut admitted, mut first, mut last) = (0u64, f64::MAX, 0f64);
    for (n, t0, t1) in tokens.values() {
        let window = (t1 - t0) / 1000.0;
        if *n > u64::from(s.burst) && window > 0.0 {
            utilizations.push((*n - u64::from(s.burst)) as f64 / window / s.rate);
        }
        admitted += n;
        first = first.min(*t0);
        last = last.max(*t1);
    }
    if utilizations.len() as u64 != s.integrations {
        bail!(
            "{}: expected query traffic from {} integrations, saw {}",
            s.name,
            s.integrations,
            utilizations.len()
        );
    }
    let aggregate = (admitted - u64::from(s.burst) * s.integrations) as f64
        / ((last - first) / 1000.0)
        / (s.rate * s.integrations as f64);
    let min = utilizations.iter().cloned().fold(f64::MAX, f64::min);
    let failed: Vec<&str> =
        runs.iter().filter(|r| r.status != "succeeded").map(|r| r.status.as_str()).collect();
    if !failed.is_empty() {
        bail!("{}: runs ended {failed:?}", s.name);
    }
    let pages: i64 = runs.iter().map(|r| r.pages).sum();
    let cpu = cpu.fields(&fleet.worker_pids(), pages as u64);
    let elapsed = runs.iter().map(|r| r.elapsed).fold(0.0, f64::max);
    let mut line = json!({
        "scenario": s.name,
        "utilization": round(aggregate),
        "utilization_min": round(min),
        "rate_limited": stats["rate_limited_total"],
        "admitted_requests": admitted,
        "requests_total": stats["requests_total"].as_u64().unwrap_or_default() - since,
        "pages": pages,
        "elapsed_s": round(elapsed),
        "integrations": s.integrations,
        "databases": s.databases,
        "pages_per_database": s.pages,
        "rate": s.rate,
        "burst": s.burst,
        "workers": s.workers,
        "concurrency": s.concurrency,
        "latency_ms": s.latency_ms,
        "page_size": s.page_size,
        "date": chrono::Utc::now().to_rfc3339(),
    });
    extend(&mut line, cpu);
    if s.databases == 1 {
        // The yardstick: the query requests alone, ⌈pages/100⌉ ÷ rate.
        let minimum = expected_requests as f64 / s.rate;
        line["minimum_s"] = json!(round(minimum));
        line["ratio"] = json!(round(elapsed / minimum));
        // What this run had to send (plus the schema read and relation completions), with the
        // burst going out at once: the physical floor for this data at this rate.
        let floor = admitted.saturating_sub(u64::from(s.burst)) as f64 / s.rate;
        line["floor_for_requests_made_s"] = json!(round(floor));
        line["ratio_to_floor"] = json!(round(elapsed / floor));
    }
    Ok(line)
}

/// A run's figures, as `sync_runs` records them.
#[derive(Debug, Clone)]
pub struct RunFigures {
    pub status: String,
    pub pages: i64,
    pub created: i64,
    pub updated: i64,
    pub requests: i64,
    pub rate_limited: i64,
    /// From enqueue to the final commit, per PostgreSQL's clock.
    pub elapsed: f64,
}

/// The latest run of a database, if it has one.
pub async fn latest_run(db: &DatabaseConnection, database_id: Uuid) -> anyhow::Result<Option<RunFigures>> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT status, pages_seen, pages_created, pages_updated, requests, rate_limited, \
                    EXTRACT(EPOCH FROM (finished_at - enqueued_at))::float8 AS elapsed \
             FROM sync_runs WHERE database_id = $1 ORDER BY enqueued_at DESC LIMIT 1",
            [database_id.into()],
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(RunFigures {
        status: row.try_get("", "status")?,
        pages: row.try_get("", "pages_seen")?,
        created: row.try_get("", "pages_created")?,
        updated: row.try_get("", "pages_updated")?,
        requests: row.try_get("", "requests")?,
        rate_limited: row.try_get("", "rate_limited")?,
        elapsed: row.try_get::<Option<f64>>("", "elapsed")?.unwrap_or_default(),
    }))
}

/// Waits until the latest run of every database in `ids` is final; their figures, in order.
pub async fn wait_final(
    db: &DatabaseConnection,
    ids: &[Uuid],
    timeout: Duration,
) -> anyhow::Result<Vec<RunFigures>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut done = Vec::new();
        for id in ids {
            if let Some(run) = latest_run(db, *id).await?
                && syncfleet_shared::db::entities::sync_run::status::is_final(&run.status)
            {
                done.push(run);
            }
        }
        if done.len() == ids.len() {
            return Ok(done);
        }
        if Instant::now() > deadline {
            bail!("{} of {} runs finished within {timeout:?}", done.len(), ids.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers the fleet's databases, starts one worker and fully syncs them (limit off).
async fn synced(fleet: &mut Fleet) -> anyhow::Result<(Vec<Uuid>, DatabaseConnection)> {
    let ids = fleet.register().await?;
    fleet.spawn_workers(1, 4)?;
    let db = fleet.db().await?;
    fleet.enqueue_all(&ids, syncfleet_shared::job::SyncMode::Full).await?;
    let full = wait_final(&db, &ids, Duration::from_secs(1800)).await?;
    if let Some(bad) = full.iter().find(|r| r.status != "succeeded") {
        bail!("the first full sync ended {}", bad.status);
    }
    Ok((ids, db))
}

/// `incremental-noop` and `incremental-1pct`: a full sync of `pages`, then an incremental run on
/// the unchanged database, then `edits` edits in Notion and another incremental run. Requests
/// are counted at the simulator; rows written = pages created + updated by the run.
pub async fn run_incremental(pages: u64, edits: u64) -> anyhow::Result<Vec<Value>> {
    let name = "syncfleet_bench_incremental";
    let options = FleetOptions { burst: 100, ..FleetOptions::new(name, pages, 0.0) };
    eprintln!("incremental: a full sync of {pages} pages first…");
    let mut fleet = Fleet::start(options).await?;
    let result = async {
        let (ids, db) = synced(&mut fleet).await?;
        let mut lines = Vec::new();
        for (scenario, edit) in [("incremental-noop", 0), ("incremental-1pct", edits)] {
            if edit > 0 {
                let body = json!({"edit": edit});
                reqwest::Client::new()
                    .post(format!("{}/_sim/mutate", fleet.sim_url))
                    .json(&body)
                    .send()
                    .await?
                    .error_for_status()?;
            }
            let before = fleet.sim_stats().await?["requests_total"].as_u64().unwrap_or_default();
            let cpu = fleet.cpu_meter();
            fleet.enqueue_all(&ids, syncfleet_shared::job::SyncMode::Incremental).await?;
            let runs = wait_final(&db, &ids, Duration::from_secs(600)).await?;
            let run = &runs[0];
            let cpu = cpu.fields(&fleet.worker_pids(), run.pages.max(0) as u64);
            let requests = fleet.sim_stats().await?["requests_total"].as_u64().unwrap_or_default() - before;
            let target = if edit > 0 { edit.div_ceil(100) + 2 } else { 2 };
            let mut line = json!({
                "scenario": scenario,
                "synced_pages": pages,
                "edits": edit,
                "status": run.status,
                "requests": requests,
                "requests_target_max": target,
                "rows_written": run.created + run.updated,
                "pages_read": run.pages,
                "elapsed_s": round(run.elapsed),
                "date": chrono::Utc::now().to_rfc3339(),
            });
            extend(&mut line, cpu);
            lines.push(line);
        }
        Ok(lines)
    }
    .await;
    fleet.discard().await;
    result
}

/// `single-database-latency`: one large database (first synced with the limit off), then
/// reconciled at 3/s with every answer 400 ms late — once read as one chain
/// (`sync.max_chains` = 1), once as concurrent `created_time` ranges (the default).
pub async fn run_single_database_latency(pages: u64) -> anyhow::Result<Vec<Value>> {
    let name = "syncfleet_bench_single_latency";
    let options = FleetOptions { burst: 100, ..FleetOptions::new(name, pages, 0.0) };
    eprintln!("single-database-latency: a first sync of {pages} pages with the limit off…");
    let mut fleet = Fleet::start(options).await?;
    let result = async {
        let (ids, db) = synced(&mut fleet).await?;
        let (rate, burst) = (3.0, 3u32);
        reqwest::Client::new()
            .post(format!("{}/_sim/config", fleet.sim_url))
            .json(&json!({"rate": rate, "burst": burst, "latency_ms": 400}))
            .send()
            .await?
            .error_for_status()?;
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE integrations SET rate_per_second = $1, burst = $2",
            [rate.into(), (burst as i32).into()],
        ))
        .await?;
        let mut lines = Vec::new();
        for max_chains in [1u8, 4] {
            fleet.stop_workers().await;
            fleet.set_env("SYNCFLEET_SYNC__MAX_CHAINS", &max_chains.to_string());
            fleet.spawn_workers(1, 4)?;
            fleet.wait_consumers(1, Duration::from_secs(60)).await?;
            let log_url = format!("{}/_sim/requests", fleet.sim_url);
            let since_ms =
                reqwest::get(&log_url).await?.json::<Value>().await?["now_ms"].as_f64().unwrap_or_default();
            let cpu = fleet.cpu_meter();
            fleet.enqueue_all(&ids, syncfleet_shared::job::SyncMode::Full).await?;
            let runs = wait_final(&db, &ids, Duration::from_secs(3600)).await?;
            let cpu = cpu.fields(&fleet.worker_pids(), runs[0].pages.max(0) as u64);
            let log: Value = reqwest::get(&log_url).await?.json().await?;
            let tokens =
                per_token(log["entries"].as_array().map(Vec::as_slice).unwrap_or_default(), since_ms);
            let (n, t0, t1) = tokens.values().next().copied().context("no traffic")?;
            let utilization = n.saturating_sub(u64::from(burst)) as f64 / ((t1 - t0) / 1000.0) / rate;
            let floor = n.saturating_sub(u64::from(burst)) as f64 / rate;
            let mut line = json!({
                "scenario": "single-database-latency",
                "max_chains": max_chains,
                "pages": pages,
                "status": runs[0].status,
                "utilization": round(utilization),
                "admitted_requests": n,
                "rate_limited": fleet.sim_stats().await?["rate_limited_total"],
                "elapsed_s": round(runs[0].elapsed),
                "floor_for_requests_made_s": round(floor),
                "ratio_to_floor": round(runs[0].elapsed / floor),
                "latency_ms": 400,
                "rate": rate,
                "date": chrono::Utc::now().to_rfc3339(),
            });
            extend(&mut line, cpu);
            lines.push(line);
        }
        Ok(lines)
    }
    .await;
    fleet.discard().await;
    result
}

/// `budget-acquire`: latency of uncontended `acquire` calls (the slot reservation plus the
/// fleet-wide pause check every Notion request makes) and the client round trips each costs,
/// counted by the Redis server. Nothing else may use this Redis while it runs.
pub async fn budget_acquire(redis_url: &str, iterations: usize) -> anyhow::Result<Value> {
    use secrecy::SecretString;
    use syncfleet_shared::budget::{Budget, BudgetKey};
    let settings = syncfleet_shared::config::RedisSettings {
        url: SecretString::from(redis_url.to_string()),
        ..Default::default()
    };
    let prefix = format!("syncfleet_bench_acquire_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let pool = syncfleet_shared::redis_pool::connect(&settings).await?;
    let budget = Budget::new(pool.clone(), &prefix);
    // Far above what the loop can reach, so no call ever waits: this measures the mechanism.
    let key = BudgetKey { integration: "bench".into(), rate: 1_000_000.0, burst: 1000 };
    for _ in 0..200 {
        budget.acquire(&key).await?;
    }
    let mut conn = pool.get().await.context("redis")?;
    let commands_before = client_commands(&mut conn).await?;
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        budget.acquire(&key).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let commands = client_commands(&mut conn).await? - commands_before;
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:{{bench}}:gcra"))
        .arg(format!("{prefix}:{{bench}}:rate"))
        .query_async(&mut conn)
        .await?;
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    Ok(json!({
        "scenario": "budget-acquire",
        "iterations": iterations,
        "p50_us": round(pct(0.50)),
        "p99_us": round(pct(0.99)),
        "max_us": round(pct(1.0)),
        "redis_round_trips_per_request": round(commands as f64 / iterations as f64),
        "redis": "127.0.0.1 loopback",
        "date": chrono::Utc::now().to_rfc3339(),
    }))
}

/// Commands clients sent (one round trip each), from `INFO commandstats`. The commands a Lua
/// script runs inside Redis are counted there too, under their own names, so only the ones a
/// client sends itself are added up: EVALSHA/EVAL (the scripts), PTTL (the pause check) and
/// SCRIPT (loading a script the first time).
async fn client_commands(conn: &mut syncfleet_shared::redis_pool::RedisConnection) -> anyhow::Result<i64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await?;
    let calls = |name: &str| -> i64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok(["evalsha", "eval", "pttl", "script"].iter().map(|c| calls(c)).sum())
}

/// Adds `fields` to a JSON object line.
pub fn extend(line: &mut Value, fields: serde_json::Map<String, Value>) {
    if let Some(map) = line.as_object_mut() {
        map.extend(fields);
    }
}

pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
