//! Compares PostgreSQL with the simulator's ground truth (`GET /_sim/export`).

use std::collections::HashMap;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::Value;
use uuid::Uuid;

/// What a comparison found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Pages in the export (live and trashed).
    pub expected_pages: usize,
    /// Live rows in PostgreSQL.
    pub live_rows: usize,
    pub missing: usize,
    pub extra: usize,
    pub different: usize,
    /// The first few problems, for humans.
    pub examples: Vec<String>,
}

impl Report {
    pub fn is_exact(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.different == 0
    }

    fn note(&mut self, s: String) {
        if self.examples.len() < 10 {
            self.examples.push(s);
        }
    }
}

/// Fetches the export of `database_id` from the simulator at `sim_url`.
pub async fn fetch_export(sim_url: &str, database_id: Uuid) -> anyhow::Result<Vec<Value>> {
    let url = format!("{sim_url}/_sim/export?database_id={database_id}");
    let export: Value = reqwest::get(&url).await?.error_for_status()?.json().await?;
    let pages = export["databases"][0]["pages"].as_array().cloned().unwrap_or_default();
    Ok(pages)
}

/// Every live page in the export must be a live row with equal properties and timestamps; every
/// trashed page must be absent or marked deleted/trashed; no other live rows may exist.
pub async fn compare(db: &DatabaseConnection, sim_url: &str, database_id: Uuid) -> anyhow::Result<Report> {
    let pages = fetch_export(sim_url, database_id).await?;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT page_id, properties, last_edited_time, created_time, in_trash, deleted_at IS NOT NULL AS deleted \
             FROM notion_pages WHERE database_id = $1",
            [database_id.into()],
        ))
        .await?;
    let mut stored: HashMap<
        Uuid,
        (Value, chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>, bool),
    > = HashMap::new();
    for row in rows {
        let id: Uuid = row.try_get("", "page_id")?;
        let trashed: bool = row.try_get("", "in_trash")?;
        let deleted: bool = row.try_get("", "deleted")?;
        stored.insert(
            id,
            (
                row.try_get("", "properties")?,
                row.try_get("", "last_edited_time")?,
                row.try_get("", "created_time")?,
                trashed || deleted,
            ),
        );
    }
    let mut report = Report { expected_pages: pages.len(), ..Report::default() };
    report.live_rows = stored.values().filter(|r| !r.3).count();
    for page in &pages {
        let id: Uuid = page["id"].as_str().and_then(|s| Uuid::parse_str(s).ok()).unwrap_or_default();
        let trashed = page["in_trash"].as_bool().unwrap_or(false);
        let row = stored.remove(&id);
        if trashed {
            if let Some(r) = row
                && !r.3
            {
                report.different += 1;
                report.note(format!("page {id} is trashed in Notion but live in PostgreSQL"));
            }
            continue;
        }
        let Some((props, edited, created, gone)) = row else {
            report.missing += 1;
            report.note(format!("page {id} is missing"));
            continue;
        };
        if gone {
            report.different += 1;
            report.note(format!("page {id} is live in Notion but deleted in PostgreSQL"));
            continue;
        }
        let want_edited = page["last_edited_time"].as_str().unwrap_or_default();
        let want_created = page["created_time"].as_str().unwrap_or_default();
        let same_time = |t: chrono::DateTime<chrono::Utc>, s: &str| {
            chrono::DateTime::parse_from_rfc3339(s).map(|w| w == t).unwrap_or(false)
        };
        if props != page["properties"] || !same_time(edited, want_edited) || !same_time(created, want_created)
        {
            report.different += 1;
            // Which properties differ, and how, for the first few.
            let keys: Vec<String> = page["properties"]
                .as_object()
                .map(|want| {
                    want.iter()
                        .filter(|(k, v)| props.get(k.as_str()) != Some(v))
                        .map(|(k, v)| {
                            let have = props.get(k.as_str()).map(|h| h.to_string()).unwrap_or_default();
                            format!("{k}: {:.160} vs {:.160}", have, v.to_string())
                        })
                        .collect()
                })
                .unwrap_or_default();
            report.note(format!("page {id} differs (edited {edited} vs {want_edited}; {})", keys.join("; ")));
        }
    }
    let extra: Vec<Uuid> = stored.iter().filter(|(_, r)| !r.3).map(|(id, _)| *id).collect();
    report.extra = extra.len();
    for id in extra.iter().take(3) {
        report.note(format!("page {id} is live in PostgreSQL but unknown to Notion"));
    }
    Ok(report)
}
