//! The mirror stays exact under interleavings: a full run interrupted while other runs go
//! through, invalid pages, bursts of jobs in every window, a Redis restart, a stale worker,
//! hostile Retry-After values and cursor expiries. Every test ends with PostgreSQL equal to
//! `/_sim/export`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use syncfleet_shared::config::RetryTier;
use syncfleet_shared::job::{JobEnvelope, Priority, Reason, SyncDatabaseJob, SyncMode};
use syncfleet_tests::harness::{Servers, TestEnv, free_port, http_get, metric_value};
use syncfleet_tests::private::PrivateRedis;
use syncfleet_tests::sim::SimConfig;
use uuid::Uuid;

use crate::{LONG, SHORT};

pub async fn scalar(env: &TestEnv, sql: &str) -> i64 {
    let row = env
        .db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .expect("query")
        .expect("row");
    row.try_get_by_index::<i64>(0).expect("a bigint")
}

async fn page_ids(env: &TestEnv, sql: &str) -> Vec<Uuid> {
    let rows = env.db.query_all_raw(Statement::from_string(DbBackend::Postgres, sql)).await.expect("query");
    rows.iter().map(|r| r.try_get_by_index::<Uuid>(0).expect("uuid")).collect()
}

/// Waits until `check` holds, polling; panics after `timeout`.
pub async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until no run is queued, running or retrying and no rerun request is pending (a
/// holder that just finished publishes its coalesced pass right after).
pub async fn settle(env: &TestEnv, timeout: Duration) {
    until("runs to settle", timeout, || async {
        scalar(env, "SELECT count(*) FROM sync_runs WHERE status IN ('queued', 'running', 'retrying')").await
            == 0
            && scalar(env, "SELECT count(*) FROM notion_databases WHERE rerun_mode IS NOT NULL").await == 0
    })
    .await;
}

async fn lock_free(env: &TestEnv, db: Uuid) -> bool {
    let pool = syncfleet_shared::redis_pool::connect(&env.settings.redis).await.expect("redis");
    let mut conn = pool.get().await.expect("conn");
    let key = syncfleet_shared::lock::lock_key(&env.settings.redis.key_prefix, &db);
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await.expect("exists");
    exists == 0
}

async fn queue_depth(env: &TestEnv, queue: &str) -> u32 {
    env.queue_ready(queue).await.expect("queue exists")
}

/// No accepted request is lost: every job recorded `skipped` (coalesced) is served by a run
/// that started after it was published, in a mode at least as strong.
pub async fn every_request_served(env: &TestEnv) {
    let missing = scalar(
        env,
        "SELECT count(*) FROM sync_runs s WHERE s.status = 'skipped' AND NOT EXISTS ( \
             SELECT 1 FROM sync_runs r WHERE r.database_id = s.database_id \
               AND r.status IN ('succeeded', 'partial') AND r.started_at >= s.enqueued_at \
               AND (s.mode = 'incremental' OR r.mode = 'full'))",
    )
    .await;
    assert_eq!(missing, 0, "coalesced requests with no run to serve them");
}

async fn assert_exact(env: &TestEnv, db: Uuid) {
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
}

/// A full run F1 is killed halfway, waits in a long retry tier while `second` runs to the end,
/// then resumes and finishes. Pages F1 had passed must not be marked deleted; pages trashed in
/// Notion beyond its checkpoint must be.
async fn interrupted_full_run_then(second: SyncMode) {
    let sim = SimConfig { pages: 2000, rate: 5.0, burst: 2, latency_ms: 100, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    // The redelivered F1 finds its dead worker's lock and waits here, long enough for `second`.
    env.settings.amqp.retry_tiers = vec![
        RetryTier { name: "long".into(), delay_ms: 25_000 },
        RetryTier { name: "1s".into(), delay_ms: 1000 },
        RetryTier { name: "2s".into(), delay_ms: 2000 },
    ];
    let db = env.register("acme", 5.0, 2, 0).await.expect("register");
    let a = env.spawn_worker(1).expect("worker A");
    let f0 = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue F0");
    assert_eq!(env.wait_run(f0, LONG).await.expect("F0").status, "succeeded");
    let f1 = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue F1");
    env.wait_run_until(f1, LONG, |r| r.pages_seen >= 1000).await.expect("F1 halfway");
    env.signal_worker(a, Signal::SIGKILL).expect("kill -9 A");
    // Pages F1 has passed (the first created) and pages beyond its checkpoint (the last).
    let early = page_ids(
        &env,
        &format!("SELECT page_id FROM notion_pages WHERE database_id = '{db}' ORDER BY created_time, page_id LIMIT 20"),
    )
    .await;
    let late = page_ids(
        &env,
        &format!(
            "SELECT page_id FROM notion_pages WHERE database_id = '{db}' ORDER BY created_time DESC, page_id LIMIT 5"
        ),
    )
    .await;
    env.sim_admin("mutate", json!({"edit_ids": early, "trash_ids": late})).await.expect("mutate");
    env.spawn_worker(1).expect("worker B");
    let tier = syncfleet_shared::amqp::Topology::new(&env.settings.amqp)
        .retry_queue(&env.settings.amqp.retry_tiers[0]);
    until("F1 to wait in the long tier", SHORT, || queue_depth(&env, &tier).map_fut(|n| n == 1)).await;
    until("A's lease to expire", SHORT, || lock_free(&env, db)).await;
    let other = env.enqueue("acme", db, second).await.expect("enqueue the second run");
    let other = env.wait_run(other, LONG).await.expect("the second run");
    assert_eq!(other.status, "succeeded", "{other:?}");
    let f1_row = env.wait_run(f1, LONG).await.expect("F1 resumes and finishes");
    assert_eq!(f1_row.status, "succeeded", "{f1_row:?}");
    assert!(f1_row.started_at < other.started_at, "the second run went through while F1 was interrupted");
    assert!(env.log().contains("Resuming from the run's checkpoint"), "F1 resumed");
    let deleted = scalar(&env, "SELECT count(*) FROM notion_pages WHERE deleted_at IS NOT NULL").await;
    assert_eq!(deleted, 5, "exactly the trashed pages are deleted");
    let unstamped =
        scalar(&env, "SELECT count(*) FROM notion_pages WHERE deleted_at IS NULL AND seen_full_at IS NULL")
            .await;
    assert_eq!(unstamped, 0, "every live page carries the seen marker of a full run");
    let wrongly = scalar(
        &env,
        &format!(
            "SELECT count(*) FROM notion_pages WHERE deleted_at IS NOT NULL AND page_id IN ({})",
            early.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",")
        ),
    )
    .await;
    assert_eq!(wrongly, 0, "live pages F1 had passed were marked deleted");
    assert_exact(&env, db).await;
    env.cleanup().await;
}

/// Expires the simulator's cursors `times` times, each after a further query request, so each
/// expiry hits a live cursor of a running sync.
pub async fn expire_cursors(env: &TestEnv, times: usize) {
    for _ in 0..times {
        let seen = env.sim_request_count("query", 0.0).await.expect("count");
        until("another query request", SHORT, || {
            env.sim_request_count("query", 0.0).map_fut(|n| n.unwrap_or(0) > seen)
        })
        .await;
        env.sim_admin("invalidate-cursors", json!({})).await.expect("invalidate");
    }
}

/// `fut.map_fut(f)`: maps a future's output (keeps the polling closures short).
trait MapFut: Future + Sized {
    fn map_fut<T, F: FnOnce(Self::Output) -> T>(self, f: F) -> impl Future<Output = T> {
        async move { f(self.await) }
    }
}
impl<F: Future> MapFut for F {}

#[tokio::test]
async fn a_resumed_full_run_deletes_no_page_an_incremental_run_edited_while_it_was_interrupted() {
    interrupted_full_run_then(SyncMode::Incremental).await;
}

#[tokio::test]
async fn a_resumed_full_run_deletes_nothing_it_had_passed_after_another_full_run_completed() {
    interrupted_full_run_then(SyncMode::Full).await;
}

#[tokio::test]
async fn pages_that_fail_validation_stay_live_through_full_runs_with_their_error_recorded() {
    let sim = SimConfig { pages: 300, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let f0 = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(f0, LONG).await.expect("F0").status, "succeeded");
    let status = env
        .producer_command(&[
            "database",
            "map",
            "--database",
            &db.to_string(),
            "--property",
            "Website",
            "--required",
        ])
        .expect("map")
        .status()
        .await
        .expect("ran");
    assert!(status.success());
    for _ in 0..2 {
        let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
        let run = env.wait_run(run, LONG).await.expect("full run");
        assert_eq!(run.status, "partial", "{run:?}");
        assert!(run.pages_invalid > 0, "{run:?}");
        let errors =
            scalar(&env, &format!("SELECT count(*) FROM sync_page_errors WHERE run_id = '{}'", run.id)).await;
        assert_eq!(errors, run.pages_invalid, "every invalid page has its error recorded");
    }
    let deleted = scalar(&env, "SELECT count(*) FROM notion_pages WHERE deleted_at IS NOT NULL").await;
    assert_eq!(deleted, 0, "invalid pages exist in Notion: none is marked deleted");
    assert_exact(&env, db).await;
    env.cleanup().await;
}

fn job(db: Uuid, mode: SyncMode) -> JobEnvelope {
    JobEnvelope::new(
        "urn:syncfleet:test",
        SyncDatabaseJob {
            integration: "acme".into(),
            database_id: db,
            mode,
            priority: Priority::Normal,
            reason: Reason::Manual,
        },
    )
}

#[tokio::test]
async fn a_burst_of_fifty_jobs_during_a_run_gives_two_runs_and_honours_the_full_request() {
    let sim = SimConfig { pages: 1500, rate: 5.0, burst: 2, latency_ms: 50, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 5.0, 2, 0).await.expect("register");
    env.spawn_worker(2).expect("worker 1");
    env.spawn_worker(2).expect("worker 2");
    let first = env.enqueue("acme", db, SyncMode::Incremental).await.expect("first");
    env.wait_run_until(first, SHORT, |r| r.status == "running" && r.pages_seen >= 100)
        .await
        .expect("running");
    let mut burst = env.enqueue_many("acme", db, SyncMode::Incremental, 24).await.expect("burst");
    let full = env.enqueue("acme", db, SyncMode::Full).await.expect("full request");
    burst.push(full);
    burst.extend(env.enqueue_many("acme", db, SyncMode::Incremental, 24).await.expect("burst"));
    for id in &burst {
        env.wait_run(*id, LONG).await.expect("every job ends");
    }
    settle(&env, LONG).await;
    let runs = scalar(&env, "SELECT count(*) FROM sync_runs WHERE status IN ('succeeded', 'partial')").await;
    assert_eq!(runs, 2, "the run, plus one pass for 49 coalesced requests");
    let full_runs = scalar(
        &env,
        &format!(
            "SELECT count(*) FROM sync_runs WHERE status = 'succeeded' AND mode = 'full' \
             AND started_at >= (SELECT enqueued_at FROM sync_runs WHERE id = '{full}')"
        ),
    )
    .await;
    assert_eq!(full_runs, 1, "the coalesced pass runs in the strongest mode asked for");
    every_request_served(&env).await;
    assert_exact(&env, db).await;
    env.cleanup().await;
}

#[tokio::test]
async fn requests_arriving_in_every_window_of_many_runs_are_all_served() {
    let sim = SimConfig { pages: 400, rate: 20.0, burst: 4, latency_ms: 20, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 20.0, 4, 0).await.expect("register");
    env.spawn_worker(2).expect("worker 1");
    env.spawn_worker(2).expect("worker 2");
    let conn = syncfleet_shared::amqp::connect(&env.settings.amqp, "syncfleet-test").await.expect("amqp");
    let topology = syncfleet_shared::amqp::Topology::new(&env.settings.amqp);
    topology.declare(&conn.create_channel().await.expect("channel")).await.expect("declare");
    let publisher =
        syncfleet_shared::amqp::Publisher::new(&conn, &env.settings.amqp).await.expect("publisher");
    let meta =
        syncfleet_shared::amqp::PublishMeta { attempt: 1, app_id: "test".into(), trace_headers: Vec::new() };
    // Jobs keep arriving for several seconds, so some land in each window: during a run, between
    // its last batch and the lock's release, and during coalesced passes. Notion changes too.
    let mut ids = Vec::new();
    for i in 0..60u32 {
        let mode = if i % 15 == 7 { SyncMode::Full } else { SyncMode::Incremental };
        let j = job(db, mode);
        syncfleet_shared::db::runs::insert_queued(&env.db, &j).await.expect("record");
        publisher.publish_job(&j, &syncfleet_shared::amqp::Destination::Work, &meta).await.expect("publish");
        ids.push(j.id);
        if i % 10 == 0 {
            env.sim_admin("mutate", json!({"edit": 5, "trash": 1, "create": 2})).await.expect("mutate");
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let _ = conn.close(200, "done".into()).await;
    for id in &ids {
        env.wait_run(*id, LONG).await.expect("every job ends");
    }
    settle(&env, LONG).await;
    every_request_served(&env).await;
    let runs = scalar(&env, "SELECT count(*) FROM sync_runs WHERE status IN ('succeeded', 'partial')").await;
    assert!(runs < 60, "jobs were coalesced ({runs} runs for 60 jobs)");
    let failed = scalar(
        &env,
        "SELECT count(*) FROM sync_runs WHERE status NOT IN ('succeeded', 'partial', 'skipped')",
    )
    .await;
    assert_eq!(failed, 0);
    assert_exact(&env, db).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_redis_restart_under_a_running_job_does_not_fail_it() {
    let redis = PrivateRedis::start().await.expect("private redis");
    let sim = SimConfig { pages: 3000, rate: 10.0, burst: 2, latency_ms: 50, ..SimConfig::default() };
    let servers = Servers { redis: Some(redis.url()), ..Servers::default() };
    let mut env = TestEnv::start_on(sim, servers).await.expect("env");
    let mut redis = redis;
    let db = env.register("acme", 10.0, 2, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, SHORT, |r| r.pages_seen >= 800).await.expect("progress");
    // Every key is lost: the lock, the budget, the breaker.
    redis.restart().await.expect("restart redis");
    let done = env.wait_run(run, LONG).await.expect("the job ends");
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(env.log().contains("vanished from Redis"), "the lease was taken again: {}", env.log_tail());
    assert_exact(&env, db).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_stale_worker_paused_past_its_lease_cannot_change_the_run_another_worker_finished() {
    let sim = SimConfig { pages: 3000, rate: 10.0, burst: 2, latency_ms: 100, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 10.0, 2, 0).await.expect("register");
    let port = free_port().expect("port");
    let a =
        env.spawn_worker_with(1, &["--metrics-addr", &format!("127.0.0.1:{port}")], &[]).expect("worker A");
    let job = job(db, SyncMode::Full);
    env.publish_job(&job).await.expect("publish");
    env.wait_run_until(job.id, SHORT, |r| r.pages_seen >= 500).await.expect("A makes progress");
    env.signal_worker(a, Signal::SIGSTOP).expect("SIGSTOP A");
    until("A's lease to expire", SHORT, || lock_free(&env, db)).await;
    // The same job again (an at-least-once duplicate): B takes the run over with a new fence.
    env.spawn_worker(1).expect("worker B");
    env.publish_job(&job).await.expect("publish again");
    let done = env.wait_run(job.id, LONG).await.expect("B finishes");
    assert_eq!(done.status, "succeeded", "{done:?}");
    env.signal_worker(a, Signal::SIGCONT).expect("SIGCONT A");
    until("A to stand down", LONG, || async {
        let (_, text) = http_get(port, "/metrics", SHORT).await.expect("A's metrics");
        metric_value(&text, "syncfleet_jobs_in_flight") == Some(0.0)
    })
    .await;
    let (_, text) = http_get(port, "/metrics", SHORT).await.expect("A's metrics");
    let rejected = metric_value(&text, "syncfleet_fence_rejected_writes_total").unwrap_or_default();
    let lost = metric_value(&text, "syncfleet_lease_lost_total").unwrap_or_default();
    assert!(rejected + lost >= 1.0, "A woke up holding a stale fence and was stopped ({rejected}, {lost})");
    settle(&env, LONG).await;
    let after = env.wait_run(job.id, SHORT).await.expect("row");
    assert_eq!(after.status, "succeeded", "A changed the run B finished: {after:?}");
    assert_eq!(
        (after.finished_at, after.error_kind.clone(), after.fence),
        (done.finished_at, None, done.fence)
    );
    assert_exact(&env, db).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_huge_or_fractional_retry_after_neither_panics_nor_stalls_the_job() {
    let sim = SimConfig { pages: 300, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    env.settings.notion.max_retry_after_secs = 1;
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    for retry_after in
        [json!("1e20"), json!("0.25"), json!("18446744073709551616"), json!("-3"), json!("soon")]
    {
        env.sim_admin("faults", json!({"status": 429, "retry_after": retry_after, "count": 1}))
            .await
            .expect("fault");
    }
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let run = env.wait_run(run, LONG).await.expect("the job ends");
    assert_eq!(run.status, "succeeded", "{run:?}");
    assert_eq!(run.attempt, 1, "no retry tier was needed: {run:?}");
    assert!(run.rate_limited >= 5, "{run:?}");
    assert!(env.log().contains("capping it"), "{}", env.log_tail());
    assert!(!env.log().contains("panicked"), "{}", env.log_tail());
    assert_exact(&env, db).await;
    env.cleanup().await;
}

#[tokio::test]
async fn seven_cursor_expiries_in_one_long_sync_resume_from_the_checkpoint_and_never_dead_letter() {
    let sim = SimConfig { pages: 3000, rate: 5.0, burst: 2, latency_ms: 20, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 5.0, 2, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    expire_cursors(&env, 7).await;
    let done = env.wait_run(run, LONG).await.expect("the job ends");
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert!(env.drain_dead_letters().await.expect("dlq").is_empty());
    assert_exact(&env, db).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_user_view_on_the_typed_view_is_recorded_and_never_stalls_the_sync() {
    let sim = SimConfig { pages: 100, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(run, LONG).await.expect("run").status, "succeeded");
    let slug: String = {
        let row = env
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT slug FROM notion_databases WHERE id = '{db}'"),
            ))
            .await
            .expect("q")
            .expect("row");
        row.try_get_by_index(0).expect("slug")
    };
    let view = syncfleet_shared::db::views::view_name(&slug);
    env.db
        .execute_unprepared(&format!("CREATE VIEW public.user_report AS SELECT * FROM {view}"))
        .await
        .expect("user view");
    // Schema drift makes the next run regenerate the typed view, which the user's view blocks.
    assert_eq!(
        drift_and_sync(&env, db, "Added later", "number").await.as_deref().map(|e| e.contains("depend")),
        Some(true)
    );
    // A query holding the view: the DDL waits at most its lock timeout, then the sync goes on.
    env.db.execute_unprepared("DROP VIEW public.user_report").await.expect("drop user view");
    let holder = syncfleet_shared::db::connect(&env.settings.database).await.expect("second connection");
    holder
        .execute_unprepared(&format!("BEGIN; LOCK TABLE {view} IN ACCESS SHARE MODE;"))
        .await
        .expect("lock");
    let error = drift_and_sync(&env, db, "Added again", "checkbox").await;
    assert_eq!(error.as_deref().map(|e| e.contains("lock timeout")), Some(true), "{error:?}");
    holder.execute_unprepared("ROLLBACK").await.expect("release");
    holder.close().await.ok();
    // Nothing in the way: the view is regenerated and the error cleared.
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(run, LONG).await.expect("run").status, "succeeded");
    let cleared = scalar(
        &env,
        &format!("SELECT count(*) FROM notion_databases WHERE id = '{db}' AND view_error IS NULL"),
    )
    .await;
    assert_eq!(cleared, 1);
    let columns = scalar(
        &env,
        &format!("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'notion' AND table_name = '{slug}' AND column_name IN ('added_later', 'added_again')"),
    )
    .await;
    assert_eq!(columns, 2, "the view has both new columns");
    assert_exact(&env, db).await;
    env.cleanup().await;
}

/// Adds a property in the simulator, runs a full sync (which must succeed whatever happens to the
/// typed view) and returns the database's recorded view error.
async fn drift_and_sync(env: &TestEnv, db: Uuid, name: &str, kind: &str) -> Option<String> {
    env.sim_admin("schema", json!({"add": [{"name": name, "type": kind}]})).await.expect("drift");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let row = env.wait_run(run, LONG).await.expect("run");
    assert_eq!(row.status, "succeeded", "{row:?}");
    let found = env
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT view_error FROM notion_databases WHERE id = '{db}'"),
        ))
        .await
        .expect("query")
        .expect("row");
    found.try_get_by_index::<Option<String>>(0).expect("view_error")
}

#[tokio::test]
async fn a_changed_retry_tier_delay_declares_a_new_queue_instead_of_failing() {
    let sim = SimConfig { pages: 10, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let conn = syncfleet_shared::amqp::connect(&env.settings.amqp, "syncfleet-test").await.expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    let before = syncfleet_shared::amqp::Topology::new(&env.settings.amqp);
    before.declare(&channel).await.expect("first declaration");
    let old_queue = before.retry_queue(&env.settings.amqp.retry_tiers[0]);
    env.settings.amqp.retry_tiers[0].delay_ms = 1500;
    let after = syncfleet_shared::amqp::Topology::new(&env.settings.amqp);
    after.declare(&channel).await.expect("a changed delay is not PRECONDITION_FAILED");
    let new_queue = after.retry_queue(&env.settings.amqp.retry_tiers[0]);
    assert_ne!(old_queue, new_queue);
    // A worker with the new settings starts, and retries land only in the new tier.
    env.spawn_worker(1).expect("worker");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    env.sim_admin("faults", json!({"status": 503, "count": 5})).await.expect("fault");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let run = env.wait_run(run, LONG).await.expect("run");
    assert_eq!((run.status.as_str(), run.attempt), ("succeeded", 2), "it went through the new tier: {run:?}");
    assert_eq!(queue_depth(&env, &old_queue).await, 0);
    channel.queue_delete(old_queue.as_str().into(), Default::default()).await.expect("delete the old tier");
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_request_coalesced_into_a_run_that_is_shut_down_is_still_served() {
    let sim = SimConfig { pages: 1500, rate: 5.0, burst: 2, latency_ms: 50, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 5.0, 2, 0).await.expect("register");
    let a = env.spawn_worker(2).expect("worker A");
    let full = env.enqueue("acme", db, SyncMode::Full).await.expect("full");
    env.wait_run_until(full, SHORT, |r| r.status == "running" && r.pages_seen >= 200).await.expect("running");
    let coalesced = env.enqueue("acme", db, SyncMode::Incremental).await.expect("incremental");
    let skipped = env.wait_run(coalesced, SHORT).await.expect("coalesced");
    assert_eq!(skipped.status, "skipped", "{skipped:?}");
    // A shutdown in progress must not consume the pending request.
    env.signal_worker(a, Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(env.wait_worker_exit(a, LONG).await.expect("A exits"), Some(0));
    env.spawn_worker(1).expect("worker B");
    assert_eq!(env.wait_run(full, LONG).await.expect("full resumes").status, "succeeded");
    settle(&env, LONG).await;
    every_request_served(&env).await;
    assert_exact(&env, db).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_failed_run_whose_dead_letter_was_never_confirmed_is_dead_lettered_on_redelivery() {
    let sim = SimConfig { pages: 20, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    // A worker recorded `failed`, then lost the broker before the dead letter was confirmed.
    let job = job(db, SyncMode::Full);
    syncfleet_shared::db::runs::insert_queued(&env.db, &job).await.expect("record");
    env.db
        .execute_unprepared(&format!(
            "UPDATE sync_runs SET status = 'failed', error_kind = 'notion_unauthorized', finished_at = now() WHERE id = '{}'",
            job.id
        ))
        .await
        .expect("failed");
    // Another run holds the database meanwhile: the redelivery must still be settled as a
    // failed run, not turned into a rerun request.
    let pool = syncfleet_shared::redis_pool::connect(&env.settings.redis).await.expect("redis");
    let other = syncfleet_shared::lock::try_acquire(
        &pool,
        &env.settings.redis.key_prefix,
        &db,
        "another-run",
        Duration::from_secs(60),
    )
    .await
    .expect("lock")
    .expect("free");
    env.publish_job(&job).await.expect("the redelivery");
    until("the dead letter to be confirmed", LONG, || async {
        scalar(
            &env,
            &format!(
                "SELECT count(*) FROM sync_runs WHERE id = '{}' AND dead_lettered_at IS NOT NULL",
                job.id
            ),
        )
        .await
            == 1
    })
    .await;
    let dead = env.drain_dead_letters().await.expect("dlq");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].1, job.to_json());
    let row = env.wait_run(job.id, SHORT).await.expect("row");
    assert_eq!(row.status, "failed", "not rerun: {row:?}");
    assert_eq!(env.sim_request_count("query", 0.0).await.expect("count"), 0, "nothing was synced");
    let requested = scalar(
        &env,
        &format!("SELECT count(*) FROM notion_databases WHERE id = '{db}' AND rerun_mode IS NOT NULL"),
    )
    .await;
    assert_eq!(requested, 0, "a finished run asks for no rerun");
    other.release().await;
    env.cleanup().await;
}
