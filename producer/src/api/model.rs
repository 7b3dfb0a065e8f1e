//! What the API and the CLI show: runs, databases and statistics, read with the same queries
//! by both (the CLI is the API's twin, not a second implementation).

use chrono::{DateTime, Datelike, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, Statement, Value};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// The columns of a run, as the trigger's notification carries them.
pub const RUN_SELECT: &str = "SELECT id, database_id, integration, mode, reason, status, attempt, enqueued_at, \
     started_at, finished_at, requests, rate_limited, pages_seen, pages_created, pages_updated, pages_unchanged, \
     pages_deleted, pages_invalid, error_kind, error_message, change_seq AS seq FROM sync_runs";

/// One run's stored state (a `sync_runs` row, or the payload of its change notification).
#[derive(Debug, Clone, PartialEq, Deserialize, FromQueryResult)]
pub struct RunRow {
    pub id: Uuid,
    pub database_id: Uuid,
    pub integration: String,
    pub mode: String,
    pub reason: String,
    pub status: String,
    pub attempt: i32,
    pub enqueued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub requests: i64,
    pub rate_limited: i64,
    pub pages_seen: i64,
    pub pages_created: i64,
    pub pages_updated: i64,
    pub pages_unchanged: i64,
    pub pages_deleted: i64,
    pub pages_invalid: i64,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub seq: i64,
}

impl RunRow {
    pub fn is_final(&self) -> bool {
        syncfleet_shared::db::entities::sync_run::status::is_final(&self.status)
    }

    pub async fn find(db: &impl ConnectionTrait, id: Uuid) -> Result<Option<RunRow>, sea_orm::DbErr> {
        RunRow::find_by_statement(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("{RUN_SELECT} WHERE id = $1"),
            [id.into()],
        ))
        .one(db)
        .await
    }

    /// The view of this run, with `estimate` as the expected page total.
    pub fn view(&self, estimate: Option<i64>) -> Run {
        let duration_secs = self.started_at.map(|s| {
            let end = self.finished_at.unwrap_or_else(Utc::now);
            (end - s).num_milliseconds().max(0) as f64 / 1000.0
        });
        let estimated_total = estimate.filter(|n| *n > 0).map(|n| n.max(self.pages_seen));
        let fraction = if self.is_final() && self.status != "failed" {
            Some(1.0)
        } else {
            estimated_total.map(|t| (self.pages_seen as f64 / t as f64).clamp(0.0, 1.0))
        };
        Run {
            id: self.id,
            database_id: self.database_id,
            integration: self.integration.clone(),
            mode: self.mode.clone(),
            reason: self.reason.clone(),
            status: self.status.clone(),
            is_final: self.is_final(),
            attempt: self.attempt,
            enqueued_at: self.enqueued_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            duration_secs,
            counters: Counters {
                requests: self.requests,
                rate_limited: self.rate_limited,
                pages_seen: self.pages_seen,
                pages_created: self.pages_created,
                pages_updated: self.pages_updated,
                pages_unchanged: self.pages_unchanged,
                pages_deleted: self.pages_deleted,
                pages_invalid: self.pages_invalid,
            },
            progress: Progress { pages_seen: self.pages_seen, estimated_total, fraction },
            error: self.error_kind.as_ref().map(|kind| RunError {
                kind: kind.clone(),
                message: self.error_message.clone().unwrap_or_default(),
                suggested_fix: syncfleet_shared::notify::advice_for(kind).to_string(),
            }),
            seq: self.seq,
        }
    }
}

/// A sync run (one job id).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Run {
    pub id: Uuid,
    pub database_id: Uuid,
    pub integration: String,
    /// `full` or `incremental`.
    pub mode: String,
    /// Why the job exists: `schedule`, `manual`, `api`, `reconcile`, `rerun`, `webhook`.
    pub reason: String,
    /// `queued`, `running`, `retrying`, `abandoned`, `succeeded`, `partial`, `failed` or `skipped`.
    pub status: String,
    /// Whether the status can still change.
    pub is_final: bool,
    pub attempt: i32,
    pub enqueued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// From start to finish (or to now while it runs).
    pub duration_secs: Option<f64>,
    pub counters: Counters,
    pub progress: Progress,
    pub error: Option<RunError>,
    /// The run's change sequence: grows with every stored change (the SSE event id).
    pub seq: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Counters {
    pub requests: i64,
    pub rate_limited: i64,
    pub pages_seen: i64,
    pub pages_created: i64,
    pub pages_updated: i64,
    pub pages_unchanged: i64,
    pub pages_deleted: i64,
    pub pages_invalid: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Progress {
    pub pages_seen: i64,
    /// Expected pages, from the database's last successful run of the same mode; unknown before.
    pub estimated_total: Option<i64>,
    /// `pages_seen / estimated_total` (1 once the run succeeded).
    pub fraction: Option<f64>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RunError {
    /// A bounded kind (`notion_unauthorized`, `publish_failed`, …).
    pub kind: String,
    pub message: String,
    /// What an operator should do about it.
    pub suggested_fix: String,
}

/// Pages seen by `database`'s last successful run of `mode`: the progress estimate.
pub async fn estimate(
    db: &impl ConnectionTrait,
    database: Uuid,
    mode: &str,
) -> Result<Option<i64>, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pages_seen FROM sync_runs WHERE database_id = $1 AND mode = $2 \
               AND status IN ('succeeded', 'partial') ORDER BY finished_at DESC NULLS LAST LIMIT 1",
            [database.into(), mode.into()],
        ))
        .await?;
    row.map(|r| r.try_get::<i64>("", "pages_seen")).transpose()
}

/// A run with its estimate, or `None` when no run has this id.
pub async fn run_view(db: &DatabaseConnection, id: Uuid) -> Result<Option<Run>, sea_orm::DbErr> {
    let Some(row) = RunRow::find(db, id).await? else { return Ok(None) };
    let estimate = estimate(db, row.database_id, &row.mode).await?;
    Ok(Some(row.view(estimate)))
}

// ---------------------------------------------------------------------------------------------
// Identifiers and enums accepted from clients.

/// A Notion id: a UUID with or without dashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotionId(pub Uuid);

impl<'de> Deserialize<'de> for NotionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_id(&text).map(NotionId).map_err(serde::de::Error::custom)
    }
}

/// Parses a Notion id (32 hex digits, dashes optional).
pub fn parse_id(text: &str) -> Result<Uuid, String> {
    let t = text.trim();
    let hex: String = t.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("{:?} is not a Notion id (32 hex digits, dashes optional)", shorten(t)));
    }
    Uuid::parse_str(&hex).map_err(|e| e.to_string())
}

fn shorten(t: &str) -> String {
    if t.chars().count() > 60 {
        format!("{}…", t.chars().take(60).collect::<String>())
    } else {
        t.to_string()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ModeParam {
    Full,
    #[default]
    Incremental,
}

impl From<ModeParam> for syncfleet_shared::job::SyncMode {
    fn from(m: ModeParam) -> Self {
        match m {
            ModeParam::Full => Self::Full,
            ModeParam::Incremental => Self::Incremental,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PriorityParam {
    Low,
    #[default]
    Normal,
    High,
}

impl PriorityParam {
    /// The default of jobs someone asked for (API, CLI): ahead of scheduled ones.
    pub fn high() -> Self {
        Self::High
    }
}

impl From<PriorityParam> for syncfleet_shared::job::Priority {
    fn from(p: PriorityParam) -> Self {
        match p {
            PriorityParam::Low => Self::Low,
            PriorityParam::Normal => Self::Normal,
            PriorityParam::High => Self::High,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StatusParam {
    Queued,
    Running,
    Retrying,
    Abandoned,
    Succeeded,
    Partial,
    Failed,
    Skipped,
}

impl StatusParam {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Abandoned => "abandoned",
            Self::Succeeded => "succeeded",
            Self::Partial => "partial",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Run history.

/// Filters of `GET /v1/runs` (and `runs list`).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Only this database's runs (a Notion id, dashes optional).
    #[param(value_type = Option<String>)]
    pub database: Option<NotionId>,
    #[param(inline)]
    pub status: Option<StatusParam>,
    /// Only runs enqueued at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// At most this many runs (1–500, default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RunPage {
    /// Newest first.
    pub runs: Vec<Run>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Why a filter was refused: the field and the reason.
#[derive(Debug)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{}", at.timestamp_micros(), id.simple())
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), FieldError> {
    let bad = || FieldError { field: "cursor", message: "is not a cursor this API returned".into() };
    let (micros, id) = cursor.split_once('_').ok_or_else(bad)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .filter(storable)
        .ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok((at, id))
}

/// Whether PostgreSQL's driver can bind `at` (years 1 to 9999; chrono reaches much further,
/// and an out-of-range bind would be a 500 instead of the client's mistake).
fn storable(at: &DateTime<Utc>) -> bool {
    (1..=9999).contains(&at.year())
}

/// A page of run history, newest first (keyset pagination on `(enqueued_at, id)`).
pub async fn runs_page(
    db: &DatabaseConnection,
    q: &RunsQuery,
) -> Result<Result<RunPage, FieldError>, sea_orm::DbErr> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Ok(Err(FieldError { field: "limit", message: "must be between 1 and 500".into() }));
    }
    let cursor = match q.cursor.as_deref().map(decode_cursor).transpose() {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    if q.since.is_some_and(|since| !storable(&since)) {
        return Ok(Err(FieldError {
            field: "since",
            message: "must be a time between the years 1 and 9999".into(),
        }));
    }
    let mut sql = format!("{RUN_SELECT} WHERE true");
    let mut values: Vec<Value> = Vec::new();
    if let Some(db_id) = q.database {
        values.push(db_id.0.into());
        sql.push_str(&format!(" AND database_id = ${}", values.len()));
    }
    if let Some(status) = q.status {
        values.push(status.as_str().into());
        sql.push_str(&format!(" AND status = ${}", values.len()));
    }
    if let Some(since) = q.since {
        values.push(since.into());
        sql.push_str(&format!(" AND enqueued_at >= ${}", values.len()));
    }
    if let Some((at, id)) = cursor {
        values.push(at.into());
        values.push(id.into());
        sql.push_str(&format!(" AND (enqueued_at, id) < (${}, ${})", values.len() - 1, values.len()));
    }
    values.push(i64::from(limit + 1).into());
    sql.push_str(&format!(" ORDER BY enqueued_at DESC, id DESC LIMIT ${}", values.len()));
    let mut rows =
        RunRow::find_by_statement(Statement::from_sql_and_values(DbBackend::Postgres, sql, values))
            .all(db)
            .await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| encode_cursor(r.enqueued_at, r.id))
    } else {
        None
    };
    Ok(Ok(RunPage { runs: rows.iter().map(|r| r.view(None)).collect(), next_cursor }))
}

// ---------------------------------------------------------------------------------------------
// Databases.

/// A mirrored Notion database.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Database {
    pub id: Uuid,
    /// The title in Notion (untrusted text).
    pub title: String,
    pub integration: String,
    pub data_source_id: Uuid,
    /// The typed view's name in PostgreSQL (`notion_view_<slug>`).
    pub slug: String,
    /// Disabled databases are not scheduled.
    pub enabled: bool,
    /// Seconds between scheduled incremental syncs (`null`: the default interval); a cron
    /// schedule, when set, replaces it.
    pub interval_secs: Option<i32>,
    /// The cron schedule, its IANA time zone and jitter, when the database has one.
    pub cron: Option<String>,
    pub tz: Option<String>,
    pub jitter_secs: i32,
    /// Per-property view rules, by property id.
    #[schema(value_type = Object)]
    pub mapping: serde_json::Value,
    /// Live pages in the mirror.
    pub pages: i64,
    pub last_success_at: Option<DateTime<Utc>>,
    pub watermark: Option<DateTime<Utc>>,
    /// Why the typed view could not be regenerated last time.
    pub view_error: Option<String>,
    pub last_run: Option<Run>,
}

const DATABASE_SELECT: &str = r#"
SELECT d.id, d.title, d.integration, d.data_source_id, d.slug, d.enabled, d.sync_interval_secs, d.mapping,
       d.schedule_cron, d.schedule_tz, d.schedule_jitter_secs,
       d.last_success_at, d.watermark, d.view_error,
       (SELECT count(*) FROM notion_pages p WHERE p.database_id = d.id AND p.deleted_at IS NULL) AS pages,
       (SELECT r.id FROM sync_runs r WHERE r.database_id = d.id ORDER BY r.enqueued_at DESC LIMIT 1) AS last_run
FROM notion_databases d
"#;

#[derive(FromQueryResult)]
struct DatabaseRow {
    id: Uuid,
    title: String,
    integration: String,
    data_source_id: Uuid,
    slug: String,
    enabled: bool,
    sync_interval_secs: Option<i32>,
    schedule_cron: Option<String>,
    schedule_tz: Option<String>,
    schedule_jitter_secs: i32,
    mapping: serde_json::Value,
    last_success_at: Option<DateTime<Utc>>,
    watermark: Option<DateTime<Utc>>,
    view_error: Option<String>,
    pages: i64,
    last_run: Option<Uuid>,
}

async fn databases_where(
    db: &DatabaseConnection,
    filter: &str,
    values: Vec<Value>,
) -> Result<Vec<Database>, sea_orm::DbErr> {
    let rows = DatabaseRow::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!("{DATABASE_SELECT} {filter} ORDER BY d.title, d.id"),
        values,
    ))
    .all(db)
    .await?;
    let run_ids: Vec<Uuid> = rows.iter().filter_map(|r| r.last_run).collect();
    let runs = RunRow::find_many(db, &run_ids).await?;
    Ok(rows
        .into_iter()
        .map(|r| Database {
            last_run: r.last_run.and_then(|id| runs.iter().find(|x| x.id == id)).map(|x| x.view(None)),
            id: r.id,
            title: r.title,
            integration: r.integration,
            data_source_id: r.data_source_id,
            slug: r.slug,
            enabled: r.enabled,
            interval_secs: r.sync_interval_secs,
            cron: r.schedule_cron,
            tz: r.schedule_tz,
            jitter_secs: r.schedule_jitter_secs,
            mapping: r.mapping,
            pages: r.pages,
            last_success_at: r.last_success_at,
            watermark: r.watermark,
            view_error: r.view_error,
        })
        .collect())
}

pub async fn databases(db: &DatabaseConnection) -> Result<Vec<Database>, sea_orm::DbErr> {
    databases_where(db, "", Vec::new()).await
}

pub async fn database(db: &DatabaseConnection, id: Uuid) -> Result<Option<Database>, sea_orm::DbErr> {
    Ok(databases_where(db, "WHERE d.id = $1", vec![id.into()]).await?.into_iter().next())
}

/// `POST /v1/databases`: registers a database, reading its schema from Notion.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDatabase {
    /// The slug of a registered integration that can read the database.
    pub integration: String,
    /// The Notion database id (dashes optional).
    #[schema(value_type = String, example = "1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f")]
    pub id: NotionId,
    /// Which data source to mirror when there are several (default: the first).
    #[schema(value_type = Option<String>)]
    pub data_source: Option<NotionId>,
    /// Seconds between scheduled incremental syncs (10 – 2,592,000).
    #[schema(minimum = 10, maximum = 2_592_000)]
    pub interval_secs: Option<u32>,
}

/// `PATCH /v1/databases/{id}`: only the fields given change.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDatabase {
    /// Seconds between scheduled incremental syncs (10 – 2,592,000); `null` returns to the
    /// default interval.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 10, maximum = 2_592_000, nullable)]
    pub interval_secs: Option<Option<u32>>,
    /// A cron expression (5 or 6 fields, or `@hourly`…) that replaces the interval; `null`
    /// removes it. Setting one enables the database.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, nullable)]
    pub cron: Option<Option<String>>,
    /// The IANA time zone `cron` is read in (default UTC); only with `cron`.
    pub tz: Option<String>,
    /// Spread runs up to this many seconds after each occurrence (0 – 86,400); only with `cron`.
    #[schema(maximum = 86_400)]
    pub jitter_secs: Option<u32>,
    pub enabled: Option<bool>,
    /// The whole mapping (`{"properties": {"<name or id>": {"column": …, "skip": …,
    /// "transform": …, "required": …}}}`), checked against the stored schema.
    #[schema(value_type = Option<Object>)]
    pub mapping: Option<serde_json::Value>,
}

/// A field that is present (possibly `null`) becomes `Some(value)`; absent stays `None`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

pub const INTERVAL_RANGE: std::ops::RangeInclusive<u32> = 10..=2_592_000;

/// Applies `patch` to database `id`: `Ok(None)` when it does not exist.
pub async fn update_database(
    db: &DatabaseConnection,
    id: Uuid,
    patch: &UpdateDatabase,
) -> Result<Result<Option<Database>, FieldError>, sea_orm::DbErr> {
    use sea_orm::{ActiveModelTrait, EntityTrait, IntoActiveModel, Set};
    use syncfleet_shared::db::entities::notion_database;
    use syncfleet_shared::mapping::Mapping;
    let Some(model) = notion_database::Entity::find_by_id(id).one(db).await? else { return Ok(Ok(None)) };
    let cron = patch.cron.as_ref().and_then(|c| c.as_deref());
    if cron.is_none() && (patch.tz.is_some() || patch.jitter_secs.is_some()) {
        let field = if patch.tz.is_some() { "tz" } else { "jitter_secs" };
        return Ok(Err(FieldError { field, message: "is only accepted with a cron expression".into() }));
    }
    if let Some(expression) = cron
        && let Err(e) = crate::schedule::CronSchedule::parse_new(
            expression,
            patch.tz.as_deref(),
            patch.jitter_secs.unwrap_or(0),
        )
    {
        return Ok(Err(FieldError { field: e.field, message: e.reason }));
    }
    if let Some(Some(secs)) = patch.interval_secs
        && !INTERVAL_RANGE.contains(&secs)
    {
        return Ok(Err(FieldError {
            field: "interval_secs",
            message: "must be between 10 and 2592000".into(),
        }));
    }
    let mapping = match &patch.mapping {
        None => None,
        Some(value) => match Mapping::from_json(value).and_then(|m| m.resolve(&model.schema)) {
            Ok(m) => Some(serde_json::to_value(&m).map_err(|e| sea_orm::DbErr::Custom(e.to_string()))?),
            Err(e) => return Ok(Err(FieldError { field: "mapping", message: e.to_string() })),
        },
    };
    // The cron schedule first: it enables the database, and an `enabled` in the same patch wins.
    match (&patch.cron, cron) {
        (_, Some(expression)) => {
            match crate::schedule::store(
                db,
                id,
                expression,
                patch.tz.as_deref(),
                patch.jitter_secs.unwrap_or(0),
            )
            .await
            {
                Ok(_) => {}
                Err(crate::schedule::StoreError::Invalid(e)) => {
                    return Ok(Err(FieldError { field: e.field, message: e.reason }));
                }
                Err(crate::schedule::StoreError::Db(e)) => return Err(e),
            }
        }
        (Some(None), None) => crate::schedule::clear(db, id).await?,
        _ => {}
    }
    let mut active = model.into_active_model();
    if let Some(interval) = patch.interval_secs {
        active.sync_interval_secs = Set(interval.map(|s| s as i32));
    }
    if let Some(enabled) = patch.enabled {
        active.enabled = Set(enabled);
    }
    if let Some(mapping) = mapping {
        active.mapping = Set(mapping);
    }
    active.updated_at = Set(Utc::now());
    active.update(db).await?;
    Ok(Ok(database(db, id).await?))
}

// ---------------------------------------------------------------------------------------------
// Statistics.

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// The window, in hours back from now (1–720, default 24).
    #[param(minimum = 1, maximum = 720)]
    pub hours: Option<u32>,
}

/// Runs enqueued in the window.
#[derive(Debug, Clone, Serialize, ToSchema, FromQueryResult)]
pub struct RunStats {
    pub runs: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Succeeded (or partial) among finished runs that were not skipped.
    pub success_rate: Option<f64>,
    pub p50_duration_secs: Option<f64>,
    pub p95_duration_secs: Option<f64>,
    pub pages: i64,
    pub pages_per_hour: f64,
    pub requests: i64,
    pub rate_limited: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DatabaseStats {
    pub database_id: Uuid,
    pub title: String,
    #[serde(flatten)]
    pub stats: RunStats,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Stats {
    pub hours: u32,
    pub overall: RunStats,
    pub databases: Vec<DatabaseStats>,
}

const STATS_COLUMNS: &str = r#"
count(r.id) AS runs,
count(r.id) FILTER (WHERE r.status IN ('succeeded', 'partial')) AS succeeded,
count(r.id) FILTER (WHERE r.status = 'failed') AS failed,
(count(r.id) FILTER (WHERE r.status IN ('succeeded', 'partial')))::float8
    / NULLIF(count(r.id) FILTER (WHERE r.status IN ('succeeded', 'partial', 'failed')), 0) AS success_rate,
percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM r.finished_at - r.started_at))
    FILTER (WHERE r.finished_at IS NOT NULL AND r.started_at IS NOT NULL) AS p50_duration_secs,
percentile_cont(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM r.finished_at - r.started_at))
    FILTER (WHERE r.finished_at IS NOT NULL AND r.started_at IS NOT NULL) AS p95_duration_secs,
COALESCE(sum(r.pages_seen), 0)::bigint AS pages,
COALESCE(sum(r.pages_seen), 0)::float8 / $1 AS pages_per_hour,
COALESCE(sum(r.requests), 0)::bigint AS requests,
COALESCE(sum(r.rate_limited), 0)::bigint AS rate_limited
"#;

#[derive(FromQueryResult)]
struct DatabaseStatsRow {
    database_id: Uuid,
    title: String,
    runs: i64,
    succeeded: i64,
    failed: i64,
    success_rate: Option<f64>,
    p50_duration_secs: Option<f64>,
    p95_duration_secs: Option<f64>,
    pages: i64,
    pages_per_hour: f64,
    requests: i64,
    rate_limited: i64,
}

pub async fn stats(
    db: &DatabaseConnection,
    hours: Option<u32>,
) -> Result<Result<Stats, FieldError>, sea_orm::DbErr> {
    let hours = hours.unwrap_or(24);
    if !(1..=720).contains(&hours) {
        return Ok(Err(FieldError { field: "hours", message: "must be between 1 and 720".into() }));
    }
    let window = "r.enqueued_at >= now() - make_interval(hours => $2)";
    let values = || -> Vec<Value> { vec![f64::from(hours).into(), (hours as i32).into()] };
    let overall = RunStats::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!("SELECT {STATS_COLUMNS} FROM sync_runs r WHERE {window}"),
        values(),
    ))
    .one(db)
    .await?
    .ok_or_else(|| sea_orm::DbErr::Custom("no statistics row".into()))?;
    let rows = DatabaseStatsRow::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "SELECT d.id AS database_id, d.title, {STATS_COLUMNS} FROM notion_databases d \
             LEFT JOIN sync_runs r ON r.database_id = d.id AND {window} GROUP BY d.id, d.title ORDER BY d.title, d.id"
        ),
        values(),
    ))
    .all(db)
    .await?;
    let databases = rows
        .into_iter()
        .map(|r| DatabaseStats {
            database_id: r.database_id,
            title: r.title,
            stats: RunStats {
                runs: r.runs,
                succeeded: r.succeeded,
                failed: r.failed,
                success_rate: r.success_rate,
                p50_duration_secs: r.p50_duration_secs,
                p95_duration_secs: r.p95_duration_secs,
                pages: r.pages,
                pages_per_hour: r.pages_per_hour,
                requests: r.requests,
                rate_limited: r.rate_limited,
            },
        })
        .collect();
    Ok(Ok(Stats { hours, overall, databases }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notion_ids_are_accepted_with_or_without_dashes_and_nothing_else() {
        let dashed = "1c2d3e4f-5a6b-7c8d-9e0f-1a2b3c4d5e6f";
        assert_eq!(parse_id(dashed), parse_id("1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f"));
        assert!(parse_id(dashed).is_ok());
        for bad in [
            "",
            "x",
            "1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6",
            "{1c2d3e4f-5a6b-7c8d-9e0f-1a2b3c4d5e6f}",
            "g".repeat(32).as_str(),
        ] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_a_field_error() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        let id = Uuid::new_v4();
        assert_eq!(decode_cursor(&encode_cursor(at, id)).unwrap(), (at, id));
        assert_eq!(decode_cursor("nope").unwrap_err().field, "cursor");
        assert_eq!(decode_cursor("99999999999999999999_x").unwrap_err().field, "cursor");
        // Representable by chrono, but not bindable: the client's mistake, not a 500.
        let far = format!("{}_{}", i64::MAX / 2, id.simple());
        assert_eq!(decode_cursor(&far).unwrap_err().field, "cursor");
        let bc = format!("{}_{}", -70_000_000_000_000_000i64, id.simple());
        assert_eq!(decode_cursor(&bc).unwrap_err().field, "cursor");
    }
}
