//! The simulator's workspace: databases, their schemas and pages, generated deterministically
//! from a seed. A page's property values are a pure function of (seed, database, page, version),
//! so 100,000 pages cost a few megabytes; an edit bumps the version and `last_edited_time`.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// SplitMix64: a tiny, good-enough deterministic generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(parts: &[u64]) -> Self {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for p in parts {
            state = mix(state ^ p.wrapping_mul(0xBF58_476D_1CE4_E5B9));
        }
        Self(state)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
    pub fn uuid(&mut self) -> Uuid {
        let hi = self.next_u64() as u128;
        let lo = self.next_u64() as u128;
        uuid::Builder::from_random_bytes(((hi << 64) | lo).to_be_bytes()).into_uuid()
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Property types the generator produces (every type in docs/notion-api.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Title,
    RichText,
    Number,
    Select,
    MultiSelect,
    Status,
    Date,
    People,
    Relation,
    Checkbox,
    Url,
    Email,
    Phone,
    FormulaString,
    FormulaNumber,
    FormulaBoolean,
    FormulaDate,
    RollupNumber,
    RollupDate,
    RollupArray,
    Files,
    CreatedTime,
    CreatedBy,
    LastEditedTime,
    LastEditedBy,
    UniqueId,
    Verification,
    Button,
    Place,
}

impl Kind {
    pub fn notion_type(self) -> &'static str {
        match self {
            Kind::Title => "title",
            Kind::RichText => "rich_text",
            Kind::Number => "number",
            Kind::Select => "select",
            Kind::MultiSelect => "multi_select",
            Kind::Status => "status",
            Kind::Date => "date",
            Kind::People => "people",
            Kind::Relation => "relation",
            Kind::Checkbox => "checkbox",
            Kind::Url => "url",
            Kind::Email => "email",
            Kind::Phone => "phone_number",
            Kind::FormulaString | Kind::FormulaNumber | Kind::FormulaBoolean | Kind::FormulaDate => "formula",
            Kind::RollupNumber | Kind::RollupDate | Kind::RollupArray => "rollup",
            Kind::Files => "files",
            Kind::CreatedTime => "created_time",
            Kind::CreatedBy => "created_by",
            Kind::LastEditedTime => "last_edited_time",
            Kind::LastEditedBy => "last_edited_by",
            Kind::UniqueId => "unique_id",
            Kind::Verification => "verification",
            Kind::Button => "button",
            Kind::Place => "place",
        }
    }

    /// Parses a Notion type name (used by the schema admin endpoint).
    pub fn from_notion(name: &str) -> Option<Kind> {
        Some(match name {
            "title" => Kind::Title,
            "rich_text" => Kind::RichText,
            "number" => Kind::Number,
            "select" => Kind::Select,
            "multi_select" => Kind::MultiSelect,
            "status" => Kind::Status,
            "date" => Kind::Date,
            "people" => Kind::People,
            "relation" => Kind::Relation,
            "checkbox" => Kind::Checkbox,
            "url" => Kind::Url,
            "email" => Kind::Email,
            "phone_number" => Kind::Phone,
            "formula" => Kind::FormulaString,
            "rollup" => Kind::RollupNumber,
            "files" => Kind::Files,
            "created_time" => Kind::CreatedTime,
            "created_by" => Kind::CreatedBy,
            "last_edited_time" => Kind::LastEditedTime,
            "last_edited_by" => Kind::LastEditedBy,
            "unique_id" => Kind::UniqueId,
            "verification" => Kind::Verification,
            "button" => Kind::Button,
            "place" => Kind::Place,
            _ => return None,
        })
    }
}

/// One property of a data source's schema. `id` survives renames; `name` does not.
#[derive(Debug, Clone)]
pub struct PropDef {
    pub id: String,
    pub name: String,
    pub kind: Kind,
    /// Mixed into value generation, so a property added later gets its own values.
    pub salt: u64,
}

/// The default schema: every type, plus hostile names.
pub fn default_schema() -> Vec<PropDef> {
    let long_name = "A very long property name that keeps going ".repeat(5);
    let defs: Vec<(&str, String, Kind)> = vec![
        ("title", "Name".into(), Kind::Title),
        ("nt%3Bs", "Notes".into(), Kind::RichText),
        ("am%40t", "Amount".into(), Kind::Number),
        ("ct%3Dg", "Category".into(), Kind::Select),
        ("tg%7Bs", "Tags".into(), Kind::MultiSelect),
        ("Z%3ClH", "Status".into(), Kind::Status),
        ("M%3BBw", "Due".into(), Kind::Date),
        ("ow%5Bn", "Owner".into(), Kind::People),
        ("rl%3Ft", "Related".into(), Kind::Relation),
        ("dn%3Ae", "Done".into(), Kind::Checkbox),
        ("ur%3Dl", "Website".into(), Kind::Url),
        ("em%40l", "Email".into(), Kind::Email),
        ("ph%3Bn", "Phone".into(), Kind::Phone),
        ("fs%3Ag", "Summary".into(), Kind::FormulaString),
        ("fn%3Am", "Score".into(), Kind::FormulaNumber),
        ("fb%3Al", "Is big".into(), Kind::FormulaBoolean),
        ("fd%3At", "Next review".into(), Kind::FormulaDate),
        ("rn%3Am", "Total hours".into(), Kind::RollupNumber),
        ("rd%3At", "Latest activity".into(), Kind::RollupDate),
        ("ra%3Ar", "Sub-scores".into(), Kind::RollupArray),
        ("fi%3Ae", "Attachments".into(), Kind::Files),
        ("cr%3At", "Created".into(), Kind::CreatedTime),
        ("cr%3Ab", "Created by".into(), Kind::CreatedBy),
        ("le%3At", "Last edited".into(), Kind::LastEditedTime),
        ("le%3Ab", "Last edited by".into(), Kind::LastEditedBy),
        ("ui%3Ad", "ID".into(), Kind::UniqueId),
        ("vf%3Ay", "Verification".into(), Kind::Verification),
        ("bt%3An", "Action".into(), Kind::Button),
        ("pl%3Ac", "Location".into(), Kind::Place),
        ("hx%3A1", "\"; DROP TABLE notion_pages; --".into(), Kind::RichText),
        ("hx%3A2", "a\"b".into(), Kind::Number),
        ("hx%3A3", "ü 名前 🚀".into(), Kind::Select),
        ("hx%3A4", long_name.trim_end().chars().take(200).collect(), Kind::RichText),
        ("hx%3A5", "Due Date".into(), Kind::Date),
        ("hx%3A6", "due_date".into(), Kind::Checkbox),
    ];
    defs.into_iter()
        .enumerate()
        .map(|(i, (id, name, kind))| PropDef { id: id.into(), name, kind, salt: i as u64 })
        .collect()
}

/// A page's stored state; everything else is derived.
#[derive(Debug, Clone)]
pub struct SimPage {
    pub id: Uuid,
    /// Creation order within the database; the tie-breaker of every sort.
    pub seq: u64,
    /// Unix seconds, already rounded down to the minute (as Notion reports them).
    pub created: i64,
    pub last_edited: i64,
    pub version: u32,
    /// Bumped by a content edit; the block tree's text depends on it (`blocks::tree`).
    pub content_version: u32,
    /// When comments were added through `mutate` (after the generated ones, `comments::comments`).
    pub comments_added: Vec<i64>,
    pub in_trash: bool,
    pub created_by: Uuid,
    pub last_edited_by: Uuid,
    /// Index lag: what queries still see of the page (its timestamp and trash flag before the
    /// latest change) until `until`; `None` once the index caught up.
    pub indexed: Option<Indexed>,
}

/// The query index's lagging view of a page.
#[derive(Debug, Clone, Copy)]
pub struct Indexed {
    pub last_edited: i64,
    pub in_trash: bool,
    pub until: std::time::Instant,
}

impl SimPage {
    /// The page as the query index sees it at `now`.
    pub fn as_indexed(&self, now: std::time::Instant) -> std::borrow::Cow<'_, SimPage> {
        match self.indexed {
            Some(ix) if now < ix.until => {
                let mut old = self.clone();
                old.last_edited = ix.last_edited;
                old.in_trash = ix.in_trash;
                std::borrow::Cow::Owned(old)
            }
            _ => std::borrow::Cow::Borrowed(self),
        }
    }

    /// Records a change the index learns of only after `lag`.
    pub fn lag_index(&mut self, lag: std::time::Duration) {
        if lag.is_zero() {
            return;
        }
        let now = std::time::Instant::now();
        // A change during a pending lag rides on it: the index catches up with the latest state
        // when the first pending change becomes visible (a page edited more often than the lag
        // still reaches the index).
        if matches!(self.indexed, Some(ix) if now < ix.until) {
            return;
        }
        self.indexed =
            Some(Indexed { last_edited: self.last_edited, in_trash: self.in_trash, until: now + lag });
    }
}

#[derive(Debug, Clone)]
pub struct SimDatabase {
    pub index: u64,
    pub id: Uuid,
    pub data_source_id: Uuid,
    pub title: String,
    pub created: i64,
    pub schema: Vec<PropDef>,
    pub pages: Vec<SimPage>,
    pub by_id: HashMap<Uuid, usize>,
}

/// The whole simulated workspace.
#[derive(Debug)]
pub struct Workspace {
    pub seed: u64,
    pub databases: Vec<SimDatabase>,
    pub users: Vec<Uuid>,
    /// Which database a page id belongs to.
    pub page_index: HashMap<Uuid, usize>,
    pub mutations: u64,
}

pub fn floor_minute(secs: i64) -> i64 {
    secs - secs.rem_euclid(60)
}

pub fn iso(secs: i64) -> String {
    Utc.timestamp_opt(secs, 0)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

const EPOCH_2026: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

impl Workspace {
    /// Generates `databases` databases of `pages` pages each from `seed`.
    pub fn generate(seed: u64, databases: u64, pages: u64, now: DateTime<Utc>) -> Self {
        let mut rng = Rng::new(&[seed, 0xD1]);
        let users: Vec<Uuid> = (0..5).map(|_| rng.uuid()).collect();
        let now = now.timestamp();
        let span = (now - EPOCH_2026 - 86_400).max(86_400);
        // Creation times spread over the year so far, a few pages per minute at most.
        let step = (span / pages.max(1) as i64).clamp(1, 40);
        let mut ws =
            Workspace { seed, databases: Vec::new(), users, page_index: HashMap::new(), mutations: 0 };
        for d in 0..databases {
            let mut drng = Rng::new(&[seed, d, 0xDB]);
            let id = drng.uuid();
            let data_source_id = drng.uuid();
            let mut db = SimDatabase {
                index: d,
                id,
                data_source_id,
                title: format!("Projects {}", d + 1),
                created: EPOCH_2026 - 86_400,
                schema: default_schema(),
                pages: Vec::with_capacity(pages as usize),
                by_id: HashMap::with_capacity(pages as usize),
            };
            for i in 0..pages {
                let mut prng = Rng::new(&[seed, d, i, 0x9A]);
                let created = floor_minute(EPOCH_2026 + i as i64 * step);
                let edited = floor_minute((created + prng.below(30 * 86_400) as i64).min(now - 120));
                let page = SimPage {
                    id: prng.uuid(),
                    seq: i,
                    created,
                    last_edited: edited.max(created),
                    version: 0,
                    content_version: 0,
                    comments_added: Vec::new(),
                    in_trash: false,
                    created_by: ws.users[prng.below(5) as usize],
                    last_edited_by: ws.users[prng.below(5) as usize],
                    indexed: None,
                };
                db.by_id.insert(page.id, db.pages.len());
                ws.page_index.insert(page.id, d as usize);
                db.pages.push(page);
            }
            ws.databases.push(db);
        }
        ws
    }

    pub fn database(&self, id: &Uuid) -> Option<&SimDatabase> {
        self.databases.iter().find(|d| d.id == *id)
    }

    pub fn database_by_source(&self, id: &Uuid) -> Option<&SimDatabase> {
        self.databases.iter().find(|d| d.data_source_id == *id)
    }

    pub fn page(&self, id: &Uuid) -> Option<(&SimDatabase, &SimPage)> {
        let db = &self.databases[*self.page_index.get(id)?];
        Some((db, &db.pages[*db.by_id.get(id)?]))
    }
}

/// Select options shared by every select-like property.
pub const OPTIONS: [(&str, &str); 6] = [
    ("Alpha", "blue"),
    ("Beta", "green"),
    ("Gamma", "red"),
    ("Delta", "yellow"),
    ("Ω omega", "purple"),
    ("\"Quoted\"", "gray"),
];
pub const STATUSES: [(&str, &str); 3] =
    [("Not started", "default"), ("In progress", "blue"), ("Done", "green")];

fn option_id(name: &str) -> String {
    let mut rng = Rng::new(&[name.len() as u64, name.bytes().map(u64::from).sum()]);
    format!("{:x}", rng.next_u64() & 0xffff_ffff)
}

fn option(name: &str, color: &str) -> Value {
    json!({"id": option_id(name), "name": name, "color": color})
}

/// Builds an object from owned values (`json!` would deep-copy interpolated `Value`s).
pub fn obj<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

pub fn rich_text(content: &str) -> Value {
    json!({
        "type": "text",
        "text": {"content": content, "link": null},
        "annotations": {"bold": false, "italic": false, "strikethrough": false, "underline": false,
                        "code": false, "color": "default"},
        "plain_text": content,
        "href": null
    })
}

fn date_value(secs: i64, with_time: bool) -> Value {
    let dt = Utc.timestamp_opt(secs, 0).single().unwrap_or_default();
    let start = if with_time {
        dt.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    } else {
        dt.format("%Y-%m-%d").to_string()
    };
    json!({"start": start, "end": null, "time_zone": null})
}

fn user(id: Uuid) -> Value {
    json!({"object": "user", "id": id})
}

/// Schema config of one property, as `GET /v1/data_sources/{id}` shows it.
pub fn schema_entry(db: &SimDatabase, def: &PropDef) -> Value {
    let config = match def.kind {
        Kind::Number => json!({"format": "number"}),
        Kind::Select | Kind::MultiSelect => {
            json!({"options": OPTIONS.iter().map(|(n, c)| option(n, c)).collect::<Vec<_>>()})
        }
        Kind::Status => json!({
            "options": STATUSES.iter().map(|(n, c)| option(n, c)).collect::<Vec<_>>(),
            "groups": []
        }),
        Kind::Relation => json!({
            "database_id": db.id, "data_source_id": db.data_source_id,
            "type": "single_property", "single_property": {}
        }),
        Kind::FormulaString | Kind::FormulaNumber | Kind::FormulaBoolean | Kind::FormulaDate => {
            json!({"expression": "prop(\"Amount\")"})
        }
        Kind::RollupNumber | Kind::RollupDate | Kind::RollupArray => json!({
            "relation_property_name": "Related", "relation_property_id": "rl%3Ft",
            "rollup_property_name": "Amount", "rollup_property_id": "am%40t",
            "function": match def.kind { Kind::RollupNumber => "sum", Kind::RollupDate => "latest_date", _ => "show_original" }
        }),
        Kind::UniqueId => json!({"prefix": "TASK"}),
        _ => json!({}),
    };
    let ty = def.kind.notion_type();
    let mut entry = Map::new();
    entry.insert("id".into(), def.id.clone().into());
    entry.insert("name".into(), def.name.clone().into());
    entry.insert("description".into(), Value::Null);
    entry.insert("type".into(), ty.into());
    entry.insert(ty.into(), config);
    Value::Object(entry)
}

/// How many related pages a page has: usually a few, sometimes more than Notion's 25 inline.
pub fn relation_count(seq: u64) -> u64 {
    if seq % 500 == 17 { 60 } else { seq % 4 }
}

/// The full list of related page ids (the page object shows at most 25). Targets are pages
/// created no later than this one, so a page created later never changes a relation (a
/// property must not change without a new `last_edited_time`).
pub fn relation_targets(db: &SimDatabase, page: &SimPage, seed: u64) -> Vec<Uuid> {
    let n = relation_count(page.seq);
    let mut rng = Rng::new(&[seed, db.index, page.seq, u64::from(page.version), 0x4E1]);
    let older = (page.seq + 1).min(db.pages.len() as u64);
    (0..n).filter_map(|_| db.pages.get(rng.below(older) as usize).map(|p| p.id)).collect()
}

/// Notion's page object shows at most this many items of a title, rich-text, people or
/// relation value; the property endpoint pages through all of them.
pub const INLINE_ITEMS: usize = 25;

/// How many items a page's long title, rich text or people value has: most pages have a few;
/// one page in 500 has more than the page object shows (a pasted document, a big team).
fn long_value_items(kind: Kind, seq: u64) -> Option<usize> {
    match (kind, seq % 500) {
        (Kind::Title, 41) => Some(30),
        (Kind::RichText, 67) => Some(40),
        (Kind::People, 89) => Some(31),
        _ => None,
    }
}

/// A property's value for a page as the page object shows it: relations, titles, rich text
/// and people truncated to [`INLINE_ITEMS`].
pub fn property_value(ws: &Workspace, db: &SimDatabase, page: &SimPage, def: &PropDef) -> Value {
    let mut value = full_property_value(ws, db, page, def);
    if matches!(def.kind, Kind::Title | Kind::RichText | Kind::People)
        && let Some(list) = value.get_mut(def.kind.notion_type()).and_then(Value::as_array_mut)
    {
        list.truncate(INLINE_ITEMS);
    }
    value
}

/// A property's complete value (relations still as the page object shows them: their full list
/// is [`relation_targets`]).
pub fn full_property_value(ws: &Workspace, db: &SimDatabase, page: &SimPage, def: &PropDef) -> Value {
    let mut rng = Rng::new(&[ws.seed, db.index, page.seq, u64::from(page.version), def.salt, 0x7A]);
    let seq = page.seq;
    let ty = def.kind.notion_type();
    let value = match def.kind {
        Kind::Title => {
            let mut parts = vec![rich_text(&format!("Task {} — v{}", seq + 1, page.version))];
            for k in 1..long_value_items(Kind::Title, seq).unwrap_or(1) {
                parts.push(rich_text(&format!(" · part {k}")));
            }
            Value::Array(parts)
        }
        Kind::RichText => {
            let n = long_value_items(Kind::RichText, seq).map_or_else(|| rng.below(3), |n| n as u64);
            json!(
                (0..n)
                    .map(|k| rich_text(&format!("note {k} for “{}” 'quoted' \\ \"x\"", seq)))
                    .collect::<Vec<_>>()
            )
        }
        Kind::Number => {
            if rng.below(10) == 0 {
                Value::Null
            } else {
                json!((rng.below(100_000) as f64) / 100.0)
            }
        }
        Kind::Select | Kind::Status => {
            let opts: &[(&str, &str)] = if def.kind == Kind::Status { &STATUSES } else { &OPTIONS };
            if def.kind == Kind::Select && rng.below(8) == 0 {
                Value::Null
            } else {
                let (n, c) = opts[rng.below(opts.len() as u64) as usize];
                option(n, c)
            }
        }
        Kind::MultiSelect => {
            let n = rng.below(4) as usize;
            let start = rng.below(OPTIONS.len() as u64) as usize;
            Value::Array(
                (0..n)
                    .map(|k| {
                        let (n, c) = OPTIONS[(start + k) % OPTIONS.len()];
                        option(n, c)
                    })
                    .collect(),
            )
        }
        Kind::Date => {
            if rng.below(5) == 0 {
                Value::Null
            } else {
                date_value(page.created + rng.below(90) as i64 * 86_400, rng.below(2) == 0)
            }
        }
        Kind::People => match long_value_items(Kind::People, seq) {
            // A big team: the workspace's members, then guests.
            Some(n) => Value::Array(
                (0..n).map(|k| user(ws.users.get(k).copied().unwrap_or_else(|| rng.uuid()))).collect(),
            ),
            None => {
                let n = rng.below(3) as usize;
                Value::Array((0..n).map(|k| user(ws.users[(seq as usize + k) % ws.users.len()])).collect())
            }
        },
        Kind::Relation => {
            let targets = relation_targets(db, page, ws.seed);
            let shown: Vec<Value> = targets.iter().take(INLINE_ITEMS).map(|id| json!({"id": id})).collect();
            return obj([
                ("id", def.id.clone().into()),
                ("type", "relation".into()),
                ("relation", Value::Array(shown)),
                ("has_more", (targets.len() > INLINE_ITEMS).into()),
            ]);
        }
        Kind::Checkbox => json!(rng.below(2) == 0),
        Kind::Url => {
            if rng.below(4) == 0 {
                Value::Null
            } else {
                json!(format!("https://example.com/tasks/{seq}?v={}", page.version))
            }
        }
        Kind::Email => json!(format!("owner{}@example.com", rng.below(50))),
        Kind::Phone => json!(format!("+1-555-{:04}", rng.below(10_000))),
        Kind::FormulaString => json!({"type": "string", "string": format!("T{seq}/{}", rng.below(9))}),
        Kind::FormulaNumber => json!({"type": "number", "number": rng.below(1000)}),
        Kind::FormulaBoolean => json!({"type": "boolean", "boolean": rng.below(2) == 1}),
        Kind::FormulaDate => {
            json!({"type": "date", "date": date_value(page.last_edited + 7 * 86_400, false)})
        }
        Kind::RollupNumber => json!({"type": "number", "number": rng.below(500), "function": "sum"}),
        Kind::RollupDate => obj([
            ("type", "date".into()),
            ("date", date_value(page.created, true)),
            ("function", "latest_date".into()),
        ]),
        Kind::RollupArray => obj([
            ("type", "array".into()),
            ("function", "show_original".into()),
            (
                "array",
                Value::Array((0..rng.below(3)).map(|k| json!({"type": "number", "number": k})).collect()),
            ),
        ]),
        Kind::Files => {
            if rng.below(3) == 0 {
                json!([{"name": format!("spec-{seq}.pdf"), "type": "external",
                        "external": {"url": format!("https://files.example.com/spec-{seq}.pdf")}}])
            } else {
                json!([])
            }
        }
        Kind::CreatedTime => json!(iso(page.created)),
        Kind::CreatedBy => user(page.created_by),
        Kind::LastEditedTime => json!(iso(page.last_edited)),
        Kind::LastEditedBy => user(page.last_edited_by),
        Kind::UniqueId => json!({"prefix": "TASK", "number": seq + 1}),
        Kind::Verification => json!({"state": "unverified", "verified_by": null, "date": null}),
        Kind::Button => json!({}),
        Kind::Place => {
            if rng.below(2) == 0 {
                Value::Null
            } else {
                json!({"lat": 48.85 + (rng.below(100) as f64) / 1000.0, "lon": 2.35, "name": "Office",
                       "address": "1 Rue de Rivoli, Paris", "aws_place_id": null, "google_place_id": null})
            }
        }
    };
    let mut out = Map::new();
    out.insert("id".into(), def.id.clone().into());
    out.insert("type".into(), ty.into());
    out.insert(ty.into(), value);
    Value::Object(out)
}

/// All properties of a page, keyed by name; `only` trims to the given property ids.
pub fn properties(
    ws: &Workspace,
    db: &SimDatabase,
    page: &SimPage,
    only: Option<&[String]>,
) -> Map<String, Value> {
    db.schema
        .iter()
        .filter(|def| only.is_none_or(|ids| ids.iter().any(|id| id == &def.id)))
        .map(|def| (def.name.clone(), property_value(ws, db, page, def)))
        .collect()
}

/// Which API version's shape to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    V2022,
    V2025,
    V2026,
}

impl ApiVersion {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "2022-06-28" => Some(ApiVersion::V2022),
            "2025-09-03" => Some(ApiVersion::V2025),
            "2026-03-11" => Some(ApiVersion::V2026),
            _ => None,
        }
    }
}

/// The page object.
pub fn page_object(
    ws: &Workspace,
    db: &SimDatabase,
    page: &SimPage,
    version: ApiVersion,
    only: Option<&[String]>,
) -> Value {
    let parent = match version {
        ApiVersion::V2022 => json!({"type": "database_id", "database_id": db.id}),
        _ => json!({"type": "data_source_id", "data_source_id": db.data_source_id, "database_id": db.id}),
    };
    let mut obj = obj([
        ("object", "page".into()),
        ("id", page.id.to_string().into()),
        ("created_time", iso(page.created).into()),
        ("last_edited_time", iso(page.last_edited).into()),
        ("created_by", user(page.created_by)),
        ("last_edited_by", user(page.last_edited_by)),
        ("cover", Value::Null),
        ("icon", Value::Null),
        ("parent", parent),
        ("archived", page.in_trash.into()),
        ("in_trash", page.in_trash.into()),
        ("is_locked", false.into()),
        ("properties", Value::Object(properties(ws, db, page, only))),
        ("url", format!("https://www.notion.so/Task-{}", page.id.simple()).into()),
        ("public_url", Value::Null),
    ]);
    if version == ApiVersion::V2026
        && let Some(map) = obj.as_object_mut()
    {
        map.insert("is_archived".into(), page.in_trash.into());
    }
    obj
}

/// The page object as JSON bytes.
pub fn page_json(
    ws: &Workspace,
    db: &SimDatabase,
    page: &SimPage,
    version: ApiVersion,
    only: Option<&[String]>,
) -> Vec<u8> {
    serde_json::to_vec(&page_object(ws, db, page, version, only)).unwrap_or_default()
}
