//! Failure notifications: a permanent failure (a revoked token, a database no longer shared,
//! repeated invalid jobs) is announced once to a Slack-compatible webhook, with what to do.
//!
//! De-duplication is fleet-wide and durable: the first process to claim `(subject, kind)` in
//! PostgreSQL's `notification_claims` within `notify.dedupe_secs` sends, the others count a
//! duplicate (a Redis restart cannot make it announce twice). A claim whose notice was not
//! delivered (rate limited, or every attempt failed) is released, so a later failure announces
//! it. `<prefix>:notify:rate:{<minute>}` in Redis caps the sends per minute. Delivery runs in its
//! own task with jittered backoff, so a webhook that is down never blocks a sync. The webhook URL
//! (which embeds a secret) never appears in logs or errors; text from outside (error messages
//! that may quote a malformed message) is escaped for Slack and shortened.

use std::sync::Arc;
use std::time::Duration;

use crate::redis_pool::RedisPool as Pool;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use crate::config::NotifySettings;
use crate::metrics::Metrics;

/// One thing to announce.
#[derive(Debug, Clone)]
pub struct Notice {
    /// What the notice is about, for de-duplication: a database id, or a fixed subject.
    pub subject: String,
    /// A bounded error kind (`notion_unauthorized`, `invalid_job`, …).
    pub kind: &'static str,
    pub database: Option<String>,
    pub integration: Option<String>,
    pub error: String,
}

impl Notice {
    /// What an operator should do about it.
    pub fn advice(&self) -> &'static str {
        advice_for(self.kind)
    }

    fn payload(&self) -> serde_json::Value {
        let error = slack_text(&self.error);
        let subject = match (&self.database, &self.integration) {
            (Some(db), Some(i)) => format!("database {db} (integration {i})"),
            (Some(db), None) => format!("database {db}"),
            (None, Some(i)) => format!("integration {i}"),
            (None, None) => "the fleet".to_string(),
        };
        let text = format!(
            ":rotating_light: syncfleet: {} failed permanently for {subject}.\nError: {}\nWhat to do: {}",
            self.kind,
            error,
            self.advice()
        );
        json!({
            "text": text,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": format!("*syncfleet: {subject} failed permanently*")}},
                {"type": "section", "fields": [
                    {"type": "mrkdwn", "text": format!("*Database*\n{}", self.database.as_deref().unwrap_or("-"))},
                    {"type": "mrkdwn", "text": format!("*Integration*\n{}", self.integration.as_deref().unwrap_or("-"))},
                    {"type": "mrkdwn", "text": format!("*Error*\n{}: {}", self.kind, error)},
                ]},
                {"type": "section", "text": {"type": "mrkdwn", "text": format!("*What to do*\n{}", self.advice())}},
            ],
        })
    }
}

/// What an operator should do about a failure of this kind (the status page and API show it
/// beside the error).
pub fn advice_for(kind: &str) -> &'static str {
    match kind {
        "notion_unauthorized" => {
            "The integration's Notion token was revoked or is wrong: create a new one in Notion and save it with `syncfleet-producer integration add --slug <slug>` (token from NOTION_TOKEN)."
        }
        "notion_forbidden" | "notion_not_found" => {
            "Notion no longer lets the integration read this database: share the database with the integration in Notion's Connections menu (••• → Connections), or remove it from syncfleet."
        }
        "notion_bad_request" => {
            "Notion rejected the request: check the database's registration and the Notion-Version setting."
        }
        "configuration" => {
            "The worker cannot use this integration: check SYNCFLEET_ENCRYPTION_KEY and the integration's registration."
        }
        "invalid_job" => {
            "A publisher keeps sending messages that are not valid sync jobs: check it against the published JSON Schema; the messages are in the dead-letter queue."
        }
        "publish_failed" | "publish_unconfirmed" => {
            "The job did not reach RabbitMQ (or its confirm never came): check the broker, then enqueue the job again."
        }
        "database_busy" => {
            "Another sync of this database was running; the running sync does one more pass for this request. Nothing to do."
        }
        "notion_data_source_deleted" => {
            "Notion announced (by webhook) that this database's data source was deleted; syncfleet disabled the database and keeps its mirrored rows. Restore it in Notion and re-enable it (`database update --enable`), or remove it."
        }
        "abandoned" | "worker_lost" => {
            "The worker running this job stopped; the job is redelivered and resumes from its checkpoint."
        }
        _ => "See the run's error in sync_runs and the runbook in docs/operations.md.",
    }
}

/// Escapes Slack's control characters (`<!channel>` would ping everyone) and keeps the text
/// well under Slack's size limit.
fn slack_text(raw: &str) -> String {
    let short: String = raw.chars().take(500).collect();
    let suffix = if raw.chars().count() > 500 { "…" } else { "" };
    format!("{}{suffix}", short.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;"))
}

/// Sends notices; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    http: reqwest::Client,
    url: SecretString,
    db: DatabaseConnection,
    redis: Pool,
    prefix: String,
    settings: NotifySettings,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// A notifier for `settings`; one that does nothing when no webhook is configured.
    pub fn new(
        settings: &NotifySettings,
        db: DatabaseConnection,
        redis: Pool,
        prefix: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        let Some(url) = settings.webhook_url.clone() else { return Self { inner: None } };
        let http = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
            Ok(http) => http,
            Err(e) => {
                tracing::error!(error = %e, "Cannot build the notification client; notifications are off.");
                return Self { inner: None };
            }
        };
        Self {
            inner: Some(Arc::new(Inner {
                http,
                url,
                db,
                redis,
                prefix: prefix.to_string(),
                settings: settings.clone(),
                metrics,
            })),
        }
    }

    /// Announces `notice` unless it was announced within the window or the rate limit is
    /// reached. Returns at once; delivery happens in the background.
    pub fn notify(&self, notice: Notice) {
        let Some(inner) = self.inner.clone() else { return };
        tokio::spawn(async move { inner.deliver(notice).await });
    }
}

impl Inner {
    async fn deliver(&self, notice: Notice) {
        match self.claim(&notice).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                // Without the claim nothing de-duplicates: sending could flood, so the notice is
                // dropped (the run's failure is recorded in sync_runs anyway).
                tracing::warn!(error = %e, kind = notice.kind, "Could not de-duplicate a notification; not sent.");
                self.metrics.notification("failed");
                return;
            }
        }
        if !self.under_rate_limit().await {
            tracing::warn!(
                kind = notice.kind,
                "Failure notifications are rate limited; this one is not sent."
            );
            self.metrics.notification("rate_limited");
            self.release(&notice).await;
            return;
        }
        let payload = notice.payload();
        let attempts = self.settings.attempts.saturating_sub(1) as usize;
        let mut delays =
            crate::retry::delays(Duration::from_millis(500), Duration::from_secs(30)).take(attempts);
        loop {
            let sent = self.http.post(self.url.expose_secret()).json(&payload).send().await;
            let failure = match sent {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(kind = notice.kind, subject = %notice.subject, "Failure notification sent.");
                    self.metrics.notification("sent");
                    return;
                }
                Ok(r) => format!("the webhook answered HTTP {}", r.status().as_u16()),
                // Never the error's text: it can quote the URL, which holds a secret.
                Err(e) if e.is_timeout() => "the webhook timed out".to_string(),
                Err(_) => "the webhook could not be reached".to_string(),
            };
            match delays.next() {
                Some(delay) => {
                    tracing::warn!(reason = %failure, retry_in_ms = delay.as_millis() as u64, "Failure notification not delivered; retrying.");
                    tokio::time::sleep(delay).await;
                }
                None => {
                    tracing::error!(reason = %failure, kind = notice.kind, "Failure notification dropped after every attempt; the next failure tries again.");
                    self.metrics.notification("failed");
                    self.release(&notice).await;
                    return;
                }
            }
        }
    }

    /// Claims `(subject, kind)` for the window, durably: `false` if it was announced within it.
    async fn claim(&self, notice: &Notice) -> Result<bool, sea_orm::DbErr> {
        let window = self.settings.dedupe_secs.clamp(1, 365 * 86_400) as f64;
        let claimed = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO notification_claims (subject, kind, claimed_at) VALUES ($1, $2, now()) \
                 ON CONFLICT (subject, kind) DO UPDATE SET claimed_at = now() \
                 WHERE notification_claims.claimed_at < now() - make_interval(secs => $3)",
                [notice.subject.clone().into(), notice.kind.into(), window.into()],
            ))
            .await?
            .rows_affected()
            == 1;
        if !claimed {
            self.metrics.notification("deduplicated");
        }
        Ok(claimed)
    }

    /// Gives a claim back when its notice was not delivered.
    async fn release(&self, notice: &Notice) {
        let released = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "DELETE FROM notification_claims WHERE subject = $1 AND kind = $2",
                [notice.subject.clone().into(), notice.kind.into()],
            ))
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "Could not release an undelivered notification's claim.");
        }
    }

    /// At most `max_per_minute` sends a minute, fleet-wide (a lost counter only lets a few more
    /// through).
    async fn under_rate_limit(&self) -> bool {
        let minute = chrono::Utc::now().timestamp() / 60;
        let key = format!("{}:notify:rate:{{{minute}}}", self.prefix);
        let counted: Result<(i64, i64), String> = async {
            let mut conn = self.redis.get().await.map_err(|e| e.to_string())?;
            redis::pipe()
                .atomic()
                .incr(&key, 1)
                .expire(&key, 120)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match counted {
            Ok((n, _)) => n <= i64::from(self.settings.max_per_minute),
            Err(e) => {
                tracing::warn!(error = %e, "Could not count notifications in Redis; sending anyway.");
                true
            }
        }
    }
}
