//! SIGTERM mid-sync: the worker commits its batch, requeues the job and exits 0; another worker
//! resumes from the checkpoint, with no lost or duplicated rows.

use std::time::Duration;

use nix::sys::signal::Signal;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;

use crate::{LONG, SHORT};

#[tokio::test]
async fn sigterm_mid_sync_requeues_and_a_new_worker_finishes_without_loss_or_duplicates() {
    let pages = 3000;
    let sim = SimConfig { pages, rate: 10.0, burst: 2, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 10.0, 2, 0).await.expect("register");
    let first = env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, SHORT, |r| r.pages_seen >= 800).await.expect("progress before SIGTERM");
    env.signal_worker(first, Signal::SIGTERM).expect("SIGTERM");
    let code = env.wait_worker_exit(first, SHORT).await.expect("worker exits");
    assert_eq!(code, Some(0), "a graceful stop exits 0\n{}", env.log_tail());
    let interrupted =
        env.wait_run_until(run, SHORT, |r| r.status == "queued").await.expect("run is back in the queue");
    assert!(interrupted.pages_seen < pages as i64, "stopped mid-sync: {interrupted:?}");
    assert!(interrupted.checkpoint.is_some());

    env.spawn_worker(1).expect("second worker");
    let done = env.wait_run(run, LONG).await.expect("run finishes");
    assert_eq!(done.status, "succeeded", "{done:?}");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    let rows = env
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) AS n, count(DISTINCT page_id) AS d FROM notion_pages WHERE database_id = $1",
            [db.into()],
        ))
        .await
        .expect("count")
        .expect("row");
    let (n, d): (i64, i64) = (rows.try_get("", "n").expect("n"), rows.try_get("", "d").expect("d"));
    assert_eq!((n, d), (pages as i64, pages as i64));
    // The resumed attempt re-reads at most the checkpoint's minute, not the whole database.
    // (The run's own count also has a schema read per attempt and relation completions.)
    let queries = env.sim_request_count("query", 0.0).await.expect("request log");
    assert!(queries <= 30 + 3, "{queries} query requests: {done:?}");
    assert!(env.log().contains("Resuming from the run's checkpoint"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    env.cleanup().await;
}
