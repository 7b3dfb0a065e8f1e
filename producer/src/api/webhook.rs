//! `POST /v1/notion/webhook`: Notion's change events, turned into sync jobs within seconds.
//!
//! - The first delivery of a new subscription is `{"verification_token": "…"}`. The token is
//!   stored (encrypted like integration tokens) and logged once, masked; the operator pastes it
//!   into Notion to verify the subscription. A second, different token is refused (409) until
//!   `syncfleet-producer webhook reset`, so nobody can replace the key of a working subscription.
//! - Every other delivery must carry `X-Notion-Signature: sha256=<HMAC-SHA256(token, raw body)>`,
//!   checked in constant time (401 otherwise).
//! - An event id already handled is acknowledged and ignored (Notion retries deliveries).
//! - Page events and schema changes of a mirrored database are debounced durably: each event
//!   upserts the database's row in `notion_webhook_pending`, and the [`Debouncer`] (in every
//!   producer serving the API; rows are claimed with `FOR UPDATE SKIP LOCKED`) serves a
//!   database once no event came for `api.webhook_quiet_ms`, or `api.webhook_max_wait_secs`
//!   after its first unserved event. Serving it costs nothing when a run of it is queued (that
//!   run starts after the events), requests one follow-up when one is running
//!   (`notion_databases.rerun_mode`), and publishes one incremental job otherwise. The claim and
//!   the publish share a transaction, so a producer that dies in between leaves the events
//!   pending for the next one. A storm of edits therefore costs one run per max-wait period at
//!   most, plus one follow-up. A deleted data source disables its database and notifies.
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
/// The mirrored data source is gone.
const DELETE_EVENTS: [&str; 2] = ["data_source.deleted", "database.deleted"];
/// Handled event ids are kept this long (Notion retries for about a day).
const KEEP_EVENT_IDS: &str = "7 days";
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
        return store_verification_token(&state, token).await.map(|o| (StatusCode::OK, Json(o)));
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
    if !claim(&state.db, id, kind).await? {
        state.metrics.webhook_event("duplicate");
        return Ok((StatusCode::OK, Json(WebhookOutcome::new("duplicate"))));
    }
    let handled = handle(&state, kind, &delivery).await;
    // A delivery that could not be handled is given back: Notion retries it, and the retry must
    // not be taken for a duplicate.
    if handled.is_err()
        && let Err(e) = release(&state.db, id).await
    {
        tracing::error!(error = %e, event = %id, "Could not release a webhook event that failed; its retry will be ignored.");
    }
    let outcome = handled?;
    state.metrics.webhook_event(outcome.status);
    tracing::info!(event = %id, kind = %kind, status = outcome.status, database = ?outcome.database_id,
        "Notion webhook event handled.");
    let code = if outcome.status == "scheduled" { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((code, Json(outcome)))
}

async fn handle(state: &AppState, kind: &str, delivery: &NotionDelivery) -> Result<WebhookOutcome, ApiError> {
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
        return Ok(WebhookOutcome::ignored(format!("event type {kind:?} does not change a mirror")));
    };
    let ids: Vec<Uuid> =
        candidates.iter().filter_map(|v| v.as_str()).filter_map(|s| Uuid::parse_str(s).ok()).collect();
    let Some((database, integration)) = mirrored_database(&state.db, &ids).await? else {
        return Ok(WebhookOutcome::ignored("not about a mirrored database"));
    };
    if DELETE_EVENTS.contains(&kind) {
        state
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE notion_databases SET enabled = false, updated_at = now() WHERE id = $1",
                [database.into()],
            ))
            .await?;
        tracing::warn!(database = %database, "Notion deleted the data source of a mirrored database; it is disabled.");
        state.notifier.notify(Notice {
            subject: database.to_string(),
            kind: "notion_data_source_deleted",
            database: Some(database.to_string()),
            integration: Some(integration),
            error: format!("Notion reported {kind} for database {database}"),
        });
        return Ok(WebhookOutcome { database_id: Some(database), ..WebhookOutcome::new("disabled") });
    }
    // The row may be held by a producer serving it; one that is frozen must not hold Notion's
    // delivery for long: past the lock timeout the delivery fails (503) and Notion retries it.
    let txn = sea_orm::TransactionTrait::begin(&state.db).await?;
    txn.execute_unprepared("SET LOCAL lock_timeout = '3s'").await?;
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO notion_webhook_pending (database_id) VALUES ($1) \
         ON CONFLICT (database_id) DO UPDATE SET last_at = now()",
        [database.into()],
    ))
    .await
    .map_err(|e| ApiError::unavailable(format!("the database's pending events are locked; retry ({e})")))?;
    txn.commit().await?;
    state.webhook.wake.notify_one();
    Ok(WebhookOutcome { database_id: Some(database), ..WebhookOutcome::new("scheduled") })
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
        use sea_orm::TransactionTrait;
        let txn = self.db.begin().await?;
        let due = txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT p.database_id AS id, d.integration FROM notion_webhook_pending p \
                 JOIN notion_databases d ON d.id = p.database_id \
                 WHERE p.last_at <= now() - make_interval(secs => $1) OR p.first_at <= now() - make_interval(secs => $2) \
                 ORDER BY p.first_at FOR UPDATE OF p SKIP LOCKED",
                [self.quiet.as_secs_f64().into(), self.max_wait.as_secs_f64().into()],
            ))
            .await?;
        let mut served = Vec::new();
        for row in due {
            let database: Uuid = row.try_get("", "id")?;
            let integration: String = row.try_get("", "integration")?;
            match serve_database(&self.db, &self.publisher, database, integration).await {
                Ok(how) => {
                    tracing::info!(database = %database, how, "Webhook events served.");
                    served.push(database);
                }
                // Left pending: the next pass tries again.
                Err(e) => tracing::warn!(database = %database, error = %e, "Could not serve webhook events."),
            }
        }
        if !served.is_empty() {
            let list = format!("{{{}}}", served.iter().map(Uuid::to_string).collect::<Vec<_>>().join(","));
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "DELETE FROM notion_webhook_pending WHERE database_id = ANY($1::uuid[])",
                [list.into()],
            ))
            .await?;
        }
        txn.commit().await?;
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

/// One incremental run of `database` that starts after the events, at the least cost: none when
/// a queued run will start after them anyway, a follow-up when one is running, else a new job.
/// Runs while the caller's transaction holds the database's pending row, so no other producer
/// serves the same events.
async fn serve_database(
    db: &sea_orm::DatabaseConnection,
    publisher: &crate::publish::JobPublisher,
    database: Uuid,
    integration: String,
) -> Result<&'static str, anyhow::Error> {
    match active_run(db, database).await? {
        Some(status) if status == "queued" => return Ok("a queued run covers them"),
        Some(_) => {
            // Served by the holder when it releases the lock (or by the reaper); if the run ended
            // before the request was recorded, publish now instead of waiting for the reaper.
            rerun::request(db, database, SyncMode::Incremental).await?;
            if active_run(db, database).await?.is_some() {
                return Ok("follow-up requested from the running run");
            }
        }
        None => {}
    }
    let data = SyncDatabaseJob {
        integration,
        database_id: database,
        mode: SyncMode::Incremental,
        priority: Priority::High,
        reason: Reason::Webhook,
    };
    match publisher.publish(db, "urn:syncfleet:notion-webhook", data).await {
        Ok(_) => Ok("job published"),
        Err(PublishError::Unconfirmed { job_id, message }) => {
            // It may run or not: a pending request makes sure a run follows either way.
            tracing::warn!(job_id = %job_id, error = %message, "A webhook job's publish is unconfirmed.");
            rerun::request(db, database, SyncMode::Incremental).await?;
            Ok("job published, unconfirmed; a rerun is requested too")
        }
        Err(e) => Err(e.into()),
    }
}

/// The newest queued (in the last hour), running or retrying run of `database`.
async fn active_run<C: ConnectionTrait>(db: &C, database: Uuid) -> Result<Option<String>, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT status FROM sync_runs WHERE database_id = $1 \
               AND (status IN ('running', 'retrying') OR (status = 'queued' AND enqueued_at > now() - interval '1 hour')) \
             ORDER BY enqueued_at DESC LIMIT 1",
            [database.into()],
        ))
        .await?;
    row.map(|r| r.try_get::<String>("", "status")).transpose()
}

/// The enabled mirrored database one of `ids` names (as a database or a data source id).
async fn mirrored_database(
    db: &sea_orm::DatabaseConnection,
    ids: &[Uuid],
) -> Result<Option<(Uuid, String)>, sea_orm::DbErr> {
    if ids.is_empty() {
        return Ok(None);
    }
    let list = format!("{{{}}}", ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(","));
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT id, integration FROM notion_databases \
             WHERE (id = ANY($1::uuid[]) OR data_source_id = ANY($1::uuid[])) AND enabled ORDER BY id LIMIT 1",
            [list.into()],
        ))
        .await?;
    row.map(|r| Ok((r.try_get("", "id")?, r.try_get("", "integration")?))).transpose()
}

/// Records `id` as handled; false when it already was. Ids older than a week are dropped.
async fn claim(db: &sea_orm::DatabaseConnection, id: &str, kind: &str) -> Result<bool, sea_orm::DbErr> {
    db.execute_raw(Statement::from_string(
        DbBackend::Postgres,
        format!("DELETE FROM notion_webhook_events WHERE received_at < now() - interval '{KEEP_EVENT_IDS}'"),
    ))
    .await?;
    let inserted = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO notion_webhook_events (event_id, event_type) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [id.into(), kind.chars().take(100).collect::<String>().into()],
        ))
        .await?;
    Ok(inserted.rows_affected() == 1)
}

async fn release(db: &sea_orm::DatabaseConnection, id: &str) -> Result<(), sea_orm::DbErr> {
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "DELETE FROM notion_webhook_events WHERE event_id = $1",
        [id.into()],
    ))
    .await
    .map(|_| ())
}

/// The stored verification token (read at most once a minute).
async fn verification_token(state: &AppState) -> Result<Option<SecretString>, ApiError> {
    if let Some((token, at)) = state.webhook.token.read().await.clone()
        && at.elapsed() < TOKEN_FOR
    {
        return Ok(Some(token));
    }
    let token = read_token(state).await?;
    *state.webhook.token.write().await = token.clone().map(|t| (t, tokio::time::Instant::now()));
    Ok(token)
}

async fn read_token(state: &AppState) -> Result<Option<SecretString>, ApiError> {
    let row = state
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT token_encrypted FROM notion_webhook_subscription WHERE id = 1",
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: Vec<u8> = row.try_get("", "token_encrypted")?;
    let cipher = state.settings.token_cipher().map_err(ApiError::internal)?;
    cipher.decrypt(&stored).map(Some).map_err(ApiError::internal)
}

/// The subscription's first delivery: keep its token, unless another one is kept already.
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
    let inserted = state
        .db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO notion_webhook_subscription (id, token_encrypted) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
            [encrypted.into()],
        ))
        .await?;
    if inserted.rows_affected() == 1 {
        tracing::warn!(
            token = %syncfleet_shared::webhook::mask(token),
            "Notion webhook verification token stored. Paste the token Notion shows into its webhook settings to verify the subscription; signed events are accepted from now on."
        );
        *state.webhook.token.write().await = Some((secret, tokio::time::Instant::now()));
        return Ok(WebhookOutcome::new("verification_token_stored"));
    }
    let same = read_token(state).await?.is_some_and(|stored| {
        subtle::ConstantTimeEq::ct_eq(stored.expose_secret().as_bytes(), token.as_bytes()).into()
    });
    if same {
        return Ok(WebhookOutcome::new("verification_token_stored"));
    }
    Err(ApiError::conflict(
        "a different verification token is stored: run `syncfleet-producer webhook reset` to accept a new subscription",
    ))
}
