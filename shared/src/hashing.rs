//! Stable hashing of JSON values: the same content gives the same hash whatever the key order.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Where canonical bytes go: straight into a hasher, or into a buffer hashed later.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

// The canonical bytes of each kind of value, shared by [`hash_value`] and [`Canonical`] (stored
// content hashes depend on them, so they exist once): a tag, then for strings, arrays and objects
// a little-endian u64 length, then the content; object keys in byte order, each once.
const ARRAY: u8 = b'[';
const OBJECT: u8 = b'{';

fn len_bytes(n: usize) -> [u8; 8] {
    (n as u64).to_le_bytes()
}

/// Feeds the tag of `null`.
pub fn feed_null(h: &mut impl Sink) {
    h.put(b"n");
}

fn feed_bool(h: &mut impl Sink, b: bool) {
    h.put(if b { b"t" } else { b"f" });
}

/// A number as `serde_json::Number` displays it (so a float's text is the one a `Value` gives).
fn feed_number(h: &mut impl Sink, n: &serde_json::Number) {
    struct Out<'s, S: Sink>(&'s mut S);
    impl<S: Sink> fmt::Write for Out<'_, S> {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.put(s.as_bytes());
            Ok(())
        }
    }
    h.put(b"#");
    // Writing into a sink cannot fail.
    fmt::write(&mut Out(h), format_args!("{n}")).unwrap_or(());
}

fn feed_str(h: &mut impl Sink, s: &str) {
    h.put(b"s");
    h.put(&len_bytes(s.len()));
    h.put(s.as_bytes());
}

/// Feeds `v` into `h` canonically (object keys sorted, lengths prefixed).
pub fn hash_value(h: &mut impl Sink, v: &Value) {
    match v {
        Value::Null => feed_null(h),
        Value::Bool(b) => feed_bool(h, *b),
        Value::Number(n) => feed_number(h, n),
        Value::String(s) => feed_str(h, s),
        Value::Array(items) => {
            h.put(&[ARRAY]);
            h.put(&len_bytes(items.len()));
            for item in items {
                hash_value(h, item);
            }
        }
        Value::Object(map) => hash_map(h, map),
    }
}

/// Feeds an object into `h` exactly as [`hash_value`] would feed `Value::Object(map)`, without
/// building (or cloning into) a `Value`. `serde_json::Map` iterates in key order.
pub fn hash_map(h: &mut impl Sink, map: &serde_json::Map<String, Value>) {
    hash_sorted(h, map.iter().map(|(k, v)| (k.as_str(), v)), hash_value);
}

/// Feeds object entries that are already in key order, each key once.
pub fn hash_sorted<'k, T, S: Sink>(
    h: &mut S,
    entries: impl ExactSizeIterator<Item = (&'k str, T)>,
    hash: impl Fn(&mut S, T),
) {
    h.put(&[OBJECT]);
    h.put(&len_bytes(entries.len()));
    for (k, v) in entries {
        h.put(&len_bytes(k.len()));
        h.put(k.as_bytes());
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

/// The canonical bytes of JSON text, written in one pass over the text: no tree is built and the
/// buffers are reused (only strings with escapes are copied). Each object's entries are written
/// in input order and reordered in place only when their keys are not already sorted and
/// unique. The bytes are exactly what [`hash_value`] feeds for the same text parsed into a
/// [`Value`], so a page is hashed straight from its response text.
#[derive(Default)]
pub struct Canonical {
    out: Vec<u8>,
    /// The open objects' entries (start, end in `out`), innermost last.
    entries: Vec<(usize, usize)>,
    scratch: Vec<u8>,
}

/// What is read of an object's own members while its canonical bytes are written: the last
/// `id`, `type` and `has_more` (when they are a string, a string and a boolean), and the length
/// of the member named by `type` when that member (its last occurrence) is an array.
#[derive(Debug, Default)]
pub struct Head<'de> {
    pub id: Option<Cow<'de, str>>,
    pub ty: Option<Cow<'de, str>>,
    pub has_more: Option<bool>,
    pub typed_len: Option<usize>,
}

impl Canonical {
    /// Forgets what was written (keeps the memory).
    pub fn clear(&mut self) {
        self.out.clear();
        self.entries.clear();
    }

    /// Forgets what was written and gives back the memory above `bytes` per buffer (after an
    /// unusually large value), so a reused buffer does not keep the largest value it ever held.
    pub fn trim(&mut self, bytes: usize) {
        self.clear();
        for buf in [&mut self.out, &mut self.scratch] {
            buf.clear();
            buf.shrink_to(bytes);
        }
        self.entries.shrink_to(bytes / 64);
    }

    /// Everything written since the last [`Canonical::clear`].
    pub fn bytes(&self) -> &[u8] {
        &self.out
    }

    /// Appends the canonical bytes of `text` (one JSON value); returns where they are.
    pub fn write(&mut self, text: &str) -> Result<Range<usize>, serde_json::Error> {
        let start = self.out.len();
        Put { c: self, capture: Capture::None }.deserialize(&mut serde_json::Deserializer::from_str(text))?;
        Ok(start..self.out.len())
    }

    /// Like [`Canonical::write`], and reads the value's [`Head`] on the way.
    pub fn write_with_head<'de>(
        &mut self,
        text: &'de str,
    ) -> Result<(Range<usize>, Head<'de>), serde_json::Error> {
        let start = self.out.len();
        let mut head = Head::default();
        Put { c: self, capture: Capture::Head(&mut head) }
            .deserialize(&mut serde_json::Deserializer::from_str(text))?;
        Ok((start..self.out.len(), head))
    }

    /// A length this writer wrote (see [`len_bytes`]) at `at`.
    fn len_at(out: &[u8], at: usize) -> usize {
        let mut n = [0u8; 8];
        n.copy_from_slice(&out[at..at + 8]);
        u64::from_le_bytes(n) as usize
    }

    fn key(out: &[u8], (start, _): (usize, usize)) -> &[u8] {
        &out[start + 8..start + 8 + Self::len_at(out, start)]
    }

    /// Closes the object whose entries start at `self.entries[base]` and whose bytes start at
    /// `region`: puts them in key order, keeps the last of equal keys, returns how many remain.
    fn close_object(&mut self, base: usize, region: usize) -> usize {
        let Canonical { out, entries, scratch } = self;
        let open = &mut entries[base..];
        let in_order = open.windows(2).all(|w| Self::key(out, w[0]) < Self::key(out, w[1]));
        let count = if in_order {
            open.len()
        } else {
            // Stable: equal keys keep their input order, and the last of them is kept.
            open.sort_by(|a, b| Self::key(out, *a).cmp(Self::key(out, *b)));
            let mut kept = 0;
            for i in 0..open.len() {
                let last_of_its_key =
                    i + 1 == open.len() || Self::key(out, open[i]) != Self::key(out, open[i + 1]);
                if last_of_its_key {
                    open[kept] = open[i];
                    kept += 1;
                }
            }
            scratch.clear();
            scratch.extend_from_slice(&out[region..]);
            out.truncate(region);
            for &(start, end) in &open[..kept] {
                out.extend_from_slice(&scratch[start - region..end - region]);
            }
            kept
        };
        entries.truncate(base);
        count
    }
}

/// Where a value read by [`Put`] is also recorded.
enum Capture<'w, 'de> {
    None,
    /// The value is the object whose [`Head`] is read.
    Head(&'w mut Head<'de>),
    Str(&'w mut Option<Cow<'de, str>>),
    Bool(&'w mut Option<bool>),
}

/// `slot`, emptied: a later occurrence of a member replaces what an earlier one recorded.
fn cleared<T>(slot: &mut Option<T>) -> &mut Option<T> {
    *slot = None;
    slot
}

/// Writes one value's canonical bytes into `c`.
struct Put<'w, 'de> {
    c: &'w mut Canonical,
    capture: Capture<'w, 'de>,
}

impl<'de> DeserializeSeed<'de> for Put<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Put<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        if let Capture::Bool(slot) = self.capture {
            *slot = Some(v);
        }
        feed_bool(&mut self.c.out, v);
        Ok(())
    }
    // Numbers as `Value` reads them, so their text (and hash) is the same.
    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        feed_number(&mut self.c.out, &v.into());
        Ok(())
    }
    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        feed_number(&mut self.c.out, &v.into());
        Ok(())
    }
    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        match serde_json::Number::from_f64(v) {
            Some(n) => feed_number(&mut self.c.out, &n),
            None => feed_null(&mut self.c.out),
        }
        Ok(())
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        feed_str(&mut self.c.out, v);
        if let Capture::Str(slot) = self.capture {
            *slot = Some(Cow::Borrowed(v));
        }
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        feed_str(&mut self.c.out, v);
        if let Capture::Str(slot) = self.capture {
            *slot = Some(Cow::Owned(v.to_owned()));
        }
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        feed_null(&mut self.c.out);
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        feed_null(&mut self.c.out);
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let c = self.c;
        c.out.push(ARRAY);
        let at = c.out.len();
        c.out.extend_from_slice(&[0; 8]);
        let mut n = 0usize;
        while seq.next_element_seed(Put { c: &mut *c, capture: Capture::None })?.is_some() {
            n += 1;
        }
        c.out[at..at + 8].copy_from_slice(&len_bytes(n));
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let c = self.c;
        let mut head = match self.capture {
            Capture::Head(head) => Some(head),
            _ => None,
        };
        c.out.push(OBJECT);
        let at = c.out.len();
        c.out.extend_from_slice(&[0; 8]);
        let base = c.entries.len();
        while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
            let start = c.out.len();
            c.out.extend_from_slice(&len_bytes(key.len()));
            c.out.extend_from_slice(key.as_bytes());
            let capture = match (&mut head, key.as_ref()) {
                (Some(head), "id") => Capture::Str(cleared(&mut head.id)),
                (Some(head), "type") => Capture::Str(cleared(&mut head.ty)),
                (Some(head), "has_more") => Capture::Bool(cleared(&mut head.has_more)),
                _ => Capture::None,
            };
            map.next_value_seed(Put { c: &mut *c, capture })?;
            c.entries.push((start, c.out.len()));
        }
        if let Some(head) = head {
            // The member named by `type`, its last occurrence: an array's canonical bytes are its
            // tag then its length.
            let named = head.ty.as_deref().map(str::as_bytes);
            let last = c.entries[base..].iter().rev().find(|&&e| Some(Canonical::key(&c.out, e)) == named);
            head.typed_len = last.and_then(|&(start, end)| {
                let value = &c.out[start + 8 + named.map_or(0, <[u8]>::len)..end];
                (value.first() == Some(&ARRAY)).then(|| Canonical::len_at(value, 1))
            });
        }
        let count = c.close_object(base, at + 8);
        c.out[at..at + 8].copy_from_slice(&len_bytes(count));
        Ok(())
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
        let mut c = Canonical::default();
        let range = c.write(text).expect("json");
        assert_eq!(range, 0..c.bytes().len());
        hex::encode(Sha256::digest(c.bytes()))
    }

    #[test]
    fn the_canonical_writer_feeds_what_the_value_of_the_same_text_feeds() {
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

    /// Random JSON text: objects with shuffled, repeated and escaped keys, nested arrays, numbers
    /// of every kind.
    fn random_json(rng: &mut impl rand::Rng, depth: u32, out: &mut String) {
        const KEYS: [&str; 9] = ["a", "b", "id", "type", "Z", "é", "a\\b", "\\u00e9", ""];
        match rng.random_range(0..if depth == 0 { 5 } else { 7 }) {
            0 => out.push_str("null"),
            1 => out.push_str(if rng.random() { "true" } else { "false" }),
            2 => out.push_str(
                ["0", "-1", "1.5", "1e2", "-0.0", "18446744073709551616", "2.5e-7"][rng.random_range(0..7)],
            ),
            3 => out.push_str(&rng.random::<i64>().to_string()),
            4 => out.push_str(["\"x\"", "\"\\n\\ud83d\\ude00\"", "\"\"", "\"é\""][rng.random_range(0..4)]),
            5 => {
                out.push('[');
                for i in 0..rng.random_range(0..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    random_json(rng, depth - 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..rng.random_range(0..6) {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&format!("\"{}\":", KEYS[rng.random_range(0..KEYS.len())]));
                    random_json(rng, depth - 1, out);
                }
                out.push('}');
            }
        }
    }

    #[test]
    fn random_texts_hash_as_their_values_do() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let mut c = Canonical::default();
        for _ in 0..3000 {
            let mut text = String::new();
            random_json(&mut rng, 4, &mut text);
            let value: Value = serde_json::from_str(&text).expect("generated JSON");
            // Written after other bytes, as a page's properties are, so offsets are exercised.
            c.clear();
            c.write("{\"x\":[1]}").expect("json");
            let range = c.write(&text).expect("json");
            let mut h = Sha256::new();
            hash_value(&mut h, &value);
            assert_eq!(Sha256::digest(&c.bytes()[range]), h.finalize(), "{text}");
        }
    }

    #[test]
    fn a_trimmed_buffer_keeps_no_more_than_asked() {
        let mut c = Canonical::default();
        let big = format!(r#"{{"b":"{}","a":1}}"#, "x".repeat(100_000));
        c.write(&big).expect("json");
        assert!(c.out.capacity() >= 100_000 && c.scratch.capacity() >= 100_000, "the keys were reordered");
        c.trim(4096);
        assert!(c.out.capacity() <= 4096 && c.scratch.capacity() <= 4096);
        c.write("[1]").expect("json");
        assert_eq!(c.bytes(), b"[\x01\0\0\0\0\0\0\0#1");
    }

    #[test]
    fn the_head_is_read_on_the_way() {
        let text = r#"{"id":"x%3A1","type":"rich_text","esc":"a\\nb","id":"last","has_more":true,
            "rich_text":[1,2,3],"short":[1],"nested":{"id":"inner","list":[1,2,3]},"again":[1,2,3],"again":0}"#;
        let mut c = Canonical::default();
        c.write("[0]").expect("json");
        let (range, head) = c.write_with_head(text).expect("json");
        assert_eq!(head.id.as_deref(), Some("last"));
        assert!(matches!(head.ty, Some(Cow::Borrowed("rich_text"))));
        assert_eq!(head.has_more, Some(true));
        assert_eq!(head.typed_len, Some(3));
        let value: Value = serde_json::from_str(text).expect("json");
        let mut h = Sha256::new();
        hash_value(&mut h, &value);
        assert_eq!(Sha256::digest(&c.bytes()[range]), h.finalize());
        let (_, head) = c.write_with_head(r#"{"id":7,"has_more":"yes","type":"title"}"#).expect("json");
        assert_eq!((head.id, head.has_more), (None, None), "members of another kind are not read");
        let (_, head) = c.write_with_head(r#"{"id":"a","id":null}"#).expect("json");
        assert_eq!(head.id, None, "the last occurrence counts");
        // The member named by `type`: its last occurrence, wherever `type` comes.
        for (text, len) in [
            (r#"{"type":"people","people":[1,2,3],"people":"x"}"#, None),
            (r#"{"people":"x","type":"people","people":[1,2]}"#, Some(2)),
            (r#"{"title":[1,2,3,4],"type":"title"}"#, Some(4)),
            (r#"{"title":[],"type":"title"}"#, Some(0)),
            (r#"{"type":"title"}"#, None),
            (r#"{"title":[1],"nested":{"type":"title"}}"#, None),
            (r#"{"type":"a\"b","a\"b":[1]}"#, Some(1)),
        ] {
            let (_, head) = c.write_with_head(text).expect("json");
            assert_eq!(head.typed_len, len, "{text}");
        }
    }
}
