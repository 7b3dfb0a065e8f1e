//! `syncfleet-producer database add`: reads the database and its data source from Notion (under
//! the integration's rate budget) and stores the detected schema.

use anyhow::{Context, anyhow, bail};
use sea_orm::sea_query::OnConflict;
use sea_orm::{EntityTrait, Set};
use serde_json::Value;
use syncfleet_shared::Settings;
use syncfleet_shared::budget::{Budget, BudgetKey};
use syncfleet_shared::db::entities::{integration, notion_database};
use syncfleet_shared::metrics::{Metrics, Role};
use syncfleet_shared::notion::types::{DataSourceObject, DatabaseObject, plain_text};
use syncfleet_shared::notion::{Endpoint, NotionClient, NotionSession};
use uuid::Uuid;

pub async fn add(
    settings: &Settings,
    integration_slug: &str,
    id: Uuid,
    data_source: Option<Uuid>,
    interval_secs: Option<u32>,
    json: bool,
) -> anyhow::Result<()> {
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let redis = syncfleet_shared::redis_pool::connect(&settings.redis).await?;
    let registered =
        register(settings, &db, &redis, integration_slug, id, data_source, interval_secs).await?;
    if json {
        let view = crate::api::model::database(&db, id).await?;
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    if let Some(note) = &registered.note {
        eprintln!("{note}");
    }
    println!(
        "database {id} ({:?}) registered with data source {}",
        registered.title, registered.data_source_id
    );
    Ok(())
}

/// Why a database could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("integration {0} is not registered (run `integration add` first)")]
    UnknownIntegration(String),
    #[error("database {0} has no data source {1}")]
    NoSuchDataSource(Uuid, Uuid),
    /// Notion refused or failed the read (not shared, revoked token, unreachable).
    #[error("{0:#}")]
    Notion(anyhow::Error),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl From<sea_orm::DbErr> for RegisterError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::Other(e.into())
    }
}

/// What [`register`] stored.
#[derive(Debug, Clone)]
pub struct Registered {
    pub title: String,
    pub data_source_id: Uuid,
    /// A remark for the operator (several data sources, say).
    pub note: Option<String>,
}

/// Reads database `id` and its data source from Notion (under the integration's fleet-wide
/// budget) and stores it with its schema; registering again refreshes it.
pub async fn register(
    settings: &Settings,
    db: &sea_orm::DatabaseConnection,
    redis: &syncfleet_shared::redis_pool::RedisPool,
    integration_slug: &str,
    id: Uuid,
    data_source: Option<Uuid>,
    interval_secs: Option<u32>,
) -> Result<Registered, RegisterError> {
    let integ = integration::Entity::find_by_id(integration_slug.to_string())
        .one(db)
        .await?
        .ok_or_else(|| RegisterError::UnknownIntegration(integration_slug.to_string()))?;
    let token = settings
        .token_cipher()
        .map_err(anyhow::Error::from)?
        .decrypt(&integ.token_encrypted)
        .map_err(anyhow::Error::from)?;
    let key = BudgetKey {
        integration: integ.slug.clone(),
        rate: integ.rate_per_second,
        burst: integ.burst.max(1) as u32,
    };
    // Schema reads spend the same fleet-wide budget as the workers' syncs.
    let budget = Budget::new(redis.clone(), &settings.redis.key_prefix).with_circuit(settings.notion.circuit);
    let session = NotionSession::new(
        NotionClient::new(&settings.notion, Metrics::new(Role::Producer)).map_err(anyhow::Error::from)?,
        token,
        budget,
        key,
        &settings.notion,
    );

    let database: DatabaseObject = session
        .request::<(), _>(Endpoint::RetrieveDatabase, &format!("/v1/databases/{id}"), None)
        .await
        .context("reading the database from Notion")
        .map_err(RegisterError::Notion)?
        .body;
    let mut note = None;
    let source_id = match data_source {
        Some(ds) => {
            if !database.data_sources.iter().any(|d| d.id == ds) {
                return Err(RegisterError::NoSuchDataSource(id, ds));
            }
            ds
        }
        None => {
            let first = database.data_sources.first().ok_or_else(|| {
                RegisterError::Notion(anyhow!(
                    "database {id} lists no data sources (is notion.version 2025-09-03 or later?)"
                ))
            })?;
            if database.data_sources.len() > 1 {
                note = Some(format!(
                    "database has {} data sources; mirroring the first ({}); pick another with --data-source",
                    database.data_sources.len(),
                    first.id
                ));
            }
            first.id
        }
    };
    let source: DataSourceObject = session
        .request::<(), _>(Endpoint::RetrieveDataSource, &format!("/v1/data_sources/{source_id}"), None)
        .await
        .context("reading the data source schema from Notion")
        .map_err(RegisterError::Notion)?
        .body;
    let title = plain_text(&database.title);
    let schema = Value::Object(source.properties);
    let schema_hash = syncfleet_shared::hashing::json_hash(&schema);
    let now = chrono::Utc::now();
    let model = notion_database::ActiveModel {
        id: Set(id),
        integration: Set(integ.slug.clone()),
        data_source_id: Set(source_id),
        title: Set(title.clone()),
        slug: Set(slug_for(&title, id)),
        schema: Set(schema),
        schema_hash: Set(schema_hash),
        sync_interval_secs: Set(interval_secs.map(|s| s.min(i32::MAX as u32) as i32)),
        watermark: Set(None),
        fence: Set(0),
        last_success_at: Set(None),
        mapping: Set(serde_json::json!({})),
        view_hash: Set(String::new()),
        created_at: Set(now),
        updated_at: Set(now),
        rerun_mode: Set(None),
        rerun_seq: Set(0),
        rerun_requested_at: Set(None),
        view_error: Set(None),
        enabled: Set(true),
    };
    // Registering again refreshes what Notion says; the schedule changes only when one is given
    // (an operator re-reading a schema must not reset the interval they set).
    let mut refreshed = vec![
        notion_database::Column::Integration,
        notion_database::Column::DataSourceId,
        notion_database::Column::Title,
        notion_database::Column::Schema,
        notion_database::Column::SchemaHash,
        notion_database::Column::UpdatedAt,
    ];
    if interval_secs.is_some() {
        refreshed.push(notion_database::Column::SyncIntervalSecs);
    }
    notion_database::Entity::insert(model)
        .on_conflict(OnConflict::column(notion_database::Column::Id).update_columns(refreshed).to_owned())
        .exec(db)
        .await
        .context("saving the database")?;
    Ok(Registered { title, data_source_id: source_id, note })
}

#[derive(clap::Args, Debug)]
pub struct MapArgs {
    #[arg(long)]
    pub database: Uuid,
    /// The property's Notion id or current name.
    #[arg(long)]
    pub property: Option<String>,
    /// The view column's name.
    #[arg(long)]
    pub column: Option<String>,
    /// Leave the property out of the view.
    #[arg(long)]
    pub skip: bool,
    /// enum_text (select/status), integer (number) or date_only (date).
    #[arg(long, value_parser = ["enum_text", "integer", "date_only"])]
    pub transform: Option<String>,
    /// Pages with an empty value go to sync_page_errors instead of the table.
    #[arg(long)]
    pub required: bool,
    /// Remove the property's rule.
    #[arg(long)]
    pub clear: bool,
}

/// `database map`: validates the rule against the stored schema and saves it by property id.
pub async fn map(settings: &Settings, args: &MapArgs) -> anyhow::Result<()> {
    use sea_orm::{ActiveModelTrait, IntoActiveModel};
    use syncfleet_shared::mapping::{Mapping, PropertyRule, Transform};
    let db = syncfleet_shared::db::connect(&settings.database).await?;
    let database = notion_database::Entity::find_by_id(args.database)
        .one(&db)
        .await?
        .ok_or_else(|| anyhow!("database {} is not registered", args.database))?;
    let mut mapping = Mapping::from_json(&database.mapping)?;
    if let Some(property) = &args.property {
        let transform = match args.transform.as_deref() {
            None => None,
            Some("enum_text") => Some(Transform::EnumText),
            Some("integer") => Some(Transform::Integer),
            Some("date_only") => Some(Transform::DateOnly),
            Some(other) => bail!("unknown transform {other}"),
        };
        let rule =
            PropertyRule { column: args.column.clone(), skip: args.skip, transform, required: args.required };
        // Resolve the name to its id (and check the transform fits the type) before saving.
        let single = Mapping { properties: [(property.clone(), rule)].into() }.resolve(&database.schema)?;
        let (id, rule) = single.properties.into_iter().next().ok_or_else(|| anyhow!("nothing to map"))?;
        mapping.properties.remove(property);
        if args.clear {
            mapping.properties.remove(&id);
        } else {
            mapping.properties.insert(id, rule);
        }
        let mut active = database.into_active_model();
        active.mapping = Set(serde_json::to_value(&mapping)?);
        active.updated_at = Set(chrono::Utc::now());
        active.update(&db).await.context("saving the mapping")?;
    }
    println!("{}", serde_json::to_string_pretty(&mapping)?);
    Ok(())
}

/// A SQL-safe, unique name: the title folded to `[a-z0-9_]`, plus the id's first 8 hex digits.
pub fn slug_for(title: &str, id: Uuid) -> String {
    let mut out = String::new();
    for c in title.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
        if out.len() >= 40 {
            break;
        }
    }
    let base = out.trim_matches('_');
    let short = &id.simple().to_string()[..8];
    if base.is_empty() { format!("db_{short}") } else { format!("{base}_{short}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_sql_safe() {
        let id = Uuid::nil();
        assert_eq!(slug_for("Projects 1", id), "projects_1_00000000");
        assert_eq!(slug_for("\"; DROP TABLE x; --", id), "drop_table_x_00000000");
        assert_eq!(slug_for("名前 🚀", id), "db_00000000");
    }
}
