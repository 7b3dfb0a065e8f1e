//! A Notion session for one integration: every request waits on the rate budget, honours
//! `Retry-After`, and retries transient failures in place with jittered backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::Instrument;

use secrecy::SecretString;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::client::{Endpoint, NotionClient, Response};
use super::error::{FailureClass, NotionError};
use crate::budget::{Admission, CircuitState};
use crate::budget::{Budget, BudgetKey};

/// Requests sent and 429/529s received, for `sync_runs` counters.
#[derive(Debug, Default)]
pub struct RequestStats {
    pub requests: AtomicU64,
    pub rate_limited: AtomicU64,
}

impl RequestStats {
    /// Returns and resets both counters (requests, rate_limited).
    pub fn take(&self) -> (u64, u64) {
        (self.requests.swap(0, Ordering::Relaxed), self.rate_limited.swap(0, Ordering::Relaxed))
    }
}

/// Everything needed to talk to Notion as one integration.
#[derive(Clone)]
pub struct NotionSession {
    client: NotionClient,
    token: SecretString,
    budget: Budget,
    key: BudgetKey,
    /// The integration's workspace budget, when it belongs to a named workspace: every request
    /// also takes a slot there, and a workspace 429 pauses it for every integration.
    workspace: Option<BudgetKey>,
    stats: Arc<RequestStats>,
    max_transient_retries: u32,
    max_rate_wait: Duration,
}

impl std::fmt::Debug for NotionSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NotionSession").field("integration", &self.key.integration).finish_non_exhaustive()
    }
}

impl NotionSession {
    pub fn new(
        client: NotionClient,
        token: SecretString,
        budget: Budget,
        key: BudgetKey,
        settings: &crate::config::NotionSettings,
    ) -> Self {
        Self {
            client,
            token,
            budget,
            key,
            workspace: None,
            stats: Arc::new(RequestStats::default()),
            max_transient_retries: settings.max_transient_retries,
            max_rate_wait: Duration::from_secs(settings.max_rate_wait_secs),
        }
        .observed()
    }

    /// Makes sure the integration's metric label sets exist.
    fn observed(self) -> Self {
        self.client.metrics().observe_integration(&self.key.integration, self.key.rate);
        self
    }

    /// Shares `workspace`'s budget with its other integrations (`rate` 0: no limit of its own,
    /// only the fleet-wide pause a workspace 429 sets).
    pub fn with_workspace(mut self, workspace: Option<&str>, rate: f64, burst: u32) -> Self {
        // The name lands inside a Redis hash tag: braces would split it on a Redis Cluster.
        self.workspace = workspace.filter(|w| !w.is_empty()).map(|w| BudgetKey {
            integration: format!("workspace:{}", w.replace(['{', '}'], "_")),
            rate: if rate > 0.0 { rate } else { 1_000_000.0 },
            burst: burst.max(1),
        });
        self
    }

    pub fn stats(&self) -> &Arc<RequestStats> {
        &self.stats
    }

    pub fn integration(&self) -> &str {
        &self.key.integration
    }

    /// Sends a request under the budget, waiting out rate limits and retrying transient errors.
    /// Each wait is a `budget.acquire` span and each send a `notion.request` HTTP client span.
    pub async fn request<B: Serialize + ?Sized + Sync, T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        path: &str,
        body: Option<&B>,
    ) -> Result<Response<T>, NotionError> {
        let integration = self.key.integration.as_str();
        let metrics = self.client.metrics().clone();
        let mut transient_failures = 0u32;
        let mut delays = crate::retry::delays(Duration::from_millis(250), Duration::from_secs(10));
        let mut rate_waited = Duration::ZERO;
        loop {
            let waiting = Instant::now();
            let acquired = self
                .budget
                .acquire(&self.key)
                .instrument(tracing::info_span!("budget.acquire", integration))
                .await;
            // A Redis blip (restart, failover) is retried in place like any transient failure.
            let admission = match acquired {
                Ok(admission) => admission,
                Err(error) if transient_failures < self.max_transient_retries => {
                    transient_failures += 1;
                    let backoff = delays.next().unwrap_or(Duration::from_secs(1));
                    tracing::warn!(integration, %error, backoff_ms = backoff.as_millis() as u64, "The rate budget in Redis is unavailable; retrying.");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let (factor, report_outcome) = match admission {
                Admission::Granted { factor, report_outcome } => (factor, report_outcome),
                Admission::CircuitOpen(remaining) => {
                    metrics.circuit_open.with_label_values(&[integration]).set(1);
                    return Err(NotionError::CircuitOpen(remaining));
                }
            };
            if let Some(workspace) = &self.workspace {
                match self
                    .budget
                    .acquire(workspace)
                    .instrument(tracing::info_span!("budget.acquire", integration))
                    .await
                {
                    Ok(_) => {}
                    Err(error) if transient_failures < self.max_transient_retries => {
                        transient_failures += 1;
                        let backoff = delays.next().unwrap_or(Duration::from_secs(1));
                        tracing::warn!(integration, %error, "The workspace budget in Redis is unavailable; retrying.");
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            metrics.rate_budget_wait.observe(waiting.elapsed().as_secs_f64());
            metrics.rate_budget_effective.with_label_values(&[integration]).set(self.key.rate * factor);
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!(
                "notion.request",
                otel.kind = "client",
                http.request.method = %endpoint.method(),
                url.template = endpoint.template(),
                server.address = self.client.server_address(),
                http.response.status_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                integration,
            );
            let sent = Instant::now();
            let result = self.client.send(&self.token, endpoint, path, body).instrument(span.clone()).await;
            let status = match &result {
                Ok(_) => Some(200),
                Err(e) => e.http_status(),
            };
            metrics.notion_request(integration, endpoint, status, sent.elapsed());
            if let Some(code) = status {
                span.record("http.response.status_code", code);
            }
            let error = match result {
                Ok(response) => {
                    if report_outcome {
                        self.record_outcome(true).await;
                    }
                    return Ok(response);
                }
                Err(error) => error,
            };
            span.record("error.type", error.kind());
            span.record("otel.status_code", "ERROR");
            if error.trips_circuit() {
                self.record_outcome(false).await;
            }
            match error.class() {
                FailureClass::Rate => {
                    self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    let (retry_after, reason) = match &error {
                        NotionError::RateLimited { retry_after, reason, .. } => {
                            (*retry_after, reason.clone())
                        }
                        _ => (Duration::from_secs(1), None),
                    };
                    // A workspace limit: every integration of the workspace waits, not just this
                    // one, and it is no reason to slow this integration down afterwards.
                    let mut workspace_paused = false;
                    if let (Some(workspace), Some(reason)) = (&self.workspace, &reason)
                        && reason.contains("workspace")
                    {
                        match self.budget.pause(workspace, retry_after).await {
                            Ok(_) => workspace_paused = true,
                            Err(e) => {
                                tracing::warn!(integration, error = %e, "Could not pause the workspace budget in Redis.")
                            }
                        }
                    }
                    rate_waited += retry_after;
                    if rate_waited > self.max_rate_wait {
                        return Err(NotionError::RateWaitExceeded(rate_waited));
                    }
                    tracing::info!(
                        integration,
                        endpoint = endpoint.template(),
                        retry_after_ms = retry_after.as_millis() as u64,
                        reason = reason.as_deref().unwrap_or(""),
                        "Notion rate limited the integration; pausing it."
                    );
                    if workspace_paused {
                        // This integration waits through the workspace budget's pause.
                        continue;
                    }
                    match self.budget.pause(&self.key, retry_after).await {
                        Ok(factor) => metrics
                            .rate_budget_effective
                            .with_label_values(&[integration])
                            .set(self.key.rate * factor),
                        Err(error) => {
                            // The fleet-wide pause could not be recorded: at least this request waits.
                            tracing::warn!(integration, %error, "Could not pause the budget in Redis; waiting locally.");
                            tokio::time::sleep(retry_after).await;
                        }
                    }
                }
                FailureClass::Transient if transient_failures < self.max_transient_retries => {
                    transient_failures += 1;
                    let backoff = delays.next().unwrap_or(Duration::from_secs(1));
                    tracing::warn!(
                        integration,
                        endpoint = endpoint.template(),
                        %error,
                        attempt = transient_failures,
                        backoff_ms = backoff.as_millis() as u64,
                        "Transient Notion failure; retrying in place."
                    );
                    tokio::time::sleep(backoff).await;
                }
                _ => return Err(error),
            }
        }
    }
}

impl NotionSession {
    /// Tells the fleet-wide circuit breaker how a request went; logs and exports transitions.
    /// A breaker that cannot be reached is logged, never fatal: the budget call fails anyway.
    async fn record_outcome(&self, success: bool) {
        let integration = self.key.integration.as_str();
        match self.budget.record_outcome(&self.key, success).await {
            Ok((state, changed)) => {
                let gauge = self.client.metrics().circuit_open.with_label_values(&[integration]);
                gauge.set(i64::from(state == CircuitState::Open));
                match (state, changed) {
                    (CircuitState::Open, true) => tracing::warn!(
                        integration,
                        "Notion keeps failing for this integration; the circuit is open fleet-wide."
                    ),
                    (CircuitState::Closed, true) => {
                        tracing::info!(integration, "Notion answers again; the circuit is closed.")
                    }
                    _ => {}
                }
            }
            Err(e) => tracing::warn!(integration, error = %e, "Could not update the circuit breaker."),
        }
    }
}
