//! Layered, typed settings.
//!
//! Order of precedence, lowest first: built-in defaults that point at the local services, then an
//! optional TOML file (`--config` or `SYNCFLEET_CONFIG`), then `SYNCFLEET_` environment variables
//! where `__` nests (`SYNCFLEET_WORKER__CONCURRENCY=8`). Connection strings and keys are held in
//! [`SecretString`]s so they never reach a log line through `Debug`.

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::secret::redact_url;

/// Everything a syncfleet process can be configured with.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub amqp: AmqpSettings,
    pub notion: NotionSettings,
    pub worker: WorkerSettings,
    pub sync: SyncSettings,
    pub scheduler: SchedulerSettings,
    /// Failure notifications to a Slack-compatible webhook.
    pub notify: NotifySettings,
    /// The control-plane HTTP API served by `syncfleet-producer serve`.
    pub api: ApiSettings,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (e.g. `0.0.0.0:9090`); off when unset.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Base64 of the 32-byte AES-256-GCM key that encrypts Notion tokens at rest.
    pub encryption_key: Option<SecretString>,
    /// `text` (default) or `json`: one JSON object per log line.
    pub log_format: LogFormat,
    /// A `tracing` filter directive, e.g. `info,syncfleet_worker=debug`.
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host:port/dbname`; may hold a password.
    pub url: SecretString,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/syncfleet"),
            max_connections: 10,
            connect_timeout_secs: 5,
        }
    }
}

impl DatabaseSettings {
    /// The URL with any password masked, for errors and logs.
    pub fn display_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

/// How Redis is deployed.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One server at `redis.url`.
    #[default]
    Standalone,
    /// `redis.url` lists the sentinels; they name the current primary of `redis.sentinel_master`.
    Sentinel,
    /// `redis.url` lists seed nodes of a Redis Cluster.
    Cluster,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RedisSettings {
    pub mode: RedisMode,
    /// One URL; in `sentinel` and `cluster` mode a comma-separated list of them.
    pub url: SecretString,
    /// Sentinel mode: the monitored primary's name (`sentinel monitor <name> …`).
    pub sentinel_master: String,
    /// Sentinel mode: the primary's and replicas' password, when it differs from the one in the
    /// first sentinel URL (which is used otherwise).
    pub node_password: Option<SecretString>,
    /// Sentinel mode: the primary's user, when ACLs are in use.
    pub node_username: Option<String>,
    /// Sentinel mode: the database number on the primary.
    pub db: i64,
    /// Prefix of every Redis key this process touches; tests use their own.
    pub key_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: SecretString::from("redis://127.0.0.1:6379"),
            sentinel_master: "mymaster".into(),
            node_password: None,
            node_username: None,
            db: 0,
            key_prefix: "syncfleet".into(),
        }
    }
}

impl RedisSettings {
    /// The URLs in `url` (one, or a comma-separated list), trimmed.
    pub fn urls(&self) -> Vec<&str> {
        self.url.expose_secret().split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
    }

    /// The URLs with any password masked, for errors and logs.
    pub fn display_url(&self) -> String {
        self.urls().into_iter().map(redact_url).collect::<Vec<_>>().join(",")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AmqpSettings {
    pub url: SecretString,
    /// Prefix of every exchange and queue name (`<prefix>.jobs`, `<prefix>.jobs.dead`, …).
    pub prefix: String,
    /// Retry tiers, in order; a failed job moves one tier further on each attempt.
    pub retry_tiers: Vec<RetryTier>,
    /// How long a publish may wait for the broker's confirm.
    pub confirm_timeout_secs: u64,
    /// How long a job parked by the per-integration cap (`worker.max_jobs_per_integration`)
    /// waits in `<prefix>.park.<ms>ms` before it comes back to its work queue.
    pub park_delay_ms: u64,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            prefix: "syncfleet".into(),
            retry_tiers: vec![
                RetryTier { name: "30s".into(), delay_ms: 30_000 },
                RetryTier { name: "2m".into(), delay_ms: 120_000 },
                RetryTier { name: "8m".into(), delay_ms: 480_000 },
            ],
            confirm_timeout_secs: 10,
            park_delay_ms: 5_000,
        }
    }
}

impl AmqpSettings {
    pub fn display_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

/// A retry queue: messages wait `delay_ms` there, then dead-letter back to the work exchange.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct RetryTier {
    pub name: String,
    pub delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NotionSettings {
    /// `https://api.notion.com`, or a notion-sim address.
    pub base_url: String,
    /// The `Notion-Version` header sent with every request.
    pub version: String,
    pub timeout_secs: u64,
    /// Retries in place of a transient failure (5xx, 409, timeouts) before the job is re-queued.
    pub max_transient_retries: u32,
    /// Longest total time one request may spend waiting on `Retry-After`s before giving up.
    pub max_rate_wait_secs: u64,
    /// A `Retry-After` above this is capped (and logged): Notion documents up to 60 s per
    /// integration and more for workspace limits; a hostile or broken value must not stall a
    /// job for days or overflow a timer.
    pub max_retry_after_secs: u64,
    /// The optional second budget shared by the integrations of one workspace (those registered
    /// with `--workspace`), requests per second; 0 leaves it off. Either way, a 429 whose
    /// `rate_limit_reason` names the workspace limit pauses every integration of the workspace.
    pub workspace_rate: f64,
    pub workspace_burst: u32,
    /// The fleet-wide circuit breaker per integration (state in Redis).
    pub circuit: CircuitSettings,
}

/// Consecutive failures open the circuit; after `open_secs` it is half-open, and
/// `close_after_successes` successes close it (a failure reopens it).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct CircuitSettings {
    pub failure_threshold: u32,
    pub open_secs: u64,
    pub close_after_successes: u32,
}

impl Default for CircuitSettings {
    fn default() -> Self {
        Self { failure_threshold: 5, open_secs: 60, close_after_successes: 3 }
    }
}

impl Default for NotionSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.notion.com".into(),
            version: crate::notion::NOTION_VERSION.into(),
            timeout_secs: 30,
            max_transient_retries: 4,
            max_rate_wait_secs: 900,
            max_retry_after_secs: 300,
            workspace_rate: 0.0,
            workspace_burst: 3,
            circuit: CircuitSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WorkerSettings {
    /// Jobs from the normal work queue run at once by one worker process; also that consumer's
    /// AMQP prefetch.
    pub concurrency: u16,
    /// Jobs from the high-priority queue (`<prefix>.jobs.high`: manual, API and webhook jobs)
    /// run at once beside those, in their own slots, so a backlog never delays them.
    pub priority_concurrency: u16,
    /// Most jobs of one integration running at once across the fleet (0: no cap). A job over
    /// the cap is parked for `amqp.park_delay_ms` instead of taking a slot, so one integration's
    /// backlog cannot starve another's jobs. Keep it below the fleet's total slots.
    pub max_jobs_per_integration: u16,
    /// Of those, most high-priority ones at once, so one integration's manual, API or webhook
    /// jobs cannot take every high-priority slot of the fleet. Keep it below the fleet's high
    /// slots (replicas × `priority_concurrency`).
    pub max_high_jobs_per_integration: u16,
    /// Name recorded in `sync_runs.worker`; the host name when unset.
    pub id: Option<String>,
    /// How long in-flight jobs get to reach a checkpoint after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Lease of the per-database lock; renewed every third of it. A crashed worker's lock frees
    /// itself after this long.
    pub lease_secs: u64,
    /// `/healthz` fails once the process's main loop has not reported for this long (a wedged
    /// process is restarted by its supervisor).
    pub liveness_stale_secs: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 4,
            priority_concurrency: 1,
            max_jobs_per_integration: 4,
            max_high_jobs_per_integration: 1,
            id: None,
            shutdown_grace_secs: 25,
            lease_secs: 30,
            liveness_stale_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SyncSettings {
    /// Rows per Notion query (Notion's maximum is 100).
    pub page_size: u8,
    /// Incremental syncs re-read this much before the watermark (Notion rounds to the minute).
    pub overlap_secs: u64,
    /// Default rate for integrations added without one, requests per second.
    pub default_rate: f64,
    pub default_burst: u32,
    /// Most `created_time` ranges one full sync of a large database reads at once (1 = never split).
    pub max_chains: u8,
    /// Confirm every deletion candidate of a full run with `GET /v1/pages/{id}` (one request
    /// each, under the budget) before marking it deleted: a query walk is not a snapshot.
    pub confirm_deletions: bool,
    /// At most this many confirmations per run; the other candidates wait for the next full run.
    pub max_deletion_checks: u32,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            page_size: 100,
            overlap_secs: 120,
            default_rate: 3.0,
            default_burst: 3,
            max_chains: 4,
            confirm_deletions: true,
            max_deletion_checks: 2000,
        }
    }
}

impl SyncSettings {
    pub fn overlap(&self) -> Duration {
        Duration::from_secs(self.overlap_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SchedulerSettings {
    /// How often `syncfleet-producer serve` looks for databases that are due.
    pub tick_secs: u64,
    /// A full reconciliation (which also finds deletions) per database this often; nightly by
    /// default. `0` turns it off.
    pub full_every_secs: u64,
    /// The incremental interval of databases registered without `--interval-secs`; `0` means
    /// such databases are synced only on demand.
    pub default_interval_secs: u64,
    /// After a failed run, a database waits this long before the scheduler tries it again,
    /// doubling with each consecutive failure up to `failure_backoff_max_secs`.
    pub failure_backoff_secs: u64,
    pub failure_backoff_max_secs: u64,
    /// The reaper (leader only) moves a `running` run without a heartbeat for this long to
    /// `abandoned`, so its database is scheduled again.
    pub reap_running_after_secs: u64,
    /// Cron schedules: occurrences missed (downtime, a run still active) within this long are
    /// served by one catch-up run; older ones are dropped.
    pub misfire_grace_secs: u64,
    /// Full reconciliations start only in these UTC hours, `start-end` (end excluded; `22-4`
    /// wraps midnight), except a database's first one. Unset: any hour.
    pub full_hours: Option<String>,
}

/// Hours of the day, `start` included and `end` excluded, wrapping midnight when `end < start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourWindow {
    pub start: u32,
    pub end: u32,
}

impl HourWindow {
    /// Parses `start-end` (hours 0–24).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (a, b) =
            text.trim().split_once('-').ok_or_else(|| format!("{text:?} is not start-end, e.g. 1-5"))?;
        let hour = |t: &str| t.trim().parse::<u32>().ok().filter(|h| *h <= 24);
        match (hour(a), hour(b)) {
            (Some(start), Some(end)) if start % 24 != end % 24 => {
                Ok(Self { start: start % 24, end: end % 24 })
            }
            (Some(_), Some(_)) => Err(format!("{text:?} is an empty window")),
            _ => Err(format!("{text:?} needs hours between 0 and 24")),
        }
    }

    pub fn contains(&self, hour: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&hour)
        } else {
            hour >= self.start || hour < self.end
        }
    }
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            tick_secs: 5,
            full_every_secs: 24 * 3600,
            default_interval_secs: 0,
            failure_backoff_secs: 60,
            failure_backoff_max_secs: 6 * 3600,
            reap_running_after_secs: 180,
            misfire_grace_secs: 3600,
            full_hours: None,
        }
    }
}

/// Where and how often permanent failures are announced.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NotifySettings {
    /// A Slack-compatible incoming-webhook URL (it embeds a secret); notifications are off when
    /// unset.
    pub webhook_url: Option<SecretString>,
    /// One notification per database × error kind within this window (fleet-wide, in Redis).
    pub dedupe_secs: u64,
    /// At most this many notifications a minute, fleet-wide.
    pub max_per_minute: u32,
    /// Delivery attempts per notification (jittered backoff between them) before it is dropped
    /// and counted as failed.
    pub attempts: u32,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self { webhook_url: None, dedupe_secs: 3600, max_per_minute: 10, attempts: 6 }
    }
}

/// The HTTP API (`syncfleet-producer serve --api-addr`): bearer tokens, and where it listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ApiSettings {
    /// Where to serve the API and the status page (e.g. `0.0.0.0:8080`); off when unset.
    pub addr: Option<std::net::SocketAddr>,
    /// Accepted bearer tokens: a list, or one string of tokens separated by commas or
    /// whitespace (`SYNCFLEET_API__TOKENS=tok1,tok2`).
    #[serde(deserialize_with = "token_list")]
    pub tokens: Vec<SecretString>,
    /// A file of tokens, one a line (a mounted Kubernetes secret); re-read on every start.
    pub token_file: Option<std::path::PathBuf>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Notion webhooks: a database's job is published once no event about it came for this long…
    pub webhook_quiet_ms: u64,
    /// …or this long after the first event it has not yet served, whichever is first (an edit
    /// storm costs one run every this-many seconds at most, plus one follow-up).
    pub webhook_max_wait_secs: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            addr: None,
            tokens: Vec::new(),
            token_file: None,
            max_body_bytes: 64 * 1024,
            webhook_quiet_ms: 1_000,
            webhook_max_wait_secs: 15,
        }
    }
}

impl ApiSettings {
    /// Every accepted token: `tokens` and the lines of `token_file` (blank lines and lines
    /// starting with `#` skipped). An unreadable file is an error naming the file, never its content.
    pub fn all_tokens(&self) -> Result<Vec<SecretString>, ConfigError> {
        let mut out: Vec<SecretString> =
            self.tokens.iter().filter(|t| !t.expose_secret().trim().is_empty()).cloned().collect();
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
                key: "api.token_file",
                reason: format!("{} cannot be read: {}", path.display(), e.kind()),
            })?;
            out.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| SecretString::from(l.to_string())),
            );
        }
        Ok(out)
    }
}

fn token_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tokens {
        List(Vec<String>),
        One(String),
    }
    let tokens = match Tokens::deserialize(d)? {
        Tokens::List(list) => list,
        Tokens::One(text) => {
            text.split(|c: char| c == ',' || c.is_whitespace()).map(str::to_string).collect()
        }
    };
    Ok(tokens
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| SecretString::from(t.to_string()))
        .collect())
}

/// Why settings could not be loaded. Never carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(String),
    #[error("configuration key `{key}` is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl Settings {
    /// Loads defaults, then `file` (or `SYNCFLEET_CONFIG`), then `SYNCFLEET_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        let env_file = std::env::var_os("SYNCFLEET_CONFIG");
        let file = file.or(env_file.as_deref().map(Path::new));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!("config file {} does not exist", path.display())));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("SYNCFLEET_").ignore(&["config"]).split("__"));
        let settings: Settings =
            figment.extract().map_err(|e| ConfigError::Load(describe_figment_error(&e)))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that parse but make no sense, so a bad deployment fails at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.api.webhook_quiet_ms > 60_000 {
            return Err(ConfigError::Invalid {
                key: "api.webhook_quiet_ms",
                reason: "must be at most 60000".into(),
            });
        }
        if !(1..=3600).contains(&self.api.webhook_max_wait_secs) {
            return Err(ConfigError::Invalid {
                key: "api.webhook_max_wait_secs",
                reason: "must be between 1 and 3600".into(),
            });
        }
        if self.worker.concurrency == 0 || self.worker.concurrency > 512 {
            return Err(ConfigError::Invalid {
                key: "worker.concurrency",
                reason: "must be between 1 and 512".into(),
            });
        }
        if self.worker.priority_concurrency == 0 || self.worker.priority_concurrency > 512 {
            return Err(ConfigError::Invalid {
                key: "worker.priority_concurrency",
                reason: "must be between 1 and 512 (high-priority jobs need at least one slot)".into(),
            });
        }
        if self.worker.max_high_jobs_per_integration == 0 {
            return Err(ConfigError::Invalid {
                key: "worker.max_high_jobs_per_integration",
                reason: "must be at least 1".into(),
            });
        }
        if !(100..=600_000).contains(&self.amqp.park_delay_ms) {
            return Err(ConfigError::Invalid {
                key: "amqp.park_delay_ms",
                reason: "must be between 100 and 600000".into(),
            });
        }
        if self.worker.lease_secs < 3 {
            return Err(ConfigError::Invalid {
                key: "worker.lease_secs",
                reason: "must be at least 3".into(),
            });
        }
        if self.sync.page_size == 0 || self.sync.page_size > 100 {
            return Err(ConfigError::Invalid {
                key: "sync.page_size",
                reason: "must be between 1 and 100".into(),
            });
        }
        if !(self.sync.default_rate > 0.0 && self.sync.default_rate.is_finite()) {
            return Err(ConfigError::Invalid {
                key: "sync.default_rate",
                reason: "must be a positive number".into(),
            });
        }
        if self.sync.max_chains == 0 || self.sync.max_chains > 16 {
            return Err(ConfigError::Invalid {
                key: "sync.max_chains",
                reason: "must be between 1 and 16".into(),
            });
        }
        if let Some(hours) = &self.scheduler.full_hours
            && let Err(reason) = HourWindow::parse(hours)
        {
            return Err(ConfigError::Invalid { key: "scheduler.full_hours", reason });
        }
        if self.scheduler.tick_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "scheduler.tick_secs",
                reason: "must be at least 1".into(),
            });
        }
        let grace = self.scheduler.misfire_grace_secs;
        if grace < 2 * self.scheduler.tick_secs || grace > 30 * 86_400 {
            return Err(ConfigError::Invalid {
                key: "scheduler.misfire_grace_secs",
                reason: "must be at least two scheduler ticks and at most 30 days".into(),
            });
        }
        match url::Url::parse(&self.notion.base_url) {
            Ok(u) if u.has_host() && crate::secret::has_authority(&self.notion.base_url) => {
                if !u.username().is_empty() || u.password().is_some() {
                    return Err(ConfigError::Invalid {
                        key: "notion.base_url",
                        reason: "must not carry credentials (they would reach logs and errors)".into(),
                    });
                }
            }
            _ => {
                return Err(ConfigError::Invalid {
                    key: "notion.base_url",
                    reason: "is not an http(s)://host URL".into(),
                });
            }
        }
        let redis_urls = self.redis.urls();
        let redis_count_ok = match self.redis.mode {
            RedisMode::Standalone => redis_urls.len() == 1,
            RedisMode::Sentinel | RedisMode::Cluster => !redis_urls.is_empty(),
        };
        if !redis_count_ok {
            return Err(ConfigError::Invalid {
                key: "redis.url",
                reason: "must be one URL in standalone mode, and at least one in sentinel or cluster mode"
                    .into(),
            });
        }
        if redis_urls.iter().any(|u| !crate::secret::has_authority(u)) {
            return Err(ConfigError::Invalid {
                key: "redis.url",
                reason: "holds an entry that is not a scheme://[user:password@]host URL".into(),
            });
        }
        if self.redis.mode == RedisMode::Sentinel && self.redis.sentinel_master.trim().is_empty() {
            return Err(ConfigError::Invalid {
                key: "redis.sentinel_master",
                reason: "must name the monitored primary in sentinel mode".into(),
            });
        }
        for (key, value) in [("database.url", &self.database.url), ("amqp.url", &self.amqp.url)] {
            if !crate::secret::has_authority(value.expose_secret()) {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "is not a scheme://[user:password@]host URL".into(),
                });
            }
        }
        if self.sync.confirm_deletions && self.sync.max_deletion_checks == 0 {
            return Err(ConfigError::Invalid {
                key: "sync.max_deletion_checks",
                reason: "must be at least 1 while sync.confirm_deletions is on (0 would never delete)".into(),
            });
        }
        if let Some(url) = &self.notify.webhook_url
            && !url::Url::parse(url.expose_secret())
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        {
            return Err(ConfigError::Invalid {
                key: "notify.webhook_url",
                reason: "is not an http(s) URL".into(),
            });
        }
        if self.worker.liveness_stale_secs < 10 {
            return Err(ConfigError::Invalid {
                key: "worker.liveness_stale_secs",
                reason: "must be at least 10".into(),
            });
        }
        if self.amqp.retry_tiers.iter().any(|t| t.name.is_empty() || t.delay_ms == 0) {
            return Err(ConfigError::Invalid {
                key: "amqp.retry_tiers",
                reason: "every tier needs a name and a delay".into(),
            });
        }
        if let Some(key) = &self.encryption_key {
            crate::crypto::TokenCipher::from_base64(key)
                .map_err(|e| ConfigError::Invalid { key: "encryption_key", reason: e.to_string() })?;
        }
        Ok(())
    }

    /// The cipher for Notion tokens, or a clear error when no key is configured.
    pub fn token_cipher(&self) -> Result<crate::crypto::TokenCipher, ConfigError> {
        let key = self.encryption_key.as_ref().ok_or(ConfigError::Invalid {
            key: "encryption_key",
            reason: "is not set (SYNCFLEET_ENCRYPTION_KEY: base64 of 32 random bytes)".into(),
        })?;
        crate::crypto::TokenCipher::from_base64(key)
            .map_err(|e| ConfigError::Invalid { key: "encryption_key", reason: e.to_string() })
    }
}

/// Figment's messages can quote the offending value; keep the key and the expectation only.
fn describe_figment_error(error: &figment::Error) -> String {
    let mut parts = Vec::new();
    for e in error.clone() {
        let key = if e.path.is_empty() { "<root>".to_string() } else { e.path.join(".") };
        let kind = match &e.kind {
            figment::error::Kind::InvalidType(_, expected) => format!("expected {expected}"),
            figment::error::Kind::InvalidValue(_, expected) => format!("expected {expected}"),
            other => other.to_string(),
        };
        let source = e.metadata.as_ref().map(|m| format!(" (from {})", m.name)).unwrap_or_default();
        parts.push(format!("key `{key}`: {kind}{source}"));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_point_at_local_services_and_validate() {
        let s = Settings::default();
        s.validate().expect("defaults are valid");
        assert_eq!(s.worker.concurrency, 4);
        assert_eq!(s.amqp.prefix, "syncfleet");
        assert_eq!(s.database.display_url(), "postgres://postgres@127.0.0.1:5432/syncfleet");
    }

    #[test]
    fn debug_output_never_shows_urls_with_passwords() {
        let mut s = Settings::default();
        s.database.url = SecretString::from("postgres://u:hunter2@db/x");
        s.encryption_key = Some(SecretString::from("c2VjcmV0"));
        let text = format!("{s:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("c2VjcmV0"), "{text}");
        assert_eq!(s.database.display_url(), "postgres://u:****@db/x");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let mut s = Settings::default();
        s.worker.concurrency = 0;
        let err = s.validate().expect_err("zero concurrency is rejected");
        assert!(err.to_string().contains("worker.concurrency"), "{err}");
    }

    #[test]
    fn redis_modes_take_lists_and_name_what_is_wrong() {
        let mut s = Settings::default();
        s.redis.url = SecretString::from("redis://a:6379, redis://b:6379");
        let err = s.validate().expect_err("two URLs need sentinel or cluster mode");
        assert!(err.to_string().contains("redis.url"), "{err}");
        s.redis.mode = RedisMode::Cluster;
        s.validate().expect("cluster seeds");
        assert_eq!(s.redis.urls(), vec!["redis://a:6379", "redis://b:6379"]);
        s.redis.mode = RedisMode::Sentinel;
        s.redis.url = SecretString::from("redis://:hunter2@s1:26379,redis://s2:26379");
        s.validate().expect("sentinels");
        assert_eq!(s.redis.display_url(), "redis://:****@s1:26379,redis://s2:26379");
        s.redis.sentinel_master = " ".into();
        let err = s.validate().expect_err("a sentinel deployment needs the primary's name");
        assert!(err.to_string().contains("redis.sentinel_master"), "{err}");
        s.redis.sentinel_master = "mymaster".into();
        s.redis.url = SecretString::from("redis://s1:26379,redis:s2:hunter2@x");
        let err = s.validate().expect_err("an entry without a host");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}

#[cfg(test)]
mod lane_tests {
    use super::Settings;

    #[test]
    fn the_high_lane_needs_a_slot_and_the_park_delay_a_sane_range() {
        let mut s = Settings::default();
        s.validate().expect("defaults");
        s.worker.priority_concurrency = 0;
        let err = s.validate().expect_err("no high-priority slot");
        assert!(err.to_string().contains("worker.priority_concurrency"), "{err}");
        s.worker.priority_concurrency = 1;
        s.worker.max_jobs_per_integration = 0;
        s.validate().expect("no cap is allowed");
        for bad in [0, 99, 600_001] {
            s.amqp.park_delay_ms = bad;
            let err = s.validate().expect_err("park delay out of range");
            assert!(err.to_string().contains("amqp.park_delay_ms"), "{bad}: {err}");
        }
    }
}

#[cfg(test)]
mod hour_window_tests {
    use super::HourWindow;

    #[test]
    fn windows_parse_wrap_midnight_and_refuse_nonsense() {
        let night = HourWindow::parse("1-5").expect("1-5");
        assert!(night.contains(1) && night.contains(4) && !night.contains(5) && !night.contains(0));
        let wrap = HourWindow::parse("22-4").expect("22-4");
        assert!(
            wrap.contains(23)
                && wrap.contains(0)
                && wrap.contains(3)
                && !wrap.contains(4)
                && !wrap.contains(12)
        );
        assert_eq!(HourWindow::parse("0-24"), Err("\"0-24\" is an empty window".into()));
        for bad in ["", "5", "a-b", "1-25", "3-3", "-1-4"] {
            assert!(HourWindow::parse(bad).is_err(), "{bad:?}");
        }
    }
}
