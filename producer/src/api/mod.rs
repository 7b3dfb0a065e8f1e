//! The control-plane HTTP API and status page, served by `syncfleet-producer serve --api-addr`.
//!
//! - `/v1/*` needs `Authorization: Bearer <token>`; tokens come from `api.tokens` and
//!   `api.token_file` and are compared in constant time (as SHA-256 digests, so length leaks
//!   nothing either). Tokens never reach a log line.
//! - `/` is the status page (HTML and script embedded in the binary); it asks for a token once
//!   and keeps it in the browser session.
//! - `/openapi.json` is the OpenAPI 3.1 document, generated from the handlers (utoipa); the
//!   committed copy is `docs/openapi.json`.
//!
//! `/healthz`, `/readyz` and `/metrics` stay on the operations listener, without a token.

mod auth;
use auth::BearerScheme;
mod error;
mod events;
pub mod model;
mod page;
pub mod routes;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use sea_orm::DatabaseConnection;
use syncfleet_shared::Settings;
use syncfleet_shared::redis_pool::RedisPool;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use events::Hub;

use crate::publish::JobPublisher;

/// What every handler reads.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: DatabaseConnection,
    pub publisher: Arc<JobPublisher>,
    pub redis: RedisPool,
    pub hub: Hub,
    pub metrics: Arc<syncfleet_shared::metrics::Metrics>,
    tokens: Arc<auth::Tokens>,
    pub webhook: Arc<webhook::WebhookState>,
    pub notifier: syncfleet_shared::notify::Notifier,
    /// The last `/v1/overview` answer and when it was computed (see `routes::OVERVIEW_TTL`).
    overview: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, axum::body::Bytes)>>>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "syncfleet control plane",
        description = "Trigger and watch Notion → PostgreSQL syncs, manage mirrored databases and read run history.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerScheme),
    security(("bearer" = [])),
    tags((name = "jobs"), (name = "databases"), (name = "runs"), (name = "status"), (name = "webhooks"))
)]
struct ApiDoc;

/// The routes under `/v1` with their OpenAPI document (every route is registered through
/// `routes!`, so none can be served without being documented).
fn api_routes() -> OpenApiRouter<AppState> {
    use utoipa_axum::routes;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::create_job))
        .routes(routes!(routes::get_job))
        .routes(routes!(routes::job_events))
        .routes(routes!(routes::list_databases, routes::create_database))
        .routes(routes!(routes::get_database, routes::update_database))
        .routes(routes!(routes::list_runs))
        .routes(routes!(routes::get_stats))
        .routes(routes!(routes::get_overview))
}

/// Routes whose callers cannot hold a bearer token (Notion signs its webhook deliveries).
fn public_routes() -> OpenApiRouter<AppState> {
    use utoipa_axum::routes;
    OpenApiRouter::new().routes(routes!(webhook::receive))
}

/// The OpenAPI document as served at `/openapi.json` (and committed as `docs/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().merge(public_routes()).split_for_parts().1
}

/// Paths served outside the document: the status page and the document itself.
pub const UNDOCUMENTED_PATHS: [&str; 2] = ["/", "/openapi.json"];

/// The whole application: the documented API behind the token check, plus the page and the
/// document.
pub fn app(state: AppState) -> Router {
    let (api, mut doc) = api_routes().split_for_parts();
    let (public, public_doc) = public_routes().split_for_parts();
    doc.merge(public_doc);
    let doc = Arc::new(doc);
    let api = api.route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_token));
    Router::new()
        .merge(api)
        .merge(public)
        .route("/", axum::routing::get(page::index))
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(routes::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(state.settings.api.max_body_bytes))
        .with_state(state)
}

/// Binds `addr` and serves until `stop` is cancelled; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    settings: &Settings,
    db: DatabaseConnection,
    publisher: Arc<JobPublisher>,
    redis: RedisPool,
    metrics: Arc<syncfleet_shared::metrics::Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let tokens = auth::Tokens::new(&settings.api.all_tokens()?);
    if tokens.is_empty() {
        anyhow::bail!(
            "api.addr is set but no API token is configured: set SYNCFLEET_API__TOKENS or api.token_file"
        );
    }
    let hub = Hub::start(&settings.database.url, db.clone(), stop.clone()).await?;
    let webhook_state = Arc::new(webhook::WebhookState::default());
    let debouncer = webhook::Debouncer {
        db: db.clone(),
        publisher: publisher.clone(),
        state: webhook_state.clone(),
        quiet: std::time::Duration::from_millis(settings.api.webhook_quiet_ms),
        max_wait: std::time::Duration::from_secs(settings.api.webhook_max_wait_secs),
    };
    tokio::spawn(debouncer.run(stop.clone()));
    let notifier = syncfleet_shared::notify::Notifier::new(
        &settings.notify,
        db.clone(),
        redis.clone(),
        &settings.redis.key_prefix,
        metrics.clone(),
    );
    let state = AppState {
        settings: Arc::new(settings.clone()),
        db,
        publisher,
        redis,
        hub,
        metrics,
        tokens: Arc::new(tokens),
        webhook: webhook_state.clone(),
        notifier,
        overview: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for the API on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = app(state);
    tokio::spawn(async move {
        let served =
            axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "The API listener stopped.");
        }
    });
    tracing::info!(addr = %bound, "Serving the API, /openapi.json and the status page.");
    Ok(bound)
}
