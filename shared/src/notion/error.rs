//! Notion failures and the class that decides what a sync does about them.

use std::time::Duration;

/// What a sync should do about a failure (see the failure classes in docs/architecture.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// 429/529: wait `Retry-After`, fleet-wide, then continue in the same job.
    Rate,
    /// Connect/timeout, 5xx, 409: retry in place with backoff, then a retry tier.
    Transient,
    /// 400/401/403/404: no retry.
    Permanent,
}

/// A failed Notion request. Never carries the token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotionError {
    /// `reason` is Notion's `additional_data.rate_limit_reason` (which limit was hit), if given.
    #[error("Notion rate limited the request (HTTP {status}), Retry-After {retry_after:?}")]
    RateLimited { status: u16, retry_after: Duration, reason: Option<String> },
    #[error("Notion answered {endpoint} with HTTP {status} {code}: {message}")]
    Api { endpoint: &'static str, status: u16, code: String, message: String },
    #[error("Notion rejected the pagination cursor (cursors are session-scoped)")]
    InvalidCursor,
    #[error("cannot reach Notion at {base_url} ({endpoint}): {message}")]
    Transport { base_url: String, endpoint: &'static str, message: String },
    #[error("Notion's answer to {endpoint} could not be read: {message}")]
    Decode { endpoint: &'static str, message: String },
    #[error("gave up after waiting {0:?} on Retry-After")]
    RateWaitExceeded(Duration),
    #[error("Notion keeps failing for this integration; requests are paused for {0:?} (circuit open)")]
    CircuitOpen(Duration),
    #[error(transparent)]
    Budget(#[from] crate::budget::BudgetError),
}

impl NotionError {
    pub fn class(&self) -> FailureClass {
        match self {
            NotionError::RateLimited { .. } => FailureClass::Rate,
            NotionError::Api { status, .. } => match status {
                409 | 500..=599 => FailureClass::Transient,
                _ => FailureClass::Permanent,
            },
            // Cursors are session-scoped and expire: resume from the checkpoint.
            NotionError::InvalidCursor => FailureClass::Transient,
            NotionError::Transport { .. }
            | NotionError::Decode { .. }
            | NotionError::RateWaitExceeded(_)
            | NotionError::CircuitOpen(_)
            | NotionError::Budget(_) => FailureClass::Transient,
        }
    }

    /// A bounded label for `sync_runs.error_kind` and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            NotionError::RateLimited { .. } => "notion_rate_limited",
            NotionError::Api { status: 401, .. } => "notion_unauthorized",
            NotionError::Api { status: 403, .. } => "notion_forbidden",
            NotionError::Api { status: 404, .. } => "notion_not_found",
            NotionError::Api { status: 400, .. } => "notion_bad_request",
            NotionError::Api { status: 409, .. } => "notion_conflict",
            NotionError::Api { .. } => "notion_server_error",
            NotionError::InvalidCursor => "notion_invalid_cursor",
            NotionError::Transport { .. } => "notion_unreachable",
            NotionError::Decode { .. } => "notion_bad_response",
            NotionError::RateWaitExceeded(_) => "notion_rate_wait_exceeded",
            NotionError::CircuitOpen(_) => "notion_circuit_open",
            NotionError::Budget(_) => "budget_unavailable",
        }
    }

    /// The HTTP status Notion answered with, when it answered at all.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            NotionError::RateLimited { status, .. } | NotionError::Api { status, .. } => Some(*status),
            NotionError::InvalidCursor => Some(400),
            NotionError::Decode { .. } => Some(200),
            _ => None,
        }
    }

    /// Counts against the circuit breaker: Notion (or the path to it) is failing.
    pub fn trips_circuit(&self) -> bool {
        matches!(self, NotionError::Transport { .. } | NotionError::Api { status: 500..=599, .. })
    }
}
