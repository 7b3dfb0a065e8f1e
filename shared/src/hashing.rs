//! Stable hashing of JSON values: the same content gives the same hash whatever the key order.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use sha2::{Digest, Sha256};

// The canonical bytes of each kind of value, shared by [`hash_value`] and [`Node::hash_into`]
// (stored content hashes depend on them, so they exist once).
fn feed_null(h: &mut Sha256) {
    h.update(b"n");
}

fn feed_bool(h: &mut Sha256, b: bool) {
    h.update(if b { b"t" } else { b"f" });
}

fn feed_number(h: &mut Sha256, n: &serde_json::Number) {
    h.update(b"#");
    h.update(n.to_string().as_bytes());
}

fn feed_str(h: &mut Sha256, s: &str) {
    h.update(b"s");
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

fn feed_array<T>(h: &mut Sha256, items: &[T], hash: impl Fn(&mut Sha256, &T)) {
    h.update(b"[");
    h.update((items.len() as u64).to_le_bytes());
    for item in items {
        hash(h, item);
    }
}

/// Feeds `v` into `h` canonically (object keys sorted, lengths prefixed).
pub fn hash_value(h: &mut Sha256, v: &Value) {
    match v {
        Value::Null => feed_null(h),
        Value::Bool(b) => feed_bool(h, *b),
        Value::Number(n) => feed_number(h, n),
        Value::String(s) => feed_str(h, s),
        Value::Array(items) => feed_array(h, items, hash_value),
        Value::Object(map) => hash_map(h, map),
    }
}

/// Feeds an object into `h` exactly as [`hash_value`] would feed `Value::Object(map)`, without
/// building (or cloning into) a `Value`. `serde_json::Map` iterates in key order.
pub fn hash_map(h: &mut Sha256, map: &serde_json::Map<String, Value>) {
    hash_sorted(h, map.iter().map(|(k, v)| (k.as_str(), v)), hash_value);
}

/// Feeds object entries that are already in key order, each key once.
pub fn hash_sorted<'k, T>(
    h: &mut Sha256,
    entries: impl ExactSizeIterator<Item = (&'k str, T)>,
    hash: impl Fn(&mut Sha256, T),
) {
    h.update(b"{");
    h.update((entries.len() as u64).to_le_bytes());
    for (k, v) in entries {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        hash(h, v);
    }
}

/// Sorts `items` by `key` and keeps, of equal keys, the last in input order: what inserting
/// them one by one into a map keeps.
pub fn sort_keep_last<T, K: Ord + ?Sized>(mut items: Vec<T>, key: impl Fn(&T) -> &K) -> Vec<T> {
    // Stable: equal keys keep their input order.
    items.sort_by(|a, b| key(a).cmp(key(b)));
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        if out.last().is_some_and(|prev| key(prev) == key(&item)) {
            out.pop();
        }
        out.push(item);
    }
    out
}

/// A JSON value parsed without copying what it can borrow: strings without escapes stay slices
/// of the input, and objects stay vectors of entries (no map is built). Hashing it feeds exactly
/// what [`hash_value`] feeds for the same text parsed into a [`Value`], so a page can be hashed
/// straight from its response text.
#[derive(Debug)]
pub enum Node<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    Str(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    /// In input order, duplicate keys included (the last one wins, as in a [`Value`]).
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

impl<'a> Node<'a> {
    /// Parses `text` (one JSON value), borrowing from it.
    pub fn parse(text: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The member `key` of an object (its last occurrence), like [`Value::get`].
    pub fn get(&self, key: &str) -> Option<&Node<'a>> {
        match self {
            Node::Object(entries) => entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Node::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Node<'a>]> {
        match self {
            Node::Array(items) => Some(items),
            _ => None,
        }
    }

    /// Feeds the value into `h` exactly as [`hash_value`] feeds the equivalent [`Value`].
    pub fn hash_into(&self, h: &mut Sha256) {
        match self {
            Node::Null => feed_null(h),
            Node::Bool(b) => feed_bool(h, *b),
            Node::Number(n) => feed_number(h, n),
            Node::Str(s) => feed_str(h, s),
            Node::Array(items) => feed_array(h, items, |h, item| item.hash_into(h)),
            Node::Object(entries) => {
                let entries: Vec<(&str, &Node)> = entries.iter().map(|(k, v)| (k.as_ref(), v)).collect();
                let kept = sort_keep_last(entries, |(k, _)| *k);
                hash_sorted(h, kept.into_iter(), |h, v| v.hash_into(h))
            }
        }
    }
}

/// A string that borrows from the input when it has no escapes (a JSON key or value).
pub struct Text<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Node::Bool(v))
            }
            // Numbers as `Value` reads them, so their text (and hash) is the same.
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Node::Number(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Node::Number(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(serde_json::Number::from_f64(v).map_or(Node::Null, Node::Number))
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Node::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Node::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Node::Str(Cow::Owned(v)))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((Text(k), v)) = map.next_entry::<Text<'de>, Node<'de>>()? {
                    entries.push((k, v));
                }
                Ok(Node::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// Hex SHA-256 of one JSON value.
pub fn json_hash(v: &Value) -> String {
    let mut h = Sha256::new();
    hash_value(&mut h, v);
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_does_not_matter_but_content_does() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":[1,"x"]}}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"b":{"c":[1,"x"]},"a":1}"#).expect("json");
        let c: Value = serde_json::from_str(r#"{"b":{"c":["x",1]},"a":1}"#).expect("json");
        assert_eq!(json_hash(&a), json_hash(&b));
        assert_ne!(json_hash(&a), json_hash(&c));
    }

    #[test]
    fn the_canonical_bytes_are_pinned() {
        // Stored content hashes depend on these bytes; the expected digest was computed outside
        // Rust from the format (tags n t f # s [ {, little-endian u64 lengths, keys in byte order).
        let text = r#"{"b":[1,-2,true,null],"a":{"é":"x","Z":false},"":""}"#;
        let expected = "c7fb3367049bc0c328ad502b7529e9dadd73c341d75c5a011392f0269f3dd4e0";
        assert_eq!(json_hash(&serde_json::from_str(text).expect("json")), expected);
        assert_eq!(node_hash(text), expected);
    }

    fn node_hash(text: &str) -> String {
        let mut h = Sha256::new();
        Node::parse(text).expect("json").hash_into(&mut h);
        hex::encode(h.finalize())
    }

    #[test]
    fn a_node_hashes_exactly_like_the_value_of_the_same_text() {
        let texts = [
            r#"null"#,
            r#"{"b":1,"a":[true,false,null],"c":{"z":"x","y":-3}}"#,
            // Duplicate keys: the last occurrence wins, in the key's sorted place.
            r#"{"k":1,"a":2,"k":{"n":[1,2]},"a":"last"}"#,
            // Escapes (owned strings), unicode, and numbers whose text a float rewrites.
            r#"{"s":"q\"uote\\ \u201cx\u201d \ud83d\ude00","n":[1.0,1e2,-0.0,0.1,12345678901234567890,123456789012345678901234567890,-9223372036854775808,2.5e-7]}"#,
            r#"[{"":""},{"a":{}},[],[[[]]],"é"]"#,
        ];
        for text in texts {
            let value: Value = serde_json::from_str(text).expect("json");
            assert_eq!(node_hash(text), json_hash(&value), "{text}");
        }
        assert_ne!(node_hash(r#"{"a":1,"a":2}"#), node_hash(r#"{"a":2,"a":1}"#));
    }

    #[test]
    fn a_node_borrows_plain_strings_and_reads_members() {
        let text = r#"{"id":"x%3A1","type":"rich_text","esc":"a\\nb","id":"last"}"#;
        let node = Node::parse(text).expect("json");
        assert_eq!(node.get("id").and_then(Node::as_str), Some("last"));
        assert!(matches!(node.get("type"), Some(Node::Str(Cow::Borrowed(_)))));
        assert!(matches!(node.get("esc"), Some(Node::Str(Cow::Owned(_)))));
        assert!(node.get("missing").is_none());
    }
}
