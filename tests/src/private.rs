//! Private server instances for tests that stop or restart a server: a `redis-server`, a
//! PostgreSQL cluster or a RabbitMQ node of their own, on their own ports, under a temporary
//! directory. The machine's shared servers are never touched. Each is stopped and its directory
//! removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio::process::{Child, Command};

use crate::harness::{free_port, free_ports};

/// A fresh directory under the system's temporary directory, owned by `owner` when given (the
/// servers refuse to run as root, so they run as their Debian system users).
fn private_dir(kind: &str, owner: Option<&str>) -> anyhow::Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("sft-{kind}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    std::fs::create_dir_all(&dir)?;
    if let Some(user) = owner.filter(|_| is_root()) {
        let status = std::process::Command::new("chown").arg("-R").arg(user).arg(&dir).status()?;
        if !status.success() {
            bail!("chown {user} {} failed", dir.display());
        }
    }
    Ok(dir)
}

fn is_root() -> bool {
    // `Uid:` real, effective, … in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A command run as `user` when this process is root (else as ourselves).
fn as_user(user: &str, program: &str) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", user, "--", program]);
        cmd
    } else {
        Command::new(program)
    }
}

/// Waits until `probe` succeeds, at most `timeout`.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    // Each probe is bounded too: a port that accepts but never answers must not hang the wait.
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        if tokio::time::timeout(PROBE_TIMEOUT.min(left), probe()).await.unwrap_or(false) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{what} did not come up within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The longest one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a server tool (`initdb`, `pg_ctl`, `rabbitmqctl`, `redis-cli`) may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `cmd` to completion within [`TOOL_TIMEOUT`] (killed when it overruns) and fails with its
/// stderr when it exits non-zero.
async fn run_tool(what: &str, cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    cmd.kill_on_drop(true).stdin(Stdio::null());
    let out = tokio::time::timeout(TOOL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| anyhow!("{what} did not finish within {TOOL_TIMEOUT:?}"))?
        .with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

/// Starts a `redis-server` with `args` (nothing persisted) and waits for its port.
async fn redis_server(port: u16, dir: &Path, args: &[&str]) -> anyhow::Result<Child> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting redis-server")?;
    wait_until("redis-server", Duration::from_secs(20), || port_open(port)).await?;
    Ok(child)
}

/// One command to a private Redis node, on a fresh connection.
async fn redis_query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> anyhow::Result<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    Ok(cmd.query_async(&mut conn).await?)
}

/// A private Sentinel deployment: a primary, one replica and one sentinel (quorum 1), each on
/// its own port, failing over one second after the primary stops answering.
pub struct PrivateSentinel {
    pub primary_port: u16,
    pub replica_port: u16,
    pub sentinel_port: u16,
    pub master_name: String,
    dir: PathBuf,
    primary: Option<Child>,
    replica: Option<Child>,
    sentinel: Option<Child>,
}

impl PrivateSentinel {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = private_dir("redis-sentinel", None)?;
        let [primary_port, replica_port, sentinel_port] = free_ports()?;
        let master_name = "mymaster".to_string();
        let mut me = Self {
            primary_port,
            replica_port,
            sentinel_port,
            master_name: master_name.clone(),
            dir: dir.clone(),
            primary: None,
            replica: None,
            sentinel: None,
        };
        for (name, port) in [("primary", primary_port), ("replica", replica_port)] {
            std::fs::create_dir_all(dir.join(name))?;
            let replicaof = format!("127.0.0.1 {primary_port}");
            let args: Vec<&str> = if name == "replica" { vec!["--replicaof", &replicaof] } else { vec![] };
            let child = redis_server(port, &dir.join(name), &args).await?;
            if name == "primary" { me.primary = Some(child) } else { me.replica = Some(child) }
        }
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {master_name} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {master_name} 1000\n\
                 sentinel failover-timeout {master_name} 5000\n\
                 sentinel parallel-syncs {master_name} 1\n",
                dir.display()
            ),
        )?;
        let sentinel = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server --sentinel")?;
        me.sentinel = Some(sentinel);
        wait_until("redis sentinel", Duration::from_secs(20), || port_open(sentinel_port)).await?;
        // Failover needs the sentinel to know the replica, and the replica to be in sync.
        let replicas = redis::cmd("SENTINEL").arg("REPLICAS").arg(&master_name).clone();
        wait_until("the sentinel to see the replica", Duration::from_secs(30), || async {
            let listed: Vec<Vec<String>> = redis_query(sentinel_port, &replicas).await.unwrap_or_default();
            let linked = redis_query::<String>(replica_port, redis::cmd("INFO").arg("replication"))
                .await
                .is_ok_and(|info| info.contains("master_link_status:up"));
            linked && listed.iter().any(|r| r.iter().any(|v| v == &replica_port.to_string()))
        })
        .await?;
        Ok(me)
    }

    /// The sentinel's URL (what `redis.url` names in sentinel mode).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.sentinel_port)
    }

    /// The port the sentinel names as primary now.
    pub async fn current_primary(&self) -> anyhow::Result<u16> {
        let addr: Vec<String> = redis_query(
            self.sentinel_port,
            redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(&self.master_name),
        )
        .await?;
        addr.get(1).and_then(|p| p.parse().ok()).ok_or_else(|| anyhow!("no primary named: {addr:?}"))
    }

    /// `kill -9` of the primary.
    pub async fn kill_primary(&mut self) {
        if let Some(mut child) = self.primary.take() {
            let _ = child.kill().await;
        }
    }

    /// Waits until the sentinel has promoted the replica and it accepts writes.
    pub async fn wait_failover(&self, timeout: Duration) -> anyhow::Result<()> {
        let replica = self.replica_port;
        wait_until("the sentinel failover", timeout, || async {
            self.current_primary().await.ok() == Some(replica)
                && redis_query::<String>(replica, redis::cmd("INFO").arg("replication"))
                    .await
                    .is_ok_and(|info| info.contains("role:master"))
        })
        .await
    }
}

impl Drop for PrivateSentinel {
    fn drop(&mut self) {
        for child in [&mut self.sentinel, &mut self.replica, &mut self.primary].into_iter().flatten() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis Cluster of three primaries (no replicas), slots spread by `redis-cli`.
pub struct PrivateCluster {
    pub ports: Vec<u16>,
    dir: PathBuf,
    nodes: Vec<Child>,
}

impl PrivateCluster {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = private_dir("redis-cluster", None)?;
        let mut me = Self { ports: Vec::new(), dir: dir.clone(), nodes: Vec::new() };
        while me.ports.len() < 3 {
            // A node also listens on port + 10000 (the cluster bus).
            let port = free_port()?;
            if port > 55_000
                || me.ports.contains(&port)
                || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err()
            {
                continue;
            }
            me.ports.push(port);
        }
        for port in me.ports.clone() {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let child = redis_server(
                port,
                &node_dir,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            .await?;
            me.nodes.push(child);
        }
        run_tool(
            "redis-cli --cluster create",
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(me.ports.iter().map(|p| format!("127.0.0.1:{p}")))
                .args(["--cluster-replicas", "0", "--cluster-yes"]),
        )
        .await?;
        for port in me.ports.clone() {
            wait_until("the cluster to be ok", Duration::from_secs(30), || async move {
                redis_query::<String>(port, &redis::cmd("CLUSTER").arg("INFO").clone())
                    .await
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
            .await?;
        }
        Ok(me)
    }

    /// Seed URLs (what `redis.url` lists in cluster mode).
    pub fn url(&self) -> String {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    /// How many keys each node holds (`DBSIZE`), in port order.
    pub async fn key_counts(&self) -> anyhow::Result<Vec<i64>> {
        let mut counts = Vec::new();
        for port in &self.ports {
            counts.push(redis_query(*port, &redis::cmd("DBSIZE")).await?);
        }
        Ok(counts)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for child in &mut self.nodes {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private `redis-server` (nothing persisted: a restart loses every key, as a failover or an
/// eviction would).
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start() -> anyhow::Result<Self> {
        let mut redis = Self { port: free_port()?, dir: private_dir("redis", None)?, child: None };
        redis.up().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn up(&mut self) -> anyhow::Result<()> {
        self.child = Some(redis_server(self.port, &self.dir, &[]).await?);
        Ok(())
    }

    /// Kills the server (no clean shutdown) and starts a new, empty one on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.up().await
    }

    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private PostgreSQL cluster (trust authentication, user `postgres`), stopped and started
/// with `pg_ctl`.
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    /// Server settings beyond the defaults, as `-c name=value` options.
    extra: String,
}

impl PrivatePostgres {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// A cluster started with these `name=value` settings (e.g.
    /// `shared_preload_libraries=pg_stat_statements`).
    pub async fn start_with(settings: &[&str]) -> anyhow::Result<Self> {
        let bin = postgres_bin()?;
        let dir = private_dir("pg", Some("postgres"))?;
        let extra = settings.iter().map(|s| format!(" -c {s}")).collect();
        let pg = Self { port: free_port()?, dir, bin, extra };
        run_tool(
            "initdb",
            as_user("postgres", &pg.tool("initdb")).arg("-D").arg(pg.data()).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ]),
        )
        .await?;
        pg.up().await?;
        Ok(pg)
    }

    fn tool(&self, name: &str) -> String {
        self.bin.join(name).to_string_lossy().into_owned()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `postgres://postgres@127.0.0.1:<port>` (no database: tests append their own).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    pub async fn up(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off{}",
            self.port,
            self.dir.display(),
            self.extra
        );
        run_tool(
            "pg_ctl start",
            as_user("postgres", &self.tool("pg_ctl"))
                .arg("-D")
                .arg(self.data())
                .args(["-o", &options, "-l"])
                .arg(self.dir.join("log"))
                .args(["-w", "-t", "60", "start"])
                .stdout(Stdio::null()),
        )
        .await?;
        Ok(())
    }

    /// Stops the server at once (`-m immediate`: like a crash, connections are cut).
    pub async fn stop(&self) -> anyhow::Result<()> {
        run_tool(
            "pg_ctl stop",
            as_user("postgres", &self.tool("pg_ctl")).arg("-D").arg(self.data()).args([
                "-m",
                "immediate",
                "-w",
                "stop",
            ]),
        )
        .await?;
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let pg_ctl = self.tool("pg_ctl");
        let data = self.data();
        let mut cmd = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &pg_ctl]);
            c
        } else {
            std::process::Command::new(&pg_ctl)
        };
        let _ = cmd.arg("-D").arg(&data).args(["-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn postgres_bin() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("{} (is PostgreSQL installed?)", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().ok_or_else(|| anyhow!("no PostgreSQL server binaries under {}", root.display()))
}

/// A private RabbitMQ node (no plugins), restarted with `stop_app`/`start_app`, which closes
/// every connection as a broker restart does.
pub struct PrivateRabbit {
    pub port: u16,
    node: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRabbit {
    pub async fn start() -> anyhow::Result<Self> {
        let [port, dist] = free_ports()?;
        let dir = private_dir("rabbit", Some("rabbitmq"))?;
        let node = format!("sft{}@localhost", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        if is_root() {
            let _ =
                std::process::Command::new("chown").arg("rabbitmq").arg(dir.join("enabled_plugins")).status();
        }
        let mut cmd = as_user("rabbitmq", "/usr/lib/rabbitmq/bin/rabbitmq-server");
        cmd.env("HOME", "/var/lib/rabbitmq")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("none"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd.spawn().context("starting rabbitmq-server")?;
        let rabbit = Self { port, node, dir, child: Some(child) };
        rabbit.wait_ready().await?;
        Ok(rabbit)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let url = self.url();
        wait_until("rabbitmq-server", Duration::from_secs(90), || {
            let url = url.clone();
            async move {
                match lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await {
                    Ok(c) => {
                        let _ = c.close(200, "probe".into()).await;
                        true
                    }
                    Err(_) => false,
                }
            }
        })
        .await
    }

    async fn ctl(&self, action: &str) -> anyhow::Result<()> {
        run_tool(
            &format!("rabbitmqctl {action}"),
            as_user("rabbitmq", "/usr/lib/rabbitmq/bin/rabbitmqctl")
                .env("HOME", "/var/lib/rabbitmq")
                .args(["-n", &self.node, action]),
        )
        .await?;
        Ok(())
    }

    /// SIGSTOPs (or with `false`, SIGCONTs) the whole node: connections stay open, but nothing
    /// is read or answered, as with a wedged broker or a paused VM.
    pub fn freeze(&self, frozen: bool) -> anyhow::Result<()> {
        let pid = self.child.as_ref().and_then(Child::id).context("rabbitmq-server is not running")?;
        let signal =
            if frozen { nix::sys::signal::Signal::SIGSTOP } else { nix::sys::signal::Signal::SIGCONT };
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Stops the broker application (every connection is closed) and starts it again.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.ctl("stop_app").await?;
        self.ctl("start_app").await?;
        self.wait_ready().await
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Some(child) = &self.child
            && let Some(pid) = child.id()
        {
            // The whole process group: the wrapper script and the Erlang VM under it.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
