//! The simulator's state, its HTTP server, and the request pipeline every Notion call goes
//! through: identify the token, check the version, authenticate, inject faults, rate limit,
//! add latency, dispatch, record.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use rand::Rng as _;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::data::{ApiVersion, Workspace};
use super::limits::{Gcra, Stats};
use super::{admin, api};

/// How the simulator starts.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub databases: u64,
    pub pages: u64,
    /// Requests per second per token; 0 turns rate limiting off.
    pub rate: f64,
    pub burst: u32,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    /// Accepted bearer tokens; each is its own integration with its own rate limit.
    pub tokens: Vec<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            databases: 1,
            pages: 1000,
            rate: 3.0,
            burst: 3,
            latency_ms: 0,
            jitter_ms: 0,
            tokens: vec!["secret_sim_token".into()],
        }
    }
}

/// Settings that `/_sim/config` can change while running.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Runtime {
    pub rate: f64,
    pub burst: u32,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    /// Cursor drift: query cursors are offsets into the current result list instead of keyset
    /// positions, as nothing in Notion's API promises otherwise. A page trashed behind the
    /// cursor shifts the rest (one live page is skipped), a page created behind it is read
    /// twice, an edit can move a page across it.
    #[serde(default)]
    pub offset_cursors: bool,
    /// Index lag: a query sees a page's change (edit, trash, restore, creation) only this long
    /// after it happened. `GET /v1/pages/{id}` is never stale.
    #[serde(default)]
    pub index_lag_ms: u64,
    /// A per-workspace limit shared by every token (0 = off): its 429s say
    /// `additional_data.rate_limit_reason = "workspace_rate_limit"`, and their Retry-After can
    /// exceed a minute.
    #[serde(default)]
    pub workspace_rate: f64,
    #[serde(default)]
    pub workspace_burst: u32,
    /// 429s spend budget too: retrying before Retry-After only pushes admission further out.
    #[serde(default)]
    pub rejected_spend: bool,
    /// Random faults, as fractions of requests (after authentication and the rate limit, so a
    /// faulty answer still spends budget, as Notion's do): a 500/502/503/504, a connection
    /// reset mid-answer, a 200 whose JSON is cut short, or an answer delayed by `slow_ms`.
    #[serde(default)]
    pub error_rate: f64,
    #[serde(default)]
    pub reset_rate: f64,
    #[serde(default)]
    pub truncate_rate: f64,
    #[serde(default)]
    pub slow_rate: f64,
    #[serde(default)]
    pub slow_ms: u64,
}

/// A response forced onto the next requests by `/_sim/faults`.
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    pub status: u16,
    #[serde(default)]
    pub code: Option<String>,
    /// The `Retry-After` header, sent as given: a number (`2`, `0.5`, `1e20`) or any text, so
    /// tests can send what a hostile or broken server might.
    #[serde(default)]
    pub retry_after: Option<serde_json::Value>,
    #[serde(default = "one")]
    pub count: u32,
    /// For a 429: `additional_data.rate_limit_reason` (e.g. `workspace_rate_limit`).
    #[serde(default)]
    pub rate_limit_reason: Option<String>,
}

fn one() -> u32 {
    1
}

/// Where a cursor continues from. Cursors live only in this process, and expire.
#[derive(Debug, Clone)]
pub enum CursorKind {
    /// Keyset position in a data source query with this filter/sort fingerprint.
    Query { data_source: uuid::Uuid, fingerprint: u64, after: (i64, u64) },
    /// Offset into a data source query's current result list (the cursor-drift mode).
    QueryOffset { data_source: uuid::Uuid, fingerprint: u64, offset: usize },
    /// Offset into another listing (search, property items), scoped by a string.
    Offset { scope: String, offset: usize },
}

#[derive(Debug, Clone)]
pub struct Cursor {
    pub kind: CursorKind,
    pub expires: Instant,
}

const CURSOR_TTL: Duration = Duration::from_secs(30 * 60);

pub struct SimState {
    pub started: Instant,
    pub tokens: Vec<String>,
    runtime: Mutex<Runtime>,
    workspace: RwLock<Workspace>,
    limiters: Mutex<Vec<Gcra>>,
    workspace_limiter: Mutex<Gcra>,
    stats: Mutex<Stats>,
    cursors: Mutex<HashMap<String, Cursor>>,
    faults: Mutex<VecDeque<Fault>>,
    /// Tokens revoked by `/_sim/revoke`: answered 401 from then on.
    revoked: Mutex<Vec<usize>>,
    /// Database and data source ids unshared by `/_sim/unshare`: answered 404 from then on.
    unshared: Mutex<Vec<String>>,
    /// Where page changes are announced (`/_sim/webhooks`).
    webhook: Mutex<Option<super::webhook::WebhookTarget>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimState {
    pub fn new(config: &SimConfig) -> Self {
        Self {
            started: Instant::now(),
            tokens: config.tokens.clone(),
            runtime: Mutex::new(Runtime {
                rate: config.rate,
                burst: config.burst.max(1),
                latency_ms: config.latency_ms,
                jitter_ms: config.jitter_ms,
                offset_cursors: false,
                index_lag_ms: 0,
                workspace_rate: 0.0,
                workspace_burst: 1,
                rejected_spend: false,
                error_rate: 0.0,
                reset_rate: 0.0,
                truncate_rate: 0.0,
                slow_rate: 0.0,
                slow_ms: 0,
            }),
            revoked: Mutex::new(Vec::new()),
            unshared: Mutex::new(Vec::new()),
            webhook: Mutex::new(None),
            workspace: RwLock::new(Workspace::generate(
                config.seed,
                config.databases,
                config.pages,
                chrono::Utc::now(),
            )),
            limiters: Mutex::new(vec![Gcra::new(); config.tokens.len()]),
            workspace_limiter: Mutex::new(Gcra::new()),
            stats: Mutex::new(Stats::default()),
            cursors: Mutex::new(HashMap::new()),
            faults: Mutex::new(VecDeque::new()),
        }
    }

    /// Sends webhook deliveries to `url` from now on (the verification request first).
    pub fn set_webhook(&self, url: String, token: String) {
        *lock(&self.webhook) = Some(super::webhook::WebhookTarget::start(url, token));
    }

    /// Announces `events` to the configured receiver, if any.
    pub fn announce(&self, events: Vec<serde_json::Value>) {
        if let Some(target) = lock(&self.webhook).as_ref() {
            events.into_iter().for_each(|e| target.send(e));
        }
    }

    /// `(sent, failed)` webhook deliveries, if a receiver is configured.
    pub fn webhook_counts(&self) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering;
        lock(&self.webhook)
            .as_ref()
            .map(|t| (t.counts.sent.load(Ordering::Relaxed), t.counts.failed.load(Ordering::Relaxed)))
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Workspace> {
        self.workspace.read().unwrap_or_else(|p| p.into_inner())
    }
    pub fn write(&self) -> RwLockWriteGuard<'_, Workspace> {
        self.workspace.write().unwrap_or_else(|p| p.into_inner())
    }
    pub fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }
    pub fn runtime(&self) -> Runtime {
        *lock(&self.runtime)
    }
    pub fn set_runtime(&self, r: Runtime) {
        *lock(&self.runtime) = r;
    }
    pub fn push_fault(&self, f: Fault) {
        lock(&self.faults).push_back(f);
    }
    pub fn invalidate_cursors(&self) -> usize {
        let mut c = lock(&self.cursors);
        let n = c.len();
        c.clear();
        n
    }
    pub fn reset_stats(&self) {
        *lock(&self.stats) = Stats::default();
    }

    /// Stores a cursor and returns its opaque id.
    pub fn new_cursor(&self, kind: CursorKind) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut cursors = lock(&self.cursors);
        if cursors.len() > 200_000 {
            let now = Instant::now();
            cursors.retain(|_, c| c.expires > now);
        }
        cursors.insert(id.clone(), Cursor { kind, expires: Instant::now() + CURSOR_TTL });
        id
    }

    pub fn cursor(&self, id: &str) -> Option<CursorKind> {
        let cursors = lock(&self.cursors);
        let c = cursors.get(id)?;
        (c.expires > Instant::now()).then(|| c.kind.clone())
    }

    /// Revokes a token (by value); returns whether it was known.
    pub fn revoke(&self, token: &str) -> bool {
        let Some(i) = self.tokens.iter().position(|t| t == token) else { return false };
        lock(&self.revoked).push(i);
        true
    }

    /// Drops every lagging index view: queries see every page as it is now.
    pub fn catch_up_index(&self) {
        for db in self.write().databases.iter_mut() {
            for page in db.pages.iter_mut() {
                page.indexed = None;
            }
        }
    }

    /// Stops sharing a database (and its data source) with every integration.
    pub fn unshare(&self, ids: Vec<String>) {
        lock(&self.unshared).extend(ids);
    }

    fn take_fault(&self) -> Option<Fault> {
        let mut faults = lock(&self.faults);
        let front = faults.front_mut()?;
        let fault = front.clone();
        front.count = front.count.saturating_sub(1);
        if front.count == 0 {
            faults.pop_front();
        }
        Some(fault)
    }
}

/// A running simulator.
pub struct SimServer {
    pub addr: SocketAddr,
    pub state: Arc<SimState>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SimServer {
    /// Generates the workspace and serves it on `addr` (`127.0.0.1:0` for a free port).
    pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<Self> {
        let state = Arc::new(SimState::new(&config));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let app = Router::new().fallback(handle).with_state(state.clone());
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned()).await;
        });
        Ok(Self { addr, state, shutdown, task })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    /// Stops serving without waiting (for owners that cannot give the server away).
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Resolves when the server stops (for the binary).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// A Notion-style error, as a value (cheap to return through `Result`).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        notion_error(self.status, self.code, self.message)
    }
}

/// A Notion-style error response.
pub fn notion_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({
        "object": "error",
        "status": status.as_u16(),
        "code": code,
        "message": message.into(),
        "request_id": uuid::Uuid::new_v4(),
    });
    (status, axum::Json(body)).into_response()
}

/// The routes of the Notion API that the simulator serves.
#[derive(Debug, Clone)]
pub enum Route {
    RetrieveDatabase(String),
    QueryDatabase(String),
    RetrieveDataSource(String),
    QueryDataSource(String),
    RetrievePage(String),
    PageProperty(String, String),
    BlockChildren(String),
    Comments,
    Search,
    Users,
    Unknown,
}

impl Route {
    /// The database or data source id the route names, normalised (Notion accepts ids with or
    /// without dashes).
    fn ids(&self) -> Vec<String> {
        match self {
            Route::RetrieveDatabase(id)
            | Route::QueryDatabase(id)
            | Route::RetrieveDataSource(id)
            | Route::QueryDataSource(id) => {
                uuid::Uuid::parse_str(id).map(|u| vec![u.to_string()]).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    fn parse(method: &Method, path: &str) -> Route {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let get = method == Method::GET;
        let post = method == Method::POST;
        match segments.as_slice() {
            ["v1", "databases", id] if get => Route::RetrieveDatabase(id.to_string()),
            ["v1", "databases", id, "query"] if post => Route::QueryDatabase(id.to_string()),
            ["v1", "data_sources", id] if get => Route::RetrieveDataSource(id.to_string()),
            ["v1", "data_sources", id, "query"] if post => Route::QueryDataSource(id.to_string()),
            ["v1", "pages", id] if get => Route::RetrievePage(id.to_string()),
            ["v1", "pages", id, "properties", prop] if get => {
                Route::PageProperty(id.to_string(), prop.to_string())
            }
            ["v1", "blocks", id, "children"] if get => Route::BlockChildren(id.to_string()),
            ["v1", "comments"] if get => Route::Comments,
            ["v1", "search"] if post => Route::Search,
            ["v1", "users"] if get => Route::Users,
            _ => Route::Unknown,
        }
    }

    /// The URL template, used as the stats label.
    pub fn template(&self) -> &'static str {
        match self {
            Route::RetrieveDatabase(_) => "/v1/databases/{database_id}",
            Route::QueryDatabase(_) => "/v1/databases/{database_id}/query",
            Route::RetrieveDataSource(_) => "/v1/data_sources/{data_source_id}",
            Route::QueryDataSource(_) => "/v1/data_sources/{data_source_id}/query",
            Route::RetrievePage(_) => "/v1/pages/{page_id}",
            Route::PageProperty(..) => "/v1/pages/{page_id}/properties/{property_id}",
            Route::BlockChildren(_) => "/v1/blocks/{block_id}/children",
            Route::Comments => "/v1/comments",
            Route::Search => "/v1/search",
            Route::Users => "/v1/users",
            Route::Unknown => "unknown",
        }
    }
}

/// A Notion request after the gatekeeping steps.
pub struct Call<'a> {
    pub state: &'a SimState,
    pub version: ApiVersion,
    pub query: Option<&'a str>,
    pub body: &'a Bytes,
}

async fn handle(
    State(state): State<Arc<SimState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(rest) = uri.path().strip_prefix("/_sim/") {
        return admin::handle(&state, &method, rest, uri.query(), &body);
    }
    let arrival = Instant::now();
    let route = Route::parse(&method, uri.path());
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| state.tokens.iter().position(|known| known == t.trim()));
    let response = gate(&state, &route, token, &headers, arrival, uri.query(), &body).await;
    let status = response.status().as_u16();
    state.stats().record(state.started, arrival, token, route.template(), status);
    response
}

async fn gate(
    state: &SimState,
    route: &Route,
    token: Option<usize>,
    headers: &HeaderMap,
    arrival: Instant,
    query: Option<&str>,
    body: &Bytes,
) -> Response {
    let version = match headers.get("notion-version").and_then(|v| v.to_str().ok()) {
        None => {
            return notion_error(
                StatusCode::BAD_REQUEST,
                "missing_version",
                "Notion-Version header failed validation: Notion-Version header should be defined, instead was `undefined`.",
            );
        }
        Some(v) => match ApiVersion::parse(v) {
            Some(version) => version,
            None => {
                return notion_error(
                    StatusCode::BAD_REQUEST,
                    "validation_error",
                    format!("Notion-Version header failed validation: `{v}` is not a valid Notion-Version."),
                );
            }
        },
    };
    let Some(token) = token else {
        return notion_error(StatusCode::UNAUTHORIZED, "unauthorized", "API token is invalid.");
    };
    if lock(&state.revoked).contains(&token) {
        return notion_error(StatusCode::UNAUTHORIZED, "unauthorized", "API token is invalid.");
    }
    if let Some(fault) = state.take_fault() {
        return fault_response(&fault);
    }
    let runtime = state.runtime();
    let limited = {
        let mut limiters = lock(&state.limiters);
        limiters.get_mut(token).map(|g| g.check(arrival, runtime.rate, runtime.burst, runtime.rejected_spend))
    };
    if let Some(Err(wait)) = limited {
        return rate_limited(wait, "connection_rate_limit");
    }
    let workspace = lock(&state.workspace_limiter).check(
        arrival,
        runtime.workspace_rate,
        runtime.workspace_burst.max(1),
        runtime.rejected_spend,
    );
    if let Err(wait) = workspace {
        return rate_limited(wait, "workspace_rate_limit");
    }
    if runtime.latency_ms > 0 || runtime.jitter_ms > 0 {
        let jitter =
            if runtime.jitter_ms > 0 { rand::rng().random_range(0..=runtime.jitter_ms * 2) } else { 0 };
        let ms = (runtime.latency_ms + jitter).saturating_sub(runtime.jitter_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let named = route_database_ids(state, route);
    if let Some(id) = lock(&state.unshared).iter().find(|id| named.contains(id)).cloned() {
        return notion_error(
            StatusCode::NOT_FOUND,
            "object_not_found",
            format!(
                "Could not find database with ID: {id}. Make sure the relevant pages and databases are shared with your integration."
            ),
        );
    }
    let roll: f64 = rand::rng().random();
    let mut edge = runtime.error_rate;
    if roll < edge {
        let status = [500u16, 502, 503, 504][rand::rng().random_range(0..4)];
        return fault_response(&Fault {
            status,
            code: None,
            retry_after: None,
            count: 1,
            rate_limit_reason: None,
        });
    }
    edge += runtime.reset_rate;
    if roll < edge {
        return reset_response();
    }
    edge += runtime.truncate_rate;
    let truncate = roll < edge;
    edge += runtime.slow_rate;
    if !truncate && roll < edge {
        tokio::time::sleep(Duration::from_millis(runtime.slow_ms)).await;
    }
    let call = Call { state, version, query, body };
    let response = api::dispatch(&call, route);
    if truncate { truncated(response).await } else { response }
}

/// The database and data source ids a request concerns: named in its path, or the database of
/// the page it names.
fn route_database_ids(state: &SimState, route: &Route) -> Vec<String> {
    let mut ids = route.ids();
    if let Route::RetrievePage(page) | Route::PageProperty(page, _) = route
        && let Ok(page) = uuid::Uuid::parse_str(page)
        && let Some((db, _)) = state.read().page(&page)
    {
        ids.push(db.id.to_string());
        ids.push(db.data_source_id.to_string());
    }
    ids
}

/// A connection reset mid-answer: headers and a few bytes, then the body fails and the server
/// drops the connection.
fn reset_response() -> Response {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"object\":\"list\",\"results\":[")),
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "notion-sim: connection reset")),
    ];
    let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The same answer with its JSON cut in half (a proxy that gave up, say).
async fn truncated(response: Response) -> Response {
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else { return reset_response() };
    let half = bytes.slice(..bytes.len() / 2);
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(half))
}

/// A 429 `rate_limited` with an integer Retry-After and the limit that was hit.
fn rate_limited(wait: Duration, reason: &str) -> Response {
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let body = json!({"object": "error", "status": 429, "code": "rate_limited",
        "message": "You have been rate limited. Please try again in a few minutes.",
        "request_id": uuid::Uuid::new_v4().to_string(),
        "additional_data": {"rate_limit_reason": reason}});
    let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

fn fault_response(fault: &Fault) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = fault.code.clone().unwrap_or_else(|| {
        match fault.status {
            429 => "rate_limited",
            529 => "service_overload",
            409 => "conflict_error",
            502 => "bad_gateway",
            503 => "service_unavailable",
            504 => "gateway_timeout",
            401 => "unauthorized",
            403 => "restricted_resource",
            404 => "object_not_found",
            400 => "validation_error",
            _ => "internal_server_error",
        }
        .to_string()
    });
    let mut response = match &fault.rate_limit_reason {
        Some(reason) => {
            let body = json!({"object": "error", "status": fault.status, "code": code,
                "message": format!("notion-sim injected fault {}", fault.status),
                "additional_data": {"rate_limit_reason": reason}});
            (status, axum::Json(body)).into_response()
        }
        None => notion_error(status, &code, format!("notion-sim injected fault {}", fault.status)),
    };
    let retry_after = fault.retry_after.as_ref().map(|v| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    if let Some(text) = retry_after
        && let Ok(v) = HeaderValue::from_str(&text)
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}
