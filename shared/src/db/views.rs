//! The typed view of each database: `notion."<slug>"`, one column per Notion property, typed
//! from the property's type (numbers → numeric, checkbox → boolean, dates → timestamptz,
//! multi_select/people/relations → text[], …) and the operator's mapping.
//!
//! Properties are found by their Notion id (pages are stored keyed by id), so a renamed property
//! keeps its data; its column follows the new name when the view is regenerated, which happens
//! whenever the schema or the mapping changes. Property names are hostile input: a column name
//! is normalised, made unique, truncated to PostgreSQL's 63 bytes and always quoted; property
//! ids only ever appear inside escaped string literals. Nothing from Notion is spliced unquoted.

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
use serde_json::Value;
use uuid::Uuid;

use crate::mapping::{Mapping, Transform, schema_properties};

/// Bumped when the generated SQL changes shape, so every view is regenerated once.
const GENERATOR_VERSION: &str = "1";

/// Columns every view starts with; property columns never take these names.
const FIXED: [&str; 10] = [
    "page_id",
    "url",
    "created_time",
    "last_edited_time",
    "created_by",
    "last_edited_by",
    "archived",
    "in_trash",
    "synced_at",
    "content_hash",
];

/// PostgreSQL's identifier limit (NAMEDATALEN − 1), in bytes.
const MAX_IDENTIFIER: usize = 63;

/// One property column.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub property_id: String,
    pub property_name: String,
    pub name: String,
    pub sql_type: &'static str,
    pub expr: String,
}

/// `"…"` with embedded quotes doubled; NULs (which PostgreSQL rejects) dropped.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('\0', "").replace('"', "\"\""))
}

/// `'…'` with embedded quotes doubled (standard_conforming_strings is on by default).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\0', "").replace('\'', "''"))
}

/// Lowercase letters and digits (any script) kept, every other run of characters becomes `_`.
pub fn normalise(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let trimmed = out.trim_matches('_');
    if trimmed.is_empty() { "property".to_string() } else { trimmed.to_string() }
}

fn truncate_bytes(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Makes `wanted` unique among `taken` (suffix `_2`, `_3`, … within the byte limit).
fn unique(wanted: &str, taken: &mut HashSet<String>) -> String {
    let base = truncate_bytes(wanted, MAX_IDENTIFIER).to_string();
    let mut candidate = base.clone();
    let mut n = 2;
    while taken.contains(&candidate) {
        let suffix = format!("_{n}");
        candidate = format!("{}{suffix}", truncate_bytes(&base, MAX_IDENTIFIER - suffix.len()));
        n += 1;
    }
    taken.insert(candidate.clone());
    candidate
}

/// The SQL type and expression of a property of type `ty` read from `v`.
fn typed(ty: &str, v: &str, transform: Option<Transform>) -> (&'static str, String) {
    match (transform, ty) {
        (Some(Transform::Integer), _) => ("bigint", format!("trunc(({v}->>'number')::numeric)::bigint")),
        (Some(Transform::DateOnly), _) => ("date", format!("left({v}->'date'->>'start', 10)::date")),
        (Some(Transform::EnumText), _) | (None, "select" | "status") => {
            ("text", format!("{v}->'{ty}'->>'name'"))
        }
        (None, "title" | "rich_text") => ("text", format!("notion.plain_text({v}->'{ty}')")),
        (None, "number") => ("numeric", format!("({v}->>'number')::numeric")),
        (None, "multi_select") => ("text[]", format!("notion.field_array({v}->'multi_select', 'name')")),
        (None, "date") => ("timestamptz", format!("notion.ts({v}->'date'->>'start')")),
        (None, "people") => ("text[]", format!("notion.field_array({v}->'people', 'id')")),
        (None, "relation") => ("text[]", format!("notion.field_array({v}->'relation', 'id')")),
        (None, "files") => ("text[]", format!("notion.field_array({v}->'files', 'name')")),
        (None, "checkbox") => ("boolean", format!("({v}->>'checkbox')::boolean")),
        (None, "url" | "email" | "phone_number") => ("text", format!("{v}->>'{ty}'")),
        (None, "created_time" | "last_edited_time") => ("timestamptz", format!("notion.ts({v}->>'{ty}')")),
        (None, "created_by" | "last_edited_by") => ("text", format!("{v}->'{ty}'->>'id'")),
        (None, "unique_id") => {
            ("text", format!("concat_ws('-', {v}->'unique_id'->>'prefix', {v}->'unique_id'->>'number')"))
        }
        (None, "formula") => (
            "text",
            format!(
                "COALESCE({v}->'formula'->>'string', {v}->'formula'->>'number', {v}->'formula'->>'boolean', {v}->'formula'->'date'->>'start')"
            ),
        ),
        (None, "verification") => ("text", format!("{v}->'verification'->>'state'")),
        _ => ("jsonb", format!("{v}->{}", quote_literal(ty))),
    }
}

/// The view's property columns, in the schema's order (by name, as Notion lists them).
pub fn columns(schema: &Value, mapping: &Mapping) -> Vec<Column> {
    let mut taken: HashSet<String> = FIXED.iter().map(|s| s.to_string()).collect();
    let mut props = schema_properties(schema);
    props.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut out = Vec::new();
    for (id, name, ty, _) in props {
        let rule = mapping.properties.get(&id).cloned().unwrap_or_default();
        if rule.skip || ty == "button" {
            continue;
        }
        let v = format!("p.properties->{}", quote_literal(&id));
        let ty_lit = ty.chars().filter(|c| c.is_ascii_lowercase() || *c == '_').collect::<String>();
        let (sql_type, expr) = typed(&ty_lit, &v, rule.transform);
        let wanted = rule.column.clone().unwrap_or_else(|| normalise(&name));
        let column = unique(&wanted, &mut taken);
        out.push(Column { property_id: id, property_name: name, name: column, sql_type, expr });
    }
    out
}

/// `notion."<slug>"`.
pub fn view_name(slug: &str) -> String {
    format!("notion.{}", quote_ident(slug))
}

/// The DDL that (re)creates the view, with a comment on each column naming its property.
pub fn view_ddl(slug: &str, database_id: Uuid, columns: &[Column]) -> String {
    let name = view_name(slug);
    let mut select = vec![
        "p.page_id".to_string(),
        "p.url".into(),
        "p.created_time".into(),
        "p.last_edited_time".into(),
        "p.created_by".into(),
        "p.last_edited_by".into(),
        "p.archived".into(),
        "p.in_trash".into(),
        "p.synced_at".into(),
        "p.content_hash".into(),
    ];
    for c in columns {
        select.push(format!("({})::{} AS {}", c.expr, c.sql_type, quote_ident(&c.name)));
    }
    let mut sql = format!(
        "DROP VIEW IF EXISTS {name};\nCREATE VIEW {name} AS SELECT\n    {}\nFROM public.notion_pages p\nWHERE p.database_id = {}::uuid AND p.deleted_at IS NULL AND NOT p.in_trash;\n",
        select.join(",\n    "),
        quote_literal(&database_id.to_string())
    );
    for c in columns {
        let note = format!("Notion property {} (id {})", c.property_name, c.property_id);
        sql.push_str(&format!(
            "COMMENT ON COLUMN {name}.{} IS {};\n",
            quote_ident(&c.name),
            quote_literal(&note)
        ));
    }
    sql
}

/// What the view of a database is generated from; equal hashes mean the view is current.
pub fn view_hash(schema_hash: &str, mapping: &Mapping) -> String {
    let mapping = serde_json::to_value(mapping).unwrap_or(Value::Null);
    crate::hashing::json_hash(&serde_json::json!([GENERATOR_VERSION, schema_hash, mapping]))
}

/// Regenerates the view when `view_hash` differs from the stored one; returns whether it did.
/// Run inside the writer's fenced transaction so a stale worker cannot regenerate it.
pub async fn ensure<C: ConnectionTrait>(
    conn: &C,
    database_id: Uuid,
    slug: &str,
    schema: &Value,
    schema_hash: &str,
    mapping: &Mapping,
    stored_view_hash: &str,
) -> Result<bool, DbErr> {
    let hash = view_hash(schema_hash, mapping);
    if hash == stored_view_hash {
        return Ok(false);
    }
    let cols = columns(schema, mapping);
    conn.execute_unprepared(&view_ddl(slug, database_id, &cols)).await?;
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE notion_databases SET view_hash = $2, updated_at = now() WHERE id = $1",
        [database_id.into(), hash.into()],
    ))
    .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hostile_names_become_unique_quoted_identifiers() {
        let long = "x".repeat(200);
        let schema = json!({
            "\"; DROP TABLE notion_pages; --": {"id": "h1", "name": "\"; DROP TABLE notion_pages; --", "type": "rich_text"},
            "a\"b": {"id": "h2", "name": "a\"b", "type": "number"},
            "ü 名前 🚀": {"id": "h3'; --", "name": "ü 名前 🚀", "type": "select"},
            long.clone(): {"id": "h4", "name": long, "type": "rich_text"},
            "Due Date": {"id": "h5", "name": "Due Date", "type": "date"},
            "due_date": {"id": "h6", "name": "due_date", "type": "checkbox"},
            "URL": {"id": "h7", "name": "URL", "type": "url"},
        });
        let cols = columns(&schema, &Mapping::default());
        let names: Vec<&str> = cols.iter().map(|c| c.name.as_str()).collect();
        assert!(names.contains(&"drop_table_notion_pages"));
        assert!(names.contains(&"a_b"));
        assert!(names.contains(&"ü_名前"));
        assert!(names.contains(&"due_date") && names.contains(&"due_date_2"), "{names:?}");
        assert!(names.contains(&"url_2"), "a fixed column name is never reused: {names:?}");
        assert!(cols.iter().all(|c| c.name.len() <= 63));
        let ddl = view_ddl("tasks_1234", Uuid::nil(), &cols);
        assert!(ddl.contains("p.properties->'h3''; --'"), "ids are escaped literals: {ddl}");
        assert!(!ddl.contains("DROP TABLE notion_pages;\n"), "{ddl}");
    }

    #[test]
    fn transforms_pick_the_column_type() {
        let schema = json!({"Amount": {"id": "am", "name": "Amount", "type": "number"},
                            "Due": {"id": "du", "name": "Due", "type": "date"}});
        let mapping: Mapping = serde_json::from_value(json!({"properties": {
            "am": {"transform": "integer", "column": "amount_int"}, "du": {"skip": true}}}))
        .expect("mapping");
        let cols = columns(&schema, &mapping);
        assert_eq!(cols.len(), 1);
        assert_eq!((cols[0].name.as_str(), cols[0].sql_type), ("amount_int", "bigint"));
    }
}
