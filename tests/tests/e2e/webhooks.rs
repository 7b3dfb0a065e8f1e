//! Notion webhooks (`POST /v1/notion/webhook`): the verification handshake, signatures,
//! replays, unknown events, a deleted data source, storms of edits, and the whole path from an
//! edit in `notion-sim` (which sends signed webhooks like Notion) to the row in PostgreSQL.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;
use syncfleet_tests::sim::webhook::{data_source_event, page_event};

use crate::api::{Api, cli_text};
use crate::exactness::{settle, until};
use crate::notifications::start_receiver;
use crate::{LONG, SHORT};

const HOOK: &str = "/v1/notion/webhook";

/// POSTs raw `body` with an optional signature; returns (status, JSON body).
async fn deliver(api: &Api, body: &[u8], signature: Option<&str>) -> (u16, Value) {
    let mut req = api
        .client
        .post(format!("{}{HOOK}", api.base))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(30))
        .body(body.to_vec());
    if let Some(s) = signature {
        req = req.header("X-Notion-Signature", s);
    }
    let res = req.send().await.expect("deliver");
    let status = res.status().as_u16();
    let text = res.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Signs and delivers `event` with `token`.
async fn signed(api: &Api, token: &str, event: &Value) -> (u16, Value) {
    let body = event.to_string().into_bytes();
    let signature = syncfleet_shared::webhook::sign(token.as_bytes(), &body).expect("signed");
    deliver(api, &body, Some(&signature)).await
}

async fn runs(env: &TestEnv) -> i64 {
    env.scalar("SELECT count(*) FROM sync_runs").await
}

#[tokio::test]
async fn the_webhook_verifies_signatures_ignores_replays_and_unknown_events_and_disables_deleted_sources() {
    let mut env =
        TestEnv::start(SimConfig { pages: 50, databases: 2, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 20.0, 4, 0).await.expect("register");
    let (receiver, hook_url) = start_receiver(0).await;
    let api = Api::start_with(
        &mut env,
        &[("SYNCFLEET_NOTIFY__WEBHOOK_URL", hook_url.as_str()), ("SYNCFLEET_API__WEBHOOK_QUIET_MS", "300")],
    )
    .await;
    let (database, data_source, other) = {
        let ws = env.sim.state.read();
        (ws.databases[0].clone(), ws.databases[0].data_source_id, ws.databases[1].id)
    };
    let page = database.pages[3].id;
    let edit = || page_event("page.properties_updated", page, db, data_source, uuid::Uuid::nil());

    // Before the handshake nothing can be verified.
    let token = "secret_verification_0b9f2c4d7e1a";
    assert_eq!(signed(&api, token, &edit()).await.0, 401);
    // Nobody can be first to plant a token: the operator arms the endpoint for the handshake.
    let (status, body) =
        deliver(&api, json!({"verification_token": token}).to_string().as_bytes(), None).await;
    assert_eq!(status, 403, "not armed: {body}");
    cli_text(&env, &["webhook", "arm", "--for-secs", "600"]).await;
    // The handshake: stored once, repeated harmlessly, never replaced by another token.
    let (status, body) =
        deliver(&api, json!({"verification_token": token}).to_string().as_bytes(), None).await;
    assert_eq!((status, body["status"].clone()), (200, json!("verification_token_stored")), "{body}");
    assert_eq!(deliver(&api, json!({"verification_token": token}).to_string().as_bytes(), None).await.0, 200);
    let (status, body) =
        deliver(&api, json!({"verification_token": "secret_attacker"}).to_string().as_bytes(), None).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) =
        deliver(&api, json!({"verification_token": "x\u{1}y"}).to_string().as_bytes(), None).await;
    assert_eq!((status, body["error"]["field"].clone()), (400, json!("verification_token")), "{body}");

    // Signatures: missing, wrong key, another body, garbage: 401, and nothing is scheduled.
    let event = edit();
    let raw = event.to_string().into_bytes();
    assert_eq!(deliver(&api, &raw, None).await.0, 401);
    let wrong_key = syncfleet_shared::webhook::sign(b"secret_attacker", &raw).expect("signed");
    assert_eq!(deliver(&api, &raw, Some(&wrong_key)).await.0, 401);
    let other_body = syncfleet_shared::webhook::sign(token.as_bytes(), b"{}").expect("signed");
    assert_eq!(deliver(&api, &raw, Some(&other_body)).await.0, 401);
    assert_eq!(deliver(&api, &raw, Some("sha256=not-hex")).await.0, 401);
    assert_eq!(deliver(&api, b"{not json", Some("sha256=00")).await.0, 400);
    assert_eq!(runs(&env).await, 0);

    // A valid event schedules one run; its replay is a duplicate.
    let (status, body) = signed(&api, token, &event).await;
    assert_eq!((status, body["status"].clone()), (202, json!("scheduled")), "{body}");
    assert_eq!(body["database_id"], json!(db));
    let (status, body) = signed(&api, token, &event).await;
    assert_eq!((status, body["status"].clone()), (200, json!("duplicate")), "{body}");
    // Unknown types, pages of databases not mirrored, events without an id.
    let mut unknown = edit();
    unknown["type"] = json!("comment.created");
    assert_eq!(signed(&api, token, &unknown).await.1["status"], "ignored");
    let elsewhere = page_event("page.created", page, other, other, uuid::Uuid::nil());
    assert_eq!(signed(&api, token, &elsewhere).await.1["status"], "ignored");
    let mut no_id = edit();
    no_id.as_object_mut().expect("object").remove("id");
    assert_eq!(signed(&api, token, &no_id).await.1["error"]["field"], "id");

    // The scheduled run is published once the events pause, with the webhook as its reason.
    until("the webhook's run", LONG, || async { runs(&env).await == 1 }).await;
    let reason: String = env.scalar("SELECT reason FROM sync_runs").await;
    assert_eq!(reason, "webhook");
    // A schema change while that run is queued is covered by it: no second run.
    let schema = data_source_event("data_source.schema_updated", data_source, db);
    assert_eq!(signed(&api, token, &schema).await.0, 202);
    until("the event to be served", SHORT, || async {
        env.scalar::<i64>("SELECT count(*) FROM notion_webhook_pending").await == 0
    })
    .await;
    assert_eq!(runs(&env).await, 1, "coalesced into the queued run");
    env.spawn_worker(1).expect("worker");
    settle(&env, LONG).await;
    let status: String = env.scalar("SELECT status FROM sync_runs").await;
    assert_eq!(status, "succeeded");

    // A producer frozen while serving the database holds its pending row: a delivery then fails
    // fast with 503 (Notion retries it) instead of hanging, and its retry is not a duplicate.
    {
        use sea_orm::sqlx::{Connection, Executor};
        use secrecy::ExposeSecret;
        let mut holder = sea_orm::sqlx::PgConnection::connect(env.settings.database.url.expose_secret())
            .await
            .expect("connect");
        holder.execute("BEGIN").await.expect("begin");
        holder
            .execute(sea_orm::sqlx::AssertSqlSafe(format!(
                "INSERT INTO notion_webhook_pending (database_id) VALUES ('{db}')"
            )))
            .await
            .expect("hold the row");
        let held = edit();
        let started = Instant::now();
        let (status, body) = signed(&api, token, &held).await;
        assert_eq!(status, 503, "{body}");
        assert!(started.elapsed() < Duration::from_secs(15), "answered after {:?}", started.elapsed());
        holder.execute("ROLLBACK").await.expect("rollback");
        assert_eq!(signed(&api, token, &held).await.0, 202, "the retry of a failed delivery is served");
        settle(&env, LONG).await;
        until("the event to be served", LONG, || async {
            env.scalar::<i64>("SELECT count(*) FROM notion_webhook_pending").await == 0
        })
        .await;
        settle(&env, LONG).await;
    }

    // The data source is deleted: the database is disabled and the operator told, once.
    let deleted = data_source_event("data_source.deleted", data_source, db);
    let (status, body) = signed(&api, token, &deleted).await;
    assert_eq!((status, body["status"].clone()), (200, json!("disabled")), "{body}");
    let enabled: bool = env.scalar(&format!("SELECT enabled FROM notion_databases WHERE id = '{db}'")).await;
    assert!(!enabled);
    until("the notification", LONG, || async { !receiver.bodies.lock().await.is_empty() }).await;
    let text = receiver.bodies.lock().await[0]["text"].as_str().unwrap_or_default().to_string();
    assert!(text.contains(&db.to_string()) && text.contains("deleted"), "{text}");
    // Events of a disabled database are ignored.
    assert_eq!(signed(&api, token, &edit()).await.1["status"], "ignored");

    // The token never reached the log in full.
    assert!(!env.log().contains(token), "the verification token leaked into the log");
    assert!(env.log().contains("secret_v"), "the masked token is logged once");

    // The operator replaces the subscription: the old token stops working at once.
    let status = cli_text(&env, &["webhook", "status"]).await;
    assert!(status.contains("secret_v") && !status.contains(token), "{status}");
    let revealed = cli_text(&env, &["webhook", "status", "--reveal"]).await;
    assert!(revealed.contains(token), "the operator can copy the token into Notion: {revealed}");
    cli_text(&env, &["webhook", "reset"]).await;
    cli_text(&env, &["webhook", "arm"]).await;
    let fresh = "secret_second_subscription_5e6f";
    let (code, body) = deliver(&api, json!({"verification_token": fresh}).to_string().as_bytes(), None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(signed(&api, token, &edit()).await.0, 401, "the old subscription's token is refused");
    assert_eq!(signed(&api, fresh, &edit()).await.0, 200);
    env.cleanup().await;
}

#[tokio::test]
async fn an_edit_in_notion_reaches_postgresql_through_the_webhook_and_a_storm_costs_two_runs_at_most() {
    let mut env = TestEnv::start(SimConfig { pages: 2_000, rate: 10.0, burst: 3, ..SimConfig::default() })
        .await
        .expect("env");
    let db = env.register("acme", 10.0, 3, 0).await.expect("register");
    let api = Api::start_with(&mut env, &[("SYNCFLEET_API__WEBHOOK_MAX_WAIT_SECS", "15")]).await;
    env.spawn_worker(2).expect("worker");
    let (status, first) = api.post("/v1/jobs", json!({"database": db, "mode": "full"})).await;
    assert_eq!(status, 202, "{first}");
    api.wait_final(first["job_id"].as_str().expect("id"), LONG).await;

    // The simulator subscribes the producer, as Notion does, once the operator armed it.
    cli_text(&env, &["webhook", "arm"]).await;
    let configured =
        env.sim_admin("webhooks", json!({"url": format!("{}{HOOK}", api.base)})).await.expect("sim");
    assert!(configured["verification_token"].as_str().is_some_and(|t| t.starts_with("secret_")));
    until("the verification token to be stored", SHORT, || async {
        env.scalar::<i64>("SELECT count(*) FROM notion_webhook_subscription").await == 1
    })
    .await;

    // Edits, one at a time: the seconds from the edit in Notion to the new row in PostgreSQL.
    let pages: Vec<uuid::Uuid> =
        env.sim.state.read().databases[0].pages[10..15].iter().map(|p| p.id).collect();
    let mut latencies = Vec::new();
    for page in &pages {
        let row_hash = |page: uuid::Uuid| {
            let sql = format!("SELECT md5(properties::text) FROM notion_pages WHERE page_id = '{page}'");
            let env = &env;
            async move { env.scalar::<String>(&sql).await }
        };
        let before = row_hash(*page).await;
        let edited = Instant::now();
        env.sim_admin("mutate", json!({"database_id": db, "edit_ids": [page]})).await.expect("edit");
        let deadline = Instant::now() + LONG;
        while row_hash(*page).await == before {
            assert!(Instant::now() < deadline, "the edit of {page} never reached PostgreSQL");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.push(edited.elapsed().as_secs_f64());
        settle(&env, LONG).await;
    }
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "webhook-latency: edit to row, {} edits: median {:.2} s, max {:.2} s ({latencies:.2?})",
        sorted.len(),
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    assert!(sorted[sorted.len() - 1] < 30.0, "{latencies:?}");

    // A storm: 1,000 edit events as fast as the simulator sends them.
    let before_storm: i64 = runs(&env).await;
    let storm_started = Instant::now();
    for _ in 0..10 {
        env.sim_admin("mutate", json!({"database_id": db, "edit": 100})).await.expect("edit");
    }
    let sent_before: u64 = 5 + 1; // five edits above and the verification request
    until("the storm's deliveries", LONG, || async {
        let counts = env.sim_admin_get("webhooks").await.expect("counts");
        counts["sent"].as_u64().unwrap_or_default() + counts["failed"].as_u64().unwrap_or_default()
            >= sent_before + 1000
    })
    .await;
    let storm_secs = storm_started.elapsed().as_secs_f64();
    let counts = env.sim_admin_get("webhooks").await.expect("counts");
    assert_eq!(counts["failed"], json!(0), "every delivery was accepted: {counts}");
    settle(&env, LONG).await;
    until("no event left pending", LONG, || async {
        env.scalar::<i64>("SELECT count(*) FROM notion_webhook_pending").await == 0
    })
    .await;
    settle(&env, LONG).await;
    let storm_runs = runs(&env).await - before_storm;
    println!("webhook-storm: 1,000 events in {storm_secs:.1} s gave {storm_runs} runs");
    // Within one max-wait period (15 s), a storm is served by one run, plus at most one follow-up
    // for events that came while that run was running.
    assert!((1..=2).contains(&storm_runs), "{storm_runs} runs for one storm of {storm_secs:.1} s");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");

    // Pages deleted in Notion: only a full run finds those, and the webhook asks for one.
    let trashed = env.sim_admin("mutate", json!({"database_id": db, "trash": 3})).await.expect("trash");
    let gone: Vec<String> = serde_json::from_value(trashed["trashed"].clone()).expect("ids");
    let live = format!(
        "SELECT count(*) FROM notion_pages WHERE page_id IN ({}) AND deleted_at IS NULL AND NOT in_trash",
        gone.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",")
    );
    until("the deletions to reach PostgreSQL", LONG, || async { env.scalar::<i64>(&live).await == 0 }).await;
    settle(&env, LONG).await;
    let full: i64 =
        env.scalar("SELECT count(*) FROM sync_runs WHERE reason = 'webhook' AND mode = 'full'").await;
    assert!(full >= 1, "a deleted page asks for a full run");
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");
    env.cleanup().await;
}
