//! The Notion endpoints, each answering with Notion's object shapes for the requested version.

use std::hash::{DefaultHasher, Hash, Hasher};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use uuid::Uuid;

use super::data::{self, ApiVersion, Kind, SimDatabase, Workspace};
use super::query::{self, Filter, Sort};
use super::server::{ApiError, Call, CursorKind, Route, notion_error};

/// Serialises into one pre-sized buffer (query responses are ~0.5 MB).
fn ok(v: Value) -> Response {
    let mut body = Vec::with_capacity(1 << 20);
    if let Err(e) = serde_json::to_writer(&mut body, &v) {
        return notion_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_server_error", e.to_string());
    }
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "validation_error", message)
}

fn not_found(kind: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "object_not_found",
        format!(
            "Could not find {kind} with ID: {id}. Make sure the relevant pages and databases are shared with your integration."
        ),
    )
}

fn invalid_url() -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_url", "Invalid request URL.")
}

fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        bad(format!("path failed validation: path.{what} should be a valid uuid, instead was `\"{raw}\"`."))
    })
}

fn parse_body(call: &Call<'_>) -> Result<Value, ApiError> {
    if call.body.is_empty() {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(call.body)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", "Error parsing JSON body."))?;
    if !v.is_object() {
        return Err(bad("body failed validation: body should be an object."));
    }
    Ok(v)
}

fn page_size(body: &Value) -> Result<usize, ApiError> {
    match body.get("page_size") {
        None | Some(Value::Null) => Ok(100),
        Some(v) => match v.as_u64() {
            Some(n @ 1..=100) => Ok(n as usize),
            _ => Err(bad(format!(
                "body failed validation: body.page_size should be a number between 1 and 100, instead was `{v}`."
            ))),
        },
    }
}

fn start_cursor(body: &Value) -> Result<Option<String>, ApiError> {
    match body.get("start_cursor") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad("body failed validation: body.start_cursor should be a string.")),
    }
}

/// The query string of a GET endpoint.
struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    fn of(call: &Call<'_>) -> Self {
        Self(
            url::form_urlencoded::parse(call.query.unwrap_or_default().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    /// `page_size`: 1–100, 100 when absent.
    fn page_size(&self) -> Result<usize, ApiError> {
        match self.get("page_size") {
            None => Ok(100),
            Some(s) => match s.parse::<usize>() {
                Ok(n @ 1..=100) => Ok(n),
                _ => Err(bad(format!(
                    "query failed validation: query.page_size should be a number between 1 and 100, instead was `{s}`."
                ))),
            },
        }
    }

    /// The offset an offset cursor of `scope` stands for (0 without a cursor).
    fn offset(&self, call: &Call<'_>, scope: &str) -> Result<usize, ApiError> {
        match self.get("start_cursor") {
            None => Ok(0),
            Some(c) => match call.state.cursor(&c) {
                Some(CursorKind::Offset { scope: s, offset }) if s == scope => Ok(offset),
                _ => Err(invalid_cursor()),
            },
        }
    }
}

fn invalid_cursor() -> ApiError {
    bad("The start_cursor provided is invalid.")
}

fn list(results: Vec<Value>, next_cursor: Option<String>, kind: &str) -> Value {
    let mut map = serde_json::Map::new();
    map.insert("object".into(), "list".into());
    map.insert("has_more".into(), next_cursor.is_some().into());
    map.insert("next_cursor".into(), next_cursor.map(Value::from).unwrap_or(Value::Null));
    map.insert("results".into(), Value::Array(results));
    map.insert("type".into(), kind.into());
    map.insert(kind.into(), json!({}));
    Value::Object(map)
}

fn title(text: &str) -> Value {
    json!([data::rich_text(text)])
}

pub fn dispatch(call: &Call<'_>, route: &Route) -> Response {
    let result = match route {
        Route::RetrieveDatabase(id) => retrieve_database(call, id),
        Route::QueryDatabase(id) => {
            if call.version != ApiVersion::V2022 {
                // From 2025-09-03 rows are read through the database's data source.
                Err(invalid_url())
            } else {
                query_rows(call, id, true)
            }
        }
        Route::RetrieveDataSource(id) | Route::QueryDataSource(id) if call.version == ApiVersion::V2022 => {
            let _ = id;
            Err(invalid_url())
        }
        Route::RetrieveDataSource(id) => retrieve_data_source(call, id),
        Route::QueryDataSource(id) => query_rows(call, id, false),
        Route::RetrievePage(id) => retrieve_page(call, id),
        Route::PageProperty(id, prop) => page_property(call, id, prop),
        Route::BlockChildren(id) => block_children(call, id),
        Route::Search => search(call),
        Route::Users => users(call),
        Route::Comments => comments(call),
        Route::Unknown => Err(invalid_url()),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn schema(db: &SimDatabase) -> Value {
    Value::Object(db.schema.iter().map(|d| (d.name.clone(), data::schema_entry(db, d))).collect())
}

fn database_object(db: &SimDatabase, version: ApiVersion) -> Value {
    let mut v = json!({
        "object": "database",
        "id": db.id,
        "title": title(&db.title),
        "description": [],
        "parent": {"type": "workspace", "workspace": true},
        "is_inline": false,
        "in_trash": false,
        "archived": false,
        "is_locked": false,
        "created_time": data::iso(db.created),
        "last_edited_time": data::iso(db.created),
        "icon": null,
        "cover": null,
        "url": format!("https://www.notion.so/{}", db.id.simple()),
        "public_url": null,
    });
    if let Some(map) = v.as_object_mut() {
        if version == ApiVersion::V2022 {
            map.insert("properties".into(), schema(db));
        } else {
            map.insert("data_sources".into(), json!([{"id": db.data_source_id, "name": db.title}]));
        }
    }
    v
}

fn retrieve_database(call: &Call<'_>, raw: &str) -> Result<Response, ApiError> {
    let id = parse_id(raw, "database_id")?;
    let ws = call.state.read();
    let db = ws.database(&id).ok_or_else(|| not_found("database", raw))?;
    Ok(ok(database_object(db, call.version)))
}

fn retrieve_data_source(call: &Call<'_>, raw: &str) -> Result<Response, ApiError> {
    let id = parse_id(raw, "data_source_id")?;
    let ws = call.state.read();
    let db = ws.database_by_source(&id).ok_or_else(|| not_found("data_source", raw))?;
    Ok(ok(json!({
        "object": "data_source",
        "id": db.data_source_id,
        "title": title(&db.title),
        "description": [],
        "parent": {"type": "database_id", "database_id": db.id},
        "database_parent": {"type": "workspace", "workspace": true},
        "is_inline": false,
        "in_trash": false,
        "archived": false,
        "created_time": data::iso(db.created),
        "last_edited_time": data::iso(db.created),
        "created_by": {"object": "user", "id": ws.users[0]},
        "last_edited_by": {"object": "user", "id": ws.users[0]},
        "properties": schema(db),
        "icon": null,
        "cover": null,
        "url": format!("https://www.notion.so/{}", db.data_source_id.simple()),
        "public_url": null,
    })))
}

/// `filter_properties=<id>` query parameters, repeated.
fn filter_properties(query: Option<&str>) -> Option<Vec<String>> {
    let ids: Vec<String> = url::form_urlencoded::parse(query?.as_bytes())
        .filter(|(k, _)| k == "filter_properties" || k == "filter_properties[]")
        .map(|(_, v)| v.into_owned())
        .collect();
    (!ids.is_empty()).then_some(ids)
}

fn query_rows(call: &Call<'_>, raw: &str, legacy: bool) -> Result<Response, ApiError> {
    let id = parse_id(raw, if legacy { "database_id" } else { "data_source_id" })?;
    let body = parse_body(call)?;
    let size = page_size(&body)?;
    let filter = body.get("filter").map(|f| Filter::parse(f, 0)).transpose().map_err(|e| bad(e.0))?;
    let sort = Sort::parse(body.get("sorts")).map_err(|e| bad(e.0))?;
    let mut hasher = DefaultHasher::new();
    body.get("filter").map(Value::to_string).hash(&mut hasher);
    sort.hash(&mut hasher);
    let fingerprint = hasher.finish();

    let ws = call.state.read();
    let db = if legacy { ws.database(&id) } else { ws.database_by_source(&id) };
    let db = db.ok_or_else(|| not_found(if legacy { "database" } else { "data_source" }, raw))?;
    let offset_mode = call.state.runtime().offset_cursors;
    let mut after = None;
    let mut offset = 0;
    if let Some(c) = start_cursor(&body)? {
        match call.state.cursor(&c) {
            Some(CursorKind::Query { data_source, fingerprint: fp, after: a })
                if data_source == db.data_source_id && fp == fingerprint =>
            {
                after = Some(a)
            }
            Some(CursorKind::QueryOffset { data_source, fingerprint: fp, offset: o })
                if data_source == db.data_source_id && fp == fingerprint =>
            {
                offset = o
            }
            _ => return Err(invalid_cursor()),
        }
    }
    let only = filter_properties(call.query);
    // A keyset cursor issued before offset mode was switched on continues as a keyset walk.
    let (indices, next) = if (offset_mode && after.is_none()) || offset > 0 {
        let (indices, more) = query::select_offset(db, filter.as_ref(), sort, offset, size);
        let next = more.then(|| {
            call.state.new_cursor(CursorKind::QueryOffset {
                data_source: db.data_source_id,
                fingerprint,
                offset: offset + indices.len(),
            })
        });
        (indices, next)
    } else {
        let selection = query::select(db, filter.as_ref(), sort, after, size);
        let next = selection.next_after.map(|after| {
            call.state.new_cursor(CursorKind::Query { data_source: db.data_source_id, fingerprint, after })
        });
        (selection.indices, next)
    };
    // Assembled from per-page bytes: the shape `list` produces, without one big value tree.
    let pages: Vec<_> = indices
        .iter()
        .map(|&i| data::page_json(&ws, db, &db.pages[i], call.version, only.as_deref()))
        .collect();
    let mut body = Vec::with_capacity(pages.iter().map(|p| p.len() + 1).sum::<usize>() + 256);
    body.extend_from_slice(br#"{"object":"list","results":["#);
    for (i, page) in pages.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(page);
    }
    let tail = json!({"next_cursor": next, "has_more": next.is_some(), "type": "page_or_data_source",
                      "page_or_data_source": {}});
    body.extend_from_slice(b"],");
    let tail = serde_json::to_vec(&tail).unwrap_or_default();
    body.extend_from_slice(tail.get(1..).unwrap_or_default());
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn retrieve_page(call: &Call<'_>, raw: &str) -> Result<Response, ApiError> {
    let id = parse_id(raw, "page_id")?;
    let ws = call.state.read();
    let (db, page) = ws.page(&id).ok_or_else(|| not_found("page", raw))?;
    let only = filter_properties(call.query);
    Ok(ok(data::page_object(&ws, db, page, call.version, only.as_deref())))
}

fn page_property(call: &Call<'_>, raw: &str, raw_prop: &str) -> Result<Response, ApiError> {
    let id = parse_id(raw, "page_id")?;
    let ws = call.state.read();
    let (db, page) = ws.page(&id).ok_or_else(|| not_found("page", raw))?;
    // Property ids are URL-encoded strings; clients may encode them once more.
    let decoded = percent_decode(raw_prop);
    let def = db
        .schema
        .iter()
        .find(|d| d.id == raw_prop || d.id == decoded || percent_decode(&d.id) == decoded)
        .ok_or_else(|| not_found("property", raw_prop))?;
    let params = QueryParams::of(call);
    let size = params.page_size()?;
    let ty = def.kind.notion_type();
    let items: Vec<Value> = match def.kind {
        Kind::Relation => data::relation_targets(db, page, ws.seed)
            .into_iter()
            .map(|target| json!({"object": "property_item", "id": def.id, "type": "relation", "relation": {"id": target}}))
            .collect(),
        Kind::Title | Kind::RichText | Kind::People => {
            let value = data::full_property_value(&ws, db, page, def);
            value
                .get(ty)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|v| json!({"object": "property_item", "id": def.id, "type": ty, ty: v}))
                .collect()
        }
        _ => {
            let mut value = data::property_value(&ws, db, page, def);
            if let Some(map) = value.as_object_mut() {
                map.insert("object".into(), "property_item".into());
            }
            return Ok(ok(value));
        }
    };
    let scope = format!("prop:{id}:{}", def.id);
    let offset = params.offset(call, &scope)?;
    let end = (offset + size).min(items.len());
    let next = (end < items.len()).then(|| call.state.new_cursor(CursorKind::Offset { scope, offset: end }));
    let next_url = next
        .as_ref()
        .map(|c| format!("https://api.notion.com/v1/pages/{id}/properties/{}?start_cursor={c}", def.id));
    let mut v =
        list(items.get(offset..end).map(<[Value]>::to_vec).unwrap_or_default(), next, "property_item");
    if let Some(map) = v.as_object_mut() {
        map.insert("property_item".into(), json!({"id": def.id, "next_url": next_url, "type": ty, ty: {}}));
    }
    Ok(ok(v))
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}

/// `GET /v1/blocks/{id}/children`: a page's top-level blocks, or a block's children, in order;
/// `page_size` (1–100, default 100) at a time, `start_cursor` being the id of the first block
/// to return (as Notion's cursors for this endpoint are).
fn block_children(call: &Call<'_>, raw: &str) -> Result<Response, ApiError> {
    use super::blocks::{self, Parent};
    let id = parse_id(raw, "block_id")?;
    let params = QueryParams::of(call);
    let size = params.page_size()?;
    let ws = call.state.read();
    let (db, page, parent) = match ws.page(&id) {
        Some((db, page)) => (db, page, Parent::Page(id)),
        None => {
            let (db, page) = block_page(&ws, id, raw)?;
            (db, page, Parent::Block(id))
        }
    };
    let tree = blocks::tree(ws.seed, &ws.users, db, page);
    let children: &[blocks::Block] = match parent {
        Parent::Page(_) => &tree,
        Parent::Block(id) => &blocks::find(&tree, id).ok_or_else(|| not_found("block", raw))?.children,
    };
    let start = match params.get("start_cursor") {
        None => 0,
        Some(c) => {
            let c = Uuid::parse_str(&c).map_err(|_| invalid_cursor())?;
            children.iter().position(|b| b.id == c).ok_or_else(invalid_cursor)?
        }
    };
    let end = (start + size).min(children.len());
    let results = children[start..end].iter().map(|b| blocks::block_json(b, parent, page)).collect();
    let next = children.get(end).map(|b| b.id.to_string());
    Ok(ok(list(results, next, "block")))
}

/// The database and page a block id names (404 when it names none; whether the page's tree
/// holds that block is the caller's to check).
fn block_page<'w>(
    ws: &'w Workspace,
    id: Uuid,
    raw: &str,
) -> Result<(&'w SimDatabase, &'w data::SimPage), ApiError> {
    let (d, seq, _) = super::blocks::decode(&id).ok_or_else(|| not_found("block", raw))?;
    let db = ws.databases.iter().find(|db| db.index == d).ok_or_else(|| not_found("block", raw))?;
    let page = db.pages.get(seq as usize).ok_or_else(|| not_found("block", raw))?;
    Ok((db, page))
}

/// `GET /v1/comments?block_id=<id>`: a page's comments, oldest first, `page_size` at a time.
/// The generated blocks carry no discussions, so a block's list is empty.
fn comments(call: &Call<'_>) -> Result<Response, ApiError> {
    let params = QueryParams::of(call);
    let size = params.page_size()?;
    let raw = params.get("block_id").ok_or_else(|| {
        bad("query failed validation: query.block_id should be defined, instead was `undefined`.")
    })?;
    let id = Uuid::parse_str(&raw).map_err(|_| {
        bad(format!(
            "query failed validation: query.block_id should be a valid uuid, instead was `\"{raw}\"`."
        ))
    })?;
    let scope = format!("comments:{id}");
    let offset = params.offset(call, &scope)?;
    let ws = call.state.read();
    let all = match ws.page(&id) {
        Some((db, page)) => super::comments::comments(&ws.users, db, page),
        None => {
            let (db, page) = block_page(&ws, id, &raw)?;
            let tree = super::blocks::tree(ws.seed, &ws.users, db, page);
            super::blocks::find(&tree, id).ok_or_else(|| not_found("block", &raw))?;
            Vec::new()
        }
    };
    Ok(offset_list(call, all, offset, size, scope, "comment"))
}

/// `size` items of `all` from `offset`, with an offset cursor of `scope` for the rest.
fn offset_list(
    call: &Call<'_>,
    all: Vec<Value>,
    offset: usize,
    size: usize,
    scope: String,
    kind: &str,
) -> Response {
    let end = (offset + size).min(all.len());
    let next = (end < all.len()).then(|| call.state.new_cursor(CursorKind::Offset { scope, offset: end }));
    ok(list(all.get(offset..end).map(<[Value]>::to_vec).unwrap_or_default(), next, kind))
}

/// `GET /v1/users`: the workspace's people, then the integration's own bot user, `page_size`
/// at a time.
fn users(call: &Call<'_>) -> Result<Response, ApiError> {
    let params = QueryParams::of(call);
    let size = params.page_size()?;
    let offset = params.offset(call, "users")?;
    let ws = call.state.read();
    let mut all: Vec<Value> = ws
        .users
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"object": "user", "id": id, "type": "person", "name": format!("User {}", i + 1),
                   "avatar_url": null, "person": {"email": format!("user{}@example.com", i + 1)}})
        })
        .collect();
    all.push(json!({"object": "user", "id": BOT_USER, "type": "bot", "name": "notion-sim integration",
                    "avatar_url": null, "bot": {}}));
    Ok(offset_list(call, all, offset, size, "users".into(), "user"))
}

/// The integration's bot user, last in `GET /v1/users`.
const BOT_USER: &str = "0b07b07b-0000-4000-8000-000000000001";

fn search(call: &Call<'_>) -> Result<Response, ApiError> {
    let body = parse_body(call)?;
    let size = page_size(&body)?;
    let text = body.get("query").and_then(Value::as_str).unwrap_or_default().to_lowercase();
    let object = body.get("filter").map(|f| {
        let value = f.get("value").and_then(Value::as_str).unwrap_or_default().to_string();
        (f.get("property").and_then(Value::as_str).unwrap_or_default().to_string(), value)
    });
    let want_pages;
    let want_sources;
    match &object {
        None => {
            want_pages = true;
            want_sources = true;
        }
        Some((prop, value)) => {
            let source_word = if call.version == ApiVersion::V2022 { "database" } else { "data_source" };
            if prop != "object" || (value != "page" && value != source_word) {
                return Err(bad(format!(
                    "body failed validation: body.filter.value should be `page` or `{source_word}`, instead was `{value}`."
                )));
            }
            want_pages = value == "page";
            want_sources = !want_pages;
        }
    }
    let ascending = match body.get("sort") {
        None => false,
        Some(s) => {
            if s.get("timestamp").and_then(Value::as_str) != Some("last_edited_time") {
                return Err(bad("body.sort.timestamp should be `last_edited_time`."));
            }
            s.get("direction").and_then(Value::as_str) == Some("ascending")
        }
    };
    let ws = call.state.read();
    // (last_edited, kind, db index, page index) for every hit
    let mut hits: Vec<(i64, u8, usize, usize)> = Vec::new();
    for (d, db) in ws.databases.iter().enumerate() {
        if want_sources && db.title.to_lowercase().contains(&text) {
            hits.push((db.created, 0, d, 0));
        }
        if want_pages {
            for (i, p) in db.pages.iter().enumerate() {
                if p.in_trash {
                    continue;
                }
                if !text.is_empty() && !format!("task {}", p.seq + 1).contains(&text) {
                    continue;
                }
                hits.push((p.last_edited, 1, d, i));
            }
        }
    }
    hits.sort_by(|a, b| if ascending { a.cmp(b) } else { b.cmp(a) });
    let scope = format!("search:{}", body.get("query").map(Value::to_string).unwrap_or_default());
    let offset = match start_cursor(&body)? {
        None => 0,
        Some(c) => match call.state.cursor(&c) {
            Some(CursorKind::Offset { scope: s, offset }) if s == scope => offset,
            _ => return Err(invalid_cursor()),
        },
    };
    let end = (offset + size).min(hits.len());
    let results = hits
        .get(offset..end)
        .unwrap_or_default()
        .iter()
        .map(|&(_, kind, d, i)| render_hit(&ws, kind, d, i, call.version))
        .collect();
    let next = (end < hits.len()).then(|| call.state.new_cursor(CursorKind::Offset { scope, offset: end }));
    Ok(ok(list(results, next, "page_or_data_source")))
}

fn render_hit(ws: &Workspace, kind: u8, d: usize, i: usize, version: ApiVersion) -> Value {
    let db = &ws.databases[d];
    if kind == 1 {
        return data::page_object(ws, db, &db.pages[i], version, None);
    }
    if version == ApiVersion::V2022 {
        database_object(db, version)
    } else {
        json!({"object": "data_source", "id": db.data_source_id, "title": title(&db.title),
               "parent": {"type": "database_id", "database_id": db.id}, "properties": schema(db)})
    }
}
