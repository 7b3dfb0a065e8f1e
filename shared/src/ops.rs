//! The operations listener of each binary: `/metrics` (Prometheus text), `/healthz` (the
//! process's main loop is alive: liveness) and `/readyz` (it is connected and doing its work),
//! on `--metrics-addr`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// The main loop's heartbeat. `/healthz` fails once it is older than the stale limit, so a
/// wedged process (a stuck loop, a dead connection it never notices) is restarted by its
/// supervisor instead of looking healthy forever.
#[derive(Debug, Clone)]
pub struct Liveness {
    started: Instant,
    last_beat_ms: Arc<AtomicU64>,
    stale: Duration,
}

impl Liveness {
    pub fn new(stale: Duration) -> Self {
        Self { started: Instant::now(), last_beat_ms: Arc::new(AtomicU64::new(0)), stale }
    }

    /// The loop is alive now.
    pub fn beat(&self) {
        self.last_beat_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last beat (since creation before the first one).
    pub fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub fn is_alive(&self) -> bool {
        self.silence() <= self.stale
    }
}

#[derive(Clone)]
struct OpsState {
    metrics: Arc<Metrics>,
    ready: Readiness,
    live: Liveness,
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
    live: Liveness,
    stop: CancellationToken,
) -> Result<SocketAddr, OpsError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| OpsError { addr, source })?;
    let bound = listener.local_addr().map_err(|source| OpsError { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(OpsState { metrics, ready, live });
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

async fn healthz(State(state): State<OpsState>) -> impl IntoResponse {
    if state.live.is_alive() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        let silent = state.live.silence().as_secs();
        (StatusCode::SERVICE_UNAVAILABLE, format!("wedged: main loop silent for {silent}s\n"))
    }
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    if state.ready.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_goes_stale_without_beats() {
        let live = Liveness::new(Duration::ZERO);
        live.beat();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!live.is_alive());
        let live = Liveness::new(Duration::from_secs(60));
        assert!(live.is_alive());
    }
}
