//! Publishers in other languages: `examples/publish.py` (pika) and `examples/publish.mjs`
//! (amqplib) against the real RabbitMQ, with the worker completing each job; and the committed
//! JSON Schema accepting what the worker accepts.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::ExposeSecret;
use syncfleet_shared::amqp::{self, Topology};
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a setup script of the repository (idempotent installers).
fn setup(script: &str) {
    let status = std::process::Command::new(root().join(script)).status().expect("setup script runs");
    assert!(status.success(), "{script} failed");
}

/// Runs an example; (exit code, stdout, stderr).
async fn example(program: &str, script: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program).arg(root().join(script)).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("the example finished within a minute")
    .expect("the example ran");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn the_python_and_node_examples_publish_confirmed_jobs_that_the_worker_completes() {
    setup("script/pyenv");
    setup("script/node-deps");
    let python = root().join("target/pyenv/bin/python");
    let python = python.to_str().expect("path");
    let mut env = TestEnv::start(SimConfig { pages: 60, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(2).expect("worker");
    // The exchanges and queues exist before anyone publishes (as after the fleet's first start).
    let conn = amqp::connect(&env.settings.amqp, "publishers-test").await.expect("amqp");
    Topology::new(&env.settings.amqp)
        .declare(&conn.create_channel().await.expect("channel"))
        .await
        .expect("declare");
    // Closing races the channel drop; the declared topology stays either way.
    let _ = conn.close(200, "done".into()).await;
    let url = env.settings.amqp.url.expose_secret().to_string();
    let prefix = env.settings.amqp.prefix.clone();
    let simple = db.simple().to_string();
    let dashed = db.to_string();

    // Python: a dashless id, no integration (the worker uses the database's).
    let (code, stdout, stderr) = example(
        python,
        "examples/publish.py",
        &["--database", &simple, "--mode", "full", "--amqp-url", &url, "--prefix", &prefix],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let py_job: uuid::Uuid = stdout.parse().expect("the job id is printed");
    let run = env.wait_run(py_job, Duration::from_secs(90)).await.expect("python job ran");
    assert_eq!(
        (run.status.as_str(), run.integration.as_str(), run.mode.as_str()),
        ("succeeded", "acme", "full")
    );
    assert_eq!(run.pages_seen, 60);

    // Node.js: a dashed id, the integration named, high priority.
    let (code, stdout, stderr) = example(
        "node",
        "examples/publish.mjs",
        &[
            "--database",
            &dashed,
            "--mode",
            "incremental",
            "--amqp-url",
            &url,
            "--prefix",
            &prefix,
            "--integration",
            "acme",
            "--priority",
            "high",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let node_job: uuid::Uuid = stdout.parse().expect("the job id is printed");
    let run = env.wait_run(node_job, Duration::from_secs(90)).await.expect("node job ran");
    assert_eq!((run.status.as_str(), run.mode.as_str()), ("succeeded", "incremental"));
    let report = env.verify(db).await.expect("verify");
    assert!(report.is_exact(), "{report:?}");

    // Nothing confirmed, nothing printed: a publish to a prefix nobody runs exits 1.
    for (program, script) in [(python, "examples/publish.py"), ("node", "examples/publish.mjs")] {
        let (code, stdout, stderr) =
            example(program, script, &["--database", &simple, "--amqp-url", &url, "--prefix", "sft_nobody"])
                .await;
        assert_eq!(code, Some(1), "{script}: {stdout} {stderr}");
        assert!(stdout.is_empty(), "{script} printed a job id for an unconfirmed publish");
        assert!(stderr.contains("sft_nobody"), "{script} names the prefix: {stderr}");
        let (code, _, stderr) = example(program, script, &["--database", "not-an-id"]).await;
        assert_eq!(code, Some(2), "{script}: {stderr}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn the_committed_json_schema_accepts_what_the_worker_accepts() {
    setup("script/pyenv");
    let id = uuid::Uuid::new_v4();
    let db = uuid::Uuid::new_v4();
    let job = |id: String, db: String, integration: Option<&str>| {
        let mut data = serde_json::json!({"database_id": db, "mode": "incremental"});
        if let Some(i) = integration {
            data["integration"] = i.into();
        }
        serde_json::json!({"specversion": "1.0", "type": syncfleet_shared::job::JOB_TYPE, "source": "urn:test",
                           "id": id, "data": data})
    };
    let accepted = vec![
        job(id.to_string(), db.to_string(), Some("acme")),
        job(id.simple().to_string(), db.simple().to_string(), None),
        job(id.braced().to_string(), db.urn().to_string(), Some("")),
        job(id.to_string().to_uppercase(), db.simple().to_string().to_uppercase(), Some("a_b-9")),
    ];
    let rejected = vec![
        job("not-a-uuid".into(), db.to_string(), None),
        job(id.to_string(), db.simple().to_string()[..31].to_string(), None),
        job(id.to_string(), db.to_string(), Some("a b;DROP")),
    ];
    // The worker's parser decides; the schema must agree with it on every case.
    for (cases, valid) in [(&accepted, true), (&rejected, false)] {
        for case in cases {
            let worker = syncfleet_shared::job::JobEnvelope::parse(case.to_string().as_bytes()).is_ok();
            assert_eq!(worker, valid, "the worker on {case}");
        }
    }
    let schema = root().join("shared/schema/sync_database.v1.schema.json");
    let check = format!(
        "import json, sys, jsonschema\n\
         schema = json.load(open({schema:?}))\n\
         jsonschema.Draft202012Validator.check_schema(schema)\n\
         v = jsonschema.Draft202012Validator(schema)\n\
         accepted, rejected = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n\
         bad = [c for c in accepted if not v.is_valid(c)] + [c for c in rejected if v.is_valid(c)]\n\
         print(json.dumps(bad)); sys.exit(1 if bad else 0)\n",
        schema = schema.to_str().expect("path")
    );
    let out = std::process::Command::new(root().join("target/pyenv/bin/python"))
        .args([
            "-c",
            &check,
            &serde_json::to_string(&accepted).expect("json"),
            &serde_json::to_string(&rejected).expect("json"),
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "the schema disagrees with the worker on: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_job_without_timestamp_app_id_or_traceparent_runs_and_still_gets_a_queue_wait_figure() {
    let mut env = TestEnv::start(SimConfig { pages: 30, ..SimConfig::default() }).await.expect("env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    let port = syncfleet_tests::harness::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    env.spawn_worker_with(1, &["--metrics-addr", &addr], &[]).expect("worker");
    let job = uuid::Uuid::new_v4();
    // The bare minimum: no message id, timestamp, app id, headers or `time`, no integration.
    let body = serde_json::json!({
        "specversion": "1.0", "type": syncfleet_shared::job::JOB_TYPE, "source": "urn:bare",
        "id": job.simple().to_string(), "data": {"database_id": db.simple().to_string(), "mode": "full"}
    });
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    env.publish_raw(vec![(body.to_string().into_bytes(), props)]).await.expect("published");
    let run = env.wait_run(job, Duration::from_secs(60)).await.expect("the job ran");
    assert_eq!((run.status.as_str(), run.integration.as_str()), ("succeeded", "acme"));
    let (status, metrics) =
        syncfleet_tests::harness::http_get(port, "/metrics", Duration::from_secs(10)).await.expect("metrics");
    assert_eq!(status, 200);
    let count = syncfleet_tests::harness::metric_value(&metrics, "syncfleet_job_queue_wait_seconds_count");
    assert_eq!(count, Some(1.0), "the job got a queue-wait figure:\n{metrics}");
    env.cleanup().await;
}
