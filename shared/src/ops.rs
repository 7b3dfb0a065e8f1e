//! The operations listener of each binary: `/metrics` (Prometheus text), `/healthz` (the process
//! answers) and `/readyz` (it is connected and doing its work), on `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Flipped by the binary: ready once connected and consuming/scheduling, not ready while
/// shutting down (so Kubernetes stops routing to it before it exits).
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct OpsState {
    metrics: Arc<Metrics>,
    ready: Readiness,
}

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct OpsError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds `addr` and serves until `stop` is cancelled. Returns the bound address (useful with
/// port 0). Binding fails fast, so a port clash stops the process at start with a clear error.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Readiness,
    stop: CancellationToken,
) -> Result<SocketAddr, OpsError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| OpsError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| OpsError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { metrics, ready });
    tokio::spawn(async move {
        let served =
            axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "The metrics listener stopped.");
        }
    });
    tracing::info!(addr = %bound, "Serving /metrics, /healthz and /readyz.");
    Ok(bound)
}

async fn metrics_handler(State(state): State<OpsState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    if state.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
