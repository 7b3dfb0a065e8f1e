//! One HTTP request to Notion, with Notion's error bodies mapped to [`NotionError`].

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::NotionError;
use crate::config::NotionSettings;
use crate::metrics::Metrics;

/// The endpoints syncfleet calls; the URL template is the metric and span label (never an id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    RetrieveDatabase,
    RetrieveDataSource,
    QueryDataSource,
    QueryDatabase,
    RetrievePage,
    PageProperty,
    Search,
    Users,
}

impl Endpoint {
    /// Every endpoint, so metric label sets can be zero-initialised.
    pub const ALL: [Endpoint; 8] = [
        Endpoint::RetrieveDatabase,
        Endpoint::RetrieveDataSource,
        Endpoint::QueryDataSource,
        Endpoint::QueryDatabase,
        Endpoint::RetrievePage,
        Endpoint::PageProperty,
        Endpoint::Search,
        Endpoint::Users,
    ];

    pub fn template(self) -> &'static str {
        match self {
            Endpoint::RetrieveDatabase => "/v1/databases/{database_id}",
            Endpoint::RetrieveDataSource => "/v1/data_sources/{data_source_id}",
            Endpoint::QueryDataSource => "/v1/data_sources/{data_source_id}/query",
            Endpoint::QueryDatabase => "/v1/databases/{database_id}/query",
            Endpoint::RetrievePage => "/v1/pages/{page_id}",
            Endpoint::PageProperty => "/v1/pages/{page_id}/properties/{property_id}",
            Endpoint::Search => "/v1/search",
            Endpoint::Users => "/v1/users",
        }
    }

    pub fn method(self) -> Method {
        match self {
            Endpoint::QueryDataSource | Endpoint::QueryDatabase | Endpoint::Search => Method::POST,
            _ => Method::GET,
        }
    }
}

/// A decoded answer plus Notion's clock (`Date` header), which sync watermarks are based on.
#[derive(Debug, Clone)]
pub struct Response<T> {
    pub body: T,
    pub server_time: Option<DateTime<Utc>>,
}

/// A thin, cloneable client. It holds no token: each call is given the integration's token.
/// The process's metrics travel with it.
#[derive(Debug, Clone)]
pub struct NotionClient {
    http: reqwest::Client,
    base_url: String,
    /// `host[:port]` of the base URL, for the `server.address` span attribute.
    server_address: String,
    version: String,
    /// The base URL as errors show it (credentials masked).
    shown_base_url: String,
    /// Longer `Retry-After`s are capped to this.
    max_retry_after: Duration,
    metrics: Arc<Metrics>,
}

#[derive(serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl NotionClient {
    pub fn new(settings: &NotionSettings, metrics: Arc<Metrics>) -> Result<Self, NotionError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)))
            .connect_timeout(Duration::from_secs(settings.timeout_secs.clamp(1, 10)))
            .pool_max_idle_per_host(16)
            .user_agent(concat!("syncfleet/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotionError::Transport {
                base_url: crate::secret::redact_url(&settings.base_url),
                endpoint: "client",
                message: e.to_string(),
            })?;
        let base_url = settings.base_url.trim_end_matches('/').to_string();
        // Credentials in the base URL are refused by settings validation; never echo any.
        let shown_base_url = crate::secret::redact_url(&base_url);
        let server_address = url::Url::parse(&base_url)
            .ok()
            .and_then(|u| {
                u.host_str().map(|h| u.port().map_or_else(|| h.to_string(), |p| format!("{h}:{p}")))
            })
            .unwrap_or_default();
        Ok(Self {
            http,
            server_address,
            shown_base_url,
            base_url,
            version: settings.version.clone(),
            max_retry_after: Duration::from_secs(settings.max_retry_after_secs.max(1)),
            metrics,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `host[:port]` of the base URL, for the `server.address` span attribute.
    pub fn server_address(&self) -> &str {
        &self.server_address
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sends one request. `path` is the concrete path for `endpoint` (ids filled in).
    pub async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        token: &SecretString,
        endpoint: Endpoint,
        path: &str,
        body: Option<&B>,
    ) -> Result<Response<T>, NotionError> {
        let url = format!("{}{}", self.base_url, path);
        let mut request = self
            .http
            .request(endpoint.method(), &url)
            .bearer_auth(token.expose_secret())
            .header("Notion-Version", &self.version);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.transport(endpoint, &e))?;
        let status = response.status();
        let server_time = response
            .headers()
            .get(header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| DateTime::parse_from_rfc2822(v).ok())
            .map(|t| t.with_timezone(&Utc));
        if status == StatusCode::TOO_MANY_REQUESTS || status.as_u16() == 529 {
            let header = response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok());
            let retry_after = retry_after(header, self.max_retry_after);
            // Which limit was hit (a workspace limit pauses every integration of the workspace).
            let body = response.bytes().await.unwrap_or_default();
            let reason = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.pointer("/additional_data/rate_limit_reason")?.as_str().map(truncate));
            return Err(NotionError::RateLimited { status: status.as_u16(), retry_after, reason });
        }
        let bytes = response.bytes().await.map_err(|e| self.transport(endpoint, &e))?;
        if !status.is_success() {
            let parsed: ErrorBody = serde_json::from_slice(&bytes)
                .unwrap_or(ErrorBody { code: String::new(), message: String::new() });
            if status == StatusCode::BAD_REQUEST
                && parsed.code == "validation_error"
                && parsed.message.contains("start_cursor")
            {
                return Err(NotionError::InvalidCursor);
            }
            return Err(NotionError::Api {
                endpoint: endpoint.template(),
                status: status.as_u16(),
                code: if parsed.code.is_empty() { "unknown".into() } else { parsed.code },
                message: truncate(&parsed.message),
            });
        }
        let body = serde_json::from_slice(&bytes)
            .map_err(|e| NotionError::Decode { endpoint: endpoint.template(), message: e.to_string() })?;
        Ok(Response { body, server_time })
    }

    fn transport(&self, endpoint: Endpoint, error: &reqwest::Error) -> NotionError {
        // reqwest's message includes the URL (ids only, never the token); keep the cause.
        let mut message = if error.is_timeout() {
            "timed out".to_string()
        } else if error.is_connect() {
            "connection failed".to_string()
        } else {
            "request failed".to_string()
        };
        let mut source = std::error::Error::source(error);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        NotionError::Transport {
            base_url: self.shown_base_url.clone(),
            endpoint: endpoint.template(),
            message,
        }
    }
}

/// Reads `Retry-After` (integer or fractional seconds; Notion sends integers). Missing, negative
/// or unreadable values mean 1 s; huge ones (`1e20`) are capped at `max` and logged instead of
/// overflowing a `Duration`. HTTP dates are not used by Notion and read as missing.
pub fn retry_after(header: Option<&str>, max: Duration) -> Duration {
    let Some(secs) = header.and_then(|v| v.trim().parse::<f64>().ok()).filter(|s| s.is_finite() && *s >= 0.0)
    else {
        return Duration::from_secs(1);
    };
    if secs > max.as_secs_f64() {
        tracing::warn!(
            retry_after = header.unwrap_or_default(),
            capped_secs = max.as_secs(),
            "Notion sent a Retry-After above the configured maximum; capping it."
        );
        return max;
    }
    Duration::from_secs_f64(secs)
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_never_panics_and_is_capped() {
        let max = Duration::from_secs(300);
        assert_eq!(retry_after(Some("1e20"), max), max);
        assert_eq!(retry_after(Some("inf"), max), Duration::from_secs(1));
        assert_eq!(retry_after(Some("NaN"), max), Duration::from_secs(1));
        assert_eq!(retry_after(Some("-4"), max), Duration::from_secs(1));
        assert_eq!(retry_after(Some("0.25"), max), Duration::from_millis(250));
        assert_eq!(retry_after(Some(" 2 "), max), Duration::from_secs(2));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2026 07:28:00 GMT"), max), Duration::from_secs(1));
        assert_eq!(retry_after(None, max), Duration::from_secs(1));
        assert_eq!(retry_after(Some("301"), max), max);
    }
}
