//! `syncfleet-producer status`: databases, their freshness and their latest run.

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde::Serialize;
use syncfleet_shared::Settings;

#[derive(Debug, Serialize)]
struct DatabaseStatus {
    id: uuid::Uuid,
    title: String,
    integration: String,
    pages: i64,
    deleted_pages: i64,
    watermark: Option<chrono::DateTime<chrono::Utc>>,
    last_success_at: Option<chrono::DateTime<chrono::Utc>>,
    last_run: Option<RunStatus>,
}

#[derive(Debug, Serialize)]
struct RunStatus {
    id: uuid::Uuid,
    mode: String,
    status: String,
    pages_seen: i64,
    requests: i64,
    rate_limited: i64,
    error: Option<String>,
}

const QUERY: &str = r#"
SELECT d.id, d.title, d.integration, d.watermark, d.last_success_at,
       (SELECT count(*) FROM notion_pages p WHERE p.database_id = d.id AND p.deleted_at IS NULL) AS pages,
       (SELECT count(*) FROM notion_pages p WHERE p.database_id = d.id AND p.deleted_at IS NOT NULL) AS deleted_pages,
       r.id AS run_id, r.mode, r.status, r.pages_seen, r.requests, r.rate_limited, r.error_message
FROM notion_databases d
LEFT JOIN LATERAL (
    SELECT * FROM sync_runs r WHERE r.database_id = d.id ORDER BY r.enqueued_at DESC LIMIT 1
) r ON true
ORDER BY d.title, d.id
"#;

pub async fn run(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let rows = db.query_all_raw(Statement::from_string(DbBackend::Postgres, QUERY)).await?;
    let mut out = Vec::new();
    for row in rows {
        let run_id: Option<uuid::Uuid> = row.try_get("", "run_id")?;
        out.push(DatabaseStatus {
            id: row.try_get("", "id")?,
            title: row.try_get("", "title")?,
            integration: row.try_get("", "integration")?,
            pages: row.try_get("", "pages")?,
            deleted_pages: row.try_get("", "deleted_pages")?,
            watermark: row.try_get("", "watermark")?,
            last_success_at: row.try_get("", "last_success_at")?,
            last_run: match run_id {
                None => None,
                Some(id) => Some(RunStatus {
                    id,
                    mode: row.try_get("", "mode")?,
                    status: row.try_get("", "status")?,
                    pages_seen: row.try_get("", "pages_seen")?,
                    requests: row.try_get("", "requests")?,
                    rate_limited: row.try_get("", "rate_limited")?,
                    error: row.try_get("", "error_message")?,
                }),
            },
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if out.is_empty() {
        println!("no databases registered");
        return Ok(());
    }
    println!(
        "{:<36}  {:<24} {:<10} {:>8} {:>7}  {:<10} {:<12} last success",
        "database", "title", "integr.", "pages", "deleted", "last run", "status"
    );
    for d in &out {
        let (mode, status) =
            d.last_run.as_ref().map(|r| (r.mode.as_str(), r.status.as_str())).unwrap_or(("-", "-"));
        let title: String = d.title.chars().take(24).collect();
        let integration: String = d.integration.chars().take(10).collect();
        println!(
            "{:<36}  {:<24} {:<10} {:>8} {:>7}  {:<10} {:<12} {}",
            d.id,
            title,
            integration,
            d.pages,
            d.deleted_pages,
            mode,
            status,
            d.last_success_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
        );
    }
    Ok(())
}
