//! Stable hashing of JSON values: the same content gives the same hash whatever the key order.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Feeds `v` into `h` canonically (object keys sorted, lengths prefixed).
pub fn hash_value(h: &mut Sha256, v: &Value) {
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.update(b"#");
            h.update(n.to_string().as_bytes());
        }
        Value::String(s) => {
            h.update(b"s");
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Value::Array(items) => {
            h.update(b"[");
            h.update((items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(h, item);
            }
        }
        Value::Object(map) => hash_map(h, map),
    }
}

/// Feeds an object into `h` exactly as [`hash_value`] would feed `Value::Object(map)`, without
/// building (or cloning into) a `Value`. `serde_json::Map` iterates in key order.
pub fn hash_map(h: &mut Sha256, map: &serde_json::Map<String, Value>) {
    h.update(b"{");
    h.update((map.len() as u64).to_le_bytes());
    for (k, v) in map {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        hash_value(h, v);
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
}
