//! Failure classes: transient errors retry (in place, then through a retry tier) and finish;
//! permanent errors fail the run and dead-letter the job; 429s pause and continue.

use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;

use crate::LONG;

#[tokio::test]
async fn transient_failures_retry_through_a_tier_and_the_run_succeeds() {
    let sim = SimConfig { pages: 300, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    // Five 503s: more than the four retries in place, so the job moves to the 1 s tier.
    env.sim_admin("faults", serde_json::json!({"status": 503, "count": 5})).await.expect("faults");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let row = env.wait_run(run, LONG).await.expect("run ends");
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert_eq!(row.attempt, 2, "the second attempt came from the retry tier");
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
    assert_eq!(row.requests, 4);
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
    let dead = env.drain_dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].0.as_deref().unwrap_or_default().contains("notion_unauthorized"));
    env.cleanup().await;
}
