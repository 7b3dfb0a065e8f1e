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
            let child = Command::new(binary("syncfleet-worker")?)
                .args(["--concurrency", &concurrency.to_string()])
                .envs(self.env.iter().cloned())
                .env("SYNCFLEET_WORKER__ID", format!("{}-worker-{i}", self.options.name))
                // As the container image runs it (deploy/Dockerfile); an explicit value wins.
                .env(
                    "MIMALLOC_PURGE_DELAY",
                    std::env::var("MIMALLOC_PURGE_DELAY").unwrap_or_else(|_| "0".into()),
                )
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
    let admin = syncfleet_shared::config::DatabaseSettings {
        url: SecretString::from(format!("{}/postgres", admin_pg_url())),
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
