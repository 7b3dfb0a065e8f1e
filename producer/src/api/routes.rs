//! The `/v1` handlers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use syncfleet_shared::job::{Reason, SyncDatabaseJob};
use tokio::time::Instant;
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::error::{ApiError, ApiJson, ApiQuery, ErrorBody, IdPath};
use super::model::{self, NotionId, RunRow};
use crate::publish::PublishError;

/// Unknown paths: a JSON 404.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint (the API is described at /openapi.json)")
}

// ---------------------------------------------------------------------------------------------
// Jobs.

/// `POST /v1/jobs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// The registered Notion database to sync (dashes optional).
    #[schema(value_type = String, example = "1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f")]
    pub database: NotionId,
    #[serde(default)]
    pub mode: model::ModeParam,
    /// Omitted: `high`, so the job goes ahead of any scheduled backlog (`<prefix>.jobs.high`).
    #[serde(default = "model::PriorityParam::high")]
    pub priority: model::PriorityParam,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    pub job_id: Uuid,
    /// `GET` this for the run's status.
    pub status_url: String,
    /// Server-Sent Events of the run's progress.
    pub events_url: String,
    /// Whether RabbitMQ confirmed the publish. `false`: the message was sent but its confirm
    /// never came; the run stays `queued` with the error kind `publish_unconfirmed` until
    /// `serve`'s leader publishes it again under the same id, so it runs once either way. Do
    /// not publish the same request again: that would be a second job.
    pub confirmed: bool,
}

impl JobAccepted {
    fn new(job_id: Uuid, confirmed: bool) -> Self {
        Self {
            job_id,
            status_url: format!("/v1/jobs/{job_id}"),
            events_url: format!("/v1/jobs/{job_id}/events"),
            confirmed,
        }
    }
}

/// Publishes a sync job (with a broker confirm) and records its run as `queued`.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = CreateJob,
    responses(
        (status = 202, description = "Published; `confirmed` says whether RabbitMQ confirmed it", body = JobAccepted),
        (status = 400, description = "A field is wrong", body = ErrorBody),
        (status = 401, description = "No or a wrong token", body = ErrorBody),
        (status = 404, description = "The database is not registered", body = ErrorBody),
        (status = 503, description = "RabbitMQ or PostgreSQL is unavailable", body = ErrorBody),
    ))]
pub async fn create_job(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CreateJob>,
) -> Result<(StatusCode, Json<JobAccepted>), ApiError> {
    use sea_orm::EntityTrait;
    use syncfleet_shared::db::entities::notion_database;
    let database = notion_database::Entity::find_by_id(body.database.0)
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("database {} is not registered", body.database.0)))?;
    let data = SyncDatabaseJob {
        integration: database.integration.clone(),
        database_id: database.id,
        mode: body.mode.into(),
        priority: body.priority.into(),
        reason: Reason::Api,
    };
    match state.publisher.publish(&state.db, "urn:syncfleet:api", data).await {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(JobAccepted::new(job.id, true)))),
        // Sent without a confirm: the job may run, so the client gets its id to watch instead of
        // an error that invites a duplicate.
        Err(PublishError::Unconfirmed { job_id, message }) => {
            tracing::warn!(job_id = %job_id, error = %message, "An API job's publish is unconfirmed.");
            Ok((StatusCode::ACCEPTED, Json(JobAccepted::new(job_id, false))))
        }
        Err(PublishError::Db(e)) => Err(e.into()),
        Err(e) => Err(ApiError::unavailable(e.to_string())),
    }
}

/// A job's run: status, counters, progress and error.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "The job id (dashes optional)")),
    responses(
        (status = 200, description = "OK", body = model::Run),
        (status = 400, description = "The id is not a UUID", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
pub async fn get_job(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<model::Run>, ApiError> {
    model::run_view(&state.db, id).await?.map(Json).ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

/// How often an active run's progress is sent even when nothing changed.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// At most one progress event per this interval (changes in between are coalesced: each event
/// carries the whole state).
const MIN_GAP: Duration = Duration::from_millis(250);

/// Server-Sent Events of a job's run.
///
/// Each event's `data` is the run (as `GET /v1/jobs/{id}`) and its `id` is the run's change
/// sequence. `progress` events come at least every 2 s while the run is active (changes are
/// coalesced to at most 4 a second); one `final` event ends the stream. Events are cumulative
/// states, so a client reconnecting with `Last-Event-ID` is sent the current state at once when
/// anything changed since that id, and misses no change.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = String, Path, description = "The job id (dashes optional)"),
        ("Last-Event-ID" = Option<String>, Header, description = "The last event id received, to resume"),
    ),
    responses(
        (status = 200, description = "An event stream of `progress` and `final` events", content_type = "text/event-stream", body = String),
        (status = 400, description = "A field is wrong (named in `error.field`)", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such resource", body = ErrorBody),
    ))]
pub async fn job_events(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let last_seen =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<i64>().ok());
    // Subscribe before reading, so a change committed in between reaches the stream.
    let rx = state.hub.watch(id);
    let row =
        RunRow::find(&state.db, id).await?.ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    let estimate = model::estimate(&state.db, row.database_id, &row.mode).await?;
    let open = OpenStream::new(state.metrics.clone());
    let stream = progress_stream(rx, Arc::new(row), estimate, last_seen).map(move |event| {
        let _counted = &open;
        event
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(5)).text("heartbeat")))
}

/// Counts an open event stream in `syncfleet_api_sse_clients` until it is dropped.
struct OpenStream(Arc<syncfleet_shared::metrics::Metrics>);

impl OpenStream {
    fn new(metrics: Arc<syncfleet_shared::metrics::Metrics>) -> Self {
        metrics.sse_clients.inc();
        Self(metrics)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.sse_clients.dec();
    }
}

struct StreamState {
    rx: tokio::sync::watch::Receiver<Option<Arc<RunRow>>>,
    current: Arc<RunRow>,
    estimate: Option<i64>,
    last_sent: Option<i64>,
    next_allowed: Instant,
    next_refresh: Instant,
    done: bool,
}

/// The events of one run, from its current state and the hub's updates.
pub fn progress_stream(
    rx: tokio::sync::watch::Receiver<Option<Arc<RunRow>>>,
    current: Arc<RunRow>,
    estimate: Option<i64>,
    last_seen: Option<i64>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let now = Instant::now();
    let st = StreamState {
        rx,
        current,
        estimate,
        last_sent: last_seen,
        next_allowed: now,
        next_refresh: now,
        done: false,
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if let Some(newer) = st.rx.borrow_and_update().clone()
                && newer.supersedes(&st.current)
            {
                st.current = newer;
            }
            let now = Instant::now();
            let changed = st.last_sent.is_none_or(|l| st.current.seq > l);
            if st.current.is_final() && (changed || now >= st.next_allowed) {
                st.done = true;
                return Some((Ok(event("final", &st.current, st.estimate)), st));
            }
            if (changed && now >= st.next_allowed) || now >= st.next_refresh {
                st.last_sent = Some(st.current.seq);
                st.next_allowed = now + MIN_GAP;
                st.next_refresh = now + PROGRESS_EVERY;
                return Some((Ok(event("progress", &st.current, st.estimate)), st));
            }
            let wake = if changed { st.next_allowed } else { st.next_refresh };
            tokio::select! {
                changed = st.rx.changed(), if !changed => {
                    if changed.is_err() {
                        // The hub is gone (shutting down): end the stream.
                        st.done = true;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    })
}

fn event(kind: &str, row: &RunRow, estimate: Option<i64>) -> Event {
    let data = serde_json::to_string(&row.view(estimate)).unwrap_or_else(|_| "{}".into());
    Event::default().event(kind).id(row.seq.to_string()).data(data)
}

// ---------------------------------------------------------------------------------------------
// Databases.

/// Every mirrored database.
#[utoipa::path(get, path = "/v1/databases", tag = "databases",
    responses((status = 200, description = "OK", body = Vec<model::Database>), (status = 401, description = "No or a wrong bearer token", body = ErrorBody)))]
pub async fn list_databases(State(state): State<AppState>) -> Result<Json<Vec<model::Database>>, ApiError> {
    Ok(Json(model::databases(&state.db).await?))
}

/// Registers a database: reads it and its data source's schema from Notion.
#[utoipa::path(post, path = "/v1/databases", tag = "databases", request_body = model::CreateDatabase,
    responses(
        (status = 201, description = "Registered", body = model::Database),
        (status = 400, description = "A field is wrong, or the integration is not registered", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
        (status = 404, description = "Notion has no such database shared with the integration", body = ErrorBody),
        (status = 502, description = "Notion refused or failed the read", body = ErrorBody),
        (status = 503, description = "A backing service is unavailable; retry", body = ErrorBody),
    ))]
pub async fn create_database(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<model::CreateDatabase>,
) -> Result<(StatusCode, Json<model::Database>), ApiError> {
    use crate::commands::database::{RegisterError, register};
    if let Some(secs) = body.interval_secs
        && !model::INTERVAL_RANGE.contains(&secs)
    {
        return Err(ApiError::bad_request("interval_secs", "interval_secs: must be between 10 and 2592000"));
    }
    let registered = register(
        &state.settings,
        &state.db,
        &state.redis,
        &body.integration,
        body.id.0,
        body.data_source.map(|d| d.0),
        body.interval_secs,
    )
    .await;
    match registered {
        Ok(_) => {}
        Err(RegisterError::UnknownIntegration(slug)) => {
            return Err(ApiError::bad_request(
                "integration",
                format!("integration: {slug:?} is not registered"),
            ));
        }
        Err(e @ RegisterError::NoSuchDataSource(..)) => {
            return Err(ApiError::bad_request("data_source", format!("data_source: {e}")));
        }
        Err(RegisterError::Notion(e)) => {
            use syncfleet_shared::notion::NotionError;
            return Err(match e.downcast_ref::<NotionError>() {
                // Notion does not know the id, or does not share it with this integration.
                Some(NotionError::Api { status: 404, .. }) => ApiError::not_found(format!(
                    "Notion has no database {} shared with integration {:?}",
                    body.id.0, body.integration
                )),
                _ => ApiError::bad_gateway(format!("{e:#}")),
            });
        }
        Err(RegisterError::Other(e)) => return Err(ApiError::internal(format!("{e:#}"))),
    }
    let view = model::database(&state.db, body.id.0)
        .await?
        .ok_or_else(|| ApiError::internal("registered database vanished"))?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// One database.
#[utoipa::path(get, path = "/v1/databases/{id}", tag = "databases",
    params(("id" = String, Path, description = "The Notion database id (dashes optional)")),
    responses((status = 200, description = "OK", body = model::Database), (status = 400, description = "A field is wrong (named in `error.field`)", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody), (status = 404, description = "No such resource", body = ErrorBody)))]
pub async fn get_database(
    State(state): State<AppState>,
    IdPath(id): IdPath,
) -> Result<Json<model::Database>, ApiError> {
    model::database(&state.db, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("database {id} is not registered")))
}

/// Changes a database's schedule, mapping or whether it is enabled.
#[utoipa::path(patch, path = "/v1/databases/{id}", tag = "databases", request_body = model::UpdateDatabase,
    params(("id" = String, Path, description = "The Notion database id (dashes optional)")),
    responses((status = 200, description = "OK", body = model::Database), (status = 400, description = "A field is wrong (named in `error.field`)", body = ErrorBody),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody), (status = 404, description = "No such resource", body = ErrorBody)))]
pub async fn update_database(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    ApiJson(body): ApiJson<model::UpdateDatabase>,
) -> Result<Json<model::Database>, ApiError> {
    model::update_database(&state.db, id, &body)
        .await??
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("database {id} is not registered")))
}

// ---------------------------------------------------------------------------------------------
// History and statistics.

/// Run history, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/runs", tag = "runs", params(model::RunsQuery),
    responses((status = 200, description = "OK", body = model::RunPage), (status = 400, description = "A field is wrong (named in `error.field`)", body = ErrorBody), (status = 401, description = "No or a wrong bearer token", body = ErrorBody)))]
pub async fn list_runs(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<model::RunsQuery>,
) -> Result<Json<model::RunPage>, ApiError> {
    Ok(Json(model::runs_page(&state.db, &query).await??))
}

/// Runs, success rate, durations, pages and requests over the last hours, overall and per
/// database.
#[utoipa::path(get, path = "/v1/stats", tag = "runs", params(model::StatsQuery),
    responses((status = 200, description = "OK", body = model::Stats), (status = 400, description = "A field is wrong (named in `error.field`)", body = ErrorBody), (status = 401, description = "No or a wrong bearer token", body = ErrorBody)))]
pub async fn get_stats(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<model::StatsQuery>,
) -> Result<Json<model::Stats>, ApiError> {
    Ok(Json(model::stats(&state.db, query.hours).await??))
}

/// What the status page shows.
#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    /// Runs queued, running or retrying now, oldest first.
    pub active: Vec<model::Run>,
    pub queue: QueueDepth,
    pub integrations: Vec<IntegrationUse>,
    /// Per database, the last 24 hours.
    pub databases: Vec<DatabaseDay>,
    /// The latest failed runs of the last 24 hours, newest first.
    pub failures: Vec<model::Run>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueDepth {
    /// Ready in the normal work queue.
    pub ready: Option<u32>,
    /// Ready in the high-priority work queue.
    pub high_ready: Option<u32>,
    /// Parked by the per-integration cap (`worker.max_jobs_per_integration`).
    pub parked: Option<u32>,
    pub consumers: Option<u32>,
    /// Why the depth is unknown.
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationUse {
    pub slug: String,
    /// Configured requests per second.
    pub rate: f64,
    pub burst: i32,
    /// Requests counted by runs active in the last hour.
    pub requests_last_hour: i64,
    /// `requests_last_hour / (rate × 3600)`.
    pub use_last_hour: f64,
    /// How far reservations run ahead of now (ms): above 0, the budget is fully in use.
    pub backlog_ms: Option<f64>,
    pub paused_ms: Option<i64>,
    pub circuit_open: Option<bool>,
    /// The effective share of the rate after unexplained 429s.
    pub rate_factor: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct DatabaseDay {
    pub id: Uuid,
    pub title: String,
    pub enabled: bool,
    pub last_status: Option<String>,
    pub last_success_at: Option<chrono::DateTime<chrono::Utc>>,
    pub last_duration_secs: Option<f64>,
    pub runs: i64,
    pub failed: i64,
    pub pages: i64,
}

const DATABASE_DAY: &str = r#"
SELECT d.id, d.title, d.enabled, d.last_success_at,
       (SELECT r.status FROM sync_runs r WHERE r.database_id = d.id ORDER BY r.enqueued_at DESC LIMIT 1) AS last_status,
       (SELECT EXTRACT(EPOCH FROM r.finished_at - r.started_at)::float8 FROM sync_runs r
         WHERE r.database_id = d.id AND r.finished_at IS NOT NULL AND r.started_at IS NOT NULL
         ORDER BY r.finished_at DESC LIMIT 1) AS last_duration_secs,
       count(r.id) AS runs,
       count(r.id) FILTER (WHERE r.status = 'failed') AS failed,
       COALESCE(sum(r.pages_seen), 0)::bigint AS pages
FROM notion_databases d
LEFT JOIN sync_runs r ON r.database_id = d.id AND r.enqueued_at > now() - interval '24 hours'
GROUP BY d.id ORDER BY d.title, d.id
"#;

/// Running syncs, queue depth, budgets, the last 24 h per database and recent failures.
#[utoipa::path(get, path = "/v1/overview", tag = "status",
    responses((status = 200, description = "OK", body = Overview), (status = 401, description = "No or a wrong bearer token", body = ErrorBody)))]
pub async fn get_overview(State(state): State<AppState>) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    // One computation serves every viewer for OVERVIEW_TTL: the status page polls it, and a
    // hundred open pages must cost PostgreSQL one overview every 2 s, not a hundred. Viewers
    // arriving while it is computed wait for that result (the lock), instead of starting their own.
    let mut slot = state.overview.lock().await;
    let body = match slot.as_ref() {
        Some((at, body)) if at.elapsed() < OVERVIEW_TTL => body.clone(),
        _ => {
            let overview =
                build_overview(&state.db, &state.publisher, &state.redis, &state.settings.redis.key_prefix)
                    .await?;
            let body = axum::body::Bytes::from(serde_json::to_vec(&overview).map_err(ApiError::internal)?);
            *slot = Some((Instant::now(), body.clone()));
            body
        }
    };
    drop(slot);
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// How long one computed overview is served.
pub const OVERVIEW_TTL: Duration = Duration::from_secs(2);

/// Computes the overview (the API's `/v1/overview`, and `syncfleet-producer overview`).
pub async fn build_overview(
    db: &sea_orm::DatabaseConnection,
    publisher: &crate::publish::JobPublisher,
    redis: &syncfleet_shared::redis_pool::RedisPool,
    key_prefix: &str,
) -> Result<Overview, ApiError> {
    use sea_orm::{ConnectionTrait, DbBackend, FromQueryResult, Statement};
    let active_rows = RunRow::find_by_statement(Statement::from_string(
        DbBackend::Postgres,
        format!(
            "{} WHERE status IN ('queued', 'running', 'retrying') AND enqueued_at > now() - interval '6 hours' \
             ORDER BY enqueued_at LIMIT 100",
            model::RUN_SELECT
        ),
    ))
    .all(db)
    .await?;
    let mut active = Vec::with_capacity(active_rows.len());
    for row in &active_rows {
        active.push(row.view(model::estimate(db, row.database_id, &row.mode).await?));
    }
    let failures = RunRow::find_by_statement(Statement::from_string(
        DbBackend::Postgres,
        format!(
            "{} WHERE status = 'failed' AND enqueued_at > now() - interval '24 hours' ORDER BY enqueued_at DESC LIMIT 20",
            model::RUN_SELECT
        ),
    ))
    .all(db)
    .await?
    .iter()
    .map(|r| r.view(None))
    .collect();
    let queue = match publisher.queue_depth().await {
        Ok(c) => QueueDepth {
            ready: Some(c.ready),
            high_ready: Some(c.high_ready),
            parked: Some(c.parked),
            consumers: Some(c.consumers),
            error: None,
        },
        Err(e) => QueueDepth {
            ready: None,
            high_ready: None,
            parked: None,
            consumers: None,
            error: Some(e.to_string()),
        },
    };
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT i.slug, i.rate_per_second, i.burst, \
                    COALESCE((SELECT sum(r.requests) FROM sync_runs r WHERE r.integration = i.slug \
                      AND COALESCE(r.finished_at, r.heartbeat_at, r.enqueued_at) > now() - interval '1 hour'), 0)::bigint AS requests \
             FROM integrations i ORDER BY i.slug",
        ))
        .await?;
    let budget = syncfleet_shared::budget::Budget::new(redis.clone(), key_prefix);
    let mut integrations = Vec::with_capacity(rows.len());
    for row in rows {
        let slug: String = row.try_get("", "slug")?;
        let rate: f64 = row.try_get("", "rate_per_second")?;
        let requests: i64 = row.try_get("", "requests")?;
        let snapshot = budget.snapshot(&slug).await.ok();
        integrations.push(IntegrationUse {
            use_last_hour: if rate > 0.0 { requests as f64 / (rate * 3600.0) } else { 0.0 },
            burst: row.try_get("", "burst")?,
            slug,
            rate,
            requests_last_hour: requests,
            backlog_ms: snapshot.map(|s| s.backlog_ms),
            paused_ms: snapshot.map(|s| s.paused_ms),
            circuit_open: snapshot.map(|s| s.circuit_open),
            rate_factor: snapshot.map(|s| s.factor),
        });
    }
    let databases = DatabaseDay::find_by_statement(Statement::from_string(DbBackend::Postgres, DATABASE_DAY))
        .all(db)
        .await?;
    Ok(Overview { active, queue, integrations, databases, failures })
}
