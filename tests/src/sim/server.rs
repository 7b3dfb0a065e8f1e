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
}

/// A response forced onto the next requests by `/_sim/faults`.
#[derive(Debug, Clone, Deserialize)]
pub struct Fault {
    pub status: u16,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub retry_after: Option<u64>,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Where a cursor continues from. Cursors live only in this process, and expire.
#[derive(Debug, Clone)]
pub enum CursorKind {
    /// Keyset position in a data source query with this filter/sort fingerprint.
    Query { data_source: uuid::Uuid, fingerprint: u64, after: (i64, u64) },
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
    stats: Mutex<Stats>,
    cursors: Mutex<HashMap<String, Cursor>>,
    faults: Mutex<VecDeque<Fault>>,
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
            }),
            workspace: RwLock::new(Workspace::generate(
                config.seed,
                config.databases,
                config.pages,
                chrono::Utc::now(),
            )),
            limiters: Mutex::new(vec![Gcra::new(); config.tokens.len()]),
            stats: Mutex::new(Stats::default()),
            cursors: Mutex::new(HashMap::new()),
            faults: Mutex::new(VecDeque::new()),
        }
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
    Search,
    Users,
    Unknown,
}

impl Route {
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
    if let Some(fault) = state.take_fault() {
        return fault_response(&fault);
    }
    let runtime = state.runtime();
    let limited = {
        let mut limiters = lock(&state.limiters);
        limiters.get_mut(token).map(|g| g.check(arrival, runtime.rate, runtime.burst))
    };
    if let Some(Err(wait)) = limited {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut response = notion_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "You have been rate limited. Please try again in a few minutes.",
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    if runtime.latency_ms > 0 || runtime.jitter_ms > 0 {
        let jitter =
            if runtime.jitter_ms > 0 { rand::rng().random_range(0..=runtime.jitter_ms * 2) } else { 0 };
        let ms = (runtime.latency_ms + jitter).saturating_sub(runtime.jitter_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let call = Call { state, version, query, body };
    api::dispatch(&call, route)
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
    let mut response = notion_error(status, &code, format!("notion-sim injected fault {}", fault.status));
    if let Some(secs) = fault.retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}
