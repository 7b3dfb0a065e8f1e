//! Permanent failures are announced once to a Slack-compatible webhook (a real local HTTP
//! receiver here), de-duplicated per database × error, retried while the webhook is down, and
//! never with the webhook's secret in a log line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use secrecy::SecretString;
use serde_json::Value;
use syncfleet_shared::amqp::{self, Topology};
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::{TestEnv, free_port, http_get, metric_value};
use syncfleet_tests::sim::SimConfig;
use tokio::sync::Mutex;

use crate::exactness::until;
use crate::{LONG, SHORT};

#[derive(Clone, Default)]
pub struct Receiver {
    pub bodies: Arc<Mutex<Vec<Value>>>,
    /// Answers 503 to this many requests first: a webhook that is down.
    down_for: Arc<AtomicU32>,
}

async fn hook(State(r): State<Receiver>, body: axum::Json<Value>) -> StatusCode {
    if r.down_for.load(Ordering::SeqCst) > 0 {
        r.down_for.fetch_sub(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    r.bodies.lock().await.push(body.0);
    StatusCode::OK
}

pub async fn start_receiver(down_for: u32) -> (Receiver, String) {
    let receiver = Receiver { down_for: Arc::new(AtomicU32::new(down_for)), ..Receiver::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app =
        axum::Router::new().route("/services/T0/B0/hook-secret-xyz", post(hook)).with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    (receiver, format!("http://{addr}/services/T0/B0/hook-secret-xyz"))
}

#[tokio::test]
async fn a_revoked_token_is_announced_once_through_a_webhook_that_was_down_and_repeated_invalid_jobs_too() {
    let (receiver, url) = start_receiver(2).await;
    let sim = SimConfig { pages: 30, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    // The token is revoked in Notion: the stored one is no longer accepted (401).
    syncfleet_producer::commands::integration::save(
        &env.settings,
        "acme",
        None,
        Some(100.0),
        Some(10),
        &SecretString::from("secret_revoked_token".to_string()),
    )
    .await
    .expect("save");
    let port = free_port().expect("port");
    env.spawn_worker_with(
        1,
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
        &[("SYNCFLEET_NOTIFY__WEBHOOK_URL", &url)],
    )
    .expect("worker");
    for _ in 0..3 {
        let run = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
        let run = env.wait_run(run, LONG).await.expect("run");
        assert_eq!((run.status.as_str(), run.attempt), ("failed", 1), "permanent at once: {run:?}");
        assert_eq!(run.error_kind.as_deref(), Some("notion_unauthorized"));
    }
    let counter = |outcome: &'static str| async move {
        let (_, text) = http_get(port, "/metrics", SHORT).await.expect("metrics");
        metric_value(&text, &format!("syncfleet_notifications_total{{outcome=\"{outcome}\"}}"))
            .unwrap_or_default()
    };
    until("the notification to be delivered", LONG, || async { receiver.bodies.lock().await.len() == 1 })
        .await;
    until("the duplicates to be counted", SHORT, || async { counter("deduplicated").await == 2.0 }).await;
    until("the send to be counted", SHORT, || async { counter("sent").await == 1.0 }).await;
    {
        let bodies = receiver.bodies.lock().await;
        let text = bodies[0]["text"].as_str().expect("Slack text");
        assert!(text.contains("notion_unauthorized") && text.contains("acme"), "{text}");
        assert!(text.contains(&db.to_string()), "names the database: {text}");
        assert!(text.contains("integration add"), "says what to do: {text}");
        assert!(bodies[0]["blocks"].is_array(), "Slack blocks");
    }
    // Repeated invalid messages: the third within ten minutes is announced.
    let conn = amqp::connect(&env.settings.amqp, "notify-test").await.expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    let topology = Topology::new(&env.settings.amqp);
    for _ in 0..3 {
        channel
            .basic_publish(
                topology.jobs_exchange().as_str().into(),
                amqp::ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                b"{\"not\": \"a job\"}",
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    until("the invalid-job notification", LONG, || async { receiver.bodies.lock().await.len() == 2 }).await;
    let second = receiver.bodies.lock().await[1]["text"].as_str().unwrap_or_default().to_string();
    assert!(second.contains("invalid_job") && second.contains("JSON Schema"), "{second}");
    assert!(!env.log().contains("hook-secret-xyz"), "the webhook's secret stays out of the logs");
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}
