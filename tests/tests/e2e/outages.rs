//! Servers that go away under a running fleet, on private instances of their own: the
//! scheduler keeps publishing after a RabbitMQ restart, and after a PostgreSQL outage longer
//! than every retry tier no run is left `running`.

use std::time::Duration;

use nix::sys::signal::Signal;
use sea_orm::ConnectionTrait;
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::{Servers, TestEnv, free_port, http_get, metric_value};
use syncfleet_tests::private::{PrivatePostgres, PrivateRabbit};
use syncfleet_tests::sim::SimConfig;

use crate::exactness::{scalar, until};
use crate::{LONG, SHORT};

const SCHEDULER: [(&str, &str); 4] = [
    ("SYNCFLEET_SCHEDULER__TICK_SECS", "1"),
    ("SYNCFLEET_SCHEDULER__DEFAULT_INTERVAL_SECS", "2"),
    ("SYNCFLEET_SCHEDULER__FULL_EVERY_SECS", "0"),
    ("SYNCFLEET_SCHEDULER__REAP_RUNNING_AFTER_SECS", "6"),
];

#[tokio::test]
async fn after_a_rabbitmq_restart_under_serve_the_next_due_run_is_still_enqueued_and_runs() {
    let rabbit = PrivateRabbit::start().await.expect("private rabbitmq node");
    let sim = SimConfig { pages: 50, rate: 0.0, ..SimConfig::default() };
    let servers = Servers { amqp: Some(rabbit.url()), ..Servers::default() };
    let mut env = TestEnv::start_on(sim, servers).await.expect("env");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    let port = free_port().expect("port");
    env.spawn_producer(&["--metrics-addr", &format!("127.0.0.1:{port}")], &SCHEDULER).expect("serve");
    let worker = env.spawn_worker(1).expect("worker");
    until("a scheduled run to succeed", LONG, || async {
        scalar(&env, "SELECT count(*) FROM sync_runs WHERE status = 'succeeded'").await >= 1
    })
    .await;
    rabbit.restart().await.expect("restart the broker");
    let restarted = chrono::Utc::now();
    // The worker's connection is gone: it exits non-zero so that its supervisor restarts it.
    let code = env.wait_worker_exit(worker, LONG).await.expect("the worker exits");
    assert_ne!(code, Some(0), "a lost broker is an error exit");
    env.spawn_worker(1).expect("a new worker, as a supervisor would start");
    until("a run scheduled after the restart to succeed", LONG, || async {
        scalar(
            &env,
            &format!(
                "SELECT count(*) FROM sync_runs WHERE status = 'succeeded' AND enqueued_at > '{restarted}'"
            ),
        )
        .await
            >= 1
    })
    .await;
    let (status, _) = http_get(port, "/healthz", SHORT).await.expect("healthz");
    assert_eq!(status, 200, "serve stayed alive");
    let (_, metrics) = http_get(port, "/metrics", SHORT).await.expect("metrics");
    let reconnects = metric_value(&metrics, "syncfleet_amqp_reconnects_total").unwrap_or_default();
    assert!(reconnects >= 1.0, "serve reopened its connection: {reconnects}");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn after_postgresql_is_down_longer_than_every_retry_tier_no_run_is_left_running() {
    let pg = PrivatePostgres::start().await.expect("private postgresql");
    let sim = SimConfig { pages: 2000, rate: 5.0, burst: 2, latency_ms: 50, ..SimConfig::default() };
    let servers = Servers { pg_admin: Some(pg.admin_url()), ..Servers::default() };
    let mut env = TestEnv::start_on(sim, servers).await.expect("env");
    let db = env.register("acme", 5.0, 2, 0).await.expect("register");
    let port = free_port().expect("port");
    let on_demand =
        [SCHEDULER[0], ("SYNCFLEET_SCHEDULER__DEFAULT_INTERVAL_SECS", "0"), SCHEDULER[2], SCHEDULER[3]];
    env.spawn_producer(&["--metrics-addr", &format!("127.0.0.1:{port}")], &on_demand).expect("serve");
    let worker = env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, SHORT, |r| r.pages_seen >= 300).await.expect("progress");
    pg.stop().await.expect("stop postgresql");
    // The outage must outlast every retry tier (1 + 2 + 4 s): its length is the point, there is
    // no event to wait for.
    tokio::time::sleep(Duration::from_secs(9)).await;
    // The worker dies during the outage: its run's last word was `running`.
    env.signal_worker(worker, Signal::SIGKILL).expect("kill -9");
    pg.up().await.expect("start postgresql again");
    let reaped = env.wait_run_until(run, LONG, |r| r.status != "running").await.expect("the reaper acts");
    assert_eq!(reaped.status, "abandoned", "{reaped:?}");
    let (status, metrics) = http_get(port, "/metrics", SHORT).await.expect("serve survived the outage");
    assert_eq!(status, 200);
    assert!(metric_value(&metrics, "syncfleet_runs_reaped_total").unwrap_or_default() >= 1.0);
    assert_eq!(http_get(port, "/healthz", SHORT).await.expect("healthz").0, 200);
    // The job's message is still in the queue: a new worker resumes the abandoned run.
    env.spawn_worker(1).expect("a new worker");
    let done = env.wait_run(run, LONG).await.expect("the run resumes");
    assert_eq!(done.status, "succeeded", "{done:?}");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_backend_crash_mid_run_loses_no_page_although_unflushed_commits_are_dropped() {
    let pg = PrivatePostgres::start().await.expect("private postgresql");
    // About ten batches a second, each committed without waiting for the WAL: a crash drops the
    // last few hundred milliseconds of them.
    let sim = SimConfig { pages: 6000, rate: 10.0, burst: 2, ..SimConfig::default() };
    let servers = Servers { pg_admin: Some(pg.admin_url()), ..Servers::default() };
    let mut env = TestEnv::start_on(sim, servers).await.expect("env");
    let db = env.register("acme", 10.0, 2, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, SHORT, |r| r.pages_seen >= 1500).await.expect("progress");
    let started: String = env.scalar("SELECT pg_postmaster_start_time()::text").await;
    // One backend killed: the postmaster stays up, terminates every backend and recovers from
    // the WAL (no restart: pg_postmaster_start_time() does not change).
    let backend: i32 = env
        .scalar(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND pid <> pg_backend_pid() ORDER BY backend_start LIMIT 1",
        )
        .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(backend), Signal::SIGKILL).expect("kill -9 a backend");
    let done = env.wait_run(run, LONG).await.expect("the run ends");
    assert_eq!(done.status, "succeeded", "{done:?}");
    // (The test's own pooled connections were cut too; the pool replaces them as they fail.)
    let deadline = std::time::Instant::now() + SHORT;
    let after = loop {
        let read = env
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT pg_postmaster_start_time()::text",
            ))
            .await;
        if let Ok(Some(row)) = read {
            break row.try_get_by_index::<String>(0).ok();
        }
        assert!(std::time::Instant::now() < deadline, "PostgreSQL does not answer the test again: {read:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(Some(started), after, "a crash recovery, not a restart");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
    drop(pg);
}

#[tokio::test]
async fn an_unconfirmed_publish_whose_message_the_broker_lost_is_published_again_under_its_id_and_runs_once()
{
    let mut env = TestEnv::start(SimConfig { pages: 50, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 30.0, 5, 0).await.expect("register");
    // A run whose publish was sent 40 s ago but never confirmed, and whose message the broker
    // never kept: nothing is in the queue for it.
    let mut job = syncfleet_tests::harness::job("acme", db, SyncMode::Full);
    job.data.reason = syncfleet_shared::job::Reason::Api;
    syncfleet_shared::db::runs::insert_queued(&env.db, &job).await.expect("insert");
    env.execute(&format!(
        "UPDATE sync_runs SET error_kind = 'publish_unconfirmed', error_message = 'RabbitMQ did not confirm', \
             enqueued_at = now() - interval '40 seconds', heartbeat_at = now() - interval '40 seconds' WHERE id = '{}'",
        job.id
    ))
    .await
    .expect("age it");
    let scheduler =
        [SCHEDULER[0], ("SYNCFLEET_SCHEDULER__DEFAULT_INTERVAL_SECS", "0"), SCHEDULER[2], SCHEDULER[3]];
    env.spawn_producer(&[], &scheduler).expect("serve");
    env.spawn_worker(1).expect("worker");
    let done = env.wait_run(job.id, LONG).await.expect("the run is published again and runs");
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(done.reason, "api", "published again as what it was");
    let runs: i64 = env.scalar("SELECT count(*) FROM sync_runs").await;
    assert_eq!(runs, 1, "the same run, not a new one");
    assert!(env.log().contains("Published an unconfirmed job again"), "{}", env.log_tail());
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}
