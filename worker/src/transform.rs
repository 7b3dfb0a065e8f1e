//! From Notion's page objects to rows: parsing that isolates bad pages, and a stable content hash.

use std::collections::HashMap;

use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use syncfleet_shared::db::pages::PageRow;
use syncfleet_shared::hashing::{hash_map, hash_value};
use syncfleet_shared::mapping::Mapping;
use syncfleet_shared::notion::types::Page;

/// A result that could not be turned into a page, kept for `sync_page_errors`.
#[derive(Debug, Clone)]
pub struct InvalidPage {
    pub page_id: Option<String>,
    pub reason: String,
    /// The page as Notion sent it (when it parsed far enough to have one).
    pub page: Option<Value>,
}

/// Re-keys a page's properties by property id (stable across renames); each value keeps its
/// `id` and `type`. A value without an id keeps its name as key.
pub fn key_by_id(properties: serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    properties
        .into_iter()
        .map(|(name, value)| {
            let id = value.get("id").and_then(Value::as_str).map(str::to_string).unwrap_or(name);
            (id, value)
        })
        .collect()
}

/// Property values the page object truncated (Notion returns at most 25 references): relations
/// that say `has_more`, and people or rich-text lists that reached 25 items. Returns their ids.
pub fn truncated_properties(page: &Page) -> Vec<(String, String)> {
    page.properties
        .values()
        .filter_map(|v| {
            let id = v.get("id")?.as_str()?;
            let ty = v.get("type")?.as_str()?;
            let truncated = match ty {
                "relation" => v.get("has_more").and_then(Value::as_bool).unwrap_or(false),
                "people" | "rich_text" | "title" => {
                    v.get(ty).and_then(Value::as_array).is_some_and(|a| a.len() >= 25)
                }
                _ => false,
            };
            truncated.then(|| (id.to_string(), ty.to_string()))
        })
        .collect()
}

/// Replaces a truncated value with the complete list read from the property endpoint.
pub fn complete_property(page: &mut Page, property_id: &str, ty: &str, items: Vec<Value>) {
    let Some(value) =
        page.properties.values_mut().find(|v| v.get("id").and_then(Value::as_str) == Some(property_id))
    else {
        return;
    };
    let Some(map) = value.as_object_mut() else { return };
    let list: Vec<Value> =
        items.into_iter().filter_map(|mut item| item.get_mut(ty).map(Value::take)).collect();
    map.insert(ty.to_string(), Value::Array(list));
    if ty == "relation" {
        map.insert("has_more".into(), Value::Bool(false));
    }
}

/// Parses a response's results, each straight from its text into a [`Page`] (no intermediate
/// JSON tree). Non-page objects are skipped; malformed pages are reported, not fatal. Duplicate
/// ids keep their last occurrence (Notion can repeat a page across an edit).
pub fn parse_results(results: Vec<Box<RawValue>>) -> (Vec<Page>, Vec<InvalidPage>) {
    /// What is read of a result that is not a valid page: whether it claims to be one, its id.
    #[derive(serde::Deserialize)]
    struct Probe {
        object: Option<Value>,
        id: Option<Value>,
    }
    let mut pages: Vec<Page> = Vec::with_capacity(results.len());
    let mut invalid = Vec::new();
    let mut seen: HashMap<uuid::Uuid, usize> = HashMap::new();
    for raw in results {
        match serde_json::from_str::<Page>(raw.get()) {
            Ok(page) if page.object.as_deref().is_some_and(|o| o != "page") => {}
            Ok(page) => match seen.get(&page.id) {
                Some(&i) => pages[i] = page,
                None => {
                    seen.insert(page.id, pages.len());
                    pages.push(page);
                }
            },
            Err(e) => {
                let probe = serde_json::from_str::<Probe>(raw.get()).ok();
                // Skipped only when it says it is another kind of object; anything else that
                // fails is reported.
                let object = probe.as_ref().and_then(|p| p.object.as_ref()).and_then(Value::as_str);
                if object.is_some_and(|o| o != "page") {
                    continue;
                }
                let page_id = probe
                    .as_ref()
                    .and_then(|p| p.id.as_ref())
                    .and_then(Value::as_str)
                    .map(|s| s.chars().take(64).collect());
                invalid.push(InvalidPage {
                    page_id,
                    reason: format!("not a valid page object: {e}"),
                    page: None,
                })
            }
        }
    }
    (pages, invalid)
}

/// SHA-256 over what a user sees of a page (properties keyed by id, so a rename alone does not
/// change it), independent of JSON key order.
pub fn content_hash(page: &Page, properties: &serde_json::Map<String, Value>) -> String {
    let mut hasher = Sha256::new();
    hash_map(&mut hasher, properties);
    hasher.update([page.is_archived() as u8, page.in_trash as u8]);
    hash_value(&mut hasher, page.icon.as_ref().unwrap_or(&Value::Null));
    hash_value(&mut hasher, page.cover.as_ref().unwrap_or(&Value::Null));
    hasher.update(page.url.as_deref().unwrap_or_default().as_bytes());
    hex::encode(hasher.finalize())
}

/// The row written for a page, or why the page fails the database's mapping.
pub fn to_row(mut page: Page, mapping: &Mapping, schema: &Value) -> Result<PageRow, InvalidPage> {
    let properties = key_by_id(std::mem::take(&mut page.properties));
    if let Err(reason) = mapping.validate(schema, &properties) {
        page.properties = properties;
        return Err(InvalidPage {
            page_id: Some(page.id.to_string()),
            reason,
            page: serde_json::to_value(&page).ok(),
        });
    }
    let content_hash = content_hash(&page, &properties);
    let archived = page.is_archived();
    Ok(PageRow {
        page_id: page.id,
        url: page.url,
        created_time: page.created_time,
        last_edited_time: page.last_edited_time,
        created_by: page.created_by.map(|u| u.id),
        last_edited_by: page.last_edited_by.map(|u| u.id),
        archived,
        in_trash: page.in_trash,
        content_hash,
        properties: Value::Object(properties).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).expect("valid JSON")
    }

    fn page(props: Value) -> Box<RawValue> {
        raw(json!({"object": "page", "id": "be633bf1-dfa0-436d-b259-571129a590e5",
               "created_time": "2026-10-24T22:54:00.000Z", "last_edited_time": "2026-11-08T18:25:00.000Z",
               "properties": props}))
    }

    #[test]
    fn hash_ignores_key_order_but_not_values() {
        let a = parse_results(vec![page(json!({"A": {"number": 1}, "B": {"x": [1, 2]}}))]).0;
        let b = parse_results(vec![page(json!({"B": {"x": [1, 2]}, "A": {"number": 1}}))]).0;
        let c = parse_results(vec![page(json!({"A": {"number": 2}, "B": {"x": [1, 2]}}))]).0;
        let hash = |p: &Page| content_hash(p, &key_by_id(p.properties.clone()));
        assert_eq!(hash(&a[0]), hash(&b[0]));
        assert_ne!(hash(&a[0]), hash(&c[0]));
    }

    #[test]
    fn a_renamed_property_keeps_its_key_and_hash() {
        let before =
            parse_results(vec![page(json!({"Old": {"id": "x%3A1", "type": "number", "number": 5}}))]).0;
        let after =
            parse_results(vec![page(json!({"New": {"id": "x%3A1", "type": "number", "number": 5}}))]).0;
        let a = to_row(before[0].clone(), &Mapping::default(), &Value::Null).expect("row");
        let b = to_row(after[0].clone(), &Mapping::default(), &Value::Null).expect("row");
        assert_eq!(a.properties, b.properties);
        assert_eq!(a.content_hash, b.content_hash);
        let stored: Value = serde_json::from_str(&a.properties).expect("the stored text is JSON");
        assert_eq!(stored["x%3A1"]["number"], 5);
    }

    #[test]
    fn truncated_relations_are_found_and_completed() {
        let mut p = parse_results(vec![page(json!({"Rel": {"id": "rl", "type": "relation",
            "relation": [{"id": "a"}], "has_more": true}}))])
        .0
        .remove(0);
        assert_eq!(truncated_properties(&p), vec![("rl".to_string(), "relation".to_string())]);
        let items = (0..60).map(
            |i| json!({"object": "property_item", "type": "relation", "relation": {"id": i.to_string()}}),
        );
        complete_property(&mut p, "rl", "relation", items.collect());
        assert_eq!(p.properties["Rel"]["relation"].as_array().map(Vec::len), Some(60));
        assert!(truncated_properties(&p).is_empty());
    }

    #[test]
    fn malformed_pages_are_isolated_and_duplicates_collapse() {
        let bad = json!({"object": "page", "id": "not-a-uuid", "properties": {}});
        let (pages, invalid) = parse_results(vec![
            page(json!({"v": 1})),
            raw(bad),
            page(json!({"v": 2})),
            raw(json!({"object": "data_source"})),
            raw(json!({"object": 7, "id": "odd-object"})),
            raw(json!({"object": "database", "id": "be633bf1-dfa0-436d-b259-571129a590e5",
                       "created_time": "2026-10-24T22:54:00.000Z",
                       "last_edited_time": "2026-11-08T18:25:00.000Z", "properties": {"v": 3}})),
        ]);
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0].properties["v"], 2);
        assert_eq!(invalid.len(), 2, "a result whose `object` is not a string is reported, not skipped");
        assert_eq!(invalid[0].page_id.as_deref(), Some("not-a-uuid"));
        assert_eq!(invalid[1].page_id.as_deref(), Some("odd-object"));
    }
}
