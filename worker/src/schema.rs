//! The data source's schema at the start of every run: read it from Notion (one request), log
//! how it drifted since the last run (properties added, removed, renamed or retyped, matched by
//! id), store it, and regenerate the database's typed view when the schema or the mapping
//! changed. The view DDL runs in a fenced transaction, so only the lock holder changes it.

use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use serde_json::Value;
use syncfleet_shared::db::entities::notion_database;
use syncfleet_shared::db::{fence, views};
use syncfleet_shared::mapping::{Mapping, schema_properties};
use syncfleet_shared::notion::types::DataSourceObject;
use syncfleet_shared::notion::{Endpoint, NotionSession};

use crate::error::JobFailure;

/// What a run needs to know about the schema.
pub struct Prepared {
    pub schema: Value,
    pub mapping: Mapping,
}

/// How one schema differs from another, by property id.
#[derive(Debug, Default, PartialEq)]
pub struct Drift {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub renamed: Vec<(String, String)>,
    pub retyped: Vec<(String, String, String)>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.renamed.is_empty() && self.retyped.is_empty()
    }
}

pub fn drift(old: &Value, new: &Value) -> Drift {
    let old = schema_properties(old);
    let new = schema_properties(new);
    let mut d = Drift::default();
    for (id, name, ty, _) in &new {
        match old.iter().find(|o| &o.0 == id) {
            None => d.added.push(name.clone()),
            Some((_, old_name, old_ty, _)) => {
                if old_name != name {
                    d.renamed.push((old_name.clone(), name.clone()));
                }
                if old_ty != ty {
                    d.retyped.push((name.clone(), old_ty.clone(), ty.clone()));
                }
            }
        }
    }
    for (id, name, _, _) in &old {
        if !new.iter().any(|n| &n.0 == id) {
            d.removed.push(name.clone());
        }
    }
    d
}

/// The longest the typed view's DDL waits for a lock (a user's query on the view) before the
/// regeneration is skipped for this run.
const VIEW_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads the schema, records drift and keeps the typed view current.
pub async fn prepare(
    db: &sea_orm::DatabaseConnection,
    session: &NotionSession,
    database: &notion_database::Model,
    fence_value: i64,
) -> Result<Prepared, JobFailure> {
    let path = format!("/v1/data_sources/{}", database.data_source_id);
    let source: DataSourceObject =
        session.request::<(), _>(Endpoint::RetrieveDataSource, &path, None).await?.body;
    let schema = Value::Object(source.properties);
    let schema_hash = syncfleet_shared::hashing::json_hash(&schema);
    let stored = Mapping::from_json(&database.mapping).map_err(|e| JobFailure::Config(e.to_string()))?;
    let mapping = resolve_lenient(&stored, &schema);
    let schema_changed = schema_hash != database.schema_hash;
    if schema_changed {
        let d = drift(&database.schema, &schema);
        if !d.is_empty() {
            tracing::warn!(
                added = ?d.added,
                removed = ?d.removed,
                renamed = ?d.renamed,
                retyped = ?d.retyped,
                "The data source's schema changed; regenerating the typed view."
            );
        }
    }
    let txn = db.begin().await?;
    if !fence::is_current(&txn, database.id, fence_value).await? {
        return Err(JobFailure::FenceRejected(fence_value));
    }
    if schema_changed {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_databases SET schema = $2, schema_hash = $3, updated_at = now() WHERE id = $1",
            [database.id.into(), schema.clone().into(), schema_hash.clone().into()],
        ))
        .await?;
    }
    // The view is a convenience over the data: if its DDL fails (a schema PostgreSQL rejects, a
    // user's view that depends on it, a lock held by a long query), the savepoint is rolled
    // back, the reason recorded on the database, and the pages still sync. The literals in the
    // DDL are standard strings and every lock wait is bounded, whatever the server's defaults.
    let savepoint = txn.begin().await?;
    let view = async {
        savepoint
            .execute_unprepared(&format!(
                "SET LOCAL standard_conforming_strings = on; SET LOCAL lock_timeout = '{}ms'",
                VIEW_LOCK_TIMEOUT.as_millis()
            ))
            .await?;
        views::ensure(
            &savepoint,
            database.id,
            &database.slug,
            &schema,
            &schema_hash,
            &mapping,
            &database.view_hash,
        )
        .await
    }
    .await;
    let view_error = match view {
        Ok(regenerated) => {
            savepoint.commit().await?;
            if regenerated {
                tracing::info!(view = %views::view_name(&database.slug), "Typed view generated.");
            }
            None
        }
        Err(e) => {
            savepoint.rollback().await?;
            tracing::error!(
                view = %views::view_name(&database.slug),
                error = %e,
                "Could not regenerate the typed view (recorded in notion_databases.view_error); the pages still sync."
            );
            Some(e.to_string())
        }
    };
    if view_error.is_some() || database.view_error.is_some() {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE notion_databases SET view_error = $2 WHERE id = $1",
            [database.id.into(), view_error.into()],
        ))
        .await?;
    }
    txn.commit().await?;
    Ok(Prepared { schema, mapping })
}

/// Resolves the stored rules against the current schema. A rule whose property is gone, or
/// whose transform no longer fits the property's type, is dropped with a warning instead of
/// failing every sync of the database.
fn resolve_lenient(mapping: &Mapping, schema: &Value) -> Mapping {
    let mut out = Mapping::default();
    for (key, rule) in &mapping.properties {
        let single = Mapping { properties: [(key.clone(), rule.clone())].into() };
        match single.resolve(schema) {
            Ok(resolved) => out.properties.extend(resolved.properties),
            Err(e) => tracing::warn!(error = %e, "Ignoring a mapping rule that no longer fits the schema."),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drift_matches_properties_by_id() {
        let old = json!({"A": {"id": "1", "name": "A", "type": "number"}, "B": {"id": "2", "name": "B", "type": "checkbox"}});
        let new = json!({"A2": {"id": "1", "name": "A2", "type": "number"}, "C": {"id": "3", "name": "C", "type": "url"}});
        let d = drift(&old, &new);
        assert_eq!(d.renamed, vec![("A".to_string(), "A2".to_string())]);
        assert_eq!(d.added, vec!["C".to_string()]);
        assert_eq!(d.removed, vec!["B".to_string()]);
        assert!(drift(&new, &new).is_empty());
    }
}
