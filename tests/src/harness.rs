//! The end-to-end harness: every test gets its own PostgreSQL database, its own RabbitMQ names,
//! its own Redis key prefix and its own `notion-sim`, so tests run in parallel against the real
//! servers. Workers run in-process or as real `syncfleet-worker` processes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use lapin::options::BasicGetOptions;
use sea_orm::{DatabaseConnection, EntityTrait};
use secrecy::{ExposeSecret, SecretString};
use syncfleet_shared::Settings;
use syncfleet_shared::amqp::{self, Topology};
use syncfleet_shared::config::RetryTier;
use syncfleet_shared::crypto::TokenCipher;
use syncfleet_shared::db::entities::sync_run;
use syncfleet_shared::job::{Priority, Reason, SyncDatabaseJob, SyncMode};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::sim::{SimConfig, SimServer};

/// Where the local services are; override with `SYNCFLEET_TEST_*` variables.
pub fn admin_pg_url() -> String {
    std::env::var("SYNCFLEET_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Which servers a test uses: the machine's shared ones by default, or private instances
/// (`crate::private`) for tests that stop or restart one.
#[derive(Debug, Clone, Default)]
pub struct Servers {
    /// `postgres://user@host:port` without a database.
    pub pg_admin: Option<String>,
    pub redis: Option<String>,
    /// How `redis` is deployed (a sentinel's URL, or cluster seeds, need their mode).
    pub redis_mode: syncfleet_shared::config::RedisMode,
    pub amqp: Option<String>,
}

/// One test's private world. Dropping it without [`cleanup`](Self::cleanup) (a failed test)
/// still stops its processes and removes its database and queues.
pub struct TestEnv {
    pub name: String,
    pub settings: Settings,
    pub db: DatabaseConnection,
    pub sim: SimServer,
    pub token: String,
    workers: Vec<Child>,
    pg_admin: String,
    cleaned: bool,
}

impl TestEnv {
    /// Creates and migrates a fresh database and starts a simulator with `sim`.
    pub async fn start(sim: SimConfig) -> anyhow::Result<Self> {
        Self::start_on(sim, Servers::default()).await
    }

    /// Like [`start`](Self::start), on the given servers.
    pub async fn start_on(sim: SimConfig, servers: Servers) -> anyhow::Result<Self> {
        let name = format!("sft_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let token = sim.tokens.first().cloned().unwrap_or_default();
        let sim = SimServer::start(sim, "127.0.0.1:0".parse()?).await?;
        let pg_admin = servers.pg_admin.unwrap_or_else(admin_pg_url);
        let mut settings = Settings::default();
        settings.database.url = SecretString::from(format!("{pg_admin}/{name}"));
        if let Some(url) = servers.redis {
            settings.redis.url = SecretString::from(url);
        }
        settings.redis.mode = servers.redis_mode;
        if let Some(url) = servers.amqp {
            settings.amqp.url = SecretString::from(url);
        }
        settings.database.max_connections = 5;
        settings.amqp.prefix = name.clone();
        settings.amqp.retry_tiers = vec![
            RetryTier { name: "1s".into(), delay_ms: 1000 },
            RetryTier { name: "2s".into(), delay_ms: 2000 },
            RetryTier { name: "4s".into(), delay_ms: 4000 },
        ];
        settings.redis.key_prefix = name.clone();
        settings.notion.base_url = sim.base_url();
        settings.notion.timeout_secs = 10;
        settings.encryption_key = Some(TokenCipher::generate_key());
        settings.worker.shutdown_grace_secs = 15;
        settings.worker.lease_secs = 3;
        settings.notion.circuit.open_secs = 1;
        syncfleet_shared::db::migrate(&settings.database).await.context("migrating the test database")?;
        let db = syncfleet_shared::db::connect(&settings.database).await?;
        Ok(Self { name, settings, db, sim, token, workers: Vec::new(), pg_admin, cleaned: false })
    }

    /// Publishes `job` exactly as given (the same id twice is a duplicate delivery, as an
    /// at-least-once publisher may cause).
    pub async fn publish_job(&self, job: &syncfleet_shared::job::JobEnvelope) -> anyhow::Result<()> {
        let conn = amqp::connect(&self.settings.amqp, "syncfleet-test").await?;
        Topology::new(&self.settings.amqp).declare(&conn.create_channel().await?).await?;
        let publisher = amqp::Publisher::new(&conn, &self.settings.amqp).await?;
        let meta =
            amqp::PublishMeta { attempt: 1, app_id: "syncfleet-test".into(), trace_headers: Vec::new() };
        publisher.publish_job(job, &amqp::Destination::Work, &meta).await?;
        let _ = conn.close(200, "done".into()).await;
        Ok(())
    }

    /// Messages ready in one of this test's queues (a passive declare; unacked ones not counted).
    pub async fn queue_ready(&self, queue: &str) -> anyhow::Result<u32> {
        let conn = amqp::connect(&self.settings.amqp, "syncfleet-test-depth").await?;
        let channel = conn.create_channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                lapin::types::FieldTable::default(),
            )
            .await?;
        if let Err(e) = conn.close(200, "done".into()).await {
            tracing::debug!(error = %e, "closing the depth probe's connection");
        }
        Ok(q.message_count())
    }

    /// Jobs waiting in RabbitMQ: ready in either work queue, or parked by an integration's cap.
    pub async fn jobs_waiting(&self) -> anyhow::Result<u32> {
        let t = Topology::new(&self.settings.amqp);
        let mut total = 0;
        for queue in t.work_queues().into_iter().chain(t.park_queues()) {
            total += self.queue_ready(&queue).await?;
        }
        Ok(total)
    }

    /// Publishes raw bodies (hostile or foreign messages) to the jobs exchange on a confirm
    /// channel and returns once the broker has confirmed every one of them, so a count of what
    /// was published is a count of what the broker holds.
    pub async fn publish_raw(
        &self,
        messages: Vec<(Vec<u8>, lapin::BasicProperties)>,
    ) -> anyhow::Result<usize> {
        let conn = amqp::connect(&self.settings.amqp, "syncfleet-test-raw").await?;
        let channel = conn.create_channel().await?;
        let topology = Topology::new(&self.settings.amqp);
        topology.declare(&channel).await?;
        channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
        let mut published = 0;
        for (body, props) in &messages {
            let confirm = channel
                .basic_publish(
                    topology.jobs_exchange().as_str().into(),
                    amqp::ROUTING_KEY.into(),
                    lapin::options::BasicPublishOptions { mandatory: true, ..Default::default() },
                    body,
                    props.clone(),
                )
                .await?
                .await?;
            let nacked = !confirm.is_ack();
            if nacked || confirm.take_message().is_some() {
                bail!("the broker did not take raw message {published} (nacked: {nacked}, or unroutable)");
            }
            published += 1;
        }
        if let Err(e) = conn.close(200, "done".into()).await {
            tracing::debug!(error = %e, "closing the raw publisher's connection");
        }
        Ok(published)
    }

    pub fn sim_url(&self) -> String {
        self.sim.base_url()
    }

    /// `SYNCFLEET_*` variables that give a child process this test's settings.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        let tiers = s
            .amqp
            .retry_tiers
            .iter()
            .map(|t| format!("{{name=\"{}\",delay_ms={}}}", t.name, t.delay_ms))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            ("SYNCFLEET_DATABASE__URL".into(), s.database.url.expose_secret().to_string()),
            ("SYNCFLEET_DATABASE__MAX_CONNECTIONS".into(), s.database.max_connections.to_string()),
            ("SYNCFLEET_REDIS__URL".into(), s.redis.url.expose_secret().to_string()),
            ("SYNCFLEET_REDIS__MODE".into(), format!("{:?}", s.redis.mode).to_lowercase()),
            ("SYNCFLEET_REDIS__SENTINEL_MASTER".into(), s.redis.sentinel_master.clone()),
            ("SYNCFLEET_AMQP__URL".into(), s.amqp.url.expose_secret().to_string()),
            ("SYNCFLEET_NOTION__MAX_RETRY_AFTER_SECS".into(), s.notion.max_retry_after_secs.to_string()),
            ("SYNCFLEET_AMQP__PREFIX".into(), s.amqp.prefix.clone()),
            ("SYNCFLEET_AMQP__RETRY_TIERS".into(), format!("[{tiers}]")),
            ("SYNCFLEET_REDIS__KEY_PREFIX".into(), s.redis.key_prefix.clone()),
            ("SYNCFLEET_NOTION__BASE_URL".into(), s.notion.base_url.clone()),
            ("SYNCFLEET_NOTION__TIMEOUT_SECS".into(), s.notion.timeout_secs.to_string()),
            (
                "SYNCFLEET_ENCRYPTION_KEY".into(),
                s.encryption_key.as_ref().map(|k| k.expose_secret().to_string()).unwrap_or_default(),
            ),
            ("SYNCFLEET_WORKER__SHUTDOWN_GRACE_SECS".into(), s.worker.shutdown_grace_secs.to_string()),
            ("SYNCFLEET_WORKER__LEASE_SECS".into(), s.worker.lease_secs.to_string()),
            ("SYNCFLEET_WORKER__PRIORITY_CONCURRENCY".into(), s.worker.priority_concurrency.to_string()),
            (
                "SYNCFLEET_WORKER__MAX_JOBS_PER_INTEGRATION".into(),
                s.worker.max_jobs_per_integration.to_string(),
            ),
            (
                "SYNCFLEET_WORKER__MAX_HIGH_JOBS_PER_INTEGRATION".into(),
                s.worker.max_high_jobs_per_integration.to_string(),
            ),
            ("SYNCFLEET_AMQP__PARK_DELAY_MS".into(), s.amqp.park_delay_ms.to_string()),
            ("SYNCFLEET_NOTION__CIRCUIT__OPEN_SECS".into(), s.notion.circuit.open_secs.to_string()),
        ]
    }

    /// Registers integration `slug` with this simulator's first token and the simulator's
    /// database number `index`; returns the database id.
    pub async fn register(&self, slug: &str, rate: f64, burst: u32, index: usize) -> anyhow::Result<Uuid> {
        syncfleet_producer::commands::integration::save(
            &self.settings,
            slug,
            None,
            Some(rate),
            Some(burst),
            &SecretString::from(self.token.clone()),
        )
        .await?;
        let id = self
            .sim
            .state
            .read()
            .databases
            .get(index)
            .map(|d| d.id)
            .ok_or_else(|| anyhow!("no database {index}"))?;
        syncfleet_producer::commands::database::add(&self.settings, slug, id, None, None, false).await?;
        Ok(id)
    }

    /// Publishes a job the way the producer does; returns the job (run) id.
    pub async fn enqueue(
        &self,
        integration: &str,
        database_id: Uuid,
        mode: SyncMode,
    ) -> anyhow::Result<Uuid> {
        let ids = self.enqueue_many(integration, database_id, mode, 1).await?;
        ids.into_iter().next().ok_or_else(|| anyhow!("nothing was published"))
    }

    /// Publishes `n` jobs through one connection; returns their ids.
    pub async fn enqueue_many(
        &self,
        integration: &str,
        database_id: Uuid,
        mode: SyncMode,
        n: usize,
    ) -> anyhow::Result<Vec<Uuid>> {
        let jobs = (0..n).map(|_| SyncDatabaseJob {
            integration: integration.into(),
            database_id,
            mode,
            priority: Priority::Normal,
            reason: Reason::Manual,
        });
        self.publish_all(jobs).await
    }

    /// Publishes each job the way the producer does (a `queued` run, a confirmed publish),
    /// through one connection; returns their ids.
    pub async fn publish_all(
        &self,
        jobs: impl IntoIterator<Item = SyncDatabaseJob>,
    ) -> anyhow::Result<Vec<Uuid>> {
        let publisher = syncfleet_producer::publish::JobPublisher::connect(
            &self.settings,
            syncfleet_shared::metrics::Metrics::new(syncfleet_shared::metrics::Role::Producer),
        )
        .await?;
        let mut ids = Vec::new();
        for data in jobs {
            ids.push(publisher.publish(&self.db, "urn:syncfleet:test", data).await?.id);
        }
        Ok(ids)
    }

    /// Starts a `syncfleet-worker` process with this test's settings; output goes to a log file.
    pub fn spawn_worker(&mut self, concurrency: u16) -> anyhow::Result<u32> {
        self.spawn_worker_with(concurrency, &[], &[])
    }

    /// Starts a worker with extra arguments and environment (metrics address, `OTEL_*`, ...).
    pub fn spawn_worker_with(
        &mut self,
        concurrency: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<u32> {
        let mut cmd = self.worker_command(concurrency)?;
        cmd.args(args).envs(env.iter().copied());
        self.spawn_child(cmd, "syncfleet-worker")
    }

    /// Starts `syncfleet-producer serve` (stopped with the workers at cleanup).
    pub fn spawn_producer(&mut self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<u32> {
        let mut full = vec!["serve"];
        full.extend_from_slice(args);
        let mut cmd = self.producer_command(&full)?;
        cmd.envs(env.iter().copied());
        self.spawn_child(cmd, "syncfleet-producer serve")
    }

    fn spawn_child(&mut self, mut cmd: Command, what: &str) -> anyhow::Result<u32> {
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let pid = child.id().ok_or_else(|| anyhow!("{what} exited at once"))?;
        self.workers.push(child);
        Ok(pid)
    }

    /// The command that starts a worker (for tests that want its output).
    pub fn worker_command(&self, concurrency: u16) -> anyhow::Result<Command> {
        let mut cmd = self.command("syncfleet-worker")?;
        cmd.arg("--concurrency").arg(concurrency.to_string());
        Ok(cmd)
    }

    /// A `syncfleet-producer` command with this test's settings; output goes to the test's log.
    pub fn producer_command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = self.command("syncfleet-producer")?;
        cmd.args(args);
        Ok(cmd)
    }

    /// One of the workspace's binaries with this test's settings, logging to the test's log.
    fn command(&self, binary_name: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(binary(binary_name)?);
        cmd.envs(self.env_vars());
        cmd.env("SYNCFLEET_LOG_LEVEL", "info");
        cmd.env_remove("RUST_LOG");
        cmd.stdout(Stdio::null());
        cmd.stderr(Stdio::from(log_file(&self.name)?));
        cmd.kill_on_drop(true);
        Ok(cmd)
    }

    /// Children (workers, `serve`) that have exited since the last call, removed from the
    /// test's list: `(pid, exit code)`. A supervisor loop restarts them.
    pub fn take_exited(&mut self) -> Vec<(u32, Option<i32>)> {
        let mut exited = Vec::new();
        self.workers.retain_mut(|child| {
            let pid = child.id().unwrap_or_default();
            match child.try_wait() {
                Ok(Some(status)) => {
                    exited.push((pid, status.code()));
                    false
                }
                _ => true,
            }
        });
        exited
    }

    /// Pids of the children still running.
    pub fn child_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(Child::id).collect()
    }

    /// Sends `signal` to a worker started by [`spawn_worker`](Self::spawn_worker).
    pub fn signal_worker(&self, pid: u32, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Waits for a worker process to exit; returns its exit code.
    pub async fn wait_worker_exit(&mut self, pid: u32, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let index = self
            .workers
            .iter()
            .position(|c| c.id() == Some(pid))
            .ok_or_else(|| anyhow!("unknown worker {pid}"))?;
        let mut child = self.workers.remove(index);
        let status =
            tokio::time::timeout(timeout, child.wait()).await.context("worker did not exit in time")??;
        Ok(status.code())
    }

    /// Waits until the run is final (or `timeout`), returning its row.
    pub async fn wait_run(&self, run_id: Uuid, timeout: Duration) -> anyhow::Result<sync_run::Model> {
        self.wait_run_until(run_id, timeout, |run| sync_run::status::is_final(&run.status)).await
    }

    /// Waits until `check` holds for the run row.
    pub async fn wait_run_until(
        &self,
        run_id: Uuid,
        timeout: Duration,
        check: impl Fn(&sync_run::Model) -> bool,
    ) -> anyhow::Result<sync_run::Model> {
        let deadline = Instant::now() + timeout;
        loop {
            // A failed read (a test that cuts PostgreSQL's connections, say) is retried until the
            // deadline: the pool replaces the connections it finds broken.
            let read = match sync_run::Entity::find_by_id(run_id).one(&self.db).await {
                Ok(Some(run)) if check(&run) => return Ok(run),
                other => other,
            };
            if Instant::now() > deadline {
                bail!(
                    "run {run_id}: condition not met after {timeout:?}; last read: {read:?}\nworker log: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Compares PostgreSQL with the simulator's export for one database.
    /// Runs `sql` (one or more statements) on this test's database.
    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        use sea_orm::ConnectionTrait;
        self.db.execute_unprepared(sql).await?;
        Ok(())
    }

    /// One value of one row of `sql` on this test's database (panics on failure: tests only).
    pub async fn scalar<T: sea_orm::TryGetable>(&self, sql: &str) -> T {
        use sea_orm::ConnectionTrait;
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql.to_string()))
            .await
            .expect("query")
            .expect("a row");
        row.try_get_by_index::<T>(0).expect("a value")
    }

    pub async fn verify(&self, database_id: Uuid) -> anyhow::Result<crate::verify::Report> {
        crate::verify::compare(&self.db, &self.sim_url(), database_id).await
    }

    /// Simulator stats as JSON.
    pub async fn sim_stats(&self) -> anyhow::Result<serde_json::Value> {
        Ok(reqwest::get(format!("{}/_sim/stats", self.sim_url())).await?.json().await?)
    }

    /// POSTs to a simulator admin endpoint.
    /// Requests the simulator logged, at or after `since_ms` on its clock, for endpoints
    /// containing `endpoint` (e.g. `query`).
    pub async fn sim_request_count(&self, endpoint: &str, since_ms: f64) -> anyhow::Result<usize> {
        let log = self.sim_admin_get(&format!("requests?since_ms={since_ms}")).await?;
        Ok(log["entries"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e["endpoint"].as_str().is_some_and(|s| s.contains(endpoint)))
                    .count()
            })
            .unwrap_or_default())
    }

    /// (arrival ms on the simulator's clock, status) of every logged request to an endpoint
    /// starting with `prefix` (`/v1/` for every Notion call), in arrival order.
    pub async fn sim_arrivals(&self, prefix: &str) -> anyhow::Result<Vec<(f64, u16)>> {
        let log = self.sim_admin_get("requests").await?;
        let mut out: Vec<(f64, u16)> = log["entries"]
            .as_array()
            .context("the request log has no entries")?
            .iter()
            .filter(|e| e["endpoint"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .map(|e| {
                (e["t_ms"].as_f64().unwrap_or_default(), e["status"].as_u64().unwrap_or_default() as u16)
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(out)
    }

    /// `GET /_sim/<path>` (path may carry a query string).
    pub async fn sim_admin_get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(reqwest::get(format!("{}/_sim/{path}", self.sim_url())).await?.error_for_status()?.json().await?)
    }

    pub async fn sim_admin(&self, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let response =
            reqwest::Client::new().post(format!("{}/_sim/{path}", self.sim_url())).json(&body).send().await?;
        Ok(response.error_for_status()?.json().await?)
    }

    /// Takes dead letters until at least `n` have arrived (a worker records a run's outcome
    /// before its dead letter is confirmed), or `timeout` passes; returns all it took.
    pub async fn wait_dead_letters(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(Option<String>, Vec<u8>)>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            out.extend(self.drain_dead_letters().await?);
            if out.len() >= n || Instant::now() > deadline {
                return Ok(out);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Takes every message from the dead-letter queue: (reason header, body).
    pub async fn drain_dead_letters(&self) -> anyhow::Result<Vec<(Option<String>, Vec<u8>)>> {
        let conn = amqp::connect(&self.settings.amqp, "syncfleet-test").await?;
        let channel = conn.create_channel().await?;
        let queue = Topology::new(&self.settings.amqp).dead_queue();
        let mut out = Vec::new();
        while let Some(msg) =
            channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await?
        {
            let reason =
                amqp::header_str(&msg.delivery.properties, syncfleet_shared::job::DEAD_REASON_HEADER);
            out.push((reason, msg.delivery.data.clone()));
        }
        let _ = conn.close(200, "done".into()).await;
        Ok(out)
    }

    /// The end of this test's worker log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(log_path(&self.name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The whole worker log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(&self.name)).unwrap_or_default()
    }

    /// Stops workers and the simulator, deletes the queues and drops the database.
    pub async fn cleanup(mut self) {
        for child in &mut self.workers {
            let _ = child.kill().await;
        }
        self.sim.cancel();
        remove_world(&self.settings.amqp, &self.pg_admin, &self.name).await;
        let _ = std::fs::remove_file(log_path(&self.name));
        self.cleaned = true;
    }
}

/// Deletes a test's queues and drops its database.
async fn remove_world(amqp_settings: &syncfleet_shared::config::AmqpSettings, pg_admin: &str, name: &str) {
    if let Ok(conn) = amqp::connect(amqp_settings, "syncfleet-test-cleanup").await
        && let Ok(channel) = conn.create_channel().await
    {
        let _ = Topology::new(amqp_settings).delete(&channel).await;
        let _ = conn.close(200, "done".into()).await;
    }
    crate::fleet::drop_database_at(pg_admin, name).await;
}

impl Drop for TestEnv {
    /// The guard: a test that failed before `cleanup` leaves nothing behind but its log.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        for child in &mut self.workers {
            let _ = child.start_kill();
        }
        self.sim.cancel();
        let (amqp_settings, pg_admin, name) =
            (self.settings.amqp.clone(), self.pg_admin.clone(), self.name.clone());
        // Drop cannot await; a thread with its own runtime does the asynchronous part.
        let cleaned = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(remove_world(&amqp_settings, &pg_admin, &name));
            }
        })
        .join();
        if cleaned.is_err() {
            eprintln!("cleanup of test {} failed", self.name);
        }
        eprintln!("test {} did not finish; its log is {}", self.name, log_path(&self.name).display());
    }
}

/// The most requests any window [t_i, t_j] of sorted arrival times (ms) holds beyond
/// `rate · t`, allowing 20 ms of loopback jitter: a GCRA admits at most its burst.
pub fn worst_excess(times_ms: &[f64], rate: f64) -> f64 {
    let mut worst = 0.0f64;
    for i in 0..times_ms.len() {
        for j in i..times_ms.len() {
            let t = (times_ms[j] - times_ms[i] + 20.0) / 1000.0;
            worst = worst.max((j - i + 1) as f64 - t * rate);
        }
    }
    worst
}

/// A TCP port that was free a moment ago (for `--metrics-addr` of child processes).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `N` different free ports (all held open while they are chosen, so none repeats).
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// GETs `http://127.0.0.1:<port><path>`, retrying while the process starts; (status, body).
pub async fn http_get(port: u16, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let deadline = Instant::now() + timeout;
    let url = format!("http://127.0.0.1:{port}{path}");
    loop {
        match reqwest::get(&url).await {
            Ok(r) => {
                let status = r.status().as_u16();
                return Ok((status, r.text().await?));
            }
            Err(e) if Instant::now() > deadline => bail!("GET {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The value of one exposition line `name{labels} value` (labels exactly as printed), if present.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}.worker.log"))
}

fn log_file(name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new().create(true).append(true).open(log_path(name))?)
}

/// A job for `database_id` of `integration` (reason `manual`, normal priority), as a test builds
/// one to record or publish itself.
pub fn job(
    integration: &str,
    database_id: Uuid,
    mode: syncfleet_shared::job::SyncMode,
) -> syncfleet_shared::job::JobEnvelope {
    syncfleet_shared::job::JobEnvelope::new(
        "urn:test",
        syncfleet_shared::job::SyncDatabaseJob {
            integration: integration.into(),
            database_id,
            mode,
            priority: Default::default(),
            reason: Default::default(),
        },
    )
}

/// Path of a workspace binary next to the running test executable (`target/<profile>/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} is not built: run `cargo build --workspace --bins` first", path.display());
    }
    Ok(path)
}
