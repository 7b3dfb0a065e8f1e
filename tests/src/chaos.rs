//! The chaos run behind `script/chaos`: a 3-worker fleet and a `serve` scheduler sync several
//! databases of two integrations while Notion misbehaves (5xx, resets, slow answers, a 429
//! storm, index lag, cursor drift), workers are killed, RabbitMQ, Redis and PostgreSQL restart
//! (private instances), a token is revoked and malformed messages arrive. At the end PostgreSQL
//! is compared row by row with the simulator's export, and one JSON line says what was lost.
//!
//! Every wait is bounded; the run stops by itself.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use nix::sys::signal::Signal;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use serde_json::{Value, json};
use syncfleet_shared::config::RetryTier;
use syncfleet_shared::job::SyncMode;
use tokio::sync::Mutex;

use crate::harness::{Servers, TestEnv};
use crate::private::{PrivatePostgres, PrivateRabbit, PrivateRedis};
use crate::sim::SimConfig;

const HEALTHY: &str = "secret_chaos_healthy";
const REVOKED: &str = "secret_chaos_revoked";
const WORKERS: usize = 3;

/// What one chaos run found.
#[derive(Debug, Default, Serialize)]
pub struct ChaosReport {
    pub jobs_total: i64,
    pub jobs_succeeded: i64,
    pub jobs_failed: i64,
    pub jobs_skipped: i64,
    pub jobs_dead_lettered: usize,
    pub malformed_published: usize,
    pub jobs_lost: i64,
    pub rows_mismatched: usize,
    pub duplicate_rows: i64,
    pub runs_left_nonterminal: i64,
    pub revoked_failed_first_attempt: bool,
    /// Notifications about the revoked integration (must be exactly one), and about the
    /// malformed messages (one, as a broken publisher).
    pub revoked_notifications: usize,
    pub invalid_job_notifications: usize,
    pub worker_restarts: usize,
    pub unexpected_exits: usize,
    /// Seconds from each fault to the first run that succeeded after it.
    pub recovery_secs: BTreeMap<String, f64>,
    pub elapsed_secs: f64,
}

impl ChaosReport {
    /// The run passes when nothing was lost, wrong, duplicated or left hanging.
    pub fn passed(&self) -> bool {
        self.jobs_lost == 0
            && self.rows_mismatched == 0
            && self.duplicate_rows == 0
            && self.runs_left_nonterminal == 0
            && self.jobs_dead_lettered >= self.malformed_published
            && self.revoked_failed_first_attempt
            && self.revoked_notifications == 1
            && self.invalid_job_notifications <= 1
            && self.unexpected_exits == 0
    }
}

/// A local webhook receiver that records what it is sent.
async fn receiver() -> anyhow::Result<(Arc<Mutex<Vec<Value>>>, String)> {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let state = bodies.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<Value>| {
            let state = state.clone();
            async move {
                state.lock().await.push(body.0);
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    Ok((bodies, format!("http://{addr}/hook")))
}

async fn scalar(env: &TestEnv, sql: &str) -> anyhow::Result<i64> {
    let row = env
        .db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_string()))
        .await?
        .context("no row")?;
    Ok(row.try_get_by_index::<i64>(0)?)
}

/// Runs the whole scenario; `seconds` is how long faults keep coming.
pub async fn run(seconds: u64) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let progress = |what: &str| eprintln!("chaos: {:>6.1}s {what}", started.elapsed().as_secs_f64());
    let redis = PrivateRedis::start().await.context("private redis")?;
    progress("private redis up");
    let pg = PrivatePostgres::start().await.context("private postgresql")?;
    progress("private postgresql up");
    let rabbit = PrivateRabbit::start().await.context("private rabbitmq")?;
    progress("private rabbitmq up");
    let mut redis = redis;
    let (bodies, hook) = receiver().await?;
    let sim = SimConfig {
        pages: 1500,
        databases: 4,
        rate: 30.0,
        burst: 5,
        latency_ms: 10,
        tokens: vec![HEALTHY.into(), REVOKED.into()],
        ..SimConfig::default()
    };
    let servers = Servers {
        pg_admin: Some(pg.admin_url()),
        redis: Some(redis.url()),
        amqp: Some(rabbit.url()),
        ..Servers::default()
    };
    let mut env = TestEnv::start_on(sim, servers).await?;
    env.settings.amqp.retry_tiers = [2_000u64, 5_000, 10_000, 20_000]
        .iter()
        .map(|ms| RetryTier { name: format!("{}s", ms / 1000), delay_ms: *ms })
        .collect();
    env.settings.notion.timeout_secs = 2;
    let ids: Vec<uuid::Uuid> = env.sim.state.read().databases.iter().map(|d| d.id).collect();
    for (slug, token, dbs) in [("healthy", HEALTHY, &ids[..3]), ("revoked", REVOKED, &ids[3..])] {
        syncfleet_producer::commands::integration::save(
            &env.settings,
            slug,
            None,
            Some(30.0),
            Some(5),
            &secrecy::SecretString::from(token.to_string()),
        )
        .await?;
        for db in dbs {
            syncfleet_producer::commands::database::add(&env.settings, slug, *db, None, None, false).await?;
        }
    }
    let worker_env =
        [("SYNCFLEET_NOTIFY__WEBHOOK_URL", hook.as_str()), ("SYNCFLEET_WORKER__LEASE_SECS", "5")];
    let scheduler = [
        ("SYNCFLEET_SCHEDULER__TICK_SECS", "1"),
        ("SYNCFLEET_SCHEDULER__DEFAULT_INTERVAL_SECS", "4"),
        ("SYNCFLEET_SCHEDULER__FULL_EVERY_SECS", "20"),
        ("SYNCFLEET_SCHEDULER__FAILURE_BACKOFF_SECS", "600"),
        ("SYNCFLEET_SCHEDULER__REAP_RUNNING_AFTER_SECS", "15"),
    ];
    let mut fleet = Fleet {
        workers: Vec::new(),
        producer: env.spawn_producer(&[], &scheduler)?,
        expected: HashSet::new(),
        restarts: 0,
        unexpected: 0,
        worker_env,
        scheduler,
    };
    fleet.supervise(&mut env, &progress)?;
    progress("fleet started; faults begin");
    env.sim_admin(
        "config",
        json!({"error_rate": 0.10, "reset_rate": 0.02, "slow_rate": 0.01, "slow_ms": 2500,
               "index_lag_ms": 1500, "offset_cursors": true}),
    )
    .await?;

    let mut faults: Vec<(String, DateTime<Utc>)> = Vec::new();
    let mut malformed = 0usize;
    let plan: Vec<(u64, &str)> = vec![
        (3, "kill9_1"),
        (6, "malformed"),
        (8, "storm_429"),
        (10, "revoke"),
        (13, "kill9_2"),
        (16, "redis_restart"),
        (22, "postgres_restart"),
        (28, "rabbitmq_restart"),
        (34, "kill9_3"),
    ];
    let scale = seconds as f64 / 40.0;
    let t0 = Instant::now();
    let mut next = 0usize;
    let mut tick = 0u64;
    while t0.elapsed() < Duration::from_secs(seconds) {
        // Notion keeps changing under the fleet (the healthy integration's databases).
        let db = ids[(tick as usize) % 3];
        env.sim_admin("mutate", json!({"database_id": db, "edit": 4, "create": 2, "trash": 1})).await?;
        tick += 1;
        while next < plan.len() && t0.elapsed().as_secs_f64() >= plan[next].0 as f64 * scale {
            let (_, fault) = plan[next];
            next += 1;
            progress(fault);
            let at = Utc::now();
            match fault {
                f if f.starts_with("kill9") => {
                    if let Some(pid) = fleet.workers.pop() {
                        env.signal_worker(pid, Signal::SIGKILL)?;
                        fleet.expected.insert(pid);
                    }
                }
                "malformed" => malformed += publish_malformed(&env).await?,
                "storm_429" => {
                    env.sim_admin("faults", json!({"status": 429, "retry_after": 1, "count": 25})).await?;
                }
                "revoke" => {
                    env.sim_admin("revoke", json!({"token": REVOKED})).await?;
                    env.enqueue("revoked", ids[3], SyncMode::Incremental).await?;
                }
                "redis_restart" => redis.restart().await?,
                "postgres_restart" => {
                    pg.stop().await?;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    pg.up().await?;
                }
                "rabbitmq_restart" => {
                    rabbit.restart().await?;
                    // Every worker loses its connection and exits (serve reconnects instead).
                    fleet.expected.extend(fleet.workers.iter().copied());
                }
                _ => {}
            }
            faults.push((fault.to_string(), at));
        }
        fleet.supervise(&mut env, &progress)?;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // Calm: no more faults; every database gets a last full reconciliation.
    progress("calm: final full runs");
    env.sim_admin(
        "config",
        json!({"error_rate": 0.0, "reset_rate": 0.0, "slow_rate": 0.0, "index_lag_ms": 0, "offset_cursors": false}),
    )
    .await?;
    // (Turning the index lag off above made the index catch up at once.)
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut finals = Vec::new();
    for db in &ids[..3] {
        finals.push(enqueue_with_retry(&env, *db, deadline).await?);
    }
    fleet.settle(&mut env, &finals, deadline, &progress).await?;
    // Stop scheduling, let what the scheduler published before it stopped finish, then stop the
    // workers and count. Counting as soon as the fleet looked settled raced with a job the
    // scheduler published just after: it was still running when the count was taken.
    progress("stopping the scheduler");
    let producer = fleet.producer;
    env.signal_worker(producer, Signal::SIGTERM)?;
    if let Err(e) = env.wait_worker_exit(producer, Duration::from_secs(30)).await {
        fleet.unexpected += 1;
        progress(&format!("the scheduler did not stop on SIGTERM: {e:#}"));
    }
    fleet.settle(&mut env, &finals, Instant::now() + Duration::from_secs(60), &progress).await?;
    progress("counting");
    for pid in env.child_pids() {
        env.signal_worker(pid, Signal::SIGTERM)?;
    }
    for pid in env.child_pids() {
        if let Err(e) = env.wait_worker_exit(pid, Duration::from_secs(60)).await {
            fleet.unexpected += 1;
            progress(&format!("worker {pid} did not stop on SIGTERM: {e:#}"));
        }
    }
    let mut report = ChaosReport {
        malformed_published: malformed,
        worker_restarts: fleet.restarts,
        unexpected_exits: fleet.unexpected,
        ..ChaosReport::default()
    };
    report.jobs_total = scalar(&env, "SELECT count(*) FROM sync_runs").await?;
    report.jobs_succeeded =
        scalar(&env, "SELECT count(*) FROM sync_runs WHERE status IN ('succeeded', 'partial')").await?;
    report.jobs_failed = scalar(&env, "SELECT count(*) FROM sync_runs WHERE status = 'failed'").await?;
    report.jobs_skipped = scalar(&env, "SELECT count(*) FROM sync_runs WHERE status = 'skipped'").await?;
    report.runs_left_nonterminal = scalar(
        &env,
        "SELECT count(*) FROM sync_runs WHERE status IN ('queued', 'running', 'retrying', 'abandoned')",
    )
    .await?;
    // Lost: a healthy database's request that no successful run served (every skipped job
    // needs a later successful run; every failed healthy run is a loss).
    report.jobs_lost = scalar(
        &env,
        &format!(
            "SELECT (SELECT count(*) FROM sync_runs s WHERE s.status = 'skipped' AND s.integration = 'healthy' \
               AND NOT EXISTS (SELECT 1 FROM sync_runs r WHERE r.database_id = s.database_id \
                 AND r.status IN ('succeeded', 'partial') AND r.started_at >= s.enqueued_at)) \
             + (SELECT count(*) FROM sync_runs WHERE integration = 'healthy' AND status = 'failed') \
             + (SELECT count(*) FROM sync_runs WHERE id IN ({}) AND status NOT IN ('succeeded', 'partial', 'skipped'))",
            finals.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",")
        ),
    )
    .await?;
    // A 401 is permanent: the revoked integration's runs fail without going through a retry tier
    // for it (a run's attempt only grows through tiers taken for other, transient faults).
    report.revoked_failed_first_attempt = scalar(
        &env,
        "SELECT count(*) FROM sync_runs WHERE integration = 'revoked' AND error_kind = 'notion_unauthorized' AND status = 'failed'",
    )
    .await?
        >= 1;
    report.duplicate_rows =
        scalar(&env, "SELECT count(*) - count(DISTINCT (database_id, page_id)) FROM notion_pages").await?;
    for db in &ids[..3] {
        let r = env.verify(*db).await?;
        report.rows_mismatched += r.missing + r.extra + r.different;
    }
    report.jobs_dead_lettered = env.drain_dead_letters().await?.len();
    for body in bodies.lock().await.iter() {
        let text = body["text"].as_str().unwrap_or_default();
        if text.contains("integration revoked") {
            report.revoked_notifications += 1;
        } else if text.contains("invalid_job") {
            report.invalid_job_notifications += 1;
        }
    }
    for (fault, at) in &faults {
        let secs = scalar(
            &env,
            &format!(
                "SELECT COALESCE((EXTRACT(EPOCH FROM min(finished_at) - '{at}'::timestamptz) * 1000)::bigint, -1) \
                 FROM sync_runs WHERE status = 'succeeded' AND finished_at > '{at}'"
            ),
        )
        .await?;
        report.recovery_secs.insert(fault.clone(), if secs < 0 { -1.0 } else { secs as f64 / 1000.0 });
    }
    report.elapsed_secs = (started.elapsed().as_millis() as f64 / 100.0).round() / 10.0;
    if report.runs_left_nonterminal > 0 {
        // Which runs, and where they stopped: enough to tell a slow calm phase from a lost job.
        let rows = env
            .db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT format('%s db=%s status=%s attempt=%s worker=%s error=%s heartbeat=%s enqueued=%s', \
                        id, database_id, status, attempt, worker, error_kind, heartbeat_at, enqueued_at) \
                 FROM sync_runs WHERE status IN ('queued', 'running', 'retrying', 'abandoned')"
                    .to_string(),
            ))
            .await?;
        for row in rows {
            eprintln!("chaos: left nonterminal: {}", row.try_get_by_index::<String>(0)?);
        }
    }
    if fleet.unexpected > 0 {
        // Why they exited: each process's last words are in the shared log.
        for line in env.log().lines().filter(|l| is_exit_cause(l)) {
            eprintln!("chaos: log: {line}");
        }
    }
    env.cleanup().await;
    drop((pg, rabbit, redis));
    Ok(report)
}

/// The run's processes, restarted when they exit, and which exits the run caused.
struct Fleet<'a> {
    workers: Vec<u32>,
    producer: u32,
    /// Processes this run made exit (kill -9, a RabbitMQ restart): their exit is planned
    /// whenever it comes (a worker that lost RabbitMQ drains its jobs first, which can outlast
    /// the fault loop). Any other exit is unexpected and is printed with its role and code.
    expected: HashSet<u32>,
    restarts: usize,
    unexpected: usize,
    worker_env: [(&'a str, &'a str); 2],
    scheduler: [(&'a str, &'a str); 5],
}

impl Fleet<'_> {
    /// Waits (until `deadline`) for the final runs to end and for the fleet to be idle: nothing
    /// running, no rerun request pending, nothing waiting in the work and park queues.
    async fn settle(
        &mut self,
        env: &mut TestEnv,
        finals: &[uuid::Uuid],
        deadline: Instant,
        progress: &impl Fn(&str),
    ) -> anyhow::Result<()> {
        loop {
            self.supervise(env, progress)?;
            let pending_finals = scalar(
                env,
                &format!(
                    "SELECT count(*) FROM sync_runs WHERE id IN ({}) AND status NOT IN ('succeeded', 'partial', 'skipped', 'failed')",
                    finals.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",")
                ),
            )
            .await
            .unwrap_or(1);
            let active = scalar(
                env,
                "SELECT count(*) FROM sync_runs WHERE status IN ('queued', 'running', 'retrying')",
            )
            .await
            .unwrap_or(1);
            let pending = scalar(env, "SELECT count(*) FROM notion_databases WHERE rerun_mode IS NOT NULL")
                .await
                .unwrap_or(1);
            // The malformed messages and every job have left the work and park queues.
            let ready = env.jobs_waiting().await.unwrap_or(1);
            if (pending_finals == 0 && active == 0 && pending == 0 && ready == 0) || Instant::now() > deadline
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Restarts whatever exited and brings the workers back to [`WORKERS`].
    fn supervise(&mut self, env: &mut TestEnv, progress: &impl Fn(&str)) -> anyhow::Result<()> {
        for (pid, code) in env.take_exited() {
            self.restarts += 1;
            let is_producer = pid == self.producer;
            if !self.expected.remove(&pid) {
                self.unexpected += 1;
                let role = if is_producer { "producer" } else { "worker" };
                let code = code.map_or_else(|| "a signal".to_string(), |c| format!("code {c}"));
                progress(&format!("unexpected exit: {role} pid {pid} ({code})"));
            }
            if is_producer {
                self.producer = env.spawn_producer(&[], &self.scheduler)?;
            } else {
                self.workers.retain(|p| *p != pid);
            }
        }
        while self.workers.len() < WORKERS {
            self.workers.push(env.spawn_worker_with(2, &[], &self.worker_env)?);
        }
        Ok(())
    }
}

/// A log line that says why a process stopped.
fn is_exit_cause(line: &str) -> bool {
    line.contains("stopped with an error") || line.contains("panicked") || line.starts_with("syncfleet-")
}

/// Publishes the final full job, retrying while the broker may still be coming back.
async fn enqueue_with_retry(env: &TestEnv, db: uuid::Uuid, deadline: Instant) -> anyhow::Result<uuid::Uuid> {
    loop {
        // High priority, as an operator's manual run: the high lane is under chaos too.
        let job = syncfleet_shared::job::SyncDatabaseJob {
            integration: "healthy".into(),
            database_id: db,
            mode: SyncMode::Full,
            priority: syncfleet_shared::job::Priority::High,
            reason: syncfleet_shared::job::Reason::Manual,
        };
        match env.publish_all([job]).await.map(|ids| ids.first().copied()) {
            Ok(Some(id)) => return Ok(id),
            Ok(None) => bail!("nothing was published"),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "final enqueue failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => bail!("could not enqueue the final reconciliation: {e}"),
        }
    }
}

/// At least 50 malformed messages among the real jobs.
async fn publish_malformed(env: &TestEnv) -> anyhow::Result<usize> {
    let envelope = |data: Value, id: Value| {
        json!({"specversion": "1.0", "type": "dev.syncfleet.sync_database.v1", "source": "urn:chaos", "id": id, "data": data})
            .to_string()
            .into_bytes()
    };
    let mut bodies: Vec<Vec<u8>> = vec![
        vec![0xff, 0xfe, 0x00, 0x80],
        b"not json at all".to_vec(),
        b"{\"truncated\": ".to_vec(),
        vec![b'x'; 2 * 1024 * 1024],
        b"\0\0\0".to_vec(),
        json!({"specversion": "9.9", "type": "dev.syncfleet.sync_database.v1"}).to_string().into_bytes(),
        json!({"specversion": "1.0", "type": "dev.syncfleet.sync_database.v7", "id": uuid::Uuid::new_v4()})
            .to_string()
            .into_bytes(),
    ];
    for i in 0..45u32 {
        let id = if i % 3 == 0 { json!("not-a-uuid") } else { json!(uuid::Uuid::new_v4()) };
        let data = match i % 5 {
            0 => json!({"integration": "healthy", "mode": "full"}),
            1 => json!({"integration": 42, "database_id": uuid::Uuid::new_v4(), "mode": "full"}),
            2 => {
                json!({"integration": "healthy'; DROP TABLE notion_pages; --", "database_id": "x", "mode": "full"})
            }
            3 => json!({"integration": "healthy", "database_id": uuid::Uuid::new_v4(), "mode": "sideways"}),
            _ => json!({"integration": "healthy\u{0}", "database_id": uuid::Uuid::new_v4(), "mode": "full"}),
        };
        bodies.push(envelope(data, id));
    }
    let props = BasicProperties::default().with_content_type("application/json".into());
    env.publish_raw(bodies.into_iter().map(|b| (b, props.clone())).collect()).await
}
