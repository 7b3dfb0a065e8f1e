//! Sync semantics against notion-sim: minute-rounded edits, deletions and restores, page history,
//! schema drift and the typed view, hostile property names, complete relations, invalid pages,
//! and a crash halfway through a large full sync.

use nix::sys::signal::Signal;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;
use uuid::Uuid;

use crate::LONG;

async fn scalar(env: &TestEnv, sql: &str) -> i64 {
    let row = env
        .db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .expect("row");
    row.try_get_by_index::<i64>(0).expect("bigint")
}

async fn slug(env: &TestEnv, db: Uuid) -> String {
    let row = env
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT slug FROM notion_databases WHERE id = $1",
            [db.into()],
        ))
        .await
        .expect("slug")
        .expect("row");
    row.try_get("", "slug").expect("slug")
}

async fn view_columns(env: &TestEnv, slug: &str) -> Vec<String> {
    let rows = env
        .db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT column_name::text AS c FROM information_schema.columns WHERE table_schema = 'notion' AND table_name = $1 ORDER BY ordinal_position",
            [slug.into()],
        ))
        .await
        .expect("columns");
    rows.iter().map(|r| r.try_get::<String>("", "c").expect("c")).collect()
}

async fn sync(env: &TestEnv, db: Uuid, mode: SyncMode) -> syncfleet_shared::db::entities::sync_run::Model {
    let run = env.enqueue("acme", db, mode).await.expect("enqueue");
    env.wait_run(run, LONG).await.expect("run ends")
}

/// A simulator with `pages` pages (no rate limit), the database registered, one worker running.
async fn started(pages: u64) -> (TestEnv, Uuid) {
    let sim = SimConfig { pages, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    (env, db)
}

/// `"…"` for SQL in tests.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[tokio::test]
async fn an_edit_in_the_same_minute_as_the_last_sync_is_not_lost_and_its_old_version_is_kept() {
    let (env, db) = started(300).await;
    assert_eq!(sync(&env, db, SyncMode::Full).await.status, "succeeded");
    // The edit lands in the current minute — the minute the incremental run below starts in,
    // which Notion reports rounded down, i.e. "before" the run by up to 59 s.
    let first = sync(&env, db, SyncMode::Incremental).await;
    assert_eq!(first.status, "succeeded");
    let export = syncfleet_tests::verify::fetch_export(&env.sim_url(), db).await.expect("export");
    let page = export[7]["id"].as_str().expect("id").to_string();
    env.sim_admin("mutate", json!({"edit_ids": [page]})).await.expect("edit");
    let second = sync(&env, db, SyncMode::Incremental).await;
    assert_eq!(second.status, "succeeded");
    assert_eq!(second.pages_updated, 1, "{second:?}");
    assert!(env.verify(db).await.expect("verify").is_exact());
    let versions =
        scalar(&env, &format!("SELECT count(*) FROM notion_page_versions WHERE page_id = '{page}'")).await;
    assert_eq!(versions, 1, "the page's previous version is kept");
    assert_eq!(
        scalar(&env, "SELECT count(*) FROM notion_page_versions").await,
        1,
        "unchanged pages add none"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_full_sync_marks_trashed_pages_deleted_and_a_restored_page_comes_back() {
    let (env, db) = started(300).await;
    assert_eq!(sync(&env, db, SyncMode::Full).await.status, "succeeded");
    let trashed = env.sim_admin("mutate", json!({"trash": 10})).await.expect("trash");
    let ids: Vec<String> = trashed["trashed"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let full = sync(&env, db, SyncMode::Full).await;
    assert_eq!((full.status.as_str(), full.pages_deleted), ("succeeded", 10), "{full:?}");
    assert_eq!(scalar(&env, "SELECT count(*) FROM notion_pages WHERE deleted_at IS NOT NULL").await, 10);
    env.sim_admin("mutate", json!({"restore_ids": [ids[0]]})).await.expect("restore");
    let incremental = sync(&env, db, SyncMode::Incremental).await;
    assert_eq!(incremental.status, "succeeded");
    let back = format!(
        "SELECT count(*) FROM notion_pages WHERE page_id = '{}' AND deleted_at IS NULL AND NOT in_trash",
        ids[0]
    );
    assert_eq!(scalar(&env, &back).await, 1, "the restored page is live again");
    assert_eq!(scalar(&env, "SELECT count(*) FROM notion_pages WHERE deleted_at IS NOT NULL").await, 9);
    assert!(env.verify(db).await.expect("verify").is_exact());
    env.cleanup().await;
}

#[tokio::test]
async fn the_typed_view_follows_schema_drift_and_a_renamed_property_keeps_its_data() {
    let (env, db) = started(200).await;
    assert_eq!(sync(&env, db, SyncMode::Full).await.status, "succeeded");
    let slug = slug(&env, db).await;
    let view = format!("notion.{}", ident(&slug));
    let before = view_columns(&env, &slug).await;
    assert!(before.contains(&"amount".to_string()) && before.contains(&"website".to_string()), "{before:?}");
    let sum_before = scalar(&env, &format!("SELECT COALESCE(sum(amount), 0)::bigint FROM {view}")).await;
    assert!(sum_before > 0);

    env.sim_admin(
        "schema",
        json!({"add": [{"name": "Priority", "type": "number"}], "rename": [{"from": "Amount", "to": "Amount (EUR)"}], "remove": ["Website"]}),
    )
    .await
    .expect("schema drift");
    let run = sync(&env, db, SyncMode::Full).await;
    assert_eq!(run.status, "succeeded", "{run:?}");
    let after = view_columns(&env, &slug).await;
    assert!(after.contains(&"priority".to_string()), "added: {after:?}");
    assert!(
        after.contains(&"amount_eur".to_string()) && !after.contains(&"amount".to_string()),
        "renamed: {after:?}"
    );
    assert!(!after.contains(&"website".to_string()), "removed: {after:?}");
    let sum_after = scalar(&env, &format!("SELECT COALESCE(sum(amount_eur), 0)::bigint FROM {view}")).await;
    assert_eq!(sum_after, sum_before, "the renamed column has the same data");
    assert!(
        scalar(&env, &format!("SELECT count(priority) FROM {view}")).await > 0,
        "the new property's values landed"
    );
    assert!(env.log().contains("schema changed"), "{}", env.log_tail());
    assert!(env.verify(db).await.expect("verify").is_exact());
    env.cleanup().await;
}

#[tokio::test]
async fn hostile_property_names_get_working_columns_and_every_value_lands() {
    let (env, db) = started(300).await;
    assert_eq!(sync(&env, db, SyncMode::Full).await.status, "succeeded");
    let slug = slug(&env, db).await;
    let view = format!("notion.{}", ident(&slug));
    let cols = view_columns(&env, &slug).await;
    let long = cols
        .iter()
        .find(|c| c.starts_with("a_very_long_property_name"))
        .expect("the 200-character name")
        .clone();
    assert!(long.len() <= 63);
    let export = syncfleet_tests::verify::fetch_export(&env.sim_url(), db).await.expect("export");
    // Property id → view column, and how many pages have a value there in Notion.
    for (id, column, field) in [
        ("hx%3A1", "drop_table_notion_pages", "rich_text"),
        ("hx%3A2", "a_b", "number"),
        ("hx%3A3", "ü_名前", "select"),
        ("hx%3A4", long.as_str(), "rich_text"),
        ("hx%3A5", "due_date", "date"),
        ("hx%3A6", "due_date_2", "checkbox"),
    ] {
        assert!(cols.contains(&column.to_string()), "{column} in {cols:?}");
        let expected = export
            .iter()
            .filter(|p| {
                let v = &p["properties"][id][field];
                !(v.is_null() || v.as_array().is_some_and(|a| a.is_empty()))
            })
            .count() as i64;
        let got = scalar(&env, &format!("SELECT count({}) FROM {view}", ident(column))).await;
        assert_eq!(got, expected, "values of {column}");
    }
    assert_eq!(scalar(&env, "SELECT count(*) FROM notion_pages").await, 300, "no table was harmed");
    assert_eq!(scalar(&env, &format!("SELECT count(*) FROM {view}")).await, 300);
    env.cleanup().await;
}

#[tokio::test]
async fn a_relation_with_sixty_items_is_stored_complete() {
    let (env, db) = started(100).await;
    let run = sync(&env, db, SyncMode::Full).await;
    assert_eq!(run.status, "succeeded");
    let longest = scalar(
        &env,
        "SELECT max(jsonb_array_length(properties->'rl%3Ft'->'relation'))::bigint FROM notion_pages",
    )
    .await;
    assert_eq!(longest, 60, "page 17 relates to 60 pages; the page object showed 25");
    let view = format!("notion.{}", ident(&slug(&env, db).await));
    assert_eq!(scalar(&env, &format!("SELECT max(cardinality(related))::bigint FROM {view}")).await, 60);
    let stats = env.sim_stats().await.expect("stats");
    assert!(
        stats["by_endpoint"].to_string().contains("properties"),
        "completed via the property endpoint: {stats}"
    );
    assert!(env.verify(db).await.expect("verify").is_exact());
    env.cleanup().await;
}

#[tokio::test]
async fn pages_that_fail_the_mapping_go_to_sync_page_errors_and_the_rest_lands() {
    let sim = SimConfig { pages: 300, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    let database = db.to_string();
    let status = env
        .producer_command(&[
            "database",
            "map",
            "--database",
            &database,
            "--property",
            "Website",
            "--required",
        ])
        .expect("map")
        .status()
        .await
        .expect("ran");
    assert!(status.success());
    env.spawn_worker(1).expect("worker");
    let run = sync(&env, db, SyncMode::Full).await;
    let export = syncfleet_tests::verify::fetch_export(&env.sim_url(), db).await.expect("export");
    let empty = export.iter().filter(|p| p["properties"]["ur%3Dl"]["url"].is_null()).count() as i64;
    assert!(empty > 0, "some pages have no website");
    assert_eq!(run.status, "partial", "{run:?}");
    assert_eq!(run.pages_invalid, empty);
    assert_eq!(run.pages_created, 300 - empty);
    let errors =
        scalar(&env, "SELECT count(*) FROM sync_page_errors WHERE reason LIKE '%Website%required%'").await;
    assert_eq!(errors, empty);
    assert_eq!(scalar(&env, "SELECT count(*) FROM notion_pages").await, 300 - empty);
    let report = env.verify(db).await.expect("verify");
    assert_eq!((report.missing as i64, report.different, report.extra), (empty, 0, 0), "{report:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn after_kill_9_halfway_through_twenty_thousand_pages_the_job_resumes_from_its_checkpoint() {
    let sim = SimConfig { pages: 20_000, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    let first = env.spawn_worker(1).expect("worker A");
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, LONG, |r| r.pages_seen >= 10_000).await.expect("halfway");
    env.signal_worker(first, Signal::SIGKILL).expect("kill -9");
    let killed_at = env.sim_admin_get("requests").await.expect("log")["now_ms"].as_f64().expect("now");
    let seen = scalar(&env, &format!("SELECT pages_seen FROM sync_runs WHERE id = '{run}'")).await;
    env.spawn_worker(1).expect("worker B");
    let done = env.wait_run(run, LONG).await.expect("B finishes");
    assert_eq!(done.status, "succeeded", "{done:?}");
    let queries = env.sim_request_count("query", killed_at).await.expect("request log") as i64;
    eprintln!("after the crash: {queries} query requests for {} remaining pages", 20_000 - seen);
    let remaining = 20_000 - seen;
    assert!(
        queries <= remaining / 100 + 3,
        "{queries} query requests after the crash for {remaining} remaining pages"
    );
    assert!(env.verify(db).await.expect("verify").is_exact());
    env.cleanup().await;
}

#[tokio::test]
async fn a_large_database_is_reconciled_as_concurrent_ranges_that_resume_after_kill_9() {
    let sim = SimConfig { pages: 21_000, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("env");
    let db = env.register("acme", 100.0, 10, 0).await.expect("register");
    let first = env.spawn_worker(1).expect("worker A");
    // The first sync does not know the size: one chain.
    assert_eq!(sync(&env, db, SyncMode::Full).await.status, "succeeded");
    assert!(!env.log().contains("concurrent created_time ranges"));
    env.sim_admin("mutate", json!({"trash": 5})).await.expect("trash");
    // The reconciliation knows 21,000 pages: two ranges, read at once. Kill it halfway.
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    env.wait_run_until(run, LONG, |r| r.pages_seen >= 8_000).await.expect("halfway");
    env.signal_worker(first, Signal::SIGKILL).expect("kill -9");
    assert!(env.log().contains("concurrent created_time ranges"), "{}", env.log_tail());
    let checkpoint = scalar(
        &env,
        &format!("SELECT jsonb_array_length(checkpoint->'ranges')::bigint FROM sync_runs WHERE id = '{run}'"),
    )
    .await;
    assert_eq!(checkpoint, 2, "each range's progress is in the checkpoint");
    env.spawn_worker(1).expect("worker B");
    let done = env.wait_run(run, LONG).await.expect("B finishes");
    assert_eq!(done.status, "succeeded", "{done:?}");
    assert_eq!(done.pages_deleted, 5, "{done:?}");
    assert!(done.pages_seen >= 20_995, "{done:?}");
    assert!(env.verify(db).await.expect("verify").is_exact());
    env.cleanup().await;
}
