//! A full sync from notion-sim through RabbitMQ and worker processes into PostgreSQL.

use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;

use crate::LONG;

#[tokio::test]
async fn two_databases_sync_through_two_worker_processes_and_equal_the_export() {
    let sim = SimConfig { databases: 2, pages: 1500, rate: 20.0, burst: 5, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let a = env.register("acme", 20.0, 5, 0).await.expect("register a");
    let b = env.register("acme", 20.0, 5, 1).await.expect("register b");
    env.spawn_worker(2).expect("worker 1");
    env.spawn_worker(2).expect("worker 2");
    let run_a = env.enqueue("acme", a, SyncMode::Full).await.expect("enqueue a");
    let run_b = env.enqueue("acme", b, SyncMode::Full).await.expect("enqueue b");
    for (run, db) in [(run_a, a), (run_b, b)] {
        let row = env.wait_run(run, LONG).await.expect("run ends");
        assert_eq!(row.status, "succeeded", "{row:?}");
        assert_eq!(row.pages_seen, 1500);
        assert_eq!(row.pages_created, 1500);
        // The schema read, 1500 pages at 100 a request, and completing what the page object
        // cut at 25 items: the relations of pages 17, 517 and 1017 (60 each), the titles of
        // 41, 541 and 1041 (30 parts), the three rich-text properties of 67, 567 and 1067 (40
        // parts) and the people of 89, 589 and 1089 (31).
        assert_eq!(row.requests, 1 + 15 + 3 + 3 + 3 * 3 + 3, "{row:?}");
        let report = env.verify(db).await.expect("verify");
        assert!(report.is_exact(), "{report:?}");
        assert_eq!(report.live_rows, 1500);
    }
    let stats = env.sim_stats().await.expect("stats");
    assert_eq!(stats["rate_limited_total"], 0, "the workers stay under the integration's rate: {stats}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_second_incremental_run_reads_little_and_writes_nothing_and_a_redelivered_job_is_not_rerun() {
    let sim = SimConfig { pages: 400, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(2).expect("worker");
    let full = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(full, LONG).await.expect("full").status, "succeeded");
    let incremental = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
    let row = env.wait_run(incremental, LONG).await.expect("incremental");
    assert_eq!(row.status, "succeeded");
    assert!(row.requests <= 2, "{row:?}");
    assert_eq!(row.pages_created + row.pages_updated, 0, "{row:?}");

    // Publish the already-finished full job again (same id): it is acked without a request.
    let before = env.sim_stats().await.expect("stats")["requests_total"].as_u64().unwrap_or_default();
    let publisher = syncfleet_shared::amqp::Publisher::new(
        &syncfleet_shared::amqp::connect(&env.settings.amqp, "test").await.expect("amqp"),
        &env.settings.amqp,
    )
    .await
    .expect("publisher");
    let mut job = syncfleet_shared::job::JobEnvelope::new(
        "urn:test",
        syncfleet_shared::job::SyncDatabaseJob {
            integration: "acme".into(),
            database_id: db,
            mode: SyncMode::Full,
            priority: Default::default(),
            reason: Default::default(),
        },
    );
    job.id = full;
    publisher
        .publish_job(&job, &syncfleet_shared::amqp::Destination::Work, &Default::default())
        .await
        .expect("publish duplicate");
    // A marker job behind it proves the duplicate was consumed.
    let marker = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
    env.wait_run(marker, LONG).await.expect("marker");
    let after = env.sim_stats().await.expect("stats")["requests_total"].as_u64().unwrap_or_default();
    assert!(after - before <= 2, "only the marker's requests, not a rerun: {before} → {after}");
    assert!(env.log().contains("already finished"), "{}", env.log_tail());
    env.cleanup().await;
}
