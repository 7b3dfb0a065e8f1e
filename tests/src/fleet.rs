//! A fleet of real processes on this machine: `notion-sim`, `syncfleet-worker`s and
//! `syncfleet-producer` commands, wired together through the local PostgreSQL, RabbitMQ and
//! Redis. `script/demo` and `script/bench` drive it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use secrecy::{ExposeSecret, SecretString};
use syncfleet_shared::Settings;
use syncfleet_shared::crypto::TokenCipher;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::{admin_pg_url, binary};

pub const TOKEN: &str = "secret_demo_token";

/// How to start a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Names the PostgreSQL database, the queues and the Redis prefix.
    pub name: String,
    pub pages: u64,
    pub databases: u64,
    /// notion-sim's per-token rate (0 = off) and burst; the integration gets the same.
    pub rate: f64,
    pub burst: u32,
    pub latency_ms: u64,
    /// Integrations (simulator tokens), each with its own rate; database `i` belongs to
    /// integration `i % integrations`.
    pub integrations: u64,
    /// Print each command before running it.
    pub narrate: bool,
}

impl FleetOptions {
    pub fn new(name: &str, pages: u64, rate: f64) -> Self {
        Self {
            name: name.into(),
            pages,
            databases: 1,
            rate,
            burst: 3,
            latency_ms: 0,
            integrations: 1,
            narrate: false,
        }
    }

    /// The token of integration `i` (the first is [`TOKEN`]).
    pub fn token(&self, i: u64) -> String {
        if i == 0 { TOKEN.to_string() } else { format!("{TOKEN}_{i}") }
    }

    /// The slug of integration `i`.
    pub fn integration(&self, i: u64) -> String {
        if i == 0 { "demo".to_string() } else { format!("demo-{i}") }
    }
}

pub struct Fleet {
    pub options: FleetOptions,
    pub settings: Settings,
    pub sim_url: String,
    sim: Child,
    workers: Vec<Child>,
    env: Vec<(String, String)>,
}

impl Fleet {
    /// Starts notion-sim on a free port and prepares a fresh, migrated database.
    pub async fn start(options: FleetOptions) -> anyhow::Result<Fleet> {
        let mut sim = Command::new(binary("notion-sim")?)
            .args(["--addr", "127.0.0.1:0"])
            .args((0..options.integrations.max(1)).flat_map(|i| ["--token".to_string(), options.token(i)]))
            .args(["--pages", &options.pages.to_string(), "--databases", &options.databases.to_string()])
            .args(["--rate", &options.rate.to_string(), "--burst", &options.burst.to_string()])
            .args(["--latency-ms", &options.latency_ms.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting notion-sim")?;
        let stderr = sim.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .context("notion-sim did not start")??
            .ok_or_else(|| anyhow!("notion-sim exited"))?;
        let sim_url = line.rsplit(' ').next().unwrap_or_default().to_string();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let mut settings = Settings::default();
        settings.database.url = SecretString::from(format!("{}/{}", admin_pg_url(), options.name));
        settings.amqp.prefix = options.name.clone();
        settings.redis.key_prefix = options.name.clone();
        settings.notion.base_url = sim_url.clone();
        settings.encryption_key = Some(TokenCipher::generate_key());
        drop_database(&options.name).await;
        let env = vec![
            ("SYNCFLEET_DATABASE__URL".to_string(), settings.database.url.expose_secret().to_string()),
            ("SYNCFLEET_AMQP__PREFIX".to_string(), settings.amqp.prefix.clone()),
            ("SYNCFLEET_REDIS__KEY_PREFIX".to_string(), settings.redis.key_prefix.clone()),
            ("SYNCFLEET_NOTION__BASE_URL".to_string(), sim_url.clone()),
            (
                "SYNCFLEET_ENCRYPTION_KEY".to_string(),
                settings.encryption_key.as_ref().map(|k| k.expose_secret().to_string()).unwrap_or_default(),
            ),
        ];
        let fleet = Fleet { options, settings, sim_url, sim, workers: Vec::new(), env };
        // A queue left over from an interrupted run would feed old jobs to the new workers.
        fleet.reset_queues().await;
        Ok(fleet)
    }

    async fn reset_queues(&self) {
        if let Ok(conn) = syncfleet_shared::amqp::connect(&self.settings.amqp, "syncfleet-fleet").await
            && let Ok(channel) = conn.create_channel().await
        {
            let _ = syncfleet_shared::amqp::Topology::new(&self.settings.amqp).delete(&channel).await;
            let _ = conn.close(200, "done".into()).await;
        }
    }

    fn narrate(&self, program: &str, args: &[&str]) {
        if self.options.narrate {
            eprintln!("\x1b[1m$ {program} {}\x1b[0m", args.join(" "));
        }
    }

    /// Runs `syncfleet-producer <args>`; with `inherit`, its output goes to this terminal.
    pub async fn producer(
        &self,
        args: &[&str],
        extra_env: &[(&str, &str)],
        inherit: bool,
    ) -> anyhow::Result<String> {
        self.narrate("syncfleet-producer", args);
        let mut cmd = Command::new(binary("syncfleet-producer")?);
        cmd.args(args).envs(self.env.iter().cloned()).env("SYNCFLEET_LOG_LEVEL", "warn");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        if inherit {
            let status = cmd.status().await?;
            if !status.success() {
                bail!("syncfleet-producer {} failed ({status})", args.join(" "));
            }
            return Ok(String::new());
        }
        let out = cmd.output().await?;
        if !out.status.success() {
            bail!("syncfleet-producer {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Adds a `SYNCFLEET_*` setting for the processes started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Starts `n` worker processes; their logs go to `<tmp>/<name>.worker-<i>.log`.
    pub fn spawn_workers(&mut self, n: usize, concurrency: u16) -> anyhow::Result<()> {
        for i in 0..n {
            let log = std::env::temp_dir().join(format!("{}.worker-{i}.log", self.options.name));
            self.narrate("syncfleet-worker", &["--concurrency", &concurrency.to_string(), "&"]);
            // The allocator runs with its defaults, as in the container image (a
            // `MIMALLOC_*` variable in the environment is inherited, for experiments).
            let child = Command::new(binary("syncfleet-worker")?)
                .args(["--concurrency", &concurrency.to_string()])
                .envs(self.env.iter().cloned())
                .env("SYNCFLEET_WORKER__ID", format!("{}-worker-{i}", self.options.name))
                .stdout(Stdio::null())
                .stderr(Stdio::from(std::fs::File::create(&log)?))
                .kill_on_drop(true)
                .spawn()
                .context("starting syncfleet-worker")?;
            self.workers.push(child);
        }
        Ok(())
    }

    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(Child::id).collect()
    }

    /// Waits until at least `n` consumers (worker processes) listen on the work queue, so jobs
    /// published next start together; fails after `timeout`.
    pub async fn wait_consumers(&self, n: u32, timeout: Duration) -> anyhow::Result<()> {
        let conn = syncfleet_shared::amqp::connect(&self.settings.amqp, "syncfleet-bench").await?;
        let channel = conn.create_channel().await?;
        let queue = syncfleet_shared::amqp::Topology::new(&self.settings.amqp).jobs_queue();
        let deadline = Instant::now() + timeout;
        loop {
            // A fresh channel each time: a passive declare of a queue not declared yet closes it.
            let probe =
                if channel.status().connected() { channel.clone() } else { conn.create_channel().await? };
            let consumers = probe
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                    lapin::types::FieldTable::default(),
                )
                .await
                .map(|q| q.consumer_count())
                .unwrap_or(0);
            if consumers >= n {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("only {consumers} of {n} workers consume {queue} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Err(e) = conn.close(200, "done".into()).await {
            tracing::debug!(error = %e, "closing the consumer probe's connection");
        }
        Ok(())
    }

    /// Starts counting CPU time: this fleet's workers, every PostgreSQL process, notion-sim and
    /// the whole machine. [`CpuMeter::fields`] turns it into per-page figures.
    pub fn cpu_meter(&self) -> CpuMeter {
        let sim = self.sim.id().unwrap_or_default();
        CpuMeter { sim, start: CpuSample::take(&self.worker_pids(), sim) }
    }

    /// Migrates, registers the integration and every simulated database; returns their ids.
    pub async fn register(&self) -> anyhow::Result<Vec<uuid::Uuid>> {
        self.producer(&["migrate"], &[], false).await?;
        let rate = if self.options.rate > 0.0 { self.options.rate } else { 1000.0 };
        let burst = self.options.burst.to_string();
        let rate = rate.to_string();
        let integrations = self.options.integrations.max(1);
        for i in 0..integrations {
            let (slug, token) = (self.options.integration(i), self.options.token(i));
            self.producer(
                &["integration", "add", "--slug", &slug, "--rate", &rate, "--burst", &burst],
                &[("NOTION_TOKEN", &token)],
                false,
            )
            .await?;
        }
        let info: serde_json::Value =
            reqwest::get(format!("{}/_sim/info", self.sim_url)).await?.json().await?;
        let mut ids = Vec::new();
        for (i, db) in info["databases"].as_array().cloned().unwrap_or_default().iter().enumerate() {
            let id = db["id"].as_str().unwrap_or_default().to_string();
            let slug = self.options.integration(i as u64 % integrations);
            self.producer(&["database", "add", "--integration", &slug, "--id", &id], &[], false).await?;
            ids.push(uuid::Uuid::parse_str(&id)?);
        }
        Ok(ids)
    }

    /// Publishes one job per database through a single connection, so they start together
    /// (a `syncfleet-producer enqueue` process per database would spread them over seconds).
    pub async fn enqueue_all(
        &self,
        ids: &[uuid::Uuid],
        mode: syncfleet_shared::job::SyncMode,
    ) -> anyhow::Result<()> {
        use syncfleet_shared::job::{Priority, Reason, SyncDatabaseJob};
        let db = self.db().await?;
        let metrics = syncfleet_shared::metrics::Metrics::new(syncfleet_shared::metrics::Role::Producer);
        let publisher = syncfleet_producer::publish::JobPublisher::connect(&self.settings, metrics).await?;
        let integrations = self.options.integrations.max(1);
        for (i, id) in ids.iter().enumerate() {
            let data = SyncDatabaseJob {
                integration: self.options.integration(i as u64 % integrations),
                database_id: *id,
                mode,
                priority: Priority::Normal,
                reason: Reason::Manual,
            };
            publisher.publish(&db, "urn:syncfleet:bench", data).await?;
        }
        Ok(())
    }

    pub async fn db(&self) -> anyhow::Result<DatabaseConnection> {
        Ok(syncfleet_shared::db::connect(&self.settings.database).await?)
    }

    pub async fn sim_stats(&self) -> anyhow::Result<serde_json::Value> {
        Ok(reqwest::get(format!("{}/_sim/stats", self.sim_url)).await?.json().await?)
    }

    /// Stops workers (SIGTERM, then kill), the simulator and the queues. The database stays.
    pub async fn stop(mut self) {
        self.stop_workers().await;
        let _ = self.sim.kill().await;
        self.reset_queues().await;
    }

    /// Stops everything and drops the fleet's database (benchmarks leave nothing behind).
    pub async fn discard(self) {
        let name = self.options.name.clone();
        self.stop().await;
        drop_database(&name).await;
    }

    /// Stops the worker processes (SIGTERM, then kill after 20 s).
    pub async fn stop_workers(&mut self) {
        for child in &self.workers {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for child in &mut self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        self.workers.clear();
    }
}

/// Drops a fleet's database (benchmarks clean up after themselves).
pub async fn drop_database(name: &str) {
    drop_database_at(&admin_pg_url(), name).await
}

/// Drops database `name` on the server at `pg_admin` (`postgres://user@host:port`).
pub async fn drop_database_at(pg_admin: &str, name: &str) {
    let admin = syncfleet_shared::config::DatabaseSettings {
        url: SecretString::from(format!("{pg_admin}/postgres")),
        max_connections: 1,
        connect_timeout_secs: 5,
    };
    if let Ok(conn) = syncfleet_shared::db::connect(&admin).await {
        let _ = conn.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await;
        conn.close().await.ok();
    }
}

/// Peak resident memory of a process in bytes (`VmHWM`), on Linux.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time spent since [`Fleet::cpu_meter`], per process kind, read from `/proc`.
pub struct CpuMeter {
    sim: u32,
    start: CpuSample,
}

#[derive(Debug, Clone, Copy, Default)]
struct CpuSample {
    /// Clock ticks of user + system time.
    worker: u64,
    postgres: u64,
    sim: u64,
    /// Ticks the machine was busy (all but idle and iowait), and all ticks, over every core.
    busy: u64,
    total: u64,
}

/// utime + stime (and, with `children`, the reaped children's) of one process, in ticks, and
/// its command name.
fn process_ticks(pid: &str, children: bool) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold spaces; the fields after it are space-separated.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
    // After the name: state is field 3, utime 14, stime 15, cutime 16, cstime 17 (1-based).
    let at = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or_default();
    let own = at(14) + at(15);
    Some((name, if children { own + at(16) + at(17) } else { own }))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100).max(1) as f64
}

/// PostgreSQL's floor for storing the rows a run wrote: the server CPU (every `postgres`
/// process) of one plain `COPY … FROM STDIN (FORMAT binary)` of the same `notion_pages` rows
/// into a table without indexes with the same column compression
/// (`postgres_copy_floor_us_per_page`, and the wall time), and the same into a table created
/// with the server's defaults (`postgres_copy_floor_default_compression_us_per_page`), which
/// shows what the column's compression choice is worth. Each copy starts after a `CHECKPOINT`.
pub async fn copy_floor(
    db: &sea_orm::DatabaseConnection,
    pages: u64,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    use futures_util::TryStreamExt;
    use sea_orm::sqlx::postgres::PgPoolCopyExt;
    let pool = db.get_postgres_connection_pool();
    let chunks: Vec<_> =
        pool.copy_out_raw("COPY notion_pages TO STDOUT (FORMAT binary)").await?.try_collect().await?;
    let mut out = serde_json::Map::new();
    for (create, key) in [
        ("CREATE TABLE bench_copy_floor (LIKE notion_pages INCLUDING COMPRESSION)", "postgres_copy_floor"),
        ("CREATE TABLE bench_copy_floor (LIKE notion_pages)", "postgres_copy_floor_default_compression"),
    ] {
        sea_orm::sqlx::query("DROP TABLE IF EXISTS bench_copy_floor").execute(pool).await?;
        sea_orm::sqlx::query(create).execute(pool).await?;
        // Dirty buffers left by the run (or the previous floor) are written out first, so the
        // checkpoint their WAL would trigger does not land inside the measured copy.
        sea_orm::sqlx::query("CHECKPOINT").execute(pool).await.context("CHECKPOINT before the COPY floor")?;
        let before = CpuSample::take(&[], 0).postgres;
        let started = Instant::now();
        let mut copy = pool.copy_in_raw("COPY bench_copy_floor FROM STDIN (FORMAT binary)").await?;
        for chunk in &chunks {
            copy.send(chunk.as_ref()).await?;
        }
        let copied = copy.finish().await?;
        let wall = started.elapsed().as_secs_f64();
        let cpu = CpuSample::take(&[], 0).postgres.saturating_sub(before) as f64 / clock_ticks();
        sea_orm::sqlx::query("DROP TABLE bench_copy_floor").execute(pool).await?;
        if copied != pages {
            anyhow::bail!("the COPY floor copied {copied} rows, expected {pages}");
        }
        out.insert(format!("{key}_us_per_page"), crate::bench::round(cpu * 1e6 / pages.max(1) as f64).into());
        out.insert(format!("{key}_s"), crate::bench::round(wall).into());
    }
    Ok(out)
}

impl CpuSample {
    fn take(workers: &[u32], sim: u32) -> Self {
        let mut sample = CpuSample::default();
        for pid in workers {
            sample.worker += process_ticks(&pid.to_string(), false).map(|(_, t)| t).unwrap_or_default();
        }
        sample.sim = process_ticks(&sim.to_string(), false).map(|(_, t)| t).unwrap_or_default();
        // Every PostgreSQL process (backends, and through the postmaster's reaped-children
        // times, the backends that already exited).
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().filter(|p| p.bytes().all(|b| b.is_ascii_digit())) else {
                    continue;
                };
                if let Some((comm, ticks)) = process_ticks(pid, true)
                    && comm == "postgres"
                {
                    sample.postgres += ticks;
                }
            }
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/stat")
            && let Some(line) = stat.lines().next()
        {
            let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or_default() + v.get(4).copied().unwrap_or_default();
            sample.total = total;
            sample.busy = total.saturating_sub(idle);
        }
        sample
    }
}

impl CpuMeter {
    /// `worker_cpu_us_per_page`, `postgres_cpu_us_per_page`, `sim_cpu_us_per_page` (CPU time
    /// since the meter started, divided by `pages`), the CPU seconds behind them, and
    /// `machine_busy` (the busy fraction of all cores over the same time). Call it before the
    /// workers are stopped.
    pub fn fields(&self, workers: &[u32], pages: u64) -> serde_json::Map<String, serde_json::Value> {
        let now = CpuSample::take(workers, self.sim);
        let tick = clock_ticks();
        let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / tick;
        let per_page = |s: f64| if pages == 0 { 0.0 } else { crate::bench::round(s * 1e6 / pages as f64) };
        let (w, p, sim) = (
            secs(now.worker, self.start.worker),
            secs(now.postgres, self.start.postgres),
            secs(now.sim, self.start.sim),
        );
        let busy = now.busy.saturating_sub(self.start.busy) as f64
            / (now.total.saturating_sub(self.start.total).max(1)) as f64;
        let mut out = serde_json::Map::new();
        out.insert("worker_cpu_us_per_page".into(), per_page(w).into());
        out.insert("postgres_cpu_us_per_page".into(), per_page(p).into());
        out.insert("sim_cpu_us_per_page".into(), per_page(sim).into());
        out.insert("worker_cpu_s".into(), crate::bench::round(w).into());
        out.insert("postgres_cpu_s".into(), crate::bench::round(p).into());
        out.insert("sim_cpu_s".into(), crate::bench::round(sim).into());
        out.insert("machine_busy".into(), crate::bench::round(busy).into());
        out
    }
}
