//! The parts of Notion's objects that a sync reads. Property values stay raw JSON: they are
//! stored as they come, and their shapes are Notion's to change.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

#[derive(Debug, Clone, Deserialize)]
pub struct RichText {
    #[serde(default)]
    pub plain_text: String,
}

/// Joins a rich-text array into plain text (titles).
pub fn plain_text(parts: &[RichText]) -> String {
    parts.iter().map(|p| p.plain_text.as_str()).collect()
}

/// `GET /v1/databases/{id}`.
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseObject {
    pub id: Uuid,
    #[serde(default)]
    pub title: Vec<RichText>,
    /// Present from 2025-09-03 on.
    #[serde(default)]
    pub data_sources: Vec<DataSourceRef>,
    /// Present under 2022-06-28.
    #[serde(default)]
    pub properties: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DataSourceRef {
    pub id: Uuid,
    #[serde(default)]
    pub name: String,
}

/// `GET /v1/data_sources/{id}`: the schema.
#[derive(Debug, Clone, Deserialize)]
pub struct DataSourceObject {
    pub id: Uuid,
    #[serde(default)]
    pub title: Vec<RichText>,
    #[serde(default)]
    pub properties: Map<String, Value>,
}

/// A paginated list (`query`, `search`, property items…). Results stay raw so that one odd
/// object cannot fail the whole response: JSON values by default, or unparsed text
/// (`ListResponse<Box<RawValue>>`, what a query reads) so each result is parsed once, straight
/// into its type.
#[derive(Debug, Clone, Deserialize)]
pub struct ListResponse<T = Value> {
    #[serde(default = "Vec::new")]
    pub results: Vec<T>,
    #[serde(default)]
    pub next_cursor: Option<String>,
    #[serde(default)]
    pub has_more: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct UserRef {
    pub id: Uuid,
}

/// The body of `POST /v1/data_sources/{id}/query`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueryRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<Value>,
    pub sorts: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_cursor: Option<String>,
    pub page_size: u8,
}

/// The two timestamps a sync can order and filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timestamp {
    CreatedTime,
    LastEditedTime,
}

impl Timestamp {
    pub fn as_str(self) -> &'static str {
        match self {
            Timestamp::CreatedTime => "created_time",
            Timestamp::LastEditedTime => "last_edited_time",
        }
    }
}

impl QueryRequest {
    /// Ascending by `timestamp`, optionally from `on_or_after` (inclusive; Notion is minute-granular).
    pub fn ascending(timestamp: Timestamp, on_or_after: Option<DateTime<Utc>>, page_size: u8) -> Self {
        Self::ascending_between(timestamp, on_or_after, None, page_size)
    }

    /// Ascending by `timestamp` within `[on_or_after, before)`; either end may be open. Ranges
    /// that share a boundary are disjoint and together complete, at any rounding of the times.
    pub fn ascending_between(
        timestamp: Timestamp,
        on_or_after: Option<DateTime<Utc>>,
        before: Option<DateTime<Utc>>,
        page_size: u8,
    ) -> Self {
        let field = timestamp.as_str();
        let condition = |op: &str, t: DateTime<Utc>| {
            serde_json::json!({
                "timestamp": field,
                field: {op: t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)}
            })
        };
        let mut conditions: Vec<Value> = Vec::new();
        conditions.extend(on_or_after.map(|t| condition("on_or_after", t)));
        conditions.extend(before.map(|t| condition("before", t)));
        let filter = match conditions.len() {
            0 => None,
            1 => conditions.pop(),
            _ => Some(serde_json::json!({"and": conditions})),
        };
        Self {
            filter,
            sorts: vec![serde_json::json!({"timestamp": field, "direction": "ascending"})],
            start_cursor: None,
            page_size,
        }
    }
}
