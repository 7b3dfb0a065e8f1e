//! `POST /v1/notion/webhook`: Notion's change events, turned into sync jobs within seconds.
//!
//! - The first delivery of a new subscription is `{"verification_token": "…"}`. It is accepted
//!   only while an operator has armed the endpoint (`syncfleet-producer webhook arm`, a window
//!   of minutes; 403 otherwise), so nobody else can be first to plant a key. The token is stored
//!   (encrypted like integration tokens) and logged once, masked; `webhook status --reveal`
//!   prints it for pasting into Notion's verification form. A second, different token is
//!   refused (409) until `webhook reset`.
//! - Every other delivery must carry `X-Notion-Signature: sha256=<HMAC-SHA256(token, raw body)>`,
//!   checked in constant time (401 otherwise).
//! - An event id already handled is acknowledged and ignored (Notion retries deliveries). The
//!   id is recorded in the same transaction as what the event causes, so a delivery that fails
//!   half-way (503, Notion retries) was never recorded, and a concurrent retry waits for it.
//! - Page events and schema changes of a mirrored database are debounced durably: each event
//!   upserts the database's row in `notion_webhook_pending` (in mode `full` when a page was
//!   deleted or moved, which only full runs find), and the [`Debouncer`] (in every producer
//!   serving the API) serves a database once no event came for `api.webhook_quiet_ms`, or
//!   `api.webhook_max_wait_secs` after its first unserved event. Serving claims the row for a
//!   while (`claimed_until`, in a short transaction), then, with no transaction open: when a
//!   run of the database is queued or running, records a rerun request
//!   (`notion_databases.rerun_mode`: a run that has not started takes it, a running one serves
//!   it when it ends), else publishes one job. The row is deleted only up to the events it saw;
//!   a producer that dies while serving leaves it to be claimed again when the claim expires. A
//!   storm of edits therefore costs one run per max-wait period at most, plus one follow-up. A
//!   deleted data source disables its database and notifies.
//! - Unknown event types, and events about pages outside mirrored databases, are acknowledged and
//!   ignored.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use syncfleet_shared::db::rerun;
use syncfleet_shared::job::{Priority, Reason, SyncDatabaseJob, SyncMode};
use syncfleet_shared::notify::Notice;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::publish::PublishError;

/// Page events that change what a mirrored database holds.
const PAGE_EVENTS: [&str; 6] = [
    "page.created",
    "page.properties_updated",
    "page.content_updated",
    "page.moved",
    "page.deleted",
    "page.undeleted",
];
/// Schema changes: the next run re-reads the schema (every run does, first).
const SCHEMA_EVENTS: [&str; 2] = ["data_source.schema_updated", "database.schema_updated"];
/// Page events that only a full run mirrors (the page left the data source's query).
const FULL_EVENTS: [&str; 2] = ["page.deleted", "page.moved"];
/// The mirrored data source is gone.
const DELETE_EVENTS: [&str; 2] = ["data_source.deleted", "database.deleted"];
/// Handled event ids are kept this long (Notion retries for about a day).
const KEEP_EVENT_IDS: &str = "7 days";
/// How long a producer keeps a claim on a pending row while it serves it.
const CLAIM_SECS: f64 = 120.0;
/// Pending rows served per pass.
const CLAIM_BATCH: i64 = 10;
/// How long a producer trusts the token it read (`webhook reset` takes effect within this).
const TOKEN_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// The webhook's state in a producer: the verification token it read, and the debouncer's bell.
#[derive(Default)]
pub struct WebhookState {
    token: tokio::sync::RwLock<Option<(SecretString, tokio::time::Instant)>>,
    /// Rung by every event, so the debouncer polls only while events are pending.
    wake: tokio::sync::Notify,
}

/// A delivery from Notion: either the verification request or an event. Only the fields
/// syncfleet reads are listed; others are accepted.
#[derive(Debug, Deserialize, ToSchema)]
pub struct NotionDelivery {
    /// Only in the first delivery of a subscription.
    pub verification_token: Option<String>,
    /// The event id (the same across Notion's retries of one event).
    pub id: Option<String>,
    /// `page.created`, `page.properties_updated`, `data_source.schema_updated`, …
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// What the event is about: `{"id": …, "type": "page" | "data_source" | "database"}`.
    #[schema(value_type = Option<Object>)]
    pub entity: Option<Value>,
    /// Event details; `data.parent` names the page's database or data source.
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

/// What the delivery led to.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookOutcome {
    /// `verification_token_stored`, `scheduled` (a run will follow once the events pause),
    /// `disabled`, `duplicate` or `ignored`.
    pub status: &'static str,
    /// The mirrored database the event concerned.
    pub database_id: Option<Uuid>,
    /// Why nothing was done, for `ignored`.
    pub reason: Option<String>,
}

impl WebhookOutcome {
    fn new(status: &'static str) -> Self {
        Self { status, database_id: None, reason: None }
    }

    fn ignored(reason: impl Into<String>) -> Self {
        Self { reason: Some(reason.into()), ..Self::new("ignored") }
    }
}

/// Receives Notion's webhook deliveries (no bearer token: Notion signs them instead).
#[utoipa::path(post, path = "/v1/notion/webhook", tag = "webhooks", request_body = NotionDelivery,
    security(()),
    params(("X-Notion-Signature" = Option<String>, Header, description = "`sha256=` + hex HMAC-SHA256 of the raw body, keyed with the verification token; required except on the verification request")),
    responses(
        (status = 200, description = "Handled: token stored, database disabled, duplicate or ignored", body = WebhookOutcome),
        (status = 202, description = "A run of the database is scheduled for when the events pause", body = WebhookOutcome),
        (status = 400, description = "Not JSON, or a field is wrong", body = ErrorBody),
        (status = 401, description = "No or a wrong signature, or no verification token stored yet", body = ErrorBody),
        (status = 403, description = "A verification request while the endpoint is not armed (`webhook arm`)", body = ErrorBody),
        (status = 409, description = "A different verification token is already stored", body = ErrorBody),
        (status = 503, description = "PostgreSQL or RabbitMQ is unavailable; Notion retries", body = ErrorBody),
    ))]
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<WebhookOutcome>), ApiError> {
    let delivery: NotionDelivery = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("body", format!("body: not a Notion webhook delivery: {e}")))?;
    if delivery.kind.is_none()
        && let Some(token) = &delivery.verification_token
    {
        let outcome = store_verification_token(&state, token).await?;
        state.metrics.webhook_event(outcome.status);
        return Ok((StatusCode::OK, Json(outcome)));
    }
    let token = verification_token(&state).await?.ok_or_else(|| {
        ApiError::unauthorized_with(
            "no verification token is stored yet: create the subscription in Notion first",
        )
    })?;
    let signature = headers
        .get(syncfleet_shared::webhook::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized_with("X-Notion-Signature is missing"))?;
    if !syncfleet_shared::webhook::verify(token.expose_secret().as_bytes(), &body, signature) {
        state.metrics.webhook_event("bad_signature");
        return Err(ApiError::unauthorized_with("X-Notion-Signature does not match the body"));
    }
    let id = delivery.id.as_deref().filter(|id| !id.is_empty() && id.len() <= 200 && !id.contains('\0'));
    let id =
        id.ok_or_else(|| ApiError::bad_request("id", "id: an event needs an id of 1 to 200 characters"))?;
    let kind = delivery.kind.as_deref().unwrap_or_default();
    // Anything that fails from here is a 503: nothing was recorded, and Notion retries.
    let outcome = record(&state, id, kind, &delivery)
        .await
        .map_err(|e| ApiError::unavailable(format!("the event could not be recorded; retry ({e})")))?;
    state.metrics.webhook_event(outcome.status);
    tracing::info!(event = %id, kind = %kind, status = outcome.status, database = ?outcome.database_id,
        "Notion webhook event handled.");
    if outcome.status == "disabled"
        && let Some(database) = outcome.database_id
    {
        tracing::warn!(database = %database, "Notion deleted the data source of a mirrored database; it is disabled.");
        state.notifier.notify(Notice {
            subject: database.to_string(),
            kind: "notion_data_source_deleted",
            database: Some(database.to_string()),
            integration: None,
            error: format!("Notion reported {kind} for database {database}"),
        });
    }
    if outcome.status == "scheduled" {
        state.webhook.wake.notify_one();
    }
    let code = if outcome.status == "scheduled" { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((code, Json(outcome)))
}

/// Records the event id and what the event causes, in one transaction.
async fn record(
    state: &AppState,
    id: &str,
    kind: &str,
    delivery: &NotionDelivery,
) -> Result<WebhookOutcome, sea_orm::DbErr> {
    use sea_orm::TransactionTrait;
    let txn = state.db.begin().await?;
    // A producer serving the same rows holds them only for a moment; past this the delivery
    // fails (503) rather than hanging Notion's request.
    txn.execute_unprepared("SET LOCAL lock_timeout = '3s'").await?;
    // A concurrent delivery of the same id waits here until this one commits or rolls back.
    let claimed = txn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO notion_webhook_events (event_id, event_type) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [id.into(), kind.chars().take(100).collect::<String>().into()],
        ))
        .await?;
    if claimed.rows_affected() == 0 {
        txn.commit().await?;
        return Ok(WebhookOutcome::new("duplicate"));
    }
    let data = delivery.data.as_ref();
    let entity = delivery.entity.as_ref();
    let parent = data.and_then(|d| d.get("parent"));
    let candidates: Vec<&Value> = if PAGE_EVENTS.contains(&kind) {
        // A page's database: its parent (by database or data source id, as the API version gives).
        ["id", "data_source_id", "database_id"]
            .iter()
            .filter_map(|k| parent.and_then(|p| p.get(*k)))
            .collect()
    } else if SCHEMA_EVENTS.contains(&kind) || DELETE_EVENTS.contains(&kind) {
        let mut ids: Vec<&Value> = entity.and_then(|e| e.get("id")).into_iter().collect();
        if SCHEMA_EVENTS.contains(&kind) {
            ids.extend(parent.and_then(|p| p.get("id")));
        }
        ids
    } else {
        txn.commit().await?;
        return Ok(WebhookOutcome::ignored(format!("event type {kind:?} does not change a mirror")));
    };
    let ids: Vec<Uuid> =
        candidates.iter().filter_map(|v| v.as_str()).filter_map(|s| Uuid::parse_str(s).ok()).collect();
    let Some(database) = mirrored_database(&txn, &ids).await? else {
        txn.commit().await?;
        return Ok(WebhookOutcome::ignored("not about a mirrored database"));
    };
    let with = |status| WebhookOutcome { database_id: Some(database), ..WebhookOutcome::new(status) };
    if DELETE_EVENTS.contains(&kind) {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_databases SET enabled = false, updated_at = now() WHERE id = $1",
            [database.into()],
        ))
        .await?;
        txn.commit().await?;
        return Ok(with("disabled"));
    }
    let mode = if FULL_EVENTS.contains(&kind) { SyncMode::Full } else { SyncMode::Incremental };
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO notion_webhook_pending AS p (database_id, mode) VALUES ($1, $2) \
         ON CONFLICT (database_id) DO UPDATE SET last_at = now(), \
             mode = CASE WHEN p.mode = 'full' OR EXCLUDED.mode = 'full' THEN 'full' ELSE 'incremental' END",
        [database.into(), mode.as_str().into()],
    ))
    .await?;
    txn.commit().await?;
    Ok(with("scheduled"))
}

/// Serves the databases whose webhook events have paused (see the module's documentation).
pub struct Debouncer {
    pub db: sea_orm::DatabaseConnection,
    pub publisher: Arc<crate::publish::JobPublisher>,
    pub state: Arc<WebhookState>,
    pub quiet: std::time::Duration,
    pub max_wait: std::time::Duration,
}

/// How often pending databases are looked at while events are pending.
const DEBOUNCE_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// Without a bell (events received by another producer that then died): one look this often.
const DEBOUNCE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

impl Debouncer {
    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.state.wake.notified() => {}
                _ = tokio::time::sleep(DEBOUNCE_IDLE) => {}
            }
            loop {
                match self.flush().await {
                    Ok(false) => break,
                    Ok(true) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "Could not serve the pending webhook events; retrying.")
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE_POLL) => {}
                }
            }
        }
    }

    /// Serves every database that is due; returns whether events are still pending.
    pub async fn flush(&self) -> Result<bool, sea_orm::DbErr> {
        // The claim is its own short transaction: nothing is locked while jobs are published.
        let due = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE notion_webhook_pending p SET claimed_until = now() + make_interval(secs => $3) \
                 FROM notion_databases d \
                 WHERE d.id = p.database_id AND p.database_id IN ( \
                     SELECT database_id FROM notion_webhook_pending \
                     WHERE (claimed_until IS NULL OR claimed_until < now()) \
                       AND (last_at <= now() - make_interval(secs => $1) OR first_at <= now() - make_interval(secs => $2)) \
                     ORDER BY first_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 RETURNING p.database_id, p.mode, p.last_at, d.integration, d.enabled",
                [
                    self.quiet.as_secs_f64().into(),
                    self.max_wait.as_secs_f64().into(),
                    CLAIM_SECS.into(),
                    CLAIM_BATCH.into(),
                ],
            ))
            .await?;
        for row in due {
            let database: Uuid = row.try_get("", "database_id")?;
            let seen: chrono::DateTime<chrono::Utc> = row.try_get("", "last_at")?;
            let enabled: bool = row.try_get("", "enabled")?;
            let mode: String = row.try_get("", "mode")?;
            let mode = if mode == "full" { SyncMode::Full } else { SyncMode::Incremental };
            let served = if enabled {
                serve_database(&self.db, &self.publisher, database, row.try_get("", "integration")?, mode)
                    .await
            } else {
                Ok("the database is disabled")
            };
            match &served {
                Ok(how) => {
                    tracing::info!(database = %database, how, mode = mode.as_str(), "Webhook events served.");
                    // Only the events the claim saw: later ones keep the row for the next pass.
                    self.db
                        .execute_raw(Statement::from_sql_and_values(
                            DbBackend::Postgres,
                            "DELETE FROM notion_webhook_pending WHERE database_id = $1 AND last_at <= $2",
                            [database.into(), seen.into()],
                        ))
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(database = %database, error = %e, "Could not serve webhook events; retrying.")
                }
            }
            self.db
                .execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "UPDATE notion_webhook_pending SET claimed_until = NULL WHERE database_id = $1",
                    [database.into()],
                ))
                .await?;
        }
        self.db
            .execute_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("DELETE FROM notion_webhook_events WHERE received_at < now() - interval '{KEEP_EVENT_IDS}'"),
            ))
            .await?;
        let pending = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT EXISTS (SELECT 1 FROM notion_webhook_pending) AS pending",
            ))
            .await?
            .map(|r| r.try_get::<bool>("", "pending"))
            .transpose()?
            .unwrap_or(false);
        Ok(pending)
    }
}

/// One run of `database` in `mode` that starts after the events, at the least cost: when a run
/// is running, or queued in the high-priority queue, a rerun request (a run that has not
/// started takes it; a running one serves it, high, when it ends; the reaper, if neither);
/// otherwise a new high-priority job. A run waiting in the normal queue (scheduled, behind a
/// backlog) or in a retry tier is not waited for.
async fn serve_database(
    db: &sea_orm::DatabaseConnection,
    publisher: &crate::publish::JobPublisher,
    database: Uuid,
    integration: String,
    mode: SyncMode,
) -> Result<&'static str, anyhow::Error> {
    if active_run(db, database).await?.is_some() {
        rerun::request(db, database, mode, Priority::High).await?;
        // If the run ended before the request was recorded, publish now rather than wait for
        // the reaper.
        if active_run(db, database).await?.is_some() {
            return Ok("rerun requested from the active run");
        }
    }
    let data = SyncDatabaseJob {
        integration,
        database_id: database,
        mode,
        priority: Priority::High,
        reason: Reason::Webhook,
    };
    match publisher.publish(db, "urn:syncfleet:notion-webhook", data).await {
        Ok(_) => Ok("job published"),
        Err(PublishError::Unconfirmed { job_id, message }) => {
            // It may run or not: a pending request makes sure a run follows either way.
            tracing::warn!(job_id = %job_id, error = %message, "A webhook job's publish is unconfirmed.");
            rerun::request(db, database, mode, Priority::High).await?;
            Ok("job published, unconfirmed; a rerun is requested too")
        }
        Err(e) => Err(e.into()),
    }
}

/// The newest running run of `database`, or one queued high in the last hour.
async fn active_run<C: ConnectionTrait>(db: &C, database: Uuid) -> Result<Option<String>, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT status FROM sync_runs WHERE database_id = $1 \
               AND (status = 'running' OR (status = 'queued' AND priority = 'high' \
                    AND enqueued_at > now() - interval '1 hour')) \
             ORDER BY enqueued_at DESC LIMIT 1",
            [database.into()],
        ))
        .await?;
    row.map(|r| r.try_get::<String>("", "status")).transpose()
}

/// The enabled mirrored database one of `ids` names (as a database or a data source id).
async fn mirrored_database<C: ConnectionTrait>(db: &C, ids: &[Uuid]) -> Result<Option<Uuid>, sea_orm::DbErr> {
    if ids.is_empty() {
        return Ok(None);
    }
    let list = format!("{{{}}}", ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(","));
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT id FROM notion_databases \
             WHERE (id = ANY($1::uuid[]) OR data_source_id = ANY($1::uuid[])) AND enabled ORDER BY id LIMIT 1",
            [list.into()],
        ))
        .await?;
    row.map(|r| r.try_get("", "id")).transpose()
}

/// The stored verification token (read at most once a minute).
async fn verification_token(state: &AppState) -> Result<Option<SecretString>, ApiError> {
    if let Some((token, at)) = state.webhook.token.read().await.clone()
        && at.elapsed() < TOKEN_FOR
    {
        return Ok(Some(token));
    }
    let token = read_token(&state.db, &state.settings).await?;
    *state.webhook.token.write().await = token.clone().map(|t| (t, tokio::time::Instant::now()));
    Ok(token)
}

/// The stored verification token, decrypted.
pub async fn read_token(
    db: &sea_orm::DatabaseConnection,
    settings: &syncfleet_shared::Settings,
) -> Result<Option<SecretString>, ApiError> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT token_encrypted FROM notion_webhook_subscription WHERE id = 1 AND token_encrypted IS NOT NULL",
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: Vec<u8> = row.try_get("", "token_encrypted")?;
    let cipher = settings.token_cipher().map_err(ApiError::internal)?;
    cipher.decrypt(&stored).map(Some).map_err(ApiError::internal)
}

/// The subscription's first delivery: keep its token while the endpoint is armed, unless one
/// is kept already.
async fn store_verification_token(state: &AppState, token: &str) -> Result<WebhookOutcome, ApiError> {
    if token.is_empty() || token.len() > 500 || token.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "verification_token",
            "verification_token: must be 1 to 500 characters without control characters",
        ));
    }
    let secret = SecretString::from(token.to_string());
    let cipher = state.settings.token_cipher().map_err(ApiError::internal)?;
    let encrypted = cipher.encrypt(&secret).map_err(ApiError::internal)?;
    let stored = state
        .db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_webhook_subscription SET token_encrypted = $1, received_at = now(), armed_until = NULL \
             WHERE id = 1 AND token_encrypted IS NULL AND armed_until > now()",
            [encrypted.into()],
        ))
        .await?;
    if stored.rows_affected() == 1 {
        tracing::warn!(
            token = %syncfleet_shared::webhook::mask(token),
            "Notion webhook verification token stored. Print it with `syncfleet-producer webhook status --reveal` and paste it into Notion's verification form; signed events are accepted from now on."
        );
        *state.webhook.token.write().await = Some((secret, tokio::time::Instant::now()));
        return Ok(WebhookOutcome::new("verification_token_stored"));
    }
    match read_token(&state.db, &state.settings).await? {
        Some(kept)
            if bool::from(subtle::ConstantTimeEq::ct_eq(
                kept.expose_secret().as_bytes(),
                token.as_bytes(),
            )) =>
        {
            Ok(WebhookOutcome::new("verification_token_stored"))
        }
        Some(_) => Err(ApiError::conflict(
            "a different verification token is stored: run `syncfleet-producer webhook reset` to accept a new subscription",
        )),
        None => Err(ApiError::forbidden(
            "the webhook is not armed for a verification request: run `syncfleet-producer webhook arm`, then create the subscription in Notion",
        )),
    }
}
