//! Publishing: confirmed and `mandatory`, so an unroutable job is an error, never silent; and
//! `enqueue --wait` exits non-zero when the run fails.

use std::process::Stdio;

use secrecy::ExposeSecret;
use syncfleet_shared::amqp::{self, AmqpError, Destination, Publisher, Topology};
use syncfleet_shared::job::{JobEnvelope, SyncDatabaseJob, SyncMode};
use syncfleet_tests::harness::{TestEnv, binary};
use syncfleet_tests::sim::SimConfig;

#[tokio::test]
async fn an_unroutable_publish_is_an_error() {
    let env = TestEnv::start(SimConfig { pages: 1, ..SimConfig::default() }).await.expect("env");
    let conn = amqp::connect(&env.settings.amqp, "publish-test").await.expect("amqp");
    let channel = conn.create_channel().await.expect("channel");
    let topology = Topology::new(&env.settings.amqp);
    topology.declare(&channel).await.expect("declare");
    // Without its queue the work exchange routes nowhere.
    channel
        .queue_delete(topology.jobs_queue().as_str().into(), Default::default())
        .await
        .expect("delete queue");
    let publisher = Publisher::new(&conn, &env.settings.amqp).await.expect("publisher");
    let job = JobEnvelope::new(
        "urn:test",
        SyncDatabaseJob {
            integration: "acme".into(),
            database_id: uuid::Uuid::new_v4(),
            mode: SyncMode::Full,
            priority: Default::default(),
            reason: Default::default(),
        },
    );
    let err =
        publisher.publish_job(&job, &Destination::Work, &Default::default()).await.expect_err("unroutable");
    assert!(matches!(err, AmqpError::Unroutable(_)), "{err}");
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn enqueue_wait_shows_the_outcome_and_exits_non_zero_when_the_run_fails() {
    let mut env =
        TestEnv::start(SimConfig { pages: 120, rate: 0.0, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let producer = |mode: &'static str| {
        let mut cmd = tokio::process::Command::new(binary("syncfleet-producer").expect("built"));
        cmd.args([
            "enqueue",
            "--database",
            &db.to_string(),
            "--mode",
            mode,
            "--wait",
            "--timeout-secs",
            "60",
        ]);
        cmd.envs(env.env_vars()).env_remove("RUST_LOG").stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    };
    let ok = producer("full").output().await.expect("runs");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&ok.stderr));
    assert!(stdout.contains("succeeded: 120 pages (120 created"), "{stdout}");
    env.sim_admin("faults", serde_json::json!({"status": 403, "count": 1})).await.expect("fault");
    let failed = producer("incremental").output().await.expect("runs");
    assert_eq!(failed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("run failed: notion_forbidden"), "{stderr}");
    let key = env.settings.encryption_key.as_ref().expect("key").expose_secret().to_string();
    assert!(!stderr.contains(&key) && !String::from_utf8_lossy(&failed.stdout).contains(&key));

    // `status --json` reports the database, its live pages and the latest (failed) run.
    let status = tokio::process::Command::new(binary("syncfleet-producer").expect("built"))
        .args(["status", "--json"])
        .envs(env.env_vars())
        .output()
        .await
        .expect("status runs");
    assert!(status.status.success());
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(report[0]["id"], db.to_string());
    assert_eq!(report[0]["pages"], 120);
    assert_eq!(report[0]["last_run"]["status"], "failed");
    assert_eq!(report[0]["last_run"]["mode"], "incremental");

    // Migrating an up-to-date database changes nothing.
    let pending = syncfleet_shared::db::migrate(&env.settings.database).await.expect("migrate again");
    assert!(pending.is_empty(), "{pending:?}");
    env.cleanup().await;
}
