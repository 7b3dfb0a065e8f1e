//! Per-database property mapping, set by operators (`syncfleet-producer database map`) and kept in
//! `notion_databases.mapping`: a column name, skipping a property, a simple transform, and
//! whether a value is required. Pages are validated against it; a page that fails goes to
//! `sync_page_errors` with the reason while the rest of its batch lands.
//!
//! Rules name a property by its Notion id (stable across renames) or, for convenience, by its
//! current name; [`Mapping::resolve`] turns names into ids against the detected schema.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a property's value is turned into its column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// select/status → its option name as text; a value outside the schema's options is invalid.
    EnumText,
    /// number → bigint; a fractional or out-of-range number is invalid.
    Integer,
    /// date → date (the start's calendar date, time and zone dropped); an unparsable date is invalid.
    DateOnly,
}

impl Transform {
    /// The Notion property types the transform applies to.
    pub fn accepts(self, notion_type: &str) -> bool {
        match self {
            Transform::EnumText => matches!(notion_type, "select" | "status"),
            Transform::Integer => notion_type == "number",
            Transform::DateOnly => notion_type == "date",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transform::EnumText => "enum_text",
            Transform::Integer => "integer",
            Transform::DateOnly => "date_only",
        }
    }
}

/// The rule for one property.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertyRule {
    /// The view column's name (quoted and made unique like any other).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// Leave the property out of the view.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
    /// An empty value makes the page invalid.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
}

/// A database's rules, keyed by property id (or name until resolved).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyRule>,
}

/// Why a mapping cannot be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("the stored mapping is malformed: {0}")]
    Malformed(String),
    #[error("the mapping names property {0:?}, which the data source does not have")]
    UnknownProperty(String),
    #[error("transform {transform} does not apply to property {property:?} of type {notion_type}")]
    WrongType { property: String, transform: &'static str, notion_type: String },
}

/// One schema property: `(id, name, type)` plus its definition.
pub fn schema_properties(schema: &Value) -> Vec<(String, String, String, &Value)> {
    schema
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, def)| {
            let id = def.get("id").and_then(Value::as_str).unwrap_or(name).to_string();
            let ty = def.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
            let name = def.get("name").and_then(Value::as_str).unwrap_or(name).to_string();
            (id, name, ty, def)
        })
        .collect()
}

/// The schema's definition of the property with Notion id `id`.
fn property_by_id<'a>(schema: &'a Value, id: &str) -> Option<&'a Value> {
    schema.as_object()?.values().find(|def| def.get("id").and_then(Value::as_str) == Some(id))
}

impl Mapping {
    pub fn from_json(value: &Value) -> Result<Self, MappingError> {
        if value.is_null() || value.as_object().is_some_and(|o| o.is_empty()) {
            return Ok(Self::default());
        }
        serde_json::from_value(value.clone()).map_err(|e| MappingError::Malformed(e.to_string()))
    }

    /// Keys every rule by property id and checks each transform against the property's type.
    pub fn resolve(&self, schema: &Value) -> Result<Mapping, MappingError> {
        let props = schema_properties(schema);
        let mut out = Mapping::default();
        for (key, rule) in &self.properties {
            let found = props
                .iter()
                .find(|(id, _, _, _)| id == key)
                .or_else(|| props.iter().find(|(_, n, _, _)| n == key));
            let Some((id, name, ty, _)) = found else {
                return Err(MappingError::UnknownProperty(key.clone()));
            };
            if let Some(t) = rule.transform
                && !t.accepts(ty)
            {
                return Err(MappingError::WrongType {
                    property: name.clone(),
                    transform: t.as_str(),
                    notion_type: ty.clone(),
                });
            }
            out.properties.insert(id.clone(), rule.clone());
        }
        Ok(out)
    }

    /// Checks one page's id-keyed properties against the (resolved) rules. `Err` names every
    /// property that failed, so the operator sees all problems at once.
    pub fn validate(
        &self,
        schema: &Value,
        properties: &serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        let mut problems = Vec::new();
        for (id, rule) in &self.properties {
            // Runs for every page: look up only the rule's own property, without copying the schema.
            let def = property_by_id(schema, id);
            let name = def.and_then(|d| d.get("name")).and_then(Value::as_str).unwrap_or(id);
            let value = properties.get(id);
            let ty = value.and_then(|v| v.get("type")).and_then(Value::as_str).unwrap_or_default();
            let inner = value.and_then(|v| v.get(ty)).unwrap_or(&Value::Null);
            if rule.required && is_empty(inner) {
                problems.push(format!("{name:?} is required but empty"));
                continue;
            }
            let Some(transform) = rule.transform else { continue };
            if inner.is_null() {
                continue;
            }
            match transform {
                Transform::Integer => {
                    let ok = inner.as_i64().is_some()
                        || inner.as_f64().is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.2e18);
                    if !ok {
                        problems.push(format!("{name:?} = {inner} is not an integer"));
                    }
                }
                Transform::DateOnly => {
                    let start = inner.get("start").and_then(Value::as_str).unwrap_or_default();
                    let date = start.get(..10).unwrap_or_default();
                    if chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_err() {
                        problems.push(format!("{name:?} = {start:?} is not a date"));
                    }
                }
                Transform::EnumText => {
                    let chosen = inner.get("name").and_then(Value::as_str).unwrap_or_default();
                    let options: Vec<&str> = def
                        .and_then(|d| d.get(ty))
                        .and_then(|c| c.get("options"))
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|o| o.get("name").and_then(Value::as_str))
                        .collect();
                    if !options.is_empty() && !options.contains(&chosen) {
                        problems.push(format!("{name:?} = {chosen:?} is not one of the schema's options"));
                    }
                }
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "Amount": {"id": "am%40t", "name": "Amount", "type": "number", "number": {}},
            "Category": {"id": "ct%3Dg", "name": "Category", "type": "select",
                         "select": {"options": [{"name": "A"}, {"name": "B"}]}},
            "Due": {"id": "M%3BBw", "name": "Due", "type": "date", "date": {}},
        })
    }

    #[test]
    fn rules_resolve_names_to_ids_and_reject_wrong_types() {
        let m: Mapping = serde_json::from_value(json!({"properties": {
            "Amount": {"transform": "integer", "column": "amount_int"},
            "ct%3Dg": {"transform": "enum_text", "required": true}}}))
        .expect("parse");
        let r = m.resolve(&schema()).expect("resolve");
        assert!(r.properties.contains_key("am%40t") && r.properties.contains_key("ct%3Dg"));
        let bad: Mapping =
            serde_json::from_value(json!({"properties": {"Due": {"transform": "integer"}}})).expect("parse");
        assert!(matches!(bad.resolve(&schema()), Err(MappingError::WrongType { .. })));
        let unknown: Mapping =
            serde_json::from_value(json!({"properties": {"Nope": {"skip": true}}})).expect("parse");
        assert_eq!(unknown.resolve(&schema()), Err(MappingError::UnknownProperty("Nope".into())));
        assert!(Mapping::from_json(&json!({"properties": {"x": {"colour": "red"}}})).is_err());
    }

    #[test]
    fn pages_are_validated_against_the_rules() {
        let m: Mapping = serde_json::from_value(json!({"properties": {
            "Amount": {"transform": "integer"}, "Category": {"transform": "enum_text", "required": true},
            "Due": {"transform": "date_only"}}}))
        .expect("parse");
        let r = m.resolve(&schema()).expect("resolve");
        let page = |amount: Value, category: Value| {
            json!({"am%40t": {"id": "am%40t", "type": "number", "number": amount},
                   "ct%3Dg": {"id": "ct%3Dg", "type": "select", "select": category},
                   "M%3BBw": {"id": "M%3BBw", "type": "date", "date": {"start": "2026-12-01T10:00:00.000+02:00"}}})
            .as_object()
            .cloned()
            .unwrap_or_default()
        };
        assert_eq!(r.validate(&schema(), &page(json!(12), json!({"name": "A"}))), Ok(()));
        assert!(
            r.validate(&schema(), &page(json!(1.5), json!({"name": "A"})))
                .is_err_and(|e| e.contains("integer"))
        );
        assert!(
            r.validate(&schema(), &page(json!(1), json!({"name": "Z"})))
                .is_err_and(|e| e.contains("options"))
        );
        assert!(r.validate(&schema(), &page(json!(1), Value::Null)).is_err_and(|e| e.contains("required")));
    }
}
