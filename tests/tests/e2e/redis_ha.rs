//! Redis beyond one node: a Sentinel-managed primary killed mid-run, and a Redis Cluster that
//! carries every lock, budget and rerun key. Private servers on their own ports.

use serde_json::json;
use syncfleet_shared::config::RedisMode;
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::{Servers, TestEnv, worst_excess};
use syncfleet_tests::private::{PrivateCluster, PrivateSentinel};
use syncfleet_tests::sim::SimConfig;

use crate::exactness::{every_request_served, settle};
use crate::{LONG, SHORT};

const RATE: f64 = 10.0;
const BURST: u32 = 4;

/// The most requests any window held beyond `rate · t`, over every Notion request made.
async fn excess(env: &TestEnv) -> f64 {
    let times: Vec<f64> =
        env.sim_arrivals("/v1/").await.expect("request log").iter().map(|(t, _)| *t).collect();
    worst_excess(&times, RATE)
}

#[tokio::test]
async fn a_sentinel_failover_mid_run_keeps_the_mirror_exact_and_the_budget_within_one_burst() {
    let mut sentinel = PrivateSentinel::start().await.expect("private sentinel deployment");
    let servers =
        Servers { redis: Some(sentinel.url()), redis_mode: RedisMode::Sentinel, ..Servers::default() };
    let sim = SimConfig { pages: 900, rate: RATE, burst: BURST, latency_ms: 20, ..SimConfig::default() };
    let mut env = TestEnv::start_on(sim, servers).await.expect("env");
    let db = env.register("acme", RATE, BURST, 0).await.expect("register");
    // Small pages, so the run spends its time on many requests through the budget.
    let small_pages = [("SYNCFLEET_SYNC__PAGE_SIZE", "10")];
    env.spawn_worker_with(2, &[], &small_pages).expect("worker A");
    env.spawn_worker_with(2, &[], &small_pages).expect("worker B");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, SHORT, |r| r.pages_seen >= 200).await.expect("progress");
    let primary = sentinel.current_primary().await.expect("primary");
    assert_eq!(primary, sentinel.primary_port);
    sentinel.kill_primary().await;
    // Notion changes, and another request arrives, while Redis has no primary.
    env.sim_admin("mutate", json!({"database_id": db, "edit": 20, "create": 5, "trash": 5}))
        .await
        .expect("mutate");
    let second = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue during failover");
    sentinel.wait_failover(SHORT).await.expect("the replica is promoted");
    let done = env.wait_run(run, LONG).await.expect("the run ends");
    assert!(matches!(done.status.as_str(), "succeeded" | "partial"), "{done:?}\n{}", env.log_tail());
    let second = env.wait_run(second, LONG).await.expect("the second job ends");
    assert!(matches!(second.status.as_str(), "succeeded" | "skipped"), "{second:?}");
    settle(&env, LONG).await;
    // Whatever the failover did to the lock, a last incremental pass sees the end state.
    let last = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
    assert_eq!(env.wait_run(last, LONG).await.expect("last").status, "succeeded");
    settle(&env, LONG).await;
    every_request_served(&env).await;
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    let excess = excess(&env).await;
    eprintln!("sentinel failover: {excess:.1} requests above rate·t at most (burst {BURST})");
    let log = env.log();
    assert!(
        log.contains("Redis is unavailable") || log.contains("Renewing the database lock failed"),
        "the failover happened under the fleet's feet: {}",
        env.log_tail()
    );
    assert!(
        excess <= f64::from(2 * BURST),
        "the budget over-admitted by more than one burst through the failover: {excess:.1} requests above rate·t"
    );
    assert!(!log.contains("panicked"), "{}", env.log_tail());
    env.cleanup().await;
}

#[tokio::test]
async fn a_redis_cluster_carries_locks_budgets_and_coalesced_jobs() {
    let cluster = PrivateCluster::start().await.expect("private cluster");
    let servers =
        Servers { redis: Some(cluster.url()), redis_mode: RedisMode::Cluster, ..Servers::default() };
    let sim = SimConfig {
        databases: 2,
        pages: 600,
        rate: RATE,
        burst: BURST,
        latency_ms: 20,
        ..SimConfig::default()
    };
    let mut env = TestEnv::start_on(sim, servers).await.expect("env");
    let a = env.register("acme", RATE, BURST, 0).await.expect("register a");
    let b = env.register("acme", RATE, BURST, 1).await.expect("register b");
    env.spawn_worker(2).expect("worker A");
    env.spawn_worker(2).expect("worker B");
    let mut runs = Vec::new();
    for db in [a, b] {
        runs.push(env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue"));
    }
    // Concurrent requests for a busy database are coalesced through its lock.
    env.wait_run_until(runs[0], SHORT, |r| r.pages_seen >= 100).await.expect("progress");
    for _ in 0..3 {
        runs.push(env.enqueue("acme", a, SyncMode::Incremental).await.expect("enqueue"));
    }
    for run in runs {
        let run = env.wait_run(run, LONG).await.expect("the run ends");
        assert!(matches!(run.status.as_str(), "succeeded" | "skipped"), "{run:?}\n{}", env.log_tail());
    }
    settle(&env, LONG).await;
    every_request_served(&env).await;
    for db in [a, b] {
        let report = env.verify(db).await.expect("verify");
        assert!(report.is_exact(), "{report:?}");
    }
    // The budget shared by both databases' runs held across the cluster's nodes.
    let excess = excess(&env).await;
    eprintln!("cluster: {excess:.1} requests above rate·t at most (burst {BURST})");
    assert!(excess <= f64::from(BURST), "{excess:.1} requests above rate·t");
    let keys: i64 = cluster.key_counts().await.expect("counts").iter().sum();
    assert!(keys >= 1, "the budget's keys live on the cluster");
    let log = env.log();
    assert!(!log.contains("CROSSSLOT") && !log.contains("MOVED"), "{}", env.log_tail());
    assert!(!log.contains("panicked"), "{}", env.log_tail());
    env.cleanup().await;
}
