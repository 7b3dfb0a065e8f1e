//! From Notion's page objects to rows: parsing that isolates bad pages, and a stable content hash.

use std::collections::HashMap;

use serde_json::Value;
use sha2::{Digest, Sha256};
use syncfleet_shared::db::pages::PageRow;
use syncfleet_shared::hashing::hash_value;
use syncfleet_shared::notion::types::Page;

/// A result that could not be turned into a page.
#[derive(Debug, Clone)]
pub struct InvalidPage {
    pub page_id: Option<String>,
    pub reason: String,
}

/// Parses a response's results. Non-page objects are skipped; malformed pages are reported, not
/// fatal. Duplicate ids keep their last occurrence (Notion can repeat a page across an edit).
pub fn parse_results(results: Vec<Value>) -> (Vec<Page>, Vec<InvalidPage>) {
    let mut pages: Vec<Page> = Vec::with_capacity(results.len());
    let mut invalid = Vec::new();
    let mut seen: HashMap<uuid::Uuid, usize> = HashMap::new();
    for value in results {
        if value.get("object").and_then(Value::as_str).is_some_and(|o| o != "page") {
            continue;
        }
        let page_id = value.get("id").and_then(Value::as_str).map(|s| s.chars().take(64).collect());
        match serde_json::from_value::<Page>(value) {
            Ok(page) => match seen.get(&page.id) {
                Some(&i) => pages[i] = page,
                None => {
                    seen.insert(page.id, pages.len());
                    pages.push(page);
                }
            },
            Err(e) => invalid.push(InvalidPage { page_id, reason: e.to_string() }),
        }
    }
    (pages, invalid)
}

/// SHA-256 over what a user sees of a page, independent of JSON key order.
pub fn content_hash(page: &Page) -> String {
    let mut hasher = Sha256::new();
    hash_value(&mut hasher, &Value::Object(page.properties.clone()));
    hasher.update([page.is_archived() as u8, page.in_trash as u8]);
    hash_value(&mut hasher, page.icon.as_ref().unwrap_or(&Value::Null));
    hash_value(&mut hasher, page.cover.as_ref().unwrap_or(&Value::Null));
    hasher.update(page.url.as_deref().unwrap_or_default().as_bytes());
    hex::encode(hasher.finalize())
}

/// The row written for a page.
pub fn to_row(page: Page) -> PageRow {
    let content_hash = content_hash(&page);
    let archived = page.is_archived();
    PageRow {
        page_id: page.id,
        url: page.url,
        created_time: page.created_time,
        last_edited_time: page.last_edited_time,
        created_by: page.created_by.map(|u| u.id),
        last_edited_by: page.last_edited_by.map(|u| u.id),
        archived,
        in_trash: page.in_trash,
        content_hash,
        properties: Value::Object(page.properties),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn page(props: Value) -> Value {
        json!({"object": "page", "id": "be633bf1-dfa0-436d-b259-571129a590e5",
               "created_time": "2026-10-24T22:54:00.000Z", "last_edited_time": "2026-11-08T18:25:00.000Z",
               "properties": props})
    }

    #[test]
    fn hash_ignores_key_order_but_not_values() {
        let a = parse_results(vec![page(json!({"A": {"number": 1}, "B": {"x": [1, 2]}}))]).0;
        let b = parse_results(vec![page(json!({"B": {"x": [1, 2]}, "A": {"number": 1}}))]).0;
        let c = parse_results(vec![page(json!({"A": {"number": 2}, "B": {"x": [1, 2]}}))]).0;
        assert_eq!(content_hash(&a[0]), content_hash(&b[0]));
        assert_ne!(content_hash(&a[0]), content_hash(&c[0]));
    }

    #[test]
    fn malformed_pages_are_isolated_and_duplicates_collapse() {
        let bad = json!({"object": "page", "id": "not-a-uuid", "properties": {}});
        let (pages, invalid) = parse_results(vec![
            page(json!({"v": 1})),
            bad,
            page(json!({"v": 2})),
            json!({"object": "data_source"}),
        ]);
        assert_eq!(pages.len(), 1);
        assert_eq!(pages[0].properties["v"], 2);
        assert_eq!(invalid.len(), 1);
        assert_eq!(invalid[0].page_id.as_deref(), Some("not-a-uuid"));
    }
}
