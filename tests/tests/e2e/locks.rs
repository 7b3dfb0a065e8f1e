//! One running sync per database: a burst of jobs coalesces into at most two runs, and a worker
//! paused past its lease cannot overwrite the new holder's data (its writes are fenced off).

use std::time::Duration;

use nix::sys::signal::Signal;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::{TestEnv, free_port, http_get, metric_value};
use syncfleet_tests::sim::SimConfig;

use crate::exactness::settle;
use crate::{LONG, SHORT};

async fn count(env: &TestEnv, sql: &str) -> i64 {
    let row = env
        .db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect("query")
        .expect("row");
    row.try_get("", "n").expect("n")
}

#[tokio::test]
async fn fifty_jobs_for_one_database_give_at_most_two_runs() {
    let sim = SimConfig { pages: 1000, rate: 3.0, burst: 3, latency_ms: 100, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 3.0, 3, 0).await.expect("register");
    env.spawn_worker(4).expect("worker 1");
    env.spawn_worker(4).expect("worker 2");
    let jobs = env.enqueue_many("acme", db, SyncMode::Full, 50).await.expect("enqueue");
    for id in &jobs {
        env.wait_run(*id, LONG).await.expect("every job ends");
    }
    // The coalesced pass runs after the first job; wait for it to finish too.
    settle(&env, SHORT).await;
    let ran =
        count(&env, "SELECT count(*) AS n FROM sync_runs WHERE status IN ('succeeded', 'partial')").await;
    let skipped = count(&env, "SELECT count(*) AS n FROM sync_runs WHERE status = 'skipped'").await;
    assert!((1..=2).contains(&ran), "{ran} runs for 50 jobs (skipped {skipped})");
    assert!(skipped >= 48, "{skipped} skipped");
    assert!(env.verify(db).await.expect("verify").is_exact());
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_paused_past_its_lease_cannot_overwrite_the_new_holder() {
    let sim = SimConfig { pages: 3000, rate: 10.0, burst: 2, latency_ms: 100, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 10.0, 2, 0).await.expect("register");
    let port = free_port().expect("port");
    let first =
        env.spawn_worker_with(1, &["--metrics-addr", &format!("127.0.0.1:{port}")], &[]).expect("worker A");
    let stale = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(stale, SHORT, |r| r.pages_seen >= 500).await.expect("A makes progress");
    env.signal_worker(first, Signal::SIGSTOP).expect("SIGSTOP");
    // Past A's 3 s lease another worker takes the database.
    tokio::time::sleep(Duration::from_secs(4)).await;
    env.spawn_worker(1).expect("worker B");
    let fresh = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
    let started =
        env.wait_run_until(fresh, SHORT, |r| r.status == "running" || r.status == "succeeded").await;
    started.expect("B takes the lock");
    env.signal_worker(first, Signal::SIGCONT).expect("SIGCONT");
    let b = env.wait_run(fresh, LONG).await.expect("B finishes");
    assert_eq!(b.status, "succeeded", "{b:?}");
    let a = env.wait_run(stale, LONG).await.expect("A stands down");
    // Superseded, not failed: B holds the database, and A's full request is handed to it as a
    // rerun (served below, before the comparison).
    assert_eq!(a.status, "skipped", "{a:?}");
    assert!(matches!(a.error_kind.as_deref(), Some("fence_rejected" | "superseded")), "{a:?}");
    // A was stopped mid-request or mid-wait: the response it then read was written with its
    // stale fence, and PostgreSQL refused it.
    let (_, metrics) = http_get(port, "/metrics", SHORT).await.expect("A's metrics");
    let rejected = metric_value(&metrics, "syncfleet_fence_rejected_writes_total").unwrap_or_default();
    assert!(rejected >= 1.0, "A's stale write was counted: {rejected}");
    // Let the coalesced pass settle: it serves A's full request. Then PostgreSQL equals Notion.
    settle(&env, LONG).await;
    crate::exactness::every_request_served(&env).await;
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn after_kill_9_of_the_holder_another_worker_takes_over_after_the_lease_and_finishes() {
    let sim = SimConfig { pages: 3000, rate: 10.0, burst: 2, latency_ms: 50, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 10.0, 2, 0).await.expect("register");
    let holder = env.spawn_worker(1).expect("worker A");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, SHORT, |r| r.pages_seen >= 800).await.expect("A makes progress");
    env.signal_worker(holder, Signal::SIGKILL).expect("kill -9");
    env.spawn_worker(1).expect("worker B");
    let done = env.wait_run(run, LONG).await.expect("B finishes the job");
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(done.attempt >= 2, "B retried until A's lease expired: {done:?}");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    assert!(env.log().contains("Resuming from the run's checkpoint"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_lock_key_or_circuit_key_holding_garbage_is_replaced_and_the_sync_runs() {
    let sim = SimConfig { pages: 150, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    let prefix = env.settings.redis.key_prefix.clone();
    let pool = syncfleet_shared::redis_pool::connect(&env.settings.redis).await.expect("redis");
    let mut conn = pool.get().await.expect("conn");
    // Without an expiry (every syncfleet lock has one) the lock would block the database forever.
    let lock = syncfleet_shared::lock::lock_key(&prefix, &db);
    let _: () = redis::cmd("SET").arg(&lock).arg("garbage").query_async(&mut conn).await.expect("set");
    // A string where the breaker keeps a hash.
    let circuit = format!("{prefix}:{{acme}}:circuit");
    let _: () = redis::cmd("SET").arg(&circuit).arg("garbage").query_async(&mut conn).await.expect("set");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let row = env.wait_run(run, LONG).await.expect("run ends");
    assert_eq!(row.status, "succeeded", "{row:?}");
    assert!(env.log().contains("it was replaced"), "{}", env.log_tail());
    let kind: String = redis::cmd("TYPE").arg(&circuit).query_async(&mut conn).await.expect("type");
    assert_ne!(kind, "string", "the circuit key was reset");
    assert!(env.verify(db).await.expect("verify").is_exact());
    env.cleanup().await;
}
