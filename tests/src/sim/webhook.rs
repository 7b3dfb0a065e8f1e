//! The simulator's webhook sender: like Notion, it first POSTs `{"verification_token": …}` to
//! the configured URL, then one signed event per page change (`X-Notion-Signature`, see
//! `syncfleet_shared::webhook`), in order, from a background task. Deliveries that fail are
//! counted, not retried (tests assert on what arrived).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use uuid::Uuid;

/// A configured receiver.
pub struct WebhookTarget {
    tx: mpsc::UnboundedSender<Value>,
    pub token: String,
    pub counts: Arc<Counts>,
}

/// What the sender did.
#[derive(Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

impl WebhookTarget {
    /// Starts the sender for `url`; the first delivery is the verification request.
    pub fn start(url: String, token: String) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
        let counts = Arc::new(Counts::default());
        let task_counts = counts.clone();
        let key = token.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10)).build();
            let Ok(http) = http else { return };
            let verification = json!({"verification_token": key}).to_string();
            deliver(&http, &url, verification.into_bytes(), None, &task_counts).await;
            while let Some(event) = rx.recv().await {
                let body = event.to_string().into_bytes();
                let signature = syncfleet_shared::webhook::sign(key.as_bytes(), &body);
                deliver(&http, &url, body, signature, &task_counts).await;
            }
        });
        Self { tx, token, counts }
    }

    /// Queues one event.
    pub fn send(&self, event: Value) {
        if self.tx.send(event).is_err() {
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn deliver(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    signature: Option<String>,
    counts: &Counts,
) {
    let mut req = http.post(url).header("content-type", "application/json").body(body);
    if let Some(s) = signature {
        req = req.header("X-Notion-Signature", s);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => counts.sent.fetch_add(1, Ordering::Relaxed),
        _ => counts.failed.fetch_add(1, Ordering::Relaxed),
    };
}

/// A page event as Notion (API version 2025-09-03) shapes it.
pub fn page_event(kind: &str, page: Uuid, database: Uuid, data_source: Uuid, author: Uuid) -> Value {
    json!({
        "id": Uuid::new_v4(),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "workspace_id": "00000000-0000-4000-8000-00000000517e",
        "workspace_name": "notion-sim",
        "subscription_id": "00000000-0000-4000-8000-0000000005b5",
        "integration_id": "00000000-0000-4000-8000-000000001111",
        "type": kind,
        "authors": [{"id": author, "type": "person"}],
        "attempt_number": 1,
        "entity": {"id": page, "type": "page"},
        "data": {"parent": {"id": data_source, "type": "data_source", "database_id": database}}
    })
}

/// A data source event (`data_source.schema_updated`, `data_source.deleted`, …).
pub fn data_source_event(kind: &str, data_source: Uuid, database: Uuid) -> Value {
    json!({
        "id": Uuid::new_v4(),
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "workspace_id": "00000000-0000-4000-8000-00000000517e",
        "subscription_id": "00000000-0000-4000-8000-0000000005b5",
        "integration_id": "00000000-0000-4000-8000-000000001111",
        "type": kind,
        "authors": [],
        "attempt_number": 1,
        "entity": {"id": data_source, "type": "data_source"},
        "data": {"parent": {"id": database, "type": "database"}}
    })
}
