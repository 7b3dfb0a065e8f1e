//! A Notion whose query walk is not a snapshot: with offset-like cursors, pages trashed behind the
//! cursor make the walk skip live pages. A full run confirms every deletion candidate with
//! `GET /v1/pages/{id}` before marking it deleted, so a skipped live page stays live.

use sea_orm::ConnectionTrait;
use serde_json::json;
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;

use crate::exactness::scalar;
use crate::{LONG, SHORT};

#[tokio::test]
async fn a_live_page_a_drifting_cursor_skipped_is_confirmed_live_and_never_marked_deleted() {
    // Slow enough (2 req/s) that the trash lands while the walk still has most of its way to go.
    let sim = SimConfig { pages: 1500, rate: 2.0, burst: 2, latency_ms: 50, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 2.0, 2, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let f0 = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(f0, LONG).await.expect("F0").status, "succeeded");
    env.sim_admin("config", json!({"offset_cursors": true})).await.expect("offset cursors");
    let f1 = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(f1, SHORT, |r| r.pages_seen >= 300).await.expect("F1 under way");
    // Ten pages the walk has passed go to the trash: the offset now skips ten live pages.
    let rows = env
        .db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("SELECT page_id FROM notion_pages WHERE database_id = '{db}' ORDER BY created_time, page_id LIMIT 10"),
        ))
        .await
        .expect("query");
    let early: Vec<uuid::Uuid> = rows.iter().map(|r| r.try_get_by_index(0).expect("id")).collect();
    env.sim_admin("mutate", json!({"trash_ids": early})).await.expect("trash");
    let run = env.wait_run(f1, LONG).await.expect("F1");
    assert_eq!(run.status, "succeeded", "{run:?}");
    // The walk skipped ten live pages: they were deletion candidates, confirmed live, and kept.
    // The trashed ones were seen live by this run before they went; the next full run finds them.
    assert_eq!((run.deletion_checks, run.deletions_refuted, run.pages_deleted), (10, 10, 0), "{run:?}");
    let deleted = scalar(&env, "SELECT count(*) FROM notion_pages WHERE deleted_at IS NOT NULL").await;
    assert_eq!(deleted, 0, "no live page was marked deleted");
    let f2 = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let run = env.wait_run(f2, LONG).await.expect("F2");
    assert_eq!(
        (run.status.as_str(), run.deletion_checks, run.pages_deleted),
        ("succeeded", 10, 10),
        "{run:?}"
    );
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_full_sync_through_5xx_resets_truncated_json_and_slow_answers_ends_exact() {
    let sim = SimConfig { pages: 8000, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    env.settings.notion.timeout_secs = 1;
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    env.sim_admin(
        "config",
        json!({"error_rate": 0.10, "reset_rate": 0.02, "truncate_rate": 0.02, "slow_rate": 0.01, "slow_ms": 2500}),
    )
    .await
    .expect("faults");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    let run = env.wait_run(run, LONG).await.expect("run");
    assert_eq!(run.status, "succeeded", "{run:?}");
    // 81 queries at a 15 % fault rate: the faults certainly happened (0.85^81 < 1e-5).
    let log = env.sim_admin_get("requests").await.expect("log");
    let faulted =
        log["entries"].as_array().into_iter().flatten().filter(|e| e["status"].as_u64() >= Some(500)).count();
    assert!(faulted >= 1, "5xx answers were served and survived: {run:?}");
    env.sim_admin(
        "config",
        json!({"error_rate": 0.0, "reset_rate": 0.0, "truncate_rate": 0.0, "slow_rate": 0.0}),
    )
    .await
    .expect("no faults");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_database_unshared_mid_run_fails_its_job_permanently_in_one_attempt() {
    let sim = SimConfig { pages: 2000, rate: 5.0, burst: 2, latency_ms: 20, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 5.0, 2, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, SHORT, |r| r.pages_seen >= 200).await.expect("under way");
    env.sim_admin("unshare", json!({"database_id": db})).await.expect("unshare");
    let run = env.wait_run(run, LONG).await.expect("run");
    assert_eq!((run.status.as_str(), run.attempt), ("failed", 1), "{run:?}");
    assert_eq!(run.error_kind.as_deref(), Some("notion_not_found"));
    // `failed` is recorded before the dead letter is published; its confirm is recorded after.
    let confirmed =
        format!("SELECT count(*) FROM sync_runs WHERE id = '{}' AND dead_lettered_at IS NOT NULL", run.id);
    crate::exactness::until("the dead letter's confirm", SHORT, || async {
        scalar(&env, &confirmed).await == 1
    })
    .await;
    let dead = env.drain_dead_letters().await.expect("dlq");
    assert_eq!(dead.len(), 1, "dead-lettered once");
    let deleted = scalar(&env, "SELECT count(*) FROM notion_pages WHERE deleted_at IS NOT NULL").await;
    assert_eq!(deleted, 0, "a failed full run deletes nothing");
    env.cleanup().await;
}

#[tokio::test]
async fn three_thousand_pages_in_one_minute_survive_cursor_expiries_and_kill_9_without_loss_or_loop() {
    // A CSV import: thousands of pages share one created/last-edited minute.
    let sim = SimConfig { pages: 100, rate: 8.0, burst: 2, latency_ms: 20, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    env.sim_admin("mutate", json!({"create": 3000})).await.expect("bulk import");
    let db = env.register("acme", 8.0, 2, 0).await.expect("register");
    let worker = env.spawn_worker(1).expect("worker");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    crate::exactness::expire_cursors(&env, 3).await;
    env.wait_run_until(run, LONG, |r| r.pages_seen >= 1500).await.expect("halfway");
    env.signal_worker(worker, nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    env.spawn_worker(1).expect("a new worker");
    let done = env.wait_run(run, LONG).await.expect("the run ends");
    assert_eq!(done.status, "succeeded", "{done:?}");
    // Every restart re-reads the tie minute from its start (Notion cannot filter below a
    // minute): bounded re-reading, never a loop. 31 requests read it once.
    let queries = env.sim_request_count("query", 0.0).await.expect("count");
    assert!(queries <= 31 * 4, "{queries} query requests");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    // The same for an incremental run over a bulk edit in one minute.
    env.sim_admin("mutate", json!({"edit": 2500})).await.expect("bulk edit");
    let inc = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
    let inc = env.wait_run(inc, LONG).await.expect("incremental");
    assert_eq!(inc.status, "succeeded", "{inc:?}");
    assert!(inc.pages_updated >= 2500, "{inc:?}");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn the_incremental_overlap_covers_an_index_lag_below_it() {
    let sim = SimConfig { pages: 300, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let f0 = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(f0, LONG).await.expect("F0").status, "succeeded");
    // Queries see a change only 15 s after it happened (the first incremental surely runs
    // within that, even on a loaded machine; 15 s + 60 s stays under the 120 s overlap).
    env.sim_admin("config", json!({"index_lag_ms": 15000})).await.expect("lag");
    env.sim_admin("mutate", json!({"edit": 10})).await.expect("edit");
    let first = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
    let first = env.wait_run(first, LONG).await.expect("first incremental");
    assert_eq!(
        (first.status.as_str(), first.pages_updated),
        ("succeeded", 0),
        "the edits are not indexed yet: {first:?}"
    );
    assert!(!env.verify(db).await.expect("verify").is_exact(), "PostgreSQL is behind while the index lags");
    // Once the index has caught up, the next incremental run's window (watermark − overlap,
    // 120 s by default) still reaches back to the edits' minute: overlap ≥ lag + 60 s.
    let ds = env.sim.state.read().databases[0].data_source_id;
    crate::exactness::until("the index to catch up", LONG, || async {
        let since = (chrono::Utc::now() - chrono::Duration::minutes(2)).to_rfc3339();
        let body =
            json!({"filter": {"timestamp": "last_edited_time", "last_edited_time": {"on_or_after": since}}});
        let answer: serde_json::Value = reqwest::Client::new()
            .post(format!("{}/v1/data_sources/{ds}/query", env.sim_url()))
            .bearer_auth(&env.token)
            .header("Notion-Version", "2025-09-03")
            .json(&body)
            .send()
            .await
            .expect("query")
            .json()
            .await
            .expect("json");
        answer["results"].as_array().map_or(0, Vec::len) >= 10
    })
    .await;
    let second = env.enqueue("acme", db, SyncMode::Incremental).await.expect("enqueue");
    let second = env.wait_run(second, LONG).await.expect("second incremental");
    assert_eq!((second.status.as_str(), second.pages_updated), ("succeeded", 10), "{second:?}");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}

/// Sim tokens of the two integrations that share workspace `ws`.
const TOKEN_A: &str = "secret_ws_token_a";
const TOKEN_B: &str = "secret_ws_token_b";

async fn two_integrations_in_one_workspace(env: &TestEnv) -> Vec<uuid::Uuid> {
    let ids: Vec<uuid::Uuid> = env.sim.state.read().databases.iter().map(|d| d.id).collect();
    for (slug, token, db) in [("a", TOKEN_A, ids[0]), ("b", TOKEN_B, ids[1])] {
        syncfleet_producer::commands::integration::save(
            &env.settings,
            slug,
            Some("ws".into()),
            Some(1000.0),
            Some(10),
            &secrecy::SecretString::from(token.to_string()),
        )
        .await
        .expect("integration");
        syncfleet_producer::commands::database::add(&env.settings, slug, db, None, None, false)
            .await
            .expect("database");
    }
    ids
}

#[tokio::test]
async fn a_workspace_429_pauses_every_integration_of_the_workspace() {
    let sim = SimConfig {
        pages: 3000,
        databases: 2,
        rate: 0.0,
        latency_ms: 30,
        tokens: vec![TOKEN_A.into(), TOKEN_B.into()],
        ..SimConfig::default()
    };
    let mut env = TestEnv::start(sim).await.expect("env");
    let ids = two_integrations_in_one_workspace(&env).await;
    env.spawn_worker(2).expect("worker");
    let runs = [
        env.enqueue("a", ids[0], SyncMode::Full).await.expect("a"),
        env.enqueue("b", ids[1], SyncMode::Full).await.expect("b"),
    ];
    for run in runs {
        env.wait_run_until(run, SHORT, |r| r.pages_seen >= 200).await.expect("both under way");
    }
    env.sim_admin(
        "faults",
        json!({"status": 429, "retry_after": 2, "rate_limit_reason": "workspace_rate_limit", "count": 1}),
    )
    .await
    .expect("workspace 429");
    for run in runs {
        let run = env.wait_run(run, LONG).await.expect("run");
        assert_eq!(run.status, "succeeded", "{run:?}");
    }
    let log = env.sim_admin_get("requests").await.expect("log");
    let entries = log["entries"].as_array().expect("entries");
    let limited = entries.iter().find(|e| e["status"] == 429).expect("the workspace 429");
    let at = limited["t_ms"].as_f64().expect("t");
    let hit = limited["token"].as_u64().expect("token");
    // Requests already past the budget may land just after; then both integrations wait.
    let during: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| {
            let t = e["t_ms"].as_f64().unwrap_or_default();
            t > at + 400.0 && t < at + 1800.0
        })
        .collect();
    assert!(during.is_empty(), "requests during the workspace pause (the 429 hit token {hit}): {during:?}");
    for token in [0u64, 1] {
        let after = entries
            .iter()
            .filter(|e| {
                e["token"].as_u64() == Some(token) && e["t_ms"].as_f64().unwrap_or_default() > at + 1800.0
            })
            .count();
        assert!(after > 0, "integration {token} was still syncing after the pause, so the pause held it");
    }
    for db in ids {
        let report = env.verify(db).await.expect("verify");
        assert!(report.is_exact(), "{report:?}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_workspace_budget_keeps_two_integrations_under_the_workspace_limit() {
    let sim = SimConfig {
        pages: 1200,
        databases: 2,
        rate: 0.0,
        latency_ms: 10,
        tokens: vec![TOKEN_A.into(), TOKEN_B.into()],
        ..SimConfig::default()
    };
    let mut env = TestEnv::start(sim).await.expect("env");
    env.sim_admin("config", json!({"workspace_rate": 6.0, "workspace_burst": 2, "rejected_spend": true}))
        .await
        .expect("workspace limit");
    let ids = two_integrations_in_one_workspace(&env).await;
    env.spawn_worker_with(
        2,
        &[],
        // Under the workspace's limit, as the integration budgets are under theirs.
        &[("SYNCFLEET_NOTION__WORKSPACE_RATE", "4"), ("SYNCFLEET_NOTION__WORKSPACE_BURST", "2")],
    )
    .expect("worker");
    let runs = [
        env.enqueue("a", ids[0], SyncMode::Full).await.expect("a"),
        env.enqueue("b", ids[1], SyncMode::Full).await.expect("b"),
    ];
    for run in runs {
        let run = env.wait_run(run, LONG).await.expect("run");
        assert_eq!(run.status, "succeeded", "{run:?}");
    }
    // Two integrations at 1000/s each would meet the workspace's 6/s with hundreds of 429s.
    // With the workspace budget none is expected; one is tolerated, because on a CPU-starved
    // machine (the whole suite in parallel on two cores) a request the budget spaced 250 ms
    // apart can be held up and arrive bunched with the next two (one 429 seen in two of the
    // full-suite runs of 2026-11-24, none when the test ran alone).
    let stats = env.sim_stats().await.expect("stats");
    assert!(stats["rate_limited_total"].as_u64().unwrap_or(u64::MAX) <= 1, "{stats}");
    env.cleanup().await;
}
