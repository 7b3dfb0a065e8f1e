//! From Notion's page objects to rows, straight from each result's text: no JSON tree or map is
//! built for the stored document or the hash (only a database with mapping rules parses the
//! values its rules name). The properties are stored as the text Notion sent (re-keyed by property
//! id), and the content hash is computed over canonical bytes written in one pass over each
//! value's text into a reused buffer, so a page costs two scans (its fields, then its values),
//! one hash and one copy. Bad pages are isolated, not fatal.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use syncfleet_shared::db::pages::PageRow;
use syncfleet_shared::hashing::{Canonical, Head, Text, feed_null, hash_sorted, sort_keep_last};
use syncfleet_shared::mapping::Mapping;
use syncfleet_shared::notion::types::{Timestamp, UserRef};
use uuid::Uuid;

/// A result that could not be turned into a page, kept for `sync_page_errors`.
#[derive(Debug, Clone)]
pub struct InvalidPage {
    pub page_id: Option<String>,
    pub reason: String,
    /// The page as Notion sent it, properties keyed by id (when it parsed far enough).
    pub page: Option<Value>,
}

/// Values completed from the property endpoint, by property id, as JSON text.
pub type Completed = Vec<(String, Box<RawValue>)>;

/// What one page result becomes.
#[derive(Debug)]
pub enum Outcome {
    Row(PageRow),
    /// It fails the database's mapping.
    Invalid(InvalidPage),
    /// Values the page object truncated (property id, type): complete them, then read it again
    /// with [`complete`].
    Truncated(Vec<(String, String)>),
}

/// A page result, read.
#[derive(Debug)]
pub struct Read {
    pub id: Uuid,
    pub created_time: DateTime<Utc>,
    pub last_edited_time: DateTime<Utc>,
    /// In the trash or archived, under any API version.
    pub gone: bool,
    pub outcome: Outcome,
}

impl Read {
    /// The page's time that `field` orders a query by.
    pub fn time(&self, field: Timestamp) -> DateTime<Utc> {
        match field {
            Timestamp::CreatedTime => self.created_time,
            Timestamp::LastEditedTime => self.last_edited_time,
        }
    }
}

/// What a result is.
#[derive(Debug)]
pub enum Scanned {
    /// Another kind of object (a query can answer them); skipped.
    NotAPage,
    /// It claims to be a page but is not a valid one.
    Malformed(InvalidPage),
    Page(Read),
}

/// The fields of a page object that a row needs, borrowing from its text.
#[derive(Deserialize)]
struct PageView<'a> {
    #[serde(default, borrow)]
    object: Option<Cow<'a, str>>,
    id: Uuid,
    created_time: DateTime<Utc>,
    last_edited_time: DateTime<Utc>,
    #[serde(default)]
    created_by: Option<UserRef>,
    #[serde(default)]
    last_edited_by: Option<UserRef>,
    #[serde(default)]
    archived: bool,
    #[serde(default)]
    in_trash: bool,
    /// 2026-03-11 and later.
    #[serde(default)]
    is_archived: Option<bool>,
    #[serde(default, borrow)]
    url: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    icon: Option<&'a RawValue>,
    #[serde(default, borrow)]
    cover: Option<&'a RawValue>,
    #[serde(default, borrow)]
    properties: Properties<'a>,
}

/// A page's properties as `(name, value text)` in the order sent (duplicates included).
#[derive(Default)]
struct Properties<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Properties<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Properties<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of property values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((Text(name), value)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    out.push((name, value));
                }
                Ok(Properties(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Property values of 25 or more items may have been cut short by the page object.
const TRUNCATION_LENGTH: usize = 25;

/// One property, read: the key it is stored under (its id, else its name), its value's text and
/// where its canonical bytes are in the page's [`Canonical`] buffer.
struct Property<'a> {
    id: Cow<'a, str>,
    text: &'a RawValue,
    canonical: Range<usize>,
    head: Head<'a>,
}

impl<'a> Property<'a> {
    fn read(name: Cow<'a, str>, text: &'a RawValue, buf: &mut Canonical) -> Result<Self, serde_json::Error> {
        let (canonical, head) = buf.write_with_head(text.get())?;
        let id = head.id.clone().unwrap_or(name);
        Ok(Property { id, text, canonical, head })
    }

    /// Whether the page object cut this value short (Notion returns at most 25 references):
    /// a relation that says `has_more`, or a people or rich-text list of 25 or more items.
    fn truncated(&self) -> Option<(String, String)> {
        // A value without an id of its own cannot be completed.
        let id = self.head.id.as_deref()?;
        let ty = self.head.ty.as_deref()?;
        let truncated = match ty {
            "relation" => self.head.has_more.unwrap_or(false),
            "people" | "rich_text" | "title" => self.head.typed_len.is_some_and(|n| n >= TRUNCATION_LENGTH),
            _ => false,
        };
        truncated.then(|| (id.to_string(), ty.to_string()))
    }
}

/// A page's properties keyed as they are stored: by property id (stable across renames), the
/// name standing in where a value has no id. Of duplicate names the last is kept, then of
/// duplicate ids the last in name order. `completed` values replace the ones with their id.
fn keyed<'a>(
    properties: Properties<'a>,
    completed: &'a [(String, Box<RawValue>)],
    buf: &mut Canonical,
) -> Result<Vec<Property<'a>>, serde_json::Error> {
    let mut props = sort_keep_last(properties.0, |(name, _)| name.as_ref())
        .into_iter()
        .map(|(name, text)| Property::read(name, text, buf))
        .collect::<Result<Vec<_>, _>>()?;
    for prop in &mut props {
        if let Some((_, text)) = completed.iter().find(|(id, _)| *id == prop.id) {
            let (canonical, head) = buf.write_with_head(text.get())?;
            (prop.text, prop.canonical, prop.head) = (text, canonical, head);
        }
    }
    Ok(sort_keep_last(props, |p| p.id.as_ref()))
}

/// SHA-256 over what a user sees of a page (properties keyed by id, so a rename alone does not
/// change it), independent of JSON key order: the same bytes as hashing the equivalent `Value`s.
fn content_hash(
    view: &PageView,
    props: &[Property],
    buf: &mut Canonical,
) -> Result<String, serde_json::Error> {
    let mut hasher = Sha256::new();
    // `keyed` left them in key order, each key once.
    hash_sorted(&mut hasher, props.iter().map(|p| (p.id.as_ref(), p.canonical.clone())), |h, range| {
        h.update(&buf.bytes()[range])
    });
    hasher.update([view.is_archived.unwrap_or(view.archived) as u8, view.in_trash as u8]);
    for decoration in [view.icon, view.cover] {
        match decoration {
            Some(text) => {
                let range = buf.write(text.get())?;
                hasher.update(&buf.bytes()[range]);
            }
            None => feed_null(&mut hasher),
        }
    }
    hasher.update(view.url.as_deref().unwrap_or_default().as_bytes());
    Ok(hex::encode(hasher.finalize()))
}

/// The stored properties document: each value's text as Notion sent it, under its key.
fn properties_text(props: &[Property]) -> Result<String, String> {
    let size = props.iter().map(|p| p.id.len() + p.text.get().len() + 4).sum::<usize>();
    let mut out = Vec::with_capacity(size + 2);
    out.push(b'{');
    for (i, prop) in props.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, prop.id.as_ref()).map_err(|e| e.to_string())?;
        out.push(b':');
        out.extend_from_slice(prop.text.get().as_bytes());
    }
    out.push(b'}');
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// The page as Notion sent it with its properties keyed by id, for `sync_page_errors`.
fn page_value(text: &str, props: &[Property]) -> Option<Value> {
    let mut page: Value = serde_json::from_str(text).ok()?;
    let keyed = props
        .iter()
        .filter_map(|p| Some((p.id.to_string(), serde_json::from_str(p.text.get()).ok()?)))
        .collect();
    *page.as_object_mut()?.entry("properties").or_insert(Value::Null) = Value::Object(keyed);
    Some(page)
}

fn invalid(id: Uuid, reason: String, page: Option<Value>) -> InvalidPage {
    InvalidPage { page_id: Some(id.to_string()), reason, page }
}

/// The row written for a page, or why the page fails the database's mapping.
fn to_row(
    view: PageView,
    props: &[Property],
    text: &str,
    mapping: &Mapping,
    schema: &Value,
    buf: &mut Canonical,
) -> Result<PageRow, InvalidPage> {
    if !mapping.properties.is_empty() {
        // Only the properties the rules name are needed as values.
        let values = props
            .iter()
            .filter(|p| mapping.properties.contains_key(p.id.as_ref()))
            .map(|p| Ok((p.id.to_string(), serde_json::from_str(p.text.get())?)))
            .collect::<Result<serde_json::Map<String, Value>, serde_json::Error>>()
            .map_err(|e| invalid(view.id, format!("not a valid page object: {e}"), None))?;
        if let Err(reason) = mapping.validate(schema, &values) {
            return Err(invalid(view.id, reason, page_value(text, props)));
        }
    }
    let content_hash = content_hash(&view, props, buf)
        .map_err(|e| invalid(view.id, format!("not a valid page object: {e}"), None))?;
    let properties = properties_text(props).map_err(|reason| invalid(view.id, reason, None))?;
    Ok(PageRow {
        page_id: view.id,
        url: view.url.map(Cow::into_owned),
        created_time: view.created_time,
        last_edited_time: view.last_edited_time,
        created_by: view.created_by.map(|u| u.id),
        last_edited_by: view.last_edited_by.map(|u| u.id),
        archived: view.is_archived.unwrap_or(view.archived),
        in_trash: view.in_trash,
        content_hash,
        properties,
    })
}

/// Reads one result. `completed` is `None` on the first read (truncated values are reported),
/// else the values completed since (the page is then always turned into a row or refused).
pub fn read_page(
    text: &str,
    completed: Option<&[(String, Box<RawValue>)]>,
    mapping: &Mapping,
    schema: &Value,
) -> Scanned {
    thread_local! {
        /// The canonical bytes of the page being read, reused from page to page.
        static CANONICAL: RefCell<Canonical> = RefCell::default();
    }
    CANONICAL.with_borrow_mut(|buf| {
        buf.clear();
        let scanned = read_page_in(text, completed, mapping, schema, buf);
        // A typical page's canonical bytes are about 10 KB; a huge one's memory is not kept.
        buf.trim(256 * 1024);
        scanned
    })
}

fn read_page_in(
    text: &str,
    completed: Option<&[(String, Box<RawValue>)]>,
    mapping: &Mapping,
    schema: &Value,
    buf: &mut Canonical,
) -> Scanned {
    let mut view = match serde_json::from_str::<PageView>(text) {
        Ok(view) => view,
        Err(e) => return malformed(text, e),
    };
    if view.object.as_deref().is_some_and(|o| o != "page") {
        return Scanned::NotAPage;
    }
    let (id, created_time, last_edited_time) = (view.id, view.created_time, view.last_edited_time);
    let gone = view.in_trash || view.archived || view.is_archived == Some(true);
    let read = |outcome| Scanned::Page(Read { id, created_time, last_edited_time, gone, outcome });
    let props = match keyed(std::mem::take(&mut view.properties), completed.unwrap_or_default(), buf) {
        Ok(props) => props,
        Err(e) => return Scanned::Malformed(invalid(id, format!("not a valid page object: {e}"), None)),
    };
    if completed.is_none() {
        let truncated: Vec<_> = props.iter().filter_map(Property::truncated).collect();
        if !truncated.is_empty() {
            return read(Outcome::Truncated(truncated));
        }
    }
    match to_row(view, &props, text, mapping, schema, buf) {
        Ok(row) => read(Outcome::Row(row)),
        Err(bad) => read(Outcome::Invalid(bad)),
    }
}

/// Reads a page again with its truncated values completed.
pub fn complete(
    text: &str,
    completed: &[(String, Box<RawValue>)],
    mapping: &Mapping,
    schema: &Value,
) -> Outcome {
    match read_page(text, Some(completed), mapping, schema) {
        Scanned::Page(read) => read.outcome,
        Scanned::Malformed(bad) => Outcome::Invalid(bad),
        Scanned::NotAPage => {
            Outcome::Invalid(InvalidPage { page_id: None, reason: "not a page object".into(), page: None })
        }
    }
}

/// A result that failed to parse as a page: skipped when it says it is another kind of object,
/// else reported with whatever id it has.
fn malformed(text: &str, error: serde_json::Error) -> Scanned {
    /// What is read of a result that is not a valid page: whether it claims to be one, its id.
    #[derive(Deserialize)]
    struct Probe {
        object: Option<Value>,
        id: Option<Value>,
    }
    let probe = serde_json::from_str::<Probe>(text).ok();
    let object = probe.as_ref().and_then(|p| p.object.as_ref()).and_then(Value::as_str);
    if object.is_some_and(|o| o != "page") {
        return Scanned::NotAPage;
    }
    let page_id = probe
        .as_ref()
        .and_then(|p| p.id.as_ref())
        .and_then(Value::as_str)
        .map(|s| s.chars().take(64).collect());
    Scanned::Malformed(InvalidPage {
        page_id,
        reason: format!("not a valid page object: {error}"),
        page: None,
    })
}

/// Reads a response's results: pages (with their index in `results`), and malformed ones.
/// Non-page objects are skipped. Duplicate ids keep their last occurrence (Notion can repeat a
/// page across an edit).
pub fn parse_results(
    results: &[Box<RawValue>],
    mapping: &Mapping,
    schema: &Value,
) -> (Vec<(usize, Read)>, Vec<InvalidPage>) {
    let mut reads: Vec<(usize, Read)> = Vec::with_capacity(results.len());
    let mut invalid = Vec::new();
    let mut seen: HashMap<Uuid, usize> = HashMap::with_capacity(results.len());
    for (i, raw) in results.iter().enumerate() {
        match read_page(raw.get(), None, mapping, schema) {
            Scanned::NotAPage => {}
            Scanned::Malformed(bad) => invalid.push(bad),
            Scanned::Page(read) => match seen.get(&read.id) {
                Some(&j) => reads[j] = (i, read),
                None => {
                    seen.insert(read.id, reads.len());
                    reads.push((i, read));
                }
            },
        }
    }
    (reads, invalid)
}

/// The value of property `property_id` in page `text`, with its list replaced by the complete
/// `items` read from the property endpoint.
pub fn completed_value(text: &str, property_id: &str, ty: &str, items: Vec<Value>) -> Option<Box<RawValue>> {
    let view: PageView = serde_json::from_str(text).ok()?;
    let mut value = view
        .properties
        .0
        .iter()
        .filter_map(|(_, raw)| serde_json::from_str::<Value>(raw.get()).ok())
        .find(|v| v.get("id").and_then(Value::as_str) == Some(property_id))?;
    let map = value.as_object_mut()?;
    let list: Vec<Value> =
        items.into_iter().filter_map(|mut item| item.get_mut(ty).map(Value::take)).collect();
    map.insert(ty.to_string(), Value::Array(list));
    if ty == "relation" {
        map.insert("has_more".into(), Value::Bool(false));
    }
    serde_json::value::to_raw_value(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use syncfleet_shared::hashing::{hash_map, hash_value};

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).expect("valid JSON")
    }

    fn page_with(props: Value, extra: Value) -> Value {
        let mut page = json!({"object": "page", "id": "be633bf1-dfa0-436d-b259-571129a590e5",
               "created_time": "2026-10-24T22:54:00.000Z", "last_edited_time": "2026-11-08T18:25:00.000Z",
               "properties": props});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            page[k] = v;
        }
        page
    }

    fn page(props: Value) -> Box<RawValue> {
        raw(page_with(props, json!({})))
    }

    fn read(text: &RawValue) -> Read {
        match read_page(text.get(), None, &Mapping::default(), &Value::Null) {
            Scanned::Page(read) => read,
            other => panic!("not read as a page: {other:?}"),
        }
    }

    fn row(text: &RawValue) -> PageRow {
        match read(text).outcome {
            Outcome::Row(row) => row,
            other => panic!("no row: {other:?}"),
        }
    }

    /// A parsed page's properties keyed by id, as the worker keyed them before reading text.
    fn properties_by_id(page: &Value) -> serde_json::Map<String, Value> {
        page["properties"]
            .as_object()
            .expect("properties")
            .iter()
            .map(|(name, v)| (v.get("id").and_then(Value::as_str).unwrap_or(name).to_string(), v.clone()))
            .collect()
    }

    /// The hash as the worker computed it from `serde_json::Value` maps before the properties
    /// were read from text: rows stored then must keep their hash.
    fn value_hash(page: &Value) -> String {
        let keyed = properties_by_id(page);
        let mut h = Sha256::new();
        hash_map(&mut h, &keyed);
        let archived = page.get("is_archived").and_then(Value::as_bool).unwrap_or(page["archived"] == true);
        h.update([archived as u8, (page["in_trash"] == true) as u8]);
        hash_value(&mut h, page.get("icon").unwrap_or(&Value::Null));
        hash_value(&mut h, page.get("cover").unwrap_or(&Value::Null));
        h.update(page.get("url").and_then(Value::as_str).unwrap_or_default().as_bytes());
        hex::encode(h.finalize())
    }

    #[test]
    fn the_hash_and_document_equal_those_of_the_parsed_value() {
        let page = page_with(
            json!({
                "Name": {"id": "title", "type": "title", "title": [{"plain_text": "a \u{201c}q\u{201d} \\ \"x\"", "href": null}]},
                "Amount": {"id": "am%40t", "type": "number", "number": 738.22},
                "Big": {"id": "b%3Ag", "type": "number", "number": 12345678901234567890u64},
                "No id": {"type": "checkbox", "checkbox": true},
                "Same id": {"id": "dup", "type": "number", "number": 1},
                "Same id too": {"id": "dup", "type": "number", "number": 2},
                "Nested": {"id": "n", "type": "rich_text", "rich_text": [{"annotations": {"bold": false, "code": true}, "text": {"content": "é", "link": null}}]}
            }),
            json!({"icon": {"type": "emoji", "emoji": "🚀"}, "url": "https://www.notion.so/x", "in_trash": true, "archived": true}),
        );
        let text = raw(page.clone());
        let written = row(&text);
        assert_eq!(written.content_hash, value_hash(&page));
        let stored: Value = serde_json::from_str(&written.properties).expect("the stored text is JSON");
        let expected = properties_by_id(&page);
        assert_eq!(stored, Value::Object(expected));
        assert_eq!(stored["dup"]["number"], 2, "of two properties with one id, the last by name is kept");
        assert!(written.archived && written.in_trash);
        // Duplicate names in the text: the last one counts, as in a parsed map.
        let dup_names = r#"{"object":"page","id":"be633bf1-dfa0-436d-b259-571129a590e5","created_time":"2026-10-24T22:54:00.000Z","last_edited_time":"2026-11-08T18:25:00.000Z","properties":{"A":{"id":"a","number":1},"A":{"id":"a","number":2}}}"#;
        let dup_row = row(&RawValue::from_string(dup_names.into()).expect("json"));
        let parsed: Value = serde_json::from_str(dup_names).expect("json");
        assert_eq!(dup_row.content_hash, value_hash(&parsed));
        let stored: Value = serde_json::from_str(&dup_row.properties).expect("json");
        assert_eq!(stored, json!({"a": {"id": "a", "number": 2}}));
    }

    #[test]
    fn hash_ignores_key_order_but_not_values() {
        let a = row(&page(json!({"A": {"number": 1}, "B": {"x": [1, 2]}})));
        let b = row(&page(json!({"B": {"x": [1, 2]}, "A": {"number": 1}})));
        let c = row(&page(json!({"A": {"number": 2}, "B": {"x": [1, 2]}})));
        assert_eq!(a.content_hash, b.content_hash);
        assert_ne!(a.content_hash, c.content_hash);
    }

    #[test]
    fn a_renamed_property_keeps_its_key_and_hash() {
        let a = row(&page(json!({"Old": {"id": "x%3A1", "type": "number", "number": 5}})));
        let b = row(&page(json!({"New": {"id": "x%3A1", "type": "number", "number": 5}})));
        assert_eq!(a.properties, b.properties);
        assert_eq!(a.content_hash, b.content_hash);
        let stored: Value = serde_json::from_str(&a.properties).expect("the stored text is JSON");
        assert_eq!(stored["x%3A1"]["number"], 5);
    }

    #[test]
    fn truncated_relations_are_found_and_completed() {
        let text = page(json!({"Rel": {"id": "rl", "type": "relation",
            "relation": [{"id": "a"}], "has_more": true}}));
        let Outcome::Truncated(truncated) = read(&text).outcome else { panic!("not truncated") };
        assert_eq!(truncated, vec![("rl".to_string(), "relation".to_string())]);
        let items = (0..60).map(
            |i| json!({"object": "property_item", "type": "relation", "relation": {"id": i.to_string()}}),
        );
        let value = completed_value(text.get(), "rl", "relation", items.collect()).expect("the property");
        let completed = vec![("rl".to_string(), value)];
        let Outcome::Row(row) = complete(text.get(), &completed, &Mapping::default(), &Value::Null) else {
            panic!("no row")
        };
        let stored: Value = serde_json::from_str(&row.properties).expect("json");
        assert_eq!(stored["rl"]["relation"].as_array().map(Vec::len), Some(60));
        assert_eq!(stored["rl"]["has_more"], false);
    }

    #[test]
    fn lists_of_25_or_more_are_truncated_and_shorter_ones_are_not() {
        let people = |n: usize| json!({"id": "pp", "type": "people", "people": vec![json!({"id": "u"}); n]});
        let Outcome::Truncated(truncated) = read(&page(json!({"P": people(25)}))).outcome else {
            panic!("25 people not seen as truncated")
        };
        assert_eq!(truncated, vec![("pp".to_string(), "people".to_string())]);
        assert!(matches!(read(&page(json!({"P": people(24)}))).outcome, Outcome::Row(_)));
        // Only the list named by the type counts, and a value needs its own id to be completed.
        let other = json!({"id": "t", "type": "title", "title": [], "people": vec![json!({}); 30]});
        assert!(matches!(read(&page(json!({"T": other}))).outcome, Outcome::Row(_)));
        let no_id = json!({"type": "rich_text", "rich_text": vec![json!({}); 30]});
        assert!(matches!(read(&page(json!({"R": no_id}))).outcome, Outcome::Row(_)));
        // A huge value is read like any other (the reused buffer then gives its memory back).
        let huge =
            json!({"id": "h", "type": "rich_text", "rich_text": [{"plain_text": "x".repeat(2_000_000)}]});
        assert!(matches!(read(&page(json!({"H": huge}))).outcome, Outcome::Row(_)));
    }

    #[test]
    fn malformed_pages_are_isolated_and_duplicates_collapse() {
        let bad = json!({"object": "page", "id": "not-a-uuid", "properties": {}});
        let results = vec![
            page(json!({"v": 1})),
            raw(bad),
            page(json!({"v": 2})),
            raw(json!({"object": "data_source"})),
            raw(json!({"object": 7, "id": "odd-object"})),
            raw(json!({"object": "database", "id": "be633bf1-dfa0-436d-b259-571129a590e5",
                       "created_time": "2026-10-24T22:54:00.000Z",
                       "last_edited_time": "2026-11-08T18:25:00.000Z", "properties": {"v": 3}})),
            raw(json!({"object": "page", "id": "0b5e8e8a-4f4e-4c59-9a4b-2f1f6f7c1a11",
                       "created_time": "2026-10-24T22:54:00.000Z",
                       "last_edited_time": "2026-11-08T18:25:00.000Z", "properties": [1, 2]})),
        ];
        let (reads, invalid) = parse_results(&results, &Mapping::default(), &Value::Null);
        assert_eq!(reads.len(), 1);
        assert_eq!(reads[0].0, 2, "the last occurrence of a repeated page is kept");
        let Outcome::Row(row) = &reads[0].1.outcome else { panic!("no row") };
        assert_eq!(serde_json::from_str::<Value>(&row.properties).expect("json"), json!({"v": 2}));
        assert_eq!(invalid.len(), 3, "a result whose `object` is not a string is reported, not skipped");
        assert_eq!(invalid[0].page_id.as_deref(), Some("not-a-uuid"));
        assert_eq!(invalid[1].page_id.as_deref(), Some("odd-object"));
        assert_eq!(invalid[2].page_id.as_deref(), Some("0b5e8e8a-4f4e-4c59-9a4b-2f1f6f7c1a11"));
    }

    #[test]
    fn a_page_failing_the_mapping_is_reported_with_its_properties_keyed_by_id() {
        let mapping: Mapping =
            serde_json::from_value(json!({"properties": {"n": {"required": true}}})).expect("mapping");
        let text = page(json!({"Count": {"id": "n", "type": "number", "number": null}}));
        let Scanned::Page(read) = read_page(text.get(), None, &mapping, &Value::Null) else { panic!() };
        let Outcome::Invalid(bad) = read.outcome else { panic!("not refused") };
        assert!(bad.reason.contains("required"), "{}", bad.reason);
        assert_eq!(bad.page.expect("the page")["properties"]["n"]["type"], "number");
        let ok = page(json!({"Count": {"id": "n", "type": "number", "number": 3}}));
        let Scanned::Page(read) = read_page(ok.get(), None, &mapping, &Value::Null) else { panic!() };
        assert!(matches!(read.outcome, Outcome::Row(_)));
    }
}
