//! `/_sim/…`: the admin API that tests, benchmarks and the demo use to observe and steer the
//! simulator. It needs no token and is never rate limited.

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::data::{self, ApiVersion, Rng, SimPage, floor_minute};
use super::server::{Fault, Runtime, SimState};

fn ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// An admin API failure, answered as `{"error": "…"}`.
struct AdminError(StatusCode, String);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

fn err(status: StatusCode, message: impl Into<String>) -> AdminError {
    AdminError(status, message.into())
}

fn param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn body<T: for<'de> Deserialize<'de>>(bytes: &Bytes) -> Result<T, AdminError> {
    let raw: &[u8] = if bytes.is_empty() { b"{}" } else { bytes };
    serde_json::from_slice(raw).map_err(|e| err(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))
}

pub fn handle(state: &SimState, method: &Method, path: &str, query: Option<&str>, bytes: &Bytes) -> Response {
    let result = match (method.as_str(), path.trim_end_matches('/')) {
        ("GET", "stats") => Ok(stats(state)),
        ("POST", "stats/reset") => {
            state.reset_stats();
            Ok(ok(json!({"reset": true})))
        }
        ("GET", "requests") => Ok(requests(state, query)),
        ("GET", "info") => Ok(info(state)),
        ("GET", "export") => export(state, query),
        ("POST", "mutate") => body(bytes).and_then(|m| mutate(state, m)),
        ("POST", "webhooks") => body::<WebhookConfig>(bytes).map(|c| {
            let token = c.token.unwrap_or_else(|| format!("secret_sim_{}", Uuid::new_v4().simple()));
            state.set_webhook(c.url, token.clone());
            ok(json!({"verification_token": token}))
        }),
        ("GET", "webhooks") => Ok(match state.webhook_counts() {
            Some((sent, failed)) => ok(json!({"sent": sent, "failed": failed})),
            None => ok(json!({"sent": 0, "failed": 0, "configured": false})),
        }),
        ("POST", "schema") => body(bytes).and_then(|c| change_schema(state, c)),
        ("POST", "faults") => body::<Fault>(bytes).map(|f| {
            state.push_fault(f);
            ok(json!({"queued": true}))
        }),
        ("POST", "invalidate-cursors") => Ok(ok(json!({"invalidated": state.invalidate_cursors()}))),
        ("POST", "config") => body::<RuntimePatch>(bytes).map(|p| {
            let mut r = state.runtime();
            if let Some(v) = p.rate {
                r.rate = v;
            }
            if let Some(v) = p.burst {
                r.burst = v.max(1);
            }
            if let Some(v) = p.latency_ms {
                r.latency_ms = v;
            }
            if let Some(v) = p.jitter_ms {
                r.jitter_ms = v;
            }
            if let Some(v) = p.offset_cursors {
                r.offset_cursors = v;
            }
            r.index_lag_ms = p.index_lag_ms.unwrap_or(r.index_lag_ms);
            if p.index_lag_ms == Some(0) {
                // Turning the lag off lets the index catch up at once.
                state.catch_up_index();
            }
            r.workspace_rate = p.workspace_rate.unwrap_or(r.workspace_rate);
            r.workspace_burst = p.workspace_burst.unwrap_or(r.workspace_burst).max(1);
            r.rejected_spend = p.rejected_spend.unwrap_or(r.rejected_spend);
            let fraction = |v: Option<f64>, old: f64| v.map_or(old, |v| v.clamp(0.0, 1.0));
            r.error_rate = fraction(p.error_rate, r.error_rate);
            r.reset_rate = fraction(p.reset_rate, r.reset_rate);
            r.truncate_rate = fraction(p.truncate_rate, r.truncate_rate);
            r.slow_rate = fraction(p.slow_rate, r.slow_rate);
            r.slow_ms = p.slow_ms.unwrap_or(r.slow_ms);
            state.set_runtime(r);
            ok(json!({"rate": r.rate, "burst": r.burst, "latency_ms": r.latency_ms, "jitter_ms": r.jitter_ms,
                      "offset_cursors": r.offset_cursors, "index_lag_ms": r.index_lag_ms,
                      "workspace_rate": r.workspace_rate, "workspace_burst": r.workspace_burst,
                      "rejected_spend": r.rejected_spend, "error_rate": r.error_rate, "reset_rate": r.reset_rate,
                      "truncate_rate": r.truncate_rate, "slow_rate": r.slow_rate, "slow_ms": r.slow_ms}))
        }),
        ("POST", "revoke") => body::<Revoke>(bytes).and_then(|r| {
            if state.revoke(&r.token) {
                Ok(ok(json!({"revoked": true})))
            } else {
                Err(err(StatusCode::NOT_FOUND, "no such token"))
            }
        }),
        ("POST", "unshare") => body::<Unshare>(bytes).and_then(|u| {
            let ids = {
                let ws = state.read();
                let db = ws
                    .databases
                    .iter()
                    .find(|d| d.id == u.database_id)
                    .ok_or_else(|| err(StatusCode::NOT_FOUND, "no such database"))?;
                vec![db.id.to_string(), db.data_source_id.to_string()]
            };
            state.unshare(ids);
            Ok(ok(json!({"unshared": u.database_id})))
        }),
        _ => Err(err(StatusCode::NOT_FOUND, format!("no admin route {method} /_sim/{path}"))),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

#[derive(Deserialize)]
struct RuntimePatch {
    rate: Option<f64>,
    burst: Option<u32>,
    latency_ms: Option<u64>,
    jitter_ms: Option<u64>,
    offset_cursors: Option<bool>,
    index_lag_ms: Option<u64>,
    workspace_rate: Option<f64>,
    workspace_burst: Option<u32>,
    rejected_spend: Option<bool>,
    error_rate: Option<f64>,
    reset_rate: Option<f64>,
    truncate_rate: Option<f64>,
    slow_rate: Option<f64>,
    slow_ms: Option<u64>,
}

#[derive(Deserialize)]
struct Revoke {
    token: String,
}

#[derive(Deserialize)]
struct Unshare {
    database_id: Uuid,
}

fn stats(state: &SimState) -> Response {
    let stats = state.stats();
    let mut v = serde_json::to_value(&*stats).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        map.insert("uptime_ms".into(), json!(state.started.elapsed().as_millis() as u64));
        let r: Runtime = state.runtime();
        map.insert("rate".into(), json!(r.rate));
        map.insert("burst".into(), json!(r.burst));
    }
    ok(v)
}

fn requests(state: &SimState, query: Option<&str>) -> Response {
    let since: f64 = param(query, "since_ms").and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let stats = state.stats();
    let entries: Vec<&_> = stats.log.iter().filter(|e| e.t_ms >= since).collect();
    ok(json!({"now_ms": state.started.elapsed().as_secs_f64() * 1000.0, "entries": entries}))
}

fn info(state: &SimState) -> Response {
    let ws = state.read();
    let dbs: Vec<Value> = ws
        .databases
        .iter()
        .map(|db| {
            json!({"id": db.id, "data_source_id": db.data_source_id, "title": db.title,
                   "pages": db.pages.len(), "live_pages": db.pages.iter().filter(|p| !p.in_trash).count()})
        })
        .collect();
    ok(json!({"seed": ws.seed, "databases": dbs, "tokens": state.tokens.len()}))
}

/// The ground truth: every page with its id, timestamps, trash flag and properties exactly as a
/// `2025-09-03` page object shows them; with `content=true`, also its block tree (`blocks`, each
/// block as `GET /v1/blocks/{id}/children` lists it, with its own `children`); with
/// `comments=true`, its comments as `GET /v1/comments` lists them.
fn export(state: &SimState, query: Option<&str>) -> Result<Response, AdminError> {
    let only: Option<Uuid> = match param(query, "database_id") {
        None => None,
        Some(s) => {
            Some(Uuid::parse_str(&s).map_err(|_| err(StatusCode::BAD_REQUEST, "database_id is not a UUID"))?)
        }
    };
    let flag = |name: &str| match param(query, name).as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(err(StatusCode::BAD_REQUEST, format!("{name} is true or false"))),
    };
    let (content, with_comments) = (flag("content")?, flag("comments")?);
    let ws = state.read();
    let mut out = Vec::new();
    for db in ws.databases.iter().filter(|d| only.is_none_or(|id| id == d.id)) {
        let pages: Vec<Value> = db
            .pages
            .iter()
            .map(|p| {
                let mut page = data::page_object(&ws, db, p, ApiVersion::V2025, None);
                let properties = complete_by_id(&ws, db, p, page.get_mut("properties").map(Value::take));
                let mut row = data::obj([
                    ("id", p.id.to_string().into()),
                    ("created_time", data::iso(p.created).into()),
                    ("last_edited_time", data::iso(p.last_edited).into()),
                    ("in_trash", p.in_trash.into()),
                    ("archived", p.in_trash.into()),
                    ("properties", properties),
                ]);
                if content {
                    let tree = super::blocks::tree(ws.seed, &ws.users, db, p);
                    row["blocks"] = super::blocks::export_tree(&tree, super::blocks::Parent::Page(p.id), p);
                }
                if with_comments {
                    row["comments"] = Value::Array(super::comments::comments(&ws.users, db, p));
                }
                row
            })
            .collect();
        out.push(data::obj([
            ("id", db.id.to_string().into()),
            ("data_source_id", db.data_source_id.to_string().into()),
            ("title", db.title.clone().into()),
            ("pages", Value::Array(pages)),
        ]));
    }
    if only.is_some() && out.is_empty() {
        return Err(err(StatusCode::NOT_FOUND, "no such database"));
    }
    Ok(ok(data::obj([("databases", Value::Array(out))])))
}

/// The ground truth of a page's properties: keyed by property id (as syncfleet stores them)
/// and complete (relations with every target, titles, rich text and people with every item,
/// not the page object's first 25).
fn complete_by_id(
    ws: &data::Workspace,
    db: &data::SimDatabase,
    page: &data::SimPage,
    props: Option<Value>,
) -> Value {
    let mut out = serde_json::Map::new();
    for (name, mut value) in props.and_then(|v| v.as_object().cloned()).unwrap_or_default() {
        let id = value.get("id").and_then(Value::as_str).map(str::to_string).unwrap_or(name);
        if value.get("type").and_then(Value::as_str) == Some("relation")
            && let Some(map) = value.as_object_mut()
        {
            let all = data::relation_targets(db, page, ws.seed);
            map.insert("relation".into(), Value::Array(all.iter().map(|t| json!({"id": t})).collect()));
            map.insert("has_more".into(), false.into());
        }
        if let Some(def) = db.schema.iter().find(|d| d.id == id)
            && matches!(def.kind, data::Kind::Title | data::Kind::RichText | data::Kind::People)
            && let Some(map) = value.as_object_mut()
        {
            let ty = def.kind.notion_type();
            let full = data::full_property_value(ws, db, page, def);
            if let Some(items) = full.get(ty) {
                map.insert(ty.into(), items.clone());
            }
        }
        out.insert(id, value);
    }
    Value::Object(out)
}

#[derive(Deserialize)]
struct NewProperty {
    name: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct Rename {
    from: String,
    to: String,
}

/// Schema drift, as operators cause it in Notion: `{"database_id"?, "add": [{"name", "type"}],
/// "rename": [{"from", "to"}], "remove": [name]}`. Property ids survive renames; an added
/// property gets a fresh id and values of its own. Page timestamps do not move (Notion does not
/// bump `last_edited_time` for schema changes), so only a full sync sees new values.
#[derive(Deserialize)]
struct SchemaChange {
    database_id: Option<Uuid>,
    #[serde(default)]
    add: Vec<NewProperty>,
    #[serde(default)]
    rename: Vec<Rename>,
    #[serde(default)]
    remove: Vec<String>,
}

/// The index of database `id` (the first database when none is named).
fn database_index(ws: &data::Workspace, id: Option<Uuid>) -> Result<usize, AdminError> {
    match id {
        None => Ok(0),
        Some(id) => ws
            .databases
            .iter()
            .position(|db| db.id == id)
            .ok_or_else(|| err(StatusCode::NOT_FOUND, "no such database")),
    }
}

fn change_schema(state: &SimState, c: SchemaChange) -> Result<Response, AdminError> {
    let mut ws = state.write();
    let d = database_index(&ws, c.database_id)?;
    let db = ws
        .databases
        .get_mut(d)
        .ok_or_else(|| err(StatusCode::NOT_FOUND, "the simulator has no databases"))?;
    for r in &c.rename {
        if db.schema.iter().any(|p| p.name == r.to) {
            return Err(err(StatusCode::BAD_REQUEST, format!("a property is already named {:?}", r.to)));
        }
        let def = db
            .schema
            .iter_mut()
            .find(|p| p.name == r.from)
            .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no property {:?}", r.from)))?;
        def.name = r.to.clone();
    }
    for name in &c.remove {
        let before = db.schema.len();
        db.schema.retain(|p| &p.name != name || p.kind == data::Kind::Title);
        if db.schema.len() == before {
            return Err(err(StatusCode::NOT_FOUND, format!("no removable property {name:?}")));
        }
    }
    let mut added = Vec::new();
    for p in &c.add {
        let kind = data::Kind::from_notion(&p.kind)
            .ok_or_else(|| err(StatusCode::BAD_REQUEST, format!("type {:?} is not simulated", p.kind)))?;
        if db.schema.iter().any(|d| d.name == p.name) {
            return Err(err(StatusCode::BAD_REQUEST, format!("a property is already named {:?}", p.name)));
        }
        let salt = 1000 + db.schema.len() as u64 + added.len() as u64;
        let id = format!("ad%3A{salt}");
        db.schema.push(data::PropDef { id: id.clone(), name: p.name.clone(), kind, salt });
        added.push(json!({"id": id, "name": p.name}));
    }
    Ok(ok(json!({"added": added, "properties": db.schema.len()})))
}

/// `POST /_sim/webhooks`: announce page changes to `url`, signed with `token` (a new random
/// one when absent, returned as `verification_token`).
#[derive(Deserialize)]
struct WebhookConfig {
    url: String,
    token: Option<String>,
}

#[derive(Deserialize, Default)]
struct Mutation {
    database_id: Option<Uuid>,
    #[serde(default)]
    edit: usize,
    #[serde(default)]
    create: usize,
    #[serde(default)]
    trash: usize,
    #[serde(default)]
    restore: usize,
    #[serde(default)]
    edit_ids: Vec<Uuid>,
    /// Content edits: the page's blocks change (every fourth block's text), and so does its
    /// `last_edited_time`; its property values do not.
    #[serde(default)]
    content_edit: usize,
    #[serde(default)]
    content_edit_ids: Vec<Uuid>,
    /// A new comment on each page, stamped with the current minute; the page's
    /// `last_edited_time` does not move (`comments.rs`).
    #[serde(default)]
    comment_add: usize,
    #[serde(default)]
    comment_add_ids: Vec<Uuid>,
    #[serde(default)]
    trash_ids: Vec<Uuid>,
    #[serde(default)]
    restore_ids: Vec<Uuid>,
}

/// Edits, creates, trashes or restores pages. An edit bumps `last_edited_time` to the current
/// minute and changes the page's values, a content edit its blocks; random picks are
/// deterministic per seed and call.
fn mutate(state: &SimState, m: Mutation) -> Result<Response, AdminError> {
    let now = floor_minute(chrono::Utc::now().timestamp());
    let lag = std::time::Duration::from_millis(state.runtime().index_lag_ms);
    let mut ws = state.write();
    ws.mutations += 1;
    let mut rng = Rng::new(&[ws.seed, ws.mutations, 0x3D]);
    let users = ws.users.clone();
    let d = database_index(&ws, m.database_id)?;
    if ws.databases.is_empty() {
        return Err(err(StatusCode::NOT_FOUND, "the simulator has no databases"));
    }
    let pick = |db: &data::SimDatabase, rng: &mut Rng, n: usize, trashed: bool| -> Vec<usize> {
        let pool: Vec<usize> = (0..db.pages.len()).filter(|&i| db.pages[i].in_trash == trashed).collect();
        let mut chosen = std::collections::BTreeSet::new();
        let n = n.min(pool.len());
        while chosen.len() < n {
            chosen.insert(pool[rng.below(pool.len() as u64) as usize]);
        }
        chosen.into_iter().collect()
    };
    let mut edited = Vec::new();
    let mut content_edited = Vec::new();
    let mut commented = Vec::new();
    let mut trashed = Vec::new();
    let mut restored = Vec::new();
    let mut created = Vec::new();
    let mut new_index = Vec::new();
    {
        let db = &mut ws.databases[d];
        let by_ids = |db: &data::SimDatabase, ids: &[Uuid]| -> Result<Vec<usize>, AdminError> {
            ids.iter()
                .map(|id| {
                    db.by_id
                        .get(id)
                        .copied()
                        .ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no page {id}")))
                })
                .collect()
        };
        let mut to_edit = by_ids(db, &m.edit_ids)?;
        to_edit.extend(pick(db, &mut rng, m.edit, false));
        let mut to_edit_content = by_ids(db, &m.content_edit_ids)?;
        to_edit_content.extend(pick(db, &mut rng, m.content_edit, false));
        let mut to_comment = by_ids(db, &m.comment_add_ids)?;
        to_comment.extend(pick(db, &mut rng, m.comment_add, false));
        let mut to_trash = by_ids(db, &m.trash_ids)?;
        to_trash.extend(pick(db, &mut rng, m.trash, false));
        let mut to_restore = by_ids(db, &m.restore_ids)?;
        to_restore.extend(pick(db, &mut rng, m.restore, true));
        for (indices, content) in [(to_edit, false), (to_edit_content, true)] {
            for i in indices {
                let p = &mut db.pages[i];
                p.lag_index(lag);
                if content {
                    p.content_version += 1;
                } else {
                    p.version += 1;
                }
                p.last_edited = now.max(p.created);
                p.last_edited_by = users[rng.below(users.len() as u64) as usize];
                if content { content_edited.push(p.id) } else { edited.push(p.id) }
            }
        }
        for i in to_comment {
            let p = &mut db.pages[i];
            p.comments_added.push(now.max(p.created));
            commented.push(p.id);
        }
        for i in to_trash {
            let p = &mut db.pages[i];
            p.lag_index(lag);
            p.in_trash = true;
            p.last_edited = now.max(p.created);
            trashed.push(p.id);
        }
        for i in to_restore {
            let p = &mut db.pages[i];
            p.lag_index(lag);
            p.in_trash = false;
            p.last_edited = now.max(p.created);
            restored.push(p.id);
        }
        for _ in 0..m.create {
            let seq = db.pages.len() as u64;
            let page = SimPage {
                id: rng.uuid(),
                seq,
                created: now,
                last_edited: now,
                version: 0,
                content_version: 0,
                comments_added: Vec::new(),
                in_trash: false,
                created_by: users[rng.below(users.len() as u64) as usize],
                last_edited_by: users[rng.below(users.len() as u64) as usize],
                // A new page is not in the index at all until the lag has passed.
                indexed: (!lag.is_zero()).then(|| crate::sim::data::Indexed {
                    last_edited: now,
                    in_trash: true,
                    until: std::time::Instant::now() + lag,
                }),
            };
            db.by_id.insert(page.id, db.pages.len());
            created.push(page.id);
            new_index.push(page.id);
            db.pages.push(page);
        }
    }
    for id in new_index {
        ws.page_index.insert(id, d);
    }
    let (database, data_source) = (ws.databases[d].id, ws.databases[d].data_source_id);
    let author = users.first().copied().unwrap_or_default();
    drop(ws);
    let event = |kind, page| super::webhook::page_event(kind, page, database, data_source, author);
    let mut events: Vec<Value> = created.iter().map(|p| event("page.created", *p)).collect();
    events.extend(edited.iter().map(|p| event("page.properties_updated", *p)));
    events.extend(content_edited.iter().map(|p| event("page.content_updated", *p)));
    events.extend(trashed.iter().map(|p| event("page.deleted", *p)));
    events.extend(restored.iter().map(|p| event("page.undeleted", *p)));
    state.announce(events);
    Ok(ok(
        json!({"edited": edited, "content_edited": content_edited, "commented": commented, "created": created, "trashed": trashed, "restored": restored}),
    ))
}
