//! Failure classes: transient errors retry (in place, then through a retry tier) and finish;
//! permanent errors fail the run and dead-letter the job; 429s pause and continue.

use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::{TestEnv, free_port, http_get, metric_value};
use syncfleet_tests::sim::SimConfig;

use crate::{LONG, SHORT};

#[tokio::test]
async fn transient_failures_retry_through_a_tier_and_the_run_succeeds() {
    let sim = SimConfig { pages: 300, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    // Five 503s: more than the four retries in place, so the job moves to the 1 s tier (the
    // fifth also opens the circuit for the test's 1 s, which a later tier outlasts).
    env.sim_admin("faults", serde_json::json!({"status": 503, "count": 5})).await.expect("faults");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let row = env.wait_run(run, LONG).await.expect("run ends");
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert!(row.attempt >= 2, "a later attempt came from a retry tier: {row:?}");
    assert!(env.verify(db).await.expect("verify").is_exact());
    assert!(env.log().contains("retrying later"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_rate_limit_pauses_and_the_same_job_continues() {
    let sim = SimConfig { pages: 300, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.sim_admin("faults", serde_json::json!({"status": 429, "retry_after": 1, "count": 1}))
        .await
        .expect("faults");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let row = env.wait_run(run, LONG).await.expect("run ends");
    assert_eq!(row.status, "succeeded");
    assert_eq!(row.attempt, 1, "no retry tier for a 429");
    assert_eq!(row.rate_limited, 1);
    // The 429'd schema read and its repeat, 3 queries, and completing what the page objects cut
    // at 25 items: page 17's 60 relations, page 41's title, page 67's three rich-text values and
    // page 89's people.
    assert_eq!(row.requests, 2 + 3 + 1 + 1 + 3 + 1);
    env.cleanup().await;
}

#[tokio::test]
async fn a_revoked_token_fails_the_run_permanently_and_dead_letters_the_job() {
    let sim = SimConfig { pages: 100, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.sim_admin("faults", serde_json::json!({"status": 401, "count": 1})).await.expect("faults");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let row = env.wait_run(run, LONG).await.expect("run ends");
    assert_eq!(row.status, "failed");
    assert_eq!(row.error_kind.as_deref(), Some("notion_unauthorized"));
    assert_eq!(row.requests, 1, "no retries for a permanent error");
    let dead = env.wait_dead_letters(1, SHORT).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].0.as_deref().unwrap_or_default().contains("notion_unauthorized"));
    env.cleanup().await;
}

#[tokio::test]
async fn consecutive_failures_open_the_circuit_fleet_wide_and_it_closes_after_three_successes() {
    let sim = SimConfig { pages: 300, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    // Five failures open the circuit (1 s in tests); each half-open probe then meets one more.
    env.sim_admin("faults", serde_json::json!({"status": 503, "count": 7})).await.expect("faults");
    let port = free_port().expect("port");
    env.spawn_worker_with(1, &["--metrics-addr", &format!("127.0.0.1:{port}")], &[]).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let series = "syncfleet_circuit_open{integration=\"acme\"}";
    let deadline = std::time::Instant::now() + SHORT;
    loop {
        let (_, text) = http_get(port, "/metrics", SHORT).await.expect("metrics");
        if metric_value(&text, series) == Some(1.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the circuit never opened: {}", env.log_tail());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let row = env.wait_run(run, LONG).await.expect("run ends");
    assert_eq!(row.status, "succeeded", "{row:?}");
    // 5 failures, 2 failed probes, then the schema read, 3 queries and six completions of long
    // values (page 17's relations, 41's title, 67's three rich texts, 89's people): while the
    // circuit was open nothing reached Notion.
    assert_eq!(row.requests, 5 + 2 + 1 + 3 + 6, "{row:?}");
    assert!(row.attempt >= 3, "open-circuit attempts went to the retry tiers: {row:?}");
    let (_, text) = http_get(port, "/metrics", SHORT).await.expect("metrics");
    assert_eq!(metric_value(&text, series), Some(0.0), "closed again after three successes");
    assert!(env.log().contains("the circuit is open fleet-wide"));
    assert!(env.log().contains("the circuit is closed"));
    assert!(env.verify(db).await.expect("verify").is_exact());
    env.cleanup().await;
}
