//! Malformed messages go to the dead-letter queue with a reason and never stop the worker.

use lapin::BasicProperties;
use syncfleet_shared::amqp;
use syncfleet_shared::job::SyncMode;
use syncfleet_tests::harness::TestEnv;
use syncfleet_tests::sim::SimConfig;
use uuid::Uuid;

use crate::LONG;

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_a_reason_and_the_worker_keeps_serving() {
    let sim = SimConfig { pages: 50, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(2).expect("worker");
    let base = |data: serde_json::Value| {
        serde_json::json!({"specversion": "1.0", "type": "dev.syncfleet.sync_database.v1", "source": "urn:other-service",
                           "id": Uuid::new_v4(), "data": data})
    };
    let bodies: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json".to_vec(), "not JSON"),
        (serde_json::json!({"specversion": "1.0", "type": "com.example.unknown", "source": "x", "id": Uuid::new_v4(), "data": {}}).to_string().into_bytes(), "unknown event type"),
        (base(serde_json::json!({"integration": "acme", "mode": "full"})).to_string().into_bytes(), "missing field"),
        (base(serde_json::json!({"integration": "acme", "database_id": db, "mode": 42})).to_string().into_bytes(), "invalid job"),
        (base(serde_json::json!({"integration": "acme", "database_id": Uuid::new_v4(), "mode": "full"})).to_string().into_bytes(), "unknown database"),
        (vec![0xff, 0x00, 0xfe], "not JSON"),
    ];
    let props = BasicProperties::default().with_content_type("application/json".into());
    env.publish_raw(bodies.iter().map(|(b, _)| (b.clone(), props.clone())).collect()).await.expect("publish");
    // A valid job behind them still runs.
    let run = env.enqueue("acme", db, SyncMode::Full).await.expect("enqueue");
    assert_eq!(env.wait_run(run, LONG).await.expect("run").status, "succeeded");
    let dead = env.drain_dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), bodies.len(), "{dead:?}");
    for (reason, body) in &dead {
        let reason = reason.as_deref().expect("every dead letter has a reason header");
        let (_, expected) = bodies.iter().find(|(b, _)| b == body).expect("the original body is kept");
        assert!(reason.contains(expected), "reason {reason:?} should mention {expected:?}");
    }
    assert!(env.log().contains("not a valid sync job"), "rejections are logged");
    assert!(!env.log().contains("panicked"));
    env.cleanup().await;
}

#[tokio::test]
async fn hostile_headers_on_a_valid_job_neither_panic_nor_stop_it() {
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let sim = SimConfig { pages: 20, rate: 0.0, ..SimConfig::default() };
    let mut env = TestEnv::start(sim).await.expect("test env");
    let db = env.register("acme", 50.0, 10, 0).await.expect("register");
    env.spawn_worker(1).expect("worker");
    let mut ids = Vec::new();
    let mut messages = Vec::new();
    let hostile: Vec<(&str, AMQPValue)> = vec![
        (amqp::PUBLISHED_MS_HEADER, AMQPValue::LongLongInt(i64::MIN)),
        (amqp::PUBLISHED_MS_HEADER, AMQPValue::LongLongInt(i64::MAX)),
        (amqp::PUBLISHED_MS_HEADER, AMQPValue::LongString(LongString::from("not a number"))),
        (syncfleet_shared::job::ATTEMPT_HEADER, AMQPValue::LongLongInt(-5)),
        (syncfleet_shared::job::ATTEMPT_HEADER, AMQPValue::LongLongInt(i64::MAX)),
        (syncfleet_shared::job::ATTEMPT_HEADER, AMQPValue::LongLongInt(i64::from(u32::MAX))),
        ("traceparent", AMQPValue::LongString(LongString::from("00-zz-\u{0}-01"))),
    ];
    for (i, (name, value)) in hostile.into_iter().enumerate() {
        let job = syncfleet_shared::job::JobEnvelope::new(
            "urn:other-service",
            syncfleet_shared::job::SyncDatabaseJob {
                integration: "acme".into(),
                database_id: db,
                mode: SyncMode::Incremental,
                priority: Default::default(),
                reason: Default::default(),
            },
        );
        let mut headers = FieldTable::default();
        headers.insert(name.into(), value);
        // Alternately a timestamp far in the future and none at all.
        let mut props = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_headers(headers);
        if i % 2 == 0 {
            props = props.with_timestamp(u64::MAX);
        }
        messages.push((job.to_json(), props));
        ids.push(job.id);
    }
    env.publish_raw(messages).await.expect("publish");
    for id in ids {
        let run = env.wait_run(id, LONG).await.expect("every job ends");
        assert!(matches!(run.status.as_str(), "succeeded" | "skipped"), "{run:?}");
    }
    assert!(!env.log().contains("panicked"), "{}", env.log_tail());
    env.cleanup().await;
}
